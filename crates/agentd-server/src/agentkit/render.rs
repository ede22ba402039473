//! Internal events -> agentkit WebSocket frames (the seed's `_handle_chat_message` and its docstring).
//!
//! | event | frame |
//! | --- | --- |
//! | `text_delta` | `{"type":"token","content":delta}` |
//! | `thinking_end` | `step {event_type:"thought", step, data:{content: the step's whole thinking}}` |
//! | `tool_started` | `step {event_type:"action", step, data:{tool, args, call_id}}` |
//! | `tool_finished` | `step {event_type:"observation", step (the action's), data:{tool, call_id, result, success}}` |
//! | `context_compressed` | `step {event_type:"context_compressed", step, data:{messages_before, messages_after}}` |
//! | `skill_matched` | `{"type":"skill_match","data":{skill, method, confidence}}` |
//! | `input_requested` | `{"type":"ask_human","question","request_id"}` |
//! | `approval_requested` | `{"type":"ask_human","question":"Allow TOOL with ARGS? (yes/no)","request_id"}` (a reply of `yes`, `y` or `allow` approves, anything else denies) |
//! | `run_finished` completed | `{"type":"final_answer","content"}` |
//! | `run_finished` cancelled | `{"type":"result","data":{"status":"cancelled"}}` |
//! | `run_finished` failed / interrupted | `{"type":"error","data":{"message"}}` (cut at 200 chars, as the seed) |
//!
//! Nothing else is sent: not the stored `message`s, `run_started`, `thinking_delta` (a thought goes out whole)
//! or `input_received`, and no subagent event (their steps count from 1 again and no frame can say whose they
//! are). `step` counts the turn's model calls from 1. Compression happens before a model call, so its step is
//! one past the last tool round seen in the run: the only state a connection keeps.

use agentd_core::domain::RunStatus;
use agentd_core::event::{Event, EventKind, LoggedEvent};
use serde_json::{json, Value};

use crate::relay::{self, Render};

/// The seed cut error messages longer than this many characters (and appended `...`).
const MAX_ERROR_CHARS: usize = 200;

/// Per-connection rendering state.
#[derive(Debug, Default)]
pub struct AgentkitRender {
    /// The run whose events are being rendered.
    run_id: String,
    /// The step of the run's latest tool round (0 before any).
    last_tool_step: u32,
}

/// `{"type":"step","data":{event_type, step, data}}`.
fn step(event_type: &str, step: u32, data: Value) -> Value {
    json!({"type": "step", "data": {"event_type": event_type, "step": step, "data": data}})
}

/// `{"type":"error","data":{"message"}}`.
pub fn error_frame(message: &str) -> Value {
    json!({"type": "error", "data": {"message": message}})
}

/// The `result` frame that follows a `cancel`.
pub fn cancelled_frame() -> Value {
    json!({"type": "result", "data": {"status": "cancelled"}})
}

/// The seed's truncation of error text shown to users.
fn truncate(message: &str) -> String {
    match message.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => format!("{}...", &message[..cut]),
        None => message.to_string(),
    }
}

impl AgentkitRender {
    /// The frames one event becomes.
    pub fn frames(&mut self, ev: &Event) -> Vec<Value> {
        if ev.run_id != self.run_id {
            self.run_id.clone_from(&ev.run_id);
            self.last_tool_step = 0;
        }
        if ev.is_subagent {
            return Vec::new();
        }
        let frame = match &ev.kind {
            EventKind::TextDelta { delta } => json!({"type": "token", "content": delta}),
            EventKind::ThinkingEnd { step: n, thinking } => {
                step("thought", *n, json!({"content": thinking}))
            }
            EventKind::ToolStarted {
                call_id,
                tool,
                args,
                step: n,
            } => {
                self.last_tool_step = self.last_tool_step.max(*n);
                step(
                    "action",
                    *n,
                    json!({"tool": tool, "args": args, "call_id": call_id}),
                )
            }
            EventKind::ToolFinished {
                call_id,
                tool,
                result,
                success,
                step: n,
                ..
            } => {
                self.last_tool_step = self.last_tool_step.max(*n);
                step(
                    "observation",
                    *n,
                    json!({"tool": tool, "call_id": call_id, "result": result, "success": success}),
                )
            }
            EventKind::ContextCompressed {
                messages_before,
                messages_after,
                ..
            } => step(
                "context_compressed",
                self.last_tool_step + 1,
                json!({"messages_before": messages_before, "messages_after": messages_after}),
            ),
            EventKind::SkillMatched {
                skill,
                method,
                confidence,
            } => json!({
                "type": "skill_match",
                "data": {"skill": skill, "method": method, "confidence": confidence},
            }),
            EventKind::InputRequested {
                request_id,
                question,
            } => json!({"type": "ask_human", "question": question, "request_id": request_id}),
            EventKind::ApprovalRequested {
                request_id,
                tool,
                args,
                ..
            } => json!({
                "type": "ask_human",
                "question": format!("Allow {tool} with {args}? (yes/no)"),
                "request_id": request_id,
            }),
            EventKind::RunFinished { run, content, .. } => match run.status {
                RunStatus::Completed => json!({"type": "final_answer", "content": content}),
                RunStatus::Cancelled => cancelled_frame(),
                RunStatus::Failed | RunStatus::Interrupted => {
                    let message = run
                        .error
                        .as_ref()
                        .map(|e| e.message.as_str())
                        .unwrap_or("the run failed");
                    error_frame(&truncate(message))
                }
                RunStatus::Queued | RunStatus::Running | RunStatus::WaitingInput => {
                    return Vec::new()
                }
            },
            EventKind::Message { .. }
            | EventKind::RunStarted { .. }
            | EventKind::RunResumed { .. }
            | EventKind::ThinkingDelta { .. }
            | EventKind::InputReceived { .. }
            | EventKind::ApprovalResolved { .. } => return Vec::new(),
        };
        vec![frame]
    }
}

