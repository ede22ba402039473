//! OpenAI `/chat/completions` wire types: the request, serialised straight from the core's [`ModelRequest`]
//! without copying its strings (prompts carry whole histories and images as data URLs), and the stream chunk,
//! deserialised borrowing from the `data:` line (this runs once per token).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use agentd_core::domain::ToolCall;
use agentd_core::provider::{ModelMessage, ModelRequest, ToolSpec};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------------------------
// Request

/// The request body.
#[derive(Serialize)]
pub(crate) struct ChatRequest<'a> {
    model: &'a str,
    messages: Messages<'a>,
    #[serde(skip_serializing_if = "Tools::is_empty")]
    tools: Tools<'a>,
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl<'a> ChatRequest<'a> {
    pub(crate) fn new(request: &'a ModelRequest) -> Self {
        ChatRequest {
            model: &request.model,
            messages: Messages(&request.messages),
            tools: Tools(&request.tools),
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        }
    }
}

struct Messages<'a>(&'a [ModelMessage]);

impl Serialize for Messages<'_> {
    /// The messages in order; after a run of tool results that returned images, one user message carrying
    /// those images (a `tool` message's content can only be text).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        let mut shown = ToolImages::default();
        for (i, message) in self.0.iter().enumerate() {
            seq.serialize_element(&WireMessage(message))?;
            if let ModelMessage::Tool {
                tool_call_id,
                images,
                ..
            } = message
            {
                if !images.is_empty() {
                    shown.calls.push(tool_call_id);
                    shown.images.extend(images.iter().map(String::as_str));
                }
                let group_ends = !matches!(self.0.get(i + 1), Some(ModelMessage::Tool { .. }));
                if group_ends && !shown.images.is_empty() {
                    seq.serialize_element(&std::mem::take(&mut shown))?;
                }
            }
        }
        seq.end()
    }
}

/// The images of a group of tool results, as a user message that names the calls they came from.
#[derive(Default)]
struct ToolImages<'a> {
    calls: Vec<&'a str>,
    images: Vec<&'a str>,
}

impl Serialize for ToolImages<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let calls = if self.calls.len() == 1 {
            "call"
        } else {
            "calls"
        };
        let text = format!(
            "The images returned by tool {calls} {}:",
            self.calls.join(", ")
        );
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("role", "user")?;
        map.serialize_entry(
            "content",
            &UserParts {
                text: &text,
                images: &self.images,
            },
        )?;
        map.end()
    }
}

/// One message, as `{"role": ..., ...}`.
struct WireMessage<'a>(&'a ModelMessage);

impl Serialize for WireMessage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match self.0 {
            ModelMessage::System { content } => {
                map.serialize_entry("role", "system")?;
                map.serialize_entry("content", content)?;
            }
            ModelMessage::User { content, images } => {
                map.serialize_entry("role", "user")?;
                if images.is_empty() {
                    map.serialize_entry("content", content)?;
                } else {
                    map.serialize_entry(
                        "content",
                        &UserParts {
                            text: content,
                            images,
                        },
                    )?;
                }
            }
            ModelMessage::Assistant {
                content,
                tool_calls,
            } => {
                map.serialize_entry("role", "assistant")?;
                if tool_calls.is_empty() {
                    map.serialize_entry("content", content)?;
                } else {
                    // OpenAI's own form for a message that only calls tools is `content: null`.
                    let content = (!content.is_empty()).then_some(content);
                    map.serialize_entry("content", &content)?;
                    map.serialize_entry("tool_calls", &WireToolCalls(tool_calls))?;
                }
            }
            ModelMessage::Tool {
                tool_call_id,
                content,
                ..
            } => {
                map.serialize_entry("role", "tool")?;
                map.serialize_entry("tool_call_id", tool_call_id)?;
                map.serialize_entry("content", content)?;
            }
        }
        map.end()
    }
}

/// A user message with images: a text part (when there is text), then one `image_url` part per image.
struct UserParts<'a, I: AsRef<str>> {
    text: &'a str,
    images: &'a [I],
}

impl<I: AsRef<str>> Serialize for UserParts<'_, I> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum Part<'a> {
            Text { text: &'a str },
            ImageUrl { image_url: ImageUrl<'a> },
        }
        #[derive(Serialize)]
        struct ImageUrl<'a> {
            url: &'a str,
        }
        let mut seq = serializer.serialize_seq(None)?;
        if !self.text.is_empty() {
            seq.serialize_element(&Part::Text { text: self.text })?;
        }
        for url in self.images {
            seq.serialize_element(&Part::ImageUrl {
                image_url: ImageUrl { url: url.as_ref() },
            })?;
        }
        seq.end()
    }
}

struct WireToolCalls<'a>(&'a [ToolCall]);

impl Serialize for WireToolCalls<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Call<'a> {
            id: &'a str,
            r#type: &'static str,
            function: Function<'a>,
        }
        #[derive(Serialize)]
        struct Function<'a> {
            name: &'a str,
            arguments: &'a str,
        }
        serializer.collect_seq(self.0.iter().map(|c| Call {
            id: &c.id,
            r#type: "function",
            function: Function {
                name: &c.name,
                arguments: &c.arguments,
            },
        }))
    }
}

struct Tools<'a>(&'a [ToolSpec]);

impl Tools<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Tools<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Tool<'a> {
            r#type: &'static str,
            function: Function<'a>,
        }
        #[derive(Serialize)]
        struct Function<'a> {
            name: &'a str,
            description: &'a str,
            parameters: &'a Value,
        }
        serializer.collect_seq(self.0.iter().map(|t| Tool {
            r#type: "function",
            function: Function {
                name: &t.name,
                description: &t.description,
                parameters: &t.parameters,
            },
        }))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Stream chunks

