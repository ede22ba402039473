//! navi's one client frame, read as the seed read it, without a server: text in, the user message to send or
//! the error frame's message out. [`super::handle_frame`] sends it; the fuzz target `navi_frame` feeds
//! [`parse`] arbitrary text.

use agentd_core::service::SendMessage;
use serde_json::Value;

use super::{EXPECTED_MESSAGE, INVALID_JSON};

/// Reads one text frame. Err is the error frame's message.
pub fn parse(raw: &str) -> Result<SendMessage, String> {
    let Ok(v) = serde_json::from_str::<Value>(raw) else {
        return Err(INVALID_JSON.into());
    };
    user_message(&v)
}

/// The seed's truthiness of `content`: present, and not empty / null / false / 0.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// Builds the user message the seed would: images stripped of their data-URL head, uploaded files noted in
/// the content. Err is the error frame's message.
pub fn user_message(v: &Value) -> Result<SendMessage, String> {
    if v.get("type").and_then(Value::as_str) != Some("message") || !truthy(v.get("content")) {
        return Err(EXPECTED_MESSAGE.into());
    }
    let Some(content) = v.get("content").and_then(Value::as_str) else {
        return Err(EXPECTED_MESSAGE.into());
    };
    let mut content = content.to_string();
    let images = match v.get("images") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                let img = i
                    .as_str()
                    .ok_or_else(|| "`images` must be a list of strings".to_string())?;
                Ok(match (img.starts_with("data:"), img.split_once(',')) {
                    (true, Some((_, b64))) => b64.to_string(),
                    _ => img.to_string(),
                })
            })
            .collect::<Result<Vec<String>, String>>()?,
        other if !truthy(other) => Vec::new(),
        _ => return Err("`images` must be a list of strings".into()),
    };
    let files_error = || "`files` must be a list of {name, path} objects".to_string();
    match v.get("files") {
        Some(Value::Array(files)) if !files.is_empty() => {
            let mut lines = Vec::with_capacity(files.len());
            for f in files {
                let (Some(name), Some(path)) = (
                    f.get("name").and_then(Value::as_str),
                    f.get("path").and_then(Value::as_str),
                ) else {
                    return Err(files_error());
                };
                lines.push(format!("- {name} → {path}"));
            }
            content = format!(
                "{content}\n\n[Uploaded files on disk:\n{}]",
                lines.join("\n")
            );
        }
        other if !truthy(other) => {}
        _ => return Err(files_error()),
    }
    Ok(SendMessage {
        content,
        images,
        // The paths are already in the content, as the seed put them; there are no upload ids to resolve.
        files: Vec::new(),
        ..Default::default()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_that_is_not_json_is_refused_as_the_seed_refused_it() {
        assert_eq!(parse("{oops").unwrap_err(), INVALID_JSON);
        assert_eq!(
            parse(r#"{"type":"message","content":"hi"}"#)
                .unwrap()
                .content,
            "hi"
        );
    }

    #[test]
    fn frames_are_read_as_the_seed_reads_them() {
        for bad in [
            json!({"type": "ping"}),
            json!({"type": "message"}),
            json!({"type": "message", "content": ""}),
            json!({"type": "message", "content": 5}),
            json!(["message"]),
        ] {
            assert_eq!(user_message(&bad).unwrap_err(), EXPECTED_MESSAGE, "{bad}");
        }
        let m = user_message(&json!({
            "type": "message",
            "content": "look",
            "images": ["data:image/png;base64,iVBORw0KGgo=", "R0lGODlh"],
            "files": [{"name": "a.txt", "path": "/up/a.txt"}, {"name": "b", "path": "b"}],
        }))
        .unwrap();
        assert_eq!(m.images, ["iVBORw0KGgo=", "R0lGODlh"]);
        assert_eq!(
            m.content,
            "look\n\n[Uploaded files on disk:\n- a.txt → /up/a.txt\n- b → b]"
        );
        assert!(m.files.is_empty());
        let plain =
            user_message(&json!({"type": "message", "content": "hi", "images": null, "files": []}))
                .unwrap();
        assert_eq!(plain.content, "hi");
        assert!(
            user_message(&json!({"type": "message", "content": "x", "files": [{"name": 1}]}))
                .is_err()
        );
    }
}
