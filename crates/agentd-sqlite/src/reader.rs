//! Reads: a small pool of read-only connections, each query run on tokio's blocking pool so an async worker
//! thread never waits on SQLite; only point lookups on a current-thread runtime run in place
//! ([`ReaderPool::point`]).
//!
//! WAL mode lets these run while the writer commits; each statement sees the last committed state, so an
//! `append_events` that has returned is visible to the next read.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agentd_core::domain::{Message, Run, Session};
use agentd_core::event::LoggedEvent;
use agentd_core::store::{HistoryPage, LogBounds, StoreError, StoreResult};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::rows::{
    from_sql_int, message_columns, run_columns, session_columns, sql_limit, to_sql_int, Context,
    MessageRow, RunRow, SessionRow,
};
use crate::{chunk, schema};

/// Read connections kept open. The machine agentd targets is small; reads are short point or range lookups.
pub(crate) const READERS: usize = 4;

/// A fixed number of read-only connections. The semaphore holds one permit per connection, so a task that
/// gets a permit always finds a connection (or opens a replacement for one lost to a panic).
pub(crate) struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReaderPool {
    /// Opens the connections. Call after the writer has created and migrated the database.
    pub(crate) fn open(path: &Path) -> StoreResult<Arc<ReaderPool>> {
        let mut idle = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            idle.push(open_reader(path)?);
        }
        Ok(Arc::new(ReaderPool {
            path: path.to_path_buf(),
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(READERS)),
        }))
    }

    /// Runs `query` on a pooled connection on the blocking pool. The connection goes back to the pool from the
    /// blocking task itself, so a caller that gives up waiting does not lose it.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, query: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let permit = self.permit().await?;
        let pool = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            pool.on_idle(query)
        });
        task.await
            .map_err(|e| StoreError::Other(format!("sqlite read task failed: {e}")))?
    }

    /// Runs a point lookup (a row or two found through an index: a session, a run, a log's bounds, an alias).
    ///
    /// On a current-thread runtime (agentd pinned to one CPU, where every thread shares that CPU) it runs here,
    /// on the calling task: a hop to the blocking pool costs a wake-up and two thread switches on the same CPU,
    /// more than such a lookup in a page-cached database, and the pool thread would preempt the runtime thread
    /// anyway. Each turn's send reads its session this way (BENCHMARKS.md, "Where the 1,000-stream p99 comes
    /// from; reads without a thread hop"). Reads that grow with a session (messages, runs, events) always go to
    /// the blocking pool ([`Self::run`]), as does every read on a multi-thread runtime, whose workers have other
    /// CPUs' threads to hand work to.
    pub(crate) async fn point<T, F>(self: &Arc<Self>, query: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let current_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if !current_thread {
            return self.run(query).await;
        }
        let _permit = self.permit().await?;
        self.on_idle(query)
    }

    /// A connection's permit: waits while every connection is in use.
    async fn permit(&self) -> StoreResult<OwnedSemaphorePermit> {
        Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Other("sqlite reader pool closed".into()))
    }

    /// Runs `query` on an idle connection (a new one in place of one lost to a panic) and puts it back.
    fn on_idle<T>(&self, query: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let conn = match self.take_idle() {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        let result = query(&conn);
        self.put_back(conn);
        result
    }

    fn take_idle(&self) -> Option<Connection> {
        // A poisoned lock only means another reader panicked while pushing or popping; the Vec is intact.
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }
}

pub(crate) fn open_reader(path: &Path) -> StoreResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Other(format!("opening {} for reading: {e}", path.display())))?;
    schema::configure_reader(&conn)?;
    Ok(conn)
}

// --- the queries, each run inside `ReaderPool::run` ---

pub(crate) fn get_session(conn: &Connection, id: &str) -> StoreResult<Option<Session>> {
    let mut stmt = conn
        .prepare_cached(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE id = ?1"
        ))
        .ctx("preparing get_session")?;
    let row = stmt
        .query_row([id], SessionRow::read)
        .optional()
        .ctx("reading session")?;
    row.map(SessionRow::into_session).transpose()
}

