//! The openai provider against the testkit's mock upstream, over real HTTP on loopback sockets.

use std::time::{Duration, Instant};

use agentd_core::domain::{ToolCall, Usage};
use agentd_core::provider::{
    ModelEvent, ModelMessage, ModelRequest, Provider, ProviderError, ToolSpec,
};
use agentd_openai::{OpenAiProvider, OpenAiSettings};
use agentd_testkit::{error_body, MockOptions, MockToolCall, MockUpstream, ReasoningField, Reply};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn provider_for(base_url: &str, timeout_s: u64, api_key: Option<&str>) -> OpenAiProvider {
    let settings = OpenAiSettings {
        base_url: base_url.to_owned(),
        api_key: api_key.map(str::to_owned),
        timeout_s,
        context_tokens: None,
    };
    OpenAiProvider::new(settings).expect("valid settings")
}

fn provider(mock: &MockUpstream) -> OpenAiProvider {
    provider_for(&mock.base_url(), 10, None)
}

fn ask(text: &str) -> ModelRequest {
    ModelRequest {
        model: "gpt-test".into(),
        messages: vec![
            ModelMessage::System {
                content: "You are terse.".into(),
            },
            ModelMessage::User {
                content: text.into(),
                images: vec![],
            },
        ],
        tools: vec![],
    }
}

/// Everything one call yielded: the events, and the error that ended it, if any.
async fn run(
    provider: &OpenAiProvider,
    request: ModelRequest,
) -> (Vec<ModelEvent>, Option<ProviderError>) {
    let mut stream = match provider.stream(request).await {
        Ok(stream) => stream,
        Err(e) => return (vec![], Some(e)),
    };
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(e) => {
                assert!(stream.next().await.is_none(), "nothing may follow an error");
                return (events, Some(e));
            }
        }
    }
    (events, None)
}

fn texts(events: &[ModelEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| {
            if let ModelEvent::Text(t) = e {
                Some(t.as_str())
            } else {
                None
            }
        })
        .collect()
}

fn thinking(events: &[ModelEvent]) -> String {
    events
        .iter()
        .filter_map(|e| {
            if let ModelEvent::Thinking(t) = e {
                Some(t.as_str())
            } else {
                None
            }
        })
        .collect()
}

#[tokio::test]
async fn text_streams_token_by_token_and_usage_comes_last() {
    let mock = MockUpstream::start().await;
    // 150 ms apart, each token is a read of its own and so an event of its own.
    let (events, error) = run(&provider(&mock), ask("tokens=5 delay_ms=150")).await;
    assert_eq!(error, None);
    assert_eq!(
        texts(&events),
        vec!["tok0", " tok1", " tok2", " tok3", " tok4"]
    );
    let Some(ModelEvent::Usage(usage)) = events.last() else {
        panic!("usage last: {events:?}")
    };
    assert_eq!(usage.completion_tokens, 5);
    assert!(usage.prompt_tokens > 0);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, ModelEvent::Usage(_)))
            .count(),
        1
    );
}

#[tokio::test]
async fn reasoning_arrives_as_thinking_under_either_field_name() {
    let mock = MockUpstream::start().await;
    for field in [ReasoningField::ReasoningContent, ReasoningField::Reasoning] {
        mock.push(Reply::Thinking {
            reasoning: vec!["step one,".into(), " step two".into()],
            field,
            text: vec!["answer".into()],
            delay_ms: 0,
        });
        let (events, error) = run(&provider(&mock), ask("hi")).await;
        assert_eq!(error, None);
        assert_eq!(thinking(&events), "step one, step two", "{field:?}");
        assert_eq!(texts(&events).concat(), "answer");
        let first_text = events.iter().position(|e| matches!(e, ModelEvent::Text(_)));
        let last_thinking = events
            .iter()
            .rposition(|e| matches!(e, ModelEvent::Thinking(_)));
        assert!(last_thinking < first_text);
    }
}

#[tokio::test]
async fn think_tags_in_content_pass_through_as_text() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::ThinkTagged {
        thinking: "hmm".into(),
        answer: "42".into(),
    });
    let (events, error) = run(&provider(&mock), ask("hi")).await;
    assert_eq!(error, None);
    assert_eq!(texts(&events).concat(), "<think>hmm</think>42");
}

