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

pub mod render;

use agentd_core::service::{Attached, Principal, SendMessage, ServiceError};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use serde_json::Value;
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

/// The seed's truthiness of `content`: present, and not empty / null / false / 0.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// Builds the user message the seed would: images stripped of their data-URL head, uploaded files noted in
/// the content. Err is the error frame's message.
pub fn user_message(v: &Value) -> Result<SendMessage, String> {
    if v.get("type").and_then(Value::as_str) != Some("message") || !truthy(v.get("content")) {
        return Err(EXPECTED_MESSAGE.into());
    }
    let Some(content) = v.get("content").and_then(Value::as_str) else {
        return Err(EXPECTED_MESSAGE.into());
    };
    let mut content = content.to_string();
    let images = match v.get("images") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                let img = i
                    .as_str()
                    .ok_or_else(|| "`images` must be a list of strings".to_string())?;
                Ok(match (img.starts_with("data:"), img.split_once(',')) {
                    (true, Some((_, b64))) => b64.to_string(),
                    _ => img.to_string(),
                })
            })
            .collect::<Result<Vec<String>, String>>()?,
        other if !truthy(other) => Vec::new(),
        _ => return Err("`images` must be a list of strings".into()),
    };
    let files_error = || "`files` must be a list of {name, path} objects".to_string();
    match v.get("files") {
        Some(Value::Array(files)) if !files.is_empty() => {
            let mut lines = Vec::with_capacity(files.len());
            for f in files {
                let (Some(name), Some(path)) = (
                    f.get("name").and_then(Value::as_str),
                    f.get("path").and_then(Value::as_str),
                ) else {
                    return Err(files_error());
                };
                lines.push(format!("- {name} → {path}"));
            }
            content = format!(
                "{content}\n\n[Uploaded files on disk:\n{}]",
                lines.join("\n")
            );
        }
        other if !truthy(other) => {}
        _ => return Err(files_error()),
    }
    Ok(SendMessage {
        content,
        images,
        // The paths are already in the content, as the seed put them; there are no upload ids to resolve.
        files: Vec::new(),
        ..Default::default()
    })
}

/// Handles one client frame; returns an error message to send back, if any.
async fn handle_frame(st: &AppState, p: &Principal, session_id: &str, raw: &str) -> Option<String> {
    let Ok(v) = serde_json::from_str::<Value>(raw) else {
        return Some(INVALID_JSON.into());
    };
    let send = match user_message(&v) {
        Ok(send) => send,
        Err(message) => return Some(message),
    };
    match st.app.send(p, session_id, send).await {
        Ok(_) => None,
        Err(e) => Some(public_message(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_are_read_as_the_seed_reads_them() {
        for bad in [
            json!({"type": "ping"}),
            json!({"type": "message"}),
            json!({"type": "message", "content": ""}),
            json!({"type": "message", "content": 5}),
            json!(["message"]),
        ] {
            assert_eq!(user_message(&bad).unwrap_err(), EXPECTED_MESSAGE, "{bad}");
        }
        let m = user_message(&json!({
            "type": "message",
            "content": "look",
            "images": ["data:image/png;base64,iVBORw0KGgo=", "R0lGODlh"],
            "files": [{"name": "a.txt", "path": "/up/a.txt"}, {"name": "b", "path": "b"}],
        }))
        .unwrap();
        assert_eq!(m.images, ["iVBORw0KGgo=", "R0lGODlh"]);
        assert_eq!(
            m.content,
            "look\n\n[Uploaded files on disk:\n- a.txt → /up/a.txt\n- b → b]"
        );
        assert!(m.files.is_empty());
        let plain =
            user_message(&json!({"type": "message", "content": "hi", "images": null, "files": []}))
                .unwrap();
        assert_eq!(plain.content, "hi");
        assert!(
            user_message(&json!({"type": "message", "content": "x", "files": [{"name": 1}]}))
                .is_err()
        );
    }
}
