//! Command delivery orchestration shared by every enqueue and push route: persist the
//! command body once, queue it on each target's actor (each queue write durable before
//! the route answers), then wake the targets with one batched push.

use std::sync::Arc;

use std::collections::BTreeMap;

use futures_util::future::join_all;
use futures_util::{stream, StreamExt};

use crate::cluster::Route;
use crate::device::messages::{
    AssignSet, Assigned, Enqueue, GetPushTarget, InvalidatePushToken, PushDecision, SyncCommand,
    SyncDeclarations, WakeDue,
};
use crate::device::{DeviceError, Registry, FAN_OUT};
use crate::push::{Push, PushOutcome, PushTarget};
use crate::store::{Mutation, Store, StoreError, StoredCommand};

/// Wakes the re-push sweep handles per store read.
const SWEEP_BATCH: usize = 10_000;

/// The outcome for one target id.
#[derive(Debug)]
pub struct Delivery {
    pub enrollment_id: String,
    pub queued: Result<(), DeviceError>,
    /// `None` when no push was requested or the command was not queued.
    pub push: Option<PushOutcome>,
}

/// Queue `command` for every id, and push the ones that took it unless `send_push` is off.
pub async fn enqueue(
    registry: &Arc<Registry>,
    store: &dyn Store,
    push: &dyn Push,
    ids: &[String],
    command: StoredCommand,
    priority: u8,
    send_push: bool,
) -> Result<Vec<Delivery>, StoreError> {
    store
        .apply(vec![Mutation::PutCommand(command.clone())])
        .await?;
    let command = registry.intern_body(command);
    let queued = registry.call_all(ids, Enqueue { command, priority }).await;
    metrics::counter!("orchard_commands_enqueued_total")
        .increment(queued.iter().filter(|(_, r)| r.is_ok()).count() as u64);
    let mut deliveries = Vec::with_capacity(queued.len());
    let mut targets = Vec::new();
    for (enrollment_id, result) in queued {
        let (queued, push) = match result {
            Ok(_) if !send_push => (Ok(()), None),
            Ok(PushDecision::Push(target)) => {
                targets.push((deliveries.len(), target));
                (Ok(()), None)
            }
            Ok(PushDecision::AlreadyPending) => (Ok(()), Some(PushOutcome::AlreadyPending)),
            Ok(PushDecision::NotPushable(e)) => (
                Ok(()),
                Some(PushOutcome::NotSent {
                    reason: e.to_string(),
                }),
            ),
            Err(e) => (Err(e), None),
        };
        deliveries.push(Delivery {
            enrollment_id,
            queued,
            push,
        });
    }
    let (slots, targets): (Vec<usize>, Vec<PushTarget>) = targets.into_iter().unzip();
    for (slot, outcome) in slots
        .into_iter()
        .zip(dispatch(registry, push, &targets).await)
    {
        deliveries[slot].push = Some(outcome);
    }
    Ok(deliveries)
}

/// Push every target from the node that owns its device (its APNs pools, its per-device
/// backoff and coalescing); a target whose owner cannot be asked is pushed from here.
pub async fn dispatch(
    registry: &Arc<Registry>,
    push: &dyn Push,
    targets: &[PushTarget],
) -> Vec<PushOutcome> {
    let mut here = Vec::new();
    let mut by_peer: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (index, target) in targets.iter().enumerate() {
        match registry.route_of(&target.enrollment_id) {
            Route::Peer { url, .. } => by_peer.entry(url).or_default().push(index),
            Route::Local | Route::Unavailable => here.push(index),
        }
    }
    if by_peer.is_empty() {
        // One node, or every target owned here: no copies, no bookkeeping.
        return push_here(registry, push, targets).await;
    }
    let mut outcomes: Vec<Option<PushOutcome>> = targets.iter().map(|_| None).collect();
    let asked = join_all(by_peer.iter().map(|(url, indices)| async move {
        let theirs: Vec<PushTarget> = indices.iter().map(|&i| targets[i].clone()).collect();
        (indices, registry.push_at(url, &theirs).await)
    }))
    .await;
    for (indices, answered) in asked {
        match answered {
            Some(answers) => {
                for (&index, outcome) in indices.iter().zip(answers) {
                    outcomes[index] = Some(outcome);
                }
            }
            None => here.extend_from_slice(indices),
        }
    }
    let ours: Vec<PushTarget> = here.iter().map(|&i| targets[i].clone()).collect();
    for (index, outcome) in here.into_iter().zip(push_here(registry, push, &ours).await) {
        outcomes[index] = Some(outcome);
    }
    outcomes
        .into_iter()
        .map(|outcome| {
            outcome.unwrap_or(PushOutcome::Failed {
                reason: "not pushed".into(),
            })
        })
        .collect()
}

