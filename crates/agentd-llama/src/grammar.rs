//! Tool calling for small local models: a GBNF grammar that makes the output format certain, and the code that
//! reads the output back.
//!
//! With tools, the output is constrained to *either* a plain-text answer *or* exactly one
//! `<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>`, where the name is one of the request's tools
//! and the arguments match that tool's JSON schema ([`crate::schema`] turns the schemas into grammar rules). The model's
//! judgement about *whether* to call a tool may be weak; the shape of what it produces is not up to it.
//!
//! The two branches are told apart by the first non-blank character: a text answer may not begin with `<`, a
//! tool call always does. That lets text stream token by token while a tool call is held back and emitted whole.

use agentd_core::provider::ToolSpec;

use crate::schema::{self, Rules};
use crate::ToolChoice;

pub(crate) const TOOL_CALL_OPEN: &str = "<tool_call>";
pub(crate) const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// Name of our top rule. The calls' rule is `root` (the schema rules' own naming), so ours is named apart;
/// every rule around it has the `agentd-` prefix for the same reason.
pub(crate) const GRAMMAR_ROOT: &str = "agentd-root";

/// Leading blanks are allowed (and dropped) before either branch, but only a few, so a model cannot spend its
/// whole budget on whitespace.
const RULES_COMMON: &str = r#"
agentd-ws ::= [ \t\r\n]{0,8}
agentd-call ::= "<tool_call>" "\n"? root "\n"? "</tool_call>"
agentd-text ::= [^< \t\r\n] .*
"#;

/// A JSON string literal (quotes and escapes): a tool's name as the model writes it.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Longest argument string the grammar allows when the schema sets no `maxLength`, in characters.
const DEFAULT_MAX_STRING: u64 = 1000;
/// Most array items the grammar allows when the schema sets no `maxItems`.
const DEFAULT_MAX_ITEMS: u64 = 64;

/// Gives every string and array in a schema an upper bound, for the grammar only (the model still sees the
/// schema as written). Without one, a small model can loop inside a string until the context is full, holding
/// the only inference thread for minutes; with one, the grammar closes the string at the bound and the call is
/// still valid. Strings also get `minLength: 1` unless they set one: an empty argument is what a confused small
/// model writes instead of an answer. Strings already constrained otherwise (`enum`, `const`, `pattern`,
/// `format`) are left alone.
fn bound_lengths(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            let is = |map: &serde_json::Map<String, serde_json::Value>, ty: &str| match map
                .get("type")
            {
                Some(serde_json::Value::String(t)) => t == ty,
                Some(serde_json::Value::Array(types)) => types.iter().any(|t| t == ty),
                _ => false,
            };
            let constrained = ["maxLength", "enum", "const", "pattern", "format"]
                .iter()
                .any(|k| map.contains_key(*k));
            if is(map, "string") && !constrained {
                map.insert("maxLength".to_string(), DEFAULT_MAX_STRING.into());
                map.entry("minLength").or_insert_with(|| 1.into());
            }
            if is(map, "array") && !map.contains_key("maxItems") {
                map.insert("maxItems".to_string(), DEFAULT_MAX_ITEMS.into());
            }
            map.values_mut().for_each(bound_lengths);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(bound_lengths),
        _ => {}
    }
}

/// The rule for `tool`'s arguments (the `i`th tool), from its schema with bounds added, or "any object" when
/// the schema cannot be turned into a grammar (then the call is still valid JSON with a known name; the tool
/// itself validates its arguments).
fn arguments_rule(rules: &mut Rules, tool: &ToolSpec, i: usize) -> String {
    let name = format!("call-{i}-arguments");
    if tool.parameters.is_object() {
        let mut bounded = tool.parameters.clone();
        bound_lengths(&mut bounded);
        // On a copy: a schema that fails halfway leaves no rules behind.
        let mut trial = rules.clone();
        match trial.add_schema(&name, &bounded) {
            Ok(rule) => {
                *rules = trial;
                return rule;
            }
            Err(e) => {
                tracing::warn!(tool = %tool.name, error = %e, "tool schema not expressible as a grammar; allowing any object");
            }
        }
    }
    let object = rules.add_primitive("object", "object");
    rules.add_rule(&name, object)
}

