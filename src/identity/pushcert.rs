//! The APNs MDM push certificate an operator uploads (`PUT /api/v1/nanomdm/pushcert`).

use const_oid::db::{rfc4519, rfc5912};
use der::asn1::{Ia5StringRef, OctetString, PrintableStringRef, Utf8StringRef};
use der::Tagged;
use der::{Any, Encode, Header, Tag};
use ring::rand::SystemRandom;
use ring::signature::{self as ring_signature, EcdsaKeyPair, KeyPair, RsaKeyPair};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;

use super::pem::{self, PemBlock};
use super::x509::{not_after_unix, parse_certificate, KeyType};
use super::IdentityError;
use super::{ber, pkcs12_limits};

/// Every MDM push topic starts with this; anything else is a different kind of APNs
/// certificate that devices would never accept pushes for.
const MDM_TOPIC_PREFIX: &str = "com.apple.mgmt.";

const PKCS8_KEY: &str = "PRIVATE KEY";
const PKCS1_RSA_KEY: &str = "RSA PRIVATE KEY";
const SEC1_EC_KEY: &str = "EC PRIVATE KEY";
const ENCRYPTED_PKCS8_KEY: &str = "ENCRYPTED PRIVATE KEY";

/// The largest upload read. A push certificate with its key is a few KB in either form;
/// decoding cost grows with the size.
const MAX_UPLOAD_BYTES: usize = 64 * 1024;

/// A validated push certificate: the certificate matches its key and names an MDM topic.
#[derive(Clone, PartialEq, Eq)]
pub struct PushCertificate {
    /// The APNs topic, from the subject's UID attribute.
    pub topic: String,
    /// notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
    /// The certificate, re-encoded as canonical PEM.
    pub cert_pem: String,
    /// The private key, re-encoded as canonical PEM under its original label.
    pub key_pem: String,
}

impl std::fmt::Debug for PushCertificate {
    /// Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushCertificate")
            .field("topic", &self.topic)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PushCertificate {
    /// Reads a PKCS#12 export (as Keychain Access or openssl writes it, legacy 3DES/RC2 or
    /// modern AES) holding the push certificate and its private key.
    pub fn from_pkcs12(der: &[u8], password: &str) -> Result<PushCertificate, IdentityError> {
        ensure_upload_size(der)?;
        ber::ensure_bounded(der)?;
        pkcs12_limits::check_key_derivations(der)?;
        let keystore = p12_keystore::KeyStore::from_pkcs12(der, password).map_err(|e| {
            IdentityError::BadPushCert(format!("cannot open the PKCS#12 (wrong password?): {e}"))
        })?;
        let (_, chain) = keystore
            .private_key_chain()
            .ok_or_else(|| IdentityError::BadPushCert("the PKCS#12 holds no private key".into()))?;
        let leaf = chain
            .chain()
            .first()
            .ok_or_else(|| IdentityError::BadPushCert("the PKCS#12 holds no certificate".into()))?;
        let bundle = format!(
            "{}{}",
            pem::encode("CERTIFICATE", leaf.as_der()),
            pem::encode("PRIVATE KEY", chain.key())
        );
        PushCertificate::from_pem(bundle.as_bytes())
    }

    /// Reads a PEM certificate and an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1),
    /// in any order, as NanoMDM's pushcert endpoint accepts them.
    pub fn from_pem(bundle: &[u8]) -> Result<PushCertificate, IdentityError> {
        ensure_upload_size(bundle)?;
        let text = std::str::from_utf8(bundle)
            .map_err(|_| IdentityError::BadPushCert("body is not UTF-8 PEM text".into()))?;
        let blocks = pem::decode_blocks(text)?;
        let cert_block = first_block(&blocks, |label| label == "CERTIFICATE")
            .ok_or_else(|| IdentityError::BadPushCert("no CERTIFICATE block".into()))?;
        let key_block = private_key_block(&blocks)?;

        let certificate = parse_certificate(&cert_block.der)?;
        let topic = topic(&certificate)?;
        let key_spki = &certificate.tbs_certificate.subject_public_key_info;
        if public_key_of(key_block, key_spki)? != key_spki.subject_public_key.raw_bytes() {
            return Err(IdentityError::BadPushCert(
                "the private key does not match the certificate".into(),
            ));
        }
        Ok(PushCertificate {
            topic,
            not_after: i64::try_from(not_after_unix(&certificate)).unwrap_or(i64::MAX),
            cert_pem: pem::encode(&cert_block.label, &cert_block.der),
            key_pem: pem::encode(&key_block.label, &key_block.der),
        })
    }
}

fn ensure_upload_size(upload: &[u8]) -> Result<(), IdentityError> {
    if upload.len() > MAX_UPLOAD_BYTES {
        return Err(IdentityError::TooLarge {
            what: "push certificate upload",
            limit: MAX_UPLOAD_BYTES,
        });
    }
    Ok(())
}

fn first_block(blocks: &[PemBlock], wanted: impl Fn(&str) -> bool) -> Option<&PemBlock> {
    blocks.iter().find(|block| wanted(&block.label))
}

fn private_key_block(blocks: &[PemBlock]) -> Result<&PemBlock, IdentityError> {
    if first_block(blocks, |label| label == ENCRYPTED_PKCS8_KEY).is_some() {
        return Err(IdentityError::BadPushCert(
            "the private key is encrypted; upload it without a passphrase".into(),
        ));
    }
    first_block(blocks, |label| {
        [PKCS8_KEY, PKCS1_RSA_KEY, SEC1_EC_KEY].contains(&label)
    })
    .ok_or_else(|| IdentityError::BadPushCert("no private key block".into()))
}

/// The topic is the subject's UID (0.9.2342.19200300.100.1.1), as Apple issues it.
fn topic(certificate: &Certificate) -> Result<String, IdentityError> {
    let uid = certificate
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == rfc4519::UID)
        .ok_or_else(|| {
            IdentityError::BadPushCert("the certificate subject has no UID (topic)".into())
        })?;
    let topic = directory_string(&uid.value)
        .ok_or_else(|| IdentityError::BadPushCert("the subject UID is not a string".into()))?;
    if !topic.starts_with(MDM_TOPIC_PREFIX) {
        return Err(IdentityError::BadPushCert(format!(
            "topic {topic:?} is not an MDM topic ({MDM_TOPIC_PREFIX}…)"
        )));
    }
    Ok(topic.to_owned())
}

