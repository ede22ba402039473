//! `agentd chat`: the terminal client over the native WebSocket (SPEC.md sections 3 and 4).
//!
//! It creates a session (or resumes `--session ID`, printing the stored history briefly), then reads lines from
//! stdin and sends each as a `message` frame, printing the answer's tokens as they stream. Thinking, tool calls
//! and subagent activity are printed dimmed (see [`render`]). An `ask_human` question makes the next line the
//! answer. Ctrl-C while a turn runs sends `cancel`; a second Ctrl-C (or one while idle) exits with 130. Ctrl-D or
//! `/quit` exits; with stdin not a terminal, end of input waits for the running turn first, so
//! `echo question | agentd chat` prints the whole answer.
//!
//! The connection is resumable: the client remembers the last `seq` it printed and, when the socket drops,
//! reconnects with `after=<seq>` and back-off, so nothing is lost or printed twice.
//!
//! Stdin is read on a plain thread (not tokio's blocking pool), so exiting never waits for a pending read.

mod api;
mod render;

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use api::Api;
use render::Renderer;

/// Options of `agentd chat`.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub url: String,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub api_key: Option<String>,
}

/// Exit code after Ctrl-C, as shells report a SIGINT death.
const EXIT_INTERRUPTED: i32 = 130;
/// Reconnection attempts before giving up (about half a minute with the back-off below).
const MAX_RECONNECTS: u32 = 10;
/// Keeps idle connections (and proxies in between) alive.
const PING_EVERY: Duration = Duration::from_secs(30);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Runs the terminal client; returns the process exit code.
pub async fn run(opts: ChatOptions) -> i32 {
    match Chat::start(opts).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentd chat: {e}");
            1
        }
    }
}

/// One line of stdin, or its end.
enum Input {
    Line(String),
    Eof,
}

/// Why the event loop handed control back.
enum Outcome {
    Exit(i32),
    /// The socket closed or failed: reconnect with `after`.
    Dropped,
}

struct Chat {
    api: Api,
    session_id: String,
    renderer: Renderer,
    interactive: bool,
    /// Highest `seq` printed; `None` until known (then a connection goes without `after`).
    last_seq: Option<u64>,
    /// The run holding the session's turn, as far as the events tell.
    active_run: Option<String>,
    /// A message was sent and its run has not started yet.
    awaiting_start: bool,
    /// The Ctrl-C of this turn was sent; the next one exits.
    cancel_sent: bool,
    /// An `ask_human` waiting for the next line: (request id, run id).
    pending_ask: Option<(String, String)>,
    /// Messages this client sent whose `message` event has not come back yet (not echoed again).
    sent: VecDeque<String>,
    /// Stdin ended while a turn was running: exit when it ends.
    exit_when_idle: bool,
}

impl Chat {
    async fn start(opts: ChatOptions) -> Result<i32, String> {
        let api = Api::new(&opts.url, opts.api_key)?;
        let interactive = std::io::stdin().is_terminal();
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        // Listing the agents checks reachability and the key before anything else happens.
        let agents = api.agents().await?;
        let (session_id, agent, resumed) = match &opts.session {
            Some(id) => {
                let s = api.session(id).await?;
                (
                    id.clone(),
                    s["agent"].as_str().unwrap_or("?").to_string(),
                    true,
                )
            }
            None => {
                let agent = match opts.agent {
                    Some(a) if agents.contains(&a) => a,
                    Some(a) => {
                        return Err(format!(
                            "no agent named `{a}` on {} (agents: {})",
                            api.base(),
                            agents.join(", ")
                        ))
                    }
                    None => agents
                        .first()
                        .cloned()
                        .ok_or_else(|| format!("{} has no agents configured", api.base()))?,
                };
                let s = api.create_session(&agent).await?;
                let id = s["id"]
                    .as_str()
                    .ok_or("the server's session has no id")?
                    .to_string();
                (id, agent, false)
            }
        };
        let mut chat = Chat {
            api,
            session_id,
            renderer: Renderer::new(color),
            interactive,
            last_seq: None,
            active_run: None,
            awaiting_start: false,
            cancel_sent: false,
            pending_ask: None,
            sent: VecDeque::new(),
            exit_when_idle: false,
        };
        let verb = if resumed { "resumed" } else { "new" };
        chat.print(&format!(
            "{verb} session {} with {agent} at {}\n",
            chat.session_id,
            chat.api.base()
        ));
        if chat.interactive {
            let hint = chat.renderer.dim(
                "Enter sends. Ctrl-C cancels a running turn (twice quits); Ctrl-D or /quit exits.",
            );
            chat.print(&format!("{hint}\n"));
        }
        let (tx, rx) = mpsc::channel::<Input>(16);
        spawn_stdin_reader(tx);
        chat.main_loop(rx, resumed).await
    }