pub(crate) fn list_sessions(
    conn: &Connection,
    principal: Option<&str>,
    limit: usize,
    before: Option<&str>,
) -> StoreResult<Vec<Session>> {
    // One statement per shape, so each can use its index (a `?1 IS NULL OR ...` filter could not).
    let limit = sql_limit(Some(limit));
    let rows = match (principal, before) {
        (None, None) => collect(
            conn,
            concat!("SELECT ", session_columns!(), " FROM sessions ORDER BY ord DESC LIMIT ?1"),
            params![limit],
            SessionRow::read,
        ),
        (Some(p), None) => collect(
            conn,
            concat!(
                "SELECT ",
                session_columns!(),
                " FROM sessions WHERE principal = ?1 ORDER BY ord DESC LIMIT ?2"
            ),
            params![p, limit],
            SessionRow::read,
        ),
        (None, Some(b)) => collect(
            conn,
            concat!(
                "SELECT ",
                session_columns!(),
                " FROM sessions WHERE ord < (SELECT ord FROM sessions WHERE id = ?1) ORDER BY ord DESC LIMIT ?2"
            ),
            params![b, limit],
            SessionRow::read,
        ),
        (Some(p), Some(b)) => collect(
            conn,
            concat!(
                "SELECT ",
                session_columns!(),
                " FROM sessions WHERE principal = ?1 AND ord < (SELECT ord FROM sessions WHERE id = ?2)",
                " ORDER BY ord DESC LIMIT ?3"
            ),
            params![p, b, limit],
            SessionRow::read,
        ),
    }?;
    rows.into_iter().map(SessionRow::into_session).collect()
}

/// A page of a session's messages, oldest first.
const LIST_MESSAGES: &str = concat!(
    "SELECT ",
    message_columns!(),
    " FROM messages WHERE session_id = ?1 ORDER BY ord LIMIT ?2 OFFSET ?3"
);

pub(crate) fn list_messages(
    conn: &Connection,
    session_id: &str,
    limit: Option<usize>,
    offset: usize,
) -> StoreResult<Vec<Message>> {
    let offset = i64::try_from(offset).unwrap_or(i64::MAX);
    let rows = collect(
        conn,
        LIST_MESSAGES,
        params![session_id, sql_limit(limit), offset],
        MessageRow::read,
    )?;
    rows.into_iter().map(MessageRow::into_message).collect()
}

/// The newest messages of a session, each with its run's `ord` (a correlated lookup in `runs`' unique
/// `(session_id, id)` index); both walk an index backwards from the newest row, so nothing is sorted.
const HISTORY_MESSAGES: &str = concat!(
    "SELECT ",
    message_columns!(),
    ", (SELECT r.ord FROM runs r WHERE r.session_id = ?1 AND r.id = messages.run_id) AS place",
    " FROM messages WHERE session_id = ?1 ORDER BY messages.ord DESC LIMIT ?2"
);

/// A run's own `ord` and the session's runs counted up to a bound.
const HISTORY_RUNS: &str = "SELECT (SELECT ord FROM runs WHERE session_id = ?1 AND id = ?2), \
     (SELECT count(*) FROM (SELECT 1 FROM runs WHERE session_id = ?1 LIMIT ?3))";

pub(crate) fn history_page(
    conn: &Connection,
    session_id: &str,
    run_id: &str,
    limit: usize,
    count_runs_to: usize,
) -> StoreResult<HistoryPage> {
    let rows = collect(
        conn,
        HISTORY_MESSAGES,
        params![session_id, sql_limit(Some(limit))],
        |row| Ok((MessageRow::read(row)?, row.get::<_, Option<i64>>(10)?)),
    )?;
    let messages = rows
        .into_iter()
        .rev()
        .map(|(row, place)| Ok((row.into_message()?, place)))
        .collect::<StoreResult<Vec<_>>>()?;
    let mut stmt = conn
        .prepare_cached(HISTORY_RUNS)
        .ctx("preparing history_page")?;
    let (own, runs) = stmt
        .query_row(
            params![session_id, run_id, sql_limit(Some(count_runs_to))],
            |row| Ok((row.get::<_, Option<i64>>(0)?, row.get::<_, i64>(1)?)),
        )
        .ctx("reading a run's place")?;
    Ok(HistoryPage {
        messages,
        own,
        runs: usize::try_from(runs).unwrap_or(0),
    })
}

