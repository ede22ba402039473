//! The navi dialect (SPEC.md section 5, seed `004_28d3f1f99cd30b36.txt`) spoken frame by frame over a real
//! WebSocket: every frame type, the two error texts, close 4004 for an unknown session, re-attaching mid-stream
//! (replayed from the run's start), several subscribers, images and uploaded files.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::time::Duration;

use common::{Options, Server, Ws};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const INVALID_JSON: &str = "Invalid JSON";
const EXPECTED: &str = "Expected {type: 'message', content: '...'}";
/// The PNG signature, base64: enough for agentd to recognise an image.
const PNG_B64: &str = "iVBORw0KGgo=";

fn navi_url(s: &Server, id: &str) -> String {
    let base = s.url.replacen("http://", "ws://", 1);
    match &s.key {
        Some(k) => format!("{base}/ws/sessions/{id}?api_key={k}"),
        None => format!("{base}/ws/sessions/{id}"),
    }
}

async fn connect(url: &str) -> Ws {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("ws connect {url}: {e}"));
    Ws::new(socket)
}

async fn navi(s: &Server, id: &str) -> Ws {
    connect(&navi_url(s, id)).await
}

fn ends_stream(f: &Value) -> bool {
    matches!(f["type"].as_str(), Some("stream_end" | "error"))
}

/// The concatenated `stream_delta`s.
fn deltas(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "stream_delta")
        .map(|f| f["delta"].as_str().unwrap())
        .collect()
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

async fn message(ws: &mut Ws, content: &str) {
    ws.send(json!({"type": "message", "content": content}))
        .await;
}

#[tokio::test]
async fn unknown_session_is_accepted_then_closed_with_4004() {
    let s = Server::start().await;
    let mut ws = navi(&s, "nope").await; // the handshake succeeds (the seed's 403 is not copied)
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match msg {
        WsMessage::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4004);
            assert_eq!(f.reason.as_str(), "Session not found");
        }
        other => panic!("expected a 4004 close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_turn_streams_the_seed_frames() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = navi(&s, &id).await;
    // 50 ms apart, each delta is a read of its own upstream and so a frame of its own.
    message(&mut ws, "think tokens=3 delay_ms=50").await;
    let frames = ws.until(ends_stream).await;
    let end = frames.last().unwrap().clone();
    assert_eq!(
        keys(&end),
        ["content", "context_tokens", "max_context_tokens", "type"]
    );
    assert!(end["context_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        frames,
        [
            json!({"type": "stream_start"}),
            json!({"type": "thinking_delta", "delta": "Let me"}),
            json!({"type": "thinking_delta", "delta": " think about"}),
            json!({"type": "thinking_delta", "delta": " this."}),
            json!({"type": "thinking_end"}),
            json!({"type": "turn_thinking", "thinking": "Let me think about this.", "is_subagent": false}),
            json!({"type": "stream_delta", "delta": "tok0"}),
            json!({"type": "stream_delta", "delta": " tok1"}),
            json!({"type": "stream_delta", "delta": " tok2"}),
            json!({"type": "stream_end", "content": "tok0 tok1 tok2",
                "context_tokens": end["context_tokens"], "max_context_tokens": 8192}),
        ]
    );

    message(&mut ws, "calc: 2+3").await;
    let frames = ws.until(ends_stream).await;
    assert_eq!(frames[0], json!({"type": "stream_start"}));
    assert_eq!(
        frames[1],
        json!({"type": "tool_started", "tool": "calculator", "args": {"expression": "2+3"}, "is_subagent": false})
    );
    assert_eq!(
        frames[2],
        json!({"type": "tool_call", "tool": "calculator", "args": {"expression": "2+3"},
            "result": "5", "success": true, "is_subagent": false})
    );
    let end = frames.last().unwrap();
    assert_eq!(end["type"], "stream_end");
    assert_eq!(end["content"], "The result is 5.");
    assert_eq!(deltas(&frames), "The result is 5.");
    assert_eq!(
        c.messages(&id).await.last().unwrap()["content"],
        "The result is 5."
    );
}

#[tokio::test]
async fn bad_frames_get_the_seed_error_texts_and_the_socket_stays_open() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = navi(&s, &id).await;
    ws.send_raw("{not json").await;
    assert_eq!(
        ws.next().await,
        json!({"type": "error", "message": INVALID_JSON})
    );
    for frame in [
        json!({"type": "ping"}),
        json!({"type": "message"}),
        json!({"type": "message", "content": ""}),
        json!({"content": "no type"}),
    ] {
        ws.send(frame.clone()).await;
        assert_eq!(
            ws.next().await,
            json!({"type": "error", "message": EXPECTED}),
            "{frame}"
        );
    }
    // Refused by the service: the reason, as an error frame; nothing stored.
    message(&mut ws, &"y".repeat(5000)).await;
    let err = ws.next().await;
    assert_eq!(keys(&err), ["message", "type"]);
    assert!(err["message"].as_str().unwrap().contains("limit"), "{err}");
    assert!(c.messages(&id).await.is_empty());
    message(&mut ws, "tokens=2").await;
    let frames = ws.until(ends_stream).await;
    assert_eq!(frames.last().unwrap()["content"], "tok0 tok1");
}

