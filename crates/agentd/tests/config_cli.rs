//! Config errors as a newcomer meets them, through the real binary: `agentd check-config FILE` names the key
//! and line of every problem (a wrong type too), judges the file and not the environment (an unset `*_env`
//! variable is a warning, exit 0), and `agentd serve` still refuses to start without the variable (exit 1,
//! naming the key, its line and the variable) — and starts once it is set.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A valid config using every section; `{dir}` is the test's folder. Line numbers below refer to this text.
const CONFIG: &str = r#"[server]
listen = "127.0.0.1:0"
workspace_dir = "{dir}/workspaces"
shutdown_grace_s = 1

[store]
url = "sqlite://{dir}/agentd.db"

[[auth.keys]]
principal = "alice"
key_env = "AGENTD_TEST_CONFIG_CLI_ALICE_KEY"

[providers.upstream]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "AGENTD_TEST_CONFIG_CLI_UPSTREAM_KEY"
timeout_s = 5

[[agents]]
name = "assistant"
provider = "upstream"
model = "m"
tools = ["calculator"]
skills = ["math"]
max_iterations = 4

[[skills]]
name = "math"
keywords = ["sum"]
"#;

const ALICE_VAR: &str = "AGENTD_TEST_CONFIG_CLI_ALICE_KEY";
const UPSTREAM_VAR: &str = "AGENTD_TEST_CONFIG_CLI_UPSTREAM_KEY";

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text.replace("{dir}", &dir.display().to_string())).unwrap();
    path
}

fn agentd(args: &[&str], file: &Path, vars_set: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
    cmd.args(args).arg(file).env("RUST_LOG", "warn");
    if vars_set {
        cmd.env(ALICE_VAR, "sk-alice").env(UPSTREAM_VAR, "sk-up");
    } else {
        cmd.env_remove(ALICE_VAR).env_remove(UPSTREAM_VAR);
    }
    cmd.env_remove("AGENTD_CONFIG").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_wrong_type_names_its_key_and_line_in_every_section() {
    let dir = tempfile::tempdir().unwrap();
    // (what to replace, with what, the message check-config must print)
    let cases = [
        (
            "max_iterations = 4",
            "max_iterations = \"lots\"",
            "line 25: agents[0].max_iterations: invalid type: string \"lots\", expected u32",
        ),
        (
            "shutdown_grace_s = 1",
            "shutdown_grace_s = \"soon\"",
            "line 4: server.shutdown_grace_s: invalid type: string \"soon\", expected u64",
        ),
        (
            "url = \"sqlite://{dir}/agentd.db\"",
            "url = 42",
            "line 7: store.url: invalid type: integer `42`, expected a string",
        ),
        (
            "principal = \"alice\"",
            "principal = [\"alice\"]",
            "line 10: auth.keys[0].principal: invalid type: sequence, expected a string",
        ),
        (
            "timeout_s = 5",
            "timeout_s = \"slow\"",
            "line 17: providers.upstream.timeout_s: invalid type: string \"slow\", expected u64",
        ),
        (
            "keywords = [\"sum\"]",
            "keywords = \"sum\"",
            "line 29: skills[0].keywords: invalid type: string \"sum\", expected a sequence",
        ),
        (
            "timeout_s = 5",
            "timeout_s = 5\ntemperature = 0.5",
            "line 18: providers.upstream.temperature: unknown field `temperature`",
        ),
    ];
    for (i, (from, to, expected)) in cases.into_iter().enumerate() {
        assert!(CONFIG.contains(from), "{from}");
        let file = write(
            dir.path(),
            &format!("bad{i}.toml"),
            &CONFIG.replacen(from, to, 1),
        );
        let out = agentd(&["check-config"], &file, true);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{to}: {err}");
        assert!(
            err.contains(&format!("{}: {expected}", file.display())),
            "{to}: expected `{expected}` in:\n{err}"
        );
    }
}

#[test]
fn check_config_warns_about_unset_variables_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "agentd.toml", CONFIG);
    let out = agentd(&["check-config"], &file, false);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let shown = file.display();
    assert!(
        stderr.contains(&format!(
            "{shown}: warning: line 11: auth.keys[0].key_env: environment variable `{ALICE_VAR}` is not set"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{shown}: warning: line 16: providers.upstream.api_key_env: environment variable `{UPSTREAM_VAR}` is not set"
        )),
        "{stderr}"
    );
    assert!(
        stdout.contains("ok (1 agents, 1 providers, 1 skills, 2 warnings)"),
        "{stdout}"
    );

    // With the variables set: no warning at all.
    let out = agentd(&["check-config"], &file, true);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("ok (1 agents, 1 providers, 1 skills)"));

    // A problem of the file is still an error, whatever the environment.
    let bad = write(
        dir.path(),
        "bad.toml",
        &CONFIG.replace("tools = [\"calculator\"]", "tools = [\"shell\"]"),
    );
    let out = agentd(&["check-config"], &bad, false);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("line 23: agents[0].tools[0]: unknown tool `shell`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn serve_refuses_to_start_without_the_variable_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "agentd.toml", CONFIG);
    let (code, err) = serve_until_exit(&file, &[], &[(UPSTREAM_VAR, "sk-up")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}: line 11: auth.keys[0].key_env: environment variable `{ALICE_VAR}` is not set",
            file.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains(UPSTREAM_VAR),
        "only the unset variable is named: {err}"
    );
    // Nothing was created: the store was never opened.
    assert!(!dir.path().join("agentd.db").exists());
}

