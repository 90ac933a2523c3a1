//! [`Store::apply`](crate::store::Store::apply) on CQL: a batch becomes up to four
//! phases, each finished before the next starts, so that a crash between two of them
//! leaves only half-states nobody can see (ARCHITECTURE.md, "Crash half-states"):
//!
//! 1. certificate bindings, as lightweight transactions (one enrollment per certificate);
//! 2. rows other rows refer to or are found by: command bodies (write-once),
//!    set-membership additions, re-push hints, webhook-outbox index rows, shared state;
//! 3. each device's own rows (enrollment, queue, results, DDM, wake, reports, webhook
//!    outbox) as one single-partition batch: atomic and isolated on every replica;
//! 4. the enrollment index (a listing never names an enrollment that is not there),
//!    set-membership removals (after the state that no longer names the set) and
//!    webhook-outbox index removals (after the delivered event is gone).
//!
//! Planning ([`Plan::of`]) is pure; only [`ScyllaStore::apply_batch`] talks to the cluster.

use std::collections::{BTreeMap, HashMap};

use futures_util::future::try_join_all;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlValue;

use super::reads::{DECLARATION, PUSH_CERT, SET, VERSION};
use super::rows::{self, section, NumberedReport, WriteClock};
use super::{lwt_row, unavailable, ScyllaStore};
use crate::cluster::{fenced_timestamp, shard_of, WriteFence};
use crate::store::{
    CertFingerprint, Mutation, StoreError, StoreResult, WakeEntry, SHARED_CATALOG,
    SHARED_PUSH_CERTS,
};

/// Which prepared statement a planned write runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stmt {
    PutDeviceRow,
    DeleteDeviceRow,
    DeleteDeviceSection,
    PutEnrollmentIndex,
    PutCommand,
    PutResult,
    PutShared,
    DeleteShared,
    PutSetMember,
    DeleteSetMember,
    PutWake,
    PutWakeMinute,
    PutWebhookPending,
    DeleteWebhookPending,
}

/// One planned statement with its bound values (in the statement's order).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Write {
    pub stmt: Stmt,
    pub values: Vec<CqlValue>,
}

fn text(s: &str) -> CqlValue {
    CqlValue::Text(s.to_string())
}

/// The report slots a device holds now: `(slot, report number)`.
pub(super) type ReportSlots = Vec<(i64, u64)>;

/// A batch, split into its phases.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub bindings: Vec<(CertFingerprint, String)>,
    pub before: Vec<Write>,
    /// Per enrollment, its rows in mutation order.
    pub devices: BTreeMap<String, Vec<Write>>,
    pub after: Vec<Write>,
    /// The lease epoch each device's rows were fenced with.
    pub epochs: HashMap<String, u64>,
}

/// Hands out the planned writes' timestamps in mutation order. A device's rows are
/// fenced by the epoch of its shard's lease (`cluster/fence.rs`), so that a node that lost
/// the shard can never overwrite its new owner; rows every node writes (the catalog, push
/// certificates, the re-push hints) take the plain clock.
struct Stamps<'c> {
    clock: &'c WriteClock,
    now: i64,
    write_once: i64,
    fence: Option<&'c dyn WriteFence>,
    epochs: HashMap<String, u64>,
    /// A device of the batch whose shard this node may not write for.
    refused: Option<String>,
}

impl Stamps<'_> {
    /// The next timestamp for a row of device `id`.
    fn take(&mut self, id: &str) -> CqlValue {
        let epoch = match self.epochs.get(id) {
            Some(&epoch) => epoch,
            None => {
                let epoch = match self.fence {
                    None => Some(0),
                    Some(fence) => fence.write_epoch(shard_of(id)),
                };
                if epoch.is_none() {
                    self.refused = Some(id.to_string());
                }
                let epoch = epoch.unwrap_or(0);
                self.epochs.insert(id.to_string(), epoch);
                epoch
            }
        };
        CqlValue::BigInt(fenced_timestamp(epoch, self.clock.reserve(1, self.now)))
    }

    fn take_plain(&mut self) -> CqlValue {
        CqlValue::BigInt(self.clock.reserve(1, self.now))
    }
}

