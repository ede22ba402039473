//! agentd's OpenAI-compatible streams beside its native WebSocket, in one run (`agentd-bench surfaces`): the
//! same agentd process and the same lean mock upstream; per round, each surface in turn (the order rotates)
//! streams `streams` concurrent turns of `tokens` tokens, and the server's CPU over that window is divided by
//! the tokens delivered. The native WebSocket's sessions and sockets are opened before the window; a chat
//! completion or a response creates its session inside it (that is what those surfaces cost per turn).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::client::{self, Dialect, Target};
use crate::mock::{self, MockConfig};
use crate::{procfs, Error, Result};

/// The surfaces compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    NativeWs,
    ChatCompletions,
    Responses,
}

impl Surface {
    pub fn label(self) -> &'static str {
        match self {
            Surface::NativeWs => "native WebSocket",
            Surface::ChatCompletions => "/v1/chat/completions (SSE)",
            Surface::Responses => "/v1/responses (SSE)",
        }
    }
}

const ALL: [Surface; 3] = [
    Surface::NativeWs,
    Surface::ChatCompletions,
    Surface::Responses,
];

/// What one surface delivered over the run (all rounds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub tokens: u64,
    pub server_cpu_s: f64,
    pub wall_s: f64,
    pub failed: usize,
}

impl Figures {
    pub fn cpu_us_per_token(&self) -> f64 {
        if self.tokens == 0 {
            return f64::NAN;
        }
        self.server_cpu_s * 1e6 / self.tokens as f64
    }
}

pub struct Args {
    pub agentd_bin: PathBuf,
    pub streams: usize,
    pub tokens: u32,
    pub rounds: u32,
}

/// The agentd process under test; killed when dropped.
struct Agentd {
    child: Child,
    base: String,
}

impl Drop for Agentd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_agentd(bin: &Path, dir: &Path, upstream: &str) -> Result<Agentd> {
    let config = dir.join("agentd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkspace_dir = \"{dir}/workspaces\"\n\n[store]\nurl = \"sqlite://{dir}/agentd.db\"\n\n\
         [providers.upstream]\nkind = \"openai\"\nbase_url = \"{upstream}\"\n\n\
         [[agents]]\nname = \"bench\"\nprovider = \"upstream\"\nmodel = \"mock\"\n",
        dir = dir.display()
    );
    std::fs::write(&config, text)?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("agentd.log"))?;
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| Error::new(format!("starting {}: {e}", bin.display())))?;
    let server = Agentd {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = client::http_client()?;
    for _ in 0..400 {
        if http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(server);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Error::new("agentd did not answer /healthz within 20 s"))
}

/// Counts the text deltas of one SSE body (`is_delta` lines) and checks that it ended (an `end` line).
async fn sse_count(resp: reqwest::Response, is_delta: fn(&[u8]) -> bool, end: &str) -> Result<u64> {
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(Error::new(format!(
            "answered {status}: {}",
            client::clip(&body, 200)
        )));
    }
    let mut body = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut count = 0u64;
    let mut ended = false;
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if is_delta(&line) {
                count += 1;
            } else if line.starts_with(end.as_bytes()) {
                ended = true;
            }
        }
    }
    if !ended {
        return Err(Error::new("the stream ended without its end event"));
    }
    Ok(count)
}

fn contains(line: &[u8], needle: &[u8]) -> bool {
    line.windows(needle.len()).any(|w| w == needle)
}

/// A chat chunk carrying text (not the first chunk's role, not the finish).
fn chat_delta(line: &[u8]) -> bool {
    line.starts_with(b"data: ")
        && contains(line, b"\"delta\":{\"content\":\"")
        && !contains(line, b"\"role\"")
}

fn responses_delta(line: &[u8]) -> bool {
    line.starts_with(b"event: response.output_text.delta")
}

