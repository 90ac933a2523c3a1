//! The device actor's Declarative Device Management side: it answers the device's DDM
//! check-ins from the catalog's manifest for the enrollment's sets, ingests status
//! reports (durable before the 200), keeps the sync timeline, and queues the
//! DeclarativeManagement command that starts a sync.

use std::sync::Arc;

use actix::prelude::*;

use super::actor::{DeviceActor, Reply};
use super::messages::{
    AssignSet, CheckinReply, DdmView, GetDdmView, PushDecision, SyncDeclarations,
};
use super::queue::Pending;
use super::{now_millis, now_secs, DeviceError};
use crate::ddm::doctor::EnrollmentFacts;
use crate::ddm::sync::{parse_declaration_endpoint, served_items, SyncEventKind};
use crate::ddm::StatusReport;
use crate::store::{Mutation, QueueEntry, StoredCommand};

const DECLARATIVE_MANAGEMENT: &str = "DeclarativeManagement";

impl DeviceActor {
    /// Answer a DeclarativeManagement check-in (protocol.md §5.2).
    pub(super) fn declarative_management(
        &mut self,
        endpoint: String,
        data: Option<Vec<u8>>,
    ) -> Reply<CheckinReply> {
        let now = now_secs();
        let catalog = Arc::clone(self.registry.catalog());
        let id = self.id.clone();
        let loaded = match self.loaded() {
            Ok(loaded) => loaded,
            Err(e) => return Self::immediate(Err(e)),
        };
        let ddm = &mut loaded.ddm;
        metrics::counter!("orchard_ddm_requests_total", "endpoint" => endpoint_label(&endpoint))
            .increment(1);
        let reply = match endpoint.as_str() {
            "tokens" => {
                let snapshot = catalog.manifest(&ddm.sets);
                let token = snapshot.manifest.declarations_token().to_string();
                ddm.last_token_served = Some(token.clone());
                ddm.record(now, SyncEventKind::Tokens { token });
                Ok(CheckinReply::Json(
                    snapshot
                        .manifest
                        .tokens_json(time::OffsetDateTime::now_utc())
                        .into(),
                ))
            }
            "declaration-items" => {
                let snapshot = catalog.manifest(&ddm.sets);
                let token = snapshot.manifest.declarations_token().to_string();
                ddm.last_token_served = Some(token.clone());
                ddm.record(
                    now,
                    SyncEventKind::Items {
                        token,
                        items: served_items(&snapshot.manifest),
                    },
                );
                Ok(CheckinReply::Json(snapshot.manifest.items_json()))
            }
            "status" => return self.ingest_status(data.unwrap_or_default(), now),
            other => match parse_declaration_endpoint(other) {
                Some((category, identifier)) => {
                    let snapshot = ddm
                        .last_token_served
                        .as_deref()
                        .and_then(|token| catalog.snapshot(token))
                        .unwrap_or_else(|| catalog.manifest(&ddm.sets));
                    let body = snapshot
                        .body(category, identifier)
                        .map(|d| d.to_device_json());
                    ddm.record(
                        now,
                        SyncEventKind::Declaration {
                            category: category.as_str().to_string(),
                            identifier: identifier.to_string(),
                            served: body.is_some(),
                        },
                    );
                    body.map(|b| CheckinReply::Json(b.into()))
                        .ok_or_else(|| DeviceError::DeclarationNotFound(identifier.to_string()))
                }
                None => Err(DeviceError::UnknownDdmEndpoint(other.to_string())),
            },
        };
        loaded.ddm_dirty = true;
        tracing::debug!(enrollment_id = %id, endpoint = %endpoint, "DDM request answered");
        Self::immediate(reply)
    }

    /// Status reports are acknowledged data: merged and written before the 200. A report
    /// that cannot be parsed is kept raw (and answered 200, so the device does not retry
    /// forever) and shows up in the timeline and the diagnosis.
    fn ingest_status(&mut self, raw: Vec<u8>, now: i64) -> Reply<CheckinReply> {
        let id = self.id.clone();
        let loaded = match self.loaded() {
            Ok(loaded) => loaded,
            Err(e) => return Self::immediate(Err(e)),
        };
        match StatusReport::parse(&raw) {
            Ok(report) => {
                metrics::counter!("orchard_ddm_status_reports_total", "outcome" => "parsed")
                    .increment(1);
                loaded.ddm.ingest(&report, &raw, now);
            }
            Err(e) => {
                metrics::counter!("orchard_ddm_status_reports_total", "outcome" => "unparseable")
                    .increment(1);
                tracing::warn!(enrollment_id = %id, error = %e, "unparseable DDM status report stored raw");
                loaded.ddm.keep_raw(&raw, now);
                loaded.ddm.record(
                    now,
                    SyncEventKind::StatusUnparseable {
                        reason: e.to_string(),
                    },
                );
            }
        }
        let batch = vec![self.ddm_mutation()];
        self.commit(batch, CheckinReply::Accepted)
    }

    /// The whole DDM state as a write (clears the dirty mark).
    pub(super) fn ddm_mutation(&mut self) -> Mutation {
        let id = self.id.clone();
        match self.loaded() {
            Ok(loaded) => {
                loaded.ddm_dirty = false;
                Mutation::PutDdmState {
                    enrollment_id: id,
                    state: loaded.ddm.encode(),
                }
            }
            Err(_) => Mutation::PutDdmState {
                enrollment_id: id,
                state: Vec::new(),
            },
        }
    }

