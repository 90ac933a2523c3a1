//! The peer driven by a real HTTP/2-over-TLS client presenting a push certificate, the way
//! Orchard talks to APNs.

use std::error::Error;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apns_peer::{ApnsPeer, Behavior, Outcome, PeerConfig, PushRequest, MAX_PAYLOAD_BYTES};
use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;
type H2Connection = Connection<TlsStream<TcpStream>, Bytes>;

const TOPIC: &str = "com.apple.mgmt.External.test";
const TOKEN: &str = "8f3c2a1b0d9e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
const UID_OID: [u64; 7] = [0, 9, 2342, 19200300, 100, 1, 1];

/// An MDM push certificate: subject UID carries the topic.
struct PushCertificate {
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn push_certificate(topic: &str) -> PushCertificate {
    let key = KeyPair::generate().expect("key pair");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("APSP:{topic}"));
    params
        .distinguished_name
        .push(DnType::CustomDnType(UID_OID.to_vec()), topic);
    let cert = params.self_signed(&key).expect("certificate");
    PushCertificate {
        der: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn client_config(
    peer: &ApnsPeer,
    identity: Option<&PushCertificate>,
    versions: &[&'static SupportedProtocolVersion],
) -> TestResult<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(peer.ca_pem().as_bytes())?)?;
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)?
            .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => {
            builder.with_client_auth_cert(vec![identity.der.clone()], identity.key.clone_key())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

async fn connect_with(
    peer: &ApnsPeer,
    identity: Option<&PushCertificate>,
    versions: &[&'static SupportedProtocolVersion],
) -> TestResult<(SendRequest<Bytes>, H2Connection)> {
    let connector = TlsConnector::from(client_config(peer, identity, versions)?);
    let tcp = TcpStream::connect(peer.local_addr()).await?;
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    Ok(h2::client::handshake(tls).await?)
}

async fn connect(
    peer: &ApnsPeer,
    identity: &PushCertificate,
) -> TestResult<(SendRequest<Bytes>, H2Connection)> {
    connect_with(peer, Some(identity), rustls::DEFAULT_VERSIONS).await
}

/// Connects and drives the connection in the background; the handle resolves when the
/// connection ends.
async fn connect_driven(
    peer: &ApnsPeer,
    identity: &PushCertificate,
) -> TestResult<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>)> {
    let (send, connection) = connect(peer, identity).await?;
    Ok((send, tokio::spawn(connection)))
}

/// Fails the test instead of hanging when the peer never answers.
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("the peer answers within 10 s")
}

struct Reply {
    status: u16,
    apns_id: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON error body")
    }

    fn reason(&self) -> String {
        self.json()["reason"]
            .as_str()
            .expect("reason string")
            .to_owned()
    }
}

fn mdm_request(peer: &ApnsPeer, token: &str) -> http::request::Builder {
    http::Request::builder()
        .method("POST")
        .uri(format!("{}/3/device/{token}", peer.url()))
        .header("apns-topic", TOPIC)
        .header("apns-push-type", "mdm")
        .header("apns-priority", "10")
        .header("apns-expiration", "0")
        .header("content-type", "application/json")
}

fn mdm_body(push_magic: &str) -> Vec<u8> {
    serde_json::json!({ "mdm": push_magic })
        .to_string()
        .into_bytes()
}

async fn send(
    client: &SendRequest<Bytes>,
    request: http::request::Builder,
    body: Vec<u8>,
) -> TestResult<Reply> {
    let mut client = client.clone().ready().await?;
    let (response, mut stream) = client.send_request(request.body(())?, body.is_empty())?;
    if !body.is_empty() {
        stream.send_data(Bytes::from(body), true)?;
    }
    let response = response.await?;
    let status = response.status().as_u16();
    let apns_id = response
        .headers()
        .get("apns-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let mut received = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = received.data().await {
        let chunk = chunk?;
        received.flow_control().release_capacity(chunk.len())?;
        body.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status,
        apns_id,
        body,
    })
}

async fn push(client: &SendRequest<Bytes>, peer: &ApnsPeer, token: &str) -> TestResult<Reply> {
    send(client, mdm_request(peer, token), mdm_body("magic")).await
}

