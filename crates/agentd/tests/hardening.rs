//! Bounds a security probe found missing (issue 13, item 9), through the real contract: session titles and
//! metadata, `ask_human` replies on every surface, `read_file` and symbolic links, bad `after=` values, uploads
//! to a closed session, and the `Bearer` scheme in any case.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use agentd_testkit::Reply;
use common::{Options, Server, Ws};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const AUTH: &str = r#"
[[auth.keys]]
principal = "alice"
key = "sk-alice"
"#;

/// `max_message_bytes` in the test config.
const MAX_MESSAGE: usize = 4096;

async fn session_count(c: &common::Client) -> usize {
    let (status, v) = c.get("/v1/sessions?limit=1000").await;
    assert_eq!(status, 200, "{v}");
    v.as_array().unwrap().len()
}

#[tokio::test]
async fn session_titles_and_metadata_are_bounded_and_nothing_is_stored_over_them() {
    let s = Server::start().await;
    let c = s.client();
    let create = |body: Value| {
        let c = c.clone();
        async move { c.post("/v1/sessions", body).await }
    };
    // At the bounds: accepted.
    let (status, v) = create(json!({"agent": "assistant", "title": "t".repeat(1024)})).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["title"].as_str().unwrap().len(), 1024);
    // {"x":"…"} is 8 bytes of JSON around the value.
    let (status, v) =
        create(json!({"agent": "assistant", "metadata": {"x": "m".repeat(16 * 1024 - 8)}})).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(session_count(&c).await, 2);

    // One byte over: 413 too_large, nothing stored.
    for body in [
        json!({"agent": "assistant", "title": "t".repeat(1025)}),
        json!({"agent": "assistant", "title": "é".repeat(513)}),
        json!({"agent": "assistant", "metadata": {"x": "m".repeat(16 * 1024 - 7)}}),
        json!({"agent": "assistant", "title": "t".repeat(3 * 1024 * 1024)}),
        json!({"agent": "assistant", "metadata": {"a": vec!["m"; 4000], "b": {"c": "m".repeat(1000)}}}),
    ] {
        let (status, v) = create(body).await;
        assert_eq!(status, 413, "{v}");
        assert_eq!(v["error"]["code"], "too_large", "{v}");
    }
    assert_eq!(session_count(&c).await, 2);

    // agentkit's create path takes metadata too, and is bounded the same.
    let (status, v) = c
        .post(
            "/chat/sessions",
            json!({"agent_name": "assistant", "metadata": {"x": "m".repeat(20 * 1024)}}),
        )
        .await;
    assert_eq!(status, 413, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("metadata"), "{v}");
    let (status, v) = c
        .post(
            "/chat/sessions",
            json!({"agent_name": "assistant", "metadata": {"x": "small"}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(session_count(&c).await, 3);
}

/// An agentkit socket on `id`, past its `connected` frame.
async fn kit_ws(s: &Server, id: &str) -> Ws {
    let url = format!("{}/chat/ws/{id}", s.url.replacen("http://", "ws://", 1));
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut ws = Ws::new(socket);
    assert_eq!(ws.next().await["type"], "connected");
    ws
}

#[tokio::test]
async fn ask_human_replies_over_the_message_limit_are_refused_on_every_surface() {
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
    let asked = ws
        .until(|f| f["type"] == "input_requested")
        .await
        .pop()
        .unwrap();
    let request_id = asked["request_id"].as_str().unwrap().to_string();
    let big = "x".repeat(MAX_MESSAGE + 1);

    // REST /input: 413, the question still waits.
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/runs/{run}/input"),
            json!({"request_id": request_id, "content": big}),
        )
        .await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "too_large", "{v}");
    // 30 MB, as the probe sent: the same.
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/runs/{run}/input"),
            json!({"request_id": request_id, "content": "y".repeat(30 * 1024 * 1024)}),
        )
        .await;
    assert_eq!(status, 413, "{v}");

    // The native WebSocket: an error frame, and the socket stays open.
    ws.send(json!({"type": "reply", "request_id": request_id, "content": big}))
        .await;
    let err = ws.until(|f| f["type"] == "error").await.pop().unwrap();
    assert_eq!(err["code"], "too_large", "{err}");
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.until(|f| f["type"] == "pong").await.len(), 1);

    // agentkit's WebSocket: its error frame.
    let mut kit = kit_ws(&s, &id).await;
    kit.send(json!({"type": "reply", "request_id": request_id, "content": big}))
        .await;
    let err = kit.until(|f| f["type"] == "error").await.pop().unwrap();
    assert!(
        err["data"]["message"].as_str().unwrap().contains("limit"),
        "{err}"
    );

    // Nothing was taken: the run still waits for this very question.
    let (_, r) = c.get(&format!("/v1/sessions/{id}/runs/{run}")).await;
    assert_eq!(r["status"], "waiting_input", "{r}");

    // A reply within the limit (exactly at it) is taken.
    let fitting = "z".repeat(MAX_MESSAGE);
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/runs/{run}/input"),
            json!({"request_id": request_id, "content": fitting}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(c.wait_run(&id, &run).await["status"], "completed");
    // The log holds one answer to the question: the fitting one.
    let frames = ws.until_finished().await;
    let received: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "input_received")
        .collect();
    assert_eq!(received.len(), 1, "{received:?}");
    let messages = c.messages(&id).await;
    let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["content"], fitting.as_str());
    for m in &messages {
        let content = m["content"].as_str().unwrap_or("");
        assert!(
            !content.contains(&big) && !content.contains("yyyy"),
            "an oversized reply was stored: {} bytes",
            content.len()
        );
    }
    // And the upstream saw only the fitting reply.
    let sent = s.upstream.last_request().unwrap().to_string();
    assert!(
        sent.contains(&fitting) && !sent.contains(&big),
        "upstream got the big reply"
    );
}

