//! The schema: migrations embedded in the binary, versioned in the table `agentd_schema`, applied at start-up.
//!
//! Several nodes may start at once against one database. Every node migrates inside one transaction that
//! first takes a transaction-scoped advisory lock (`pg_advisory_xact_lock`): the first node applies what is
//! missing while the others wait on the lock, then find the schema current and apply nothing. DDL is
//! transactional in PostgreSQL, so a node that dies mid-migration leaves the previous version.

use agentd_core::store::{StoreError, StoreResult};
use tokio_postgres::Client;

use crate::rows::pg;

/// The migrations, oldest first. Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_uploads.sql"),
    include_str!("migrations/0003_cluster.sql"),
    include_str!("migrations/0004_commands.sql"),
    include_str!("migrations/0005_aliases.sql"),
    include_str!("migrations/0006_unfinished_runs_by_session.sql"),
];

/// The advisory lock every node takes to migrate ("agentd" in ASCII, then 1). Any other client of the database
/// using this key would only delay start-up.
const MIGRATION_LOCK: i64 = 0x6167_656e_7464_0001;

/// The schema version this binary writes.
pub(crate) fn latest_version() -> i32 {
    MIGRATIONS.len() as i32
}

/// Brings the database up to [`latest_version`]. Refuses a database a newer binary has migrated: running old
/// code against a newer schema could corrupt it.
pub(crate) async fn migrate(client: &mut Client) -> StoreResult<()> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg("starting migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg("taking the migration lock", e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS agentd_schema (version integer NOT NULL)")
        .await
        .map_err(|e| pg("creating agentd_schema", e))?;
    let current: Option<i32> = tx
        .query_opt("SELECT max(version) FROM agentd_schema", &[])
        .await
        .map_err(|e| pg("reading the schema version", e))?
        .and_then(|row| row.get(0));
    let current = current.unwrap_or(0);
    let latest = latest_version();
    if current > latest {
        return Err(StoreError::Other(format!(
            "database schema version {current} is newer than this binary supports ({latest})"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        let version = index as i32 + 1;
        tx.batch_execute(sql)
            .await
            .map_err(|e| pg(&format!("applying migration {version}"), e))?;
        tracing::info!(version, "applied postgres migration");
    }
    if current < latest {
        tx.execute("DELETE FROM agentd_schema", &[])
            .await
            .map_err(|e| pg("clearing the schema version", e))?;
        tx.execute(
            "INSERT INTO agentd_schema (version) VALUES ($1)",
            &[&latest],
        )
        .await
        .map_err(|e| pg("recording the schema version", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| pg("committing migrations", e))?;
    Ok(())
}
