//! A topic's small pool of long-lived connections (never one connection per push), with
//! reconnects spaced by jittered exponential backoff, and a stop switch for when APNs
//! rejects the topic's certificate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::Mutex;

use super::connection::{Connection, ConnectionError, Endpoint};

/// Longest pause between reconnect attempts of one slot.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

pub struct TopicPool {
    pub topic: String,
    tls: Arc<rustls::ClientConfig>,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    stopped: RwLock<Option<String>>,
}

#[derive(Default)]
struct Slot {
    connection: Option<Connection>,
    failures: u32,
}

impl TopicPool {
    pub fn new(topic: String, tls: Arc<rustls::ClientConfig>, size: usize) -> Self {
        TopicPool {
            topic,
            tls,
            slots: (0..size.max(1))
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
            next: AtomicUsize::new(0),
            stopped: RwLock::new(None),
        }
    }

    /// A live connection, round-robin over the slots; (re)connects a slot that has none.
    pub async fn connection(
        &self,
        endpoint: &Endpoint,
        keepalive: Duration,
    ) -> Result<Connection, ConnectionError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[index].lock().await;
        if let Some(connection) = slot.connection.as_ref().filter(|c| !c.is_closed()) {
            return Ok(connection.clone());
        }
        if slot.failures > 0 {
            tokio::time::sleep(reconnect_delay(slot.failures)).await;
        }
        let topic = self.topic.clone();
        metrics::gauge!("orchard_apns_connections", "topic" => topic.clone()).increment(1.0);
        let opened =
            super::connection::open(endpoint, Arc::clone(&self.tls), keepalive, move || {
                metrics::gauge!("orchard_apns_connections", "topic" => topic).decrement(1.0);
            })
            .await;
        match opened {
            Ok(connection) => {
                slot.failures = 0;
                slot.connection = Some(connection.clone());
                metrics::counter!("orchard_apns_connects_total", "topic" => self.topic.clone())
                    .increment(1);
                Ok(connection)
            }
            Err(e) => {
                metrics::gauge!("orchard_apns_connections", "topic" => self.topic.clone())
                    .decrement(1.0);
                slot.failures += 1;
                tracing::warn!(topic = %self.topic, error = %e, failures = slot.failures, "APNs connection failed");
                Err(e)
            }
        }
    }

    /// APNs refused the certificate: stop using the topic until a new one is uploaded.
    pub fn stop(&self, reason: String) {
        tracing::error!(topic = %self.topic, %reason, "APNs rejected the push certificate; topic stopped");
        metrics::gauge!("orchard_apns_topic_stopped", "topic" => self.topic.clone()).set(1.0);
        *self.stopped.write() = Some(reason);
        self.close();
    }

    pub fn stopped(&self) -> Option<String> {
        self.stopped.read().clone()
    }

    /// Let every connection drain and end.
    pub fn close(&self) {
        for slot in &self.slots {
            if let Ok(slot) = slot.try_lock() {
                if let Some(connection) = &slot.connection {
                    connection.mark_closed();
                }
            }
        }
    }
}

/// 100 ms doubling per consecutive failure, capped, with ±50 % jitter so that many
/// slots (or nodes) do not reconnect in lockstep.
fn reconnect_delay(failures: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << failures.min(16));
    let jitter = 0.5 + rand::random::<f64>();
    base.min(MAX_RECONNECT_DELAY).mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_grow_and_are_capped() {
        let first = reconnect_delay(1);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(300));
        assert!(reconnect_delay(40) <= MAX_RECONNECT_DELAY.mul_f64(1.5));
    }
}
