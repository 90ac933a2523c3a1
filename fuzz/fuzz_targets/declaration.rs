//! Declarations published through the API (`PUT /api/v1/ddm/declarations`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::ddm::Declaration;

fuzz_target!(|json: &[u8]| {
    let Ok((declaration, _warnings)) = Declaration::from_api_json(json, 0) else {
        return;
    };
    assert!(declaration.category().is_some(), "{declaration:?}");
    // The catalog reloads and touches declarations from the body it serves, so that body
    // must read back as the same declaration, with the same ServerToken.
    let served = declaration.to_device_json();
    let (again, _) = Declaration::from_api_json(&served, declaration.touch)
        .unwrap_or_else(|error| panic!("served body is refused: {error}"));
    assert_eq!(again, declaration);
});
