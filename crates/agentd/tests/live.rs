//! Live runs (SPEC.md section 4) through real WebSocket and SSE connections: the event log, replay, re-attach,
//! cancel, ask_human, slow clients, uploads and graceful shutdown (kill -9 and recovery: tests/recovery.rs).

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentd_testkit::{MockUpstream, Reply};
use common::{assert_gap_free, own_text, Server};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn websocket_hello_then_live_events_with_gap_free_seq() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = c.ws(&id, "").await;
    let hello = ws.next().await;
    assert_eq!(
        hello,
        json!({"type": "hello", "session_id": id, "last_seq": 0, "active_run_id": null})
    );
    ws.send(json!({"type": "message", "content": "tokens=4"}))
        .await;
    let frames = ws.until_finished().await;
    assert_gap_free(&frames, 1);
    let types: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(types[..2], ["message", "run_started"]);
    assert_eq!(types[types.len() - 2..], ["message", "run_finished"]);
    let finished = frames.last().unwrap();
    assert_eq!(finished["run"]["status"], "completed");
    assert_eq!(finished["content"], own_text(&frames));
    assert_eq!(finished["max_context_tokens"], 8192);
    assert!(finished["context_tokens"].as_u64().unwrap() > 0);
    for f in &frames {
        assert_eq!(f["agent"], "assistant");
        assert_eq!(f["is_subagent"], false);
        assert!(f["run_id"].is_string());
    }
    // A fresh connection's hello knows the log's end.
    let mut again = c.ws(&id, "").await;
    assert_eq!(again.next().await["last_seq"], frames.len() as u64);
}

#[tokio::test]
async fn two_clients_receive_every_event_and_either_can_cancel() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut a = c.ws(&id, "").await;
    let mut b = c.ws(&id, "").await;
    a.next().await;
    b.next().await;
    a.send(json!({"type": "message", "content": "tokens=5"}))
        .await;
    let fa = a.until_finished().await;
    let fb = b.until_finished().await;
    assert_eq!(fa, fb, "both clients see the same events");
    // B cancels A's turn mid-stream.
    a.send(json!({"type": "message", "content": "tokens=300 delay_ms=10"}))
        .await;
    b.until(|f| f["type"] == "text_delta").await;
    let t = Instant::now();
    b.send(json!({"type": "cancel"})).await;
    let frames = a.until_finished().await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        t.elapsed()
    );
    assert_eq!(frames.last().unwrap()["run"]["status"], "cancelled");
    let partial = own_text(&frames);
    let stored = c.messages(&id).await.last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!stored.is_empty());
    assert!(
        partial.ends_with(&stored) || stored.starts_with(partial.trim_start()),
        "partial answer kept"
    );
}

#[tokio::test]
async fn reattach_without_after_replays_the_active_run_from_its_start() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, _) = c.send(&id, "tokens=2").await; // an earlier run, which must not be replayed
    assert_eq!(status, 200);
    let run = c.send_bg(&id, "tokens=60 delay_ms=15").await;
    let mut first = c.ws(&id, "after=0").await;
    first.next().await;
    first
        .until(|f| f["type"] == "text_delta" && f["run_id"] == run.as_str())
        .await;
    drop(first); // a page reload mid-answer
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ws = c.ws(&id, "").await;
    let hello = ws.next().await;
    assert_eq!(hello["active_run_id"], run.as_str());
    let frames = ws.until_finished().await;
    assert!(
        frames.iter().all(|f| f["run_id"] == run.as_str()),
        "only the active run is replayed"
    );
    assert_eq!(frames[0]["type"], "message");
    assert_eq!(frames[0]["message"]["role"], "user");
    assert_eq!(frames[1]["type"], "run_started");
    let first_seq = frames[0]["seq"].as_u64().unwrap();
    assert_gap_free(&frames, first_seq);
    let answer = c.messages(&id).await.last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        own_text(&frames),
        answer,
        "the whole partial answer, then the rest"
    );
}

