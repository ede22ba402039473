//! The `cluster` command (issue #15): two agentd nodes on one PostgreSQL database (SPEC.md section 6).
//!
//! Each run (`--runs`, default 3) is self-contained:
//! - **Two nodes**: a fresh database ([`crate::pg::create`]), agentd started twice on it (`cluster.node_id`
//!   `a` and `b`, ports of their own, the default lease unless `--lease-s`), one mock upstream for both. After
//!   both answer `/healthz` the harness waits `--settle-ms` (a node learns of its peers at its sweep, every
//!   `lease_s / 3`) and then until a turn executing on each node streams whole to a subscriber on the other
//!   (a node that has not yet seen its peer does not announce its commits).
//! - **Latency**: `--streams` sessions (default 200) whose turns are all sent to node A, at 20 tokens/s each
//!   (the latency scenario's load: 100 tokens, 50 ms apart, starts spread over 1 s). `--subscribers both`
//!   (default): every session has a same-node subscriber (the WebSocket on A that sent the turn) and an
//!   other-node subscriber (a WebSocket on B, connected before the turn); `split`: one subscriber per session,
//!   half on A and half on B, the turns sent with `POST /v1/sessions/{id}/messages` on A. Added latency
//!   (receive time minus the mock's emit time, [`crate::stamp`]) is summarised per group, and the goal
//!   (issue #15: other-node p50 and p99 at most 2x the same-node ones) is checked.
//! - **Throughput**: the throughput scenario's load (N sessions x 200 tokens, no delay, rounds repeated for at
//!   least 2 s) with the sessions' turns sent alternately to A and B and each read on the node executing it;
//!   then the same load on **one node** alone on a fresh database. Tokens/s delivered, and CPU per 1,000
//!   tokens of the whole store: every agentd process plus PostgreSQL's CPU for the database as [`crate::pg`]
//!   counts it.
//!
//! The two setups alternate which goes first from run to run, so drift of the machine falls on both. Servers
//! are pinned to CPU 0 (both nodes: the same CPU budget as the one node, so the comparison is of the cluster's
//! overhead, not of scale-out), the mock and the load generator to CPU 1, as in `agentd-bench run`;
//! PostgreSQL is a system service and runs where the kernel puts it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{self, Dialect, Target, TurnOutcome, Ws};
use crate::orchestrate::MockProcess;
use crate::pg::BenchDatabase;
use crate::report::Machine;
use crate::servers::{self, Kind, Launch, Server};
use crate::stamp::now_micros;
use crate::stats::quantile;
use crate::{procfs, Error, Result};

/// Sessions created at once.
const CREATE_CONCURRENCY: usize = 32;
/// WebSocket handshakes in flight at once.
const CONNECT_CONCURRENCY: usize = 64;
/// Issue #15's goal: other-node latency at most this many times the same-node latency (p50 and p99).
pub const GOAL_FACTOR: f64 = 2.0;

/// Where the subscribers of the latency measurement are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subscribers {
    /// Every session has one subscriber on each node (the one on A sends the turn).
    Both,
    /// One subscriber per session, alternately on A and B; turns are sent over REST to A.
    Split,
}

/// `agentd-bench cluster`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The agentd binary (a release build; `scripts/bench-cluster.sh` builds and passes it).
    #[arg(long, default_value = "target/release/agentd")]
    pub agentd_bin: PathBuf,
    /// The agentd checkout (for the commit in the report and the default output folder).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// What the agentd binary was built from, for the report (default: `git describe --dirty` of --repo and
    /// its uncommitted server files).
    #[arg(long)]
    pub built_from: Option<String>,
    /// Where cluster.md and cluster.json go (default: <repo>/bench-results/cluster, or
    /// <repo>/bench-results/tmp/cluster with --quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Independent runs (fresh databases and processes each), for the spread.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Concurrent streams of the latency measurement.
    #[arg(long, default_value_t = 200)]
    pub streams: usize,
    /// Where the latency measurement's subscribers are.
    #[arg(long, value_enum, default_value = "both")]
    pub subscribers: Subscribers,
    /// Throughput levels (concurrent sessions), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub throughput_sessions: Vec<usize>,
    /// `cluster.lease_s` for the nodes (default: the server's own default).
    #[arg(long)]
    pub lease_s: Option<u64>,
    /// Wait this long after both nodes are up before checking that they see each other.
    #[arg(long, default_value_t = 1500)]
    pub settle_ms: u64,
    /// Do not pin the servers to CPU 0 and the mock and load generator to CPU 1.
    #[arg(long)]
    pub no_pin: bool,
    /// CI-sized: one run, 20 streams x 20 tokens, throughput 10 sessions x 50 tokens; the figures mean nothing.
    #[arg(long)]
    pub quick: bool,
}

/// Latency percentiles of one group of subscribers, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples (tokens received).
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// Nearest-rank percentiles of samples in microseconds (sorts them in place).
pub fn percentiles(samples_us: &mut [u32]) -> Percentiles {
    samples_us.sort_unstable();
    let ms = |us: u32| f64::from(us) / 1000.0;
    Percentiles {
        count: samples_us.len(),
        p50_ms: ms(quantile(samples_us, 0.50)),
        p90_ms: ms(quantile(samples_us, 0.90)),
        p99_ms: ms(quantile(samples_us, 0.99)),
        max_ms: ms(samples_us.last().copied().unwrap_or(0)),
    }
}

/// `num / den`, with an empty or zero denominator giving infinity (or 1 when both are zero).
pub fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else if num > 0.0 {
        f64::INFINITY
    } else {
        1.0
    }
}

/// The goal check: other-node latency against same-node latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GoalCheck {
    /// Other-node p50 ÷ same-node p50.
    pub p50_ratio: f64,
    /// Other-node p99 ÷ same-node p99.
    pub p99_ratio: f64,
    /// The allowed factor.
    pub factor: f64,
    /// Both ratios at most `factor`, and both groups measured.
    pub met: bool,
}

/// Checks other-node p50 and p99 against `factor` times the same-node ones.
pub fn goal_check(same: &Percentiles, other: &Percentiles, factor: f64) -> GoalCheck {
    let p50_ratio = ratio(other.p50_ms, same.p50_ms);
    let p99_ratio = ratio(other.p99_ms, same.p99_ms);
    GoalCheck {
        p50_ratio,
        p99_ratio,
        factor,
        met: same.count > 0 && other.count > 0 && p50_ratio <= factor && p99_ratio <= factor,
    }
}

/// Minimum, median and maximum of a figure over the runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Runs with a value.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median (the lower middle one for an even count).
    pub median: f64,
    /// Largest.
    pub max: f64,
}

/// The spread of `values` (non-finite ones left out).
pub fn spread(values: &[f64]) -> Spread {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Spread::default();
    }
    v.sort_by(f64::total_cmp);
    Spread {
        n: v.len(),
        min: v[0],
        median: v[(v.len() - 1) / 2],
        max: v[v.len() - 1],
    }
}

/// The config of one node: the bench's agentd config ([`servers::agentd_config`]) on a `postgres://` store,
/// with `[cluster] node_id` (and `lease_s` when given).
pub fn node_config(
    port: u16,
    upstream: &str,
    store: &str,
    node_id: &str,
    lease_s: Option<u64>,
) -> String {
    let mut text = servers::agentd_config(port, upstream, store);
    text.push_str(&format!("\n[cluster]\nnode_id = \"{node_id}\"\n"));
    if let Some(lease) = lease_s {
        text.push_str(&format!("lease_s = {lease}\n"));
    }
    text
}

/// Adds a latency sample to the bucket of the second (since the gate) its token was emitted in.
fn bucket_push(buckets: &mut Vec<Vec<u32>>, since_gate_us: u64, latency_us: u32) {
    let i = usize::try_from(since_gate_us / 1_000_000)
        .unwrap_or(usize::MAX)
        .min(3600);
    if buckets.len() <= i {
        buckets.resize_with(i + 1, Vec::new);
    }
    buckets[i].push(latency_us);
}

/// p50 and p99 (ms) of each second's bucket (empty ones as 0).
fn by_second(buckets: &mut [Vec<u32>]) -> Vec<(f64, f64)> {
    buckets
        .iter_mut()
        .map(|b| {
            let p = percentiles(b);
            (p.p50_ms, p.p99_ms)
        })
        .collect()
}

/// The three load averages from `/proc/loadavg`.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    parse_loadavg(&text)
}

fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (slot, word) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = word.parse().unwrap_or(0.0);
    }
    out
}

