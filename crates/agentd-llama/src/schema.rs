//! JSON Schema to GBNF grammar rules, for tool arguments: the part of llama.cpp's
//! `common/json-schema-to-grammar.cpp` (MIT) that tool schemas use, ported so the embedded model needs only
//! llama.cpp's core library and not its `common` one (chat-template parsers, argument parsing, downloads: about
//! two minutes of a cold build on two cores, for one function).
//!
//! The rules and the shape of the output are the original's for what it covers: objects (`properties`,
//! `required`, `additionalProperties`), arrays (`items`, `minItems`, `maxItems`), strings (`minLength`,
//! `maxLength`), integers, numbers, booleans, null, `const`, `enum`, `oneOf`/`anyOf`, lists of types, `$ref`s
//! into the same document, and the empty schema (any JSON value). Two things are looser than the original:
//! integer bounds are not enforced, and extra keys beside declared properties (`additionalProperties`) may
//! repeat a declared name; the tool validates its arguments either way. What it does not cover at all
//! (`pattern`, date/time/uuid `format`s, `allOf`, tuples) is an error, and the caller falls back to a looser
//! grammar.
//!
//! One deliberate difference: the character rule of JSON strings also excludes `<`, `{` and `}` (see
//! [`crate::grammar::tool_grammar`] for why).

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};

/// Whitespace between tokens: none, a space, or a line break or two and a little indentation.
const SPACE_RULE: &str = r#"| " " | "\n"{1,2} [ \t]{0,20}"#;

/// One character of a JSON string: anything but `"`, `\`, control characters and (unlike llama.cpp's rule)
/// `<`, `{`, `}`, or an escape.
pub(crate) const CHAR_RULE: &str =
    r#"[^<{}"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})"#;

/// llama.cpp's built-in rules: (name, body, rules it refers to).
const PRIMITIVES: &[(&str, &str, &[&str])] = &[
    ("boolean", r#"("true" | "false")"#, &[]),
    ("decimal-part", "[0-9]{1,16}", &[]),
    ("integral-part", "[0] | [1-9] [0-9]{0,15}", &[]),
    (
        "number",
        r#"("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?"#,
        &["integral-part", "decimal-part"],
    ),
    ("integer", r#"("-"? integral-part)"#, &["integral-part"]),
    (
        "value",
        "object | array | string | number | boolean | null",
        &["object", "array", "string", "number", "boolean", "null"],
    ),
    (
        "object",
        r#""{" space ( string ":" space value ("," space string ":" space value)* )? space "}""#,
        &["string", "value"],
    ),
    (
        "array",
        r#""[" space ( value ("," space value)* )? space "]""#,
        &["value"],
    ),
    ("char", CHAR_RULE, &[]),
    ("string", r#""\"" char* "\"""#, &["char"]),
    ("null", r#""null""#, &[]),
];

fn primitive(name: &str) -> Option<(&'static str, &'static [&'static str])> {
    PRIMITIVES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, body, deps)| (*body, *deps))
}

fn is_reserved(name: &str) -> bool {
    name == "root" || primitive(name).is_some()
}

/// A rule name from anything: runs of characters GBNF does not allow in names become `-`.
fn rule_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_run = false;
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('-');
            in_run = true;
        }
    }
    out
}

/// A GBNF string literal matching `text` exactly.
pub(crate) fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `item` repeated `min` to `max` times (no upper bound when `None`), `separator` between the items.
fn repetition(item: &str, min: u64, max: Option<u64>, separator: &str) -> String {
    if max == Some(0) {
        return String::new();
    }
    if min == 0 && max == Some(1) {
        return format!("{item}?");
    }
    if separator.is_empty() {
        return match (min, max) {
            (1, None) => format!("{item}+"),
            (0, None) => format!("{item}*"),
            (min, max) => format!(
                "{item}{{{min},{}}}",
                max.map(|m| m.to_string()).unwrap_or_default()
            ),
        };
    }
    let rest = repetition(
        &format!("({separator} {item})"),
        min.saturating_sub(1),
        max.map(|m| m - 1),
        "",
    );
    let all = format!("{item} {rest}");
    if min == 0 {
        format!("({all})?")
    } else {
        all
    }
}

/// `key` of `schema` as a count (a non-negative integer), `None` when absent.
fn count(schema: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match schema.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{key} must be a non-negative integer")),
    }
}

