//! Durable state behind one trait, so that the embedded single-node store and the
//! ScyllaDB cluster store are interchangeable.
//!
//! Shape rules (so that a wide-column backend fits without cross-node locks):
//! * every per-device row is keyed, and partitioned, by its enrollment id;
//! * a [`Store::apply`] batch touches one device (its enrollment row, its queue, its
//!   results) plus rows that are written once and never updated in place (command bodies
//!   keyed by command UUID, certificate bindings keyed by certificate hash, push
//!   certificates keyed by topic); no transaction spans two devices;
//! * there is no read-modify-write inside the store: the device actor owns the state and
//!   writes whole rows.
//!
//! `apply` returns only once the batch is durable (fsynced or quorum-acknowledged): the
//! HTTP layer answers 2xx only after that, so a `kill -9` loses nothing acknowledged.

pub mod embedded;
pub mod scylla;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// SHA-256 of a certificate's DER encoding.
pub type CertFingerprint = [u8; 32];

pub use crate::protocol::ids::EnrollmentKind;

/// Push coordinates learned from the latest TokenUpdate of a channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushInfo {
    pub topic: String,
    /// Raw APNs device token (hex-encoded only when pushing).
    pub token: Vec<u8>,
    pub push_magic: String,
}

/// Everything Orchard keeps about one enrollment (one device or user channel).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    pub id: String,
    /// The device-channel enrollment id; equal to `id` for device channels.
    pub device_id: String,
    pub kind: EnrollmentKind,
    pub topic: String,
    /// Identity certificate bound at Authenticate (device channel only; user channels
    /// are authorised through their device's binding).
    pub cert_fingerprint: Option<CertFingerprint>,
    /// Incremented on every Authenticate: a re-enrollment starts a new generation.
    pub generation: u64,
    /// True between the first TokenUpdate and a CheckOut / re-Authenticate.
    pub enabled: bool,
    pub push: Option<PushInfo>,
    /// Cleared when APNs reports the token dead; set again by the next TokenUpdate.
    pub push_token_valid: bool,
    pub unlock_token: Option<Vec<u8>>,
    pub bootstrap_token: Option<Vec<u8>>,
    pub awaiting_configuration: bool,
    pub token_update_count: u64,
    /// Device facts from Authenticate (SerialNumber, Model, OSVersion, ...).
    pub device_info: Vec<(String, String)>,
    /// User channels seen for this device (device channel only), so that a
    /// re-enrollment can clear their queues too.
    pub user_channels: Vec<String>,
    /// Unix seconds.
    pub enrolled_at: i64,
    /// Unix seconds of the last check-in or connect that changed durable state. The
    /// live value is kept in memory by the device actor and flushed opportunistically.
    pub last_seen: i64,
}

/// A command body as enqueued, stored once per command UUID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCommand {
    pub command_uuid: String,
    pub request_type: String,
    /// The exact plist sent to devices.
    pub body: Vec<u8>,
}

/// One pending entry of an enrollment's queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// Per-enrollment strictly increasing sequence number: FIFO order within a priority.
    pub seq: u64,
    pub command_uuid: String,
    pub request_type: String,
    /// Higher runs first.
    pub priority: u8,
    /// Unix seconds.
    pub enqueued_at: i64,
    /// How many times the device answered NotNow.
    pub not_now_count: u32,
    /// Unix seconds of the last NotNow, if any.
    pub last_not_now_at: Option<i64>,
    /// Results for this command that could not be parsed.
    pub unparseable_results: u32,
    /// Parked commands are no longer sent (after repeated unparseable results).
    pub parked: bool,
}

impl QueueEntry {
    /// A newly enqueued entry: never answered, not parked.
    pub fn new(
        seq: u64,
        command_uuid: &str,
        request_type: &str,
        priority: u8,
        enqueued_at: i64,
    ) -> QueueEntry {
        QueueEntry {
            seq,
            command_uuid: command_uuid.to_string(),
            request_type: request_type.to_string(),
            priority,
            enqueued_at,
            not_now_count: 0,
            last_not_now_at: None,
            unparseable_results: 0,
            parked: false,
        }
    }
}

