//! Where each record lives in the CQL tables (`schema.cql`), and the pure rules for
//! buckets, write timestamps and encodings. No I/O.

use std::sync::atomic::{AtomicI64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::{StoreError, StoreResult};

/// Row sections of a `devices` partition: `(section, seq)` is its clustering key.
pub mod section {
    /// `(0, 0)`: the enrollment record; `(0, 1)`: the queue head.
    pub const ENROLLMENT: i8 = 0;
    pub const DDM_STATE: i8 = 1;
    pub const DDM_TIMELINE: i8 = 2;
    pub const WAKE: i8 = 3;
    /// `(4, seq)`: pending queue entries.
    pub const QUEUE: i8 = 4;
    /// `(5, slot)`: the ring of kept status reports.
    pub const REPORTS: i8 = 5;
    /// `(6, 0, command UUID)`: command results.
    pub const RESULTS: i8 = 6;
    /// `(7, seq)`: the webhook outbox, in delivery order.
    pub const WEBHOOK: i8 = 7;
    /// Sections read together when an actor activates (everything before the queue).
    pub const HEAD_END: i8 = QUEUE;
}

/// `seq` of the queue-head row in the enrollment section.
pub const QUEUE_HEAD_SEQ: i64 = 1;
/// `seq` of the row in the enrollment section holding one past the highest webhook event
/// sequence ever written (encoded like the queue head).
pub const WEBHOOK_NEXT_SEQ: i64 = 2;

/// How long a command result is kept (90 days).
pub const RESULT_TTL_SECS: i32 = 90 * 24 * 3600;

/// Buckets of `enrollment_index`.
pub const ENROLLMENT_BUCKETS: i32 = 256;
/// Buckets per set in `set_members`.
pub const SET_MEMBER_BUCKETS: i32 = 64;
/// Parts of the re-push schedule (`wakes`, `wake_minutes`).
pub const WAKE_PARTS: i32 = 16;
/// Buckets of `webhook_pending`.
pub const WEBHOOK_BUCKETS: i32 = 64;

/// The bucket of `id` among `buckets`: a fixed hash (xxh3), the same on every node and
/// in every version, since rows are found by it.
pub fn bucket(id: &str, buckets: i32) -> i32 {
    (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % buckets as u64) as i32
}

/// The minute bucket of a Unix time.
pub fn minute_of(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(60)
}

/// Queue sequence numbers are clock microseconds, far below `i64::MAX`.
pub fn seq_to_cql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Write timestamps (microseconds) that grow strictly within this process, so that of
/// two writes to one row in one batch (a queue cleared, then refilled) the later wins,
/// and a retried statement keeps the timestamp it was planned with.
#[derive(Debug, Default)]
pub struct WriteClock {
    last: AtomicI64,
}

impl WriteClock {
    /// `count` consecutive timestamps, the first returned.
    pub fn reserve(&self, count: usize, now_micros: i64) -> i64 {
        let count = count.max(1) as i64;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let first = now_micros.max(last + 1);
            match self.last.compare_exchange_weak(
                last,
                first + count - 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return first,
                Err(seen) => last = seen,
            }
        }
    }
}

/// The timestamp of a write-once row: it decreases as time passes, so the first write
/// under a key carries the highest timestamp and every later one loses to it.
pub fn write_once_timestamp(now_micros: i64) -> i64 {
    (1_i64 << 62) - now_micros
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|e| StoreError::Backend(format!("encode: {e}")))
}

pub fn decode<T: DeserializeOwned>(kind: &str, key: &str, bytes: &[u8]) -> StoreResult<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{kind} {key}: {e}")))
}

/// The queue head row's value: a big-endian sequence number.
pub fn encode_head(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

pub fn decode_head(bytes: &[u8]) -> StoreResult<u64> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("queue head is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// A kept status report with its position in the device's report sequence, which
/// orders the ring of report slots.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct NumberedReport {
    pub number: u64,
    pub report: crate::store::StoredReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("device-1", 256), bucket("device-1", 256));
        let used: std::collections::HashSet<i32> = (0..4096)
            .map(|i| bucket(&format!("enrollment-{i}"), 256))
            .collect();
        assert!(used.len() > 250, "4096 ids fill almost every bucket");
        assert!(used.iter().all(|b| (0..256).contains(b)));
    }

    #[test]
    fn write_timestamps_grow_even_when_the_clock_stands_still_or_goes_back() {
        let clock = WriteClock::default();
        let a = clock.reserve(3, 1_000);
        let b = clock.reserve(1, 1_000);
        let c = clock.reserve(1, 10);
        assert_eq!(a, 1_000);
        assert_eq!(b, 1_003);
        assert_eq!(c, 1_004);
    }

    #[test]
    fn an_earlier_write_once_row_outranks_a_later_one() {
        assert!(write_once_timestamp(1_000) > write_once_timestamp(2_000));
        assert!(write_once_timestamp(now_micros()) > 0);
    }

    #[test]
    fn minutes_round_down_also_before_the_epoch() {
        assert_eq!(minute_of(59), 0);
        assert_eq!(minute_of(60), 1);
        assert_eq!(minute_of(-1), -1);
    }

    #[test]
    fn the_queue_head_round_trips_and_rejects_other_lengths() {
        assert_eq!(decode_head(&encode_head(42)).unwrap(), 42);
        assert!(decode_head(&[1, 2]).is_err());
    }
}
