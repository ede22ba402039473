//! One session driven through all three surfaces in turn (SPEC.md section 5: "a session made with one can be
//! used with the others"): created with agentkit REST, then turns sent through native REST, the navi
//! WebSocket, the agentkit WebSocket and agentkit REST. Every surface reads back one history, and a navi
//! client watching all along sees every turn, whoever sent it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use common::{Server, Ws};
use serde_json::{json, Value};

async fn connect(url: String) -> Ws {
    let (socket, _) = tokio_tungstenite::connect_async(&url)
        .await
        .unwrap_or_else(|e| panic!("ws connect {url}: {e}"));
    Ws::new(socket)
}

fn ends_navi_stream(f: &Value) -> bool {
    matches!(f["type"].as_str(), Some("stream_end" | "error"))
}

#[tokio::test]
async fn one_session_through_every_surface_has_one_history() {
    let s = Server::start().await;
    let c = s.client();
    let ws_base = s.url.replacen("http://", "ws://", 1);

    // Created through agentkit REST.
    let (status, created) = c
        .post("/chat/sessions", json!({"agent_name": "assistant"}))
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["session_id"].as_str().unwrap().to_string();
    let (status, native) = c.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, 200, "the native API knows the session: {native}");
    assert_eq!(native["agent"], "assistant");

    // A navi client watches the session from the start.
    let mut watcher = connect(format!("{ws_base}/ws/sessions/{id}")).await;

    // Turn 1: native REST.
    let (status, v) = c.send(&id, "one tokens=2").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["message"]["content"], "tok0 tok1");

    // Turn 2: navi WebSocket.
    let mut navi = connect(format!("{ws_base}/ws/sessions/{id}")).await;
    navi.send(json!({"type": "message", "content": "two tokens=3"}))
        .await;
    let frames = navi.until(ends_navi_stream).await;
    assert_eq!(
        frames.last().unwrap()["content"],
        "tok0 tok1 tok2",
        "{frames:?}"
    );

    // Turn 3: agentkit WebSocket.
    let mut kit = connect(format!("{ws_base}/chat/ws/{id}")).await;
    assert_eq!(kit.next().await["type"], "connected");
    kit.send(json!({"type": "message", "content": "three tokens=4"}))
        .await;
    let frames = kit.until(|f| f["type"] == "final_answer").await;
    assert_eq!(frames.last().unwrap()["content"], "tok0 tok1 tok2 tok3");

    // Turn 4: agentkit REST.
    let (status, v) = c
        .post(
            &format!("/chat/sessions/{id}/messages"),
            json!({"content": "four tokens=1"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"], "tok0");

    // The watcher saw all four turns, in order, whoever sent them.
    let mut answers = Vec::new();
    for _ in 0..4 {
        let frames = watcher.until(ends_navi_stream).await;
        assert_eq!(frames[0]["type"], "stream_start");
        answers.push(
            frames.last().unwrap()["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        answers,
        ["tok0 tok1", "tok0 tok1 tok2", "tok0 tok1 tok2 tok3", "tok0"]
    );
    // The agentkit socket saw the REST turn sent after its own; the navi socket saw both later turns.
    let frames = kit.until(|f| f["type"] == "final_answer").await;
    assert_eq!(frames.last().unwrap()["content"], "tok0");
    for expected in ["tok0 tok1 tok2 tok3", "tok0"] {
        let frames = navi.until(ends_navi_stream).await;
        assert_eq!(frames.last().unwrap()["content"], expected);
    }

    // One history, read through the native API and through agentkit.
    let native = c.messages(&id).await;
    let (status, kit_history) = c.get(&format!("/chat/sessions/{id}/messages")).await;
    assert_eq!(status, 200);
    let kit_history = kit_history.as_array().unwrap().clone();
    let expected = [
        ("user", "one tokens=2"),
        ("assistant", "tok0 tok1"),
        ("user", "two tokens=3"),
        ("assistant", "tok0 tok1 tok2"),
        ("user", "three tokens=4"),
        ("assistant", "tok0 tok1 tok2 tok3"),
        ("user", "four tokens=1"),
        ("assistant", "tok0"),
    ];
    let as_pairs = |list: &[Value], id_key: &str| -> Vec<(String, String, String)> {
        list.iter()
            .map(|m| {
                (
                    m[id_key].as_str().unwrap().to_string(),
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let native_pairs = as_pairs(&native, "id");
    assert_eq!(
        native_pairs,
        as_pairs(&kit_history, "message_id"),
        "same messages, same ids, same order"
    );
    let roles_contents: Vec<(&str, &str)> = native_pairs
        .iter()
        .map(|(_, r, c)| (r.as_str(), c.as_str()))
        .collect();
    assert_eq!(roles_contents, expected);
    // The native event log holds the same messages, in the same order.
    let mut log = c.ws(&id, "after=0").await;
    let hello = log.next().await;
    let mut logged = Vec::new();
    for _ in 0..hello["last_seq"].as_u64().unwrap() {
        let ev = log.next().await;
        if ev["type"] == "message" {
            logged.push(ev["message"]["id"].as_str().unwrap().to_string());
        }
    }
    let ids: Vec<String> = native_pairs.into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(logged, ids);

    // Closed through the native API: agentkit sees it closed, its socket refuses, history stays.
    let (status, _) = c.call("DELETE", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(status, 200);
    let (_, v) = c.get(&format!("/chat/sessions/{id}")).await;
    assert_eq!(v["status"], "closed");
    let mut refused = connect(format!("{ws_base}/chat/ws/{id}")).await;
    assert_eq!(
        refused.next().await,
        json!({"type": "error", "data": {"message": "Session is closed"}})
    );
    navi.send(json!({"type": "message", "content": "five"}))
        .await;
    let err = navi.next().await;
    assert_eq!(err["type"], "error");
    assert!(err["message"].as_str().unwrap().contains("closed"), "{err}");
    let (_, after) = c.get(&format!("/chat/sessions/{id}/messages")).await;
    assert_eq!(after.as_array().unwrap().len(), 8);
}