impl Plan {
    /// Plan `batch` at time `now` (microseconds); each write takes the next timestamp of
    /// `clock`; `reports` holds the report slots of every enrollment the batch appends a
    /// report to.
    pub fn of(
        batch: Vec<Mutation>,
        clock: &WriteClock,
        now: i64,
        fence: Option<&dyn WriteFence>,
        mut reports: HashMap<String, ReportSlots>,
    ) -> StoreResult<Plan> {
        let mut plan = Plan::default();
        let mut stamps = Stamps {
            clock,
            now,
            write_once: rows::write_once_timestamp(now),
            fence,
            epochs: HashMap::new(),
            refused: None,
        };
        for mutation in batch {
            plan.add(mutation, &mut stamps, &mut reports)?;
        }
        match stamps.refused {
            Some(id) => Err(not_held(&id)),
            None => {
                plan.epochs = stamps.epochs;
                Ok(plan)
            }
        }
    }

    fn device(&mut self, id: &str) -> &mut Vec<Write> {
        self.devices.entry(id.to_string()).or_default()
    }

    fn put_device_row(&mut self, id: &str, sec: i8, seq: i64, value: Vec<u8>, stamps: &mut Stamps) {
        let values = vec![
            text(id),
            CqlValue::TinyInt(sec),
            CqlValue::BigInt(seq),
            CqlValue::Blob(value),
            stamps.take(id),
        ];
        self.device(id).push(Write {
            stmt: Stmt::PutDeviceRow,
            values,
        });
    }

    fn delete_device_row(&mut self, id: &str, sec: i8, seq: i64, stamps: &mut Stamps) {
        let values = vec![
            stamps.take(id),
            text(id),
            CqlValue::TinyInt(sec),
            CqlValue::BigInt(seq),
        ];
        self.device(id).push(Write {
            stmt: Stmt::DeleteDeviceRow,
            values,
        });
    }

    fn put_shared(&mut self, kind: &str, name: &str, value: Vec<u8>, stamps: &mut Stamps) {
        self.before.push(Write {
            stmt: Stmt::PutShared,
            values: vec![
                text(kind),
                text(name),
                CqlValue::Blob(value),
                stamps.take_plain(),
            ],
        });
        self.raise_version(kind, stamps);
    }

    fn delete_shared(&mut self, kind: &str, name: &str, stamps: &mut Stamps) {
        self.before.push(Write {
            stmt: Stmt::DeleteShared,
            values: vec![stamps.take_plain(), text(kind), text(name)],
        });
        self.raise_version(kind, stamps);
    }

    /// A new version of the shared state `kind` belongs to, written after the rows (so a
    /// node that sees the version reads the change), random so two writers never collide.
    fn raise_version(&mut self, kind: &str, stamps: &mut Stamps) {
        let shared = match kind {
            DECLARATION | SET => SHARED_CATALOG,
            PUSH_CERT => SHARED_PUSH_CERTS,
            _ => return,
        };
        self.after.push(Write {
            stmt: Stmt::PutShared,
            values: vec![
                text(VERSION),
                text(shared),
                CqlValue::Blob(uuid::Uuid::new_v4().as_bytes().to_vec()),
                stamps.take_plain(),
            ],
        });
    }

