//! Webhook events, end to end: a real HTTP receiver in this process gets what the real
//! `orchard` binary posts for real device messages, and reads it with the shapes of
//! NanoMDM's webhook (`tests/fixtures/nanomdm/webhook/event.json`, its JSON schema).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use plist::{Dictionary, Value};
use serde::Deserialize;

const HMAC_KEY: &str = "webhook-secret";

// ---------------------------------------------------------------------------------------
// The receiver.

/// One request the receiver accepted.
#[derive(Clone, Debug)]
struct Posted {
    path: String,
    content_type: String,
    signature: Option<String>,
    body: Vec<u8>,
}

/// A webhook receiver: actix-web on a loopback port, on a thread of its own, over TLS when
/// given a certificate. While `failing`, it answers 503 and keeps nothing.
struct Receiver {
    port: u16,
    tls: bool,
    accepted: Arc<Mutex<Vec<Posted>>>,
    refused: Arc<Mutex<usize>>,
    failing: Arc<AtomicBool>,
    server: actix_web::dev::ServerHandle,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::start_on(free_port())
    }

    fn start_on(port: u16) -> Receiver {
        Receiver::serve(port, None)
    }

    /// An `https://` receiver whose certificate `ca` issued.
    fn start_tls(ca: &PrivateCa) -> Receiver {
        Receiver::serve(free_port(), Some(ca.server_config()))
    }

    fn serve(port: u16, tls: Option<rustls::ServerConfig>) -> Receiver {
        let https = tls.is_some();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (ready, started) = std::sync::mpsc::channel();
        let state = (accepted.clone(), refused.clone(), failing.clone());
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
                let server = actix_web::HttpServer::new(move || {
                    let state = state.clone();
                    actix_web::App::new().default_service(actix_web::web::to(
                        move |req: actix_web::HttpRequest, body: actix_web::web::Bytes| {
                            let (accepted, refused, failing) = state.clone();
                            async move { receive(req, body, &accepted, &refused, &failing) }
                        },
                    ))
                })
                .workers(1);
                let server = match tls {
                    Some(config) => server.listen_rustls_0_23(listener, config),
                    None => server.listen(listener),
                };
                let server = server.unwrap().disable_signals().run();
                ready.send(server.handle()).unwrap();
                server.await.unwrap();
            });
        });
        Receiver {
            port,
            tls: https,
            accepted,
            refused,
            failing,
            server: started.recv().unwrap(),
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/hooks/mdm", self.port)
    }

    fn accepted(&self) -> Vec<Posted> {
        self.accepted.lock().unwrap().clone()
    }

    fn refused(&self) -> usize {
        *self.refused.lock().unwrap()
    }

    /// Wait until `count` events were accepted (failing the test after `within`).
    async fn wait_for(&self, count: usize, within: Duration) -> Vec<Posted> {
        let deadline = Instant::now() + within;
        loop {
            let accepted = self.accepted();
            if accepted.len() >= count {
                // Anything beyond `count` would be a duplicate: give it a moment to show.
                actix_rt::time::sleep(Duration::from_millis(300)).await;
                return self.accepted();
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} events arrived within {within:?}",
                accepted.len()
            );
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.server.stop(false).await;
    }
}

fn receive(
    req: actix_web::HttpRequest,
    body: actix_web::web::Bytes,
    accepted: &Mutex<Vec<Posted>>,
    refused: &Mutex<usize>,
    failing: &AtomicBool,
) -> actix_web::HttpResponse {
    if failing.load(Ordering::SeqCst) {
        *refused.lock().unwrap() += 1;
        return actix_web::HttpResponse::ServiceUnavailable().finish();
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(req.method(), actix_web::http::Method::POST);
    accepted.lock().unwrap().push(Posted {
        path: req.path().to_string(),
        content_type: header("Content-Type").unwrap_or_default(),
        signature: header("X-Hmac-Signature"),
        body: body.to_vec(),
    });
    actix_web::HttpResponse::Ok().finish()
}

/// A private certificate authority, as a receiver inside a company network would have,
/// and its certificate as a `--webhook-ca` file.
struct PrivateCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
    file: tempfile::NamedTempFile,
}

impl PrivateCa {
    fn new() -> PrivateCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Example Corp internal CA");
        let cert = params.self_signed(&key).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), cert.pem()).unwrap();
        PrivateCa { key, cert, file }
    }

    fn path(&self) -> String {
        self.file.path().display().to_string()
    }

    /// A server certificate for 127.0.0.1 issued by this CA.
    fn server_config(&self) -> rustls::ServerConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap()
    }
}

