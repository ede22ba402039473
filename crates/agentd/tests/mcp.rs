//! MCP tool servers (SPEC.md section 7) end to end: a real agentd (in process over real sockets, or the real
//! binary), the mock upstream scripting the model's tool calls, and real MCP servers: the npm packages
//! `@modelcontextprotocol/server-everything` (stdio and streamable HTTP) and `server-filesystem`, pinned by
//! tests/mcp/package-lock.json and installed by `scripts/setup.sh test`, plus tests/mcp/misbehave.js, a server
//! that crashes mid-call, never answers, answers 20 MB, starts slowly and changes its tool list on purpose.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentd_testkit::Reply;
use common::{Client, Options, Server};
use serde_json::{json, Value};

/// tests/mcp, with its npm packages installed (never skipped: a machine without them fails here, saying how to
/// install them).
fn mcp_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp");
    let dir = dir.canonicalize().expect("tests/mcp");
    assert!(
        dir.join("node_modules/@modelcontextprotocol/server-everything").is_dir()
            && dir.join("node_modules/@modelcontextprotocol/server-filesystem").is_dir(),
        "the MCP test servers are not installed: run `scripts/setup.sh test` (or `cd tests/mcp && npm ci`)"
    );
    dir
}

fn everything_js() -> String {
    mcp_dir()
        .join("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
        .display()
        .to_string()
}

fn misbehave_js() -> String {
    mcp_dir().join("misbehave.js").display().to_string()
}

/// `[mcp_servers.NAME]` for a stdio server run by node.
fn stdio_server(name: &str, args: &[&str], more: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[mcp_servers.{name}]\ncommand = \"node\"\nargs = [{}]\n{more}\n",
        args.join(", ")
    )
}

/// The agent `assistant` with `tools`, replacing the base config's agent.
fn with_tools(extra: &str, tools: &[&str]) -> Options {
    let tools: Vec<String> = tools.iter().map(|t| format!("{t:?}")).collect();
    Options {
        extra: format!(
            "{extra}\n[[agents]]\nname = \"mcp\"\nprovider = \"upstream\"\nmodel = \"mock-model\"\ntools = [{}]\n",
            tools.join(", ")
        ),
        ..Options::default()
    }
}

async fn mcp_session(c: &Client) -> String {
    let (status, v) = c.post("/v1/sessions", json!({"agent": "mcp"})).await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// `GET /v1/mcp`'s entry for `name`.
async fn server_status(c: &Client, name: &str) -> Value {
    let (status, v) = c.get("/v1/mcp").await;
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no server {name} in {v}"))
}

/// Polls `GET /v1/mcp` until `name` satisfies `ok` (30 s at most).
async fn wait_server(c: &Client, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = server_status(c, name).await;
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "server {name} never got there: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(c: &Client, name: &str) -> Value {
    wait_server(c, name, |s| s["state"] == "ready").await
}

/// Every event of the session so far (a WebSocket from the log's start, until `run_finished` number `runs`).
async fn events(c: &Client, session: &str, runs: usize) -> Vec<Value> {
    let mut ws = c.ws(session, "after=0").await;
    ws.next().await;
    let mut out = Vec::new();
    let mut finished = 0;
    while finished < runs {
        let v = ws.next().await;
        if v["type"] == "run_finished" {
            finished += 1;
        }
        out.push(v);
    }
    out
}

fn finished_call<'a>(events: &'a [Value], call_id: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["type"] == "tool_finished" && e["call_id"] == call_id)
        .unwrap_or_else(|| panic!("no tool_finished for {call_id}"))
}

/// One turn in which the model calls `tool` with `args`; returns the call's `tool_finished` event and the
/// answer.
async fn call_through_turn(
    server: &Server,
    session: &str,
    turn: usize,
    call_id: &str,
    tool: &str,
    args: Value,
) -> (Value, String) {
    server
        .upstream
        .push(Reply::tool_call(call_id, tool, &args.to_string()));
    let c = server.client();
    let (status, v) = c.send(session, "use the tool").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["run"]["status"], "completed", "{v}");
    let answer = v["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let evs = events(&c, session, turn).await;
    (finished_call(&evs, call_id).clone(), answer)
}

/// A free port, then server-everything's streamable HTTP transport on it (killed on drop).
struct HttpEverything {
    child: std::process::Child,
    url: String,
}

impl HttpEverything {
    async fn start() -> HttpEverything {
        Self::start_on(common::free_port()).await
    }

