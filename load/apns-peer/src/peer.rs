//! The listening peer: a TLS accept loop that spawns one future per HTTP/2 connection and one
//! per stream, so a slow stream never holds up its neighbours.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::debug;
use uuid::Uuid;

use crate::config::{Behavior, Outcome, PeerConfig};
use crate::ledger::{Ledger, OpenStream, RecordedPush};
use crate::request::{self, Rejection, MAX_PAYLOAD_BYTES};
use crate::tls::{self, PeerIdentity};

/// How long [`ApnsPeer::shutdown`] lets connections drain before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(10);

/// A local APNs endpoint speaking HTTP/2 over mutually authenticated TLS.
///
/// It validates requests like APNs, answers valid ones according to a swappable
/// [`Behavior`], and records what it saw so tests can assert on the exact wake-ups sent.
/// Dropping it also stops it, without waiting for connections to drain.
pub struct ApnsPeer {
    local_addr: SocketAddr,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

/// State shared by every connection and stream.
struct Shared {
    ledger: Arc<Ledger>,
    behavior: RwLock<Behavior>,
    trusted_client_certs: Vec<CertificateDer<'static>>,
    max_concurrent_streams: u32,
    goaway_after_streams: Option<u64>,
}

impl Shared {
    fn behavior(&self) -> Behavior {
        self.behavior
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An empty trust list trusts every certificate; otherwise only exact matches.
    fn trusts(&self, certificate: &CertificateDer<'_>) -> bool {
        self.trusted_client_certs.is_empty()
            || self
                .trusted_client_certs
                .iter()
                .any(|trusted| trusted.as_ref() == certificate.as_ref())
    }
}

/// Who is on the other end of a connection, decided once after the TLS handshake.
struct ClientIdentity {
    trusted: bool,
    topic: Option<String>,
}

impl ApnsPeer {
    /// Binds `127.0.0.1` on an ephemeral port with a freshly generated CA and server
    /// certificate, and starts serving.
    pub async fn start(config: PeerConfig) -> io::Result<ApnsPeer> {
        let identity = PeerIdentity::generate()?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            ledger: Arc::new(Ledger::default()),
            behavior: RwLock::new(config.behavior),
            trusted_client_certs: config.trusted_client_certs,
            max_concurrent_streams: config.max_concurrent_streams,
            goaway_after_streams: config.goaway_after_streams,
        });
        let (shutdown, shutdown_signal) = watch::channel(false);
        let acceptor = TlsAcceptor::from(Arc::clone(&identity.server_config));
        let accept_loop = tokio::spawn(accept_connections(
            listener,
            acceptor,
            Arc::clone(&shared),
            shutdown_signal,
        ));
        Ok(ApnsPeer {
            local_addr,
            ca_pem: identity.ca_pem,
            ca_der: identity.ca_der,
            shared,
            shutdown,
            accept_loop,
        })
    }

    /// Base URL to configure as the APNs endpoint, e.g. `https://127.0.0.1:49152`.
    pub fn url(&self) -> String {
        format!("https://{}", self.local_addr)
    }

    /// The address the peer listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// PEM of the CA that signed the peer's server certificate; the sender must trust it
    /// (Orchard's `--apns-ca`).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// DER of the same CA, for Rust clients building a root store directly.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// Replaces the answer policy; streams that already consulted the old one keep its answer.
    pub fn set_behavior(&self, behavior: Behavior) {
        *self
            .shared
            .behavior
            .write()
            .unwrap_or_else(PoisonError::into_inner) = behavior;
    }

    /// Requests answered `200`.
    pub fn push_count(&self) -> u64 {
        self.shared.ledger.push_count()
    }

    /// Requests received, whatever their answer (counted as soon as their headers arrive).
    pub fn request_count(&self) -> u64 {
        self.shared.ledger.request_count()
    }

    /// The most recent answers (up to [`crate::RECENT_CAPACITY`]), oldest first.
    pub fn recent(&self) -> Vec<RecordedPush> {
        self.shared.ledger.recent()
    }

    /// Receives every push answered `200` from now on.
    ///
    /// The channel holds [`crate::SUBSCRIPTION_CAPACITY`] records; when it is full further
    /// records are dropped (see [`ApnsPeer::subscription_drops`]) so a slow reader never
    /// slows the peer down.
    pub fn subscribe(&self) -> mpsc::Receiver<RecordedPush> {
        self.shared.ledger.subscribe()
    }

    /// Records lost because a subscription was full.
    pub fn subscription_drops(&self) -> u64 {
        self.shared.ledger.subscription_drops()
    }

