//! Unit tests of the agent loop and run manager, driven through the service facade with the scripted provider
//! and the in-memory store. Integration tests over real HTTP/SQLite live in the server crate.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentd_core::config::{Config, Multitask};
use agentd_core::domain::{Role, RunErrorCode, RunStatus};
use agentd_core::event::{EventKind, LoggedEvent};
use agentd_core::memory::MemoryStore;
use agentd_core::provider::{ModelEvent, ModelMessage, Provider, ProviderError};
use agentd_core::scripted::{Scripted, ScriptedProvider};
use agentd_core::service::{Agentd, Principal, SendMessage, ServiceError};

const CONFIG: &str = r#"
[server]
workspace_dir = "WORKSPACE"
ask_human_timeout_s = 30

[providers.p]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"

[[agents]]
name = "assistant"
description = "main"
provider = "p"
model = "m"
system_prompt = "You are helpful."
tools = ["calculator", "ask_human", "current_time"]
max_iterations = 3
skills = ["math"]
subagents = ["researcher"]

[[agents]]
name = "researcher"
description = "Looks things up"
provider = "p"
model = "m2"
system_prompt = "You research."
tools = ["calculator"]

[[agents]]
name = "tiny"
provider = "p"
model = "m"
max_context_tokens = 100
compress_at = 0.5

[[skills]]
name = "math"
keywords = ["calculate"]
system_prompt = "You are a careful calculator."
tools = ["calculator"]
"#;

struct Harness {
    app: Arc<Agentd>,
    provider: Arc<ScriptedProvider>,
    _dir: tempfile::TempDir,
}

async fn harness(replies: Vec<Scripted>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = CONFIG.replace("WORKSPACE", &dir.path().display().to_string());
    let config = Arc::new(Config::parse(&text, "test").unwrap());
    let provider = Arc::new(ScriptedProvider::new(replies));
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    providers.insert("p".into(), provider.clone());
    let app = Agentd::start(config, Arc::new(MemoryStore::default()), providers)
        .await
        .unwrap();
    Harness {
        app,
        provider,
        _dir: dir,
    }
}

fn me() -> Principal {
    Principal::local()
}

fn msg(content: &str) -> SendMessage {
    SendMessage {
        content: content.into(),
        ..Default::default()
    }
}

/// All events of a session so far.
async fn events(app: &Agentd, session: &str) -> Vec<Arc<LoggedEvent>> {
    app.store.read_events(session, 0, 10_000).await.unwrap()
}

fn types(evs: &[Arc<LoggedEvent>]) -> Vec<&'static str> {
    evs.iter().map(|e| e.event.kind.type_name()).collect()
}

/// A new session of the agent with the 100-token window.
async fn tiny_session(h: &Harness) -> agentd_core::domain::Session {
    h.app
        .create_session(&me(), "tiny", None, None)
        .await
        .unwrap()
}

/// A "tiny" session whose second turn is compressed: a long first message, then "second question" (which
/// must complete). The replies script both turns' model calls, the summary call included.
async fn compress_on_second_turn(
    replies: Vec<Scripted>,
) -> (Harness, agentd_core::domain::Session) {
    let h = harness(replies).await;
    let s = tiny_session(&h).await;
    send_and_wait(&h, &s.id, &"word ".repeat(40)).await;
    let (run, _) = send_and_wait(&h, &s.id, "second question").await;
    assert_eq!(run.status, RunStatus::Completed);
    (h, s)
}

async fn send_and_wait(
    h: &Harness,
    session: &str,
    content: &str,
) -> (
    agentd_core::domain::Run,
    Option<agentd_core::domain::Message>,
) {
    let acc = h.app.send(&me(), session, msg(content)).await.unwrap();
    Agentd::wait(acc.done).await.unwrap()
}

