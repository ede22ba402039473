//! The one facade every surface calls. A surface handler extracts its input, calls one method here, and
//! renders the result in its dialect; validation, ownership and run lifecycle live here, once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use serde_json::Value;
use tokio::sync::watch;

use crate::agent_loop::LoopEnv;
use crate::config::{AgentSettings, Config, Multitask};
use crate::domain::{new_id, now_rfc3339, Message, NodeInfo, Role, Run, Session, SessionStatus};
use crate::event::{EventKind, NewEvent};
use crate::event_log::{EventLog, LogError, Subscription};
use crate::limits::{Limits, Refused, StreamGuard};
use crate::metrics::Metrics;
use crate::provider::Provider;
use crate::registry::{ExternalTools, McpServerStatus, ToolRegistry};
use crate::runs::{Answer, RunManager, RunResult, TurnRequest};
use crate::skills::{self, RoutingError, SkillMatch};
use crate::store::{LogEntry, NodeBeat, SessionFilter, Store, StoreError};
use crate::tools::Decision;

/// Who is calling. Without configured keys everyone is the principal `local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub admin: bool,
}

impl Principal {
    pub fn local() -> Principal {
        Principal {
            name: "local".into(),
            admin: false,
        }
    }
}

/// Service errors; each surface maps them to its own status codes and shapes.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Unknown id, or an id another principal owns.
    #[error("{0}")]
    NotFound(String),
    /// `code` is `session_closed` or `run_active`.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    /// Over a per-principal limit (`server.rate_limit_per_min`, `server.max_streams_per_principal`): 429.
    #[error("{0}")]
    Limited(Refused),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> ServiceError {
        match e {
            StoreError::NotFound => ServiceError::NotFound("not found".into()),
            StoreError::Conflict(m) => ServiceError::Conflict {
                code: "conflict",
                message: m,
            },
            StoreError::Unavailable(m) => ServiceError::Unavailable(m),
            e @ StoreError::Fenced(_) => ServiceError::Unavailable(e.to_string()),
            StoreError::Other(m) => ServiceError::Internal(m),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// The longest session title, in bytes (SPEC.md section 9, "Bounds").
pub const MAX_TITLE_BYTES: usize = 1024;
/// The largest session metadata, in bytes of its JSON (SPEC.md section 9, "Bounds").
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The longest title derived from a first message, in characters.
pub const DERIVED_TITLE_CHARS: usize = 60;

/// The title a session created without one gets from its first user message: the first non-blank line,
/// trimmed, cut at [`DERIVED_TITLE_CHARS`] characters (on a char boundary, with `…` when cut). None for a message
/// without text.
pub fn derive_title(content: &str) -> Option<String> {
    let line = content.lines().map(str::trim).find(|l| !l.is_empty())?;
    if line.chars().count() <= DERIVED_TITLE_CHARS {
        return Some(line.to_string());
    }
    let cut: String = line.chars().take(DERIVED_TITLE_CHARS - 1).collect();
    Some(format!("{}…", cut.trim_end()))
}

/// Refuses a title or metadata over the bounds, before anything is stored.
fn check_session_fields(title: Option<&str>, metadata: &Value) -> ServiceResult<()> {
    if let Some(t) = title {
        if t.len() > MAX_TITLE_BYTES {
            return Err(ServiceError::TooLarge(format!(
                "`title` is {} bytes; the limit is {MAX_TITLE_BYTES}",
                t.len()
            )));
        }
    }
    let size = serde_json::to_string(metadata)
        .map_err(|e| ServiceError::Internal(format!("metadata: {e}")))?
        .len();
    if size > MAX_METADATA_BYTES {
        return Err(ServiceError::TooLarge(format!(
            "`metadata` is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}"
        )));
    }
    Ok(())
}

/// A user message to send.
#[derive(Clone, Debug, Default)]
pub struct SendMessage {
    pub content: String,
    /// Data URLs or bare base64.
    pub images: Vec<String>,
    /// Upload ids of this session.
    pub files: Vec<String>,
    pub client_message_id: Option<String>,
    pub multitask: Option<Multitask>,
    /// Messages stored ahead of the user message, in the same run: a stateless client's conversation so far
    /// (the OpenAI-compatible surfaces). With an empty `content` and no images, they are the turn's whole
    /// input (tool results of the client's own tools, say) and no user message is stored.
    pub prior: Vec<PriorMessage>,
    /// Function tools the client runs itself (see `TurnRequest::client_tools`).
    pub client_tools: Vec<crate::provider::ToolSpec>,
}

/// A message of [`SendMessage::prior`].
#[derive(Clone, Debug)]
pub struct PriorMessage {
    pub role: Role,
    pub content: String,
    pub tool_calls: Option<Vec<crate::domain::ToolCall>>,
    pub tool_call_id: Option<String>,
}

/// An accepted send.
pub struct Accepted {
    /// The run as created (or, for a repeated `client_message_id`, as it is now).
    pub run: Run,
    /// The stored user message.
    pub message: Option<Message>,
    /// Resolves when the run ends.
    pub done: watch::Receiver<RunResult>,
    /// True when this was a repeat of an earlier `client_message_id`.
    pub repeated: bool,
}

pub use crate::domain::Upload;

/// What a subscriber gets besides its cursor.
pub struct Attached {
    pub subscription: Subscription,
    pub last_seq: u64,
    pub active_run_id: Option<String>,
    /// The requested `after` was older than retention (or beyond the log): replay fell back to "no cursor".
    pub cursor_expired: bool,
}

pub struct Agentd {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub log: Arc<EventLog>,
    pub runs: Arc<RunManager>,
    /// Run control across nodes (None: a store one process owns).
    pub remote: Option<Arc<crate::remote::Remote>>,
    /// Per-principal limits: sends per minute, open streams.
    pub limits: Limits,
    /// Every metric (`GET /metrics`), shared with the runs, the agent loop and the log.
    pub metrics: Arc<Metrics>,
    /// When this process started (its node's `started_at`).
    started_at: String,
    /// Built-in tools, subagents, MCP tools.
    tools: ToolRegistry,
}

/// Takes over the runs of lost nodes every `every` while the run manager is in use.
async fn sweeps(runs: std::sync::Weak<RunManager>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(runs) = runs.upgrade() else { return };
        if runs.is_shutting_down() {
            return;
        }
        match runs.sweep_lost_nodes().await {
            Ok((0, 0)) => {}
            Ok((resumed, ended)) => {
                tracing::info!(resumed, ended, "took over runs of a lost node")
            }
            // An unreachable database is reported once by the store itself (and again when it is back).
            Err(e @ StoreError::Unavailable(_)) => {
                tracing::debug!(error = %e, "sweeping for lost nodes' runs failed")
            }
            Err(e) => tracing::warn!(error = %e, "sweeping for lost nodes' runs failed"),
        }
    }
}

/// Renews the node's heartbeat every `every` while the store is in use (a failed beat is logged; the next
/// one tries again).
async fn heartbeats(
    store: std::sync::Weak<dyn Store>,
    runs: std::sync::Weak<RunManager>,
    beat: NodeBeat,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // A stopping node leaves the registry (`RunManager::shutdown`) and beats no more.
        if runs.upgrade().is_none_or(|r| r.is_shutting_down()) {
            return;
        }
        let Some(store) = store.upgrade() else { return };
        match store.heartbeat(&beat).await {
            Ok(()) => {}
            // The store has told the process (`Store::fenced`), which stops.
            Err(StoreError::Fenced(_)) => return,
            Err(e @ StoreError::Unavailable(_)) => {
                tracing::debug!(node = %beat.node_id, error = %e, "node heartbeat failed")
            }
            Err(e) => tracing::warn!(node = %beat.node_id, error = %e, "node heartbeat failed"),
        }
    }
}

