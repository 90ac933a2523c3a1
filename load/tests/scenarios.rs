//! Every scenario at small scale against a real Orchard, started by `orchard-load` itself
//! from the `orchard` binary built next to it. The assertions are about protocol outcomes
//! (every online device answered, every online device converged, the summary adds up),
//! never about timings.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// The `orchard` binary in the same target directory as `orchard-load`.
fn server_binary() -> PathBuf {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_orchard-load")).with_file_name("orchard");
    assert!(
        binary.is_file(),
        "{} does not exist: build the server first (`cargo build -p orchard`, or run \
         `cargo test --workspace`, which builds it)",
        binary.display()
    );
    binary
}

fn orchard_load(state: &tempfile::TempDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchard-load"))
        .args(args)
        .arg("--server-bin")
        .arg(server_binary())
        .arg("--state-dir")
        .arg(state.path())
        .args(["--timeout", "120", "--repush-after", "1"])
        .output()
        .expect("orchard-load runs")
}

/// Runs a scenario with `--json`; the summary, after checking the run succeeded.
fn summary(args: &[&str]) -> Value {
    let state = tempfile::tempdir().unwrap();
    let mut args = args.to_vec();
    args.push("--json");
    let output = orchard_load(&state, &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "orchard-load {args:?} failed: {stderr}"
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("--json prints one object ({err}); stderr: {stderr}"))
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

fn requests(summary: &Value, endpoint: &str) -> u64 {
    summary["endpoints"][endpoint]["requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("endpoint {endpoint} in {summary}"))
}

/// Fields every summary carries, and the arithmetic between them.
fn assert_consistent(summary: &Value, scenario: &str, devices: u64) {
    assert_eq!(summary["scenario"], scenario);
    assert_eq!(count(summary, "devices"), devices);
    let duration = summary["duration_s"].as_f64().unwrap();
    assert!(duration > 0.0);
    let endpoints = summary["endpoints"].as_object().unwrap();
    assert!(!endpoints.is_empty());
    let mut total = 0;
    for (name, endpoint) in endpoints {
        for field in ["requests", "rps", "p50_ms", "p99_ms", "errors"] {
            assert!(endpoint[field].is_number(), "{name}.{field} in {endpoint}");
        }
        let requests = endpoint["requests"].as_u64().unwrap();
        let rps = endpoint["rps"].as_f64().unwrap();
        let active = endpoint["active_s"].as_f64().unwrap();
        assert!(
            active > 0.0 && active <= duration + 1.0,
            "{name}: active within the run"
        );
        assert!(
            (rps * active - requests as f64).abs() < 1.0,
            "{name}: rps × active_s = requests"
        );
        assert!(endpoint["p50_ms"].as_f64() <= endpoint["p99_ms"].as_f64());
        assert_eq!(endpoint["errors"], 0, "{name} had errors: {endpoint}");
        total += requests;
    }
    assert_eq!(count(summary, "requests"), total);
    assert_eq!(
        count(summary, "completed"),
        count(summary, "expected"),
        "every expected device finished: {summary}"
    );
}

#[test]
fn enroll_enrolls_every_device() {
    let summary = summary(&["enroll", "--devices", "150"]);
    assert_consistent(&summary, "enroll", 150);
    assert_eq!(count(&summary, "completed"), 150);
    assert_eq!(requests(&summary, "checkin:Authenticate"), 150);
    assert_eq!(requests(&summary, "checkin:TokenUpdate"), 150);
}

#[test]
fn checkin_connects_every_online_device() {
    let summary = summary(&[
        "checkin",
        "--devices",
        "100",
        "--duration",
        "2",
        "--check-out",
        "0.1",
    ]);
    assert_consistent(&summary, "checkin", 100);
    let online = count(&summary, "online");
    assert!(
        online < 100 && online > 70,
        "checked-out devices are not online"
    );
    assert_eq!(count(&summary, "completed"), online);
    assert!(requests(&summary, "connect:Idle") >= online);
}

#[test]
fn checkin_at_a_rate_stays_near_it() {
    let summary = summary(&[
        "checkin",
        "--devices",
        "50",
        "--duration",
        "2",
        "--rate",
        "100",
    ]);
    assert_consistent(&summary, "checkin", 50);
    let idle = requests(&summary, "connect:Idle");
    assert!(
        (150..=201).contains(&idle),
        "{idle} connects at 100/s for 2 s"
    );
}

#[test]
fn a_command_storm_is_answered_by_every_online_device_through_pushes() {
    let summary = summary(&[
        "command-storm",
        "--devices",
        "200",
        "--offline",
        "0.1",
        "--not-now",
        "0.1",
        "--error",
        "0.1",
        "--check-out",
        "0.05",
        "--chunk",
        "64",
    ]);
    assert_consistent(&summary, "command-storm", 200);
    let online = count(&summary, "online");
    assert_eq!(count(&summary, "expected"), online);
    assert!(online < 200, "offline and checked-out devices are excluded");
    let answers = &summary["answers"];
    let answered = answers["acknowledged"].as_u64().unwrap() + answers["error"].as_u64().unwrap();
    assert!(answered >= online, "{summary}");
    assert!(answers["not_now"].as_u64().unwrap() > 0);
    assert!(answers["error"].as_u64().unwrap() > 0);
    assert!(count(&summary, "pushes_received") >= online);
    assert!(
        count(&summary, "pushes_ignored") > 0,
        "offline devices were pushed too"
    );
    let chunks = requests(&summary, "api:commands");
    assert!(
        (3..=4).contains(&chunks),
        "about 190 targets in chunks of 64: {chunks}"
    );
    assert!(summary["server"]["peak_rss_kib"].as_u64().unwrap() > 0);
}

#[test]
fn a_command_storm_through_nanohub_with_signed_requests() {
    let summary = summary(&[
        "command-storm",
        "--devices",
        "100",
        "--enqueue",
        "nanohub",
        "--identity",
        "signature",
        "--command",
        "security-info",
    ]);
    assert_consistent(&summary, "command-storm", 100);
    assert_eq!(count(&summary, "completed"), 100);
    assert!(requests(&summary, "api:nanomdm-enqueue") >= 1);
    assert!(requests(&summary, "connect:Acknowledged") >= 100);
}

#[test]
fn every_online_device_converges_on_a_changed_declaration() {
    let summary = summary(&[
        "ddm-converge",
        "--devices",
        "150",
        "--offline",
        "0.1",
        "--not-now",
        "0.1",
        "--error",
        "0.05",
    ]);
    assert_consistent(&summary, "ddm-converge", 150);
    let expected = count(&summary, "expected");
    assert!(expected > 100);
    let phases = summary["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["enroll", "ddm-assign", "ddm-converge"]);
    for phase in phases {
        assert_eq!(phase["completed"], phase["expected"], "{phase}");
    }
    assert_eq!(count(&summary["convergence_ms"], "count"), expected);
    let view = &summary["server_view"];
    let config = &view["declarations"]["com.orchard-load.test"];
    assert_eq!(
        config["active"].as_u64(),
        Some(expected),
        "Orchard agrees: {config}"
    );
    assert_eq!(
        view["diagnosis"]["enrollments"].as_u64(),
        Some(150),
        "every enrolled device is counted by the diagnosis: {view}"
    );
    assert!(requests(&summary, "ddm:status") >= 2 * expected);
}

#[test]
fn mixed_load_ends_converged_on_the_last_revision() {
    let summary = summary(&[
        "mixed",
        "--devices",
        "100",
        "--duration",
        "6",
        "--rate",
        "100",
    ]);
    assert_consistent(&summary, "mixed", 100);
    assert_eq!(count(&summary, "completed"), 100);
    assert!(
        requests(&summary, "api:commands") >= 1,
        "a command wave went out"
    );
    assert!(requests(&summary, "connect:Idle") > 100);
}

#[test]
fn the_plot_is_an_svg() {
    let state = tempfile::tempdir().unwrap();
    let plot = state.path().join("plot.svg");
    let output = orchard_load(
        &state,
        &[
            "enroll",
            "--devices",
            "20",
            "--plot",
            plot.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("checkin:Authenticate"), "{table}");
}

#[test]
fn non_loopback_targets_are_refused() {
    let state = tempfile::tempdir().unwrap();
    let output = orchard_load(
        &state,
        &[
            "enroll",
            "--devices",
            "1",
            "--target",
            "http://192.0.2.1:9004",
            "--api-key",
            "k",
        ],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a loopback URL"));
}

#[test]
fn a_missing_server_binary_is_reported_clearly() {
    let state = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_orchard-load"))
        .args([
            "enroll",
            "--devices",
            "1",
            "--server-bin",
            "/nonexistent/orchard",
        ])
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/orchard"));
}