impl Render for AgentkitRender {
    fn render(&mut self, event: &LoggedEvent, out: &mut Vec<String>) {
        // The fast path only within a run this renderer has seen start (its step state is current).
        let fast = (event.event.run_id == self.run_id)
            .then(|| relay::text_delta_frame(&event.event, "token", "content"))
            .flatten();
        match fast {
            Some(frame) => out.push(frame),
            None => out.extend(self.frames(&event.event).iter().map(Value::to_string)),
        }
    }

    fn failure(&self, message: &str) -> String {
        error_frame(message).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_core::domain::{Run, RunError, RunErrorCode};

    fn ev(run_id: &str, is_subagent: bool, kind: EventKind) -> Event {
        Event {
            seq: 1,
            run_id: run_id.into(),
            agent: "assistant".into(),
            is_subagent,
            kind,
        }
    }

    fn finished(status: RunStatus, error: Option<&str>) -> EventKind {
        let mut run = Run::queued("s");
        run.status = status;
        run.error = error.map(|m| RunError {
            code: RunErrorCode::UpstreamError,
            message: m.into(),
        });
        EventKind::RunFinished {
            run,
            content: "answer".into(),
            context_tokens: 1,
            max_context_tokens: 2,
        }
    }

    #[test]
    fn events_become_the_seed_frames() {
        let mut r = AgentkitRender::default();
        let one = |r: &mut AgentkitRender, kind| r.frames(&ev("r1", false, kind));
        assert_eq!(
            one(&mut r, EventKind::TextDelta { delta: "hi".into() }),
            [json!({"type": "token", "content": "hi"})]
        );
        assert_eq!(
            one(
                &mut r,
                EventKind::ThinkingEnd {
                    step: 1,
                    thinking: "hmm".into()
                }
            ),
            [
                json!({"type": "step", "data": {"event_type": "thought", "step": 1, "data": {"content": "hmm"}}})
            ]
        );
        assert_eq!(
            one(
                &mut r,
                EventKind::ToolStarted {
                    call_id: "c".into(),
                    tool: "calculator".into(),
                    args: json!({"expression": "1+1"}),
                    step: 2
                }
            ),
            [
                json!({"type": "step", "data": {"event_type": "action", "step": 2,
                "data": {"tool": "calculator", "args": {"expression": "1+1"}, "call_id": "c"}}})
            ]
        );
        assert_eq!(
            one(
                &mut r,
                EventKind::ContextCompressed {
                    messages_before: 5,
                    messages_after: 1,
                    method: "summary".into()
                }
            ),
            [
                json!({"type": "step", "data": {"event_type": "context_compressed", "step": 3,
                "data": {"messages_before": 5, "messages_after": 1}}})
            ]
        );
        assert_eq!(
            one(&mut r, finished(RunStatus::Completed, None)),
            [json!({"type": "final_answer", "content": "answer"})]
        );
        assert_eq!(
            one(&mut r, finished(RunStatus::Cancelled, None)),
            [json!({"type": "result", "data": {"status": "cancelled"}})]
        );
        let long = "x".repeat(300);
        let err = one(&mut r, finished(RunStatus::Failed, Some(&long)));
        assert_eq!(err[0]["data"]["message"], format!("{}...", "x".repeat(200)));
        assert!(one(&mut r, EventKind::TextDelta { delta: "".into() }).len() == 1);
        assert!(r
            .frames(&ev("r1", true, EventKind::TextDelta { delta: "x".into() }))
            .is_empty());
    }

    #[test]
    fn compression_step_restarts_with_each_run() {
        let mut r = AgentkitRender::default();
        r.frames(&ev(
            "r1",
            false,
            EventKind::ToolStarted {
                call_id: "c".into(),
                tool: "t".into(),
                args: json!({}),
                step: 4,
            },
        ));
        let f = r.frames(&ev(
            "r2",
            false,
            EventKind::ContextCompressed {
                messages_before: 2,
                messages_after: 1,
                method: "summary".into(),
            },
        ));
        assert_eq!(f[0]["data"]["step"], 1);
    }
}
