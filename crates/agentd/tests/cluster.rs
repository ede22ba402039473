//! Several `agentd serve` processes on one PostgreSQL database (SPEC.md section 6): the registry
//! (`GET /v1/cluster`), `Run.node`, start-up that leaves a live node's runs alone, takeover of a lost node's runs
//! within the lease, a graceful hand-over, fencing of a node frozen past its lease, a node that loses its
//! database connections, live events, cancels, replies and `multitask` across nodes, and one turn per session
//! across the cluster. Real processes, a real PostgreSQL database of the test's own, the mock upstream over
//! HTTP. (A single node on SQLite lists itself.)

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::time::{Duration, Instant};

use agentd_store_contract::pg::TestDatabase;
use agentd_testkit::MockUpstream;
use common::{spawn_agentd, Client, Process};
use serde_json::{json, Value};

/// A database, a mock upstream and a directory for configs, shared by the nodes of one test.
async fn shared() -> (TestDatabase, MockUpstream, tempfile::TempDir) {
    let db = TestDatabase::try_create()
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    (
        db,
        MockUpstream::start().await,
        tempfile::tempdir().unwrap(),
    )
}

/// Nodes a and b (4 s lease) on a database of the test's own, with their upstream (the database and the
/// config folder are returned to be kept until the end).
async fn two_nodes() -> (
    TestDatabase,
    MockUpstream,
    tempfile::TempDir,
    Process,
    Process,
) {
    let (db, upstream, dir) = shared().await;
    let a = spawn_agentd(&node_config(dir.path(), db.url(), &upstream, "a")).await;
    let b = spawn_agentd(&node_config(dir.path(), db.url(), &upstream, "b")).await;
    (db, upstream, dir, a, b)
}

/// A config for node `node_id` on `store_url`, with a 4 s lease: lost after 2 s without a renewal, swept
/// for every 0.67 s.
fn node_config(
    dir: &std::path::Path,
    store_url: &str,
    upstream: &MockUpstream,
    node_id: &str,
) -> std::path::PathBuf {
    node_config_leased(dir, store_url, upstream, node_id, 4)
}

fn node_config_leased(
    dir: &std::path::Path,
    store_url: &str,
    upstream: &MockUpstream,
    node_id: &str,
    lease_s: u64,
) -> std::path::PathBuf {
    let path = dir.join(format!("{node_id}.toml"));
    let extra = format!("[cluster]\nnode_id = \"{node_id}\"\nlease_s = {lease_s}\n");
    let text = common::config_text_on(store_url, &upstream.base_url(), dir, 30, &extra, "");
    std::fs::write(&path, text).unwrap();
    path
}

async fn run_of(c: &Client, session: &str, run: &str) -> Value {
    c.get(&format!("/v1/sessions/{session}/runs/{run}")).await.1
}

/// Waits until the run's status is `status` (30 s at most); returns the run.
async fn wait_status(c: &Client, session: &str, run: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = run_of(c, session, run).await;
        if r["status"] == status {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "run {run} never became {status}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_ids(nodes: &Value) -> Vec<String> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap().to_string())
        .collect()
}

fn of_type<'a>(events: &'a [Value], ty: &str) -> Vec<&'a Value> {
    events.iter().filter(|f| f["type"] == ty).collect()
}

async fn events_of(c: &Client, session: &str, run: &str) -> Vec<Value> {
    let mut ws = c.ws(session, "after=0").await;
    ws.next().await;
    let run = run.to_string();
    ws.until(move |f| f["type"] == "run_finished" && f["run_id"] == run)
        .await
}

