//! The push implementation used while no APNs client is wired in: it records the intent
//! (so operators and tests can see that a wake-up was wanted) and reports truthfully that
//! nothing was sent.

use std::collections::VecDeque;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Push, PushOutcome, PushTarget};

/// Why a recorded push was not sent; surfaced verbatim in API responses.
pub const NOT_SENT_REASON: &str = "push not sent: no APNs client is configured; intent recorded";

/// Keeps the most recent push intents, bounded so a fleet-wide push cannot grow memory.
pub struct RecordingPush {
    recent: Mutex<VecDeque<PushTarget>>,
    capacity: usize,
}

impl RecordingPush {
    pub fn new(capacity: usize) -> Self {
        RecordingPush {
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
        }
    }

    /// The most recent intents, oldest first.
    pub fn recent(&self) -> Vec<PushTarget> {
        self.recent.lock().iter().cloned().collect()
    }
}

#[async_trait]
impl Push for RecordingPush {
    async fn push(&self, targets: &[PushTarget]) -> Vec<PushOutcome> {
        let mut recent = self.recent.lock();
        for target in targets {
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(target.clone());
            tracing::info!(enrollment_id = %target.enrollment_id, topic = %target.topic, "push recorded, not sent");
        }
        metrics::counter!("orchard_push_intents_recorded_total").increment(targets.len() as u64);
        targets
            .iter()
            .map(|_| PushOutcome::NotSent {
                reason: NOT_SENT_REASON.to_string(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str) -> PushTarget {
        PushTarget {
            enrollment_id: id.into(),
            topic: "com.apple.mgmt.External.test".into(),
            token: vec![1, 2, 3],
            push_magic: "magic".into(),
        }
    }

    #[actix_rt::test]
    async fn every_push_is_reported_as_not_sent_and_remembered() {
        let push = RecordingPush::new(10);
        let outcomes = push.push(&[target("a"), target("b")]).await;
        assert!(outcomes.iter().all(|o| !o.is_sent()));
        assert_eq!(outcomes[0].to_nanohub_json()["push_error"], NOT_SENT_REASON);
        assert_eq!(push.recent().len(), 2);
    }

    #[actix_rt::test]
    async fn the_record_is_bounded() {
        let push = RecordingPush::new(2);
        push.push(&[target("a"), target("b"), target("c")]).await;
        let ids: Vec<_> = push.recent().into_iter().map(|t| t.enrollment_id).collect();
        assert_eq!(ids, ["b", "c"]);
    }
}
