//! Even shares without a coordinator.
//!
//! Every node runs [`plan_moves`] on the same picture (live nodes, unexpired leases) and
//! reaches the same targets: the live nodes sorted by id, each owed `VIRTUAL_SHARDS / n`
//! shards and the first `VIRTUAL_SHARDS % n` one more. A node below its target takes free
//! shards; a node above it hands shards over only when the free ones cannot cover what the
//! others are owed, so a node that joins gets its share from the others and a node that
//! dies leaves its shards free for the rest once its leases expire. Which shards a node
//! prefers is a rendezvous hash of (node, shard), so two nodes racing for free shards
//! mostly reach for different ones; the lease's conditional write settles any tie.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64;

use super::shards::{ShardId, VIRTUAL_SHARDS};

/// A lease that has not expired: `owner` runs `shard` now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLease<'a> {
    pub shard: ShardId,
    pub owner: &'a str,
}

/// What the local node should do this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    /// Free shards to take, most preferred first.
    pub acquire: Vec<ShardId>,
    /// Held shards to hand over, least preferred first.
    pub release: Vec<ShardId>,
}

/// The moves that bring `local` toward its even share among `live` (which includes
/// `local`), given every unexpired lease in `held`.
pub fn plan_moves(local: &str, live: &[&str], held: &[HeldLease<'_>]) -> Moves {
    let targets = targets(live);
    let Some(&target) = targets.get(local) else {
        return Moves::default();
    };
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut taken = vec![false; VIRTUAL_SHARDS as usize];
    for lease in held {
        *counts.entry(lease.owner).or_default() += 1;
        taken[lease.shard.0 as usize] = true;
    }
    let mine = counts.get(local).copied().unwrap_or(0);
    let free: Vec<ShardId> = (0..VIRTUAL_SHARDS)
        .filter(|&s| !taken[s as usize])
        .map(ShardId)
        .collect();
    let mut moves = Moves::default();
    if mine < target {
        moves.acquire = by_preference(local, free);
        moves.acquire.truncate(target - mine);
    } else if mine > target {
        let owed: usize = targets
            .iter()
            .filter(|(node, _)| **node != local)
            .map(|(node, t)| t.saturating_sub(counts.get(node).copied().unwrap_or(0)))
            .sum();
        let uncovered = owed.saturating_sub(free.len());
        let mut own = by_preference(local, held_by(local, held));
        own.reverse();
        own.truncate((mine - target).min(uncovered));
        moves.release = own;
    }
    moves
}

/// Each live node's even share.
fn targets<'a>(live: &[&'a str]) -> HashMap<&'a str, usize> {
    let mut nodes = live.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    let n = nodes.len().max(1);
    let base = VIRTUAL_SHARDS as usize / n;
    let extra = VIRTUAL_SHARDS as usize % n;
    nodes
        .into_iter()
        .enumerate()
        .map(|(i, node)| (node, base + usize::from(i < extra)))
        .collect()
}

fn held_by(node: &str, held: &[HeldLease<'_>]) -> Vec<ShardId> {
    held.iter()
        .filter(|lease| lease.owner == node)
        .map(|lease| lease.shard)
        .collect()
}

/// `shards` ordered by how much `node` prefers them (rendezvous hashing).
fn by_preference(node: &str, mut shards: Vec<ShardId>) -> Vec<ShardId> {
    let score = |shard: &ShardId| {
        let mut key = node.as_bytes().to_vec();
        key.extend_from_slice(&shard.0.to_be_bytes());
        std::cmp::Reverse(xxh3_64(&key))
    };
    shards.sort_by_cached_key(score);
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets every node in turn apply its moves (conditional writes: a shard someone took
    /// first is not taken again) until nothing changes; returns the shares.
    fn settle(
        live: &[&'static str],
        owners: &mut HashMap<ShardId, &'static str>,
    ) -> HashMap<&'static str, usize> {
        for _round in 0..10 {
            let mut changed = false;
            for &node in live {
                let held: Vec<HeldLease> = owners
                    .iter()
                    .map(|(&shard, &owner)| HeldLease { shard, owner })
                    .collect();
                let moves = plan_moves(node, live, &held);
                for shard in moves.release {
                    owners.remove(&shard);
                    changed = true;
                }
                for shard in moves.acquire {
                    if let std::collections::hash_map::Entry::Vacant(free) = owners.entry(shard) {
                        free.insert(node);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let mut shares = HashMap::new();
        for owner in owners.values() {
            *shares.entry(*owner).or_default() += 1;
        }
        shares
    }

    #[test]
    fn three_fresh_nodes_split_every_shard_evenly() {
        let mut owners = HashMap::new();
        let shares = settle(&["a", "b", "c"], &mut owners);
        assert_eq!(owners.len(), VIRTUAL_SHARDS as usize);
        assert_eq!(shares["a"], 1366);
        assert_eq!(shares["b"], 1365);
        assert_eq!(shares["c"], 1365);
    }

    #[test]
    fn a_joining_node_gets_its_share_by_hand_off() {
        let mut owners = HashMap::new();
        settle(&["a", "b", "c"], &mut owners);
        let before = owners.clone();
        let shares = settle(&["a", "b", "c", "d"], &mut owners);
        assert_eq!(owners.len(), VIRTUAL_SHARDS as usize);
        assert!(
            ["a", "b", "c", "d"].iter().all(|n| shares[n] == 1024),
            "{shares:?}"
        );
        let moved = before.iter().filter(|(s, o)| owners[*s] != **o).count();
        assert_eq!(moved, 1024, "only the joiner's share moves");
    }

    #[test]
    fn a_dead_nodes_shards_go_to_the_survivors_once_its_leases_expire() {
        let mut owners = HashMap::new();
        settle(&["a", "b", "c"], &mut owners);
        let survivors = ["a", "b"];
        let still_leased = owners.clone();
        let held: Vec<HeldLease> = still_leased
            .iter()
            .map(|(&shard, &owner)| HeldLease { shard, owner })
            .collect();
        assert!(
            plan_moves("a", &survivors, &held).acquire.is_empty(),
            "an unexpired lease is never taken"
        );
        owners.retain(|_, owner| *owner != "c");
        let shares = settle(&survivors, &mut owners);
        assert_eq!((shares["a"], shares["b"]), (2048, 2048));
    }

    #[test]
    fn a_node_not_yet_seen_alive_plans_nothing() {
        assert_eq!(plan_moves("z", &["a"], &[]), Moves::default());
    }

    #[test]
    fn nodes_racing_for_free_shards_prefer_different_ones() {
        let a = by_preference("a", (0..VIRTUAL_SHARDS).map(ShardId).collect());
        let b = by_preference("b", (0..VIRTUAL_SHARDS).map(ShardId).collect());
        let overlap = a[..100].iter().filter(|s| b[..100].contains(s)).count();
        assert!(overlap < 20, "{overlap} of the first 100 in common");
    }
}
