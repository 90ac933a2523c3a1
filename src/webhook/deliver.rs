//! The deliverer: reads each enrollment's outbox in order and posts its events, on a
//! thread of its own (`orchard-webhook`), so that no device request ever waits for a
//! receiver.
//!
//! * Enrollments to drain come from the actors (a notice after each write that recorded
//!   an event) and from a periodic pass over the store's index of enrollments with pending
//!   events (`Store::webhook_pending`): after a restart, a shard taken over from another
//!   node, or a notice dropped because too many enrollments were being drained.
//! * One task per enrollment, at most [`MAX_DRAINING`] at once: event n+1 is posted only
//!   after event n was accepted (2xx) and removed from the outbox, or dropped for age.
//! * A failed post is retried with exponential backoff (from [`FIRST_RETRY`] up to
//!   [`LAST_RETRY`], with jitter) until the event is older than `--webhook-max-age-secs`;
//!   then it is dropped, counted and logged.
//! * In a cluster an enrollment is drained only by the node holding its shard; the
//!   outbox removal is a fenced write of the enrollment's rows, refused once the shard
//!   moved, and the drain then stops and leaves the rest to the new owner.
//! * Delivery is at least once: an event is removed after its 2xx, so a crash between the
//!   two sends it again (with the same `event_id`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::client::Client;
use crate::cluster::{shard_of, Placement};
use crate::store::{Mutation, Store, WebhookEvent};

/// Enrollments drained at once; more wait for the next pass over the index.
pub const MAX_DRAINING: usize = 256;
/// Events read from one outbox at a time.
const READ_AHEAD: usize = 32;
/// Ids read per page of the index.
const INDEX_PAGE: usize = 1000;
/// How often the index is walked.
const PASS_INTERVAL: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// Notices that may wait for the deliverer; past this they are dropped (the index pass
/// finds their enrollments).
const NOTICE_CAPACITY: usize = 16 * 1024;

/// `--webhook-*`.
pub struct WebhookSettings {
    pub client: Client,
    /// Events older than this are dropped undelivered.
    pub max_age: Duration,
}

/// How device actors tell the deliverer that an enrollment's outbox has a new event.
#[derive(Clone)]
pub struct Notifier {
    notices: mpsc::Sender<String>,
}

impl Notifier {
    /// The write recording an event for `enrollment_id` is durable.
    pub fn queued(&self, enrollment_id: &str) {
        metrics::counter!("orchard_webhook_events_queued_total").increment(1);
        if self.notices.try_send(enrollment_id.to_string()).is_err() {
            metrics::counter!("orchard_webhook_notices_dropped_total").increment(1);
        }
    }
}

/// What became of one event.
enum Outcome {
    Delivered,
    Dropped,
    /// The drain stops: the shard moved, or the outbox could not be updated. The event
    /// stays in the outbox, for this node's next pass or the new owner.
    Stop,
}

/// Drains outboxes; see the module documentation.
pub struct Deliverer {
    store: Arc<dyn Store>,
    placement: Arc<dyn Placement>,
    settings: WebhookSettings,
    /// Enrollments being drained, each with whether a notice came in since its outbox was
    /// last read (so the drain reads it once more before it ends).
    draining: Mutex<HashMap<String, bool>>,
}

