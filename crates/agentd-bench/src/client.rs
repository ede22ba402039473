//! The load generator's client side: targets, session creation, WebSocket connections, and reading the
//! navi and native frames as one stream of [`Event`]s.
//!
//! - navi (peer, floor, agentd's navi dialect): `POST` a session, `ws://…/ws/sessions/{id}`; the client sends
//!   `{type:"message", content}` and reads `stream_start`, `stream_delta {delta}`, `stream_end {content}` or
//!   `error {message}`.
//! - native (agentd): `POST /v1/sessions`, `ws://…/v1/sessions/{id}/ws[?after=N]`; the first frame is
//!   `hello {last_seq}`, then events `{seq, run_id, type, …}` with `text_delta {delta}` and
//!   `run_finished {run, content}` among them.

use std::borrow::Cow;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::stamp::{now_micros, Stamp, StampParser};
use crate::{Error, Result};

/// A WebSocket connection to a server under test.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Which wire protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Dialect {
    /// The navi seed's `/ws/sessions/{id}` frames.
    Navi,
    /// agentd's native `/v1/sessions/{id}/ws` event stream.
    Native,
}

/// One server endpoint the load runs against.
#[derive(Debug, Clone)]
pub struct Target {
    /// Column name in the results (`peer`, `floor`, `agentd (navi)`, …).
    pub label: String,
    /// HTTP base, e.g. `http://127.0.0.1:8080`.
    pub base: String,
    /// Path that creates a session with `POST`.
    pub create_path: String,
    /// JSON body of that `POST`.
    pub create_body: Value,
    /// Wire protocol of its WebSocket.
    pub dialect: Dialect,
}

impl Target {
    /// A navi-dialect target whose sessions are made by `POST /sessions {}` (the peer and the floor).
    pub fn navi(label: &str, base: &str) -> Self {
        Self {
            label: label.to_string(),
            base: base.trim_end_matches('/').to_string(),
            create_path: "/sessions".to_string(),
            create_body: serde_json::json!({}),
            dialect: Dialect::Navi,
        }
    }

    /// agentd through `dialect`; sessions are made by `POST /v1/sessions {"agent": agent}`.
    pub fn agentd(label: &str, base: &str, agent: &str, dialect: Dialect) -> Self {
        Self {
            label: label.to_string(),
            base: base.trim_end_matches('/').to_string(),
            create_path: "/v1/sessions".to_string(),
            create_body: serde_json::json!({ "agent": agent }),
            dialect,
        }
    }

    /// WebSocket URL of `session`; `after` is only meaningful for the native dialect.
    pub fn ws_url(&self, session: &str, after: Option<u64>) -> String {
        let ws_base = self.base.replacen("http", "ws", 1);
        match (self.dialect, after) {
            (Dialect::Navi, _) => format!("{ws_base}/ws/sessions/{session}"),
            (Dialect::Native, None) => format!("{ws_base}/v1/sessions/{session}/ws"),
            (Dialect::Native, Some(n)) => format!("{ws_base}/v1/sessions/{session}/ws?after={n}"),
        }
    }
}

/// An HTTP client for session creation: no proxy (every target is on loopback), a pool wide enough for the
/// creation concurrency.
pub fn http_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(128)
        .timeout(Duration::from_secs(30))
        .build()?)
}

#[derive(Deserialize)]
struct Created {
    id: Value,
}

/// Creates one session and returns its id.
pub async fn create_session(http: &reqwest::Client, target: &Target) -> Result<String> {
    let resp = http
        .post(format!("{}{}", target.base, target.create_path))
        .json(&target.create_body)
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(Error::new(format!(
            "POST {} answered {status}: {}",
            target.create_path,
            clip(&body, 200)
        )));
    }
    let created: Created = resp.json().await?;
    match created.id {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(Error::new(format!("session id is not a string: {other}"))),
    }
}

/// Creates `n` sessions, `concurrency` requests at a time.
pub async fn create_sessions(
    http: &reqwest::Client,
    target: &Target,
    n: usize,
    concurrency: usize,
) -> Result<Vec<String>> {
    futures_util::stream::iter(0..n)
        .map(|_| create_session(http, target))
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Client-side WebSocket settings: small buffers, since ten thousand idle connections share one process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
}

