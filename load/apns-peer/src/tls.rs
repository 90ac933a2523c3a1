//! The peer's TLS side: a private CA and server certificate, and a client-certificate
//! verifier that mirrors how APNs authenticates push certificates.

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::Certificate;

/// `0.9.2342.19200300.100.1.1` (userId): Apple puts the push topic in this subject attribute.
const UID_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("0.9.2342.19200300.100.1.1");

/// The certificates the peer presents, generated fresh on every start so no key material
/// needs to be shipped with Orchard's tests.
pub(crate) struct PeerIdentity {
    pub(crate) ca_pem: String,
    pub(crate) ca_der: CertificateDer<'static>,
    pub(crate) server_config: Arc<ServerConfig>,
}

impl PeerIdentity {
    /// Creates a CA and a server certificate for `127.0.0.1` and `localhost` signed by it.
    pub(crate) fn generate() -> io::Result<Self> {
        let ca_key = KeyPair::generate().map_err(io::Error::other)?;
        let ca = ca_params().self_signed(&ca_key).map_err(io::Error::other)?;

        let server_key = KeyPair::generate().map_err(io::Error::other)?;
        let server_cert = server_params()?
            .signed_by(&server_key, &ca, &ca_key)
            .map_err(io::Error::other)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PushCertificateVerifier {
            algorithms: provider.signature_verification_algorithms,
        });
        let private_key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let mut server_config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone(), ca.der().clone()],
                private_key,
            )
            .map_err(io::Error::other)?;
        server_config.alpn_protocols = vec![b"h2".to_vec()];

        Ok(Self {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            server_config: Arc::new(server_config),
        })
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name = named("Orchard local APNs CA");
    params
}

fn server_params() -> io::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .map_err(io::Error::other)?;
    params.distinguished_name = named("Orchard local APNs");
    Ok(params)
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Requires a client certificate and checks that the client owns its key, but leaves the
/// trust decision to the request level.
///
/// APNs reports a revoked or unknown push certificate as `403 BadCertificate` on each
/// request rather than by failing the handshake; deferring trust reproduces that, so the
/// sender's handling of the HTTP-level rejection is what gets exercised.
#[derive(Debug)]
struct PushCertificateVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PushCertificateVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        webpki::EndEntityCert::try_from(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The topic a push certificate is bound to: the UID attribute of its subject.
pub(crate) fn client_topic(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = Certificate::from_der(cert.as_ref()).ok()?;
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == UID_OID)
        .and_then(|attribute| {
            let is_text = matches!(
                attribute.value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
            );
            is_text
                .then(|| std::str::from_utf8(attribute.value.value()).ok())
                .flatten()
                .map(str::to_owned)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate_with_subject(subject: DistinguishedName) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.self_signed(&key).expect("certificate").der().clone()
    }

    #[test]
    fn the_push_topic_is_read_from_the_subject_uid() {
        let mut subject = named("APSP:0f1e2d");
        subject.push(
            DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]),
            "com.apple.mgmt.External.test",
        );
        let cert = certificate_with_subject(subject);
        assert_eq!(
            client_topic(&cert).as_deref(),
            Some("com.apple.mgmt.External.test")
        );
    }

    #[test]
    fn a_certificate_without_uid_has_no_topic() {
        let cert = certificate_with_subject(named("plain client"));
        assert_eq!(client_topic(&cert), None);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(client_topic(&CertificateDer::from(vec![1, 2, 3])), None);
    }

    #[test]
    fn the_verifier_demands_a_certificate_and_rejects_unparsable_ones() {
        let verifier = PushCertificateVerifier {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        };
        assert!(verifier.offer_client_auth());
        assert!(verifier.client_auth_mandatory());
        let garbage = CertificateDer::from(vec![0x30, 0x00]);
        assert!(verifier
            .verify_client_cert(&garbage, &[], UnixTime::now())
            .is_err());
        let genuine = certificate_with_subject(named("client"));
        assert!(verifier
            .verify_client_cert(&genuine, &[], UnixTime::now())
            .is_ok());
    }

    #[test]
    fn the_generated_identity_speaks_h2_and_exports_its_ca() {
        let identity = PeerIdentity::generate().expect("identity");
        assert!(identity.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!identity.ca_der.is_empty());
        assert_eq!(identity.server_config.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