#[tokio::test]
async fn a_failed_turn_is_an_error_frame_after_stream_start() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = navi(&s, &id).await;
    message(&mut ws, "status=500").await;
    let frames = ws.until(ends_stream).await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0], json!({"type": "stream_start"}));
    assert_eq!(frames[1]["type"], "error");
    assert!(
        frames[1]["message"].as_str().unwrap().contains("500"),
        "{frames:?}"
    );
    message(&mut ws, "tokens=1").await;
    assert_eq!(
        ws.until(ends_stream).await.last().unwrap()["type"],
        "stream_end"
    );
}

#[tokio::test]
async fn reattach_mid_stream_replays_the_run_from_its_start() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, _) = c.send(&id, "tokens=2").await; // an earlier run, which must not be replayed
    assert_eq!(status, 200);
    let mut first = navi(&s, &id).await;
    message(&mut first, "tokens=60 delay_ms=15").await;
    assert_eq!(first.next().await, json!({"type": "stream_start"}));
    let mut seen = String::new();
    for _ in 0..5 {
        let f = first.next().await;
        seen.push_str(f["delta"].as_str().unwrap());
    }
    drop(first); // a page reload mid-answer; the run goes on
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = navi(&s, &id).await;
    let frames = again.until(ends_stream).await;
    assert_eq!(frames[0], json!({"type": "stream_start"}));
    assert_eq!(
        frames
            .iter()
            .filter(|f| f["type"] == "stream_start")
            .count(),
        1
    );
    let end = frames.last().unwrap();
    assert_eq!(end["type"], "stream_end");
    let rebuilt = deltas(&frames);
    assert!(
        rebuilt.starts_with(&seen),
        "the part seen before the reload is replayed"
    );
    assert_eq!(rebuilt, end["content"].as_str().unwrap());
    let stored = c.messages(&id).await.last().unwrap()["content"].clone();
    assert_eq!(
        rebuilt,
        stored.as_str().unwrap(),
        "matches the stored answer"
    );
    assert_eq!(rebuilt.split(' ').count(), 60);
}

#[tokio::test]
async fn several_subscribers_see_the_same_frames_and_a_cancel_ends_the_stream() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut a = navi(&s, &id).await;
    let mut b = navi(&s, &id).await;
    message(&mut a, "think tokens=4").await;
    let fa = a.until(ends_stream).await;
    let fb = b.until(ends_stream).await;
    assert_eq!(fa, fb);
    // A run started from the native API, cancelled from it: navi clients see it end with the partial answer.
    let run = c.send_bg(&id, "tokens=300 delay_ms=10").await;
    let mut frames = a.until(|f| f["type"] == "stream_delta").await;
    assert_eq!(frames[0], json!({"type": "stream_start"}));
    let (status, v) = c
        .post(&format!("/v1/sessions/{id}/runs/{run}/cancel"), json!({}))
        .await;
    assert_eq!((status, v["status"].as_str()), (200, Some("cancelled")));
    frames.extend(a.until(ends_stream).await);
    let end = frames.last().unwrap();
    assert_eq!(end["type"], "stream_end");
    assert_eq!(deltas(&frames), end["content"].as_str().unwrap());
    let fb = b.until(ends_stream).await;
    assert_eq!(fb.last().unwrap(), end);
    assert_eq!(
        c.messages(&id).await.last().unwrap()["content"],
        end["content"]
    );
}

