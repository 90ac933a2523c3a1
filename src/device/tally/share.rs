//! One node's part of a fleet view, and the sum of the parts. Pure.
//!
//! Each node counts the shards it runs, so a fleet view is the sum of every node's part.
//! The sum is exact only when each of the [`VIRTUAL_SHARDS`] shards is counted by exactly
//! one node: right after a node starts, fails or leaves, a shard may be waiting for its
//! recount on its new owner (counted nowhere), or counted by its new owner before the old
//! one noticed it lost it (counted twice). Such a sum is refused, not approximated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::VIRTUAL_SHARDS;
use crate::ddm::fleet::DeclarationCounts;

/// Which fleet view a node is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "view", rename_all = "snake_case")]
pub enum FleetView {
    /// Per declaration: enrollments assigned, and in each state.
    Declarations,
    /// Enrollments per sync-doctor rule at `as_of` (a minute boundary, Unix seconds).
    Diagnosis { as_of: i64 },
}

/// One node's part of a fleet view (or the sum of every node's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetShare {
    /// The shards counted, ascending.
    pub shards: Vec<u32>,
    pub enrollments: u64,
    /// Enrollments read by the node's recount walk in progress (or its last one).
    pub walked: u64,
    #[serde(default)]
    pub declarations: BTreeMap<String, BTreeMap<String, u64>>,
    #[serde(default)]
    pub rules: BTreeMap<String, u64>,
}

/// Why the parts do not add up to the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incomplete {
    /// Shards counted by exactly one node.
    pub counted: usize,
    /// Shards counted by more than one node.
    pub twice: usize,
    /// Enrollments read so far by the recount walks in progress.
    pub walked: u64,
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {VIRTUAL_SHARDS} shards counted ({} enrollments read by recounts in progress",
            self.counted, self.walked
        )?;
        if self.twice > 0 {
            write!(f, "; {} shards changing owner", self.twice)?;
        }
        write!(f, ")")
    }
}

/// The fleet view with owned keys, as it travels between nodes.
pub fn owned_keys(counts: DeclarationCounts) -> BTreeMap<String, BTreeMap<String, u64>> {
    counts
        .into_iter()
        .map(|(id, states)| {
            let states = states.into_iter().map(|(s, n)| (s.to_string(), n));
            (id, states.collect())
        })
        .collect()
}

impl FleetShare {
    /// The sum of every node's part, if every shard is counted by exactly one of them.
    pub fn sum(parts: impl IntoIterator<Item = FleetShare>) -> Result<FleetShare, Incomplete> {
        let mut counted_by = vec![0u32; VIRTUAL_SHARDS as usize];
        let mut sum = FleetShare::default();
        for part in parts {
            for &shard in &part.shards {
                if let Some(nodes) = counted_by.get_mut(shard as usize) {
                    *nodes += 1;
                }
            }
            sum.enrollments += part.enrollments;
            sum.walked += part.walked;
            for (identifier, states) in part.declarations {
                let into = sum.declarations.entry(identifier).or_default();
                for (state, n) in states {
                    *into.entry(state).or_default() += n;
                }
            }
            for (rule, n) in part.rules {
                *sum.rules.entry(rule).or_default() += n;
            }
        }
        let once = counted_by.iter().filter(|&&nodes| nodes == 1).count();
        let twice = counted_by.iter().filter(|&&nodes| nodes > 1).count();
        if once < VIRTUAL_SHARDS as usize {
            return Err(Incomplete {
                counted: once,
                twice,
                walked: sum.walked,
            });
        }
        sum.shards = (0..VIRTUAL_SHARDS).collect();
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(shards: std::ops::Range<u32>, enrollments: u64, rule_hits: u64) -> FleetShare {
        let declarations = BTreeMap::from([(
            "cfg".to_string(),
            BTreeMap::from([("assigned".to_string(), enrollments)]),
        )]);
        FleetShare {
            shards: shards.collect(),
            enrollments,
            walked: 0,
            declarations,
            rules: BTreeMap::from([("SD-E03".to_string(), rule_hits)]),
        }
    }

    #[test]
    fn the_fleet_is_the_sum_of_parts_that_cover_every_shard_once() {
        let sum = FleetShare::sum([part(0..1000, 10, 1), part(1000..VIRTUAL_SHARDS, 5, 2)]);
        let sum = sum.expect("every shard once");
        assert_eq!(sum.enrollments, 15);
        assert_eq!(sum.declarations["cfg"]["assigned"], 15);
        assert_eq!(sum.rules["SD-E03"], 3);
    }

    #[test]
    fn a_shard_counted_nowhere_refuses_the_sum() {
        let missing = FleetShare::sum([part(0..1000, 10, 1), part(1001..VIRTUAL_SHARDS, 5, 2)]);
        assert_eq!(
            missing.unwrap_err(),
            Incomplete {
                counted: VIRTUAL_SHARDS as usize - 1,
                twice: 0,
                walked: 0
            }
        );
    }

    #[test]
    fn a_shard_counted_by_two_nodes_refuses_the_sum() {
        let twice = FleetShare::sum([part(0..1001, 10, 1), part(1000..VIRTUAL_SHARDS, 5, 2)]);
        let refused = twice.unwrap_err();
        assert_eq!(
            (refused.counted, refused.twice),
            (VIRTUAL_SHARDS as usize - 1, 1)
        );
        assert!(refused.to_string().contains("1 shards changing owner"));
    }

    #[test]
    fn parts_travel_as_json_unchanged() {
        let part = part(7..9, 3, 1);
        let json = serde_json::to_vec(&part).unwrap();
        assert_eq!(serde_json::from_slice::<FleetShare>(&json).unwrap(), part);
        let view = FleetView::Diagnosis { as_of: 120 };
        let json = serde_json::to_string(&view).unwrap();
        assert_eq!(json, r#"{"view":"diagnosis","as_of":120}"#);
        assert_eq!(serde_json::from_str::<FleetView>(&json).unwrap(), view);
    }
}
