//! Storage rows: how sessions, messages and runs map to columns, and back. Also the error helpers every query
//! uses, so a SQLite failure always reaches the caller as a `StoreError` naming what was being done.
//!
//! Reading never panics on bad data: an unknown enum string, corrupt JSON or a negative counter becomes
//! `StoreError::Other` naming the row.

use agentd_core::domain::{
    Message, Role, Run, RunError, RunStatus, Session, SessionStatus, ToolCall, Usage,
};
use agentd_core::store::{StoreError, StoreResult};
use rusqlite::{ErrorCode, Row};
use serde_json::Value;

/// Adds "what we were doing" to a rusqlite error.
pub(crate) trait Context<T> {
    fn ctx(self, what: &str) -> StoreResult<T>;
}

impl<T> Context<T> for rusqlite::Result<T> {
    fn ctx(self, what: &str) -> StoreResult<T> {
        self.map_err(|e| StoreError::Other(format!("sqlite: {what}: {e}")))
    }
}

/// Which constraint an insert or update broke, if that is why it failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A UNIQUE or PRIMARY KEY constraint.
    Unique,
    /// A foreign key: the session the row points at does not exist.
    ForeignKey,
}

pub(crate) fn violation(err: &rusqlite::Error) -> Option<Violation> {
    match err {
        rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::ConstraintViolation => {
            match e.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => Some(Violation::Unique),
                rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => Some(Violation::ForeignKey),
                _ => None,
            }
        }
        _ => None,
    }
}

/// SQLite integers are i64; seqs and token counts are u64. Values past i64::MAX are refused, not wrapped.
pub(crate) fn to_sql_int(value: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::Other(format!("{what} {value} is too large to store")))
}

pub(crate) fn from_sql_int(value: i64, what: &str) -> StoreResult<u64> {
    u64::try_from(value)
        .map_err(|_| StoreError::Other(format!("corrupt row: {what} is negative ({value})")))
}

