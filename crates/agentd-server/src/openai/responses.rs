//! The Responses API (SPEC.md section 8) over the session's durable log.
//!
//! - A response is a run (or, with approvals, the part of a run up to or after an approval request, below):
//!   its id is `resp_` + the session id + the run id (so it needs no table and survives restarts),
//!   `previous_response_id` continues that response's session, anything else starts a new session (metadata
//!   `{"source": "responses"}`).
//! - Its stream is rendered from the run's logged events alone ([`Render`]), in log order, and numbered from 0:
//!   rendering the same events again gives the same events with the same `sequence_number`. So
//!   `GET /v1/responses/{id}?stream=true&starting_after=N` re-renders the run from its first event and sends
//!   what follows N: after a disconnect, after a restart, for as long as the session's log holds the run.
//! - `GET /v1/responses/{id}` is the response as its log shows it now; cancel is the core's cancel; `DELETE`
//!   hides the response (404 from then on; the run stays in the session's history).
//! - Output items: the agent's `<think>` as `reasoning`, its text as a `message`, each server-side tool call
//!   (the agent's own tools, `ask_human` included) as an `mcp_call` item (`server_label`: the MCP server of a
//!   `SERVER__TOOL`, `agentd` for built-in tools and subagents), and the calls of the client's function tools
//!   as `function_call` items (the calls a completed run leaves without a result).
//! - Approvals (SPEC.md section 7) split a run into several responses, as OpenAI's remote MCP flow does. When
//!   the run logs `approval_requested`, its response ends there: its last item is an `mcp_approval_request`
//!   (id `mcpr_` + the request id, `arguments` a JSON string) and it is `completed`, with
//!   `metadata.agentd_next_response_id` naming the response that carries the run on: `resp_` + session id +
//!   run id + request id. A create with `previous_response_id` and `mcp_approval_response` input items
//!   decides through the core (as the native `approvals` route does) and answers with that next response,
//!   rendered from the run's events after the request (its decided call's `mcp_call` item, with
//!   `approval_request_id`, then the rest of the run up to its end or its next approval request). The run
//!   itself never stopped: it waited. A decision made on another surface is followed with
//!   `GET /v1/responses/{agentd_next_response_id}` (streamed or not). A call that needs approval (the
//!   agent's `approve` globs) shows no `mcp_call` item before its decision, so the request is the item a
//!   client sees first.

use std::sync::Arc;

use agentd_core::domain::{Role, Run, RunErrorCode, RunStatus, ToolCall, Usage};
use agentd_core::event::{EventKind, LoggedEvent};
use agentd_core::registry::{ToolRegistry, MCP_SEPARATOR};
use agentd_core::service::Principal;
use agentd_core::tools::Decision;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::{client_tools, send_of, Turn};
use super::render::{sse_response, RunEvents, KEEP_ALIVE};
use super::{agent_of, unix_seconds, OaiCaller, OaiError, OaiResult};
use crate::AppState;

/// The response id of a run (its first response).
pub fn response_id(session_id: &str, run_id: &str) -> String {
    format!("resp_{session_id}{run_id}")
}

/// The id of the response that carries a run on after its approval request `request_id`.
pub fn continuation_id(session_id: &str, run_id: &str, request_id: &str) -> String {
    format!("resp_{session_id}{run_id}{request_id}")
}

/// The id of the `mcp_approval_request` item of the approval request `request_id`.
fn approval_item_id(request_id: &str) -> String {
    format!("mcpr_{request_id}")
}

/// What a response id names: a session, a run, and the approval request the response follows (None: the
/// run's first response). Ids are 32 lowercase hex digits each.
struct ResponseRef {
    session_id: String,
    run_id: String,
    after: Option<String>,
}

fn parse_id(id: &str) -> OaiResult<ResponseRef> {
    let missing = || OaiError::not_found(format!("No response found with id '{id}'."));
    let rest = id.strip_prefix("resp_").ok_or_else(missing)?;
    if !matches!(rest.len(), 64 | 96) || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(missing());
    }
    let (s, rest) = rest.split_at(32);
    let (r, after) = rest.split_at(32);
    Ok(ResponseRef {
        session_id: s.to_string(),
        run_id: r.to_string(),
        after: (!after.is_empty()).then(|| after.to_string()),
    })
}

fn deleted_key(id: &str) -> String {
    format!("deleted:{id}")
}

fn store_err(e: agentd_core::store::StoreError) -> OaiError {
    agentd_core::service::ServiceError::from(e).into()
}

/// The caller's response: its session and run (and the approval request it follows), unless deleted (404
/// otherwise, also for another principal's).
async fn lookup(st: &AppState, p: &Principal, id: &str) -> OaiResult<(ResponseRef, Run)> {
    let r = parse_id(id)?;
    let missing = || OaiError::not_found(format!("No response found with id '{id}'."));
    st.app
        .session(p, &r.session_id)
        .await
        .map_err(|_| missing())?;
    if st
        .app
        .store
        .find_alias(&deleted_key(id))
        .await
        .map_err(store_err)?
        .is_some()
    {
        return Err(missing());
    }
    let run = st
        .app
        .store
        .get_run(&r.session_id, &r.run_id)
        .await
        .map_err(store_err)?
        .ok_or_else(missing)?;
    Ok((r, run))
}