#[tokio::test]
async fn reconnect_with_after_gets_exactly_the_tail() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = c.ws(&id, "").await;
    ws.next().await;
    ws.send(json!({"type": "message", "content": "tokens=80 delay_ms=10"}))
        .await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(ws.next().await);
    }
    drop(ws);
    let last = seen.last().unwrap()["seq"].as_u64().unwrap();
    let mut ws = c.ws(&id, &format!("after={last}")).await;
    assert_eq!(ws.next().await["type"], "hello");
    let rest = ws.until_finished().await;
    assert_eq!(rest[0]["seq"].as_u64().unwrap(), last + 1);
    let mut all = seen.clone();
    all.extend(rest);
    assert_gap_free(&all, 1);
    // after=0 is everything, identical to what was seen live.
    let mut full = c.ws(&id, "after=0").await;
    full.next().await;
    let replay = full.until_finished().await;
    assert_eq!(replay, all);
}

/// Reads SSE events (id, event, data) until `stop`.
async fn sse_events(
    url: &str,
    key: Option<&str>,
    last_event_id: Option<&str>,
    stop: impl Fn(&Value) -> bool,
) -> Vec<(Option<u64>, String, Value)> {
    let mut req = reqwest::Client::new().get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(l) = last_event_id {
        req = req.header("Last-Event-ID", l);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("sse stalled")
            .expect("sse ended")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line
                    .strip_prefix("id: ")
                    .or_else(|| line.strip_prefix("id:"))
                {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line
                    .strip_prefix("event: ")
                    .or_else(|| line.strip_prefix("event:"))
                {
                    event = v.trim().to_string();
                } else if let Some(v) = line
                    .strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
                {
                    data.push_str(v);
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            let done = stop(&v);
            out.push((id, event, v));
            if done {
                return out;
            }
        }
    }
}

#[tokio::test]
async fn sse_streams_with_ids_types_and_last_event_id() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    // 50 ms apart: an event each.
    c.send(&id, "tokens=3 delay_ms=50").await;
    let url = format!("{}/v1/sessions/{id}/events?after=0", s.url);
    let evs = sse_events(&url, None, None, |v| v["type"] == "run_finished").await;
    for (i, (seq, event, data)) in evs.iter().enumerate() {
        assert_eq!(*seq, Some(i as u64 + 1));
        assert_eq!(event, data["type"].as_str().unwrap());
        assert_eq!(data["seq"].as_u64(), *seq);
    }
    // Last-Event-ID resumes after it; `after` wins when both are given.
    let url = format!("{}/v1/sessions/{id}/events", s.url);
    let tail = sse_events(&url, None, Some("3"), |v| v["type"] == "run_finished").await;
    assert_eq!(tail[0].0, Some(4));
    let url = format!("{}/v1/sessions/{id}/events?after=5", s.url);
    let tail = sse_events(&url, None, Some("1"), |v| v["type"] == "run_finished").await;
    assert_eq!(tail[0].0, Some(6));
    // Live: a turn sent after connecting streams through.
    let url = format!("{}/v1/sessions/{id}/events", s.url);
    let c2 = c.clone();
    let id2 = id.clone();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.send(&id2, "tokens=2").await
    });
    let live = sse_events(&url, None, None, |v| v["type"] == "run_finished").await;
    assert_eq!(live[0].1, "message");
    assert_eq!(live[0].0, Some(evs.len() as u64 + 1));
    sender.await.unwrap();
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_socket_stays_open() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = c.ws(&id, "").await;
    ws.next().await;
    for (frame, code) in [
        ("{not json", "invalid_json"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"content":"hi"}"#, "missing_field"),
        (r#"{"type":"message"}"#, "missing_field"),
        (r#"{"type":"reply","request_id":"x"}"#, "missing_field"),
        (
            r#"{"type":"reply","request_id":"x","content":"y"}"#,
            "not_found",
        ),
        (
            r#"{"type":"message","content":"hi","images":[1]}"#,
            "invalid_frame",
        ),
    ] {
        ws.send_raw(frame).await;
        let v = ws.next().await;
        assert_eq!(v["type"], "error", "{frame}");
        assert_eq!(v["code"], code, "{frame}: {v}");
        assert!(v.get("seq").is_none());
    }
    ws.send(json!({"type": "message", "content": "y".repeat(5000)}))
        .await;
    let v = ws.next().await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("too_large"))
    );
    assert!(
        c.messages(&id).await.is_empty(),
        "nothing stored for the oversize message"
    );
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await, json!({"type": "pong"}));
    ws.send(json!({"type": "message", "content": "tokens=1"}))
        .await;
    assert_eq!(
        ws.until_finished().await.last().unwrap()["run"]["status"],
        "completed"
    );
}

