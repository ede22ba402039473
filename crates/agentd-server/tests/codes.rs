//! The web page and the server share one list of error codes and event types: `web/static/codes.js`.
//!
//! These tests hold both sides to it, so they cannot drift apart again (the page once restored the user's draft
//! on `invalid` while the server said `invalid_request`):
//! - every error code the native surface can send is listed: the codes `classify` maps service errors to, and
//!   every code literal in the server's sources outside the seed dialects and the OpenAI-compatible surfaces
//!   (error frames, `ApiError`s, conflict codes), whichever module a later change adds it in;
//! - every event type the core logs is listed, and every run error code (`Run.error.code`) exactly;
//! - the page's modules name error codes only through `errorCode('…')` / `runErrorCode('…')` with listed codes,
//!   compare no `.code` with a bare string, and switch only on listed event types;
//! - the page loads codes.js before app.js.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use agentd_core::service::ServiceError;
use agentd_server::error::classify;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The shared list: the JSON object inside codes.js.
fn codes_json() -> Value {
    let js = read("web/static/codes.js");
    let marker = "globalThis.AGENTD_CODES = Object.freeze(";
    let start = js.find(marker).expect(marker) + marker.len();
    let end = js.rfind(')').expect("closing )");
    serde_json::from_str(js[start..end].trim())
        .unwrap_or_else(|e| panic!("codes.js does not hold strict JSON: {e}"))
}

