//! End-to-end tests of the `llama` provider against the real default model (SmolLM2-135M-Instruct Q4_1).
//!
//! The model file is fetched by `scripts/fetch-model.sh`. When it is absent the model tests print a skip line and
//! return, unless `AGENTD_REQUIRE_MODEL` is set (CI sets it after fetching), in which case absence is a failure.
//! The file-error tests need no model. Model calls are kept to a few dozen tokens so the suite stays fast on two
//! cores; timeouts are generous bounds against a hang, not speed assertions.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agentd_core::provider::{
    ModelEvent, ModelMessage, ModelRequest, Provider, ProviderError, ToolSpec,
};
use agentd_llama::{GenerateOptions, LlamaProvider, LlamaSettings, ToolChoice};
use futures_util::StreamExt;
use serde_json::json;

/// Against a hang only: each call here finishes in seconds.
const GENEROUS: Duration = Duration::from_secs(300);

fn default_model() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(agentd_llama::DEFAULT_MODEL_PATH);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("AGENTD_REQUIRE_MODEL").is_none(),
        "AGENTD_REQUIRE_MODEL is set but {} is absent; run {}",
        path.display(),
        agentd_llama::FETCH_MODEL_COMMAND
    );
    eprintln!(
        "SKIP: {} is absent; run {} to fetch it",
        path.display(),
        agentd_llama::FETCH_MODEL_COMMAND
    );
    None
}

fn load(context_tokens: u32) -> Option<LlamaProvider> {
    let model_path = default_model()?;
    match LlamaProvider::load(LlamaSettings {
        model_path,
        context_tokens,
        threads: 2,
        parallel: LlamaSettings::DEFAULT_PARALLEL,
    }) {
        Ok(p) => Some(p),
        Err(e) => panic!("loading the default model failed: {e}"),
    }
}

/// One provider shared by the tests that only need *a* model, as the server shares one per config entry.
fn shared() -> Option<LlamaProvider> {
    static SHARED: OnceLock<Option<LlamaProvider>> = OnceLock::new();
    SHARED.get_or_init(|| load(2048)).clone()
}

fn user(text: &str) -> ModelRequest {
    ModelRequest {
        model: "local".into(),
        messages: vec![ModelMessage::User {
            content: text.into(),
            images: vec![],
        }],
        tools: vec![],
    }
}

fn calculator() -> ToolSpec {
    ToolSpec {
        name: "calculator".into(),
        description: "Evaluates an arithmetic expression and returns the number.".into(),
        parameters: json!({
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 2 * (3 + 4)"}},
            "required": ["expression"]
        }),
    }
}

fn greedy(max_tokens: u32) -> GenerateOptions {
    GenerateOptions {
        max_tokens: Some(max_tokens),
        temperature: 0.0,
        ..GenerateOptions::default()
    }
}

/// Runs one call to the end and returns its events; an error item fails the test with its message.
async fn collect(
    provider: &LlamaProvider,
    request: ModelRequest,
    options: GenerateOptions,
) -> Vec<ModelEvent> {
    let run = async {
        let mut stream = provider
            .stream_with(request, options)
            .await
            .expect("the call starts");
        let mut events = Vec::new();
        while let Some(item) = stream.next().await {
            events.push(item.unwrap_or_else(|e| panic!("stream error: {e}")));
        }
        events
    };
    tokio::time::timeout(GENEROUS, run)
        .await
        .expect("the call finishes")
}

