//! The end-of-run summary: one JSON object (`--json`) or tables for a terminal.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::fleet::Fleet;
use crate::scenario::{Outcome, Phase};
use crate::server::ProcessUsage;
use crate::stats::{millis, Stats};

pub struct Summary<'a> {
    pub scenario: &'static str,
    pub fleet: &'a Fleet,
    pub outcome: &'a Outcome,
    pub duration_s: f64,
    pub server: Option<ProcessUsage>,
    /// `orchard-load` itself, to keep the per-device footprint honest.
    pub load: Option<ProcessUsage>,
    /// Pushes the peer accepted but could not hand over because the fleet fell behind.
    pub pushes_dropped: u64,
}

fn phase_json(phase: &Phase) -> Value {
    let mut out = json!({
        "name": phase.name,
        "expected": phase.expected,
        "completed": phase.completed,
        "seconds": phase.seconds,
    });
    if let Some([count, p50, p90, p99, max]) = phase.convergence_ms {
        out["convergence_ms"] =
            json!({"count": count, "p50": p50, "p90": p90, "p99": p99, "max": max});
    }
    out
}

fn endpoints_json(stats: &Stats, duration_s: f64) -> Value {
    stats.with_endpoints(|endpoints| {
        let mut out = Map::new();
        for (name, endpoint) in endpoints {
            let latency = &endpoint.latency_us;
            let quantile = |q: f64| {
                if latency.is_empty() {
                    0.0
                } else {
                    millis(latency.value_at_quantile(q))
                }
            };
            // A single request has no window of its own: rate it over the whole run.
            let active_s = if endpoint.requests() > 1 && endpoint.active_seconds() > 0.0 {
                endpoint.active_seconds()
            } else {
                duration_s.max(1e-9)
            };
            out.insert(
                (*name).to_owned(),
                json!({
                    "requests": endpoint.requests(),
                    "active_s": active_s,
                    "rps": endpoint.requests() as f64 / active_s,
                    "p50_ms": quantile(0.5),
                    "p90_ms": quantile(0.9),
                    "p99_ms": quantile(0.99),
                    "p999_ms": quantile(0.999),
                    "max_ms": if latency.is_empty() { 0.0 } else { millis(latency.max()) },
                    "errors": endpoint.error_count(),
                    "errors_by_kind": endpoint.errors,
                }),
            );
        }
        Value::Object(out)
    })
}

