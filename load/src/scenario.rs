//! The scenarios: what the operator side does (enqueue, publish, assign) and what the
//! fleet must reach before a phase counts as finished.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use awc::http::Method;
use futures_util::{stream, StreamExt};
use plist::{Dictionary, Value};
use serde_json::json;
use tokio::time::Instant as Deadline;

use crate::cli::{Args, EnqueueRoute, Scenario};
use crate::fleet::{Fleet, Goal};
use crate::http::Failed;

/// Declarations the DDM scenarios publish: a test configuration whose payload changes per
/// revision, and the activation that applies it.
pub const CONFIGURATION: &str = "com.orchard-load.test";
const ACTIVATION: &str = "com.orchard-load.activation";
const SET: &str = "orchard-load";
/// Enqueue requests in flight at once: enough to overlap the server's durable writes.
const PARALLEL_CHUNKS: usize = 4;

/// One measured phase: how many devices should finish, how many did, and when.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: &'static str,
    pub expected: usize,
    pub completed: usize,
    pub seconds: f64,
    /// `[count, p50, p90, p99, max]` milliseconds from the start of the phase.
    pub convergence_ms: Option<[u64; 5]>,
}

pub struct Outcome {
    pub phases: Vec<Phase>,
    pub server_view: Option<serde_json::Value>,
    pub failover: Option<Failover>,
}

/// What `failover` measured around the node it killed.
#[derive(Clone, Debug)]
pub struct Failover {
    pub victim_pid: u32,
    /// Seconds into the storm when the node was killed.
    pub killed_at_s: f64,
    /// Commands the server acknowledged (enqueue answered `queued`) that it holds neither
    /// as queued nor as answered at the end: gone.
    pub lost: usize,
    /// Acknowledged commands not yet delivered at the deadline, still in their queue.
    pub still_queued: usize,
    /// Commands whose answer the server stored while the reply to the device was lost
    /// (the device could not tell it was received).
    pub answer_reply_lost: usize,
    /// Commands a device received again after acknowledging them.
    pub delivered_twice: u64,
    /// From the kill until the last failed request: how long some device or operator
    /// request was still refused.
    pub unserved_s: f64,
}

/// Runs `args.scenario` against the fleet; the last phase is the headline.
pub async fn run(fleet: &Rc<Fleet>, args: &Args, victim: Option<u32>) -> Result<Outcome, Failed> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut phases = Vec::new();
    let enrollment = enroll(fleet, args, timeout).await;
    let mut server_view = None;
    let mut failover = None;
    match args.scenario {
        Scenario::Enroll => phases.push(enrollment),
        Scenario::Checkin => {
            phases.push(enrollment);
            phases.push(checkin(fleet, args, args.rate).await);
        }
        Scenario::CommandStorm => {
            phases.push(enrollment);
            phases.push(command_storm(fleet, args, timeout).await?);
        }
        Scenario::DdmConverge => {
            phases.push(enrollment);
            let revision = Revision::new();
            phases.push(publish_and_assign(fleet, args, &revision, timeout).await?);
            phases.push(change(fleet, &revision, timeout).await?);
            server_view = fleet_view(fleet).await;
        }
        Scenario::Mixed => {
            phases.push(enrollment);
            let revision = Revision::new();
            phases.push(publish_and_assign(fleet, args, &revision, timeout).await?);
            phases.push(mixed(fleet, args, &revision, timeout).await?);
            server_view = fleet_view(fleet).await;
        }
        Scenario::Failover => {
            phases.push(enrollment);
            let victim = victim.ok_or_else(|| Failed("failover: no node to kill".into()))?;
            let (phase, measured) = storm_with_a_kill(fleet, args, victim, timeout).await?;
            phases.push(phase);
            failover = Some(measured);
        }
    }
    Ok(Outcome {
        phases,
        server_view,
        failover,
    })
}

fn deadline_after(timeout: Duration) -> Deadline {
    Deadline::now() + timeout
}

fn finish(fleet: &Fleet, name: &'static str, expected: usize, started: Instant) -> Phase {
    Phase {
        name,
        expected,
        completed: fleet.completed(),
        seconds: started.elapsed().as_secs_f64(),
        convergence_ms: fleet.http.stats.convergence(),
    }
}

