//! The schema: migrations embedded in the binary, versioned with `PRAGMA user_version`, and the pragmas every
//! connection gets.
//!
//! Migration `n` (1-based) is `MIGRATIONS[n - 1]`; `user_version` is the number applied. Each runs in its own
//! transaction together with the `user_version` bump, so a crash mid-migration leaves the previous version.

use std::time::Duration;

use agentd_core::store::{StoreError, StoreResult};
use rusqlite::{Connection, TransactionBehavior};

use crate::rows::Context;

/// The migrations, oldest first. Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_lean_events.sql"),
    include_str!("migrations/0003_event_chunks.sql"),
    include_str!("migrations/0004_uploads.sql"),
    include_str!("migrations/0005_run_node.sql"),
    include_str!("migrations/0006_aliases.sql"),
    include_str!("migrations/0007_compact_deltas.sql"),
    include_str!("migrations/0008_messages_by_session.sql"),
    include_str!("migrations/0009_unfinished_runs_by_session.sql"),
];

/// How long a statement waits for a lock another connection holds before failing with "database is locked".
/// Within one process only the writer takes write locks, so this only matters for a second process (e.g. a
/// backup tool) or a WAL checkpoint.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page size for new databases (see `configure_writer`).
const PAGE_SIZE: i64 = 2048;
/// How much of the database file connections map into memory.
const MMAP_SIZE: i64 = 256 * 1024 * 1024;

/// Enough for every statement the writer or a reader prepares, so `prepare_cached` never re-prepares.
const STATEMENT_CACHE: usize = 64;

/// The schema version this binary writes.
pub(crate) fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Pragmas for the one write connection.
///
/// WAL lets readers run while the writer commits. `synchronous=NORMAL` in WAL mode syncs only at checkpoints:
/// a commit is durable against a killed process (it is in the OS's page cache), though not against power loss,
/// which is the trade the store makes for not paying an fsync per commit.
pub(crate) fn configure_writer(conn: &Connection) -> StoreResult<()> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .ctx("setting busy_timeout")?;
    // Only takes effect on a new, empty database (before WAL is on). With many sessions streaming at once,
    // every event lands on its own session's leaf page, so a commit writes about one page per event into the
    // WAL: 2 KiB pages halve those bytes, and an event row (~200 bytes) still fits many to a page.
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .ctx("setting page_size")?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .ctx("enabling WAL")?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Other(format!(
            "could not enable WAL (journal_mode is {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .ctx("setting synchronous=NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)
        .ctx("enabling foreign keys")?;
    // Checkpoints run on their own thread (`checkpoint.rs`), not inside the writer's commits: the writer's
    // latency stays flat, and a page rewritten by many commits is copied to the database once per interval.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .ctx("disabling automatic checkpoints")?;
    // A modest cache: the writer touches each session's last page only about once a second (ingestion), and
    // profiling showed the page cache's clean-up at every transaction end (`pcache1TruncateUnsafe`) growing
    // with its size: about a third of the writer's time at 32 MiB, a few percent at 4 MiB.
    conn.pragma_update(None, "cache_size", -4_096)
        .ctx("setting cache_size")?;
    conn.pragma_update(None, "mmap_size", MMAP_SIZE)
        .ctx("setting mmap_size")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// Pragmas for a read connection. `query_only` makes an accidental write fail loudly instead of racing the
/// writer.
pub(crate) fn configure_reader(conn: &Connection) -> StoreResult<()> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .ctx("setting busy_timeout")?;
    conn.pragma_update(None, "query_only", true)
        .ctx("setting query_only")?;
    // Replays read the database file through the mapping instead of copying every page with pread.
    conn.pragma_update(None, "mmap_size", MMAP_SIZE)
        .ctx("setting mmap_size")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// Brings the database up to [`latest_version`]. Refuses a database a newer binary has migrated: running old
/// code against a newer schema could corrupt it.
pub(crate) fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let current: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .ctx("reading user_version")?;
    let latest = latest_version();
    if current > latest {
        return Err(StoreError::Other(format!(
            "database schema version {current} is newer than this binary supports ({latest})"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        let version = index as i64 + 1;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("starting migration")?;
        tx.execute_batch(sql)
            .ctx(&format!("applying migration {version}"))?;
        tx.pragma_update(None, "user_version", version)
            .ctx("setting user_version")?;
        tx.commit()
            .ctx(&format!("committing migration {version}"))?;
        tracing::info!(version, "applied sqlite migration");
    }
    Ok(())
}
