//! `Mdm-Signature`: a detached CMS SignedData over the exact request body, made with the
//! device identity key (protocol.md §2.5). It is how a device proves its identity when a
//! proxy terminates TLS and does not forward the client certificate.

use std::borrow::Cow;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedAttributes, SignedData, SignerIdentifier,
    SignerInfo, SignerInfos,
};
use const_oid::db::{rfc5911, rfc5912};
use const_oid::ObjectIdentifier;
use der::asn1::{OctetString, SetOfVec, UintRef};
use der::{Any, Decode, Encode, Reader, SliceReader};
use ring::rand::SystemRandom;
use ring::signature::{self as ring_signature, EcdsaKeyPair, UnparsedPublicKey};
use ring::{digest, signature::VerificationAlgorithm};
use rustls_pki_types::CertificateDer;
use x509_cert::attr::Attribute;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;

use super::x509::{parse_certificate, KeyType};
use super::{ber, IdentityError};

/// Standard alphabet, padding optional: header values are sometimes re-wrapped or trimmed.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The longest `Mdm-Signature` accepted. A device's signature carries its identity
/// certificate (and at most a short chain): a few KB. Decoding cost grows with the size,
/// and the header arrives before the device is authenticated.
const MAX_SIGNATURE_HEADER_BYTES: usize = 48 * 1024;

/// Smallest RSA modulus accepted, matching *ring*'s verification algorithms.
const MIN_RSA_BITS: usize = 2048;

/// Verifies an `Mdm-Signature` header against the exact request body and returns the
/// signer's certificate. The caller still has to check that certificate's chain.
pub fn verify_mdm_signature(
    header_value: &str,
    body: &[u8],
) -> Result<CertificateDer<'static>, IdentityError> {
    let signed_data = decode_signed_data(header_value)?;
    if signed_data.encap_content_info.econtent.is_some() {
        return Err(IdentityError::BadSignature(
            "Mdm-Signature must be detached but carries its own content".into(),
        ));
    }
    let signer = single_signer(&signed_data)?;
    let certificate = signer_certificate(&signed_data, &signer.sid)?;
    let digest = DigestAlgorithm::from_oid(&signer.digest_alg.oid)?;
    let algorithm = verification_algorithm(
        &signer.signature_algorithm.oid,
        digest,
        &certificate.tbs_certificate.subject_public_key_info,
    )?;
    let signed_message = signed_message(
        signer,
        &signed_data.encap_content_info.econtent_type,
        digest,
        body,
    )?;
    let public_key = certificate
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    UnparsedPublicKey::new(algorithm, public_key)
        .verify(&signed_message, signer.signature.as_bytes())
        .map_err(|_| {
            IdentityError::BadSignature(
                "signature does not match the request body and the signer certificate".into(),
            )
        })?;
    certificate
        .to_der()
        .map(CertificateDer::from)
        .map_err(|err| IdentityError::bad_der("signer certificate", err))
}

/// The bytes the signature covers: the body itself, or — with signed attributes, once
/// their messageDigest is checked against the body — the attributes' DER encoding as a
/// SET OF, not the [0] IMPLICIT form they are transmitted in (RFC 5652 §5.4).
fn signed_message<'a>(
    signer: &SignerInfo,
    content_type: &ObjectIdentifier,
    digest: DigestAlgorithm,
    body: &'a [u8],
) -> Result<Cow<'a, [u8]>, IdentityError> {
    let Some(attributes) = &signer.signed_attrs else {
        return Ok(Cow::Borrowed(body));
    };
    check_signed_attributes(attributes, content_type, digest, body)?;
    attributes
        .to_der()
        .map(Cow::Owned)
        .map_err(|err| IdentityError::bad_der("signed attributes", err))
}

