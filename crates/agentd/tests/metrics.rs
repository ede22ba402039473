//! `GET /metrics` (SPEC.md section 9) through real HTTP: real turns against the mock upstream (an answer, a
//! tool call, an `ask_human` question, an upstream error, a cancel, a restart that recovers a run), then the
//! scrape must show each figure moved by exactly what was done, and `promtool check metrics` must find
//! nothing in it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentd_testkit::Reply;
use common::{Client, Options, Server};
use serde_json::json;

/// One scrape: `name{labels}` (labels sorted by name, as the exposition writes them) -> value.
struct Scrape {
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').unwrap();
            samples.insert(key.to_string(), value.parse::<f64>().unwrap());
        }
        Scrape { text, samples }
    }

    /// The sample's value; 0 when it is absent (a label set never used yet).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels = labels.to_vec();
        labels.sort();
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", inner.join(","))
        };
        self.samples.get(&key).copied().unwrap_or(0.0)
    }

    fn has_family(&self, name: &str) -> bool {
        self.text.contains(&format!("# TYPE {name} "))
    }
}

async fn scrape(c: &Client) -> Scrape {
    let mut req = c.http.get(format!("{}/metrics", c.base));
    if let Some(k) = &c.key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape::parse(resp.text().await.unwrap())
}

/// Scrapes until `ok` holds (a gauge that follows a socket closing on the server's side), for 10 s at most.
async fn scrape_until(c: &Client, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(c).await;
        if ok(&s) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `promtool check metrics` on the scrape: no output, exit 0. Without promtool the test fails (CI installs it
/// through scripts/setup.sh) unless AGENTD_SKIP_PROMTOOL=1.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var("AGENTD_SKIP_PROMTOOL").as_deref() == Ok("1") => {
            eprintln!("promtool not run ({e}); AGENTD_SKIP_PROMTOOL=1");
            return;
        }
        Err(e) => panic!(
            "promtool is needed to check the metrics ({e}): run `AGENTD_SETUP_BROWSER=1 scripts/setup.sh` \
             (scripts/test.sh and CI do; it installs Debian's `prometheus` package), or set AGENTD_SKIP_PROMTOOL=1"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {:?}\n{said}\n--- scrape ---\n{text}",
        out.status
    );
}

const PROVIDER: (&str, &str) = ("provider", "upstream");
const MODEL: (&str, &str) = ("model", "mock-model");

