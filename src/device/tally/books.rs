//! The tally's books: which shards this node counts, and under which facts each of their
//! enrollments is counted. Pure (no lock, no I/O, no clock): [`super::FleetTally`] keeps
//! them behind a mutex and runs the walks that recount shards.
//!
//! A shard's counts are exact only while one node writes its rows, and the node that
//! takes a shard does not know what the previous owner wrote: it recounts the shard from
//! the store, by a walk that runs while its devices are already served. A write during
//! that walk may land before or after the walk reads the enrollment, so enrollments of a
//! shard written since it was taken are set aside ("touched", registered *before* the
//! write is sent) and the walk skips them; when the walk ends, each touched enrollment is
//! counted once, with its newest facts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Counted, WriteOutcome};
use crate::cluster::{shard_of, ShardId, VIRTUAL_SHARDS};
use crate::ddm::fleet::{FleetCounts, FleetFacts};
use crate::store::EnrollmentFilter;

#[derive(Default)]
pub(super) struct Books {
    /// The counted shards summed: what the fleet views read.
    total: FleetCounts,
    /// The shards this node holds, and how far their counts are.
    shards: HashMap<ShardId, Shard>,
    /// Enrollments of waiting and recounting shards written since their shard was taken.
    touched: HashMap<String, Touched>,
    /// Enrollments of counted shards whose last write has an unknown outcome, with what
    /// the counts hold for them until their actor reloads.
    uncertain: HashMap<String, Counted>,
    /// Enrollments read by the walk in progress (or the last one).
    walked: u64,
}

enum Shard {
    /// Taken; the next walk recounts it.
    Waiting,
    /// The walk in progress recounts it: what the walk has read so far.
    Recounting(FleetCounts),
    /// Counted, and part of the total.
    Counted(FleetCounts),
}

struct Touched {
    /// What the enrollment was counted as when it was touched.
    before: Counted,
    /// What it should be counted as when the walk ends.
    current: Counted,
    /// The walk met the enrollment after it was touched (and so did not count it).
    met_by_walk: bool,
    /// Touched during the walk of its shard: the walk may have counted `before` already.
    walk_may_have_counted: bool,
    uncertain: bool,
}

/// Where an enrollment's shard stands on this node.
enum Standing {
    NotHeld,
    BeingRecounted,
    Counted,
}

impl Books {
    fn standing(&self, id: &str) -> Standing {
        match self.shards.get(&shard_of(id)) {
            None => Standing::NotHeld,
            Some(Shard::Counted(_)) => Standing::Counted,
            Some(Shard::Waiting | Shard::Recounting(_)) => Standing::BeingRecounted,
        }
    }

    /// Hold `shards` from now on (they wait for the next walk); true when any is new.
    pub fn take(&mut self, shards: impl IntoIterator<Item = ShardId>) -> bool {
        let mut new = false;
        for shard in shards {
            self.shards.entry(shard).or_insert_with(|| {
                new = true;
                Shard::Waiting
            });
        }
        new
    }

    /// Stop counting `shards`: another node counts them now.
    pub fn release(&mut self, shards: &HashSet<ShardId>) {
        for shard in shards {
            if let Some(Shard::Counted(counts)) = self.shards.remove(shard) {
                for (facts, n) in counts.classes() {
                    self.total.remove_many(facts, n);
                }
            }
        }
        let of_released = |id: &String| shards.contains(&shard_of(id));
        self.touched.retain(|id, _| !of_released(id));
        self.uncertain.retain(|id, _| !of_released(id));
    }

