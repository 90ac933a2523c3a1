//! A real Orchard process and simulated devices for end-to-end tests: the server binary
//! runs on loopback with its embedded store in a temporary directory; devices present
//! identities issued by the server's own CA, exactly as enrolled devices do.
//!
//! With `ORCHARD_TEST_STORE=scylla` every server runs on the CQL store instead, on the
//! server named by `ORCHARD_TEST_CQL`, each on a fresh keyspace (dropped afterwards).
#![allow(dead_code)]

#[path = "../cql/mod.rs"]
pub mod cql;

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use orchard::identity::{CertificateAuthority, IssuedIdentity};
use plist::{Dictionary, Value};

pub const API_KEY: &str = "test-api-key";
pub const CERT_HEADER: &str = "X-Client-Cert";
pub const TOPIC: &str = "com.apple.mgmt.External.e0bd1eac-1f17-4c8e-8a63-dd17d3dd35d9";
pub const CHECKIN: &str = "application/x-apple-aspen-mdm-checkin";
pub const CONNECT: &str = "application/x-apple-aspen-mdm";

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The body of the `REQUEST` or `RESPONSE` part of a recorded NanoHUB exchange.
pub fn transcript_body(name: &str, part: &str) -> String {
    let text = String::from_utf8(fixture(&format!("nanohub-transcripts/{name}"))).unwrap();
    let marker = format!("=============================== {part} ");
    let after_marker = &text[text.find(&marker).expect("part is recorded")..];
    let body = &after_marker[after_marker.find("\n\n").unwrap() + 2..];
    body[..body.find("\n====").unwrap()].to_string()
}

pub fn fixture_dict(name: &str) -> Dictionary {
    plist::from_bytes(&fixture(name)).expect("fixture is a plist dictionary")
}

pub fn to_xml(dict: &Dictionary) -> Vec<u8> {
    let mut out = Vec::new();
    Value::Dictionary(dict.clone())
        .to_writer_xml(&mut out)
        .unwrap();
    out
}

/// A running `orchard serve`.
pub struct Server {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub base: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    store: StoreUnderTest,
    /// Where the server's log goes, when the test reads it (else the test's stderr).
    log_file: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

/// The store the servers of this test run use (`ORCHARD_TEST_STORE`).
#[derive(Clone, Debug)]
pub enum StoreUnderTest {
    Embedded,
    Cql {
        nodes: Vec<String>,
        keyspace: String,
    },
}

impl StoreUnderTest {
    fn from_env() -> StoreUnderTest {
        match std::env::var("ORCHARD_TEST_STORE").as_deref() {
            Ok("scylla") => StoreUnderTest::Cql {
                nodes: vec![cql::server()
                    .expect("ORCHARD_TEST_STORE=scylla needs ORCHARD_TEST_CQL=HOST:PORT")],
                keyspace: cql::fresh_keyspace(),
            },
            _ => StoreUnderTest::Embedded,
        }
    }

    pub fn args(&self) -> Vec<String> {
        match self {
            StoreUnderTest::Embedded => Vec::new(),
            StoreUnderTest::Cql { nodes, keyspace } => vec![
                "--store".into(),
                "scylla".into(),
                "--scylla-nodes".into(),
                nodes.join(","),
                "--scylla-keyspace".into(),
                keyspace.clone(),
                "--scylla-replication".into(),
                nodes.len().min(3).to_string(),
            ],
        }
    }
}

impl Server {
    /// Plain HTTP behind a simulated proxy that passes the client certificate in a header.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_on(StoreUnderTest::from_env(), extra)
    }

    /// A server on the given store, whatever `ORCHARD_TEST_STORE` says.
    pub fn start_on(store: StoreUnderTest, extra: &[&str]) -> Server {
        Server::start_on_with_env(store, extra, &[])
    }

    /// [`Server::start_on`] with environment variables set for the first start.
    pub fn start_on_with_env(
        store: StoreUnderTest,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut server = Server::unstarted(store, extra, env);
        server.spawn();
        server
    }