#[tokio::test]
async fn tool_call_fragments_are_assembled_exactly() {
    let mock = MockUpstream::start().await;
    let calls = vec![
        MockToolCall {
            id: "call_abc".into(),
            name: "calculator".into(),
            arguments: r#"{"expression":"(1 + 2) * 3"}"#.into(),
        },
        MockToolCall {
            id: "call_def".into(),
            name: "search".into(),
            arguments: r#"{"query":"naïve \"quoted\" text","limit":3}"#.into(),
        },
    ];
    mock.push(Reply::ToolCalls(calls.clone()));
    let (events, error) = run(&provider(&mock), ask("do things")).await;
    assert_eq!(error, None);
    let got: Vec<&ToolCall> = events
        .iter()
        .filter_map(|e| {
            if let ModelEvent::ToolCall(c) = e {
                Some(c)
            } else {
                None
            }
        })
        .collect();
    let want: Vec<ToolCall> = calls
        .into_iter()
        .map(|c| ToolCall {
            id: c.id,
            name: c.name,
            arguments: c.arguments,
        })
        .collect();
    assert_eq!(got, want.iter().collect::<Vec<_>>());
    assert!(texts(&events).is_empty());
    assert!(matches!(
        events.last(),
        Some(ModelEvent::Usage(Usage { .. }))
    ));
}

#[tokio::test]
async fn calc_directive_round_trip_sends_the_tool_result_back() {
    let mock = MockUpstream::start().await;
    let provider = provider(&mock);
    let (events, error) = run(&provider, ask("calc: 6*7")).await;
    assert_eq!(error, None);
    let call = events
        .iter()
        .find_map(|e| {
            if let ModelEvent::ToolCall(c) = e {
                Some(c.clone())
            } else {
                None
            }
        })
        .expect("a tool call");
    assert_eq!(call.name, "calculator");
    assert_eq!(
        serde_json::from_str::<Value>(&call.arguments).ok(),
        Some(json!({"expression": "6*7"}))
    );

    let mut request = ask("calc: 6*7");
    request.messages.push(ModelMessage::Assistant {
        content: String::new(),
        tool_calls: vec![call.clone()],
    });
    request.messages.push(ModelMessage::Tool {
        tool_call_id: call.id.clone(),
        content: "42".into(),
        images: vec![],
    });
    let (events, error) = run(&provider, request).await;
    assert_eq!(error, None);
    assert_eq!(texts(&events).concat(), "The result is 42.");
}

