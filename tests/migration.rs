//! Moving a fleet from NanoHUB/NanoMDM without re-enrolling it: `PUT /migration` takes the
//! raw Authenticate, TokenUpdate and SetBootstrapToken check-ins exactly as NanoMDM's
//! migration tool (`nano2nano`) sends them — one plist per request, HTTP Basic
//! `nanomdm:<API key>`, no Content-Type — and `--retro` lets each imported enrollment bind
//! the identity certificate it presents first (issued by the old server's CA, trusted
//! through `--identity-ca`). The devices never send Authenticate.

mod common;

use common::*;
use orchard::identity::CertificateAuthority;
use plist::{Dictionary, Value};

/// The devices of the fixtures, as NanoMDM stored their check-ins.
const MAC: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";
const IPHONE: &str = "663b07bb783e9ade1dae4fbb92ea12afc0ce5b69";

/// The CA of the server the fleet leaves: its identities are already on the devices.
struct OldServer {
    ca: CertificateAuthority,
    _dir: tempfile::TempDir,
    ca_pem: std::path::PathBuf,
}

impl OldServer {
    fn new() -> OldServer {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate().unwrap();
        let ca_pem = dir.path().join("old-scep-ca.pem");
        std::fs::write(&ca_pem, ca.ca_cert_pem()).unwrap();
        OldServer {
            ca,
            _dir: dir,
            ca_pem,
        }
    }

    /// An Orchard that trusts the old CA, with `--retro` or without.
    fn orchard(&self, retro: bool) -> Server {
        let mut args = vec!["--identity-ca", self.ca_pem.to_str().unwrap()];
        if retro {
            args.push("--retro");
        }
        Server::start_with(&args)
    }

    /// A device holding an identity the old server issued.
    fn device(&self, udid: &str) -> Device {
        Device {
            udid: udid.to_string(),
            identity: self.ca.issue_identity(udid).unwrap(),
        }
    }
}

