//! Events of any size on every WebSocket surface (SPEC.md section 4: "every event the log holds reaches every
//! client of every surface, whatever its size"), the cut of long tool results, and client frames over the
//! WebSocket frame limits (answered with an error frame, never a TCP reset).
//!
//! The clients are plain tokio-tungstenite clients with the library's default limits (16 MiB frames, 64 MiB
//! messages): a 32 MB answer only reaches them because the server fragments it. Big strings are built once;
//! frames are parsed one at a time and only their sizes are kept.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use std::time::Duration;

use agentd_testkit::Reply;
use common::{Options, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One content delta of the big answers: 4,096 bytes, mostly two-byte characters, so the server's 1 MiB
/// fragments often end inside a character's bytes unless it cuts on a boundary.
fn chunk() -> String {
    let mut s = "é".repeat(2047);
    s.push_str("ab");
    assert_eq!(s.len(), 4096);
    s
}
const CHUNK: usize = 4096;
/// 8,000 deltas: a 32,768,000-byte answer.
const ANSWER_DELTAS: usize = 8000;
/// 2,560 deltas: a 10 MiB subagent answer, which becomes its parent's tool result.
const TOOL_DELTAS: usize = 2560;
/// Generous: a debug build on a shared two-core machine.
const FRAME_WAIT: Duration = Duration::from_secs(120);

/// Holds the text to be the chunk repeated `count` times.
fn assert_repeated(what: &str, text: &str, count: usize) {
    assert_eq!(text.len(), CHUNK * count, "{what}: length");
    let c = chunk();
    assert!(
        text.as_bytes().chunks(CHUNK).all(|b| b == c.as_bytes()),
        "{what}: content differs from the upstream's"
    );
}

async fn connect(url: &str) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("ws connect {url}: {e}"));
    socket
}

