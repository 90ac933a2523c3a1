//! Bad input from a device or an API client: a precise 4xx with a reason, a count in
//! `orchard_rejected_requests_total{reason}`, and nothing stored.

mod common;

use common::*;
use plist::Dictionary;

const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";

async fn assert_rejected(
    server: &Server,
    device: &Device,
    content_type: &str,
    body: Vec<u8>,
    status: u16,
    reason: &str,
) {
    let (got, text) = device.put(server, "/mdm", content_type, body).await;
    assert_eq!(got, status, "{}", String::from_utf8_lossy(&text));
    assert!(
        String::from_utf8_lossy(&text).starts_with(reason),
        "reason {reason} in {}",
        String::from_utf8_lossy(&text)
    );
    assert!(metrics_text(server).await.contains(&format!(
        "orchard_rejected_requests_total{{reason=\"{reason}\"}}"
    )));
}

#[actix_rt::test]
async fn malformed_check_ins_are_refused_with_their_reason() {
    let server = Server::start();
    let device = Device::new(&server, UDID);
    assert_rejected(
        &server,
        &device,
        CHECKIN,
        b"not a plist".to_vec(),
        400,
        "malformed_plist",
    )
    .await;
    let mut unknown = Dictionary::new();
    unknown.insert("MessageType".into(), "Teleport".into());
    unknown.insert("UDID".into(), UDID.into());
    assert_rejected(
        &server,
        &device,
        CHECKIN,
        to_xml(&unknown),
        400,
        "unknown_message_type",
    )
    .await;
    let mut anonymous = fixture_dict("nanomdm/Authenticate.2.plist");
    anonymous.remove("UDID");
    assert_rejected(
        &server,
        &device,
        CHECKIN,
        to_xml(&anonymous),
        400,
        "missing_key",
    )
    .await;
    let (status, _) = api_get(&server, &format!("/api/v1/devices/{UDID}")).await;
    assert_eq!(status, 404, "nothing was stored");
}

#[actix_rt::test]
async fn a_connect_report_with_an_unknown_status_is_refused() {
    let (server, device) = enrolled_device(UDID).await;
    assert_rejected(
        &server,
        &device,
        CONNECT,
        device.report("Dancing", None),
        400,
        "unknown_status",
    )
    .await;
}

#[actix_rt::test]
async fn the_check_in_url_refuses_other_content_types() {
    let server = Server::start();
    let device = Device::new(&server, UDID);
    let (status, text) = device
        .put(
            &server,
            "/checkin",
            "application/json",
            device.authenticate(),
        )
        .await;
    assert_eq!(status, 415, "{}", String::from_utf8_lossy(&text));
}

#[actix_rt::test]
async fn a_body_over_the_limit_is_413() {
    let server = Server::start_with(&["--max-body-bytes", "4096"]);
    let device = Device::new(&server, UDID);
    assert_rejected(
        &server,
        &device,
        CHECKIN,
        vec![b' '; 8192],
        413,
        "body_too_large",
    )
    .await;
}

#[actix_rt::test]
async fn the_admin_api_requires_the_key() {
    let server = Server::start();
    let response = client()
        .get(server.url("/api/v1/devices"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let wrong = client()
        .get(server.url("/api/v1/devices"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let basic = client()
        .get(server.url("/api/v1/devices"))
        .basic_auth("nanohub", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 200);
}

#[actix_rt::test]
async fn an_api_body_that_is_not_a_command_plist_is_400() {
    let server = Server::start();
    let (status, body) = api_put(
        &server,
        &format!("/api/v1/nanomdm/enqueue/{UDID}"),
        b"{\"json\": true}".to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "malformed_plist");
    let response = client()
        .post(server.url(&format!("/api/v1/devices/{UDID}/commands")))
        .bearer_auth(API_KEY)
        .insert_header(("Content-Type", "application/json"))
        .send_body("{not json")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[actix_rt::test]
async fn a_template_command_that_violates_apples_schema_is_refused() {
    let (server, device) = enrolled_device(UDID).await;
    let (status, body) = api_post_json(
        &server,
        &format!("/api/v1/devices/{UDID}/commands"),
        serde_json::json!({
            "request_type": "DeviceInformation"
        }),
    )
    .await;
    assert_eq!(status, 400, "Queries is required: {body}");
    assert!(body["detail"].as_str().unwrap().contains("Queries"));
    let (status, _) = api_post_json(
        &server,
        &format!("/api/v1/devices/{UDID}/commands"),
        serde_json::json!({
            "request_type": "Teleport"
        }),
    )
    .await;
    assert_eq!(status, 400);
    assert!(device.drain(&server).await.is_empty(), "nothing was queued");
}

/// Send `head` on a raw socket; return the server's response head (or whatever it sent
/// before closing) and how long that took.
fn stall_with(server: &Server, head: &str) -> (String, std::time::Duration) {
    use std::io::{Read, Write};
    let mut socket =
        std::net::TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    socket.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_client_that_stalls_in_its_headers_is_cut_off() {
    let server = Server::start_with(&["--request-timeout-secs", "1"]);
    let (_, waited) = stall_with(&server, "PUT /mdm HTTP/1.1\r\nHost: orchard\r\n");
    assert!(
        waited < std::time::Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

#[test]
fn a_client_that_stalls_in_its_body_gets_408() {
    let server = Server::start_with(&["--request-timeout-secs", "1"]);
    let head = format!(
        "PUT /mdm HTTP/1.1\r\nHost: orchard\r\nContent-Type: {CONNECT}\r\n{CERT_HEADER}: :AAAA:\r\nContent-Length: 100\r\n\r\n<plist>"
    );
    let (answer, waited) = stall_with(&server, &head);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(waited < std::time::Duration::from_secs(5));
}

/// A device or a probe that uses the wrong method is told which one the path serves:
/// 405 with `Allow`, in plain text like every other device-facing refusal.
#[actix_rt::test]
async fn a_method_a_device_or_operations_path_does_not_serve_answers_405_with_allow() {
    let server = Server::start();
    for (path, methods) in orchard::http::device_and_operations_routes() {
        let served: Vec<String> = methods.iter().map(ToString::to_string).collect();
        for method in ["GET", "PUT", "POST", "DELETE"] {
            if served.iter().any(|m| m == method) {
                continue;
            }
            let method = actix_web::http::Method::from_bytes(method.as_bytes()).unwrap();
            let response = client()
                .request(method.clone(), server.url(&path))
                .send()
                .await
                .unwrap();
            let context = format!("{method} {path}");
            assert_eq!(response.status().as_u16(), 405, "{context}");
            let allow = response.headers().get("allow").map(|v| v.to_str().unwrap());
            assert_eq!(allow, Some(served.join(", ").as_str()), "{context}");
            assert!(
                content_type_of(&response).starts_with("text/plain"),
                "{context}"
            );
            let text = String::from_utf8_lossy(&body_of(response).await).into_owned();
            assert!(text.starts_with("method_not_allowed"), "{context}: {text}");
        }
    }
}