    /// A server logging at `level` (`ORCHARD_LOG`) to a file the test reads with
    /// [`Server::log`].
    pub fn start_logging(level: &str, extra: &[&str]) -> Server {
        let mut server = Server::unstarted(StoreUnderTest::from_env(), extra, &[]);
        server.set_env("ORCHARD_LOG", Some(level));
        server.log_file = server
            ._tmp
            .as_ref()
            .map(|tmp| tmp.path().join("server.log"));
        server.spawn();
        server
    }

    fn unstarted(store: StoreUnderTest, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut server = Server {
            child: None,
            data_dir,
            base: String::new(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            store,
            log_file: None,
            _tmp: Some(tmp),
        };
        for (key, value) in env {
            server.set_env(key, Some(value));
        }
        server
    }

    /// What the server logged so far (servers started with [`Server::start_logging`]).
    pub fn log(&self) -> String {
        let path = self.log_file.as_ref().expect("started with start_logging");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_orchard"));
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--api-key", API_KEY])
            .args(["--client-cert-header", CERT_HEADER])
            .args(["--server-url", "https://mdm.example.test"])
            .args(self.default_apns_args())
            .args(self.store.args())
            .args(&self.args)
            .env("ORCHARD_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        match &self.log_file {
            Some(path) => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                command.stderr(log)
            }
            None => command.stderr(Stdio::inherit()),
        };
        let mut child = command.spawn().expect("orchard binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("orchard printed its address before exiting")
                .unwrap();
            if let Some(rest) = line.strip_prefix("orchard listening on ") {
                break rest.to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        self.base = address;
        self.child = Some(child);
    }

    /// Unless a test points Orchard at its own APNs peer, pushes go to a closed loopback
    /// port: a test never reaches beyond this machine.
    fn default_apns_args(&self) -> Vec<&'static str> {
        if self.args.iter().any(|a| a == "--apns-url") {
            Vec::new()
        } else {
            vec!["--apns-url", "https://127.0.0.1:9"]
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGKILL: no shutdown hook runs, nothing unflushed survives.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Send a signal (`"STOP"`, `"CONT"`, `"TERM"`) to the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Start again on the same data dir and store (new port).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Environment for the next start (e.g. a failpoint); `None` removes the variable.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_string(), value.to_string()));
        }
    }

    /// Whether the process has exited by itself (a crash), waiting up to `within`.
    pub fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        while std::time::Instant::now() < deadline {
            if child.try_wait().expect("wait on the server").is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn store(&self) -> &StoreUnderTest {
        &self.store
    }

    /// The server's store opened by the test itself (the embedded one only while the
    /// server is stopped: the file is locked by its owner).
    pub async fn open_store(&self) -> std::sync::Arc<dyn orchard::store::Store> {
        match &self.store {
            StoreUnderTest::Embedded => {
                orchard::store::embedded::EmbeddedStore::open(&self.data_dir)
                    .expect("open the embedded store")
            }
            StoreUnderTest::Cql { nodes, keyspace } => {
                let config = cql::config(nodes.clone(), keyspace, nodes.len().min(3) as u32);
                orchard::store::scylla::ScyllaStore::connect(&config)
                    .await
                    .expect("connect to the CQL store")
            }
        }
    }

    pub fn ca(&self) -> CertificateAuthority {
        CertificateAuthority::load_or_create(&self.data_dir).expect("server CA in the data dir")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if let StoreUnderTest::Cql { nodes, keyspace } = &self.store {
            cql::drop_keyspace(nodes.clone(), keyspace.clone());
        }
    }
}

pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish()
}

pub async fn body_of(
    mut response: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>>
            + Unpin,
    >,
) -> Vec<u8> {
    response
        .body()
        .limit(64 * 1024 * 1024)
        .await
        .unwrap()
        .to_vec()
}