/// Sizes of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Latency: concurrent streams.
    pub streams: usize,
    /// Latency: tokens per reply.
    pub latency_tokens: u32,
    /// Latency: upstream delay before each token.
    pub latency_delay_ms: u64,
    /// Latency: turn starts spread over this.
    pub latency_stagger_ms: u64,
    /// Where the latency subscribers are.
    pub subscribers: Subscribers,
    /// Throughput levels.
    pub throughput_sessions: Vec<usize>,
    /// Throughput: tokens per reply (no delay).
    pub throughput_tokens: u32,
    /// Throughput: rounds repeated until their wall time reaches this.
    pub throughput_min_wall_ms: u64,
    /// Throughput: at most this many rounds per level.
    pub throughput_max_rounds: u32,
    /// `cluster.lease_s` given to the nodes (`None`: the server's default).
    pub lease_s: Option<u64>,
    /// Settle time after both nodes were up.
    pub settle_ms: u64,
    /// Servers on CPU 0, mock and load generator on CPU 1.
    pub pinned: bool,
}

impl Settings {
    fn new(args: &ClusterArgs) -> Self {
        if args.quick {
            return Settings {
                streams: 20,
                latency_tokens: 20,
                latency_delay_ms: 50,
                latency_stagger_ms: 200,
                subscribers: args.subscribers,
                throughput_sessions: vec![10],
                throughput_tokens: 50,
                throughput_min_wall_ms: 300,
                throughput_max_rounds: 5,
                lease_s: args.lease_s,
                settle_ms: args.settle_ms,
                pinned: !args.no_pin,
            };
        }
        Settings {
            streams: args.streams,
            latency_tokens: 100,
            latency_delay_ms: 50,
            latency_stagger_ms: 1000,
            subscribers: args.subscribers,
            throughput_sessions: args.throughput_sessions.clone(),
            throughput_tokens: 200,
            throughput_min_wall_ms: 2000,
            throughput_max_rounds: 200,
            lease_s: args.lease_s,
            settle_ms: args.settle_ms,
            pinned: !args.no_pin,
        }
    }
}

/// CPU seconds of the processes that make up the store under test, at one instant.
#[derive(Debug, Clone, Default)]
struct CpuSnapshot {
    nodes: Vec<f64>,
    pg: f64,
    mock: f64,
    loadgen: f64,
}

/// Which processes count.
#[derive(Debug, Clone)]
struct Meter {
    nodes: Vec<u32>,
    database: String,
    mock: u32,
}

impl Meter {
    fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            nodes: self.nodes.iter().map(|&p| procfs::cpu_seconds(p)).collect(),
            pg: crate::pg::cpu_seconds(&self.database),
            mock: procfs::cpu_seconds(self.mock),
            loadgen: procfs::process_cpu_seconds(std::process::id()).unwrap_or(0.0),
        }
    }
}

/// CPU used between two snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// Each agentd node's CPU seconds (A first).
    pub nodes_s: Vec<f64>,
    /// PostgreSQL's for the database (backends, walwriter, checkpointer, background writer).
    pub pg_s: f64,
    /// The mock's.
    pub mock_s: f64,
    /// The load generator's.
    pub loadgen_s: f64,
}

impl CpuUse {
    fn between(a: &CpuSnapshot, b: &CpuSnapshot) -> Self {
        CpuUse {
            nodes_s: a.nodes.iter().zip(&b.nodes).map(|(x, y)| y - x).collect(),
            pg_s: b.pg - a.pg,
            mock_s: b.mock - a.mock,
            loadgen_s: b.loadgen - a.loadgen,
        }
    }

    fn add(&mut self, other: &CpuUse) {
        if self.nodes_s.len() < other.nodes_s.len() {
            self.nodes_s.resize(other.nodes_s.len(), 0.0);
        }
        for (s, o) in self.nodes_s.iter_mut().zip(&other.nodes_s) {
            *s += o;
        }
        self.pg_s += other.pg_s;
        self.mock_s += other.mock_s;
        self.loadgen_s += other.loadgen_s;
    }

    /// Every agentd node plus PostgreSQL.
    pub fn store_s(&self) -> f64 {
        self.nodes_s.iter().sum::<f64>() + self.pg_s
    }
}

/// CPU milliseconds per 1,000 tokens.
pub fn ms_per_1k(cpu_s: f64, tokens: u64) -> f64 {
    if tokens == 0 {
        return 0.0;
    }
    cpu_s * 1000.0 / (tokens as f64 / 1000.0)
}

/// The latency measurement's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// Nodes in the setup.
    pub nodes: usize,
    /// Concurrent streams (sessions).
    pub streams: usize,
    /// Where the subscribers were.
    pub subscribers: Option<Subscribers>,
    /// Same-node subscribers' added latency, every token.
    pub same: Percentiles,
    /// Other-node subscribers' added latency, every token.
    pub other: Percentiles,
    /// Same-node, tokens emitted after every stream had started.
    pub same_steady: Percentiles,
    /// Other-node, the same.
    pub other_steady: Percentiles,
    /// Same-node p50 / p99 (ms) of the tokens emitted in each second of the window (0 from the gate): shows
    /// whether delivery keeps up or falls further behind as the streams go on.
    #[serde(default)]
    pub same_by_second: Vec<(f64, f64)>,
    /// Other-node, the same.
    #[serde(default)]
    pub other_by_second: Vec<(f64, f64)>,
    /// The goal check on every token.
    pub goal: GoalCheck,
    /// The goal check on the steady state.
    pub goal_steady: GoalCheck,
    /// Same-node subscribers.
    pub same_subscribers: usize,
    /// Other-node subscribers.
    pub other_subscribers: usize,
    /// Tokens the subscribers should have received, in all.
    pub expected_tokens: u64,
    /// Tokens they received.
    pub tokens: u64,
    /// Subscribers that did not get every token and a matching end.
    pub bad_subscribers: u64,
    /// The first problem.
    pub first_problem: Option<String>,
    /// For up to five subscribers that did not see their turn end: what a replay from the store on the same
    /// node gives afterwards.
    #[serde(default)]
    pub rechecks: Vec<String>,
    /// Wall time of the window.
    pub wall_s: f64,
    /// CPU in the window.
    pub cpu: CpuUse,
    /// The store's CPU (agentd nodes + PostgreSQL) per 1,000 tokens streamed by the runs (not per delivery).
    pub store_cpu_ms_per_1k_run_tokens: f64,
}

/// One throughput level on one setup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ThroughputFigures {
    /// Nodes the turns were spread over.
    pub nodes: usize,
    /// Concurrent sessions.
    pub sessions: usize,
    /// Tokens per reply.
    pub tokens_per_reply: u32,
    /// Rounds measured.
    pub rounds: u32,
    /// Tokens delivered.
    pub tokens: u64,
    /// Tokens expected.
    pub expected_tokens: u64,
    /// Summed wall time of the rounds.
    pub wall_s: f64,
    /// Tokens delivered per second.
    pub tokens_per_s: f64,
    /// CPU in the rounds.
    pub cpu: CpuUse,
    /// agentd nodes + PostgreSQL, CPU ms per 1,000 tokens.
    pub store_cpu_ms_per_1k: f64,
    /// agentd nodes alone.
    pub agentd_cpu_ms_per_1k: f64,
    /// PostgreSQL alone.
    pub pg_cpu_ms_per_1k: f64,
    /// Cores busy: each node, PostgreSQL, mock, load generator.
    pub node_cores: Vec<f64>,
    /// PostgreSQL's cores.
    pub pg_cores: f64,
    /// The mock's cores.
    pub mock_cores: f64,
    /// The load generator's cores.
    pub loadgen_cores: f64,
    /// Turns that did not deliver every token with a matching end.
    pub bad_sessions: u64,
    /// The first problem.
    pub first_problem: Option<String>,
}

/// Two nodes against one at one throughput level.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Comparison {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Turns spread over both nodes.
    pub two: Option<ThroughputFigures>,
    /// One node alone.
    pub one: Option<ThroughputFigures>,
    /// Tokens/s, two ÷ one.
    pub tokens_per_s_ratio: Option<f64>,
    /// Store CPU per token, two ÷ one.
    pub cpu_ratio: Option<f64>,
}

