//! The per-enrollment command queue as pure data: which command goes out next, and what a
//! device's report does to the queue. No I/O — the device actor persists what this decides.
//!
//! Semantics (protocol.md §3.3, NanoMDM-compatible):
//! * FIFO within priority: higher `priority` first, then lower `seq`.
//! * When the current report is `NotNow`, the next command is the first one that has
//!   never been answered `NotNow`; any other report makes NotNow'd commands eligible again.
//! * A command whose results repeatedly cannot be parsed is parked so that it can never
//!   block the head of the queue (the classic MicroMDM failure).

use std::sync::Arc;

use crate::store::{QueueEntry, StoredCommand};

/// Unparseable results after which a command is parked.
pub const PARK_AFTER_UNPARSEABLE_RESULTS: u32 = 3;

/// A queued command with its body, shared between every device it was enqueued to.
#[derive(Clone, Debug)]
pub struct Pending {
    pub entry: QueueEntry,
    pub command: Arc<StoredCommand>,
}

/// An enrollment's pending commands, kept in delivery order.
#[derive(Debug, Default)]
pub struct CommandQueue {
    /// Sorted by (priority desc, seq asc).
    pending: Vec<Pending>,
    /// The command most recently handed to the device and not answered yet.
    in_flight: Option<u64>,
    /// Every sequence number below this one was used and is gone; a new entry never
    /// takes one of them, so a backend may start its queue reads here.
    floor: u64,
}

