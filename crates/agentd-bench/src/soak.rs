//! The `soak` command: many sessions against the real `agentd` binary and the mock upstream for minutes,
//! with clients that come and go, cancels, `ask_human` answers, and a `kill -9` + restart of the server at a
//! fixed period; then every client's stream is checked against the log, every run for exactly one
//! `run_finished`, and the server's memory for growth (SPEC.md section 4; issue 13 item 6).
//!
//! How it runs:
//! - One **driver** per session, over the native WebSocket. It sends turns one at a time (a plain stamped
//!   stream, a `calc:` tool turn, an `ask:` turn that asks the human through `ask_human`, or a long stream it
//!   cancels), answers questions and cancels over the socket or over REST (also while disconnected, since any
//!   client may), and drops its socket at random (with or without a close frame), coming back with `after=N`,
//!   N being the last `seq` it saw. Every message carries a `client_message_id`; a send whose user message
//!   is not in the log once a reconnect's replay is complete is sent again with the same id (idempotent).
//! - One **observer** per `--observe-every` sessions, over SSE, reconnecting at random with `?after=N` or
//!   `Last-Event-ID: N`.
//! - A **killer** sends SIGKILL to the server every `--kill-every` seconds and starts it again on the same
//!   port and database; clients see refused connections meanwhile and retry with back-off.
//! - A **sampler** reads the server's RSS and open descriptors from /proc every second.
//!
//! Every client checks as it reads: each event's `seq` is the one after the last it saw (no gap, no
//! duplicate, in order), and a reconnect's `hello.last_seq` is never below what it has seen (the log never
//! forgets an event a client saw). Each client keeps a hash of every event's JSON by `seq`. After the load
//! (`--duration`) the clients stop starting turns, finish what runs, read up to the end of the log, and stop;
//! then each session's log is read afresh with `after=0` over a new WebSocket and compared with what every
//! client of the session saw, event by event, and `GET /v1/sessions/{id}/runs` is compared with the log's
//! `run_started`/`run_finished` events. Completed turns are checked for content too (the final answer is the
//! concatenated text, a plain turn has every stamped token, an answer contains the human's reply).
//!
//! Several nodes (`--nodes N`, issue 15's chaos run, `scripts/chaos.sh`): N agentd processes on one fresh
//! PostgreSQL database (`pg::create`, dropped when the run passes; a failed run's is renamed
//! `agentd_chaos_kept_*` and kept), each with `[cluster] node_id = "n<i>"` and `lease_s = --lease-s`. Every
//! WebSocket and SSE connection and every REST call goes to a node chosen at random (a reconnect to another
//! node; a refused connection tries another node at once, and backs off only once every node has refused in a
//! row); the fresh read of session i goes to node i mod N and its runs are listed by the next node. The killer
//! kills a random node every period and starts it again (same node id, port and database) after a pause drawn
//! from `--down-min-s..--down-max-s` (default 1 s to 2 x lease_s, at most half the period), so a killed node's
//! runs are taken back either by itself at start (the pause ended before its lease lapsed) or by another node.
//! Every client follows which node executes each run (`run_started.run.node`, then each `run_resumed.node`)
//! and notes when it received each `run_resumed`; each resume is matched with the last kill of the node that
//! executed the run before it: the takeover time is kill -> first receipt by any client (p50/p99/max, against
//! `lease_s`), and a resume of a run whose node had not been killed (or not within a kill period) is a finding.
//! Memory is judged per node (its samples split at its own kills; the first and last periods with at least
//! ten samples after warm-up); the run fails if any node's heap grew past the bound.
//!
//! Memory: the RSS after warm-up (the first quarter of each restart period is left out, so the restart's
//! reconnect storm and replay are not counted) of the first period is compared with the last one's; the
//! soak fails when the last median exceeds the first by more than `--rss-growth-pct` percent plus
//! `--rss-slack-mib`. Outputs: `soak.md`, `soak.json`, `rss.csv` and `rss.png` in the output folder.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Dialect, Target, Ws};
use crate::orchestrate::MockProcess;
use crate::pg;
use crate::procfs;
use crate::servers::{self, Kind, Launch, Paths, Profile, Server};
use crate::stamp::StampParser;
use crate::{Error, Result};

/// `agentd-bench soak` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Seconds of load; then the clients finish their turns and everything is checked.
    #[arg(long, default_value_t = 600)]
    pub duration: u64,
    /// Sessions, each with its own WebSocket client.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Seconds between a kill -9 and restart of the server (0: never).
    #[arg(long, default_value_t = 60)]
    pub kill_every: u64,
    /// One SSE observer for every this many sessions (0: none).
    #[arg(long, default_value_t = 10)]
    pub observe_every: usize,
    /// Seed of the clients' random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The agentd binary (default: build it with cargo, debug unless --release).
    #[arg(long)]
    pub agentd_bin: Option<PathBuf>,
    /// Build agentd with --release (when --agentd-bin is not given).
    #[arg(long)]
    pub release: bool,
    /// The agentd checkout.
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Output folder (default: bench-results/soak for a full-size run, bench-results/tmp/soak otherwise).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Memory bound: the last period's median RSS may exceed the first's by this many percent ...
    #[arg(long, default_value_t = 25.0)]
    pub rss_growth_pct: f64,
    /// ... plus this many MiB.
    #[arg(long, default_value_t = 16.0)]
    pub rss_slack_mib: f64,
    /// Seconds the clients get after the load to finish their turns and catch up.
    #[arg(long, default_value_t = 120)]
    pub wind_down: u64,
    /// agentd nodes on one PostgreSQL database (SPEC.md section 6); more than one needs `--store postgres`
    /// (the default then). Clients use a node chosen at random for each connection and each REST call, and
    /// the killer kills a random node.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// `cluster.lease_s` of every node (with a Postgres store).
    #[arg(long, default_value_t = 10)]
    pub lease_s: u64,
    /// `sqlite` (one node only) or `postgres` (a fresh database on `AGENTD_BENCH_PG`, dropped at the end).
    /// Default: sqlite for one node, postgres for several.
    #[arg(long)]
    pub store: Option<String>,
    /// With several nodes: a killed node is started again after a pause drawn from this many seconds ...
    #[arg(long, default_value_t = 1.0)]
    pub down_min_s: f64,
    /// ... to this many (default: 2 x lease_s, at most half of --kill-every), so some restarts come before the
    /// lease lapses (the node takes its own runs back at start) and some after (another node takes them).
    #[arg(long)]
    pub down_max_s: Option<f64>,
}

/// Runs the soak; prints the summary; the exit status says whether everything held.
pub fn main(args: SoakArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd-bench soak: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(report) => {
            println!("{}", report.markdown());
            if report.passed {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "agentd-bench soak: FAILED ({} findings{})",
                    report.findings_total,
                    if report.sanity.is_empty() {
                        String::new()
                    } else {
                        format!(", {} sanity problems", report.sanity.len())
                    }
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("agentd-bench soak: {e}");
            ExitCode::FAILURE
        }
    }
}

// ------------------------------------------------------------------------------------------ randomness --

/// SplitMix64: small, seedable, good enough for choosing what a client does next.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

fn hash_of(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

// ------------------------------------------------------------------------------------- what a client saw --

/// Most anomalies kept as text per client (all are counted).
const KEPT_ANOMALIES: usize = 8;

/// What [`ClientLog::executing`] says of a run whose `run_finished` the client has read.
pub const ENDED: &str = "(ended)";

/// A `run_resumed` a client received (SPEC.md section 4, recovery; section 6, takeover).
#[derive(Debug, Clone)]
pub struct SeenResume {
    /// Its `seq`.
    pub seq: u64,
    /// The run.
    pub run: String,
    /// The node that executed the run until then, from the run's `run_started` (`run.node`) or its previous
    /// `run_resumed` (`node`), as this client read them.
    pub from: Option<String>,
    /// The node that resumed it.
    pub to: String,
    pub attempt: u64,
    /// When this client received it.
    pub at: Instant,
}

/// What one client saw of its session's log: a hash of each event by `seq`, and what went wrong as it read.
#[derive(Debug, Default, Clone)]
pub struct ClientLog {
    /// Hash of the event with `seq = i + 1` (0: never received).
    pub hashes: Vec<u64>,
    /// The first few anomalies, as text.
    pub anomalies: Vec<String>,
    /// Every anomaly.
    pub anomaly_count: u64,
    /// The node executing each run, as far as the log has said so far.
    pub executing: HashMap<String, String>,
    /// Every `run_resumed` this client received, with when.
    pub resumes: Vec<SeenResume>,
}

impl ClientLog {
    /// The last `seq` received in order (the `after` to reconnect with).
    pub fn cursor(&self) -> u64 {
        self.hashes.len() as u64
    }

    fn anomaly(&mut self, what: String) {
        self.anomaly_count += 1;
        if self.anomalies.len() < KEPT_ANOMALIES {
            self.anomalies.push(what);
        }
    }

    /// Follows which node executes which run (from a new event), and notes each `run_resumed` with the time.
    fn track_nodes(&mut self, f: &Frame<'_>, seq: u64) {
        if f.is_subagent {
            return;
        }
        let Some(run) = f.run_id.as_deref() else {
            return;
        };
        match f.ty.as_ref() {
            "run_started" => {
                if let Some(node) = f.run.as_ref().and_then(|r| r.node.clone()) {
                    self.executing.insert(run.to_string(), node);
                }
            }
            "run_resumed" => {
                let to = f.node.as_deref().unwrap_or("").to_string();
                let from = self.executing.insert(run.to_string(), to.clone());
                self.resumes.push(SeenResume {
                    seq,
                    run: run.to_string(),
                    from,
                    to,
                    attempt: f.attempt.unwrap_or(0),
                    at: Instant::now(),
                });
            }
            "run_finished" => {
                self.executing.insert(run.to_string(), ENDED.to_string());
            }
            _ => {}
        }
    }

    /// Records event `seq` with `hash`, read on connection `conn`. Returns whether the event is new (the
    /// client acts on it); a duplicate or a gap is an anomaly.
    pub fn record(&mut self, seq: u64, hash: u64, conn: u32) -> bool {
        let next = self.cursor() + 1;
        if seq == next {
            self.hashes.push(hash);
            return true;
        }
        if seq == 0 {
            self.anomaly(format!("an event with seq 0 on connection {conn}"));
            return false;
        }
        if seq < next {
            let same = self.hashes.get((seq - 1) as usize) == Some(&hash);
            self.anomaly(format!(
                "duplicate: seq {seq} again on connection {conn}, expected {next} ({})",
                if same {
                    "same content"
                } else {
                    "different content"
                }
            ));
            return false;
        }
        self.anomaly(format!(
            "gap: seq {seq} after {} on connection {conn}",
            next - 1
        ));
        self.hashes.resize((seq - 1) as usize, 0);
        self.hashes.push(hash);
        true
    }
}

/// Where `client` and `log` first differ, or None if they are equal.
pub fn first_difference(client: &[u64], log: &[u64]) -> Option<String> {
    if client == log {
        return None;
    }
    let at = client
        .iter()
        .zip(log)
        .position(|(a, b)| a != b)
        .unwrap_or(client.len().min(log.len()));
    Some(format!(
        "first difference at seq {} (the client has {} events, the log {})",
        at + 1,
        client.len(),
        log.len()
    ))
}

// --------------------------------------------------------------------------------------- wire frames --

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    run_id: Option<Cow<'a, str>>,
    #[serde(default)]
    is_subagent: bool,
    #[serde(default, borrow)]
    delta: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    request_id: Option<Cow<'a, str>>,
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    run: Option<RunPart>,
    #[serde(default)]
    last_seq: Option<u64>,
    #[serde(default)]
    active_run_id: Option<String>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default)]
    discard_from_seq: Option<u64>,
    #[serde(default, borrow)]
    node: Option<Cow<'a, str>>,
    #[serde(default)]
    attempt: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RunPart {
    #[serde(default)]
    status: String,
    #[serde(default)]
    node: Option<String>,
}

impl Frame<'_> {
    /// The stored message's role and content, for a `message` event.
    fn message_text(&self) -> Option<(&str, &str)> {
        let m = self.message.as_ref()?;
        Some((
            m.get("role").and_then(Value::as_str)?,
            m.get("content").and_then(Value::as_str).unwrap_or(""),
        ))
    }
}

/// The `[tag]` a soak message ends with.
fn tag_of(content: &str) -> Option<&str> {
    let t = content.trim_end().strip_suffix(']')?;
    Some(&t[t.rfind('[')? + 1..])
}

/// One server-sent event.
#[derive(Debug, Default, PartialEq)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Takes one complete event block (up to a blank line) off the front of `buf`.
fn take_sse_block(buf: &mut Vec<u8>) -> Option<SseEvent> {
    let end = buf.windows(2).position(|w| w == b"\n\n")?;
    let block: Vec<u8> = buf.drain(..end + 2).collect();
    let text = String::from_utf8_lossy(&block);
    let mut ev = SseEvent::default();
    let mut data: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => ev.id = Some(value.to_string()),
            "event" => ev.event = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    ev.data = data.join("\n");
    Some(ev)
}

// ------------------------------------------------------------------------------------- shared state --

