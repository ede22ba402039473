//! agentd-sqlite: the SQLite implementation of [`agentd_core::store::Store`].
//!
//! A tour:
//! - [`SqliteStore`] (this file): opening a database from a path or a `sqlite://` URL, and the `Store` impl,
//!   which sends writes to the writer and runs reads on the reader pool.
//! - `append`: the append path, run by the caller: numbering, the tail file write, hand-off of table changes.
//! - `writer`: the one thread that owns the write connection: rows, table-changing events, ingestion.
//! - `tail`: the log's tail, events durable in an append-only file and in memory until the writer moves them
//!   into the `events` table in bulk; replayed at start-up after a crash.
//! - `reader`: a few read-only connections used from tokio's blocking pool, and the read queries.
//! - `rows`: storage rows and their mapping to domain types; error helpers.
//! - `copy`: uploads (record and bytes), and the exports and imports `agentd copy-store` uses.
//! - `schema`: embedded migrations (`migrations/*.sql`, versioned by `PRAGMA user_version`) and pragmas.
//!
//! Why rusqlite and not an async pool (sqlx): SQLite allows one writer at a time anyway, so the store funnels
//! every write through one dedicated thread that owns a rusqlite connection. That thread sees the whole queue,
//! which gives group commit (many callers' events in one transaction) for free, with no async pool, no
//! per-query task hops and no lock contention between writers. Reads go to their own connections (WAL lets them
//! run beside the writer) on the blocking pool, so SQLite never blocks an async worker thread.
//!
//! Durability: WAL with `synchronous=NORMAL`, and the tail file written without fsync. A call that returned
//! `Ok` is committed and survives the process being killed; it is not fsynced, so an OS crash or power cut can
//! lose the last commits. One process owns a database at a time (a lock file next to it says so).

mod append;
mod background;
mod checkpoint;
mod chunk;
mod copy;
/// For the fuzz targets in `fuzz/` only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod reader;
mod rows;
mod schema;
mod tail;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use agentd_core::domain::{Message, Run, Session, Upload};
use agentd_core::event::LoggedEvent;
use agentd_core::store::{
    HistoryPage, LogBounds, LogEntry, Store, StoreError, StoreResult, StoredRun,
};
use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::append::{AppendState, Appender};
use crate::reader::ReaderPool;
use crate::tail::{Journal, Tail};
use crate::writer::{Command, Counters, Reply, Writer};

/// The SQLite store: one writer thread, a few reader connections. Cheap to share behind an `Arc`.
///
/// Dropping it waits for the writer to finish the commands already queued, so a store that has been dropped
/// has committed everything it accepted and closed its file.
pub struct SqliteStore {
    /// The database file, as given.
    path: PathBuf,
    /// Declared before `writer` so the readers and the checkpointer close first: the writer's connection is then
    /// the last one, and closing it checkpoints the WAL into the main file.
    readers: Arc<ReaderPool>,
    /// Held for its `Drop`, which stops the checkpoint thread before the writer closes.
    _checkpointer: checkpoint::Checkpointer,
    writer: WriterHandle,
    counters: Arc<Counters>,
    /// Events durable in the tail file, not yet in the `events` table (see `tail.rs`).
    tail: Arc<Tail>,
    appender: Appender,
    /// Held (with its lock) while the store is open: a second process on the same database would replay and
    /// delete this one's tail.
    _lock: std::fs::File,
}

/// What the writer has done since the store was opened (for tests, metrics and the benchmark).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// `append_events` calls that committed.
    pub append_calls: u64,
    /// Transactions those calls were committed in; with group commit, at most `append_calls`.
    pub append_commits: u64,
    /// Events those calls appended.
    pub appended_events: u64,
    /// Transactions that moved tail events into the `events` table.
    pub ingest_commits: u64,
    /// Events moved so.
    pub ingested_events: u64,
    /// Transactions that committed several queued row changes together (group commit).
    pub grouped_commits: u64,
    /// Row changes committed so.
    pub grouped_commands: u64,
}

