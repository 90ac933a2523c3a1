//! Declarative Device Management end to end (protocol.md §5.3): an operator publishes
//! declarations and sets, assigns them, and a device syncs through the DeclarativeManagement
//! check-in exactly as real devices do, reporting status with the real KMFDDM fixtures.

mod common;

use std::time::Duration;

use common::*;
use plist::Dictionary;
use serde_json::{json, Value as Json};

const UDID: &str = "66ADE930-5FDF-5EC4-8429-15640684C489";
const CONFIG: &str = "com.example.test";
const ACTIVATION: &str = "com.example.act";

fn test_config(echo: &str) -> Json {
    json!({"Type": "com.apple.configuration.management.test", "Identifier": CONFIG, "Payload": {"Echo": echo}})
}

fn activation() -> Json {
    json!({"Type": "com.apple.activation.simple", "Identifier": ACTIVATION, "Payload": {"StandardConfigurations": [CONFIG]}})
}

async fn api(server: &Server, method: &str, path: &str, body: Option<Json>) -> (u16, Json) {
    let request = client()
        .request(method.parse().unwrap(), server.url(path))
        .bearer_auth(API_KEY);
    let response = match body {
        Some(body) => request.send_json(&body).await.unwrap(),
        None => request.send().await.unwrap(),
    };
    let status = response.status().as_u16();
    let bytes = body_of(response).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Json::Null))
}

/// The sync doctor's answer for the test device.
async fn diagnosis(server: &Server) -> Json {
    let path = format!("/api/v1/devices/{UDID}/ddm/diagnosis");
    api(server, "GET", &path, None).await.1
}

/// Publish the pair and put both in set `default`.
async fn publish(server: &Server) {
    assert_eq!(
        api(
            server,
            "PUT",
            "/api/v1/ddm/declarations",
            Some(test_config("hello"))
        )
        .await
        .0,
        204
    );
    assert_eq!(
        api(
            server,
            "PUT",
            "/api/v1/ddm/declarations",
            Some(activation())
        )
        .await
        .0,
        204
    );
    for id in [CONFIG, ACTIVATION] {
        let path = format!("/api/v1/ddm/set-declarations/default?declaration={id}");
        assert_eq!(api(server, "PUT", &path, None).await.0, 204);
    }
}

async fn assign(server: &Server, set: &str) -> u16 {
    api(
        server,
        "PUT",
        &format!("/api/v1/ddm/enrollment-sets/{UDID}?set={set}"),
        None,
    )
    .await
    .0
}

