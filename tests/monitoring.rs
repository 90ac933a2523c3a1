//! The monitoring files (`deploy/grafana/`, `deploy/prometheus/`) against a real Orchard:
//!
//! * every series a dashboard panel or an alert rule reads is on `/metrics` from start-up,
//!   so a quiet server graphs 0 rather than "no data" (on a cluster node too, with
//!   `ORCHARD_TEST_CQL`);
//! * the series registered at start-up are the very ones traffic then counts (same
//!   labels);
//! * a real Prometheus (Debian's `prometheus` package; CI installs it) scrapes Orchard,
//!   answers every dashboard query with data, and evaluates every alert rule without
//!   error and without firing on a healthy server.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Series only one store exports: each store times its requests under its own name.
const EMBEDDED_STORE_ONLY: &str = "orchard_store_read_seconds_bucket";
const CQL_STORE_ONLY: &str = "orchard_store_request_seconds_bucket";

fn deploy_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(sub)
}

fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *{suffix} in {}", dir.display());
    files
}

fn dashboards() -> Vec<serde_json::Value> {
    files_ending(&deploy_dir("grafana"), ".json")
        .iter()
        .map(|path| serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
        .collect()
}

/// The PromQL of every dashboard panel (Grafana's variables still in it).
fn dashboard_queries() -> Vec<String> {
    let mut queries = Vec::new();
    for dashboard in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                queries.push(target["expr"].as_str().unwrap().to_string());
            }
        }
    }
    queries
}

/// The queries of the dashboards' variables (`label_values(series, label)`).
fn variable_queries() -> Vec<String> {
    dashboards()
        .iter()
        .flat_map(|dashboard| dashboard["templating"]["list"].as_array().unwrap().clone())
        .filter_map(|variable| Some(variable["definition"].as_str()?.to_string()))
        .collect()
}

/// The expression of every alert rule.
fn alert_expressions() -> Vec<String> {
    let mut expressions = Vec::new();
    for path in files_ending(&deploy_dir("prometheus"), ".rules.yml") {
        let rules: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for group in rules["groups"].as_sequence().unwrap() {
            for rule in group["rules"].as_sequence().unwrap() {
                expressions.push(rule["expr"].as_str().unwrap().to_string());
            }
        }
    }
    expressions
}

/// The `orchard_` series an expression reads (string literals, i.e. label values, left
/// out).
fn series_in(expression: &str) -> BTreeSet<String> {
    let literals = regex_lite::Regex::new(r#""(?:[^"\\]|\\.)*""#).unwrap();
    let names = regex_lite::Regex::new(r"\borchard_[a-zA-Z0-9_]+").unwrap();
    let code = literals.replace_all(expression, "\"\"");
    names
        .find_iter(&code)
        .map(|m| m.as_str().to_string())
        .collect()
}

/// The series this store does not export (the other store's).
fn other_stores_series(store: &StoreUnderTest) -> &'static str {
    match store {
        StoreUnderTest::Embedded => CQL_STORE_ONLY,
        StoreUnderTest::Cql { .. } => EMBEDDED_STORE_ONLY,
    }
}

/// Series names on a `/metrics` page.
fn exported_series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// The value of one exact series (name and labels as rendered) on a `/metrics` page.
fn value_of(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

#[actix_rt::test]
async fn every_series_the_dashboard_and_the_alerts_read_is_exported_from_start_up() {
    assert_exports_every_series_read_from_start_up(Server::start()).await;
}

#[actix_rt::test]
async fn a_cluster_node_exports_them_from_start_up_too() {
    let Some(cql) = cql::server() else {
        cql::skip("monitoring of a cluster node");
        return;
    };
    let store = StoreUnderTest::Cql {
        nodes: vec![cql],
        keyspace: cql::fresh_keyspace(),
    };
    let node = Server::start_on(store, &["--cluster-secret", "monitoring-test-secret"]);
    assert_exports_every_series_read_from_start_up(node).await;
}

/// Upload a push certificate, restart `server` (a topic's series come from the stored
/// certificate at start-up), and compare its `/metrics` with what the dashboards and
/// the alert rules read.
async fn assert_exports_every_series_read_from_start_up(mut server: Server) {
    upload_push_cert(&server).await;
    server.restart();
    let exported = exported_series(&metrics_text(&server).await);

    let expressions = dashboard_queries()
        .into_iter()
        .chain(variable_queries())
        .chain(alert_expressions());
    let used: BTreeSet<String> = expressions.flat_map(|e| series_in(&e)).collect();
    assert!(
        used.len() >= 20,
        "the expressions were read (found {used:?})"
    );
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| name.as_str() != other_stores_series(server.store()))
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "read by deploy/grafana or deploy/prometheus but not on /metrics at start-up: {missing:?}"
    );
}