/// The GBNF grammar (start rule [`GRAMMAR_ROOT`]) for a request with `tools` (at least one).
///
/// A call is `{"name": <a tool's name>, "arguments": <that tool's arguments>}`, `name` first so the model
/// commits to a tool before writing its arguments. Argument strings cannot contain `<`, `{` or `}`
/// ([`schema::CHAR_RULE`]): a small model that wants to finish tends to write `}}` or `</tool_call>` *inside*
/// the string instead of closing the string first, and then rambles on inside it (measured with
/// SmolLM2-135M: most calls never closed). Without those characters it has to write the `"` first. The cost:
/// such a character in an argument must be written as a JSON escape (`\u003c`, `\u007b`).
pub(crate) fn tool_grammar(tools: &[ToolSpec], choice: ToolChoice) -> Result<String, String> {
    if tools.is_empty() {
        return Err("a tool grammar needs at least one tool".to_string());
    }
    let mut rules = Rules::new();
    let mut calls = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let arguments = arguments_rule(&mut rules, tool, i);
        let name = schema::literal(&json_string(&tool.name));
        calls.push(rules.add_rule(
            &format!("call-{i}"),
            format!(
                r#""{{" space "\"name\"" space ":" space {name} "," space "\"arguments\"" space ":" space {arguments} space "}}""#
            ),
        ));
    }
    rules.add_rule("root", calls.join(" | "));
    let top = match choice {
        ToolChoice::Auto => "agentd-root ::= agentd-ws ( agentd-call | agentd-text )",
        ToolChoice::Required => "agentd-root ::= agentd-ws agentd-call",
    };
    Ok(format!("{}\n{top}\n{RULES_COMMON}", rules.to_gbnf()))
}

/// The JSON inside a complete `<tool_call>...</tool_call>`.
fn parse_tool_call_json(output: &str) -> Result<serde_json::Value, String> {
    let body = output
        .trim()
        .strip_prefix(TOOL_CALL_OPEN)
        .and_then(|rest| rest.trim_end().strip_suffix(TOOL_CALL_CLOSE))
        .ok_or_else(|| {
            "the tool call is incomplete (the token limit was reached inside it)".to_string()
        })?;
    serde_json::from_str(body.trim()).map_err(|e| format!("the tool call is not valid JSON: {e}"))
}

/// Reads a complete `<tool_call>...</tool_call>` back into (name, arguments as JSON text).
pub(crate) fn parse_tool_call(output: &str, tools: &[String]) -> Result<(String, String), String> {
    let value = parse_tool_call_json(output)?;
    let name = value
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or("the tool call has no name")?;
    if !tools.iter().any(|t| t == name) {
        return Err(format!("the tool call names an unknown tool `{name}`"));
    }
    let arguments = value
        .get("arguments")
        .filter(|a| a.is_object())
        .ok_or("the tool call has no arguments object")?;
    Ok((name.to_string(), arguments.to_string()))
}

/// How the output is being treated so far.
#[derive(Debug, PartialEq, Eq)]
enum Mode {
    /// Only blanks so far (or nothing).
    Undecided,
    Text,
    ToolCall,
}

/// Splits generated text into streamed text or a held-back tool call, by the first non-blank character.
#[derive(Debug)]
pub(crate) struct OutputRouter {
    mode: Mode,
    held: String,
    tools_enabled: bool,
}

/// What the whole output turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Text (already streamed), possibly empty.
    Text,
    /// The raw `<tool_call>...` text.
    ToolCall(String),
}

impl OutputRouter {
    pub(crate) fn new(tools_enabled: bool) -> Self {
        OutputRouter {
            mode: Mode::Undecided,
            held: String::new(),
            tools_enabled,
        }
    }