#[tokio::test]
async fn a_node_starting_beside_a_live_run_leaves_it_and_a_lost_nodes_run_is_taken_over_within_the_lease(
) {
    let (db, upstream, dir) = shared().await;
    let mut a = spawn_agentd(&node_config(dir.path(), db.url(), &upstream, "a")).await;
    let ca = a.client();
    let session = ca.session().await;
    let run = ca.send_bg(&session, "tokens=300 delay_ms=10").await;
    let running = wait_status(&ca, &session, &run, "running").await;
    assert_eq!(
        running["node"], "a",
        "the run names the node executing it: {running}"
    );

    // Node b starts while a's run is live: it leaves it alone, and both nodes are in the registry.
    let mut b = spawn_agentd(&node_config(dir.path(), db.url(), &upstream, "b")).await;
    let cb = b.client();
    let (status, nodes) = cb.get("/v1/cluster").await;
    assert_eq!(status, 200, "{nodes}");
    assert_eq!(node_ids(&nodes), ["a", "b"]);
    let a_entry = &nodes.as_array().unwrap()[0];
    assert_eq!(a_entry["runs"], 1, "a executes one run: {nodes}");
    assert!(
        a_entry["listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{nodes}"
    );
    assert!(a_entry["last_seen"].as_str().is_some() && a_entry["started_at"].as_str().is_some());
    let done = wait_status(&ca, &session, &run, "completed").await;
    assert!(done["node"].is_null(), "a finished run has no node: {done}");
    let events = events_of(&cb, &session, &run).await;
    assert!(
        events.iter().all(|f| f["type"] != "run_resumed"),
        "nobody took over a live node's run"
    );

    // A long run on a, then a is lost: b, sweeping every sixth of the lease, takes the run over once a's
    // lease has lapsed (half the lease without a renewal), and it goes on from its last durable step.
    let run = ca.send_bg(&session, "tokens=400 delay_ms=10").await;
    wait_status(&ca, &session, &run, "running").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill_9();
    let lost = Instant::now();
    let (_, nodes) = cb.get("/v1/cluster").await;
    assert_eq!(
        node_ids(&nodes),
        ["a", "b"],
        "within the lease, a still counts as alive"
    );
    let events = {
        let mut ws = cb.ws(&session, "after=0").await;
        ws.next().await;
        let r = run.clone();
        ws.until(move |f| f["type"] == "run_resumed" && f["run_id"] == r)
            .await
    };
    let took = lost.elapsed();
    assert!(
        took >= Duration::from_millis(1300) && took < Duration::from_secs(10),
        "taken over once a's lease lapsed (2 s after its last renewal, renewed every 0.67 s), well within \
         10 s: {took:?}"
    );
    let resumed = events.last().unwrap();
    assert_eq!(resumed["node"], "b");
    assert_eq!(resumed["run"]["node"], "b");
    let (_, nodes) = cb.get("/v1/cluster").await;
    assert_eq!(node_ids(&nodes), ["b"], "a's lease has lapsed");
    let done = wait_status(&cb, &session, &run, "completed").await;
    assert!(done["node"].is_null());
    let events = events_of(&cb, &session, &run).await;
    let resumed = of_type(&events, "run_resumed");
    assert_eq!(resumed.len(), 1, "one takeover");
    common::assert_gap_free(&events, 1);

    // A node starting later finds nothing to take over, and the registry has it beside b.
    let mut c = spawn_agentd(&node_config(dir.path(), db.url(), &upstream, "c")).await;
    let (_, nodes) = c.client().get("/v1/cluster").await;
    assert_eq!(node_ids(&nodes), ["b", "c"]);
    let events = events_of(&c.client(), &session, &run).await;
    assert_eq!(
        events.iter().filter(|f| f["type"] == "run_resumed").count(),
        1
    );
    b.kill_9();
    c.kill_9();
}

/// A node stopped gracefully with a run still going (its grace, 2 s, runs out) hands the run over at once:
/// it leaves the registry, and another node takes the run at its next sweep instead of after the lease.
#[tokio::test]
async fn a_graceful_stop_hands_a_running_run_to_another_node_at_once() {
    let (db, upstream, dir) = shared().await;
    // A long lease: only the hand-over can make the takeover quick.
    let config = |node: &str| node_config_leased(dir.path(), db.url(), &upstream, node, 30);
    let mut a = spawn_agentd(&config("a")).await;
    let mut b = spawn_agentd(&config("b")).await;
    let ca = a.client();
    let session = ca.session().await;
    let run = ca.send_bg(&session, "tokens=800 delay_ms=10").await;
    wait_status(&ca, &session, &run, "running").await;
    let stopped = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(a.child.wait().unwrap().code(), Some(0));
    let cb = b.client();
    let (_, nodes) = cb.get("/v1/cluster").await;
    assert_eq!(node_ids(&nodes), ["b"], "a left the registry");
    let done = wait_status(&cb, &session, &run, "completed").await;
    assert!(
        stopped.elapsed() < Duration::from_secs(25),
        "taken over long before a's 30 s lease would have lapsed: {:?}",
        stopped.elapsed()
    );
    assert!(done["node"].is_null());
    let events = events_of(&cb, &session, &run).await;
    let resumed = of_type(&events, "run_resumed");
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0]["node"], "b");
    let finished = of_type(&events, "run_finished");
    assert_eq!(finished.len(), 1);
    common::assert_gap_free(&events, 1);
    b.kill_9();
}

