//! One long-lived HTTP/2 client connection over any byte stream: APNs over TLS, and the
//! nodes of a cluster talking to each other over plain TCP. h2 queues requests beyond the
//! peer's SETTINGS_MAX_CONCURRENT_STREAMS, so waiting on `ready()` before each request is
//! the concurrency limit; a driver task keeps the connection alive with PINGs and notices
//! GOAWAY or loss.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep, timeout, Instant};

/// What the peer answered to one request.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why a request on an open connection did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A handle on a connection; clones share it.
#[derive(Clone)]
pub struct Connection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// Speak HTTP/2 over `stream` (already connected, TLS done if any). The driver task
    /// runs on the current runtime; `on_close` runs when the connection ends.
    pub async fn handshake<T>(
        stream: T,
        keepalive: Duration,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Result<Connection, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
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
    ) -> Result<Response, ExchangeError> {
        timeout(deadline, self.exchange(request, body))
            .await
            .map_err(|_| ExchangeError::Timeout(deadline))?
    }

    async fn exchange(
        &self,
        request: http::Request<()>,
        body: Bytes,
    ) -> Result<Response, ExchangeError> {
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
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
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
    T: AsyncRead + AsyncWrite + Unpin,
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
                        tracing::warn!("HTTP/2 connection did not answer a PING; dropping it");
                        return;
                    }
                }
                next_ping.as_mut().reset(Instant::now() + interval);
            }
        }
    }
}
