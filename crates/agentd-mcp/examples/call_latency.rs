//! agentd's added latency per MCP tool call (issue 17's benchmark): the same stdio call of
//! tests/mcp/misbehave.js's `ok` tool made directly with the SDK (rmcp) and made through a turn.
//!
//! - direct: one rmcp client over the server's stdin/stdout, `tools/call` after `tools/call`; each call's time.
//! - through a turn: a real `Agentd` (SQLite store in a temp dir, the scripted provider so no model time is
//!   counted) with the server under `[mcp_servers.m]`; each turn's model call asks for `m__ok`; the time is
//!   from `tool_started` to `tool_finished` as a subscriber of the session's log receives them (so it
//!   includes the loop's dispatch, the registry, the hub, the result's conversion and cut, and the commit
//!   and publication of `tool_finished`).
//!
//! Added latency = through a turn - direct, compared at each percentile.
//!
//! `cargo run --release -p agentd-mcp --example call_latency -- [CALLS]` (default 1000; needs node).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::config::Config;
use agentd_core::event::EventKind;
use agentd_core::provider::Provider;
use agentd_core::scripted::{Scripted, ScriptedProvider};
use agentd_core::service::{Agentd, Principal, SendMessage};
use rmcp::model::CallToolRequestParams;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::ServiceExt;

fn misbehave() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/mcp/misbehave.js").to_string()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn direct(calls: usize) -> Result<Vec<Duration>, String> {
    let mut child = tokio::process::Command::new("node")
        .arg(misbehave())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("node: {e}"))?;
    let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
        return Err("no pipes".into());
    };
    let client =
        ().serve(AsyncRwTransport::new_client(stdout, stdin))
            .await
            .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(calls);
    for i in 0..calls + calls / 10 {
        let mut params = CallToolRequestParams::new("ok");
        params.arguments = serde_json::json!({"text": "x"}).as_object().cloned();
        let t = Instant::now();
        client
            .peer()
            .call_tool(params)
            .await
            .map_err(|e| e.to_string())?;
        // The first tenth warms up.
        if i >= calls / 10 {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

async fn through_turns(calls: usize) -> Result<Vec<Duration>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let text = format!(
        r#"
[server]
workspace_dir = "{dir}/ws"

[store]
url = "sqlite://{dir}/agentd.db"

[providers.p]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"

[mcp_servers.m]
command = "node"
args = ["{js}"]

[[agents]]
name = "assistant"
provider = "p"
model = "m"
tools = ["m__ok"]
"#,
        dir = dir.path().display(),
        js = misbehave()
    );
    let config = Arc::new(Config::parse(&text, "bench").map_err(|e| e.to_string())?);
    let provider = Arc::new(ScriptedProvider::new(Vec::new()));
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    providers.insert("p".into(), provider.clone());
    let metrics = Arc::new(agentd_core::metrics::Metrics::new());
    let hub = agentd_mcp::McpHub::start(&config, metrics.clone()).ok_or("no hub")?;
    let store = Arc::new(
        agentd_sqlite::SqliteStore::open(&dir.path().join("agentd.db"))
            .map_err(|e| e.to_string())?,
    );
    let app =
        Agentd::start_with_tools(config, store, providers, metrics, Some(hub.clone())).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while agentd_core::registry::ExternalTools::tools(hub.as_ref()).is_empty() {
        if Instant::now() > deadline {
            return Err("the server did not get ready".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let me = Principal::local();
    let session = app
        .create_session(&me, "assistant", None, None)
        .await
        .map_err(|e| e.to_string())?;
    let mut sub = app
        .attach(&me, &session.id, Some(0))
        .await
        .map_err(|e| e.to_string())?
        .subscription;
    let mut out = Vec::with_capacity(calls);
    for i in 0..calls + calls / 10 {
        provider.push(Scripted::tool_calls(&[(
            &format!("c{i}"),
            "m__ok",
            r#"{"text": "x"}"#,
        )]));
        provider.push(Scripted::text(&["done"]));
        let msg = SendMessage {
            content: "go".into(),
            ..Default::default()
        };
        app.send(&me, &session.id, msg)
            .await
            .map_err(|e| e.to_string())?;
        let mut started = None;
        loop {
            let ev = sub
                .next()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the log ended")?;
            match &ev.event.kind {
                EventKind::ToolStarted { .. } => started = Some(Instant::now()),
                EventKind::ToolFinished {
                    success, result, ..
                } => {
                    if !success {
                        return Err(format!("the call failed: {result}"));
                    }
                    if let (Some(t), true) = (started, i >= calls / 10) {
                        out.push(t.elapsed());
                    }
                }
                EventKind::RunFinished { .. } => break,
                _ => {}
            }
        }
    }
    hub.shutdown();
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let mut direct = direct(calls).await?;
    let mut turn = through_turns(calls).await?;
    direct.sort();
    turn.sort();
    println!(
        "MCP stdio call of misbehave.js `ok`, {calls} calls each (after {} warm-up calls)",
        calls / 10
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "", "p50 µs", "p90 µs", "p99 µs"
    );
    for (name, v) in [
        ("direct (rmcp)", &direct),
        ("through a turn (agentd)", &turn),
    ] {
        println!(
            "{name:<28} {:>10.0} {:>10.0} {:>10.0}",
            micros(percentile(v, 0.5)),
            micros(percentile(v, 0.9)),
            micros(percentile(v, 0.99))
        );
    }
    println!(
        "{:<28} {:>10.0} {:>10.0} {:>10.0}",
        "added by agentd",
        micros(percentile(&turn, 0.5)) - micros(percentile(&direct, 0.5)),
        micros(percentile(&turn, 0.9)) - micros(percentile(&direct, 0.9)),
        micros(percentile(&turn, 0.99)) - micros(percentile(&direct, 0.99))
    );
    Ok(())
}
