//! Entry points for the fuzz targets in `fuzz/` (built only with the `fuzzing` feature): the SSE decoder, and
//! the whole upstream body -> `ModelEvent` stream, fed a body cut into chunks as the network would.

use std::cell::RefCell;

use agentd_core::provider::{ModelEvent, ProviderError};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::sse::SseDecoder;
use crate::stream::{join_deltas, ChunkStream};

/// Decodes `pieces` (one network chunk each, then the end of the stream) into the data of each SSE event, or
/// the decoder's error (with the events before it).
pub fn sse_events(pieces: &[&[u8]], max_event_bytes: usize) -> (Vec<String>, Option<String>) {
    let mut decoder = SseDecoder::new(max_event_bytes);
    let mut events = Vec::new();
    let mut drain = |decoder: &mut SseDecoder| loop {
        match decoder.next_event() {
            Ok(Some(data)) => events.push(data.to_owned()),
            Ok(None) => return None,
            Err(e) => return Some(e.to_string()),
        }
    };
    for piece in pieces {
        decoder.push(piece);
        if let Some(e) = drain(&mut decoder) {
            return (events, Some(e));
        }
    }
    decoder.finish();
    let error = drain(&mut decoder);
    (events, error)
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// What the provider's stream yields for an upstream body arriving in `pieces`, consecutive text (and thinking)
/// deltas joined: the stream joins the deltas of one piece, so where they are cut depends on the chunking, and
/// nothing else may.
pub fn model_events(pieces: Vec<Bytes>) -> Vec<Result<ModelEvent, ProviderError>> {
    join_deltas(stream_events(pieces))
}

fn stream_events(pieces: Vec<Bytes>) -> Vec<Result<ModelEvent, ProviderError>> {
    let body = futures_util::stream::iter(pieces.into_iter().map(Ok));
    // Built inside the runtime: the stream arms its idle timer when created.
    let collect = async move { ChunkStream::new(body, 60).collect::<Vec<_>>().await };
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        if rt.is_none() {
            *rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .ok();
        }
        match rt.as_ref() {
            Some(rt) => rt.block_on(collect),
            None => vec![Err(ProviderError::Other("no tokio runtime".into()))],
        }
    })
}
