//! `orchard-load`: a simulated Apple fleet that drives Orchard through its real protocol and
//! closes the wake-up loop through a local APNs peer. See `load/README.md`.

mod apns;
mod cli;
mod fleet;
mod http;
mod identities;
mod messages;
mod report;
mod scenario;
mod server;
mod stats;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use awc::http::Method;
use clap::Parser;
use orchard::identity::CertificateAuthority;

use crate::apns::{Peer, PushCertificate};
use crate::cli::Args;

/// The simulator shares the machine with the server it measures: mimalloc keeps its
/// allocation cost (and so its CPU share) low.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use crate::fleet::{Fleet, Fractions};
use crate::http::{Http, IdentityTransport};
use crate::report::Summary;
use crate::server::{require_loopback, ClusterLaunch, Launch, ProcessUsage, Spawned};
use crate::stats::Stats;

/// Exit status when the run finished but not every expected device completed.
const INCOMPLETE: u8 = 2;
/// How often the live progress line is refreshed on a terminal.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Without a terminal (logs, tests) a line every few seconds is plenty.
const PROGRESS_EVERY_PIPED: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(message) = args.validate() {
        eprintln!("orchard-load: {message}");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(INCOMPLETE),
        Err(message) => {
            eprintln!("orchard-load: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Where the nodes under load live and how to reach them.
struct Target {
    bases: Vec<String>,
    api_key: String,
    /// The first node's, for its memory and CPU time.
    pid: Option<u32>,
    /// `failover`: the node to kill.
    victim: Option<u32>,
    /// Keeps the servers started here (and their data directories) alive until the run
    /// ends.
    _spawned: Vec<(Spawned, tempfile::TempDir)>,
}

fn run(args: &Args) -> Result<bool, String> {
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|err| format!("{}: {err}", args.state_dir.display()))?;
    let ca_dir = args.server_data_dir.as_deref().unwrap_or(&args.state_dir);
    let ca = CertificateAuthority::load_or_create(ca_dir).map_err(|err| err.to_string())?;
    let started = Instant::now();
    let cache = identities::cache_path(&args.state_dir, &ca);
    let identities =
        identities::load_or_issue(&ca, &cache, args.devices).map_err(|err| err.to_string())?;
    eprintln!(
        "orchard-load: {} device identities ready in {:.1} s ({})",
        identities.len(),
        started.elapsed().as_secs_f64(),
        cache.display()
    );
    let push_certificate = PushCertificate::generate().map_err(|err| err.to_string())?;
    let peer = Peer::start(&push_certificate).map_err(|err| format!("APNs peer: {err}"))?;
    let apns_ca = args.state_dir.join("apns-ca.pem");
    std::fs::write(&apns_ca, peer.peer.ca_pem())
        .map_err(|err| format!("{}: {err}", apns_ca.display()))?;
    let target = prepare_target(args, &peer, &apns_ca)?;
    let pushes = peer.subscribe();
    actix_rt::System::new().block_on(async move {
        let stats = Rc::new(Stats::new());
        let http = Rc::new(Http::new(
            target.bases.clone(),
            target.api_key.clone(),
            args.identity,
            args.concurrency,
            Duration::from_secs_f64(args.request_timeout),
            Rc::clone(&stats),
        ));
        let fractions = Fractions {
            offline: args.offline,
            not_now: args.not_now,
            error: args.error,
            check_out: args.check_out,
        };
        let fleet = Rc::new(Fleet::new(
            identities,
            &fractions,
            push_certificate.topic.clone(),
            Rc::clone(&http),
        ));
        let dispatcher = actix_rt::spawn(dispatch_pushes(Rc::clone(&fleet), pushes));
        let wakers: Vec<_> = (0..args.concurrency)
            .map(|_| actix_rt::spawn(Rc::clone(&fleet).run_waker()))
            .collect();
        let result = drive(args, &target, &fleet, &push_certificate, &peer).await;
        dispatcher.abort();
        wakers.iter().for_each(|waker| waker.abort());
        result
    })
}

/// Starts fresh nodes, or tells the operator how the running ones must be configured.
fn prepare_target(args: &Args, peer: &Peer, apns_ca: &Path) -> Result<Target, String> {
    if !args.target.is_empty() {
        for base in &args.target {
            require_loopback(base).map_err(|err| err.to_string())?;
        }
        let identity_ca = args
            .server_data_dir
            .as_deref()
            .unwrap_or(&args.state_dir)
            .join("identity-ca.pem");
        let header = match args.identity {
            IdentityTransport::Header => " --client-cert-header X-Client-Cert",
            IdentityTransport::Signature => "",
        };
        eprintln!(
            "orchard-load: (re)start the Orchard nodes at {} with\n  \
             --apns-url {} --apns-ca {} --identity-ca {}{header} \
             --repush-after-secs {} --repush-interval-secs {}\n\
             orchard-load: waiting until a push from them reaches the peer…",
            args.target.join(", "),
            peer.peer.url(),
            apns_ca.display(),
            identity_ca.display(),
            args.repush_after,
            server::repush_interval_secs(args.repush_after),
        );
        return Ok(Target {
            bases: args
                .target
                .iter()
                .map(|base| base.trim_end_matches('/').to_owned())
                .collect(),
            api_key: args.api_key.clone().unwrap_or_default(),
            pid: args.server_pid,
            victim: args.kill_pid,
            _spawned: Vec::new(),
        });
    }
    let binary = match &args.server_bin {
        Some(binary) => binary.clone(),
        None => default_server_binary()?,
    };
    let api_key = args
        .api_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let cluster = args.scylla_nodes.as_ref().map(|nodes| ClusterLaunch {
        scylla_nodes: nodes.clone(),
        keyspace: format!(
            "orchard_load_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
        replication: args.scylla_replication,
        secret: uuid::Uuid::new_v4().simple().to_string(),
    });
    let mut spawned = Vec::with_capacity(args.nodes);
    for node in 0..args.nodes {
        let data = tempfile::tempdir().map_err(|err| format!("temporary data dir: {err}"))?;
        let data_dir = data.path().join("data");
        server::seed_identity_ca(&args.state_dir, &data_dir).map_err(|err| err.to_string())?;
        let log = data.path().join("orchard.log");
        let server = Spawned::start(&Launch {
            binary: &binary,
            data_dir: &data_dir,
            api_key: &api_key,
            apns_url: &peer.peer.url(),
            apns_ca,
            transport: args.identity,
            repush_after_secs: args.repush_after,
            log: &log,
            cluster: cluster.as_ref(),
        })
        .map_err(|err| err.to_string())?;
        eprintln!(
            "orchard-load: started node {node}: {} at {} (pid {}, log {})",
            binary.display(),
            server.base,
            server.pid(),
            log.display()
        );
        spawned.push((server, data));
    }
    Ok(Target {
        bases: spawned.iter().map(|(s, _)| s.base.clone()).collect(),
        api_key,
        pid: spawned.first().map(|(s, _)| s.pid()),
        victim: spawned
            .last()
            .filter(|_| args.nodes > 1)
            .map(|(s, _)| s.pid()),
        _spawned: spawned,
    })
}

/// The `orchard` binary built alongside this one.
fn default_server_binary() -> Result<PathBuf, String> {
    let own = std::env::current_exe().map_err(|err| format!("locating orchard-load: {err}"))?;
    let binary = own.with_file_name("orchard");
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "no orchard binary at {}: build it (cargo build -p orchard) or pass --server-bin",
            binary.display()
        ))
    }
}