#[derive(Default)]
struct Counters {
    events_received: AtomicU64,
    turns: AtomicU64,
    resends: AtomicU64,
    ws_connects: AtomicU64,
    sse_connects: AtomicU64,
    voluntary_disconnects: AtomicU64,
    dropped_connections: AtomicU64,
    failed_connects: AtomicU64,
    replies_ws: AtomicU64,
    replies_rest: AtomicU64,
    cancels_ws: AtomicU64,
    cancels_rest: AtomicU64,
    rest_failures: AtomicU64,
    restarts: AtomicU64,
    stale_active: AtomicU64,
    error_frames: Mutex<BTreeMap<String, u64>>,
    /// REST calls (replies, cancels) answered with an error status, by call and status.
    rest_refusals: Mutex<BTreeMap<String, u64>>,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    /// `http://127.0.0.1:<port>` of each node.
    bases: Vec<String>,
    /// `ws://127.0.0.1:<port>` of each node.
    ws_bases: Vec<String>,
    http: reqwest::Client,
    sse_http: reqwest::Client,
    t0: Instant,
    deadline: Instant,
    hard: Instant,
    counters: Counters,
}

impl Shared {
    /// A node at random (no draw with one node, so a single node's run is what it always was).
    fn pick(&self, rng: &mut Rng) -> usize {
        rng.range(0, self.bases.len().saturating_sub(1) as u64) as usize
    }

    /// A node other than `not`, at random (node 0 when there is only one).
    fn pick_other(&self, rng: &mut Rng, not: usize) -> usize {
        let n = self.bases.len();
        if n <= 1 {
            return 0;
        }
        (not + 1 + rng.range(0, n as u64 - 2) as usize) % n
    }

    fn rest_refused(&self, what: &str, status: reqwest::StatusCode) {
        let mut m = self
            .counters
            .rest_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(format!("{what} {}", status.as_u16())).or_insert(0) += 1;
    }

    fn error_frame(&self, code: &str) {
        let mut m = self
            .counters
            .error_frames
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(code.to_string()).or_insert(0) += 1;
    }
}

/// Client-side WebSocket settings: small buffers (a thousand connections share this process).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
}

struct Hello {
    last_seq: u64,
    active_run_id: Option<String>,
}

/// Opens the session's native WebSocket on `node` with `after` and reads its hello frame.
async fn connect_ws(sh: &Shared, node: usize, session: &str, after: u64) -> Result<(Ws, Hello)> {
    let url = format!(
        "{}/v1/sessions/{session}/ws?after={after}",
        sh.ws_bases[node]
    );
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true),
    )
    .await
    .map_err(|_| Error::new("handshake timed out"))??;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| Error::new("no hello within 10 s"))?;
    match first {
        Some(Ok(Message::Text(t))) => {
            let f: Frame = serde_json::from_str(t.as_str())?;
            if f.ty != "hello" {
                return Err(Error::new(format!("first frame is {}, not hello", f.ty)));
            }
            Ok((
                ws,
                Hello {
                    last_seq: f.last_seq.unwrap_or(0),
                    active_run_id: f.active_run_id,
                },
            ))
        }
        Some(Ok(_)) => Err(Error::new("first frame is not text")),
        Some(Err(e)) => Err(e.into()),
        None => Err(Error::new("closed before hello")),
    }
}

/// Keeps the latest few commands a turn sent.
fn note_attempt(list: &mut Vec<String>, what: String) {
    if list.len() >= 12 {
        list.remove(0);
    }
    list.push(what);
}

async fn backoff(rng: &mut Rng, ms: &mut u64) {
    tokio::time::sleep(rng.ms(*ms / 2, *ms)).await;
    *ms = (*ms * 2).min(1000);
}

// ------------------------------------------------------------------------------------------- drivers --

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnKind {
    Plain,
    Calc,
    Ask,
    Cancel,
}

impl TurnKind {
    fn name(self) -> &'static str {
        match self {
            TurnKind::Plain => "plain",
            TurnKind::Calc => "calc",
            TurnKind::Ask => "ask",
            TurnKind::Cancel => "cancel",
        }
    }
}

/// What a completed turn's answer must show.
enum Expect {
    /// A plain reply of this many stamped tokens.
    Tokens(u32),
    /// An answer containing this text (the calculator's result, the human's reply).
    Contains(String),
    /// Nothing: the turn is meant to be cancelled.
    Nothing,
}

struct Turn {
    kind: TurnKind,
    tag: String,
    frame: String,
    expect: Expect,
    run_id: Option<String>,
    needs_send: bool,
    sent_once: bool,
    text: String,
    /// Each text delta's seq and where it starts in `text`: a `run_resumed` drops the superseded ones.
    marks: Vec<(u64, usize)>,
    question: Option<String>,
    reply: String,
    reply_at: Option<Instant>,
    cancel_at: Option<Instant>,
    /// A cancel went out (the time above is then only a retry, in case the run goes on).
    cancel_sent: bool,
    /// When the first cancel went out (over either path).
    cancel_first: Option<Instant>,
    /// When the first reply to the open question went out.
    reply_first: Option<Instant>,
    /// The latest replies and cancels sent (time, path, node, answer), for a finding's evidence.
    attempts: Vec<String>,
    created: Instant,
    restarts_at_start: u64,
}

