//! Building and starting the servers under test: the Python peer, the floor relay and agentd.
//!
//! - peer: a venv under the cache dir made from `peer/requirements.txt` (redone only when that file
//!   changes), then `navi_peer.py` as it is, one uvicorn worker, default settings.
//! - floor: `floor/` copied under the cache dir (never into the repo) and built there with
//!   `cargo build --release` and its own target dir; run as the durable variant (`RELAY_DB` set).
//! - agentd: `cargo build [--release] -p agentd` in the repo, started as `agentd serve --config <generated>`.
//!
//! Every server is started through `taskset -c <cpu>` (which execs, so the pid is the server's) with its
//! output in a log file; [`Server`] kills it when dropped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Error, Result};

/// The three kinds of server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Kind {
    /// The seed's stack: FastAPI + uvicorn + the openai SDK (`shared/bench/peer`).
    Peer,
    /// The lean Rust relay, durable variant (`shared/bench/floor`).
    Floor,
    /// agentd itself.
    Agentd,
    /// agentd on a PostgreSQL store (a fresh database of the run, see [`crate::pg`]).
    AgentdPg,
}

impl Kind {
    /// Its name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Peer => "peer",
            Kind::Floor => "floor",
            Kind::Agentd => "agentd",
            Kind::AgentdPg => "agentd-pg",
        }
    }

    /// Parses `peer`, `floor` or `agentd`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "peer" => Some(Kind::Peer),
            "floor" => Some(Kind::Floor),
            "agentd" => Some(Kind::Agentd),
            "agentd-pg" | "agentd-postgres" => Some(Kind::AgentdPg),
            _ => None,
        }
    }
}

/// Where things are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The agentd checkout.
    pub repo: PathBuf,
    /// `shared/bench`, holding `peer/` and `floor/`.
    pub bench_dir: PathBuf,
    /// Cache for the venv and the floor build (`~/.cache/agentd-bench`).
    pub cache: PathBuf,
    /// Scratch space for databases and configs of this run.
    pub work: PathBuf,
    /// Build and server logs.
    pub logs: PathBuf,
}

/// Which cargo profile agentd is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `--release`: the only profile whose figures mean anything.
    Release,
    /// The dev profile: for `--quick` smoke runs, where CI has built it already.
    Debug,
}

/// Runs `cmd`, sending its output to `log`; an error names the log when it fails.
fn run_logged(mut cmd: Command, log: &Path, what: &str) -> Result<()> {
    let file = std::fs::File::create(log)?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .map_err(|e| Error::new(format!("{what}: cannot run {:?}: {e}", cmd.get_program())))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::new(format!(
            "{what} failed ({status}); last lines of {}: {}",
            log.display(),
            tail(log, 3)
        )))
    }
}

/// The last `n` non-empty lines of a file, joined by ` | `.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Makes (or reuses) the peer's venv; returns its python.
pub fn prepare_peer(paths: &Paths) -> Result<PathBuf> {
    let peer = paths.bench_dir.join("peer");
    let requirements = std::fs::read_to_string(peer.join("requirements.txt")).map_err(|e| {
        Error::new(format!(
            "cannot read {}: {e}",
            peer.join("requirements.txt").display()
        ))
    })?;
    let venv = paths.cache.join("venv");
    let python = venv.join("bin").join("python");
    let marker = venv.join(".agentd-bench-requirements");
    if python.exists()
        && std::fs::read_to_string(&marker).ok().as_deref() == Some(requirements.as_str())
    {
        return Ok(python);
    }
    let mut mk = Command::new("python3");
    mk.arg("-m").arg("venv").arg(&venv);
    run_logged(mk, &paths.logs.join("peer-venv.log"), "python3 -m venv")?;
    let mut pip = Command::new(venv.join("bin").join("pip"));
    pip.arg("install")
        .arg("-q")
        .arg("-r")
        .arg(peer.join("requirements.txt"));
    run_logged(
        pip,
        &paths.logs.join("peer-pip.log"),
        "pip install -r requirements.txt",
    )?;
    std::fs::write(&marker, requirements)?;
    Ok(python)
}

/// Copies `src` to `dst` (files and folders), rewriting only files whose content differs so cargo's
/// mtime-based freshness check does not rebuild for nothing.
fn sync_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        let (from, to) = (entry.path(), dst.join(&name));
        if entry.file_type()?.is_dir() {
            sync_tree(&from, &to)?;
        } else {
            let bytes = std::fs::read(&from)?;
            if std::fs::read(&to).ok().as_deref() != Some(bytes.as_slice()) {
                std::fs::write(&to, bytes)?;
            }
        }
    }
    Ok(())
}

/// Copies the floor under the cache dir and builds it there; returns the binary.
pub fn prepare_floor(paths: &Paths) -> Result<PathBuf> {
    let src = paths.cache.join("floor");
    let target = paths.cache.join("floor-target");
    sync_tree(&paths.bench_dir.join("floor"), &src)?;
    let mut cargo = Command::new("cargo");
    cargo
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target);
    run_logged(
        cargo,
        &paths.logs.join("floor-build.log"),
        "cargo build --release (floor)",
    )?;
    let bin = target.join("release").join("relay");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(Error::new(format!(
            "floor binary missing at {}",
            bin.display()
        )))
    }
}

