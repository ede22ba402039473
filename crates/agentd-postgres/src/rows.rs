//! Storage rows: how sessions, messages and runs map to columns, and back. Also the error helpers every query
//! uses, so a PostgreSQL failure always reaches the caller as a `StoreError` naming what was being done.
//!
//! Reading never panics on bad data: an unknown enum string, corrupt JSON, a negative counter or a column of an
//! unexpected type becomes `StoreError::Other` naming the row.

use agentd_core::domain::{
    Message, Role, Run, RunError, RunStatus, Session, SessionStatus, ToolCall, Usage,
};
use agentd_core::store::{StoreError, StoreResult};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// A driver error as a `StoreError`, naming what was being done: `Unavailable` when the database could not be
/// reached or the connection was lost ([`is_connection_error`]), `Other` for everything else.
pub(crate) fn pg(what: &str, e: tokio_postgres::Error) -> StoreError {
    let text = format!("postgres: {what}: {}", chain(&e));
    if is_connection_error(&e) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Other(text)
    }
}

/// Is this the connection's failure rather than the statement's? A closed connection, an I/O error (refused,
/// reset, broken pipe), a timeout reaching the server, or one of the server's own "go away" answers:
/// SQLSTATE class 08 (connection exception), 57P01-57P03 (administrator / crash shutdown, cannot connect now),
/// 53300 (too many connections). Everything else (a constraint, a syntax or type error, a missing database) is
/// a real error.
pub(crate) fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    // The driver's own kinds without a source: `Kind::Connect` / `Kind::Timeout` / `Kind::Closed` (not public).
    let text = e.to_string();
    text.starts_with("error connecting to server")
        || text.starts_with("timeout waiting for server")
        || text.starts_with("connection closed")
}

/// An error and its causes, `outer: inner: innermost` (the driver's own text for a connection failure is only
/// "error connecting to server"; the cause, e.g. "Connection refused", is its source). A cause the outer text
/// already ends with is not repeated.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A pool error (no connection could be had) as a `StoreError`: `Unavailable` unless the pool itself is
/// misconfigured.
pub(crate) fn pool(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    let text = format!("postgres: no database connection: {}", chain(&e));
    let unavailable = match &e {
        PoolError::Timeout(_) | PoolError::Closed => true,
        PoolError::Backend(inner) => is_connection_error(inner),
        PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => false,
    };
    if unavailable {
        StoreError::Unavailable(text)
    } else {
        StoreError::Other(text)
    }
}

/// Which constraint a statement broke, if that is why it failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A UNIQUE or PRIMARY KEY constraint, and its name.
    Unique(String),
    /// A foreign key: the session the row points at does not exist.
    ForeignKey,
}

pub(crate) fn violation(e: &tokio_postgres::Error) -> Option<Violation> {
    let db = e.as_db_error()?;
    if *db.code() == SqlState::UNIQUE_VIOLATION {
        Some(Violation::Unique(db.constraint().unwrap_or("").to_string()))
    } else if *db.code() == SqlState::FOREIGN_KEY_VIOLATION {
        Some(Violation::ForeignKey)
    } else {
        None
    }
}

/// Seqs and token counts are u64; PostgreSQL's bigint is i64. Values past i64::MAX are refused, not wrapped.
pub(crate) fn to_sql_int(value: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::Other(format!("{what} {value} is too large to store")))
}

pub(crate) fn from_sql_int(value: i64, what: &str) -> StoreResult<u64> {
    u64::try_from(value)
        .map_err(|_| StoreError::Other(format!("corrupt row: {what} is negative ({value})")))
}

/// A `LIMIT` value: NULL is "no limit".
pub(crate) fn sql_limit(limit: Option<usize>) -> Option<i64> {
    limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX))
}

pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T, what: &str) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Other(format!("serialising {what}: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str, id: &str) -> StoreResult<T> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Other(format!("corrupt row: {what} of {id}: {e}")))
}

fn corrupt(what: &str, id: &str, value: &str) -> StoreError {
    StoreError::Other(format!("corrupt row: {what} of {id} is {value:?}"))
}

/// Column `index` of `row`, or an error naming it.
pub(crate) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> StoreResult<T> {
    row.try_get(index).map_err(|e| {
        let name = row
            .columns()
            .get(index)
            .map(|c| c.name().to_string())
            .unwrap_or_else(|| index.to_string());
        StoreError::Other(format!("corrupt row: column {name}: {e}"))
    })
}

/// The session columns, in the order [`session_from_row`] expects.
macro_rules! session_columns {
    () => {
        "id, principal, agent, title, status, metadata, created_at, updated_at"
    };
}
pub(crate) use session_columns;

/// The domain session. `active_run_id` is not stored: the run manager fills it in.
pub(crate) fn session_from_row(row: &Row) -> StoreResult<Session> {
    let id: String = col(row, 0)?;
    let status: &str = col(row, 4)?;
    let status = SessionStatus::parse(status).ok_or_else(|| corrupt("status", &id, status))?;
    let metadata: Value = from_json(col(row, 5)?, "metadata", &id)?;
    Ok(Session {
        agent: col(row, 2)?,
        title: col(row, 3)?,
        status,
        metadata,
        created_at: col(row, 6)?,
        updated_at: col(row, 7)?,
        active_run_id: None,
        principal: col(row, 1)?,
        id,
    })
}

/// The message columns, in the order [`message_from_row`] expects.
macro_rules! message_columns {
    () => {
        "id, session_id, run_id, role, content, tool_calls, tool_call_id, agent, images, created_at"
    };
}
pub(crate) use message_columns;

pub(crate) fn message_from_row(row: &Row) -> StoreResult<Message> {
    let id: String = col(row, 0)?;
    let role: &str = col(row, 3)?;
    let role = Role::parse(role).ok_or_else(|| corrupt("role", &id, role))?;
    let tool_calls: Option<&str> = col(row, 5)?;
    let tool_calls: Option<Vec<ToolCall>> = match tool_calls {
        Some(text) => Some(from_json(text, "tool_calls", &id)?),
        None => None,
    };
    let images: Vec<String> = from_json(col(row, 8)?, "images", &id)?;
    Ok(Message {
        session_id: col(row, 1)?,
        run_id: col(row, 2)?,
        role,
        content: col(row, 4)?,
        tool_calls,
        tool_call_id: col(row, 6)?,
        agent: col(row, 7)?,
        images,
        created_at: col(row, 9)?,
        id,
    })
}

/// The message's JSON-typed columns, ready to bind.
pub(crate) struct MessageJson {
    pub(crate) tool_calls: Option<String>,
    pub(crate) images: String,
}

impl MessageJson {
    pub(crate) fn of(message: &Message) -> StoreResult<MessageJson> {
        let tool_calls = match &message.tool_calls {
            Some(calls) => Some(to_json(calls, "tool_calls")?),
            None => None,
        };
        Ok(MessageJson {
            tool_calls,
            images: to_json(&message.images, "images")?,
        })
    }
}

/// The run columns, in the order [`run_from_row`] expects.
macro_rules! run_columns {
    () => {
        "id, session_id, status, created_at, started_at, ended_at, error, prompt_tokens, completion_tokens, node"
    };
}
pub(crate) use run_columns;

pub(crate) fn run_from_row(row: &Row) -> StoreResult<Run> {
    let id: String = col(row, 0)?;
    let status: &str = col(row, 2)?;
    let status = RunStatus::parse(status).ok_or_else(|| corrupt("status", &id, status))?;
    let error: Option<&str> = col(row, 6)?;
    let error: Option<RunError> = match error {
        Some(text) => Some(from_json(text, "error", &id)?),
        None => None,
    };
    let usage = Usage {
        prompt_tokens: from_sql_int(col(row, 7)?, "prompt_tokens")?,
        completion_tokens: from_sql_int(col(row, 8)?, "completion_tokens")?,
    };
    Ok(Run {
        session_id: col(row, 1)?,
        status,
        created_at: col(row, 3)?,
        started_at: col(row, 4)?,
        ended_at: col(row, 5)?,
        error,
        usage,
        node: col(row, 9)?,
        id,
    })
}

/// The run's converted columns, ready to bind.
pub(crate) struct RunValues {
    pub(crate) status: &'static str,
    pub(crate) error: Option<String>,
    pub(crate) prompt_tokens: i64,
    pub(crate) completion_tokens: i64,
}

/// A new run row, as `Store::create_run` writes it and a copy imports it: bind [`RunValues::insert_params`].
pub(crate) const INSERT_RUN: &str =
    "INSERT INTO runs (session_id, id, status, created_at, started_at, ended_at,
                                   error, prompt_tokens, completion_tokens, client_message_id, node)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

impl RunValues {
    /// The parameters of [`INSERT_RUN`] for `run` (whose values these are).
    pub(crate) fn insert_params<'a>(
        &'a self,
        run: &'a Run,
        client_message_id: &'a (dyn ToSql + Sync),
    ) -> [&'a (dyn ToSql + Sync); 11] {
        [
            &run.session_id,
            &run.id,
            &self.status,
            &run.created_at,
            &run.started_at,
            &run.ended_at,
            &self.error,
            &self.prompt_tokens,
            &self.completion_tokens,
            client_message_id,
            &run.node,
        ]
    }

    pub(crate) fn of(run: &Run) -> StoreResult<RunValues> {
        let error = match &run.error {
            Some(e) => Some(to_json(e, "run error")?),
            None => None,
        };
        Ok(RunValues {
            status: run.status.as_str(),
            error,
            prompt_tokens: to_sql_int(run.usage.prompt_tokens, "prompt_tokens")?,
            completion_tokens: to_sql_int(run.usage.completion_tokens, "completion_tokens")?,
        })
    }
}
