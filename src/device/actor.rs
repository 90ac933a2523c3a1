//! One enrollment's actor: applies check-ins and connect reports to its state and queue,
//! persisting every acknowledged change before it answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::fut::{ready, ActorFutureExt, WrapFuture};
use actix::prelude::*;

use super::messages::*;
use super::queue::{CommandQueue, Pending};
use super::tally::{Counted, WriteOutcome};
use super::{now_millis, now_secs, DeviceError, Registry, UserAuthenticatePolicy};
use crate::ddm::doctor::EnrollmentFacts;
use crate::ddm::fleet::FleetFacts;
use crate::ddm::sync::DdmState;
use crate::protocol::checkin;
use crate::protocol::checkin::{Authenticate, CheckinMessage, TokenUpdate};
use crate::protocol::connect::{ConnectReport, ReportStatus};
use crate::protocol::ids::Channel;
use crate::push::PushTarget;
use crate::store::{
    CertFingerprint, CommandResult, EnrollmentRecord, Mutation, PushInfo, QueueEntry, ResultStatus,
    StoredCommand, WebhookEvent,
};
use crate::webhook::event::Draft;

/// Persist `last_seen` at most this often while the device keeps connecting.
const LAST_SEEN_FLUSH_SECS: i64 = 300;

/// A push requested this recently, with no device contact since, is still pending: more
/// enqueues do not push again (the re-push sweep covers a lost wake-up).
const PUSH_PENDING_WINDOW: Duration = Duration::from_secs(60);

/// A write that moves the enrollment between fleet facts.
struct FleetTransition {
    before: Counted,
    after: FleetFacts,
}

pub(super) type Reply<T> = AtomicResponse<DeviceActor, Result<T, DeviceError>>;

/// One step of a handler's answer, which a longer answer can continue from (a
/// retroactive binding, an import vouched for by the device channel).
pub(super) type Step<T> = ResponseActFuture<DeviceActor, Result<T, DeviceError>>;

pub struct DeviceActor {
    pub(super) id: String,
    pub(super) registry: Arc<Registry>,
    incarnation: u64,
    last_active: Arc<AtomicU64>,
    state: State,
    /// The webhook event of the device message being handled (webhooks on): the next
    /// write adds it to the outbox; a message that writes nothing writes it alone.
    webhook_draft: Option<Draft>,
}

enum State {
    Loading,
    Ready(Box<Loaded>),
    Failed(DeviceError),
}

pub(super) struct Loaded {
    pub(super) record: Option<EnrollmentRecord>,
    pub(super) queue: CommandQueue,
    /// Assigned sets, merged status and sync timeline.
    pub(super) ddm: DdmState,
    /// The DDM timeline changed since it was last written (it is diagnostic: flushed with
    /// the next write or at passivation; status reports are written before their 200).
    pub(super) ddm_dirty: bool,
    /// `last_seen` as stored; the in-memory record may be newer.
    persisted_last_seen: i64,
    /// A re-push is (or may be) scheduled in the store for this enrollment.
    wake_scheduled: bool,
    /// When an enqueue last asked for a push; cleared by any device contact.
    push_requested_at: Option<std::time::Instant>,
    /// What the fleet tally counts for this enrollment: the facts of its rows as last
    /// durably written.
    counted: Counted,
    /// The sequence of this enrollment's next webhook event.
    webhook_next_seq: u64,
}

impl DeviceActor {
    pub(super) fn new(
        id: String,
        registry: Arc<Registry>,
        incarnation: u64,
        last_active: Arc<AtomicU64>,
    ) -> Self {
        DeviceActor {
            id,
            registry,
            incarnation,
            last_active,
            state: State::Loading,
            webhook_draft: None,
        }
    }

    pub(super) fn touch(&self) {
        self.last_active.store(now_millis(), Ordering::Relaxed);
    }

    pub(super) fn loaded(&mut self) -> Result<&mut Loaded, DeviceError> {
        match &mut self.state {
            State::Ready(loaded) => Ok(loaded),
            State::Failed(e) => Err(e.clone()),
            State::Loading => Err(DeviceError::Unavailable),
        }
    }

    pub(super) fn record(&mut self) -> Result<&mut EnrollmentRecord, DeviceError> {
        let id = self.id.clone();
        self.loaded()?
            .record
            .as_mut()
            .ok_or(DeviceError::UnknownEnrollment(id))
    }

    /// A device-channel actor checks the caller against its certificate binding. A
    /// device channel without one was imported through `/migration` (every other way in
    /// is an Authenticate, which binds): it waits for its first certificate (`--retro`).
    fn authorize(&mut self, caller: Caller) -> Result<(), DeviceError> {
        match caller {
            Caller::VouchedByDevice => Ok(()),
            Caller::Certificate(fingerprint) => {
                let id = self.id.clone();
                match self.record()?.cert_fingerprint {
                    Some(bound) if bound == fingerprint => Ok(()),
                    Some(_) => Err(DeviceError::CertificateMismatch(id)),
                    None => Err(DeviceError::ImportedUnbound(id)),
                }
            }
        }
    }