#[derive(Deserialize)]
pub struct CreateBody {
    model: String,
    input: Input,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    background: bool,
    #[serde(default)]
    tools: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

fn text_of(content: &Value) -> (String, Vec<String>) {
    match content {
        Value::String(s) => (s.clone(), Vec::new()),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            let mut images = Vec::new();
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    texts.push(t);
                } else if let Some(u) = p.get("image_url").and_then(Value::as_str) {
                    images.push(u.to_string());
                }
            }
            (texts.join("\n"), images)
        }
        _ => (String::new(), Vec::new()),
    }
}

/// Output items a client may echo back as input: with `previous_response_id` they are in the session already.
const ECHOED: [&str; 4] = [
    "reasoning",
    "mcp_call",
    "mcp_list_tools",
    "mcp_approval_request",
];

/// The input items as messages of the turn.
fn input_turns(input: Input, instructions: Option<String>) -> OaiResult<Vec<Turn>> {
    let mut turns = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        turns.push(Turn::new(Role::System, i));
    }
    let items = match input {
        Input::Text(t) => {
            turns.push(Turn::new(Role::User, t));
            return Ok(turns);
        }
        Input::Items(items) => items,
    };
    let bad = |m: &str| OaiError::invalid(m.to_string()).param("input");
    for item in items {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let str_of = |k: &str| item.get(k).and_then(Value::as_str).map(String::from);
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("system" | "developer") => Role::System,
                    _ => {
                        return Err(bad(
                            "a message item needs a role: user, assistant, system or developer",
                        ))
                    }
                };
                let (content, images) = text_of(item.get("content").unwrap_or(&Value::Null));
                let mut t = Turn::new(role, content);
                t.images = images;
                turns.push(t);
            }
            "function_call_output" => {
                let call_id = str_of("call_id")
                    .ok_or_else(|| bad("a function_call_output needs its call_id"))?;
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let mut t = Turn::new(Role::Tool, output);
                t.tool_call_id = Some(call_id);
                turns.push(t);
            }
            "function_call" => {
                let call = (
                    str_of("call_id").ok_or_else(|| bad("a function_call needs its call_id"))?,
                    str_of("name").unwrap_or_default(),
                    str_of("arguments").unwrap_or_default(),
                );
                match turns.last_mut() {
                    Some(t) if t.role == Role::Assistant => t.tool_calls.push(call),
                    _ => {
                        let mut t = Turn::new(Role::Assistant, String::new());
                        t.tool_calls.push(call);
                        turns.push(t);
                    }
                }
            }
            k if ECHOED.contains(&k) => {}
            other => {
                return Err(bad(&format!("unsupported input item type `{other}`")));
            }
        }
    }
    Ok(turns)
}

pub async fn create(
    State(st): State<AppState>,
    OaiCaller(p): OaiCaller,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> OaiResult<Response> {
    let Json(req) = body?;
    let agent = agent_of(&st, &req.model)?;
    if let Some(answers) = approval_answers(&req.input)? {
        return answer_approvals(st, p, req, answers).await;
    }
    let tools =
        req.tools
            .iter()
            .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
            .map(|t| {
                let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                    OaiError::invalid("a function tool needs a name").param("tools")
                })?;
                Ok((
                    name.to_string(),
                    t.get("description")
                        .and_then(Value::as_str)
                        .map(String::from),
                    t.get("parameters").cloned(),
                ))
            })
            .collect::<OaiResult<Vec<_>>>()?;
    let tools = client_tools(tools, agent)?;
    let turns = input_turns(req.input, req.instructions)?;
    let send = send_of(&turns, tools)?;
    let session_id = match &req.previous_response_id {
        Some(prev) => continued_session(&st, &p, prev, &req.model).await?.0,
        None => {
            st.app
                .create_session(&p, &req.model, None, Some(json!({"source": "responses"})))
                .await?
                .id
        }
    };
    let attached = st.app.attach(&p, &session_id, None).await?;
    let accepted = st.app.send(&p, &session_id, send).await?;
    let run = accepted.run;
    let events = RunEvents::new(attached.subscription, session_id.clone(), run.id.clone());
    let render = render_of(&st, &session_id, &run, &req.model, req.background, None);
    respond(&st, events, render, req.stream, req.background).await
}

/// The session a `previous_response_id` continues (open, of the same model), and that response's run.
async fn continued_session(
    st: &AppState,
    p: &Principal,
    prev: &str,
    model: &str,
) -> OaiResult<(String, Run)> {
    let (r, run) = lookup(st, p, prev)
        .await
        .map_err(|e| e.param("previous_response_id"))?;
    let s = st.app.open_session(p, &r.session_id).await?;
    if s.agent != model {
        return Err(OaiError::invalid(format!(
            "the previous response is of the model `{}`; a session keeps its agent",
            s.agent
        ))
        .param("model"));
    }
    Ok((r.session_id, run))
}

