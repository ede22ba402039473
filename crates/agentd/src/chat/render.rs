//! How `agentd chat` prints: events to terminal text, and a session's stored history. Pure functions of their
//! input (plus a little state: which kind of output is in progress), so the tests can check the exact text.
//!
//! The answer's tokens go out as they come. Thinking, tool calls and subagent activity are secondary: dimmed on a
//! terminal, and on their own lines with a plain prefix when the output is not a terminal.

use std::collections::HashMap;

use serde_json::Value;

const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// Longest tool argument or result shown, in characters.
const MAX_TOOL_TEXT: usize = 200;
/// Most lines of a tool call's arguments shown when it asks for approval (the rest is counted).
const MAX_APPROVAL_LINES: usize = 40;
/// Longest line of those arguments, in characters.
const MAX_APPROVAL_LINE: usize = 400;
/// Longest history message shown, in characters.
const MAX_HISTORY_TEXT: usize = 500;
/// How many stored messages a resumed session shows.
pub const HISTORY_SHOWN: usize = 20;

/// What is being printed at the moment: decides whether the next piece needs a line break or a prefix first.
#[derive(Clone, Debug, PartialEq)]
enum Segment {
    None,
    Text,
    Thinking,
    SubText(String),
}

pub struct Renderer {
    color: bool,
    segment: Segment,
    /// True when the cursor is at the start of a line.
    line_start: bool,
    /// The turn's own answer so far (to print `run_finished.content` when nothing was streamed).
    own_text: bool,
    /// The tool of each approval requested and not yet resolved, by request id (`approval_resolved` names none).
    approvals: HashMap<String, String>,
}

impl Renderer {
    pub fn new(color: bool) -> Renderer {
        Renderer {
            color,
            segment: Segment::None,
            line_start: true,
            own_text: false,
            approvals: HashMap::new(),
        }
    }

