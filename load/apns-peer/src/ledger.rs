//! What the peer observed: counters, a bounded history of answers and live subscriptions.
//!
//! Everything here is updated before the corresponding response is queued, so a client that
//! has just read a response can immediately assert on it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc::{self, error::TrySendError};

/// How many answers [`Ledger::recent`] keeps; older ones are forgotten first.
pub const RECENT_CAPACITY: usize = 10_000;

/// Buffer of each subscription; large enough for a load burst, bounded so a subscriber that
/// stopped reading costs dropped records instead of unbounded memory or a stalled peer.
pub const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// One answered request as the peer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedPush {
    /// Token from the request path (empty when the path was not `/3/device/<token>`).
    pub token_hex: String,
    /// The `mdm` value of the payload.
    pub push_magic: Option<String>,
    /// `apns-topic` header.
    pub topic: Option<String>,
    /// The `apns-id` the peer answered with.
    pub apns_id: String,
    /// HTTP status the peer answered with.
    pub status: u16,
    /// APNs reason of an error answer; `None` for `200`.
    pub reason: Option<String>,
}

#[derive(Default)]
pub(crate) struct Ledger {
    requests: AtomicU64,
    pushes: AtomicU64,
    connections_accepted: AtomicU64,
    open_connections: AtomicU64,
    max_concurrent_streams_seen: AtomicU64,
    subscription_drops: AtomicU64,
    recent: Mutex<VecDeque<RecordedPush>>,
    subscribers: Mutex<Vec<mpsc::Sender<RecordedPush>>>,
}

impl Ledger {
    pub(crate) fn request_received(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection whose TLS handshake completed; the returned guard keeps it in
    /// [`Ledger::open_connections`] until dropped.
    pub(crate) fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(self))
    }

    /// Marks one more stream open on a connection whose open streams are counted by
    /// `open_on_connection`, remembering the highest concurrency ever reached.
    pub(crate) fn stream_opened(&self, open_on_connection: &Arc<AtomicU64>) -> OpenStream {
        let open_now = open_on_connection.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_concurrent_streams_seen
            .fetch_max(open_now, Ordering::AcqRel);
        OpenStream(Arc::clone(open_on_connection))
    }

    /// Records an answer; accepted pushes are also counted and fanned out to subscribers.
    pub(crate) fn record_answer(&self, answer: RecordedPush) {
        if answer.status == 200 {
            self.pushes.fetch_add(1, Ordering::Relaxed);
            self.publish(&answer);
        }
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_CAPACITY {
            recent.pop_front();
        }
        recent.push_back(answer);
    }

    fn publish(&self, push: &RecordedPush) {
        lock(&self.subscribers).retain(|subscriber| match subscriber.try_send(push.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.subscription_drops.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        });
    }

    pub(crate) fn subscribe(&self) -> mpsc::Receiver<RecordedPush> {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        lock(&self.subscribers).push(sender);
        receiver
    }

    pub(crate) fn recent(&self) -> Vec<RecordedPush> {
        lock(&self.recent).iter().cloned().collect()
    }

    pub(crate) fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub(crate) fn push_count(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    pub(crate) fn connections_accepted(&self) -> u64 {
        self.connections_accepted.load(Ordering::Relaxed)
    }

    pub(crate) fn open_connections(&self) -> u64 {
        self.open_connections.load(Ordering::Relaxed)
    }

    pub(crate) fn max_concurrent_streams_seen(&self) -> u64 {
        self.max_concurrent_streams_seen.load(Ordering::Acquire)
    }

    pub(crate) fn subscription_drops(&self) -> u64 {
        self.subscription_drops.load(Ordering::Relaxed)
    }
}

/// A poisoned lock only means a stream handler panicked mid-update; the history and
/// subscriber list stay usable, so the peer keeps serving.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a connection counted as open while it is alive.
pub(crate) struct OpenConnection(Arc<Ledger>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a stream counted as open on its connection while it is alive.
pub(crate) struct OpenStream(Arc<AtomicU64>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, magic: &str) -> RecordedPush {
        RecordedPush {
            token_hex: "00ff".to_owned(),
            push_magic: Some(magic.to_owned()),
            topic: None,
            apns_id: "id".to_owned(),
            status,
            reason: (status != 200).then(|| "Unregistered".to_owned()),
        }
    }

    #[test]
    fn only_accepted_pushes_are_counted_and_published_but_all_answers_are_kept() {
        let ledger = Ledger::default();
        let mut subscription = ledger.subscribe();
        ledger.record_answer(answer(410, "gone"));
        ledger.record_answer(answer(200, "woken"));
        assert_eq!(ledger.push_count(), 1);
        assert_eq!(ledger.recent().len(), 2);
        let published = subscription.try_recv().expect("accepted push published");
        assert_eq!(published.push_magic.as_deref(), Some("woken"));
        assert!(subscription.try_recv().is_err());
    }

    #[test]
    fn history_is_bounded_and_forgets_the_oldest_first() {
        let ledger = Ledger::default();
        for index in 0..=RECENT_CAPACITY {
            ledger.record_answer(answer(200, &index.to_string()));
        }
        let recent = ledger.recent();
        assert_eq!(recent.len(), RECENT_CAPACITY);
        assert_eq!(recent[0].push_magic.as_deref(), Some("1"));
    }

    #[test]
    fn a_full_subscription_loses_records_instead_of_blocking() {
        let ledger = Ledger::default();
        let _stalled = ledger.subscribe();
        for _ in 0..=SUBSCRIPTION_CAPACITY {
            ledger.record_answer(answer(200, "m"));
        }
        assert_eq!(ledger.subscription_drops(), 1);
    }

    #[test]
    fn closed_subscriptions_are_forgotten() {
        let ledger = Ledger::default();
        drop(ledger.subscribe());
        ledger.record_answer(answer(200, "m"));
        assert!(lock(&ledger.subscribers).is_empty());
        assert_eq!(ledger.subscription_drops(), 0);
    }

    #[test]
    fn stream_concurrency_peak_is_remembered_after_streams_close() {
        let ledger = Ledger::default();
        let open = Arc::new(AtomicU64::new(0));
        let first = ledger.stream_opened(&open);
        let second = ledger.stream_opened(&open);
        drop(first);
        drop(second);
        let _third = ledger.stream_opened(&open);
        assert_eq!(ledger.max_concurrent_streams_seen(), 2);
        assert_eq!(open.load(Ordering::Acquire), 1);
    }

    #[test]
    fn open_connections_follow_their_guards() {
        let ledger = Arc::new(Ledger::default());
        let connection = ledger.connection_opened();
        assert_eq!(ledger.open_connections(), 1);
        drop(connection);
        assert_eq!(ledger.open_connections(), 0);
        assert_eq!(ledger.connections_accepted(), 1);
    }
}
