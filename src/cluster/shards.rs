//! Placement of devices on nodes. Every device id maps to one of a fixed number of
//! virtual shards from day one, so that a cluster can later move whole shards between
//! nodes without rehashing devices. A device's user channels live on its shard.

use xxhash_rust::xxh3::xxh3_64;

/// Fixed forever: changing it would move every device.
pub const VIRTUAL_SHARDS: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardId(pub u32);

/// The shard of an enrollment id; user channels (`<device>:<user>`) follow their device.
pub fn shard_of(enrollment_id: &str) -> ShardId {
    let device_id = enrollment_id.split(':').next().unwrap_or(enrollment_id);
    ShardId((xxh3_64(device_id.as_bytes()) % u64::from(VIRTUAL_SHARDS)) as u32)
}

/// Which node owns each virtual shard, fixed for the life of the process: the placement of
/// the one-node deployments (embedded, or CQL without `--cluster-secret`).
#[derive(Clone, Debug)]
pub struct ShardMap {
    local_node: String,
    owners: Vec<String>,
}

impl ShardMap {
    /// One node owning every shard: the embedded single-node deployment.
    pub fn single_node(node: &str) -> Self {
        ShardMap {
            local_node: node.to_string(),
            owners: vec![node.to_string(); VIRTUAL_SHARDS as usize],
        }
    }

    pub fn owner(&self, shard: ShardId) -> &str {
        &self.owners[shard.0 as usize]
    }

    pub fn is_local(&self, shard: ShardId) -> bool {
        self.owner(shard) == self.local_node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_channels_live_on_their_device_shard() {
        let device = "66ADE930-5FDF-5EC4-8429-15640684C489";
        assert_eq!(shard_of(device), shard_of(&format!("{device}:501")));
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        let shard = shard_of("00008103-000A1D2E0C38001E");
        assert_eq!(shard, shard_of("00008103-000A1D2E0C38001E"));
        assert!(shard.0 < VIRTUAL_SHARDS);
    }

    #[test]
    fn a_single_node_owns_every_shard() {
        let map = ShardMap::single_node("node-a");
        assert!((0..VIRTUAL_SHARDS).all(|s| map.is_local(ShardId(s))));
    }
}