pub(crate) fn find_run_by_client_message_id(
    conn: &Connection,
    session_id: &str,
    client_message_id: &str,
) -> StoreResult<Option<Run>> {
    let mut stmt = conn
        .prepare_cached(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE session_id = ?1 AND client_message_id = ?2"
        ))
        .ctx("preparing find_run_by_client_message_id")?;
    let row = stmt
        .query_row(params![session_id, client_message_id], RunRow::read)
        .optional()
        .ctx("reading run by client_message_id")?;
    row.map(RunRow::into_run).transpose()
}

pub(crate) fn get_run(
    conn: &Connection,
    session_id: &str,
    run_id: &str,
) -> StoreResult<Option<Run>> {
    let mut stmt = conn
        .prepare_cached(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE session_id = ?1 AND id = ?2"
        ))
        .ctx("preparing get_run")?;
    let row = stmt
        .query_row(params![session_id, run_id], RunRow::read)
        .optional()
        .ctx("reading run")?;
    row.map(RunRow::into_run).transpose()
}

pub(crate) fn list_runs(conn: &Connection, session_id: &str) -> StoreResult<Vec<Run>> {
    let rows = collect(
        conn,
        concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE session_id = ?1 ORDER BY ord"
        ),
        params![session_id],
        RunRow::read,
    )?;
    rows.into_iter().map(RunRow::into_run).collect()
}

pub(crate) fn unfinished_runs(conn: &Connection) -> StoreResult<Vec<Run>> {
    // The WHERE clause matches the partial index `runs_unfinished` word for word, so SQLite can use it.
    let rows = collect(
        conn,
        concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE status IN ('queued', 'running', 'waiting_input') ORDER BY ord"
        ),
        params![],
        RunRow::read,
    )?;
    rows.into_iter().map(RunRow::into_run).collect()
}

/// A session's unfinished runs: the WHERE clause matches the partial index `runs_unfinished_by_session` word for
/// word, so SQLite walks that index (ordered by `ord`) and never the session's finished runs.
const UNFINISHED_RUNS_OF: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE session_id = ?1 AND status IN ('queued', 'running', 'waiting_input') ORDER BY ord"
);

pub(crate) fn unfinished_runs_of(conn: &Connection, session_id: &str) -> StoreResult<Vec<Run>> {
    let rows = collect(conn, UNFINISHED_RUNS_OF, params![session_id], RunRow::read)?;
    rows.into_iter().map(RunRow::into_run).collect()
}

