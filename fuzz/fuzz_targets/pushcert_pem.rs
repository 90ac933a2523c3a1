//! Push certificate uploads as PEM (`PUT /api/v1/nanomdm/pushcert`): a certificate and an
//! unencrypted private key, in any order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchard::identity::PushCertificate;
use orchard_fuzz::assert_push_certificate_is_canonical;

fuzz_target!(|bundle: &[u8]| {
    let Ok(push) = PushCertificate::from_pem(bundle) else {
        return;
    };
    assert_push_certificate_is_canonical(push);
});
