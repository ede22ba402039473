//! agentd-postgres: the PostgreSQL implementation of [`agentd_core::store::Store`].
//!
//! A tour:
//! - [`PgStore`] (this file): opening a database from a `postgres://` URL (connect, migrate, pool), and the
//!   `Store` impl: each call is a few pipelined statements on a pooled connection.
//! - `append`: the append path: numbering in the commit, one transaction per group, two round trips.
//! - `rows`: storage rows and their mapping to domain types; error helpers.
//! - `copy`: uploads (record and bytes), and the exports and imports `agentd copy-store` uses.
//! - `schema`: embedded migrations (`migrations/*.sql`, versioned in `agentd_schema`), applied under an
//!   advisory lock so nodes starting together are safe.
//!
//! Why tokio-postgres with deadpool: the store is async end to end (no blocking pool, no thread per
//! connection), statements are plain SQL prepared once per connection and cached (no compile-time query
//! macros that need a database at build time), and tokio-postgres pipelines: statements issued together go
//! out in one write and their answers come back in one read, which is what makes a group commit two round
//! trips however many sessions and rows it touches. deadpool adds a small bounded pool
//! (`store.max_connections`) with a per-connection statement cache, and nothing else.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use agentd_core::domain::{Message, NodeInfo, Run, Session, Upload};
use agentd_core::event::LoggedEvent;
use agentd_core::store::{
    HistoryPage, LogBounds, LogEntry, NodeBeat, NodeCommand, RemoteAppend, Store, StoreError,
    StoreResult, StoredRun,
};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::future::join;
use tokio_postgres::config::Host;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

mod append;
mod commands;
mod copy;
mod health;
mod lease;
mod notify;
mod rows;
mod schema;

use rows::{
    col, from_sql_int, message_columns, message_from_row, pg, run_columns, run_from_row,
    session_columns, session_from_row, sql_limit, to_json, to_sql_int, violation, RunValues,
    Violation, INSERT_RUN,
};

/// How long opening a connection may take before it counts as failed (unless the URL sets `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a pooled connection may sit inside a transaction waiting for its client (an append's two round
/// trips are one network round trip apart).
const IDLE_IN_TRANSACTION_MS: u64 = 3000;
/// How long a call waits for a free pooled connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How long the pool waits for a fresh connection or a check of an idle one.
const POOL_CREATE: Duration = Duration::from_secs(10);
const POOL_RECYCLE: Duration = Duration::from_secs(5);

/// The default of `store.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// Does this store URL name a PostgreSQL database?
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The store on a PostgreSQL database.
pub struct PgStore {
    pool: Pool,
    /// The URL without its password.
    name: String,
    /// Reachable or not, and the log lines an outage gets.
    health: Arc<health::Health>,
    /// Live events across nodes: what this store's commits announce and what it hears of others'.
    notifier: Arc<notify::Notifier>,
    /// The registered process every append is fenced on (see `lease`).
    lease: Arc<lease::Lease>,
    /// Commands other nodes sent this one (see `commands`).
    commands: tokio::sync::broadcast::Sender<NodeCommand>,
}

/// A session's unfinished runs, in order, through the partial index `runs_unfinished_by_session`.
pub const UNFINISHED_RUNS_OF: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE session_id = $1 AND status IN ('queued', 'running', 'waiting_input') ORDER BY ord"
);

/// Claims are taken one at a time across the cluster (the lock is the transaction's).
const CLAIM_LOCK: &str = "SELECT pg_advisory_xact_lock(7401590317262415)";

/// Moves every unfinished run of session `$1` under node `$2` to node `$3`, if `$2` is `$3` (a restarted node's
/// previous process) or no node that beat within `$4` seconds.
const CLAIM_RUNS: &str = "
UPDATE runs SET node = $3::text
WHERE session_id = $1 AND node IS NOT DISTINCT FROM $2::text
  AND status IN ('queued', 'running', 'waiting_input')
  AND ($2::text IS NULL OR $2::text = $3::text
       OR NOT EXISTS (SELECT 1 FROM nodes
                      WHERE node_id = $2::text AND last_seen > now() - make_interval(secs => $4)))";

/// Which node a run is under, once unfinished (no row: ended).
const CLAIMED: &str = "
SELECT node FROM runs WHERE session_id = $1 AND id = $2 AND status IN ('queued', 'running', 'waiting_input')";