pub(crate) fn read_events(
    conn: &Connection,
    session_id: &str,
    after: u64,
    limit: usize,
) -> StoreResult<Vec<Arc<LoggedEvent>>> {
    let sql_after = to_sql_int(after, "after").unwrap_or(i64::MAX);
    // Every row with `seq > after` holds at least one event after `after`, so `limit` rows are enough.
    let rows: Vec<(i64, i64, String)> = collect(
        conn,
        "SELECT first_seq, seq, payload FROM events WHERE session_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        params![session_id, sql_after, sql_limit(Some(limit))],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    let mut events = Vec::new();
    for (first, last, payload) in &rows {
        chunk::decode_into(session_id, *first, *last, payload, after, &mut events)?;
        if events.len() >= limit {
            break;
        }
    }
    events.truncate(limit);
    Ok(events.into_iter().map(Arc::new).collect())
}

pub(crate) fn log_bounds(conn: &Connection, session_id: &str) -> StoreResult<LogBounds> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT last_seq, (SELECT first_seq FROM events WHERE session_id = ?1 ORDER BY seq LIMIT 1),
                    (SELECT MAX(seq) FROM events WHERE session_id = ?1)
             FROM sessions WHERE id = ?1",
        )
        .ctx("preparing log_bounds")?;
    let row: Option<(i64, Option<i64>, Option<i64>)> = stmt
        .query_row([session_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()
        .ctx("reading log bounds")?;
    // An unknown session has an empty log, like a session nothing was ever appended to.
    let Some((floor, first, max)) = row else {
        return Ok(LogBounds::default());
    };
    Ok(LogBounds {
        first_seq: from_sql_int(first.unwrap_or(0), "first seq")?,
        last_seq: from_sql_int(floor.max(max.unwrap_or(0)), "last_seq")?,
    })
}

pub(crate) fn first_seq_of_run(
    conn: &Connection,
    session_id: &str,
    run_id: &str,
) -> StoreResult<Option<u64>> {
    let recorded: Option<(Option<i64>, bool)> = conn
        .prepare_cached(
            "SELECT r.first_seq,
                    COALESCE((SELECT e.first_seq FROM events e WHERE e.session_id = ?1 AND e.seq >= r.first_seq
                              ORDER BY e.seq LIMIT 1) <= r.first_seq, 0)
             FROM runs r WHERE r.session_id = ?1 AND r.id = ?2",
        )
        .ctx("preparing first_seq_of_run")?
        .query_row(params![session_id, run_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .ctx("reading first seq of run")?;
    // Recorded when the run's first event was appended (and gone once pruning deleted that event); the scan is
    // the fallback for a run with no recorded first seq.
    let first = match recorded {
        Some((Some(seq), true)) => Some(seq),
        Some((Some(_), false)) => None,
        Some((None, _)) | None => conn
            .prepare_cached(
                "SELECT MIN(first_seq) FROM events WHERE session_id = ?1 AND run_id = ?2",
            )
            .ctx("preparing first_seq_of_run scan")?
            .query_row(params![session_id, run_id], |row| row.get(0))
            .ctx("scanning for the first seq of run")?,
    };
    first.map(|seq| from_sql_int(seq, "seq")).transpose()
}

/// Runs a cached statement and collects its rows.
fn collect<T, P, F>(conn: &Connection, sql: &str, params: P, map: F) -> StoreResult<Vec<T>>
where
    P: rusqlite::Params,
    F: FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
{
    let mut stmt = conn.prepare_cached(sql).ctx("preparing query")?;
    let rows = stmt.query_map(params, map).ctx("running query")?;
    rows.collect::<rusqlite::Result<Vec<T>>>()
        .ctx("reading rows")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How SQLite would run `sql`: the `detail` of each step of its plan (parameters left unbound).
    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("explain");
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(row) = rows.next().expect("a plan row") {
            out.push(row.get::<_, String>(3).expect("detail"));
        }
        out
    }

    /// A turn's history and a page of `GET .../messages` walk the session's messages in order through an
    /// index; a long session's messages are never all sorted (a "TEMP B-TREE") or scanned for one turn.
    #[test]
    fn reads_of_a_sessions_messages_and_runs_walk_an_index_and_sort_nothing() {
        let mut conn = Connection::open_in_memory().expect("a database");
        schema::migrate(&mut conn).expect("migrated");
        for sql in [LIST_MESSAGES, HISTORY_MESSAGES, HISTORY_RUNS] {
            let steps = plan(&conn, sql);
            assert!(!steps.is_empty(), "{sql}");
            for step in &steps {
                assert!(!step.contains("TEMP B-TREE"), "{sql}: {steps:?}");
                let scans_a_table = ["SCAN messages", "SCAN runs", "SCAN r "]
                    .iter()
                    .any(|t| step.starts_with(t) || step == t.trim_end());
                assert!(!scans_a_table, "{sql}: {steps:?}");
            }
        }
        let steps = plan(&conn, HISTORY_MESSAGES);
        assert!(
            steps.iter().any(|s| s.contains("messages_by_session")),
            "{steps:?}"
        );
        // A session's unfinished runs: the partial index, so the session's finished runs are never visited.
        let steps = plan(&conn, UNFINISHED_RUNS_OF);
        assert!(
            !steps.iter().any(|s| s.contains("TEMP B-TREE")),
            "{steps:?}"
        );
        assert!(
            steps
                .iter()
                .any(|s| s.contains("USING INDEX runs_unfinished_by_session")),
            "{steps:?}"
        );
    }
}