impl Comparison {
    fn finish(&mut self) {
        if let (Some(two), Some(one)) = (&self.two, &self.one) {
            self.tokens_per_s_ratio = Some(ratio(two.tokens_per_s, one.tokens_per_s));
            self.cpu_ratio = Some(ratio(two.store_cpu_ms_per_1k, one.store_cpu_ms_per_1k));
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunFigures {
    /// 1-based.
    pub index: u32,
    /// When it started (UTC).
    pub started: String,
    /// `/proc/loadavg` before the run.
    pub load_before: [f64; 3],
    /// `/proc/loadavg` after it.
    pub load_after: [f64; 3],
    /// CPU-seconds the machine spent on work other than this harness and its children (PostgreSQL included:
    /// it is not a child) during the run, as a share of the machine.
    pub others_share: f64,
    /// The two-node setup went first.
    pub cluster_first: bool,
    /// Milliseconds from both nodes answering `/healthz` to a turn on each streaming whole to the other.
    pub cross_node_ready_ms: Option<u64>,
    /// The cross-node checks that failed before one passed (each given 3 s).
    #[serde(default)]
    pub cross_node_failures: Vec<String>,
    /// Latency, two nodes.
    pub latency: Option<LatencyFigures>,
    /// Latency, one node (the same load, subscribers on the node: the single-node reference).
    pub latency_one_node: Option<LatencyFigures>,
    /// Throughput, per level.
    pub throughput: Vec<Comparison>,
    /// What went wrong.
    pub problems: Vec<String>,
}

/// Everything `cluster.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterReport {
    /// The machine.
    pub machine: Machine,
    /// The command line.
    pub command: String,
    /// `git describe --always --dirty` of the checkout, and what is uncommitted.
    pub commit: String,
    /// When it started (UTC).
    pub started: String,
    /// Duration, seconds.
    pub duration_s: f64,
    /// Sizes.
    pub settings: Option<Settings>,
    /// PostgreSQL's settings, `(name, value)`.
    pub pg_settings: Vec<(String, String)>,
    /// Every run.
    pub runs: Vec<RunFigures>,
    /// Notes.
    pub notes: Vec<String>,
}

/// The command.
pub fn main(args: ClusterArgs) -> ExitCode {
    let repo = std::fs::canonicalize(&args.repo).unwrap_or(args.repo.clone());
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            repo.join("bench-results").join("tmp").join("cluster")
        } else {
            repo.join("bench-results").join("cluster")
        }
    });
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd-bench cluster: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args, &repo, &out)) {
        Ok(report) => {
            let measured = report.runs.iter().any(|r| {
                r.latency.as_ref().is_some_and(|l| l.tokens > 0)
                    && r.throughput
                        .iter()
                        .any(|c| c.two.as_ref().is_some_and(|t| t.tokens > 0))
            });
            if measured {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "agentd-bench cluster: no run measured anything (see the report's problems)"
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("agentd-bench cluster: {e}");
            ExitCode::FAILURE
        }
    }
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn describe_commit(repo: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["describe", "--always", "--dirty"]);
    let changed: Vec<String> = git(&["status", "--porcelain", "--untracked-files=no"])
        .lines()
        .filter_map(|l| l.get(3..).map(str::to_string))
        .filter(|p| p.starts_with("crates/") && !p.starts_with("crates/agentd-bench/"))
        .collect();
    if changed.is_empty() {
        head
    } else {
        format!(
            "{head} (uncommitted server changes in the working tree the binary was built from: {})",
            changed.join(", ")
        )
    }
}