impl Agentd {
    /// Starts the log and the run manager, and ends runs a previous process left unfinished. No MCP servers.
    pub async fn start(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        providers: HashMap<String, Arc<dyn Provider>>,
    ) -> Result<Arc<Agentd>, String> {
        Self::start_with_tools(config, store, providers, Arc::new(Metrics::new()), None).await
    }

    /// [`Agentd::start`] with the MCP servers' tools (`agentd-mcp`, already started with the same `metrics`).
    pub async fn start_with_tools(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        providers: HashMap<String, Arc<dyn Provider>>,
        metrics: Arc<Metrics>,
        external: Option<Arc<dyn ExternalTools>>,
    ) -> Result<Arc<Agentd>, String> {
        let log = EventLog::start_with_metrics(store.clone(), metrics.clone());
        let env = LoopEnv {
            handing_over: Arc::default(),
            config: config.clone(),
            log: log.clone(),
            providers: Arc::new(providers),
            metrics: metrics.clone(),
            tools: ToolRegistry::new(config.clone(), external),
        };
        let tools = env.tools.clone();
        let runs = RunManager::new(env);
        // This node's presence in the cluster's registry (a store for one process keeps none), before it
        // takes over anything, then every sixth of the lease.
        let beat = NodeBeat {
            node_id: runs.node_id().to_string(),
            instance: runs.instance().to_string(),
            listen: config.server.listen.clone(),
            started_at: now_rfc3339(),
        };
        store
            .heartbeat(&beat)
            .await
            .map_err(|e| format!("registering the node: {e}"))?;
        let started_at = beat.started_at.clone();
        tokio::spawn(heartbeats(
            Arc::downgrade(&store),
            Arc::downgrade(&runs),
            beat,
            config.cluster.renew_every(),
        ));
        let (resumed, ended) = runs
            .recover_leftovers()
            .await
            .map_err(|e| format!("start-up recovery failed: {e}"))?;
        // In a cluster, the runs of nodes lost later are taken over by whichever node sweeps first.
        let lapse = config.cluster.lapse();
        if store.live_nodes(lapse).await.ok().flatten().is_some() {
            tokio::spawn(sweeps(Arc::downgrade(&runs), config.cluster.sweep_every()));
        }
        if resumed + ended > 0 {
            tracing::info!(
                runs = resumed + ended,
                resumed,
                ended,
                "took over runs the previous process left unfinished"
            );
        }
        let remote = crate::remote::Remote::start(store.clone(), runs.clone());
        let limits = Limits::new(
            config.server.rate_limit_per_min,
            config.server.max_streams_per_principal,
        );
        Ok(Arc::new(Agentd {
            started_at,
            limits,
            config,
            store,
            log,
            runs,
            remote,
            metrics,
            tools,
        }))
    }