    /// Persist `batch`, then answer `reply`; on failure forget memory and stop, so the next
    /// message reloads what is durable.
    pub(super) fn commit<T: 'static>(&mut self, batch: Vec<Mutation>, reply: T) -> Reply<T> {
        AtomicResponse::new(self.commit_future(batch, reply))
    }

    pub(super) fn commit_future<T: 'static>(
        &mut self,
        batch: Vec<Mutation>,
        reply: T,
    ) -> ResponseActFuture<Self, Result<T, DeviceError>> {
        // Only a batch that writes the enrollment row moves the persisted `last_seen`.
        let written_last_seen = batch.iter().rev().find_map(|m| match m {
            Mutation::PutEnrollment(record) if record.id == self.id => Some(record.last_seen),
            _ => None,
        });
        let tallied = self.tally_before_write(&batch);
        let mut batch = batch;
        let event = self.webhook_event();
        let recorded_event = event.is_some();
        batch.extend(event);
        let store = Arc::clone(self.registry.store());
        let write = async move { store.apply(batch).await };
        Box::pin(write.into_actor(self).map(
            move |written, act, ctx| {
                act.tally_after_write(tallied, &written);
                match written {
                Ok(()) => {
                    if let (Some(last_seen), Ok(loaded)) = (written_last_seen, act.loaded()) {
                        loaded.persisted_last_seen = last_seen;
                    }
                    if let Some(notifier) = act.registry.webhooks().filter(|_| recorded_event) {
                        notifier.queued(&act.id);
                    }
                    Ok(reply)
                }
                Err(e) => {
                    tracing::error!(enrollment_id = %act.id, error = %e, "write failed; dropping in-memory state");
                    act.state = State::Failed(e.clone().into());
                    ctx.stop();
                    Err(e.into())
                }
            }},
        ))
    }

    /// The fleet facts `batch` leaves this enrollment with, when they differ from what the
    /// tally counts; the tally is told before the write is sent.
    fn tally_before_write(&mut self, batch: &[Mutation]) -> Option<FleetTransition> {
        let id = self.id.clone();
        let tally = Arc::clone(&self.registry);
        let tally = tally.tally();
        let (mut state, mut timeline, mut enrollment) = (false, false, None);
        for mutation in batch {
            match mutation {
                Mutation::PutDdmState { enrollment_id, .. } if *enrollment_id == id => state = true,
                Mutation::PutDdmTimeline { enrollment_id, .. } if *enrollment_id == id => {
                    timeline = true
                }
                Mutation::PutEnrollment(record) if record.id == id => {
                    enrollment = Some(EnrollmentFacts::of(Some(record)))
                }
                _ => {}
            }
        }
        let loaded = self.loaded().ok()?;
        let base = match (&loaded.counted, state) {
            (Some(counted), _) => (**counted).clone(),
            // The first DDM state row: the enrollment starts being counted.
            (None, true) => {
                FleetFacts::default().with_enrollment(EnrollmentFacts::of(loaded.record.as_ref()))
            }
            (None, false) => return None,
        };
        let mut after = base;
        if state {
            after = after.with_state(&loaded.ddm);
        }
        if timeline {
            after = after.with_timeline(&loaded.ddm.timeline, tally.stall_after_secs());
        }
        if let Some(enrollment) = enrollment {
            after = after.with_enrollment(enrollment);
        }
        if loaded.counted.as_deref() == Some(&after) {
            return None;
        }
        tally.writing(&id, &loaded.counted);
        Some(FleetTransition {
            before: loaded.counted.clone(),
            after,
        })
    }

    fn tally_after_write(
        &mut self,
        transition: Option<FleetTransition>,
        written: &Result<(), crate::store::StoreError>,
    ) {
        let Some(FleetTransition { before, after }) = transition else {
            return;
        };
        let outcome = match written {
            Ok(()) => WriteOutcome::Written(Some(after)),
            Err(_) => WriteOutcome::Unknown,
        };
        let counted = self.registry.tally().written(&self.id, &before, outcome);
        if let Ok(loaded) = self.loaded() {
            loaded.counted = counted;
        }
    }

    pub(super) fn immediate<T: 'static>(result: Result<T, DeviceError>) -> Reply<T> {
        AtomicResponse::new(Self::done(result))
    }

    pub(super) fn done<T: 'static>(result: Result<T, DeviceError>) -> Step<T> {
        Box::pin(ready(result))
    }

    /// Answer a device message that changed nothing durable: at once, or, when its
    /// webhook event is still to be recorded, after writing the event alone.
    pub(super) fn answer<T: 'static>(&mut self, result: Result<T, DeviceError>) -> Reply<T> {
        match result {
            Ok(reply) if self.webhook_draft.is_some() => self.commit(Vec::new(), reply),
            result => Self::immediate(result),
        }
    }

    /// The pending webhook draft as an outbox event, numbered after every event this
    /// enrollment ever recorded.
    fn webhook_event(&mut self) -> Option<Mutation> {
        let draft = self.webhook_draft.take()?;
        let id = self.id.clone();
        let loaded = self.loaded().ok()?;
        let seq = (now_millis() * 1000).max(loaded.webhook_next_seq);
        loaded.webhook_next_seq = seq + 1;
        let created_at = time::OffsetDateTime::now_utc();
        let body = draft.render(&uuid::Uuid::new_v4().to_string(), created_at);
        Some(Mutation::PutWebhookEvent {
            enrollment_id: id,
            event: WebhookEvent {
                seq,
                created_at_ms: (created_at.unix_timestamp_nanos() / 1_000_000) as i64,
                body,
            },
        })
    }

    fn see(&mut self) {
        if let Ok(loaded) = self.loaded() {
            loaded.push_requested_at = None;
        }
        if let Ok(record) = self.record() {
            record.last_seen = now_secs();
        }
    }

    /// Push for a new command unless a push is already pending for this device.
    pub(super) fn push_decision(&mut self) -> PushDecision {
        let target = match self.push_target() {
            Ok(target) => target,
            Err(e) => return PushDecision::NotPushable(e),
        };
        let Ok(loaded) = self.loaded() else {
            return PushDecision::NotPushable(DeviceError::Unavailable);
        };
        if loaded
            .push_requested_at
            .is_some_and(|at| at.elapsed() < PUSH_PENDING_WINDOW)
        {
            metrics::counter!("orchard_pushes_coalesced_total").increment(1);
            return PushDecision::AlreadyPending;
        }
        loaded.push_requested_at = Some(std::time::Instant::now());
        PushDecision::Push(target)
    }

    fn put_record(&mut self) -> Result<Mutation, DeviceError> {
        Ok(Mutation::PutEnrollment(self.record()?.clone()))
    }

    fn authenticate(
        &mut self,
        channel: Channel,
        message: Authenticate,
        fingerprint: CertFingerprint,
    ) -> Reply<CheckinReply> {
        AtomicResponse::new(self.unless_bound_elsewhere(fingerprint, move |act| {
            act.reenroll(channel, message, Some(fingerprint))
        }))
    }

    /// Continue with `then` unless the certificate is bound to another enrollment (one
    /// certificate, one enrollment). The store's conditional `BindCertificate` settles a
    /// race this look-up cannot see.
    pub(super) fn unless_bound_elsewhere<T: 'static>(
        &mut self,
        fingerprint: CertFingerprint,
        then: impl FnOnce(&mut Self) -> Step<T> + 'static,
    ) -> Step<T> {
        let store = Arc::clone(self.registry.store());
        let lookup = async move { store.cert_binding(&fingerprint).await };
        // The event is recorded by the write that follows the lookup.
        let draft = self.webhook_draft.take();
        Box::pin(
            lookup
                .into_actor(self)
                .then(move |bound, act, _| match bound {
                    Ok(Some(other)) if other != act.id => {
                        Self::done(Err(DeviceError::CertificateBoundElsewhere))
                    }
                    Err(e) => Self::done(Err(e.into())),
                    Ok(_) => {
                        act.webhook_draft = draft;
                        let step = then(act);
                        act.webhook_draft = None;
                        step
                    }
                }),
        )
    }

    /// Authenticate starts a new enrollment generation: the queue (and the queues of the
    /// device's user channels) is cleared, the certificate rebound, push disabled until
    /// the first TokenUpdate, and tokens of the previous enrollment forgotten. An
    /// imported Authenticate has no certificate: the enrollment is left unbound.
    pub(super) fn reenroll(
        &mut self,
        channel: Channel,
        message: Authenticate,
        fingerprint: Option<CertFingerprint>,
    ) -> Step<CheckinReply> {
        let id = self.id.clone();
        let registry = Arc::clone(&self.registry);
        let loaded = match self.loaded() {
            Ok(loaded) => loaded,
            Err(e) => return Box::pin(ready(Err(e))),
        };
        let previous = loaded.record.take();
        let now = now_secs();
        let record = EnrollmentRecord {
            id: channel.id.clone(),
            device_id: channel.device_id.clone(),
            kind: channel.kind,
            topic: message.topic.clone(),
            cert_fingerprint: fingerprint,
            generation: previous.as_ref().map_or(1, |p| p.generation + 1),
            enabled: false,
            push: None,
            push_token_valid: false,
            unlock_token: None,
            bootstrap_token: None,
            awaiting_configuration: false,
            token_update_count: 0,
            device_info: device_facts(&message),
            user_channels: previous.map(|p| p.user_channels).unwrap_or_default(),
            enrolled_at: now,
            last_seen: now,
        };
        let mut batch: Vec<Mutation> = std::iter::once(id.clone())
            .chain(record.user_channels.iter().cloned())
            .map(|enrollment_id| Mutation::ClearQueue { enrollment_id })
            .collect();
        if let Some(fingerprint) = fingerprint {
            batch.push(Mutation::BindCertificate {
                fingerprint,
                enrollment_id: id.clone(),
            });
        }
        batch.push(Mutation::PutEnrollment(record.clone()));
        for user_channel in &record.user_channels {
            if let Some(addr) = registry.resident(user_channel) {
                addr.do_send(ResetForReenrollment);
            }
        }
        loaded.queue.clear();
        loaded.ddm.reset(now);
        loaded.record = Some(record);
        batch.extend(self.ddm_mutations());
        match fingerprint {
            Some(_) => {
                tracing::info!(enrollment_id = %self.id, "device authenticated; new enrollment generation")
            }
            None => {
                tracing::info!(enrollment_id = %self.id, "enrollment imported; no certificate bound yet")
            }
        }
        self.commit_future(batch, CheckinReply::Accepted)
    }

    pub(super) fn token_update(
        &mut self,
        channel: Channel,
        message: TokenUpdate,
    ) -> Step<CheckinReply> {
        let now = now_secs();
        let loaded = match self.loaded() {
            Ok(loaded) => loaded,
            Err(e) => return Self::done(Err(e)),
        };
        let first_for_user_channel = loaded.record.is_none() && !channel.is_device_channel();
        if loaded.record.is_none() && !first_for_user_channel {
            return Self::done(Err(DeviceError::NotAuthenticated(channel.id)));
        }
        let record = loaded.record.get_or_insert_with(|| EnrollmentRecord {
            id: channel.id.clone(),
            device_id: channel.device_id.clone(),
            kind: channel.kind,
            enrolled_at: now,
            ..EnrollmentRecord::default()
        });
        record.topic = message.topic.clone();
        record.push = Some(PushInfo {
            topic: message.topic,
            token: message.token,
            push_magic: message.push_magic,
        });
        record.push_token_valid = true;
        record.enabled = true;
        if message.unlock_token.is_some() {
            record.unlock_token = message.unlock_token;
        }
        record.awaiting_configuration = message.awaiting_configuration;
        record.token_update_count += 1;
        record.last_seen = now;
        let tally = record.token_update_count;
        let enrolled_just_now = record.token_update_count == 1;
        let mut batch = vec![Mutation::PutEnrollment(record.clone())];
        let has_declarations = !loaded.ddm.sets.is_empty();
        if let Some(draft) = &mut self.webhook_draft {
            draft.token_update_tally = Some(tally);
        }
        if enrolled_just_now && has_declarations {
            // A (re-)enrolled device has no DDM state: start a sync right away.
            if let Err(e) = self.queue_sync_command(&SyncCommand::WithTokens, &mut batch) {
                return Self::done(Err(e));
            }
        }
        if !first_for_user_channel {
            return self.commit_future(batch, CheckinReply::Accepted);
        }
        let registry = Arc::clone(&self.registry);
        let (device_id, user_channel) = (channel.device_id, channel.id);
        Box::pin(self.commit_future(batch, ()).then(move |written, act, _| {
            async move {
                written?;
                registry
                    .call(&device_id, RegisterUserChannel(user_channel))
                    .await?;
                Ok(CheckinReply::Accepted)
            }
            .into_actor(act)
        }))
    }

    fn check_out(&mut self) -> Reply<CheckinReply> {
        match self.record() {
            Ok(record) => {
                record.enabled = false;
                record.last_seen = now_secs();
                tracing::info!(enrollment_id = %record.id, "device checked out");
                let batch = vec![Mutation::PutEnrollment(record.clone())];
                self.commit(batch, CheckinReply::Accepted)
            }
            Err(e) => Self::immediate(Err(e)),
        }
    }

    pub(super) fn set_bootstrap_token(
        &mut self,
        channel: &Channel,
        token: Option<Vec<u8>>,
        awaiting_configuration: bool,
    ) -> Step<CheckinReply> {
        if !channel.is_device_channel() {
            return Self::done(Err(DeviceError::DeviceChannelOnly(
                "SetBootstrapToken".into(),
            )));
        }
        match self.record() {
            Ok(record) => {
                record.bootstrap_token = token;
                record.awaiting_configuration = awaiting_configuration;
                let batch = vec![Mutation::PutEnrollment(record.clone())];
                self.commit_future(batch, CheckinReply::Accepted)
            }
            Err(e) => Self::done(Err(e)),
        }
    }

    fn get_bootstrap_token(&mut self, channel: &Channel) -> Result<CheckinReply, DeviceError> {
        if !channel.is_device_channel() {
            return Err(DeviceError::DeviceChannelOnly("GetBootstrapToken".into()));
        }
        Ok(match &self.record()?.bootstrap_token {
            Some(token) => CheckinReply::Plist(checkin::bootstrap_token_response(token)),
            None => CheckinReply::Accepted,
        })
    }

    fn user_authenticate(
        &self,
        digest_response: Option<String>,
    ) -> Result<CheckinReply, DeviceError> {
        match (self.registry.settings().user_authenticate, digest_response) {
            (UserAuthenticatePolicy::Decline, _) => Err(DeviceError::UserAuthenticateDeclined),
            (UserAuthenticatePolicy::EmptyChallenge, None) => {
                Ok(CheckinReply::Plist(checkin::digest_challenge_response("")))
            }
            (UserAuthenticatePolicy::EmptyChallenge, Some(_)) => Ok(CheckinReply::Accepted),
        }
    }

    fn next_command(
        &mut self,
        answering_not_now: bool,
    ) -> Result<Option<Arc<StoredCommand>>, DeviceError> {
        let next = self.loaded()?.queue.next(answering_not_now);
        if let Some(pending) = next {
            tracing::debug!(command_uuid = %pending.entry.command_uuid, request_type = %pending.entry.request_type, "sending command");
        }
        Ok(next.map(|p| Arc::clone(&p.command)))
    }

    fn connect(
        &mut self,
        report: ConnectReport,
        raw: bytes::Bytes,
    ) -> Reply<Option<Arc<StoredCommand>>> {
        self.see();
        let Some(command_uuid) = report.command_uuid else {
            return self.idle();
        };
        let now = now_secs();
        let id = self.id.clone();
        let loaded = match self.loaded() {
            Ok(loaded) => loaded,
            Err(e) => return Self::immediate(Err(e)),
        };
        let pending = loaded.queue.get(&command_uuid).map(|p| p.entry.clone());
        let status = match report.status {
            ReportStatus::Acknowledged => ResultStatus::Acknowledged,
            ReportStatus::Error => ResultStatus::Error,
            ReportStatus::CommandFormatError => ResultStatus::CommandFormatError,
            ReportStatus::NotNow => ResultStatus::NotNow,
            ReportStatus::Idle => return self.idle(),
        };
        let result = CommandResult {
            request_type: pending
                .as_ref()
                .map_or_else(|| "Unknown".to_string(), |p| p.request_type.clone()),
            command_uuid: command_uuid.clone(),
            status,
            raw: raw.to_vec(),
            seq: pending.as_ref().map_or(0, |p| p.seq),
            received_at: now,
        };
        if pending.is_none() {
            tracing::warn!(enrollment_id = %id, command_uuid = %command_uuid, "result for a command that is not pending; stored");
        }
        let mut batch = vec![Mutation::PutResult {
            enrollment_id: id.clone(),
            result,
        }];
        match (status, pending) {
            (ResultStatus::NotNow, Some(_)) => {
                if let Some(entry) = loaded.queue.mark_not_now(&command_uuid, now) {
                    batch.push(Mutation::PutQueueEntry {
                        enrollment_id: id.clone(),
                        entry,
                    });
                }
            }
            (_, Some(entry)) => {
                loaded.queue.remove(&command_uuid);
                metrics::gauge!("orchard_queue_depth").decrement(1.0);
                batch.push(Mutation::RemoveQueueEntry {
                    enrollment_id: id.clone(),
                    seq: entry.seq,
                    pending_from: loaded.queue.pending_from(),
                });
            }
            (_, None) => {}
        }
        if status == ResultStatus::NotNow {
            let due = self.first_wake_due();
            self.schedule_wake(&mut batch, due, 0);
        } else {
            self.clear_wake_if_done(&mut batch);
        }
        let next = match self.next_command(status == ResultStatus::NotNow) {
            Ok(next) => next,
            Err(e) => return Self::immediate(Err(e)),
        };
        self.commit(batch, next)
    }

    fn idle(&mut self) -> Reply<Option<Arc<StoredCommand>>> {
        let next = match self.next_command(false) {
            Ok(next) => next,
            Err(e) => return Self::immediate(Err(e)),
        };
        let mut batch = Vec::new();
        self.clear_wake_if_done(&mut batch);
        let stale = self
            .loaded()
            .ok()
            .and_then(|l| {
                l.record
                    .as_ref()
                    .map(|r| r.last_seen - l.persisted_last_seen)
            })
            .is_some_and(|age| age >= LAST_SEEN_FLUSH_SECS);
        if stale {
            match self.put_record() {
                Ok(put) => batch.push(put),
                Err(e) => return Self::immediate(Err(e)),
            }
        }
        if batch.is_empty() {
            self.answer(Ok(next))
        } else {
            self.commit(batch, next)
        }
    }

    /// Decide a due re-push: wake only an enabled device that still has deliverable
    /// commands and has been quiet for the re-push delay; space repeats exponentially.
    fn wake_due(&mut self, attempt: u32) -> Reply<Option<PushTarget>> {
        let settings = self.registry.settings().clone();
        let now = now_secs();
        let after = settings.repush_after.as_secs() as i64;
        let deliverable = self.loaded().map(|l| l.queue.deliverable()).unwrap_or(0);
        let last_seen = self.record().map(|r| r.last_seen).unwrap_or(0);
        let mut batch = Vec::new();
        let reply = match self.push_target() {
            Ok(_) if deliverable > 0 && now - last_seen < after => {
                self.schedule_wake(&mut batch, last_seen + after, attempt);
                None
            }
            Ok(target) if deliverable > 0 => {
                let spacing = settings
                    .repush_after
                    .saturating_mul(1u32 << (attempt + 1).min(20))
                    .min(settings.repush_max_interval);
                self.schedule_wake(&mut batch, now + spacing.as_secs() as i64, attempt + 1);
                metrics::counter!("orchard_repushes_total").increment(1);
                Some(target)
            }
            _ => {
                if let Ok(loaded) = self.loaded() {
                    loaded.wake_scheduled = false;
                }
                batch.push(Mutation::ClearWake {
                    enrollment_id: self.id.clone(),
                });
                None
            }
        };
        self.commit(batch, reply)
    }

    /// Wake the device later if it does not come back for its pending commands.
    pub(super) fn schedule_wake(&mut self, batch: &mut Vec<Mutation>, due_at: i64, attempt: u32) {
        if let Ok(loaded) = self.loaded() {
            loaded.wake_scheduled = true;
        }
        batch.push(Mutation::ScheduleWake {
            enrollment_id: self.id.clone(),
            due_at,
            attempt,
        });
    }

    /// Nothing deliverable is left: drop the scheduled wake.
    fn clear_wake_if_done(&mut self, batch: &mut Vec<Mutation>) {
        let id = self.id.clone();
        if let Ok(loaded) = self.loaded() {
            if loaded.wake_scheduled && loaded.queue.deliverable() == 0 {
                loaded.wake_scheduled = false;
                batch.push(Mutation::ClearWake { enrollment_id: id });
            }
        }
    }

    pub(super) fn first_wake_due(&self) -> i64 {
        now_secs() + self.registry.settings().repush_after.as_secs() as i64
    }

    fn queue_entry_mutation(&self, entry: QueueEntry) -> Mutation {
        Mutation::PutQueueEntry {
            enrollment_id: self.id.clone(),
            entry,
        }
    }

    pub(super) fn push_target(&mut self) -> Result<PushTarget, DeviceError> {
        let record = self.record()?;
        if !record.enabled {
            return Err(DeviceError::NotPushable(
                "enrollment is disabled (checked out or awaiting its first TokenUpdate)".into(),
            ));
        }
        if !record.push_token_valid {
            return Err(DeviceError::NotPushable(
                "APNs reported the push token invalid".into(),
            ));
        }
        let push = record.push.as_ref().ok_or(DeviceError::NotPushable(
            "no TokenUpdate received yet".into(),
        ))?;
        Ok(PushTarget {
            enrollment_id: record.id.clone(),
            topic: push.topic.clone(),
            token: push.token.clone(),
            push_magic: push.push_magic.clone(),
        })
    }

    fn load(&mut self, ctx: &mut Context<Self>) {
        let store = Arc::clone(self.registry.store());
        let registry = Arc::clone(&self.registry);
        let id = self.id.clone();
        let load = async move {
            let records = store.device(&id).await?;
            let ddm = DdmState::decode(&records.ddm).map_err(|e| {
                crate::store::StoreError::Corrupt(format!("DDM state of {id}: {e}"))
            })?;
            let pending = records
                .queue
                .into_iter()
                .filter_map(|(entry, body)| match body {
                    Some(body) => Some(Pending {
                        command: registry.intern_body(body),
                        entry,
                    }),
                    None => {
                        tracing::error!(enrollment_id = %id, command_uuid = %entry.command_uuid, "queued command has no body; skipped");
                        None
                    }
                })
                .collect();
            let facts = registry.tally().facts(
                records.ddm.state.is_some().then_some(&ddm),
                EnrollmentFacts::of(records.enrollment.as_ref()),
            );
            Ok::<_, crate::store::StoreError>((
                records.enrollment,
                CommandQueue::from_pending(pending, records.queue_floor),
                ddm,
                facts,
                records.webhook_next_seq,
            ))
        };
        ctx.wait(load.into_actor(self).map(|loaded, act, ctx| match loaded {
            Ok((record, queue, ddm, facts, webhook_next_seq)) => {
                metrics::gauge!("orchard_queue_depth").increment(queue.len() as f64);
                let counted = act.registry.tally().activated(&act.id, facts);
                act.state = State::Ready(Box::new(Loaded {
                    persisted_last_seen: record.as_ref().map_or(0, |r| r.last_seen),
                    wake_scheduled: !queue.is_empty(),
                    push_requested_at: None,
                    ddm,
                    ddm_dirty: false,
                    record,
                    queue,
                    counted,
                    webhook_next_seq,
                }));
            }
            Err(e) => {
                tracing::error!(enrollment_id = %act.id, error = %e, "could not load device state");
                act.state = State::Failed(e.into());
                ctx.stop();
            }
        }));
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        let idle_for = now_millis().saturating_sub(self.last_active.load(Ordering::Relaxed));
        if Duration::from_millis(idle_for) >= self.registry.settings().idle_timeout {
            self.passivate(ctx);
        }
    }

    /// Flush the newest `last_seen`, then leave the registry and stop.
    fn passivate(&mut self, ctx: &mut Context<Self>) {
        let (seen_dirty, ddm_dirty) = self
            .loaded()
            .map(|l| {
                let seen = l
                    .record
                    .as_ref()
                    .is_some_and(|r| r.last_seen != l.persisted_last_seen);
                (seen, l.ddm_dirty && l.record.is_some())
            })
            .unwrap_or((false, false));
        let mut batch = Vec::new();
        if seen_dirty {
            if let Ok(put) = self.put_record() {
                batch.push(put);
            }
        }
        if ddm_dirty {
            batch.extend(self.ddm_mutations());
        }
        if batch.is_empty() {
            ctx.stop();
            return;
        }
        let tallied = self.tally_before_write(&batch);
        let store = Arc::clone(self.registry.store());
        ctx.wait(
            async move { store.apply(batch).await }
                .into_actor(self)
                .map(|written, act, ctx: &mut Context<Self>| {
                    act.tally_after_write(tallied, &written);
                    ctx.stop()
                }),
        );
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics::gauge!("orchard_resident_actors").increment(1.0);
        self.load(ctx);
        let period = (self.registry.settings().idle_timeout / 2).max(Duration::from_millis(100));
        ctx.run_interval(period, Self::check_idle);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.registry.forget(&self.id, self.incarnation);
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        metrics::gauge!("orchard_resident_actors").decrement(1.0);
        if let State::Ready(loaded) = &self.state {
            metrics::gauge!("orchard_queue_depth").decrement(loaded.queue.len() as f64);
        }
    }
}

