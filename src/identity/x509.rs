//! Shared X.509 parsing for the identity module.

use const_oid::db::rfc5912;
use const_oid::ObjectIdentifier;
use der::Decode;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::Certificate;

use super::{ber, IdentityError};

/// Parses a DER certificate, naming the failure precisely for logs. The structure is
/// bounded first ([`ber::ensure_bounded`]): decoding a Name sorts its SETs.
pub(crate) fn parse_certificate(der: &[u8]) -> Result<Certificate, IdentityError> {
    ber::ensure_bounded(der)?;
    Certificate::from_der(der).map_err(|err| IdentityError::bad_der("certificate", err))
}

/// The certificate's notAfter as seconds since the Unix epoch.
pub(crate) fn not_after_unix(certificate: &Certificate) -> u64 {
    certificate
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs()
}

/// The subject public key types Orchard can use, from a SubjectPublicKeyInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    Rsa,
    EcP256,
    EcP384,
}

impl KeyType {
    pub(crate) fn of(spki: &SubjectPublicKeyInfoOwned) -> Result<KeyType, IdentityError> {
        match spki.algorithm.oid {
            rfc5912::RSA_ENCRYPTION => Ok(KeyType::Rsa),
            rfc5912::ID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .ok_or_else(|| IdentityError::BadDer("EC key without a curve".into()))?
                    .decode_as::<ObjectIdentifier>()
                    .map_err(|err| IdentityError::bad_der("EC key curve", err))?;
                match curve {
                    rfc5912::SECP_256_R_1 => Ok(KeyType::EcP256),
                    rfc5912::SECP_384_R_1 => Ok(KeyType::EcP384),
                    other => Err(IdentityError::UnsupportedAlgorithm(format!(
                        "curve {other}"
                    ))),
                }
            }
            other => Err(IdentityError::UnsupportedAlgorithm(format!(
                "key type {other}"
            ))),
        }
    }

    /// The named curve of an EC key type.
    pub(crate) fn curve(self) -> Option<ObjectIdentifier> {
        match self {
            KeyType::Rsa => None,
            KeyType::EcP256 => Some(rfc5912::SECP_256_R_1),
            KeyType::EcP384 => Some(rfc5912::SECP_384_R_1),
        }
    }
}