/// Final (or NotNow) status a device reported for a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultStatus {
    Acknowledged,
    Error,
    CommandFormatError,
    NotNow,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Acknowledged => "Acknowledged",
            ResultStatus::Error => "Error",
            ResultStatus::CommandFormatError => "CommandFormatError",
            ResultStatus::NotNow => "NotNow",
        }
    }
}

/// The device's answer to a command, stored raw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_uuid: String,
    pub request_type: String,
    pub status: ResultStatus,
    /// The exact plist the device sent.
    pub raw: Vec<u8>,
    /// Sequence number of the queue entry it answered (orders the history).
    pub seq: u64,
    /// Unix seconds.
    pub received_at: i64,
}

/// An uploaded APNs push certificate, keyed by its topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushCertRecord {
    pub topic: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub uploaded_at: i64,
}

/// A published declaration (the DDM catalog), keyed by its Identifier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclarationRecord {
    pub identifier: String,
    pub declaration_type: String,
    /// The `Payload` object as canonical JSON.
    pub payload_json: String,
    pub server_token: String,
    /// Touches force a new ServerToken without a content change.
    pub touch: u64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A named set of declaration identifiers; enrollments are assigned sets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclarationSet {
    pub name: String,
    pub declarations: Vec<String>,
}

/// A webhook event waiting in an enrollment's outbox (`src/webhook/`): recorded in the
/// same batch as the change it reports, removed once the receiver accepted it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// Per-enrollment strictly increasing: the delivery order. Never reused, also across
    /// actor incarnations ([`DeviceRecords::webhook_next_seq`]).
    pub seq: u64,
    /// Unix milliseconds of the change, for the age bound and the delivery latency.
    pub created_at_ms: i64,
    /// The exact JSON body posted to the receiver (retries send the same bytes).
    pub body: Vec<u8>,
}

/// One write in an atomic, durable batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    PutEnrollment(EnrollmentRecord),
    /// Certificate hash -> enrollment id index (protocol.md §2.5): one certificate, one
    /// enrollment. Binding a hash already bound to the same enrollment is a no-op; a hash
    /// bound to another enrollment fails the whole batch with [`StoreError::Conflict`], so
    /// two devices racing for one certificate through different nodes cannot both win.
    BindCertificate {
        fingerprint: CertFingerprint,
        enrollment_id: String,
    },
    /// Write-once command body: the first body stored under a UUID is kept, so that
    /// enqueueing one command to many devices rewrites nothing.
    PutCommand(StoredCommand),
    /// Insert or replace the entry with the same `(enrollment_id, entry.seq)`.
    PutQueueEntry {
        enrollment_id: String,
        entry: QueueEntry,
    },
    RemoveQueueEntry {
        enrollment_id: String,
        seq: u64,
        /// The lowest `seq` still pending after this removal (or one past the removed
        /// entry when the queue is now empty). Backends that keep delete markers start
        /// queue reads here, so a device that received 10,000 commands does not read
        /// 10,000 markers to find an empty queue.
        pending_from: u64,
    },
    /// Remove every queue entry of the enrollment (re-enrollment).
    ClearQueue {
        enrollment_id: String,
    },
    /// Upsert by `(enrollment_id, result.command_uuid)`.
    PutResult {
        enrollment_id: String,
        result: CommandResult,
    },
    PutPushCert(PushCertRecord),
    /// (Re)schedule the enrollment's re-push at `due_at`; replaces any earlier schedule.
    ScheduleWake {
        enrollment_id: String,
        due_at: i64,
        attempt: u32,
    },
    /// Nothing left to wake the enrollment for.
    ClearWake {
        enrollment_id: String,
    },
    PutDeclaration(DeclarationRecord),
    DeleteDeclaration {
        identifier: String,
    },
    PutSet(DeclarationSet),
    DeleteSet {
        name: String,
    },
    /// Reverse index set -> enrollments, so a catalog change finds whom it affects.
    PutSetMember {
        set: String,
        enrollment_id: String,
    },
    RemoveSetMember {
        set: String,
        enrollment_id: String,
    },
    /// The enrollment's DDM state (assigned sets, merged status), encoded by the DDM
    /// layer and written whole by the enrollment's actor.
    PutDdmState {
        enrollment_id: String,
        state: Vec<u8>,
    },
    /// The enrollment's DDM sync timeline, written whole.
    PutDdmTimeline {
        enrollment_id: String,
        timeline: Vec<u8>,
    },
    /// Add a raw status report to the enrollment's history; the store keeps only the
    /// newest `keep`.
    AppendDdmReport {
        enrollment_id: String,
        report: StoredReport,
        keep: usize,
    },
    /// Add an event to the enrollment's webhook outbox (and the enrollment to the index
    /// of enrollments with pending events).
    PutWebhookEvent {
        enrollment_id: String,
        event: WebhookEvent,
    },
    /// The receiver accepted the event: remove it (and the enrollment from the index once
    /// its outbox is empty).
    RemoveWebhookEvent {
        enrollment_id: String,
        seq: u64,
    },
}

