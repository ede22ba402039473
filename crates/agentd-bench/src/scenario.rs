//! The scenarios, each against one target: a functional smoke check, throughput, latency, idle
//! connections and re-attach. Each returns plain figures; the orchestrator runs them against every target
//! in alternation and renders the table.
//!
//! Setup (session creation, WebSocket handshakes) is never inside a measured window: CPU and wall time are
//! taken from the moment every client is connected and waiting at a gate.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{self, Dialect, EventKind, Target, TurnOutcome, Ws};
use crate::procfs;
use crate::stamp::{now_micros, StampParser};
use crate::stats::{summarize_us, Summary};
use crate::{Error, Result};

/// Sessions created at once.
const CREATE_CONCURRENCY: usize = 32;
/// WebSocket handshakes in flight at once.
const CONNECT_CONCURRENCY: usize = 64;

/// Which processes a scenario measures.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The server under test.
    pub server_pid: u32,
    /// The mock upstream, when it runs as its own process.
    pub mock_pid: Option<u32>,
    /// The server's PostgreSQL database, when it has one: the database server's CPU for it counts as the
    /// server's (see [`crate::pg`]).
    pub pg_database: Option<&'static str>,
}

/// CPU seconds of the server, the mock and the load generator at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    server: f64,
    mock: Option<f64>,
    loadgen: f64,
}

impl Probe {
    fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            server: procfs::cpu_seconds(self.server_pid)
                + self.pg_database.map(crate::pg::cpu_seconds).unwrap_or(0.0),
            mock: self.mock_pid.map(procfs::cpu_seconds),
            // Only this process: its descendants are the mock and the servers.
            loadgen: procfs::process_cpu_seconds(std::process::id()).unwrap_or(0.0),
        }
    }
}

/// The outcome of a functional check: one plain turn and one tool round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmokeResult {
    /// A 5-token turn arrived whole and its end frame matched.
    pub text_ok: bool,
    /// The calculator round produced tool frames and the answer `98`; `None` when not attempted.
    pub tool_ok: Option<bool>,
    /// The first thing that went wrong.
    pub problem: Option<String>,
}

/// One plain turn and, when `with_tools`, one `calc:` turn, each in a fresh session.
pub async fn smoke(http: &reqwest::Client, target: &Target, with_tools: bool) -> SmokeResult {
    let mut result = SmokeResult {
        text_ok: false,
        tool_ok: None,
        problem: None,
    };
    let limit = Duration::from_secs(30);
    match open_one(http, target).await {
        Ok(mut ws) => {
            let out = client::run_turn(&mut ws, target.dialect, "smoke tokens=5", limit).await;
            result.text_ok = out.ok && out.tokens == 5;
            if !result.text_ok {
                result.problem = Some(describe(&out, 5));
            }
            client::close_all(vec![ws]).await;
        }
        Err(e) => result.problem = Some(e.to_string()),
    }
    if with_tools {
        match open_one(http, target).await {
            Ok(mut ws) => {
                let out = client::run_turn(&mut ws, target.dialect, "calc: 2*(3+4)^2", limit).await;
                let ok = out.ok
                    && out.tools_started >= 1
                    && out.tools_succeeded >= 1
                    && out.text.contains("98");
                if !ok && result.problem.is_none() {
                    result.problem = Some(format!(
                        "tool round: ok={} tools_started={} tools_succeeded={} text={:?} {}",
                        out.ok,
                        out.tools_started,
                        out.tools_succeeded,
                        client::clip(&out.text, 60),
                        out.problem.unwrap_or_default()
                    ));
                }
                result.tool_ok = Some(ok);
                client::close_all(vec![ws]).await;
            }
            Err(e) => {
                result.tool_ok = Some(false);
                result.problem.get_or_insert(e.to_string());
            }
        }
    }
    result
}

async fn open_one(http: &reqwest::Client, target: &Target) -> Result<Ws> {
    let sid = client::create_session(http, target).await?;
    Ok(client::connect(target, &sid, None).await?.0)
}

fn describe(out: &TurnOutcome, want_tokens: u32) -> String {
    match &out.problem {
        Some(p) => p.clone(),
        None => format!("{} of {want_tokens} tokens", out.tokens),
    }
}

