//! The APNs push engine (protocol.md §4): per-topic pools of HTTP/2 connections
//! authenticated with the topic's push certificate, one push in flight per device
//! (later requests join it), bounded retries, per-device backoff after 429, and a topic
//! stop when APNs rejects the certificate. All APNs I/O runs on a dedicated runtime
//! thread so that HTTP workers never drive APNs connections.

mod connection;
mod pool;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::{stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::time::Instant;

pub use connection::Endpoint;
use pool::TopicPool;

use super::{classify, ApnsVerdict, Push, PushOutcome, PushTarget, TopicStatus};
use crate::store::{PushCertRecord, Store};

pub const PRODUCTION_URL: &str = "https://api.push.apple.com";
pub const DEVELOPMENT_URL: &str = "https://api.sandbox.push.apple.com";

#[derive(Clone, Debug)]
pub struct ApnsSettings {
    pub endpoint: Endpoint,
    /// Extra roots to trust for the endpoint (a local peer's CA); public roots always count.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub connections_per_topic: usize,
    /// `apns-expiration`: how long APNs keeps the wake-up for an offline device.
    pub expiration: Duration,
    pub request_timeout: Duration,
    pub keepalive: Duration,
    /// Attempts per push for 5xx answers and connection failures.
    pub max_attempts: u32,
    pub retry_base: Duration,
    /// How long a device that drew 429 TooManyRequests is not pushed again.
    pub throttle_backoff: Duration,
    /// Pushes in flight at once per call (bounds memory for fleet-wide pushes).
    pub max_in_flight: usize,
}

impl ApnsSettings {
    pub fn new(endpoint: Endpoint) -> Self {
        ApnsSettings {
            endpoint,
            extra_roots: Vec::new(),
            connections_per_topic: 2,
            expiration: Duration::from_secs(7 * 24 * 3600),
            request_timeout: Duration::from_secs(15),
            keepalive: Duration::from_secs(60),
            max_attempts: 3,
            retry_base: Duration::from_millis(200),
            throttle_backoff: Duration::from_secs(60),
            max_in_flight: 8192,
        }
    }
}

/// [`Push`] over APNs.
pub struct ApnsPush {
    engine: Arc<Engine>,
    runtime: tokio::runtime::Handle,
}

impl ApnsPush {
    /// Start the engine and its runtime thread.
    pub fn start(settings: ApnsSettings, store: Arc<dyn Store>) -> std::io::Result<ApnsPush> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("orchard-apns")
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("orchard-apns".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        let roots = crate::outbound_tls::trusted_roots(&settings.extra_roots, "--apns-ca")
            .map_err(std::io::Error::other)?;
        Ok(ApnsPush {
            engine: Arc::new(Engine {
                settings,
                roots: Arc::new(roots),
                store,
                pools: DashMap::new(),
                pool_creation: tokio::sync::Mutex::new(()),
                in_flight: DashMap::new(),
                throttled: DashMap::new(),
            }),
            runtime: handle,
        })
    }
}

#[async_trait]
impl Push for ApnsPush {
    async fn push(&self, targets: &[PushTarget]) -> Vec<PushOutcome> {
        let engine = Arc::clone(&self.engine);
        let targets = targets.to_vec();
        let count = targets.len();
        self.runtime
            .spawn(engine.push_all(targets))
            .await
            .unwrap_or_else(|e| {
                vec![
                    PushOutcome::Failed {
                        reason: format!("push engine failure: {e}")
                    };
                    count
                ]
            })
    }

    fn certificate_changed(&self, topic: &str) {
        if let Some((_, pool)) = self.engine.pools.remove(topic) {
            pool.close();
        }
        metrics::gauge!("orchard_apns_topic_stopped", "topic" => topic.to_string()).set(0.0);
    }

    fn topic_status(&self, topic: &str) -> TopicStatus {
        match self.engine.pools.get(topic) {
            Some(pool) => match pool.stopped() {
                Some(reason) => TopicStatus::Stopped { reason },
                None => TopicStatus::Active,
            },
            None => TopicStatus::Idle,
        }
    }
}

type SharedOutcome = Shared<BoxFuture<'static, PushOutcome>>;

struct Engine {
    settings: ApnsSettings,
    roots: Arc<rustls::RootCertStore>,
    store: Arc<dyn Store>,
    pools: DashMap<String, Arc<TopicPool>>,
    /// Serialises pool creation so a burst for a new topic builds one pool.
    pool_creation: tokio::sync::Mutex<()>,
    /// The push in flight per enrollment: later requests for it wait for its outcome.
    in_flight: DashMap<String, SharedOutcome>,
    /// Device tokens APNs throttled (429), until when.
    throttled: DashMap<Vec<u8>, Instant>,
}

impl Engine {
    async fn push_all(self: Arc<Self>, targets: Vec<PushTarget>) -> Vec<PushOutcome> {
        let now = Instant::now();
        self.throttled.retain(|_, until| *until > now);
        let limit = self.settings.max_in_flight.max(1);
        stream::iter(targets)
            .map(|target| Arc::clone(&self).push_coalesced(target))
            .buffered(limit)
            .collect()
            .await
    }

