//! The live fleet tally: [`FleetCounts`] kept equal to what the store holds, so the fleet
//! view and the fleet diagnosis never walk the fleet on a request.
//!
//! Who writes: only device actors change the rows the tally reduces (enrollment, DDM
//! state, timeline), and every actor knows what the tally counts for it (`counted`, the
//! facts of its rows as last durably written). After a successful write the actor moves
//! its one enrollment from the old facts to the new; after a failed write the outcome is
//! unknown (a CQL timeout may still have landed), so the enrollment is marked uncertain
//! and its next activation, which reads what is durable, settles it.
//!
//! Startup: the counts are rebuilt by one walk over the stored rows while the server
//! already serves devices (at a million enrollments on CQL the walk takes a minute). A
//! write during the walk may land before or after the walk reads that enrollment, so
//! enrollments written during the walk are set aside ("touched", registered *before*
//! the write is sent) and the walk skips them; when the walk ends, each touched
//! enrollment is counted once, with its newest facts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::ddm::catalog::ManifestSnapshot;
use crate::ddm::doctor::{EnrollmentFacts, RULES};
use crate::ddm::fleet::{
    DeclarationCounts, FleetCounts, FleetFacts, ManifestLookup, ASSIGNMENT_STATES,
};
use crate::ddm::sync::DdmState;
use crate::store::{FleetRows, Store};

/// Enrollments read per page by the startup walk.
const WALK_PAGE: usize = 1000;

/// What the tally counts for one enrollment: `None` until it has a stored DDM state.
pub type Counted = Option<Arc<FleetFacts>>;

/// How a write the tally was told about ended.
pub enum WriteOutcome {
    /// Durable: the enrollment's rows now reduce to these facts.
    Written(Option<FleetFacts>),
    /// Failed or timed out: the store may hold the old rows or the new ones.
    Unknown,
}

pub struct FleetTally {
    stall_after_secs: i64,
    inner: Mutex<Inner>,
    ready: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    counts: FleetCounts,
    /// While the startup walk runs: enrollments written since it began.
    walk: Option<Walk>,
    /// Enrollments whose last write has an unknown outcome, with what the counts hold
    /// for them until their actor reloads.
    uncertain: HashMap<String, Counted>,
}

#[derive(Default)]
struct Walk {
    touched: HashMap<String, Touched>,
    walked: u64,
}

struct Touched {
    /// What the walk counts for the enrollment if it read it before the first write.
    before: Counted,
    /// What the enrollment should be counted as when the walk ends.
    current: Counted,
    /// The walk met the enrollment after it was touched (and so did not count it).
    met_by_walk: bool,
    uncertain: bool,
}

impl FleetTally {
    /// An empty tally that is not ready until [`FleetTally::rebuild`] has walked the store.
    pub fn new(stall_after_secs: i64) -> FleetTally {
        let inner = Inner {
            walk: Some(Walk::default()),
            ..Inner::default()
        };
        FleetTally {
            stall_after_secs,
            inner: Mutex::new(inner),
            ready: watch::channel(false).0,
        }
    }

    /// The facts of one enrollment's rows (`None` without a DDM state).
    pub fn facts(&self, ddm: Option<&DdmState>, enrollment: EnrollmentFacts) -> Option<FleetFacts> {
        ddm.map(|ddm| FleetFacts::of(ddm, enrollment, self.stall_after_secs))
    }

