//! The WebSocket handshake every surface (native, agentkit, navi) uses, done here rather than by axum's
//! `WebSocketUpgrade` so that the connection is a plain `tokio_tungstenite::WebSocketStream`:
//! - the writer can send one message as several frames (axum's `Message` has no frame variant), so an event of
//!   any size goes out in [`crate::relay::FRAGMENT`]-sized continuation frames that any client with default
//!   limits can read, through a small, capped write buffer;
//! - after a client frame over [`MAX_CLIENT_FRAME`], the connection can answer with an error frame and a close
//!   1009, then read and discard what the client still sends (bounded), so it ends with a FIN, not a TCP reset.
//!
//! Only HTTP/1.1 upgrades are served (the server speaks HTTP/1.1). The checks and the rejections are axum's.

use std::future::Future;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

pub use tokio_tungstenite::tungstenite::Message;

/// The largest client frame, and message, read (images travel inline). A text frame up to this size is read
/// and answered (an over-size `content` gets a `too_large` error frame, the socket stays open); a larger one
/// gets an error frame and a close 1009.
pub const MAX_CLIENT_FRAME: usize = 64 * 1024 * 1024;

/// The upgraded connection's byte stream.
pub type Io = TokioIo<hyper::upgrade::Upgraded>;
/// An accepted WebSocket.
pub type WebSocket = WebSocketStream<Io>;

/// Idle connections should cost little: a small read buffer, a write buffer that only grows while frames are
/// batched, capped well above one [`crate::relay::FRAGMENT`] (the writer never queues more than one fragment
/// beyond the small buffer before flushing).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(MAX_CLIENT_FRAME))
        .max_frame_size(Some(MAX_CLIENT_FRAME))
}

/// A WebSocket handshake request (the extractor), answered by [`Upgrade::on_upgrade`].
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade").finish_non_exhaustive()
    }
}

/// Why a request is not a WebSocket handshake (axum's statuses and texts).
#[derive(Debug)]
pub struct NotUpgrade(StatusCode, &'static str);

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.version > Version::HTTP_11 {
            return Err(NotUpgrade(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "WebSockets are served over HTTP/1.1 only",
            ));
        }
        if parts.method != Method::GET {
            return Err(NotUpgrade(
                StatusCode::METHOD_NOT_ALLOWED,
                "Request method must be `GET`",
            ));
        }
        if !header_contains(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !header_eq(&parts.headers, header::UPGRADE, "websocket") {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if !header_eq(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 and runs `callback` on the socket once the connection has switched protocols.
    pub fn on_upgrade<C, Fut>(self, callback: C) -> Response
    where
        C: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let socket = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config()),
            )
            .await;
            callback(socket).await;
        });
        let accept = derive_accept_key(self.key.as_bytes());
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        response
    }
}

fn header_eq(headers: &HeaderMap, key: HeaderName, value: &str) -> bool {
    headers
        .get(&key)
        .is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_contains(headers: &HeaderMap, key: HeaderName, value: &str) -> bool {
    headers
        .get(&key)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.to_ascii_lowercase().contains(value))
}