/// Builds agentd (unless `explicit` names a binary); returns the binary.
pub fn prepare_agentd(paths: &Paths, profile: Profile, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(bin) = explicit {
        return if bin.exists() {
            Ok(bin.to_path_buf())
        } else {
            Err(Error::new(format!("{} does not exist", bin.display())))
        };
    }
    let mut cargo = Command::new("cargo");
    cargo
        .arg("build")
        .arg("-p")
        .arg("agentd")
        .current_dir(&paths.repo);
    if profile == Profile::Release {
        cargo.arg("--release");
    }
    let what = if profile == Profile::Release {
        "cargo build --release -p agentd"
    } else {
        "cargo build -p agentd"
    };
    run_logged(cargo, &paths.logs.join("agentd-build.log"), what)?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths.repo.join("target"));
    let bin = target_dir
        .join(if profile == Profile::Release {
            "release"
        } else {
            "debug"
        })
        .join("agentd");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(Error::new(format!(
            "agentd binary missing at {}",
            bin.display()
        )))
    }
}

/// A free TCP port on loopback (bound and released; the tiny race is acceptable on a bench machine).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// How to start one server.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Which server.
    pub kind: Kind,
    /// Program to exec.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(String, OsString)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Port it listens on.
    pub port: u16,
}

/// The peer on `port`, talking to the mock at `upstream` (`http://…/v1`).
pub fn peer_launch(paths: &Paths, python: &Path, port: u16, upstream: &str, db: &Path) -> Launch {
    let peer = paths.bench_dir.join("peer");
    Launch {
        kind: Kind::Peer,
        program: python.to_path_buf(),
        args: vec![
            peer.join("navi_peer.py").into(),
            "--port".into(),
            port.to_string().into(),
            "--upstream".into(),
            upstream.into(),
            "--db".into(),
            db.into(),
        ],
        env: Vec::new(),
        cwd: peer,
        port,
    }
}

/// The floor's durable variant on `port`.
pub fn floor_launch(bin: &Path, port: u16, upstream: &str, db: &Path, cwd: &Path) -> Launch {
    Launch {
        kind: Kind::Floor,
        program: bin.to_path_buf(),
        args: Vec::new(),
        env: vec![
            ("PORT".into(), port.to_string().into()),
            ("UPSTREAM".into(), upstream.into()),
            ("RELAY_DB".into(), db.into()),
        ],
        cwd: cwd.to_path_buf(),
        port,
    }
}

/// The agentd config the bench uses (SPEC section 2): one agent on the mock, with the calculator; `store` is
/// the `store.url` (`sqlite://<path>` or `postgres://...`).
pub fn agentd_config(port: u16, upstream: &str, store: &str) -> String {
    format!(
        r#"# Written by agentd-bench for one benchmark run.
[server]
listen = "127.0.0.1:{port}"

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
tools = ["calculator"]
"#
    )
}

/// agentd on `port` with a fresh config in `dir`, and its database there too (SQLite) unless `store` names
/// one (a `postgres://` URL).
pub fn agentd_launch(
    bin: &Path,
    dir: &Path,
    port: u16,
    upstream: &str,
    store: Option<&str>,
) -> Result<Launch> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("agentd.toml");
    let sqlite = format!("sqlite://{}", dir.join("agentd.db").display());
    std::fs::write(
        &config,
        agentd_config(port, upstream, store.unwrap_or(&sqlite)),
    )?;
    Ok(Launch {
        kind: if store.is_some() {
            Kind::AgentdPg
        } else {
            Kind::Agentd
        },
        program: bin.to_path_buf(),
        args: vec!["serve".into(), "--config".into(), config.into()],
        env: Vec::new(),
        cwd: dir.to_path_buf(),
        port,
    })
}

/// A running server; killed on drop.
#[derive(Debug)]
pub struct Server {
    /// Which server.
    pub kind: Kind,
    /// Its process id (taskset execs, so this is the server itself).
    pub pid: u32,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Its combined stdout and stderr.
    pub log: PathBuf,
    /// How it was started, for a restart.
    pub launch: Launch,
    child: Child,
}

/// Environment variables that would send a child's loopback traffic to a proxy.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

impl Server {
    /// Starts `launch`, pinned to `cpu` when given, logging to `log`.
    pub fn spawn(launch: Launch, cpu: Option<usize>, log: PathBuf) -> Result<Server> {
        let file = std::fs::File::create(&log)?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(&launch.program);
                c
            }
            None => Command::new(&launch.program),
        };
        cmd.args(&launch.args)
            .current_dir(&launch.cwd)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.env("NO_PROXY", "127.0.0.1,localhost");
        for (k, v) in &launch.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::new(format!("cannot start {}: {e}", launch.program.display())))?;
        Ok(Server {
            kind: launch.kind,
            pid: child.id(),
            base: format!("http://127.0.0.1:{}", launch.port),
            log,
            launch,
            child,
        })
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for `GET /healthz` to answer 200, for at most `limit`.
    pub async fn wait_healthy(&mut self, http: &reqwest::Client, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        let url = format!("{}/healthz", self.base);
        loop {
            if !self.running() {
                return Err(Error::new(format!(
                    "{} exited at start; last log lines: {}",
                    self.kind.name(),
                    tail(&self.log, 3)
                )));
            }
            if let Ok(resp) = http.get(&url).timeout(Duration::from_secs(2)).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::new(format!(
                    "{} not healthy within {} s; last log lines: {}",
                    self.kind.name(),
                    limit.as_secs(),
                    tail(&self.log, 3)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pins every thread of this process to `cpu` (threads made later inherit it).
pub fn pin_self(cpu: usize) -> Result<()> {
    let status = Command::new("taskset")
        .arg("-a")
        .arg("-p")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::new(format!("cannot run taskset: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::new(format!("taskset failed: {status}")))
    }
}