async fn run(args: &ClusterArgs, repo: &Path, out: &Path) -> Result<ClusterReport> {
    let t0 = Instant::now();
    let settings = Settings::new(args);
    let runs = if args.quick { 1 } else { args.runs };
    let bin = std::fs::canonicalize(&args.agentd_bin)
        .map_err(|e| Error::new(format!("{}: {e}", args.agentd_bin.display())))?;
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let logs = home.join(".cache").join("agentd-bench").join("logs");
    let work = std::env::temp_dir().join(format!("agentd-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(out)?;
    let mut report = ClusterReport {
        machine: Machine::detect(),
        command: std::env::var("AGENTD_BENCH_COMMAND").unwrap_or_else(|_| {
            std::env::args()
                .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
                .collect::<Vec<_>>()
                .join(" ")
        }),
        commit: args
            .built_from
            .clone()
            .unwrap_or_else(|| describe_commit(repo)),
        started: utc_now(),
        settings: Some(settings.clone()),
        ..Default::default()
    };
    let server_cpu = if settings.pinned && procfs::online_cpus() >= 2 {
        servers::pin_self(1)?;
        report.notes.push(format!(
            "Both agentd nodes (and the one node) pinned to CPU 0, the mock and the load generator to CPU {} (taskset); PostgreSQL unpinned (a system service).",
            procfs::allowed_cpus()
        ));
        Some(0)
    } else {
        report.notes.push(
            "Not pinned: servers, mock, load generator and PostgreSQL share every CPU.".into(),
        );
        None
    };
    let http = client::http_client()?;
    let mock = MockProcess::start(&logs)?;
    let upstream = format!("http://{}/v1", mock.addr());
    eprintln!(
        "agentd-bench cluster: mock at {} (pid {})",
        mock.addr(),
        mock.pid()
    );
    let env = Env {
        http: &http,
        bin: &bin,
        logs: &logs,
        work: &work,
        upstream: &upstream,
        mock_pid: mock.pid(),
        cpu: server_cpu,
        settings: &settings,
    };
    for index in 1..=runs {
        let fig = one_run(&env, index, &mut report.pg_settings).await;
        eprintln!(
            "agentd-bench cluster: run {index} done: {}",
            summary_line(&fig)
        );
        report.runs.push(fig);
        report.duration_s = t0.elapsed().as_secs_f64();
        // Written after every run, so a long series that is cut short keeps what it measured.
        write_outputs(out, &report)?;
    }
    drop(mock);
    let _ = std::fs::remove_dir_all(&work);
    println!("{}", markdown(&report));
    eprintln!(
        "agentd-bench cluster: wrote {}",
        out.join("cluster.md").display()
    );
    Ok(report)
}

fn write_outputs(out: &Path, report: &ClusterReport) -> Result<()> {
    std::fs::write(out.join("cluster.md"), markdown(report))?;
    std::fs::write(
        out.join("cluster.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    Ok(())
}

/// What every measurement of a run shares.
struct Env<'a> {
    http: &'a reqwest::Client,
    bin: &'a Path,
    logs: &'a Path,
    work: &'a Path,
    upstream: &'a str,
    mock_pid: u32,
    cpu: Option<usize>,
    settings: &'a Settings,
}

/// A running setup: a database and its nodes.
struct Setup {
    db: BenchDatabase,
    servers: Vec<Server>,
    targets: Vec<Target>,
}

impl Setup {
    fn meter(&self, mock: u32) -> Meter {
        Meter {
            nodes: self.servers.iter().map(|s| s.pid).collect(),
            database: self.db.name.clone(),
            mock,
        }
    }

    fn all_running(&mut self) -> Option<String> {
        for s in &mut self.servers {
            if !s.running() {
                return Some(format!(
                    "a node exited; last log lines: {}",
                    servers::tail(&s.log, 5)
                ));
            }
        }
        None
    }

    async fn stop(mut self) {
        for s in &mut self.servers {
            s.stop();
        }
        crate::pg::drop_database(&self.db).await;
    }
}

const NODE_NAMES: [&str; 2] = ["a", "b"];

async fn start_setup(env: &Env<'_>, nodes: usize, run: u32) -> Result<Setup> {
    let db = crate::pg::create().await?;
    let mut servers_up = Vec::new();
    let mut targets = Vec::new();
    let mut failure = None;
    for name in NODE_NAMES.iter().take(nodes) {
        let started = async {
            let port = servers::free_port()?;
            let dir = env.work.join(format!("run{run}-{nodes}node-{name}"));
            std::fs::create_dir_all(&dir)?;
            let config = dir.join("agentd.toml");
            std::fs::write(
                &config,
                node_config(port, env.upstream, &db.url, name, env.settings.lease_s),
            )?;
            let launch = Launch {
                kind: Kind::AgentdPg,
                program: env.bin.to_path_buf(),
                args: vec!["serve".into(), "--config".into(), config.into()],
                env: Vec::new(),
                cwd: dir.clone(),
                port,
            };
            let log = env
                .logs
                .join(format!("cluster-run{run}-{nodes}node-{name}.log"));
            Server::spawn(launch, env.cpu, log)
        }
        .await;
        match started {
            Ok(s) => servers_up.push(s),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        for s in &mut servers_up {
            if let Err(e) = s.wait_healthy(env.http, Duration::from_secs(90)).await {
                failure = Some(e);
                break;
            }
            targets.push(Target::agentd(
                &format!("node {}", NODE_NAMES[targets.len()]),
                &s.base,
                "assistant",
                Dialect::Native,
            ));
        }
    }
    let setup = Setup {
        db,
        servers: servers_up,
        targets,
    };
    if let Some(e) = failure {
        setup.stop().await;
        return Err(e);
    }
    Ok(setup)
}

async fn one_run(env: &Env<'_>, index: u32, pg_settings: &mut Vec<(String, String)>) -> RunFigures {
    let mut fig = RunFigures {
        index,
        started: utc_now(),
        load_before: load_average(),
        // Alternate which setup goes first.
        cluster_first: index % 2 == 1,
        ..Default::default()
    };
    eprintln!(
        "agentd-bench cluster: run {index}, load average before {:?}",
        fig.load_before
    );
    let busy0 = procfs::machine_busy_seconds();
    let own0 = procfs::own_total_cpu_seconds();
    let wall0 = Instant::now();
    let order: [usize; 2] = if fig.cluster_first { [2, 1] } else { [1, 2] };
    let levels = env.settings.throughput_sessions.clone();
    fig.throughput = levels
        .iter()
        .map(|&n| Comparison {
            sessions: n,
            ..Default::default()
        })
        .collect();
    for nodes in order {
        match start_setup(env, nodes, index).await {
            Ok(mut setup) => {
                if pg_settings.is_empty() {
                    pg_settings.clone_from(&setup.db.settings);
                }
                eprintln!(
                    "agentd-bench cluster: run {index}: {nodes} node(s) up on {} ({})",
                    setup.db.name,
                    setup
                        .servers
                        .iter()
                        .map(|s| format!("{} pid {}", s.base, s.pid))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                measure_setup(env, &mut setup, nodes, &mut fig).await;
                setup.stop().await;
            }
            Err(e) => fig
                .problems
                .push(format!("{nodes} node(s) did not start: {e}")),
        }
    }
    for c in &mut fig.throughput {
        c.finish();
    }
    fig.load_after = load_average();
    if let (Some(b0), Some(b1)) = (busy0, procfs::machine_busy_seconds()) {
        let others = ((b1 - b0) - (procfs::own_total_cpu_seconds() - own0)).max(0.0);
        fig.others_share =
            others / (wall0.elapsed().as_secs_f64() * procfs::online_cpus() as f64).max(1e-9);
    }
    fig
}

async fn measure_setup(env: &Env<'_>, setup: &mut Setup, nodes: usize, fig: &mut RunFigures) {
    let s = env.settings;
    if nodes == 2 {
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(s.settle_ms)).await;
        match wait_cross_node(env.http, &setup.targets, Duration::from_secs(60)).await {
            Ok(failures) => {
                let ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
                eprintln!("agentd-bench cluster: the nodes stream each other's runs ({ms} ms after both were up)");
                for f in &failures {
                    eprintln!("agentd-bench cluster: cross-node check failed before: {f}");
                }
                fig.cross_node_ready_ms = Some(ms);
                fig.cross_node_failures = failures;
            }
            Err(e) => {
                fig.problems
                    .push(format!("the nodes never streamed each other's runs: {e}"));
                return;
            }
        }
    }
    let meter = setup.meter(env.mock_pid);
    // Warm-up (unrecorded), as `agentd-bench run` does before its throughput levels.
    let warm = ThroughputSpec {
        sessions: 10,
        tokens: 50,
        min_wall: Duration::ZERO,
        max_rounds: 1,
    };
    let _ = throughput(env.http, &setup.targets, &meter, warm).await;

    // Latency.
    let lat = LatencySpec {
        streams: s.streams,
        tokens: s.latency_tokens,
        delay_ms: s.latency_delay_ms,
        stagger: Duration::from_millis(s.latency_stagger_ms),
        subscribers: (nodes == 2).then_some(s.subscribers),
    };
    let result = latency(env.http, &setup.targets, &meter, lat).await;
    let died = setup.all_running();
    match (result, died) {
        (Ok(l), None) => {
            eprintln!(
                "agentd-bench cluster: latency, {nodes} node(s): same-node {:?}; other-node {:?}; bad {}",
                l.same, l.other, l.bad_subscribers
            );
            if nodes == 2 {
                fig.latency = Some(l);
            } else {
                fig.latency_one_node = Some(l);
            }
        }
        (Err(e), _) => fig.problems.push(format!("latency, {nodes} node(s): {e}")),
        (Ok(_), Some(d)) => {
            fig.problems.push(format!("latency, {nodes} node(s): {d}"));
            return;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Throughput levels.
    for comp in &mut fig.throughput {
        let spec = ThroughputSpec {
            sessions: comp.sessions,
            tokens: s.throughput_tokens,
            min_wall: Duration::from_millis(s.throughput_min_wall_ms),
            max_rounds: s.throughput_max_rounds,
        };
        let result = throughput(env.http, &setup.targets, &meter, spec).await;
        let died = setup.all_running();
        match (result, died) {
            (Ok(t), None) => {
                eprintln!(
                    "agentd-bench cluster: throughput {} sessions, {nodes} node(s): {:.0} tokens/s, store CPU {:.1} ms / 1,000 tokens (agentd {:.1}, PostgreSQL {:.1}), bad {}",
                    comp.sessions,
                    t.tokens_per_s,
                    t.store_cpu_ms_per_1k,
                    t.agentd_cpu_ms_per_1k,
                    t.pg_cpu_ms_per_1k,
                    t.bad_sessions
                );
                if nodes == 2 {
                    comp.two = Some(t);
                } else {
                    comp.one = Some(t);
                }
            }
            (Err(e), _) => fig.problems.push(format!(
                "throughput {} sessions, {nodes} node(s): {e}",
                comp.sessions
            )),
            (Ok(_), Some(d)) => {
                fig.problems.push(format!(
                    "throughput {} sessions, {nodes} node(s): {d}",
                    comp.sessions
                ));
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Until a 5-token turn executing on each node streams whole to a subscriber on the other node (each try
/// given 3 s), or `limit`.
async fn wait_cross_node(
    http: &reqwest::Client,
    targets: &[Target],
    limit: Duration,
) -> Result<Vec<String>> {
    let t0 = Instant::now();
    let deadline = t0 + limit;
    let mut last: String;
    let mut failures = Vec::new();
    for (exec, watch) in [(0usize, 1usize), (1, 0)] {
        loop {
            let attempt = Instant::now();
            match cross_node_turn(http, &targets[exec], &targets[watch]).await {
                Ok(()) => break,
                Err(e) => {
                    last = e.to_string();
                    failures.push(format!(
                        "attempt started {} ms after the settle time, {} -> {}: {last}",
                        attempt.duration_since(t0).as_millis(),
                        targets[exec].label,
                        targets[watch].label
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::new(format!(
                    "{} -> {}: {last}",
                    targets[exec].label, targets[watch].label
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(failures)
}

async fn cross_node_turn(http: &reqwest::Client, exec: &Target, watch: &Target) -> Result<()> {
    let limit = Duration::from_secs(3);
    let sid = client::create_session(http, exec).await?;
    let (mut watcher, _) = client::connect(watch, &sid, None).await?;
    let (mut sender, _) = client::connect(exec, &sid, None).await?;
    let sent = now_micros();
    let (own, other) = tokio::join!(
        client::run_turn(
            &mut sender,
            Dialect::Native,
            "cluster-check tokens=5",
            limit
        ),
        read_turn(&mut watcher, sent, limit)
    );
    client::close_all(vec![sender]).await;
    // The run has ended on its node. A subscriber elsewhere that has not seen it end: does it ever, without
    // anything new happening in the session? And does its node's log have the turn (a replay with after=0)?
    let mut later = String::new();
    if own.ok && !(other.ok && other.tokens == 5) {
        let more = read_turn(&mut watcher, sent, Duration::from_secs(7)).await;
        let replay = async {
            let (mut ws, _) = client::connect(watch, &sid, Some(0)).await?;
            let out = read_turn(&mut ws, now_micros(), Duration::from_secs(5)).await;
            client::close_all(vec![ws]).await;
            Ok::<_, Error>(out)
        }
        .await;
        later = format!(
            "; 7 s more on the same connection: {} more tokens{}; a new WebSocket on that node with after=0 then: {}",
            more.tokens,
            if more.ok { " and the end" } else { ", no end" },
            match replay {
                Ok(r) if r.ok => format!("the whole turn ({} tokens and the end) from the log", r.tokens),
                Ok(r) => format!("{} tokens, no end ({})", r.tokens, r.problem.unwrap_or_default()),
                Err(e) => format!("failed: {e}"),
            }
        );
    }
    client::close_all(vec![watcher]).await;
    if !(own.ok && own.tokens == 5) {
        return Err(Error::new(format!(
            "the executing node's own subscriber: {} ({} of 5 tokens)",
            own.problem.unwrap_or_default(),
            own.tokens
        )));
    }
    if !(other.ok && other.tokens == 5) {
        return Err(Error::new(format!(
            "the other node's subscriber: {} ({} of 5 tokens, while the executing node's own subscriber got the whole turn){later}",
            other.problem.unwrap_or_default(),
            other.tokens
        )));
    }
    Ok(())
}

/// Reads a turn someone else sent to its end frame (or `limit`), over the native WebSocket.
pub async fn read_turn(ws: &mut Ws, sent_us: u64, limit: Duration) -> TurnOutcome {
    client::read_turn(ws, Dialect::Native, sent_us, limit).await
}

/// Sends `content` to `session` with `POST /v1/sessions/{id}/messages`.
async fn send_rest(
    http: &reqwest::Client,
    target: &Target,
    session: &str,
    content: &str,
) -> Result<()> {
    let resp = http
        .post(format!("{}/v1/sessions/{session}/messages", target.base))
        .json(&serde_json::json!({ "content": content }))
        .send()
        .await?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = resp.text().await.unwrap_or_default();
        Err(Error::new(format!(
            "POST messages answered {status}: {}",
            client::clip(&body, 200)
        )))
    }
}

/// One session of a gated round: the node its turn is sent to, whether the sending WebSocket (on that node)
/// also reads the turn, and the nodes of further subscribers.
#[derive(Debug, Clone)]
struct StreamPlan {
    exec: usize,
    sender_ws: bool,
    watchers: Vec<usize>,
}

/// One subscriber's turn: whether it was on the executing node, and what it got.
struct Observed {
    same_node: bool,
    /// The session (index into the round's ids) and the node of the subscriber (`None`: not a subscriber).
    at: Option<(usize, usize)>,
    outcome: TurnOutcome,
}

struct Round {
    ids: Vec<String>,
    observed: Vec<Observed>,
    gate_us: u64,
    wall: Duration,
    cpu: CpuUse,
}

/// Creates one session per plan on its executing node, connects the sending WebSockets and the watchers, then
/// (CPU snapshot) sends `content` on each, the i-th after `stagger * i / n`, and waits for every subscriber
/// to see its turn end (CPU snapshot).
async fn gated_round(
    http: &reqwest::Client,
    targets: &[Target],
    meter: &Meter,
    plans: &[StreamPlan],
    content: &str,
    stagger: Duration,
    turn_limit: Duration,
) -> Result<Round> {
    let n = plans.len();
    let ids: Vec<String> = futures_util::stream::iter(plans.iter())
        .map(|p| client::create_session(http, &targets[p.exec]))
        .buffered(CREATE_CONCURRENCY)
        .try_collect()
        .await?;
    // Every WebSocket to open: (session index, node, is the sender).
    let mut wanted: Vec<(usize, usize, bool)> = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        if p.sender_ws {
            wanted.push((i, p.exec, true));
        }
        for &w in &p.watchers {
            wanted.push((i, w, false));
        }
    }
    let sockets: Vec<Ws> = futures_util::stream::iter(wanted.iter())
        .map(|&(i, node, _)| {
            let target = &targets[node];
            let id = &ids[i];
            async move { client::connect(target, id, None).await.map(|(ws, _)| ws) }
        })
        .buffered(CONNECT_CONCURRENCY)
        .try_collect()
        .await?;
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let limit = turn_limit + stagger;
    let mut handles = Vec::with_capacity(sockets.len() + n);
    for (&(i, node, is_sender), mut ws) in wanted.iter().zip(sockets) {
        let mut gate = gate_rx.clone();
        let content = content.to_string();
        let offset = stagger.mul_f64(i as f64 / n as f64);
        let same_node = node == plans[i].exec;
        handles.push(tokio::spawn(async move {
            let _ = gate.wait_for(|open| *open).await;
            let outcome = if is_sender {
                if !offset.is_zero() {
                    tokio::time::sleep(offset).await;
                }
                client::run_turn(&mut ws, Dialect::Native, &content, turn_limit).await
            } else {
                read_turn(&mut ws, now_micros() + offset.as_micros() as u64, limit).await
            };
            (
                Some(Observed {
                    same_node,
                    at: Some((i, node)),
                    outcome,
                }),
                Some(ws),
            )
        }));
    }
    // Turns of sessions without a sending WebSocket go over REST.
    for (i, p) in plans.iter().enumerate() {
        if p.sender_ws {
            continue;
        }
        let mut gate = gate_rx.clone();
        let http = http.clone();
        let target = targets[p.exec].clone();
        let id = ids[i].clone();
        let content = content.to_string();
        let offset = stagger.mul_f64(i as f64 / n as f64);
        handles.push(tokio::spawn(async move {
            let _ = gate.wait_for(|open| *open).await;
            if !offset.is_zero() {
                tokio::time::sleep(offset).await;
            }
            match send_rest(&http, &target, &id, &content).await {
                Ok(()) => (None, None),
                Err(e) => (
                    Some(Observed {
                        same_node: true,
                        at: None,
                        outcome: TurnOutcome {
                            problem: Some(format!("sending over REST: {e}")),
                            ..Default::default()
                        },
                    }),
                    None,
                ),
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = meter.snapshot();
    let t0 = Instant::now();
    let gate_us = now_micros();
    gate_tx.send_replace(true);
    let mut observed = Vec::new();
    let mut open = Vec::new();
    for joined in futures_util::future::join_all(handles).await {
        match joined {
            Ok((obs, ws)) => {
                observed.extend(obs);
                open.extend(ws);
            }
            Err(e) => observed.push(Observed {
                same_node: true,
                at: None,
                outcome: TurnOutcome {
                    problem: Some(format!("client task: {e}")),
                    ..Default::default()
                },
            }),
        }
    }
    let wall = t0.elapsed();
    let after = meter.snapshot();
    client::close_all(open).await;
    Ok(Round {
        ids,
        observed,
        gate_us,
        wall,
        cpu: CpuUse::between(&before, &after),
    })
}

#[derive(Debug, Clone, Copy)]
struct LatencySpec {
    streams: usize,
    tokens: u32,
    delay_ms: u64,
    stagger: Duration,
    /// `None`: one node, the sender's WebSocket is the only subscriber.
    subscribers: Option<Subscribers>,
}

/// Which subscribers a session of the latency measurement has (turns always executing on node 0).
fn latency_plan(i: usize, subscribers: Option<Subscribers>) -> StreamPlan {
    match subscribers {
        None => StreamPlan {
            exec: 0,
            sender_ws: true,
            watchers: Vec::new(),
        },
        Some(Subscribers::Both) => StreamPlan {
            exec: 0,
            sender_ws: true,
            watchers: vec![1],
        },
        Some(Subscribers::Split) => StreamPlan {
            exec: 0,
            sender_ws: false,
            watchers: vec![i % 2],
        },
    }
}

async fn latency(
    http: &reqwest::Client,
    targets: &[Target],
    meter: &Meter,
    spec: LatencySpec,
) -> Result<LatencyFigures> {
    let content = format!("latency tokens={} delay_ms={}", spec.tokens, spec.delay_ms);
    let plans: Vec<StreamPlan> = (0..spec.streams)
        .map(|i| latency_plan(i, spec.subscribers))
        .collect();
    let turn_limit =
        Duration::from_secs(30) + Duration::from_millis(spec.delay_ms * u64::from(spec.tokens));
    let round = gated_round(
        http,
        targets,
        meter,
        &plans,
        &content,
        spec.stagger,
        turn_limit,
    )
    .await?;
    let steady_from = round.gate_us
        + u64::try_from(spec.stagger.as_micros()).unwrap_or(u64::MAX / 4)
        + spec.delay_ms * 1000;
    let mut f = LatencyFigures {
        nodes: targets.len(),
        streams: spec.streams,
        subscribers: spec.subscribers,
        wall_s: round.wall.as_secs_f64(),
        ..Default::default()
    };
    let (mut same, mut other, mut same_steady, mut other_steady) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut same_secs, mut other_secs): (Vec<Vec<u32>>, Vec<Vec<u32>>) = (Vec::new(), Vec::new());
    for obs in &round.observed {
        let o = &obs.outcome;
        let (all, steady) = if obs.same_node {
            f.same_subscribers += 1;
            (&mut same, &mut same_steady)
        } else {
            f.other_subscribers += 1;
            (&mut other, &mut other_steady)
        };
        let secs = if obs.same_node {
            &mut same_secs
        } else {
            &mut other_secs
        };
        for (l, e) in o.latencies_us.iter().zip(&o.emitted_us) {
            bucket_push(secs, e.saturating_sub(round.gate_us), *l);
        }
        all.extend_from_slice(&o.latencies_us);
        steady.extend(
            o.latencies_us
                .iter()
                .zip(&o.emitted_us)
                .filter(|(_, e)| **e >= steady_from)
                .map(|(l, _)| *l),
        );
        f.tokens += u64::from(o.tokens);
        f.expected_tokens += u64::from(spec.tokens);
        if !(o.ok && o.tokens == spec.tokens) {
            f.bad_subscribers += 1;
            f.first_problem.get_or_insert_with(|| {
                o.problem
                    .clone()
                    .unwrap_or_else(|| format!("{} of {} tokens", o.tokens, spec.tokens))
            });
        }
    }
    f.same = percentiles(&mut same);
    f.other = percentiles(&mut other);
    f.same_steady = percentiles(&mut same_steady);
    f.other_steady = percentiles(&mut other_steady);
    f.same_by_second = by_second(&mut same_secs);
    f.other_by_second = by_second(&mut other_secs);
    f.goal = goal_check(&f.same, &f.other, GOAL_FACTOR);
    f.goal_steady = goal_check(&f.same_steady, &f.other_steady, GOAL_FACTOR);
    // Subscribers that never saw their turn end: does the node they were on have the whole turn in its log?
    // A fresh WebSocket there with `after=0` replays the session from the store.
    let stuck: Vec<(usize, usize, u32)> = round
        .observed
        .iter()
        .filter(|o| !(o.outcome.ok && o.outcome.tokens == spec.tokens))
        .filter_map(|o| o.at.map(|(i, node)| (i, node, o.outcome.tokens)))
        .take(5)
        .collect();
    for (i, node, live_tokens) in stuck {
        let sid = &round.ids[i];
        let replay = async {
            let (mut ws, _) = client::connect(&targets[node], sid, Some(0)).await?;
            let out = read_turn(&mut ws, now_micros(), Duration::from_secs(10)).await;
            client::close_all(vec![ws]).await;
            Ok::<_, Error>(out)
        }
        .await;
        f.rechecks.push(match replay {
            Ok(out) => format!(
                "session {sid} (subscriber on {}, got {live_tokens} of {} tokens live and no end): a new WebSocket there with after=0 replayed {} tokens, {}",
                targets[node].label,
                spec.tokens,
                out.tokens,
                if out.ok {
                    "and the run's end (run_finished completed): the log has the whole turn".to_string()
                } else {
                    format!("no complete end ({})", out.problem.unwrap_or_default())
                }
            ),
            Err(e) => format!("session {sid}: replay failed: {e}"),
        });
    }
    let run_tokens = spec.streams as u64 * u64::from(spec.tokens);
    f.store_cpu_ms_per_1k_run_tokens = ms_per_1k(round.cpu.store_s(), run_tokens);
    f.cpu = round.cpu;
    Ok(f)
}

#[derive(Debug, Clone, Copy)]
struct ThroughputSpec {
    sessions: usize,
    tokens: u32,
    min_wall: Duration,
    max_rounds: u32,
}

/// Sessions' turns alternately on every node of `targets`, each read on its node, rounds repeated until
/// `min_wall` (the throughput scenario's load).
async fn throughput(
    http: &reqwest::Client,
    targets: &[Target],
    meter: &Meter,
    spec: ThroughputSpec,
) -> Result<ThroughputFigures> {
    let content = format!("throughput tokens={} delay_ms=0", spec.tokens);
    let plans: Vec<StreamPlan> = (0..spec.sessions)
        .map(|i| StreamPlan {
            exec: i % targets.len(),
            sender_ws: true,
            watchers: Vec::new(),
        })
        .collect();
    let mut f = ThroughputFigures {
        nodes: targets.len(),
        sessions: spec.sessions,
        tokens_per_reply: spec.tokens,
        ..Default::default()
    };
    let mut cpu = CpuUse::default();
    let mut wall = 0.0;
    while f.rounds < spec.max_rounds.max(1) && (f.rounds == 0 || wall < spec.min_wall.as_secs_f64())
    {
        let round = gated_round(
            http,
            targets,
            meter,
            &plans,
            &content,
            Duration::ZERO,
            Duration::from_secs(180),
        )
        .await?;
        f.rounds += 1;
        wall += round.wall.as_secs_f64();
        cpu.add(&round.cpu);
        f.expected_tokens += spec.sessions as u64 * u64::from(spec.tokens);
        for obs in &round.observed {
            let o = &obs.outcome;
            f.tokens += u64::from(o.tokens);
            if !(o.ok && o.tokens == spec.tokens) {
                f.bad_sessions += 1;
                f.first_problem.get_or_insert_with(|| {
                    o.problem
                        .clone()
                        .unwrap_or_else(|| format!("{} of {} tokens", o.tokens, spec.tokens))
                });
            }
        }
    }
    f.wall_s = wall;
    if wall > 0.0 {
        f.tokens_per_s = f.tokens as f64 / wall;
        f.node_cores = cpu.nodes_s.iter().map(|c| c / wall).collect();
        f.pg_cores = cpu.pg_s / wall;
        f.mock_cores = cpu.mock_s / wall;
        f.loadgen_cores = cpu.loadgen_s / wall;
    }
    f.store_cpu_ms_per_1k = ms_per_1k(cpu.store_s(), f.tokens);
    f.agentd_cpu_ms_per_1k = ms_per_1k(cpu.nodes_s.iter().sum(), f.tokens);
    f.pg_cpu_ms_per_1k = ms_per_1k(cpu.pg_s, f.tokens);
    f.cpu = cpu;
    Ok(f)
}

fn summary_line(r: &RunFigures) -> String {
    let mut parts = Vec::new();
    if let Some(l) = &r.latency {
        parts.push(format!(
            "latency p50/p99 same {:.2}/{:.2} ms, other {:.2}/{:.2} ms (×{:.2}/×{:.2}, goal {})",
            l.same.p50_ms,
            l.same.p99_ms,
            l.other.p50_ms,
            l.other.p99_ms,
            l.goal.p50_ratio,
            l.goal.p99_ratio,
            if l.goal.met { "met" } else { "not met" }
        ));
    }
    for c in &r.throughput {
        if let (Some(two), Some(one)) = (&c.two, &c.one) {
            parts.push(format!(
                "{} sessions: {:.0} vs {:.0} tokens/s, {:.1} vs {:.1} ms/1k",
                c.sessions,
                two.tokens_per_s,
                one.tokens_per_s,
                two.store_cpu_ms_per_1k,
                one.store_cpu_ms_per_1k
            ));
        }
    }
    parts.extend(r.problems.iter().cloned());
    parts.join("; ")
}

/// A number for the tables: three significant digits, thousands separated.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_string();
    }
    let a = v.abs();
    let s = if a >= 1000.0 {
        let whole = format!("{:.0}", a);
        let mut out = String::new();
        for (i, c) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if a >= 100.0 {
        format!("{a:.0}")
    } else if a >= 10.0 {
        format!("{a:.1}")
    } else {
        format!("{a:.2}")
    };
    if v < 0.0 {
        format!("-{s}")
    } else {
        s
    }
}

fn pct(p: &Percentiles) -> String {
    if p.count == 0 {
        return "none".to_string();
    }
    format!(
        "{} / {} / {} / {}",
        num(p.p50_ms),
        num(p.p90_ms),
        num(p.p99_ms),
        num(p.max_ms)
    )
}

fn spread_text(s: &Spread, unit: &str) -> String {
    if s.n == 0 {
        return "–".to_string();
    }
    format!(
        "{}{unit} (min {}, max {}; {} runs)",
        num(s.median),
        num(s.min),
        num(s.max),
        s.n
    )
}

/// The report as markdown.
pub fn markdown(r: &ClusterReport) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "# Two agentd nodes on one PostgreSQL (issue #15)\n");
    let _ = writeln!(
        md,
        "Run {} ({:.0} s). Machine: {}, {} CPUs, {:.1} GiB RAM, Linux {}.  ",
        r.started,
        r.duration_s,
        r.machine.cpu_model,
        r.machine.cpus,
        r.machine.mem_gib,
        r.machine.kernel
    );
    let _ = writeln!(md, "Command: `{}`  ", r.command);
    let _ = writeln!(md, "agentd built from: {}\n", r.commit);
    if let Some(s) = &r.settings {
        let subs = match s.subscribers {
            Subscribers::Both => "both: every session has a same-node subscriber (the WebSocket on A that sent the turn) and an other-node subscriber (a WebSocket on B)",
            Subscribers::Split => "split: one subscriber per session, alternately on A and B; turns sent with POST /v1/sessions/{id}/messages on A",
        };
        let _ = writeln!(
            md,
            "Settings: latency {} streams × {} tokens, one every {} ms (20 tokens/s), starts spread over {} ms, every turn executing on node A; subscribers {subs}. Throughput {} sessions × {} tokens, no delay, rounds repeated for at least {} ms (as `agentd-bench run`), turns alternately on A and B and read on the executing node, against the same on one node alone. Lease: {}. Settle {} ms after both nodes were up, then until a turn on each node streamed whole to the other. {}\n",
            s.streams,
            s.latency_tokens,
            s.latency_delay_ms,
            s.latency_stagger_ms,
            s.throughput_sessions
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" / "),
            s.throughput_tokens,
            s.throughput_min_wall_ms,
            s.lease_s
                .map(|l| format!("lease_s = {l}"))
                .unwrap_or_else(|| "the server's default".to_string()),
            s.settle_ms,
            if s.pinned {
                "Both nodes pinned to CPU 0 (the one node too), mock and load generator to CPU 1; PostgreSQL unpinned."
            } else {
                "Not pinned."
            }
        );
    }

    let _ = writeln!(
        md,
        "## Latency at {} streams: subscriber on the other node vs the same node\n",
        r.settings.as_ref().map(|s| s.streams).unwrap_or(0)
    );
    let _ = writeln!(
        md,
        "Added latency (receive time − the mock's emit time), ms, p50 / p90 / p99 / max.\n"
    );
    let _ = writeln!(md, "| run | load avg before | same node (A) | other node (B) | ratio p50 / p99 | goal ≤ 2× | steady state: same / other p99, ratio p50 / p99 | one node alone | bad subscribers |");
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for run in &r.runs {
        let load = format!(
            "{:.2} (others {:.0}%)",
            run.load_before[0],
            run.others_share * 100.0
        );
        let one = run
            .latency_one_node
            .as_ref()
            .map(|l| pct(&l.same))
            .unwrap_or_else(|| "–".into());
        match &run.latency {
            Some(l) => {
                let _ = writeln!(
                    md,
                    "| {} | {load} | {} | {} | {} / {} | {} | {} / {}, {} / {} | {one} | {} |",
                    run.index,
                    pct(&l.same),
                    pct(&l.other),
                    num(l.goal.p50_ratio),
                    num(l.goal.p99_ratio),
                    if l.goal.met { "yes" } else { "**no**" },
                    num(l.same_steady.p99_ms),
                    num(l.other_steady.p99_ms),
                    num(l.goal_steady.p50_ratio),
                    num(l.goal_steady.p99_ratio),
                    l.bad_subscribers
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| {} | {load} | not measured | | | | | {one} | |",
                    run.index
                );
            }
        }
    }
    let lat: Vec<&LatencyFigures> = r.runs.iter().filter_map(|x| x.latency.as_ref()).collect();
    if !lat.is_empty() {
        let col =
            |f: fn(&LatencyFigures) -> f64| spread(&lat.iter().map(|l| f(l)).collect::<Vec<_>>());
        let met = lat.iter().filter(|l| l.goal.met).count();
        let _ = writeln!(md);
        let _ = writeln!(md, "Over the runs (median, min, max): same-node p50 {}, p99 {}; other-node p50 {}, p99 {}; ratio p50 {}, p99 {}. Goal (other-node p50 and p99 ≤ 2× same-node) met in {met} of {} runs.",
            spread_text(&col(|l| l.same.p50_ms), " ms"),
            spread_text(&col(|l| l.same.p99_ms), " ms"),
            spread_text(&col(|l| l.other.p50_ms), " ms"),
            spread_text(&col(|l| l.other.p99_ms), " ms"),
            spread_text(&col(|l| l.goal.p50_ratio), "×"),
            spread_text(&col(|l| l.goal.p99_ratio), "×"),
            lat.len());
        let cores: Vec<String> = lat
            .iter()
            .map(|l| {
                format!(
                    "A {:.2} / B {:.2} / PostgreSQL {:.2}",
                    l.cpu.nodes_s.first().copied().unwrap_or(0.0) / l.wall_s.max(1e-9),
                    l.cpu.nodes_s.get(1).copied().unwrap_or(0.0) / l.wall_s.max(1e-9),
                    l.cpu.pg_s / l.wall_s.max(1e-9)
                )
            })
            .collect();
        let _ = writeln!(
            md,
            "Cores busy during the latency window, per run: {}.",
            cores.join("; ")
        );
        let _ = writeln!(md, "\nAdded latency p50 / p99 (ms) by the second of the window the token was emitted in (0 = the first second after the gate opened):\n");
        for run in &r.runs {
            if let Some(l) = &run.latency {
                let fmt = |v: &[(f64, f64)]| {
                    v.iter()
                        .map(|(a, b)| format!("{} / {}", num(*a), num(*b)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(
                    md,
                    "- run {}: same node {}; other node {}",
                    run.index,
                    fmt(&l.same_by_second),
                    fmt(&l.other_by_second)
                );
            }
        }
        for run in &r.runs {
            for (what, l) in [
                ("two nodes", &run.latency),
                ("one node", &run.latency_one_node),
            ] {
                let Some(l) = l else { continue };
                if l.bad_subscribers == 0 {
                    continue;
                }
                let _ = writeln!(
                    md,
                    "\n**Run {}, {what}: {} subscribers did not see their turn end** ({} of {} tokens delivered in all); the first problem: {}.",
                    run.index,
                    l.bad_subscribers,
                    l.tokens,
                    l.expected_tokens,
                    l.first_problem.clone().unwrap_or_default()
                );
                for c in &l.rechecks {
                    let _ = writeln!(md, "- {c}");
                }
            }
        }
    }

    let _ = writeln!(md, "\n## Throughput: two nodes vs one\n");
    let _ = writeln!(md, "Tokens delivered per second; CPU ms per 1,000 tokens of the whole store (every agentd process + PostgreSQL's CPU for the database), with agentd's and PostgreSQL's parts; cores busy.\n");
    let _ = writeln!(md, "| run | sessions | tokens/s: two nodes / one | ratio | store CPU ms / 1k tokens: two / one (agentd + PostgreSQL) | ratio | cores, two nodes: A / B / PostgreSQL | cores, one node: node / PostgreSQL | bad turns |");
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for run in &r.runs {
        for c in &run.throughput {
            let (Some(two), Some(one)) = (&c.two, &c.one) else {
                let _ = writeln!(
                    md,
                    "| {} | {} | not measured | | | | | | |",
                    run.index, c.sessions
                );
                continue;
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} / {} | {}× | {} ({} + {}) / {} ({} + {}) | {}× | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} | {} / {} |",
                run.index,
                c.sessions,
                num(two.tokens_per_s),
                num(one.tokens_per_s),
                num(c.tokens_per_s_ratio.unwrap_or(f64::NAN)),
                num(two.store_cpu_ms_per_1k),
                num(two.agentd_cpu_ms_per_1k),
                num(two.pg_cpu_ms_per_1k),
                num(one.store_cpu_ms_per_1k),
                num(one.agentd_cpu_ms_per_1k),
                num(one.pg_cpu_ms_per_1k),
                num(c.cpu_ratio.unwrap_or(f64::NAN)),
                two.node_cores.first().copied().unwrap_or(0.0),
                two.node_cores.get(1).copied().unwrap_or(0.0),
                two.pg_cores,
                one.node_cores.first().copied().unwrap_or(0.0),
                one.pg_cores,
                two.bad_sessions,
                one.bad_sessions
            );
        }
    }
    let levels: Vec<usize> = r
        .settings
        .as_ref()
        .map(|s| s.throughput_sessions.clone())
        .unwrap_or_default();
    if !r.runs.is_empty() {
        let _ = writeln!(md);
    }
    for n in levels {
        let comps: Vec<&Comparison> = r
            .runs
            .iter()
            .flat_map(|x| x.throughput.iter())
            .filter(|c| c.sessions == n && c.two.is_some() && c.one.is_some())
            .collect();
        if comps.is_empty() {
            continue;
        }
        let get = |f: &dyn Fn(&Comparison) -> f64| {
            spread(&comps.iter().map(|c| f(c)).collect::<Vec<_>>())
        };
        let _ = writeln!(
            md,
            "- {n} sessions over the runs: tokens/s two nodes {}, one node {}, ratio {}; store CPU per 1,000 tokens two nodes {}, one node {}, ratio {}.",
            spread_text(&get(&|c| c.two.as_ref().map_or(f64::NAN, |t| t.tokens_per_s)), ""),
            spread_text(&get(&|c| c.one.as_ref().map_or(f64::NAN, |t| t.tokens_per_s)), ""),
            spread_text(&get(&|c| c.tokens_per_s_ratio.unwrap_or(f64::NAN)), "×"),
            spread_text(&get(&|c| c.two.as_ref().map_or(f64::NAN, |t| t.store_cpu_ms_per_1k)), " ms"),
            spread_text(&get(&|c| c.one.as_ref().map_or(f64::NAN, |t| t.store_cpu_ms_per_1k)), " ms"),
            spread_text(&get(&|c| c.cpu_ratio.unwrap_or(f64::NAN)), "×"),
        );
    }

    let _ = writeln!(md, "\n## Notes\n");
    for run in &r.runs {
        let _ = writeln!(
            md,
            "- Run {}: started {}, load average {:.2} / {:.2} / {:.2} before and {:.2} / {:.2} / {:.2} after; other processes (PostgreSQL included, it is not the harness's child) used {:.0}% of the machine; {} first; nodes streamed each other's runs {} after both were up.{}{}",
            run.index,
            run.started,
            run.load_before[0],
            run.load_before[1],
            run.load_before[2],
            run.load_after[0],
            run.load_after[1],
            run.load_after[2],
            run.others_share * 100.0,
            if run.cluster_first { "two nodes" } else { "one node" },
            run.cross_node_ready_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_else(|| "never".into()),
            if run.problems.is_empty() {
                String::new()
            } else {
                format!(" Problems: {}", run.problems.join("; "))
            },
            if run.cross_node_failures.is_empty() {
                String::new()
            } else {
                format!(
                    " Cross-node checks that failed first: {}.",
                    run.cross_node_failures.join("; ")
                )
            }
        );
    }
    if !r.pg_settings.is_empty() {
        let list: Vec<String> = r
            .pg_settings
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        let _ = writeln!(md, "- PostgreSQL: {}.", list.join(", "));
    }
    for n in &r.notes {
        let _ = writeln!(md, "- {n}");
    }
    let _ = writeln!(md, "- The single-node figures of `agentd-bench run` (BENCHMARKS.md, \"agentd on PostgreSQL\") are measured the same way (same token sizes, same CPU accounting); the one-node column here is that measurement repeated in the same run as the two nodes.");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_in_ms() {
        let mut v: Vec<u32> = (1..=1000).rev().map(|x| x * 10).collect();
        let p = percentiles(&mut v);
        assert_eq!(p.count, 1000);
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (5.0, 9.0, 9.9, 10.0)
        );
        assert_eq!(percentiles(&mut []), Percentiles::default());
    }

    #[test]
    fn goal_needs_both_ratios_within_the_factor() {
        let p = |p50: f64, p99: f64| Percentiles {
            count: 10,
            p50_ms: p50,
            p90_ms: p99,
            p99_ms: p99,
            max_ms: p99,
        };
        let g = goal_check(&p(1.0, 4.0), &p(2.0, 8.0), GOAL_FACTOR);
        assert!(g.met);
        assert_eq!((g.p50_ratio, g.p99_ratio), (2.0, 2.0));
        assert!(!goal_check(&p(1.0, 4.0), &p(2.1, 5.0), GOAL_FACTOR).met);
        assert!(!goal_check(&p(1.0, 4.0), &p(1.0, 8.5), GOAL_FACTOR).met);
        // No other-node sample: not met, whatever the ratios say.
        let none = Percentiles::default();
        assert!(!goal_check(&p(1.0, 4.0), &none, GOAL_FACTOR).met);
        // A zero same-node figure: infinite ratio unless the other is zero too.
        assert_eq!(ratio(1.0, 0.0), f64::INFINITY);
        assert_eq!(ratio(0.0, 0.0), 1.0);
        assert!(!goal_check(&p(0.0, 4.0), &p(0.5, 4.0), GOAL_FACTOR).met);
    }

    #[test]
    fn spread_is_min_median_max_of_finite_values() {
        let s = spread(&[3.0, f64::NAN, 1.0, 2.0, f64::INFINITY]);
        assert_eq!((s.n, s.min, s.median, s.max), (3, 1.0, 2.0, 3.0));
        let s = spread(&[4.0, 1.0]);
        assert_eq!((s.median, s.max), (1.0, 4.0));
        assert_eq!(spread(&[]).n, 0);
    }

    #[test]
    fn cpu_per_thousand_tokens() {
        assert_eq!(ms_per_1k(0.5, 20_000), 25.0);
        assert_eq!(ms_per_1k(1.0, 0), 0.0);
        let mut a = CpuUse {
            nodes_s: vec![1.0],
            pg_s: 0.5,
            ..Default::default()
        };
        a.add(&CpuUse {
            nodes_s: vec![1.0, 2.0],
            pg_s: 0.5,
            mock_s: 0.1,
            loadgen_s: 0.2,
        });
        assert_eq!(a.nodes_s, vec![2.0, 2.0]);
        assert_eq!(a.store_s(), 5.0);
        let mut c = Comparison {
            sessions: 10,
            two: Some(ThroughputFigures {
                tokens_per_s: 900.0,
                store_cpu_ms_per_1k: 30.0,
                ..Default::default()
            }),
            one: Some(ThroughputFigures {
                tokens_per_s: 1000.0,
                store_cpu_ms_per_1k: 25.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        c.finish();
        assert_eq!(c.tokens_per_s_ratio, Some(0.9));
        assert_eq!(c.cpu_ratio, Some(1.2));
    }

    #[test]
    fn node_config_names_the_node_on_the_shared_store() {
        let text = node_config(
            8081,
            "http://127.0.0.1:9000/v1",
            "postgres://p@h:5432/db",
            "b",
            None,
        );
        assert!(text.contains("listen = \"127.0.0.1:8081\""));
        assert!(text.contains("url = \"postgres://p@h:5432/db\""));
        assert!(text.ends_with("\n[cluster]\nnode_id = \"b\"\n"), "{text}");
        assert!(!text.contains("lease_s"));
        let text = node_config(1, "u", "postgres://x", "a", Some(6));
        assert!(
            text.ends_with("[cluster]\nnode_id = \"a\"\nlease_s = 6\n"),
            "{text}"
        );
        // `[cluster]` comes once, after every other table.
        assert_eq!(text.matches("[cluster]").count(), 1);
        assert!(text.find("[cluster]") > text.find("[[agents]]"));
    }

    #[test]
    fn latency_plans_put_subscribers_where_asked() {
        let both = latency_plan(3, Some(Subscribers::Both));
        assert_eq!(
            (both.exec, both.sender_ws, both.watchers),
            (0, true, vec![1])
        );
        let split: Vec<Vec<usize>> = (0..4)
            .map(|i| latency_plan(i, Some(Subscribers::Split)).watchers)
            .collect();
        assert_eq!(split, vec![vec![0], vec![1], vec![0], vec![1]]);
        assert!(!latency_plan(0, Some(Subscribers::Split)).sender_ws);
        let one = latency_plan(0, None);
        assert!(one.sender_ws && one.watchers.is_empty());
    }

    #[test]
    fn latency_by_second_buckets() {
        let mut b = Vec::new();
        bucket_push(&mut b, 10, 1000);
        bucket_push(&mut b, 999_999, 3000);
        bucket_push(&mut b, 2_500_000, 7000);
        assert_eq!(b.len(), 3);
        assert_eq!(by_second(&mut b), vec![(1.0, 3.0), (0.0, 0.0), (7.0, 7.0)]);
    }

    #[test]
    fn loadavg_and_numbers() {
        assert_eq!(
            parse_loadavg("0.69 0.22 0.26 3/187 30855\n"),
            [0.69, 0.22, 0.26]
        );
        assert_eq!(parse_loadavg(""), [0.0; 3]);
        assert_eq!(num(26_219.4), "26,219");
        assert_eq!(num(123.4), "123");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(f64::INFINITY), "–");
    }

    #[test]
    fn the_report_renders_a_run() {
        let same = Percentiles {
            count: 100,
            p50_ms: 1.0,
            p90_ms: 2.0,
            p99_ms: 4.0,
            max_ms: 9.0,
        };
        let other = Percentiles {
            p50_ms: 3.0,
            ..same
        };
        let mut comp = Comparison {
            sessions: 10,
            two: Some(ThroughputFigures {
                tokens_per_s: 20_000.0,
                node_cores: vec![0.4, 0.4],
                ..Default::default()
            }),
            one: Some(ThroughputFigures {
                tokens_per_s: 25_000.0,
                node_cores: vec![0.9],
                ..Default::default()
            }),
            ..Default::default()
        };
        comp.finish();
        let report = ClusterReport {
            settings: Some(Settings {
                streams: 200,
                latency_tokens: 100,
                latency_delay_ms: 50,
                latency_stagger_ms: 1000,
                subscribers: Subscribers::Both,
                throughput_sessions: vec![10],
                throughput_tokens: 200,
                throughput_min_wall_ms: 2000,
                throughput_max_rounds: 200,
                lease_s: None,
                settle_ms: 1500,
                pinned: true,
            }),
            runs: vec![RunFigures {
                index: 1,
                latency: Some(LatencyFigures {
                    same,
                    other,
                    goal: goal_check(&same, &other, GOAL_FACTOR),
                    ..Default::default()
                }),
                throughput: vec![comp],
                ..Default::default()
            }],
            ..Default::default()
        };
        let md = markdown(&report);
        assert!(md.contains("| 1 | 0.00 (others 0%) | 1.00 / 2.00 / 4.00 / 9.00 | 3.00 / 2.00 / 4.00 / 9.00 | 3.00 / 1.00 | **no** |"), "{md}");
        assert!(md.contains("| 1 | 10 | 20,000 / 25,000 | 0.80× |"), "{md}");
        assert!(md.contains("Goal (other-node p50 and p99 ≤ 2× same-node) met in 0 of 1 runs."));
    }
}