/// Everything an enrollment's actor loads when it activates, read from one snapshot so
/// that an activation costs one store round trip, not one per table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceRecords {
    pub enrollment: Option<EnrollmentRecord>,
    /// The pending queue in `seq` order, each entry with its command body (`None`: the
    /// body is missing, which the actor logs and skips).
    pub queue: Vec<(QueueEntry, Option<StoredCommand>)>,
    /// The last `pending_from` the store recorded for the queue (0 if it keeps none):
    /// the actor never allocates a sequence number below it.
    pub queue_floor: u64,
    pub ddm: DdmRecord,
    /// One past the sequence of the last webhook event written for the enrollment (0 if
    /// none; the actor writes them in increasing order): it numbers its next event at or
    /// above it.
    pub webhook_next_seq: u64,
}

/// An enrollment's DDM rows, encoded by the DDM layer. They are split by how often they
/// change: the state (assigned sets, merged status) is written with every assignment and
/// status report; the timeline is diagnostic and written with status reports and when
/// the actor leaves memory, so a fleet-wide assignment does not rewrite it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DdmRecord {
    pub state: Option<Vec<u8>>,
    pub timeline: Option<Vec<u8>>,
}

/// Which enrollments a fleet walk reads: a node recounting some shards reads only
/// theirs, and skips the others' rows after reading just their ids.
pub type EnrollmentFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A filter that keeps every enrollment.
pub fn every_enrollment() -> EnrollmentFilter {
    Arc::new(|_| true)
}

/// The rows of one enrollment that the fleet tally reduces.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetRows {
    pub enrollment: Option<EnrollmentRecord>,
    pub ddm: DdmRecord,
}

/// A status report exactly as the device sent it, kept for the report history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReport {
    /// Unix seconds.
    pub received_at: i64,
    pub json: String,
}

/// A scheduled re-push: the enrollment has pending commands and should be woken at
/// `due_at` (Unix seconds) unless it checks in first; `attempt` spaces repeats out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeEntry {
    pub enrollment_id: String,
    pub due_at: i64,
    pub attempt: u32,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend failure: {0}")]
    Backend(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("store is shutting down")]
    Closed,
    /// A conditional write lost: the row already holds another owner's value.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store could not be reached in time (outage, overload): nothing was
    /// acknowledged, and the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Run a backend's `apply`, recording its latency and failures the same way for every
/// backend (`orchard_store_apply_seconds`, `orchard_store_errors_total{op="apply"}`).
pub(crate) async fn timed_apply(
    apply: impl std::future::Future<Output = StoreResult<()>>,
) -> StoreResult<()> {
    let started = std::time::Instant::now();
    let outcome = apply.await;
    metrics::histogram!("orchard_store_apply_seconds").record(started.elapsed().as_secs_f64());
    if outcome.is_err() {
        metrics::counter!("orchard_store_errors_total", "op" => "apply").increment(1);
    }
    outcome
}

