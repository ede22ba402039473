//! [`ChunkStream`]: the response body of a streaming `/chat/completions` call, turned into [`ModelEvent`]s.
//!
//! Per network chunk it decodes SSE events, parses each `data:` line into borrowed wire structs, and queues
//! events: text and thinking deltas right away, tool calls once their fragments are complete (at the
//! `finish_reason` or `[DONE]`), usage last. It enforces the idle timeout between chunks, and treats a stream
//! that ends before `[DONE]` and before any `finish_reason` as malformed.
//!
//! The body is polled directly (no spawned task), so dropping the stream drops the HTTP response, which closes
//! the connection: that is how cancelling a run reaches the upstream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use agentd_core::domain::{ToolCall, Usage};
use agentd_core::provider::{ModelEvent, ProviderError};
use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::sse::SseDecoder;
use crate::wire::{Chunk, Str, ToolCallDelta};

/// The largest SSE event accepted; a bigger one means the upstream is not speaking the protocol.
const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;
/// Limits on what a single response may accumulate in tool calls.
const MAX_TOOL_CALLS: usize = 128;
const MAX_TOOL_ARGUMENT_BYTES: usize = 8 * 1024 * 1024;

/// Streams [`ModelEvent`]s out of an SSE body.
pub(crate) struct ChunkStream<S> {
    body: S,
    decoder: SseDecoder,
    calls: ToolCallAssembler,
    /// Parsed, not yet yielded. Holds at most one network chunk's worth of events (a chunk: what one read of
    /// the body brought), consecutive deltas of one kind joined (`push_delta`).
    pending: VecDeque<Result<ModelEvent, ProviderError>>,
    /// The last usage seen; yielded at the end because some upstreams repeat it on every chunk.
    usage: Option<Usage>,
    /// A `finish_reason` arrived: the answer is complete even if `[DONE]` never does.
    finished: bool,
    /// No more reading: `[DONE]`, the end of the body, or an error.
    ended: bool,
    idle_timeout: Duration,
    idle_timeout_s: u64,
    last_activity: Instant,
    /// Wakes us to check the idle timeout. It is re-armed lazily (see `poll_idle`), so a chunk costs an
    /// `Instant::now()` rather than a timer reset.
    timer: Pin<Box<Sleep>>,
}

impl<S> ChunkStream<S>
where
    S: Stream<Item = Result<Bytes, ProviderError>> + Unpin,
{
    /// `idle_timeout_s`: the longest wait for the next chunk.
    pub(crate) fn new(body: S, idle_timeout_s: u64) -> Self {
        let idle_timeout = Duration::from_secs(idle_timeout_s);
        let now = Instant::now();
        ChunkStream {
            body,
            decoder: SseDecoder::new(MAX_EVENT_BYTES),
            calls: ToolCallAssembler::default(),
            pending: VecDeque::new(),
            usage: None,
            finished: false,
            ended: false,
            idle_timeout,
            idle_timeout_s,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
        }
    }

    fn fail(&mut self, error: ProviderError) {
        self.pending.push_back(Err(error));
        self.ended = true;
    }

    /// The answer is complete: tool calls (if not yet out), then usage.
    fn complete(&mut self) {
        self.flush_calls();
        if let Some(usage) = self.usage.take() {
            self.pending.push_back(Ok(ModelEvent::Usage(usage)));
        }
        self.ended = true;
    }

    fn flush_calls(&mut self) {
        for call in self.calls.take() {
            self.pending.push_back(call.map(ModelEvent::ToolCall));
        }
    }

    /// Turns every complete SSE event buffered in the decoder into pending events.
    fn drain_decoder(&mut self) {
        while !self.ended {
            let data = match self.decoder.next_event() {
                Ok(Some(data)) => data,
                Ok(None) => return,
                Err(e) => return self.fail(ProviderError::Malformed(e.to_string())),
            };
            if data == "[DONE]" {
                return self.complete();
            }
            if data.trim().is_empty() {
                continue;
            }
            let chunk: Chunk = match serde_json::from_str(data) {
                Ok(chunk) => chunk,
                Err(e) => {
                    let error =
                        ProviderError::Malformed(format!("bad data line ({e}): {}", preview(data)));
                    return self.fail(error);
                }
            };
            // Borrow-splitting: `chunk` borrows the decoder, the rest of `self` is free.
            let step = apply_chunk(chunk, &mut self.calls, &mut self.pending, &mut self.usage);
            match step {
                Ok(false) => {}
                Ok(true) => {
                    self.finished = true;
                    self.flush_calls();
                }
                Err(e) => return self.fail(e),
            }
        }
    }

    /// The body ended. Fine after `[DONE]` or a `finish_reason`; otherwise the answer was cut off.
    fn end_of_body(&mut self) {
        self.decoder.finish();
        self.drain_decoder();
        if self.ended {
            return;
        }
        if self.finished {
            self.complete();
        } else {
            self.fail(ProviderError::Malformed(
                "the stream ended before [DONE] and before a finish_reason".into(),
            ));
        }
    }

    /// Ready when no chunk arrived for the idle timeout. The timer's deadline is never later than the real
    /// one (`last_activity` only moves forward), so it may fire early; then it is re-armed to the real deadline.
    /// That keeps chunks from touching the timer at all.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last_activity + self.idle_timeout;
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(due);
        }
    }
}

