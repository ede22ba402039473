//! navi's client frame (`agentd_server::navi::frame::parse`, what its handler sends).
#![no_main]

use agentd_server::navi::frame::parse;
use agentd_server::navi::{EXPECTED_MESSAGE, INVALID_JSON};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Err(message) => assert!(
            [
                INVALID_JSON,
                EXPECTED_MESSAGE,
                "`images` must be a list of strings",
                "`files` must be a list of {name, path} objects",
            ]
            .contains(&message.as_str()),
            "unexpected refusal {message}"
        ),
        Ok(send) => {
            // The seed's rule: a message has non-empty content; files are noted in it, never sent as ids.
            assert!(!send.content.is_empty());
            assert!(send.files.is_empty());
            assert!(send.content.len() <= text.len() * 2 + 64);
        }
    }
});