#[actix_rt::test]
async fn the_series_exported_at_start_up_are_the_ones_traffic_counts() {
    let server = Server::start();
    let before = metrics_text(&server).await;
    let reads = match server.store() {
        StoreUnderTest::Embedded => "orchard_store_read_seconds_count",
        StoreUnderTest::Cql { .. } => "orchard_store_request_seconds_count",
    };
    let counted = [
        r#"orchard_http_requests_total{endpoint="/mdm",method="PUT",status="200"}"#.to_string(),
        r#"orchard_checkin_messages_total{message_type="Authenticate"}"#.to_string(),
        r#"orchard_checkin_messages_total{message_type="TokenUpdate"}"#.to_string(),
        r#"orchard_connect_reports_total{status="Idle"}"#.to_string(),
        r#"orchard_http_request_duration_seconds_count{endpoint="/mdm"}"#.to_string(),
        format!(r#"{reads}{{op="device"}}"#),
        "orchard_store_apply_seconds_count".to_string(),
        "orchard_fleet_tally_enrollments".to_string(),
    ];
    for series in &counted {
        assert_eq!(value_of(&before, series), Some(0.0), "{series} at start-up");
    }

    let device = Device::new(&server, "monitoring-device");
    device.enroll(&server).await;
    assert_eq!(device.connect(&server, device.idle()).await.0, 200);
    // The fleet tally counts the device once it has a DDM state (and the startup walk
    // is over: the fleet diagnosis answers).
    ddm(&server, &device, "tokens", None).await;
    let (status, diagnosis) = api_get(&server, "/api/v1/ddm/diagnosis").await;
    assert_eq!(status, 200, "{diagnosis}");

    let after = metrics_text(&server).await;
    for series in &counted {
        let value = value_of(&after, series);
        assert!(
            value.is_some_and(|v| v >= 1.0),
            "{series} counts the device's requests: {value:?}"
        );
    }
}

/// A `prometheus` process, killed when dropped (a failing test included).
struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Prometheus on a free loopback port, scraping `target` (host:port) every second
    /// with Orchard's alert rules evaluated every second.
    fn scraping(target: &str) -> Prometheus {
        let binary = find_on_path("prometheus").unwrap_or_else(|| {
            panic!(
                "the prometheus binary is not installed: `apt-get install prometheus` \
                 (Debian's package; .ci/run installs it)"
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let rules = files_ending(&deploy_dir("prometheus"), ".rules.yml");
        let rules: Vec<String> = rules
            .iter()
            .map(|p| format!("  - {}", p.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\n\
             scrape_configs:\n  - job_name: orchard\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.join("\n")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_loopback_port();
        let log = dir.path().join("prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with `query`; the `data` of a successful answer, `None` while
    /// Prometheus is not answering yet.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<serde_json::Value> {
        let request = client()
            .get(format!("{}/api/v1/{path}", self.base))
            .query(&query)
            .unwrap();
        let mut response = request.send().await.ok()?;
        let body: serde_json::Value = response.json().limit(16 << 20).await.ok()?;
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        Some(body["data"].clone())
    }

    /// Poll `check` every 200 ms until it answers `Some`, for at most `limit`.
    async fn wait_for<T>(
        &self,
        limit: Duration,
        what: &str,
        mut check: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = check().await {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {limit:?}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_on_path(binary: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A dashboard query as Grafana sends it: every node, a one-minute rate window.
fn as_grafana_sends(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
}

#[actix_rt::test]
async fn a_real_prometheus_scrapes_orchard_and_evaluates_the_alert_rules() {
    let server = Server::start();
    upload_push_cert(&server).await;
    let target = server.base.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::scraping(&target);

    let series = prometheus
        .wait_for(Duration::from_secs(60), "an orchard_ series", async || {
            let query = [("query", "orchard_queue_depth")];
            let data = prometheus.api("query", &query).await?;
            let result = data["result"].as_array()?.first()?.clone();
            (result["metric"]["job"] == "orchard").then_some(result)
        })
        .await;
    assert_eq!(series["metric"]["instance"], target.as_str(), "{series}");

    // Rates need two scrapes; then every panel has data (a latency without requests is
    // NaN, still a value).
    let queries: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|q| !series_in(q).contains(other_stores_series(server.store())))
        .map(|q| as_grafana_sends(&q))
        .collect();
    for query in &queries {
        prometheus
            .wait_for(
                Duration::from_secs(30),
                &format!("data for {query}"),
                async || {
                    let data = prometheus.api("query", &[("query", query)]).await?;
                    (!data["result"].as_array()?.is_empty()).then_some(())
                },
            )
            .await;
    }

    // Every alert rule evaluated without error, and none fires on a healthy quiet server.
    let rules = prometheus
        .wait_for(
            Duration::from_secs(30),
            "every rule evaluated",
            async || {
                let data = prometheus.api("rules", &[("type", "alert")]).await?;
                let rules: Vec<serde_json::Value> = data["groups"]
                    .as_array()?
                    .iter()
                    .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
                    .collect();
                let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown");
                evaluated.then_some(rules)
            },
        )
        .await;
    assert_eq!(rules.len(), alert_expressions().len());
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(
            rule["state"], "inactive",
            "a healthy server raises nothing: {rule}"
        );
    }
}
