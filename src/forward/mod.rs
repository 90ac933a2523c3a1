//! Node-to-node calls: how a request that reached one node of a cluster gets to the node
//! that owns the device, and how that node knows the request came from a peer.
//!
//! * `signature.rs` (pure): the cluster secret's HMAC over every internal request — the
//!   method, path, the device identity the sending node verified, and the body. Routes
//!   under `/internal/` (`http/internal.rs`) refuse anything unsigned with 403.
//! * [`Forwarder`] (here): one multiplexed HTTP/2 connection per peer (cleartext h2, kept
//!   alive with PINGs, reopened when lost), signed requests with a deadline, and the
//!   metrics of every forward. It implements [`crate::device::Peers`], through which the
//!   registry reaches actors on other nodes; device requests are forwarded whole by
//!   `http/device.rs`.
//!
//! Who owns what comes from `crate::cluster::ClusterNode`; a forward never decides
//! ownership, it only follows it (and asks again once when the owner refuses).

mod signature;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::net::TcpStream;

pub use signature::{ClusterKey, Signed, FINGERPRINT_HEADER, SIGNATURE_HEADER};

use crate::cluster::{ClusterNode, Route, ShardId};
use crate::device::Peers;
use crate::h2conn::{Connection, Response};
use crate::identity::CertFingerprint;

/// The least time a peer gets to answer one forwarded request (a batch of 2,000 actor
/// messages included). Beyond a lease it does not get longer: a peer silent that long is
/// judged dead and its shards move, so the request is better routed again.
const MIN_FORWARD_DEADLINE: Duration = Duration::from_secs(5);

/// PING interval on idle peer connections.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// A peer's advertised base URL, `http://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUrl {
    pub host: String,
    pub port: u16,
}

impl PeerUrl {
    /// Node-to-node calls are cleartext HTTP/2: TLS for devices ends at the proxy or the
    /// load balancer, and peers authenticate each request with the cluster secret.
    pub fn parse(url: &str) -> Result<PeerUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("a node's advertise URL must start with http://, got {url}"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("the advertise URL {url} has no port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("bad port in the advertise URL {url}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("no host in the advertise URL {url}"));
        }
        Ok(PeerUrl {
            host: host.to_string(),
            port,
        })
    }
}

/// One request to a peer.
pub struct Outgoing<'a> {
    pub method: http::Method,
    pub path_and_query: &'a str,
    /// The device identity this node verified, for the owner to check the binding with.
    pub fingerprint: Option<&'a CertFingerprint>,
    pub content_type: Option<&'a str>,
    pub body: Bytes,
    /// Metrics label: which kind of request is forwarded.
    pub route: &'static str,
}

/// Why a forward got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot reach peer {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("peer {url} did not answer: {reason}")]
    NoAnswer { url: String, reason: String },
}

/// The client side of node-to-node calls.
pub struct Forwarder {
    node: Arc<ClusterNode>,
    key: ClusterKey,
    deadline: Duration,
    connections: DashMap<String, Arc<tokio::sync::Mutex<Option<Connection>>>>,
}

impl Forwarder {
    pub fn new(node: Arc<ClusterNode>, secret: &str) -> Arc<Self> {
        Arc::new(Forwarder {
            deadline: node.lease().max(MIN_FORWARD_DEADLINE),
            node,
            key: ClusterKey::new(secret),
            connections: DashMap::new(),
        })
    }

    /// The node whose view of the cluster routes the forwards.
    pub fn node(&self) -> &Arc<ClusterNode> {
        &self.node
    }

    /// The key internal routes verify with.
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// Sign and send one request to the node at `url`; answers whatever it answered.
    pub async fn send(&self, url: &str, out: Outgoing<'_>) -> Result<Response, ForwardError> {
        let started = Instant::now();
        let result = self.exchange(url, &out).await;
        let outcome = match &result {
            Ok(response) => status_class(response.status),
            Err(ForwardError::Unreachable { .. }) => "unreachable",
            Err(ForwardError::NoAnswer { .. }) => "no_answer",
        };
        metrics::counter!("orchard_forwarded_requests_total", "route" => out.route, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("orchard_forward_duration_seconds", "route" => out.route)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::warn!(route = out.route, error = %e, "forward failed");
        }
        result
    }