/// Push from this node, then act on what APNs said about each token: a dead token is
/// marked invalid on its enrollment so nothing pushes it again until the device's next
/// TokenUpdate.
pub async fn push_here(
    registry: &Arc<Registry>,
    push: &dyn Push,
    targets: &[PushTarget],
) -> Vec<PushOutcome> {
    let outcomes = push.push(targets).await;
    let dead = targets
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| matches!(outcome, PushOutcome::TokenInvalid { .. }));
    stream::iter(dead)
        .for_each_concurrent(FAN_OUT, |(target, _)| async move {
            let msg = InvalidatePushToken {
                token: target.token.clone(),
            };
            if let Err(e) = registry.call_anywhere(&target.enrollment_id, msg).await {
                tracing::warn!(enrollment_id = %target.enrollment_id, error = %e, "could not mark the push token invalid");
            }
        })
        .await;
    outcomes
}

/// One pass of the re-push sweep: wake every device whose scheduled wake is due and that
/// still needs it (pending commands, quiet since the re-push delay, pushable).
pub async fn repush_due(
    registry: &Arc<Registry>,
    store: &dyn Store,
    push: &dyn Push,
    now: i64,
) -> Result<usize, StoreError> {
    let due = store.due_wakes(now, SWEEP_BATCH).await?;
    let targets: Vec<PushTarget> = stream::iter(due)
        .map(|wake| async move {
            let msg = WakeDue {
                attempt: wake.attempt,
            };
            match registry.call(&wake.enrollment_id, msg).await {
                Ok(target) => target,
                Err(DeviceError::UnknownEnrollment(_)) => {
                    let clear = Mutation::ClearWake {
                        enrollment_id: wake.enrollment_id,
                    };
                    let _ = store.apply(vec![clear]).await;
                    None
                }
                Err(e) => {
                    tracing::warn!(enrollment_id = %wake.enrollment_id, error = %e, "re-push decision failed");
                    None
                }
            }
        })
        .buffered(FAN_OUT)
        .filter_map(|target| async move { target })
        .collect()
        .await;
    if !targets.is_empty() {
        tracing::info!(
            devices = targets.len(),
            "re-pushing devices with pending commands"
        );
        dispatch(registry, push, &targets).await;
    }
    Ok(targets.len())
}

/// Push every id that can be pushed; an id that cannot (unknown, checked out, dead
/// token) answers why instead.
pub async fn push_enrollments(
    registry: &Arc<Registry>,
    push: &dyn Push,
    ids: &[String],
) -> Vec<(String, Result<PushOutcome, DeviceError>)> {
    let lookups = registry.call_all(ids, GetPushTarget).await;
    let mut outcomes = Vec::with_capacity(lookups.len());
    let mut targets = Vec::new();
    for (id, lookup) in lookups {
        match lookup {
            Ok(target) => {
                targets.push((outcomes.len(), target));
                outcomes.push((id, Ok(PushOutcome::AlreadyPending)));
            }
            Err(e) => outcomes.push((id, Err(e))),
        }
    }
    let (slots, targets): (Vec<usize>, Vec<PushTarget>) = targets.into_iter().unzip();
    for (slot, outcome) in slots
        .into_iter()
        .zip(dispatch(registry, push, &targets).await)
    {
        outcomes[slot].1 = Ok(outcome);
    }
    outcomes
}