/// [`rows::INSERT_RUN`] with the node of the session's oldest unfinished run, if any, in place of `$11`.
const ROUTE_RUN: &str = "
INSERT INTO runs (session_id, id, status, created_at, started_at, ended_at,
                  error, prompt_tokens, completion_tokens, client_message_id, node)
SELECT $1::text, $2::text, $3::text, $4::text, $5::text, $6::text, $7::text, $8::int8, $9::int8, $10::text,
       COALESCE((SELECT r.node FROM runs r
                 WHERE r.session_id = $1::text AND r.node IS NOT NULL
                   AND r.status IN ('queued', 'running', 'waiting_input')
                 ORDER BY r.ord LIMIT 1), $11::text)
RETURNING node";

/// How long the event log may gather token events into one Postgres commit. A commit costs this store a
/// transaction (two round trips, the backend's work, a WAL flush) whatever it carries, so a light steady flow
/// committed as it comes (an event or two per transaction) cost several times SQLite's CPU per token. Two
/// milliseconds groups 200 streams of 20 tokens/s into about eight events a commit, and adds at most that to
/// a token's delivery (BENCHMARKS.md, "agentd on PostgreSQL").
pub const COMMIT_GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// A parsed store URL and its printable form (user, hosts, ports and database; never the password).
struct Target {
    config: tokio_postgres::Config,
    name: String,
}

impl Target {
    fn parse(url: &str) -> StoreResult<Target> {
        if !is_postgres_url(url) {
            return Err(StoreError::Other(
                "a postgres store url starts with postgres:// or postgresql://".into(),
            ));
        }
        // The parser's errors name an option or a value's problem, never the URL (which may hold a password).
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Other(format!("invalid postgres url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("agentd");
        }
        let name = printable(&config);
        Ok(Target { config, name })
    }
}

/// `postgres://user@host:port/database`: what a log line or an error may show of a URL.
fn printable(config: &tokio_postgres::Config) -> String {
    let mut out = String::from("postgres://");
    if let Some(user) = config.get_user() {
        let _ = write!(out, "{user}@");
    }
    let ports = config.get_ports();
    for (i, host) in config.get_hosts().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match host {
            Host::Tcp(h) => out.push_str(h),
            Host::Unix(p) => out.push_str(&p.display().to_string()),
        }
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let _ = write!(out, ":{port}");
    }
    let db = config.get_dbname().or(config.get_user()).unwrap_or("");
    let _ = write!(out, "/{db}");
    out
}

impl PgStore {
    /// Connects to the database a `postgres://` URL names, brings its schema up to date (safely when other
    /// nodes do the same at once), and opens a pool of at most `max_connections`. Errors name the database
    /// (never the password) and the cause.
    pub async fn open(url: &str, max_connections: usize) -> StoreResult<PgStore> {
        let target = Target::parse(url)?;
        let named = |e: StoreError| match e {
            StoreError::Other(m) => StoreError::Other(format!("{}: {m}", target.name)),
            other => other,
        };
        Self::open_inner(&target, max_connections.max(1))
            .await
            .map_err(named)
    }

