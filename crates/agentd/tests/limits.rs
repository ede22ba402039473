//! SPEC.md section 9's limits through the contract: `server.rate_limit_per_min` and
//! `server.max_streams_per_principal` on every surface (native REST, WebSocket and SSE, agentkit REST and
//! WebSocket, navi), and the connection bounds (`server.header_timeout_s`, `server.max_connections`) against
//! raw TCP clients that send nothing, trickle, or stall.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::time::{Duration, Instant};

use common::{Client, Options, Server, Ws};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AUTH: &str = r#"
[[auth.keys]]
principal = "alice"
key = "sk-alice"

[[auth.keys]]
principal = "bob"
key = "sk-bob"
"#;

/// A server with alice and bob, and these `[server]` keys.
async fn server(server_extra: &str) -> Server {
    Server::start_with(Options {
        extra: AUTH.into(),
        server_extra: server_extra.into(),
        ..Options::default()
    })
    .await
}

fn ws_base(s: &Server) -> String {
    s.url.replacen("http://", "ws://", 1)
}

fn native_ws_url(s: &Server, id: &str, key: &str) -> String {
    format!("{}/v1/sessions/{id}/ws?api_key={key}", ws_base(s))
}

fn kit_ws_url(s: &Server, id: &str, key: &str) -> String {
    format!("{}/chat/ws/{id}?api_key={key}", ws_base(s))
}

fn navi_ws_url(s: &Server, id: &str, key: &str) -> String {
    format!("{}/ws/sessions/{id}?api_key={key}", ws_base(s))
}

async fn connect(url: &str) -> Ws {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("ws connect {url}: {e}"));
    Ws::new(socket)
}

/// A handshake the server must refuse: its HTTP status and body.
async fn refused(url: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("the handshake to {url} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("expected an HTTP refusal from {url}, got {e}"),
    }
}

/// What a session holds: (messages, runs, events).
async fn counts(s: &Server, c: &Client, id: &str) -> (usize, usize, u64) {
    let messages = c.messages(id).await.len();
    let (status, runs) = c.get(&format!("/v1/sessions/{id}/runs")).await;
    assert_eq!(status, 200, "{runs}");
    let events = s.app.store.log_bounds(id).await.unwrap().last_seq;
    (messages, runs.as_array().unwrap().len(), events)
}

fn retry_after(resp: &reqwest::Response) -> u64 {
    let v = resp
        .headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {}", resp.status()));
    let secs: u64 = v.to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    secs
}

async fn post_raw(c: &Client, path: &str, body: Value) -> reqwest::Response {
    c.http
        .post(format!("{}{path}", c.base))
        .bearer_auth(c.key.as_deref().unwrap())
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
}

// ------------------------------------------------------------------------------------------ rate limit ----

#[tokio::test]
async fn native_rest_over_the_rate_gets_429_with_retry_after_and_stores_nothing() {
    let s = server("rate_limit_per_min = 3").await;
    let alice = s.client_with_key(Some("sk-alice"));
    let id = alice.session().await;
    for i in 0..3 {
        let (status, v) = alice.send(&id, &format!("hello {i}")).await;
        assert_eq!(status, 200, "{v}");
    }
    let before = counts(&s, &alice, &id).await;
    assert_eq!(before.0, 6, "three user messages and three answers");

    let path = format!("/v1/sessions/{id}/messages");
    let resp = post_raw(
        &alice,
        &path,
        json!({"content": "one too many", "wait": false}),
    )
    .await;
    assert_eq!(resp.status(), 429);
    retry_after(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 messages per minute"),
        "{body}"
    );
    assert_eq!(counts(&s, &alice, &id).await, before, "nothing stored");

    // Another principal has its own budget.
    let bob = s.client_with_key(Some("sk-bob"));
    let bob_id = bob.session().await;
    let (status, v) = bob.send(&bob_id, "bob is not limited by alice").await;
    assert_eq!(status, 200, "{v}");
    // Refusals are not counted either: alice is still refused, for the same reason.
    let (status, v) = alice
        .post(&path, json!({"content": "still too many", "wait": false}))
        .await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(counts(&s, &alice, &id).await, before);
}

