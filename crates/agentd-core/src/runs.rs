//! The run manager: every turn is a task owned by the server, never by a connection.
//!
//! Per session, turns take a one-permit FIFO semaphore, so enqueued turns run in order. Each run has a cancel
//! token and a `done` watch; cancel, `ask_human` replies and status come through here from any connection.
//! The run's row changes travel with its events through the log (`run_started`, `input_requested`,
//! `run_finished` carry the run), so the log and the runs table never disagree.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use std::future::Future;
use std::pin::Pin;

use prometheus::IntGauge;
use tokio::sync::{oneshot, watch, AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_loop::{run_turn, LoopEnv, Resumed, TurnSpec};
use crate::config::AgentSettings;
use crate::config::Recovery;
use crate::domain::{now_rfc3339, Message, Role, Run, RunError, RunErrorCode, RunStatus, ToolCall};
use crate::event::{EventKind, LoggedEvent, NewEvent};
use crate::metrics::GaugeGuard;
use crate::provider::ModelMessage;
use crate::skills::SkillMatch;
use crate::store::{LogEntry, Store, StoreError};
use crate::tools::{Decision, HumanInput, ToolOutput};

/// A finished run and its final assistant message.
pub type RunResult = Option<(Run, Option<Message>)>;

struct RunHandle {
    cancel: CancellationToken,
    done: watch::Receiver<RunResult>,
}

/// What a pending request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PendingKind {
    /// `ask_human`: a text reply.
    Question,
    /// A tool call to approve: a decision (a text reply is read as agentkit's yes/no).
    Approval,
}

/// An answer to a pending request.
#[derive(Clone, Debug)]
pub enum Answer {
    Text(String),
    Decision(Decision),
}

struct PendingInput {
    run_id: String,
    kind: PendingKind,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct SessionState {
    /// The run holding the turn.
    active: Option<String>,
    /// Queued and active runs, oldest first.
    runs: Vec<(String, RunHandle)>,
    pending_inputs: HashMap<String, PendingInput>,
}

impl SessionState {
    /// `run_id` no longer holds the turn (if it did).
    fn release_active(&mut self, run_id: &str) {
        if self.active.as_deref() == Some(run_id) {
            self.active = None;
        }
    }

    /// `run_id` has ended (or left this process): neither queued nor asking any more.
    fn forget(&mut self, run_id: &str) {
        self.runs.retain(|(id, _)| id != run_id);
        self.pending_inputs.retain(|_, p| p.run_id != run_id);
    }
}

struct SessionRuns {
    turn: Arc<Semaphore>,
    state: Mutex<SessionState>,
}

impl SessionRuns {
    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A turn's place in its session's queue, taken when the turn is accepted, so turns start in that order.
enum Ticket {
    /// The session was free: the turn holds it.
    Now(Result<OwnedSemaphorePermit, AcquireError>),
    /// Queued behind the session's turn (already registered as a waiter, in order).
    Queued(Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>),
}

impl Ticket {
    fn take(turn: &Arc<Semaphore>) -> Ticket {
        let mut wait: Pin<
            Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>,
        > = Box::pin(turn.clone().acquire_owned());
        // The first poll puts the waiter in the semaphore's FIFO queue; the task polls it again later.
        match wait
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            std::task::Poll::Ready(permit) => Ticket::Now(permit),
            std::task::Poll::Pending => Ticket::Queued(wait),
        }
    }
}

/// A new turn's place in its session's queue ([`RunManager::reserve`]).
pub struct TurnTicket(Ticket);

impl TurnTicket {
    /// The session was free: this turn holds it and starts at once.
    pub fn starts_now(&self) -> bool {
        matches!(self.0, Ticket::Now(Ok(_)))
    }
}

/// Everything a new turn needs, decided when the message was accepted.
pub struct TurnRequest {
    pub run: Run,
    pub agent: AgentSettings,
    pub skill: Option<SkillMatch>,
    /// A run left unfinished by a dead process, going on (None: a new turn).
    pub resume: Option<ResumePlan>,
    /// Its `run_started` is already in the log, committed with its user message (the run is `running`).
    pub started: bool,
    /// Function tools the client runs itself (an OpenAI-compatible request's `tools`): a model call naming
    /// one ends the turn with the call. Not kept: a run resumed after a crash offers none.
    pub client_tools: Vec<crate::provider::ToolSpec>,
}

/// Where a run left unfinished goes on from, as its log shows (SPEC.md section 4, recovery).
#[derive(Clone, Debug, Default)]
pub struct ResumePlan {
    /// This resumption's number (1 for the first).
    pub attempt: u32,
    /// The first seq of the interrupted model call's deltas (superseded), or the log's next seq.
    pub discard_from_seq: u64,
    /// The skill the run matched at its start (its `skill_matched`).
    pub skill: Option<String>,
    /// The question the run was waiting on, unanswered: it keeps waiting under this request id.
    pub open_question: Option<String>,
    /// Approvals the run was waiting on, unanswered: `(request_id, call_id)`; they keep waiting.
    pub open_approvals: Vec<(String, String)>,
    pub resumed: Resumed,
}

impl ResumePlan {
    /// Reads where a run stopped from its events (in `seq` order; other runs' events are skipped).
    pub fn from_log(run_id: &str, events: &[Arc<LoggedEvent>]) -> ResumePlan {
        let mut plan = ResumePlan::default();
        // The last event after which the run's deltas belong to a model call that did not finish: its start,
        // a resumption, or a stored message (a model call that finished stored its assistant message).
        let mut anchor = 0u64;
        let mut deltas: Vec<(u64, &str)> = Vec::new();
        let mut last_calls: Vec<ToolCall> = Vec::new();
        let mut answered: std::collections::HashSet<&str> = Default::default();
        let mut finished: HashMap<String, ToolOutput> = HashMap::new();
        for ev in events.iter().filter(|e| e.event.run_id == run_id) {
            let seq = ev.seq();
            if ev.event.is_subagent {
                continue;
            }
            match &ev.event.kind {
                EventKind::RunStarted { .. } => anchor = seq,
                EventKind::RunResumed { .. } => {
                    anchor = seq;
                    plan.attempt += 1;
                }
                EventKind::SkillMatched { skill, .. } => plan.skill = Some(skill.clone()),
                EventKind::Message { message } => {
                    anchor = seq;
                    match message.role {
                        Role::Assistant => {
                            plan.resumed.steps += 1;
                            let calls = message.tool_calls.clone().unwrap_or_default();
                            if !calls.is_empty() {
                                plan.resumed.rounds += 1;
                            }
                            last_calls = calls;
                            answered.clear();
                            finished.clear();
                        }
                        Role::Tool => {
                            if let Some(id) = &message.tool_call_id {
                                answered.insert(id.as_str());
                            }
                        }
                        _ => {}
                    }
                }
                EventKind::ToolFinished {
                    call_id,
                    result,
                    success,
                    ..
                } => {
                    finished.insert(
                        call_id.clone(),
                        ToolOutput {
                            content: result.clone(),
                            success: *success,
                            // The log keeps a result's text; its images (if any) are in its stored message.
                            images: Vec::new(),
                        },
                    );
                }
                EventKind::TextDelta { delta } => deltas.push((seq, delta)),
                EventKind::InputRequested { request_id, .. } => {
                    plan.open_question = Some(request_id.clone())
                }
                EventKind::InputReceived { .. } => plan.open_question = None,
                EventKind::ApprovalRequested {
                    request_id,
                    call_id,
                    ..
                } => plan
                    .open_approvals
                    .push((request_id.clone(), call_id.clone())),
                EventKind::ApprovalResolved { request_id, .. } => {
                    plan.open_approvals.retain(|(r, _)| r != request_id)
                }
                _ => {}
            }
        }
        plan.attempt += 1;
        plan.discard_from_seq = anchor + 1;
        plan.resumed.content = deltas
            .iter()
            .filter(|(seq, _)| *seq < plan.discard_from_seq)
            .map(|(_, d)| *d)
            .collect();
        plan.resumed.pending_calls = last_calls
            .into_iter()
            .filter(|c| !answered.contains(c.id.as_str()))
            .collect();
        plan.resumed.logged_results = finished
            .into_iter()
            .filter(|(id, _)| plan.resumed.pending_calls.iter().any(|c| c.id == *id))
            .collect();
        plan.resumed.awaiting_approval = plan
            .open_approvals
            .iter()
            .map(|(_, call_id)| call_id.clone())
            .collect();
        plan
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("no pending question with request_id `{0}`")]
    UnknownRequest(String),
    #[error("`{0}` is a question (ask_human), not an approval: answer it with a reply")]
    NotAnApproval(String),
}

pub struct RunManager {
    env: LoopEnv,
    sessions: Mutex<HashMap<String, Arc<SessionRuns>>>,
    shutting_down: AtomicBool,
    tracker: TaskTracker,
    /// This process's name in `run_resumed` and `Run.node` (and, in a cluster, among the nodes):
    /// `cluster.node_id`, by default `hostname:port`.
    node_id: String,
    /// This process among the node's (new at every start).
    instance: String,
    /// Runs being adopted ([`RunManager::adopt`]) right now, so a start command and a sweep never both start one.
    adopting: Mutex<std::collections::HashSet<String>>,
    /// Runs queued under this node's name that it was not executing at the last sweep (see `take_over`).
    strays: Mutex<std::collections::HashSet<String>>,
}

/// `hostname:port` of the listen address (the port alone when the address has none).
pub fn default_node_id(listen: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let port = listen.rsplit(':').next().unwrap_or(listen);
    format!("{host}:{port}")
}

impl RunManager {
    pub fn new(env: LoopEnv) -> Arc<RunManager> {
        let node_id = env
            .config
            .cluster
            .node_id
            .clone()
            .unwrap_or_else(|| default_node_id(&env.config.server.listen));
        Arc::new(RunManager {
            node_id,
            instance: crate::domain::new_id(),
            env,
            sessions: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            adopting: Mutex::default(),
            strays: Mutex::default(),
        })
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.env.log.store()
    }

