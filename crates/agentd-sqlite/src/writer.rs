//! The writer: one thread owns the only write connection and applies commands from a bounded queue, in order.
//!
//! The token stream does not come through here (see `append.rs`): it is made durable in the log's tail file
//! by the caller. The writer commits what changes rows — sessions, runs, messages — and, for an append that
//! carries such changes, those sessions' events together with their tails (`CommitSync`), so the tables and
//! the log never disagree.
//!
//! Between commands the writer moves due tails into the `events` table ("ingestion"), a bounded slice at a
//! time so a command never waits long behind it: a session's tail is due when it is [`INGEST_AGE`] old or
//! [`SESSION_TAIL_CAP`] long, and the oldest are due whenever the whole tail passes [`TAIL_CAP`]. The append
//! path nudges the writer when a cap is reached; age is checked on a timer.
//!
//! Group commit: row changes queued together (a burst of turns starting or ending) share one transaction, each
//! in a savepoint of its own, so one that fails (a conflict, a missing session) is undone alone and answered
//! with its own error while the others commit. A transaction's fixed cost (writing its pages and the commit
//! frame into the WAL, the page cache's clean-up) is then paid once per group instead of once per change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::domain::{Message, Run, Session, Upload};
use agentd_core::event::{EventKind, LoggedEvent};
use agentd_core::store::{StoreError, StoreResult, StoredRun};
use rusqlite::{params, Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::append::{Numbered, SyncWork};
use crate::rows::{to_json, to_sql_int, violation, Context, MessageJson, RunValues, Violation};
use crate::tail::{SegmentBook, SessionTail, Tail};
use crate::{chunk, copy};

/// Commands waiting for the writer. Senders wait (asynchronously) when it is full, which is the back-pressure
/// that keeps a slow disk from turning into unbounded memory.
pub(crate) const QUEUE_CAPACITY: usize = 1024;

/// A session's tail is moved into the table once its oldest event is this old: at 20 tokens/s that is about
/// 20 events per session per move, a few pages written once instead of a page per token.
pub(crate) const INGEST_AGE: Duration = Duration::from_secs(1);
/// ... or once it holds this many events (a fast stream).
pub(crate) const SESSION_TAIL_CAP: usize = 256;
/// The whole tail, over all sessions, is kept under about this many events (its memory bound).
pub(crate) const TAIL_CAP: usize = 65_536;
/// About how many events one ingestion transaction moves. Small, because an append carrying a run or message
/// change waits for the writer (and its session's next events wait for that append): a slice must end quickly.
const INGEST_SLICE: usize = 64;
/// Row changes committed in one transaction at most (group commit).
const GROUP_MAX: usize = 64;

pub(crate) type Reply<T> = oneshot::Sender<StoreResult<T>>;

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
    ReleaseClientMessageId {
        session_id: String,
        run_id: String,
        reply: Reply<()>,
    },
    /// Table-changing events of an append, committed with their sessions' tails.
    CommitSync {
        work: SyncWork,
        reply: Reply<()>,
    },
    Prune {
        session_id: String,
        keep_runs: usize,
        reply: Reply<()>,
    },
    PutAlias {
        key: String,
        session_id: String,
        reply: Reply<()>,
    },
    PutUpload {
        session_id: String,
        upload: Upload,
        bytes: Vec<u8>,
        reply: Reply<()>,
    },
    ImportSession {
        session: Session,
        messages: Vec<Message>,
        runs: Vec<StoredRun>,
        reply: Reply<()>,
    },
    ImportEvents {
        session_id: String,
        events: Vec<Arc<LoggedEvent>>,
        last_seq: u64,
        reply: Reply<()>,
    },
}

impl Command {
    /// Where the command's answer goes.
    fn into_reply(self) -> Reply<()> {
        match self {
            Command::CreateSession { reply, .. }
            | Command::UpdateSession { reply, .. }
            | Command::CreateRun { reply, .. }
            | Command::UpdateRun { reply, .. }
            | Command::ReleaseClientMessageId { reply, .. }
            | Command::CommitSync { reply, .. }
            | Command::Prune { reply, .. }
            | Command::PutAlias { reply, .. }
            | Command::PutUpload { reply, .. }
            | Command::ImportSession { reply, .. }
            | Command::ImportEvents { reply, .. } => reply,
        }
    }

