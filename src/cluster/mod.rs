//! The cluster: which node runs which devices.
//!
//! Every device maps to one of [`VIRTUAL_SHARDS`] fixed virtual shards (`shards.rs`), and a
//! shard is run by exactly one node at a time. This module owns how that holds when nodes
//! come, go, pause or are cut off:
//!
//! * `balance.rs` (pure) decides, from who is alive and who holds what, which shards this
//!   node should take and which it should hand over, so every node converges on an even
//!   share without talking to the others;
//! * `fence.rs` (pure) derives write timestamps from a shard's lease epoch, so a write by a
//!   stale owner (paused past its lease, cut off) always loses to the new owner's.

//! * `directory.rs` is the shared record the nodes coordinate through (kept by the CQL
//!   store: node heartbeats, shard owners changed only by conditional writes);
//! * `node.rs` runs this node's part: heartbeats, judging the others, taking and handing
//!   over shards, and telling the device layer what it may serve (see its safety rule).

mod balance;
mod directory;
mod fence;
mod node;
mod shards;

pub use balance::{plan_moves, HeldLease, Moves};
pub use directory::{Directory, NodeRow, ShardMove, ShardRow};
pub use fence::{fenced_timestamp, MAX_EPOCH};
pub use node::{ClusterNode, ClusterSettings, NodeStatus, ShardHost};
pub use shards::{shard_of, ShardId, ShardMap, VIRTUAL_SHARDS};

/// Where requests for a shard's devices go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node serves the shard.
    Local,
    /// Another live node holds the shard's lease; `url` is its advertised base URL.
    Peer { node_id: String, url: String },
    /// No node can serve it now (it is moving, or its owner stopped): 503, retry later.
    Unavailable,
}

/// The epoch under which this node may write a shard's rows now, if it may; the CQL store
/// asks before every device write and stamps the write with it.
pub trait WriteFence: Send + Sync {
    fn write_epoch(&self, shard: ShardId) -> Option<u64>;
}

/// Which devices this node may serve now; the registry asks before starting an actor.
pub trait Placement: Send + Sync {
    fn accepts(&self, shard: ShardId) -> bool;
}

impl Placement for ShardMap {
    fn accepts(&self, shard: ShardId) -> bool {
        self.is_local(shard)
    }
}
