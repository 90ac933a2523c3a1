//! The ScyllaDB / Apache Cassandra backend: the [`Store`] contract on a CQL cluster.
//!
//! This module owns the connection (the `scylla` driver session: token-aware routing,
//! LOCAL_QUORUM reads and writes, LOCAL_SERIAL for conditional writes, a request timeout,
//! retries of idempotent statements only), backpressure (a bound on requests in flight),
//! the schema (`schema.rs`: `schema.cql` applied and migrated at startup), and the
//! translation of the store contract into CQL:
//!
//! * `rows.rs` — where each record lives (the one-partition-per-device layout), buckets,
//!   write timestamps and encodings; pure;
//! * `statements.rs` — every statement, prepared once;
//! * `writes.rs` — [`Store::apply`]: write-once and index rows first, then each device's
//!   rows in one single-partition batch, then index removals;
//! * `reads.rs` — device reads and bucket-by-bucket paging;
//! * `wakes.rs` — the re-push schedule by due minute.
//!
//! Every request is counted and timed (`orchard_store_request_seconds{op}`,
//! `orchard_store_errors_total{op}`, `orchard_store_in_flight`), and every batch
//! (`orchard_store_apply_seconds`, as on the embedded store).

mod cluster;
mod reads;
mod rows;

pub use reads::ReadTrace;
pub mod schema;
mod statements;
mod wakes;
mod writes;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::{counter, gauge, histogram};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use tokio::sync::Semaphore;

use self::rows::WriteClock;
use self::statements::Statements;
use super::{
    CertFingerprint, CommandResult, DeclarationRecord, DeclarationSet, DeviceRecords,
    EnrollmentFilter, EnrollmentRecord, FleetRows, Mutation, PushCertRecord, QueueEntry,
    SharedVersions, Store, StoreError, StoreResult, StoredCommand, StoredReport, WakeEntry,
    WebhookEvent,
};
use crate::cluster::WriteFence;

/// Consistency of every read and write: a majority of the local datacenter's replicas.
pub(crate) const WRITE_CONSISTENCY: Consistency = Consistency::LocalQuorum;

/// Connection and schema settings (`--scylla-*`, contract.md §4).
#[derive(Clone, Debug)]
pub struct ScyllaConfig {
    /// Contact points, `HOST:PORT`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replication factor used when Orchard creates the keyspace.
    pub replication: u32,
    /// Local datacenter: LOCAL_QUORUM is counted there and requests go to its replicas.
    pub datacenter: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// CA (PEM) of the database's TLS certificates; TLS is used when set.
    pub ca: Option<PathBuf>,
    /// Longest time one request (with its retries) may take before the caller gets a
    /// 503 and retries later.
    pub request_timeout: Duration,
    /// Requests in flight at most; more wait (backpressure), up to the request timeout.
    pub max_in_flight: usize,
    /// This node's name, recorded as the holder of the migration lock.
    pub node_name: String,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "orchard".into(),
            replication: 3,
            datacenter: None,
            user: None,
            password: None,
            ca: None,
            request_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
            node_name: "orchard".into(),
        }
    }
}

/// A [`Store`] on a CQL cluster; see the module documentation.
pub struct ScyllaStore {
    session: Session,
    statements: Statements,
    clock: WriteClock,
    in_flight: Semaphore,
    request_timeout: Duration,
    /// In cluster mode, the lease epochs device writes are fenced with.
    fence: OnceLock<Arc<dyn WriteFence>>,
}

impl ScyllaStore {
    /// Connect, bring the schema up to date and prepare every statement. The driver's
    /// connection tasks run on the runtime this is awaited on.
    pub async fn connect(config: &ScyllaConfig) -> StoreResult<Arc<ScyllaStore>> {
        validate_keyspace(&config.keyspace)?;
        let session = session(config).await?;
        schema::ensure(&session, config, &config.node_name).await?;
        let statements = Statements::prepare(&session, &config.keyspace).await?;
        tracing::info!(keyspace = %config.keyspace, nodes = ?config.nodes, "connected to the CQL store");
        Ok(Arc::new(ScyllaStore {
            session,
            statements,
            clock: WriteClock::default(),
            in_flight: Semaphore::new(config.max_in_flight.max(1)),
            request_timeout: config.request_timeout,
            fence: OnceLock::new(),
        }))
    }

