//! The agentkit dialect (SPEC.md section 5, seed `000_9e8323a0b8ecf94a.txt`) spoken frame by frame over real
//! HTTP and a real WebSocket: the `/chat` REST shapes and status codes, `{"detail": ...}` errors, the socket's
//! handshake (4001 / 1000 closes), every frame type, and the two fixes (cancel and reply mid-turn).

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::time::{Duration, Instant};

use agentd_testkit::Reply;
use common::{Client, Options, Server, Ws};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const AUTH: &str = r#"
[[auth.keys]]
principal = "alice"
key = "sk-alice"

[[auth.keys]]
principal = "bob"
key = "sk-bob"
"#;

/// Two more agents: one with skills, one with a tiny context window (compression on the second turn).
const EXTRA: &str = r#"
[[agents]]
name = "mathy"
provider = "upstream"
model = "general-model"
tools = ["calculator"]
skills = ["math"]

[[agents]]
name = "tiny"
provider = "upstream"
model = "tiny-model"
system_prompt = "Be brief."
max_context_tokens = 120
compress_at = 0.5

[[skills]]
name = "math"
keywords = ["calculate", "compute", "sum"]
system_prompt = "You are a careful calculator."
tools = ["calculator"]
"#;

/// Creates a session through agentkit's REST; returns its id.
async fn kit_session(c: &Client, agent: &str) -> String {
    let (status, v) = c.post("/chat/sessions", json!({"agent_name": agent})).await;
    assert_eq!(status, 200, "{v}");
    v["session_id"].as_str().unwrap().to_string()
}

fn kit_url(s: &Server, id: &str, key: Option<&str>) -> String {
    let base = s.url.replacen("http://", "ws://", 1);
    match key {
        Some(k) => format!("{base}/chat/ws/{id}?api_key={k}"),
        None => format!("{base}/chat/ws/{id}"),
    }
}

async fn connect(url: &str) -> Ws {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("ws connect {url}: {e}"));
    Ws::new(socket)
}

/// An agentkit socket past its `connected` frame.
async fn kit_ws(s: &Server, id: &str) -> Ws {
    let mut ws = connect(&kit_url(s, id, s.key.as_deref())).await;
    assert_eq!(
        ws.next().await,
        json!({"type": "connected", "session_id": id})
    );
    ws
}

/// The close frame that ends the socket: (code, reason). Fails on any other frame first.
async fn close_frame(ws: &mut Ws) -> (u16, String) {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.socket.next())
            .await
            .expect("a close within 10 s")
            .expect("a close frame, not the end of the stream")
            .expect("ws read");
        match msg {
            WsMessage::Close(Some(f)) => return (u16::from(f.code), f.reason.to_string()),
            WsMessage::Close(None) => panic!("close frame without a code"),
            WsMessage::Text(t) => panic!("unexpected frame before the close: {t}"),
            _ => continue,
        }
    }
}

/// The concatenated `token` frames.
fn tokens(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["content"].as_str().unwrap())
        .collect()
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

fn is_final(f: &Value) -> bool {
    matches!(
        f["type"].as_str(),
        Some("final_answer" | "error" | "result")
    )
}

// ---------------------------------------------------------------- REST ----