/// The answer to a create: the stream, the response at once (background), or the response once it ends.
async fn respond(
    st: &AppState,
    mut events: RunEvents,
    mut render: Render,
    stream: bool,
    background: bool,
) -> OaiResult<Response> {
    if stream {
        return Ok(sse(events, render, None, st.closing.clone()));
    }
    if background {
        drop(events);
        return Ok(Json(render.snapshot()).into_response());
    }
    let mut nowhere = Out::none();
    while !render.is_done() {
        let Some(ev) = events.next().await.map_err(store_err)? else {
            break;
        };
        render.feed(&ev, &mut nowhere);
    }
    Ok(Json(render.snapshot()).into_response())
}

/// The renderer of a response of `model`'s run: from the run's start, or after its approval request `after`.
fn render_of(
    st: &AppState,
    session_id: &str,
    run: &Run,
    model: &str,
    background: bool,
    after: Option<&str>,
) -> Render {
    let approve = st
        .app
        .config
        .agent(model)
        .map(|a| a.approve.clone())
        .unwrap_or_default();
    Render::new(session_id, run, model, background, approve, after)
}

/// One `mcp_approval_response` input item: `{approval_request_id, approve, reason?}`.
struct ApprovalAnswer {
    request_id: String,
    decision: Decision,
}

/// The `mcp_approval_response` items of an input (None: it has none). Alongside them an input may hold only
/// items of the previous response echoed back (which are in the session already); new messages or tool
/// outputs go in a later request, once the run that waits has ended.
fn approval_answers(input: &Input) -> OaiResult<Option<Vec<ApprovalAnswer>>> {
    let Input::Items(items) = input else {
        return Ok(None);
    };
    let kind = |i: &Value| i.get("type").and_then(Value::as_str).map(String::from);
    if !items
        .iter()
        .any(|i| kind(i).as_deref() == Some("mcp_approval_response"))
    {
        return Ok(None);
    }
    let bad = |m: &str| OaiError::invalid(m.to_string()).param("input");
    let mut answers = Vec::new();
    for item in items.iter() {
        match kind(item).as_deref() {
            Some("mcp_approval_response") => {}
            Some(k) if ECHOED.contains(&k) => continue,
            _ => {
                return Err(bad(
                    "an input with `mcp_approval_response` items may hold only those (and items of the previous response echoed back); send new messages once the run has ended",
                ))
            }
        }
        let id = item
            .get("approval_request_id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("an mcp_approval_response needs its approval_request_id"))?;
        let allow = item
            .get("approve")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("an mcp_approval_response needs `approve`: true or false"))?;
        let reason = match item.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(r)) => Some(r.clone()),
            Some(_) => return Err(bad("an mcp_approval_response's `reason` is a string")),
        };
        answers.push(ApprovalAnswer {
            request_id: id.strip_prefix("mcpr_").unwrap_or(id).to_string(),
            decision: Decision { allow, reason },
        });
    }
    Ok(Some(answers))
}

/// Answers approval requests (in input order) through the core, as the native API does, and answers with
/// the response that carries the run on after the last one: its stream, or the response once the run ends
/// or asks for its next approval. Unknown requests are 404, requests decided already 409.
async fn answer_approvals(
    st: AppState,
    p: Principal,
    req: CreateBody,
    answers: Vec<ApprovalAnswer>,
) -> OaiResult<Response> {
    let prev = req.previous_response_id.as_deref().ok_or_else(|| {
        OaiError::invalid("an mcp_approval_response answers a request of the previous response: give previous_response_id")
            .param("previous_response_id")
    })?;
    let (session_id, _) = continued_session(&st, &p, prev, &req.model).await?;
    let mut last = None;
    for a in answers {
        let run_id = st
            .app
            .decide(&p, &session_id, None, &a.request_id, a.decision)
            .await
            .map_err(|e| OaiError::from(e).param("input"))?;
        last = Some((run_id, a.request_id));
    }
    let Some((run_id, request_id)) = last else {
        return Err(OaiError::invalid("no mcp_approval_response in the input").param("input"));
    };
    let run = st.app.run(&p, &session_id, &run_id).await?;
    let first = st
        .app
        .store
        .first_seq_of_run(&session_id, &run_id)
        .await
        .map_err(store_err)?
        .unwrap_or(1);
    let attached = st.app.attach(&p, &session_id, Some(first - 1)).await?;
    let events = RunEvents::new(attached.subscription, session_id.clone(), run_id);
    let render = render_of(
        &st,
        &session_id,
        &run,
        &req.model,
        req.background,
        Some(&request_id),
    );
    respond(&st, events, render, req.stream, req.background).await
}

#[derive(Deserialize)]
pub struct RetrieveQuery {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    starting_after: Option<u64>,
}

