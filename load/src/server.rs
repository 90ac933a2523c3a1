//! The Orchard under load: either a fresh `orchard serve` this tool starts on loopback with a
//! temporary data directory, or one the operator already runs on this machine.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::http::IdentityTransport;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot start {binary}: {source}")]
    Spawn { binary: PathBuf, source: io::Error },
    #[error("{0}: {1}")]
    Io(String, io::Error),
    #[error("orchard exited before printing its address; its log: {0}")]
    NoAddress(PathBuf),
    #[error("{0} is not a loopback URL: orchard-load only targets this machine")]
    NotLoopback(String),
}

/// Refuses anything but `http(s)://127.0.0.1`, `[::1]` or `localhost`: load never leaves
/// this machine.
pub fn require_loopback(url: &str) -> Result<(), ServerError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| ServerError::NotLoopback(url.to_owned()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback && !authority.contains('@') {
        Ok(())
    } else {
        Err(ServerError::NotLoopback(url.to_owned()))
    }
}

/// How to start a fresh server.
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub data_dir: &'a Path,
    pub api_key: &'a str,
    pub apns_url: &'a str,
    pub apns_ca: &'a Path,
    pub transport: IdentityTransport,
    pub repush_after_secs: u64,
    pub log: &'a Path,
    /// A node of a cluster on a CQL store.
    pub cluster: Option<&'a ClusterLaunch>,
}

/// The cluster every node started here joins: one fresh keyspace, one secret.
pub struct ClusterLaunch {
    pub scylla_nodes: String,
    pub keyspace: String,
    pub replication: u32,
    pub secret: String,
}

impl ClusterLaunch {
    fn args(&self) -> Vec<String> {
        [
            "--store",
            "scylla",
            "--scylla-nodes",
            &self.scylla_nodes,
            "--scylla-keyspace",
            &self.keyspace,
            "--scylla-replication",
            &self.replication.to_string(),
            "--cluster-secret",
            &self.secret,
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect()
    }
}

/// How often the server should look for due re-pushes: a tenth of the re-push delay, from 1 s
/// (short runs that exercise NotNow) to Orchard's production 30 s. Checking every second
/// with a delay of minutes would turn the tail of a million-device wave, still queued behind
/// the pushes before it, into a re-push storm of up to 10,000 wake decisions a second.
pub fn repush_interval_secs(repush_after_secs: u64) -> u64 {
    (repush_after_secs / 10).clamp(1, 30)
}

/// A server process this tool owns; killed when dropped.
pub struct Spawned {
    child: Child,
    pub base: String,
}

impl Spawned {
    /// Starts `orchard serve` on 127.0.0.1:0 and reads the address it prints.
    ///
    /// Re-pushes are tightened to `repush_after_secs`, checked every
    /// [`repush_interval_secs`], so that devices answering `NotNow` are woken again within a
    /// run instead of after Orchard's production spacing of minutes.
    pub fn start(launch: &Launch<'_>) -> Result<Self, ServerError> {
        let log = fs::File::create(launch.log)
            .map_err(|err| ServerError::Io(launch.log.display().to_string(), err))?;
        let mut command = Command::new(launch.binary);
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(launch.data_dir)
            .args(["--api-key", launch.api_key])
            .args(["--server-url", "https://mdm.example.test"])
            .args(["--apns-url", launch.apns_url])
            .arg("--apns-ca")
            .arg(launch.apns_ca)
            .arg("--repush-after-secs")
            .arg(launch.repush_after_secs.to_string())
            .arg("--repush-interval-secs")
            .arg(repush_interval_secs(launch.repush_after_secs).to_string())
            .env("ORCHARD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if launch.transport == IdentityTransport::Header {
            command.args(["--client-cert-header", crate::http::CLIENT_CERT_HEADER]);
        }
        if let Some(cluster) = launch.cluster {
            command.args(cluster.args());
        }
        let mut child = command.spawn().map_err(|source| ServerError::Spawn {
            binary: launch.binary.to_owned(),
            source,
        })?;
        let Some(stdout) = child.stdout.take() else {
            return Err(ServerError::NoAddress(launch.log.to_owned()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let base = lines.by_ref().map_while(Result::ok).find_map(|line| {
            line.strip_prefix("orchard listening on ")
                .map(|rest| rest.trim().to_owned())
        });
        let Some(base) = base else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ServerError::NoAddress(launch.log.to_owned()));
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, base })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seeds `data_dir` with the CA in `state_dir`, so the server issues and trusts the same
/// identities the cache holds.
pub fn seed_identity_ca(state_dir: &Path, data_dir: &Path) -> Result<(), ServerError> {
    fs::create_dir_all(data_dir)
        .map_err(|err| ServerError::Io(data_dir.display().to_string(), err))?;
    for file in ["identity-ca.pem", "identity-ca.key"] {
        fs::copy(state_dir.join(file), data_dir.join(file))
            .map_err(|err| ServerError::Io(state_dir.join(file).display().to_string(), err))?;
    }
    Ok(())
}

/// Memory and CPU of a process on this machine, from `/proc`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessUsage {
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    pub cpu: Duration,
}

/// Linux reports `utime`/`stime` in USER_HZ, which the kernel ABI fixes at 100.
const CLOCK_TICKS_PER_SECOND: u64 = 100;

impl ProcessUsage {
    pub fn read(pid: u32) -> Option<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Self::parse(&status, &stat)
    }

    fn parse(status: &str, stat: &str) -> Option<Self> {
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
        };
        // Fields after the parenthesised command name, which may itself contain spaces.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the full line, 12 and 13 after the name.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(Self {
            rss_kib: kib("VmRSS:")?,
            peak_rss_kib: kib("VmHWM:")?,
            cpu: Duration::from_millis((utime + stime) * 1000 / CLOCK_TICKS_PER_SECOND),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repush_sweep_interval_follows_the_repush_delay() {
        assert_eq!(repush_interval_secs(5), 1);
        assert_eq!(repush_interval_secs(120), 12);
        assert_eq!(repush_interval_secs(300), 30);
        assert_eq!(repush_interval_secs(3600), 30);
    }

    #[test]
    fn only_loopback_targets_are_accepted() {
        for url in [
            "http://127.0.0.1:9004",
            "http://localhost:9004/",
            "https://[::1]:443",
            "http://127.0.0.2:80",
        ] {
            assert!(require_loopback(url).is_ok(), "{url}");
        }
        for url in [
            "http://10.0.0.1:9004",
            "https://mdm.example.com",
            "http://127.0.0.1@evil.example:80",
            "ftp://127.0.0.1",
            "127.0.0.1:9004",
        ] {
            assert!(require_loopback(url).is_err(), "{url}");
        }
    }

    #[test]
    fn process_usage_is_read_from_proc_status_and_stat() {
        let status = "Name:\torchard\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        let stat = "4242 (orch ard) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        let usage = ProcessUsage::parse(status, stat).unwrap();
        assert_eq!(usage.rss_kib, 102_400);
        assert_eq!(usage.peak_rss_kib, 204_800);
        assert_eq!(usage.cpu, Duration::from_secs(3));
    }

    #[test]
    fn this_process_can_be_measured() {
        let usage = ProcessUsage::read(std::process::id()).unwrap();
        assert!(usage.rss_kib > 0);
    }
}