    fn add(
        &mut self,
        mutation: Mutation,
        stamps: &mut Stamps,
        reports: &mut HashMap<String, ReportSlots>,
    ) -> StoreResult<()> {
        match mutation {
            Mutation::PutEnrollment(record) => {
                let bucket = rows::bucket(&record.id, rows::ENROLLMENT_BUCKETS);
                self.after.push(Write {
                    stmt: Stmt::PutEnrollmentIndex,
                    values: vec![
                        CqlValue::Int(bucket),
                        text(&record.id),
                        stamps.take(&record.id),
                    ],
                });
                let value = rows::encode(&record)?;
                self.put_device_row(&record.id, section::ENROLLMENT, 0, value, stamps);
            }
            Mutation::BindCertificate {
                fingerprint,
                enrollment_id,
            } => self.bindings.push((fingerprint, enrollment_id)),
            Mutation::PutCommand(command) => self.before.push(Write {
                stmt: Stmt::PutCommand,
                values: vec![
                    text(&command.command_uuid),
                    CqlValue::Blob(rows::encode(&command)?),
                    CqlValue::BigInt(stamps.write_once),
                ],
            }),
            Mutation::PutQueueEntry {
                enrollment_id,
                entry,
            } => {
                let seq = rows::seq_to_cql(entry.seq);
                let value = rows::encode(&entry)?;
                self.put_device_row(&enrollment_id, section::QUEUE, seq, value, stamps);
            }
            Mutation::RemoveQueueEntry {
                enrollment_id,
                seq,
                pending_from,
            } => {
                let seq = rows::seq_to_cql(seq);
                self.delete_device_row(&enrollment_id, section::QUEUE, seq, stamps);
                let head = rows::encode_head(pending_from);
                self.put_device_row(
                    &enrollment_id,
                    section::ENROLLMENT,
                    rows::QUEUE_HEAD_SEQ,
                    head,
                    stamps,
                );
            }
            Mutation::ClearQueue { enrollment_id } => {
                let values = vec![
                    stamps.take(&enrollment_id),
                    text(&enrollment_id),
                    CqlValue::TinyInt(section::QUEUE),
                ];
                self.device(&enrollment_id).push(Write {
                    stmt: Stmt::DeleteDeviceSection,
                    values,
                });
            }
            Mutation::PutResult {
                enrollment_id,
                result,
            } => {
                let values = vec![
                    text(&enrollment_id),
                    text(&result.command_uuid),
                    CqlValue::Blob(rows::encode(&result)?),
                    CqlValue::Int(rows::RESULT_TTL_SECS),
                    stamps.take(&enrollment_id),
                ];
                self.device(&enrollment_id).push(Write {
                    stmt: Stmt::PutResult,
                    values,
                });
            }
            Mutation::PutPushCert(record) => {
                self.put_shared(PUSH_CERT, &record.topic, rows::encode(&record)?, stamps)
            }
            Mutation::ScheduleWake {
                enrollment_id,
                due_at,
                attempt,
            } => {
                let minute = rows::minute_of(due_at);
                let part = rows::bucket(&enrollment_id, rows::WAKE_PARTS);
                self.before.push(Write {
                    stmt: Stmt::PutWake,
                    values: vec![
                        CqlValue::BigInt(minute),
                        CqlValue::Int(part),
                        CqlValue::BigInt(due_at),
                        text(&enrollment_id),
                        stamps.take_plain(),
                    ],
                });
                self.before.push(Write {
                    stmt: Stmt::PutWakeMinute,
                    values: vec![
                        CqlValue::Int(part),
                        CqlValue::BigInt(minute),
                        stamps.take_plain(),
                    ],
                });
                let wake = rows::encode(&WakeEntry {
                    enrollment_id: enrollment_id.clone(),
                    due_at,
                    attempt,
                })?;
                self.put_device_row(&enrollment_id, section::WAKE, 0, wake, stamps);
            }
            Mutation::ClearWake { enrollment_id } => {
                self.delete_device_row(&enrollment_id, section::WAKE, 0, stamps)
            }
            Mutation::PutDeclaration(record) => self.put_shared(
                DECLARATION,
                &record.identifier,
                rows::encode(&record)?,
                stamps,
            ),
            Mutation::DeleteDeclaration { identifier } => {
                self.delete_shared(DECLARATION, &identifier, stamps)
            }
            Mutation::PutSet(set) => self.put_shared(SET, &set.name, rows::encode(&set)?, stamps),
            Mutation::DeleteSet { name } => self.delete_shared(SET, &name, stamps),
            Mutation::PutSetMember { set, enrollment_id } => {
                let bucket = rows::bucket(&enrollment_id, rows::SET_MEMBER_BUCKETS);
                self.before.push(Write {
                    stmt: Stmt::PutSetMember,
                    values: vec![
                        text(&set),
                        CqlValue::Int(bucket),
                        text(&enrollment_id),
                        stamps.take(&enrollment_id),
                    ],
                });
            }
            Mutation::RemoveSetMember { set, enrollment_id } => {
                let bucket = rows::bucket(&enrollment_id, rows::SET_MEMBER_BUCKETS);
                self.after.push(Write {
                    stmt: Stmt::DeleteSetMember,
                    values: vec![
                        stamps.take(&enrollment_id),
                        text(&set),
                        CqlValue::Int(bucket),
                        text(&enrollment_id),
                    ],
                });
            }
            Mutation::PutDdmState {
                enrollment_id,
                state,
            } => self.put_device_row(&enrollment_id, section::DDM_STATE, 0, state, stamps),
            Mutation::PutDdmTimeline {
                enrollment_id,
                timeline,
            } => self.put_device_row(&enrollment_id, section::DDM_TIMELINE, 0, timeline, stamps),
            Mutation::AppendDdmReport {
                enrollment_id,
                report,
                keep,
            } => {
                let slots = reports.entry(enrollment_id.clone()).or_default();
                self.append_report(&enrollment_id, report, keep.max(1), slots, stamps)?;
            }
            Mutation::PutWebhookEvent {
                enrollment_id,
                event,
            } => {
                let bucket = rows::bucket(&enrollment_id, rows::WEBHOOK_BUCKETS);
                self.before.push(Write {
                    stmt: Stmt::PutWebhookPending,
                    values: vec![
                        CqlValue::Int(bucket),
                        text(&enrollment_id),
                        CqlValue::BigInt(rows::seq_to_cql(event.seq)),
                    ],
                });
                let seq = rows::seq_to_cql(event.seq);
                let next = rows::encode_head(event.seq + 1);
                let value = rows::encode(&event)?;
                self.put_device_row(&enrollment_id, section::WEBHOOK, seq, value, stamps);
                self.put_device_row(
                    &enrollment_id,
                    section::ENROLLMENT,
                    rows::WEBHOOK_NEXT_SEQ,
                    next,
                    stamps,
                );
            }
            Mutation::RemoveWebhookEvent { enrollment_id, seq } => {
                let seq = rows::seq_to_cql(seq);
                self.delete_device_row(&enrollment_id, section::WEBHOOK, seq, stamps);
                self.after.push(Write {
                    stmt: Stmt::DeleteWebhookPending,
                    values: webhook_pending_key(seq, &enrollment_id),
                });
            }
        }
        Ok(())
    }