/// A `LIMIT` value; SQLite treats a negative limit as "no limit".
pub(crate) fn sql_limit(limit: Option<usize>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
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

/// The session columns, in the order [`SessionRow::read`] expects.
macro_rules! session_columns {
    () => {
        "id, principal, agent, title, status, metadata, created_at, updated_at"
    };
}
pub(crate) use session_columns;

/// A `sessions` row as stored.
pub(crate) struct SessionRow {
    id: String,
    principal: String,
    agent: String,
    title: Option<String>,
    status: String,
    metadata: String,
    created_at: String,
    updated_at: String,
}

impl SessionRow {
    pub(crate) fn read(row: &Row<'_>) -> rusqlite::Result<SessionRow> {
        Ok(SessionRow {
            id: row.get(0)?,
            principal: row.get(1)?,
            agent: row.get(2)?,
            title: row.get(3)?,
            status: row.get(4)?,
            metadata: row.get(5)?,
            created_at: row.get(6)?,
            updated_at: row.get(7)?,
        })
    }

    /// The domain session. `active_run_id` is not stored: the run manager fills it in.
    pub(crate) fn into_session(self) -> StoreResult<Session> {
        let status = SessionStatus::parse(&self.status)
            .ok_or_else(|| corrupt("status", &self.id, &self.status))?;
        let metadata: Value = from_json(&self.metadata, "metadata", &self.id)?;
        Ok(Session {
            id: self.id,
            agent: self.agent,
            title: self.title,
            status,
            metadata,
            created_at: self.created_at,
            updated_at: self.updated_at,
            active_run_id: None,
            principal: self.principal,
        })
    }
}

/// The message columns, in the order [`MessageRow::read`] expects.
macro_rules! message_columns {
    () => {
        "id, session_id, run_id, role, content, tool_calls, tool_call_id, agent, images, created_at"
    };
}
pub(crate) use message_columns;

/// A `messages` row as stored.
pub(crate) struct MessageRow {
    id: String,
    session_id: String,
    run_id: Option<String>,
    role: String,
    content: String,
    tool_calls: Option<String>,
    tool_call_id: Option<String>,
    agent: Option<String>,
    images: String,
    created_at: String,
}

impl MessageRow {
    pub(crate) fn read(row: &Row<'_>) -> rusqlite::Result<MessageRow> {
        Ok(MessageRow {
            id: row.get(0)?,
            session_id: row.get(1)?,
            run_id: row.get(2)?,
            role: row.get(3)?,
            content: row.get(4)?,
            tool_calls: row.get(5)?,
            tool_call_id: row.get(6)?,
            agent: row.get(7)?,
            images: row.get(8)?,
            created_at: row.get(9)?,
        })
    }

    pub(crate) fn into_message(self) -> StoreResult<Message> {
        let role = Role::parse(&self.role).ok_or_else(|| corrupt("role", &self.id, &self.role))?;
        let tool_calls: Option<Vec<ToolCall>> = match &self.tool_calls {
            Some(text) => Some(from_json(text, "tool_calls", &self.id)?),
            None => None,
        };
        let images: Vec<String> = from_json(&self.images, "images", &self.id)?;
        Ok(Message {
            id: self.id,
            session_id: self.session_id,
            run_id: self.run_id,
            role,
            content: self.content,
            tool_calls,
            tool_call_id: self.tool_call_id,
            agent: self.agent,
            images,
            created_at: self.created_at,
        })
    }
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

/// The run columns, in the order [`RunRow::read`] expects.
macro_rules! run_columns {
    () => {
        "id, session_id, status, created_at, started_at, ended_at, error, prompt_tokens, completion_tokens, node"
    };
}
pub(crate) use run_columns;

/// A `runs` row as stored.
pub(crate) struct RunRow {
    id: String,
    session_id: String,
    status: String,
    created_at: String,
    started_at: Option<String>,
    ended_at: Option<String>,
    error: Option<String>,
    prompt_tokens: i64,
    completion_tokens: i64,
    node: Option<String>,
}

impl RunRow {
    pub(crate) fn read(row: &Row<'_>) -> rusqlite::Result<RunRow> {
        Ok(RunRow {
            id: row.get(0)?,
            session_id: row.get(1)?,
            status: row.get(2)?,
            created_at: row.get(3)?,
            started_at: row.get(4)?,
            ended_at: row.get(5)?,
            error: row.get(6)?,
            prompt_tokens: row.get(7)?,
            completion_tokens: row.get(8)?,
            node: row.get(9)?,
        })
    }

    pub(crate) fn into_run(self) -> StoreResult<Run> {
        let status = RunStatus::parse(&self.status)
            .ok_or_else(|| corrupt("status", &self.id, &self.status))?;
        let error: Option<RunError> = match &self.error {
            Some(text) => Some(from_json(text, "error", &self.id)?),
            None => None,
        };
        let usage = Usage {
            prompt_tokens: from_sql_int(self.prompt_tokens, "prompt_tokens")?,
            completion_tokens: from_sql_int(self.completion_tokens, "completion_tokens")?,
        };
        Ok(Run {
            id: self.id,
            session_id: self.session_id,
            status,
            created_at: self.created_at,
            started_at: self.started_at,
            ended_at: self.ended_at,
            error,
            usage,
            node: self.node,
        })
    }
}

/// The run's converted columns, ready to bind.
pub(crate) struct RunValues {
    pub(crate) error: Option<String>,
    pub(crate) prompt_tokens: i64,
    pub(crate) completion_tokens: i64,
}

impl RunValues {
    pub(crate) fn of(run: &Run) -> StoreResult<RunValues> {
        let error = match &run.error {
            Some(e) => Some(to_json(e, "run error")?),
            None => None,
        };
        Ok(RunValues {
            error,
            prompt_tokens: to_sql_int(run.usage.prompt_tokens, "prompt_tokens")?,
            completion_tokens: to_sql_int(run.usage.completion_tokens, "completion_tokens")?,
        })
    }
}
