//! APNs wake-ups behind one interface, so that the HTTP and device layers do not care
//! whether a push goes to Apple, to a local test peer, or is only recorded.

mod recording;

pub use recording::RecordingPush;

use async_trait::async_trait;

/// Everything needed to wake one channel (from its latest TokenUpdate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushTarget {
    pub enrollment_id: String,
    pub topic: String,
    /// Raw device token; APNs takes it lowercase-hex in the request path.
    pub token: Vec<u8>,
    pub push_magic: String,
}

/// What happened to one push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// APNs accepted it; delivery is best effort from here.
    Sent { apns_id: String },
    /// Nothing was sent on purpose (no APNs client, or the channel cannot be pushed).
    NotSent { reason: String },
    /// APNs or the connection refused it.
    Failed { reason: String },
}

impl PushOutcome {
    /// NanoHUB's per-id result shape: `push_result` on success, `push_error` otherwise.
    pub fn to_nanohub_json(&self) -> serde_json::Value {
        match self {
            PushOutcome::Sent { apns_id } => serde_json::json!({ "push_result": apns_id }),
            PushOutcome::NotSent { reason } | PushOutcome::Failed { reason } => {
                serde_json::json!({ "push_error": reason })
            }
        }
    }

    pub fn is_sent(&self) -> bool {
        matches!(self, PushOutcome::Sent { .. })
    }
}

#[async_trait]
pub trait Push: Send + Sync + 'static {
    /// Push every target; the outcomes are in the same order as the targets.
    async fn push(&self, targets: &[PushTarget]) -> Vec<PushOutcome>;
}
