//! agentd-server: the HTTP surfaces over `agentd_core::service::Agentd`.
//!
//! - [`native`]: the native REST API, WebSocket and SSE (SPEC.md sections 3 and 4).
//! - [`agentkit`] and [`navi`]: the two seed dialects (SPEC.md section 5), thin adapters over the same events.
//! - [`web`]: the embedded web chat page.
//! - [`relay`]: the writer half every WebSocket shares: events -> a dialect's frames -> batched flushes.
//! - [`socket`]: the WebSocket handshake and socket settings every surface shares.
//! - [`auth`]: API keys -> `Principal`, compared in constant time; [`error`]: the native JSON error shape.
//!
//! Invariant: surfaces only extract, call one `Agentd` method, and render. No surface holds run state.

pub mod agentkit;
pub mod auth;
pub mod error;
pub mod native;
pub mod navi;
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

/// All surfaces, merged in one place.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(native::router())
        .merge(agentkit::router())
        .merge(navi::router())
        .merge(web::router())
        .with_state(state)
}

/// Serves until `shutdown` resolves; then stops accepting, lets running turns finish for the configured grace,
/// interrupts the rest, and returns.
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
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // Long-lived streams (WebSocket, SSE) would hold graceful shutdown open forever: once the turns are settled
    // (finished or interrupted, their last events sent), `closing` ends them.
    let grace = std::time::Duration::from_secs(app.config.server.shutdown_grace_s);
    let runs = app.runs.clone();
    let settle = tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        runs.shutdown(grace).await;
        closing.cancel();
    });
    let result = server.await;
    let _ = settle.await;
    result
}
