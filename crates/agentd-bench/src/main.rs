//! The `agentd-bench` command: `mock` serves the mock upstream, `run` runs the whole benchmark (usually
//! through `scripts/bench.sh`), `soak` the soak (`scripts/soak.sh`); both are documented in BENCHMARKS.md.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use agentd_bench::client::{self, Dialect, Target};
use agentd_bench::mock::{self, MockConfig};
use agentd_bench::orchestrate::{self, Options, Scenarios};
use agentd_bench::scenario::{
    self, GrowParams, IdleParams, LatencyParams, Probe, ReattachParams, ThroughputParams,
};
use agentd_bench::servers::{Kind, Paths, Profile};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "agentd-bench",
    about = "Benchmarks agentd against the Python peer and the floor relay."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the mock OpenAI-compatible upstream; prints `listening on ADDR` once bound.
    Mock {
        /// Port on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// Tokens per reply unless the message says `tokens=N`.
        #[arg(long, default_value_t = 200)]
        tokens: u32,
        /// Delay before each token unless the message says `delay_ms=D`.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// CPU per token of agentd's OpenAI-compatible streams (/v1/chat/completions, /v1/responses) beside its
    /// native WebSocket, in one run against one agentd and the lean mock; prints a markdown table and writes
    /// it to OUT/surfaces.md.
    Surfaces {
        /// The agentd binary (a release build for figures that mean something).
        #[arg(long, default_value = "target/release/agentd")]
        agentd_bin: PathBuf,
        /// Concurrent streams per surface and round.
        #[arg(long, default_value_t = 50)]
        streams: usize,
        /// Tokens per turn.
        #[arg(long, default_value_t = 400)]
        tokens: u32,
        /// Rounds (each surface once per round, the order rotating).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    /// Run every scenario against every server and write the results table and plot.
    Run(RunArgs),
    /// Run one scenario against a server you started yourself (pointed at `agentd-bench mock`); prints
    /// the figures as JSON. For looking closer at one figure without the whole run.
    Probe(ProbeArgs),
    /// The embedded model: real turns through agentd's WebSocket against llama.cpp's llama-bench (same model,
    /// same threads), then N turns at once against llama-server --parallel N, in one run; prints markdown
    /// tables and writes them to bench-results/llama.md.
    Llama {
        /// The agentd binary (release build).
        #[arg(long, default_value = "target/release/agentd")]
        agentd_bin: PathBuf,
        /// The GGUF model.
        #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// Measured single turns (after one warm-up); 0 runs only the concurrent mode.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// llama-bench (default: built by scripts/bench-llama.sh into its cache).
        #[arg(long)]
        llama_bench: Option<PathBuf>,
        /// Turns at once in the concurrent mode (0 skips it).
        #[arg(long, default_value_t = 4)]
        concurrent: usize,
        /// Measured runs of the concurrent mode (after one warm-up).
        #[arg(long, default_value_t = 3)]
        concurrent_runs: usize,
        /// llama-server (default: beside llama-bench).
        #[arg(long)]
        llama_server: Option<PathBuf>,
        /// Where to write llama.md.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    /// A soak: sessions with reconnecting clients, cancels and `ask_human` against the real agentd, killed
    /// with SIGKILL and restarted every period; checks every client's stream against the log, every run for
    /// one `run_finished`, and the server's RSS (usually through `scripts/soak.sh`, see BENCHMARKS.md).
    Soak(agentd_bench::soak::SoakArgs),
    /// Two agentd nodes on one PostgreSQL database (issue #15): added latency of a subscriber on the other
    /// node than the run vs the same node, tokens/s and CPU per token of two nodes vs one (usually through
    /// `scripts/bench-cluster.sh`); writes bench-results/cluster/cluster.{md,json}.
    Cluster(agentd_bench::cluster::ClusterArgs),
    /// Re-render results.md and plot.png from a saved results.json (no measuring).
    Report {
        /// The results.json of an earlier run.
        results: PathBuf,
        /// Where to write (default: the folder of results.json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also rewrite the results section of this BENCHMARKS.md.
        #[arg(long)]
        doc: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DialectArg {
    Navi,
    Native,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScenarioArg {
    Throughput,
    Latency,
    Idle,
    Reattach,
    /// Each session takes `--turns` turns in a row: server CPU per turn as the sessions' histories grow.
    Grow,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// The server's HTTP base, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// The server's pid, for CPU and RSS (default: none; CPU figures are then zero).
    #[arg(long)]
    pid: Option<u32>,
    /// The mock's pid, for its CPU use.
    #[arg(long)]
    mock_pid: Option<u32>,
    /// Wire protocol.
    #[arg(long, value_enum, default_value = "navi")]
    dialect: DialectArg,
    /// Path that creates a session (default: /sessions for navi, /v1/sessions for native).
    #[arg(long)]
    create_path: Option<String>,
    /// JSON body for it (default: {} for navi, {"agent":"assistant"} for native).
    #[arg(long)]
    create_body: Option<String>,
    /// Scenario.
    #[arg(long, value_enum, default_value = "latency")]
    scenario: ScenarioArg,
    /// Sessions, streams, connections or clients.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Tokens per reply.
    #[arg(long, default_value_t = 100)]
    tokens: u32,
    /// Upstream delay before each token (latency and re-attach).
    #[arg(long, default_value_t = 50)]
    delay_ms: u64,
    /// Turns per session (grow).
    #[arg(long, default_value_t = 1000)]
    turns: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileArg {
    Release,
    Debug,
}

#[derive(clap::Args)]
struct RunArgs {
    /// CI-sized run (seconds, not minutes); the figures mean nothing, the exit status says the harness works.
    #[arg(long)]
    quick: bool,
    /// The agentd checkout.
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// The folder holding peer/ and floor/ (default: <repo>/../shared/bench).
    #[arg(long)]
    bench_dir: Option<PathBuf>,
    /// Where results.md, results.json and plot.png go (default: <repo>/bench-results, or
    /// <repo>/bench-results/tmp for --quick, so a smoke run never replaces the recorded figures).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Cache for the peer's venv, the floor's build and logs (default: ~/.cache/agentd-bench).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Servers to run, comma-separated: peer, floor, agentd, agentd-pg (agentd on a fresh PostgreSQL database
    /// of the server AGENTD_BENCH_PG names, default postgres://postgres@127.0.0.1:5432).
    #[arg(
        long,
        default_value = "peer,floor,agentd,agentd-pg",
        value_delimiter = ','
    )]
    servers: Vec<String>,
    /// Use this agentd binary instead of building one.
    #[arg(long)]
    agentd_bin: Option<PathBuf>,
    /// Profile to build agentd with (default: release, debug with --quick).
    #[arg(long, value_enum)]
    profile: Option<ProfileArg>,
    /// Do not pin servers to CPU 0 and the load to CPU 1.
    #[arg(long)]
    no_pin: bool,
    /// Do not update BENCHMARKS.md (full runs update its results section).
    #[arg(long)]
    no_doc: bool,
    /// Number of idle connections (default 10000, 100 with --quick).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Scenarios to run, comma-separated: idle, throughput, latency, reattach (default: all).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Add a column: agentd's native WebSocket with GET /metrics scraped every second while measured, beside
    /// the same without (CPU per token with and without metrics scraping, in one run).
    #[arg(long)]
    scrape_metrics: bool,
    /// With --scrape-metrics: measure the native column and its scraped twin this many times each per
    /// throughput and latency level, alternately (A B, B A, ...), and pool the rounds (default 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    metrics_rounds: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Mock {
            port,
            tokens,
            delay_ms,
        } => serve_mock(port, MockConfig { tokens, delay_ms }),
        Cmd::Run(args) => run(args),
        Cmd::Llama {
            agentd_bin,
            model,
            threads,
            runs,
            llama_bench,
            concurrent,
            concurrent_runs,
            llama_server,
            out,
        } => {
            let args = agentd_bench::llama::LlamaArgs {
                agentd_bin,
                model,
                threads,
                runs,
                llama_bench,
                concurrent,
                concurrent_runs,
                llama_server,
            };
            let Some(rt) = one_worker_runtime("llama") else {
                return ExitCode::FAILURE;
            };
            let root = std::env::current_dir().unwrap_or_default();
            match rt.block_on(agentd_bench::llama::run(&args, &root)) {
                Ok(report) => {
                    let md = report.markdown(args.threads);
                    println!("{md}");
                    let _ = std::fs::create_dir_all(&out);
                    if let Err(e) = std::fs::write(out.join("llama.md"), &md) {
                        eprintln!("agentd-bench llama: cannot write {}: {e}", out.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agentd-bench llama: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Surfaces {
            agentd_bin,
            streams,
            tokens,
            rounds,
            out,
        } => {
            let args = agentd_bench::surfaces::Args {
                agentd_bin,
                streams,
                tokens,
                rounds,
            };
            let Some(rt) = one_worker_runtime("surfaces") else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(agentd_bench::surfaces::run(&args)) {
                Ok(figures) => {
                    let md = agentd_bench::surfaces::table(&args, &figures);
                    println!("{md}");
                    let _ = std::fs::create_dir_all(&out);
                    if let Err(e) = std::fs::write(out.join("surfaces.md"), &md) {
                        eprintln!("agentd-bench surfaces: cannot write {}: {e}", out.display());
                    }
                    if figures.iter().any(|(_, f)| f.failed > 0 || f.tokens == 0) {
                        eprintln!("agentd-bench surfaces: some turns failed");
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agentd-bench surfaces: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Probe(args) => probe(args),
        Cmd::Soak(args) => agentd_bench::soak::main(args),
        Cmd::Cluster(args) => agentd_bench::cluster::main(args),
        Cmd::Report { results, out, doc } => {
            let out =
                out.unwrap_or_else(|| results.parent().map(PathBuf::from).unwrap_or_default());
            match orchestrate::rerender(&results, &out, doc) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentd-bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A runtime with one worker thread (the load generator shares the machine with the server it measures).
fn one_worker_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("agentd-bench {what}: {e}");
            None
        }
    }
}

fn serve_mock(port: u16, config: MockConfig) -> ExitCode {
    // One thread: the mock shares its CPU with the load generator, and a second thread would only contend.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd-bench mock: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("agentd-bench mock listening on {}", listener.local_addr()?);
        use std::io::Write as _;
        std::io::stdout().flush()?;
        mock::serve(listener, config).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentd-bench mock: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let mut servers = Vec::new();
    for name in &args.servers {
        match Kind::parse(name) {
            Some(k) if !servers.contains(&k) => servers.push(k),
            Some(_) => {}
            None => {
                eprintln!("agentd-bench: unknown server {name:?} (peer, floor, agentd, agentd-pg)");
                return ExitCode::from(2);
            }
        }
    }
    let scenarios = if args.scenarios.is_empty() {
        Scenarios::ALL
    } else {
        match Scenarios::parse(&args.scenarios) {
            Some(s) => s,
            None => {
                eprintln!(
                    "agentd-bench: unknown scenario in {:?} (idle, throughput, latency, reattach)",
                    args.scenarios
                );
                return ExitCode::from(2);
            }
        }
    };
    let repo = std::fs::canonicalize(&args.repo).unwrap_or(args.repo.clone());
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| home.join(".cache").join("agentd-bench"));
    let work = std::env::temp_dir().join(format!("agentd-bench-{}", std::process::id()));
    let paths = Paths {
        repo: repo.clone(),
        bench_dir: args
            .bench_dir
            .clone()
            .unwrap_or_else(|| repo.join("..").join("shared").join("bench")),
        logs: cache.join("logs"),
        cache,
        work: work.clone(),
    };
    let profile = match args.profile {
        Some(ProfileArg::Release) => Profile::Release,
        Some(ProfileArg::Debug) => Profile::Debug,
        None if args.quick => Profile::Debug,
        None => Profile::Release,
    };
    let command = std::env::var("AGENTD_BENCH_COMMAND").unwrap_or_else(|_| {
        let mut c = "scripts/bench.sh".to_string();
        if args.quick {
            c.push_str(" --quick");
        }
        c
    });
    let opts = Options {
        quick: args.quick,
        out_dir: args.out.clone().unwrap_or_else(|| {
            let recorded = repo.join("bench-results");
            if args.quick {
                recorded.join("tmp")
            } else {
                recorded
            }
        }),
        servers,
        agentd_bin: args.agentd_bin.clone(),
        agentd_profile: profile,
        pin: !args.no_pin,
        doc: (!args.quick && !args.no_doc).then(|| repo.join("BENCHMARKS.md")),
        command,
        idle_connections: args.idle_connections,
        scenarios,
        scrape_metrics: args.scrape_metrics,
        metrics_rounds: args.metrics_rounds,
        paths,
    };
    let result = orchestrate::run(opts);
    let _ = std::fs::remove_dir_all(&work);
    match result.and_then(|r| orchestrate::harness_check(&r, scenarios)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentd-bench: harness failure: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(args: ProbeArgs) -> ExitCode {
    let dialect = match args.dialect {
        DialectArg::Navi => Dialect::Navi,
        DialectArg::Native => Dialect::Native,
    };
    let mut target = match dialect {
        Dialect::Navi => Target::navi("probe", &args.url),
        Dialect::Native => Target::agentd("probe", &args.url, "assistant", Dialect::Native),
    };
    if let Some(path) = args.create_path {
        target.create_path = path;
    }
    if let Some(body) = args.create_body {
        match serde_json::from_str(&body) {
            Ok(v) => target.create_body = v,
            Err(e) => {
                eprintln!("agentd-bench: --create-body is not JSON: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let probe = Probe {
        server_pid: args.pid.unwrap_or(0),
        mock_pid: args.mock_pid,
        pg_database: None,
    };
    let limit =
        Duration::from_millis(args.delay_ms * u64::from(args.tokens)) + Duration::from_secs(120);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd-bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: agentd_bench::Result<serde_json::Value> = rt.block_on(async {
        let http = client::http_client()?;
        let value = match args.scenario {
            ScenarioArg::Throughput => serde_json::to_value(
                scenario::throughput(
                    &http,
                    &target,
                    probe,
                    ThroughputParams {
                        sessions: args.sessions,
                        tokens: args.tokens,
                        min_wall: Duration::from_secs(2),
                        max_rounds: 200,
                        turn_limit: limit,
                    },
                )
                .await?,
            )?,
            ScenarioArg::Latency => serde_json::to_value(
                scenario::latency(
                    &http,
                    &target,
                    probe,
                    LatencyParams {
                        sessions: args.sessions,
                        tokens: args.tokens,
                        delay_ms: args.delay_ms,
                        stagger: Duration::from_secs(1),
                        turn_limit: limit,
                    },
                )
                .await?,
            )?,
            ScenarioArg::Idle => serde_json::to_value(
                scenario::idle(
                    &http,
                    &target,
                    probe,
                    IdleParams {
                        connections: args.sessions,
                        settle_max: Duration::from_secs(5),
                    },
                )
                .await?,
            )?,
            ScenarioArg::Reattach => serde_json::to_value(
                scenario::reattach(
                    &http,
                    &target,
                    ReattachParams {
                        clients: args.sessions,
                        tokens: args.tokens,
                        delay_ms: args.delay_ms,
                        drop_after: args.tokens / 5,
                        gap: Duration::from_millis(200),
                        stagger: Duration::from_millis(500),
                        quiet_limit: Duration::from_secs(3),
                    },
                )
                .await?,
            )?,
            ScenarioArg::Grow => serde_json::to_value(
                scenario::grow(
                    &http,
                    &target,
                    probe,
                    GrowParams {
                        sessions: args.sessions,
                        turns: args.turns,
                        tokens: args.tokens,
                        turn_limit: limit,
                    },
                )
                .await?,
            )?,
        };
        Ok(value)
    });
    match result {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
