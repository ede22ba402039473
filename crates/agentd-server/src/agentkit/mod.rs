//! The agentkit dialect (SPEC.md section 5, seed `000_9e8323a0b8ecf94a.txt`): REST under `/chat` and the
//! WebSocket `/chat/ws/{session_id}`, speaking the seed's field names, frames, status codes and
//! `{"detail": ...}` errors. A thin adapter: handlers call one `Agentd` method each, and the socket renders the
//! session's event log ([`render`]); no run state lives here.
//!
//! - [`rest`]: the REST routes and their wire types (`SessionResponse`, `MessageResponse`).
//! - [`ws`]: the WebSocket (auth by `?api_key=`, `connected`, client frames `message`/`reply`/`cancel`/`ping`,
//!   read by [`frame`]).
//! - [`render`]: internal events -> agentkit frames, with the little per-connection state that needs.
//!
//! Dialect choices where the seed is silent or where agentd differs (documented once, here):
//! - **Auth.** With `[[auth.keys]]` configured, REST needs `Authorization: Bearer KEY` (401
//!   `{"detail": "Not authenticated"}` without one, `{"detail": "Invalid API key"}` for a wrong one); the
//!   WebSocket takes `?api_key=` (or the same Bearer header) and answers a missing or wrong key the seed's way:
//!   accept, `{"type":"error","data":{"message":"Invalid api_key"}}`, close 4001. A session another principal
//!   owns is reported exactly like a missing one.
//! - **Unknown agent** on `POST /chat/sessions`: 404 `{"detail": "Agent 'x' not found"}` (the seed did not
//!   check; agentd cannot create a session for an agent it does not host).
//! - **Validation** failures answer 422 in FastAPI's default shape (`{"detail": [{type, loc, msg, input}]}`);
//!   the seed's `role` field is accepted and, as in the seed, ignored (the message is always the user's).
//! - **History** (`GET .../messages`) is the session's whole stored history, whichever surface wrote it: user,
//!   assistant (also the assistant messages that only call tools, with empty `content`) and tool results
//!   (with `tool_call_id`). `agent_name` is null for user messages, as in the seed. Timestamps are Python
//!   `isoformat()` style (`...+00:00`).
//! - **Synchronous send**: 200 with the final assistant message when the run completes; any other end is 500
//!   `{"detail": <the run's error>}` (a cancelled or interrupted run included: the seed had no other way to
//!   say it). Over-size content is 413, a turn refused by `multitask = "reject"` is 409.
//! - **The socket streams the session, not only its own turns**: it attaches like a native subscriber
//!   (live events, plus the active run replayed from its start), so it sees turns sent from any surface.
//!   Subagent events are not rendered (agentkit frames have no subagent flag; the delegation shows as the
//!   parent's `action`/`observation`).
//! - **`cancel`** cancels the session's active (or first queued) run and really stops it; the
//!   `result {status: "cancelled"}` frame is rendered from the run's `run_finished`, so every agentkit client of
//!   the session learns of it. A `cancel` with nothing to cancel is answered with `result` at once, as the seed
//!   always answered. A `reply` with an unknown `request_id` is ignored, as in the seed.

pub mod frame;
pub mod render;
pub mod rest;
pub mod ws;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/chat/sessions",
            get(rest::list_sessions).post(rest::create_session),
        )
        .route(
            "/chat/sessions/{session_id}",
            get(rest::get_session).delete(rest::close_session),
        )
        .route(
            "/chat/sessions/{session_id}/messages",
            get(rest::get_messages).post(rest::send_message),
        )
        .route("/chat/ws/{session_id}", get(ws::upgrade))
}

/// agentkit's one error shape: FastAPI's `{"detail": ...}` (a string, or a list of validation errors).
#[derive(Debug)]
pub struct KitError {
    pub status: StatusCode,
    pub detail: Value,
    /// Seconds for a `Retry-After` header (a 429 of the rate limit).
    pub retry_after: Option<u64>,
}

impl KitError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> KitError {
        KitError {
            status,
            detail: Value::String(detail.into()),
            retry_after: None,
        }
    }

    /// 422 with pydantic-style error entries.
    pub fn validation(errors: Vec<Value>) -> KitError {
        KitError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: Value::Array(errors),
            retry_after: None,
        }
    }

    pub fn session_not_found(id: &str) -> KitError {
        KitError::new(StatusCode::NOT_FOUND, format!("Session '{id}' not found"))
    }
}

impl IntoResponse for KitError {
    fn into_response(self) -> Response {
        let unauthenticated = self.status == StatusCode::UNAUTHORIZED;
        let mut resp = (self.status, axum::Json(json!({"detail": self.detail}))).into_response();
        if unauthenticated {
            // What FastAPI's HTTPBearer answers with, so standard clients know how to authenticate.
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        resp
    }
}
