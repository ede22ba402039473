//! agentkit's REST routes under `/chat` and their wire types, shaped exactly as the seed's pydantic models
//! (`CreateSessionRequest`, `SendMessageRequest`, `SessionResponse`, `MessageResponse`).
//!
//! Request bodies are validated here the way FastAPI would (422 with `{"detail": [{type, loc, msg, input}]}`),
//! because serde's errors have neither that shape nor field locations.

use std::collections::HashMap;

use agentd_core::domain::{Message, Role, RunStatus, Session, SessionStatus};
use agentd_core::service::{Agentd, Principal, SendMessage, ServiceError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::KitError;
use crate::auth::bearer;
use crate::error::{public_message, retry_after};
use crate::AppState;

type KitResult<T> = Result<T, KitError>;

/// Sessions read per store call when listing all of a principal's sessions.
const LIST_PAGE: usize = 1000;

/// `SessionResponse` of the seed.
#[derive(Serialize)]
pub struct SessionResponse {
    pub session_id: String,
    pub agent_name: String,
    pub status: &'static str,
    pub metadata: Value,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Session> for SessionResponse {
    fn from(s: Session) -> SessionResponse {
        SessionResponse {
            session_id: s.id,
            agent_name: s.agent,
            status: s.status.as_str(),
            metadata: s.metadata,
            created_at: isoformat(&s.created_at),
            updated_at: isoformat(&s.updated_at),
        }
    }
}

/// `MessageResponse` of the seed.
#[derive(Serialize)]
pub struct MessageResponse {
    pub message_id: String,
    pub session_id: String,
    pub role: &'static str,
    pub content: String,
    pub tool_call_id: Option<String>,
    pub agent_name: Option<String>,
    pub created_at: String,
}

impl From<Message> for MessageResponse {
    fn from(m: Message) -> MessageResponse {
        MessageResponse {
            message_id: m.id,
            session_id: m.session_id,
            role: m.role.as_str(),
            content: m.content,
            tool_call_id: m.tool_call_id,
            // The seed stored user messages without an agent; agentd notes the session's agent on them.
            agent_name: if m.role == Role::User { None } else { m.agent },
            created_at: isoformat(&m.created_at),
        }
    }
}

/// RFC 3339 `...Z` -> Python's `datetime.isoformat()` form for an aware UTC time (`...+00:00`).
fn isoformat(ts: &str) -> String {
    match ts.strip_suffix('Z') {
        Some(t) => format!("{t}+00:00"),
        None => ts.to_string(),
    }
}

/// The caller of an agentkit REST route: `Authorization: Bearer KEY` when keys are configured.
pub struct KitCaller(pub Principal);

impl FromRequestParts<AppState> for KitCaller {
    type Rejection = KitError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> KitResult<Self> {
        let presented = bearer(parts);
        match state.auth.check(presented) {
            Some(p) => Ok(KitCaller(p)),
            None if presented.is_none() => {
                Err(KitError::new(StatusCode::UNAUTHORIZED, "Not authenticated"))
            }
            None => Err(KitError::new(StatusCode::UNAUTHORIZED, "Invalid API key")),
        }
    }
}

/// Maps a service error on a session route to the seed's status codes and texts.
fn session_error(id: &str, e: ServiceError) -> KitError {
    match e {
        ServiceError::NotFound(_) => KitError::session_not_found(id),
        ServiceError::Conflict {
            code: "session_closed",
            ..
        } => KitError::new(StatusCode::BAD_REQUEST, format!("Session '{id}' is closed")),
        ServiceError::Conflict { message, .. } => KitError::new(StatusCode::CONFLICT, message),
        ServiceError::TooLarge(m) => KitError::new(StatusCode::PAYLOAD_TOO_LARGE, m),
        ServiceError::Invalid(m) => KitError::new(StatusCode::BAD_REQUEST, m),
        ServiceError::Unavailable(m) => KitError::new(StatusCode::SERVICE_UNAVAILABLE, m),
        e @ ServiceError::Limited(_) => KitError {
            retry_after: retry_after(&e),
            ..KitError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        },
        e @ ServiceError::Internal(_) => {
            KitError::new(StatusCode::INTERNAL_SERVER_ERROR, public_message(&e))
        }
    }
}

// ---------------------------------------------------------------- validation ----

/// One pydantic error entry.
fn problem(kind: &str, loc: Value, msg: &str, input: Value) -> Value {
    json!({"type": kind, "loc": loc, "msg": msg, "input": input})
}

/// The JSON object body, or FastAPI's 422 for a missing, malformed or non-object body.
fn body_object(body: Result<Bytes, BytesRejection>) -> KitResult<Map<String, Value>> {
    let bytes = body.map_err(|r| KitError::new(r.status(), r.body_text()))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(KitError::validation(vec![problem(
            "missing",
            json!(["body"]),
            "Field required",
            Value::Null,
        )]));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(KitError::validation(vec![problem(
            "model_attributes_type",
            json!(["body"]),
            "Input should be a valid dictionary or object to extract fields from",
            other,
        )])),
        Err(e) => {
            let position = byte_offset(&bytes, e.line(), e.column());
            Err(KitError::validation(vec![json!({
                "type": "json_invalid",
                "loc": ["body", position],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": e.to_string()},
            })]))
        }
    }
}

/// serde_json's 1-based line and column -> a byte offset, like the position FastAPI reports.
fn byte_offset(bytes: &[u8], line: usize, column: usize) -> usize {
    let line_start: usize = bytes
        .split(|b| *b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    line_start + column.saturating_sub(1)
}

/// A `str` field: required (no default) or optional with a default.
fn str_field(
    body: &Map<String, Value>,
    name: &str,
    default: Option<&str>,
    problems: &mut Vec<Value>,
) -> String {
    match (body.get(name), default) {
        (Some(Value::String(s)), _) => s.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            problems.push(problem(
                "missing",
                json!(["body", name]),
                "Field required",
                Value::Object(body.clone()),
            ));
            String::new()
        }
        (Some(other), _) => {
            problems.push(problem(
                "string_type",
                json!(["body", name]),
                "Input should be a valid string",
                other.clone(),
            ));
            String::new()
        }
    }
}

/// A `dict[str, Any] | None` field.
fn dict_field(body: &Map<String, Value>, name: &str, problems: &mut Vec<Value>) -> Option<Value> {
    match body.get(name) {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(other) => {
            problems.push(problem(
                "dict_type",
                json!(["body", name]),
                "Input should be a valid dictionary",
                other.clone(),
            ));
            None
        }
    }
}

/// An `int` query parameter, at least 0.
fn int_query(q: &HashMap<String, String>, name: &str, problems: &mut Vec<Value>) -> Option<usize> {
    let raw = q.get(name)?;
    match raw.trim().parse::<i64>() {
        Ok(n) if n >= 0 => usize::try_from(n).ok(),
        Ok(_) => {
            problems.push(json!({
                "type": "greater_than_equal",
                "loc": ["query", name],
                "msg": "Input should be greater than or equal to 0",
                "input": raw,
                "ctx": {"ge": 0},
            }));
            None
        }
        Err(_) => {
            problems.push(problem(
                "int_parsing",
                json!(["query", name]),
                "Input should be a valid integer, unable to parse string as an integer",
                Value::String(raw.clone()),
            ));
            None
        }
    }
}

fn check(problems: Vec<Value>) -> KitResult<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(KitError::validation(problems))
    }
}

