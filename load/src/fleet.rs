//! The simulated fleet: devices are plain data (identity, push token, a little protocol
//! state); a device only runs code while a push has woken it or a scenario drives it.
//!
//! A device costs well under 2 KB: its certificate and key (~600 bytes), UDID, token and
//! the declarations it holds. Sessions borrow the shared client and never hold a device's
//! state across an `await`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use orchard::identity::IssuedIdentity;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::http::{Credentials, Failed, Http};
use crate::identities::udid;
use crate::messages::{self, Answer, ManifestItem, ReceivedCommand, CHECKIN, CONNECT};

/// Fractions of the fleet with each misbehaviour, decided per device deterministically so
/// a re-run sees the same devices misbehave.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fractions {
    pub offline: f64,
    pub not_now: f64,
    pub error: f64,
    pub check_out: f64,
}

/// How one device behaves for its whole life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traits {
    /// Enrolls, then never answers a push.
    pub offline: bool,
    /// Answers the first command it ever receives `NotNow`.
    pub not_now: bool,
    /// Answers every command `Error` with an ErrorChain.
    pub error: bool,
    /// Sends `CheckOut` right after enrolling.
    pub check_out: bool,
}

impl Traits {
    pub fn for_device(index: u32, fractions: &Fractions) -> Self {
        let draw = |salt: u64| unit_interval(u64::from(index) ^ salt.rotate_left(32));
        Self {
            offline: draw(1) < fractions.offline,
            not_now: draw(2) < fractions.not_now,
            error: draw(3) < fractions.error,
            check_out: draw(4) < fractions.check_out,
        }
    }
}

/// SplitMix64 mapped onto [0, 1): uniform, cheap and reproducible per device.
fn unit_interval(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// What finishes the current scenario for one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Goal {
    #[default]
    None,
    /// Enrolled (Authenticate and TokenUpdate accepted).
    Enrolled,
    /// Connected with `Idle` at least once.
    Connected,
    /// Answered (acknowledged or errored, not `NotNow`) a command of this type.
    Answered { request_type: String },
    /// Reported, in a successful status report, the revision of `identifier` whose payload
    /// `Echo` is `echo`.
    Revision { identifier: String, echo: String },
}

pub struct Device {
    pub udid: Box<str>,
    pub token: [u8; 32],
    cert_der: Box<[u8]>,
    key_pkcs8_der: Box<[u8]>,
    pub traits: Traits,
    state: RefCell<DeviceState>,
}

#[derive(Default)]
struct DeviceState {
    enrolled: bool,
    checked_out: bool,
    in_session: bool,
    wake_pending: bool,
    refused_once: bool,
    done: bool,
    declarations_token: Option<Box<str>>,
    held: Vec<ManifestItem>,
    /// Command UUIDs this device acknowledged.
    acknowledged: Vec<Box<str>>,
}

impl Device {
    fn new(index: u32, identity: IssuedIdentity, traits: Traits) -> Self {
        let udid = udid(index);
        let token: [u8; 32] = Sha256::digest(udid.as_bytes()).into();
        Self {
            udid: udid.into_boxed_str(),
            token,
            cert_der: identity.cert_der.into_boxed_slice(),
            key_pkcs8_der: identity.key_pkcs8_der.into_boxed_slice(),
            traits,
            state: RefCell::new(DeviceState::default()),
        }
    }

    pub fn push_magic(&self) -> String {
        format!("MAGIC-{}", self.udid)
    }

    fn credentials(&self) -> Credentials<'_> {
        Credentials {
            cert_der: &self.cert_der,
            key_pkcs8_der: &self.key_pkcs8_der,
        }
    }

    /// Enrolled and not checked out: Orchard holds a queue for it.
    pub fn enrolled_and_present(&self) -> bool {
        let state = self.state.borrow();
        state.enrolled && !state.checked_out
    }

    /// Enrolled, not checked out and answering pushes.
    pub fn online(&self) -> bool {
        let state = self.state.borrow();
        state.enrolled && !state.checked_out && !self.traits.offline
    }
}

