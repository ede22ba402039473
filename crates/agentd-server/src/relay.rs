//! The writer half of every WebSocket surface (native, agentkit, navi), with a dialect's [`Render`] in between.
//!
//! The writer is the only task touching the socket's sending half. It takes events from the session's
//! [`Subscription`] (replay, then live) and renders each into zero or more dialect frames, batching whatever is
//! ready into one flush; control frames (pong, error answers) come from a small bounded channel the reader
//! fills. Nothing here grows with a slow client: a client that stops reading only stalls its own writer, whose
//! subscription then reads from the log when it resumes, and a socket that accepts nothing for
//! [`STALLED_SEND`] is dropped.

use std::time::Duration;

use agentd_core::event::{Event, EventKind, LoggedEvent};
use agentd_core::event_log::Subscription;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events rendered per flush at most (fewer syscalls when events queue up, and a bounded frame buffer).
const MAX_EVENTS_PER_FLUSH: usize = 64;
/// A client whose socket accepts nothing for this long is dropped.
pub(crate) const STALLED_SEND: Duration = Duration::from_secs(60);
/// Control frames waiting for the writer at most; the reader waits beyond it (backpressure, not buffering).
pub(crate) const CONTROL_QUEUE: usize = 16;

pub(crate) type Sink = SplitSink<WebSocket, WsMessage>;

/// Turns the session's events into one dialect's frames.
pub(crate) trait Render: Send {
    /// Appends the frames (JSON text) `event` becomes; often none.
    fn render(&mut self, event: &LoggedEvent, out: &mut Vec<String>);
    /// The dialect's error frame, for when the log cannot be read.
    fn failure(&self, message: &str) -> String;
}

/// A dialect's frame for the session agent's own text delta — the hot frame — written without building a JSON
/// tree: `{"type": frame_type, field: delta}`. None for every other event.
pub(crate) fn text_delta_frame(ev: &Event, frame_type: &str, field: &str) -> Option<String> {
    match &ev.kind {
        EventKind::TextDelta { delta } if !ev.is_subagent => {
            let escaped = serde_json::to_string(delta).ok()?;
            Some(format!(r#"{{"type":"{frame_type}","{field}":{escaped}}}"#))
        }
        _ => None,
    }
}

/// Sends events and control frames until the client goes away, the reader is done, or the server closes.
pub(crate) async fn write_loop<R: Render>(
    sink: &mut Sink,
    mut sub: Subscription,
    mut ctrl: mpsc::Receiver<String>,
    closing: CancellationToken,
    render: &mut R,
) {
    let mut frames: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = closing.cancelled() => {
                // Shutdown settled the runs before `closing` fired: pass on what is already here (their ends).
                while let Some(ev) = sub.try_next() {
                    render.render(&ev, &mut frames);
                    if frames.len() >= MAX_EVENTS_PER_FLUSH {
                        break;
                    }
                }
                let _ = send_all(sink, &mut frames).await;
                close(sink, 1001, "server shutting down").await;
                return;
            }
            c = ctrl.recv() => match c {
                Some(frame) => {
                    if timed(sink.send(WsMessage::Text(frame.into()))).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            ev = sub.next() => match ev {
                Ok(Some(ev)) => {
                    render.render(&ev, &mut frames);
                    for _ in 1..MAX_EVENTS_PER_FLUSH {
                        let Some(ev) = sub.try_next() else { break };
                        render.render(&ev, &mut frames);
                    }
                    if send_all(sink, &mut frames).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "event log read failed for a subscriber");
                    let frame = render.failure("event log read failed; reconnect");
                    let _ = timed(sink.send(WsMessage::Text(frame.into()))).await;
                    return;
                }
            },
        }
    }
}

/// Feeds every frame, then flushes once.
async fn send_all(sink: &mut Sink, frames: &mut Vec<String>) -> Result<(), ()> {
    if frames.is_empty() {
        return Ok(());
    }
    for frame in frames.drain(..) {
        timed(sink.feed(WsMessage::Text(frame.into()))).await?;
    }
    timed(sink.flush()).await
}

/// Sends a close frame (best effort: the client may already be gone).
pub(crate) async fn close(sink: &mut Sink, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = timed(sink.send(WsMessage::Close(Some(frame)))).await;
}

pub(crate) async fn timed<F>(f: F) -> Result<(), ()>
where
    F: std::future::Future<Output = Result<(), axum::Error>>,
{
    match tokio::time::timeout(STALLED_SEND, f).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}
