//! The embedded local model (`kind = "llama"`) through the whole server: a real turn over the native
//! WebSocket on the default model, and cancel mid-generation. The provider's own tests (grammar-constrained
//! tool calls, corrupt files) are in crates/agentd-llama.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::config::Config;
use common::{own_text, Client};
use serde_json::json;

fn model() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else if std::env::var_os("AGENTD_REQUIRE_MODEL").is_some() {
        panic!(
            "{} is absent and AGENTD_REQUIRE_MODEL is set; run ./scripts/fetch-model.sh",
            p.display()
        );
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run ./scripts/fetch-model.sh (scripts/test.sh does)",
            p.display()
        );
        None
    }
}

async fn local_server(
    model: &std::path::Path,
) -> (Client, tempfile::TempDir, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
workspace_dir = "{d}/ws"
[store]
url = "sqlite://{d}/agentd.db"
[providers.local]
kind = "llama"
model_path = "{m}"
context_tokens = 2048
threads = 2
[[agents]]
name = "assistant"
provider = "local"
model = "SmolLM2-135M-Instruct"
system_prompt = "You are a helpful assistant."
tools = ["calculator"]
"#,
        d = dir.path().display(),
        m = model.display()
    );
    let config = Config::parse(&text, "t").unwrap();
    let app = agentd::build(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(agentd_server::serve(
        listener,
        Arc::clone(&app),
        async move {
            let _ = stopped.await;
        },
    ));
    (
        Client {
            base: url,
            key: None,
            http: reqwest::Client::new(),
        },
        dir,
        stop,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_model_streams_a_turn_and_stops_on_cancel() {
    let Some(model) = model() else { return };
    let (c, _dir, _stop) = local_server(&model).await;
    let id = c.session().await;
    let mut ws = c.ws(&id, "").await;
    // A loaded CI machine feeds the first prompt slowly (seen: 27 prompt tokens/s, ~8 s for this one).
    ws.wait = Duration::from_secs(60);
    ws.next().await;
    ws.send(json!({"type": "message", "content": "Say hello in one short sentence."}))
        .await;
    let frames = ws.until_finished().await;
    let finished = frames.last().unwrap();
    assert_eq!(finished["run"]["status"], "completed", "{finished}");
    let text = own_text(&frames);
    assert!(!text.trim().is_empty(), "the model produced text");
    assert!(
        frames.iter().filter(|f| f["type"] == "text_delta").count() >= 2,
        "it streamed token by token"
    );
    assert!(
        finished["run"]["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let stored = c.messages(&id).await;
    let answer = stored.last().unwrap();
    assert_eq!(answer["role"], "assistant");
    if let Some(call) = frames.iter().find(|f| f["type"] == "tool_started") {
        // The grammar makes any tool call well-formed: a known tool with schema-valid arguments.
        assert_eq!(call["tool"], "calculator");
        assert!(call["args"]["expression"].is_string(), "{call}");
    } else {
        assert_eq!(answer["content"].as_str().unwrap(), text);
    }

    // Cancel mid-generation: stops within a token or so, keeps the partial answer.
    ws.send(json!({"type": "message", "content": "Write a very long story about a dragon who learns to cook. Make it at least 500 words."})).await;
    ws.until(|f| f["type"] == "text_delta").await;
    let t = Instant::now();
    ws.send(json!({"type": "cancel"})).await;
    let frames = ws.until_finished().await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        t.elapsed()
    );
    assert_eq!(frames.last().unwrap()["run"]["status"], "cancelled");
    let msgs = c.messages(&id).await;
    assert_eq!(
        msgs.last().unwrap()["role"],
        "assistant",
        "the partial answer is kept"
    );
}
