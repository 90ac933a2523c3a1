//! Check-in (protocol.md §2): the eight message types on device and user channels, with
//! the real Authenticate/TokenUpdate fixtures.

mod common;

use common::*;
use plist::{Dictionary, Value};

const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";

#[actix_rt::test]
async fn authenticate_then_token_update_makes_the_device_pushable() {
    let server = Server::start();
    let device = Device::new(&server, UDID);
    assert_eq!(
        device.checkin(&server, device.authenticate()).await,
        (200, vec![])
    );
    let (_, after_auth) = api_get(&server, &format!("/api/v1/devices/{UDID}")).await;
    assert_eq!(
        after_auth["enabled"], false,
        "not pushable before TokenUpdate"
    );
    assert_eq!(after_auth["device_info"]["SerialNumber"], "C02MT66KFLHH");
    assert_eq!(
        device.checkin(&server, device.token_update()).await,
        (200, vec![])
    );
    let (status, after_token) = api_get(&server, &format!("/api/v1/devices/{UDID}")).await;
    assert_eq!(status, 200);
    assert_eq!(after_token["enabled"], true);
    assert_eq!(after_token["push_token_valid"], true);
    assert_eq!(after_token["topic"], TOPIC);
    assert_eq!(after_token["token_update_count"], 1);
}

#[actix_rt::test]
async fn check_out_disables_the_enrollment() {
    let (server, device) = enrolled_device(UDID).await;
    assert_eq!(
        device
            .checkin(&server, message(&device, "CheckOut", &[]))
            .await
            .0,
        200
    );
    let (_, info) = api_get(&server, &format!("/api/v1/devices/{UDID}")).await;
    assert_eq!(info["enabled"], false);
    let (status, push) = api_get(&server, &format!("/api/v1/nanomdm/push/{UDID}")).await;
    assert_eq!(status, 404, "a checked-out device is never pushed: {push}");
}

#[actix_rt::test]
async fn the_bootstrap_token_is_escrowed_and_returned() {
    let (server, device) = enrolled_device(UDID).await;
    let (status, body) = device
        .checkin(&server, message(&device, "GetBootstrapToken", &[]))
        .await;
    assert_eq!(
        (status, body.len()),
        (200, 0),
        "nothing escrowed yet: empty body"
    );
    let token = b"bootstrap-secret".to_vec();
    let set = message(
        &device,
        "SetBootstrapToken",
        &[("BootstrapToken", Value::Data(token.clone()))],
    );
    assert_eq!(device.checkin(&server, set).await.0, 200);
    let (status, body) = device
        .checkin(&server, message(&device, "GetBootstrapToken", &[]))
        .await;
    assert_eq!(status, 200);
    let reply: Dictionary = plist::from_bytes(&body).unwrap();
    assert_eq!(reply["BootstrapToken"].as_data(), Some(&token[..]));
}

#[actix_rt::test]
async fn user_authenticate_is_declined_with_410_by_default() {
    let (server, device) = enrolled_device(UDID).await;
    let body = message(
        &device,
        "UserAuthenticate",
        &[("UserID", "501-USER".into())],
    );
    assert_eq!(device.checkin(&server, body).await.0, 410);
}

#[actix_rt::test]
async fn user_authenticate_can_answer_an_empty_digest_challenge() {
    let server = Server::start_with(&["--user-authenticate", "empty-challenge"]);
    let device = Device::new(&server, UDID);
    device.enroll(&server).await;
    let first = message(
        &device,
        "UserAuthenticate",
        &[("UserID", "501-USER".into())],
    );
    let (status, body) = device.checkin(&server, first).await;
    assert_eq!(status, 200);
    let challenge: Dictionary = plist::from_bytes(&body).unwrap();
    assert_eq!(challenge["DigestChallenge"].as_string(), Some(""));
    let second = message(
        &device,
        "UserAuthenticate",
        &[
            ("UserID", "501-USER".into()),
            ("DigestResponse", "x".into()),
        ],
    );
    assert_eq!(device.checkin(&server, second).await, (200, vec![]));
}

