//! The embedded model measured through agentd, against llama.cpp's own `llama-bench`, in one run.
//!
//! agentd's side is a real turn: a session over REST, the prompt over the native WebSocket, timestamps taken
//! when the client receives the frames. Per run: time to first token (TTFT) for a ~200-token prompt, prompt
//! processing rate (prompt tokens ÷ TTFT, so it includes the first token's decode, slightly against us), and
//! generation rate over 128 text deltas after the first (the turn is then cancelled, which also shows cancel
//! stops generation; if the model ends its answer sooner, over what it generated, at least 32). Each prompt
//! starts with a fresh nonce, so the engine's prefix cache reuses only the chat template's first tokens.
//!
//! `llama-bench` runs the same work with the same model and thread count: pp at the TTFT prompt's length, and
//! tg128 at the depth where the measured generation starts, i.e. after the long prompt's tokens. That depth
//! matters: llama.cpp pads the attended cache to 256 cells, so a generation that starts at 200 runs partly at
//! 256 and one that starts at 225 almost all at 512, several percent slower for this small model. The long
//! turn is cancelled, so it reports no usage; its length is the short turn's (which completes) plus the
//! difference of the two user texts in tokens, counted by llama.cpp's `llama-tokenize` (the chat template
//! around them is the same). Nonces have a fixed width, so every run's prompts have the same lengths.
//!
//! The two sides alternate within each run (agentd's turns, then one `llama-bench` repetition of each test), so
//! a machine whose speed drifts (shared cores, another tenant) moves both columns alike; the table reports the
//! medians and each run's generation ratio.
//!
//! Concurrent mode (`--concurrent N`, after the single-turn runs): N long turns at once, each in its own session
//! over its own WebSocket, all sent together, each cancelled after 128 text deltas; against N concurrent
//! streaming requests (the same prompts, system prompt and sampling) to llama.cpp's `llama-server --parallel N`
//! built from the same source as `llama-bench`, with the same model, threads and per-sequence context. Per run,
//! for each side: the aggregate generation rate (text deltas after each turn's first, summed, over the time from
//! the earliest first delta to the latest last one) and each turn's time to first token from its send (the
//! fastest and the slowest, i.e. the "1st" and the "Nth"). The sides alternate as above.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Generated tokens measured per run (after the first).
const GEN_TOKENS: usize = 128;
/// The fewest generated tokens a run may be measured over when the model ends its answer early.
const MIN_GEN_TOKENS: usize = 32;
/// agentd's per-turn context in these runs (and llama-server's per slot).
const AGENTD_CONTEXT: usize = 4096;
/// The agent's system prompt (llama-server's requests carry it too).
const SYSTEM_PROMPT: &str = "You are a helpful assistant.";

pub struct LlamaArgs {
    pub agentd_bin: PathBuf,
    pub model: PathBuf,
    pub threads: u32,
    pub runs: usize,
    /// `llama-bench`; None: built by `scripts/bench-llama.sh` into its cache.
    pub llama_bench: Option<PathBuf>,
    /// Turns at once in the concurrent mode; 0 skips it.
    pub concurrent: usize,
    /// Measured runs of the concurrent mode (after one warm-up).
    pub concurrent_runs: usize,
    /// `llama-server`; None: beside `llama-bench`.
    pub llama_server: Option<PathBuf>,
}

/// One side of one concurrent run.
#[derive(Debug, Default, Clone)]
pub struct ConcurrentFigures {
    /// Text deltas after each turn's first, summed, per second of the span from the earliest first delta to
    /// the latest last one.
    pub aggregate_tps: f64,
    /// Each turn's time to first token, fastest first.
    pub ttft_ms: Vec<f64>,
}

impl ConcurrentFigures {
    fn first_ttft(&self) -> f64 {
        self.ttft_ms.first().copied().unwrap_or(f64::NAN)
    }

    fn last_ttft(&self) -> f64 {
        self.ttft_ms.last().copied().unwrap_or(f64::NAN)
    }
}

