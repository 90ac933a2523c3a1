//! Messages a device actor answers. Each carries everything the actor needs, so the HTTP
//! layer never touches device state directly.

use std::sync::Arc;

use actix::Message;
use serde::{Deserialize, Serialize};

use super::DeviceError;
use crate::ddm::doctor::EnrollmentFacts;
use crate::ddm::sync::DdmState;
use crate::protocol::checkin::Checkin;
use crate::protocol::connect::ConnectReport;
use crate::push::PushTarget;
use crate::store::{CertFingerprint, EnrollmentRecord, QueueEntry, StoredCommand};

/// How the sender of a device message was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A verified identity certificate; a device-channel actor checks it against its binding.
    Certificate(CertFingerprint),
    /// A user channel whose device actor already accepted the certificate.
    VouchedByDevice,
}

/// Check the caller's certificate against the device channel's binding.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<(), DeviceError>")]
pub struct Authorize(pub CertFingerprint);

/// A check-in of an enrollment that lives on another MDM server (`PUT /migration`):
/// Authenticate, TokenUpdate or SetBootstrapToken as that server stored it, imported
/// without a device identity. The raw plist travels, so a peer can carry it to the
/// owner of the enrollment's shard.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<(), DeviceError>")]
pub struct ImportCheckin {
    pub plist: Vec<u8>,
}

/// Bind the identity certificate an imported enrollment presents first (`--retro`).
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<(), DeviceError>")]
pub struct BindImported(pub CertFingerprint);

/// Asked of a device channel before one of its user channels is imported: the device
/// must have been imported and not yet be bound.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<(), DeviceError>")]
pub struct VouchForImport;

/// A check-in message for this channel.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<CheckinReply, DeviceError>")]
pub struct HandleCheckin {
    pub checkin: Checkin,
    /// The exact body, for the webhook event.
    pub raw: bytes::Bytes,
    pub caller: Caller,
}

/// What the HTTP layer sends back for a check-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckinReply {
    /// 200 with an empty body.
    Accepted,
    /// 200 with this XML plist body.
    Plist(Vec<u8>),
    /// 200 with this JSON body (DDM).
    Json(bytes::Bytes),
}

/// A connect report (Idle or a command result) for this channel.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Option<Arc<StoredCommand>>, DeviceError>")]
pub struct HandleConnect {
    pub report: ConnectReport,
    /// The exact body, stored as the command result and sent in the webhook event.
    pub raw: bytes::Bytes,
    pub caller: Caller,
}

/// The device sent a connect body that cannot be parsed; it answers the in-flight command.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct UnparseableResult;

/// Queue a command (its body is already durable in the store).
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<PushDecision, DeviceError>")]
pub struct Enqueue {
    pub command: Arc<StoredCommand>,
    pub priority: u8,
}

/// Whether a newly queued command should wake the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushDecision {
    Push(PushTarget),
    /// A wake-up was requested moments ago and the device has not connected since: one
    /// pending push per device is enough (APNs keeps only the latest anyway).
    AlreadyPending,
    NotPushable(DeviceError),
}

/// Remove a pending command; answers whether it was pending.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<bool, DeviceError>")]
pub struct Cancel {
    pub command_uuid: String,
}

/// The channel's push coordinates, if it can be pushed.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<PushTarget, DeviceError>")]
pub struct GetPushTarget;

/// A consistent view of the channel for the admin API.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<DeviceSnapshot, DeviceError>")]
pub struct Snapshot;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub record: EnrollmentRecord,
    pub pending: Vec<QueueEntry>,
}

/// The device re-enrolled: this user channel's queue is void.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct ResetForReenrollment;

/// A user channel of this device completed its first TokenUpdate.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<(), DeviceError>")]
pub struct RegisterUserChannel(pub String);

/// APNs said this token is dead; ignored if the device has sent a new one since.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<(), DeviceError>")]
pub struct InvalidatePushToken {
    pub token: Vec<u8>,
}

/// The re-push sweep found this enrollment's wake due: answers the push target if the
/// device should be woken now, and reschedules (or clears) the wake.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Option<PushTarget>, DeviceError>")]
pub struct WakeDue {
    pub attempt: u32,
}

/// Assign (or unassign) a declaration set to this enrollment. When the assignment changed
/// and `then_sync` is given, the sync command is queued in the same durable write, so a
/// bulk assignment costs each enrollment one activation and one write.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<Assigned, DeviceError>")]
pub struct AssignSet {
    pub set: String,
    pub assign: bool,
    pub then_sync: Option<SyncCommand>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub changed: bool,
    /// Whether to wake the device for the queued sync (`None`: no sync was queued).
    pub push: Option<PushDecision>,
}

/// Queue a DeclarativeManagement command so the device syncs (replacing one still
/// pending).
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<PushDecision, DeviceError>")]
pub struct SyncDeclarations {
    pub command: SyncCommand,
}

/// Which DeclarativeManagement command starts the sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncCommand {
    /// A command of the enrollment's own, carrying its current SyncTokens in `Data`.
    WithTokens,
    /// One body, already stored, shared by every enrollment of a fleet-wide change: the
    /// change costs one command row, not one per device.
    Shared(Arc<StoredCommand>),
}

/// The enrollment's DDM state and the facts the sync doctor needs.
#[derive(Clone, Debug, Message, Serialize, Deserialize)]
#[rtype(result = "Result<DdmView, DeviceError>")]
pub struct GetDdmView;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DdmView {
    pub state: DdmState,
    pub facts: EnrollmentFacts,
}

/// Leave memory now (the registry is over its resident bound).
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct Passivate;

/// Stop without writing anything: the device's shard belongs to another node now, and
/// what this actor holds may be stale.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct Abandon;
