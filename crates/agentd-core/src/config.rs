//! The TOML configuration (SPEC.md section 2): parsed once into raw structs that reject unknown keys, then
//! validated into [`Config`]. Every problem names its key and, where the parser knows it, its line.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use crate::registry::{self, MCP_SEPARATOR};
use crate::tools::BUILTIN_TOOLS;

/// The smallest `server.max_tool_result_bytes`: room for a useful head of a result and the note after it.
pub const MIN_TOOL_RESULT_BYTES: usize = 1024;
/// The most turns a `llama` provider decodes together (`parallel`).
pub const MAX_PARALLEL: u32 = 64;

/// The configuration `agentd serve` runs with no `--config`: SPEC.md section 1.
pub const DEFAULT_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:8080"

[store]
url = "sqlite://data/agentd.db"

[providers.local]
kind = "llama"
model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
context_tokens = 4096
threads = 2

[[agents]]
name = "assistant"
description = "General helper on the embedded local model"
provider = "local"
model = "SmolLM2-135M-Instruct"
system_prompt = "You are a helpful assistant. Answer briefly."
tools = ["calculator", "current_time", "ask_human"]
"#;

/// One configuration problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key, as a path: `agents[1].provider`.
    pub key: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// All problems found in one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {p}", self.source_name)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------- raw (as written) ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    providers: BTreeMap<String, Spanned<RawProvider>>,
    #[serde(default)]
    agents: Vec<Spanned<RawAgent>>,
    #[serde(default)]
    skills: Vec<Spanned<RawSkill>>,
    #[serde(default)]
    mcp_servers: BTreeMap<String, Spanned<RawMcpServer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcpServer {
    command: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    url: Option<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    timeout_s: Option<Spanned<u64>>,
    startup_timeout_s: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    metrics_public: Option<bool>,
    max_message_bytes: Option<usize>,
    max_upload_bytes: Option<usize>,
    max_image_bytes: Option<usize>,
    max_tool_result_bytes: Option<usize>,
    shutdown_grace_s: Option<u64>,
    recovery: Option<Spanned<String>>,
    max_resumes: Option<u32>,
    ask_human_timeout_s: Option<u64>,
    workspace_dir: Option<String>,
    max_subagent_depth: Option<u32>,
    event_retention_runs: Option<usize>,
    rate_limit_per_min: Option<Spanned<u32>>,
    max_streams_per_principal: Option<Spanned<u32>>,
    header_timeout_s: Option<Spanned<u64>>,
    max_connections: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    node_id: Option<Spanned<String>>,
    lease_s: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    keys: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    principal: String,
    key: Option<String>,
    key_env: Option<Spanned<String>>,
    #[serde(default)]
    admin: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: Spanned<String>,
    // openai
    base_url: Option<String>,
    api_key_env: Option<Spanned<String>>,
    timeout_s: Option<u64>,
    // llama
    model_path: Option<String>,
    threads: Option<u32>,
    parallel: Option<u32>,
    // both
    context_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    provider: Spanned<String>,
    model: String,
    #[serde(default)]
    system_prompt: String,
    #[serde(default)]
    tools: Vec<Spanned<String>>,
    max_iterations: Option<Spanned<u32>>,
    max_context_tokens: Option<u64>,
    compress_at: Option<Spanned<f64>>,
    multitask: Option<Spanned<String>>,
    #[serde(default)]
    skills: Vec<Spanned<String>>,
    #[serde(default)]
    subagents: Vec<Spanned<String>>,
    #[serde(default)]
    retry_tools: Vec<String>,
    #[serde(default)]
    approve: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSkill {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    system_prompt: String,
    tools: Option<Vec<Spanned<String>>>,
    provider: Option<Spanned<String>>,
    model: Option<String>,
}

// ---------------------------------------------------------------- validated ----

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub server: ServerSettings,
    /// `sqlite://path`, a bare path, or `postgres://...`.
    pub store_url: String,
    /// `store.max_connections`: the most database connections a postgres store opens (default 16, 1..=1000).
    pub store_max_connections: usize,
    /// `[cluster]` (SPEC.md section 6).
    pub cluster: ClusterSettings,
    /// Empty means no auth.
    pub auth_keys: Vec<ApiKey>,
    pub providers: BTreeMap<String, ProviderSettings>,
    pub agents: Vec<AgentSettings>,
    pub skills: Vec<SkillSettings>,
    /// `[mcp_servers.NAME]` (SPEC.md section 7), by name.
    pub mcp_servers: Vec<McpServerSettings>,
}

/// One MCP server: how to reach it and how long to wait for it. `${VAR}` references are already expanded.
#[derive(Clone, PartialEq)]
pub struct McpServerSettings {
    pub name: String,
    pub transport: McpTransport,
    /// One call; then it is cancelled (`notifications/cancelled`) and fails.
    pub timeout_s: u64,
    /// Start-up (spawn or connect, `initialize`, the first `tools/list`).
    pub startup_timeout_s: u64,
}

#[derive(Clone, PartialEq)]
pub enum McpTransport {
    /// A child process speaking over its stdin and stdout.
    Stdio {
        command: String,
        args: Vec<String>,
        env: BTreeMap<String, String>,
    },
    /// Streamable HTTP.
    Http {
        url: String,
        headers: BTreeMap<String, String>,
    },
}

impl McpTransport {
    pub fn kind(&self) -> &'static str {
        match self {
            McpTransport::Stdio { .. } => "stdio",
            McpTransport::Http { .. } => "http",
        }
    }
}

impl fmt::Debug for McpServerSettings {
    // Environment values and headers may hold secrets: only their names reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("McpServerSettings");
        d.field("name", &self.name);
        match &self.transport {
            McpTransport::Stdio { command, args, env } => d
                .field("command", command)
                .field("args", args)
                .field("env", &env.keys().collect::<Vec<_>>()),
            McpTransport::Http { url, headers } => d
                .field("url", url)
                .field("headers", &headers.keys().collect::<Vec<_>>()),
        };
        d.field("timeout_s", &self.timeout_s)
            .field("startup_timeout_s", &self.startup_timeout_s)
            .finish()
    }
}

/// `[cluster]`: this node's name and the lease on the runs it executes.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSettings {
    /// None: `hostname:port` of the address the server listens on.
    pub node_id: Option<String>,
    /// Within this long a lost node's runs go on elsewhere (2..=300); see [`ClusterSettings::lapse`].
    pub lease_s: u64,
}

impl ClusterSettings {
    /// How often a node renews its presence in the registry: every sixth of the lease.
    pub fn renew_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_s) / 6
    }

    /// A node whose last renewal is this old is lost (half the lease: two renewals missed in a row, so a
    /// renewal may come a third of the lease late before its node is fenced). The other half of the lease is
    /// for noticing it ([`ClusterSettings::sweep_every`]) and resuming its runs, so they go on within `lease_s`.
    pub fn lapse(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_s) / 2
    }

    /// How often every node looks for lost nodes' runs: every sixth of the lease.
    pub fn sweep_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_s) / 6
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    pub listen: String,
    /// `GET /metrics` without an API key (default false: auth as the API).
    pub metrics_public: bool,
    pub max_message_bytes: usize,
    pub max_upload_bytes: usize,
    /// One image, decoded.
    pub max_image_bytes: usize,
    /// A tool result longer than this is cut (with a note) before the model or a client sees it; the whole
    /// result is kept as an upload of the session.
    pub max_tool_result_bytes: usize,
    pub shutdown_grace_s: u64,
    /// What becomes of a run a dead process left unfinished (SPEC.md section 4, recovery).
    pub recovery: Recovery,
    /// A run resumed this many times ends `interrupted` at its next recovery instead.
    pub max_resumes: u32,
    /// How long an `ask_human` waits for a reply before the tool fails.
    pub ask_human_timeout_s: u64,
    /// Root of the per-session workspaces (uploads, file tools).
    pub workspace_dir: String,
    pub max_subagent_depth: u32,
    /// The log keeps the events of at least this many latest runs per session.
    pub event_retention_runs: usize,
    /// Messages a principal may send in any 60 s, on every surface; None: no limit.
    pub rate_limit_per_min: Option<u32>,
    /// WebSockets + SSE streams a principal may hold open at once, on every surface; None: no limit.
    pub max_streams_per_principal: Option<u32>,
    /// A connection must send a request's headers within this, and its body may not stall as long; an idle
    /// keep-alive connection is closed after it too.
    pub header_timeout_s: u64,
    /// Open connections the server accepts at once; None: nine tenths of the open-file limit (decided at
    /// start-up by the server).
    pub max_connections: Option<usize>,
}