/// The storage contract every backend satisfies; `tests/store_conformance.rs` runs the
/// same suite against each of them.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Apply all mutations atomically; return once they are durable.
    async fn apply(&self, batch: Vec<Mutation>) -> StoreResult<()>;

    async fn enrollment(&self, id: &str) -> StoreResult<Option<EnrollmentRecord>>;
    /// Enrollment ids in the store's page order, strictly after `after`, at most `limit`.
    /// The order is stable and total, so paging with the last id of a page visits every
    /// enrollment once; the embedded store pages in id order, a partitioned one bucket by
    /// bucket.
    async fn enrollment_ids(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>>;
    async fn cert_binding(&self, fingerprint: &CertFingerprint) -> StoreResult<Option<String>>;
    async fn command(&self, command_uuid: &str) -> StoreResult<Option<StoredCommand>>;
    /// The enrollment's pending queue in `seq` order.
    async fn queue(&self, enrollment_id: &str) -> StoreResult<Vec<QueueEntry>>;
    /// Stored results of the enrollment in `seq` order, at most the newest `limit`.
    async fn results(&self, enrollment_id: &str, limit: usize) -> StoreResult<Vec<CommandResult>>;
    async fn result(
        &self,
        enrollment_id: &str,
        command_uuid: &str,
    ) -> StoreResult<Option<CommandResult>>;
    async fn push_cert(&self, topic: &str) -> StoreResult<Option<PushCertRecord>>;
    async fn push_certs(&self) -> StoreResult<Vec<PushCertRecord>>;
    /// Wakes due at or before `now`, earliest first, at most `limit`.
    async fn due_wakes(&self, now: i64, limit: usize) -> StoreResult<Vec<WakeEntry>>;
    /// The whole declaration catalog (small: it is loaded into memory at startup).
    async fn declarations(&self) -> StoreResult<Vec<DeclarationRecord>>;
    async fn sets(&self) -> StoreResult<Vec<DeclarationSet>>;
    /// Enrollments assigned `set`, in the store's page order (as for
    /// [`Store::enrollment_ids`]), strictly after `after`, at most `limit`.
    async fn set_members(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>>;
    /// Everything the enrollment's actor needs to activate, from one snapshot.
    async fn device(&self, id: &str) -> StoreResult<DeviceRecords>;
    /// The enrollment and DDM rows of the enrollments `wanted` keeps that have a DDM
    /// state, in the page order of [`Store::enrollment_ids`], strictly after `after`, at
    /// most `limit` (the fleet tally's recount walks page through them).
    async fn fleet_rows(
        &self,
        after: Option<&str>,
        limit: usize,
        wanted: EnrollmentFilter,
    ) -> StoreResult<Vec<(String, FleetRows)>>;
    /// The enrollment's kept raw status reports, oldest first.
    async fn ddm_reports(&self, enrollment_id: &str) -> StoreResult<Vec<StoredReport>>;
    /// Enrollments whose webhook outbox holds events, in the store's page order (as for
    /// [`Store::enrollment_ids`]), strictly after `after`, at most `limit`: an index, so
    /// finding them after a restart reads no other enrollment.
    async fn webhook_pending(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>>;
    /// The oldest (lowest `seq`) events of the enrollment's webhook outbox, at most
    /// `limit`. An enrollment listed by [`Store::webhook_pending`] whose outbox turns out
    /// empty (a crash between the index write and the event's) is dropped from the index
    /// by this read.
    async fn webhook_events(
        &self,
        enrollment_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<WebhookEvent>>;
    /// Whether the store answers now (readiness), at the cost of one small read.
    async fn ping(&self) -> StoreResult<()>;
    /// Store `value` under `name` unless a value is there already; answers the value that
    /// stays (the first claimer's). Every node of a cluster claims the identity CA and the
    /// generated API key at startup, and all end up with the same.
    async fn claim(&self, name: &str, value: Vec<u8>) -> StoreResult<Vec<u8>>;
    /// Opaque versions of the state every node caches; a version changes with every
    /// write of its kind, so a node polls them to learn of a change made through another.
    async fn shared_versions(&self) -> StoreResult<SharedVersions>;
}

/// Kinds of shared state whose versions are kept.
pub(crate) const SHARED_CATALOG: &str = "catalog";
pub(crate) const SHARED_PUSH_CERTS: &str = "push_certs";

/// See [`Store::shared_versions`]; empty before the first write of a kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedVersions {
    /// Declarations and sets.
    pub catalog: Vec<u8>,
    pub push_certs: Vec<u8>,
}
