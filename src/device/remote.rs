//! Messages for actors that may live on another node (cluster mode).
//!
//! An admin call names devices; in a cluster each device's actor runs on the node that
//! owns its shard. [`Registry::call_all`] splits the ids by route: the ones served here
//! go to local actors, and each other owner gets one batch (`POST
//! /internal/actors/{kind}`, JSON: the message once, then the ids), all in parallel. The
//! owner answers them with [`answer_batch`] from its own actors, in order. Ids with no
//! owner in this node's view (a shard handed over moments ago), ids a peer refused (it
//! lost the shard) and ids that could not reach it are routed again once, from the
//! shard's row read then; whatever still fails answers `NotLocal` (503,
//! retry) — never another node's stale answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::{Handler, Message};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::{stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::messages::{
    AssignSet, Assigned, Cancel, DdmView, DeviceSnapshot, Enqueue, GetDdmView, GetPushTarget,
    ImportCheckin, InvalidatePushToken, PushDecision, Snapshot, SyncCommand, SyncDeclarations,
};
use super::{DeviceActor, DeviceError, Registry};
use crate::cluster::{shard_of, Route, ShardId};
use crate::push::{PushOutcome, PushTarget};

/// How many device actors one call talks to at once on this node.
pub const FAN_OUT: usize = 512;

/// Ids per batch sent to one peer: large enough to amortise a request, small enough
/// that a 10,000-id call is answered by several streams in parallel.
const PEER_BATCH: usize = 2_000;

/// How the registry reaches the other nodes of a cluster (implemented by
/// `crate::forward::Forwarder`).
#[async_trait]
pub trait Peers: Send + Sync {
    /// Where the devices of `shard` are served, as last seen.
    fn route(&self, shard: ShardId) -> Route;

    /// The route read afresh, after the last one failed.
    async fn reroute(&self, shard: ShardId) -> Route;

    /// Send one batch to the actors of the node at `url`; answers the reply body.
    async fn deliver(&self, url: &str, kind: &'static str, batch: Bytes) -> Result<Bytes, String>;

    /// Ask the node at `url` to push these targets (JSON), its own devices; answers the
    /// outcomes (JSON).
    async fn push(&self, url: &str, targets: Bytes) -> Result<Bytes, String>;

    /// The advertised URLs of the other live nodes.
    fn other_nodes(&self) -> Vec<String>;

    /// Ask the node at `url` for its part of a fleet view (JSON `FleetView`); answers its
    /// `FleetShare` (JSON).
    async fn fleet_part(&self, url: &str, view: Bytes) -> Result<Bytes, String>;
}

/// A message an actor on another node can answer.
pub trait RemoteMessage:
    Message<Result = Result<Self::Reply, DeviceError>>
    + Clone
    + Send
    + Serialize
    + DeserializeOwned
    + 'static
{
    type Reply: Send + Serialize + DeserializeOwned + 'static;

    /// Its name in `/internal/actors/{kind}`.
    const KIND: &'static str;

    /// Ready a message that arrived from a peer for this node's actors.
    fn arrived(self, _registry: &Registry) -> Self {
        self
    }
}

/// One batch on the wire.
#[derive(Serialize, Deserialize)]
struct Batch<M> {
    message: M,
    ids: Vec<String>,
}

type Answer<M> = Result<<M as RemoteMessage>::Reply, DeviceError>;

impl Registry {
    /// Let `call_all` reach actors on other nodes.
    pub fn reach_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    /// Send `msg` to the actor of every id, wherever it runs; answers in the order of
    /// `ids`.
    pub async fn call_all<M>(self: &Arc<Self>, ids: &[String], msg: M) -> Vec<(String, Answer<M>)>
    where
        M: RemoteMessage,
        DeviceActor: Handler<M>,
    {
        let Some(peers) = self.peers.get() else {
            return self.call_here(ids, msg).await;
        };
        let mut answers: Vec<Option<Answer<M>>> = ids.iter().map(|_| None).collect();
        let first: Vec<(usize, Route)> = ids
            .iter()
            .enumerate()
            .map(|(index, id)| (index, peers.route(shard_of(id))))
            .collect();
        let retry = self
            .call_routed(peers.as_ref(), ids, &msg, first, &mut answers)
            .await;
        let mut fresh: HashMap<ShardId, Route> = HashMap::new();
        let mut second = Vec::with_capacity(retry.len());
        for index in retry {
            let shard = shard_of(&ids[index]);
            let route = match fresh.get(&shard) {
                Some(route) => route.clone(),
                None => {
                    let route = peers.reroute(shard).await;
                    fresh.insert(shard, route.clone());
                    route
                }
            };
            second.push((index, route));
        }
        for index in self
            .call_routed(peers.as_ref(), ids, &msg, second, &mut answers)
            .await
        {
            answers[index] = Some(Err(DeviceError::NotLocal));
        }
        ids.iter()
            .cloned()
            .zip(
                answers
                    .into_iter()
                    .map(|a| a.unwrap_or(Err(DeviceError::NotLocal))),
            )
            .collect()
    }