/// One request of NanoMDM's migration tool: `PUT` with HTTP Basic `nanomdm:<key>` and
/// the raw check-in as the body (Go's client sends no Content-Type).
async fn migrate(server: &Server, checkin: Vec<u8>) -> (u16, serde_json::Value) {
    let response = client()
        .put(server.url("/migration"))
        .basic_auth("nanomdm", API_KEY)
        .send_body(checkin)
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = body_of(response).await;
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// What the migration tool sends for one device: its Authenticate, then its TokenUpdate.
async fn import_fixture_pair(server: &Server, number: u8) {
    for kind in ["Authenticate", "TokenUpdate"] {
        let checkin = fixture(&format!("nanomdm/{kind}.{number}.plist"));
        assert_eq!(migrate(server, checkin).await.0, 200, "{kind}.{number}");
    }
}

fn checkin_message(udid: &str, message_type: &str, extra: &[(&str, Value)]) -> Vec<u8> {
    let mut message = Dictionary::new();
    message.insert("MessageType".into(), message_type.into());
    message.insert("UDID".into(), udid.into());
    for (key, value) in extra {
        message.insert((*key).into(), value.clone());
    }
    to_xml(&message)
}

/// The command the device receives on an Idle connect, acknowledged.
async fn receive(server: &Server, device: &Device) -> (u16, Option<String>) {
    let (status, body) = device.connect(server, device.idle()).await;
    if status != 200 || body.is_empty() {
        return (status, None);
    }
    let command: Dictionary = plist::from_bytes(&body).unwrap();
    let uuid = command["CommandUUID"].as_string().unwrap().to_string();
    let (ack, _) = device
        .connect(server, device.report("Acknowledged", Some(&uuid)))
        .await;
    assert_eq!(ack, 200);
    (status, Some(uuid))
}

#[actix_rt::test]
async fn imported_devices_connect_and_get_commands_without_authenticating() {
    let old = OldServer::new();
    let server = old.orchard(true);
    import_fixture_pair(&server, 1).await;
    import_fixture_pair(&server, 2).await;
    let bootstrap = b"escrowed bootstrap token".to_vec();
    let set_bootstrap = checkin_message(
        MAC,
        "SetBootstrapToken",
        &[("BootstrapToken", Value::Data(bootstrap.clone()))],
    );
    assert_eq!(migrate(&server, set_bootstrap).await.0, 200);

    let (_, view) = api_get(&server, &format!("/api/v1/devices/{IPHONE}")).await;
    assert_eq!(view["enabled"], true, "{view}");
    assert_eq!(view["push_token_valid"], true);
    assert_eq!(view["topic"], TOPIC);
    assert_eq!(
        view["identity_bound"], false,
        "imported, no certificate yet"
    );

    let (mac, iphone) = (old.device(MAC), old.device(IPHONE));
    for (device, uuid) in [(&mac, "MIGRATED-MAC-1"), (&iphone, "MIGRATED-IPHONE-1")] {
        let udid = &device.udid;
        assert_eq!(
            enqueue(&server, udid, uuid, "DeviceInformation").await.0,
            200
        );
        assert_eq!(
            receive(&server, device).await,
            (200, Some(uuid.to_string())),
            "{udid} gets its command with the certificate it already had"
        );
        assert_eq!(receive(&server, device).await, (200, None));
    }
    let (_, view) = api_get(&server, &format!("/api/v1/devices/{IPHONE}")).await;
    assert_eq!(view["identity_bound"], true);
    assert_eq!(
        view["enrollment_generation"], 1,
        "no Authenticate since the import"
    );

    let (status, reply) = mac
        .checkin(&server, checkin_message(MAC, "GetBootstrapToken", &[]))
        .await;
    assert_eq!(status, 200);
    let reply: Dictionary = plist::from_bytes(&reply).unwrap();
    assert_eq!(reply["BootstrapToken"].as_data(), Some(&bootstrap[..]));

    let metrics = metrics_text(&server).await;
    assert!(metrics.contains("orchard_migrated_checkins_total{message_type=\"TokenUpdate\"} 2"));
    assert!(metrics.contains("orchard_retro_bindings_total{outcome=\"bound\"} 2"));
}

#[actix_rt::test]
async fn the_first_certificate_binds_and_then_the_normal_rules_hold() {
    let old = OldServer::new();
    let server = old.orchard(true);
    import_fixture_pair(&server, 2).await;

    let stranger = Device {
        udid: MAC.to_string(),
        identity: CertificateAuthority::generate()
            .unwrap()
            .issue_identity(MAC)
            .unwrap(),
    };
    assert_eq!(
        stranger.connect(&server, stranger.idle()).await.0,
        403,
        "a certificate that does not chain to the identity CA binds nothing"
    );
    let device = old.device(MAC);
    assert_eq!(device.connect(&server, device.idle()).await.0, 200);

    let impostor = old.device(MAC);
    let (status, body) = impostor.connect(&server, impostor.idle()).await;
    assert_eq!(status, 403, "a second certificate is refused once bound");
    assert!(String::from_utf8_lossy(&body).contains("certificate_mismatch"));
    assert_eq!(
        enqueue(&server, MAC, "AFTER-BINDING", "ProfileList")
            .await
            .0,
        200
    );
    assert_eq!(
        receive(&server, &device).await,
        (200, Some("AFTER-BINDING".to_string()))
    );

    let (status, body) = migrate(&server, fixture("nanomdm/Authenticate.2.plist")).await;
    assert_eq!(status, 409, "a bound enrollment is not overwritten: {body}");
    assert_eq!(body["error"], "already_enrolled");
    assert_eq!(device.connect(&server, device.idle()).await.0, 200);
}

#[actix_rt::test]
async fn two_devices_racing_for_one_imported_enrollment_cannot_both_win() {
    let old = OldServer::new();
    let server = old.orchard(true);
    import_fixture_pair(&server, 2).await;
    let contenders: Vec<Device> = (0..4).map(|_| old.device(MAC)).collect();
    let answers = futures_util::future::join_all(
        contenders
            .iter()
            .map(|device| device.connect(&server, device.idle())),
    )
    .await;
    let winners: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, (status, _))| *status == 200)
        .map(|(index, _)| index)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    assert!(answers
        .iter()
        .all(|(status, _)| *status == 200 || *status == 403));
    for (index, device) in contenders.iter().enumerate() {
        let expected = if index == winners[0] { 200 } else { 403 };
        assert_eq!(device.connect(&server, device.idle()).await.0, expected);
    }
}

