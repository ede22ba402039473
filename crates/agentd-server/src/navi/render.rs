//! Internal events -> navi WebSocket frames (the seed's docstring and `_event_to_dict`).
//!
//! | event | frame(s) |
//! | --- | --- |
//! | `run_started` | `{"type":"stream_start"}` |
//! | `thinking_delta` | `{"type":"thinking_delta","delta"}` |
//! | `thinking_end` | `{"type":"thinking_end"}`, then `{"type":"turn_thinking","thinking","is_subagent"}` |
//! | `text_delta` | `{"type":"stream_delta","delta"}` |
//! | `tool_started` | `{"type":"tool_started","tool","args","is_subagent"}` |
//! | `tool_finished` | `{"type":"tool_call","tool","args","result","success","is_subagent"}` |
//! | `context_compressed` | `{"type":"context_compressed","messages_before","messages_after"}` |
//! | `run_finished` completed / cancelled | `{"type":"stream_end","content","context_tokens","max_context_tokens"}` |
//! | `run_finished` failed / interrupted | `{"type":"error","message"}` (the seed sent no `stream_end` then) |
//!
//! Nothing else: navi has no frame for stored `message`s, skills or `ask_human`. A subagent's text and thinking
//! deltas are not sent (`stream_delta` has no subagent flag, and the answer is the concatenation of the
//! deltas); its tools and its `turn_thinking` are, flagged `is_subagent: true`. Every run is bracketed: a run
//! that ends without having started on this connection (cancelled while queued) gets its `stream_start` just
//! before its end, so a client waiting for its answer always sees `stream_start` ... `stream_end`/`error`.

use agentd_core::domain::{RunErrorCode, RunStatus};
use agentd_core::event::{Event, EventKind, LoggedEvent};
use serde_json::{json, Value};

use crate::relay::{self, Render};

/// Per-connection rendering state.
#[derive(Debug, Default)]
pub struct NaviRender {
    /// The run whose `stream_start` this connection has sent and whose end it has not.
    open_run: Option<String>,
}

/// `{"type":"error","message"}`.
pub fn error_frame(message: &str) -> Value {
    json!({"type": "error", "message": message})
}

fn stream_start() -> Value {
    json!({"type": "stream_start"})
}

impl NaviRender {
    /// The frames one event becomes.
    pub fn frames(&mut self, ev: &Event) -> Vec<Value> {
        let sub = ev.is_subagent;
        match &ev.kind {
            // A resumed run starts its answer afresh: the seed's client begins a new answer on `stream_start`,
            // and `stream_end.content` is the whole answer without the superseded text.
            EventKind::RunStarted { .. } | EventKind::RunResumed { .. } => {
                self.open_run = Some(ev.run_id.clone());
                vec![stream_start()]
            }
            EventKind::ThinkingDelta { delta, .. } if !sub => {
                vec![json!({"type": "thinking_delta", "delta": delta})]
            }
            EventKind::ThinkingEnd { thinking, .. } => {
                let turn =
                    json!({"type": "turn_thinking", "thinking": thinking, "is_subagent": sub});
                if sub {
                    vec![turn]
                } else {
                    vec![json!({"type": "thinking_end"}), turn]
                }
            }
            EventKind::TextDelta { delta } if !sub => {
                vec![json!({"type": "stream_delta", "delta": delta})]
            }
            EventKind::ToolStarted { tool, args, .. } => vec![json!({
                "type": "tool_started", "tool": tool, "args": args, "is_subagent": sub,
            })],
            EventKind::ToolFinished {
                tool,
                args,
                result,
                success,
                ..
            } => vec![json!({
                "type": "tool_call", "tool": tool, "args": args, "result": result,
                "success": success, "is_subagent": sub,
            })],
            EventKind::ContextCompressed {
                messages_before,
                messages_after,
                ..
            } => vec![json!({
                "type": "context_compressed",
                "messages_before": messages_before,
                "messages_after": messages_after,
            })],
            EventKind::RunFinished {
                run,
                content,
                context_tokens,
                max_context_tokens,
            } => {
                let end = match run.status {
                    RunStatus::Completed | RunStatus::Cancelled => json!({
                        "type": "stream_end",
                        "content": content,
                        "context_tokens": context_tokens,
                        "max_context_tokens": max_context_tokens,
                    }),
                    RunStatus::Failed | RunStatus::Interrupted => {
                        let message = match &run.error {
                            // The seed's text for an unexpected exception.
                            Some(e) if e.code == RunErrorCode::Internal => {
                                format!("Internal error: {}", e.message)
                            }
                            Some(e) => e.message.clone(),
                            None => "the run failed".into(),
                        };
                        error_frame(&message)
                    }
                    RunStatus::Queued | RunStatus::Running | RunStatus::WaitingInput => {
                        return Vec::new()
                    }
                };
                let opened = self.open_run.take().is_some_and(|r| r == ev.run_id);
                if opened {
                    vec![end]
                } else {
                    vec![stream_start(), end]
                }
            }
            EventKind::Message { .. }
            | EventKind::SkillMatched { .. }
            | EventKind::ThinkingDelta { .. }
            | EventKind::TextDelta { .. }
            | EventKind::InputRequested { .. }
            | EventKind::InputReceived { .. }
            | EventKind::ApprovalRequested { .. }
            | EventKind::ApprovalResolved { .. } => Vec::new(),
        }
    }
}