/// Produces the `Mdm-Signature` value a device would send for `body`: detached SignedData,
/// SHA-256 with ECDSA P-256, signed attributes contentType + messageDigest, signer
/// certificate included, identified by issuer and serial number.
pub fn sign_mdm_signature(
    cert_der: &[u8],
    key_pkcs8_der: &[u8],
    body: &[u8],
) -> Result<String, IdentityError> {
    let certificate = parse_certificate(cert_der)?;
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(
        &ring_signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key_pkcs8_der,
        &rng,
    )
    .map_err(|err| {
        IdentityError::UnsupportedAlgorithm(format!("signing key is not a P-256 PKCS#8 key: {err}"))
    })?;
    let attributes = signed_attributes(digest::digest(&digest::SHA256, body).as_ref())
        .map_err(encoding_error)?;
    let signature = key
        .sign(&rng, &attributes.to_der().map_err(encoding_error)?)
        .map_err(|_| IdentityError::Generation("ECDSA signing failed".into()))?;
    let sha256 = AlgorithmIdentifierOwned {
        oid: rfc5912::ID_SHA_256,
        parameters: None,
    };
    let signer = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: certificate.tbs_certificate.issuer.clone(),
            serial_number: certificate.tbs_certificate.serial_number.clone(),
        }),
        digest_alg: sha256.clone(),
        signed_attrs: Some(attributes),
        signature_algorithm: AlgorithmIdentifierOwned {
            oid: rfc5912::ECDSA_WITH_SHA_256,
            parameters: None,
        },
        signature: OctetString::new(signature.as_ref()).map_err(encoding_error)?,
        unsigned_attrs: None,
    };
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![sha256]).map_err(encoding_error)?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: rfc5911::ID_DATA,
            econtent: None,
        },
        certificates: Some(
            CertificateSet::try_from(vec![CertificateChoices::Certificate(certificate)])
                .map_err(encoding_error)?,
        ),
        crls: None,
        signer_infos: SignerInfos::try_from(vec![signer]).map_err(encoding_error)?,
    };
    let content_info = ContentInfo {
        content_type: rfc5911::ID_SIGNED_DATA,
        content: Any::encode_from(&signed_data).map_err(encoding_error)?,
    };
    Ok(STANDARD.encode(content_info.to_der().map_err(encoding_error)?))
}

fn encoding_error(err: der::Error) -> IdentityError {
    IdentityError::Generation(format!("CMS encoding: {err}"))
}

fn signed_attributes(message_digest: &[u8]) -> der::Result<SignedAttributes> {
    let attribute = |oid, value: Any| -> der::Result<Attribute> {
        Ok(Attribute {
            oid,
            values: SetOfVec::try_from(vec![value])?,
        })
    };
    SetOfVec::try_from(vec![
        attribute(
            rfc5911::ID_CONTENT_TYPE,
            Any::encode_from(&rfc5911::ID_DATA)?,
        )?,
        attribute(
            rfc5911::ID_MESSAGE_DIGEST,
            Any::encode_from(&OctetString::new(message_digest)?)?,
        )?,
    ])
}

fn decode_signed_data(header_value: &str) -> Result<SignedData, IdentityError> {
    if header_value.len() > MAX_SIGNATURE_HEADER_BYTES {
        return Err(IdentityError::TooLarge {
            what: "Mdm-Signature",
            limit: MAX_SIGNATURE_HEADER_BYTES,
        });
    }
    let compact: String = header_value
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if compact.is_empty() {
        return Err(IdentityError::MissingCertificate(
            "empty Mdm-Signature header",
        ));
    }
    let ber = LENIENT_BASE64
        .decode(compact)
        .map_err(|err| IdentityError::BadBase64(format!("Mdm-Signature: {err}")))?;
    let der = ber::normalize(&ber)?;
    let content_info = ContentInfo::from_der(&der)
        .map_err(|err| IdentityError::bad_der("CMS ContentInfo", err))?;
    if content_info.content_type != rfc5911::ID_SIGNED_DATA {
        return Err(IdentityError::BadDer(format!(
            "CMS content type {} is not SignedData",
            content_info.content_type
        )));
    }
    content_info
        .content
        .decode_as::<SignedData>()
        .map_err(|err| IdentityError::bad_der("CMS SignedData", err))
}

/// A device signs with exactly one key; more signers would make "the device identity"
/// ambiguous.
fn single_signer(signed_data: &SignedData) -> Result<&SignerInfo, IdentityError> {
    let signers = signed_data.signer_infos.0.as_slice();
    match signers {
        [signer] => Ok(signer),
        _ => Err(IdentityError::BadSignature(format!(
            "expected exactly one signer, found {}",
            signers.len()
        ))),
    }
}