/// What one gated round of turns produced.
struct RoundOut {
    outcomes: Vec<TurnOutcome>,
    /// When the gate opened, Unix microseconds.
    gate_us: u64,
    wall: Duration,
    before: CpuSnapshot,
    after: CpuSnapshot,
}

/// Creates `sessions` sessions, connects them all, then (CPU snapshot) sends `content` on each, the i-th
/// after `stagger * i / sessions`, and waits for every turn to end (CPU snapshot).
async fn gated_round(
    http: &reqwest::Client,
    target: &Target,
    probe: Probe,
    sessions: usize,
    content: &str,
    stagger: Duration,
    turn_limit: Duration,
) -> Result<RoundOut> {
    let ids = client::create_sessions(http, target, sessions, CREATE_CONCURRENCY).await?;
    let conns = client::connect_all(target, &ids, CONNECT_CONCURRENCY).await?;
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::with_capacity(conns.len());
    for (i, mut ws) in conns.into_iter().enumerate() {
        let mut gate = gate_rx.clone();
        let content = content.to_string();
        let dialect = target.dialect;
        let offset = stagger.mul_f64(i as f64 / sessions as f64);
        handles.push(tokio::spawn(async move {
            let _ = gate.wait_for(|open| *open).await;
            if !offset.is_zero() {
                tokio::time::sleep(offset).await;
            }
            let out = client::run_turn(&mut ws, dialect, &content, turn_limit).await;
            (out, ws)
        }));
    }
    // Let every task reach the gate before the window opens.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = probe.snapshot();
    let t0 = Instant::now();
    let gate_us = now_micros();
    gate_tx.send_replace(true);
    let mut outcomes = Vec::with_capacity(handles.len());
    let mut sockets = Vec::with_capacity(handles.len());
    for joined in futures_util::future::join_all(handles).await {
        match joined {
            Ok((out, ws)) => {
                outcomes.push(out);
                sockets.push(ws);
            }
            Err(e) => outcomes.push(TurnOutcome {
                problem: Some(format!("client task: {e}")),
                ..Default::default()
            }),
        }
    }
    let wall = t0.elapsed();
    let after = probe.snapshot();
    client::close_all(sockets).await;
    Ok(RoundOut {
        outcomes,
        gate_us,
        wall,
        before,
        after,
    })
}

/// Throughput parameters.
#[derive(Debug, Clone, Copy)]
pub struct ThroughputParams {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Tokens per reply.
    pub tokens: u32,
    /// Rounds are repeated until their summed wall time reaches this, so short rounds still give a CPU
    /// figure well above the 10 ms resolution of `/proc` times.
    pub min_wall: Duration,
    /// At most this many rounds.
    pub max_rounds: u32,
    /// A turn not finished by then counts as bad.
    pub turn_limit: Duration,
}

/// Throughput figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ThroughputResult {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Tokens per reply.
    pub tokens_per_reply: u32,
    /// Rounds measured.
    pub rounds: u32,
    /// Tokens the clients received.
    pub tokens: u64,
    /// Tokens the clients should have received.
    pub expected_tokens: u64,
    /// Summed wall time of the measured windows.
    pub wall_s: f64,
    /// Tokens delivered per second.
    pub tokens_per_s: f64,
    /// Server CPU seconds in the windows.
    pub server_cpu_s: f64,
    /// Server CPU milliseconds per 1,000 tokens delivered.
    pub cpu_ms_per_1k_tokens: f64,
    /// Server cores busy on average.
    pub server_cores: f64,
    /// Mock cores busy on average.
    pub mock_cores: Option<f64>,
    /// Load-generator cores busy on average.
    pub loadgen_cores: f64,
    /// Median time from send to first token.
    pub first_token_p50_ms: f64,
    /// Turns that did not deliver every token with a matching end frame.
    pub bad_sessions: u64,
    /// The first bad turn's problem.
    pub first_problem: Option<String>,
}

