//! Rendering a [`ModelRequest`] into the model's chat format.
//!
//! The chat template comes from the GGUF (llama.cpp's built-in template engine recognises the common families);
//! a model without one, or with one llama.cpp cannot apply, falls back to ChatML. Everything the OpenAI message
//! model has beyond role and text is rendered as text, in the Hermes/Qwen convention many small models were
//! tuned on: tools are listed in the system prompt, earlier tool calls appear as `<tool_call>` blocks in the
//! assistant turn, and tool results come back as `<tool_response>` blocks in a user turn (a `tool` role is not
//! understood by every template, a user turn is).

use agentd_core::provider::{ModelMessage, ToolSpec};
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};

use crate::grammar::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

/// The template used when the GGUF has none or llama.cpp cannot apply its own.
const FALLBACK_TEMPLATE: &str = "chatml";

/// The model's chat template, falling back to ChatML.
pub(crate) fn model_template(model: &LlamaModel) -> LlamaChatTemplate {
    match model.chat_template(None) {
        Ok(t) => t,
        Err(_) => chatml(),
    }
}

fn chatml() -> LlamaChatTemplate {
    LlamaChatTemplate::new(FALLBACK_TEMPLATE)
        .expect("a literal without NUL bytes is a valid C string")
}

/// The text of the system prompt section describing `tools`.
pub(crate) fn tools_section(tools: &[ToolSpec]) -> String {
    let mut out = String::from(
        "# Tools\n\nYou can call one of these tools. Each line is a tool with a JSON schema of its arguments:\n<tools>\n",
    );
    for tool in tools {
        // Written by hand so `name` comes first, as in the call format below (a `json!` map would sort the keys).
        out.push_str(&format!(
            r#"{{"name": {}, "description": {}, "parameters": {}}}"#,
            serde_json::Value::String(tool.name.clone()),
            serde_json::Value::String(tool.description.clone()),
            tool.parameters
        ));
        out.push('\n');
    }
    out.push_str("</tools>\n\nTo call a tool, reply with only:\n");
    out.push_str(TOOL_CALL_OPEN);
    out.push_str(r#"{"name": "tool_name", "arguments": {"argument_name": "value"}}"#);
    out.push_str(TOOL_CALL_CLOSE);
    if let Some(first) = tools.first() {
        // A concrete call in the exact shape expected: small models copy shapes far better than they follow
        // a description of one.
        out.push_str("\nFor example:\n");
        out.push_str(&example_call(first));
    }
    out.push_str("\nIf no tool is needed, reply with a plain text answer.");
    out
}

/// A call of `tool` with placeholder arguments of the right types.
fn example_call(tool: &ToolSpec) -> String {
    let mut arguments = serde_json::Map::new();
    if let Some(properties) = tool
        .parameters
        .get("properties")
        .and_then(|p| p.as_object())
    {
        for (name, schema) in properties {
            let placeholder = match schema.get("type").and_then(|t| t.as_str()) {
                Some("number") | Some("integer") => serde_json::json!(1),
                Some("boolean") => serde_json::json!(true),
                Some("array") => serde_json::json!([]),
                Some("object") => serde_json::json!({}),
                _ => serde_json::json!("..."),
            };
            arguments.insert(name.clone(), placeholder);
        }
    }
    format!(
        r#"{TOOL_CALL_OPEN}{{"name": {}, "arguments": {}}}{TOOL_CALL_CLOSE}"#,
        serde_json::Value::String(tool.name.clone()),
        serde_json::Value::Object(arguments)
    )
}

/// The (role, content) pairs of the conversation, tools folded into the system prompt.
pub(crate) fn chat_messages(
    messages: &[ModelMessage],
    tools: &[ToolSpec],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(messages.len() + 1);
    for message in messages {
        let (role, content) = match message {
            ModelMessage::System { content } => ("system", content.clone()),
            ModelMessage::User { content, images } => {
                let mut content = content.clone();
                if !images.is_empty() {
                    // A text-only model cannot see them; saying so lets it answer honestly instead of guessing.
                    content.push_str(&format!(
                        "\n[{} image(s) attached; this model cannot see images]",
                        images.len()
                    ));
                }
                ("user", content)
            }
            ModelMessage::Assistant {
                content,
                tool_calls,
            } => {
                let mut content = content.clone();
                for call in tool_calls {
                    let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
                        .unwrap_or_else(|_| serde_json::Value::String(call.arguments.clone()));
                    let body = serde_json::json!({ "name": call.name, "arguments": arguments });
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"));
                }
                ("assistant", content)
            }
            ModelMessage::Tool { content, .. } => (
                "user",
                format!("<tool_response>\n{content}\n</tool_response>"),
            ),
        };
        out.push((role.to_string(), content));
    }
    if !tools.is_empty() {
        let section = tools_section(tools);
        match out.iter_mut().find(|(role, _)| role == "system") {
            Some((_, content)) => {
                content.push_str("\n\n");
                content.push_str(&section);
            }
            None => out.insert(0, ("system".to_string(), section)),
        }
    }
    out
}

/// The full prompt text, ending with the opening of the assistant's turn.
pub(crate) fn render(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    messages: &[ModelMessage],
    tools: &[ToolSpec],
) -> Result<String, String> {
    let chat: Vec<LlamaChatMessage> = chat_messages(messages, tools)
        .into_iter()
        // C strings cannot hold NUL; a NUL in user text carries no meaning for the model, so it is dropped.
        .map(|(role, content)| LlamaChatMessage::new(role, content.replace('\0', "")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot build the prompt: {e}"))?;
    match model.apply_chat_template(template, &chat, true) {
        Ok(text) => Ok(text),
        // An unrecognised template is reported as an error code; ChatML is the lingua franca of chat GGUFs.
        Err(_) => model
            .apply_chat_template(&chatml(), &chat, true)
            .map_err(|e| format!("cannot apply the chat template: {e}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use agentd_core::domain::ToolCall;
    use serde_json::json;

    use super::*;

    fn calculator() -> ToolSpec {
        ToolSpec {
            name: "calculator".into(),
            description: "Evaluates arithmetic".into(),
            parameters: json!({"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}),
        }
    }

    #[test]
    fn tools_are_appended_to_the_first_system_message() {
        let messages = vec![
            ModelMessage::System {
                content: "Be brief.".into(),
            },
            ModelMessage::User {
                content: "2+2?".into(),
                images: vec![],
            },
        ];
        let chat = chat_messages(&messages, &[calculator()]);
        assert_eq!(chat.len(), 2);
        assert_eq!(chat[0].0, "system");
        assert!(chat[0].1.starts_with("Be brief.\n\n# Tools"));
        assert!(chat[0].1.contains(
            r#"{"name": "calculator", "description": "Evaluates arithmetic", "parameters": {"#
        ));
    }

    #[test]
    fn a_system_message_is_added_when_there_is_none() {
        let messages = vec![ModelMessage::User {
            content: "hi".into(),
            images: vec![],
        }];
        let chat = chat_messages(&messages, &[calculator()]);
        assert_eq!(chat[0].0, "system");
        assert_eq!(chat[1], ("user".to_string(), "hi".to_string()));
        assert_eq!(chat_messages(&messages, &[]).len(), 1);
    }

    #[test]
    fn tool_calls_and_results_are_rendered_as_text() {
        let messages = vec![
            ModelMessage::Assistant {
                content: String::new(),
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "calculator".into(),
                    arguments: r#"{"expression":"1+1"}"#.into(),
                }],
            },
            ModelMessage::Tool {
                tool_call_id: "c1".into(),
                content: "2".into(),
                images: vec![],
            },
        ];
        let chat = chat_messages(&messages, &[]);
        assert_eq!(
            chat[0],
            (
                "assistant".to_string(),
                r#"<tool_call>{"arguments":{"expression":"1+1"},"name":"calculator"}</tool_call>"#
                    .to_string()
            )
        );
        assert_eq!(
            chat[1],
            (
                "user".to_string(),
                "<tool_response>\n2\n</tool_response>".to_string()
            )
        );
    }
}