/// The DeclarativeManagement command the device receives next, acknowledged; its Data.
async fn receive_sync_command(server: &Server, device: &Device) -> Option<Json> {
    // Catalog changes sync their enrollments in the background: give it a moment.
    let mut body = Vec::new();
    for _ in 0..200 {
        body = device.connect(server, device.idle()).await.1;
        if !body.is_empty() {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !body.is_empty(),
        "a DeclarativeManagement command is queued"
    );
    let command: Dictionary = plist::from_bytes(&body).unwrap();
    let inner = command["Command"].as_dictionary().unwrap();
    assert_eq!(
        inner["RequestType"].as_string(),
        Some("DeclarativeManagement")
    );
    let uuid = command["CommandUUID"].as_string().unwrap();
    device
        .connect(server, device.report("Acknowledged", Some(uuid)))
        .await;
    inner
        .get("Data")
        .map(|d| serde_json::from_slice(d.as_data().unwrap()).unwrap())
}

/// An enrolled device with the test declarations published and assigned to it, which has
/// received its DeclarativeManagement command.
async fn device_told_to_sync() -> (Server, Device) {
    let (server, device) = enrolled_device(UDID).await;
    publish(&server).await;
    assign(&server, "default").await;
    receive_sync_command(&server, &device).await;
    (server, device)
}

fn status_report(items: &[(&str, &str, &str, bool, &str)]) -> Vec<u8> {
    let mut report: Json = serde_json::from_slice(&fixture("kmfddm/status.1st.json")).unwrap();
    let declarations = &mut report["StatusItems"]["management"]["declarations"];
    for (category, identifier, token, active, valid) in items {
        declarations[*category].as_array_mut().unwrap().push(json!({
            "identifier": identifier, "server-token": token, "active": active, "valid": valid
        }));
    }
    serde_json::to_vec(&report).unwrap()
}

/// tokens → declaration-items → every body → tokens → status, as a healthy device does.
async fn full_sync(server: &Server, device: &Device) -> Json {
    let (status, content_type, tokens) = ddm(server, device, "tokens", None).await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let (_, _, items) = ddm(server, device, "declaration-items", None).await;
    assert_eq!(
        items["DeclarationsToken"], tokens["SyncTokens"]["DeclarationsToken"],
        "both endpoints agree"
    );
    let mut reported = Vec::new();
    for (plural, category, key) in [
        ("Activations", "activation", "activations"),
        ("Configurations", "configuration", "configurations"),
    ] {
        for item in items["Declarations"][plural].as_array().unwrap() {
            let id = item["Identifier"].as_str().unwrap();
            let (status, _, body) = ddm(
                server,
                device,
                &format!("declaration/{category}/{id}"),
                None,
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(
                body["ServerToken"], item["ServerToken"],
                "the body is the listed revision"
            );
            reported.push((
                key,
                id.to_string(),
                item["ServerToken"].as_str().unwrap().to_string(),
            ));
        }
    }
    ddm(server, device, "tokens", None).await;
    let report: Vec<(&str, &str, &str, bool, &str)> = reported
        .iter()
        .map(|(key, id, token)| (*key, id.as_str(), token.as_str(), true, "valid"))
        .collect();
    let (status, _, _) = ddm(server, device, "status", Some(status_report(&report))).await;
    assert_eq!(status, 200);
    items
}

#[actix_rt::test]
async fn a_device_syncs_published_declarations_end_to_end() {
    let (server, device) = enrolled_device(UDID).await;
    let (_, _, empty) = ddm(&server, &device, "declaration-items", None).await;
    assert_eq!(
        empty["Declarations"],
        json!({"Activations": [], "Configurations": [], "Assets": [], "Management": []})
    );
    assert!(
        !empty["DeclarationsToken"].as_str().unwrap().is_empty(),
        "never an empty token"
    );

    publish(&server).await;
    assert_eq!(assign(&server, "default").await, 204);
    let data = receive_sync_command(&server, &device)
        .await
        .expect("one device: tokens in Data");
    let items = full_sync(&server, &device).await;
    assert_eq!(
        data["SyncTokens"]["DeclarationsToken"],
        items["DeclarationsToken"]
    );
    let timestamp = data["SyncTokens"]["Timestamp"].as_str().unwrap();
    assert!(regex_lite::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        .unwrap()
        .is_match(timestamp));

    let (_, status) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/declaration-status/{UDID}"),
        None,
    )
    .await;
    let rows = status[UDID].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r["current"] == true && r["active"] == true));
    let (_, values) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/status-values/{UDID}?prefix=.StatusItems.device"),
        None,
    )
    .await;
    assert!(values[UDID].as_array().unwrap().iter().any(|v| v["path"]
        == ".StatusItems.device.operating-system.version"
        && v["value"] == "13.3.1"));
    let diagnosis = diagnosis(&server).await;
    let rules: Vec<&str> = diagnosis["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert!(
        rules.is_empty(),
        "a healthy sync has no findings: {rules:?}"
    );
    assert_eq!(
        assign(&server, "default").await,
        304,
        "unchanged assignment"
    );
}

#[actix_rt::test]
async fn a_change_resyncs_and_an_unchanged_upload_does_not() {
    let (server, device) = device_told_to_sync().await;
    let before = full_sync(&server, &device).await;
    assert_eq!(
        api(
            &server,
            "PUT",
            "/api/v1/ddm/declarations",
            Some(test_config("hello"))
        )
        .await
        .0,
        304
    );
    assert_eq!(
        api(
            &server,
            "PUT",
            "/api/v1/ddm/declarations",
            Some(test_config("changed"))
        )
        .await
        .0,
        204
    );
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    receive_sync_command(&server, &device).await;
    let after = full_sync(&server, &device).await;
    assert_ne!(before["DeclarationsToken"], after["DeclarationsToken"]);
    assert_eq!(
        before["Declarations"]["Activations"], after["Declarations"]["Activations"],
        "the activation kept its token"
    );
    assert_ne!(
        before["Declarations"]["Configurations"],
        after["Declarations"]["Configurations"]
    );
    assert_eq!(
        api(
            &server,
            "POST",
            &format!("/api/v1/ddm/declarations/{ACTIVATION}/touch"),
            None
        )
        .await
        .0,
        204
    );
    let (_, _, touched) = ddm(&server, &device, "declaration-items", None).await;
    assert_ne!(
        touched["Declarations"]["Activations"], after["Declarations"]["Activations"],
        "a touch changes the token"
    );
}

