//! Domain types: sessions, messages, runs. These are also the native API's JSON shapes (SPEC.md section 3),
//! which is why they derive `Serialize`; storage rows and other dialects' wire types live elsewhere.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A new opaque id (UUID v4, simple form).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The current time as RFC 3339 UTC with millisecond precision, e.g. `2026-11-21T08:31:02.123Z`.
pub fn now_rfc3339() -> String {
    let ts = jiff::Timestamp::now();
    format!("{ts:.3}")
}

/// A file uploaded to a session (or a tool result kept whole): the store holds this record and the bytes;
/// the session's workspace holds the file at `path` for file tools (see `core/uploads.rs`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Upload {
    pub id: String,
    pub name: String,
    /// Relative to the session workspace; what file tools take. One sanitised file name, unique in the session.
    pub path: String,
    pub size: u64,
    pub content_type: String,
}

/// A conversation between one principal and one agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Session {
    pub id: String,
    pub agent: String,
    pub title: Option<String>,
    pub status: SessionStatus,
    pub metadata: Value,
    pub created_at: String,
    pub updated_at: String,
    /// The run that currently holds the session's turn, if any (not stored; filled in by the run manager).
    pub active_run_id: Option<String>,
    /// Who owns the session. Never serialised to clients.
    #[serde(skip)]
    pub principal: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Active,
    Closed,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(SessionStatus::Active),
            "closed" => Some(SessionStatus::Closed),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    Tool,
    System,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::System => "system",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            "system" => Some(Role::System),
            _ => None,
        }
    }
}

/// A tool call the model asked for. `arguments` is the raw JSON text the model produced, kept verbatim so the
/// upstream sees its own call again on the next model call.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One stored message of a session's history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub id: String,
    pub session_id: String,
    pub run_id: Option<String>,
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The agent that wrote it (assistant/tool messages), or the session's agent for user messages.
    pub agent: Option<String>,
    /// Images attached to a user message, as data URLs. Kept so later turns still see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    pub created_at: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    WaitingInput,
    Completed,
    Cancelled,
    Failed,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::WaitingInput => "waiting_input",
            RunStatus::Completed => "completed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "waiting_input" => RunStatus::WaitingInput,
            "completed" => RunStatus::Completed,
            "cancelled" => RunStatus::Cancelled,
            "failed" => RunStatus::Failed,
            "interrupted" => RunStatus::Interrupted,
            _ => return None,
        })
    }
    /// True once the run can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed
                | RunStatus::Cancelled
                | RunStatus::Failed
                | RunStatus::Interrupted
        )
    }
}

/// Why a run failed or was interrupted.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunErrorCode {
    UpstreamError,
    UpstreamTimeout,
    MaxIterations,
    Interrupted,
    Internal,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunError {
    pub code: RunErrorCode,
    pub message: String,
}

/// Token usage summed over a run's model calls, as the upstream reported it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One turn: a user message and everything the agent did to answer it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Run {
    pub id: String,
    pub session_id: String,
    pub status: RunStatus,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub error: Option<RunError>,
    pub usage: Usage,
    /// The node executing the run (SPEC.md section 6): set while it runs, null when none.
    #[serde(default)]
    pub node: Option<String>,
}

impl Run {
    /// A fresh queued run.
    pub fn queued(session_id: &str) -> Run {
        Run {
            id: new_id(),
            session_id: session_id.to_string(),
            status: RunStatus::Queued,
            created_at: now_rfc3339(),
            started_at: None,
            ended_at: None,
            error: None,
            usage: Usage::default(),
            node: None,
        }
    }
}

/// A node of the cluster as its registry holds it (`GET /v1/cluster`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub node_id: String,
    /// The address it serves on.
    pub listen: String,
    pub started_at: String,
    /// Its latest heartbeat (RFC 3339).
    pub last_seen: String,
    /// Unfinished runs it executes.
    pub runs: u64,
}
