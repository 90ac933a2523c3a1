//! Chain verification of device identity certificates, with a verdict cache.
//!
//! Devices reconnect constantly (every push, every command), so the same certificate is
//! verified over and over. A successful verdict is remembered until the certificate or a
//! CA in its path expires; failures are never remembered, so fixing a trust problem takes
//! effect immediately.

use ring::digest;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use super::cache::{Verdict, VerdictCache};
use super::header::parse_client_cert_header;
use super::x509::{not_after_unix, parse_certificate};
use super::{CertFingerprint, IdentityError};

/// Entries per cache. An entry is about 100 bytes, so a full default cache costs ~100 MB;
/// only the cache of the identity mode in use fills.
pub const DEFAULT_CACHE_CAPACITY: usize = 1_000_000;

/// SHA-256 of a certificate's DER encoding.
pub fn fingerprint(der: &[u8]) -> CertFingerprint {
    sha256(der)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// Verifies that device identity certificates chain to one of the configured anchors and
/// allow client authentication.
pub struct IdentityVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    by_certificate: VerdictCache,
    /// Keyed by the SHA-256 of the raw header value rather than the value itself: 32 bytes
    /// per entry instead of ~1.7 KB of escaped PEM, and collision resistant, so no forged
    /// header can alias a trusted one.
    by_header: VerdictCache,
}

impl IdentityVerifier {
    /// A verifier trusting `anchors` (each certificate is trusted as given, so an
    /// intermediate may serve as an anchor), with [`DEFAULT_CACHE_CAPACITY`].
    pub fn new(anchors: Vec<CertificateDer<'static>>) -> Result<Self, IdentityError> {
        Self::with_cache_capacity(anchors, DEFAULT_CACHE_CAPACITY)
    }