    /// An actor loaded rows reducing to `loaded`: what the counts hold for it from now on
    /// (an uncertain earlier write is settled here).
    pub fn activated(&mut self, id: &str, loaded: Option<FleetFacts>) -> Counted {
        match self.standing(id) {
            Standing::NotHeld => loaded.map(Arc::new),
            Standing::BeingRecounted => match self.touched.get_mut(id) {
                Some(touched) => {
                    if touched.uncertain {
                        touched.uncertain = false;
                        touched.current = loaded.map(Arc::new);
                    }
                    touched.current.clone()
                }
                None => loaded.map(Arc::new),
            },
            Standing::Counted => match self.uncertain.remove(id) {
                Some(held) => {
                    metrics::counter!("orchard_fleet_tally_settled_total").increment(1);
                    self.replace(id, &held, loaded.as_ref())
                }
                None => loaded.map(Arc::new),
            },
        }
    }

    /// An actor is about to send a write that moves its enrollment away from `counted`.
    pub fn writing(&mut self, id: &str, counted: &Counted) {
        let recounting = match self.shards.get(&shard_of(id)) {
            Some(Shard::Waiting) => false,
            Some(Shard::Recounting(_)) => true,
            _ => return,
        };
        self.touched
            .entry(id.to_string())
            .or_insert_with(|| Touched {
                before: counted.clone(),
                current: counted.clone(),
                met_by_walk: false,
                walk_may_have_counted: recounting,
                uncertain: false,
            });
    }

    /// That write ended; answers what the counts now hold for the enrollment.
    pub fn written(&mut self, id: &str, counted: &Counted, outcome: WriteOutcome) -> Counted {
        match self.standing(id) {
            Standing::NotHeld => match outcome {
                WriteOutcome::Written(facts) => facts.map(Arc::new),
                WriteOutcome::Unknown => counted.clone(),
            },
            Standing::BeingRecounted => {
                // A write sent before the shard was taken here was never registered: what
                // the walk read of it is unknown, so its next activation settles it.
                let late = !self.touched.contains_key(id);
                self.writing(id, counted);
                let touched = self.touched.get_mut(id).expect("registered");
                touched.uncertain |= late;
                match outcome {
                    WriteOutcome::Written(facts) => touched.current = facts.map(Arc::new),
                    WriteOutcome::Unknown => touched.uncertain = true,
                }
                touched.current.clone()
            }
            Standing::Counted => match outcome {
                WriteOutcome::Written(facts) => self.replace(id, counted, facts.as_ref()),
                WriteOutcome::Unknown => {
                    metrics::counter!("orchard_fleet_tally_uncertain_total").increment(1);
                    self.uncertain.insert(id.to_string(), counted.clone());
                    counted.clone()
                }
            },
        }
    }

    /// Move one enrollment of a counted shard from `old` to `new` facts; returns the
    /// shared copy of `new`.
    fn replace(&mut self, id: &str, old: &Counted, new: Option<&FleetFacts>) -> Counted {
        if old.as_deref() == new {
            return old.clone();
        }
        let Some(Shard::Counted(shard)) = self.shards.get_mut(&shard_of(id)) else {
            return new.cloned().map(Arc::new);
        };
        if let Some(old) = old {
            if !(shard.remove(old) && self.total.remove(old)) {
                tracing::error!(
                    enrollment_id = id,
                    "fleet tally: removing facts that were not counted"
                );
                metrics::counter!("orchard_fleet_tally_mismatches_total").increment(1);
            }
        }
        new.map(|new| {
            let shared = self.total.add(new);
            shard.add_shared(&shared, 1);
            shared
        })
    }

    /// Start a walk over the waiting shards; false when none waits.
    pub fn begin_walk(&mut self) -> bool {
        let mut any = false;
        for shard in self.shards.values_mut() {
            if matches!(shard, Shard::Waiting) {
                *shard = Shard::Recounting(FleetCounts::default());
                any = true;
            }
        }
        self.walked = 0;
        any
    }

    /// Which enrollments the walk in progress reads: those of the shards it recounts.
    pub fn recounted_enrollments(&self) -> EnrollmentFilter {
        let mut recounted = vec![false; VIRTUAL_SHARDS as usize];
        for (shard, tally) in &self.shards {
            recounted[shard.0 as usize] = matches!(tally, Shard::Recounting(_));
        }
        Arc::new(move |id| recounted[shard_of(id).0 as usize])
    }

