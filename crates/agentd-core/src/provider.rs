//! The model-provider seam. `openai` (crate `agentd-openai`), `llama` (crate `agentd-llama`) and
//! [`scripted`](crate::scripted) implement [`Provider`]. The agent loop knows nothing else about models.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde_json::Value;

use crate::domain::{ToolCall, Usage};

/// One message of a model call's prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelMessage {
    System {
        content: String,
    },
    /// `images` are data URLs (`data:image/png;base64,...`), sent as image parts.
    User {
        content: String,
        images: Vec<String>,
    },
    Assistant {
        content: String,
        tool_calls: Vec<ToolCall>,
    },
    /// `images` are data URLs a tool returned (an MCP server's image parts); a provider whose model can see
    /// images shows them, others read `content`, which names them.
    Tool {
        tool_call_id: String,
        content: String,
        images: Vec<String>,
    },
}

impl ModelMessage {
    pub fn is_system(&self) -> bool {
        matches!(self, ModelMessage::System { .. })
    }
    /// The text of the message, for estimates and summaries.
    pub fn text(&self) -> &str {
        match self {
            ModelMessage::System { content }
            | ModelMessage::User { content, .. }
            | ModelMessage::Assistant { content, .. }
            | ModelMessage::Tool { content, .. } => content,
        }
    }
}

/// A tool as the model sees it: an OpenAI function definition.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// One model call.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRequest {
    pub model: String,
    pub messages: Vec<ModelMessage>,
    pub tools: Vec<ToolSpec>,
}

/// What a model call streams back. Tool calls arrive whole (a provider assembles argument fragments).
#[derive(Clone, Debug, PartialEq)]
pub enum ModelEvent {
    Text(String),
    Thinking(String),
    ToolCall(ToolCall),
    Usage(Usage),
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum ProviderError {
    /// The upstream answered with a non-2xx status.
    #[error("upstream returned HTTP {status}: {body}")]
    Status { status: u16, body: String },
    /// Could not connect or the connection broke.
    #[error("upstream connection failed: {0}")]
    Connect(String),
    #[error("upstream timed out after {0} s")]
    Timeout(u64),
    #[error("malformed upstream stream: {0}")]
    Malformed(String),
    /// The prompt does not fit the model's context.
    #[error("context overflow: {0}")]
    ContextOverflow(String),
    #[error("{0}")]
    Other(String),
}

pub type ModelStream = BoxStream<'static, Result<ModelEvent, ProviderError>>;

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Starts a streaming model call. Dropping the stream abandons the call (that is how cancel reaches it).
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError>;

    /// The model's context window in tokens, when the provider knows it.
    fn context_tokens(&self) -> Option<u64> {
        None
    }
}
