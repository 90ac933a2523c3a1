//! The CQL server the store tests run against: `ORCHARD_TEST_CQL=HOST:PORT` names one
//! node, `ORCHARD_TEST_CQL_CLUSTER=H1:P,H2:P,H3:P` a three-node cluster. Without them the
//! CQL-backed tests return at once and say so. Each test gets a keyspace of its own,
//! dropped when the test is done.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::Duration;

use orchard::store::scylla::ScyllaConfig;

pub const SKIPPED: &str = "skipped: no CQL server (set ORCHARD_TEST_CQL)";

/// The single node named by `ORCHARD_TEST_CQL`, if any.
pub fn server() -> Option<String> {
    std::env::var("ORCHARD_TEST_CQL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// The three nodes named by `ORCHARD_TEST_CQL_CLUSTER`, if any.
pub fn cluster() -> Option<Vec<String>> {
    let nodes: Vec<String> = std::env::var("ORCHARD_TEST_CQL_CLUSTER")
        .ok()?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Print the skip line once per test binary (`suite` names what was skipped).
pub fn skip(suite: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| eprintln!("{SKIPPED}: {suite}"));
}

/// A keyspace name no other test (or test run) uses.
pub fn fresh_keyspace() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t{}_{n}_{nanos}", std::process::id())
}

/// Store settings for a test keyspace on `nodes` with replication `rf`.
pub fn config(nodes: Vec<String>, keyspace: &str, rf: u32) -> ScyllaConfig {
    ScyllaConfig {
        nodes,
        keyspace: keyspace.to_string(),
        replication: rf,
        request_timeout: Duration::from_secs(10),
        node_name: format!("test-{}", std::process::id()),
        ..ScyllaConfig::default()
    }
}

/// Drop a test keyspace, from any context (a `Drop` inside a runtime included).
pub fn drop_keyspace(nodes: Vec<String>, keyspace: String) {
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let session = scylla::client::session_builder::SessionBuilder::new()
                .known_nodes(&nodes)
                .build()
                .await?;
            let mut statement = scylla::statement::unprepared::Statement::new(format!(
                "DROP KEYSPACE IF EXISTS {keyspace}"
            ));
            statement.set_request_timeout(Some(Duration::from_secs(60)));
            session.query_unpaged(statement, ()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    })
    .join();
    if let Ok(Err(e)) = dropped {
        eprintln!("could not drop test keyspace: {e}");
    }
}
