//! What the CQL store guarantees beyond the shared storage contract, on the real server
//! named by `ORCHARD_TEST_CQL` (skipped without one):
//!
//! * a device that received 10,000 commands reads its queue without stepping over their
//!   delete markers (shown with the database's own query trace);
//! * of two devices binding one certificate through two nodes at once, exactly one wins;
//! * nodes starting at once on an empty keyspace create one schema, and a keyspace made
//!   by a newer build is refused.

mod cql;

use std::sync::Arc;

use orchard::store::scylla::{schema, ScyllaConfig, ScyllaStore};
use orchard::store::{EnrollmentRecord, Mutation, QueueEntry, Store, StoreError};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;

/// Commands delivered to the one device of the tombstone case.
const DELIVERED: u64 = 10_000;
/// Queue entries written (or removed) per batch while filling it.
const FILL_BATCH: u64 = 200;

/// A fresh keyspace on the single test server, dropped when the case ends.
struct Keyspace {
    config: ScyllaConfig,
}

impl Keyspace {
    fn fresh() -> Option<Keyspace> {
        let Some(server) = cql::server() else {
            cql::skip("CQL store cases");
            return None;
        };
        Some(Keyspace {
            config: cql::config(vec![server], &cql::fresh_keyspace(), 1),
        })
    }

    async fn store(&self) -> Arc<ScyllaStore> {
        ScyllaStore::connect(&self.config)
            .await
            .expect("connect to the CQL store")
    }

    async fn session(&self) -> Session {
        SessionBuilder::new()
            .known_nodes(&self.config.nodes)
            .build()
            .await
            .expect("a plain driver session")
    }
}