    async fn start_on(port: u16) -> HttpEverything {
        let child = std::process::Command::new("node")
            .arg(everything_js())
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("node");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "server-everything did not listen"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        HttpEverything {
            child,
            url: format!("http://127.0.0.1:{port}/mcp"),
        }
    }
}

impl Drop for HttpEverything {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// server-everything over stdio and over streamable HTTP: tools listed under `SERVER__TOOL` (the agent's glob
/// and exact name decide which it gets), offered to the model, called in a turn, answered; `GET /v1/mcp`
/// counts the calls; `/metrics` shows the states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_over_stdio_and_streamable_http() {
    let http = HttpEverything::start().await;
    let extra = format!(
        "{}\n[mcp_servers.evh]\nurl = \"{}\"\n\n[mcp_servers.evs]\nurl = \"{}\"\nstartup_timeout_s = 5\n",
        stdio_server("ev", &[&everything_js(), "stdio"], ""),
        http.url,
        http.url.replacen("http://", "https://", 1)
    );
    let server =
        Server::start_with(with_tools(&extra, &["calculator", "ev__*", "evh__get-sum"])).await;
    let c = server.client();
    let ev = ready(&c, "ev").await;
    let evh = ready(&c, "evh").await;
    assert_eq!(ev["transport"], "stdio");
    assert_eq!(evh["transport"], "http");
    assert!(ev["protocol_version"].is_string(), "{ev}");
    // An https URL whose server speaks plain HTTP cannot connect: `failed`, naming the URL; the others work.
    let evs = wait_server(&c, "evs", |s| s["state"] == "failed").await;
    let error = evs["last_error"].as_str().unwrap();
    assert!(error.contains("cannot connect to https://"), "{evs}");
    let ev_tools: Vec<&str> = ev["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ev_tools.contains(&"ev__echo") && ev_tools.contains(&"ev__get-sum"),
        "{ev}"
    );

    // /v1/agents lists what the agent's entries expand to now.
    let (_, agents) = c.get("/v1/agents").await;
    let mcp = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "mcp")
        .unwrap();
    let tools: Vec<&str> = mcp["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        tools.contains(&"calculator") && tools.contains(&"ev__echo"),
        "{mcp}"
    );
    assert!(
        tools.contains(&"evh__get-sum") && !tools.contains(&"evh__echo"),
        "{mcp}"
    );

    let session = mcp_session(&c).await;
    let (done, answer) = call_through_turn(
        &server,
        &session,
        1,
        "c1",
        "ev__echo",
        json!({"message": "hello mcp"}),
    )
    .await;
    assert_eq!(done["success"], true, "{done}");
    assert!(
        done["result"].as_str().unwrap().contains("hello mcp"),
        "{done}"
    );
    assert!(answer.contains("hello mcp"), "{answer}");
    // The model was offered the MCP tools with their schemas.
    let first = &server.upstream.requests()[0];
    let offered: Vec<&str> = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert!(
        offered.contains(&"ev__echo") && offered.contains(&"evh__get-sum"),
        "{offered:?}"
    );
    assert!(!offered.contains(&"evh__echo"), "{offered:?}");
    let echo = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == "ev__echo")
        .unwrap();
    assert_eq!(
        echo["function"]["parameters"]["properties"]["message"]["type"], "string",
        "{echo}"
    );

    let (done, answer) = call_through_turn(
        &server,
        &session,
        2,
        "c2",
        "evh__get-sum",
        json!({"a": 2, "b": 3}),
    )
    .await;
    assert_eq!(done["success"], true, "{done}");
    assert!(done["result"].as_str().unwrap().contains('5'), "{done}");
    assert!(answer.contains('5'), "{answer}");

    let ev = server_status(&c, "ev").await;
    let evh = server_status(&c, "evh").await;
    assert_eq!(ev["calls"]["ok"], 1, "{ev}");
    assert_eq!(evh["calls"]["ok"], 1, "{evh}");

    let (_, metrics) = c.get("/metrics").await;
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.contains(r#"agentd_mcp_server_state{server="evh",state="ready"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"agentd_mcp_tool_calls_total{outcome="ok",server="ev"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"agentd_tool_calls_total{outcome="success",tool="ev__echo"} 1"#),
        "{text}"
    );

    // The HTTP server goes away: its call fails naming it, agentd notices and reconnects (with back-off) once
    // it is back on its port, and lists its tools again.
    let port: u16 = http
        .url
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/mcp")
        .parse()
        .unwrap();
    drop(http);
    let (done, _) = call_through_turn(
        &server,
        &session,
        3,
        "c3",
        "evh__get-sum",
        json!({"a": 1, "b": 1}),
    )
    .await;
    assert_eq!(done["success"], false, "{done}");
    assert!(
        done["result"]
            .as_str()
            .unwrap()
            .contains("MCP server `evh`"),
        "{done}"
    );
    wait_server(&c, "evh", |s| s["state"] != "ready").await;
    let _http = HttpEverything::start_on(port).await;
    let evh = wait_server(&c, "evh", |s| s["state"] == "ready").await;
    assert!(evh["restarts"].as_u64() >= Some(1), "{evh}");
    let (done, _) = call_through_turn(
        &server,
        &session,
        4,
        "c4",
        "evh__get-sum",
        json!({"a": 20, "b": 22}),
    )
    .await;
    assert_eq!(done["success"], true, "{done}");
    assert!(done["result"].as_str().unwrap().contains("42"), "{done}");
}