/// N concurrent sessions each receiving `tokens` tokens with no upstream delay.
pub async fn throughput(
    http: &reqwest::Client,
    target: &Target,
    probe: Probe,
    p: ThroughputParams,
) -> Result<ThroughputResult> {
    let content = format!("throughput tokens={} delay_ms=0", p.tokens);
    let mut r = ThroughputResult {
        sessions: p.sessions,
        tokens_per_reply: p.tokens,
        ..Default::default()
    };
    let (mut server_cpu, mut mock_cpu, mut loadgen_cpu, mut wall) = (0.0, 0.0, 0.0, 0.0);
    let mut first_tokens: Vec<u32> = Vec::new();
    while r.rounds < p.max_rounds.max(1) && (r.rounds == 0 || wall < p.min_wall.as_secs_f64()) {
        let round = gated_round(
            http,
            target,
            probe,
            p.sessions,
            &content,
            Duration::ZERO,
            p.turn_limit,
        )
        .await?;
        r.rounds += 1;
        wall += round.wall.as_secs_f64();
        server_cpu += round.after.server - round.before.server;
        mock_cpu += round.after.mock.unwrap_or(0.0) - round.before.mock.unwrap_or(0.0);
        loadgen_cpu += round.after.loadgen - round.before.loadgen;
        r.expected_tokens += p.sessions as u64 * u64::from(p.tokens);
        for out in round.outcomes {
            r.tokens += u64::from(out.tokens);
            if let Some(t) = out.first_token_us {
                first_tokens.push(u32::try_from(t).unwrap_or(u32::MAX));
            }
            if !(out.ok && out.tokens == p.tokens) {
                r.bad_sessions += 1;
                r.first_problem
                    .get_or_insert_with(|| describe(&out, p.tokens));
            }
        }
    }
    r.wall_s = wall;
    r.server_cpu_s = server_cpu;
    if wall > 0.0 {
        r.tokens_per_s = r.tokens as f64 / wall;
        r.server_cores = server_cpu / wall;
        r.mock_cores = probe.mock_pid.map(|_| mock_cpu / wall);
        r.loadgen_cores = loadgen_cpu / wall;
    }
    if r.tokens > 0 {
        r.cpu_ms_per_1k_tokens = server_cpu * 1000.0 / (r.tokens as f64 / 1000.0);
    }
    r.first_token_p50_ms = summarize_us(&mut first_tokens).p50_ms;
    Ok(r)
}

/// Latency parameters.
#[derive(Debug, Clone, Copy)]
pub struct LatencyParams {
    /// Concurrent streams.
    pub sessions: usize,
    /// Tokens per reply.
    pub tokens: u32,
    /// Upstream delay before each token (50 ms = 20 tokens/s).
    pub delay_ms: u64,
    /// Starts are spread evenly over this, so streams are out of phase as real ones are.
    pub stagger: Duration,
    /// A turn not finished by then counts as bad.
    pub turn_limit: Duration,
}

/// Latency figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyResult {
    /// Concurrent streams.
    pub sessions: usize,
    /// Tokens per second per stream, as the mock paced them.
    pub tokens_per_s_per_stream: f64,
    /// Tokens received.
    pub tokens: u64,
    /// Tokens expected.
    pub expected_tokens: u64,
    /// Added delivery latency (receive minus upstream emit time), every token.
    pub added: Summary,
    /// The same, only for tokens emitted once every stream had started (after the stagger and one more
    /// token interval): the steady state, without the burst of turn starts.
    #[serde(default)]
    pub steady: Summary,
    /// Server CPU milliseconds per 1,000 tokens in the window.
    pub cpu_ms_per_1k_tokens: f64,
    /// Server cores busy on average.
    pub server_cores: f64,
    /// Mock cores busy on average.
    pub mock_cores: Option<f64>,
    /// Load-generator cores busy on average.
    pub loadgen_cores: f64,
    /// Wall time of the window.
    pub wall_s: f64,
    /// Turns that did not deliver every token with a matching end frame.
    pub bad_sessions: u64,
    /// The first bad turn's problem.
    pub first_problem: Option<String>,
}