    async fn open_inner(target: &Target, max_connections: usize) -> StoreResult<PgStore> {
        let (mut client, connection) = target
            .config
            .connect(NoTls)
            .await
            .map_err(|e| StoreError::Other(format!("cannot connect: {}", cause(&e))))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres migration connection ended");
            }
        });
        let migrated = schema::migrate(&mut client).await;
        drop(client);
        let _ = driver.await;
        migrated?;

        // A transaction left open by a node that froze between an append's two round trips would hold its
        // sessions' counters and its registry row (so its expulsion) until it woke: the server ends it.
        let mut pooled = target.config.clone();
        let options = match pooled.get_options() {
            Some(o) => {
                format!("{o} -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}")
            }
            None => format!("-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"),
        };
        pooled.options(&options);
        let manager = Manager::from_config(
            pooled,
            NoTls,
            ManagerConfig {
                // A connection the server closed is noticed here; a transaction is never left open on one (the
                // append path finishes on its own task), so no per-checkout query is needed.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_CREATE))
            .recycle_timeout(Some(POOL_RECYCLE))
            .build()
            .map_err(|e| StoreError::Other(format!("creating the connection pool: {e}")))?;
        tracing::debug!(database = %target.name, version = schema::latest_version(), max_connections, "postgres store open");
        let (notes, noted) = tokio::sync::mpsc::channel(commands::QUEUE);
        let notifier = notify::Notifier::new(notes);
        let lease: Arc<lease::Lease> = Arc::default();
        let (commands, _) = tokio::sync::broadcast::channel(commands::QUEUE);
        commands::take(pool.clone(), lease.clone(), noted, commands.clone());
        notify::listen(target.config.clone(), &notifier);
        Ok(PgStore {
            pool,
            name: target.name.clone(),
            health: Arc::new(health::Health::new(target.name.clone())),
            notifier,
            lease,
            commands,
        })
    }

    /// The database, as `postgres://user@host:port/database`.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn client(&self) -> StoreResult<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| self.health.failed(rows::pool(e)))
    }

    /// Runs one cached statement and returns its rows.
    async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Vec<tokio_postgres::Row>> {
        let client = self.client().await?;
        let rows = match client.prepare_cached(sql).await {
            Ok(stmt) => client.query(&stmt, params).await.map_err(|e| pg(what, e)),
            Err(e) => Err(pg(&format!("preparing {what}"), e)),
        };
        self.health.note(rows)
    }

    /// Runs one cached statement and returns the number of rows it changed.
    async fn execute(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Failure> {
        let client = self.client().await.map_err(Failure::Store)?;
        let stmt = match client.prepare_cached(sql).await {
            Ok(stmt) => stmt,
            Err(e) => {
                return Err(Failure::Store(
                    self.health.failed(pg(&format!("preparing {what}"), e)),
                ))
            }
        };
        match client.execute(&stmt, params).await {
            Ok(n) => {
                self.health.reachable();
                Ok(n)
            }
            Err(e) => {
                if rows::is_connection_error(&e) {
                    // As `Unavailable`, whatever the caller would make of its SQLSTATE.
                    return Err(Failure::Store(self.health.failed(pg(what, e))));
                }
                self.health.reachable();
                Err(Failure::Pg(e))
            }
        }
    }
}

/// A failed `execute`: the statement's own error (to look at its SQLSTATE) or any other.
enum Failure {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

/// The innermost useful description of a connection error ("Connection refused (os error 111)", "FATAL:
/// database \"x\" does not exist").
fn cause(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    rows::chain(e)
}

#[async_trait]
impl Store for PgStore {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn create_session(&self, session: &Session) -> StoreResult<()> {
        let client = self.client().await?;
        copy::insert_session(&client, session).await
    }

    async fn get_session(&self, id: &str) -> StoreResult<Option<Session>> {
        let rows = self
            .query(
                "reading a session",
                concat!(
                    "SELECT ",
                    session_columns!(),
                    " FROM sessions WHERE id = $1"
                ),
                &[&id],
            )
            .await?;
        rows.first().map(session_from_row).transpose()
    }

