//! Turns a [`Reply`] into a [`Plan`]: the exact bytes the mock will write, formatted up front so that serving a
//! stream is only "write this, maybe sleep" (the mock also serves load tests).
//!
//! Every chunk is a `chat.completion.chunk` object as OpenAI sends it: the first carries `role: assistant`, the
//! last one with choices carries the `finish_reason`, then (when the request asked for
//! `stream_options.include_usage`) a chunk with `choices: []` and `usage`, then `data: [DONE]`.

use std::time::Duration;

use bytes::Bytes;

use crate::reply::{MockToolCall, ReasoningField, Reply};

/// One thing the body stream does.
pub(crate) enum Step {
    Send(Bytes),
    Sleep(Duration),
    /// Stop sending, keep the connection open until the mock shuts down.
    Hang,
}

/// How the mock answers one request.
pub(crate) enum Plan {
    Status(u16, String),
    /// Never send response headers.
    Hang,
    Stream(Vec<Step>),
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Formats the chunks of one response. Holds the per-response prefix so each chunk is one `String` build.
pub(crate) struct ChunkWriter {
    /// `data: {"id":..,"object":..,"created":..,"model":..,` shared by every chunk of the response.
    prefix: String,
    include_usage: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl ChunkWriter {
    pub(crate) fn new(
        id: u64,
        model: &str,
        created: u64,
        include_usage: bool,
        prompt_tokens: u64,
    ) -> Self {
        let model = json_string(model);
        let prefix = format!(
            "data: {{\"id\":\"chatcmpl-mock-{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{model},"
        );
        ChunkWriter {
            prefix,
            include_usage,
            prompt_tokens,
            completion_tokens: 0,
        }
    }

    /// A chunk with one choice carrying `delta` (a JSON object) and `finish_reason`.
    fn choice(&self, delta: &str, finish_reason: Option<&str>) -> Bytes {
        let mut s = String::with_capacity(self.prefix.len() + delta.len() + 96);
        s.push_str(&self.prefix);
        s.push_str("\"choices\":[{\"index\":0,\"delta\":");
        s.push_str(delta);
        s.push_str(",\"logprobs\":null,\"finish_reason\":");
        match finish_reason {
            Some(reason) => {
                s.push('"');
                s.push_str(reason);
                s.push('"');
            }
            None => s.push_str("null"),
        }
        s.push_str("}]}\n\n");
        Bytes::from(s)
    }

    /// The first chunk: OpenAI announces the role with empty content.
    fn role(&self, content: &str) -> Bytes {
        self.choice(
            &format!("{{\"role\":\"assistant\",\"content\":{content}}}"),
            None,
        )
    }

    fn content(&mut self, text: &str) -> Bytes {
        self.completion_tokens += 1;
        self.choice(&format!("{{\"content\":{}}}", json_string(text)), None)
    }

    fn reasoning(&mut self, field: ReasoningField, text: &str) -> Bytes {
        self.completion_tokens += 1;
        self.choice(
            &format!("{{\"{}\":{}}}", field.as_str(), json_string(text)),
            None,
        )
    }

    fn finish(&self, reason: &str) -> Bytes {
        self.choice("{}", Some(reason))
    }

    /// The usage chunk, when the request asked for it.
    fn usage(&self) -> Option<Bytes> {
        self.include_usage.then(|| {
            let (p, c) = (self.prompt_tokens, self.completion_tokens);
            Bytes::from(format!(
                "{}\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\n",
                self.prefix,
                p + c
            ))
        })
    }

    /// Finish reason, usage, `[DONE]`.
    fn end(&self, steps: &mut Vec<Step>, reason: &str) {
        steps.push(Step::Send(self.finish(reason)));
        if let Some(usage) = self.usage() {
            steps.push(Step::Send(usage));
        }
        steps.push(Step::Send(Bytes::from_static(DONE)));
    }

    fn contents(&mut self, steps: &mut Vec<Step>, chunks: &[String], delay: Duration) {
        for chunk in chunks {
            if !delay.is_zero() {
                steps.push(Step::Sleep(delay));
            }
            steps.push(Step::Send(self.content(chunk)));
        }
    }

    fn tool_calls(&mut self, steps: &mut Vec<Step>, calls: &[MockToolCall]) {
        for (index, call) in calls.iter().enumerate() {
            let head = format!(
                "{{\"tool_calls\":[{{\"index\":{index},\"id\":{},\"type\":\"function\",\"function\":{{\"name\":{},\"arguments\":\"\"}}}}]}}",
                json_string(&call.id),
                json_string(&call.name)
            );
            steps.push(Step::Send(self.choice(&head, None)));
            for fragment in thirds(&call.arguments) {
                self.completion_tokens += 1;
                let delta = format!(
                    "{{\"tool_calls\":[{{\"index\":{index},\"function\":{{\"arguments\":{}}}}}]}}",
                    json_string(fragment)
                );
                steps.push(Step::Send(self.choice(&delta, None)));
            }
        }
    }

    /// The plan for `reply`.
    pub(crate) fn render(mut self, reply: Reply) -> Plan {
        let mut steps = Vec::new();
        match reply {
            Reply::Status(status, body) => return Plan::Status(status, body),
            Reply::Hang => return Plan::Hang,
            Reply::Text { chunks, delay_ms } => {
                steps.reserve(chunks.len() * 2 + 4);
                steps.push(Step::Send(self.role("\"\"")));
                self.contents(&mut steps, &chunks, Duration::from_millis(delay_ms));
                self.end(&mut steps, "stop");
            }
            Reply::Thinking {
                reasoning,
                field,
                text,
                delay_ms,
            } => {
                let delay = Duration::from_millis(delay_ms);
                steps.push(Step::Send(self.role("\"\"")));
                for chunk in &reasoning {
                    if !delay.is_zero() {
                        steps.push(Step::Sleep(delay));
                    }
                    steps.push(Step::Send(self.reasoning(field, chunk)));
                }
                self.contents(&mut steps, &text, delay);
                self.end(&mut steps, "stop");
            }
            Reply::ThinkTagged { thinking, answer } => {
                steps.push(Step::Send(self.role("\"\"")));
                let chunks = [
                    "<think>".to_owned(),
                    thinking,
                    "</think>".to_owned(),
                    answer,
                ];
                self.contents(&mut steps, &chunks, Duration::ZERO);
                self.end(&mut steps, "stop");
            }
            Reply::ToolCalls(calls) => {
                steps.push(Step::Send(self.role("null")));
                self.tool_calls(&mut steps, &calls);
                self.end(&mut steps, "tool_calls");
            }
            Reply::Stall { chunks } => {
                steps.push(Step::Send(self.role("\"\"")));
                self.contents(&mut steps, &chunks, Duration::ZERO);
                steps.push(Step::Hang);
            }
            Reply::Malformed => {
                steps.push(Step::Send(self.role("\"\"")));
                steps.push(Step::Send(Bytes::from_static(
                    b"data: {\"choices\": [this is not json\n\n",
                )));
                steps.push(Step::Send(Bytes::from_static(DONE)));
            }
            Reply::Truncated { chunks } => {
                steps.push(Step::Send(self.role("\"\"")));
                self.contents(&mut steps, &chunks, Duration::ZERO);
            }
            Reply::Repeated { chunk, count } => {
                steps.reserve(count + 4);
                steps.push(Step::Send(self.role("\"\"")));
                if count > 0 {
                    let delta = self.content(&chunk);
                    self.completion_tokens += count as u64 - 1;
                    steps.extend((0..count).map(|_| Step::Send(delta.clone())));
                }
                self.end(&mut steps, "stop");
            }
            Reply::Raw { pieces, gap_ms } => {
                for (i, piece) in pieces.into_iter().enumerate() {
                    if i > 0 && gap_ms > 0 {
                        steps.push(Step::Sleep(Duration::from_millis(gap_ms)));
                    }
                    steps.push(Step::Send(Bytes::from(piece)));
                }
            }
        }
        Plan::Stream(steps)
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    // Serialising a &str cannot fail: serde_json only fails on non-string map keys and I/O.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `s` cut into three pieces at char boundaries (some may be empty when `s` is short). Three, so arguments
/// always arrive in more than one fragment.
fn thirds(s: &str) -> [&str; 3] {
    let cut = |target: usize| {
        (target..=s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len())
    };
    let (a, b) = (cut(s.len() / 3), cut(s.len() * 2 / 3));
    [&s[..a], &s[a..b], &s[b..]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirds_cover_the_string_at_char_boundaries() {
        for s in ["", "ab", "{\"expression\":\"1+2\"}", "ééééé"] {
            assert_eq!(thirds(s).concat(), s);
        }
    }

    #[test]
    fn a_repeated_reply_shares_one_chunk_and_counts_its_tokens() {
        let w = ChunkWriter::new(1, "m", 1, true, 3);
        let Plan::Stream(steps) = w.render(Reply::Repeated {
            chunk: "abc".into(),
            count: 5,
        }) else {
            panic!("a stream");
        };
        let sent: Vec<&Bytes> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Send(b) => Some(b),
                _ => None,
            })
            .collect();
        // role, five deltas, finish, usage, [DONE]
        assert_eq!(sent.len(), 9);
        assert!(sent[1..6].iter().all(|b| b.as_ptr() == sent[1].as_ptr()));
        let usage = std::str::from_utf8(sent[7]).expect("utf-8");
        assert!(usage.contains("\"completion_tokens\":5"), "{usage}");
    }

    #[test]
    fn chunks_are_valid_json_objects() {
        let mut w = ChunkWriter::new(7, "m\"odel", 1, true, 10);
        let chunks = [
            w.content("a\nb"),
            w.finish("stop"),
            w.usage().unwrap_or_default(),
        ];
        for chunk in chunks {
            let text = std::str::from_utf8(&chunk).expect("test input is valid");
            let json = text
                .strip_prefix("data: ")
                .and_then(|t| t.strip_suffix("\n\n"))
                .expect("test input is valid");
            let v: serde_json::Value = serde_json::from_str(json).expect("test input is valid");
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["model"], "m\"odel");
        }
    }
}