    /// Takes the next decoded text; returns what to stream as text now, if anything.
    pub(crate) fn push(&mut self, text: &str) -> Option<String> {
        match self.mode {
            Mode::Text => (!text.is_empty()).then(|| text.to_string()),
            Mode::ToolCall => {
                self.held.push_str(text);
                None
            }
            Mode::Undecided => {
                self.held.push_str(text);
                let start = self.held.trim_start();
                if start.is_empty() {
                    return None;
                }
                // Under the grammar a text answer cannot start with `<`, so this is certain; without tools
                // everything is text.
                if self.tools_enabled && start.starts_with('<') {
                    self.mode = Mode::ToolCall;
                    self.held = start.to_string();
                    None
                } else {
                    self.mode = Mode::Text;
                    let out = start.to_string();
                    self.held.clear();
                    Some(out)
                }
            }
        }
    }

    /// True once the tool call is complete (the grammar then allows only end-of-turn, so stopping here saves
    /// that token). The closing tag alone is no proof: the grammar allows it inside an argument string.
    pub(crate) fn tool_call_closed(&self) -> bool {
        self.mode == Mode::ToolCall
            && self.held.trim_end().ends_with(TOOL_CALL_CLOSE)
            && parse_tool_call_json(&self.held).is_ok()
    }

    pub(crate) fn finish(self) -> Output {
        match self.mode {
            Mode::ToolCall => Output::ToolCall(self.held),
            Mode::Text | Mode::Undecided => Output::Text,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tool(name: &str, parameters: serde_json::Value) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: String::new(),
            parameters,
        }
    }

    fn calculator() -> ToolSpec {
        tool(
            "calculator",
            json!({"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}),
        )
    }

    #[test]
    fn grammar_has_both_branches_in_auto_and_only_the_call_when_required() {
        let auto = tool_grammar(&[calculator()], ToolChoice::Auto).unwrap();
        assert!(
            auto.contains("root ::="),
            "converter output missing: {auto}"
        );
        assert!(auto.contains("agentd-root ::= agentd-ws ( agentd-call | agentd-text )"));
        assert!(
            auto.contains(r#""\"calculator\"""#),
            "tool name must be a literal: {auto}"
        );
        assert!(auto.contains("expression"));
        let required = tool_grammar(&[calculator()], ToolChoice::Required).unwrap();
        assert!(required.contains("agentd-root ::= agentd-ws agentd-call\n"));
        assert!(!required.contains("agentd-call | agentd-text"));
    }

    #[test]
    fn argument_strings_cannot_contain_tag_or_brace_characters() {
        let grammar = tool_grammar(&[calculator()], ToolChoice::Auto).unwrap();
        assert!(
            grammar.contains(r#"char ::= [^<{}"\\"#),
            "the string rule lets tags and braces in: {grammar}"
        );
    }

    #[test]
    fn strings_and_arrays_get_an_upper_bound() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "free": {"type": "string"},
                "short": {"type": "string", "maxLength": 5},
                "choice": {"type": "string", "enum": ["a", "b"]},
                "list": {"type": "array", "items": {"type": ["string", "null"]}}
            }
        });
        bound_lengths(&mut schema);
        let p = &schema["properties"];
        assert_eq!(p["free"]["maxLength"], json!(DEFAULT_MAX_STRING));
        assert_eq!(p["free"]["minLength"], json!(1));
        assert_eq!(p["short"]["maxLength"], json!(5));
        assert!(p["choice"].get("maxLength").is_none());
        assert_eq!(p["list"]["maxItems"], json!(DEFAULT_MAX_ITEMS));
        assert_eq!(p["list"]["items"]["maxLength"], json!(DEFAULT_MAX_STRING));
        assert!(schema.get("maxLength").is_none(), "objects are not strings");

        let grammar = tool_grammar(&[calculator()], ToolChoice::Auto).unwrap();
        assert!(
            grammar.contains(&format!("char{{1,{DEFAULT_MAX_STRING}}}")),
            "{grammar}"
        );
    }