    /// Write the report into the ring slot its number maps to (overwriting the oldest
    /// kept one) and drop slots beyond `keep`: the history never grows, and nothing in it
    /// is deleted while `keep` stays the same.
    fn append_report(
        &mut self,
        id: &str,
        report: crate::store::StoredReport,
        keep: usize,
        slots: &mut ReportSlots,
        stamps: &mut Stamps,
    ) -> StoreResult<()> {
        let number = slots.iter().map(|(_, n)| *n).max().unwrap_or(0) + 1;
        let slot = (number % keep as u64) as i64;
        let value = rows::encode(&NumberedReport { number, report })?;
        self.put_device_row(id, section::REPORTS, slot, value, stamps);
        slots.retain(|(s, _)| *s != slot);
        slots.push((slot, number));
        let beyond: Vec<i64> = slots
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s >= keep as i64)
            .collect();
        for stale in beyond {
            self.delete_device_row(id, section::REPORTS, stale, stamps);
            slots.retain(|(s, _)| *s != stale);
        }
        Ok(())
    }
}

/// The bound values that delete `id`'s `webhook_pending` row as written for event `seq`
/// (or any earlier one): the row's write timestamp is its event's sequence.
pub(super) fn webhook_pending_key(seq: i64, id: &str) -> Vec<CqlValue> {
    vec![
        CqlValue::BigInt(seq),
        CqlValue::Int(rows::bucket(id, rows::WEBHOOK_BUCKETS)),
        text(id),
    ]
}

