//! agentkit's WebSocket `/chat/ws/{session_id}?api_key=` (the seed's `chat_websocket`).
//!
//! The seed's handshake: accept, then either an error frame and a close (4001 for a bad or missing key, 1000
//! for an unknown or closed session) or `{"type":"connected","session_id"}`. After that, one task per
//! connection runs a reader and a writer ([`relay::write_loop`]) side by side, so frames are read while a turn
//! runs: `cancel` stops the running turn and `reply` reaches a waiting `ask_human` (the seed's two bugs, fixed).
//! Client frames: `message {content}`, `reply {request_id, content}`, `cancel`, `ping` (-> `pong`); anything
//! else, and text that is not JSON, is ignored as the seed ignored it. After 300 s without a client frame the
//! server sends a `pong`, as the seed's receive timeout did.

use std::time::Duration;

use agentd_core::domain::{RunStatus, SessionStatus};
use agentd_core::service::{Attached, Principal, SendMessage, ServiceError};
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::frame::{self, ClientFrame, FrameError};
use super::render::{cancelled_frame, error_frame, AgentkitRender};
use crate::auth::{bearer, query_key};
use crate::error::public_message;
use crate::native::ws::small_buffers;
use crate::relay::{self, Sink};
use crate::AppState;

/// The seed's receive timeout, after which it sent a `pong` unasked.
const IDLE_PONG: Duration = Duration::from_secs(300);

/// The caller of the socket, or None when keys are configured and `?api_key=` (or a Bearer header) is missing
/// or wrong. Never rejects: the seed accepts first and reports the bad key in-band.
pub struct SocketKey(pub Option<Principal>);

impl FromRequestParts<AppState> for SocketKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let presented = query_key(parts).or_else(|| bearer(parts).map(str::to_string));
        Ok(SocketKey(state.auth.check(presented.as_deref())))
    }
}

pub async fn upgrade(
    State(st): State<AppState>,
    SocketKey(p): SocketKey,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Response {
    small_buffers(ws).on_upgrade(move |socket| connection(st, p, id, socket))
}

fn text(v: &Value) -> WsMessage {
    WsMessage::Text(v.to_string().into())
}

/// The seed's refusal after accepting: an error frame, then a close.
async fn refuse(sink: &mut Sink, message: &str, code: u16, reason: &str) {
    let _ = relay::timed(sink.send(text(&error_frame(message)))).await;
    relay::close(sink, code, reason).await;
}

/// Checks the session as the seed does, then attaches to its events.
async fn open(
    st: &AppState,
    p: &Principal,
    id: &str,
) -> Result<Attached, (String, u16, &'static str)> {
    let refused = |e: ServiceError| match e {
        ServiceError::NotFound(_) => (
            format!("Session '{id}' not found"),
            1000,
            "Session not found",
        ),
        other => (public_message(&other), 1011, "internal error"),
    };
    let session = st.app.session(p, id).await.map_err(refused)?;
    if session.status == SessionStatus::Closed {
        return Err(("Session is closed".into(), 1000, "Session closed"));
    }
    // Live events of the session, plus the active run replayed from its start (a reload mid-answer).
    st.app.attach(p, id, None).await.map_err(refused)
}

async fn connection(st: AppState, p: Option<Principal>, session_id: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let Some(p) = p else {
        refuse(&mut sink, "Invalid api_key", 4001, "Invalid api_key").await;
        return;
    };
    let attached = match open(&st, &p, &session_id).await {
        Ok(a) => a,
        Err((message, code, reason)) => {
            refuse(&mut sink, &message, code, reason).await;
            return;
        }
    };
    let connected = json!({"type": "connected", "session_id": session_id});
    if relay::timed(sink.send(text(&connected))).await.is_err() {
        return;
    }
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<String>(relay::CONTROL_QUEUE);
    let mut render = AgentkitRender::default();
    let writer = relay::write_loop(
        &mut sink,
        attached.subscription,
        ctrl_rx,
        st.closing.clone(),
        &mut render,
    );
    let reader = async {
        loop {
            let msg = match tokio::time::timeout(IDLE_PONG, stream.next()).await {
                Err(_) => Some(json!({"type": "pong"})),
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    // Boxed: an idle connection then holds a small future, not the largest state `send` reaches.
                    Box::pin(handle_frame(&st, &p, &session_id, t.as_str())).await
                }
                Ok(Some(Ok(WsMessage::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
                Ok(Some(Ok(_))) => None,
            };
            if let Some(reply) = msg {
                if ctrl_tx.send(reply.to_string()).await.is_err() {
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

/// What a client sees when the service refuses a frame.
fn refusal(e: &ServiceError) -> String {
    match e {
        ServiceError::Conflict {
            code: "session_closed",
            ..
        } => "Session is closed".into(),
        other => public_message(other),
    }
}

/// Handles one client frame; returns the frame to answer with, if any.
async fn handle_frame(st: &AppState, p: &Principal, session_id: &str, raw: &str) -> Option<Value> {
    match frame::parse(raw) {
        Ok(None) => None,
        Err(FrameError(message)) => Some(error_frame(&message)),
        Ok(Some(ClientFrame::Message { content })) => {
            let send = SendMessage {
                content,
                ..Default::default()
            };
            match st.app.send(p, session_id, send).await {
                Ok(_) => None,
                Err(e) => Some(error_frame(&refusal(&e))),
            }
        }
        Ok(Some(ClientFrame::Reply {
            request_id,
            content,
        })) => {
            // The seed ignores a reply nobody waits for; so does this.
            let _ = st.app.reply(p, session_id, &request_id, content).await;
            None
        }
        Ok(Some(ClientFrame::Cancel)) => match st.app.cancel(p, session_id, None).await {
            // The run's `run_finished` renders the `result` frame for every client of the session.
            Ok(Some(run)) if run.status == RunStatus::Cancelled => None,
            // Nothing was running (or it ended first): the seed answered every cancel all the same.
            Ok(_) => Some(cancelled_frame()),
            Err(e) => Some(error_frame(&refusal(&e))),
        },
        Ok(Some(ClientFrame::Ping)) => Some(json!({"type": "pong"})),
    }
}
