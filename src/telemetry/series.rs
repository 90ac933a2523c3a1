//! The series exported from start-up. Every series a dashboard panel or an alert reads
//! (`deploy/grafana/`, `deploy/prometheus/`) is on `/metrics` from the first scrape —
//! counters at 0, gauges at their value, histograms empty — so a quiet server graphs 0
//! rather than "no data", and `rate()` sees a counter from its start instead of missing
//! its first event. Each series is registered here with the label values the code that
//! updates it uses; per-topic series once the topic is known (a stored or uploaded push
//! certificate). `tests/monitoring.rs` checks the dashboard and the alert rules against a
//! fresh server's `/metrics`.

use metrics::{counter, gauge, histogram};

use crate::cluster::VIRTUAL_SHARDS;
use crate::ddm::doctor::RULES;
use crate::ddm::fleet::ASSIGNMENT_STATES;
use crate::protocol::{CheckinMessage, ReportStatus};

/// Which store this server runs on: each times its requests under its own name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreSeries {
    /// `orchard_store_read_seconds{op}`, group commits.
    Embedded,
    /// `orchard_store_request_seconds{op}`, requests in flight.
    Cql,
}

/// Whether this server is one node of several (the cluster gauges come from its rounds)
/// or alone (it holds every shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    Alone,
    Clustered,
}

/// The device routes (route pattern, method): the endpoints every fleet calls.
const DEVICE_ENDPOINTS: [(&str, &str); 3] =
    [("/mdm", "PUT"), ("/checkin", "PUT"), ("/mdm/enroll", "GET")];

/// The store reads a device request makes (both stores name them alike).
const DEVICE_PATH_READS: [&str; 4] = ["device", "cert_binding", "queue", "command"];

/// Push outcomes with the reason label each is counted under (APNs' reason for an
/// invalid token, the most common one here; for failures, exhausted retries).
const PUSH_OUTCOMES: [(&str, &str); 5] = [
    ("sent", ""),
    ("already_pending", ""),
    ("token_invalid", "Unregistered"),
    ("not_sent", "throttled"),
    ("failed", "retries_exhausted"),
];

/// Register every series the dashboards and alerts read. Call once, right after the
/// recorder is installed and before anything else records: gauges that count up and
/// down are registered without changing their value.
pub fn export_at_startup(store: StoreSeries, membership: Membership) {
    requests();
    device_messages();
    queues();
    pushes();
    ddm();
    store_series(store);
    cluster(membership);
}

fn requests() {
    for (endpoint, method) in DEVICE_ENDPOINTS {
        counter!("orchard_http_requests_total", "endpoint" => endpoint, "method" => method, "status" => "200")
            .increment(0);
        exported(histogram!("orchard_http_request_duration_seconds", "endpoint" => endpoint));
    }
}

fn device_messages() {
    for message_type in CheckinMessage::MESSAGE_TYPES {
        counter!("orchard_checkin_messages_total", "message_type" => message_type).increment(0);
    }
    for status in ReportStatus::ALL {
        counter!("orchard_connect_reports_total", "status" => status.as_str()).increment(0);
    }
}

fn queues() {
    gauge!("orchard_queue_depth").increment(0.0);
    gauge!("orchard_resident_actors").increment(0.0);
    counter!("orchard_commands_enqueued_total").increment(0);
    counter!("orchard_commands_parked_total").increment(0);
    counter!("orchard_repushes_total").increment(0);
}

fn pushes() {
    for (outcome, reason) in PUSH_OUTCOMES {
        counter!("orchard_pushes_total", "outcome" => outcome, "reason" => reason).increment(0);
    }
    exported(histogram!("orchard_push_duration_seconds"));
    gauge!("orchard_apns_in_flight_streams").increment(0.0);
}

/// A push topic is known (its certificate stored or uploaded): its expiry, and its
/// connection series from 0.
pub fn push_topic(topic: &str, not_after: i64) {
    gauge!("orchard_push_cert_expiry_seconds", "topic" => topic.to_string()).set(not_after as f64);
    gauge!("orchard_apns_topic_stopped", "topic" => topic.to_string()).increment(0.0);
    gauge!("orchard_apns_connections", "topic" => topic.to_string()).increment(0.0);
    counter!("orchard_apns_connects_total", "topic" => topic.to_string()).increment(0);
}

/// The fleet gauges are set for each scrape once the fleet tally is ready
/// (`FleetTally::publish`); until then they read 0.
fn ddm() {
    for rule in RULES {
        gauge!("orchard_ddm_enrollments_with_finding", "rule" => rule).increment(0.0);
    }
    for state in ASSIGNMENT_STATES {
        gauge!("orchard_ddm_declaration_assignments", "state" => state).increment(0.0);
    }
    gauge!("orchard_ddm_enrollments_converged").increment(0.0);
    gauge!("orchard_fleet_tally_enrollments").increment(0.0);
}

fn store_series(store: StoreSeries) {
    exported(histogram!("orchard_store_apply_seconds"));
    counter!("orchard_store_errors_total", "op" => "apply").increment(0);
    for op in DEVICE_PATH_READS {
        counter!("orchard_store_errors_total", "op" => op).increment(0);
        exported(match store {
            StoreSeries::Embedded => histogram!("orchard_store_read_seconds", "op" => op),
            StoreSeries::Cql => histogram!("orchard_store_request_seconds", "op" => op),
        });
    }
}

fn cluster(membership: Membership) {
    match membership {
        Membership::Alone => {
            gauge!("orchard_cluster_nodes_alive").set(1.0);
            gauge!("orchard_cluster_shards_owned").set(f64::from(VIRTUAL_SHARDS));
            gauge!("orchard_cluster_shards_unowned").set(0.0);
        }
        // Set by the node's first round, before it serves.
        Membership::Clustered => {
            gauge!("orchard_cluster_nodes_alive").increment(0.0);
            gauge!("orchard_cluster_shards_owned").increment(0.0);
            gauge!("orchard_cluster_shards_unowned").increment(0.0);
        }
    }
    counter!("orchard_cluster_takeovers_total").increment(0);
    counter!("orchard_cluster_handoffs_total").increment(0);
    counter!("orchard_cluster_shards_lost_total").increment(0);
}

/// Obtaining a histogram's handle registers it: it renders with empty buckets until its
/// first sample.
fn exported(_: metrics::Histogram) {}
