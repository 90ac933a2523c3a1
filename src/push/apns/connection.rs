//! Where APNs listens, and opening a connection to it: TLS with the topic's push
//! certificate, then the shared HTTP/2 client connection (`crate::h2conn`).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use crate::h2conn::Connection;

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

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot connect to APNs: {0}")]
    Connect(String),
    #[error("APNs connection failed: {0}")]
    Handshake(#[from] h2::Error),
}

/// One HTTP/2 connection to APNs over TLS, authenticated with a topic's push certificate.
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
    Ok(Connection::handshake(stream, keepalive, on_close).await?)
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
