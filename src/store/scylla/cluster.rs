//! The cluster's shared record on CQL (`cluster_nodes`, `shard_owners`): the
//! [`Directory`] the nodes coordinate through. Shard rows change only by lightweight
//! transactions (LOCAL_SERIAL), conditioned on the owner and epoch the caller last saw.

use async_trait::async_trait;
use std::collections::BTreeMap;

use futures_util::future::{join_all, try_join_all};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue};

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
        let buckets = (0..VIRTUAL_SHARDS / SHARDS_PER_BUCKET).map(|b| self.bucket_rows(b as i32));
        Ok(try_join_all(buckets).await?.into_iter().flatten().collect())
    }

    async fn shard(&self, shard: ShardId) -> StoreResult<Option<ShardRow>> {
        let rows = self.bucket_rows(bucket(shard)).await?;
        Ok(rows.into_iter().find(|row| row.shard == shard))
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
            // Usually every condition of a bucket holds (a first start, a hand-off, a
            // dead node's shards): one conditional batch for all of them. If it loses,
            // each move is tried alone, so the ones whose condition holds still apply.
            if chain.len() > 1 {
                if let Ok(true) = self.move_shards_at_once(&chain).await {
                    return chain
                        .into_iter()
                        .map(|(index, _)| (index, Ok(true)))
                        .collect();
                }
            }
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
    /// The rows of one `shard_owners` partition (256 shards).
    async fn bucket_rows(&self, bucket: i32) -> StoreResult<Vec<ShardRow>> {
        let rows: Vec<(i32, String, i64)> = self
            .rows("cluster_shards", &self.statements.shard_owners, (bucket,))
            .await?;
        Ok(rows
            .into_iter()
            .filter(|(shard, _, _)| (0..VIRTUAL_SHARDS as i32).contains(shard))
            .map(|(shard, owner, epoch)| ShardRow {
                shard: ShardId(shard as u32),
                owner,
                epoch: epoch.max(0) as u64,
            })
            .collect())
    }

    /// Every move of one bucket in one conditional batch: all apply, or none.
    async fn move_shards_at_once(&self, chain: &[(usize, ShardMove)]) -> StoreResult<bool> {
        let mut batch = Batch::new(BatchType::Logged);
        let mut values: Vec<Vec<CqlValue>> = Vec::with_capacity(chain.len());
        for (_, shard_move) in chain {
            let (statement, row) = self.move_statement(shard_move);
            batch.append_statement(statement.clone());
            values.push(row);
        }
        let result = self
            .run("cluster_move_shards", async {
                self.session
                    .batch(&batch, values)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        let (applied, _) = lwt_row(result)?;
        Ok(applied)
    }

    /// The conditional statement of one move and its values.
    fn move_statement(&self, shard_move: &ShardMove) -> (&PreparedStatement, Vec<CqlValue>) {
        let to = &shard_move.to;
        let (bucket, shard) = (
            CqlValue::Int(bucket(to.shard)),
            CqlValue::Int(to.shard.0 as i32),
        );
        let owner = CqlValue::Text(to.owner.clone());
        let epoch = CqlValue::BigInt(to.epoch as i64);
        match &shard_move.expected {
            None => (
                &self.statements.claim_new_shard,
                vec![bucket, shard, owner, epoch],
            ),
            Some(from) => (
                &self.statements.move_shard,
                vec![
                    owner,
                    epoch,
                    bucket,
                    shard,
                    CqlValue::Text(from.owner.clone()),
                    CqlValue::BigInt(from.epoch as i64),
                ],
            ),
        }
    }

    async fn move_shard(&self, shard_move: &ShardMove) -> StoreResult<bool> {
        let (statement, values) = self.move_statement(shard_move);
        let result = self
            .run("cluster_move_shard", async {
                self.session
                    .execute_unpaged(statement, values)
                    .await
                    .map_err(unavailable)
            })
            .await?;
        let (applied, _) = lwt_row(result)?;
        Ok(applied)
    }
}