    /// Whether the walk in progress still has a shard to recount (they may all have been
    /// released meanwhile).
    pub fn recounting(&self) -> bool {
        self.shards
            .values()
            .any(|shard| matches!(shard, Shard::Recounting(_)))
    }

    /// Count what the walk read, for the shards it recounts, except enrollments written
    /// since their shard was taken. Answers the enrollments read so far.
    pub fn count_walked(&mut self, page: Vec<(String, FleetFacts)>) -> u64 {
        for (id, facts) in page {
            let Some(Shard::Recounting(counts)) = self.shards.get_mut(&shard_of(&id)) else {
                continue;
            };
            self.walked += 1;
            match self.touched.get_mut(&id) {
                Some(touched) => touched.met_by_walk = true,
                None => {
                    counts.add(&facts);
                }
            }
        }
        self.walked
    }

    /// End the walk: fold the touched enrollments of the recounted shards into their
    /// counts, and add those to the total. Answers the shards now counted.
    pub fn finish_walk(&mut self) -> usize {
        let recounted: HashSet<ShardId> = self
            .shards
            .iter()
            .filter(|(_, shard)| matches!(shard, Shard::Recounting(_)))
            .map(|(&id, _)| id)
            .collect();
        let (touched, rest): (HashMap<String, Touched>, _) = std::mem::take(&mut self.touched)
            .into_iter()
            .partition(|(id, _)| recounted.contains(&shard_of(id)));
        self.touched = rest;
        for (id, touched) in touched {
            let Some(Shard::Recounting(counts)) = self.shards.get_mut(&shard_of(&id)) else {
                continue;
            };
            if touched.walk_may_have_counted && !touched.met_by_walk {
                if let Some(before) = &touched.before {
                    // The walk read it before the first write and counted it as it was.
                    counts.remove(before);
                }
            }
            if let Some(current) = &touched.current {
                counts.add(current);
            }
            if touched.uncertain {
                self.uncertain.insert(id, touched.current);
            }
        }
        for shard in recounted {
            let Some(Shard::Recounting(recount)) = self.shards.remove(&shard) else {
                continue;
            };
            let mut counts = FleetCounts::default();
            for (facts, n) in recount.classes() {
                let shared = self.total.add_many(facts, n);
                counts.add_shared(&shared, n);
            }
            self.shards.insert(shard, Shard::Counted(counts));
        }
        self.counted_shards().len()
    }

    /// The shards whose counts are in the total, in order.
    pub fn counted_shards(&self) -> Vec<u32> {
        let mut counted: Vec<u32> = self
            .shards
            .iter()
            .filter(|(_, shard)| matches!(shard, Shard::Counted(_)))
            .map(|(id, _)| id.0)
            .collect();
        counted.sort_unstable();
        counted
    }

    pub fn walked(&self) -> u64 {
        self.walked
    }

