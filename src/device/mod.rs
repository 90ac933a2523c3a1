//! Device actors and the registry that finds them.
//!
//! Each enrollment (device or user channel) is an actix actor that owns its command queue
//! and push state. It is activated by the first message for it (loading its state from
//! the store), passivated after an idle timeout or when the registry is over its resident
//! bound, and reloaded on the next message — so a million enrolled devices need only as
//! many resident actors as are active.
//!
//! Invariant: an actor's memory is never ahead of the store in a way anyone can observe.
//! Mutating handlers run as atomic responses (no other message interleaves), persist
//! before replying, and an actor whose write failed discards itself so the next message
//! reloads the durable truth.

mod actor;
mod declarative;
pub mod messages;
mod migration;
pub mod queue;
mod remote;
pub mod tally;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use actix::{Actor, Addr, Handler, MailboxError, Message};
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use actor::DeviceActor;
pub use remote::{answer_batch, BatchError, Peers, RemoteMessage, FAN_OUT};

use crate::cluster::{shard_of, Placement, ShardHost, ShardId};
use crate::ddm::catalog::Catalog;
use crate::store::{Store, StoreError, StoredCommand};
use tally::FleetTally;

/// How Orchard answers the first `UserAuthenticate` of a user channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserAuthenticatePolicy {
    /// 410 Gone: do not manage network users (NanoMDM's default).
    Decline,
    /// Accept with a zero-length DigestChallenge (no password check).
    EmptyChallenge,
}

/// Settings every device actor shares.
#[derive(Clone, Debug)]
pub struct DeviceSettings {
    pub idle_timeout: Duration,
    /// Re-push a device with pending commands that has not checked in for this long;
    /// repeats are spaced exponentially up to `repush_max_interval`.
    pub repush_after: Duration,
    pub repush_max_interval: Duration,
    pub max_resident: usize,
    pub user_authenticate: UserAuthenticatePolicy,
    /// The sync doctor's stall deadline (`--ddm-stall-after`), which the fleet tally's
    /// facts carry.
    pub ddm_stall_after_secs: i64,
    /// `--retro`: an enrollment imported through `/migration` binds the first identity
    /// certificate it presents (`migration.rs`).
    pub retro: bool,
}

/// Why a device message failed. It crosses between nodes (`remote.rs`), hence serde.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceError {
    #[error("enrollment {0} is unknown")]
    UnknownEnrollment(String),
    #[error("the identity certificate is not the one bound to enrollment {0}")]
    CertificateMismatch(String),
    #[error("the identity certificate is already bound to another enrollment")]
    CertificateBoundElsewhere,
    #[error("enrollment {0} has not sent Authenticate")]
    NotAuthenticated(String),
    #[error("{0} is only valid on the device channel")]
    DeviceChannelOnly(Cow<'static, str>),
    #[error("user authentication is declined by this server")]
    UserAuthenticateDeclined,
    #[error("no token service is configured for TokenServiceType {0}")]
    NoTokenService(String),
    #[error("declaration {0} is not in this enrollment's manifest")]
    DeclarationNotFound(String),
    #[error("unknown DeclarativeManagement endpoint {0:?}")]
    UnknownDdmEndpoint(String),
    #[error("the channel cannot be pushed: {0}")]
    NotPushable(Cow<'static, str>),
    #[error("storage failure: {0}")]
    Store(String),
    #[error("the device's shard is not served by this node now")]
    NotLocal,
    #[error("the device actor did not answer")]
    Unavailable,
    #[error("enrollment {0} was imported through /migration and has no identity certificate bound yet: start Orchard with --retro to bind the first certificate it presents, or re-enroll the device")]
    ImportedUnbound(String),
    #[error("enrollment {0} is bound to an identity certificate here already: a migration does not overwrite an enrollment that talks to this server")]
    AlreadyEnrolled(String),
    #[error("this check-in cannot be imported: {0}")]
    Unimportable(Cow<'static, str>),
}

impl DeviceError {
    /// Metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            DeviceError::UnknownEnrollment(_) => "unknown_enrollment",
            DeviceError::CertificateMismatch(_) => "certificate_mismatch",
            DeviceError::CertificateBoundElsewhere => "certificate_bound_elsewhere",
            DeviceError::NotAuthenticated(_) => "not_authenticated",
            DeviceError::DeviceChannelOnly(_) => "device_channel_only",
            DeviceError::UserAuthenticateDeclined => "user_authenticate_declined",
            DeviceError::NoTokenService(_) => "no_token_service",
            DeviceError::DeclarationNotFound(_) => "declaration_not_found",
            DeviceError::UnknownDdmEndpoint(_) => "unknown_ddm_endpoint",
            DeviceError::NotPushable(_) => "not_pushable",
            DeviceError::Store(_) => "store_failure",
            DeviceError::NotLocal => "not_local",
            DeviceError::Unavailable => "actor_unavailable",
            DeviceError::ImportedUnbound(_) => "imported_enrollment_unbound",
            DeviceError::AlreadyEnrolled(_) => "already_enrolled",
            DeviceError::Unimportable(_) => "unimportable_checkin",
        }
    }
}