    async fn exchange(&self, url: &str, out: &Outgoing<'_>) -> Result<Response, ForwardError> {
        let connection = self.connection(url).await?;
        let signature = self.key.sign(Signed {
            method: out.method.as_str(),
            path_and_query: out.path_and_query,
            fingerprint: out.fingerprint,
            body: &out.body,
        });
        let mut request = http::Request::builder()
            .method(out.method.clone())
            .uri(format!(
                "{}{}",
                url.trim_end_matches('/'),
                out.path_and_query
            ))
            .header(SIGNATURE_HEADER, signature);
        if let Some(fingerprint) = out.fingerprint {
            request = request.header(FINGERPRINT_HEADER, hex::encode(fingerprint));
        }
        if let Some(content_type) = out.content_type {
            request = request.header(http::header::CONTENT_TYPE, content_type);
        }
        let request = request.body(()).map_err(|e| ForwardError::NoAnswer {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        connection
            .send(request, out.body.clone(), self.deadline)
            .await
            .map_err(|e| {
                connection.mark_closed();
                ForwardError::NoAnswer {
                    url: url.to_string(),
                    reason: e.to_string(),
                }
            })
    }

    /// The open connection to `url`, opening it if there is none (one at a time per peer).
    async fn connection(&self, url: &str) -> Result<Connection, ForwardError> {
        let slot = self.connections.entry(url.to_string()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(connection.clone());
        }
        let unreachable = |reason: String| ForwardError::Unreachable {
            url: url.to_string(),
            reason,
        };
        let peer = PeerUrl::parse(url).map_err(unreachable)?;
        let tcp = TcpStream::connect((peer.host.as_str(), peer.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| unreachable(e.to_string()))?;
        let connection = Connection::handshake(tcp, KEEPALIVE, || {
            metrics::gauge!("orchard_peer_connections").decrement(1.0);
        })
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        metrics::gauge!("orchard_peer_connections").increment(1.0);
        tracing::info!(peer = url, "connected to peer node");
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        421 => "misdirected",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The path of the internal route that answers batches of one actor message kind.
pub fn actors_path(kind: &str) -> String {
    format!("/internal/actors/{kind}")
}

#[async_trait]
impl Peers for Forwarder {
    fn route(&self, shard: ShardId) -> Route {
        self.node.route(shard)
    }

    async fn reroute(&self, shard: ShardId) -> Route {
        self.node.reroute(shard).await
    }

    async fn deliver(&self, url: &str, kind: &'static str, batch: Bytes) -> Result<Bytes, String> {
        self.post_json(url, &actors_path(kind), "actors", batch)
            .await
    }

    async fn push(&self, url: &str, targets: Bytes) -> Result<Bytes, String> {
        self.post_json(url, PUSH_PATH, "push", targets).await
    }

    fn other_nodes(&self) -> Vec<String> {
        let (nodes, _) = self.node.status();
        nodes
            .into_iter()
            .filter(|node| node.alive && node.node_id != self.node.node_id())
            .map(|node| node.advertise_url)
            .collect()
    }

    async fn fleet_part(&self, url: &str, view: Bytes) -> Result<Bytes, String> {
        self.post_json(url, FLEET_PATH, "fleet", view).await
    }
}

/// The internal route that pushes a node's own devices.
pub const PUSH_PATH: &str = "/internal/push";

/// The internal route that answers a node's part of a fleet view.
pub const FLEET_PATH: &str = "/internal/fleet";

impl Forwarder {
    /// POST a JSON body to a peer; its body when it answered 200.
    async fn post_json(
        &self,
        url: &str,
        path: &str,
        route: &'static str,
        body: Bytes,
    ) -> Result<Bytes, String> {
        let outgoing = Outgoing {
            method: http::Method::POST,
            path_and_query: path,
            fingerprint: None,
            content_type: Some("application/json"),
            body,
            route,
        };
        let response = self.send(url, outgoing).await.map_err(|e| e.to_string())?;
        match response.status {
            200 => Ok(response.body),
            status => Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&response.body)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_urls_are_cleartext_with_a_port() {
        assert_eq!(
            PeerUrl::parse("http://10.0.0.7:8080").unwrap(),
            PeerUrl {
                host: "10.0.0.7".into(),
                port: 8080
            }
        );
        assert_eq!(
            PeerUrl::parse("http://orchard-1.orchard:8080/")
                .unwrap()
                .host,
            "orchard-1.orchard"
        );
        assert_eq!(PeerUrl::parse("http://[::1]:9").unwrap().host, "::1");
        assert!(PeerUrl::parse("https://10.0.0.7:8443").is_err());
        assert!(PeerUrl::parse("http://10.0.0.7").is_err());
        assert!(PeerUrl::parse("http://:80").is_err());
    }
}
