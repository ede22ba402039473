//! The append path: a group of events (any sessions) numbered and committed in one transaction.
//!
//! Two round trips, each one pipelined write of several statements:
//! 1. `BEGIN`, the fence (the registry row of this node's process, locked: see `lease`), then one statement that locks the batch's sessions' counters (in session id order, so two
//!    appends that share sessions never deadlock) and adds each session's event count: `RETURNING` gives the
//!    new last seq, so the seqs are assigned inside the transaction, from the database's own counter.
//! 2. One multi-row insert of every event (`unnest` of arrays: one statement however many sessions and
//!    events), the message and run upserts the entries carry, and `COMMIT`.
//!
//! A failure anywhere rolls the whole transaction back, counters included: a failed batch uses up no seq.
//! Each append runs on a task of its own, so a caller that stops waiting cannot leave a connection inside an
//! open transaction (the task finishes, commit or rollback, and returns the connection to the pool).
//!
//! **When the database goes away.** An append whose connection fails (refused, lost, timed out) is tried
//! again, with back-off (50 ms doubling to 1 s), for up to [`OUTAGE_GRACE`]; meanwhile the event log waits for
//! it, so its bounded queue fills and holds the producers (a running turn pauses rather than losing events).
//! A connection lost during the second round trip leaves the outcome unknown: the `COMMIT` may have reached
//! the server. Before trying again, the append finds out: on a new connection it takes the lock on the
//! counter row of the batch's first session (`FOR NO KEY UPDATE`, as the lost transaction did, so this waits
//! until the server has finished that transaction either way), then looks, with a fresh snapshot, for the
//! batch's first event at the seq it was given. Found with the same payload: it was committed, and the
//! append succeeds without writing again. Missing: nothing of it was (one transaction), and it is numbered
//! afresh. So a retry never duplicates or reorders events. An append that gives up answers
//! `StoreError::Unavailable` only when nothing of the batch was committed; one whose outcome it could not
//! learn within the grace answers `Other` (see `agentd_core::store`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::domain::{Role, Run};
use agentd_core::event::{Event, EventKind, LoggedEvent, NewEvent};
use agentd_core::store::{LogEntry, StoreError, StoreResult};
use deadpool_postgres::{Object, Pool};
use futures_util::future::{join, join_all};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use crate::health::Health;
use crate::lease::{Lease, FENCE};
use crate::notify::Notifier;
use crate::rows::{from_sql_int, is_connection_error, pg, to_sql_int, MessageJson, RunValues};

/// How long an append keeps trying while the database cannot be reached (see the module docs).
pub(crate) const OUTAGE_GRACE: Duration = Duration::from_secs(60);
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// A batch carrying more text than this gets a longer idle-in-transaction timeout (see [`begin_for`]).
const BIG_BATCH_BYTES: usize = 1 << 20;
/// The longest idle-in-transaction timeout a big batch gets.
const BIG_BATCH_IDLE_MAX_MS: usize = 120_000;
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Locks the counters of the sessions in `$1` (ascending) and adds `$2[i]` to each: `(session_id, last_seq)`
/// after the addition. A session that does not exist has no row, so it is missing from the result.
const BUMP_COUNTERS: &str = "
WITH wanted AS (SELECT * FROM unnest($1::text[], $2::int8[]) AS w (session_id, n)),
     locked AS (SELECT c.session_id, w.n FROM session_seqs c JOIN wanted w ON w.session_id = c.session_id
                ORDER BY c.session_id FOR NO KEY UPDATE OF c)
UPDATE session_seqs c SET last_seq = c.last_seq + l.n FROM locked l WHERE c.session_id = l.session_id
RETURNING c.session_id, c.last_seq";

pub(crate) const INSERT_EVENTS: &str = "
INSERT INTO events (session_id, seq, run_id, payload)
SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[])";