/// Crash tests: with `ORCHARD_FAILPOINT=<name>` the process aborts at the point of that
/// name, as if killed there, so a test can show what a crash between two phases leaves;
/// with `ORCHARD_FAILPOINT=<name>=pause` the write waits there for [`FAILPOINT_PAUSE`], so
/// a test can stop the process with the write half done (a node paused mid-write).
async fn failpoint(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("ORCHARD_FAILPOINT").ok());
    let Some(armed) = armed.as_deref() else {
        return;
    };
    if armed == name {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
    if armed.strip_suffix("=pause") == Some(name) {
        tracing::warn!(failpoint = name, "failpoint reached: pausing the write");
        tokio::time::sleep(FAILPOINT_PAUSE).await;
    }
}

const FAILPOINT_PAUSE: std::time::Duration = std::time::Duration::from_secs(3);

fn not_held(id: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "enrollment {id}'s shard is not held by this node now"
    ))
}

/// After the writes: acknowledge only if this node still holds every shard under the epoch
/// it wrote with. A node that lost a shard while its write was under way (paused past its
/// lease) must not answer 2xx: the new owner may have loaded the device before the write
/// landed, and fenced it out since. While the lease is still held, no other node can have
/// taken the shard, so everything written is what the next owner will load.
fn still_held(fence: Option<&dyn WriteFence>, epochs: &HashMap<String, u64>) -> StoreResult<()> {
    let Some(fence) = fence else {
        return Ok(());
    };
    match epochs
        .iter()
        .find(|(id, &epoch)| fence.write_epoch(shard_of(id)) != Some(epoch))
    {
        Some((id, _)) => {
            metrics::counter!("orchard_cluster_fenced_writes_total").increment(1);
            Err(not_held(id))
        }
        None => Ok(()),
    }
}