#[actix_rt::test]
async fn a_removed_declaration_disappears_and_is_404() {
    let (server, device) = device_told_to_sync().await;
    full_sync(&server, &device).await;
    let path = format!("/api/v1/ddm/set-declarations/default?declaration={ACTIVATION}");
    assert_eq!(api(&server, "DELETE", &path, None).await.0, 204);
    receive_sync_command(&server, &device).await;
    let (_, _, items) = ddm(&server, &device, "declaration-items", None).await;
    assert_eq!(items["Declarations"]["Activations"], json!([]));
    let (status, _, _) = ddm(
        &server,
        &device,
        &format!("declaration/activation/{ACTIVATION}"),
        None,
    )
    .await;
    assert_eq!(
        status, 404,
        "never 500 for a declaration the device no longer has"
    );
    let (status, _, _) = ddm(&server, &device, "no-such-endpoint", None).await;
    assert_eq!(status, 404);
}

#[actix_rt::test]
async fn a_change_racing_a_sync_serves_the_revision_the_device_was_shown() {
    let (server, device) = device_told_to_sync().await;
    let (_, _, items) = ddm(&server, &device, "declaration-items", None).await;
    let listed = items["Declarations"]["Configurations"][0]["ServerToken"].clone();
    api(
        &server,
        "PUT",
        "/api/v1/ddm/declarations?nonotify",
        Some(test_config("newer")),
    )
    .await;
    let (status, _, body) = ddm(
        &server,
        &device,
        &format!("declaration/configuration/{CONFIG}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["ServerToken"], listed);
    assert_eq!(body["Payload"]["Echo"], "hello");
}

#[actix_rt::test]
async fn re_enrollment_resets_ddm_state_and_starts_a_sync() {
    let (server, device) = device_told_to_sync().await;
    full_sync(&server, &device).await;
    device.enroll(&server).await;
    let data = receive_sync_command(&server, &device).await;
    assert!(data.is_some(), "re-enrollment queues a sync with tokens");
    let (_, status) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/declaration-status/{UDID}"),
        None,
    )
    .await;
    assert_eq!(status, json!({}), "stored status was reset");
    let (_, sets) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/enrollment-sets/{UDID}"),
        None,
    )
    .await;
    assert_eq!(sets, json!(["default"]), "assignments survive");
}

