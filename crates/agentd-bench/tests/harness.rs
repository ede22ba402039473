//! End-to-end tests of the harness: the mock upstream over real HTTP, and the load generator against tiny
//! servers written here (a navi relay and a native-protocol server with an event log), so the figures the
//! bench reports are known to be counted right: every token, the latency a server adds, lost tokens, and
//! missed or duplicated events on re-attach.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_bench::client::{Dialect, Target};
use agentd_bench::mock::{self, MockConfig};
use agentd_bench::scenario::{self, LatencyParams, Probe, ReattachParams, ThroughputParams};
use agentd_bench::stamp::{now_micros, StampParser};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast;

async fn start_mock() -> String {
    let (addr, _task) = mock::spawn(0, MockConfig::default()).await.unwrap();
    format!("http://{addr}")
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// Streams a chat completion from the mock, calling `on_delta` for each content delta; returns the text.
async fn stream_upstream(
    upstream: &str,
    content: &str,
    mut on_delta: impl FnMut(String),
) -> String {
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": content}]});
    let resp = reqwest::Client::new()
        .post(format!("{upstream}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut full = String::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..i + 2).collect();
            let line = String::from_utf8(event).unwrap();
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return full;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(d) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                if !d.is_empty() {
                    full.push_str(d);
                    on_delta(d.to_string());
                }
            }
        }
    }
    full
}

