//! Orchard on a three-node CQL cluster (replication 3) survives real database failures:
//!
//! * one database node killed with SIGKILL while devices enroll and commands flow: every
//!   acknowledged enrollment, command and result is there afterwards (also after a
//!   `kill -9` of Orchard itself), every command is delivered exactly once and in order,
//!   and Orchard keeps answering;
//! * two of the three nodes paused (SIGSTOP): a quorum is out of reach, so writes answer
//!   `503` with `Retry-After` (never a 2xx, never another 5xx) within the request timeout,
//!   and succeed once the nodes resume; an Orchard started meanwhile waits for them.
//!
//! Needs `ORCHARD_TEST_CQL_CLUSTER=H1:P,H2:P,H3:P` (loopback addresses of the cluster's
//! nodes); `ORCHARD_TEST_CQL_RESTART='command {addr}'` starts the killed node again
//! afterwards. Both scenarios disturb the same cluster, so they run in one test, in turn.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Devices enrolled before the failure, each receiving every round's command.
const DEVICES: usize = 12;
/// Devices that enroll while the database node dies.
const LATE_DEVICES: usize = 12;
/// Rounds of one command to every device; the node dies before round `KILL_BEFORE_ROUND`.
const ROUNDS: usize = 5;
const KILL_BEFORE_ROUND: usize = 2;
/// Orchard's per-request database timeout in these tests.
const TIMEOUT_MS: &str = "2000";
/// How long a client keeps retrying a 503 before the test gives up.
const RETRY_FOR: Duration = Duration::from_secs(90);

#[actix_rt::test]
async fn database_node_failures_lose_nothing_acknowledged() {
    let Some(nodes) = cql::cluster() else {
        cql::skip("three-node CQL cluster");
        return;
    };
    a_killed_database_node_loses_nothing_acknowledged(&nodes).await;
    a_lost_quorum_answers_503_and_recovers(&nodes).await;
    an_orchard_starting_without_a_quorum_waits_for_it(&nodes).await;
}

async fn a_killed_database_node_loses_nothing_acknowledged(nodes: &[String]) {
    let mut server = cluster_server(nodes);
    upload_push_cert(&server).await;
    let devices: Vec<Device> = (0..DEVICES)
        .map(|n| Device::new(&server, &udid("A", n)))
        .collect();
    for device in &devices {
        enroll_retrying(&server, device).await;
    }
    let late: Vec<Device> = (0..LATE_DEVICES)
        .map(|n| Device::new(&server, &udid("B", n)))
        .collect();
    let victim = nodes.last().expect("three nodes").clone();

    let commands_flow = async {
        let mut received = vec![Vec::new(); DEVICES];
        for round in 0..ROUNDS {
            if round == KILL_BEFORE_ROUND {
                signal_node(&victim, "KILL");
            }
            let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
            enqueue_retrying(&server, &ids.join(","), &format!("ROUND-{round}")).await;
            for (device, got) in devices.iter().zip(&mut received) {
                got.extend(drain_retrying(&server, device).await);
            }
        }
        received
    };
    let enrollments_flow = async {
        for device in &late {
            enroll_retrying(&server, device).await;
        }
    };
    let (received, ()) = futures_util::join!(commands_flow, enrollments_flow);

    let expected: Vec<String> = (0..ROUNDS).map(|r| format!("ROUND-{r}")).collect();
    for (device, got) in devices.iter().zip(&received) {
        assert_eq!(got, &expected, "{}: once each, in order", device.udid);
    }
    server.kill9();
    server.restart();
    for device in devices.iter().chain(&late) {
        let (status, info) = api_get(&server, &format!("/api/v1/devices/{}", device.udid)).await;
        assert_eq!(status, 200, "{} enrolled", device.udid);
        assert_eq!(info["enabled"], true);
    }
    for device in &devices {
        let path = format!("/api/v1/devices/{}/commands", device.udid);
        let (_, history) = api_get(&server, &path).await;
        let acknowledged: Vec<&str> = history
            .as_array()
            .expect("a command list")
            .iter()
            .filter(|c| c["status"] == "Acknowledged")
            .filter_map(|c| c["command_uuid"].as_str())
            .collect();
        assert_eq!(acknowledged, expected, "{}: every result kept", device.udid);
        assert!(
            drain_retrying(&server, device).await.is_empty(),
            "nothing twice"
        );
    }
    restart_node(&victim).await;
}

async fn a_lost_quorum_answers_503_and_recovers(nodes: &[String]) {
    let server = cluster_server(nodes);
    upload_push_cert(&server).await;
    let device = Device::new(&server, &udid("C", 0));
    enroll_retrying(&server, &device).await;

    let paused = Paused::nodes(&nodes[1..]);
    let started = Instant::now();
    let (status, retry_after) = enqueue_once(&server, &device.udid, "DURING-OUTAGE").await;
    assert_eq!(status, 503, "no quorum: not acknowledged");
    assert!(retry_after.is_some(), "503 says when to retry");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered within the request timeout, took {:?}",
        started.elapsed()
    );
    let (status, _) = device.connect(&server, device.idle()).await;
    assert!(
        status == 200 || status == 503,
        "a device gets its (empty) answer or 503, got {status}"
    );
    drop(paused);

    enqueue_retrying(&server, &device.udid, "AFTER-OUTAGE").await;
    // The refused enqueue may or may not have reached a replica; either way each command
    // arrives once, and the acknowledged one certainly does.
    let got = drain_retrying(&server, &device).await;
    assert!(
        got == ["AFTER-OUTAGE"] || got == ["DURING-OUTAGE", "AFTER-OUTAGE"],
        "{got:?}"
    );
    assert!(drain_retrying(&server, &device).await.is_empty());
}