impl Turn {
    fn next_action(&self) -> Option<Instant> {
        match (self.reply_at, self.cancel_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What a driver hands back.
struct DriverResult {
    /// Seconds from a cancel turn's first cancel to its run_finished.
    cancel_waits: Vec<f64>,
    /// Seconds from the first reply to a question to its input_received.
    reply_waits: Vec<f64>,
    log: ClientLog,
    tally: BTreeMap<String, u64>,
    final_seq: Option<u64>,
    slow_turns: Vec<String>,
}

struct Driver {
    sh: Arc<Shared>,
    idx: usize,
    session: String,
    rng: Rng,
    log: ClientLog,
    turn: Option<Turn>,
    msgs: u32,
    next_turn_at: Instant,
    conn: u32,
    /// The node of the current (or next) connection.
    node: usize,
    cancel_waits: Vec<f64>,
    reply_waits: Vec<f64>,
    tally: BTreeMap<String, u64>,
    slow_turns: Vec<String>,
}

enum End {
    Done,
    Dropped,
    Voluntary,
}

impl Driver {
    fn new_turn(&mut self) -> Turn {
        self.msgs += 1;
        let tag = format!("s{}-m{}", self.idx, self.msgs);
        let rng = &mut self.rng;
        let kind = match rng.range(0, 99) {
            0..=49 => TurnKind::Plain,
            50..=64 => TurnKind::Calc,
            65..=84 => TurnKind::Ask,
            _ => TurnKind::Cancel,
        };
        let (content, expect) = match kind {
            TurnKind::Plain => {
                let n = rng.range(10, 60);
                let d = rng.range(30, 80);
                (
                    format!("tokens={n} delay_ms={d} [{tag}]"),
                    Expect::Tokens(u32::try_from(n).unwrap_or(0)),
                )
            }
            TurnKind::Calc => {
                let (a, b, c) = (rng.range(2, 99), rng.range(2, 99), rng.range(0, 999));
                (
                    format!("calc: {a}*{b}+{c} [{tag}]"),
                    Expect::Contains((a * b + c).to_string()),
                )
            }
            TurnKind::Ask => (
                format!("ask: which number? [{tag}]"),
                Expect::Contains(format!("answer {tag}")),
            ),
            TurnKind::Cancel => (format!("tokens=1000 delay_ms=30 [{tag}]"), Expect::Nothing),
        };
        let frame =
            json!({"type": "message", "content": content, "client_message_id": tag}).to_string();
        bump(&self.sh.counters.turns);
        Turn {
            kind,
            reply: format!("answer {tag}"),
            tag,
            frame,
            expect,
            run_id: None,
            needs_send: true,
            sent_once: false,
            text: String::new(),
            marks: Vec::new(),
            question: None,
            reply_at: None,
            cancel_at: None,
            cancel_sent: false,
            cancel_first: None,
            reply_first: None,
            attempts: Vec::new(),
            created: Instant::now(),
            restarts_at_start: self.sh.counters.restarts.load(Ordering::Relaxed),
        }
    }

    fn describe(&self) -> String {
        match &self.turn {
            None => "no turn".into(),
            Some(t) => format!(
                "{} turn {} run {:?} question {:?}, at seq {}; executing node per the log {:?}; last commands: [{}]",
                t.kind.name(),
                t.tag,
                t.run_id,
                t.question,
                self.log.cursor(),
                t.run_id.as_ref().and_then(|r| self.log.executing.get(r)),
                t.attempts.join("; ")
            ),
        }
    }

    fn check_hello(&mut self, hello: &Hello) {
        if hello.last_seq < self.log.cursor() {
            let what = format!(
                "session {}: hello.last_seq {} is below seq {} the client has seen (the log lost events)",
                self.session,
                hello.last_seq,
                self.log.cursor()
            );
            self.log.anomaly(what);
        }
    }

    /// One text frame from the socket.
    fn on_text(&mut self, text: &str) {
        let f: Frame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                self.log
                    .anomaly(format!("unparsable frame {}: {e}", client::clip(text, 120)));
                return;
            }
        };
        let Some(seq) = f.seq else {
            if f.ty == "error" {
                let code = f.code.as_deref().unwrap_or("?");
                self.sh.error_frame(code);
                if code == "cursor_expired" {
                    let what = format!(
                        "cursor_expired for after={} on connection {}",
                        self.log.cursor(),
                        self.conn
                    );
                    self.log.anomaly(what);
                }
            }
            return;
        };
        bump(&self.sh.counters.events_received);
        if self.log.record(seq, hash_of(text), self.conn) {
            self.log.track_nodes(&f, seq);
            self.apply(&f);
        }
    }

    /// Acts on a new event of the log.
    fn apply(&mut self, f: &Frame<'_>) {
        let now = Instant::now();
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let run_id = f.run_id.as_deref();
        if turn.run_id.is_none() {
            if f.ty == "message" {
                if let Some(("user", content)) = f.message_text() {
                    if tag_of(content) == Some(turn.tag.as_str()) {
                        turn.run_id = run_id.map(String::from);
                        turn.needs_send = false;
                        if turn.kind == TurnKind::Cancel {
                            turn.cancel_at = Some(now + self.rng.ms(300, 3000));
                        }
                    }
                }
            }
            return;
        }
        if turn.run_id.as_deref() != run_id || f.is_subagent {
            return;
        }
        match f.ty.as_ref() {
            "text_delta" => {
                turn.marks.push((f.seq.unwrap_or(0), turn.text.len()));
                turn.text.push_str(f.delta.as_deref().unwrap_or(""));
            }
            // The interrupted model call's text is superseded (SPEC.md section 4, recovery).
            "run_resumed" => {
                let from = f.discard_from_seq.unwrap_or(u64::MAX);
                if let Some(i) = turn.marks.iter().position(|(seq, _)| *seq >= from) {
                    turn.text.truncate(turn.marks[i].1);
                    turn.marks.truncate(i);
                }
                *self.tally.entry("resumed".into()).or_insert(0) += 1;
            }
            "input_requested" => {
                turn.question = f.request_id.as_deref().map(String::from);
                turn.reply_at = Some(now + self.rng.ms(100, 2500));
            }
            "input_received" if turn.question.as_deref() == f.request_id.as_deref() => {
                turn.question = None;
                turn.reply_at = None;
                if let Some(first) = turn.reply_first.take() {
                    self.reply_waits
                        .push(now.saturating_duration_since(first).as_secs_f64());
                }
            }
            "run_finished" => {
                let status = f.run.as_ref().map(|r| r.status.as_str()).unwrap_or("");
                let content = f.content.as_deref().unwrap_or("");
                self.finish_turn(status, content, now);
            }
            _ => {}
        }
    }

    fn finish_turn(&mut self, status: &str, content: &str, now: Instant) {
        let Some(turn) = self.turn.take() else { return };
        if let Some(first) = turn.cancel_first {
            self.cancel_waits
                .push(now.saturating_duration_since(first).as_secs_f64());
        }
        *self
            .tally
            .entry(format!("{} {status}", turn.kind.name()))
            .or_insert(0) += 1;
        let run = turn.run_id.as_deref().unwrap_or("?");
        if status == "completed" {
            if content != turn.text {
                self.log.anomaly(format!(
                    "run {run} ({}): run_finished content differs from its text deltas",
                    turn.tag
                ));
            }
            match &turn.expect {
                Expect::Tokens(n) => {
                    let mut seen = 0u32;
                    let mut p = StampParser::new();
                    p.feed(&turn.text, |_| seen += 1);
                    if seen != *n {
                        self.log.anomaly(format!(
                            "run {run} ({}): {seen} stamped tokens, the upstream sent {n}",
                            turn.tag
                        ));
                    }
                }
                Expect::Contains(s) if !content.contains(s.as_str()) => {
                    self.log.anomaly(format!(
                        "run {run} ({}): answer {:?} lacks {s:?}",
                        turn.tag,
                        client::clip(content, 80)
                    ));
                }
                _ => {}
            }
        }
        let took = now.duration_since(turn.created);
        let restarts = self.sh.counters.restarts.load(Ordering::Relaxed);
        if took > Duration::from_secs(60) && restarts == turn.restarts_at_start {
            self.slow_turns.push(format!(
                "session {} run {run} ({} turn {}) took {:.0} s without a restart in between",
                self.session,
                turn.kind.name(),
                turn.tag,
                took.as_secs_f64()
            ));
        }
        self.next_turn_at = now + self.rng.ms(300, 3000);
    }

    fn action_due(&self, now: Instant) -> bool {
        self.turn
            .as_ref()
            .and_then(Turn::next_action)
            .is_some_and(|t| t <= now)
    }

    /// Answers a due question or sends a due cancel: over `ws` (if given, most of the time) or REST.
    /// Err when the socket failed.
    async fn do_actions(&mut self, ws: Option<&mut Ws>) -> std::result::Result<(), ()> {
        let now = Instant::now();
        let use_ws = ws.is_some() && self.rng.chance(0.7);
        let rest_node = self.sh.pick(&mut self.rng);
        let Some(turn) = self.turn.as_mut() else {
            return Ok(());
        };
        let Some(run_id) = turn.run_id.clone() else {
            turn.reply_at = None;
            turn.cancel_at = None;
            return Ok(());
        };
        let sh = Arc::clone(&self.sh);
        if turn.reply_at.is_some_and(|t| t <= now) {
            let Some(request_id) = turn.question.clone() else {
                turn.reply_at = None;
                return Ok(());
            };
            // Whatever happens, look again in 5 s: the question may still be pending then.
            turn.reply_at = Some(now + Duration::from_secs(5));
            turn.reply_first.get_or_insert(now);
            let at = now.duration_since(sh.t0).as_secs_f64();
            if let (true, Some(ws)) = (use_ws, ws) {
                let frame =
                    json!({"type": "reply", "request_id": request_id, "content": turn.reply});
                note_attempt(
                    &mut turn.attempts,
                    format!("t={at:.1}s reply ws n{}", self.node + 1),
                );
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    return Err(());
                }
                bump(&sh.counters.replies_ws);
            } else {
                let url = format!(
                    "{}/v1/sessions/{}/runs/{run_id}/input",
                    sh.bases[rest_node], self.session
                );
                let body = json!({"request_id": request_id, "content": turn.reply});
                let answer = sh.http.post(url).json(&body).send().await;
                note_attempt(
                    &mut turn.attempts,
                    format!(
                        "t={at:.1}s reply rest n{} {}",
                        rest_node + 1,
                        answer
                            .as_ref()
                            .map_or("failed".to_string(), |r| r.status().as_u16().to_string())
                    ),
                );
                match answer {
                    Ok(r) if r.status().is_success() => bump(&sh.counters.replies_rest),
                    // The run ended meanwhile (its run_finished will come), or the question is not (yet) open
                    // where the reply went: looked at again in 5 s.
                    Ok(r) => sh.rest_refused("reply", r.status()),
                    Err(_) => {
                        bump(&sh.counters.rest_failures);
                        turn.reply_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
        } else if turn.cancel_at.is_some_and(|t| t <= now) {
            turn.cancel_at = Some(now + Duration::from_secs(5));
            turn.cancel_sent = true;
            turn.cancel_first.get_or_insert(now);
            let at = now.duration_since(sh.t0).as_secs_f64();
            if let (true, Some(ws)) = (use_ws, ws) {
                let frame = json!({"type": "cancel", "run_id": run_id});
                note_attempt(
                    &mut turn.attempts,
                    format!("t={at:.1}s cancel ws n{}", self.node + 1),
                );
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    return Err(());
                }
                bump(&sh.counters.cancels_ws);
            } else {
                let url = format!(
                    "{}/v1/sessions/{}/runs/{run_id}/cancel",
                    sh.bases[rest_node], self.session
                );
                let answer = sh.http.post(url).send().await;
                note_attempt(
                    &mut turn.attempts,
                    format!(
                        "t={at:.1}s cancel rest n{} {}",
                        rest_node + 1,
                        answer
                            .as_ref()
                            .map_or("failed".to_string(), |r| r.status().as_u16().to_string())
                    ),
                );
                match answer {
                    Ok(r) if r.status().is_success() => bump(&sh.counters.cancels_rest),
                    Ok(r) => sh.rest_refused("cancel", r.status()),
                    Err(_) => {
                        turn.cancel_sent = false;
                        bump(&sh.counters.rest_failures);
                        turn.cancel_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
        }
        Ok(())
    }

    async fn run(mut self, final_tx: watch::Sender<Option<u64>>) -> DriverResult {
        let sh = Arc::clone(&self.sh);
        self.next_turn_at = Instant::now() + self.rng.ms(0, 2000);
        let mut wait_ms = 100;
        let mut failures = 0usize;
        self.node = sh.pick(&mut self.rng);
        loop {
            let now = Instant::now();
            if now >= sh.hard || (now >= sh.deadline && self.turn.is_none()) {
                break;
            }
            let (mut ws, hello) =
                match connect_ws(&sh, self.node, &self.session, self.log.cursor()).await {
                    Ok(c) => c,
                    Err(_) => {
                        bump(&sh.counters.failed_connects);
                        // Another node at once; back-off only once every node has refused in a row.
                        failures += 1;
                        if failures.is_multiple_of(sh.bases.len()) {
                            backoff(&mut self.rng, &mut wait_ms).await;
                        }
                        self.node = sh.pick_other(&mut self.rng, self.node);
                        continue;
                    }
                };
            wait_ms = 100;
            failures = 0;
            self.conn += 1;
            bump(&sh.counters.ws_connects);
            self.check_hello(&hello);
            let end = self.connected(&mut ws, hello.last_seq).await;
            match end {
                End::Done => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break;
                }
                End::Dropped => bump(&sh.counters.dropped_connections),
                End::Voluntary => {
                    bump(&sh.counters.voluntary_disconnects);
                    if self.rng.chance(0.5) {
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    }
                    drop(ws);
                    // Away for a while; a question or a cancel that comes due meanwhile goes over REST.
                    let back = Instant::now() + self.rng.ms(0, 3000);
                    loop {
                        let now = Instant::now();
                        if now >= back {
                            break;
                        }
                        if self.action_due(now) {
                            let _ = self.do_actions(None).await;
                            continue;
                        }
                        let wake = self
                            .turn
                            .as_ref()
                            .and_then(Turn::next_action)
                            .map_or(back, |t| t.min(back));
                        tokio::time::sleep_until(wake).await;
                    }
                }
            }
            // A send the log does not show yet is sent again (same client_message_id) after the replay.
            if let Some(t) = self.turn.as_mut() {
                if t.run_id.is_none() && t.sent_once {
                    t.needs_send = true;
                }
            }
            // Every reconnect goes to another node.
            self.node = sh.pick_other(&mut self.rng, self.node);
        }
        if self.turn.is_some() {
            let what = format!(
                "session {}: the turn did not end within the wind-down ({})",
                self.session,
                self.describe()
            );
            self.log.anomaly(what);
        }
        let final_seq = self.catch_up().await;
        let _ = final_tx.send(final_seq);
        DriverResult {
            cancel_waits: self.cancel_waits,
            reply_waits: self.reply_waits,
            log: self.log,
            tally: self.tally,
            final_seq,
            slow_turns: self.slow_turns,
        }
    }

    /// Reads and acts while connected, until the socket drops, a random disconnect is due, or the work is done.
    async fn connected(&mut self, ws: &mut Ws, replay_to: u64) -> End {
        let sh = Arc::clone(&self.sh);
        let disconnect_at = Instant::now() + self.rng.ms(2000, 20_000);
        loop {
            let now = Instant::now();
            let winding = now >= sh.deadline;
            if now >= sh.hard || (winding && self.turn.is_none()) {
                return End::Done;
            }
            if !winding && now >= disconnect_at {
                return End::Voluntary;
            }
            if !winding && self.turn.is_none() && now >= self.next_turn_at {
                self.turn = Some(self.new_turn());
            }
            if self.log.cursor() >= replay_to {
                if let Some(t) = self.turn.as_mut().filter(|t| t.needs_send) {
                    if t.sent_once {
                        bump(&sh.counters.resends);
                    }
                    t.needs_send = false;
                    t.sent_once = true;
                    if ws.send(Message::text(t.frame.clone())).await.is_err() {
                        return End::Dropped;
                    }
                }
            }
            if winding {
                // Cancel the long stream now rather than later.
                if let Some(t) = self.turn.as_mut().filter(|t| !t.cancel_sent) {
                    if t.cancel_at.is_some_and(|c| c > now) {
                        t.cancel_at = Some(now);
                    }
                }
            }
            if self.action_due(now) {
                if self.do_actions(Some(ws)).await.is_err() {
                    return End::Dropped;
                }
                continue;
            }
            let mut wake = sh.hard;
            if !winding {
                wake = wake.min(disconnect_at).min(sh.deadline);
                if self.turn.is_none() {
                    wake = wake.min(self.next_turn_at);
                }
            }
            if let Some(t) = self.turn.as_ref().and_then(Turn::next_action) {
                wake = wake.min(t);
            }
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => self.on_text(t.as_str()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return End::Dropped,
                    Some(Ok(_)) => {}
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// After the last turn: one more connection, read to the end of the log. Returns the log's last seq.
    async fn catch_up(&mut self) -> Option<u64> {
        let sh = Arc::clone(&self.sh);
        let limit = Instant::now() + Duration::from_secs(60);
        let mut wait_ms = 100;
        let mut stale = 0u32;
        while Instant::now() < limit {
            self.node = sh.pick(&mut self.rng);
            let Ok((mut ws, hello)) =
                connect_ws(&sh, self.node, &self.session, self.log.cursor()).await
            else {
                backoff(&mut self.rng, &mut wait_ms).await;
                continue;
            };
            self.conn += 1;
            self.check_hello(&hello);
            let read = async {
                while self.log.cursor() < hello.last_seq {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => self.on_text(t.as_str()),
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
                        Some(Ok(_)) => {}
                    }
                }
                true
            };
            let done = tokio::time::timeout_at(limit, read).await.unwrap_or(false);
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            if !done {
                continue;
            }
            match &hello.active_run_id {
                None => return Some(hello.last_seq),
                Some(run) => {
                    // Every run of the session is this client's, and its last one has ended: a hello that
                    // still names it saw the run manager before the run's end cleared it. Ask again.
                    stale += 1;
                    if stale == 1 {
                        bump(&sh.counters.stale_active);
                    }
                    if stale >= 20 {
                        let what = format!(
                            "session {}: hello names run {run} active 10 s after the client's last turn ended",
                            self.session
                        );
                        self.log.anomaly(what);
                        return Some(hello.last_seq);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let what = format!(
            "session {}: could not read to the end of the log after the last turn (at seq {})",
            self.session,
            self.log.cursor()
        );
        self.log.anomaly(what);
        None
    }
}

// ----------------------------------------------------------------------------------------- observers --

/// An SSE client of one session: reads, drops the stream at random, comes back with `after` or
/// `Last-Event-ID`, and stops once it has read up to the seq the session's driver ended at.
async fn observe(
    sh: Arc<Shared>,
    session: String,
    mut rng: Rng,
    mut fin: watch::Receiver<Option<u64>>,
) -> ClientLog {
    let mut log = ClientLog::default();
    let limit = sh.hard + Duration::from_secs(90);
    let mut conn = 0u32;
    let mut wait_ms = 100;
    let mut fin_open = true;
    let mut node = sh.pick(&mut rng);
    let mut failures = 0usize;
    loop {
        let target = *fin.borrow();
        if target.is_some_and(|t| log.cursor() >= t) {
            break;
        }
        if !fin_open && target.is_none() {
            // The driver could not say where the log ends; the comparison with the fresh read decides.
            break;
        }
        if Instant::now() >= limit {
            log.anomaly(format!(
                "observer of {session} stopped at seq {} (the driver ended at {target:?})",
                log.cursor()
            ));
            break;
        }
        let base = format!("{}/v1/sessions/{session}/events", sh.bases[node]);
        let req = if rng.chance(0.3) {
            sh.sse_http
                .get(base)
                .header("Last-Event-ID", log.cursor().to_string())
        } else {
            sh.sse_http.get(format!("{base}?after={}", log.cursor()))
        };
        let mut resp = match tokio::time::timeout(Duration::from_secs(10), req.send()).await {
            Ok(Ok(r)) if r.status().is_success() => r,
            Ok(Ok(r)) => {
                sh.error_frame(&format!("sse http {}", r.status().as_u16()));
                bump(&sh.counters.failed_connects);
                backoff(&mut rng, &mut wait_ms).await;
                node = sh.pick_other(&mut rng, node);
                continue;
            }
            _ => {
                bump(&sh.counters.failed_connects);
                failures += 1;
                if failures.is_multiple_of(sh.bases.len()) {
                    backoff(&mut rng, &mut wait_ms).await;
                }
                node = sh.pick_other(&mut rng, node);
                continue;
            }
        };
        wait_ms = 100;
        failures = 0;
        conn += 1;
        bump(&sh.counters.sse_connects);
        let disconnect_at = if target.is_none() && Instant::now() < sh.deadline {
            Instant::now() + rng.ms(2000, 20_000)
        } else {
            limit
        };
        let mut buf: Vec<u8> = Vec::new();
        let voluntary = loop {
            if let Some(t) = *fin.borrow() {
                if log.cursor() >= t {
                    break false;
                }
            }
            tokio::select! {
                chunk = resp.chunk() => match chunk {
                    Ok(Some(bytes)) => {
                        buf.extend_from_slice(&bytes);
                        while let Some(ev) = take_sse_block(&mut buf) {
                            sse_event(&sh, &mut log, &ev, conn);
                        }
                    }
                    Ok(None) | Err(_) => {
                        bump(&sh.counters.dropped_connections);
                        break false;
                    }
                },
                _ = tokio::time::sleep_until(disconnect_at) => break true,
                r = fin.changed(), if fin_open => {
                    if r.is_err() {
                        fin_open = false;
                    }
                }
            }
        };
        drop(resp);
        if voluntary {
            bump(&sh.counters.voluntary_disconnects);
            tokio::time::sleep(rng.ms(0, 3000)).await;
        }
        node = sh.pick_other(&mut rng, node);
    }
    log
}

fn sse_event(sh: &Shared, log: &mut ClientLog, ev: &SseEvent, conn: u32) {
    if ev.data.is_empty() {
        return;
    }
    let f: Frame = match serde_json::from_str(&ev.data) {
        Ok(f) => f,
        Err(e) => {
            log.anomaly(format!(
                "unparsable SSE data {}: {e}",
                client::clip(&ev.data, 120)
            ));
            return;
        }
    };
    let Some(seq) = f.seq else {
        let code = f.code.as_deref().unwrap_or("?");
        sh.error_frame(code);
        if code == "cursor_expired" {
            log.anomaly(format!(
                "SSE cursor_expired for after={} on connection {conn}",
                log.cursor()
            ));
        }
        return;
    };
    if ev.id.as_deref() != Some(seq.to_string().as_str()) {
        log.anomaly(format!(
            "SSE id {:?} differs from the event's seq {seq}",
            ev.id
        ));
    }
    if ev.event.as_deref() != Some(f.ty.as_ref()) {
        log.anomaly(format!(
            "SSE event name {:?} differs from the event's type {}",
            ev.event, f.ty
        ));
    }
    bump(&sh.counters.events_received);
    if log.record(seq, hash_of(&ev.data), conn) {
        log.track_nodes(&f, seq);
    }
}

// ---------------------------------------------------------------------------- killer and sampler --

/// One kill -9 and restart.
#[derive(Debug, Clone, Serialize)]
pub struct Restart {
    /// The node killed (0-based; with several nodes its `cluster.node_id` is `n<node + 1>`).
    pub node: usize,
    /// Seconds since the load started, at the kill.
    pub at_s: f64,
    /// Milliseconds the node was left down on purpose before it was started again (0 with one node).
    pub pause_ms: u64,
    /// The killed process.
    pub killed_pid: u32,
    /// The new process.
    pub pid: u32,
    /// Milliseconds from the kill until the new process answered /healthz.
    pub down_ms: u64,
    /// Runs the new process took over at start, resumed or ended (from its log).
    pub interrupted_at_start: Option<u64>,
}

/// The `runs=N` of the start-up recovery's log line, if the process logged one.
fn interrupted_in_log(log: &Path) -> Option<u64> {
    let text = strip_ansi(&std::fs::read_to_string(log).ok()?);
    let line = text.lines().find(|l| l.contains("left unfinished"))?;
    let at = line.find("runs=")? + 5;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The killer's settings.
struct KillPlan {
    every: Duration,
    /// Pause before a killed node is started again: drawn from `min..=max` milliseconds.
    pause_ms: (u64, u64),
    seed: u64,
}

/// Kills a random node every period and starts it again (same config, so the same port, database and node id)
/// after the plan's pause, until the load's deadline.
async fn killer(
    sh: Arc<Shared>,
    mut servers: Vec<Server>,
    plan: KillPlan,
    pids: Arc<Vec<AtomicU32>>,
    logs: PathBuf,
) -> Result<(Vec<Server>, Vec<Restart>)> {
    let mut restarts = Vec::new();
    if plan.every.is_zero() {
        return Ok((servers, restarts));
    }
    let mut rng = Rng::new(plan.seed ^ 0x4b11_4b11);
    let several = servers.len() > 1;
    let mut k = 1u32;
    loop {
        let at = sh.t0 + plan.every * k;
        if at >= sh.deadline {
            break;
        }
        tokio::time::sleep_until(at).await;
        let node = rng.range(0, servers.len().saturating_sub(1) as u64) as usize;
        let pause = Duration::from_millis(rng.range(plan.pause_ms.0, plan.pause_ms.1));
        let server = &mut servers[node];
        let killed_pid = server.pid;
        let launch: Launch = server.launch.clone();
        pids[node].store(0, Ordering::SeqCst);
        let t_kill = Instant::now();
        server.stop(); // SIGKILL, then reaped
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let log = if several {
            logs.join(format!("agentd-n{}-{k}.log", node + 1))
        } else {
            logs.join(format!("agentd-{k}.log"))
        };
        *server = Server::spawn(launch, None, log.clone())?;
        pids[node].store(server.pid, Ordering::SeqCst);
        sh.counters.restarts.fetch_add(1, Ordering::Relaxed);
        let http = client::http_client()?;
        server
            .wait_healthy(&http, Duration::from_secs(120))
            .await
            .map_err(|e| Error::new(format!("restart {k}: {e}")))?;
        let down = t_kill.elapsed();
        restarts.push(Restart {
            node,
            at_s: t_kill.duration_since(sh.t0).as_secs_f64(),
            pause_ms: u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
            killed_pid,
            pid: server.pid,
            down_ms: u64::try_from(down.as_millis()).unwrap_or(u64::MAX),
            interrupted_at_start: interrupted_in_log(&log),
        });
        eprintln!(
            "agentd-bench soak: t={:.0}s kill -9 {killed_pid}{}, restarted as {} after a pause of {} ms (up after {} ms)",
            t_kill.duration_since(sh.t0).as_secs_f64(),
            if several { format!(" (node n{})", node + 1) } else { String::new() },
            server.pid,
            pause.as_millis(),
            down.as_millis()
        );
        k += 1;
    }
    Ok((servers, restarts))
}

/// One sample of a server process.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The node (0-based).
    pub node: usize,
    /// Seconds since the load started.
    pub t_s: f64,
    /// The server's pid (0 while it restarts).
    pub pid: u32,
    /// Its resident set, KiB (0 while it restarts).
    pub rss_kib: u64,
    /// The anonymous part of it (heap, stacks), KiB.
    pub anon_kib: u64,
    /// The file-backed part (the binary, mapped database pages), KiB.
    pub file_kib: u64,
    /// Its open file descriptors.
    pub fds: u64,
    /// Events received by all clients so far (replays included).
    pub events: u64,
}

/// `RssAnon` and `RssFile` of /proc/PID/status, KiB.
fn rss_parts(pid: u32) -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

async fn sampler(
    sh: Arc<Shared>,
    pids: Arc<Vec<AtomicU32>>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => { for (node, pid) in pids.iter().enumerate() {
                let p = pid.load(Ordering::SeqCst);
                let rss = if p == 0 { 0 } else { procfs::process_rss_kib(p).unwrap_or(0) };
                let (anon, file) = if p == 0 { (0, 0) } else { rss_parts(p) };
                out.push(Sample {
                    node,
                    t_s: Instant::now().duration_since(sh.t0).as_secs_f64(),
                    pid: p,
                    rss_kib: rss,
                    anon_kib: anon,
                    file_kib: file,
                    fds: if p == 0 { 0 } else { fd_count(p) },
                    events: sh.counters.events_received.load(Ordering::Relaxed),
                });
            }}
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
        }
    }
    out
}

// ---------------------------------------------------------------------------------------- memory --

/// RSS of one restart period.
#[derive(Debug, Clone, Serialize)]
pub struct PeriodRss {
    /// The period, seconds since the load started.
    pub start_s: f64,
    pub end_s: f64,
    /// Median RSS after warm-up, MiB (0 without samples).
    pub median_mib: f64,
    /// Median of its anonymous part (heap, stacks) after warm-up, MiB.
    pub anon_median_mib: f64,
    /// Highest sample of the period (warm-up included), MiB.
    pub max_mib: f64,
    /// Least-squares slope after warm-up, MiB per minute.
    pub slope_mib_per_min: f64,
    /// Samples after warm-up.
    pub samples: usize,
}

/// The memory verdict.
#[derive(Debug, Clone, Serialize)]
pub struct RssVerdict {
    /// Seconds left out at the start of each period.
    pub warmup_s: f64,
    pub periods: Vec<PeriodRss>,
    /// First and last period's medians, MiB.
    pub first_mib: f64,
    pub last_mib: f64,
    /// What the last median may reach: first × (1 + pct/100) + slack.
    pub bound_mib: f64,
    /// Highest sample of the run, MiB.
    pub max_mib: f64,
    /// Growth from the first median to the last, percent.
    pub growth_pct: f64,
    pub pass: bool,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn slope_per_min(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 60.0
    }
}

/// Samples after warm-up a period needs to be the first or last one judged.
const MIN_JUDGED: usize = 10;

/// Splits the samples at the kills, leaves out each period's warm-up, compares the first period with the last.
pub fn judge_rss(
    samples: &[Sample],
    kills_s: &[f64],
    end_s: f64,
    warmup_s: f64,
    growth_pct: f64,
    slack_mib: f64,
) -> RssVerdict {
    let mut bounds = vec![0.0];
    bounds.extend(kills_s.iter().copied().filter(|k| *k < end_s));
    bounds.push(end_s);
    let mut periods = Vec::new();
    for w in bounds.windows(2) {
        let (start, end) = (w[0], w[1]);
        let all: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.t_s >= start && s.t_s < end && s.rss_kib > 0)
            .collect();
        let settled: Vec<(f64, f64)> = all
            .iter()
            .filter(|s| s.t_s >= start + warmup_s)
            .map(|s| (s.t_s, mib(s.rss_kib)))
            .collect();
        let mut values: Vec<f64> = settled.iter().map(|p| p.1).collect();
        let mut anon: Vec<f64> = all
            .iter()
            .filter(|s| s.t_s >= start + warmup_s)
            .map(|s| mib(s.anon_kib))
            .collect();
        periods.push(PeriodRss {
            start_s: start,
            end_s: end,
            median_mib: median(&mut values),
            anon_median_mib: median(&mut anon),
            max_mib: all.iter().map(|s| mib(s.rss_kib)).fold(0.0, f64::max),
            slope_mib_per_min: slope_per_min(&settled),
            samples: settled.len(),
        });
    }
    // Judged on the anonymous part (heap, stacks): the file-backed part is mostly SQLite's memory-mapped
    // database, page cache that grows with the database and that the kernel takes back under pressure; it is
    // plotted and reported, not judged.
    let judged = |p: &PeriodRss| {
        if p.anon_median_mib > 0.0 {
            p.anon_median_mib
        } else {
            p.median_mib
        }
    };
    // A period with few samples after its warm-up (a node killed again soon after its restart, or just
    // before the end) is not judged: the first and last periods with at least `MIN_JUDGED` samples are.
    let judgeable: Vec<&PeriodRss> = periods.iter().filter(|p| p.samples >= MIN_JUDGED).collect();
    let (first, last) = match (judgeable.first(), judgeable.last()) {
        (Some(f), Some(l)) => (judged(f), judged(l)),
        _ => (
            periods.first().map_or(0.0, judged),
            periods.last().map_or(0.0, judged),
        ),
    };
    let bound = first * (1.0 + growth_pct / 100.0) + slack_mib;
    let max = samples
        .iter()
        .filter(|s| s.t_s < end_s)
        .map(|s| mib(s.rss_kib))
        .fold(0.0, f64::max);
    RssVerdict {
        warmup_s,
        first_mib: first,
        last_mib: last,
        bound_mib: bound,
        max_mib: max,
        growth_pct: if first > 0.0 {
            (last / first - 1.0) * 100.0
        } else {
            0.0
        },
        pass: first > 0.0 && last > 0.0 && last <= bound,
        periods,
    }
}

// ------------------------------------------------------------------------------------------ takeovers --

/// A `run_resumed` as the clients saw it, against the kills of the node that executed the run.
#[derive(Debug, Clone, Serialize)]
pub struct Takeover {
    pub session: String,
    /// The `run_resumed` event's seq.
    pub seq: u64,
    pub run: String,
    pub attempt: u64,
    /// The node that executed the run until then.
    pub from: Option<String>,
    /// The node that resumed it.
    pub to: String,
    /// Seconds since the load started when a client (driver or observer) first received it.
    pub seen_s: f64,
    /// The last kill of `from` before that, seconds since the load started.
    pub kill_s: Option<f64>,
    /// `seen_s - kill_s`: from the kill of the executing node to the first client's receipt of the resume.
    pub takeover_s: Option<f64>,
}

/// Count and percentiles of durations, seconds (nearest rank).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Secs {
    pub count: usize,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
}

impl Secs {
    fn of(values: &[f64]) -> Secs {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |q: f64| {
            if v.is_empty() {
                return 0.0;
            }
            let rank = (q * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Secs {
            count: v.len(),
            p50_s: q(0.5),
            p99_s: q(0.99),
            max_s: v.last().copied().unwrap_or(0.0),
        }
    }

    fn text(&self) -> String {
        if self.count == 0 {
            return "none".into();
        }
        format!(
            "{}: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            self.count, self.p50_s, self.p99_s, self.max_s
        )
    }
}

/// The takeovers of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TakeoverStats {
    /// `cluster.lease_s` (None without a cluster).
    pub lease_s: Option<u64>,
    /// Distinct `run_resumed` events the clients saw.
    pub count: usize,
    /// Kill -> first receipt, every takeover that answers a kill.
    pub all: Secs,
    /// Of those, resumed by another node (the killed node's lease lapsed before it came back).
    pub by_other_node: Secs,
    /// Of those, resumed by the killed node itself after its restart (its start-up takes back its own runs).
    pub by_restarted_node: Secs,
    /// Every takeover, in the order first seen.
    pub takeovers: Vec<Takeover>,
}

/// Matches every `run_resumed` the clients saw (`(session, what)`, several clients may have seen one event)
/// with the last kill of the node that executed the run before the first receipt. Findings: a resume of a run
/// whose node was not killed (no kill before, or the last kill longer ago than a kill period), or whose node
/// is unknown.
pub fn judge_takeovers(
    seen: Vec<(String, SeenResume)>,
    t0: Instant,
    node_of: &dyn Fn(&str) -> Option<usize>,
    restarts: &[Restart],
    kill_every_s: u64,
    lease_s: Option<u64>,
) -> (TakeoverStats, Vec<String>) {
    let mut first: BTreeMap<(String, u64), SeenResume> = BTreeMap::new();
    for (session, r) in seen {
        match first.entry((session, r.seq)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(r);
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                if r.at < o.get().at {
                    o.insert(r);
                }
            }
        }
    }
    let mut list: Vec<Takeover> = first
        .into_iter()
        .map(|((session, seq), r)| {
            let seen_s = r.at.saturating_duration_since(t0).as_secs_f64();
            let kill_s = r.from.as_deref().and_then(node_of).and_then(|node| {
                restarts
                    .iter()
                    .filter(|k| k.node == node && k.at_s <= seen_s)
                    .map(|k| k.at_s)
                    .max_by(f64::total_cmp)
            });
            Takeover {
                session,
                seq,
                run: r.run,
                attempt: r.attempt,
                from: r.from,
                to: r.to,
                seen_s,
                kill_s,
                takeover_s: kill_s.map(|k| seen_s - k),
            }
        })
        .collect();
    list.sort_by(|a, b| a.seen_s.total_cmp(&b.seen_s));
    let mut findings = Vec::new();
    let (mut all, mut other, mut same) = (Vec::new(), Vec::new(), Vec::new());
    for t in &list {
        let what = format!(
            "session {}: run_resumed (seq {}, attempt {}) of run {} by node {:?}, first seen at t={:.1}s",
            t.session, t.seq, t.attempt, t.run, t.to, t.seen_s
        );
        let Some(from) = t.from.as_deref() else {
            findings.push(format!(
                "{what}: no run_started or run_resumed before it named the node executing the run"
            ));
            continue;
        };
        if from == ENDED {
            findings.push(format!(
                "{what}: the run had ended (its run_finished is earlier in the log)"
            ));
            continue;
        }
        if node_of(from).is_none() {
            findings.push(format!(
                "{what}: the run was executing on {from:?}, not a node of this run"
            ));
            continue;
        }
        let Some(took) = t.takeover_s else {
            findings.push(format!(
                "{what}: the run was executing on {from}, which had not been killed"
            ));
            continue;
        };
        if kill_every_s > 0 && took > kill_every_s as f64 {
            findings.push(format!(
                "{what}: the run was executing on {from}, last killed {took:.1} s before (more than a kill period): not a takeover of a killed node's run, or one far beyond the lease"
            ));
            continue;
        }
        all.push(took);
        if from == t.to {
            same.push(took);
        } else {
            other.push(took);
        }
    }
    (
        TakeoverStats {
            lease_s,
            count: list.len(),
            all: Secs::of(&all),
            by_other_node: Secs::of(&other),
            by_restarted_node: Secs::of(&same),
            takeovers: list,
        },
        findings,
    )
}

// -------------------------------------------------------------------------------------- verification --

#[derive(Default)]
struct RunTally {
    started: u32,
    finished: u32,
    status: String,
}

struct Fresh {
    log: ClientLog,
    last_seq: u64,
    active_run_id: Option<String>,
    runs: HashMap<String, RunTally>,
    tags: HashMap<String, u32>,
    types: BTreeMap<String, u64>,
}

/// The session's whole log, read with `after=0` over a new WebSocket (on `node`, then the next ones).
async fn fresh_read(sh: &Shared, node: usize, session: &str) -> Result<Fresh> {
    let mut last_err = Error::new("no attempt");
    for attempt in 0..5 {
        match fresh_read_once(sh, (node + attempt) % sh.bases.len(), session).await {
            Ok(f) => return Ok(f),
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last_err)
}

async fn fresh_read_once(sh: &Shared, node: usize, session: &str) -> Result<Fresh> {
    let (mut ws, hello) = connect_ws(sh, node, session, 0).await?;
    let mut out = Fresh {
        log: ClientLog::default(),
        last_seq: hello.last_seq,
        active_run_id: hello.active_run_id,
        runs: HashMap::new(),
        tags: HashMap::new(),
        types: BTreeMap::new(),
    };
    let read = async {
        while out.log.cursor() < out.last_seq {
            let text = match ws.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Error::from(e)),
                None => return Err(Error::new("closed mid-read")),
            };
            let f: Frame = serde_json::from_str(text.as_str())?;
            let Some(seq) = f.seq else { continue };
            if !out.log.record(seq, hash_of(text.as_str()), 1) {
                continue;
            }
            *out.types.entry(f.ty.to_string()).or_insert(0) += 1;
            let run_id = f.run_id.as_deref().unwrap_or("").to_string();
            match f.ty.as_ref() {
                "run_started" if !f.is_subagent => out.runs.entry(run_id).or_default().started += 1,
                "run_finished" if !f.is_subagent => {
                    let t = out.runs.entry(run_id).or_default();
                    t.finished += 1;
                    t.status = f.run.map(|r| r.status).unwrap_or_default();
                }
                "message" => {
                    if let Some(("user", content)) = f.message_text() {
                        if let Some(tag) = tag_of(content) {
                            *out.tags.entry(tag.to_string()).or_insert(0) += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .map_err(|_| Error::new("fresh read not done within 120 s"))??;
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(out)
}

#[derive(Deserialize)]
struct RunRow {
    id: String,
    status: String,
}

/// What the checks of one session found.
#[derive(Default)]
struct SessionCheck {
    findings: Vec<String>,
    events: u64,
    runs_by_status: BTreeMap<String, u64>,
    types: BTreeMap<String, u64>,
}

/// Session `idx`'s log is read on node `idx % nodes` and its runs listed by the next node.
async fn check_session(
    sh: &Shared,
    idx: usize,
    session: &str,
    driver: &DriverResult,
    observer: Option<&ClientLog>,
) -> SessionCheck {
    let mut c = SessionCheck::default();
    let node = idx % sh.bases.len();
    let fresh = match fresh_read(sh, node, session).await {
        Ok(f) => f,
        Err(e) => {
            c.findings
                .push(format!("session {session}: the log could not be read: {e}"));
            return c;
        }
    };
    c.events = fresh.last_seq;
    c.types = fresh.types.clone();
    for a in &fresh.log.anomalies {
        c.findings
            .push(format!("session {session}: fresh read with after=0: {a}"));
    }
    if fresh.log.cursor() > 0 && fresh.log.hashes.first() == Some(&0) {
        c.findings.push(format!(
            "session {session}: the log does not start at seq 1"
        ));
    }
    if let Some(run) = &fresh.active_run_id {
        c.findings.push(format!(
            "session {session}: run {run} still active after the soak"
        ));
    }
    if let Some(d) = first_difference(&driver.log.hashes, &fresh.log.hashes) {
        c.findings.push(format!(
            "session {session}: the WebSocket client's stream differs from the log: {d}"
        ));
    }
    if let Some(o) = observer {
        if let Some(d) = first_difference(&o.hashes, &fresh.log.hashes) {
            c.findings.push(format!(
                "session {session}: the SSE client's stream differs from the log: {d}"
            ));
        }
        for a in &o.anomalies {
            c.findings
                .push(format!("session {session}: SSE client: {a}"));
        }
    }
    for a in &driver.log.anomalies {
        c.findings
            .push(format!("session {session}: WebSocket client: {a}"));
    }
    for (tag, n) in &fresh.tags {
        if *n > 1 {
            c.findings.push(format!(
                "session {session}: message {tag} (one client_message_id) stored {n} times"
            ));
        }
    }
    // The runs, as the REST API lists them, against the log.
    let url = format!(
        "{}/v1/sessions/{session}/runs",
        sh.bases[(node + 1) % sh.bases.len()]
    );
    let rows: Vec<RunRow> = match sh.http.get(url).send().await {
        Ok(r) if r.status().is_success() => match r.json().await {
            Ok(rows) => rows,
            Err(e) => {
                c.findings
                    .push(format!("session {session}: GET runs: bad body: {e}"));
                return c;
            }
        },
        Ok(r) => {
            c.findings.push(format!(
                "session {session}: GET runs answered {}",
                r.status()
            ));
            return c;
        }
        Err(e) => {
            c.findings
                .push(format!("session {session}: GET runs failed: {e}"));
            return c;
        }
    };
    for row in &rows {
        *c.runs_by_status.entry(row.status.clone()).or_insert(0) += 1;
        match fresh.runs.get(&row.id) {
            None => c.findings.push(format!(
                "session {session}: run {} ({}) has no run_finished in the log",
                row.id, row.status
            )),
            Some(t) => {
                if t.finished != 1 {
                    c.findings.push(format!(
                        "session {session}: run {} has {} run_finished events",
                        row.id, t.finished
                    ));
                }
                if t.started > 1 {
                    c.findings.push(format!(
                        "session {session}: run {} has {} run_started events",
                        row.id, t.started
                    ));
                }
                if t.finished >= 1 && t.status != row.status {
                    c.findings.push(format!(
                        "session {session}: run {} is {} in the API but {} in its run_finished",
                        row.id, row.status, t.status
                    ));
                }
            }
        }
        if matches!(row.status.as_str(), "queued" | "running" | "waiting_input") {
            c.findings.push(format!(
                "session {session}: run {} still {} after the soak",
                row.id, row.status
            ));
        }
    }
    for (id, t) in &fresh.runs {
        if !rows.iter().any(|r| &r.id == id) {
            c.findings.push(format!(
                "session {session}: the log has events of run {id} ({} run_finished) that GET runs does not list",
                t.finished
            ));
        }
    }
    c
}

// ------------------------------------------------------------------------------------------- report --

/// Everything a soak run found and measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_utc: String,
    pub command: String,
    pub agentd_bin: String,
    pub profile: String,
    /// agentd processes (nodes of one cluster when more than one).
    pub nodes: usize,
    /// `sqlite` or `postgres`.
    pub store: String,
    /// `cluster.lease_s` (with a Postgres store).
    pub lease_s: Option<u64>,
    /// The range a killed node's pause before its restart was drawn from, seconds.
    pub down_s: (f64, f64),
    /// The PostgreSQL server's settings.
    pub database: Option<String>,
    pub sessions: usize,
    pub observers: usize,
    pub duration_s: u64,
    pub kill_every_s: u64,
    pub seed: u64,
    pub cpus: usize,
    pub wall_s: f64,
    pub events_in_logs: u64,
    pub events_delivered: u64,
    pub runs: u64,
    pub runs_by_status: BTreeMap<String, u64>,
    pub turns_by_kind: BTreeMap<String, u64>,
    pub event_types: BTreeMap<String, u64>,
    pub restarts: Vec<Restart>,
    /// Every `run_resumed` the clients saw, against the kills.
    pub takeovers: TakeoverStats,
    /// A cancel turn's first cancel (over the WebSocket or REST, to whichever node) -> its run_finished.
    pub cancel_to_end: Secs,
    /// The first reply to a question (either path, any node) -> its input_received.
    pub reply_to_received: Secs,
    pub ws_connects: u64,
    pub sse_connects: u64,
    pub voluntary_disconnects: u64,
    pub dropped_connections: u64,
    pub failed_connects: u64,
    pub resends: u64,
    pub replies_ws: u64,
    pub replies_rest: u64,
    pub cancels_ws: u64,
    pub cancels_rest: u64,
    pub rest_failures: u64,
    /// REST replies and cancels answered with an error status (e.g. sent to a node that does not execute the
    /// run), by call and status.
    pub rest_refusals: BTreeMap<String, u64>,
    /// Sessions whose hello still named their last run active after its run_finished had been read.
    pub stale_active: u64,
    pub error_frames: BTreeMap<String, u64>,
    pub slow_turns: Vec<String>,
    /// The memory verdict of the node that grew most (the only node's with one).
    pub rss: RssVerdict,
    /// Each node's memory verdict (each judged on its own: its samples split at its own kills).
    pub rss_by_node: Vec<RssVerdict>,
    pub fds_max: u64,
    pub findings: Vec<String>,
    pub findings_total: usize,
    pub sanity: Vec<String>,
    pub passed: bool,
}

impl Report {
    /// The summary, as markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        if self.nodes > 1 {
            s.push_str(&format!(
                "Chaos soak {verdict}: {} agentd nodes on one PostgreSQL database (lease_s = {}), {} sessions ({} with an SSE observer), {} s of load, kill -9 of a random node every {} s, started again after {:.0}-{:.0} s; agentd {} build; {}.\n\n",
                self.nodes,
                self.lease_s.unwrap_or(0),
                self.sessions,
                self.observers,
                self.duration_s,
                self.kill_every_s,
                self.down_s.0,
                self.down_s.1,
                self.profile,
                self.started_utc
            ));
        } else {
            s.push_str(&format!(
                "Soak {verdict}: {} sessions ({} with an SSE observer), {} s of load, kill -9 every {} s; agentd {} build ({}); {}.\n\n",
                self.sessions, self.observers, self.duration_s, self.kill_every_s, self.profile, self.store, self.started_utc
            ));
        }
        s.push_str(&format!("Command: `{}`\n\n", self.command));
        s.push_str("| figure | value |\n| --- | --- |\n");
        let down: Vec<u64> = self.restarts.iter().map(|r| r.down_ms).collect();
        let mut downs: Vec<f64> = down.iter().map(|d| *d as f64).collect();
        let interrupted: u64 = self
            .restarts
            .iter()
            .filter_map(|r| r.interrupted_at_start)
            .sum();
        let mut per_node = String::new();
        if self.nodes > 1 {
            let counts: Vec<String> = (0..self.nodes)
                .map(|n| {
                    format!(
                        "n{}: {}",
                        n + 1,
                        self.restarts.iter().filter(|r| r.node == n).count()
                    )
                })
                .collect();
            per_node = format!("; per node {}", counts.join(", "));
        }
        let t = &self.takeovers;
        let lease = t
            .lease_s
            .map_or(String::new(), |l| format!(" (lease_s = {l})"));
        let mut rows: Vec<(String, String)> = vec![
            ("events in the logs".into(), self.events_in_logs.to_string()),
            (
                "events delivered to clients (replays included)".into(),
                self.events_delivered.to_string(),
            ),
            ("runs".into(), format!("{} ({})", self.runs, kv(&self.runs_by_status))),
            ("turns by kind and end".into(), kv(&self.turns_by_kind)),
            (
                "restarts (kill -9)".into(),
                format!(
                    "{} (down until /healthz: median {:.0} ms, max {} ms; {} runs taken over at start{per_node})",
                    self.restarts.len(),
                    median(&mut downs),
                    down.iter().max().copied().unwrap_or(0),
                    interrupted
                ),
            ),
            (
                "connections".into(),
                format!(
                    "{} WebSocket, {} SSE; {} dropped by the client at random, {} lost with the server, {} refused or failed",
                    self.ws_connects, self.sse_connects, self.voluntary_disconnects, self.dropped_connections, self.failed_connects
                ),
            ),
            (
                "ask_human replies".into(),
                format!("{} over the WebSocket, {} over REST", self.replies_ws, self.replies_rest),
            ),
            (
                "cancels".into(),
                format!("{} over the WebSocket, {} over REST", self.cancels_ws, self.cancels_rest),
            ),
            (
                "cancel turns: first cancel sent -> run_finished".into(),
                self.cancel_to_end.text(),
            ),
            (
                "questions: first reply sent -> input_received".into(),
                self.reply_to_received.text(),
            ),
            (
                "REST replies and cancels refused, by status".into(),
                kv(&self.rest_refusals),
            ),
            (
                "sends repeated with their client_message_id".into(),
                self.resends.to_string(),
            ),
            (
                "RSS after warm-up, first period -> last (median)".into(),
                format!(
                    "{:.1} MiB -> {:.1} MiB ({:+.1}%; bound {:.1} MiB) {}",
                    self.rss.first_mib,
                    self.rss.last_mib,
                    self.rss.growth_pct,
                    self.rss.bound_mib,
                    if self.rss.pass { "ok" } else { "EXCEEDED" }
                ),
            ),
            ("RSS max (any sample)".into(), format!("{:.1} MiB", self.rss.max_mib)),
            ("open descriptors, max".into(), self.fds_max.to_string()),
            ("error frames by code".into(), kv(&self.error_frames)),
            (
                "hello naming a finished run as active (seen once per session, then cleared)".into(),
                self.stale_active.to_string(),
            ),
            (
                "findings (gaps, duplicates, mismatches, runs without exactly one run_finished)".into(),
                self.findings_total.to_string(),
            ),
        ];
        let takeover_rows = [
            (
                "run_resumed seen by clients".into(),
                format!(
                    "{} ({} answer a kill of the node executing the run)",
                    t.count, t.all.count
                ),
            ),
            (
                format!("takeover: kill -> first client receipt of run_resumed{lease}"),
                t.all.text(),
            ),
            (
                "of which resumed by another node".into(),
                t.by_other_node.text(),
            ),
            (
                "of which resumed by the killed node after its restart".into(),
                t.by_restarted_node.text(),
            ),
        ];
        rows.splice(5..5, takeover_rows);
        if self.nodes > 1 {
            let verdicts: Vec<String> = self
                .rss_by_node
                .iter()
                .enumerate()
                .map(|(n, v)| {
                    format!(
                        "n{}: {:.1} -> {:.1} MiB ({:+.1}%, bound {:.1}) {}",
                        n + 1,
                        v.first_mib,
                        v.last_mib,
                        v.growth_pct,
                        v.bound_mib,
                        if v.pass { "ok" } else { "EXCEEDED" }
                    )
                })
                .collect();
            rows.push((
                "anonymous RSS per node, first judged period -> last (median after warm-up)".into(),
                verdicts.join("; "),
            ));
        }
        for (k, v) in rows {
            s.push_str(&format!(
                "| {k} | {} |\n",
                if v.is_empty() { "-".into() } else { v }
            ));
        }
        for (n, v) in self.rss_by_node.iter().enumerate() {
            let whose = if self.nodes > 1 {
                format!(" of node n{}", n + 1)
            } else {
                String::new()
            };
            s.push_str(&format!("\nRSS{whose} per restart period (median after warm-up, of which anonymous / max / slope after warm-up):\n\n"));
            for (i, p) in v.periods.iter().enumerate() {
                s.push_str(&format!(
                    "- {i}: {:.0}-{:.0} s: {:.1} MiB ({:.1} anon) / {:.1} MiB, {:+.1} MiB/min ({} samples)\n",
                    p.start_s, p.end_s, p.median_mib, p.anon_median_mib, p.max_mib, p.slope_mib_per_min, p.samples
                ));
            }
        }
        if self.nodes > 1 && !self.restarts.is_empty() {
            s.push_str("\nKills:\n\n");
            for r in &self.restarts {
                let resumed: Vec<&Takeover> = self
                    .takeovers
                    .takeovers
                    .iter()
                    .filter(|t| {
                        t.kill_s == Some(r.at_s)
                            && t.from.as_deref() == Some(node_name(r.node).as_str())
                    })
                    .collect();
                let by_other = resumed
                    .iter()
                    .filter(|t| t.from.as_deref() != Some(t.to.as_str()))
                    .count();
                let slowest = resumed
                    .iter()
                    .filter_map(|t| t.takeover_s)
                    .fold(0.0, f64::max);
                s.push_str(&format!(
                    "- t={:.0}s n{}: down {:.1} s (pause {:.1} s), {} runs resumed ({} by another node), slowest seen after {:.1} s\n",
                    r.at_s,
                    r.node + 1,
                    r.down_ms as f64 / 1000.0,
                    r.pause_ms as f64 / 1000.0,
                    resumed.len(),
                    by_other,
                    slowest
                ));
            }
        }
        if !self.findings.is_empty() {
            s.push_str("\nFindings (first ones):\n\n");
            for f in &self.findings {
                s.push_str(&format!("- {f}\n"));
            }
        }
        if !self.sanity.is_empty() {
            s.push_str("\nThe soak did not exercise everything it should:\n\n");
            for f in &self.sanity {
                s.push_str(&format!("- {f}\n"));
            }
        }
        if !self.slow_turns.is_empty() {
            s.push_str(&format!(
                "\nTurns over 60 s without a restart in between: {}\n",
                self.slow_turns.len()
            ));
            for t in self.slow_turns.iter().take(5) {
                s.push_str(&format!("- {t}\n"));
            }
        }
        s
    }
}

fn kv(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_csv(samples: &[Sample], path: &Path) -> Result<()> {
    let mut s =
        String::from("t_s,node,pid,rss_kib,rss_anon_kib,rss_file_kib,fds,events_received\n");
    for x in samples {
        s.push_str(&format!(
            "{:.1},{},{},{},{},{},{},{}\n",
            x.t_s, x.node, x.pid, x.rss_kib, x.anon_kib, x.file_kib, x.fds, x.events
        ));
    }
    std::fs::write(path, s)?;
    Ok(())
}

fn plot(samples: &[Sample], report: &Report, end_s: f64, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    crate::plot::ensure_font()?;
    let err = |e: &dyn std::fmt::Display| Error::new(format!("plot: {e}"));
    let root = BitMapBackend::new(path, (1400, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(540);
    let t_max = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let several = report.nodes > 1;
    let y_top = report
        .rss_by_node
        .iter()
        .map(|v| v.max_mib.max(v.bound_mib))
        .fold(report.rss.max_mib.max(report.rss.bound_mib), f64::max);
    let y_max = (y_top * 1.15).max(1.0);
    let caption = if several {
        format!(
            "agentd RSS per node during the chaos soak: {} nodes, {} sessions, a random node killed every {} s ({} build)",
            report.nodes, report.sessions, report.kill_every_s, report.profile
        )
    } else {
        format!(
            "agentd RSS during the soak: {} sessions, kill -9 every {} s ({} build)",
            report.sessions, report.kill_every_s, report.profile
        )
    };
    let mut chart = ChartBuilder::on(&top)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("RSS (MiB)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    let blue = RGBColor(31, 119, 180);
    let purple = RGBColor(148, 103, 189);
    let palette = [
        blue,
        RGBColor(140, 86, 75),
        RGBColor(23, 190, 207),
        RGBColor(188, 189, 34),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    // One line per process, so a restart is a break, not a dive to zero; one colour per node.
    let mut first_anon = true;
    for node in 0..report.nodes.max(1) {
        let samples: Vec<&Sample> = samples.iter().filter(|s| s.node == node).collect();
        let (blue, purple) = if several {
            let c = palette[node % palette.len()];
            (c, c)
        } else {
            (blue, purple)
        };
        let rss_label = if several {
            format!("n{} RSS (one line per process)", node + 1)
        } else {
            "RSS (one line per process)".to_string()
        };
        let mut first_line = true;
        let mut start = 0;
        while start < samples.len() {
            let pid = samples[start].pid;
            let mut end = start;
            while end < samples.len() && samples[end].pid == pid {
                end += 1;
            }
            if pid != 0 {
                let anon: Vec<(f64, f64)> = samples[start..end]
                    .iter()
                    .filter(|s| s.anon_kib > 0)
                    .map(|s| (s.t_s, mib(s.anon_kib)))
                    .collect();
                let series = chart
                    .draw_series(LineSeries::new(
                        anon,
                        purple.mix(if several { 0.5 } else { 1.0 }).stroke_width(1),
                    ))
                    .map_err(|e| err(&e))?;
                if first_line && first_anon {
                    first_anon = false;
                    series
                        .label(if several {
                            "of which anonymous (heap, stacks): the thin lines"
                        } else {
                            "of which anonymous (heap, stacks)"
                        })
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], purple.stroke_width(1))
                        });
                }
                let pts: Vec<(f64, f64)> = samples[start..end]
                    .iter()
                    .filter(|s| s.rss_kib > 0)
                    .map(|s| (s.t_s, mib(s.rss_kib)))
                    .collect();
                let series = chart
                    .draw_series(LineSeries::new(pts, blue.stroke_width(2)))
                    .map_err(|e| err(&e))?;
                if first_line {
                    series.label(rss_label.clone()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2))
                    });
                    first_line = false;
                }
            }
            start = end;
        }
    }
    let red = RGBColor(214, 39, 40);
    for (i, r) in report.restarts.iter().enumerate() {
        let s = chart
            .draw_series(LineSeries::new(
                vec![(r.at_s, 0.0), (r.at_s, y_max)],
                red.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
        if i == 0 {
            s.label("kill -9 + restart").legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(1))
            });
        }
    }
    let green = RGBColor(44, 160, 44);
    let orange = RGBColor(255, 127, 14);
    let periods: &[PeriodRss] = if several { &[] } else { &report.rss.periods };
    for (p, color, label) in [
        (
            periods.first(),
            green,
            "first period's median after warm-up",
        ),
        (periods.last(), orange, "last period's median after warm-up"),
    ] {
        let Some(p) = p else { continue };
        let from = (p.start_s + report.rss.warmup_s).min(p.end_s);
        chart
            .draw_series(LineSeries::new(
                vec![(from, p.median_mib), (p.end_s.min(end_s), p.median_mib)],
                color.stroke_width(3),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{label}: {:.1} MiB", p.median_mib))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    let grey = RGBColor(90, 90, 90);
    if !several {
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, report.rss.bound_mib), (end_s, report.rss.bound_mib)],
                grey.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(format!(
                "bound for the last median: {:.1} MiB",
                report.rss.bound_mib
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    // Events per second delivered to the clients (one tick samples every node: node 0's samples count).
    let ticks: Vec<&Sample> = samples.iter().filter(|s| s.node == 0).collect();
    let rates: Vec<(f64, f64)> = ticks
        .windows(2)
        .map(|w| {
            let dt = (w[1].t_s - w[0].t_s).max(0.001);
            (
                w[1].t_s,
                w[1].events.saturating_sub(w[0].events) as f64 / dt,
            )
        })
        .collect();
    let r_max = rates.iter().map(|r| r.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..r_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("events/s to clients")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(rates, green.stroke_width(1)))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------- run --

/// A node's place in a cluster: `cluster.node_id` and `cluster.lease_s`.
struct ClusterPart<'a> {
    node_id: &'a str,
    lease_s: u64,
}

/// The config of one node: SQLite in `dir` unless `store` names a database URL; a `[cluster]` section with one.
fn soak_config(
    port: u16,
    upstream: &str,
    dir: &Path,
    store: Option<&str>,
    cluster: Option<ClusterPart<'_>>,
) -> String {
    let sqlite = format!("sqlite://{}", dir.join("agentd.db").display());
    let mut config = soak_config_base(port, upstream, dir, store.unwrap_or(&sqlite));
    if let Some(c) = cluster {
        config.push_str(&format!(
            "\n[cluster]\nnode_id = \"{}\"\nlease_s = {}\n",
            c.node_id, c.lease_s
        ));
    }
    config
}

fn soak_config_base(port: u16, upstream: &str, dir: &Path, store: &str) -> String {
    format!(
        r#"# Written by agentd-bench soak.
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_s = 1
ask_human_timeout_s = 300
# Keep every run's events, so each session's whole log can be compared with what its clients saw.
event_retention_runs = 1000000
workspace_dir = "{workspaces}"

[store]
url = "{store}"

[providers.upstream]
kind = "openai"
base_url = "{upstream}"
timeout_s = 120

[[agents]]
name = "assistant"
provider = "upstream"
model = "mock"
tools = ["calculator", "ask_human"]
max_iterations = 4
# A small window, so each session's history outgrows it in the first minute or two: from then on every turn
# is compressed (a summary call first) and holds at most a window and a half of history, and memory is judged
# in that steady state rather than while histories are still growing.
max_context_tokens = 1024
"#,
        workspaces = dir.join("workspaces").display(),
    )
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Panics in the server's logs.
fn panics_in_logs(logs: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(logs) else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("agentd-") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("panicked")) {
            out.push(format!("{name}: {}", client::clip(line, 200)));
        }
    }
    out
}

async fn run(args: SoakArgs) -> Result<Report> {
    let started_utc = utc_now();
    let wall = std::time::Instant::now();
    let repo = std::fs::canonicalize(&args.repo).unwrap_or(args.repo.clone());
    if args.nodes == 0 {
        return Err(Error::new("--nodes must be at least 1"));
    }
    let postgres = match args.store.as_deref() {
        None => args.nodes > 1,
        Some("postgres") => true,
        Some("sqlite") if args.nodes > 1 => {
            return Err(Error::new(
                "several nodes share one PostgreSQL database: --store postgres",
            ))
        }
        Some("sqlite") => false,
        Some(other) => {
            return Err(Error::new(format!(
                "--store {other}: expected sqlite or postgres"
            )))
        }
    };
    let several = args.nodes > 1;
    // A chaos run (several nodes) is full at ten minutes whatever its sessions; a single node's soak at 1,000.
    let (full, folder) = if several {
        (args.duration >= 600, "chaos")
    } else {
        (args.duration >= 600 && args.sessions >= 1000, "soak")
    };
    let out = args.out.clone().unwrap_or_else(|| {
        if full {
            repo.join("bench-results").join(folder)
        } else {
            repo.join("bench-results").join("tmp").join(folder)
        }
    });
    let work = std::env::temp_dir().join(format!("agentd-soak-{}", std::process::id()));
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&out)?;
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let paths = Paths {
        repo: repo.clone(),
        bench_dir: repo.join("..").join("shared").join("bench"),
        cache: home.join(".cache").join("agentd-bench"),
        work: work.clone(),
        logs: logs.clone(),
    };
    let profile = if args.release {
        Profile::Release
    } else {
        Profile::Debug
    };
    eprintln!("agentd-bench soak: preparing agentd ...");
    let bin = servers::prepare_agentd(&paths, profile, args.agentd_bin.as_deref())?;
    let profile_name = if bin.components().any(|c| c.as_os_str() == "release") {
        "release"
    } else if bin.components().any(|c| c.as_os_str() == "debug") {
        "debug"
    } else {
        "unknown"
    };
    let needed_fds = (args.sessions as u64) * 3 + 512 * args.nodes as u64;
    if let Some(limit) = procfs::open_files_limit() {
        if limit < needed_fds {
            eprintln!(
                "agentd-bench soak: warning: the open-files limit {limit} is below {needed_fds}; raise it with `ulimit -n`"
            );
        }
    }
    // The pause before a killed node comes back: none with one node (today's soak), else drawn per kill.
    let down_max_s = args.down_max_s.unwrap_or_else(|| {
        (2.0 * args.lease_s as f64)
            .min(args.kill_every as f64 / 2.0)
            .max(args.down_min_s)
    });
    let pause_ms = if several {
        (
            (args.down_min_s.max(0.0) * 1000.0) as u64,
            (down_max_s.max(args.down_min_s).max(0.0) * 1000.0) as u64,
        )
    } else {
        (0, 0)
    };

    let database = if postgres {
        let db = pg::create().await?;
        eprintln!("agentd-bench soak: database {} created", db.name);
        Some(db)
    } else {
        None
    };
    let result = run_on(
        &args,
        RunSetup {
            started_utc,
            wall,
            bin,
            profile_name,
            out,
            work: work.clone(),
            logs,
            database: database.as_ref(),
            pause_ms,
        },
    )
    .await;
    let passed = result.as_ref().is_ok_and(|r| r.passed);
    if let Some(db) = &database {
        if passed {
            pg::drop_database(db).await;
        } else {
            keep_database(db).await;
        }
    }
    if passed {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!(
            "agentd-bench soak: kept the server logs (and a SQLite database) in {}",
            work.display()
        );
    }
    result
}

/// A failed run's database, renamed out of the `agentd_bench_` prefix so the next benchmark run does not drop
/// it (its pid is gone): kept for a look, to be dropped by hand.
async fn keep_database(db: &pg::BenchDatabase) {
    let kept = db.name.replacen("agentd_bench_", "agentd_chaos_kept_", 1);
    let renamed = async {
        let (client, connection) = tokio_postgres::connect(
            &format!("{}/postgres", pg::base_url()),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
            .batch_execute(&format!("ALTER DATABASE {} RENAME TO {kept}", db.name))
            .await
    };
    match renamed.await {
        Ok(()) => eprintln!(
            "agentd-bench soak: kept the database as {kept} (drop it by hand: DROP DATABASE {kept})"
        ),
        Err(e) => eprintln!(
            "agentd-bench soak: could not keep the database {} ({e}); the next benchmark run drops it",
            db.name
        ),
    }
}

/// What `run` prepared for `run_on`.
struct RunSetup<'a> {
    started_utc: String,
    wall: std::time::Instant,
    bin: PathBuf,
    profile_name: &'static str,
    out: PathBuf,
    work: PathBuf,
    logs: PathBuf,
    database: Option<&'a pg::BenchDatabase>,
    pause_ms: (u64, u64),
}

/// The node id of node `i` (0-based) of a cluster.
fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

async fn run_on(args: &SoakArgs, setup: RunSetup<'_>) -> Result<Report> {
    let RunSetup {
        started_utc,
        wall,
        bin,
        profile_name,
        out,
        work,
        logs,
        database,
        pause_ms,
    } = setup;
    let several = args.nodes > 1;
    let mock = MockProcess::start(&logs)?;
    let upstream = format!("http://{}/v1", mock.addr());
    let mut servers = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let port = servers::free_port()?;
        let dir = if several {
            work.join(format!("server-{}", node_name(i)))
        } else {
            work.join("server")
        };
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("agentd.toml");
        let name = node_name(i);
        let cluster = database.map(|_| ClusterPart {
            node_id: &name,
            lease_s: args.lease_s,
        });
        std::fs::write(
            &config,
            soak_config(
                port,
                &upstream,
                &dir,
                database.map(|d| d.url.as_str()),
                cluster,
            ),
        )?;
        let launch = Launch {
            kind: if database.is_some() {
                Kind::AgentdPg
            } else {
                Kind::Agentd
            },
            program: bin.clone(),
            args: vec!["serve".into(), "--config".into(), config.into()],
            env: Vec::new(),
            cwd: dir.clone(),
            port,
        };
        let log = if several {
            logs.join(format!("agentd-{name}-0.log"))
        } else {
            logs.join("agentd-0.log")
        };
        servers.push(Server::spawn(launch, None, log)?);
    }
    let http = client::http_client()?;
    for server in &mut servers {
        server.wait_healthy(&http, Duration::from_secs(120)).await?;
    }
    let bases: Vec<String> = servers.iter().map(|s| s.base.clone()).collect();
    eprintln!(
        "agentd-bench soak: agentd ({profile_name}) pids {:?} on {}, mock on {}; creating {} sessions",
        servers.iter().map(|s| s.pid).collect::<Vec<_>>(),
        bases.join(", "),
        mock.addr(),
        args.sessions
    );
    let target = Target::agentd("soak", &bases[0], "assistant", Dialect::Native);
    let sessions = client::create_sessions(&http, &target, args.sessions, 16).await?;

    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(args.duration);
    let sh = Arc::new(Shared {
        ws_bases: bases.iter().map(|b| b.replacen("http", "ws", 1)).collect(),
        bases,
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(15))
            .build()?,
        sse_http: reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()?,
        t0,
        deadline,
        hard: deadline + Duration::from_secs(args.wind_down),
        counters: Counters::default(),
    });
    let pids: Arc<Vec<AtomicU32>> =
        Arc::new(servers.iter().map(|s| AtomicU32::new(s.pid)).collect());
    let (stop_tx, stop_rx) = watch::channel(false);
    let sampler_task = tokio::spawn(sampler(Arc::clone(&sh), Arc::clone(&pids), stop_rx));
    let killer_task = tokio::spawn(killer(
        Arc::clone(&sh),
        servers,
        KillPlan {
            every: Duration::from_secs(args.kill_every),
            pause_ms,
            seed: args.seed,
        },
        Arc::clone(&pids),
        logs.clone(),
    ));
    let mut drivers = Vec::with_capacity(sessions.len());
    let mut observers = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let (fin_tx, fin_rx) = watch::channel(None);
        let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let driver = Driver {
            sh: Arc::clone(&sh),
            idx: i,
            session: session.clone(),
            rng: Rng::new(seed),
            log: ClientLog::default(),
            turn: None,
            msgs: 0,
            next_turn_at: t0,
            conn: 0,
            node: 0,
            cancel_waits: Vec::new(),
            reply_waits: Vec::new(),
            tally: BTreeMap::new(),
            slow_turns: Vec::new(),
        };
        drivers.push(tokio::spawn(driver.run(fin_tx)));
        if args.observe_every > 0 && i % args.observe_every == 0 {
            observers.push((
                i,
                tokio::spawn(observe(
                    Arc::clone(&sh),
                    session.clone(),
                    Rng::new(seed ^ 0x5555),
                    fin_rx,
                )),
            ));
        }
    }
    eprintln!(
        "agentd-bench soak: load started: {} drivers, {} SSE observers, {} s",
        drivers.len(),
        observers.len(),
        args.duration
    );
    let (servers, restarts) = match killer_task.await {
        Ok(r) => r?,
        Err(e) => return Err(Error::new(format!("the killer task failed: {e}"))),
    };
    let mut results = Vec::with_capacity(drivers.len());
    for d in drivers {
        results.push(
            d.await
                .map_err(|e| Error::new(format!("a driver failed: {e}")))?,
        );
    }
    let mut observed: HashMap<usize, ClientLog> = HashMap::new();
    for (i, o) in observers {
        observed.insert(
            i,
            o.await
                .map_err(|e| Error::new(format!("an observer failed: {e}")))?,
        );
    }
    let load_end_s = Instant::now().duration_since(t0).as_secs_f64();
    eprintln!("agentd-bench soak: clients done at t={load_end_s:.0}s; reading every log afresh");

    // Every session's log, read afresh, against what its clients saw.
    let checks: Vec<SessionCheck> = futures_util::stream::iter(sessions.iter().enumerate())
        .map(|(i, s)| {
            let sh = Arc::clone(&sh);
            let d = &results[i];
            let o = observed.get(&i);
            async move { check_session(&sh, i, s, d, o).await }
        })
        .buffered(8)
        .collect()
        .await;
    let _ = stop_tx.send(true);
    let samples = sampler_task
        .await
        .map_err(|e| Error::new(format!("the sampler failed: {e}")))?;
    drop(servers);
    drop(mock);

    let mut findings = Vec::new();
    let mut findings_total = 0usize;
    let mut events_in_logs = 0;
    let mut runs_by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut event_types: BTreeMap<String, u64> = BTreeMap::new();
    for c in &checks {
        events_in_logs += c.events;
        for (k, v) in &c.runs_by_status {
            *runs_by_status.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &c.types {
            *event_types.entry(k.clone()).or_insert(0) += v;
        }
        findings_total += c.findings.len();
        for f in &c.findings {
            if findings.len() < 40 {
                findings.push(f.clone());
            }
        }
    }
    for p in panics_in_logs(&logs) {
        findings_total += 1;
        if findings.len() < 40 {
            findings.push(format!("server panic: {p}"));
        }
    }
    // Takeovers: every run_resumed the clients saw, against the kills of the node that executed the run.
    let mut seen: Vec<(String, SeenResume)> = Vec::new();
    for (i, r) in results.iter().enumerate() {
        for x in &r.log.resumes {
            seen.push((sessions[i].clone(), x.clone()));
        }
        if let Some(o) = observed.get(&i) {
            for x in &o.resumes {
                seen.push((sessions[i].clone(), x.clone()));
            }
        }
    }
    let node_of = |name: &str| -> Option<usize> {
        if !several {
            return Some(0);
        }
        (0..args.nodes).find(|i| node_name(*i) == name)
    };
    let (takeovers, takeover_findings) = judge_takeovers(
        seen,
        t0,
        &node_of,
        &restarts,
        args.kill_every,
        database.map(|_| args.lease_s),
    );
    for f in takeover_findings {
        findings_total += 1;
        if findings.len() < 40 {
            findings.push(f);
        }
    }
    let mut turns_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut slow_turns = Vec::new();
    for r in &results {
        for (k, v) in &r.tally {
            *turns_by_kind.entry(k.clone()).or_insert(0) += v;
        }
        slow_turns.extend(r.slow_turns.iter().cloned());
        let _ = r.final_seq;
    }
    let warmup_s = if args.kill_every > 0 {
        (args.kill_every as f64 * 0.25).max(2.0)
    } else {
        (args.duration as f64 * 0.25).max(2.0)
    };
    // Memory: each node on its own (its samples split at its own kills), first judged period against last.
    let rss_by_node: Vec<RssVerdict> = (0..args.nodes)
        .map(|node| {
            let mine: Vec<Sample> = samples.iter().filter(|s| s.node == node).cloned().collect();
            let kills: Vec<f64> = restarts
                .iter()
                .filter(|r| r.node == node)
                .map(|r| r.at_s)
                .collect();
            judge_rss(
                &mine,
                &kills,
                args.duration as f64,
                warmup_s,
                args.rss_growth_pct,
                args.rss_slack_mib,
            )
        })
        .collect();
    // The headline verdict: the node that grew most (the only one with one node).
    let rss = rss_by_node
        .iter()
        .max_by(|a, b| {
            (!a.pass, a.growth_pct)
                .partial_cmp(&(!b.pass, b.growth_pct))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .cloned()
        .unwrap_or_else(|| judge_rss(&[], &[], 0.0, warmup_s, 0.0, 0.0));
    let rss_pass = rss_by_node.iter().all(|v| v.pass);

    // The soak must have exercised what it claims to.
    let c = &sh.counters;
    let load = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let mut sanity = Vec::new();
    let expected_restarts = args
        .duration
        .saturating_sub(1)
        .checked_div(args.kill_every)
        .unwrap_or(0);
    if restarts.len() as u64 != expected_restarts {
        sanity.push(format!(
            "{} restarts, expected {expected_restarts}",
            restarts.len()
        ));
    }
    for (what, n) in [
        (
            "completed plain turns",
            turns_by_kind.get("plain completed"),
        ),
        (
            "completed calculator turns",
            turns_by_kind.get("calc completed"),
        ),
        (
            "completed ask_human turns",
            turns_by_kind.get("ask completed"),
        ),
        ("cancelled turns", turns_by_kind.get("cancel cancelled")),
    ] {
        if n.copied().unwrap_or(0) == 0 {
            sanity.push(format!("no {what}"));
        }
    }
    if load(&c.voluntary_disconnects) == 0 {
        sanity.push("no client disconnected and came back".into());
    }
    if load(&c.replies_ws) == 0 || load(&c.replies_rest) == 0 {
        sanity.push("replies did not go over both the WebSocket and REST".into());
    }
    if several && !restarts.is_empty() && takeovers.count == 0 {
        sanity.push("nodes were killed but no client saw a run_resumed".into());
    }
    let fds_max = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let error_frames = c
        .error_frames
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let rest_refusals = c
        .rest_refusals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let runs = runs_by_status.values().sum();
    let command = std::env::var("AGENTD_SOAK_COMMAND").unwrap_or_else(|_| {
        format!(
            "agentd-bench soak --duration {} --sessions {} --kill-every {}{}",
            args.duration,
            args.sessions,
            args.kill_every,
            if several {
                format!(" --nodes {} --lease-s {}", args.nodes, args.lease_s)
            } else {
                String::new()
            }
        )
    });
    let passed = findings_total == 0 && sanity.is_empty() && rss_pass;
    let report = Report {
        started_utc,
        command,
        agentd_bin: bin.display().to_string(),
        profile: profile_name.to_string(),
        nodes: args.nodes,
        store: if database.is_some() {
            "postgres".into()
        } else {
            "sqlite".into()
        },
        lease_s: database.map(|_| args.lease_s),
        down_s: (pause_ms.0 as f64 / 1000.0, pause_ms.1 as f64 / 1000.0),
        database: database.map(pg::settings_note),
        sessions: args.sessions,
        observers: observed.len(),
        duration_s: args.duration,
        kill_every_s: args.kill_every,
        seed: args.seed,
        cpus: procfs::online_cpus(),
        wall_s: wall.elapsed().as_secs_f64(),
        events_in_logs,
        events_delivered: load(&c.events_received),
        runs,
        runs_by_status,
        turns_by_kind,
        event_types,
        restarts,
        takeovers,
        cancel_to_end: Secs::of(
            &results
                .iter()
                .flat_map(|r| r.cancel_waits.iter().copied())
                .collect::<Vec<_>>(),
        ),
        reply_to_received: Secs::of(
            &results
                .iter()
                .flat_map(|r| r.reply_waits.iter().copied())
                .collect::<Vec<_>>(),
        ),
        ws_connects: load(&c.ws_connects),
        sse_connects: load(&c.sse_connects),
        voluntary_disconnects: load(&c.voluntary_disconnects),
        dropped_connections: load(&c.dropped_connections),
        failed_connects: load(&c.failed_connects),
        resends: load(&c.resends),
        replies_ws: load(&c.replies_ws),
        replies_rest: load(&c.replies_rest),
        cancels_ws: load(&c.cancels_ws),
        cancels_rest: load(&c.cancels_rest),
        rest_failures: load(&c.rest_failures),
        rest_refusals,
        stale_active: load(&c.stale_active),
        error_frames,
        slow_turns,
        rss,
        rss_by_node,
        fds_max,
        findings,
        findings_total,
        sanity,
        passed,
    };
    write_csv(&samples, &out.join("rss.csv"))?;
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out.join("soak.md"), report.markdown())?;
    if let Err(e) = plot(
        &samples,
        &report,
        args.duration as f64,
        &out.join("rss.png"),
    ) {
        eprintln!("agentd-bench soak: no plot: {e}");
    }
    eprintln!("agentd-bench soak: wrote {}", out.display());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_log_finds_gaps_duplicates_and_differences() {
        let mut log = ClientLog::default();
        assert!(log.record(1, 11, 1));
        assert!(log.record(2, 12, 1));
        assert!(!log.record(2, 12, 2), "a repeated seq is not new");
        assert_eq!(log.anomaly_count, 1);
        assert!(log.anomalies[0].contains("duplicate: seq 2"));
        assert!(log.record(5, 15, 2), "an event past a gap is still taken");
        assert_eq!(log.anomaly_count, 2);
        assert!(log.anomalies[1].contains("gap: seq 5 after 2"));
        assert_eq!(log.hashes, vec![11, 12, 0, 0, 15]);
        assert_eq!(log.cursor(), 5);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        let d = first_difference(&[1, 2], &[1, 2, 3]).unwrap_or_default();
        assert!(
            d.contains("seq 3") && d.contains("has 2 events, the log 3"),
            "{d}"
        );
        let d = first_difference(&[1, 9, 3], &[1, 2, 3]).unwrap_or_default();
        assert!(d.contains("seq 2"), "{d}");
    }

    #[test]
    fn sse_blocks_are_parsed_across_chunks() {
        let mut buf =
            b"id: 3\nevent: text_delta\ndata: {\"seq\":3}\n\n:keep-alive\n\nid: 4\nda".to_vec();
        let ev = take_sse_block(&mut buf).unwrap_or_default();
        assert_eq!(
            ev,
            SseEvent {
                id: Some("3".into()),
                event: Some("text_delta".into()),
                data: "{\"seq\":3}".into()
            }
        );
        let comment = take_sse_block(&mut buf).unwrap_or_default();
        assert!(comment.data.is_empty());
        assert!(
            take_sse_block(&mut buf).is_none(),
            "an incomplete block waits"
        );
        buf.extend_from_slice(b"ta:{\"seq\":4}\n\n");
        let ev = take_sse_block(&mut buf).unwrap_or_default();
        assert_eq!(
            (ev.id.as_deref(), ev.data.as_str()),
            (Some("4"), "{\"seq\":4}")
        );
    }

    #[test]
    fn tags_are_read_from_the_end_of_a_message() {
        assert_eq!(tag_of("calc: 2*3+4 [s1-m2]"), Some("s1-m2"));
        assert_eq!(tag_of("no tag"), None);
    }

    #[test]
    fn the_start_up_sweep_count_is_read_from_a_coloured_log() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let log = dir.path().join("agentd-1.log");
        let line = "\u{1b}[2m2026-12-02T15:43:31Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m marked runs left unfinished by the previous process as interrupted \u{1b}[3mruns\u{1b}[0m\u{1b}[2m=\u{1b}[0m21\n";
        std::fs::write(&log, line).unwrap_or_else(|e| panic!("write: {e}"));
        assert_eq!(interrupted_in_log(&log), Some(21));
    }

    #[test]
    fn takeovers_are_timed_from_the_kill_of_the_executing_node() {
        let t0 = Instant::now();
        let resume = |seq: u64, from: Option<&str>, to: &str, at_s: u64| SeenResume {
            seq,
            run: format!("r{seq}"),
            from: from.map(String::from),
            to: to.to_string(),
            attempt: 1,
            at: t0 + Duration::from_secs(at_s),
        };
        let kill = |node: usize, at_s: f64| Restart {
            node,
            at_s,
            pause_ms: 0,
            killed_pid: 1,
            pid: 2,
            down_ms: 0,
            interrupted_at_start: None,
        };
        let seen = vec![
            // Seen by two clients: the first receipt counts.
            ("a".to_string(), resume(5, Some("n3"), "n1", 26)),
            ("a".to_string(), resume(5, Some("n3"), "n1", 25)),
            // By the killed node itself after its restart.
            ("b".to_string(), resume(8, Some("n3"), "n3", 23)),
            // n2 was never killed: a finding.
            ("b".to_string(), resume(9, Some("n2"), "n1", 30)),
            // n3's last kill is two periods back: a finding.
            ("c".to_string(), resume(3, Some("n3"), "n1", 90)),
            // No node known: a finding.
            ("c".to_string(), resume(4, None, "n1", 91)),
            // A resume after the run's end: a finding.
            ("c".to_string(), resume(6, Some(ENDED), "n1", 92)),
        ];
        let node_of = |name: &str| (0..3).find(|i| node_name(*i) == name);
        let (stats, findings) = judge_takeovers(
            seen,
            t0,
            &node_of,
            &[kill(2, 20.0), kill(0, 50.0)],
            30,
            Some(10),
        );
        assert_eq!(stats.count, 6);
        assert_eq!(stats.all.count, 2);
        assert!((stats.by_other_node.max_s - 5.0).abs() < 1e-6, "{stats:?}");
        assert!(
            (stats.by_restarted_node.max_s - 3.0).abs() < 1e-6,
            "{stats:?}"
        );
        assert_eq!(findings.len(), 4, "{findings:?}");
        assert!(findings.iter().any(|f| f.contains("the run had ended")));
        assert!(findings
            .iter()
            .any(|f| f.contains("n2, which had not been killed")));
        assert!(findings
            .iter()
            .any(|f| f.contains("more than a kill period")));
        assert!(findings.iter().any(|f| f.contains("no run_started")));
        let p = Secs::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((p.count, p.p50_s, p.p99_s, p.max_s), (4, 2.0, 4.0, 4.0));
    }

    fn samples(f: impl Fn(f64) -> u64) -> Vec<Sample> {
        (0..60)
            .map(|i| {
                let t = i as f64;
                Sample {
                    node: 0,
                    t_s: t,
                    pid: 1 + (t / 20.0) as u32,
                    rss_kib: f(t),
                    anon_kib: 0,
                    file_kib: 0,
                    fds: 10,
                    events: 0,
                }
            })
            .collect()
    }

    #[test]
    fn memory_is_judged_after_warm_up_first_period_against_last() {
        // Flat at 100 MiB with a spike at each restart: passes.
        let flat = samples(|t| {
            if t % 20.0 < 3.0 {
                300 * 1024
            } else {
                100 * 1024
            }
        });
        let v = judge_rss(&flat, &[20.0, 40.0], 60.0, 5.0, 25.0, 16.0);
        assert_eq!(v.periods.len(), 3);
        assert!((v.first_mib - 100.0).abs() < 1e-9 && (v.last_mib - 100.0).abs() < 1e-9);
        assert!(v.pass, "{v:?}");
        assert!(
            (v.max_mib - 300.0).abs() < 1e-9,
            "the spikes are in the max"
        );
        // Growing by 2 MiB a second: the last median (204) is beyond 124 MiB + 25% + 16 MiB.
        let growing = samples(|t| (100 + 2 * t as u64) * 1024);
        let v = judge_rss(&growing, &[20.0, 40.0], 60.0, 5.0, 25.0, 16.0);
        assert!(!v.pass, "{v:?}");
        assert!((v.first_mib - 124.0).abs() < 1e-9 && (v.last_mib - 204.0).abs() < 1e-9);
        assert!((v.periods[0].slope_mib_per_min - 120.0).abs() < 1e-6);
    }

    #[test]
    fn memory_is_judged_on_the_anonymous_part_when_it_is_known() {
        // File-backed pages (the memory-mapped database) grow, the heap stays flat: passes.
        let mut cache_grows = samples(|t| (100 + 2 * t as u64) * 1024);
        for s in &mut cache_grows {
            s.anon_kib = 60 * 1024;
            s.file_kib = s.rss_kib - s.anon_kib;
        }
        let v = judge_rss(&cache_grows, &[20.0, 40.0], 60.0, 5.0, 25.0, 16.0);
        assert!(v.pass, "{v:?}");
        assert!((v.first_mib - 60.0).abs() < 1e-9 && (v.last_mib - 60.0).abs() < 1e-9);
        // The heap grows: fails, whatever the total does.
        let mut heap_grows = cache_grows.clone();
        for s in &mut heap_grows {
            s.anon_kib = (60 + 2 * s.t_s as u64) * 1024;
        }
        let v = judge_rss(&heap_grows, &[20.0, 40.0], 60.0, 5.0, 25.0, 16.0);
        assert!(!v.pass, "{v:?}");
    }
}