#[tokio::test]
async fn an_idempotent_repeat_is_not_a_new_message() {
    let s = server("rate_limit_per_min = 1").await;
    let alice = s.client_with_key(Some("sk-alice"));
    let id = alice.session().await;
    let path = format!("/v1/sessions/{id}/messages");
    let first = json!({"content": "once", "client_message_id": "m-1"});
    let (status, v) = alice.post(&path, first.clone()).await;
    assert_eq!(status, 200, "{v}");
    let (status, again) = alice.post(&path, first).await;
    assert_eq!(
        status, 200,
        "a repeat answers with the first send's run: {again}"
    );
    assert_eq!(again["run"]["id"], v["run"]["id"]);
    let (status, v) = alice
        .post(
            &path,
            json!({"content": "twice", "client_message_id": "m-2"}),
        )
        .await;
    assert_eq!(status, 429, "{v}");
}

#[tokio::test]
async fn native_websocket_over_the_rate_gets_an_error_frame_and_stores_nothing() {
    let s = server("rate_limit_per_min = 2").await;
    let alice = s.client_with_key(Some("sk-alice"));
    let id = alice.session().await;
    let mut ws = connect(&native_ws_url(&s, &id, "sk-alice")).await;
    assert_eq!(ws.next().await["type"], "hello");
    for i in 0..2 {
        ws.send(json!({"type": "message", "content": format!("hi {i}")}))
            .await;
        ws.until_finished().await;
    }
    let before = counts(&s, &alice, &id).await;
    ws.send(json!({"type": "message", "content": "one too many"}))
        .await;
    let frame = ws.next().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], "rate_limited", "{frame}");
    assert!(frame.get("seq").is_none());
    assert!(
        frame["message"].as_str().unwrap().contains("retry in"),
        "{frame}"
    );
    // The socket stays open, and nothing reached the log.
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await["type"], "pong");
    assert_eq!(counts(&s, &alice, &id).await, before, "nothing stored");
}

#[tokio::test]
async fn agentkit_rest_and_websocket_over_the_rate_are_refused_in_their_shapes() {
    let s = server("rate_limit_per_min = 2").await;
    let alice = s.client_with_key(Some("sk-alice"));
    let (status, v) = alice
        .post("/chat/sessions", json!({"agent_name": "assistant"}))
        .await;
    assert_eq!(status, 200, "{v}");
    let id = v["session_id"].as_str().unwrap().to_string();
    let path = format!("/chat/sessions/{id}/messages");
    let (status, v) = alice.post(&path, json!({"content": "hello"})).await;
    assert_eq!(status, 200, "{v}");

    let mut ws = connect(&kit_ws_url(&s, &id, "sk-alice")).await;
    assert_eq!(ws.next().await["type"], "connected");
    ws.send(json!({"type": "message", "content": "second"}))
        .await;
    ws.until(|f| f["type"] == "final_answer").await;
    let before = counts(&s, &alice, &id).await;

    // REST: 429 `{"detail": ...}` with Retry-After.
    let resp = post_raw(&alice, &path, json!({"content": "third"})).await;
    assert_eq!(resp.status(), 429);
    retry_after(&resp);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("rate limit"),
        "{body}"
    );
    // WebSocket: agentkit's error frame, the socket stays open.
    ws.send(json!({"type": "message", "content": "third"}))
        .await;
    let frame = ws.next().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert!(
        frame["data"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limit"),
        "{frame}"
    );
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await["type"], "pong");
    assert_eq!(counts(&s, &alice, &id).await, before, "nothing stored");
}

#[tokio::test]
async fn navi_over_the_rate_gets_its_error_frame_and_stores_nothing() {
    let s = server("rate_limit_per_min = 1").await;
    let alice = s.client_with_key(Some("sk-alice"));
    let id = alice.session().await;
    let mut ws = connect(&navi_ws_url(&s, &id, "sk-alice")).await;
    ws.send(json!({"type": "message", "content": "hello"}))
        .await;
    ws.until(|f| f["type"] == "stream_end").await;
    let before = counts(&s, &alice, &id).await;
    ws.send(json!({"type": "message", "content": "again"}))
        .await;
    let frame = ws.next().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert!(
        frame["message"].as_str().unwrap().contains("rate limit"),
        "{frame}"
    );
    assert_eq!(counts(&s, &alice, &id).await, before, "nothing stored");
}

