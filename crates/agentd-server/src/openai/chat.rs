//! `POST /v1/chat/completions` (SPEC.md section 8): stateless like OpenAI's, the request carries the whole
//! conversation, and the agent's loop runs on it in a session of the caller.
//!
//! - **Continuation.** After a turn, a key (the hash of the caller, the model, the request's messages and the
//!   answer as the client got it) is stored for the session (`Store::put_alias`). A request whose messages up
//!   to its last assistant message hash to a known key continues that session: only the messages after it
//!   (the new user message, or the results of the client's tools) are sent. Anything else starts a new session
//!   (metadata `{"source": "chat.completions"}`) holding the whole conversation.
//! - **Client tools.** Function tools in `tools` are the client's: offered to the model, never run here; a
//!   model call naming one ends the turn with `finish_reason: "tool_calls"`.
//! - The response follows the run itself (a stream writes what is ready at each poll); the key is stored
//!   before the client gets the end, and a response dropped before the end (the client hung up) hands the
//!   following to a task, so the key is stored whatever the client does.

use agentd_core::domain::{Role, RunStatus, ToolCall, Usage};
use agentd_core::event::{EventKind, LoggedEvent};
use agentd_core::provider::ToolSpec;
use agentd_core::service::{Agentd, Principal, PriorMessage, SendMessage};
use agentd_core::store::StoreError;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use super::render::{client_calls, run_error, sse_response, usage_json, RunEvents, KEEP_ALIVE};
use super::{agent_of, now_seconds, OaiCaller, OaiError, OaiResult};
use crate::AppState;

#[derive(Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Vec<InTool>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<InCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    image_url: Option<ImageUrl>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Object { url: String },
    Url(String),
}

#[derive(Deserialize)]
struct InCall {
    id: String,
    function: InFunction,
}

#[derive(Deserialize)]
struct InFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Deserialize)]
pub struct InTool {
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionDef>,
}

#[derive(Deserialize)]
struct FunctionDef {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

/// A message as the continuation key sees it: what a client sends back of a conversation.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Turn {
    pub(super) role: Role,
    pub(super) content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) images: Vec<String>,
    /// `(id, name, arguments)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) tool_calls: Vec<(String, String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) tool_call_id: Option<String>,
}

impl Turn {
    pub(super) fn new(role: Role, content: String) -> Turn {
        Turn {
            role,
            content,
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

fn content_text(c: &Option<Content>) -> (String, Vec<String>) {
    match c {
        None => (String::new(), Vec::new()),
        Some(Content::Text(t)) => (t.clone(), Vec::new()),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::new();
            let mut images = Vec::new();
            for p in parts {
                match (p.kind.as_str(), &p.text, &p.image_url) {
                    (_, Some(t), _) => texts.push(t.as_str()),
                    ("image_url", _, Some(ImageUrl::Object { url } | ImageUrl::Url(url))) => {
                        images.push(url.clone())
                    }
                    _ => {}
                }
            }
            (texts.join("\n"), images)
        }
    }
}

/// The request's messages, checked.
fn turns(messages: &[InMessage]) -> OaiResult<Vec<Turn>> {
    if messages.is_empty() {
        return Err(OaiError::invalid("`messages` must not be empty").param("messages"));
    }
    messages
        .iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(OaiError::invalid(format!(
                    "unsupported message role `{other}` (system, developer, user, assistant, tool)"
                ))
                    .param("messages"))
                }
            };
            if role == Role::Tool && m.tool_call_id.is_none() {
                return Err(
                    OaiError::invalid("a `tool` message needs its `tool_call_id`")
                        .param("messages"),
                );
            }
            let (content, images) = content_text(&m.content);
            Ok(Turn {
                role,
                content,
                images,
                tool_calls: m
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|c| {
                        (
                            c.id.clone(),
                            c.function.name.clone(),
                            c.function.arguments.clone(),
                        )
                    })
                    .collect(),
                tool_call_id: m.tool_call_id.clone(),
            })
        })
        .collect()
}

