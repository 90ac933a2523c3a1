//! The device actor's Declarative Device Management side: it answers the device's DDM
//! check-ins from the catalog's manifest for the enrollment's sets, ingests status
//! reports (durable before the 200), keeps the sync timeline, and queues the
//! DeclarativeManagement command that starts a sync.

use std::sync::Arc;

use actix::prelude::*;

use super::actor::{DeviceActor, Reply};
use super::messages::{
    AssignSet, Assigned, CheckinReply, DdmView, GetDdmView, PushDecision, SyncCommand,
    SyncDeclarations,
};
use super::queue::Pending;
use super::{now_millis, now_secs, DeviceError};
use crate::ddm::doctor::EnrollmentFacts;
use crate::ddm::sync::{parse_declaration_endpoint, served_items, SyncEventKind, REPORTS_KEPT};
use crate::ddm::{sync_command, StatusReport, DECLARATIVE_MANAGEMENT};
use crate::store::{Mutation, QueueEntry, StoredReport};

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
        self.answer(reply)
    }

    /// Status reports are acknowledged data: merged, and kept raw in the report history,
    /// durably before the 200. A report that cannot be parsed is kept raw too (and
    /// answered 200, so the device does not retry forever) and shows up in the timeline
    /// and the diagnosis.
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
                loaded.ddm.ingest(&report, now);
            }
            Err(e) => {
                metrics::counter!("orchard_ddm_status_reports_total", "outcome" => "unparseable")
                    .increment(1);
                tracing::warn!(enrollment_id = %id, error = %e, "unparseable DDM status report stored raw");
                loaded.ddm.record(
                    now,
                    SyncEventKind::StatusUnparseable {
                        reason: e.to_string(),
                    },
                );
            }
        }
        let mut batch = self.ddm_mutations();
        batch.push(Mutation::AppendDdmReport {
            enrollment_id: id,
            report: StoredReport {
                received_at: now,
                json: String::from_utf8_lossy(&raw).into_owned(),
            },
            keep: REPORTS_KEPT,
        });
        self.commit(batch, CheckinReply::Accepted)
    }

    /// The DDM state row alone: what an assignment changes.
    fn ddm_state_mutation(&mut self) -> Result<Mutation, DeviceError> {
        let id = self.id.clone();
        let loaded = self.loaded()?;
        Ok(Mutation::PutDdmState {
            enrollment_id: id,
            state: loaded.ddm.encode(),
        })
    }

    /// The state and the timeline rows (clears the dirty mark).
    pub(super) fn ddm_mutations(&mut self) -> Vec<Mutation> {
        let id = self.id.clone();
        let Ok(state) = self.ddm_state_mutation() else {
            return Vec::new();
        };
        let Ok(loaded) = self.loaded() else {
            return vec![state];
        };
        loaded.ddm_dirty = false;
        let timeline = Mutation::PutDdmTimeline {
            enrollment_id: id,
            timeline: loaded.ddm.encode_timeline(),
        };
        vec![state, timeline]
    }

    /// Queue a DeclarativeManagement command, replacing one still pending so the device
    /// never acts on stale tokens and a channel has at most one sync command queued.
    ///
    /// The `CommandQueued` timeline event is not a write of its own: the queue entry is
    /// the durable record, and the event is persisted with the next timeline write.
    pub(super) fn queue_sync_command(
        &mut self,
        sync: &SyncCommand,
        batch: &mut Vec<Mutation>,
    ) -> Result<(), DeviceError> {
        let id = self.id.clone();
        let registry = Arc::clone(&self.registry);
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
                    pending_from: loaded.queue.pending_from(),
                });
                metrics::gauge!("orchard_queue_depth").decrement(1.0);
            }
        }
        let command = match sync {
            SyncCommand::Shared(shared) => Arc::clone(shared),
            SyncCommand::WithTokens => {
                let snapshot = registry.catalog().manifest(&loaded.ddm.sets);
                let tokens = snapshot
                    .manifest
                    .tokens_json(time::OffsetDateTime::now_utc());
                let own = sync_command(Some(tokens));
                batch.push(Mutation::PutCommand(own.clone()));
                registry.intern_body(own)
            }
        };
        let seq = loaded.queue.next_seq(now_millis() * 1000);
        let entry = QueueEntry::new(seq, &command.command_uuid, DECLARATIVE_MANAGEMENT, 0, now);
        loaded.ddm.record(
            now,
            SyncEventKind::CommandQueued {
                command_uuid: command.command_uuid.clone(),
                with_data: *sync == SyncCommand::WithTokens,
            },
        );
        loaded.queue.push(Pending {
            entry: entry.clone(),
            command,
        });
        metrics::gauge!("orchard_queue_depth").increment(1.0);
        batch.push(Mutation::PutQueueEntry {
            enrollment_id: id,
            entry,
        });
        let due = self.first_wake_due();
        self.schedule_wake(batch, due, 0);
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
    type Result = Reply<Assigned>;

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
            return Self::immediate(Ok(Assigned {
                changed: false,
                push: None,
            }));
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
        let mut batch = vec![membership];
        if let Some(sync) = &msg.then_sync {
            if let Err(e) = self.queue_sync_command(sync, &mut batch) {
                return Self::immediate(Err(e));
            }
        }
        match self.ddm_state_mutation() {
            Ok(state) => batch.push(state),
            Err(e) => return Self::immediate(Err(e)),
        }
        let push = msg.then_sync.is_some().then(|| self.push_decision());
        self.commit(
            batch,
            Assigned {
                changed: true,
                push,
            },
        )
    }
}

impl Handler<SyncDeclarations> for DeviceActor {
    type Result = Reply<PushDecision>;

    fn handle(&mut self, msg: SyncDeclarations, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.record() {
            return Self::immediate(Err(e));
        }
        let mut batch = Vec::new();
        if let Err(e) = self.queue_sync_command(&msg.command, &mut batch) {
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