#[tokio::test]
async fn the_budget_is_the_principals_across_every_surface() {
    let s = server("rate_limit_per_min = 3").await;
    let alice = s.client_with_key(Some("sk-alice"));
    let id = alice.session().await;
    // One send through each of three surfaces...
    let (status, v) = alice.send(&id, "native rest").await;
    assert_eq!(status, 200, "{v}");
    let mut native = connect(&native_ws_url(&s, &id, "sk-alice")).await;
    native.next().await; // hello
    native
        .send(json!({"type": "message", "content": "native ws"}))
        .await;
    native.until_finished().await;
    let mut navi = connect(&navi_ws_url(&s, &id, "sk-alice")).await;
    navi.send(json!({"type": "message", "content": "navi"}))
        .await;
    navi.until(|f| f["type"] == "stream_end").await;
    // ...and the fourth, through agentkit, is over the principal's budget.
    let before = counts(&s, &alice, &id).await;
    let (status, v) = alice
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": "agentkit"}),
        )
        .await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(counts(&s, &alice, &id).await, before);
}

// --------------------------------------------------------------------------------- streams per principal ----

async fn sse(c: &Client, id: &str) -> reqwest::Response {
    c.http
        .get(format!("{}/v1/sessions/{id}/events", c.base))
        .bearer_auth(c.key.as_deref().unwrap())
        .send()
        .await
        .unwrap()
}

