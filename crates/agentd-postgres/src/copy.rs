//! Uploads, and what `agentd copy-store` needs beyond the everyday calls: runs with their `client_message_id`,
//! and importing a session's rows and its log as given. Each import is one transaction, run on a task of its
//! own (as appends are), so a caller that gives up cannot leave a connection inside an open transaction.

use std::sync::Arc;

use agentd_core::domain::{Message, Session, Upload};
use agentd_core::event::LoggedEvent;
use agentd_core::store::{check_import, check_session_rows, StoreError, StoreResult, StoredRun};
use deadpool_postgres::{GenericClient, Pool};
use tokio_postgres::Row;

use crate::append::{INSERT_EVENTS, RECORD_FIRST_SEQ, UPSERT_MESSAGE};
use crate::rows::{
    col, from_sql_int, pg, run_columns, run_from_row, to_json, to_sql_int, violation, MessageJson,
    RunValues, Violation, INSERT_RUN,
};

pub(crate) const UPLOAD_COLUMNS: &str = "id, name, path, size, content_type";

pub(crate) const PUT_UPLOAD: &str =
    "INSERT INTO uploads (session_id, id, name, path, size, content_type, bytes) VALUES ($1, $2, $3, $4, $5, $6, $7)";

pub(crate) const EXPORT_RUNS: &str = concat!(
    "SELECT ",
    run_columns!(),
    ", client_message_id FROM runs WHERE session_id = $1 ORDER BY ord"
);

pub(crate) fn upload_from_row(row: &Row) -> StoreResult<Upload> {
    Ok(Upload {
        id: col(row, 0)?,
        name: col(row, 1)?,
        path: col(row, 2)?,
        size: from_sql_int(col(row, 3)?, "upload size")?,
        content_type: col(row, 4)?,
    })
}

pub(crate) fn stored_run_from_row(row: &Row) -> StoreResult<StoredRun> {
    Ok(StoredRun {
        run: run_from_row(row)?,
        client_message_id: col(row, 10)?,
    })
}

/// What a failed `put_upload` insert means.
pub(crate) fn put_upload_error(
    session_id: &str,
    upload: &Upload,
    e: tokio_postgres::Error,
) -> StoreError {
    match violation(&e) {
        Some(Violation::Unique(_)) => StoreError::Conflict(format!(
            "session {session_id} already has an upload {} or a file {}",
            upload.id, upload.path
        )),
        Some(Violation::ForeignKey) => StoreError::NotFound,
        None => pg("inserting an upload", e),
    }
}

/// Inserts a session and its counter row; `Conflict` if it exists.
pub(crate) async fn insert_session<C: GenericClient>(
    client: &C,
    session: &Session,
) -> StoreResult<()> {
    let metadata = to_json(&session.metadata, "metadata")?;
    let stmt = client
        .prepare_cached(
            "WITH s AS (
                 INSERT INTO sessions (id, principal, agent, title, status, metadata, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id)
             INSERT INTO session_seqs (session_id) SELECT id FROM s",
        )
        .await
        .map_err(|e| pg("preparing a session insert", e))?;
    let result = client
        .execute(
            &stmt,
            &[
                &session.id,
                &session.principal,
                &session.agent,
                &session.title,
                &session.status.as_str(),
                &metadata,
                &session.created_at,
                &session.updated_at,
            ],
        )
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if matches!(violation(&e), Some(Violation::Unique(_))) => Err(StoreError::Conflict(
            format!("session {} already exists", session.id),
        )),
        Err(e) => Err(pg("inserting a session", e)),
    }
}