#[actix_rt::test]
async fn get_token_without_a_token_service_is_a_clear_4xx() {
    let (server, device) = enrolled_device(UDID).await;
    let body = message(
        &device,
        "GetToken",
        &[("TokenServiceType", "com.apple.maid".into())],
    );
    let (status, reason) = device.checkin(&server, body).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&reason).contains("token service"));
}

#[actix_rt::test]
async fn a_user_channel_enrolls_through_its_device_and_has_its_own_queue() {
    let (server, device) = enrolled_device(UDID).await;
    let user_token_update = message(
        &device,
        "TokenUpdate",
        &[
            ("UserID", "A1B2-USER".into()),
            ("UserShortName", "alice".into()),
            ("Token", Value::Data(vec![7; 32])),
            ("PushMagic", "USER-MAGIC".into()),
        ],
    );
    assert_eq!(device.checkin(&server, user_token_update).await.0, 200);
    let user_id = format!("{UDID}:A1B2-USER");
    let (status, user) = api_get(&server, &format!("/api/v1/devices/{user_id}")).await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["kind"], "User");
    let (_, parent) = api_get(&server, &format!("/api/v1/devices/{UDID}")).await;
    assert_eq!(parent["user_channels"][0], user_id);

    enqueue(&server, &user_id, "USER-CMD-1", "ProfileList").await;
    let (_, device_next) = device.connect(&server, device.idle()).await;
    assert!(
        device_next.is_empty(),
        "the device channel's queue is separate"
    );
    let mut user_idle = Dictionary::new();
    user_idle.insert("UDID".into(), UDID.into());
    user_idle.insert("UserID".into(), "A1B2-USER".into());
    user_idle.insert("Status".into(), "Idle".into());
    let (status, body) = device.connect(&server, to_xml(&user_idle)).await;
    assert_eq!(status, 200);
    let command: Dictionary = plist::from_bytes(&body).unwrap();
    assert_eq!(command["CommandUUID"].as_string(), Some("USER-CMD-1"));
}

#[actix_rt::test]
async fn re_enrollment_clears_the_queue_and_rebinds_the_new_certificate() {
    let server = Server::start();
    let before = Device::new(&server, UDID);
    before.enroll(&server).await;
    enqueue(&server, UDID, "STALE-1", "ProfileList").await;
    let after = Device::new(&server, UDID);
    after.enroll(&server).await;
    assert!(
        after.drain(&server).await.is_empty(),
        "stale commands are cleared on Authenticate"
    );
    let (status, _) = before.connect(&server, before.idle()).await;
    assert_eq!(status, 403, "the previous identity is no longer bound");
    let (_, info) = api_get(&server, &format!("/api/v1/devices/{UDID}")).await;
    assert_eq!(info["enrollment_generation"], 2);
}

#[actix_rt::test]
async fn token_update_before_authenticate_is_refused() {
    let server = Server::start();
    let device = Device::new(&server, UDID);
    let (status, body) = device.checkin(&server, device.token_update()).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
}

/// Every check-in is logged in its own span: concurrent check-ins on one worker thread do
/// not nest inside each other's spans (a span left entered across an await did, until
/// the log lines grew without bound and the worker's stack overflowed).
#[actix_rt::test]
async fn concurrent_check_ins_are_logged_each_in_its_own_span() {
    let server = Server::start_logging("warn,orchard=debug", &["--workers", "1"]);
    let devices: Vec<Device> = (0..32)
        .map(|n| Device::new(&server, &format!("5BA40000-0000-4000-8000-{n:012X}")))
        .collect();
    futures_util::future::join_all(devices.iter().map(|d| d.enroll(&server))).await;
    let log = server.log();
    let plain = |line: &str| {
        let mut text = String::new();
        let mut escape = false;
        for c in line.chars() {
            match (escape, c) {
                (false, '\u{1b}') => escape = true,
                (true, 'm') => escape = false,
                (false, c) => text.push(c),
                _ => {}
            }
        }
        text
    };
    let spans: Vec<usize> = log
        .lines()
        .map(|line| plain(line).matches("checkin{").count())
        .filter(|&n| n > 0)
        .collect();
    assert!(!spans.is_empty(), "check-ins are logged at debug:\n{log}");
    assert!(
        spans.iter().all(|&n| n == 1),
        "a check-in logged inside another's span: up to {} nested",
        spans.iter().max().unwrap()
    );
}