fn directory_string(value: &Any) -> Option<&str> {
    match value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(value).ok().map(|s| s.as_str()),
        Tag::PrintableString => PrintableStringRef::try_from(value).ok().map(|s| s.as_str()),
        Tag::Ia5String => Ia5StringRef::try_from(value).ok().map(|s| s.as_str()),
        _ => None,
    }
}

/// Derives the public key (in the certificate's encoding) from the private key, parsed
/// according to the certificate's key type.
fn public_key_of(
    key: &PemBlock,
    certificate_key: &SubjectPublicKeyInfoOwned,
) -> Result<Vec<u8>, IdentityError> {
    let rejected = |err: ring::error::KeyRejected| {
        IdentityError::BadPushCert(format!(
            "the private key does not fit the certificate's key type: {err}"
        ))
    };
    let key_type = KeyType::of(certificate_key)?;
    match (key_type, key_type.curve(), key.label.as_str()) {
        (KeyType::Rsa, _, PKCS1_RSA_KEY) => RsaKeyPair::from_der(&key.der)
            .map(|pair| pair.public().as_ref().to_vec())
            .map_err(rejected),
        (KeyType::Rsa, _, PKCS8_KEY) => RsaKeyPair::from_pkcs8(&key.der)
            .map(|pair| pair.public().as_ref().to_vec())
            .map_err(rejected),
        (_, Some(curve), PKCS8_KEY | SEC1_EC_KEY) => {
            let pkcs8 = if key.label == SEC1_EC_KEY {
                sec1_to_pkcs8(&key.der, curve)?
            } else {
                key.der.clone()
            };
            let algorithm = if key_type == KeyType::EcP256 {
                &ring_signature::ECDSA_P256_SHA256_ASN1_SIGNING
            } else {
                &ring_signature::ECDSA_P384_SHA384_ASN1_SIGNING
            };
            EcdsaKeyPair::from_pkcs8(algorithm, &pkcs8, &SystemRandom::new())
                .map(|pair| pair.public_key().as_ref().to_vec())
                .map_err(rejected)
        }
        (_, _, label) => Err(IdentityError::BadPushCert(format!(
            "a {label} does not fit the certificate's {key_type:?} key"
        ))),
    }
}