/// One concurrent run: agentd's side, then llama-server's (None where it could not run).
#[derive(Debug, Default, Clone)]
pub struct ConcurrentRun {
    pub agentd: ConcurrentFigures,
    pub server: Option<ConcurrentFigures>,
}

#[derive(Debug, Default, Clone)]
pub struct TurnFigures {
    pub prompt_tokens: u64,
    pub ttft_ms: f64,
    pub pp_tps: f64,
    pub gen_tps: f64,
    pub cancel_ms: f64,
}

/// One run: agentd's figures and, right after them, llama-bench's (None where it could not run).
#[derive(Debug, Default, Clone)]
pub struct RunFigures {
    pub turn: TurnFigures,
    pub bench_pp_tps: Option<f64>,
    pub bench_tg_tps: Option<f64>,
}

#[derive(Debug, Default)]
pub struct LlamaReport {
    pub runs: Vec<RunFigures>,
    /// Prompt tokens of the long turns, i.e. where their measured generation starts.
    pub gen_depth: u64,
    pub bench_note: String,
    pub concurrent: Vec<ConcurrentRun>,
    pub server_note: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl LlamaReport {
    pub fn markdown(&self, threads: u32) -> String {
        let mut s = String::new();
        if !self.runs.is_empty() {
            s.push_str(&self.single_markdown(threads));
        }
        if !self.concurrent.is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&self.concurrent_markdown());
        }
        s
    }

    fn single_markdown(&self, threads: u32) -> String {
        let m = |f: fn(&TurnFigures) -> f64| median(self.runs.iter().map(|r| f(&r.turn)).collect());
        let (pp, tg, ttft, cancel) = (
            m(|t| t.pp_tps),
            m(|t| t.gen_tps),
            m(|t| t.ttft_ms),
            m(|t| t.cancel_ms),
        );
        let prompt = m(|t| t.prompt_tokens as f64);
        let theirs = |f: fn(&RunFigures) -> Option<f64>| {
            let v: Vec<f64> = self.runs.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        let (bench_pp, bench_tg) = (theirs(|r| r.bench_pp_tps), theirs(|r| r.bench_tg_tps));
        let ratio = |ours: f64, theirs: Option<f64>| match theirs {
            Some(t) if t > 0.0 => format!("{:.2}×", ours / t),
            _ => "—".into(),
        };
        let fmt = |v: Option<f64>| {
            v.map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "not run".into())
        };
        let depth = self.gen_depth;
        let mut s = String::new();
        s.push_str(&format!(
            "| embedded model, {threads} threads (median of {} runs) | llama-bench | agentd, a turn over the WebSocket | ratio |\n",
            self.runs.len()
        ));
        s.push_str("| --- | --- | --- | --- |\n");
        s.push_str(&format!(
            "| prompt processing, tokens/s | {} (pp{prompt:.0}) | {pp:.0} ({prompt:.0}-token prompt) | {} |\n",
            fmt(bench_pp),
            ratio(pp, bench_pp)
        ));
        let (their_depth, our_depth) = if depth > 0 {
            (
                format!("depth {depth}"),
                format!("after a {depth}-token prompt"),
            )
        } else {
            ("depth unknown".into(), "after a ~200-token prompt".into())
        };
        s.push_str(&format!(
            "| generation, tokens/s | {} (tg128 @ {their_depth}) | {tg:.0} ({our_depth}) | {} |\n",
            fmt(bench_tg),
            ratio(tg, bench_tg)
        ));
        s.push_str(&format!("| time to first token, ms | — | {ttft:.0} | |\n"));
        s.push_str(&format!(
            "| cancel mid-generation to `run_finished`, ms | — | {cancel:.0} | |\n"
        ));
        let per_run: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| {
                r.bench_tg_tps
                    .filter(|t| *t > 0.0)
                    .map(|t| r.turn.gen_tps / t)
            })
            .collect();
        if !per_run.is_empty() {
            let listed: Vec<String> = per_run.iter().map(|r| format!("{r:.2}")).collect();
            // Each run's two sides ran back to back, so the median of these ratios is the figure least moved
            // by a machine whose speed drifts between runs.
            s.push_str(&format!(
                "\nGeneration ratio of each run (agentd's turn and llama-bench back to back): {}; median {:.2}.\n",
                listed.join(", "),
                median(per_run)
            ));
        }
        if !self.bench_note.is_empty() {
            s.push_str(&format!("\n{}\n", self.bench_note));
        }
        s
    }

    fn concurrent_markdown(&self) -> String {
        let n = self
            .concurrent
            .first()
            .map_or(0, |r| r.agentd.ttft_ms.len());
        let ours = |f: fn(&ConcurrentFigures) -> f64| {
            median(self.concurrent.iter().map(|r| f(&r.agentd)).collect())
        };
        let theirs = |f: fn(&ConcurrentFigures) -> f64| {
            let v: Vec<f64> = self
                .concurrent
                .iter()
                .filter_map(|r| r.server.as_ref().map(f))
                .collect();
            (!v.is_empty()).then(|| median(v))
        };
        let fmt = |v: Option<f64>| {
            v.map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "not run".into())
        };
        let spread = |f: &ConcurrentFigures| f.last_ttft() / f.first_ttft();
        let (agg, first, last, ratio) = (
            ours(|f| f.aggregate_tps),
            ours(ConcurrentFigures::first_ttft),
            ours(ConcurrentFigures::last_ttft),
            ours(spread),
        );
        let (s_agg, s_first, s_last, s_ratio) = (
            theirs(|f| f.aggregate_tps),
            theirs(ConcurrentFigures::first_ttft),
            theirs(ConcurrentFigures::last_ttft),
            theirs(spread),
        );
        let mut s = String::new();
        s.push_str(&format!(
            "| {n} turns at once (median of {} runs) | llama-server --parallel {n} | agentd, {n} turns over the WebSocket | ratio |\n",
            self.concurrent.len()
        ));
        s.push_str("| --- | --- | --- | --- |\n");
        let ratio_of = |ours: f64, theirs: Option<f64>| match theirs {
            Some(t) if t > 0.0 => format!("{:.2}×", ours / t),
            _ => "—".into(),
        };
        s.push_str(&format!(
            "| aggregate generation, tokens/s | {} | {agg:.0} | {} |\n",
            fmt(s_agg),
            ratio_of(agg, s_agg)
        ));
        s.push_str(&format!(
            "| time to first token, 1st, ms | {} | {first:.0} | |\n",
            fmt(s_first)
        ));
        s.push_str(&format!(
            "| time to first token, {n}th, ms | {} | {last:.0} | |\n",
            fmt(s_last)
        ));
        s.push_str(&format!(
            "| {n}th ÷ 1st time to first token | {} | {ratio:.2} | |\n",
            s_ratio.map_or_else(|| "—".into(), |r| format!("{r:.2}"))
        ));
        let per_run: Vec<String> = self
            .concurrent
            .iter()
            .map(|r| {
                let theirs = r
                    .server
                    .as_ref()
                    .map_or_else(|| "—".into(), |f| format!("{:.0}", f.aggregate_tps));
                format!("{:.0}/{theirs}", r.agentd.aggregate_tps)
            })
            .collect();
        s.push_str(&format!(
            "\nAggregate tokens/s of each run, agentd/llama-server: {}.\n",
            per_run.join(", ")
        ));
        if !self.server_note.is_empty() {
            s.push_str(&format!("\n{}\n", self.server_note));
        }
        s
    }
}