/// Every device enrolls, `--concurrency` at a time.
async fn enroll(fleet: &Rc<Fleet>, args: &Args, timeout: Duration) -> Phase {
    fleet.set_goal(Goal::Enrolled);
    let started = Instant::now();
    let count = fleet.devices.len();
    let all = stream::iter(0..count as u32).for_each_concurrent(args.concurrency, |index| {
        let fleet = Rc::clone(fleet);
        async move {
            // A failed enrollment is counted in the endpoint errors; the device stays out.
            let _ = fleet.enroll(index).await;
        }
    });
    let _ = tokio::time::timeout(timeout, all).await;
    finish(fleet, "enroll", count, started)
}

/// Idle connects round-robin over the online devices, paced at `rate` per second (0: as
/// fast as the concurrency allows), for `--duration`.
async fn checkin(fleet: &Rc<Fleet>, args: &Args, rate: f64) -> Phase {
    fleet.set_goal(Goal::Connected);
    let started = Instant::now();
    let (online, issued) = idle_traffic(fleet, args, rate).await;
    let expected = online.min(usize::try_from(issued).unwrap_or(usize::MAX));
    finish(fleet, "checkin", expected, started)
}

/// The check-in load itself: `(online devices, connects issued)`.
async fn idle_traffic(fleet: &Rc<Fleet>, args: &Args, rate: f64) -> (usize, u64) {
    let online: Rc<Vec<u32>> = Rc::new(
        (0..fleet.devices.len() as u32)
            .filter(|index| fleet.devices[*index as usize].online())
            .collect(),
    );
    if online.is_empty() {
        return (0, 0);
    }
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(args.duration);
    let issued = Rc::new(Cell::new(0u64));
    let workers = (0..args.concurrency).map(|_| {
        let fleet = Rc::clone(fleet);
        let online = Rc::clone(&online);
        let issued = Rc::clone(&issued);
        async move {
            loop {
                let number = issued.get();
                issued.set(number + 1);
                if rate > 0.0 {
                    let slot = started + Duration::from_secs_f64(number as f64 / rate);
                    if slot >= stop {
                        break;
                    }
                    tokio::time::sleep_until(slot.into()).await;
                }
                if Instant::now() >= stop {
                    break;
                }
                let index = online[(number % online.len() as u64) as usize];
                // Through `wake`, so a device already in a session (woken by a push)
                // connects again afterwards instead of running two sessions at once.
                Rc::clone(&fleet).wake(index).await;
            }
        }
    });
    futures_util::future::join_all(workers).await;
    (online.len(), issued.get())
}

/// Devices that can receive commands: enrolled and not checked out.
fn enrolled_udids(fleet: &Fleet) -> Vec<&str> {
    fleet
        .devices
        .iter()
        .filter(|device| device.enrolled_and_present())
        .map(|device| &*device.udid)
        .collect()
}

/// Enqueues one command for `udids` in chunks, `PARALLEL_CHUNKS` requests at a time.
async fn enqueue(fleet: &Fleet, args: &Args, udids: &[&str]) -> Result<(), Failed> {
    let requests = udids.chunks(args.chunk).map(|chunk| async move {
        match args.enqueue {
            EnqueueRoute::Api => {
                let body = json!({
                    "targets": chunk,
                    "request_type": args.command.request_type(),
                    "params": args.command.params(),
                });
                fleet
                    .http
                    .api(
                        "api:commands",
                        Method::POST,
                        "/api/v1/commands",
                        Some((
                            "application/json",
                            serde_json::to_vec(&body).unwrap_or_default(),
                        )),
                    )
                    .await
            }
            EnqueueRoute::Nanohub => {
                let path = format!("/api/v1/nanomdm/enqueue/{}", chunk.join(","));
                fleet
                    .http
                    .api(
                        "api:nanomdm-enqueue",
                        Method::PUT,
                        &path,
                        Some(("application/xml", raw_command(args))),
                    )
                    .await
            }
        }
    });
    let answers: Vec<_> = stream::iter(requests)
        .buffer_unordered(PARALLEL_CHUNKS)
        .collect()
        .await;
    answers.into_iter().try_for_each(|answer| answer.map(drop))
}