    /// Connections whose TLS handshake completed.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.ledger.connections_accepted()
    }

    /// Connections currently established.
    pub fn open_connections(&self) -> u64 {
        self.shared.ledger.open_connections()
    }

    /// Highest number of simultaneously open streams on any one connection, which shows
    /// whether the sender honours the advertised `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub fn max_concurrent_streams_seen(&self) -> u64 {
        self.shared.ledger.max_concurrent_streams_seen()
    }

    /// Stops accepting, asks every connection to drain with `GOAWAY`, and waits for them
    /// (bounded by a short grace period after which they are cut).
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        if let Err(error) = self.accept_loop.await {
            debug!(%error, "APNs peer accept loop ended abnormally");
        }
    }
}

async fn accept_connections(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    connections.spawn(serve_connection(
                        tcp,
                        acceptor.clone(),
                        Arc::clone(&shared),
                        shutdown.clone(),
                    ));
                }
                Err(error) => {
                    debug!(%error, "APNs peer accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!("APNs peer connections did not drain in time; closing them");
    }
}

/// A request stream the client opened, with the handle to answer it.
type IncomingStream = (Request<RecvStream>, SendResponse<Bytes>);

/// What woke the connection loop.
enum ConnectionEvent {
    Opened(Box<IncomingStream>),
    Failed(h2::Error),
    Closed,
    StreamFinished,
    Shutdown,
}

impl ConnectionEvent {
    fn from_accept(accepted: Option<Result<IncomingStream, h2::Error>>) -> Self {
        match accepted {
            Some(Ok(stream)) => Self::Opened(Box::new(stream)),
            Some(Err(error)) => Self::Failed(error),
            None => Self::Closed,
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(error) = tcp.set_nodelay(true) {
        debug!(%error, "APNs peer could not disable Nagle");
    }
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(error) => {
            debug!(%error, "APNs peer TLS handshake failed");
            return;
        }
    };
    let client = match tls.get_ref().1.peer_certificates().and_then(<[_]>::first) {
        Some(certificate) => Arc::new(ClientIdentity {
            trusted: shared.trusts(certificate),
            topic: tls::client_topic(certificate),
        }),
        None => return,
    };
    let _open = shared.ledger.connection_opened();
    let mut connection = match h2::server::Builder::new()
        .max_concurrent_streams(shared.max_concurrent_streams)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(connection) => connection,
        Err(error) => {
            debug!(%error, "APNs peer HTTP/2 handshake failed");
            return;
        }
    };

    let open_streams = Arc::new(AtomicU64::new(0));
    let mut streams = JoinSet::new();
    let mut streams_accepted: u64 = 0;
    let mut draining = false;
    loop {
        let event = tokio::select! {
            next = connection.accept() => ConnectionEvent::from_accept(next),
            Some(_) = streams.join_next(), if !streams.is_empty() => ConnectionEvent::StreamFinished,
            _ = shutdown.changed(), if !draining => ConnectionEvent::Shutdown,
        };
        match event {
            ConnectionEvent::Opened(stream) => {
                let (request, respond) = *stream;
                shared.ledger.request_received();
                let slot = shared.ledger.stream_opened(&open_streams);
                streams.spawn(answer_stream(
                    request,
                    respond,
                    slot,
                    Arc::clone(&shared),
                    Arc::clone(&client),
                ));
                streams_accepted += 1;
                let limit_reached = shared
                    .goaway_after_streams
                    .is_some_and(|limit| streams_accepted >= limit);
                if limit_reached && !draining {
                    draining = true;
                    connection.graceful_shutdown();
                }
            }
            ConnectionEvent::Failed(error) => {
                debug!(%error, "APNs peer connection failed");
                break;
            }
            ConnectionEvent::Closed => break,
            ConnectionEvent::StreamFinished => {}
            ConnectionEvent::Shutdown => {
                draining = true;
                connection.graceful_shutdown();
            }
        }
    }
}

/// The answer to one stream, as sent and as recorded.
struct Answer {
    status: StatusCode,
    reason: Option<String>,
    timestamp_ms: Option<u64>,
}

impl Answer {
    fn accepted() -> Self {
        Self {
            status: StatusCode::OK,
            reason: None,
            timestamp_ms: None,
        }
    }

    fn rejected(status: u16, reason: &str, timestamp_ms: Option<u64>) -> Self {
        match StatusCode::from_u16(status) {
            Ok(status) => Self {
                status,
                reason: Some(reason.to_owned()),
                timestamp_ms,
            },
            Err(_) => Self::rejected(500, "InternalServerError", None),
        }
    }

    /// APNs error bodies are `{"reason": ..}`, with `"timestamp"` only where it applies.
    fn body(&self) -> Option<Bytes> {
        let reason = self.reason.as_deref()?;
        let mut body = serde_json::json!({ "reason": reason });
        if let Some(timestamp) = self.timestamp_ms {
            body["timestamp"] = timestamp.into();
        }
        Some(Bytes::from(body.to_string()))
    }
}