/// Members of `sets` (each once), paging through the store's set index.
pub async fn set_members(store: &dyn Store, sets: &[String]) -> Result<Vec<String>, StoreError> {
    let mut members = std::collections::BTreeSet::new();
    for set in sets {
        let mut after: Option<String> = None;
        loop {
            let page = store
                .set_members(set, after.as_deref(), SWEEP_BATCH)
                .await?;
            let full = page.len() == SWEEP_BATCH;
            after = page.last().cloned();
            members.extend(page);
            if !full {
                break;
            }
        }
    }
    Ok(members.into_iter().collect())
}

/// Start a DDM sync on every enrollment given: one DeclarativeManagement command each
/// (carrying the tokens when it goes to one device, as they are then known to be its own;
/// otherwise one shared body), then one batched push. Answers how many enrollments
/// queued the command.
pub async fn sync_declarations(
    registry: &Arc<Registry>,
    push: &dyn Push,
    ids: &[String],
) -> Result<usize, StoreError> {
    let command = sync_command_for(registry, ids).await?;
    let decisions = registry.call_all(ids, SyncDeclarations { command }).await;
    Ok(wake_for_sync(registry, push, decisions).await)
}

/// Assign (or unassign) `set` to every id; with `sync`, each enrollment whose assignment
/// changed queues the sync command in the same write, and all of them are pushed in one
/// batch. Answers, per id, whether its assignment changed.
pub async fn assign_set(
    registry: &Arc<Registry>,
    push: &dyn Push,
    ids: &[String],
    set: &str,
    assign: bool,
    sync: bool,
) -> Result<Vec<(String, Result<bool, DeviceError>)>, StoreError> {
    let then_sync = match sync {
        true => Some(sync_command_for(registry, ids).await?),
        false => None,
    };
    let msg = AssignSet {
        set: set.to_string(),
        assign,
        then_sync,
    };
    let outcomes = registry.call_all(ids, msg).await;
    let mut changed = Vec::with_capacity(outcomes.len());
    let mut decisions = Vec::new();
    for (id, outcome) in outcomes {
        if let Ok(Assigned {
            push: Some(decision),
            ..
        }) = &outcome
        {
            decisions.push((id.clone(), Ok(decision.clone())));
        }
        changed.push((id, outcome.map(|assigned| assigned.changed)));
    }
    wake_for_sync(registry, push, decisions).await;
    Ok(changed)
}

/// The sync command for a change reaching `ids`: the device's own with its tokens when
/// it is one enrollment, else one body shared by all, stored before any queue entry
/// refers to it.
async fn sync_command_for(
    registry: &Arc<Registry>,
    ids: &[String],
) -> Result<SyncCommand, StoreError> {
    if ids.len() == 1 {
        return Ok(SyncCommand::WithTokens);
    }
    let command = crate::ddm::sync_command(None);
    registry
        .store()
        .apply(vec![Mutation::PutCommand(command.clone())])
        .await?;
    Ok(SyncCommand::Shared(registry.intern_body(command)))
}

/// Count the enrollments that queued their sync command and push those that asked for
/// it; answers the count.
async fn wake_for_sync(
    registry: &Arc<Registry>,
    push: &dyn Push,
    decisions: Vec<(String, Result<PushDecision, DeviceError>)>,
) -> usize {
    let queued = decisions.iter().filter(|(_, d)| d.is_ok()).count();
    metrics::counter!("orchard_ddm_syncs_triggered_total").increment(queued as u64);
    let targets: Vec<PushTarget> = decisions
        .into_iter()
        .filter_map(|(id, decision)| match decision {
            Ok(PushDecision::Push(target)) => Some(target),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(enrollment_id = %id, error = %e, "could not queue a DDM sync");
                None
            }
        })
        .collect();
    if !targets.is_empty() {
        dispatch(registry, push, &targets).await;
    }
    queued
}
