//! The HTTP side of the metrics (SPEC.md section 9): `GET /metrics`, the layer that counts every request by
//! surface and status, and the guards that keep the open-stream gauges. The metrics themselves are defined in
//! `agentd_core::metrics`.
//!
//! - **Surfaces** are told by path: `/v1/models`, `/v1/chat/...` and `/v1/responses...` openai, other `/v1/...`
//!   and `/healthz` native, `/chat/...` agentkit, `/ws/...` navi,
//!   `/` and `/assets/...` web, `/metrics` metrics, anything else `other` (404s of unknown paths).
//! - **Latency** is the time to the response head; a stream (SSE, WebSocket) is counted when it starts.
//! - **Open SSE streams** are counted here, by the layer, for as long as the response body lives; **open
//!   WebSockets** by a guard each socket task holds ([`websocket_open`]), since an upgraded connection
//!   outlives its response.
//! - **Auth**: as the API (any configured key; everyone without keys) unless `server.metrics_public = true`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use agentd_core::metrics::{GaugeGuard, Metrics, CONTENT_TYPE};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::Stream;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

async fn scrape(State(st): State<AppState>, caller: Result<Caller, ApiError>) -> Response {
    if !st.app.config.server.metrics_public {
        if let Err(e) = caller {
            return e.into_response();
        }
    }
    match st.app.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering the metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable").into_response()
        }
    }
}

/// The surface a path belongs to (a label value: one of a fixed few words).
pub fn surface(path: &str) -> &'static str {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if under("/v1/models") || under("/v1/chat") || under("/v1/responses") {
        "openai"
    } else if under("/v1") || path == "/healthz" {
        "native"
    } else if under("/chat") {
        "agentkit"
    } else if under("/ws") {
        "navi"
    } else if path == "/metrics" {
        "metrics"
    } else if path == "/" || under("/assets") {
        "web"
    } else {
        "other"
    }
}

/// The layer: counts each request by surface and status, times it to the response head, and keeps the SSE
/// gauge for as long as an event stream's body lives.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let surface = surface(req.uri().path());
    let started = Instant::now();
    let resp = next.run(req).await;
    let elapsed = started.elapsed().as_secs_f64();
    let status = resp.status();
    let labels = [surface, status.as_str()];
    metrics.http_requests.with_label_values(&labels).inc();
    metrics
        .http_request_duration
        .with_label_values(&labels)
        .observe(elapsed);
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !sse {
        return resp;
    }
    let open = GaugeGuard::new(metrics.open_sse_streams.with_label_values(&[surface]));
    let (parts, body) = resp.into_parts();
    let body = Body::from_stream(Guarded {
        inner: body.into_data_stream(),
        _open: open,
    });
    Response::from_parts(parts, body)
}

/// Holds `agentd_open_websockets{surface}` up while the socket task lives.
pub fn websocket_open(st: &AppState, surface: &'static str) -> GaugeGuard {
    GaugeGuard::new(st.app.metrics.open_websockets.with_label_values(&[surface]))
}

/// A body stream that holds a gauge guard until it is dropped (the client went away or the stream ended).
struct Guarded<S> {
    inner: S,
    _open: GaugeGuard,
}

impl<S: Stream + Unpin> Stream for Guarded<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::surface;

    #[test]
    fn surfaces_by_path() {
        for (path, s) in [
            ("/v1/sessions", "native"),
            ("/v1", "native"),
            ("/v1/chat/completions", "openai"),
            ("/v1/responses/resp_1/cancel", "openai"),
            ("/v1/models", "openai"),
            ("/healthz", "native"),
            ("/v1x", "other"),
            ("/chat/ws/abc", "agentkit"),
            ("/chatty", "other"),
            ("/ws/sessions/abc", "navi"),
            ("/metrics", "metrics"),
            ("/", "web"),
            ("/assets/app.js", "web"),
            ("/nope", "other"),
        ] {
            assert_eq!(surface(path), s, "{path}");
        }
    }
}