async fn answer_stream(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    slot: OpenStream,
    shared: Arc<Shared>,
    client: Arc<ClientIdentity>,
) {
    let (parts, body) = request.into_parts();
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(error) => {
            debug!(%error, "APNs peer lost a request body");
            return;
        }
    };
    let validated = if client.trusted {
        request::validate(
            &parts.method,
            parts.uri.path(),
            &parts.headers,
            &body,
            client.topic.as_deref(),
        )
    } else {
        Err(request::BAD_CERTIFICATE)
    };
    let answer = match validated {
        Ok(push) => {
            let outcome = shared.behavior().decide(&push);
            answer_after_delays(outcome).await
        }
        Err(Rejection { status, reason }) => Answer::rejected(status, reason, None),
    };

    let apns_id = response_apns_id(&parts.headers);
    shared.ledger.record_answer(RecordedPush {
        token_hex: request::token_in_path(parts.uri.path()).to_owned(),
        push_magic: request::push_magic(&body),
        topic: header_text(&parts.headers, "apns-topic"),
        apns_id: apns_id.clone(),
        status: answer.status.as_u16(),
        reason: answer.reason.clone(),
    });
    // The slot is released before the final frame is queued: once the client sees the
    // response it may reuse the slot, and that must never count as two open streams.
    drop(slot);
    if let Err(error) = send_answer(respond, &answer, &apns_id) {
        debug!(%error, "APNs peer could not send a response");
    }
}

/// Reads the whole request body, handing flow-control capacity back as it goes so large or
/// numerous bodies never stall the connection, but keeps only enough bytes to tell whether
/// the payload is over the APNs limit.
async fn read_body(mut body: RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut kept = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        let room = (MAX_PAYLOAD_BYTES + 1).saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    Ok(kept)
}

/// Sleeps through any scripted delays (only this stream waits) and returns the
/// final answer.
async fn answer_after_delays(mut outcome: Outcome) -> Answer {
    loop {
        match outcome {
            Outcome::Accept => return Answer::accepted(),
            Outcome::Reject {
                status,
                reason,
                timestamp_ms,
            } => return Answer::rejected(status, &reason, timestamp_ms),
            Outcome::Delay(delay, then) => {
                tokio::time::sleep(delay).await;
                outcome = *then;
            }
        }
    }
}

/// APNs echoes a well-formed `apns-id` and otherwise assigns one.
fn response_apns_id(headers: &HeaderMap) -> String {
    header_text(headers, "apns-id")
        .filter(|id| request::is_canonical_uuid(id))
        .unwrap_or_else(|| {
            Uuid::new_v4()
                .hyphenated()
                .encode_upper(&mut Uuid::encode_buffer())
                .to_owned()
        })
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn send_answer(
    mut respond: SendResponse<Bytes>,
    answer: &Answer,
    apns_id: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let body = answer.body();
    let mut response = Response::builder()
        .status(answer.status)
        .header("apns-id", apns_id);
    if body.is_some() {
        response = response.header("content-type", "application/json");
    }
    let response = response.body(())?;
    match body {
        None => {
            respond.send_response(response, true)?;
        }
        Some(body) => {
            respond
                .send_response(response, false)?
                .send_data(body, true)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_carry_the_reason_and_only_a_given_timestamp() {
        let plain = Answer::rejected(429, "TooManyRequests", None);
        assert_eq!(
            plain.body().as_deref(),
            Some(&br#"{"reason":"TooManyRequests"}"#[..])
        );
        let stamped = Answer::rejected(410, "Unregistered", Some(1_700_000_000_000));
        let parsed: serde_json::Value =
            serde_json::from_slice(&stamped.body().expect("body")).expect("json");
        assert_eq!(parsed["reason"], "Unregistered");
        assert_eq!(parsed["timestamp"], 1_700_000_000_000_u64);
    }

    #[test]
    fn success_has_no_body() {
        assert_eq!(Answer::accepted().body(), None);
    }

    #[test]
    fn an_impossible_status_becomes_an_internal_error() {
        let answer = Answer::rejected(1000, "Whatever", None);
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.reason.as_deref(), Some("InternalServerError"));
    }

    #[tokio::test]
    async fn nested_delays_resolve_to_the_innermost_outcome() {
        let outcome = Outcome::reject(503, "Shutdown")
            .after(Duration::from_millis(1))
            .after(Duration::from_millis(1));
        let answer = answer_after_delays(outcome).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.reason.as_deref(), Some("Shutdown"));
    }

    #[test]
    fn a_well_formed_apns_id_is_echoed_and_a_missing_one_is_generated() {
        let mut headers = HeaderMap::new();
        assert!(request::is_canonical_uuid(&response_apns_id(&headers)));
        headers.insert(
            "apns-id",
            http::HeaderValue::from_static("123e4567-e89b-12d3-a456-426614174000"),
        );
        assert_eq!(
            response_apns_id(&headers),
            "123e4567-e89b-12d3-a456-426614174000"
        );
    }
}