impl From<StoreError> for DeviceError {
    fn from(e: StoreError) -> Self {
        match e {
            // Only certificate bindings are conditional: another device won the race.
            StoreError::Conflict(_) => DeviceError::CertificateBoundElsewhere,
            e => DeviceError::Store(e.to_string()),
        }
    }
}

/// Where an eviction sweep leaves the resident count, as a share of the bound.
const EVICT_TO_PERCENT: usize = 90;

struct Slot {
    addr: Addr<DeviceActor>,
    incarnation: u64,
    /// Unix millis of the last message; read by the eviction sweep.
    last_active: Arc<AtomicU64>,
}

/// Maps enrollment ids to resident actors and activates missing ones.
///
/// Must be used from inside an actix arbiter (HTTP workers are): new actors start on the
/// arbiter of the request that needed them.
pub struct Registry {
    slots: DashMap<String, Slot>,
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    settings: DeviceSettings,
    placement: Arc<dyn Placement>,
    incarnations: AtomicU64,
    /// Command bodies shared by every resident queue that holds them (a fleet-wide
    /// command is one allocation, not one per device).
    bodies: DashMap<String, Weak<StoredCommand>>,
    tally: FleetTally,
    /// The other nodes of a cluster, for actors not served here.
    peers: std::sync::OnceLock<Arc<dyn Peers>>,
    /// Set when webhooks are on: actors record events and tell the deliverer.
    webhooks: std::sync::OnceLock<crate::webhook::Notifier>,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        settings: DeviceSettings,
        placement: Arc<dyn Placement>,
    ) -> Arc<Self> {
        let tally = FleetTally::new(settings.ddm_stall_after_secs);
        Arc::new(Registry {
            slots: DashMap::new(),
            store,
            catalog,
            settings,
            placement,
            incarnations: AtomicU64::new(0),
            bodies: DashMap::new(),
            tally,
            peers: std::sync::OnceLock::new(),
            webhooks: std::sync::OnceLock::new(),
        })
    }

    /// From now on, actors record a webhook event for every accepted message and tell
    /// `notifier` once it is durable (set once, at startup).
    pub fn record_webhooks(&self, notifier: crate::webhook::Notifier) {
        let _ = self.webhooks.set(notifier);
    }

    /// The deliverer to tell, when webhooks are on.
    pub(crate) fn webhooks(&self) -> Option<&crate::webhook::Notifier> {
        self.webhooks.get()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn settings(&self) -> &DeviceSettings {
        &self.settings
    }

    /// The fleet tally the actors keep current.
    pub fn tally(&self) -> &FleetTally {
        &self.tally
    }

    pub fn resident_count(&self) -> usize {
        self.slots.len()
    }

    /// Send a message whose answer is itself a `Result<_, DeviceError>`.
    pub async fn call<M, T>(self: &Arc<Self>, id: &str, msg: M) -> Result<T, DeviceError>
    where
        M: Message<Result = Result<T, DeviceError>> + Clone + Send + 'static,
        T: Send + 'static,
        DeviceActor: Handler<M>,
    {
        self.send(id, msg).await?
    }

    /// Deliver a message to the enrollment's actor, activating it if needed. A message
    /// that races a passivating actor is redelivered to a fresh incarnation.
    pub async fn send<M>(self: &Arc<Self>, id: &str, msg: M) -> Result<M::Result, DeviceError>
    where
        M: Message + Clone + Send + 'static,
        M::Result: Send,
        DeviceActor: Handler<M>,
    {
        for _ in 0..3 {
            let (addr, incarnation) = self.activate(id)?;
            match addr.send(msg.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(MailboxError::Closed) => self.forget(id, incarnation),
                Err(MailboxError::Timeout) => break,
            }
        }
        Err(DeviceError::Unavailable)
    }

    /// The actor, only if it is resident (used to notify without activating).
    pub fn resident(&self, id: &str) -> Option<Addr<DeviceActor>> {
        self.slots.get(id).map(|slot| slot.addr.clone())
    }

    /// Ask the least recently active actors to leave when more are resident than allowed,
    /// down to [`EVICT_TO_PERCENT`] of the bound: the sweep scans every resident slot, so
    /// it should run once per burst of activations, not on every tick of one.
    pub fn evict_excess(&self) {
        let resident = self.slots.len();
        if resident <= self.settings.max_resident {
            return;
        }
        let excess = resident - self.settings.max_resident * EVICT_TO_PERCENT / 100;
        let mut by_age: Vec<(u64, Addr<DeviceActor>)> = self
            .slots
            .iter()
            .map(|slot| (slot.last_active.load(Ordering::Relaxed), slot.addr.clone()))
            .collect();
        by_age.select_nth_unstable_by_key(excess - 1, |(at, _)| *at);
        for (_, addr) in by_age.into_iter().take(excess) {
            addr.do_send(messages::Passivate);
        }
        metrics::counter!("orchard_actor_evictions_total").increment(excess as u64);
    }

    /// Share one allocation per command body among resident queues.
    pub(crate) fn intern_body(&self, command: StoredCommand) -> Arc<StoredCommand> {
        if let Some(existing) = self
            .bodies
            .get(&command.command_uuid)
            .and_then(|w| w.upgrade())
        {
            return existing;
        }
        let shared = Arc::new(command);
        self.bodies
            .insert(shared.command_uuid.clone(), Arc::downgrade(&shared));
        shared
    }

    /// Drop interned bodies no queue holds any more (called with the eviction sweep).
    pub fn prune_bodies(&self) {
        self.bodies.retain(|_, body| body.strong_count() > 0);
    }

    fn activate(self: &Arc<Self>, id: &str) -> Result<(Addr<DeviceActor>, u64), DeviceError> {
        if !self.placement.accepts(shard_of(id)) {
            return Err(DeviceError::NotLocal);
        }
        if let Some(slot) = self.slots.get(id) {
            slot.last_active.store(now_millis(), Ordering::Relaxed);
            return Ok((slot.addr.clone(), slot.incarnation));
        }
        let slot = self.slots.entry(id.to_string()).or_insert_with(|| {
            let incarnation = self.incarnations.fetch_add(1, Ordering::Relaxed);
            let last_active = Arc::new(AtomicU64::new(now_millis()));
            let actor = DeviceActor::new(
                id.to_string(),
                Arc::clone(self),
                incarnation,
                Arc::clone(&last_active),
            );
            Slot {
                addr: actor.start(),
                incarnation,
                last_active,
            }
        });
        Ok((slot.addr.clone(), slot.incarnation))
    }

    /// Remove the slot if it still belongs to the given incarnation.
    fn forget(&self, id: &str, incarnation: u64) {
        self.slots
            .remove_if(id, |_, slot| slot.incarnation == incarnation);
    }
}

