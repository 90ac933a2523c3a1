//! APNs wake-ups behind one interface, so that the HTTP and device layers do not care
//! how a push reaches Apple. `apns` is the HTTP/2 engine; this module holds the pure
//! vocabulary: targets, outcomes, and what an APNs answer means (protocol.md §4.3).

pub mod apns;

use async_trait::async_trait;

/// Everything needed to wake one channel (from its latest TokenUpdate).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushTarget {
    pub enrollment_id: String,
    pub topic: String,
    /// Raw device token; APNs takes it lowercase-hex in the request path.
    pub token: Vec<u8>,
    pub push_magic: String,
}

/// What happened to one push.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PushOutcome {
    /// APNs accepted it; delivery is best effort from here.
    Sent { apns_id: String },
    /// APNs says the token is dead (410, BadDeviceToken, DeviceTokenNotForTopic): stop
    /// pushing it until the device's next TokenUpdate.
    TokenInvalid { reason: String },
    /// Not sent: a wake-up for this device is already pending (sent moments ago, the
    /// device has not connected since).
    AlreadyPending,
    /// Deliberately not sent (the device cannot be pushed, or is being backed off).
    NotSent { reason: String },
    /// Refused or undeliverable.
    Failed { reason: String },
}

impl PushOutcome {
    /// NanoHUB's per-id result shape: `push_result` on success, `push_error` otherwise.
    pub fn to_nanohub_json(&self) -> serde_json::Value {
        match self {
            PushOutcome::Sent { apns_id } => serde_json::json!({ "push_result": apns_id }),
            PushOutcome::AlreadyPending => serde_json::json!({ "push_result": "pending" }),
            PushOutcome::TokenInvalid { reason }
            | PushOutcome::NotSent { reason }
            | PushOutcome::Failed { reason } => serde_json::json!({ "push_error": reason }),
        }
    }

    pub fn is_sent(&self) -> bool {
        matches!(self, PushOutcome::Sent { .. })
    }
}

/// Whether a topic's certificate is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicStatus {
    /// Connections are (or can be) open.
    Active,
    /// APNs rejected the certificate; nothing is sent until a new one is uploaded.
    Stopped { reason: String },
    /// Nothing pushed to this topic yet.
    Idle,
}

#[async_trait]
pub trait Push: Send + Sync + 'static {
    /// Push every target; the outcomes are in the same order as the targets.
    async fn push(&self, targets: &[PushTarget]) -> Vec<PushOutcome>;

    /// A new certificate was uploaded for `topic`: reconnect with it, lift any stop.
    fn certificate_changed(&self, topic: &str);

    fn topic_status(&self, topic: &str) -> TopicStatus;
}

/// What an APNs answer asks of the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApnsVerdict {
    Delivered,
    /// Mark the token invalid; never retry.
    TokenInvalid,
    /// Stop the topic, alert the operator, keep queues intact.
    CertificateRejected,
    /// Back off this device.
    Throttled,
    /// Retry later, bounded.
    Retry,
    /// Record and drop.
    Drop,
}

/// Classify an APNs status and `reason` (protocol.md §4.3).
pub fn classify(status: u16, reason: &str) -> ApnsVerdict {
    match (status, reason) {
        (200, _) => ApnsVerdict::Delivered,
        (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => ApnsVerdict::TokenInvalid,
        (403, "BadCertificate" | "BadCertificateEnvironment" | "Forbidden") => {
            ApnsVerdict::CertificateRejected
        }
        (429, _) => ApnsVerdict::Throttled,
        (500 | 502 | 503 | 504, _) | (400, "IdleTimeout") => ApnsVerdict::Retry,
        _ => ApnsVerdict::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_answers_map_to_what_the_sender_must_do() {
        assert_eq!(classify(200, ""), ApnsVerdict::Delivered);
        assert_eq!(classify(410, "Unregistered"), ApnsVerdict::TokenInvalid);
        assert_eq!(classify(410, "ExpiredToken"), ApnsVerdict::TokenInvalid);
        assert_eq!(classify(400, "BadDeviceToken"), ApnsVerdict::TokenInvalid);
        assert_eq!(
            classify(400, "DeviceTokenNotForTopic"),
            ApnsVerdict::TokenInvalid
        );
        assert_eq!(
            classify(403, "BadCertificate"),
            ApnsVerdict::CertificateRejected
        );
        assert_eq!(
            classify(403, "BadCertificateEnvironment"),
            ApnsVerdict::CertificateRejected
        );
        assert_eq!(classify(429, "TooManyRequests"), ApnsVerdict::Throttled);
        assert_eq!(classify(500, "InternalServerError"), ApnsVerdict::Retry);
        assert_eq!(classify(503, "ServiceUnavailable"), ApnsVerdict::Retry);
        assert_eq!(classify(413, "PayloadTooLarge"), ApnsVerdict::Drop);
        assert_eq!(classify(400, "BadTopic"), ApnsVerdict::Drop);
        assert_eq!(classify(405, "MethodNotAllowed"), ApnsVerdict::Drop);
    }

    #[test]
    fn only_a_delivered_push_counts_as_sent() {
        assert!(PushOutcome::Sent {
            apns_id: "x".into()
        }
        .is_sent());
        let dead = PushOutcome::TokenInvalid {
            reason: "410 Unregistered".into(),
        };
        assert!(!dead.is_sent());
        assert_eq!(dead.to_nanohub_json()["push_error"], "410 Unregistered");
    }
}