/// One `chat.completion.chunk`. Only the fields agentd reads; the rest are skipped without being built.
#[derive(Deserialize)]
pub(crate) struct Chunk<'a> {
    /// `choices[0]`; the rest of the array is skipped (agentd never asks for `n > 1`).
    #[serde(default, borrow, rename = "choices", deserialize_with = "first_choice")]
    pub choice: Option<Choice<'a>>,
    #[serde(default)]
    pub usage: Option<WireUsage>,
    /// Some upstreams report a failure mid-stream as a chunk with an `error` member.
    #[serde(default, borrow)]
    pub error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(crate) struct Choice<'a> {
    #[serde(default, borrow)]
    pub delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    pub finish_reason: Option<Str<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct Delta<'a> {
    #[serde(default, borrow)]
    pub content: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub reasoning_content: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub reasoning: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
pub(crate) struct ToolCallDelta<'a> {
    #[serde(default)]
    pub index: Option<usize>,
    #[serde(default, borrow)]
    pub id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    pub name: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub arguments: Option<Str<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct WireUsage {
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

/// A JSON string borrowed from the input when it has no escapes. serde only borrows a bare `Cow<str>` field,
/// not one inside an `Option`, hence this type.
pub(crate) struct Str<'a>(pub Cow<'a, str>);

impl Str<'_> {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
    pub(crate) fn into_string(self) -> String {
        self.0.into_owned()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for StrVisitor<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor(PhantomData))
    }
}

/// Deserialises `choices` (an array, or null) into its first element, skipping the others, so a chunk costs
/// no `Vec`.
fn first_choice<'de: 'a, 'a, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Choice<'a>>, D::Error> {
    struct FirstVisitor<'a>(PhantomData<&'a ()>);
    impl<'de: 'a, 'a> Visitor<'de> for FirstVisitor<'a> {
        type Value = Option<Choice<'a>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of choices")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_seq(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first = seq.next_element::<Choice<'a>>()?;
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }
    deserializer.deserialize_option(FirstVisitor(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_shape() {
        let request = ModelRequest {
            model: "m".into(),
            messages: vec![
                ModelMessage::System {
                    content: "sys".into(),
                },
                ModelMessage::User {
                    content: "hi".into(),
                    images: vec![],
                },
                ModelMessage::User {
                    content: "look".into(),
                    images: vec!["data:image/png;base64,AA".into()],
                },
                ModelMessage::Assistant {
                    content: String::new(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "calc".into(),
                        arguments: "{\"x\":1}".into(),
                    }],
                },
                ModelMessage::Tool {
                    tool_call_id: "c1".into(),
                    content: "1".into(),
                    images: vec![],
                },
                ModelMessage::Assistant {
                    content: String::new(),
                    tool_calls: vec![
                        ToolCall {
                            id: "c2".into(),
                            name: "shot".into(),
                            arguments: "{}".into(),
                        },
                        ToolCall {
                            id: "c3".into(),
                            name: "shot".into(),
                            arguments: "{}".into(),
                        },
                    ],
                },
                ModelMessage::Tool {
                    tool_call_id: "c2".into(),
                    content: "[image image/png, 1 bytes]".into(),
                    images: vec!["data:image/png;base64,BB".into()],
                },
                ModelMessage::Tool {
                    tool_call_id: "c3".into(),
                    content: "[image image/png, 1 bytes]".into(),
                    images: vec!["data:image/png;base64,CC".into()],
                },
                ModelMessage::Assistant {
                    content: "done".into(),
                    tool_calls: vec![],
                },
            ],
            tools: vec![],
        };
        let v = serde_json::to_value(ChatRequest::new(&request)).expect("test input is valid");
        assert_eq!(
            v,
            json!({
                "model": "m",
                "messages": [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": "hi"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    ]},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"x\":1}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "c1", "content": "1"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "c2", "type": "function", "function": {"name": "shot", "arguments": "{}"}},
                        {"id": "c3", "type": "function", "function": {"name": "shot", "arguments": "{}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "c2", "content": "[image image/png, 1 bytes]"},
                    {"role": "tool", "tool_call_id": "c3", "content": "[image image/png, 1 bytes]"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "The images returned by tool calls c2, c3:"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,BB"}},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,CC"}},
                    ]},
                    {"role": "assistant", "content": "done"},
                ],
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
    }

    #[test]
    fn chunk_strings_borrow_unless_escaped() {
        let line = r#"{"choices":[{"index":0,"delta":{"content":"plain"},"finish_reason":null},{"index":1}]}"#;
        let chunk: Chunk = serde_json::from_str(line).expect("test input is valid");
        let content = chunk
            .choice
            .and_then(|c| c.delta)
            .and_then(|d| d.content)
            .expect("test input is valid");
        assert!(matches!(content.0, Cow::Borrowed("plain")));

        let chunk: Chunk = serde_json::from_str(r#"{"choices":[{"delta":{"content":"a\nb"}}]}"#)
            .expect("test input is valid");
        let content = chunk
            .choice
            .and_then(|c| c.delta)
            .and_then(|d| d.content)
            .expect("test input is valid");
        assert_eq!(content.as_str(), "a\nb");
    }

    #[test]
    fn choices_may_be_empty_null_or_missing() {
        for line in [
            r#"{"choices":[],"usage":{"prompt_tokens":3}}"#,
            r#"{"choices":null}"#,
            r#"{}"#,
        ] {
            let chunk: Chunk = serde_json::from_str(line).expect("test input is valid");
            assert!(chunk.choice.is_none(), "{line}");
        }
    }
}