    /// A few row changes answered with `()`, which may share a transaction with others (group commit).
    fn groupable(&self) -> bool {
        matches!(
            self,
            Command::CreateSession { .. }
                | Command::UpdateSession { .. }
                | Command::CreateRun { .. }
                | Command::UpdateRun { .. }
                | Command::ReleaseClientMessageId { .. }
                | Command::CommitSync { .. }
                | Command::PutAlias { .. }
        )
    }
}

/// A grouped command applied inside the group's transaction, waiting for the commit to be answered.
struct Applied {
    reply: Reply<()>,
    result: StoreResult<()>,
    /// For a `CommitSync`: the sessions' tail events now in the table, dropped from memory after the commit.
    tails: Vec<(String, usize)>,
}

/// Counters the writer keeps, shared with [`crate::SqliteStore::stats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) append_calls: AtomicU64,
    pub(crate) append_commits: AtomicU64,
    pub(crate) appended_events: AtomicU64,
    pub(crate) ingest_commits: AtomicU64,
    pub(crate) ingested_events: AtomicU64,
    pub(crate) grouped_commits: AtomicU64,
    pub(crate) grouped_commands: AtomicU64,
}

/// The state of the writer thread.
pub(crate) struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Command>,
    counters: Arc<Counters>,
    tail: Arc<Tail>,
    book: Arc<SegmentBook>,
    nudge: Arc<Notify>,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        rx: mpsc::Receiver<Command>,
        counters: Arc<Counters>,
        tail: Arc<Tail>,
        book: Arc<SegmentBook>,
        nudge: Arc<Notify>,
    ) -> Writer {
        Writer {
            conn,
            rx,
            counters,
            tail,
            book,
            nudge,
        }
    }

    /// Serves commands until every sender is gone, then moves the whole tail into the table and returns
    /// (closing the connection, which checkpoints the WAL).
    pub(crate) fn run(mut self) {
        // The queue is tokio's (async senders wait on it); this thread waits on it, on the nudge and on the
        // ingestion timer together, for which it needs a small runtime of its own.
        let clock = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "sqlite writer could not start its timer; stopping");
                return;
            }
        };
        loop {
            if self.ingest_due() {
                // More may be due: serve what is queued first, then come back.
                match self.rx.try_recv() {
                    Ok(command) => self.serve_queued(command),
                    Err(mpsc::error::TryRecvError::Empty) => {}
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
                continue;
            }
            let wait = self.next_ingest_in();
            let rx = &mut self.rx;
            let nudge = &self.nudge;
            let received = clock.block_on(async {
                tokio::select! {
                    c = rx.recv() => Some(c),
                    _ = nudge.notified() => None,
                    _ = tokio::time::sleep(wait) => None,
                }
            });
            match received {
                Some(Some(command)) => self.serve_queued(command),
                Some(None) => break,
                None => {}
            }
        }
        if let Err(e) = self.ingest(|_, _| true, usize::MAX) {
            tracing::error!(error = %e, "could not move the log tail into the table at shutdown; it is replayed at the next start");
        } else {
            self.book.close();
        }
        tracing::debug!("sqlite writer stopped");
    }

    /// Serves `first` and, when it is a row change, the row changes queued behind it in one transaction.
    fn serve_queued(&mut self, first: Command) {
        if !first.groupable() {
            self.serve(first);
            return;
        }
        let mut group = vec![first];
        let mut next = None;
        while group.len() < GROUP_MAX {
            match self.rx.try_recv() {
                Ok(c) if c.groupable() => group.push(c),
                Ok(c) => {
                    next = Some(c);
                    break;
                }
                Err(_) => break,
            }
        }
        if group.len() == 1 {
            group.into_iter().for_each(|c| self.serve(c));
        } else {
            self.serve_group(group);
        }
        if let Some(c) = next {
            self.serve(c);
        }
    }

    /// Applies row changes in one transaction, each in a savepoint: a change that fails is undone alone and
    /// gets its error; the rest are answered once the transaction has committed (or all get its error).
    fn serve_group(&mut self, group: Vec<Command>) {
        let started = Instant::now();
        let size = group.len();
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            tracing::debug!(error = %e, "could not start a group transaction; serving one by one");
            group.into_iter().for_each(|c| self.serve(c));
            return;
        }
        let mut applied: Vec<Applied> = Vec::with_capacity(size);
        // Commands the group did not get to apply, served alone if the group fails.
        let mut left: Vec<Command> = Vec::new();
        let mut broken: Option<String> = None;
        let mut commands = group.into_iter();
        for command in commands.by_ref() {
            if let Err(e) = self.conn.execute_batch("SAVEPOINT grouped") {
                broken = Some(format!("opening a savepoint: {e}"));
                left.push(command);
                break;
            }
            let mut one = self.apply(command);
            let end = if one.result.is_ok() {
                self.conn.execute_batch("RELEASE grouped")
            } else if self.conn.is_autocommit() {
                // The error ended the whole transaction (SQLite rolls back on some I/O errors): nothing of
                // the group stands.
                Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some("the transaction was rolled back".into()),
                ))
            } else {
                // Undo this change alone.
                one.tails.clear();
                self.conn
                    .execute_batch("ROLLBACK TO grouped; RELEASE grouped")
            };
            applied.push(one);
            if let Err(e) = end {
                broken = Some(format!("ending a savepoint: {e}"));
                break;
            }
        }
        left.extend(commands);
        let outcome = match broken {
            Some(why) => Err(why),
            None => self
                .conn
                .execute_batch("COMMIT")
                .map_err(|e| format!("committing: {e}")),
        };
        match outcome {
            Ok(()) => {
                for a in applied {
                    if a.result.is_ok() {
                        self.sync_committed(&a.tails);
                    }
                    let _ = a.reply.send(a.result);
                }
                self.counters
                    .grouped_commits
                    .fetch_add(1, Ordering::Relaxed);
                self.counters
                    .grouped_commands
                    .fetch_add(size as u64, Ordering::Relaxed);
                tracing::debug!(
                    commands = size,
                    micros = started.elapsed().as_micros() as u64,
                    "committed a group of row changes"
                );
            }
            Err(why) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                tracing::error!(error = %why, commands = applied.len(),
                    "a group of row changes failed; none of it is stored");
                for a in applied {
                    let result = match a.result {
                        Err(e) => Err(e),
                        Ok(()) => Err(StoreError::Other(format!(
                            "the transaction it shared failed: {why}"
                        ))),
                    };
                    let _ = a.reply.send(result);
                }
                // What the group had not applied yet is served on its own.
                left.into_iter().for_each(|c| self.serve(c));
            }
        }
    }

    /// Applies one groupable command on the connection without committing: inside a group's transaction
    /// ([`Writer::serve_group`]), or alone for the single-statement ones ([`Writer::serve`]).
    fn apply(&mut self, command: Command) -> Applied {
        let no_tails = |reply, result| Applied {
            reply,
            result,
            tails: Vec::new(),
        };
        match command {
            Command::CommitSync { work, reply } => match write_sync(&self.tail, &self.conn, work) {
                Ok(tails) => Applied {
                    reply,
                    result: Ok(()),
                    tails,
                },
                Err(e) => no_tails(reply, Err(e)),
            },
            Command::CreateSession { session, reply } => {
                no_tails(reply, create_session(&self.conn, &session))
            }
            Command::UpdateSession { session, reply } => {
                no_tails(reply, update_session(&self.conn, &session))
            }
            Command::CreateRun {
                run,
                client_message_id,
                reply,
            } => no_tails(
                reply,
                create_run(&self.conn, &run, client_message_id.as_deref()),
            ),
            Command::UpdateRun { run, reply } => no_tails(reply, update_run(&self.conn, &run)),
            Command::ReleaseClientMessageId {
                session_id,
                run_id,
                reply,
            } => no_tails(
                reply,
                release_client_message_id(&self.conn, &session_id, &run_id),
            ),
            Command::PutAlias {
                key,
                session_id,
                reply,
            } => no_tails(reply, put_alias(&self.conn, &key, &session_id)),
            // Not groupable (see `Command::groupable`): `serve_queued` never puts one in a group.
            other => no_tails(
                other.into_reply(),
                Err(StoreError::Other(
                    "internal: a command that cannot be grouped".into(),
                )),
            ),
        }
    }

    fn serve(&mut self, command: Command) {
        match command {
            Command::CommitSync { work, reply } => {
                let _ = reply.send(self.commit_sync(work));
            }
            // A single statement each: applied alone, it is its own transaction.
            c @ (Command::CreateSession { .. }
            | Command::UpdateSession { .. }
            | Command::CreateRun { .. }
            | Command::UpdateRun { .. }
            | Command::ReleaseClientMessageId { .. }
            | Command::PutAlias { .. }) => {
                let one = self.apply(c);
                let _ = one.reply.send(one.result);
            }
            Command::Prune {
                session_id,
                keep_runs,
                reply,
            } => {
                // Pruning reads and deletes the table: the session's tail goes there first.
                let result = self
                    .ingest(|id, _| id == session_id, usize::MAX)
                    .and_then(|_| prune_events(&mut self.conn, &session_id, keep_runs));
                let _ = reply.send(result);
            }
            Command::PutUpload {
                session_id,
                upload,
                bytes,
                reply,
            } => {
                let _ = reply.send(copy::put_upload(&self.conn, &session_id, &upload, &bytes));
            }
            Command::ImportSession {
                session,
                messages,
                runs,
                reply,
            } => {
                let _ = reply.send(copy::import_session(
                    &mut self.conn,
                    &session,
                    &messages,
                    &runs,
                ));
            }
            Command::ImportEvents {
                session_id,
                events,
                last_seq,
                reply,
            } => {
                // The session's tail goes into the table first, so the log there is the whole log.
                let result = self
                    .ingest(|id, _| id == session_id, usize::MAX)
                    .and_then(|_| {
                        copy::import_events(&mut self.conn, &session_id, &events, last_seq)
                    });
                let _ = reply.send(result);
            }
        }
    }

    /// How long until the oldest tail event is due for ingestion (at most [`INGEST_AGE`]: the tail may fill
    /// while the writer sleeps, without a nudge).
    fn next_ingest_in(&self) -> Duration {
        let oldest = self.tail.lock().values().map(|t| t.since).min();
        match oldest {
            Some(oldest) => INGEST_AGE.saturating_sub(oldest.elapsed()),
            None => INGEST_AGE,
        }
    }

    /// Ingests one slice of what is due: sessions whose tail is older than [`INGEST_AGE`] or longer than
    /// [`SESSION_TAIL_CAP`], or the oldest sessions when the whole tail is over [`TAIL_CAP`]. Returns whether
    /// it moved anything.
    fn ingest_due(&mut self) -> bool {
        if self.tail.len() == 0 {
            return false;
        }
        let over = self.tail.len() > TAIL_CAP;
        let now = Instant::now();
        let result = self.ingest(
            |_, t| {
                over || t.events.len() >= SESSION_TAIL_CAP
                    || now.duration_since(t.since) >= INGEST_AGE
            },
            INGEST_SLICE,
        );
        match result {
            Ok(moved) => moved > 0,
            Err(e) => {
                // The events stay in the tail (and its file); the timer retries.
                tracing::error!(error = %e, "moving the log tail into the table failed");
                false
            }
        }
    }

    /// Moves the tails of the sessions `pick` selects (oldest first, whole sessions, until about `budget`
    /// events) into the `events` table, in one transaction.
    fn ingest(
        &mut self,
        pick: impl Fn(&str, &SessionTail) -> bool,
        budget: usize,
    ) -> StoreResult<usize> {
        let chosen: Vec<(String, Vec<Arc<LoggedEvent>>)> = {
            let map = self.tail.lock();
            let mut due: Vec<(&String, &SessionTail)> =
                map.iter().filter(|(id, t)| pick(id, t)).collect();
            due.sort_by_key(|(_, t)| t.since);
            let mut taken = 0;
            let mut chosen = Vec::new();
            for (id, t) in due {
                if taken >= budget {
                    break;
                }
                taken += t.events.len();
                chosen.push((
                    id.clone(),
                    t.events.iter().map(|e| Arc::clone(&e.event)).collect(),
                ));
            }
            chosen
        };
        if chosen.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("starting ingestion")?;
        let mut moved = 0;
        for (_, events) in &chosen {
            chunk::insert(&tx, events)?;
            moved += events.len();
        }
        tx.commit().ctx("committing ingestion")?;
        let applied = self.tail.drop_front(
            chosen
                .iter()
                .map(|(id, events)| (id.as_str(), events.len())),
        );
        self.book.applied(&applied);
        tracing::debug!(
            sessions = chosen.len(),
            events = moved,
            micros = started.elapsed().as_micros() as u64,
            "moved log tails into the table"
        );
        self.counters.ingest_commits.fetch_add(1, Ordering::Relaxed);
        self.counters
            .ingested_events
            .fetch_add(moved as u64, Ordering::Relaxed);
        Ok(moved)
    }

    /// Commits an append's table-changing events: for each of its sessions, the tail so far, then the call's
    /// events of that session (with their message and run upserts), in one transaction; then those tails are
    /// dropped from memory (they are in the table).
    fn commit_sync(&mut self, work: SyncWork) -> StoreResult<()> {
        let started = Instant::now();
        let events = work.1.len();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx("starting append transaction")?;
        let tails = write_sync(&self.tail, &tx, work)?;
        tx.commit().ctx("committing appended events")?;
        self.sync_committed(&tails);
        tracing::debug!(
            sessions = tails.len(),
            events,
            micros = started.elapsed().as_micros() as u64,
            "committed run and message changes with their tails"
        );
        Ok(())
    }

    /// After the commit of [`write_sync`]'s transaction: those tail events are in the table now.
    fn sync_committed(&self, tails: &[(String, usize)]) {
        if tails.is_empty() {
            return;
        }
        let applied = self
            .tail
            .drop_front(tails.iter().map(|(s, n)| (s.as_str(), *n)));
        self.book.applied(&applied);
    }
}