impl Drop for Keyspace {
    fn drop(&mut self) {
        cql::drop_keyspace(self.config.nodes.clone(), self.config.keyspace.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_received_10000_commands_reads_its_queue_past_their_delete_markers() {
    let Some(keyspace) = Keyspace::fresh() else {
        return;
    };
    let store = keyspace.store().await;
    let device = "device-with-history";
    for first in (1..=DELIVERED).step_by(FILL_BATCH as usize) {
        let batch = (first..first + FILL_BATCH)
            .map(|seq| put_entry(device, seq))
            .collect();
        store.apply(batch).await.unwrap();
    }
    for first in (1..=DELIVERED).step_by(FILL_BATCH as usize) {
        // Delivered in order: after each removal the rest starts one further on.
        let batch = (first..first + FILL_BATCH)
            .map(|seq| Mutation::RemoveQueueEntry {
                enrollment_id: device.into(),
                seq,
                pending_from: seq + 1,
            })
            .collect();
        store.apply(batch).await.unwrap();
    }
    let pending = [DELIVERED + 1, DELIVERED + 2];
    let fill = pending.iter().map(|&seq| put_entry(device, seq)).collect();
    store.apply(fill).await.unwrap();

    let queue = store.queue(device).await.unwrap();
    assert_eq!(queue.iter().map(|e| e.seq).collect::<Vec<_>>(), pending);
    let trace = store.trace_queue_read(device).await.unwrap();
    assert_eq!(trace.live_rows, 2, "trace: {:?}", trace.events);
    assert_eq!(trace.tombstones, 0, "trace: {:?}", trace.events);

    // The markers are there: a read of the whole queue section steps over every one.
    let naive = traced_tombstones(
        &keyspace.session().await,
        &format!(
            "SELECT value FROM {}.devices WHERE enrollment_id = '{device}' AND section = 4",
            keyspace.config.keyspace
        ),
    )
    .await;
    assert!(naive >= DELIVERED, "a full read saw only {naive} markers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_binding_one_certificate_through_two_nodes_exactly_one_wins() {
    let Some(keyspace) = Keyspace::fresh() else {
        return;
    };
    let (node_a, node_b) = (keyspace.store().await, keyspace.store().await);
    for round in 0..20_u8 {
        let fingerprint = [round; 32];
        let (a, b) = tokio::join!(
            node_a.apply(enroll_with(fingerprint, &format!("a-{round}"))),
            node_b.apply(enroll_with(fingerprint, &format!("b-{round}"))),
        );
        let winner = match (&a, &b) {
            (Ok(()), Err(StoreError::Conflict(_))) => format!("a-{round}"),
            (Err(StoreError::Conflict(_)), Ok(())) => format!("b-{round}"),
            other => panic!("round {round}: exactly one must win, got {other:?}"),
        };
        for node in [&node_a, &node_b] {
            let bound = node.cert_binding(&fingerprint).await.unwrap();
            assert_eq!(bound.as_deref(), Some(winner.as_str()));
        }
        let loser = if winner.starts_with('a') { "b" } else { "a" };
        let lost = node_a
            .enrollment(&format!("{loser}-{round}"))
            .await
            .unwrap();
        assert_eq!(lost, None, "the losing device's enrollment was not written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_on_an_empty_keyspace_create_one_schema() {
    let Some(keyspace) = Keyspace::fresh() else {
        return;
    };
    let starts = (0..3).map(|n| {
        let mut config = keyspace.config.clone();
        config.node_name = format!("node-{n}");
        async move { ScyllaStore::connect(&config).await }
    });
    let nodes: Vec<Arc<ScyllaStore>> = futures_util::future::join_all(starts)
        .await
        .into_iter()
        .map(|started| started.expect("every node starts"))
        .collect();

    let record = enrollment("written-by-node-0");
    nodes[0]
        .apply(vec![Mutation::PutEnrollment(record.clone())])
        .await
        .unwrap();
    for node in &nodes {
        assert_eq!(
            node.enrollment(&record.id).await.unwrap(),
            Some(record.clone())
        );
    }
    let session = keyspace.session().await;
    assert_eq!(
        recorded_version(&session, &keyspace.config.keyspace).await,
        schema::latest_version()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyspace_migrated_by_a_newer_build_is_refused() {
    let Some(keyspace) = Keyspace::fresh() else {
        return;
    };
    drop(keyspace.store().await);
    let session = keyspace.session().await;
    let newer = schema::latest_version() + 1;
    session
        .query_unpaged(
            format!(
                "UPDATE {}.schema_migrations SET version = ? WHERE name = 'schema'",
                keyspace.config.keyspace
            ),
            (newer,),
        )
        .await
        .unwrap();

    let refused = ScyllaStore::connect(&keyspace.config).await;

    let message = refused
        .err()
        .expect("a newer schema is refused")
        .to_string();
    assert!(
        message.contains(&format!("schema version {newer}")),
        "{message}"
    );
}

async fn traced_tombstones(session: &Session, cql: &str) -> u64 {
    let mut statement = scylla::statement::unprepared::Statement::new(cql.to_string());
    statement.set_tracing(true);
    let result = session.query_unpaged(statement, ()).await.unwrap();
    let tracing_id = result.tracing_id().expect("traced");
    orchard::store::scylla::ReadTrace::fetch(session, tracing_id)
        .await
        .unwrap()
        .tombstones
}

async fn recorded_version(session: &Session, keyspace: &str) -> i32 {
    let rows = session
        .query_unpaged(
            format!("SELECT version FROM {keyspace}.schema_migrations WHERE name = 'schema'"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    rows.single_row::<(i32,)>().unwrap().0
}

fn enroll_with(fingerprint: [u8; 32], id: &str) -> Vec<Mutation> {
    vec![
        Mutation::BindCertificate {
            fingerprint,
            enrollment_id: id.into(),
        },
        Mutation::PutEnrollment(enrollment(id)),
    ]
}

fn enrollment(id: &str) -> EnrollmentRecord {
    EnrollmentRecord {
        id: id.into(),
        device_id: id.into(),
        ..EnrollmentRecord::default()
    }
}

fn put_entry(enrollment_id: &str, seq: u64) -> Mutation {
    Mutation::PutQueueEntry {
        enrollment_id: enrollment_id.into(),
        entry: QueueEntry::new(
            seq,
            &format!("cmd-{seq}"),
            "DeviceInformation",
            0,
            1_700_000_000,
        ),
    }
}