    fn session(&self, session_id: &str) -> Arc<SessionRuns> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(session_id.to_string())
            .or_insert_with(|| {
                Arc::new(SessionRuns {
                    turn: Arc::new(Semaphore::new(1)),
                    state: Mutex::default(),
                })
            })
            .clone()
    }

    fn existing(&self, session_id: &str) -> Option<Arc<SessionRuns>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session_id)
            .cloned()
    }

    /// The run holding the session's turn, if any.
    pub fn active_run_id(&self, session_id: &str) -> Option<String> {
        self.existing(session_id)
            .and_then(|s| s.state().active.clone())
    }

    /// Whether any run is active or queued in the session.
    pub fn is_busy(&self, session_id: &str) -> bool {
        self.existing(session_id)
            .is_some_and(|s| !s.state().runs.is_empty())
    }

    /// The `done` watch of a queued or active run (None once it has ended).
    pub fn watch(&self, session_id: &str, run_id: &str) -> Option<watch::Receiver<RunResult>> {
        let s = self.existing(session_id)?;
        let state = s.state();
        state
            .runs
            .iter()
            .find(|(id, _)| id == run_id)
            .map(|(_, h)| h.done.clone())
    }

    /// Starts (or queues) a turn whose run row and user message are already stored.
    pub fn start(
        self: &Arc<Self>,
        req: TurnRequest,
        session_agent: String,
    ) -> watch::Receiver<RunResult> {
        let ticket = self.reserve(&req.run.session_id);
        self.start_reserved(req, session_agent, ticket)
    }

    /// Takes a new turn's place in its session's queue now: turns start in the order they were reserved. A
    /// ticket that [`TurnTicket::starts_now`] holds the session's turn: its `run_started` may go into the
    /// user message's commit (`TurnRequest::started`), and the session shows the run active meanwhile.
    pub fn reserve(&self, session_id: &str) -> TurnTicket {
        TurnTicket(Ticket::take(&self.session(session_id).turn))
    }

    /// Shows `run_id` as the session's active run before its turn task starts (its `run_started` is being
    /// committed with its message); undone by [`RunManager::unmark_active`] if that commit fails.
    pub fn mark_active(&self, session_id: &str, run_id: &str) {
        self.session(session_id).state().active = Some(run_id.to_string());
    }

    pub fn unmark_active(&self, session_id: &str, run_id: &str) {
        self.session(session_id).state().release_active(run_id);
    }

    /// [`RunManager::start`] with a place taken earlier.
    pub fn start_reserved(
        self: &Arc<Self>,
        req: TurnRequest,
        session_agent: String,
        ticket: TurnTicket,
    ) -> watch::Receiver<RunResult> {
        let sr = self.session(&req.run.session_id);
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(None);
        sr.state().runs.push((
            req.run.id.clone(),
            RunHandle {
                cancel: cancel.clone(),
                done: done_rx.clone(),
            },
        ));
        let me = self.clone();
        let accepted = std::time::Instant::now();
        let ticket = ticket.0;
        self.tracker.spawn(async move {
            me.run_task(sr, req, session_agent, cancel, ticket, done_tx, accepted)
                .await;
        });
        done_rx
    }

    /// Cancels every queued or active run of the session (for `multitask = interrupt`).
    pub fn cancel_all(&self, session_id: &str) {
        if let Some(s) = self.existing(session_id) {
            for (_, h) in &s.state().runs {
                h.cancel.cancel();
            }
        }
    }

    /// Cancels a run (the active one when `run_id` is None) and waits until it has stopped. Returns the run's
    /// id if there was one to cancel.
    pub async fn cancel(&self, session_id: &str, run_id: Option<&str>) -> Option<String> {
        let s = self.existing(session_id)?;
        let (id, cancel, mut done) = {
            let state = s.state();
            let id = match run_id {
                Some(id) => id.to_string(),
                None => state
                    .active
                    .clone()
                    .or_else(|| state.runs.first().map(|(id, _)| id.clone()))?,
            };
            let (_, h) = state.runs.iter().find(|(rid, _)| *rid == id)?;
            (id, h.cancel.clone(), h.done.clone())
        };
        cancel.cancel();
        let _ = done.wait_for(|r| r.is_some()).await;
        Some(id)
    }

    /// Answers a pending `ask_human` (or an approval, the text read as yes/no), exactly once.
    pub fn reply(
        &self,
        session_id: &str,
        request_id: &str,
        content: String,
    ) -> Result<String, ReplyError> {
        self.answer(session_id, request_id, Answer::Text(content))
    }

    /// Answers a pending request, exactly once: a question takes only text; an approval takes a decision, or
    /// text read as yes/no ([`Decision::from_reply`]).
    pub fn answer(
        &self,
        session_id: &str,
        request_id: &str,
        answer: Answer,
    ) -> Result<String, ReplyError> {
        let unknown = || ReplyError::UnknownRequest(request_id.to_string());
        let sr = self.existing(session_id).ok_or_else(unknown)?;
        let pending = {
            let mut state = sr.state();
            let kind = state.pending_inputs.get(request_id).map(|p| p.kind);
            match (kind, &answer) {
                (None, _) => return Err(unknown()),
                (Some(PendingKind::Question), Answer::Decision(_)) => {
                    return Err(ReplyError::NotAnApproval(request_id.to_string()))
                }
                _ => state
                    .pending_inputs
                    .remove(request_id)
                    .ok_or_else(unknown)?,
            }
        };
        let run_id = pending.run_id.clone();
        pending.reply.send(answer).map_err(|_| unknown())?;
        Ok(run_id)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_task(
        self: Arc<Self>,
        sr: Arc<SessionRuns>,
        req: TurnRequest,
        session_agent: String,
        cancel: CancellationToken,
        ticket: Ticket,
        done_tx: watch::Sender<RunResult>,
        accepted: std::time::Instant,
    ) {
        let TurnRequest {
            mut run,
            agent,
            skill,
            resume,
            started,
            client_tools,
        } = req;
        let run_id = run.id.clone();
        let session_id = run.session_id.clone();
        let permit = match ticket {
            Ticket::Now(p) => p.ok(),
            Ticket::Queued(wait) => tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                p = wait => p.ok(),
            },
        };
        let mut result: Option<Message> = None;
        // The answer the loop left for the run's end to carry (one commit for both).
        let mut unsent: Option<Message> = None;
        let mut content = String::new();
        let mut context_tokens = 0;
        // How many runs the session had when this one started (this one included), once its history is read.
        let mut session_runs: Option<usize> = None;
        if permit.is_some() && !cancel.is_cancelled() {
            self.env
                .metrics
                .run_queue_wait
                .observe(accepted.elapsed().as_secs_f64());
            sr.state().active = Some(run_id.clone());
            run.status = RunStatus::Running;
            // A resumed run keeps the time it first started, a started one the time in its `run_started`.
            if (resume.is_none() && !started) || run.started_at.is_none() {
                run.started_at = Some(now_rfc3339());
            }
            let outcome = self
                .execute(
                    &mut run,
                    &agent,
                    (skill, resume, started, client_tools),
                    &session_agent,
                    &cancel,
                    &mut session_runs,
                )
                .await;
            match outcome {
                Ok(o) => {
                    run.status = o.status;
                    run.error = o.error;
                    run.usage = o.usage;
                    content = o.content;
                    context_tokens = o.context_tokens;
                    result = o.final_message;
                    unsent = o.unsent_answer;
                }
                Err(e) => {
                    run.status = RunStatus::Failed;
                    run.error = Some(RunError {
                        code: RunErrorCode::Internal,
                        message: e,
                    });
                }
            }
        } else {
            run.status = RunStatus::Cancelled;
        }
        if run.status == RunStatus::Cancelled && self.env.handing_over.load(Ordering::SeqCst) {
            // The process stops with this run unfinished and the next one resumes it: no `run_finished`, the
            // run stays `running` in the store (its step in progress recorded nothing, see `LoopEnv`).
            tracing::info!(run_id = %run_id, "run left for the next process to resume");
            {
                let mut state = sr.state();
                state.release_active(&run_id);
                state.forget(&run_id);
            }
            drop(permit);
            let _ = done_tx.send(Some((run, None)));
            return;
        }
        if run.status == RunStatus::Cancelled && self.shutting_down.load(Ordering::SeqCst) {
            run.status = RunStatus::Interrupted;
            run.error = Some(RunError {
                code: RunErrorCode::Interrupted,
                message: "the server shut down during the run".into(),
            });
        }
        run.ended_at = Some(now_rfc3339());
        run.node = None;
        self.env.metrics.run_finished(run.status);
        let finished = NewEvent {
            session_id: session_id.clone(),
            run_id: run_id.clone(),
            agent: session_agent.clone(),
            is_subagent: false,
            kind: EventKind::RunFinished {
                run: run.clone(),
                content,
                context_tokens,
                max_context_tokens: agent.max_context_tokens,
            },
        };
        // No longer the session's active run once its end can be in the log: a client attaching from here on
        // must not be told the run is active while its `run_finished` is already below the `last_seq` it gets
        // (it receives the end live if it attached just before the commit). The queued runs and the turn's
        // permit stay until after the commit, so the next turn still starts after this one's end.
        sr.state().release_active(&run_id);
        let finished = LogEntry {
            event: finished,
            run: Some(run.clone()),
        };
        let recorded = match unsent {
            Some(message) => {
                let answer = LogEntry {
                    event: NewEvent {
                        session_id: session_id.clone(),
                        run_id: run_id.clone(),
                        agent: session_agent.clone(),
                        is_subagent: false,
                        kind: EventKind::Message { message },
                    },
                    run: None,
                };
                self.env.log.append_durable_pair(answer, finished).await
            }
            None => {
                self.env
                    .log
                    .append_durable(finished.event, finished.run)
                    .await
            }
        };
        if let Err(e) = recorded {
            tracing::error!(run_id = %run_id, error = %e, "could not record the end of a run");
        }
        // Pruning is a statement per run; a session with no more runs than the log keeps has nothing to prune.
        // (A run queued while this one ran is counted at its own end: the log keeps at least `retention` runs.)
        let retention = self.env.config.server.event_retention_runs;
        if session_runs.is_none_or(|n| n > retention) {
            if let Err(e) = self.store().prune_events(&session_id, retention).await {
                tracing::warn!(session_id = %session_id, error = %e, "event retention pruning failed");
            }
        }
        sr.state().forget(&run_id);
        drop(permit);
        let _ = done_tx.send(Some((run, result)));
    }

    async fn execute(
        self: &Arc<Self>,
        run: &mut Run,
        agent: &AgentSettings,
        (skill, resume, started, client_tools): (
            Option<SkillMatch>,
            Option<ResumePlan>,
            bool,
            Vec<crate::provider::ToolSpec>,
        ),
        session_agent: &str,
        cancel: &CancellationToken,
        session_runs: &mut Option<usize>,
    ) -> Result<crate::agent_loop::TurnOutcome, String> {
        let log = &self.env.log;
        let envelope = |kind: EventKind| NewEvent {
            session_id: run.session_id.clone(),
            run_id: run.id.clone(),
            agent: session_agent.to_string(),
            is_subagent: false,
            kind,
        };
        let start = match &resume {
            None if started => None,
            None => Some(EventKind::RunStarted { run: run.clone() }),
            Some(plan) => Some(EventKind::RunResumed {
                run: run.clone(),
                node: self.node_id.clone(),
                attempt: plan.attempt,
                discard_from_seq: plan.discard_from_seq,
            }),
        };
        // A resumed run's open question takes replies from before `run_resumed` is published: a client that
        // sees the resume may answer at once, before the turn has come back round to `ask_human`.
        let open_question =
            resume
                .as_ref()
                .and_then(|p| p.open_question.clone())
                .map(|request_id| {
                    let rx = self.register(run, &request_id, PendingKind::Question);
                    (request_id, rx)
                });
        // So do its open approvals, each under its request id, keyed by the call waiting on it.
        let open_approvals: HashMap<String, (String, oneshot::Receiver<Answer>)> = resume
            .as_ref()
            .map(|p| p.open_approvals.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(request_id, call_id)| {
                let rx = self.register(run, &request_id, PendingKind::Approval);
                (call_id, (request_id, rx))
            })
            .collect();
        if let Some(start) = start {
            log.append_durable(envelope(start), Some(run.clone()))
                .await
                .map_err(|e| e.to_string())?;
        }
        // A resumed run has its skill from its start (already in its log as `skill_matched`).
        let skill = match &resume {
            None => skill,
            Some(plan) => plan.skill.as_deref().and_then(|name| {
                self.env.config.skill(name).map(|s| SkillMatch {
                    skill: s.clone(),
                    method: "resumed",
                    confidence: 1.0,
                })
            }),
        };
        let (mut system_prompt, mut tools, mut provider, mut model) = (
            agent.system_prompt.clone(),
            agent.tools.clone(),
            agent.provider.clone(),
            agent.model.clone(),
        );
        let mut subagents = agent.subagents.clone();
        if let Some(m) = &skill {
            if resume.is_none() {
                log.append(
                    envelope(EventKind::SkillMatched {
                        skill: m.skill.name.clone(),
                        method: m.method.to_string(),
                        confidence: m.confidence,
                    }),
                    None,
                )
                .await
                .map_err(|e| e.to_string())?;
            }
            if !m.skill.system_prompt.is_empty() {
                system_prompt = m.skill.system_prompt.clone();
            }
            if let Some(t) = &m.skill.tools {
                tools = t.clone();
                subagents.retain(|s| t.contains(s));
            }
            if let Some(p) = &m.skill.provider {
                provider = p.clone();
            }
            if let Some(md) = &m.skill.model {
                model = md.clone();
            }
        }
        let (history, runs) = self
            .history(
                &run.session_id,
                &run.id,
                agent.max_context_tokens,
                resume.is_none(),
            )
            .await
            .map_err(|e| e.to_string())?;
        *session_runs = Some(runs);
        // The session's uploads may have been made on another node, or the workspace wiped: file tools find them
        // (a turn whose agents have no file tool reads none, so it does not look for them).
        let workspace = self.workspace(&run.session_id);
        if reads_files(&self.env.config, &tools, &subagents) {
            if let Err(e) =
                crate::uploads::materialise_all(self.store().as_ref(), &run.session_id, &workspace)
                    .await
            {
                tracing::warn!(session = %run.session_id, error = %e, "could not put the session's uploads into its workspace");
            }
        }
        let human = Arc::new(RunHuman {
            manager: self.clone(),
            log: log.clone(),
            session_id: run.session_id.clone(),
            run: Mutex::new(run.clone()),
            agent: session_agent.to_string(),
            timeout: Duration::from_secs(self.env.config.server.ask_human_timeout_s),
            cancel: cancel.clone(),
            open_question: Mutex::new(open_question),
            open_approvals: Mutex::new(open_approvals),
        });
        let spec = TurnSpec {
            session_id: run.session_id.clone(),
            run_id: run.id.clone(),
            agent: agent.clone(),
            system_prompt,
            tools,
            subagents,
            provider,
            model,
            is_subagent: false,
            depth: 0,
            history,
            workspace,
            human: human.clone(),
            cancel: cancel.clone(),
            resumed: resume.map(|plan| plan.resumed),
            client_tools,
        };
        Ok(run_turn(&self.env, spec).await)
    }

    /// Registers a pending request of `run`: its answer arrives on the receiver.
    fn register(
        &self,
        run: &Run,
        request_id: &str,
        kind: PendingKind,
    ) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.session(&run.session_id).state().pending_inputs.insert(
            request_id.to_string(),
            PendingInput {
                run_id: run.id.clone(),
                kind,
                reply: tx,
            },
        );
        rx
    }

    /// The session's workspace folder (uploads, file tools).
    pub fn workspace(&self, session_id: &str) -> PathBuf {
        PathBuf::from(&self.env.config.server.workspace_dir).join(session_id)
    }

    /// The conversation for a run's model calls: messages in run order, up to and including this run's own,
    /// cut to what the agent's context window can use ([`window_start`]), so a turn holds at most about one
    /// window of history however long the session has grown. Also returns how many runs the session has
    /// (counted to one more than the event log keeps).
    async fn history(
        &self,
        session_id: &str,
        run_id: &str,
        max_context_tokens: u64,
        close_tail: bool,
    ) -> Result<(Vec<ModelMessage>, usize), StoreError> {
        let store = self.store();
        // Runs are counted only as far as retention pruning needs to know (more than it keeps, or not).
        let count_runs_to = self
            .env
            .config
            .server
            .event_retention_runs
            .saturating_add(1);
        // Newest messages first, more of them until the window is filled (or there are no more) and the run's
        // own user message is among them (a message sent while the previous turn ran is stored before that
        // turn's answers), so a long session's whole history is never read for a turn.
        let mut limit = HISTORY_PAGE;
        loop {
            let page = store
                .history_page(session_id, run_id, limit, count_runs_to)
                .await?;
            let complete = page.messages.len() < limit;
            // A message of no run (or of a run not stored) counts as the session's first run's.
            let place = |p: Option<i64>| p.unwrap_or(i64::MIN);
            let mut messages: Vec<(Message, Option<i64>)> = page
                .messages
                .into_iter()
                .filter(|(_, p)| page.own.is_none_or(|own| place(*p) <= own))
                .collect();
            messages.sort_by_key(|(_, p)| place(*p)); // stable: insertion order within a run
            let messages: Vec<Message> = messages.into_iter().map(|(m, _)| m).collect();
            let start = window_start(&messages, max_context_tokens);
            let own = messages
                .iter()
                .any(|m| m.role != Role::Assistant && m.run_id.as_deref() == Some(run_id));
            if complete || (start > 0 && own) {
                let prompt = prompt_messages(&messages[start..], close_tail);
                return Ok((prompt, page.runs));
            }
            limit = limit.saturating_mul(4);
        }
    }

    /// This process's node id (in `run_resumed` and `Run.node`).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This process among the node's (in the registry).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Runs queued or running here.
    pub fn unfinished_count(&self) -> usize {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.values().map(|s| s.state().runs.len()).sum()
    }

    /// Starts a queued run another node accepted for a session whose turn this node holds (SPEC.md section 6:
    /// one turn per session across the cluster): its row and user message are stored, naming this node. A run
    /// that is no longer queued here (already started, ended, or taken over) is left alone.
    pub async fn adopt(self: &Arc<Self>, session_id: &str, run_id: &str) -> Result<(), StoreError> {
        if self.watch(session_id, run_id).is_some()
            || !self
                .adopting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(run_id.to_string())
        {
            return Ok(());
        }
        let adopted = self.adopt_inner(session_id, run_id).await;
        self.adopting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_id);
        adopted
    }

    async fn adopt_inner(
        self: &Arc<Self>,
        session_id: &str,
        run_id: &str,
    ) -> Result<(), StoreError> {
        if self.watch(session_id, run_id).is_some() {
            return Ok(());
        }
        let Some(run) = self.store().get_run(session_id, run_id).await? else {
            return Ok(());
        };
        if run.status != RunStatus::Queued || run.node.as_deref() != Some(self.node_id.as_str()) {
            return Ok(());
        }
        let Some(session) = self.store().get_session(session_id).await? else {
            return Ok(());
        };
        let Some(agent) = self.env.config.agent(&session.agent).cloned() else {
            self.end_leftover(
                run,
                &session.agent,
                "the run's agent is not configured on the node holding the session's turn".into(),
            )
            .await?;
            return Ok(());
        };
        let skill = self.skill_of_queued(&run, &agent).await;
        self.start(
            TurnRequest {
                run,
                agent,
                skill,
                resume: None,
                started: false,
                client_tools: Vec::new(),
            },
            session.agent,
        );
        Ok(())
    }

    /// Takes over the runs a previous process left unfinished (SPEC.md section 4, recovery). With
    /// `server.recovery = "resume"` a started run goes on from its last durable step (`run_resumed`), unless it
    /// was resumed `server.max_resumes` times already, and a queued run is queued again, in order; with
    /// `"interrupt"`, or when the run's session or agent is gone, it ends `interrupted`. Returns how many runs
    /// were resumed (or queued again) and how many were ended.
    pub async fn recover_leftovers(self: &Arc<Self>) -> Result<(usize, usize), StoreError> {
        self.take_over(true).await
    }

    /// Takes over the unfinished runs of nodes that are gone (no renewal for [`ClusterSettings::lapse`]), as at
    /// start-up; run every sixth of the lease by each node of a cluster, so a lost node's runs go on elsewhere
    /// within `lease_s`. Each run is claimed first (`Store::claim_run`): of several nodes sweeping at once, one
    /// takes it.
    ///
    /// [`ClusterSettings::lapse`]: crate::config::ClusterSettings::lapse
    pub async fn sweep_lost_nodes(self: &Arc<Self>) -> Result<(usize, usize), StoreError> {
        self.take_over(false).await
    }

    /// `startup`: this process just started, so a run under its own node id is a previous process's.
    async fn take_over(self: &Arc<Self>, startup: bool) -> Result<(usize, usize), StoreError> {
        // Nodes whose lease lapsed are fenced before anything of theirs is read: what they still had in flight
        // is committed before this (their appends hold the registry row) or refused after it.
        let lapse = self.env.config.cluster.lapse();
        self.store().expel_lapsed(lapse).await?;
        let runs = self.store().unfinished_runs(None).await?;
        // Other nodes that are alive keep their runs (this node's id names this process now: a run under it
        // is a previous process's).
        let live: Vec<String> = self
            .store()
            .live_nodes(lapse)
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|(n, _)| n.node_id)
            .filter(|id| *id != self.node_id)
            .collect();
        // Commits announce themselves while other nodes may have subscribers.
        self.store().set_peers(!live.is_empty());
        let strays = std::mem::take(&mut *self.strays.lock().unwrap_or_else(|p| p.into_inner()));
        let mut seen_strays = std::collections::HashSet::new();
        // The runs to take over, by session, each session's in the order they were accepted.
        let mut lost: Vec<Vec<Run>> = Vec::new();
        let mut session_index: HashMap<String, usize> = HashMap::new();
        for run in runs {
            if run.node.as_ref().is_some_and(|n| live.contains(n)) {
                continue;
            }
            if !startup
                && (run.node.is_none() || run.node.as_deref() == Some(self.node_id.as_str()))
            {
                // Ours, or being accepted by a node that has not named itself on it yet. A run another node
                // queued here whose start command never arrived (still unknown here a sweep later, so not one
                // this node is accepting right now) is started now.
                if run.status == RunStatus::Queued
                    && run.node.is_some()
                    && self.watch(&run.session_id, &run.id).is_none()
                {
                    if strays.contains(&run.id) {
                        self.adopt(&run.session_id, &run.id).await?;
                    } else {
                        seen_strays.insert(run.id.clone());
                    }
                }
                continue;
            }
            let i = *session_index
                .entry(run.session_id.clone())
                .or_insert_with(|| {
                    lost.push(Vec::new());
                    lost.len() - 1
                });
            lost[i].push(run);
        }
        *self.strays.lock().unwrap_or_else(|p| p.into_inner()) = seen_strays;
        // Sessions are taken over side by side (each a claim, a read of its runs' log and a start), so the
        // last of a lost node's sessions does not wait for all the others; a session's own runs go one after
        // another, so they keep their order in its queue.
        let outcomes: Vec<_> = futures_util::stream::iter(lost)
            .map(|runs| self.take_over_session(runs, startup))
            .buffer_unordered(TAKE_OVER_AT_ONCE)
            .collect()
            .await;
        let (mut resumed, mut ended) = (0, 0);
        let mut failed = None;
        for outcome in outcomes {
            match outcome {
                Ok((r, e)) => {
                    resumed += r;
                    ended += e;
                }
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((resumed, ended)),
        }
    }

    /// Takes over one session's runs of a lost node (or of the previous process), in order; see
    /// [`RunManager::take_over`].
    async fn take_over_session(
        self: &Arc<Self>,
        runs: Vec<Run>,
        startup: bool,
    ) -> Result<(usize, usize), StoreError> {
        let (mut resumed, mut ended) = (0, 0);
        for run in runs {
            match self.take_over_run(run, startup).await? {
                TakenOver::Resumed => resumed += 1,
                TakenOver::Ended => ended += 1,
                TakenOver::NotHere => {}
            }
        }
        Ok((resumed, ended))
    }

    async fn take_over_run(
        self: &Arc<Self>,
        mut run: Run,
        startup: bool,
    ) -> Result<TakenOver, StoreError> {
        let lapse = self.env.config.cluster.lapse();
        let server = &self.env.config.server;
        if !self
            .store()
            .claim_run(
                &run.session_id,
                &run.id,
                run.node.as_deref(),
                &self.node_id,
                lapse,
            )
            .await?
        {
            return Ok(TakenOver::NotHere); // another node took it first
        }
        if !startup {
            tracing::info!(run_id = %run.id, from = ?run.node, "taking over a run of a lost node");
        }
        run.node = Some(self.node_id.clone());
        let session = self.store().get_session(&run.session_id).await?;
        let agent = session
            .as_ref()
            .and_then(|s| self.env.config.agent(&s.agent).cloned());
        let session_agent = session.map(|s| s.agent).unwrap_or_default();
        let reason = match (&agent, server.recovery) {
            (None, _) => Some("the run's agent is no longer configured".to_string()),
            (Some(_), Recovery::Interrupt) => {
                Some("the server stopped before the run finished".to_string())
            }
            (Some(_), Recovery::Resume) => None,
        };
        let (Some(agent), None) = (agent, reason.clone()) else {
            let reason = reason.unwrap_or_default();
            self.end_leftover(run, &session_agent, reason).await?;
            return Ok(TakenOver::Ended);
        };
        let events = self.run_events(&run).await?;
        let has_message = events.iter().any(|e| {
            matches!(&e.event.kind, EventKind::Message { message } if message.role == Role::User)
        });
        if !has_message {
            // Its send never stored the user message (the process died in between): nothing to run.
            let reason = "the server stopped before the run's message was stored".to_string();
            self.end_leftover(run, &session_agent, reason).await?;
            return Ok(TakenOver::Ended);
        }
        let resume = if run.status == RunStatus::Queued {
            None
        } else {
            let plan = ResumePlan::from_log(&run.id, &events);
            if plan.attempt > server.max_resumes {
                let reason = format!(
                    "the run was resumed {} times without finishing (server.max_resumes)",
                    server.max_resumes
                );
                self.end_leftover(run, &session_agent, reason).await?;
                return Ok(TakenOver::Ended);
            }
            Some(plan)
        };
        let skill = match &resume {
            // A queued run has not matched its skill yet: its stored message is routed again.
            None => self.skill_of_queued(&run, &agent).await,
            Some(_) => None,
        };
        run.status = RunStatus::Queued;
        self.start(
            TurnRequest {
                run,
                agent,
                skill,
                resume,
                started: false,
                client_tools: Vec::new(),
            },
            session_agent,
        );
        self.env.metrics.runs_recovered.inc();
        Ok(TakenOver::Resumed)
    }

    /// Ends a run left unfinished: status `interrupted` and its one `run_finished`.
    async fn end_leftover(
        &self,
        mut run: Run,
        session_agent: &str,
        reason: String,
    ) -> Result<(), StoreError> {
        let max_context_tokens = self
            .env
            .config
            .agent(session_agent)
            .map(|a| a.max_context_tokens)
            .unwrap_or(0);
        run.status = RunStatus::Interrupted;
        run.ended_at = Some(now_rfc3339());
        run.node = None;
        run.error = Some(RunError {
            code: RunErrorCode::Interrupted,
            message: reason,
        });
        let ev = lone_run_finished(&run, session_agent.to_string(), max_context_tokens);
        self.env
            .log
            .append_durable(ev, Some(run))
            .await
            .map_err(|e| StoreError::Other(e.to_string()))?;
        self.env.metrics.runs_recovered.inc();
        Ok(())
    }

    /// Every event of `run` in its session's log, from its first.
    async fn run_events(&self, run: &Run) -> Result<Vec<Arc<LoggedEvent>>, StoreError> {
        let store = self.store();
        let mut after = store
            .first_seq_of_run(&run.session_id, &run.id)
            .await?
            .unwrap_or(1)
            .saturating_sub(1);
        let mut out = Vec::new();
        loop {
            let page = store.read_events(&run.session_id, after, 512).await?;
            let Some(last) = page.last() else { break };
            after = last.seq();
            out.extend(page.into_iter().filter(|e| e.event.run_id == run.id));
        }
        Ok(out)
    }

    /// The skill a queued run's stored user message routes to.
    async fn skill_of_queued(&self, run: &Run, agent: &AgentSettings) -> Option<SkillMatch> {
        let messages = self
            .store()
            .history_page(&run.session_id, &run.id, 64, 0)
            .await
            .ok()?
            .messages;
        let message = messages
            .iter()
            .map(|(m, _)| m)
            .find(|m| m.role == Role::User && m.run_id.as_deref() == Some(run.id.as_str()))?;
        crate::skills::route(&self.env.config, agent, &message.content)
            .ok()
            .and_then(|r| r.skill)
    }

    /// Graceful shutdown: lets running turns finish for up to `grace`, then interrupts the rest and waits for
    /// them to record their end.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            self.leave().await;
            return;
        }
        let sessions: Vec<Arc<SessionRuns>> = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        // Past the grace: with recovery = resume the turns are handed to the next process (they stop without
        // recording their cut step or an end); otherwise they end `interrupted`.
        if self.env.config.server.recovery == Recovery::Resume {
            self.env.handing_over.store(true, Ordering::SeqCst);
        }
        for s in sessions {
            for (_, h) in &s.state().runs {
                h.cancel.cancel();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        self.leave().await;
    }

    /// Gone from the registry: in a cluster the runs handed over go on elsewhere at once.
    async fn leave(&self) {
        if let Err(e) = self.store().leave(&self.node_id, &self.instance).await {
            tracing::warn!(error = %e, "could not leave the node registry");
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// Messages a turn's history is first read in; four times as many each time more are needed.
const HISTORY_PAGE: usize = 64;

/// Sessions of lost nodes taken over side by side by one sweep (each holds a store connection meanwhile).
const TAKE_OVER_AT_ONCE: usize = 8;

/// What became of one run a sweep found unfinished under a lost node.
enum TakenOver {
    /// Resumed from its last durable step, or queued again.
    Resumed,
    /// Ended `interrupted` (its agent or message is gone, or it was resumed too often).
    Ended,
    /// Another node claimed it first.
    NotHere,
}

/// Where the part of a conversation a turn can use starts. The prompt is compressed when it exceeds the
/// window (`compress_at * max_context_tokens`), and the summary then sees at most half a window of the
/// transcript before the latest user message (`Turn::maybe_compress`), so messages further back than a window
/// and a half can never reach the model: a turn need not hold them. The cut is at a user message, so a tool
/// call is never parted from its result; when the latest turn alone is longer than that, it starts at the
/// latest user message. Tokens are estimated as `estimate_tokens` does.
pub fn window_start(messages: &[Message], max_context_tokens: u64) -> usize {
    let keep = max_context_tokens.saturating_add((max_context_tokens / 2).max(64));
    let mut tokens = 0u64;
    let mut fits = 0; // the first index of the longest suffix within `keep`
    for (i, m) in messages.iter().enumerate().rev() {
        tokens += 4 + (m.content.len() as u64).div_ceil(4);
        if tokens > keep {
            fits = i + 1;
            break;
        }
    }
    if fits == 0 {
        return 0;
    }
    let is_user = |m: &Message| m.role == Role::User;
    match messages[fits..].iter().position(is_user) {
        Some(k) => fits + k,
        None => messages[..fits].iter().rposition(is_user).unwrap_or(0),
    }
}

/// The built-in tools that read a session's workspace.
const FILE_TOOLS: [&str; 2] = ["read_file", "list_files"];

/// Whether a turn with `tools` and `subagents` (and theirs, at any depth) can read the session's workspace.
fn reads_files(config: &crate::config::Config, tools: &[String], subagents: &[String]) -> bool {
    let mut seen: Vec<&str> = Vec::new();
    let mut todo: Vec<&str> = subagents.iter().map(String::as_str).collect();
    if tools.iter().any(|t| FILE_TOOLS.contains(&t.as_str())) {
        return true;
    }
    while let Some(name) = todo.pop() {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let Some(agent) = config.agent(name) else {
            continue;
        };
        if agent.tools.iter().any(|t| FILE_TOOLS.contains(&t.as_str())) {
            return true;
        }
        todo.extend(agent.subagents.iter().map(String::as_str));
    }
    false
}

/// Stored messages -> prompt messages. An assistant tool call whose result never got stored (a crash mid-tool)
/// gets a placeholder result, so the prompt always pairs every call with a result.
pub fn to_model_messages(messages: &[Message]) -> Vec<ModelMessage> {
    prompt_messages(messages, true)
}

/// [`to_model_messages`]; with `close_tail` false the last assistant message's unanswered calls stay open (a
/// resumed run settles them itself).
fn prompt_messages(messages: &[Message], close_tail: bool) -> Vec<ModelMessage> {
    let mut out: Vec<ModelMessage> = Vec::with_capacity(messages.len());
    let mut open_calls: Vec<String> = Vec::new();
    let close = |out: &mut Vec<ModelMessage>, open: &mut Vec<String>| {
        for id in open.drain(..) {
            out.push(ModelMessage::Tool {
                tool_call_id: id,
                content: "(no result: the run ended before the tool finished)".into(),
                images: Vec::new(),
            });
        }
    };
    for m in messages {
        match m.role {
            Role::Tool => {
                let Some(id) = &m.tool_call_id else { continue };
                if let Some(i) = open_calls.iter().position(|c| c == id) {
                    open_calls.remove(i);
                    out.push(ModelMessage::Tool {
                        tool_call_id: id.clone(),
                        content: m.content.clone(),
                        images: m.images.clone(),
                    });
                }
            }
            Role::Assistant => {
                close(&mut out, &mut open_calls);
                let calls = m.tool_calls.clone().unwrap_or_default();
                open_calls.extend(calls.iter().map(|c| c.id.clone()));
                out.push(ModelMessage::Assistant {
                    content: m.content.clone(),
                    tool_calls: calls,
                });
            }
            Role::User => {
                close(&mut out, &mut open_calls);
                out.push(ModelMessage::User {
                    content: m.content.clone(),
                    images: m.images.clone(),
                });
            }
            Role::System => {
                close(&mut out, &mut open_calls);
                out.push(ModelMessage::System {
                    content: m.content.clone(),
                });
            }
        }
    }
    if close_tail {
        close(&mut out, &mut open_calls);
    }
    out
}

/// `ask_human` for one run: registers the question, records `waiting_input`, waits for a reply.
struct RunHuman {
    manager: Arc<RunManager>,
    log: Arc<crate::event_log::EventLog>,
    session_id: String,
    run: Mutex<Run>,
    agent: String,
    timeout: Duration,
    cancel: CancellationToken,
    /// A resumed run's unanswered question, registered before the resume was published: its next `ask` waits
    /// on this receiver under this request id (already in the log).
    open_question: Mutex<Option<(String, oneshot::Receiver<Answer>)>>,
    /// A resumed run's unanswered approvals by call id, registered like `open_question`.
    open_approvals: Mutex<HashMap<String, (String, oneshot::Receiver<Answer>)>>,
}

impl RunHuman {
    fn run_with(&self, status: RunStatus) -> Run {
        let mut run = self.run.lock().unwrap_or_else(|p| p.into_inner());
        run.status = status;
        run.clone()
    }
    fn event(&self, run_id: &str, kind: EventKind) -> NewEvent {
        NewEvent {
            session_id: self.session_id.clone(),
            run_id: run_id.to_string(),
            agent: self.agent.clone(),
            is_subagent: false,
            kind,
        }
    }
}

impl RunHuman {
    /// Waits for the answer to a pending request (`what`: `reply` or `decision`): Err on cancel, withdrawal or
    /// timeout (the reason).
    async fn wait(&self, rx: oneshot::Receiver<Answer>, what: &str) -> Result<Answer, String> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(format!("cancelled while waiting for a {what}")),
            r = rx => r.map_err(|_| "the request was withdrawn".to_string()),
            _ = tokio::time::sleep(self.timeout) => Err(format!("no {what} within {} s", self.timeout.as_secs())),
        }
    }
}

/// A person's answer being waited for (a question or an approval), once recorded.
struct Paused {
    request_id: String,
    rx: oneshot::Receiver<Answer>,
    sr: Arc<SessionRuns>,
    /// Counts it pending (`agentd_pending_inputs`) until dropped.
    _pending: GaugeGuard,
}

impl RunHuman {
    /// Opens a pause of the run: a resumed run's open request (`reused`, logged already: only the run row
    /// becomes `waiting_input`) keeps its request id; otherwise a new one is registered and its `request`
    /// event logged with the run `waiting_input`. An error (the request could not be logged) has unregistered it.
    async fn pause(
        &self,
        reused: Option<(String, oneshot::Receiver<Answer>)>,
        kind: PendingKind,
        gauge: IntGauge,
        request: impl FnOnce(String) -> EventKind,
    ) -> Result<Paused, String> {
        let asked_before = reused.is_some();
        let run = self.run_with(RunStatus::WaitingInput);
        let sr = self.manager.session(&self.session_id);
        let pending = GaugeGuard::new(gauge);
        let (request_id, rx) = match reused {
            Some(open) => open,
            None => {
                let request_id = crate::domain::new_id();
                let rx = self.manager.register(&run, &request_id, kind);
                (request_id, rx)
            }
        };
        let asked = self.event(&run.id, request(request_id.clone()));
        if asked_before {
            if let Err(e) = self.manager.store().update_run(&run).await {
                tracing::warn!(run_id = %run.id, error = %e, "could not record waiting_input");
            }
        } else if let Err(e) = self.log.append_durable(asked, Some(run)).await {
            sr.state().pending_inputs.remove(&request_id);
            return Err(e.to_string());
        }
        Ok(Paused {
            request_id,
            rx,
            sr,
            _pending: pending,
        })
    }
}

#[async_trait]
impl HumanInput for RunHuman {
    /// The call waits for a decision: `approval_requested` (the run `waiting_input`), then `approval_resolved`.
    /// A resumed run's open approval for this call keeps waiting under its logged request id. No decision
    /// within `server.ask_human_timeout_s` is a denial (logged like a decision); a cancelled run logs none.
    async fn approve(&self, call_id: &str, tool: &str, args: &serde_json::Value) -> Decision {
        let reused = self
            .open_approvals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(call_id);
        let metrics = &self.manager.env.metrics;
        let paused = self
            .pause(
                reused,
                PendingKind::Approval,
                metrics.pending_approvals.clone(),
                |request_id| EventKind::ApprovalRequested {
                    request_id,
                    call_id: call_id.to_string(),
                    tool: tool.to_string(),
                    args: args.clone(),
                },
            )
            .await;
        let Paused {
            request_id,
            rx,
            sr,
            _pending,
        } = match paused {
            Ok(p) => p,
            Err(e) => return Decision::deny(format!("could not record the approval request: {e}")),
        };
        let answer = self.wait(rx, "decision").await;
        sr.state().pending_inputs.remove(&request_id);
        let run = self.run_with(RunStatus::Running);
        let decision = match answer {
            Ok(Answer::Decision(d)) => d,
            Ok(Answer::Text(text)) => Decision::from_reply(&text),
            Err(reason) if self.cancel.is_cancelled() => {
                // The run ends (or, handed over, the next process asks again): no decision to log.
                let _ = self.manager.store().update_run(&run).await;
                return Decision::deny(reason);
            }
            Err(reason) => Decision::deny(reason),
        };
        let resolved = self.event(
            &run.id,
            EventKind::ApprovalResolved {
                request_id,
                decision: decision.word().to_string(),
                reason: decision.reason.clone(),
            },
        );
        let _ = self.log.append_durable(resolved, Some(run)).await;
        decision
    }

    async fn ask(&self, question: &str) -> Result<String, String> {
        let reused = self
            .open_question
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let metrics = &self.manager.env.metrics;
        let Paused {
            request_id,
            rx,
            sr,
            _pending,
        } = self
            .pause(
                reused,
                PendingKind::Question,
                metrics.pending_questions.clone(),
                |request_id| EventKind::InputRequested {
                    request_id,
                    question: question.to_string(),
                },
            )
            .await
            .map_err(|e| format!("could not record the question: {e}"))?;
        let answer = match self.wait(rx, "reply").await {
            Ok(Answer::Text(text)) => Ok(text),
            Ok(Answer::Decision(_)) => Err("the question got a decision, not a reply".to_string()),
            Err(e) => Err(e),
        };
        sr.state().pending_inputs.remove(&request_id);
        let run = self.run_with(RunStatus::Running);
        let received = self.event(&run.id, EventKind::InputReceived { request_id });
        if answer.is_ok() {
            let _ = self.log.append_durable(received, Some(run)).await;
        } else {
            let _ = self.manager.store().update_run(&run).await;
        }
        answer
    }
}

/// The `run_finished` of a run that ends without a turn (nothing streamed, no answer): the start-up sweep's, or
/// a send's whose message could not be stored.
pub(crate) fn lone_run_finished(run: &Run, agent: String, max_context_tokens: u64) -> NewEvent {
    NewEvent {
        session_id: run.session_id.clone(),
        run_id: run.id.clone(),
        agent,
        is_subagent: false,
        kind: EventKind::RunFinished {
            run: run.clone(),
            content: String::new(),
            context_tokens: 0,
            max_context_tokens,
        },
    }
}