pub async fn retrieve(
    State(st): State<AppState>,
    OaiCaller(p): OaiCaller,
    Path(id): Path<String>,
    q: Result<Query<RetrieveQuery>, QueryRejection>,
) -> OaiResult<Response> {
    let Query(q) = q.map_err(|r| OaiError::invalid(r.body_text()))?;
    let (r, run) = lookup(&st, &p, &id).await?;
    let session_id = r.session_id;
    let model = st.app.session(&p, &session_id).await?.agent;
    let mut render = render_of(&st, &session_id, &run, &model, false, r.after.as_deref());
    let first = st
        .app
        .store
        .first_seq_of_run(&session_id, &run.id)
        .await
        .map_err(store_err)?;
    let Some(first) = first else {
        if q.stream.unwrap_or(false) {
            return Err(gone(&id));
        }
        // Its events are past retention: what the run's row and its answer tell.
        render.fill_from_rows(&run, st.app.final_message(&session_id, &run.id).await?);
        return Ok(Json(render.snapshot()).into_response());
    };
    let stream = q.stream.unwrap_or(false);
    let log = if stream && r.after.is_none() {
        Vec::new()
    } else {
        run_log(&st, &session_id, &run.id, first - 1).await?
    };
    if let Some(request_id) = &r.after {
        // A response after an approval request exists once the request is in the run's log.
        let asked = log.iter().any(|ev| {
            matches!(&ev.event.kind, EventKind::ApprovalRequested { request_id: x, .. } if x == request_id)
        });
        if !asked {
            return Err(OaiError::not_found(format!(
                "No response found with id '{id}'."
            )));
        }
    }
    if stream {
        drop(log);
        let attached = st.app.attach(&p, &session_id, Some(first - 1)).await?;
        if attached.cursor_expired {
            return Err(gone(&id));
        }
        let events = RunEvents::new(attached.subscription, session_id, run.id.clone());
        return Ok(sse(events, render, q.starting_after, st.closing.clone()));
    }
    let mut nowhere = Out::none();
    for ev in &log {
        if render.is_done() {
            break;
        }
        render.feed(ev, &mut nowhere);
    }
    Ok(Json(render.snapshot()).into_response())
}

fn gone(id: &str) -> OaiError {
    OaiError::not_found(format!(
        "the events of response '{id}' are no longer retained; its stream cannot be replayed"
    ))
}

/// The run's events in the log now (without waiting for more), up to its `run_finished`.
async fn run_log(
    st: &AppState,
    session_id: &str,
    run_id: &str,
    mut after: u64,
) -> OaiResult<Vec<Arc<LoggedEvent>>> {
    const PAGE: usize = 512;
    let mut out = Vec::new();
    loop {
        let page = st
            .app
            .store
            .read_events(session_id, after, PAGE)
            .await
            .map_err(store_err)?;
        let full = page.len() == PAGE;
        for ev in page {
            after = ev.seq();
            if ev.event.run_id != run_id {
                continue;
            }
            let end = matches!(ev.event.kind, EventKind::RunFinished { .. });
            out.push(ev);
            if end {
                return Ok(out);
            }
        }
        if !full {
            return Ok(out);
        }
    }
}

pub async fn cancel(
    State(st): State<AppState>,
    OaiCaller(p): OaiCaller,
    Path(id): Path<String>,
) -> OaiResult<Response> {
    let (r, run) = lookup(&st, &p, &id).await?;
    st.app.cancel(&p, &r.session_id, Some(&run.id)).await?;
    retrieve(
        State(st),
        OaiCaller(p),
        Path(id),
        Ok(Query(RetrieveQuery {
            stream: None,
            starting_after: None,
        })),
    )
    .await
}

