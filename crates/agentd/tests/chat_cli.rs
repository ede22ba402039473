//! `agentd chat` end to end: the real binary, driven through stdin/stdout pipes (and SIGINT), against a real
//! agentd over real HTTP and WebSocket with the mock upstream behind it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_testkit::{Reply, THINKING};
use common::{Options, Server};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

const KEY: &str = "sk-chat-test";
const WAIT: Duration = Duration::from_secs(20);

/// A running `agentd chat` with its output collected as it arrives.
struct Chat {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

fn collect(mut r: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let sink = buf.clone();
    tokio::spawn(async move {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

impl Chat {
    fn spawn(url: &str, args: &[&str]) -> Chat {
        Self::spawn_env(url, args, &[])
    }

    fn spawn_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> Chat {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.arg("chat")
            .arg("--url")
            .arg(url)
            .args(args)
            .env_remove("AGENTD_API_KEY")
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn agentd chat");
        let stdin = child.stdin.take();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Chat {
            child,
            stdin,
            out,
            err,
        }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn errors(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until stdout contains `needle`; returns stdout at that moment.
    async fn wait_for(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let out = self.output();
            if out.contains(needle) {
                return out;
            }
            if start.elapsed() > WAIT {
                panic!(
                    "`{needle}` did not appear within {WAIT:?}.\nstdout:\n{out}\nstderr:\n{}",
                    self.errors()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn line(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{text}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn interrupt(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -INT {pid}");
    }

    /// The exit code, once the process has ended.
    async fn exit_code(&mut self) -> i32 {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "agentd chat did not exit.\nstdout:\n{}\nstderr:\n{}",
                    self.output(),
                    self.errors()
                )
            })
            .unwrap();
        // Let the readers drain what was written just before the exit.
        tokio::time::sleep(Duration::from_millis(50)).await;
        status.code().unwrap_or(-1)
    }

    /// The session id from the banner line.
    async fn session_id(&self) -> String {
        let out = self.wait_for(" with ").await;
        let line = out
            .lines()
            .find(|l| l.contains("session ") && l.contains(" with "))
            .unwrap();
        line.split_whitespace()
            .skip_while(|w| *w != "session")
            .nth(1)
            .unwrap()
            .to_string()
    }
}

/// The session's runs' statuses, oldest first.
async fn run_statuses(s: &Server, id: &str) -> Vec<String> {
    let (_, runs) = s.client().get(&format!("/v1/sessions/{id}/runs")).await;
    let mut runs = runs.as_array().unwrap().clone();
    runs.sort_by_key(|r| timestamp(&r["created_at"]));
    runs.iter()
        .map(|r| r["status"].as_str().unwrap().to_string())
        .collect()
}

/// An agent `guarded` whose calculator calls wait for a person's approval (SPEC.md section 7).
fn guarded() -> Options {
    Options {
        extra: "[[agents]]\nname = \"guarded\"\nprovider = \"upstream\"\nmodel = \"mock-model\"\n\
                tools = [\"calculator\"]\napprove = [\"calculator\"]\n"
            .to_string(),
        ..Options::default()
    }
}

/// The contents of the messages of `role`, in order.
fn contents(messages: &[Value], role: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["role"] == role)
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

/// The latest `approval_requested` of the session's log: (run id, request id).
async fn latest_approval(s: &Server, id: &str) -> (String, String) {
    let mut ws = s.client().ws(id, "after=0").await;
    let hello = ws.next().await;
    let last = hello["last_seq"].as_u64().unwrap();
    let frames = ws.until(|f| f["seq"].as_u64() == Some(last)).await;
    let asked = frames
        .iter()
        .rev()
        .find(|f| f["type"] == "approval_requested")
        .unwrap();
    (
        asked["run_id"].as_str().unwrap().to_string(),
        asked["request_id"].as_str().unwrap().to_string(),
    )
}

fn auth_options() -> Options {
    Options {
        extra: format!("[[auth.keys]]\nprincipal = \"alice\"\nkey = \"{KEY}\"\n"),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_answers_with_thinking_and_tool_calls_then_quits() {
    let s = Server::start().await;
    let mut chat = Chat::spawn(&s.url, &[]);
    let id = chat.session_id().await;
    chat.line("tokens=40 delay_ms=40").await;
    // Tokens show up while the turn is still running: streamed, not printed at the end.
    let early = chat.wait_for("tok2").await;
    assert!(!early.contains("tok39"), "printed all at once:\n{early}");
    chat.wait_for(&common::mock_tokens(40)).await;
    // The client prints the deltas as they come; the answer's `message` is committed just after them.
    let mut stored = s.client().messages(&id).await;
    for _ in 0..100 {
        if stored.last().is_some_and(|m| m["role"] == "assistant") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stored = s.client().messages(&id).await;
    }
    assert_eq!(stored.last().unwrap()["content"], common::mock_tokens(40));

    chat.line("think tokens=2").await;
    let out = chat
        .wait_for("thinking: Let me think about this.\ntok0 tok1\n")
        .await;
    assert!(out.contains(&common::mock_tokens(40)));
    chat.line("calc: 6*7").await;
    let out = chat.wait_for("The result is 42.").await;
    assert!(
        out.contains("→ calculator {\"expression\":\"6*7\"}\n"),
        "{out}"
    );
    assert!(out.contains("← calculator: 42\n"), "{out}");
    assert!(
        !out.contains('\x1b'),
        "no colour codes when not on a terminal"
    );
    chat.line("/quit").await;
    assert_eq!(chat.exit_code().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_a_session_by_id_showing_its_history() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, _) = c.send(&id, "remember the word kumquat").await;
    assert_eq!(status, 200);
    let mut chat = Chat::spawn(&s.url, &["--session", &id]);
    chat.wait_for(&format!("resumed session {id} with assistant"))
        .await;
    // The history is the log replayed as the live view prints it.
    chat.wait_for(
        "you: remember the word kumquat\necho: remember the word kumquat\n(end of history)\n",
    )
    .await;
    chat.line("tokens=3").await;
    chat.wait_for("tok0 tok1 tok2").await;
    chat.line("/quit").await;
    assert_eq!(chat.exit_code().await, 0);
    assert_eq!(c.messages(&id).await.len(), 4, "the same session went on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_mid_turn_shows_the_partial_answer_and_continues() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let run = c.send_bg(&id, "tokens=80 delay_ms=30").await;
    // Let part of the answer happen before the client arrives.
    let mut ws = c.ws(&id, "after=0").await;
    ws.until(|f| f["type"] == "text_delta" && f["delta"] == " tok5")
        .await;
    let mut chat = Chat::spawn(&s.url, &["--session", &id]);
    let out = chat.wait_for(&common::mock_tokens(80)).await;
    assert_eq!(out.matches("tok0 ").count(), 1, "each token once:\n{out}");
    assert!(
        out.contains("you: tokens=80 delay_ms=30\n"),
        "the turn's message is shown:\n{out}"
    );
    assert_eq!(c.wait_run(&id, &run).await["status"], "completed");
    chat.close_stdin();
    assert_eq!(chat.exit_code().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_turn_and_a_second_ctrl_c_exits() {
    let s = Server::start().await;
    let mut chat = Chat::spawn(&s.url, &[]);
    let id = chat.session_id().await;
    chat.line("tokens=500 delay_ms=20").await;
    chat.wait_for("tok2 ").await;
    chat.interrupt();
    let out = chat.wait_for("[run cancelled]").await;
    assert!(out.contains("^C cancelling the turn"), "{out}");
    assert!(!out.contains("tok499"), "{out}");
    let statuses = run_statuses(&s, &id).await;
    assert_eq!(statuses, ["cancelled"]);
    // Still running after the first Ctrl-C; the second one ends it.
    assert!(chat.child.try_wait().unwrap().is_none());
    chat.interrupt();
    assert_eq!(chat.exit_code().await, 130);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_input_waits_for_the_running_turn() {
    let s = Server::start().await;
    let mut chat = Chat::spawn(&s.url, &[]);
    chat.session_id().await;
    chat.line("tokens=20 delay_ms=20").await;
    chat.close_stdin();
    assert_eq!(chat.exit_code().await, 0);
    assert!(
        chat.output().contains(&common::mock_tokens(20)),
        "{}",
        chat.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_with_an_api_key_and_refuses_a_wrong_one_clearly() {
    let s = Server::start_with(auth_options()).await;
    let mut chat = Chat::spawn(&s.url, &["--api-key", KEY]);
    let id = chat.session_id().await;
    chat.line("tokens=3").await;
    chat.wait_for("tok0 tok1 tok2").await;
    chat.line("/quit").await;
    assert_eq!(chat.exit_code().await, 0);
    let (status, session): (u16, Value) = s.client().get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        status, 200,
        "the session belongs to the key's principal: {session}"
    );

    // The key from the environment works too.
    let mut chat = Chat::spawn_env(&s.url, &["--session", &id], &[("AGENTD_API_KEY", KEY)]);
    chat.wait_for("you: tokens=3").await;
    chat.close_stdin();
    assert_eq!(chat.exit_code().await, 0);

    let mut wrong = Chat::spawn(&s.url, &["--api-key", "not-the-key"]);
    assert_eq!(wrong.exit_code().await, 1);
    assert!(
        wrong.errors().contains("refused the API key (401"),
        "{}",
        wrong.errors()
    );
    let mut none = Chat::spawn(&s.url, &[]);
    assert_eq!(none.exit_code().await, 1);
    assert!(
        none.errors().contains("needs an API key"),
        "{}",
        none.errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_session_or_server_fails_clearly() {
    let s = Server::start().await;
    let mut chat = Chat::spawn(&s.url, &["--session", "no-such-session"]);
    assert_eq!(chat.exit_code().await, 1);
    assert!(
        chat.errors()
            .contains("session `no-such-session` not found"),
        "{}",
        chat.errors()
    );
    // A port nobody listens on: bind one, then free it.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut chat = Chat::spawn(&format!("http://{addr}"), &[]);
    assert_eq!(chat.exit_code().await, 1);
    assert!(
        chat.errors()
            .contains(&format!("cannot reach http://{addr}")),
        "{}",
        chat.errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_is_served_without_auth() {
    let s = Server::start_with(auth_options()).await;
    let http = reqwest::Client::new();
    let page = http.get(format!("{}/", s.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    let js = http
        .get(format!("{}/assets/app.js", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    // The API itself still wants the key.
    let agents = http
        .get(format!("{}/v1/agents", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(agents.status(), 401);
}

fn timestamp(v: &Value) -> jiff::Timestamp {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_input_is_one_turn_per_line_and_every_answer_is_shown() {
    let s = Server::start().await;
    let mut chat = Chat::spawn(&s.url, &[]);
    // All three lines are there at once; each waits for the turn before it.
    chat.line("alpha tokens=6 delay_ms=40\nbeta tokens=3\ngamma")
        .await;
    chat.close_stdin();
    let id = chat.session_id().await;
    assert_eq!(chat.exit_code().await, 0, "{}", chat.errors());
    let out = chat.output();
    let (a, b, c) = (
        out.find(&common::mock_tokens(6)).unwrap_or(usize::MAX),
        out.rfind(&common::mock_tokens(3)).unwrap_or(usize::MAX),
        out.find("echo: gamma").unwrap_or(usize::MAX),
    );
    assert!(
        a < b && b < c && c < usize::MAX,
        "every answer, in order:\n{out}"
    );
    let (_, runs) = s.client().get(&format!("/v1/sessions/{id}/runs")).await;
    let mut runs = runs.as_array().unwrap().clone();
    runs.sort_by_key(|r| timestamp(&r["created_at"]));
    let statuses: Vec<&str> = runs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["completed"; 3]);
    for pair in runs.windows(2) {
        assert!(
            timestamp(&pair[1]["created_at"]) >= timestamp(&pair[0]["ended_at"]),
            "a line was sent while the turn before it ran: {pair:?}"
        );
    }
    let users: Vec<String> = s
        .client()
        .messages(&id)
        .await
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        users,
        ["alpha tokens=6 delay_ms=40", "beta tokens=3", "gamma"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_input_answers_a_question_with_the_next_line() {
    let s = Server::start().await;
    s.upstream.push(Reply::tool_call(
        "ask_1",
        "ask_human",
        r#"{"question":"Which city should I plan for?"}"#,
    ));
    let mut chat = Chat::spawn(&s.url, &[]);
    chat.line("plan a trip\nParis\ntokens=2").await;
    chat.close_stdin();
    let id = chat.session_id().await;
    assert_eq!(chat.exit_code().await, 0, "{}", chat.errors());
    let out = chat.output();
    assert!(out.contains("? Which city should I plan for?\n"), "{out}");
    assert!(out.contains("The result is Paris."), "{out}");
    assert!(
        out.contains("tok0 tok1\n"),
        "the line after the answer is a turn:\n{out}"
    );
    let messages = s.client().messages(&id).await;
    let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["content"], "Paris", "the answer reached the tool");
    let users: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["plan a trip", "tokens=2"]);
}

/// Piped: the tool and its arguments are printed, the next line decides (`y` allows; `n REASON` denies with the
/// reason the model then sees), and the line after is a turn again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_input_decides_an_approval_with_the_next_line() {
    let s = Server::start_with(guarded()).await;
    let mut chat = Chat::spawn(&s.url, &["--agent", "guarded"]);
    chat.line("calc: 6*7\ny\ncalc: 2+2\nn not now\ntokens=2")
        .await;
    chat.close_stdin();
    let id = chat.session_id().await;
    assert_eq!(chat.exit_code().await, 0, "{}", chat.errors());
    let out = chat.output();
    let expected = "! calculator needs your approval to run with:\n    {\n      \"expression\": \"6*7\"\n    }\n\
                    ✓ calculator allowed\n";
    assert!(out.contains(expected), "{out}");
    assert!(out.contains("The result is 42."), "{out}");
    assert!(out.contains("\"expression\": \"2+2\""), "{out}");
    assert!(out.contains("✗ calculator denied: not now\n"), "{out}");
    assert!(
        out.contains("The result is the call was denied and did not run: not now."),
        "{out}"
    );
    assert!(out.contains("tok0 tok1\n"), "{out}");
    assert!(!out.contains("[y/N]"), "no prompt on a pipe: {out}");
    let messages = s.client().messages(&id).await;
    assert_eq!(
        contents(&messages, "user"),
        ["calc: 6*7", "calc: 2+2", "tokens=2"]
    );
    assert_eq!(
        contents(&messages, "tool"),
        ["42", "the call was denied and did not run: not now"]
    );
}

/// Piped: input that ends while a call waits for approval exits 1 saying so, and nothing is allowed for lack of a
/// line: the run keeps waiting on the server. Resumed with `--session`, the waiting call is decided by the next
/// line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_input_ending_at_an_approval_exits_1_and_a_resumed_chat_decides_it() {
    let s = Server::start_with(guarded()).await;
    let mut chat = Chat::spawn(&s.url, &["--agent", "guarded"]);
    chat.line("calc: 5*5").await;
    chat.close_stdin();
    let id = chat.session_id().await;
    assert_eq!(chat.exit_code().await, 1, "{}", chat.output());
    assert!(
        chat.errors()
            .contains("input ended while the agent waits for approval of `calculator`"),
        "{}",
        chat.errors()
    );
    assert!(chat.output().contains("\"expression\": \"5*5\""));
    assert_eq!(run_statuses(&s, &id).await, ["waiting_input"]);
    let mut again = Chat::spawn(&s.url, &["--session", &id]);
    again.wait_for("(end of history)").await;
    again.line("yes").await;
    again.wait_for("✓ calculator allowed").await;
    again.wait_for("The result is 25.").await;
    again.close_stdin();
    assert_eq!(again.exit_code().await, 0, "{}", again.errors());
    assert_eq!(run_statuses(&s, &id).await, ["completed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_input_exits_1_naming_a_failed_run_and_still_runs_the_rest() {
    let s = Server::start().await;
    let mut chat = Chat::spawn(&s.url, &[]);
    chat.line("status=500 please\ntokens=2").await;
    chat.close_stdin();
    let id = chat.session_id().await;
    assert_eq!(chat.exit_code().await, 1, "{}", chat.output());
    let (_, runs) = s.client().get(&format!("/v1/sessions/{id}/runs")).await;
    let failed = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["status"] == "failed")
        .unwrap();
    let err = chat.errors();
    assert!(
        err.contains(&format!("run {} failed: ", failed["id"].as_str().unwrap())),
        "{err}"
    );
    assert!(err.contains("500"), "the cause is named: {err}");
    assert!(chat.output().contains("tok0 tok1\n"), "{}", chat.output());

    // A question nobody answers: input ends, the client says so and exits 1.
    s.upstream.push(Reply::tool_call(
        "ask_2",
        "ask_human",
        r#"{"question":"Which colour?"}"#,
    ));
    let mut chat = Chat::spawn(&s.url, &[]);
    chat.line("pick one").await;
    chat.close_stdin();
    assert_eq!(chat.exit_code().await, 1);
    assert!(
        chat.errors()
            .contains("input ended while the agent waits for an answer to `Which colour?`"),
        "{}",
        chat.errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_switch_sessions_and_agents_and_list_sessions() {
    let s = Server::start_with(Options {
        extra: "[[agents]]\nname = \"helper\"\nprovider = \"upstream\"\nmodel = \"m\"\n".into(),
        ..Options::default()
    })
    .await;
    let c = s.client();
    let mut chat = Chat::spawn(&s.url, &[]);
    let first = chat.session_id().await;
    chat.line("tokens=1").await;
    chat.line("/new").await;
    chat.line("tokens=2").await;
    chat.line("/agent nobody").await;
    chat.line("/agent helper").await;
    chat.line("tokens=3").await;
    chat.line("/sessions").await;
    chat.line("/quit").await;
    // `/agent nobody` was an error: piped input says so in the exit code.
    assert_eq!(chat.exit_code().await, 1, "{}", chat.errors());
    let out = chat.output();
    let ids: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("new session "))
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{out}");
    assert_eq!(ids[0], first);
    assert!(
        out.contains(&format!("new session {} with assistant", ids[1])),
        "{out}"
    );
    assert!(
        out.contains(&format!("new session {} with helper", ids[2])),
        "{out}"
    );
    assert!(
        chat.errors()
            .contains("no agent named `nobody` on http://127.0.0.1:"),
        "{}",
        chat.errors()
    );
    assert!(chat.errors().contains("(agents: assistant, helper)"));
    // `/sessions`: the caller's sessions, newest first, the current one marked.
    let listed: Vec<&str> = out
        .lines()
        .filter(|l| {
            ids.iter()
                .any(|id| l.get(2..).is_some_and(|r| r.starts_with(id.as_str())))
        })
        .collect();
    assert_eq!(listed.len(), 3, "{out}");
    assert!(
        listed[0].starts_with(&format!("* {}  ", ids[2])),
        "{listed:?}"
    );
    assert!(
        listed[0].ends_with("helper  tokens=3") || listed[0].contains("  helper  "),
        "{listed:?}"
    );
    for (id, agent, text) in [
        (&ids[0], "assistant", "tokens=1"),
        (&ids[1], "assistant", "tokens=2"),
        (&ids[2], "helper", "tokens=3"),
    ] {
        let (_, session) = c.get(&format!("/v1/sessions/{id}")).await;
        assert_eq!(session["agent"], agent);
        assert_ne!(
            session["title"], "agentd chat",
            "no fixed title: the server names it"
        );
        assert_eq!(session["metadata"]["client"], "agentd chat");
        let users: Vec<Value> = c
            .messages(id)
            .await
            .into_iter()
            .filter(|m| m["role"] == "user")
            .collect();
        assert_eq!(users.len(), 1, "{id}: {users:?}");
        assert_eq!(users[0]["content"], text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_history_shows_thinking_and_runs_that_failed_or_were_cancelled() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    assert_eq!(c.send(&id, "think tokens=2").await.0, 200);
    assert_eq!(c.send(&id, "status=500 now").await.0, 200);
    let run = c.send_bg(&id, "tokens=500 delay_ms=20").await;
    let mut ws = c.ws(&id, "after=0").await;
    ws.until(|f| f["type"] == "text_delta" && f["delta"] == " tok3")
        .await;
    let (status, _) = c
        .post(
            &format!("/v1/sessions/{id}/runs/{run}/cancel"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(c.wait_run(&id, &run).await["status"], "cancelled");
    assert_eq!(c.send(&id, "last one").await.0, 200);

    let mut chat = Chat::spawn(&s.url, &["--session", &id]);
    let out = chat.wait_for("(end of history)\n").await;
    let thinking = format!("thinking: {}\ntok0 tok1\n", THINKING.concat());
    let expected = [
        "you: think tokens=2\n",
        thinking.as_str(),
        "you: status=500 now\n",
        "[run failed: ",
        "you: tokens=500 delay_ms=20\n",
        "tok0 tok1 tok2 tok3",
        "[run cancelled]\n",
        "you: last one\necho: last one\n(end of history)\n",
    ];
    let mut at = 0;
    for piece in expected {
        match out[at..].find(piece) {
            Some(i) => at += i + piece.len(),
            None => panic!("`{piece}` missing (in order) from the history:\n{out}"),
        }
    }
    assert!(!out.contains("tok499"), "{out}");
    chat.close_stdin();
    assert_eq!(chat.exit_code().await, 0);
}

/// `agentd chat` on a real terminal: a pty pair, the client's controlling terminal (through `setsid -c`), so
/// keys go through the terminal's line discipline as typed (Ctrl-C included).
#[cfg(unix)]
struct Pty {
    child: std::process::Child,
    master: std::fs::File,
    screen: Arc<Mutex<String>>,
}

#[cfg(unix)]
impl Pty {
    fn spawn(url: &str, state_dir: &std::path::Path) -> Pty {
        Self::spawn_with(url, state_dir, &[])
    }

    fn spawn_with(url: &str, state_dir: &std::path::Path, args: &[&str]) -> Pty {
        use nix::pty::{openpty, Winsize};
        let size = Winsize {
            ws_row: 40,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None).unwrap();
        let slave = std::fs::File::from(pty.slave);
        let child = std::process::Command::new("setsid")
            .args(["-c", "-w"])
            .arg(env!("CARGO_BIN_EXE_agentd"))
            .args(["chat", "--url", url])
            .args(args)
            .env_remove("AGENTD_API_KEY")
            .env("TERM", "xterm-256color")
            .env("XDG_STATE_HOME", state_dir)
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .spawn()
            .expect("spawn agentd chat on a pty");
        let master = std::fs::File::from(pty.master);
        let mut reader = master.try_clone().unwrap();
        let screen = Arc::new(Mutex::new(String::new()));
        let sink = screen.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut chunk = [0u8; 4096];
            // Ends with EIO once the child has gone and the slave is closed.
            while let Ok(n) = reader.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Pty {
            child,
            master,
            screen,
        }
    }

    fn screen(&self) -> String {
        self.screen.lock().unwrap().clone()
    }

    /// The session id of the banner that ends at byte `at`.
    fn session_id(&self, at: usize) -> String {
        let screen = self.screen();
        let line = screen[..at].rsplit("new session ").next().unwrap();
        line.split_whitespace().next().unwrap().to_string()
    }

    fn keys(&mut self, keys: &str) {
        use std::io::Write;
        self.master.write_all(keys.as_bytes()).unwrap();
        self.master.flush().unwrap();
    }

    /// Waits until the output after byte `from` contains `needle`; returns the offset just past it.
    async fn wait_for(&self, from: usize, needle: &str) -> usize {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if let Some(i) = screen.get(from..).and_then(|s| s.find(needle)) {
                return from + i + needle.len();
            }
            if start.elapsed() > WAIT {
                panic!("`{needle}` did not appear within {WAIT:?} after byte {from}:\n{screen:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn exit_code(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > WAIT {
                let _ = self.child.kill();
                panic!("agentd chat did not exit:\n{:?}", self.screen());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(unix)]
impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_history_type_ahead_and_ctrl_c_work() {
    let s = Server::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut t = Pty::spawn(&s.url, state.path());
    let at = t.wait_for(0, " with assistant at ").await;
    let id = t.session_id(at);
    let at = t.wait_for(at, "> ").await;
    t.keys("tokens=3\r");
    let at = t.wait_for(at, "tok0 tok1 tok2").await;
    let at = t.wait_for(at, "> ").await;
    // Up-arrow recalls the line; Enter sends it again.
    t.keys("\x1b[A");
    let at = t.wait_for(at, "tokens=3").await;
    t.keys("\r");
    let at = t.wait_for(at, "tok0 tok1 tok2").await;
    let users = |msgs: Vec<Value>| -> Vec<String> {
        msgs.iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        users(s.client().messages(&id).await),
        ["tokens=3", "tokens=3"]
    );
    assert!(!t.screen().contains("^[[A"), "{:?}", t.screen());

    // Typed while a turn streams: not echoed into the answer, waiting at the next prompt.
    let at = t.wait_for(at, "> ").await;
    t.keys("tokens=30 delay_ms=40\r");
    let streaming = t.wait_for(at, "tok3 ").await;
    t.keys("hello there");
    let done = t.wait_for(streaming, "tok29").await;
    let during = t.screen()[streaming..done].to_string();
    assert!(
        !during.contains("hello"),
        "typed text garbled the answer: {during:?}"
    );
    let at = t.wait_for(done, "hello there").await;
    t.keys("\r");
    let at = t.wait_for(at, "echo: hello there").await;
    assert_eq!(
        users(s.client().messages(&id).await).last().unwrap(),
        "hello there"
    );

    // Another client's turn streams while a line is being typed: its output goes above the prompt, and the
    // typed text stays whole.
    let at = t.wait_for(at, "> ").await;
    t.keys("my draft");
    let at = t.wait_for(at, "my draft").await;
    assert_eq!(s.client().send(&id, "tokens=4").await.0, 200);
    let at = t.wait_for(at, "tok0 tok1 tok2 tok3").await;
    t.keys(" goes on\r");
    let at = t.wait_for(at, "echo: my draft goes on").await;
    assert_eq!(
        users(s.client().messages(&id).await).last().unwrap(),
        "my draft goes on"
    );

    // A question is answered at its own prompt.
    s.upstream.push(Reply::tool_call(
        "ask_1",
        "ask_human",
        r#"{"question":"Which city?"}"#,
    ));
    let at = t.wait_for(at, "> ").await;
    t.keys("plan a trip\r");
    let at = t.wait_for(at, "? Which city?").await;
    let at = t.wait_for(at, "answer> ").await;
    t.keys("Rome\r");
    let at = t.wait_for(at, "The result is Rome.").await;

    // Ctrl-C during a turn cancels it (the terminal's SIGINT).
    let at = t.wait_for(at, "> ").await;
    t.keys("tokens=500 delay_ms=20\r");
    let at = t.wait_for(at, "tok2 ").await;
    // Typed ahead, then Ctrl-C: the turn is cancelled and the typed line waits at the prompt.
    t.keys("keep me");
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.keys("\x03");
    let cancelled = t.wait_for(at, "[run cancelled]").await;
    assert!(
        !t.screen()[at..cancelled].contains("keep me"),
        "{:?}",
        t.screen()
    );
    let at = t.wait_for(cancelled, "> ").await;
    t.wait_for(at, "keep me").await;
    // Ctrl-C at a prompt with text clears the line; the next one, at the empty prompt, exits 130.
    t.keys("\x03");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        t.child.try_wait().unwrap().is_none(),
        "exited with text on the line"
    );
    t.keys("\x03");
    assert_eq!(t.exit_code().await, Some(130), "{:?}", t.screen());
    // Seven turns completed (the other client's included), the cancelled one; the cleared line was never sent.
    let mut expected = vec!["completed"; 7];
    expected.push("cancelled");
    assert_eq!(run_statuses(&s, &id).await, expected);
    // The history file has the lines entered.
    let history = std::fs::read_to_string(state.path().join("agentd/chat_history")).unwrap();
    assert!(history.contains("hello there"), "{history}");
}

/// On a terminal an approval asks at its own prompt: `y` allows, `n REASON` denies; one decided by another client
/// shows its decision, and a line typed at its stale prompt is dropped, not sent as a message.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_an_approval_is_allowed_or_denied_at_its_prompt() {
    let s = Server::start_with(guarded()).await;
    let state = tempfile::tempdir().unwrap();
    let mut t = Pty::spawn_with(&s.url, state.path(), &["--agent", "guarded"]);
    let at = t.wait_for(0, " with guarded at ").await;
    let id = t.session_id(at);
    let at = t.wait_for(at, "> ").await;
    t.keys("calc: 6*7\r");
    let at = t
        .wait_for(at, "! calculator needs your approval to run with:")
        .await;
    let at = t.wait_for(at, "\"expression\": \"6*7\"").await;
    let at = t.wait_for(at, "Allow calculator? [y/N] ").await;
    t.keys("y\r");
    let at = t.wait_for(at, "✓ calculator allowed").await;
    let at = t.wait_for(at, "The result is 42.").await;

    let at = t.wait_for(at, "> ").await;
    t.keys("calc: 2+2\r");
    let at = t.wait_for(at, "Allow calculator? [y/N] ").await;
    t.keys("n too risky\r");
    let at = t.wait_for(at, "✗ calculator denied: too risky").await;
    let at = t
        .wait_for(
            at,
            "The result is the call was denied and did not run: too risky.",
        )
        .await;

    // Decided by another client while the prompt is up: the decision shows; what is typed there is not sent.
    let at = t.wait_for(at, "> ").await;
    t.keys("calc: 3+3\r");
    let at = t.wait_for(at, "Allow calculator? [y/N] ").await;
    let (run, request) = latest_approval(&s, &id).await;
    let path = format!("/v1/sessions/{id}/runs/{run}/approvals/{request}");
    let (status, body) = s
        .client()
        .post(&path, serde_json::json!({"decision": "allow"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let at = t.wait_for(at, "✓ calculator allowed").await;
    let at = t.wait_for(at, "The result is 6.").await;
    t.keys("y\r");
    let at = t
        .wait_for(at, "decided meanwhile; the line was not sent")
        .await;
    let at = t.wait_for(at, "> ").await;

    // Another client's turn asks while this one idles at `> `: that prompt's line stays a message; an empty
    // line brings the approval's prompt.
    s.client().send_bg(&id, "calc: 4*4").await;
    let at = t
        .wait_for(at, "the line at the prompt below is not the decision")
        .await;
    t.keys("\r");
    let at = t.wait_for(at, "Allow calculator? [y/N] ").await;
    t.keys("allow\r");
    let at = t.wait_for(at, "✓ calculator allowed").await;
    let at = t.wait_for(at, "The result is 16.").await;
    t.wait_for(at, "> ").await;
    t.keys("\x04");
    assert_eq!(t.exit_code().await, Some(0), "{:?}", t.screen());
    assert_eq!(
        contents(&s.client().messages(&id).await, "user"),
        ["calc: 6*7", "calc: 2+2", "calc: 3+3", "calc: 4*4"]
    );
    assert_eq!(run_statuses(&s, &id).await, ["completed"; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_shows_its_latest_turns_and_past_retention_comes_from_the_messages() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    for i in 0..12 {
        assert_eq!(c.send(&id, &format!("m{i}")).await.0, 200);
    }
    // Within the log's retention: the replay, cut to the latest ten turns.
    let mut chat = Chat::spawn(&s.url, &["--session", &id]);
    let out = chat.wait_for("(end of history)\n").await;
    assert!(
        out.contains("(2 earlier turns not shown)\nyou: m2\necho: m2\n"),
        "{out}"
    );
    assert!(!out.contains("you: m1\n"), "{out}");
    assert!(
        out.contains("you: m11\necho: m11\n(end of history)\n"),
        "{out}"
    );
    chat.close_stdin();
    assert_eq!(chat.exit_code().await, 0);

    // Past retention (more runs than the log keeps, the oldest events pruned): the history comes from the
    // stored messages and runs, a failed run still marked.
    for i in 12..22 {
        assert_eq!(c.send(&id, &format!("m{i}")).await.0, 200);
    }
    assert_eq!(c.send(&id, "status=500 last").await.0, 200);
    let mut ws = c.ws(&id, "after=0").await;
    assert_eq!(ws.next().await["type"], "hello");
    assert_eq!(
        ws.next().await["code"],
        "cursor_expired",
        "the log was pruned"
    );
    let mut chat = Chat::spawn(&s.url, &["--session", &id]);
    let out = chat.wait_for("(end of history)\n").await;
    assert!(out.contains("earlier messages not shown)\n"), "{out}");
    assert!(
        out.contains("you: m21\nassistant: echo: m21\nyou: status=500 last\n[run failed: "),
        "{out}"
    );
    chat.line("tokens=2").await;
    chat.wait_for("tok0 tok1\n").await;
    chat.close_stdin();
    // The failed run is history, not this client's: exit 0.
    assert_eq!(chat.exit_code().await, 0, "{}", chat.errors());
}
