//! The cluster's shared record on CQL (`cluster_nodes`, `shard_owners`): the
//! [`Directory`] the nodes coordinate through. Shard rows change only by lightweight
//! transactions (LOCAL_SERIAL), conditioned on the owner and epoch the caller last saw.

use async_trait::async_trait;
use std::collections::BTreeMap;

use futures_util::future::{join_all, try_join_all};
use scylla::value::CqlTimestamp;

use super::{lwt_row, unavailable, ScyllaStore};
use crate::cluster::{Directory, NodeRow, ShardId, ShardMove, ShardRow, VIRTUAL_SHARDS};
use crate::store::StoreResult;

/// The one partition of `cluster_nodes`.
pub(super) const CLUSTER: &str = "orchard";

/// `shard_owners` partitions: 16 of 256 shards, read whole every round.
const SHARDS_PER_BUCKET: u32 = 256;

fn bucket(shard: ShardId) -> i32 {
    (shard.0 / SHARDS_PER_BUCKET) as i32
}

#[async_trait]
impl Directory for ScyllaStore {
    async fn beat(&self, row: &NodeRow) -> StoreResult<()> {
        let values = (
            row.node_id.as_str(),
            row.advertise_url.as_str(),
            row.heartbeat,
            CqlTimestamp(row.beat_at_millis),
        );
        self.execute("cluster_beat", &self.statements.put_node, values)
            .await
            .map(drop)
    }

    async fn forget_node(&self, node_id: &str) -> StoreResult<()> {
        self.execute(
            "cluster_forget_node",
            &self.statements.forget_node,
            (node_id,),
        )
        .await
        .map(drop)
    }

    async fn nodes(&self) -> StoreResult<Vec<NodeRow>> {
        let rows: Vec<(String, String, i64, CqlTimestamp)> = self
            .rows("cluster_nodes", &self.statements.nodes, ())
            .await?;
        Ok(rows
            .into_iter()
            .map(|(node_id, advertise_url, heartbeat, beat_at)| NodeRow {
                node_id,
                advertise_url,
                heartbeat,
                beat_at_millis: beat_at.0,
            })
            .collect())
    }

    async fn shards(&self) -> StoreResult<Vec<ShardRow>> {
        let buckets = (0..VIRTUAL_SHARDS / SHARDS_PER_BUCKET).map(|b| async move {
            let rows: Vec<(i32, String, i64)> = self
                .rows("cluster_shards", &self.statements.shard_owners, (b as i32,))
                .await?;
            StoreResult::Ok(rows)
        });
        let rows = try_join_all(buckets).await?.into_iter().flatten();
        Ok(rows
            .filter(|(shard, _, _)| (0..VIRTUAL_SHARDS as i32).contains(shard))
            .map(|(shard, owner, epoch)| ShardRow {
                shard: ShardId(shard as u32),
                owner,
                epoch: epoch.max(0) as u64,
            })
            .collect())
    }

    async fn move_shards(&self, moves: Vec<ShardMove>) -> Vec<StoreResult<bool>> {
        // Conditional writes to one partition contend in Paxos: one at a time per bucket,
        // the buckets in parallel.
        let count = moves.len();
        let mut by_bucket: BTreeMap<i32, Vec<(usize, ShardMove)>> = BTreeMap::new();
        for (index, shard_move) in moves.into_iter().enumerate() {
            by_bucket
                .entry(bucket(shard_move.to.shard))
                .or_default()
                .push((index, shard_move));
        }
        let chains = by_bucket.into_values().map(|chain| async move {
            let mut outcomes = Vec::with_capacity(chain.len());
            for (index, shard_move) in chain {
                outcomes.push((index, self.move_shard(&shard_move).await));
            }
            outcomes
        });
        let mut outcomes: Vec<Option<StoreResult<bool>>> = (0..count).map(|_| None).collect();
        for (index, outcome) in join_all(chains).await.into_iter().flatten() {
            outcomes[index] = Some(outcome);
        }
        outcomes.into_iter().flatten().collect()
    }
}

impl ScyllaStore {
    async fn move_shard(&self, shard_move: &ShardMove) -> StoreResult<bool> {
        let to = &shard_move.to;
        let (bucket, shard) = (bucket(to.shard), to.shard.0 as i32);
        let result = self
            .run("cluster_move_shard", async {
                match &shard_move.expected {
                    None => {
                        let values = (bucket, shard, to.owner.as_str(), to.epoch as i64);
                        self.session
                            .execute_unpaged(&self.statements.claim_new_shard, values)
                            .await
                    }
                    Some(from) => {
                        let values = (
                            to.owner.as_str(),
                            to.epoch as i64,
                            bucket,
                            shard,
                            from.owner.as_str(),
                            from.epoch as i64,
                        );
                        self.session
                            .execute_unpaged(&self.statements.move_shard, values)
                            .await
                    }
                }
                .map_err(unavailable)
            })
            .await?;
        let (applied, _) = lwt_row(result)?;
        Ok(applied)
    }
}
