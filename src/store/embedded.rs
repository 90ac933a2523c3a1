//! The single-node store: one redb file, written by one group-committing thread.
//!
//! Why redb: it is a copy-on-write B-tree in a single file. Readers open MVCC snapshots
//! and never block the single writer (nor does the writer block them), which matches
//! Orchard's load: many concurrent check-in reads, and writes that are naturally
//! serialised per device. It runs no background compaction or flush threads that would
//! compete for CPU with TLS and plist work on a small machine, and a commit is crash-safe
//! with one fsync: after a `kill -9` the file opens at the last committed transaction.
//!
//! Why group commit: an fsync costs milliseconds, so one commit per request would cap
//! Orchard at a few hundred writes per second. [`EmbeddedStore::apply`] hands its batch
//! to the writer thread and waits; the writer takes every batch already waiting, applies
//! them all in one write transaction, commits once with [`Durability::Immediate`], and
//! only then answers each waiter. Every acknowledged batch is therefore durable, and the
//! fsync cost is shared by everyone who arrived while the previous commit was running.
//! A group is atomic as a whole: if its transaction fails, every batch in it fails and
//! none of it becomes visible.
//!
//! Reads are served the same way by one reader thread per core: each takes every read
//! waiting and answers them from one snapshot (see `start_readers`).
//!
//! Values are postcard-encoded; a value that does not decode is reported as
//! [`StoreError::Corrupt`].

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use async_trait::async_trait;
use metrics::{counter, histogram};
use redb::{Database, Durability, ReadTransaction, ReadableTable, Table, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::{
    CertFingerprint, CommandResult, DdmRecord, DeclarationRecord, DeclarationSet, DeviceRecords,
    EnrollmentFilter, EnrollmentRecord, FleetRows, Mutation, PushCertRecord, QueueEntry,
    SharedVersions, Store, StoreError, StoreResult, StoredCommand, StoredReport, WakeEntry,
    WebhookEvent,
};

/// Page cache unless configured (redb's own default is 1 GiB).
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// Name of the database file inside the data directory.
pub const DATABASE_FILE: &str = "orchard.redb";

/// Most batches committed in one transaction, so that one commit's latency stays bounded.
const MAX_GROUP_BATCHES: usize = 1024;
/// Most encoded bytes committed in one transaction, for the same reason.
const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Batches that may wait for the writer before `apply` callers are made to wait to enqueue.
const WRITE_QUEUE_CAPACITY: usize = 4096;

/// Reads served from one snapshot by one wake-up of a reader thread.
const MAX_READ_BATCH: usize = 256;
/// Reads waiting for a reader thread before `read` callers wait to queue.
const READ_QUEUE_CAPACITY: usize = 8192;

/// enrollment id -> [`EnrollmentRecord`].
const ENROLLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollments");
/// certificate fingerprint -> enrollment id.
const CERT_BINDINGS: TableDefinition<&[u8; 32], &str> = TableDefinition::new("cert_bindings");
/// command UUID -> [`StoredCommand`].
const COMMANDS: TableDefinition<&str, &[u8]> = TableDefinition::new("commands");
/// (enrollment id, seq) -> [`QueueEntry`]: one range scan yields a queue in seq order.
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
/// (enrollment id, seq, command UUID) -> [`CommandResult`]: the newest results of an
/// enrollment are read from the end of its range without decoding older ones.
const RESULTS: TableDefinition<(&str, u64, &str), &[u8]> = TableDefinition::new("results");
/// (enrollment id, command UUID) -> seq under which its result is stored in [`RESULTS`].
const RESULT_SEQS: TableDefinition<(&str, &str), u64> = TableDefinition::new("result_seqs");
/// topic -> [`PushCertRecord`].
const PUSH_CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("push_certs");
/// (due Unix seconds, enrollment id) -> attempt: the re-push sweep reads it in time order.
const WAKES_BY_TIME: TableDefinition<(i64, &str), u32> = TableDefinition::new("wakes_by_time");
/// enrollment id -> due, so a reschedule can find and replace the old time-ordered row.
const WAKES_BY_ID: TableDefinition<&str, i64> = TableDefinition::new("wakes_by_id");
const DECLARATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("declarations");
const SETS: TableDefinition<&str, &[u8]> = TableDefinition::new("sets");
/// (set, enrollment id) -> (): who is assigned each set.
const SET_MEMBERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("set_members");
const DDM_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("ddm_state");
const DDM_TIMELINE: TableDefinition<&str, &[u8]> = TableDefinition::new("ddm_timeline");
/// (enrollment id, report number) -> postcard [`StoredReport`].
const DDM_REPORTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ddm_reports");
/// Values claimed once ([`Store::claim`]): the first writer's stays.
const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
/// A counter per kind of shared state, raised by every write of that kind.
const VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("versions");
/// (enrollment id, seq) -> postcard [`WebhookEvent`]: each enrollment's outbox in order.
const WEBHOOK_EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("webhook_events");
/// enrollment id -> (): enrollments whose outbox is not empty, kept exact by the writer.
const WEBHOOK_PENDING: TableDefinition<&str, ()> = TableDefinition::new("webhook_pending");
/// enrollment id -> one past the highest event sequence ever written.
const WEBHOOK_NEXT: TableDefinition<&str, u64> = TableDefinition::new("webhook_next");

/// The embedded, single-node [`Store`].
pub struct EmbeddedStore {
    /// Raw access for tests that plant damaged rows; the threads hold their own handles.
    #[cfg(test)]
    db: Arc<Database>,
    /// Taken on drop so that the writer sees the channel close, drains, and exits.
    requests: Option<mpsc::Sender<WriteRequest>>,
    writer: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
    /// Taken on drop so that the readers see the channel close and exit.
    read_jobs: Option<mpsc::Sender<ReadJob>>,
    readers: Vec<JoinHandle<()>>,
}

/// One read, run by a reader thread against a snapshot (or told why there is none).
type ReadJob = Box<dyn FnOnce(StoreResult<&ReadTransaction>) + Send>;

impl EmbeddedStore {
    /// Open (or create) `dir/orchard.redb` with the default page cache.
    pub fn open(dir: &Path) -> StoreResult<Arc<EmbeddedStore>> {
        EmbeddedStore::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) `dir/orchard.redb`, creating `dir` if needed, with a page cache of
    /// `cache_bytes`, and start the writer thread. The cache is most of the store's memory:
    /// device state lives in resident actors, so the store mainly serves activations.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> StoreResult<Arc<EmbeddedStore>> {
        std::fs::create_dir_all(dir).map_err(|err| {
            StoreError::Backend(format!("cannot create {}: {err}", dir.display()))
        })?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(dir.join(DATABASE_FILE))
            .map_err(backend_error)?;
        let db = Arc::new(db);
        create_tables(&db)?;

        let (sender, receiver) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let commits = Arc::new(AtomicU64::new(0));
        let writer = GroupWriter {
            db: Arc::clone(&db),
            requests: receiver,
            commits: Arc::clone(&commits),
        };
        let writer = std::thread::Builder::new()
            .name("orchard-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|err| StoreError::Backend(format!("cannot start writer thread: {err}")))?;

        let (read_jobs, readers) = start_readers(&db)?;
        Ok(Arc::new(EmbeddedStore {
            #[cfg(test)]
            db,
            requests: Some(sender),
            writer: Some(writer),
            commits,
            read_jobs: Some(read_jobs),
            readers,
        }))
    }

    /// Write transactions committed since this store was opened; with concurrent
    /// writers it grows more slowly than the number of `apply` calls.
    pub fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    async fn submit(&self, batch: Vec<Mutation>) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mutations = batch
            .into_iter()
            .map(EncodedMutation::encode)
            .collect::<StoreResult<Vec<_>>>()?;
        self.submit_encoded(mutations).await
    }

    /// Hand encoded mutations to the writer; answers once their group is durable.
    async fn submit_encoded(&self, mutations: Vec<EncodedMutation>) -> StoreResult<()> {
        let (reply, outcome) = oneshot::channel();
        let request = WriteRequest {
            encoded_bytes: mutations.iter().map(EncodedMutation::encoded_bytes).sum(),
            mutations,
            reply,
        };
        let requests = self.requests.as_ref().ok_or(StoreError::Closed)?;
        requests
            .send(request)
            .await
            .map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    /// Run `query` in a read snapshot on a reader thread, recording its latency.
    async fn read<T, Q>(&self, op: &'static str, query: Q) -> StoreResult<T>
    where
        T: Send + 'static,
        Q: FnOnce(&ReadTransaction) -> StoreResult<T> + Send + 'static,
    {
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        let job: ReadJob = Box::new(move |snapshot| {
            let _ = reply.send(snapshot.and_then(query));
        });
        let jobs = self.read_jobs.as_ref().ok_or(StoreError::Closed)?;
        let outcome = match jobs.send(job).await {
            Ok(()) => answer.await.unwrap_or(Err(StoreError::Closed)),
            Err(_) => Err(StoreError::Closed),
        };
        histogram!("orchard_store_read_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        if let Err(err) = &outcome {
            counter!("orchard_store_errors_total", "op" => op).increment(1);
            warn!(op, %err, "store read failed");
        }
        outcome
    }
}

/// Start one reader thread per core. Reads are group-served like writes are group-
/// committed: a reader takes every waiting read (up to [`MAX_READ_BATCH`]) and answers
/// them from one snapshot. A read is microseconds of CPU on a cached page, so the cost
/// that matters is the thread hand-off; a thread per read (hundreds during a fleet-wide
/// change) makes the threads fight over the cores and every read wait for its turn.
///
/// The snapshot is opened after the batch is taken, so a read sees every write that was
/// acknowledged before the read was asked for.
fn start_readers(db: &Arc<Database>) -> StoreResult<(mpsc::Sender<ReadJob>, Vec<JoinHandle<()>>)> {
    let (sender, receiver) = mpsc::channel::<ReadJob>(READ_QUEUE_CAPACITY);
    let receiver = Arc::new(std::sync::Mutex::new(receiver));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let readers = (0..cores)
        .map(|n| {
            let db = Arc::clone(db);
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("orchard-store-reader-{n}"))
                .spawn(move || serve_reads(&db, &receiver))
                .map_err(|err| StoreError::Backend(format!("cannot start reader thread: {err}")))
        })
        .collect::<StoreResult<_>>()?;
    Ok((sender, readers))
}

fn serve_reads(db: &Database, receiver: &std::sync::Mutex<mpsc::Receiver<ReadJob>>) {
    while let Some(batch) = next_read_batch(receiver) {
        histogram!("orchard_store_read_batch_size").record(batch.len() as f64);
        let snapshot = db.begin_read().map_err(backend_error);
        for job in batch {
            // A query that panics loses only its own answer (its caller sees Closed).
            let run = std::panic::AssertUnwindSafe(|| job(snapshot.as_ref().map_err(Clone::clone)));
            if std::panic::catch_unwind(run).is_err() {
                error!("a store read panicked");
            }
        }
    }
}

/// The next waiting reads, or `None` once the store is closed and drained.
fn next_read_batch(receiver: &std::sync::Mutex<mpsc::Receiver<ReadJob>>) -> Option<Vec<ReadJob>> {
    let mut receiver = receiver
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut batch = vec![receiver.blocking_recv()?];
    while batch.len() < MAX_READ_BATCH {
        match receiver.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

impl Drop for EmbeddedStore {
    /// Closing the channels lets the writer commit what is still queued and the readers
    /// answer theirs, and exit; joining them releases the database file before the drop
    /// returns, so it can be reopened.
    fn drop(&mut self) {
        drop(self.requests.take());
        drop(self.read_jobs.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                error!("store writer thread panicked");
            }
        }
        for reader in self.readers.drain(..) {
            if reader.join().is_err() {
                error!("store reader thread panicked");
            }
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn apply(&self, batch: Vec<Mutation>) -> StoreResult<()> {
        super::timed_apply(self.submit(batch)).await
    }

    async fn enrollment(&self, id: &str) -> StoreResult<Option<EnrollmentRecord>> {
        let id = id.to_owned();
        self.read("enrollment", move |snapshot| {
            read_row(snapshot, ENROLLMENTS, "enrollment", &id)
        })
        .await
    }

    async fn enrollment_ids(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        let after = after.map(str::to_owned);
        self.read("enrollment_ids", move |snapshot| {
            keys_after(snapshot, ENROLLMENTS, after.as_deref(), limit)
        })
        .await
    }

    async fn cert_binding(&self, fingerprint: &CertFingerprint) -> StoreResult<Option<String>> {
        let fingerprint = *fingerprint;
        self.read("cert_binding", move |snapshot| {
            let table = snapshot.open_table(CERT_BINDINGS).map_err(backend_error)?;
            let value = table.get(&fingerprint).map_err(backend_error)?;
            Ok(value.map(|id| id.value().to_owned()))
        })
        .await
    }

    async fn command(&self, command_uuid: &str) -> StoreResult<Option<StoredCommand>> {
        let command_uuid = command_uuid.to_owned();
        self.read("command", move |snapshot| {
            read_row(snapshot, COMMANDS, "command", &command_uuid)
        })
        .await
    }

    async fn queue(&self, enrollment_id: &str) -> StoreResult<Vec<QueueEntry>> {
        let enrollment_id = enrollment_id.to_owned();
        self.read("queue", move |snapshot| {
            read_queue(snapshot, &enrollment_id)
        })
        .await
    }

    async fn results(&self, enrollment_id: &str, limit: usize) -> StoreResult<Vec<CommandResult>> {
        let enrollment_id = enrollment_id.to_owned();
        self.read("results", move |snapshot| {
            let table = snapshot.open_table(RESULTS).map_err(backend_error)?;
            let id = enrollment_id.as_str();
            let after_id = enrollment_successor(id);
            let rows = table
                .range((id, 0u64, "")..(after_id.as_str(), 0u64, ""))
                .map_err(backend_error)?;
            let mut newest_first = rows
                .rev()
                .take(limit)
                .map(|row| {
                    let (key, value) = row.map_err(backend_error)?;
                    let (_, _, uuid) = key.value();
                    decode("result", &format!("{id}/{uuid}"), value.value())
                })
                .collect::<StoreResult<Vec<CommandResult>>>()?;
            newest_first.reverse();
            Ok(newest_first)
        })
        .await
    }

    async fn result(
        &self,
        enrollment_id: &str,
        command_uuid: &str,
    ) -> StoreResult<Option<CommandResult>> {
        let enrollment_id = enrollment_id.to_owned();
        let command_uuid = command_uuid.to_owned();
        self.read("result", move |snapshot| {
            let seqs = snapshot.open_table(RESULT_SEQS).map_err(backend_error)?;
            let (id, uuid) = (enrollment_id.as_str(), command_uuid.as_str());
            let Some(seq) = seqs.get((id, uuid)).map_err(backend_error)? else {
                return Ok(None);
            };
            let results = snapshot.open_table(RESULTS).map_err(backend_error)?;
            let value = results
                .get((id, seq.value(), uuid))
                .map_err(backend_error)?;
            value
                .map(|value| decode("result", &format!("{id}/{uuid}"), value.value()))
                .transpose()
        })
        .await
    }

    async fn push_cert(&self, topic: &str) -> StoreResult<Option<PushCertRecord>> {
        let topic = topic.to_owned();
        self.read("push_cert", move |snapshot| {
            let table = snapshot.open_table(PUSH_CERTS).map_err(backend_error)?;
            let value = table.get(topic.as_str()).map_err(backend_error)?;
            value
                .map(|value| decode("push certificate", &topic, value.value()))
                .transpose()
        })
        .await
    }

    async fn due_wakes(&self, now: i64, limit: usize) -> StoreResult<Vec<WakeEntry>> {
        self.read("due_wakes", move |snapshot| {
            let table = snapshot.open_table(WAKES_BY_TIME).map_err(backend_error)?;
            let rows = table
                .range((i64::MIN, "")..(now.saturating_add(1), ""))
                .map_err(backend_error)?;
            rows.take(limit)
                .map(|row| {
                    let (key, attempt) = row.map_err(backend_error)?;
                    let (due_at, enrollment_id) = key.value();
                    Ok(WakeEntry {
                        enrollment_id: enrollment_id.to_owned(),
                        due_at,
                        attempt: attempt.value(),
                    })
                })
                .collect()
        })
        .await
    }

    async fn declarations(&self) -> StoreResult<Vec<DeclarationRecord>> {
        self.read("declarations", |snapshot| {
            decode_all(snapshot, DECLARATIONS, "declaration")
        })
        .await
    }

    async fn sets(&self) -> StoreResult<Vec<DeclarationSet>> {
        self.read("sets", |snapshot| {
            decode_all(snapshot, SETS, "declaration set")
        })
        .await
    }

    async fn set_members(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let set = set.to_owned();
        let after = after.map(str::to_owned);
        self.read("set_members", move |snapshot| {
            let table = snapshot.open_table(SET_MEMBERS).map_err(backend_error)?;
            let start = after
                .as_deref()
                .map(enrollment_successor)
                .unwrap_or_default();
            let end = enrollment_successor(&set);
            let rows = table
                .range((set.as_str(), start.as_str())..(end.as_str(), ""))
                .map_err(backend_error)?;
            rows.take(limit)
                .map(|row| {
                    let (key, _) = row.map_err(backend_error)?;
                    Ok(key.value().1.to_owned())
                })
                .collect()
        })
        .await
    }

    async fn device(&self, id: &str) -> StoreResult<DeviceRecords> {
        let id = id.to_owned();
        self.read("device", move |snapshot| {
            let queue = read_queue(snapshot, &id)?
                .into_iter()
                .map(|entry| {
                    let body = read_row(snapshot, COMMANDS, "command", &entry.command_uuid)?;
                    Ok((entry, body))
                })
                .collect::<StoreResult<_>>()?;
            Ok(DeviceRecords {
                enrollment: read_row(snapshot, ENROLLMENTS, "enrollment", &id)?,
                queue,
                // Removed entries leave no markers here: reads need no floor.
                queue_floor: 0,
                ddm: read_ddm(snapshot, &id)?,
                webhook_next_seq: {
                    let table = snapshot.open_table(WEBHOOK_NEXT).map_err(backend_error)?;
                    let next = table.get(id.as_str()).map_err(backend_error)?;
                    next.map_or(0, |n| n.value())
                },
            })
        })
        .await
    }

    async fn fleet_rows(
        &self,
        after: Option<&str>,
        limit: usize,
        wanted: EnrollmentFilter,
    ) -> StoreResult<Vec<(String, FleetRows)>> {
        let after = after.map(str::to_owned);
        self.read("fleet_rows", move |snapshot| {
            let table = snapshot.open_table(DDM_STATE).map_err(backend_error)?;
            let start = after
                .as_deref()
                .map(enrollment_successor)
                .unwrap_or_default();
            let rows = table.range(start.as_str()..).map_err(backend_error)?;
            let ids = rows.map(|row| row.map(|(key, _)| key.value().to_owned()));
            ids.filter(|id| id.as_ref().map_or(true, |id| wanted(id)))
                .take(limit)
                .map(|id| {
                    let id = id.map_err(backend_error)?;
                    let rows = FleetRows {
                        enrollment: read_row(snapshot, ENROLLMENTS, "enrollment", &id)?,
                        ddm: read_ddm(snapshot, &id)?,
                    };
                    Ok((id, rows))
                })
                .collect()
        })
        .await
    }

    async fn ddm_reports(&self, enrollment_id: &str) -> StoreResult<Vec<StoredReport>> {
        let id = enrollment_id.to_owned();
        self.read("ddm_reports", move |snapshot| {
            let table = snapshot.open_table(DDM_REPORTS).map_err(backend_error)?;
            let rows = table
                .range((id.as_str(), 0u64)..=(id.as_str(), u64::MAX))
                .map_err(backend_error)?;
            rows.map(|row| {
                let (_, value) = row.map_err(backend_error)?;
                decode("status report", &id, value.value())
            })
            .collect()
        })
        .await
    }

    async fn push_certs(&self) -> StoreResult<Vec<PushCertRecord>> {
        self.read("push_certs", |snapshot| {
            decode_all(snapshot, PUSH_CERTS, "push certificate")
        })
        .await
    }

    async fn webhook_pending(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        let after = after.map(str::to_owned);
        self.read("webhook_pending", move |snapshot| {
            keys_after(snapshot, WEBHOOK_PENDING, after.as_deref(), limit)
        })
        .await
    }

    async fn webhook_events(
        &self,
        enrollment_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<WebhookEvent>> {
        let id = enrollment_id.to_owned();
        self.read("webhook_events", move |snapshot| {
            let table = snapshot.open_table(WEBHOOK_EVENTS).map_err(backend_error)?;
            let rows = table
                .range((id.as_str(), 0u64)..=(id.as_str(), u64::MAX))
                .map_err(backend_error)?;
            rows.take(limit)
                .map(|row| {
                    let (_, value) = row.map_err(backend_error)?;
                    decode("webhook event", &id, value.value())
                })
                .collect()
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read("ping", |_| Ok(())).await
    }

    async fn claim(&self, name: &str, value: Vec<u8>) -> StoreResult<Vec<u8>> {
        let claim = EncodedMutation::Claim {
            name: name.to_owned(),
            value,
        };
        self.submit_encoded(vec![claim]).await?;
        let name = name.to_owned();
        self.read("claim", move |snapshot| {
            let table = snapshot.open_table(CLAIMS).map_err(backend_error)?;
            let value = table.get(name.as_str()).map_err(backend_error)?;
            value
                .map(|v| v.value().to_vec())
                .ok_or_else(|| StoreError::Backend(format!("claim {name} vanished")))
        })
        .await
    }

    async fn shared_versions(&self) -> StoreResult<SharedVersions> {
        self.read("shared_versions", |snapshot| {
            let table = snapshot.open_table(VERSIONS).map_err(backend_error)?;
            let version = |kind: &str| -> StoreResult<Vec<u8>> {
                let value = table.get(kind).map_err(backend_error)?;
                Ok(value
                    .map(|v| v.value().to_be_bytes().to_vec())
                    .unwrap_or_default())
            };
            Ok(SharedVersions {
                catalog: version(super::SHARED_CATALOG)?,
                push_certs: version(super::SHARED_PUSH_CERTS)?,
            })
        })
        .await
    }
}

/// One `apply` call waiting for its group to commit.
struct WriteRequest {
    mutations: Vec<EncodedMutation>,
    encoded_bytes: usize,
    reply: oneshot::Sender<StoreResult<()>>,
}

/// A [`Mutation`] with its values already encoded, so that the writer thread spends its
/// time on the B-tree and the fsync only.
enum EncodedMutation {
    /// Not a [`Mutation`]: written by [`Store::claim`] alone.
    Claim {
        name: String,
        value: Vec<u8>,
    },
    PutEnrollment {
        id: String,
        value: Vec<u8>,
    },
    BindCertificate {
        fingerprint: CertFingerprint,
        enrollment_id: String,
    },
    PutCommand {
        command_uuid: String,
        value: Vec<u8>,
    },
    PutQueueEntry {
        enrollment_id: String,
        seq: u64,
        value: Vec<u8>,
    },
    RemoveQueueEntry {
        enrollment_id: String,
        seq: u64,
    },
    ClearQueue {
        enrollment_id: String,
    },
    PutResult {
        enrollment_id: String,
        command_uuid: String,
        seq: u64,
        value: Vec<u8>,
    },
    PutPushCert {
        topic: String,
        value: Vec<u8>,
    },
    ScheduleWake {
        enrollment_id: String,
        due_at: i64,
        attempt: u32,
    },
    ClearWake {
        enrollment_id: String,
    },
    /// Declarations, sets and DDM state: `(table, key, value)` rows.
    PutRow {
        table: KeyedTable,
        key: String,
        value: Vec<u8>,
    },
    DeleteRow {
        table: KeyedTable,
        key: String,
    },
    PutSetMember {
        set: String,
        enrollment_id: String,
    },
    RemoveSetMember {
        set: String,
        enrollment_id: String,
    },
    AppendDdmReport {
        enrollment_id: String,
        value: Vec<u8>,
        keep: usize,
    },
    PutWebhookEvent {
        enrollment_id: String,
        seq: u64,
        value: Vec<u8>,
    },
    RemoveWebhookEvent {
        enrollment_id: String,
        seq: u64,
    },
}

/// The string-keyed blob tables written whole.
#[derive(Clone, Copy)]
enum KeyedTable {
    Declarations,
    Sets,
    DdmState,
    DdmTimeline,
}

impl EncodedMutation {
    fn encode(mutation: Mutation) -> StoreResult<EncodedMutation> {
        Ok(match mutation {
            Mutation::PutEnrollment(record) => EncodedMutation::PutEnrollment {
                value: encode(&record)?,
                id: record.id,
            },
            Mutation::BindCertificate {
                fingerprint,
                enrollment_id,
            } => EncodedMutation::BindCertificate {
                fingerprint,
                enrollment_id,
            },
            Mutation::PutCommand(command) => EncodedMutation::PutCommand {
                value: encode(&command)?,
                command_uuid: command.command_uuid,
            },
            Mutation::PutQueueEntry {
                enrollment_id,
                entry,
            } => EncodedMutation::PutQueueEntry {
                value: encode(&entry)?,
                enrollment_id,
                seq: entry.seq,
            },
            Mutation::RemoveQueueEntry {
                enrollment_id, seq, ..
            } => EncodedMutation::RemoveQueueEntry { enrollment_id, seq },
            Mutation::ClearQueue { enrollment_id } => EncodedMutation::ClearQueue { enrollment_id },
            Mutation::PutResult {
                enrollment_id,
                result,
            } => EncodedMutation::PutResult {
                value: encode(&result)?,
                enrollment_id,
                seq: result.seq,
                command_uuid: result.command_uuid,
            },
            Mutation::PutPushCert(record) => EncodedMutation::PutPushCert {
                value: encode(&record)?,
                topic: record.topic,
            },
            Mutation::ScheduleWake {
                enrollment_id,
                due_at,
                attempt,
            } => EncodedMutation::ScheduleWake {
                enrollment_id,
                due_at,
                attempt,
            },
            Mutation::ClearWake { enrollment_id } => EncodedMutation::ClearWake { enrollment_id },
            Mutation::PutDeclaration(record) => EncodedMutation::PutRow {
                table: KeyedTable::Declarations,
                value: encode(&record)?,
                key: record.identifier,
            },
            Mutation::DeleteDeclaration { identifier } => EncodedMutation::DeleteRow {
                table: KeyedTable::Declarations,
                key: identifier,
            },
            Mutation::PutSet(set) => EncodedMutation::PutRow {
                table: KeyedTable::Sets,
                value: encode(&set)?,
                key: set.name,
            },
            Mutation::DeleteSet { name } => EncodedMutation::DeleteRow {
                table: KeyedTable::Sets,
                key: name,
            },
            Mutation::PutSetMember { set, enrollment_id } => {
                EncodedMutation::PutSetMember { set, enrollment_id }
            }
            Mutation::RemoveSetMember { set, enrollment_id } => {
                EncodedMutation::RemoveSetMember { set, enrollment_id }
            }
            Mutation::PutDdmState {
                enrollment_id,
                state,
            } => EncodedMutation::PutRow {
                table: KeyedTable::DdmState,
                key: enrollment_id,
                value: state,
            },
            Mutation::PutDdmTimeline {
                enrollment_id,
                timeline,
            } => EncodedMutation::PutRow {
                table: KeyedTable::DdmTimeline,
                key: enrollment_id,
                value: timeline,
            },
            Mutation::AppendDdmReport {
                enrollment_id,
                report,
                keep,
            } => EncodedMutation::AppendDdmReport {
                enrollment_id,
                value: encode(&report)?,
                keep,
            },
            Mutation::PutWebhookEvent {
                enrollment_id,
                event,
            } => EncodedMutation::PutWebhookEvent {
                value: encode(&event)?,
                enrollment_id,
                seq: event.seq,
            },
            Mutation::RemoveWebhookEvent { enrollment_id, seq } => {
                EncodedMutation::RemoveWebhookEvent { enrollment_id, seq }
            }
        })
    }

    /// Approximate size written, for bounding a group.
    fn encoded_bytes(&self) -> usize {
        match self {
            EncodedMutation::PutEnrollment { id, value }
            | EncodedMutation::Claim { name: id, value } => id.len() + value.len(),
            EncodedMutation::BindCertificate { enrollment_id, .. } => 32 + enrollment_id.len(),
            EncodedMutation::PutCommand {
                command_uuid,
                value,
            } => command_uuid.len() + value.len(),
            EncodedMutation::PutQueueEntry {
                enrollment_id,
                value,
                ..
            } => enrollment_id.len() + 8 + value.len(),
            EncodedMutation::RemoveQueueEntry { enrollment_id, .. } => enrollment_id.len() + 8,
            EncodedMutation::ClearQueue { enrollment_id } => enrollment_id.len(),
            EncodedMutation::PutResult {
                enrollment_id,
                command_uuid,
                value,
                ..
            } => 2 * (enrollment_id.len() + command_uuid.len() + 8) + value.len(),
            EncodedMutation::PutPushCert { topic, value } => topic.len() + value.len(),
            EncodedMutation::ScheduleWake { enrollment_id, .. } => {
                2 * (enrollment_id.len() + 8) + 4
            }
            EncodedMutation::ClearWake { enrollment_id } => enrollment_id.len(),
            EncodedMutation::PutRow { key, value, .. } => key.len() + value.len(),
            EncodedMutation::DeleteRow { key, .. } => key.len(),
            EncodedMutation::PutSetMember { set, enrollment_id }
            | EncodedMutation::RemoveSetMember { set, enrollment_id } => {
                set.len() + enrollment_id.len()
            }
            EncodedMutation::AppendDdmReport {
                enrollment_id,
                value,
                ..
            }
            | EncodedMutation::PutWebhookEvent {
                enrollment_id,
                value,
                ..
            } => enrollment_id.len() + 8 + value.len(),
            EncodedMutation::RemoveWebhookEvent { enrollment_id, .. } => enrollment_id.len() + 8,
        }
    }
}

/// Owns every write transaction: one commit per group of waiting batches.
struct GroupWriter {
    db: Arc<Database>,
    requests: mpsc::Receiver<WriteRequest>,
    commits: Arc<AtomicU64>,
}

impl GroupWriter {
    /// Commit groups until every sender is gone and the channel is drained.
    fn run(mut self) {
        while let Some(first) = self.requests.blocking_recv() {
            let group = self.gather_group(first);
            self.commit_group(group);
        }
        debug!("store writer drained and stopped");
    }

    /// `first` plus every batch already waiting, within the group bounds.
    fn gather_group(&mut self, first: WriteRequest) -> Vec<WriteRequest> {
        let mut bytes = first.encoded_bytes;
        let mut group = vec![first];
        while group.len() < MAX_GROUP_BATCHES && bytes < MAX_GROUP_BYTES {
            match self.requests.try_recv() {
                Ok(request) => {
                    bytes += request.encoded_bytes;
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        group
    }

    fn commit_group(&self, group: Vec<WriteRequest>) {
        let started = Instant::now();
        let outcome = write_group(&self.db, &group);
        let elapsed = started.elapsed();
        match &outcome {
            Ok(_) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                counter!("orchard_store_commits_total").increment(1);
                histogram!("orchard_store_group_size").record(group.len() as f64);
                debug!(
                    batches = group.len(),
                    micros = elapsed.as_micros() as u64,
                    "store group committed"
                );
            }
            Err(err) => error!(batches = group.len(), %err, "store group commit failed"),
        }
        let outcomes = match outcome {
            Ok(per_batch) => per_batch,
            Err(err) => vec![Err(err); group.len()],
        };
        for (request, outcome) in group.into_iter().zip(outcomes) {
            // A waiter that gave up (its future was dropped) needs no answer.
            let _ = request.reply.send(outcome);
        }
    }
}

/// Apply the batches of `group` in one durable transaction, or none of them. A batch
/// that would bind a certificate already bound to another enrollment is left out and
/// answered [`StoreError::Conflict`]; the others commit.
fn write_group(db: &Database, group: &[WriteRequest]) -> StoreResult<Vec<StoreResult<()>>> {
    let mut transaction = db.begin_write().map_err(backend_error)?;
    transaction.set_durability(Durability::Immediate);
    let applied = WriteTables::open(&transaction).and_then(|mut tables| {
        group
            .iter()
            .map(
                |request| match tables.binding_conflict(&request.mutations)? {
                    Some(conflict) => Ok(Err(conflict)),
                    None => {
                        for mutation in &request.mutations {
                            tables.apply(mutation)?;
                        }
                        Ok(Ok(()))
                    }
                },
            )
            .collect::<StoreResult<Vec<_>>>()
    });
    match applied {
        Ok(per_batch) => transaction
            .commit()
            .map(|()| per_batch)
            .map_err(backend_error),
        Err(err) => {
            if let Err(abort_err) = transaction.abort() {
                warn!(%abort_err, "store transaction abort failed");
            }
            Err(err)
        }
    }
}

/// Every table opened for writing in one transaction.
struct WriteTables<'txn> {
    enrollments: Table<'txn, &'static str, &'static [u8]>,
    cert_bindings: Table<'txn, &'static [u8; 32], &'static str>,
    commands: Table<'txn, &'static str, &'static [u8]>,
    queue: Table<'txn, (&'static str, u64), &'static [u8]>,
    results: Table<'txn, (&'static str, u64, &'static str), &'static [u8]>,
    result_seqs: Table<'txn, (&'static str, &'static str), u64>,
    push_certs: Table<'txn, &'static str, &'static [u8]>,
    wakes_by_time: Table<'txn, (i64, &'static str), u32>,
    wakes_by_id: Table<'txn, &'static str, i64>,
    declarations: Table<'txn, &'static str, &'static [u8]>,
    sets: Table<'txn, &'static str, &'static [u8]>,
    set_members: Table<'txn, (&'static str, &'static str), ()>,
    ddm_state: Table<'txn, &'static str, &'static [u8]>,
    ddm_timeline: Table<'txn, &'static str, &'static [u8]>,
    ddm_reports: Table<'txn, (&'static str, u64), &'static [u8]>,
    claims: Table<'txn, &'static str, &'static [u8]>,
    versions: Table<'txn, &'static str, u64>,
    webhook_events: Table<'txn, (&'static str, u64), &'static [u8]>,
    webhook_pending: Table<'txn, &'static str, ()>,
    webhook_next: Table<'txn, &'static str, u64>,
}

impl<'txn> WriteTables<'txn> {
    fn open(transaction: &'txn redb::WriteTransaction) -> StoreResult<Self> {
        Ok(WriteTables {
            enrollments: transaction.open_table(ENROLLMENTS).map_err(backend_error)?,
            cert_bindings: transaction
                .open_table(CERT_BINDINGS)
                .map_err(backend_error)?,
            commands: transaction.open_table(COMMANDS).map_err(backend_error)?,
            queue: transaction.open_table(QUEUE).map_err(backend_error)?,
            results: transaction.open_table(RESULTS).map_err(backend_error)?,
            result_seqs: transaction.open_table(RESULT_SEQS).map_err(backend_error)?,
            push_certs: transaction.open_table(PUSH_CERTS).map_err(backend_error)?,
            wakes_by_time: transaction
                .open_table(WAKES_BY_TIME)
                .map_err(backend_error)?,
            wakes_by_id: transaction.open_table(WAKES_BY_ID).map_err(backend_error)?,
            declarations: transaction
                .open_table(DECLARATIONS)
                .map_err(backend_error)?,
            sets: transaction.open_table(SETS).map_err(backend_error)?,
            set_members: transaction.open_table(SET_MEMBERS).map_err(backend_error)?,
            ddm_state: transaction.open_table(DDM_STATE).map_err(backend_error)?,
            ddm_timeline: transaction
                .open_table(DDM_TIMELINE)
                .map_err(backend_error)?,
            ddm_reports: transaction.open_table(DDM_REPORTS).map_err(backend_error)?,
            claims: transaction.open_table(CLAIMS).map_err(backend_error)?,
            versions: transaction.open_table(VERSIONS).map_err(backend_error)?,
            webhook_events: transaction
                .open_table(WEBHOOK_EVENTS)
                .map_err(backend_error)?,
            webhook_pending: transaction
                .open_table(WEBHOOK_PENDING)
                .map_err(backend_error)?,
            webhook_next: transaction
                .open_table(WEBHOOK_NEXT)
                .map_err(backend_error)?,
        })
    }

    /// Raise the version of a kind of shared state (see [`Store::shared_versions`]).
    fn bump_version(&mut self, kind: &str) -> StoreResult<()> {
        let current = self
            .versions
            .get(kind)
            .map_err(backend_error)?
            .map(|v| v.value())
            .unwrap_or(0);
        self.versions
            .insert(kind, current + 1)
            .map_err(backend_error)?;
        Ok(())
    }

    fn apply(&mut self, mutation: &EncodedMutation) -> StoreResult<()> {
        match mutation {
            EncodedMutation::PutEnrollment { id, value } => {
                self.enrollments
                    .insert(id.as_str(), value.as_slice())
                    .map_err(backend_error)?;
            }
            EncodedMutation::BindCertificate {
                fingerprint,
                enrollment_id,
            } => {
                self.cert_bindings
                    .insert(fingerprint, enrollment_id.as_str())
                    .map_err(backend_error)?;
            }
            EncodedMutation::PutCommand {
                command_uuid,
                value,
            } => {
                if self
                    .commands
                    .get(command_uuid.as_str())
                    .map_err(backend_error)?
                    .is_none()
                {
                    self.commands
                        .insert(command_uuid.as_str(), value.as_slice())
                        .map_err(backend_error)?;
                }
            }
            EncodedMutation::PutQueueEntry {
                enrollment_id,
                seq,
                value,
            } => {
                self.queue
                    .insert((enrollment_id.as_str(), *seq), value.as_slice())
                    .map_err(backend_error)?;
            }
            EncodedMutation::RemoveQueueEntry { enrollment_id, seq } => {
                self.queue
                    .remove((enrollment_id.as_str(), *seq))
                    .map_err(backend_error)?;
            }
            EncodedMutation::ClearQueue { enrollment_id } => {
                let id = enrollment_id.as_str();
                self.queue
                    .retain_in((id, 0u64)..=(id, u64::MAX), |_, _| false)
                    .map_err(backend_error)?;
            }
            EncodedMutation::PutResult {
                enrollment_id,
                command_uuid,
                seq,
                value,
            } => self.put_result(enrollment_id, command_uuid, *seq, value)?,
            EncodedMutation::PutPushCert { topic, value } => {
                self.push_certs
                    .insert(topic.as_str(), value.as_slice())
                    .map_err(backend_error)?;
                self.bump_version(super::SHARED_PUSH_CERTS)?;
            }
            EncodedMutation::ScheduleWake {
                enrollment_id,
                due_at,
                attempt,
            } => {
                self.clear_wake(enrollment_id)?;
                self.wakes_by_id
                    .insert(enrollment_id.as_str(), *due_at)
                    .map_err(backend_error)?;
                self.wakes_by_time
                    .insert((*due_at, enrollment_id.as_str()), *attempt)
                    .map_err(backend_error)?;
            }
            EncodedMutation::ClearWake { enrollment_id } => self.clear_wake(enrollment_id)?,
            EncodedMutation::PutRow { table, key, value } => {
                self.keyed(*table)
                    .insert(key.as_str(), value.as_slice())
                    .map_err(backend_error)?;
                self.bump_shared(*table)?;
            }
            EncodedMutation::DeleteRow { table, key } => {
                self.keyed(*table)
                    .remove(key.as_str())
                    .map_err(backend_error)?;
                self.bump_shared(*table)?;
            }
            EncodedMutation::Claim { name, value } => {
                if self
                    .claims
                    .get(name.as_str())
                    .map_err(backend_error)?
                    .is_none()
                {
                    self.claims
                        .insert(name.as_str(), value.as_slice())
                        .map_err(backend_error)?;
                }
            }
            EncodedMutation::PutSetMember { set, enrollment_id } => {
                self.set_members
                    .insert((set.as_str(), enrollment_id.as_str()), ())
                    .map_err(backend_error)?;
            }
            EncodedMutation::RemoveSetMember { set, enrollment_id } => {
                self.set_members
                    .remove((set.as_str(), enrollment_id.as_str()))
                    .map_err(backend_error)?;
            }
            EncodedMutation::AppendDdmReport {
                enrollment_id,
                value,
                keep,
            } => self.append_report(enrollment_id, value, *keep)?,
            EncodedMutation::PutWebhookEvent {
                enrollment_id,
                seq,
                value,
            } => self.put_webhook_event(enrollment_id, *seq, value)?,
            EncodedMutation::RemoveWebhookEvent { enrollment_id, seq } => {
                self.remove_webhook_event(enrollment_id, *seq)?
            }
        }
        Ok(())
    }

    /// Outbox row, index entry and the next sequence, all in this transaction.
    fn put_webhook_event(&mut self, id: &str, seq: u64, value: &[u8]) -> StoreResult<()> {
        self.webhook_events
            .insert((id, seq), value)
            .map_err(backend_error)?;
        self.webhook_pending.insert(id, ()).map_err(backend_error)?;
        let next = self
            .webhook_next
            .get(id)
            .map_err(backend_error)?
            .map_or(0, |n| n.value());
        self.webhook_next
            .insert(id, next.max(seq + 1))
            .map_err(backend_error)?;
        Ok(())
    }

    /// Remove the event; the index entry goes with the outbox's last event.
    fn remove_webhook_event(&mut self, id: &str, seq: u64) -> StoreResult<()> {
        self.webhook_events
            .remove((id, seq))
            .map_err(backend_error)?;
        let drained = self
            .webhook_events
            .range((id, 0u64)..=(id, u64::MAX))
            .map_err(backend_error)?
            .next()
            .is_none();
        if drained {
            self.webhook_pending.remove(id).map_err(backend_error)?;
        }
        Ok(())
    }

    /// The first certificate binding of `mutations` that another enrollment holds.
    fn binding_conflict(&self, mutations: &[EncodedMutation]) -> StoreResult<Option<StoreError>> {
        for mutation in mutations {
            let EncodedMutation::BindCertificate {
                fingerprint,
                enrollment_id,
            } = mutation
            else {
                continue;
            };
            let holder = self.cert_bindings.get(fingerprint).map_err(backend_error)?;
            if let Some(holder) = holder.filter(|h| h.value() != enrollment_id) {
                return Ok(Some(StoreError::Conflict(format!(
                    "certificate already bound to enrollment {}",
                    holder.value()
                ))));
            }
        }
        Ok(None)
    }

    /// Number the report after the newest kept one, then drop the oldest beyond `keep`.
    fn append_report(&mut self, enrollment_id: &str, value: &[u8], keep: usize) -> StoreResult<()> {
        let id = enrollment_id;
        let numbers: Vec<u64> = self
            .ddm_reports
            .range((id, 0u64)..=(id, u64::MAX))
            .map_err(backend_error)?
            .map(|row| row.map(|(key, _)| key.value().1).map_err(backend_error))
            .collect::<StoreResult<_>>()?;
        let next = numbers.last().map_or(0, |last| last + 1);
        self.ddm_reports
            .insert((id, next), value)
            .map_err(backend_error)?;
        let excess = (numbers.len() + 1).saturating_sub(keep);
        for number in numbers.into_iter().take(excess) {
            self.ddm_reports
                .remove((id, number))
                .map_err(backend_error)?;
        }
        Ok(())
    }

    /// The catalog's tables are shared state every node caches.
    fn bump_shared(&mut self, table: KeyedTable) -> StoreResult<()> {
        match table {
            KeyedTable::Declarations | KeyedTable::Sets => self.bump_version(super::SHARED_CATALOG),
            KeyedTable::DdmState | KeyedTable::DdmTimeline => Ok(()),
        }
    }

    fn keyed(&mut self, table: KeyedTable) -> &mut Table<'txn, &'static str, &'static [u8]> {
        match table {
            KeyedTable::Declarations => &mut self.declarations,
            KeyedTable::Sets => &mut self.sets,
            KeyedTable::DdmState => &mut self.ddm_state,
            KeyedTable::DdmTimeline => &mut self.ddm_timeline,
        }
    }

    fn clear_wake(&mut self, enrollment_id: &str) -> StoreResult<()> {
        let previous = self
            .wakes_by_id
            .remove(enrollment_id)
            .map_err(backend_error)?
            .map(|due| due.value());
        if let Some(due) = previous {
            self.wakes_by_time
                .remove((due, enrollment_id))
                .map_err(backend_error)?;
        }
        Ok(())
    }

    /// Upsert by (enrollment, command UUID), moving the row if its seq changed.
    fn put_result(
        &mut self,
        enrollment_id: &str,
        command_uuid: &str,
        seq: u64,
        value: &[u8],
    ) -> StoreResult<()> {
        let previous_seq = self
            .result_seqs
            .insert((enrollment_id, command_uuid), seq)
            .map_err(backend_error)?
            .map(|previous| previous.value());
        if let Some(previous_seq) = previous_seq.filter(|&previous| previous != seq) {
            self.results
                .remove((enrollment_id, previous_seq, command_uuid))
                .map_err(backend_error)?;
        }
        self.results
            .insert((enrollment_id, seq, command_uuid), value)
            .map_err(backend_error)?;
        Ok(())
    }
}

/// The row under `key`, decoded.
fn read_row<T: DeserializeOwned>(
    snapshot: &ReadTransaction,
    definition: TableDefinition<&str, &[u8]>,
    kind: &str,
    key: &str,
) -> StoreResult<Option<T>> {
    let table = snapshot.open_table(definition).map_err(backend_error)?;
    let value = table.get(key).map_err(backend_error)?;
    value
        .map(|value| decode(kind, key, value.value()))
        .transpose()
}

/// Keys of a string-keyed table strictly after `after`, in key order, at most `limit`.
fn keys_after<V: redb::Value + 'static>(
    snapshot: &ReadTransaction,
    definition: TableDefinition<&str, V>,
    after: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<String>> {
    let table = snapshot.open_table(definition).map_err(backend_error)?;
    let lower = match after {
        Some(after) => Bound::Excluded(after),
        None => Bound::Unbounded,
    };
    let rows = table
        .range::<&str>((lower, Bound::Unbounded))
        .map_err(backend_error)?;
    rows.take(limit)
        .map(|row| Ok(row.map_err(backend_error)?.0.value().to_owned()))
        .collect()
}

/// The enrollment's queue entries in `seq` order.
fn read_queue(snapshot: &ReadTransaction, id: &str) -> StoreResult<Vec<QueueEntry>> {
    let table = snapshot.open_table(QUEUE).map_err(backend_error)?;
    let rows = table
        .range((id, 0u64)..=(id, u64::MAX))
        .map_err(backend_error)?;
    rows.map(|row| {
        let (key, value) = row.map_err(backend_error)?;
        let (_, seq) = key.value();
        decode("queue entry", &format!("{id}/{seq}"), value.value())
    })
    .collect()
}

fn read_ddm(snapshot: &ReadTransaction, id: &str) -> StoreResult<DdmRecord> {
    let row = |definition: TableDefinition<&str, &[u8]>| -> StoreResult<Option<Vec<u8>>> {
        let table = snapshot.open_table(definition).map_err(backend_error)?;
        let value = table.get(id).map_err(backend_error)?;
        Ok(value.map(|v| v.value().to_vec()))
    };
    Ok(DdmRecord {
        state: row(DDM_STATE)?,
        timeline: row(DDM_TIMELINE)?,
    })
}

/// Decode every row of a string-keyed table.
fn decode_all<T: DeserializeOwned>(
    snapshot: &ReadTransaction,
    definition: TableDefinition<&str, &[u8]>,
    kind: &str,
) -> StoreResult<Vec<T>> {
    let table = snapshot.open_table(definition).map_err(backend_error)?;
    let rows = table.iter().map_err(backend_error)?;
    rows.map(|row| {
        let (key, value) = row.map_err(backend_error)?;
        decode(kind, key.value(), value.value())
    })
    .collect()
}

/// Create every table once, so that read snapshots never meet a missing table.
fn create_tables(db: &Database) -> StoreResult<()> {
    let transaction = db.begin_write().map_err(backend_error)?;
    WriteTables::open(&transaction)?;
    transaction.commit().map_err(backend_error)
}

/// The smallest string greater than every `(id, ..)` tuple key prefix: `id` followed by
/// NUL. Keys whose first element equals `id` sort before it; any other larger id sorts
/// at or after it.
fn enrollment_successor(id: &str) -> String {
    format!("{id}\0")
}

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    postcard::to_stdvec(value)
        .map_err(|err| StoreError::Backend(format!("cannot encode record: {err}")))
}

fn decode<T: DeserializeOwned>(kind: &str, key: &str, bytes: &[u8]) -> StoreResult<T> {
    postcard::from_bytes(bytes).map_err(|err| StoreError::Corrupt(format!("{kind} {key}: {err}")))
}

fn backend_error(err: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(err.into().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_temporary() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = EmbeddedStore::open(&dir.path().join("nested/data")).expect("open store");
        (dir, store)
    }

    /// Write raw bytes under `key`, bypassing encoding, as a damaged file would hold.
    fn write_raw(store: &EmbeddedStore, table: TableDefinition<&str, &[u8]>, key: &str) {
        let transaction = store.db.begin_write().unwrap();
        transaction
            .open_table(table)
            .unwrap()
            .insert(key, [0xff, 0xff, 0xff].as_slice())
            .unwrap();
        transaction.commit().unwrap();
    }

    #[tokio::test]
    async fn open_creates_the_directory_and_database_file() {
        let (dir, _store) = open_temporary();
        assert!(dir.path().join("nested/data").join(DATABASE_FILE).is_file());
    }

    #[tokio::test]
    async fn a_value_that_does_not_decode_is_reported_corrupt() {
        let (_dir, store) = open_temporary();
        write_raw(&store, ENROLLMENTS, "device-1");
        write_raw(&store, COMMANDS, "cmd-1");

        assert!(matches!(
            store.enrollment("device-1").await,
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.command("cmd-1").await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn an_empty_batch_costs_no_commit() {
        let (_dir, store) = open_temporary();
        store.apply(Vec::new()).await.unwrap();
        assert_eq!(store.commit_count(), 0);
    }

    #[tokio::test]
    async fn every_apply_is_committed_before_it_returns() {
        let (_dir, store) = open_temporary();
        let record = EnrollmentRecord {
            id: "device-1".to_owned(),
            ..EnrollmentRecord::default()
        };
        store
            .apply(vec![Mutation::PutEnrollment(record)])
            .await
            .unwrap();
        assert_eq!(store.commit_count(), 1);
    }

    #[test]
    fn the_enrollment_successor_bounds_exactly_that_enrollment() {
        let successor = enrollment_successor("device-1");
        assert!("device-1" < successor.as_str());
        assert!(successor.as_str() < "device-1 ");
        assert!(successor.as_str() < "device-10");
    }
}
