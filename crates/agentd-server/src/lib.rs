//! agentd-server: the HTTP surfaces over `agentd_core::service::Agentd`.
//!
//! - [`native`]: the native REST API, WebSocket and SSE (SPEC.md sections 3 and 4).
//! - [`agentkit`] and [`navi`]: the two seed dialects (SPEC.md section 5), thin adapters over the same events.
//! - [`openai`]: the OpenAI-compatible surfaces (SPEC.md section 8): models, chat completions, responses.
//! - [`web`]: the embedded web chat page.
//! - [`relay`]: the writer half every WebSocket shares: events -> a dialect's frames -> batched flushes.
//! - [`socket`]: the WebSocket handshake and socket settings every surface shares.
//! - [`auth`]: API keys -> `Principal`, compared in constant time; [`error`]: the native JSON error shape.
//! - [`listen`]: the accept loop: the connection cap, header and body timeouts, graceful shutdown.
//! - [`metrics`]: `GET /metrics`, and the layer counting requests and open streams per surface.
//!
//! Invariant: surfaces only extract, call one `Agentd` method, and render. No surface holds run state.

pub mod agentkit;
pub mod auth;
pub mod error;
pub mod listen;
pub mod metrics;
pub mod native;
pub mod navi;
pub mod openai;
pub mod relay;
pub mod socket;
pub mod web;

use std::future::Future;
use std::sync::Arc;

use agentd_core::service::Agentd;
use axum::Router;
use tokio::net::TcpListener;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub app: Arc<Agentd>,
    pub auth: Arc<auth::Keys>,
    /// Cancelled once shutdown has settled the runs: long-lived streams then close.
    pub closing: tokio_util::sync::CancellationToken,
}

/// All surfaces, merged in one place, counted by the metrics layer.
pub fn router(state: AppState) -> Router {
    let counted = state.app.metrics.clone();
    Router::new()
        .merge(native::router())
        .merge(agentkit::router())
        .merge(navi::router())
        .merge(openai::router())
        .merge(web::router())
        .merge(metrics::router())
        .layer(axum::middleware::from_fn_with_state(
            counted,
            metrics::track,
        ))
        .with_state(state)
}

/// Serves until `shutdown` resolves; then stops accepting, lets running turns finish for the configured grace,
/// interrupts the rest, and returns. Connections are capped and timed as [`listen`] says.
pub async fn serve(
    listener: TcpListener,
    app: Arc<Agentd>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let closing = tokio_util::sync::CancellationToken::new();
    let state = AppState {
        auth: Arc::new(auth::Keys::new(&app.config.auth_keys)),
        app: app.clone(),
        closing: closing.clone(),
    };
    let settings = listen::ConnSettings {
        header_timeout: std::time::Duration::from_secs(app.config.server.header_timeout_s),
        max_connections: app
            .config
            .server
            .max_connections
            .unwrap_or_else(listen::default_max_connections),
    };
    tracing::debug!(
        max_connections = settings.max_connections,
        header_timeout_s = app.config.server.header_timeout_s,
        "connection bounds"
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    // Long-lived streams (WebSocket, SSE) would hold graceful shutdown open forever: once the turns are settled
    // (finished or interrupted, their last events sent), `closing` ends them.
    let grace = std::time::Duration::from_secs(app.config.server.shutdown_grace_s);
    let runs = app.runs.clone();
    let settle = tokio::spawn({
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            runs.shutdown(grace).await;
            closing.cancel();
        }
    });
    let result = listen::run(listener, router(state), settings, stop.clone()).await;
    stop.cancel();
    signal.abort();
    let _ = settle.await;
    result
}