/// N sessions streaming `tokens` tokens at one per `delay_ms`; the figure is the added latency per token.
pub async fn latency(
    http: &reqwest::Client,
    target: &Target,
    probe: Probe,
    p: LatencyParams,
) -> Result<LatencyResult> {
    let content = format!("latency tokens={} delay_ms={}", p.tokens, p.delay_ms);
    let round = gated_round(
        http,
        target,
        probe,
        p.sessions,
        &content,
        p.stagger,
        p.turn_limit,
    )
    .await?;
    let mut r = LatencyResult {
        sessions: p.sessions,
        tokens_per_s_per_stream: if p.delay_ms > 0 {
            1000.0 / p.delay_ms as f64
        } else {
            0.0
        },
        expected_tokens: p.sessions as u64 * u64::from(p.tokens),
        ..Default::default()
    };
    let mut samples: Vec<u32> = Vec::with_capacity(r.expected_tokens as usize);
    let mut steady: Vec<u32> = Vec::with_capacity(r.expected_tokens as usize);
    let steady_from = round.gate_us
        + u64::try_from(p.stagger.as_micros()).unwrap_or(u64::MAX / 4)
        + p.delay_ms * 1000;
    for out in round.outcomes {
        steady.extend(
            out.latencies_us
                .iter()
                .zip(&out.emitted_us)
                .filter(|(_, e)| **e >= steady_from)
                .map(|(l, _)| *l),
        );
        r.tokens += u64::from(out.tokens);
        if !(out.ok && out.tokens == p.tokens) {
            r.bad_sessions += 1;
            r.first_problem
                .get_or_insert_with(|| describe(&out, p.tokens));
        }
        samples.extend_from_slice(&out.latencies_us);
    }
    r.added = summarize_us(&mut samples);
    r.steady = summarize_us(&mut steady);
    let wall = round.wall.as_secs_f64();
    let server_cpu = round.after.server - round.before.server;
    r.wall_s = wall;
    if wall > 0.0 {
        r.server_cores = server_cpu / wall;
        r.mock_cores = round
            .after
            .mock
            .zip(round.before.mock)
            .map(|(a, b)| (a - b) / wall);
        r.loadgen_cores = (round.after.loadgen - round.before.loadgen) / wall;
    }
    if r.tokens > 0 {
        r.cpu_ms_per_1k_tokens = server_cpu * 1000.0 / (r.tokens as f64 / 1000.0);
    }
    Ok(r)
}

/// Idle-connection parameters.
#[derive(Debug, Clone, Copy)]
pub struct IdleParams {
    /// Connections to open, one session each.
    pub connections: usize,
    /// How long to wait at most for the server's RSS to settle after the last handshake.
    pub settle_max: Duration,
}

/// Idle-connection figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleResult {
    /// Connections asked for.
    pub wanted: usize,
    /// Connections that opened.
    pub opened: usize,
    /// Server RSS with the sessions made but no connection open, KiB.
    pub rss_before_kib: u64,
    /// Server RSS with every connection open and idle, KiB.
    pub rss_after_kib: u64,
    /// (after - before) / opened, KiB.
    pub kib_per_connection: f64,
    /// Seconds to open them all.
    pub connect_s: f64,
    /// The first handshake failure.
    pub first_problem: Option<String>,
}

/// Opens `connections` idle WebSockets (one session each) and reports the server's RSS per connection.
pub async fn idle(
    http: &reqwest::Client,
    target: &Target,
    probe: Probe,
    p: IdleParams,
) -> Result<IdleResult> {
    let ids = client::create_sessions(http, target, p.connections, CREATE_CONCURRENCY).await?;
    let mut r = IdleResult {
        wanted: p.connections,
        ..Default::default()
    };
    // Sessions made; let the server finish whatever follows the last request before the baseline.
    r.rss_before_kib = settle_rss(probe.server_pid, p.settle_max).await;
    let t0 = Instant::now();
    let results: Vec<Result<Ws>> = futures_util::stream::iter(ids.iter())
        .map(|id| async move { client::connect(target, id, None).await.map(|(ws, _)| ws) })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    r.connect_s = t0.elapsed().as_secs_f64();
    let mut conns = Vec::with_capacity(results.len());
    for res in results {
        match res {
            Ok(ws) => conns.push(ws),
            Err(e) => {
                r.first_problem.get_or_insert(e.to_string());
            }
        }
    }
    r.opened = conns.len();
    r.rss_after_kib = settle_rss(probe.server_pid, p.settle_max).await;
    if r.opened > 0 {
        r.kib_per_connection =
            r.rss_after_kib.saturating_sub(r.rss_before_kib) as f64 / r.opened as f64;
    }
    client::close_all(conns).await;
    Ok(r)
}

/// Samples RSS every 250 ms until two samples in a row are within 0.5% of each other (or `max` passes).
async fn settle_rss(pid: u32, max: Duration) -> u64 {
    let deadline = Instant::now() + max;
    let mut last = procfs::rss_kib(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = procfs::rss_kib(pid);
        let stable = now.abs_diff(last) as f64 <= last as f64 * 0.005;
        last = now;
        if stable || Instant::now() >= deadline {
            return now;
        }
    }
}