struct Agentd {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Agentd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

async fn start_agentd(args: &LlamaArgs) -> Result<Agentd, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port()?;
    let model = args
        .model
        .canonicalize()
        .map_err(|e| format!("model {}: {e}", args.model.display()))?;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nworkspace_dir = \"{d}/ws\"\n\n[store]\nurl = \"sqlite://{d}/agentd.db\"\n\n\
         [providers.local]\nkind = \"llama\"\nmodel_path = \"{m}\"\ncontext_tokens = {AGENTD_CONTEXT}\nthreads = {t}\n\n\
         [[agents]]\nname = \"assistant\"\nprovider = \"local\"\nmodel = \"local\"\nsystem_prompt = \"{SYSTEM_PROMPT}\"\n",
        d = dir.path().display(),
        m = model.display(),
        t = args.threads
    );
    let path = dir.path().join("agentd.toml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let child = Command::new(&args.agentd_bin)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.agentd_bin.display()))?;
    let base = format!("http://127.0.0.1:{port}");
    let agentd = Agentd {
        child,
        base,
        _dir: dir,
    };
    if ready(&format!("{}/healthz", agentd.base), 200).await {
        return Ok(agentd);
    }
    Err("agentd did not start within 10 s".into())
}

/// Whether `url` answers with a success within `tries` × 50 ms.
async fn ready(url: &str, tries: usize) -> bool {
    for _ in 0..tries {
        if reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A ~200-token prompt that asks for a one-word answer: its turn completes, so its usage counts the prompt.
/// The nonce has a fixed width, as in [`prompt`].
fn short_prompt(nonce: usize) -> String {
    let filler =
        "The river runs past the old mill, where the miller keeps his ledgers of grain and flour, \
                  noting every sack that comes from the northern farms in the autumn months. ";
    format!("[{nonce:05}] {}Reply with one word: OK.", filler.repeat(5))
}

/// Time to first token and prompt tokens of a completed turn with a ~200-token prompt.
async fn prompt_turn(base: &str, nonce: usize) -> Result<(f64, u64), String> {
    let (mut ws, _id) = connect(base).await?;
    let frame = json!({"type": "message", "content": short_prompt(nonce)}).to_string();
    let sent = Instant::now();
    ws.send(Message::Text(frame.into()))
        .await
        .map_err(|e| e.to_string())?;
    let mut first = None;
    loop {
        let v = next_frame(&mut ws).await?;
        match v["type"].as_str() {
            Some("text_delta") if first.is_none() => first = Some(Instant::now()),
            Some("run_finished") => {
                let ttft = first.ok_or("the model produced no text")? - sent;
                let prompt_tokens = v["run"]["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                return Ok((ttft.as_secs_f64() * 1e3, prompt_tokens));
            }
            _ => {}
        }
    }
}

/// How long a turn may send nothing before it counts as stalled: long, because with turns run one at a time
/// (agentd before issue #19) the last of several concurrent turns waits for all the others on a loaded machine.
const STALL: Duration = Duration::from_secs(600);

/// The next JSON text frame (a turn that sends nothing for [`STALL`] has stalled).
async fn next_frame(ws: &mut Socket) -> Result<Value, String> {
    loop {
        let msg = tokio::time::timeout(STALL, ws.next())
            .await
            .map_err(|_| "turn stalled")?
            .ok_or("socket closed")?
            .map_err(|e| e.to_string())?;
        if let Message::Text(text) = msg {
            return serde_json::from_str(text.as_str()).map_err(|e| e.to_string());
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A new session and its native WebSocket, past the hello.
async fn connect(base: &str) -> Result<(Socket, String), String> {
    let http = reqwest::Client::new();
    let session: Value = http
        .post(format!("{base}/v1/sessions"))
        .json(&json!({"agent": "assistant"}))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let id = session["id"].as_str().ok_or("no session id")?.to_string();
    let url = format!(
        "{}/v1/sessions/{id}/ws",
        base.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    ws.next().await; // hello
    Ok((ws, id))
}

/// A ~200-token prompt that makes the model write a long answer. The nonce has a fixed width, so the prompt's
/// length in tokens does not depend on it.
fn prompt(nonce: usize) -> String {
    let filler =
        "The river runs past the old mill, where the miller keeps his ledgers of grain and flour, \
                  noting every sack that comes from the northern farms in the autumn months. ";
    format!(
        "[{nonce:05}] {}Now write a long, detailed story about the miller and his river, at least five paragraphs.",
        filler.repeat(5)
    )
}

async fn one_turn(base: &str, nonce: usize) -> Result<TurnFigures, String> {
    let (ttft_ms, prompt_tokens) = prompt_turn(base, nonce * 1000).await?;
    let (mut ws, _id) = connect(base).await?;
    let frame = json!({"type": "message", "content": prompt(nonce)}).to_string();
    ws.send(Message::Text(frame.into()))
        .await
        .map_err(|e| e.to_string())?;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut deltas = 0usize;
    let mut gen_window = None;
    let mut cancel_sent: Option<Instant> = None;
    let mut fig = TurnFigures::default();
    loop {
        let v = next_frame(&mut ws).await?;
        match v["type"].as_str() {
            Some("text_delta") if cancel_sent.is_none() => {
                let now = Instant::now();
                deltas += 1;
                last = Some(now);
                match first {
                    None => first = Some(now),
                    Some(f) if deltas == GEN_TOKENS + 1 => {
                        gen_window = Some((now - f, GEN_TOKENS));
                        cancel_sent = Some(Instant::now());
                        ws.send(Message::Text(json!({"type": "cancel"}).to_string().into()))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    _ => {}
                }
            }
            Some("run_finished") => {
                let end = Instant::now();
                if let Some(c) = cancel_sent {
                    fig.cancel_ms = (end - c).as_secs_f64() * 1e3;
                }
                break;
            }
            _ => {}
        }
    }
    let first = first.ok_or("the model produced no text")?;
    fig.prompt_tokens = prompt_tokens;
    fig.ttft_ms = ttft_ms;
    fig.pp_tps = prompt_tokens as f64 / (ttft_ms / 1e3);
    // The model may end its answer before GEN_TOKENS: then measure over what it generated, if that is enough.
    let (window, tokens) = match (gen_window, last) {
        (Some(w), _) => w,
        (None, Some(l)) if deltas > MIN_GEN_TOKENS => (l - first, deltas - 1),
        _ => {
            return Err(format!(
                "the model stopped after {deltas} tokens; too few to measure generation"
            ))
        }
    };
    fig.gen_tps = tokens as f64 / window.as_secs_f64();
    Ok(fig)
}

/// `llama-bench` from the cache, where `llama-tokenize` and `llama-server` were built beside it.
fn find_llama_bench() -> Option<PathBuf> {
    let cache = PathBuf::from(std::env::var_os("HOME")?).join(".cache/agentd-llama-bench");
    // Prefer the portable build (GGML_NATIVE=OFF): the same instruction sets llama-cpp-2 builds with.
    let mut found: Vec<PathBuf> = std::fs::read_dir(&cache)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/llama-bench"))
        .filter(|p| {
            p.is_file()
                && p.with_file_name("llama-tokenize").is_file()
                && p.with_file_name("llama-server").is_file()
        })
        .collect();
    found.sort_by_key(|p| !p.to_string_lossy().contains("native-OFF"));
    found.into_iter().next()
}

/// One llama-bench repetition (`-r 1 -o json`) of one test; `test` are its test flags, e.g.
/// `["-p", "200", "-n", "0"]`. Returns tokens/s.
fn llama_bench_once(
    bin: &Path,
    model: &Path,
    threads: u32,
    test: &[String],
) -> Result<f64, String> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string(), "-r", "1", "-o", "json"])
        .args(test)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("llama-bench output: {e}"))?;
    v.get(0)
        .and_then(|r| r["avg_ts"].as_f64())
        .ok_or_else(|| "llama-bench gave no avg_ts".to_string())
}

/// llama-bench's side of one run: pp at `prompt` tokens and tg128 at `depth`.
fn llama_bench(
    bin: &Path,
    model: &Path,
    threads: u32,
    prompt: u64,
    depth: u64,
) -> Result<(f64, f64), String> {
    let pp = llama_bench_once(
        bin,
        model,
        threads,
        &["-p".into(), prompt.to_string(), "-n".into(), "0".into()],
    )?;
    let tg = llama_bench_once(
        bin,
        model,
        threads,
        &[
            "-p".into(),
            "0".into(),
            "-n".into(),
            GEN_TOKENS.to_string(),
            "-d".into(),
            depth.to_string(),
        ],
    )?;
    Ok((pp, tg))
}

/// How many tokens `llama-tokenize` makes of `text` (its `--ids` output is one list, `[1, 2, 3]`).
fn count_tokens(tokenizer: &Path, model: &Path, text: &str) -> Result<u64, String> {
    let out = Command::new(tokenizer)
        .arg("-m")
        .arg(model)
        .args(["--ids", "--log-disable", "-p", text])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<u64> = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .and_then(|l| serde_json::from_str(l.trim()).ok())
        .ok_or_else(|| format!("llama-tokenize printed no token list: {stdout:?}"))?;
    Ok(ids.len() as u64)
}

/// Tokens the long prompt has beyond the short one (may be negative); the same for every nonce.
fn long_minus_short(tokenizer: &Path, model: &Path) -> Result<i64, String> {
    let long = count_tokens(tokenizer, model, &prompt(1))?;
    let short = count_tokens(tokenizer, model, &short_prompt(1000))?;
    Ok(long as i64 - short as i64)
}

/// Measures; `root` is the repository (for `scripts/bench-llama.sh`).
pub async fn run(args: &LlamaArgs, root: &Path) -> Result<LlamaReport, String> {
    let mut report = LlamaReport::default();
    let bench = args
        .llama_bench
        .clone()
        .or_else(find_llama_bench)
        .or_else(|| {
            // Build it (the script prints its own figures too; they are not used here).
            let status = Command::new(root.join("scripts/bench-llama.sh"))
                .arg(&args.model)
                .current_dir(root)
                .stdout(Stdio::null())
                .status();
            status
                .ok()
                .filter(|s| s.success())
                .and_then(|_| find_llama_bench())
        });
    // Where the long turn's generation starts, relative to the short turn's prompt (see the module docs).
    let mut extra_depth = None;
    match &bench {
        Some(bin) => {
            report.bench_note = format!("llama-bench: {}", bin.display());
            let tokenizer = bin.with_file_name("llama-tokenize");
            match long_minus_short(&tokenizer, &args.model) {
                Ok(d) => extra_depth = Some(d),
                Err(e) => {
                    return Err(format!(
                        "cannot count the prompts' tokens ({e}); run scripts/bench-llama.sh to build llama-tokenize"
                    ))
                }
            }
        }
        None => {
            report.bench_note = "llama-bench could not be built (see scripts/bench-llama.sh)".into()
        }
    }
    let agentd = start_agentd(args).await?;
    if args.runs > 0 {
        one_turn(&agentd.base, 0).await.ok(); // warm-up: page the model in
    }
    // A 135M model sometimes ends its answer at once; such a turn is retried with another nonce.
    let mut nonce = 1;
    while report.runs.len() < args.runs && nonce <= args.runs * 4 {
        let turn = match one_turn(&agentd.base, nonce).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("agentd-bench llama: turn {nonce} not measured: {e}");
                nonce += 1;
                continue;
            }
        };
        nonce += 1;
        let mut run = RunFigures {
            turn,
            ..RunFigures::default()
        };
        if let Some(extra) = extra_depth {
            report.gen_depth = run.turn.prompt_tokens.saturating_add_signed(extra);
        }
        if let Some(bin) = &bench {
            // Right after the turn, while agentd idles: the same machine state for both sides.
            match llama_bench(
                bin,
                &args.model,
                args.threads,
                run.turn.prompt_tokens,
                report.gen_depth,
            ) {
                Ok((pp, tg)) => {
                    run.bench_pp_tps = Some(pp);
                    run.bench_tg_tps = Some(tg);
                }
                Err(e) => report.bench_note = format!("llama-bench failed: {e}"),
            }
        }
        report.runs.push(run);
    }
    if report.runs.is_empty() && args.runs > 0 {
        return Err("no turn could be measured".into());
    }
    if args.concurrent > 0 {
        concurrent(args, &agentd, bench.as_deref(), &mut report).await;
    }
    Ok(report)
}

/// When one streamed turn's text arrived, client side.
struct TurnTimes {
    sent: Instant,
    first: Instant,
    last: Instant,
    /// Text deltas after the first.
    after_first: usize,
}

/// Counts one text delta at `now`; true once the turn has had the first plus [`GEN_TOKENS`].
fn tick(first: &mut Option<Instant>, last: &mut Instant, deltas: &mut usize, now: Instant) -> bool {
    first.get_or_insert(now);
    *last = now;
    *deltas += 1;
    *deltas > GEN_TOKENS
}

fn turn_times(
    sent: Instant,
    first: Option<Instant>,
    last: Instant,
    deltas: usize,
) -> Result<TurnTimes, String> {
    let first = first.ok_or("the model produced no text")?;
    Ok(TurnTimes {
        sent,
        first,
        last,
        after_first: deltas.saturating_sub(1),
    })
}

/// One long turn over an open session socket: sent, streamed until the first delta plus [`GEN_TOKENS`], then
/// cancelled (or to its end if the model stops sooner).
async fn streamed_turn(mut ws: Socket, text: String) -> Result<TurnTimes, String> {
    let frame = json!({"type": "message", "content": text}).to_string();
    let sent = Instant::now();
    ws.send(Message::Text(frame.into()))
        .await
        .map_err(|e| e.to_string())?;
    let (mut first, mut last, mut deltas, mut cancelled) = (None, sent, 0, false);
    loop {
        let v = next_frame(&mut ws).await?;
        match v["type"].as_str() {
            Some("text_delta") if !cancelled => {
                cancelled = tick(&mut first, &mut last, &mut deltas, Instant::now());
                if cancelled {
                    ws.send(Message::Text(json!({"type": "cancel"}).to_string().into()))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Some("run_finished") => break,
            _ => {}
        }
    }
    turn_times(sent, first, last, deltas)
}

/// The same long turn as one streaming chat completion from llama-server.
async fn server_turn(
    http: reqwest::Client,
    url: String,
    text: String,
) -> Result<TurnTimes, String> {
    let body = json!({
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
        ],
        "stream": true,
        "max_tokens": GEN_TOKENS + 1,
        // agentd's sampling for a turn (GenerateOptions::default and the engine's top-k/top-p).
        "temperature": 0.2,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.0,
    });
    let sent = Instant::now();
    let response = http
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("llama-server: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("llama-server answered {}", response.status()));
    }
    let mut body = response.bytes_stream();
    let (mut first, mut last, mut deltas) = (None, sent, 0);
    let mut pending = Vec::new();
    'read: while let Some(chunk) = tokio::time::timeout(STALL, body.next())
        .await
        .map_err(|_| "llama-server stalled")?
    {
        pending.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        let now = Instant::now();
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            if data.starts_with(b"[DONE]") {
                break 'read;
            }
            let Ok(v) = serde_json::from_slice::<Value>(data) else {
                continue;
            };
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !content.is_empty() && tick(&mut first, &mut last, &mut deltas, now) {
                break 'read;
            }
        }
    }
    turn_times(sent, first, last, deltas)
}

/// A run's figures from its turns' times.
fn concurrent_figures(turns: &[TurnTimes]) -> Result<ConcurrentFigures, String> {
    let start = turns.iter().map(|t| t.first).min().ok_or("no turns")?;
    let end = turns.iter().map(|t| t.last).max().ok_or("no turns")?;
    let tokens: usize = turns.iter().map(|t| t.after_first).sum();
    let span = (end - start).as_secs_f64();
    if tokens < MIN_GEN_TOKENS || span <= 0.0 {
        return Err(format!(
            "only {tokens} tokens generated; too few to measure"
        ));
    }
    let mut ttft_ms: Vec<f64> = turns
        .iter()
        .map(|t| (t.first - t.sent).as_secs_f64() * 1e3)
        .collect();
    ttft_ms.sort_by(f64::total_cmp);
    Ok(ConcurrentFigures {
        aggregate_tps: tokens as f64 / span,
        ttft_ms,
    })
}

/// `n` long turns at once through agentd: the sessions and sockets are opened first, then every prompt is sent
/// together. Prompts `nonce`, `nonce + 1`, ...
async fn agentd_concurrent(
    base: &str,
    n: usize,
    nonce: usize,
) -> Result<ConcurrentFigures, String> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(connect(base).await?.0);
    }
    let turns = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| streamed_turn(ws, prompt(nonce + i)));
    let turns: Result<Vec<_>, String> = futures_util::future::join_all(turns)
        .await
        .into_iter()
        .collect();
    concurrent_figures(&turns?)
}

