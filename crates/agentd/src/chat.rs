//! `agentd chat`: the terminal client over the native WebSocket (SPEC.md sections 3 and 4).
//!
//! It creates a session (or resumes `--session ID`, showing its history as the live view would), then reads
//! lines and sends each as a `message` frame, printing the answer's tokens as they stream. Thinking, tool calls
//! and subagent activity are printed dimmed (see [`render`]). A line is taken only when the client is ready for
//! it: when no turn runs, or when the agent asks a question (`ask_human`: the line is the answer).
//!
//! A tool call that needs approval (the agent's `approve` globs, SPEC.md section 7) prints the tool and its
//! arguments and is decided by the line entered at its prompt `Allow TOOL? [y/N]`: `y`, `yes` or `allow` allows;
//! anything else denies (`n REASON` or any other text gives the model a reason); the decision goes as an
//! `approval` frame. A line means what its prompt said: one entered at a prompt that was up before the request
//! came (`> `, another client's run asking) is a message, and the approval's prompt follows; one entered at the
//! prompt of a request decided meanwhile is dropped. The outcome is printed when it is logged, also when another
//! client or the time limit decided.
//!
//! - On a terminal ([`term`]): line editing and history (arrow keys, Emacs keys, Ctrl-R), no echo of keys typed
//!   while a turn streams (they wait for the next prompt), output that never garbles the line being typed.
//!   Ctrl-C while a turn runs sends `cancel`; a second Ctrl-C, or one at an empty prompt while idle, exits with
//!   130; Ctrl-C at a prompt with text clears the line (Ctrl-Y brings it back). Ctrl-D or `/quit` exits.
//! - Piped (`printf 'q1\nq2\n' | agentd chat`): one line per turn, the next line only once the turn has ended;
//!   a pending question or approval is answered by the next line (nothing is allowed without a line saying
//!   so). End of input exits once the turn has ended; while a question or approval waits, it exits 1 and the run
//!   keeps waiting on the server (another client may answer; an approval left alone is denied at the time
//!   limit). The exit
//!   code is 1 when any run this client started did not complete (failed, cancelled, interrupted) or a message
//!   was refused; stderr names the run and why. 130 after Ctrl-C, 0 otherwise.
//! - Commands: `/new`, `/agent NAME`, `/sessions`, `/help`, `/quit`; `//text` sends `/text`.
//!
//! The connection is resumable: the client remembers the last `seq` it printed and, when the socket drops,
//! reconnects with `after=<seq>` and back-off, so nothing is lost or printed twice.
//!
//! Piped stdin is read on a plain thread (not tokio's blocking pool), so exiting never waits for a pending read.

mod api;
mod render;
mod term;

use std::collections::{HashSet, VecDeque};
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
use term::LineEditor;

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
/// Exit code of piped input when a run did not complete (or a message was refused).
const EXIT_RUN_FAILED: i32 = 1;
/// Reconnection attempts before giving up (about half a minute with the back-off below).
const MAX_RECONNECTS: u32 = 10;
/// Keeps idle connections (and proxies in between) alive.
const PING_EVERY: Duration = Duration::from_secs(30);
/// Turns of a resumed session's history shown (the earlier ones are counted).
const HISTORY_TURNS: usize = 10;
/// Approval decisions remembered for their error frames.
const MAX_DECIDING: usize = 16;
/// Sessions `/sessions` lists.
const SESSIONS_LISTED: usize = 20;

const HELP: &str = "Enter sends a message; when the agent asks a question, the next line is the answer.\n\
When a tool call needs approval, y (yes, allow) allows it; anything else denies it (n REASON says why).\n\
/new            a new session with the same agent\n\
/agent NAME     a new session with agent NAME (/agent alone lists them)\n\
/sessions       your recent sessions (resume one with agentd chat --session ID)\n\
/quit           exit (or Ctrl-D); //text sends a message starting with /text\n\
Ctrl-C cancels a running turn (twice quits); at a prompt it clears the line, at an empty one it quits.";

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

/// One line of input, its end, or Ctrl-C at an empty prompt.
pub(crate) enum Input {
    Line(String),
    Eof,
    Interrupt,
}

