//! This node's part in the cluster: heartbeats, judging the others alive or dead, taking
//! and handing over shards, and answering the two questions the rest of Orchard asks —
//! "may an actor of this shard start here?" ([`ClusterNode::accepts`]) and "under which
//! epoch may this node write for it?" ([`ClusterNode::write_epoch`]).
//!
//! Safety rests on one rule about time, measured only on each node's own monotonic clock:
//! a node serves its shards until `lease − margin` after the *start* of its last heartbeat
//! that the database acknowledged; another node declares it dead only after seeing its
//! heartbeat count unchanged for a whole `lease`, counted from when it first saw that
//! count — which was written after that start. So a node has stopped serving before anyone
//! may take its shards, however long it was paused, and no two clocks are ever compared.
//! A write that was already on its way when the node lost the shard still cannot win: its
//! timestamp is fenced by the old epoch (`fence.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use metrics::{counter, gauge, histogram};

use super::balance::{plan_moves, HeldLease};
use super::directory::{Directory, NodeRow, ShardMove, ShardRow};
use super::shards::{ShardId, VIRTUAL_SHARDS};
use super::Route;
use crate::store::StoreResult;

/// What the device layer does when shards leave this node.
pub trait ShardHost: Send + Sync {
    /// Flush and stop every resident actor of `shards` (a hand-off); resolves when they
    /// have all stopped.
    fn passivate(self: Arc<Self>, shards: HashSet<ShardId>) -> BoxFuture<'static, ()>;

    /// Stop the actors of `shards` without writing: another node owns them now.
    fn abandon(&self, shards: &HashSet<ShardId>);

    /// `shards` are this node's from now on; called before any of their actors may start.
    fn take(&self, shards: &HashSet<ShardId>);
}

#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub node_id: String,
    pub advertise_url: String,
    pub lease: Duration,
}

impl ClusterSettings {
    /// How long before its lease runs out a node stops serving (clock rates differ a
    /// little, and a request admitted just before must still finish its write).
    fn margin(&self) -> Duration {
        self.lease / 5
    }

    /// Time between two rounds (heartbeat, look at the others, move shards).
    pub fn round(&self) -> Duration {
        self.lease / 4
    }
}

/// One node as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_id: String,
    pub advertise_url: String,
    pub alive: bool,
    pub shards: usize,
    pub last_heartbeat_millis: i64,
}

/// A heartbeat count and when this node first saw it.
struct Observed {
    heartbeat: i64,
    since: Instant,
}

#[derive(Default)]
struct View {
    /// Per shard: its row as last read or written by this node.
    shards: Vec<Option<ShardRow>>,
    /// The shards this process took, with the epoch it took them under. A row naming this
    /// node that is not here was written by an earlier process with the same node id: it
    /// is taken again under a new epoch before anything is served from it.
    mine: HashMap<ShardId, u64>,
    /// Shards being handed over: no new actor starts, the old ones still flush.
    draining: HashSet<ShardId>,
    /// End of this node's right to serve, from its last acknowledged heartbeat.
    serving_until: Option<Instant>,
    /// When the last acknowledged heartbeat started.
    last_beat: Option<Instant>,
    nodes: Vec<NodeStatus>,
}

impl View {
    fn owned(&self, shard: ShardId) -> Option<u64> {
        self.mine.get(&shard).copied()
    }
}

pub struct ClusterNode {
    settings: ClusterSettings,
    directory: Arc<dyn Directory>,
    view: RwLock<View>,
}

impl super::WriteFence for ClusterNode {
    fn write_epoch(&self, shard: ShardId) -> Option<u64> {
        ClusterNode::write_epoch(self, shard)
    }
}

impl super::Placement for ClusterNode {
    fn accepts(&self, shard: ShardId) -> bool {
        ClusterNode::accepts(self, shard)
    }
}

