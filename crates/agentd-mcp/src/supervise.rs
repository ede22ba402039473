//! One server's life: start, list, serve, notice its end, start again after a back-off.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::config::McpTransport;
use agentd_core::provider::ToolSpec;
use agentd_core::registry::{mcp_tool_name, ExternalTool, MAX_TOOL_NAME};
use rmcp::model::{ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::{NotificationContext, Peer, RoleClient, RunningService};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ServiceExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Listed, Server, State, MAX_MESSAGE_BYTES};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A server up this long starts its next back-off from the beginning.
const STABLE: Duration = Duration::from_secs(30);
/// How long a server that had a call time out gets to answer `tools/list` before it counts as hung.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The client side's handler: tells the supervisor when the server's tool list changed.
#[derive(Clone)]
struct Handler {
    changed: mpsc::Sender<()>,
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("agentd", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        // One pending signal is enough: the list is read whole.
        let _ = self.changed.try_send(());
    }
}

/// Kills a stdio server's whole process group when dropped (npx and the like start the server as a child of
/// their own).
struct ChildGuard {
    child: tokio::process::Child,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.start_kill();
    }
}

/// A started server.
struct Conn {
    service: RunningService<RoleClient, Handler>,
    changed: mpsc::Receiver<()>,
    child: Option<ChildGuard>,
}

/// Runs `server` until `shutdown`.
pub(crate) async fn supervise(server: Arc<Server>, shutdown: CancellationToken) {
    let name = server.name().to_string();
    let startup = Duration::from_secs(server.settings.startup_timeout_s);
    let mut backoff = FIRST_BACKOFF;
    let mut first = true;
    loop {
        if !first {
            server.live().restarts += 1;
            server
                .metrics
                .mcp_restarts
                .with_label_values(&[&name])
                .inc();
        }
        first = false;
        let started = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(startup, start(&server)) => r,
        };
        if !matches!(started, Ok(Ok(_))) {
            // Ready marks it inside `start`; a failed first start settles here.
            server.settled.send_replace(true);
        }
        let ended = match started {
            Ok(Ok(conn)) => {
                let up = Instant::now();
                let reason = serve(&server, conn, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                if up.elapsed() >= STABLE {
                    backoff = FIRST_BACKOFF;
                }
                server.set_state(State::Restarting, Some(reason.clone()));
                reason
            }
            Ok(Err(e)) => {
                server.set_state(State::Failed, Some(e.clone()));
                e
            }
            Err(_) => {
                let e = format!(
                    "did not start within startup_timeout_s = {}",
                    startup.as_secs()
                );
                server.set_state(State::Failed, Some(e.clone()));
                e
            }
        };
        tracing::warn!(mcp_server = %name, error = %ended, "MCP server `{name}` is down: {ended}; starting it again in {} s", backoff.as_secs());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Spawns or connects, `initialize`, first `tools/list`. The caller bounds it by `startup_timeout_s`; a
/// future dropped half way kills the child.
async fn start(server: &Server) -> Result<Conn, String> {
    let (tx, changed) = mpsc::channel(1);
    let handler = Handler { changed: tx };
    let (service, child) = match &server.settings.transport {
        McpTransport::Stdio { command, args, env } => {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(args)
                .envs(env)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            #[cfg(unix)]
            cmd.process_group(0);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start `{command}`: {e}"))?;
            let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
                return Err("the child's stdin or stdout is missing".into());
            };
            if let Some(err) = child.stderr.take() {
                tokio::spawn(crate::stderr::forward(server.name().to_string(), err));
            }
            let guard = ChildGuard { child };
            let transport =
                AsyncRwTransport::new_client(stdout, stdin).with_max_line_length(MAX_MESSAGE_BYTES);
            let service = handler
                .serve(transport)
                .await
                .map_err(|e| format!("initialize failed: {}", crate::chain(&e)))?;
            (service, Some(guard))
        }
        McpTransport::Http { url, headers } => {
            let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                .max_sse_event_size(MAX_MESSAGE_BYTES);
            config.max_json_response_size = MAX_MESSAGE_BYTES;
            let mut custom = HashMap::new();
            for (k, v) in headers {
                if k.eq_ignore_ascii_case("authorization") {
                    config = config.auth_header(v.strip_prefix("Bearer ").unwrap_or(v));
                    continue;
                }
                let name = http::HeaderName::try_from(k.as_str())
                    .map_err(|e| format!("header `{k}`: {e}"))?;
                let value = http::HeaderValue::try_from(v.as_str())
                    .map_err(|e| format!("header `{k}`: {e}"))?;
                custom.insert(name, value);
            }
            let transport =
                StreamableHttpClientTransport::from_config(config.custom_headers(custom));
            let service = handler
                .serve(transport)
                .await
                .map_err(|e| format!("cannot connect to {url}: {}", crate::chain(&e)))?;
            (service, None)
        }
    };
    let conn = Conn {
        service,
        changed,
        child,
    };
    let tools = list(server, conn.service.peer()).await?;
    let version = conn
        .service
        .peer()
        .peer_info()
        .map(|i| i.protocol_version.to_string());
    {
        let mut live = server.live();
        live.tools = Arc::new(tools);
        live.peer = Some(conn.service.peer().clone());
        live.protocol_version = version;
        live.last_error = None;
    }
    server.set_state(State::Ready, None);
    server.settled.send_replace(true);
    let n = server.live().tools.len();
    tracing::info!(mcp_server = %server.name(), tools = n, "MCP server `{}` is ready with {n} tools", server.name());
    Ok(conn)
}

/// Reads the server's tools (all pages) and names them `SERVER__TOOL`.
async fn list(server: &Server, peer: &Peer<RoleClient>) -> Result<Vec<Listed>, String> {
    let tools = peer
        .list_all_tools()
        .await
        .map_err(|e| format!("tools/list failed: {}", crate::chain(&e)))?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(tools.len());
    for t in tools {
        let mut name = mcp_tool_name(server.name(), &t.name);
        if !seen.insert(name.clone()) {
            // Two names that sanitise or cap to the same: the later one gets a number.
            let mut i = 2;
            loop {
                let suffix = format!("_{i}");
                let mut cut = name.clone();
                cut.truncate(MAX_TOOL_NAME - suffix.len());
                let candidate = format!("{cut}{suffix}");
                if seen.insert(candidate.clone()) {
                    name = candidate;
                    break;
                }
                i += 1;
            }
        }
        let hints = t.annotations.as_ref();
        let repeatable = hints
            .is_some_and(|a| a.read_only_hint == Some(true) || a.idempotent_hint == Some(true));
        let description = t
            .description
            .as_deref()
            .map(str::to_string)
            .or_else(|| t.title.clone())
            .unwrap_or_default();
        out.push(Listed {
            original: t.name.to_string(),
            tool: ExternalTool {
                name: name.clone(),
                server: server.name().to_string(),
                spec: ToolSpec {
                    name,
                    description,
                    parameters: Value::Object((*t.input_schema).clone()),
                },
                repeatable,
            },
        });
    }
    Ok(out)
}

/// A stdio server's exit (never, for an HTTP server).
async fn exited(child: &mut Option<ChildGuard>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(g) => g.child.wait().await,
        None => std::future::pending().await,
    }
}

