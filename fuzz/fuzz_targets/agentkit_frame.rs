//! agentkit's client frames (`agentd_server::agentkit::frame::parse`, what its `ws.rs` acts on).
#![no_main]

use agentd_server::agentkit::frame::{parse, ClientFrame};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse(text);
    let v: Option<Value> = serde_json::from_str(text).ok();
    match parsed {
        // The one refusal: a `message` whose content is not a string.
        Err(e) => {
            assert_eq!(e.0, "`content` must be a string");
            let v = v.expect("a refused frame is JSON");
            assert_eq!(v["type"], "message");
        }
        Ok(None) => {}
        Ok(Some(frame)) => {
            let v = v.expect("an accepted frame is JSON");
            match frame {
                ClientFrame::Message { content } => {
                    assert_eq!(v["content"].as_str().unwrap_or(""), content)
                }
                ClientFrame::Reply {
                    request_id,
                    content,
                } => {
                    assert_eq!(v["request_id"].as_str(), Some(request_id.as_str()));
                    if let Some(s) = v["content"].as_str() {
                        assert_eq!(s, content);
                    }
                }
                ClientFrame::Cancel => assert_eq!(v["type"], "cancel"),
                ClientFrame::Ping => assert_eq!(v["type"], "ping"),
            }
        }
    }
});