#[tokio::test]
async fn rest_sessions_and_messages_have_the_seed_shapes() {
    let s = Server::start().await;
    let c = s.client();
    let (status, created) = c
        .post(
            "/chat/sessions",
            json!({"agent_name": "assistant", "metadata": {"k": "v"}}),
        )
        .await;
    assert_eq!(status, 200, "POST /chat/sessions answers 200: {created}");
    assert_eq!(
        keys(&created),
        [
            "agent_name",
            "created_at",
            "metadata",
            "session_id",
            "status",
            "updated_at"
        ]
    );
    assert_eq!(created["agent_name"], "assistant");
    assert_eq!(created["status"], "active");
    assert_eq!(created["metadata"], json!({"k": "v"}));
    assert!(created["created_at"].as_str().unwrap().ends_with("+00:00"));
    let id = created["session_id"].as_str().unwrap().to_string();

    let (status, got) = c.get(&format!("/chat/sessions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got, created);
    let (_, list) = c.get("/chat/sessions").await;
    assert!(list.as_array().unwrap().contains(&created), "{list}");
    let (_, none) = c.get(&format!("/chat/sessions/{id}/messages")).await;
    assert_eq!(none, json!([]));
    // Without metadata, the seed's `{}`.
    let (_, bare) = c
        .post("/chat/sessions", json!({"agent_name": "assistant"}))
        .await;
    assert_eq!(bare["metadata"], json!({}));

    // Synchronous send: the final assistant message.
    let (status, reply) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": "hello world", "role": "user"}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        keys(&reply),
        [
            "agent_name",
            "content",
            "created_at",
            "message_id",
            "role",
            "session_id",
            "tool_call_id"
        ]
    );
    assert_eq!(reply["role"], "assistant");
    assert_eq!(reply["content"], "echo: hello world");
    assert_eq!(reply["agent_name"], "assistant");
    assert_eq!(reply["session_id"], id.as_str());
    assert_eq!(reply["tool_call_id"], Value::Null);

    let (status, history) = c.get(&format!("/chat/sessions/{id}/messages")).await;
    assert_eq!(status, 200);
    let history = history.as_array().unwrap().clone();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["role"], "user");
    assert_eq!(history[0]["content"], "hello world");
    assert_eq!(
        history[0]["agent_name"],
        Value::Null,
        "user messages have no agent"
    );
    assert_eq!(history[1], reply);

    // A tool turn: the tool-calling assistant message (content "", never null) and the tool result.
    let (status, reply) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": "calc: 6*7"}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["content"], "The result is 42.");
    let (_, history) = c.get(&format!("/chat/sessions/{id}/messages")).await;
    let history = history.as_array().unwrap().clone();
    let roles: Vec<&str> = history
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "user",
            "assistant",
            "tool",
            "assistant"
        ]
    );
    assert_eq!(history[3]["content"], "");
    assert_eq!(history[4]["content"], "42");
    assert!(history[4]["tool_call_id"].is_string());
    // limit / offset page the history.
    let (_, page) = c
        .get(&format!("/chat/sessions/{id}/messages?limit=2&offset=1"))
        .await;
    assert_eq!(page, json!([history[1], history[2]]));
    let (_, tail) = c
        .get(&format!("/chat/sessions/{id}/messages?offset=5"))
        .await;
    assert_eq!(tail, json!([history[5]]));

    // DELETE closes; history stays readable; sends are refused with the seed's 400.
    let (status, v) = c
        .call("DELETE", &format!("/chat/sessions/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"status": "closed", "session_id": id}));
    let (_, got) = c.get(&format!("/chat/sessions/{id}")).await;
    assert_eq!(got["status"], "closed");
    let (status, v) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": "more"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(v, json!({"detail": format!("Session '{id}' is closed")}));
    let (_, after) = c.get(&format!("/chat/sessions/{id}/messages")).await;
    assert_eq!(after.as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn rest_errors_are_details_with_the_seed_status_codes() {
    let s = Server::start().await;
    let c = s.client();
    let missing = json!({"detail": "Session 'nope' not found"});
    for (method, path, body) in [
        ("GET", "/chat/sessions/nope", None),
        ("GET", "/chat/sessions/nope/messages", None),
        (
            "POST",
            "/chat/sessions/nope/messages",
            Some(json!({"content": "hi"})),
        ),
        ("DELETE", "/chat/sessions/nope", None),
    ] {
        let (status, v) = c.call(method, path, body).await;
        assert_eq!((status, &v), (404, &missing), "{method} {path}");
    }
    let (status, v) = c
        .post("/chat/sessions", json!({"agent_name": "nobody"}))
        .await;
    assert_eq!(status, 404);
    assert_eq!(v, json!({"detail": "Agent 'nobody' not found"}));

    // Validation: FastAPI's 422 with a list of {type, loc, msg, input}.
    for (path, body, kind, loc) in [
        (
            "/chat/sessions",
            json!({}),
            "missing",
            json!(["body", "agent_name"]),
        ),
        (
            "/chat/sessions",
            json!({"agent_name": 5}),
            "string_type",
            json!(["body", "agent_name"]),
        ),
        (
            "/chat/sessions",
            json!({"agent_name": "assistant", "metadata": "x"}),
            "dict_type",
            json!(["body", "metadata"]),
        ),
        (
            "/chat/sessions",
            json!([1]),
            "model_attributes_type",
            json!(["body"]),
        ),
    ] {
        let (status, v) = c.post(path, body.clone()).await;
        assert_eq!(status, 422, "{body}: {v}");
        assert_eq!(v["detail"][0]["type"], kind, "{body}: {v}");
        assert_eq!(v["detail"][0]["loc"], loc, "{body}: {v}");
        assert!(v["detail"][0]["msg"].is_string());
    }
    let id = kit_session(&c, "assistant").await;
    let (status, v) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"text": "hi"}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(v["detail"][0]["loc"], json!(["body", "content"]));
    let resp = c
        .http
        .post(format!("{}/chat/sessions/{id}/messages", s.url))
        .header("content-type", "application/json")
        .body("{\"content\": nope}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["detail"][0]["type"], "json_invalid");
    let (status, v) = c
        .get(&format!("/chat/sessions/{id}/messages?limit=abc"))
        .await;
    assert_eq!(status, 422);
    assert_eq!(v["detail"][0]["type"], "int_parsing");
    assert_eq!(v["detail"][0]["loc"], json!(["query", "limit"]));

    // A failed turn is the seed's 500 with the error as the detail.
    let (status, v) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": "status=500"}),
        )
        .await;
    assert_eq!(status, 500, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("500"),
        "the detail names the upstream failure: {v}"
    );
    // Over-size content (server.max_message_bytes = 4096): 413, nothing stored.
    let before = c.messages(&id).await.len();
    let (status, v) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": "y".repeat(5000)}),
        )
        .await;
    assert_eq!(status, 413);
    assert!(v["detail"].is_string());
    assert_eq!(c.messages(&id).await.len(), before);
}

#[tokio::test]
async fn rest_needs_a_bearer_key_when_keys_are_configured() {
    let s = Server::start_with(Options {
        extra: AUTH.into(),
        ..Default::default()
    })
    .await;
    let anonymous = s.client_with_key(None);
    let wrong = s.client_with_key(Some("sk-wrong"));
    let alice = s.client_with_key(Some("sk-alice"));
    let bob = s.client_with_key(Some("sk-bob"));
    let (status, v) = anonymous.get("/chat/sessions").await;
    assert_eq!((status, v), (401, json!({"detail": "Not authenticated"})));
    let (status, v) = wrong
        .post("/chat/sessions", json!({"agent_name": "assistant"}))
        .await;
    assert_eq!((status, v), (401, json!({"detail": "Invalid API key"})));
    let id = kit_session(&alice, "assistant").await;
    // Another principal's session is reported exactly like a missing one.
    let (status, v) = bob.get(&format!("/chat/sessions/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(v, json!({"detail": format!("Session '{id}' not found")}));
    let (_, list) = bob.get("/chat/sessions").await;
    assert_eq!(list, json!([]));
    let (_, list) = alice.get("/chat/sessions").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------- WebSocket handshake ----

#[tokio::test]
async fn websocket_refuses_a_bad_or_missing_key_with_4001() {
    let s = Server::start_with(Options {
        extra: AUTH.into(),
        ..Default::default()
    })
    .await;
    let alice = s.client_with_key(Some("sk-alice"));
    let id = kit_session(&alice, "assistant").await;
    for key in [None, Some("sk-wrong")] {
        let mut ws = connect(&kit_url(&s, &id, key)).await;
        assert_eq!(
            ws.next().await,
            json!({"type": "error", "data": {"message": "Invalid api_key"}}),
            "key {key:?}"
        );
        assert_eq!(close_frame(&mut ws).await, (4001, "Invalid api_key".into()));
    }
    let mut ws = connect(&kit_url(&s, &id, Some("sk-alice"))).await;
    assert_eq!(
        ws.next().await,
        json!({"type": "connected", "session_id": id})
    );
    // Bob's key is valid, but the session is not his: the seed's unknown-session answer.
    let mut ws = connect(&kit_url(&s, &id, Some("sk-bob"))).await;
    assert_eq!(
        ws.next().await["data"]["message"],
        format!("Session '{id}' not found")
    );
    assert_eq!(close_frame(&mut ws).await.0, 1000);
}

#[tokio::test]
async fn websocket_unknown_or_closed_session_gets_an_error_then_close_1000() {
    let s = Server::start().await;
    let c = s.client();
    let mut ws = connect(&kit_url(&s, "nope", None)).await;
    assert_eq!(
        ws.next().await,
        json!({"type": "error", "data": {"message": "Session 'nope' not found"}})
    );
    assert_eq!(
        close_frame(&mut ws).await,
        (1000, "Session not found".into())
    );
    let id = kit_session(&c, "assistant").await;
    c.call("DELETE", &format!("/chat/sessions/{id}"), None)
        .await;
    let mut ws = connect(&kit_url(&s, &id, None)).await;
    assert_eq!(
        ws.next().await,
        json!({"type": "error", "data": {"message": "Session is closed"}})
    );
    assert_eq!(close_frame(&mut ws).await, (1000, "Session closed".into()));
}

// ---------------------------------------------------------------- WebSocket frames ----

#[tokio::test]
async fn websocket_streams_tokens_thoughts_steps_and_the_final_answer() {
    let s = Server::start().await;
    let c = s.client();
    let id = kit_session(&c, "assistant").await;
    let mut ws = kit_ws(&s, &id).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await, json!({"type": "pong"}));
    // What the seed ignores is ignored: text that is not JSON, unknown types, replies nobody waits for.
    ws.send_raw("{not json").await;
    ws.send(json!({"type": "dance"})).await;
    ws.send(json!({"type": "reply", "request_id": "nobody", "content": "x"}))
        .await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(
        ws.next().await,
        json!({"type": "pong"}),
        "nothing answered the ignored frames"
    );

    // 50 ms apart, each delta is a read of its own upstream and so a frame of its own.
    ws.send(json!({"type": "message", "content": "think tokens=3 delay_ms=50"}))
        .await;
    let frames = ws.until(is_final).await;
    assert_eq!(
        frames,
        [
            json!({"type": "step", "data": {"event_type": "thought", "step": 1,
                "data": {"content": "Let me think about this."}}}),
            json!({"type": "token", "content": "tok0"}),
            json!({"type": "token", "content": " tok1"}),
            json!({"type": "token", "content": " tok2"}),
            json!({"type": "final_answer", "content": "tok0 tok1 tok2"}),
        ]
    );

    ws.send(json!({"type": "message", "content": "calc: 6*7"}))
        .await;
    let frames = ws.until(is_final).await;
    let action = &frames[0];
    let call_id = action["data"]["data"]["call_id"].as_str().unwrap();
    assert_eq!(
        action,
        &json!({"type": "step", "data": {"event_type": "action", "step": 1,
            "data": {"tool": "calculator", "args": {"expression": "6*7"}, "call_id": call_id}}})
    );
    assert_eq!(
        frames[1],
        json!({"type": "step", "data": {"event_type": "observation", "step": 1,
            "data": {"tool": "calculator", "call_id": call_id, "result": "42", "success": true}}}),
        "the observation carries its action's step"
    );
    let last = frames.last().unwrap();
    assert_eq!(
        last,
        &json!({"type": "final_answer", "content": "The result is 42."})
    );
    assert_eq!(tokens(&frames), "The result is 42.");
    // Stored exactly once, by the server (not by the socket).
    let history = c.messages(&id).await;
    assert_eq!(history.len(), 6);
    assert_eq!(history[5]["content"], "The result is 42.");
}

#[tokio::test]
async fn websocket_reports_skill_matches_and_context_compression() {
    let s = Server::start_with(Options {
        extra: EXTRA.into(),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let id = kit_session(&c, "mathy").await;
    let mut ws = kit_ws(&s, &id).await;
    ws.send(json!({"type": "message", "content": "please compute the sum tokens=2"}))
        .await;
    let frames = ws.until(is_final).await;
    assert_eq!(
        frames[0],
        json!({"type": "skill_match", "data": {"skill": "math", "method": "keyword", "confidence": 0.75}})
    );
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "final_answer", "content": "tok0 tok1"})
    );

    let id = kit_session(&c, "tiny").await;
    let (status, _) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": format!("tokens=30 {}", "lorem ipsum ".repeat(30))}),
        )
        .await;
    assert_eq!(status, 200);
    let mut ws = kit_ws(&s, &id).await;
    ws.send(json!({"type": "message", "content": "second tokens=2"}))
        .await;
    let frames = ws.until(is_final).await;
    assert_eq!(
        frames[0],
        json!({"type": "step", "data": {"event_type": "context_compressed", "step": 1,
            "data": {"messages_before": 3, "messages_after": 1}}})
    );
    assert_eq!(frames.last().unwrap()["type"], "final_answer");
}

#[tokio::test]
async fn websocket_cancel_really_cancels_the_running_turn() {
    let s = Server::start().await;
    let c = s.client();
    let id = kit_session(&c, "assistant").await;
    let mut ws = kit_ws(&s, &id).await;
    ws.send(json!({"type": "message", "content": "tokens=300 delay_ms=10"}))
        .await;
    let mut frames = ws.until(|f| f["type"] == "token").await;
    let t = Instant::now();
    ws.send(json!({"type": "cancel"})).await;
    frames.extend(ws.until(is_final).await);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        t.elapsed()
    );
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "result", "data": {"status": "cancelled"}})
    );
    assert!(!frames.iter().any(|f| f["type"] == "final_answer"));
    // The run the turn used is the one that stopped (the seed cancelled a token nobody read).
    let (_, runs) = c.get(&format!("/v1/sessions/{id}/runs")).await;
    assert_eq!(runs[0]["status"], "cancelled");
    let partial = tokens(&frames);
    let stored = c.messages(&id).await;
    let kept = stored.last().unwrap();
    assert_eq!(kept["role"], "assistant");
    assert!(
        kept["content"].as_str().unwrap().starts_with(&partial),
        "the partial answer is kept: {kept}"
    );
    assert!(kept["content"].as_str().unwrap().len() < "tok0 tok1".len() * 150);
    // With nothing running, a cancel is still answered, as the seed always answered it.
    ws.send(json!({"type": "cancel"})).await;
    assert_eq!(
        ws.next().await,
        json!({"type": "result", "data": {"status": "cancelled"}})
    );
    // The socket goes on.
    ws.send(json!({"type": "message", "content": "tokens=2"}))
        .await;
    assert_eq!(
        ws.until(is_final).await.last().unwrap(),
        &json!({"type": "final_answer", "content": "tok0 tok1"})
    );
}