impl CommandQueue {
    /// The queue as loaded: its entries and the floor the store recorded (0 if none).
    pub fn from_pending(mut pending: Vec<Pending>, floor: u64) -> Self {
        pending.sort_by(|a, b| delivery_order(&a.entry, &b.entry));
        CommandQueue {
            pending,
            in_flight: None,
            floor,
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pending> {
        self.pending.iter()
    }

    /// The sequence number a newly enqueued command must take to stay after everything
    /// already queued, even if the clock went backwards.
    pub fn next_seq(&self, clock_seq: u64) -> u64 {
        let max_queued = self.pending.iter().map(|p| p.entry.seq).max().unwrap_or(0);
        clock_seq.max(max_queued + 1).max(self.floor)
    }

    /// The lowest sequence number that may still be pending: the smallest queued one,
    /// or the floor when the queue is empty (`Mutation::RemoveQueueEntry::pending_from`).
    pub fn pending_from(&self) -> u64 {
        self.pending
            .iter()
            .map(|p| p.entry.seq)
            .min()
            .unwrap_or(self.floor)
    }

    /// Insert keeping delivery order. A command UUID already queued is not queued twice.
    pub fn push(&mut self, pending: Pending) -> bool {
        if self.position(&pending.entry.command_uuid).is_some() {
            return false;
        }
        let at = self
            .pending
            .partition_point(|p| delivery_order(&p.entry, &pending.entry).is_lt());
        self.pending.insert(at, pending);
        true
    }

    pub fn get(&self, command_uuid: &str) -> Option<&Pending> {
        self.position(command_uuid).map(|i| &self.pending[i])
    }

    /// Remove the command (answered or cancelled) and return it.
    pub fn remove(&mut self, command_uuid: &str) -> Option<Pending> {
        let removed = self.pending.remove(self.position(command_uuid)?);
        self.floor = self.floor.max(removed.entry.seq + 1);
        if self.in_flight == Some(removed.entry.seq) {
            self.in_flight = None;
        }
        Some(removed)
    }

    pub fn clear(&mut self) {
        let max_queued = self.pending.iter().map(|p| p.entry.seq + 1).max();
        self.floor = self.floor.max(max_queued.unwrap_or(0));
        self.pending.clear();
        self.in_flight = None;
    }

    /// Record a NotNow answer; returns the updated entry to persist.
    pub fn mark_not_now(&mut self, command_uuid: &str, now: i64) -> Option<QueueEntry> {
        let i = self.position(command_uuid)?;
        let entry = &mut self.pending[i].entry;
        entry.not_now_count += 1;
        entry.last_not_now_at = Some(now);
        self.in_flight = None;
        Some(entry.clone())
    }

    /// Record that the device's answer to the in-flight command could not be parsed;
    /// returns the updated entry (parked once the limit is reached) to persist.
    pub fn mark_unparseable_result(&mut self) -> Option<QueueEntry> {
        let seq = self.in_flight.take()?;
        let entry = &mut self.pending.iter_mut().find(|p| p.entry.seq == seq)?.entry;
        entry.unparseable_results += 1;
        entry.parked = entry.unparseable_results >= PARK_AFTER_UNPARSEABLE_RESULTS;
        Some(entry.clone())
    }

    /// The next command to send, given whether the report being answered is `NotNow`.
    /// Marks it in flight.
    pub fn next(&mut self, answering_not_now: bool) -> Option<&Pending> {
        let next = self
            .pending
            .iter()
            .find(|p| sendable(&p.entry, answering_not_now))?;
        self.in_flight = Some(next.entry.seq);
        Some(next)
    }

    /// Commands that can still be delivered (not parked).
    pub fn deliverable(&self) -> usize {
        self.pending.iter().filter(|p| !p.entry.parked).count()
    }

    fn position(&self, command_uuid: &str) -> Option<usize> {
        self.pending
            .iter()
            .position(|p| p.entry.command_uuid == command_uuid)
    }
}

/// Parked commands are never sent; NotNow'd ones are skipped while answering a NotNow.
fn sendable(entry: &QueueEntry, answering_not_now: bool) -> bool {
    let skipped_for_not_now = answering_not_now && entry.not_now_count > 0;
    !entry.parked && !skipped_for_not_now
}

fn delivery_order(a: &QueueEntry, b: &QueueEntry) -> std::cmp::Ordering {
    b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(uuid: &str, seq: u64, priority: u8) -> Pending {
        Pending {
            entry: QueueEntry {
                seq,
                command_uuid: uuid.into(),
                request_type: "ProfileList".into(),
                priority,
                enqueued_at: 0,
                not_now_count: 0,
                last_not_now_at: None,
                unparseable_results: 0,
                parked: false,
            },
            command: Arc::new(StoredCommand {
                command_uuid: uuid.into(),
                request_type: "ProfileList".into(),
                body: Vec::new(),
            }),
        }
    }

    fn next_uuid(queue: &mut CommandQueue, answering_not_now: bool) -> Option<String> {
        queue
            .next(answering_not_now)
            .map(|p| p.entry.command_uuid.clone())
    }

    #[test]
    fn commands_go_out_first_in_first_out_within_a_priority() {
        let mut q = CommandQueue::from_pending(vec![pending("b", 2, 0), pending("a", 1, 0)], 0);
        assert_eq!(next_uuid(&mut q, false).as_deref(), Some("a"));
        q.remove("a");
        assert_eq!(next_uuid(&mut q, false).as_deref(), Some("b"));
    }

    #[test]
    fn a_higher_priority_command_overtakes_older_ones() {
        let mut q = CommandQueue::default();
        q.push(pending("old", 1, 0));
        q.push(pending("urgent", 5, 9));
        q.push(pending("newer", 3, 0));
        assert_eq!(next_uuid(&mut q, false).as_deref(), Some("urgent"));
        let order: Vec<_> = q.iter().map(|p| p.entry.command_uuid.as_str()).collect();
        assert_eq!(order, ["urgent", "old", "newer"]);
    }

    #[test]
    fn the_same_command_uuid_is_never_queued_twice() {
        let mut q = CommandQueue::default();
        assert!(q.push(pending("a", 1, 0)));
        assert!(!q.push(pending("a", 2, 0)));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn answering_not_now_skips_every_command_already_answered_not_now() {
        let mut q = CommandQueue::from_pending(vec![pending("a", 1, 0), pending("b", 2, 0)], 0);
        q.next(false);
        q.mark_not_now("a", 100);
        assert_eq!(next_uuid(&mut q, true).as_deref(), Some("b"));
        q.mark_not_now("b", 101);
        assert_eq!(
            next_uuid(&mut q, true),
            None,
            "session ends: nothing new to offer"
        );
    }

    #[test]
    fn any_other_report_makes_not_now_commands_eligible_again() {
        let mut q = CommandQueue::from_pending(vec![pending("a", 1, 0)], 0);
        q.mark_not_now("a", 100);
        assert_eq!(next_uuid(&mut q, false).as_deref(), Some("a"));
        assert_eq!(q.get("a").unwrap().entry.not_now_count, 1);
    }

    #[test]
    fn repeated_unparseable_results_park_the_command_so_the_queue_moves_on() {
        let mut q = CommandQueue::from_pending(vec![pending("bad", 1, 0), pending("ok", 2, 0)], 0);
        for attempt in 1..=PARK_AFTER_UNPARSEABLE_RESULTS {
            assert_eq!(next_uuid(&mut q, false).as_deref(), Some("bad"));
            let entry = q.mark_unparseable_result().unwrap();
            assert_eq!(entry.parked, attempt == PARK_AFTER_UNPARSEABLE_RESULTS);
        }
        assert_eq!(next_uuid(&mut q, false).as_deref(), Some("ok"));
        assert_eq!(q.deliverable(), 1);
    }

    #[test]
    fn an_unparseable_result_with_nothing_in_flight_changes_nothing() {
        let mut q = CommandQueue::from_pending(vec![pending("a", 1, 0)], 0);
        assert!(q.mark_unparseable_result().is_none());
        assert_eq!(q.get("a").unwrap().entry.unparseable_results, 0);
    }

    #[test]
    fn new_sequence_numbers_stay_after_the_queue_even_if_the_clock_goes_back() {
        let q = CommandQueue::from_pending(vec![pending("a", 500, 0)], 0);
        assert_eq!(q.next_seq(10), 501);
        assert_eq!(q.next_seq(900), 900);
    }

    #[test]
    fn removed_sequence_numbers_are_never_taken_again_and_reads_may_start_past_them() {
        let mut q = CommandQueue::from_pending(vec![pending("a", 7, 0), pending("b", 9, 9)], 0);
        assert_eq!(q.pending_from(), 7);
        q.remove("b");
        assert_eq!(q.pending_from(), 7, "a is still pending");
        q.remove("a");
        assert_eq!(q.pending_from(), 10, "empty: past the highest removed");
        assert_eq!(
            q.next_seq(3),
            10,
            "a clock that went back cannot reuse them"
        );
    }

    #[test]
    fn a_loaded_floor_holds_after_reactivation() {
        let q = CommandQueue::from_pending(Vec::new(), 40);
        assert_eq!(q.pending_from(), 40);
        assert_eq!(q.next_seq(5), 40);
    }
}
