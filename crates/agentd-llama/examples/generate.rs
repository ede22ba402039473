//! A manual check of the `llama` provider: streams one reply (or tool call) to stdout and reports speed.
//!
//! ```text
//! cargo run -p agentd-llama --example generate -- [--tools] [--required] [--greedy] [--ignore-eos] [--max N]
//!     [--threads N] "your prompt"
//! ```
//! Uses the default model under `models/` (fetch it with `scripts/fetch-model.sh`), or `AGENTD_MODEL` if set.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use agentd_core::provider::{ModelEvent, ModelMessage, ModelRequest, ToolSpec};
use agentd_llama::{GenerateOptions, LlamaProvider, LlamaSettings, ToolChoice};
use futures_util::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let mut tools = false;
    let mut threads = 2;
    let mut options = GenerateOptions::default();
    let mut prompt = String::from("Tell me a short fact about the sea.");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tools" => tools = true,
            "--required" => options.tool_choice = ToolChoice::Required,
            "--greedy" => options.temperature = 0.0,
            "--ignore-eos" => options.ignore_eos = true,
            "--max" => options.max_tokens = args.next().and_then(|n| n.parse().ok()),
            "--threads" => threads = args.next().and_then(|n| n.parse().ok()).unwrap_or(threads),
            _ => prompt = arg,
        }
    }
    let model_path = std::env::var_os("AGENTD_MODEL").map_or_else(
        || PathBuf::from(agentd_llama::DEFAULT_MODEL_PATH),
        PathBuf::from,
    );

    let started = Instant::now();
    let provider = LlamaProvider::load(LlamaSettings {
        model_path,
        context_tokens: 4096,
        threads,
        parallel: 1,
    })?;
    eprintln!("[loaded in {:.2?}]", started.elapsed());

    let tools = if tools {
        vec![ToolSpec {
            name: "calculator".into(),
            description: "Evaluates an arithmetic expression.".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"]
            }),
        }]
    } else {
        vec![]
    };
    let request = ModelRequest {
        model: "local".into(),
        messages: vec![ModelMessage::User {
            content: prompt,
            images: vec![],
        }],
        tools,
    };

    let started = Instant::now();
    let mut first_token = None;
    let mut stream = provider
        .stream_with(request, options)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(event) = stream.next().await {
        match event.map_err(|e| e.to_string())? {
            ModelEvent::Text(text) => {
                first_token.get_or_insert_with(|| started.elapsed());
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            ModelEvent::ToolCall(call) => {
                println!("\n[tool call {} {} {}]", call.id, call.name, call.arguments)
            }
            ModelEvent::Usage(usage) => {
                let total = started.elapsed();
                let first = first_token.unwrap_or(total);
                // Time to first text is dominated by prompt processing (plus one sampled token); the rest is
                // generation. Close enough to llama-bench's pp/tg split for a comparison.
                let gen_tokens = usage.completion_tokens.saturating_sub(1) as f64;
                let gen_secs = (total - first).as_secs_f64();
                println!();
                eprintln!(
                    "[prompt {} tokens, completion {} tokens; first text after {:.2?} ({:.1} prompt tokens/s); \
                     generation {:.1} tokens/s; total {:.2?}]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    first,
                    usage.prompt_tokens as f64 / first.as_secs_f64(),
                    if gen_secs > 0.0 { gen_tokens / gen_secs } else { 0.0 },
                    total,
                );
            }
            ModelEvent::Thinking(text) => print!("{text}"),
        }
    }
    Ok(())
}