/// Serves a started server until it ends; returns why.
async fn serve(server: &Server, conn: Conn, shutdown: &CancellationToken) -> String {
    let Conn {
        service,
        mut changed,
        mut child,
    } = conn;
    let peer = service.peer().clone();
    let stop = service.cancellation_token();
    let mut quit = tokio::spawn(service.waiting());
    let startup = Duration::from_secs(server.settings.startup_timeout_s);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                stop.cancel();
                return "shut down".into();
            }
            status = exited(&mut child) => {
                return match status {
                    Ok(s) => format!("the process exited ({s})"),
                    Err(e) => format!("the process is gone: {e}"),
                };
            }
            _ = &mut quit => {
                // The connection ended; a stdio server's exit status says more, when it comes soon.
                if child.is_some() {
                    if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), exited(&mut child)).await {
                        return format!("the process exited ({s})");
                    }
                }
                return "the connection closed".into();
            }
            Some(()) = changed.recv() => {
                match tokio::time::timeout(startup, list(server, &peer)).await {
                    Ok(Ok(tools)) => {
                        let n = tools.len();
                        server.live().tools = Arc::new(tools);
                        tracing::info!(mcp_server = %server.name(), tools = n, "MCP server `{}` changed its tools: {n} now", server.name());
                    }
                    Ok(Err(e)) => tracing::warn!(mcp_server = %server.name(), error = %e, "listing the changed tools failed"),
                    Err(_) => return "did not answer tools/list after notifications/tools/list_changed".into(),
                }
            }
            _ = server.suspect.notified() => {
                match tokio::time::timeout(HEALTH_TIMEOUT, peer.list_all_tools()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        stop.cancel();
                        return format!("the connection failed: {}", crate::chain(&e));
                    }
                    Err(_) => {
                        stop.cancel();
                        return format!(
                            "stopped answering (a call timed out, then tools/list got no answer within {} s)",
                            HEALTH_TIMEOUT.as_secs()
                        );
                    }
                }
            }
        }
    }
}