    /// Queue a DeclarativeManagement command, replacing one still pending so the device
    /// never acts on stale tokens and a channel has at most one sync command queued.
    pub(super) fn queue_sync_command(
        &mut self,
        with_tokens: bool,
        batch: &mut Vec<Mutation>,
    ) -> Result<(), DeviceError> {
        let id = self.id.clone();
        let registry = Arc::clone(&self.registry);
        let catalog = Arc::clone(registry.catalog());
        let now = now_secs();
        let loaded = self.loaded()?;
        let stale: Vec<String> = loaded
            .queue
            .iter()
            .filter(|p| p.entry.request_type == DECLARATIVE_MANAGEMENT)
            .map(|p| p.entry.command_uuid.clone())
            .collect();
        for uuid in stale {
            if let Some(removed) = loaded.queue.remove(&uuid) {
                batch.push(Mutation::RemoveQueueEntry {
                    enrollment_id: id.clone(),
                    seq: removed.entry.seq,
                });
                metrics::gauge!("orchard_queue_depth").decrement(1.0);
            }
        }
        let mut command = plist::Dictionary::new();
        command.insert("RequestType".into(), DECLARATIVE_MANAGEMENT.into());
        if with_tokens {
            let snapshot = catalog.manifest(&loaded.ddm.sets);
            let tokens = snapshot
                .manifest
                .tokens_json(time::OffsetDateTime::now_utc());
            command.insert("Data".into(), plist::Value::Data(tokens));
        }
        let uuid = uuid::Uuid::new_v4().to_string().to_uppercase();
        let stored = StoredCommand {
            body: crate::protocol::command::build_command(&uuid, command),
            command_uuid: uuid.clone(),
            request_type: DECLARATIVE_MANAGEMENT.into(),
        };
        let entry = QueueEntry {
            seq: loaded.queue.next_seq(now_millis() * 1000),
            command_uuid: uuid.clone(),
            request_type: DECLARATIVE_MANAGEMENT.into(),
            priority: 0,
            enqueued_at: now,
            not_now_count: 0,
            last_not_now_at: None,
            unparseable_results: 0,
            parked: false,
        };
        loaded.queue.push(Pending {
            entry: entry.clone(),
            command: registry.intern_body(stored.clone()),
        });
        metrics::gauge!("orchard_queue_depth").increment(1.0);
        loaded.ddm.record(
            now,
            SyncEventKind::CommandQueued {
                command_uuid: uuid,
                with_data: with_tokens,
            },
        );
        batch.push(Mutation::PutCommand(stored));
        batch.push(Mutation::PutQueueEntry {
            enrollment_id: id,
            entry,
        });
        let due = self.first_wake_due();
        self.schedule_wake(batch, due, 0);
        batch.push(self.ddm_mutation());
        Ok(())
    }
}

fn endpoint_label(endpoint: &str) -> &'static str {
    match endpoint {
        "tokens" => "tokens",
        "declaration-items" => "declaration-items",
        "status" => "status",
        e if e.starts_with("declaration/") => "declaration",
        _ => "unknown",
    }
}

impl Handler<AssignSet> for DeviceActor {
    type Result = Reply<bool>;

    fn handle(&mut self, msg: AssignSet, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        if let Err(e) = self.record() {
            return Self::immediate(Err(e));
        }
        let id = self.id.clone();
        let loaded = match self.loaded() {
            Ok(loaded) => loaded,
            Err(e) => return Self::immediate(Err(e)),
        };
        let changed = if msg.assign {
            loaded.ddm.sets.insert(msg.set.clone())
        } else {
            loaded.ddm.sets.remove(&msg.set)
        };
        if !changed {
            return Self::immediate(Ok(false));
        }
        let membership = if msg.assign {
            Mutation::PutSetMember {
                set: msg.set,
                enrollment_id: id,
            }
        } else {
            Mutation::RemoveSetMember {
                set: msg.set,
                enrollment_id: id,
            }
        };
        let batch = vec![membership, self.ddm_mutation()];
        self.commit(batch, true)
    }
}

impl Handler<SyncDeclarations> for DeviceActor {
    type Result = Reply<PushDecision>;

    fn handle(&mut self, msg: SyncDeclarations, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.record() {
            return Self::immediate(Err(e));
        }
        let mut batch = Vec::new();
        if let Err(e) = self.queue_sync_command(msg.with_tokens, &mut batch) {
            return Self::immediate(Err(e));
        }
        let decision = self.push_decision();
        self.commit(batch, decision)
    }
}

impl Handler<GetDdmView> for DeviceActor {
    type Result = Result<DdmView, DeviceError>;

    fn handle(&mut self, _: GetDdmView, _: &mut Context<Self>) -> Self::Result {
        let record = self.record()?.clone();
        let state = self.loaded()?.ddm.clone();
        Ok(DdmView {
            state,
            facts: EnrollmentFacts {
                enabled: record.enabled,
                push_token_valid: record.push_token_valid && record.push.is_some(),
                awaiting_configuration: record.awaiting_configuration,
            },
        })
    }
}