/// The next text frame, parsed (pings and pongs skipped). Panics on close, error or timeout.
async fn next_json(ws: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(FRAME_WAIT, ws.next())
            .await
            .expect("a frame within the wait")
            .expect("the socket is open")
            .expect("a readable frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn send_text(ws: &mut Socket, text: Utf8Bytes) {
    ws.send(Message::Text(text)).await.expect("ws send");
}

fn text_of(v: &Value, field: &str) -> usize {
    v[field].as_str().map_or(0, str::len)
}

fn ws_base(s: &Server) -> String {
    s.url.replacen("http://", "ws://", 1)
}

/// What a native client saw of one turn.
#[derive(Debug, Default)]
struct NativeTurn {
    delta_bytes: usize,
    answer: String,
    answer_seq: u64,
    finished: Option<Value>,
    tool_finished: Option<Value>,
    tool_message: Option<String>,
    subagent_delta_bytes: usize,
}

/// Reads native frames until the turn's own `run_finished`, keeping only what the tests check.
async fn read_native(ws: &mut Socket) -> NativeTurn {
    let mut t = NativeTurn::default();
    let mut last_seq = 0;
    loop {
        let mut v = next_json(ws).await;
        let seq = v["seq"].as_u64().expect("every event has a seq");
        assert_eq!(seq, last_seq + 1, "gap-free, no duplicate");
        last_seq = seq;
        let sub = v["is_subagent"] == true;
        match v["type"].as_str().unwrap_or("") {
            "text_delta" if sub => t.subagent_delta_bytes += text_of(&v, "delta"),
            "text_delta" => t.delta_bytes += text_of(&v, "delta"),
            "message" => {
                let role = v["message"]["role"].as_str().unwrap_or("").to_string();
                let content = match v["message"]["content"].take() {
                    Value::String(s) => s,
                    _ => String::new(),
                };
                match role.as_str() {
                    "assistant" if !content.is_empty() => {
                        t.answer = content;
                        t.answer_seq = seq;
                    }
                    "tool" => t.tool_message = Some(content),
                    _ => {}
                }
            }
            "tool_finished" if !sub => t.tool_finished = Some(v),
            "run_finished" => {
                t.finished = Some(v);
                return t;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_32_mb_answer_reaches_every_surface_and_a_reconnect_gets_past_it() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let base = ws_base(&s);

    let mut native = c.ws(&id, "").await.socket;
    assert_eq!(next_json(&mut native).await["type"], "hello");
    let mut kit = connect(&format!("{base}/chat/ws/{id}")).await;
    assert_eq!(next_json(&mut kit).await["type"], "connected");
    let mut navi = connect(&format!("{base}/ws/sessions/{id}")).await;

    s.upstream.push(Reply::Repeated {
        chunk: chunk(),
        count: ANSWER_DELTAS,
    });
    let run = c.send_bg(&id, "write a lot").await;

    let native_read = read_native(&mut native);
    let kit_read = async {
        let mut tokens = 0;
        loop {
            let v = next_json(&mut kit).await;
            match v["type"].as_str().unwrap_or("") {
                "token" => tokens += text_of(&v, "content"),
                "final_answer" => return (tokens, v),
                "error" => panic!("agentkit error frame: {v}"),
                _ => {}
            }
        }
    };
    let navi_read = async {
        let mut deltas = 0;
        loop {
            let v = next_json(&mut navi).await;
            match v["type"].as_str().unwrap_or("") {
                "stream_delta" => deltas += text_of(&v, "delta"),
                "stream_end" => return (deltas, v),
                "error" => panic!("navi error frame: {v}"),
                _ => {}
            }
        }
    };
    let (n, (kit_tokens, kit_final), (navi_deltas, navi_end)) =
        tokio::join!(native_read, kit_read, navi_read);

    let total = CHUNK * ANSWER_DELTAS;
    assert_eq!(n.delta_bytes, total, "native text deltas");
    assert_repeated("native message", &n.answer, ANSWER_DELTAS);
    let finished = n.finished.unwrap();
    assert_eq!(
        finished["run"]["status"], "completed",
        "{}",
        finished["run"]
    );
    assert_repeated(
        "native run_finished",
        finished["content"].as_str().unwrap(),
        ANSWER_DELTAS,
    );
    let finished_seq = finished["seq"].as_u64().unwrap();
    drop(finished);
    assert_eq!(kit_tokens, total, "agentkit tokens");
    assert_repeated(
        "agentkit final_answer",
        kit_final["content"].as_str().unwrap(),
        ANSWER_DELTAS,
    );
    drop(kit_final);
    assert_eq!(navi_deltas, total, "navi stream deltas");
    assert_repeated(
        "navi stream_end",
        navi_end["content"].as_str().unwrap(),
        ANSWER_DELTAS,
    );
    drop(navi_end);

    // The sockets are still open and usable after the big frames.
    native
        .send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut native).await["type"], "pong");
    kit.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut kit).await["type"], "pong");

    // A client that reconnects just before the big message gets it and everything after it.
    let mut again = c
        .ws(&id, &format!("after={}", n.answer_seq - 1))
        .await
        .socket;
    let hello = next_json(&mut again).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["last_seq"], finished_seq);
    let mut message = next_json(&mut again).await;
    assert_eq!(message["seq"], n.answer_seq);
    assert_eq!(message["type"], "message");
    assert_repeated(
        "replayed message",
        message["message"]["content"].take().as_str().unwrap(),
        ANSWER_DELTAS,
    );
    drop(message);
    let mut end = next_json(&mut again).await;
    assert_eq!(end["seq"], finished_seq);
    assert_eq!(end["type"], "run_finished");
    assert_repeated(
        "replayed run_finished",
        end["content"].take().as_str().unwrap(),
        ANSWER_DELTAS,
    );
    drop(end);
    again
        .send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut again).await["type"], "pong");

    let run = c.wait_run(&id, &run).await;
    assert_eq!(run["status"], "completed", "{run}");
}

const DELEGATING: &str = r#"
[[agents]]
name = "boss"
provider = "upstream"
model = "boss-model"
system_prompt = "You delegate."
tools = []
subagents = ["writer"]

[[agents]]
name = "writer"
description = "Writes at length"
provider = "upstream"
model = "writer-model"
system_prompt = "You write."
tools = []
"#;