/// Re-attach parameters.
#[derive(Debug, Clone, Copy)]
pub struct ReattachParams {
    /// Clients, one session each.
    pub clients: usize,
    /// Tokens per reply.
    pub tokens: u32,
    /// Upstream delay before each token.
    pub delay_ms: u64,
    /// Each client drops its connection after this many tokens.
    pub drop_after: u32,
    /// ... and re-attaches this long after the drop (a page reload takes about this long).
    pub gap: Duration,
    /// Starts are spread evenly over this.
    pub stagger: Duration,
    /// A re-attached stream that shows nothing for this long counts as "no replay".
    pub quiet_limit: Duration,
}

/// Re-attach figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReattachResult {
    /// Clients.
    pub clients: usize,
    /// Clients whose re-attached stream reached its end frame.
    pub completed: usize,
    /// Clients that received nothing after re-attaching.
    pub no_replay: usize,
    /// Time from starting the re-attach to the first token, for clients that got one.
    pub first_token: Summary,
    /// Events the clients never received (tokens; for native also gaps in `seq`).
    pub missed_events: u64,
    /// Clients that missed at least one.
    pub clients_with_missed: usize,
    /// Events received twice on the same connection, or (native) a `seq` at or below one already seen.
    pub duplicated_events: u64,
    /// Clients with at least one duplicate.
    pub clients_with_duplicates: usize,
    /// navi: tokens sent again after re-attach that the client had before the drop (a replay from the run
    /// start does this by design: the navi client has no cursor).
    pub resent_events: u64,
    /// Clients whose re-attached stream restarted at the run's first token.
    pub replayed_from_start: usize,
    /// Clients whose re-attached stream resumed exactly after the last event they had.
    pub resumed_exactly: usize,
    /// Clients whose re-attached stream skipped ahead (live only).
    pub resumed_live: usize,
    /// What the server does on re-attach, in words.
    pub behaviour: String,
    /// The first problem seen.
    pub first_problem: Option<String>,
}

/// What one re-attaching client saw.
#[derive(Debug, Default)]
struct ClientReattach {
    completed: bool,
    first_token_us: Option<u64>,
    missed: u64,
    duplicated: u64,
    resent: u64,
    /// Index of the first token after re-attach, and the highest index seen before the drop.
    first_index_after: Option<u32>,
    last_index_before: u32,
    seq_resumed_exactly: Option<bool>,
    problem: Option<String>,
}

/// Clients stream, drop mid-stream, re-attach (native: with `after=<last seq>`), and check what arrives.
pub async fn reattach(
    http: &reqwest::Client,
    target: &Target,
    p: ReattachParams,
) -> Result<ReattachResult> {
    let ids = client::create_sessions(http, target, p.clients, CREATE_CONCURRENCY).await?;
    let mut handles = Vec::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        let target = target.clone();
        let offset = p.stagger.mul_f64(i as f64 / p.clients.max(1) as f64);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            reattach_one(&target, &id, p).await
        }));
    }
    let mut r = ReattachResult {
        clients: p.clients,
        ..Default::default()
    };
    let mut firsts = Vec::new();
    for joined in futures_util::future::join_all(handles).await {
        let c = joined.map_err(|e| Error::new(format!("client task: {e}")))?;
        r.completed += usize::from(c.completed);
        match c.first_token_us {
            Some(t) => firsts.push(u32::try_from(t).unwrap_or(u32::MAX)),
            None => r.no_replay += 1,
        }
        r.missed_events += c.missed;
        r.clients_with_missed += usize::from(c.missed > 0);
        r.duplicated_events += c.duplicated;
        r.clients_with_duplicates += usize::from(c.duplicated > 0);
        r.resent_events += c.resent;
        match (c.seq_resumed_exactly, c.first_index_after) {
            (Some(true), _) => r.resumed_exactly += 1,
            (_, Some(0)) => r.replayed_from_start += 1,
            (_, Some(i)) if i == c.last_index_before + 1 => r.resumed_exactly += 1,
            (_, Some(_)) => r.resumed_live += 1,
            (_, None) => {}
        }
        if let Some(problem) = c.problem {
            r.first_problem.get_or_insert(problem);
        }
    }
    r.first_token = summarize_us(&mut firsts);
    r.behaviour = behaviour(&r, target.dialect);
    Ok(r)
}

