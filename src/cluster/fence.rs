//! Fencing by write timestamp.
//!
//! CQL resolves two writes of one cell by their timestamps: the larger wins, whenever it
//! arrives. A shard's lease epoch grows every time the shard changes owner, so if every
//! write about a device carries `epoch × EPOCH_STRIDE + clock`, a write made under an older
//! epoch loses to every write made under a newer one — even when a paused node resumes and
//! its write reaches the database last. The stride is 2^48 µs (8.9 years), so the order
//! holds unless the stale owner's clock runs that far ahead of the new owner's.
//!
//! Epoch 0 is the single-node deployment: its timestamps are the plain clock, which keeps
//! data written before a keyspace became a cluster readable and overwritable.

/// Microseconds between two epochs' timestamp ranges.
const EPOCH_STRIDE: i64 = 1 << 48;

/// Largest epoch whose timestamps still fit a CQL timestamp (`i64`) with any clock before
/// 2^52 µs (the year 2112) added.
pub const MAX_EPOCH: u64 = ((i64::MAX - (1 << 52)) / EPOCH_STRIDE) as u64;

/// The write timestamp of a write made at `clock_micros` by the owner of lease `epoch`.
pub fn fenced_timestamp(epoch: u64, clock_micros: i64) -> i64 {
    let epoch = epoch.min(MAX_EPOCH) as i64;
    epoch * EPOCH_STRIDE + clock_micros
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03 in microseconds since the Unix epoch.
    const NOW: i64 = 1_796_256_000_000_000;
    const DAY: i64 = 86_400_000_000;

    #[test]
    fn a_newer_epoch_wins_even_against_a_clock_a_year_ahead() {
        let stale = fenced_timestamp(7, NOW + 365 * DAY);
        let new_owner = fenced_timestamp(8, NOW);
        assert!(new_owner > stale);
    }

    #[test]
    fn within_an_epoch_the_clock_orders_writes() {
        assert!(fenced_timestamp(3, NOW + 1) > fenced_timestamp(3, NOW));
    }

    #[test]
    fn epoch_zero_is_the_plain_clock() {
        assert_eq!(fenced_timestamp(0, NOW), NOW);
    }

    #[test]
    fn the_largest_epoch_fits_a_cql_timestamp_until_2112() {
        let far_future = (1 << 52) - 1;
        assert!(
            fenced_timestamp(MAX_EPOCH, far_future) > fenced_timestamp(MAX_EPOCH - 1, far_future)
        );
        assert!(fenced_timestamp(MAX_EPOCH + 10, far_future) > 0);
        const { assert!(MAX_EPOCH > 30_000, "thousands of takeovers per shard") };
    }
}