#[derive(Clone, PartialEq)]
pub struct ApiKey {
    pub principal: String,
    pub key: String,
    pub admin: bool,
}

impl fmt::Debug for ApiKey {
    // Keys never reach logs, not even through Debug.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("principal", &self.principal)
            .field("key", &"<redacted>")
            .field("admin", &self.admin)
            .finish()
    }
}

#[derive(Clone, PartialEq)]
pub enum ProviderSettings {
    OpenAi {
        base_url: String,
        api_key: Option<String>,
        timeout_s: u64,
        context_tokens: Option<u64>,
    },
    Llama {
        model_path: String,
        /// Per turn.
        context_tokens: u64,
        threads: u32,
        /// Turns decoded together (the context's sequences).
        parallel: u32,
    },
}

impl fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderSettings::OpenAi {
                base_url,
                api_key,
                timeout_s,
                context_tokens,
            } => f
                .debug_struct("OpenAi")
                .field("base_url", base_url)
                .field("api_key", &api_key.as_ref().map(|_| "<redacted>"))
                .field("timeout_s", timeout_s)
                .field("context_tokens", context_tokens)
                .finish(),
            ProviderSettings::Llama {
                model_path,
                context_tokens,
                threads,
                parallel,
            } => f
                .debug_struct("Llama")
                .field("model_path", model_path)
                .field("context_tokens", context_tokens)
                .field("threads", threads)
                .field("parallel", parallel)
                .finish(),
        }
    }
}

impl ProviderSettings {
    pub fn context_tokens(&self) -> Option<u64> {
        match self {
            ProviderSettings::OpenAi { context_tokens, .. } => *context_tokens,
            ProviderSettings::Llama { context_tokens, .. } => Some(*context_tokens),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Multitask {
    Reject,
    Enqueue,
    Interrupt,
}

impl Multitask {
    pub fn parse(s: &str) -> Option<Multitask> {
        match s {
            "reject" => Some(Multitask::Reject),
            "enqueue" => Some(Multitask::Enqueue),
            "interrupt" => Some(Multitask::Interrupt),
            _ => None,
        }
    }
}

/// `server.recovery`: a run left unfinished goes on from its last durable step, or ends `interrupted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    Resume,
    Interrupt,
}

impl Recovery {
    pub fn parse(s: &str) -> Option<Recovery> {
        match s {
            "resume" => Some(Recovery::Resume),
            "interrupt" => Some(Recovery::Interrupt),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    pub name: String,
    pub description: String,
    pub provider: String,
    pub model: String,
    pub system_prompt: String,
    pub tools: Vec<String>,
    pub max_iterations: u32,
    pub max_context_tokens: u64,
    pub compress_at: f64,
    pub multitask: Multitask,
    pub skills: Vec<String>,
    pub subagents: Vec<String>,
    /// Tools besides the built-in read-only ones that a resumed run may call again when their call was in
    /// flight (their effect is safe to repeat). Globs.
    pub retry_tools: Vec<String>,
    /// Calls of tools matching these globs wait for a person's approval first (SPEC.md section 7).
    pub approve: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SkillSettings {
    pub name: String,
    pub description: String,
    pub keywords: Vec<String>,
    pub system_prompt: String,
    /// None: the agent's tools.
    pub tools: Option<Vec<String>>,
    pub provider: Option<String>,
    pub model: Option<String>,
}

impl Config {
    /// Parses and validates a config file's text. `source_name` is used in messages (usually the path).
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        Self::parse_with_env(text, source_name, &|k| std::env::var(k).ok())
    }

    /// The built-in default (SPEC.md section 1).
    pub fn builtin_default() -> Config {
        // The constant is tested below; a failure here is a build defect, not input.
        Self::parse(DEFAULT_CONFIG, "<built-in default>").unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn agent(&self, name: &str) -> Option<&AgentSettings> {
        self.agents.iter().find(|a| a.name == name)
    }

    pub fn skill(&self, name: &str) -> Option<&SkillSettings> {
        self.skills.iter().find(|s| s.name == name)
    }

    pub fn mcp_server(&self, name: &str) -> Option<&McpServerSettings> {
        self.mcp_servers.iter().find(|s| s.name == name)
    }

    /// Like [`Config::parse`], reading `*_env` keys through `env` (tests pass their own). An unset variable is
    /// an error here: a server cannot start without it.
    pub fn parse_with_env(
        text: &str,
        source_name: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (config, mut problems, environment) = Self::examine(text, source_name, env)?;
        if problems.is_empty() && environment.is_empty() {
            return Ok(config);
        }
        problems.extend(environment);
        Err(ConfigError {
            source_name: source_name.to_string(),
            problems,
        })
    }

    /// Judges the file, not the environment (`agentd check-config`): problems of the file are the error; an
    /// unset `*_env` variable is only reported in [`Checked::environment`], since the file is right and the
    /// server it is meant for may well have the variable.
    pub fn check(text: &str, source_name: &str) -> Result<Checked, ConfigError> {
        Self::check_with_env(text, source_name, &|k| std::env::var(k).ok())
    }

    /// [`Config::check`] reading the environment through `env`.
    pub fn check_with_env(
        text: &str,
        source_name: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Checked, ConfigError> {
        let (config, problems, environment) = Self::examine(text, source_name, env)?;
        if problems.is_empty() {
            Ok(Checked {
                config,
                environment,
            })
        } else {
            Err(ConfigError {
                source_name: source_name.to_string(),
                problems,
            })
        }
    }

    /// Parses and validates: the config, the file's problems, the environment's. A file TOML or serde cannot
    /// read at all is the error.
    #[allow(clippy::type_complexity)]
    fn examine(
        text: &str,
        source_name: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Config, Vec<ConfigProblem>, Vec<ConfigProblem>), ConfigError> {
        let lines = LineIndex::new(text);
        let raw: RawConfig = match serde_path_to_error::deserialize(toml::Deserializer::new(text)) {
            Ok(raw) => raw,
            Err(e) => {
                let key = key_of(e.path(), e.inner().message());
                let inner = e.into_inner();
                return Err(ConfigError {
                    source_name: source_name.to_string(),
                    problems: vec![ConfigProblem {
                        key,
                        line: inner.span().map(|s| lines.line(s.start)),
                        message: with_suggestion(inner.message().trim()),
                    }],
                });
            }
        };
        let mut v = Validator {
            lines: &lines,
            problems: Vec::new(),
            environment: Vec::new(),
        };
        let config = v.validate(raw, env);
        Ok((config, v.problems, v.environment))
    }
}

/// A file without problems, and what the environment lacks to run it.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The config; a key whose variable is unset is left out (`auth_keys`) or empty (`api_key`).
    pub config: Config,
    /// Unset `*_env` variables, each with its key and line: `serve` refuses to start with any.
    pub environment: Vec<ConfigProblem>,
}

/// The key a deserialisation error is about, as a path like `agents[0].max_iterations`: serde's path to the
/// value, without the wrappers that only record positions, plus the field an "unknown field" or "missing field"
/// message names (serde reports those at the table that holds them).
fn key_of(path: &serde_path_to_error::Path, message: &str) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: k } | Segment::Enum { variant: k } => {
                if k.starts_with("$__serde_spanned_private") {
                    continue;
                }
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
            }
            Segment::Unknown => {}
        }
    }
    if let Some(field) = named_field(message) {
        let already = key == field || key.ends_with(&format!(".{field}"));
        if !already {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(&field);
        }
    }
    if key.is_empty() {
        // A syntax error, before any key: the file as a whole.
        key.push_str("config");
    }
    key
}

/// The field in serde's "unknown field `x`, expected ..." or "missing field `x`".
fn named_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

/// `server.listen` (and `--listen`): a socket address, or a host name and a port (resolved when binding).
fn listen_is_valid(listen: &str) -> bool {
    if listen.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok()
        && !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// serde's "unknown field `lisen`, expected one of `listen`, ..." becomes "unknown field `lisen` (did you mean
/// `listen`?)" when one expected key is close to it; otherwise the message is kept (it lists the keys).
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let known = expected.split('`').skip(1).step_by(2);
    match closest(field, known) {
        Some(key) => format!("unknown field `{field}` (did you mean `{key}`?)"),
        None => message.to_string(),
    }
}

/// The candidate nearest to `word` by edit distance, if it is near enough to be a likely typo: at most a third
/// of the word's length (and at least 1) edits away, or the same ignoring case.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .map(|c| {
            let d = if c.eq_ignore_ascii_case(word) {
                0
            } else {
                edit_distance(word, c)
            };
            (d, c)
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }
    fn line(&self, offset: usize) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }
}

