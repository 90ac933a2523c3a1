//! Everything Orchard knows about certificates: its own device identity CA, the ways a
//! device's identity certificate reaches the server (proxy header, `Mdm-Signature`), chain
//! verification with a verdict cache, and the APNs push certificate.
//!
//! All of it is synchronous and free of HTTP concerns, so request handlers can call it
//! directly and tests can exercise it without a server.

mod ber;
pub mod ca;
mod cache;
mod error;
pub mod header;
mod pem;
mod pkcs12_limits;
pub mod pushcert;
pub mod signature;
pub mod verify;
mod x509;

#[cfg(test)]
mod test_support;

pub use ca::{pkcs12, CertificateAuthority, IssuedIdentity};
pub use error::IdentityError;
pub use header::parse_client_cert_header;
pub use pushcert::PushCertificate;
pub use signature::{sign_mdm_signature, verify_mdm_signature};
pub use verify::{fingerprint, IdentityVerifier};

/// SHA-256 of a certificate's DER encoding: the key that binds a device identity to an
/// enrollment and the key of the verification cache.
pub type CertFingerprint = [u8; 32];