    async fn list_sessions(
        &self,
        principal: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<Session>> {
        let limit = sql_limit(Some(limit));
        // One statement per shape, so each can use its index.
        let rows = match (principal, before) {
            (None, None) => {
                self.query(
                    "listing sessions",
                    concat!("SELECT ", session_columns!(), " FROM sessions ORDER BY ord DESC LIMIT $1"),
                    &[&limit],
                )
                .await
            }
            (Some(p), None) => {
                self.query(
                    "listing sessions",
                    concat!(
                        "SELECT ",
                        session_columns!(),
                        " FROM sessions WHERE principal = $1 ORDER BY ord DESC LIMIT $2"
                    ),
                    &[&p, &limit],
                )
                .await
            }
            (None, Some(b)) => {
                self.query(
                    "listing sessions",
                    concat!(
                        "SELECT ",
                        session_columns!(),
                        " FROM sessions WHERE ord < (SELECT ord FROM sessions WHERE id = $1)",
                        " ORDER BY ord DESC LIMIT $2"
                    ),
                    &[&b, &limit],
                )
                .await
            }
            (Some(p), Some(b)) => {
                self.query(
                    "listing sessions",
                    concat!(
                        "SELECT ",
                        session_columns!(),
                        " FROM sessions WHERE principal = $1 AND ord < (SELECT ord FROM sessions WHERE id = $2)",
                        " ORDER BY ord DESC LIMIT $3"
                    ),
                    &[&p, &b, &limit],
                )
                .await
            }
        }?;
        rows.iter().map(session_from_row).collect()
    }

    async fn update_session(&self, session: &Session) -> StoreResult<()> {
        let metadata = to_json(&session.metadata, "metadata")?;
        let changed = self
            .execute(
                "updating a session",
                "UPDATE sessions SET title = $2, status = $3, metadata = $4, updated_at = $5 WHERE id = $1",
                &[
                    &session.id,
                    &session.title,
                    &session.status.as_str(),
                    &metadata,
                    &session.updated_at,
                ],
            )
            .await
            .map_err(|f| f.into_store("updating a session"))?;
        if changed == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn list_messages(
        &self,
        session_id: &str,
        limit: Option<usize>,
        offset: usize,
    ) -> StoreResult<Vec<Message>> {
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "listing messages",
                concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE session_id = $1 ORDER BY ord LIMIT $2 OFFSET $3"
                ),
                &[&session_id, &sql_limit(limit), &offset],
            )
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn history_page(
        &self,
        session_id: &str,
        run_id: &str,
        limit: usize,
        count_runs_to: usize,
    ) -> StoreResult<HistoryPage> {
        let rows = self
            .query(
                "reading a turn's history",
                concat!(
                    "SELECT ",
                    message_columns!(),
                    // Named, and the order qualified: an output column named `ord` would be what
                    // `ORDER BY ord` sorts by.
                    ", (SELECT r.ord FROM runs r WHERE r.session_id = $1 AND r.id = messages.run_id) AS place",
                    " FROM messages WHERE session_id = $1 ORDER BY messages.ord DESC LIMIT $2"
                ),
                &[&session_id, &sql_limit(Some(limit))],
            )
            .await?;
        let messages = rows
            .iter()
            .rev()
            .map(|row| Ok((message_from_row(row)?, col::<Option<i64>>(row, 10)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        let rows = self
            .query(
                "counting a session's runs",
                "SELECT (SELECT ord FROM runs WHERE session_id = $1 AND id = $2), \
                 (SELECT count(*) FROM (SELECT 1 FROM runs WHERE session_id = $1 LIMIT $3) c)",
                &[&session_id, &run_id, &sql_limit(Some(count_runs_to))],
            )
            .await?;
        let (own, runs) = match rows.first() {
            Some(row) => (col::<Option<i64>>(row, 0)?, col::<i64>(row, 1)?),
            None => (None, 0),
        };
        Ok(HistoryPage {
            messages,
            own,
            runs: usize::try_from(runs).unwrap_or(0),
        })
    }

    async fn create_run(&self, run: &Run, client_message_id: Option<&str>) -> StoreResult<()> {
        let values = RunValues::of(run)?;
        let result = self
            .execute(
                "inserting a run",
                INSERT_RUN,
                &values.insert_params(run, &client_message_id),
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(Failure::Pg(e)) => Err(run_insert_failed("inserting a run", run, e)),
            Err(Failure::Store(e)) => Err(e),
        }
    }

    async fn route_run(
        &self,
        run: &Run,
        client_message_id: Option<&str>,
    ) -> StoreResult<Option<String>> {
        if !self.notifier.has_peers() {
            return Ok(None);
        }
        let values = RunValues::of(run)?;
        let client = self.client().await?;
        // Pipelined, one round trip: the session's counter locked (as an append locks it), then, in a statement
        // of its own (so its snapshot is taken once the lock is held), the row inserted with its node.
        let lock = client
            .prepare_cached("SELECT 1 FROM session_seqs WHERE session_id = $1 FOR NO KEY UPDATE")
            .await
            .map_err(|e| pg("routing a run", e))?;
        let insert = client
            .prepare_cached(ROUTE_RUN)
            .await
            .map_err(|e| pg("routing a run", e))?;
        let params = values.insert_params(run, &client_message_id);
        let (((begun, locked), inserted), committed) = join(
            join(
                join(
                    client.batch_execute("BEGIN"),
                    client.query(&lock, &[&run.session_id]),
                ),
                client.query(&insert, &params),
            ),
            client.batch_execute("COMMIT"),
        )
        .await;
        let outcome = begun
            .and(locked)
            .and(inserted)
            .and_then(|rows| committed.map(|()| rows));
        match outcome {
            Ok(rows) => match rows.first() {
                Some(row) => Ok(Some(col(row, 0)?)),
                None => Err(StoreError::Other("routing a run returned no node".into())),
            },
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(run_insert_failed("routing a run", run, e))
            }
        }
    }

    async fn release_client_message_id(&self, session_id: &str, run_id: &str) -> StoreResult<()> {
        let changed = self
            .execute(
                "releasing a client_message_id",
                "UPDATE runs SET client_message_id = NULL WHERE session_id = $1 AND id = $2",
                &[&session_id, &run_id],
            )
            .await
            .map_err(|f| f.into_store("releasing a client_message_id"))?;
        if changed == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn find_run_by_client_message_id(
        &self,
        session_id: &str,
        client_message_id: &str,
    ) -> StoreResult<Option<Run>> {
        let rows = self
            .query(
                "reading a run by client_message_id",
                concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM runs WHERE session_id = $1 AND client_message_id = $2"
                ),
                &[&session_id, &client_message_id],
            )
            .await?;
        rows.first().map(run_from_row).transpose()
    }

    async fn get_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<Run>> {
        let rows = self
            .query(
                "reading a run",
                concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM runs WHERE session_id = $1 AND id = $2"
                ),
                &[&session_id, &run_id],
            )
            .await?;
        rows.first().map(run_from_row).transpose()
    }

    async fn list_runs(&self, session_id: &str) -> StoreResult<Vec<Run>> {
        let rows = self
            .query(
                "listing runs",
                concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM runs WHERE session_id = $1 ORDER BY ord"
                ),
                &[&session_id],
            )
            .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn update_run(&self, run: &Run) -> StoreResult<()> {
        let values = RunValues::of(run)?;
        let changed = self
            .execute(
                "updating a run",
                "UPDATE runs SET status = $3, started_at = $4, ended_at = $5, error = $6, prompt_tokens = $7,
                                 completion_tokens = $8, node = $9
                 WHERE session_id = $1 AND id = $2",
                &[
                    &run.session_id,
                    &run.id,
                    &run.status.as_str(),
                    &run.started_at,
                    &run.ended_at,
                    &values.error,
                    &values.prompt_tokens,
                    &values.completion_tokens,
                    &run.node,
                ],
            )
            .await
            .map_err(|f| f.into_store("updating a run"))?;
        if changed == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn unfinished_runs(&self, session_id: Option<&str>) -> StoreResult<Vec<Run>> {
        // The WHERE clauses match the partial indexes `runs_unfinished` and `runs_unfinished_by_session` word
        // for word.
        let rows = match session_id {
            None => {
                self.query(
                    "listing unfinished runs",
                    concat!(
                        "SELECT ",
                        run_columns!(),
                        " FROM runs WHERE status IN ('queued', 'running', 'waiting_input') ORDER BY ord"
                    ),
                    &[],
                )
                .await?
            }
            Some(id) => {
                self.query(
                    "listing a session's unfinished runs",
                    UNFINISHED_RUNS_OF,
                    &[&id],
                )
                .await?
            }
        };
        rows.iter().map(run_from_row).collect()
    }

    fn commit_gather(&self) -> std::time::Duration {
        COMMIT_GATHER
    }

    async fn append_events(&self, batch: Vec<LogEntry>) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        append::append(&self.pool, &self.health, &self.notifier, &self.lease, batch).await
    }

    async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        let after_sql = to_sql_int(after, "after").unwrap_or(i64::MAX);
        let rows = self
            .query(
                "reading events",
                "SELECT seq, payload FROM events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&session_id, &after_sql, &sql_limit(Some(limit))],
            )
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq = from_sql_int(col(row, 0)?, "seq")?;
            let payload: String = col(row, 1)?;
            let event = LoggedEvent::from_json(session_id.to_string(), payload).map_err(|e| {
                StoreError::Other(format!(
                    "corrupt row: event {seq} of session {session_id}: {e}"
                ))
            })?;
            if event.seq() != seq {
                return Err(StoreError::Other(format!(
                    "corrupt row: event {seq} of session {session_id} holds seq {}",
                    event.seq()
                )));
            }
            events.push(Arc::new(event));
        }
        Ok(events)
    }