/// Writes an append's table-changing events with their sessions' tails on `conn` (in a transaction the
/// caller commits); returns how many tail events of each session it wrote.
fn write_sync(
    tail: &Tail,
    conn: &Connection,
    (sessions, work): SyncWork,
) -> StoreResult<Vec<(String, usize)>> {
    let mut tails: Vec<(String, usize)> = Vec::with_capacity(sessions.len());
    {
        let map = tail.lock();
        for session in sessions {
            let n = match map.get(&session) {
                Some(t) => {
                    let events: Vec<&LoggedEvent> =
                        t.events.iter().map(|e| e.event.as_ref()).collect();
                    chunk::insert(conn, &events)?;
                    events.len()
                }
                None => 0,
            };
            tails.push((session, n));
        }
    }
    for n in &work {
        write_entry(conn, n)?;
    }
    Ok(tails)
}

/// Writes one event directly to the table, upserting the message and run it carries.
fn write_entry(conn: &Connection, n: &Numbered) -> StoreResult<()> {
    let logged = &n.event;
    chunk::insert(conn, std::slice::from_ref(logged))?;
    if let EventKind::Message { message } = &logged.event.kind {
        upsert_message(conn, message)?;
    }
    if let Some(run) = &n.run {
        upsert_run(conn, run)?;
    }
    // A run's first event is always one of these (its user message, its start, or its end when it never
    // started), never a delta: recording it here costs nothing on the token path.
    if matches!(
        logged.event.kind,
        EventKind::Message { .. } | EventKind::RunStarted { .. } | EventKind::RunFinished { .. }
    ) {
        conn.prepare_cached(
            "UPDATE runs SET first_seq = ?3 WHERE session_id = ?1 AND id = ?2 AND first_seq IS NULL",
        )
        .ctx("preparing first_seq update")?
        .execute(params![
            logged.session_id,
            logged.event.run_id,
            to_sql_int(logged.seq(), "seq")?
        ])
        .ctx("recording a run's first seq")?;
    }
    Ok(())
}

