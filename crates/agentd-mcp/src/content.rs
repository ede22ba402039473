//! A `tools/call` result as the model reads it. Text parts and text resources are kept; an image (PNG, JPEG,
//! GIF or WebP) is attached to the result as a data URL, for a model that can see images (the `openai` provider
//! sends it as an image part), with a line naming it in the text for one that cannot; audio, binary resources
//! and images past the limit become a line naming their type and size; resource links name their URI. A result
//! with no content but structured content is that JSON. The text stays within `max_bytes` (cut, with a note),
//! the attached images (as data URLs) together within `max_image_bytes`; `isError` makes it a failed result.

use agentd_core::tools::ToolOutput;
use rmcp::model::CallToolResult;
use serde_json::Value;

/// Converts a result. Reads the result as JSON, so content types newer than this code still give text.
pub fn to_output(result: &CallToolResult, max_bytes: usize, max_image_bytes: usize) -> ToolOutput {
    let value = serde_json::to_value(result).unwrap_or(Value::Null);
    let mut text = Bounded::new(max_bytes, max_image_bytes);
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
    let images = std::mem::take(&mut text.images);
    let content = text.finish();
    let out = if result.is_error == Some(true) {
        ToolOutput::err(content)
    } else {
        ToolOutput::ok(content)
    };
    out.with_images(images)
}

/// The image types a vision model takes as an image part.
const SHOWN_IMAGES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

fn is_base64(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
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
        "image" => {
            let (mime, data) = (str_of(part, "mimeType"), str_of(part, "data"));
            let size = decoded_len(data);
            let attached = SHOWN_IMAGES.contains(&mime)
                && is_base64(data)
                && out.attach(format!("data:{mime};base64,{data}"));
            let how = if attached { "attached" } else { "not shown" };
            out.push(&format!("[image {mime}, {size} bytes, {how}]"));
        }
        "audio" => out.push(&format!(
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

/// Text parts joined by newlines, at most `max` bytes (cut on a character boundary), counting what was left
/// out; and attached images (data URLs), at most `max_images` bytes together.
struct Bounded {
    text: String,
    max: usize,
    dropped: usize,
    images: Vec<String>,
    image_room: usize,
}

impl Bounded {
    fn new(max: usize, max_images: usize) -> Bounded {
        Bounded {
            text: String::new(),
            max,
            dropped: 0,
            images: Vec::new(),
            image_room: max_images,
        }
    }

    /// Attaches an image if it fits beside the images already attached; false if not.
    fn attach(&mut self, url: String) -> bool {
        if url.len() > self.image_room {
            return false;
        }
        self.image_room -= url.len();
        self.images.push(url);
        true
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
        let out = to_output(&r, 10_000, 10_000);
        assert!(out.success);
        assert_eq!(
            out.content,
            "hello\n[image image/png, 3 bytes, attached]\ninside\n[resource file:///b.bin (), 6 bytes, not shown]"
        );
        assert_eq!(out.images, vec!["data:image/png;base64,AAAA".to_string()]);
    }

    #[test]
    fn images_past_the_limit_or_of_other_types_are_named_not_attached() {
        let big = "A".repeat(4000);
        let r = result(serde_json::json!({"content": [
            {"type": "image", "data": "AAAA", "mimeType": "image/svg+xml"},
            {"type": "image", "data": "not base64!", "mimeType": "image/png"},
            {"type": "image", "data": big, "mimeType": "image/jpeg"},
            {"type": "image", "data": "BBBB", "mimeType": "image/webp"},
        ]}));
        let out = to_output(&r, 1000, 1000);
        assert_eq!(out.images, vec!["data:image/webp;base64,BBBB".to_string()]);
        assert_eq!(
            out.content,
            "[image image/svg+xml, 3 bytes, not shown]\n[image image/png, 6 bytes, not shown]\n\
             [image image/jpeg, 3000 bytes, not shown]\n[image image/webp, 3 bytes, attached]"
        );
        // The images share their limit: the second of two that each fit alone is named, not attached.
        let r = result(serde_json::json!({"content": [
            {"type": "image", "data": "B".repeat(600), "mimeType": "image/png"},
            {"type": "image", "data": "C".repeat(600), "mimeType": "image/png"},
        ]}));
        let out = to_output(&r, 1000, 1000);
        assert_eq!(out.images.len(), 1);
        assert!(out.images[0].ends_with('B'));
        assert_eq!(
            out.content,
            "[image image/png, 450 bytes, attached]\n[image image/png, 450 bytes, not shown]"
        );
    }

    #[test]
    fn errors_fail_and_long_text_is_bounded() {
        let r = result(
            serde_json::json!({"content": [{"type": "text", "text": "é".repeat(1000)}], "isError": true}),
        );
        let out = to_output(&r, 101, 101);
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
        assert_eq!(to_output(&r, 100, 100).content, r#"{"sum":5}"#);
    }
}
