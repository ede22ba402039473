//! The append path: numbering events and making them durable, run by the caller of `append_events` itself.
//!
//! The token stream never leaves the caller's thread: its events are numbered from an in-memory cache of each
//! session's last seq, written to the log's tail file with one `write` per call (no fsync; see `tail.rs`) and
//! added to the in-memory tail, all in a few microseconds and without a hand-off to another thread, which on a
//! busy core would cost a scheduling delay each way. Only a call carrying events that change other rows
//! (a message, a run) waits for the writer thread, which commits those with their sessions' tails in one
//! transaction.
//!
//! One call at a time holds the append state while it numbers and writes the tail, so numbering is a plain
//! counter. A call that waits for the writer lets go of it first: other sessions' tokens go on meanwhile. The
//! event log never has two calls out for one session (see `Store::append_events`), so a failed commit can give
//! its sessions' seqs back without anyone having numbered past them, and a failed batch never leaves a gap.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use agentd_core::domain::Run;
use agentd_core::event::{Event, EventKind, LoggedEvent, NewEvent};
use agentd_core::store::{LogEntry, StoreError, StoreResult};
use rusqlite::Connection;
use tokio::sync::Notify;

use crate::tail::{stored_last_seq, Journal, Tail};
use crate::writer::{Counters, SESSION_TAIL_CAP, TAIL_CAP};

/// Sessions whose last seq the cache remembers; past this, sessions with nothing in the tail are forgotten
/// (they reload from the database on their next append).
const MAX_CACHED_SESSIONS: usize = 100_000;

/// An event numbered by the append path, with the run row it changes, if any.
pub(crate) struct Numbered {
    pub(crate) event: Arc<LoggedEvent>,
    pub(crate) run: Option<Run>,
}

impl Numbered {
    /// Does this entry change a table besides the log (a message, a run)? Such entries commit to SQLite with
    /// their session's tail, never through the tail file.
    pub(crate) fn changes_tables(&self) -> bool {
        self.run.is_some() || self.event.event.kind.changes_rows()
    }
}

/// What one append call needs exclusively.
pub(crate) struct AppendState {
    /// Last assigned seq per session. Authoritative: the database lags behind it by the tail.
    last_seq: HashMap<String, u64>,
    journal: Journal,
    /// A read connection for a session's last seq on its first append since start-up.
    conn: Connection,
}

impl AppendState {
    pub(crate) fn new(journal: Journal, conn: Connection) -> AppendState {
        AppendState {
            last_seq: HashMap::new(),
            journal,
            conn,
        }
    }
}

impl AppendState {
    /// Forgets a session's cached last seq: the next append reads it from the database (after an import).
    pub(crate) fn forget(&mut self, session_id: &str) {
        self.last_seq.remove(session_id);
    }
}

/// The shared parts the append path works with.
pub(crate) struct Appender {
    pub(crate) state: tokio::sync::Mutex<AppendState>,
    pub(crate) tail: Arc<Tail>,
    pub(crate) counters: Arc<Counters>,
    /// Wakes the writer thread when a tail grew past its cap.
    pub(crate) nudge: Arc<Notify>,
}

/// What the writer must commit for a call with table-changing events: those sessions' events of the call.
pub(crate) type SyncWork = (Vec<String>, Vec<Numbered>);