/// Counters of what devices answered, for the report.
#[derive(Default)]
pub struct Answers {
    pub acknowledged: Cell<u64>,
    pub not_now: Cell<u64>,
    pub error: Cell<u64>,
    pub ddm_syncs: Cell<u64>,
    pub pushes_ignored: Cell<u64>,
    /// Commands a device received again after acknowledging them.
    pub delivered_twice: Cell<u64>,
}

fn bump(counter: &Cell<u64>) {
    counter.set(counter.get() + 1);
}

pub struct Fleet {
    pub devices: Vec<Device>,
    by_token: HashMap<[u8; 32], u32>,
    pub topic: String,
    pub http: Rc<Http>,
    goal: RefCell<Goal>,
    goal_started: Cell<Instant>,
    completed: Cell<usize>,
    progress: Notify,
    /// Devices woken by a push and not yet served: indices, not tasks, so a push storm
    /// over a million devices costs four bytes per waiting device.
    wakes: RefCell<VecDeque<u32>>,
    woken: Notify,
    pub answers: Answers,
}

impl Fleet {
    pub fn new(
        identities: Vec<IssuedIdentity>,
        fractions: &Fractions,
        topic: String,
        http: Rc<Http>,
    ) -> Self {
        let devices: Vec<Device> = identities
            .into_iter()
            .zip(0u32..)
            .map(|(identity, index)| {
                Device::new(index, identity, Traits::for_device(index, fractions))
            })
            .collect();
        let by_token = devices
            .iter()
            .zip(0u32..)
            .map(|(device, index)| (device.token, index))
            .collect();
        Self {
            devices,
            by_token,
            topic,
            http,
            goal: RefCell::new(Goal::None),
            goal_started: Cell::new(Instant::now()),
            completed: Cell::new(0),
            progress: Notify::new(),
            wakes: RefCell::new(VecDeque::new()),
            woken: Notify::new(),
            answers: Answers::default(),
        }
    }

    /// The device a push token (hex, as APNs saw it) belongs to.
    pub fn device_for_token(&self, token_hex: &str) -> Option<u32> {
        let mut token = [0u8; 32];
        hex::decode_to_slice(token_hex, &mut token).ok()?;
        self.by_token.get(&token).copied()
    }

    pub fn completed(&self) -> usize {
        self.completed.get()
    }

    /// Starts a measured phase: every device must reach `goal` again.
    pub fn set_goal(&self, goal: Goal) {
        for device in &self.devices {
            device.state.borrow_mut().done = false;
        }
        *self.goal.borrow_mut() = goal;
        self.completed.set(0);
        self.goal_started.set(Instant::now());
        self.http.stats.reset_convergence();
    }

    /// How many devices can reach `goal`: online ones, minus those that error every
    /// command when the goal needs a DDM sync (they never acknowledge its command).
    pub fn expected(&self) -> usize {
        let needs_acknowledgement = matches!(*self.goal.borrow(), Goal::Revision { .. });
        self.devices
            .iter()
            .filter(|device| device.online() && !(needs_acknowledgement && device.traits.error))
            .count()
    }

    pub fn online(&self) -> usize {
        self.devices.iter().filter(|device| device.online()).count()
    }

    fn mark_done(&self, index: u32) {
        let device = &self.devices[index as usize];
        let newly_done = {
            let mut state = device.state.borrow_mut();
            !std::mem::replace(&mut state.done, true)
        };
        if newly_done {
            self.completed.set(self.completed.get() + 1);
            self.http.stats.converged(self.goal_started.get().elapsed());
            self.progress.notify_waiters();
        }
    }

    /// Waits until `expected` devices reached the goal or `deadline` passed; true when
    /// they all did.
    pub async fn wait_for(&self, expected: usize, deadline: tokio::time::Instant) -> bool {
        loop {
            let progressed = self.progress.notified();
            if self.completed.get() >= expected {
                return true;
            }
            if tokio::time::timeout_at(deadline, progressed).await.is_err() {
                return self.completed.get() >= expected;
            }
        }
    }