/// The user message that follows a tool result in an upstream request, if it carries image parts: the image
/// data URLs.
fn images_after_tool_result(request: &Value, call_id: &str) -> Vec<String> {
    let messages = request["messages"].as_array().unwrap();
    let Some(at) = messages
        .iter()
        .position(|m| m["role"] == "tool" && m["tool_call_id"] == call_id)
    else {
        return Vec::new();
    };
    let Some(next) = messages.get(at + 1).filter(|m| m["role"] == "user") else {
        return Vec::new();
    };
    next["content"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p["image_url"]["url"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An MCP tool's image (server-everything's `get-tiny-image`, a PNG) reaches the model as an image part after
/// the tool's text result, is stored with the result, and is shown again on the session's next turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_image_reaches_the_model_as_an_image_part() {
    let extra = stdio_server("ev", &[&everything_js(), "stdio"], "");
    let server = Server::start_with(with_tools(&extra, &["ev__*"])).await;
    let c = server.client();
    ready(&c, "ev").await;
    let session = mcp_session(&c).await;
    let (done, _) = call_through_turn(
        &server,
        &session,
        1,
        "img1",
        "ev__get-tiny-image",
        json!({}),
    )
    .await;
    assert_eq!(done["success"], true, "{done}");
    let result = done["result"].as_str().unwrap();
    assert!(result.contains("Here's the image you requested:"), "{done}");
    assert!(result.contains("[image image/png, "), "{done}");
    assert!(result.contains("bytes, attached]"), "{done}");
    assert!(
        !result.contains("iVBOR"),
        "the image data stays out of the text: {done}"
    );

    let requests = server.upstream.requests();
    assert_eq!(requests.len(), 2);
    let images = images_after_tool_result(&requests[1], "img1");
    assert_eq!(images.len(), 1, "{}", requests[1]["messages"]);
    assert!(
        images[0].starts_with("data:image/png;base64,iVBORw0KGgo"),
        "{}",
        &images[0][..40.min(images[0].len())]
    );

    // Stored with the result: the message list shows it, and the next turn's prompt (built from the store)
    // shows the image again.
    let (status, messages) = c.get(&format!("/v1/sessions/{session}/messages")).await;
    assert_eq!(status, 200, "{messages}");
    let list = messages
        .as_array()
        .or_else(|| messages["messages"].as_array())
        .unwrap();
    let tool = list
        .iter()
        .find(|m| m["role"] == "tool" && m["tool_call_id"] == "img1")
        .unwrap();
    assert_eq!(tool["images"].as_array().map(Vec::len), Some(1), "{tool}");
    let (status, v) = c.send(&session, "what was in the picture?").await;
    assert_eq!(status, 200, "{v}");
    let requests = server.upstream.requests();
    assert_eq!(
        images_after_tool_result(&requests[2], "img1"),
        images,
        "the next turn's prompt shows the stored image again"
    );
}

/// server-filesystem reads a file inside the directory it was given, and refuses one outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_reads_inside_its_directory_only() {
    let shared = tempfile::tempdir().unwrap();
    let shared_path = shared.path().canonicalize().unwrap();
    std::fs::write(shared_path.join("note.txt"), "the shared note").unwrap();
    let fs_js =
        mcp_dir().join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    let extra = stdio_server(
        "files",
        &[
            &fs_js.display().to_string(),
            &shared_path.display().to_string(),
        ],
        "",
    );
    let server = Server::start_with(with_tools(&extra, &["files__read_text_file"])).await;
    let c = server.client();
    ready(&c, "files").await;
    let session = mcp_session(&c).await;
    let inside = shared_path.join("note.txt").display().to_string();
    let (done, answer) = call_through_turn(
        &server,
        &session,
        1,
        "r1",
        "files__read_text_file",
        json!({"path": inside}),
    )
    .await;
    assert_eq!(done["success"], true, "{done}");
    assert_eq!(done["result"], "the shared note");
    assert!(answer.contains("the shared note"), "{answer}");
    let (done, _) = call_through_turn(
        &server,
        &session,
        2,
        "r2",
        "files__read_text_file",
        json!({"path": "/etc/hostname"}),
    )
    .await;
    assert_eq!(done["success"], false, "{done}");
    // A tool the agent does not list is not offered, and a call to it is an unknown tool.
    let (done, _) = call_through_turn(
        &server,
        &session,
        3,
        "r3",
        "files__write_file",
        json!({"path": inside, "content": "x"}),
    )
    .await;
    assert_eq!(done["success"], false, "{done}");
    assert!(
        done["result"].as_str().unwrap().contains("unknown tool"),
        "{done}"
    );
    assert_eq!(
        std::fs::read_to_string(shared_path.join("note.txt")).unwrap(),
        "the shared note"
    );
}