/// A client on node b gets, live, every event of a run executing on node a: in order, gap-free, the answer
/// whole, without reconnecting (a's commits announce themselves; b reads and publishes them).
#[tokio::test]
async fn a_subscriber_on_another_node_gets_the_run_live() {
    let (_db, _upstream, _dir, mut a, mut b) = two_nodes().await;
    // a learns of b at its next sweep (every sixth of the 4 s lease).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ca, cb) = (a.client(), b.client());
    let session = ca.session().await;
    let mut ws = cb.ws(&session, "").await;
    let hello = ws.next().await;
    assert_eq!(hello["type"], "hello");
    let run = ca.send_bg(&session, "tokens=200 delay_ms=5").await;
    let r = run.clone();
    let frames = tokio::time::timeout(
        Duration::from_secs(20),
        ws.until(move |f| f["type"] == "run_finished" && f["run_id"] == r),
    )
    .await
    .expect("b's subscriber gets the run's end live");
    common::assert_gap_free(&frames, 1);
    assert_eq!(
        frames[0]["type"], "message",
        "from the user message on: {}",
        frames[0]
    );
    let finished = frames.last().unwrap();
    assert_eq!(finished["run"]["status"], "completed");
    let text: String = frames
        .iter()
        .filter(|f| f["type"] == "text_delta")
        .filter_map(|f| f["delta"].as_str())
        .collect();
    assert_eq!(finished["content"].as_str(), Some(text.as_str()));
    // Every token, live (a delta may carry several: what one read of the upstream brought).
    assert_eq!(text, common::mock_tokens(200), "every delta, live");
    a.kill_9();
    b.kill_9();
}

/// A node frozen (SIGSTOP) past its lease is fenced: another node takes its run over, and when the frozen node
/// wakes (SIGCONT) nothing it still had in flight reaches the log (the tokens its upstream sent meanwhile, its
/// end of the run): the store refuses its writes, and it stops rather than go on.
#[tokio::test]
async fn a_node_frozen_past_its_lease_adds_nothing_to_the_log_when_it_wakes() {
    let (_db, _upstream, _dir, mut a, mut b) = two_nodes().await;
    let (ca, cb) = (a.client(), b.client());
    let session = ca.session().await;
    let run = ca.send_bg(&session, "tokens=300 delay_ms=20").await;
    wait_status(&ca, &session, &run, "running").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.signal("STOP");
    let frozen = Instant::now();
    {
        let mut ws = cb.ws(&session, "after=0").await;
        ws.next().await;
        let r = run.clone();
        ws.until(move |f| f["type"] == "run_resumed" && f["run_id"] == r)
            .await;
    }
    assert!(
        frozen.elapsed() < Duration::from_secs(10),
        "b took the frozen node's run over: {:?}",
        frozen.elapsed()
    );
    // a wakes with its upstream's tokens waiting in its socket and its run, as it thinks, still its own.
    a.signal("CONT");
    let done = wait_status(&cb, &session, &run, "completed").await;
    assert!(done["node"].is_null());
    let events = events_of(&cb, &session, &run).await;
    common::assert_gap_free(&events, 1);
    let resumed = of_type(&events, "run_resumed");
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0]["node"], "b");
    assert_eq!(of_type(&events, "run_finished").len(), 1, "one end: b's");
    // Everything after the takeover is b's: its model call's deltas, exactly the answer, and nothing of a's.
    let at = events
        .iter()
        .position(|f| f["type"] == "run_resumed")
        .unwrap();
    let after: String = events[at..]
        .iter()
        .filter(|f| f["type"] == "text_delta")
        .filter_map(|f| f["delta"].as_str())
        .collect();
    let finished = of_type(&events, "run_finished")[0];
    assert_eq!(finished["content"].as_str(), Some(after.as_str()));
    assert_eq!(
        after,
        common::mock_tokens(300),
        "b's call, whole, and not one delta of a's"
    );
    assert_eq!(
        a.exited_within(Duration::from_secs(10)),
        Some(Some(1)),
        "a fenced node stops"
    );
    b.kill_9();
}

