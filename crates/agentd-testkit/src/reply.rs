//! What the mock upstream answers: scripted [`Reply`]s, and the directives it reads from the last user message
//! when no reply is queued ([`Reply::for_request`]).
//!
//! Directives (words in the last user message's text, any order):
//! - `status=NNN`: fail with HTTP `NNN` and a JSON error body.
//! - `hang`: accept the request and never send response headers.
//! - `malformed`: send a valid first chunk, then a `data:` line that is not JSON.
//! - `calc: EXPR` (rest of the line): call the `calculator` tool with `{"expression": EXPR}`.
//! - `tokens=N`: stream `tok0`, ` tok1`, ... as N content deltas (the text is `tok0 tok1 ... tokN-1`).
//! - `delay_ms=D`: sleep D ms before each content delta.
//! - `think`: stream some `reasoning_content` deltas before the content.
//! - otherwise the answer is `echo: <text>`, streamed word by word.
//!
//! When the request carries a `tool` message after the last user message (the second call of a tool round), the
//! answer is `The result is <tool content>.` whatever the directives say.

use serde_json::Value;

/// The canned reasoning the `think` directive streams.
pub const THINKING: [&str; 3] = ["Let me", " think about", " this."];

/// Which delta field carries reasoning. Upstreams differ: DeepSeek and vLLM use `reasoning_content`, others
/// (OpenRouter, Ollama's OpenAI endpoint) use `reasoning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningField {
    ReasoningContent,
    Reasoning,
}

impl ReasoningField {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningField::ReasoningContent => "reasoning_content",
            ReasoningField::Reasoning => "reasoning",
        }
    }
}

/// One tool call a scripted reply makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, streamed in at least two fragments.
    pub arguments: String,
}

/// A scripted answer to one `/chat/completions` request.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Streams each chunk as one content delta, sleeping `delay_ms` before each; finish_reason `stop`.
    Text { chunks: Vec<String>, delay_ms: u64 },
    /// Streams `reasoning` as deltas of `field`, then `text` as content deltas, sleeping `delay_ms` before each.
    Thinking {
        reasoning: Vec<String>,
        field: ReasoningField,
        text: Vec<String>,
        delay_ms: u64,
    },
    /// Content that carries its reasoning inline, `<think>{thinking}</think>{answer}`, the way models without a
    /// reasoning parser stream it. Sent as four deltas: `<think>`, thinking, `</think>`, answer.
    ThinkTagged { thinking: String, answer: String },
    /// Streams the calls as fragments: `index`, `id` and the name in each call's first chunk, the arguments
    /// split over at least two more chunks; finish_reason `tool_calls`.
    ToolCalls(Vec<MockToolCall>),
    /// Answers with this HTTP status and this body (sent as `application/json`).
    Status(u16, String),
    /// Accepts the request and never sends response headers (until the mock is dropped).
    Hang,
    /// Sends headers and these content deltas, then goes silent without ending the stream.
    Stall { chunks: Vec<String> },
    /// Sends a valid first chunk, then a `data:` line that is not JSON, then `[DONE]`.
    Malformed,
    /// Sends these content deltas, then closes the stream without a finish_reason and without `[DONE]`.
    Truncated { chunks: Vec<String> },
    /// Streams `chunk` as `count` content deltas, formatted once (a big answer costs the mock one chunk of
    /// memory); finish_reason `stop`.
    Repeated { chunk: String, count: usize },
    /// Sends each piece verbatim as its own body write, sleeping `gap_ms` between them. For parser tests:
    /// pieces may split lines, use `\r\n`, carry comments, and so on.
    Raw { pieces: Vec<String>, gap_ms: u64 },
}

impl Reply {
    /// `text` streamed word by word (each delta keeps its leading space, so the deltas concatenate to `text`).
    pub fn text(text: &str) -> Reply {
        Reply::Text {
            chunks: split_words(text),
            delay_ms: 0,
        }
    }

    /// One tool call.
    pub fn tool_call(id: &str, name: &str, arguments: &str) -> Reply {
        Reply::ToolCalls(vec![MockToolCall {
            id: id.to_owned(),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        }])
    }

    /// HTTP `status` with an OpenAI-style JSON error body.
    pub fn status(status: u16) -> Reply {
        Reply::Status(status, error_body(status, "mock upstream failure"))
    }

    /// The reply the directives of `request` ask for (see the module docs). `next_call_id` names a tool call.
    pub fn for_request(request: &Value, next_call_id: impl FnOnce() -> String) -> Reply {
        let messages = request
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let last_user = messages.iter().rposition(|m| role(m) == "user");
        let after_user = &messages[last_user.map_or(0, |i| i + 1)..];
        if let Some(tool) = after_user.iter().rev().find(|m| role(m) == "tool") {
            let result = tool.get("content").map(content_text).unwrap_or_default();
            return Reply::text(&format!("The result is {result}."));
        }
        let text = last_user
            .map(|i| {
                messages[i]
                    .get("content")
                    .map(content_text)
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        Directives::parse(&text).into_reply(&text, next_call_id)
    }
}

/// An OpenAI-style error body.
pub fn error_body(status: u16, message: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": "mock_error", "code": status}})
        .to_string()
}

/// Splits `text` into words, each but the first keeping the space before it.
pub fn split_words(text: &str) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == ' ' && i > start {
            chunks.push(text[start..i].to_owned());
            start = i;
        }
    }
    if start < text.len() || chunks.is_empty() {
        chunks.push(text[start..].to_owned());
    }
    chunks
}

