//! The device actor's side of migrating enrollments from another MDM server without
//! re-enrolling the devices (NanoMDM's `/migration` and `-retro`).
//!
//! An imported check-in (Authenticate, TokenUpdate, SetBootstrapToken, as the other
//! server stored it) is applied like the device's own, except that no certificate comes
//! with it: the device channel is left *unbound*. Such an enrollment refuses every
//! certificate ([`DeviceError::ImportedUnbound`]) unless Orchard runs with `--retro`;
//! then the first certificate it presents that chains to the identity CA is bound
//! ([`BindImported`]), through the same conditional `BindCertificate` an Authenticate
//! uses, and from then on the normal rule holds: every request must present that
//! certificate. The actor handles one message at a time, so of two devices racing for
//! one imported enrollment the first binds and the second presents a mismatch; across
//! nodes only the shard's owner writes, under its lease's fence.
//!
//! A migration never overwrites an enrollment that is bound here already (the device
//! talks to Orchard; what the old server stored is older): it answers
//! [`DeviceError::AlreadyEnrolled`].

use actix::prelude::*;

use super::actor::{DeviceActor, Reply, Step};
use super::messages::{BindImported, CheckinReply, ImportCheckin, VouchForImport};
use super::DeviceError;
use crate::protocol::checkin::{decode_checkin, CheckinMessage};
use crate::store::{CertFingerprint, Mutation};

/// Where an enrollment stands for a migration.
enum Standing {
    /// Never seen here.
    Unknown,
    /// Imported, waiting for its first certificate.
    Unbound,
    /// Bound to a certificate: the device itself talks to this server.
    Bound,
}

impl DeviceActor {
    fn standing(&mut self) -> Result<Standing, DeviceError> {
        Ok(match &self.loaded()?.record {
            None => Standing::Unknown,
            Some(record) if record.cert_fingerprint.is_none() => Standing::Unbound,
            Some(_) => Standing::Bound,
        })
    }

    /// A device-channel message other than Authenticate may be imported once the
    /// enrollment's Authenticate was, and while it is unbound.
    fn importable_after_authenticate(&mut self) -> Result<(), DeviceError> {
        match self.standing()? {
            Standing::Unbound => Ok(()),
            Standing::Unknown => Err(DeviceError::NotAuthenticated(self.id.clone())),
            Standing::Bound => Err(DeviceError::AlreadyEnrolled(self.id.clone())),
        }
    }

    fn import(&mut self, plist: &[u8]) -> Step<CheckinReply> {
        let checkin = match decode_checkin(plist) {
            Ok(checkin) => checkin,
            Err(e) => return Self::done(Err(DeviceError::Unimportable(e.to_string().into()))),
        };
        if checkin.channel.id != self.id {
            return Self::done(Err(DeviceError::Unimportable(
                "the check-in names another enrollment".into(),
            )));
        }
        let channel = checkin.channel;
        let on_device_channel = channel.is_device_channel();
        match checkin.message {
            CheckinMessage::Authenticate(_) if !on_device_channel => Self::done(Err(
                DeviceError::Unimportable("Authenticate belongs to a device channel".into()),
            )),
            CheckinMessage::Authenticate(message) => match self.standing() {
                Ok(Standing::Bound) => Self::done(Err(DeviceError::AlreadyEnrolled(channel.id))),
                Ok(_) => self.reenroll(channel, message, None),
                Err(e) => Self::done(Err(e)),
            },
            CheckinMessage::TokenUpdate(message) if on_device_channel => {
                match self.importable_after_authenticate() {
                    Ok(()) => self.token_update(channel, message),
                    Err(e) => Self::done(Err(e)),
                }
            }
            CheckinMessage::TokenUpdate(message) => {
                // A user channel is imported only under its imported device channel.
                let registry = std::sync::Arc::clone(&self.registry);
                let device_id = channel.device_id.clone();
                let vouched = async move { registry.call(&device_id, VouchForImport).await };
                Box::pin(
                    vouched
                        .into_actor(self)
                        .then(move |vouched, act, _| match vouched {
                            Ok(()) => act.token_update(channel, message),
                            Err(e) => Self::done(Err(e)),
                        }),
                )
            }
            CheckinMessage::SetBootstrapToken(message) => {
                match self.importable_after_authenticate() {
                    Ok(()) => self.set_bootstrap_token(
                        &channel,
                        message.token,
                        message.awaiting_configuration,
                    ),
                    Err(e) => Self::done(Err(e)),
                }
            }
            other => Self::done(Err(DeviceError::Unimportable(
                format!(
                    "{} is not imported: a migration sends Authenticate, TokenUpdate and SetBootstrapToken",
                    other.message_type()
                )
                .into(),
            ))),
        }
    }

    /// Bind `fingerprint` to this unbound imported enrollment (`--retro`).
    fn bind_imported(&mut self, fingerprint: CertFingerprint) -> Step<()> {
        let id = self.id.clone();
        if !self.registry.settings().retro {
            return Self::done(Err(DeviceError::ImportedUnbound(id)));
        }
        let bound = match self.record() {
            Ok(record) => record.cert_fingerprint,
            Err(e) => return Self::done(Err(e)),
        };
        match bound {
            // The same device, racing itself (two requests at once): already done.
            Some(bound) if bound == fingerprint => Self::done(Ok(())),
            Some(_) => Self::done(Err(DeviceError::CertificateMismatch(id))),
            None => self.unless_bound_elsewhere(fingerprint, move |act| {
                let record = match act.record() {
                    Ok(record) => record,
                    Err(e) => return Self::done(Err(e)),
                };
                record.cert_fingerprint = Some(fingerprint);
                let batch = vec![
                    Mutation::BindCertificate {
                        fingerprint,
                        enrollment_id: record.id.clone(),
                    },
                    Mutation::PutEnrollment(record.clone()),
                ];
                tracing::info!(enrollment_id = %record.id, fingerprint = %hex::encode(fingerprint), "imported enrollment bound to the first identity certificate it presented");
                act.commit_future(batch, ())
            }),
        }
    }
}

impl Handler<ImportCheckin> for DeviceActor {
    type Result = Reply<()>;

    fn handle(&mut self, msg: ImportCheckin, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        AtomicResponse::new(Box::pin(
            self.import(&msg.plist)
                .map(|imported, _, _| imported.map(|_| ())),
        ))
    }
}

impl Handler<BindImported> for DeviceActor {
    type Result = Reply<()>;

    fn handle(
        &mut self,
        BindImported(fingerprint): BindImported,
        _: &mut Context<Self>,
    ) -> Self::Result {
        self.touch();
        let outcome_of = |bound: &Result<(), DeviceError>| match bound {
            Ok(()) => "bound",
            Err(e) => e.reason(),
        };
        AtomicResponse::new(Box::pin(self.bind_imported(fingerprint).map(
            move |bound, _, _| {
                metrics::counter!("orchard_retro_bindings_total", "outcome" => outcome_of(&bound))
                    .increment(1);
                bound
            },
        )))
    }
}

impl Handler<VouchForImport> for DeviceActor {
    type Result = Result<(), DeviceError>;

    fn handle(&mut self, _: VouchForImport, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        self.importable_after_authenticate()
    }
}
