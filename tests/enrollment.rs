//! Enrollment (protocol.md §1): the profile carries a fresh identity from Orchard's CA
//! and a `com.apple.mdm` payload whose rules are enforced when it is built.

mod common;

use common::*;
use plist::{Dictionary, Value};

async fn fetch_profile(server: &Server) -> (u16, Vec<u8>, String) {
    let response = client()
        .get(server.url("/mdm/enroll"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = content_type_of(&response);
    (status, body_of(response).await, content_type)
}

#[actix_rt::test]
async fn no_profile_is_served_before_a_push_certificate_gives_the_topic() {
    let server = Server::start();
    let (status, body, _) = fetch_profile(&server).await;
    assert_eq!(status, 409);
    assert!(String::from_utf8_lossy(&body).contains("push certificate"));
}

#[actix_rt::test]
async fn no_profile_is_served_without_an_https_server_url() {
    let tmp = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orchard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--server-url",
            "http://insecure.example",
        ])
        .arg("--data-dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "an http:// server URL is refused at startup"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("https://"));
}

#[actix_rt::test]
async fn the_profile_carries_an_identity_and_a_valid_mdm_payload() {
    let server = Server::start();
    upload_push_cert(&server).await;
    let (status, body, content_type) = fetch_profile(&server).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/x-apple-aspen-config");
    let profile: Dictionary = plist::from_bytes(&body).unwrap();
    assert_eq!(profile["PayloadType"].as_string(), Some("Configuration"));
    let content = profile["PayloadContent"].as_array().unwrap();
    let payload = |kind: &str| -> &Dictionary {
        content
            .iter()
            .filter_map(Value::as_dictionary)
            .find(|p| p["PayloadType"].as_string() == Some(kind))
            .unwrap_or_else(|| panic!("{kind} payload missing"))
    };
    let identity = payload("com.apple.security.pkcs12");
    let mdm = payload("com.apple.mdm");
    assert_eq!(mdm["IdentityCertificateUUID"], identity["PayloadUUID"]);
    assert_eq!(mdm["Topic"].as_string(), Some(TOPIC));
    assert_eq!(
        mdm["ServerURL"].as_string(),
        Some("https://mdm.example.test/mdm")
    );
    assert_eq!(
        mdm["CheckInURL"].as_string(),
        Some("https://mdm.example.test/checkin")
    );
    assert_eq!(mdm["AccessRights"].as_unsigned_integer(), Some(8191));
    assert!(orchard::schema::validate_mdm_payload(mdm).is_ok());
    assert!(orchard::schema::validate_profile_payload(&profile)
        .errors
        .is_empty());
    assert!(!identity["PayloadContent"].as_data().unwrap().is_empty());
}

#[actix_rt::test]
async fn every_profile_gets_its_own_identity() {
    let server = Server::start();
    upload_push_cert(&server).await;
    let first: Dictionary = plist::from_bytes(&fetch_profile(&server).await.1).unwrap();
    let second: Dictionary = plist::from_bytes(&fetch_profile(&server).await.1).unwrap();
    let identity_of = |p: &Dictionary| {
        p["PayloadContent"].as_array().unwrap()[0]
            .as_dictionary()
            .unwrap()["PayloadContent"]
            .clone()
    };
    assert_ne!(identity_of(&first), identity_of(&second));
}

#[actix_rt::test]
async fn a_push_certificate_without_an_mdm_topic_is_refused() {
    let server = Server::start();
    let (status, body) = api_put(
        &server,
        "/api/v1/nanomdm/pushcert",
        push_certificate_pem("com.example.not-mdm").into_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = api_put(&server, "/api/v1/nanomdm/pushcert", b"not pem".to_vec()).await;
    assert_eq!(status, 400);
}