    /// At most one push per device at a time: a second request joins the first.
    async fn push_coalesced(self: Arc<Self>, target: PushTarget) -> PushOutcome {
        let key = target.enrollment_id.clone();
        let (shared, leader) = match self.in_flight.entry(key.clone()) {
            dashmap::mapref::entry::Entry::Occupied(existing) => (existing.get().clone(), false),
            dashmap::mapref::entry::Entry::Vacant(slot) => {
                let push = Arc::clone(&self).push_one(target).boxed().shared();
                slot.insert(push.clone());
                (push, true)
            }
        };
        if !leader {
            metrics::counter!("orchard_pushes_coalesced_total").increment(1);
        }
        let outcome = shared.clone().await;
        if leader {
            self.in_flight.remove_if(&key, |_, f| f.ptr_eq(&shared));
        }
        outcome
    }

    async fn push_one(self: Arc<Self>, target: PushTarget) -> PushOutcome {
        let outcome = self.deliver(&target).await;
        record_outcome(&outcome);
        outcome
    }

    async fn deliver(&self, target: &PushTarget) -> PushOutcome {
        if let Some(until) = self.throttled.get(&target.token).map(|t| *t) {
            if Instant::now() < until {
                return PushOutcome::NotSent {
                    reason: "APNs throttled this device (429 TooManyRequests); backing off".into(),
                };
            }
            self.throttled.remove(&target.token);
        }
        let pool = match self.pool(&target.topic).await {
            Ok(pool) => pool,
            Err(reason) => return PushOutcome::Failed { reason },
        };
        if let Some(reason) = pool.stopped() {
            return PushOutcome::Failed {
                reason: format!("topic {} stopped: {reason}", target.topic),
            };
        }
        let body = Bytes::from(serde_json::json!({ "mdm": target.push_magic }).to_string());
        let mut last_failure = String::new();
        for attempt in 0..self.settings.max_attempts.max(1) {
            if attempt > 0 {
                metrics::counter!("orchard_push_retries_total").increment(1);
                tokio::time::sleep(retry_delay(self.settings.retry_base, attempt)).await;
            }
            let connection = match pool
                .connection(&self.settings.endpoint, self.settings.keepalive)
                .await
            {
                Ok(connection) => connection,
                Err(e) => {
                    last_failure = e.to_string();
                    continue;
                }
            };
            let started = std::time::Instant::now();
            metrics::gauge!("orchard_apns_in_flight_streams").increment(1.0);
            let answer = connection
                .send(
                    self.request(target),
                    body.clone(),
                    self.settings.request_timeout,
                )
                .await;
            metrics::gauge!("orchard_apns_in_flight_streams").decrement(1.0);
            metrics::histogram!("orchard_push_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            let response = match answer {
                Ok(response) => response,
                Err(e) => {
                    connection.mark_closed();
                    last_failure = e.to_string();
                    continue;
                }
            };
            let reason = apns_reason(&response.body);
            match classify(response.status, &reason) {
                ApnsVerdict::Delivered => {
                    return PushOutcome::Sent {
                        apns_id: response.header("apns-id").unwrap_or_default().to_string(),
                    }
                }
                ApnsVerdict::TokenInvalid => {
                    return PushOutcome::TokenInvalid {
                        reason: format!("{} {reason}", response.status),
                    }
                }
                ApnsVerdict::CertificateRejected => {
                    pool.stop(format!("APNs rejected the push certificate: 403 {reason}"));
                    return PushOutcome::Failed {
                        reason: format!("403 {reason}: topic {} stopped", target.topic),
                    };
                }
                ApnsVerdict::Throttled => {
                    self.throttled.insert(
                        target.token.clone(),
                        Instant::now() + self.settings.throttle_backoff,
                    );
                    return PushOutcome::Failed {
                        reason: format!("429 {reason}"),
                    };
                }
                ApnsVerdict::Retry => last_failure = format!("{} {reason}", response.status),
                ApnsVerdict::Drop => {
                    return PushOutcome::Failed {
                        reason: format!("{} {reason}", response.status),
                    }
                }
            }
        }
        PushOutcome::Failed {
            reason: format!(
                "gave up after {} attempts: {last_failure}",
                self.settings.max_attempts.max(1)
            ),
        }
    }