impl ScyllaStore {
    pub(super) async fn apply_batch(&self, batch: Vec<Mutation>) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let reports = self.report_slots_for(&batch).await?;
        let now = rows::now_micros();
        let fence = self.fence.get().map(|fence| &**fence);
        let plan = Plan::of(batch, &self.clock, now, fence, reports)?;
        try_join_all(plan.bindings.iter().map(|(fp, id)| self.bind(fp, id))).await?;
        self.write_each("apply_rows", &plan.before).await?;
        if !plan.before.is_empty() && !plan.devices.is_empty() {
            failpoint("apply:before-device-rows").await;
        }
        try_join_all(
            plan.devices
                .values()
                .map(|writes| self.write_device(writes)),
        )
        .await?;
        self.write_each("apply_rows", &plan.after).await?;
        still_held(fence, &plan.epochs)
    }

    /// The current report slots of every enrollment `batch` appends a report to.
    async fn report_slots_for(
        &self,
        batch: &[Mutation],
    ) -> StoreResult<HashMap<String, ReportSlots>> {
        let ids: std::collections::BTreeSet<&str> = batch
            .iter()
            .filter_map(|m| match m {
                Mutation::AppendDdmReport { enrollment_id, .. } => Some(enrollment_id.as_str()),
                _ => None,
            })
            .collect();
        let mut slots = HashMap::new();
        for id in ids {
            let held = self
                .read_reports(id)
                .await?
                .into_iter()
                .map(|(slot, report)| (slot, report.number))
                .collect();
            slots.insert(id.to_string(), held);
        }
        Ok(slots)
    }

    /// Bind a certificate unless another enrollment holds it (a lightweight transaction:
    /// of two nodes binding one certificate at once, exactly one applies).
    async fn bind(&self, fingerprint: &CertFingerprint, enrollment_id: &str) -> StoreResult<()> {
        let result = self
            .run("bind_certificate", async {
                self.session
                    .execute_unpaged(
                        &self.statements.bind_certificate,
                        (fingerprint.to_vec(), enrollment_id),
                    )
                    .await
                    .map_err(unavailable)
            })
            .await?;
        let (applied, current) = lwt_row(result)?;
        if applied {
            return Ok(());
        }
        let holder = current
            .into_iter()
            .find(|(name, _)| name == "enrollment_id")
            .and_then(|(_, value)| value?.into_string());
        match holder {
            Some(holder) if holder == enrollment_id => Ok(()),
            Some(holder) => Err(StoreError::Conflict(format!(
                "certificate already bound to enrollment {holder}"
            ))),
            None => Err(StoreError::Backend(
                "certificate binding refused without a holder".into(),
            )),
        }
    }

    async fn write_each(&self, op: &'static str, writes: &[Write]) -> StoreResult<()> {
        try_join_all(
            writes
                .iter()
                .map(|w| self.execute(op, self.prepared(w.stmt), &w.values)),
        )
        .await
        .map(drop)
    }

    /// One device's rows: a single statement, or one single-partition batch.
    async fn write_device(&self, writes: &[Write]) -> StoreResult<()> {
        if let [write] = writes {
            return self
                .execute("apply_device", self.prepared(write.stmt), &write.values)
                .await
                .map(drop);
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_is_idempotent(true);
        for write in writes {
            batch.append_statement(self.prepared(write.stmt).clone());
        }
        let values: Vec<&Vec<CqlValue>> = writes.iter().map(|w| &w.values).collect();
        self.run("apply_device", async {
            self.session
                .batch(&batch, values)
                .await
                .map_err(unavailable)
        })
        .await
        .map(drop)
    }

    fn prepared(&self, stmt: Stmt) -> &PreparedStatement {
        let s = &self.statements;
        match stmt {
            Stmt::PutDeviceRow => &s.put_device_row,
            Stmt::DeleteDeviceRow => &s.delete_device_row,
            Stmt::DeleteDeviceSection => &s.delete_device_section,
            Stmt::PutEnrollmentIndex => &s.put_enrollment_index,
            Stmt::PutCommand => &s.put_command,
            Stmt::PutResult => &s.put_result,
            Stmt::PutShared => &s.put_shared,
            Stmt::DeleteShared => &s.delete_shared,
            Stmt::PutSetMember => &s.put_set_member,
            Stmt::DeleteSetMember => &s.delete_set_member,
            Stmt::PutWake => &s.put_wake,
            Stmt::PutWakeMinute => &s.put_wake_minute,
            Stmt::PutWebhookPending => &s.put_webhook_pending,
            Stmt::DeleteWebhookPending => &s.delete_webhook_pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CommandResult, EnrollmentRecord, QueueEntry, ResultStatus, StoredCommand};

    fn plan(batch: Vec<Mutation>) -> Plan {
        Plan::of(batch, &WriteClock::default(), 1_000, None, HashMap::new()).unwrap()
    }

    fn stmts(writes: &[Write]) -> Vec<Stmt> {
        writes.iter().map(|w| w.stmt).collect()
    }

    fn stamp(write: &Write) -> i64 {
        let at = if write.stmt == Stmt::PutDeviceRow || write.stmt == Stmt::PutResult {
            write.values.len() - 1
        } else {
            0
        };
        match write.values[at] {
            CqlValue::BigInt(stamp) => stamp,
            ref other => panic!("no timestamp: {other:?}"),
        }
    }

    fn entry(seq: u64) -> QueueEntry {
        QueueEntry::new(seq, &format!("cmd-{seq}"), "ProfileList", 0, 0)
    }

    #[test]
    fn an_acknowledgement_is_one_single_partition_batch() {
        let result = CommandResult {
            command_uuid: "cmd-1".into(),
            request_type: "ProfileList".into(),
            status: ResultStatus::Acknowledged,
            raw: b"<plist/>".to_vec(),
            seq: 1,
            received_at: 0,
        };
        let plan = plan(vec![
            Mutation::PutResult {
                enrollment_id: "d".into(),
                result,
            },
            Mutation::RemoveQueueEntry {
                enrollment_id: "d".into(),
                seq: 1,
                pending_from: 2,
            },
            Mutation::ClearWake {
                enrollment_id: "d".into(),
            },
        ]);
        assert!(plan.bindings.is_empty() && plan.before.is_empty() && plan.after.is_empty());
        assert_eq!(
            stmts(&plan.devices["d"]),
            [
                Stmt::PutResult,
                Stmt::DeleteDeviceRow,
                Stmt::PutDeviceRow,
                Stmt::DeleteDeviceRow
            ]
        );
    }

    #[test]
    fn a_command_body_and_the_wake_hint_are_written_before_the_queue_entry() {
        let body = StoredCommand {
            command_uuid: "cmd-1".into(),
            request_type: "ProfileList".into(),
            body: Vec::new(),
        };
        let plan = plan(vec![
            Mutation::PutCommand(body),
            Mutation::PutQueueEntry {
                enrollment_id: "d".into(),
                entry: entry(1),
            },
            Mutation::ScheduleWake {
                enrollment_id: "d".into(),
                due_at: 600,
                attempt: 0,
            },
        ]);
        assert_eq!(
            stmts(&plan.before),
            [Stmt::PutCommand, Stmt::PutWake, Stmt::PutWakeMinute]
        );
        assert_eq!(
            stmts(&plan.devices["d"]),
            [Stmt::PutDeviceRow, Stmt::PutDeviceRow]
        );
    }

    #[test]
    fn an_enrollment_is_bound_first_and_indexed_last() {
        let record = EnrollmentRecord {
            id: "d".into(),
            ..EnrollmentRecord::default()
        };
        let plan = plan(vec![
            Mutation::BindCertificate {
                fingerprint: [7; 32],
                enrollment_id: "d".into(),
            },
            Mutation::PutEnrollment(record),
            Mutation::RemoveSetMember {
                set: "s".into(),
                enrollment_id: "d".into(),
            },
        ]);
        assert_eq!(plan.bindings, [([7; 32], "d".to_string())]);
        assert_eq!(stmts(&plan.devices["d"]), [Stmt::PutDeviceRow]);
        assert_eq!(
            stmts(&plan.after),
            [Stmt::PutEnrollmentIndex, Stmt::DeleteSetMember]
        );
    }

    #[test]
    fn later_writes_of_a_batch_carry_later_timestamps() {
        let plan = plan(vec![
            Mutation::ClearQueue {
                enrollment_id: "d".into(),
            },
            Mutation::PutQueueEntry {
                enrollment_id: "d".into(),
                entry: entry(1),
            },
        ]);
        let writes = &plan.devices["d"];
        assert!(
            stamp(&writes[0]) < stamp(&writes[1]),
            "the refill outlives the clear"
        );
    }

    #[test]
    fn a_report_overwrites_the_oldest_slot_of_the_ring() {
        let report = crate::store::StoredReport {
            received_at: 0,
            json: "{}".into(),
        };
        let slots = HashMap::from([("d".to_string(), vec![(0, 4), (1, 3), (2, 1)])]);
        let batch = vec![Mutation::AppendDdmReport {
            enrollment_id: "d".into(),
            report,
            keep: 2,
        }];
        let plan = Plan::of(batch, &WriteClock::default(), 0, None, slots).unwrap();
        let writes = &plan.devices["d"];
        assert_eq!(
            stmts(writes),
            [Stmt::PutDeviceRow, Stmt::DeleteDeviceRow],
            "report 5 goes to slot 1; slot 2 is beyond keep"
        );
        assert_eq!(writes[0].values[2], CqlValue::BigInt(1));
        assert_eq!(writes[1].values[3], CqlValue::BigInt(2));
    }
}