    #[test]
    fn several_tools_become_alternatives() {
        let tools = [
            calculator(),
            tool("current_time", json!({"type": "object", "properties": {}})),
        ];
        let grammar = tool_grammar(&tools, ToolChoice::Auto).unwrap();
        assert!(grammar.contains(r#""\"calculator\"""#));
        assert!(grammar.contains(r#""\"current_time\"""#));
        assert!(tool_grammar(&[], ToolChoice::Auto).is_err());
    }

    #[test]
    fn a_schema_the_grammar_cannot_express_allows_any_object_for_that_tool_only() {
        let dated =
            json!({"type": "object", "properties": {"when": {"type": "string", "format": "date"}}});
        let grammar =
            tool_grammar(&[tool("dated", dated), calculator()], ToolChoice::Auto).unwrap();
        assert!(
            grammar.contains("call-0-arguments ::= object\n"),
            "{grammar}"
        );
        assert!(
            grammar.contains(r#"call-1-arguments ::= "{" space"#),
            "{grammar}"
        );
        assert!(!grammar.contains("when"), "{grammar}");
        assert!(grammar.contains("root ::= call-0 | call-1\n"), "{grammar}");
    }

    #[test]
    fn a_non_object_schema_falls_back_to_any_object() {
        let grammar = tool_grammar(&[tool("odd", json!(null))], ToolChoice::Required).unwrap();
        assert!(grammar.contains(r#""\"odd\"""#));
    }

    #[test]
    fn parses_a_complete_call() {
        let names = vec!["calculator".to_string()];
        let (name, args) =
            parse_tool_call("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+2\"}}\n</tool_call>", &names)
                .unwrap();
        assert_eq!(name, "calculator");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&args).unwrap(),
            json!({"expression": "2+2"})
        );
    }

    #[test]
    fn rejects_incomplete_unknown_or_malformed_calls() {
        let names = vec!["calculator".to_string()];
        assert!(parse_tool_call("<tool_call>{\"name\": \"calc", &names)
            .unwrap_err()
            .contains("incomplete"));
        assert!(parse_tool_call(
            "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
            &names
        )
        .unwrap_err()
        .contains("unknown tool"));
        assert!(parse_tool_call("<tool_call>{nope}</tool_call>", &names)
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(
            parse_tool_call("<tool_call>{\"name\": \"calculator\"}</tool_call>", &names).is_err()
        );
    }

    #[test]
    fn router_streams_text_and_holds_tool_calls() {
        let mut text = OutputRouter::new(true);
        assert_eq!(text.push("\n "), None);
        assert_eq!(text.push(" Hi"), Some("Hi".to_string()));
        assert_eq!(text.push(" <b>"), Some(" <b>".to_string()));
        assert_eq!(text.finish(), Output::Text);

        let mut call = OutputRouter::new(true);
        assert_eq!(call.push(" <tool"), None);
        assert_eq!(call.push("_call>{}"), None);
        assert!(!call.tool_call_closed());
        assert_eq!(call.push("</tool_call>"), None);
        assert!(call.tool_call_closed());
        assert_eq!(
            call.finish(),
            Output::ToolCall("<tool_call>{}</tool_call>".to_string())
        );

        // The closing tag inside an unfinished argument string does not end the call.
        let mut inside = OutputRouter::new(true);
        inside.push(
            r#"<tool_call>{"name": "calculator", "arguments": {"expression": "1</tool_call>"#,
        );
        assert!(!inside.tool_call_closed());
        inside.push(r#"+1"}}</tool_call>"#);
        assert!(inside.tool_call_closed());

        let mut plain = OutputRouter::new(false);
        assert_eq!(plain.push("<b>"), Some("<b>".to_string()));
    }
}