#[tokio::test]
async fn mock_streams_stamped_tokens_tool_calls_and_failures() {
    let upstream = start_mock().await;
    let http = reqwest::Client::new();

    // Paced tokens: indices in order, stamps between the request and the reply's end, delay respected.
    let t0 = Instant::now();
    let before = now_micros();
    let mut stamps = Vec::new();
    let mut parser = StampParser::new();
    stream_upstream(&upstream, "hello tokens=5 delay_ms=20", |d| {
        parser.feed(&d, |s| stamps.push(s))
    })
    .await;
    let after = now_micros();
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "5 tokens at 20 ms each take 100 ms"
    );
    assert_eq!(
        stamps.iter().map(|s| s.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert!(stamps
        .iter()
        .all(|s| s.emitted_us >= before && s.emitted_us <= after));
    // Paced on a schedule from the request (token i at 20 ms × (i + 1)), so on a loaded machine a late token
    // may follow the one before it closely, but none comes before its time.
    assert!(
        stamps
            .iter()
            .all(|s| s.emitted_us >= before + 20_000 * (u64::from(s.index) + 1)),
        "tokens are paced: {stamps:?}"
    );

    // A calculator call when tools are offered, in two fragments; then the answer to the tool result.
    let req = json!({"model": "m", "stream": true, "tools": [{"type": "function", "function": {"name": "calculator"}}],
                     "messages": [{"role": "user", "content": "calc: 2*(3+4)^2"}]});
    let text = http
        .post(format!("{upstream}/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut args = String::new();
    let mut name = String::new();
    let mut finish = String::new();
    for line in text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
    {
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(tc) = v.pointer("/choices/0/delta/tool_calls/0/function") {
            name.push_str(tc.get("name").and_then(Value::as_str).unwrap_or(""));
            args.push_str(tc.get("arguments").and_then(Value::as_str).unwrap_or(""));
        }
        if let Some(f) = v
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
        {
            finish = f.to_string();
        }
    }
    assert_eq!(name, "calculator");
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"expression": "2*(3+4)^2"})
    );
    assert_eq!(finish, "tool_calls");
    let req = json!({"model": "m", "stream": false, "messages": [
        {"role": "user", "content": "calc: 2*(3+4)^2"},
        {"role": "assistant", "content": null, "tool_calls": []},
        {"role": "tool", "tool_call_id": "call_mock_1", "content": "98"}]});
    let v: Value = http
        .post(format!("{upstream}/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v.pointer("/choices/0/message/content")
            .and_then(Value::as_str),
        Some("The result is 98.")
    );

    // status=NNN fails the request with that status.
    let req = json!({"stream": true, "messages": [{"role": "user", "content": "boom status=503"}]});
    let resp = http
        .post(format!("{upstream}/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);

    // The counters saw the plain reply's tokens.
    let stats: Value = http
        .get(format!("{upstream}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stats["tokens"].as_u64().unwrap() >= 5);
}

/// A navi relay: each delta from the mock is forwarded after `delay`; every `drop_every`-th delta is lost.
#[derive(Clone)]
struct Relay {
    upstream: String,
    delay: Duration,
    drop_every: Option<usize>,
    next_id: Arc<AtomicU64>,
}

async fn relay_create(State(r): State<Relay>) -> impl IntoResponse {
    (
        StatusCode::CREATED,
        Json(json!({"id": r.next_id.fetch_add(1, Ordering::Relaxed).to_string()})),
    )
}

async fn relay_ws(State(r): State<Relay>, up: WebSocketUpgrade) -> impl IntoResponse {
    up.on_upgrade(move |ws| relay_conn(r, ws))
}

async fn relay_conn(r: Relay, mut ws: WebSocket) {
    while let Some(Ok(Message::Text(t))) = ws.recv().await {
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        let content = v["content"].as_str().unwrap_or("").to_string();
        ws.send(Message::Text(
            json!({"type": "stream_start"}).to_string().into(),
        ))
        .await
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let upstream = r.upstream.clone();
        let fetch = tokio::spawn(async move {
            stream_upstream(&upstream, &content, |d| {
                let _ = tx.send(d);
            })
            .await
        });
        let mut n = 0;
        while let Some(d) = rx.recv().await {
            n += 1;
            if r.drop_every.is_some_and(|k| n % k == 0) {
                continue;
            }
            tokio::time::sleep(r.delay).await;
            let frame = json!({"type": "stream_delta", "delta": d}).to_string();
            if ws.send(Message::Text(frame.into())).await.is_err() {
                return;
            }
        }
        let full = fetch.await.unwrap();
        let end = json!({"type": "stream_end", "content": full, "context_tokens": 1, "max_context_tokens": 8192});
        if ws
            .send(Message::Text(end.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn start_relay(upstream: &str, delay: Duration, drop_every: Option<usize>) -> Target {
    let state = Relay {
        upstream: upstream.to_string(),
        delay,
        drop_every,
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let router = Router::new()
        .route("/sessions", post(relay_create))
        .route("/ws/sessions/{id}", get(relay_ws))
        .with_state(state);
    Target::navi("relay", &serve(router).await)
}

fn probe() -> Probe {
    Probe {
        server_pid: std::process::id(),
        mock_pid: None,
        pg_database: None,
    }
}

#[tokio::test]
async fn load_generator_counts_tokens_and_measures_added_latency() {
    let upstream = start_mock().await;
    let http = agentd_bench::client::http_client().unwrap();

    // Every token of every session is counted.
    let fast = start_relay(&upstream, Duration::ZERO, None).await;
    let p = ThroughputParams {
        sessions: 5,
        tokens: 20,
        min_wall: Duration::ZERO,
        max_rounds: 1,
        turn_limit: Duration::from_secs(30),
    };
    let r = scenario::throughput(&http, &fast, probe(), p)
        .await
        .unwrap();
    assert_eq!(
        (r.tokens, r.expected_tokens, r.bad_sessions, r.rounds),
        (100, 100, 0, 1),
        "{r:?}"
    );
    assert!(r.tokens_per_s > 0.0 && r.wall_s > 0.0);

    // A relay that adds 15 ms before each delta shows about 15 ms of added latency; one that adds nothing
    // shows much less.
    let lp = LatencyParams {
        sessions: 4,
        tokens: 10,
        delay_ms: 40,
        stagger: Duration::from_millis(40),
        turn_limit: Duration::from_secs(30),
    };
    let slow = start_relay(&upstream, Duration::from_millis(15), None).await;
    let r = scenario::latency(&http, &slow, probe(), lp).await.unwrap();
    assert_eq!((r.tokens, r.bad_sessions), (40, 0), "{r:?}");
    assert_eq!(r.added.count, 40);
    assert!(
        r.added.p50_ms >= 15.0 && r.added.p50_ms < 115.0,
        "p50 {} ms",
        r.added.p50_ms
    );
    assert!(r.added.max_ms >= r.added.p99_ms && r.added.p99_ms >= r.added.p50_ms);
    let r = scenario::latency(&http, &fast, probe(), lp).await.unwrap();
    assert!(
        r.added.p50_ms < 15.0,
        "a pass-through relay adds little: p50 {} ms",
        r.added.p50_ms
    );

    // Lost deltas are reported, not hidden.
    let lossy = start_relay(&upstream, Duration::ZERO, Some(5)).await;
    let r = scenario::throughput(&http, &lossy, probe(), p)
        .await
        .unwrap();
    assert_eq!(r.tokens, 80, "every 5th of 20 tokens lost in 5 sessions");
    assert_eq!(r.bad_sessions, 5);
    assert!(
        r.first_problem.as_deref().unwrap_or("").contains("differs"),
        "{:?}",
        r.first_problem
    );
}

/// How the native test server answers `?after=N`.
#[derive(Clone, Copy, PartialEq)]
enum Replay {
    /// Events with seq > N (correct).
    AfterCursor,
    /// Events with seq >= N: the last seen event comes again.
    IncludingCursor,
    /// Only live events: whatever happened while away is lost.
    LiveOnly,
}

struct NativeSession {
    events: Vec<String>,
    live: broadcast::Sender<(u64, String)>,
}

#[derive(Clone)]
struct Native {
    upstream: String,
    replay: Replay,
    sessions: Arc<Mutex<HashMap<String, NativeSession>>>,
    next_id: Arc<AtomicU64>,
}

impl Native {
    fn append(&self, sid: &str, mut event: Value) {
        let mut sessions = self.sessions.lock().unwrap();
        let s = sessions.get_mut(sid).unwrap();
        let seq = s.events.len() as u64 + 1;
        event["seq"] = json!(seq);
        let text = event.to_string();
        s.events.push(text.clone());
        let _ = s.live.send((seq, text));
    }
}

async fn native_create(State(n): State<Native>) -> impl IntoResponse {
    let id = format!("s{}", n.next_id.fetch_add(1, Ordering::Relaxed));
    let (live, _) = broadcast::channel(4096);
    n.sessions.lock().unwrap().insert(
        id.clone(),
        NativeSession {
            events: Vec::new(),
            live,
        },
    );
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "agent": "assistant"})),
    )
}

async fn native_ws(
    State(n): State<Native>,
    Path(sid): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    up: WebSocketUpgrade,
) -> impl IntoResponse {
    let after: Option<u64> = q.get("after").and_then(|a| a.parse().ok());
    up.on_upgrade(move |ws| native_conn(n, sid, after, ws))
}

async fn native_conn(n: Native, sid: String, after: Option<u64>, ws: WebSocket) {
    let (mut tx, mut rx) = ws.split();
    // Snapshot and subscribe under one lock, so no event falls between them.
    let (backlog, mut live) = {
        let sessions = n.sessions.lock().unwrap();
        let s = &sessions[&sid];
        (s.events.clone(), s.live.subscribe())
    };
    let hello = json!({"type": "hello", "session_id": sid, "last_seq": backlog.len(), "active_run_id": null});
    if tx
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let from = match (n.replay, after) {
        (_, None) => backlog.len(),
        (Replay::AfterCursor, Some(a)) => a as usize,
        (Replay::IncludingCursor, Some(a)) => (a as usize).saturating_sub(1),
        (Replay::LiveOnly, Some(_)) => backlog.len(),
    };
    for e in backlog.iter().skip(from) {
        if tx.send(Message::Text(e.clone().into())).await.is_err() {
            return;
        }
    }
    let mut sent = backlog.len() as u64;
    if n.replay == Replay::LiveOnly && after.is_some() {
        // Pretend the reconnect took a while: what arrives meanwhile is lost.
        tokio::time::sleep(Duration::from_millis(60)).await;
        while let Ok((seq, _)) = live.try_recv() {
            sent = seq;
        }
    }
    loop {
        tokio::select! {
            ev = live.recv() => {
                let Ok((seq, text)) = ev else { return };
                if seq > sent {
                    sent = seq;
                    if tx.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
            }
            msg = rx.next() => {
                let Some(Ok(Message::Text(t))) = msg else { return };
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                let content = v["content"].as_str().unwrap_or("").to_string();
                // The run belongs to the session, not to this connection: it goes on after a drop.
                let n = n.clone();
                let sid = sid.clone();
                tokio::spawn(async move {
                    let base = json!({"run_id": "r1", "agent": "assistant", "is_subagent": false});
                    let with = |mut extra: Value| { for (k, v) in base.as_object().unwrap() { extra[k] = v.clone(); } extra };
                    n.append(&sid, with(json!({"type": "run_started", "run": {"status": "running"}})));
                    let upstream = n.upstream.clone();
                    let full = stream_upstream(&upstream, &content, |d| {
                        n.append(&sid, with(json!({"type": "text_delta", "delta": d})));
                    })
                    .await;
                    n.append(&sid, with(json!({"type": "run_finished", "run": {"status": "completed", "error": null}, "content": full})));
                });
            }
        }
    }
}

async fn start_native(upstream: &str, replay: Replay) -> Target {
    let state = Native {
        upstream: upstream.to_string(),
        replay,
        sessions: Arc::new(Mutex::new(HashMap::new())),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let router = Router::new()
        .route("/v1/sessions", post(native_create))
        .route("/v1/sessions/{id}/ws", get(native_ws))
        .with_state(state);
    Target::agentd("native", &serve(router).await, "assistant", Dialect::Native)
}

#[tokio::test]
async fn reattach_counts_missed_and_duplicated_events() {
    let upstream = start_mock().await;
    let http = agentd_bench::client::http_client().unwrap();
    let p = ReattachParams {
        clients: 6,
        tokens: 30,
        delay_ms: 15,
        drop_after: 8,
        gap: Duration::from_millis(50),
        stagger: Duration::from_millis(30),
        quiet_limit: Duration::from_secs(2),
    };

    let exact = start_native(&upstream, Replay::AfterCursor).await;
    let r = scenario::reattach(&http, &exact, p).await.unwrap();
    assert_eq!(
        (r.completed, r.missed_events, r.duplicated_events),
        (6, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.resumed_exactly, 6, "{r:?}");
    assert_eq!(r.first_token.count, 6);

    let dup = start_native(&upstream, Replay::IncludingCursor).await;
    let r = scenario::reattach(&http, &dup, p).await.unwrap();
    assert_eq!(r.clients_with_duplicates, 6, "{r:?}");
    assert!(r.duplicated_events >= 6);

    let lossy = start_native(&upstream, Replay::LiveOnly).await;
    let r = scenario::reattach(&http, &lossy, p).await.unwrap();
    assert_eq!(r.clients_with_missed, 6, "{r:?}");
    assert!(r.missed_events >= 6);

    // A navi relay whose turn dies with its connection gives nothing on re-attach.
    let relay = start_relay(&upstream, Duration::ZERO, None).await;
    let r = scenario::reattach(
        &http,
        &relay,
        ReattachParams {
            clients: 2,
            quiet_limit: Duration::from_millis(500),
            ..p
        },
    )
    .await
    .unwrap();
    assert_eq!((r.no_replay, r.completed), (2, 0), "{r:?}");
    assert_eq!(
        r.missed_events,
        2 * u64::from(p.tokens - p.drop_after),
        "{r:?}"
    );
}