impl ClusterNode {
    pub fn new(settings: ClusterSettings, directory: Arc<dyn Directory>) -> Arc<Self> {
        let view = View {
            shards: vec![None; VIRTUAL_SHARDS as usize],
            ..View::default()
        };
        Arc::new(ClusterNode {
            settings,
            directory,
            view: RwLock::new(view),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    pub fn lease(&self) -> Duration {
        self.settings.lease
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn serving(view: &View) -> bool {
        view.serving_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Whether this node's lease holds now (its last heartbeat was acknowledged in time).
    pub fn is_serving(&self) -> bool {
        Self::serving(&self.read())
    }

    /// The epoch under which this node may write for `shard` now, if it may.
    pub fn write_epoch(&self, shard: ShardId) -> Option<u64> {
        let view = self.read();
        if !Self::serving(&view) {
            return None;
        }
        view.owned(shard)
    }

    /// Whether a request for a device of `shard` may be served (and its actor started)
    /// here now.
    pub fn accepts(&self, shard: ShardId) -> bool {
        let view = self.read();
        Self::serving(&view) && !view.draining.contains(&shard) && view.owned(shard).is_some()
    }

    /// The owner of `shard` as last seen, with its advertised URL.
    pub fn owner(&self, shard: ShardId) -> Option<(String, String)> {
        let view = self.read();
        let owner = view.shards[shard.0 as usize].as_ref()?.owner.clone();
        let url = view
            .nodes
            .iter()
            .find(|node| node.node_id == owner && node.alive)?
            .advertise_url
            .clone();
        Some((owner, url))
    }

    /// Where a request for a device of `shard` goes, as this node last saw the cluster.
    pub fn route(&self, shard: ShardId) -> Route {
        if self.accepts(shard) {
            return Route::Local;
        }
        match self.owner(shard) {
            Some((node_id, url)) if node_id != self.settings.node_id => {
                Route::Peer { node_id, url }
            }
            _ => Route::Unavailable,
        }
    }

    /// The route after the node this one sent a request to refused it (it no longer holds
    /// the shard) or could not be reached: the shard's row read now, not as last seen.
    pub async fn reroute(&self, shard: ShardId) -> Route {
        let row = match self.directory.shard(shard).await {
            Ok(Some(row)) => row,
            Ok(None) => return Route::Unavailable,
            Err(e) => {
                tracing::warn!(shard = shard.0, error = %e, "cannot read the shard's owner");
                return Route::Unavailable;
            }
        };
        {
            let mut view = self.write();
            let index = shard.0 as usize;
            let newer = view.shards[index]
                .as_ref()
                .is_none_or(|known| row.epoch > known.epoch);
            // Only routing is learned here; a change to a shard this node holds is
            // taken in by the next round, which also stops its actors.
            if newer && view.owned(shard).is_none() {
                view.shards[index] = Some(row);
            }
        }
        self.route(shard)
    }

    /// Every node this node knows of, and how many shards no live node holds.
    pub fn status(&self) -> (Vec<NodeStatus>, usize) {
        let view = self.read();
        let live: HashSet<&str> = view
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.node_id.as_str())
            .collect();
        (view.nodes.clone(), unowned(&view.shards, &live))
    }

    /// Heartbeat, look, and move shards until `stop` resolves; then hand every shard over
    /// and leave. Heartbeats run on their own beat, so a long round of shard moves (4096
    /// conditional writes when the first node starts) never lets the lease lapse. `joined`
    /// is sent after the first round that succeeded (this node took what was free for it).
    pub async fn run(
        self: Arc<Self>,
        host: Arc<dyn ShardHost>,
        joined: tokio::sync::oneshot::Sender<()>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut joined = Some(joined);
        // Counting from the clock keeps a restarted node's count growing.
        let mut heartbeat = crate::device::now_millis() as i64;
        while let Err(e) = self.heartbeat(&host, &mut heartbeat).await {
            tracing::warn!(error = %e, "first heartbeat failed; retrying");
            tokio::time::sleep(self.settings.round()).await;
        }
        let beats = async {
            loop {
                tokio::time::sleep(self.settings.round()).await;
                if let Err(e) = self.heartbeat(&host, &mut heartbeat).await {
                    counter!("orchard_cluster_round_errors_total", "step" => "heartbeat")
                        .increment(1);
                    tracing::warn!(error = %e, "heartbeat failed; retrying next round");
                }
            }
        };
        let rounds = async {
            let mut observed: HashMap<String, Observed> = HashMap::new();
            loop {
                match self.round(&host, &mut observed).await {
                    Ok(()) => {
                        if let Some(joined) = joined.take() {
                            let _ = joined.send(());
                        }
                    }
                    Err(e) => {
                        counter!("orchard_cluster_round_errors_total", "step" => "placement")
                            .increment(1);
                        tracing::warn!(error = %e, "cluster round failed; retrying next round");
                    }
                }
                tokio::time::sleep(self.settings.round()).await;
            }
        };
        tokio::select! {
            _ = stop => {}
            _ = beats => {}
            _ = rounds => {}
        }
        self.leave(&host).await;
    }

    /// One heartbeat; shards dropped because the lease lapsed are abandoned.
    async fn heartbeat(&self, host: &Arc<dyn ShardHost>, heartbeat: &mut i64) -> StoreResult<()> {
        *heartbeat += 1;
        let lapsed = self.beat(*heartbeat).await?;
        if !lapsed.is_empty() {
            counter!("orchard_cluster_shards_lost_total").increment(lapsed.len() as u64);
            tracing::warn!(
                shards = lapsed.len(),
                "heartbeats lapsed past the lease: dropping every shard until it is taken again"
            );
            host.abandon(&lapsed);
        }
        Ok(())
    }

    /// Look at the others and move shards toward this node's share.
    async fn round(
        &self,
        host: &Arc<dyn ShardHost>,
        observed: &mut HashMap<String, Observed>,
    ) -> StoreResult<()> {
        let nodes = self.directory.nodes().await?;
        let rows = self.directory.shards().await?;
        let live = self.judge(&nodes, observed);
        let inherited = self.absorb(host, rows);
        if !inherited.is_empty() {
            self.acquire(host, &inherited).await;
        }
        let moves = {
            let view = self.read();
            let live_refs: Vec<&str> = live.iter().map(String::as_str).collect();
            let held: Vec<HeldLease> = view
                .shards
                .iter()
                .flatten()
                .filter(|row| live.contains(&row.owner))
                .map(|row| HeldLease {
                    shard: row.shard,
                    owner: &row.owner,
                })
                .collect();
            plan_moves(&self.settings.node_id, &live_refs, &held)
        };
        if !moves.release.is_empty() {
            self.hand_over(host, moves.release.into_iter().collect())
                .await;
        }
        if !moves.acquire.is_empty() && self.accepting_new_shards() {
            self.acquire(host, &moves.acquire).await;
        }
        self.publish(&live);
        Ok(())
    }

    /// Write this node's heartbeat; on success, extend the right to serve. If this beat
    /// was acknowledged a whole lease after the previous one started, the others may have
    /// judged this node dead in between (a pause, a cut): every shard is dropped and
    /// returned, and only those whose rows still name this node are taken again, under a
    /// new epoch.
    async fn beat(&self, heartbeat: i64) -> StoreResult<HashSet<ShardId>> {
        let start = Instant::now();
        let row = NodeRow {
            node_id: self.settings.node_id.clone(),
            advertise_url: self.settings.advertise_url.clone(),
            heartbeat,
            beat_at_millis: crate::device::now_millis() as i64,
        };
        let beat = self.directory.beat(&row).await;
        histogram!("orchard_cluster_lease_renew_seconds").record(start.elapsed().as_secs_f64());
        beat?;
        let mut view = self.write();
        let lapsed = view
            .last_beat
            .is_some_and(|previous| Instant::now() >= previous + self.settings.lease);
        let dropped = if lapsed {
            view.mine.drain().map(|(shard, _)| shard).collect()
        } else {
            HashSet::new()
        };
        view.last_beat = Some(start);
        view.serving_until = Some(start + self.settings.lease - self.settings.margin());
        Ok(dropped)
    }

    /// The nodes that are alive: this one, and every other whose heartbeat count moved
    /// within the last lease (a node first seen less than a lease ago counts as alive: it
    /// has not been watched long enough to be judged).
    fn judge(&self, rows: &[NodeRow], observed: &mut HashMap<String, Observed>) -> HashSet<String> {
        let now = Instant::now();
        let mut live = HashSet::from([self.settings.node_id.clone()]);
        let mut statuses = Vec::new();
        for row in rows {
            let seen = observed.entry(row.node_id.clone()).or_insert(Observed {
                heartbeat: row.heartbeat,
                since: now,
            });
            if seen.heartbeat != row.heartbeat {
                *seen = Observed {
                    heartbeat: row.heartbeat,
                    since: now,
                };
            }
            let alive = row.node_id == self.settings.node_id
                || now.duration_since(seen.since) < self.settings.lease;
            if alive {
                live.insert(row.node_id.clone());
            }
            statuses.push(NodeStatus {
                node_id: row.node_id.clone(),
                advertise_url: row.advertise_url.clone(),
                alive,
                shards: 0,
                last_heartbeat_millis: row.beat_at_millis,
            });
        }
        observed.retain(|id, _| rows.iter().any(|row| &row.node_id == id));
        self.write().nodes = statuses;
        live
    }

    /// Take in the shard rows just read. Shards this process owned that another node has
    /// taken are abandoned (their actors stop without writing); the shards rows name this
    /// node for but an earlier process took are returned, to be taken again.
    fn absorb(&self, host: &Arc<dyn ShardHost>, rows: Vec<ShardRow>) -> Vec<ShardId> {
        let me = &self.settings.node_id;
        let mut lost = HashSet::new();
        let mut inherited = Vec::new();
        {
            let mut view = self.write();
            for row in rows {
                let index = row.shard.0 as usize;
                let newer = view.shards[index]
                    .as_ref()
                    .is_none_or(|known| row.epoch >= known.epoch);
                if !newer {
                    continue;
                }
                match view.owned(row.shard) {
                    Some(epoch) if row.owner != *me || row.epoch != epoch => {
                        view.mine.remove(&row.shard);
                        lost.insert(row.shard);
                    }
                    None if row.owner == *me => inherited.push(row.shard),
                    _ => {}
                }
                view.shards[index] = Some(row);
            }
        }
        if !lost.is_empty() {
            counter!("orchard_cluster_shards_lost_total").increment(lost.len() as u64);
            tracing::warn!(
                shards = lost.len(),
                "shards taken over by another node; abandoning their actors"
            );
            host.abandon(&lost);
        }
        inherited
    }

    /// A node that cannot serve (its heartbeats are failing) takes no shards.
    fn accepting_new_shards(&self) -> bool {
        Self::serving(&self.read())
    }

    /// Take each free shard with a conditional write that raises its epoch.
    async fn acquire(&self, host: &Arc<dyn ShardHost>, shards: &[ShardId]) {
        let claims: Vec<ShardMove> = {
            let view = self.read();
            shards
                .iter()
                .map(|&shard| {
                    let expected = view.shards[shard.0 as usize].clone();
                    let to = ShardRow {
                        shard,
                        owner: self.settings.node_id.clone(),
                        epoch: expected.as_ref().map_or(1, |row| row.epoch + 1),
                    };
                    ShardMove { expected, to }
                })
                .collect()
        };
        let targets: Vec<ShardRow> = claims.iter().map(|claim| claim.to.clone()).collect();
        let outcomes = self.directory.move_shards(claims).await;
        let mut won_rows = Vec::new();
        for (to, won) in targets.into_iter().zip(outcomes) {
            match won {
                Ok(true) => won_rows.push(to),
                Ok(false) => counter!("orchard_cluster_claims_lost_total").increment(1),
                Err(e) => tracing::debug!(error = %e, shard = to.shard.0, "shard claim failed"),
            }
        }
        if won_rows.is_empty() {
            return;
        }
        let taken: HashSet<ShardId> = won_rows.iter().map(|row| row.shard).collect();
        // Actors left from an earlier ownership of these shards hold stale memory; the
        // host learns of the new ones before any request for them is admitted.
        host.abandon(&taken);
        host.take(&taken);
        let mut view = self.write();
        for to in won_rows {
            view.mine.insert(to.shard, to.epoch);
            let index = to.shard.0 as usize;
            view.shards[index] = Some(to);
        }
        counter!("orchard_cluster_takeovers_total").increment(taken.len() as u64);
        tracing::info!(shards = taken.len(), "took shards");
    }

    /// Stop admitting requests for `shards`, flush their actors, then free them.
    async fn hand_over(&self, host: &Arc<dyn ShardHost>, shards: HashSet<ShardId>) {
        let start = Instant::now();
        self.write().draining.extend(shards.iter().copied());
        Arc::clone(host).passivate(shards.clone()).await;
        let releases: Vec<ShardMove> = {
            let view = self.read();
            shards
                .iter()
                .filter_map(|&shard| {
                    let epoch = view.owned(shard)?;
                    let current = ShardRow {
                        shard,
                        owner: self.settings.node_id.clone(),
                        epoch,
                    };
                    let to = ShardRow {
                        owner: String::new(),
                        ..current.clone()
                    };
                    Some(ShardMove {
                        expected: Some(current),
                        to,
                    })
                })
                .collect()
        };
        let freed: Vec<ShardRow> = releases.iter().map(|release| release.to.clone()).collect();
        let outcomes = self.directory.move_shards(releases).await;
        let mut handed = 0;
        for (freed, done) in freed.into_iter().zip(outcomes) {
            if let Ok(true) = done {
                handed += 1;
                let mut view = self.write();
                view.mine.remove(&freed.shard);
                let index = freed.shard.0 as usize;
                view.shards[index] = Some(freed);
            }
        }
        self.write()
            .draining
            .retain(|shard| !shards.contains(shard));
        counter!("orchard_cluster_handoffs_total").increment(handed);
        histogram!("orchard_cluster_handoff_seconds").record(start.elapsed().as_secs_f64());
        tracing::info!(
            shards = handed,
            seconds = start.elapsed().as_secs_f64(),
            "handed shards over"
        );
    }

    /// Hand every shard over and remove this node's row (SIGTERM).
    async fn leave(&self, host: &Arc<dyn ShardHost>) {
        let mine: HashSet<ShardId> = self.read().mine.keys().copied().collect();
        tracing::info!(
            shards = mine.len(),
            "leaving the cluster: handing every shard over"
        );
        self.hand_over(host, mine).await;
        if let Err(e) = self.directory.forget_node(&self.settings.node_id).await {
            tracing::warn!(error = %e, "could not remove this node's row; it will be judged dead after the lease");
        }
        self.write().serving_until = None;
    }

    /// Gauges from this round's picture.
    fn publish(&self, live: &HashSet<String>) {
        let mut view = self.write();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for row in view.shards.iter().flatten() {
            *counts.entry(row.owner.clone()).or_default() += 1;
        }
        for node in &mut view.nodes {
            node.shards = if node.alive {
                counts.get(&node.node_id).copied().unwrap_or(0)
            } else {
                0
            };
        }
        let mine = counts.get(&self.settings.node_id).copied().unwrap_or(0);
        let live: HashSet<&str> = live.iter().map(String::as_str).collect();
        gauge!("orchard_cluster_nodes_alive").set(live.len() as f64);
        gauge!("orchard_cluster_shards_owned").set(mine as f64);
        gauge!("orchard_cluster_shards_unowned").set(unowned(&view.shards, &live) as f64);
    }
}

/// Shards whose row is missing or names a node that is not alive: nobody serves their
/// devices until a live node takes them.
fn unowned(shards: &[Option<ShardRow>], live: &HashSet<&str>) -> usize {
    shards
        .iter()
        .filter(|row| {
            !row.as_ref()
                .is_some_and(|r| live.contains(r.owner.as_str()))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(shard: u32, owner: &str) -> Option<ShardRow> {
        Some(ShardRow {
            shard: ShardId(shard),
            owner: owner.to_string(),
            epoch: 1,
        })
    }

    #[test]
    fn a_shard_is_unowned_without_a_row_or_with_an_owner_that_is_not_alive() {
        let shards = vec![row(0, "a"), row(1, "b"), row(2, "dead"), None];
        let live = HashSet::from(["a", "b"]);
        assert_eq!(unowned(&shards, &live), 2);
        assert_eq!(
            unowned(&shards[..2], &live),
            0,
            "every shard held by a live node"
        );
        assert_eq!(unowned(&shards, &HashSet::new()), 4);
    }
}