    async fn log_bounds(&self, session_id: &str) -> StoreResult<LogBounds> {
        let rows = self
            .query(
                "reading log bounds",
                "SELECT c.last_seq, (SELECT seq FROM events WHERE session_id = $1 ORDER BY seq LIMIT 1)
                 FROM session_seqs c WHERE c.session_id = $1",
                &[&session_id],
            )
            .await?;
        // An unknown session has an empty log, like a session nothing was ever appended to.
        let Some(row) = rows.first() else {
            return Ok(LogBounds::default());
        };
        let last: i64 = col(row, 0)?;
        let first: Option<i64> = col(row, 1)?;
        Ok(LogBounds {
            first_seq: from_sql_int(first.unwrap_or(0), "first seq")?,
            last_seq: from_sql_int(last, "last_seq")?,
        })
    }

    async fn first_seq_of_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<u64>> {
        let rows = self
            .query(
                "reading the first seq of a run",
                "SELECT r.first_seq,
                        EXISTS (SELECT 1 FROM events e WHERE e.session_id = $1 AND e.seq = r.first_seq)
                 FROM runs r WHERE r.session_id = $1 AND r.id = $2",
                &[&session_id, &run_id],
            )
            .await?;
        let recorded: Option<(Option<i64>, bool)> = match rows.first() {
            Some(row) => Some((col(row, 0)?, col(row, 1)?)),
            None => None,
        };
        // Recorded when the run's first event was appended (and gone once pruning deleted that event); the scan
        // is the fallback for a run with no recorded first seq.
        let first: Option<i64> = match recorded {
            Some((Some(seq), true)) => Some(seq),
            Some((Some(_), false)) => None,
            Some((None, _)) | None => {
                let rows = self
                    .query(
                        "scanning for the first seq of a run",
                        "SELECT min(seq) FROM events WHERE session_id = $1 AND run_id = $2",
                        &[&session_id, &run_id],
                    )
                    .await?;
                match rows.first() {
                    Some(row) => col(row, 0)?,
                    None => None,
                }
            }
        };
        first.map(|seq| from_sql_int(seq, "seq")).transpose()
    }