impl Handler<Authorize> for DeviceActor {
    type Result = Result<(), DeviceError>;

    fn handle(&mut self, Authorize(fingerprint): Authorize, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        self.authorize(Caller::Certificate(fingerprint))
    }
}

impl Handler<HandleCheckin> for DeviceActor {
    type Result = Reply<CheckinReply>;

    fn handle(&mut self, msg: HandleCheckin, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        let HandleCheckin {
            checkin,
            raw,
            caller,
        } = msg;
        if self.registry.webhooks().is_some() {
            self.webhook_draft = Some(Draft::checkin(&checkin.message, &checkin.channel, raw));
        }
        let reply = self.handle_checkin(checkin, caller);
        // A message refused before any write records no event.
        self.webhook_draft = None;
        reply
    }
}

impl DeviceActor {
    fn handle_checkin(&mut self, checkin: checkin::Checkin, caller: Caller) -> Reply<CheckinReply> {
        if let CheckinMessage::Authenticate(message) = checkin.message {
            return match caller {
                Caller::Certificate(fingerprint) => {
                    self.authenticate(checkin.channel, message, fingerprint)
                }
                Caller::VouchedByDevice => {
                    Self::immediate(Err(DeviceError::DeviceChannelOnly("Authenticate".into())))
                }
            };
        }
        let first_user_token_update = matches!(checkin.message, CheckinMessage::TokenUpdate(_))
            && !checkin.channel.is_device_channel();
        if !first_user_token_update {
            if let Err(e) = self.authorize(caller) {
                return Self::immediate(Err(e));
            }
        }
        self.see();
        let channel = checkin.channel;
        match checkin.message {
            CheckinMessage::Authenticate(_) => Self::immediate(Err(DeviceError::Unavailable)),
            CheckinMessage::TokenUpdate(message) => {
                AtomicResponse::new(self.token_update(channel, message))
            }
            CheckinMessage::CheckOut(_) => self.check_out(),
            CheckinMessage::SetBootstrapToken(message) => AtomicResponse::new(
                self.set_bootstrap_token(&channel, message.token, message.awaiting_configuration),
            ),
            CheckinMessage::GetBootstrapToken(_) => {
                let token = self.get_bootstrap_token(&channel);
                self.answer(token)
            }
            CheckinMessage::UserAuthenticate(message) => {
                let challenge = self.user_authenticate(message.digest_response);
                self.answer(challenge)
            }
            CheckinMessage::GetToken(message) => {
                Self::immediate(Err(DeviceError::NoTokenService(message.service_type)))
            }
            CheckinMessage::DeclarativeManagement(message) => {
                self.declarative_management(message.endpoint, message.data)
            }
        }
    }
}

