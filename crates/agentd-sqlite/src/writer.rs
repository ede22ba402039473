//! The writer: one thread owns the only write connection and applies commands from a bounded queue, in order.
//!
//! Group commit: when the writer takes an `append_events` command it also takes every further `append_events`
//! already waiting (up to [`MAX_GROUP_EVENTS`] events) and writes them all in one transaction, then answers each
//! caller. Under load many small appends (one per token delta) share one commit; when idle an append commits
//! alone, at once. Each caller's batch sits in its own savepoint, so one bad batch fails only its caller.
//!
//! The writer caches each session's last assigned `seq` (loaded from `sessions.last_seq` on first touch), so
//! numbering an event costs a hash lookup. The cache is only trusted because this thread is the only writer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agentd_core::domain::{Message, Run, Session};
use agentd_core::event::{Event, EventKind, LoggedEvent, NewEvent};
use agentd_core::store::{LogEntry, StoreError, StoreResult};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::rows::{
    from_sql_int, to_json, to_sql_int, violation, Context, MessageJson, RunValues, Violation,
};

/// Commands waiting for the writer. Senders wait (asynchronously) when it is full, which is the back-pressure
/// that keeps a slow disk from turning into unbounded memory.
pub(crate) const QUEUE_CAPACITY: usize = 1024;

/// The most events one group commit takes (a single larger batch is still written whole, alone).
pub(crate) const MAX_GROUP_EVENTS: usize = 4096;

/// Sessions whose last seq the writer remembers; past this the cache is emptied and refills on demand.
const MAX_CACHED_SESSIONS: usize = 100_000;

pub(crate) type Reply<T> = oneshot::Sender<StoreResult<T>>;

/// What `append_events` answers: the events with their seq, in input order.
type Appended = Vec<Arc<LoggedEvent>>;

/// One caller's batch in a group, with its reply channel.
type PendingAppend = (Vec<LogEntry>, Reply<Appended>);

/// One caller's reply channel and its result.
type Answer = (Reply<Appended>, StoreResult<Appended>);

/// One write, with the channel its result goes back on.
pub(crate) enum Command {
    CreateSession {
        session: Session,
        reply: Reply<()>,
    },
    UpdateSession {
        session: Session,
        reply: Reply<()>,
    },
    CreateRun {
        run: Run,
        client_message_id: Option<String>,
        reply: Reply<()>,
    },
    UpdateRun {
        run: Run,
        reply: Reply<()>,
    },
    Append {
        batch: Vec<LogEntry>,
        reply: Reply<Appended>,
    },
    Prune {
        session_id: String,
        keep_runs: usize,
        reply: Reply<()>,
    },
}

/// Counters the writer keeps, shared with [`crate::SqliteStore::stats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) append_calls: AtomicU64,
    pub(crate) append_commits: AtomicU64,
    pub(crate) appended_events: AtomicU64,
}