fn is_canonical_uuid(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::try_parse(id).is_ok()
}

#[tokio::test]
async fn an_accepted_push_is_answered_200_and_recorded_with_its_push_magic() -> TestResult {
    let seen = Arc::new(Mutex::new(Vec::<PushRequest>::new()));
    let seen_by_peer = Arc::clone(&seen);
    let peer = ApnsPeer::start(PeerConfig {
        behavior: Behavior::from_fn(move |request| {
            seen_by_peer.lock().expect("lock").push(request.clone());
            Outcome::Accept
        }),
        ..PeerConfig::default()
    })
    .await?;
    let identity = push_certificate(TOPIC);
    let (client, _connection) = connect_driven(&peer, &identity).await?;

    let reply = within(send(
        &client,
        mdm_request(&peer, TOKEN),
        mdm_body("magic-1"),
    ))
    .await?;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());
    let generated_id = reply.apns_id.expect("apns-id header");
    assert!(is_canonical_uuid(&generated_id), "{generated_id}");

    let chosen_id = "5A6B7C8D-1111-2222-3333-444455556666";
    let echoed = within(send(
        &client,
        mdm_request(&peer, TOKEN).header("apns-id", chosen_id),
        mdm_body("magic-2"),
    ))
    .await?;
    assert_eq!(echoed.apns_id.as_deref(), Some(chosen_id));

    assert_eq!(peer.push_count(), 2);
    assert_eq!(peer.request_count(), 2);
    assert_eq!(peer.connections_accepted(), 1);
    assert_eq!(peer.open_connections(), 1);
    let recent = peer.recent();
    assert_eq!(recent.len(), 2);
    assert_eq!(recent[0].token_hex, TOKEN);
    assert_eq!(recent[0].push_magic.as_deref(), Some("magic-1"));
    assert_eq!(recent[0].topic.as_deref(), Some(TOPIC));
    assert_eq!(recent[0].apns_id, generated_id);
    assert_eq!(recent[0].status, 200);
    assert_eq!(recent[1].apns_id, chosen_id);

    let seen = seen.lock().expect("lock");
    assert_eq!(seen[0].client_topic.as_deref(), Some(TOPIC));
    assert_eq!(seen[0].push_type.as_deref(), Some("mdm"));
    assert_eq!(seen[0].priority.as_deref(), Some("10"));
    assert_eq!(seen[0].expiration.as_deref(), Some("0"));
    assert_eq!(seen[1].apns_id.as_deref(), Some(chosen_id));
    Ok(())
}

#[tokio::test]
async fn malformed_requests_get_the_apns_error_for_their_first_problem() -> TestResult {
    let peer = ApnsPeer::start(PeerConfig::default()).await?;
    let identity = push_certificate(TOPIC);
    let (client, _connection) = connect_driven(&peer, &identity).await?;
    let url = peer.url();

    let cases: Vec<(http::request::Builder, Vec<u8>, u16, &str)> = vec![
        (
            mdm_request(&peer, TOKEN).method("GET"),
            mdm_body("m"),
            405,
            "MethodNotAllowed",
        ),
        (
            mdm_request(&peer, TOKEN).uri(format!("{url}/3/notdevice/{TOKEN}")),
            mdm_body("m"),
            404,
            "BadPath",
        ),
        (
            mdm_request(&peer, "abc"),
            mdm_body("m"),
            400,
            "BadDeviceToken",
        ),
        (
            mdm_request(&peer, "zz"),
            mdm_body("m"),
            400,
            "BadDeviceToken",
        ),
        (
            mdm_request(&peer, TOKEN).header("apns-push-type", "mdm-ish"),
            mdm_body("m"),
            400,
            "DuplicateHeaders",
        ),
        (
            http::Request::builder()
                .method("POST")
                .uri(format!("{url}/3/device/{TOKEN}"))
                .header("apns-push-type", "wake"),
            mdm_body("m"),
            400,
            "InvalidPushType",
        ),
        (
            http::Request::builder()
                .method("POST")
                .uri(format!("{url}/3/device/{TOKEN}"))
                .header("apns-topic", "com.apple.mgmt.External.someone-else"),
            mdm_body("m"),
            400,
            "TopicDisallowed",
        ),
        (mdm_request(&peer, TOKEN), Vec::new(), 400, "PayloadEmpty"),
        (
            mdm_request(&peer, TOKEN),
            b"[\"mdm\"]".to_vec(),
            400,
            "BadPayload",
        ),
        (
            mdm_request(&peer, TOKEN),
            vec![b' '; MAX_PAYLOAD_BYTES + 1],
            413,
            "PayloadTooLarge",
        ),
    ];
    let expected_requests = cases.len() as u64;
    for (request, body, status, reason) in cases {
        let reply = within(send(&client, request, body)).await?;
        assert_eq!((reply.status, reply.reason().as_str()), (status, reason));
        assert!(reply.json().get("timestamp").is_none());
        assert!(reply.apns_id.is_some());
    }

    assert_eq!(peer.push_count(), 0);
    assert_eq!(peer.request_count(), expected_requests);
    assert!(peer.recent().iter().all(|answer| answer.status != 200));
    Ok(())
}