/// Creates the session (and its counter) with its messages and runs, in one transaction.
pub(crate) async fn import_session(
    pool: &Pool,
    session: Session,
    messages: Vec<Message>,
    runs: Vec<StoredRun>,
) -> StoreResult<()> {
    check_session_rows(&session, &messages, &runs)?;
    let pool = pool.clone();
    on_own_task(async move {
        let mut client = pool.get().await.map_err(crate::rows::pool)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg("starting a session import", e))?;
        insert_session(&tx, &session).await?;
        let upsert = tx
            .prepare_cached(UPSERT_MESSAGE)
            .await
            .map_err(|e| pg("preparing the message insert", e))?;
        for m in &messages {
            let json = MessageJson::of(m)?;
            tx.execute(
                &upsert,
                &[
                    &m.session_id,
                    &m.id,
                    &m.run_id,
                    &m.role.as_str(),
                    &m.content,
                    &json.tool_calls,
                    &m.tool_call_id,
                    &m.agent,
                    &json.images,
                    &m.created_at,
                ],
            )
            .await
            .map_err(|e| pg("importing a message", e))?;
        }
        let insert_run = tx
            .prepare_cached(INSERT_RUN)
            .await
            .map_err(|e| pg("preparing the run insert", e))?;
        for StoredRun {
            run,
            client_message_id,
        } in &runs
        {
            let values = RunValues::of(run)?;
            tx.execute(&insert_run, &values.insert_params(run, client_message_id))
                .await
                .map_err(|e| pg("importing a run", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| pg("committing a session import", e))
    })
    .await
}

/// Adds events with their seq, records runs' first seqs and sets the session's counter, in one transaction
/// that holds the counter row's lock (so no append numbers the session meanwhile).
pub(crate) async fn import_events(
    pool: &Pool,
    session_id: String,
    events: Vec<Arc<LoggedEvent>>,
    last_seq: u64,
) -> StoreResult<()> {
    let pool = pool.clone();
    on_own_task(async move {
        let mut client = pool.get().await.map_err(crate::rows::pool)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg("starting an event import", e))?;
        let row = tx
            .query_opt(
                "SELECT c.last_seq, EXISTS (SELECT 1 FROM events e WHERE e.session_id = $1)
                 FROM session_seqs c WHERE c.session_id = $1 FOR UPDATE",
                &[&session_id],
            )
            .await
            .map_err(|e| pg("reading the session's counter", e))?
            .ok_or(StoreError::NotFound)?;
        let current = from_sql_int(col(&row, 0)?, "last_seq")?;
        let has_events: bool = col(&row, 1)?;
        let last = check_import(&session_id, current, has_events, &events, last_seq)?;
        let mut ids = Vec::with_capacity(events.len());
        let mut seqs = Vec::with_capacity(events.len());
        let mut runs = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        for e in &events {
            ids.push(session_id.as_str());
            seqs.push(to_sql_int(e.seq(), "seq")?);
            runs.push(e.event.run_id.as_str());
            payloads.push(e.json.as_str());
        }
        tx.execute(INSERT_EVENTS, &[&ids, &seqs, &runs, &payloads])
            .await
            .map_err(|e| pg("importing events", e))?;
        for group in events.chunk_by(|a, b| a.event.run_id == b.event.run_id) {
            if let Some(first) = group.first() {
                tx.execute(
                    RECORD_FIRST_SEQ,
                    &[
                        &session_id,
                        &first.event.run_id,
                        &to_sql_int(first.seq(), "seq")?,
                    ],
                )
                .await
                .map_err(|e| pg("recording a run's first seq", e))?;
            }
        }
        tx.execute(
            "UPDATE session_seqs SET last_seq = $2 WHERE session_id = $1",
            &[&session_id, &to_sql_int(last, "last_seq")?],
        )
        .await
        .map_err(|e| pg("setting the session's counter", e))?;
        tx.commit()
            .await
            .map_err(|e| pg("committing an event import", e))
    })
    .await
}

async fn on_own_task<F>(work: F) -> StoreResult<()>
where
    F: std::future::Future<Output = StoreResult<()>> + Send + 'static,
{
    tokio::spawn(work)
        .await
        .map_err(|e| StoreError::Other(format!("postgres: the import task failed: {e}")))?
}