/// Opens the WebSocket of `session`. For the native dialect it also reads the `hello` frame and returns its
/// `last_seq`.
pub async fn connect(
    target: &Target,
    session: &str,
    after: Option<u64>,
) -> Result<(Ws, Option<u64>)> {
    let url = target.ws_url(session, after);
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true)
            .await
            .map_err(|e| Error::new(format!("connect {url}: {e}")))?;
    if target.dialect == Dialect::Native {
        let hello = tokio::time::timeout(
            Duration::from_secs(20),
            next_event(&mut ws, Dialect::Native),
        )
        .await
        .map_err(|_| Error::new("no hello frame within 20 s"))??;
        match hello {
            Some(Event {
                kind: EventKind::Hello { last_seq },
                ..
            }) => return Ok((ws, Some(last_seq))),
            Some(other) => {
                return Err(Error::new(format!(
                    "first native frame is not hello: {:?}",
                    other.kind
                )))
            }
            None => return Err(Error::new("connection closed before hello")),
        }
    }
    Ok((ws, None))
}

/// Opens `sessions.len()` WebSockets, `concurrency` handshakes at a time; fails on the first failure.
pub async fn connect_all(
    target: &Target,
    sessions: &[String],
    concurrency: usize,
) -> Result<Vec<Ws>> {
    futures_util::stream::iter(sessions.iter())
        .map(|s| async move { connect(target, s, None).await.map(|(ws, _)| ws) })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Sends a user message.
pub async fn send_message(ws: &mut Ws, content: &str) -> Result<()> {
    let frame = serde_json::json!({ "type": "message", "content": content }).to_string();
    ws.send(Message::text(frame)).await?;
    Ok(())
}

/// Closes connections politely, all at once, giving each a second.
pub async fn close_all(conns: Vec<Ws>) {
    let closes = conns.into_iter().map(|mut ws| async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    });
    futures_util::future::join_all(closes).await;
}

/// What a frame means to the load generator, across both dialects.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// native `hello`.
    Hello { last_seq: u64 },
    /// navi `stream_start`.
    Start,
    /// Answer text: navi `stream_delta`, native `text_delta` of the session's own agent.
    Delta(String),
    /// End of a turn: navi `stream_end`, native `run_finished`. `ok` is false for a run that did not complete.
    End {
        content: Option<String>,
        ok: bool,
        detail: String,
    },
    /// A failure frame: navi `error`, native `error` (no seq).
    Failure(String),
    /// A tool was called (navi `tool_started`, native `tool_started`).
    ToolStarted,
    /// A tool answered (navi `tool_call`, native `tool_finished`); `success` as reported.
    ToolFinished { success: bool },
    /// Any other frame, by type.
    Other(String),
}

/// One frame as the load generator saw it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The frame's meaning.
    pub kind: EventKind,
    /// native `seq`, if the frame has one.
    pub seq: Option<u64>,
    /// When it was read, Unix microseconds.
    pub at_us: u64,
}

#[derive(Deserialize)]
struct WireFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    delta: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    last_seq: Option<u64>,
    #[serde(default)]
    is_subagent: bool,
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    run: Option<RunInfo>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RunInfo {
    #[serde(default)]
    status: String,
    #[serde(default)]
    error: Option<Value>,
}