/// The response's Content-Type, or "" without one.
pub fn content_type_of<S>(response: &awc::ClientResponse<S>) -> String {
    response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A device with its own identity from the server's CA.
pub struct Device {
    pub udid: String,
    pub identity: IssuedIdentity,
}

impl Device {
    pub fn new(server: &Server, udid: &str) -> Device {
        Device {
            udid: udid.to_string(),
            identity: server.ca().issue_identity(udid).unwrap(),
        }
    }

    /// RFC 9440 form of the client-certificate header.
    pub fn cert_header(&self) -> String {
        format!(
            ":{}:",
            base64::engine::general_purpose::STANDARD.encode(&self.identity.cert_der)
        )
    }

    /// The real Authenticate fixture, re-addressed to this device.
    pub fn authenticate(&self) -> Vec<u8> {
        let mut message = fixture_dict("nanomdm/Authenticate.2.plist");
        message.insert("UDID".into(), self.udid.clone().into());
        to_xml(&message)
    }

    /// The real TokenUpdate fixture, re-addressed to this device with its own push token
    /// and PushMagic.
    pub fn token_update(&self) -> Vec<u8> {
        let mut message = fixture_dict("nanomdm/TokenUpdate.2.plist");
        message.insert("UDID".into(), self.udid.clone().into());
        message.insert("Token".into(), Value::Data(self.push_token()));
        message.insert("PushMagic".into(), self.push_magic().into());
        to_xml(&message)
    }

    pub fn push_token(&self) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(self.udid.as_bytes()).to_vec()
    }

    pub fn push_token_hex(&self) -> String {
        hex::encode(self.push_token())
    }

    pub fn push_magic(&self) -> String {
        format!("MAGIC-{}", self.udid)
    }

    pub fn idle(&self) -> Vec<u8> {
        self.report("Idle", None)
    }

    pub fn report(&self, status: &str, command_uuid: Option<&str>) -> Vec<u8> {
        let mut message = Dictionary::new();
        message.insert("UDID".into(), self.udid.clone().into());
        message.insert("Status".into(), status.into());
        if let Some(uuid) = command_uuid {
            message.insert("CommandUUID".into(), uuid.into());
        }
        to_xml(&message)
    }

    pub async fn checkin(&self, server: &Server, body: Vec<u8>) -> (u16, Vec<u8>) {
        self.put(server, "/mdm", CHECKIN, body).await
    }

    pub async fn connect(&self, server: &Server, body: Vec<u8>) -> (u16, Vec<u8>) {
        self.put(server, "/mdm", CONNECT, body).await
    }

    pub async fn put(
        &self,
        server: &Server,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, Vec<u8>) {
        let response = client()
            .put(server.url(path))
            .insert_header(("Content-Type", content_type))
            .insert_header((CERT_HEADER, self.cert_header()))
            .send_body(body)
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, body_of(response).await)
    }

    /// Authenticate + TokenUpdate.
    pub async fn enroll(&self, server: &Server) {
        assert_eq!(self.checkin(server, self.authenticate()).await.0, 200);
        assert_eq!(self.checkin(server, self.token_update()).await.0, 200);
    }

    /// Idle, then acknowledge every command until the queue is empty; the command UUIDs
    /// in the order received.
    pub async fn drain(&self, server: &Server) -> Vec<String> {
        let mut received = Vec::new();
        let (status, mut body) = self.connect(server, self.idle()).await;
        assert_eq!(status, 200);
        while !body.is_empty() {
            let command: Dictionary = plist::from_bytes(&body).unwrap();
            let uuid = command["CommandUUID"].as_string().unwrap().to_string();
            let (status, next) = self
                .connect(server, self.report("Acknowledged", Some(&uuid)))
                .await;
            assert_eq!(status, 200);
            received.push(uuid);
            body = next;
        }
        received
    }
}

