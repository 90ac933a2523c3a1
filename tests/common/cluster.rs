//! Orchard nodes on one fresh CQL keyspace (`--store scylla --cluster-secret`), and
//! waiting until they share the shards.

use std::time::{Duration, Instant};

use super::*;

pub const LEASE_SECS: u64 = 2;
pub const LEASE: Duration = Duration::from_secs(LEASE_SECS);
pub const SECRET: &str = "cluster-test-secret";

/// Nodes `names` on one fresh keyspace, each started with `extra` flags too.
pub fn cluster_with(names: &[&str], env: &[(&str, &str)], extra: &[&str]) -> Option<Vec<Server>> {
    let Some(cql) = cql::server() else {
        cql::skip("Orchard cluster");
        return None;
    };
    let store = StoreUnderTest::Cql {
        nodes: vec![cql],
        keyspace: cql::fresh_keyspace(),
    };
    let lease = LEASE_SECS.to_string();
    let mut nodes: Vec<Server> = Vec::new();
    for name in names {
        let mut args = vec![
            "--cluster-secret",
            SECRET,
            "--node-id",
            name,
            "--lease-secs",
            &lease,
        ];
        args.extend(extra.iter().copied());
        nodes.push(Server::start_on_with_env(store.clone(), &args, env));
    }
    Some(nodes)
}

pub fn cluster_of(names: &[&str], env: &[(&str, &str)]) -> Option<Vec<Server>> {
    cluster_with(names, env, &[])
}

/// `GET /api/v1/cluster` through `node`.
pub async fn cluster_view(node: &Server) -> serde_json::Value {
    let (status, view) = api_get(node, "/api/v1/cluster").await;
    assert_eq!(status, 200, "{view}");
    view
}

/// Shards held per live node, and the unowned count, as `node` sees them.
pub async fn shares(node: &Server) -> (Vec<(String, u64)>, u64) {
    let view = cluster_view(node).await;
    let mut live: Vec<(String, u64)> = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == true)
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_string(),
                n["shards"].as_u64().unwrap(),
            )
        })
        .collect();
    live.sort();
    (live, view["shards_unowned"].as_u64().unwrap())
}

/// Wait until `node` sees exactly `alive` live nodes holding every shard, each within
/// ±25 % of an even share; the time it took.
pub async fn settled(node: &Server, alive: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    let even = 4096 / alive.len() as u64;
    loop {
        let (live, unowned) = shares(node).await;
        let names: Vec<&str> = live.iter().map(|(n, _)| n.as_str()).collect();
        let balanced = live
            .iter()
            .all(|(_, shards)| shards * 4 >= even * 3 && shards * 4 <= even * 5);
        if names == alive && unowned == 0 && balanced {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not settled on {alive:?} within {within:?}: {live:?}, {unowned} unowned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