/// The state of the writer thread.
pub(crate) struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Command>,
    /// Last assigned seq per session, as committed (a failed transaction clears it).
    last_seq: HashMap<String, u64>,
    counters: Arc<Counters>,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        rx: mpsc::Receiver<Command>,
        counters: Arc<Counters>,
    ) -> Writer {
        Writer {
            conn,
            rx,
            last_seq: HashMap::new(),
            counters,
        }
    }

    /// Serves commands until every sender is gone, then returns (closing the connection, which checkpoints
    /// the WAL).
    pub(crate) fn run(mut self) {
        // A non-append command taken while gathering a group; it runs right after the group, keeping order.
        let mut next: Option<Command> = None;
        loop {
            let command = match next.take() {
                Some(command) => command,
                None => match self.rx.blocking_recv() {
                    Some(command) => command,
                    None => break,
                },
            };
            match command {
                Command::Append { batch, reply } => {
                    let mut events = batch.len();
                    let mut group = vec![(batch, reply)];
                    while events < MAX_GROUP_EVENTS {
                        match self.rx.try_recv() {
                            Ok(Command::Append { batch, reply }) => {
                                events += batch.len();
                                group.push((batch, reply));
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.append_group(group);
                }
                Command::CreateSession { session, reply } => {
                    let _ = reply.send(create_session(&self.conn, &session));
                }
                Command::UpdateSession { session, reply } => {
                    let _ = reply.send(update_session(&self.conn, &session));
                }
                Command::CreateRun {
                    run,
                    client_message_id,
                    reply,
                } => {
                    let _ = reply.send(create_run(&self.conn, &run, client_message_id.as_deref()));
                }
                Command::UpdateRun { run, reply } => {
                    let _ = reply.send(update_run(&self.conn, &run));
                }
                Command::Prune {
                    session_id,
                    keep_runs,
                    reply,
                } => {
                    let _ = reply.send(prune_events(&mut self.conn, &session_id, keep_runs));
                }
            }
        }
        tracing::debug!("sqlite writer stopped");
    }

    /// Writes a group of append batches in one transaction and answers each caller.
    fn append_group(&mut self, group: Vec<PendingAppend>) {
        if self.last_seq.len() > MAX_CACHED_SESSIONS {
            self.last_seq.clear();
        }
        let calls = group.len() as u64;
        let mut answers = Vec::with_capacity(group.len());
        let outcome = write_group(&mut self.conn, &mut self.last_seq, group, &mut answers);
        match outcome {
            Ok(()) => {
                let events: usize = answers
                    .iter()
                    .map(|(_, r)| r.as_ref().map_or(0, Vec::len))
                    .sum();
                self.counters
                    .append_calls
                    .fetch_add(calls, Ordering::Relaxed);
                self.counters.append_commits.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .appended_events
                    .fetch_add(events as u64, Ordering::Relaxed);
                for (reply, result) in answers {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                // Nothing was committed, so the cache may be ahead of the database: forget it.
                self.last_seq.clear();
                tracing::error!(error = %e, "sqlite group commit failed");
                let message = e.to_string();
                for (reply, _) in answers {
                    let _ = reply.send(Err(StoreError::Other(message.clone())));
                }
            }
        }
    }
}

/// The transaction of one group. Every caller ends up in `answers`; when this returns `Err` nothing was
/// committed and the individual results there are to be discarded.
fn write_group(
    conn: &mut Connection,
    cache: &mut HashMap<String, u64>,
    group: Vec<PendingAppend>,
    answers: &mut Vec<Answer>,
) -> StoreResult<()> {
    let mut group = group.into_iter();
    let result = write_group_tx(conn, cache, &mut group, answers);
    // Callers the loop never reached (it stopped on a transaction-level failure) still need an answer slot.
    answers.extend(group.map(|(_, reply)| (reply, Ok(Vec::new()))));
    result
}

fn write_group_tx(
    conn: &mut Connection,
    cache: &mut HashMap<String, u64>,
    group: &mut impl Iterator<Item = PendingAppend>,
    answers: &mut Vec<Answer>,
) -> StoreResult<()> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("starting append transaction")?;
    for (batch, reply) in group {
        // The cache value of each session before this batch (None: not cached), to undo a failed batch.
        let mut before: HashMap<String, Option<u64>> = HashMap::new();
        let sp = match tx.savepoint() {
            Ok(sp) => sp,
            Err(e) => {
                answers.push((reply, Ok(Vec::new())));
                return Err(e).ctx("opening savepoint");
            }
        };
        match append_batch(&sp, cache, &mut before, batch) {
            Ok(events) => {
                if let Err(e) = sp.commit() {
                    answers.push((reply, Ok(Vec::new())));
                    return Err(e).ctx("releasing savepoint");
                }
                answers.push((reply, Ok(events)));
            }
            Err(e) => {
                for (session, previous) in before {
                    match previous {
                        Some(seq) => cache.insert(session, seq),
                        None => cache.remove(&session),
                    };
                }
                answers.push((reply, Err(e)));
                // `finish` with the default drop behaviour rolls the savepoint back and releases it.
                sp.finish().ctx("rolling back savepoint")?;
            }
        }
    }
    tx.commit().ctx("committing appended events")
}

/// Numbers and writes one caller's entries, upserting the messages and runs they carry.
fn append_batch(
    conn: &Connection,
    cache: &mut HashMap<String, u64>,
    before: &mut HashMap<String, Option<u64>>,
    batch: Vec<LogEntry>,
) -> StoreResult<Appended> {
    let mut out = Vec::with_capacity(batch.len());
    for LogEntry { event, run } in batch {
        let NewEvent {
            session_id,
            run_id,
            agent,
            is_subagent,
            kind,
        } = event;
        let last = match cache.get(&session_id) {
            Some(&last) => last,
            None => load_last_seq(conn, &session_id)?,
        };
        if !before.contains_key(&session_id) {
            before.insert(session_id.clone(), cache.get(&session_id).copied());
        }
        let seq = last + 1;
        cache.insert(session_id.clone(), seq);

        let logged = LoggedEvent::new(
            session_id,
            Event {
                seq,
                run_id,
                agent,
                is_subagent,
                kind,
            },
        );
        conn.prepare_cached(
            "INSERT INTO events (session_id, seq, run_id, payload) VALUES (?1, ?2, ?3, ?4)",
        )
        .ctx("preparing event insert")?
        .execute(params![
            logged.session_id,
            to_sql_int(seq, "seq")?,
            logged.event.run_id,
            logged.json
        ])
        .ctx("inserting event")?;
        if let EventKind::Message { message } = &logged.event.kind {
            same_session(
                &logged.session_id,
                &message.session_id,
                "message",
                &message.id,
            )?;
            upsert_message(conn, message)?;
        }
        if let Some(run) = &run {
            same_session(&logged.session_id, &run.session_id, "run", &run.id)?;
            upsert_run(conn, run)?;
        }
        // A run's first event is always one of these (its user message, its start, or its end when it never
        // started), never a delta: recording it here costs nothing on the token path.
        if matches!(
            logged.event.kind,
            EventKind::Message { .. }
                | EventKind::RunStarted { .. }
                | EventKind::RunFinished { .. }
        ) {
            conn.prepare_cached(
                "UPDATE runs SET first_seq = ?3 WHERE session_id = ?1 AND id = ?2 AND first_seq IS NULL",
            )
            .ctx("preparing first_seq update")?
            .execute(params![logged.session_id, logged.event.run_id, to_sql_int(seq, "seq")?])
            .ctx("recording a run's first seq")?;
        }
        out.push(Arc::new(logged));
    }
    Ok(out)
}

/// The session's committed last seq; `NotFound` if the session does not exist.
fn load_last_seq(conn: &Connection, session_id: &str) -> StoreResult<u64> {
    // `sessions.last_seq` is the floor pruning leaves; the events themselves say how far the log went.
    let last: Option<(i64, Option<i64>)> = conn
        .prepare_cached(
            "SELECT last_seq, (SELECT MAX(seq) FROM events WHERE session_id = ?1) FROM sessions WHERE id = ?1",
        )
        .ctx("preparing last_seq read")?
        .query_row([session_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .ctx("reading last_seq")?;
    match last {
        Some((floor, max)) => from_sql_int(floor.max(max.unwrap_or(0)), "last_seq"),
        None => Err(StoreError::NotFound),
    }
}

/// An event's message or run must belong to the event's session, or the log and the tables would disagree.
fn same_session(event_session: &str, row_session: &str, what: &str, id: &str) -> StoreResult<()> {
    if event_session == row_session {
        Ok(())
    } else {
        Err(StoreError::Other(format!(
            "{what} {id} belongs to session {row_session} but its event to session {event_session}"
        )))
    }
}

fn upsert_message(conn: &Connection, message: &Message) -> StoreResult<()> {
    let json = MessageJson::of(message)?;
    // On conflict the row keeps its `ord` (its place in the history) and `created_at`.
    conn.prepare_cached(
        "INSERT INTO messages (id, session_id, run_id, role, content, tool_calls, tool_call_id, agent, images, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (session_id, id) DO UPDATE SET
             run_id = excluded.run_id, role = excluded.role, content = excluded.content,
             tool_calls = excluded.tool_calls, tool_call_id = excluded.tool_call_id, agent = excluded.agent,
             images = excluded.images",
    )
    .ctx("preparing message upsert")?
    .execute(params![
        message.id,
        message.session_id,
        message.run_id,
        message.role.as_str(),
        message.content,
        json.tool_calls,
        message.tool_call_id,
        message.agent,
        json.images,
        message.created_at,
    ])
    .ctx("upserting message")?;
    Ok(())
}

fn upsert_run(conn: &Connection, run: &Run) -> StoreResult<()> {
    let values = RunValues::of(run)?;
    // On conflict the row keeps its `ord`, `created_at` and `client_message_id`.
    conn.prepare_cached(
        "INSERT INTO runs (id, session_id, status, created_at, started_at, ended_at, error, prompt_tokens, completion_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (session_id, id) DO UPDATE SET
             status = excluded.status, started_at = excluded.started_at, ended_at = excluded.ended_at,
             error = excluded.error, prompt_tokens = excluded.prompt_tokens,
             completion_tokens = excluded.completion_tokens",
    )
    .ctx("preparing run upsert")?
    .execute(params![
        run.id,
        run.session_id,
        run.status.as_str(),
        run.created_at,
        run.started_at,
        run.ended_at,
        values.error,
        values.prompt_tokens,
        values.completion_tokens,
    ])
    .ctx("upserting run")?;
    Ok(())
}

fn create_session(conn: &Connection, session: &Session) -> StoreResult<()> {
    let metadata = to_json(&session.metadata, "metadata")?;
    let result = conn
        .prepare_cached(
            "INSERT INTO sessions (id, principal, agent, title, status, metadata, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .ctx("preparing session insert")?
        .execute(params![
            session.id,
            session.principal,
            session.agent,
            session.title,
            session.status.as_str(),
            metadata,
            session.created_at,
            session.updated_at,
        ]);
    match result {
        Ok(_) => Ok(()),
        Err(e) if violation(&e) == Some(Violation::Unique) => Err(StoreError::Conflict(format!(
            "session {} already exists",
            session.id
        ))),
        Err(e) => Err(e).ctx("inserting session"),
    }
}

fn update_session(conn: &Connection, session: &Session) -> StoreResult<()> {
    let metadata = to_json(&session.metadata, "metadata")?;
    let changed = conn
        .prepare_cached("UPDATE sessions SET title = ?2, status = ?3, metadata = ?4, updated_at = ?5 WHERE id = ?1")
        .ctx("preparing session update")?
        .execute(params![session.id, session.title, session.status.as_str(), metadata, session.updated_at])
        .ctx("updating session")?;
    if changed == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

fn create_run(conn: &Connection, run: &Run, client_message_id: Option<&str>) -> StoreResult<()> {
    let values = RunValues::of(run)?;
    let result = conn
        .prepare_cached(
            "INSERT INTO runs (id, session_id, status, created_at, started_at, ended_at, error, prompt_tokens,
                               completion_tokens, client_message_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .ctx("preparing run insert")?
        .execute(params![
            run.id,
            run.session_id,
            run.status.as_str(),
            run.created_at,
            run.started_at,
            run.ended_at,
            values.error,
            values.prompt_tokens,
            values.completion_tokens,
            client_message_id,
        ]);
    match result {
        Ok(_) => Ok(()),
        Err(e) => match violation(&e) {
            Some(Violation::Unique) => {
                let detail = e.to_string();
                Err(StoreError::Conflict(
                    if detail.contains("client_message_id") {
                        format!(
                            "a run with this client_message_id already exists in session {}",
                            run.session_id
                        )
                    } else {
                        format!(
                            "run {} already exists in session {}",
                            run.id, run.session_id
                        )
                    },
                ))
            }
            Some(Violation::ForeignKey) => Err(StoreError::NotFound),
            None => Err(e).ctx("inserting run"),
        },
    }
}

fn update_run(conn: &Connection, run: &Run) -> StoreResult<()> {
    let values = RunValues::of(run)?;
    let changed = conn
        .prepare_cached(
            "UPDATE runs SET status = ?3, started_at = ?4, ended_at = ?5, error = ?6, prompt_tokens = ?7,
                             completion_tokens = ?8
             WHERE session_id = ?1 AND id = ?2",
        )
        .ctx("preparing run update")?
        .execute(params![
            run.session_id,
            run.id,
            run.status.as_str(),
            run.started_at,
            run.ended_at,
            values.error,
            values.prompt_tokens,
            values.completion_tokens,
        ])
        .ctx("updating run")?;
    if changed == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// Deletes the events of all but the latest `keep_runs` runs. Runs of a session are sequential, so those
/// events are a prefix of the log: everything before the first event of the oldest kept run. Deleting by
/// position rather than by run id keeps the stored log contiguous, which `log_bounds` and replay rely on.
fn prune_events(conn: &mut Connection, session_id: &str, keep_runs: usize) -> StoreResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("starting prune")?;
    let keep = i64::try_from(keep_runs).unwrap_or(i64::MAX);
    let total_runs: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM runs WHERE session_id = ?1")
        .ctx("preparing run count")?
        .query_row([session_id], |row| row.get(0))
        .ctx("counting runs")?;
    if total_runs <= keep {
        return Ok(());
    }
    // The first stored event of any kept run; none stored means every stored event belongs to older runs.
    let boundary: Option<i64> = tx
        .prepare_cached(
            "SELECT MIN(e.seq) FROM events e
             WHERE e.session_id = ?1
               AND e.run_id IN (SELECT id FROM runs WHERE session_id = ?1 ORDER BY ord DESC LIMIT ?2)",
        )
        .ctx("preparing prune boundary")?
        .query_row(params![session_id, keep], |row| row.get(0))
        .ctx("finding prune boundary")?;
    // Remember how far the log went before deleting: the seq of a later append continues from there.
    tx.prepare_cached(
        "UPDATE sessions SET last_seq = MAX(last_seq, COALESCE((SELECT MAX(seq) FROM events WHERE session_id = ?1), 0))
         WHERE id = ?1",
    )
    .ctx("preparing last_seq floor")?
    .execute([session_id])
    .ctx("raising last_seq floor")?;
    let deleted = match boundary {
        Some(boundary) => tx
            .prepare_cached("DELETE FROM events WHERE session_id = ?1 AND seq < ?2")
            .ctx("preparing prune")?
            .execute(params![session_id, boundary]),
        None => tx
            .prepare_cached("DELETE FROM events WHERE session_id = ?1")
            .ctx("preparing prune")?
            .execute([session_id]),
    }
    .ctx("deleting events")?;
    tx.commit().ctx("committing prune")?;
    tracing::debug!(session_id, deleted, keep_runs, "pruned events");
    Ok(())
}
