//! The config loader (`Config::parse_with_env`, what `agentd serve`/`check-config` run on a file's text).
#![no_main]

use agentd_core::config::Config;
use libfuzzer_sys::fuzz_target;

/// A made-up environment: variables whose name has an even length are set.
fn env(name: &str) -> Option<String> {
    (name.len() % 2 == 0).then(|| format!("value-of-{name}"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse_with_env(text, "fuzz.toml", &env) {
        Ok(config) => {
            assert!(!config.agents.is_empty());
            for agent in &config.agents {
                assert!(config.providers.contains_key(&agent.provider));
            }
            // Deterministic: the same text gives the same config.
            let again = Config::parse_with_env(text, "fuzz.toml", &env);
            assert_eq!(again.as_ref().ok(), Some(&config));
        }
        Err(e) => {
            assert!(!e.problems.is_empty());
            let lines = text.split('\n').count();
            for p in &e.problems {
                assert!(!p.key.is_empty());
                if let Some(line) = p.line {
                    assert!(line >= 1 && line <= lines, "line {line} of {lines}");
                }
            }
            let _ = e.to_string();
        }
    }
});
