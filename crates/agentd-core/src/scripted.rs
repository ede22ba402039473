//! A scripted provider for unit tests of the agent loop: each model call takes the next scripted reply.
//! Integration tests use a real OpenAI-compatible upstream over HTTP instead.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};

use crate::domain::{ToolCall, Usage};
use crate::provider::{ModelEvent, ModelRequest, ModelStream, Provider, ProviderError};

/// One scripted model reply.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Stream these events, with `delay` between them.
    Events {
        events: Vec<ModelEvent>,
        delay: Duration,
    },
    /// Fail before streaming.
    Fail(ProviderError),
    /// Never answer (until dropped).
    Hang,
}

impl Scripted {
    pub fn text(chunks: &[&str]) -> Scripted {
        let mut events: Vec<ModelEvent> = chunks
            .iter()
            .map(|c| ModelEvent::Text(c.to_string()))
            .collect();
        events.push(ModelEvent::Usage(Usage {
            prompt_tokens: 10,
            completion_tokens: chunks.len() as u64,
        }));
        Scripted::Events {
            events,
            delay: Duration::ZERO,
        }
    }
    pub fn slow_text(chunks: &[&str], delay: Duration) -> Scripted {
        match Scripted::text(chunks) {
            Scripted::Events { events, .. } => Scripted::Events { events, delay },
            other => other,
        }
    }
    pub fn tool_calls(calls: &[(&str, &str, &str)]) -> Scripted {
        let mut events: Vec<ModelEvent> = calls
            .iter()
            .map(|(id, name, args)| {
                ModelEvent::ToolCall(ToolCall {
                    id: id.to_string(),
                    name: name.to_string(),
                    arguments: args.to_string(),
                })
            })
            .collect();
        events.push(ModelEvent::Usage(Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
        }));
        Scripted::Events {
            events,
            delay: Duration::ZERO,
        }
    }
}

/// Plays [`Scripted`] replies in order and records every request.
#[derive(Default)]
pub struct ScriptedProvider {
    replies: Mutex<VecDeque<Scripted>>,
    requests: Mutex<Vec<ModelRequest>>,
}

impl ScriptedProvider {
    pub fn new(replies: Vec<Scripted>) -> ScriptedProvider {
        ScriptedProvider {
            replies: Mutex::new(replies.into()),
            requests: Mutex::new(Vec::new()),
        }
    }
    pub fn push(&self, reply: Scripted) {
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(reply);
    }
    /// Every request received so far.
    pub fn requests(&self) -> Vec<ModelRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl Provider for ScriptedProvider {
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request);
        let next = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        match next {
            None => Err(ProviderError::Other(
                "scripted provider has no reply left".into(),
            )),
            Some(Scripted::Fail(e)) => Err(e),
            Some(Scripted::Hang) => Ok(stream::pending().boxed()),
            Some(Scripted::Events { events, delay }) => Ok(stream::iter(events)
                .then(move |e| async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok(e)
                })
                .boxed()),
        }
    }

    fn context_tokens(&self) -> Option<u64> {
        None
    }
}