    fn paint(&self, style: &str, text: &str) -> String {
        if self.color && !text.is_empty() {
            format!("{style}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    pub fn dim(&self, text: &str) -> String {
        self.paint(DIM, text)
    }

    /// A line break if the cursor is mid-line; ends the current segment.
    pub fn break_line(&mut self) -> String {
        self.segment = Segment::None;
        if self.line_start {
            String::new()
        } else {
            self.line_start = true;
            "\n".into()
        }
    }

    /// A whole line of secondary output.
    fn aside(&mut self, text: &str) -> String {
        let mut out = self.break_line();
        out.push_str(&self.dim(text));
        out.push('\n');
        out
    }

    /// Text written mid-stream; tracks whether it ended a line.
    fn stream(&mut self, text: &str, dim: bool) -> String {
        if text.is_empty() {
            return String::new();
        }
        self.line_start = text.ends_with('\n');
        if dim {
            self.dim(text)
        } else {
            text.to_string()
        }
    }

    /// The text to print for one event of the session's log (`message`, `run_started` print nothing here;
    /// user messages are printed by the caller, which knows which ones it sent itself).
    pub fn event(&mut self, ev: &Value) -> String {
        let sub = ev["is_subagent"].as_bool().unwrap_or(false);
        let agent = ev["agent"].as_str().unwrap_or("agent");
        let indent = if sub {
            format!("  [{agent}] ")
        } else {
            String::new()
        };
        match ev["type"].as_str().unwrap_or("") {
            "run_started" => {
                self.own_text = false;
                String::new()
            }
            "text_delta" => {
                let delta = ev["delta"].as_str().unwrap_or("");
                if sub {
                    let mut out = String::new();
                    if self.segment != Segment::SubText(agent.to_string()) {
                        out = self.break_line();
                        out.push_str(&self.dim(&indent));
                        self.segment = Segment::SubText(agent.to_string());
                    }
                    let text = delta.replace('\n', &format!("\n{indent}"));
                    out.push_str(&self.stream(&text, true));
                    out
                } else {
                    let mut out = String::new();
                    if self.segment != Segment::Text {
                        out = self.break_line();
                        self.segment = Segment::Text;
                    }
                    self.own_text |= !delta.is_empty();
                    out.push_str(&self.stream(delta, false));
                    out
                }
            }
            "thinking_delta" => {
                let delta = ev["delta"].as_str().unwrap_or("");
                let mut out = String::new();
                if self.segment != Segment::Thinking {
                    out = self.break_line();
                    out.push_str(&self.dim(&format!("{indent}thinking: ")));
                    self.segment = Segment::Thinking;
                }
                out.push_str(&self.stream(delta, true));
                out
            }
            "thinking_end" => {
                if self.segment == Segment::Thinking {
                    self.break_line()
                } else {
                    String::new()
                }
            }
            "tool_started" => {
                let tool = ev["tool"].as_str().unwrap_or("?");
                let args = compact(&ev["args"]);
                self.aside(&format!("{indent}→ {tool} {}", clip(&args, MAX_TOOL_TEXT)))
            }
            "tool_finished" => {
                let tool = ev["tool"].as_str().unwrap_or("?");
                let result = ev["result"].as_str().unwrap_or("");
                let mark = if ev["success"].as_bool().unwrap_or(true) {
                    "←"
                } else {
                    "✗"
                };
                self.aside(&format!(
                    "{indent}{mark} {tool}: {}",
                    clip(&one_line(result), MAX_TOOL_TEXT)
                ))
            }
            "input_requested" => {
                let question = ev["question"].as_str().unwrap_or("");
                let mut out = self.break_line();
                out.push_str(&self.paint(BOLD, &format!("{indent}? {question}")));
                out.push('\n');
                out
            }
            // A tool call waits for a person's decision: the tool and its whole arguments, pretty-printed (a
            // long value is cut to a bounded block); the client then asks at its prompt.
            "approval_requested" => {
                let tool = ev["tool"].as_str().unwrap_or("?");
                if let Some(request) = ev["request_id"].as_str() {
                    self.approvals.insert(request.to_string(), tool.to_string());
                }
                let mut out = self.break_line();
                out.push_str(&self.paint(
                    BOLD,
                    &format!("{indent}! {tool} needs your approval to run with:"),
                ));
                out.push('\n');
                let pretty = serde_json::to_string_pretty(&ev["args"]).unwrap_or_default();
                let lines: Vec<&str> = pretty.lines().collect();
                for line in lines.iter().take(MAX_APPROVAL_LINES) {
                    out.push_str(&format!("{indent}    {}\n", clip(line, MAX_APPROVAL_LINE)));
                }
                if lines.len() > MAX_APPROVAL_LINES {
                    let more = lines.len() - MAX_APPROVAL_LINES;
                    out.push_str(&self.dim(&format!("{indent}    … {more} more lines")));
                    out.push('\n');
                }
                out
            }
            "approval_resolved" => {
                let request = ev["request_id"].as_str().unwrap_or("");
                let tool = self
                    .approvals
                    .remove(request)
                    .unwrap_or_else(|| "the tool call".to_string());
                let reason = ev["reason"]
                    .as_str()
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(": {}", one_line(r)))
                    .unwrap_or_default();
                let (mark, verb, style) = if ev["decision"] == "allow" {
                    ("✓", "allowed", DIM)
                } else {
                    ("✗", "denied", YELLOW)
                };
                let mut out = self.break_line();
                out.push_str(&self.paint(style, &format!("{indent}{mark} {tool} {verb}{reason}")));
                out.push('\n');
                out
            }
            "skill_matched" => {
                let skill = ev["skill"].as_str().unwrap_or("?");
                self.aside(&format!("{indent}[skill {skill}]"))
            }
            "context_compressed" => self.aside(&format!(
                "{indent}[context compressed: {} → {} messages]",
                ev["messages_before"], ev["messages_after"]
            )),
            // A run that goes on after its process was lost: the text of the model call that was interrupted is
            // superseded. A terminal cannot take printed text back, so it says so, and the answer goes on below.
            "run_resumed" => {
                self.own_text = false;
                let attempt = ev["attempt"].as_u64().unwrap_or(1);
                let mut out = self.break_line();
                out.push_str(&self.paint(
                    YELLOW,
                    &format!(
                        "[resumed after an interruption (attempt {attempt}): the partial text above is superseded]"
                    ),
                ));
                out.push('\n');
                out
            }
            "run_finished" => self.finished(ev),
            _ => String::new(),
        }
    }

    fn finished(&mut self, ev: &Value) -> String {
        let mut out = String::new();
        if !self.own_text {
            if let Some(content) = ev["content"].as_str().filter(|c| !c.is_empty()) {
                out.push_str(&self.break_line());
                out.push_str(content);
                self.line_start = content.ends_with('\n');
            }
        }
        out.push_str(&self.break_line());
        let status = ev["run"]["status"].as_str().unwrap_or("completed");
        if status != "completed" {
            out.push_str(&self.status_line(status, ev["run"]["error"]["message"].as_str()));
        }
        // Secondary information: only where it can be dimmed out of the way.
        if self.color {
            if let (Some(used), Some(max)) = (
                ev["context_tokens"].as_u64(),
                ev["max_context_tokens"].as_u64().filter(|m| *m > 0),
            ) {
                out.push_str(&self.dim(&format!(
                    "[context {used} / {max} tokens, {}%]",
                    used * 100 / max
                )));
                out.push('\n');
            }
        }
        self.own_text = false;
        out
    }

    /// A user message this client did not send (another client's, or one replayed on resume).
    pub fn user_message(&mut self, content: &str) -> String {
        let mut out = self.break_line();
        out.push_str(&self.paint(BOLD, "you: "));
        out.push_str(content.trim_end());
        out.push('\n');
        out
    }

    /// A resumed session's history from its stored messages and runs, when the log no longer reaches back to
    /// its start: the last [`HISTORY_SHOWN`] messages, each clipped, tool traffic dimmed, and after each run that
    /// did not complete its status and error as the live view prints them. Messages of `skip_run` (the active
    /// run, which is replayed live) are left out.
    pub fn history(
        &mut self,
        messages: &[Value],
        runs: &[Value],
        skip_run: Option<&str>,
    ) -> String {
        let shown: Vec<&Value> = messages
            .iter()
            .filter(|m| skip_run.is_none() || m["run_id"].as_str() != skip_run)
            .filter(|m| m["role"] != "system")
            .collect();
        let mut out = self.break_line();
        if shown.is_empty() {
            return out;
        }
        let start = shown.len().saturating_sub(HISTORY_SHOWN);
        if start > 0 {
            out.push_str(&self.dim(&format!("({start} earlier messages not shown)")));
            out.push('\n');
        }
        let mut run: Option<&str> = None;
        for m in &shown[start..] {
            let this_run = m["run_id"].as_str();
            if this_run != run {
                out.push_str(&self.run_end(run, runs));
                run = this_run;
            }
            let content = m["content"].as_str().unwrap_or("");
            match m["role"].as_str().unwrap_or("") {
                "user" => {
                    out.push_str(&self.paint(BOLD, "you: "));
                    out.push_str(&clip(content.trim_end(), MAX_HISTORY_TEXT));
                    out.push('\n');
                }
                "assistant" => {
                    if !content.is_empty() {
                        let agent = m["agent"].as_str().unwrap_or("agent");
                        out.push_str(&self.paint(BOLD, &format!("{agent}: ")));
                        out.push_str(&clip(content.trim_end(), MAX_HISTORY_TEXT));
                        out.push('\n');
                    }
                    for call in m["tool_calls"].as_array().into_iter().flatten() {
                        let name = call["name"].as_str().unwrap_or("?");
                        let args = call["arguments"].as_str().unwrap_or("");
                        out.push_str(&self.dim(&format!(
                            "→ {name} {}",
                            clip(&one_line(args), MAX_TOOL_TEXT)
                        )));
                        out.push('\n');
                    }
                }
                "tool" => {
                    out.push_str(
                        &self.dim(&format!("← {}", clip(&one_line(content), MAX_TOOL_TEXT))),
                    );
                    out.push('\n');
                }
                _ => {}
            }
        }
        out.push_str(&self.run_end(run, runs));
        out.push_str(&self.dim("(end of history)"));
        out.push('\n');
        out
    }

    /// The line after a run that ended other than completed (as the live view prints it), else nothing.
    fn run_end(&self, run: Option<&str>, runs: &[Value]) -> String {
        let Some(r) = run.and_then(|id| runs.iter().find(|r| r["id"].as_str() == Some(id))) else {
            return String::new();
        };
        match r["status"].as_str().unwrap_or("") {
            status @ ("cancelled" | "failed" | "interrupted") => {
                self.status_line(status, r["error"]["message"].as_str())
            }
            _ => String::new(),
        }
    }

    /// `[run failed: why]`, highlighted, on its own line.
    fn status_line(&self, status: &str, error: Option<&str>) -> String {
        let mut line = format!("[run {status}");
        if let Some(m) = error {
            line.push_str(": ");
            line.push_str(m);
        }
        line.push(']');
        let mut out = self.paint(YELLOW, &line);
        out.push('\n');
        out
    }

    /// `/sessions`: one line each (id, last update, agent, title), the current one marked.
    pub fn sessions(&mut self, sessions: &[Value], current: &str) -> String {
        let mut out = self.break_line();
        if sessions.is_empty() {
            out.push_str(&self.dim("(no sessions)"));
            out.push('\n');
            return out;
        }
        for s in sessions {
            let id = s["id"].as_str().unwrap_or("?");
            let mark = if id == current { "*" } else { " " };
            let updated = s["updated_at"].as_str().unwrap_or("").replacen('T', " ", 1);
            let updated = updated.get(..16).unwrap_or(&updated);
            let agent = s["agent"].as_str().unwrap_or("?");
            let title = s["title"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map_or_else(|| "(untitled)".to_string(), |t| clip(&one_line(t), 60));
            out.push_str(&format!("{mark} {id}  {updated}  {agent}  {title}\n"));
        }
        out
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => one_line(s),
        other => other.to_string(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// At most `max` characters, with an ellipsis when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn own(kind: &str, extra: Value) -> Value {
        let mut v = json!({"type": kind, "agent": "assistant", "is_subagent": false});
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }

    #[test]
    fn a_resumed_run_marks_the_superseded_text_and_goes_on_below_it() {
        let mut r = Renderer::new(false);
        let mut out = String::new();
        for ev in [
            own("run_started", json!({})),
            own("text_delta", json!({"delta": "Half an ans"})),
            own("run_resumed", json!({"attempt": 1, "discard_from_seq": 3})),
            own("text_delta", json!({"delta": "The answer."})),
            own(
                "run_finished",
                json!({"run": {"status": "completed"}, "content": "The answer."}),
            ),
        ] {
            out.push_str(&r.event(&ev));
        }
        assert_eq!(
            out,
            "Half an ans\n[resumed after an interruption (attempt 1): the partial text above is superseded]\nThe answer.\n"
        );
        // Nothing streamed after the resumption: the answer is printed from `run_finished`.
        let mut r = Renderer::new(false);
        let mut out = String::new();
        for ev in [
            own("text_delta", json!({"delta": "Half"})),
            own("run_resumed", json!({"attempt": 2, "discard_from_seq": 3})),
            own(
                "run_finished",
                json!({"run": {"status": "completed"}, "content": "Whole."}),
            ),
        ] {
            out.push_str(&r.event(&ev));
        }
        assert!(out.ends_with("superseded]\nWhole.\n"), "{out:?}");
    }

    #[test]
    fn plain_output_streams_text_and_puts_asides_on_their_own_lines() {
        let mut r = Renderer::new(false);
        let mut out = String::new();
        for ev in [
            own("run_started", json!({})),
            own("thinking_delta", json!({"delta": "hmm"})),
            own("thinking_end", json!({})),
            own("text_delta", json!({"delta": "Let me"})),
            own("text_delta", json!({"delta": " check."})),
            own(
                "tool_started",
                json!({"tool": "calculator", "args": {"expression": "6*7"}}),
            ),
            json!({"type": "text_delta", "agent": "helper", "is_subagent": true, "delta": "sub says"}),
            own(
                "tool_finished",
                json!({"tool": "calculator", "result": "42", "success": true}),
            ),
            own("text_delta", json!({"delta": "It is 42."})),
            own(
                "run_finished",
                json!({"run": {"status": "completed"}, "content": "ignored", "context_tokens": 10, "max_context_tokens": 100}),
            ),
        ] {
            out.push_str(&r.event(&ev));
        }
        assert_eq!(
            out,
            "thinking: hmm\nLet me check.\n→ calculator {\"expression\":\"6*7\"}\n  [helper] sub says\n← calculator: 42\nIt is 42.\n"
        );
    }

    #[test]
    fn an_approval_shows_the_tool_and_its_arguments_then_the_decision() {
        let mut r = Renderer::new(false);
        let mut out = r.event(&own("text_delta", json!({"delta": "Let me write"})));
        out.push_str(&r.event(&own(
            "approval_requested",
            json!({"request_id": "q1", "call_id": "c1", "tool": "write_file", "args": {"path": "a.txt", "text": "hi"}}),
        )));
        out.push_str(&r.event(&own(
            "approval_resolved",
            json!({"request_id": "q1", "decision": "deny", "reason": "not\nnow"}),
        )));
        assert_eq!(
            out,
            "Let me write\n! write_file needs your approval to run with:\n    {\n      \"path\": \"a.txt\",\n      \"text\": \"hi\"\n    }\n✗ write_file denied: not now\n"
        );
        let mut out = r.event(&own(
            "approval_requested",
            json!({"request_id": "q2", "tool": "t", "args": {"k": (0..100).collect::<Vec<_>>()}}),
        ));
        assert!(out.ends_with("    … 64 more lines\n"), "{out}");
        assert_eq!(out.lines().count(), 1 + MAX_APPROVAL_LINES + 1);
        out = r.event(&own(
            "approval_resolved",
            json!({"request_id": "q2", "decision": "allow", "reason": null}),
        ));
        assert_eq!(out, "✓ t allowed\n");
        // Resolved without its request seen (a replay that starts later).
        let out = r.event(&own(
            "approval_resolved",
            json!({"request_id": "q9", "decision": "deny", "reason": "no decision within 5 s"}),
        ));
        assert_eq!(out, "✗ the tool call denied: no decision within 5 s\n");
    }

    #[test]
    fn a_terminal_gets_dim_asides_and_the_context_figure() {
        let mut r = Renderer::new(true);
        let out = r.event(&own("tool_started", json!({"tool": "t", "args": {}})));
        assert_eq!(out, "\x1b[2m→ t {}\x1b[0m\n");
        let out = r.event(&own(
            "run_finished",
            json!({"run": {"status": "cancelled"}, "content": "", "context_tokens": 50, "max_context_tokens": 200}),
        ));
        assert_eq!(
            out,
            "\x1b[33m[run cancelled]\x1b[0m\n\x1b[2m[context 50 / 200 tokens, 25%]\x1b[0m\n"
        );
    }

    #[test]
    fn an_unstreamed_answer_is_printed_from_run_finished() {
        let mut r = Renderer::new(false);
        let out = r.event(&own(
            "run_finished",
            json!({"run": {"status": "completed"}, "content": "whole answer"}),
        ));
        assert_eq!(out, "whole answer\n");
    }

    #[test]
    fn history_is_brief_and_skips_the_active_run() {
        let mut msgs = vec![json!({"role": "user", "content": "live one", "run_id": "r-live"})];
        for i in 0..25 {
            msgs.insert(
                0,
                json!({"role": "user", "content": format!("q{i}"), "run_id": "r"}),
            );
        }
        msgs.insert(
            0,
            json!({"role": "assistant", "content": "", "agent": "a", "run_id": "r",
                   "tool_calls": [{"id": "c", "name": "calc", "arguments": "{\"x\": 1}"}]}),
        );
        let mut r = Renderer::new(false);
        let out = r.history(&msgs, &[], Some("r-live"));
        assert!(out.starts_with("(6 earlier messages not shown)\n"), "{out}");
        assert!(!out.contains("live one"));
        assert!(out.ends_with("you: q0\n(end of history)\n"), "{out}");
        assert_eq!(clip("abcdef", 3), "abc…");
    }

    #[test]
    fn history_marks_runs_that_did_not_complete_as_the_live_view_does() {
        let msgs = vec![
            json!({"role": "user", "content": "one", "run_id": "r1"}),
            json!({"role": "assistant", "content": "half", "agent": "a", "run_id": "r1"}),
            json!({"role": "user", "content": "two", "run_id": "r2"}),
            json!({"role": "user", "content": "three", "run_id": "r3"}),
            json!({"role": "assistant", "content": "fine", "agent": "a", "run_id": "r3"}),
        ];
        let runs = vec![
            json!({"id": "r1", "status": "cancelled", "error": null}),
            json!({"id": "r2", "status": "failed", "error": {"code": "upstream_error", "message": "upstream answered HTTP 500"}}),
            json!({"id": "r3", "status": "completed", "error": null}),
        ];
        let out = Renderer::new(false).history(&msgs, &runs, None);
        assert_eq!(
            out,
            "you: one\na: half\n[run cancelled]\nyou: two\n[run failed: upstream answered HTTP 500]\nyou: three\na: fine\n(end of history)\n"
        );
    }

    #[test]
    fn sessions_are_listed_one_a_line_with_the_current_one_marked() {
        let list = vec![
            json!({"id": "s2", "agent": "a", "title": "Plan a\ntrip", "updated_at": "2026-12-03T10:11:12.5Z"}),
            json!({"id": "s1", "agent": "b", "title": null, "updated_at": "2026-12-02T09:00:00Z"}),
        ];
        let out = Renderer::new(false).sessions(&list, "s1");
        assert_eq!(
            out,
            "  s2  2026-12-03 10:11  a  Plan a trip\n* s1  2026-12-02 09:00  b  (untitled)\n"
        );
    }
}
