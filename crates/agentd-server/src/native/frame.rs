//! The native WebSocket's client frames (SPEC.md section 4), read without a server: text in, a typed frame or
//! the error frame's code and message out. [`super::ws`] acts on the frame; the fuzz target `native_frame`
//! feeds this function arbitrary text.

use agentd_core::service::SendMessage;
use agentd_core::tools::Decision;
use serde_json::Value;

/// One client frame, as the socket acts on it.
#[derive(Debug)]
pub enum ClientFrame {
    /// `{"type":"ping"}`: answered with `{"type":"pong"}`.
    Ping,
    /// `{"type":"message","content",...}`: one `Agentd::send`.
    Message(SendMessage),
    /// `{"type":"cancel","run_id"?}`: the active run when `run_id` is absent.
    Cancel { run_id: Option<String> },
    /// `{"type":"reply","request_id","content"}`: answers an `ask_human`.
    Reply { request_id: String, content: String },
    /// `{"type":"approval","request_id","decision":"allow"|"deny","reason"?}`: decides a tool call's approval.
    Approval {
        request_id: String,
        decision: Decision,
    },
}

/// Why a frame was refused: the `code` and `message` of the error frame sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>) -> FrameError {
        FrameError {
            code,
            message: message.into(),
        }
    }
}

/// Reads one text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::new("invalid_json", format!("frame is not valid JSON: {e}")))?;
    match v.get("type").and_then(Value::as_str).unwrap_or("") {
        "ping" => Ok(ClientFrame::Ping),
        "message" => message(&v).map(ClientFrame::Message),
        "cancel" => Ok(ClientFrame::Cancel {
            run_id: v.get("run_id").and_then(Value::as_str).map(String::from),
        }),
        "reply" => match (
            v.get("request_id").and_then(Value::as_str),
            v.get("content").and_then(Value::as_str),
        ) {
            (Some(request_id), Some(content)) => Ok(ClientFrame::Reply {
                request_id: request_id.to_string(),
                content: content.to_string(),
            }),
            _ => Err(FrameError::new(
                "missing_field",
                "`reply` needs string fields `request_id` and `content`",
            )),
        },
        "approval" => approval(&v),
        "" => Err(FrameError::new(
            "missing_field",
            "frame has no string field `type`",
        )),
        other => Err(FrameError::new(
            "unknown_type",
            format!("unknown frame type `{other}` (message, cancel, reply, approval, ping)"),
        )),
    }
}

fn approval(v: &Value) -> Result<ClientFrame, FrameError> {
    let Some(request_id) = v.get("request_id").and_then(Value::as_str) else {
        return Err(FrameError::new(
            "missing_field",
            "`approval` needs string fields `request_id` and `decision`",
        ));
    };
    let allow = match v.get("decision").and_then(Value::as_str) {
        Some("allow") => true,
        Some("deny") => false,
        Some(_) => {
            return Err(FrameError::new(
                "invalid_frame",
                "`decision` must be `allow` or `deny`",
            ))
        }
        None => {
            return Err(FrameError::new(
                "missing_field",
                "`approval` needs string fields `request_id` and `decision`",
            ))
        }
    };
    let reason = match v.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => Some(r.clone()),
        Some(_) => {
            return Err(FrameError::new(
                "invalid_frame",
                "`reason` must be a string",
            ))
        }
    };
    Ok(ClientFrame::Approval {
        request_id: request_id.to_string(),
        decision: Decision { allow, reason },
    })
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, FrameError> {
    let invalid = || {
        FrameError::new(
            "invalid_frame",
            format!("`{field}` must be an array of strings"),
        )
    };
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(String::from).ok_or_else(invalid))
            .collect(),
        Some(_) => Err(invalid()),
    }
}

fn message(v: &Value) -> Result<SendMessage, FrameError> {
    let Some(content) = v.get("content").and_then(Value::as_str) else {
        return Err(FrameError::new(
            "missing_field",
            "`message` needs a string field `content`",
        ));
    };
    let multitask = super::parse_multitask(v.get("multitask").and_then(Value::as_str))
        .map_err(|m| FrameError::new("invalid_frame", m))?;
    Ok(SendMessage {
        content: content.to_string(),
        images: strings(v, "images")?,
        files: strings(v, "files")?,
        client_message_id: v
            .get("client_message_id")
            .and_then(Value::as_str)
            .map(String::from),
        multitask,
        ..Default::default()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use agentd_core::config::Multitask;

    fn code(text: &str) -> &'static str {
        parse(text).unwrap_err().code
    }

    #[test]
    fn frames_parse_to_what_the_socket_acts_on() {
        assert!(matches!(parse(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping)));
        let Ok(ClientFrame::Message(m)) = parse(
            r#"{"type":"message","content":"hi","images":["aGk="],"files":null,"client_message_id":"c1","multitask":"interrupt"}"#,
        ) else {
            panic!("a message frame");
        };
        assert_eq!(m.content, "hi");
        assert_eq!(m.images, ["aGk="]);
        assert!(m.files.is_empty());
        assert_eq!(m.client_message_id.as_deref(), Some("c1"));
        assert_eq!(m.multitask, Some(Multitask::Interrupt));
        assert!(matches!(
            parse(r#"{"type":"cancel","run_id":"r"}"#),
            Ok(ClientFrame::Cancel { run_id: Some(r) }) if r == "r"
        ));
        assert!(matches!(
            parse(r#"{"type":"reply","request_id":"q","content":"a"}"#),
            Ok(ClientFrame::Reply { request_id, content }) if request_id == "q" && content == "a"
        ));
    }

    #[test]
    fn approval_frames_carry_a_decision() {
        assert!(matches!(
            parse(r#"{"type":"approval","request_id":"q","decision":"allow"}"#),
            Ok(ClientFrame::Approval { request_id, decision: Decision { allow: true, reason: None } }) if request_id == "q"
        ));
        assert!(matches!(
            parse(r#"{"type":"approval","request_id":"q","decision":"deny","reason":"no"}"#),
            Ok(ClientFrame::Approval { decision: Decision { allow: false, reason: Some(r) }, .. }) if r == "no"
        ));
        assert_eq!(
            code(r#"{"type":"approval","request_id":"q"}"#),
            "missing_field"
        );
        assert_eq!(
            code(r#"{"type":"approval","decision":"allow"}"#),
            "missing_field"
        );
        assert_eq!(
            code(r#"{"type":"approval","request_id":"q","decision":"yes"}"#),
            "invalid_frame"
        );
        assert_eq!(
            code(r#"{"type":"approval","request_id":"q","decision":"deny","reason":1}"#),
            "invalid_frame"
        );
    }

    #[test]
    fn refusals_keep_their_codes() {
        assert_eq!(code("{oops"), "invalid_json");
        assert_eq!(code("[]"), "missing_field");
        assert_eq!(code(r#"{"type":"message"}"#), "missing_field");
        assert_eq!(
            code(r#"{"type":"reply","request_id":"q"}"#),
            "missing_field"
        );
        assert_eq!(code(r#"{"type":"nope"}"#), "unknown_type");
        assert_eq!(
            code(r#"{"type":"message","content":"x","multitask":"later"}"#),
            "invalid_frame"
        );
        assert_eq!(
            parse(r#"{"type":"message","content":"x","files":[1]}"#).unwrap_err(),
            FrameError::new("invalid_frame", "`files` must be an array of strings")
        );
    }
}