/// The database file a store URL names: `sqlite://relative/path.db`, `sqlite:///absolute/path.db`,
/// `sqlite:path.db`, or a bare path. Any other scheme is an error naming it.
pub fn path_from_url(url: &str) -> Result<PathBuf, StoreError> {
    let path = if let Some(rest) = url.strip_prefix("sqlite://") {
        rest
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest
    } else if let Some((scheme, _)) = url.split_once("://") {
        return Err(StoreError::Other(format!(
            "unsupported store url {url:?}: scheme {scheme:?} is not supported (use sqlite://PATH)"
        )));
    } else {
        url
    };
    if path.is_empty() {
        return Err(StoreError::Other(format!(
            "store url {url:?} names no file"
        )));
    }
    if url.starts_with("sqlite:") && path.contains('?') {
        return Err(StoreError::Other(format!(
            "store url {url:?}: query parameters are not supported"
        )));
    }
    Ok(PathBuf::from(path))
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if missing) and migrates the database at `path`, then
    /// starts the writer thread and the reader connections. Blocking: call it at start-up.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let named = |e: StoreError| match e {
            StoreError::Other(m) => {
                StoreError::Other(format!("sqlite database {}: {m}", path.display()))
            }
            other => other,
        };
        Self::open_inner(path).map_err(named)
    }

    /// [`SqliteStore::open`] on the file a store URL names (see [`path_from_url`]).
    pub fn open_url(url: &str) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(&path_from_url(url)?)
    }

    fn open_inner(path: &Path) -> StoreResult<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Other(format!("creating directory {}: {e}", parent.display()))
            })?;
        }
        // No SQLITE_OPEN_URI: the path is a file name, never a `file:` URI with options.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let lock = lock_database(path)?;
        let mut conn = Connection::open_with_flags(path, flags)
            .map_err(|e| StoreError::Other(format!("opening: {e}")))?;
        schema::configure_writer(&conn)?;
        schema::migrate(&mut conn)?;
        // What the previous process had only in its tail file goes into the table before anyone reads.
        tail::recover(&mut conn, path)?;
        let journal = Journal::open(path)?;
        let book = journal.book();
        let tail = Arc::new(Tail::default());
        let nudge = Arc::new(tokio::sync::Notify::new());
        // Readers open after the writer has made the file a WAL database with the current schema.
        let readers = ReaderPool::open(path)?;
        let checkpointer = checkpoint::Checkpointer::start(path)?;

        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(writer::QUEUE_CAPACITY);
        let appender = Appender {
            state: tokio::sync::Mutex::new(AppendState::new(journal, reader::open_reader(path)?)),
            tail: Arc::clone(&tail),
            counters: Arc::clone(&counters),
            nudge: Arc::clone(&nudge),
        };
        let writer = Writer::new(
            conn,
            rx,
            Arc::clone(&counters),
            Arc::clone(&tail),
            book,
            nudge,
        );
        let thread = std::thread::Builder::new()
            .name("agentd-sqlite-writer".into())
            .spawn(move || {
                background::lower_priority();
                writer.run()
            })
            .map_err(|e| StoreError::Other(format!("starting the writer thread: {e}")))?;
        tracing::debug!(path = %path.display(), version = schema::latest_version(), "sqlite store open");
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: WriterHandle {
                tx: Some(tx),
                thread: Some(thread),
            },
            readers,
            _checkpointer: checkpointer,
            counters,
            tail,
            appender,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer's counters so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            append_calls: self.counters.append_calls.load(Ordering::Relaxed),
            append_commits: self.counters.append_commits.load(Ordering::Relaxed),
            appended_events: self.counters.appended_events.load(Ordering::Relaxed),
            ingest_commits: self.counters.ingest_commits.load(Ordering::Relaxed),
            ingested_events: self.counters.ingested_events.load(Ordering::Relaxed),
            grouped_commits: self.counters.grouped_commits.load(Ordering::Relaxed),
            grouped_commands: self.counters.grouped_commands.load(Ordering::Relaxed),
        }
    }

    /// Events now in the log's tail (durable, not yet in the `events` table).
    pub fn tail_len(&self) -> usize {
        self.tail.len()
    }
}

/// Takes the database's lock file (`<file>.lock`), failing with a clear message if another process has it.
fn lock_database(path: &Path) -> StoreResult<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Other(format!("opening {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Other(
            "the database is in use by another agentd process".into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Other(format!(
            "locking {}: {e}",
            lock_path.display()
        ))),
    }
}