#[tokio::test]
async fn websocket_reply_reaches_a_waiting_ask_human() {
    let s = Server::start().await;
    s.upstream.push(Reply::tool_call(
        "call_1",
        "ask_human",
        r#"{"question":"Your name?"}"#,
    ));
    let c = s.client();
    let id = kit_session(&c, "assistant").await;
    let mut ws = kit_ws(&s, &id).await;
    ws.send(json!({"type": "message", "content": "greet me"}))
        .await;
    let frames = ws.until(|f| f["type"] == "ask_human").await;
    assert_eq!(
        frames[0],
        json!({"type": "step", "data": {"event_type": "action", "step": 1,
            "data": {"tool": "ask_human", "args": {"question": "Your name?"}, "call_id": "call_1"}}})
    );
    let asked = frames.last().unwrap();
    assert_eq!(keys(asked), ["question", "request_id", "type"]);
    assert_eq!(asked["question"], "Your name?");
    ws.send(json!({"type": "reply", "request_id": asked["request_id"], "content": "Ada"}))
        .await;
    let frames = ws.until(is_final).await;
    assert_eq!(
        frames[0],
        json!({"type": "step", "data": {"event_type": "observation", "step": 1,
            "data": {"tool": "ask_human", "call_id": "call_1", "result": "Ada", "success": true}}})
    );
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "final_answer", "content": "The result is Ada."})
    );
}