    /// Resolves once this node has been fenced (SPEC.md section 6): another node found its lease lapsed (it
    /// was frozen, or cut off from the database) and took its runs over, and the store refuses everything it
    /// writes. The process must stop; started again, it joins as a new process. Never, on a store one
    /// process owns.
    pub async fn lost_lease(&self) {
        match self.store.fenced() {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// The live nodes (`GET /v1/cluster`, admin; with no API keys configured, anyone who can reach the
    /// server): the store's registry, or this node alone for a store one process owns.
    pub async fn cluster(&self, p: &Principal) -> ServiceResult<Vec<NodeInfo>> {
        if !p.admin && !self.config.auth_keys.is_empty() {
            return Err(ServiceError::NotFound("no such resource".into()));
        }
        if let Some(nodes) = self.store.live_nodes(self.config.cluster.lapse()).await? {
            return Ok(nodes.into_iter().map(|(n, _)| n).collect());
        }
        Ok(vec![NodeInfo {
            node_id: self.runs.node_id().to_string(),
            listen: self.config.server.listen.clone(),
            started_at: self.started_at.clone(),
            last_seen: now_rfc3339(),
            runs: self.runs.unfinished_count() as u64,
        }])
    }

    pub fn agents(&self) -> &[AgentSettings] {
        &self.config.agents
    }

    /// The tool registry (an agent's tools as listed now, MCP servers).
    pub fn tools(&self) -> &ToolRegistry {
        &self.tools
    }

    /// Each MCP server's state, tools and call counts (`GET /v1/mcp`, admin; with no API keys configured,
    /// anyone who can reach the server).
    pub fn mcp_servers(&self, p: &Principal) -> ServiceResult<Vec<McpServerStatus>> {
        if !p.admin && !self.config.auth_keys.is_empty() {
            return Err(ServiceError::NotFound("no such resource".into()));
        }
        Ok(self.tools.mcp_status())
    }

    fn owned(&self, p: &Principal, s: Option<Session>, id: &str) -> ServiceResult<Session> {
        match s {
            Some(mut s) if p.admin || s.principal == p.name => {
                s.active_run_id = self.runs.active_run_id(&s.id);
                Ok(s)
            }
            // Another principal's session is reported exactly like a missing one.
            _ => Err(ServiceError::NotFound(format!("session `{id}` not found"))),
        }
    }

    pub async fn create_session(
        &self,
        p: &Principal,
        agent: &str,
        title: Option<String>,
        metadata: Option<Value>,
    ) -> ServiceResult<Session> {
        if self.config.agent(agent).is_none() {
            return Err(ServiceError::NotFound(format!("agent `{agent}` not found")));
        }
        let metadata = metadata.unwrap_or_else(|| Value::Object(Default::default()));
        if !metadata.is_object() {
            return Err(ServiceError::Invalid("`metadata` must be an object".into()));
        }
        check_session_fields(title.as_deref(), &metadata)?;
        let now = now_rfc3339();
        let session = Session {
            id: new_id(),
            agent: agent.to_string(),
            title,
            status: SessionStatus::Active,
            metadata,
            created_at: now.clone(),
            updated_at: now,
            active_run_id: None,
            principal: p.name.clone(),
        };
        self.store.create_session(&session).await?;
        Ok(session)
    }

    pub async fn session(&self, p: &Principal, id: &str) -> ServiceResult<Session> {
        let s = self.store.get_session(id).await?;
        self.owned(p, s, id)
    }

    /// A session as `GET /v1/sessions/{id}` shows it: its active run also when another node executes it.
    pub async fn session_shown(&self, p: &Principal, id: &str) -> ServiceResult<Session> {
        let mut s = self.session(p, id).await?;
        if s.active_run_id.is_none() {
            s.active_run_id = self.active_run_id(id).await?;
        }
        Ok(s)
    }

    pub async fn list_sessions(
        &self,
        p: &Principal,
        limit: usize,
        before: Option<&str>,
    ) -> ServiceResult<Vec<Session>> {
        self.search_sessions(p, &SessionFilter::default(), limit, before)
            .await
    }

    /// The caller's sessions that `filter` matches (`GET /v1/sessions?q=&status=`), paged like
    /// [`Agentd::list_sessions`].
    pub async fn search_sessions(
        &self,
        p: &Principal,
        filter: &SessionFilter,
        limit: usize,
        before: Option<&str>,
    ) -> ServiceResult<Vec<Session>> {
        let principal = if p.admin { None } else { Some(p.name.as_str()) };
        let limit = limit.clamp(1, 1000);
        let mut list = if *filter == SessionFilter::default() {
            self.store.list_sessions(principal, limit, before).await?
        } else {
            self.store
                .search_sessions(principal, filter, limit, before)
                .await?
        };
        for s in &mut list {
            s.active_run_id = self.runs.active_run_id(&s.id);
        }
        Ok(list)
    }

    /// Renames a session (`PATCH /v1/sessions/{id}`): the title is trimmed, must not be empty, and is at most
    /// [`MAX_TITLE_BYTES`]. Closed sessions can be renamed too.
    pub async fn rename_session(
        &self,
        p: &Principal,
        id: &str,
        title: &str,
    ) -> ServiceResult<Session> {
        check_session_fields(Some(title), &Value::Object(Default::default()))?;
        let title = title.trim();
        if title.is_empty() {
            return Err(ServiceError::Invalid("`title` must not be empty".into()));
        }
        let mut s = self.session_shown(p, id).await?;
        s.title = Some(title.to_string());
        s.updated_at = now_rfc3339();
        self.store.update_session(&s).await?;
        Ok(s)
    }

    /// Closes a session; history stays readable. A running turn is cancelled.
    pub async fn close_session(&self, p: &Principal, id: &str) -> ServiceResult<Session> {
        let mut s = self.session(p, id).await?;
        if s.status != SessionStatus::Closed {
            s.status = SessionStatus::Closed;
            s.updated_at = now_rfc3339();
            self.store.update_session(&s).await?;
            self.runs.cancel_all(id);
        }
        Ok(s)
    }

    pub async fn messages(
        &self,
        p: &Principal,
        id: &str,
        limit: Option<usize>,
        offset: usize,
    ) -> ServiceResult<Vec<Message>> {
        self.session(p, id).await?;
        Ok(self.store.list_messages(id, limit, offset).await?)
    }

    pub async fn list_runs(&self, p: &Principal, id: &str) -> ServiceResult<Vec<Run>> {
        self.session(p, id).await?;
        Ok(self.store.list_runs(id).await?)
    }

    pub async fn run(&self, p: &Principal, id: &str, run_id: &str) -> ServiceResult<Run> {
        self.session(p, id).await?;
        self.store
            .get_run(id, run_id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("run `{run_id}` not found")))
    }

    /// Sends a user message: stores it (durably) and starts or queues its turn.
    pub async fn send(
        &self,
        p: &Principal,
        session_id: &str,
        msg: SendMessage,
    ) -> ServiceResult<Accepted> {
        let session = self.session(p, session_id).await?;
        if session.status == SessionStatus::Closed {
            return Err(ServiceError::Conflict {
                code: "session_closed",
                message: format!("session `{session_id}` is closed"),
            });
        }
        let max = self.config.server.max_message_bytes;
        if msg.content.len() > max {
            return Err(ServiceError::TooLarge(format!(
                "message content is {} bytes; the limit is {max}",
                msg.content.len()
            )));
        }
        let has_user_message = !msg.content.trim().is_empty() || !msg.images.is_empty();
        if !has_user_message && msg.prior.is_empty() {
            return Err(ServiceError::Invalid("`content` must not be empty".into()));
        }
        if let Some(m) = msg.prior.iter().find(|m| m.content.len() > max) {
            return Err(ServiceError::TooLarge(format!(
                "a message is {} bytes; the limit is {max}",
                m.content.len()
            )));
        }
        if let Some(cmid) = &msg.client_message_id {
            if let Some(existing) = self.repeat(session_id, cmid).await? {
                return Ok(existing);
            }
        }
        let agent = self.config.agent(&session.agent).cloned().ok_or_else(|| {
            ServiceError::Invalid(format!(
                "the session's agent `{}` is no longer configured",
                session.agent
            ))
        })?;
        let routing = skills::route(&self.config, &agent, &msg.content).map_err(|e| match e {
            RoutingError::UnknownSkill(n) => {
                ServiceError::Invalid(format!("unknown skill `{n}` for agent `{}`", agent.name))
            }
        })?;
        let images = msg
            .images
            .iter()
            .map(|i| normalise_image(i, self.config.server.max_image_bytes))
            .collect::<ServiceResult<Vec<String>>>()?;
        let mut content = routing.content;
        if !msg.files.is_empty() {
            let mut lines = Vec::new();
            for id in &msg.files {
                let up = self.upload_meta(session_id, id).await?;
                lines.push(format!("- {} → {}", up.name, up.path));
            }
            content = format!(
                "{content}\n\n[Uploaded files on disk:\n{}]",
                lines.join("\n")
            );
        }
        let multitask = msg.multitask.unwrap_or(agent.multitask);
        if multitask == Multitask::Reject && self.busy(session_id).await? {
            return Err(ServiceError::Conflict {
                code: "run_active",
                message: "a run is already active in this session".into(),
            });
        }
        // Last of the checks, first of the effects: a send refused for any other reason is not counted, and
        // a refused one changes nothing (not even an `interrupt`).
        self.limits
            .try_send(&p.name)
            .map_err(ServiceError::Limited)?;
        if multitask == Multitask::Interrupt {
            self.runs.cancel_all(session_id);
            if let Some(remote) = &self.remote {
                remote.cancel_all(session_id).await?;
            }
        }
        let run = Run::queued(session_id);
        let stored = |role: Role, content: String| Message {
            id: new_id(),
            session_id: session_id.to_string(),
            run_id: Some(run.id.clone()),
            role,
            content,
            tool_calls: None,
            tool_call_id: None,
            agent: Some(session.agent.clone()),
            images: Vec::new(),
            created_at: now_rfc3339(),
        };
        let mut prior: Vec<Message> = msg
            .prior
            .into_iter()
            .map(|m| Message {
                tool_calls: m.tool_calls,
                tool_call_id: m.tool_call_id,
                ..stored(m.role, m.content)
            })
            .collect();
        // Checked above: without a user message, `prior` has at least one message, the turn's last input.
        let message = match (has_user_message, prior.pop()) {
            (false, Some(last)) => last,
            (_, last) => {
                prior.extend(last);
                Message {
                    images,
                    ..stored(Role::User, content)
                }
            }
        };
        // From the run row to the started run on a task of its own: a caller whose future is dropped (a
        // WebSocket that closed, an HTTP client that hung up) must not leave a stored run `queued` forever.
        let commit = tokio::spawn(commit_send(
            self.store.clone(),
            self.log.clone(),
            self.runs.clone(),
            self.remote.clone(),
            PendingSend {
                run,
                client_message_id: msg.client_message_id.clone(),
                message,
                session,
                agent,
                skill: routing.skill,
                prior,
                client_tools: msg.client_tools,
            },
        ));
        match commit.await {
            Ok(Ok(accepted)) => Ok(accepted),
            Ok(Err(CommitError::Duplicate)) => {
                // Two sends with one client_message_id raced; the first one won.
                if let Some(cmid) = &msg.client_message_id {
                    if let Some(existing) = self.repeat(session_id, cmid).await? {
                        return Ok(existing);
                    }
                }
                Err(ServiceError::Conflict {
                    code: "conflict",
                    message: "duplicate send".into(),
                })
            }
            Ok(Err(CommitError::Failed(e))) => Err(e),
            Err(e) => Err(ServiceError::Internal(format!(
                "storing the send failed: {e}"
            ))),
        }
    }

    async fn repeat(&self, session_id: &str, cmid: &str) -> ServiceResult<Option<Accepted>> {
        let Some(run) = self
            .store
            .find_run_by_client_message_id(session_id, cmid)
            .await?
        else {
            return Ok(None);
        };
        let message = self
            .store
            .list_messages(session_id, None, 0)
            .await?
            .into_iter()
            .find(|m| m.role == Role::User && m.run_id.as_deref() == Some(run.id.as_str()));
        let live = self.runs.watch(session_id, &run.id);
        if message.is_none() && live.is_none() && run.status.is_terminal() {
            // The first send's run was stored but not its message: the process stopped in between, and the
            // start-up sweep ended that run (`interrupted`, its one `run_finished`). That send was never
            // acknowledged, so this is not a repeat: the orphan gives up the id and the message becomes a new
            // turn.
            self.store
                .release_client_message_id(session_id, &run.id)
                .await?;
            return Ok(None);
        }
        let done = match (live, &self.remote) {
            (Some(w), _) => w,
            // Going on another node (the first send reached it): its end is learnt from the run's row.
            (None, Some(remote)) if !run.status.is_terminal() => {
                remote.watch_end(session_id, &run.id)
            }
            (None, _) => {
                let final_msg = self.final_message(session_id, &run.id).await?;
                watch::channel(Some((run.clone(), final_msg))).1
            }
        };
        Ok(Some(Accepted {
            run,
            message,
            done,
            repeated: true,
        }))
    }

    /// The last assistant message of a run.
    pub async fn final_message(
        &self,
        session_id: &str,
        run_id: &str,
    ) -> ServiceResult<Option<Message>> {
        Ok(final_message_of(self.store.as_ref(), session_id, run_id).await?)
    }

    /// Waits for a run to end.
    pub async fn wait(
        mut done: watch::Receiver<RunResult>,
    ) -> ServiceResult<(Run, Option<Message>)> {
        match done.wait_for(|r| r.is_some()).await {
            Ok(r) => r
                .clone()
                .ok_or_else(|| ServiceError::Internal("run ended without a result".into())),
            Err(_) => Err(ServiceError::Unavailable(
                "the server is shutting down".into(),
            )),
        }
    }

    /// Cancels a run (the active one when `run_id` is None) and returns it once stopped, or unchanged if it had
    /// already ended.
    pub async fn cancel(
        &self,
        p: &Principal,
        session_id: &str,
        run_id: Option<&str>,
    ) -> ServiceResult<Option<Run>> {
        self.session(p, session_id).await?;
        if let Some(id) = run_id {
            self.run(p, session_id, id).await?;
        }
        let cancelled = self.runs.cancel(session_id, run_id).await;
        if cancelled.is_none() {
            // Executed by another node: the command goes there, and the run is returned once it has ended.
            if let Some(remote) = &self.remote {
                if let Some(run) = remote.cancel(session_id, run_id).await? {
                    return Ok(Some(run));
                }
            }
        }
        match cancelled.as_deref().or(run_id) {
            Some(id) => Ok(self.store.get_run(session_id, id).await?),
            None => Ok(None),
        }
    }

    /// Answers a pending `ask_human`.
    pub async fn reply(
        &self,
        p: &Principal,
        session_id: &str,
        request_id: &str,
        content: String,
    ) -> ServiceResult<String> {
        self.session(p, session_id).await?;
        let max = self.config.server.max_message_bytes;
        if content.len() > max {
            // Refused before the pending question is taken: it still waits for a reply of a fitting size.
            return Err(ServiceError::TooLarge(format!(
                "the reply is {} bytes; the limit is {max}",
                content.len()
            )));
        }
        self.answer(session_id, request_id, Answer::Text(content))
            .await
    }

    /// Decides a pending approval (SPEC.md section 7): `run_id`, when given, must be the session's; a request
    /// that was answered already (or ended unanswered) is a conflict, an unknown one 404.
    pub async fn decide(
        &self,
        p: &Principal,
        session_id: &str,
        run_id: Option<&str>,
        request_id: &str,
        decision: Decision,
    ) -> ServiceResult<String> {
        self.session(p, session_id).await?;
        if let Some(id) = run_id {
            self.run(p, session_id, id).await?;
        }
        let max = self.config.server.max_message_bytes;
        let reason_len = decision.reason.as_deref().map_or(0, str::len);
        if reason_len > max {
            return Err(ServiceError::TooLarge(format!(
                "the reason is {reason_len} bytes; the limit is {max}"
            )));
        }
        match self
            .answer(session_id, request_id, Answer::Decision(decision))
            .await
        {
            Err(ServiceError::NotFound(m)) => {
                if self.approval_logged(session_id, request_id).await? {
                    Err(ServiceError::Conflict {
                        code: "conflict",
                        message: format!("the approval `{request_id}` was already decided"),
                    })
                } else {
                    Err(ServiceError::NotFound(m))
                }
            }
            other => other,
        }
    }

    /// Whether the session's log holds `approval_requested` for `request_id` (read on the error path only).
    async fn approval_logged(&self, session_id: &str, request_id: &str) -> ServiceResult<bool> {
        let mut after = 0;
        loop {
            let page = self.store.read_events(session_id, after, 1000).await?;
            let Some(last) = page.last() else {
                return Ok(false);
            };
            after = last.seq();
            if page.iter().any(|e| {
                matches!(&e.event.kind, EventKind::ApprovalRequested { request_id: r, .. } if r == request_id)
            }) {
                return Ok(true);
            }
        }
    }

    /// Hands an answer to the run waiting for it, on this node or (through the store) another.
    async fn answer(
        &self,
        session_id: &str,
        request_id: &str,
        answer: Answer,
    ) -> ServiceResult<String> {
        let refused = |e: crate::runs::ReplyError| match e {
            crate::runs::ReplyError::NotAnApproval(_) => ServiceError::Invalid(e.to_string()),
            crate::runs::ReplyError::UnknownRequest(_) => ServiceError::NotFound(e.to_string()),
        };
        let Some(remote) = &self.remote else {
            return self
                .runs
                .answer(session_id, request_id, answer)
                .map_err(refused);
        };
        match self.runs.answer(session_id, request_id, answer.clone()) {
            Ok(run_id) => Ok(run_id),
            Err(e @ crate::runs::ReplyError::NotAnApproval(_)) => Err(refused(e)),
            // Pending on another node, perhaps.
            Err(e) => remote
                .reply(session_id, request_id, &answer)
                .await?
                .ok_or_else(|| refused(e)),
        }
    }

    /// The run holding the session's turn, on this node or (read from the store) another.
    async fn active_run_id(&self, session_id: &str) -> ServiceResult<Option<String>> {
        let local = self.runs.active_run_id(session_id);
        match (&local, &self.remote) {
            (None, Some(remote)) => Ok(remote.active_run(session_id).await?),
            _ => Ok(local),
        }
    }

    /// Whether a run of the session is queued or going, on this node or another.
    async fn busy(&self, session_id: &str) -> ServiceResult<bool> {
        if self.runs.is_busy(session_id) {
            return Ok(true);
        }
        match &self.remote {
            Some(remote) => Ok(remote.busy(session_id).await?),
            None => Ok(false),
        }
    }

    /// Takes one of the principal's stream slots (`server.max_streams_per_principal`) for a WebSocket or SSE
    /// stream about to open; the stream counts until the guard is dropped.
    pub fn open_stream(&self, p: &Principal) -> ServiceResult<StreamGuard> {
        self.limits
            .open_stream(&p.name)
            .map_err(ServiceError::Limited)
    }

    /// Attaches a subscriber: after `after` when given (and still retained), else from the active run's start,
    /// else live.
    pub async fn attach(
        &self,
        p: &Principal,
        session_id: &str,
        after: Option<u64>,
    ) -> ServiceResult<Attached> {
        self.session(p, session_id).await?;
        // Listening before the bounds are read: what they do not include reaches the listener.
        let listener = self.log.listen(session_id);
        // The log's bounds first, then the active run: a run stops being active before its `run_finished` is
        // committed, so a hello never names a run whose end is already at or below its `last_seq`.
        let bounds = self.store.log_bounds(session_id).await?;
        let active_run_id = self.active_run_id(session_id).await?;
        let mut cursor_expired = false;
        let from = match after {
            Some(n)
                if n <= bounds.last_seq && (bounds.first_seq == 0 || n + 1 >= bounds.first_seq) =>
            {
                Some(n)
            }
            Some(_) => {
                cursor_expired = true;
                None
            }
            None => None,
        };
        let from = match from {
            Some(n) => n,
            None => match &active_run_id {
                Some(run_id) => match self.store.first_seq_of_run(session_id, run_id).await? {
                    Some(first) => first - 1,
                    None => bounds.last_seq,
                },
                None => bounds.last_seq,
            },
        };
        // At the end of the log (a live attach, or a cursor that is up to date) nothing is read from the store.
        let subscription = if from == bounds.last_seq {
            listener.at_end(from)
        } else {
            listener.after(from)
        };
        Ok(Attached {
            subscription,
            last_seq: bounds.last_seq,
            active_run_id,
            cursor_expired,
        })
    }

    /// The caller's session, if it is still open: a closed one is 409 `session_closed` (what a surface checks
    /// before taking an upload's body).
    pub async fn open_session(&self, p: &Principal, id: &str) -> ServiceResult<Session> {
        let s = self.session(p, id).await?;
        if s.status == SessionStatus::Closed {
            return Err(ServiceError::Conflict {
                code: "session_closed",
                message: format!("session `{id}` is closed"),
            });
        }
        Ok(s)
    }

    /// Stores an upload (in the store, and in the session's workspace under a sanitised name); a closed session
    /// takes none.
    pub async fn upload(
        &self,
        p: &Principal,
        session_id: &str,
        file_name: &str,
        content_type: &str,
        bytes: &[u8],
    ) -> ServiceResult<Upload> {
        self.open_session(p, session_id).await?;
        if bytes.len() > self.config.server.max_upload_bytes {
            return Err(ServiceError::TooLarge(format!(
                "the file is {} bytes; the limit is {}",
                bytes.len(),
                self.config.server.max_upload_bytes
            )));
        }
        let dir = self.runs.workspace(session_id);
        crate::uploads::store(
            self.store.as_ref(),
            session_id,
            &dir,
            file_name,
            content_type,
            bytes,
        )
        .await
        .map_err(|e| upload_error("write upload", e))
    }

    /// Resolves a file id of the session from the store, giving the workspace the file if it lacks it.
    async fn upload_meta(&self, session_id: &str, id: &str) -> ServiceResult<Upload> {
        let dir = self.runs.workspace(session_id);
        match crate::uploads::resolve(self.store.as_ref(), session_id, &dir, id).await {
            Ok(Some(up)) => Ok(up),
            Ok(None) => Err(ServiceError::Invalid(format!("unknown file id `{id}`"))),
            Err(e) => Err(upload_error(&format!("file id `{id}`"), e)),
        }
    }
}

/// An upload's I/O error as the service's: a store that cannot be reached is `Unavailable` (503), as
/// everywhere else; the rest is internal.
fn upload_error(context: &str, e: std::io::Error) -> ServiceError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<StoreError>())
    {
        Some(StoreError::Unavailable(m)) => ServiceError::Unavailable(m.clone()),
        _ => ServiceError::Internal(format!("{context}: {e}")),
    }
}