    async fn prune_events(&self, session_id: &str, keep_runs: usize) -> StoreResult<()> {
        let keep = i64::try_from(keep_runs).unwrap_or(i64::MAX);
        // Runs of a session are sequential, so the events of all but the latest `keep` runs are a prefix of the
        // log: everything before the first event of the oldest kept run that has one. Deleting by position
        // keeps the stored log contiguous. One statement, so it is atomic without a transaction. The counter
        // (`session_seqs`) is untouched: numbering goes on after the deleted events.
        let deleted = self
            .execute(
                "pruning events",
                "DELETE FROM events WHERE session_id = $1
                   AND (SELECT count(*) FROM runs WHERE session_id = $1) > $2
                   AND seq < COALESCE(
                       (SELECT min(COALESCE(k.first_seq,
                                            (SELECT min(e.seq) FROM events e
                                             WHERE e.session_id = $1 AND e.run_id = k.id)))
                        FROM (SELECT id, first_seq FROM runs WHERE session_id = $1 ORDER BY ord DESC LIMIT $2) k),
                       9223372036854775807)",
                &[&session_id, &keep],
            )
            .await
            .map_err(|f| f.into_store("pruning events"))?;
        tracing::debug!(session_id, deleted, keep_runs, "pruned events");
        Ok(())
    }

    async fn put_upload(&self, session_id: &str, upload: &Upload, bytes: &[u8]) -> StoreResult<()> {
        let size = to_sql_int(upload.size, "upload size")?;
        let result = self
            .execute(
                "inserting an upload",
                copy::PUT_UPLOAD,
                &[
                    &session_id,
                    &upload.id,
                    &upload.name,
                    &upload.path,
                    &size,
                    &upload.content_type,
                    &bytes,
                ],
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(Failure::Pg(e)) => Err(copy::put_upload_error(session_id, upload, e)),
            Err(Failure::Store(e)) => Err(e),
        }
    }

    async fn put_alias(&self, key: &str, session_id: &str) -> StoreResult<()> {
        self.execute(
            "storing an alias",
            "INSERT INTO aliases (key, session_id) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET session_id = EXCLUDED.session_id",
            &[&key, &session_id],
        )
        .await
        .map_err(|f| f.into_store("storing an alias"))?;
        Ok(())
    }

    async fn find_alias(&self, key: &str) -> StoreResult<Option<String>> {
        let rows = self
            .query(
                "reading an alias",
                "SELECT session_id FROM aliases WHERE key = $1",
                &[&key],
            )
            .await?;
        rows.first()
            .map(|r| {
                r.try_get::<_, String>(0)
                    .map_err(|e| pg("reading an alias", e))
            })
            .transpose()
    }

