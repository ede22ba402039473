//! A lean OpenAI-compatible streaming upstream, the one upstream every server under test talks to.
//!
//! It speaks just enough HTTP/1.1 (keep-alive, `Content-Length` request bodies, chunked responses) to serve
//! `POST /v1/chat/completions`, so its own cost per token is one small formatted write. What it answers
//! depends on the request's messages, as the peer's `mock_upstream.py` does:
//! - the last message is a tool result -> the text `The result is <content>.`;
//! - the last user message starts with `calc:` and the request has tools -> one `calculator` tool call
//!   `{"expression": ...}`, sent in two fragments as real servers do;
//! - the last user message starts with `ask:` and the request has tools -> one `ask_human` tool call
//!   `{"question": ...}` (the soak answers it; the reply comes back as the tool result, answered as above);
//! - otherwise `tokens` stamped tokens (see [`crate::stamp`]), with `delay_ms` before each.
//!
//! - the request is agentd's context-compression call (a system message `Summarise the conversation ...`) ->
//!   8 stamped tokens at once, whatever the quoted transcript says.
//!
//! Directives in the last user message override the defaults: `tokens=N`, `delay_ms=D`, and `status=NNN`
//! (answer that HTTP status with an error body). A trailing `[tag]` (the soak marks each message with one) is
//! not part of a `calc:` expression or an `ask:` question. `GET /healthz` answers `ok` and `GET /stats` the number of
//! requests and tokens served so far.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::stamp::{now_micros, push_token, reply_text};

/// Request heads over this size are refused (a real client sends a few hundred bytes).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Request bodies over this size are refused; the bench's histories stay far below it.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Defaults for requests that carry no directive.
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// Tokens per plain reply.
    pub tokens: u32,
    /// Delay before each token, in milliseconds.
    pub delay_ms: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            tokens: 200,
            delay_ms: 0,
        }
    }
}

/// Counters shared by all connections, served at `GET /stats`.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    tokens: AtomicU64,
}

/// Serves the mock on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, config: MockConfig) -> std::io::Result<()> {
    let counters = Arc::new(Counters::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            // A client that goes away mid-reply is normal here (the re-attach scenario drops sockets).
            let _ = connection(stream, config, &counters).await;
        });
    }
}

/// Binds `127.0.0.1:port` (0 for any) and serves the mock in a task; for tests and in-process use.
pub async fn spawn(port: u16, config: MockConfig) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = serve(listener, config).await;
    });
    Ok((addr, task))
}

/// One parsed request head.
struct Head {
    method: String,
    path: String,
    content_length: usize,
    close: bool,
}