#[tokio::test]
async fn ask_human_survives_the_askers_disconnect_and_any_client_replies() {
    let s = Server::start().await;
    s.upstream.push(Reply::tool_call(
        "call_1",
        "ask_human",
        r#"{"question":"Your name?"}"#,
    ));
    let c = s.client();
    let id = c.session().await;
    let mut asker = c.ws(&id, "").await;
    asker.next().await;
    asker
        .send(json!({"type": "message", "content": "greet me"}))
        .await;
    let asked = asker
        .until(|f| f["type"] == "input_requested")
        .await
        .pop()
        .unwrap();
    drop(asker);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut other = c.ws(&id, "").await;
    let hello = other.next().await;
    assert!(hello["active_run_id"].is_string(), "still waiting: {hello}");
    let replayed = other
        .until(|f| f["type"] == "input_requested")
        .await
        .pop()
        .unwrap();
    assert_eq!(replayed["request_id"], asked["request_id"]);
    other
        .send(json!({"type": "reply", "request_id": asked["request_id"], "content": "Ada"}))
        .await;
    let frames = other.until_finished().await;
    assert!(frames
        .iter()
        .any(|f| f["type"] == "input_received" && f["request_id"] == asked["request_id"]));
    assert_eq!(frames.last().unwrap()["run"]["status"], "completed");
    let tool = c
        .messages(&id)
        .await
        .into_iter()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert_eq!(tool["content"], "Ada");
}

