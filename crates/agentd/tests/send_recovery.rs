//! A send survives what happens around it, over the real server (HTTP/WebSocket on port 0, a real SQLite file,
//! the mock upstream): a client that closes its WebSocket right after sending leaves no run `queued`, and a
//! retry of a send whose message a killed process never stored is stored and run.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_core::domain::Run;
use common::{Options, Server};
use serde_json::{json, Value};
use tokio_tungstenite::MaybeTlsStream;

fn run_finished_of(events: &[Arc<agentd_core::event::LoggedEvent>], run_id: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            e.event.run_id == run_id
                && matches!(
                    e.event.kind,
                    agentd_core::event::EventKind::RunFinished { .. }
                )
        })
        .count()
}

#[tokio::test]
async fn a_retry_after_a_kill_between_run_row_and_message_stores_the_message() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // What the first process left when it was killed mid-send: the session, and the send's run row with its
    // client_message_id committed, but not its user message. Written through the server's own store.
    let text = common::config_text("http://127.0.0.1:1/v1", dir.path(), 30, "");
    let config = agentd_core::config::Config::parse(&text, "test.toml").unwrap();
    let store = agentd::store(&config).await.unwrap();
    let now = agentd_core::domain::now_rfc3339();
    let id = agentd_core::domain::new_id();
    store
        .create_session(&agentd_core::domain::Session {
            id: id.clone(),
            agent: "assistant".into(),
            title: None,
            status: agentd_core::domain::SessionStatus::Active,
            metadata: json!({}),
            created_at: now.clone(),
            updated_at: now,
            active_run_id: None,
            principal: "local".into(),
        })
        .await
        .unwrap();
    let orphan = Run::queued(&id);
    store.create_run(&orphan, Some("m-1")).await.unwrap();
    drop(store);

    // The next process sweeps the orphan (interrupted), then the client retries.
    let s = Server::start_with(Options {
        dir: Some(dir.clone()),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let (_, swept) = c
        .get(&format!("/v1/sessions/{id}/runs/{}", orphan.id))
        .await;
    assert_eq!(swept["status"], "interrupted", "{swept}");
    let body = json!({"content": "tokens=2", "client_message_id": "m-1"});
    let (status, a) = c
        .post(&format!("/v1/sessions/{id}/messages"), body.clone())
        .await;
    assert_eq!(status, 200, "{a}");
    let run = a["run"]["id"].as_str().unwrap().to_string();
    assert_ne!(
        run, orphan.id,
        "the retry is not a repeat of the orphan: {a}"
    );
    assert_eq!(c.wait_run(&id, &run).await["status"], "completed");
    let users = |msgs: Vec<Value>| -> Vec<Value> {
        msgs.into_iter().filter(|m| m["role"] == "user").collect()
    };
    let stored = users(c.messages(&id).await);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["content"], "tokens=2");
    assert_eq!(stored[0]["run_id"], run.as_str());
    // From now on a retry is a repeat: same run, nothing stored.
    let (status, b) = c.post(&format!("/v1/sessions/{id}/messages"), body).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["run"]["id"], run.as_str());
    assert_eq!(users(c.messages(&id).await).len(), 1);
    assert_eq!(s.upstream.request_count(), 1, "the turn ran once");
    // Exactly one run_finished per run: the orphan's from the sweep, the new run's own.
    let events = s.app.store.read_events(&id, 0, 10_000).await.unwrap();
    assert_eq!(run_finished_of(&events, &orphan.id), 1);
    assert_eq!(run_finished_of(&events, &run), 1);
}

#[tokio::test]
async fn websocket_closed_right_after_a_send_leaves_no_run_queued() {
    let s = Server::start().await;
    let c = s.client();
    let mut sessions = Vec::new();
    for _ in 0..50 {
        let id = c.session().await;
        let mut ws = c.ws(&id, "").await;
        ws.send(json!({"type": "message", "content": "tokens=3 delay_ms=5"}))
            .await;
        // Gone at once, with a reset (zero linger): the server's next write fails while it is storing the
        // send, and its connection handler ends (dropping the reader's in-flight send).
        if let MaybeTlsStream::Plain(tcp) = ws.socket.get_ref() {
            tcp.set_zero_linger().unwrap();
        }
        drop(ws);
        sessions.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut runs_seen = 0;
    for id in &sessions {
        loop {
            let runs = s.app.store.list_runs(id).await.unwrap();
            let open: Vec<_> = runs.iter().filter(|r| !r.status.is_terminal()).collect();
            if open.is_empty() {
                runs_seen += runs.len();
                // Every stored message has its run, and every run ran to its run_finished.
                let events = s.app.store.read_events(id, 0, 10_000).await.unwrap();
                for r in &runs {
                    assert_eq!(run_finished_of(&events, &r.id), 1, "run {}", r.id);
                }
                let users = c
                    .messages(id)
                    .await
                    .into_iter()
                    .filter(|m| m["role"] == "user")
                    .count();
                assert_eq!(users, runs.len(), "session {id}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "session {id}: runs left unfinished: {:?}",
                open.iter().map(|r| (&r.id, r.status)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        runs_seen > 0,
        "no send reached the server: the test proved nothing"
    );
}
