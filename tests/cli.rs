//! `orchard serve` on the command line (contract.md §1).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

#[test]
fn serve_without_flags_starts_on_the_embedded_store_and_prints_url_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_orchard"))
        .arg("serve")
        .env("ORCHARD_LISTEN", "127.0.0.1:0")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .take(4)
        .map(Result::unwrap)
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        lines[0].starts_with("orchard listening on http://127.0.0.1:"),
        "{lines:?}"
    );
    let key_line = lines
        .iter()
        .find(|l| l.starts_with("API key (generated"))
        .expect("API key printed");
    let key = key_line.rsplit(' ').next().unwrap();
    let stored = std::fs::read_to_string(dir.path().join("orchard-data/api-key")).unwrap();
    assert_eq!(key, stored.trim());
    assert!(lines.iter().any(|l| l.starts_with("enrollment URL:")));
    assert!(dir.path().join("orchard-data/identity-ca.pem").exists());
}

#[test]
fn a_bad_flag_or_a_busy_port_exits_non_zero_with_one_line() {
    let bad = Command::new(env!("CARGO_BIN_EXE_orchard"))
        .args(["serve", "--max-body-bytes", "lots"])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let server = Server::start();
    let busy = server.base.trim_start_matches("http://").to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_orchard"))
        .args(["serve", "--listen", &busy])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot listen on"));
}