/// The command plist NanoHUB's enqueue route takes.
fn raw_command(args: &Args) -> Vec<u8> {
    let mut command = Dictionary::new();
    command.insert("RequestType".into(), args.command.request_type().into());
    if let Some(queries) = args.command.params()["Queries"].as_array() {
        let queries = queries
            .iter()
            .filter_map(|query| query.as_str().map(Value::from))
            .collect();
        command.insert("Queries".into(), Value::Array(queries));
    }
    let mut outer = Dictionary::new();
    outer.insert(
        "CommandUUID".into(),
        uuid::Uuid::new_v4().to_string().to_uppercase().into(),
    );
    outer.insert("Command".into(), Value::Dictionary(command));
    let mut body = Vec::new();
    let _ = Value::Dictionary(outer).to_writer_xml(&mut body);
    body
}

/// One command to every device; finished when every online device has answered it.
async fn command_storm(fleet: &Rc<Fleet>, args: &Args, timeout: Duration) -> Result<Phase, Failed> {
    fleet.set_goal(Goal::Answered {
        request_type: args.command.request_type().to_owned(),
    });
    let started = Instant::now();
    let deadline = deadline_after(timeout);
    let expected = fleet.expected();
    enqueue(fleet, args, &enrolled_udids(fleet)).await?;
    fleet.wait_for(expected, deadline).await;
    Ok(finish(fleet, "command-storm", expected, started))
}