/// The same `n` turns as concurrent requests to llama-server.
async fn server_concurrent(
    server: &LlamaServer,
    n: usize,
    nonce: usize,
) -> Result<ConcurrentFigures, String> {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", server.base);
    let turns = (0..n).map(|i| server_turn(http.clone(), url.clone(), prompt(nonce + i)));
    let turns: Result<Vec<_>, String> = futures_util::future::join_all(turns)
        .await
        .into_iter()
        .collect();
    concurrent_figures(&turns?)
}

/// A running `llama-server`, killed on drop.
struct LlamaServer {
    child: Child,
    base: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `llama-server --parallel n` with agentd's model, threads and per-turn context, and waits until it is
/// ready.
async fn start_server(bin: &Path, args: &LlamaArgs, n: usize) -> Result<LlamaServer, String> {
    let port = free_port()?;
    // Without a unified KV cache (its default with an explicit --parallel, and agentd's) the context is split
    // evenly among the slots: each gets agentd's per-turn context.
    let ctx = AGENTD_CONTEXT * n;
    let threads = args.threads.to_string();
    let child = Command::new(bin)
        .arg("-m")
        .arg(&args.model)
        .args(["-t", &threads, "-tb", &threads])
        .args(["--parallel", &n.to_string(), "-c", &ctx.to_string()])
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--no-webui",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let server = LlamaServer {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    if ready(&format!("{}/health", server.base), 600).await {
        return Ok(server);
    }
    Err("llama-server did not become ready within 30 s".into())
}

