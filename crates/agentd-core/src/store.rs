//! The storage seam. One small trait, implemented on SQLite (crate `agentd-sqlite`), PostgreSQL
//! (`agentd-postgres`) and in memory ([`crate::memory`]). The promises below are written down as scenarios in
//! crate `agentd-store-contract`, which every implementation's tests run.
//!
//! Invariants every implementation keeps:
//! - `append_events` assigns each event the next `seq` of its session (from 1, strictly increasing, no gaps),
//!   writes the whole batch in one transaction, and only returns once it is committed. Events whose kind is
//!   `message` also upsert that message; `run_started`, `run_finished` and `input_requested`/`input_received`
//!   carry run changes in [`LogEntry::run`], upserted in the same transaction. So the log and the tables never
//!   disagree, also across a crash.
//! - A call that returns `Ok` has been committed: a process killed right after loses nothing of it.
//! - Uploads (record and bytes) live in the store, so a file id resolves on any node sharing it; a session's
//!   uploads have distinct ids and distinct paths.
//! - The `export_*`/`import_*` methods exist for `agentd copy-store`: an import writes rows as given (ids,
//!   order, `seq`) and leaves the store as if they had been appended there, so numbering goes on after them.
//! - [`StoreError::Unavailable`] means the database cannot be reached right now (a connection refused, lost or
//!   timed out), not that the request was wrong: surfaces answer 503 and the same call may succeed later. From
//!   `append_events` it also promises that nothing of the batch was committed, so the event log may hand the
//!   same batch over again (a store that cannot tell whether a lost commit went through must find out first,
//!   or answer `Other`).

use async_trait::async_trait;
use std::sync::Arc;

use crate::domain::{Message, NodeInfo, Run, Session, SessionStatus, Upload};
use crate::event::{LoggedEvent, NewEvent};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database cannot be reached now (connection refused, lost or timed out); a retry may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Other(String),
    /// This node no longer holds its lease (another node found it lapsed and took its runs over): the store
    /// refuses everything it writes from then on (fencing, SPEC.md section 6).
    #[error("this node lost its lease: {0}")]
    Fenced(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One entry of a group commit: an event, and the run row it changes, if any.
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub event: NewEvent,
    /// Upserted in the same transaction as the event.
    pub run: Option<Run>,
}

impl LogEntry {
    /// Does this entry change a row besides the log: a stored message, or a run? Such entries cost a store more
    /// than a token (a transaction, where a token is an append to a journal), so the event log commits them
    /// beside the token stream rather than in front of it.
    pub fn changes_rows(&self) -> bool {
        self.run.is_some() || self.event.kind.changes_rows()
    }
}

/// Where the events of a session's log start, after retention pruning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogBounds {
    /// The smallest `seq` still stored (0 when the log is empty).
    pub first_seq: u64,
    /// The largest `seq` ever assigned (0 when nothing was ever appended).
    pub last_seq: u64,
}

/// What a turn's prompt is built from ([`Store::history_page`]): a session's newest messages, each with its run's
/// place among the session's runs, the place of the run the turn is for, and how many runs the session has.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistoryPage {
    /// Oldest first; with each, its run's place (`None` for a message of no run, or of a run not stored).
    pub messages: Vec<(Message, Option<i64>)>,
    /// The place of the run asked about (`None` when it is not stored).
    pub own: Option<i64>,
    /// The session's runs, counted up to the bound asked for.
    pub runs: usize,
}

/// A run as stored, with the `client_message_id` it holds (which [`Run`] does not show): what a copy carries.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRun {
    pub run: Run,
    pub client_message_id: Option<String>,
}

/// Which sessions [`Store::search_sessions`] lists: a title containing `query` (ignoring case), a status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub query: Option<String>,
    pub status: Option<SessionStatus>,
}