fn behaviour(r: &ReattachResult, dialect: Dialect) -> String {
    let mut parts = Vec::new();
    if r.resumed_exactly > 0 {
        parts.push(match dialect {
            Dialect::Native => format!("{} resumed at after+1", r.resumed_exactly),
            Dialect::Navi => format!("{} resumed at the next token", r.resumed_exactly),
        });
    }
    if r.replayed_from_start > 0 {
        parts.push(format!("{} replayed from run start", r.replayed_from_start));
    }
    if r.resumed_live > 0 {
        parts.push(format!("{} resumed live (skipped ahead)", r.resumed_live));
    }
    if r.no_replay > 0 {
        parts.push(format!("{} got nothing", r.no_replay));
    }
    parts.join(", ")
}

async fn reattach_one(target: &Target, session: &str, p: ReattachParams) -> ClientReattach {
    let mut c = ClientReattach::default();
    let mut counts_before = vec![0u32; p.tokens as usize];
    let mut counts_after = vec![0u32; p.tokens as usize];
    let mut max_seq = 0u64;
    let reply_limit =
        Duration::from_millis(p.delay_ms * u64::from(p.tokens)) + Duration::from_secs(30);

    // Phase 1: stream until `drop_after` tokens, then drop the socket without a close handshake.
    let phase1 = async {
        let (mut ws, _) = client::connect(target, session, None).await?;
        let content = format!("reattach tokens={} delay_ms={}", p.tokens, p.delay_ms);
        client::send_message(&mut ws, &content).await?;
        let mut parser = StampParser::new();
        let mut seen = 0u32;
        while seen < p.drop_after {
            let Some(ev) = client::next_event(&mut ws, target.dialect).await? else {
                return Err(Error::new("closed before the drop point"));
            };
            max_seq = max_seq.max(ev.seq.unwrap_or(0));
            match ev.kind {
                EventKind::Delta(d) => parser.feed(&d, |s| {
                    if let Some(n) = counts_before.get_mut(s.index as usize) {
                        *n += 1;
                        seen += 1;
                        c.last_index_before = c.last_index_before.max(s.index);
                    }
                }),
                EventKind::End { .. } => {
                    return Err(Error::new("turn ended before the drop point"))
                }
                EventKind::Failure(m) => return Err(Error::new(format!("error frame: {m}"))),
                _ => {}
            }
        }
        drop(ws);
        Ok::<(), Error>(())
    };
    match tokio::time::timeout(reply_limit, phase1).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            c.problem = Some(format!("before the drop: {e}"));
            return c;
        }
        Err(_) => {
            c.problem = Some("before the drop: timed out".to_string());
            return c;
        }
    }
    tokio::time::sleep(p.gap).await;

    // Phase 2: re-attach and read to the end frame.
    let start_us = now_micros();
    let after = (target.dialect == Dialect::Native).then_some(max_seq);
    let mut expected_seq = max_seq + 1;
    let mut seq_gaps = 0u64;
    let mut seq_repeats = 0u64;
    let mut first_seq_checked = false;
    let phase2 = async {
        let (mut ws, _) = client::connect(target, session, after).await?;
        let mut parser = StampParser::new();
        loop {
            let ev = match tokio::time::timeout(
                p.quiet_limit,
                client::next_event(&mut ws, target.dialect),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Ok::<(), Error>(()), // nothing more is coming
            };
            let Some(ev) = ev else { return Ok(()) };
            if let Some(seq) = ev.seq {
                if !first_seq_checked {
                    first_seq_checked = true;
                    c.seq_resumed_exactly = Some(seq == expected_seq);
                }
                if seq < expected_seq {
                    seq_repeats += 1;
                } else {
                    seq_gaps += seq - expected_seq;
                    expected_seq = seq + 1;
                }
            }
            match ev.kind {
                EventKind::Delta(d) => {
                    if c.first_token_us.is_none() {
                        c.first_token_us = Some(ev.at_us.saturating_sub(start_us));
                    }
                    parser.feed(&d, |s| {
                        if c.first_index_after.is_none() {
                            c.first_index_after = Some(s.index);
                        }
                        if let Some(n) = counts_after.get_mut(s.index as usize) {
                            *n += 1;
                        }
                    });
                }
                EventKind::End { ok, detail, .. } => {
                    c.completed = true;
                    if !ok {
                        c.problem
                            .get_or_insert(format!("after re-attach: {detail}"));
                    }
                    return Ok(());
                }
                EventKind::Failure(m) => return Err(Error::new(format!("error frame: {m}"))),
                _ => {}
            }
        }
    };
    match tokio::time::timeout(reply_limit, phase2).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            c.problem.get_or_insert(format!("after re-attach: {e}"));
        }
        Err(_) => {
            c.problem
                .get_or_insert("after re-attach: timed out".to_string());
        }
    }

    // Token-level accounting. A token never received at all is missed. Within one connection, a second copy
    // is a duplicate; a token the client had before the drop and gets again after it is a re-send (navi has
    // no cursor, so a replay from the run start re-sends by design; native with `after` must not).
    let missing_tokens = counts_before
        .iter()
        .zip(&counts_after)
        .filter(|(b, a)| **b + **a == 0)
        .count() as u64;
    let dup_within = counts_before
        .iter()
        .chain(&counts_after)
        .map(|n| u64::from(n.saturating_sub(1)))
        .sum::<u64>();
    let resent = counts_before
        .iter()
        .zip(&counts_after)
        .filter(|(b, a)| **b > 0 && **a > 0)
        .count() as u64;
    match target.dialect {
        Dialect::Native => {
            c.missed = seq_gaps.max(missing_tokens);
            c.duplicated = seq_repeats + dup_within + resent;
        }
        Dialect::Navi => {
            c.missed = missing_tokens;
            c.duplicated = dup_within;
            c.resent = resent;
        }
    }
    if !c.completed && c.problem.is_none() {
        c.problem = Some("the re-attached stream never ended".to_string());
    }
    c
}