/// The sending side of the writer's queue, and its thread (joined on drop).
struct WriterHandle {
    /// Always `Some` until drop, which takes it to close the queue.
    tx: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl WriterHandle {
    /// Queues a command built around a fresh reply channel and waits for its answer. A caller that stops
    /// waiting does not withdraw the command: once queued it is applied (and its result dropped).
    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> StoreResult<T> {
        let stopped = || StoreError::Other("sqlite writer has stopped".into());
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        tx.send(command(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop once it has served what is already queued (bounded by the
        // queue's capacity), so this join is short.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("sqlite writer thread panicked");
            }
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    async fn create_session(&self, session: &Session) -> StoreResult<()> {
        let session = session.clone();
        self.writer
            .call(|reply| Command::CreateSession { session, reply })
            .await
    }

    async fn get_session(&self, id: &str) -> StoreResult<Option<Session>> {
        let id = id.to_string();
        self.readers
            .point(move |conn| reader::get_session(conn, &id))
            .await
    }

    async fn list_sessions(
        &self,
        principal: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<Session>> {
        let principal = principal.map(str::to_string);
        let before = before.map(str::to_string);
        self.readers
            .run(move |conn| {
                reader::list_sessions(conn, principal.as_deref(), limit, before.as_deref())
            })
            .await
    }

    async fn update_session(&self, session: &Session) -> StoreResult<()> {
        let session = session.clone();
        self.writer
            .call(|reply| Command::UpdateSession { session, reply })
            .await
    }

    async fn list_messages(
        &self,
        session_id: &str,
        limit: Option<usize>,
        offset: usize,
    ) -> StoreResult<Vec<Message>> {
        let session_id = session_id.to_string();
        self.readers
            .run(move |conn| reader::list_messages(conn, &session_id, limit, offset))
            .await
    }

    async fn history_page(
        &self,
        session_id: &str,
        run_id: &str,
        limit: usize,
        count_runs_to: usize,
    ) -> StoreResult<HistoryPage> {
        let (session_id, run_id) = (session_id.to_string(), run_id.to_string());
        self.readers
            .run(move |conn| reader::history_page(conn, &session_id, &run_id, limit, count_runs_to))
            .await
    }

    async fn create_run(&self, run: &Run, client_message_id: Option<&str>) -> StoreResult<()> {
        let run = run.clone();
        let client_message_id = client_message_id.map(str::to_string);
        self.writer
            .call(|reply| Command::CreateRun {
                run,
                client_message_id,
                reply,
            })
            .await
    }

    async fn release_client_message_id(&self, session_id: &str, run_id: &str) -> StoreResult<()> {
        let session_id = session_id.to_string();
        let run_id = run_id.to_string();
        self.writer
            .call(|reply| Command::ReleaseClientMessageId {
                session_id,
                run_id,
                reply,
            })
            .await
    }

    async fn find_run_by_client_message_id(
        &self,
        session_id: &str,
        client_message_id: &str,
    ) -> StoreResult<Option<Run>> {
        let session_id = session_id.to_string();
        let client_message_id = client_message_id.to_string();
        self.readers
            .point(move |conn| {
                reader::find_run_by_client_message_id(conn, &session_id, &client_message_id)
            })
            .await
    }

    async fn get_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<Run>> {
        let session_id = session_id.to_string();
        let run_id = run_id.to_string();
        self.readers
            .point(move |conn| reader::get_run(conn, &session_id, &run_id))
            .await
    }

    async fn list_runs(&self, session_id: &str) -> StoreResult<Vec<Run>> {
        let session_id = session_id.to_string();
        self.readers
            .run(move |conn| reader::list_runs(conn, &session_id))
            .await
    }

    async fn update_run(&self, run: &Run) -> StoreResult<()> {
        let run = run.clone();
        self.writer
            .call(|reply| Command::UpdateRun { run, reply })
            .await
    }

    async fn unfinished_runs(&self, session_id: Option<&str>) -> StoreResult<Vec<Run>> {
        match session_id {
            // A session has a few unfinished runs at most: a point read.
            Some(id) => {
                let id = id.to_string();
                self.readers
                    .point(move |conn| reader::unfinished_runs_of(conn, &id))
                    .await
            }
            None => self.readers.run(reader::unfinished_runs).await,
        }
    }

    async fn append_events(&self, batch: Vec<LogEntry>) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.appender
            .append(batch, |work| {
                self.writer
                    .call(|reply| Command::CommitSync { work, reply })
            })
            .await
    }

    async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        // The tail first, then the table (see `tail.rs`): an event the writer moves in between is in both,
        // and `merge` keeps one.
        let recent = self.tail.read(session_id, after, limit);
        // Everything after `after` is in the tail: a live subscriber catching up never touches SQLite.
        if recent.first().is_some_and(|e| e.seq() == after + 1) {
            return Ok(recent);
        }
        let session_id = session_id.to_string();
        self.readers
            .run(move |conn| {
                let stored = reader::read_events(conn, &session_id, after, limit)?;
                Ok(tail::merge(stored, recent, limit))
            })
            .await
    }

    async fn log_bounds(&self, session_id: &str) -> StoreResult<LogBounds> {
        let recent = self.tail.bounds(session_id);
        let session_id = session_id.to_string();
        let stored = self
            .readers
            .point(move |conn| reader::log_bounds(conn, &session_id))
            .await?;
        Ok(match recent {
            None => stored,
            Some((first, last)) => LogBounds {
                first_seq: if stored.first_seq == 0 {
                    first
                } else {
                    stored.first_seq
                },
                last_seq: stored.last_seq.max(last),
            },
        })
    }

    async fn first_seq_of_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<u64>> {
        let session_id = session_id.to_string();
        let run_id = run_id.to_string();
        self.readers
            .run(move |conn| reader::first_seq_of_run(conn, &session_id, &run_id))
            .await
    }

    async fn prune_events(&self, session_id: &str, keep_runs: usize) -> StoreResult<()> {
        let session_id = session_id.to_string();
        self.writer
            .call(|reply| Command::Prune {
                session_id,
                keep_runs,
                reply,
            })
            .await
    }

    async fn put_upload(&self, session_id: &str, upload: &Upload, bytes: &[u8]) -> StoreResult<()> {
        let (session_id, upload, bytes) = (session_id.to_string(), upload.clone(), bytes.to_vec());
        self.writer
            .call(|reply| Command::PutUpload {
                session_id,
                upload,
                bytes,
                reply,
            })
            .await
    }

    async fn put_alias(&self, key: &str, session_id: &str) -> StoreResult<()> {
        let (key, session_id) = (key.to_string(), session_id.to_string());
        self.writer
            .call(|reply| Command::PutAlias {
                key,
                session_id,
                reply,
            })
            .await
    }

    async fn find_alias(&self, key: &str) -> StoreResult<Option<String>> {
        let key = key.to_string();
        self.readers
            .point(move |conn| copy::find_alias(conn, &key))
            .await
    }

    async fn get_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Upload>> {
        let (session_id, id) = (session_id.to_string(), id.to_string());
        self.readers
            .run(move |conn| copy::get_upload(conn, &session_id, &id))
            .await
    }

    async fn read_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let (session_id, id) = (session_id.to_string(), id.to_string());
        self.readers
            .run(move |conn| copy::read_upload(conn, &session_id, &id))
            .await
    }

    async fn list_uploads(&self, session_id: &str) -> StoreResult<Vec<Upload>> {
        let session_id = session_id.to_string();
        self.readers
            .run(move |conn| copy::list_uploads(conn, &session_id))
            .await
    }

    async fn export_runs(&self, session_id: &str) -> StoreResult<Vec<StoredRun>> {
        let session_id = session_id.to_string();
        self.readers
            .run(move |conn| copy::export_runs(conn, &session_id))
            .await
    }

    async fn import_session(
        &self,
        session: &Session,
        messages: &[Message],
        runs: &[StoredRun],
    ) -> StoreResult<()> {
        let (session, messages, runs) = (session.clone(), messages.to_vec(), runs.to_vec());
        self.writer
            .call(|reply| Command::ImportSession {
                session,
                messages,
                runs,
                reply,
            })
            .await
    }

    async fn import_events(
        &self,
        session_id: &str,
        events: &[Arc<LoggedEvent>],
        last_seq: u64,
    ) -> StoreResult<()> {
        // Holding the append state keeps appends out while the log changes under its cache; the session's
        // cached last seq is then forgotten, so its next append numbers on from the imported log.
        let mut state = self.appender.state.lock().await;
        let result = self
            .writer
            .call(|reply| Command::ImportEvents {
                session_id: session_id.to_string(),
                events: events.to_vec(),
                last_seq,
                reply,
            })
            .await;
        state.forget(session_id);
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn urls_name_files() {
        assert_eq!(
            path_from_url("sqlite://data/agentd.db").unwrap(),
            PathBuf::from("data/agentd.db")
        );
        assert_eq!(
            path_from_url("sqlite:///var/lib/a.db").unwrap(),
            PathBuf::from("/var/lib/a.db")
        );
        assert_eq!(path_from_url("sqlite:a.db").unwrap(), PathBuf::from("a.db"));
        assert_eq!(
            path_from_url("data/x.db").unwrap(),
            PathBuf::from("data/x.db")
        );
        let err = path_from_url("postgres://localhost/agentd")
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres"), "{err}");
        assert!(path_from_url("sqlite://").is_err());
        assert!(path_from_url("sqlite://a.db?mode=rwc").is_err());
    }
}