/// On conflict the row keeps its `ord` (its place in the history) and `created_at`.
pub(crate) const UPSERT_MESSAGE: &str = "
INSERT INTO messages (session_id, id, run_id, role, content, tool_calls, tool_call_id, agent, images, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (session_id, id) DO UPDATE SET
    run_id = EXCLUDED.run_id, role = EXCLUDED.role, content = EXCLUDED.content,
    tool_calls = EXCLUDED.tool_calls, tool_call_id = EXCLUDED.tool_call_id, agent = EXCLUDED.agent,
    images = EXCLUDED.images";

/// On conflict the row keeps its `ord`, `created_at` and `client_message_id`, and its `first_seq` once set
/// (`$10` is the seq of the run's first event in this batch, recorded here rather than by a statement of its
/// own: see [`RECORD_FIRST_SEQ`]).
const UPSERT_RUN: &str = "
INSERT INTO runs (session_id, id, status, created_at, started_at, ended_at, error, prompt_tokens, completion_tokens,
                  first_seq, node)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (session_id, id) DO UPDATE SET
    status = EXCLUDED.status, started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
    error = EXCLUDED.error, prompt_tokens = EXCLUDED.prompt_tokens,
    completion_tokens = EXCLUDED.completion_tokens, node = EXCLUDED.node,
    first_seq = COALESCE(runs.first_seq, EXCLUDED.first_seq)";

/// A run's first seq, for a batch that has one of the run's first-event candidates (see [`Prepared::of`]) but
/// no change of the run's row to carry it.
pub(crate) const RECORD_FIRST_SEQ: &str =
    "UPDATE runs SET first_seq = $3 WHERE session_id = $1 AND id = $2 AND first_seq IS NULL";

/// Tells the other nodes what a commit added (see `notify`).
const NOTIFY: &str = "SELECT pg_notify('agentd_log', $1)";

type Op<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Appends `batch` in one transaction on a task of its own, trying again while the database is unreachable
/// (see the module docs).
pub(crate) async fn append(
    pool: &Pool,
    health: &Arc<Health>,
    notifier: &Arc<Notifier>,
    lease: &Arc<Lease>,
    batch: Vec<LogEntry>,
) -> StoreResult<Vec<Arc<LoggedEvent>>> {
    check(&batch)?;
    let pool = pool.clone();
    let health = health.clone();
    let notifier = notifier.clone();
    let lease = lease.clone();
    tokio::spawn(async move { append_retrying(&pool, &health, &notifier, &lease, batch).await })
        .await
        .map_err(|e| StoreError::Other(format!("postgres: the append task failed: {e}")))?
}

/// What one attempt at a commit came to.
enum Attempt {
    /// Committed, or failed for a reason a retry would not change.
    Done(StoreResult<Vec<Arc<LoggedEvent>>>),
    /// The connection failed before anything could be committed: the batch, to try again.
    NotCommitted(Vec<LogEntry>, StoreError),
    /// The connection failed while the rows and `COMMIT` were out: the numbered events and their runs.
    Unknown(Vec<Arc<LoggedEvent>>, Vec<Option<Run>>, StoreError),
}

async fn append_retrying(
    pool: &Pool,
    health: &Health,
    notifier: &Notifier,
    lease: &Lease,
    mut batch: Vec<LogEntry>,
) -> StoreResult<Vec<Arc<LoggedEvent>>> {
    let deadline = Instant::now() + OUTAGE_GRACE;
    let mut wait = RETRY_FIRST;
    loop {
        let attempt = match pool.get().await {
            Ok(client) => commit(&client, notifier, lease, batch).await,
            Err(e) => match crate::rows::pool(e) {
                e @ StoreError::Unavailable(_) => Attempt::NotCommitted(batch, e),
                e => Attempt::Done(Err(e)),
            },
        };
        let error = match attempt {
            Attempt::Done(result) => return health.note(result),
            Attempt::NotCommitted(again, e) => {
                batch = again;
                health.failed(e)
            }
            Attempt::Unknown(logged, runs, e) => {
                let e = health.failed(e);
                match committed(pool, health, &logged, deadline).await {
                    Ok(true) => {
                        tracing::info!(
                            events = logged.len(),
                            "postgres: an append whose connection was lost had been committed"
                        );
                        return Ok(logged);
                    }
                    Ok(false) => {
                        batch = unlog(logged, runs);
                        e
                    }
                    Err(unknown) => {
                        return Err(StoreError::Other(format!(
                            "{e}; whether it was committed is unknown ({unknown})"
                        )))
                    }
                }
            }
        };
        if Instant::now() + wait > deadline {
            tracing::error!(
                events = batch.len(),
                grace_s = OUTAGE_GRACE.as_secs(),
                "postgres: an append gave up: the database stayed unreachable"
            );
            return Err(error);
        }
        tracing::debug!(error = %error, retry_in_ms = wait.as_millis() as u64, "postgres: append retrying");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Was a batch whose connection was lost mid-commit committed? Asks on a new connection, trying until
/// `deadline` (see the module docs); an error when it could not find out.
async fn committed(
    pool: &Pool,
    health: &Health,
    logged: &[Arc<LoggedEvent>],
    deadline: Instant,
) -> StoreResult<bool> {
    let Some(probe) = logged.first() else {
        return Ok(false);
    };
    let seq = to_sql_int(probe.seq(), "seq")?;
    let mut wait = RETRY_FIRST;
    loop {
        let asked = async {
            let client = pool.get().await.map_err(crate::rows::pool)?;
            let answer = ask_committed(&client, &probe.session_id, seq).await;
            if answer.is_err() {
                rollback(&client).await;
            }
            answer
        }
        .await;
        match asked {
            Ok(payload) => {
                health.reachable();
                return Ok(payload.as_deref() == Some(probe.json.as_str()));
            }
            Err(e) => {
                let e = health.failed(e);
                if Instant::now() + wait > deadline {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// The stored payload of `(session, seq)`, once any transaction holding the session's counter has ended.
async fn ask_committed(client: &Object, session: &str, seq: i64) -> StoreResult<Option<String>> {
    // A lost connection's server side may still hold the lock a while; past the timeout this is asked again.
    client
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '2s'")
        .await
        .map_err(|e| pg("checking a lost commit", e))?;
    client
        .query(
            "SELECT 1 FROM session_seqs WHERE session_id = $1 FOR NO KEY UPDATE",
            &[&session],
        )
        .await
        .map_err(|e| pg("waiting for a lost commit", e))?;
    // A statement of its own: READ COMMITTED gives it a snapshot taken after the lock was granted.
    let rows = client
        .query(
            "SELECT payload FROM events WHERE session_id = $1 AND seq = $2",
            &[&session, &seq],
        )
        .await
        .map_err(|e| pg("reading a lost commit's first event", e))?;
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(|e| pg("checking a lost commit", e))?;
    match rows.first() {
        Some(row) => row
            .try_get::<_, String>(0)
            .map(Some)
            .map_err(|e| pg("reading a lost commit's first event", e)),
        None => Ok(None),
    }
}

/// Numbered events back into the entries they came from, to be numbered again.
fn unlog(logged: Vec<Arc<LoggedEvent>>, runs: Vec<Option<Run>>) -> Vec<LogEntry> {
    logged
        .into_iter()
        .zip(runs)
        .map(|(ev, run)| {
            let (session_id, event) = match Arc::try_unwrap(ev) {
                Ok(ev) => (ev.session_id, ev.event),
                Err(shared) => (shared.session_id.clone(), shared.event.clone()),
            };
            LogEntry {
                event: NewEvent {
                    session_id,
                    run_id: event.run_id,
                    agent: event.agent,
                    is_subagent: event.is_subagent,
                    kind: event.kind,
                },
                run,
            }
        })
        .collect()
}

/// A message or run an entry carries must belong to the event's session.
fn check(batch: &[LogEntry]) -> StoreResult<()> {
    for entry in batch {
        let session = &entry.event.session_id;
        if let EventKind::Message { message } = &entry.event.kind {
            same_session("message", &message.id, &message.session_id, session)?;
        }
        if let Some(run) = &entry.run {
            same_session("run", &run.id, &run.session_id, session)?;
        }
    }
    Ok(())
}

fn same_session(what: &str, id: &str, row_session: &str, event_session: &str) -> StoreResult<()> {
    if row_session == event_session {
        Ok(())
    } else {
        Err(StoreError::Other(format!(
            "{what} {id} belongs to session {row_session} but its event to session {event_session}"
        )))
    }
}

/// The text an entry carries (what makes an event big), about.
fn text_bytes(entry: &LogEntry) -> usize {
    match &entry.event.kind {
        EventKind::Message { message } => {
            // The payload and the message row each carry it.
            2 * (message.content.len() + message.images.iter().map(String::len).sum::<usize>())
        }
        EventKind::TextDelta { delta } | EventKind::ThinkingDelta { delta, .. } => delta.len(),
        EventKind::ThinkingEnd { thinking, .. } => thinking.len(),
        EventKind::ToolFinished { result, .. } => result.len(),
        EventKind::RunFinished { content, .. } => content.len(),
        EventKind::InputRequested { question, .. } => question.len(),
        _ => 0,
    }
}

/// `BEGIN`, and for a batch carrying more than [`BIG_BATCH_BYTES`] a longer idle-in-transaction timeout for
/// this transaction: between the two round trips the client serialises and sends the whole batch, and with
/// tens of megabytes on a busy machine that takes longer than the pool's 3 s, which would end the connection
/// mid-append (then every retry of the same batch would too). One second per MiB, at most two minutes: a
/// node frozen inside such an append delays a takeover by that much at worst (the expelling sweep waits for
/// the append's locks), it never breaks the fence.
fn begin_for(batch: &[LogEntry]) -> std::borrow::Cow<'static, str> {
    let bytes: usize = batch.iter().map(text_bytes).sum();
    if bytes <= BIG_BATCH_BYTES {
        return "BEGIN".into();
    }
    let ms =
        (super::IDLE_IN_TRANSACTION_MS as usize + (bytes >> 20) * 1000).min(BIG_BATCH_IDLE_MAX_MS);
    format!("BEGIN; SET LOCAL idle_in_transaction_session_timeout = {ms}").into()
}

/// The statements an append binds, prepared on its connection.
struct Statements {
    insert: tokio_postgres::Statement,
    rows: Option<(
        tokio_postgres::Statement,
        tokio_postgres::Statement,
        tokio_postgres::Statement,
    )>,
}

/// Round trip 1 (and the statements, cached per connection): opens the transaction and takes each session's
/// first seq. Nothing is committed if this fails.
async fn number(
    client: &Object,
    lease: &Lease,
    batch: &[LogEntry],
) -> StoreResult<(Statements, HashMap<String, u64>)> {
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for entry in batch {
        *counts.entry(entry.event.session_id.as_str()).or_insert(0) += 1;
    }
    let ids: Vec<&str> = counts.keys().copied().collect();
    let ns: Vec<i64> = counts.values().copied().collect();
    let changes_rows = batch.iter().any(LogEntry::changes_rows);

    // Cached per connection: prepared once, then only bound and executed.
    let bump = client
        .prepare_cached(BUMP_COUNTERS)
        .await
        .map_err(|e| pg("preparing the counter update", e))?;
    let insert = client
        .prepare_cached(INSERT_EVENTS)
        .await
        .map_err(|e| pg("preparing the event insert", e))?;
    let rows = if changes_rows {
        Some((
            client
                .prepare_cached(UPSERT_MESSAGE)
                .await
                .map_err(|e| pg("preparing the message upsert", e))?,
            client
                .prepare_cached(UPSERT_RUN)
                .await
                .map_err(|e| pg("preparing the run upsert", e))?,
            client
                .prepare_cached(RECORD_FIRST_SEQ)
                .await
                .map_err(|e| pg("preparing the first seq update", e))?,
        ))
    } else {
        None
    };

    // Fenced (see `lease`): the registry row of this process, locked in the same transaction.
    let holder = lease.holder();
    let fence = match &holder {
        Some(_) => Some(
            client
                .prepare_cached(FENCE)
                .await
                .map_err(|e| pg("preparing the fence", e))?,
        ),
        None => None,
    };
    let fenced = async {
        match (&fence, &holder) {
            (Some(fence), Some((node, instance))) => client
                .query(fence, &[node, instance])
                .await
                .map(|r| !r.is_empty()),
            _ => Ok(true),
        }
    };
    let begin = begin_for(batch);
    let ((begun, held), bumped) = join(
        join(client.batch_execute(&begin), fenced),
        client.query(&bump, &[&ids, &ns]),
    )
    .await;
    let rows_back = match begun
        .and(held)
        .and_then(|held| bumped.map(|rows| (held, rows)))
    {
        Ok((true, rows)) => rows,
        Ok((false, _)) => {
            rollback(client).await;
            return Err(lease.lost("an append"));
        }
        Err(e) => {
            rollback(client).await;
            return Err(pg("numbering events", e));
        }
    };
    let mut next: HashMap<String, u64> = HashMap::with_capacity(rows_back.len());
    for row in &rows_back {
        let parsed = row
            .try_get::<_, String>(0)
            .and_then(|id| Ok((id, row.try_get::<_, i64>(1)?)));
        let (id, last) = match parsed {
            Ok(v) => v,
            Err(e) => {
                rollback(client).await;
                return Err(pg("reading the counters", e));
            }
        };
        let n = counts.get(id.as_str()).copied().unwrap_or(0);
        let first = match from_sql_int(last - n + 1, "seq") {
            Ok(first) => first,
            Err(e) => {
                rollback(client).await;
                return Err(e);
            }
        };
        next.insert(id, first);
    }
    if next.len() != counts.len() {
        // A session of the batch does not exist.
        rollback(client).await;
        return Err(StoreError::NotFound);
    }
    Ok((Statements { insert, rows }, next))
}

async fn commit(
    client: &Object,
    notifier: &Notifier,
    lease: &Lease,
    batch: Vec<LogEntry>,
) -> Attempt {
    let (statements, mut next) = match number(client, lease, &batch).await {
        Ok(numbered) => numbered,
        Err(e @ StoreError::Unavailable(_)) => return Attempt::NotCommitted(batch, e),
        Err(e) => return Attempt::Done(Err(e)),
    };
    let Statements {
        insert,
        rows: row_statements,
    } = statements;

    // Number the events in input order, and serialise each once (the stored payload is the native frame).
    let mut logged: Vec<Arc<LoggedEvent>> = Vec::with_capacity(batch.len());
    let mut runs: Vec<Option<Run>> = Vec::with_capacity(batch.len());
    for entry in batch {
        let e = entry.event;
        let seq = match next.get_mut(&e.session_id) {
            Some(seq) => {
                let this = *seq;
                *seq += 1;
                this
            }
            None => {
                rollback(client).await;
                return Attempt::Done(Err(StoreError::NotFound));
            }
        };
        logged.push(Arc::new(LoggedEvent::new(
            e.session_id,
            Event {
                seq,
                run_id: e.run_id,
                agent: e.agent,
                is_subagent: e.is_subagent,
                kind: e.kind,
            },
        )));
        runs.push(entry.run);
    }

    // Round trip 2: the rows, then COMMIT, in one pipelined write.
    let prepared = match Prepared::of(&logged, &runs) {
        Ok(p) => p,
        Err(e) => {
            rollback(client).await;
            return Attempt::Done(Err(e));
        }
    };
    // Other nodes hear of the new events when (and only if) the transaction commits.
    let payloads = notifier.payloads(&logged);
    let notify = if payloads.is_empty() {
        None
    } else {
        match client.prepare_cached(NOTIFY).await {
            Ok(stmt) => Some(stmt),
            Err(e) => {
                rollback(client).await;
                return Attempt::Done(Err(pg("preparing the notification", e)));
            }
        }
    };
    let mut ops: Vec<Op<'_>> = Vec::with_capacity(1 + prepared.rows.len());
    let insert_params: Vec<&(dyn ToSql + Sync)> = vec![
        &prepared.session_ids,
        &prepared.seqs,
        &prepared.run_ids,
        &prepared.payloads,
    ];
    ops.push(Box::pin(client.execute_raw(&insert, insert_params)));
    if let Some((upsert_message, upsert_run, first_seq)) = &row_statements {
        for change in &prepared.rows {
            match change {
                RowChange::Message { event, json, role } => {
                    if let EventKind::Message { message } = &event.event.kind {
                        let params: Vec<&(dyn ToSql + Sync)> = vec![
                            &message.session_id,
                            &message.id,
                            &message.run_id,
                            role,
                            &message.content,
                            &json.tool_calls,
                            &message.tool_call_id,
                            &message.agent,
                            &json.images,
                            &message.created_at,
                        ];
                        ops.push(Box::pin(client.execute_raw(upsert_message, params)));
                    }
                }
                RowChange::Run {
                    run,
                    values,
                    status,
                    first_seq,
                } => {
                    let params: Vec<&(dyn ToSql + Sync)> = vec![
                        &run.session_id,
                        &run.id,
                        status,
                        &run.created_at,
                        &run.started_at,
                        &run.ended_at,
                        &values.error,
                        &values.prompt_tokens,
                        &values.completion_tokens,
                        first_seq,
                        &run.node,
                    ];
                    ops.push(Box::pin(client.execute_raw(upsert_run, params)));
                }
                RowChange::FirstSeq { event, seq } => {
                    let params: Vec<&(dyn ToSql + Sync)> =
                        vec![&event.session_id, &event.event.run_id, seq];
                    ops.push(Box::pin(client.execute_raw(first_seq, params)));
                }
            }
        }
    }
    // `join` polls the statements first (each sends its request when first polled), then COMMIT: the server
    // gets them in this order, in one write. If a statement fails, the transaction is aborted and the COMMIT
    // rolls it back.
    if let Some(stmt) = &notify {
        for payload in &payloads {
            let params: Vec<&(dyn ToSql + Sync)> = vec![payload];
            ops.push(Box::pin(client.execute_raw(stmt, params)));
        }
    }
    let (results, committed) = join(join_all(ops), client.batch_execute("COMMIT")).await;
    drop(prepared);
    let failed = results
        .into_iter()
        .filter_map(Result::err)
        .min_by_key(|e| e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    let lost = match (failed, committed) {
        (None, Ok(())) => return Attempt::Done(Ok(logged)),
        // A statement's own error: the transaction was aborted, and COMMIT rolled it back.
        (Some(e), _) if !is_connection_error(&e) => {
            return Attempt::Done(Err(pg("appending events", e)))
        }
        (Some(e), _) => pg("appending events", e),
        (None, Err(e)) if !is_connection_error(&e) => {
            return Attempt::Done(Err(pg("committing appended events", e)))
        }
        (None, Err(e)) => pg("committing appended events", e),
    };
    // The connection went while the rows and COMMIT were out: committed or not, the server alone knows.
    Attempt::Unknown(logged, runs, lost)
}

/// Ends a failed transaction so the connection goes back to the pool clean. A connection that cannot even do
/// that is broken, and the pool drops it when it is next checked out.
async fn rollback(client: &Object) {
    match client.batch_execute("ROLLBACK").await {
        Ok(()) => {}
        // The connection is gone, and its transaction with it (the append is tried again elsewhere).
        Err(e) if is_connection_error(&e) => {
            tracing::debug!(error = %e, "postgres: rolling back a failed append failed")
        }
        Err(e) => tracing::warn!(error = %e, "postgres: rolling back a failed append failed"),
    }
}

/// What the second round trip binds, owned here so the pipelined statements can borrow it.
struct Prepared<'a> {
    session_ids: Vec<&'a str>,
    seqs: Vec<i64>,
    run_ids: Vec<&'a str>,
    payloads: Vec<&'a str>,
    rows: Vec<RowChange<'a>>,
}

enum RowChange<'a> {
    Message {
        event: &'a LoggedEvent,
        json: MessageJson,
        role: &'static str,
    },
    Run {
        run: &'a Run,
        values: RunValues,
        status: &'static str,
        /// The seq of the run's first first-event candidate in the batch, if any.
        first_seq: Option<i64>,
    },
    FirstSeq {
        event: &'a LoggedEvent,
        seq: i64,
    },
}

impl<'a> Prepared<'a> {
    fn of(logged: &'a [Arc<LoggedEvent>], runs: &'a [Option<Run>]) -> StoreResult<Prepared<'a>> {
        let mut p = Prepared {
            session_ids: Vec::with_capacity(logged.len()),
            seqs: Vec::with_capacity(logged.len()),
            run_ids: Vec::with_capacity(logged.len()),
            payloads: Vec::with_capacity(logged.len()),
            rows: Vec::new(),
        };
        // A run's first event is always one of the candidates (its user message, its start, or its end when it
        // never started), never a delta or an answer (the model's and the tools' messages come after the start):
        // recording it costs nothing on the token path, and nothing for a turn's answer. Only a run's first
        // candidate in the batch can be its first event; a batch that also changes the run's row (its start or
        // end) records it in that upsert, any other batch with a candidate by one `RECORD_FIRST_SEQ`.
        let candidate = |event: &LoggedEvent| match &event.event.kind {
            EventKind::Message { message } => message.role == Role::User,
            EventKind::RunStarted { .. } | EventKind::RunFinished { .. } => true,
            _ => false,
        };
        let mut first_of_run: HashMap<(&str, &str), i64> = HashMap::new();
        let mut run_rows: Vec<(&str, &str)> = Vec::new();
        for (event, run) in logged.iter().zip(runs) {
            let key = (event.session_id.as_str(), event.event.run_id.as_str());
            if candidate(event) && !first_of_run.contains_key(&key) {
                first_of_run.insert(key, to_sql_int(event.seq(), "seq")?);
            }
            if run.is_some() {
                run_rows.push(key);
            }
        }
        for (event, run) in logged.iter().zip(runs) {
            let seq = to_sql_int(event.seq(), "seq")?;
            p.session_ids.push(&event.session_id);
            p.seqs.push(seq);
            p.run_ids.push(&event.event.run_id);
            p.payloads.push(&event.json);
            if let EventKind::Message { message } = &event.event.kind {
                p.rows.push(RowChange::Message {
                    event,
                    json: MessageJson::of(message)?,
                    role: message.role.as_str(),
                });
            }
            // Tokens (no run row, not a candidate) skip the lookups below: nothing per token on the hot path.
            if run.is_none() && !candidate(event) {
                continue;
            }
            let key = (event.session_id.as_str(), event.event.run_id.as_str());
            if let Some(run) = run {
                p.rows.push(RowChange::Run {
                    run,
                    values: RunValues::of(run)?,
                    status: run.status.as_str(),
                    first_seq: first_of_run.get(&key).copied(),
                });
            }
            if first_of_run.get(&key) == Some(&seq) && !run_rows.contains(&key) {
                p.rows.push(RowChange::FirstSeq { event, seq });
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(bytes: usize) -> LogEntry {
        LogEntry {
            event: NewEvent {
                session_id: "s".into(),
                run_id: "r".into(),
                agent: "a".into(),
                is_subagent: false,
                kind: EventKind::TextDelta {
                    delta: "x".repeat(bytes),
                },
            },
            run: None,
        }
    }

    #[test]
    fn a_big_batch_gets_time_to_arrive_inside_its_transaction() {
        assert_eq!(begin_for(&[delta(10), delta(1 << 19)]), "BEGIN");
        // 32 MiB: 3 s + 32 s.
        assert_eq!(
            begin_for(&[delta(32 << 20)]),
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = 35000"
        );
        assert_eq!(
            begin_for(&[delta(1 << 30)]),
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = 120000"
        );
    }
}
