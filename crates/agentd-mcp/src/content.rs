//! A `tools/call` result as the model reads it: text. Text parts and text resources are kept; images, audio
//! and binary resources become a line naming their type and size (the model cannot see them through a tool
//! result); resource links name their URI. A result with no content but structured content is that JSON.
//! The text is cut at `max_bytes`, with a note; `isError` makes it a failed result.

use agentd_core::tools::ToolOutput;
use rmcp::model::CallToolResult;
use serde_json::Value;

/// Converts a result. Reads the result as JSON, so content types newer than this code still give text.
pub fn to_output(result: &CallToolResult, max_bytes: usize) -> ToolOutput {
    let value = serde_json::to_value(result).unwrap_or(Value::Null);
    let mut text = Bounded::new(max_bytes);
    let parts = value
        .get("content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for part in parts {
        part_text(part, &mut text);
    }
    if parts.is_empty() {
        if let Some(structured) = value.get("structuredContent").filter(|v| !v.is_null()) {
            text.push(&structured.to_string());
        }
    }
    let content = text.finish();
    if result.is_error == Some(true) {
        ToolOutput::err(content)
    } else {
        ToolOutput::ok(content)
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Bytes a base64 string decodes to (about).
fn decoded_len(b64: &str) -> usize {
    b64.len() / 4 * 3
}

fn part_text(part: &Value, out: &mut Bounded) {
    match str_of(part, "type") {
        "text" => out.push(str_of(part, "text")),
        "image" | "audio" => out.push(&format!(
            "[{} {}, {} bytes, not shown]",
            str_of(part, "type"),
            str_of(part, "mimeType"),
            decoded_len(str_of(part, "data"))
        )),
        "resource" => {
            let r = part.get("resource").unwrap_or(&Value::Null);
            match r.get("text").and_then(Value::as_str) {
                Some(t) => out.push(t),
                None => out.push(&format!(
                    "[resource {} ({}), {} bytes, not shown]",
                    str_of(r, "uri"),
                    str_of(r, "mimeType"),
                    decoded_len(str_of(r, "blob"))
                )),
            }
        }
        "resource_link" => out.push(&format!(
            "[resource link: {} {}]",
            str_of(part, "name"),
            str_of(part, "uri")
        )),
        other => out.push(&format!("[{other} content, not shown]")),
    }
}

/// Text parts joined by newlines, at most `max` bytes (cut on a character boundary), counting what was left out.
struct Bounded {
    text: String,
    max: usize,
    dropped: usize,
}

impl Bounded {
    fn new(max: usize) -> Bounded {
        Bounded {
            text: String::new(),
            max,
            dropped: 0,
        }
    }

    fn push(&mut self, s: &str) {
        let sep = usize::from(!self.text.is_empty());
        let room = self.max.saturating_sub(self.text.len() + sep);
        if self.dropped > 0 || room == 0 {
            self.dropped += s.len() + sep;
            return;
        }
        if sep == 1 {
            self.text.push('\n');
        }
        if s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&s[..cut]);
        self.dropped += s.len() - cut;
    }

    fn finish(mut self) -> String {
        if self.dropped > 0 {
            self.text.push_str(&format!(
                "\n[{} more bytes of the MCP server's answer were dropped]",
                self.dropped
            ));
        }
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(v: Value) -> CallToolResult {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn text_images_and_resources_become_text() {
        let r = result(serde_json::json!({"content": [
            {"type": "text", "text": "hello"},
            {"type": "image", "data": "AAAA", "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "file:///a.txt", "mimeType": "text/plain", "text": "inside"}},
            {"type": "resource", "resource": {"uri": "file:///b.bin", "blob": "AAAAAAAA"}},
        ]}));
        let out = to_output(&r, 10_000);
        assert!(out.success);
        assert_eq!(
            out.content,
            "hello\n[image image/png, 3 bytes, not shown]\ninside\n[resource file:///b.bin (), 6 bytes, not shown]"
        );
    }

    #[test]
    fn errors_fail_and_long_text_is_bounded() {
        let r = result(
            serde_json::json!({"content": [{"type": "text", "text": "é".repeat(1000)}], "isError": true}),
        );
        let out = to_output(&r, 101);
        assert!(!out.success);
        let (head, note) = out.content.split_once('\n').unwrap();
        assert_eq!(head.len(), 100);
        assert_eq!(
            note,
            "[1900 more bytes of the MCP server's answer were dropped]"
        );
    }

    #[test]
    fn structured_content_alone_is_its_json() {
        let r = result(serde_json::json!({"content": [], "structuredContent": {"sum": 5}}));
        assert_eq!(to_output(&r, 100).content, r#"{"sum":5}"#);
    }
}
