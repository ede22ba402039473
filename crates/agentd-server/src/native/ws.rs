//! The native WebSocket `GET /v1/sessions/{id}/ws[?after=N]` (SPEC.md section 4).
//!
//! One task per connection runs a reader and a writer ([`relay::write_loop`]) side by side. The writer is the
//! only one touching the socket's sending half: it takes events from the session's subscription (replay, then
//! live), batching whatever is ready into one flush, and control frames (pong, errors) from a small bounded
//! channel. A client that stops reading only stalls its own writer, which reads from the log when it resumes.

use agentd_core::event::LoggedEvent;
use agentd_core::service::{Attached, Principal};
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::frame::{self, ClientFrame};
use crate::auth::StreamCaller;
use crate::error::{classify, public_message, ApiError};
use crate::relay::{self, Render};
use crate::AppState;

/// The largest client frame (images travel inline).
pub const MAX_CLIENT_FRAME: usize = 64 * 1024 * 1024;

#[derive(Deserialize)]
pub struct AfterQuery {
    pub after: Option<u64>,
}

pub async fn upgrade(
    State(st): State<AppState>,
    StreamCaller(p): StreamCaller,
    Path(id): Path<String>,
    Query(q): Query<AfterQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let attached = st.app.attach(&p, &id, q.after).await?;
    Ok(small_buffers(ws).on_upgrade(move |socket| connection(st, p, id, attached, socket)))
}

/// Idle connections should cost little: a small read buffer (allocated up front), a write buffer that only
/// grows when frames are batched (and is capped), large client frames still allowed.
pub fn small_buffers(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.read_buffer_size(2 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(MAX_CLIENT_FRAME)
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
    let Attached {
        subscription,
        last_seq,
        active_run_id,
        cursor_expired,
    } = attached;
    let (mut sink, mut stream) = socket.split();
    let hello = json!({"type": "hello", "session_id": session_id, "last_seq": last_seq, "active_run_id": active_run_id});
    if sink
        .send(WsMessage::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    if cursor_expired {
        let frame = error_frame(
            "cursor_expired",
            "`after` is older than the retained log; replaying as if no cursor was given",
        );
        if sink.send(WsMessage::Text(frame.into())).await.is_err() {
            return;
        }
    }
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<String>(relay::CONTROL_QUEUE);
    let closing = st.closing.clone();
    let mut render = NativeRender;
    let writer = relay::write_loop(&mut sink, subscription, ctrl_rx, closing, &mut render);
    let reader = async {
        while let Some(Ok(msg)) = stream.next().await {
            let reply = match msg {
                // Boxed: an idle connection then holds a small future, not the largest state `send` can reach.
                WsMessage::Text(text) => {
                    Box::pin(handle_frame(&st, &p, &session_id, text.as_str())).await
                }
                WsMessage::Binary(_) => Some(error_frame(
                    "invalid_frame",
                    "binary frames are not supported; send JSON text",
                )),
                WsMessage::Close(_) => break,
                _ => None,
            };
            if let Some(reply) = reply {
                if ctrl_tx.send(reply).await.is_err() {
                    break;
                }
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    let _ = sink.close().await;
}

/// The native dialect: an event's frame is its stored JSON, as is.
struct NativeRender;

impl Render for NativeRender {
    fn render(&mut self, event: &LoggedEvent, out: &mut Vec<String>) {
        out.push(event.json.clone());
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
    };
    let e = result.err()?;
    let (_, code) = classify(&e);
    Some(error_frame(code, &public_message(&e)))
}
