//! Acknowledged data is durable before the 2xx: a `kill -9` loses no enqueued command,
//! and after a restart on the same data dir every command is delivered exactly once and
//! in order. On the CQL store, a crash between the statements of one change leaves
//! nothing anyone can see.

mod common;

use std::time::Duration;

use common::*;

const DEVICES: usize = 40;
const COMMANDS_PER_DEVICE: usize = 3;

fn udid(n: usize) -> String {
    format!("00008103-{n:016X}")
}

#[actix_rt::test]
async fn kill_9_loses_no_acknowledged_command() {
    let mut server = Server::start();
    let devices: Vec<Device> = (0..DEVICES)
        .map(|n| Device::new(&server, &udid(n)))
        .collect();
    for device in &devices {
        device.enroll(&server).await;
    }
    let all_ids: Vec<String> = devices.iter().map(|d| d.udid.clone()).collect();
    for c in 0..COMMANDS_PER_DEVICE {
        let (status, body) = enqueue(
            &server,
            &all_ids.join(","),
            &format!("BULK-{c}"),
            "ProfileList",
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for (n, device) in devices.iter().enumerate() {
        let (status, _) = enqueue(&server, &device.udid, &format!("OWN-{n}"), "SecurityInfo").await;
        assert_eq!(status, 200);
    }
    // The first device takes its first command and acknowledges it before the crash.
    let first = &devices[0];
    let (_, body) = first.connect(&server, first.idle()).await;
    assert!(!body.is_empty());
    assert_eq!(
        first
            .connect(&server, first.report("Acknowledged", Some("BULK-0")))
            .await
            .0,
        200
    );

    server.kill9();
    server.restart();

    for (n, device) in devices.iter().enumerate() {
        let mut expected: Vec<String> = (0..COMMANDS_PER_DEVICE)
            .map(|c| format!("BULK-{c}"))
            .collect();
        expected.push(format!("OWN-{n}"));
        if n == 0 {
            expected.remove(0);
        }
        assert_eq!(device.drain(&server).await, expected, "device {n}");
        assert!(
            device.drain(&server).await.is_empty(),
            "delivered exactly once"
        );
    }
    let (_, history) = api_get(&server, &format!("/api/v1/devices/{}/commands", first.udid)).await;
    assert_eq!(history[0]["command_uuid"], "BULK-0");
    assert_eq!(
        history[0]["status"], "Acknowledged",
        "the pre-crash result survived"
    );
}

#[actix_rt::test]
async fn enrollment_state_survives_a_crash() {
    let mut server = Server::start();
    let device = Device::new(&server, &udid(7));
    device.enroll(&server).await;
    server.restart();
    let (status, info) = api_get(&server, &format!("/api/v1/devices/{}", device.udid)).await;
    assert_eq!(status, 200);
    assert_eq!(info["enabled"], true);
    assert_eq!(
        device.connect(&server, device.idle()).await.0,
        200,
        "the certificate binding survived"
    );
}

/// The CQL store writes a command's body before the queue entry that refers to it. A
/// crash between the two leaves a body nothing refers to: the enqueue was never
/// acknowledged, the device is offered nothing, and enqueueing again delivers it once.
#[actix_rt::test]
async fn a_crash_between_a_command_body_and_its_queue_entry_leaves_nothing_visible() {
    let mut server = Server::start();
    if !matches!(server.store(), StoreUnderTest::Cql { .. }) {
        eprintln!("skipped: the failpoint is the CQL store's (set ORCHARD_TEST_STORE=scylla)");
        return;
    }
    let device = Device::new(&server, &udid(9));
    device.enroll(&server).await;
    server.set_env("ORCHARD_FAILPOINT", Some("apply:before-device-rows"));
    server.restart();

    let answer = client()
        .put(server.url(&format!("/api/v1/nanomdm/enqueue/{}?nopush=1", device.udid)))
        .bearer_auth(API_KEY)
        .send_body(command_plist("CRASH-1", "ProfileList"))
        .await;
    assert!(
        answer.is_err(),
        "no answer from a server that crashed mid-write"
    );
    assert!(
        server.exited_within(Duration::from_secs(10)),
        "the failpoint fired"
    );

    server.set_env("ORCHARD_FAILPOINT", None);
    server.restart();
    assert!(
        device.drain(&server).await.is_empty(),
        "no entry without its write"
    );
    let (_, history) = api_get(
        &server,
        &format!("/api/v1/devices/{}/commands", device.udid),
    )
    .await;
    assert_eq!(history, serde_json::json!([]));

    let (status, _) = enqueue(&server, &device.udid, "CRASH-1", "ProfileList").await;
    assert_eq!(status, 200);
    assert_eq!(device.drain(&server).await, ["CRASH-1"]);
    assert!(
        device.drain(&server).await.is_empty(),
        "delivered exactly once"
    );
}