/// The harness's own share of added latency: the latency scenario's load read straight from the mock
/// (HTTP + SSE on loopback, no server in between), so a server's figures can be read against it.
pub async fn upstream_latency(
    http: &reqwest::Client,
    mock_base: &str,
    p: LatencyParams,
) -> Result<LatencyResult> {
    let content = format!("latency tokens={} delay_ms={}", p.tokens, p.delay_ms);
    let url = format!("{}/v1/chat/completions", mock_base.trim_end_matches('/'));
    let gate_us = now_micros();
    let mut handles = Vec::with_capacity(p.sessions);
    for i in 0..p.sessions {
        let http = http.clone();
        let url = url.clone();
        let body = serde_json::json!({
            "model": "mock", "stream": true,
            "messages": [{"role": "user", "content": content}],
        });
        let offset = p.stagger.mul_f64(i as f64 / p.sessions as f64);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let read = async {
                let resp = http.post(&url).json(&body).send().await?;
                let mut stream = resp.bytes_stream();
                let mut buf: Vec<u8> = Vec::new();
                let mut parser = StampParser::new();
                let mut samples: Vec<(u64, u32)> = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let at = now_micros();
                    buf.extend_from_slice(&chunk?);
                    while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
                        let event: Vec<u8> = buf.drain(..i + 2).collect();
                        let Some(data) = event.strip_prefix(b"data: ") else {
                            continue;
                        };
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                            continue;
                        };
                        if let Some(d) = v
                            .pointer("/choices/0/delta/content")
                            .and_then(|c| c.as_str())
                        {
                            parser.feed(d, |s| {
                                let lat = at.saturating_sub(s.emitted_us);
                                samples
                                    .push((s.emitted_us, u32::try_from(lat).unwrap_or(u32::MAX)));
                            });
                        }
                    }
                }
                Ok::<_, Error>(samples)
            };
            tokio::time::timeout(p.turn_limit, read)
                .await
                .map_err(|_| Error::new("direct stream timed out"))?
        }));
    }
    let mut r = LatencyResult {
        sessions: p.sessions,
        tokens_per_s_per_stream: if p.delay_ms > 0 {
            1000.0 / p.delay_ms as f64
        } else {
            0.0
        },
        expected_tokens: p.sessions as u64 * u64::from(p.tokens),
        ..Default::default()
    };
    let steady_from =
        gate_us + u64::try_from(p.stagger.as_micros()).unwrap_or(u64::MAX / 4) + p.delay_ms * 1000;
    let (mut all, mut steady) = (Vec::new(), Vec::new());
    for joined in futures_util::future::join_all(handles).await {
        match joined
            .map_err(|e| Error::new(format!("client task: {e}")))
            .and_then(|r| r)
        {
            Ok(samples) => {
                if samples.len() != p.tokens as usize {
                    r.bad_sessions += 1;
                }
                r.tokens += samples.len() as u64;
                for (emitted, lat) in samples {
                    all.push(lat);
                    if emitted >= steady_from {
                        steady.push(lat);
                    }
                }
            }
            Err(e) => {
                r.bad_sessions += 1;
                r.first_problem.get_or_insert(e.to_string());
            }
        }
    }
    r.added = summarize_us(&mut all);
    r.steady = summarize_us(&mut steady);
    Ok(r)
}

