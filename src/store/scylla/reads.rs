//! Reads: a device's partition, point lookups, shared state, and paging through the
//! bucketed indexes. Pages run bucket after bucket (the store's page order is
//! `(bucket, id)`; a page's last id names the bucket to continue in), a few buckets
//! fetched ahead so a sparse index does not cost one round trip per empty bucket.

use std::future::Future;

use futures_util::{stream, StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;

use super::rows::{self, section, NumberedReport};
use super::{backend, ScyllaStore};
use crate::store::{
    CommandResult, DdmRecord, DeviceRecords, EnrollmentRecord, FleetRows, QueueEntry, StoreError,
    StoreResult, StoredCommand, WebhookEvent,
};

/// Kinds of `shared_state` rows.
pub(super) const PUSH_CERT: &str = "push_cert";
pub(super) const DECLARATION: &str = "declaration";
pub(super) const SET: &str = "set";
/// Versions of the kinds above (`Store::shared_versions`).
pub(super) const VERSION: &str = "version";
/// Values claimed once (`Store::claim`).
pub(super) const CLAIM: &str = "claim";

/// A `webhook_pending` row of an enrollment that never had an event written is a crash
/// leftover at least this old (its event's write would have landed long before).
const UNWRITTEN_HINT_AGE_MICROS: i64 = 60_000_000;

/// How often a traced read looks for its read statistics (100 ms apart) before it gives
/// what it has.
const TRACE_POLLS: u32 = 50;

/// The trace events that carry read statistics: Cassandra's and ScyllaDB's.
const CASSANDRA_READ_STATISTICS: &str = "Read ";
const SCYLLA_READ_STATISTICS: &str = "Page stats";

/// Buckets read ahead while filling a page.
const BUCKETS_AHEAD: usize = 4;
/// Command bodies fetched at once for one activation.
const FETCH_AHEAD: usize = 32;
/// DDM rows fetched at once by a fleet walk: enough to keep every replica busy, well
/// under the in-flight bound so device requests still get through.
const FLEET_FETCH_AHEAD: usize = 256;

/// What one read cost on the replicas, from the database's own query trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadTrace {
    /// Live rows the replicas read.
    pub live_rows: u64,
    /// Delete markers (tombstone cells, dead rows, range tombstones) they stepped over.
    pub tombstones: u64,
    /// The trace's events, as the database wrote them.
    pub events: Vec<String>,
}

