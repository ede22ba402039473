//! The `agentd-bench` command: `mock` serves the mock upstream, `run` runs the whole benchmark
//! (usually through `scripts/bench.sh`, documented in BENCHMARKS.md).

use std::path::PathBuf;
use std::process::ExitCode;

use agentd_bench::mock::{self, MockConfig};
use agentd_bench::orchestrate::{self, Options, Scenarios};
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
    /// Run every scenario against every server and write the results table and plot.
    Run(RunArgs),
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
    /// Where results.md, results.json and plot.png go (default: <repo>/bench-results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Cache for the peer's venv, the floor's build and logs (default: ~/.cache/agentd-bench).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Servers to run, comma-separated: peer, floor, agentd.
    #[arg(long, default_value = "peer,floor,agentd", value_delimiter = ',')]
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
                eprintln!("agentd-bench: unknown server {name:?} (peer, floor, agentd)");
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
        out_dir: args
            .out
            .clone()
            .unwrap_or_else(|| repo.join("bench-results")),
        servers,
        agentd_bin: args.agentd_bin.clone(),
        agentd_profile: profile,
        pin: !args.no_pin,
        doc: (!args.quick && !args.no_doc).then(|| repo.join("BENCHMARKS.md")),
        command,
        idle_connections: args.idle_connections,
        scenarios,
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
