//! Push certificate uploads as PEM (`PUT /api/v1/nanomdm/pushcert`): a certificate and an
//! unencrypted private key, in any order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::identity::PushCertificate;

fuzz_target!(|bundle: &[u8]| {
    let Ok(push) = PushCertificate::from_pem(bundle) else {
        return;
    };
    assert!(push.topic.starts_with("com.apple.mgmt."), "{push:?}");
    // What is stored is canonical: reading it back gives the same certificate.
    let stored = format!("{}{}", push.cert_pem, push.key_pem);
    assert_eq!(
        PushCertificate::from_pem(stored.as_bytes()).ok(),
        Some(push)
    );
});