/// An approval a run on node a waits for is decided through node b (the decision travels in the `Reply`
/// command to a); a second answer through b is 409 (b reads the request in the shared log), an unknown one 404.
#[tokio::test]
async fn an_approval_on_one_node_is_decided_through_another() {
    let (db, upstream, dir) = shared().await;
    let config = |node: &str| {
        let path = dir.path().join(format!("{node}.toml"));
        // Right after the base config's agent: its `approve` list.
        let extra =
            format!("approve = [\"calculator\"]\n\n[cluster]\nnode_id = \"{node}\"\nlease_s = 2\n");
        let text =
            common::config_text_on(db.url(), &upstream.base_url(), dir.path(), 30, &extra, "");
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut a = spawn_agentd(&config("a")).await;
    let mut b = spawn_agentd(&config("b")).await;
    let (ca, cb) = (a.client(), b.client());
    let session = ca.session().await;
    upstream.push(agentd_testkit::Reply::tool_call(
        "c1",
        "calculator",
        r#"{"expression": "6*7"}"#,
    ));
    let mut ws = ca.ws(&session, "").await;
    ws.next().await;
    ws.send(json!({"type": "message", "content": "compute"}))
        .await;
    let asked = ws
        .until(|f| f["type"] == "approval_requested")
        .await
        .pop()
        .unwrap();
    let run = asked["run_id"].as_str().unwrap().to_string();
    let request_id = asked["request_id"].as_str().unwrap().to_string();
    let path = |r: &str| format!("/v1/sessions/{session}/runs/{run}/approvals/{r}");
    let (status, body) = cb.post(&path("nope"), json!({"decision": "allow"})).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = cb
        .post(&path(&request_id), json!({"decision": "allow"}))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_status(&ca, &session, &run, "completed").await;
    let messages = ca.messages(&session).await;
    assert_eq!(messages.last().unwrap()["content"], "The result is 42.");
    let (status, body) = cb
        .post(&path(&request_id), json!({"decision": "deny"}))
        .await;
    assert_eq!(status, 409, "{body}");
    a.kill_9();
    b.kill_9();
}

/// Commands reach a run wherever it executes: with a run going on a, a client of b sees it active in its
/// hello, is refused a `multitask = reject` send, answers the run's question, and cancels it, each through b.
#[tokio::test]
async fn cancels_replies_and_multitask_reach_a_run_on_another_node() {
    let (_db, upstream, _dir, mut a, mut b) = two_nodes().await;
    let (ca, cb) = (a.client(), b.client());
    let session = ca.session().await;

    // A question asked on a, answered through b.
    let (_asking, run, request_id) = common::ask_colour(&ca, &upstream, &session).await;
    let input = format!("/v1/sessions/{session}/runs/{run}/input");
    let (status, body) = cb
        .post(&input, json!({"request_id": "nope", "content": "red"}))
        .await;
    assert_eq!(status, 404, "no such question on any node: {body}");
    let (status, body) = cb
        .post(
            &input,
            json!({"request_id": request_id.as_str(), "content": "blue"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let done = wait_status(&ca, &session, &run, "completed").await;
    assert!(done["node"].is_null());
    let messages = ca.messages(&session).await;
    assert_eq!(
        messages.last().unwrap()["content"],
        "The result is blue.",
        "a's run got b's answer"
    );

    // A long run on a: b's hello names it, b refuses a rejecting send, and b cancels it.
    let run = ca.send_bg(&session, "tokens=2000 delay_ms=10").await;
    wait_status(&ca, &session, &run, "running").await;
    let mut ws = cb.ws(&session, "").await;
    let hello = ws.next().await;
    assert_eq!(hello["active_run_id"], run.as_str(), "{hello}");
    let (_, shown) = cb.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(shown["active_run_id"], run.as_str(), "{shown}");
    let (status, body) = cb
        .post(
            &format!("/v1/sessions/{session}/messages"),
            json!({"content": "me too", "multitask": "reject", "wait": false}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "run_active");
    let asked = Instant::now();
    let (status, cancelled) = cb
        .post(
            &format!("/v1/sessions/{session}/runs/{run}/cancel"),
            json!({}),
        )
        .await;
    let took = asked.elapsed();
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(took < Duration::from_secs(2), "cancelled in {took:?}");
    let mut frames = Vec::new();
    while let Some(f) = ws.next_within(Duration::from_secs(10)).await {
        let end = f["type"] == "run_finished" && f["run_id"] == run.as_str();
        frames.push(f);
        if end {
            break;
        }
    }
    let kinds: Vec<String> = frames
        .iter()
        .rev()
        .take(5)
        .map(|f| format!("{} {}", f["seq"], f["type"]))
        .collect();
    assert_eq!(
        frames.last().unwrap()["run"]["status"],
        "cancelled",
        "{} frames, last {kinds:?}",
        frames.len()
    );
    let events = events_of(&cb, &session, &run).await;
    let ends = of_type(&events, "run_finished");
    assert_eq!(
        ends.iter().filter(|f| f["run_id"] == run.as_str()).count(),
        1
    );
    common::assert_gap_free(&events, 1);
    a.kill_9();
    b.kill_9();
}

/// One turn per session across the cluster: turns of one session sent at once to two nodes run one after the
/// other, never two at once (in the session's log no run starts while another is between its start and its
/// end), and each completes.
#[tokio::test]
async fn turns_sent_to_two_nodes_at_once_for_one_session_never_run_together() {
    let (_db, _upstream, _dir, mut a, mut b) = two_nodes().await;
    // a learns that b joined from b's announcement (or, at the latest, at its next sweep, every sixth of the
    // 4 s lease); until then a routes nothing (it believes itself alone), so the sends wait for that.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ca, cb) = (a.client(), b.client());
    let session = ca.session().await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let (x, y) = tokio::join!(
            ca.send_bg(&session, "tokens=20 delay_ms=10"),
            cb.send_bg(&session, "tokens=20 delay_ms=10")
        );
        runs.extend([x, y]);
    }
    for run in &runs {
        wait_status(&cb, &session, run, "completed").await;
    }
    let mut ws = cb.ws(&session, "after=0").await;
    ws.next().await;
    let mut events = Vec::new();
    while events
        .iter()
        .filter(|f: &&Value| f["type"] == "run_finished")
        .count()
        < runs.len()
    {
        events.push(ws.next().await);
    }
    common::assert_gap_free(&events, 1);
    let mut going: Option<String> = None;
    let mut started = 0;
    for f in &events {
        let run = f["run_id"].as_str().unwrap_or_default().to_string();
        match f["type"].as_str() {
            Some("run_started") => {
                assert!(
                    going.is_none(),
                    "run {run} started at seq {} while {going:?} was going",
                    f["seq"]
                );
                going = Some(run);
                started += 1;
            }
            Some("run_finished") => {
                assert_eq!(going.as_deref(), Some(run.as_str()), "at seq {}", f["seq"]);
                going = None;
            }
            Some("text_delta") => {
                assert_eq!(
                    going.as_deref(),
                    Some(run.as_str()),
                    "a delta of a run not going, seq {}",
                    f["seq"]
                );
            }
            _ => {}
        }
    }
    assert_eq!(started, runs.len(), "every turn ran");

    // client_message_id across nodes: a repeat through b of a send a accepted is a's run, answered once it
    // has ended (a waiting repeat waits for it there too).
    let path = format!("/v1/sessions/{session}/messages");
    let body = |wait: bool| json!({"content": "tokens=100 delay_ms=10", "client_message_id": "m-1", "wait": wait});
    let (status, first) = ca.post(&path, body(false)).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = cb.post(&path, body(true)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["run"]["id"], first["run"]["id"], "the same run");
    assert_eq!(again["run"]["status"], "completed", "{again}");
    assert_eq!(
        again["message"]["content"]
            .as_str()
            .map(|c| c.split_whitespace().count()),
        Some(100),
        "{again}"
    );
    a.kill_9();
    b.kill_9();
}

/// A node whose database connections are all cut mid-run (the server terminates them) reconnects and goes on:
/// its run completes there, every delta once and in order, and no other node takes it over (the node's lease
/// never lapsed).
#[tokio::test]
async fn a_node_that_loses_its_database_connections_goes_on_with_its_run() {
    let (db, upstream, dir) = shared().await;
    // Node a's connections carry a name of their own, so the test can cut exactly those.
    let a_url = format!("{}?application_name=agentd-node-a", db.url());
    let mut a = spawn_agentd(&node_config(dir.path(), &a_url, &upstream, "a")).await;
    let mut b = spawn_agentd(&node_config(dir.path(), db.url(), &upstream, "b")).await;
    let (ca, cb) = (a.client(), b.client());
    let session = ca.session().await;
    let mut ws = cb.ws(&session, "").await;
    ws.next().await;
    let run = ca.send_bg(&session, "tokens=300 delay_ms=10").await;
    wait_status(&ca, &session, &run, "running").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (admin, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let cut = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'agentd-node-a'",
            &[],
        )
        .await
        .unwrap();
    assert!(cut.len() >= 2, "a had connections to cut: {}", cut.len());
    let done = wait_status(&cb, &session, &run, "completed").await;
    assert!(done["node"].is_null());
    let r = run.clone();
    let frames = ws
        .until(move |f| f["type"] == "run_finished" && f["run_id"] == r)
        .await;
    common::assert_gap_free(&frames, frames[0]["seq"].as_u64().unwrap());
    assert!(
        frames.iter().all(|f| f["type"] != "run_resumed"),
        "not taken over"
    );
    let deltas: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "text_delta")
        .filter_map(|f| f["delta"].as_str())
        .collect();
    assert_eq!(
        deltas.concat(),
        common::mock_tokens(300),
        "every delta once, live on b"
    );
    assert_eq!(
        frames.last().unwrap()["content"].as_str(),
        Some(deltas.concat().as_str())
    );
    let (_, nodes) = cb.get("/v1/cluster").await;
    assert_eq!(node_ids(&nodes), ["a", "b"], "a is still a node");
    a.kill_9();
    b.kill_9();
}

#[tokio::test]
async fn a_single_node_on_sqlite_lists_itself() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.toml");
    let text = common::config_text_with(&upstream.base_url(), dir.path(), 30, "", "");
    std::fs::write(&path, text).unwrap();
    let mut p: Process = spawn_agentd(&path).await;
    let c = p.client();
    let (status, nodes) = c.get("/v1/cluster").await;
    assert_eq!(status, 200, "{nodes}");
    let nodes = nodes.as_array().unwrap().clone();
    assert_eq!(nodes.len(), 1);
    let port = p.url.rsplit(':').next().unwrap().to_string();
    let id = nodes[0]["node_id"].as_str().unwrap();
    assert!(
        id.ends_with(&format!(":{port}")),
        "hostname:port of the address it serves on: {id}"
    );
    assert_eq!(nodes[0]["listen"], p.url.trim_start_matches("http://"));
    p.kill_9();
}