#[tokio::test]
async fn websocket_streams_the_sessions_turns_from_any_surface_and_errors_as_the_seed() {
    let s = Server::start().await;
    let c = s.client();
    let id = kit_session(&c, "assistant").await;
    let mut ws = kit_ws(&s, &id).await;
    // A turn sent through the native REST API reaches the agentkit socket.
    c.send_bg(&id, "tokens=3").await;
    assert_eq!(
        ws.until(is_final).await.last().unwrap(),
        &json!({"type": "final_answer", "content": "tok0 tok1 tok2"})
    );
    // A socket that connects mid-turn gets the turn replayed from its start.
    ws.send(json!({"type": "message", "content": "tokens=40 delay_ms=10"}))
        .await;
    ws.until(|f| f["type"] == "token").await;
    let mut late = kit_ws(&s, &id).await;
    let frames = late.until(is_final).await;
    let answer = frames.last().unwrap()["content"].as_str().unwrap();
    assert!(answer.starts_with("tok0 tok1"));
    assert_eq!(
        tokens(&frames),
        answer,
        "the whole answer, from the first token"
    );
    ws.until(is_final).await;
    // A failed turn: the seed's error frame.
    ws.send(json!({"type": "message", "content": "status=500"}))
        .await;
    let err = ws.until(is_final).await.pop().unwrap();
    assert_eq!(keys(&err), ["data", "type"]);
    assert_eq!(err["type"], "error");
    assert!(
        err["data"]["message"].as_str().unwrap().contains("500"),
        "{err}"
    );
    // Refusals are error frames too, and the socket stays open.
    ws.send(json!({"type": "message", "content": "z".repeat(5000)}))
        .await;
    let err = ws.next().await;
    assert_eq!(err["type"], "error");
    assert!(
        err["data"]["message"].as_str().unwrap().contains("limit"),
        "{err}"
    );
    c.call("DELETE", &format!("/chat/sessions/{id}"), None)
        .await;
    ws.send(json!({"type": "message", "content": "hello?"}))
        .await;
    assert_eq!(
        ws.next().await,
        json!({"type": "error", "data": {"message": "Session is closed"}})
    );
}