/// How often a hand-off looks whether the passivated actors have stopped, and how long it
/// waits for them at most (an actor whose flush hangs is abandoned: the store refuses its
/// write once the shard is gone, so nothing stale lands).
const HANDOFF_POLL: Duration = Duration::from_millis(20);
const HANDOFF_PATIENCE: Duration = Duration::from_secs(10);

impl Registry {
    fn resident_in(&self, shards: &HashSet<ShardId>) -> Vec<(String, Addr<DeviceActor>)> {
        self.slots
            .iter()
            .filter(|slot| shards.contains(&shard_of(slot.key())))
            .map(|slot| (slot.key().clone(), slot.addr.clone()))
            .collect()
    }
}

impl ShardHost for Registry {
    fn passivate(self: Arc<Self>, shards: HashSet<ShardId>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            for (_, addr) in self.resident_in(&shards) {
                addr.do_send(messages::Passivate);
            }
            let deadline = std::time::Instant::now() + HANDOFF_PATIENCE;
            while !self.resident_in(&shards).is_empty() && std::time::Instant::now() < deadline {
                tokio::time::sleep(HANDOFF_POLL).await;
            }
            self.abandon(&shards);
        })
    }

    fn abandon(&self, shards: &HashSet<ShardId>) {
        for (id, addr) in self.resident_in(shards) {
            self.slots.remove(&id);
            addr.do_send(messages::Abandon);
        }
        self.tally.release(shards);
    }

    fn take(&self, shards: &HashSet<ShardId>) {
        self.tally.take(shards.iter().copied());
    }
}

pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn now_secs() -> i64 {
    (now_millis() / 1000) as i64
}