    /// Authenticate + TokenUpdate (+ CheckOut for devices that leave at once).
    pub async fn enroll(&self, index: u32) -> Result<(), Failed> {
        let device = &self.devices[index as usize];
        let credentials = device.credentials();
        let authenticate = messages::authenticate(&device.udid, &self.topic);
        self.http
            .device_put("checkin:Authenticate", &credentials, CHECKIN, authenticate)
            .await?;
        let token_update = messages::token_update(
            &device.udid,
            &self.topic,
            &device.token,
            &device.push_magic(),
        );
        self.http
            .device_put("checkin:TokenUpdate", &credentials, CHECKIN, token_update)
            .await?;
        device.state.borrow_mut().enrolled = true;
        if device.traits.check_out {
            let check_out = messages::check_out(&device.udid, &self.topic);
            self.http
                .device_put("checkin:CheckOut", &credentials, CHECKIN, check_out)
                .await?;
            device.state.borrow_mut().checked_out = true;
        }
        if matches!(*self.goal.borrow(), Goal::Enrolled) {
            self.mark_done(index);
        }
        Ok(())
    }

    /// Whether device `index` acknowledged the command.
    pub fn acknowledged(&self, index: usize, command_uuid: &str) -> bool {
        let state = self.devices[index].state.borrow();
        state
            .acknowledged
            .iter()
            .any(|seen| &**seen == command_uuid)
    }

    /// Queues a wake-up for the device a push reached; a waker serves it.
    pub fn queue_wake(&self, index: u32) {
        self.wakes.borrow_mut().push_back(index);
        self.woken.notify_one();
    }

    /// Serves queued wake-ups one device at a time, forever; as many wakers run as
    /// devices may be awake at once.
    pub async fn run_waker(self: Rc<Self>) {
        loop {
            let next = self.wakes.borrow_mut().pop_front();
            match next {
                Some(index) => Rc::clone(&self).wake(index).await,
                None => self.woken.notified().await,
            }
        }
    }

    /// A push reached this device (or a scenario makes it check in). A busy device notes
    /// it and connects again when its current session ends, as the MDM client does.
    pub async fn wake(self: Rc<Self>, index: u32) {
        let device = &self.devices[index as usize];
        if !device.online() {
            bump(&self.answers.pushes_ignored);
            return;
        }
        {
            let mut state = device.state.borrow_mut();
            if state.in_session {
                state.wake_pending = true;
                return;
            }
            state.in_session = true;
        }
        loop {
            device.state.borrow_mut().wake_pending = false;
            // A failed request ends the session; the server re-pushes what is pending.
            let _ = self.connect_session(index).await;
            if !device.state.borrow().wake_pending {
                break;
            }
        }
        device.state.borrow_mut().in_session = false;
    }

    /// `Idle`, then answer every command until the queue is empty, then run the DDM syncs
    /// the acknowledged `DeclarativeManagement` commands asked for.
    async fn connect_session(&self, index: u32) -> Result<(), Failed> {
        let device = &self.devices[index as usize];
        let credentials = device.credentials();
        let mut body = self
            .http
            .device_put(
                "connect:Idle",
                &credentials,
                CONNECT,
                messages::idle(&device.udid),
            )
            .await?;
        if matches!(*self.goal.borrow(), Goal::Connected) {
            self.mark_done(index);
        }
        let mut syncs = Vec::new();
        while let Some(command) =
            messages::parse_command(&body).map_err(|err| Failed(err.to_string()))?
        {
            let answer = self.choose_answer(device);
            let endpoint = match answer {
                Answer::Acknowledged => "connect:Acknowledged",
                Answer::NotNow => "connect:NotNow",
                Answer::Error => "connect:Error",
            };
            let result = messages::command_result(&device.udid, &command, answer);
            body = self
                .http
                .device_put(endpoint, &credentials, CONNECT, result)
                .await?;
            self.count_answer(index, &command, answer);
            if answer == Answer::Acknowledged && command.request_type == "DeclarativeManagement" {
                syncs.push(command.data);
            }
        }
        for data in syncs {
            self.declarative_sync(index, data).await?;
        }
        Ok(())
    }

    fn choose_answer(&self, device: &Device) -> Answer {
        if device.traits.error {
            return Answer::Error;
        }
        let mut state = device.state.borrow_mut();
        if device.traits.not_now && !state.refused_once {
            state.refused_once = true;
            return Answer::NotNow;
        }
        Answer::Acknowledged
    }

