//! Runs a killed process left unfinished, taken over by the next process (SPEC.md section 4, "Recovery of
//! unfinished runs"): real `agentd serve` processes killed with SIGKILL and started again on the same store
//! (SQLite, or PostgreSQL with `AGENTD_TEST_STORE=postgres`), the mock upstream over real HTTP, clients over
//! real WebSockets and REST.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::path::Path;

use agentd_testkit::{MockUpstream, Reply};
use common::{assert_gap_free, spawn_agentd, Client, Ws};
use serde_json::{json, Value};

/// What a tool call in flight gets when its tool is not safe to repeat.
const INTERRUPTED: &str = "interrupted: the tool may or may not have run";

/// A mock upstream, a data directory with a config, and a first process on it.
struct Setup {
    upstream: MockUpstream,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Setup {
    async fn new(extra: &str, server_extra: &str) -> (Setup, common::Process) {
        let upstream = MockUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &upstream, extra, server_extra);
        let p = spawn_agentd(&config).await;
        (
            Setup {
                upstream,
                _dir: dir,
                config,
            },
            p,
        )
    }

    /// Another process on the same data (after a kill).
    async fn restart(&self) -> common::Process {
        spawn_agentd(&self.config).await
    }
}

fn write_config(
    dir: &Path,
    upstream: &MockUpstream,
    extra: &str,
    server_extra: &str,
) -> std::path::PathBuf {
    let config = dir.join("agentd.toml");
    // Each process listens on a port of its own; one node name makes the next process the same node, which
    // takes over its runs at once (on a shared database another node's wait for its lease to lapse).
    let extra = format!("{extra}\n[cluster]\nnode_id = \"the-node\"\n");
    let text = common::config_text_with(&upstream.base_url(), dir, 30, &extra, server_extra);
    std::fs::write(&config, text).unwrap();
    config
}

/// A client's view of a run's answer: its own text deltas, dropping those a `run_resumed` supersedes (what the
/// web page and `agentd chat` show).
fn shown_text(frames: &[Value], run: &str) -> String {
    let mut deltas: Vec<(u64, String)> = Vec::new();
    for f in frames.iter().filter(|f| f["run_id"] == run) {
        match f["type"].as_str() {
            Some("text_delta") if f["is_subagent"] == false => deltas.push((
                f["seq"].as_u64().unwrap(),
                f["delta"].as_str().unwrap().to_string(),
            )),
            Some("run_resumed") => {
                let from = f["discard_from_seq"].as_u64().unwrap();
                deltas.retain(|(seq, _)| *seq < from);
            }
            _ => {}
        }
    }
    deltas.into_iter().map(|(_, d)| d).collect()
}

fn of_type<'a>(frames: &'a [Value], run: &str, ty: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| f["run_id"] == run && f["type"] == ty)
        .collect()
}

/// The whole log of a session from a fresh socket (replay only, up to the run's `run_finished`).
async fn whole_log(c: &Client, session: &str, run: &str) -> Vec<Value> {
    let mut ws = c.ws(session, "after=0").await;
    ws.next().await; // hello
    let run = run.to_string();
    ws.until(move |f| f["type"] == "run_finished" && f["run_id"] == run)
        .await
}

/// Sends `content` on `ws` and reads until its run has produced `deltas` text deltas of its own; returns the
/// run id and the frames read.
async fn send_and_read(ws: &mut Ws, content: &str, deltas: usize) -> (String, Vec<Value>) {
    ws.send(json!({"type": "message", "content": content}))
        .await;
    let mut seen = Vec::new();
    let mut run = None;
    loop {
        let f = ws.next().await;
        if run.is_none() && f["type"] == "run_started" {
            run = f["run_id"].as_str().map(String::from);
        }
        let own = f["type"] == "text_delta" && f["is_subagent"] == false && run.is_some();
        seen.push(f);
        if own
            && seen
                .iter()
                .filter(|f| f["type"] == "text_delta" && f["is_subagent"] == false)
                .count()
                >= deltas
        {
            return (run.unwrap(), seen);
        }
    }
}