impl Handler<HandleConnect> for DeviceActor {
    type Result = Reply<Option<Arc<StoredCommand>>>;

    fn handle(&mut self, msg: HandleConnect, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        if let Err(e) = self.authorize(msg.caller) {
            return Self::immediate(Err(e));
        }
        if self.registry.webhooks().is_some() {
            self.webhook_draft = Some(Draft::connect(
                &msg.report.channel,
                msg.report.status.as_str(),
                msg.report.command_uuid.as_deref(),
                msg.raw.clone(),
            ));
        }
        let reply = self.connect(msg.report, msg.raw);
        self.webhook_draft = None;
        reply
    }
}

impl Handler<UnparseableResult> for DeviceActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: UnparseableResult, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        let entry = self
            .loaded()
            .ok()
            .and_then(|l| l.queue.mark_unparseable_result());
        match entry {
            Some(entry) => {
                if entry.parked {
                    tracing::warn!(enrollment_id = %self.id, command_uuid = %entry.command_uuid, "command parked after repeated unparseable results");
                    metrics::counter!("orchard_commands_parked_total").increment(1);
                }
                let batch = vec![self.queue_entry_mutation(entry)];
                AtomicResponse::new(Box::pin(self.commit_future(batch, ()).map(|_, _, _| ())))
            }
            None => AtomicResponse::new(Box::pin(ready(()))),
        }
    }
}

