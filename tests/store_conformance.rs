//! The storage contract, run against every backend.
//!
//! Each case is an `async fn` generic over [`Backend`]; [`conformance_suite!`] turns the
//! whole list into one `#[tokio::test]` per case for one backend. Adding a backend means
//! implementing [`Backend`] for it and adding one `conformance_suite!` line at the bottom.
//! The CQL backend runs against the server named by `ORCHARD_TEST_CQL` (one fresh
//! keyspace per case) and is skipped without one.

mod cql;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use orchard::store::embedded::EmbeddedStore;
use orchard::store::scylla::{ScyllaConfig, ScyllaStore};
use orchard::store::{
    CommandResult, DdmRecord, DeclarationRecord, DeclarationSet, DeviceRecords, EnrollmentKind,
    EnrollmentRecord, Mutation, PushCertRecord, PushInfo, QueueEntry, ResultStatus, Store,
    StoreError, StoredCommand, StoredReport, WakeEntry, WebhookEvent,
};

/// A fresh, empty storage location that can be opened (and reopened) as a store.
trait Backend: Sized {
    type Store: Store;

    /// Whether this backend can run here (a server it needs may be missing).
    fn available() -> bool {
        true
    }

    async fn fresh() -> Self;

    /// Open the store; every open of one backend sees the same durable data.
    async fn open(&self) -> Arc<Self::Store>;
}

/// An [`EmbeddedStore`] in its own temporary directory.
struct EmbeddedBackend {
    dir: tempfile::TempDir,
}

impl EmbeddedBackend {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Backend for EmbeddedBackend {
    type Store = EmbeddedStore;

    async fn fresh() -> Self {
        EmbeddedBackend {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    async fn open(&self) -> Arc<EmbeddedStore> {
        EmbeddedStore::open(&self.data_dir()).expect("open embedded store")
    }
}

/// A fresh keyspace on the CQL server of `ORCHARD_TEST_CQL`, dropped afterwards.
struct ScyllaBackend {
    config: ScyllaConfig,
}

impl Backend for ScyllaBackend {
    type Store = ScyllaStore;

    fn available() -> bool {
        let available = cql::server().is_some();
        if !available {
            cql::skip("store conformance suite on the CQL backend");
        }
        available
    }

    async fn fresh() -> Self {
        let server = cql::server().expect("ORCHARD_TEST_CQL");
        ScyllaBackend {
            config: cql::config(vec![server], &cql::fresh_keyspace(), 1),
        }
    }

    async fn open(&self) -> Arc<ScyllaStore> {
        ScyllaStore::connect(&self.config)
            .await
            .expect("connect to the CQL store")
    }
}

impl Drop for ScyllaBackend {
    fn drop(&mut self) {
        cql::drop_keyspace(self.config.nodes.clone(), self.config.keyspace.clone());
    }
}

/// One `#[tokio::test]` per named case, for the backend type given.
macro_rules! conformance_cases {
    ($backend:ty; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if !<$backend as Backend>::available() {
                    return;
                }
                let backend = <$backend as Backend>::fresh().await;
                cases::$case(backend).await;
            }
        )+
    };
}

/// The whole conformance suite as module `$module`, run against `$backend`.
macro_rules! conformance_suite {
    ($module:ident, $backend:ty) => {
        mod $module {
            use super::*;

            conformance_cases!($backend;
                enrollment_round_trips_and_is_overwritten_whole,
                enrollment_ids_page_in_a_stable_order_visiting_each_once,
                certificate_binding_resolves_to_its_enrollment,
                a_certificate_bound_elsewhere_fails_the_whole_batch,
                command_body_is_written_once,
                queue_lists_entries_in_seq_order,
                queue_entry_with_the_same_seq_is_replaced,
                removing_a_queue_entry_keeps_the_others,
                delivered_commands_never_hide_pending_or_later_ones,
                clearing_a_queue_affects_only_that_enrollment,
                result_is_upserted_by_command_uuid,
                results_are_the_newest_in_seq_order,
                results_belong_to_their_enrollment_only,
                push_certificates_are_kept_per_topic,
                wakes_come_due_in_time_order_and_reschedule_in_place,
                declarations_and_sets_are_upserted_and_deleted_whole,
                set_members_page_per_set,
                ddm_state_is_kept_per_enrollment,
                status_reports_keep_only_the_newest,
                a_device_reads_as_one_snapshot,
                a_batch_becomes_visible_as_a_whole,
                an_empty_batch_is_accepted,
                acknowledged_writes_survive_reopening,
                concurrent_applies_all_succeed_and_are_visible,
                unknown_keys_read_as_absent,
                a_claim_keeps_the_first_value,
                shared_versions_change_with_the_catalog_and_push_certificates_only,
                a_webhook_outbox_is_read_in_order_until_its_events_are_removed,
                a_webhook_event_is_written_with_its_change_or_not_at_all,
                enrollments_with_pending_webhook_events_page_visiting_each_once,
                an_enrollment_stays_pending_while_a_later_event_waits,
            );
        }
    };
}

mod cases {
    use super::*;

