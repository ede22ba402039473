//! The navi dialect (SPEC.md section 5, seed `004_28d3f1f99cd30b36.txt`): the WebSocket
//! `/ws/sessions/{session_id}`. A thin adapter: the socket attaches to the session's event log like a native
//! subscriber and renders it ([`render`]); the one client frame, `message`, becomes one `Agentd::send`.
//!
//! Choices where the seed is silent or where agentd differs:
//! - **Unknown session**: the handshake is accepted, then closed with 4004 `Session not found` (the seed's
//!   intent; its close-before-accept reached clients as an HTTP 403).
//! - **Auth**: the seed had none. With `[[auth.keys]]` configured the handshake needs `?api_key=KEY` or
//!   `Authorization: Bearer KEY`, and is refused with 401 otherwise, like the native socket.
//! - **Re-attach**: a client connecting while a run is active gets that run replayed from its start (its
//!   `stream_start`, every delta so far), then the live rest, so the whole answer can be rebuilt; the seed only
//!   sent what came after the reconnect. Buffers are bounded: the same subscription and small control channel
//!   as the native socket (see `crate::relay`), where the seed queued without limit.
//! - **Every client of the session sees every run**, whoever sent it (navi's "several subscribers per run",
//!   extended to runs started from other surfaces). Frames are read while a run streams; a `message` sent then
//!   follows the agent's `multitask` setting (by default it runs after the current one).
//! - **Client frame**: `{type:"message", content, images?, files?}` exactly as the seed reads it: text that is
//!   not JSON gets `Invalid JSON`; anything but a `message` with non-empty string `content` gets
//!   `Expected {type: 'message', content: '...'}`; data-URL images are stripped to their base64 (agentd sniffs
//!   the type); `files: [{name, path}]` are appended to the content as
//!   `\n\n[Uploaded files on disk:\n- name → path]`. Malformed `images`/`files` (where the seed crashed) and
//!   refusals by the service (closed session, over-size content, ...) get an error frame with the reason.
//!   Error frames are `{"type":"error","message"}` and the socket stays open.
//! - **Frame size**: frames up to 64 MiB are read (over-size content is refused by the service, as above); a
//!   larger one gets an error frame and a close 1009 instead of the seed's dropped connection. Frames the server
//!   sends are fragmented past 1 MiB, so an answer of any size reaches the client.

pub mod frame;
pub mod render;

use agentd_core::service::{Attached, Principal, ServiceError};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::auth::StreamCaller;
use crate::error::{public_message, ApiError};
use crate::relay::{self, ReadEnd};
use crate::socket::{Message as WsMessage, Upgrade, WebSocket};
use crate::AppState;
use render::{error_frame, NaviRender};

/// The seed's answer to a frame that is not JSON.
pub const INVALID_JSON: &str = "Invalid JSON";
/// The seed's answer to a frame that is not a `message` with content.
pub const EXPECTED_MESSAGE: &str = "Expected {type: 'message', content: '...'}";

pub fn router() -> Router<AppState> {
    Router::new().route("/ws/sessions/{session_id}", get(upgrade))
}

pub async fn upgrade(
    State(st): State<AppState>,
    StreamCaller(p): StreamCaller,
    Path(id): Path<String>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    // One of the principal's stream slots, held by the socket's task (refused with 429 before the upgrade).
    let slot = st.app.open_stream(&p)?;
    // Attached before the upgrade: no event of a run is missed, whatever the handshake's timing.
    let attached = match st.app.attach(&p, &id, None).await {
        Ok(a) => Some(a),
        Err(ServiceError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(ws.on_upgrade(move |socket| async move {
        match attached {
            Some(attached) => connection(st, p, id, attached, socket).await,
            None => {
                let (sink, _stream) = socket.split();
                relay::Sink::new(sink)
                    .close(4004, "Session not found")
                    .await;
            }
        }
        drop(slot);
    }))
}

async fn connection(
    st: AppState,
    p: Principal,
    session_id: String,
    attached: Attached,
    socket: WebSocket,
) {
    let _open = crate::metrics::websocket_open(&st, "navi");
    let (sink, mut stream) = socket.split();
    let mut sink = relay::Sink::new(sink);
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<String>(relay::CONTROL_QUEUE);
    let mut render = NaviRender::default();
    let writer = relay::write_loop(
        &mut sink,
        attached.subscription,
        ctrl_rx,
        st.closing.clone(),
        &mut render,
    );
    let reader = async {
        loop {
            let msg = match stream.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => return relay::read_end(e),
                None => return ReadEnd::Done,
            };
            let reply = match msg {
                // Boxed: an idle connection then holds a small future, not the largest state `send` can reach.
                WsMessage::Text(t) => {
                    Box::pin(handle_frame(&st, &p, &session_id, t.as_str())).await
                }
                WsMessage::Binary(_) => Some(INVALID_JSON.to_string()),
                WsMessage::Close(_) => return ReadEnd::Done,
                _ => None,
            };
            if let Some(message) = reply {
                if ctrl_tx
                    .send(error_frame(&message).to_string())
                    .await
                    .is_err()
                {
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

/// Handles one client frame; returns an error message to send back, if any.
async fn handle_frame(st: &AppState, p: &Principal, session_id: &str, raw: &str) -> Option<String> {
    let send = match frame::parse(raw) {
        Ok(send) => send,
        Err(message) => return Some(message),
    };
    match st.app.send(p, session_id, send).await {
        Ok(_) => None,
        Err(e) => Some(public_message(&e)),
    }
}