impl ReadTrace {
    /// The read statistics of the traced request `tracing_id`. The database writes a
    /// trace's events after it answers (Cassandra from its tracing stage), so the
    /// statistics can land a moment after the rest: this waits for them.
    pub async fn fetch(
        session: &scylla::client::session::Session,
        tracing_id: uuid::Uuid,
    ) -> StoreResult<ReadTrace> {
        let mut polls = 0;
        loop {
            let info = session
                .get_tracing_info(&tracing_id)
                .await
                .map_err(backend)?;
            let events: Vec<String> = info.events.into_iter().filter_map(|e| e.activity).collect();
            polls += 1;
            if events.iter().any(|e| ReadTrace::is_read_statistics(e)) || polls == TRACE_POLLS {
                return Ok(ReadTrace::from_events(events));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Whether a trace event carries read statistics that [`ReadTrace::from_events`] sums.
    fn is_read_statistics(event: &str) -> bool {
        event.starts_with(CASSANDRA_READ_STATISTICS) || event.starts_with(SCYLLA_READ_STATISTICS)
    }

    /// Sum the read statistics of trace events: Cassandra's "Read N live rows and M
    /// tombstone cells", and ScyllaDB's page statistics "(N live, M dead)" per row kind
    /// and "K range tombstone(s)".
    pub fn from_events(events: Vec<String>) -> ReadTrace {
        let mut trace = ReadTrace::default();
        for event in &events {
            if let Some(rest) = event.strip_prefix(CASSANDRA_READ_STATISTICS) {
                let numbers = leading_numbers(rest);
                if let [live, tombstones, ..] = numbers[..] {
                    trace.live_rows += live;
                    trace.tombstones += tombstones;
                }
            } else if event.starts_with(SCYLLA_READ_STATISTICS) {
                for part in event.split('(').skip(1) {
                    if let [live, dead, ..] = leading_numbers(part)[..] {
                        if part.contains("live") && part.contains("dead") {
                            trace.live_rows += live;
                            trace.tombstones += dead;
                        }
                    }
                }
                if let Some(before) = event.split(" range tombstone").next() {
                    trace.tombstones += before
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        trace.events = events;
        trace
    }
}

/// The whole numbers in `text`, in order.
fn leading_numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The rows before a device's queue: its enrollment, queue head, DDM rows and wake.
#[derive(Default)]
struct DeviceHead {
    enrollment: Option<Vec<u8>>,
    queue_head: u64,
    ddm: DdmRecord,
    webhook_next_seq: u64,
}

impl ScyllaStore {
    pub(super) async fn read_enrollment(&self, id: &str) -> StoreResult<Option<EnrollmentRecord>> {
        let key = (id, section::ENROLLMENT, 0_i64);
        self.record(
            "enrollment",
            &self.statements.device_row,
            key,
            ("enrollment", id),
        )
        .await
    }

    pub(super) async fn read_command(&self, uuid: &str) -> StoreResult<Option<StoredCommand>> {
        self.record(
            "command",
            &self.statements.command,
            (uuid,),
            ("command", uuid),
        )
        .await
    }

    pub(super) async fn queue_head(&self, id: &str) -> StoreResult<u64> {
        let value = self
            .blob(
                "queue",
                &self.statements.device_row,
                (id, section::ENROLLMENT, rows::QUEUE_HEAD_SEQ),
            )
            .await?;
        value.map_or(Ok(0), |v| rows::decode_head(&v))
    }

    /// The pending entries from `head` on: the slice starts past every delete marker
    /// that delivered commands left.
    pub(super) async fn read_queue(&self, id: &str, head: u64) -> StoreResult<Vec<QueueEntry>> {
        let values: Vec<(Vec<u8>,)> = self
            .rows(
                "queue",
                &self.statements.device_queue,
                (id, rows::seq_to_cql(head)),
            )
            .await?;
        values
            .iter()
            .map(|(v,)| rows::decode("queue entry", id, v))
            .collect()
    }

    /// Read the device's queue as [`Store::queue`](crate::store::Store::queue) does, with
    /// query tracing on: how many delete markers the replicas stepped over to answer.
    pub async fn trace_queue_read(&self, id: &str) -> StoreResult<ReadTrace> {
        let head = self.queue_head(id).await?;
        let mut traced = self.statements.device_queue.clone();
        traced.set_tracing(true);
        let result = self
            .execute("queue_trace", &traced, (id, rows::seq_to_cql(head)))
            .await?;
        let tracing_id = result
            .tracing_id()
            .ok_or_else(|| StoreError::Backend("the database returned no trace".into()))?;
        ReadTrace::fetch(&self.session, tracing_id).await
    }

    pub(super) async fn read_results(
        &self,
        id: &str,
        limit: usize,
    ) -> StoreResult<Vec<CommandResult>> {
        let values: Vec<(Vec<u8>,)> = self
            .rows("results", &self.statements.results, (id,))
            .await?;
        let mut results = values
            .iter()
            .map(|(v,)| rows::decode::<CommandResult>("result", id, v))
            .collect::<StoreResult<Vec<_>>>()?;
        results.sort_by(|a, b| a.seq.cmp(&b.seq).then(a.command_uuid.cmp(&b.command_uuid)));
        let skip = results.len().saturating_sub(limit);
        Ok(results.split_off(skip))
    }

    pub(super) async fn read_shared_kind<T: DeserializeOwned>(
        &self,
        kind: &str,
    ) -> StoreResult<Vec<T>> {
        let values: Vec<(Vec<u8>,)> = self
            .rows("shared_state", &self.statements.shared_kind, (kind,))
            .await?;
        values
            .iter()
            .map(|(v,)| rows::decode(kind, "", v))
            .collect()
    }

    pub(super) async fn read_shared_one<T: DeserializeOwned>(
        &self,
        kind: &str,
        name: &str,
    ) -> StoreResult<Option<T>> {
        let statement = &self.statements.shared_one;
        self.record("shared_state", statement, (kind, name), (kind, name))
            .await
    }

    /// Everything an actor loads: the head rows, then the queue from the head, then the
    /// bodies of its commands.
    pub(super) async fn read_device(&self, id: &str) -> StoreResult<DeviceRecords> {
        let head = self.read_head(id, section::HEAD_END).await?;
        let queue = self.read_queue(id, head.queue_head).await?;
        let queue = stream::iter(queue)
            .map(|entry| async move {
                let body = self.read_command(&entry.command_uuid).await?;
                StoreResult::Ok((entry, body))
            })
            .buffered(FETCH_AHEAD)
            .try_collect()
            .await?;
        Ok(DeviceRecords {
            enrollment: head
                .enrollment
                .map(|v| rows::decode("enrollment", id, &v))
                .transpose()?,
            queue,
            queue_floor: head.queue_head,
            ddm: head.ddm,
            webhook_next_seq: head.webhook_next_seq,
        })
    }

    /// The device's rows in sections below `end`.
    async fn read_head(&self, id: &str, end: i8) -> StoreResult<DeviceHead> {
        let found: Vec<(i8, i64, Vec<u8>)> = self
            .rows("device", &self.statements.device_head, (id, end))
            .await?;
        let mut head = DeviceHead::default();
        for (sec, seq, value) in found {
            match (sec, seq) {
                (section::ENROLLMENT, 0) => head.enrollment = Some(value),
                (section::ENROLLMENT, rows::QUEUE_HEAD_SEQ) => {
                    head.queue_head = rows::decode_head(&value)?
                }
                (section::ENROLLMENT, rows::WEBHOOK_NEXT_SEQ) => {
                    head.webhook_next_seq = rows::decode_head(&value)?
                }
                (section::DDM_STATE, _) => head.ddm.state = Some(value),
                (section::DDM_TIMELINE, _) => head.ddm.timeline = Some(value),
                _ => {}
            }
        }
        Ok(head)
    }

    /// The kept status reports as `(slot, numbered report)`, in slot order.
    pub(super) async fn read_reports(&self, id: &str) -> StoreResult<Vec<(i64, NumberedReport)>> {
        let found: Vec<(i64, Vec<u8>)> = self
            .rows(
                "ddm_reports",
                &self.statements.device_section,
                (id, section::REPORTS),
            )
            .await?;
        found
            .into_iter()
            .map(|(slot, v)| Ok((slot, rows::decode("status report", id, &v)?)))
            .collect()
    }

    pub(super) async fn page_enrollments(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        page_buckets(rows::ENROLLMENT_BUCKETS, after, limit, |bucket, from| {
            self.index_page(
                &self.statements.enrollment_index_page,
                "enrollment_ids",
                None,
                bucket,
                from,
                limit,
            )
        })
        .await
    }

    pub(super) async fn page_set_members(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        page_buckets(rows::SET_MEMBER_BUCKETS, after, limit, |bucket, from| {
            self.index_page(
                &self.statements.set_member_page,
                "set_members",
                Some(set),
                bucket,
                from,
                limit,
            )
        })
        .await
    }

    pub(super) async fn page_webhook_pending(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        page_buckets(rows::WEBHOOK_BUCKETS, after, limit, |bucket, from| {
            self.index_page(
                &self.statements.webhook_pending_page,
                "webhook_pending",
                None,
                bucket,
                from,
                limit,
            )
        })
        .await
    }

    /// The oldest events of the enrollment's outbox; when there are none, its
    /// `webhook_pending` row (if any) is a leftover of a crash and is deleted, at the
    /// timestamp of the newest event ever written (so a newer one's row stays), or, for
    /// an enrollment that never had an event written, at a timestamp old enough that no
    /// event being written now is hidden by it.
    pub(super) async fn read_webhook_events(
        &self,
        id: &str,
        limit: usize,
    ) -> StoreResult<Vec<WebhookEvent>> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let values: Vec<(Vec<u8>,)> = self
            .rows(
                "webhook_events",
                &self.statements.webhook_events,
                (id, limit),
            )
            .await?;
        if !values.is_empty() {
            return values
                .iter()
                .map(|(v,)| rows::decode("webhook event", id, v))
                .collect();
        }
        let next = self
            .blob(
                "webhook_events",
                &self.statements.device_row,
                (id, section::ENROLLMENT, rows::WEBHOOK_NEXT_SEQ),
            )
            .await?;
        let newest = match next {
            Some(next) => rows::seq_to_cql(rows::decode_head(&next)?.saturating_sub(1)),
            None => rows::now_micros() - UNWRITTEN_HINT_AGE_MICROS,
        };
        let key = super::writes::webhook_pending_key(newest, id);
        self.execute(
            "webhook_events",
            &self.statements.delete_webhook_pending,
            key,
        )
        .await?;
        Ok(Vec::new())
    }

    /// Ids of one index bucket after `from`; `set` names the set for `set_members`.
    async fn index_page(
        &self,
        statement: &scylla::statement::prepared::PreparedStatement,
        op: &'static str,
        set: Option<&str>,
        bucket: i32,
        from: String,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let ids: Vec<(String,)> = match set {
            Some(set) => self.rows(op, statement, (set, bucket, from, limit)).await?,
            None => self.rows(op, statement, (bucket, from, limit)).await?,
        };
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// Enrollment and DDM rows of enrollments that have a DDM state, walking the
    /// enrollment index.
    pub(super) async fn page_fleet_rows(
        &self,
        after: Option<&str>,
        limit: usize,
        wanted: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> StoreResult<Vec<(String, FleetRows)>> {
        let mut found = Vec::new();
        let mut cursor = after.map(str::to_string);
        while found.len() < limit {
            let ids = self.page_enrollments(cursor.as_deref(), limit).await?;
            let exhausted = ids.len() < limit;
            cursor = ids.last().cloned();
            let ids = ids.into_iter().filter(|id| wanted(id));
            let heads: Vec<(String, DeviceHead)> = stream::iter(ids)
                .map(|id| async move {
                    let head = self.read_head(&id, section::WAKE).await?;
                    StoreResult::Ok((id, head))
                })
                .buffered(FLEET_FETCH_AHEAD)
                .try_collect()
                .await?;
            for (id, head) in heads {
                if head.ddm.state.is_none() {
                    continue;
                }
                let enrollment = head
                    .enrollment
                    .map(|v| rows::decode("enrollment", &id, &v))
                    .transpose()?;
                let rows = FleetRows {
                    enrollment,
                    ddm: head.ddm,
                };
                found.push((id, rows));
            }
            if exhausted {
                break;
            }
        }
        found.truncate(limit);
        Ok(found)
    }
}

/// Fill a page of at most `limit` ids from consecutive buckets, starting in the bucket
/// of `after` (strictly after it) or in bucket 0.
async fn page_buckets<F, Fut>(
    buckets: i32,
    after: Option<&str>,
    limit: usize,
    page: F,
) -> StoreResult<Vec<String>>
where
    F: Fn(i32, String) -> Fut,
    Fut: Future<Output = StoreResult<Vec<String>>>,
{
    if limit == 0 {
        return Ok(Vec::new());
    }
    let start = after.map_or(0, |id| rows::bucket(id, buckets));
    let mut pages = stream::iter(start..buckets)
        .map(|bucket| {
            let from = if bucket == start {
                after.unwrap_or("")
            } else {
                ""
            };
            page(bucket, from.to_string())
        })
        .buffered(BUCKETS_AHEAD);
    let mut ids = Vec::new();
    while let Some(found) = pages.next().await {
        ids.extend(found?);
        if ids.len() >= limit {
            ids.truncate(limit);
            break;
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cassandra_read_statistics_are_summed_over_replicas() {
        let trace = ReadTrace::from_events(vec![
            "Executing single-partition query on devices".into(),
            "Read 2 live rows and 0 tombstone cells".into(),
            "Read 2 live rows and 10000 tombstone cells".into(),
        ]);
        assert_eq!((trace.live_rows, trace.tombstones), (4, 10_000));
        assert_eq!(trace.events.len(), 3);
    }

    #[test]
    fn scylla_page_statistics_count_dead_rows_and_range_tombstones() {
        let trace = ReadTrace::from_events(vec![
            "Page stats: 1 partition(s), 0 static row(s) (0 live, 0 dead), 3 clustering row(s) (2 live, 1 dead) and 4 range tombstone(s)".into(),
        ]);
        assert_eq!((trace.live_rows, trace.tombstones), (2, 5));
    }

    #[test]
    fn events_without_statistics_count_nothing() {
        let trace =
            ReadTrace::from_events(vec!["Parsing SELECT".into(), "Request complete".into()]);
        assert_eq!((trace.live_rows, trace.tombstones), (0, 0));
    }
}