/// A command storm through every node; `--kill-after` seconds in, node `victim` is killed
/// with SIGKILL. The operator retries whatever a node could not take while its shards
/// moved, as a script would; devices retry when pushed again.
async fn storm_with_a_kill(
    fleet: &Rc<Fleet>,
    args: &Args,
    victim: u32,
    timeout: Duration,
) -> Result<(Phase, Failover), Failed> {
    fleet.set_goal(Goal::Answered {
        request_type: args.command.request_type().to_owned(),
    });
    let started = Instant::now();
    let deadline = deadline_after(timeout);
    let expected = fleet.expected();
    let udids = enrolled_udids(fleet);
    let kill = async {
        tokio::time::sleep(Duration::from_secs_f64(args.kill_after)).await;
        let killed = std::process::Command::new("kill")
            .args(["-9", &victim.to_string()])
            .status();
        eprintln!(
            "\norchard-load: killed node pid {victim} (SIGKILL) {:.1} s into the storm: {}",
            started.elapsed().as_secs_f64(),
            if killed.is_ok_and(|s| s.success()) {
                "ok"
            } else {
                "kill failed"
            }
        );
        fleet.http.stats.elapsed()
    };
    let storm = async {
        let taken = enqueue_until_acknowledged(fleet, args, &udids, deadline).await?;
        fleet.wait_for(expected, deadline).await;
        Ok::<_, Failed>(taken)
    };
    let (killed_at, stormed) = futures_util::join!(kill, storm);
    let taken = stormed?;
    let phase = finish(fleet, "failover", expected, started);
    // Every command the server acknowledged must reach its device: wait for the last.
    let index: std::collections::HashMap<&str, usize> = fleet
        .devices
        .iter()
        .enumerate()
        .map(|(i, device)| (&*device.udid, i))
        .collect();
    let unanswered = loop {
        let unanswered: Vec<&(&str, String)> = taken
            .iter()
            .filter(|(udid, uuid)| !fleet.acknowledged(index[udid], uuid))
            .collect();
        if unanswered.is_empty() || Deadline::now() >= deadline {
            break unanswered;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // What the server holds for each command no device confirmed: its result (the
    // device's answer was stored, only the reply to it was lost with the node), still
    // queued (it will be delivered at the device's next contact), or nothing: lost.
    let (mut answered, mut queued, mut lost) = (0, 0, 0);
    for (udid, uuid) in unanswered {
        let path = format!("/api/v1/devices/{udid}/commands");
        let commands = fleet
            .http
            .api("api:device-commands", Method::GET, &path, None)
            .await;
        let views: serde_json::Value = commands
            .ok()
            .and_then(|(_, body)| serde_json::from_slice(&body).ok())
            .unwrap_or_default();
        let status = views
            .as_array()
            .into_iter()
            .flatten()
            .find(|view| view["command_uuid"] == uuid.as_str())
            .map(|view| view["status"].as_str().unwrap_or_default().to_owned());
        match status.as_deref() {
            Some("Acknowledged" | "Error" | "NotNow") => answered += 1,
            Some(_) => queued += 1,
            None => lost += 1,
        }
    }
    let unserved = fleet
        .http
        .stats
        .last_failure()
        .map_or(0.0, |last| last.saturating_sub(killed_at).as_secs_f64());
    let measured = Failover {
        victim_pid: victim,
        killed_at_s: args.kill_after,
        lost,
        still_queued: queued,
        answer_reply_lost: answered,
        delivered_twice: fleet.answers.delivered_twice.get(),
        unserved_s: unserved,
    };
    Ok((phase, measured))
}

/// Enqueue the storm command through `POST /api/v1/commands`, chunk by chunk, sending
/// again to the ids a node did not acknowledge (a shard moving answers them 503).
/// Answers every `(udid, command uuid)` the server acknowledged.
async fn enqueue_until_acknowledged<'a>(
    fleet: &Fleet,
    args: &Args,
    udids: &[&'a str],
    deadline: Deadline,
) -> Result<Vec<(&'a str, String)>, Failed> {
    let requests = udids.chunks(args.chunk).map(|chunk| async move {
        let mut pending: Vec<&'a str> = chunk.to_vec();
        let mut taken = Vec::with_capacity(chunk.len());
        while !pending.is_empty() {
            if Deadline::now() >= deadline {
                return Err(Failed(format!(
                    "{} devices never took the command",
                    pending.len()
                )));
            }
            let body = json!({
                "targets": pending,
                "request_type": args.command.request_type(),
                "params": args.command.params(),
            });
            let body = serde_json::to_vec(&body).unwrap_or_default();
            let answer = fleet
                .http
                .api(
                    "api:commands",
                    Method::POST,
                    "/api/v1/commands",
                    Some(("application/json", body)),
                )
                .await;
            if let Ok((_, answer)) = answer {
                let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
                let uuid = answer["command_uuid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                pending.retain(|id| {
                    let queued = answer["results"][*id]["queued"] == true;
                    if queued {
                        taken.push((*id, uuid.clone()));
                    }
                    !queued
                });
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(taken)
    });
    let answers: Vec<Result<Vec<_>, Failed>> = stream::iter(requests)
        .buffer_unordered(PARALLEL_CHUNKS)
        .collect()
        .await;
    let mut taken = Vec::new();
    for answer in answers {
        taken.extend(answer?);
    }
    Ok(taken)
}

/// A declaration revision: a payload unique to this run, so a server that already holds
/// an earlier run's declarations still sees a change.
struct Revision {
    run: String,
    number: Cell<u32>,
}

impl Revision {
    fn new() -> Self {
        Self {
            run: uuid::Uuid::new_v4().simple().to_string(),
            number: Cell::new(0),
        }
    }

    /// Advances to the next revision; its echo value.
    fn next(&self) -> String {
        self.number.set(self.number.get() + 1);
        format!("{}-{}", self.run, self.number.get())
    }
}

async fn put_declaration(fleet: &Fleet, declaration: serde_json::Value) -> Result<(), Failed> {
    fleet
        .http
        .api(
            "api:declarations",
            Method::PUT,
            "/api/v1/ddm/declarations",
            Some((
                "application/json",
                serde_json::to_vec(&declaration).unwrap_or_default(),
            )),
        )
        .await
        .map(drop)
}

fn configuration(echo: &str) -> serde_json::Value {
    json!({"Type": "com.apple.configuration.management.test", "Identifier": CONFIGURATION,
           "Payload": {"Echo": echo}})
}

/// Publishes the declaration pair into a set, assigns the set to every device in chunks,
/// and waits for the fleet to report the first revision.
async fn publish_and_assign(
    fleet: &Rc<Fleet>,
    args: &Args,
    revision: &Revision,
    timeout: Duration,
) -> Result<Phase, Failed> {
    let echo = revision.next();
    put_declaration(fleet, configuration(&echo)).await?;
    put_declaration(
        fleet,
        json!({"Type": "com.apple.activation.simple", "Identifier": ACTIVATION,
               "Payload": {"StandardConfigurations": [CONFIGURATION]}}),
    )
    .await?;
    for identifier in [CONFIGURATION, ACTIVATION] {
        let path = format!("/api/v1/ddm/set-declarations/{SET}?declaration={identifier}");
        fleet
            .http
            .api("api:set-declarations", Method::PUT, &path, None)
            .await?;
    }
    fleet.set_goal(Goal::Revision {
        identifier: CONFIGURATION.to_owned(),
        echo,
    });
    let started = Instant::now();
    let deadline = deadline_after(timeout);
    let expected = fleet.expected();
    let udids = enrolled_udids(fleet);
    let assignments = udids.chunks(args.chunk).map(|chunk| async move {
        let body = json!({"set": SET, "enrollments": chunk});
        fleet
            .http
            .api(
                "api:assignments",
                Method::POST,
                "/api/v1/ddm/assignments",
                Some((
                    "application/json",
                    serde_json::to_vec(&body).unwrap_or_default(),
                )),
            )
            .await
    });
    let answers: Vec<_> = stream::iter(assignments)
        .buffer_unordered(PARALLEL_CHUNKS)
        .collect()
        .await;
    answers
        .into_iter()
        .try_for_each(|answer| answer.map(drop))?;
    fleet.wait_for(expected, deadline).await;
    Ok(finish(fleet, "ddm-assign", expected, started))
}

/// Publishes a new revision of the configuration; finished when every online device has
/// reported it.
async fn change(
    fleet: &Rc<Fleet>,
    revision: &Revision,
    timeout: Duration,
) -> Result<Phase, Failed> {
    let echo = revision.next();
    fleet.set_goal(Goal::Revision {
        identifier: CONFIGURATION.to_owned(),
        echo: echo.clone(),
    });
    let started = Instant::now();
    let deadline = deadline_after(timeout);
    let expected = fleet.expected();
    put_declaration(fleet, configuration(&echo)).await?;
    fleet.wait_for(expected, deadline).await;
    Ok(finish(fleet, "ddm-converge", expected, started))
}

/// Steady check-ins with a command wave to a tenth of the fleet every 5 s and a new
/// declaration revision every 15 s; finished when the fleet reports the last revision.
async fn mixed(
    fleet: &Rc<Fleet>,
    args: &Args,
    revision: &Revision,
    timeout: Duration,
) -> Result<Phase, Failed> {
    const COMMAND_EVERY: Duration = Duration::from_secs(5);
    const REVISION_EVERY: Duration = Duration::from_secs(15);
    let rate = if args.rate > 0.0 { args.rate } else { 100.0 };
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(args.duration);
    let background = async {
        let udids = enrolled_udids(fleet);
        let slice = (udids.len() / 10).max(1);
        let mut wave = 0usize;
        let mut next_command = started + COMMAND_EVERY;
        let mut next_revision = started;
        loop {
            let now = Instant::now();
            if now >= stop {
                return Ok::<(), Failed>(());
            }
            if now >= next_revision {
                let echo = revision.next();
                fleet.set_goal(Goal::Revision {
                    identifier: CONFIGURATION.to_owned(),
                    echo: echo.clone(),
                });
                put_declaration(fleet, configuration(&echo)).await?;
                next_revision += REVISION_EVERY;
            }
            if now >= next_command && !udids.is_empty() {
                let first = (wave * slice) % udids.len();
                let targets: Vec<&str> = udids
                    .iter()
                    .cycle()
                    .skip(first)
                    .take(slice)
                    .copied()
                    .collect();
                enqueue(fleet, args, &targets).await?;
                wave += 1;
                next_command += COMMAND_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (_, waves) = tokio::join!(idle_traffic(fleet, args, rate), background);
    waves?;
    let expected = fleet.expected();
    fleet.wait_for(expected, deadline_after(timeout)).await;
    Ok(finish(fleet, "mixed", expected, started))
}

/// Orchard's own count of devices per declaration state, as a cross-check of what the
/// devices believe they reported, and its fleet diagnosis (both timed in the API stats).
async fn fleet_view(fleet: &Fleet) -> Option<serde_json::Value> {
    let get = |label, path| async move {
        let (_, body) = fleet.http.api(label, Method::GET, path, None).await.ok()?;
        serde_json::from_slice::<serde_json::Value>(&body).ok()
    };
    let declarations = get("api:fleet-declarations", "/api/v1/ddm/fleet/declarations").await?;
    let diagnosis = get("api:fleet-diagnosis", "/api/v1/ddm/diagnosis").await?;
    Some(serde_json::json!({ "declarations": declarations, "diagnosis": diagnosis }))
}