/// A loopback port nothing listens on (until a receiver is started on it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// NanoMDM's event, as its Go types read it (`service/webhook/event.go`): unknown fields
// are refused, so an event that decodes here has no field NanoMDM's lacks.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventJson {
    acknowledge_event: Option<AcknowledgeEvent>,
    checkin_event: Option<CheckinEvent>,
    created_at: String,
    event_id: Option<String>,
    topic: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckinEvent {
    enrollment_id: Option<String>,
    ids: Option<Ids>,
    raw_payload: String,
    token_update_tally: Option<i64>,
    udid: Option<String>,
    url_params: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcknowledgeEvent {
    command_uuid: Option<String>,
    enrollment_id: Option<String>,
    ids: Option<Ids>,
    raw_payload: String,
    status: String,
    udid: Option<String>,
    url_params: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ids {
    id: String,
    parent_id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
}

/// An accepted post, checked against everything a NanoMDM receiver relies on: the
/// Content-Type, a valid signature, the JSON schema (`event.json`: required fields, topic
/// and enrollment-type enums, only known properties), and the Go types.
struct Received {
    event: EventJson,
    /// The decoded `raw_payload`.
    raw: Vec<u8>,
}

impl Received {
    fn check(posted: &Posted) -> Received {
        assert_eq!(posted.path, "/hooks/mdm");
        assert_eq!(posted.content_type, "application/json; charset=utf-8");
        let signature = posted.signature.as_deref().expect("X-Hmac-Signature");
        let mac = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .expect("the signature is base64");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HMAC_KEY.as_bytes());
        ring::hmac::verify(&key, &posted.body, &mac).expect("the signature verifies the body");

        let json: serde_json::Value = serde_json::from_slice(&posted.body).unwrap();
        conforms_to_schema(&json);
        let event: EventJson = serde_json::from_slice(&posted.body).unwrap();
        let raw_payload = match (&event.checkin_event, &event.acknowledge_event) {
            (Some(checkin), None) => &checkin.raw_payload,
            (None, Some(ack)) => &ack.raw_payload,
            other => panic!("exactly one of checkin_event and acknowledge_event: {other:?}"),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(raw_payload)
            .expect("raw_payload is base64");
        time::OffsetDateTime::parse(
            &event.created_at,
            &time::format_description::well_known::Rfc3339,
        )
        .expect("created_at is an RFC 3339 time");
        let id = event.event_id.as_deref().expect("event_id");
        uuid::Uuid::parse_str(id).expect("event_id is a UUID");
        Received { event, raw }
    }

    fn topic(&self) -> &str {
        &self.event.topic
    }

    fn ids(&self) -> &Ids {
        self.event
            .checkin_event
            .as_ref()
            .and_then(|c| c.ids.as_ref())
            .or_else(|| {
                self.event
                    .acknowledge_event
                    .as_ref()
                    .and_then(|a| a.ids.as_ref())
            })
            .expect("ids")
    }
}

/// `event` against NanoMDM's JSON schema, for the keywords it uses.
fn conforms_to_schema(event: &serde_json::Value) {
    let schema: serde_json::Value =
        serde_json::from_slice(&fixture("nanomdm/webhook/event.json")).unwrap();
    let defs = &schema["$defs"];
    check_object(event, &schema, defs);
    for (name, def) in [
        ("checkin_event", "CheckinEvent"),
        ("acknowledge_event", "AcknowledgeEvent"),
    ] {
        if let Some(inner) = event.get(name) {
            check_object(inner, &defs[def], defs);
            check_object(&inner["ids"], &defs["IDs"], defs);
        }
    }
}

fn check_object(value: &serde_json::Value, schema: &serde_json::Value, defs: &serde_json::Value) {
    let object = value.as_object().expect("an object");
    let properties = schema["properties"].as_object().unwrap();
    for required in schema["required"].as_array().unwrap() {
        let name = required.as_str().unwrap();
        assert!(
            object.contains_key(name),
            "required {name} missing: {value}"
        );
    }
    for (name, field) in object {
        let property = properties
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not a property of the schema"));
        let property = match property.get("$ref").and_then(|r| r.as_str()) {
            Some(reference) => &defs[reference.trim_start_matches("#/$defs/")],
            None => property,
        };
        if let Some(allowed) = property.get("enum").and_then(|e| e.as_array()) {
            assert!(
                allowed.contains(field),
                "{name} = {field} is not in {allowed:?}"
            );
        }
        match property.get("type").and_then(|t| t.as_str()) {
            Some("string") => assert!(field.is_string(), "{name} is a string"),
            Some("integer") => assert!(field.is_i64(), "{name} is an integer"),
            Some("object") => assert!(field.is_object(), "{name} is an object"),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Devices and servers.

fn webhook_server(receiver_url: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--webhook-url",
        receiver_url,
        "--webhook-hmac-key",
        HMAC_KEY,
    ];
    args.extend_from_slice(extra);
    Server::start_with(&args)
}

/// What one device sent, in order: the topic of each event it should cause and the body.
#[derive(Default)]
struct Sent {
    events: Vec<(String, Vec<u8>)>,
}

impl Sent {
    async fn checkin(&mut self, server: &Server, device: &Device, topic: &str, body: Vec<u8>) {
        let (status, _) = device.checkin(server, body.clone()).await;
        assert_eq!(status, 200, "{topic}");
        self.events.push((topic.to_string(), body));
    }

    async fn connect(&mut self, server: &Server, device: &Device, body: Vec<u8>) -> Vec<u8> {
        let (status, answer) = device.connect(server, body.clone()).await;
        assert_eq!(status, 200);
        self.events.push(("mdm.Connect".to_string(), body));
        answer
    }

    /// Authenticate, TokenUpdate, then `idles` Idle connects, each body distinct.
    async fn enroll_and_poll(&mut self, server: &Server, device: &Device, idles: usize) {
        self.checkin(server, device, "mdm.Authenticate", device.authenticate())
            .await;
        self.checkin(server, device, "mdm.TokenUpdate", device.token_update())
            .await;
        for n in 0..idles {
            let mut idle: Dictionary = plist::from_bytes(&device.idle()).unwrap();
            idle.insert("Poll".into(), Value::Integer((n as i64).into()));
            self.connect(server, device, to_xml(&idle)).await;
        }
    }
}

/// The accepted events of `device`, in the order they arrived.
fn events_of(posted: &[Posted], device: &Device) -> Vec<Received> {
    posted
        .iter()
        .map(Received::check)
        .filter(|r| r.ids().id == device.udid)
        .collect()
}

/// Each event of `device` arrived once, in the order its messages were sent.
fn assert_delivered_in_order(posted: &[Posted], device: &Device, sent: &Sent) {
    let received = events_of(posted, device);
    let got: Vec<(&str, &[u8])> = received
        .iter()
        .map(|r| (r.topic(), r.raw.as_slice()))
        .collect();
    let want: Vec<(&str, &[u8])> = sent
        .events
        .iter()
        .map(|(t, b)| (t.as_str(), b.as_slice()))
        .collect();
    assert_eq!(got.len(), want.len(), "events of {}", device.udid);
    assert!(got == want, "events of {} out of order", device.udid);
}

/// Every device enrolls, then connects Idle once per further round (each body distinct),
/// round after round across the devices; what each sent, and the slowest request.
async fn traffic(server: &Server, devices: &[Device], rounds: usize) -> (Vec<Sent>, Duration) {
    let mut sent: Vec<Sent> = devices.iter().map(|_| Sent::default()).collect();
    let mut slowest = Duration::ZERO;
    for round in 0..rounds {
        for (device, sent) in devices.iter().zip(sent.iter_mut()) {
            let started = Instant::now();
            if round == 0 {
                sent.enroll_and_poll(server, device, 0).await;
            } else {
                let mut idle: Dictionary = plist::from_bytes(&device.idle()).unwrap();
                idle.insert("Round".into(), Value::Integer((round as i64).into()));
                sent.connect(server, device, to_xml(&idle)).await;
            }
            slowest = slowest.max(started.elapsed());
        }
    }
    (sent, slowest)
}

/// Wait for every event sent, then check that each arrived once and each device's in the
/// order sent; answers how many there were.
async fn each_once_in_order(
    receiver: &Receiver,
    devices: &[Device],
    sent: &[Sent],
    within: Duration,
) -> usize {
    let expected: usize = sent.iter().map(|s| s.events.len()).sum();
    let posted = receiver.wait_for(expected, within).await;
    assert_eq!(posted.len(), expected, "each event once");
    for (device, sent) in devices.iter().zip(sent) {
        assert_delivered_in_order(&posted, device, sent);
    }
    expected
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn every_event_type_arrives_in_nanomdm_shapes_with_a_valid_signature() {
    let receiver = Receiver::start();
    let server = webhook_server(&receiver.url(), &["--user-authenticate", "empty-challenge"]);
    let device = Device::new(&server, "WEBHOOK-DEVICE-1");
    let mut sent = Sent::default();
    sent.enroll_and_poll(&server, &device, 0).await;

    let (status, _) = enqueue(&server, &device.udid, "cmd-webhook-1", "DeviceInformation").await;
    assert_eq!(status, 200);
    let command = sent.connect(&server, &device, device.idle()).await;
    assert!(!command.is_empty(), "the queued command is sent");
    let mut report = fixture_dict("nanomdm/DeviceInformation.1.plist");
    report.insert("UDID".into(), device.udid.clone().into());
    report.insert("CommandUUID".into(), "cmd-webhook-1".into());
    sent.connect(&server, &device, to_xml(&report)).await;

    let token = Value::Data(b"bootstrap-secret".to_vec());
    let set = message(&device, "SetBootstrapToken", &[("BootstrapToken", token)]);
    sent.checkin(&server, &device, "mdm.SetBootstrapToken", set)
        .await;
    let get = message(&device, "GetBootstrapToken", &[]);
    sent.checkin(&server, &device, "mdm.GetBootstrapToken", get)
        .await;
    let ddm = message(
        &device,
        "DeclarativeManagement",
        &[("Endpoint", "tokens".into())],
    );
    sent.checkin(&server, &device, "mdm.DeclarativeManagement", ddm)
        .await;
    // UserAuthenticate speaks for the user channel: an enrollment (and outbox) of its own.
    let user = message(
        &device,
        "UserAuthenticate",
        &[("UserID", "501-USER".into())],
    );
    assert_eq!(device.checkin(&server, user.clone()).await.0, 200);
    let (status, _) = device
        .checkin(
            &server,
            message(&device, "GetToken", &[("TokenServiceType", "x".into())]),
        )
        .await;
    assert_ne!(status, 200, "a refused message records no event");
    sent.checkin(
        &server,
        &device,
        "mdm.CheckOut",
        message(&device, "CheckOut", &[]),
    )
    .await;

    let posted = receiver
        .wait_for(sent.events.len() + 1, Duration::from_secs(20))
        .await;
    assert_delivered_in_order(&posted, &device, &sent);
    let user_channel = format!("{}:501-USER", device.udid);
    let user_events: Vec<Received> = posted
        .iter()
        .map(Received::check)
        .filter(|r| r.ids().id == user_channel)
        .collect();
    assert_eq!(user_events.len(), 1);
    let ids = user_events[0].ids();
    assert_eq!(user_events[0].topic(), "mdm.UserAuthenticate");
    assert_eq!(
        (ids.kind.as_str(), ids.parent_id.as_deref()),
        ("User", Some(device.udid.as_str()))
    );
    assert_eq!(user_events[0].raw, user);
    let received = events_of(&posted, &device);
    let ids: HashSet<&str> = received
        .iter()
        .map(|r| r.event.event_id.as_deref().unwrap())
        .collect();
    assert_eq!(ids.len(), received.len(), "every event has its own id");
    for event in &received {
        let ids = event.ids();
        assert_eq!(
            (ids.kind.as_str(), ids.parent_id.as_deref()),
            ("Device", None)
        );
        match (&event.event.checkin_event, &event.event.acknowledge_event) {
            (Some(checkin), None) => {
                assert_eq!(checkin.udid.as_deref(), Some(device.udid.as_str()));
                assert_eq!(checkin.enrollment_id, None);
                assert_eq!(checkin.url_params, None);
                let tally = (event.topic() == "mdm.TokenUpdate").then_some(1);
                assert_eq!(checkin.token_update_tally, tally, "{}", event.topic());
            }
            (None, Some(ack)) => {
                assert_eq!(ack.udid.as_deref(), Some(device.udid.as_str()));
                assert_eq!(ack.enrollment_id, None);
                assert_eq!(ack.url_params, None);
            }
            _ => unreachable!("checked by Received::check"),
        }
    }
    let acks: Vec<(&str, Option<&str>)> = received
        .iter()
        .filter_map(|r| r.event.acknowledge_event.as_ref())
        .map(|a| (a.status.as_str(), a.command_uuid.as_deref()))
        .collect();
    assert_eq!(
        acks,
        [("Idle", None), ("Acknowledged", Some("cmd-webhook-1"))]
    );

    let text = metrics_text(&server).await;
    let total = (sent.events.len() + 1) as f64;
    assert_eq!(metric(&text, "orchard_webhook_events_queued_total"), total);
    assert_eq!(
        metric(&text, "orchard_webhook_events_delivered_total"),
        total
    );
    assert_eq!(
        metric(&text, "orchard_webhook_delivery_seconds_count"),
        total
    );
    receiver.stop().await;
}

#[actix_rt::test]
async fn events_recorded_while_the_receiver_is_unreachable_survive_kill9_in_order() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hooks/mdm");
    let mut server = webhook_server(&url, &[]);
    let devices: Vec<Device> = (0..3)
        .map(|n| Device::new(&server, &format!("WEBHOOK-KILL-{n}")))
        .collect();
    let (sent, _) = traffic(&server, &devices, 6).await;
    // The deliverer has been failing to connect meanwhile; nothing was delivered.
    let text = metrics_text(&server).await;
    assert_eq!(metric(&text, "orchard_webhook_events_delivered_total"), 0.0);
    assert!(
        metric(&text, "orchard_webhook_retries_total") > 0.0,
        "{text}"
    );

    server.kill9();
    server.restart();
    let receiver = Receiver::start_on(port);
    let expected = each_once_in_order(&receiver, &devices, &sent, Duration::from_secs(30)).await;
    let text = metrics_text(&server).await;
    assert_eq!(
        metric(&text, "orchard_webhook_events_delivered_total"),
        expected as f64,
        "the restarted server delivered what the killed one recorded"
    );
    receiver.stop().await;
}

/// A receiver behind a private CA is reached over TLS once its CA is given with
/// `--webhook-ca`; without it the handshake fails and the events wait in the outbox.
#[actix_rt::test]
async fn an_https_receiver_behind_a_private_ca_is_trusted_through_webhook_ca() {
    let ca = PrivateCa::new();
    let receiver = Receiver::start_tls(&ca);

    let untrusting = webhook_server(&receiver.url(), &[]);
    let stranger = Device::new(&untrusting, "WEBHOOK-TLS-UNTRUSTED");
    Sent::default()
        .enroll_and_poll(&untrusting, &stranger, 0)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &metrics_text(&untrusting).await,
        "orchard_webhook_retries_total{reason=\"tls\"}",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the failed handshake is counted");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    drop(untrusting);
    assert!(receiver.accepted().is_empty());

    let server = webhook_server(&receiver.url(), &["--webhook-ca", &ca.path()]);
    let device = Device::new(&server, "WEBHOOK-TLS-1");
    let mut sent = Sent::default();
    sent.enroll_and_poll(&server, &device, 2).await;
    let posted = receiver
        .wait_for(sent.events.len(), Duration::from_secs(30))
        .await;
    assert_delivered_in_order(&posted, &device, &sent);
    receiver.stop().await;
}

#[actix_rt::test]
async fn a_receiver_that_fails_for_a_while_loses_nothing_and_keeps_the_order() {
    let receiver = Receiver::start();
    receiver.failing.store(true, Ordering::SeqCst);
    let server = webhook_server(&receiver.url(), &[]);
    let devices: Vec<Device> = (0..4)
        .map(|n| Device::new(&server, &format!("WEBHOOK-OUTAGE-{n}")))
        .collect();
    let (sent, slowest) = traffic(&server, &devices, 5).await;
    assert!(
        slowest < Duration::from_secs(2),
        "device requests never wait for the receiver (slowest {slowest:?})"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.refused() < 8 {
        assert!(Instant::now() < deadline, "the deliverer keeps retrying");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.accepted().is_empty());

    receiver.failing.store(false, Ordering::SeqCst);
    let expected = each_once_in_order(&receiver, &devices, &sent, Duration::from_secs(60)).await;
    let text = metrics_text(&server).await;
    assert!(metric(&text, "orchard_webhook_retries_total") >= 8.0);
    assert_eq!(
        metric(&text, "orchard_webhook_events_delivered_total"),
        expected as f64
    );
    assert_eq!(metric(&text, "orchard_webhook_events_dropped_total"), 0.0);
    receiver.stop().await;
}

#[actix_rt::test]
async fn events_older_than_the_max_age_are_dropped_and_later_ones_still_arrive() {
    let receiver = Receiver::start();
    receiver.failing.store(true, Ordering::SeqCst);
    let server = webhook_server(&receiver.url(), &["--webhook-max-age-secs", "1"]);
    let device = Device::new(&server, "WEBHOOK-AGED-1");
    let mut stale = Sent::default();
    stale.enroll_and_poll(&server, &device, 1).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics_text(&server).await;
        if metric(
            &text,
            "orchard_webhook_events_dropped_total{reason=\"expired\"}",
        ) == 3.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired events are dropped: {text}"
        );
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
    receiver.failing.store(false, Ordering::SeqCst);
    let mut fresh = Sent::default();
    fresh.connect(&server, &device, device.idle()).await;
    let posted = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_delivered_in_order(&posted, &device, &fresh);
    receiver.stop().await;
}

/// Three cluster nodes on one keyspace (needs `ORCHARD_TEST_CQL`), all posting to one
/// receiver: each enrollment's events are posted by the node serving its shard — once,
/// not once per node — and when that node is killed the node taking its shards posts
/// what it left, in order.
#[actix_rt::test]
async fn in_a_cluster_the_owner_posts_its_devices_events_and_a_successor_finishes_them() {
    let Some(cql) = common::cql::server() else {
        common::cql::skip("webhooks on an Orchard cluster");
        return;
    };
    let receiver = Receiver::start();
    receiver.failing.store(true, Ordering::SeqCst);
    let store = StoreUnderTest::Cql {
        nodes: vec![cql],
        keyspace: common::cql::fresh_keyspace(),
    };
    let url = receiver.url();
    let mut nodes: Vec<Server> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|name| {
            let args = [
                "--cluster-secret",
                "webhook-cluster-secret",
                "--node-id",
                name,
                "--lease-secs",
                "2",
                "--webhook-url",
                &url,
                "--webhook-hmac-key",
                HMAC_KEY,
            ];
            Server::start_on(store.clone(), &args)
        })
        .collect();
    settled_on_three(&nodes[0]).await;
    let devices: Vec<Device> = (0..12)
        .map(|i| Device::new(&nodes[0], &format!("F0F0F0F0-0000-4000-8000-{i:012X}")))
        .collect();
    let mut sent: Vec<Sent> = (0..devices.len()).map(|_| Sent::default()).collect();
    for (device, sent) in devices.iter().zip(sent.iter_mut()) {
        sent.enroll_and_poll(&nodes[0], device, 0).await;
        sent.connect(&nodes[1], device, device.idle()).await;
    }

    let mut on_the_killed_node = 0;
    for device in &devices {
        let (status, view) = api_get(&nodes[0], &format!("/api/v1/devices/{}", device.udid)).await;
        assert_eq!(status, 200, "{view}");
        if view["owner"] == "node-c" {
            on_the_killed_node += 1;
        }
    }
    assert!(on_the_killed_node > 0, "node-c serves some of the devices");

    nodes[2].kill9();
    actix_rt::time::sleep(Duration::from_secs(5)).await;
    receiver.failing.store(false, Ordering::SeqCst);
    let expected = each_once_in_order(&receiver, &devices, &sent, Duration::from_secs(60)).await;
    let mut delivered_by_survivors = 0.0;
    for node in &nodes[..2] {
        let text = metrics_text(node).await;
        delivered_by_survivors += metric(&text, "orchard_webhook_events_delivered_total");
    }
    assert_eq!(
        delivered_by_survivors, expected as f64,
        "the two live nodes delivered every event, the killed node's devices' too"
    );
    receiver.stop().await;
}

/// Wait until `node` sees three live nodes sharing every shard about evenly (devices are
/// answered 503 while shards still move).
async fn settled_on_three(node: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, view) = api_get(node, "/api/v1/cluster").await;
        assert_eq!(status, 200, "{view}");
        let shares: Vec<u64> = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["alive"] == true)
            .map(|n| n["shards"].as_u64().unwrap())
            .collect();
        let even = 4096 / 3;
        let balanced = shares.len() == 3 && shares.iter().all(|s| s * 4 >= even * 3);
        if balanced && view["shards_unowned"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not settle: {view}"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}
