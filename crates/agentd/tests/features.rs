//! The seeds' features through the native API over real HTTP/WebSocket: skills, context compression,
//! subagents, thinking, images.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::time::{Duration, Instant};

use agentd_testkit::Reply;
use base64::Engine;
use common::{Options, Server};
use serde_json::{json, Value};

const EXTRA: &str = r#"
[[agents]]
name = "mathy"
provider = "upstream"
model = "general-model"
system_prompt = "You are general."
tools = ["calculator", "current_time"]
skills = ["math", "poet"]

[[agents]]
name = "boss"
provider = "upstream"
model = "boss-model"
system_prompt = "You delegate."
tools = ["calculator"]
subagents = ["researcher"]

[[agents]]
name = "researcher"
description = "Finds facts"
provider = "upstream"
model = "research-model"
system_prompt = "You research."
tools = ["current_time"]

[[agents]]
name = "tiny"
provider = "upstream"
model = "tiny-model"
system_prompt = "Be brief."
max_context_tokens = 120
compress_at = 0.5

[[skills]]
name = "math"
description = "Arithmetic"
keywords = ["calculate", "compute", "sum"]
system_prompt = "You are a careful calculator."
tools = ["calculator"]
model = "math-model"

[[skills]]
name = "poet"
keywords = ["poem"]
system_prompt = "You write verse."
tools = []
"#;

async fn server() -> Server {
    Server::start_with(Options {
        extra: EXTRA.into(),
        ..Default::default()
    })
    .await
}

