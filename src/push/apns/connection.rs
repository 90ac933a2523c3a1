//! One long-lived HTTP/2 connection to APNs over TLS, authenticated with a topic's push
//! certificate. h2 queues requests beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS, so
//! waiting on `ready()` before each request is the concurrency limit; a driver task keeps
//! the connection alive with PINGs and notices GOAWAY or loss.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_rustls::TlsConnector;

/// Where APNs (or a local peer) listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `https://host[:port]` (port defaults to 443).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("APNs URL must start with https://, got {url}"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
                host,
                port.parse()
                    .map_err(|_| format!("bad port in APNs URL {url}"))?,
            ),
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("no host in APNs URL {url}"));
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}:{}{path}", self.host, self.port)
    }
}

/// What APNs answered for one push.
#[derive(Debug)]
pub struct ApnsResponse {
    pub status: u16,
    pub apns_id: Option<String>,
    pub body: Bytes,
}

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot connect to APNs: {0}")]
    Connect(String),
    #[error("APNs connection failed: {0}")]
    Http2(#[from] h2::Error),
    #[error("APNs did not answer within {0:?}")]
    Timeout(Duration),
}

/// A handle on a connection; clones share it.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Connection {
    pub async fn open(
        endpoint: &Endpoint,
        tls: Arc<rustls::ClientConfig>,
        keepalive: Duration,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Result<Connection, ConnectionError> {
        let connect_error = |e: &dyn std::fmt::Display| ConnectionError::Connect(e.to_string());
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| connect_error(&e))?;
        tcp.set_nodelay(true).map_err(|e| connect_error(&e))?;
        let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| connect_error(&e))?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| connect_error(&e))?;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake::<_, Bytes>(stream)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let pinger = connection.ping_pong();
        let driver_closed = Arc::clone(&closed);
        tokio::spawn(async move {
            match pinger {
                Some(pinger) => drive_with_keepalive(&mut connection, pinger, keepalive).await,
                None => {
                    let _ = (&mut connection).await;
                }
            }
            driver_closed.store(true, Ordering::Release);
            on_close();
        });
        Ok(Connection { sender, closed })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stop using this connection (its driver ends once in-flight streams finish).
    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Send one request and read the whole answer, within `deadline`.
    pub async fn send(
        &self,
        request: http::Request<()>,
        body: Bytes,
        deadline: Duration,
    ) -> Result<ApnsResponse, ConnectionError> {
        timeout(deadline, self.exchange(request, body))
            .await
            .map_err(|_| ConnectionError::Timeout(deadline))?
    }

    async fn exchange(
        &self,
        request: http::Request<()>,
        body: Bytes,
    ) -> Result<ApnsResponse, ConnectionError> {
        let mut sender = self.sender.clone().ready().await?;
        let (response, mut stream) = sender.send_request(request, false)?;
        stream.send_data(body, true)?;
        let (parts, mut body) = response.await?.into_parts();
        let mut bytes = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        Ok(ApnsResponse {
            status: parts.status.as_u16(),
            apns_id: parts
                .headers
                .get("apns-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: bytes.freeze(),
        })
    }
}

/// Poll the connection, and PING it every `interval`; a PING unanswered within
/// `interval` means the connection is dead.
async fn drive_with_keepalive<T>(
    connection: &mut h2::client::Connection<T, Bytes>,
    mut pinger: h2::PingPong,
    interval: Duration,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let next_ping = sleep(interval);
    tokio::pin!(next_ping);
    loop {
        tokio::select! {
            _ = &mut *connection => return,
            _ = &mut next_ping => {
                let pong = pinger.ping(h2::Ping::opaque());
                let deadline = sleep(interval);
                tokio::pin!(pong, deadline);
                tokio::select! {
                    _ = &mut *connection => return,
                    answered = &mut pong => if answered.is_err() { return },
                    _ = &mut deadline => {
                        tracing::warn!("APNs connection did not answer a PING; dropping it");
                        return;
                    }
                }
                next_ping.as_mut().reset(Instant::now() + interval);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_and_without_a_port() {
        assert_eq!(
            Endpoint::parse("https://api.push.apple.com").unwrap(),
            Endpoint {
                host: "api.push.apple.com".into(),
                port: 443
            }
        );
        let local = Endpoint::parse("https://127.0.0.1:2197/").unwrap();
        assert_eq!((local.host.as_str(), local.port), ("127.0.0.1", 2197));
        assert_eq!(
            local.url("/3/device/ab"),
            "https://127.0.0.1:2197/3/device/ab"
        );
        assert!(Endpoint::parse("http://api.push.apple.com").is_err());
        assert!(Endpoint::parse("https://host:notaport").is_err());
    }
}
