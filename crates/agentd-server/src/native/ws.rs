//! The native WebSocket `GET /v1/sessions/{id}/ws[?after=N]` (SPEC.md section 4).
//!
//! One task per connection runs a reader and a writer ([`relay::write_loop`]) side by side. The writer is the
//! only one touching the socket's sending half: it takes events from the session's subscription (replay, then
//! live), batching whatever is ready into one flush, and control frames (pong, errors) from a small bounded
//! channel. A client that stops reading only stalls its own writer, which reads from the log when it resumes.

use std::sync::Arc;

use agentd_core::event::LoggedEvent;
use agentd_core::service::{Attached, Principal};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::frame::{self, ClientFrame};
use crate::auth::StreamCaller;
use crate::error::{classify, public_message, ApiError};
use crate::relay::{self, ReadEnd, Render};
use crate::socket::{Message as WsMessage, Upgrade, WebSocket};
use crate::AppState;

pub use crate::socket::MAX_CLIENT_FRAME;

/// `?after=N` of the native WebSocket and SSE: a seq (a whole number, 0 or more). Anything else is a 400 in the
/// native error shape (`invalid_request`), like every other bad request.
pub struct AfterQuery {
    pub after: Option<u64>,
}

impl<S: Send + Sync> FromRequestParts<S> for AfterQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        #[derive(Deserialize)]
        struct Raw {
            after: Option<String>,
        }
        let Query(raw) = Query::<Raw>::try_from_uri(&parts.uri)?;
        let after = match raw.after {
            None => None,
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                ApiError::invalid("`after` must be a seq: a whole number, 0 or more")
            })?),
        };
        Ok(AfterQuery { after })
    }
}

pub async fn upgrade(
    State(st): State<AppState>,
    StreamCaller(p): StreamCaller,
    Path(id): Path<String>,
    q: AfterQuery,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    // One of the principal's stream slots, held by the socket's task (refused with 429 before the upgrade).
    let slot = st.app.open_stream(&p)?;
    let attached = st.app.attach(&p, &id, q.after).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        connection(st, p, id, attached, socket).await;
        drop(slot);
    }))
}

fn error_frame(code: &str, message: &str) -> String {
    json!({"type": "error", "code": code, "message": message}).to_string()
}

async fn connection(
    st: AppState,
    p: Principal,
    session_id: String,
    attached: Attached,
    socket: WebSocket,
) {
    let _open = crate::metrics::websocket_open(&st, "native");
    let Attached {
        subscription,
        last_seq,
        active_run_id,
        cursor_expired,
    } = attached;
    let (sink, mut stream) = socket.split();
    let mut sink = relay::Sink::new(sink);
    let hello = json!({"type": "hello", "session_id": session_id, "last_seq": last_seq, "active_run_id": active_run_id});
    if sink.send_text(hello.to_string()).await.is_err() {
        return;
    }
    if cursor_expired {
        let frame = error_frame(
            "cursor_expired",
            "`after` is older than the retained log; replaying as if no cursor was given",
        );
        if sink.send_text(frame).await.is_err() {
            return;
        }
    }
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<String>(relay::CONTROL_QUEUE);
    let closing = st.closing.clone();
    let mut render = NativeRender;
    let writer = relay::write_loop(&mut sink, subscription, ctrl_rx, closing, &mut render);
    let reader = async {
        loop {
            let msg = match stream.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => return relay::read_end(e),
                None => return ReadEnd::Done,
            };
            let reply = match msg {
                // Boxed: an idle connection then holds a small future, not the largest state `send` can reach.
                WsMessage::Text(text) => {
                    Box::pin(handle_frame(&st, &p, &session_id, text.as_str())).await
                }
                WsMessage::Binary(_) => Some(error_frame(
                    "invalid_frame",
                    "binary frames are not supported; send JSON text",
                )),
                WsMessage::Close(_) => return ReadEnd::Done,
                _ => None,
            };
            if let Some(reply) = reply {
                if ctrl_tx.send(reply).await.is_err() {
                    return ReadEnd::Done;
                }
            }
        }
    };
    let end = tokio::select! {
        _ = writer => ReadEnd::Done,
        end = reader => end,
    };
    match end {
        ReadEnd::Done => sink.shut().await,
        ReadEnd::Refused {
            close_code,
            reason,
            message,
            size,
        } => {
            let code = if close_code == 1009 {
                "too_large"
            } else {
                "invalid_frame"
            };
            let frame = error_frame(code, &message);
            relay::refuse_frame(sink, stream, frame, close_code, reason, size).await;
        }
    }
}

/// The native dialect: an event's frame is its stored JSON, as is.
struct NativeRender;

impl Render for NativeRender {
    fn render(&mut self, event: &LoggedEvent, out: &mut Vec<String>) {
        out.push(event.json.clone());
    }
    fn shared(&mut self, event: &Arc<LoggedEvent>) -> Option<Bytes> {
        Some(relay::stored_json(event))
    }
    fn failure(&self, message: &str) -> String {
        error_frame("internal", message)
    }
}

/// Handles one client frame; returns the frame to answer with, if any.
async fn handle_frame(
    st: &AppState,
    p: &Principal,
    session_id: &str,
    text: &str,
) -> Option<String> {
    let result = match frame::parse(text) {
        Err(e) => return Some(error_frame(e.code, &e.message)),
        Ok(ClientFrame::Ping) => return Some(json!({"type": "pong"}).to_string()),
        Ok(ClientFrame::Message(send)) => st.app.send(p, session_id, send).await.map(|_| ()),
        Ok(ClientFrame::Cancel { run_id }) => st
            .app
            .cancel(p, session_id, run_id.as_deref())
            .await
            .map(|_| ()),
        Ok(ClientFrame::Reply {
            request_id,
            content,
        }) => st
            .app
            .reply(p, session_id, &request_id, content)
            .await
            .map(|_| ()),
        Ok(ClientFrame::Approval {
            request_id,
            decision,
        }) => st
            .app
            .decide(p, session_id, None, &request_id, decision)
            .await
            .map(|_| ()),
    };
    let e = result.err()?;
    let (_, code) = classify(&e);
    Some(error_frame(code, &public_message(&e)))
}