/// Why the event loop handed control back.
enum Outcome {
    Exit(i32),
    /// The socket closed or failed: reconnect with `after`.
    Dropped,
    /// Go on in another session (`/new`, `/agent`): its id and agent.
    Switch(String, String),
}

/// A resumed session's log being replayed: its text is collected, then the latest turns are printed.
struct Replay {
    /// The log's last seq when the client attached: everything up to it is history.
    until: u64,
    /// The run active at attach time: its events continue live after the history.
    active: Option<String>,
    text: String,
    /// Where each run's text starts in `text`, in order.
    runs: Vec<(String, usize)>,
}

struct Chat {
    api: Api,
    session_id: String,
    agent: String,
    renderer: Renderer,
    /// Stdin is a terminal: prompts, and failed runs do not change the exit code.
    interactive: bool,
    /// The line editor, when stdin and stdout are both a terminal.
    editor: Option<LineEditor>,
    /// A plain prompt was printed and no line has been read since (no line editor).
    prompted: bool,
    /// Highest `seq` printed; `None` until known (then a connection goes without `after`).
    last_seq: Option<u64>,
    /// The run holding the session's turn, as far as the events tell.
    active_run: Option<String>,
    /// Runs started by this client's messages that have not finished.
    own_runs: HashSet<String>,
    /// The Ctrl-C of this turn was sent; the next one exits.
    cancel_sent: bool,
    /// An `ask_human` waiting for the next line: (request id, run id, question).
    pending_ask: Option<(String, String, String)>,
    /// Tool calls waiting for a decision, oldest first (the next line decides the first).
    pending_approvals: VecDeque<Approval>,
    /// What the prompt on screen asks for (none on a pipe): a line means what its prompt said. One typed at
    /// the prompt of an approval that another client (or the time limit) decided meanwhile is dropped.
    prompted_for: Option<Prompt>,
    /// The latest decisions sent (at most [`MAX_DECIDING`]): a `conflict` or `not_found` error frame is one of
    /// theirs (the server answers a decision only when it refuses it: 409 decided already, 404 its run ended),
    /// never a refused message. Kept after `approval_resolved`: the 409 of a decision that crossed another
    /// client's comes after that client's decision is logged.
    deciding: VecDeque<String>,
    /// Messages this client sent whose `message` event has not come back yet (not echoed again).
    sent: VecDeque<String>,
    /// Runs of this client that did not complete, and refused messages: piped input then exits 1.
    failures: Vec<String>,
    /// The log of a resumed session being replayed.
    replay: Option<Replay>,
    /// The server cannot replay the history (older than its retention): show it from the REST API.
    rest_history: bool,
    input_open: bool,
}