pub(crate) fn upsert_message(conn: &Connection, message: &Message) -> StoreResult<()> {
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
        "INSERT INTO runs (id, session_id, status, created_at, started_at, ended_at, error, prompt_tokens, completion_tokens,
                           node)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (session_id, id) DO UPDATE SET
             status = excluded.status, started_at = excluded.started_at, ended_at = excluded.ended_at,
             error = excluded.error, prompt_tokens = excluded.prompt_tokens,
             completion_tokens = excluded.completion_tokens, node = excluded.node",
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
        run.node,
    ])
    .ctx("upserting run")?;
    Ok(())
}

pub(crate) fn create_session(conn: &Connection, session: &Session) -> StoreResult<()> {
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

pub(crate) fn create_run(
    conn: &Connection,
    run: &Run,
    client_message_id: Option<&str>,
) -> StoreResult<()> {
    let values = RunValues::of(run)?;
    let result = conn
        .prepare_cached(
            "INSERT INTO runs (id, session_id, status, created_at, started_at, ended_at, error, prompt_tokens,
                               completion_tokens, client_message_id, node)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
            run.node,
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

fn put_alias(conn: &Connection, key: &str, session_id: &str) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO aliases (key, session_id) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET session_id = excluded.session_id",
    )
    .ctx("preparing put_alias")?
    .execute(params![key, session_id])
    .ctx("storing an alias")?;
    Ok(())
}