impl Handler<Enqueue> for DeviceActor {
    type Result = Reply<PushDecision>;

    fn handle(&mut self, msg: Enqueue, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        if let Err(e) = self.record() {
            return Self::immediate(Err(e));
        }
        let loaded = match self.loaded() {
            Ok(loaded) => loaded,
            Err(e) => return Self::immediate(Err(e)),
        };
        let seq = loaded.queue.next_seq(now_millis() * 1000);
        let entry = QueueEntry::new(
            seq,
            &msg.command.command_uuid,
            &msg.command.request_type,
            msg.priority,
            now_secs(),
        );
        if !loaded.queue.push(Pending {
            entry: entry.clone(),
            command: msg.command,
        }) {
            return Self::immediate(Ok(PushDecision::AlreadyPending));
        }
        metrics::gauge!("orchard_queue_depth").increment(1.0);
        tracing::info!(enrollment_id = %self.id, command_uuid = %entry.command_uuid, request_type = %entry.request_type, "command enqueued");
        let mut batch = vec![self.queue_entry_mutation(entry)];
        let due = self.first_wake_due();
        self.schedule_wake(&mut batch, due, 0);
        let decision = self.push_decision();
        self.commit(batch, decision)
    }
}

impl Handler<Cancel> for DeviceActor {
    type Result = Reply<bool>;

