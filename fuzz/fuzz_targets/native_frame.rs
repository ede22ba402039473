//! The native WebSocket's client frames (`agentd_server::native::frame::parse`, what `ws.rs` acts on).
//! A text frame is UTF-8 (the WebSocket layer refuses anything else before the handler sees it).
#![no_main]

use agentd_server::native::frame::{parse, ClientFrame};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// Every code an error frame of the native socket may carry for a frame it cannot act on.
const CODES: &[&str] = &[
    "invalid_json",
    "missing_field",
    "unknown_type",
    "invalid_frame",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Err(e) => {
            assert!(CODES.contains(&e.code), "unexpected code {}", e.code);
            assert!(!e.message.is_empty());
        }
        Ok(ClientFrame::Message(m)) => {
            // What was read is what the client sent: the same message written back parses to the same fields.
            let again = json!({
                "type": "message",
                "content": m.content,
                "images": m.images,
                "files": m.files,
                "client_message_id": m.client_message_id,
            });
            let Ok(ClientFrame::Message(n)) = parse(&again.to_string()) else {
                panic!("a message written back does not parse: {again}");
            };
            assert_eq!(
                (&n.content, &n.images, &n.files, &n.client_message_id),
                (&m.content, &m.images, &m.files, &m.client_message_id)
            );
            let v: Value = serde_json::from_str(text).expect("parsed above");
            assert_eq!(v["content"].as_str(), Some(m.content.as_str()));
        }
        Ok(ClientFrame::Reply {
            request_id,
            content,
        }) => {
            let v: Value = serde_json::from_str(text).expect("parsed above");
            assert_eq!(v["request_id"].as_str(), Some(request_id.as_str()));
            assert_eq!(v["content"].as_str(), Some(content.as_str()));
        }
        Ok(ClientFrame::Approval {
            request_id,
            decision,
        }) => {
            let v: Value = serde_json::from_str(text).expect("parsed above");
            assert_eq!(v["request_id"].as_str(), Some(request_id.as_str()));
            let word = if decision.allow { "allow" } else { "deny" };
            assert_eq!(v["decision"].as_str(), Some(word));
            assert_eq!(v["reason"].as_str(), decision.reason.as_deref());
        }
        Ok(ClientFrame::Ping | ClientFrame::Cancel { .. }) => {}
    }
});
