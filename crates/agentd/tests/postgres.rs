//! agentd on a PostgreSQL store, whatever `AGENTD_TEST_STORE` says: the whole server on a database of its own
//! (a turn, the history and the log surviving a restart), and `serve` refusing to start, in one line, when the
//! database cannot be reached or refuses it. (`AGENTD_TEST_STORE=postgres` runs every other suite on Postgres.)
//! Skipped when no Postgres is reachable, unless CI=true or AGENTD_REQUIRE_PG=1.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentd_store_contract::pg::{self, TestDatabase};
use agentd_testkit::MockUpstream;

/// Runs `agentd serve` on `config_text` and returns its exit code and standard error.
async fn serve_fails(config_text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, config_text).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("agentd exits within 60 s")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn serve_with_an_unreachable_database_exits_1_with_one_line_naming_it() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://agentd:s3cret-pw@127.0.0.1:{port}/agentd_prod");
    let text = common::with_store_url(
        &common::config_text(&upstream.base_url(), dir.path(), 30, ""),
        &url,
    );
    let (code, stderr) = serve_fails(&text).await;
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let line = lines[0];
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(line.contains("agentd_prod"), "{line}");
    assert!(line.to_lowercase().contains("refused"), "the cause: {line}");
    assert!(!line.contains("s3cret-pw"), "never the password: {line}");
}

#[tokio::test]
async fn serve_with_a_refusing_database_exits_1_with_the_servers_reason() {
    // Reachable, but the database does not exist.
    if let Err(e) = TestDatabase::try_create().await {
        assert!(!pg::required(), "postgres is required: {e}");
        eprintln!("skipped: postgres not reachable ({e})");
        return;
    }
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/agentd_no_such_database", pg::base_url());
    let text = common::with_store_url(
        &common::config_text(&upstream.base_url(), dir.path(), 30, ""),
        &url,
    );
    let (code, stderr) = serve_fails(&text).await;
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("agentd_no_such_database"), "{stderr}");
    assert!(lines[0].contains("does not exist"), "{stderr}");
}

#[tokio::test]
async fn the_server_runs_on_postgres_and_keeps_everything_across_a_restart() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // The common kit picks the store from AGENTD_TEST_STORE; this test always uses its own database.
    let upstream = MockUpstream::start().await;
    let text = common::with_store_url(
        &common::config_text(&upstream.base_url(), dir.path(), 30, ""),
        db.url(),
    );
    let config = agentd_core::config::Config::parse(&text, "t.toml").unwrap();
    assert_eq!(config.store_url, db.url());
    let app = agentd::build(config.clone()).await.unwrap();
    let server = common::InProcess::start(app.clone()).await;
    let c = server.client.clone();
    let id = c.session().await;
    let (status, body) = c.send(&id, "tokens=5").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["run"]["status"], "completed", "{body}");
    let mut ws = c.ws(&id, "after=0").await;
    ws.next().await; // hello
    let first = ws.until_finished().await;
    common::assert_gap_free(&first, 1);
    drop(ws);
    server.stop().await;
    drop(app);

    // A new server on the same database: the history and the log are there, and numbering goes on.
    let app = agentd::build(config).await.unwrap();
    let server = common::InProcess::start(app.clone()).await;
    let c = server.client.clone();
    let messages = c.messages(&id).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    let (status, body) = c.send(&id, "tokens=3").await;
    assert_eq!(status, 200, "{body}");
    let mut ws = c.ws(&id, "after=0").await;
    ws.next().await;
    let mut all = ws.until_finished().await;
    if all.len() == first.len() {
        all.extend(ws.until_finished().await);
    }
    common::assert_gap_free(&all, 1);
    assert!(
        all.len() > first.len(),
        "the second turn's events follow the first's"
    );
    assert_eq!(
        &all[..first.len()],
        &first[..],
        "the first turn's log is unchanged"
    );
    server.stop().await;
}
