//! agentkit's client frames, read as the seed read them, without a server: text in, a typed frame (or nothing,
//! for what the seed ignored) or the error frame's message out. [`super::ws`] acts on the frame; the fuzz
//! target `agentkit_frame` feeds this function arbitrary text.

use serde_json::Value;

/// One client frame, as the socket acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"type":"message","content"}`; a missing or null `content` is an empty message, as in the seed.
    Message { content: String },
    /// `{"type":"reply","request_id","content"}`; a `content` that is not a string is sent as its JSON.
    Reply { request_id: String, content: String },
    /// `{"type":"cancel"}`.
    Cancel,
    /// `{"type":"ping"}`: answered with `{"type":"pong"}`.
    Ping,
}

/// Why a frame was refused: the message of the error frame sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError(pub String);

/// Reads one text frame. `Ok(None)`: the seed ignored such a frame (not JSON, an unknown `type`, a `reply`
/// without a string `request_id`), and so does the socket.
pub fn parse(raw: &str) -> Result<Option<ClientFrame>, FrameError> {
    let Ok(v) = serde_json::from_str::<Value>(raw) else {
        return Ok(None);
    };
    Ok(Some(match v.get("type").and_then(Value::as_str) {
        Some("message") => ClientFrame::Message {
            content: match v.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(FrameError("`content` must be a string".into())),
            },
        },
        Some("reply") => {
            let Some(request_id) = v.get("request_id").and_then(Value::as_str) else {
                return Ok(None);
            };
            let content = match v.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            ClientFrame::Reply {
                request_id: request_id.to_string(),
                content,
            }
        }
        Some("cancel") => ClientFrame::Cancel,
        Some("ping") => ClientFrame::Ping,
        _ => return Ok(None),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_as_the_seed_reads_them() {
        let message = |c: &str| {
            Ok(Some(ClientFrame::Message {
                content: c.to_string(),
            }))
        };
        assert_eq!(parse(r#"{"type":"message","content":"hi"}"#), message("hi"));
        assert_eq!(parse(r#"{"type":"message"}"#), message(""));
        assert_eq!(
            parse(r#"{"type":"message","content":5}"#),
            Err(FrameError("`content` must be a string".into()))
        );
        assert_eq!(
            parse(r#"{"type":"reply","request_id":"q","content":{"a":1}}"#),
            Ok(Some(ClientFrame::Reply {
                request_id: "q".into(),
                content: r#"{"a":1}"#.into()
            }))
        );
        assert_eq!(parse(r#"{"type":"cancel"}"#), Ok(Some(ClientFrame::Cancel)));
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(Some(ClientFrame::Ping)));
        for ignored in ["not json", "[1]", r#"{"type":"reply"}"#, r#"{"type":"x"}"#] {
            assert_eq!(parse(ignored), Ok(None), "{ignored}");
        }
    }
}