#[tokio::test]
async fn serve_starts_once_the_variables_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "agentd.toml", CONFIG);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["serve", "--config"])
        .arg(&file)
        // A host name: resolved, served on its IPv4 loopback address.
        .args(["--listen", &format!("localhost:{port}")])
        .env(ALICE_VAR, "sk-alice")
        .env(UPSTREAM_VAR, "sk-up")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut up = false;
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            up = r.status() == 200;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The key read from the variable is the one the server takes.
    let sessions = if up {
        Some(
            http.get(format!("{url}/v1/sessions"))
                .bearer_auth("sk-alice")
                .send()
                .await
                .map(|r| r.status().as_u16()),
        )
    } else {
        None
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        up,
        "serve did not come up on localhost:{port} with its variables set"
    );
    assert_eq!(sessions.unwrap().unwrap(), 200);
}

/// Runs `agentd serve --config file ARGS` with only the variables `vars` set, until it exits (at most 60 s: a
/// hung server would hang the test); its exit code and stderr.
fn serve_until_exit(file: &Path, args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
    cmd.args(["serve", "--config"])
        .arg(file)
        .args(args)
        .env_remove(ALICE_VAR)
        .env_remove(UPSTREAM_VAR)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    (status.code(), text(&out.stderr))
}

#[test]
fn a_taken_port_fails_before_the_store_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "agentd.toml", CONFIG);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for listen in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let vars = [(ALICE_VAR, "sk-alice"), (UPSTREAM_VAR, "sk-up")];
        let (code, err) = serve_until_exit(&file, &["--listen", &listen], &vars);
        assert_eq!(code, Some(1), "{listen}: {err}");
        assert!(
            err.contains(&format!(
                "server.listen: cannot listen on 127.0.0.1:{port}: the port is already in use"
            )),
            "{listen}: {err}"
        );
        // Nothing was created: the store was never opened.
        assert!(!dir.path().join("agentd.db").exists(), "{listen}");
        assert!(!dir.path().join("workspaces").exists(), "{listen}");
    }
    drop(taken);
}

#[test]
fn a_host_name_in_listen_passes_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "agentd.toml",
        &CONFIG.replace("127.0.0.1:0", "localhost:0"),
    );
    let out = agentd(&["check-config"], &file, true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let bad = write(
        dir.path(),
        "bad.toml",
        &CONFIG.replace("127.0.0.1:0", "localhost"),
    );
    let out = agentd(&["check-config"], &bad, true);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("line 2: server.listen: `localhost` is not an address like 127.0.0.1:8080 or a host name and port like localhost:8080"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_misspelled_key_gets_did_you_mean() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "typo.toml",
        &CONFIG
            .replace("shutdown_grace_s = 1", "shutdown_grace = 1")
            .replace("max_iterations = 4", "max_iteration = 4"),
    );
    let out = agentd(&["check-config"], &file, true);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}: line 4: server.shutdown_grace: unknown field `shutdown_grace` (did you mean `shutdown_grace_s`?)",
            file.display()
        )),
        "{err}"
    );
}
