//! Command line of `orchard-load`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::http::IdentityTransport;

/// Fleet simulator for Orchard: simulated devices enroll, are woken through a local APNs
/// peer, answer commands and sync declarations, while every request is measured.
#[derive(Parser, Debug, Clone)]
#[command(name = "orchard-load", version)]
pub struct Args {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Number of simulated devices.
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,

    /// Length of the steady phase of `checkin` and `mixed`, in seconds.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,

    /// Upper bound for each waiting phase (enrollment, convergence), in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,

    /// Idle connects per second in `checkin`/`mixed`; 0 means as fast as possible
    /// (`mixed` defaults to 100/s when 0).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// Requests in flight at most (and keep-alive connections in the pool).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,

    /// Per-request timeout, in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout: f64,

    /// Orchard nodes already running on this machine (loopback only), comma-separated,
    /// instead of starting any: each request goes to the next node, as a load balancer
    /// spreads them.
    #[arg(long, requires = "api_key", value_delimiter = ',')]
    pub target: Vec<String>,

    /// Orchard nodes to start here: more than one makes a cluster on `--scylla-nodes`
    /// (a fresh keyspace per run), and requests are spread over all of them.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,

    /// CQL contact points for the nodes started here (`--store scylla`).
    #[arg(long)]
    pub scylla_nodes: Option<String>,

    /// Replication factor of the keyspace the started nodes create.
    #[arg(long, default_value_t = 1)]
    pub scylla_replication: u32,

    /// `failover`: seconds into the command storm when one node is killed (SIGKILL).
    #[arg(long, default_value_t = 30.0)]
    pub kill_after: f64,

    /// `failover` against `--target` nodes: the pid of the node to kill (for nodes
    /// started here, the last one is killed).
    #[arg(long)]
    pub kill_pid: Option<u32>,

    /// API key of the target; a random one for a server started here.
    #[arg(long)]
    pub api_key: Option<String>,

    /// PID of the target, to report its memory and CPU time.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// The target's data directory: identities are then issued by its own CA.
    #[arg(long)]
    pub server_data_dir: Option<PathBuf>,

    /// `orchard` binary to start (default: next to this executable).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,

    /// Where the identity CA, cached device identities and the APNs peer's CA live.
    #[arg(long, default_value = "./orchard-load-state")]
    pub state_dir: PathBuf,

    /// How devices present their identity.
    #[arg(long, value_enum, default_value = "header")]
    pub identity: IdentityTransport,

    /// Fraction of devices that never answer pushes.
    #[arg(long, default_value_t = 0.0)]
    pub offline: f64,

    /// Fraction of devices that answer their first command `NotNow`.
    #[arg(long, default_value_t = 0.0)]
    pub not_now: f64,

    /// Fraction of devices that answer every command `Error`.
    #[arg(long, default_value_t = 0.0)]
    pub error: f64,

    /// Fraction of devices that send `CheckOut` right after enrolling.
    #[arg(long, default_value_t = 0.0)]
    pub check_out: f64,

    /// Orchard's `--repush-after-secs` for a server started here (and the value printed for
    /// a running one): how soon devices that answered `NotNow` or missed a wake-up are
    /// pushed again. Short enough to finish within a run, long enough that devices still
    /// queued behind a push storm are not pushed twice.
    #[arg(long, default_value_t = 5)]
    pub repush_after: u64,

    /// Enrollment ids per bulk API request.
    #[arg(long, default_value_t = 5000)]
    pub chunk: usize,

    /// Route used by `command-storm` to enqueue.
    #[arg(long, value_enum, default_value = "api")]
    pub enqueue: EnqueueRoute,

    /// Command sent by `command-storm` and `mixed`.
    #[arg(long, value_enum, default_value = "device-information")]
    pub command: StormCommand,

    /// Print one JSON summary object on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,