#[tokio::test]
async fn the_upstream_sees_the_request_spec_describes() {
    let mock = MockUpstream::start().await;
    let call = ToolCall {
        id: "call_1".into(),
        name: "calculator".into(),
        arguments: r#"{"expression":"1+1"}"#.into(),
    };
    let parameters = json!({"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]});
    let request = ModelRequest {
        model: "gpt-4o-mini".into(),
        messages: vec![
            ModelMessage::System {
                content: "sys".into(),
            },
            ModelMessage::User {
                content: "what is this?".into(),
                images: vec!["data:image/png;base64,iVBORw0KGgo=".into()],
            },
            ModelMessage::Assistant {
                content: String::new(),
                tool_calls: vec![call],
            },
            ModelMessage::Tool {
                tool_call_id: "call_1".into(),
                content: "2".into(),
                images: vec![],
            },
        ],
        tools: vec![ToolSpec {
            name: "calculator".into(),
            description: "Arithmetic".into(),
            parameters: parameters.clone(),
        }],
    };
    let (_, error) = run(
        &provider_for(&mock.base_url(), 10, Some("sk-test-key")),
        request,
    )
    .await;
    assert_eq!(error, None);

    let seen = mock.last_request().expect("a request");
    assert_eq!(seen["model"], "gpt-4o-mini");
    assert_eq!(seen["stream"], true);
    assert_eq!(seen["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        seen["tools"],
        json!([{"type": "function", "function": {"name": "calculator", "description": "Arithmetic", "parameters": parameters}}])
    );
    assert_eq!(
        seen["messages"],
        json!([
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\":\"1+1\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        ])
    );
    assert_eq!(
        mock.authorizations(),
        vec![Some("Bearer sk-test-key".to_owned())]
    );

    // No tools, no key: neither `tools` nor `Authorization` is sent.
    run(&provider(&mock), ask("hi")).await;
    let seen = mock.last_request().expect("a request");
    assert!(seen.get("tools").is_none(), "{seen}");
    assert_eq!(mock.authorizations().last(), Some(&None));
}

#[tokio::test]
async fn an_api_key_the_upstream_rejects_is_a_401() {
    let options = MockOptions {
        require_api_key: Some("sk-right".into()),
        ..MockOptions::default()
    };
    let mock = MockUpstream::start_with(options).await.expect("mock");
    let (_, error) = run(
        &provider_for(&mock.base_url(), 10, Some("sk-wrong")),
        ask("hi"),
    )
    .await;
    assert!(
        matches!(error, Some(ProviderError::Status { status: 401, .. })),
        "{error:?}"
    );
    let (events, error) = run(
        &provider_for(&mock.base_url(), 10, Some("sk-right")),
        ask("hi"),
    )
    .await;
    assert_eq!(
        (texts(&events).concat(), error),
        ("echo: hi".to_owned(), None)
    );
}

#[tokio::test]
async fn a_non_2xx_answer_is_a_status_error_with_a_truncated_body() {
    let mock = MockUpstream::start().await;
    let (_, error) = run(&provider(&mock), ask("status=500")).await;
    match error {
        Some(ProviderError::Status { status: 500, body }) => {
            assert!(body.contains("mock upstream failure"), "{body}")
        }
        other => panic!("expected Status 500, got {other:?}"),
    }

    mock.push(Reply::Status(502, "x".repeat(5000)));
    let (_, error) = run(&provider(&mock), ask("hi")).await;
    match error {
        Some(ProviderError::Status { status: 502, body }) => {
            assert!(body.chars().count() <= 501, "{}", body.len())
        }
        other => panic!("expected Status 502, got {other:?}"),
    }
}

#[tokio::test]
async fn a_context_length_error_is_a_context_overflow() {
    let mock = MockUpstream::start().await;
    let body = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
    mock.push(Reply::Status(400, body.into()));
    let (_, error) = run(&provider(&mock), ask("hi")).await;
    assert!(
        matches!(&error, Some(ProviderError::ContextOverflow(m)) if m.contains("8192")),
        "{error:?}"
    );
    // Other 400s stay plain status errors.
    mock.push(Reply::Status(400, error_body(400, "bad tool schema")));
    let (_, error) = run(&provider(&mock), ask("hi")).await;
    assert!(
        matches!(error, Some(ProviderError::Status { status: 400, .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let (_, error) = run(
        &provider_for(&format!("http://{addr}/v1"), 10, None),
        ask("hi"),
    )
    .await;
    assert!(
        // The message names the root cause, not just reqwest's "error sending request".
        matches!(&error, Some(ProviderError::Connect(m)) if m.to_lowercase().contains("refused")),
        "{error:?}"
    );
}

#[tokio::test]
async fn no_response_headers_within_the_timeout_is_a_timeout() {
    let mock = MockUpstream::start().await;
    let started = Instant::now();
    let (events, error) = run(&provider_for(&mock.base_url(), 1, None), ask("hang")).await;
    assert_eq!(error, Some(ProviderError::Timeout(1)));
    assert!(events.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
    // Giving up closed the connection, and the upstream saw it.
    assert!(mock.wait_streams_closed(1, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn silence_between_chunks_is_a_timeout_after_the_text_so_far() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::Stall {
        chunks: vec!["partial".into()],
    });
    let started = Instant::now();
    let (events, error) = run(&provider_for(&mock.base_url(), 1, None), ask("hi")).await;
    assert_eq!(texts(&events), vec!["partial"]);
    assert_eq!(error, Some(ProviderError::Timeout(1)));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_slow_stream_that_keeps_coming_is_not_a_timeout() {
    // 6 chunks 300 ms apart: 1.8 s in all, longer than the 1 s timeout, but no gap is.
    let mock = MockUpstream::start().await;
    let (events, error) = run(
        &provider_for(&mock.base_url(), 1, None),
        ask("tokens=6 delay_ms=300"),
    )
    .await;
    assert_eq!(error, None);
    assert_eq!(texts(&events).len(), 6);
}

#[tokio::test]
async fn a_garbage_data_line_is_malformed() {
    let mock = MockUpstream::start().await;
    let (events, error) = run(&provider(&mock), ask("malformed")).await;
    assert!(texts(&events).is_empty());
    assert!(
        matches!(&error, Some(ProviderError::Malformed(m)) if m.contains("not json")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_stream_cut_off_before_done_is_malformed() {
    let mock = MockUpstream::start().await;
    mock.push(Reply::Truncated {
        chunks: vec!["half".into(), " an answer".into()],
    });
    let (events, error) = run(&provider(&mock), ask("hi")).await;
    assert_eq!(texts(&events).concat(), "half an answer");
    assert!(
        matches!(error, Some(ProviderError::Malformed(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn raw_sse_with_crlf_comments_multiline_data_and_split_writes_is_understood() {
    let mock = MockUpstream::start().await;
    let pieces = [
        ": hello\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel",
        "lo\"}}]}\r",
        "\n\r\ndata: {\"choices\":[{\"index\":0,\r\ndata: \"delta\":{\"content\":\" wörld\"}}]}\n\n",
        "event: message\nid: 9\ndata: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    ];
    mock.push(Reply::Raw {
        pieces: pieces.iter().map(|p| (*p).to_owned()).collect(),
        gap_ms: 20,
    });
    let (events, error) = run(&provider(&mock), ask("hi")).await;
    assert_eq!(error, None);
    // " wörld" comes in the same write as the end of "Hello": one event or two, depending on the reads.
    assert_eq!(texts(&events).concat(), "Hello wörld");
}

/// One SSE `data:` line with a content delta.
fn content_line(text: &str) -> String {
    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
}

#[tokio::test]
async fn deltas_that_arrive_in_one_write_become_one_event_and_later_ones_do_not_wait() {
    let mock = MockUpstream::start().await;
    let together = ["a", "b", "c", "d"].map(content_line).concat();
    mock.push(Reply::Raw {
        pieces: vec![
            together,
            content_line("e"),
            format!(
                "{}data: [DONE]\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
            ),
        ],
        gap_ms: 300,
    });
    let (events, error) = run(&provider(&mock), ask("hi")).await;
    assert_eq!(error, None);
    // The first write's four deltas are one event; the next write's delta, 300 ms later, is another.
    assert_eq!(texts(&events), vec!["abcd", "e"]);
}

/// A raw HTTP/1.1 upstream on loopback: answers every request with an event stream whose pieces are `chunks`
/// (an HTTP chunk each, all in one write), closes each connection after `per_connection` answers, and counts
/// the connections it accepted.
async fn raw_upstream(
    per_connection: usize,
    chunks: Vec<String>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let chunks = chunks.clone();
            tokio::spawn(async move {
                for _ in 0..per_connection {
                    // Read one request: its head, then Content-Length bytes of body.
                    let mut raw = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let body_start = loop {
                        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&raw[..body_start]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while raw.len() < body_start + length {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let mut answer = String::from(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
                    );
                    for chunk in &chunks {
                        answer.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
                    }
                    answer.push_str("0\r\n\r\n");
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                // Dropping the connection closes it.
            });
        }
    });
    (format!("http://{addr}/v1"), accepted)
}

fn ok_answer() -> Vec<String> {
    vec![content_line("ok"), "data: [DONE]\n\n".to_owned()]
}

#[tokio::test]
async fn http_chunks_that_arrive_in_one_read_become_one_event() {
    // Four deltas in four HTTP chunks, written at once: the plain-HTTP client reads them together and the
    // stream makes one event of them (hyper would hand over one chunk, so one delta, per poll).
    let mut chunks: Vec<String> = ["a", "b", "c", "d"].map(content_line).to_vec();
    chunks.push("data: [DONE]\n\n".to_owned());
    let (url, _) = raw_upstream(usize::MAX, chunks).await;
    let (events, error) = run(&provider_for(&url, 10, None), ask("hi")).await;
    assert_eq!((texts(&events), error), (vec!["abcd"], None));
}

#[tokio::test]
async fn connections_are_kept_alive_and_one_the_upstream_closed_is_not_reused() {
    use std::sync::atomic::Ordering;
    // Kept alive: five calls in a row, one connection.
    let (url, accepted) = raw_upstream(usize::MAX, ok_answer()).await;
    let provider = provider_for(&url, 10, None);
    for _ in 0..5 {
        let (events, error) = run(&provider, ask("hi")).await;
        assert_eq!((texts(&events), error), (vec!["ok"], None));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // An upstream that closes every connection after one answer: each call still succeeds, on a new one.
    let (url, accepted) = raw_upstream(1, ok_answer()).await;
    let provider = provider_for(&url, 10, None);
    for _ in 0..3 {
        // Give the upstream's close time to arrive, so the idle connection is seen closed before reuse.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (events, error) = run(&provider, ask("hi")).await;
        assert_eq!((texts(&events), error), (vec!["ok"], None));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    // Right after the answer the close may not have arrived yet: then the request goes out on the dead
    // connection, finds it closed before any answer, and is sent once more on a new one.
    for _ in 0..3 {
        let (events, error) = run(&provider, ask("hi")).await;
        assert_eq!((texts(&events), error), (vec!["ok"], None));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_upstream_connection() {
    let mock = MockUpstream::start().await;
    let mut stream = provider(&mock)
        .stream(ask("tokens=100000 delay_ms=5"))
        .await
        .expect("stream");
    for _ in 0..3 {
        assert!(matches!(stream.next().await, Some(Ok(ModelEvent::Text(_)))));
    }
    assert_eq!(mock.open_streams(), 1);
    drop(stream);
    assert!(
        mock.wait_streams_closed(1, Duration::from_secs(10)).await,
        "the upstream stream stayed open"
    );
    assert_eq!(mock.open_streams(), 0);
}

#[tokio::test]
async fn concurrent_calls_share_one_provider() {
    let mock = MockUpstream::start().await;
    let provider = std::sync::Arc::new(provider(&mock));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move { run(&provider, ask("tokens=40")).await })
        })
        .collect();
    for task in tasks {
        let (events, error) = task.await.expect("task");
        assert_eq!(error, None);
        let expected: Vec<String> = (0..40)
            .map(|i| format!("{}tok{i}", if i == 0 { "" } else { " " }))
            .collect();
        assert_eq!(texts(&events).concat(), expected.concat());
    }
    assert_eq!(mock.request_count(), 50);
    assert_eq!(mock.open_streams(), 0);
}
