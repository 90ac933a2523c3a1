//! Posting one event: HTTP/1.1 over TCP, or over TLS (rustls with ring, the Mozilla roots
//! and `--webhook-ca`) for an `https://` URL. One connection per event
//! (`Connection: close`): events are sent one at a time per enrollment, and a fresh
//! connection needs no response framing beyond the status line, nor recovery from a
//! receiver that closed an idle one.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::event::{signature, CONTENT_TYPE, HMAC_HEADER};

/// Longest response head read looking for the status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// Where events go: `--webhook-url`, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    pub tls: bool,
    /// Host name or address, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// Path and query, `/` at least.
    pub target: String,
    /// The `Host` header: the authority as given.
    pub authority: String,
}

impl WebhookUrl {
    pub fn parse(url: &str) -> Result<WebhookUrl, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL ({e}): {url}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("use an http:// or https:// URL, got {url}")),
        };
        let authority = uri.authority().ok_or_else(|| format!("no host in {url}"))?;
        if authority.as_str().contains('@') {
            return Err(format!("credentials in the URL are not supported: {url}"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let target = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(WebhookUrl {
            tls,
            host,
            port,
            target: if target.is_empty() {
                "/".into()
            } else {
                target
            },
            authority: authority.as_str().to_string(),
        })
    }
}

/// Why a post did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("while sending or reading: {0}")]
    Io(std::io::Error),
    #[error("the receiver answered something that is not HTTP/1.x")]
    NotHttp,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl PostError {
    /// Metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            PostError::Connect(_) => "connect",
            PostError::Tls(_) => "tls",
            PostError::Io(_) => "io",
            PostError::NotHttp => "not_http",
            PostError::Timeout(_) => "timeout",
        }
    }
}

/// Posts events to one URL, signing them when a key is set.
pub struct Client {
    url: WebhookUrl,
    hmac_key: Option<Vec<u8>>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

impl Client {
    /// An `https://` receiver's certificate must chain to a Mozilla root or to one of
    /// `extra_roots` (`--webhook-ca`).
    pub fn new(
        url: WebhookUrl,
        hmac_key: Option<Vec<u8>>,
        timeout: Duration,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<Client, String> {
        let tls = match url.tls {
            false => None,
            true => {
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|e| format!("webhook host {}: {e}", url.host))?;
                Some((TlsConnector::from(Arc::new(tls_config(extra_roots)?)), name))
            }
        };
        Ok(Client {
            url,
            hmac_key,
            tls,
            timeout,
        })
    }

    /// POST `body`; the receiver's status code, or why there is none.
    pub async fn post(&self, body: &[u8]) -> Result<u16, PostError> {
        tokio::time::timeout(self.timeout, self.exchange(body))
            .await
            .map_err(|_| PostError::Timeout(self.timeout))?
    }

    async fn exchange(&self, body: &[u8]) -> Result<u16, PostError> {
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(PostError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.send(tcp, body).await,
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(PostError::Tls)?;
                self.send(stream, body).await
            }
        }
    }

    async fn send<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        body: &[u8],
    ) -> Result<u16, PostError> {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: orchard\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.url.target,
            self.url.authority,
            body.len()
        );
        if let Some(key) = &self.hmac_key {
            head.push_str(&format!("{HMAC_HEADER}: {}\r\n", signature(key, body)));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(PostError::Io)?;
        stream.write_all(body).await.map_err(PostError::Io)?;
        stream.flush().await.map_err(PostError::Io)?;
        read_status(&mut stream).await
    }
}

/// The status code of the response's first line.
async fn read_status<S: AsyncRead + Unpin>(stream: &mut S) -> Result<u16, PostError> {
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&head[..end]).ok_or(PostError::NotHttp);
        }
        if head.len() > MAX_STATUS_LINE {
            return Err(PostError::NotHttp);
        }
        let read = stream.read(&mut chunk).await.map_err(PostError::Io)?;
        if read == 0 {
            return Err(PostError::NotHttp);
        }
        head.extend_from_slice(&chunk[..read]);
    }
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then_some(())?;
    code.parse().ok()
}

fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, String> {
    let roots = crate::outbound_tls::trusted_roots(extra_roots, "--webhook-ca")?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_and_target() {
        let url = WebhookUrl::parse("https://hooks.example.com/mdm/events?x=1").unwrap();
        assert!(url.tls);
        assert_eq!((url.host.as_str(), url.port), ("hooks.example.com", 443));
        assert_eq!(url.target, "/mdm/events?x=1");
        let url = WebhookUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 8080));
        assert_eq!(
            (url.target.as_str(), url.authority.as_str()),
            ("/", "[::1]:8080")
        );
    }

    #[test]
    fn other_schemes_and_credentials_are_refused() {
        assert!(WebhookUrl::parse("ftp://example.com/").is_err());
        assert!(WebhookUrl::parse("example.com/hook").is_err());
        assert!(WebhookUrl::parse("http://user:pw@example.com/").is_err());
    }

    #[test]
    fn status_lines_are_read_strictly() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK"), None);
    }
}
