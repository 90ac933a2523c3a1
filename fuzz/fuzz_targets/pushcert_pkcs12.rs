//! Push certificate uploads as PKCS#12 (`PUT /api/v1/nanomdm/pushcert` with `X-Password`).
//!
//! Input: a length byte, the password, then the PKCS#12 file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::identity::PushCertificate;
use orchard_fuzz::split_prefixed;

fuzz_target!(|data: &[u8]| {
    let (password, der) = split_prefixed(data);
    let password = String::from_utf8_lossy(password);
    let Ok(push) = PushCertificate::from_pkcs12(der, &password) else {
        return;
    };
    assert!(push.topic.starts_with("com.apple.mgmt."), "{push:?}");
    let stored = format!("{}{}", push.cert_pem, push.key_pem);
    assert_eq!(
        PushCertificate::from_pem(stored.as_bytes()).ok(),
        Some(push)
    );
});
