//! agentd-testkit: what agentd's tests (and the benchmark) run against.
//!
//! - [`MockUpstream`] (in `upstream`): an OpenAI-compatible `/v1/chat/completions` server on a real loopback
//!   socket. It records requests, plays scripted [`Reply`]s in order, and otherwise follows directives in the
//!   last user message (`tokens=N`, `delay_ms=D`, `status=NNN`, `calc: EXPR`, `hang`, `malformed`, `think`; see
//!   the `reply` module).
//! - `reply`: the [`Reply`] script and the directive parser.
//! - `chunks`: the SSE bytes of a reply, formatted before the stream starts so serving is cheap under load.
//!
//! ```no_run
//! # async fn demo() {
//! use agentd_testkit::{MockUpstream, Reply};
//! let mock = MockUpstream::start().await;
//! mock.push(Reply::tool_call("call_1", "calculator", r#"{"expression":"6*7"}"#));
//! // Point a client at mock.base_url(): the first call gets the tool call, the next ones follow directives.
//! assert!(mock.requests().is_empty());
//! # }
//! ```

mod chunks;
mod reply;
mod upstream;

pub use reply::{error_body, split_words, MockToolCall, ReasoningField, Reply, THINKING};
pub use upstream::{MockOptions, MockUpstream};