/// Queues a wake-up for the device whose token each accepted push carries; draining the
/// peer's subscription promptly keeps it from dropping pushes.
async fn dispatch_pushes(
    fleet: Rc<Fleet>,
    mut pushes: tokio::sync::mpsc::Receiver<apns_peer::RecordedPush>,
) {
    while let Some(push) = pushes.recv().await {
        fleet.http.stats.push_received();
        if let Some(index) = fleet.device_for_token(&push.token_hex) {
            fleet.queue_wake(index);
        }
    }
}

async fn drive(
    args: &Args,
    target: &Target,
    fleet: &Rc<Fleet>,
    push_certificate: &PushCertificate,
    peer: &Peer,
) -> Result<bool, String> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    wait_until_ready(fleet, deadline).await?;
    if target.bases.len() > 1 {
        wait_until_balanced(fleet, target.bases.len(), deadline).await?;
    }
    upload_push_certificate(fleet, push_certificate).await?;
    if !args.target.is_empty() {
        wait_for_push_loop(fleet, push_certificate, peer, deadline).await?;
    }
    let progress = actix_rt::spawn(show_progress(Rc::clone(fleet)));
    let started = Instant::now();
    let outcome = scenario::run(fleet, args, target.victim)
        .await
        .map_err(|failed| format!("operator request failed: {}", failed.0));
    progress.abort();
    eprintln!();
    let outcome = outcome?;
    let duration_s = started.elapsed().as_secs_f64();
    let summary = Summary {
        scenario: args.scenario.name(),
        fleet,
        outcome: &outcome,
        duration_s,
        server: target.pid.and_then(ProcessUsage::read),
        load: ProcessUsage::read(std::process::id()),
        pushes_dropped: peer.peer.subscription_drops(),
    };
    if args.json {
        println!("{}", summary.to_json());
    } else {
        println!("{}", summary.to_text());
    }
    if let Some(plot) = &args.plot {
        let title = format!(
            "orchard-load {} — {} devices",
            args.scenario.name(),
            fleet.devices.len()
        );
        std::fs::write(plot, stats::svg(&fleet.http.stats.timeline(), &title))
            .map_err(|err| format!("{}: {err}", plot.display()))?;
    }
    Ok(summary.complete())
}