/// The file id a cut tool result's note names.
fn note_file_id(result: &str) -> String {
    let note = result
        .split("\n\n[tool result cut: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no cut note in the result's tail: {:?}", tail(result)));
    note.split("file id `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("the note names no file id: {note}"))
        .to_string()
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(300);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[tokio::test]
async fn a_10_mb_tool_result_is_cut_with_a_note_and_kept_whole_as_an_upload() {
    let s = Server::start_with(Options {
        extra: DELEGATING.into(),
        ..Default::default()
    })
    .await;
    let c = s.client();
    let (status, session) = c.post("/v1/sessions", json!({"agent": "boss"})).await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap().to_string();
    let base = ws_base(&s);

    let mut native = c.ws(&id, "").await.socket;
    assert_eq!(next_json(&mut native).await["type"], "hello");
    let mut kit = connect(&format!("{base}/chat/ws/{id}")).await;
    assert_eq!(next_json(&mut kit).await["type"], "connected");
    let mut navi = connect(&format!("{base}/ws/sessions/{id}")).await;

    // The boss delegates; the writer answers 10 MiB; that answer is the boss's tool result.
    s.upstream.push(Reply::tool_call(
        "call_big",
        "writer",
        r#"{"task": "write ten megabytes"}"#,
    ));
    s.upstream.push(Reply::Repeated {
        chunk: chunk(),
        count: TOOL_DELTAS,
    });
    s.upstream.push(Reply::text("Done."));
    let run = c.send_bg(&id, "delegate").await;

    let native_read = read_native(&mut native);
    let kit_read = async {
        let (mut action, mut observation) = (None, None);
        loop {
            let v = next_json(&mut kit).await;
            match (v["type"].as_str(), v["data"]["event_type"].as_str()) {
                (Some("step"), Some("action")) => action = Some(v),
                (Some("step"), Some("observation")) => observation = Some(v),
                (Some("final_answer"), _) => return (action, observation, v),
                (Some("error"), _) => panic!("agentkit error frame: {v}"),
                _ => {}
            }
        }
    };
    let navi_read = async {
        let (mut started, mut call) = (None, None);
        loop {
            let v = next_json(&mut navi).await;
            match v["type"].as_str().unwrap_or("") {
                "tool_started" if v["is_subagent"] == false => started = Some(v),
                "tool_call" if v["is_subagent"] == false => call = Some(v),
                "stream_end" => return (started, call, v),
                "error" => panic!("navi error frame: {v}"),
                _ => {}
            }
        }
    };
    let (n, (action, observation, kit_final), (started, call, navi_end)) =
        tokio::join!(native_read, kit_read, navi_read);

    // Native: the tool frames carry the cut result, and so does the stored tool message.
    let finished = n.finished.unwrap();
    assert_eq!(
        finished["run"]["status"], "completed",
        "{}",
        finished["run"]
    );
    assert_eq!(finished["content"], "Done.");
    assert_eq!(
        n.subagent_delta_bytes,
        CHUNK * TOOL_DELTAS,
        "the writer's own deltas all arrived"
    );
    let tool_finished = n.tool_finished.expect("a tool_finished of the boss");
    assert_eq!(tool_finished["tool"], "writer");
    assert_eq!(tool_finished["success"], true);
    let result = tool_finished["result"].as_str().unwrap().to_string();
    let (head, _) = result.split_once("\n\n[tool result cut: ").unwrap();
    assert!(
        head.len() <= 262_144 && head.len() > 262_000,
        "{}",
        head.len()
    );
    assert!(
        chunk().repeat(64).starts_with(head),
        "the head is the result's start"
    );
    let cut = 10_485_760 - head.len();
    assert!(
        result.contains(&format!("{cut} of 10485760 bytes not shown")),
        "the note says how much was cut: {}",
        tail(&result)
    );
    assert_eq!(n.tool_message.as_deref(), Some(result.as_str()));

    // The model saw the cut result too.
    let requests = s.upstream.requests();
    let last = requests.last().unwrap();
    let tool_msg = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .expect("the boss's second call carries the tool result");
    assert_eq!(tool_msg["content"], result.as_str());

    // The whole result is an upload of the session, named in the note.
    let file_id = note_file_id(&result);
    let workspace = s.dir.path().join("workspaces").join(&id);
    let meta: Value = serde_json::from_slice(
        &std::fs::read(workspace.join(".uploads").join(format!("{file_id}.json")))
            .expect("the upload's record"),
    )
    .unwrap();
    assert_eq!(meta["size"], 10_485_760);
    let whole = std::fs::read_to_string(workspace.join(meta["path"].as_str().unwrap())).unwrap();
    assert_repeated("the kept upload", &whole, TOOL_DELTAS);
    drop(whole);
    // ... and a message may name it like any upload.
    s.upstream.push(Reply::text("Read it."));
    let (status, v) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": "see the file", "files": [file_id]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // agentkit: action and observation (with the cut result), then the final answer.
    let action = action.expect("agentkit action");
    assert_eq!(action["data"]["data"]["tool"], "writer");
    let observation = observation.expect("agentkit observation");
    assert_eq!(observation["data"]["data"]["result"], result.as_str());
    assert_eq!(kit_final["content"], "Done.");

    // navi: tool_started and tool_call (with the cut result), then stream_end.
    assert_eq!(started.expect("navi tool_started")["tool"], "writer");
    assert_eq!(call.expect("navi tool_call")["result"], result.as_str());
    assert_eq!(navi_end["content"], "Done.");

    let run = c.wait_run(&id, &run).await;
    assert_eq!(run["status"], "completed", "{run}");
}

/// A `message` frame whose content is far over `server.max_message_bytes` (4,096 in the tests) but whose frame
/// (20 MiB) is over tungstenite's default 16 MiB frame limit and under the server's 64 MiB client frame cap.
fn twenty_mib_message() -> Utf8Bytes {
    let content = "x".repeat(20 * 1024 * 1024);
    json!({"type": "message", "content": content})
        .to_string()
        .into()
}

#[tokio::test]
async fn a_20_mib_client_frame_gets_an_error_frame_and_the_socket_stays_open() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let base = ws_base(&s);
    let big = twenty_mib_message();
    let ping: Utf8Bytes = json!({"type": "ping"}).to_string().into();

    let mut native = c.ws(&id, "").await.socket;
    assert_eq!(next_json(&mut native).await["type"], "hello");
    send_text(&mut native, big.clone()).await;
    let e = next_json(&mut native).await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "too_large", "{e}");
    send_text(&mut native, ping.clone()).await;
    assert_eq!(next_json(&mut native).await["type"], "pong");

    let mut kit = connect(&format!("{base}/chat/ws/{id}")).await;
    assert_eq!(next_json(&mut kit).await["type"], "connected");
    send_text(&mut kit, big.clone()).await;
    let e = next_json(&mut kit).await;
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["data"]["message"].is_string(), "{e}");
    send_text(&mut kit, ping.clone()).await;
    assert_eq!(next_json(&mut kit).await["type"], "pong");

    let mut navi = connect(&format!("{base}/ws/sessions/{id}")).await;
    send_text(&mut navi, big.clone()).await;
    let e = next_json(&mut navi).await;
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["message"].is_string(), "{e}");
    // navi has no ping: the next frame is still read and answered.
    send_text(&mut navi, "not json".into()).await;
    assert_eq!(
        next_json(&mut navi).await,
        json!({"type": "error", "message": "Invalid JSON"})
    );

    assert!(c.messages(&id).await.is_empty(), "nothing stored");
}

