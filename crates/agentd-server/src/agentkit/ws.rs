//! agentkit's WebSocket `/chat/ws/{session_id}?api_key=` (the seed's `chat_websocket`).
//!
//! The seed's handshake: accept, then either an error frame and a close (4001 for a bad or missing key, 1000
//! for an unknown or closed session) or `{"type":"connected","session_id"}`. After that, one task per
//! connection runs a reader and a writer ([`relay::write_loop`]) side by side, so frames are read while a turn
//! runs: `cancel` stops the running turn and `reply` reaches a waiting `ask_human` (the seed's two bugs, fixed).
//! Client frames: `message {content}`, `reply {request_id, content}`, `cancel`, `ping` (-> `pong`); anything
//! else, and text that is not JSON, is ignored as the seed ignored it. After 300 s without a client frame the
//! server sends a `pong`, as the seed's receive timeout did. A frame over the server's 64 MiB frame cap (the
//! seed had uvicorn's 16 MiB) gets an `error` frame and a close 1009 (see `crate::relay::refuse_frame`).

use std::time::Duration;

use agentd_core::domain::{RunStatus, SessionStatus};
use agentd_core::service::{Attached, Principal, SendMessage, ServiceError};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::frame::{self, ClientFrame, FrameError};
use super::render::{cancelled_frame, error_frame, AgentkitRender};
use super::KitError;
use crate::auth::{bearer, query_key};
use crate::error::public_message;
use crate::relay::{self, ReadEnd, Sink};
use crate::socket::{Message as WsMessage, Upgrade, WebSocket};
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
    ws: Upgrade,
) -> Response {
    // One of the principal's stream slots, held by the socket's task. Over the limit the handshake is refused
    // with 429 `{"detail": ...}` before the upgrade (a bad key is still refused in-band, as the seed did).
    let slot = match p.as_ref().map(|p| st.app.open_stream(p)).transpose() {
        Ok(slot) => slot,
        Err(e) => {
            return KitError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).into_response()
        }
    };
    ws.on_upgrade(move |socket| async move {
        connection(st, p, id, socket).await;
        drop(slot);
    })
}

/// The seed's refusal after accepting: an error frame, then a close.
async fn refuse(sink: &mut Sink, message: &str, code: u16, reason: &str) {
    let _ = sink.send_text(error_frame(message).to_string()).await;
    sink.close(code, reason).await;
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
        // 1013 "try again later": the database is away for now.
        e @ ServiceError::Unavailable(_) => (public_message(&e), 1013, "unavailable"),
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
    let _open = crate::metrics::websocket_open(&st, "agentkit");
    let (sink, mut stream) = socket.split();
    let mut sink = Sink::new(sink);
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
    if sink.send_text(connected.to_string()).await.is_err() {
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
                Ok(Some(Err(e))) => return relay::read_end(e),
                Ok(Some(Ok(WsMessage::Close(_)))) | Ok(None) => return ReadEnd::Done,
                Ok(Some(Ok(_))) => None,
            };
            if let Some(reply) = msg {
                if ctrl_tx.send(reply.to_string()).await.is_err() {
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
            let frame = error_frame(&message).to_string();
            relay::refuse_frame(sink, stream, frame, close_code, reason, size).await;
        }
    }
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
            // The seed ignores a reply nobody waits for; so does this. One over the size limit is refused.
            match st.app.reply(p, session_id, &request_id, content).await {
                Err(e @ ServiceError::TooLarge(_)) => Some(error_frame(&refusal(&e))),
                _ => None,
            }
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