/// GBNF rules built from schemas; several schemas can go into one set (rule names are kept apart).
#[derive(Debug, Clone, Default)]
pub(crate) struct Rules {
    rules: BTreeMap<String, String>,
    /// The document `$ref`s of the schema being converted point into.
    document: Value,
    refs_being_resolved: HashSet<String>,
}

impl Rules {
    pub(crate) fn new() -> Rules {
        let mut rules = BTreeMap::new();
        rules.insert("space".to_string(), SPACE_RULE.to_string());
        Rules {
            rules,
            document: Value::Null,
            refs_being_resolved: HashSet::new(),
        }
    }

    /// Adds the rules for `schema` under `name`; returns the name of its top rule.
    pub(crate) fn add_schema(&mut self, name: &str, schema: &Value) -> Result<String, String> {
        self.document = schema.clone();
        let top = self.visit(schema, name);
        self.document = Value::Null;
        top
    }

    /// Adds rule `name` (or, if a different rule has that name, `name` with a number) and returns its name.
    pub(crate) fn add_rule(&mut self, name: &str, body: String) -> String {
        let key = rule_name(name);
        if self
            .rules
            .get(&key)
            .is_none_or(|existing| *existing == body)
        {
            self.rules.insert(key.clone(), body);
            return key;
        }
        let mut i = 0;
        while self
            .rules
            .get(&format!("{key}{i}"))
            .is_some_and(|existing| *existing != body)
        {
            i += 1;
        }
        let key = format!("{key}{i}");
        self.rules.insert(key.clone(), body);
        key
    }

    /// Adds a built-in rule and the ones it refers to; returns the name it was added under.
    pub(crate) fn add_primitive(&mut self, name: &str, primitive_name: &str) -> String {
        let Some((body, deps)) = primitive(primitive_name) else {
            return String::new();
        };
        let added = self.add_rule(name, body.to_string());
        for dep in deps {
            if !self.rules.contains_key(*dep) {
                self.add_primitive(dep, dep);
            }
        }
        added
    }

    /// The rules as GBNF text, one a line.
    pub(crate) fn to_gbnf(&self) -> String {
        let mut out = String::new();
        for (name, body) in &self.rules {
            out.push_str(name);
            out.push_str(" ::= ");
            out.push_str(body);
            out.push('\n');
        }
        out
    }

    fn visit_primitive(&mut self, rule: &str, primitive_name: &str) -> String {
        let name = if rule == "root" {
            "root"
        } else {
            primitive_name
        };
        self.add_primitive(name, primitive_name)
    }

    fn any_value(&mut self, rule: &str) -> String {
        let value = self.add_primitive("value", "value");
        self.add_rule(rule, value)
    }

    fn visit(&mut self, schema: &Value, name: &str) -> Result<String, String> {
        let rule = if is_reserved(name) {
            format!("{name}-")
        } else if name.is_empty() {
            "root".to_string()
        } else {
            name.to_string()
        };
        let sub = |part: &str| {
            if name.is_empty() {
                part.to_string()
            } else {
                format!("{name}-{part}")
            }
        };
        let map = match schema {
            Value::Object(map) => map,
            Value::Bool(true) => return Ok(self.any_value(&rule)),
            _ => return Err("a schema must be an object".to_string()),
        };
        if let Some(reference) = map.get("$ref") {
            let target = self.resolve_ref(reference)?;
            return Ok(self.add_rule(&rule, target));
        }
        if let Some(alternatives) = map.get("oneOf").or_else(|| map.get("anyOf")) {
            let Some(alternatives) = alternatives.as_array().filter(|a| !a.is_empty()) else {
                return Err("oneOf/anyOf must be a non-empty array".to_string());
            };
            let body = self.union(name, alternatives.iter().cloned())?;
            return Ok(self.add_rule(&rule, body));
        }
        let ty = map.get("type");
        if let Some(Value::Array(types)) = ty {
            if types.is_empty() {
                return Err("type must not be empty".to_string());
            }
            let alternatives = types.iter().map(|t| {
                let mut alternative = map.clone();
                alternative.insert("type".to_string(), t.clone());
                Value::Object(alternative)
            });
            let body = self.union(name, alternatives)?;
            return Ok(self.add_rule(&rule, body));
        }
        if let Some(value) = map.get("const") {
            return Ok(self.add_rule(&rule, literal(&value.to_string())));
        }
        if let Some(values) = map.get("enum") {
            let Some(values) = values.as_array().filter(|v| !v.is_empty()) else {
                return Err("enum must be a non-empty array".to_string());
            };
            let literals: Vec<String> = values.iter().map(|v| literal(&v.to_string())).collect();
            return Ok(self.add_rule(&rule, format!("({})", literals.join(" | "))));
        }
        let has_properties = map.contains_key("properties")
            || map
                .get("additionalProperties")
                .is_some_and(|a| *a != Value::Bool(true));
        match ty {
            None | Some(Value::Null) => {
                if has_properties {
                    self.object(map, name, &rule)
                } else if map.contains_key("allOf") {
                    Err("allOf is not supported".to_string())
                } else if map.contains_key("items") || map.contains_key("prefixItems") {
                    self.array(map, &rule, &sub("item"))
                } else if ["pattern", "minLength", "maxLength", "format"]
                    .iter()
                    .any(|k| map.contains_key(*k))
                {
                    self.string(map, &rule)
                } else {
                    Ok(self.any_value(&rule))
                }
            }
            Some(Value::String(t)) => match t.as_str() {
                "object" | "string" if map.contains_key("allOf") => {
                    Err("allOf is not supported".to_string())
                }
                "object" => self.object(map, name, &rule),
                "string" => self.string(map, &rule),
                "array" => self.array(map, &rule, &sub("item")),
                "integer" => Ok(self.visit_primitive(&rule, "integer")),
                "number" => Ok(self.visit_primitive(&rule, "number")),
                "boolean" => Ok(self.visit_primitive(&rule, "boolean")),
                "null" => Ok(self.visit_primitive(&rule, "null")),
                other => Err(format!("unrecognized type {other}")),
            },
            Some(_) => Err("type must be a string or an array of strings".to_string()),
        }
    }

