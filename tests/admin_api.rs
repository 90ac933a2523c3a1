//! The admin API: NanoHUB-compatible routes with NanoHUB's shapes, Orchard's own device
//! and command routes, and the operations endpoints.

mod common;

use common::*;

const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";

#[actix_rt::test]
async fn enqueue_to_several_ids_reports_each_one() {
    let server = Server::start();
    let enrolled = Device::new(&server, UDID);
    enrolled.enroll(&server).await;
    let (status, body) = api_put(
        &server,
        &format!("/api/v1/nanomdm/enqueue/{UDID},UNKNOWN-DEVICE"),
        command_plist("MULTI-1", "ProfileList"),
    )
    .await;
    assert_eq!(status, 207, "{body}");
    assert!(body["status"]["UNKNOWN-DEVICE"]["command_error"]
        .as_str()
        .unwrap()
        .contains("unknown"));
    assert!(
        body["status"][UDID]["push_error"]
            .as_str()
            .unwrap()
            .contains("no push certificate uploaded"),
        "the response says why no push was sent: {body}"
    );
    assert_eq!(enrolled.drain(&server).await, ["MULTI-1"]);
}

#[actix_rt::test]
async fn the_push_route_takes_get_and_post_and_says_why_nothing_was_sent() {
    let (server, _device) = enrolled_device(UDID).await;
    for method in ["GET", "POST"] {
        let response = client()
            .request(
                method.parse().unwrap(),
                server.url(&format!("/api/v1/nanomdm/push/{UDID}")),
            )
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 502, "no push could be sent");
        let body: serde_json::Value = serde_json::from_slice(&body_of(response).await).unwrap();
        assert!(body["status"][UDID]["push_error"]
            .as_str()
            .unwrap()
            .contains("no push certificate uploaded"));
    }
}

#[actix_rt::test]
async fn ten_thousand_ids_fit_in_one_enqueue_url() {
    let (server, device) = enrolled_device(UDID).await;
    let mut ids: Vec<String> = (0..9_999)
        .map(|n| format!("00000000-0000-4000-8000-{n:012}"))
        .collect();
    ids.push(UDID.to_string());
    let (status, body) = raw_enqueue(
        &server,
        &ids.join(","),
        &command_plist("WIDE-1", "ProfileList"),
    );
    assert!(body.len() > 65_536 / 2);
    assert_eq!(
        status, 207,
        "unknown ids are reported, the enrolled one queued"
    );
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"].as_object().unwrap().len(), 9_999);
    assert_eq!(device.drain(&server).await, ["WIDE-1"]);
}

/// HTTP clients built on `http::Uri` cannot send a 370 KB request target, so this speaks
/// HTTP/1.1 on the socket, as curl does.
fn raw_enqueue(server: &Server, ids: &str, command: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let address = server.base.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(address).unwrap();
    let head = format!(
        "PUT /api/v1/nanomdm/enqueue/{ids}?nopush=1 HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        command.len()
    );
    socket.write_all(head.as_bytes()).unwrap();
    socket.write_all(command).unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[actix_rt::test]
async fn a_pending_command_can_be_cancelled() {
    let (server, device) = enrolled_device(UDID).await;
    enqueue(&server, UDID, "CANCEL-ME", "ProfileList").await;
    enqueue(&server, UDID, "KEEP-ME", "ProfileList").await;
    let delete = |uuid: &str| {
        client()
            .delete(server.url(&format!("/api/v1/devices/{UDID}/commands/{uuid}")))
            .bearer_auth(API_KEY)
            .send()
    };
    assert_eq!(delete("CANCEL-ME").await.unwrap().status().as_u16(), 204);
    assert_eq!(delete("CANCEL-ME").await.unwrap().status().as_u16(), 404);
    assert_eq!(device.drain(&server).await, ["KEEP-ME"]);
}

#[actix_rt::test]
async fn template_commands_are_built_validated_and_queued() {
    let (server, device) = enrolled_device(UDID).await;
    let (status, body) = api_post_json(
        &server,
        &format!("/api/v1/devices/{UDID}/commands"),
        serde_json::json!({
            "request_type": "DeviceInformation",
            "params": {"Queries": ["SerialNumber", "OSVersion"]},
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["queued"], true);
    assert_eq!(body["push_sent"], false);
    let (_, command) = device.connect(&server, device.idle()).await;
    let command: plist::Dictionary = plist::from_bytes(&command).unwrap();
    assert_eq!(
        command["CommandUUID"].as_string(),
        body["command_uuid"].as_str()
    );
    let inner = command["Command"].as_dictionary().unwrap();
    assert_eq!(inner["RequestType"].as_string(), Some("DeviceInformation"));
    assert_eq!(inner["Queries"].as_array().unwrap().len(), 2);

    let (status, bulk) = api_post_json(
        &server,
        "/api/v1/commands",
        serde_json::json!({
            "targets": [UDID, "NOT-ENROLLED"],
            "request_type": "ProfileList",
            "params": {"ManagedOnly": true},
            "no_push": true,
        }),
    )
    .await;
    assert_eq!(status, 200, "{bulk}");
    assert_eq!(
        (bulk["queued"].as_u64(), bulk["failed"].as_u64()),
        (Some(1), Some(1))
    );
}

#[actix_rt::test]
async fn devices_can_be_listed_and_unknown_ones_are_404() {
    let server = Server::start();
    for n in 0..3 {
        Device::new(&server, &format!("DEVICE-{n}"))
            .enroll(&server)
            .await;
    }
    let (status, page) = api_get(&server, "/api/v1/devices?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page["devices"], serde_json::json!(["DEVICE-0", "DEVICE-1"]));
    let (_, rest) = api_get(
        &server,
        &format!("/api/v1/devices?after={}", page["next"].as_str().unwrap()),
    )
    .await;
    assert_eq!(rest["devices"], serde_json::json!(["DEVICE-2"]));
    assert_eq!(api_get(&server, "/api/v1/devices/NOPE").await.0, 404);
    assert_eq!(
        api_get(&server, "/api/v1/devices/NOPE/commands").await.0,
        404
    );
}

#[actix_rt::test]
async fn the_openapi_document_describes_the_admin_routes() {
    let server = Server::start();
    let response = client()
        .get(server.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&body_of(response).await).unwrap();
    for path in [
        "/api/v1/nanomdm/enqueue/{ids}",
        "/api/v1/devices/{id}/commands",
        "/api/v1/nanomdm/pushcert",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
}

#[actix_rt::test]
async fn health_readiness_and_metrics_are_served() {
    let (server, device) = enrolled_device(UDID).await;
    device.connect(&server, device.idle()).await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            client()
                .get(server.url(path))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200
        );
    }
    let metrics = metrics_text(&server).await;
    for name in [
        "orchard_http_requests_total",
        "orchard_http_request_duration_seconds_bucket",
        "orchard_checkin_messages_total{message_type=\"Authenticate\"} 1\n",
        "orchard_connect_reports_total{status=\"Idle\"} 1\n",
        "orchard_resident_actors",
        "orchard_queue_depth",
        "orchard_store_apply_seconds",
    ] {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
}