/// Parses one text frame of `dialect`.
pub fn parse_frame(text: &str, dialect: Dialect, at_us: u64) -> Result<Event> {
    let f: WireFrame = serde_json::from_str(text)
        .map_err(|e| Error::new(format!("bad frame {}: {e}", clip(text, 120))))?;
    let kind = match (dialect, f.ty.as_ref()) {
        (Dialect::Navi, "stream_start") => EventKind::Start,
        (Dialect::Navi, "stream_delta") => {
            EventKind::Delta(f.delta.map(Cow::into_owned).unwrap_or_default())
        }
        (Dialect::Navi, "stream_end") => EventKind::End {
            content: f.content.map(Cow::into_owned),
            ok: true,
            detail: String::new(),
        },
        (Dialect::Navi, "error") => EventKind::Failure(
            f.message
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_string(),
        ),
        (Dialect::Navi, "tool_call") | (Dialect::Native, "tool_finished") => {
            EventKind::ToolFinished {
                success: f.success.unwrap_or(false),
            }
        }
        (_, "tool_started") => EventKind::ToolStarted,
        (Dialect::Native, "hello") => EventKind::Hello {
            last_seq: f.last_seq.unwrap_or(0),
        },
        (Dialect::Native, "text_delta") if !f.is_subagent => {
            EventKind::Delta(f.delta.map(Cow::into_owned).unwrap_or_default())
        }
        (Dialect::Native, "run_finished") if !f.is_subagent => {
            let (status, error) = f.run.map(|r| (r.status, r.error)).unwrap_or_default();
            let ok = status == "completed";
            let detail = if ok {
                String::new()
            } else {
                format!(
                    "run {status}: {}",
                    error.map(|e| e.to_string()).unwrap_or_default()
                )
            };
            EventKind::End {
                content: f.content.map(Cow::into_owned),
                ok,
                detail,
            }
        }
        (Dialect::Native, "error") if f.seq.is_none() => EventKind::Failure(format!(
            "{}: {}",
            f.code.as_deref().unwrap_or("error"),
            f.message.as_ref().and_then(Value::as_str).unwrap_or("")
        )),
        (_, other) => EventKind::Other(other.to_string()),
    };
    Ok(Event {
        kind,
        seq: f.seq,
        at_us,
    })
}

/// Reads the next meaningful frame; `None` when the server closed the connection.
pub async fn next_event(ws: &mut Ws, dialect: Dialect) -> Result<Option<Event>> {
    loop {
        let Some(msg) = ws.next().await else {
            return Ok(None);
        };
        let at_us = now_micros();
        match msg? {
            Message::Text(t) => return parse_frame(t.as_str(), dialect, at_us).map(Some),
            Message::Close(_) => return Ok(None),
            // Pings are answered by tungstenite when the stream is polled; binary frames are not part of
            // either dialect.
            _ => continue,
        }
    }
}

/// What one turn delivered.
#[derive(Debug, Clone, Default)]
pub struct TurnOutcome {
    /// Stamped tokens received.
    pub tokens: u32,
    /// Added delivery latency of each token, microseconds (receive minus emit time).
    pub latencies_us: Vec<u32>,
    /// Upstream emit time of each token (Unix microseconds), in the order of `latencies_us`.
    pub emitted_us: Vec<u64>,
    /// Microseconds from sending the message to the first token.
    pub first_token_us: Option<u64>,
    /// Microseconds from sending the message to the end frame.
    pub turn_us: u64,
    /// The turn ended with a success frame whose content matched the streamed text.
    pub ok: bool,
    /// Why it is not ok.
    pub problem: Option<String>,
    /// Tool calls that started and finished (for the tool-round check).
    pub tools_started: u32,
    /// Tool results reported successful.
    pub tools_succeeded: u32,
    /// Concatenated answer text.
    pub text: String,
}

/// Sends `content` and reads the turn to its end frame, or until `limit` has passed.
pub async fn run_turn(
    ws: &mut Ws,
    dialect: Dialect,
    content: &str,
    limit: Duration,
) -> TurnOutcome {
    let sent_us = now_micros();
    if let Err(e) = send_message(ws, content).await {
        return TurnOutcome {
            problem: Some(format!("send: {e}")),
            ..TurnOutcome::default()
        };
    }
    let mut out = read_turn(ws, dialect, sent_us, limit).await;
    if out.turn_us == 0 {
        out.turn_us = now_micros().saturating_sub(sent_us);
    }
    out
}

