//! Uploads, and what `agentd copy-store` needs beyond the everyday calls: runs with their `client_message_id`,
//! and importing a session's rows and its log as given. Writes run on the writer thread, reads on the pool.

use std::sync::Arc;

use agentd_core::domain::{Message, Session, Upload};
use agentd_core::event::LoggedEvent;
use agentd_core::store::{check_import, check_session_rows, StoreError, StoreResult, StoredRun};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::chunk;
use crate::rows::{from_sql_int, run_columns, to_sql_int, violation, Context, RunRow, Violation};
use crate::tail::stored_last_seq;
use crate::writer::{create_run, create_session, upsert_message, SESSION_TAIL_CAP};

// --- writes (the writer thread) ---

pub(crate) fn put_upload(
    conn: &Connection,
    session_id: &str,
    upload: &Upload,
    bytes: &[u8],
) -> StoreResult<()> {
    let result = conn
        .prepare_cached(
            "INSERT INTO uploads (session_id, id, name, path, size, content_type, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .ctx("preparing upload insert")?
        .execute(params![
            session_id,
            upload.id,
            upload.name,
            upload.path,
            to_sql_int(upload.size, "size")?,
            upload.content_type,
            bytes
        ]);
    match result {
        Ok(_) => Ok(()),
        Err(e) => match violation(&e) {
            Some(Violation::Unique) => Err(StoreError::Conflict(format!(
                "session {session_id} already has an upload {} or a file {}",
                upload.id, upload.path
            ))),
            Some(Violation::ForeignKey) => Err(StoreError::NotFound),
            None => Err(e).ctx("inserting upload"),
        },
    }
}

pub(crate) fn import_session(
    conn: &mut Connection,
    session: &Session,
    messages: &[Message],
    runs: &[StoredRun],
) -> StoreResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("starting session import")?;
    check_session_rows(session, messages, runs)?;
    create_session(&tx, session)?;
    for m in messages {
        upsert_message(&tx, m)?;
    }
    for r in runs {
        create_run(&tx, &r.run, r.client_message_id.as_deref())?;
    }
    tx.commit().ctx("committing session import")
}

/// Imports events into the table (the session's tail has been moved there first), as chunks of at most
/// [`SESSION_TAIL_CAP`] events, records each run's first seq, and raises the session's last seq floor.
pub(crate) fn import_events(
    conn: &mut Connection,
    session_id: &str,
    events: &[Arc<LoggedEvent>],
    last_seq: u64,
) -> StoreResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("starting event import")?;
    let current = stored_last_seq(&tx, session_id)?.ok_or(StoreError::NotFound)?;
    let has_events = tx
        .prepare_cached("SELECT 1 FROM events WHERE session_id = ?1 LIMIT 1")
        .ctx("preparing event check")?
        .query_row([session_id], |_| Ok(()))
        .optional()
        .ctx("checking for events")?
        .is_some();
    let last = check_import(session_id, current, has_events, events, last_seq)?;
    for slice in events.chunks(SESSION_TAIL_CAP) {
        chunk::insert(&tx, slice)?;
    }
    for group in events.chunk_by(|a, b| a.event.run_id == b.event.run_id) {
        if let Some(first) = group.first() {
            tx.prepare_cached(
                "UPDATE runs SET first_seq = ?3 WHERE session_id = ?1 AND id = ?2 AND first_seq IS NULL",
            )
            .ctx("preparing first_seq update")?
            .execute(params![
                session_id,
                first.event.run_id,
                to_sql_int(first.seq(), "seq")?
            ])
            .ctx("recording a run's first seq")?;
        }
    }
    tx.prepare_cached("UPDATE sessions SET last_seq = MAX(last_seq, ?2) WHERE id = ?1")
        .ctx("preparing last_seq update")?
        .execute(params![session_id, to_sql_int(last, "last_seq")?])
        .ctx("raising last_seq")?;
    tx.commit().ctx("committing event import")
}

// --- reads (the reader pool) ---

const UPLOAD_COLUMNS: &str = "id, name, path, size, content_type";

fn upload_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Upload, i64)> {
    let size: i64 = row.get(3)?;
    Ok((
        Upload {
            id: row.get(0)?,
            name: row.get(1)?,
            path: row.get(2)?,
            size: 0,
            content_type: row.get(4)?,
        },
        size,
    ))
}

fn with_size((mut upload, size): (Upload, i64)) -> StoreResult<Upload> {
    upload.size = from_sql_int(size, "upload size")?;
    Ok(upload)
}

/// The session an alias names (`Store::find_alias`).
pub(crate) fn find_alias(conn: &Connection, key: &str) -> StoreResult<Option<String>> {
    conn.prepare_cached("SELECT session_id FROM aliases WHERE key = ?1")
        .ctx("preparing find_alias")?
        .query_row(params![key], |row| row.get(0))
        .optional()
        .ctx("reading an alias")
}

pub(crate) fn get_upload(
    conn: &Connection,
    session_id: &str,
    id: &str,
) -> StoreResult<Option<Upload>> {
    conn.prepare_cached(&format!(
        "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE session_id = ?1 AND id = ?2"
    ))
    .ctx("preparing get_upload")?
    .query_row(params![session_id, id], upload_from_row)
    .optional()
    .ctx("reading upload")?
    .map(with_size)
    .transpose()
}

pub(crate) fn read_upload(
    conn: &Connection,
    session_id: &str,
    id: &str,
) -> StoreResult<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT bytes FROM uploads WHERE session_id = ?1 AND id = ?2")
        .ctx("preparing read_upload")?
        .query_row(params![session_id, id], |row| row.get(0))
        .optional()
        .ctx("reading upload bytes")
}

pub(crate) fn list_uploads(conn: &Connection, session_id: &str) -> StoreResult<Vec<Upload>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE session_id = ?1 ORDER BY ord"
        ))
        .ctx("preparing list_uploads")?;
    let rows = stmt
        .query_map([session_id], upload_from_row)
        .ctx("listing uploads")?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx("reading uploads")?;
    rows.into_iter().map(with_size).collect()
}

pub(crate) fn export_runs(conn: &Connection, session_id: &str) -> StoreResult<Vec<StoredRun>> {
    let mut stmt = conn
        .prepare_cached(concat!(
            "SELECT ",
            run_columns!(),
            ", client_message_id FROM runs WHERE session_id = ?1 ORDER BY ord"
        ))
        .ctx("preparing export_runs")?;
    let rows = stmt
        .query_map([session_id], |row| {
            Ok((RunRow::read(row)?, row.get::<_, Option<String>>(10)?))
        })
        .ctx("listing runs")?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx("reading runs")?;
    rows.into_iter()
        .map(|(row, client_message_id)| {
            Ok(StoredRun {
                run: row.into_run()?,
                client_message_id,
            })
        })
        .collect()
}
