//! `schema.cql` as migrations, and applying them safely when several nodes start at once.
//!
//! The file is split at `-- migration N` lines; the keyspace records the highest version
//! applied in `schema_migrations`. A node that finds the keyspace behind takes the
//! migration lock (a lightweight transaction with a TTL), applies what is missing in
//! order, waiting for schema agreement after each statement, and records each version;
//! a node that finds the lock taken waits for the version to arrive. Only the lock table
//! itself is created outside the lock, with a table id derived from the keyspace name, so
//! concurrent creations are the same table.

use std::time::Duration;

use scylla::client::session::Session;
use scylla::statement::unprepared::Statement;
use scylla::statement::SerialConsistency;
use sha2::{Digest, Sha256};

use super::{backend, unavailable, ScyllaConfig};
use crate::store::{StoreError, StoreResult};

/// The schema file, compiled in: the binary carries the schema it was built for.
pub const SCHEMA_CQL: &str = include_str!("../../../schema.cql");

/// The keyspace name used in `schema.cql`, replaced by `--scylla-keyspace`.
const FILE_KEYSPACE: &str = "orchard";

/// How long a migration lock outlives a migrator that died holding it.
const LOCK_TTL_SECS: i32 = 120;

/// One schema version: its number and its statements, as written in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    pub version: i32,
    pub statements: Vec<String>,
}

/// Split `schema.cql` into migrations. Comments are dropped; statements end with `;`.
pub fn migrations(cql: &str) -> Result<Vec<Migration>, String> {
    let mut migrations: Vec<Migration> = Vec::new();
    let mut statement = String::new();
    for line in cql.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("-- migration ") {
            let number = rest.split(':').next().unwrap_or("").trim();
            let version: i32 = number
                .parse()
                .map_err(|_| format!("bad migration marker: {trimmed}"))?;
            if migrations.last().is_some_and(|m| m.version >= version) {
                return Err(format!("migration {version} is out of order"));
            }
            migrations.push(Migration {
                version,
                statements: Vec::new(),
            });
            continue;
        }
        let code = trimmed.split("--").next().unwrap_or("").trim();
        if code.is_empty() {
            continue;
        }
        statement.push_str(code);
        statement.push(' ');
        if code.ends_with(';') {
            let current = migrations
                .last_mut()
                .ok_or("a statement comes before the first migration marker")?;
            let text = statement.trim().trim_end_matches(';').trim().to_string();
            current.statements.push(text);
            statement.clear();
        }
    }
    if !statement.trim().is_empty() {
        return Err("the last statement has no ';'".into());
    }
    Ok(migrations)
}

/// The newest schema version this build knows.
pub fn latest_version() -> i32 {
    migrations(SCHEMA_CQL)
        .ok()
        .and_then(|m| m.last().map(|m| m.version))
        .unwrap_or(0)
}

/// Rewrite a statement of the file for the configured keyspace: table names are
/// qualified with it, and `CREATE KEYSPACE` gets the configured replication (and, on
/// ScyllaDB, tablets disabled).
pub fn for_keyspace(statement: &str, config: &ScyllaConfig, scylla: bool) -> String {
    if statement.starts_with("CREATE KEYSPACE") {
        return create_keyspace(config, scylla);
    }
    statement.replace(
        &format!(" {FILE_KEYSPACE}."),
        &format!(" {}.", config.keyspace),
    )
}

fn create_keyspace(config: &ScyllaConfig, scylla: bool) -> String {
    let factor = match &config.datacenter {
        Some(dc) => format!("'{}': {}", dc.replace('\'', "''"), config.replication),
        None => format!("'replication_factor': {}", config.replication),
    };
    let tablets = if scylla {
        " AND tablets = {'enabled': false}"
    } else {
        ""
    };
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', {factor}}}{tablets}",
        config.keyspace
    )
}

/// A table id derived from the keyspace and table names, for tables that several nodes
/// may create at the same moment outside the migration lock.
fn table_id(keyspace: &str, table: &str) -> String {
    let digest = Sha256::digest(format!("orchard table {keyspace}.{table}"));
    let mut bytes: [u8; 16] = digest[..16].try_into().expect("16 bytes");
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).to_string()
}

