//! Orchard nodes on one CQL keyspace (`--store scylla --cluster-secret`), with real process
//! failures (contract.md §4):
//!
//! * three nodes share the 4096 shards evenly; a node killed with SIGKILL has its shards
//!   served by the others within 2 × `--lease-secs`; a node stopped with SIGTERM hands its
//!   shards over and exits 0;
//! * a node paused (SIGSTOP) in the middle of a write, past its lease, does not
//!   acknowledge that write when it resumes, and the new owner's acknowledged command is
//!   still delivered, once.
//!
//! Needs `ORCHARD_TEST_CQL=HOST:PORT`; without it each test prints one skip line.

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

#[actix_rt::test]
async fn shards_spread_over_live_nodes_and_move_when_one_dies_or_leaves() {
    let Some(mut nodes) = cluster_of(&["node-a", "node-b", "node-c"], &[]) else {
        return;
    };
    settled(
        &nodes[0],
        &["node-a", "node-b", "node-c"],
        LEASE * 3 + LEASE,
    )
    .await;
    for node in &nodes {
        let ready = client().get(node.url("/readyz")).send().await.unwrap();
        let status = ready.status().as_u16();
        let body = String::from_utf8_lossy(&body_of(ready).await).into_owned();
        assert_eq!(status, 200, "a node holding its lease is ready: {body}");
    }

    gauges_settle(&nodes, 3).await;

    nodes[2].kill9();
    let takeover = settled(&nodes[0], &["node-a", "node-b"], LEASE * 4).await;
    gauges_settle(&nodes[..2], 2).await;
    assert!(
        takeover <= LEASE * 2 + Duration::from_millis(500),
        "a killed node's shards are served again within 2 × lease: {takeover:?}"
    );

    nodes[1].signal("TERM");
    assert!(
        nodes[1].exited_within(Duration::from_secs(30)),
        "SIGTERM: the node hands its shards over and exits"
    );
    let handoff = settled(&nodes[0], &["node-a"], LEASE * 2).await;
    eprintln!(
        "lease {LEASE:?}: takeover after kill -9 {takeover:?}, hand-off after SIGTERM {handoff:?}"
    );
    assert!(
        handoff < LEASE,
        "handed-over shards are taken within a round, not after a lease: {handoff:?}"
    );
}

/// A gauge of a node's `/metrics` (one without labels).
async fn gauge(node: &Server, name: &str) -> u64 {
    let metrics = metrics_text(node).await;
    let value = metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} on /metrics"));
    value.parse().unwrap()
}

/// Wait until every one of `nodes` exports `alive` live nodes and no unowned shard, and
/// the shards they export as owned add up to every shard.
async fn gauges_settle(nodes: &[Server], alive: u64) {
    within(LEASE, "the cluster gauges settle", async || {
        let mut owned = 0;
        for node in nodes {
            if gauge(node, "orchard_cluster_nodes_alive").await != alive
                || gauge(node, "orchard_cluster_shards_unowned").await != 0
            {
                return false;
            }
            owned += gauge(node, "orchard_cluster_shards_owned").await;
        }
        owned == 4096
    })
    .await;
}