    /// From now on, write a device's rows only while `fence` grants an epoch for its
    /// shard, and stamp them with it (cluster mode; set once, at startup).
    pub fn fence_with(&self, fence: Arc<dyn WriteFence>) {
        if self.fence.set(fence).is_err() {
            tracing::warn!("the write fence is set once; ignoring a second one");
        }
    }

    /// [`ScyllaStore::connect`] on a runtime thread of its own (`orchard-cql`), for a
    /// caller that has no runtime yet (server startup): the driver's connection tasks
    /// then never compete with the HTTP workers' event loops.
    pub fn start(config: ScyllaConfig) -> StoreResult<Arc<ScyllaStore>> {
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("orchard-cql".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(backend(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let store = connect_patiently(&config).await;
                    let connected = store.is_ok();
                    let _ = ready.send(store);
                    if connected {
                        // Keep serving the driver's connections for the process's life.
                        std::future::pending::<()>().await;
                    }
                });
            })
            .map_err(backend)?;
        started
            .recv()
            .map_err(|_| StoreError::Backend("CQL runtime thread died".into()))?
    }

    /// Run one request under the in-flight bound, timed and counted as `op`.
    async fn run<T, E, F>(&self, op: &'static str, request: F) -> StoreResult<T>
    where
        E: Into<StoreError>,
        F: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let permit = tokio::time::timeout(self.request_timeout, self.in_flight.acquire())
            .await
            .map_err(|_| StoreError::Unavailable("too many store requests in flight".into()))?
            .map_err(|_| StoreError::Closed)?;
        gauge!("orchard_store_in_flight").increment(1.0);
        let outcome = request.await.map_err(Into::into);
        gauge!("orchard_store_in_flight").decrement(1.0);
        drop(permit);
        histogram!("orchard_store_request_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &outcome {
            counter!("orchard_store_errors_total", "op" => op).increment(1);
            tracing::warn!(op, error = %e, "store request failed");
        }
        outcome
    }

    async fn execute(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<QueryResult> {
        self.run(op, async {
            self.session
                .execute_unpaged(statement, values)
                .await
                .map_err(unavailable)
        })
        .await
    }

    /// Every row of a query as owned values.
    async fn rows<R>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
    {
        let result = self.execute(op, statement, values).await?;
        let rows = result.into_rows_result().map_err(backend)?;
        let typed = rows.rows::<R>().map_err(backend)?;
        typed.map(|row| row.map_err(backend)).collect()
    }

    /// The single `value` blob a point query selects, if the row exists.
    async fn blob(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<Option<Vec<u8>>> {
        let mut rows: Vec<(Vec<u8>,)> = self.rows(op, statement, values).await?;
        Ok(rows.pop().map(|(value,)| value))
    }

    /// The record a point query selects, decoded; `what` names it in errors.
    async fn record<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        what: (&str, &str),
    ) -> StoreResult<Option<T>> {
        let value = self.blob(op, statement, values).await?;
        value.map(|v| rows::decode(what.0, what.1, &v)).transpose()
    }
}

/// How long startup keeps trying to reach the database (it may start after Orchard, or a
/// node may be rejoining) before giving up.
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

async fn connect_patiently(config: &ScyllaConfig) -> StoreResult<Arc<ScyllaStore>> {
    let deadline = Instant::now() + STARTUP_PATIENCE;
    loop {
        match ScyllaStore::connect(config).await {
            Err(e @ StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "CQL store not ready; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            outcome => return outcome,
        }
    }
}

async fn session(config: &ScyllaConfig) -> StoreResult<Session> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &config.datacenter {
        policy = policy
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(WRITE_CONSISTENCY)
        .serial_consistency(Some(SerialConsistency::LocalSerial))
        .request_timeout(Some(config.request_timeout))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(Duration::from_secs(5));
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        builder = builder.user(user, password);
    }
    builder = tls::configure(builder, config)?;
    builder.build().await.map_err(unavailable)
}

