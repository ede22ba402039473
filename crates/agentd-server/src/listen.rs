//! The accept loop (SPEC.md section 9, "Bounds"): connections are capped, and a connection that does not send
//! a request is closed.
//!
//! - **Cap**: at most `server.max_connections` sockets are open at once (default: nine tenths of the process's
//!   open-file soft limit, and never more than that limit minus 64, so the database, the log's tail, uploads and
//!   upstream connections always have descriptors). At the cap the loop stops accepting: new connections wait
//!   in the kernel's backlog until one closes. The slot belongs to the socket, not to the HTTP exchange: a
//!   WebSocket keeps its slot after the upgrade, until the socket is dropped.
//! - **Headers**: a request's head must arrive within `server.header_timeout_s` of the connection being ready
//!   for it (hyper's `header_read_timeout`: one clock for the whole head, so a trickle of header bytes does not
//!   extend it). An idle keep-alive connection waits for its next request's head on the same
//!   clock, so it is closed after as long.
//! - **Bodies**: a request body that stalls for `server.header_timeout_s` fails (the handler answers and the
//!   connection is closed), and so does one that arrives slower than [`MIN_BODY_RATE`] on average after the
//!   first `header_timeout_s` (a body trickled a byte at a time), as Apache's `mod_reqtimeout` does.
//! - WebSockets (after the upgrade) and SSE responses are not reads of a request: no timeout touches them.
//!
//! Graceful shutdown: `stop` ends the loop (the listener is closed), every connection is told to finish its
//! request in flight and close, and [`run`] returns once they have.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// The slowest average a request body may arrive at, once its first `header_timeout_s` have passed.
pub const MIN_BODY_RATE: u64 = 500; // bytes per second

/// Descriptors the default cap always leaves to the process's own files.
const OWN_FILES: u64 = 64;

/// What [`run`] enforces.
#[derive(Clone, Copy, Debug)]
pub struct ConnSettings {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// The default `server.max_connections` for an open-file soft limit: nine tenths of it, leaving at least
/// [`OWN_FILES`] descriptors, and at least 1.
pub fn default_max_connections_for(nofile: u64) -> usize {
    let cap = (nofile / 10 * 9 + nofile % 10 * 9 / 10).min(nofile.saturating_sub(OWN_FILES));
    usize::try_from(cap.max(1)).unwrap_or(usize::MAX)
}

/// The default `server.max_connections` of this process (its `RLIMIT_NOFILE` soft limit).
pub fn default_max_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    // No limit at all: a cap the semaphore can hold, far beyond what one process serves.
    default_max_connections_for(limit.current.unwrap_or(1 << 24))
}

/// Accepts and serves connections until `stop` is cancelled, then shuts them down gracefully.
pub async fn run(
    listener: TcpListener,
    router: Router,
    settings: ConnSettings,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(
        settings.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true);
    let mut warned_full = false;
    loop {
        // A slot first: at the cap nothing is accepted, so the kernel holds new connections until one closes.
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
        };
        if slots.available_permits() == 0 && !warned_full {
            warned_full = true;
            tracing::warn!(
                max_connections = settings.max_connections,
                "connection cap reached; new connections wait until one closes (server.max_connections)"
            );
        }
        let tcp = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = accept(&listener) => match accepted {
                Ok(tcp) => tcp,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or memory: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying in 1 s");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let io = TokioIo::new(Counted { tcp, _slot: slot });
        let router = router.clone();
        let timeout = settings.header_timeout;
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut router = router.clone();
            let req = req.map(|body| Body::new(TimedBody::new(body, timeout)));
            // `Router` is always ready: `call` needs no `poll_ready` first.
            async move { router.call(req).await }
        });
        let conn = http.serve_connection(io, service).with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The next connection, with Nagle's algorithm off. Token frames are small writes made as tokens come: with it
/// on, a frame written while the previous one is not yet acknowledged waits for the client's ACK, which a
/// client that is only reading delays by up to 40 ms (a session's second turn on an open WebSocket paid that
/// for each frame that found one in flight).
async fn accept(listener: &TcpListener) -> std::io::Result<TcpStream> {
    let (tcp, _) = listener.accept().await?;
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    Ok(tcp)
}

/// Errors of one connection that `accept` reports; the listener itself is fine.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// A socket that holds a connection slot for as long as it lives (also inside an upgraded WebSocket).
struct Counted {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The body read timed out (stalled, or slower than [`MIN_BODY_RATE`]).
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body stalled or arrived too slowly")
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that fails when no data comes for `timeout`, or when on average it comes slower than
/// [`MIN_BODY_RATE`] after the first `timeout`. Only time spent waiting for the client counts: a handler that
/// reads slowly is not the client's fault.
struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    started: Option<Instant>,
    received: u64,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration) -> TimedBody {
        TimedBody {
            inner,
            timeout,
            started: None,
            received: 0,
            sleep: None,
        }
    }

    fn deadline(&mut self) -> Instant {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        let earned = Duration::from_millis(self.received.saturating_mul(1000) / MIN_BODY_RATE);
        (now + self.timeout).min(started + self.timeout + earned)
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                }
                this.sleep = None;
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if this.sleep.is_none() {
            let deadline = this.deadline();
            this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline)));
        }
        match this.sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_is_nine_tenths_and_leaves_room() {
        assert_eq!(default_max_connections_for(20_000), 18_000);
        assert_eq!(default_max_connections_for(1024), 921);
        assert_eq!(default_max_connections_for(1025), 922);
        // Small limits keep 64 descriptors for the database and friends.
        assert_eq!(default_max_connections_for(256), 192);
        assert_eq!(default_max_connections_for(10), 1);
        assert!(default_max_connections() >= 1);
    }

    #[tokio::test]
    async fn accepted_connections_send_small_writes_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = tokio::spawn(TcpStream::connect(addr));
        let tcp = accept(&listener).await.expect("accepted");
        assert!(tcp.nodelay().expect("TCP_NODELAY readable"), "Nagle is off");
        let _client = client.await.expect("joined").expect("connected");
    }
}
