//! The re-push schedule. A wake lives in the device's partition (`(3, 0)`, the truth)
//! and as a hint in `wakes`, by due minute and part, with its minute listed in
//! `wake_minutes`. Rescheduling writes a new hint and leaves the old one: the sweep
//! checks each hint against the device's row and drops the stale ones, and drops a
//! part's minutes once they are empty and safely in the past. So no write reads first,
//! and the sweep reads only minutes that hold wakes.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::try_join_all;
use futures_util::{stream, StreamExt, TryStreamExt};
use scylla::value::CqlValue;

use super::rows::{self, section};
use super::ScyllaStore;
use crate::cluster::shard_of;
use crate::store::{StoreResult, WakeEntry};

/// Minutes this close to the wall clock are never dropped: a wake scheduled for them
/// could be in flight.
const DROP_MARGIN_MINUTES: i64 = 2;
/// Hints checked against device rows at once.
const CHECK_AHEAD: usize = 64;

/// One hint read from `wakes`.
#[derive(Clone, Debug)]
struct Hint {
    minute: i64,
    part: i32,
    due_at: i64,
    enrollment_id: String,
}

impl ScyllaStore {
    pub(super) async fn read_due_wakes(
        &self,
        now: i64,
        limit: usize,
    ) -> StoreResult<Vec<WakeEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let last_minute = rows::minute_of(now);
        let droppable_below = rows::minute_of(crate::device::now_secs()) - DROP_MARGIN_MINUTES;
        let minutes = self.scheduled_minutes(last_minute).await?;
        let mut due = Vec::new();
        // Per part, the minutes read so far that turned out empty, while no earlier
        // minute of the part held a live wake: those can be dropped.
        let mut drained: BTreeMap<i32, i64> = BTreeMap::new();
        let mut blocked: BTreeSet<i32> = BTreeSet::new();
        for (minute, parts) in minutes {
            let hints: Vec<Vec<Hint>> =
                try_join_all(parts.iter().map(|&part| self.hints(minute, part, now))).await?;
            for (part, hints) in parts.into_iter().zip(hints) {
                let live = self.check_hints(hints).await?;
                let empty = live.is_empty() && minute < last_minute;
                if empty && minute < droppable_below && !blocked.contains(&part) {
                    drained.insert(part, minute);
                } else {
                    blocked.insert(part);
                }
                due.extend(
                    live.into_iter()
                        .filter(|wake| self.holds(&wake.enrollment_id)),
                );
            }
            if due.len() >= limit {
                break;
            }
        }
        self.drop_minutes(drained).await?;
        due.sort_by(|a: &WakeEntry, b| {
            (a.due_at, &a.enrollment_id).cmp(&(b.due_at, &b.enrollment_id))
        });
        due.truncate(limit);
        Ok(due)
    }

    /// Whether this node decides the wakes of `id`: always on one node; in a cluster, while
    /// it holds the device's shard. Another node's live wakes are left in place (their
    /// minute is not drained), for their owner's sweep.
    fn holds(&self, id: &str) -> bool {
        self.fence
            .get()
            .is_none_or(|fence| fence.write_epoch(shard_of(id)).is_some())
    }

    /// Minutes up to `last_minute` that hold wakes, each with the parts that list it.
    async fn scheduled_minutes(&self, last_minute: i64) -> StoreResult<BTreeMap<i64, Vec<i32>>> {
        let per_part: Vec<(i32, Vec<(i64,)>)> =
            try_join_all((0..rows::WAKE_PARTS).map(|part| async move {
                let minutes = self
                    .rows(
                        "due_wakes",
                        &self.statements.wake_minutes,
                        (part, last_minute),
                    )
                    .await?;
                StoreResult::Ok((part, minutes))
            }))
            .await?;
        let mut by_minute: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
        for (part, minutes) in per_part {
            for (minute,) in minutes {
                by_minute.entry(minute).or_default().push(part);
            }
        }
        Ok(by_minute)
    }

    async fn hints(&self, minute: i64, part: i32, now: i64) -> StoreResult<Vec<Hint>> {
        let found: Vec<(i64, String)> = self
            .rows("due_wakes", &self.statements.wakes_due, (minute, part, now))
            .await?;
        Ok(found
            .into_iter()
            .map(|(due_at, enrollment_id)| Hint {
                minute,
                part,
                due_at,
                enrollment_id,
            })
            .collect())
    }

    /// The hints that match their device's scheduled wake; the others are deleted.
    async fn check_hints(&self, hints: Vec<Hint>) -> StoreResult<Vec<WakeEntry>> {
        let checked: Vec<(Hint, Option<WakeEntry>)> = stream::iter(hints)
            .map(|hint| async move {
                let wake = self.device_wake(&hint.enrollment_id).await?;
                StoreResult::Ok((hint, wake))
            })
            .buffered(CHECK_AHEAD)
            .try_collect()
            .await?;
        let mut live = Vec::new();
        for (hint, wake) in checked {
            match wake {
                Some(wake) if wake.due_at == hint.due_at => live.push(wake),
                _ => self.delete_hint(&hint).await?,
            }
        }
        Ok(live)
    }

    async fn device_wake(&self, id: &str) -> StoreResult<Option<WakeEntry>> {
        let key = (id, section::WAKE, 0_i64);
        self.record("due_wakes", &self.statements.device_row, key, ("wake", id))
            .await
    }

    async fn delete_hint(&self, hint: &Hint) -> StoreResult<()> {
        let stamp = self.clock.reserve(1, rows::now_micros());
        let values = vec![
            CqlValue::BigInt(stamp),
            CqlValue::BigInt(hint.minute),
            CqlValue::Int(hint.part),
            CqlValue::BigInt(hint.due_at),
            CqlValue::Text(hint.enrollment_id.clone()),
        ];
        self.execute("due_wakes", &self.statements.delete_wake, values)
            .await
            .map(drop)
    }

    /// Forget, per part, every minute up to the one given (one range delete each).
    async fn drop_minutes(&self, drained: BTreeMap<i32, i64>) -> StoreResult<()> {
        try_join_all(drained.into_iter().map(|(part, minute)| async move {
            let stamp = self.clock.reserve(1, rows::now_micros());
            self.execute(
                "due_wakes",
                &self.statements.drop_wake_minutes,
                (stamp, part, minute),
            )
            .await
        }))
        .await
        .map(drop)
    }
}