#[tokio::test]
async fn ask_human_times_out_and_the_turn_goes_on() {
    let extra = "";
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let upstream = MockUpstream::start().await;
    let text = common::config_text(&upstream.base_url(), dir.path(), 30, extra)
        .replace("ask_human_timeout_s = 30", "ask_human_timeout_s = 1");
    let config = agentd_core::config::Config::parse(&text, "t").unwrap();
    let app = agentd::build(config).await.unwrap();
    upstream.push(Reply::tool_call(
        "q",
        "ask_human",
        r#"{"question":"anyone?"}"#,
    ));
    let p = agentd_core::service::Principal::local();
    let sess = app
        .create_session(&p, "assistant", None, None)
        .await
        .unwrap();
    let acc = app
        .send(
            &p,
            &sess.id,
            agentd_core::service::SendMessage {
                content: "x".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (run, _) = agentd_core::service::Agentd::wait(acc.done).await.unwrap();
    assert_eq!(run.status, agentd_core::domain::RunStatus::Completed);
    let msgs = app.messages(&p, &sess.id, None, 0).await.unwrap();
    let tool = msgs
        .iter()
        .find(|m| m.role == agentd_core::domain::Role::Tool)
        .unwrap();
    assert!(
        tool.content.contains("no reply within 1 s"),
        "{}",
        tool.content
    );
}

/// The process's anonymous resident memory (heap, stacks): what buffering would grow. Not all of VmRSS: that
/// also counts the SQLite file's pages mapped in (`mmap_size`) as a lagging reader catches up from the log,
/// which the kernel can drop at any time (on a loaded machine that alone added 70 MB for this test's log).
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_slows_nobody_and_catches_up_from_the_log() {
    // The agent's provider has credentials in its URL, so agentd talks to the mock through reqwest, whose body
    // arrives an HTTP chunk, and so a token, at a time: every token is an event of its own (agentd's own
    // plain-HTTP client would join the tokens each read brings into fewer, larger events).
    let s = Server::start_with(common::Options {
        extra: "[providers.chunked]\nkind = \"openai\"\nbase_url = \"http://agentd:test@{upstream_addr}/v1\"\n\n\
                [[agents]]\nname = \"chunked\"\nprovider = \"chunked\"\nmodel = \"m\"\n"
            .into(),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let (status, v) = c.post("/v1/sessions", json!({"agent": "chunked"})).await;
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let mut stalled = c.ws(&id, "").await; // never read until the end
    let mut reader = c.ws(&id, "").await;
    reader.next().await;
    let rss_before = rss_kb();
    let t = Instant::now();
    // ~20,000 events of ~200 bytes: far more than any socket buffer holds.
    reader
        .send(json!({"type": "message", "content": "tokens=20000"}))
        .await;
    // The reading client keeps only each frame's seq: the test's own memory must not blur the server's.
    let mut seqs: Vec<u64> = Vec::with_capacity(32_768);
    let last = loop {
        let frame = reader.next().await;
        seqs.push(frame["seq"].as_u64().unwrap_or(0));
        if frame["type"] == "run_finished" {
            break frame;
        }
    };
    let pace = t.elapsed();
    let rss_after = rss_kb();
    assert_eq!(last["run"]["status"], "completed");
    assert!(seqs.len() > 20_000);
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(
        pace < Duration::from_secs(60),
        "the reading client was held back: {pace:?}"
    );
    // Memory: nothing buffered per event for the stalled client (generous bound: 64 MB for 4 MB of frames x2).
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
    // The stalled client, reading at last, gets every event exactly once, in order.
    assert_eq!(stalled.next().await["type"], "hello");
    let caught_up = stalled.until_finished().await;
    assert_eq!(caught_up.len(), seqs.len());
    assert_gap_free(&caught_up, 1);
}

/// The store holds uploads: a file id resolves, and file tools read the file, after the session's workspace
/// was wiped (as on another node, or a new machine with the same database).
#[tokio::test]
async fn a_file_id_works_after_the_workspace_is_wiped() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let part = reqwest::multipart::Part::bytes(b"kept in the store".to_vec())
        .file_name("notes.txt")
        .mime_str("text/plain")
        .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sessions/{id}/files", s.url))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let up: Value = resp.json().await.unwrap();
    let workspace = s.dir.path().join("workspaces").join(&id);
    assert!(workspace.join("notes.txt").is_file());
    std::fs::remove_dir_all(&workspace).unwrap();

    s.upstream.push(Reply::tool_call(
        "r1",
        "read_file",
        r#"{"path":"notes.txt"}"#,
    ));
    s.upstream.push(Reply::text("ok"));
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "read it", "files": [up["id"]]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let msgs = c.messages(&id).await;
    assert!(
        msgs[0]["content"]
            .as_str()
            .unwrap()
            .contains("- notes.txt → notes.txt"),
        "{}",
        msgs[0]["content"]
    );
    let tool = msgs.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["content"], "kept in the store");
    // The workspace has the file and its record again, as the upload left them.
    assert_eq!(
        std::fs::read_to_string(workspace.join("notes.txt")).unwrap(),
        "kept in the store"
    );
    let record: Value = serde_json::from_slice(
        &std::fs::read(
            workspace
                .join(".uploads")
                .join(format!("{}.json", up["id"].as_str().unwrap())),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record, up);

    // A new upload of the same name is numbered: the session has the name, though the workspace lost it.
    std::fs::remove_dir_all(&workspace).unwrap();
    let part = reqwest::multipart::Part::bytes(b"second".to_vec()).file_name("notes.txt");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sessions/{id}/files", s.url))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let second: Value = resp.json().await.unwrap();
    assert_eq!(second["path"], "notes-1.txt");
    // A turn puts every upload of the session back into its workspace.
    s.upstream.push(Reply::text("fine"));
    let (status, v) = c.send(&id, "hello").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        std::fs::read_to_string(workspace.join("notes.txt")).unwrap(),
        "kept in the store"
    );
    // An unknown id is still refused.
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "x", "files": ["0123abcd"]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn uploads_are_sanitised_limited_and_usable_by_file_tools() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let upload = |name: &str, bytes: Vec<u8>| {
        let part = reqwest::multipart::Part::bytes(bytes)
            .file_name(name.to_string())
            .mime_str("text/plain")
            .unwrap();
        let form = reqwest::multipart::Form::new().part("file", part);
        reqwest::Client::new()
            .post(format!("{}/v1/sessions/{id}/files", s.url))
            .multipart(form)
            .send()
    };
    let resp = upload("../../etc/evil.txt", b"the secret is 7".to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let up: Value = resp.json().await.unwrap();
    assert_eq!(up["name"], "evil.txt");
    assert_eq!(up["path"], "evil.txt");
    assert_eq!(up["size"], 15);
    assert_eq!(up["content_type"], "text/plain");
    let on_disk = s.dir.path().join("workspaces").join(&id).join("evil.txt");
    assert_eq!(std::fs::read_to_string(on_disk).unwrap(), "the secret is 7");
    let resp = upload("big.bin", vec![0u8; 4096]).await.unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_large");
    // The file is referenced by id; the read_file tool reads it from the workspace, and nothing outside.
    s.upstream.push(Reply::tool_call(
        "r1",
        "read_file",
        r#"{"path":"evil.txt"}"#,
    ));
    s.upstream.push(Reply::text("ok"));
    s.upstream.push(Reply::tool_call(
        "r2",
        "read_file",
        r#"{"path":"../../../../etc/passwd"}"#,
    ));
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "read it", "files": [up["id"]]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let msgs = c.messages(&id).await;
    assert!(
        msgs[0]["content"]
            .as_str()
            .unwrap()
            .contains("[Uploaded files on disk:\n- evil.txt → evil.txt]"),
        "{}",
        msgs[0]["content"]
    );
    let tool = msgs.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["content"], "the secret is 7");
    let (_, _) = c.send(&id, "now escape").await;
    let msgs = c.messages(&id).await;
    let escaped = msgs.iter().rev().find(|m| m["role"] == "tool").unwrap();
    assert!(
        escaped["content"]
            .as_str()
            .unwrap()
            .contains("inside the session workspace"),
        "{escaped}"
    );
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "x", "files": ["nope"]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn many_clients_sending_at_once_see_identical_gap_free_streams() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = c.ws(&id, "").await;
        ws.next().await;
        clients.push(ws);
    }
    // 3 messages from each of the 4 clients, all at once.
    for ws in clients.iter_mut() {
        for i in 0..3 {
            ws.send(json!({"type": "message", "content": format!("tokens={} delay_ms=1", 3 + i)}))
                .await;
        }
    }
    let mut streams = Vec::new();
    for ws in clients.iter_mut() {
        let mut frames = Vec::new();
        let mut finished = 0;
        while finished < 12 {
            let f = ws.next().await;
            if f["type"] == "run_finished" {
                finished += 1;
            }
            frames.push(f);
        }
        streams.push(frames);
    }
    for frames in &streams {
        assert_gap_free(frames, 1);
        assert_eq!(frames, &streams[0]);
    }
    let statuses: HashMap<String, usize> = streams[0]
        .iter()
        .filter(|f| f["type"] == "run_finished")
        .fold(HashMap::new(), |mut m, f| {
            *m.entry(f["run"]["status"].as_str().unwrap().to_string())
                .or_default() += 1;
            m
        });
    assert_eq!(statuses.get("completed"), Some(&12));
}

#[tokio::test]
async fn cursor_older_than_retention_is_reported_then_replays_as_without_cursor() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    for _ in 0..22 {
        let (status, _) = c.send(&id, "tokens=1").await;
        assert_eq!(status, 200);
    }
    let mut ws = c.ws(&id, "after=1").await;
    let hello = ws.next().await;
    assert_eq!(hello["type"], "hello");
    let err = ws.next().await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "cursor_expired");
    // Then it is live, as without `after` (no active run: nothing replayed).
    ws.send(json!({"type": "message", "content": "tokens=1"}))
        .await;
    let frames = ws.until_finished().await;
    assert_eq!(
        frames[0]["seq"].as_u64().unwrap(),
        hello["last_seq"].as_u64().unwrap() + 1
    );
    // The latest 20 runs are all still replayable.
    let (_, runs) = c.get(&format!("/v1/sessions/{id}/runs")).await;
    let runs = runs.as_array().unwrap();
    let twentieth_latest = &runs[runs.len() - 20]["id"];
    let mut all = c.ws(&id, "after=0").await;
    all.next().await;
    let err = all.next().await;
    assert_eq!(
        err["code"], "cursor_expired",
        "after=0 is before the retained log too"
    );
    let mut tail = c
        .ws(
            &id,
            &format!("after={}", frames[0]["seq"].as_u64().unwrap() - 1),
        )
        .await;
    tail.next().await;
    assert_eq!(tail.next().await["seq"], frames[0]["seq"]);
    let store = &s.app.store;
    let first = store
        .first_seq_of_run(&id, twentieth_latest.as_str().unwrap())
        .await
        .unwrap();
    assert!(first.is_some(), "the 20th latest run's events are retained");
}

