//! The writer half of every WebSocket surface (native, agentkit, navi), with a dialect's [`Render`] in between.
//!
//! The writer is the only task touching the socket's sending half. It takes events from the session's
//! [`Subscription`] (replay, then live) and renders each into zero or more dialect frames, batching whatever is
//! ready into one flush; control frames (pong, error answers) come from a small bounded channel the reader
//! fills. Nothing here grows with a slow client: a client that stops reading only stalls its own writer, whose
//! subscription then reads from the log when it resumes, and a socket that accepts nothing for
//! [`STALLED_SEND`] is dropped.
//!
//! Events of any size reach every client (SPEC.md section 4): a message longer than [`FRAGMENT`] goes out as a
//! text frame and continuation frames of at most [`FRAGMENT`] bytes each, so a client with default WebSocket
//! limits (16 MiB frames, 64 MiB messages) reads a 32 MB answer, and the socket's write buffer never holds
//! more than one fragment beyond its small target size. Frames are rendered and sent one event at a time (the
//! native frame is the stored JSON itself, shared, not copied), so a writer holds at most one event's frames.
//!
//! The reading side ends on a frame the socket cannot take (over [`crate::socket::MAX_CLIENT_FRAME`], or a
//! protocol violation): [`refuse_frame`] answers with the dialect's error frame and a close (1009 for size),
//! then reads and discards what the client still sends (bounded in bytes and time), so the client gets the
//! answer and a FIN instead of a TCP reset.

use std::sync::Arc;
use std::time::Duration;

use agentd_core::event::{Event, EventKind, LoggedEvent};
use agentd_core::event_log::Subscription;
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

use crate::socket::{Message as WsMessage, WebSocket};

/// Events rendered per flush at most (fewer syscalls when events queue up).
const MAX_EVENTS_PER_FLUSH: usize = 64;
/// A client whose socket accepts nothing for this long is dropped.
pub(crate) const STALLED_SEND: Duration = Duration::from_secs(60);
/// Control frames waiting for the writer at most; the reader waits beyond it (backpressure, not buffering).
pub(crate) const CONTROL_QUEUE: usize = 16;
/// The largest WebSocket frame the server sends: longer messages are fragmented.
pub const FRAGMENT: usize = 1024 * 1024;
/// After refusing a client frame, what is read and discarded at most while the client finishes sending, beyond
/// the refused frame's own declared length (itself counted up to [`DRAIN_MAX_FRAME`]).
const DRAIN_SLACK: usize = 1024 * 1024;
const DRAIN_MAX_FRAME: usize = 256 * 1024 * 1024;
/// ... and for how long.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// Turns the session's events into one dialect's frames.
pub(crate) trait Render: Send {
    /// Appends the frames (JSON text) `event` becomes; often none.
    fn render(&mut self, event: &LoggedEvent, out: &mut Vec<String>);
    /// The event's only frame when it is the stored JSON as is (the native dialect), shared rather than copied.
    /// None (the default) means [`Render::render`] decides.
    fn shared(&mut self, _event: &Arc<LoggedEvent>) -> Option<Bytes> {
        None
    }
    /// The dialect's error frame, for when the log cannot be read.
    fn failure(&self, message: &str) -> String;
}

/// The stored JSON of an event as the bytes of a frame, without a copy.
pub(crate) fn stored_json(event: &Arc<LoggedEvent>) -> Bytes {
    Bytes::from_owner(StoredJson(event.clone()))
}

struct StoredJson(Arc<LoggedEvent>);

impl AsRef<[u8]> for StoredJson {
    fn as_ref(&self) -> &[u8] {
        self.0.json.as_bytes()
    }
}