#[tokio::test]
async fn real_turns_move_the_figures_and_promtool_finds_nothing() {
    let s = Server::start().await;
    let c = s.client();
    let s0 = scrape(&c).await;
    for family in [
        "agentd_http_requests_total",
        "agentd_http_request_duration_seconds",
        "agentd_open_websockets",
        "agentd_open_sse_streams",
        "agentd_runs_total",
        "agentd_run_queue_wait_seconds",
        "agentd_runs_recovered_total",
        "agentd_model_time_to_first_token_seconds",
        "agentd_model_time_per_output_token_seconds",
        "agentd_model_input_tokens_total",
        "agentd_model_output_tokens_total",
        "agentd_upstream_errors_total",
        "agentd_tool_calls_total",
        "agentd_tool_call_duration_seconds",
        "agentd_pending_inputs",
        "agentd_event_log_events_total",
        "agentd_event_log_batch_events",
        "agentd_event_log_commit_duration_seconds",
        "agentd_event_log_commit_failures_total",
        "agentd_subscriber_catchups_total",
    ] {
        // Families without a label set used yet have no samples; these all have one from the start or
        // are vectors, which the exposition lists once used. Check the always-present ones here.
        if !family.contains("http")
            && !family.contains("model")
            && !family.contains("upstream")
            && !family.contains("tool")
            && !family.contains("open_")
        {
            assert!(s0.has_family(family), "{family} missing:\n{}", s0.text);
        }
    }
    for status in ["completed", "failed", "cancelled", "interrupted"] {
        assert_eq!(s0.get("agentd_runs_total", &[("status", status)]), 0.0);
    }

    // A plain answer and a calculator round.
    let plain = c.session().await;
    let (status, a) = c.send(&plain, "tokens=5").await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["run"]["status"], "completed");
    let tool = c.session().await;
    let (status, b) = c.send(&tool, "calc: 6*7").await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["run"]["status"], "completed");
    assert!(b["message"]["content"].as_str().unwrap().contains("42"));
    let s1 = scrape(&c).await;
    let runs = |s: &Scrape, status: &str| s.get("agentd_runs_total", &[("status", status)]);
    assert_eq!(runs(&s1, "completed"), 2.0);
    assert_eq!(runs(&s1, "failed") + runs(&s1, "cancelled"), 0.0);
    let usage = |v: &serde_json::Value, k: &str| v["run"]["usage"][k].as_f64().unwrap();
    assert_eq!(
        s1.get("agentd_model_input_tokens_total", &[PROVIDER, MODEL]),
        usage(&a, "prompt_tokens") + usage(&b, "prompt_tokens"),
        "input tokens are the runs' reported usage"
    );
    let out_tokens = usage(&a, "completion_tokens") + usage(&b, "completion_tokens");
    assert!(out_tokens >= 5.0);
    assert_eq!(
        s1.get("agentd_model_output_tokens_total", &[PROVIDER, MODEL]),
        out_tokens
    );
    // Three model calls (the answer; the tool call and the answer after it), each with a first output;
    // the two that streamed text also have a time per output token.
    assert_eq!(
        s1.get(
            "agentd_model_time_to_first_token_seconds_count",
            &[PROVIDER, MODEL]
        ),
        3.0
    );
    assert_eq!(
        s1.get(
            "agentd_model_time_per_output_token_seconds_count",
            &[PROVIDER, MODEL]
        ),
        2.0
    );
    let calc_ok = [("tool", "calculator"), ("outcome", "success")];
    assert_eq!(s1.get("agentd_tool_calls_total", &calc_ok), 1.0);
    assert_eq!(
        s1.get(
            "agentd_tool_call_duration_seconds_count",
            &[("tool", "calculator")]
        ),
        1.0
    );
    assert_eq!(s1.get("agentd_run_queue_wait_seconds_count", &[]), 2.0);
    // The log: every event of both runs committed, in batches, row changes on their own path.
    let events = s1.get("agentd_event_log_events_total", &[]);
    assert!(events >= 2.0 * 4.0, "events {events}");
    assert!(s1.get("agentd_event_log_batch_events_sum", &[]) == events);
    assert!(
        s1.get(
            "agentd_event_log_commit_duration_seconds_count",
            &[("path", "rows")]
        ) > 0.0
    );
    assert_eq!(s1.get("agentd_event_log_commit_failures_total", &[]), 0.0);

    // An upstream error.
    let failing = c.session().await;
    let (status, v) = c.send(&failing, "status=500").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["run"]["status"], "failed");
    let s2 = scrape(&c).await;
    assert_eq!(runs(&s2, "failed"), 1.0);
    assert_eq!(runs(&s2, "completed"), 2.0);
    assert_eq!(
        s2.get("agentd_upstream_errors_total", &[PROVIDER, ("code", "500")]),
        1.0
    );

    // A question waiting for a person.
    s.upstream.push(Reply::tool_call(
        "call_q",
        "ask_human",
        r#"{"question":"Which city?"}"#,
    ));
    let asking = c.session().await;
    let run = c.send_bg(&asking, "plan a trip").await;
    let mut ws = c.ws(&asking, "after=0").await;
    let frames = ws.until(|f| f["type"] == "input_requested").await;
    let request_id = frames.last().unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    let s3 = scrape(&c).await;
    assert_eq!(
        s3.get("agentd_pending_inputs", &[("kind", "question")]),
        1.0
    );
    let ws_native = [("surface", "native")];
    assert_eq!(s3.get("agentd_open_websockets", &ws_native), 1.0);
    let (status, _) = c
        .post(
            &format!("/v1/sessions/{asking}/runs/{run}/input"),
            json!({"request_id": request_id, "content": "Lisbon"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(c.wait_run(&asking, &run).await["status"], "completed");
    drop(ws);
    let s4 = scrape_until(&c, |s| s.get("agentd_open_websockets", &ws_native) == 0.0).await;
    assert_eq!(
        s4.get("agentd_open_websockets", &ws_native),
        0.0,
        "the gauge goes down when the socket closes"
    );
    assert_eq!(
        s4.get("agentd_pending_inputs", &[("kind", "question")]),
        0.0
    );
    assert_eq!(
        s4.get(
            "agentd_tool_calls_total",
            &[("tool", "ask_human"), ("outcome", "success")]
        ),
        1.0
    );
    assert_eq!(runs(&s4, "completed"), 3.0);

    // A cancel, watched over SSE.
    let slow = c.session().await;
    let run = c.send_bg(&slow, "tokens=200 delay_ms=20").await;
    let mut sse = c
        .http
        .get(format!("{}/v1/sessions/{slow}/events?after=0", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut seen = String::new();
    while !seen.contains("text_delta") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let s5 = scrape(&c).await;
    assert_eq!(s5.get("agentd_open_sse_streams", &ws_native), 1.0);
    let (status, v) = c
        .post(&format!("/v1/sessions/{slow}/runs/{run}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "cancelled");
    drop(sse);
    let s6 = scrape_until(&c, |s| s.get("agentd_open_sse_streams", &ws_native) == 0.0).await;
    assert_eq!(s6.get("agentd_open_sse_streams", &ws_native), 0.0);
    assert_eq!(runs(&s6, "cancelled"), 1.0);
    assert_eq!(runs(&s6, "failed"), 1.0);
    assert_eq!(runs(&s6, "completed"), 3.0);
    assert_eq!(
        s6.get(
            "agentd_model_time_to_first_token_seconds_count",
            &[PROVIDER, MODEL]
        ),
        6.0
    );

    // Other surfaces and statuses.
    let (status, _) = c.get("/v1/sessions/does-not-exist").await;
    assert_eq!(status, 404);
    assert_eq!(
        reqwest::get(format!("{}/", s.url)).await.unwrap().status(),
        200
    );
    let kit = reqwest::get(format!("{}/chat/sessions", s.url))
        .await
        .unwrap();
    assert_eq!(kit.status(), 200);
    let s7 = scrape(&c).await;
    let http = |s: &Scrape, surface: &str, status: &str| {
        s.get(
            "agentd_http_requests_total",
            &[("surface", surface), ("status", status)],
        )
    };
    assert_eq!(http(&s7, "native", "201"), 5.0, "five sessions created");
    assert_eq!(http(&s7, "native", "404"), 1.0);
    assert_eq!(http(&s7, "native", "101"), 1.0, "one WebSocket handshake");
    assert_eq!(http(&s7, "web", "200"), 1.0);
    assert_eq!(http(&s7, "agentkit", "200"), 1.0);
    // Every scrape before this one (s0..s6 plus the polls of scrape_until) was counted, none of them twice.
    let scrapes = http(&s7, "metrics", "200");
    assert!(scrapes >= 7.0, "{scrapes}");
    assert_eq!(
        s7.get(
            "agentd_http_request_duration_seconds_count",
            &[("surface", "metrics"), ("status", "200")]
        ),
        scrapes
    );

    promtool_check(&s7.text);
}

#[tokio::test]
async fn a_recovered_run_is_counted() {
    let first = Server::start().await;
    let c = first.client();
    let id = c.session().await;
    // A run a dead process left unfinished: stored, owned by no run manager.
    let run = agentd_core::domain::Run::queued(&id);
    first.app.store.create_run(&run, None).await.unwrap();
    // A second service starting on the same store sweeps it (what `agentd serve` does at start-up).
    let second = agentd_core::service::Agentd::start(
        first.app.config.clone(),
        first.app.store.clone(),
        Default::default(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(agentd_server::serve(
        listener,
        second,
        std::future::pending(),
    ));
    let mut c = first.client();
    c.base = url;
    let s = scrape(&c).await;
    assert_eq!(s.get("agentd_runs_recovered_total", &[]), 1.0);
    assert_eq!(
        s.get("agentd_runs_total", &[("status", "interrupted")]),
        0.0,
        "a recovered run is not a run this process ran"
    );
}

#[tokio::test]
async fn metrics_need_a_key_unless_public() {
    let keys = "[[auth.keys]]\nprincipal = \"alice\"\nkey = \"sk-alice\"\n";
    let s = Server::start_with(Options {
        extra: keys.into(),
        ..Default::default()
    })
    .await;
    let url = format!("{}/metrics", s.url);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthenticated");
    let resp = reqwest::Client::new()
        .get(&url)
        .bearer_auth("sk-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let with_key = scrape(&s.client()).await;
    assert_eq!(
        with_key.get(
            "agentd_http_requests_total",
            &[("surface", "metrics"), ("status", "401")]
        ),
        2.0,
        "refused scrapes are counted under their status"
    );

    let public = Server::start_with(Options {
        extra: keys.into(),
        server_extra: "metrics_public = true".into(),
        ..Default::default()
    })
    .await;
    let resp = reqwest::get(format!("{}/metrics", public.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let s = Scrape::parse(resp.text().await.unwrap());
    assert!(s.has_family("agentd_runs_total"));
    let (status, _) = public.client_with_key(None).get("/v1/sessions").await;
    assert_eq!(status, 401, "only /metrics is public");
}