/// Wraps a SEC1 `ECPrivateKey` in a PKCS#8 `PrivateKeyInfo` (RFC 5915 §1), the only EC
/// private key form *ring* parses.
fn sec1_to_pkcs8(
    sec1: &[u8],
    curve: der::asn1::ObjectIdentifier,
) -> Result<Vec<u8>, IdentityError> {
    let encode = || -> der::Result<Vec<u8>> {
        let algorithm = AlgorithmIdentifierOwned {
            oid: rfc5912::ID_EC_PUBLIC_KEY,
            parameters: Some(Any::from(curve)),
        };
        let mut fields = 0u8.to_der()?;
        fields.extend(algorithm.to_der()?);
        fields.extend(OctetString::new(sec1)?.to_der()?);
        let mut pkcs8 = Header::new(Tag::Sequence, fields.len())?.to_der()?;
        pkcs8.extend(fields);
        Ok(pkcs8)
    };
    encode().map_err(|err| IdentityError::bad_der("EC private key", err))
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair as RcgenKeyPair};
    use time::{Duration, OffsetDateTime};

    use super::*;
    use crate::identity::test_support::{openssl, Scratch};

    const TOPIC: &str = "com.apple.mgmt.External.e0bd1eac-1f17-4c8e-8a63-dd17d3dd35d9";
    const UID_ARCS: [u64; 7] = [0, 9, 2342, 19200300, 100, 1, 1];

    /// An Apple-style push certificate subject: UID=<topic>, CN=APSP:<topic uuid>, C=US.
    fn push_cert_pem(
        key: &RcgenKeyPair,
        uid: Option<DnValue>,
        not_after: OffsetDateTime,
    ) -> String {
        let mut params = CertificateParams::default();
        if let Some(uid) = uid {
            params
                .distinguished_name
                .push(DnType::CustomDnType(UID_ARCS.to_vec()), uid);
        }
        params.distinguished_name.push(
            DnType::CommonName,
            "APSP:e0bd1eac-1f17-4c8e-8a63-dd17d3dd35d9",
        );
        params.distinguished_name.push(DnType::CountryName, "US");
        params.not_after = not_after;
        params.self_signed(key).unwrap().pem()
    }

    fn in_a_year() -> OffsetDateTime {
        (OffsetDateTime::now_utc() + Duration::days(365))
            .replace_nanosecond(0)
            .unwrap()
    }

    fn topic_uid() -> Option<DnValue> {
        Some(DnValue::Utf8String(TOPIC.into()))
    }

    #[test]
    fn a_pkcs12_export_is_read_with_its_password_legacy_or_modern() {
        let key = RcgenKeyPair::generate().unwrap();
        let scratch = Scratch::new();
        let (cert, key_path) = (scratch.path("push.pem"), scratch.path("push.key"));
        std::fs::write(&cert, push_cert_pem(&key, topic_uid(), in_a_year())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        for (name, extra) in [("modern.p12", vec![]), ("legacy.p12", vec!["-legacy"])] {
            let out = scratch.path(name);
            let mut args = vec![
                "pkcs12",
                "-export",
                "-in",
                &cert,
                "-inkey",
                &key_path,
                "-passout",
                "pass:s3cret",
                "-out",
                &out,
            ];
            args.extend(extra);
            openssl(&args);
            let der = std::fs::read(&out).unwrap();
            let parsed = PushCertificate::from_pkcs12(&der, "s3cret").unwrap();
            assert_eq!(parsed.topic, TOPIC, "{name}");
            assert!(matches!(
                PushCertificate::from_pkcs12(&der, "wrong"),
                Err(IdentityError::BadPushCert(_))
            ));
        }
    }

    /// An RSA key made by openssl, returned as (PKCS#8 PEM, PKCS#1 PEM).
    fn openssl_rsa_key() -> (String, String) {
        let scratch = Scratch::new();
        let pkcs8 = scratch.path("key.pem");
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &pkcs8,
        ]);
        let pkcs1 = openssl(&["rsa", "-in", &pkcs8, "-traditional"]);
        (std::fs::read_to_string(&pkcs8).unwrap(), pkcs1)
    }

    #[test]
    fn reads_topic_and_expiry_from_a_p256_certificate_with_pkcs8_key() {
        let key = RcgenKeyPair::generate().unwrap();
        let not_after = in_a_year();
        let cert = push_cert_pem(&key, topic_uid(), not_after);
        let bundle = format!("{cert}{}", key.serialize_pem());

        let push = PushCertificate::from_pem(bundle.as_bytes()).unwrap();
        assert_eq!(push.topic, TOPIC);
        assert_eq!(push.not_after, not_after.unix_timestamp());
        assert_eq!(push.cert_pem, cert);
        assert!(push.key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(!format!("{push:?}").contains("PRIVATE"));
    }

    #[test]
    fn key_may_come_before_the_certificate() {
        let key = RcgenKeyPair::generate().unwrap();
        let bundle = format!(
            "{}\n{}",
            key.serialize_pem(),
            push_cert_pem(&key, topic_uid(), in_a_year())
        );
        assert_eq!(
            PushCertificate::from_pem(bundle.as_bytes()).unwrap().topic,
            TOPIC
        );
    }

    #[test]
    fn rsa_keys_in_pkcs8_and_pkcs1_form_are_accepted() {
        let (pkcs8, pkcs1) = openssl_rsa_key();
        let key = RcgenKeyPair::from_pem(&pkcs8).unwrap();
        let cert = push_cert_pem(&key, topic_uid(), in_a_year());
        for key_pem in [&pkcs8, &pkcs1] {
            let push = PushCertificate::from_pem(format!("{cert}{key_pem}").as_bytes()).unwrap();
            assert_eq!(push.topic, TOPIC);
        }
        let push = PushCertificate::from_pem(format!("{cert}{pkcs1}").as_bytes()).unwrap();
        assert!(push
            .key_pem
            .starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
    }

    #[test]
    fn sec1_ec_keys_are_accepted() {
        let scratch = Scratch::new();
        let pkcs8 = RcgenKeyPair::generate().unwrap().serialize_pem();
        let pkcs8_path = scratch.write("key.pem", &pkcs8);
        let sec1 = openssl(&["ec", "-in", &pkcs8_path]);
        assert!(sec1.contains("BEGIN EC PRIVATE KEY"));
        let key = RcgenKeyPair::from_pem(&pkcs8).unwrap();
        let bundle = format!("{}{sec1}", push_cert_pem(&key, topic_uid(), in_a_year()));
        assert_eq!(
            PushCertificate::from_pem(bundle.as_bytes()).unwrap().topic,
            TOPIC
        );
    }

    #[test]
    fn a_printable_string_uid_is_read_too() {
        let key = RcgenKeyPair::generate().unwrap();
        let uid = DnValue::PrintableString(TOPIC.try_into().unwrap());
        let bundle = format!(
            "{}{}",
            push_cert_pem(&key, Some(uid), in_a_year()),
            key.serialize_pem()
        );
        assert_eq!(
            PushCertificate::from_pem(bundle.as_bytes()).unwrap().topic,
            TOPIC
        );
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let key = RcgenKeyPair::generate().unwrap();
        let other = RcgenKeyPair::generate().unwrap();
        let bundle = format!(
            "{}{}",
            push_cert_pem(&key, topic_uid(), in_a_year()),
            other.serialize_pem()
        );
        let err = PushCertificate::from_pem(bundle.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "bad_push_cert");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn an_rsa_key_for_an_ec_certificate_is_refused() {
        let (_, pkcs1) = openssl_rsa_key();
        let key = RcgenKeyPair::generate().unwrap();
        let bundle = format!("{}{pkcs1}", push_cert_pem(&key, topic_uid(), in_a_year()));
        let err = PushCertificate::from_pem(bundle.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "bad_push_cert");
    }

    #[test]
    fn certificates_without_an_mdm_topic_are_refused() {
        let key = RcgenKeyPair::generate().unwrap();
        let cases = [
            (None, "no UID"),
            (
                Some(DnValue::Utf8String("com.example.app".into())),
                "not an MDM topic",
            ),
        ];
        for (uid, expected) in cases {
            let bundle = format!(
                "{}{}",
                push_cert_pem(&key, uid, in_a_year()),
                key.serialize_pem()
            );
            let err = PushCertificate::from_pem(bundle.as_bytes()).unwrap_err();
            assert_eq!(err.reason(), "bad_push_cert");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn incomplete_or_unreadable_bundles_are_refused() {
        let key = RcgenKeyPair::generate().unwrap();
        let cert = push_cert_pem(&key, topic_uid(), in_a_year());
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAQI=\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let cases: [(Vec<u8>, &str); 5] = [
            (cert.clone().into_bytes(), "no private key"),
            (key.serialize_pem().into_bytes(), "no CERTIFICATE"),
            (format!("{cert}{encrypted}").into_bytes(), "encrypted"),
            (vec![0xff, 0xfe], "not UTF-8"),
            (b"just text".to_vec(), "no PEM block"),
        ];
        for (bundle, expected) in cases {
            let err = PushCertificate::from_pem(&bundle).unwrap_err();
            assert!(err.to_string().contains(expected), "{expected}: {err}");
        }
    }
}