/// Retries `open` until it succeeds: a closed stream's slot is given back once the server has noticed the
/// close, which takes a moment.
async fn eventually<T, F, Fut>(what: &str, mut open: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = open().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: still refused after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_principal_holds_at_most_max_streams_across_surfaces() {
    let s = server("max_streams_per_principal = 2").await;
    let alice = s.client_with_key(Some("sk-alice"));
    let id = alice.session().await;
    let mut ws = connect(&native_ws_url(&s, &id, "sk-alice")).await;
    assert_eq!(ws.next().await["type"], "hello");
    let events = sse(&alice, &id).await;
    assert_eq!(events.status(), 200);

    // A third stream of any surface is refused with 429 before the upgrade.
    let (status, body) = refused(&native_ws_url(&s, &id, "sk-alice")).await;
    assert_eq!(status, 429);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2"),
        "{body}"
    );
    let (status, body) = refused(&navi_ws_url(&s, &id, "sk-alice")).await;
    assert_eq!(status, 429, "{body}");
    let (status, body) = refused(&kit_ws_url(&s, &id, "sk-alice")).await;
    assert_eq!(status, 429);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("streams"),
        "{body}"
    );
    let third = sse(&alice, &id).await;
    assert_eq!(third.status(), 429);
    drop(third);

    // Another principal has its own slots.
    let bob = s.client_with_key(Some("sk-bob"));
    let bob_id = bob.session().await;
    let mut bob_ws = connect(&navi_ws_url(&s, &bob_id, "sk-bob")).await;
    bob_ws
        .send(json!({"type": "message", "content": "hi"}))
        .await;
    bob_ws.until(|f| f["type"] == "stream_end").await;

    // Closing a WebSocket frees its slot: the next one (another surface) is accepted.
    ws.socket.close(None).await.unwrap();
    drop(ws);
    let url = kit_ws_url(&s, &id, "sk-alice");
    let mut kit = eventually("agentkit socket after a close", || async {
        tokio_tungstenite::connect_async(url.as_str())
            .await
            .ok()
            .map(|(socket, _)| Ws::new(socket))
    })
    .await;
    assert_eq!(kit.next().await["type"], "connected");
    assert_eq!(
        refused(&native_ws_url(&s, &id, "sk-alice")).await.0,
        429,
        "full again"
    );

    // Dropping the SSE response frees its slot too.
    drop(events);
    let again = eventually("SSE after a close", || async {
        let r = sse(&alice, &id).await;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(again.status(), 200);
    assert_eq!(s.app.limits.open_streams("alice"), 2);
}

// --------------------------------------------------------------------------------- connection bounds ----

/// A server whose connections must send their headers within 1 s.
async fn timed_server(extra: &str) -> Server {
    Server::start_with(Options {
        server_extra: format!("header_timeout_s = 1\n{extra}"),
        ..Options::default()
    })
    .await
}

fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection; returns what it sent and how long that took. Fails after
/// `bound`.
async fn until_closed(
    read: &mut (impl AsyncReadExt + Unpin),
    bound: Duration,
) -> (String, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + bound).into(), read.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection was still open after {bound:?}; it had sent {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `bytes` one at a time, 300 ms apart, until the server stops taking them.
fn trickle(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    bytes: Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for b in bytes {
            if write.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

async fn healthz(s: &Server) {
    let (status, v) = s.client().get("/healthz").await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let s = timed_server("").await;
    let mut tcp = TcpStream::connect(addr(&s)).await.unwrap();
    let (_, took) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(500), "closed after {took:?}");
    healthz(&s).await;
}

#[tokio::test]
async fn trickled_headers_are_cut_off() {
    let s = timed_server("").await;
    let tcp = TcpStream::connect(addr(&s)).await.unwrap();
    let (mut read, write) = tcp.into_split();
    // 40 s worth of header bytes at one per 300 ms; the head has 1 s in all.
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(100)
    );
    let writer = trickle(write, head.into_bytes());
    let (sent, took) = until_closed(&mut read, Duration::from_secs(10)).await;
    writer.abort();
    assert!(!sent.contains("200 OK"), "the request was served: {sent}");
    assert!(took < Duration::from_secs(10));
    healthz(&s).await;
}

#[tokio::test]
async fn a_stalled_body_is_cut_off_and_answered() {
    let s = timed_server("").await;
    let mut tcp = TcpStream::connect(addr(&s)).await.unwrap();
    tcp.write_all(
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"agent\"",
    )
    .await
    .unwrap();
    let (sent, _) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(
        sent.starts_with("HTTP/1.1 4"),
        "a client error answers it: {sent}"
    );
    // Nothing was created.
    let (status, list) = s.client().get("/v1/sessions").await;
    assert_eq!(status, 200);
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn a_trickled_body_is_cut_off() {
    let s = timed_server("").await;
    let tcp = TcpStream::connect(addr(&s)).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    write
        .write_all(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n")
        .await
        .unwrap();
    // 60 s worth of body at one byte per 300 ms: far below the minimum rate.
    let body = format!(
        "{{\"agent\": \"assistant\", \"title\": \"{}\"}}",
        "a".repeat(160)
    );
    let writer = trickle(write, body.into_bytes());
    let (sent, took) = until_closed(&mut read, Duration::from_secs(10)).await;
    writer.abort();
    assert!(
        !sent.contains("201 Created"),
        "the request was served: {sent}"
    );
    assert!(took < Duration::from_secs(10));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let s = timed_server("").await;
    let mut tcp = TcpStream::connect(addr(&s)).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (sent, _) = until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    assert!(
        sent.ends_with("ok"),
        "served, then closed when idle: {sent}"
    );
}

#[tokio::test]
async fn websockets_sse_and_long_turns_outlive_the_timeouts() {
    let s = timed_server("").await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = c.ws(&id, "").await;
    assert_eq!(ws.next().await["type"], "hello");
    let mut events = c
        .http
        .get(format!("{}/v1/sessions/{id}/events", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    // Idle for three header timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await["type"], "pong", "the WebSocket is open");
    // A turn that takes longer than the timeout, sent and awaited over REST (the request is being served, not
    // read: no timeout applies), streams to both.
    let (status, v) = c.send(&id, "tokens=4 delay_ms=500").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["run"]["status"], "completed", "{v}");
    let frames = ws.until_finished().await;
    assert!(frames.iter().any(|f| f["type"] == "text_delta"));
    let mut seen = String::new();
    while !seen.contains("event: run_finished") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
            .await
            .expect("SSE chunk within 10 s")
            .unwrap()
            .expect("the SSE stream is open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: text_delta"), "{seen}");
}

/// Sockets of the server's side of `port` that have a descriptor in this process (the server runs in it):
/// accepted connections; those still in the kernel's backlog have none. /proc/net/tcp maps socket inodes to
/// ports (it is read in pieces, so on a busy machine a row may repeat); /proc/self/fd holds the descriptors,
/// each counted once.
fn accepted(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inodes: std::collections::HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            (u16::from_str_radix(local_port, 16).unwrap() == port && f[3] != "0A")
                .then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|link| inodes.contains(link.to_string_lossy().as_ref()))
        .count()
}

#[tokio::test]
async fn the_connection_cap_holds_and_the_server_recovers() {
    let s = Server::start_with(Options {
        server_extra: "header_timeout_s = 2\nmax_connections = 8".into(),
        ..Options::default()
    })
    .await;
    let port: u16 = s.url.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(accepted(port), 0);
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(addr(&s)).await.unwrap());
    }
    // The cap fills and holds: no more than 8 accepted at any moment while they cycle out.
    let start = Instant::now();
    let mut most = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        most = most.max(accepted(port));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        most, 8,
        "the server holds exactly its cap of idle connections"
    );
    // A request made now waits for a free slot (idle ones are closed after 2 s), then is served.
    let waited = Instant::now();
    let probe = tokio::spawn({
        let c = s.client();
        async move { c.get("/healthz").await }
    });
    while !probe.is_finished() {
        most = most.max(accepted(port));
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "/healthz never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(probe.await.unwrap().0, 200);
    assert!(most <= 8, "{most} connections accepted with a cap of 8");
    // Every idle connection is eventually closed, and the server is back to normal.
    for mut tcp in idle {
        until_closed(&mut tcp, Duration::from_secs(30)).await;
    }
    healthz(&s).await;
    let id = s.client().session().await;
    assert!(!id.is_empty());
}

/// The real binary under a low open-file limit (`ulimit -n 128`) and no `max_connections`: the default cap
/// (nine tenths of the limit, at most the limit minus 64) keeps descriptors for the process's own files, so
/// 300 idle connections neither starve `/healthz` nor the database and the upstream.
#[tokio::test]
async fn under_a_low_descriptor_limit_the_default_cap_keeps_the_binary_answering() {
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncBufReadExt;

    let upstream = agentd_testkit::MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    let text = common::config_text_with(
        &upstream.base_url(),
        dir.path(),
        30,
        "",
        "header_timeout_s = 2",
    );
    std::fs::write(&config, text).unwrap();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 128 && exec "$0" serve --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_agentd"))
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<String>();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn({
        let log = log.clone();
        async move {
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(60), addr_rx)
        .await
        .expect("the server starts within 60 s")
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 128 ")),
        "{limits}"
    );
    let sockets = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|l| l.to_string_lossy().starts_with("socket:"))
                    .count()
            })
            .unwrap_or(0)
    };

    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(addr.as_str()).await.unwrap());
    }
    // While they are open the process holds its cap (64 = 128 - 64) of them plus its own sockets, and still
    // serves: /healthz, a new session (the database) and a turn (an upstream connection).
    let c = Client {
        base: format!("http://{addr}"),
        key: None,
        http: reqwest::Client::new(),
    };
    let served = tokio::spawn({
        let c = c.clone();
        async move {
            let (status, v) = c.get("/healthz").await;
            assert_eq!(status, 200, "{v}");
            let id = c.session().await;
            let (status, v) = c.send(&id, "still here").await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["message"]["content"], "echo: still here", "{v}");
        }
    });
    let start = Instant::now();
    let mut most = 0;
    while !served.is_finished() {
        most = most.max(sockets());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not served within 60 s; server log:\n{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    served.await.unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    eprintln!("most sockets open: {most}; descriptors now: {fds}");
    assert!(most >= 64, "the cap was reached ({most} sockets)");
    assert!(most <= 64 + 8, "{most} sockets open with a cap of 64");
    drop(idle);
    let log = log.lock().unwrap().clone();
    assert!(
        !log.contains("accept failed"),
        "ran out of descriptors:\n{log}"
    );
    assert!(log.contains("connection cap reached"), "{log}");
    child.kill().await.unwrap();
}
