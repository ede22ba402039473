//! The `run` command: prepare the servers, start the mock and every server, run each scenario against every
//! target in alternation (peer, floor, agentd through navi, agentd through its native WebSocket), and write
//! `results.md`, `results.json` and `plot.png`.
//!
//! Scenarios alternate between servers (idle for all, then throughput N=10 for all, ...), so slow drift of
//! the machine hits every server alike. All servers stay up for the whole run, pinned to CPU 0; only the one
//! being measured has work. The idle scenario runs first, on processes that have served nothing but the
//! functional check, because RSS after a heavy scenario would hide per-connection growth in freed memory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{self, Dialect, Target};
use crate::procfs;
use crate::report::{self, Cell, Machine, Results, Sizes, TargetReport};
use crate::scenario::{
    self, IdleParams, LatencyParams, LatencyResult, Probe, ReattachParams, ThroughputParams,
    ThroughputResult,
};
use crate::servers::{self, Kind, Launch, Paths, Profile, Server};
use crate::stamp::StampParser;
use crate::{Error, Result};

/// What `run` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// CI-sized run.
    pub quick: bool,
    /// Where things are.
    pub paths: Paths,
    /// Where results.md, results.json and plot.png go.
    pub out_dir: PathBuf,
    /// Which servers to run.
    pub servers: Vec<Kind>,
    /// A prebuilt agentd, instead of building one.
    pub agentd_bin: Option<PathBuf>,
    /// Profile to build agentd with.
    pub agentd_profile: Profile,
    /// Pin servers to CPU 0 and the mock and load generator to CPU 1.
    pub pin: bool,
    /// BENCHMARKS.md to update with the table (full runs only).
    pub doc: Option<PathBuf>,
    /// The command line, for the report.
    pub command: String,
    /// Overrides the number of idle connections.
    pub idle_connections: Option<usize>,
    /// Which scenarios to run.
    pub scenarios: Scenarios,
    /// Adds a column: agentd's native WebSocket again, with `GET /metrics` scraped every second during each
    /// scenario, for the CPU-per-token cost of the metrics (same process, same run).
    pub scrape_metrics: bool,
    /// With `scrape_metrics`: rounds per throughput and latency level for the native column and its scraped
    /// twin, measured alternately and pooled (see [`Pair`]). 1: each once, native first.
    pub metrics_rounds: u32,
}

/// Which scenarios a run includes (all by default; fewer for a focused look).
#[derive(Debug, Clone, Copy)]
pub struct Scenarios {
    /// Idle connections.
    pub idle: bool,
    /// Throughput.
    pub throughput: bool,
    /// Latency.
    pub latency: bool,
    /// Re-attach.
    pub reattach: bool,
}

impl Scenarios {
    /// Every scenario.
    pub const ALL: Scenarios = Scenarios {
        idle: true,
        throughput: true,
        latency: true,
        reattach: true,
    };

    /// Parses names (`idle`, `throughput`, `latency`, `reattach`); `None` on an unknown one.
    pub fn parse(names: &[String]) -> Option<Self> {
        let mut s = Scenarios {
            idle: false,
            throughput: false,
            latency: false,
            reattach: false,
        };
        for n in names {
            match n.trim() {
                "idle" => s.idle = true,
                "throughput" => s.throughput = true,
                "latency" => s.latency = true,
                "reattach" | "re-attach" => s.reattach = true,
                _ => return None,
            }
        }
        Some(s)
    }
}

/// Scenario sizes for a full or a quick run.
#[derive(Debug, Clone)]
struct Plan {
    throughput_sessions: Vec<usize>,
    throughput: ThroughputParams,
    latency_sessions: Vec<usize>,
    latency: LatencyParams,
    idle: IdleParams,
    reattach: ReattachParams,
}

impl Plan {
    fn full() -> Self {
        Plan {
            throughput_sessions: vec![10, 100, 1000],
            throughput: ThroughputParams {
                sessions: 0,
                tokens: 200,
                min_wall: Duration::from_secs(2),
                max_rounds: 200,
                turn_limit: Duration::from_secs(180),
            },
            latency_sessions: vec![200, 1000],
            latency: LatencyParams {
                sessions: 0,
                tokens: 100,
                delay_ms: 50,
                stagger: Duration::from_secs(1),
                turn_limit: Duration::from_secs(120),
            },
            idle: IdleParams {
                connections: 10_000,
                settle_max: Duration::from_secs(5),
            },
            reattach: ReattachParams {
                clients: 100,
                tokens: 100,
                delay_ms: 20,
                drop_after: 20,
                gap: Duration::from_millis(200),
                stagger: Duration::from_millis(500),
                quiet_limit: Duration::from_secs(3),
            },
        }
    }

    fn quick() -> Self {
        Plan {
            throughput_sessions: vec![10],
            throughput: ThroughputParams {
                sessions: 0,
                tokens: 50,
                min_wall: Duration::from_millis(300),
                max_rounds: 5,
                turn_limit: Duration::from_secs(30),
            },
            latency_sessions: vec![20],
            latency: LatencyParams {
                sessions: 0,
                tokens: 20,
                delay_ms: 50,
                stagger: Duration::from_millis(200),
                turn_limit: Duration::from_secs(30),
            },
            idle: IdleParams {
                connections: 100,
                settle_max: Duration::from_secs(2),
            },
            reattach: ReattachParams {
                clients: 10,
                tokens: 40,
                delay_ms: 20,
                drop_after: 10,
                gap: Duration::from_millis(100),
                stagger: Duration::from_millis(100),
                quiet_limit: Duration::from_secs(2),
            },
        }
    }