    pub async fn enrollment_round_trips_and_is_overwritten_whole<B: Backend>(backend: B) {
        let store = backend.open().await;
        let mut record = full_enrollment("device-1");
        apply(&store, vec![Mutation::PutEnrollment(record.clone())]).await;
        assert_eq!(
            store.enrollment("device-1").await.unwrap(),
            Some(record.clone())
        );

        record.enabled = false;
        record.push = None;
        record.user_channels.clear();
        record.generation += 1;
        apply(&store, vec![Mutation::PutEnrollment(record.clone())]).await;
        assert_eq!(store.enrollment("device-1").await.unwrap(), Some(record));
    }

    pub async fn enrollment_ids_page_in_a_stable_order_visiting_each_once<B: Backend>(backend: B) {
        let store = backend.open().await;
        let ids: Vec<String> = (0..40).map(|n| format!("device-{n}")).collect();
        for id in &ids {
            apply(&store, vec![Mutation::PutEnrollment(enrollment(id))]).await;
        }
        // Rewriting an enrollment does not list it twice.
        apply(
            &store,
            vec![Mutation::PutEnrollment(enrollment("device-7"))],
        )
        .await;

        let all = store.enrollment_ids(None, 100).await.unwrap();
        assert_eq!(sorted(&all), sorted(&ids));
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.enrollment_ids(after.as_deref(), 3).await.unwrap();
            assert!(page.len() <= 3);
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            paged.extend(page);
        }
        assert_eq!(paged, all, "pages of 3 walk the same order as one page");
        assert_eq!(
            store.enrollment_ids(Some(&all[9]), 2).await.unwrap(),
            all[10..12]
        );
        assert!(store.enrollment_ids(None, 0).await.unwrap().is_empty());
    }

    pub async fn certificate_binding_resolves_to_its_enrollment<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(
            &store,
            vec![bind([1; 32], "device-1"), bind([2; 32], "device-2")],
        )
        .await;
        assert_eq!(
            store.cert_binding(&[1; 32]).await.unwrap().as_deref(),
            Some("device-1")
        );
        assert_eq!(
            store.cert_binding(&[2; 32]).await.unwrap().as_deref(),
            Some("device-2")
        );