    /// Where `id`'s actor runs, as last seen (here, on a single node).
    pub fn route_of(&self, id: &str) -> Route {
        self.peers
            .get()
            .map_or(Route::Local, |peers| peers.route(shard_of(id)))
    }

    /// Have the node at `url` push `targets` (devices it owns) with its own APNs pools;
    /// their outcomes in order, or `None` when it could not be asked.
    pub async fn push_at(&self, url: &str, targets: &[PushTarget]) -> Option<Vec<PushOutcome>> {
        let peers = self.peers.get()?;
        let body = serde_json::to_vec(targets).ok()?;
        let reply = match peers.push(url, Bytes::from(body)).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(peer = url, error = %e, "peer did not take a push batch");
                return None;
            }
        };
        serde_json::from_slice::<Vec<PushOutcome>>(&reply)
            .ok()
            .filter(|outcomes| outcomes.len() == targets.len())
    }

    /// The same as `call_all`, for one id.
    pub async fn call_anywhere<M>(self: &Arc<Self>, id: &str, msg: M) -> Answer<M>
    where
        M: RemoteMessage,
        DeviceActor: Handler<M>,
    {
        let ids = [id.to_string()];
        match self.call_all(&ids, msg).await.pop() {
            Some((_, answer)) => answer,
            None => Err(DeviceError::Unavailable),
        }
    }

    /// Deliver `msg` to the routed ids; answers the indices worth one more route (no
    /// owner in sight, or their peer refused them or was unreachable).
    async fn call_routed<M>(
        self: &Arc<Self>,
        peers: &dyn Peers,
        ids: &[String],
        msg: &M,
        routes: Vec<(usize, Route)>,
        answers: &mut [Option<Answer<M>>],
    ) -> Vec<usize>
    where
        M: RemoteMessage,
        DeviceActor: Handler<M>,
    {
        let mut here = Vec::new();
        let mut retry = Vec::new();
        let mut by_peer: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (index, route) in routes {
            match route {
                Route::Local => here.push(index),
                Route::Peer { url, .. } => by_peer.entry(url).or_default().push(index),
                // Ids with no owner in sight are routed again from the shard's row.
                Route::Unavailable => retry.push(index),
            }
        }
        let local_ids: Vec<String> = here.iter().map(|&i| ids[i].clone()).collect();
        let local = self.call_here(&local_ids, msg.clone());
        let remote = join_all(by_peer.iter().flat_map(|(url, indices)| {
            indices.chunks(PEER_BATCH).map(move |chunk| async move {
                let chunk_ids: Vec<String> = chunk.iter().map(|&i| ids[i].clone()).collect();
                (chunk, deliver_batch(peers, url, msg, chunk_ids).await)
            })
        }));
        let (local, remote) = futures_util::join!(local, remote);
        for (&index, (_, answer)) in here.iter().zip(local) {
            answers[index] = Some(answer);
        }
        for (chunk, delivered) in remote {
            match delivered {
                Some(replies) => {
                    for (&index, answer) in chunk.iter().zip(replies) {
                        match answer {
                            Err(DeviceError::NotLocal) => retry.push(index),
                            answer => answers[index] = Some(answer),
                        }
                    }
                }
                None => retry.extend_from_slice(chunk),
            }
        }
        retry
    }

    /// Send `msg` to the local actor of every id, `FAN_OUT` at a time.
    async fn call_here<M>(self: &Arc<Self>, ids: &[String], msg: M) -> Vec<(String, Answer<M>)>
    where
        M: RemoteMessage,
        DeviceActor: Handler<M>,
    {
        stream::iter(ids)
            .map(|id| {
                let msg = msg.clone();
                async move { (id.clone(), self.call(id, msg).await) }
            })
            .buffered(FAN_OUT)
            .collect()
            .await
    }
}

