//! agentd-bench: the benchmark harness that measures agentd against the Python peer and the lean floor.
//!
//! A tour of the crate:
//! - [`mock`]: a lean OpenAI-compatible streaming upstream; every server under test talks to the same one.
//! - [`stamp`]: the token text the mock streams (`t<index>@<unix_micros> `) and its parser, which gives the
//!   load generator each token's index (missed/duplicated checks) and emit time (added latency).
//! - [`client`]: targets, session creation, WebSocket connections, navi and native frames as one event type.
//! - [`scenario`]: the four scenarios (throughput, latency, idle connections, re-attach) against one target.
//! - [`procfs`]: CPU seconds and RSS of a process tree from `/proc`.
//! - [`servers`]: building and starting the peer, the floor and agentd, pinned to a CPU.
//! - [`report`]: the results model, the markdown table and the goals check.
//! - [`plot`]: the PNG (throughput and p99 latency against concurrency).
//! - [`pg`]: agentd on PostgreSQL: a fresh database per run, its settings, PostgreSQL's own CPU.
//! - [`orchestrate`]: the `run` command: mock, servers, scenarios in alternation, outputs.
//! - [`llama`]: the `llama` command: the embedded model through agentd's WebSocket vs llama.cpp's llama-bench.
//! - [`soak`]: the `soak` command: many sessions, reconnecting clients, cancels, `ask_human` and kill -9
//!   restarts against the real binary; every client's stream checked against the log, memory sampled.
//!
//! The invariant the figures rest on: the server under test is the only process on its CPU (CPU 0); the
//! mock and the load generator share the other one, and their own CPU use is reported beside every figure so
//! a reader can see they were not the bottleneck.

pub mod client;
pub mod cluster;
pub mod llama;
pub mod mock;
pub mod orchestrate;
pub mod pg;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod servers;
pub mod soak;
pub mod stamp;
pub mod stats;
pub mod surfaces;

use std::fmt;

/// The harness's one error type: a message for the operator. Every failure here ends up as text in a
/// results cell or on stderr, so there is nothing for a caller to match on.
#[derive(Debug, Clone)]
pub struct Error(pub String);

impl Error {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

macro_rules! from_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Self(e.to_string())
            }
        }
    )*};
}
from_error!(
    std::io::Error,
    reqwest::Error,
    serde_json::Error,
    tokio_tungstenite::tungstenite::Error,
    std::fmt::Error
);

/// Result with the harness's error.
pub type Result<T> = std::result::Result<T, Error>;