impl Chat {
    async fn start(opts: ChatOptions) -> Result<i32, String> {
        let api = Api::new(&opts.url, opts.api_key)?;
        let interactive = std::io::stdin().is_terminal();
        let on_terminal = interactive && std::io::stdout().is_terminal();
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
                    Some(a) => return Err(no_such_agent(&api, &a, &agents)),
                    None => agents
                        .first()
                        .cloned()
                        .ok_or_else(|| format!("{} has no agents configured", api.base()))?,
                };
                let id = api.create_session(&agent).await?;
                (id, agent, false)
            }
        };
        let (tx, rx) = mpsc::channel::<Input>(16);
        // A terminal the line editor cannot drive (TERM=dumb, ...) is read line by line, as a pipe is.
        let editor = on_terminal
            .then(|| LineEditor::start(tx.clone()).ok())
            .flatten();
        if editor.is_none() {
            spawn_stdin_reader(tx);
        }
        let mut chat = Chat {
            api,
            session_id,
            agent,
            renderer: Renderer::new(color),
            interactive,
            editor,
            prompted: false,
            last_seq: None,
            active_run: None,
            own_runs: HashSet::new(),
            cancel_sent: false,
            pending_ask: None,
            pending_approvals: VecDeque::new(),
            prompted_for: None,
            deciding: VecDeque::new(),
            sent: VecDeque::new(),
            failures: Vec::new(),
            replay: None,
            rest_history: false,
            input_open: true,
        };
        let verb = if resumed { "resumed" } else { "new" };
        chat.banner(verb);
        if chat.interactive {
            let hint = chat.renderer.dim(
                "Enter sends. Ctrl-C cancels a running turn (twice quits); Ctrl-D or /quit exits; /help lists commands.",
            );
            chat.print(&format!("{hint}\n"));
        }
        chat.main_loop(rx, resumed).await
    }

    fn banner(&mut self, verb: &str) {
        let line = format!(
            "{verb} session {} with {} at {}\n",
            self.session_id,
            self.agent,
            self.api.base()
        );
        self.print(&line);
    }

    fn print(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(r) = &mut self.replay {
            r.text.push_str(text);
            return;
        }
        if let Some(editor) = &mut self.editor {
            editor.print(text);
            return;
        }
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) is not worth failing over; the next read of stdin ends us anyway.
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    /// A whole line for the user (a command's answer), dimmed.
    fn note(&mut self, text: &str) {
        let brk = self.renderer.break_line();
        let line = format!("{brk}{}\n", self.renderer.dim(text));
        self.print(&line);
    }

    /// An error line: stderr, after ending the line in progress.
    fn error(&mut self, text: &str) {
        let brk = self.renderer.break_line();
        self.print(&brk);
        match &mut self.editor {
            // On the terminal, through the editor: a prompt may be up.
            Some(editor) => editor.print(&format!("agentd chat: {text}\n")),
            None => eprintln!("agentd chat: {text}"),
        }
    }

    /// An error that makes piped input exit 1.
    fn fail(&mut self, text: String) {
        self.error(&text);
        self.failures.push(text);
    }

    fn busy(&self) -> bool {
        self.active_run.is_some() || !self.own_runs.is_empty() || !self.sent.is_empty()
    }

    /// Ready for a line: nothing runs, or the agent waits for an answer.
    fn wants_input(&self) -> bool {
        self.input_open
            && self.replay.is_none()
            && (self.pending_ask.is_some() || !self.pending_approvals.is_empty() || !self.busy())
    }

    /// The exit code once input ends or `/quit`.
    fn exit_code(&self) -> i32 {
        if !self.interactive && !self.failures.is_empty() {
            EXIT_RUN_FAILED
        } else {
            0
        }
    }

    /// Shows the prompt when a line is wanted (a line editor reads it; piped input has none).
    fn prompt(&mut self) {
        if !self.interactive || !self.wants_input() {
            return;
        }
        let (text, what) = match self.pending_approvals.front() {
            Some(a) => (
                format!("Allow {}? [y/N] ", a.tool),
                Prompt::Approval(a.request_id.clone()),
            ),
            None if self.pending_ask.is_some() => ("answer> ".to_string(), Prompt::Answer),
            None => ("> ".to_string(), Prompt::Message),
        };
        if let Some(editor) = &mut self.editor {
            if !editor.reading() {
                self.prompted_for = Some(what);
            }
            editor.read(&text);
        } else if !self.prompted {
            self.prompted = true;
            self.prompted_for = Some(what);
            self.print(&text);
        }
    }

    async fn main_loop(
        &mut self,
        mut input: mpsc::Receiver<Input>,
        mut resumed: bool,
    ) -> Result<i32, String> {
        let mut interrupts = Interrupts::new()?;
        let mut first = true;
        let mut failures = 0u32;
        loop {
            if first && resumed {
                // The whole retained log: the history, shown as the live view shows it.
                self.last_seq = Some(0);
            }
            let mut socket = match self.connect().await {
                Ok(s) => s,
                Err(ConnectError::Fatal(e)) => return Err(e),
                Err(ConnectError::Retry(e)) => {
                    failures += 1;
                    if failures > MAX_RECONNECTS {
                        return Err(format!("lost the connection to {}: {e}", self.api.base()));
                    }
                    let wait = backoff(failures);
                    let note = self.renderer.dim(&format!(
                        "(connection lost: {e}; retrying in {} ms)\n",
                        wait.as_millis()
                    ));
                    self.print(&note);
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
                let last = hello["last_seq"].as_u64().unwrap_or(0);
                if resumed && last > 0 {
                    self.replay = Some(Replay {
                        until: last,
                        active: active.clone(),
                        text: String::new(),
                        runs: Vec::new(),
                    });
                } else if active.is_none() {
                    // Without an active run the server sends only what comes after this point.
                    self.last_seq = Some(last);
                }
                self.active_run = active;
                self.prompt();
            }
            let outcome = self
                .events(&mut socket, &mut input, &mut interrupts)
                .await?;
            match outcome {
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
                Outcome::Switch(session, agent) => {
                    let _ = socket.close(None).await;
                    self.session_id = session;
                    self.agent = agent;
                    self.last_seq = None;
                    self.active_run = None;
                    self.own_runs.clear();
                    self.pending_ask = None;
                    self.pending_approvals.clear();
                    self.deciding.clear();
                    self.sent.clear();
                    self.cancel_sent = false;
                    self.replay = None;
                    first = true;
                    resumed = false;
                    let brk = self.renderer.break_line();
                    self.print(&brk);
                    self.banner("new");
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
    ) -> Result<Outcome, String> {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            self.prompt();
            // With a line editor a line comes only when a prompt was shown; it is taken even if a turn started
            // meanwhile (another client's): the server queues it.
            let take_input = match &self.editor {
                Some(e) => e.reading(),
                None => self.wants_input(),
            };
            tokio::select! {
                frame = socket.next() => {
                    let text = match frame {
                        Some(Ok(WsMessage::Text(t))) => t,
                        Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return Ok(Outcome::Dropped),
                        Some(Ok(_)) => continue,
                    };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    self.frame(&v);
                    if self.rest_history {
                        self.rest_history = false;
                        self.show_rest_history().await?;
                    }
                }
                line = input.recv(), if take_input => {
                    if let Some(e) = &mut self.editor {
                        e.answered();
                    }
                    self.prompted = false;
                    let prompted = self.prompted_for.take();
                    match line {
                        Some(Input::Line(l)) => {
                            if let Some(out) = self.line(socket, l, prompted).await {
                                return Ok(out);
                            }
                        }
                        Some(Input::Interrupt) => {
                            if let Some(out) = self.interrupt(socket, true).await {
                                return Ok(out);
                            }
                        }
                        Some(Input::Eof) | None => return Ok(Outcome::Exit(self.end_of_input())),
                    }
                }
                _ = interrupts.recv() => {
                    if let Some(out) = self.interrupt(socket, false).await {
                        return Ok(out);
                    }
                }
                _ = ping.tick() => {
                    if send(socket, &json!({"type": "ping"})).await.is_err() {
                        return Ok(Outcome::Dropped);
                    }
                }
            }
        }
    }

    /// Input ended: the exit code (it is read only while idle or while the agent waits for an answer).
    fn end_of_input(&mut self) -> i32 {
        self.input_open = false;
        let waiting_for = match (self.pending_approvals.front(), &self.pending_ask) {
            (Some(a), _) => Some(format!("approval of `{}`", a.tool)),
            (None, Some((_, _, question))) => Some(format!("an answer to `{question}`")),
            (None, None) => None,
        };
        let Some(waiting_for) = waiting_for else {
            // (The line editor ends its line itself.)
            if self.interactive && self.editor.is_none() {
                self.print("\n");
            }
            return self.exit_code();
        };
        let session = self.session_id.clone();
        if self.interactive {
            let note = self.renderer.dim(&format!(
                "the turn keeps running on the server; resume with --session {session}"
            ));
            self.print(&format!("\n{note}\n"));
            return 0;
        }
        self.error(&format!(
            "input ended while the agent waits for {waiting_for}; the run keeps waiting on the server \
             (answer it with agentd chat --session {session})"
        ));
        EXIT_RUN_FAILED
    }

    /// Ctrl-C: cancels the running turn, or exits (idle, or the second Ctrl-C of a turn). `at_prompt`: it came
    /// from the line editor, which has ended its line already.
    async fn interrupt(&mut self, socket: &mut Socket, at_prompt: bool) -> Option<Outcome> {
        if !self.busy() || self.cancel_sent {
            if !at_prompt {
                self.print("\n");
            }
            return Some(Outcome::Exit(EXIT_INTERRUPTED));
        }
        self.cancel_sent = true;
        self.pending_ask = None;
        self.pending_approvals.clear();
        let note = self
            .renderer
            .dim("^C cancelling the turn (Ctrl-C again quits)");
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
            return Some(Outcome::Dropped);
        }
        None
    }

    /// Handles one line of input; `prompted`: what its prompt asked for (none on a pipe). `Some` ends the event
    /// loop.
    async fn line(
        &mut self,
        socket: &mut Socket,
        line: String,
        prompted: Option<Prompt>,
    ) -> Option<Outcome> {
        let front = self.pending_approvals.front().map(|a| a.request_id.clone());
        if let Some(request_id) = front {
            // Without a prompt (a pipe) the next line decides; on a terminal only a line typed at this request's
            // prompt does (one typed at `> ` is a message, and the approval's prompt comes next).
            let decides = match &prompted {
                None => true,
                Some(Prompt::Approval(asked)) => *asked == request_id,
                Some(_) => false,
            };
            if decides {
                self.pending_approvals.pop_front();
                let (allow, reason) = decision_of(&line);
                let mut frame = json!({
                    "type": "approval",
                    "request_id": request_id,
                    "decision": if allow { "allow" } else { "deny" },
                });
                if let Some(r) = reason {
                    frame["reason"] = json!(r);
                }
                if send(socket, &frame).await.is_err() {
                    return Some(Outcome::Dropped);
                }
                if self.deciding.len() == MAX_DECIDING {
                    self.deciding.pop_front();
                }
                self.deciding.push_back(request_id);
                return None;
            }
        }
        if matches!(prompted, Some(Prompt::Approval(_))) {
            // Its prompt's request was decided meanwhile (another client, the time limit): not a message.
            self.note("(that tool call was decided meanwhile; the line was not sent)");
            return None;
        }
        if let Some((request_id, _, _)) = self.pending_ask.take() {
            let frame = json!({"type": "reply", "request_id": request_id, "content": line});
            if send(socket, &frame).await.is_err() {
                return Some(Outcome::Dropped);
            }
            return None;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return None;
        }
        let content = match trimmed.strip_prefix('/') {
            Some(rest) if rest.starts_with('/') => line.trim_start().replacen("//", "/", 1),
            Some(command) => return self.command(command).await,
            None => line,
        };
        let frame = json!({"type": "message", "content": content});
        if send(socket, &frame).await.is_err() {
            self.error("the connection dropped; the message was not sent, please repeat it");
            return Some(Outcome::Dropped);
        }
        self.sent.push_back(content);
        self.cancel_sent = false;
        None
    }

    /// A `/command` (without its slash).
    async fn command(&mut self, command: &str) -> Option<Outcome> {
        let (name, arg) = command
            .split_once(char::is_whitespace)
            .map_or((command, ""), |(n, a)| (n, a.trim()));
        match name {
            "quit" | "exit" => return Some(Outcome::Exit(self.exit_code())),
            "help" => {
                let text = format!("session {} with {}.\n{HELP}", self.session_id, self.agent);
                self.note(&text);
            }
            "new" => {
                let agent = self.agent.clone();
                return self.new_session(&agent).await;
            }
            "agent" => {
                let agents = match self.api.agents().await {
                    Ok(a) => a,
                    Err(e) => {
                        self.error(&e);
                        return None;
                    }
                };
                if arg.is_empty() {
                    let text = format!("agent: {} (agents: {})", self.agent, agents.join(", "));
                    self.note(&text);
                } else if agents.iter().any(|a| a == arg) {
                    return self.new_session(arg).await;
                } else {
                    let e = no_such_agent(&self.api, arg, &agents);
                    self.fail(e);
                }
            }
            "sessions" => match self.api.sessions(SESSIONS_LISTED).await {
                Ok(list) => {
                    let text = self.renderer.sessions(&list, &self.session_id);
                    self.print(&text);
                }
                Err(e) => self.error(&e),
            },
            other => {
                self.fail(format!(
                    "unknown command `/{other}` (/help lists them; //text sends `/text`)"
                ));
            }
        }
        None
    }

    async fn new_session(&mut self, agent: &str) -> Option<Outcome> {
        match self.api.create_session(agent).await {
            Ok(id) => Some(Outcome::Switch(id, agent.to_string())),
            Err(e) => {
                self.error(&e);
                None
            }
        }
    }

    /// The history of a session whose log no longer reaches its start, from its messages and runs.
    async fn show_rest_history(&mut self) -> Result<(), String> {
        let messages = self.api.messages(&self.session_id).await?;
        let runs = self.api.runs(&self.session_id).await?;
        let active = self.active_run.clone();
        let text = self.renderer.history(&messages, &runs, active.as_deref());
        self.print(&text);
        Ok(())
    }

    /// Handles one server frame.
    fn frame(&mut self, v: &Value) {
        match v["type"].as_str().unwrap_or("") {
            "pong" | "hello" => return,
            "error" => {
                let code = v["code"].as_str().unwrap_or("error");
                let message = v["message"].as_str().unwrap_or("");
                if code == "cursor_expired" {
                    // The log no longer reaches the session's start: the server goes on as if attached
                    // without a cursor (the active run from its start, else live).
                    if let Some(r) = self.replay.take() {
                        if r.active.is_none() {
                            self.last_seq = Some(r.until);
                        }
                        self.rest_history = true;
                    } else {
                        self.note(
                            "(events missed while disconnected are older than the server keeps)",
                        );
                    }
                    return;
                }
                if matches!(code, "conflict" | "not_found") && self.deciding.pop_front().is_some() {
                    // The decision came too late (another client or the time limit decided) or its run ended.
                    self.error(&format!("the decision was not taken: {message}"));
                    return;
                }
                self.error(&format!("{code}: {message}"));
                if let Some(refused) = self.sent.pop_back() {
                    // The message was refused (run_active, too_large, ...): nothing will start.
                    self.failures
                        .push(format!("message `{refused}` refused: {code}: {message}"));
                }
                return;
            }
            _ => {}
        }
        if let Some(seq) = v["seq"].as_u64() {
            if self.last_seq.is_some_and(|last| seq <= last) {
                return;
            }
            self.last_seq = Some(seq);
        }
        let run_id = v["run_id"].as_str().map(String::from);
        if let (Some(r), Some(run)) = (&mut self.replay, &run_id) {
            if !r.runs.iter().any(|(id, _)| id == run) {
                r.runs.push((run.clone(), r.text.len()));
            }
        }
        self.frame_text(v, run_id);
        let done = match &self.replay {
            Some(r) => self.last_seq.is_some_and(|s| s >= r.until),
            None => false,
        };
        if done {
            self.end_replay();
        }
    }

    fn frame_text(&mut self, v: &Value, run_id: Option<String>) {
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
                        if let Some(run) = run_id {
                            self.own_runs.insert(run);
                        }
                    } else {
                        let text = self.renderer.user_message(content);
                        self.print(&text);
                    }
                }
                return;
            }
            "run_started" | "run_resumed" => {
                self.active_run = run_id.clone();
            }
            "input_requested" => {
                if let (Some(req), Some(run)) = (v["request_id"].as_str(), run_id.clone()) {
                    let question = v["question"].as_str().unwrap_or("").to_string();
                    self.pending_ask = Some((req.to_string(), run, question));
                }
            }
            "approval_requested" => {
                if let (Some(req), Some(run)) = (v["request_id"].as_str(), run_id.clone()) {
                    if !self.pending_approvals.iter().any(|a| a.request_id == req) {
                        self.pending_approvals.push_back(Approval {
                            request_id: req.to_string(),
                            run_id: run,
                            tool: v["tool"].as_str().unwrap_or("?").to_string(),
                        });
                    }
                }
            }
            // Decided, here, by another client or by the time limit.
            "approval_resolved" => {
                let req = v["request_id"].as_str().unwrap_or("");
                self.pending_approvals.retain(|a| a.request_id != req);
            }
            // Answered, here or by another client.
            "input_received"
                if self.pending_ask.as_ref().map(|(r, _, _)| r.as_str())
                    == v["request_id"].as_str() =>
            {
                self.pending_ask = None;
            }
            _ => {}
        }
        let text = self.renderer.event(v);
        self.print(&text);
        if v["type"] == "approval_requested" && self.interactive {
            // A prompt up already (`> `, another client's run asking) cannot change: its line stays a message.
            let note = if matches!(self.prompted_for, Some(Prompt::Message | Prompt::Answer)) {
                "(the line at the prompt below is not the decision: Enter it, or Enter an empty one, and its \
                 prompt follows; y allows, anything else denies, `n REASON` tells the agent why)"
            } else {
                "(y allows it; anything else denies it, and `n REASON` tells the agent why)"
            };
            self.note(note);
        }
        if v["type"] == "run_finished" {
            if self.active_run.is_some() && self.active_run == run_id {
                self.active_run = None;
            }
            if self
                .pending_ask
                .as_ref()
                .is_some_and(|(_, r, _)| Some(r) == run_id.as_ref())
            {
                self.pending_ask = None;
            }
            self.pending_approvals
                .retain(|a| Some(&a.run_id) != run_id.as_ref());
            if let Some(run) = run_id {
                if self.own_runs.remove(&run) {
                    self.cancel_sent = false;
                    let status = v["run"]["status"].as_str().unwrap_or("completed");
                    if status != "completed" {
                        let mut why = format!("run {run} {status}");
                        if let Some(m) = v["run"]["error"]["message"].as_str() {
                            why.push_str(": ");
                            why.push_str(m);
                        }
                        if self.interactive {
                            // The live view shows it already.
                            self.failures.push(why);
                        } else {
                            self.fail(why);
                        }
                    }
                }
            }
        }
    }

    /// The replayed log is complete: prints its latest turns, then the active run's events so far.
    fn end_replay(&mut self) {
        let Some(r) = self.replay.take() else { return };
        let active_at = r
            .active
            .as_ref()
            .and_then(|a| r.runs.iter().find(|(id, _)| id == a))
            .map_or(r.text.len(), |(_, at)| *at);
        let earlier: Vec<usize> = r
            .runs
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at < active_at)
            .collect();
        let skipped = earlier.len().saturating_sub(HISTORY_TURNS);
        let from = earlier.get(skipped).copied().unwrap_or(0).min(active_at);
        let mut out = String::new();
        if skipped > 0 {
            let s = if skipped == 1 { "" } else { "s" };
            out.push_str(
                &self
                    .renderer
                    .dim(&format!("({skipped} earlier turn{s} not shown)")),
            );
            out.push('\n');
        }
        out.push_str(&r.text[from..active_at]);
        out.push_str(&self.renderer.dim("(end of history)"));
        out.push('\n');
        out.push_str(&r.text[active_at..]);
        self.print(&out);
    }
}