    fn sizes(&self) -> Sizes {
        Sizes {
            throughput_sessions: self.throughput_sessions.clone(),
            throughput_tokens: self.throughput.tokens,
            latency_sessions: self.latency_sessions.clone(),
            latency_tokens: self.latency.tokens,
            latency_delay_ms: self.latency.delay_ms,
            idle_connections: self.idle.connections,
            reattach_clients: self.reattach.clients,
            reattach_tokens: self.reattach.tokens,
            reattach_delay_ms: self.reattach.delay_ms,
            reattach_drop_after: self.reattach.drop_after,
            reattach_gap_ms: u64::try_from(self.reattach.gap.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The mock upstream as a child process (on the load generator's CPU); killed on drop.
pub struct MockProcess {
    child: Child,
    addr: String,
}

impl MockProcess {
    /// Starts `agentd-bench mock --port 0` (this executable), its stderr in `logs/mock.log`.
    pub fn start(logs: &Path) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(logs.join("mock.log"))?;
        let mut child = Command::new(exe)
            .args(["mock", "--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::new(format!("cannot start the mock: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::new("mock stdout missing"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|a| a.contains(':'))
            .ok_or_else(|| Error::new(format!("the mock did not say where it listens: {line:?}")))?
            .to_string();
        Ok(MockProcess { child, addr })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Streams one reply straight from the mock and checks its stamps: proves the mock works before any server
/// is measured.
async fn check_mock(http: &reqwest::Client, base: &str) -> Result<()> {
    let body = serde_json::json!({
        "model": "mock", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "check tokens=20"}],
    });
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(Error::new(format!("mock answered {}", resp.status())));
    }
    let text = resp.text().await?;
    let mut parser = StampParser::new();
    let mut indices = Vec::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(data)?;
        if let Some(c) = chunk
            .pointer("/choices/0/delta/content")
            .and_then(|v| v.as_str())
        {
            parser.feed(c, |s| indices.push(s.index));
        }
    }
    if indices != (0..20).collect::<Vec<u32>>() {
        return Err(Error::new(format!(
            "mock streamed tokens {indices:?}, expected 0..20"
        )));
    }
    Ok(())
}

/// One server slot: how to start it, and the running process or why there is none.
struct Slot {
    kind: Kind,
    launch: Option<Launch>,
    server: Option<Server>,
    not_run: Option<String>,
    /// The idle scenario has run on this process (a second one needs a fresh process).
    idle_used: bool,
    /// agentd on Postgres: the run's database (its name leaked once, for the `Copy` probe).
    pg: Option<(crate::pg::BenchDatabase, &'static str)>,
}

impl Slot {
    fn probe(&self, mock_pid: u32) -> Option<Probe> {
        self.server.as_ref().map(|s| Probe {
            server_pid: s.pid,
            mock_pid: Some(mock_pid),
            pg_database: self.pg.as_ref().map(|(_, name)| *name),
        })
    }
}

/// One column of the table.
struct Column {
    report: TargetReport,
    target: Target,
    slot: usize,
    with_tools: bool,
    /// Scrape the server's `/metrics` every second while measuring this column.
    scrape: bool,
}

/// Prepares, pins, runs; returns the results (also written to `out_dir`).
pub fn run(opts: Options) -> Result<Results> {
    let started_at = Instant::now();
    std::fs::create_dir_all(&opts.paths.logs)?;
    std::fs::create_dir_all(&opts.paths.work)?;
    std::fs::create_dir_all(&opts.out_dir)?;
    let mut notes = Vec::new();
    let mut machine = Machine::detect();

    // Builds first, while both CPUs are free.
    let mut prepared: Vec<(Kind, Result<PathBuf>)> = Vec::new();
    for &kind in &opts.servers {
        eprintln!("agentd-bench: preparing {} ...", kind.name());
        let r = match kind {
            Kind::Peer => servers::prepare_peer(&opts.paths),
            Kind::Floor => servers::prepare_floor(&opts.paths),
            Kind::Agentd | Kind::AgentdPg => servers::prepare_agentd(
                &opts.paths,
                opts.agentd_profile,
                opts.agentd_bin.as_deref(),
            ),
        };
        if let Err(e) = &r {
            eprintln!("agentd-bench: {} will not run: {e}", kind.name());
        }
        if let (Kind::Peer, Ok(python)) = (kind, &r) {
            machine.python = Command::new(python)
                .arg("--version")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        }
        prepared.push((kind, r));
    }
    if (opts.servers.contains(&Kind::Agentd) || opts.servers.contains(&Kind::AgentdPg))
        && opts.agentd_profile == Profile::Debug
        && opts.agentd_bin.is_none()
    {
        notes.push(
            "agentd was a debug build (the `--quick` default): its figures are not comparable."
                .into(),
        );
    }

    let server_cpu = if opts.pin && procfs::online_cpus() >= 2 {
        servers::pin_self(1)?;
        notes.push(format!(
            "Servers pinned to CPU 0; mock and load generator to CPU {} (taskset).",
            procfs::allowed_cpus()
        ));
        Some(0)
    } else {
        notes.push("Not pinned: servers, mock and load generator share every CPU.".into());
        None
    };

    let mut plan = if opts.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(n) = opts.idle_connections {
        plan.idle.connections = n;
    }
    if let Some(limit) = procfs::open_files_limit() {
        let needed = plan.idle.connections as u64 + 512;
        if limit < needed {
            let fit = usize::try_from(limit.saturating_sub(512))
                .unwrap_or(0)
                .max(1);
            notes.push(format!(
                "Open-files limit {limit} is below {needed}: idle connections cut to {fit} (raise it with `ulimit -n`)."
            ));
            plan.idle.connections = fit;
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results = rt.block_on(run_scenarios(
        &opts, &plan, prepared, server_cpu, &mut notes,
    ))?;
    results.machine = machine;
    results.duration_s = started_at.elapsed().as_secs_f64();
    write_outputs(&opts, &mut results)?;
    Ok(results)
}

async fn run_scenarios(
    opts: &Options,
    plan: &Plan,
    prepared: Vec<(Kind, Result<PathBuf>)>,
    server_cpu: Option<usize>,
    notes: &mut Vec<String>,
) -> Result<Results> {
    let started = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // How busy the rest of the machine is during the run: busy CPU of the machine minus our own.
    let busy0 = procfs::machine_busy_seconds();
    let own0 = procfs::own_total_cpu_seconds();
    let wall0 = Instant::now();
    let http = client::http_client()?;
    let scraper = Scraper::new(http.clone());
    let mock = MockProcess::start(&opts.paths.logs)?;
    let mock_pid = mock.child.id();
    let mock_base = format!("http://{}", mock.addr);
    check_mock(&http, &mock_base)
        .await
        .map_err(|e| Error::new(format!("mock check failed: {e}")))?;
    let upstream = format!("{mock_base}/v1");
    eprintln!("agentd-bench: mock upstream at {mock_base} (pid {mock_pid})");

    // Start every server.
    let mut slots = Vec::new();
    for (kind, prepared) in prepared {
        let mut slot = Slot {
            kind,
            launch: None,
            server: None,
            not_run: None,
            idle_used: false,
            pg: None,
        };
        if kind == Kind::AgentdPg {
            match crate::pg::create().await {
                Ok(db) => {
                    notes.push(crate::pg::settings_note(&db));
                    let name: &'static str = Box::leak(db.name.clone().into_boxed_str());
                    slot.pg = Some((db, name));
                }
                Err(e) => slot.not_run = Some(format!("no Postgres database: {e}")),
            }
        }
        let store = slot.pg.as_ref().map(|(db, _)| db.url.clone());
        let launch = match &slot.not_run {
            Some(reason) => Err(Error::new(reason.clone())),
            None => prepared,
        };
        let launch = launch.and_then(|program| {
            let port = servers::free_port()?;
            match kind {
                Kind::Peer => Ok(servers::peer_launch(
                    &opts.paths,
                    &program,
                    port,
                    &upstream,
                    &opts.paths.work.join("peer.db"),
                )),
                Kind::Floor => Ok(servers::floor_launch(
                    &program,
                    port,
                    &upstream,
                    &opts.paths.work.join("relay.db"),
                    &opts.paths.work,
                )),
                Kind::Agentd => servers::agentd_launch(
                    &program,
                    &opts.paths.work.join("agentd"),
                    port,
                    &upstream,
                    None,
                ),
                Kind::AgentdPg => servers::agentd_launch(
                    &program,
                    &opts.paths.work.join("agentd-pg"),
                    port,
                    &upstream,
                    store.as_deref(),
                ),
            }
        });
        match launch {
            Ok(launch) => {
                slot.launch = Some(launch.clone());
                match start(&http, launch, server_cpu, &opts.paths.logs).await {
                    Ok(server) => {
                        eprintln!(
                            "agentd-bench: {} up at {} (pid {})",
                            kind.name(),
                            server.base,
                            server.pid
                        );
                        slot.server = Some(server);
                    }
                    Err(e) => slot.not_run = Some(e.to_string()),
                }
            }
            Err(e) => slot.not_run = Some(e.to_string()),
        }
        if let Some(reason) = &slot.not_run {
            eprintln!("agentd-bench: {} not run: {reason}", kind.name());
        }
        slots.push(slot);
    }

    // Columns.
    let mut columns = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let base = slot
            .server
            .as_ref()
            .map(|s| s.base.clone())
            .unwrap_or_default();
        let mut add = |label: &str, description: &str, target: Target, with_tools: bool| {
            let mut report = TargetReport::new(label, description);
            report.not_run = slot.not_run.clone();
            columns.push(Column {
                scrape: label == report::AGENTD_SCRAPED,
                report,
                target,
                slot: i,
                with_tools,
            });
        };
        match slot.kind {
            Kind::Peer => add(
                report::PEER,
                "the seed's stack (FastAPI + uvicorn, 1 worker, asyncio + h11, openai SDK, SQLite via to_thread), shared/bench/peer",
                Target::navi(report::PEER, &base),
                true,
            ),
            Kind::Floor => add(
                report::FLOOR,
                "lean Rust relay (axum + reqwest, current-thread), durable variant: every delta committed to SQLite before it is sent (RELAY_DB), shared/bench/floor; no agent loop, no tools, no re-attach",
                Target::navi(report::FLOOR, &base),
                false,
            ),
            Kind::Agentd => {
                add(
                    report::AGENTD_NAVI,
                    "agentd serve, navi dialect /ws/sessions/{id}",
                    Target::agentd(report::AGENTD_NAVI, &base, "assistant", Dialect::Navi),
                    true,
                );
                add(
                    report::AGENTD_NATIVE,
                    "agentd serve, native WebSocket /v1/sessions/{id}/ws",
                    Target::agentd(report::AGENTD_NATIVE, &base, "assistant", Dialect::Native),
                    true,
                );
                if opts.scrape_metrics {
                    add(
                        report::AGENTD_SCRAPED,
                        "agentd serve, native WebSocket, with GET /metrics scraped every second while measured",
                        Target::agentd(report::AGENTD_SCRAPED, &base, "assistant", Dialect::Native),
                        true,
                    );
                }
            }
            Kind::AgentdPg => add(
                report::AGENTD_PG,
                "agentd serve on a PostgreSQL store (a fresh database; synchronous_commit as the server has it), native WebSocket; its CPU includes PostgreSQL's for it",
                Target::agentd(report::AGENTD_PG, &base, "assistant", Dialect::Native),
                true,
            ),
        }
    }

    // Functional check; a target that cannot stream a plain turn is left out of the scenarios.
    for col in &mut columns {
        if col.report.not_run.is_some() {
            continue;
        }
        let smoke = scenario::smoke(&http, &col.target, col.with_tools).await;
        if !smoke.text_ok {
            col.report.not_run = Some(format!(
                "functional check failed: {}",
                smoke
                    .problem
                    .clone()
                    .unwrap_or_else(|| "no reason given".into())
            ));
        }
        eprintln!(
            "agentd-bench: {} functional check: {:?}",
            col.report.label, smoke
        );
        col.report.smoke = Some(smoke);
    }

    // 1. Idle connections, on fresh processes.
    for col in &mut columns {
        if col.report.not_run.is_some() || !opts.scenarios.idle {
            continue;
        }
        let slot = &mut slots[col.slot];
        if slot.idle_used {
            if let Err(e) = restart(&http, slot, server_cpu, &opts.paths.logs).await {
                col.report.idle = Some(Cell::Failed(format!(
                    "restart for a fresh process failed: {e}"
                )));
                continue;
            }
        }
        slot.idle_used = true;
        let p = plan.idle;
        let cell = measure(slot, mock_pid, col.scrape.then_some(&scraper), |probe| {
            scenario::idle(&http, &col.target, probe, p)
        })
        .await;
        log_cell(&col.report.label, &format!("idle {}", p.connections), &cell);
        col.report.idle = Some(cell);
    }

    // The native column and its scraped twin, measured in alternating rounds (`--metrics-rounds`).
    let pair = Pair::find(&columns, opts);

    // 2. Throughput, with one unrecorded warm-up round per target first.
    if opts.scenarios.throughput {
        for col in &columns {
            if col.report.not_run.is_some() {
                continue;
            }
            let warm = ThroughputParams {
                sessions: 10,
                tokens: 50,
                min_wall: Duration::ZERO,
                max_rounds: 1,
                ..plan.throughput
            };
            let slot = &mut slots[col.slot];
            let _ = measure(slot, mock_pid, col.scrape.then_some(&scraper), |probe| {
                scenario::throughput(&http, &col.target, probe, warm)
            })
            .await;
        }
    }
    if opts.scenarios.throughput {
        for &n in &plan.throughput_sessions {
            let p = ThroughputParams {
                sessions: n,
                ..plan.throughput
            };
            let run = |target: Target, probe| {
                let http = http.clone();
                async move { scenario::throughput(&http, &target, probe, p).await }
            };
            let what = format!("throughput {n}");
            let (cells, note) = level(
                &columns,
                &mut slots,
                pair,
                (mock_pid, &scraper),
                &what,
                merge_throughput,
                run,
            )
            .await;
            notes.extend(note);
            for (ci, cell) in cells {
                columns[ci].report.throughput.push((n, cell));
            }
        }
    }

    // 3. Latency.
    if opts.scenarios.latency {
        for &n in &plan.latency_sessions {
            let p = LatencyParams {
                sessions: n,
                turn_limit: plan.latency.turn_limit
                    + Duration::from_millis(plan.latency.delay_ms * u64::from(plan.latency.tokens)),
                ..plan.latency
            };
            let run = |target: Target, probe| {
                let http = http.clone();
                async move { scenario::latency(&http, &target, probe, p).await }
            };
            let what = format!("latency {n}");
            let (cells, note) = level(
                &columns,
                &mut slots,
                pair,
                (mock_pid, &scraper),
                &what,
                merge_latency,
                run,
            )
            .await;
            notes.extend(note);
            for (ci, cell) in cells {
                columns[ci].report.latency.push((n, cell));
            }
        }
    }

    // The harness's own share of latency: the same load straight from the mock.
    let mut harness_latency = Vec::new();
    if opts.scenarios.latency {
        for &n in &plan.latency_sessions {
            let p = LatencyParams {
                sessions: n,
                turn_limit: plan.latency.turn_limit
                    + Duration::from_millis(plan.latency.delay_ms * u64::from(plan.latency.tokens)),
                ..plan.latency
            };
            let cell = match scenario::upstream_latency(&http, &mock_base, p).await {
                Ok(v) => Cell::Ok(v),
                Err(e) => Cell::Failed(e.to_string()),
            };
            log_cell("harness alone", &format!("latency {n}"), &cell);
            harness_latency.push((n, cell));
            pause().await;
        }
    }

    // 4. Re-attach.
    for col in &mut columns {
        if col.report.not_run.is_some() || !opts.scenarios.reattach {
            continue;
        }
        let slot = &mut slots[col.slot];
        let p = plan.reattach;
        let cell = measure(slot, mock_pid, col.scrape.then_some(&scraper), |_| {
            scenario::reattach(&http, &col.target, p)
        })
        .await;
        log_cell(&col.report.label, "re-attach", &cell);
        col.report.reattach = Some(cell);
        pause().await;
    }

    if let (Some(b0), Some(b1)) = (busy0, procfs::machine_busy_seconds()) {
        let others = ((b1 - b0) - (procfs::own_total_cpu_seconds() - own0)).max(0.0);
        let share =
            others / (wall0.elapsed().as_secs_f64() * procfs::online_cpus() as f64).max(1e-9);
        let mut note = format!(
            "Other processes used {others:.0} CPU-seconds during the measurements ({:.0}% of the machine).",
            share * 100.0
        );
        if share > 0.05 {
            note.push_str(
                " The machine was not quiet: figures are disturbed, latency tails most; rerun on an idle machine.",
            );
        }
        notes.push(note);
    }
    if opts.scrape_metrics {
        notes.push(scraper.note());
    }
    let databases: Vec<crate::pg::BenchDatabase> = slots
        .iter()
        .filter_map(|s| s.pg.as_ref().map(|(db, _)| db.clone()))
        .collect();
    drop(slots);
    for db in &databases {
        crate::pg::drop_database(db).await;
    }
    drop(mock);
    Ok(Results {
        machine: Machine::default(),
        command: opts.command.clone(),
        quick: opts.quick,
        started,
        duration_s: 0.0,
        sizes: plan.sizes(),
        targets: columns.into_iter().map(|c| c.report).collect(),
        notes: std::mem::take(notes),
        harness_latency,
    })
}

/// One throughput or latency level: every column that runs measured once with `run`, in order, except the
/// alternating pair (if any), measured in rounds after them. The cells by column index, and the pair's note.
async fn level<T, F, Fut>(
    columns: &[Column],
    slots: &mut [Slot],
    pair: Option<Pair>,
    (mock_pid, scraper): (u32, &Scraper),
    what: &str,
    merge: fn(Vec<T>) -> T,
    mut run: F,
) -> (Vec<(usize, Cell<T>)>, Option<String>)
where
    T: std::fmt::Debug + CpuPerToken,
    F: FnMut(Target, Probe) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut cells = Vec::new();
    for (ci, col) in columns.iter().enumerate() {
        if col.report.not_run.is_some() || pair.is_some_and(|p| p.has(ci)) {
            continue;
        }
        let slot = &mut slots[col.slot];
        let cell = measure(slot, mock_pid, col.scrape.then_some(scraper), |probe| {
            run(col.target.clone(), probe)
        })
        .await;
        log_cell(&col.report.label, what, &cell);
        cells.push((ci, cell));
        pause().await;
    }
    let Some(pair) = pair else {
        return (cells, None);
    };
    let (pooled, note) = pair
        .alternate(columns, slots, (mock_pid, scraper), what, merge, run)
        .await;
    cells.extend([pair.plain, pair.scraped].into_iter().zip(pooled));
    (cells, Some(note))
}

/// The native column and its scraped twin (same process), when `--metrics-rounds` asks for more than one
/// round: each throughput and latency level measures them `rounds` times each, alternately (plain then
/// scraped, then scraped then plain, ...), so what drifts during a run (the database growing, the machine's
/// other work) falls on both alike, and pools the rounds into one cell each (tokens and CPU summed).
#[derive(Clone, Copy)]
struct Pair {
    plain: usize,
    scraped: usize,
    rounds: u32,
}

impl Pair {
    fn find(columns: &[Column], opts: &Options) -> Option<Pair> {
        if !opts.scrape_metrics || opts.metrics_rounds < 2 {
            return None;
        }
        let index = |label: &str| {
            columns
                .iter()
                .position(|c| c.report.label == label && c.report.not_run.is_none())
        };
        Some(Pair {
            plain: index(report::AGENTD_NATIVE)?,
            scraped: index(report::AGENTD_SCRAPED)?,
            rounds: opts.metrics_rounds,
        })
    }

    fn has(&self, column: usize) -> bool {
        column == self.plain || column == self.scraped
    }

    /// Round `r`'s order: `(0, plain)` and `(1, scraped)`, the plain one first in even rounds.
    fn order(&self, r: u32) -> [(usize, usize); 2] {
        if r.is_multiple_of(2) {
            [(0, self.plain), (1, self.scraped)]
        } else {
            [(1, self.scraped), (0, self.plain)]
        }
    }

    /// Measures the pair `rounds` times each with `run`, alternately; gives the plain and the scraped column's
    /// rounds pooled by `merge`, and the report's line on them ([`Pair::note`]).
    async fn alternate<T, F, Fut>(
        &self,
        columns: &[Column],
        slots: &mut [Slot],
        (mock_pid, scraper): (u32, &Scraper),
        what: &str,
        merge: fn(Vec<T>) -> T,
        mut run: F,
    ) -> ([Cell<T>; 2], String)
    where
        T: std::fmt::Debug + CpuPerToken,
        F: FnMut(Target, Probe) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut rounds: [Vec<Cell<T>>; 2] = [Vec::new(), Vec::new()];
        for r in 0..self.rounds {
            for (k, ci) in self.order(r) {
                let col = &columns[ci];
                let slot = &mut slots[col.slot];
                let cell = measure(slot, mock_pid, col.scrape.then_some(scraper), |probe| {
                    run(col.target.clone(), probe)
                })
                .await;
                log_cell(
                    &col.report.label,
                    &format!("{what}, round {}", r + 1),
                    &cell,
                );
                rounds[k].push(cell);
                pause().await;
            }
        }
        let note = self.note(what, &rounds, T::cpu_ms_per_1k_tokens);
        let [plain, scraped] = rounds;
        ([pool(plain, merge), pool(scraped, merge)], note)
    }

    /// One line for the report: each round's ratio (scraped ÷ plain CPU per token) and their median.
    fn note<T>(&self, level: &str, rounds: &[Vec<Cell<T>>; 2], cpu: impl Fn(&T) -> f64) -> String {
        let mut ratios: Vec<f64> = rounds[0]
            .iter()
            .zip(&rounds[1])
            .filter_map(|(a, b)| Some(cpu(b.ok()?) / cpu(a.ok()?)))
            .filter(|r| r.is_finite())
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
        format!(
            "/metrics cost, {level}: {} alternating rounds; CPU per token scraped ÷ plain per round {}; median {median:.3}.",
            self.rounds,
            listed.join(", ")
        )
    }
}

/// A measured level's CPU per token (for the alternating rounds' note).
trait CpuPerToken {
    fn cpu_ms_per_1k_tokens(&self) -> f64;
}

impl CpuPerToken for ThroughputResult {
    fn cpu_ms_per_1k_tokens(&self) -> f64 {
        self.cpu_ms_per_1k_tokens
    }
}

impl CpuPerToken for LatencyResult {
    fn cpu_ms_per_1k_tokens(&self) -> f64 {
        self.cpu_ms_per_1k_tokens
    }
}

/// The rounds of one column at one level as one cell: the first failure if any round failed, else `merge`.
fn pool<T>(cells: Vec<Cell<T>>, merge: fn(Vec<T>) -> T) -> Cell<T> {
    let mut ok = Vec::with_capacity(cells.len());
    for cell in cells {
        match cell {
            Cell::Ok(v) => ok.push(v),
            other => return other,
        }
    }
    if ok.is_empty() {
        return Cell::NotRun("no rounds".into());
    }
    Cell::Ok(merge(ok))
}

/// Throughput rounds pooled: tokens, wall time and CPU summed, the rates recomputed from the sums.
fn merge_throughput(rounds: Vec<ThroughputResult>) -> ThroughputResult {
    let n = rounds.len() as f64;
    let mut out = ThroughputResult {
        first_problem: rounds.iter().find_map(|r| r.first_problem.clone()),
        ..rounds[0].clone()
    };
    out.rounds = rounds.iter().map(|r| r.rounds).sum();
    out.tokens = rounds.iter().map(|r| r.tokens).sum();
    out.expected_tokens = rounds.iter().map(|r| r.expected_tokens).sum();
    out.wall_s = rounds.iter().map(|r| r.wall_s).sum();
    out.server_cpu_s = rounds.iter().map(|r| r.server_cpu_s).sum();
    out.bad_sessions = rounds.iter().map(|r| r.bad_sessions).sum();
    out.tokens_per_s = out.tokens as f64 / out.wall_s.max(1e-9);
    out.cpu_ms_per_1k_tokens = out.server_cpu_s * 1000.0 / (out.tokens as f64 / 1000.0).max(1e-9);
    out.server_cores = out.server_cpu_s / out.wall_s.max(1e-9);
    out.mock_cores = rounds
        .iter()
        .map(|r| r.mock_cores)
        .sum::<Option<f64>>()
        .map(|c| c / n);
    out.loadgen_cores = rounds.iter().map(|r| r.loadgen_cores).sum::<f64>() / n;
    let mut first: Vec<f64> = rounds.iter().map(|r| r.first_token_p50_ms).collect();
    first.sort_by(f64::total_cmp);
    out.first_token_p50_ms = first[first.len() / 2];
    out
}

/// Latency rounds pooled: tokens and CPU summed; the latency summaries are the median round's (by p99), since
/// percentiles of separate rounds do not add up.
fn merge_latency(mut rounds: Vec<LatencyResult>) -> LatencyResult {
    let n = rounds.len() as f64;
    let cpu_ms: f64 = rounds
        .iter()
        .map(|r| r.cpu_ms_per_1k_tokens * r.tokens as f64 / 1000.0)
        .sum();
    let tokens: u64 = rounds.iter().map(|r| r.tokens).sum();
    let expected: u64 = rounds.iter().map(|r| r.expected_tokens).sum();
    let wall: f64 = rounds.iter().map(|r| r.wall_s).sum();
    let bad: u64 = rounds.iter().map(|r| r.bad_sessions).sum();
    let mock: Option<f64> = rounds.iter().map(|r| r.mock_cores).sum();
    let loadgen = rounds.iter().map(|r| r.loadgen_cores).sum::<f64>() / n;
    let problem = rounds.iter().find_map(|r| r.first_problem.clone());
    rounds.sort_by(|a, b| a.added.p99_ms.total_cmp(&b.added.p99_ms));
    let mid = rounds.len() / 2;
    let mut out = rounds.swap_remove(mid);
    out.tokens = tokens;
    out.expected_tokens = expected;
    out.wall_s = wall;
    out.bad_sessions = bad;
    out.first_problem = problem;
    out.cpu_ms_per_1k_tokens = cpu_ms / (tokens as f64 / 1000.0).max(1e-9);
    out.server_cores = cpu_ms / 1000.0 / wall.max(1e-9);
    out.mock_cores = mock.map(|c| c / n);
    out.loadgen_cores = loadgen;
    out
}

/// Scrapes a server's `GET /metrics` once a second while a scenario runs, and counts the answers.
struct Scraper {
    http: reqwest::Client,
    ok: std::cell::Cell<u64>,
    failed: std::cell::Cell<u64>,
    bytes: std::cell::Cell<u64>,
}

impl Scraper {
    fn new(http: reqwest::Client) -> Self {
        Scraper {
            http,
            ok: Default::default(),
            failed: Default::default(),
            bytes: Default::default(),
        }
    }

    /// Runs `work` with a scrape every second beside it (the first one a second in).
    async fn during<T>(&self, base: &str, work: impl std::future::Future<Output = T>) -> T {
        let url = format!("{base}/metrics");
        let scrape = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let answer = match self.http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.ok(),
                    _ => None,
                };
                match answer {
                    Some(body) => {
                        self.ok.set(self.ok.get() + 1);
                        self.bytes.set(self.bytes.get() + body.len() as u64);
                    }
                    None => self.failed.set(self.failed.get() + 1),
                }
            }
        };
        tokio::select! {
            out = work => out,
            () = scrape => unreachable!("the scraper loops until the work is done"),
        }
    }

    fn note(&self) -> String {
        let ok = self.ok.get();
        let mean_kb = if ok > 0 {
            self.bytes.get() as f64 / ok as f64 / 1000.0
        } else {
            0.0
        };
        format!(
            "{}: GET /metrics every second while measured: {ok} scrapes answered (about {mean_kb:.1} KB each), {} failed.",
            report::AGENTD_SCRAPED,
            self.failed.get()
        )
    }
}

/// Lets the previous server's trailing work finish before the next measurement.
async fn pause() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn start(
    http: &reqwest::Client,
    launch: Launch,
    cpu: Option<usize>,
    logs: &Path,
) -> Result<Server> {
    let log = logs.join(format!("{}.log", launch.kind.name()));
    let limit = if launch.kind == Kind::Peer { 60 } else { 90 };
    let mut server = Server::spawn(launch, cpu, log)?;
    server
        .wait_healthy(http, Duration::from_secs(limit))
        .await?;
    Ok(server)
}

async fn restart(
    http: &reqwest::Client,
    slot: &mut Slot,
    cpu: Option<usize>,
    logs: &Path,
) -> Result<()> {
    if let Some(mut old) = slot.server.take() {
        old.stop();
    }
    let launch = slot
        .launch
        .clone()
        .ok_or_else(|| Error::new("no launch recorded"))?;
    slot.server = Some(start(http, launch, cpu, logs).await?);
    Ok(())
}

/// Runs one scenario against the slot's server, turning a dead server or a failure into a cell.
async fn measure<T, F, Fut>(
    slot: &mut Slot,
    mock_pid: u32,
    scraper: Option<&Scraper>,
    f: F,
) -> Cell<T>
where
    F: FnOnce(Probe) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let Some(server) = slot.server.as_mut() else {
        return Cell::NotRun(
            slot.not_run
                .clone()
                .unwrap_or_else(|| "server not running".into()),
        );
    };
    if !server.running() {
        return Cell::Failed(format!(
            "server exited; last log lines: {}",
            servers::tail(&server.log, 3)
        ));
    }
    let Some(probe) = slot.probe(mock_pid) else {
        return Cell::NotRun("server not running".into());
    };
    let base = slot
        .server
        .as_ref()
        .map(|s| s.base.clone())
        .unwrap_or_default();
    let result = match scraper {
        Some(scraper) => scraper.during(&base, f(probe)).await,
        None => f(probe).await,
    };
    let died = slot.server.as_mut().is_some_and(|s| !s.running());
    match result {
        Ok(v) if !died => Cell::Ok(v),
        Ok(_) => Cell::Failed("server exited during the scenario".into()),
        Err(e) => Cell::Failed(e.to_string()),
    }
}

