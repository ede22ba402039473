//! agentd's MCP client (SPEC.md section 7): each `[mcp_servers.NAME]` is a Model Context Protocol server whose
//! tools agents call as `NAME__TOOL`. Built on the official Rust SDK (`rmcp`), client role only.
//!
//! - [`McpHub`] holds the servers and implements the core's [`ExternalTools`]: the tool registry lists their
//!   tools, the agent loop calls them.
//! - Each server has a supervisor task ([`supervise`]): start (spawn the child, or connect over streamable
//!   HTTP), `initialize`, `tools/list`, then wait for the connection to end, a `notifications/tools/list_changed`
//!   (list again) or a call that timed out (check it still answers). When it fails to start, crashes or stops
//!   answering, its tools are withdrawn, its calls fail at once with an error naming it and the cause, and it
//!   is started again after a back-off (1 s, doubling to 30 s; reset once it stayed up 30 s).
//! - A call has the server's `timeout_s`; past it, or when its run is cancelled, the request is dropped, which
//!   sends `notifications/cancelled` to the server. Results become text ([`content`]), at most
//!   `server.max_upload_bytes` (the loop then cuts them to `server.max_tool_result_bytes`, keeping the whole as
//!   an upload), and images for the model, at most `server.max_tool_result_bytes` together.
//! - A stdio server's stderr goes to agentd's log, a line at a time with the server's name, at most
//!   [`stderr::LINES_PER_SECOND`] lines a second (the rest are counted, not logged).
//!
//! Nothing a server sends can panic or block agentd: every await on a server is bounded by a timeout or a
//! cancellation, messages are capped at [`MAX_MESSAGE_BYTES`], and no lock is held across an await.

pub mod content;
mod stderr;
mod supervise;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_core::config::{Config, McpServerSettings};
use agentd_core::metrics::Metrics;
use agentd_core::registry::{
    mcp_server_of, ExternalTool, ExternalTools, McpCallCounts, McpServerStatus,
};
use agentd_core::tools::ToolOutput;
use async_trait::async_trait;
use rmcp::model::CallToolRequestParams;
use rmcp::service::{Peer, RoleClient};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The largest JSON-RPC message agentd reads from a server (a line over stdio, an SSE event or a JSON body over
/// HTTP). A larger one is dropped by the SDK and its call times out.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// An error and its causes, `outer: inner: ...` (transport errors hide the cause, a refused connection or a
/// failed TLS handshake, in their sources). Repeated messages are skipped.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Where a server is in its life (`GET /v1/mcp`'s `state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Its first start is under way.
    Starting,
    Ready,
    /// It was ready and went away (crashed, stopped answering); it is being started again.
    Restarting,
    /// Its last start failed; it is tried again after a back-off.
    Failed,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Starting,
        State::Ready,
        State::Restarting,
        State::Failed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Restarting => "restarting",
            State::Failed => "failed",
        }
    }
}

/// One listed tool of a server.
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    /// The server's own name for it (what `tools/call` sends).
    pub original: String,
    pub tool: ExternalTool,
}

/// What a server is now; read and written under a short lock, never across an await.
pub(crate) struct Live {
    pub state: State,
    pub last_error: Option<String>,
    pub protocol_version: Option<String>,
    pub restarts: u64,
    pub tools: Arc<Vec<Listed>>,
    /// Set while the server is ready.
    pub peer: Option<Peer<RoleClient>>,
}

#[derive(Default)]
struct Counts {
    total: AtomicU64,
    ok: AtomicU64,
    error: AtomicU64,
    timeout: AtomicU64,
    cancelled: AtomicU64,
}

/// One configured server.
pub(crate) struct Server {
    pub settings: McpServerSettings,
    pub live: Mutex<Live>,
    counts: Counts,
    /// A call timed out: the supervisor checks the server still answers.
    pub suspect: Notify,
    /// Set once the first start has ended (ready or failed).
    pub settled: tokio::sync::watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
}

