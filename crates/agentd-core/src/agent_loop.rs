//! The agent loop (ReAct): model call -> tool calls (concurrently) -> tool results -> model call ..., until a
//! final answer, `max_iterations`, cancellation or an error. It reports everything as events through the log
//! and knows no wire format and no HTTP.
//!
//! The run manager owns runs (status, `run_started`/`run_finished`); this module owns one turn's work.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentSettings, Config};
use crate::domain::{
    new_id, now_rfc3339, Message, Role, RunError, RunErrorCode, RunStatus, ToolCall, Usage,
};
use crate::event::{EventKind, NewEvent};
use crate::event_log::{EventLog, LogError};
use crate::metrics::{Metrics, ModelMetrics, ToolOutcome};
use crate::provider::{ModelEvent, ModelMessage, ModelRequest, Provider, ProviderError, ToolSpec};
use crate::registry::{ToolRegistry, TurnTool, TurnTools};
use crate::think::{Piece, ThinkSplitter};
use crate::tools::{HumanInput, ToolContext, ToolOutput};
use crate::uploads;

/// What a turn needs from the server: shared, cheap to clone.
#[derive(Clone)]
pub struct LoopEnv {
    pub config: Arc<Config>,
    pub log: Arc<EventLog>,
    pub providers: Arc<HashMap<String, Arc<dyn Provider>>>,
    pub metrics: Arc<Metrics>,
    /// Built-in tools, subagents and MCP tools: the one registry.
    pub tools: ToolRegistry,
    /// Set when the process stops with turns still running and the next process will resume them
    /// (`server.recovery = "resume"`): a turn cancelled now records nothing of its cut step (no partial answer,
    /// no "cancelled" tool results), so the resumed run redoes that step.
    pub handing_over: Arc<std::sync::atomic::AtomicBool>,
}