pub async fn delete(
    State(st): State<AppState>,
    OaiCaller(p): OaiCaller,
    Path(id): Path<String>,
) -> OaiResult<Json<Value>> {
    let (r, _) = lookup(&st, &p, &id).await?;
    st.app
        .store
        .put_alias(&deleted_key(&id), &r.session_id)
        .await
        .map_err(store_err)?;
    Ok(Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}

/// The stream: rendered events with `sequence_number > starting_after`, until the run's end. Each write carries
/// what is ready (one event awaited, then the rest without waiting); a comment after a quiet [`KEEP_ALIVE`].
struct ResponsesStream {
    events: RunEvents,
    render: Render,
    out: Out,
    ended: bool,
}

impl ResponsesStream {
    async fn next(&mut self) -> Option<String> {
        if self.ended {
            return None;
        }
        match tokio::time::timeout(KEEP_ALIVE, self.events.next()).await {
            Err(_) => return Some(": keep-alive\n\n".to_string()),
            Ok(Ok(None)) => return None,
            Ok(Ok(Some(ev))) => self.render.feed(&ev, &mut self.out),
            Ok(Err(e)) => {
                self.ended = true;
                let err = OaiError::from(agentd_core::service::ServiceError::from(e));
                let data = json!({"type": "error", "code": err.code, "message": err.message, "param": null, "sequence_number": self.render.next_seq});
                return Some(format!("event: error\ndata: {data}\n\n"));
            }
        }
        while !self.render.is_done() {
            let Some(ev) = self.events.try_next() else {
                break;
            };
            self.render.feed(&ev, &mut self.out);
        }
        // The response ends with its run, or where the run asks for an approval.
        self.ended = self.render.is_done();
        Some(std::mem::take(&mut self.out.buf))
    }
}

fn sse(
    events: RunEvents,
    render: Render,
    starting_after: Option<u64>,
    closing: tokio_util::sync::CancellationToken,
) -> Response {
    let state = ResponsesStream {
        events,
        render,
        out: Out::stream(starting_after),
        ended: false,
    };
    let body = stream::unfold(state, |mut s| async move { s.next().await.map(|b| (b, s)) });
    sse_response(body, closing)
}

/// One output item being built.
enum Open {
    None,
    /// A message item: its index and text so far.
    Text(usize, String),
    /// A reasoning item: its index and text so far.
    Reasoning(usize, String),
}

/// Renders one response of a run (the run's events from its start, or after one of its approval requests, up
/// to its end or its next approval request) to Responses events, numbering them from 0, and keeps the
/// response object they describe. Depends on nothing but the events (and the agent's `approve` globs), so a
/// re-render numbers alike.
pub struct Render {
    /// The response object without its `output`.
    response: Value,
    items: Vec<Value>,
    next_seq: u64,
    open: Open,
    /// Output index of each server-side tool call in flight, by call id.
    calls: Vec<(String, usize)>,
    /// The calls of the last assistant message, and which of them the server ran.
    last_calls: Vec<ToolCall>,
    ran: Vec<String>,
    started: bool,
    /// The approval request this response follows, until the run's log reaches it (events before it are
    /// the previous responses': they only teach the calls and requests).
    before: Option<String>,
    /// The last approval request before `before` (the previous response ends there; None: the run's first).
    previous: Option<String>,
    /// The response has ended: with its run, or where the run asks for an approval.
    done: bool,
    /// The agent's `approve` globs: a call of such a tool shows as its approval request first, and as its
    /// `mcp_call` item once decided.
    approve: Vec<String>,
    /// The approval requests seen: request id -> (call id, tool, args).
    requests: Vec<(String, String, String, Value)>,
    /// The session's own (not subagents') calls seen started, by call id.
    top_calls: Vec<String>,
}

/// Where rendered events go: SSE text for a stream (those after its `starting_after`), or nowhere (a
/// response built for `GET` or a waiting `POST` needs only the object).
pub struct Out {
    buf: String,
    after: Option<u64>,
    on: bool,
}

impl Out {
    pub fn stream(after: Option<u64>) -> Out {
        Out {
            buf: String::new(),
            after,
            on: true,
        }
    }
    pub fn none() -> Out {
        Out {
            buf: String::new(),
            after: None,
            on: false,
        }
    }
    fn wants(&self, seq: u64) -> bool {
        self.on && self.after.is_none_or(|n| seq > n)
    }
    fn event(&mut self, kind: &str) {
        self.buf.push_str("event: ");
        self.buf.push_str(kind);
        self.buf.push_str("\ndata: ");
    }
}

impl Render {
    pub fn new(
        session_id: &str,
        run: &Run,
        model: &str,
        background: bool,
        approve: Vec<String>,
        after: Option<&str>,
    ) -> Render {
        let id = match after {
            Some(request_id) => continuation_id(session_id, &run.id, request_id),
            None => response_id(session_id, &run.id),
        };
        let response = json!({
            "id": id,
            "object": "response",
            "created_at": unix_seconds(&run.created_at),
            "status": if run.status == RunStatus::Queued { "queued" } else { "in_progress" },
            "background": background,
            "error": null,
            "incomplete_details": null,
            "instructions": null,
            "max_output_tokens": null,
            "model": model,
            "output": [],
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": true,
            "temperature": null,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": null,
            "truncation": "disabled",
            "usage": null,
            "metadata": {"agentd_session_id": session_id, "agentd_run_id": run.id},
        });
        Render {
            response,
            items: Vec::new(),
            next_seq: 0,
            open: Open::None,
            calls: Vec::new(),
            last_calls: Vec::new(),
            ran: Vec::new(),
            started: false,
            before: after.map(String::from),
            previous: None,
            done: false,
            approve,
            requests: Vec::new(),
            top_calls: Vec::new(),
        }
    }

    /// Whether the response has ended (its run ended, or the run asks for an approval).
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn emit(&mut self, out: &mut Out, kind: &'static str, mut data: Value) {
        if out.wants(self.next_seq) {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(self.next_seq);
            out.event(kind);
            out.buf.push_str(&data.to_string());
            out.buf.push_str("\n\n");
        }
        self.next_seq += 1;
    }

    /// The response object as the events so far describe it.
    pub fn snapshot(&self) -> Value {
        let mut r = self.response.clone();
        r["output"] = Value::Array(self.items.clone());
        r
    }

    /// A text or reasoning delta, formatted without a JSON tree (the token path). Its fields are those of
    /// OpenAI's event (`logprobs` only on text).
    fn emit_delta(&mut self, out: &mut Out, kind: &'static str, index: usize, delta: &str) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if !out.wants(seq) {
            return;
        }
        let id = self
            .items
            .get(index)
            .and_then(|i| i.get("id"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        out.event(kind);
        let b = &mut out.buf;
        b.push_str("{\"type\":\"");
        b.push_str(kind);
        b.push_str("\",\"sequence_number\":");
        b.push_str(&seq.to_string());
        b.push_str(",\"item_id\":\"");
        b.push_str(id);
        b.push_str("\",\"output_index\":");
        b.push_str(&index.to_string());
        b.push_str(",\"content_index\":0,\"delta\":");
        b.push_str(&serde_json::to_string(delta).unwrap_or_default());
        if kind == "response.output_text.delta" {
            b.push_str(",\"logprobs\":[]");
        }
        b.push_str("}\n\n");
    }

    /// Adds an item to the output; returns its index.
    fn add_item(&mut self, out: &mut Out, item: Value) -> usize {
        let index = self.items.len();
        self.items.push(item.clone());
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        index
    }

    fn done_item(&mut self, out: &mut Out, index: usize, item: Value) {
        if let Some(slot) = self.items.get_mut(index) {
            *slot = item.clone();
        }
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }

    fn item_id(&self, index: usize) -> Value {
        self.items
            .get(index)
            .and_then(|i| i.get("id"))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Closes the open message or reasoning item.
    fn close(&mut self, out: &mut Out) {
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Text(index, text) => {
                let id = self.item_id(index);
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                self.emit(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                let item = json!({"id": id, "type": "message", "status": "completed", "role": "assistant", "content": [part]});
                self.done_item(out, index, item);
            }
            Open::Reasoning(index, text) => {
                let id = self.item_id(index);
                self.emit(
                    out,
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                let item = json!({"id": id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}], "status": "completed"});
                self.done_item(out, index, item);
            }
        }
    }

    /// The events one logged event of the run renders to (with their sequence numbers).
    pub fn feed(&mut self, ev: &LoggedEvent, out: &mut Out) {
        if self.done {
            return;
        }
        let seq = ev.seq();
        self.learn(ev);
        if let Some(after) = &self.before {
            // A previous response's event: this response begins after the approval request `after`.
            if let EventKind::ApprovalRequested { request_id, .. } = &ev.event.kind {
                if request_id == after {
                    self.before = None;
                    let (s, r) = self.ids();
                    let previous = match &self.previous {
                        Some(prev) => continuation_id(&s, &r, prev),
                        None => response_id(&s, &r),
                    };
                    self.response["previous_response_id"] = json!(previous);
                    self.begin(out);
                } else {
                    self.previous = Some(request_id.clone());
                }
            }
            return;
        }
        if !self.started {
            self.begin(out);
        }
        if ev.event.is_subagent {
            return;
        }
        match &ev.event.kind {
            EventKind::TextDelta { delta } => {
                let index = match &mut self.open {
                    Open::Text(index, text) => {
                        text.push_str(delta);
                        *index
                    }
                    _ => {
                        self.close(out);
                        let item = json!({"id": format!("msg_{seq}"), "type": "message", "status": "in_progress", "role": "assistant", "content": []});
                        let index = self.add_item(out, item);
                        let id = self.item_id(index);
                        self.emit(
                            out,
                            "response.content_part.added",
                            json!({"item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
                        );
                        self.open = Open::Text(index, delta.clone());
                        index
                    }
                };
                self.emit_delta(out, "response.output_text.delta", index, delta);
            }
            EventKind::ThinkingDelta { delta, .. } => {
                let index = match &mut self.open {
                    Open::Reasoning(index, text) => {
                        text.push_str(delta);
                        *index
                    }
                    _ => {
                        self.close(out);
                        let item = json!({"id": format!("rs_{seq}"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"});
                        let index = self.add_item(out, item);
                        self.open = Open::Reasoning(index, delta.clone());
                        index
                    }
                };
                self.emit_delta(out, "response.reasoning_text.delta", index, delta);
            }
            EventKind::ThinkingEnd { .. } => {
                if matches!(self.open, Open::Reasoning(..)) {
                    self.close(out);
                }
            }
            EventKind::Message { message } if message.role == Role::Assistant => {
                self.close(out);
            }
            EventKind::ToolStarted {
                call_id,
                tool,
                args,
                ..
            } => {
                self.close(out);
                // A call that needs approval shows as its request first, its `mcp_call` once decided.
                if !ToolRegistry::approval_needed(&self.approve, tool) {
                    self.open_call(out, call_id, tool, args);
                }
            }
            EventKind::ToolFinished {
                call_id,
                tool,
                args,
                result,
                success,
                ..
            } => {
                let index = match self.calls.iter().position(|(c, _)| c == call_id) {
                    Some(pos) => self.calls.remove(pos).1,
                    // Started in a previous response (or shown with its approval's decision, never opened).
                    None => {
                        self.close(out);
                        let index = self.open_call(out, call_id, tool, args);
                        self.calls.retain(|(c, _)| c != call_id);
                        index
                    }
                };
                let id = format!("mcp_{call_id}");
                let kind = if *success {
                    "response.mcp_call.completed"
                } else {
                    "response.mcp_call.failed"
                };
                self.emit(out, kind, json!({"item_id": id, "output_index": index}));
                let mut item = self.call_item(call_id, tool, args);
                item["output"] = json!(result);
                item["error"] = if *success { Value::Null } else { json!(result) };
                item["status"] = json!(if *success { "completed" } else { "failed" });
                self.done_item(out, index, item);
            }
            // The run waits for a decision: the request is the response's last item, and the response ends
            // (`completed`, as OpenAI's does); the response after this request carries the run on.
            EventKind::ApprovalRequested {
                request_id,
                tool,
                args,
                ..
            } => {
                self.close(out);
                let (server_label, name) = label_of(tool);
                let item = json!({"id": approval_item_id(request_id), "type": "mcp_approval_request", "server_label": server_label, "name": name, "arguments": args.to_string()});
                let index = self.add_item(out, item.clone());
                self.done_item(out, index, item);
                let (s, r) = self.ids();
                self.response["metadata"]["agentd_next_response_id"] =
                    json!(continuation_id(&s, &r, request_id));
                self.response["status"] = json!("completed");
                self.done = true;
                let snapshot = self.snapshot();
                self.emit(out, "response.completed", json!({"response": snapshot}));
            }
            // Decided: the call's `mcp_call` item (unless a previous response showed it started already).
            EventKind::ApprovalResolved { request_id, .. } => {
                let call = self
                    .requests
                    .iter()
                    .find(|(r, ..)| r == request_id)
                    .map(|(_, c, t, a)| (c.clone(), t.clone(), a.clone()));
                if let Some((call_id, tool, args)) = call {
                    let open = self.calls.iter().any(|(c, _)| *c == call_id);
                    if !open && self.top_calls.contains(&call_id) {
                        self.close(out);
                        self.open_call(out, &call_id, &tool, &args);
                    }
                }
            }
            EventKind::RunFinished { run, .. } => {
                self.close(out);
                self.finish(out, run);
                self.done = true;
            }
            // `ask_human` is its `mcp_call` item, in progress until the reply; while it waits, the response's
            // metadata names the question's request id (answered through the native API), announced by a
            // `response.in_progress` carrying the response.
            EventKind::InputRequested {
                request_id,
                question,
            } => {
                self.response["metadata"]["agentd_input_request_id"] = json!(request_id);
                self.response["metadata"]["agentd_input_question"] = json!(question);
                let snapshot = self.snapshot();
                self.emit(out, "response.in_progress", json!({"response": snapshot}));
            }
            EventKind::InputReceived { .. } => {
                if let Some(m) = self.response["metadata"].as_object_mut() {
                    m.remove("agentd_input_request_id");
                    m.remove("agentd_input_question");
                }
            }
            _ => {}
        }
    }

    /// What any event of the run teaches, whichever response shows it: the session's calls, the approval
    /// requests, and the calls of the last assistant message.
    fn learn(&mut self, ev: &LoggedEvent) {
        if ev.event.is_subagent {
            return;
        }
        match &ev.event.kind {
            EventKind::Message { message } if message.role == Role::Assistant => {
                self.last_calls = message.tool_calls.clone().unwrap_or_default();
                self.ran.clear();
            }
            EventKind::ToolStarted { call_id, .. } => {
                self.ran.push(call_id.clone());
                if !self.top_calls.contains(call_id) {
                    self.top_calls.push(call_id.clone());
                }
            }
            EventKind::ApprovalRequested {
                request_id,
                call_id,
                tool,
                args,
            } => self.requests.push((
                request_id.clone(),
                call_id.clone(),
                tool.clone(),
                args.clone(),
            )),
            _ => {}
        }
    }

    /// `response.created` and `response.in_progress`: the response begins.
    fn begin(&mut self, out: &mut Out) {
        self.started = true;
        self.response["status"] = json!("in_progress");
        let snapshot = self.snapshot();
        self.emit(out, "response.created", json!({"response": snapshot}));
        let snapshot = self.snapshot();
        self.emit(out, "response.in_progress", json!({"response": snapshot}));
    }

    /// The session and run ids of the response.
    fn ids(&self) -> (String, String) {
        let meta = &self.response["metadata"];
        let id = |k: &str| meta[k].as_str().unwrap_or_default().to_string();
        (id("agentd_session_id"), id("agentd_run_id"))
    }

    /// A server-side call's `mcp_call` item, in progress (`approval_request_id`: the request it waited for).
    fn call_item(&self, call_id: &str, tool: &str, args: &Value) -> Value {
        let (server_label, name) = label_of(tool);
        let approval = self
            .requests
            .iter()
            .find(|(_, c, ..)| c == call_id)
            .map(|(r, ..)| approval_item_id(r));
        json!({"id": format!("mcp_{call_id}"), "type": "mcp_call", "server_label": server_label, "name": name, "arguments": args.to_string(), "output": null, "error": null, "status": "in_progress", "approval_request_id": approval})
    }

    /// Adds a server-side call's `mcp_call` item, in progress; returns its index.
    fn open_call(&mut self, out: &mut Out, call_id: &str, tool: &str, args: &Value) -> usize {
        let item = self.call_item(call_id, tool, args);
        let index = self.add_item(out, item);
        self.emit(
            out,
            "response.mcp_call.in_progress",
            json!({"item_id": format!("mcp_{call_id}"), "output_index": index}),
        );
        self.calls.push((call_id.to_string(), index));
        index
    }

    fn finish(&mut self, out: &mut Out, run: &Run) {
        // The client's calls: those of the last assistant message the server did not run.
        if run.status == RunStatus::Completed {
            let theirs: Vec<ToolCall> = self
                .last_calls
                .iter()
                .filter(|c| !self.ran.contains(&c.id))
                .cloned()
                .collect();
            for c in theirs {
                let id = format!("fc_{}", c.id);
                let item = json!({"id": id, "type": "function_call", "call_id": c.id, "name": c.name, "arguments": "", "status": "in_progress"});
                let index = self.add_item(out, item);
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": index, "delta": c.arguments}),
                );
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "name": c.name, "arguments": c.arguments}),
                );
                let item = json!({"id": id, "type": "function_call", "call_id": c.id, "name": c.name, "arguments": c.arguments, "status": "completed"});
                self.done_item(out, index, item);
            }
        }
        self.set_end(run);
        let kind = match run.status {
            RunStatus::Completed => "response.completed",
            RunStatus::Cancelled => "response.incomplete",
            RunStatus::Failed
                if run.error.as_ref().map(|e| e.code) == Some(RunErrorCode::MaxIterations) =>
            {
                "response.incomplete"
            }
            _ => "response.failed",
        };
        let snapshot = self.snapshot();
        self.emit(out, kind, json!({"response": snapshot}));
    }

    /// Status, error and usage of an ended run.
    fn set_end(&mut self, run: &Run) {
        let max_iterations =
            run.error.as_ref().map(|e| e.code) == Some(RunErrorCode::MaxIterations);
        let status = match run.status {
            RunStatus::Completed => "completed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Failed if max_iterations => "incomplete",
            RunStatus::Queued => "queued",
            RunStatus::Running | RunStatus::WaitingInput => "in_progress",
            RunStatus::Failed | RunStatus::Interrupted => "failed",
        };
        self.response["status"] = json!(status);
        if max_iterations {
            self.response["incomplete_details"] = json!({"reason": "max_iterations"});
        } else if let Some(e) = &run.error {
            self.response["error"] = json!({"code": e.code, "message": e.message});
        }
        if run.status.is_terminal() {
            self.response["usage"] = usage(&run.usage);
        }
    }

    /// The response of a run whose events are past retention: its status and its answer.
    fn fill_from_rows(&mut self, run: &Run, answer: Option<agentd_core::domain::Message>) {
        if let Some(m) = answer {
            let item = json!({"id": format!("msg_{}", m.id), "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": m.content, "annotations": [], "logprobs": []}]});
            self.items.push(item);
        }
        self.set_end(run);
    }
}

/// The `server_label` and `name` of a tool: an MCP tool `SERVER__TOOL` is `TOOL` of the server `SERVER`; a
/// built-in tool or a subagent is itself, of `agentd`.
fn label_of(tool: &str) -> (&str, &str) {
    match tool.split_once(MCP_SEPARATOR) {
        Some((server, name)) if !server.is_empty() => (server, name),
        _ => ("agentd", tool),
    }
}

fn usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mcp_tool_is_labelled_with_its_server() {
        assert_eq!(
            label_of("files__read_text_file"),
            ("files", "read_text_file")
        );
        assert_eq!(label_of("m__a__b"), ("m", "a__b"));
        assert_eq!(label_of("calculator"), ("agentd", "calculator"));
        assert_eq!(label_of("__odd"), ("agentd", "__odd"));
    }

    #[test]
    fn a_response_id_names_a_run_and_perhaps_the_request_it_follows() {
        let (s, r, q) = ("a".repeat(32), "b".repeat(32), "c".repeat(32));
        let first = parse_id(&response_id(&s, &r)).unwrap();
        assert_eq!(
            (first.session_id, first.run_id, first.after),
            (s.clone(), r.clone(), None)
        );
        let next = parse_id(&continuation_id(&s, &r, &q)).unwrap();
        assert_eq!((next.session_id, next.run_id, next.after), (s, r, Some(q)));
        for bad in [
            "resp_",
            "resp_abc",
            "nonsense",
            &format!("resp_{}", "g".repeat(64)),
        ] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }
}