/// What [`commit_send`] stores and starts.
struct PendingSend {
    run: Run,
    client_message_id: Option<String>,
    message: Message,
    session: Session,
    agent: AgentSettings,
    skill: Option<SkillMatch>,
    /// Stored before `message`, in the same run ([`SendMessage::prior`]).
    prior: Vec<Message>,
    client_tools: Vec<crate::provider::ToolSpec>,
}

enum CommitError {
    /// Another run holds the send's `client_message_id`; nothing was stored.
    Duplicate,
    Failed(ServiceError),
}

impl From<StoreError> for CommitError {
    fn from(e: StoreError) -> CommitError {
        CommitError::Failed(e.into())
    }
}

/// The effects of a send, from the run row to the started run. Runs on a task of its own (see [`Agentd::send`]):
/// once the run row is stored, the run is started (or, if the message cannot be stored, ended) whatever becomes
/// of the caller.
async fn commit_send(
    store: Arc<dyn Store>,
    log: Arc<EventLog>,
    runs: Arc<RunManager>,
    remote: Option<Arc<crate::remote::Remote>>,
    p: PendingSend,
) -> Result<Accepted, CommitError> {
    let PendingSend {
        mut run,
        client_message_id,
        message,
        mut session,
        agent,
        skill,
        prior,
        client_tools,
    } = p;
    // The run is this node's from its acceptance (queued here, it runs here), unless, in a cluster, another
    // node holds the session's turn: then the store names that node, and the run is started there.
    run.node = Some(runs.node_id().to_string());
    let routed = match store.route_run(&run, client_message_id.as_deref()).await {
        Ok(routed) => routed,
        Err(StoreError::Conflict(_)) => return Err(CommitError::Duplicate),
        Err(e) => return Err(e.into()),
    };
    // A send with a client_message_id creates its run row first: the store's unique key on that id is what
    // tells a repeat; so does a send with prior messages (they are stored before the message). Otherwise the
    // run row is written by the message's own commit (one transaction).
    let run_with_message = match (&routed, client_message_id.as_deref()) {
        (Some(_), _) => None,
        (None, None) if prior.is_empty() => Some(run.clone()),
        (None, id) => {
            match store.create_run(&run, id).await {
                Ok(()) => {}
                Err(StoreError::Conflict(_)) => return Err(CommitError::Duplicate),
                Err(e) => return Err(e.into()),
            }
            None
        }
    };
    let elsewhere = routed.filter(|node| node != runs.node_id());
    if let Some(node) = &elsewhere {
        run.node = Some(node.clone());
    }
    let row_first = run_with_message.is_some();
    let envelope = |kind: EventKind| NewEvent {
        session_id: session.id.clone(),
        run_id: run.id.clone(),
        agent: session.agent.clone(),
        is_subagent: false,
        kind,
    };
    let said = LogEntry {
        event: envelope(EventKind::Message {
            message: message.clone(),
        }),
        run: run_with_message,
    };
    // A session with no turn running starts this one at once: its `run_started` goes into the same commit as
    // the message (one transaction, not two), and the session shows it active from then on.
    let ticket = match elsewhere {
        None => Some(runs.reserve(&session.id)),
        Some(_) => None,
    };
    let mut started = run.clone();
    let mut prior_failed = None;
    for m in prior {
        let entry = envelope(EventKind::Message { message: m });
        if let Err(e) = log.append_durable(entry, None).await {
            prior_failed = Some(e);
            break;
        }
    }
    let committed = if let Some(e) = prior_failed {
        Err(e)
    } else if ticket.as_ref().is_some_and(|t| t.starts_now()) {
        started.status = crate::domain::RunStatus::Running;
        started.started_at = Some(now_rfc3339());
        let start = LogEntry {
            event: envelope(EventKind::RunStarted {
                run: started.clone(),
            }),
            run: Some(started.clone()),
        };
        runs.mark_active(&session.id, &run.id);
        let r = log.append_durable_pair(said, start).await;
        if r.is_err() {
            runs.unmark_active(&session.id, &run.id);
        }
        r
    } else {
        log.append_durable(said.event, said.run).await
    };
    if let Err(e) = committed {
        // The run row may be stored, its message is not: end the run (its one `run_finished`), so a retry with
        // the same client_message_id becomes a new turn (see `repeat`) rather than waiting on a run that never
        // starts; if the store is away, as soon as it is back. (A run written by the message's own commit is
        // not there when the store says nothing was committed.)
        let nothing_stored = row_first
            && matches!(
                e,
                LogError::Unavailable(_) | LogError::Store(StoreError::Unavailable(_))
            );
        if !nothing_stored {
            tokio::spawn(end_orphan(
                log.clone(),
                run.clone(),
                session.agent.clone(),
                agent.max_context_tokens,
            ));
        }
        return Err(CommitError::Failed(match e {
            LogError::Unavailable(m) | LogError::Store(StoreError::Unavailable(m)) => {
                ServiceError::Unavailable(m)
            }
            other => ServiceError::Internal(other.to_string()),
        }));
    }
    if let (None, Role::User, Some(title)) = (
        &session.title,
        &message.role,
        derive_title(&message.content),
    ) {
        session.title = Some(title);
        session.updated_at = now_rfc3339();
        // The message is stored: its run starts even if the title could not be.
        if let Err(e) = store.update_session(&session).await {
            tracing::warn!(session = %session.id, "storing the session title failed: {e}");
        }
    }
    let done = match (ticket, elsewhere, remote) {
        (Some(ticket), _, _) => {
            let starts_now = ticket.starts_now();
            runs.start_reserved(
                TurnRequest {
                    run: if starts_now { started } else { run.clone() },
                    agent,
                    skill,
                    resume: None,
                    started: starts_now,
                    client_tools,
                },
                session.agent.clone(),
                ticket,
            )
        }
        // Queued on the node holding the session's turn (if the command is lost, that node's next sweep
        // finds the run queued under its name and starts it).
        (None, Some(node), Some(remote)) => remote
            .start_elsewhere(&node, &session.id, &run.id)
            .await
            .map_err(|e| CommitError::Failed(e.into()))?,
        (None, _, _) => {
            return Err(CommitError::Failed(ServiceError::Internal(
                "a run routed to another node without commands across nodes".into(),
            )))
        }
    };
    Ok(Accepted {
        run,
        message: Some(message),
        done,
        repeated: false,
    })
}

