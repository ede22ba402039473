//! [`MockUpstream`]: an OpenAI-compatible `/v1/chat/completions` server on a real loopback socket.
//!
//! It records every request body, answers with queued [`Reply`]s in order and, when the queue is empty, with
//! the reply the last user message's directives ask for ([`Reply::for_request`]). It counts response streams
//! as they open and close, so tests can prove that a client hung up.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::chunks::{ChunkWriter, Plan, Step};
use crate::reply::{error_body, Reply};

/// Options for [`MockUpstream::start_with`].
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// How many request bodies [`MockUpstream::requests`] keeps (the oldest are dropped first). Load tests set
    /// it low; [`MockUpstream::request_count`] counts every request regardless.
    pub max_recorded: usize,
    /// When set, requests whose `Authorization` header is not `Bearer <key>` get a 401.
    pub require_api_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            max_recorded: 10_000,
            require_api_key: None,
        }
    }
}

/// A running mock upstream. Dropping it stops accepting connections and ends hanging responses.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

/// State shared by the handle and the handlers. The mutexes are held only to push or copy.
struct Shared {
    options: MockOptions,
    queue: Mutex<VecDeque<Reply>>,
    recorded: Mutex<VecDeque<Recorded>>,
    request_count: AtomicU64,
    call_ids: AtomicU64,
    streams_opened: AtomicUsize,
    streams_closed: AtomicUsize,
    closed_notify: Notify,
    shutdown: watch::Receiver<bool>,
}

struct Recorded {
    body: Value,
    authorization: Option<String>,
}

impl MockUpstream {
    /// Starts a mock with default options on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If a loopback port cannot be bound, which leaves a test nothing to do.
    pub async fn start() -> MockUpstream {
        match MockUpstream::start_with(MockOptions::default()).await {
            Ok(mock) => mock,
            Err(e) => panic!("mock upstream: cannot bind 127.0.0.1:0: {e}"),
        }
    }

    /// Starts a mock on `127.0.0.1:0`.
    pub async fn start_with(options: MockOptions) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            options,
            queue: Mutex::new(VecDeque::new()),
            recorded: Mutex::new(VecDeque::new()),
            request_count: AtomicU64::new(0),
            call_ids: AtomicU64::new(0),
            streams_opened: AtomicUsize::new(0),
            streams_closed: AtomicUsize::new(0),
            closed_notify: Notify::new(),
            shutdown: shutdown_rx.clone(),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            // Requests carry images as data URLs; axum's default 2 MB limit is too small for them.
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        let mut signal = shutdown_rx;
        tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = signal.wait_for(|stop| *stop).await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "mock upstream stopped");
            }
        });
        Ok(MockUpstream {
            addr,
            shared,
            shutdown,
        })
    }

    /// `http://127.0.0.1:PORT/v1`, the `base_url` an OpenAI client is configured with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a reply; queued replies are used in order, before any directive.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.queue).push_back(reply);
    }

    /// Every recorded request body, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.shared.recorded)
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// The most recent request body.
    pub fn last_request(&self) -> Option<Value> {
        lock(&self.shared.recorded).back().map(|r| r.body.clone())
    }

    /// The `Authorization` header of every recorded request, in the order of [`requests`](Self::requests).
    pub fn authorizations(&self) -> Vec<Option<String>> {
        lock(&self.shared.recorded)
            .iter()
            .map(|r| r.authorization.clone())
            .collect()
    }

    /// How many `/chat/completions` requests arrived (including rejected ones and ones no longer recorded).
    pub fn request_count(&self) -> u64 {
        self.shared.request_count.load(Ordering::Relaxed)
    }

    /// Responses that started streaming (or hanging).
    pub fn streams_opened(&self) -> usize {
        self.shared.streams_opened.load(Ordering::SeqCst)
    }

    /// Responses that ended: sent completely, or dropped because the client went away.
    pub fn streams_closed(&self) -> usize {
        self.shared.streams_closed.load(Ordering::SeqCst)
    }

    /// Responses still streaming (or hanging).
    pub fn open_streams(&self) -> usize {
        self.streams_opened().saturating_sub(self.streams_closed())
    }

    /// Waits until at least `n` streams have closed; false if that did not happen `within`.
    pub async fn wait_streams_closed(&self, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Register for the wake-up before checking, so a close between the check and the wait is not lost.
            let notified = self.shared.closed_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.streams_closed() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.streams_closed() >= n;
            }
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A poisoned lock only means a test thread panicked while holding it; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts a response stream as open while alive. It lives in the response body, so hyper dropping the body
/// (stream finished, or the client hung up) closes it.
struct StreamGuard(Arc<Shared>);

impl StreamGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.streams_opened.fetch_add(1, Ordering::SeqCst);
        StreamGuard(shared.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_closed.fetch_add(1, Ordering::SeqCst);
        self.0.closed_notify.notify_waiters();
    }
}

async fn models() -> Response {
    let body = r#"{"object":"list","data":[{"id":"mock","object":"model","created":0,"owned_by":"agentd-testkit"}]}"#;
    json_response(StatusCode::OK, body.to_owned())
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.request_count.fetch_add(1, Ordering::Relaxed);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                error_body(400, &format!("invalid JSON: {e}")),
            )
        }
    };
    let rejection = match &shared.options.require_api_key {
        Some(key) if authorization.as_deref() != Some(format!("Bearer {key}").as_str()) => {
            Some((StatusCode::UNAUTHORIZED, "invalid api key"))
        }
        _ if request.get("stream").and_then(Value::as_bool) != Some(true) => Some((
            StatusCode::BAD_REQUEST,
            "the mock only answers stream: true",
        )),
        _ => None,
    };
    if let Some((status, message)) = rejection {
        record(&shared, request, authorization);
        return json_response(status, error_body(status.as_u16(), message));
    }

    let queued = lock(&shared.queue).pop_front();
    let reply = queued.unwrap_or_else(|| {
        Reply::for_request(&request, || {
            format!(
                "call_mock_{}",
                shared.call_ids.fetch_add(1, Ordering::Relaxed) + 1
            )
        })
    });
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A rough prompt size, like the 4-characters-per-token estimate; exact counts are not the mock's business.
    let prompt_tokens = (body.len() as u64 / 4).max(1);
    let id = shared.request_count.load(Ordering::Relaxed);
    let plan = ChunkWriter::new(id, model, created, include_usage, prompt_tokens).render(reply);
    record(&shared, request, authorization);

    match plan {
        Plan::Status(status, body) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_response(status, body)
        }
        Plan::Hang => {
            let _guard = StreamGuard::new(&shared);
            let mut shutdown = shared.shutdown.clone();
            let _ = shutdown.wait_for(|stop| *stop).await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        Plan::Stream(steps) => {
            sse_response(steps, StreamGuard::new(&shared), shared.shutdown.clone())
        }
    }
}

fn record(shared: &Shared, body: Value, authorization: Option<String>) {
    let max = shared.options.max_recorded;
    if max == 0 {
        return;
    }
    let mut recorded = lock(&shared.recorded);
    while recorded.len() >= max {
        recorded.pop_front();
    }
    recorded.push_back(Recorded {
        body,
        authorization,
    });
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn sse_response(steps: Vec<Step>, guard: StreamGuard, shutdown: watch::Receiver<bool>) -> Response {
    let state = (steps.into_iter(), shutdown, guard);
    let body = stream::unfold(state, |(mut steps, mut shutdown, guard)| async move {
        loop {
            match steps.next()? {
                Step::Send(bytes) => {
                    return Some((Ok::<_, Infallible>(bytes), (steps, shutdown, guard)))
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Hang => {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                    return None;
                }
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