struct Validator<'a> {
    lines: &'a LineIndex,
    /// Problems of the file.
    problems: Vec<ConfigProblem>,
    /// Unset `*_env` variables: problems of the environment the file is read in.
    environment: Vec<ConfigProblem>,
}

impl Validator<'_> {
    fn problem<T>(
        &mut self,
        key: impl Into<String>,
        at: Option<&Spanned<T>>,
        message: impl Into<String>,
    ) {
        self.problems.push(ConfigProblem {
            key: key.into(),
            line: at.map(|s| self.lines.line(s.span().start)),
            message: message.into(),
        });
    }

    /// A problem at a byte range of the file (None: no line).
    fn problem_at(
        &mut self,
        key: impl Into<String>,
        at: Option<std::ops::Range<usize>>,
        message: impl Into<String>,
    ) {
        self.problems.push(ConfigProblem {
            key: key.into(),
            line: at.map(|r| self.lines.line(r.start)),
            message: message.into(),
        });
    }

    /// The value of the variable a `*_env` key names; when it is unset (or empty), an environment problem.
    fn env_var(
        &mut self,
        key: String,
        var: &Spanned<String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<String> {
        match env(var.get_ref()) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.environment.push(ConfigProblem {
                    key,
                    line: Some(self.lines.line(var.span().start)),
                    message: format!("environment variable `{}` is not set", var.get_ref()),
                });
                None
            }
        }
    }

    fn validate(&mut self, raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Config {
        let s = raw.server;
        let listen_at = s.listen.as_ref().map(|l| l.span());
        let server = ServerSettings {
            listen: s
                .listen
                .map_or_else(|| "127.0.0.1:8080".to_string(), Spanned::into_inner),
            metrics_public: s.metrics_public.unwrap_or(false),
            max_message_bytes: s.max_message_bytes.unwrap_or(262_144),
            max_upload_bytes: s.max_upload_bytes.unwrap_or(20 * 1024 * 1024),
            max_image_bytes: s.max_image_bytes.unwrap_or(5 * 1024 * 1024),
            max_tool_result_bytes: s.max_tool_result_bytes.unwrap_or(262_144),
            shutdown_grace_s: s.shutdown_grace_s.unwrap_or(10),
            recovery: match &s.recovery {
                None => Recovery::Resume,
                Some(r) => Recovery::parse(r.get_ref()).unwrap_or_else(|| {
                    self.problem(
                        "server.recovery",
                        Some(r),
                        format!("`{}` is not one of resume, interrupt", r.get_ref()),
                    );
                    Recovery::Resume
                }),
            },
            max_resumes: s.max_resumes.unwrap_or(3),
            ask_human_timeout_s: s.ask_human_timeout_s.unwrap_or(600),
            workspace_dir: s
                .workspace_dir
                .unwrap_or_else(|| "data/workspaces".to_string()),
            max_subagent_depth: s.max_subagent_depth.unwrap_or(3),
            event_retention_runs: s.event_retention_runs.unwrap_or(20),
            rate_limit_per_min: s.rate_limit_per_min.as_ref().map(|v| *v.get_ref()),
            max_streams_per_principal: s.max_streams_per_principal.as_ref().map(|v| *v.get_ref()),
            header_timeout_s: s.header_timeout_s.as_ref().map_or(30, |v| *v.get_ref()),
            max_connections: s.max_connections.as_ref().map(|v| *v.get_ref()),
        };
        for (key, v) in [
            ("server.rate_limit_per_min", &s.rate_limit_per_min),
            (
                "server.max_streams_per_principal",
                &s.max_streams_per_principal,
            ),
        ] {
            if let Some(v) = v.as_ref().filter(|v| *v.get_ref() == 0) {
                self.problem(
                    key,
                    Some(v),
                    "must be at least 1 (leave the key out for no limit)",
                );
            }
        }
        if let Some(v) = s
            .header_timeout_s
            .as_ref()
            .filter(|v| !(1..=3600).contains(v.get_ref()))
        {
            self.problem(
                "server.header_timeout_s",
                Some(v),
                "must be 1..=3600 seconds",
            );
        }
        if let Some(v) = s.max_connections.as_ref().filter(|v| *v.get_ref() == 0) {
            self.problem(
                "server.max_connections",
                Some(v),
                "must be at least 1 (leave the key out for nine tenths of the open-file limit)",
            );
        }
        if !listen_is_valid(&server.listen) {
            self.problem_at(
                "server.listen",
                listen_at,
                format!(
                    "`{}` is not an address like 127.0.0.1:8080 or a host name and port like localhost:8080",
                    server.listen
                ),
            );
        }
        if server.max_tool_result_bytes < MIN_TOOL_RESULT_BYTES {
            self.problem::<()>(
                "server.max_tool_result_bytes",
                None,
                format!("must be at least {MIN_TOOL_RESULT_BYTES}"),
            );
        }
        if server.event_retention_runs < 20 {
            self.problem::<()>("server.event_retention_runs", None, "must be at least 20");
        }
        let store_url = raw.store.url.map_or_else(
            || "sqlite://data/agentd.db".to_string(),
            Spanned::into_inner,
        );
        let store_max_connections = match &raw.store.max_connections {
            None => 16,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(v @ 1..=1000) => v,
                _ => {
                    self.problem(
                        "store.max_connections",
                        Some(n),
                        "must be between 1 and 1000",
                    );
                    16
                }
            },
        };

        let lease_s = match &raw.cluster.lease_s {
            None => 10,
            Some(v) if (2..=300).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                self.problem("cluster.lease_s", Some(v), "must be 2..=300 seconds");
                10
            }
        };
        let node_id = match &raw.cluster.node_id {
            Some(v) if v.get_ref().trim().is_empty() => {
                self.problem("cluster.node_id", Some(v), "must not be empty");
                None
            }
            v => v.as_ref().map(|v| v.get_ref().clone()),
        };
        let cluster = ClusterSettings { node_id, lease_s };

        let mut auth_keys = Vec::new();
        let mut seen_keys = HashSet::new();
        for (i, k) in raw.auth.keys.iter().enumerate() {
            let key_path = format!("auth.keys[{i}]");
            let raw_key = k.get_ref();
            let key = match (&raw_key.key, &raw_key.key_env) {
                (Some(key), None) => Some(key.clone()),
                (None, Some(var)) => self.env_var(format!("{key_path}.key_env"), var, env),
                _ => {
                    self.problem(
                        key_path.clone(),
                        Some(k),
                        "give exactly one of `key` or `key_env`",
                    );
                    None
                }
            };
            if let Some(key) = key {
                if !seen_keys.insert(key.clone()) {
                    self.problem(
                        format!("{key_path}.key"),
                        Some(k),
                        "the same key is configured twice",
                    );
                }
                auth_keys.push(ApiKey {
                    principal: raw_key.principal.clone(),
                    key,
                    admin: raw_key.admin,
                });
            }
        }

        let mut providers = BTreeMap::new();
        for (name, p) in &raw.providers {
            let key = format!("providers.{name}");
            let r = p.get_ref();
            let kind = r.kind.get_ref().as_str();
            let settings = match kind {
                "openai" => {
                    for (field, set) in [
                        ("model_path", r.model_path.is_some()),
                        ("threads", r.threads.is_some()),
                        ("parallel", r.parallel.is_some()),
                    ] {
                        if set {
                            self.problem(
                                format!("{key}.{field}"),
                                Some(p),
                                "not a key of an `openai` provider",
                            );
                        }
                    }
                    let Some(base_url) = r.base_url.clone() else {
                        self.problem(
                            format!("{key}.base_url"),
                            Some(p),
                            "required for kind `openai`",
                        );
                        continue;
                    };
                    let api_key = match &r.api_key_env {
                        Some(var) => self.env_var(format!("{key}.api_key_env"), var, env),
                        None => None,
                    };
                    ProviderSettings::OpenAi {
                        base_url: base_url.trim_end_matches('/').to_string(),
                        api_key,
                        timeout_s: r.timeout_s.unwrap_or(120),
                        context_tokens: r.context_tokens,
                    }
                }
                "llama" => {
                    for (field, set) in [
                        ("base_url", r.base_url.is_some()),
                        ("api_key_env", r.api_key_env.is_some()),
                        ("timeout_s", r.timeout_s.is_some()),
                    ] {
                        if set {
                            self.problem(
                                format!("{key}.{field}"),
                                Some(p),
                                "not a key of a `llama` provider",
                            );
                        }
                    }
                    let Some(model_path) = r.model_path.clone() else {
                        self.problem(
                            format!("{key}.model_path"),
                            Some(p),
                            "required for kind `llama`",
                        );
                        continue;
                    };
                    let parallel = r.parallel.unwrap_or(4);
                    if !(1..=MAX_PARALLEL).contains(&parallel) {
                        self.problem(
                            format!("{key}.parallel"),
                            Some(p),
                            format!(
                                "must be between 1 and {MAX_PARALLEL} (turns decoded together)"
                            ),
                        );
                    }
                    ProviderSettings::Llama {
                        model_path,
                        context_tokens: r.context_tokens.unwrap_or(4096),
                        threads: r.threads.unwrap_or(2),
                        parallel,
                    }
                }
                other => {
                    self.problem(
                        format!("{key}.kind"),
                        Some(&r.kind),
                        format!("unknown provider kind `{other}` (known: openai, llama)"),
                    );
                    continue;
                }
            };
            providers.insert(name.clone(), settings);
        }

        let mcp_servers = self.mcp_servers(&raw.mcp_servers, env);
        let servers: Vec<&str> = raw.mcp_servers.keys().map(String::as_str).collect();

        // Skills first: agents refer to them.
        let mut skills: Vec<SkillSettings> = Vec::new();
        for (i, sk) in raw.skills.iter().enumerate() {
            let r = sk.get_ref();
            let key = format!("skills[{i}]");
            let name = r.name.get_ref().clone();
            if skills.iter().any(|s| s.name == name) {
                self.problem(
                    format!("{key}.name"),
                    Some(&r.name),
                    format!("duplicate skill name `{name}`"),
                );
            }
            if let Some(tools) = &r.tools {
                self.check_tools(&format!("{key}.tools"), tools, &servers);
            }
            if let Some(p) = &r.provider {
                if !raw.providers.contains_key(p.get_ref()) {
                    self.problem(
                        format!("{key}.provider"),
                        Some(p),
                        format!("unknown provider `{}`", p.get_ref()),
                    );
                }
            }
            skills.push(SkillSettings {
                name,
                description: r.description.clone(),
                keywords: r.keywords.iter().map(|k| k.to_lowercase()).collect(),
                system_prompt: r.system_prompt.clone(),
                tools: r
                    .tools
                    .as_ref()
                    .map(|t| t.iter().map(|s| s.get_ref().clone()).collect()),
                provider: r.provider.as_ref().map(|p| p.get_ref().clone()),
                model: r.model.clone(),
            });
        }

        let agent_names: Vec<String> = raw
            .agents
            .iter()
            .map(|a| a.get_ref().name.get_ref().clone())
            .collect();
        let mut agents: Vec<AgentSettings> = Vec::new();
        for (i, a) in raw.agents.iter().enumerate() {
            let r = a.get_ref();
            let key = format!("agents[{i}]");
            let name = r.name.get_ref().clone();
            if name.is_empty() || BUILTIN_TOOLS.contains(&name.as_str()) {
                self.problem(
                    format!("{key}.name"),
                    Some(&r.name),
                    format!("`{name}` cannot be an agent name"),
                );
            }
            if let Some(server) = registry::mcp_server_of(&name).filter(|s| servers.contains(s)) {
                self.problem(
                    format!("{key}.name"),
                    Some(&r.name),
                    format!(
                        "`{name}` clashes with the tools of MCP server `{server}` (SERVER__TOOL)"
                    ),
                );
            }
            if agents.iter().any(|x| x.name == name) {
                self.problem(
                    format!("{key}.name"),
                    Some(&r.name),
                    format!("duplicate agent name `{name}`"),
                );
            }
            let provider = r.provider.get_ref().clone();
            let provider_ctx = match providers.get(&provider) {
                Some(p) => p.context_tokens(),
                None => {
                    if !raw.providers.contains_key(&provider) {
                        let known: Vec<&str> = raw.providers.keys().map(String::as_str).collect();
                        self.problem(
                            format!("{key}.provider"),
                            Some(&r.provider),
                            format!(
                                "unknown provider `{provider}` (configured: {})",
                                known.join(", ")
                            ),
                        );
                    }
                    None
                }
            };
            self.check_tools(&format!("{key}.tools"), &r.tools, &servers);
            for (j, p) in r.approve.iter().enumerate() {
                if p.get_ref().trim().is_empty() {
                    self.problem(format!("{key}.approve[{j}]"), Some(p), "must not be empty");
                } else if let Some(server) =
                    registry::mcp_server_of(p.get_ref()).filter(|s| !servers.contains(s))
                {
                    self.problem(
                        format!("{key}.approve[{j}]"),
                        Some(p),
                        format!("unknown MCP server `{server}`"),
                    );
                }
            }
            for (j, s) in r.skills.iter().enumerate() {
                if !skills.iter().any(|k| &k.name == s.get_ref()) {
                    self.problem(
                        format!("{key}.skills[{j}]"),
                        Some(s),
                        format!("unknown skill `{}`", s.get_ref()),
                    );
                }
            }
            for (j, s) in r.subagents.iter().enumerate() {
                if s.get_ref() == &name {
                    self.problem(
                        format!("{key}.subagents[{j}]"),
                        Some(s),
                        "an agent cannot be its own subagent",
                    );
                } else if !agent_names.contains(s.get_ref()) {
                    self.problem(
                        format!("{key}.subagents[{j}]"),
                        Some(s),
                        format!("unknown agent `{}`", s.get_ref()),
                    );
                }
            }
            let multitask = match &r.multitask {
                None => Multitask::Enqueue,
                Some(m) => Multitask::parse(m.get_ref()).unwrap_or_else(|| {
                    self.problem(
                        format!("{key}.multitask"),
                        Some(m),
                        format!("`{}` is not one of reject, enqueue, interrupt", m.get_ref()),
                    );
                    Multitask::Enqueue
                }),
            };
            let compress_at = r.compress_at.as_ref().map_or(0.8, |c| *c.get_ref());
            if !(compress_at > 0.0 && compress_at <= 1.0) {
                let at = r.compress_at.as_ref().map(|c| c.span());
                self.problem_at(format!("{key}.compress_at"), at, "must be in (0, 1]");
            }
            let max_iterations = r.max_iterations.as_ref().map_or(8, |m| *m.get_ref());
            if max_iterations == 0 {
                let at = r.max_iterations.as_ref().map(|m| m.span());
                self.problem_at(format!("{key}.max_iterations"), at, "must be at least 1");
            }
            agents.push(AgentSettings {
                name,
                description: r.description.clone(),
                provider,
                model: r.model.clone(),
                system_prompt: r.system_prompt.clone(),
                tools: r.tools.iter().map(|t| t.get_ref().clone()).collect(),
                max_iterations,
                max_context_tokens: r.max_context_tokens.or(provider_ctx).unwrap_or(8192),
                compress_at,
                multitask,
                skills: r.skills.iter().map(|s| s.get_ref().clone()).collect(),
                subagents: r.subagents.iter().map(|s| s.get_ref().clone()).collect(),
                retry_tools: r.retry_tools.clone(),
                approve: r.approve.iter().map(|p| p.get_ref().clone()).collect(),
            });
        }
        if agents.is_empty() && self.problems.is_empty() {
            self.problem::<()>("agents", None, "at least one [[agents]] entry is required");
        }
        Config {
            server,
            store_url,
            store_max_connections,
            cluster,
            auth_keys,
            providers,
            agents,
            skills,
            mcp_servers,
        }
    }

    /// `[mcp_servers.NAME]`: a name usable as a tool prefix, exactly one of `command` or `url`, `${VAR}`
    /// references expanded (an unset one is a problem of the environment, like `key_env`).
    fn mcp_servers(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawMcpServer>>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<McpServerSettings> {
        let mut out = Vec::new();
        for (name, r) in raw {
            let key = format!("mcp_servers.{name}");
            let s = r.get_ref();
            let valid_chars = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if name.is_empty() || !valid_chars || name.contains(MCP_SEPARATOR) || name.len() > 32 {
                self.problem(
                    key.clone(),
                    Some(r),
                    "a server's name is 1 to 32 of A-Z a-z 0-9 _ - without `__` (its tools are SERVER__TOOL)",
                );
            }
            let expand = |v: &mut Self, field: String, value: &Spanned<String>| {
                v.expand_env(field, value, env)
            };
            let transport = match (&s.command, &s.url) {
                (Some(command), None) => {
                    if !s.headers.is_empty() {
                        self.problem(
                            format!("{key}.headers"),
                            Some(r),
                            "only for `url` (HTTP) servers",
                        );
                    }
                    let command = expand(self, format!("{key}.command"), command);
                    let args = s
                        .args
                        .iter()
                        .enumerate()
                        .map(|(i, a)| expand(self, format!("{key}.args[{i}]"), a))
                        .collect();
                    let env = s
                        .env
                        .iter()
                        .map(|(k, v)| (k.clone(), expand(self, format!("{key}.env.{k}"), v)))
                        .collect();
                    McpTransport::Stdio { command, args, env }
                }
                (None, Some(url)) => {
                    if !s.args.is_empty() || !s.env.is_empty() {
                        self.problem(
                            format!("{key}.{}", if s.args.is_empty() { "env" } else { "args" }),
                            Some(r),
                            "only for `command` (stdio) servers",
                        );
                    }
                    let expanded = expand(self, format!("{key}.url"), url);
                    if !(expanded.starts_with("http://") || expanded.starts_with("https://")) {
                        self.problem(
                            format!("{key}.url"),
                            Some(url),
                            "must be an http:// or https:// URL",
                        );
                    }
                    let headers = s
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), expand(self, format!("{key}.headers.{k}"), v)))
                        .collect();
                    McpTransport::Http {
                        url: expanded,
                        headers,
                    }
                }
                _ => {
                    self.problem(
                        key.clone(),
                        Some(r),
                        "give exactly one of `command` (stdio) or `url` (streamable HTTP)",
                    );
                    continue;
                }
            };
            let mut seconds = |field: &str, v: &Option<Spanned<u64>>, default: u64| match v {
                None => default,
                Some(t) if (1..=86_400).contains(t.get_ref()) => *t.get_ref(),
                Some(t) => {
                    self.problem(
                        format!("{key}.{field}"),
                        Some(t),
                        "must be 1..=86400 seconds",
                    );
                    default
                }
            };
            let timeout_s = seconds("timeout_s", &s.timeout_s, 60);
            let startup_timeout_s = seconds("startup_timeout_s", &s.startup_timeout_s, 30);
            out.push(McpServerSettings {
                name: name.clone(),
                transport,
                timeout_s,
                startup_timeout_s,
            });
        }
        out
    }

    /// A value with its `${VAR}` references replaced; an unset variable is an environment problem (and
    /// expands to nothing).
    fn expand_env(
        &mut self,
        key: String,
        value: &Spanned<String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> String {
        let mut out = String::new();
        let mut rest = value.get_ref().as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.problem(key.clone(), Some(value), "`${` without its closing `}`");
                out.push_str(&rest[start..]);
                return out;
            };
            let var = &after[..end];
            match env(var) {
                Some(v) => out.push_str(&v),
                None => self.environment.push(ConfigProblem {
                    key: key.clone(),
                    line: Some(self.lines.line(value.span().start)),
                    message: format!("environment variable `{var}` is not set"),
                }),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    fn check_tools(&mut self, key: &str, tools: &[Spanned<String>], servers: &[&str]) {
        let mut seen = HashSet::new();
        for (j, t) in tools.iter().enumerate() {
            let name = t.get_ref();
            if let Err(message) = registry::check_tool_name(name, servers) {
                self.problem(format!("{key}[{j}]"), Some(t), message);
            }
            if !seen.insert(name.clone()) {
                self.problem(
                    format!("{key}[{j}]"),
                    Some(t),
                    format!("tool `{name}` listed twice"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn llama_parallel_is_checked() {
        let with = |n: &str| {
            GOOD.replace(
                "[[agents]]",
                &format!("[providers.local]\nkind = \"llama\"\nmodel_path = \"m.gguf\"\nparallel = {n}\n\n[[agents]]"),
            )
        };
        let c = Config::parse_with_env(&with("2"), "t.toml", &no_env).unwrap();
        assert!(matches!(
            c.providers["local"],
            ProviderSettings::Llama { parallel: 2, .. }
        ));
        for bad in ["0", "65"] {
            let e = Config::parse_with_env(&with(bad), "t.toml", &no_env).unwrap_err();
            assert_eq!(e.problems.len(), 1, "{bad}: {:?}", e.problems);
            assert_eq!(e.problems[0].key, "providers.local.parallel");
            assert!(e.problems[0].line.is_some());
        }
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"

[providers.upstream]
kind = "openai"
base_url = "http://127.0.0.1:9000/v1/"

[[agents]]
name = "assistant"
provider = "upstream"
model = "m"
tools = ["calculator"]
skills = ["math"]

[[skills]]
name = "math"
keywords = ["Calculate"]
"#;

    #[test]
    fn builtin_default_parses() {
        let c = Config::builtin_default();
        assert_eq!(c.agents[0].name, "assistant");
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert!(matches!(
            c.providers["local"],
            ProviderSettings::Llama { .. }
        ));
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = Config::parse_with_env(GOOD, "t.toml", &no_env).unwrap();
        let a = &c.agents[0];
        assert_eq!(a.max_iterations, 8);
        assert_eq!(a.multitask, Multitask::Enqueue);
        assert_eq!(a.max_context_tokens, 8192);
        assert_eq!(c.skills[0].keywords, vec!["calculate"]);
        assert!(
            matches!(&c.providers["upstream"], ProviderSettings::OpenAi { base_url, .. } if base_url == "http://127.0.0.1:9000/v1")
        );
    }

    #[test]
    fn max_tool_result_bytes_defaults_and_is_checked() {
        let c = Config::parse_with_env(GOOD, "t.toml", &no_env).unwrap();
        assert_eq!(c.server.max_tool_result_bytes, 262_144);
        let set = |v: &str| {
            GOOD.replacen(
                "[server]",
                &format!("[server]\nmax_tool_result_bytes = {v}"),
                1,
            )
        };
        let c = Config::parse_with_env(&set("4096"), "t.toml", &no_env).unwrap();
        assert_eq!(c.server.max_tool_result_bytes, 4096);
        let e = Config::parse_with_env(&set("10"), "t.toml", &no_env).unwrap_err();
        assert_eq!(e.problems[0].key, "server.max_tool_result_bytes", "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_line() {
        let text = GOOD.replace("model = \"m\"", "model = \"m\"\ntemperature = 0.2");
        let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
        assert_eq!(e.problems[0].key, "agents[0].temperature");
        assert_eq!(e.problems[0].line, Some(13));
        assert!(
            e.to_string()
                .contains("t.toml: line 13: agents[0].temperature: unknown field `temperature`"),
            "{e}"
        );
    }

    #[test]
    fn a_misspelled_key_gets_a_suggestion_with_its_line() {
        for (text, expected) in [
            (
                "[server]\nlisen = \"127.0.0.1:1\"\n",
                "t.toml: line 2: server.lisen: unknown field `lisen` (did you mean `listen`?)",
            ),
            (
                "[sever]\nlisten = \"127.0.0.1:1\"\n",
                "t.toml: line 1: sever: unknown field `sever` (did you mean `server`?)",
            ),
            (
                &format!("{GOOD}max_iteration = 3\n"),
                "t.toml: line 19: skills[0].max_iteration: unknown field `max_iteration`",
            ),
        ] {
            let e = Config::parse_with_env(text, "t.toml", &no_env).unwrap_err();
            assert!(e.to_string().starts_with(expected), "{e}");
        }
        let mut agent = GOOD.replace("[[skills]]", "max_iteration = 3\n\n[[skills]]");
        let e = Config::parse_with_env(&agent, "t.toml", &no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml: line 16: agents[0].max_iteration: unknown field `max_iteration` (did you mean `max_iterations`?)"
        );
        // Nothing close: serde's list of the keys stays.
        agent = GOOD.replace("[[skills]]", "temperature = 3\n\n[[skills]]");
        let e = Config::parse_with_env(&agent, "t.toml", &no_env).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown field `temperature`, expected one of `name`"),
            "{e}"
        );
        assert!(!e.to_string().contains("did you mean"), "{e}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    /// An unset variable names the line of its `*_env` key however the table is written (header, inline table,
    /// array of inline tables over several lines).
    #[test]
    fn unset_variables_point_at_their_key_line_in_every_form() {
        let forms = [
            ("[[auth.keys]]\nprincipal = \"a\"\nkey_env = \"NOPE\"\n", "line 22: auth.keys[0].key_env"),
            ("[auth]\nkeys = [{ principal = \"a\", key_env = \"NOPE\" }]\n", "line 21: auth.keys[0].key_env"),
            (
                "[auth]\nkeys = [\n  { principal = \"a\", key = \"k\" },\n  { principal = \"b\", key_env = \"NOPE\" },\n]\n",
                "line 23: auth.keys[1].key_env",
            ),
            (
                "[providers.other]\nkind = \"openai\"\nbase_url = \"http://x\"\napi_key_env = \"NOPE\"\n",
                "line 23: providers.other.api_key_env",
            ),
            (
                "[providers]\nother = { kind = \"openai\", base_url = \"http://x\", api_key_env = \"NOPE\" }\n",
                "line 21: providers.other.api_key_env",
            ),
        ];
        for (form, expected) in forms {
            let text = format!("{GOOD}\n{form}");
            let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("t.toml: {expected}: environment variable `NOPE` is not set"),
                "{form}"
            );
        }
    }

    #[test]
    fn listen_takes_an_address_or_a_host_name_and_port() {
        for ok in [
            "127.0.0.1:8080",
            "[::1]:0",
            "localhost:8080",
            "my-host.example:1",
        ] {
            assert!(listen_is_valid(ok), "{ok}");
        }
        for bad in [
            "localhost",
            "8080",
            ":8080",
            "local host:1",
            "localhost:http",
            "localhost:70000",
            "a..b:1",
        ] {
            assert!(!listen_is_valid(bad), "{bad}");
        }
        let text = GOOD.replace("127.0.0.1:0", "localhost:0");
        assert_eq!(
            Config::parse_with_env(&text, "t.toml", &no_env)
                .unwrap()
                .server
                .listen,
            "localhost:0"
        );
    }

    /// The only problem of `text`, as `(key, line, message)`.
    fn only_problem(text: &str) -> (String, Option<usize>, String) {
        let e = Config::parse_with_env(text, "t.toml", &no_env).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        let p = &e.problems[0];
        (p.key.clone(), p.line, p.message.clone())
    }

    /// A value of the wrong type names its key (the full path, whatever the section) and its line.
    #[test]
    fn wrong_types_name_key_and_line_in_every_section() {
        let cases: [(&str, &str, &str, &str, usize); 8] = [
            (
                "max_iterations",
                "model = \"m\"",
                "model = \"m\"\nmax_iterations = \"lots\"",
                "agents[0].max_iterations",
                13,
            ),
            (
                "server",
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nmax_message_bytes = \"big\"",
                "server.max_message_bytes",
                4,
            ),
            (
                "server listen",
                "listen = \"127.0.0.1:0\"",
                "listen = 8080",
                "server.listen",
                3,
            ),
            (
                "store",
                "[providers.upstream]",
                "[store]\nurl = 5\n\n[providers.upstream]",
                "store.url",
                6,
            ),
            (
                "providers",
                "kind = \"openai\"",
                "kind = \"openai\"\ntimeout_s = \"slow\"",
                "providers.upstream.timeout_s",
                7,
            ),
            (
                "agents list",
                "tools = [\"calculator\"]",
                "tools = \"calculator\"",
                "agents[0].tools",
                13,
            ),
            (
                "skills",
                "keywords = [\"Calculate\"]",
                "keywords = [\"Calculate\", 7]",
                "skills[0].keywords[1]",
                18,
            ),
            ("missing field", "model = \"m\"\n", "", "agents[0].model", 9),
        ];
        for (what, from, to, key, line) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{what}");
            let (k, l, m) = only_problem(&text);
            assert_eq!((k.as_str(), l), (key, Some(line)), "{what}: {m}");
        }
        let text =
            format!("{GOOD}\n[[auth.keys]]\nprincipal = \"alice\"\nkey = \"k\"\nadmin = \"yes\"\n");
        let (k, l, m) = only_problem(&text);
        assert_eq!((k.as_str(), l), ("auth.keys[0].admin", Some(23)), "{m}");
        assert!(
            m.contains("invalid type: string \"yes\", expected a boolean"),
            "{m}"
        );

        // The message a newcomer sees for the issue's example.
        let text = GOOD.replace("model = \"m\"", "model = \"m\"\nmax_iterations = \"lots\"");
        let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml: line 13: agents[0].max_iterations: invalid type: string \"lots\", expected u32"
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let text = GOOD.replace("model = \"m\"", "model = \"m");
        let (k, l, _) = only_problem(&text);
        assert_eq!((k.as_str(), l), ("config", Some(12)));
    }

    #[test]
    fn semantic_problems_have_the_line_of_their_value() {
        let text = GOOD
            .replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"")
            .replace(
                "model = \"m\"",
                "model = \"m\"\nmax_iterations = 0\ncompress_at = 2.0",
            );
        let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
        let keys: Vec<(&str, Option<usize>)> = e
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert!(keys.contains(&("server.listen", Some(3))), "{keys:?}");
        assert!(
            keys.contains(&("agents[0].max_iterations", Some(13))),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("agents[0].compress_at", Some(14))),
            "{keys:?}"
        );
    }

    #[test]
    fn semantic_problems_name_key_and_line() {
        let text = GOOD
            .replace("provider = \"upstream\"", "provider = \"nope\"")
            .replace(
                "tools = [\"calculator\"]",
                "tools = [\"calculator\", \"rm_rf\"]",
            )
            .replace(
                "skills = [\"math\"]",
                "skills = [\"poetry\"]\nsubagents = [\"ghost\"]",
            );
        let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
        let keys: Vec<(&str, Option<usize>)> = e
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert!(keys.contains(&("agents[0].provider", Some(11))), "{keys:?}");
        assert!(keys.contains(&("agents[0].tools[1]", Some(13))), "{keys:?}");
        assert!(
            keys.contains(&("agents[0].skills[0]", Some(14))),
            "{keys:?}"
        );
        assert!(
            keys.contains(&("agents[0].subagents[0]", Some(15))),
            "{keys:?}"
        );
    }

    #[test]
    fn duplicates_and_bad_kinds_are_errors() {
        let text = format!(
            "{GOOD}\n[[agents]]\nname = \"assistant\"\nprovider = \"upstream\"\nmodel = \"m\"\n\n[providers.x]\nkind = \"magic\"\n"
        );
        let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
        let msgs = e.to_string();
        assert!(
            msgs.contains("agents[1].name: duplicate agent name `assistant`"),
            "{msgs}"
        );
        assert!(
            msgs.contains("providers.x.kind: unknown provider kind `magic`"),
            "{msgs}"
        );
    }

    #[test]
    fn limits_default_off_and_zero_is_an_error() {
        let c = Config::parse_with_env(GOOD, "t.toml", &no_env).unwrap();
        assert_eq!(c.server.rate_limit_per_min, None);
        assert_eq!(c.server.max_streams_per_principal, None);
        assert_eq!(c.server.header_timeout_s, 30);
        assert_eq!(c.server.max_connections, None);
        let text = GOOD.replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nrate_limit_per_min = 0\nmax_streams_per_principal = 0\nheader_timeout_s = 0\nmax_connections = 0",
        );
        let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
        let keys: Vec<(&str, Option<usize>)> = e
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("server.rate_limit_per_min", Some(4)),
                ("server.max_streams_per_principal", Some(5)),
                ("server.header_timeout_s", Some(6)),
                ("server.max_connections", Some(7)),
            ]
        );
        let text = GOOD.replace(
            "listen = \"127.0.0.1:0\"",
            "rate_limit_per_min = 60\nmax_streams_per_principal = 4\nheader_timeout_s = 5\nmax_connections = 100",
        );
        let c = Config::parse_with_env(&text, "t.toml", &no_env).unwrap();
        assert_eq!(c.server.rate_limit_per_min, Some(60));
        assert_eq!(c.server.max_streams_per_principal, Some(4));
        assert_eq!(c.server.header_timeout_s, 5);
        assert_eq!(c.server.max_connections, Some(100));
    }

    #[test]
    fn key_env_is_read_and_missing_env_is_named() {
        let text =
            format!("{GOOD}\n[[auth.keys]]\nprincipal = \"alice\"\nkey_env = \"ALICE_KEY\"\n");
        let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
        assert!(
            e.to_string().contains(
                "t.toml: line 22: auth.keys[0].key_env: environment variable `ALICE_KEY` is not set"
            ),
            "{e}"
        );
        let c = Config::parse_with_env(&text, "t.toml", &|k| {
            (k == "ALICE_KEY").then(|| "sk-1".to_string())
        })
        .unwrap();
        assert_eq!(c.auth_keys[0].key, "sk-1");
        assert!(!format!("{:?}", c.auth_keys).contains("sk-1"));
    }

    /// `check` judges the file: an unset variable is reported apart (with key and line), not as an error; a
    /// problem of the file still is one.
    #[test]
    fn check_reports_unset_variables_apart_from_problems() {
        let text = format!(
            "{GOOD}\n[[auth.keys]]\nprincipal = \"alice\"\nkey_env = \"ALICE_KEY\"\n\n[providers.other]\nkind = \"openai\"\nbase_url = \"http://x\"\napi_key_env = \"OTHER_KEY\"\n"
        );
        let checked = Config::check_with_env(&text, "t.toml", &no_env).unwrap();
        let env: Vec<String> = checked.environment.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            env,
            vec![
                "line 22: auth.keys[0].key_env: environment variable `ALICE_KEY` is not set",
                "line 27: providers.other.api_key_env: environment variable `OTHER_KEY` is not set",
            ]
        );
        // With the variables set there is nothing to report.
        let checked = Config::check_with_env(&text, "t.toml", &|_| Some("v".into())).unwrap();
        assert!(checked.environment.is_empty());
        // A problem of the file is an error, unset variables or not.
        let bad = text.replace("model = \"m\"", "model = \"m\"\nmultitask = \"sometimes\"");
        let e = Config::check_with_env(&bad, "t.toml", &no_env).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "agents[0].multitask");
    }

    #[test]
    fn recovery_keys_default_parse_and_name_a_bad_value() {
        let c = Config::parse_with_env(GOOD, "t.toml", &no_env).unwrap();
        assert_eq!(c.server.recovery, Recovery::Resume);
        assert_eq!(c.server.max_resumes, 3);
        assert!(c.agents[0].retry_tools.is_empty());
        let text = GOOD
            .replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nrecovery = \"interrupt\"\nmax_resumes = 5",
            )
            .replace(
                "model = \"m\"",
                "model = \"m\"\nretry_tools = [\"send_mail\"]",
            );
        let c = Config::parse_with_env(&text, "t.toml", &no_env).unwrap();
        assert_eq!(c.server.recovery, Recovery::Interrupt);
        assert_eq!(c.server.max_resumes, 5);
        assert_eq!(c.agents[0].retry_tools, ["send_mail"]);
        let bad = GOOD.replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nrecovery = \"retry\"",
        );
        let e = Config::parse_with_env(&bad, "t.toml", &no_env).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "server.recovery");
        assert_eq!(e.problems[0].line, Some(4));
        assert!(e.problems[0].message.contains("resume, interrupt"), "{e}");
    }

    #[test]
    fn postgres_store_and_its_connection_cap() {
        let c = Config::parse_with_env(GOOD, "t.toml", &no_env).unwrap();
        assert_eq!(c.store_url, "sqlite://data/agentd.db");
        assert_eq!(c.store_max_connections, 16);
        let text = format!(
            "{GOOD}\n[store]\nurl = \"postgres://agentd@127.0.0.1:5432/agentd\"\nmax_connections = 4\n"
        );
        let c = Config::parse_with_env(&text, "t.toml", &no_env).unwrap();
        assert_eq!(c.store_url, "postgres://agentd@127.0.0.1:5432/agentd");
        assert_eq!(c.store_max_connections, 4);
        for bad in ["0", "1001", "-1"] {
            let text = format!("{GOOD}\n[store]\nmax_connections = {bad}\n");
            let e = Config::parse_with_env(&text, "t.toml", &no_env).unwrap_err();
            assert_eq!(e.problems[0].key, "store.max_connections", "{e}");
            assert!(e.problems[0].line.is_some(), "{e}");
        }
    }

    const MCP: &str = r#"