/// Reads a turn sent at `sent_us` (by this client or another) to its end frame, or until `limit` has passed.
pub async fn read_turn(
    ws: &mut Ws,
    dialect: Dialect,
    sent_us: u64,
    limit: Duration,
) -> TurnOutcome {
    let mut out = TurnOutcome::default();
    let mut parser = StampParser::new();
    let read = async {
        loop {
            match next_event(ws, dialect).await {
                Ok(Some(ev)) => match ev.kind {
                    EventKind::Delta(d) => {
                        parser.feed(&d, |s: Stamp| {
                            out.tokens += 1;
                            let lat = ev.at_us.saturating_sub(s.emitted_us);
                            out.latencies_us
                                .push(u32::try_from(lat).unwrap_or(u32::MAX));
                            out.emitted_us.push(s.emitted_us);
                        });
                        if out.first_token_us.is_none() {
                            out.first_token_us = Some(ev.at_us.saturating_sub(sent_us));
                        }
                        out.text.push_str(&d);
                    }
                    EventKind::End {
                        content,
                        ok,
                        detail,
                    } => {
                        out.turn_us = ev.at_us.saturating_sub(sent_us);
                        if !ok {
                            out.problem = Some(detail);
                        } else if content.as_ref().is_some_and(|c| *c != out.text) {
                            out.problem =
                                Some("end content differs from the streamed text".to_string());
                        } else {
                            out.ok = true;
                        }
                        return;
                    }
                    EventKind::Failure(m) => {
                        out.problem = Some(format!("error frame: {m}"));
                        return;
                    }
                    EventKind::ToolStarted => out.tools_started += 1,
                    EventKind::ToolFinished { success } => {
                        out.tools_succeeded += u32::from(success)
                    }
                    _ => {}
                },
                Ok(None) => {
                    out.problem = Some("connection closed mid-turn".to_string());
                    return;
                }
                Err(e) => {
                    out.problem = Some(format!("read: {e}"));
                    return;
                }
            }
        }
    };
    if tokio::time::timeout(limit, read).await.is_err() {
        out.problem = Some(format!("turn not finished within {} s", limit.as_secs()));
    }
    out
}

/// The first `max` characters of `s`, for error messages.
pub fn clip(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_both_dialects_parse() {
        let ev = parse_frame(
            r#"{"type":"stream_delta","delta":"t1@2 "}"#,
            Dialect::Navi,
            5,
        )
        .expect("parses");
        assert_eq!(ev.kind, EventKind::Delta("t1@2 ".into()));
        let ev = parse_frame(
            r#"{"type":"error","message":"Invalid JSON"}"#,
            Dialect::Navi,
            5,
        )
        .expect("parses");
        assert_eq!(ev.kind, EventKind::Failure("Invalid JSON".into()));
        let ev = parse_frame(
            r#"{"seq":7,"run_id":"r","type":"text_delta","agent":"a","is_subagent":false,"delta":"x"}"#,
            Dialect::Native,
            5,
        )
        .expect("parses");
        assert_eq!((ev.kind, ev.seq), (EventKind::Delta("x".into()), Some(7)));
        let ev = parse_frame(
            r#"{"seq":8,"run_id":"r","type":"text_delta","agent":"b","is_subagent":true,"delta":"x"}"#,
            Dialect::Native,
            5,
        )
        .expect("parses");
        assert_eq!(
            ev.kind,
            EventKind::Other("text_delta".into()),
            "a subagent's text is not the answer"
        );
        let ev = parse_frame(
            r#"{"seq":9,"run_id":"r","type":"run_finished","agent":"a","is_subagent":false,
               "run":{"status":"failed","error":{"code":"upstream_error","message":"503"}},"content":""}"#,
            Dialect::Native,
            5,
        )
        .expect("parses");
        assert!(matches!(ev.kind, EventKind::End { ok: false, .. }));
        let ev = parse_frame(
            r#"{"type":"message","message":{"role":"user"},"seq":1}"#,
            Dialect::Native,
            5,
        )
        .expect("parses");
        assert_eq!(ev.kind, EventKind::Other("message".into()));
        let target = Target::agentd("a", "http://127.0.0.1:1/", "assistant", Dialect::Native);
        assert_eq!(
            target.ws_url("s1", Some(4)),
            "ws://127.0.0.1:1/v1/sessions/s1/ws?after=4"
        );
    }
}