fn role(message: &Value) -> &str {
    message.get("role").and_then(Value::as_str).unwrap_or("")
}

/// The text of a message's `content`: the string itself, or its `text` parts joined by newlines.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The directives found in one user message.
#[derive(Debug, Default, PartialEq)]
struct Directives {
    status: Option<u16>,
    hang: bool,
    malformed: bool,
    think: bool,
    calc: Option<String>,
    tokens: Option<usize>,
    delay_ms: u64,
}

impl Directives {
    fn parse(text: &str) -> Directives {
        let mut d = Directives::default();
        for word in text.split_whitespace() {
            if let Some(v) = word.strip_prefix("status=") {
                d.status = v.parse().ok();
            } else if let Some(v) = word.strip_prefix("tokens=") {
                d.tokens = v.parse().ok();
            } else if let Some(v) = word.strip_prefix("delay_ms=") {
                d.delay_ms = v.parse().unwrap_or(0);
            } else {
                match word {
                    "hang" => d.hang = true,
                    "malformed" => d.malformed = true,
                    "think" => d.think = true,
                    _ => {}
                }
            }
        }
        if let Some(pos) = text.find("calc:") {
            let rest = &text[pos + "calc:".len()..];
            d.calc = Some(rest.lines().next().unwrap_or("").trim().to_owned());
        }
        d
    }

    fn into_reply(self, text: &str, next_call_id: impl FnOnce() -> String) -> Reply {
        if let Some(status) = self.status {
            return Reply::status(status);
        }
        if self.hang {
            return Reply::Hang;
        }
        if self.malformed {
            return Reply::Malformed;
        }
        if let Some(expression) = self.calc {
            let arguments = serde_json::json!({ "expression": expression }).to_string();
            return Reply::tool_call(&next_call_id(), "calculator", &arguments);
        }
        let chunks = match self.tokens {
            Some(n) => (0..n)
                .map(|i| {
                    if i == 0 {
                        "tok0".to_owned()
                    } else {
                        format!(" tok{i}")
                    }
                })
                .collect(),
            None => split_words(&format!("echo: {text}")),
        };
        if self.think {
            Reply::Thinking {
                reasoning: THINKING.iter().map(|s| (*s).to_owned()).collect(),
                field: ReasoningField::ReasoningContent,
                text: chunks,
                delay_ms: self.delay_ms,
            }
        } else {
            Reply::Text {
                chunks,
                delay_ms: self.delay_ms,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply_to(messages: Value) -> Reply {
        Reply::for_request(&json!({ "messages": messages }), || "call_x".to_owned())
    }

    #[test]
    fn split_words_concatenates_back() {
        for text in [
            "echo: hello big world",
            "one",
            "",
            "  leading and trailing  ",
        ] {
            assert_eq!(split_words(text).concat(), text);
        }
        assert_eq!(split_words("a b"), vec!["a", " b"]);
    }

    #[test]
    fn directives_pick_the_reply() {
        let user = |t: &str| {
            reply_to(json!([{"role": "system", "content": "sys"}, {"role": "user", "content": t}]))
        };
        assert_eq!(user("hi there"), Reply::text("echo: hi there"));
        assert_eq!(user("status=503 please"), Reply::status(503));
        assert_eq!(user("please hang"), Reply::Hang);
        assert_eq!(user("malformed"), Reply::Malformed);
        assert_eq!(
            user("tokens=3 delay_ms=7"),
            Reply::Text {
                chunks: vec!["tok0".into(), " tok1".into(), " tok2".into()],
                delay_ms: 7
            }
        );
        assert_eq!(
            user("calc: 2 + 3*4\nthanks"),
            Reply::tool_call("call_x", "calculator", r#"{"expression":"2 + 3*4"}"#)
        );
        assert!(matches!(
            user("think tokens=1"),
            Reply::Thinking {
                field: ReasoningField::ReasoningContent,
                ..
            }
        ));
    }

    #[test]
    fn a_tool_result_after_the_user_message_is_answered() {
        let reply = reply_to(json!([
            {"role": "user", "content": "calc: 6*7"},
            {"role": "assistant", "content": null, "tool_calls": []},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]));
        assert_eq!(reply, Reply::text("The result is 42."));
        // A tool result from an earlier turn does not count.
        let reply = reply_to(json!([
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "user", "content": "calc: 1+1"},
        ]));
        assert!(matches!(reply, Reply::ToolCalls(_)));
    }

    #[test]
    fn image_parts_are_skipped_when_reading_directives() {
        let reply = reply_to(json!([{"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]}]));
        assert_eq!(reply, Reply::text("echo: look"));
    }
}
