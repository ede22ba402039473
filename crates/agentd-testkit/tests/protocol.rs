//! Proves the mock speaks the OpenAI streaming protocol: real HTTP requests with reqwest, the SSE parsed by hand.

use std::time::Duration;

use agentd_testkit::{MockOptions, MockUpstream, ReasoningField, Reply, THINKING};
use serde_json::{json, Value};

/// What one streamed response came to.
#[derive(Debug, Default)]
struct Streamed {
    chunks: Vec<Value>,
    content: String,
    reasoning: String,
    done: bool,
}

impl Streamed {
    fn usage(&self) -> Option<&Value> {
        self.chunks
            .iter()
            .find(|c| c["usage"].is_object())
            .map(|c| &c["usage"])
    }
    fn finish_reason(&self) -> Option<&str> {
        self.chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str())
    }
}

fn request(user: &str, include_usage: bool) -> Value {
    json!({
        "model": "gpt-test",
        "stream": true,
        "stream_options": {"include_usage": include_usage},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": user}],
    })
}

async fn post(mock: &MockUpstream, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(body)
        .send()
        .await
        .expect("request reaches the mock")
}

/// Reads the whole SSE body and checks every event is a `data:` line with a chunk object or `[DONE]` (last).
async fn stream(mock: &MockUpstream, body: &Value) -> Streamed {
    let response = post(mock, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.expect("body");
    let mut out = Streamed::default();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        assert!(!out.done, "nothing may follow [DONE]: {event}");
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data line: {event:?}"));
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let chunk: Value =
            serde_json::from_str(data).unwrap_or_else(|e| panic!("bad chunk {data}: {e}"));
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-test");
        assert!(chunk["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")));
        let delta = &chunk["choices"][0]["delta"];
        out.content
            .push_str(delta["content"].as_str().unwrap_or(""));
        out.reasoning
            .push_str(delta["reasoning_content"].as_str().unwrap_or(""));
        out.reasoning
            .push_str(delta["reasoning"].as_str().unwrap_or(""));
        out.chunks.push(chunk);
    }
    out
}

#[tokio::test]
async fn tokens_stream_as_separate_deltas_with_usage_and_done() {
    let mock = MockUpstream::start().await;
    let s = stream(&mock, &request("tokens=5", true)).await;
    assert_eq!(s.content, "tok0 tok1 tok2 tok3 tok4");
    let content_chunks = s.chunks.iter().filter(|c| {
        c["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    });
    assert_eq!(content_chunks.count(), 5);
    assert_eq!(s.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(s.finish_reason(), Some("stop"));
    let usage_chunk = s.chunks.last().expect("chunks");
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = s.usage().expect("usage chunk");
    assert_eq!(usage["completion_tokens"], 5);
    assert!(usage["prompt_tokens"].as_u64().is_some_and(|p| p > 0));
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap_or(0) + 5
    );
    assert!(s.done);
}

#[tokio::test]
async fn usage_is_sent_only_when_asked_for() {
    let mock = MockUpstream::start().await;
    let s = stream(&mock, &request("hello world", false)).await;
    assert_eq!(s.content, "echo: hello world");
    assert!(s.usage().is_none());
    assert!(s.done);
}

#[tokio::test]
async fn requests_are_recorded_and_queued_replies_come_first_in_order() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::text("first"));
    mock.push(Reply::Thinking {
        reasoning: vec!["hmm".into(), " ok".into()],
        field: ReasoningField::Reasoning,
        text: vec!["second".into()],
        delay_ms: 0,
    });
    assert_eq!(stream(&mock, &request("a", true)).await.content, "first");
    let second = stream(&mock, &request("b", true)).await;
    assert_eq!(
        (second.reasoning.as_str(), second.content.as_str()),
        ("hmm ok", "second")
    );
    assert!(second
        .chunks
        .iter()
        .any(|c| c["choices"][0]["delta"]["reasoning"].is_string()));
    assert_eq!(stream(&mock, &request("c", true)).await.content, "echo: c");

    let seen = mock.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1]["messages"][1]["content"], "b");
    assert_eq!(
        mock.last_request()
            .map(|r| r["messages"][1]["content"].clone()),
        Some(json!("c"))
    );
    assert_eq!(mock.request_count(), 3);
}

#[tokio::test]
async fn think_directive_sends_reasoning_content_before_content() {
    let mock = MockUpstream::start().await;
    let s = stream(&mock, &request("think tokens=2", true)).await;
    assert_eq!(s.reasoning, THINKING.concat());
    assert_eq!(s.content, "tok0 tok1");
    let first_reasoning = s
        .chunks
        .iter()
        .position(|c| c["choices"][0]["delta"]["reasoning_content"].is_string());
    let first_content = s
        .chunks
        .iter()
        .position(|c| c["choices"][0]["delta"]["content"] == "tok0");
    assert!(first_reasoning < first_content);
}