/// TLS to the database. The driver's TLS needs a crypto library of its own (aws-lc),
/// a heavy C build, so it is a cargo feature (`scylla-tls`) rather than the default.
#[cfg(feature = "scylla-tls")]
mod tls {
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use scylla::client::session_builder::SessionBuilder;

    use super::{backend, ScyllaConfig};
    use crate::store::StoreResult;

    pub fn configure(
        builder: SessionBuilder,
        config: &ScyllaConfig,
    ) -> StoreResult<SessionBuilder> {
        let Some(ca) = &config.ca else {
            return Ok(builder);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(backend)? {
            roots.add(cert.map_err(backend)?).map_err(backend)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(backend)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(builder.tls_context(Some(Arc::new(tls))))
    }
}

#[cfg(not(feature = "scylla-tls"))]
mod tls {
    use scylla::client::session_builder::SessionBuilder;

    use super::ScyllaConfig;
    use crate::store::{StoreError, StoreResult};

    pub fn configure(
        builder: SessionBuilder,
        config: &ScyllaConfig,
    ) -> StoreResult<SessionBuilder> {
        match &config.ca {
            None => Ok(builder),
            Some(_) => Err(StoreError::Backend(
                "--scylla-ca needs a build with TLS to the database: cargo build --release --features scylla-tls".into(),
            )),
        }
    }
}

/// Keyspace names go into statements unquoted: allow only what CQL allows unquoted.
fn validate_keyspace(keyspace: &str) -> StoreResult<()> {
    let valid = !keyspace.is_empty()
        && keyspace.len() <= 48
        && keyspace.starts_with(|c: char| c.is_ascii_alphabetic())
        && keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "keyspace name {keyspace:?}: use 1-48 letters, digits or '_', starting with a letter"
        )))
    }
}

/// A failure of the database's machinery or of this process's use of it.
pub(crate) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A request that did not complete: the database may be down or overloaded, and the
/// caller (a device, an operator) may retry; nothing was acknowledged.
pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Whether a lightweight transaction applied (its `[applied]` column).
pub(crate) fn lwt_applied(result: QueryResult) -> StoreResult<bool> {
    Ok(lwt_row(result)?.0)
}

/// A row's columns by name.
type NamedColumns = Vec<(String, Option<CqlValue>)>;

/// A lightweight transaction's `[applied]` and, when it did not apply, the current
/// values by column name.
fn lwt_row(result: QueryResult) -> StoreResult<(bool, NamedColumns)> {
    let rows = result.into_rows_result().map_err(backend)?;
    let names: Vec<String> = rows
        .column_specs()
        .iter()
        .map(|spec| spec.name().to_string())
        .collect();
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(backend)?
        .ok_or_else(|| StoreError::Backend("conditional write returned no row".into()))?;
    let columns: NamedColumns = names.into_iter().zip(row.columns).collect();
    let applied = columns
        .iter()
        .find(|(name, _)| name == "[applied]")
        .and_then(|(_, value)| value.as_ref()?.as_boolean())
        .ok_or_else(|| StoreError::Backend("conditional write without [applied]".into()))?;
    Ok((applied, columns))
}

#[async_trait]
impl Store for ScyllaStore {
    async fn apply(&self, batch: Vec<Mutation>) -> StoreResult<()> {
        super::timed_apply(self.apply_batch(batch)).await
    }

    async fn enrollment(&self, id: &str) -> StoreResult<Option<EnrollmentRecord>> {
        self.read_enrollment(id).await
    }

    async fn enrollment_ids(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        self.page_enrollments(after, limit).await
    }

    async fn cert_binding(&self, fingerprint: &CertFingerprint) -> StoreResult<Option<String>> {
        let rows: Vec<(Option<String>,)> = self
            .rows(
                "cert_binding",
                &self.statements.cert_binding,
                (fingerprint.to_vec(),),
            )
            .await?;
        Ok(rows.into_iter().next().and_then(|(id,)| id))
    }

    async fn command(&self, command_uuid: &str) -> StoreResult<Option<StoredCommand>> {
        self.read_command(command_uuid).await
    }