/// A dialect's frame for the session agent's own text delta — the hot frame — written without building a JSON
/// tree: `{"type": frame_type, field: delta}`. None for every other event.
pub(crate) fn text_delta_frame(ev: &Event, frame_type: &str, field: &str) -> Option<String> {
    match &ev.kind {
        EventKind::TextDelta { delta } if !ev.is_subagent => {
            // One buffer, sized for the common case (nothing to escape): no intermediate string.
            let mut out = Vec::with_capacity(frame_type.len() + field.len() + delta.len() + 16);
            out.extend_from_slice(br#"{"type":""#);
            out.extend_from_slice(frame_type.as_bytes());
            out.extend_from_slice(br#"",""#);
            out.extend_from_slice(field.as_bytes());
            out.extend_from_slice(br#"":"#);
            serde_json::to_writer(&mut out, delta).ok()?;
            out.push(b'}');
            String::from_utf8(out).ok()
        }
        _ => None,
    }
}

/// The sending half of a socket. Text messages longer than [`FRAGMENT`] go out as several frames; the part of
/// a message not yet handed to the socket is kept here, so a writer cancelled between two fragments (the
/// connection's reader ended first) leaves a message that [`Sink::finish_message`] completes before anything
/// else is sent on the socket.
pub(crate) struct Sink {
    inner: SplitSink<WebSocket, WsMessage>,
    pending: Option<Pending>,
}

struct Pending {
    rest: Bytes,
    started: bool,
}

impl Sink {
    pub(crate) fn new(inner: SplitSink<WebSocket, WsMessage>) -> Sink {
        Sink {
            inner,
            pending: None,
        }
    }

    /// Queues one text message (`text` is UTF-8) without flushing.
    pub(crate) async fn feed(&mut self, text: Bytes) -> Result<(), ()> {
        self.finish_message().await?;
        self.pending = Some(Pending {
            rest: text,
            started: false,
        });
        self.finish_message().await
    }

    /// Queues what is left of a message whose sending was interrupted (nothing, usually).
    pub(crate) async fn finish_message(&mut self) -> Result<(), ()> {
        let Sink { inner, pending } = self;
        while let Some(p) = pending.as_mut() {
            let end = fragment_end(&p.rest);
            let last = end == p.rest.len();
            let opcode = OpCode::Data(if p.started {
                Data::Continue
            } else {
                Data::Text
            });
            let frame = Frame::message(p.rest.slice(..end), opcode, last);
            timed(inner.feed(WsMessage::Frame(frame))).await?;
            // Only once the frame is queued (a cancelled `feed` queued nothing): the state stays true.
            if last {
                *pending = None;
            } else {
                p.rest = p.rest.slice(end..);
                p.started = true;
            }
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ()> {
        timed(self.inner.flush()).await
    }

    /// Sends one text message and flushes.
    pub(crate) async fn send_text(&mut self, text: String) -> Result<(), ()> {
        self.feed(Bytes::from(text)).await?;
        self.flush().await
    }

    /// Sends a close frame after any unfinished message (best effort: the client may already be gone).
    pub(crate) async fn close(&mut self, code: u16, reason: &str) {
        if self.finish_message().await.is_err() {
            return;
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = timed(self.inner.send(WsMessage::Close(Some(frame)))).await;
    }

    /// Closes the sending half (a close frame if none was sent).
    pub(crate) async fn shut(&mut self) {
        if self.finish_message().await.is_ok() {
            let _ = timed(self.inner.close()).await;
        }
    }
}

/// Where the next fragment of `rest` ends: at most [`FRAGMENT`] bytes, on a UTF-8 character boundary (clients
/// must accept a character split between frames, but some validate each frame).
fn fragment_end(rest: &[u8]) -> usize {
    if rest.len() <= FRAGMENT {
        return rest.len();
    }
    let mut end = FRAGMENT;
    // At most three continuation bytes precede a character's first byte.
    while end > FRAGMENT - 3 && (rest[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    end
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
                let mut sent = 0;
                while let Some(ev) = sub.try_next() {
                    if send_event(sink, render, &ev, &mut frames).await.is_err() {
                        return;
                    }
                    sent += 1;
                    if sent >= MAX_EVENTS_PER_FLUSH {
                        break;
                    }
                }
                let _ = sink.flush().await;
                sink.close(1001, "server shutting down").await;
                return;
            }
            c = ctrl.recv() => match c {
                Some(frame) => {
                    if sink.send_text(frame).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            ev = sub.next() => match ev {
                Ok(Some(ev)) => {
                    let mut ev = ev;
                    let mut sent = 1;
                    loop {
                        if send_event(sink, render, &ev, &mut frames).await.is_err() {
                            return;
                        }
                        if sent >= MAX_EVENTS_PER_FLUSH {
                            break;
                        }
                        // The event just sent is released before the next is taken.
                        match sub.try_next() {
                            Some(next) => ev = next,
                            None => break,
                        }
                        sent += 1;
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    if matches!(e, agentd_core::store::StoreError::Unavailable(_)) {
                        // The store logs the outage once; a line per subscriber would drown it.
                        tracing::debug!(error = %e, "event log read failed for a subscriber");
                    } else {
                        tracing::warn!(error = %e, "event log read failed for a subscriber");
                    }
                    let frame = render.failure("event log read failed; reconnect");
                    let _ = sink.send_text(frame).await;
                    return;
                }
            },
        }
    }
}

/// Renders one event and queues its frames (no flush).
async fn send_event<R: Render>(
    sink: &mut Sink,
    render: &mut R,
    ev: &Arc<LoggedEvent>,
    frames: &mut Vec<String>,
) -> Result<(), ()> {
    if let Some(frame) = render.shared(ev) {
        return sink.feed(frame).await;
    }
    render.render(ev, frames);
    for frame in frames.drain(..) {
        sink.feed(Bytes::from(frame)).await?;
    }
    Ok(())
}

/// Why the reading side of a socket ended.
pub(crate) enum ReadEnd {
    /// The client closed, went away, or the server is done with it.
    Done,
    /// A frame the socket cannot take: answer it with the dialect's error frame (this message) and this close.
    Refused {
        close_code: u16,
        reason: &'static str,
        message: String,
        /// The refused frame's declared length, when its size was the problem (what the client still sends).
        size: usize,
    },
}

/// What a read error means for the connection.
pub(crate) fn read_end(e: WsError) -> ReadEnd {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => ReadEnd::Refused {
            close_code: 1009,
            reason: "frame too large",
            message: format!(
                "the frame is {size} bytes; frames and messages are read up to {max_size} bytes"
            ),
            size,
        },
        WsError::Utf8(_) => ReadEnd::Refused {
            close_code: 1007,
            reason: "invalid UTF-8",
            message: "a text frame is not valid UTF-8".into(),
            size: 0,
        },
        // The client went away without a close frame: nobody is left to answer.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => ReadEnd::Done,
        WsError::Protocol(p) => ReadEnd::Refused {
            close_code: 1002,
            reason: "protocol error",
            message: format!("WebSocket protocol error: {p}"),
            size: 0,
        },
        _ => ReadEnd::Done,
    }
}

/// Ends a connection whose client sent a frame it cannot take: the error frame, the close, then what the
/// client still sends is read and discarded (up to the refused frame's length plus [`DRAIN_SLACK`], for at
/// most [`DRAIN_TIME`]) after a FIN, so the client reads the answer instead of meeting a TCP reset.
pub(crate) async fn refuse_frame(
    mut sink: Sink,
    stream: SplitStream<WebSocket>,
    error_frame: String,
    close_code: u16,
    reason: &str,
    size: usize,
) {
    let _ = sink.send_text(error_frame).await;
    sink.close(close_code, reason).await;
    let Ok(mut socket) = stream.reunite(sink.inner) else {
        return;
    };
    let io = socket.get_mut();
    let _ = tokio::time::timeout(STALLED_SEND, io.shutdown()).await;
    let mut budget = size.min(DRAIN_MAX_FRAME) + DRAIN_SLACK;
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while budget > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Bounds a send by [`STALLED_SEND`].
pub(crate) async fn timed<F, E>(f: F) -> Result<(), ()>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    match tokio::time::timeout(STALLED_SEND, f).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_delta_frames_are_the_seeds_json() {
        let ev = |delta: &str, is_subagent: bool| Event {
            seq: 3,
            run_id: "r".into(),
            agent: "assistant".into(),
            is_subagent,
            kind: EventKind::TextDelta {
                delta: delta.into(),
            },
        };
        assert_eq!(
            text_delta_frame(&ev("t1@5 ", false), "stream_delta", "delta").as_deref(),
            Some(r#"{"type":"stream_delta","delta":"t1@5 "}"#)
        );
        let tricky = "a \"quote\", a \\ and a\nnewline, é \u{1}";
        let frame = text_delta_frame(&ev(tricky, false), "token", "content");
        let escaped = serde_json::to_string(tricky).unwrap();
        let expected = format!(r#"{{"type":"token","content":{escaped}}}"#);
        assert_eq!(frame.as_deref(), Some(expected.as_str()));
        let back: serde_json::Value = serde_json::from_str(&expected).unwrap();
        assert_eq!(back["content"], tricky);
        assert_eq!(text_delta_frame(&ev("x", true), "token", "content"), None);
    }

    #[test]
    fn fragments_end_on_character_boundaries() {
        let ascii = vec![b'a'; FRAGMENT * 2 + 5];
        assert_eq!(fragment_end(&ascii), FRAGMENT);
        assert_eq!(fragment_end(&ascii[..10]), 10);
        // A three-byte character straddling the boundary is kept whole in the next fragment.
        let mut text = "a".repeat(FRAGMENT - 1);
        text.push('€');
        text.push_str("tail");
        let end = fragment_end(text.as_bytes());
        assert_eq!(end, FRAGMENT - 1);
        assert!(text.is_char_boundary(end));
    }
}
