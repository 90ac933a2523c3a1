//! APNs wake-ups (protocol.md §4) against a real local HTTP/2-over-TLS APNs peer that
//! verifies the push certificate and can answer like Apple does on a bad day.

mod common;

use std::time::{Duration, Instant};

use apns_peer::{Behavior, Outcome, PeerConfig};
use common::*;

const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";

/// A server wired to a peer that trusts the server's push certificate, and one enrolled device.
async fn setup(config: PeerConfig, extra: &[&str]) -> (Peer, Server, Device, String) {
    let pem = push_certificate_pem(TOPIC);
    let peer = Peer::start(PeerConfig {
        trusted_client_certs: vec![certificate_der(&pem)],
        ..config
    });
    let mut args = peer.server_args();
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(&args);
    upload_this_push_cert(&server, &pem).await;
    let device = Device::new(&server, UDID);
    device.enroll(&server).await;
    (peer, server, device, pem)
}

async fn push(server: &Server, ids: &str) -> (u16, serde_json::Value) {
    api_get(server, &format!("/api/v1/nanomdm/push/{ids}")).await
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn an_enqueue_wakes_the_device_with_an_mdm_push() {
    let (peer, server, device, _) = setup(PeerConfig::default(), &[]).await;
    let response = client()
        .put(server.url(&format!("/api/v1/nanomdm/enqueue/{UDID}")))
        .bearer_auth(API_KEY)
        .send_body(command_plist("WAKE-1", "ProfileList"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = serde_json::from_slice(&body_of(response).await).unwrap();
    let apns_id = body["status"][UDID]["push_result"]
        .as_str()
        .unwrap()
        .to_string();
    let pushes = peer.peer.recent();
    assert_eq!(pushes.len(), 1);
    let pushed = &pushes[0];
    assert_eq!(pushed.token_hex, device.push_token_hex());
    assert_eq!(
        pushed.push_magic.as_deref(),
        Some(device.push_magic().as_str())
    );
    assert_eq!(pushed.topic.as_deref(), Some(TOPIC));
    assert_eq!(
        pushed.apns_id.to_lowercase(),
        apns_id.to_lowercase(),
        "the API reports APNs' apns-id"
    );
}

#[actix_rt::test]
async fn the_push_request_carries_the_mdm_headers() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let record = std::sync::Arc::clone(&seen);
    let config = PeerConfig {
        behavior: Behavior::from_fn(move |request| {
            *record.lock().unwrap() = Some(request.clone());
            Outcome::Accept
        }),
        ..PeerConfig::default()
    };
    let (_peer, server, device, _) = setup(config, &["--apns-expiration-secs", "3600"]).await;
    assert_eq!(push(&server, UDID).await.0, 200);
    let request = seen.lock().unwrap().clone().expect("a push arrived");
    assert_eq!(request.token_hex, device.push_token_hex());
    assert_eq!(request.topic.as_deref(), Some(TOPIC));
    assert_eq!(request.push_type.as_deref(), Some("mdm"));
    assert_eq!(request.priority.as_deref(), Some("10"));
    let expiration: u64 = request.expiration.unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((now + 3590..=now + 3610).contains(&expiration));
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body, serde_json::json!({ "mdm": device.push_magic() }));
}

#[actix_rt::test]
async fn a_burst_of_enqueues_produces_one_push_until_the_device_connects() {
    let (peer, server, device, _) = setup(PeerConfig::default(), &[]).await;
    for n in 0..5 {
        let (status, body) = api_put(
            &server,
            &format!("/api/v1/nanomdm/enqueue/{UDID}"),
            command_plist(&format!("BURST-{n}"), "ProfileList"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        peer.delivered_to(&device),
        1,
        "one pending wake-up is enough"
    );
    assert_eq!(device.drain(&server).await.len(), 5);
    api_put(
        &server,
        &format!("/api/v1/nanomdm/enqueue/{UDID}"),
        command_plist("AFTER", "ProfileList"),
    )
    .await;
    assert_eq!(
        peer.delivered_to(&device),
        2,
        "after the device connected, a new command pushes again"
    );
    assert!(metrics_text(&server)
        .await
        .contains("orchard_pushes_coalesced_total"));
}

#[actix_rt::test]
async fn unregistered_and_bad_tokens_are_marked_invalid_until_the_next_token_update() {
    for (status, reason) in [
        (410, "Unregistered"),
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
    ] {
        let config = PeerConfig {
            behavior: Behavior::from_fn(move |_| Outcome::reject(status, reason)),
            ..PeerConfig::default()
        };
        let (peer, server, device, _) = setup(config, &[]).await;
        let (_, body) = push(&server, UDID).await;
        assert!(body["status"][UDID]["push_error"]
            .as_str()
            .unwrap()
            .contains(reason));
        let (_, info) = api_get(&server, &format!("/api/v1/devices/{UDID}")).await;
        assert_eq!(info["push_token_valid"], false, "{reason}");
        let requests = peer.peer.request_count();
        let (_, again) = push(&server, UDID).await;
        assert!(again["status"][UDID]["push_error"]
            .as_str()
            .unwrap()
            .contains("invalid"));
        assert_eq!(
            peer.peer.request_count(),
            requests,
            "a dead token is not pushed again"
        );

        peer.peer.set_behavior(Behavior::accept_all());
        assert_eq!(device.checkin(&server, device.token_update()).await.0, 200);
        let (status, _) = push(&server, UDID).await;
        assert_eq!(status, 200, "a TokenUpdate makes the device pushable again");
    }
}

#[actix_rt::test]
async fn a_rejected_push_certificate_stops_the_topic_and_keeps_the_queue() {
    let pem = push_certificate_pem(TOPIC);
    let other = push_certificate_pem(TOPIC);
    let peer = Peer::start(PeerConfig {
        trusted_client_certs: vec![certificate_der(&other)],
        ..PeerConfig::default()
    });
    let args = peer.server_args();
    let server = Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    upload_this_push_cert(&server, &pem).await;
    let device = Device::new(&server, UDID);
    device.enroll(&server).await;

    let (_, body) = api_put(
        &server,
        &format!("/api/v1/nanomdm/enqueue/{UDID}"),
        command_plist("KEPT", "ProfileList"),
    )
    .await;
    assert!(
        body["status"][UDID]["push_error"]
            .as_str()
            .unwrap()
            .contains("BadCertificate"),
        "{body}"
    );
    let (_, cert) = api_get(&server, &format!("/api/v1/nanomdm/pushcert?topic={TOPIC}")).await;
    assert_eq!(cert["status"], "stopped");
    assert!(cert["stopped_reason"]
        .as_str()
        .unwrap()
        .contains("BadCertificate"));
    let requests = peer.peer.request_count();
    push(&server, UDID).await;
    assert_eq!(
        peer.peer.request_count(),
        requests,
        "nothing is sent on a stopped topic"
    );
    assert!(metrics_text(&server).await.contains("orchard_apns_topic_stopped{topic=\"com.apple.mgmt.External.e0bd1eac-1f17-4c8e-8a63-dd17d3dd35d9\"} 1"));

    assert_eq!(device.drain(&server).await, ["KEPT"], "the queue is intact");
    upload_this_push_cert(&server, &other).await;
    let (status, body) = push(&server, UDID).await;
    assert_eq!(status, 200, "a new certificate lifts the stop: {body}");
}

#[actix_rt::test]
async fn too_many_requests_backs_the_device_off() {
    let config = PeerConfig {
        behavior: Behavior::from_fn(|_| Outcome::reject(429, "TooManyRequests")),
        ..PeerConfig::default()
    };
    let (peer, server, _device, _) = setup(config, &[]).await;
    let (_, first) = push(&server, UDID).await;
    assert!(first["status"][UDID]["push_error"]
        .as_str()
        .unwrap()
        .contains("TooManyRequests"));
    let requests = peer.peer.request_count();
    let (_, second) = push(&server, UDID).await;
    assert!(second["status"][UDID]["push_error"]
        .as_str()
        .unwrap()
        .contains("backing off"));
    assert_eq!(peer.peer.request_count(), requests);
}

#[actix_rt::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let count = std::sync::Arc::clone(&failures);
    let config = PeerConfig {
        behavior: Behavior::from_fn(move |_| {
            if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                Outcome::reject(503, "ServiceUnavailable")
            } else {
                Outcome::Accept
            }
        }),
        ..PeerConfig::default()
    };
    let (peer, server, _device, _) = setup(config, &[]).await;
    let (status, body) = push(&server, UDID).await;
    assert_eq!(status, 200, "503, 503, then accepted: {body}");
    assert!(body["status"][UDID]["push_result"].is_string());
    assert_eq!(peer.peer.request_count(), 3);

    peer.peer.set_behavior(Behavior::from_fn(|_| {
        Outcome::reject(500, "InternalServerError")
    }));
    let (_, body) = push(&server, UDID).await;
    assert!(body["status"][UDID]["push_error"]
        .as_str()
        .unwrap()
        .contains("gave up after 3 attempts"));
    assert_eq!(peer.peer.request_count(), 6, "never retried forever");
}

#[actix_rt::test]
async fn payload_too_large_and_other_client_errors_are_dropped_with_their_reason() {
    let config = PeerConfig {
        behavior: Behavior::from_fn(|_| Outcome::reject(413, "PayloadTooLarge")),
        ..PeerConfig::default()
    };
    let (peer, server, _device, _) = setup(config, &[]).await;
    let (_, body) = push(&server, UDID).await;
    assert!(body["status"][UDID]["push_error"]
        .as_str()
        .unwrap()
        .contains("PayloadTooLarge"));
    assert_eq!(peer.peer.request_count(), 1, "not retried");
}

#[actix_rt::test]
async fn goaway_finishes_in_flight_pushes_and_reconnects() {
    let config = PeerConfig {
        goaway_after_streams: Some(3),
        ..PeerConfig::default()
    };
    let (peer, server, _device, _) = setup(config, &["--apns-connections", "1"]).await;
    let devices: Vec<Device> = (0..12)
        .map(|n| Device::new(&server, &format!("GOAWAY-{n:02}")))
        .collect();
    for device in &devices {
        device.enroll(&server).await;
        let (status, body) = push(&server, &device.udid).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(devices.iter().all(|d| peer.delivered_to(d) == 1));
    assert!(
        peer.peer.connections_accepted() >= 4,
        "reconnected after each GOAWAY: {} connections",
        peer.peer.connections_accepted()
    );
}

#[actix_rt::test]
async fn a_stream_limit_of_one_is_honoured() {
    let config = PeerConfig {
        max_concurrent_streams: 1,
        behavior: Behavior::from_fn(|_| Outcome::Accept.after(Duration::from_millis(5))),
        ..PeerConfig::default()
    };
    let (peer, server, _device, _) = setup(config, &["--apns-connections", "1"]).await;
    let devices: Vec<Device> = (0..20)
        .map(|n| Device::new(&server, &format!("LIMIT-{n:02}")))
        .collect();
    for device in &devices {
        device.enroll(&server).await;
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    let (status, _) = push(&server, &ids.join(",")).await;
    assert_eq!(status, 200);
    assert_eq!(peer.peer.push_count(), 20);
    assert_eq!(peer.peer.max_concurrent_streams_seen(), 1);
}

#[actix_rt::test]
async fn many_pushes_share_a_small_pool_of_connections() {
    let (peer, server, _device, _) = setup(PeerConfig::default(), &[]).await;
    let devices: Vec<Device> = (0..50)
        .map(|n| Device::new(&server, &format!("POOL-{n:02}")))
        .collect();
    for device in &devices {
        device.enroll(&server).await;
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    for _ in 0..3 {
        assert_eq!(push(&server, &ids.join(",")).await.0, 200);
    }
    assert_eq!(peer.peer.push_count(), 150);
    assert!(
        peer.peer.connections_accepted() <= 2,
        "never one connection per push"
    );
    let metrics = metrics_text(&server).await;
    assert!(metrics.contains("orchard_pushes_total{outcome=\"sent\",reason=\"\"} 150\n"));
    assert!(metrics.contains("orchard_push_duration_seconds_count 150\n"));
    let connections = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(&format!("orchard_apns_connections{{topic=\"{TOPIC}\"}} "))
        })
        .expect("the topic's connections on /metrics");
    assert!(
        (1.0..=2.0).contains(&connections.parse::<f64>().unwrap()),
        "{connections} open connections"
    );
}

#[actix_rt::test]
async fn a_device_with_pending_commands_that_stays_quiet_is_pushed_again() {
    let (peer, server, device, _) = setup(
        PeerConfig::default(),
        &["--repush-after-secs", "1", "--repush-interval-secs", "1"],
    )
    .await;
    enqueue(&server, UDID, "WAITING", "ProfileList").await;
    assert_eq!(
        peer.delivered_to(&device),
        0,
        "nopush: nothing sent on enqueue"
    );
    eventually("a re-push", || peer.delivered_to(&device) >= 1).await;
    assert_eq!(device.drain(&server).await, ["WAITING"]);
    let after_drain = peer.delivered_to(&device);
    actix_rt::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        peer.delivered_to(&device),
        after_drain,
        "no re-push once the queue is empty"
    );
}

#[actix_rt::test]
async fn a_not_now_schedules_a_later_push() {
    let (peer, server, device, _) = setup(
        PeerConfig::default(),
        &["--repush-after-secs", "1", "--repush-interval-secs", "1"],
    )
    .await;
    enqueue(&server, UDID, "LATER", "ProfileList").await;
    device.connect(&server, device.idle()).await;
    device
        .connect(&server, device.report("NotNow", Some("LATER")))
        .await;
    let before = peer.delivered_to(&device);
    eventually("a push after NotNow", || {
        peer.delivered_to(&device) > before
    })
    .await;
}

#[actix_rt::test]
async fn a_checked_out_device_is_never_pushed() {
    let (peer, server, device, _) = setup(
        PeerConfig::default(),
        &["--repush-after-secs", "1", "--repush-interval-secs", "1"],
    )
    .await;
    let mut checkout = fixture_dict("nanomdm/TokenUpdate.2.plist");
    checkout.insert("MessageType".into(), "CheckOut".into());
    checkout.insert("UDID".into(), UDID.into());
    assert_eq!(device.checkin(&server, to_xml(&checkout)).await.0, 200);
    let (status, _) = api_put(
        &server,
        &format!("/api/v1/nanomdm/enqueue/{UDID}"),
        command_plist("NEVER", "ProfileList"),
    )
    .await;
    assert_eq!(status, 200);
    push(&server, UDID).await;
    actix_rt::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(peer.peer.request_count(), 0);
}

#[actix_rt::test]
async fn a_pkcs12_push_certificate_is_accepted_with_its_password() {
    let pem = push_certificate_pem(TOPIC);
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("push.pem");
    std::fs::write(&bundle, &pem).unwrap();
    let p12 = dir.path().join("push.p12");
    let status = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-in"])
        .arg(&bundle)
        .args(["-passout", "pass:secret", "-out"])
        .arg(&p12)
        .status()
        .expect("openssl CLI");
    assert!(status.success());
    let server = Server::start();
    let response = client()
        .put(server.url("/api/v1/nanomdm/pushcert"))
        .bearer_auth(API_KEY)
        .insert_header(("X-Password", "secret"))
        .send_body(std::fs::read(&p12).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let wrong = client()
        .put(server.url("/api/v1/nanomdm/pushcert"))
        .bearer_auth(API_KEY)
        .insert_header(("X-Password", "wrong"))
        .send_body(std::fs::read(&p12).unwrap())
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 400);
}

#[actix_rt::test]
async fn each_topic_pushes_with_its_own_certificate_over_its_own_connections() {
    const OTHER_TOPIC: &str = "com.apple.mgmt.External.2f7c9b1e-0000-4000-8000-00000000beef";
    let (first, second) = (
        push_certificate_pem(TOPIC),
        push_certificate_pem(OTHER_TOPIC),
    );
    let peer = Peer::start(PeerConfig {
        trusted_client_certs: vec![certificate_der(&first), certificate_der(&second)],
        ..PeerConfig::default()
    });
    let args = peer.server_args();
    let server = Server::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    upload_this_push_cert(&server, &first).await;
    let (status, body) = api_put(
        &server,
        "/api/v1/nanomdm/pushcert",
        second.as_bytes().to_vec(),
    )
    .await;
    assert_eq!((status, body["topic"].as_str()), (200, Some(OTHER_TOPIC)));

    let ours = Device::new(&server, "TOPIC-A-DEVICE");
    ours.enroll(&server).await;
    let theirs = Device::new(&server, "TOPIC-B-DEVICE");
    let mut authenticate = fixture_dict("nanomdm/Authenticate.2.plist");
    authenticate.insert("UDID".into(), theirs.udid.clone().into());
    authenticate.insert("Topic".into(), OTHER_TOPIC.into());
    assert_eq!(theirs.checkin(&server, to_xml(&authenticate)).await.0, 200);
    let mut token_update: plist::Dictionary = plist::from_bytes(&theirs.token_update()).unwrap();
    token_update.insert("Topic".into(), OTHER_TOPIC.into());
    assert_eq!(theirs.checkin(&server, to_xml(&token_update)).await.0, 200);

    let (status, body) = push(&server, "TOPIC-A-DEVICE,TOPIC-B-DEVICE").await;
    assert_eq!(status, 200, "{body}");
    let topics: std::collections::BTreeMap<String, Option<String>> = peer
        .peer
        .recent()
        .into_iter()
        .map(|p| (p.token_hex, p.topic))
        .collect();
    assert_eq!(topics[&ours.push_token_hex()].as_deref(), Some(TOPIC));
    assert_eq!(
        topics[&theirs.push_token_hex()].as_deref(),
        Some(OTHER_TOPIC)
    );
    assert_eq!(peer.peer.connections_accepted(), 2, "one pool per topic");
}