fn parse_head(raw: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut lines = text.split("\r\n");
    let mut request = lines.next()?.split(' ');
    let method = request.next()?.to_string();
    let path = request.next()?.to_string();
    let http10 = request.next() == Some("HTTP/1.0");
    let mut content_length = 0;
    let mut close = http10;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    Some(Head {
        method,
        path,
        content_length,
        close,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn connection(
    mut stream: TcpStream,
    config: MockConfig,
    counters: &Counters,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD_BYTES {
                return simple(&mut stream, 431, "text/plain", b"head too large").await;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let Some(head) = parse_head(&buf[..head_end]) else {
            return simple(&mut stream, 400, "text/plain", b"bad request").await;
        };
        if head.content_length > MAX_BODY_BYTES {
            return simple(&mut stream, 413, "text/plain", b"body too large").await;
        }
        while buf.len() < head_end + head.content_length {
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let body: Vec<u8> = buf
            .drain(..head_end + head.content_length)
            .skip(head_end)
            .collect();
        match (head.method.as_str(), head.path.as_str()) {
            ("POST", "/v1/chat/completions") | ("POST", "/chat/completions") => {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                chat(&mut stream, &body, config, counters).await?;
            }
            ("GET", "/healthz") => simple(&mut stream, 200, "text/plain", b"ok").await?,
            ("GET", "/stats") => {
                let stats = serde_json::json!({
                    "requests": counters.requests.load(Ordering::Relaxed),
                    "tokens": counters.tokens.load(Ordering::Relaxed),
                });
                simple(
                    &mut stream,
                    200,
                    "application/json",
                    stats.to_string().as_bytes(),
                )
                .await?;
            }
            ("GET", "/v1/models") => {
                let models = br#"{"object":"list","data":[{"id":"mock","object":"model","owned_by":"agentd-bench"}]}"#;
                simple(&mut stream, 200, "application/json", models).await?;
            }
            _ => simple(&mut stream, 404, "text/plain", b"not found").await?,
        }
        if head.close {
            return Ok(());
        }
    }
}

/// Writes a whole response with a `Content-Length`.
async fn simple(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Text of a message's content: a string, or the text parts of a content-part list.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The number after `key=` in `text`, if any.
fn directive(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)?;
    let digits: String = text[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// `text` without a trailing `[tag]`.
fn strip_tag(text: &str) -> &str {
    let trimmed = text.trim_end();
    match trimmed
        .strip_suffix(']')
        .and_then(|t| t.rfind('[').map(|i| &t[..i]))
    {
        Some(rest) => rest.trim_end(),
        None => trimmed,
    }
}

/// What one request is answered with.
enum Reply {
    Text {
        tokens: u32,
        delay: Duration,
    },
    ToolResult(String),
    ToolCall {
        tool: &'static str,
        arguments: String,
    },
    Fail(u16),
}

fn plan(req: &ChatRequest, config: MockConfig) -> Reply {
    // A context-compression request (agentd's summary call: a system instruction to summarise, the earlier
    // transcript as the user message) gets a short summary at once, as a model would; the directives quoted
    // in that transcript are the conversation's, not this request's.
    let summarising = req.messages.first().is_some_and(|m| {
        m.role == "system" && text_of(m.content.as_ref()).starts_with("Summarise the conversation")
    });
    if summarising {
        return Reply::Text {
            tokens: 8,
            delay: Duration::ZERO,
        };
    }
    let last_user = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| text_of(m.content.as_ref()))
        .unwrap_or_default();
    if let Some(status) = directive(&last_user, "status=") {
        if let Ok(status) = u16::try_from(status) {
            if (400..600).contains(&status) {
                return Reply::Fail(status);
            }
        }
    }
    let last = req.messages.last();
    if last.is_some_and(|m| m.role == "tool") {
        return Reply::ToolResult(text_of(last.and_then(|m| m.content.as_ref())));
    }
    let has_tools = req.tools.as_ref().is_some_and(|t| !t.is_empty());
    let untagged = strip_tag(&last_user);
    if let Some(expr) = untagged.strip_prefix("calc:").filter(|_| has_tools) {
        let arguments = serde_json::json!({ "expression": expr.trim() }).to_string();
        return Reply::ToolCall {
            tool: "calculator",
            arguments,
        };
    }
    if let Some(question) = untagged.strip_prefix("ask:").filter(|_| has_tools) {
        let arguments = serde_json::json!({ "question": question.trim() }).to_string();
        return Reply::ToolCall {
            tool: "ask_human",
            arguments,
        };
    }
    let tokens = directive(&last_user, "tokens=")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(config.tokens);
    let delay_ms = directive(&last_user, "delay_ms=").unwrap_or(config.delay_ms);
    Reply::Text {
        tokens,
        delay: Duration::from_millis(delay_ms),
    }
}

async fn chat(
    stream: &mut TcpStream,
    body: &[u8],
    config: MockConfig,
    counters: &Counters,
) -> std::io::Result<()> {
    let req: ChatRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            let err = serde_json::json!({"error": {"message": format!("bad request body: {e}"), "type": "invalid_request_error"}});
            return simple(stream, 400, "application/json", err.to_string().as_bytes()).await;
        }
    };
    let reply = plan(&req, config);
    if let Reply::Fail(status) = reply {
        let err = serde_json::json!({"error": {"message": "mock failure", "type": "server_error"}});
        return simple(
            stream,
            status,
            "application/json",
            err.to_string().as_bytes(),
        )
        .await;
    }
    let model = if req.model.is_empty() {
        "mock"
    } else {
        req.model.as_str()
    };
    let prompt_tokens = 10 * req.messages.len() as u64;
    if !req.stream {
        return whole(stream, reply, model, prompt_tokens, counters).await;
    }
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let model_json = Value::String(model.to_string()).to_string();
    // The part of every chunk before and after the delta, formatted once per request.
    let open = format!(
        "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":{model_json},\"choices\":["
    );
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut event = String::with_capacity(256);

    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    event.push_str(&open);
    event.push_str("{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
    push_chunk(&mut out, event.as_bytes());
    stream.write_all(&out).await?;

    let (completion_tokens, finish) = match reply {
        Reply::Text { tokens, delay } => {
            let start = Instant::now();
            for i in 0..tokens {
                if !delay.is_zero() {
                    // Scheduled from the start, so timer lateness does not add up over a reply.
                    tokio::time::sleep_until(start + delay * (i + 1)).await;
                }
                event.clear();
                event.push_str(&open);
                event.push_str("{\"index\":0,\"delta\":{\"content\":\"");
                push_token(&mut event, i, now_micros());
                event.push_str("\"},\"finish_reason\":null}]}\n\n");
                out.clear();
                push_chunk(&mut out, event.as_bytes());
                stream.write_all(&out).await?;
                counters.tokens.fetch_add(1, Ordering::Relaxed);
            }
            (u64::from(tokens), "stop")
        }
        Reply::ToolResult(content) => {
            let text = Value::String(format!("The result is {content}.")).to_string();
            out.clear();
            event.clear();
            event.push_str(&open);
            event.push_str(&format!(
                "{{\"index\":0,\"delta\":{{\"content\":{text}}},\"finish_reason\":null}}]}}\n\n"
            ));
            push_chunk(&mut out, event.as_bytes());
            stream.write_all(&out).await?;
            (1, "stop")
        }
        Reply::ToolCall { tool, arguments } => {
            out.clear();
            event.clear();
            event.push_str(&open);
            event.push_str(&format!(
                "{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"id\":\"call_mock_1\",\"type\":\"function\",\"function\":{{\"name\":\"{tool}\",\"arguments\":\"\"}}}}]}},\"finish_reason\":null}}]}}\n\n"
            ));
            push_chunk(&mut out, event.as_bytes());
            event.clear();
            event.push_str(&open);
            let args = Value::String(arguments).to_string();
            event.push_str(&format!(
                "{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":{args}}}}}]}},\"finish_reason\":null}}]}}\n\n"
            ));
            push_chunk(&mut out, event.as_bytes());
            stream.write_all(&out).await?;
            (1, "tool_calls")
        }
        Reply::Fail(_) => (0, "stop"), // answered above
    };

    out.clear();
    event.clear();
    event.push_str(&open);
    event.push_str(&format!(
        "{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{finish}\"}}]}}\n\n"
    ));
    push_chunk(&mut out, event.as_bytes());
    if include_usage {
        event.clear();
        event.push_str(&open);
        event.push_str(&format!(
            "],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{completion_tokens},\"total_tokens\":{}}}}}\n\n",
            prompt_tokens + completion_tokens
        ));
        push_chunk(&mut out, event.as_bytes());
    }
    push_chunk(&mut out, b"data: [DONE]\n\n");
    out.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&out).await
}