fn release_client_message_id(conn: &Connection, session_id: &str, run_id: &str) -> StoreResult<()> {
    let changed = conn
        .prepare_cached(
            "UPDATE runs SET client_message_id = NULL WHERE session_id = ?1 AND id = ?2",
        )
        .ctx("preparing client_message_id release")?
        .execute(params![session_id, run_id])
        .ctx("releasing a client_message_id")?;
    if changed == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

fn update_run(conn: &Connection, run: &Run) -> StoreResult<()> {
    let values = RunValues::of(run)?;
    let changed = conn
        .prepare_cached(
            "UPDATE runs SET status = ?3, started_at = ?4, ended_at = ?5, error = ?6, prompt_tokens = ?7,
                             completion_tokens = ?8, node = ?9
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
            run.node,
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
    // Counted only to one past what is kept: a long session's runs are not walked on every prune.
    let total_runs: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM (SELECT 1 FROM runs WHERE session_id = ?1 LIMIT ?2)")
        .ctx("preparing run count")?
        .query_row(params![session_id, keep.saturating_add(1)], |row| {
            row.get(0)
        })
        .ctx("counting runs")?;
    if total_runs <= keep {
        return Ok(());
    }
    // The first stored event of any kept run; none stored means every stored event belongs to older runs.
    let boundary: Option<i64> = tx
        .prepare_cached(
            "SELECT MIN(e.first_seq) FROM events e
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A writer on a fresh database file, and the sending end of its queue.
    fn writer(dir: &std::path::Path) -> (Writer, mpsc::Sender<Command>, Arc<Counters>) {
        let path = dir.join("w.db");
        let mut conn = Connection::open(&path).unwrap();
        crate::schema::configure_writer(&conn).unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        let journal = crate::tail::Journal::open(&path).unwrap();
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let w = Writer::new(
            conn,
            rx,
            Arc::clone(&counters),
            Arc::new(Tail::default()),
            journal.book(),
            Arc::new(Notify::new()),
        );
        (w, tx, counters)
    }

    fn queue<T>(
        tx: &mpsc::Sender<Command>,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> oneshot::Receiver<StoreResult<T>> {
        let (reply, answer) = oneshot::channel();
        tx.try_send(make(reply)).map_err(|_| "queue full").unwrap();
        answer
    }

    #[test]
    fn queued_row_changes_commit_together_and_a_failing_one_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (w, tx, counters) = writer(dir.path());
        let s = agentd_store_contract::session("p");
        let run = Run::queued(&s.id);
        let mut renamed = s.clone();
        renamed.title = Some("renamed".into());
        let orphan = Run::queued("no-such-session");

        let created = queue(&tx, |reply| Command::CreateSession {
            session: s.clone(),
            reply,
        });
        let first = queue(&tx, |reply| Command::CreateRun {
            run: run.clone(),
            client_message_id: Some("m1".into()),
            reply,
        });
        // The same run again: a conflict, undone alone.
        let again = queue(&tx, |reply| Command::CreateRun {
            run: run.clone(),
            client_message_id: None,
            reply,
        });
        let missing = queue(&tx, |reply| Command::CreateRun {
            run: orphan.clone(),
            client_message_id: None,
            reply,
        });
        let updated = queue(&tx, |reply| Command::UpdateSession {
            session: renamed.clone(),
            reply,
        });
        // A command that is not a row change ends the group and is served after it.
        let pruned = queue(&tx, |reply| Command::Prune {
            session_id: s.id.clone(),
            keep_runs: 10,
            reply,
        });
        let released = queue(&tx, |reply| Command::ReleaseClientMessageId {
            session_id: s.id.clone(),
            run_id: run.id.clone(),
            reply,
        });
        drop(tx);
        // Everything is queued before the writer starts: it takes the first command and the row changes
        // behind it as one group.
        std::thread::spawn(move || w.run()).join().unwrap();

        assert!(created.blocking_recv().unwrap().is_ok());
        assert!(first.blocking_recv().unwrap().is_ok());
        assert!(matches!(
            again.blocking_recv().unwrap(),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            missing.blocking_recv().unwrap(),
            Err(StoreError::NotFound)
        ));
        assert!(updated.blocking_recv().unwrap().is_ok());
        assert!(pruned.blocking_recv().unwrap().is_ok());
        assert!(released.blocking_recv().unwrap().is_ok());
        assert_eq!(counters.grouped_commits.load(Ordering::Relaxed), 1);
        assert_eq!(counters.grouped_commands.load(Ordering::Relaxed), 5);

        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        let title: Option<String> = conn
            .query_row("SELECT title FROM sessions WHERE id = ?1", [&s.id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(title.as_deref(), Some("renamed"));
        let runs: Vec<(String, Option<String>)> = conn
            .prepare("SELECT id, client_message_id FROM runs")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // One run (not two, not the orphan), its client message id released by the command after the group.
        assert_eq!(runs, vec![(run.id.clone(), None)]);
    }
}