    /// The alternatives of a union, each a rule of its own (`name-0`, `name-1`, ...), joined with `|`.
    fn union(
        &mut self,
        name: &str,
        alternatives: impl Iterator<Item = Value>,
    ) -> Result<String, String> {
        let mut rules = Vec::new();
        for (i, alternative) in alternatives.enumerate() {
            let alt_name = if name.is_empty() {
                format!("alternative-{i}")
            } else {
                format!("{name}-{i}")
            };
            rules.push(self.visit(&alternative, &alt_name)?);
        }
        Ok(rules.join(" | "))
    }

    fn resolve_ref(&mut self, reference: &Value) -> Result<String, String> {
        let Some(reference) = reference.as_str() else {
            return Err("$ref must be a string".to_string());
        };
        let Some(pointer) = reference.strip_prefix('#').filter(|p| p.starts_with('/')) else {
            return Err(format!(
                "unsupported $ref {reference}: only references into the same document"
            ));
        };
        let ref_rule = rule_name(&format!("ref{pointer}"));
        if self.rules.contains_key(&ref_rule) || self.refs_being_resolved.contains(reference) {
            return Ok(ref_rule);
        }
        let target = self
            .document
            .pointer(pointer)
            .cloned()
            .ok_or_else(|| format!("cannot resolve $ref {reference}"))?;
        self.refs_being_resolved.insert(reference.to_string());
        let resolved = self.visit(&target, &ref_rule);
        self.refs_being_resolved.remove(reference);
        resolved
    }