/// The continuation key of a conversation (`chat:` + SHA-256 hex of the caller, the model and the messages).
pub fn chat_key(principal: &str, model: &str, turns: &[Turn]) -> String {
    let mut h = Sha256::new();
    // Serialising these plain types cannot fail.
    let text = serde_json::to_string(&(principal, model, turns)).unwrap_or_default();
    h.update(text.as_bytes());
    let digest = h.finalize();
    let mut key = String::with_capacity(5 + 64);
    key.push_str("chat:");
    for b in digest.iter() {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// The session an earlier request of the caller left this conversation in, and the messages that are new.
async fn continuation<'t>(
    st: &AppState,
    p: &Principal,
    model: &str,
    turns: &'t [Turn],
) -> OaiResult<(Option<String>, &'t [Turn])> {
    let Some(i) = turns.iter().rposition(|t| t.role == Role::Assistant) else {
        return Ok((None, turns));
    };
    let key = chat_key(&p.name, model, &turns[..=i]);
    let Some(session_id) = st
        .app
        .store
        .find_alias(&key)
        .await
        .map_err(|e| OaiError::from(agentd_core::service::ServiceError::from(e)))?
    else {
        return Ok((None, turns));
    };
    match st.app.open_session(p, &session_id).await {
        Ok(s) if s.agent == model => Ok((Some(session_id), &turns[i + 1..])),
        // Closed or gone since: the conversation starts over in a new session.
        _ => Ok((None, turns)),
    }
}

/// The send for the new messages: the last user message is the turn's message, those before it are stored
/// ahead of it; messages that end with tool results are sent as they are (no user message).
pub(super) fn send_of(input: &[Turn], client_tools: Vec<ToolSpec>) -> OaiResult<SendMessage> {
    let Some(last) = input.last() else {
        return Err(OaiError::invalid(
            "the conversation ends with the answer it already got: add a user message",
        )
        .param("messages"));
    };
    let prior_of = |ts: &[Turn]| -> Vec<PriorMessage> {
        ts.iter()
            .map(|t| PriorMessage {
                role: t.role,
                content: t.content.clone(),
                tool_calls: (!t.tool_calls.is_empty()).then(|| {
                    t.tool_calls
                        .iter()
                        .map(|(id, name, arguments)| ToolCall {
                            id: id.clone(),
                            name: name.clone(),
                            arguments: arguments.clone(),
                        })
                        .collect()
                }),
                tool_call_id: t.tool_call_id.clone(),
            })
            .collect()
    };
    let send = match last.role {
        Role::User => SendMessage {
            content: last.content.clone(),
            images: last.images.clone(),
            prior: prior_of(&input[..input.len() - 1]),
            ..Default::default()
        },
        Role::Tool => SendMessage {
            prior: prior_of(input),
            ..Default::default()
        },
        _ => {
            return Err(
                OaiError::invalid("the last message must be a `user` or `tool` message")
                    .param("messages"),
            )
        }
    };
    Ok(SendMessage {
        client_tools,
        ..send
    })
}

/// The client's function tools (a name of one of the agent's own tools is refused: it would be ambiguous).
pub fn client_tools(
    tools: Vec<(String, Option<String>, Option<Value>)>,
    agent: &agentd_core::config::AgentSettings,
) -> OaiResult<Vec<ToolSpec>> {
    tools
        .into_iter()
        .map(|(name, description, parameters)| {
            if agent.tools.contains(&name) || agent.subagents.contains(&name) {
                return Err(OaiError::invalid(format!(
                    "the tool `{name}` is one of the agent's own tools; name the client's tool otherwise"
                ))
                .param("tools"));
            }
            Ok(ToolSpec {
                name,
                description: description.unwrap_or_default(),
                parameters: parameters
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            })
        })
        .collect()
}

/// What following the run gives the response: deltas, then one end.
enum Piece {
    Text(String),
    Reasoning(String),
    End(End),
}

struct End {
    error: Option<OaiError>,
    content: String,
    reasoning: String,
    calls: Option<Vec<ToolCall>>,
    usage: Usage,
}

pub async fn completions(
    State(st): State<AppState>,
    OaiCaller(p): OaiCaller,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> OaiResult<Response> {
    let Json(req) = body?;
    let agent = agent_of(&st, &req.model)?;
    let all = turns(&req.messages)?;
    let tools = req
        .tools
        .into_iter()
        .filter(|t| t.kind == "function")
        .filter_map(|t| t.function)
        .map(|f| (f.name, f.description, f.parameters))
        .collect();
    let tools = client_tools(tools, agent)?;
    let tool_names: Vec<String> = tools.iter().map(|t| t.name.clone()).collect();
    let (existing, input) = continuation(&st, &p, &req.model, &all).await?;
    let send = send_of(input, tools)?;
    let session_id = match existing {
        Some(id) => id,
        None => {
            st.app
                .create_session(
                    &p,
                    &req.model,
                    None,
                    Some(json!({"source": "chat.completions"})),
                )
                .await?
                .id
        }
    };
    // Listening before the send: every event of the new run reaches this subscription.
    let attached = st.app.attach(&p, &session_id, None).await?;
    let accepted = st.app.send(&p, &session_id, send).await?;
    let run_id = accepted.run.id.clone();
    let follower = Follower {
        app: st.app.clone(),
        principal: p.name.clone(),
        model: req.model.clone(),
        turns: all,
        events: RunEvents::new(attached.subscription, session_id, run_id.clone()),
        client: tool_names,
        calls: None,
        reasoning: String::new(),
    };
    let meta = Meta {
        id: format!("chatcmpl-{run_id}"),
        created: now_seconds(),
        model: req.model,
    };
    if req.stream {
        let usage = req.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream_response(meta, follower, usage, st.closing.clone()))
    } else {
        // On a task of its own: a client that hangs up does not stop the key from being stored.
        match tokio::spawn(follower.finish()).await {
            Ok(end) => whole_response(meta, end),
            Err(e) => Err(OaiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("following the run failed: {e}"),
            )),
        }
    }
}

