//! The `openai` provider's upstream stream: the SSE decoder (`sse.rs`) and the body -> `ModelEvent` stream
//! (`stream.rs`: JSON chunks, tool-call assembly, `[DONE]`/`finish_reason`, usage).
//!
//! Input: one byte choosing how the body is cut into network chunks, then the body. Besides "no panic, bounded
//! memory", both layers must give the same result whatever the chunk boundaries.
#![no_main]

use agentd_openai::fuzzing::{model_events, sse_events};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// The body cut into pieces of two alternating sizes (1..=8 and 1..=32 bytes) chosen by `pattern`.
fn pieces(body: &[u8], pattern: u8) -> Vec<&[u8]> {
    let sizes = [1 + (pattern & 7) as usize, 1 + (pattern >> 3) as usize];
    let mut out = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % 2].min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
        i += 1;
    }
    out
}

/// Events larger than this are refused by the small-limit decoder below.
const SMALL_LIMIT: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&pattern, body)) = data.split_first() else {
        return;
    };
    let cut = pieces(body, pattern);

    // The decoder, with a limit no input reaches: chunking changes nothing.
    let whole = sse_events(&[body], 1 << 20);
    assert_eq!(sse_events(&cut, 1 << 20), whole);
    // With a small limit: an error, never a larger event.
    let (events, _) = sse_events(&cut, SMALL_LIMIT);
    for e in &events {
        assert!(e.len() <= SMALL_LIMIT, "an event of {} bytes", e.len());
    }

    // The provider's stream: chunking changes nothing either.
    let whole = model_events(vec![Bytes::copy_from_slice(body)]);
    let split = model_events(cut.iter().map(|p| Bytes::copy_from_slice(p)).collect());
    assert_eq!(split, whole);
});
