//! The mock upstream as a process (`agentd-mock-upstream`, what the OpenAI SDK tests in `tests/openai/` run):
//! it prints where it listens and answers a chat completion there. Also makes `cargo test` build it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test]
async fn the_mock_binary_listens_and_answers() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentd-mock-upstream"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the mock binary");
    let stdout = child.stdout.take().expect("its stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read its first line");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    let body = serde_json::json!({
        "model": "m", "stream": true,
        "messages": [{"role": "user", "content": "hello mock"}],
    });
    let text = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("echo:"), "{text}");
    assert!(text.contains("[DONE]"), "{text}");
}