    fn count_answer(&self, index: u32, command: &ReceivedCommand, answer: Answer) {
        if answer == Answer::Acknowledged {
            let mut state = self.devices[index as usize].state.borrow_mut();
            let uuid = command.command_uuid.as_str();
            if state.acknowledged.iter().any(|seen| &**seen == uuid) {
                bump(&self.answers.delivered_twice);
            } else {
                state.acknowledged.push(uuid.into());
            }
        }
        bump(match answer {
            Answer::Acknowledged => &self.answers.acknowledged,
            Answer::NotNow => &self.answers.not_now,
            Answer::Error => &self.answers.error,
        });
        let answers_goal = matches!(
            &*self.goal.borrow(),
            Goal::Answered { request_type } if *request_type == command.request_type
        );
        if answers_goal && answer != Answer::NotNow {
            self.mark_done(index);
        }
    }

    async fn ddm(
        &self,
        index: u32,
        endpoint: &'static str,
        path: &str,
        data: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, Failed> {
        let device = &self.devices[index as usize];
        let body = messages::declarative_management(&device.udid, path, data);
        self.http
            .device_put(endpoint, &device.credentials(), CHECKIN, body)
            .await
    }

    /// The device side of protocol.md §5.3: tokens (or the command's `Data`), and when the
    /// `DeclarationsToken` changed: declaration-items, every declaration not held at its
    /// server token, tokens again, then a status report of everything held.
    async fn declarative_sync(&self, index: u32, data: Option<Vec<u8>>) -> Result<(), Failed> {
        let invalid = |err: messages::MessageError| Failed(err.to_string());
        let tokens = match data {
            Some(data) => data,
            None => self
                .ddm(index, "ddm:tokens", "tokens", None)
                .await?
                .to_vec(),
        };
        let declarations_token = messages::declarations_token(&tokens).map_err(invalid)?;
        let device = &self.devices[index as usize];
        if device.state.borrow().declarations_token.as_deref() == Some(&declarations_token) {
            return Ok(());
        }
        bump(&self.answers.ddm_syncs);
        let items = self
            .ddm(index, "ddm:declaration-items", "declaration-items", None)
            .await?;
        let manifest = messages::manifest(&items).map_err(invalid)?;
        let goal = self.goal.borrow().clone();
        let mut reached_goal = false;
        for item in &manifest {
            let already_held = device.state.borrow().held.contains(item);
            if already_held {
                continue;
            }
            let path = format!("declaration/{}/{}", item.category, item.identifier);
            let body = self.ddm(index, "ddm:declaration", &path, None).await?;
            if let Goal::Revision { identifier, echo } = &goal {
                let echoed = messages::payload_echo(&body).map_err(invalid)?;
                reached_goal |= item.identifier == *identifier && echoed.as_ref() == Some(echo);
            }
        }
        self.ddm(index, "ddm:tokens", "tokens", None).await?;
        self.ddm(
            index,
            "ddm:status",
            "status",
            Some(messages::status_report(&manifest)),
        )
        .await?;
        {
            let mut state = device.state.borrow_mut();
            state.held = manifest;
            state.declarations_token = Some(declarations_token.into_boxed_str());
        }
        if reached_goal {
            self.mark_done(index);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traits_follow_the_fractions_and_are_reproducible() {
        let fractions = Fractions {
            offline: 0.1,
            not_now: 0.0,
            error: 1.0,
            check_out: 0.5,
        };
        let traits: Vec<Traits> = (0..10_000)
            .map(|index| Traits::for_device(index, &fractions))
            .collect();
        let offline = traits.iter().filter(|t| t.offline).count();
        let checked_out = traits.iter().filter(|t| t.check_out).count();
        assert!((800..1200).contains(&offline), "{offline}");
        assert!((4700..5300).contains(&checked_out), "{checked_out}");
        assert!(traits.iter().all(|t| t.error && !t.not_now));
        assert_eq!(traits[42], Traits::for_device(42, &fractions));
    }

    #[test]
    fn traits_are_drawn_independently() {
        let half = Fractions {
            offline: 0.5,
            not_now: 0.5,
            error: 0.0,
            check_out: 0.0,
        };
        let both = (0..10_000)
            .map(|index| Traits::for_device(index, &half))
            .filter(|t| t.offline && t.not_now)
            .count();
        assert!((2200..2800).contains(&both), "{both}");
    }
}
