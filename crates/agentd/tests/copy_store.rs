//! `agentd copy-store FROM_URL TO_URL`, the real binary, both ways: a SQLite store filled through a real server
//! (turns through the mock upstream, two principals, an upload, a cut tool result, a log whose start retention
//! pruned) is copied into a fresh PostgreSQL database; a server on that database (with a fresh workspace
//! folder, as a new node would have) answers history, runs, events and file ids exactly as before, and a new
//! turn numbers on after the copied last seq; that database is copied back into a new SQLite file, which
//! reads the same again. A target that is not empty is refused. Skipped when no Postgres is reachable, unless
//! CI=true or AGENTD_REQUIRE_PG=1.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentd_store_contract::pg::TestDatabase;
use agentd_testkit::Reply;
use common::{Client, Options, Server};
use serde_json::{json, Map, Value};

const KEYS: &str = r#"
[[auth.keys]]
principal = "alice"
key = "sk-alice"

[[auth.keys]]
principal = "bob"
key = "sk-bob"
"#;

/// Small enough that reading a 2,000-byte upload is cut (and kept as an upload).
const SERVER_EXTRA: &str = "max_tool_result_bytes = 1024";

async fn server_on(store_url: &str) -> Server {
    Server::start_with(Options {
        extra: KEYS.into(),
        server_extra: SERVER_EXTRA.into(),
        store_url: Some(store_url.to_string()),
        ..Default::default()
    })
    .await
}

async fn upload(s: &Server, c: &Client, session: &str, name: &str, bytes: Vec<u8>) -> Value {
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name.to_string())
        .mime_str("text/plain")
        .unwrap();
    let resp = c
        .http
        .post(format!("{}/v1/sessions/{session}/files", s.url))
        .bearer_auth(c.key.as_deref().unwrap())
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

/// Runs `agentd copy-store`; returns its exit code, stdout and stderr.
async fn copy_store(from: &str, to: &str) -> (Option<i32>, String, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["copy-store", from, to])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("copy-store ends within 120 s")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!(
        "agentd copy-store {from} {to}: {:?}\n{stdout}{stderr}",
        out.status.code()
    );
    (out.status.code(), stdout, stderr)
}

/// The whole stored log of a session, as the native WebSocket replays it: from `after=0`, or, when retention
/// pruned the log's start (the cursor has expired), from the first `after` still retained.
async fn events(c: &Client, session: &str) -> Vec<Value> {
    for after in 0u64.. {
        let mut ws = c.ws(session, &format!("after={after}")).await;
        let hello = ws.next().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        let last = hello["last_seq"].as_u64().unwrap();
        if last == 0 {
            return Vec::new();
        }
        let mut out: Vec<Value> = Vec::new();
        while out.last().and_then(|f| f["seq"].as_u64()) != Some(last) {
            let f = ws.next().await;
            if f["type"] == "error" && f.to_string().contains("cursor_expired") {
                break;
            }
            if f.get("seq").is_some() {
                out.push(f);
            }
        }
        if !out.is_empty() {
            assert_eq!(out[0]["seq"].as_u64(), Some(after + 1));
            return out;
        }
        assert!(after < last, "no retained event of {session}");
    }
    unreachable!()
}

/// Everything both principals see through the REST API and the WebSocket: sessions (newest first), each with
/// its messages, runs and whole event log.
async fn snapshot(s: &Server) -> Value {
    let mut all = Map::new();
    for key in ["sk-alice", "sk-bob"] {
        let c = s.client_with_key(Some(key));
        let (status, sessions) = c.get("/v1/sessions?limit=100").await;
        assert_eq!(status, 200, "{sessions}");
        let mut list = Vec::new();
        for session in sessions.as_array().unwrap() {
            let id = session["id"].as_str().unwrap();
            let (_, runs) = c.get(&format!("/v1/sessions/{id}/runs")).await;
            list.push(json!({
                "session": session,
                "messages": c.messages(id).await,
                "runs": runs,
                "events": events(&c, id).await,
            }));
        }
        all.insert(key.into(), Value::Array(list));
    }
    Value::Object(all)
}

/// Waits until no store holds the SQLite database's lock (the stopped server's last tasks have let go of it).
async fn wait_unlocked(lock: &std::path::Path) {
    for _ in 0..200 {
        let file = std::fs::OpenOptions::new().write(true).open(lock).unwrap();
        if file.try_lock().is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} is still locked", lock.display());
}

/// The file id a cut tool result's note names.
fn note_file_id(result: &str) -> String {
    result
        .split("file id `")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .unwrap()
        .to_string()
}