/// Applies one chunk; `Ok(true)` when it carried a `finish_reason`.
fn apply_chunk(
    chunk: Chunk<'_>,
    calls: &mut ToolCallAssembler,
    pending: &mut VecDeque<Result<ModelEvent, ProviderError>>,
    usage: &mut Option<Usage>,
) -> Result<bool, ProviderError> {
    if let Some(error) = chunk.error {
        return Err(ProviderError::Other(format!(
            "upstream reported an error: {}",
            preview(error.get())
        )));
    }
    if let Some(u) = chunk.usage {
        *usage = Some(Usage {
            prompt_tokens: u.prompt_tokens.unwrap_or(0),
            completion_tokens: u.completion_tokens.unwrap_or(0),
        });
    }
    let Some(choice) = chunk.choice else {
        return Ok(false);
    };
    if let Some(delta) = choice.delta {
        // Reasoning first: when a chunk carries both, the thinking came before the answer.
        if let Some(thinking) = delta
            .reasoning_content
            .or(delta.reasoning)
            .filter(|s| !s.as_str().is_empty())
        {
            push_delta(pending, Delta::Thinking, thinking);
        }
        if let Some(text) = delta.content.filter(|s| !s.as_str().is_empty()) {
            push_delta(pending, Delta::Text, text);
        }
        for fragment in delta.tool_calls.into_iter().flatten() {
            calls.add(fragment)?;
        }
    }
    Ok(choice.finish_reason.is_some())
}

#[derive(Clone, Copy, PartialEq)]
enum Delta {
    Text,
    Thinking,
}

/// Queues a text or thinking delta, appended to the last queued event when that is a delta of the same kind:
/// `pending` holds what one read of the body brought, so deltas that arrived together leave as one event
/// (one log entry, one frame per client), and none waits for another.
fn push_delta(
    pending: &mut VecDeque<Result<ModelEvent, ProviderError>>,
    kind: Delta,
    text: Str<'_>,
) {
    match (pending.back_mut(), kind) {
        (Some(Ok(ModelEvent::Text(last))), Delta::Text)
        | (Some(Ok(ModelEvent::Thinking(last))), Delta::Thinking) => last.push_str(text.as_str()),
        (_, Delta::Text) => pending.push_back(Ok(ModelEvent::Text(text.into_string()))),
        (_, Delta::Thinking) => pending.push_back(Ok(ModelEvent::Thinking(text.into_string()))),
    }
}

/// Consecutive text (and thinking) deltas joined, as if each run of them had arrived in one piece: what a stream
/// yields whatever the chunking (for tests and the fuzz target).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn join_deltas(
    events: Vec<Result<ModelEvent, ProviderError>>,
) -> Vec<Result<ModelEvent, ProviderError>> {
    let mut out: Vec<Result<ModelEvent, ProviderError>> = Vec::new();
    for event in events {
        match (out.last_mut(), event) {
            (Some(Ok(ModelEvent::Text(last))), Ok(ModelEvent::Text(t)))
            | (Some(Ok(ModelEvent::Thinking(last))), Ok(ModelEvent::Thinking(t))) => {
                last.push_str(&t)
            }
            (_, event) => out.push(event),
        }
    }
    out
}