    /// Write throughput and p99 latency per second as an SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Enroll every device (Authenticate + TokenUpdate) as fast as possible.
    Enroll,
    /// Idle connects at `--rate` or flat out for `--duration`.
    Checkin,
    /// One command to every device; time until every online device answered it.
    CommandStorm,
    /// Publish, assign and change declarations; time until every online device reports
    /// the new revision.
    DdmConverge,
    /// Check-ins, command waves and declaration changes together, for a soak.
    Mixed,
    /// A command storm during which one node is killed with SIGKILL `--kill-after`
    /// seconds in: commands lost and delivered twice (both must be 0), and how long
    /// devices went unserved.
    Failover,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Enroll => "enroll",
            Scenario::Checkin => "checkin",
            Scenario::CommandStorm => "command-storm",
            Scenario::DdmConverge => "ddm-converge",
            Scenario::Mixed => "mixed",
            Scenario::Failover => "failover",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EnqueueRoute {
    /// `POST /api/v1/commands` with a JSON template and `targets`.
    Api,
    /// `PUT /api/v1/nanomdm/enqueue/{id,id,…}` with a raw command plist.
    Nanohub,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StormCommand {
    DeviceInformation,
    SecurityInfo,
    InstalledApplicationList,
    ProfileList,
    DeviceLock,
}

impl StormCommand {
    pub fn request_type(self) -> &'static str {
        match self {
            StormCommand::DeviceInformation => "DeviceInformation",
            StormCommand::SecurityInfo => "SecurityInfo",
            StormCommand::InstalledApplicationList => "InstalledApplicationList",
            StormCommand::ProfileList => "ProfileList",
            StormCommand::DeviceLock => "DeviceLock",
        }
    }

    /// Template parameters: `DeviceInformation` asks for a few inventory queries.
    pub fn params(self) -> serde_json::Value {
        match self {
            StormCommand::DeviceInformation => serde_json::json!({
                "Queries": ["SerialNumber", "OSVersion", "DeviceName", "BuildVersion"]
            }),
            _ => serde_json::json!({}),
        }
    }
}

impl Args {
    /// Rejects fractions outside [0, 1] and empty fleets before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("--offline", self.offline),
            ("--not-now", self.not_now),
            ("--error", self.error),
            ("--check-out", self.check_out),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(format!("{name} must be between 0 and 1, got {value}"));
            }
        }
        if self.devices == 0 || self.concurrency == 0 || self.chunk == 0 {
            return Err("--devices, --concurrency and --chunk must be positive".into());
        }
        if self.nodes == 0 || (self.nodes > 1 && self.scylla_nodes.is_none()) {
            return Err("--nodes must be positive; more than one needs --scylla-nodes".into());
        }
        if self.scenario == Scenario::Failover {
            let started_here = self.target.is_empty() && self.nodes >= 2;
            let named = self.target.len() >= 2 && self.kill_pid.is_some();
            if !(started_here || named) {
                return Err(
                    "failover needs --nodes 2 or more (with --scylla-nodes), or \
                            two or more --target nodes and --kill-pid"
                        .into(),
                );
            }
        }
        for (name, value) in [
            ("--duration", self.duration),
            ("--timeout", self.timeout),
            ("--request-timeout", self.request_timeout),
            ("--rate", self.rate),
            ("--kill-after", self.kill_after),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(format!("{name} must be a non-negative number"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_describe_a_header_identity_fleet_of_a_thousand() {
        let args = Args::parse_from(["orchard-load", "command-storm"]);
        assert_eq!(args.scenario, Scenario::CommandStorm);
        assert_eq!(args.devices, 1000);
        assert_eq!(args.concurrency, 256);
        assert_eq!(args.identity, IdentityTransport::Header);
        assert!(args.validate().is_ok());
    }

    #[test]
    fn a_target_needs_its_api_key() {
        assert!(
            Args::try_parse_from(["orchard-load", "enroll", "--target", "http://127.0.0.1:1"])
                .is_err()
        );
    }

    #[test]
    fn fractions_outside_the_unit_interval_are_refused() {
        let args = Args::parse_from(["orchard-load", "enroll", "--offline", "1.5"]);
        assert!(args.validate().unwrap_err().contains("--offline"));
    }
}