impl Appender {
    /// Numbers and stores one batch. `commit` hands table-changing work to the writer thread and waits for it.
    pub(crate) async fn append<F, Fut>(
        &self,
        batch: Vec<LogEntry>,
        commit: F,
    ) -> StoreResult<Vec<Arc<LoggedEvent>>>
    where
        F: FnOnce(SyncWork) -> Fut,
        Fut: std::future::Future<Output = StoreResult<()>>,
    {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        if state.last_seq.len() > MAX_CACHED_SESSIONS {
            let tail = &self.tail;
            state.last_seq.retain(|session, _| tail.has(session));
        }
        // Cache values before this call, to give the seqs back if it fails.
        let mut before: HashMap<String, Option<u64>> = HashMap::new();
        let numbered = match number(&state.conn, &mut state.last_seq, &mut before, batch) {
            Ok(n) => n,
            Err(e) => {
                restore(&mut state.last_seq, before);
                return Err(e);
            }
        };
        let sync: HashSet<String> = numbered
            .iter()
            .filter(|n| n.changes_tables())
            .map(|n| n.event.session_id.clone())
            .collect();

        // The token stream: one write to the tail file, then into the in-memory tail for readers.
        let plain: Vec<Arc<LoggedEvent>> = numbered
            .iter()
            .filter(|n| !sync.contains(n.event.session_id.as_str()))
            .map(|n| Arc::clone(&n.event))
            .collect();
        if !plain.is_empty() {
            for ev in &plain {
                state.journal.push(ev);
            }
            match state.journal.write(plain.len()) {
                Ok(segment) => {
                    let full = self.tail.push(&plain, segment, SESSION_TAIL_CAP);
                    if full || self.tail.len() > TAIL_CAP {
                        self.nudge.notify_one();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "event log tail write failed");
                    restore(&mut state.last_seq, before);
                    return Err(e);
                }
            }
        }
        let events: Vec<Arc<LoggedEvent>> = numbered.iter().map(|n| Arc::clone(&n.event)).collect();

        // Sessions whose rows change: their events of this call commit with their tails, on the writer. The
        // state is free meanwhile: no one numbers these sessions until this call returns.
        if !sync.is_empty() {
            drop(guard);
            let sessions: Vec<String> = sync.iter().cloned().collect();
            let work: Vec<Numbered> = numbered
                .into_iter()
                .filter(|n| sync.contains(n.event.session_id.as_str()))
                .collect();
            if let Err(e) = commit((sessions.clone(), work)).await {
                // Only those sessions' events of this call are lost; their seqs are given back.
                let undo = before
                    .into_iter()
                    .filter(|(s, _)| sessions.contains(s))
                    .collect();
                restore(&mut self.state.lock().await.last_seq, undo);
                return Err(e);
            }
        }
        self.counters.append_calls.fetch_add(1, Ordering::Relaxed);
        self.counters.append_commits.fetch_add(1, Ordering::Relaxed);
        self.counters
            .appended_events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(events)
    }
}

/// Puts cache entries back as they were.
fn restore(cache: &mut HashMap<String, u64>, before: HashMap<String, Option<u64>>) {
    for (session, previous) in before {
        match previous {
            Some(seq) => cache.insert(session, seq),
            None => cache.remove(&session),
        };
    }
}

/// Numbers a batch's entries, checking each.
fn number(
    conn: &Connection,
    cache: &mut HashMap<String, u64>,
    before: &mut HashMap<String, Option<u64>>,
    batch: Vec<LogEntry>,
) -> StoreResult<Vec<Numbered>> {
    let mut out = Vec::with_capacity(batch.len());
    for LogEntry { event, run } in batch {
        let NewEvent {
            session_id,
            run_id,
            agent,
            is_subagent,
            kind,
        } = event;
        if let EventKind::Message { message } = &kind {
            same_session(&session_id, &message.session_id, "message", &message.id)?;
        }
        if let Some(run) = &run {
            same_session(&session_id, &run.session_id, "run", &run.id)?;
        }
        // The hot path (a cached session) hashes the id once and copies nothing.
        let seq = match cache.get_mut(&session_id) {
            Some(last) => {
                if !before.contains_key(&session_id) {
                    before.insert(session_id.clone(), Some(*last));
                }
                *last += 1;
                *last
            }
            None => {
                let last = load_last_seq(conn, &session_id)?;
                before.insert(session_id.clone(), None);
                cache.insert(session_id.clone(), last + 1);
                last + 1
            }
        };
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
        out.push(Numbered {
            event: Arc::new(logged),
            run,
        });
    }
    Ok(out)
}

/// The session's last seq as the database knows it; `NotFound` if the session does not exist. Only asked for
/// sessions with nothing in the tail, so the database is up to date for them.
fn load_last_seq(conn: &Connection, session_id: &str) -> StoreResult<u64> {
    stored_last_seq(conn, session_id)?.ok_or(StoreError::NotFound)
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