fn text_of(events: &[ModelEvent]) -> String {
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

fn usage_of(events: &[ModelEvent]) -> (u64, u64) {
    match events.last() {
        Some(ModelEvent::Usage(u)) => (u.prompt_tokens, u.completion_tokens),
        other => panic!("the last event should be usage, got {other:?}"),
    }
}

fn assert_one_line(message: &str) {
    assert!(
        !message.is_empty() && !message.contains('\n'),
        "expected one line, got {message:?}"
    );
}

/// Deterministic junk: a linear congruential generator, so the corrupt files need no randomness crate.
fn junk(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x2545_f491;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect()
}

fn settings(model_path: PathBuf) -> LlamaSettings {
    LlamaSettings {
        model_path,
        context_tokens: 512,
        threads: 2,
        parallel: LlamaSettings::DEFAULT_PARALLEL,
    }
}

#[test]
fn a_missing_model_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.gguf");
    let err = LlamaProvider::load(settings(path.clone())).unwrap_err();
    assert_one_line(&err);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn random_bytes_named_gguf_are_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.gguf");
    std::fs::write(&path, junk(4096)).unwrap();
    let err = LlamaProvider::load(settings(path.clone())).unwrap_err();
    assert_one_line(&err);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("not a GGUF file"), "{err}");

    std::fs::write(&path, b"GG").unwrap();
    let err = LlamaProvider::load(settings(path)).unwrap_err();
    assert_one_line(&err);
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn a_gguf_header_over_junk_is_rejected_by_llama_cpp_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk-body.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(junk(64 * 1024));
    std::fs::write(&path, bytes).unwrap();
    let err = LlamaProvider::load(settings(path.clone())).unwrap_err();
    assert_one_line(&err);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("failed to load"), "{err}");
}

#[test]
fn a_truncated_model_is_a_one_line_error() {
    let Some(model) = default_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(model).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = LlamaProvider::load(settings(path)).unwrap_err();
    assert_one_line(&err);
    assert!(err.contains("failed to load"), "{err}");
}

#[tokio::test]
async fn the_default_model_loads_and_reports_its_context() {
    let Some(provider) = shared() else { return };
    assert_eq!(provider.context_tokens(), Some(2048));
    assert!(provider
        .model_path()
        .ends_with(agentd_llama::DEFAULT_MODEL_PATH));
}

#[tokio::test]
async fn a_reply_streams_as_text_events_then_usage() {
    let Some(provider) = shared() else { return };
    let events = collect(
        &provider,
        user("Say hello in one short sentence."),
        greedy(24),
    )
    .await;
    let texts = events
        .iter()
        .filter(|e| matches!(e, ModelEvent::Text(t) if !t.is_empty()))
        .count();
    assert!(texts >= 1, "no text streamed: {events:?}");
    assert!(!text_of(&events).trim().is_empty());
    assert!(
        !events.iter().any(|e| matches!(e, ModelEvent::ToolCall(_))),
        "no tools, no tool calls: {events:?}"
    );
    let (prompt, completion) = usage_of(&events);
    assert!(
        prompt > 5,
        "the prompt includes the chat template: {prompt}"
    );
    assert!(
        (1..=24).contains(&completion),
        "completion tokens within the cap: {completion}"
    );
}

#[tokio::test]
async fn the_provider_trait_streams_with_default_options() {
    let Some(provider) = shared() else { return };
    let provider: std::sync::Arc<dyn Provider> = std::sync::Arc::new(provider);
    let mut stream = provider.stream(user("Name one colour.")).await.unwrap();
    // The first event is text (the model has no reason to stay silent); drop the rest, which also cancels it.
    let first = tokio::time::timeout(GENEROUS, stream.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(ModelEvent::Text(_)))), "{first:?}");
}

#[tokio::test]
async fn concurrent_calls_queue_and_all_complete() {
    let Some(provider) = shared() else { return };
    let calls = (0..3).map(|i| {
        let provider = provider.clone();
        tokio::spawn(async move {
            collect(&provider, user(&format!("Count to {}.", i + 2)), greedy(8)).await
        })
    });
    for call in calls {
        let events = call.await.unwrap();
        let (_, completion) = usage_of(&events);
        assert!((1..=8).contains(&completion));
    }
}