impl Deliverer {
    /// Start the deliverer on its own thread; the notifier goes to the device registry.
    pub fn start(
        store: Arc<dyn Store>,
        placement: Arc<dyn Placement>,
        settings: WebhookSettings,
    ) -> std::io::Result<Notifier> {
        let (notices, received) = mpsc::channel(NOTICE_CAPACITY);
        let deliverer = Arc::new(Deliverer {
            store,
            placement,
            settings,
            draining: Mutex::new(HashMap::new()),
        });
        std::thread::Builder::new()
            .name("orchard-webhook".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => runtime.block_on(deliverer.run(received)),
                    Err(e) => tracing::error!(error = %e, "webhook deliverer could not start"),
                }
            })?;
        Ok(Notifier { notices })
    }

    async fn run(self: Arc<Self>, mut notices: mpsc::Receiver<String>) {
        let mut passes = tokio::time::interval(PASS_INTERVAL);
        passes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                notice = notices.recv() => match notice {
                    Some(id) => self.drain(id),
                    None => return,
                },
                _ = passes.tick() => self.pass().await,
            }
        }
    }

    /// Walk the index once: drain every enrollment found that this node serves (as many
    /// as there is room for), and publish how many have pending events.
    async fn pass(self: &Arc<Self>) {
        let mut after: Option<String> = None;
        let mut pending = 0usize;
        loop {
            let page = match self
                .store
                .webhook_pending(after.as_deref(), INDEX_PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the webhook outbox index");
                    return;
                }
            };
            pending += page.len();
            let exhausted = page.len() < INDEX_PAGE;
            after = page.last().cloned();
            for id in page {
                self.drain(id);
            }
            if exhausted {
                break;
            }
        }
        metrics::gauge!("orchard_webhook_pending_enrollments").set(pending as f64);
    }

    /// Start draining `id` here if this node serves it and there is room; if it is being
    /// drained already, make that drain read its outbox once more.
    fn drain(self: &Arc<Self>, id: String) {
        if !self.placement.accepts(shard_of(&id)) {
            return;
        }
        {
            let mut draining = self.draining.lock();
            if let Some(noticed) = draining.get_mut(&id) {
                *noticed = true;
                return;
            }
            if draining.len() >= MAX_DRAINING {
                return;
            }
            draining.insert(id.clone(), false);
            metrics::gauge!("orchard_webhook_draining_enrollments").set(draining.len() as f64);
        }
        let deliverer = Arc::clone(self);
        tokio::spawn(async move { deliverer.drain_outbox(id).await });
    }

    async fn drain_outbox(self: Arc<Self>, id: String) {
        loop {
            let events = match self.store.webhook_events(&id, READ_AHEAD).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(enrollment_id = %id, error = %e, "could not read the webhook outbox");
                    break;
                }
            };
            if events.is_empty() {
                if self.finish_unless_noticed(&id) {
                    return;
                }
                continue;
            }
            for event in events {
                match self.deliver(&id, event).await {
                    Outcome::Delivered | Outcome::Dropped => {}
                    Outcome::Stop => return self.finish(&id),
                }
            }
        }
        self.finish(&id);
    }

    /// End the drain of an outbox found empty, unless a notice came in since it was read
    /// (then clear the notice and answer false: read it again). One lock, so a notice
    /// arriving now is either seen here or starts a new drain.
    fn finish_unless_noticed(&self, id: &str) -> bool {
        let mut draining = self.draining.lock();
        if let Some(noticed) = draining.get_mut(id) {
            if std::mem::take(noticed) {
                return false;
            }
        }
        draining.remove(id);
        metrics::gauge!("orchard_webhook_draining_enrollments").set(draining.len() as f64);
        true
    }

    fn finish(&self, id: &str) {
        let mut draining = self.draining.lock();
        draining.remove(id);
        metrics::gauge!("orchard_webhook_draining_enrollments").set(draining.len() as f64);
    }

    /// Post `event` until it is accepted or too old, then remove it from the outbox.
    async fn deliver(&self, id: &str, event: WebhookEvent) -> Outcome {
        let mut retry = FIRST_RETRY;
        loop {
            if !self.placement.accepts(shard_of(id)) {
                return Outcome::Stop;
            }
            let age = age_of(&event);
            if age > self.settings.max_age {
                tracing::warn!(enrollment_id = %id, seq = event.seq, age_secs = age.as_secs(), "webhook event dropped undelivered: older than --webhook-max-age-secs");
                metrics::counter!("orchard_webhook_events_dropped_total", "reason" => "expired")
                    .increment(1);
                return self.remove(id, &event, Outcome::Dropped).await;
            }
            let started = Instant::now();
            let failure = match self.settings.client.post(&event.body).await {
                Ok(status) if (200..300).contains(&status) => {
                    metrics::histogram!("orchard_webhook_post_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("orchard_webhook_delivery_seconds")
                        .record(age_of(&event).as_secs_f64());
                    metrics::counter!("orchard_webhook_events_delivered_total").increment(1);
                    tracing::debug!(enrollment_id = %id, seq = event.seq, status, "webhook event delivered");
                    return self.remove(id, &event, Outcome::Delivered).await;
                }
                Ok(status) => (format!("HTTP {status}"), "status"),
                Err(e) => (e.to_string(), e.reason()),
            };
            metrics::counter!("orchard_webhook_retries_total", "reason" => failure.1).increment(1);
            tracing::warn!(enrollment_id = %id, seq = event.seq, failure = %failure.0, retry_in_ms = retry.as_millis() as u64, "webhook post failed; retrying");
            tokio::time::sleep(jittered(retry)).await;
            retry = (retry * 2).min(LAST_RETRY);
        }
    }

    /// Remove a delivered or dropped event. If the outbox cannot be written (store down,
    /// shard moved), the drain stops, so that no later event overtakes this one: it is
    /// posted again by whoever drains the enrollment next.
    async fn remove(&self, id: &str, event: &WebhookEvent, done: Outcome) -> Outcome {
        let removal = Mutation::RemoveWebhookEvent {
            enrollment_id: id.to_string(),
            seq: event.seq,
        };
        match self.store.apply(vec![removal]).await {
            Ok(()) => done,
            Err(e) => {
                tracing::warn!(enrollment_id = %id, seq = event.seq, error = %e, "could not remove a handled webhook event; it will be sent again");
                Outcome::Stop
            }
        }
    }
}

/// How long ago the event's change was written.
fn age_of(event: &WebhookEvent) -> Duration {
    let now = crate::device::now_millis() as i64;
    Duration::from_millis(now.saturating_sub(event.created_at_ms).max(0) as u64)
}

/// `base` ± 20 %, so that enrollments failing together do not retry in lockstep.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::random::<f64>() * 0.4 + 0.8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_spread_around_their_base() {
        for _ in 0..100 {
            let wait = jittered(Duration::from_secs(10));
            assert!(wait >= Duration::from_secs(8) && wait <= Duration::from_secs(12));
        }
    }

    #[test]
    fn an_event_from_the_future_is_not_old() {
        let event = WebhookEvent {
            seq: 1,
            created_at_ms: crate::device::now_millis() as i64 + 60_000,
            body: Vec::new(),
        };
        assert_eq!(age_of(&event), Duration::ZERO);
    }
}