#[tokio::test]
async fn scripted_rejections_are_answered_as_apns_errors() -> TestResult {
    const UNREGISTERED_AT: u64 = 1_700_000_000_123;
    let peer = ApnsPeer::start(PeerConfig::default()).await?;
    peer.set_behavior(Behavior::from_fn(|request| {
        match request.token_hex.as_str() {
            "aa" => Outcome::unregistered(UNREGISTERED_AT),
            "bb" => Outcome::reject(429, "TooManyRequests"),
            "cc" => Outcome::reject(500, "InternalServerError"),
            "dd" => Outcome::reject(503, "ServiceUnavailable"),
            _ => Outcome::Accept,
        }
    }));
    let identity = push_certificate(TOPIC);
    let (client, _connection) = connect_driven(&peer, &identity).await?;

    let gone = within(push(&client, &peer, "aa")).await?;
    assert_eq!((gone.status, gone.reason().as_str()), (410, "Unregistered"));
    assert_eq!(gone.json()["timestamp"], UNREGISTERED_AT);

    for (token, status, reason) in [
        ("bb", 429, "TooManyRequests"),
        ("cc", 500, "InternalServerError"),
        ("dd", 503, "ServiceUnavailable"),
    ] {
        let reply = within(push(&client, &peer, token)).await?;
        assert_eq!((reply.status, reply.reason().as_str()), (status, reason));
        assert!(reply.json().get("timestamp").is_none());
    }

    assert_eq!(within(push(&client, &peer, "ee")).await?.status, 200);
    assert_eq!(peer.push_count(), 1);
    let statuses: Vec<u16> = peer.recent().iter().map(|answer| answer.status).collect();
    assert_eq!(statuses, [410, 429, 500, 503, 200]);
    assert_eq!(peer.recent()[0].reason.as_deref(), Some("Unregistered"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_answer_does_not_hold_up_other_streams() -> TestResult {
    const DELAY: Duration = Duration::from_millis(400);
    let peer = ApnsPeer::start(PeerConfig {
        behavior: Behavior::from_fn(|request| {
            if request.token_hex == "aa" {
                Outcome::Accept.after(DELAY)
            } else {
                Outcome::Accept
            }
        }),
        ..PeerConfig::default()
    })
    .await?;
    let identity = push_certificate(TOPIC);
    let (client, _connection) = connect_driven(&peer, &identity).await?;
    let peer = Arc::new(peer);

    let started = Instant::now();
    let slow = tokio::spawn({
        let client = client.clone();
        let peer = Arc::clone(&peer);
        async move { push(&client, &peer, "aa").await.map(|reply| reply.status) }
    });
    let quick = within(push(&client, &peer, "bb")).await?;
    assert_eq!(quick.status, 200);
    assert!(!slow.is_finished(), "the delayed stream is still waiting");

    assert_eq!(within(slow).await??, 200);
    assert!(started.elapsed() >= DELAY);
    assert_eq!(peer.push_count(), 2);
    Ok(())
}

#[tokio::test]
async fn an_untrusted_push_certificate_gets_bad_certificate_on_every_request() -> TestResult {
    let trusted = push_certificate(TOPIC);
    let stranger = push_certificate(TOPIC);
    let peer = ApnsPeer::start(PeerConfig {
        trusted_client_certs: vec![trusted.der.clone()],
        ..PeerConfig::default()
    })
    .await?;

    let (untrusted_client, _untrusted_connection) = connect_driven(&peer, &stranger).await?;
    for _ in 0..2 {
        let reply = within(push(&untrusted_client, &peer, TOKEN)).await?;
        assert_eq!(
            (reply.status, reply.reason().as_str()),
            (403, "BadCertificate")
        );
    }

    let (trusted_client, _trusted_connection) = connect_driven(&peer, &trusted).await?;
    assert_eq!(
        within(push(&trusted_client, &peer, TOKEN)).await?.status,
        200
    );
    assert_eq!(peer.push_count(), 1);
    assert_eq!(peer.connections_accepted(), 2);
    Ok(())
}

#[tokio::test]
async fn tls_1_2_clients_authenticate_with_their_certificate_too() -> TestResult {
    let peer = ApnsPeer::start(PeerConfig::default()).await?;
    let identity = push_certificate(TOPIC);
    let (client, connection) =
        connect_with(&peer, Some(&identity), &[&rustls::version::TLS12]).await?;
    let _connection = tokio::spawn(connection);
    assert_eq!(within(push(&client, &peer, TOKEN)).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn a_client_without_certificate_cannot_connect() -> TestResult {
    let peer = ApnsPeer::start(PeerConfig::default()).await?;

    // With TLS 1.3 the client only learns of the refusal after its own handshake finished,
    // so the failure may surface at any step up to the first response.
    let attempt: TestResult<Reply> = within(async {
        let (client, connection) = connect_with(&peer, None, rustls::DEFAULT_VERSIONS).await?;
        let _connection = tokio::spawn(connection);
        push(&client, &peer, TOKEN).await
    })
    .await;
    assert!(attempt.is_err(), "the peer refused the anonymous client");
    assert_eq!(peer.connections_accepted(), 0);
    assert_eq!(peer.request_count(), 0);
    Ok(())
}

#[tokio::test]
async fn goaway_after_the_configured_streams_closes_the_connection_gracefully() -> TestResult {
    let peer = ApnsPeer::start(PeerConfig {
        goaway_after_streams: Some(2),
        ..PeerConfig::default()
    })
    .await?;
    let identity = push_certificate(TOPIC);
    let (client, connection) = connect_driven(&peer, &identity).await?;

    assert_eq!(within(push(&client, &peer, TOKEN)).await?.status, 200);
    assert_eq!(within(push(&client, &peer, TOKEN)).await?.status, 200);
    within(connection).await??;
    assert!(push(&client, &peer, TOKEN).await.is_err());

    let (reconnected, _connection) = connect_driven(&peer, &identity).await?;
    assert_eq!(within(push(&reconnected, &peer, TOKEN)).await?.status, 200);
    assert_eq!(peer.connections_accepted(), 2);
    assert_eq!(peer.push_count(), 3);
    Ok(())
}

#[tokio::test]
async fn streams_in_flight_at_goaway_are_still_answered() -> TestResult {
    let peer = ApnsPeer::start(PeerConfig {
        goaway_after_streams: Some(1),
        behavior: Behavior::from_fn(|_| Outcome::Accept.after(Duration::from_millis(300))),
        ..PeerConfig::default()
    })
    .await?;
    let identity = push_certificate(TOPIC);
    let (client, connection) = connect_driven(&peer, &identity).await?;

    let reply = within(push(&client, &peer, TOKEN)).await?;
    assert_eq!(reply.status, 200);
    within(connection).await??;
    assert_eq!(peer.push_count(), 1);
    within(async {
        while peer.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    Ok(())
}

/// Fires `count` pushes at once over one connection and returns their statuses.
async fn concurrent_pushes(
    client: &SendRequest<Bytes>,
    peer: &Arc<ApnsPeer>,
    count: usize,
) -> TestResult<Vec<u16>> {
    let mut pushes = JoinSet::new();
    for index in 0..count {
        let client = client.clone();
        let peer = Arc::clone(peer);
        pushes.spawn(async move {
            let token = format!("{index:04x}");
            push(&client, &peer, &token).await.map(|reply| reply.status)
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = pushes.join_next().await {
        statuses.push(status??);
    }
    Ok(statuses)
}

fn slow_accept() -> Behavior {
    Behavior::from_fn(|_| Outcome::Accept.after(Duration::from_millis(20)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_limit_of_one_is_advertised_and_never_exceeded() -> TestResult {
    let peer = Arc::new(
        ApnsPeer::start(PeerConfig {
            max_concurrent_streams: 1,
            behavior: slow_accept(),
            ..PeerConfig::default()
        })
        .await?,
    );
    let identity = push_certificate(TOPIC);
    let (client, connection) = connect(&peer, &identity).await?;
    let mut connection = Box::pin(connection);

    // The first answer proves the peer's SETTINGS frame has been processed.
    let first = within(async {
        tokio::select! {
            reply = push(&client, &peer, TOKEN) => reply,
            ended = &mut connection => Err(format!("connection ended early: {ended:?}").into()),
        }
    })
    .await?;
    assert_eq!(first.status, 200);
    assert_eq!(connection.max_concurrent_send_streams(), 1);
    let _connection = tokio::spawn(connection);

    let statuses = within(concurrent_pushes(&client, &peer, 20)).await?;
    assert!(statuses.iter().all(|status| *status == 200));
    assert_eq!(peer.push_count(), 21);
    assert_eq!(peer.max_concurrent_streams_seen(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_are_measured_when_the_limit_allows_them() -> TestResult {
    let peer = Arc::new(
        ApnsPeer::start(PeerConfig {
            behavior: slow_accept(),
            ..PeerConfig::default()
        })
        .await?,
    );
    let identity = push_certificate(TOPIC);
    let (client, _connection) = connect_driven(&peer, &identity).await?;

    let statuses = within(concurrent_pushes(&client, &peer, 20)).await?;
    assert!(statuses.iter().all(|status| *status == 200));
    assert!(peer.max_concurrent_streams_seen() > 1);
    assert!(peer.max_concurrent_streams_seen() <= 20);
    Ok(())
}

#[tokio::test]
async fn subscribers_receive_every_accepted_push_in_order() -> TestResult {
    let peer = ApnsPeer::start(PeerConfig {
        behavior: Behavior::from_fn(|request| {
            if request.token_hex == "dead" {
                Outcome::unregistered(1)
            } else {
                Outcome::Accept
            }
        }),
        ..PeerConfig::default()
    })
    .await?;
    let mut pushes = peer.subscribe();
    let identity = push_certificate(TOPIC);
    let (client, _connection) = connect_driven(&peer, &identity).await?;

    for (token, magic) in [("aa", "first"), ("dead", "ignored"), ("bb", "second")] {
        within(send(&client, mdm_request(&peer, token), mdm_body(magic))).await?;
    }

    let first = within(pushes.recv()).await.expect("first push");
    let second = within(pushes.recv()).await.expect("second push");
    assert_eq!(
        (first.token_hex.as_str(), first.push_magic.as_deref()),
        ("aa", Some("first"))
    );
    assert_eq!(
        (second.token_hex.as_str(), second.push_magic.as_deref()),
        ("bb", Some("second"))
    );
    assert!(pushes.try_recv().is_err());
    assert_eq!(peer.subscription_drops(), 0);
    Ok(())
}

#[tokio::test]
async fn shutdown_drains_connections_and_stops_listening() -> TestResult {
    let peer = ApnsPeer::start(PeerConfig::default()).await?;
    let address = peer.local_addr();
    let identity = push_certificate(TOPIC);
    let (client, connection) = connect_driven(&peer, &identity).await?;
    assert_eq!(within(push(&client, &peer, TOKEN)).await?.status, 200);

    within(peer.shutdown()).await;
    within(connection).await??;
    assert!(TcpStream::connect(address).await.is_err());
    Ok(())
}
