//! The live fleet tally: how many enrollments share each [`FleetFacts`], kept equal to
//! what the store holds, so the fleet view and the fleet diagnosis never walk the fleet on
//! a request.
//!
//! Counted per shard, by the node that runs the shard. Only device actors change the rows
//! the tally reduces (enrollment, DDM state, timeline), only the shard's owner runs its
//! actors, and every actor knows what the tally counts for it (`counted`, the facts of its
//! rows as last durably written). After a successful write the actor moves its one
//! enrollment from the old facts to the new; after a failed write the outcome is unknown
//! (a CQL timeout may still have landed), so the enrollment is marked uncertain and its
//! next activation, which reads what is durable, settles it.
//!
//! * `books.rs` (pure) keeps the counts per shard and how a recount meets the writes made
//!   while it runs;
//! * this file runs the recount walks: a node that takes shards (all of them at a
//!   single-node start; a share, then whatever a failed or leaving node held, in a
//!   cluster) recounts them from the store by one walk while it already serves them;
//! * `share.rs` is one node's part of a fleet view, and their sum: a view is exact only
//!   when every shard is counted by exactly one node;
//! * `gather.rs` asks the other nodes of a cluster for their parts.

mod books;
mod gather;
mod share;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::cluster::{ShardId, VIRTUAL_SHARDS};
use crate::ddm::catalog::ManifestSnapshot;
use crate::ddm::doctor::{EnrollmentFacts, RULES};
use crate::ddm::fleet::{FleetFacts, ManifestLookup, ASSIGNMENT_STATES};
use crate::ddm::sync::DdmState;
use crate::store::{FleetRows, Store};
use books::Books;
pub use gather::{fleet_view, this_nodes_part};
pub use share::{FleetShare, FleetView, Incomplete};

/// Enrollments read per page by a recount walk.
const WALK_PAGE: usize = 1000;

/// How long a recount waits after shards are taken, so that shards taken over a few
/// cluster rounds are recounted by one walk.
const SETTLE: Duration = Duration::from_millis(500);

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
    books: Mutex<Books>,
    /// Raised when shards are taken: the recount loop wakes.
    taken: Notify,
}

impl FleetTally {
    /// An empty tally holding no shard.
    pub fn new(stall_after_secs: i64) -> FleetTally {
        FleetTally {
            stall_after_secs,
            books: Mutex::new(Books::default()),
            taken: Notify::new(),
        }
    }

    /// The facts of one enrollment's rows (`None` without a DDM state).
    pub fn facts(&self, ddm: Option<&DdmState>, enrollment: EnrollmentFacts) -> Option<FleetFacts> {
        ddm.map(|ddm| FleetFacts::of(ddm, enrollment, self.stall_after_secs))
    }

    pub fn stall_after_secs(&self) -> i64 {
        self.stall_after_secs
    }

    fn lock(&self) -> MutexGuard<'_, Books> {
        self.books
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This node runs `shards` from now on: they are recounted by the next walk. Called
    /// before any of their actors may start.
    pub fn take(&self, shards: impl IntoIterator<Item = ShardId>) {
        if self.lock().take(shards) {
            self.taken.notify_one();
        }
    }

    /// Every shard: a node that runs them all (no cluster).
    pub fn take_all(&self) {
        self.take((0..VIRTUAL_SHARDS).map(ShardId));
    }

    /// Another node runs `shards` now; their counts leave this node's total.
    pub fn release(&self, shards: &HashSet<ShardId>) {
        let mut books = self.lock();
        books.release(shards);
        publish(&books);
        publish_shards(&books);
    }

    /// An actor activated with rows reducing to `loaded`: what the counts hold for it
    /// from now on (an uncertain earlier write is settled here).
    pub fn activated(&self, id: &str, loaded: Option<FleetFacts>) -> Counted {
        self.lock().activated(id, loaded)
    }

