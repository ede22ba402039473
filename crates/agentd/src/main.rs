//! The `agentd` command line: `serve`, `chat`, `check-config` (SPEC.md section 1).

use std::path::PathBuf;
use std::process::ExitCode;

use agentd_core::config::Config;
use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a streamed token's event is a few small blocks allocated on the
/// runtime thread and freed on the SQLite writer's, and glibc's malloc and free were about a tenth of the
/// server's CPU per token (BENCHMARKS.md, "Streaming CPU per token").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "agentd",
    version,
    about = "A self-hosted server that hosts LLM agents behind a chat API."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server. With no config: the built-in default (local model, SQLite under ./data, 127.0.0.1:8080).
    Serve {
        /// The TOML config file.
        #[arg(long, env = "AGENTD_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Listen on this address instead of `server.listen` (e.g. 127.0.0.1:9090 or localhost:9090; port 0 picks one).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Chat with an agent in the terminal over the native WebSocket (/help lists its commands). Piped input:
    /// one line per turn, a pending question takes the next line; exit 1 if a run did not complete.
    Chat {
        /// The server's http base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The agent for a new session (default: the server's first agent).
        #[arg(long)]
        agent: Option<String>,
        /// Resume this session instead of starting a new one.
        #[arg(long)]
        session: Option<String>,
        /// API key, when the server has auth on.
        #[arg(long, env = "AGENTD_API_KEY")]
        api_key: Option<String>,
    },
    /// Validate a config file: print each problem with its line and key; exit 1 if there is any. An unset
    /// `*_env` variable is a warning (the file is right; `serve` needs the variable where it runs).
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
    /// Copy everything (sessions of every principal, messages, runs, the event log with its seqs, uploads) from
    /// one store into another, empty one, e.g. from SQLite to PostgreSQL; then check counts and every session's
    /// last seq. Stop the servers using either store first. Exit 1 if the target is not empty or the check fails.
    CopyStore {
        /// The store to copy, as `store.url` names it (sqlite://PATH, postgres://...).
        from_url: String,
        /// The empty store to copy into.
        to_url: String,
    },
}

/// `info`, but deadpool's line per broken pooled connection only at `error`: a database that goes away is
/// logged once by the store (and once when it is back), not once per connection.
const DEFAULT_LOG_FILTER: &str = "info,deadpool.postgres=error";

fn init_logging() {
    init_logging_at(DEFAULT_LOG_FILTER);
}

/// Logs to stderr at `RUST_LOG`'s level, or `default`.
fn init_logging_at(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if std::env::var("AGENTD_LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn read_config(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// The config `serve` runs with: every problem of the file or of the environment (an unset `*_env`
/// variable) stops it.
fn load_config(path: &PathBuf) -> Result<Config, String> {
    let text = read_config(path)?;
    Config::parse(&text, &path.display().to_string()).map_err(|e| e.to_string())
}

/// `check-config`: judges the file; what the environment lacks is a warning.
fn check_config(file: &PathBuf) -> ExitCode {
    let checked = read_config(file).and_then(|text| {
        Config::check(&text, &file.display().to_string()).map_err(|e| e.to_string())
    });
    match checked {
        Ok(checked) => {
            for w in &checked.environment {
                eprintln!(
                    "{}: warning: {w} (`agentd serve` refuses to start until it is set)",
                    file.display()
                );
            }
            let c = &checked.config;
            let warnings = match checked.environment.len() {
                0 => String::new(),
                1 => ", 1 warning".to_string(),
                n => format!(", {n} warnings"),
            };
            println!(
                "{}: ok ({} agents, {} providers, {} skills{warnings})",
                file.display(),
                c.agents.len(),
                c.providers.len(),
                c.skills.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::CopyStore { from_url, to_url } => copy_store(&from_url, &to_url),
        Command::Serve { config, listen } => {
            init_logging();
            let Some(runtime) = runtime(serve_runtime()) else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(serve(config, listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Chat {
            url,
            agent,
            session,
            api_key,
        } => {
            let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::FAILURE;
            };
            let code = runtime.block_on(agentd::chat::run(agentd::chat::ChatOptions {
                url,
                agent,
                session,
                api_key,
            }));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

/// Builds a runtime (all drivers on), or says on stderr why it cannot.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("agentd: cannot start the async runtime: {e}");
            None
        }
    }
}

/// `copy-store`: progress on stderr, the result on stdout; exit 1 on any failure, with one line saying why.
fn copy_store(from_url: &str, to_url: &str) -> ExitCode {
    init_logging_at("warn");
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(agentd::copy_store::run(from_url, to_url)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentd copy-store: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config_path: Option<PathBuf>, listen: Option<String>) -> Result<(), String> {
    let mut config = match &config_path {
        Some(p) => load_config(p)?,
        None => Config::builtin_default(),
    };
    if let Some(l) = listen {
        config.server.listen = l;
    }
    let agents: Vec<String> = config.agents.iter().map(|a| a.name.clone()).collect();
    // Listening for SIGTERM and SIGINT before the port opens: a signal that arrives as soon as it does (an
    // orchestrator stopping a node it just started) is never lost; one during start-up stops the server as
    // soon as it is up.
    let shutdown = shutdown_signal()?;
    // Bound first: a taken port fails before the store is created or migrated, and the node's name and its
    // registry entry carry the port it really serves on.
    let listener = agentd::bind(&config.server.listen).await?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    config.server.listen = local.to_string();
    if config.auth_keys.is_empty() && !local.ip().is_loopback() {
        tracing::warn!(addr = %local, "no [[auth.keys]] configured and listening beyond loopback: anyone who can reach it can use it");
    }
    let app = agentd::build(config).await?;
    tracing::info!(
        "agentd listening on http://{local} (store {}; agents: {}; config: {})",
        app.store.describe(),
        agents.join(", "),
        config_path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in default".into())
    );
    // A node fenced out of its cluster (its lease lapsed while it was frozen or cut off, and another node
    // took its runs over) can write nothing more: it stops at once, without a graceful shutdown (which would
    // try to record the end of runs that are no longer its own). Started again, it rejoins as a new process.
    let fenced = app.clone();
    tokio::select! {
        served = agentd_server::serve(listener, app, shutdown) => {
            served.map_err(|e| format!("server error: {e}"))?;
        }
        _ = fenced.lost_lease() => {
            return Err("this node's lease lapsed and another node took its runs over (fenced): stopping; \
                        start it again to rejoin the cluster".into());
        }
    }
    tracing::info!("agentd stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The signals are registered here, synchronously: a signal is only
/// delivered to a listener that exists when it arrives, and registering inside the returned future would
/// leave a window after start-up in which a SIGTERM is caught and dropped.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    #[cfg(unix)]
    let signalled = {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| format!("cannot listen for {name}: {e}"))
        };
        let mut term = listen(SignalKind::terminate(), "SIGTERM")?;
        let mut int = listen(SignalKind::interrupt(), "SIGINT")?;
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    };
    #[cfg(not(unix))]
    let signalled = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    Ok(async move {
        signalled.await;
        tracing::info!("shutting down: no new connections; letting running turns finish");
    })
}

/// The server's runtime: one worker per CPU this process may use, or, when that is one (a pinned process, a
/// one-CPU container quota), tokio's current-thread scheduler, which hands tasks to each other without the
/// cross-thread wake-ups a multi-thread scheduler pays even with a single worker.
fn serve_runtime() -> tokio::runtime::Builder {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}