/// Parameters of the growing-session scenario.
#[derive(Debug, Clone, Copy)]
pub struct GrowParams {
    /// Sessions, each on its own WebSocket.
    pub sessions: usize,
    /// Turns per session, one after another on the same socket.
    pub turns: u32,
    /// Tokens per reply.
    pub tokens: u32,
    /// A turn not finished by then counts as bad.
    pub turn_limit: Duration,
}

/// One tenth of a growing-session run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrowPart {
    /// The sessions' turns before this part (each session's history is about this long, in turns).
    pub turns_before: u32,
    /// Turns in this part, all sessions.
    pub turns: u64,
    /// Server CPU milliseconds per turn.
    pub cpu_ms_per_turn: f64,
    /// Wall milliseconds per turn of one session (send to end frame, mean).
    pub wall_ms_per_turn: f64,
}

/// What a turn costs as its session grows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrowResult {
    /// Sessions.
    pub sessions: usize,
    /// Turns per session.
    pub turns: u32,
    /// Tokens per reply.
    pub tokens_per_reply: u32,
    /// The run in tenths, oldest first.
    pub parts: Vec<GrowPart>,
    /// Turns that did not deliver every token with a matching end frame.
    pub bad_turns: u64,
    /// The first bad turn's problem.
    pub first_problem: Option<String>,
}

/// `sessions` sessions each take `turns` turns in a row on one open WebSocket (sessions in parallel); the
/// server's CPU per turn is measured in tenths of the run, so a cost that grows with a session's history
/// shows as a rising figure.
pub async fn grow(
    http: &reqwest::Client,
    target: &Target,
    probe: Probe,
    p: GrowParams,
) -> Result<GrowResult> {
    let content = format!("grow tokens={} delay_ms=0", p.tokens);
    let ids = client::create_sessions(http, target, p.sessions, CREATE_CONCURRENCY).await?;
    let mut conns = client::connect_all(target, &ids, CONNECT_CONCURRENCY).await?;
    let mut r = GrowResult {
        sessions: p.sessions,
        turns: p.turns,
        tokens_per_reply: p.tokens,
        ..Default::default()
    };
    let parts = p.turns.clamp(1, 10);
    let mut done = 0;
    for part in 0..parts {
        let upto = p.turns * (part + 1) / parts;
        let count = upto - done;
        let before = probe.snapshot();
        let mut handles = Vec::with_capacity(conns.len());
        for mut ws in conns {
            let (content, dialect, limit) = (content.clone(), target.dialect, p.turn_limit);
            handles.push(tokio::spawn(async move {
                let mut outs = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    outs.push(client::run_turn(&mut ws, dialect, &content, limit).await);
                }
                (outs, ws)
            }));
        }
        conns = Vec::with_capacity(handles.len());
        let (mut turns, mut turn_us) = (0u64, 0u64);
        for joined in futures_util::future::join_all(handles).await {
            let (outs, ws) = joined.map_err(|e| Error::new(format!("client task: {e}")))?;
            conns.push(ws);
            for out in outs {
                turns += 1;
                turn_us += out.turn_us;
                if !(out.ok && out.tokens == p.tokens) {
                    r.bad_turns += 1;
                    r.first_problem
                        .get_or_insert_with(|| describe(&out, p.tokens));
                }
            }
        }
        let after = probe.snapshot();
        let per_turn = |total: f64| if turns > 0 { total / turns as f64 } else { 0.0 };
        r.parts.push(GrowPart {
            turns_before: done,
            turns,
            cpu_ms_per_turn: per_turn((after.server - before.server) * 1000.0),
            wall_ms_per_turn: per_turn(turn_us as f64 / 1000.0),
        });
        done = upto;
    }
    client::close_all(conns).await;
    Ok(r)
}