    async fn get_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Upload>> {
        let sql = format!(
            "SELECT {} FROM uploads WHERE session_id = $1 AND id = $2",
            copy::UPLOAD_COLUMNS
        );
        let rows = self
            .query("reading an upload", &sql, &[&session_id, &id])
            .await?;
        rows.first().map(copy::upload_from_row).transpose()
    }

    async fn read_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let rows = self
            .query(
                "reading an upload's bytes",
                "SELECT bytes FROM uploads WHERE session_id = $1 AND id = $2",
                &[&session_id, &id],
            )
            .await?;
        rows.first().map(|row| col(row, 0)).transpose()
    }

    async fn list_uploads(&self, session_id: &str) -> StoreResult<Vec<Upload>> {
        let sql = format!(
            "SELECT {} FROM uploads WHERE session_id = $1 ORDER BY ord",
            copy::UPLOAD_COLUMNS
        );
        let rows = self.query("listing uploads", &sql, &[&session_id]).await?;
        rows.iter().map(copy::upload_from_row).collect()
    }

    async fn export_runs(&self, session_id: &str) -> StoreResult<Vec<StoredRun>> {
        let rows = self
            .query("listing runs", copy::EXPORT_RUNS, &[&session_id])
            .await?;
        rows.iter().map(copy::stored_run_from_row).collect()
    }

    async fn import_session(
        &self,
        session: &Session,
        messages: &[Message],
        runs: &[StoredRun],
    ) -> StoreResult<()> {
        copy::import_session(
            &self.pool,
            session.clone(),
            messages.to_vec(),
            runs.to_vec(),
        )
        .await
    }

    async fn import_events(
        &self,
        session_id: &str,
        events: &[Arc<LoggedEvent>],
        last_seq: u64,
    ) -> StoreResult<()> {
        copy::import_events(
            &self.pool,
            session_id.to_string(),
            events.to_vec(),
            last_seq,
        )
        .await
    }

    fn remote_appends(&self) -> Option<tokio::sync::broadcast::Receiver<RemoteAppend>> {
        Some(self.notifier.subscribe())
    }

    fn set_peers(&self, peers: bool) {
        self.notifier.set_peers(peers);
    }

    async fn heartbeat(&self, beat: &NodeBeat) -> StoreResult<()> {
        if self.lease.is(&beat.node_id, &beat.instance) {
            let renewed = self
                .execute(
                    "renewing the node's lease",
                    lease::RENEW,
                    &[&beat.node_id, &beat.instance],
                )
                .await
                .map_err(|f| f.into_store("renewing the node's lease"))?;
            if renewed == 0 {
                return Err(self.lease.lost("renewing the node's lease"));
            }
            return Ok(());
        }
        self.execute(
            "registering the node",
            lease::JOIN,
            &[
                &beat.node_id,
                &beat.instance,
                &beat.listen,
                &beat.started_at,
            ],
        )
        .await
        .map_err(|f| f.into_store("registering the node"))?;
        self.lease.joined(&beat.node_id, &beat.instance);
        self.query("announcing the node", lease::ANNOUNCE, &[&beat.node_id])
            .await?;
        Ok(())
    }

    async fn expel_lapsed(&self, within: Duration) -> StoreResult<()> {
        let me = self.lease.holder().map(|(node, _)| node);
        let rows = self
            .query(
                "expelling lapsed nodes",
                lease::EXPEL_LAPSED,
                &[&within.as_secs_f64(), &me],
            )
            .await?;
        for row in &rows {
            let node: String = col(row, 0)?;
            tracing::warn!(node = %node, "postgres: a node's lease lapsed; it is fenced and its runs go to live nodes");
        }
        Ok(())
    }

    fn fenced(&self) -> Option<tokio_util::sync::CancellationToken> {
        Some(self.lease.token())
    }

    async fn send_command(&self, to: &str, command: &NodeCommand) -> StoreResult<()> {
        let body = serde_json::to_string(command)
            .map_err(|e| StoreError::Other(format!("encoding a command: {e}")))?;
        self.query(
            "sending a command to another node",
            commands::SEND,
            &[&to, &body],
        )
        .await?;
        Ok(())
    }

    fn commands(&self) -> Option<tokio::sync::broadcast::Receiver<NodeCommand>> {
        Some(self.commands.subscribe())
    }