    fn handle(&mut self, msg: Cancel, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        let removed = match self.loaded() {
            Ok(loaded) => loaded
                .queue
                .remove(&msg.command_uuid)
                .map(|pending| (pending, loaded.queue.pending_from())),
            Err(e) => return Self::immediate(Err(e)),
        };
        match removed {
            Some((pending, pending_from)) => {
                metrics::gauge!("orchard_queue_depth").decrement(1.0);
                tracing::info!(enrollment_id = %self.id, command_uuid = %msg.command_uuid, "command cancelled");
                let mut batch = vec![Mutation::RemoveQueueEntry {
                    enrollment_id: self.id.clone(),
                    seq: pending.entry.seq,
                    pending_from,
                }];
                self.clear_wake_if_done(&mut batch);
                self.commit(batch, true)
            }
            None => Self::immediate(Ok(false)),
        }
    }
}

impl Handler<GetPushTarget> for DeviceActor {
    type Result = Result<PushTarget, DeviceError>;

    fn handle(&mut self, _: GetPushTarget, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        self.push_target()
    }
}

impl Handler<Snapshot> for DeviceActor {
    type Result = Result<DeviceSnapshot, DeviceError>;

    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        let record = self.record()?.clone();
        let pending = self
            .loaded()?
            .queue
            .iter()
            .map(|p| p.entry.clone())
            .collect();
        Ok(DeviceSnapshot { record, pending })
    }
}