fn signer_certificate(
    signed_data: &SignedData,
    signer: &SignerIdentifier,
) -> Result<Certificate, IdentityError> {
    signed_data
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .filter_map(|choice| match choice {
            CertificateChoices::Certificate(certificate) => Some(certificate),
            CertificateChoices::Other(_) => None,
        })
        .find(|certificate| identifies(signer, certificate))
        .cloned()
        .ok_or(IdentityError::MissingCertificate(
            "Mdm-Signature does not include the signer certificate",
        ))
}

fn identifies(signer: &SignerIdentifier, certificate: &Certificate) -> bool {
    let tbs = &certificate.tbs_certificate;
    match signer {
        SignerIdentifier::IssuerAndSerialNumber(id) => {
            tbs.issuer == id.issuer && tbs.serial_number == id.serial_number
        }
        SignerIdentifier::SubjectKeyIdentifier(wanted) => tbs
            .extensions
            .iter()
            .flatten()
            .filter(|ext| ext.extn_id == rfc5912::ID_CE_SUBJECT_KEY_IDENTIFIER)
            .any(|ext| {
                SubjectKeyIdentifier::from_der(ext.extn_value.as_bytes()).as_ref() == Ok(wanted)
            }),
    }
}

/// With signed attributes the body is bound through messageDigest; contentType, when
/// present, must name the (detached) content's type.
fn check_signed_attributes(
    attributes: &SignedAttributes,
    content_type: &ObjectIdentifier,
    digest: DigestAlgorithm,
    body: &[u8],
) -> Result<(), IdentityError> {
    let single_value = |oid: ObjectIdentifier| {
        attributes
            .iter()
            .find(|attribute| attribute.oid == oid)
            .map(|attribute| match attribute.values.as_slice() {
                [value] => Ok(value),
                _ => Err(IdentityError::BadSignature(format!(
                    "signed attribute {oid} must have exactly one value"
                ))),
            })
            .transpose()
    };
    if let Some(value) = single_value(rfc5911::ID_CONTENT_TYPE)? {
        let signed_type = value
            .decode_as::<ObjectIdentifier>()
            .map_err(|err| IdentityError::bad_der("contentType attribute", err))?;
        if &signed_type != content_type {
            return Err(IdentityError::BadSignature(format!(
                "signed contentType {signed_type} differs from the content type {content_type}"
            )));
        }
    }
    let message_digest = single_value(rfc5911::ID_MESSAGE_DIGEST)?
        .ok_or_else(|| IdentityError::BadSignature("signed attributes lack messageDigest".into()))?
        .decode_as::<OctetString>()
        .map_err(|err| IdentityError::bad_der("messageDigest attribute", err))?;
    if message_digest.as_bytes() != digest::digest(digest.ring(), body).as_ref() {
        return Err(IdentityError::BadSignature(
            "messageDigest does not match the request body".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DigestAlgorithm {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl DigestAlgorithm {
    fn from_oid(oid: &ObjectIdentifier) -> Result<Self, IdentityError> {
        match *oid {
            rfc5912::ID_SHA_1 => Ok(Self::Sha1),
            rfc5912::ID_SHA_256 => Ok(Self::Sha256),
            rfc5912::ID_SHA_384 => Ok(Self::Sha384),
            rfc5912::ID_SHA_512 => Ok(Self::Sha512),
            _ => Err(IdentityError::UnsupportedAlgorithm(format!("digest {oid}"))),
        }
    }

    fn ring(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Self::Sha256 => &digest::SHA256,
            Self::Sha384 => &digest::SHA384,
            Self::Sha512 => &digest::SHA512,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignatureFamily {
    Rsa,
    Ecdsa,
}

/// Resolves the *ring* verification algorithm from the signature algorithm (which may or
/// may not name the hash itself), the digest algorithm and the signer's key.
fn verification_algorithm(
    signature_oid: &ObjectIdentifier,
    digest: DigestAlgorithm,
    key: &SubjectPublicKeyInfoOwned,
) -> Result<&'static dyn VerificationAlgorithm, IdentityError> {
    use DigestAlgorithm::{Sha1, Sha256, Sha384, Sha512};
    use SignatureFamily::{Ecdsa, Rsa};
    let (family, hash) = match *signature_oid {
        rfc5912::RSA_ENCRYPTION => (Rsa, digest),
        rfc5912::SHA_1_WITH_RSA_ENCRYPTION => (Rsa, Sha1),
        rfc5912::SHA_256_WITH_RSA_ENCRYPTION => (Rsa, Sha256),
        rfc5912::SHA_384_WITH_RSA_ENCRYPTION => (Rsa, Sha384),
        rfc5912::SHA_512_WITH_RSA_ENCRYPTION => (Rsa, Sha512),
        rfc5912::ID_EC_PUBLIC_KEY => (Ecdsa, digest),
        rfc5912::ECDSA_WITH_SHA_256 => (Ecdsa, Sha256),
        rfc5912::ECDSA_WITH_SHA_384 => (Ecdsa, Sha384),
        _ => {
            return Err(IdentityError::UnsupportedAlgorithm(format!(
                "signature {signature_oid}"
            )))
        }
    };
    let key_type = KeyType::of(key)?;
    if key_type == KeyType::Rsa {
        ensure_rsa_key_size(key)?;
    }
    let algorithm: &'static dyn VerificationAlgorithm = match (family, key_type, hash) {
        (Rsa, KeyType::Rsa, Sha1) => &ring_signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        (Rsa, KeyType::Rsa, Sha256) => &ring_signature::RSA_PKCS1_2048_8192_SHA256,
        (Rsa, KeyType::Rsa, Sha384) => &ring_signature::RSA_PKCS1_2048_8192_SHA384,
        (Rsa, KeyType::Rsa, Sha512) => &ring_signature::RSA_PKCS1_2048_8192_SHA512,
        (Ecdsa, KeyType::EcP256, Sha256) => &ring_signature::ECDSA_P256_SHA256_ASN1,
        (Ecdsa, KeyType::EcP256, Sha384) => &ring_signature::ECDSA_P256_SHA384_ASN1,
        (Ecdsa, KeyType::EcP384, Sha256) => &ring_signature::ECDSA_P384_SHA256_ASN1,
        (Ecdsa, KeyType::EcP384, Sha384) => &ring_signature::ECDSA_P384_SHA384_ASN1,
        (Rsa, KeyType::EcP256 | KeyType::EcP384, _) | (Ecdsa, KeyType::Rsa, _) => {
            return Err(IdentityError::BadSignature(format!(
                "signature algorithm {signature_oid} does not fit the signer's {key_type:?} key"
            )))
        }
        (family, key_type, hash) => {
            return Err(IdentityError::UnsupportedAlgorithm(format!(
                "{family:?} signature with {hash:?} on a {key_type:?} key"
            )))
        }
    };
    Ok(algorithm)
}

/// Reports an undersized RSA key as such instead of as an opaque signature failure.
fn ensure_rsa_key_size(key: &SubjectPublicKeyInfoOwned) -> Result<(), IdentityError> {
    let bits = rsa_modulus_bits(key.subject_public_key.raw_bytes())?;
    if bits < MIN_RSA_BITS {
        return Err(IdentityError::UnsupportedAlgorithm(format!(
            "{bits}-bit RSA key; at least {MIN_RSA_BITS} bits are required"
        )));
    }
    Ok(())
}

/// Size of an RSAPublicKey's modulus in bits.
fn rsa_modulus_bits(public_key: &[u8]) -> Result<usize, IdentityError> {
    let mut reader =
        SliceReader::new(public_key).map_err(|err| IdentityError::bad_der("RSA key", err))?;
    reader
        .sequence(|fields| {
            let modulus = UintRef::decode(fields)?;
            UintRef::decode(fields)?;
            let bytes = modulus.as_bytes();
            let leading_zero_bits = bytes.first().map_or(0, |byte| byte.leading_zeros());
            Ok(bytes.len() * 8 - leading_zero_bits as usize)
        })
        .map_err(|err| IdentityError::bad_der("RSA key", err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{CertificateAuthority, IssuedIdentity};
    use crate::identity::pem;
    use crate::identity::test_support::{
        descending_set, element, openssl, with_indefinite_lengths, Scratch,
    };

    const BODY: &[u8] = b"<?xml version=\"1.0\"?><plist><dict><key>Status</key>\
                          <string>Idle</string></dict></plist>";

    struct Fixture {
        scratch: Scratch,
        ca: CertificateAuthority,
        identity: IssuedIdentity,
    }

    impl Fixture {
        fn new() -> Self {
            let scratch = Scratch::new();
            let ca = CertificateAuthority::load_or_create(&scratch.dir().join("ca")).unwrap();
            let identity = ca.issue_identity("device1").unwrap();
            scratch.write("cert.pem", pem::encode("CERTIFICATE", &identity.cert_der));
            scratch.write(
                "key.pem",
                pem::encode("PRIVATE KEY", &identity.key_pkcs8_der),
            );
            scratch.write("body", BODY);
            Fixture {
                scratch,
                ca,
                identity,
            }
        }

        /// Signs BODY with `openssl cms` (detached by default) and returns the header value.
        fn openssl_signature(&self, cert: &str, key: &str, extra: &[&str]) -> String {
            let out = self.scratch.path("sig.der");
            let mut args = vec![
                "cms", "-sign", "-binary", "-outform", "DER", "-signer", cert, "-inkey", key, "-in",
            ];
            let body = self.scratch.path("body");
            args.extend([body.as_str(), "-out", out.as_str()]);
            args.extend(extra);
            openssl(&args);
            STANDARD.encode(self.scratch.read("sig.der"))
        }

        fn own_openssl_signature(&self, extra: &[&str]) -> String {
            let cert = self.scratch.path("cert.pem");
            let key = self.scratch.path("key.pem");
            self.openssl_signature(&cert, &key, extra)
        }

        /// An RSA or P-384 identity made by openssl, self-signed.
        fn openssl_identity(&self, name: &str, newkey: &[&str]) -> (String, String) {
            let cert = self.scratch.path(&format!("{name}.pem"));
            let key = self.scratch.path(&format!("{name}.key"));
            let mut args = vec![
                "req",
                "-x509",
                "-nodes",
                "-subj",
                "/CN=openssl-device",
                "-days",
                "1",
            ];
            args.extend(newkey);
            args.extend(["-keyout", key.as_str(), "-out", cert.as_str()]);
            openssl(&args);
            (cert, key)
        }
    }

    fn der_of_pem_file(path: &str) -> Vec<u8> {
        let text = std::fs::read_to_string(path).unwrap();
        pem::decode_blocks(&text).unwrap().remove(0).der
    }

    #[test]
    fn orchard_signature_verifies_and_names_the_signer() {
        let fx = Fixture::new();
        let header =
            sign_mdm_signature(&fx.identity.cert_der, &fx.identity.key_pkcs8_der, BODY).unwrap();
        let signer = verify_mdm_signature(&header, BODY).unwrap();
        assert_eq!(signer.as_ref(), fx.identity.cert_der.as_slice());
    }

    #[test]
    fn orchard_signature_is_accepted_by_openssl() {
        let fx = Fixture::new();
        let header =
            sign_mdm_signature(&fx.identity.cert_der, &fx.identity.key_pkcs8_der, BODY).unwrap();
        let sig = fx
            .scratch
            .write("orchard.sig", STANDARD.decode(header).unwrap());
        let ca = fx.scratch.write("ca.pem", fx.ca.ca_cert_pem());
        let body = fx.scratch.path("body");
        openssl(&[
            "cms",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            &sig,
            "-content",
            &body,
            "-CAfile",
            &ca,
            "-purpose",
            "any",
            "-out",
            "/dev/null",
        ]);
    }

    #[test]
    fn tampered_body_fails() {
        let fx = Fixture::new();
        let header =
            sign_mdm_signature(&fx.identity.cert_der, &fx.identity.key_pkcs8_der, BODY).unwrap();
        let mut tampered = BODY.to_vec();
        tampered.push(b'\n');
        let err = verify_mdm_signature(&header, &tampered).unwrap_err();
        assert_eq!(err.reason(), "bad_signature");
        assert!(err.to_string().contains("messageDigest"), "{err}");
    }

    #[test]
    fn signature_by_one_key_with_another_certificate_fails() {
        let fx = Fixture::new();
        let other = fx.ca.issue_identity("device2").unwrap();
        let header = sign_mdm_signature(&other.cert_der, &fx.identity.key_pkcs8_der, BODY).unwrap();
        assert_eq!(
            verify_mdm_signature(&header, BODY).unwrap_err().reason(),
            "bad_signature"
        );
    }

    #[test]
    fn openssl_detached_signature_with_signed_attributes_verifies() {
        let fx = Fixture::new();
        let header = fx.own_openssl_signature(&[]);
        let signer = verify_mdm_signature(&header, BODY).unwrap();
        assert_eq!(signer.as_ref(), fx.identity.cert_der.as_slice());
        assert_eq!(
            verify_mdm_signature(&header, b"other")
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
    }

    #[test]
    fn openssl_signature_without_signed_attributes_verifies() {
        let fx = Fixture::new();
        let header = fx.own_openssl_signature(&["-noattr"]);
        verify_mdm_signature(&header, BODY).unwrap();
        let err = verify_mdm_signature(&header, b"other").unwrap_err();
        assert_eq!(err.reason(), "bad_signature");
    }

    #[test]
    fn signer_identified_by_subject_key_identifier_is_found() {
        let fx = Fixture::new();
        let header = fx.own_openssl_signature(&["-keyid"]);
        let signer = verify_mdm_signature(&header, BODY).unwrap();
        assert_eq!(signer.as_ref(), fx.identity.cert_der.as_slice());
    }

    #[test]
    fn ber_with_indefinite_lengths_verifies() {
        let fx = Fixture::new();
        for header in [
            sign_mdm_signature(&fx.identity.cert_der, &fx.identity.key_pkcs8_der, BODY).unwrap(),
            fx.own_openssl_signature(&[]),
        ] {
            let ber = with_indefinite_lengths(&STANDARD.decode(&header).unwrap());
            assert_eq!(&ber[..2], [0x30, 0x80]);
            let signer = verify_mdm_signature(&STANDARD.encode(ber), BODY).unwrap();
            assert_eq!(signer.as_ref(), fx.identity.cert_der.as_slice());
        }
    }

    #[test]
    fn a_streamed_signature_with_attached_content_is_parsed_and_refused() {
        let fx = Fixture::new();
        // openssl -stream writes BER with indefinite lengths and segmented content.
        let header = fx.own_openssl_signature(&["-stream"]);
        assert_eq!(&STANDARD.decode(&header).unwrap()[..2], [0x30, 0x80]);
        let err = verify_mdm_signature(&header, BODY).unwrap_err();
        assert!(err.to_string().contains("detached"), "{err}");
    }

    #[test]
    fn rsa_signatures_with_every_supported_digest_verify() {
        let fx = Fixture::new();
        let (cert, key) = fx.openssl_identity("rsa", &["-newkey", "rsa:2048"]);
        for digest in ["sha1", "sha256", "sha384", "sha512"] {
            for attributes in [&[][..], &["-noattr"]] {
                let mut extra = vec!["-md", digest];
                extra.extend(attributes);
                let header = fx.openssl_signature(&cert, &key, &extra);
                let signer = verify_mdm_signature(&header, BODY)
                    .unwrap_or_else(|err| panic!("{digest} {attributes:?}: {err}"));
                assert_eq!(signer.as_ref(), der_of_pem_file(&cert));
                assert!(verify_mdm_signature(&header, b"x").is_err());
            }
        }
    }

    #[test]
    fn p384_signatures_verify() {
        let fx = Fixture::new();
        let (cert, key) = fx.openssl_identity(
            "p384",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        );
        for digest in ["sha256", "sha384"] {
            let header = fx.openssl_signature(&cert, &key, &["-md", digest]);
            verify_mdm_signature(&header, BODY).unwrap_or_else(|err| panic!("{digest}: {err}"));
        }
    }

    #[test]
    fn undersized_rsa_keys_are_reported_as_unsupported() {
        let fx = Fixture::new();
        let (cert, key) = fx.openssl_identity("rsa1024", &["-newkey", "rsa:1024"]);
        let header = fx.openssl_signature(&cert, &key, &[]);
        let err = verify_mdm_signature(&header, BODY).unwrap_err();
        assert_eq!(err.reason(), "unsupported_algorithm");
        assert!(err.to_string().contains("1024-bit RSA key"), "{err}");
    }

    #[test]
    fn line_wrapped_and_unpadded_base64_is_accepted() {
        let fx = Fixture::new();
        let header = fx.own_openssl_signature(&[]);
        let wrapped: String = header
            .trim_end_matches('=')
            .as_bytes()
            .chunks(64)
            .map(|chunk| format!("{}\r\n ", String::from_utf8_lossy(chunk)))
            .collect();
        verify_mdm_signature(&wrapped, BODY).unwrap();
    }

    #[test]
    fn a_signature_without_the_signer_certificate_is_missing_certificate() {
        let fx = Fixture::new();
        let header = fx.own_openssl_signature(&["-nocerts"]);
        let err = verify_mdm_signature(&header, BODY).unwrap_err();
        assert_eq!(err.reason(), "missing_certificate");
    }

    #[test]
    fn an_attached_signature_is_refused() {
        let fx = Fixture::new();
        let header = fx.own_openssl_signature(&["-nodetach"]);
        let err = verify_mdm_signature(&header, BODY).unwrap_err();
        assert!(err.to_string().contains("detached"), "{err}");
    }

    #[test]
    fn malformed_headers_get_precise_reasons() {
        let cases = [
            ("", "missing_certificate"),
            ("not base64!", "bad_base64"),
            ("aGVsbG8=", "bad_der"),
            // A ContentInfo of type id-data: well formed, but not SignedData.
            ("MBQGCSqGSIb3DQEHAaAHBAVoZWxsbw==", "bad_der"),
        ];
        for (header, reason) in cases {
            let err = verify_mdm_signature(header, BODY).unwrap_err();
            assert_eq!(err.reason(), reason, "{header:?}: {err}");
        }
    }

    /// SignedData whose digestAlgorithms SET holds `count` AlgorithmIdentifiers in
    /// descending order. 2,000 of them (28 KB) took 13 s to decode (fuzzing, `fuzz/`).
    fn signed_data_with_digest_algorithms(count: usize) -> String {
        let signed_data = [
            element(0x02, &[1]),
            descending_set(count),
            element(0x30, &rfc5911::ID_DATA.to_der().unwrap()),
            element(0x31, &[]),
        ]
        .concat();
        let content_info = [
            rfc5911::ID_SIGNED_DATA.to_der().unwrap(),
            element(0xa0, &element(0x30, &signed_data)),
        ]
        .concat();
        STANDARD.encode(element(0x30, &content_info))
    }

    #[test]
    fn a_set_too_large_to_sort_is_refused_before_decoding() {
        let header = signed_data_with_digest_algorithms(2000);
        assert!(header.len() < MAX_SIGNATURE_HEADER_BYTES);
        let started = std::time::Instant::now();
        let err = verify_mdm_signature(&header, BODY).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid DER: BER: more than 64 elements in one constructed element"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn sets_of_up_to_sixty_four_elements_are_decoded() {
        let header = signed_data_with_digest_algorithms(64);
        let err = verify_mdm_signature(&header, BODY).unwrap_err();
        assert_eq!(
            err.to_string(),
            "signature does not verify: expected exactly one signer, found 0"
        );
    }

    #[test]
    fn an_oversized_header_is_refused_unread() {
        let header = "A".repeat(MAX_SIGNATURE_HEADER_BYTES + 1);
        let err = verify_mdm_signature(&header, BODY).unwrap_err();
        assert_eq!(err.reason(), "too_large");
        assert_eq!(err.to_string(), "Mdm-Signature is larger than 49152 bytes");
    }

    #[test]
    fn signing_with_a_non_p256_key_is_refused() {
        let fx = Fixture::new();
        let err = sign_mdm_signature(&fx.identity.cert_der, b"not a key", BODY).unwrap_err();
        assert_eq!(err.reason(), "unsupported_algorithm");
    }
}
