//! The one tool registry: built-in tools, subagents and MCP tools come from here. The config validator asks it
//! which names an agent may list ([`check_tool_name`]), the agent loop which tools a turn offers and how to run
//! a call ([`ToolRegistry::for_turn`]), and `GET /v1/agents` what an agent's list expands to
//! ([`ToolRegistry::agent_tools`]).
//!
//! MCP tools are named `SERVER__TOOL` (SPEC.md section 7). Their servers live outside the core (the
//! `agentd-mcp` crate implements [`ExternalTools`]); a tool list that changes at run time is read afresh for
//! every model call, so a server's new tools are offered from the next step on.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentSettings, Config};
use crate::provider::ToolSpec;
use crate::tools::{self, Tool, ToolContext, ToolOutput};

/// What separates an MCP server's name from its tool's: `files__read_text_file`.
pub const MCP_SEPARATOR: &str = "__";

/// The longest tool name (OpenAI's function-name limit).
pub const MAX_TOOL_NAME: usize = 64;

/// Built-in tools whose call may be made again after a crash: reading only (and `ask_human`, whose pending
/// question keeps waiting under its request id).
const SAFE_TO_REPEAT: [&str; 5] = [
    "calculator",
    "current_time",
    "read_file",
    "list_files",
    "ask_human",
];

/// One tool of an MCP server, as listed now.
#[derive(Clone, Debug)]
pub struct ExternalTool {
    /// `SERVER__TOOL`, sanitised and capped.
    pub name: String,
    pub server: String,
    pub spec: ToolSpec,
    /// Annotated `readOnlyHint` or `idempotentHint`: safe to run again on recovery.
    pub repeatable: bool,
}

/// Tools served from outside the process: MCP servers, supervised by `agentd-mcp`.
#[async_trait]
pub trait ExternalTools: Send + Sync {
    /// Every tool listed now, of every server that is ready.
    fn tools(&self) -> Arc<Vec<ExternalTool>>;
    /// Runs `name` (`SERVER__TOOL`) with `args`. Never panics and never waits past the server's timeout; a
    /// server that is not ready fails the call at once, naming itself and why. `cancel` ends the call (and
    /// tells the server, `notifications/cancelled`).
    async fn call(&self, name: &str, args: &Value, cancel: &CancellationToken) -> ToolOutput;
    /// Each server's state for `GET /v1/mcp`.
    fn status(&self) -> Vec<McpServerStatus>;
    /// Resolves once every server's first start has ended (ready or failed; each bounded by its
    /// `startup_timeout_s`): a run resumed at start-up waits for it before it judges its in-flight calls.
    async fn settled(&self) {}
}

/// One MCP server as `GET /v1/mcp` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct McpServerStatus {
    pub name: String,
    /// `stdio` or `http`.
    pub transport: &'static str,
    /// `starting`, `ready`, `restarting` or `failed`.
    pub state: &'static str,
    pub last_error: Option<String>,
    /// The protocol version the server agreed to, once connected.
    pub protocol_version: Option<String>,
    /// Times the server was (re)started after the first start.
    pub restarts: u64,
    /// Tool names as agents see them (`SERVER__TOOL`).
    pub tools: Vec<String>,
    pub calls: McpCallCounts,
}

/// A server's tool calls since the process started.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct McpCallCounts {
    pub total: u64,
    pub ok: u64,
    /// The server answered with an error result, or the call failed on the way (transport, not ready).
    pub error: u64,
    pub timeout: u64,
    pub cancelled: u64,
}

/// The server part of `SERVER__TOOL` (None: not an MCP tool's name).
pub fn mcp_server_of(name: &str) -> Option<&str> {
    name.split_once(MCP_SEPARATOR)
        .map(|(server, _)| server)
        .filter(|s| !s.is_empty())
}