#[tokio::test]
async fn graceful_shutdown_lets_short_turns_finish_and_interrupts_long_ones_under_recovery_interrupt(
) {
    // shutdown_grace_s = 2; with recovery = "resume" (the default) the long run is left to the next process
    // instead (tests/recovery.rs).
    let s = Server::start_with(common::Options {
        server_extra: "recovery = \"interrupt\"".into(),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let short_session = c.session().await;
    let long_session = c.session().await;
    let short = c.send_bg(&short_session, "tokens=10 delay_ms=50").await;
    let long = c.send_bg(&long_session, "tokens=1000 delay_ms=20").await;
    let mut ws = c.ws(&long_session, "").await;
    ws.next().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let app = s.app.clone();
    let t = Instant::now();
    s.shutdown().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    let short_run = app
        .store
        .get_run(&short_session, &short)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(short_run.status, agentd_core::domain::RunStatus::Completed);
    let long_run = app
        .store
        .get_run(&long_session, &long)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(long_run.status, agentd_core::domain::RunStatus::Interrupted);
    // The connected client got the run's end before the socket closed.
    let frames = ws.until_finished().await;
    assert_eq!(frames.last().unwrap()["run"]["status"], "interrupted");
}

// ---------------------------------------------------------------- a real process ----
// (killed mid-run: tests/recovery.rs)

/// A config (30 s grace) for one agentd on a mock upstream, in a fresh directory (`agentd.toml` there).
async fn sigterm_setup() -> (MockUpstream, tempfile::TempDir) {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agentd.toml"),
        common::config_text(&upstream.base_url(), dir.path(), 30, ""),
    )
    .unwrap();
    (upstream, dir)
}

fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A SIGTERM sent the moment the port accepts connections (before the store is open or a request answered)
/// is not lost: the server starts, shuts down gracefully and exits 0. A signal listener registered only once
/// the server runs would leave it to the default action (killed by the signal) or drop it (running on).
#[tokio::test]
async fn sigterm_as_soon_as_the_port_opens_exits_zero() {
    let (_upstream, dir) = sigterm_setup().await;
    let config = dir.path().join("agentd.toml");
    let port = common::free_port();
    let mut child = common::start_agentd(&config, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "agentd never opened its port");
        std::thread::sleep(Duration::from_millis(1));
    }
    sigterm(child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agentd ignored a SIGTERM sent as its port opened");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        code.code(),
        Some(0),
        "agentd did not exit cleanly: {code:?}"
    );
}

#[tokio::test]
async fn sigterm_exits_zero() {
    let (_upstream, dir) = sigterm_setup().await;
    let config = dir.path().join("agentd.toml");
    let mut p = common::spawn_agentd(&config).await;
    sigterm(p.child.id());
    let code = p.child.wait().unwrap();
    assert_eq!(code.code(), Some(0));
}