/// The `env` key that makes misbehave.js record its starts and the cancellations it receives in `dir`.
fn log_env(dir: &Path) -> String {
    let log = dir.join("misbehave.log").display().to_string();
    format!("env = {{ MISBEHAVE_LOG = {log:?} }}")
}

/// The config file of a real agentd process on `dir` (`extra` after the base config).
fn binary_config(dir: &Path, upstream: &agentd_testkit::MockUpstream, extra: &str) -> PathBuf {
    let text = common::config_text(&upstream.base_url(), dir, 30, extra);
    let config = dir.join("agentd.toml");
    std::fs::write(&config, text).unwrap();
    config
}

fn misbehave_log(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("misbehave.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (5 s at most) until the misbehaving server has received a `notifications/cancelled`.
async fn server_told_to_cancel(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !misbehave_log(dir)
        .iter()
        .any(|e| e.get("cancelled").is_some())
    {
        assert!(
            Instant::now() < deadline,
            "no notifications/cancelled reached the server: {:?}",
            misbehave_log(dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The misbehaving server: a call that never answers times out naming the server and is cancelled on it, while
/// another server's call goes through at once; a 20 MB answer arrives bounded; a crash mid-call fails that call
/// naming the server, which is restarted and works again; a changed tool list is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_server_never_stops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let env = format!("timeout_s = 2\n{}", log_env(dir.path()));
    let extra = format!(
        "{}\n{}",
        stdio_server("bad", &[&misbehave_js()], &env),
        stdio_server("good", &[&misbehave_js()], "")
    );
    let mut opts = with_tools(&extra, &["bad__*", "good__ok"]);
    opts.server_extra = "max_tool_result_bytes = 4096".into();
    let server = Server::start_with(opts).await;
    let c = server.client();
    ready(&c, "bad").await;
    ready(&c, "good").await;

    // Never answers: the turn goes on after timeout_s with an error naming the server; meanwhile the other
    // server's tool answers at once.
    let s1 = mcp_session(&c).await;
    server
        .upstream
        .push(Reply::tool_call("h1", "bad__hang", "{}"));
    let started = Instant::now();
    let hang = {
        let c = c.clone();
        let s1 = s1.clone();
        tokio::spawn(async move { c.send(&s1, "hang please").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s2 = mcp_session(&c).await;
    let quick = Instant::now();
    let (done, _) =
        call_through_turn(&server, &s2, 1, "g1", "good__ok", json!({"text": "fine"})).await;
    assert_eq!(done["result"], "fine", "{done}");
    assert!(
        quick.elapsed() < Duration::from_millis(1500),
        "{:?}",
        quick.elapsed()
    );
    let (status, v) = hang.await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let evs = events(&c, &s1, 1).await;
    let done = finished_call(&evs, "h1");
    assert_eq!(done["success"], false, "{done}");
    let result = done["result"].as_str().unwrap();
    assert!(
        result.contains("MCP server `bad`") && result.contains("within 2 s"),
        "{result}"
    );
    // The server was told to stop the call.
    server_told_to_cancel(dir.path()).await;
    let bad = server_status(&c, "bad").await;
    assert_eq!(bad["calls"]["timeout"], 1, "{bad}");
    assert_eq!(
        bad["state"], "ready",
        "a hung tool is not a hung server: {bad}"
    );

    // 20 MB answer: the model and the log see at most max_tool_result_bytes (here the MCP client's own cut at
    // max_upload_bytes, 2048 in these tests, comes first), with a note.
    let (done, _) = call_through_turn(&server, &s2, 2, "b1", "bad__big", json!({"mb": 20})).await;
    assert_eq!(done["success"], true, "{done}");
    let result = done["result"].as_str().unwrap();
    assert!(result.len() < 4096 + 512, "{} bytes", result.len());
    assert!(result.starts_with("xxxx"), "{}", &result[..100]);
    assert!(
        result.ends_with("more bytes of the MCP server's answer were dropped]"),
        "{}",
        &result[2000..]
    );

    // Crash mid-call: that call fails naming the server; the server comes back and answers again.
    let starts = || {
        misbehave_log(dir.path())
            .iter()
            .filter(|e| *e == "start")
            .count()
    };
    let before = starts();
    let (done, _) = call_through_turn(&server, &s2, 3, "x1", "bad__crash", json!({})).await;
    assert_eq!(done["success"], false, "{done}");
    assert!(
        done["result"]
            .as_str()
            .unwrap()
            .contains("MCP server `bad`"),
        "{done}"
    );
    let bad = wait_server(&c, "bad", |s| {
        s["restarts"].as_u64() >= Some(1) && s["state"] == "ready"
    })
    .await;
    assert!(bad["last_error"].is_null(), "{bad}");
    assert_eq!(starts(), before + 1);
    let (done, _) =
        call_through_turn(&server, &s2, 4, "o1", "bad__ok", json!({"text": "back"})).await;
    assert_eq!(done["result"], "back", "{done}");

    // A changed tool list is read again and offered from the next model call on.
    assert!(!server_status(&c, "bad").await["tools"]
        .as_array()
        .unwrap()
        .contains(&json!("bad__added")));
    let (done, _) = call_through_turn(&server, &s2, 5, "ch", "bad__change", json!({})).await;
    assert_eq!(done["result"], "changed");
    wait_server(&c, "bad", |s| {
        s["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("bad__added"))
    })
    .await;
    let (done, _) = call_through_turn(&server, &s2, 6, "ad", "bad__added", json!({})).await;
    assert_eq!(done["result"], "added", "{done}");
    let offered: Vec<String> = server.upstream.last_request().unwrap()["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["function"]["name"].as_str().map(String::from))
        .collect();
    assert!(offered.contains(&"bad__added".to_string()), "{offered:?}");
}

/// Cancelling a run cancels its in-flight MCP call, on the server too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_cancels_its_mcp_call() {
    let dir = tempfile::tempdir().unwrap();
    let env = log_env(dir.path());
    let server = Server::start_with(with_tools(
        &stdio_server("bad", &[&misbehave_js()], &env),
        &["bad__*"],
    ))
    .await;
    let c = server.client();
    ready(&c, "bad").await;
    let session = mcp_session(&c).await;
    server
        .upstream
        .push(Reply::tool_call("h1", "bad__hang", "{}"));
    let mut ws = c.ws(&session, "").await;
    ws.next().await;
    ws.send(json!({"type": "message", "content": "hang"})).await;
    let frames = ws.until(|f| f["type"] == "tool_started").await;
    let run = frames.last().unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{session}/runs/{run}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    server_told_to_cancel(dir.path()).await;
    assert_eq!(server_status(&c, "bad").await["calls"]["cancelled"], 1);
}

/// The real binary: it answers at once while a slow server starts (`starting`, then `ready`); a call to a
/// server not ready yet fails at once naming it; a server whose command does not exist is `failed` with the
/// cause and retried with back-off, and never stops agentd; a stdio server's stderr reaches agentd's log with
/// its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_broken_servers_with_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = agentd_testkit::MockUpstream::start().await;
    let extra = format!(
        "{}\n{}\n[mcp_servers.broken]\ncommand = \"/nonexistent/mcp-server\"\n\n[[agents]]\nname = \"mcp\"\nprovider = \"upstream\"\nmodel = \"mock-model\"\ntools = [\"slow__*\", \"broken__*\", \"noisy__ok\"]\n",
        stdio_server("slow", &[&misbehave_js(), "--slow-start", "8000"], "startup_timeout_s = 20"),
        stdio_server("noisy", &[&misbehave_js(), "--stderr-flood", "500"], ""),
    );
    let config = binary_config(dir.path(), &upstream, &extra);
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let port = common::free_port();
    let started = Instant::now();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut process = common::Process {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let c = process.client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c
        .http
        .get(format!("{}/healthz", c.base))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "agentd did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a slow MCP server delayed agentd: {:?}",
        started.elapsed()
    );
    let slow = server_status(&c, "slow").await;
    assert_eq!(slow["state"], "starting", "{slow}");

    // A call to a server that is not ready fails at once, naming it.
    let (_, s) = c.post("/v1/sessions", json!({"agent": "mcp"})).await;
    let session = s["id"].as_str().unwrap().to_string();
    upstream.push(Reply::tool_call("s1", "slow__ok", r#"{"text": "hi"}"#));
    let t = Instant::now();
    let (status, v) = c.send(&session, "go").await;
    assert_eq!(status, 200, "{v}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let evs = events(&c, &session, 1).await;
    let done = finished_call(&evs, "s1");
    assert_eq!(done["success"], false);
    assert!(
        done["result"]
            .as_str()
            .unwrap()
            .contains("MCP server `slow` is not ready (starting)"),
        "{done}"
    );

    let slow = wait_server(&c, "slow", |s| s["state"] == "ready").await;
    assert_eq!(slow["restarts"], 0, "{slow}");
    let broken = wait_server(&c, "broken", |s| s["restarts"].as_u64() >= Some(1)).await;
    assert_eq!(broken["state"], "failed", "{broken}");
    assert!(
        broken["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot start `/nonexistent/mcp-server`"),
        "{broken}"
    );
    upstream.push(Reply::tool_call("b1", "broken__anything", "{}"));
    let (status, _) = c.send(&session, "go").await;
    assert_eq!(status, 200);
    let evs = events(&c, &session, 2).await;
    let done = finished_call(&evs, "b1");
    assert!(
        done["result"]
            .as_str()
            .unwrap()
            .contains("MCP server `broken` is not ready (failed): cannot start"),
        "{done}"
    );
    assert!(
        process.exited_within(Duration::from_millis(10)).is_none(),
        "agentd stopped"
    );

    // stderr lines carry the server's name; a flood is cut to the per-second budget.
    process.signal("TERM");
    assert!(process.exited_within(Duration::from_secs(15)).is_some());
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(log.contains("[noisy] misbehave: noise line 0"), "{log}");
    assert!(
        !log.contains("[noisy] misbehave: noise line 499"),
        "the flood was not bounded"
    );
    assert!(log.contains("stderr lines not logged"), "{log}");
}

/// An agent whose MCP tool calls need approval (`approve = ["m__*"]`), on the misbehaving server's `ok`.
fn approving(more_server: &str) -> Options {
    let mut opts = with_tools(
        &stdio_server("m", &[&misbehave_js()], ""),
        &["m__ok", "calculator"],
    );
    opts.extra.push_str("approve = [\"m__*\"]\n");
    opts.server_extra = more_server.to_string();
    opts
}

async fn next_of(ws: &mut common::Ws, ty: &str) -> Value {
    ws.until(|f| f["type"] == ty).await.pop().unwrap()
}

/// Approvals (SPEC.md section 7): the call waits (`approval_requested`, run `waiting_input`, the pending
/// gauge) until another client allows it over the native WebSocket; a second answer is 409; a denial over
/// REST reaches the model as a failed result with the reason and the server never sees the call; agentkit's
/// `reply` of `yes` to its `ask_human` frame approves; calls not matching `approve` run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_over_the_websocket_rest_and_agentkit() {
    let server = Server::start_with(approving("")).await;
    let c = server.client();
    ready(&c, "m").await;
    let session = mcp_session(&c).await;
    let mut ws = c.ws(&session, "").await;
    ws.next().await;

    // Allowed from a second client's WebSocket.
    server
        .upstream
        .push(Reply::tool_call("a1", "m__ok", r#"{"text": "approved!"}"#));
    ws.send(json!({"type": "message", "content": "go"})).await;
    let asked = next_of(&mut ws, "approval_requested").await;
    assert_eq!(asked["call_id"], "a1", "{asked}");
    assert_eq!(asked["tool"], "m__ok");
    assert_eq!(asked["args"], json!({"text": "approved!"}));
    let request_id = asked["request_id"].as_str().unwrap().to_string();
    let run = asked["run_id"].as_str().unwrap().to_string();
    let (_, r) = c.get(&format!("/v1/sessions/{session}/runs/{run}")).await;
    assert_eq!(r["status"], "waiting_input", "{r}");
    let (_, metrics) = c.get("/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(r#"agentd_pending_inputs{kind="approval"} 1"#),
        "{metrics}"
    );
    assert_eq!(server_status(&c, "m").await["calls"]["total"], 0);
    let mut other = c.ws(&session, "").await;
    other.next().await;
    other
        .send(json!({"type": "approval", "request_id": request_id, "decision": "allow"}))
        .await;
    let frames = ws.until_finished().await;
    let resolved = frames
        .iter()
        .find(|f| f["type"] == "approval_resolved")
        .unwrap();
    assert_eq!(resolved["request_id"], request_id.as_str());
    assert_eq!(resolved["decision"], "allow");
    assert!(resolved["reason"].is_null(), "{resolved}");
    let done = finished_call(&frames, "a1");
    assert_eq!(done["success"], true, "{done}");
    assert_eq!(done["result"], "approved!");
    assert_eq!(frames.last().unwrap()["run"]["status"], "completed");
    // Once: a second answer is a conflict; an unknown request is 404.
    let path = format!("/v1/sessions/{session}/runs/{run}/approvals/{request_id}");
    let (status, body) = c.post(&path, json!({"decision": "deny"})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    let (status, _) = c
        .post(
            &format!("/v1/sessions/{session}/runs/{run}/approvals/nope"),
            json!({"decision": "allow"}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, body) = c.post(&path, json!({"decision": "maybe"})).await;
    assert!(status == 400 || status == 422, "{status} {body}");

    // Denied over REST, with a reason: the call never reaches the server; the model reads why.
    server
        .upstream
        .push(Reply::tool_call("a2", "m__ok", r#"{"text": "never"}"#));
    let run = c.send_bg(&session, "again").await;
    let asked = next_of(&mut ws, "approval_requested").await;
    let request_id = asked["request_id"].as_str().unwrap();
    let (status, body) = c
        .post(
            &format!("/v1/sessions/{session}/runs/{run}/approvals/{request_id}"),
            json!({"decision": "deny", "reason": "not today"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let frames = ws.until_finished().await;
    let resolved = frames
        .iter()
        .find(|f| f["type"] == "approval_resolved")
        .unwrap();
    assert_eq!(resolved["decision"], "deny");
    assert_eq!(resolved["reason"], "not today");
    let done = finished_call(&frames, "a2");
    assert_eq!(done["success"], false, "{done}");
    let result = done["result"].as_str().unwrap();
    assert!(
        result.contains("denied") && result.contains("not today"),
        "{result}"
    );
    assert_eq!(server_status(&c, "m").await["calls"]["total"], 1);
    let sent = server.upstream.last_request().unwrap();
    assert!(
        sent.to_string().contains("not today"),
        "the model did not read the denial"
    );

    // agentkit: the approval is its `ask_human` frame; a reply of `yes` approves.
    let kit = server.url.replacen("http://", "ws://", 1);
    let (socket, _) = tokio_tungstenite::connect_async(format!("{kit}/chat/ws/{session}"))
        .await
        .unwrap();
    let mut kit = common::Ws::new(socket);
    server.upstream.push(Reply::tool_call(
        "a3",
        "m__ok",
        r#"{"text": "via agentkit"}"#,
    ));
    c.send_bg(&session, "third").await;
    let asked = next_of(&mut kit, "ask_human").await;
    let question = asked["question"].as_str().unwrap();
    assert!(
        question.contains("m__ok") && question.contains("via agentkit"),
        "{question}"
    );
    kit.send(json!({"type": "reply", "request_id": asked["request_id"], "content": "yes"}))
        .await;
    let frames = ws.until_finished().await;
    assert_eq!(finished_call(&frames, "a3")["result"], "via agentkit");
    assert_eq!(
        frames
            .iter()
            .find(|f| f["type"] == "approval_resolved")
            .unwrap()["decision"],
        "allow"
    );

    // A tool the agent does not list under `approve` runs without asking.
    server.upstream.push(Reply::tool_call(
        "a4",
        "calculator",
        r#"{"expression": "6*7"}"#,
    ));
    ws.send(json!({"type": "message", "content": "sum"})).await;
    let frames = ws.until_finished().await;
    assert!(!frames.iter().any(|f| f["type"] == "approval_requested"));
    assert_eq!(finished_call(&frames, "a4")["result"], "42");
}

/// With the real binary: an approval pending when the process is killed keeps waiting after the restart under
/// its request id (and the call runs once allowed); an approval nobody answers is denied after
/// `server.ask_human_timeout_s`, and the model reads that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_survives_a_restart_and_times_out_as_a_denial() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = agentd_testkit::MockUpstream::start().await;
    let extra = format!(
        "{}\n[[agents]]\nname = \"mcp\"\nprovider = \"upstream\"\nmodel = \"mock-model\"\ntools = [\"m__ok\"]\napprove = [\"m__ok\"]\n\n[cluster]\nnode_id = \"the-node\"\n",
        stdio_server("m", &[&misbehave_js()], ""),
    );
    let config = binary_config(dir.path(), &upstream, &extra);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("ask_human_timeout_s = 30", "ask_human_timeout_s = 3"),
    )
    .unwrap();
    let mut p = common::spawn_agentd(&config).await;
    let c = p.client();
    ready(&c, "m").await;
    let session = mcp_session(&c).await;
    upstream.push(Reply::tool_call(
        "k1",
        "m__ok",
        r#"{"text": "after the restart"}"#,
    ));
    let run = c.send_bg(&session, "go").await;
    let mut ws = c.ws(&session, "after=0").await;
    ws.next().await;
    let asked = next_of(&mut ws, "approval_requested").await;
    let request_id = asked["request_id"].as_str().unwrap().to_string();
    p.kill_9();

    let mut p2 = common::spawn_agentd(&config).await;
    let c2 = p2.client();
    let mut ws = c2.ws(&session, "after=0").await;
    ws.next().await;
    next_of(&mut ws, "run_resumed").await;
    // The resumed run waits for its MCP server's first start, then for the decision again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, r) = c2.get(&format!("/v1/sessions/{session}/runs/{run}")).await;
        if r["status"] == "waiting_input" {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = c2
        .post(
            &format!("/v1/sessions/{session}/runs/{run}/approvals/{request_id}"),
            json!({"decision": "allow"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let frames = ws.until_finished().await;
    let done = finished_call(&frames, "k1");
    assert_eq!(done["result"], "after the restart", "{done}");
    assert_eq!(frames.last().unwrap()["run"]["status"], "completed");
    // Asked once (before the kill), answered once.
    let all = events(&c2, &session, 1).await;
    assert_eq!(
        all.iter()
            .filter(|e| e["type"] == "approval_requested")
            .count(),
        1
    );

    // Nobody answers: denied after ask_human_timeout_s (3 s).
    upstream.push(Reply::tool_call("k2", "m__ok", r#"{"text": "too late"}"#));
    let started = Instant::now();
    let (status, v) = c2.send(&session, "again").await;
    assert_eq!(status, 200, "{v}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let all = events(&c2, &session, 2).await;
    let resolved = all
        .iter()
        .rev()
        .find(|e| e["type"] == "approval_resolved")
        .unwrap();
    assert_eq!(resolved["decision"], "deny");
    assert!(
        resolved["reason"]
            .as_str()
            .unwrap()
            .contains("no decision within 3 s"),
        "{resolved}"
    );
    let done = finished_call(&all, "k2");
    assert_eq!(done["success"], false);
    assert!(
        done["result"].as_str().unwrap().contains("denied"),
        "{done}"
    );
    assert_eq!(server_status(&c2, "m").await["calls"]["total"], 1);
    p2.kill_9();
}

/// A read-only MCP call in flight when the process is killed runs again after the restart (SPEC.md section 4:
/// tools annotated `readOnlyHint` are safe to repeat), once its server is back: the resumed run waits for the
/// servers' first start instead of judging the call against an empty tool list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_mcp_call_in_flight_at_a_kill_runs_again_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = agentd_testkit::MockUpstream::start().await;
    let env = log_env(dir.path());
    let extra = format!(
        "{}\n[[agents]]\nname = \"mcp\"\nprovider = \"upstream\"\nmodel = \"mock-model\"\ntools = [\"m__*\"]\n\n[cluster]\nnode_id = \"the-node\"\n",
        stdio_server("m", &[&misbehave_js()], &env),
    );
    let config = binary_config(dir.path(), &upstream, &extra);
    let mut p = common::spawn_agentd(&config).await;
    let c = p.client();
    ready(&c, "m").await;
    let session = mcp_session(&c).await;
    upstream.push(Reply::tool_call("l1", "m__second_life", "{}"));
    let run = c.send_bg(&session, "go").await;
    let mut ws = c.ws(&session, "after=0").await;
    ws.next().await;
    next_of(&mut ws, "tool_started").await;
    p.kill_9();

    let mut p2 = common::spawn_agentd(&config).await;
    let c2 = p2.client();
    let done = c2.wait_run(&session, &run).await;
    assert_eq!(done["status"], "completed", "{done}");
    let all = events(&c2, &session, 1).await;
    let finished = finished_call(&all, "l1");
    assert_eq!(finished["success"], true, "{finished}");
    assert_eq!(finished["result"], "second life", "{finished}");
    p2.kill_9();
}