impl<S> Stream for ChunkStream<S>
where
    S: Stream<Item = Result<Bytes, ProviderError>> + Unpin,
{
    type Item = Result<ModelEvent, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.pending.pop_front() {
                return Poll::Ready(Some(event));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.body).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    this.last_activity = Instant::now();
                    this.decoder.push(&bytes);
                    this.drain_decoder();
                }
                Poll::Ready(Some(Err(e))) => this.fail(e),
                Poll::Ready(None) => this.end_of_body(),
                Poll::Pending => {
                    if this.poll_idle(cx).is_ready() {
                        this.fail(ProviderError::Timeout(this.idle_timeout_s));
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The first 200 characters of `s`, for error messages.
fn preview(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// One tool call being assembled from fragments.
struct PartialCall {
    index: usize,
    id: String,
    name: String,
    arguments: String,
}

/// Assembles `delta.tool_calls` fragments by `index`.
#[derive(Default)]
struct ToolCallAssembler {
    calls: Vec<PartialCall>,
    argument_bytes: usize,
}

impl ToolCallAssembler {
    fn add(&mut self, fragment: ToolCallDelta<'_>) -> Result<(), ProviderError> {
        // Some upstreams omit `index` when they stream one call at a time: a fragment with an id starts a new
        // call, one without continues the last.
        let index = match fragment.index {
            Some(index) => index,
            None if fragment.id.is_some() || self.calls.is_empty() => {
                match self.calls.iter().map(|c| c.index).max() {
                    None => 0,
                    // An index the upstream chose can be anything, usize::MAX included.
                    Some(last) => last.checked_add(1).ok_or_else(|| {
                        ProviderError::Malformed("tool call index out of range".into())
                    })?,
                }
            }
            None => self.calls.last().map_or(0, |c| c.index),
        };
        let position = match self.calls.iter().position(|c| c.index == index) {
            Some(position) => position,
            None => {
                if self.calls.len() == MAX_TOOL_CALLS {
                    return Err(ProviderError::Malformed(format!(
                        "more than {MAX_TOOL_CALLS} tool calls"
                    )));
                }
                self.calls.push(PartialCall {
                    index,
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[position];
        if let Some(id) = fragment.id.filter(|id| !id.as_str().is_empty()) {
            if call.id.is_empty() {
                call.id = id.into_string();
            }
        }
        if let Some(function) = fragment.function {
            if let Some(name) = function.name.filter(|n| !n.as_str().is_empty()) {
                // Most upstreams send the name once; some repeat it on every fragment, a few split it.
                if call.name != name.as_str() {
                    call.name.push_str(name.as_str());
                }
            }
            if let Some(arguments) = function.arguments {
                self.argument_bytes += arguments.as_str().len();
                if self.argument_bytes > MAX_TOOL_ARGUMENT_BYTES {
                    return Err(ProviderError::Malformed(
                        "tool call arguments are too large".into(),
                    ));
                }
                push_str(&mut call.arguments, arguments);
            }
        }
        Ok(())
    }

    /// The assembled calls in index order, leaving the assembler empty.
    fn take(&mut self) -> Vec<Result<ToolCall, ProviderError>> {
        self.argument_bytes = 0;
        let mut calls = std::mem::take(&mut self.calls);
        calls.sort_by_key(|c| c.index);
        calls
            .into_iter()
            .map(|c| {
                if c.name.is_empty() {
                    return Err(ProviderError::Malformed(format!(
                        "tool call {} has no function name",
                        c.index
                    )));
                }
                Ok(ToolCall {
                    id: if c.id.is_empty() {
                        format!("call_{}", c.index)
                    } else {
                        c.id
                    },
                    name: c.name,
                    // A call without arguments would otherwise reach the tool as the invalid JSON "".
                    arguments: if c.arguments.is_empty() {
                        "{}".to_owned()
                    } else {
                        c.arguments
                    },
                })
            })
            .collect()
    }
}

/// Appends, taking over an owned string when there is nothing to append to.
fn push_str(target: &mut String, s: Str<'_>) {
    if target.is_empty() {
        *target = s.into_string();
    } else {
        target.push_str(s.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{stream, StreamExt};

    async fn collect_bytes(pieces: Vec<Bytes>) -> Vec<Result<ModelEvent, ProviderError>> {
        ChunkStream::new(stream::iter(pieces.into_iter().map(Ok)), 5)
            .collect()
            .await
    }

    async fn collect(pieces: Vec<&'static str>) -> Vec<Result<ModelEvent, ProviderError>> {
        collect_bytes(
            pieces
                .into_iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
        .await
    }

    fn text(s: &str) -> Result<ModelEvent, ProviderError> {
        Ok(ModelEvent::Text(s.to_owned()))
    }

    #[tokio::test]
    async fn events_come_out_in_order_whatever_the_chunking() {
        let full = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n",
            ": ping\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning\":\"hm\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"h\\u00e9llo \"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"wörld\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"b\",\"function\":{\"name\":\"two\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"function\":{\"name\":\"one\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"{\\\"x\\\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n",
            "data: [DONE]\n\n",
        );
        // Deltas that arrive in one piece come out as one event; which ones do depends on the split.
        let expected = vec![
            Ok(ModelEvent::Thinking("hm".into())),
            text("héllo wörld"),
            Ok(ModelEvent::ToolCall(ToolCall {
                id: "a".into(),
                name: "one".into(),
                arguments: "{}".into(),
            })),
            Ok(ModelEvent::ToolCall(ToolCall {
                id: "b".into(),
                name: "two".into(),
                arguments: "{\"x\":1}".into(),
            })),
            Ok(ModelEvent::Usage(Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
            })),
        ];
        // Every piece size from one byte up: boundaries fall inside `\r\n`, inside `é`, inside `[DONE]`.
        for size in 1..=full.len() {
            let pieces = full
                .as_bytes()
                .chunks(size)
                .map(Bytes::copy_from_slice)
                .collect();
            assert_eq!(
                join_deltas(collect_bytes(pieces).await),
                expected,
                "piece size {size}"
            );
        }
    }

    #[tokio::test]
    async fn deltas_that_arrive_together_leave_as_one_event() {
        let delta = |field: &str, s: &str| {
            format!("data: {{\"choices\":[{{\"delta\":{{\"{field}\":\"{s}\"}}}}]}}\n\n")
        };
        // One piece: thinking, thinking, text, text, thinking, text -> four events.
        let one = [
            delta("reasoning_content", "a"),
            delta("reasoning_content", "b"),
            delta("content", "c"),
            delta("content", "d"),
            delta("reasoning_content", "e"),
            delta("content", "f"),
        ]
        .concat();
        let events = collect_bytes(vec![
            Bytes::from(one),
            Bytes::from(delta("content", "g")),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ])
        .await;
        assert_eq!(
            events,
            vec![
                Ok(ModelEvent::Thinking("ab".into())),
                text("cd"),
                Ok(ModelEvent::Thinking("e".into())),
                text("f"),
                // A later piece is a later event: nothing waits for more.
                text("g"),
            ]
        );
    }

    #[tokio::test]
    async fn a_finish_reason_without_done_is_a_complete_answer() {
        let events = collect(vec![
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n",
        ])
        .await;
        assert_eq!(events, vec![text("hi")]);
    }

    #[tokio::test]
    async fn a_stream_cut_off_is_malformed_after_the_text_it_had() {
        let events = collect(vec![
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
        ])
        .await;
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], text("hi"));
        assert!(matches!(events[1], Err(ProviderError::Malformed(_))));
    }

    #[tokio::test]
    async fn garbage_and_error_chunks_end_the_stream() {
        let events = collect(vec!["data: {oops\n\n", "data: [DONE]\n\n"]).await;
        assert!(
            matches!(events.as_slice(), [Err(ProviderError::Malformed(m))] if m.contains("{oops"))
        );
        let events = collect(vec!["data: {\"error\":{\"message\":\"overloaded\"}}\n\n"]).await;
        assert!(
            matches!(events.as_slice(), [Err(ProviderError::Other(m))] if m.contains("overloaded"))
        );
    }

    #[tokio::test]
    async fn fragments_without_index_continue_the_last_call() {
        let events = collect(vec![
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\":2}\"}}]}}]}\n\n",
            "data: [DONE]\n\n",
        ])
        .await;
        let call = ToolCall {
            id: "c".into(),
            name: "f".into(),
            arguments: "{\"a\":2}".into(),
        };
        assert_eq!(events, vec![Ok(ModelEvent::ToolCall(call))]);
    }

    #[tokio::test]
    async fn a_new_call_after_the_largest_index_is_malformed_not_a_panic() {
        let events = collect(vec![
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":18446744073709551615,\"id\":\"a\",\"function\":{\"name\":\"f\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"id\":\"b\",\"function\":{\"name\":\"g\"}}]}}]}\n\n",
            "data: [DONE]\n\n",
        ])
        .await;
        assert_eq!(
            events,
            vec![Err(ProviderError::Malformed(
                "tool call index out of range".into()
            ))]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_longer_than_the_idle_timeout_is_a_timeout() {
        let first = stream::iter([Ok(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        ))]);
        let body = first.chain(stream::pending());
        let events: Vec<_> = ChunkStream::new(body, 3).collect().await;
        assert_eq!(events, vec![text("a"), Err(ProviderError::Timeout(3))]);
    }
}