/// A tool name as agents see it: `SERVER__TOOL` with every character outside `[A-Za-z0-9_-]` replaced by
/// `_`, at most [`MAX_TOOL_NAME`] bytes.
pub fn mcp_tool_name(server: &str, tool: &str) -> String {
    let mut name: String = format!("{server}{MCP_SEPARATOR}{tool}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(MAX_TOOL_NAME);
    name
}

/// Glob match with `*` (any run of characters) and `?` (one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether an agent's (or skill's) `tools` entry names something: a built-in, or `SERVER__TOOL` /
/// `SERVER__*` (a glob after the separator) of a configured MCP server. Err: why not.
pub fn check_tool_name(name: &str, mcp_servers: &[&str]) -> Result<(), String> {
    if tools::BUILTIN_TOOLS.contains(&name) {
        return Ok(());
    }
    if let Some(server) = mcp_server_of(name) {
        if !mcp_servers.contains(&server) {
            return Err(format!(
                "unknown MCP server `{server}` in `{name}` (configured: {})",
                if mcp_servers.is_empty() {
                    "none".to_string()
                } else {
                    mcp_servers.join(", ")
                }
            ));
        }
        if name.len() == server.len() + MCP_SEPARATOR.len() {
            return Err(format!(
                "`{name}` names no tool (`{server}__*` is all of them)"
            ));
        }
        return Ok(());
    }
    Err(format!(
        "unknown tool `{name}` (built-in: {}; MCP tools are SERVER__TOOL; subagents go in `subagents`)",
        tools::BUILTIN_TOOLS.join(", ")
    ))
}

/// How a turn runs one of its tools.
#[derive(Clone)]
pub enum TurnTool {
    /// A built-in or an MCP tool.
    Tool(Arc<dyn Tool>),
    /// Another agent, run as a nested loop by the agent loop.
    Subagent,
}

/// The tools one model call offers, and how to run each.
pub struct TurnTools {
    pub specs: Vec<ToolSpec>,
    by_name: HashMap<String, TurnTool>,
    /// Names a configured MCP server would serve but does not list now (it is down): their calls go to the
    /// server anyway, which fails them at once naming itself.
    external: Option<Arc<dyn ExternalTools>>,
    patterns: Vec<String>,
}

impl TurnTools {
    /// Adds the function tools a client runs itself (OpenAI-compatible surfaces): offered to the model, never
    /// dispatched here (the loop ends the turn with their calls).
    pub fn with_client_tools(mut self, client_tools: &[ToolSpec]) -> TurnTools {
        self.specs.extend(client_tools.iter().cloned());
        self
    }

    pub fn get(&self, name: &str) -> Option<TurnTool> {
        if let Some(t) = self.by_name.get(name) {
            return Some(t.clone());
        }
        let external = self.external.as_ref()?;
        mcp_server_of(name)?;
        self.patterns
            .iter()
            .any(|p| mcp_server_of(p).is_some() && glob_match(p, name))
            .then(|| {
                TurnTool::Tool(Arc::new(McpTool {
                    spec: ToolSpec {
                        name: name.to_string(),
                        description: String::new(),
                        parameters: json!({"type": "object"}),
                    },
                    external: external.clone(),
                }))
            })
    }

    /// Whether `name` is one of this turn's configured tools (metric labels: never the model's made-up text).
    pub fn knows(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

/// An MCP tool behind the [`Tool`] trait.
struct McpTool {
    spec: ToolSpec,
    external: Arc<dyn ExternalTools>,
}

#[async_trait]
impl Tool for McpTool {
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }
    async fn call(&self, args: &Value, ctx: &ToolContext) -> ToolOutput {
        self.external.call(&self.spec.name, args, &ctx.cancel).await
    }
}

/// Built-in tools, subagents and the MCP servers' tools.
#[derive(Clone)]
pub struct ToolRegistry {
    config: Arc<Config>,
    external: Option<Arc<dyn ExternalTools>>,
}

impl ToolRegistry {
    pub fn new(config: Arc<Config>, external: Option<Arc<dyn ExternalTools>>) -> ToolRegistry {
        ToolRegistry { config, external }
    }

    /// The MCP servers, if any are configured.
    pub fn external(&self) -> Option<&Arc<dyn ExternalTools>> {
        self.external.as_ref()
    }

    fn listed(&self) -> Arc<Vec<ExternalTool>> {
        self.external
            .as_ref()
            .map(|e| e.tools())
            .unwrap_or_default()
    }

    /// What an agent's (or skill's) `tools` list names now: built-ins in their order, then the MCP tools its
    /// entries match. A name listed twice is offered once.
    fn expand(&self, patterns: &[String]) -> Vec<(String, TurnTool)> {
        let listed = self.listed();
        let mut out: Vec<(String, TurnTool)> = Vec::new();
        for p in patterns {
            if let Some(t) = tools::builtin(p) {
                if !out.iter().any(|(n, _)| n == p) {
                    out.push((p.clone(), TurnTool::Tool(t)));
                }
                continue;
            }
            if mcp_server_of(p).is_none() {
                continue;
            }
            for t in listed.iter().filter(|t| glob_match(p, &t.name)) {
                if out.iter().any(|(n, _)| n == &t.name) {
                    continue;
                }
                if let Some(external) = &self.external {
                    let tool: Arc<dyn Tool> = Arc::new(McpTool {
                        spec: t.spec.clone(),
                        external: external.clone(),
                    });
                    out.push((t.name.clone(), TurnTool::Tool(tool)));
                }
            }
        }
        out
    }

    /// The tools of one model call: `tools` (built-ins and MCP patterns) and, when `with_subagents`, one tool
    /// per subagent.
    pub fn for_turn(
        &self,
        tool_list: &[String],
        subagents: &[String],
        with_subagents: bool,
    ) -> TurnTools {
        let mut specs = Vec::new();
        let mut by_name = HashMap::new();
        for (name, tool) in self.expand(tool_list) {
            if let TurnTool::Tool(t) = &tool {
                specs.push(t.spec());
            }
            by_name.insert(name, tool);
        }
        if with_subagents {
            for name in subagents {
                if by_name.contains_key(name) {
                    continue;
                }
                let description = self
                    .config
                    .agent(name)
                    .map(|a| a.description.clone())
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| format!("Delegate a task to the `{name}` agent."));
                specs.push(ToolSpec {
                    name: name.clone(),
                    description,
                    parameters: json!({
                        "type": "object",
                        "properties": {"task": {"type": "string", "description": "what the agent should do"}},
                        "required": ["task"]
                    }),
                });
                by_name.insert(name.clone(), TurnTool::Subagent);
            }
        }
        TurnTools {
            specs,
            by_name,
            external: self.external.clone(),
            patterns: tool_list.to_vec(),
        }
    }

    /// An agent's tools as `GET /v1/agents` lists them: built-ins and the MCP tools listed now; an MCP pattern
    /// that matches nothing now (its server is down) stays as written.
    pub fn agent_tools(&self, agent: &AgentSettings) -> Vec<String> {
        let mut names: Vec<String> = self
            .expand(&agent.tools)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let listed = self.listed();
        for p in &agent.tools {
            if mcp_server_of(p).is_some() && !listed.iter().any(|t| glob_match(p, &t.name)) {
                names.push(p.clone());
            }
        }
        names
    }

    /// Whether a call of `name` that was in flight when its process died may run again: read-only built-ins,
    /// MCP tools annotated read-only or idempotent, and the agent's `retry_tools` (globs).
    pub fn safe_to_repeat(&self, agent: &AgentSettings, name: &str) -> bool {
        SAFE_TO_REPEAT.contains(&name)
            || agent.retry_tools.iter().any(|p| glob_match(p, name))
            || self.listed().iter().any(|t| t.name == name && t.repeatable)
    }

    /// Whether a call of `name` waits for a person's approval first (the agent's `approve` globs).
    pub fn needs_approval(agent: &AgentSettings, name: &str) -> bool {
        Self::approval_needed(&agent.approve, name)
    }

    /// [`ToolRegistry::needs_approval`] given the agent's `approve` globs alone (what a renderer keeps).
    pub fn approval_needed(approve: &[String], name: &str) -> bool {
        approve.iter().any(|p| glob_match(p, name))
    }

    /// Once every MCP server's first start has ended (at once without servers).
    pub async fn settled(&self) {
        if let Some(e) = &self.external {
            e.settled().await;
        }
    }

    /// Each MCP server's state (empty without servers).
    pub fn mcp_status(&self) -> Vec<McpServerStatus> {
        self.external
            .as_ref()
            .map(|e| e.status())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("files__*", "files__read_text_file"));
        assert!(glob_match("files__write_*", "files__write_file"));
        assert!(!glob_match("files__write_*", "files__read_file"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("calculator", "calculator"));
        assert!(!glob_match("calc", "calculator"));
        assert!(glob_match("*__*", "x__y"));
    }

    #[test]
    fn names_are_sanitised_and_capped() {
        assert_eq!(
            mcp_tool_name("files", "read.text file"),
            "files__read_text_file"
        );
        let long = mcp_tool_name("s", &"x".repeat(100));
        assert_eq!(long.len(), MAX_TOOL_NAME);
        assert_eq!(mcp_server_of("files__x"), Some("files"));
        assert_eq!(mcp_server_of("calculator"), None);
        assert_eq!(mcp_server_of("__x"), None);
    }

    #[test]
    fn tool_names_are_checked_against_the_servers() {
        assert!(check_tool_name("calculator", &[]).is_ok());
        assert!(check_tool_name("files__read", &["files"]).is_ok());
        assert!(check_tool_name("files__*", &["files"]).is_ok());
        let e = check_tool_name("other__read", &["files"]).unwrap_err();
        assert!(e.contains("unknown MCP server `other`"), "{e}");
        assert!(check_tool_name("files__", &["files"]).is_err());
        assert!(check_tool_name("nope", &["files"]).is_err());
    }
}