impl LoopEnv {
    fn handing_over(&self) -> bool {
        self.handing_over.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One turn to run.
pub struct TurnSpec {
    pub session_id: String,
    pub run_id: String,
    /// The agent whose turn it is (the session's agent, or a subagent).
    pub agent: AgentSettings,
    /// Effective settings after skill routing.
    pub system_prompt: String,
    pub tools: Vec<String>,
    /// Subagents offered as tools (a skill's tool subset can narrow them).
    pub subagents: Vec<String>,
    pub provider: String,
    pub model: String,
    pub is_subagent: bool,
    /// 0 for the session's own turn; subagents run at depth + 1.
    pub depth: u32,
    /// The conversation so far, without the system prompt; ends with the new user message.
    pub history: Vec<ModelMessage>,
    pub workspace: PathBuf,
    pub human: Arc<dyn HumanInput>,
    pub cancel: CancellationToken,
    /// A run a dead process left unfinished, going on from its last durable step (None: a new turn).
    pub resumed: Option<Resumed>,
    /// Function tools the client runs itself (offered to the model, never run here): a model call naming one
    /// stores the assistant message with its calls, runs the calls of the agent's own tools in it, and ends
    /// the turn (`completed`), its final message carrying the calls; the client's next send brings the results.
    pub client_tools: Vec<ToolSpec>,
}

/// Where a resumed turn picks up, as its log and stored messages show (SPEC.md section 4, recovery). Its
/// history (`TurnSpec::history`) already holds the turn's own stored messages.
#[derive(Clone, Debug, Default)]
pub struct Resumed {
    /// The turn's own text before the interrupted model call (whose deltas are superseded).
    pub content: String,
    /// Model calls that completed (each stored its assistant message).
    pub steps: u32,
    /// Tool rounds used.
    pub rounds: u32,
    /// Calls of the turn's last assistant message that have no stored result: they were in flight, or
    /// finished without their round's results being stored.
    pub pending_calls: Vec<ToolCall>,
    /// Results of pending calls that are in the log (`tool_finished`): those calls are not made again.
    pub logged_results: HashMap<String, ToolOutput>,
    /// Pending calls that were waiting for approval (they never ran): they wait again, under the same request.
    pub awaiting_approval: Vec<String>,
}

/// The result a tool call that was in flight when its process died gets, when the tool is not safe to repeat.
pub const INTERRUPTED_TOOL_RESULT: &str = "interrupted: the tool may or may not have run";

/// How a turn ended.
#[derive(Clone, Debug)]
pub struct TurnOutcome {
    pub status: RunStatus,
    pub error: Option<RunError>,
    /// The turn's answer: all of its own text deltas.
    pub content: String,
    /// The last assistant message stored, if any.
    pub final_message: Option<Message>,
    /// The turn's answer when it is not in the log yet: the caller appends it together with the run's end, in
    /// one commit (a completed top-level turn's last message).
    pub unsent_answer: Option<Message>,
    pub usage: Usage,
    pub context_tokens: u64,
}

/// Rough token estimate for text with no tokenizer at hand: ~4 characters a token.
pub fn estimate_tokens(messages: &[ModelMessage]) -> u64 {
    messages
        .iter()
        .map(|m| 4 + (m.text().len() as u64).div_ceil(4))
        .sum()
}

/// Sends one turn's events with the right envelope.
struct Emitter {
    log: Arc<EventLog>,
    session_id: String,
    run_id: String,
    agent: String,
    is_subagent: bool,
}

impl Emitter {
    fn event(&self, kind: EventKind) -> NewEvent {
        NewEvent {
            session_id: self.session_id.clone(),
            run_id: self.run_id.clone(),
            agent: self.agent.clone(),
            is_subagent: self.is_subagent,
            kind,
        }
    }
    async fn send(&self, kind: EventKind) -> Result<(), LogError> {
        self.log.append(self.event(kind), None).await
    }
    /// Messages are durable before the turn goes on: a crash keeps every message the turn got to.
    async fn message(&self, message: &Message) -> Result<(), LogError> {
        self.log
            .append_durable(
                self.event(EventKind::Message {
                    message: message.clone(),
                }),
                None,
            )
            .await
            .map(|_| ())
    }
}

fn provider_error(e: &ProviderError) -> RunError {
    let code = match e {
        ProviderError::Timeout(_) => RunErrorCode::UpstreamTimeout,
        _ => RunErrorCode::UpstreamError,
    };
    RunError {
        code,
        message: e.to_string(),
    }
}

fn internal(e: impl std::fmt::Display) -> RunError {
    RunError {
        code: RunErrorCode::Internal,
        message: e.to_string(),
    }
}

/// Runs one turn to its end. Never panics on model output; every failure becomes the outcome's error.
pub async fn run_turn(env: &LoopEnv, spec: TurnSpec) -> TurnOutcome {
    let mut t = Turn::new(env, spec);
    match t.run().await {
        Ok(()) => {}
        Err(Stop::Cancelled) => t.status = RunStatus::Cancelled,
        Err(Stop::Failed(e)) => {
            t.status = RunStatus::Failed;
            t.error = Some(e);
        }
    }
    TurnOutcome {
        status: t.status,
        error: t.error,
        content: t.content,
        final_message: t.final_message,
        unsent_answer: t.unsent_answer,
        usage: t.usage,
        context_tokens: t.context_tokens,
    }
}

enum Stop {
    Cancelled,
    Failed(RunError),
}

impl From<LogError> for Stop {
    fn from(e: LogError) -> Stop {
        Stop::Failed(internal(e))
    }
}

struct Turn<'a> {
    env: &'a LoopEnv,
    spec: TurnSpec,
    emit: Emitter,
    status: RunStatus,
    error: Option<RunError>,
    content: String,
    final_message: Option<Message>,
    unsent_answer: Option<Message>,
    usage: Usage,
    context_tokens: u64,
    /// Context tokens of the last model call as reported, and how many prompt messages it covered.
    reported: Option<(u64, usize)>,
    /// This turn's provider and model's metric handles.
    model_metrics: ModelMetrics,
}

impl<'a> Turn<'a> {
    fn new(env: &'a LoopEnv, spec: TurnSpec) -> Turn<'a> {
        let emit = Emitter {
            log: env.log.clone(),
            session_id: spec.session_id.clone(),
            run_id: spec.run_id.clone(),
            agent: spec.agent.name.clone(),
            is_subagent: spec.is_subagent,
        };
        let model_metrics = env.metrics.model(&spec.provider, &spec.model);
        Turn {
            env,
            spec,
            emit,
            status: RunStatus::Completed,
            error: None,
            content: String::new(),
            final_message: None,
            unsent_answer: None,
            usage: Usage::default(),
            context_tokens: 0,
            reported: None,
            model_metrics,
        }
    }

    /// The tool's name as a metric label: a configured name, or `unknown` for one the model made up.
    fn tool_label<'n>(&self, name: &'n str, tools: &TurnTools) -> &'n str {
        if tools.knows(name) {
            name
        } else {
            "unknown"
        }
    }