// ---------------------------------------------------------------- handlers ----

/// `GET /chat/sessions`: all of the caller's sessions (an admin's: everyone's), newest first.
pub async fn list_sessions(
    State(st): State<AppState>,
    KitCaller(p): KitCaller,
) -> KitResult<Json<Vec<SessionResponse>>> {
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = st
            .app
            .list_sessions(&p, LIST_PAGE, before.as_deref())
            .await
            .map_err(|e| session_error("", e))?;
        let full = page.len() == LIST_PAGE;
        before = page.last().map(|s| s.id.clone());
        out.extend(page.into_iter().map(SessionResponse::from));
        if !full {
            return Ok(Json(out));
        }
    }
}

/// `POST /chat/sessions` `{agent_name, metadata?}`: 200 with the new session.
pub async fn create_session(
    State(st): State<AppState>,
    KitCaller(p): KitCaller,
    body: Result<Bytes, BytesRejection>,
) -> KitResult<Json<SessionResponse>> {
    let body = body_object(body)?;
    let mut problems = Vec::new();
    let agent = str_field(&body, "agent_name", None, &mut problems);
    let metadata = dict_field(&body, "metadata", &mut problems);
    check(problems)?;
    match st.app.create_session(&p, &agent, None, metadata).await {
        Ok(s) => Ok(Json(s.into())),
        Err(ServiceError::NotFound(_)) => Err(KitError::new(
            StatusCode::NOT_FOUND,
            format!("Agent '{agent}' not found"),
        )),
        Err(e) => Err(session_error("", e)),
    }
}