/// Follows the run to its end: hands its deltas on while the client listens, stores the continuation key of a
/// completed turn, then hands on the end.
/// Follows the run to its end: its deltas, then (having stored the continuation key of a completed turn, before
/// the client can see the end and send its next request) the end. A response that goes away before the end
/// hands its follower to a task ([`Follower::finish`]), so the key is stored whatever the client does.
struct Follower {
    app: Arc<Agentd>,
    principal: String,
    model: String,
    turns: Vec<Turn>,
    events: RunEvents,
    client: Vec<String>,
    calls: Option<Vec<ToolCall>>,
    reasoning: String,
}

impl Follower {
    /// The piece an event of the run makes, if any.
    fn piece(&mut self, ev: &LoggedEvent) -> Option<Piece> {
        if ev.event.is_subagent {
            return None;
        }
        match &ev.event.kind {
            EventKind::TextDelta { delta } => Some(Piece::Text(delta.clone())),
            EventKind::ThinkingDelta { delta, .. } => {
                self.reasoning.push_str(delta);
                Some(Piece::Reasoning(delta.clone()))
            }
            EventKind::Message { message } if message.role == Role::Assistant => {
                self.calls = client_calls(message, &self.client);
                None
            }
            EventKind::RunFinished { run, content, .. } => {
                let error = match run.status {
                    RunStatus::Completed | RunStatus::Cancelled => None,
                    s => Some(run_error(s, run.error.as_ref())),
                };
                Some(Piece::End(End {
                    error,
                    content: content.clone(),
                    reasoning: std::mem::take(&mut self.reasoning),
                    calls: self.calls.take(),
                    usage: run.usage,
                }))
            }
            _ => None,
        }
    }