#[tokio::test]
async fn dropping_the_stream_stops_generation_and_frees_the_engine() {
    // Its own provider, so the token counter sees only this test's calls.
    let Some(provider) = load(1024) else { return };
    const ASKED: u32 = 900;
    let long = GenerateOptions {
        max_tokens: Some(ASKED),
        ignore_eos: true,
        ..greedy(ASKED)
    };
    let mut stream = provider
        .stream_with(user("Write a very long story about a lighthouse."), long)
        .await
        .unwrap();
    let mut seen = 0;
    while seen < 3 {
        match tokio::time::timeout(GENEROUS, stream.next()).await.unwrap() {
            Some(Ok(ModelEvent::Text(_))) => seen += 1,
            other => panic!("expected text, got {other:?}"),
        }
    }
    drop(stream);

    // The engine is free again: a second call runs to completion.
    let events = collect(&provider, user("Say yes."), greedy(6)).await;
    let (_, second) = usage_of(&events);
    let first = provider.tokens_generated() - second;
    // Tokens read, plus at most the event buffer and one in flight; without cancel it would be all 900.
    assert!(
        (3..64).contains(&first),
        "the cancelled call generated {first} of {ASKED} tokens"
    );
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_is_a_context_overflow() {
    let Some(provider) = load(64) else { return };
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let err = match provider.stream(user(&long)).await {
        Err(e) => e,
        Ok(_) => panic!("a 200-token prompt cannot fit a 64-token context"),
    };
    match err {
        ProviderError::ContextOverflow(message) => {
            assert!(message.contains("64"), "names the context size: {message}");
            assert_one_line(&message);
        }
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
    // A prompt that fits still works on the same provider.
    let events = collect(&provider, user("Hi"), greedy(4)).await;
    usage_of(&events);
}

fn tool_request(text: &str) -> ModelRequest {
    ModelRequest {
        tools: vec![calculator()],
        ..user(text)
    }
}

fn assert_calculator_call(call: &agentd_core::domain::ToolCall) {
    assert_eq!(call.name, "calculator");
    assert!(!call.id.is_empty());
    let arguments: serde_json::Value =
        serde_json::from_str(&call.arguments).expect("arguments are JSON");
    let expression = arguments.get("expression").and_then(|e| e.as_str());
    assert!(expression.is_some(), "a string `expression`: {arguments}");
    assert_eq!(
        arguments.as_object().map(|o| o.len()),
        Some(1),
        "only schema properties: {arguments}"
    );
}

#[tokio::test]
async fn a_required_tool_call_is_valid_json_matching_the_schema() {
    let Some(provider) = shared() else { return };
    let options = GenerateOptions {
        tool_choice: ToolChoice::Required,
        ..greedy(64)
    };
    let events = collect(
        &provider,
        tool_request("What is 17 * 23? Use the calculator."),
        options,
    )
    .await;
    let calls: Vec<_> = events
        .iter()
        .filter_map(|e| {
            if let ModelEvent::ToolCall(c) = e {
                Some(c)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(calls.len(), 1, "{events:?}");
    assert_calculator_call(calls[0]);
    assert_eq!(
        text_of(&events),
        "",
        "a tool call streams no text: {events:?}"
    );
    usage_of(&events);
}

#[tokio::test]
async fn with_tools_in_auto_mode_the_output_is_text_or_one_valid_tool_call() {
    let Some(provider) = shared() else { return };
    for prompt in [
        "Hello! Who are you?",
        "Compute 12 + 30 with the calculator tool.",
    ] {
        let events = collect(&provider, tool_request(prompt), greedy(48)).await;
        let calls: Vec<_> = events
            .iter()
            .filter_map(|e| {
                if let ModelEvent::ToolCall(c) = e {
                    Some(c)
                } else {
                    None
                }
            })
            .collect();
        match calls.as_slice() {
            [] => assert!(
                !text_of(&events).trim().is_empty(),
                "neither text nor a tool call: {events:?}"
            ),
            [call] => {
                assert_calculator_call(call);
                assert_eq!(
                    text_of(&events),
                    "",
                    "either text or a tool call, not both: {events:?}"
                );
            }
            _ => panic!("at most one tool call: {events:?}"),
        }
        usage_of(&events);
    }
}

#[tokio::test]
async fn required_tool_choice_without_tools_is_an_error() {
    let Some(provider) = shared() else { return };
    let options = GenerateOptions {
        tool_choice: ToolChoice::Required,
        ..greedy(4)
    };
    assert!(provider.stream_with(user("hi"), options).await.is_err());
}

const FRUITS: &str = "List three fruits.";

/// The next round of the conversation that asked [`FRUITS`] and got `first` as the answer.
fn follow_up(first: &[ModelEvent]) -> ModelRequest {
    ModelRequest {
        model: "local".into(),
        messages: vec![
            ModelMessage::User {
                content: FRUITS.into(),
                images: vec![],
            },
            ModelMessage::Assistant {
                content: text_of(first),
                tool_calls: vec![],
            },
            ModelMessage::User {
                content: "Now three vegetables.".into(),
                images: vec![],
            },
        ],
        tools: vec![],
    }
}

#[tokio::test]
async fn a_repeated_or_extended_prompt_reuses_the_cached_prefix() {
    // Its own provider, so no other test's call changes the cache between these.
    let Some(provider) = load(1024) else { return };
    let first = collect(&provider, user(FRUITS), greedy(12)).await;
    let (prompt_tokens, _) = usage_of(&first);
    assert_eq!(
        provider.prompt_tokens_decoded(),
        prompt_tokens,
        "a cold cache decodes the whole prompt"
    );

    // The same prompt again: only its last token is decoded (its logits start the reply), same greedy answer.
    let again = collect(&provider, user(FRUITS), greedy(12)).await;
    assert_eq!(provider.prompt_tokens_decoded(), prompt_tokens + 1);
    assert_eq!(text_of(&again), text_of(&first));

    // The next round of a conversation decodes only what is new since the shared prefix.
    let before = provider.prompt_tokens_decoded();
    let next = collect(&provider, follow_up(&first), greedy(8)).await;
    let (next_prompt, _) = usage_of(&next);
    let decoded = provider.prompt_tokens_decoded() - before;
    assert!(
        decoded >= 1 && decoded < next_prompt - prompt_tokens + 2,
        "decoded {decoded} of {next_prompt}"
    );
}

/// What one call of several at once saw: its events and when its first text and its end arrived.
struct Timed {
    events: Vec<ModelEvent>,
    first_text: std::time::Instant,
    ended: std::time::Instant,
}

/// Starts every call at once (each on its own task) and collects each to its end, with timestamps.
async fn all_at_once(
    provider: &LlamaProvider,
    calls: Vec<(ModelRequest, GenerateOptions)>,
) -> Vec<Timed> {
    streaming_at_once(provider, calls, Arc::default()).await
}

/// [`all_at_once`], counting in `started` the calls that have had their first output.
async fn streaming_at_once(
    provider: &LlamaProvider,
    calls: Vec<(ModelRequest, GenerateOptions)>,
    started: Arc<AtomicUsize>,
) -> Vec<Timed> {
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|(request, options)| {
            let provider = provider.clone();
            let started = Arc::clone(&started);
            tokio::spawn(async move {
                let mut stream = provider.stream_with(request, options).await.unwrap();
                let mut events = Vec::new();
                let mut first_text = None;
                while let Some(item) = tokio::time::timeout(GENEROUS, stream.next())
                    .await
                    .expect("the call goes on")
                {
                    let event = item.unwrap_or_else(|e| panic!("stream error: {e}"));
                    if matches!(event, ModelEvent::Text(_) | ModelEvent::ToolCall(_))
                        && first_text.is_none()
                    {
                        first_text = Some(std::time::Instant::now());
                        started.fetch_add(1, Ordering::SeqCst);
                    }
                    events.push(event);
                }
                Timed {
                    first_text: first_text.expect("the call produced output"),
                    ended: std::time::Instant::now(),
                    events,
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// A long generation of exactly `tokens` tokens.
fn long(tokens: u32) -> GenerateOptions {
    GenerateOptions {
        ignore_eos: true,
        ..greedy(tokens)
    }
}

const STORIES: [&str; 4] = [
    "Write a story about a lighthouse keeper.",
    "Write a story about a river and a mill.",
    "Write a poem about the autumn wind.",
    "Describe a busy market in the morning.",
];

#[tokio::test]
async fn four_calls_at_once_stream_together() {
    // Its own provider with four slots, so no other test's call takes one.
    let Some(provider) = load(1024) else { return };
    const TOKENS: u32 = 48;
    let calls = STORIES.iter().map(|s| (user(s), long(TOKENS))).collect();
    let done = all_at_once(&provider, calls).await;
    for call in &done {
        assert_eq!(usage_of(&call.events).1, u64::from(TOKENS));
    }
    assert_decoded_together(&done);
}

/// Every call's first output came before any call ended. One call at a time, the last call's first token would
/// come after the others had ended.
fn assert_decoded_together(done: &[Timed]) {
    let last_first = done.iter().map(|c| c.first_text).max().unwrap();
    let first_end = done.iter().map(|c| c.ended).min().unwrap();
    assert!(
        last_first < first_end,
        "the last first output came {:?} after the first call ended",
        last_first - first_end
    );
}

#[tokio::test]
async fn cancelling_one_of_several_calls_leaves_the_others_to_finish() {
    let Some(provider) = load(1024) else { return };
    const TOKENS: u32 = 24;
    // What the three complete calls answer alone, greedily.
    let mut alone = Vec::new();
    for story in &STORIES[1..] {
        alone.push(text_of(
            &collect(&provider, user(story), long(TOKENS)).await,
        ));
    }
    let generated_before = provider.tokens_generated();

    // A fourth, long call starts first; the three start beside it, and once all three stream it is dropped.
    let mut cancelled = provider
        .stream_with(user(STORIES[0]), long(900))
        .await
        .unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let others = {
        let provider = provider.clone();
        let started = Arc::clone(&started);
        tokio::spawn(async move {
            let calls = STORIES[1..]
                .iter()
                .map(|s| (user(s), long(TOKENS)))
                .collect();
            streaming_at_once(&provider, calls, started).await
        })
    };
    // One call at a time, the long call would end (all 900 tokens) before the others began.
    while started.load(Ordering::SeqCst) < 3 {
        match tokio::time::timeout(GENEROUS, cancelled.next())
            .await
            .unwrap()
        {
            Some(Ok(ModelEvent::Text(_))) => {}
            other => panic!("expected text while the others start, got {other:?}"),
        }
    }
    drop(cancelled);
    let others = others.await.unwrap();
    for (call, alone) in others.iter().zip(&alone) {
        assert_eq!(usage_of(&call.events).1, u64::from(TOKENS));
        // The same answer as alone: each call's sequence is its own, whatever ran or stopped beside it.
        assert_eq!(&text_of(&call.events), alone);
    }
    // The dropped call stopped: far fewer than its 900 tokens (it ran while the others fed their prompts).
    let dropped = provider.tokens_generated() - generated_before - 3 * u64::from(TOKENS);
    assert!(dropped < 400, "the dropped call generated {dropped} tokens");
}

#[tokio::test]
async fn a_tool_call_beside_plain_calls_is_a_valid_tool_call() {
    let Some(provider) = load(1024) else { return };
    // Longer than the tool call, so the plain calls are still generating when it ends.
    const PLAIN: u32 = 64;
    let required = GenerateOptions {
        tool_choice: ToolChoice::Required,
        ..greedy(64)
    };
    let calls = vec![
        (user(STORIES[0]), long(PLAIN)),
        (
            tool_request("What is 17 * 23? Use the calculator."),
            required,
        ),
        (user(STORIES[1]), long(PLAIN)),
    ];
    let done = all_at_once(&provider, calls).await;
    assert_decoded_together(&done);
    let tool_events = &done[1].events;
    let calls: Vec<_> = tool_events
        .iter()
        .filter_map(|e| match e {
            ModelEvent::ToolCall(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), 1, "{tool_events:?}");
    assert_calculator_call(calls[0]);
    assert_eq!(text_of(tool_events), "");
    for plain in [&done[0], &done[2]] {
        assert_eq!(usage_of(&plain.events).1, u64::from(PLAIN));
        assert!(!plain
            .events
            .iter()
            .any(|e| matches!(e, ModelEvent::ToolCall(_))));
    }
}

#[tokio::test]
async fn each_slot_keeps_its_conversation_cached_while_others_run() {
    let Some(provider) = load(1024) else { return };
    let first = collect(&provider, user(FRUITS), greedy(12)).await;
    let (first_prompt, _) = usage_of(&first);

    // Three other conversations run in between (the four slots' worth), one alone and then two at once.
    collect(&provider, user(STORIES[0]), greedy(8)).await;
    let calls = STORIES[1..3].iter().map(|s| (user(s), greedy(8))).collect();
    all_at_once(&provider, calls).await;

    // The first conversation's next round decodes only what is new since its first round.
    let before = provider.prompt_tokens_decoded();
    let next = collect(&provider, follow_up(&first), greedy(8)).await;
    let (next_prompt, _) = usage_of(&next);
    let decoded = provider.prompt_tokens_decoded() - before;
    assert!(
        decoded >= 1 && decoded < next_prompt - first_prompt + 2,
        "decoded {decoded} of {next_prompt} (the first round's prompt was {first_prompt})"
    );
}
