//! Every CQL statement Orchard runs on a request path, prepared once at startup (so the
//! driver routes each to a replica of its partition) and marked idempotent where a retry
//! cannot change the outcome: all writes carry explicit timestamps, so replaying one
//! writes the same cells again. Certificate bindings are lightweight transactions and
//! are not retried blindly.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::backend;
use super::cluster::CLUSTER;
use super::reads::CLAIM;
use super::rows::section::{QUEUE, RESULTS, WEBHOOK};
use crate::store::StoreResult;

pub struct Statements {
    pub put_device_row: PreparedStatement,
    pub delete_device_row: PreparedStatement,
    pub delete_device_section: PreparedStatement,
    pub device_head: PreparedStatement,
    pub device_row: PreparedStatement,
    pub device_section: PreparedStatement,
    pub device_queue: PreparedStatement,
    pub put_enrollment_index: PreparedStatement,
    pub enrollment_index_page: PreparedStatement,
    pub bind_certificate: PreparedStatement,
    pub cert_binding: PreparedStatement,
    pub put_command: PreparedStatement,
    pub command: PreparedStatement,
    pub put_result: PreparedStatement,
    pub result: PreparedStatement,
    pub results: PreparedStatement,
    pub put_shared: PreparedStatement,
    pub delete_shared: PreparedStatement,
    pub shared_kind: PreparedStatement,
    pub shared_one: PreparedStatement,
    pub shared_named: PreparedStatement,
    pub claim: PreparedStatement,
    pub put_set_member: PreparedStatement,
    pub delete_set_member: PreparedStatement,
    pub set_member_page: PreparedStatement,
    pub put_wake: PreparedStatement,
    pub delete_wake: PreparedStatement,
    pub wakes_due: PreparedStatement,
    pub put_wake_minute: PreparedStatement,
    pub wake_minutes: PreparedStatement,
    pub drop_wake_minutes: PreparedStatement,
    pub put_webhook_pending: PreparedStatement,
    pub delete_webhook_pending: PreparedStatement,
    pub webhook_pending_page: PreparedStatement,
    pub webhook_events: PreparedStatement,
    pub put_node: PreparedStatement,
    pub forget_node: PreparedStatement,
    pub nodes: PreparedStatement,
    pub shard_owners: PreparedStatement,
    pub claim_new_shard: PreparedStatement,
    pub move_shard: PreparedStatement,
}

