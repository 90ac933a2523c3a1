//! The shared record the nodes coordinate through: who is alive and who owns which shard.
//! The CQL store keeps it (`cluster_nodes`, `shard_owners` in `schema.cql`); every change
//! of a shard's owner is a conditional write, so two nodes never both win one shard.

use async_trait::async_trait;

use super::shards::ShardId;
use crate::store::StoreResult;

/// A node's row: rewritten on every heartbeat with a larger `heartbeat`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    pub advertise_url: String,
    pub heartbeat: i64,
    /// Wall-clock time of the beat (Unix millis), only for people to read.
    pub beat_at_millis: i64,
}

/// A shard's owner and the epoch of its lease; an empty `owner` is a shard handed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardRow {
    pub shard: ShardId,
    pub owner: String,
    pub epoch: u64,
}

#[async_trait]
pub trait Directory: Send + Sync {
    /// Write this node's row (not conditional: each node writes only its own).
    async fn beat(&self, row: &NodeRow) -> StoreResult<()>;

    /// Remove a node's row (a node leaving for good).
    async fn forget_node(&self, node_id: &str) -> StoreResult<()>;

    async fn nodes(&self) -> StoreResult<Vec<NodeRow>>;

    /// Every shard that has had an owner.
    async fn shards(&self) -> StoreResult<Vec<ShardRow>>;

    /// One shard's row, read now (a request is re-routed after its owner refused it).
    async fn shard(&self, shard: ShardId) -> StoreResult<Option<ShardRow>>;

    /// For each [`ShardMove`], make `to` the shard's row if the row is still `expected`;
    /// per move, in order, `Ok(false)` when another change came first.
    async fn move_shards(&self, moves: Vec<ShardMove>) -> Vec<StoreResult<bool>>;
}

/// One conditional change of a shard's row.
#[derive(Clone, Debug)]
pub struct ShardMove {
    /// The row as the mover last saw it; `None`: never written.
    pub expected: Option<ShardRow>,
    pub to: ShardRow,
}