        // Binding again to the same enrollment (a re-enrollment) is a no-op.
        apply(&store, vec![bind([1; 32], "device-1")]).await;
        assert_eq!(
            store.cert_binding(&[1; 32]).await.unwrap().as_deref(),
            Some("device-1")
        );
    }

    pub async fn a_certificate_bound_elsewhere_fails_the_whole_batch<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(&store, vec![bind([1; 32], "device-1")]).await;

        let outcome = store
            .apply(vec![
                bind([1; 32], "device-2"),
                Mutation::PutEnrollment(enrollment("device-2")),
            ])
            .await;

        assert!(
            matches!(outcome, Err(StoreError::Conflict(_))),
            "{outcome:?}"
        );
        assert_eq!(
            store.cert_binding(&[1; 32]).await.unwrap().as_deref(),
            Some("device-1")
        );
        assert_eq!(store.enrollment("device-2").await.unwrap(), None);
    }

    pub async fn command_body_is_written_once<B: Backend>(backend: B) {
        let store = backend.open().await;
        let first = command("cmd-1", b"first body");
        apply(&store, vec![Mutation::PutCommand(first.clone())]).await;
        apply(
            &store,
            vec![Mutation::PutCommand(command("cmd-1", b"second body"))],
        )
        .await;

        assert_eq!(store.command("cmd-1").await.unwrap(), Some(first));
    }

    pub async fn queue_lists_entries_in_seq_order<B: Backend>(backend: B) {
        let store = backend.open().await;
        for seq in [3, 1, 20, 2] {
            apply(&store, vec![put_entry("device-1", queue_entry(seq))]).await;
        }

        assert_eq!(seqs(&store.queue("device-1").await.unwrap()), [1, 2, 3, 20]);
    }

    pub async fn queue_entry_with_the_same_seq_is_replaced<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(&store, vec![put_entry("device-1", queue_entry(7))]).await;
        let mut postponed = queue_entry(7);
        postponed.not_now_count = 1;
        postponed.last_not_now_at = Some(1_700_000_100);
        apply(&store, vec![put_entry("device-1", postponed.clone())]).await;

        assert_eq!(store.queue("device-1").await.unwrap(), [postponed]);
    }

    pub async fn removing_a_queue_entry_keeps_the_others<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(
            &store,
            (1..=3)
                .map(|seq| put_entry("device-1", queue_entry(seq)))
                .collect(),
        )
        .await;
        apply(&store, vec![remove_entry("device-1", 2, 1)]).await;

        assert_eq!(seqs(&store.queue("device-1").await.unwrap()), [1, 3]);
    }

    pub async fn delivered_commands_never_hide_pending_or_later_ones<B: Backend>(backend: B) {
        let store = backend.open().await;
        let fill = (1..=6).map(|seq| put_entry("device-1", queue_entry(seq)));
        apply(&store, fill.collect()).await;
        // Delivered out of order (a higher priority first), then in order.
        apply(&store, vec![remove_entry("device-1", 5, 1)]).await;
        for seq in 1..=3 {
            apply(&store, vec![remove_entry("device-1", seq, seq + 1)]).await;
        }
        apply(&store, vec![put_entry("device-1", queue_entry(10))]).await;

        assert_eq!(seqs(&store.queue("device-1").await.unwrap()), [4, 6, 10]);
        let records = store.device("device-1").await.unwrap();
        assert_eq!(records.queue.len(), 3);
        assert!(records.queue_floor <= 4, "floor {}", records.queue_floor);
    }

    pub async fn clearing_a_queue_affects_only_that_enrollment<B: Backend>(backend: B) {
        let store = backend.open().await;
        // "device-1" is a prefix of "device-10": a prefix must not leak into a range.
        let ids = ["device-1", "device-10", "device-2"];
        let fill = ids
            .iter()
            .flat_map(|id| (1..=3).map(|seq| put_entry(id, queue_entry(seq))))
            .collect();
        apply(&store, fill).await;
        apply(&store, vec![clear_queue("device-1")]).await;

        assert!(store.queue("device-1").await.unwrap().is_empty());
        assert_eq!(seqs(&store.queue("device-10").await.unwrap()), [1, 2, 3]);
        assert_eq!(seqs(&store.queue("device-2").await.unwrap()), [1, 2, 3]);

        // Clearing an already empty queue is harmless, and the queue is usable again.
        apply(&store, vec![clear_queue("device-1")]).await;
        apply(&store, vec![put_entry("device-1", queue_entry(4))]).await;
        assert_eq!(seqs(&store.queue("device-1").await.unwrap()), [4]);
    }

    pub async fn result_is_upserted_by_command_uuid<B: Backend>(backend: B) {
        let store = backend.open().await;
        let not_now = result("cmd-1", 1, ResultStatus::NotNow);
        apply(&store, vec![put_result("device-1", not_now.clone())]).await;
        assert_eq!(
            store.result("device-1", "cmd-1").await.unwrap(),
            Some(not_now)
        );

        let acknowledged = result("cmd-1", 1, ResultStatus::Acknowledged);
        apply(&store, vec![put_result("device-1", acknowledged.clone())]).await;
        assert_eq!(
            store.result("device-1", "cmd-1").await.unwrap(),
            Some(acknowledged.clone())
        );
        assert_eq!(store.results("device-1", 10).await.unwrap(), [acknowledged]);

        // A result stored again under a new seq moves in the history; it is not duplicated.
        apply(
            &store,
            vec![put_result(
                "device-1",
                result("cmd-2", 2, ResultStatus::Error),
            )],
        )
        .await;
        let moved = result("cmd-1", 3, ResultStatus::Acknowledged);
        apply(&store, vec![put_result("device-1", moved.clone())]).await;
        let history = store.results("device-1", 10).await.unwrap();
        assert_eq!(uuids(&history), ["cmd-2", "cmd-1"]);
        assert_eq!(history[1], moved);
    }

    pub async fn results_are_the_newest_in_seq_order<B: Backend>(backend: B) {
        let store = backend.open().await;
        for seq in [5, 1, 3, 2, 4] {
            let answer = result(&format!("cmd-{seq}"), seq, ResultStatus::Acknowledged);
            apply(&store, vec![put_result("device-1", answer)]).await;
        }

        let newest = store.results("device-1", 3).await.unwrap();
        assert_eq!(uuids(&newest), ["cmd-3", "cmd-4", "cmd-5"]);
        let all = store.results("device-1", 100).await.unwrap();
        assert_eq!(uuids(&all), ["cmd-1", "cmd-2", "cmd-3", "cmd-4", "cmd-5"]);
        assert!(store.results("device-1", 0).await.unwrap().is_empty());
    }

    pub async fn results_belong_to_their_enrollment_only<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(
            &store,
            vec![put_result(
                "device-1",
                result("cmd-a", 1, ResultStatus::Acknowledged),
            )],
        )
        .await;
        apply(
            &store,
            vec![put_result(
                "device-10",
                result("cmd-b", 2, ResultStatus::Error),
            )],
        )
        .await;

        assert_eq!(
            uuids(&store.results("device-1", 10).await.unwrap()),
            ["cmd-a"]
        );
        assert_eq!(
            uuids(&store.results("device-10", 10).await.unwrap()),
            ["cmd-b"]
        );
        assert_eq!(store.result("device-1", "cmd-b").await.unwrap(), None);
    }

    pub async fn wakes_come_due_in_time_order_and_reschedule_in_place<B: Backend>(backend: B) {
        let store = backend.open().await;
        let wake = |id: &str, due_at: i64, attempt: u32| Mutation::ScheduleWake {
            enrollment_id: id.into(),
            due_at,
            attempt,
        };
        apply(
            &store,
            vec![
                wake("late", 300, 0),
                wake("early", 100, 2),
                wake("later", 900, 0),
            ],
        )
        .await;
        let due: Vec<_> = store.due_wakes(300, 10).await.unwrap();
        assert_eq!(
            due,
            [
                WakeEntry {
                    enrollment_id: "early".into(),
                    due_at: 100,
                    attempt: 2
                },
                WakeEntry {
                    enrollment_id: "late".into(),
                    due_at: 300,
                    attempt: 0
                },
            ]
        );
        assert_eq!(
            store.due_wakes(1000, 1).await.unwrap().len(),
            1,
            "limit applies"
        );

        apply(&store, vec![wake("early", 500, 3)]).await;
        let due = store.due_wakes(600, 10).await.unwrap();
        let ids: Vec<_> = due
            .iter()
            .map(|w| (w.enrollment_id.as_str(), w.due_at))
            .collect();
        assert_eq!(
            ids,
            [("late", 300), ("early", 500)],
            "rescheduling replaces the old time"
        );

        apply(
            &store,
            vec![Mutation::ClearWake {
                enrollment_id: "late".into(),
            }],
        )
        .await;
        apply(
            &store,
            vec![Mutation::ClearWake {
                enrollment_id: "never-scheduled".into(),
            }],
        )
        .await;
        let ids: Vec<_> = store
            .due_wakes(1000, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.enrollment_id)
            .collect();
        assert_eq!(ids, ["early", "later"]);
    }

    pub async fn declarations_and_sets_are_upserted_and_deleted_whole<B: Backend>(backend: B) {
        let store = backend.open().await;
        let set = |name: &str, ids: &[&str]| DeclarationSet {
            name: name.into(),
            declarations: ids.iter().map(|s| s.to_string()).collect(),
        };
        apply(
            &store,
            vec![
                Mutation::PutDeclaration(declaration("a", "t1")),
                Mutation::PutDeclaration(declaration("b", "t1")),
                Mutation::PutSet(set("default", &["a", "b"])),
            ],
        )
        .await;
        apply(
            &store,
            vec![
                Mutation::PutDeclaration(declaration("a", "t2")),
                Mutation::DeleteDeclaration {
                    identifier: "b".into(),
                },
                Mutation::PutSet(set("default", &["a"])),
                Mutation::PutSet(set("other", &[])),
                Mutation::DeleteSet {
                    name: "other".into(),
                },
            ],
        )
        .await;
        assert_eq!(
            store.declarations().await.unwrap(),
            [declaration("a", "t2")]
        );
        assert_eq!(store.sets().await.unwrap(), [set("default", &["a"])]);
    }

    pub async fn set_members_page_per_set<B: Backend>(backend: B) {
        let store = backend.open().await;
        let member = |set: &str, id: &str| Mutation::PutSetMember {
            set: set.into(),
            enrollment_id: id.into(),
        };
        apply(
            &store,
            vec![
                member("s", "d2"),
                member("s", "d1"),
                member("s", "d3"),
                member("s-other", "d9"),
                member("t", "d1"),
            ],
        )
        .await;
        let members = store.set_members("s", None, 10).await.unwrap();
        assert_eq!(sorted(&members), ["d1", "d2", "d3"]);
        assert_eq!(
            store.set_members("s", Some(&members[0]), 1).await.unwrap(),
            members[1..2]
        );
        apply(
            &store,
            vec![Mutation::RemoveSetMember {
                set: "s".into(),
                enrollment_id: "d2".into(),
            }],
        )
        .await;
        assert_eq!(
            sorted(&store.set_members("s", None, 10).await.unwrap()),
            ["d1", "d3"]
        );
        assert!(store
            .set_members("nobody-set", None, 10)
            .await
            .unwrap()
            .is_empty());
    }

    pub async fn ddm_state_is_kept_per_enrollment<B: Backend>(backend: B) {
        let store = backend.open().await;
        let put = |id: &str, state: &[u8]| Mutation::PutDdmState {
            enrollment_id: id.into(),
            state: state.to_vec(),
        };
        let timeline = |id: &str, timeline: &[u8]| Mutation::PutDdmTimeline {
            enrollment_id: id.into(),
            timeline: timeline.to_vec(),
        };
        // A DDM state belongs to an enrollment; d3 is enrolled and has none.
        let enroll = ["d1", "d2", "d3"].map(|id| Mutation::PutEnrollment(enrollment(id)));
        apply(&store, enroll.to_vec()).await;
        apply(&store, vec![put("d1", b"one"), put("d2", b"two")]).await;
        apply(&store, vec![put("d1", b"uno"), timeline("d1", b"events")]).await;
        let ddm = |state: &[u8], timeline: Option<&[u8]>| DdmRecord {
            state: Some(state.to_vec()),
            timeline: timeline.map(<[u8]>::to_vec),
        };
        assert_eq!(
            store.device("d1").await.unwrap().ddm,
            ddm(b"uno", Some(b"events"))
        );
        assert_eq!(store.device("d2").await.unwrap().ddm, ddm(b"two", None));
        assert_eq!(store.device("d3").await.unwrap().ddm, DdmRecord::default());

        // The fleet walk reads each enrollment with a DDM state together with its record.
        let every = orchard::store::every_enrollment;
        let all = store.fleet_rows(None, 10, every()).await.unwrap();
        let by_id: std::collections::BTreeMap<_, _> = all
            .iter()
            .map(|(id, rows)| (id.clone(), (rows.enrollment.clone(), rows.ddm.clone())))
            .collect();
        assert_eq!(
            by_id,
            [
                (
                    "d1".to_string(),
                    (Some(enrollment("d1")), ddm(b"uno", Some(b"events")))
                ),
                (
                    "d2".to_string(),
                    (Some(enrollment("d2")), ddm(b"two", None))
                )
            ]
            .into()
        );
        let first = store.fleet_rows(None, 1, every()).await.unwrap();
        assert_eq!(first, all[..1]);
        let rest = store
            .fleet_rows(Some(&all[0].0), 10, every())
            .await
            .unwrap();
        assert_eq!(rest, all[1..]);
        // A walk recounting some shards reads only the enrollments it wants.
        let second: orchard::store::EnrollmentFilter = std::sync::Arc::new(|id| id == "d2");
        let only_second: Vec<_> = all.iter().filter(|(id, _)| id == "d2").cloned().collect();
        let wanted = store.fleet_rows(None, 1, second.clone()).await.unwrap();
        assert_eq!(wanted, only_second);
        let last = &all[all.len() - 1].0;
        let after_last = store.fleet_rows(Some(last), 10, second).await.unwrap();
        assert!(after_last.is_empty());
    }

    pub async fn status_reports_keep_only_the_newest<B: Backend>(backend: B) {
        let store = backend.open().await;
        let report = |id: &str, at: i64| Mutation::AppendDdmReport {
            enrollment_id: id.into(),
            report: StoredReport {
                received_at: at,
                json: format!("{{\"n\":{at}}}"),
            },
            keep: 2,
        };
        for at in 1..=4 {
            apply(&store, vec![report("d1", at)]).await;
        }
        apply(&store, vec![report("d2", 9)]).await;
        let kept: Vec<i64> = store
            .ddm_reports("d1")
            .await
            .unwrap()
            .iter()
            .map(|r| r.received_at)
            .collect();
        assert_eq!(kept, [3, 4], "the two newest, oldest first");
        let other = store.ddm_reports("d2").await.unwrap();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].json, r#"{"n":9}"#);
        assert!(store.ddm_reports("nobody").await.unwrap().is_empty());
    }

    pub async fn a_device_reads_as_one_snapshot<B: Backend>(backend: B) {
        let store = backend.open().await;
        let mut first = queue_entry(1);
        first.command_uuid = "cmd-a".into();
        let mut orphan = queue_entry(2);
        orphan.command_uuid = "cmd-missing".into();
        apply(
            &store,
            vec![
                Mutation::PutEnrollment(enrollment("d1")),
                Mutation::PutCommand(command("cmd-a", b"<plist/>")),
                put_entry("d1", first.clone()),
                put_entry("d1", orphan.clone()),
                put_entry("d2", queue_entry(7)),
            ],
        )
        .await;
        let records = store.device("d1").await.unwrap();
        assert_eq!(records.enrollment, Some(enrollment("d1")));
        assert_eq!(
            records.queue,
            [(first, Some(command("cmd-a", b"<plist/>"))), (orphan, None)]
        );
        assert_eq!(
            store.device("nobody").await.unwrap(),
            DeviceRecords::default()
        );
    }

    pub async fn a_webhook_outbox_is_read_in_order_until_its_events_are_removed<B: Backend>(
        backend: B,
    ) {
        let store = backend.open().await;
        apply(
            &store,
            vec![put_event("device-1", 1_000), put_event("device-1", 2_000)],
        )
        .await;
        apply(&store, vec![put_event("device-1", 3_000)]).await;
        apply(&store, vec![put_event("device-2", 5_000)]).await;
        drop(store);
        let store = backend.open().await;
        let read = store.webhook_events("device-1", 10).await.unwrap();
        assert_eq!(event_seqs(&read), [1_000, 2_000, 3_000]);
        assert_eq!(read[0], webhook_event(1_000), "an event reads back whole");
        let first_two = store.webhook_events("device-1", 2).await.unwrap();
        assert_eq!(event_seqs(&first_two), [1_000, 2_000]);
        assert_eq!(
            store.device("device-1").await.unwrap().webhook_next_seq,
            3_001,
            "the next sequence is past every event ever written"
        );

        apply(&store, vec![remove_event("device-1", 1_000)]).await;
        let read = store.webhook_events("device-1", 10).await.unwrap();
        assert_eq!(event_seqs(&read), [2_000, 3_000]);
        apply(
            &store,
            vec![
                remove_event("device-1", 2_000),
                remove_event("device-1", 3_000),
            ],
        )
        .await;
        assert!(store
            .webhook_events("device-1", 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            store.webhook_pending(None, 10).await.unwrap(),
            ["device-2"],
            "a drained outbox leaves the index"
        );
        assert_eq!(
            store.device("device-1").await.unwrap().webhook_next_seq,
            3_001,
            "removing events never lowers the next sequence"
        );
    }

    pub async fn a_webhook_event_is_written_with_its_change_or_not_at_all<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(
            &store,
            vec![
                Mutation::PutEnrollment(enrollment("device-1")),
                put_event("device-1", 1_000),
            ],
        )
        .await;
        assert!(store.enrollment("device-1").await.unwrap().is_some());
        assert_eq!(
            event_seqs(&store.webhook_events("device-1", 10).await.unwrap()),
            [1_000]
        );

        apply(&store, vec![bind([9; 32], "device-1")]).await;
        let refused = store
            .apply(vec![
                bind([9; 32], "device-2"),
                Mutation::PutEnrollment(enrollment("device-2")),
                put_event("device-2", 2_000),
            ])
            .await;
        assert!(matches!(refused, Err(StoreError::Conflict(_))));
        assert!(store.enrollment("device-2").await.unwrap().is_none());
        assert!(store
            .webhook_events("device-2", 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.webhook_pending(None, 10).await.unwrap(), ["device-1"]);
    }

    pub async fn enrollments_with_pending_webhook_events_page_visiting_each_once<B: Backend>(
        backend: B,
    ) {
        let store = backend.open().await;
        let ids: Vec<String> = (0..30).map(|n| format!("device-{n}")).collect();
        for (n, id) in ids.iter().enumerate() {
            let seq = 1_000 + n as u64;
            apply(&store, vec![put_event(id, seq), put_event(id, seq + 100)]).await;
        }
        let all = store.webhook_pending(None, 100).await.unwrap();
        assert_eq!(sorted(&all), sorted(&ids), "each enrollment once");
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.webhook_pending(after.as_deref(), 7).await.unwrap();
            assert!(page.len() <= 7);
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            paged.extend(page);
        }
        assert_eq!(paged, all, "pages of 7 walk the same order as one page");
    }

    pub async fn an_enrollment_stays_pending_while_a_later_event_waits<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(&store, vec![put_event("device-1", 1_000)]).await;
        apply(&store, vec![put_event("device-1", 2_000)]).await;
        apply(&store, vec![remove_event("device-1", 1_000)]).await;
        assert_eq!(store.webhook_pending(None, 10).await.unwrap(), ["device-1"]);

        apply(&store, vec![remove_event("device-1", 2_000)]).await;
        assert!(store.webhook_pending(None, 10).await.unwrap().is_empty());
        apply(&store, vec![put_event("device-1", 3_000)]).await;
        assert_eq!(
            store.webhook_pending(None, 10).await.unwrap(),
            ["device-1"],
            "an event after a drained outbox lists the enrollment again"
        );
    }

    pub async fn a_claim_keeps_the_first_value<B: Backend>(backend: B) {
        let store = backend.open().await;
        let first = store.claim("identity-ca", b"first".to_vec()).await.unwrap();
        assert_eq!(first, b"first");
        let second = store
            .claim("identity-ca", b"second".to_vec())
            .await
            .unwrap();
        assert_eq!(second, b"first", "the first claimer's value stays");
        let other = store.claim("api-key", b"key".to_vec()).await.unwrap();
        assert_eq!(other, b"key", "claims are per name");
        // Racing claimers all end up with one value.
        let racing = futures_util::future::join_all(
            (0..8).map(|n| store.claim("race", format!("claimer-{n}").into_bytes())),
        )
        .await;
        let values: std::collections::BTreeSet<Vec<u8>> =
            racing.into_iter().map(Result::unwrap).collect();
        assert_eq!(values.len(), 1, "{values:?}");
    }

    pub async fn shared_versions_change_with_the_catalog_and_push_certificates_only<B: Backend>(
        backend: B,
    ) {
        let store = backend.open().await;
        let start = store.shared_versions().await.unwrap();
        apply(
            &store,
            vec![Mutation::PutEnrollment(enrollment("device-1"))],
        )
        .await;
        assert_eq!(
            store.shared_versions().await.unwrap(),
            start,
            "device writes"
        );

        apply(
            &store,
            vec![Mutation::PutDeclaration(declaration("a", "t1"))],
        )
        .await;
        let declared = store.shared_versions().await.unwrap();
        assert_ne!(declared.catalog, start.catalog);
        assert_eq!(declared.push_certs, start.push_certs);

        apply(
            &store,
            vec![Mutation::DeleteDeclaration {
                identifier: "a".into(),
            }],
        )
        .await;
        let deleted = store.shared_versions().await.unwrap();
        assert_ne!(deleted.catalog, declared.catalog);

        let cert = push_cert("com.apple.mgmt.External.one", 100);
        apply(&store, vec![Mutation::PutPushCert(cert)]).await;
        let pushed = store.shared_versions().await.unwrap();
        assert_ne!(pushed.push_certs, deleted.push_certs);
        assert_eq!(pushed.catalog, deleted.catalog);
    }

    pub async fn push_certificates_are_kept_per_topic<B: Backend>(backend: B) {
        let store = backend.open().await;
        let first = push_cert("com.apple.mgmt.External.one", 100);
        let second = push_cert("com.apple.mgmt.External.two", 200);
        apply(
            &store,
            vec![
                Mutation::PutPushCert(first.clone()),
                Mutation::PutPushCert(second.clone()),
            ],
        )
        .await;
        assert_eq!(
            store.push_cert(&first.topic).await.unwrap(),
            Some(first.clone())
        );

        let renewed = push_cert(&first.topic, 300);
        apply(&store, vec![Mutation::PutPushCert(renewed.clone())]).await;
        let mut all = store.push_certs().await.unwrap();
        all.sort_by(|a, b| a.topic.cmp(&b.topic));
        assert_eq!(all, [renewed, second]);
    }

    pub async fn a_batch_becomes_visible_as_a_whole<B: Backend>(backend: B) {
        let store = backend.open().await;
        const ENTRIES: u64 = 50;
        let mut batch = vec![Mutation::PutEnrollment(enrollment("device-1"))];
        batch.extend((1..=ENTRIES).map(|seq| put_entry("device-1", queue_entry(seq))));

        let writer = {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.apply(batch).await })
        };
        loop {
            let visible = store.queue("device-1").await.unwrap().len() as u64;
            assert!(
                visible == 0 || visible == ENTRIES,
                "saw {visible} of {ENTRIES} entries"
            );
            if visible == ENTRIES || writer.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        writer.await.unwrap().unwrap();
        assert_eq!(store.queue("device-1").await.unwrap().len() as u64, ENTRIES);
        assert!(store.enrollment("device-1").await.unwrap().is_some());
    }

    pub async fn an_empty_batch_is_accepted<B: Backend>(backend: B) {
        let store = backend.open().await;
        apply(&store, Vec::new()).await;
        assert!(store.enrollment_ids(None, 10).await.unwrap().is_empty());
    }

    pub async fn acknowledged_writes_survive_reopening<B: Backend>(backend: B) {
        let record = full_enrollment("device-1");
        let body = command("cmd-1", b"<plist/>");
        let entry = queue_entry(1);
        let answer = result("cmd-0", 0, ResultStatus::Acknowledged);
        let cert = push_cert("com.apple.mgmt.External.one", 100);
        {
            let store = backend.open().await;
            apply(
                &store,
                vec![
                    Mutation::PutEnrollment(record.clone()),
                    bind([9; 32], "device-1"),
                    Mutation::PutCommand(body.clone()),
                    put_entry("device-1", entry.clone()),
                    put_result("device-1", answer.clone()),
                    Mutation::PutPushCert(cert.clone()),
                ],
            )
            .await;
        }

        let store = backend.open().await;
        assert_eq!(store.enrollment("device-1").await.unwrap(), Some(record));
        assert_eq!(
            store.cert_binding(&[9; 32]).await.unwrap().as_deref(),
            Some("device-1")
        );
        assert_eq!(store.command("cmd-1").await.unwrap(), Some(body));
        assert_eq!(store.queue("device-1").await.unwrap(), [entry]);
        assert_eq!(store.results("device-1", 10).await.unwrap(), [answer]);
        assert_eq!(store.push_cert(&cert.topic).await.unwrap(), Some(cert));
    }

    pub async fn concurrent_applies_all_succeed_and_are_visible<B: Backend>(backend: B) {
        let store = backend.open().await;
        let outcome = enqueue_concurrently(&store, CONCURRENT_BATCHES, DEVICES).await;
        assert!(outcome.iter().all(Result::is_ok), "every apply succeeds");

        for device in 0..DEVICES {
            let queue = store.queue(&format!("device-{device}")).await.unwrap();
            let expected: Vec<u64> = (0..CONCURRENT_BATCHES as u64)
                .filter(|seq| seq % DEVICES as u64 == device as u64)
                .collect();
            assert_eq!(seqs(&queue), expected);
        }
        for seq in [0, CONCURRENT_BATCHES / 2, CONCURRENT_BATCHES - 1] {
            let uuid = format!("cmd-{seq}");
            assert!(
                store.command(&uuid).await.unwrap().is_some(),
                "{uuid} stored"
            );
        }
    }

    pub async fn unknown_keys_read_as_absent<B: Backend>(backend: B) {
        let store = backend.open().await;
        assert_eq!(store.enrollment("nobody").await.unwrap(), None);
        assert!(store.enrollment_ids(None, 10).await.unwrap().is_empty());
        assert_eq!(store.cert_binding(&[0; 32]).await.unwrap(), None);
        assert_eq!(store.command("no-such-command").await.unwrap(), None);
        assert!(store.queue("nobody").await.unwrap().is_empty());
        assert!(store.results("nobody", 10).await.unwrap().is_empty());
        assert_eq!(
            store.result("nobody", "no-such-command").await.unwrap(),
            None
        );
        assert_eq!(store.push_cert("no.such.topic").await.unwrap(), None);
        assert!(store.push_certs().await.unwrap().is_empty());

        // Removing what is not there is not an error.
        apply(&store, vec![remove_entry("nobody", 1, 2)]).await;
    }
}