fn log_cell<T: std::fmt::Debug>(label: &str, what: &str, cell: &Cell<T>) {
    match cell {
        Cell::Ok(v) => eprintln!("agentd-bench: {label} {what}: {v:?}"),
        Cell::NotRun(r) => eprintln!("agentd-bench: {label} {what}: not run: {r}"),
        Cell::Failed(r) => eprintln!("agentd-bench: {label} {what}: FAILED: {r}"),
    }
}

/// `path` relative to `base` when it lies inside it.
fn relative_to(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Re-renders `results.md` and `plot.png` in `out_dir` from a saved `results.json` (and the results
/// section of `doc`, when given): for changing the presentation without re-measuring.
pub fn rerender(results_json: &Path, out_dir: &Path, doc: Option<PathBuf>) -> Result<()> {
    let text = std::fs::read_to_string(results_json)
        .map_err(|e| Error::new(format!("cannot read {}: {e}", results_json.display())))?;
    let mut results: Results = serde_json::from_str(&text)?;
    results.notes.retain(|n| !n.starts_with("No plot:"));
    std::fs::create_dir_all(out_dir)?;
    write_files(out_dir, doc.as_deref(), &mut results)
}

fn write_outputs(opts: &Options, results: &mut Results) -> Result<()> {
    write_files(&opts.out_dir, opts.doc.as_deref(), results)
}

fn write_files(out_dir: &Path, doc: Option<&Path>, results: &mut Results) -> Result<()> {
    let plot_path = out_dir.join("plot.png");
    let plot_ok = match crate::plot::draw(results, &plot_path) {
        Ok(()) => true,
        Err(e) => {
            results.notes.push(format!("No plot: {e}"));
            false
        }
    };
    let md = report::markdown(results, plot_ok.then_some("plot.png"));
    std::fs::write(out_dir.join("results.md"), &md)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    if let Some(doc) = doc {
        let doc_dir = doc.parent().unwrap_or(Path::new("."));
        let plot_rel = relative_to(&plot_path, doc_dir);
        let section = report::markdown(results, plot_ok.then_some(plot_rel.as_str()));
        if let Err(e) = report::update_doc(doc, &section) {
            eprintln!("agentd-bench: {e}");
        }
    }
    println!("{md}");
    eprintln!(
        "agentd-bench: wrote {}",
        out_dir.join("results.md").display()
    );
    Ok(())
}

/// Whether the harness itself worked: some target ran and delivered tokens. (A server failing is a finding,
/// reported in the table; the harness delivering nothing from any server is a harness failure.)
pub fn harness_check(results: &Results, scenarios: Scenarios) -> Result<()> {
    let ran: Vec<&TargetReport> = results
        .targets
        .iter()
        .filter(|t| t.not_run.is_none())
        .collect();
    if ran.is_empty() {
        return Err(Error::new("no target ran"));
    }
    let tokens: u64 = ran
        .iter()
        .flat_map(|t| t.throughput.iter())
        .filter_map(|(_, c)| c.ok())
        .map(|v| v.tokens)
        .sum();
    if tokens == 0 && scenarios.throughput {
        return Err(Error::new(
            "no token was delivered in the throughput scenario",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternating_rounds_swap_the_order_each_round() {
        let pair = Pair {
            plain: 3,
            scraped: 5,
            rounds: 4,
        };
        let firsts: Vec<usize> = (0..4).map(|r| pair.order(r)[0].1).collect();
        assert_eq!(firsts, [3, 5, 3, 5]);
        assert!(pair.has(3) && pair.has(5) && !pair.has(4));
    }

    #[test]
    fn pooled_rounds_sum_cpu_and_tokens_and_a_failed_round_fails_the_cell() {
        let round = |tokens: u64, cpu_s: f64, wall_s: f64| ThroughputResult {
            tokens,
            expected_tokens: tokens,
            server_cpu_s: cpu_s,
            wall_s,
            rounds: 2,
            ..Default::default()
        };
        let cell = pool(
            vec![
                Cell::Ok(round(1000, 0.1, 1.0)),
                Cell::Ok(round(3000, 0.5, 2.0)),
            ],
            merge_throughput,
        );
        let v = cell.ok().expect("pooled");
        assert_eq!((v.tokens, v.rounds), (4000, 4));
        // 0.6 CPU-s over 4,000 tokens: 150 ms per 1,000 (not the mean of 100 and 166.7).
        assert!((v.cpu_ms_per_1k_tokens - 150.0).abs() < 1e-9);
        assert!((v.tokens_per_s - 4000.0 / 3.0).abs() < 1e-9);

        let failed = pool(
            vec![Cell::Ok(round(1000, 0.1, 1.0)), Cell::Failed("boom".into())],
            merge_throughput,
        );
        assert!(matches!(failed, Cell::Failed(m) if m == "boom"));
    }

    #[test]
    fn pooled_latency_rounds_weigh_cpu_by_tokens_and_keep_the_median_rounds_percentiles() {
        let round = |tokens: u64, cpu: f64, p99: f64| LatencyResult {
            tokens,
            cpu_ms_per_1k_tokens: cpu,
            wall_s: 1.0,
            added: crate::stats::Summary {
                count: 1,
                p50_ms: 1.0,
                p99_ms: p99,
                max_ms: p99,
            },
            ..Default::default()
        };
        let v = merge_latency(vec![
            round(1000, 100.0, 9.0),
            round(3000, 200.0, 3.0),
            round(1000, 100.0, 5.0),
        ]);
        assert_eq!(v.tokens, 5000);
        // (100 + 600 + 100) ms over 5,000 tokens.
        assert!((v.cpu_ms_per_1k_tokens - 160.0).abs() < 1e-9);
        assert_eq!(v.added.p99_ms, 5.0);
    }
}