/// What a prompt asks for.
enum Prompt {
    Message,
    Answer,
    /// The decision on this request.
    Approval(String),
}

/// A tool call waiting for a decision.
struct Approval {
    request_id: String,
    run_id: String,
    tool: String,
}

/// A line's decision on an approval: `y`, `yes` or `allow` (any case) allows; anything else denies. The reason
/// is the line, or what follows a leading `n`, `no` or `deny`; none for an empty line or one of those alone.
fn decision_of(line: &str) -> (bool, Option<String>) {
    let text = line.trim();
    let lower = text.to_lowercase();
    if matches!(lower.as_str(), "y" | "yes" | "allow") {
        return (true, None);
    }
    let (first, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let first = first.trim_end_matches([':', ',', '.']).to_lowercase();
    let reason = if matches!(first.as_str(), "n" | "no" | "deny") {
        rest.trim()
    } else {
        text
    };
    (false, (!reason.is_empty()).then(|| reason.to_string()))
}

fn no_such_agent(api: &Api, name: &str, agents: &[String]) -> String {
    format!(
        "no agent named `{name}` on {} (agents: {})",
        api.base(),
        agents.join(", ")
    )
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

#[cfg(test)]
mod tests {
    use super::decision_of;

    #[test]
    fn a_line_allows_only_when_it_says_so() {
        for yes in ["y", "Y", " yes ", "YES", "allow", "Allow"] {
            assert_eq!(decision_of(yes), (true, None), "{yes:?}");
        }
        for no in ["", "  ", "n", "No", "deny", "no.", "yes please", "ok"] {
            assert!(!decision_of(no).0, "{no:?}");
        }
        assert_eq!(decision_of("n"), (false, None));
        for (line, reason) in [
            ("n too risky", "too risky"),
            ("No, not today", "not today"),
            ("deny: use the other file", "use the other file"),
            ("never touch that", "never touch that"),
        ] {
            assert_eq!(decision_of(line), (false, Some(reason.into())), "{line:?}");
        }
    }
}
