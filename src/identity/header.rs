//! The device certificate as forwarded by a TLS-terminating proxy.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use percent_encoding::percent_decode_str;
use rustls_pki_types::CertificateDer;

use super::pem::decode_blocks;
use super::x509::parse_certificate;
use super::IdentityError;

/// RFC 9440 wraps the base64 DER in colons (a structured-field byte sequence).
const RFC9440_DELIMITER: char = ':';

/// The longest header accepted: a device certificate is a few KB, even URL-escaped.
/// Decoding cost grows with the size, and the header arrives before the device is
/// authenticated.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Parses a client-certificate header in either form proxies use:
///
/// * RFC 9440 `Client-Cert`: `:<base64 DER>:`
/// * nginx `$ssl_client_escaped_cert`: URL-escaped PEM.
///
/// The DER is checked to be a certificate so malformed headers fail here, with a precise
/// reason, rather than later in chain verification.
pub fn parse_client_cert_header(value: &str) -> Result<CertificateDer<'static>, IdentityError> {
    if value.len() > MAX_HEADER_BYTES {
        return Err(IdentityError::TooLarge {
            what: "certificate header",
            limit: MAX_HEADER_BYTES,
        });
    }
    let value = value.trim();
    if value.is_empty() {
        return Err(IdentityError::MissingCertificate(
            "empty certificate header",
        ));
    }
    let der = if value.starts_with(RFC9440_DELIMITER) {
        decode_rfc9440(value)?
    } else {
        decode_escaped_pem(value)?
    };
    parse_certificate(&der)?;
    Ok(CertificateDer::from(der))
}

fn decode_rfc9440(value: &str) -> Result<Vec<u8>, IdentityError> {
    let inner = value
        .strip_prefix(RFC9440_DELIMITER)
        .and_then(|rest| rest.strip_suffix(RFC9440_DELIMITER))
        .ok_or_else(|| {
            IdentityError::BadBase64("RFC 9440 value must start and end with ':'".into())
        })?;
    STANDARD
        .decode(inner)
        .map_err(|err| IdentityError::BadBase64(format!("RFC 9440 certificate: {err}")))
}

fn decode_escaped_pem(value: &str) -> Result<Vec<u8>, IdentityError> {
    let pem = percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| IdentityError::BadPem("URL-escaped PEM is not UTF-8".into()))?;
    decode_blocks(&pem)?
        .into_iter()
        .find(|block| block.label == "CERTIFICATE")
        .map(|block| block.der)
        .ok_or_else(|| IdentityError::BadPem("no CERTIFICATE block".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::fingerprint;
    use crate::identity::test_support::{descending_set, element, recorded_client_cert_header};

    fn subject(der: &[u8]) -> String {
        parse_certificate(der)
            .unwrap()
            .tbs_certificate
            .subject
            .to_string()
    }

    #[test]
    fn reads_nginx_escaped_pem_from_a_recorded_authenticate() {
        let cert =
            parse_client_cert_header(&recorded_client_cert_header("02-authenticate.txt")).unwrap();
        assert_eq!(subject(&cert), "CN=device1");
    }

    #[test]
    fn reads_the_recorded_rogue_certificate_too() {
        let header = recorded_client_cert_header("41-neg-connect-untrusted-cert.txt");
        let cert = parse_client_cert_header(&header).unwrap();
        assert_eq!(subject(&cert), "CN=rogue-selfsigned");
    }

    #[test]
    fn rfc9440_and_escaped_pem_of_the_same_certificate_agree() {
        let from_pem =
            parse_client_cert_header(&recorded_client_cert_header("02-authenticate.txt")).unwrap();
        let rfc9440 = format!(":{}:", STANDARD.encode(&from_pem));
        let from_rfc9440 = parse_client_cert_header(&rfc9440).unwrap();
        assert_eq!(fingerprint(&from_rfc9440), fingerprint(&from_pem));
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        let der =
            parse_client_cert_header(&recorded_client_cert_header("02-authenticate.txt")).unwrap();
        let padded = format!("  :{}:\t", STANDARD.encode(&der));
        assert_eq!(parse_client_cert_header(&padded).unwrap(), der);
    }

    #[test]
    fn empty_header_means_no_certificate() {
        let err = parse_client_cert_header("  ").unwrap_err();
        assert_eq!(err.reason(), "missing_certificate");
    }

    #[test]
    fn rfc9440_errors_are_bad_base64() {
        for value in [":", ":AAAA", ":not base64!:"] {
            let err = parse_client_cert_header(value).unwrap_err();
            assert_eq!(err.reason(), "bad_base64", "{value}: {err}");
        }
    }

    #[test]
    fn rfc9440_with_garbage_der_is_bad_der() {
        let err =
            parse_client_cert_header(&format!(":{}:", STANDARD.encode(b"hello"))).unwrap_err();
        assert_eq!(err.reason(), "bad_der");
    }

    #[test]
    fn escaped_text_without_a_certificate_is_bad_pem() {
        for value in ["hello", "-----BEGIN%20CERTIFICATE-----%0AAAAA", "%FF%FE"] {
            let err = parse_client_cert_header(value).unwrap_err();
            assert_eq!(err.reason(), "bad_pem", "{value}: {err}");
        }
    }

    #[test]
    fn escaped_pem_with_truncated_base64_is_bad_base64() {
        let header = recorded_client_cert_header("02-authenticate.txt").replacen("MIID", "MII", 1);
        let err = parse_client_cert_header(&header).unwrap_err();
        assert_eq!(err.reason(), "bad_base64");
    }

    /// The start of a certificate whose issuer is one RDN of `count` attributes in
    /// descending order. 2,000 of them made the Name decoder sort for seconds.
    fn certificate_with_a_long_issuer_rdn(count: usize) -> String {
        let sha256_with_rsa = [
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
        ];
        let tbs = [
            element(0xa0, &element(0x02, &[2])),
            element(0x02, &[1]),
            element(0x30, &sha256_with_rsa),
            element(0x30, &descending_set(count)),
        ]
        .concat();
        format!(":{}:", STANDARD.encode(element(0x30, &element(0x30, &tbs))))
    }

    #[test]
    fn a_name_too_large_to_sort_is_refused_before_decoding() {
        let header = certificate_with_a_long_issuer_rdn(2000);
        assert!(header.len() < MAX_HEADER_BYTES);
        let started = std::time::Instant::now();
        let err = parse_client_cert_header(&header).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid DER: BER: more than 64 elements in one constructed element"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn an_oversized_header_is_refused_unread() {
        let header = format!(":{}:", "A".repeat(MAX_HEADER_BYTES));
        let err = parse_client_cert_header(&header).unwrap_err();
        assert_eq!(err.reason(), "too_large");
    }

    #[test]
    fn escaped_pem_of_a_non_certificate_is_bad_der() {
        let header = "-----BEGIN%20CERTIFICATE-----%0AMAA%3D%0A-----END%20CERTIFICATE-----%0A";
        assert_eq!(
            parse_client_cert_header(header).unwrap_err().reason(),
            "bad_der"
        );
    }
}