    /// Like [`IdentityVerifier::new`], with at most `capacity` entries in each of the two
    /// caches (by certificate and by header value); 0 disables caching.
    pub fn with_cache_capacity(
        anchors: Vec<CertificateDer<'static>>,
        capacity: usize,
    ) -> Result<Self, IdentityError> {
        let anchors = anchors
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|err| IdentityError::bad_der("trust anchor", err))
            })
            .collect::<Result<_, _>>()?;
        Ok(IdentityVerifier {
            anchors,
            by_certificate: VerdictCache::new(capacity),
            by_header: VerdictCache::new(capacity),
        })
    }

    /// Verifies `cert` against the anchors and returns its fingerprint.
    pub fn verify(&self, cert: &CertificateDer<'_>) -> Result<CertFingerprint, IdentityError> {
        self.verify_with_intermediates(cert, &[])
    }

    /// Verifies `cert`, using `intermediates` (e.g. the rest of a TLS client chain) to reach
    /// an anchor.
    pub fn verify_with_intermediates(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<CertFingerprint, IdentityError> {
        self.verdict(cert, intermediates, UnixTime::now())
            .map(|verdict| verdict.fingerprint)
    }

    /// Parses and verifies a proxy's client-certificate header (see
    /// [`parse_client_cert_header`]). A header value seen before and still valid costs one
    /// hash and one map lookup.
    pub fn verify_header(&self, header_value: &str) -> Result<CertFingerprint, IdentityError> {
        let now = UnixTime::now();
        let key = sha256(header_value.as_bytes());
        if let Some(verdict) = self.by_header.get(&key, now.as_secs()) {
            return Ok(verdict.fingerprint);
        }
        let cert = parse_client_cert_header(header_value)?;
        // Not through the certificate cache: that would keep every identity twice.
        let verdict = Verdict {
            fingerprint: fingerprint(&cert),
            expires_at: self.verify_chain(&cert, &[], now)?,
        };
        self.by_header.insert(key, verdict);
        Ok(verdict.fingerprint)
    }

    fn verdict(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Verdict, IdentityError> {
        let fingerprint = fingerprint(cert);
        if let Some(verdict) = self.by_certificate.get(&fingerprint, now.as_secs()) {
            return Ok(verdict);
        }
        let verdict = Verdict {
            fingerprint,
            expires_at: self.verify_chain(cert, intermediates, now)?,
        };
        self.by_certificate.insert(fingerprint, verdict);
        Ok(verdict)
    }

    /// Runs webpki path building and returns when the verdict stops holding: the earliest
    /// notAfter along the verified path (anchors carry no validity in webpki).
    fn verify_chain(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<u64, IdentityError> {
        let end_entity = EndEntityCert::try_from(cert).map_err(webpki_error)?;
        let path = end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                intermediates,
                now,
                KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(webpki_error)?;
        let mut expires_at = not_after_unix(&parse_certificate(cert)?);
        for intermediate in path.intermediate_certificates() {
            expires_at = expires_at.min(not_after_unix(&parse_certificate(&intermediate.der())?));
        }
        Ok(expires_at)
    }
}

fn webpki_error(err: webpki::Error) -> IdentityError {
    use webpki::Error as E;
    match err {
        E::CertExpired { .. } => IdentityError::Expired,
        E::CertNotValidYet { .. } => IdentityError::NotYetValid,
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::MalformedExtensions => {
            IdentityError::BadDer(format!("certificate: {err}"))
        }
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            IdentityError::UnsupportedAlgorithm(err.to_string())
        }
        other => IdentityError::Untrusted(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    use time::{Duration, OffsetDateTime};

    use super::*;
    use crate::identity::ca::CertificateAuthority;
    use crate::identity::pem;
    use crate::identity::test_support::recorded_client_cert_header;

    /// A CA made directly with rcgen, for validity windows Orchard's own CA never issues.
    struct TestCa {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl TestCa {
        fn new(name: &str, lifetime: Duration) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_after = OffsetDateTime::now_utc() + lifetime;
            let cert = params.self_signed(&key).unwrap();
            TestCa { cert, key }
        }

        fn intermediate(&self, name: &str, lifetime: Duration) -> TestCa {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_after = OffsetDateTime::now_utc() + lifetime;
            let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
            TestCa { cert, key }
        }

        fn leaf(
            &self,
            not_before: OffsetDateTime,
            not_after: OffsetDateTime,
            usage: ExtendedKeyUsagePurpose,
        ) -> CertificateDer<'static> {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "device");
            params.extended_key_usages = vec![usage];
            params.not_before = not_before;
            params.not_after = not_after;
            params
                .signed_by(&key, &self.cert, &self.key)
                .unwrap()
                .der()
                .clone()
        }

        fn client_leaf(&self) -> CertificateDer<'static> {
            let now = OffsetDateTime::now_utc();
            self.leaf(
                now - Duration::hours(1),
                now + Duration::days(30),
                ExtendedKeyUsagePurpose::ClientAuth,
            )
        }

        fn der(&self) -> CertificateDer<'static> {
            self.cert.der().clone()
        }
    }

    fn orchard_ca() -> (tempfile::TempDir, CertificateAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        (dir, ca)
    }

    fn rfc9440(der: &[u8]) -> String {
        format!(":{}:", STANDARD.encode(der))
    }

    fn nginx_escaped(der: &[u8]) -> String {
        utf8_percent_encode(&pem::encode("CERTIFICATE", der), NON_ALPHANUMERIC).to_string()
    }

    #[test]
    fn a_certificate_issued_by_an_anchor_verifies_to_its_fingerprint() {
        let (_dir, ca) = orchard_ca();
        let identity = ca.issue_identity("device1").unwrap();
        let verifier = IdentityVerifier::new(vec![ca.ca_cert_der().clone()]).unwrap();
        let cert = CertificateDer::from(identity.cert_der.clone());
        assert_eq!(
            verifier.verify(&cert).unwrap(),
            fingerprint(&identity.cert_der)
        );
        assert_eq!(verifier.by_certificate.len(), 1);
    }

    #[test]
    fn fingerprint_is_sha256_of_the_der() {
        assert_eq!(
            hex::encode(fingerprint(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn any_of_several_anchors_is_accepted() {
        let (_dir, ca) = orchard_ca();
        let external = TestCa::new("External SCEP CA", Duration::days(365));
        let verifier =
            IdentityVerifier::new(vec![ca.ca_cert_der().clone(), external.der()]).unwrap();
        verifier.verify(&external.client_leaf()).unwrap();
        let ours = CertificateDer::from(ca.issue_identity("d").unwrap().cert_der);
        verifier.verify(&ours).unwrap();
    }

    #[test]
    fn untrusted_certificates_fail_and_failures_are_not_cached() {
        let (_dir, ca) = orchard_ca();
        let verifier = IdentityVerifier::new(vec![ca.ca_cert_der().clone()]).unwrap();
        let stranger = TestCa::new("Stranger", Duration::days(365)).client_leaf();
        for _ in 0..2 {
            assert_eq!(
                verifier.verify(&stranger).unwrap_err().reason(),
                "untrusted"
            );
        }
        assert_eq!(verifier.by_certificate.len(), 0);
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_named_as_such() {
        let ca = TestCa::new("CA", Duration::days(365));
        let verifier = IdentityVerifier::new(vec![ca.der()]).unwrap();
        let now = OffsetDateTime::now_utc();
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let expired = ca.leaf(
            now - Duration::days(10),
            now - Duration::days(1),
            client.clone(),
        );
        let future = ca.leaf(now + Duration::days(1), now + Duration::days(10), client);
        assert_eq!(verifier.verify(&expired).unwrap_err().reason(), "expired");
        assert_eq!(
            verifier.verify(&future).unwrap_err().reason(),
            "not_yet_valid"
        );
    }

    #[test]
    fn a_server_only_certificate_is_not_a_device_identity() {
        let ca = TestCa::new("CA", Duration::days(365));
        let verifier = IdentityVerifier::new(vec![ca.der()]).unwrap();
        let now = OffsetDateTime::now_utc();
        let server = ca.leaf(
            now,
            now + Duration::days(1),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let err = verifier.verify(&server).unwrap_err();
        assert_eq!(err.reason(), "untrusted");
        assert!(err.to_string().contains("RequiredEkuNotFound"), "{err}");
    }

    #[test]
    fn intermediates_complete_the_chain_and_bound_the_cached_verdict() {
        let root = TestCa::new("Root", Duration::days(3650));
        let intermediate = root.intermediate("Issuing CA", Duration::days(10));
        let leaf = intermediate.client_leaf();
        let verifier = IdentityVerifier::new(vec![root.der()]).unwrap();

        assert_eq!(verifier.verify(&leaf).unwrap_err().reason(), "untrusted");
        let fp = verifier
            .verify_with_intermediates(&leaf, &[intermediate.der()])
            .unwrap();

        let cached = verifier.by_certificate.get(&fp, 0).unwrap();
        let intermediate_not_after =
            not_after_unix(&parse_certificate(&intermediate.der()).unwrap());
        assert_eq!(cached.expires_at, intermediate_not_after);
    }

    #[test]
    fn both_header_forms_of_a_trusted_certificate_verify_and_are_cached_by_value() {
        let (_dir, ca) = orchard_ca();
        let identity = ca.issue_identity("device1").unwrap();
        let verifier = IdentityVerifier::new(vec![ca.ca_cert_der().clone()]).unwrap();
        let expected = fingerprint(&identity.cert_der);

        for header in [
            rfc9440(&identity.cert_der),
            nginx_escaped(&identity.cert_der),
        ] {
            assert_eq!(verifier.verify_header(&header).unwrap(), expected);
            assert_eq!(verifier.verify_header(&header).unwrap(), expected);
        }
        assert_eq!(verifier.by_header.len(), 2);
        assert_eq!(
            verifier.by_certificate.len(),
            0,
            "a header identity is remembered once, by header value"
        );
    }

    #[test]
    fn recorded_headers_from_a_foreign_ca_are_untrusted() {
        let (_dir, ca) = orchard_ca();
        let verifier = IdentityVerifier::new(vec![ca.ca_cert_der().clone()]).unwrap();
        for transcript in ["02-authenticate.txt", "41-neg-connect-untrusted-cert.txt"] {
            let err = verifier
                .verify_header(&recorded_client_cert_header(transcript))
                .unwrap_err();
            assert_eq!(err.reason(), "untrusted", "{transcript}: {err}");
        }
        assert_eq!(verifier.by_header.len(), 0);
    }

    #[test]
    fn a_self_signed_ca_certificate_is_no_device_identity_even_when_trusted() {
        let rogue = parse_client_cert_header(&recorded_client_cert_header(
            "41-neg-connect-untrusted-cert.txt",
        ))
        .unwrap();
        let verifier = IdentityVerifier::new(vec![rogue.clone()]).unwrap();
        // Self-signed and marked CA:TRUE: webpki refuses a CA certificate as end entity.
        let err = verifier.verify(&rogue).unwrap_err();
        assert_eq!(err.reason(), "untrusted");
    }

    #[test]
    fn malformed_headers_are_reported_before_any_chain_work() {
        let (_dir, ca) = orchard_ca();
        let verifier = IdentityVerifier::new(vec![ca.ca_cert_der().clone()]).unwrap();
        assert_eq!(
            verifier.verify_header(":%%%:").unwrap_err().reason(),
            "bad_base64"
        );
        assert_eq!(
            verifier.verify_header("").unwrap_err().reason(),
            "missing_certificate"
        );
    }

    #[test]
    fn caches_stay_within_their_capacity() {
        let ca = TestCa::new("CA", Duration::days(365));
        let verifier = IdentityVerifier::with_cache_capacity(vec![ca.der()], 2).unwrap();
        for _ in 0..5 {
            let leaf = ca.client_leaf();
            verifier.verify(&leaf).unwrap();
            verifier.verify_header(&rfc9440(&leaf)).unwrap();
        }
        assert!(verifier.by_certificate.len() <= 2);
        assert!(verifier.by_header.len() <= 2);
    }

    #[test]
    fn an_unparseable_anchor_is_rejected() {
        let err = IdentityVerifier::new(vec![CertificateDer::from(vec![1, 2, 3])])
            .err()
            .unwrap();
        assert_eq!(err.reason(), "bad_der");
    }
}