    pub fn total(&self) -> &FleetCounts {
        &self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddm::catalog::ManifestSnapshot;
    use crate::ddm::fleet::ManifestLookup;
    use crate::ddm::sync::DdmState;
    use crate::ddm::Declaration;
    use std::collections::{BTreeMap, BTreeSet};

    /// Facts that differ only in their one assigned set, named `set`.
    fn facts(set: &str) -> FleetFacts {
        let state = DdmState {
            sets: [set.to_string()].into(),
            ..DdmState::default()
        };
        FleetFacts::default().with_state(&state)
    }

    /// Enrollments counted per set (each set's manifest holds one declaration named so).
    fn counted(books: &Books) -> BTreeMap<String, u64> {
        let manifest_of = |sets: &BTreeSet<String>| {
            let declarations = sets.iter().map(|set| {
                let json = format!(r#"{{"Type":"com.apple.configuration.management.test","Identifier":"{set}","Payload":{{"Echo":"x"}}}}"#);
                Arc::new(Declaration::from_api_json(json.as_bytes(), 0).unwrap().0)
            });
            Arc::new(ManifestSnapshot::from_declarations(declarations.collect()))
        };
        let view = books
            .total()
            .declarations(&mut ManifestLookup::new(&manifest_of));
        view.into_iter()
            .map(|(id, counts)| (id, counts["assigned"]))
            .collect()
    }

    fn expect(books: &Books, sets: &[(&str, u64)]) {
        let expected = sets.iter().map(|(s, n)| (s.to_string(), *n)).collect();
        assert_eq!(counted(books), expected);
    }

    fn walked(books: &mut Books, page: &[(&str, &str)]) {
        let page = page.iter().map(|(id, set)| (id.to_string(), facts(set)));
        books.count_walked(page.collect());
    }

    /// Books holding every shard, recounted by a walk that has begun.
    fn walking() -> Books {
        let mut books = Books::default();
        books.take((0..crate::cluster::VIRTUAL_SHARDS).map(ShardId));
        assert!(books.begin_walk());
        books
    }

    fn counted_everything() -> Books {
        let mut books = walking();
        books.finish_walk();
        books
    }

    /// Two enrollment ids on different shards.
    fn ids_on_two_shards() -> (String, String) {
        let first = "device-0".to_string();
        let other = (1..)
            .map(|n| format!("device-{n}"))
            .find(|id| shard_of(id) != shard_of(&first))
            .unwrap();
        (first, other)
    }

    #[test]
    fn a_write_after_the_walk_read_the_enrollment_moves_it() {
        let mut books = walking();
        walked(&mut books, &[("d1", "a"), ("d2", "a")]);
        let before = books.activated("d1", Some(facts("a")));
        books.writing("d1", &before);
        books.written("d1", &before, WriteOutcome::Written(Some(facts("b"))));
        books.finish_walk();
        expect(&books, &[("a", 1), ("b", 1)]);
    }

    #[test]
    fn a_write_before_the_walk_reaches_the_enrollment_is_counted_once() {
        let mut books = walking();
        let before = books.activated("d1", Some(facts("a")));
        books.writing("d1", &before);
        books.written("d1", &before, WriteOutcome::Written(Some(facts("b"))));
        // The walk reads the new rows (or the old ones): either way it leaves d1 alone.
        walked(&mut books, &[("d1", "b"), ("d2", "a")]);
        books.finish_walk();
        expect(&books, &[("a", 1), ("b", 1)]);
    }

    #[test]
    fn a_write_in_flight_when_the_walk_ends_lands_on_the_finished_counts() {
        let mut books = walking();
        let before = books.activated("d1", Some(facts("a")));
        books.writing("d1", &before);
        walked(&mut books, &[("d1", "a")]);
        books.finish_walk();
        expect(&books, &[("a", 1)]);
        let now = books.written("d1", &before, WriteOutcome::Written(Some(facts("b"))));
        assert_eq!(now.as_deref(), Some(&facts("b")));
        expect(&books, &[("b", 1)]);
    }

    #[test]
    fn an_enrollment_created_during_the_walk_is_counted_once() {
        let mut books = walking();
        let before = books.activated("new", None);
        books.writing("new", &before);
        books.written("new", &before, WriteOutcome::Written(Some(facts("a"))));
        walked(&mut books, &[("old", "a")]);
        books.finish_walk();
        expect(&books, &[("a", 2)]);
    }

    #[test]
    fn a_write_with_an_unknown_outcome_is_settled_by_the_next_activation() {
        let mut books = counted_everything();
        let before = books.activated("d1", None);
        books.writing("d1", &before);
        let counted = books.written("d1", &before, WriteOutcome::Written(Some(facts("a"))));
        books.writing("d1", &counted);
        books.written("d1", &counted, WriteOutcome::Unknown);
        expect(&books, &[("a", 1)]);
        // The write did land: the reloaded rows say so.
        books.activated("d1", Some(facts("b")));
        expect(&books, &[("b", 1)]);
        // Settled once: a later activation of the same rows changes nothing.
        books.activated("d1", Some(facts("b")));
        expect(&books, &[("b", 1)]);
    }

    #[test]
    fn an_unknown_outcome_during_the_walk_is_settled_after_it() {
        let mut books = walking();
        walked(&mut books, &[("d1", "a")]);
        let before = books.activated("d1", Some(facts("a")));
        books.writing("d1", &before);
        books.written("d1", &before, WriteOutcome::Unknown);
        books.finish_walk();
        expect(&books, &[("a", 1)]);
        books.activated("d1", Some(facts("b")));
        expect(&books, &[("b", 1)]);
    }

    #[test]
    fn a_node_counts_only_the_shards_it_holds() {
        let (mine, theirs) = ids_on_two_shards();
        let mut books = Books::default();
        books.take([shard_of(&mine)]);
        assert!(books.begin_walk());
        walked(&mut books, &[(&mine, "a"), (&theirs, "a")]);
        // Writes to a shard held elsewhere are not counted here.
        let before = books.activated(&theirs, Some(facts("a")));
        books.writing(&theirs, &before);
        books.written(&theirs, &before, WriteOutcome::Written(Some(facts("b"))));
        assert_eq!(books.finish_walk(), 1);
        assert_eq!(books.counted_shards(), vec![shard_of(&mine).0]);
        expect(&books, &[("a", 1)]);
    }

    #[test]
    fn a_released_shard_leaves_the_total_and_a_taken_one_waits_for_its_recount() {
        let (stays, moves) = ids_on_two_shards();
        let mut books = walking();
        walked(&mut books, &[(&stays, "a"), (&moves, "b")]);
        books.finish_walk();
        expect(&books, &[("a", 1), ("b", 1)]);
        books.release(&HashSet::from([shard_of(&moves)]));
        expect(&books, &[("a", 1)]);
        assert!(!books.counted_shards().contains(&shard_of(&moves).0));

        // Taken back later: the other node changed it meanwhile, so it is recounted, and
        // a write made while it waits for the walk wins over what the walk reads.
        books.take([shard_of(&moves)]);
        let before = books.activated(&moves, Some(facts("c")));
        books.writing(&moves, &before);
        books.written(&moves, &before, WriteOutcome::Written(Some(facts("d"))));
        assert!(books.begin_walk());
        walked(&mut books, &[(&stays, "a"), (&moves, "c")]);
        books.finish_walk();
        expect(&books, &[("a", 1), ("d", 1)]);
    }

    #[test]
    fn a_shard_released_during_its_recount_is_not_counted() {
        let (stays, moves) = ids_on_two_shards();
        let mut books = walking();
        walked(&mut books, &[(&moves, "b")]);
        books.release(&HashSet::from([shard_of(&moves)]));
        walked(&mut books, &[(&stays, "a")]);
        books.finish_walk();
        expect(&books, &[("a", 1)]);
    }

    #[test]
    fn a_write_that_began_before_the_shard_was_taken_is_settled_by_its_reload() {
        let (id, _) = ids_on_two_shards();
        let mut books = Books::default();
        books.take([shard_of(&id)]);
        assert!(books.begin_walk());
        // The write was sent by an actor of an earlier ownership: never registered.
        let stale = Some(Arc::new(facts("a")));
        books.written(&id, &stale, WriteOutcome::Written(Some(facts("b"))));
        walked(&mut books, &[(&id, "b")]);
        books.finish_walk();
        expect(&books, &[("b", 1)]);
        books.activated(&id, Some(facts("b")));
        expect(&books, &[("b", 1)]);
    }
}