impl Statements {
    pub async fn prepare(session: &Session, ks: &str) -> StoreResult<Statements> {
        let p = |cql: String, idempotent: bool| async move {
            let mut prepared = session.prepare(cql).await.map_err(backend)?;
            prepared.set_is_idempotent(idempotent);
            StoreResult::Ok(prepared)
        };
        Ok(Statements {
            put_device_row: p(format!("INSERT INTO {ks}.devices (enrollment_id, section, seq, name, value) VALUES (?, ?, ?, '', ?) USING TIMESTAMP ?"), true).await?,
            delete_device_row: p(format!("DELETE FROM {ks}.devices USING TIMESTAMP ? WHERE enrollment_id = ? AND section = ? AND seq = ?"), true).await?,
            delete_device_section: p(format!("DELETE FROM {ks}.devices USING TIMESTAMP ? WHERE enrollment_id = ? AND section = ?"), true).await?,
            device_head: p(format!("SELECT section, seq, value FROM {ks}.devices WHERE enrollment_id = ? AND section < ?"), true).await?,
            device_row: p(format!("SELECT value FROM {ks}.devices WHERE enrollment_id = ? AND section = ? AND seq = ?"), true).await?,
            device_section: p(format!("SELECT seq, value FROM {ks}.devices WHERE enrollment_id = ? AND section = ?"), true).await?,
            device_queue: p(format!("SELECT value FROM {ks}.devices WHERE enrollment_id = ? AND section = {QUEUE} AND seq >= ?"), true).await?,
            put_enrollment_index: p(format!("INSERT INTO {ks}.enrollment_index (bucket, enrollment_id) VALUES (?, ?) USING TIMESTAMP ?"), true).await?,
            enrollment_index_page: p(format!("SELECT enrollment_id FROM {ks}.enrollment_index WHERE bucket = ? AND enrollment_id > ? LIMIT ?"), true).await?,
            bind_certificate: p(format!("INSERT INTO {ks}.cert_bindings (fingerprint, enrollment_id) VALUES (?, ?) IF NOT EXISTS"), false).await?,
            cert_binding: p(format!("SELECT enrollment_id FROM {ks}.cert_bindings WHERE fingerprint = ?"), true).await?,
            put_command: p(format!("INSERT INTO {ks}.commands (command_uuid, value) VALUES (?, ?) USING TIMESTAMP ?"), true).await?,
            command: p(format!("SELECT value FROM {ks}.commands WHERE command_uuid = ?"), true).await?,
            put_result: p(format!("INSERT INTO {ks}.devices (enrollment_id, section, seq, name, value) VALUES (?, {RESULTS}, 0, ?, ?) USING TTL ? AND TIMESTAMP ?"), true).await?,
            result: p(format!("SELECT value FROM {ks}.devices WHERE enrollment_id = ? AND section = {RESULTS} AND seq = 0 AND name = ?"), true).await?,
            results: p(format!("SELECT value FROM {ks}.devices WHERE enrollment_id = ? AND section = {RESULTS}"), true).await?,
            put_shared: p(format!("INSERT INTO {ks}.shared_state (kind, name, value) VALUES (?, ?, ?) USING TIMESTAMP ?"), true).await?,
            delete_shared: p(format!("DELETE FROM {ks}.shared_state USING TIMESTAMP ? WHERE kind = ? AND name = ?"), true).await?,
            shared_kind: p(format!("SELECT value FROM {ks}.shared_state WHERE kind = ?"), true).await?,
            shared_one: p(format!("SELECT value FROM {ks}.shared_state WHERE kind = ? AND name = ?"), true).await?,
            shared_named: p(format!("SELECT name, value FROM {ks}.shared_state WHERE kind = ?"), true).await?,
            claim: p(format!("INSERT INTO {ks}.shared_state (kind, name, value) VALUES ('{CLAIM}', ?, ?) IF NOT EXISTS"), false).await?,
            put_set_member: p(format!("INSERT INTO {ks}.set_members (set_name, bucket, enrollment_id) VALUES (?, ?, ?) USING TIMESTAMP ?"), true).await?,
            delete_set_member: p(format!("DELETE FROM {ks}.set_members USING TIMESTAMP ? WHERE set_name = ? AND bucket = ? AND enrollment_id = ?"), true).await?,
            set_member_page: p(format!("SELECT enrollment_id FROM {ks}.set_members WHERE set_name = ? AND bucket = ? AND enrollment_id > ? LIMIT ?"), true).await?,
            put_wake: p(format!("INSERT INTO {ks}.wakes (minute, part, due_at, enrollment_id) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"), true).await?,
            delete_wake: p(format!("DELETE FROM {ks}.wakes USING TIMESTAMP ? WHERE minute = ? AND part = ? AND due_at = ? AND enrollment_id = ?"), true).await?,
            wakes_due: p(format!("SELECT due_at, enrollment_id FROM {ks}.wakes WHERE minute = ? AND part = ? AND due_at <= ?"), true).await?,
            put_wake_minute: p(format!("INSERT INTO {ks}.wake_minutes (part, minute) VALUES (?, ?) USING TIMESTAMP ?"), true).await?,
            wake_minutes: p(format!("SELECT minute FROM {ks}.wake_minutes WHERE part = ? AND minute <= ?"), true).await?,
            drop_wake_minutes: p(format!("DELETE FROM {ks}.wake_minutes USING TIMESTAMP ? WHERE part = ? AND minute <= ?"), true).await?,
            put_webhook_pending: p(format!("INSERT INTO {ks}.webhook_pending (bucket, enrollment_id) VALUES (?, ?) USING TIMESTAMP ?"), true).await?,
            delete_webhook_pending: p(format!("DELETE FROM {ks}.webhook_pending USING TIMESTAMP ? WHERE bucket = ? AND enrollment_id = ?"), true).await?,
            webhook_pending_page: p(format!("SELECT enrollment_id FROM {ks}.webhook_pending WHERE bucket = ? AND enrollment_id > ? LIMIT ?"), true).await?,
            webhook_events: p(format!("SELECT value FROM {ks}.devices WHERE enrollment_id = ? AND section = {WEBHOOK} LIMIT ?"), true).await?,
            put_node: p(format!("INSERT INTO {ks}.cluster_nodes (cluster, node_id, advertise_url, heartbeat, beat_at) VALUES ('{CLUSTER}', ?, ?, ?, ?)"), true).await?,
            forget_node: p(format!("DELETE FROM {ks}.cluster_nodes WHERE cluster = '{CLUSTER}' AND node_id = ?"), true).await?,
            nodes: p(format!("SELECT node_id, advertise_url, heartbeat, beat_at FROM {ks}.cluster_nodes WHERE cluster = '{CLUSTER}'"), true).await?,
            shard_owners: p(format!("SELECT shard, owner, epoch FROM {ks}.shard_owners WHERE bucket = ?"), true).await?,
            claim_new_shard: p(format!("INSERT INTO {ks}.shard_owners (bucket, shard, owner, epoch) VALUES (?, ?, ?, ?) IF NOT EXISTS"), false).await?,
            move_shard: p(format!("UPDATE {ks}.shard_owners SET owner = ?, epoch = ? WHERE bucket = ? AND shard = ? IF owner = ? AND epoch = ?"), false).await?,
        })
    }
}
