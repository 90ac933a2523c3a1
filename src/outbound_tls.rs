//! The certificate authorities Orchard trusts when it calls out over TLS, to APNs and to
//! webhook receivers: the Mozilla roots, plus the operator's own CA bundle for a server
//! behind a private CA (`--apns-ca`, `--webhook-ca`).

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

/// The Mozilla roots and `extra`; `flag` names the option an unusable certificate came
/// from, so that start-up says which bundle to fix.
pub fn trusted_roots(
    extra: &[CertificateDer<'static>],
    flag: &str,
) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra {
        roots
            .add(root.clone())
            .map_err(|e| format!("bad {flag} certificate: {e}"))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_ca_is_trusted_beside_the_mozilla_roots() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let mozilla = trusted_roots(&[], "--webhook-ca").unwrap().len();
        let roots = trusted_roots(&[ca.der().clone()], "--webhook-ca").unwrap();
        assert_eq!(roots.len(), mozilla + 1);
    }

    #[test]
    fn a_certificate_that_does_not_parse_names_its_flag() {
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let err = trusted_roots(&[garbage], "--apns-ca").unwrap_err();
        assert!(err.starts_with("bad --apns-ca certificate"), "{err}");
    }
}