#[tokio::test]
async fn a_run_killed_mid_stream_goes_on_after_the_restart_and_its_partial_text_is_superseded() {
    let (setup, mut p) = Setup::new("", "").await;
    let c = p.client();
    let id = c.session().await;
    let (status, _) = c.send(&id, "tokens=3").await;
    assert_eq!(status, 200);
    let mut ws = c.ws(&id, "").await;
    ws.next().await;
    let (run, seen) = send_and_read(&mut ws, "tokens=300 delay_ms=10", 20).await;
    p.kill_9();
    drop(ws);

    let mut p2 = setup.restart().await;
    let c2 = p2.client();
    let mut ws = c2.ws(&id, "after=0").await;
    let hello = ws.next().await;
    assert_eq!(
        hello["active_run_id"],
        run.as_str(),
        "the resumed run is the session's active run"
    );
    let last_seen = seen.last().unwrap()["seq"].as_u64().unwrap();
    let mut replay: Vec<Value> = Vec::new();
    while replay
        .last()
        .is_none_or(|f| f["seq"].as_u64() < Some(last_seen))
    {
        replay.push(ws.next().await);
    }
    // The replay is the first turn's events, then exactly those the client saw.
    let first_turn = replay.len() - seen.len();
    assert_eq!(
        &replay[first_turn..],
        &seen[..],
        "every event a client saw keeps its seq"
    );
    let r = run.clone();
    let rest = ws
        .until(move |f| f["type"] == "run_finished" && f["run_id"] == r)
        .await;
    let mut all = replay;
    all.extend(rest);
    assert_gap_free(&all, 1);

    let resumed = of_type(&all, &run, "run_resumed");
    assert_eq!(resumed.len(), 1, "one resumption: {resumed:?}");
    let started_seq = of_type(&all, &run, "run_started")[0]["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(resumed[0]["attempt"], 1);
    assert!(
        resumed[0]["node"].as_str().is_some_and(|n| !n.is_empty()),
        "{}",
        resumed[0]
    );
    assert_eq!(
        resumed[0]["discard_from_seq"].as_u64(),
        Some(started_seq + 1),
        "the interrupted model call's deltas are superseded"
    );
    assert_eq!(resumed[0]["run"]["status"], "running");
    let finished = of_type(&all, &run, "run_finished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["run"]["status"], "completed", "{}", finished[0]);
    let answer = common::mock_tokens(300);
    assert_eq!(finished[0]["content"], answer.as_str());
    assert_eq!(
        shown_text(&all, &run),
        answer,
        "a client dropping superseded text shows the answer once"
    );
    // The stored history has the answer once, and both user messages.
    let msgs = c2.messages(&id).await;
    assert_eq!(msgs.iter().filter(|m| m["role"] == "user").count(), 2);
    let answers: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["role"] == "assistant" && m["run_id"] == run.as_str())
        .collect();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0]["content"], answer.as_str());
    let (_, stored) = c2.get(&format!("/v1/sessions/{id}/runs/{run}")).await;
    assert_eq!(stored["status"], "completed");
    p2.kill_9();
}

#[tokio::test]
async fn with_recovery_interrupt_a_killed_run_ends_interrupted() {
    let (setup, mut p) = Setup::new("", "recovery = \"interrupt\"").await;
    let c = p.client();
    let id = c.session().await;
    let mut ws = c.ws(&id, "").await;
    ws.next().await;
    let (run, seen) = send_and_read(&mut ws, "tokens=1000 delay_ms=10", 10).await;
    p.kill_9();
    drop(ws);

    let mut p2 = setup.restart().await;
    let c2 = p2.client();
    let all = whole_log(&c2, &id, &run).await;
    assert_eq!(
        &all[..seen.len()],
        &seen[..],
        "every event a client saw keeps its seq"
    );
    assert!(of_type(&all, &run, "run_resumed").is_empty());
    let finished = all.last().unwrap();
    assert_eq!(finished["run"]["status"], "interrupted");
    assert_eq!(finished["run"]["error"]["code"], "interrupted");
    assert_gap_free(&all, 1);
    p2.kill_9();
}