impl Server {
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        // A panic while holding this lock cannot leave a half-written state that matters: take it anyway.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to `state` (and its gauge).
    pub fn set_state(&self, state: State, error: Option<String>) {
        {
            let mut live = self.live();
            live.state = state;
            if error.is_some() {
                live.last_error = error;
            }
            if state != State::Ready {
                live.peer = None;
                live.tools = Arc::default();
            }
        }
        for s in State::ALL {
            self.metrics
                .mcp_server_state
                .with_label_values(&[self.name(), s.as_str()])
                .set(i64::from(s == state));
        }
    }

    fn count(&self, outcome: &'static str) {
        let c = match outcome {
            "ok" => &self.counts.ok,
            "timeout" => &self.counts.timeout,
            "cancelled" => &self.counts.cancelled,
            _ => &self.counts.error,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .mcp_calls
            .with_label_values(&[self.name(), outcome])
            .inc();
    }

    fn status(&self) -> McpServerStatus {
        let live = self.live();
        let c = &self.counts;
        McpServerStatus {
            name: self.settings.name.clone(),
            transport: self.settings.transport.kind(),
            state: live.state.as_str(),
            last_error: live.last_error.clone(),
            protocol_version: live.protocol_version.clone(),
            restarts: live.restarts,
            tools: live.tools.iter().map(|t| t.tool.name.clone()).collect(),
            calls: McpCallCounts {
                total: c.total.load(Ordering::Relaxed),
                ok: c.ok.load(Ordering::Relaxed),
                error: c.error.load(Ordering::Relaxed),
                timeout: c.timeout.load(Ordering::Relaxed),
                cancelled: c.cancelled.load(Ordering::Relaxed),
            },
        }
    }

    /// One `tools/call`, bounded by the server's timeout and the run's cancellation.
    async fn call(
        &self,
        name: &str,
        args: &Value,
        cancel: &CancellationToken,
        max_bytes: usize,
        max_image_bytes: usize,
    ) -> ToolOutput {
        let server = self.name();
        let (peer, original) = {
            let live = self.live();
            let Some(peer) = live.peer.clone() else {
                let why = live
                    .last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                drop(live);
                self.counts.total.fetch_add(1, Ordering::Relaxed);
                self.count("error");
                return ToolOutput::err(format!(
                    "MCP server `{server}` is not ready ({}){why}",
                    self.live().state.as_str()
                ));
            };
            let Some(t) = live.tools.iter().find(|t| t.tool.name == name) else {
                return ToolOutput::err(format!("MCP server `{server}` has no tool `{name}`"));
            };
            (peer, t.original.clone())
        };
        let arguments = match args {
            Value::Object(map) => Some(map.clone()),
            Value::Null => None,
            _ => return ToolOutput::err("the arguments must be a JSON object"),
        };
        self.counts.total.fetch_add(1, Ordering::Relaxed);
        let mut params = CallToolRequestParams::new(original);
        params.arguments = arguments;
        let timeout = Duration::from_secs(self.settings.timeout_s);
        // Counts the call as cancelled unless it ends here: the loop drops the calls of a cancelled run.
        let mut unfinished = Unfinished(Some(self));
        // Dropping the call (timeout, cancel) sends `notifications/cancelled` for it (the SDK's guard).
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                return ToolOutput::err(format!("cancelled; MCP server `{server}` was told to stop the call"));
            }
            r = tokio::time::timeout(timeout, peer.call_tool(params)) => r,
        };
        unfinished.0 = None;
        match result {
            Err(_) => {
                self.count("timeout");
                self.suspect.notify_one();
                ToolOutput::err(format!(
                    "MCP server `{server}` did not answer `{name}` within {} s; the call was cancelled",
                    self.settings.timeout_s
                ))
            }
            Ok(Err(e)) => {
                self.count("error");
                // The connection may be gone (an HTTP server that went away does not end the session by
                // itself): the supervisor checks.
                if matches!(
                    e,
                    rmcp::ServiceError::TransportSend(_) | rmcp::ServiceError::TransportClosed
                ) {
                    self.suspect.notify_one();
                }
                ToolOutput::err(format!(
                    "MCP server `{server}` failed the call: {}",
                    chain(&e)
                ))
            }
            Ok(Ok(result)) => {
                let out = content::to_output(&result, max_bytes, max_image_bytes);
                self.count(if out.success { "ok" } else { "error" });
                out
            }
        }
    }
}