[server]
listen = "127.0.0.1:0"

[providers.upstream]
kind = "openai"
base_url = "http://127.0.0.1:9000/v1"

[mcp_servers.files]
command = "npx"
args = ["-y", "server-filesystem", "${DATA_DIR}/shared"]
env = { LOG_LEVEL = "warn", TOKEN = "${FILES_TOKEN}" }
timeout_s = 5

[mcp_servers.web]
url = "http://127.0.0.1:3001/mcp"
headers = { Authorization = "Bearer ${WEB_TOKEN}" }

[[agents]]
name = "assistant"
provider = "upstream"
model = "m"
tools = ["calculator", "files__read_text_file", "web__*"]
approve = ["files__write_*"]
retry_tools = ["web__search"]
"#;

    fn mcp_env(k: &str) -> Option<String> {
        match k {
            "DATA_DIR" => Some("/srv".into()),
            "FILES_TOKEN" => Some("t1".into()),
            "WEB_TOKEN" => Some("t2".into()),
            _ => None,
        }
    }

    #[test]
    fn mcp_servers_parse_with_their_variables_expanded() {
        let c = Config::parse_with_env(MCP, "t.toml", &mcp_env).unwrap();
        let files = c.mcp_server("files").unwrap();
        assert_eq!(files.timeout_s, 5);
        assert_eq!(files.startup_timeout_s, 30);
        match &files.transport {
            McpTransport::Stdio { command, args, env } => {
                assert_eq!(command, "npx");
                assert_eq!(args[2], "/srv/shared");
                assert_eq!(env["TOKEN"], "t1");
            }
            other => panic!("{other:?}", other = other.kind()),
        }
        let web = c.mcp_server("web").unwrap();
        assert!(
            matches!(&web.transport, McpTransport::Http { headers, .. } if headers["Authorization"] == "Bearer t2")
        );
        assert_eq!(web.timeout_s, 60);
        // Secrets never reach Debug output.
        let debug = format!("{files:?} {web:?}");
        assert!(!debug.contains("t1") && !debug.contains("t2"), "{debug}");
        assert_eq!(c.agents[0].approve, vec!["files__write_*"]);
        assert_eq!(c.agents[0].retry_tools, vec!["web__search"]);
    }

    #[test]
    fn an_unset_variable_is_named_with_its_key_and_line() {
        let e = Config::parse_with_env(MCP, "t.toml", &no_env).unwrap_err();
        let keys: Vec<(&str, Option<usize>)> = e
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert!(
            keys.contains(&("mcp_servers.files.args[2]", Some(11))),
            "{e}"
        );
        assert!(
            keys.contains(&("mcp_servers.files.env.TOKEN", Some(12))),
            "{e}"
        );
        assert!(
            keys.contains(&("mcp_servers.web.headers.Authorization", Some(17))),
            "{e}"
        );
        assert!(e.to_string().contains("`FILES_TOKEN` is not set"), "{e}");
        // check-config: the file is right, the environment is only a warning.
        let checked = Config::check_with_env(MCP, "t.toml", &no_env).unwrap();
        assert_eq!(checked.environment.len(), 3, "{:?}", checked.environment);
    }

    #[test]
    fn mcp_problems_name_key_and_line() {
        let with = |from: &str, to: &str| {
            let text = MCP.replacen(from, to, 1);
            only_problem_with(&text)
        };
        let (key, line, msg) = with("\"web__*\"", "\"other__*\"");
        assert_eq!((key.as_str(), line), ("agents[0].tools[2]", Some(23)));
        assert!(msg.contains("unknown MCP server `other`"), "{msg}");
        let (key, line, msg) = with("files__write_*", "nope__write_*");
        assert_eq!((key.as_str(), line), ("agents[0].approve[0]", Some(24)));
        assert!(msg.contains("`nope`"), "{msg}");
        let (key, _, msg) = with(
            "url = \"http://127.0.0.1:3001/mcp\"",
            "command = \"x\"\nurl = \"http://a\"",
        );
        assert_eq!(key, "mcp_servers.web");
        assert!(msg.contains("exactly one of"), "{msg}");
        let (key, line, _) = with("timeout_s = 5", "timeout_s = 0");
        assert_eq!(
            (key.as_str(), line),
            ("mcp_servers.files.timeout_s", Some(13))
        );
        let text = MCP.replacen("[mcp_servers.web]", "[mcp_servers.\"a__b\"]", 1);
        let e = Config::parse_with_env(&text, "t.toml", &mcp_env).unwrap_err();
        let p = e
            .problems
            .iter()
            .find(|p| p.key == "mcp_servers.a__b")
            .expect("name problem");
        assert!(p.message.contains("without `__`"), "{e}");
        assert_eq!(p.line, Some(15), "{e}");
        let (key, _, _) = with("url = \"http://127.0.0.1:3001/mcp\"", "url = \"ftp://x\"");
        assert_eq!(key, "mcp_servers.web.url");
        // An agent named like a server's tool clashes with it.
        let text = format!(
            "{MCP}\n[[agents]]\nname = \"files__read_text_file\"\nprovider = \"upstream\"\nmodel = \"m\"\n"
        );
        let (key, line, msg) = only_problem_with(&text);
        assert_eq!((key.as_str(), line), ("agents[1].name", Some(28)));
        assert!(msg.contains("clashes"), "{msg}");
        // An unknown key of a server is named.
        let (key, _, _) = with("timeout_s = 5", "timeout = 5");
        assert_eq!(key, "mcp_servers.files.timeout");
    }

    fn only_problem_with(text: &str) -> (String, Option<usize>, String) {
        let e = Config::parse_with_env(text, "t.toml", &mcp_env).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        let p = &e.problems[0];
        (p.key.clone(), p.line, p.message.clone())
    }
}