#[tokio::test]
async fn read_file_follows_no_symbolic_link_out_of_the_workspace() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let secret = s.dir.path().join("secret.txt");
    std::fs::write(&secret, "OUTSIDE-SECRET").unwrap();
    let workspace = s.dir.path().join("workspaces").join(&id);
    std::fs::create_dir_all(&workspace).unwrap();
    std::os::unix::fs::symlink(&secret, workspace.join("notes.txt")).unwrap();
    s.upstream.push(Reply::tool_call(
        "r1",
        "read_file",
        r#"{"path":"notes.txt"}"#,
    ));
    s.upstream.push(Reply::text("ok"));
    let (status, v) = c.send(&id, "read my notes").await;
    assert_eq!(status, 200, "{v}");
    let messages = c.messages(&id).await;
    let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
    let content = tool["content"].as_str().unwrap();
    assert!(content.contains("symbolic link"), "{content}");
    assert!(!content.contains("OUTSIDE-SECRET"), "{content}");
    for request in s.upstream.requests() {
        assert!(!request.to_string().contains("OUTSIDE-SECRET"));
    }
}

#[tokio::test]
async fn bad_after_values_answer_the_json_error_shape() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    for bad in ["abc", "-1", "1.5", "", "99999999999999999999999", "1%200"] {
        for path in ["events", "ws"] {
            let resp = c
                .http
                .get(format!("{}/v1/sessions/{id}/{path}?after={bad}", s.url))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{path}?after={bad}");
            assert!(
                resp.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("application/json"),
                "{path}?after={bad}"
            );
            let v: Value = resp.json().await.unwrap();
            assert_eq!(
                v["error"]["code"], "invalid_request",
                "{path}?after={bad}: {v}"
            );
            assert!(
                v["error"]["message"].as_str().unwrap().contains("after"),
                "{v}"
            );
        }
        // A real WebSocket handshake is refused the same way.
        match tokio_tungstenite::connect_async(c.ws_url(&id, &format!("after={bad}"))).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400, "after={bad}");
            }
            other => panic!("after={bad}: expected 400, got {other:?}"),
        }
    }
    // Good values still work.
    let resp = c
        .http
        .get(format!("{}/v1/sessions/{id}/events?after=0", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut ws = c.ws(&id, "after=0").await;
    assert_eq!(ws.next().await["type"], "hello");
}

#[tokio::test]
async fn an_upload_to_a_closed_session_is_409_and_stores_nothing() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let (status, v) = c.call("DELETE", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(status, 200, "{v}");
    let part = reqwest::multipart::Part::bytes(b"late".to_vec())
        .file_name("late.txt")
        .mime_str("text/plain")
        .unwrap();
    let resp = c
        .http
        .post(format!("{}/v1/sessions/{id}/files", s.url))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "session_closed", "{v}");
    let workspace = s.dir.path().join("workspaces").join(&id);
    let stored: Vec<_> = std::fs::read_dir(&workspace)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(stored.is_empty(), "stored: {stored:?}");
    // An open session still takes uploads.
    let id2 = c.session().await;
    let part = reqwest::multipart::Part::bytes(b"fine".to_vec()).file_name("fine.txt");
    let resp = c
        .http
        .post(format!("{}/v1/sessions/{id2}/files", s.url))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_on_every_surface() {
    let s = Server::start_with(Options {
        extra: AUTH.into(),
        ..Options::default()
    })
    .await;
    let id = s.client().session().await;
    let http = reqwest::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} sk-alice");
        for path in [
            "/v1/sessions".to_string(),
            format!("/v1/sessions/{id}"),
            "/chat/sessions".to_string(),
        ] {
            let resp = http
                .get(format!("{}{path}", s.url))
                .header("Authorization", &auth)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{auth}: {path}");
        }
        // SSE takes the header too.
        let resp = http
            .get(format!("{}/v1/sessions/{id}/events", s.url))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{auth}: events");
        // And the native WebSocket's handshake.
        let url = format!(
            "{}/v1/sessions/{id}/ws",
            s.url.replacen("http://", "ws://", 1)
        );
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Authorization", auth.parse().unwrap());
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("{auth}: {e}"));
        let mut ws = Ws::new(socket);
        assert_eq!(ws.next().await["type"], "hello");
    }
    // Another scheme, or the right scheme with a wrong key, is still refused.
    for auth in ["Basic sk-alice", "BEARER sk-bob", "sk-alice", "Bearer"] {
        let resp = http
            .get(format!("{}/v1/sessions", s.url))
            .header("Authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{auth}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthenticated");
    }
}
