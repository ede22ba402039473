//! The OpenAI-compatible surfaces' wire details (SPEC.md section 8), on SQLite and (scripts/test.sh) on
//! PostgreSQL: error shapes, a stateless chat continuing one session, Responses streams numbered from the log
//! and resumed with `starting_after` after a restart. The SDK's view is in tests/openai/ (Python).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed assertion

mod common;

use common::{Options, Server};
use serde_json::{json, Value};

/// `data:` payloads of an SSE body (with their `event:` names, when given).
fn sse_data(body: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    let mut event = None;
    for line in body.lines() {
        if let Some(e) = line.strip_prefix("event:") {
            event = Some(e.trim().to_string());
        } else if let Some(d) = line.strip_prefix("data:") {
            out.push((event.take(), d.trim().to_string()));
        }
    }
    out
}

async fn post_text(c: &common::Client, path: &str, body: Value) -> (u16, String) {
    let mut r = c.http.post(format!("{}{path}", c.base)).json(&body);
    if let Some(k) = &c.key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

async fn get_text(c: &common::Client, path: &str) -> (u16, String) {
    let mut r = c.http.get(format!("{}{path}", c.base));
    if let Some(k) = &c.key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

#[tokio::test]
async fn errors_have_openais_shape() {
    let server = Server::start_with(Options {
        extra: "[[auth.keys]]\nprincipal = \"alice\"\nkey = \"sk-a\"\n".into(),
        ..Default::default()
    })
    .await;
    let (status, body) = server
        .client_with_key(Some("sk-wrong"))
        .get("/v1/models")
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"].get("param").is_some(), "{body}");
    let c = server.client();
    let (status, body) = c
        .post(
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let (status, body) = c
        .post("/v1/chat/completions", json!({"model": "assistant"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let (status, body) = c.get("/v1/responses/resp_nothing").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = c.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "assistant");
    assert_eq!(body["data"][0]["owned_by"], "agentd");
}

#[tokio::test]
async fn a_stateless_chat_continues_one_session() {
    let server = Server::start().await;
    let c = server.client();
    let mut history = vec![
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "one"}),
    ];
    for next in ["two", "three"] {
        let (status, body) = c
            .post(
                "/v1/chat/completions",
                json!({"model": "assistant", "messages": history}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let answer = body["choices"][0]["message"]["content"].clone();
        history.push(json!({"role": "assistant", "content": answer}));
        history.push(json!({"role": "user", "content": next}));
    }
    let (status, text) = post_text(
        &c,
        "/v1/chat/completions",
        json!({"model": "assistant", "messages": history, "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let data = sse_data(&text);
    assert_eq!(data.last().map(|d| d.1.as_str()), Some("[DONE]"), "{text}");
    let (_, sessions) = c.get("/v1/sessions").await;
    let sessions = sessions.as_array().cloned().unwrap_or_default();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["metadata"]["source"], "chat.completions");
    // The upstream saw the agent's prompt, the client's system message and the whole conversation, once.
    let last = server.upstream.last_request().expect("a request");
    let roles: Vec<&str> = last["messages"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["role"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        roles,
        [
            "system",
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
            "user"
        ]
    );
}

/// The Responses events of an SSE body, each checked to carry its type as its event name.
fn responses_events(text: &str) -> Vec<Value> {
    sse_data(text)
        .into_iter()
        .map(|(event, d)| {
            let v: Value = serde_json::from_str(&d).expect("json");
            assert_eq!(event.as_deref(), v["type"].as_str(), "event name = type");
            v
        })
        .collect()
}

/// A real agentd process on `dir`'s config (the base one and `extra`) as one named node, so that the next
/// process on that config is the same node and takes its unfinished runs over at once; and the config's path.
async fn spawn_node(
    upstream: &agentd_testkit::MockUpstream,
    dir: &std::path::Path,
    extra: &str,
) -> (std::path::PathBuf, common::Process) {
    let config = dir.join("agentd.toml");
    let extra = format!("{extra}\n[cluster]\nnode_id = \"the-node\"\n");
    let text = common::config_text(&upstream.base_url(), dir, 30, &extra);
    std::fs::write(&config, text).unwrap();
    let p = common::spawn_agentd(&config).await;
    (config, p)
}

/// The events of a streamed `POST /v1/responses` of `body`.
async fn stream_create(c: &common::Client, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    let (status, text) = post_text(c, "/v1/responses", body).await;
    assert_eq!(status, 200, "{text}");
    responses_events(&text)
}

#[tokio::test]
async fn a_responses_stream_resumes_after_a_restart() {
    let upstream = agentd_testkit::MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, mut p) = spawn_node(&upstream, dir.path(), "").await;
    let c = p.client();
    let before = stream_create(&c, json!({"model": "assistant", "input": "tokens=8"})).await;
    let numbers: Vec<u64> = before
        .iter()
        .filter_map(|v| v["sequence_number"].as_u64())
        .collect();
    assert_eq!(numbers, (0..before.len() as u64).collect::<Vec<_>>());
    assert_eq!(before[0]["type"], "response.created");
    assert_eq!(before.last().expect("events")["type"], "response.completed");
    let id = before[0]["response"]["id"].as_str().unwrap().to_string();
    // A background response cut by kill -9 mid-stream, resumed by the next process.
    let (status, body) = c
        .post(
            "/v1/responses",
            json!({"model": "assistant", "input": "tokens=40 delay_ms=25", "background": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let cut = body["id"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    p.kill_9();

    let p = common::spawn_agentd(&config).await;
    let c = p.client();
    let (status, text) = get_text(
        &c,
        &format!("/v1/responses/{id}?stream=true&starting_after=4"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(responses_events(&text), before[5..].to_vec());
    let (status, body) = c.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "completed");
    assert_eq!(
        body["output"][0]["content"][0]["text"],
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    );
    // The cut response goes on in the new process; its stream, read whole and resumed, numbers alike.
    let (_, whole) = get_text(&c, &format!("/v1/responses/{cut}?stream=true")).await;
    let whole = responses_events(&whole);
    assert_eq!(
        whole.last().unwrap()["type"],
        "response.completed",
        "{whole:?}"
    );
    let (_, rest) = get_text(
        &c,
        &format!("/v1/responses/{cut}?stream=true&starting_after=9"),
    )
    .await;
    assert_eq!(responses_events(&rest), whole[10..].to_vec());
    let (status, _) = c.call("DELETE", &format!("/v1/responses/{id}"), None).await;
    assert_eq!(status, 200);
    let (status, body) = c.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(status, 404, "{body}");
}

/// `GET /v1/responses/{id}` until `done` holds (at most 20 s).
async fn poll(c: &common::Client, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, r) = c.get(&format!("/v1/responses/{id}")).await;
        if done(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "response {id} stayed {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ask_human_is_an_mcp_call_answered_through_the_native_api() {
    let server = Server::start().await;
    let c = server.client();
    server.upstream.push(agentd_testkit::Reply::tool_call(
        "call_q",
        "ask_human",
        r#"{"question": "Which colour?"}"#,
    ));
    let (status, body) = c
        .post(
            "/v1/responses",
            json!({"model": "assistant", "input": "ask me", "background": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let waiting = poll(&c, &id, |r| {
        r["metadata"]["agentd_input_request_id"].is_string()
    })
    .await;
    assert_eq!(waiting["status"], "in_progress");
    assert_eq!(
        waiting["metadata"]["agentd_input_question"],
        "Which colour?"
    );
    let item = &waiting["output"][0];
    assert_eq!(item["type"], "mcp_call");
    assert_eq!(item["name"], "ask_human");
    assert_eq!(item["status"], "in_progress");
    let (session, run) = (
        waiting["metadata"]["agentd_session_id"].as_str().unwrap(),
        waiting["metadata"]["agentd_run_id"].as_str().unwrap(),
    );
    let (status, body) = c
        .post(
            &format!("/v1/sessions/{session}/runs/{run}/input"),
            json!({"request_id": waiting["metadata"]["agentd_input_request_id"], "content": "blue"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let done = poll(&c, &id, |r| r["status"] == "completed").await;
    assert_eq!(done["output"][0]["output"], "blue");
    assert_eq!(done["output"][0]["status"], "completed");
    assert!(done["metadata"].get("agentd_input_request_id").is_none());
    assert_eq!(
        done["output"][1]["content"][0]["text"],
        "The result is blue."
    );
}

#[tokio::test]
async fn a_chat_whose_client_hung_up_mid_stream_still_continues() {
    let server = Server::start().await;
    let c = server.client();
    let first = json!([{"role": "user", "content": "tokens=30 delay_ms=20"}]);
    let mut resp = c
        .http
        .post(format!("{}/v1/chat/completions", c.base))
        .json(&json!({"model": "assistant", "messages": first, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first_bytes = resp.chunk().await.unwrap().unwrap_or_default();
    assert!(String::from_utf8_lossy(&first_bytes).contains("chat.completion.chunk"));
    drop(resp); // the client goes away mid-stream; the turn goes on
    let (_, sessions) = c.get("/v1/sessions").await;
    let session = sessions[0]["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while c.get(&format!("/v1/sessions/{session}")).await.1["active_run_id"].is_string() {
        assert!(std::time::Instant::now() < deadline, "the run did not end");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The task that took the stream over stores the continuation key once it has read the run's end, just
    // after the run shows as ended (nothing in the API shows the key): give it a moment (on PostgreSQL the
    // store round trip takes longer than this loop's next request).
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let answer: String = (0..30)
        .map(|i| format!("tok{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let (status, body) = c
        .post(
            "/v1/chat/completions",
            json!({"model": "assistant", "messages": [
                {"role": "user", "content": "tokens=30 delay_ms=20"},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "and then?"},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: and then?");
    let (_, sessions) = c.get("/v1/sessions").await;
    assert_eq!(sessions.as_array().map(Vec::len), Some(1), "{sessions}");
}

/// An agent whose calculator calls wait for a person's approval.
const CAREFUL: &str = "[[agents]]\nname = \"careful\"\nprovider = \"upstream\"\nmodel = \"mock-model\"\ntools = [\"calculator\"]\napprove = [\"calculator\"]\n";

/// The run's status in the native API until `status` (at most 20 s).
async fn wait_run(c: &common::Client, session: &str, run: &str, status: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, r) = c.get(&format!("/v1/sessions/{session}/runs/{run}")).await;
        if r["status"] == status {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Approvals on the Responses API with the real binary: the response that asks ends `completed` with its
/// `mcp_approval_request`, and reads the same (retrieved and streamed) after a kill -9 while the run waits; a
/// client following the next response's stream gets the rest of the run once the approval is decided over the
/// native API; answering that decided request through the Responses API is a 409, an unknown one a 404.
#[tokio::test]
async fn an_approval_request_survives_a_restart_and_its_next_response_follows_a_native_decision() {
    let upstream = agentd_testkit::MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, mut p) = spawn_node(&upstream, dir.path(), CAREFUL).await;
    let c = p.client();
    let asked = stream_create(&c, json!({"model": "careful", "input": "calc: 6*7"})).await;
    let last = asked.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{asked:?}");
    let response = &last["response"];
    assert_eq!(response["status"], "completed");
    let output = response["output"].as_array().unwrap();
    assert_eq!(
        output.len(),
        1,
        "no mcp_call before the decision: {output:?}"
    );
    let item = &output[0];
    assert_eq!(item["type"], "mcp_approval_request");
    assert_eq!(item["server_label"], "agentd");
    assert_eq!(item["name"], "calculator");
    let args: Value = serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"expression": "6*7"}));
    let item_id = item["id"].as_str().unwrap().to_string();
    let request_id = item_id.strip_prefix("mcpr_").unwrap().to_string();
    let id = response["id"].as_str().unwrap().to_string();
    let next = response["metadata"]["agentd_next_response_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(next, format!("{id}{request_id}"));
    let (session, run) = (
        response["metadata"]["agentd_session_id"]
            .as_str()
            .unwrap()
            .to_string(),
        response["metadata"]["agentd_run_id"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    wait_run(&c, &session, &run, "waiting_input").await;
    let (_, before) = c.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(before["output"][0], *item, "{before}");
    p.kill_9();

    let p = common::spawn_agentd(&config).await;
    let c = p.client();
    // The next process resumes the run, which waits again under the same request.
    let mut ws = c.ws(&session, "after=0").await;
    ws.until(|f| f["type"] == "run_resumed").await;
    wait_run(&c, &session, &run, "waiting_input").await;
    let (status, after) = c.get(&format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after, before, "the same response after the restart");
    let (_, again) = get_text(&c, &format!("/v1/responses/{id}?stream=true")).await;
    assert_eq!(
        responses_events(&again),
        asked,
        "the same stream after the restart"
    );

    // A client follows the next response while someone decides over the native API.
    let follower = {
        let c = c.clone();
        let next = next.clone();
        tokio::spawn(
            async move { get_text(&c, &format!("/v1/responses/{next}?stream=true")).await },
        )
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !follower.is_finished(),
        "the next response waits for the decision"
    );
    let (status, body) = c
        .post(
            &format!("/v1/sessions/{session}/runs/{run}/approvals/{request_id}"),
            json!({"decision": "allow"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, text) = follower.await.unwrap();
    assert_eq!(status, 200, "{text}");
    let rest = responses_events(&text);
    let numbers: Vec<u64> = rest
        .iter()
        .filter_map(|v| v["sequence_number"].as_u64())
        .collect();
    assert_eq!(numbers, (0..rest.len() as u64).collect::<Vec<_>>());
    assert_eq!(rest[0]["type"], "response.created");
    assert_eq!(rest[0]["response"]["id"], next.as_str());
    let done = &rest.last().unwrap()["response"];
    assert_eq!(rest.last().unwrap()["type"], "response.completed");
    assert_eq!(done["previous_response_id"], id.as_str());
    assert_eq!(done["output"][0]["type"], "mcp_call", "{done}");
    assert_eq!(done["output"][0]["output"], "42");
    assert_eq!(done["output"][0]["approval_request_id"], item_id.as_str());
    assert_eq!(done["output"][1]["content"][0]["text"], "The result is 42.");
    assert!(
        done["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{done}"
    );
    let (_, retrieved) = c.get(&format!("/v1/responses/{next}")).await;
    assert_eq!(retrieved, *done);

    // Decided already: 409; an unknown request: 404; no previous response: 400.
    let answer = |request: &str, prev: Option<&str>| {
        json!({"model": "careful", "previous_response_id": prev, "input": [
            {"type": "mcp_approval_response", "approval_request_id": request, "approve": true}]})
    };
    let (status, body) = c.post("/v1/responses", answer(&item_id, Some(&id))).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let unknown = format!("mcpr_{}", "0".repeat(32));
    let (status, body) = c.post("/v1/responses", answer(&unknown, Some(&id))).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = c.post("/v1/responses", answer(&item_id, None)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "previous_response_id", "{body}");
    let (status, _) = c
        .get(&format!("/v1/responses/{id}{}", "0".repeat(32)))
        .await;
    assert_eq!(status, 404, "a response after a request the run never made");
}

/// Two calls of one model response that both need approval: the first response ends at the first request, the
/// response answering it ends at the second (the run asked for both at once), and the response answering that
/// one carries both calls (one allowed, one denied) and the answer; each names the one before it.
#[tokio::test]
async fn two_approvals_of_one_round_are_answered_one_response_after_the_other() {
    let server = Server::start_with(Options {
        extra: CAREFUL.into(),
        ..Default::default()
    })
    .await;
    let c = server.client();
    server.upstream.push(agentd_testkit::Reply::ToolCalls(vec![
        agentd_testkit::MockToolCall {
            id: "c1".into(),
            name: "calculator".into(),
            arguments: r#"{"expression": "1+1"}"#.into(),
        },
        agentd_testkit::MockToolCall {
            id: "c2".into(),
            name: "calculator".into(),
            arguments: r#"{"expression": "2+2"}"#.into(),
        },
    ]));
    server
        .upstream
        .push(agentd_testkit::Reply::text("both done"));
    let (status, r1) = c
        .post("/v1/responses", json!({"model": "careful", "input": "go"}))
        .await;
    assert_eq!(status, 200, "{r1}");
    let requests = |r: &Value| -> Vec<Value> {
        r["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "mcp_approval_request")
            .cloned()
            .collect()
    };
    let first = requests(&r1);
    assert_eq!(
        (r1["status"].as_str(), first.len()),
        (Some("completed"), 1),
        "{r1}"
    );
    let answer = |prev: &Value, request: &Value, approve: bool| {
        json!({"model": "careful", "previous_response_id": prev["id"], "input": [
            {"type": "mcp_approval_response", "approval_request_id": request["id"], "approve": approve, "reason": "no"}]})
    };
    let (status, r2) = c.post("/v1/responses", answer(&r1, &first[0], true)).await;
    assert_eq!(status, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], r1["id"]);
    assert_eq!(r2["status"], "completed");
    let second = requests(&r2);
    assert_eq!(second.len(), 1, "{r2}");
    assert_ne!(second[0]["id"], first[0]["id"]);
    assert_eq!(r2["output"].as_array().unwrap().len(), 1, "{r2}");
    let (status, r3) = c
        .post("/v1/responses", answer(&r2, &second[0], false))
        .await;
    assert_eq!(status, 200, "{r3}");
    assert_eq!(r3["previous_response_id"], r2["id"]);
    assert_eq!(r3["status"], "completed", "{r3}");
    let mut calls: Vec<(String, String, String)> = r3["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "mcp_call")
        .map(|i| {
            let approved_by = if i["approval_request_id"] == first[0]["id"] {
                "first"
            } else {
                "second"
            };
            (
                approved_by.to_string(),
                i["status"].as_str().unwrap().to_string(),
                i["arguments"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    calls.sort();
    assert_eq!(calls.len(), 2, "{r3}");
    assert_eq!(
        (calls[0].0.as_str(), calls[0].1.as_str()),
        ("first", "completed")
    );
    assert_eq!(
        (calls[1].0.as_str(), calls[1].1.as_str()),
        ("second", "failed")
    );
    assert_eq!(
        r3["output"].as_array().unwrap().last().unwrap()["content"][0]["text"],
        "both done"
    );
    // Each reads the same retrieved.
    for r in [&r1, &r2, &r3] {
        let (_, again) = c
            .get(&format!("/v1/responses/{}", r["id"].as_str().unwrap()))
            .await;
        assert_eq!(again, *r);
    }
}