impl Summary<'_> {
    fn headline(&self) -> Option<&Phase> {
        self.outcome.phases.last()
    }

    /// Every online device expected by the headline phase finished it.
    pub fn complete(&self) -> bool {
        self.headline()
            .is_some_and(|phase| phase.completed >= phase.expected)
    }

    pub fn to_json(&self) -> Value {
        let stats = &self.fleet.http.stats;
        let headline = self.headline();
        let answers = &self.fleet.answers;
        let mut out = json!({
            "scenario": self.scenario,
            "devices": self.fleet.devices.len(),
            "online": self.fleet.online(),
            "expected": headline.map_or(0, |phase| phase.expected),
            "completed": headline.map_or(0, |phase| phase.completed),
            "duration_s": self.duration_s,
            "measured_s": headline.map_or(0.0, |phase| phase.seconds),
            "requests": stats.total_requests(),
            "endpoints": endpoints_json(stats, self.duration_s),
            "phases": self.outcome.phases.iter().map(phase_json).collect::<Vec<_>>(),
            "pushes_received": stats.pushes(),
            "pushes_ignored": answers.pushes_ignored.get(),
            "pushes_dropped": self.pushes_dropped,
            "answers": {
                "acknowledged": answers.acknowledged.get(),
                "not_now": answers.not_now.get(),
                "error": answers.error.get(),
                "ddm_syncs": answers.ddm_syncs.get(),
            },
        });
        if let Some(Phase {
            convergence_ms: Some([count, p50, p90, p99, max]),
            ..
        }) = headline
        {
            out["convergence_ms"] =
                json!({"count": count, "p50": p50, "p90": p90, "p99": p99, "max": max});
        }
        if let Some(failover) = &self.outcome.failover {
            out["failover"] = json!({
                "victim_pid": failover.victim_pid,
                "killed_at_s": failover.killed_at_s,
                "commands_lost": failover.lost,
                "commands_still_queued": failover.still_queued,
                "answers_stored_reply_lost": failover.answer_reply_lost,
                "commands_delivered_twice": failover.delivered_twice,
                "unserved_s": failover.unserved_s,
            });
        }
        if let Some(server) = self.server {
            out["server"] = json!({
                "rss_kib": server.rss_kib,
                "peak_rss_kib": server.peak_rss_kib,
                "cpu_s": server.cpu.as_secs_f64(),
            });
        }
        if let Some(load) = self.load {
            out["load"] = json!({
                "peak_rss_kib": load.peak_rss_kib,
                "cpu_s": load.cpu.as_secs_f64(),
            });
        }
        if let Some(view) = &self.outcome.server_view {
            out["server_view"] = view.clone();
        }
        out
    }

    pub fn to_text(&self) -> String {
        let stats = &self.fleet.http.stats;
        let json = self.to_json();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{} — {} devices ({} online), {:.1} s, {} requests, {} pushes received\n",
            self.scenario,
            self.fleet.devices.len(),
            self.fleet.online(),
            self.duration_s,
            stats.total_requests(),
            stats.pushes()
        );
        let _ = writeln!(
            out,
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  errors",
            "endpoint", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms"
        );
        if let Some(endpoints) = json["endpoints"].as_object() {
            for (name, endpoint) in endpoints {
                let number = |key: &str| endpoint[key].as_f64().unwrap_or(0.0);
                let kinds = endpoint["errors_by_kind"]
                    .as_object()
                    .map(|kinds| {
                        kinds
                            .iter()
                            .map(|(kind, count)| format!("{kind}: {count}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:<28} {:>9} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {}",
                    name,
                    endpoint["requests"].as_u64().unwrap_or(0),
                    number("rps"),
                    number("p50_ms"),
                    number("p90_ms"),
                    number("p99_ms"),
                    number("p999_ms"),
                    if kinds.is_empty() {
                        "-".to_owned()
                    } else {
                        kinds
                    }
                );
            }
        }
        let _ = writeln!(
            out,
            "\nphase            expected  completed   seconds   p50 ms   p90 ms   p99 ms   max ms"
        );
        for phase in &self.outcome.phases {
            let [_, p50, p90, p99, max] = phase.convergence_ms.unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<16} {:>8} {:>10} {:>9.2} {:>8} {:>8} {:>8} {:>8}",
                phase.name, phase.expected, phase.completed, phase.seconds, p50, p90, p99, max
            );
        }
        let answers = &json["answers"];
        let _ = writeln!(
            out,
            "\ndevice answers: {} acknowledged, {} NotNow, {} Error; {} DDM syncs",
            answers["acknowledged"], answers["not_now"], answers["error"], answers["ddm_syncs"]
        );
        if let Some(failover) = &self.outcome.failover {
            let _ = writeln!(
                out,
                "failover: node pid {} killed {:.1} s in; commands lost {} (still queued {}, \
                 answered but the reply lost {}), delivered twice {}; requests refused for \
                 {:.2} s after the kill",
                failover.victim_pid,
                failover.killed_at_s,
                failover.lost,
                failover.still_queued,
                failover.answer_reply_lost,
                failover.delivered_twice,
                failover.unserved_s
            );
        }
        if let Some(server) = self.server {
            let _ = writeln!(
                out,
                "server: RSS {:.1} MiB (peak {:.1} MiB), CPU {:.1} s",
                server.rss_kib as f64 / 1024.0,
                server.peak_rss_kib as f64 / 1024.0,
                server.cpu.as_secs_f64()
            );
        }
        if let Some(load) = self.load {
            let _ = writeln!(
                out,
                "orchard-load: peak RSS {:.1} MiB, CPU {:.1} s",
                load.peak_rss_kib as f64 / 1024.0,
                load.cpu.as_secs_f64()
            );
        }
        if self.pushes_dropped > 0 {
            let _ = writeln!(
                out,
                "pushes dropped before reaching a device: {}",
                self.pushes_dropped
            );
        }
        if let Some(view) = &self.outcome.server_view {
            let _ = writeln!(out, "server's fleet view: {view}");
        }
        out
    }
}