/// The concurrent mode: a warm-up of each side, then `concurrent_runs` runs, agentd's turns then llama-server's.
async fn concurrent(
    args: &LlamaArgs,
    agentd: &Agentd,
    bench: Option<&Path>,
    report: &mut LlamaReport,
) {
    let n = args.concurrent;
    let server_bin = args
        .llama_server
        .clone()
        .or_else(|| bench.map(|b| b.with_file_name("llama-server")))
        .filter(|p| p.is_file());
    let server = match &server_bin {
        Some(bin) => match start_server(bin, args, n).await {
            Ok(s) => {
                report.server_note = format!(
                    "llama-server: {} --parallel {n} -c {} -t {t} -tb {t}",
                    bin.display(),
                    AGENTD_CONTEXT * n,
                    t = args.threads
                );
                Some(s)
            }
            Err(e) => {
                report.server_note = format!("llama-server could not run: {e}");
                None
            }
        },
        None => {
            report.server_note = "llama-server not found (see scripts/bench-llama.sh)".into();
            None
        }
    };
    // Nonces apart from the single-turn runs' (fixed width: five digits).
    let mut nonce = 50_000;
    let _ = agentd_concurrent(&agentd.base, n, nonce).await; // warm-up
    if let Some(s) = &server {
        let _ = server_concurrent(s, n, nonce).await;
    }
    let mut attempts = 0;
    while report.concurrent.len() < args.concurrent_runs && attempts < args.concurrent_runs * 3 {
        attempts += 1;
        nonce += n;
        let ours = match agentd_concurrent(&agentd.base, n, nonce).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("agentd-bench llama: concurrent run not measured: {e}");
                continue;
            }
        };
        let theirs = match &server {
            Some(s) => match server_concurrent(s, n, nonce).await {
                Ok(f) => Some(f),
                Err(e) => {
                    report.server_note = format!("llama-server run failed: {e}");
                    None
                }
            },
            None => None,
        };
        report.concurrent.push(ConcurrentRun {
            agentd: ours,
            server: theirs,
        });
    }
}
