//! Push certificate uploads as PKCS#12 (`PUT /api/v1/nanomdm/pushcert` with `X-Password`).
//!
//! Input: a length byte, the password, then the PKCS#12 file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::identity::PushCertificate;
use orchard_fuzz::{assert_push_certificate_is_canonical, split_prefixed};

fuzz_target!(|data: &[u8]| {
    let (password, der) = split_prefixed(data);
    let password = String::from_utf8_lossy(password);
    let Ok(push) = PushCertificate::from_pkcs12(der, &password) else {
        return;
    };
    assert_push_certificate_is_canonical(push);
});