/// One batch to one peer; `None` when it could not be delivered or its answer makes no
/// sense (wrong count, undecodable).
async fn deliver_batch<M: RemoteMessage>(
    peers: &dyn Peers,
    url: &str,
    msg: &M,
    ids: Vec<String>,
) -> Option<Vec<Answer<M>>> {
    let count = ids.len();
    let batch = serde_json::to_vec(&Batch {
        message: msg.clone(),
        ids,
    })
    .ok()?;
    let reply = match peers.deliver(url, M::KIND, Bytes::from(batch)).await {
        Ok(reply) => reply,
        Err(e) => {
            tracing::warn!(peer = url, kind = M::KIND, error = %e, "peer did not take a batch");
            return None;
        }
    };
    let answers: Vec<Answer<M>> = match serde_json::from_slice(&reply) {
        Ok(answers) => answers,
        Err(e) => {
            tracing::warn!(peer = url, kind = M::KIND, error = %e, "peer's answer is undecodable");
            return None;
        }
    };
    if answers.len() != count {
        tracing::warn!(
            peer = url,
            kind = M::KIND,
            "peer answered a batch it was not sent"
        );
        return None;
    }
    Some(answers)
}

/// Why a batch from a peer could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("no such actor message kind: {0}")]
    UnknownKind(String),
    #[error("malformed batch: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Answer a batch a peer sent (`kind` from the path, `body` as sent) from this node's
/// actors only: an id whose shard is not served here answers `NotLocal`, and the
/// sender routes it again.
pub async fn answer_batch(
    registry: &Arc<Registry>,
    kind: &str,
    body: &[u8],
) -> Result<Vec<u8>, BatchError> {
    match kind {
        Enqueue::KIND => answer::<Enqueue>(registry, body).await,
        Cancel::KIND => answer::<Cancel>(registry, body).await,
        GetPushTarget::KIND => answer::<GetPushTarget>(registry, body).await,
        Snapshot::KIND => answer::<Snapshot>(registry, body).await,
        InvalidatePushToken::KIND => answer::<InvalidatePushToken>(registry, body).await,
        AssignSet::KIND => answer::<AssignSet>(registry, body).await,
        SyncDeclarations::KIND => answer::<SyncDeclarations>(registry, body).await,
        GetDdmView::KIND => answer::<GetDdmView>(registry, body).await,
        ImportCheckin::KIND => answer::<ImportCheckin>(registry, body).await,
        other => Err(BatchError::UnknownKind(other.to_string())),
    }
}

async fn answer<M>(registry: &Arc<Registry>, body: &[u8]) -> Result<Vec<u8>, BatchError>
where
    M: RemoteMessage,
    DeviceActor: Handler<M>,
{
    let batch: Batch<M> = serde_json::from_slice(body)?;
    let message = batch.message.arrived(registry);
    let answers: Vec<Answer<M>> = registry
        .call_here(&batch.ids, message)
        .await
        .into_iter()
        .map(|(_, answer)| answer)
        .collect();
    Ok(serde_json::to_vec(&answers)?)
}

impl RemoteMessage for Enqueue {
    type Reply = PushDecision;
    const KIND: &'static str = "enqueue";

    fn arrived(self, registry: &Registry) -> Self {
        Enqueue {
            command: registry.intern_body((*self.command).clone()),
            ..self
        }
    }
}

impl RemoteMessage for Cancel {
    type Reply = bool;
    const KIND: &'static str = "cancel";
}

impl RemoteMessage for GetPushTarget {
    type Reply = PushTarget;
    const KIND: &'static str = "push-target";
}

impl RemoteMessage for Snapshot {
    type Reply = DeviceSnapshot;
    const KIND: &'static str = "snapshot";
}

impl RemoteMessage for InvalidatePushToken {
    type Reply = ();
    const KIND: &'static str = "invalidate-push-token";
}

impl RemoteMessage for AssignSet {
    type Reply = Assigned;
    const KIND: &'static str = "assign-set";

    fn arrived(self, registry: &Registry) -> Self {
        AssignSet {
            then_sync: self.then_sync.map(|sync| sync.interned(registry)),
            ..self
        }
    }
}

impl RemoteMessage for SyncDeclarations {
    type Reply = PushDecision;
    const KIND: &'static str = "sync-declarations";

    fn arrived(self, registry: &Registry) -> Self {
        SyncDeclarations {
            command: self.command.interned(registry),
        }
    }
}

impl RemoteMessage for GetDdmView {
    type Reply = DdmView;
    const KIND: &'static str = "ddm-view";
}

impl RemoteMessage for ImportCheckin {
    type Reply = ();
    const KIND: &'static str = "import-checkin";
}

impl SyncCommand {
    /// The shared body as this node's queues share it.
    fn interned(self, registry: &Registry) -> Self {
        match self {
            SyncCommand::Shared(command) => {
                SyncCommand::Shared(registry.intern_body((*command).clone()))
            }
            own => own,
        }
    }
}