#[tokio::test]
async fn text_reply_streams_and_is_stored() {
    let h = harness(vec![Scripted::text(&["Hel", "lo"])]).await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let (run, message) = send_and_wait(&h, &s.id, "hi").await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(message.unwrap().content, "Hello");
    let evs = events(&h.app, &s.id).await;
    assert_eq!(
        types(&evs),
        [
            "message",
            "run_started",
            "text_delta",
            "text_delta",
            "message",
            "run_finished"
        ]
    );
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    match &evs[5].event.kind {
        EventKind::RunFinished { run, content, .. } => {
            assert_eq!(content, "Hello");
            assert_eq!(run.usage.completion_tokens, 2);
        }
        other => panic!("{other:?}"),
    }
    let history = h.app.messages(&me(), &s.id, None, 0).await.unwrap();
    assert_eq!(
        history.iter().map(|m| m.role).collect::<Vec<_>>(),
        [Role::User, Role::Assistant]
    );
    // The model saw the system prompt and the user message.
    let req = &h.provider.requests()[0];
    assert_eq!(
        req.messages[0],
        ModelMessage::System {
            content: "You are helpful.".into()
        }
    );
    assert_eq!(req.model, "m");
}

#[tokio::test]
async fn tool_round_trip_feeds_result_back_with_call_id() {
    let h = harness(vec![
        Scripted::tool_calls(&[("call_1", "calculator", r#"{"expression":"6*7"}"#)]),
        Scripted::text(&["It is 42."]),
    ])
    .await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let (run, message) = send_and_wait(&h, &s.id, "what is 6*7").await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(message.unwrap().content, "It is 42.");
    let evs = events(&h.app, &s.id).await;
    let finished = evs
        .iter()
        .find_map(|e| match &e.event.kind {
            EventKind::ToolFinished {
                call_id,
                result,
                success,
                ..
            } => Some((call_id.clone(), result.clone(), *success)),
            _ => None,
        })
        .unwrap();
    assert_eq!(finished, ("call_1".into(), "42".into(), true));
    let second = &h.provider.requests()[1];
    assert!(second.messages.contains(&ModelMessage::Tool {
        tool_call_id: "call_1".into(),
        content: "42".into(),
        images: vec![],
    }));
    let history = h.app.messages(&me(), &s.id, None, 0).await.unwrap();
    assert_eq!(
        history.iter().map(|m| m.role).collect::<Vec<_>>(),
        [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
    assert_eq!(history[2].tool_call_id.as_deref(), Some("call_1"));
}

#[tokio::test]
async fn tools_of_one_response_run_concurrently() {
    // ask_human blocks until replied; the calculator must finish meanwhile.
    let h = harness(vec![
        Scripted::tool_calls(&[
            ("a", "ask_human", r#"{"question":"name?"}"#),
            ("b", "calculator", r#"{"expression":"1+1"}"#),
        ]),
        Scripted::text(&["done"]),
    ])
    .await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let acc = h.app.send(&me(), &s.id, msg("go")).await.unwrap();
    let mut sub = h
        .app
        .attach(&me(), &s.id, Some(0))
        .await
        .unwrap()
        .subscription;
    let mut calc_done = false;
    let request_id = loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match &ev.event.kind {
            EventKind::ToolFinished { tool, .. } if tool == "calculator" => calc_done = true,
            EventKind::InputRequested {
                request_id,
                question,
            } => {
                assert_eq!(question, "name?");
                if calc_done {
                    break request_id.clone();
                }
            }
            _ => {}
        }
        if calc_done {
            if let Some(r) = h.app.store.get_run(&s.id, &acc.run.id).await.unwrap() {
                if r.status == RunStatus::WaitingInput {
                    // The question may have been asked before the calculator finished; find it.
                    let evs = events(&h.app, &s.id).await;
                    if let Some(id) = evs.iter().find_map(|e| match &e.event.kind {
                        EventKind::InputRequested { request_id, .. } => Some(request_id.clone()),
                        _ => None,
                    }) {
                        break id;
                    }
                }
            }
        }
    };
    assert!(calc_done);
    assert!(matches!(
        h.app.reply(&me(), &s.id, "nope", "x".into()).await,
        Err(ServiceError::NotFound(_))
    ));
    h.app
        .reply(&me(), &s.id, &request_id, "Ada".into())
        .await
        .unwrap();
    // Exactly once: a second reply to the same request is unknown.
    assert!(h
        .app
        .reply(&me(), &s.id, &request_id, "again".into())
        .await
        .is_err());
    let (run, _) = Agentd::wait(acc.done).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    let second = &h.provider.requests()[1];
    assert!(second.messages.contains(&ModelMessage::Tool {
        tool_call_id: "a".into(),
        content: "Ada".into(),
        images: vec![],
    }));
    assert!(types(&events(&h.app, &s.id).await).contains(&"input_received"));
}

#[tokio::test]
async fn max_iterations_fails_the_run() {
    let calls = (0..5)
        .map(|i| Scripted::tool_calls(&[(&format!("c{i}"), "calculator", r#"{"expression":"1"}"#)]))
        .collect();
    let h = harness(calls).await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let (run, _) = send_and_wait(&h, &s.id, "loop").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error.unwrap().code, RunErrorCode::MaxIterations);
    assert_eq!(
        h.provider.requests().len(),
        4,
        "3 tool rounds, then the 4th call still asks for tools"
    );
}

#[tokio::test]
async fn cancel_mid_stream_keeps_partial_answer() {
    let chunks: Vec<String> = (0..100).map(|i| format!("t{i} ")).collect();
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let h = harness(vec![Scripted::slow_text(&refs, Duration::from_millis(20))]).await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let acc = h.app.send(&me(), &s.id, msg("talk")).await.unwrap();
    let mut sub = h
        .app
        .attach(&me(), &s.id, Some(0))
        .await
        .unwrap()
        .subscription;
    let mut deltas = 0;
    while deltas < 3 {
        let ev = sub.next().await.unwrap().unwrap();
        if matches!(ev.event.kind, EventKind::TextDelta { .. }) {
            deltas += 1;
        }
    }
    let started = std::time::Instant::now();
    let cancelled = h
        .app
        .cancel(&me(), &s.id, Some(&acc.run.id))
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    let history = h.app.messages(&me(), &s.id, None, 0).await.unwrap();
    let partial = &history.last().unwrap();
    assert_eq!(partial.role, Role::Assistant);
    assert!(
        partial.content.starts_with("t0 t1 t2 "),
        "{}",
        partial.content
    );
    assert!(partial.content.len() < chunks.concat().len());
}

#[tokio::test]
async fn upstream_error_fails_with_precise_error_and_keeps_history() {
    let h = harness(vec![Scripted::Fail(ProviderError::Status {
        status: 500,
        body: "boom".into(),
    })])
    .await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let (run, message) = send_and_wait(&h, &s.id, "hi").await;
    assert_eq!(run.status, RunStatus::Failed);
    let err = run.error.unwrap();
    assert_eq!(err.code, RunErrorCode::UpstreamError);
    assert!(err.message.contains("500"), "{}", err.message);
    assert!(message.is_none());
    assert_eq!(
        h.app.messages(&me(), &s.id, None, 0).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn think_tags_and_reasoning_become_thinking_events() {
    let h = harness(vec![Scripted::Events {
        events: vec![
            ModelEvent::Thinking("plan ".into()),
            ModelEvent::Text("<think>more</think>Answer".into()),
        ],
        delay: Duration::ZERO,
    }])
    .await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let (_, message) = send_and_wait(&h, &s.id, "hi").await;
    assert_eq!(message.unwrap().content, "Answer");
    let evs = events(&h.app, &s.id).await;
    let thinking: String = evs
        .iter()
        .filter_map(|e| match &e.event.kind {
            EventKind::ThinkingDelta { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(thinking, "plan more");
    let end = evs.iter().find_map(|e| match &e.event.kind {
        EventKind::ThinkingEnd { thinking, .. } => Some(thinking.clone()),
        _ => None,
    });
    assert_eq!(end.as_deref(), Some("plan more"));
}

#[tokio::test]
async fn compression_triggers_keeps_latest_user_message_and_survives_summary_failure() {
    let long = "word ".repeat(40);
    let (h, s) = compress_on_second_turn(vec![
        Scripted::text(&[&long]),
        Scripted::text(&["The user talked at length."]), // summary call of turn 2
        Scripted::text(&["ok"]),
        Scripted::Fail(ProviderError::Other("summary down".into())), // summary call of turn 3
        Scripted::text(&["ok again"]),
    ])
    .await;
    let reqs = h.provider.requests();
    let main = &reqs[2];
    assert!(
        matches!(&main.messages[0], ModelMessage::System { content } if content.contains("The user talked at length."))
    );
    assert_eq!(
        main.messages.last(),
        Some(&ModelMessage::User {
            content: "second question".into(),
            images: vec![]
        })
    );
    let evs = events(&h.app, &s.id).await;
    let compressed: Vec<(usize, usize, String)> = evs
        .iter()
        .filter_map(|e| match &e.event.kind {
            EventKind::ContextCompressed {
                messages_before,
                messages_after,
                method,
            } => Some((*messages_before, *messages_after, method.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(compressed, vec![(3, 1, "summary".to_string())]);
    // Turn 3: the summary call fails -> truncation, and the turn still completes.
    let (run, message) = send_and_wait(&h, &s.id, "third").await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(message.unwrap().content, "ok again");
    let last = h.provider.requests().last().unwrap().clone();
    assert_eq!(
        last.messages,
        vec![ModelMessage::User {
            content: "third".into(),
            images: vec![]
        }]
    );
    let methods: Vec<String> = events(&h.app, &s.id)
        .await
        .iter()
        .filter_map(|e| match &e.event.kind {
            EventKind::ContextCompressed { method, .. } => Some(method.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(methods, ["summary", "truncation"]);
    // Stored history is complete.
    assert_eq!(
        h.app.messages(&me(), &s.id, None, 0).await.unwrap().len(),
        6
    );
}

/// A history longer than one page of recent messages is read on until it is whole (here it all fits the
/// window), in run order.
#[tokio::test]
async fn a_long_history_that_fits_the_window_reaches_the_model_whole() {
    let turns = 90; // 180 messages: more than the first page of 64
    let replies = (0..turns).map(|_| Scripted::text(&["ok"])).collect();
    let h = harness(replies).await;
    let s = h
        .app
        .create_session(&me(), "researcher", None, None)
        .await
        .unwrap();
    for i in 0..turns {
        send_and_wait(&h, &s.id, &format!("q{i}")).await;
    }
    let last = h.provider.requests().last().unwrap().clone();
    let users: Vec<&str> = last
        .messages
        .iter()
        .filter_map(|m| match m {
            ModelMessage::User { content, .. } => Some(content.as_str()),
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (0..turns).map(|i| format!("q{i}")).collect();
    assert_eq!(users, expected);
    assert_eq!(last.messages.len(), 1 + 2 * turns - 1); // system, 90 questions, 89 answers
}

/// A summary is bounded like the transcript it summarises (half a window): an upstream that answers the
/// summary call at length does not grow every later prompt of the turn.
#[tokio::test]
async fn a_rambling_summary_is_cut_to_half_a_window() {
    let rambling = "blah ".repeat(400); // 2,000 characters; "tiny"'s half window is 64 tokens = 256
    let (h, _) = compress_on_second_turn(vec![
        Scripted::text(&["ok"]),
        Scripted::text(&[&rambling]),
        Scripted::text(&["ok"]),
    ])
    .await;
    let reqs = h.provider.requests();
    let ModelMessage::System { content } = &reqs[2].messages[0] else {
        panic!("no summary message: {:?}", reqs[2].messages);
    };
    let summary = content
        .strip_prefix("Summary of the earlier conversation:\n")
        .unwrap();
    assert!(summary.starts_with("blah blah"));
    assert!(summary.len() <= 256, "summary of {} bytes", summary.len());
}

/// A turn holds only the part of a long session's history its context window can use: the prompt it starts
/// from (what `context_compressed` counts as `messages_before`) stays the same size however many turns came
/// before, rather than growing with the session.
#[tokio::test]
async fn a_turn_loads_only_the_history_its_window_can_use() {
    let long = "word ".repeat(40); // ~54 estimated tokens; "tiny" has a 100-token window
    let turns = 12;
    let mut replies = vec![Scripted::text(&["ok"])];
    for _ in 1..turns {
        replies.push(Scripted::text(&["summary"]));
        replies.push(Scripted::text(&["ok"]));
    }
    let h = harness(replies).await;
    let s = tiny_session(&h).await;
    for i in 0..turns {
        let (run, _) = send_and_wait(&h, &s.id, &format!("{i} {long}")).await;
        assert_eq!(run.status, RunStatus::Completed);
    }
    let before: Vec<usize> = events(&h.app, &s.id)
        .await
        .iter()
        .filter_map(|e| match &e.event.kind {
            EventKind::ContextCompressed {
                messages_before, ..
            } => Some(*messages_before),
            _ => None,
        })
        .collect();
    assert_eq!(before.len(), turns - 1);
    // A window and a half (100 + 64 tokens) holds the latest user message, the answer and user message
    // before it, and one more answer at most; the cut is at a user message.
    assert!(
        before.iter().all(|&n| n <= 3),
        "prompt sizes before compression: {before:?}"
    );
    // The latest user message always reaches the model, and stored history is complete.
    let last = h.provider.requests().last().unwrap().clone();
    assert!(matches!(
        last.messages.last(),
        Some(ModelMessage::User { content, .. }) if content.starts_with(&format!("{} ", turns - 1))
    ));
    assert_eq!(
        h.app.messages(&me(), &s.id, None, 0).await.unwrap().len(),
        2 * turns
    );
}

#[tokio::test]
async fn subagent_events_are_marked_and_answer_returns_as_tool_result() {
    let h = harness(vec![
        Scripted::tool_calls(&[("s1", "researcher", r#"{"task":"find x"}"#)]),
        Scripted::text(&["x is 5"]),   // the subagent's own model call
        Scripted::text(&["Found: 5"]), // the parent's final answer
    ])
    .await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let (run, message) = send_and_wait(&h, &s.id, "research x").await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(message.unwrap().content, "Found: 5");
    let reqs = h.provider.requests();
    assert_eq!(reqs[1].model, "m2");
    assert_eq!(
        reqs[1].messages[0],
        ModelMessage::System {
            content: "You research.".into()
        }
    );
    assert!(reqs[0].tools.iter().any(|t| t.name == "researcher"));
    assert!(reqs[2].messages.contains(&ModelMessage::Tool {
        tool_call_id: "s1".into(),
        content: "x is 5".into(),
        images: vec![],
    }));
    let evs = events(&h.app, &s.id).await;
    let sub_delta = evs
        .iter()
        .find(|e| matches!(&e.event.kind, EventKind::TextDelta { delta } if delta == "x is 5"))
        .unwrap();
    assert!(sub_delta.event.is_subagent);
    assert_eq!(sub_delta.event.agent, "researcher");
    let own = evs
        .iter()
        .find(|e| matches!(&e.event.kind, EventKind::TextDelta { delta } if delta == "Found: 5"))
        .unwrap();
    assert!(!own.event.is_subagent);
    // The subagent's messages stay out of the session history.
    let roles: Vec<Role> = h
        .app
        .messages(&me(), &s.id, None, 0)
        .await
        .unwrap()
        .iter()
        .map(|m| m.role)
        .collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
}

#[tokio::test]
async fn skill_prefix_and_keywords_change_what_the_model_gets() {
    let h = harness(vec![Scripted::text(&["a"]), Scripted::text(&["b"])]).await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    send_and_wait(&h, &s.id, "@skill:math 2+2").await;
    send_and_wait(&h, &s.id, "please calculate this").await;
    let reqs = h.provider.requests();
    for r in &reqs {
        assert_eq!(
            r.messages[0],
            ModelMessage::System {
                content: "You are a careful calculator.".into()
            }
        );
        assert_eq!(
            r.tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["calculator"]
        );
    }
    let history = h.app.messages(&me(), &s.id, None, 0).await.unwrap();
    assert_eq!(history[0].content, "2+2");
    let matched: Vec<(String, String)> = events(&h.app, &s.id)
        .await
        .iter()
        .filter_map(|e| match &e.event.kind {
            EventKind::SkillMatched { skill, method, .. } => Some((skill.clone(), method.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        matched,
        [
            ("math".to_string(), "explicit".to_string()),
            ("math".to_string(), "keyword".to_string())
        ]
    );
}

#[tokio::test]
async fn multitask_reject_enqueue_interrupt() {
    let slow: Vec<String> = (0..50).map(|i| format!("{i} ")).collect();
    let slow: Vec<&str> = slow.iter().map(String::as_str).collect();
    let h = harness(vec![
        Scripted::slow_text(&slow, Duration::from_millis(20)),
        Scripted::text(&["second"]),
        Scripted::slow_text(&slow, Duration::from_millis(20)),
        Scripted::text(&["fourth"]),
    ])
    .await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let first = h.app.send(&me(), &s.id, msg("one")).await.unwrap();
    let rejected = h
        .app
        .send(
            &me(),
            &s.id,
            SendMessage {
                multitask: Some(Multitask::Reject),
                ..msg("x")
            },
        )
        .await;
    assert!(matches!(
        rejected,
        Err(ServiceError::Conflict {
            code: "run_active",
            ..
        })
    ));
    let queued = h
        .app
        .send(
            &me(),
            &s.id,
            SendMessage {
                multitask: Some(Multitask::Enqueue),
                ..msg("two")
            },
        )
        .await
        .unwrap();
    let (r1, _) = Agentd::wait(first.done).await.unwrap();
    let (r2, m2) = Agentd::wait(queued.done).await.unwrap();
    assert_eq!(
        (r1.status, r2.status),
        (RunStatus::Completed, RunStatus::Completed)
    );
    assert_eq!(m2.unwrap().content, "second");
    // The queued turn saw the first turn's answer before its own question.
    let second_req = &h.provider.requests()[1];
    let n = second_req.messages.len();
    assert!(matches!(
        &second_req.messages[n - 2],
        ModelMessage::Assistant { .. }
    ));
    // Each turn's history holds the user messages of its own and earlier runs only: "two", stored while the
    // first turn ran, is not in the first turn's prompt, and is placed after the first turn's answer.
    let users = |i: usize| -> Vec<String> {
        h.provider.requests()[i]
            .messages
            .iter()
            .filter_map(|m| match m {
                ModelMessage::User { content, .. } => Some(content.clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(users(0), ["one"]);
    assert_eq!(users(1), ["one", "two"]);
    let third = h.app.send(&me(), &s.id, msg("three")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let fourth = h
        .app
        .send(
            &me(),
            &s.id,
            SendMessage {
                multitask: Some(Multitask::Interrupt),
                ..msg("four")
            },
        )
        .await
        .unwrap();
    let (r3, _) = Agentd::wait(third.done).await.unwrap();
    let (r4, _) = Agentd::wait(fourth.done).await.unwrap();
    assert_eq!(
        (r3.status, r4.status),
        (RunStatus::Cancelled, RunStatus::Completed)
    );
}

#[tokio::test]
async fn client_message_id_is_idempotent() {
    let h = harness(vec![Scripted::text(&["once"])]).await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    let send = || SendMessage {
        client_message_id: Some("abc".into()),
        ..msg("hi")
    };
    let a = h.app.send(&me(), &s.id, send()).await.unwrap();
    Agentd::wait(a.done).await.unwrap();
    let b = h.app.send(&me(), &s.id, send()).await.unwrap();
    assert!(b.repeated);
    assert_eq!(a.run.id, b.run.id);
    let (run, m) = Agentd::wait(b.done).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(m.unwrap().content, "once");
    assert_eq!(
        h.app.messages(&me(), &s.id, None, 0).await.unwrap().len(),
        2
    );
    assert_eq!(h.provider.requests().len(), 1);
}

#[tokio::test]
async fn other_principals_sessions_are_not_found() {
    let h = harness(vec![]).await;
    let alice = Principal {
        name: "alice".into(),
        admin: false,
    };
    let bob = Principal {
        name: "bob".into(),
        admin: false,
    };
    let admin = Principal {
        name: "root".into(),
        admin: true,
    };
    let s = h
        .app
        .create_session(&alice, "assistant", None, None)
        .await
        .unwrap();
    assert!(matches!(
        h.app.session(&bob, &s.id).await,
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(
        h.app.send(&bob, &s.id, msg("x")).await,
        Err(ServiceError::NotFound(_))
    ));
    assert!(h
        .app
        .list_sessions(&bob, 10, None)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        h.app.list_sessions(&admin, 10, None).await.unwrap().len(),
        1
    );
    assert!(h.app.session(&admin, &s.id).await.is_ok());
}

/// An event of run `r` in session `s` at `seq`, from its JSON without the envelope.
fn logged_at(seq: u64, body: &str) -> Arc<LoggedEvent> {
    let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["seq"] = seq.into();
    v["run_id"] = "r".into();
    v["agent"] = "assistant".into();
    if v.get("is_subagent").is_none() {
        v["is_subagent"] = false.into();
    }
    Arc::new(LoggedEvent::from_json("s".into(), v.to_string()).unwrap())
}

/// Where a run left unfinished goes on from, read off its log: the interrupted model call's deltas are
/// superseded from the event after the last stored message (or start, or resumption); the text before stays
/// the turn's; calls of the last assistant message without a stored result are pending, keeping a result the
/// log has; an unanswered question stays open; the attempt counts earlier resumptions.
#[test]
fn a_resume_plan_is_read_off_the_runs_log() {
    let events: Vec<Arc<LoggedEvent>> = [
        r#"{"type":"message","message":{"id":"u","session_id":"s","run_id":"r","role":"user","content":"hi","agent":"assistant","created_at":"t"}}"#,
        r#"{"type":"run_started","run":{"id":"r","session_id":"s","status":"running","created_at":"t","usage":{"prompt_tokens":0,"completion_tokens":0}}}"#,
        r#"{"type":"skill_matched","skill":"math","method":"keyword","confidence":0.5}"#,
        r#"{"type":"text_delta","delta":"Let me "}"#,
        r#"{"type":"text_delta","delta":"check."}"#,
        r#"{"type":"message","message":{"id":"a1","session_id":"s","run_id":"r","role":"assistant","content":"Let me check.","tool_calls":[{"id":"c1","name":"calculator","arguments":"{}"},{"id":"c2","name":"researcher","arguments":"{}"},{"id":"c3","name":"ask_human","arguments":"{}"}],"agent":"assistant","created_at":"t"}}"#,
        r#"{"type":"tool_started","call_id":"c1","tool":"calculator","args":{},"step":1}"#,
        r#"{"type":"tool_finished","call_id":"c1","tool":"calculator","args":{},"result":"42","success":true,"step":1}"#,
        r#"{"type":"input_requested","request_id":"q1","question":"?"}"#,
        r#"{"type":"text_delta","delta":"sub text","is_subagent":true}"#,
    ]
    .iter()
    .enumerate()
    .map(|(i, body)| logged_at(i as u64 + 1, body))
    .collect();
    let plan = agentd_core::runs::ResumePlan::from_log("r", &events);
    assert_eq!(plan.attempt, 1);
    assert_eq!(
        plan.discard_from_seq, 7,
        "after the assistant message (seq 6)"
    );
    assert_eq!(plan.skill.as_deref(), Some("math"));
    assert_eq!(plan.open_question.as_deref(), Some("q1"));
    assert_eq!(plan.resumed.content, "Let me check.");
    assert_eq!(plan.resumed.steps, 1);
    assert_eq!(plan.resumed.rounds, 1);
    let pending: Vec<&str> = plan
        .resumed
        .pending_calls
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(pending, ["c1", "c2", "c3"]);
    assert_eq!(plan.resumed.logged_results.len(), 1);
    assert_eq!(plan.resumed.logged_results["c1"].content, "42");

    // A resumption later, with deltas of a new model call and the question answered: attempt 2, the deltas
    // after the resumption are the ones superseded, and the open question is gone.
    let mut more = events.clone();
    for (i, body) in [
        r#"{"type":"run_resumed","run":{"id":"r","session_id":"s","status":"running","created_at":"t","usage":{"prompt_tokens":0,"completion_tokens":0}},"node":"n:1","attempt":1,"discard_from_seq":7}"#,
        r#"{"type":"input_received","request_id":"q1"}"#,
        r#"{"type":"message","message":{"id":"t1","session_id":"s","run_id":"r","role":"tool","content":"42","tool_call_id":"c1","agent":"assistant","created_at":"t"}}"#,
        r#"{"type":"text_delta","delta":"partial"}"#,
    ]
    .iter()
    .enumerate()
    {
        more.push(logged_at(events.len() as u64 + i as u64 + 1, body));
    }
    let plan = agentd_core::runs::ResumePlan::from_log("r", &more);
    assert_eq!(plan.attempt, 2);
    assert_eq!(
        plan.discard_from_seq, 14,
        "after the stored tool result (seq 13)"
    );
    assert_eq!(plan.open_question, None);
    assert_eq!(plan.resumed.content, "Let me check.");
    let pending: Vec<&str> = plan
        .resumed
        .pending_calls
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(pending, ["c2", "c3"]);
}
