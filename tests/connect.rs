//! Connect (protocol.md §3): the command queue as a device sees it.

mod common;

use common::*;
use plist::Dictionary;

const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";

fn command_uuid(body: &[u8]) -> String {
    let command: Dictionary = plist::from_bytes(body).unwrap();
    command["CommandUUID"].as_string().unwrap().to_string()
}

#[actix_rt::test]
async fn idle_with_an_empty_queue_gets_an_empty_200() {
    let (server, device) = enrolled_device(UDID).await;
    assert_eq!(device.connect(&server, device.idle()).await, (200, vec![]));
}

#[actix_rt::test]
async fn an_enqueued_command_is_delivered_verbatim_and_its_result_stored() {
    let (server, device) = enrolled_device(UDID).await;
    let command = command_plist("7A5C2E4E-0000-4000-8000-000000000001", "ProfileList");
    let (status, body) = api_put(
        &server,
        &format!("/api/v1/nanomdm/enqueue/{UDID}?nopush=1"),
        command.clone(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"no_push": true, "command_uuid": "7A5C2E4E-0000-4000-8000-000000000001", "request_type": "ProfileList"})
    );

    let (status, delivered) = device.connect(&server, device.idle()).await;
    assert_eq!((status, &delivered), (200, &command));

    let mut result = fixture_dict("nanomdm/DeviceInformation.1.plist");
    result.insert(
        "CommandUUID".into(),
        "7A5C2E4E-0000-4000-8000-000000000001".into(),
    );
    result.insert("UDID".into(), UDID.into());
    let raw_result = to_xml(&result);
    assert_eq!(
        device.connect(&server, raw_result.clone()).await,
        (200, vec![])
    );

    let (_, history) = api_get(&server, &format!("/api/v1/devices/{UDID}/commands")).await;
    assert_eq!(history[0]["status"], "Acknowledged");
    assert_eq!(history[0]["request_type"], "ProfileList");
    assert_eq!(
        history[0]["result"].as_str().unwrap().as_bytes(),
        &raw_result[..]
    );
}

#[actix_rt::test]
async fn commands_are_delivered_first_in_first_out() {
    let (server, device) = enrolled_device(UDID).await;
    for n in 1..=5 {
        enqueue(&server, UDID, &format!("CMD-{n}"), "ProfileList").await;
    }
    let expected: Vec<String> = (1..=5).map(|n| format!("CMD-{n}")).collect();
    assert_eq!(device.drain(&server).await, expected);
}

#[actix_rt::test]
async fn a_higher_priority_command_is_delivered_first() {
    let (server, device) = enrolled_device(UDID).await;
    enqueue(&server, UDID, "NORMAL", "ProfileList").await;
    let (status, _) = api_post_json(&server, &format!("/api/v1/devices/{UDID}/commands"), serde_json::json!({
        "request_type": "SecurityInfo", "priority": 10, "command_uuid": "URGENT", "no_push": true
    })).await;
    assert_eq!(status, 201);
    assert_eq!(device.drain(&server).await, ["URGENT", "NORMAL"]);
}

#[actix_rt::test]
async fn a_resent_result_is_stored_once_and_the_queue_moves_on() {
    let (server, device) = enrolled_device(UDID).await;
    enqueue(&server, UDID, "A", "ProfileList").await;
    enqueue(&server, UDID, "B", "ProfileList").await;
    device.connect(&server, device.idle()).await;
    let ack = device.report("Acknowledged", Some("A"));
    let (_, next) = device.connect(&server, ack.clone()).await;
    assert_eq!(command_uuid(&next), "B");
    let (status, next_again) = device.connect(&server, ack).await;
    assert_eq!(status, 200);
    assert_eq!(command_uuid(&next_again), "B");
    let (_, history) = api_get(&server, &format!("/api/v1/devices/{UDID}/commands")).await;
    let statuses: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["command_uuid"].clone(), c["status"].clone()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("A".into(), "Acknowledged".into()),
            ("B".into(), "pending".into())
        ]
    );
}

#[actix_rt::test]
async fn not_now_skips_to_commands_never_answered_not_now_and_retries_them_later() {
    let (server, device) = enrolled_device(UDID).await;
    enqueue(&server, UDID, "A", "ProfileList").await;
    enqueue(&server, UDID, "B", "ProfileList").await;
    let (_, first) = device.connect(&server, device.idle()).await;
    assert_eq!(command_uuid(&first), "A");
    let (_, second) = device
        .connect(&server, device.report("NotNow", Some("A")))
        .await;
    assert_eq!(
        command_uuid(&second),
        "B",
        "A was answered NotNow: skipped in this session"
    );
    let (_, end) = device
        .connect(&server, device.report("NotNow", Some("B")))
        .await;
    assert!(
        end.is_empty(),
        "everything answered NotNow: the session ends"
    );
    let (_, history) = api_get(&server, &format!("/api/v1/devices/{UDID}/commands")).await;
    assert_eq!(history[0]["status"], "NotNow");
    let (_, retry) = device.connect(&server, device.idle()).await;
    assert_eq!(
        command_uuid(&retry),
        "A",
        "a later Idle makes NotNow commands eligible again"
    );
}

#[actix_rt::test]
async fn an_error_result_dequeues_the_command_and_records_the_error_chain() {
    let (server, device) = enrolled_device(UDID).await;
    enqueue(&server, UDID, "FAILS", "InstallProfile").await;
    device.connect(&server, device.idle()).await;
    let mut error = Dictionary::new();
    error.insert("UDID".into(), UDID.into());
    error.insert("Status".into(), "Error".into());
    error.insert("CommandUUID".into(), "FAILS".into());
    let mut chain_item = Dictionary::new();
    chain_item.insert("ErrorCode".into(), plist::Value::Integer(4001.into()));
    chain_item.insert("ErrorDomain".into(), "MCProfileErrorDomain".into());
    error.insert(
        "ErrorChain".into(),
        plist::Value::Array(vec![chain_item.into()]),
    );
    assert_eq!(device.connect(&server, to_xml(&error)).await, (200, vec![]));
    let (_, history) = api_get(&server, &format!("/api/v1/devices/{UDID}/commands")).await;
    assert_eq!(history[0]["status"], "Error");
    assert!(history[0]["result"]
        .as_str()
        .unwrap()
        .contains("MCProfileErrorDomain"));
}

#[actix_rt::test]
async fn an_unparseable_result_is_refused_and_parks_the_command_after_repeated_failures() {
    let (server, device) = enrolled_device(UDID).await;
    enqueue(&server, UDID, "POISON", "ProfileList").await;
    enqueue(&server, UDID, "AFTER", "ProfileList").await;
    for _ in 0..3 {
        let (_, command) = device.connect(&server, device.idle()).await;
        assert_eq!(command_uuid(&command), "POISON");
        let (status, _) = device
            .connect(&server, b"<plist><dict><key>Status".to_vec())
            .await;
        assert_eq!(status, 400);
    }
    let (_, command) = device.connect(&server, device.idle()).await;
    assert_eq!(
        command_uuid(&command),
        "AFTER",
        "the poison command no longer blocks the queue"
    );
    let (_, history) = api_get(&server, &format!("/api/v1/devices/{UDID}/commands")).await;
    assert_eq!(history[0]["status"], "parked");
}

#[actix_rt::test]
async fn a_result_for_an_unknown_command_is_stored_and_the_session_continues() {
    let (server, device) = enrolled_device(UDID).await;
    let (status, body) = device
        .connect(&server, device.report("Acknowledged", Some("NEVER-QUEUED")))
        .await;
    assert_eq!((status, body), (200, vec![]));
}
