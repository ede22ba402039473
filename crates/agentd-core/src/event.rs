//! The one internal event model. Every surface (native, agentkit, navi) renders these and nothing else.
//!
//! An [`Event`] is what sits in a session's log: a `seq` (per session, from 1, no gaps), the run it belongs to,
//! who caused it, and an [`EventKind`]. Its JSON form is exactly the native WebSocket/SSE frame of SPEC.md
//! section 4, and it is also the form the log stores, so an event is serialised once, on append.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{Message, Run};

/// What happened. Field names follow SPEC.md section 4. `step` fields (the turn's model-call number, from 1)
/// are extra: the agentkit dialect needs them and they cost nothing to carry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A stored message: the user's message, each assistant message, each tool result.
    Message {
        message: Message,
    },
    RunStarted {
        run: Run,
    },
    /// A run that a dead process (or a lost node) left unfinished goes on from its last durable step (SPEC.md
    /// section 4, recovery). The run's `text_delta` and `thinking_delta` events with `seq >= discard_from_seq`
    /// (the interrupted model call's) are superseded; every other event stands.
    RunResumed {
        run: Run,
        node: String,
        attempt: u32,
        discard_from_seq: u64,
    },
    SkillMatched {
        skill: String,
        method: String,
        confidence: f64,
    },
    ThinkingDelta {
        delta: String,
        step: u32,
    },
    /// The end of one model call's thinking; `thinking` is all of it, for dialects that send it whole.
    ThinkingEnd {
        step: u32,
        thinking: String,
    },
    TextDelta {
        delta: String,
    },
    ToolStarted {
        call_id: String,
        tool: String,
        args: Value,
        step: u32,
    },
    ToolFinished {
        call_id: String,
        tool: String,
        args: Value,
        result: String,
        success: bool,
        step: u32,
    },
    InputRequested {
        request_id: String,
        question: String,
    },
    InputReceived {
        request_id: String,
    },
    /// A call of a tool matching the agent's `approve` list waits for a decision (SPEC.md section 7).
    ApprovalRequested {
        request_id: String,
        call_id: String,
        tool: String,
        args: Value,
    },
    /// `decision` is `allow` or `deny` (a request unanswered in time is denied, with a reason saying so).
    ApprovalResolved {
        request_id: String,
        decision: String,
        reason: Option<String>,
    },
    ContextCompressed {
        messages_before: usize,
        messages_after: usize,
        /// How it was done: `summary`, or `truncation` when the summary call failed.
        method: String,
    },
    RunFinished {
        run: Run,
        content: String,
        context_tokens: u64,
        max_context_tokens: u64,
    },
}

impl EventKind {
    /// The wire name of the event type (the `type` field).
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Message { .. } => "message",
            EventKind::RunStarted { .. } => "run_started",
            EventKind::RunResumed { .. } => "run_resumed",
            EventKind::SkillMatched { .. } => "skill_matched",
            EventKind::ThinkingDelta { .. } => "thinking_delta",
            EventKind::ThinkingEnd { .. } => "thinking_end",
            EventKind::TextDelta { .. } => "text_delta",
            EventKind::ToolStarted { .. } => "tool_started",
            EventKind::ToolFinished { .. } => "tool_finished",
            EventKind::InputRequested { .. } => "input_requested",
            EventKind::InputReceived { .. } => "input_received",
            EventKind::ApprovalRequested { .. } => "approval_requested",
            EventKind::ApprovalResolved { .. } => "approval_resolved",
            EventKind::ContextCompressed { .. } => "context_compressed",
            EventKind::RunFinished { .. } => "run_finished",
        }
    }

    /// Does appending this event also store a row: the message it carries, or its run?
    pub fn changes_rows(&self) -> bool {
        matches!(
            self,
            EventKind::Message { .. }
                | EventKind::RunStarted { .. }
                | EventKind::RunResumed { .. }
                | EventKind::RunFinished { .. }
        )
    }
}

/// An event before the log has given it a `seq`.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub session_id: String,
    pub run_id: String,
    /// The agent that caused it: the session's agent, or a subagent's name.
    pub agent: String,
    pub is_subagent: bool,
    pub kind: EventKind,
}

/// An event as it sits in the log, and as the native surfaces send it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub run_id: String,
    pub agent: String,
    pub is_subagent: bool,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// An appended event, shared by every subscriber: the typed event plus its JSON, serialised once.
#[derive(Debug)]
pub struct LoggedEvent {
    pub session_id: String,
    pub event: Event,
    /// `serde_json::to_string(&event)`: the native frame and the stored payload.
    pub json: String,
}

impl LoggedEvent {
    /// Builds the shared form of an event, serialising it once.
    pub fn new(session_id: String, event: Event) -> LoggedEvent {
        // Serialising these plain data types cannot fail (no maps with non-string keys, no custom impls).
        let json = serde_json::to_string(&event).unwrap_or_else(|_| String::from("{}"));
        LoggedEvent {
            session_id,
            event,
            json,
        }
    }

    /// Rebuilds an event from its stored JSON.
    pub fn from_json(session_id: String, json: String) -> Result<LoggedEvent, serde_json::Error> {
        let event: Event = serde_json::from_str(&json)?;
        Ok(LoggedEvent {
            session_id,
            event,
            json,
        })
    }

    pub fn seq(&self) -> u64 {
        self.event.seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_json_has_flat_type_and_round_trips() {
        let ev = Event {
            seq: 7,
            run_id: "r1".into(),
            agent: "assistant".into(),
            is_subagent: false,
            kind: EventKind::TextDelta { delta: "hi".into() },
        };
        let logged = LoggedEvent::new("s1".into(), ev.clone());
        let v: Value = serde_json::from_str(&logged.json).unwrap();
        assert_eq!(v["type"], "text_delta");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["delta"], "hi");
        assert_eq!(v["is_subagent"], false);
        let back = LoggedEvent::from_json("s1".into(), logged.json.clone()).unwrap();
        assert_eq!(back.event, ev);
    }
}
