//! The device certificate forwarded by a TLS-terminating proxy, in both forms: RFC 9440
//! `Client-Cert` (`:<base64 DER>:`) and nginx's URL-escaped PEM.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use orchard::identity::parse_client_cert_header;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(certificate) = parse_client_cert_header(value) else {
        return;
    };
    // Whichever form it came in, the other form of the same certificate reads the same.
    let base64 = STANDARD.encode(&certificate);
    let rfc9440 = format!(":{base64}:");
    let escaped_pem =
        format!("-----BEGIN%20CERTIFICATE-----%0A{base64}%0A-----END%20CERTIFICATE-----%0A");
    assert_eq!(
        parse_client_cert_header(&rfc9440).ok(),
        Some(certificate.clone())
    );
    assert_eq!(
        parse_client_cert_header(&escaped_pem).ok(),
        Some(certificate)
    );
});