    async fn leave(&self, node_id: &str, instance: &str) -> StoreResult<()> {
        self.execute(
            "leaving the registry",
            "DELETE FROM nodes WHERE node_id = $1 AND instance = $2",
            &[&node_id, &instance],
        )
        .await
        .map_err(|f| f.into_store("leaving the registry"))?;
        Ok(())
    }

    async fn claim_run(
        &self,
        session_id: &str,
        run_id: &str,
        from: Option<&str>,
        to: &str,
        within: Duration,
    ) -> StoreResult<bool> {
        let client = self.client().await?;
        let (lock, claim, mine) = (
            client.prepare_cached(CLAIM_LOCK).await,
            client.prepare_cached(CLAIM_RUNS).await,
            client.prepare_cached(CLAIMED).await,
        );
        let (lock, claim, mine) = match (lock, claim, mine) {
            (Ok(l), Ok(c), Ok(m)) => (l, c, m),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return Err(pg("claiming a run", e))
            }
        };
        let secs = within.as_secs_f64();
        // Pipelined, one round trip; each statement after the lock sees every claim committed before it.
        let ((((begun, locked), claimed), owner), committed) = join(
            join(
                join(
                    join(client.batch_execute("BEGIN"), client.query(&lock, &[])),
                    client.query(&claim, &[&session_id, &from, &to, &secs]),
                ),
                client.query(&mine, &[&session_id, &run_id]),
            ),
            client.batch_execute("COMMIT"),
        )
        .await;
        let outcome = begun
            .and(locked)
            .and(claimed)
            .and(owner)
            .and_then(|rows| committed.map(|()| rows));
        match outcome {
            Ok(rows) => Ok(match rows.first() {
                Some(row) => col::<Option<String>>(row, 0)?.as_deref() == Some(to),
                None => false,
            }),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(pg("claiming a run", e))
            }
        }
    }

    async fn live_nodes(&self, within: Duration) -> StoreResult<Option<Vec<(NodeInfo, String)>>> {
        let secs = within.as_secs_f64();
        let rows = self
            .query(
                "listing the live nodes",
                "SELECT n.node_id, n.instance, n.listen, n.started_at,
                        to_char(n.last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                        (SELECT count(*) FROM runs r
                          WHERE r.node = n.node_id AND r.status IN ('queued', 'running', 'waiting_input'))
                 FROM nodes n WHERE n.last_seen > now() - make_interval(secs => $1)
                 ORDER BY n.node_id",
                &[&secs],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let runs: i64 = col(row, 5)?;
            out.push((
                NodeInfo {
                    node_id: col(row, 0)?,
                    listen: col(row, 2)?,
                    started_at: col(row, 3)?,
                    last_seen: col(row, 4)?,
                    runs: from_sql_int(runs, "runs")?,
                },
                col(row, 1)?,
            ));
        }
        Ok(Some(out))
    }
}

/// What a failed insert of `run` means: a `Conflict` for a taken id or client_message_id, `NotFound` for an
/// unknown session.
fn run_insert_failed(what: &str, run: &Run, e: tokio_postgres::Error) -> StoreError {
    match violation(&e) {
        Some(Violation::Unique(constraint)) if constraint.contains("client_message_id") => {
            StoreError::Conflict(format!(
                "a run with this client_message_id already exists in session {}",
                run.session_id
            ))
        }
        Some(Violation::Unique(_)) => StoreError::Conflict(format!(
            "run {} already exists in session {}",
            run.id, run.session_id
        )),
        Some(Violation::ForeignKey) => StoreError::NotFound,
        None => pg(what, e),
    }
}

impl Failure {
    fn into_store(self, what: &str) -> StoreError {
        match self {
            Failure::Pg(e) => pg(what, e),
            Failure::Store(e) => e,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests may unwrap: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn printable_urls_never_show_the_password() {
        let t = Target::parse("postgres://agentd:s3cret@db.example:6543/agentd?sslmode=disable")
            .unwrap();
        assert_eq!(t.name, "postgres://agentd@db.example:6543/agentd");
        let t = Target::parse("postgresql://postgres@127.0.0.1").unwrap();
        assert_eq!(t.name, "postgres://postgres@127.0.0.1:5432/postgres");
        let err = Target::parse("postgres://a:s3cret@h/db?port=notanumber")
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(Target::parse("sqlite://x.db").is_err());
    }
}