/// The page's own scripts (not the vendored libraries), concatenated.
fn page_js() -> String {
    ["app.js", "conn.js", "model.js", "view.js", "markdown.js"]
        .iter()
        .map(|f| read(&format!("web/static/{f}")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The shared list: error codes and event types.
fn codes() -> (BTreeSet<String>, BTreeSet<String>) {
    let v = codes_json();
    let errors = v["errors"]
        .as_object()
        .expect("errors is an object")
        .keys()
        .cloned()
        .collect();
    let events = v["events"]
        .as_array()
        .expect("events is an array")
        .iter()
        .map(|e| e.as_str().expect("event type is a string").to_string())
        .collect();
    (errors, events)
}

/// The source without its `#[cfg(test)]` part.
fn code_of(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

/// Each string literal of Rust source `src` that looks like a code (`[a-z][a-z0-9_]*`), with the text before
/// and after it. A small lexer: skips comments, char literals (`'"'`), escapes and raw strings.
fn literals(src: &str) -> Vec<(&str, &str, &str)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = src[i..].find('\n').map_or(b.len(), |n| i + n);
            }
            b'\'' => {
                // A char literal ('x', '\x') is skipped whole; anything else is a lifetime.
                if b.get(i + 1) == Some(&b'\\') && b.get(i + 3) == Some(&b'\'') {
                    i += 4;
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let end = format!("\"{}", "#".repeat(hashes));
                let body = i + 2 + hashes;
                i = src[body..]
                    .find(&end)
                    .map_or(b.len(), |e| body + e + end.len());
            }
            b'"' => {
                let open = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                let close = i.min(b.len());
                let lit = &src[open + 1..close];
                if lit.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
                    && lit
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
                {
                    out.push((&src[..open], lit, &src[(close + 1).min(b.len())..]));
                }
                i = close + 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// The error codes written in one server source: a literal right after `error_frame(`, `code:`, `"code":` or
/// `StatusCode::X,`, or a literal opening a `("code".into(), message)` pair.
fn codes_in(src: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (before, lit, after) in literals(src) {
        let before = before.trim_end();
        let after = after.trim_start();
        let status_arg = before.ends_with(',')
            && before[..before.len() - 1]
                .rsplit(|c: char| c.is_whitespace() || c == '(')
                .next()
                .is_some_and(|w| w.starts_with("StatusCode::"));
        let pair = before.ends_with('(')
            && (after.starts_with(".into(),") || after.starts_with(".to_string(),"));
        if before.ends_with("error_frame(")
            || before.ends_with("FrameError::new(")
            || before.ends_with("code:")
            || before.ends_with("\"code\":")
            || status_arg
            || pair
        {
            found.insert(lit.to_string());
        }
    }
    found
}

/// Every `.rs` file under `dir`, skipping the seed dialects and the OpenAI-compatible surfaces (their clients
/// never see native codes).
fn server_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "agentkit" && name != "navi" && name != "openai" {
                server_sources(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// Every error code the native surface can send.
fn server_error_codes() -> BTreeSet<String> {
    let mut files = Vec::new();
    server_sources(&root().join("crates/agentd-server/src"), &mut files);
    // The service's conflict codes travel through `classify`.
    for core in ["service.rs", "runs.rs"] {
        files.push(root().join("crates/agentd-core/src").join(core));
    }
    let mut found = BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        found.extend(codes_in(&code_of(&text)));
    }
    // And what `classify` maps every kind of service error to.
    for e in [
        ServiceError::NotFound(String::new()),
        ServiceError::TooLarge(String::new()),
        ServiceError::Invalid(String::new()),
        ServiceError::Unavailable(String::new()),
        ServiceError::Internal(String::new()),
    ] {
        found.insert(classify(&e).1.to_string());
    }
    found
}

#[test]
fn every_error_code_the_server_sends_is_in_codes_js() {
    let (listed, _) = codes();
    let sent = server_error_codes();
    // The scan itself finds what is known to be there, so it cannot quietly find nothing.
    for known in [
        "invalid_request",
        "invalid_json",
        "missing_field",
        "unknown_type",
        "invalid_frame",
        "unauthenticated",
        "not_found",
        "session_closed",
        "run_active",
        "too_large",
        "internal",
        "cursor_expired",
    ] {
        assert!(sent.contains(known), "the scan missed `{known}`: {sent:?}");
    }
    let missing: Vec<&String> = sent.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "error codes the server sends but web/static/codes.js does not list: {missing:?}"
    );
}

#[test]
fn every_event_type_the_core_logs_is_in_codes_js() {
    let (_, listed) = codes();
    let event_rs = code_of(&read("crates/agentd-core/src/event.rs"));
    let start = event_rs.find("fn type_name").expect("fn type_name");
    let body = &event_rs[start..];
    let body = &body[..body.find("\n    }\n").expect("end of type_name")];
    let logged: BTreeSet<String> = literals(body)
        .into_iter()
        .filter(|(before, _, _)| before.trim_end().ends_with("=>"))
        .map(|(_, lit, _)| lit.to_string())
        .collect();
    assert!(
        logged.contains("text_delta") && logged.contains("run_finished"),
        "{logged:?}"
    );
    let missing: Vec<&String> = logged.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "event types the core logs but web/static/codes.js does not list: {missing:?}"
    );
}

/// The quoted strings of a JS source that follow `marker` (e.g. `errorCode(` or `case `).
fn js_args<'a>(js: &'a str, marker: &str) -> Vec<&'a str> {
    js.match_indices(marker)
        // A whole name: `errorCode(` is not the tail of `runErrorCode(`.
        .filter(|(i, _)| {
            !js[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .filter_map(|(i, _)| {
            let rest = js[i + marker.len()..].trim_start();
            let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            let rest = &rest[1..];
            Some(&rest[..rest.find(quote)?])
        })
        .collect()
}

#[test]
fn run_error_codes_are_codes_js_run_errors() {
    use agentd_core::domain::RunErrorCode::*;
    let server: BTreeSet<String> = [
        UpstreamError,
        UpstreamTimeout,
        MaxIterations,
        Interrupted,
        Internal,
    ]
    .iter()
    .map(|c| {
        serde_json::to_value(c)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    })
    .collect();
    let listed: BTreeSet<String> = codes_json()["run_errors"]
        .as_object()
        .expect("run_errors is an object")
        .keys()
        .cloned()
        .collect();
    assert_eq!(server, listed, "codes.js run_errors != RunErrorCode");
    // The page names them only through runErrorCode() with listed codes.
    for code in js_args(&page_js(), "runErrorCode(") {
        assert!(listed.contains(code), "the page uses run error `{code}`");
    }
}

#[test]
fn app_js_uses_only_codes_from_codes_js() {
    let (errors, events) = codes();
    let js = page_js();

    let used = js_args(&js, "errorCode(");
    assert!(
        used.contains(&"invalid_request") && used.contains(&"cursor_expired"),
        "{used:?}"
    );
    for code in &used {
        assert!(
            errors.contains(*code),
            "the page uses `{code}`, which codes.js does not list"
        );
    }
    // Codes are only named through errorCode(): no `.code === 'x'`, no `['x', ...].includes(f.code)`.
    let compact: String = js.chars().filter(|c| !c.is_whitespace()).collect();
    for bad in [
        ".code==='",
        ".code=='",
        ".code===\"",
        ".code==\"",
        ".code!=='",
        ".code!==\"",
    ] {
        assert!(
            !compact.contains(bad),
            "app.js compares a code with a bare string: {bad}"
        );
    }
    for (i, _) in compact.match_indices("].includes(") {
        let arg = &compact[i + "].includes(".len()..];
        let arg = &arg[..arg.find(')').unwrap_or(arg.len())];
        assert!(
            !arg.ends_with(".code"),
            "app.js checks a code against a bare list"
        );
    }

    let cases = js_args(&js, "case ");
    assert!(cases.contains(&"text_delta"), "{cases:?}");
    for case in &cases {
        assert!(
            events.contains(*case),
            "the page handles event `{case}`, which codes.js does not list"
        );
    }
}

#[test]
fn the_page_loads_codes_js_before_app_js() {
    let html = read("web/static/index.html");
    let codes = html
        .find("src=\"/assets/codes.js\"")
        .expect("codes.js script tag");
    let app = html
        .find("src=\"/assets/app.js\"")
        .expect("app.js script tag");
    assert!(
        html.contains("type=\"module\" src=\"/assets/app.js\""),
        "app.js is an ES module"
    );
    assert!(codes < app, "codes.js must load before app.js");
}