/// The node `via` reports as serving `device`, once `via` can reach the device's actor
/// (on itself or through its owner).
async fn owner_seen_by(via: &Server, device: &Device) -> String {
    let deadline = Instant::now() + LEASE * 4;
    loop {
        let (status, view) = api_get(via, &format!("/api/v1/devices/{}", device.udid)).await;
        if let (200, Some(owner)) = (status, view["owner"].as_str()) {
            return owner.to_string();
        }
        assert!(Instant::now() < deadline, "no node serves {}", device.udid);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until `via` reports node `name` as serving `device`.
async fn served_by(via: &Server, device: &Device, name: &str) {
    let deadline = Instant::now() + LEASE * 6;
    while owner_seen_by(via, device).await != name {
        assert!(
            Instant::now() < deadline,
            "{name} never served {}",
            device.udid
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn a_node_paused_mid_write_past_its_lease_never_acknowledges_it_nor_hides_the_new_owners_command(
) {
    // Every enqueue pauses between writing the command body and the device's rows.
    let pause = [("ORCHARD_FAILPOINT", "apply:before-device-rows=pause")];
    let Some(mut nodes) = cluster_of(&["node-a", "node-b"], &pause) else {
        return;
    };
    settled(&nodes[0], &["node-a", "node-b"], LEASE * 4).await;
    for node in &nodes {
        upload_push_cert(node).await;
    }
    let names = ["node-a", "node-b"];
    let device = Device::new(&nodes[0], "C1C2C3C4-0000-4000-8000-00000000FE11");
    device.enroll(&nodes[0]).await;
    let owner_name = owner_seen_by(&nodes[0], &device).await;
    let owner = names.iter().position(|n| *n == owner_name).unwrap();
    let other = 1 - owner;

    // The owner accepts an enqueue and is frozen while its write is half done.
    let stale = enqueue(&nodes[owner], &device.udid, "STALE-1", "DeviceInformation");
    let freeze = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        nodes[owner].signal("STOP");
        // The other node takes the device's shard and acknowledges a command of its own.
        served_by(&nodes[other], &device, names[other]).await;
        let (status, _) =
            enqueue(&nodes[other], &device.udid, "FRESH-1", "DeviceInformation").await;
        assert_eq!(status, 200, "the new owner acknowledges");
        nodes[owner].signal("CONT");
    };
    let ((stale_status, stale_body), ()) = futures_util::join!(stale, freeze);
    assert_eq!(
        stale_status, 503,
        "a write finished after the lease was lost is never acknowledged: {stale_body}"
    );

    // What the store holds keeps what the new owner wrote: a fresh node loading the device
    // from the store delivers the acknowledged command once. The stale enqueue was never
    // acknowledged; like any write whose answer was lost it may have landed (as a queue
    // entry of its own), and then is delivered once too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    nodes[owner].kill9();
    nodes[other].set_env("ORCHARD_FAILPOINT", None);
    nodes[other].restart();
    served_by(&nodes[other], &device, names[other]).await;
    let delivered = device.drain(&nodes[other]).await;
    assert_eq!(
        delivered.iter().filter(|c| *c == "FRESH-1").count(),
        1,
        "{delivered:?}"
    );
    assert!(
        delivered.iter().all(|c| c == "FRESH-1" || c == "STALE-1") && delivered.len() <= 2,
        "{delivered:?}"
    );
}

/// Devices spread over the shards of three nodes, one request per node: enrolled
/// through the first, commanded through the third, connecting through the second.
fn fleet(node: &Server, count: usize) -> Vec<Device> {
    (0..count)
        .map(|i| Device::new(node, &format!("F0F0F0F0-0000-4000-8000-{i:012X}")))
        .collect()
}

/// Enroll `devices` through `enroll_via` and check, asking `ask`, that their shards put
/// them on every one of three nodes.
async fn enroll_across_three_nodes(devices: &[Device], enroll_via: &Server, ask: &Server) {
    for device in devices {
        device.enroll(enroll_via).await;
    }
    let mut owners = std::collections::BTreeSet::new();
    for device in devices {
        owners.insert(owner_seen_by(ask, device).await);
    }
    assert_eq!(
        owners.len(),
        3,
        "the devices live on every node: {owners:?}"
    );
}

#[actix_rt::test]
async fn any_node_answers_for_any_device_through_its_owner() {
    let Some(nodes) = cluster_of(&["node-a", "node-b", "node-c"], &[]) else {
        return;
    };
    settled(&nodes[0], &["node-a", "node-b", "node-c"], LEASE * 4).await;
    upload_push_cert(&nodes[0]).await;
    for node in &nodes[1..] {
        upload_push_cert(node).await;
    }
    let devices = fleet(&nodes[0], 12);
    enroll_across_three_nodes(&devices, &nodes[0], &nodes[1]).await;

    // One enqueue naming every device, through the third node: split by owner, one
    // answer in NanoHUB's shape.
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    for uuid in ["CMD-1", "CMD-2", "CMD-3"] {
        let (status, body) = enqueue(&nodes[2], &ids.join(","), uuid, "DeviceInformation").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["command_uuid"], uuid);
    }
    for device in &devices {
        let delivered = device.drain(&nodes[1]).await;
        assert_eq!(delivered, ["CMD-1", "CMD-2", "CMD-3"], "{}", device.udid);
        assert!(device.drain(&nodes[2]).await.is_empty(), "delivered once");
    }
    for (node, route) in [(&nodes[1], "device_connect"), (&nodes[2], "actors")] {
        let metrics = metrics_text(node).await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("orchard_forwarded_requests_total")
                    && l.contains(&format!("route=\"{route}\""))
                    && l.contains("outcome=\"2xx\"")),
            "forwards counted by route and outcome"
        );
    }
}

#[actix_rt::test]
async fn a_forwarding_node_vouches_only_for_the_identity_it_verified() {
    let Some(nodes) = cluster_of(&["node-a", "node-b"], &[]) else {
        return;
    };
    settled(&nodes[0], &["node-a", "node-b"], LEASE * 4).await;
    upload_push_cert(&nodes[0]).await;
    upload_push_cert(&nodes[1]).await;
    let names = ["node-a", "node-b"];
    let devices = fleet(&nodes[0], 8);
    for device in &devices {
        device.enroll(&nodes[0]).await;
    }
    // A victim served by node-b, reached through node-a by an attacker enrolled too.
    let mut victim = None;
    for device in &devices {
        if owner_seen_by(&nodes[0], device).await == names[1] {
            victim = Some(device);
            break;
        }
    }
    let victim = victim.expect("one of 8 devices lives on node-b");
    let attacker = devices.iter().find(|d| d.udid != victim.udid).unwrap();
    let (status, _) = enqueue(&nodes[0], &victim.udid, "SECRET-1", "DeviceInformation").await;
    assert_eq!(status, 200);

    // The attacker's own certificate with the victim's UDID: refused by the owner.
    let (status, _) = attacker.connect(&nodes[0], victim.idle()).await;
    assert_eq!(status, 403, "impersonation through a forwarding node");
    // A device cannot smuggle the vouched-identity header through the edge either.
    let smuggled = client()
        .put(nodes[0].url("/mdm"))
        .insert_header(("Content-Type", CONNECT))
        .insert_header((CERT_HEADER, attacker.cert_header()))
        .insert_header((
            "orchard-verified-fingerprint",
            hex::encode(orchard::identity::verify::fingerprint(
                &victim.identity.cert_der,
            )),
        ))
        .send_body(victim.idle())
        .await
        .unwrap();
    assert_eq!(smuggled.status().as_u16(), 403);

    // Internal routes: unsigned, or signed with another secret, are refused and change
    // nothing; the same request signed with the cluster secret is served.
    let path = "/internal/device/connect";
    let body = victim.report("Acknowledged", Some("SECRET-1"));
    let fingerprint = orchard::identity::verify::fingerprint(&victim.identity.cert_der);
    let forged = |secret: Option<&str>| {
        let mut request = client()
            .put(nodes[1].url(path))
            .insert_header(("orchard-verified-fingerprint", hex::encode(fingerprint)));
        if let Some(secret) = secret {
            let signature =
                orchard::forward::ClusterKey::new(secret).sign(orchard::forward::Signed {
                    method: "PUT",
                    path_and_query: path,
                    fingerprint: Some(&fingerprint),
                    body: &body,
                });
            request = request.insert_header(("orchard-cluster-signature", signature));
        }
        request.send_body(body.clone())
    };
    for secret in [None, Some("not-the-cluster-secret")] {
        let refused = forged(secret).await.unwrap();
        assert_eq!(refused.status().as_u16(), 403, "secret {secret:?}");
    }
    let (status, command) = victim.connect(&nodes[0], victim.idle()).await;
    assert_eq!(status, 200);
    let command: plist::Dictionary = plist::from_bytes(&command).unwrap();
    assert_eq!(
        command["CommandUUID"].as_string(),
        Some("SECRET-1"),
        "still queued"
    );
    let signed = forged(Some(SECRET)).await.unwrap();
    assert_eq!(
        signed.status().as_u16(),
        200,
        "the cluster's own signature is served"
    );
    assert!(
        victim.drain(&nodes[0]).await.is_empty(),
        "acknowledged through the peer route"
    );
}

/// Poll `check` until it holds; how long it took.
async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what} took over {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[actix_rt::test]
async fn identity_ca_push_certificates_and_the_catalog_are_the_same_on_every_node() {
    // Every node pushes to one APNs peer that trusts only the second certificate.
    let old_cert = push_certificate_pem(TOPIC);
    let new_cert = push_certificate_pem(TOPIC);
    let peer = Peer::start(apns_peer::PeerConfig {
        trusted_client_certs: vec![certificate_der(&new_cert)],
        ..Default::default()
    });
    let apns = peer.server_args();
    let apns: Vec<&str> = apns.iter().map(String::as_str).collect();
    let Some(nodes) = cluster_with(&["node-a", "node-b", "node-c"], &[], &apns) else {
        return;
    };
    settled(&nodes[0], &["node-a", "node-b", "node-c"], LEASE * 4).await;

    // One identity CA: the first node's, adopted by the others.
    let ca_of = |node: &Server| std::fs::read(node.data_dir.join("identity-ca.pem")).unwrap();
    assert!(nodes.iter().all(|node| ca_of(node) == ca_of(&nodes[0])));
    // Devices whose identities came from the third node enroll through the first.
    let devices = fleet(&nodes[2], 12);
    upload_this_push_cert(&nodes[0], &old_cert).await;
    enroll_across_three_nodes(&devices, &nodes[0], &nodes[0]).await;
    let device = &devices[0];

    // A certificate replaced through one node is the one every owner pushes with: each
    // device is pushed by its owner, whichever node took the call.
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    let path = format!("/api/v1/nanomdm/push/{}", ids.join(","));
    let pushed = async |field: &str| {
        let (_, answer) = api_get(&nodes[1], &path).await;
        ids.iter()
            .all(|id| answer["status"][*id][field].is_string())
    };
    assert!(pushed("push_error").await, "the old certificate is refused");
    upload_this_push_cert(&nodes[0], &new_cert).await;
    let took = within(
        Duration::from_secs(2),
        "the new push certificate",
        async || pushed("push_result").await,
    )
    .await;
    eprintln!("new push certificate used by every owner after {took:?}");
    for node in [&nodes[0], &nodes[2]] {
        let metrics = metrics_text(node).await;
        assert!(
            metrics.lines().any(|l| l
                .starts_with("orchard_forwarded_requests_received_total{route=\"push\"}")),
            "owners push their own devices"
        );
    }

    // The catalog: published through one node, served to the device through another,
    // changed through a third, and in effect everywhere within 2 s.
    let config = |echo: &str| {
        serde_json::json!({"Type": "com.apple.configuration.management.test",
            "Identifier": "cluster.config", "Payload": {"Echo": echo}})
    };
    let put = async |node: &Server, body: serde_json::Value| {
        let url = node.url("/api/v1/ddm/declarations");
        let response = client().put(url).bearer_auth(API_KEY).send_json(&body);
        response.await.unwrap().status().as_u16()
    };
    assert_eq!(put(&nodes[0], config("one")).await, 204);
    let set = "/api/v1/ddm/set-declarations/cluster?declaration=cluster.config";
    assert_eq!(api_put(&nodes[1], set, Vec::new()).await.0, 204);
    let assign = format!("/api/v1/ddm/enrollment-sets/{}?set=cluster", device.udid);
    assert_eq!(api_put(&nodes[2], &assign, Vec::new()).await.0, 204);
    let tokens = async |node: &Server| {
        let answer = ddm(node, device, "tokens", None).await.2;
        answer["SyncTokens"]["DeclarationsToken"].clone()
    };
    let before = tokens(&nodes[0]).await;
    assert!(before.is_string(), "{before}");
    for node in &nodes[1..] {
        assert_eq!(tokens(node).await, before, "one token through every node");
    }
    assert_eq!(put(&nodes[2], config("two")).await, 204);
    for node in &nodes {
        within(Duration::from_secs(2), "the changed catalog", async || {
            tokens(node).await != before
        })
        .await;
    }
    let path = "declaration/configuration/cluster.config";
    let mut bodies = Vec::new();
    for node in &nodes {
        bodies.push(ddm(node, device, path, None).await.2);
    }
    assert_eq!(bodies[0]["Payload"]["Echo"], "two");
    assert!(bodies.iter().all(|body| *body == bodies[0]), "{bodies:?}");
}

/// Which ids an enqueue acknowledged: all of them on 200, those without a
/// `command_error` on 207, none otherwise.
fn acknowledged(status: u16, body: &serde_json::Value, ids: &[&str]) -> Vec<String> {
    match status {
        200 => ids.iter().map(|id| id.to_string()).collect(),
        207 => ids
            .iter()
            .filter(|id| body["status"][**id]["command_error"].is_null())
            .map(|id| id.to_string())
            .collect(),
        _ => Vec::new(),
    }
}

#[actix_rt::test]
async fn a_command_storm_loses_nothing_when_an_owner_is_killed_and_a_node_joins() {
    let Some(mut nodes) = cluster_of(&["node-a", "node-b", "node-c"], &[]) else {
        return;
    };
    settled(&nodes[0], &["node-a", "node-b", "node-c"], LEASE * 4).await;
    upload_push_cert(&nodes[0]).await;
    let devices = fleet(&nodes[0], 24);
    for device in &devices {
        device.enroll(&nodes[0]).await;
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    let all = ids.join(",");
    let mut owed: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut enqueue_round = async |via: &Server, round: usize| {
        let uuid = format!("STORM-{round:03}");
        let (status, body) = enqueue(via, &all, &uuid, "DeviceInformation").await;
        assert!([200, 207, 503].contains(&status), "{status} {body}");
        let taken = acknowledged(status, &body, &ids);
        for id in &taken {
            owed.entry(id.clone()).or_default().push(uuid.clone());
        }
        taken.len() == ids.len()
    };

    // A storm through the two surviving nodes; the third is killed a few rounds in.
    let mut round = 0;
    for _ in 0..5 {
        round += 1;
        assert!(enqueue_round(&nodes[round % 2], round).await);
    }
    nodes[2].kill9();
    let killed = Instant::now();
    let served_again = loop {
        round += 1;
        if enqueue_round(&nodes[round % 2], round).await {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < LEASE * 4,
            "the killed node's shards stay unserved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("every device acknowledged again {served_again:?} after kill -9 (lease {LEASE:?})");
    assert!(
        served_again <= LEASE * 2 + Duration::from_millis(500),
        "served within 2 × lease: {served_again:?}"
    );

    // A fourth node joins mid-storm and takes its share by hand-off.
    let store = nodes[0].store().clone();
    let lease = LEASE_SECS.to_string();
    let args = [
        "--cluster-secret",
        SECRET,
        "--node-id",
        "node-d",
        "--lease-secs",
        &lease,
    ];
    nodes.push(Server::start_on(store, &args));
    let joined = Instant::now();
    while joined.elapsed() < LEASE * 3 && round < 40 {
        round += 1;
        enqueue_round(&nodes[[0, 1, 3][round % 3]], round).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settled(&nodes[3], &["node-a", "node-b", "node-d"], LEASE * 3).await;

    // Every acknowledged command arrives once, in order; nothing arrives twice.
    for (index, device) in devices.iter().enumerate() {
        let via = &nodes[[0, 1, 3][index % 3]];
        let delivered = device.drain(via).await;
        let unique: std::collections::BTreeSet<&String> = delivered.iter().collect();
        assert_eq!(
            unique.len(),
            delivered.len(),
            "a command came twice: {delivered:?}"
        );
        let owed = &owed[&device.udid];
        let acknowledged_in_order: Vec<&String> =
            delivered.iter().filter(|c| owed.contains(c)).collect();
        assert_eq!(
            acknowledged_in_order,
            owed.iter().collect::<Vec<_>>(),
            "{}: every acknowledged command, once, in order",
            device.udid
        );
    }
}

/// Start `orchard serve` on `store` without `--api-key` and read the key it prints.
fn printed_api_key(store: &StoreUnderTest, data_dir: &std::path::Path) -> String {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_orchard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cluster-secret",
            SECRET,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(store.args())
        .env("ORCHARD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let key = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find(|line| line.starts_with("API key ("))
        .and_then(|line| line.rsplit(' ').next().map(str::to_string));
    child.kill().unwrap();
    child.wait().unwrap();
    key.expect("the node prints its API key")
}

#[test]
fn the_generated_api_key_is_the_same_on_every_node_of_a_keyspace() {
    let Some(cql) = cql::server() else {
        cql::skip("Orchard cluster");
        return;
    };
    let store = StoreUnderTest::Cql {
        nodes: vec![cql],
        keyspace: cql::fresh_keyspace(),
    };
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = printed_api_key(&store, first.path());
    assert_eq!(printed_api_key(&store, second.path()), key);
    let kept = std::fs::read_to_string(second.path().join("api-key")).unwrap();
    assert_eq!(kept.trim(), key, "kept in the second node's data dir too");
}

#[test]
fn a_node_that_would_advertise_an_unspecified_address_refuses_to_start() {
    let Some(cql) = cql::server() else {
        cql::skip("Orchard cluster");
        return;
    };
    let store = StoreUnderTest::Cql {
        nodes: vec![cql],
        keyspace: cql::fresh_keyspace(),
    };
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orchard"))
        .args(["serve", "--listen", "0.0.0.0:0", "--cluster-secret", SECRET])
        .arg("--data-dir")
        .arg(dir.path())
        .args(store.args())
        .env("ORCHARD_LOG", "warn")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--advertise-url"), "{stderr}");
}