    pub fn stall_after_secs(&self) -> i64 {
        self.stall_after_secs
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An actor activated with rows reducing to `loaded`: what the counts hold for it
    /// from now on (an uncertain earlier write is settled here).
    pub fn activated(&self, id: &str, loaded: Option<FleetFacts>) -> Counted {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(touched) = inner.walk.as_mut().and_then(|w| w.touched.get_mut(id)) {
            if touched.uncertain {
                touched.uncertain = false;
                touched.current = loaded.map(Arc::new);
            }
            return touched.current.clone();
        }
        if let Some(held) = inner.uncertain.remove(id) {
            metrics::counter!("orchard_fleet_tally_settled_total").increment(1);
            return replace(&mut inner.counts, &held, loaded.as_ref());
        }
        loaded.map(Arc::new)
    }

    /// Called before an actor sends a write that changes its facts away from `counted`.
    pub fn writing(&self, id: &str, counted: &Counted) {
        let mut inner = self.lock();
        if let Some(walk) = inner.walk.as_mut() {
            walk.touched
                .entry(id.to_string())
                .or_insert_with(|| Touched {
                    before: counted.clone(),
                    current: counted.clone(),
                    met_by_walk: false,
                    uncertain: false,
                });
        }
    }

    /// Called when that write ended; returns what the counts now hold for the enrollment.
    pub fn written(&self, id: &str, counted: &Counted, outcome: WriteOutcome) -> Counted {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(touched) = inner.walk.as_mut().and_then(|w| w.touched.get_mut(id)) {
            match outcome {
                WriteOutcome::Written(facts) => touched.current = facts.map(Arc::new),
                WriteOutcome::Unknown => touched.uncertain = true,
            }
            return touched.current.clone();
        }
        match outcome {
            WriteOutcome::Written(facts) => replace(&mut inner.counts, counted, facts.as_ref()),
            WriteOutcome::Unknown => {
                metrics::counter!("orchard_fleet_tally_uncertain_total").increment(1);
                inner.uncertain.insert(id.to_string(), counted.clone());
                counted.clone()
            }
        }
    }

    /// Rebuild the counts from the store (at startup, while devices are served), then
    /// mark the tally ready. Retries a failing page until it succeeds: the fleet views
    /// answer 503 meanwhile.
    pub async fn rebuild(&self, store: &dyn Store) {
        let started = Instant::now();
        let mut after: Option<String> = None;
        let mut last_progress = Instant::now();
        loop {
            let page = match store.fleet_rows(after.as_deref(), WALK_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "fleet tally walk: page failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let full = page.len() == WALK_PAGE;
            after = page.last().map(|(id, _)| id.clone());
            let walked = self.count_walked(self.reduce(page));
            if last_progress.elapsed() >= Duration::from_secs(10) {
                last_progress = Instant::now();
                tracing::info!(enrollments = walked, "fleet tally walk in progress");
            }
            if !full {
                break;
            }
        }
        let enrollments = self.finish_walk();
        metrics::histogram!("orchard_fleet_tally_rebuild_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            enrollments,
            seconds = started.elapsed().as_secs_f64(),
            "fleet tally ready"
        );
        self.ready.send_replace(true);
    }

    fn reduce(&self, page: Vec<(String, FleetRows)>) -> Vec<(String, FleetFacts)> {
        page.into_iter()
            .filter_map(|(id, rows)| {
                let ddm = DdmState::decode(&rows.ddm).ok()?;
                let enrollment = EnrollmentFacts::of(rows.enrollment.as_ref());
                Some((id, FleetFacts::of(&ddm, enrollment, self.stall_after_secs)))
            })
            .collect()
    }

    /// Count what the walk read, except enrollments written since the walk began.
    fn count_walked(&self, facts: Vec<(String, FleetFacts)>) -> u64 {
        let mut inner = self.lock();
        let Inner { counts, walk, .. } = &mut *inner;
        let walk = walk.as_mut().expect("walking");
        for (id, facts) in facts {
            walk.walked += 1;
            match walk.touched.get_mut(&id) {
                Some(touched) => touched.met_by_walk = true,
                None => {
                    counts.add(&facts);
                }
            }
        }
        metrics::gauge!("orchard_fleet_tally_walked").set(walk.walked as f64);
        walk.walked
    }

    /// Fold the enrollments written during the walk into the counts.
    fn finish_walk(&self) -> u64 {
        let mut inner = self.lock();
        let Inner {
            counts,
            walk,
            uncertain,
        } = &mut *inner;
        let walk = walk.take().expect("walking");
        for (id, touched) in walk.touched {
            if !touched.met_by_walk {
                if let Some(before) = &touched.before {
                    // The walk read it before the first write and counted it as it was.
                    counts.remove(before);
                }
            }
            if let Some(current) = &touched.current {
                counts.add(current);
            }
            if touched.uncertain {
                uncertain.insert(id, touched.current);
            }
        }
        metrics::gauge!("orchard_fleet_tally_enrollments").set(counts.enrollments() as f64);
        counts.enrollments()
    }

    /// Wait up to `patience` for the startup walk; `Err` carries its progress.
    pub async fn wait_ready(&self, patience: Duration) -> Result<(), u64> {
        let mut ready = self.ready.subscribe();
        let waited = tokio::time::timeout(patience, ready.wait_for(|ready| *ready)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.lock().walk.as_ref().map_or(0, |w| w.walked)),
        }
    }

    /// Whether the startup walk has ended (the counts are the fleet's).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Set the DDM gauges to the fleet at `as_of` (a minute boundary): every rule and
    /// assignment state, so one that drops to 0 reads 0. Until the startup walk ends they
    /// keep the 0 they were registered with.
    pub fn publish(
        &self,
        manifest_of: &dyn Fn(&BTreeSet<String>) -> Arc<ManifestSnapshot>,
        as_of: i64,
    ) {
        if !self.is_ready() {
            return;
        }
        let summary = self
            .lock()
            .counts
            .summary(&mut ManifestLookup::new(manifest_of), as_of);
        let count =
            |counts: &BTreeMap<&str, u64>, key: &str| counts.get(key).copied().unwrap_or(0) as f64;
        for rule in RULES {
            metrics::gauge!("orchard_ddm_enrollments_with_finding", "rule" => rule)
                .set(count(&summary.findings, rule));
        }
        for state in ASSIGNMENT_STATES {
            metrics::gauge!("orchard_ddm_declaration_assignments", "state" => state)
                .set(count(&summary.assignments, state));
        }
        metrics::gauge!("orchard_ddm_enrollments_converged").set(summary.converged as f64);
        metrics::gauge!("orchard_fleet_tally_enrollments").set(summary.enrollments as f64);
    }

    /// The fleet view (see [`FleetCounts::declarations`]).
    pub fn declarations(
        &self,
        manifest_of: &dyn Fn(&BTreeSet<String>) -> Arc<ManifestSnapshot>,
    ) -> DeclarationCounts {
        self.lock()
            .counts
            .declarations(&mut ManifestLookup::new(manifest_of))
    }

    /// The fleet diagnosis at `as_of` (see [`FleetCounts::findings`]), with the number of
    /// enrollments counted.
    pub fn findings(
        &self,
        manifest_of: &dyn Fn(&BTreeSet<String>) -> Arc<ManifestSnapshot>,
        as_of: i64,
    ) -> (BTreeMap<&'static str, u64>, u64) {
        let inner = self.lock();
        let per_rule = inner
            .counts
            .findings(&mut ManifestLookup::new(manifest_of), as_of);
        (per_rule, inner.counts.enrollments())
    }
}

/// Move one enrollment from `old` to `new` facts; returns the shared copy of `new`.
fn replace(counts: &mut FleetCounts, old: &Counted, new: Option<&FleetFacts>) -> Counted {
    if old.as_deref() == new {
        return old.clone();
    }
    if let Some(old) = old {
        if !counts.remove(old) {
            tracing::error!("fleet tally: removing facts that were not counted");
            metrics::counter!("orchard_fleet_tally_mismatches_total").increment(1);
        }
    }
    let counted = new.map(|new| counts.add(new));
    metrics::gauge!("orchard_fleet_tally_enrollments").set(counts.enrollments() as f64);
    metrics::gauge!("orchard_fleet_tally_distinct_facts").set(counts.distinct() as f64);
    counted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddm::Declaration;

    /// Facts that differ only in their one assigned set, named `set`.
    fn facts(set: &str) -> FleetFacts {
        let state = DdmState {
            sets: [set.to_string()].into(),
            ..DdmState::default()
        };
        FleetFacts::default().with_state(&state)
    }

    /// Enrollments counted per set (each set's manifest holds one declaration named so).
    fn counted(tally: &FleetTally) -> BTreeMap<String, u64> {
        let manifest_of = |sets: &BTreeSet<String>| {
            let declarations = sets.iter().map(|set| {
                let json = format!(r#"{{"Type":"com.apple.configuration.management.test","Identifier":"{set}","Payload":{{"Echo":"x"}}}}"#);
                Arc::new(Declaration::from_api_json(json.as_bytes(), 0).unwrap().0)
            });
            Arc::new(ManifestSnapshot::from_declarations(declarations.collect()))
        };
        let view = tally.declarations(&manifest_of);
        view.into_iter()
            .map(|(id, counts)| (id, counts["assigned"]))
            .collect()
    }

    fn expect(tally: &FleetTally, sets: &[(&str, u64)]) {
        let expected = sets.iter().map(|(s, n)| (s.to_string(), *n)).collect();
        assert_eq!(counted(tally), expected);
    }

    fn walked(tally: &FleetTally, page: &[(&str, &str)]) {
        let page = page.iter().map(|(id, set)| (id.to_string(), facts(set)));
        tally.count_walked(page.collect());
    }

    fn ready() -> FleetTally {
        let tally = FleetTally::new(120);
        tally.finish_walk();
        tally
    }

    #[test]
    fn a_write_after_the_walk_read_the_enrollment_moves_it() {
        let tally = FleetTally::new(120);
        walked(&tally, &[("d1", "a"), ("d2", "a")]);
        let before = tally.activated("d1", Some(facts("a")));
        tally.writing("d1", &before);
        tally.written("d1", &before, WriteOutcome::Written(Some(facts("b"))));
        tally.finish_walk();
        expect(&tally, &[("a", 1), ("b", 1)]);
    }

    #[test]
    fn a_write_before_the_walk_reaches_the_enrollment_is_counted_once() {
        let tally = FleetTally::new(120);
        let before = tally.activated("d1", Some(facts("a")));
        tally.writing("d1", &before);
        tally.written("d1", &before, WriteOutcome::Written(Some(facts("b"))));
        // The walk reads the new rows (or the old ones): either way it leaves d1 alone.
        walked(&tally, &[("d1", "b"), ("d2", "a")]);
        tally.finish_walk();
        expect(&tally, &[("a", 1), ("b", 1)]);
    }

    #[test]
    fn a_write_in_flight_when_the_walk_ends_lands_on_the_finished_counts() {
        let tally = FleetTally::new(120);
        let before = tally.activated("d1", Some(facts("a")));
        tally.writing("d1", &before);
        walked(&tally, &[("d1", "a")]);
        tally.finish_walk();
        expect(&tally, &[("a", 1)]);
        let now = tally.written("d1", &before, WriteOutcome::Written(Some(facts("b"))));
        assert_eq!(now.as_deref(), Some(&facts("b")));
        expect(&tally, &[("b", 1)]);
    }

    #[test]
    fn an_enrollment_created_during_the_walk_is_counted_once() {
        let tally = FleetTally::new(120);
        let before = tally.activated("new", None);
        tally.writing("new", &before);
        tally.written("new", &before, WriteOutcome::Written(Some(facts("a"))));
        walked(&tally, &[("old", "a")]);
        tally.finish_walk();
        expect(&tally, &[("a", 2)]);
    }

    #[test]
    fn a_write_with_an_unknown_outcome_is_settled_by_the_next_activation() {
        let tally = ready();
        let before = tally.activated("d1", None);
        tally.writing("d1", &before);
        let counted = tally.written("d1", &before, WriteOutcome::Written(Some(facts("a"))));
        tally.writing("d1", &counted);
        tally.written("d1", &counted, WriteOutcome::Unknown);
        expect(&tally, &[("a", 1)]);
        // The write did land: the reloaded rows say so.
        tally.activated("d1", Some(facts("b")));
        expect(&tally, &[("b", 1)]);
        // Settled once: a later activation of the same rows changes nothing.
        tally.activated("d1", Some(facts("b")));
        expect(&tally, &[("b", 1)]);
    }

    #[test]
    fn an_unknown_outcome_during_the_walk_is_settled_after_it() {
        let tally = FleetTally::new(120);
        walked(&tally, &[("d1", "a")]);
        let before = tally.activated("d1", Some(facts("a")));
        tally.writing("d1", &before);
        tally.written("d1", &before, WriteOutcome::Unknown);
        tally.finish_walk();
        expect(&tally, &[("a", 1)]);
        tally.activated("d1", Some(facts("b")));
        expect(&tally, &[("b", 1)]);
    }

    #[tokio::test]
    async fn fleet_routes_wait_for_the_walk() {
        let tally = FleetTally::new(120);
        assert_eq!(tally.wait_ready(Duration::from_millis(10)).await, Err(0));
        tally.finish_walk();
        tally.ready.send_replace(true);
        assert_eq!(tally.wait_ready(Duration::from_millis(10)).await, Ok(()));
    }
}