/// Batches applied at once by the concurrency cases.
const CONCURRENT_BATCHES: usize = 2000;
/// Devices those batches are spread over.
const DEVICES: usize = 50;

/// Apply `batches` enqueue batches (command body + queue entry) from as many tasks at
/// once, spread round-robin over `devices`; returns each task's outcome.
async fn enqueue_concurrently<S: Store>(
    store: &Arc<S>,
    batches: usize,
    devices: usize,
) -> Vec<orchard::store::StoreResult<()>> {
    let tasks: Vec<_> = (0..batches)
        .map(|seq| {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                let uuid = format!("cmd-{seq}");
                let mut entry = queue_entry(seq as u64);
                entry.command_uuid = uuid.clone();
                let device = format!("device-{}", seq % devices);
                store
                    .apply(vec![
                        Mutation::PutCommand(command(&uuid, b"<plist/>")),
                        put_entry(&device, entry),
                    ])
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(batches);
    for task in tasks {
        outcomes.push(task.await.expect("apply task"));
    }
    outcomes
}

async fn apply<S: Store>(store: &Arc<S>, batch: Vec<Mutation>) {
    store.apply(batch).await.expect("apply succeeds");
}

fn enrollment(id: &str) -> EnrollmentRecord {
    EnrollmentRecord {
        id: id.to_owned(),
        device_id: id.to_owned(),
        topic: "com.apple.mgmt.External.one".to_owned(),
        ..EnrollmentRecord::default()
    }
}

/// An enrollment with every optional field populated, so a round trip covers them all.
fn full_enrollment(id: &str) -> EnrollmentRecord {
    EnrollmentRecord {
        kind: EnrollmentKind::Device,
        cert_fingerprint: Some([7; 32]),
        generation: 2,
        enabled: true,
        push: Some(PushInfo {
            topic: "com.apple.mgmt.External.one".to_owned(),
            token: vec![0xde, 0xad, 0xbe, 0xef],
            push_magic: "magic".to_owned(),
        }),
        push_token_valid: true,
        unlock_token: Some(vec![1, 2, 3]),
        bootstrap_token: Some(vec![4, 5]),
        awaiting_configuration: true,
        token_update_count: 3,
        device_info: vec![("SerialNumber".to_owned(), "C02XYZ".to_owned())],
        user_channels: vec![format!("{id}:user-1")],
        enrolled_at: 1_700_000_000,
        last_seen: 1_700_000_500,
        ..enrollment(id)
    }
}

fn command(uuid: &str, body: &[u8]) -> StoredCommand {
    StoredCommand {
        command_uuid: uuid.to_owned(),
        request_type: "DeviceInformation".to_owned(),
        body: body.to_vec(),
    }
}

fn queue_entry(seq: u64) -> QueueEntry {
    QueueEntry::new(
        seq,
        &format!("cmd-{seq}"),
        "DeviceInformation",
        0,
        1_700_000_000,
    )
}

fn result(uuid: &str, seq: u64, status: ResultStatus) -> CommandResult {
    CommandResult {
        command_uuid: uuid.to_owned(),
        request_type: "DeviceInformation".to_owned(),
        status,
        raw: format!("<plist><string>{uuid}</string></plist>").into_bytes(),
        seq,
        received_at: 1_700_000_000 + seq as i64,
    }
}

fn declaration(id: &str, token: &str) -> DeclarationRecord {
    DeclarationRecord {
        identifier: id.into(),
        declaration_type: "com.apple.configuration.management.test".into(),
        payload_json: r#"{"Echo":"hi"}"#.into(),
        server_token: token.into(),
        touch: 0,
        updated_at: 1,
    }
}

fn push_cert(topic: &str, not_after: i64) -> PushCertRecord {
    PushCertRecord {
        topic: topic.to_owned(),
        cert_pem: "-----BEGIN CERTIFICATE-----".to_owned(),
        key_pem: "-----BEGIN PRIVATE KEY-----".to_owned(),
        not_after,
        uploaded_at: 1_700_000_000,
    }
}

fn bind(fingerprint: [u8; 32], enrollment_id: &str) -> Mutation {
    Mutation::BindCertificate {
        fingerprint,
        enrollment_id: enrollment_id.to_owned(),
    }
}

fn put_entry(enrollment_id: &str, entry: QueueEntry) -> Mutation {
    Mutation::PutQueueEntry {
        enrollment_id: enrollment_id.to_owned(),
        entry,
    }
}

fn remove_entry(enrollment_id: &str, seq: u64, pending_from: u64) -> Mutation {
    Mutation::RemoveQueueEntry {
        enrollment_id: enrollment_id.to_owned(),
        seq,
        pending_from,
    }
}

fn webhook_event(seq: u64) -> WebhookEvent {
    WebhookEvent {
        seq,
        created_at_ms: seq as i64,
        body: format!("{{\"topic\":\"mdm.Connect\",\"seq\":{seq}}}").into_bytes(),
    }
}

fn put_event(enrollment_id: &str, seq: u64) -> Mutation {
    Mutation::PutWebhookEvent {
        enrollment_id: enrollment_id.to_string(),
        event: webhook_event(seq),
    }
}

fn remove_event(enrollment_id: &str, seq: u64) -> Mutation {
    Mutation::RemoveWebhookEvent {
        enrollment_id: enrollment_id.to_string(),
        seq,
    }
}

fn event_seqs(events: &[WebhookEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn sorted(ids: &[String]) -> Vec<String> {
    ids.iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn clear_queue(enrollment_id: &str) -> Mutation {
    Mutation::ClearQueue {
        enrollment_id: enrollment_id.to_owned(),
    }
}

fn put_result(enrollment_id: &str, result: CommandResult) -> Mutation {
    Mutation::PutResult {
        enrollment_id: enrollment_id.to_owned(),
        result,
    }
}

fn seqs(queue: &[QueueEntry]) -> Vec<u64> {
    queue.iter().map(|entry| entry.seq).collect()
}

fn uuids(results: &[CommandResult]) -> Vec<&str> {
    results
        .iter()
        .map(|result| result.command_uuid.as_str())
        .collect()
}

/// Group commit: concurrent batches share fsyncs instead of paying one each.
#[tokio::test]
async fn embedded_store_commits_concurrent_batches_in_groups() {
    let backend = EmbeddedBackend::fresh().await;
    let store = backend.open().await;
    let commits_before = store.commit_count();

    let outcome = enqueue_concurrently(&store, CONCURRENT_BATCHES, DEVICES).await;

    assert!(outcome.iter().all(Result::is_ok));
    let commits = store.commit_count() - commits_before;
    assert!(commits >= 1);
    assert!(
        commits < CONCURRENT_BATCHES as u64,
        "{CONCURRENT_BATCHES} batches took {commits} commits"
    );
}

conformance_suite!(embedded, EmbeddedBackend);
conformance_suite!(scylla, ScyllaBackend);