    async fn queue(&self, enrollment_id: &str) -> StoreResult<Vec<QueueEntry>> {
        let head = self.queue_head(enrollment_id).await?;
        self.read_queue(enrollment_id, head).await
    }

    async fn results(&self, enrollment_id: &str, limit: usize) -> StoreResult<Vec<CommandResult>> {
        self.read_results(enrollment_id, limit).await
    }

    async fn result(
        &self,
        enrollment_id: &str,
        command_uuid: &str,
    ) -> StoreResult<Option<CommandResult>> {
        let values = (enrollment_id, command_uuid);
        self.record(
            "result",
            &self.statements.result,
            values,
            ("result", command_uuid),
        )
        .await
    }

    async fn push_cert(&self, topic: &str) -> StoreResult<Option<PushCertRecord>> {
        self.read_shared_one(reads::PUSH_CERT, topic).await
    }

    async fn push_certs(&self) -> StoreResult<Vec<PushCertRecord>> {
        self.read_shared_kind(reads::PUSH_CERT).await
    }

    async fn due_wakes(&self, now: i64, limit: usize) -> StoreResult<Vec<WakeEntry>> {
        self.read_due_wakes(now, limit).await
    }

    async fn declarations(&self) -> StoreResult<Vec<DeclarationRecord>> {
        self.read_shared_kind(reads::DECLARATION).await
    }

    async fn sets(&self) -> StoreResult<Vec<DeclarationSet>> {
        self.read_shared_kind(reads::SET).await
    }

    async fn set_members(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        self.page_set_members(set, after, limit).await
    }

    async fn device(&self, id: &str) -> StoreResult<DeviceRecords> {
        self.read_device(id).await
    }

    async fn fleet_rows(
        &self,
        after: Option<&str>,
        limit: usize,
        wanted: EnrollmentFilter,
    ) -> StoreResult<Vec<(String, FleetRows)>> {
        self.page_fleet_rows(after, limit, &*wanted).await
    }

    async fn ddm_reports(&self, enrollment_id: &str) -> StoreResult<Vec<StoredReport>> {
        let mut reports = self.read_reports(enrollment_id).await?;
        reports.sort_by_key(|(_, report)| report.number);
        Ok(reports.into_iter().map(|(_, r)| r.report).collect())
    }

    async fn webhook_pending(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        self.page_webhook_pending(after, limit).await
    }

    async fn webhook_events(
        &self,
        enrollment_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<WebhookEvent>> {
        self.read_webhook_events(enrollment_id, limit).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read_shared_kind::<PushCertRecord>(reads::PUSH_CERT)
            .await
            .map(drop)
    }

    async fn claim(&self, name: &str, value: Vec<u8>) -> StoreResult<Vec<u8>> {
        let result = self
            .run("claim", async {
                self.session
                    .execute_unpaged(&self.statements.claim, (name, value.clone()))
                    .await
                    .map_err(unavailable)
            })
            .await?;
        let (applied, columns) = lwt_row(result)?;
        if applied {
            return Ok(value);
        }
        columns
            .into_iter()
            .find(|(column, _)| column == "value")
            .and_then(|(_, stored)| stored?.into_blob())
            .ok_or_else(|| StoreError::Backend(format!("claim {name} returned no value")))
    }

    async fn shared_versions(&self) -> StoreResult<SharedVersions> {
        let rows: Vec<(String, Vec<u8>)> = self
            .rows(
                "shared_versions",
                &self.statements.shared_named,
                (reads::VERSION,),
            )
            .await?;
        let version = |kind: &str| {
            rows.iter()
                .find(|(name, _)| name == kind)
                .map(|(_, value)| value.clone())
                .unwrap_or_default()
        };
        Ok(SharedVersions {
            catalog: version(crate::store::SHARED_CATALOG),
            push_certs: version(crate::store::SHARED_PUSH_CERTS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_names_that_would_need_quoting_are_refused() {
        assert!(validate_keyspace("orchard_test_1").is_ok());
        for bad in ["", "1abc", "a-b", "a.b", "a;DROP", &"k".repeat(49)] {
            assert!(validate_keyspace(bad).is_err(), "{bad}");
        }
    }
}
