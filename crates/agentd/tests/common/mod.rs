//! Shared test kit: a real agentd (real SQLite file, real HTTP on port 0) in front of a mock OpenAI-compatible
//! upstream over real HTTP, plus small HTTP/WebSocket/SSE clients that print context on failure.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentd_core::config::Config;
use agentd_core::service::Agentd;
use agentd_testkit::MockUpstream;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod store;

/// The default agent config; `{upstream}`, `{dir}` are filled in; `extra` is appended (with `{upstream_addr}`,
/// the mock's `host:port`, filled in).
pub const BASE_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
workspace_dir = "{dir}/workspaces"
max_message_bytes = 4096
max_upload_bytes = 2048
shutdown_grace_s = 2
ask_human_timeout_s = 30
{server_extra}

[store]
url = "{store_url}"

[providers.upstream]
kind = "openai"
base_url = "{upstream}"
timeout_s = {timeout}

[[agents]]
name = "assistant"
description = "General helper"
provider = "upstream"
model = "mock-model"
system_prompt = "You are a helpful assistant."
tools = ["calculator", "current_time", "ask_human", "read_file"]
"#;

pub struct Server {
    /// Drops a Postgres test database once this server's directory and app are gone (see `store::Lease`).
    _store: store::Lease,
    pub url: String,
    pub upstream: MockUpstream,
    pub dir: Arc<tempfile::TempDir>,
    pub app: Arc<Agentd>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub key: Option<String>,
}

pub struct Options {
    /// Appended after the base config (agents, skills, providers, auth keys).
    pub extra: String,
    /// Extra keys inside `[server]`.
    pub server_extra: String,
    pub timeout_s: u64,
    pub dir: Option<Arc<tempfile::TempDir>>,
    /// `store.url`, instead of the test's own store in `dir` (see `store::url_for`).
    pub store_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra: String::new(),
            server_extra: String::new(),
            timeout_s: 30,
            dir: None,
            store_url: None,
        }
    }
}