/// The last assistant message of a run (its answer), as stored.
pub(crate) async fn final_message_of(
    store: &dyn Store,
    session_id: &str,
    run_id: &str,
) -> Result<Option<Message>, StoreError> {
    Ok(store
        .list_messages(session_id, None, 0)
        .await?
        .into_iter()
        .rev()
        .find(|m| {
            m.role == Role::Assistant && m.run_id.as_deref() == Some(run_id) && m.agent.is_some()
        }))
}

/// How long [`end_orphan`] keeps trying; past it, the next start-up's sweep ends the run.
const ORPHAN_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// Ends a run whose user message could not be stored (`failed`, with its one `run_finished`), trying again
/// every few seconds while the store cannot take it.
async fn end_orphan(log: Arc<EventLog>, mut run: Run, agent: String, max_context_tokens: u64) {
    run.status = crate::domain::RunStatus::Failed;
    run.ended_at = Some(now_rfc3339());
    run.node = None;
    run.error = Some(crate::domain::RunError {
        code: crate::domain::RunErrorCode::Internal,
        message: "the message could not be stored".into(),
    });
    let started = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(200);
    loop {
        let ev = crate::runs::lone_run_finished(&run, agent.clone(), max_context_tokens);
        match log.append_durable(ev, Some(run.clone())).await {
            Ok(_) | Err(LogError::Closed) => return,
            Err(e) if started.elapsed() > ORPHAN_RETRY_FOR => {
                tracing::error!(run_id = %run.id, error = %e, "could not end a run whose message was lost");
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Keeps a safe file name: the last path component, no leading dots, only `[A-Za-z0-9._ -]`, at most 100 chars.
pub fn sanitise_file_name(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = cleaned.trim().trim_start_matches('.').to_string();
    let mut name: String = trimmed.chars().take(100).collect();
    if name.is_empty() || name.chars().all(|c| c == '.' || c == '_') {
        name = "upload".into();
    }
    name
}

pub(crate) fn numbered(name: &str, n: u32) -> String {
    match Path::new(name).extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{}-{n}.{ext}", &name[..name.len() - ext.len() - 1]),
        None => format!("{name}-{n}"),
    }
}

/// Accepts a data URL or bare base64; returns a data URL. Bare base64 gets its type from its magic bytes.
pub fn normalise_image(raw: &str, max_bytes: usize) -> ServiceResult<String> {
    let (declared, b64) = match raw.strip_prefix("data:") {
        Some(rest) => {
            let (head, data) = rest
                .split_once(',')
                .ok_or_else(|| ServiceError::Invalid("image data URL has no `,`".into()))?;
            let mime = head
                .strip_suffix(";base64")
                .ok_or_else(|| ServiceError::Invalid("image data URL must be base64".into()))?;
            (Some(mime.to_string()), data)
        }
        None => (None, raw),
    };
    if b64.len() / 4 * 3 > max_bytes + 3 {
        return Err(ServiceError::TooLarge(format!(
            "an image is larger than {max_bytes} bytes"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| ServiceError::Invalid("image is not valid base64".into()))?;
    if bytes.len() > max_bytes {
        return Err(ServiceError::TooLarge(format!(
            "an image is larger than {max_bytes} bytes"
        )));
    }
    let sniffed = sniff_image(&bytes);
    let mime = match (declared, sniffed) {
        (Some(d), _) if d.starts_with("image/") => d,
        (_, Some(s)) => s.to_string(),
        _ => {
            return Err(ServiceError::Invalid(
                "not a recognised image (png, jpeg, gif, webp)".into(),
            ))
        }
    };
    Ok(format!("data:{mime};base64,{}", b64.trim()))
}

fn sniff_image(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(&[0x89, b'P', b'N', b'G']) {
        Some("image/png")
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if b.starts_with(b"GIF8") {
        Some("image/gif")
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_title_is_the_first_line_cut_on_a_char_boundary() {
        assert_eq!(
            derive_title("  hello there \nsecond").as_deref(),
            Some("hello there")
        );
        assert_eq!(
            derive_title("\n\n  \n  later line").as_deref(),
            Some("later line")
        );
        assert_eq!(derive_title("   \n "), None);
        let long = "é".repeat(100);
        let t = derive_title(&long).unwrap_or_default();
        assert_eq!(t.chars().count(), DERIVED_TITLE_CHARS);
        assert!(t.ends_with('…') && t.starts_with("éé"));
        let exact = "x".repeat(DERIVED_TITLE_CHARS);
        assert_eq!(derive_title(&exact).as_deref(), Some(exact.as_str()));
    }

    #[test]
    fn an_unreachable_store_under_an_upload_is_unavailable() {
        let down = std::io::Error::other(StoreError::Unavailable("connection refused".into()));
        assert!(matches!(
            upload_error("write upload", down),
            ServiceError::Unavailable(m) if m == "connection refused"
        ));
        let broken = std::io::Error::other(StoreError::Other("disk full".into()));
        assert!(matches!(
            upload_error("write upload", broken),
            ServiceError::Internal(m) if m.contains("disk full")
        ));
    }

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(sanitise_file_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitise_file_name("/abs/path/report.pdf"), "report.pdf");
        assert_eq!(sanitise_file_name("..\\..\\win.ini"), "win.ini");
        assert_eq!(sanitise_file_name(".hidden"), "hidden");
        assert_eq!(sanitise_file_name(".."), "upload");
        assert_eq!(sanitise_file_name("a\0b;rm -rf.txt"), "a_b_rm -rf.txt");
        assert_eq!(numbered("a.txt", 2), "a-2.txt");
    }

    #[test]
    fn images_get_their_type_from_magic_bytes() {
        let png = base64::engine::general_purpose::STANDARD.encode([0x89, b'P', b'N', b'G', 0, 0]);
        assert_eq!(
            normalise_image(&png, 100).unwrap(),
            format!("data:image/png;base64,{png}")
        );
        let url = format!("data:image/png;base64,{png}");
        assert_eq!(normalise_image(&url, 100).unwrap(), url);
        assert!(matches!(
            normalise_image("bm90IGFuIGltYWdl", 100),
            Err(ServiceError::Invalid(_))
        ));
        assert!(matches!(
            normalise_image(&png, 3),
            Err(ServiceError::TooLarge(_))
        ));
        assert!(matches!(
            normalise_image("%%%", 100),
            Err(ServiceError::Invalid(_))
        ));
    }
}
