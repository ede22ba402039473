//! agentd-openai: the `openai` provider, for any OpenAI-compatible `/chat/completions` upstream (OpenAI, vLLM,
//! Ollama, llama.cpp server, ...). SPEC.md section 2, "The openai provider", is the contract.
//!
//! A tour:
//! - `provider`: [`OpenAiProvider`] and [`OpenAiSettings`]; the HTTP call and how failures map to
//!   `ProviderError` (non-2xx -> `Status`, refused/broken -> `Connect`, silence -> `Timeout`).
//! - `http1`: the HTTP/1.1 client for plain `http://` upstreams, which reads the socket on the run's own task
//!   (one read, however many tokens it brings, is one step; reqwest serves the rest).
//! - `wire`: the request body (serialised borrowing from the core's `ModelRequest`) and the stream chunk
//!   (deserialised borrowing from the `data:` line).
//! - `sse`: an incremental server-sent-events decoder.
//! - `stream`: the response body as a stream of `ModelEvent`s: deltas as they come, tool calls assembled from
//!   their fragments, usage at the end, the idle timeout between chunks.
//!
//! Invariant: the API key only ever lives in a sensitive header value; nothing here logs or formats it.

/// For the fuzz targets in `fuzz/` only.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod http1;
mod provider;
mod sse;
mod stream;
mod wire;

pub use provider::{OpenAiProvider, OpenAiSettings};