#[tokio::test]
async fn a_run_resumed_max_resumes_times_ends_interrupted_at_the_next_loss() {
    let (setup, mut p) = Setup::new("", "max_resumes = 1").await;
    let id = p.client().session().await;
    let mut ws = p.client().ws(&id, "").await;
    ws.next().await;
    let (run, _) = send_and_read(&mut ws, "tokens=3000 delay_ms=10", 5).await;
    p.kill_9();

    // Resumed once: wait until it streams again, then lose it again.
    let mut p = setup.restart().await;
    let mut ws = p.client().ws(&id, "").await;
    ws.next().await;
    let r = run.clone();
    let mut frames = ws
        .until(move |f| f["type"] == "run_resumed" && f["run_id"] == r)
        .await;
    for _ in 0..5 {
        let r = run.clone();
        frames.extend(
            ws.until(move |f| f["type"] == "text_delta" && f["run_id"] == r)
                .await,
        );
    }
    assert_eq!(
        of_type(&frames, &run, "run_resumed").len(),
        1,
        "the first loss resumes the run"
    );
    p.kill_9();

    let mut p = setup.restart().await;
    let all = whole_log(&p.client(), &id, &run).await;
    assert_eq!(
        of_type(&all, &run, "run_resumed").len(),
        1,
        "no second resumption"
    );
    let finished = of_type(&all, &run, "run_finished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["run"]["status"], "interrupted");
    let message = finished[0]["run"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_resumes"), "{message}");
    assert_gap_free(&all, 1);
    p.kill_9();
}

/// Two sessions each with a subagent call in flight at the kill: the agent that lists the subagent in
/// `retry_tools` runs it again; the other gets the interrupted result, and its model decides.
#[tokio::test]
async fn a_tool_call_in_flight_runs_again_only_when_its_tool_is_safe_to_repeat() {
    let agents = r#"
[[agents]]
name = "helper"
provider = "upstream"
model = "mock-model"

[[agents]]
name = "delegator"
provider = "upstream"
model = "mock-model"
subagents = ["helper"]

[[agents]]
name = "careful"
provider = "upstream"
model = "mock-model"
subagents = ["helper"]
retry_tools = ["helper"]
"#;
    let (setup, mut p) = Setup::new(agents, "").await;
    let upstream = &setup.upstream;
    let c = p.client();
    let mut runs = Vec::new();
    for (agent, call) in [("delegator", "call_unsafe"), ("careful", "call_safe")] {
        let (status, s) = c.post("/v1/sessions", json!({"agent": agent})).await;
        assert_eq!(status, 201, "{s}");
        let id = s["id"].as_str().unwrap().to_string();
        upstream.push(Reply::tool_call(
            call,
            "helper",
            r#"{"task": "tokens=150 delay_ms=20"}"#,
        ));
        let mut ws = c.ws(&id, "").await;
        ws.next().await;
        ws.send(json!({"type": "message", "content": "delegate"}))
            .await;
        // In flight: the subagent streams.
        let frames = ws
            .until(|f| f["type"] == "text_delta" && f["is_subagent"] == true)
            .await;
        let run = frames.iter().find(|f| f["type"] == "run_started").unwrap()["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        runs.push((id, run, call));
    }
    p.kill_9();

    let mut p2 = setup.restart().await;
    let c2 = p2.client();
    for (id, run, call) in &runs {
        let all = whole_log(&c2, id, run).await;
        assert_gap_free(&all, 1);
        assert_eq!(of_type(&all, run, "run_resumed").len(), 1);
        let finished = of_type(&all, run, "run_finished")[0];
        assert_eq!(finished["run"]["status"], "completed", "{finished}");
        let results: Vec<&Value> = of_type(&all, run, "tool_finished")
            .into_iter()
            .filter(|f| f["call_id"] == *call && f["is_subagent"] == false)
            .collect();
        assert_eq!(results.len(), 1, "one result for {call}: {results:?}");
        let stored: Vec<Value> = c2
            .messages(id)
            .await
            .into_iter()
            .filter(|m| m["role"] == "tool" && m["tool_call_id"] == *call)
            .collect();
        assert_eq!(stored.len(), 1, "one stored result for {call}");
        if *call == "call_unsafe" {
            assert_eq!(results[0]["success"], false);
            assert_eq!(results[0]["result"], INTERRUPTED);
            assert_eq!(stored[0]["content"], INTERRUPTED);
            assert_eq!(
                finished["content"],
                format!("The result is {INTERRUPTED}.").as_str()
            );
            assert_eq!(
                of_type(&all, run, "tool_started").len(),
                1,
                "not started again"
            );
        } else {
            assert_eq!(results[0]["success"], true, "{}", results[0]);
            assert_eq!(results[0]["result"], common::mock_tokens(150).as_str());
            assert_eq!(
                finished["content"],
                format!("The result is {}.", common::mock_tokens(150)).as_str()
            );
            assert_eq!(
                of_type(&all, run, "tool_started").len(),
                2,
                "started again after the restart"
            );
        }
    }
    p2.kill_9();
}

#[tokio::test]
async fn a_question_pending_at_the_kill_keeps_waiting_under_its_request_id() {
    let (setup, mut p) = Setup::new("", "").await;
    let upstream = &setup.upstream;
    let c = p.client();
    let id = c.session().await;
    let (_asking, run, request_id) = common::ask_colour(&c, upstream, &id).await;
    p.kill_9();

    let mut p2 = setup.restart().await;
    let c2 = p2.client();
    let mut ws = c2.ws(&id, "after=0").await;
    ws.next().await;
    ws.until(|f| f["type"] == "run_resumed").await;
    // A reply through REST, under the request id the client saw before the kill.
    let (status, body) = c2
        .post(
            &format!("/v1/sessions/{id}/runs/{run}/input"),
            json!({"request_id": request_id, "content": "blue"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let all = whole_log(&c2, &id, &run).await;
    assert_eq!(
        of_type(&all, &run, "input_requested").len(),
        1,
        "asked once"
    );
    let received = of_type(&all, &run, "input_received");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["request_id"], request_id.as_str());
    let finished = of_type(&all, &run, "run_finished")[0];
    assert_eq!(finished["run"]["status"], "completed");
    assert_eq!(finished["content"], "The result is blue.");
    assert_gap_free(&all, 1);
    p2.kill_9();
}

/// A graceful stop whose grace runs out with a turn still running hands the run to the next process: it ends
/// nothing and records nothing of the step it cut (no partial answer), and the next start resumes it.
#[tokio::test]
async fn a_run_still_going_when_the_shutdown_grace_runs_out_is_resumed_by_the_next_process() {
    let (setup, mut p) = Setup::new("", "").await; // shutdown_grace_s = 2
    let c = p.client();
    let id = c.session().await;
    let mut ws = c.ws(&id, "").await;
    ws.next().await;
    let (run, _) = send_and_read(&mut ws, "tokens=600 delay_ms=10", 5).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = p.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "a graceful stop");

    let mut p2 = setup.restart().await;
    let c2 = p2.client();
    let all = whole_log(&c2, &id, &run).await;
    assert_gap_free(&all, 1);
    assert_eq!(of_type(&all, &run, "run_resumed").len(), 1);
    let finished = of_type(&all, &run, "run_finished");
    assert_eq!(finished.len(), 1, "no end was recorded at the stop");
    assert_eq!(finished[0]["run"]["status"], "completed");
    assert_eq!(finished[0]["content"], common::mock_tokens(600).as_str());
    assert_eq!(shown_text(&all, &run), common::mock_tokens(600));
    let answers = c2
        .messages(&id)
        .await
        .into_iter()
        .filter(|m| m["role"] == "assistant")
        .count();
    assert_eq!(answers, 1, "no partial answer was stored at the stop");
    p2.kill_9();
}
