//! The one HTTP client every simulated device and the operator share: awc on the client
//! thread's actix runtime, keep-alive connections, and a semaphore bounding requests in
//! flight so a push storm queues here instead of opening thousands of sockets.

use std::rc::Rc;
use std::time::{Duration, Instant};

use awc::error::SendRequestError;
use awc::http::Method;
use base64::Engine;
use bytes::Bytes;
use orchard::identity::sign_mdm_signature;
use tokio::sync::Semaphore;

use crate::stats::Stats;

/// How many times a device sends a message Orchard answered 503: long enough to outlast
/// a takeover (2 × the default 10 s lease).
const DEVICE_ATTEMPTS: u32 = 10;
/// The pause before sending it again (Orchard's Retry-After).
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// How long a node that refused a connection stays out of rotation.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// Largest response a device or the operator reads (the fleet reports are the biggest).
const RESPONSE_LIMIT: usize = 64 * 1024 * 1024;

/// How a device proves its identity to Orchard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityTransport {
    /// RFC 9440 `X-Client-Cert: :<base64 DER>:`, as a TLS-terminating proxy forwards it.
    Header,
    /// `Mdm-Signature`: a detached CMS signature over the exact body.
    Signature,
}

/// Header that carries the client certificate in `header` mode.
pub const CLIENT_CERT_HEADER: &str = "X-Client-Cert";

/// The certificate and key a device signs or presents with.
pub struct Credentials<'a> {
    pub cert_der: &'a [u8],
    pub key_pkcs8_der: &'a [u8],
}

pub struct Http {
    client: awc::Client,
    /// The nodes requests go to, one after the other, as a load balancer spreads them.
    bases: Vec<String>,
    next: std::cell::Cell<usize>,
    /// Per node: out of rotation until then (it refused a connection).
    down: Vec<std::cell::Cell<Option<Instant>>>,
    api_key: String,
    transport: IdentityTransport,
    permits: Semaphore,
    pub stats: Rc<Stats>,
}

/// Why a request did not produce a 2xx; already counted in the stats.
#[derive(Debug)]
pub struct Failed(pub String);

impl Http {
    pub fn new(
        bases: Vec<String>,
        api_key: String,
        transport: IdentityTransport,
        concurrency: usize,
        timeout: Duration,
        stats: Rc<Stats>,
    ) -> Self {
        let client = awc::Client::builder()
            .connector(awc::Connector::new().limit(concurrency))
            .timeout(timeout)
            .disable_redirects()
            .finish();
        Self {
            client,
            down: bases.iter().map(|_| std::cell::Cell::new(None)).collect(),
            bases,
            next: std::cell::Cell::new(0),
            api_key,
            transport,
            permits: Semaphore::new(concurrency),
            stats,
        }
    }

    /// `PUT /mdm` as a device: check-in or connect, identity attached per the transport.
    pub async fn device_put(
        &self,
        endpoint: &'static str,
        credentials: &Credentials<'_>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, Failed> {
        let identity = match self.transport {
            IdentityTransport::Header => (
                CLIENT_CERT_HEADER,
                format!(
                    ":{}:",
                    base64::engine::general_purpose::STANDARD.encode(credentials.cert_der)
                ),
            ),
            IdentityTransport::Signature => (
                "Mdm-Signature",
                sign_mdm_signature(credentials.cert_der, credentials.key_pkcs8_der, &body)
                    .map_err(|err| Failed(format!("signing: {err}")))?,
            ),
        };
        let request = |base: &str| {
            self.client
                .put(format!("{base}/mdm"))
                .insert_header(("Content-Type", content_type))
                .insert_header(identity.clone())
        };
        // A 503 asks the device to come back (Retry-After): it sends the same message
        // again, as the MDM client does, a few times before giving up on the session.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.send(endpoint, request, Some(body.clone())).await {
                Err(Failed(kind)) if kind == "status 503" && attempts < DEVICE_ATTEMPTS => {
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                answer => return answer.map(|(_, body)| body),
            }
        }
    }

    /// An admin API call with the API key; `json` bodies are sent as `application/json`.
    pub async fn api(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(u16, Bytes), Failed> {
        let (content_type, body) = match body {
            Some((content_type, body)) => (Some(content_type), Some(body)),
            None => (None, None),
        };
        let request = |base: &str| {
            let request = self
                .client
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&self.api_key);
            match content_type {
                Some(content_type) => request.insert_header(("Content-Type", content_type)),
                None => request,
            }
        };
        self.send(endpoint, request, body).await
    }

    /// The node the next request goes to: the next one not marked down, as a load
    /// balancer rotates over its healthy backends.
    fn base(&self) -> &str {
        let now = Instant::now();
        for _ in 0..self.bases.len() {
            let index = self.next.get();
            self.next.set((index + 1) % self.bases.len());
            if self.down[index].get().is_none_or(|until| until <= now) {
                return &self.bases[index];
            }
        }
        &self.bases[self.next.get()]
    }

    /// A node refused a connection: out of rotation for a while.
    fn mark_down(&self, base: &str) {
        if let Some(index) = self.bases.iter().position(|b| b == base) {
            self.down[index].set(Some(Instant::now() + DOWN_FOR));
        }
    }

    /// Whether every node answers an unauthenticated GET (health probes) with 200; not
    /// counted.
    pub async fn all_answer_ok(&self, path: &str) -> bool {
        for base in &self.bases {
            let response = self
                .client
                .get(format!("{base}{path}"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if !response.is_ok_and(|r| r.status().as_u16() == 200) {
                return false;
            }
        }
        true
    }

    /// Send through the next node; a node that refuses the connection (the request
    /// never left) is marked down and the request goes to the next one, once, as a load
    /// balancer retries a failed upstream connect.
    async fn send(
        &self,
        endpoint: &'static str,
        request: impl Fn(&str) -> awc::ClientRequest,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), Failed> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Failed("client closed".into()))?;
        let started = Instant::now();
        let body = body.map(Bytes::from);
        let mut outcome = Err(String::new());
        for _ in 0..2 {
            let base = self.base().to_owned();
            outcome = self.exchange(request(&base), body.clone()).await;
            match &outcome {
                Err(kind) if kind == "connect" && self.bases.len() > 1 => self.mark_down(&base),
                _ => break,
            }
        }
        let latency = started.elapsed();
        match outcome {
            Ok(answer) => {
                self.stats.record(endpoint, latency, None);
                Ok(answer)
            }
            Err(kind) => {
                self.stats.record(endpoint, latency, Some(kind.clone()));
                Err(Failed(kind))
            }
        }
    }
}

impl Http {
    async fn exchange(
        &self,
        request: awc::ClientRequest,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), String> {
        let sent = match body {
            Some(body) => request.send_body(body).await,
            None => request.send().await,
        };
        let mut response = sent.map_err(send_error_kind)?;
        let status = response.status().as_u16();
        let body = response
            .body()
            .limit(RESPONSE_LIMIT)
            .await
            .map_err(|_| "body".to_owned())?;
        if (200..300).contains(&status) {
            Ok((status, body))
        } else {
            Err(format!("status {status}"))
        }
    }
}

fn send_error_kind(error: SendRequestError) -> String {
    match error {
        SendRequestError::Timeout => "timeout".into(),
        SendRequestError::Connect(_) => "connect".into(),
        SendRequestError::Send(_) | SendRequestError::Body(_) => "send".into(),
        SendRequestError::Response(_) => "response".into(),
        _ => "transport".into(),
    }
}