/// A non-streaming answer (`"stream": false`): one `chat.completion` object.
async fn whole(
    stream: &mut TcpStream,
    reply: Reply,
    model: &str,
    prompt_tokens: u64,
    counters: &Counters,
) -> std::io::Result<()> {
    let (message, completion_tokens, finish) = match reply {
        Reply::Text { tokens, .. } => {
            counters
                .tokens
                .fetch_add(u64::from(tokens), Ordering::Relaxed);
            let text = reply_text(tokens, now_micros());
            (
                serde_json::json!({"role": "assistant", "content": text}),
                u64::from(tokens),
                "stop",
            )
        }
        Reply::ToolResult(content) => (
            serde_json::json!({"role": "assistant", "content": format!("The result is {content}.")}),
            1,
            "stop",
        ),
        Reply::ToolCall { tool, arguments } => (
            serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_mock_1", "type": "function",
                "function": {"name": tool, "arguments": arguments}}]}),
            1,
            "tool_calls",
        ),
        Reply::Fail(_) => (Value::Null, 0, "stop"), // answered by the caller
    };
    let body = serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    });
    simple(stream, 200, "application/json", body.to_string().as_bytes()).await
}

/// Appends `payload` as one HTTP/1.1 chunk.
fn push_chunk(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_read_from_the_last_user_message() {
        assert_eq!(
            directive("bench tokens=200 delay_ms=50", "tokens="),
            Some(200)
        );
        assert_eq!(
            directive("bench tokens=200 delay_ms=50", "delay_ms="),
            Some(50)
        );
        assert_eq!(directive("no directive", "tokens="), None);
        let req: ChatRequest = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":"tokens=3"},{"role":"assistant","content":"x"},
               {"role":"user","content":[{"type":"text","text":"again tokens=7 delay_ms=5"}]}]}"#,
        )
        .expect("valid JSON");
        match plan(&req, MockConfig::default()) {
            Reply::Text { tokens, delay } => {
                assert_eq!(tokens, 7);
                assert_eq!(delay, Duration::from_millis(5));
            }
            _ => panic!("expected a text reply"),
        }
    }

    #[test]
    fn a_summary_request_gets_a_short_answer_whatever_the_transcript_says() {
        let req: ChatRequest = serde_json::from_str(
            r#"{"messages":[{"role":"system","content":"Summarise the conversation below in a few sentences."},
               {"role":"user","content":"user: long tokens=600 delay_ms=50\nassistant: tok0 tok1"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            plan(&req, MockConfig::default()),
            Reply::Text { tokens: 8, delay } if delay == Duration::ZERO
        ));
    }

    #[test]
    fn tool_calls_are_planned_from_tagged_messages() {
        assert_eq!(strip_tag("calc: 2+3 [s1-m2]"), "calc: 2+3");
        assert_eq!(strip_tag("calc: 2+3"), "calc: 2+3");
        let plan_of = |content: &str, tools: bool| {
            let req = serde_json::json!({
                "messages": [{"role": "user", "content": content}],
                "tools": if tools { serde_json::json!([{"type": "function"}]) } else { serde_json::json!(null) },
            });
            let req: ChatRequest = serde_json::from_value(req).expect("valid request");
            plan(&req, MockConfig::default())
        };
        match plan_of("ask: your name? [s3-m4]", true) {
            Reply::ToolCall { tool, arguments } => {
                assert_eq!(tool, "ask_human");
                assert_eq!(arguments, r#"{"question":"your name?"}"#);
            }
            _ => panic!("expected an ask_human call"),
        }
        match plan_of("calc: 6*7 [s3-m5]", true) {
            Reply::ToolCall { tool, arguments } => {
                assert_eq!(tool, "calculator");
                assert_eq!(arguments, r#"{"expression":"6*7"}"#);
            }
            _ => panic!("expected a calculator call"),
        }
        assert!(
            matches!(plan_of("ask: no tools offered", false), Reply::Text { .. }),
            "without tools the mock answers in text"
        );
    }
}
