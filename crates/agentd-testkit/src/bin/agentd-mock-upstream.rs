//! The mock upstream as a process, for tests that are not written in Rust (the OpenAI SDK tests in
//! `tests/openai/`): binds `127.0.0.1:0`, prints `listening on http://ADDR/v1` and serves (following the
//! directives of `agentd_testkit`'s `reply` module) until it is killed.

use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mock = agentd_testkit::MockUpstream::start().await;
    println!("listening on {}", mock.base_url());
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
}
