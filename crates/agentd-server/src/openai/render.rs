//! Following one run through the session's log ([`RunEvents`]), and the parts of OpenAI's shapes both APIs
//! share. The Chat Completions chunks are rendered in `chat.rs`, the Responses events in `responses.rs`.

use std::sync::Arc;

use agentd_core::domain::{Message, Role, RunErrorCode, RunStatus, ToolCall, Usage};
use agentd_core::event::{EventKind, LoggedEvent};
use agentd_core::event_log::Subscription;
use agentd_core::store::StoreError;
use axum::http::StatusCode;
use serde_json::{json, Value};

use super::OaiError;

/// The events of one run, in log order, up to and including its `run_finished`. Other runs' events (a user
/// message queued meanwhile, an earlier run being replayed) are skipped.
pub struct RunEvents {
    sub: Subscription,
    session_id: String,
    run_id: String,
    done: bool,
}

impl RunEvents {
    pub fn new(sub: Subscription, session_id: String, run_id: String) -> RunEvents {
        RunEvents {
            sub,
            session_id,
            run_id,
            done: false,
        }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The next event of the run; `None` after its `run_finished` (or when the log closes).
    pub async fn next(&mut self) -> Result<Option<Arc<LoggedEvent>>, StoreError> {
        while !self.done {
            let Some(ev) = self.sub.next().await? else {
                return Ok(None);
            };
            if let Some(ev) = self.mine(ev) {
                return Ok(Some(ev));
            }
        }
        Ok(None)
    }

    /// The next event of the run if one is ready now (lets a writer batch events into one write).
    pub fn try_next(&mut self) -> Option<Arc<LoggedEvent>> {
        while !self.done {
            let ev = self.sub.try_next()?;
            if let Some(ev) = self.mine(ev) {
                return Some(ev);
            }
        }
        None
    }

    fn mine(&mut self, ev: Arc<LoggedEvent>) -> Option<Arc<LoggedEvent>> {
        if ev.event.run_id != self.run_id {
            return None;
        }
        if matches!(ev.event.kind, EventKind::RunFinished { .. }) {
            self.done = true;
        }
        Some(ev)
    }
}

/// How often an SSE stream with nothing to say sends a comment, so proxies keep it open.
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// An SSE response over `body`: chunks of whole events (a writer batches what is ready into one chunk),
/// ended when the server shuts down.
pub fn sse_response(
    body: impl futures_util::Stream<Item = String> + Send + 'static,
    closing: tokio_util::sync::CancellationToken,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures_util::StreamExt;
    let body = body
        .map(|chunk| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(chunk)))
        .take_until(async move { closing.cancelled().await });
    (
        StatusCode::OK,
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// The calls of an assistant message that name one of the client's tools (`client`), if any.
pub fn client_calls(message: &Message, client: &[String]) -> Option<Vec<ToolCall>> {
    if message.role != Role::Assistant {
        return None;
    }
    let calls: Vec<ToolCall> = message
        .tool_calls
        .iter()
        .flatten()
        .filter(|c| client.contains(&c.name))
        .cloned()
        .collect();
    (!calls.is_empty()).then_some(calls)
}

/// OpenAI's `usage` object.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The error a failed or interrupted run answers with, in OpenAI's shape (502 for the upstream, 504 for its
/// timeout, 500 otherwise).
pub fn run_error(status: RunStatus, error: Option<&agentd_core::domain::RunError>) -> OaiError {
    let (code, message) = match error {
        Some(e) => (e.code, e.message.clone()),
        None => (RunErrorCode::Internal, format!("the run ended {status:?}")),
    };
    let (http, code) = match code {
        RunErrorCode::UpstreamError => (StatusCode::BAD_GATEWAY, "upstream_error"),
        RunErrorCode::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        RunErrorCode::MaxIterations => (StatusCode::INTERNAL_SERVER_ERROR, "max_iterations"),
        RunErrorCode::Interrupted => (StatusCode::INTERNAL_SERVER_ERROR, "interrupted"),
        RunErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    OaiError::new(http, "server_error", message).code(code)
}