/// `GET /chat/sessions/{session_id}`.
pub async fn get_session(
    State(st): State<AppState>,
    KitCaller(p): KitCaller,
    Path(id): Path<String>,
) -> KitResult<Json<SessionResponse>> {
    let s = st
        .app
        .session(&p, &id)
        .await
        .map_err(|e| session_error(&id, e))?;
    Ok(Json(s.into()))
}

/// `GET /chat/sessions/{session_id}/messages?limit=&offset=`: the history, oldest first.
pub async fn get_messages(
    State(st): State<AppState>,
    KitCaller(p): KitCaller,
    Path(id): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> KitResult<Json<Vec<MessageResponse>>> {
    let Query(q) = q.map_err(|r| {
        KitError::validation(vec![problem(
            "value_error",
            json!(["query"]),
            &r.body_text(),
            Value::Null,
        )])
    })?;
    let mut problems = Vec::new();
    let limit = int_query(&q, "limit", &mut problems);
    let offset = int_query(&q, "offset", &mut problems).unwrap_or(0);
    check(problems)?;
    let messages = st
        .app
        .messages(&p, &id, limit, offset)
        .await
        .map_err(|e| session_error(&id, e))?;
    Ok(Json(messages.into_iter().map(Into::into).collect()))
}

/// `POST /chat/sessions/{session_id}/messages` `{content, role?}`: runs the turn and answers with the final
/// assistant message once it has ended.
pub async fn send_message(
    State(st): State<AppState>,
    KitCaller(p): KitCaller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> KitResult<Json<MessageResponse>> {
    let body = body_object(body)?;
    let mut problems = Vec::new();
    let content = str_field(&body, "content", None, &mut problems);
    // Validated as the seed's model does, then ignored as the seed does: the sender is always the user.
    let _role = str_field(&body, "role", Some("user"), &mut problems);
    check(problems)?;
    // The seed's order of checks: unknown session (404), then closed (400).
    let session = st
        .app
        .session(&p, &id)
        .await
        .map_err(|e| session_error(&id, e))?;
    if session.status == SessionStatus::Closed {
        return Err(KitError::new(
            StatusCode::BAD_REQUEST,
            format!("Session '{id}' is closed"),
        ));
    }
    let send = SendMessage {
        content,
        ..Default::default()
    };
    let accepted = st
        .app
        .send(&p, &id, send)
        .await
        .map_err(|e| session_error(&id, e))?;
    let (run, message) = Agentd::wait(accepted.done)
        .await
        .map_err(|e| session_error(&id, e))?;
    match (run.status, message) {
        (RunStatus::Completed, Some(m)) => Ok(Json(m.into())),
        (status, _) => {
            let detail = match run.error {
                Some(e) => e.message,
                None => format!("the run ended {}", status.as_str()),
            };
            Err(KitError::new(StatusCode::INTERNAL_SERVER_ERROR, detail))
        }
    }
}

/// `DELETE /chat/sessions/{session_id}`: `{"status": "closed", "session_id"}`.
pub async fn close_session(
    State(st): State<AppState>,
    KitCaller(p): KitCaller,
    Path(id): Path<String>,
) -> KitResult<Json<Value>> {
    st.app
        .close_session(&p, &id)
        .await
        .map_err(|e| session_error(&id, e))?;
    Ok(Json(json!({"status": "closed", "session_id": id})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_take_python_isoformat() {
        assert_eq!(
            isoformat("2026-01-02T03:04:05.678Z"),
            "2026-01-02T03:04:05.678+00:00"
        );
    }

    #[test]
    fn json_errors_report_a_byte_position() {
        assert_eq!(byte_offset(b"{\n  \"a\": x}", 2, 8), 9);
        let e = body_object(Ok(Bytes::from_static(b"{\"a\": nope}"))).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.detail[0]["type"], "json_invalid");
        assert_eq!(e.detail[0]["loc"][0], "body");
        let e = body_object(Ok(Bytes::from_static(b"  "))).unwrap_err();
        assert_eq!(e.detail[0]["type"], "missing");
        let e = body_object(Ok(Bytes::from_static(b"[1]"))).unwrap_err();
        assert_eq!(e.detail[0]["type"], "model_attributes_type");
    }
}