    fn print(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) is not worth failing over; the next read of stdin ends us anyway.
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    fn busy(&self) -> bool {
        self.active_run.is_some() || self.awaiting_start
    }

    fn prompt(&self) {
        if !self.interactive {
            return;
        }
        if self.pending_ask.is_some() {
            self.print("answer> ");
        } else if !self.busy() {
            self.print("> ");
        }
    }

    async fn main_loop(
        &mut self,
        mut input: mpsc::Receiver<Input>,
        resumed: bool,
    ) -> Result<i32, String> {
        let mut interrupts = Interrupts::new()?;
        let mut first = true;
        let mut failures = 0u32;
        loop {
            let mut socket = match self.connect().await {
                Ok(s) => s,
                Err(ConnectError::Fatal(e)) => return Err(e),
                Err(ConnectError::Retry(e)) => {
                    failures += 1;
                    if failures > MAX_RECONNECTS {
                        return Err(format!("lost the connection to {}: {e}", self.api.base()));
                    }
                    let wait = backoff(failures);
                    self.print(&self.renderer.dim(&format!(
                        "(connection lost: {e}; retrying in {} ms)\n",
                        wait.as_millis()
                    )));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = interrupts.recv() => return Ok(EXIT_INTERRUPTED),
                    }
                }
            };
            let hello = match self.hello(&mut socket).await {
                Ok(h) => h,
                Err(e) => {
                    failures += 1;
                    if failures > MAX_RECONNECTS {
                        return Err(format!("lost the connection to {}: {e}", self.api.base()));
                    }
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            };
            failures = 0;
            if first {
                first = false;
                let active = hello["active_run_id"].as_str().map(String::from);
                if active.is_none() {
                    // Without an active run the server sends only what comes after this point.
                    self.last_seq = hello["last_seq"].as_u64();
                }
                if resumed {
                    let messages = self.api.messages(&self.session_id).await?;
                    let text = self.renderer.history(&messages, active.as_deref());
                    self.print(&text);
                }
                self.active_run = active;
                self.prompt();
            }
            match self.events(&mut socket, &mut input, &mut interrupts).await {
                Outcome::Exit(code) => {
                    let _ = socket.close(None).await;
                    return Ok(code);
                }
                Outcome::Dropped => {
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(failures)) => {}
                        _ = interrupts.recv() => return Ok(EXIT_INTERRUPTED),
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Socket, ConnectError> {
        let url = self.api.ws_url(&self.session_id, self.last_seq);
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                Err(match status {
                    401 => ConnectError::Fatal(api::unauthorized_message(self.api.has_key())),
                    404 => ConnectError::Fatal(format!("session `{}` not found", self.session_id)),
                    _ => ConnectError::Retry(format!("the WebSocket handshake got HTTP {status}")),
                })
            }
            Err(e) => Err(ConnectError::Retry(e.to_string())),
        }
    }

    /// The first frame of a connection.
    async fn hello(&self, socket: &mut Socket) -> Result<Value, String> {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .map_err(|_| "no hello frame within 10 s".to_string())?;
        match frame {
            Some(Ok(WsMessage::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .map_err(|e| format!("bad hello frame: {e}"))?;
                if v["type"] == "hello" {
                    Ok(v)
                } else {
                    Err(format!("expected a hello frame, got {v}"))
                }
            }
            Some(Ok(other)) => Err(format!("expected a hello frame, got {other:?}")),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the server closed the connection".into()),
        }
    }

    async fn events(
        &mut self,
        socket: &mut Socket,
        input: &mut mpsc::Receiver<Input>,
        interrupts: &mut Interrupts,
    ) -> Outcome {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut input_open = true;
        loop {
            tokio::select! {
                frame = socket.next() => {
                    let text = match frame {
                        Some(Ok(WsMessage::Text(t))) => t,
                        Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return Outcome::Dropped,
                        Some(Ok(_)) => continue,
                    };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    if let Some(code) = self.frame(&v) {
                        return Outcome::Exit(code);
                    }
                }
                line = input.recv(), if input_open => {
                    match line {
                        Some(Input::Line(l)) => {
                            if let Some(out) = self.line(socket, l).await {
                                return out;
                            }
                        }
                        Some(Input::Eof) | None => {
                            input_open = false;
                            if !self.busy() {
                                if self.interactive {
                                    self.print("\n");
                                }
                                return Outcome::Exit(0);
                            }
                            if self.interactive {
                                let note = self.renderer.dim(&format!(
                                    "the turn keeps running on the server; resume with --session {}",
                                    self.session_id
                                ));
                                self.print(&format!("\n{note}\n"));
                                return Outcome::Exit(0);
                            }
                            self.exit_when_idle = true;
                        }
                    }
                }
                _ = interrupts.recv() => {
                    if !self.busy() || self.cancel_sent {
                        self.print("\n");
                        return Outcome::Exit(EXIT_INTERRUPTED);
                    }
                    self.cancel_sent = true;
                    let note = self.renderer.dim("^C cancelling the turn (Ctrl-C again quits)");
                    let brk = self.renderer.break_line();
                    self.print(&format!("{brk}{note}\n"));
                    let mut frame = json!({"type": "cancel"});
                    if let Some(run) = &self.active_run {
                        frame["run_id"] = json!(run);
                    }
                    if send(socket, &frame).await.is_err() {
                        if let Some(run) = self.active_run.clone() {
                            if let Err(e) = self.api.cancel(&self.session_id, &run).await {
                                eprintln!("agentd chat: cancel failed: {e}");
                            }
                        }
                        return Outcome::Dropped;
                    }
                }
                _ = ping.tick() => {
                    if send(socket, &json!({"type": "ping"})).await.is_err() {
                        return Outcome::Dropped;
                    }
                }
            }
        }
    }

    /// Handles one stdin line; `Some` ends the event loop.
    async fn line(&mut self, socket: &mut Socket, line: String) -> Option<Outcome> {
        if let Some((request_id, _)) = self.pending_ask.take() {
            let frame = json!({"type": "reply", "request_id": request_id, "content": line});
            if send(socket, &frame).await.is_err() {
                return Some(Outcome::Dropped);
            }
            return None;
        }
        let trimmed = line.trim();
        match trimmed {
            "" => {
                self.prompt();
                return None;
            }
            "/quit" | "/exit" => return Some(Outcome::Exit(0)),
            "/help" => {
                let help = self.renderer.dim(&format!(
                    "session {}. Enter sends a message; an answer to a question goes on the next line.\n\
                     Ctrl-C cancels a running turn (twice quits); Ctrl-D or /quit exits.",
                    self.session_id
                ));
                self.print(&format!("{help}\n"));
                self.prompt();
                return None;
            }
            _ => {}
        }
        let frame = json!({"type": "message", "content": line});
        if send(socket, &frame).await.is_err() {
            eprintln!(
                "agentd chat: the connection dropped; the message was not sent, please repeat it"
            );
            return Some(Outcome::Dropped);
        }
        self.sent.push_back(line);
        self.awaiting_start = true;
        self.cancel_sent = false;
        None
    }

    /// Handles one server frame; `Some(code)` exits.
    fn frame(&mut self, v: &Value) -> Option<i32> {
        match v["type"].as_str().unwrap_or("") {
            "pong" | "hello" => return None,
            "error" => {
                let code = v["code"].as_str().unwrap_or("error");
                let message = v["message"].as_str().unwrap_or("");
                let brk = self.renderer.break_line();
                self.print(&brk);
                eprintln!("agentd chat: {code}: {message}");
                if self.awaiting_start && code != "cursor_expired" {
                    // The message was refused (run_active, too_large, ...): nothing will start.
                    self.awaiting_start = false;
                    self.sent.pop_back();
                    self.prompt();
                }
                return None;
            }
            _ => {}
        }
        if let Some(seq) = v["seq"].as_u64() {
            if self.last_seq.is_some_and(|last| seq <= last) {
                return None;
            }
            self.last_seq = Some(seq);
        }
        let run_id = v["run_id"].as_str().map(String::from);
        match v["type"].as_str().unwrap_or("") {
            "message" => {
                if v["message"]["role"] == "user" {
                    let content = v["message"]["content"].as_str().unwrap_or("");
                    let ours = self
                        .sent
                        .front()
                        .is_some_and(|s| content.starts_with(s.as_str()));
                    if ours {
                        self.sent.pop_front();
                    } else {
                        let text = self.renderer.user_message(content);
                        self.print(&text);
                    }
                }
                return None;
            }
            "run_started" | "run_resumed" => {
                self.active_run = run_id.clone();
                self.awaiting_start = false;
            }
            "input_requested" => {
                if let (Some(req), Some(run)) = (v["request_id"].as_str(), run_id.clone()) {
                    self.pending_ask = Some((req.to_string(), run));
                }
            }
            // Answered, here or by another client.
            "input_received"
                if self.pending_ask.as_ref().map(|(r, _)| r.as_str())
                    == v["request_id"].as_str() =>
            {
                self.pending_ask = None;
            }
            _ => {}
        }
        let text = self.renderer.event(v);
        self.print(&text);
        match v["type"].as_str().unwrap_or("") {
            "input_requested" => self.prompt(),
            "run_finished" => {
                if self.active_run.is_some() && self.active_run == run_id {
                    self.active_run = None;
                }
                if self
                    .pending_ask
                    .as_ref()
                    .is_some_and(|(_, r)| Some(r) == run_id.as_ref())
                {
                    self.pending_ask = None;
                }
                self.cancel_sent = false;
                if !self.busy() {
                    if self.exit_when_idle {
                        return Some(0);
                    }
                    self.prompt();
                }
            }
            _ => {}
        }
        None
    }
}

enum ConnectError {
    /// Retrying cannot help (bad key, unknown session).
    Fatal(String),
    Retry(String),
}

/// 250 ms, doubling per failure, at most 4 s.
fn backoff(failures: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << failures.min(5).saturating_sub(1));
    Duration::from_millis(ms)
}

async fn send(socket: &mut Socket, frame: &Value) -> Result<(), ()> {
    socket
        .send(WsMessage::Text(frame.to_string().into()))
        .await
        .map_err(|_| ())
}

fn spawn_stdin_reader(tx: mpsc::Sender<Input>) {
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(Input::Eof);
                    return;
                }
                Ok(_) => {
                    let text = line.trim_end_matches(['\n', '\r']).to_string();
                    if tx.blocking_send(Input::Line(text)).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Ctrl-C (SIGINT) as a stream: each press is one `recv`.
struct Interrupts {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> Result<Interrupts, String> {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| format!("cannot watch for Ctrl-C: {e}"))?;
            Ok(Interrupts { signal })
        }
        #[cfg(not(unix))]
        {
            Ok(Interrupts {})
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            if self.signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