#[tokio::test]
async fn calc_streams_a_fragmented_tool_call_then_answers_the_tool_result() {
    let mock = MockUpstream::start().await;
    let s = stream(&mock, &request("calc: 6*7", true)).await;
    assert_eq!(s.finish_reason(), Some("tool_calls"));
    let fragments: Vec<&Value> = s
        .chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert!(
        fragments.len() >= 3,
        "name and at least two argument fragments: {fragments:?}"
    );
    assert!(fragments.iter().all(|f| f["index"] == 0));
    let id = fragments[0]["id"]
        .as_str()
        .expect("id in the first fragment");
    assert_eq!(fragments[0]["function"]["name"], "calculator");
    let arguments: String = fragments
        .iter()
        .filter_map(|f| f["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).ok(),
        Some(json!({"expression": "6*7"}))
    );
    assert!(
        fragments[1..]
            .iter()
            .filter(|f| f["function"]["arguments"]
                .as_str()
                .is_some_and(|a| !a.is_empty()))
            .count()
            >= 2
    );

    let mut follow_up = request("calc: 6*7", true);
    if let Some(messages) = follow_up["messages"].as_array_mut() {
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": id, "type": "function", "function": {"name": "calculator", "arguments": arguments}}]}));
        messages.push(json!({"role": "tool", "tool_call_id": id, "content": "42"}));
    }
    let answer = stream(&mock, &follow_up).await;
    assert_eq!(answer.content, "The result is 42.");
    assert_eq!(answer.finish_reason(), Some("stop"));
}

#[tokio::test]
async fn status_directive_fails_with_a_json_error() {
    let mock = MockUpstream::start().await;
    let response = post(&mock, &request("status=503", true)).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.expect("json error body");
    assert_eq!(body["error"]["code"], 503);
    assert_eq!(mock.streams_opened(), 0);
}

#[tokio::test]
async fn malformed_sends_a_line_that_is_not_json() {
    let mock = MockUpstream::start().await;
    let text = post(&mock, &request("malformed", true))
        .await
        .text()
        .await
        .expect("body");
    let bad = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter(|d| serde_json::from_str::<Value>(d).is_err())
        .count();
    assert_eq!(bad, 1, "{text}");
}

#[tokio::test]
async fn hang_sends_no_headers_and_closing_the_client_is_seen() {
    let mock = MockUpstream::start().await;
    let body = request("hang", true);
    let send = post(&mock, &body);
    // A lower bound only: the mock must not answer at all.
    assert!(tokio::time::timeout(Duration::from_millis(300), send)
        .await
        .is_err());
    assert_eq!(mock.request_count(), 1);
    assert_eq!(mock.streams_opened(), 1);
    // The timeout dropped the request, closing the connection; the mock notices and drops the handler.
    assert!(mock.wait_streams_closed(1, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_closes_the_stream() {
    let mock = MockUpstream::start().await;
    let mut response = post(&mock, &request("tokens=10000 delay_ms=5", true)).await;
    let first = response
        .chunk()
        .await
        .expect("body")
        .expect("a first chunk");
    assert!(first.starts_with(b"data: "));
    assert_eq!(mock.open_streams(), 1);
    drop(response);
    assert!(mock.wait_streams_closed(1, Duration::from_secs(10)).await);
    assert_eq!(mock.open_streams(), 0);
}

#[tokio::test]
async fn api_key_is_checked_when_required_and_recorded() {
    let options = MockOptions {
        require_api_key: Some("sk-test".into()),
        ..MockOptions::default()
    };
    let mock = MockUpstream::start_with(options).await.expect("mock");
    assert_eq!(post(&mock, &request("hi", true)).await.status(), 401);
    let ok = reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.base_url()))
        .bearer_auth("sk-test")
        .json(&request("hi", true))
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
    assert_eq!(
        mock.authorizations(),
        vec![None, Some("Bearer sk-test".to_owned())]
    );
}

#[tokio::test]
async fn recording_is_bounded() {
    let mock = MockUpstream::start_with(MockOptions {
        max_recorded: 2,
        ..MockOptions::default()
    })
    .await
    .expect("mock");
    for text in ["a", "b", "c"] {
        stream(&mock, &request(text, false)).await;
    }
    let contents: Vec<Value> = mock
        .requests()
        .iter()
        .map(|r| r["messages"][1]["content"].clone())
        .collect();
    assert_eq!(contents, vec![json!("b"), json!("c")]);
    assert_eq!(mock.request_count(), 3);
}