    /// The piece a read of the log makes, if any (the end, when the log fails).
    async fn step(&mut self, read: Result<Option<Arc<LoggedEvent>>, StoreError>) -> Option<Piece> {
        let ev = match read {
            Ok(Some(ev)) => ev,
            Ok(None) | Err(_) => {
                return Some(Piece::End(End {
                    error: Some(OaiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the run's events could not be read to its end",
                    )),
                    content: String::new(),
                    reasoning: std::mem::take(&mut self.reasoning),
                    calls: None,
                    usage: Usage::default(),
                }))
            }
        };
        let piece = self.piece(&ev)?;
        Some(self.settled(piece).await)
    }

    /// The next piece if one is ready now.
    async fn try_next(&mut self) -> Option<Piece> {
        while let Some(ev) = self.events.try_next() {
            if let Some(piece) = self.piece(&ev) {
                return Some(self.settled(piece).await);
            }
        }
        None
    }

    /// At the end of a completed turn, the key that continues its session is stored first.
    async fn settled(&mut self, piece: Piece) -> Piece {
        if let Piece::End(end) = &piece {
            if end.error.is_none() {
                let mut answer = Turn::new(Role::Assistant, end.content.clone());
                answer.tool_calls = end
                    .calls
                    .iter()
                    .flatten()
                    .map(|c| (c.id.clone(), c.name.clone(), c.arguments.clone()))
                    .collect();
                self.turns.push(answer);
                let key = chat_key(&self.principal, &self.model, &self.turns);
                let session_id = self.events.session_id();
                if let Err(e) = self.app.store.put_alias(&key, session_id).await {
                    tracing::warn!(session = %session_id, error = %e, "could not store a chat's continuation key");
                }
            }
        }
        piece
    }

    /// Follows the run to its end and returns the end.
    async fn finish(mut self) -> End {
        loop {
            let read = self.events.next().await;
            if let Some(Piece::End(end)) = self.step(read).await {
                return end;
            }
        }
    }
}

struct Meta {
    id: String,
    created: i64,
    model: String,
}

impl Meta {
    fn chunk(&self, delta: Value, finish: Option<&str>, usage: Option<Value>) -> String {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c.to_string()
    }
}

/// A string as JSON.
fn escape(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn finish_reason(end: &End) -> &'static str {
    if end.calls.is_some() {
        "tool_calls"
    } else {
        "stop"
    }
}

