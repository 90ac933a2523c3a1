//! The cluster secret's signature on node-to-node requests (pure).
//!
//! A node signs every request it sends to a peer: HMAC-SHA256, keyed by
//! `--cluster-secret`, over the method, the path with its query, the verified device
//! fingerprint it vouches for (if any) and a digest of the body. The receiving node
//! checks it before it reads anything else, so a request without the secret — or one whose
//! path, vouched identity or body was changed on the way — is refused and changes nothing.
//! The secret itself never travels.

use ring::hmac;
use sha2::{Digest, Sha256};

use crate::identity::CertFingerprint;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "orchard-cluster-signature";

/// The header carrying the device identity the sending node verified.
pub const FINGERPRINT_HEADER: &str = "orchard-verified-fingerprint";

/// Signature scheme version, so a later scheme can be told apart.
const SCHEME: &str = "v1=";

/// What a signature covers.
#[derive(Clone, Copy, Debug)]
pub struct Signed<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub fingerprint: Option<&'a CertFingerprint>,
    pub body: &'a [u8],
}

impl Signed<'_> {
    fn message(&self) -> Vec<u8> {
        let fingerprint = self.fingerprint.map(hex::encode).unwrap_or_default();
        let digest = hex::encode(Sha256::digest(self.body));
        format!(
            "{}\n{}\n{}\n{}",
            self.method, self.path_and_query, fingerprint, digest
        )
        .into_bytes()
    }
}

/// The cluster secret as an HMAC key.
#[derive(Clone)]
pub struct ClusterKey(hmac::Key);

impl ClusterKey {
    pub fn new(secret: &str) -> Self {
        ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()))
    }

    /// The value of [`SIGNATURE_HEADER`] for a request.
    pub fn sign(&self, request: Signed<'_>) -> String {
        let tag = hmac::sign(&self.0, &request.message());
        format!("{SCHEME}{}", hex::encode(tag.as_ref()))
    }

    /// Whether `header` is this key's signature of `request` (compared in constant time).
    pub fn verify(&self, request: Signed<'_>, header: &str) -> bool {
        let Some(tag) = header
            .strip_prefix(SCHEME)
            .and_then(|hex_tag| hex::decode(hex_tag).ok())
        else {
            return false;
        };
        hmac::verify(&self.0, &request.message(), &tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(fingerprint: Option<&'a CertFingerprint>, body: &'a [u8]) -> Signed<'a> {
        Signed {
            method: "PUT",
            path_and_query: "/internal/device/mdm",
            fingerprint,
            body,
        }
    }

    #[test]
    fn a_signature_verifies_under_the_same_secret_only() {
        let fingerprint = [7u8; 32];
        let signed = request(Some(&fingerprint), b"<plist/>");
        let header = ClusterKey::new("s3cret").sign(signed);
        assert!(ClusterKey::new("s3cret").verify(signed, &header));
        assert!(!ClusterKey::new("other").verify(signed, &header));
    }

    #[test]
    fn changing_the_vouched_identity_the_path_or_the_body_breaks_the_signature() {
        let key = ClusterKey::new("s3cret");
        let fingerprint = [7u8; 32];
        let header = key.sign(request(Some(&fingerprint), b"<plist/>"));
        let other = [8u8; 32];
        assert!(!key.verify(request(Some(&other), b"<plist/>"), &header));
        assert!(!key.verify(request(None, b"<plist/>"), &header));
        assert!(!key.verify(request(Some(&fingerprint), b"<plist></plist>"), &header));
        let elsewhere = Signed {
            path_and_query: "/internal/device/checkin",
            ..request(Some(&fingerprint), b"<plist/>")
        };
        assert!(!key.verify(elsewhere, &header));
    }

    #[test]
    fn malformed_signatures_are_refused() {
        let key = ClusterKey::new("s3cret");
        let signed = request(None, b"");
        for header in ["", "v1=", "v1=zz", "v2=00", &key.sign(signed)[3..]] {
            assert!(!key.verify(signed, header), "{header:?} was accepted");
        }
    }
}