/// Sends a message naming `file_id` and has the model read `path`: the tool message is what it read.
async fn read_through_file_id(
    s: &Server,
    c: &Client,
    session: &str,
    file_id: &str,
    path: &str,
) -> String {
    s.upstream.push(Reply::tool_call(
        "read",
        "read_file",
        &json!({ "path": path }).to_string(),
    ));
    s.upstream.push(Reply::text("read"));
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{session}/messages"),
            json!({"content": "read the file", "files": [file_id]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let msgs = c.messages(session).await;
    msgs.iter()
        .rev()
        .find(|m| m["role"] == "tool")
        .and_then(|m| m["content"].as_str())
        .unwrap()
        .to_string()
}

fn last_seq(snap: &Value, key: &str, session: &str) -> u64 {
    snap[key]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"]["id"] == session)
        .and_then(|s| s["events"].as_array().unwrap().last())
        .and_then(|e| e["seq"].as_u64())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres_and_back_keeps_everything() {
    let Some(pg_db) = TestDatabase::create().await else {
        eprintln!("skipped: no PostgreSQL");
        return;
    };
    let src_dir = Arc::new(tempfile::tempdir().unwrap());
    let sqlite_url = format!("sqlite://{}/agentd.db", src_dir.path().display());

    // 1. Fill a SQLite store through a real server.
    let s = Server::start_with(Options {
        extra: KEYS.into(),
        server_extra: SERVER_EXTRA.into(),
        store_url: Some(sqlite_url.clone()),
        dir: Some(src_dir.clone()),
        ..Default::default()
    })
    .await;
    let alice = s.client_with_key(Some("sk-alice"));
    let bob = s.client_with_key(Some("sk-bob"));
    let a = alice.session().await;
    for text in ["hello", "how are you"] {
        let (status, v) = alice.send(&a, text).await;
        assert_eq!(status, 200, "{v}");
    }
    let notes = upload(&s, &alice, &a, "notes.txt", b"the note".to_vec()).await;
    let long: String = "0123456789".repeat(200);
    let big = upload(&s, &alice, &a, "big.txt", long.clone().into_bytes()).await;
    // Reading big.txt gives 2,000 bytes: cut to 1,024, the whole kept as an upload the note names.
    let cut = read_through_file_id(&s, &alice, &a, big["id"].as_str().unwrap(), "big.txt").await;
    assert!(cut.contains("[tool result cut: "), "{cut}");
    let cut_id = note_file_id(&cut);
    // Bob's session runs past retention (20 runs): its log's start is pruned.
    let b = bob.session().await;
    for i in 0..22 {
        let (status, v) = bob.send(&b, &format!("turn {i}")).await;
        assert_eq!(status, 200, "{v}");
    }
    let before = snapshot(&s).await;
    let bob_events = before["sk-bob"][0]["events"].as_array().unwrap();
    assert!(
        bob_events[0]["seq"].as_u64().unwrap() > 1,
        "retention pruned the start"
    );
    s.shutdown().await.unwrap();
    wait_unlocked(&src_dir.path().join("agentd.db.lock")).await;

    // 2. SQLite -> Postgres.
    let (code, stdout, stderr) = copy_store(&sqlite_url, pg_db.url()).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("2 sessions"), "{stdout}");
    assert!(stdout.contains("3 uploads"), "{stdout}");
    assert!(stderr.contains("sessions 2/2"), "progress: {stderr}");

    // 3. A server on Postgres, with an empty workspace folder: everything reads the same.
    let p = server_on(pg_db.url()).await;
    assert_eq!(snapshot(&p).await, before);
    let alice_p = p.client_with_key(Some("sk-alice"));
    // The file ids work: the files come from the store into the new workspace.
    let read =
        read_through_file_id(&p, &alice_p, &a, notes["id"].as_str().unwrap(), "notes.txt").await;
    assert_eq!(read, "the note");
    let kept =
        read_through_file_id(&p, &alice_p, &a, &cut_id, "tool-result-read_file-read.txt").await;
    assert!(kept.starts_with("0123456789"), "{kept}");
    let workspace = p.dir.path().join("workspaces").join(&a);
    assert_eq!(
        std::fs::read_to_string(workspace.join("big.txt")).unwrap(),
        long
    );
    // A new turn numbers on right after the copied last seq.
    let bob_p = p.client_with_key(Some("sk-bob"));
    let old_last = last_seq(&before, "sk-bob", &b);
    let (status, v) = bob_p.send(&b, "one more").await;
    assert_eq!(status, 200, "{v}");
    let mut ws = bob_p.ws(&b, &format!("after={old_last}")).await;
    let hello = ws.next().await;
    assert!(hello["last_seq"].as_u64().unwrap() > old_last, "{hello}");
    let first = ws.next().await;
    assert_eq!(first["seq"].as_u64(), Some(old_last + 1), "{first}");
    drop(ws);
    let on_pg = snapshot(&p).await;
    p.shutdown().await.unwrap();

    // 4. A target that is not empty is refused, and left as it was.
    let (code, stdout, stderr) = copy_store(&sqlite_url, pg_db.url()).await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("not empty"), "{stderr}");

    // 5. Postgres -> a new SQLite file: the same again, file ids included.
    let back_dir = tempfile::tempdir().unwrap();
    let back_url = format!("sqlite://{}/copy.db", back_dir.path().display());
    let (code, stdout, stderr) = copy_store(pg_db.url(), &back_url).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    let q = server_on(&back_url).await;
    assert_eq!(snapshot(&q).await, on_pg);
    let alice_q = q.client_with_key(Some("sk-alice"));
    let read =
        read_through_file_id(&q, &alice_q, &a, notes["id"].as_str().unwrap(), "notes.txt").await;
    assert_eq!(read, "the note");
    q.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_source_or_a_bad_url_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite://{}/none.db", dir.path().display());
    let target = format!("sqlite://{}/target.db", dir.path().display());
    let (code, _, stderr) = copy_store(&missing, &target).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no SQLite database"), "{stderr}");
    assert!(
        !dir.path().join("none.db").exists(),
        "the source is not created"
    );
    let (code, _, stderr) = copy_store(&target, &target).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("same store"), "{stderr}");
}