/// A DeclarativeManagement check-in; answers status, Content-Type and JSON body.
pub async fn ddm(
    server: &Server,
    device: &Device,
    endpoint: &str,
    data: Option<Vec<u8>>,
) -> (u16, String, serde_json::Value) {
    let mut message = Dictionary::new();
    message.insert("MessageType".into(), "DeclarativeManagement".into());
    message.insert("UDID".into(), device.udid.clone().into());
    message.insert("Endpoint".into(), endpoint.into());
    if let Some(data) = data {
        message.insert("Data".into(), Value::Data(data));
    }
    let response = client()
        .put(server.url("/mdm"))
        .insert_header(("Content-Type", CHECKIN))
        .insert_header((CERT_HEADER, device.cert_header()))
        .send_body(to_xml(&message))
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = content_type_of(&response);
    let body = body_of(response).await;
    (
        status,
        content_type,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A check-in message of `device` (its UDID, the test topic) with `extra` keys.
pub fn message(device: &Device, message_type: &str, extra: &[(&str, Value)]) -> Vec<u8> {
    let mut dict = Dictionary::new();
    dict.insert("MessageType".into(), message_type.into());
    dict.insert("UDID".into(), device.udid.clone().into());
    dict.insert("Topic".into(), TOPIC.into());
    for (key, value) in extra {
        dict.insert((*key).into(), value.clone());
    }
    to_xml(&dict)
}

/// A fresh server with one device that has sent Authenticate and TokenUpdate.
pub async fn enrolled_device(udid: &str) -> (Server, Device) {
    let server = Server::start();
    let device = Device::new(&server, udid);
    device.enroll(&server).await;
    (server, device)
}

/// A raw command plist as NanoHUB's enqueue route takes it.
pub fn command_plist(uuid: &str, request_type: &str) -> Vec<u8> {
    let mut command = Dictionary::new();
    command.insert("RequestType".into(), request_type.into());
    let mut outer = Dictionary::new();
    outer.insert("CommandUUID".into(), uuid.into());
    outer.insert("Command".into(), Value::Dictionary(command));
    to_xml(&outer)
}

pub async fn api_put(server: &Server, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let response = client()
        .put(server.url(path))
        .bearer_auth(API_KEY)
        .send_body(body)
        .await
        .unwrap();
    json_of(response).await
}

pub async fn api_get(server: &Server, path: &str) -> (u16, serde_json::Value) {
    let response = client()
        .get(server.url(path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    json_of(response).await
}

pub async fn api_post_json(
    server: &Server,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client()
        .post(server.url(path))
        .bearer_auth(API_KEY)
        .send_json(&body)
        .await
        .unwrap();
    json_of(response).await
}

async fn json_of(
    response: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>>
            + Unpin,
    >,
) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let body = body_of(response).await;
    let json = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()))
    };
    (status, json)
}

pub async fn enqueue(
    server: &Server,
    ids: &str,
    uuid: &str,
    request_type: &str,
) -> (u16, serde_json::Value) {
    api_put(
        server,
        &format!("/api/v1/nanomdm/enqueue/{ids}?nopush=1"),
        command_plist(uuid, request_type),
    )
    .await
}

/// An APNs MDM push certificate + key (PEM), topic in the subject UID as Apple issues it.
pub fn push_certificate_pem(topic: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]),
        topic,
    );
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("APSP:{topic}"));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    format!("{}{}", cert.pem(), key.serialize_pem())
}

pub async fn upload_push_cert(server: &Server) {
    upload_this_push_cert(server, &push_certificate_pem(TOPIC)).await;
}

pub async fn upload_this_push_cert(server: &Server, pem: &str) {
    let (status, body) = api_put(server, "/api/v1/nanomdm/pushcert", pem.as_bytes().to_vec()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], TOPIC);
}

pub async fn metrics_text(server: &Server) -> String {
    let response = client().get(server.url("/metrics")).send().await.unwrap();
    String::from_utf8(body_of(response).await).unwrap()
}

/// A local APNs peer on its own runtime thread, so that it answers while a test blocks.
pub struct Peer {
    pub peer: apns_peer::ApnsPeer,
    ca_file: tempfile::NamedTempFile,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Peer {
    /// Started from a plain thread: a runtime cannot be built or entered from inside the
    /// test's own.
    pub fn start(config: apns_peer::PeerConfig) -> Peer {
        let (runtime, peer) = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let peer = runtime
                .block_on(apns_peer::ApnsPeer::start(config))
                .unwrap();
            (runtime, peer)
        })
        .join()
        .unwrap();
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), peer.ca_pem()).unwrap();
        Peer {
            peer,
            ca_file,
            runtime: Some(runtime),
        }
    }

    /// Flags that point Orchard at this peer.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--apns-url".into(),
            self.peer.url(),
            "--apns-ca".into(),
            self.ca_file.path().display().to_string(),
        ]
    }

    /// Pushes answered 200 for one device token.
    pub fn delivered_to(&self, device: &Device) -> usize {
        let token = device.push_token_hex();
        self.peer
            .recent()
            .iter()
            .filter(|p| p.token_hex == token && p.status == 200)
            .count()
    }
}

/// The DER of the first certificate in a PEM bundle.
pub fn certificate_der(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