    fn provider(&self) -> Result<Arc<dyn Provider>, Stop> {
        self.env
            .providers
            .get(&self.spec.provider)
            .cloned()
            .ok_or_else(|| {
                Stop::Failed(internal(format!(
                    "provider `{}` is not available",
                    self.spec.provider
                )))
            })
    }

    /// The tools of the next model call (an MCP server's list may have changed since the last one).
    fn turn_tools(&self) -> TurnTools {
        let with_subagents = self.spec.depth < self.env.config.server.max_subagent_depth;
        self.env
            .tools
            .for_turn(&self.spec.tools, &self.spec.subagents, with_subagents)
            .with_client_tools(&self.spec.client_tools)
    }

    async fn run(&mut self) -> Result<(), Stop> {
        let provider = self.provider()?;
        let mut tools = self.turn_tools();
        let mut prompt: Vec<ModelMessage> = Vec::with_capacity(self.spec.history.len() + 1);
        if !self.spec.system_prompt.is_empty() {
            prompt.push(ModelMessage::System {
                content: self.spec.system_prompt.clone(),
            });
        }
        prompt.append(&mut self.spec.history);
        let max_rounds = self.spec.agent.max_iterations;
        let mut rounds = 0u32;
        let mut step = 0u32;
        if let Some(mut r) = self.spec.resumed.take() {
            self.content = r.content;
            step = r.steps;
            rounds = r.rounds;
            if !r.pending_calls.is_empty() {
                // Whether an MCP call may run again depends on its server's tool list (read-only or idempotent
                // hints): a run resumed at start-up waits for the servers' first start.
                if r.pending_calls
                    .iter()
                    .any(|c| crate::registry::mcp_server_of(&c.name).is_some())
                {
                    self.env.tools.settled().await;
                }
                let mut logged = std::mem::take(&mut r.logged_results);
                self.settle_interrupted_calls(
                    &r.pending_calls,
                    &mut logged,
                    &r.awaiting_approval,
                    &tools,
                    step,
                    &mut prompt,
                )
                .await?;
            }
        }
        loop {
            step += 1;
            if step > 1 {
                tools = self.turn_tools();
            }
            self.maybe_compress(&mut prompt, &provider).await?;
            let request = ModelRequest {
                model: self.spec.model.clone(),
                messages: prompt.clone(),
                tools: tools.specs.clone(),
            };
            let (text, calls) = self
                .model_call(&provider, request, step, prompt.len())
                .await?;
            if calls.is_empty() {
                // The answer ends the turn: the caller commits it with the run's end (one write, not two).
                let msg = self.new_message(Role::Assistant, text);
                if !self.spec.is_subagent {
                    self.unsent_answer = Some(msg.clone());
                }
                self.final_message = Some(msg);
                return Ok(());
            }
            if rounds >= max_rounds {
                if !text.is_empty() {
                    self.store_assistant(text, None).await?;
                }
                return Err(Stop::Failed(RunError {
                    code: RunErrorCode::MaxIterations,
                    message: format!(
                        "the agent used all {max_rounds} tool rounds without a final answer"
                    ),
                }));
            }
            rounds += 1;
            let msg = self.store_assistant(text, Some(calls.clone())).await?;
            let (theirs, own): (Vec<ToolCall>, Vec<ToolCall>) = calls
                .iter()
                .cloned()
                .partition(|c| self.spec.client_tools.iter().any(|t| t.name == c.name));
            if !theirs.is_empty() {
                // The client runs its calls; the agent's own calls in the same response run now.
                let results = self.run_tools(&own, &tools, step).await?;
                for (call, out) in own.iter().zip(results) {
                    self.store_tool_result(call, &out).await?;
                }
                self.final_message = Some(msg);
                return Ok(());
            }
            prompt.push(ModelMessage::Assistant {
                content: msg.content,
                tool_calls: calls.clone(),
            });
            let results = self.run_tools(&calls, &tools, step).await?;
            for (call, out) in calls.iter().zip(results) {
                self.store_tool_result(call, &out).await?;
                prompt.push(ModelMessage::Tool {
                    tool_call_id: call.id.clone(),
                    content: out.content,
                    images: out.images,
                });
            }
        }
    }

