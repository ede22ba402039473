//! `agentd chat`: the terminal client (built in its own change).

/// Options of `agentd chat`.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub url: String,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub api_key: Option<String>,
}

/// Runs the terminal client; returns the process exit code.
pub async fn run(_opts: ChatOptions) -> i32 {
    eprintln!("agentd chat is not available in this build yet");
    2
}