/// Reads the refusal of an over-cap frame: the dialect's error frame, a close 1009, then a clean end of the
/// stream (a TCP reset would surface as an error here).
async fn expect_refusal(ws: &mut Socket) -> Value {
    let error = next_json(ws).await;
    assert_eq!(error["type"], "error", "{error}");
    let close = tokio::time::timeout(FRAME_WAIT, ws.next())
        .await
        .expect("a close within the wait");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a close 1009, got {other:?}"),
    }
    let end = tokio::time::timeout(FRAME_WAIT, ws.next())
        .await
        .expect("the end within the wait");
    assert!(end.is_none(), "the connection ends cleanly, got {end:?}");
    error
}

#[tokio::test]
async fn a_client_frame_over_the_hard_cap_gets_an_error_and_a_clean_close() {
    let s = Server::start().await;
    let c = s.client();
    let id = c.session().await;
    let base = ws_base(&s);
    // One byte over the server's 64 MiB cap; built once, shared by the three sends.
    let huge: Utf8Bytes = "y".repeat(64 * 1024 * 1024 + 1).into();

    let mut native = c.ws(&id, "").await.socket;
    assert_eq!(next_json(&mut native).await["type"], "hello");
    send_text(&mut native, huge.clone()).await;
    let e = expect_refusal(&mut native).await;
    assert_eq!(e["code"], "too_large", "{e}");

    let mut kit = connect(&format!("{base}/chat/ws/{id}")).await;
    assert_eq!(next_json(&mut kit).await["type"], "connected");
    send_text(&mut kit, huge.clone()).await;
    let e = expect_refusal(&mut kit).await;
    assert!(e["data"]["message"].is_string(), "{e}");

    let mut navi = connect(&format!("{base}/ws/sessions/{id}")).await;
    send_text(&mut navi, huge.clone()).await;
    let e = expect_refusal(&mut navi).await;
    assert!(e["message"].is_string(), "{e}");
    drop(huge);

    // The server goes on serving.
    let mut after = c.ws(&id, "").await.socket;
    assert_eq!(next_json(&mut after).await["type"], "hello");
    send_text(&mut after, json!({"type": "ping"}).to_string().into()).await;
    assert_eq!(next_json(&mut after).await["type"], "pong");
    assert!(c.messages(&id).await.is_empty(), "nothing stored");
}