    /// Called before an actor sends a write that changes its facts away from `counted`.
    pub fn writing(&self, id: &str, counted: &Counted) {
        self.lock().writing(id, counted);
    }

    /// Called when that write ended; returns what the counts now hold for the enrollment.
    pub fn written(&self, id: &str, counted: &Counted, outcome: WriteOutcome) -> Counted {
        let mut books = self.lock();
        let now = books.written(id, counted, outcome);
        publish(&books);
        now
    }

    /// Recount taken shards from the store, forever: one walk whenever shards wait. A
    /// failing page is retried until it succeeds; the fleet views answer 503 meanwhile.
    pub async fn recount(&self, store: &dyn Store) {
        loop {
            self.taken.notified().await;
            tokio::time::sleep(SETTLE).await;
            while self.lock().begin_walk() {
                self.walk(store).await;
            }
        }
    }

    async fn walk(&self, store: &dyn Store) {
        let started = Instant::now();
        let mut after: Option<String> = None;
        let mut last_progress = Instant::now();
        let recounted = self.lock().recounted_enrollments();
        while self.lock().recounting() {
            let page = store.fleet_rows(after.as_deref(), WALK_PAGE, recounted.clone());
            let page = match page.await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "fleet tally walk: page failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let full = page.len() == WALK_PAGE;
            after = page.last().map(|(id, _)| id.clone());
            let walked = self.lock().count_walked(self.reduce(page));
            metrics::gauge!("orchard_fleet_tally_walked").set(walked as f64);
            if last_progress.elapsed() >= Duration::from_secs(10) {
                last_progress = Instant::now();
                tracing::info!(enrollments = walked, "fleet tally walk in progress");
            }
            if !full {
                break;
            }
        }
        let mut books = self.lock();
        let shards = books.finish_walk();
        publish(&books);
        publish_shards(&books);
        metrics::histogram!("orchard_fleet_tally_rebuild_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            shards,
            enrollments = books.total().enrollments(),
            seconds = started.elapsed().as_secs_f64(),
            "fleet tally recounted"
        );
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

    /// This node's part of `view`: its counted shards, evaluated against the current
    /// manifests.
    pub fn share(
        &self,
        view: FleetView,
        manifest_of: &dyn Fn(&BTreeSet<String>) -> Arc<ManifestSnapshot>,
    ) -> FleetShare {
        let books = self.lock();
        let mut manifests = ManifestLookup::new(manifest_of);
        let total = books.total();
        let mut share = FleetShare {
            shards: books.counted_shards(),
            enrollments: total.enrollments(),
            walked: books.walked(),
            ..FleetShare::default()
        };
        match view {
            FleetView::Declarations => {
                share.declarations = share::owned_keys(total.declarations(&mut manifests));
            }
            FleetView::Diagnosis { as_of } => {
                let rules = total.findings(&mut manifests, as_of);
                share.rules = rules.into_iter().map(|(r, n)| (r.to_string(), n)).collect();
            }
        }
        share
    }
}

impl FleetTally {
    /// Set the DDM gauges to this node's part of the fleet at `as_of` (a minute
    /// boundary): every rule and assignment state, so one that drops to 0 reads 0. Each
    /// node exports the shards it counts; summed over the nodes they are the fleet.
    pub fn publish_fleet_gauges(
        &self,
        manifest_of: &dyn Fn(&BTreeSet<String>) -> Arc<ManifestSnapshot>,
        as_of: i64,
    ) {
        let summary = self
            .lock()
            .total()
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
}

/// How many shards this node counts, after a recount or a release.
fn publish_shards(books: &Books) {
    metrics::gauge!("orchard_fleet_tally_shards").set(books.counted_shards().len() as f64);
}

/// The tally's gauges, after a change.
fn publish(books: &Books) {
    let total = books.total();
    metrics::gauge!("orchard_fleet_tally_enrollments").set(total.enrollments() as f64);
    metrics::gauge!("orchard_fleet_tally_distinct_facts").set(total.distinct() as f64);
}
