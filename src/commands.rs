//! Command delivery orchestration shared by every enqueue and push route: persist the
//! command body once, queue it on each target's actor (each queue write durable before
//! the route answers), then wake the targets with one batched push.

use std::sync::Arc;

use futures_util::{stream, StreamExt};

use crate::device::messages::{Enqueue, GetPushTarget};
use crate::device::{DeviceError, Registry};
use crate::push::{Push, PushOutcome, PushTarget};
use crate::store::{Mutation, Store, StoreError, StoredCommand};

/// How many device actors one API call talks to at once.
const FAN_OUT: usize = 512;

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
    let queued: Vec<(String, Result<Option<PushTarget>, DeviceError>)> = stream::iter(ids)
        .map(|id| {
            let msg = Enqueue {
                command: Arc::clone(&command),
                priority,
            };
            async move { (id.clone(), registry.call(id, msg).await) }
        })
        .buffered(FAN_OUT)
        .collect()
        .await;
    metrics::counter!("orchard_commands_enqueued_total")
        .increment(queued.iter().filter(|(_, r)| r.is_ok()).count() as u64);
    let mut deliveries = Vec::with_capacity(queued.len());
    let mut targets = Vec::new();
    for (enrollment_id, result) in queued {
        let (queued, push) = match result {
            Ok(Some(target)) if send_push => {
                targets.push((deliveries.len(), target));
                (Ok(()), None)
            }
            Ok(None) if send_push => (
                Ok(()),
                Some(PushOutcome::NotSent {
                    reason: "enrollment cannot be pushed yet (no TokenUpdate, checked out, or token invalid)".into(),
                }),
            ),
            Ok(_) => (Ok(()), None),
            Err(e) => (Err(e), None),
        };
        deliveries.push(Delivery {
            enrollment_id,
            queued,
            push,
        });
    }
    let (slots, targets): (Vec<usize>, Vec<PushTarget>) = targets.into_iter().unzip();
    for (slot, outcome) in slots.into_iter().zip(push.push(&targets).await) {
        deliveries[slot].push = Some(outcome);
    }
    Ok(deliveries)
}

/// Push every id that can be pushed; the others get a `NotSent`/`Failed` reason.
pub async fn push_enrollments(
    registry: &Arc<Registry>,
    push: &dyn Push,
    ids: &[String],
) -> Vec<(String, PushOutcome)> {
    let lookups: Vec<(String, Result<PushTarget, DeviceError>)> = stream::iter(ids)
        .map(|id| async move { (id.clone(), registry.call(id, GetPushTarget).await) })
        .buffered(FAN_OUT)
        .collect()
        .await;
    let mut outcomes: Vec<(String, Option<PushOutcome>)> = Vec::with_capacity(lookups.len());
    let mut targets = Vec::new();
    for (id, lookup) in lookups {
        match lookup {
            Ok(target) => {
                targets.push((outcomes.len(), target));
                outcomes.push((id, None));
            }
            Err(e) => outcomes.push((
                id,
                Some(PushOutcome::Failed {
                    reason: e.to_string(),
                }),
            )),
        }
    }
    let (slots, targets): (Vec<usize>, Vec<PushTarget>) = targets.into_iter().unzip();
    for (slot, outcome) in slots.into_iter().zip(push.push(&targets).await) {
        outcomes[slot].1 = Some(outcome);
    }
    outcomes
        .into_iter()
        .filter_map(|(id, outcome)| outcome.map(|o| (id, o)))
        .collect()
}