/// An Orchard (re)started while its keyspace has no quorum (the database restarting too,
/// or overloaded) waits for it instead of exiting.
async fn an_orchard_starting_without_a_quorum_waits_for_it(nodes: &[String]) {
    let mut server = cluster_server(nodes);
    server.kill9();
    let paused = Paused::nodes(&nodes[1..]);
    let starting = std::thread::spawn(move || {
        server.restart();
        server
    });
    actix_rt::time::sleep(Duration::from_secs(8)).await;
    drop(paused);
    let server = starting
        .join()
        .expect("Orchard starts once the quorum is back");
    let (status, body) = api_get(&server, "/api/v1/devices").await;
    assert_eq!(status, 200, "{body}");
}

/// An Orchard on the cluster, on a fresh keyspace with replication 3.
fn cluster_server(nodes: &[String]) -> Server {
    let store = StoreUnderTest::Cql {
        nodes: nodes.to_vec(),
        keyspace: cql::fresh_keyspace(),
    };
    Server::start_on(store, &["--scylla-timeout-ms", TIMEOUT_MS])
}

fn udid(group: &str, n: usize) -> String {
    format!("0000{group}103-{n:015X}")
}

/// What a device does: send again after a 503 until the check-ins are acknowledged.
async fn enroll_retrying(server: &Server, device: &Device) {
    for message in [device.authenticate(), device.token_update()] {
        retry_503(|| device.checkin(server, message.clone())).await;
    }
}

async fn enqueue_retrying(server: &Server, ids: &str, uuid: &str) {
    retry_503(|| async { (enqueue_once(server, ids, uuid).await.0, ()) }).await;
}

/// One enqueue: its status and `Retry-After`.
async fn enqueue_once(server: &Server, ids: &str, uuid: &str) -> (u16, Option<String>) {
    let response = client()
        .put(server.url(&format!("/api/v1/nanomdm/enqueue/{ids}?nopush=1")))
        .bearer_auth(API_KEY)
        .timeout(Duration::from_secs(30))
        .send_body(command_plist(uuid, "ProfileList"))
        .await
        .expect("Orchard answers");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (response.status().as_u16(), retry_after)
}

/// Take every pending command, acknowledging each; a 503 is answered by sending the
/// same message again, as a device does.
async fn drain_retrying(server: &Server, device: &Device) -> Vec<String> {
    let mut received = Vec::new();
    let mut body = retry_503(|| device.connect(server, device.idle())).await;
    while !body.is_empty() {
        let command: plist::Dictionary = plist::from_bytes(&body).unwrap();
        let uuid = command["CommandUUID"].as_string().unwrap().to_string();
        let report = device.report("Acknowledged", Some(&uuid));
        body = retry_503(|| device.connect(server, report.clone())).await;
        received.push(uuid);
    }
    received
}

/// Repeat `attempt` while it answers 503 (anything else but 200 fails the test).
async fn retry_503<T, F, Fut>(attempt: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (u16, T)>,
{
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        let (status, value) = attempt().await;
        match status {
            200 => return value,
            503 if Instant::now() < deadline => {
                actix_rt::time::sleep(Duration::from_millis(250)).await
            }
            other => panic!("expected 200 (or 503 for a while), got {other}"),
        }
    }
}

/// Paused database nodes, resumed when dropped (also when an assertion fails).
struct Paused(Vec<String>);

impl Paused {
    fn nodes(nodes: &[String]) -> Paused {
        for node in nodes {
            signal_node(node, "STOP");
        }
        Paused(nodes.to_vec())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        for node in &self.0 {
            signal_node(node, "CONT");
        }
    }
}

/// Send `signal` to the process listening on `node` (HOST:PORT on loopback).
fn signal_node(node: &str, signal: &str) {
    let pid = listener_pid(node).unwrap_or_else(|| panic!("no process listens on {node}"));
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// The pid of the process with a listening TCP socket on `node`, from /proc.
fn listener_pid(node: &str) -> Option<u32> {
    let address: std::net::SocketAddrV4 = node.parse().expect("an IPv4 HOST:PORT");
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(address.ip().octets()),
        address.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&wanted.as_str()) && fields.get(3) == Some(&"0A"))
            .then(|| fields.get(9).map(|s| s.to_string()))
            .flatten()
    })?;
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|link| link.to_str() == Some(&socket))
                })
                .then_some(pid)
        })
}

/// Start the killed node again with `ORCHARD_TEST_CQL_RESTART`, and wait for it.
async fn restart_node(node: &str) {
    let Ok(command) = std::env::var("ORCHARD_TEST_CQL_RESTART") else {
        eprintln!("note: {node} stays down (set ORCHARD_TEST_CQL_RESTART to start it again)");
        return;
    };
    let address = node.split(':').next().unwrap_or(node);
    let started = std::process::Command::new("sh")
        .args(["-c", &command.replace("{addr}", address)])
        .status()
        .expect("the restart command runs");
    assert!(started.success(), "restart of {node}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(node).is_err() {
        assert!(Instant::now() < deadline, "{node} did not come back");
        actix_rt::time::sleep(Duration::from_millis(500)).await;
    }
}