/// Whether the server is ScyllaDB (it has `system.scylla_local`) rather than Cassandra.
pub async fn is_scylla(session: &Session) -> StoreResult<bool> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables \
             WHERE keyspace_name = 'system' AND table_name = 'scylla_local'",
            (),
        )
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(backend)?;
    Ok(rows.rows_num() > 0)
}

/// Bring the keyspace to [`latest_version`]; safe to call from many nodes at once.
pub async fn ensure(session: &Session, config: &ScyllaConfig, node: &str) -> StoreResult<()> {
    let scylla = is_scylla(session).await?;
    let all = migrations(SCHEMA_CQL).map_err(StoreError::Corrupt)?;
    let first = all
        .first()
        .ok_or(StoreError::Corrupt("empty schema".into()))?;
    // The keyspace and the lock table exist before anyone can take the lock.
    ddl(session, &for_keyspace(&first.statements[0], config, scylla)).await?;
    create_lock_table(session, config, scylla).await?;
    let latest = all.last().map_or(0, |m| m.version);
    loop {
        let current = schema_version(session, &config.keyspace).await?;
        if current > latest {
            return Err(StoreError::Backend(format!(
                "keyspace {} is at schema version {current}, newer than this build's {latest}",
                config.keyspace
            )));
        }
        if current == latest {
            return Ok(());
        }
        if take_lock(session, &config.keyspace, node).await? {
            let outcome = migrate(session, config, scylla, &all).await;
            release_lock(session, &config.keyspace, node).await;
            return outcome;
        }
        tracing::info!(
            keyspace = %config.keyspace,
            "another node is migrating the schema; waiting"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn create_lock_table(
    session: &Session,
    config: &ScyllaConfig,
    scylla: bool,
) -> StoreResult<()> {
    let ks = &config.keyspace;
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations \
         (name text PRIMARY KEY, version int, holder text)"
    );
    let with_id = format!("{create} WITH id = {}", table_id(ks, "schema_migrations"));
    match ddl(session, &with_id).await {
        Ok(()) => Ok(()),
        // A server that does not take explicit table ids serialises DDL itself
        // (ScyllaDB's Raft-based schema changes).
        Err(e) if scylla => {
            tracing::debug!(error = %e, "explicit table id refused; creating without");
            ddl(session, &create).await
        }
        Err(e) => Err(e),
    }
}

/// Apply every migration newer than the recorded version, recording each.
async fn migrate(
    session: &Session,
    config: &ScyllaConfig,
    scylla: bool,
    all: &[Migration],
) -> StoreResult<()> {
    let ks = &config.keyspace;
    let current = schema_version(session, ks).await?;
    for migration in all.iter().filter(|m| m.version > current) {
        tracing::info!(keyspace = %ks, version = migration.version, "applying schema migration");
        for statement in &migration.statements {
            ddl(session, &for_keyspace(statement, config, scylla)).await?;
        }
        let mut record = Statement::new(format!(
            "UPDATE {ks}.schema_migrations SET version = ? WHERE name = 'schema'"
        ));
        record.set_consistency(super::WRITE_CONSISTENCY);
        session
            .query_unpaged(record, (migration.version,))
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Run one schema statement and wait until every node agrees on the schema.
async fn ddl(session: &Session, statement: &str) -> StoreResult<()> {
    let mut ddl = Statement::new(statement.to_string());
    ddl.set_request_timeout(Some(Duration::from_secs(60)));
    session.query_unpaged(ddl, ()).await.map_err(unavailable)?;
    session
        .await_schema_agreement()
        .await
        .map_err(unavailable)?;
    Ok(())
}

async fn schema_version(session: &Session, ks: &str) -> StoreResult<i32> {
    let mut read = Statement::new(format!(
        "SELECT version FROM {ks}.schema_migrations WHERE name = 'schema'"
    ));
    // A serial read sees a version recorded by a migrator that just finished.
    read.set_consistency(scylla::statement::Consistency::LocalSerial);
    let rows = session
        .query_unpaged(read, ())
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(backend)?;
    let version = rows
        .maybe_first_row::<(Option<i32>,)>()
        .map_err(backend)?
        .and_then(|(v,)| v);
    Ok(version.unwrap_or(0))
}

async fn take_lock(session: &Session, ks: &str, node: &str) -> StoreResult<bool> {
    let mut lock = Statement::new(format!(
        "INSERT INTO {ks}.schema_migrations (name, holder) VALUES ('lock', ?) \
         IF NOT EXISTS USING TTL {LOCK_TTL_SECS}"
    ));
    lock.set_consistency(super::WRITE_CONSISTENCY);
    lock.set_serial_consistency(Some(SerialConsistency::LocalSerial));
    let result = session
        .query_unpaged(lock, (node,))
        .await
        .map_err(unavailable)?;
    super::lwt_applied(result)
}

async fn release_lock(session: &Session, ks: &str, node: &str) {
    let mut release = Statement::new(format!(
        "DELETE FROM {ks}.schema_migrations WHERE name = 'lock' IF holder = ?"
    ));
    release.set_serial_consistency(Some(SerialConsistency::LocalSerial));
    if let Err(e) = session.query_unpaged(release, (node,)).await {
        tracing::warn!(error = %e, "could not release the migration lock; it expires by itself");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(keyspace: &str) -> ScyllaConfig {
        ScyllaConfig {
            keyspace: keyspace.into(),
            ..ScyllaConfig::default()
        }
    }

    #[test]
    fn the_schema_file_parses_into_numbered_migrations() {
        let all = migrations(SCHEMA_CQL).unwrap();
        assert_eq!(all[0].version, 1);
        assert!(all[0].statements[0].starts_with("CREATE KEYSPACE"));
        assert!(all
            .iter()
            .flat_map(|m| &m.statements)
            .all(|s| !s.contains("--") && !s.ends_with(';')));
        assert_eq!(latest_version(), all.last().unwrap().version);
    }

    #[test]
    fn no_statement_of_the_schema_or_of_a_request_path_filters() {
        let filtering = concat!("ALLOW", " FILTERING");
        let schema = migrations(SCHEMA_CQL).unwrap();
        assert!(schema
            .iter()
            .flat_map(|m| &m.statements)
            .all(|s| !s.to_uppercase().contains(filtering)));
        assert!(!include_str!("statements.rs")
            .to_uppercase()
            .contains(filtering));
    }

    #[test]
    fn statements_are_rewritten_for_the_configured_keyspace() {
        let all = migrations(SCHEMA_CQL).unwrap();
        let create = all[0]
            .statements
            .iter()
            .find(|s| s.contains("TABLE IF NOT EXISTS orchard.devices"))
            .unwrap();
        let rewritten = for_keyspace(create, &config("fleet_a"), false);
        assert!(rewritten.contains(" fleet_a.devices"));
        assert!(!rewritten.contains(" orchard."));
    }

    #[test]
    fn the_keyspace_gets_the_configured_replication_and_tablets_only_on_scylla() {
        let mut cfg = config("k");
        cfg.replication = 5;
        let cassandra = create_keyspace(&cfg, false);
        assert!(cassandra.contains("'replication_factor': 5"));
        assert!(!cassandra.contains("tablets"));
        cfg.datacenter = Some("eu-west".into());
        let scylla = create_keyspace(&cfg, true);
        assert!(scylla.contains("'eu-west': 5"));
        assert!(scylla.ends_with("AND tablets = {'enabled': false}"));
    }

    #[test]
    fn markers_out_of_order_or_unterminated_statements_are_refused() {
        assert!(migrations("-- migration 2\nCREATE TABLE a (x int);\n-- migration 1\n").is_err());
        assert!(migrations("-- migration 1\nCREATE TABLE a (x int)\n").is_err());
        assert!(migrations("CREATE TABLE a (x int);\n").is_err());
    }

    #[test]
    fn the_lock_table_id_is_the_same_on_every_node_and_differs_per_keyspace() {
        assert_eq!(table_id("a", "t"), table_id("a", "t"));
        assert_ne!(table_id("a", "t"), table_id("b", "t"));
        assert_eq!(
            uuid::Uuid::parse_str(&table_id("a", "t"))
                .unwrap()
                .get_version_num(),
            4
        );
    }
}