impl Handler<ResetForReenrollment> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _: ResetForReenrollment, _: &mut Context<Self>) {
        if let Ok(loaded) = self.loaded() {
            metrics::gauge!("orchard_queue_depth").decrement(loaded.queue.len() as f64);
            loaded.queue.clear();
        }
    }
}

impl Handler<RegisterUserChannel> for DeviceActor {
    type Result = Reply<()>;

    fn handle(
        &mut self,
        RegisterUserChannel(user_channel): RegisterUserChannel,
        _: &mut Context<Self>,
    ) -> Self::Result {
        self.touch();
        match self.record() {
            Ok(record) if !record.user_channels.contains(&user_channel) => {
                record.user_channels.push(user_channel);
                let batch = vec![Mutation::PutEnrollment(record.clone())];
                self.commit(batch, ())
            }
            Ok(_) => Self::immediate(Ok(())),
            Err(e) => Self::immediate(Err(e)),
        }
    }
}

impl Handler<InvalidatePushToken> for DeviceActor {
    type Result = Reply<()>;

    fn handle(&mut self, msg: InvalidatePushToken, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        let record = match self.record() {
            Ok(record) => record,
            Err(e) => return Self::immediate(Err(e)),
        };
        let same_token = record.push.as_ref().is_some_and(|p| p.token == msg.token);
        if !same_token || !record.push_token_valid {
            return Self::immediate(Ok(()));
        }
        record.push_token_valid = false;
        tracing::warn!(enrollment_id = %record.id, "APNs reported the push token invalid; not pushing until the next TokenUpdate");
        metrics::counter!("orchard_push_tokens_invalidated_total").increment(1);
        let batch = vec![Mutation::PutEnrollment(record.clone())];
        self.commit(batch, ())
    }
}

impl Handler<WakeDue> for DeviceActor {
    type Result = Reply<Option<PushTarget>>;

    fn handle(&mut self, msg: WakeDue, _: &mut Context<Self>) -> Self::Result {
        self.wake_due(msg.attempt)
    }
}

impl Handler<Abandon> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _: Abandon, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Passivate> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _: Passivate, ctx: &mut Context<Self>) {
        self.passivate(ctx);
    }
}

/// The optional device facts of an Authenticate, kept for the inventory API.
fn device_facts(message: &Authenticate) -> Vec<(String, String)> {
    [
        ("SerialNumber", &message.serial_number),
        ("Model", &message.model),
        ("ModelName", &message.model_name),
        ("DeviceName", &message.device_name),
        ("OSVersion", &message.os_version),
        ("BuildVersion", &message.build_version),
        ("ProductName", &message.product_name),
        ("IMEI", &message.imei),
        ("MEID", &message.meid),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.as_ref().map(|v| (key.to_string(), v.clone())))
    .collect()
}