impl SessionFilter {
    pub fn matches(&self, s: &Session) -> bool {
        if self.status.is_some_and(|st| st != s.status) {
            return false;
        }
        match &self.query {
            None => true,
            Some(q) => s
                .title
                .as_deref()
                .is_some_and(|t| t.to_lowercase().contains(&q.to_lowercase())),
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for the startup line, e.g. `sqlite:data/agentd.db`.
    fn describe(&self) -> String;

    // --- sessions ---
    async fn create_session(&self, session: &Session) -> StoreResult<()>;
    /// Any principal's session; callers check ownership.
    async fn get_session(&self, id: &str) -> StoreResult<Option<Session>>;
    /// Newest first. `principal` None lists everyone's (admin). `before` is a session id: only sessions created
    /// before it are listed.
    async fn list_sessions(
        &self,
        principal: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<Session>>;
    /// Like [`Store::list_sessions`] (newest first, `before` a session id, at most `limit`), keeping only the
    /// sessions `filter` matches. The default reads `list_sessions` in pages and filters them here, so every
    /// store matches titles the same way (Unicode lowercase, which SQLite's `lower()` is not).
    async fn search_sessions(
        &self,
        principal: Option<&str>,
        filter: &SessionFilter,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<Session>> {
        const PAGE: usize = 256;
        let mut out = Vec::new();
        let mut cursor = before.map(str::to_string);
        loop {
            let page = self
                .list_sessions(principal, PAGE, cursor.as_deref())
                .await?;
            let full = page.len() == PAGE;
            cursor = page.last().map(|s| s.id.clone());
            for s in page {
                if filter.matches(&s) {
                    out.push(s);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
        }
    }
    /// Updates title, status, metadata, updated_at.
    async fn update_session(&self, session: &Session) -> StoreResult<()>;

    // --- messages ---
    /// Oldest first.
    async fn list_messages(
        &self,
        session_id: &str,
        limit: Option<usize>,
        offset: usize,
    ) -> StoreResult<Vec<Message>>;

    /// What a turn of run `run_id` builds its prompt from, read at once: the newest `limit` messages of the
    /// session (oldest first), each with its run's place among the session's runs (places only compare: a
    /// later run has a larger one), the run's own place, and the session's runs counted up to
    /// `count_runs_to`. Its cost is bounded by `limit` and `count_runs_to`, not by the session's length.
    async fn history_page(
        &self,
        session_id: &str,
        run_id: &str,
        limit: usize,
        count_runs_to: usize,
    ) -> StoreResult<HistoryPage>;

    // --- aliases (the OpenAI-compatible surfaces) ---
    /// Remembers `key -> session_id` (a stateless chat's continuation, a deleted response); a key put again
    /// names the newer session. Keys are opaque to the store.
    async fn put_alias(&self, _key: &str, _session_id: &str) -> StoreResult<()> {
        Err(StoreError::Other("this store keeps no aliases".into()))
    }
    /// The session `key` names, if it was put.
    async fn find_alias(&self, _key: &str) -> StoreResult<Option<String>> {
        Ok(None)
    }

    // --- runs ---
    /// Inserts a queued run. With `client_message_id`, a second run with the same id in the same session is a
    /// `Conflict`.
    async fn create_run(&self, run: &Run, client_message_id: Option<&str>) -> StoreResult<()>;
    /// Forgets the `client_message_id` of a run (an orphan whose user message was never stored), so a new run
    /// may take it. A no-op for a run without one; `NotFound` for an unknown run.
    async fn release_client_message_id(&self, session_id: &str, run_id: &str) -> StoreResult<()>;
    async fn find_run_by_client_message_id(
        &self,
        session_id: &str,
        client_message_id: &str,
    ) -> StoreResult<Option<Run>>;
    async fn get_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<Run>>;
    /// Oldest first.
    async fn list_runs(&self, session_id: &str) -> StoreResult<Vec<Run>>;
    async fn update_run(&self, run: &Run) -> StoreResult<()>;
    /// Runs in `queued`, `running` or `waiting_input`, oldest first: of one session (run control across
    /// nodes), or of every session with None (the start-up sweep). Its cost follows the unfinished runs, not the
    /// session's history.
    async fn unfinished_runs(&self, session_id: Option<&str>) -> StoreResult<Vec<Run>>;

    // --- the event log ---
    /// Appends a batch (any sessions) in one transaction; returns the events with their `seq`, in input order.
    /// Calls may run concurrently, but never two for the same session: the event log waits for a session's
    /// call to return before it hands over that session's next events, so an implementation may number a call's
    /// events and give the numbers back if it fails, as if it were alone.
    async fn append_events(&self, batch: Vec<LogEntry>) -> StoreResult<Vec<Arc<LoggedEvent>>>;
    /// How long the event log may hold token events to commit more of them at once: it starts a batch of
    /// them at most once per this interval, so under a steady flow each commit carries what came in over it,
    /// while an event that follows a quiet spell goes at once. Zero (the default): never held. A store whose
    /// commit has a high fixed cost (a database transaction with its round trips and WAL flush) sets it.
    fn commit_gather(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Events with `seq > after`, in order, at most `limit`.
    async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Arc<LoggedEvent>>>;
    async fn log_bounds(&self, session_id: &str) -> StoreResult<LogBounds>;
    /// The seq of the first event of `run_id` (its `run_started`, usually), if stored.
    async fn first_seq_of_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<u64>>;
    /// Deletes the events of all but the latest `keep_runs` runs of the session (by run creation order).
    async fn prune_events(&self, session_id: &str, keep_runs: usize) -> StoreResult<()>;

    // --- uploads ---
    /// Stores an upload of a session, its record and its bytes. `NotFound` for an unknown session; `Conflict`
    /// when the session already has an upload with this id or this path.
    async fn put_upload(&self, session_id: &str, upload: &Upload, bytes: &[u8]) -> StoreResult<()>;
    /// An upload's record, if the session has it.
    async fn get_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Upload>>;
    /// An upload's bytes, if the session has it.
    async fn read_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Vec<u8>>>;
    /// The records of a session's uploads, oldest first.
    async fn list_uploads(&self, session_id: &str) -> StoreResult<Vec<Upload>>;

    // --- copying a store (`agentd copy-store`) ---
    /// A session's runs with their `client_message_id`, oldest first.
    async fn export_runs(&self, session_id: &str) -> StoreResult<Vec<StoredRun>>;
    /// Creates `session` with its `messages` and `runs`, as given and in the given order (oldest first), in one
    /// transaction. `Conflict` if the session exists.
    async fn import_session(
        &self,
        session: &Session,
        messages: &[Message],
        runs: &[StoredRun],
    ) -> StoreResult<()>;
    /// Adds `events` (of `session_id`, with consecutive seqs, the first after the session's last) to its log
    /// with their seq as given, and raises the session's last seq to `last_seq` if that is larger than the last
    /// event's (a copy passes 0 with its batches, then the source's last seq with a final empty call: it may
    /// lie past the last stored event), so the next append continues right after it, as on the source. A run's first event recorded here
    /// is its first seq (re-attach). No message or run row is touched. `NotFound` for an unknown session;
    /// `Conflict` when a seq does not continue the log.
    async fn import_events(
        &self,
        session_id: &str,
        events: &[Arc<LoggedEvent>],
        last_seq: u64,
    ) -> StoreResult<()>;

    // --- the nodes of a cluster (SPEC.md section 6) ---
    /// What other nodes commit to the log, as it happens (None: a store one process owns). The event log
    /// reads those ranges and publishes them to its subscribers.
    fn remote_appends(&self) -> Option<tokio::sync::broadcast::Receiver<RemoteAppend>> {
        None
    }
    /// Whether other nodes are alive (so this node's commits must announce themselves to them).
    fn set_peers(&self, _peers: bool) {}
    /// Records that `beat`'s node is alive. The first beat of a process registers it (and so fences any
    /// earlier process under the same node id); a later one renews it, or answers [`StoreError::Fenced`] if
    /// the registry no longer holds this process (another node expelled it, [`Store::expel_lapsed`]). From
    /// the first beat on, every append of this store is fenced: it commits only while the registry holds
    /// the process, checked in the append's own transaction. A store one process owns keeps no registry: the
    /// default does nothing.
    async fn heartbeat(&self, _beat: &NodeBeat) -> StoreResult<()> {
        Ok(())
    }
    /// Takes out of the registry every node whose last heartbeat is older than `within`: from then on their
    /// writes are refused, so their runs may be taken over. Waits for their appends in flight to end.
    async fn expel_lapsed(&self, _within: std::time::Duration) -> StoreResult<()> {
        Ok(())
    }
    /// Cancelled once this store learns that its process was fenced (a beat or an append refused): the
    /// process can write nothing more and must stop. None: a store one process owns, never fenced.
    fn fenced(&self) -> Option<tokio_util::sync::CancellationToken> {
        None
    }
    /// The nodes whose last heartbeat is at most `within` old, each with its unfinished runs counted, and each
    /// with its instance (see [`NodeBeat`]). None: the store keeps no registry (it serves one process).
    async fn live_nodes(
        &self,
        _within: std::time::Duration,
    ) -> StoreResult<Option<Vec<(NodeInfo, String)>>> {
        Ok(None)
    }
    /// Takes the node's process `instance` out of the registry (a graceful stop): other nodes take over what it
    /// leaves at their next sweep instead of waiting for its lease to lapse.
    async fn leave(&self, _node_id: &str, _instance: &str) -> StoreResult<()> {
        Ok(())
    }
    /// Where a new turn of a session executes while other nodes are alive (SPEC.md section 6: one turn per
    /// session across the cluster): inserts the queued `run` as [`Store::create_run`] does, naming as its node
    /// the node of the session's oldest unfinished run, if any, else `run.node`, decided with the session's log
    /// locked (so nodes accepting turns of one session at once agree), and returns that node. None: no other
    /// node is alive, nothing was written, the caller goes on as if alone (a store one process owns: always).
    async fn route_run(
        &self,
        _run: &Run,
        _client_message_id: Option<&str>,
    ) -> StoreResult<Option<String>> {
        Ok(None)
    }
    /// Sends `command` to node `to`, which receives it from its own store's [`Store::commands`]. A store one
    /// process owns has no other node: the default refuses.
    async fn send_command(&self, _to: &str, _command: &NodeCommand) -> StoreResult<()> {
        Err(StoreError::Other(
            "this store serves one process: no other node".into(),
        ))
    }
    /// The commands other nodes send this one (None: a store one process owns).
    fn commands(&self) -> Option<tokio::sync::broadcast::Receiver<NodeCommand>> {
        None
    }
    /// Makes node `to` the one executing the unfinished run `run_id`, if its node is still `from` and `from`
    /// is `to` itself (a restarted node's previous process) or no node live within `within`: true when the
    /// run is `to`'s after the call. Claims are taken one at a time across the cluster, each deciding on what
    /// the ones before it did, so of several nodes trying at once (a restarted node among them), one wins.
    /// Every unfinished run of the session under `from` moves with it, so a session's turns stay on one node.
    /// A store one process owns has nobody to race: the default takes it.
    async fn claim_run(
        &self,
        _session_id: &str,
        _run_id: &str,
        _from: Option<&str>,
        _to: &str,
        _within: std::time::Duration,
    ) -> StoreResult<bool> {
        Ok(true)
    }
}

/// A command for the node executing a run (SPEC.md section 6: commands reach a run wherever it executes):
/// what a client asked of another node.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum NodeCommand {
    /// Cancel the run.
    Cancel { session_id: String, run_id: String },
    /// Start the queued run (another node accepted it; this node holds the session's turn).
    Start { session_id: String, run_id: String },
    /// Answer the run's pending `ask_human` or approval (with `decision`, an approval's); the receiver answers
    /// `Replied` to node `from`.
    Reply {
        session_id: String,
        request_id: String,
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decision: Option<crate::tools::Decision>,
        from: String,
        ticket: String,
    },
    /// How a `Reply` went: the run it answered, or None when no question with that request id was pending.
    Replied {
        ticket: String,
        run_id: Option<String>,
    },
}

/// Events another node committed to a session's log: seqs `first_seq..=last_seq`; or, with an empty session id
/// ([`RemoteAppend::resync`]), word that announcements may have been missed (the store's listening connection
/// was lost), so every session with subscribers must be read again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteAppend {
    pub session_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl RemoteAppend {
    pub fn resync() -> RemoteAppend {
        RemoteAppend {
            session_id: String::new(),
            first_seq: 0,
            last_seq: 0,
        }
    }

    pub fn is_resync(&self) -> bool {
        self.session_id.is_empty()
    }
}

/// A node's heartbeat: who it is, which process (`instance`, new at every start, so a node restarted under the
/// same id is told from its previous process), where it listens, since when.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeBeat {
    pub node_id: String,
    pub instance: String,
    pub listen: String,
    pub started_at: String,
}

/// The check every `import_session` makes before writing: its messages and runs belong to the session.
pub fn check_session_rows(
    session: &Session,
    messages: &[Message],
    runs: &[StoredRun],
) -> StoreResult<()> {
    if let Some(m) = messages.iter().find(|m| m.session_id != session.id) {
        return Err(StoreError::Other(format!(
            "message {} belongs to session {}, not {}",
            m.id, m.session_id, session.id
        )));
    }
    if let Some(r) = runs.iter().find(|r| r.run.session_id != session.id) {
        return Err(StoreError::Other(format!(
            "run {} belongs to session {}, not {}",
            r.run.id, r.run.session_id, session.id
        )));
    }
    Ok(())
}

/// The checks every `import_events` makes before writing: the events belong to the session, their seqs are
/// consecutive and continue the log (`current_last`, the session's last seq; after a gap only when the session
/// stores no event yet, as a copied log whose start was pruned begins), and `last_seq` is not behind them.
/// Returns the session's last seq after the import.
pub fn check_import(
    session_id: &str,
    current_last: u64,
    has_events: bool,
    events: &[Arc<LoggedEvent>],
    last_seq: u64,
) -> StoreResult<u64> {
    let mut last = current_last;
    for (i, e) in events.iter().enumerate() {
        if e.session_id != session_id {
            return Err(StoreError::Other(format!(
                "event {} belongs to session {}, not {session_id}",
                e.seq(),
                e.session_id
            )));
        }
        let continues = e.seq() == last + 1 || (i == 0 && !has_events && e.seq() > last);
        if !continues {
            return Err(StoreError::Conflict(format!(
                "event {} does not continue the log of session {session_id} (its last seq is {last})",
                e.seq()
            )));
        }
        last = e.seq();
    }
    Ok(last_seq.max(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An approval's decision travels to the node running the run inside `Reply`; a `Reply` from a node
    /// without the field (or a question's) reads as no decision.
    #[test]
    fn a_reply_command_carries_a_decision_or_none() {
        let with = NodeCommand::Reply {
            session_id: "s".into(),
            request_id: "r".into(),
            content: String::new(),
            decision: Some(crate::tools::Decision::deny("no")),
            from: "a".into(),
            ticket: "t".into(),
        };
        let json = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<NodeCommand>(&json).unwrap(), with);
        let old = r#"{"command":"reply","session_id":"s","request_id":"r","content":"blue","from":"a","ticket":"t"}"#;
        let NodeCommand::Reply {
            decision, content, ..
        } = serde_json::from_str::<NodeCommand>(old).unwrap()
        else {
            panic!("a reply");
        };
        assert_eq!((decision, content.as_str()), (None, "blue"));
    }
}
