//! How the peer is configured and how callers script its answers.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use crate::request::PushRequest;

/// Settings fixed for the lifetime of one [`crate::ApnsPeer`].
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Advertised in the HTTP/2 `SETTINGS` frame. APNs varies this number with load, so a
    /// sender that assumes a value instead of honouring the setting is a bug worth catching.
    pub max_concurrent_streams: u32,
    /// Client (push) certificates the peer trusts, compared byte for byte.
    ///
    /// A TLS client certificate is always required. When this list is empty any presented
    /// certificate is trusted. A presented but untrusted certificate still completes the TLS
    /// handshake and every request on that connection is then answered
    /// `403 {"reason":"BadCertificate"}`, so the sender experiences the APNs-level rejection
    /// it must react to (stop pushing for that topic) rather than an opaque TLS failure.
    pub trusted_client_certs: Vec<CertificateDer<'static>>,
    /// After this many streams on one connection the peer starts a graceful `GOAWAY`:
    /// streams already in flight are answered, then the connection closes. Exercises the
    /// sender's drain-and-reconnect path.
    pub goaway_after_streams: Option<u64>,
    /// Decides the answer to every request that passed validation.
    pub behavior: Behavior,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1000,
            trusted_client_certs: Vec::new(),
            goaway_after_streams: None,
            behavior: Behavior::accept_all(),
        }
    }
}

/// Scripted answer policy, consulted once per valid request.
///
/// Shared behind an `Arc` so it can be swapped at runtime with
/// [`crate::ApnsPeer::set_behavior`] while streams that already picked the old policy finish
/// with it.
#[derive(Clone)]
pub struct Behavior(Arc<dyn Fn(&PushRequest) -> Outcome + Send + Sync>);

impl Behavior {
    /// Answers every valid request `200`, like a healthy APNs.
    pub fn accept_all() -> Self {
        Self::from_fn(|_| Outcome::Accept)
    }

    /// Answers with whatever `decide` returns for each request.
    pub fn from_fn(decide: impl Fn(&PushRequest) -> Outcome + Send + Sync + 'static) -> Self {
        Self(Arc::new(decide))
    }

    /// The outcome this policy chooses for `request`.
    pub fn decide(&self, request: &PushRequest) -> Outcome {
        (self.0)(request)
    }
}

impl Default for Behavior {
    fn default() -> Self {
        Self::accept_all()
    }
}

impl fmt::Debug for Behavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Behavior(..)")
    }
}

/// What the peer answers to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `200` with an `apns-id` header and an empty body.
    Accept,
    /// An APNs error: `status` with the JSON body `{"reason": reason}`, plus `"timestamp"`
    /// (milliseconds since the epoch) when given, as APNs does for `410 Unregistered`.
    Reject {
        /// HTTP status code; an invalid code is answered as `500 InternalServerError`.
        status: u16,
        /// APNs reason string, e.g. `Unregistered` or `TooManyRequests`.
        reason: String,
        /// Milliseconds since the epoch at which APNs last knew the token was valid.
        timestamp_ms: Option<u64>,
    },
    /// Waits before answering with the inner outcome; other streams keep being served.
    Delay(Duration, Box<Outcome>),
}

impl Outcome {
    /// A rejection without a timestamp, e.g. `Outcome::reject(429, "TooManyRequests")`.
    pub fn reject(status: u16, reason: impl Into<String>) -> Self {
        Self::Reject {
            status,
            reason: reason.into(),
            timestamp_ms: None,
        }
    }

    /// `410 Unregistered` stamped with the moment the token stopped being valid, which the
    /// sender compares against its last `TokenUpdate`.
    pub fn unregistered(timestamp_ms: u64) -> Self {
        Self::Reject {
            status: 410,
            reason: "Unregistered".to_owned(),
            timestamp_ms: Some(timestamp_ms),
        }
    }

    /// Wraps `self` so it is answered after `delay`.
    pub fn after(self, delay: Duration) -> Self {
        Self::Delay(delay, Box::new(self))
    }
}