#[actix_rt::test]
async fn invalid_declarations_are_rejected_with_the_path_of_the_problem() {
    let server = Server::start();
    let (status, body) = api(&server, "PUT", "/api/v1/ddm/declarations", Some(json!({
        "Type": "com.apple.configuration.management.test", "Identifier": "com.example.bad", "Payload": {}
    }))).await;
    assert_eq!(status, 400);
    assert_eq!(body["declaration"], "com.example.bad");
    assert!(body["issues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["path"].as_str().unwrap().contains("Echo")));

    let (status, body) = api(
        &server,
        "PUT",
        "/api/v1/ddm/declarations",
        Some(activation()),
    )
    .await;
    assert_eq!(
        status, 400,
        "the activation references a configuration that does not exist: {body}"
    );
    assert_eq!(body["error"], "missing_reference");

    let (status, _) = api(&server, "PUT", "/api/v1/ddm/declarations", Some(json!({
        "Type": "com.apple.configuration.management.test", "Identifier": "has/slash", "Payload": {"Echo": "x"}
    }))).await;
    assert_eq!(status, 400);
    let (status, _) = api(
        &server,
        "PUT",
        "/api/v1/ddm/declarations",
        Some(json!({
            "Type": "com.example.not-apple", "Identifier": "x", "Payload": {}
        })),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = api(&server, "PUT", "/api/v1/ddm/declarations", Some(json!({
        "Type": "com.apple.configuration.from-a-newer-os", "Identifier": "com.example.new", "Payload": {"Anything": 1}
    }))).await;
    assert_eq!(
        status, 204,
        "a well-formed type from a newer OS is accepted"
    );
    let (_, ids) = api(&server, "GET", "/api/v1/ddm/declarations", None).await;
    assert_eq!(
        ids,
        json!(["com.example.new"]),
        "nothing invalid was stored"
    );
}

#[actix_rt::test]
async fn a_status_report_with_errors_is_surfaced_and_diagnosed() {
    let (server, device) = device_told_to_sync().await;
    let (_, _, items) = ddm(&server, &device, "declaration-items", None).await;
    let token = items["Declarations"]["Configurations"][0]["ServerToken"]
        .as_str()
        .unwrap()
        .to_string();
    let mut report: Json = serde_json::from_slice(&fixture("kmfddm/status.D0.error.json")).unwrap();
    report["StatusItems"]["management"]["declarations"]["configurations"] = json!([{
        "identifier": CONFIG, "server-token": token, "active": false, "valid": "invalid",
        "reasons": [{"code": "Error.ConfigurationCannotBeApplied", "description": "cannot apply"}]
    }]);
    let (status, _, _) = ddm(
        &server,
        &device,
        "status",
        Some(serde_json::to_vec(&report).unwrap()),
    )
    .await;
    assert_eq!(status, 200);
    let (_, errors) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/status-errors/{UDID}"),
        None,
    )
    .await;
    assert!(errors[UDID]
        .to_string()
        .contains("Error.ConfigurationCannotBeApplied"));
    let diagnosis = diagnosis(&server).await;
    let finding = diagnosis["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["rule"] == "SD-T02")
        .expect("SD-T02");
    assert_eq!(finding["severity"], "error");
    assert!(finding["fix"].as_str().unwrap().len() > 20);
    let (_, fleet) = api(&server, "GET", "/api/v1/ddm/fleet/declarations", None).await;
    assert_eq!(fleet[CONFIG]["invalid"], 1);
    assert_eq!(fleet[ACTIVATION]["pending"], 1);
    let (_, summary) = api(&server, "GET", "/api/v1/ddm/diagnosis", None).await;
    assert_eq!(summary["rules"]["SD-T02"], 1);

    let (status, _, _) = ddm(&server, &device, "status", Some(b"{not json".to_vec())).await;
    assert_eq!(
        status, 200,
        "an unparseable report is kept raw, never refused"
    );
    let (status, history) = api(
        &server,
        "GET",
        &format!("/api/v1/devices/{UDID}/ddm/reports"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let reports = history["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2, "the last two reports, oldest first");
    assert_eq!(reports[0]["report"], report);
    assert_eq!(reports[1]["report"], "{not json");
    let (status, _) = api(&server, "GET", "/api/v1/devices/NOBODY/ddm/reports", None).await;
    assert_eq!(status, 404);
}

#[actix_rt::test]
async fn the_doctor_names_a_sync_that_stalls_after_declaration_items() {
    let server = Server::start_with(&["--ddm-stall-after", "1"]);
    let device = Device::new(&server, UDID);
    device.enroll(&server).await;
    publish(&server).await;
    assign(&server, "default").await;
    receive_sync_command(&server, &device).await;
    ddm(&server, &device, "tokens", None).await;
    ddm(&server, &device, "declaration-items", None).await;
    actix_rt::time::sleep(Duration::from_millis(1500)).await;
    let diagnosis = diagnosis(&server).await;
    let stall = diagnosis["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["rule"] == "SD-S05")
        .expect("SD-S05");
    assert_eq!(
        stall["evidence"]["expected_fetches"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(!diagnosis["timeline"].as_array().unwrap().is_empty());
}

#[actix_rt::test]
async fn a_set_can_be_assigned_to_many_enrollments_at_once() {
    let server = Server::start();
    let devices: Vec<Device> = (0..5)
        .map(|n| Device::new(&server, &format!("BULK-{n}")))
        .collect();
    for device in &devices {
        device.enroll(&server).await;
    }
    publish(&server).await;
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    let (status, body) = api(
        &server,
        "POST",
        "/api/v1/ddm/assignments",
        Some(json!({"set": "default", "enrollments": ids})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["changed"], 5);
    for device in &devices {
        assert!(
            receive_sync_command(&server, device).await.is_none(),
            "many targets: no Data"
        );
    }
    assert_eq!(
        api(&server, "POST", "/api/v1/ddm/notify?set=default", None)
            .await
            .0,
        204
    );
    for device in &devices {
        receive_sync_command(&server, device).await;
    }
}

/// The fleet view and the fleet diagnosis, recounted from the store one enrollment at a
/// time with the per-device doctor (what the fleet routes did before they had a tally).
async fn recount(server: &Server, stall_after: i64, as_of: i64) -> (Json, Json) {
    use orchard::ddm::catalog::Catalog;
    use orchard::ddm::doctor::{diagnose, EnrollmentFacts};
    use orchard::ddm::sync::DdmState;
    use orchard::ddm::Validity;
    use std::collections::BTreeMap;

    let store = server.open_store().await;
    let catalog = Catalog::load(store.clone()).await.unwrap();
    let mut declarations: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    let mut rules: BTreeMap<&str, u64> = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let every = orchard::store::every_enrollment();
        let page = store.fleet_rows(after.as_deref(), 7, every).await.unwrap();
        after = page.last().map(|(id, _)| id.clone());
        for (_, rows) in &page {
            let ddm = DdmState::decode(&rows.ddm).unwrap();
            let facts = EnrollmentFacts::of(rows.enrollment.as_ref());
            let manifest = catalog.manifest(&ddm.sets);
            for finding in diagnose(&ddm, &manifest, &facts, as_of, stall_after) {
                *rules.entry(finding.rule).or_default() += 1;
            }
            for item in manifest.manifest.items() {
                let counts = declarations.entry(item.identifier.clone()).or_default();
                *counts.entry("assigned").or_default() += 1;
                let bucket = match ddm.status.declarations.get(&item.identifier) {
                    None => "pending",
                    Some(r) if r.server_token != item.server_token => "old_server_token",
                    Some(r) if r.valid == Validity::Invalid => "invalid",
                    Some(r) if r.active => "active",
                    Some(_) => "inactive",
                };
                *counts.entry(bucket).or_default() += 1;
            }
        }
        if page.len() < 7 {
            break;
        }
    }
    (json!(declarations), json!(rules))
}

/// One device's part in the fleet test: how far it gets through a sync.
async fn sync_partly(server: &Server, device: &Device, behaviour: usize) {
    receive_sync_command(server, device).await;
    match behaviour {
        0 => {
            full_sync(server, device).await;
        }
        1 => {
            // Reads the manifest, fetches nothing (SD-S05 once past the deadline).
            ddm(server, device, "tokens", None).await;
            ddm(server, device, "declaration-items", None).await;
        }
        2 => {
            // Fetches a body and never reports (SD-S07).
            ddm(server, device, "declaration-items", None).await;
            let path = format!("declaration/configuration/{CONFIG}");
            ddm(server, device, &path, None).await;
        }
        _ => {
            // Refuses the configuration and reports an activation token that is not current.
            let report = status_report(&[
                ("configurations", CONFIG, "whatever", false, "invalid"),
                ("activations", ACTIVATION, "old-token", true, "valid"),
            ]);
            ddm(server, device, "status", Some(report)).await;
        }
    }
}

async fn fleet_views(server: &Server) -> (Json, Json) {
    let (status, declarations) = api(server, "GET", "/api/v1/ddm/fleet/declarations", None).await;
    assert_eq!(status, 200, "{declarations}");
    let (status, diagnosis) = api(server, "GET", "/api/v1/ddm/diagnosis", None).await;
    assert_eq!(status, 200, "{diagnosis}");
    (declarations, diagnosis)
}

fn as_of(diagnosis: &Json) -> i64 {
    let as_of = diagnosis["as_of"].as_str().unwrap();
    let parsed = time::OffsetDateTime::parse(as_of, &time::format_description::well_known::Rfc3339);
    parsed.unwrap().unix_timestamp()
}

#[actix_rt::test]
async fn fleet_tallies_equal_a_full_recount_under_concurrent_syncs_and_after_a_restart() {
    // Actors passivate after a second, which persists their timelines.
    let stall_after = 1;
    let mut server = Server::start_with(&["--ddm-stall-after", "1", "--actor-idle-secs", "1"]);
    let devices: Vec<Device> = (0..24)
        .map(|n| Device::new(&server, &format!("FLEET-{n:02}")))
        .collect();
    futures_util::future::join_all(devices.iter().map(|d| d.enroll(&server))).await;
    publish(&server).await;
    // A set with the activation but not the configuration it activates (SD-P08).
    let path = format!("/api/v1/ddm/set-declarations/dangling?declaration={ACTIVATION}");
    assert_eq!(api(&server, "PUT", &path, None).await.0, 204);
    let (defaults, danglings) = devices.split_at(18);
    for (set, group) in [("default", defaults), ("dangling", &danglings[..4])] {
        let ids: Vec<&str> = group.iter().map(|d| d.udid.as_str()).collect();
        let body = json!({"set": set, "enrollments": ids});
        let (status, _) = api(&server, "POST", "/api/v1/ddm/assignments", Some(body)).await;
        assert_eq!(status, 200);
    }

    futures_util::future::join_all(
        defaults
            .iter()
            .enumerate()
            .map(|(n, device)| sync_partly(&server, device, n % 4)),
    )
    .await;
    // A new revision while the fleet is mid-sync: holders of the old one are now behind.
    let (status, _) = api(
        &server,
        "PUT",
        "/api/v1/ddm/declarations",
        Some(test_config("v2")),
    )
    .await;
    assert_eq!(status, 204);
    actix_rt::time::sleep(Duration::from_millis(2500)).await;

    let (declarations, diagnosis) = fleet_views(&server).await;
    assert_eq!(
        diagnosis["enrollments"], 24,
        "every enrollment has a DDM state"
    );
    assert_eq!(declarations[CONFIG]["assigned"], 18);
    assert_eq!(
        declarations[CONFIG]["active"],
        Json::Null,
        "nobody holds the new revision"
    );
    server.kill9();
    let (expected_declarations, expected_rules) =
        recount(&server, stall_after, as_of(&diagnosis)).await;
    assert_eq!(declarations, expected_declarations);
    assert_eq!(diagnosis["rules"], expected_rules);
    for rule in ["SD-T01", "SD-T02", "SD-P08", "SD-E03"] {
        assert!(
            expected_rules[rule].as_u64() > Some(0),
            "{rule} in {expected_rules}"
        );
    }

    // A restarted server rebuilds its tally from the store and answers the same.
    server.restart();
    let (declarations, diagnosis) = fleet_views(&server).await;
    server.kill9();
    let (expected_declarations, expected_rules) =
        recount(&server, stall_after, as_of(&diagnosis)).await;
    assert_eq!(declarations, expected_declarations);
    assert_eq!(diagnosis["rules"], expected_rules);
}

/// Each cluster node counts the shards it runs; every node's fleet views are the sum over
/// all of them, equal to a full recount of the store while devices sync through every
/// node, and again after a node is killed and the others recount the shards they took.
/// Needs `ORCHARD_TEST_CQL`.
#[actix_rt::test]
async fn fleet_tallies_summed_over_cluster_nodes_equal_a_full_recount() {
    use common::cluster::{cluster_with, settled, LEASE};
    let stall_after = 1;
    let names = ["node-a", "node-b", "node-c"];
    let flags = ["--ddm-stall-after", "1", "--actor-idle-secs", "1"];
    let Some(mut nodes) = cluster_with(&names, &[], &flags) else {
        return;
    };
    // How fast shards settle is tests/cluster.rs's concern; here only that they do.
    settled(&nodes[0], &names, LEASE * 15).await;
    let devices: Vec<Device> = (0..24)
        .map(|n| Device::new(&nodes[0], &format!("FLEET-{n:02}")))
        .collect();
    let via = |n: usize| &nodes[n % 3];
    futures_util::future::join_all(devices.iter().enumerate().map(|(n, d)| d.enroll(via(n)))).await;
    publish(&nodes[0]).await;
    let path = format!("/api/v1/ddm/set-declarations/dangling?declaration={ACTIVATION}");
    assert_eq!(api(&nodes[1], "PUT", &path, None).await.0, 204);
    let (defaults, danglings) = devices.split_at(18);
    for (set, group) in [("default", defaults), ("dangling", &danglings[..4])] {
        let ids: Vec<&str> = group.iter().map(|d| d.udid.as_str()).collect();
        let body = json!({"set": set, "enrollments": ids});
        let (status, _) = api(&nodes[2], "POST", "/api/v1/ddm/assignments", Some(body)).await;
        assert_eq!(status, 200);
    }
    futures_util::future::join_all(
        defaults
            .iter()
            .enumerate()
            .map(|(n, device)| sync_partly(via(n + 1), device, n % 4)),
    )
    .await;
    let revision = Some(test_config("v2"));
    let (status, _) = api(&nodes[1], "PUT", "/api/v1/ddm/declarations", revision).await;
    assert_eq!(status, 204);
    // Every actor passivates (and writes its timeline) after a second idle.
    actix_rt::time::sleep(Duration::from_millis(2500)).await;

    let (declarations, diagnosis) = fleet_views(&nodes[0]).await;
    assert_eq!(diagnosis["enrollments"], 24);
    let (expected_declarations, expected_rules) =
        recount(&nodes[0], stall_after, as_of(&diagnosis)).await;
    assert_eq!(declarations, expected_declarations);
    assert_eq!(diagnosis["rules"], expected_rules);
    for node in &nodes[1..] {
        let (other_declarations, other_diagnosis) = fleet_views(node).await;
        assert_eq!(other_declarations, declarations);
        assert_eq!(other_diagnosis["rules"], diagnosis["rules"]);
    }

    // node-c dies; the others take its shards, recount them, and keep counting as the
    // devices it ran sync again through them.
    nodes[2].kill9();
    settled(&nodes[0], &names[..2], LEASE * 15).await;
    futures_util::future::join_all(
        defaults
            .iter()
            .enumerate()
            .map(|(n, device)| sync_partly(&nodes[n % 2], device, (n + 1) % 4)),
    )
    .await;
    actix_rt::time::sleep(Duration::from_millis(2500)).await;
    let (declarations, diagnosis) = fleet_views(&nodes[1]).await;
    assert_eq!(diagnosis["enrollments"], 24);
    assert_eq!(fleet_views(&nodes[0]).await.0, declarations);
    for node in &mut nodes {
        node.kill9();
    }
    let (expected_declarations, expected_rules) =
        recount(&nodes[0], stall_after, as_of(&diagnosis)).await;
    assert_eq!(declarations, expected_declarations);
    assert_eq!(diagnosis["rules"], expected_rules);
}

/// NanoHUB's answer recorded in `transcript`, made comparable with Orchard's: its
/// `status_id` removed (Orchard keeps none; KMFDDM omits an empty one), its clock and
/// ServerTokens replaced by Orchard's (`clock`, `tokens`: theirs → ours).
fn recorded_answer(transcript: &str, clock: &Json, tokens: &[(String, String)]) -> Json {
    let mut answer: Json = serde_json::from_str(&transcript_body(transcript, "RESPONSE")).unwrap();
    for rows in answer.as_object_mut().unwrap().values_mut() {
        for row in rows.as_array_mut().unwrap() {
            let row = row.as_object_mut().unwrap();
            assert!(row.remove("status_id").is_some());
            for field in ["status_received", "timestamp"] {
                if row.contains_key(field) {
                    row.insert(field.into(), clock.clone());
                }
            }
            if let Some(Json::String(token)) = row.get_mut("server-token") {
                *token = tokens
                    .iter()
                    .find(|(theirs, _)| theirs == token)
                    .unwrap()
                    .1
                    .clone();
            }
        }
    }
    answer
}

fn sorted_by(mut answer: Json, key: &str) -> Json {
    for rows in answer.as_object_mut().unwrap().values_mut() {
        rows.as_array_mut()
            .unwrap()
            .sort_by(|a, b| a[key].as_str().cmp(&b[key].as_str()));
    }
    answer
}

#[actix_rt::test]
async fn the_kmfddm_status_routes_answer_as_nanohub_did() {
    let server = Server::start();
    let device = Device::new(&server, UDID);
    device.enroll(&server).await;
    // The recorded session: the same two declarations, set and assignment.
    for upload in [
        "12-api-put-declaration-config.txt",
        "14-api-put-declaration-activation.txt",
    ] {
        let body: Json = serde_json::from_str(&transcript_body(upload, "REQUEST")).unwrap();
        assert_eq!(
            api(&server, "PUT", "/api/v1/ddm/declarations", Some(body))
                .await
                .0,
            204
        );
    }
    for id in [CONFIG, ACTIVATION] {
        let path = format!("/api/v1/ddm/set-declarations/default?declaration={id}");
        assert_eq!(api(&server, "PUT", &path, None).await.0, 204);
    }
    assert_eq!(assign(&server, "default").await, 204);
    let (_, _, items) = ddm(&server, &device, "declaration-items", None).await;
    let ours = |plural: &str| {
        items["Declarations"][plural][0]["ServerToken"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let tokens = vec![
        ("90417ed27ff3af0d".to_string(), ours("Configurations")),
        ("72de23d23465e56b".to_string(), ours("Activations")),
    ];
    // The device's recorded report, about Orchard's revisions.
    let mut report = String::from_utf8(fixture(
        "nanohub-transcripts/30-ddm-status-report.Data-decoded.json",
    ))
    .unwrap();
    for (theirs, ours) in &tokens {
        report = report.replace(theirs, ours);
    }
    let (status, _, _) = ddm(
        &server,
        &device,
        "status",
        Some(report.clone().into_bytes()),
    )
    .await;
    assert_eq!(status, 200);

    let (_, declarations) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/declaration-status/{UDID}"),
        None,
    )
    .await;
    let clock = declarations[UDID][0]["status_received"].clone();
    assert!(regex_lite::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        .unwrap()
        .is_match(clock.as_str().unwrap()));
    for (route, transcript, row_key) in [
        (
            "declaration-status",
            "31-api-declaration-status.txt",
            "identifier",
        ),
        ("status-values", "32-api-status-values.txt", "path"),
        ("status-errors", "33-api-status-errors.txt", "path"),
    ] {
        let (status, answer) =
            api(&server, "GET", &format!("/api/v1/ddm/{route}/{UDID}"), None).await;
        assert_eq!(status, 200);
        assert_eq!(
            sorted_by(answer, row_key),
            sorted_by(recorded_answer(transcript, &clock, &tokens), row_key),
            "{route}"
        );
    }

    // KMFDDM's prefix is a LIKE pattern; several ids are comma-separated and unknown
    // ones left out.
    let (_, device_only) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/status-values/{UDID},NOT-ENROLLED?prefix=.StatusItems.device.%25"),
        None,
    )
    .await;
    let rows = device_only.as_object().unwrap();
    assert_eq!(rows.keys().collect::<Vec<_>>(), vec![UDID]);
    assert_eq!(rows[UDID].as_array().unwrap().len(), 7);
    let (status, nobody) = api(
        &server,
        "GET",
        "/api/v1/ddm/declaration-status/NOT-ENROLLED",
        None,
    )
    .await;
    assert_eq!((status, nobody), (200, json!({})));

    // The raw report, newest first, with KMFDDM's headers (transcript 34).
    let recorded = transcript_body("34-api-status-report.txt", "RESPONSE");
    assert!(recorded.contains("\"StatusItems\""));
    let response = client()
        .get(server.url(&format!("/api/v1/ddm/status-report/{UDID}?index=0")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(content_type_of(&response), "application/json");
    assert_eq!(
        response.headers().get("x-status-report-index").unwrap(),
        "0"
    );
    assert!(response.headers().contains_key("last-modified"));
    assert_eq!(
        body_of(response).await,
        report.into_bytes(),
        "exactly as sent"
    );
    let older = format!("/api/v1/ddm/status-report/{UDID}?index=1");
    let (status, body) = api(&server, "GET", &older, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("status_report_not_found"))
    );
}

#[actix_rt::test]
async fn deleting_a_declaration_that_does_not_exist_changes_nothing() {
    let server = Server::start();
    let (status, _) = api(
        &server,
        "DELETE",
        "/api/v1/ddm/declarations/com.example.none",
        None,
    )
    .await;
    assert_eq!(status, 304, "as KMFDDM: no change");
    assert_eq!(
        api(
            &server,
            "PUT",
            "/api/v1/ddm/declarations",
            Some(test_config("x"))
        )
        .await
        .0,
        204
    );
    let path = format!("/api/v1/ddm/declarations/{CONFIG}");
    assert_eq!(api(&server, "DELETE", &path, None).await.0, 204);
    assert_eq!(api(&server, "DELETE", &path, None).await.0, 304);
    let (status, body) = api(&server, "PUT", "/api/v1/ddm/set-declarations/default", None).await;
    assert_eq!(status, 400, "the declaration query parameter is required");
    assert_eq!(body["error"], "bad_query");
}

#[actix_rt::test]
async fn nonotify_reads_kmfddms_booleans_and_every_set_can_be_unassigned_at_once() {
    let (server, device) = enrolled_device(UDID).await;
    publish(&server).await;
    let extra = format!("/api/v1/ddm/set-declarations/extra?declaration={CONFIG}");
    assert_eq!(api(&server, "PUT", &extra, None).await.0, 204);
    for set in ["default", "extra"] {
        let path = format!("/api/v1/ddm/enrollment-sets/{UDID}?set={set}&nonotify=1");
        assert_eq!(api(&server, "PUT", &path, None).await.0, 204);
    }
    let (_, nothing) = device.connect(&server, device.idle()).await;
    assert!(nothing.is_empty(), "nonotify=1: no sync was queued");

    // KMFDDM registers this route as `enrollment-sets-all/sets/{id}` and documents it
    // as `enrollment-sets-all/{id}`: both work. `nonotify=0` means notify.
    let all = format!("/api/v1/ddm/enrollment-sets-all/sets/{UDID}?nonotify=0");
    assert_eq!(api(&server, "DELETE", &all, None).await.0, 204);
    let (_, sets) = api(
        &server,
        "GET",
        &format!("/api/v1/ddm/enrollment-sets/{UDID}"),
        None,
    )
    .await;
    assert_eq!(sets, json!([]));
    assert!(receive_sync_command(&server, &device).await.is_some());
    let documented = format!("/api/v1/ddm/enrollment-sets-all/{UDID}");
    assert_eq!(api(&server, "DELETE", &documented, None).await.0, 304);
}