async fn wait_until_ready(fleet: &Fleet, deadline: Instant) -> Result<(), String> {
    while Instant::now() < deadline {
        if fleet.http.all_answer_ok("/readyz").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("the server never became ready (/readyz)".into())
}

/// A cluster is measured once its shards have settled: every node alive, every shard
/// owned, each node within ±25 % of an even share (contract §4).
async fn wait_until_balanced(fleet: &Fleet, nodes: usize, deadline: Instant) -> Result<(), String> {
    let even = 4096 / nodes as u64;
    while Instant::now() < deadline {
        if let Ok((_, body)) = fleet
            .http
            .api("api:cluster", Method::GET, "/api/v1/cluster", None)
            .await
        {
            let view: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let shares: Vec<u64> = view["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|node| node["alive"] == true)
                .filter_map(|node| node["shards"].as_u64())
                .collect();
            let balanced = shares.len() == nodes
                && view["shards_unowned"] == 0
                && shares
                    .iter()
                    .all(|s| s * 4 >= even * 3 && s * 4 <= even * 5);
            if balanced {
                eprintln!("orchard-load: {nodes} nodes hold the shards evenly: {shares:?}");
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err("the cluster's shards never settled (GET /api/v1/cluster)".into())
}

async fn upload_push_certificate(
    fleet: &Fleet,
    certificate: &PushCertificate,
) -> Result<(), String> {
    fleet
        .http
        .api(
            "api:pushcert",
            Method::PUT,
            "/api/v1/nanomdm/pushcert",
            Some((
                "application/x-pem-file",
                certificate.pem_bundle.clone().into_bytes(),
            )),
        )
        .await
        .map(drop)
        .map_err(|failed| format!("uploading the push certificate: {}", failed.0))
}

/// Against a server started by the operator: enroll the first device and push it until a
/// push reaches the peer, which proves the server runs with this run's `--apns-url`.
async fn wait_for_push_loop(
    fleet: &Fleet,
    certificate: &PushCertificate,
    peer: &Peer,
    deadline: Instant,
) -> Result<(), String> {
    let udid = fleet.devices[0].udid.clone();
    while Instant::now() < deadline {
        let before = peer.peer.push_count();
        let attempt = async {
            upload_push_certificate(fleet, certificate).await.ok()?;
            fleet.enroll(0).await.ok()?;
            let path = format!("/api/v1/nanomdm/push/{udid}");
            fleet
                .http
                .api("api:push", Method::POST, &path, None)
                .await
                .ok()
        };
        if attempt.await.is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if peer.peer.push_count() > before {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err("no push from the target reached the peer: was it restarted with the flags above?".into())
}

/// One line on stderr with the current request rate and progress.
async fn show_progress(fleet: Rc<Fleet>) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        PROGRESS_EVERY
    } else {
        PROGRESS_EVERY_PIPED
    };
    let stats = &fleet.http.stats;
    let mut last_requests = stats.total_requests();
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let requests = stats.total_requests();
        let rate = (requests - last_requests) as f64 / last.elapsed().as_secs_f64();
        last_requests = requests;
        last = Instant::now();
        let line = format!(
            "[{:6.1} s] {:8.0} req/s  {:9} requests  {:7} completed  {:8} pushes",
            stats.elapsed().as_secs_f64(),
            rate,
            requests,
            fleet.completed(),
            stats.pushes()
        );
        if terminal {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    }
}
