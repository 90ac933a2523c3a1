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
    base: String,
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
        base: String,
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
            base,
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
        let mut request = self
            .client
            .put(format!("{}/mdm", self.base))
            .insert_header(("Content-Type", content_type));
        request = match self.transport {
            IdentityTransport::Header => request.insert_header((
                CLIENT_CERT_HEADER,
                format!(
                    ":{}:",
                    base64::engine::general_purpose::STANDARD.encode(credentials.cert_der)
                ),
            )),
            IdentityTransport::Signature => {
                let signature =
                    sign_mdm_signature(credentials.cert_der, credentials.key_pkcs8_der, &body)
                        .map_err(|err| Failed(format!("signing: {err}")))?;
                request.insert_header(("Mdm-Signature", signature))
            }
        };
        self.send(endpoint, request, Some(body))
            .await
            .map(|(_, body)| body)
    }

    /// An admin API call with the API key; `json` bodies are sent as `application/json`.
    pub async fn api(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(u16, Bytes), Failed> {
        let request = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.api_key);
        match body {
            Some((content_type, body)) => {
                let request = request.insert_header(("Content-Type", content_type));
                self.send(endpoint, request, Some(body)).await
            }
            None => self.send(endpoint, request, None).await,
        }
    }

    /// An unauthenticated GET (health probes); not counted.
    pub async fn probe(&self, path: &str) -> Option<u16> {
        let response = self
            .client
            .get(format!("{}{}", self.base, path))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }

    async fn send(
        &self,
        endpoint: &'static str,
        request: awc::ClientRequest,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), Failed> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Failed("client closed".into()))?;
        let started = Instant::now();
        let outcome = async {
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
        .await;
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

fn send_error_kind(error: SendRequestError) -> String {
    match error {
        SendRequestError::Timeout => "timeout".into(),
        SendRequestError::Connect(_) => "connect".into(),
        SendRequestError::Send(_) | SendRequestError::Body(_) => "send".into(),
        SendRequestError::Response(_) => "response".into(),
        _ => "transport".into(),
    }
}