#[actix_rt::test]
async fn without_retro_an_imported_device_is_refused_and_told_why() {
    let old = OldServer::new();
    let server = old.orchard(false);
    import_fixture_pair(&server, 2).await;
    assert_eq!(enqueue(&server, MAC, "WAITING", "ProfileList").await.0, 200);
    let device = old.device(MAC);
    let (status, body) = device.connect(&server, device.idle()).await;
    assert_eq!(status, 403);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("imported_enrollment_unbound"), "{body}");
    assert!(body.contains("--retro"), "{body}");
    let (_, view) = api_get(&server, &format!("/api/v1/devices/{MAC}")).await;
    assert_eq!(view["identity_bound"], false, "the refusal bound nothing");

    // Re-enrolling still works: an Authenticate binds as always.
    device.enroll(&server).await;
    assert_eq!(
        receive(&server, &device).await,
        (200, None),
        "re-enrollment clears the queue"
    );
}

#[actix_rt::test]
async fn a_user_channel_is_imported_under_its_device() {
    let old = OldServer::new();
    let server = old.orchard(true);
    let user = "1C4B7D8E-0000-4000-8000-0000000000AA";
    let mut user_token_update = fixture_dict("nanomdm/TokenUpdate.2.plist");
    user_token_update.insert("UserID".into(), user.into());
    user_token_update.insert("UserShortName".into(), "ada".into());
    let user_token_update = to_xml(&user_token_update);
    let (status, body) = migrate(&server, user_token_update.clone()).await;
    assert_eq!(status, 400, "the device channel comes first: {body}");
    assert_eq!(body["error"], "not_authenticated");

    import_fixture_pair(&server, 2).await;
    assert_eq!(migrate(&server, user_token_update).await.0, 200);
    let user_channel = format!("{MAC}:{user}");
    assert_eq!(
        enqueue(&server, &user_channel, "USER-COMMAND", "ProfileList")
            .await
            .0,
        200
    );
    let device = old.device(MAC);
    let mut idle = Dictionary::new();
    idle.insert("UDID".into(), MAC.into());
    idle.insert("UserID".into(), user.into());
    idle.insert("Status".into(), "Idle".into());
    let (status, body) = device.connect(&server, to_xml(&idle)).await;
    assert_eq!(
        status, 200,
        "the user channel's first request binds the device"
    );
    let command: Dictionary = plist::from_bytes(&body).unwrap();
    assert_eq!(command["CommandUUID"].as_string(), Some("USER-COMMAND"));
    let (_, view) = api_get(&server, &format!("/api/v1/devices/{MAC}")).await;
    assert_eq!(view["identity_bound"], true);
    assert_eq!(view["user_channels"], serde_json::json!([user_channel]));
}

#[actix_rt::test]
async fn bad_migration_input_is_refused_precisely() {
    let old = OldServer::new();
    let server = old.orchard(true);
    let unauthenticated = client()
        .put(server.url("/migration"))
        .send_body(fixture("nanomdm/Authenticate.2.plist"))
        .await
        .unwrap();
    assert_eq!(unauthenticated.status().as_u16(), 401);

    let (status, body) = migrate(&server, b"not a plist".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].is_string() && body["detail"].is_string(),
        "{body}"
    );

    let (status, body) = migrate(&server, checkin_message(MAC, "CheckOut", &[])).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unimportable_checkin");

    let (status, body) = migrate(&server, fixture("nanomdm/TokenUpdate.2.plist")).await;
    assert_eq!(status, 400, "a TokenUpdate needs its Authenticate first");
    assert_eq!(body["error"], "not_authenticated");
    let (status, _) = api_get(&server, &format!("/api/v1/devices/{MAC}")).await;
    assert_eq!(status, 404, "nothing half-written");

    let enrolled = Device::new(&server, IPHONE);
    enrolled.enroll(&server).await;
    let (status, body) = migrate(&server, fixture("nanomdm/TokenUpdate.1.plist")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "already_enrolled");

    let metrics = metrics_text(&server).await;
    for reason in [
        "unimportable_checkin",
        "not_authenticated",
        "already_enrolled",
    ] {
        assert!(
            metrics.contains(&format!(
                "orchard_rejected_requests_total{{reason=\"{reason}\"}}"
            )),
            "{reason}"
        );
    }
}
