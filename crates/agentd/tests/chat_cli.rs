//! `agentd chat` end to end: the real binary, driven through stdin/stdout pipes (and SIGINT), against a real
//! agentd over real HTTP and WebSocket with the mock upstream behind it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_testkit::Reply;
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

fn tokens(n: usize) -> String {
    (0..n)
        .map(|i| format!("tok{i}"))
        .collect::<Vec<_>>()
        .join(" ")
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
    chat.wait_for(&tokens(40)).await;
    // The client prints the deltas as they come; the answer's `message` is committed just after them.
    let mut stored = s.client().messages(&id).await;
    for _ in 0..100 {
        if stored.last().is_some_and(|m| m["role"] == "assistant") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stored = s.client().messages(&id).await;
    }
    assert_eq!(stored.last().unwrap()["content"], tokens(40));

    chat.line("think tokens=2").await;
    let out = chat
        .wait_for("thinking: Let me think about this.\ntok0 tok1\n")
        .await;
    assert!(out.contains(&tokens(40)));
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
async fn ask_human_is_answered_at_the_prompt() {
    let s = Server::start().await;
    s.upstream.push(Reply::tool_call(
        "ask_1",
        "ask_human",
        r#"{"question":"Which city should I plan for?"}"#,
    ));
    let mut chat = Chat::spawn(&s.url, &[]);
    let id = chat.session_id().await;
    chat.line("plan a trip").await;
    chat.wait_for("? Which city should I plan for?\n").await;
    chat.line("Paris").await;
    chat.wait_for("The result is Paris.").await;
    let messages = s.client().messages(&id).await;
    let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["content"], "Paris", "the answer reached the tool");
    chat.close_stdin();
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
    chat.wait_for("you: remember the word kumquat\nassistant: echo: remember the word kumquat\n")
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
    let out = chat.wait_for(&tokens(80)).await;
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
    let (_, runs) = s.client().get(&format!("/v1/sessions/{id}/runs")).await;
    let statuses: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
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
    assert!(chat.output().contains(&tokens(20)), "{}", chat.output());
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