impl Render for NaviRender {
    fn render(&mut self, event: &LoggedEvent, out: &mut Vec<String>) {
        match relay::text_delta_frame(&event.event, "stream_delta", "delta") {
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
    use agentd_core::domain::{Run, RunError};

    fn ev(run_id: &str, is_subagent: bool, kind: EventKind) -> Event {
        Event {
            seq: 1,
            run_id: run_id.into(),
            agent: "assistant".into(),
            is_subagent,
            kind,
        }
    }

    fn finished(status: RunStatus, error: Option<(RunErrorCode, &str)>) -> EventKind {
        let mut run = Run::queued("s");
        run.status = status;
        run.error = error.map(|(code, m)| RunError {
            code,
            message: m.into(),
        });
        EventKind::RunFinished {
            run,
            content: "done".into(),
            context_tokens: 10,
            max_context_tokens: 100,
        }
    }

    #[test]
    fn a_run_becomes_the_seed_frames() {
        let mut r = NaviRender::default();
        let run = Run::queued("s");
        assert_eq!(
            r.frames(&ev("r1", false, EventKind::RunStarted { run })),
            [json!({"type": "stream_start"})]
        );
        assert_eq!(
            r.frames(&ev(
                "r1",
                false,
                EventKind::ThinkingEnd {
                    step: 1,
                    thinking: "hm".into()
                }
            )),
            [
                json!({"type": "thinking_end"}),
                json!({"type": "turn_thinking", "thinking": "hm", "is_subagent": false})
            ]
        );
        assert!(r
            .frames(&ev("r1", true, EventKind::TextDelta { delta: "x".into() }))
            .is_empty());
        assert_eq!(
            r.frames(&ev(
                "r1",
                true,
                EventKind::ToolStarted {
                    call_id: "c".into(),
                    tool: "t".into(),
                    args: json!({"a": 1}),
                    step: 1
                }
            )),
            [json!({"type": "tool_started", "tool": "t", "args": {"a": 1}, "is_subagent": true})]
        );
        assert_eq!(
            r.frames(&ev("r1", false, finished(RunStatus::Completed, None))),
            [
                json!({"type": "stream_end", "content": "done", "context_tokens": 10, "max_context_tokens": 100})
            ]
        );
    }

    #[test]
    fn failures_are_errors_and_unopened_runs_get_their_start() {
        let mut r = NaviRender::default();
        let f = r.frames(&ev(
            "r2",
            false,
            finished(RunStatus::Failed, Some((RunErrorCode::Internal, "boom"))),
        ));
        assert_eq!(
            f,
            [
                json!({"type": "stream_start"}),
                json!({"type": "error", "message": "Internal error: boom"})
            ]
        );
        let f = r.frames(&ev("r3", false, finished(RunStatus::Cancelled, None)));
        assert_eq!(f[0]["type"], "stream_start");
        assert_eq!(f[1]["type"], "stream_end");
    }
}