    fn request(&self, target: &PushTarget) -> http::Request<()> {
        let expiration = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + self.settings.expiration;
        let path = format!("/3/device/{}", hex::encode(&target.token));
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self
            .settings
            .endpoint
            .url(&path)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        let headers = request.headers_mut();
        let mut put = |name: &'static str, value: String| {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        };
        put("apns-topic", target.topic.clone());
        put("apns-push-type", "mdm".into());
        put("apns-priority", "10".into());
        put("apns-expiration", expiration.as_secs().to_string());
        put("apns-id", uuid::Uuid::new_v4().to_string());
        put("content-type", "application/json".into());
        request
    }

    async fn pool(&self, topic: &str) -> Result<Arc<TopicPool>, String> {
        if let Some(pool) = self.pools.get(topic) {
            return Ok(Arc::clone(&pool));
        }
        let _creating = self.pool_creation.lock().await;
        if let Some(pool) = self.pools.get(topic) {
            return Ok(Arc::clone(&pool));
        }
        let record = self
            .store
            .push_cert(topic)
            .await
            .map_err(|e| format!("cannot read the push certificate: {e}"))?
            .ok_or_else(|| format!("no push certificate uploaded for topic {topic}"))?;
        let tls = client_config(&record, Arc::clone(&self.roots))?;
        let pool = Arc::new(TopicPool::new(
            topic.to_string(),
            Arc::new(tls),
            self.settings.connections_per_topic,
        ));
        self.pools.insert(topic.to_string(), Arc::clone(&pool));
        Ok(pool)
    }
}

/// TLS for one topic: the push certificate as client identity, ALPN h2.
fn client_config(
    record: &PushCertRecord,
    roots: Arc<rustls::RootCertStore>,
) -> Result<rustls::ClientConfig, String> {
    let chain = CertificateDer::pem_slice_iter(record.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("stored push certificate unreadable: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(record.key_pem.as_bytes())
        .map_err(|e| format!("stored push key unreadable: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| format!("push certificate and key unusable for TLS: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// APNs error bodies are `{"reason": "..."}`.
fn apns_reason(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// Doubling from `base`, ±50 % jitter.
fn retry_delay(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(10))
        .mul_f64(0.5 + rand::random::<f64>())
}

fn record_outcome(outcome: &PushOutcome) {
    let (kind, reason) = match outcome {
        PushOutcome::Sent { .. } => ("sent", String::new()),
        PushOutcome::AlreadyPending => ("already_pending", String::new()),
        PushOutcome::TokenInvalid { reason } => ("token_invalid", reason.clone()),
        PushOutcome::NotSent { .. } => ("not_sent", "throttled".to_string()),
        PushOutcome::Failed { reason } => ("failed", metric_reason(reason)),
    };
    metrics::counter!("orchard_pushes_total", "outcome" => kind, "reason" => reason).increment(1);
}

/// Keep label values to APNs reason codes and a few fixed words.
fn metric_reason(reason: &str) -> String {
    let word = reason
        .split_whitespace()
        .find(|w| {
            w.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && w.chars().all(|c| c.is_ascii_alphanumeric())
        })
        .unwrap_or(if reason.starts_with("gave up") {
            "retries_exhausted"
        } else {
            "other"
        });
    word.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_error_bodies_yield_their_reason() {
        assert_eq!(
            apns_reason(br#"{"reason":"Unregistered","timestamp":1}"#),
            "Unregistered"
        );
        assert_eq!(apns_reason(b""), "");
    }

    #[test]
    fn retry_delays_double_with_jitter() {
        let base = Duration::from_millis(100);
        let second = retry_delay(base, 2);
        assert!(second >= Duration::from_millis(200) && second <= Duration::from_millis(600));
    }

    #[test]
    fn metric_reasons_stay_low_cardinality() {
        assert_eq!(metric_reason("429 TooManyRequests"), "TooManyRequests");
        assert_eq!(
            metric_reason("gave up after 3 attempts: connection refused"),
            "retries_exhausted"
        );
        assert_eq!(
            metric_reason("no push certificate uploaded for topic x"),
            "other"
        );
    }
}