/// An app served in this process on a port of its own (for tests that build the app themselves).
pub struct InProcess {
    pub client: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    pub async fn start(app: Arc<Agentd>) -> InProcess {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = Client {
            base: format!("http://{}", listener.local_addr().unwrap()),
            key: None,
            http: reqwest::Client::new(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(agentd_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        InProcess {
            client,
            stop,
            served,
        }
    }

    pub fn is_running(&self) -> bool {
        !self.served.is_finished()
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.unwrap().unwrap();
    }
}

/// `text` with its `[store]` url set to `url`.
pub fn with_store_url(text: &str, url: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("url = \"sqlite://") || l.starts_with("url = \"postgres://") {
                format!("url = \"{url}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn config_text(upstream: &str, dir: &std::path::Path, timeout_s: u64, extra: &str) -> String {
    config_text_with(upstream, dir, timeout_s, extra, "")
}

pub fn config_text_with(
    upstream: &str,
    dir: &std::path::Path,
    timeout_s: u64,
    extra: &str,
    server_extra: &str,
) -> String {
    config_text_on(
        &store::url_for(dir),
        upstream,
        dir,
        timeout_s,
        extra,
        server_extra,
    )
}

/// [`config_text_with`] on the store `store_url`.
pub fn config_text_on(
    store_url: &str,
    upstream: &str,
    dir: &std::path::Path,
    timeout_s: u64,
    extra: &str,
    server_extra: &str,
) -> String {
    let base = BASE_CONFIG
        .replace("{store_url}", store_url)
        .replace("{server_extra}", server_extra)
        .replace("{upstream}", upstream)
        .replace("{dir}", &dir.display().to_string())
        .replace("{timeout}", &timeout_s.to_string());
    // `extra` may name the mock's address (e.g. a provider with credentials in its URL).
    let addr = upstream
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    format!("{base}\n{}", extra.replace("{upstream_addr}", addr))
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Server {
        log_when_asked();
        let upstream = MockUpstream::start().await;
        let dir = opts
            .dir
            .unwrap_or_else(|| Arc::new(tempfile::tempdir().expect("tempdir")));
        let store_url = opts.store_url.unwrap_or_else(|| store::url_for(dir.path()));
        let text = config_text_on(
            &store_url,
            &upstream.base_url(),
            dir.path(),
            opts.timeout_s,
            &opts.extra,
            &opts.server_extra,
        );
        let config = Config::parse(&text, "test.toml")
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let key = config.auth_keys.first().map(|k| k.key.clone());
        let app = agentd::build(config).await.expect("build");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(agentd_server::serve(listener, app.clone(), async move {
            let _ = stopped.await;
        }));
        Server {
            _store: store::Lease::new(&dir, &app),
            url,
            upstream,
            dir,
            app,
            stop: Some(stop),
            handle: Some(handle),
            key,
        }
    }

    /// Graceful shutdown, as on SIGTERM; waits for `serve` to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.expect("serve task"),
            None => Ok(()),
        }
    }

    pub fn client(&self) -> Client {
        Client {
            base: self.url.clone(),
            key: self.key.clone(),
            http: reqwest::Client::new(),
        }
    }

    pub fn client_with_key(&self, key: Option<&str>) -> Client {
        Client {
            base: self.url.clone(),
            key: key.map(String::from),
            http: reqwest::Client::new(),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("agentd.db")
    }
}

/// A JSON-over-HTTP client for the native API.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub key: Option<String>,
    pub http: reqwest::Client,
}

impl Client {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .timeout(Duration::from_secs(30));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut r = self.req(m, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body)).await
    }

    /// Creates a session of `assistant`; returns its id.
    pub async fn session(&self) -> String {
        let (status, v) = self
            .post("/v1/sessions", json!({"agent": "assistant"}))
            .await;
        assert_eq!(status, 201, "create session: {v}");
        v["id"].as_str().expect("id").to_string()
    }

    /// Sends and waits; returns (status, body).
    pub async fn send(&self, session: &str, content: &str) -> (u16, Value) {
        self.post(
            &format!("/v1/sessions/{session}/messages"),
            json!({"content": content}),
        )
        .await
    }

    /// Sends without waiting; returns the run id.
    pub async fn send_bg(&self, session: &str, content: &str) -> String {
        let (status, v) = self
            .post(
                &format!("/v1/sessions/{session}/messages"),
                json!({"content": content, "wait": false}),
            )
            .await;
        assert_eq!(status, 202, "background send: {v}");
        v["run"]["id"].as_str().expect("run id").to_string()
    }

    /// Polls a run until it has ended.
    pub async fn wait_run(&self, session: &str, run: &str) -> Value {
        for _ in 0..300 {
            let (_, v) = self
                .get(&format!("/v1/sessions/{session}/runs/{run}"))
                .await;
            if matches!(
                v["status"].as_str(),
                Some("completed" | "failed" | "cancelled" | "interrupted")
            ) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("run {run} did not end");
    }

    pub async fn messages(&self, session: &str) -> Vec<Value> {
        let (status, v) = self.get(&format!("/v1/sessions/{session}/messages")).await;
        assert_eq!(status, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }

    pub fn ws_url(&self, session: &str, query: &str) -> String {
        let base = self.base.replacen("http://", "ws://", 1);
        let mut q = query.to_string();
        if let Some(k) = &self.key {
            q = if q.is_empty() {
                format!("api_key={k}")
            } else {
                format!("{q}&api_key={k}")
            };
        }
        if q.is_empty() {
            format!("{base}/v1/sessions/{session}/ws")
        } else {
            format!("{base}/v1/sessions/{session}/ws?{q}")
        }
    }

    pub async fn ws(&self, session: &str, query: &str) -> Ws {
        let (socket, _) = tokio_tungstenite::connect_async(self.ws_url(session, query))
            .await
            .expect("ws connect");
        Ws::new(socket)
    }
}

/// A native WebSocket client.
pub struct Ws {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// How long [`Ws::next`] waits for a frame (10 s; longer for the embedded model's first token under load).
    pub wait: Duration,
}

impl Ws {
    pub fn new(socket: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Ws {
        Ws {
            socket,
            wait: Duration::from_secs(10),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.socket
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("ws send");
    }
    pub async fn send_raw(&mut self, text: &str) {
        self.socket
            .send(WsMessage::Text(text.to_string().into()))
            .await
            .expect("ws send");
    }

    /// The next JSON frame (panics after `wait` or on close).
    pub async fn next(&mut self) -> Value {
        self.next_within(self.wait).await.expect("ws frame")
    }

    pub async fn next_within(&mut self, d: Duration) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(d, self.socket.next())
                .await
                .ok()??
                .ok()?;
            match msg {
                WsMessage::Text(t) => return serde_json::from_str(t.as_str()).ok(),
                WsMessage::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Frames until (and including) the first that `stop` accepts.
    pub async fn until(&mut self, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self.next().await;
            let done = stop(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }

    /// Frames until a `run_finished`.
    pub async fn until_finished(&mut self) -> Vec<Value> {
        self.until(|v| v["type"] == "run_finished").await
    }
}

/// The concatenated `text_delta`s of the turn's own agent.
pub fn own_text(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "text_delta" && f["is_subagent"] == false)
        .filter_map(|f| f["delta"].as_str())
        .collect()
}

/// Asserts the frames' seqs are consecutive from `first`.
pub fn assert_gap_free(frames: &[Value], first: u64) {
    let seqs: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs not gap-free from {first}");
}

/// A real `agentd serve` process (for kill -9, SIGSTOP, SIGTERM).
pub struct Process {
    pub child: std::process::Child,
    pub url: String,
}

impl Process {
    pub fn client(&self) -> Client {
        Client {
            base: self.url.clone(),
            key: None,
            http: reqwest::Client::new(),
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    /// The exit code once the process has exited by itself, waiting up to `within`; None if it still runs.
    pub fn exited_within(&mut self, within: Duration) -> Option<Option<i32>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code());
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, then reaped.
    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// A test that fails part-way leaves no server behind (it would go on beating against a dropped database).
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Has the agent ask "Which colour?" through `ask_human` in a turn sent over a WebSocket of `c`: returns that
/// socket, the run and the question's request id once `input_requested` has arrived.
pub async fn ask_colour(
    c: &Client,
    upstream: &MockUpstream,
    session: &str,
) -> (Ws, String, String) {
    upstream.push(agentd_testkit::Reply::tool_call(
        "call_q",
        "ask_human",
        r#"{"question": "Which colour?"}"#,
    ));
    let mut ws = c.ws(session, "").await;
    ws.next().await;
    ws.send(json!({"type": "message", "content": "ask me"}))
        .await;
    let frames = ws.until(|f| f["type"] == "input_requested").await;
    let asked = frames.last().unwrap();
    let run = asked["run_id"].as_str().unwrap().to_string();
    let request_id = asked["request_id"].as_str().unwrap().to_string();
    (ws, run, request_id)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the binary on `config` and `port`, without waiting for it.
pub fn start_agentd(config: &std::path::Path, port: u16) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env(
            "RUST_LOG",
            std::env::var("AGENTD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .unwrap()
}

/// Starts the binary on `config` and a free port; returns once /healthz answers.
pub async fn spawn_agentd(config: &std::path::Path) -> Process {
    let port = free_port();
    let mut child = start_agentd(config, port);
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if reqwest::get(format!("{url}/healthz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Process { child, url };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("agentd did not start");
}

/// With `AGENTD_TEST_LOG` set (a `RUST_LOG`-style filter, e.g. `agentd=debug`), the in-process servers log to
/// the test's output (shown for a failed test), to see what a server did when a test failed.
fn log_when_asked() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("AGENTD_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// The answer the mock streams for `tokens=n`: "tok0 tok1 ... tok{n-1}".
pub fn mock_tokens(n: usize) -> String {
    (0..n)
        .map(|i| format!("tok{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}