fn calls_json(calls: &[ToolCall], indexed: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                });
                if indexed {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

/// `chat.completion.chunk` events, then `data: [DONE]`. Each write carries every piece that is ready; a text
/// delta's chunk is formatted from two fixed halves around the escaped delta (the token path: no JSON tree).
struct ChatStream {
    /// Taken by a task when the response is dropped before the end.
    follower: Option<Follower>,
    meta: Meta,
    include_usage: bool,
    head: String,
    /// The first chunk (the role), until it is sent.
    first: Option<String>,
    ended: bool,
}

const TAIL: &str = "},\"logprobs\":null,\"finish_reason\":null}]}";

impl ChatStream {
    fn new(meta: Meta, follower: Follower, include_usage: bool) -> ChatStream {
        let usage_null = if include_usage { ",\"usage\":null" } else { "" };
        let head = format!(
            "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"system_fingerprint\":null{usage_null},\"choices\":[{{\"index\":0,\"delta\":{{",
            escape(&meta.id),
            meta.created,
            escape(&meta.model)
        );
        let first = meta.chunk(json!({"role": "assistant", "content": ""}), None, None);
        ChatStream {
            follower: Some(follower),
            meta,
            include_usage,
            head,
            first: Some(first),
            ended: false,
        }
    }

    fn data(buf: &mut String, data: &str) {
        buf.push_str("data: ");
        buf.push_str(data);
        buf.push_str("\n\n");
    }

    fn write(&mut self, piece: Piece, buf: &mut String) {
        let (field, delta) = match piece {
            Piece::Text(d) => ("content", d),
            Piece::Reasoning(d) => ("reasoning_content", d),
            Piece::End(end) => return self.end(end, buf),
        };
        buf.push_str(&self.head);
        buf.push('"');
        buf.push_str(field);
        buf.push_str("\":");
        buf.push_str(&escape(&delta));
        buf.push_str(TAIL);
        buf.push_str("\n\n");
    }

    fn end(&mut self, end: End, buf: &mut String) {
        self.ended = true;
        let meta = &self.meta;
        if let Some(e) = &end.error {
            Self::data(buf, &e.body().to_string());
        } else {
            if let Some(calls) = &end.calls {
                let chunk = meta.chunk(json!({"tool_calls": calls_json(calls, true)}), None, None);
                Self::data(buf, &chunk);
            }
            Self::data(buf, &meta.chunk(json!({}), Some(finish_reason(&end)), None));
            if self.include_usage {
                let mut u = json!({
                    "id": meta.id,
                    "object": "chat.completion.chunk",
                    "created": meta.created,
                    "model": meta.model,
                    "system_fingerprint": null,
                    "choices": [],
                });
                u["usage"] = usage_json(&end.usage);
                Self::data(buf, &u.to_string());
            }
        }
        Self::data(buf, "[DONE]");
    }

    /// The next write: the first chunk at once, then whatever pieces are ready (waiting for one), or a comment
    /// after a quiet [`KEEP_ALIVE`].
    async fn next(&mut self) -> Option<String> {
        if let Some(first) = self.first.take() {
            let mut buf = String::new();
            Self::data(&mut buf, &first);
            return Some(buf);
        }
        if self.ended {
            return None;
        }
        let follower = self.follower.as_mut()?;
        // Only the wait for an event is timed (a read of the log can be given up and made again); what it
        // makes is not.
        let piece = loop {
            let read = match tokio::time::timeout(KEEP_ALIVE, follower.events.next()).await {
                Err(_) => return Some(": keep-alive\n\n".to_string()),
                Ok(read) => read,
            };
            if let Some(piece) = follower.step(read).await {
                break piece;
            }
        };
        let mut buf = String::new();
        self.write(piece, &mut buf);
        while !self.ended {
            let Some(follower) = self.follower.as_mut() else {
                break;
            };
            match follower.try_next().await {
                Some(piece) => self.write(piece, &mut buf),
                None => break,
            }
        }
        Some(buf)
    }
}

/// A response dropped before the run's end (the client went away) leaves its follower to a task.
impl Drop for ChatStream {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Some(follower) = self.follower.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(follower.finish());
            }
        }
    }
}

fn stream_response(
    meta: Meta,
    follower: Follower,
    include_usage: bool,
    closing: tokio_util::sync::CancellationToken,
) -> Response {
    let state = ChatStream::new(meta, follower, include_usage);
    let body = stream::unfold(state, |mut s| async move { s.next().await.map(|b| (b, s)) });
    sse_response(body, closing)
}

/// A whole `chat.completion`, once the run has ended.
fn whole_response(meta: Meta, end: End) -> OaiResult<Response> {
    if let Some(e) = end.error {
        return Err(e);
    }
    let mut message = json!({
        "role": "assistant",
        "content": end.content,
        "refusal": null,
    });
    if !end.reasoning.is_empty() {
        message["reasoning_content"] = json!(end.reasoning);
    }
    if let Some(calls) = &end.calls {
        message["tool_calls"] = calls_json(calls, false);
        if end.content.is_empty() {
            message["content"] = Value::Null;
        }
    }
    Ok(Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(&end)}],
        "usage": usage_json(&end.usage),
    }))
    .into_response())
}