    fn string(&mut self, map: &Map<String, Value>, rule: &str) -> Result<String, String> {
        if map.contains_key("pattern") {
            return Err("pattern is not supported".to_string());
        }
        if let Some(format) = map.get("format").and_then(Value::as_str) {
            if ["date", "time", "date-time"].contains(&format) || format.starts_with("uuid") {
                return Err(format!("format {format} is not supported"));
            }
        }
        let min = count(map, "minLength")?.unwrap_or(0);
        let max = count(map, "maxLength")?;
        if min == 0 && max.is_none() {
            return Ok(self.visit_primitive(rule, "string"));
        }
        let char_rule = self.add_primitive("char", "char");
        Ok(self.add_rule(
            rule,
            format!(r#""\"" {} "\"""#, repetition(&char_rule, min, max, "")),
        ))
    }

    fn array(
        &mut self,
        map: &Map<String, Value>,
        rule: &str,
        item_name: &str,
    ) -> Result<String, String> {
        let items = map.get("items").or_else(|| map.get("prefixItems"));
        if items.is_some_and(Value::is_array) {
            return Err("tuples (items as an array) are not supported".to_string());
        }
        let min = count(map, "minItems")?.unwrap_or(0);
        let max = count(map, "maxItems")?;
        let item_rule = match items {
            None if min == 0 && max.is_none() => return Ok(self.visit_primitive(rule, "array")),
            None => self.any_value(item_name),
            Some(items) => self.visit(items, item_name)?,
        };
        Ok(self.add_rule(
            rule,
            format!(
                r#""[" space {} space "]""#,
                repetition(&item_rule, min, max, r#""," space"#)
            ),
        ))
    }

    fn object(
        &mut self,
        map: &Map<String, Value>,
        name: &str,
        rule: &str,
    ) -> Result<String, String> {
        let required: HashSet<&str> = map
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let properties = match map.get("properties") {
            None => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err("properties must be an object".to_string()),
        };
        // None: no keys beyond the declared ones; Some(None): any value; Some(Some(schema)): values of a schema.
        let additional: Option<Option<&Value>> = match map.get("additionalProperties") {
            Some(Value::Bool(true)) => Some(None),
            Some(Value::Bool(false)) => None,
            Some(schema @ Value::Object(_)) => Some(Some(schema)),
            Some(_) => return Err("additionalProperties must be a boolean or a schema".to_string()),
            None if properties.is_empty() => Some(None),
            None => None,
        };
        if properties.is_empty() && additional == Some(None) {
            let object = self.add_primitive("object", "object");
            return Ok(self.add_rule(rule, object));
        }
        let prefix = if name.is_empty() {
            String::new()
        } else {
            format!("{name}-")
        };
        let mut kv_rules: Vec<(String, String)> = Vec::new(); // (property, its key-value rule)
        let mut required_props = Vec::new();
        let mut optional_props = Vec::new();
        for (prop, schema) in &properties {
            let value_rule = self.visit(schema, &format!("{prefix}{prop}"))?;
            let kv = self.add_rule(
                &format!("{prefix}{prop}-kv"),
                format!(
                    r#"{} space ":" space {value_rule}"#,
                    literal(&Value::String(prop.clone()).to_string())
                ),
            );
            kv_rules.push((prop.clone(), kv));
            if required.contains(prop.as_str()) {
                required_props.push(prop.clone());
            } else {
                optional_props.push(prop.clone());
            }
        }
        if let Some(value_schema) = additional {
            let sub = format!("{prefix}additional");
            let value_rule = match value_schema {
                None => self.add_primitive("value", "value"),
                Some(schema) => self.visit(schema, &format!("{sub}-value"))?,
            };
            let key_rule = self.add_primitive("string", "string");
            let kv = self.add_rule(
                &format!("{sub}-kv"),
                format!(r#"{key_rule} ":" space {value_rule}"#),
            );
            kv_rules.push(("*".to_string(), kv));
            optional_props.push("*".to_string());
        }
        if required_props.is_empty() && optional_props.is_empty() {
            return Ok(self.add_rule(rule, r#""{" space "}""#.to_string()));
        }
        let kv_of = |prop: &str| -> String {
            kv_rules
                .iter()
                .find(|(p, _)| p == prop)
                .map(|(_, kv)| kv.clone())
                .unwrap_or_default()
        };
        let mut body = r#""{" space "#.to_string();
        body.push_str(
            &required_props
                .iter()
                .map(|p| kv_of(p))
                .collect::<Vec<_>>()
                .join(r#" "," space "#),
        );
        if !optional_props.is_empty() {
            body.push_str(" (");
            if !required_props.is_empty() {
                body.push_str(r#" "," space ( "#);
            }
            let mut alternatives = Vec::new();
            for i in 0..optional_props.len() {
                alternatives.push(self.optional_chain(
                    &optional_props[i..],
                    false,
                    &prefix,
                    &kv_of,
                ));
            }
            body.push_str(&alternatives.join(" | "));
            if !required_props.is_empty() {
                body.push_str(" )");
            }
            body.push_str(" )?");
        }
        body.push_str(r#" space "}""#);
        Ok(self.add_rule(rule, body))
    }

    /// The optional properties `props` in order, any of them left out: the first one present (or, with
    /// `first_is_optional`, maybe absent, after a comma), then a rule for the rest.
    fn optional_chain(
        &mut self,
        props: &[String],
        first_is_optional: bool,
        prefix: &str,
        kv_of: &dyn Fn(&str) -> String,
    ) -> String {
        let Some((first, rest)) = props.split_first() else {
            return String::new();
        };
        let kv = kv_of(first);
        let comma_kv = format!(r#"( "," space {kv} )"#);
        let repeat = first == "*";
        let mut out = if first_is_optional {
            format!("{comma_kv}{}", if repeat { "*" } else { "?" })
        } else if repeat {
            format!("{kv} {comma_kv}*")
        } else {
            kv
        };
        if !rest.is_empty() {
            let rest_body = self.optional_chain(rest, true, prefix, kv_of);
            let rest_rule = self.add_rule(&format!("{prefix}{first}-rest"), rest_body);
            out.push(' ');
            out.push_str(&rest_rule);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gbnf(schema: Value) -> Result<String, String> {
        let mut rules = Rules::new();
        rules.add_schema("", &schema)?;
        Ok(rules.to_gbnf())
    }

    #[test]
    fn a_tool_schema_becomes_an_object_rule_with_required_then_optional_keys() {
        let g = gbnf(json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "maxLength": 5},
                "limit": {"type": "integer"},
            },
            "required": ["path"],
        }))
        .expect("converts");
        assert!(
            g.contains(r#"root ::= "{" space path-kv ( "," space ( limit-kv ) )? space "}""#),
            "{g}"
        );
        assert!(g.contains(r#"path ::= "\"" char{0,5} "\"""#), "{g}");
        assert!(
            g.contains(r#"path-kv ::= "\"path\"" space ":" space path"#),
            "{g}"
        );
        assert!(
            g.contains(r#"limit-kv ::= "\"limit\"" space ":" space integer"#),
            "{g}"
        );
        assert!(g.contains("integral-part ::= "), "{g}");
        assert!(g.contains(&format!("char ::= {CHAR_RULE}")), "{g}");
    }

    #[test]
    fn optional_properties_may_each_be_left_out() {
        let g = gbnf(json!({
            "type": "object",
            "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"const": 1}},
        }))
        .expect("converts");
        assert!(
            g.contains(r#"root ::= "{" space  (a-kv a-rest | b-kv b-rest | c-kv )? space "}""#),
            "{g}"
        );
        assert!(
            g.contains(r#"a-rest ::= ( "," space b-kv )? b-rest"#),
            "{g}"
        );
        assert!(g.contains(r#"b-rest ::= ( "," space c-kv )?"#), "{g}");
        assert!(g.contains(r#"c ::= "1""#), "{g}");
    }

    #[test]
    fn unions_enums_arrays_and_refs() {
        let g = gbnf(json!({
            "type": "object",
            "properties": {
                "mode": {"enum": ["fast", "slow"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "either": {"oneOf": [{"type": "number"}, {"type": "string"}]},
                "node": {"$ref": "#/$defs/node"},
            },
            "required": ["mode", "tags", "either", "node"],
            "$defs": {"node": {"type": ["string", "null"]}},
        }))
        .expect("converts");
        assert!(g.contains(r#"mode ::= ("\"fast\"" | "\"slow\"")"#), "{g}");
        assert!(
            g.contains(r#"tags ::= "[" space (string ("," space string){0,2})? space "]""#),
            "{g}"
        );
        assert!(g.contains("either ::= number | string"), "{g}");
        assert!(g.contains("node ::= ref-defs-node\n"), "{g}");
        assert!(g.contains("ref-defs-node ::= string | null\n"), "{g}");
    }

    #[test]
    fn what_it_cannot_express_is_an_error_not_a_wrong_grammar() {
        for schema in [
            json!({"type": "string", "pattern": "^a+$"}),
            json!({"type": "string", "format": "date-time"}),
            json!({"allOf": [{"type": "object"}]}),
            json!({"type": "array", "items": [{"type": "string"}]}),
            json!({"type": "object", "properties": {"x": {"$ref": "https://example.com/s"}}}),
            json!({"type": "frog"}),
            json!({"enum": []}),
        ] {
            assert!(gbnf(schema.clone()).is_err(), "{schema}");
        }
    }

    #[test]
    fn the_empty_schema_and_a_bare_object_take_any_json() {
        let g = gbnf(json!({})).expect("converts");
        assert!(g.contains("root ::= value"), "{g}");
        let g = gbnf(json!({"type": "object"})).expect("converts");
        assert!(g.contains("root ::= object"), "{g}");
        assert!(g.contains("value ::= object | array | string | number | boolean | null"));
    }

    #[test]
    fn literals_and_rule_names_are_escaped() {
        assert_eq!(literal("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        assert_eq!(rule_name("tool/name with spaces"), "tool-name-with-spaces");
        assert_eq!(repetition("x", 1, Some(1000), ""), "x{1,1000}");
        assert_eq!(repetition("x", 0, None, ""), "x*");
        assert_eq!(repetition("x", 0, Some(1), ""), "x?");
    }
}