#[tokio::test]
async fn images_and_uploaded_files_are_handled_as_the_seed_does() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let mut ws = navi(&s, &id).await;
    let data_url = format!("data:image/png;base64,{PNG_B64}");
    ws.send(json!({
        "type": "message",
        "content": "what is this? tokens=1",
        "images": [data_url],
        "files": [{"name": "notes.txt", "path": "/srv/uploads/notes.txt"}],
    }))
    .await;
    let frames = ws.until(ends_stream).await;
    assert_eq!(frames.last().unwrap()["type"], "stream_end");
    let stored = c.messages(&id).await[0].clone();
    assert_eq!(
        stored["content"],
        "what is this? tokens=1\n\n[Uploaded files on disk:\n- notes.txt → /srv/uploads/notes.txt]"
    );
    // The data URL was stripped to base64; agentd found the type again from the bytes.
    assert_eq!(stored["images"], json!([data_url]));
    let req = s.upstream.last_request().unwrap();
    let user = req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|m| m["role"] == "user")
        .unwrap()
        .clone();
    let parts = user["content"].as_array().unwrap();
    assert!(
        parts
            .iter()
            .any(|p| p["type"] == "image_url" && p["image_url"]["url"] == data_url.as_str()),
        "{user}"
    );
    // Bare base64 is taken as it is; something that is no image is refused with the reason.
    ws.send(json!({"type": "message", "content": "again tokens=1", "images": [PNG_B64]}))
        .await;
    assert_eq!(
        ws.until(ends_stream).await.last().unwrap()["type"],
        "stream_end"
    );
    ws.send(json!({"type": "message", "content": "bad", "images": ["data:image/png;base64,bm90IGFuIGltYWdl"]}))
        .await;
    let err = ws.next().await;
    assert_eq!(err["type"], "error");
    assert!(err["message"].as_str().unwrap().contains("image"), "{err}");
    ws.send(json!({"type": "message", "content": "bad", "files": [{"name": "x"}]}))
        .await;
    assert_eq!(ws.next().await["type"], "error");
    assert_eq!(
        c.messages(&id).await.len(),
        4,
        "nothing stored for the refused frames"
    );
}

#[tokio::test]
async fn context_compression_is_reported() {
    let extra = r#"
[[agents]]
name = "tiny"
provider = "upstream"
model = "tiny-model"
max_context_tokens = 120
compress_at = 0.5
"#;
    let s = Server::start_with(Options {
        extra: extra.into(),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let (_, v) = c.post("/v1/sessions", json!({"agent": "tiny"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    c.send(&id, &format!("tokens=30 {}", "lorem ipsum ".repeat(30)))
        .await;
    let mut ws = navi(&s, &id).await;
    message(&mut ws, "second tokens=2").await;
    let frames = ws.until(ends_stream).await;
    assert_eq!(
        frames[..2],
        [
            json!({"type": "stream_start"}),
            json!({"type": "context_compressed", "messages_before": 3, "messages_after": 1}),
        ]
    );
    assert_eq!(frames.last().unwrap()["max_context_tokens"], 120);
}

#[tokio::test]
async fn with_keys_configured_the_handshake_needs_one() {
    let s = Server::start_with(Options {
        extra: "[[auth.keys]]\nprincipal = \"alice\"\nkey = \"sk-alice\"\n".into(),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let id = c.session().await;
    let base = s.url.replacen("http://", "ws://", 1);
    for url in [
        format!("{base}/ws/sessions/{id}"),
        format!("{base}/ws/sessions/{id}?api_key=sk-wrong"),
    ] {
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 401, "{url}")
            }
            Err(e) => panic!("{url}: expected a 401, got {e}"),
            Ok(_) => panic!("{url}: the handshake was accepted without a valid key"),
        }
    }
    // `?api_key=` and a Bearer header both work.
    let mut ws = navi(&s, &id).await;
    message(&mut ws, "tokens=1").await;
    assert_eq!(
        ws.until(ends_stream).await.last().unwrap()["type"],
        "stream_end"
    );
    let mut req = format!("{base}/ws/sessions/{id}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer sk-alice".parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut ws = Ws::new(socket);
    message(&mut ws, "tokens=1").await;
    assert_eq!(
        ws.until(ends_stream).await.last().unwrap()["type"],
        "stream_end"
    );
}