/// A call in flight: dropped before it ended, it counts as cancelled.
struct Unfinished<'a>(Option<&'a Server>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(server) = self.0 {
            server.count("cancelled");
        }
    }
}

/// The configured MCP servers, supervised.
pub struct McpHub {
    servers: Vec<Arc<Server>>,
    /// The most a result's text may hold before the loop's own cut.
    max_result_bytes: usize,
    /// Images a result attaches for the model, together (`server.max_tool_result_bytes`).
    max_image_bytes: usize,
    shutdown: CancellationToken,
}

impl McpHub {
    /// Starts a supervisor for every configured server and returns at once: servers become ready in the
    /// background (`GET /v1/mcp` shows them starting), so a slow or broken one never delays agentd. Must run
    /// inside a tokio runtime. None when no server is configured.
    pub fn start(config: &Config, metrics: Arc<Metrics>) -> Option<Arc<McpHub>> {
        if config.mcp_servers.is_empty() {
            return None;
        }
        // https for streamable HTTP servers: rustls with ring (already installed by someone else is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shutdown = CancellationToken::new();
        let servers: Vec<Arc<Server>> = config
            .mcp_servers
            .iter()
            .map(|settings| {
                Arc::new(Server {
                    settings: settings.clone(),
                    live: Mutex::new(Live {
                        state: State::Starting,
                        last_error: None,
                        protocol_version: None,
                        restarts: 0,
                        tools: Arc::default(),
                        peer: None,
                    }),
                    counts: Counts::default(),
                    suspect: Notify::new(),
                    settled: tokio::sync::watch::Sender::new(false),
                    metrics: metrics.clone(),
                })
            })
            .collect();
        for s in &servers {
            s.set_state(State::Starting, None);
            tokio::spawn(supervise::supervise(s.clone(), shutdown.clone()));
        }
        Some(Arc::new(McpHub {
            servers,
            max_result_bytes: config.server.max_upload_bytes.max(1024),
            max_image_bytes: config.server.max_tool_result_bytes,
            shutdown,
        }))
    }

    /// Stops every server (children are killed; HTTP sessions closed).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    fn server(&self, name: &str) -> Option<&Arc<Server>> {
        let prefix = mcp_server_of(name)?;
        self.servers.iter().find(|s| s.name() == prefix)
    }
}

impl Drop for McpHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[async_trait]
impl ExternalTools for McpHub {
    fn tools(&self) -> Arc<Vec<ExternalTool>> {
        let mut out = Vec::new();
        for s in &self.servers {
            let listed = s.live().tools.clone();
            out.extend(listed.iter().map(|t| t.tool.clone()));
        }
        Arc::new(out)
    }

    async fn call(&self, name: &str, args: &Value, cancel: &CancellationToken) -> ToolOutput {
        match self.server(name) {
            Some(s) => {
                s.call(
                    name,
                    args,
                    cancel,
                    self.max_result_bytes,
                    self.max_image_bytes,
                )
                .await
            }
            None => ToolOutput::err(format!("no MCP server serves `{name}`")),
        }
    }

    fn status(&self) -> Vec<McpServerStatus> {
        self.servers.iter().map(|s| s.status()).collect()
    }

    async fn settled(&self) {
        for s in &self.servers {
            let mut rx = s.settled.subscribe();
            // The supervisor bounds the first start by startup_timeout_s; this bound only guards against a
            // supervisor that is gone.
            let limit = Duration::from_secs(s.settings.startup_timeout_s + 5);
            let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
        }
    }
}