/// One round of one surface: `(tokens, failed turns, server CPU s, wall s)`.
async fn round(
    surface: Surface,
    server: &Agentd,
    pid: u32,
    streams: usize,
    tokens: u32,
) -> Result<Figures> {
    let http = client::http_client()?;
    let content = format!("tokens={tokens}");
    let target = Target::agentd("agentd", &server.base, "bench", Dialect::Native);
    // Set-up outside the window: the native sessions and their sockets.
    let mut sockets = Vec::new();
    if surface == Surface::NativeWs {
        let sessions = client::create_sessions(&http, &target, streams, 32).await?;
        sockets = client::connect_all(&target, &sessions, 64).await?;
    }
    let cpu0 = procfs::cpu_seconds(pid);
    let t0 = Instant::now();
    let limit = Duration::from_secs(120);
    let counts: Vec<Result<u64>> = match surface {
        Surface::NativeWs => {
            let turns = sockets.iter_mut().map(|ws| {
                let content = content.clone();
                async move {
                    let out = client::run_turn(ws, Dialect::Native, &content, limit).await;
                    match out.problem {
                        Some(p) => Err(Error::new(p)),
                        None => Ok(u64::from(out.tokens)),
                    }
                }
            });
            futures_util::future::join_all(turns).await
        }
        Surface::ChatCompletions | Surface::Responses => {
            let (path, body, is_delta, end) = if surface == Surface::ChatCompletions {
                (
                    "/v1/chat/completions",
                    json!({"model": "bench", "stream": true, "messages": [{"role": "user", "content": content}]}),
                    chat_delta as fn(&[u8]) -> bool,
                    "data: [DONE]",
                )
            } else {
                (
                    "/v1/responses",
                    json!({"model": "bench", "stream": true, "input": content}),
                    responses_delta as fn(&[u8]) -> bool,
                    "event: response.completed",
                )
            };
            let turns = (0..streams).map(|_| {
                let req = http
                    .post(format!("{}{path}", server.base))
                    .timeout(limit)
                    .json(&body);
                async move { sse_count(req.send().await?, is_delta, end).await }
            });
            futures_util::future::join_all(turns).await
        }
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let server_cpu_s = procfs::cpu_seconds(pid) - cpu0;
    client::close_all(sockets).await;
    let mut f = Figures {
        server_cpu_s,
        wall_s,
        ..Figures::default()
    };
    for c in counts {
        match c {
            Ok(n) => f.tokens += n,
            Err(e) => {
                f.failed += 1;
                eprintln!("{}: {e}", surface.label());
            }
        }
    }
    Ok(f)
}

/// Runs the comparison; returns the figures per surface, in [`ALL`]'s order.
pub async fn run(args: &Args) -> Result<Vec<(Surface, Figures)>> {
    let (addr, _mock) = mock::spawn(
        0,
        MockConfig {
            tokens: args.tokens,
            delay_ms: 0,
        },
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let server = start_agentd(&args.agentd_bin, dir.path(), &format!("http://{addr}/v1")).await?;
    let pid = server.child.id();
    // A warm-up turn of each surface (connections, the database's first pages).
    for s in ALL {
        round(s, &server, pid, 2, 10).await?;
    }
    let mut totals: Vec<(Surface, Figures)> =
        ALL.iter().map(|s| (*s, Figures::default())).collect();
    for r in 0..args.rounds as usize {
        for k in 0..ALL.len() {
            let i = (k + r) % ALL.len();
            let f = round(ALL[i], &server, pid, args.streams, args.tokens).await?;
            let t = &mut totals[i].1;
            t.tokens += f.tokens;
            t.server_cpu_s += f.server_cpu_s;
            t.wall_s += f.wall_s;
            t.failed += f.failed;
        }
    }
    Ok(totals)
}

/// The figures as a markdown table, each surface's CPU per token beside the native WebSocket's.
pub fn table(args: &Args, figures: &[(Surface, Figures)]) -> String {
    let native = figures
        .iter()
        .find(|(s, _)| *s == Surface::NativeWs)
        .map(|(_, f)| f.cpu_us_per_token())
        .unwrap_or(f64::NAN);
    let mut out = format!(
        "{} streams x {} tokens, {} rounds (surfaces alternating), agentd `{}`\n\n\
         | surface | tokens | failed turns | server CPU (s) | CPU per token (us) | vs native |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
        args.streams,
        args.tokens,
        args.rounds,
        args.agentd_bin.display()
    );
    for (s, f) in figures {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:+.1}% |\n",
            s.label(),
            f.tokens,
            f.failed,
            f.server_cpu_s,
            f.cpu_us_per_token(),
            (f.cpu_us_per_token() / native - 1.0) * 100.0
        ));
    }
    out
}
