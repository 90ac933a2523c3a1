//! A fleet view over every node: this node's part and each live peer's, summed. Without a
//! cluster there are no peers and this node's part is the fleet.

use bytes::Bytes;
use futures_util::future::join_all;

use super::{FleetShare, FleetView, Incomplete};
use crate::device::Registry;

/// The fleet's `view`, if every shard is counted by exactly one node now.
pub async fn fleet_view(registry: &Registry, view: FleetView) -> Result<FleetShare, Incomplete> {
    let Some(peers) = registry.peers.get() else {
        return FleetShare::sum([this_nodes_part(registry, view).await]);
    };
    let query = Bytes::from(serde_json::to_vec(&view).expect("a view serialises"));
    let asks = peers.other_nodes().into_iter().map(|url| {
        let query = query.clone();
        async move {
            let answer = peers.fleet_part(&url, query).await;
            let part = answer.and_then(|body| {
                serde_json::from_slice::<FleetShare>(&body).map_err(|e| e.to_string())
            });
            part.map_err(|e| {
                metrics::counter!("orchard_fleet_parts_failed_total").increment(1);
                tracing::warn!(peer = %url, error = %e, "a node did not give its part of a fleet view");
            })
        }
    });
    let (local, remote) =
        futures_util::future::join(this_nodes_part(registry, view), join_all(asks)).await;
    FleetShare::sum(std::iter::once(local).chain(remote.into_iter().flatten()))
}

/// This node's part of `view`. In a cluster, the catalog first takes in any change the
/// store holds, so every node evaluates its counts against the same declarations.
pub async fn this_nodes_part(registry: &Registry, view: FleetView) -> FleetShare {
    let catalog = registry.catalog();
    if registry.peers.get().is_some() {
        if let Err(e) = catalog.catch_up().await {
            tracing::warn!(error = %e, "fleet view: cannot re-read the catalog; using the one in memory");
        }
    }
    registry.tally().share(view, &|sets| catalog.manifest(sets))
}