    /// Streams one model call into events. Returns its text and tool calls.
    async fn model_call(
        &mut self,
        provider: &Arc<dyn Provider>,
        request: ModelRequest,
        step: u32,
        prompt_len: usize,
    ) -> Result<(String, Vec<ToolCall>), Stop> {
        let cancel = self.spec.cancel.clone();
        let estimate = estimate_tokens(&request.messages);
        let metrics = self.env.metrics.clone();
        let started = Instant::now();
        let mut stream = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(Stop::Cancelled),
            s = provider.stream(request) => s.map_err(|e| {
                metrics.upstream_error(&self.spec.provider, &e);
                Stop::Failed(provider_error(&e))
            })?,
        };
        // Time to first output, and the streamed deltas (output tokens when the call reports no usage).
        let mut first_output: Option<Instant> = None;
        let mut deltas = 0u64;
        let mut text = String::new();
        let mut thinking = String::new();
        let mut calls = Vec::new();
        let mut call_usage: Option<Usage> = None;
        let mut splitter = ThinkSplitter::default();
        let mut pieces = Vec::new();
        let outcome: Result<(), Stop> = loop {
            let item = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Err(Stop::Cancelled),
                item = stream.next() => item,
            };
            let output = matches!(
                &item,
                Some(Ok(ModelEvent::Text(_)
                    | ModelEvent::Thinking(_)
                    | ModelEvent::ToolCall(_)))
            );
            if output && first_output.is_none() {
                let now = Instant::now();
                self.model_metrics
                    .ttft
                    .observe((now - started).as_secs_f64());
                first_output = Some(now);
            }
            match item {
                None => break Ok(()),
                Some(Err(e)) => {
                    metrics.upstream_error(&self.spec.provider, &e);
                    break Err(Stop::Failed(provider_error(&e)));
                }
                Some(Ok(ModelEvent::Text(chunk))) => {
                    deltas += 1;
                    splitter.feed(&chunk, &mut pieces);
                    for p in pieces.drain(..) {
                        self.piece(p, &mut text, &mut thinking, step).await?;
                    }
                }
                Some(Ok(ModelEvent::Thinking(delta))) => {
                    deltas += 1;
                    thinking.push_str(&delta);
                    self.emit
                        .send(EventKind::ThinkingDelta { delta, step })
                        .await?;
                }
                Some(Ok(ModelEvent::ToolCall(call))) => calls.push(call),
                Some(Ok(ModelEvent::Usage(u))) => {
                    call_usage = Some(u);
                }
            }
        };
        drop(stream); // abandons the upstream request on cancel or error
        let ended = Instant::now();
        let (tokens_in, tokens_out) = match &call_usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens),
            // A delta may carry several tokens (what one read of the upstream brought): count at least a
            // token per four bytes, as the prompt's estimate does.
            None => (
                estimate,
                deltas.max(((text.len() + thinking.len()) as u64).div_ceil(4)),
            ),
        };
        let m = &self.model_metrics;
        m.input_tokens.inc_by(tokens_in);
        m.output_tokens.inc_by(tokens_out);
        // From the first output to the end, over the tokens after the first (vLLM's definition), for a call that
        // streamed text or thinking (a tool call arrives whole at the end). One delta is enough: it may carry
        // what one read of the upstream brought.
        if let Some(first) = first_output.filter(|_| deltas >= 1 && tokens_out >= 2) {
            m.tpot
                .observe((ended - first).as_secs_f64() / (tokens_out - 1) as f64);
        }
        splitter.finish(&mut pieces);
        for p in pieces.drain(..) {
            self.piece(p, &mut text, &mut thinking, step).await?;
        }
        if !thinking.is_empty() {
            self.emit
                .send(EventKind::ThinkingEnd {
                    step,
                    thinking: std::mem::take(&mut thinking),
                })
                .await?;
        }
        match call_usage {
            Some(u) => {
                self.usage.prompt_tokens += u.prompt_tokens;
                self.usage.completion_tokens += u.completion_tokens;
                self.context_tokens = u.prompt_tokens + u.completion_tokens;
                self.reported = Some((self.context_tokens, prompt_len));
            }
            None => {
                self.context_tokens = estimate + (text.len() as u64).div_ceil(4);
                self.reported = None;
            }
        }
        if let Err(stop) = outcome {
            // Keep the partial answer: on cancel it is the assistant message; on failure it is not lost either.
            // (Not when the run is handed over: the next process makes this model call again.)
            let handover = matches!(stop, Stop::Cancelled) && self.env.handing_over();
            if !text.is_empty() && !handover {
                self.store_assistant(text, None).await?;
            }
            return Err(stop);
        }
        Ok((text, calls))
    }

    async fn piece(
        &mut self,
        p: Piece,
        text: &mut String,
        thinking: &mut String,
        step: u32,
    ) -> Result<(), Stop> {
        match p {
            Piece::Text(delta) => {
                if !thinking.is_empty() {
                    self.emit
                        .send(EventKind::ThinkingEnd {
                            step,
                            thinking: std::mem::take(thinking),
                        })
                        .await?;
                }
                text.push_str(&delta);
                self.content.push_str(&delta);
                self.emit.send(EventKind::TextDelta { delta }).await?;
            }
            Piece::Thinking(delta) => {
                thinking.push_str(&delta);
                self.emit
                    .send(EventKind::ThinkingDelta { delta, step })
                    .await?;
            }
        }
        Ok(())
    }

    fn new_message(&self, role: Role, content: String) -> Message {
        Message {
            id: new_id(),
            session_id: self.spec.session_id.clone(),
            run_id: Some(self.spec.run_id.clone()),
            role,
            content,
            tool_calls: None,
            tool_call_id: None,
            agent: Some(self.spec.agent.name.clone()),
            images: Vec::new(),
            created_at: now_rfc3339(),
        }
    }

    /// Stores an assistant message (a subagent's stay out of the session's history: its answer reaches the
    /// parent as a tool result).
    async fn store_assistant(
        &mut self,
        content: String,
        tool_calls: Option<Vec<ToolCall>>,
    ) -> Result<Message, Stop> {
        let mut msg = self.new_message(Role::Assistant, content);
        msg.tool_calls = tool_calls;
        if !self.spec.is_subagent {
            self.emit.message(&msg).await?;
        }
        self.final_message = Some(msg.clone());
        Ok(msg)
    }

    async fn store_tool_result(&mut self, call: &ToolCall, out: &ToolOutput) -> Result<(), Stop> {
        if self.spec.is_subagent {
            return Ok(());
        }
        let mut msg = self.new_message(Role::Tool, out.content.clone());
        msg.tool_call_id = Some(call.id.clone());
        msg.images = out.images.clone();
        self.emit.message(&msg).await?;
        Ok(())
    }

    /// A resumed turn's calls that were in flight when its process died: each tool safe to repeat runs again,
    /// every other call gets [`INTERRUPTED_TOOL_RESULT`] (`success: false`) and the model decides; a call whose
    /// result is in the log keeps it. Their results
    /// are stored and join the prompt, so the next model call sees every call answered.
    async fn settle_interrupted_calls(
        &mut self,
        calls: &[ToolCall],
        logged: &mut HashMap<String, ToolOutput>,
        awaiting_approval: &[String],
        tools: &TurnTools,
        step: u32,
        prompt: &mut Vec<ModelMessage>,
    ) -> Result<(), Stop> {
        // A call that was still waiting for its approval never ran: it asks again (under the same request).
        let retry = |c: &&ToolCall| {
            awaiting_approval.contains(&c.id)
                || self.env.tools.safe_to_repeat(&self.spec.agent, &c.name)
        };
        let mut outputs = std::mem::take(logged);
        let again: Vec<ToolCall> = calls
            .iter()
            .filter(|c| !outputs.contains_key(&c.id))
            .filter(retry)
            .cloned()
            .collect();
        if !again.is_empty() {
            let results = self.run_tools(&again, tools, step).await?;
            outputs.extend(again.iter().map(|c| c.id.clone()).zip(results));
        }
        for call in calls {
            if outputs.contains_key(&call.id) {
                continue;
            }
            let out = ToolOutput::err(INTERRUPTED_TOOL_RESULT);
            let args = serde_json::from_str(&call.arguments).unwrap_or(Value::Null);
            self.emit
                .send(EventKind::ToolFinished {
                    call_id: call.id.clone(),
                    tool: call.name.clone(),
                    args,
                    result: out.content.clone(),
                    success: false,
                    step,
                })
                .await?;
            outputs.insert(call.id.clone(), out);
        }
        for call in calls {
            let out = outputs
                .remove(&call.id)
                .unwrap_or_else(|| ToolOutput::err(INTERRUPTED_TOOL_RESULT));
            self.store_tool_result(call, &out).await?;
            prompt.push(ModelMessage::Tool {
                tool_call_id: call.id.clone(),
                content: out.content,
                images: out.images,
            });
        }
        Ok(())
    }

    /// Runs a round's tool calls concurrently. On cancel, unfinished calls get a "cancelled" result so the
    /// stored history never holds a call without its result.
    async fn run_tools(
        &mut self,
        calls: &[ToolCall],
        tools: &TurnTools,
        step: u32,
    ) -> Result<Vec<ToolOutput>, Stop> {
        let mut parsed = Vec::with_capacity(calls.len());
        for call in calls {
            let args: Value = if call.arguments.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&call.arguments).unwrap_or(Value::Null)
            };
            self.emit
                .send(EventKind::ToolStarted {
                    call_id: call.id.clone(),
                    tool: call.name.clone(),
                    args: args.clone(),
                    step,
                })
                .await?;
            parsed.push(args);
        }
        let ctx = ToolContext {
            workspace: self.spec.workspace.clone(),
            human: self.spec.human.clone(),
            cancel: self.spec.cancel.clone(),
        };
        let mut results: Vec<Option<ToolOutput>> = vec![None; calls.len()];
        let cancel = self.spec.cancel.clone();
        let metrics = self.env.metrics.clone();
        let started = Instant::now();
        let cancelled = {
            let mut running = FuturesUnordered::new();
            for (i, (call, args)) in calls.iter().zip(&parsed).enumerate() {
                let ctx = &ctx;
                let fut = self.call_tool(call, args, tools, ctx);
                running.push(async move { (i, fut.await) });
            }
            loop {
                let next = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break true,
                    next = running.next() => next,
                };
                let Some((i, out)) = next else { break false };
                let call = &calls[i];
                let outcome = if out.success {
                    ToolOutcome::Success
                } else {
                    ToolOutcome::Error
                };
                let seconds = started.elapsed().as_secs_f64();
                metrics.tool_call(self.tool_label(&call.name, tools), outcome, seconds);
                self.emit
                    .send(EventKind::ToolFinished {
                        call_id: call.id.clone(),
                        tool: call.name.clone(),
                        args: parsed[i].clone(),
                        result: out.content.clone(),
                        success: out.success,
                        step,
                    })
                    .await?;
                results[i] = Some(out);
            }
        };
        if cancelled {
            let seconds = started.elapsed().as_secs_f64();
            for (call, r) in calls.iter().zip(&results) {
                if r.is_none() {
                    let tool = self.tool_label(&call.name, tools);
                    metrics.tool_call(tool, ToolOutcome::Cancelled, seconds);
                }
            }
        }
        let outputs: Vec<ToolOutput> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| ToolOutput::err("cancelled before the tool finished")))
            .collect();
        if cancelled {
            // Handed over, the calls stay unanswered: the next process settles them as in-flight calls.
            if !self.env.handing_over() {
                for (call, out) in calls.iter().zip(&outputs) {
                    self.store_tool_result(call, out).await?;
                }
            }
            return Err(Stop::Cancelled);
        }
        Ok(outputs)
    }

    fn call_tool<'b>(
        &'b self,
        call: &'b ToolCall,
        args: &'b Value,
        tools: &'b TurnTools,
        ctx: &'b ToolContext,
    ) -> futures_util::future::BoxFuture<'b, ToolOutput> {
        Box::pin(async move {
            let out = if args.is_null() {
                ToolOutput::err(format!("arguments are not valid JSON: {}", call.arguments))
            } else {
                match tools.get(&call.name) {
                    None => ToolOutput::err(format!("unknown tool `{}`", call.name)),
                    Some(tool) => {
                        let decision = if ToolRegistry::needs_approval(&self.spec.agent, &call.name)
                        {
                            Some(ctx.human.approve(&call.id, &call.name, args).await)
                        } else {
                            None
                        };
                        match (decision, tool) {
                            (Some(d), _) if !d.allow => ToolOutput::err(d.denied_result()),
                            (_, TurnTool::Tool(tool)) => tool.call(args, ctx).await,
                            (_, TurnTool::Subagent) => self.run_subagent(&call.name, args).await,
                        }
                    }
                }
            };
            // Before the model, the log or any client sees it (SPEC.md section 4).
            uploads::cut_tool_result(
                out,
                self.env.config.server.max_tool_result_bytes,
                self.env.log.store().as_ref(),
                &self.spec.session_id,
                &self.spec.workspace,
                &call.id,
                &call.name,
            )
            .await
        })
    }

    async fn run_subagent(&self, name: &str, args: &Value) -> ToolOutput {
        let Some(agent) = self.env.config.agent(name).cloned() else {
            return ToolOutput::err(format!("unknown agent `{name}`"));
        };
        let Some(task) = args.get("task").and_then(Value::as_str) else {
            return ToolOutput::err("missing string argument `task`");
        };
        let spec = TurnSpec {
            session_id: self.spec.session_id.clone(),
            run_id: self.spec.run_id.clone(),
            system_prompt: agent.system_prompt.clone(),
            tools: agent.tools.clone(),
            subagents: agent.subagents.clone(),
            provider: agent.provider.clone(),
            model: agent.model.clone(),
            agent,
            is_subagent: true,
            depth: self.spec.depth + 1,
            history: vec![ModelMessage::User {
                content: task.to_string(),
                images: Vec::new(),
            }],
            workspace: self.spec.workspace.clone(),
            human: self.spec.human.clone(),
            cancel: self.spec.cancel.child_token(),
            resumed: None,
            client_tools: Vec::new(),
        };
        let outcome = Box::pin(run_turn(self.env, spec)).await;
        match outcome.status {
            RunStatus::Completed => ToolOutput::ok(
                outcome
                    .final_message
                    .map(|m| m.content)
                    .unwrap_or(outcome.content),
            ),
            RunStatus::Cancelled => ToolOutput::err("the subagent was cancelled"),
            _ => ToolOutput::err(format!(
                "the subagent failed: {}",
                outcome
                    .error
                    .map(|e| e.message)
                    .unwrap_or_else(|| "unknown error".into())
            )),
        }
    }

    /// Compresses the prompt when its context tokens exceed `compress_at * max_context_tokens`: everything
    /// before the latest user message is summarised by the model into one system message (or, if that call
    /// fails, dropped). The latest user message and everything after it stay, so no tool call is ever split
    /// from its result. Stored history is untouched.
    async fn maybe_compress(
        &mut self,
        prompt: &mut Vec<ModelMessage>,
        provider: &Arc<dyn Provider>,
    ) -> Result<(), Stop> {
        let agent = &self.spec.agent;
        let threshold = (agent.compress_at * agent.max_context_tokens as f64) as u64;
        let tokens = match self.reported {
            Some((reported, covered)) if covered <= prompt.len() => {
                reported + estimate_tokens(&prompt[covered..])
            }
            _ => estimate_tokens(prompt),
        };
        if tokens <= threshold {
            return Ok(());
        }
        let first_kept = match prompt
            .iter()
            .rposition(|m| matches!(m, ModelMessage::User { .. }))
        {
            Some(i) => i,
            None => return Ok(()),
        };
        let older: Vec<&ModelMessage> = prompt[..first_kept]
            .iter()
            .filter(|m| !m.is_system())
            .collect();
        if older.is_empty() {
            return Ok(());
        }
        let before = prompt.iter().filter(|m| !m.is_system()).count();
        // The summary request is itself bounded: at most half the window of transcript, newest part kept.
        let budget_chars = (agent.max_context_tokens as usize / 2).max(64) * 4;
        let mut transcript = String::new();
        for m in &older {
            let role = match m {
                ModelMessage::User { .. } => "user",
                ModelMessage::Assistant { .. } => "assistant",
                ModelMessage::Tool { .. } => "tool",
                ModelMessage::System { .. } => "system",
            };
            transcript.push_str(role);
            transcript.push_str(": ");
            transcript.push_str(m.text());
            transcript.push('\n');
        }
        if transcript.len() > budget_chars {
            let mut cut = transcript.len() - budget_chars;
            while !transcript.is_char_boundary(cut) {
                cut += 1;
            }
            transcript.drain(..cut);
        }
        let summary = self.summarise(provider, transcript, budget_chars).await;
        if self.spec.cancel.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        let (system, _rest): (Vec<ModelMessage>, Vec<ModelMessage>) = prompt[..first_kept]
            .iter()
            .cloned()
            .partition(|m| m.is_system());
        let mut compressed: Vec<ModelMessage> = system.into_iter().take(1).collect();
        let method = match summary {
            Some(s) => {
                compressed.push(ModelMessage::System {
                    content: format!("Summary of the earlier conversation:\n{s}"),
                });
                "summary"
            }
            None => "truncation",
        };
        compressed.extend(prompt.drain(first_kept..));
        *prompt = compressed;
        self.reported = None;
        let after = prompt.iter().filter(|m| !m.is_system()).count();
        self.emit
            .send(EventKind::ContextCompressed {
                messages_before: before,
                messages_after: after,
                method: method.into(),
            })
            .await?;
        Ok(())
    }

    /// The model's summary of `transcript`, at most `max_chars` of it (an upstream that rambles on is cut off:
    /// the summary joins every later prompt of the turn), or `None` if the call fails or is cancelled.
    async fn summarise(
        &self,
        provider: &Arc<dyn Provider>,
        transcript: String,
        max_chars: usize,
    ) -> Option<String> {
        let request = ModelRequest {
            model: self.spec.model.clone(),
            messages: vec![
                ModelMessage::System {
                    content: "Summarise the conversation below in a few sentences. Keep names, numbers, decisions and open questions.".into(),
                },
                ModelMessage::User { content: transcript, images: Vec::new() },
            ],
            tools: Vec::new(),
        };
        let cancel = self.spec.cancel.clone();
        let failed = |e: ProviderError| {
            self.env.metrics.upstream_error(&self.spec.provider, &e);
        };
        let work = async {
            let mut stream = provider.stream(request).await.map_err(failed).ok()?;
            let mut out = String::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ModelEvent::Text(t)) => {
                        let room = max_chars.saturating_sub(out.len());
                        if t.len() >= room {
                            let mut cut = room;
                            while !t.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            out.push_str(&t[..cut]);
                            break;
                        }
                        out.push_str(&t);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failed(e);
                        return None;
                    }
                }
            }
            let out = out.trim().to_string();
            (!out.is_empty()).then_some(out)
        };
        tokio::select! {
            _ = cancel.cancelled() => None,
            s = work => s,
        }
    }
}