async fn session(c: &common::Client, agent: &str) -> String {
    let (status, v) = c.post("/v1/sessions", json!({"agent": agent})).await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// All events of a session, from the start.
async fn log(c: &common::Client, id: &str) -> Vec<Value> {
    let mut ws = c.ws(id, "after=0").await;
    let hello = ws.next().await;
    let last = hello["last_seq"].as_u64().unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < last {
        out.push(ws.next().await);
    }
    out
}

fn system_prompt(req: &Value) -> String {
    req["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn tool_names(req: &Value) -> Vec<String> {
    req["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| t["function"]["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn skills_explicit_and_keyword_change_prompt_tools_and_model() {
    let s = server().await;
    let c = s.client();
    let id = session(&c, "mathy").await;
    let (status, _) = c.send(&id, "@skill:poet tokens=2").await;
    assert_eq!(status, 200);
    let req = s.upstream.last_request().unwrap();
    assert_eq!(system_prompt(&req), "You write verse.");
    assert!(
        req.get("tools").is_none() || tool_names(&req).is_empty(),
        "poet has no tools: {req}"
    );
    assert_eq!(req["model"], "general-model");
    assert_eq!(
        c.messages(&id).await[0]["content"],
        "tokens=2",
        "the prefix is stripped from the stored message"
    );

    c.send(&id, "please compute the sum tokens=2").await;
    let req = s.upstream.last_request().unwrap();
    assert_eq!(system_prompt(&req), "You are a careful calculator.");
    assert_eq!(tool_names(&req), ["calculator"]);
    assert_eq!(req["model"], "math-model");

    c.send(&id, "hello there tokens=2").await;
    let req = s.upstream.last_request().unwrap();
    assert_eq!(
        system_prompt(&req),
        "You are general.",
        "no match keeps the agent's defaults"
    );
    assert_eq!(tool_names(&req), ["calculator", "current_time"]);

    let matched: Vec<(String, String, f64)> = log(&c, &id)
        .await
        .iter()
        .filter(|e| e["type"] == "skill_matched")
        .map(|e| {
            (
                e["skill"].as_str().unwrap().into(),
                e["method"].as_str().unwrap().into(),
                e["confidence"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        matched,
        [
            ("poet".into(), "explicit".into(), 1.0),
            ("math".into(), "keyword".into(), 0.75)
        ]
    );
    let (status, v) = c.send(&id, "@skill:nope hi").await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn compression_triggers_on_a_tiny_window_and_falls_back_to_truncation() {
    let s = server().await;
    let c = s.client();
    let id = session(&c, "tiny").await;
    let long = format!("tokens=30 {}", "lorem ipsum ".repeat(30));
    c.send(&id, &long).await;
    // Turn 2: over 0.5 * 120 tokens -> the older part is summarised by the model.
    let (_, v) = c.send(&id, "second tokens=2").await;
    assert_eq!(v["run"]["status"], "completed");
    let reqs = s.upstream.requests();
    assert_eq!(reqs.len(), 3, "turn 1, the summary call, turn 2");
    let summary_req = &reqs[1];
    assert!(summary_req["messages"][0]["content"]
        .as_str()
        .unwrap()
        .starts_with("Summarise"));
    let main = &reqs[2];
    let msgs = main["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["content"], "Be brief.");
    assert!(msgs[1]["content"]
        .as_str()
        .unwrap()
        .starts_with("Summary of the earlier conversation:"));
    assert_eq!(
        msgs.last().unwrap()["content"],
        "second tokens=2",
        "the latest user message is kept"
    );
    // Turn 3: the summary call fails -> truncation, and the turn still completes.
    s.upstream.push(Reply::status(500));
    let (_, v) = c.send(&id, "third tokens=2").await;
    assert_eq!(v["run"]["status"], "completed");
    let last = s.upstream.last_request().unwrap();
    let msgs = last["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "system prompt + latest user message: {last}");
    let events: Vec<(u64, u64, String)> = log(&c, &id)
        .await
        .iter()
        .filter(|e| e["type"] == "context_compressed")
        .map(|e| {
            (
                e["messages_before"].as_u64().unwrap(),
                e["messages_after"].as_u64().unwrap(),
                e["method"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [(3, 1, "summary".into()), (5, 1, "truncation".into())]
    );
    assert_eq!(
        c.messages(&id).await.len(),
        6,
        "stored history stays complete"
    );
}

#[tokio::test]
async fn compression_never_splits_a_tool_call_from_its_result() {
    let s = server().await;
    let c = s.client();
    let id = session(&c, "tiny").await;
    c.send(&id, &format!("tokens=20 {}", "words ".repeat(40)))
        .await;
    // Turn 2 calls a tool: its call and result stay together in the (compressed) prompt.
    s.upstream.push(Reply::text("short summary"));
    let (_, v) = c.send(&id, "calc: 2+2").await;
    assert_eq!(v["run"]["status"], "completed", "{v}");
    let last = s.upstream.last_request().unwrap();
    let msgs = last["messages"].as_array().unwrap();
    let call = msgs
        .iter()
        .position(|m| m["role"] == "assistant" && m["tool_calls"].is_array())
        .unwrap();
    assert_eq!(msgs[call + 1]["role"], "tool");
    assert_eq!(
        msgs[call + 1]["tool_call_id"],
        msgs[call]["tool_calls"][0]["id"]
    );
}

#[tokio::test]
async fn subagents_stream_marked_events_and_cancel_reaches_them() {
    let s = server().await;
    let c = s.client();
    let id = session(&c, "boss").await;
    s.upstream.push(Reply::tool_call(
        "s1",
        "researcher",
        r#"{"task":"tokens=3"}"#,
    ));
    let (status, v) = c.send(&id, "find out").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["run"]["status"], "completed");
    let reqs = s.upstream.requests();
    assert!(tool_names(&reqs[0]).contains(&"researcher".to_string()));
    assert_eq!(reqs[1]["model"], "research-model");
    assert_eq!(system_prompt(&reqs[1]), "You research.");
    let events = log(&c, &id).await;
    let sub: Vec<&Value> = events.iter().filter(|e| e["is_subagent"] == true).collect();
    assert!(!sub.is_empty());
    assert!(sub.iter().all(|e| e["agent"] == "researcher"));
    assert!(sub.iter().any(|e| e["type"] == "text_delta"));
    let outer = events
        .iter()
        .find(|e| e["type"] == "tool_finished" && e["tool"] == "researcher")
        .unwrap();
    assert_eq!(outer["is_subagent"], false);
    assert_eq!(outer["agent"], "boss");
    let sub_text: String = sub
        .iter()
        .filter(|e| e["type"] == "text_delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        outer["result"].as_str().unwrap(),
        sub_text,
        "the subagent's answer is the tool result"
    );
    // The session's own answer is its non-subagent text only.
    let finished = events
        .iter()
        .rev()
        .find(|e| e["type"] == "run_finished")
        .unwrap();
    assert_eq!(finished["content"], common::own_text(&events));

    // Cancel reaches into a running subagent.
    s.upstream.push(Reply::tool_call(
        "s2",
        "researcher",
        r#"{"task":"tokens=500 delay_ms=10"}"#,
    ));
    let run = c.send_bg(&id, "dig deep").await;
    let mut ws = c.ws(&id, "").await;
    ws.until(|f| f["type"] == "text_delta" && f["is_subagent"] == true)
        .await;
    let t = Instant::now();
    let (_, v) = c
        .post(&format!("/v1/sessions/{id}/runs/{run}/cancel"), json!({}))
        .await;
    assert_eq!(v["status"], "cancelled");
    assert!(t.elapsed() < Duration::from_secs(2));
    let opened = s.upstream.streams_opened();
    assert!(
        s.upstream
            .wait_streams_closed(opened, Duration::from_secs(2))
            .await,
        "the subagent's upstream call was dropped"
    );
}

#[tokio::test]
async fn thinking_from_reasoning_fields_and_think_tags() {
    let s = server().await;
    let c = s.client();
    let id = c.session().await;
    let (_, v) = c.send(&id, "think").await;
    assert_eq!(v["run"]["status"], "completed");
    s.upstream.push(Reply::ThinkTagged {
        thinking: "inner plan".into(),
        answer: "Visible answer".into(),
    });
    let (_, v) = c.send(&id, "again").await;
    assert_eq!(
        v["message"]["content"], "Visible answer",
        "think tags never reach the answer"
    );
    let events = log(&c, &id).await;
    let ends: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "thinking_end")
        .collect();
    assert_eq!(ends.len(), 2);
    assert!(!ends[0]["thinking"].as_str().unwrap().is_empty());
    assert_eq!(ends[1]["thinking"], "inner plan");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "thinking_delta" && e["run_id"] == ends[1]["run_id"])
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "inner plan");
}

fn png_bytes() -> Vec<u8> {
    let mut b = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    b.extend_from_slice(&[0u8; 32]);
    b
}

#[tokio::test]
async fn images_are_sent_as_image_url_parts_and_limited() {
    let s = Server::start_with(Options {
        extra: EXTRA.into(),
        server_extra: "max_image_bytes = 1024".into(),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let id = c.session().await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(png_bytes());
    let data_url = format!("data:image/png;base64,{b64}");
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "what is this?", "images": [data_url, b64]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let req = s.upstream.last_request().unwrap();
    let user = req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "user")
        .unwrap();
    let parts = user["content"].as_array().unwrap();
    assert_eq!(parts[0], json!({"type": "text", "text": "what is this?"}));
    assert_eq!(parts[1]["type"], "image_url");
    assert_eq!(parts[1]["image_url"]["url"], data_url);
    assert_eq!(
        parts[2]["image_url"]["url"], data_url,
        "bare base64 got its type from the magic bytes"
    );
    let big = base64::engine::general_purpose::STANDARD.encode(vec![0x89u8; 4096]);
    let (status, _) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "x", "images": [big]}),
        )
        .await;
    assert_eq!(status, 413);
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "x", "images": ["bm90IGFuIGltYWdl"]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        c.messages(&id)
            .await
            .iter()
            .filter(|m| m["role"] == "user")
            .count(),
        1,
        "rejected sends store nothing"
    );
    // A later turn still sends the earlier image.
    c.send(&id, "and now?").await;
    let req = s.upstream.last_request().unwrap();
    let first_user = req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "user")
        .unwrap();
    assert!(first_user["content"].is_array());
}
