//! [`PlainHttp`]: a small HTTP/1.1 client for the model call to a plain `http://` upstream (vLLM, llama.cpp's
//! server, Ollama on the host or the LAN: the usual self-hosted case).
//!
//! Why not reqwest here: hyper hands a response body to its reader one chunk at a time through a channel that
//! holds one, so every token the upstream writes costs a wake-up of hyper's connection task and one of the run's
//! task, and the run sees one token per poll however many have arrived. This client reads the socket on the
//! run's task: one `read` takes whatever the upstream has sent (one token when the stream is slow, dozens when
//! the server is behind), its chunked framing is removed and the whole of it goes to the SSE parser at once,
//! which makes one text event of the deltas that came together (`stream.rs`). So a server that falls behind
//! does less work per token, not more, and nothing waits: only what has already arrived is taken together.
//!
//! `https://` upstreams, upstreams behind a proxy (`HTTP_PROXY`, `ALL_PROXY`) and URLs with credentials go
//! through reqwest as before. Connections are kept alive and reused (at most [`MAX_IDLE`] idle); a reused
//! connection the upstream closed meanwhile is noticed before use, and a request whose reused connection
//! fails before any answer is sent once more on a new one. Dropping a response before its end closes the
//! connection (that is how cancelling a run reaches the upstream).

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use reqwest::Url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Idle connections kept for reuse.
pub(crate) const MAX_IDLE: usize = 64;
/// The largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Room made for each read of the body: what one read can take at most (some 60 tokens' events; hyper's first
/// read buffer is as large). Kept small: every turn that is streaming holds one.
const READ_ROOM: usize = 8 * 1024;
/// The longest chunk-size line (hex digits and extensions) and the most trailer bytes accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Where the requests go, the request head they share, and the idle connections.
pub(crate) struct PlainHttp {
    host: Host,
    port: u16,
    /// `POST <path> HTTP/1.1` and every header but `Content-Length`, each ending in CRLF. Holds the
    /// `Authorization` header when there is a key, so it is never formatted or logged (no `Debug`).
    head: String,
    idle: Mutex<Vec<TcpStream>>,
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

impl PlainHttp {
    /// A client for `url` when it can serve it: `http` scheme, no credentials in the URL, no proxy in the
    /// environment. `authorization` is the header's whole value (`Bearer ...`).
    pub(crate) fn for_url(url: &Url, authorization: Option<&str>) -> Option<PlainHttp> {
        if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
            return None;
        }
        let proxied = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
            .iter()
            .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
        if proxied {
            return None;
        }
        let host_str = url.host_str()?;
        let bare = host_str.trim_start_matches('[').trim_end_matches(']');
        let host = match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host_str.to_owned()),
        };
        let port = url.port_or_known_default()?;
        let host_header = match url.port() {
            Some(port) => format!("{host_str}:{port}"),
            None => host_str.to_owned(),
        };
        let mut target = url.path().to_owned();
        if let Some(query) = url.query() {
            target.push('?');
            target.push_str(query);
        }
        let mut head = format!(
            "POST {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: agentd/{}\r\n\
             Content-Type: application/json\r\nAccept: text/event-stream\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(value) = authorization {
            head.push_str("Authorization: ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        Some(PlainHttp {
            host,
            port,
            head,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends a POST with `body` and reads the answer's head. The caller bounds the time.
    pub(crate) async fn post(self: &Arc<Self>, body: &[u8]) -> io::Result<PlainResponse> {
        let mut request = Vec::with_capacity(self.head.len() + 32 + body.len());
        request.extend_from_slice(self.head.as_bytes());
        request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(body);
        if let Some(conn) = self.take_idle() {
            match self.exchange(conn, &request).await {
                Ok(response) => return Ok(response),
                // The upstream closed the kept-alive connection before reading this request: it saw nothing of
                // it, so sending it on a new connection is safe.
                Err(Attempt::Unanswered(_)) => {}
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        let conn = self.connect().await?;
        match self.exchange(conn, &request).await {
            Ok(response) => Ok(response),
            Err(Attempt::Unanswered(e) | Attempt::Failed(e)) => Err(e),
        }
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let connected = match &self.host {
            Host::Ip(ip) => TcpStream::connect((*ip, self.port)).await,
            Host::Name(name) => TcpStream::connect((name.as_str(), self.port)).await,
        };
        let conn = connected.map_err(|e| {
            let host = match &self.host {
                Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
                Host::Ip(ip) => ip.to_string(),
                Host::Name(name) => name.clone(),
            };
            io::Error::new(
                e.kind(),
                format!("cannot connect to {host}:{}: {e}", self.port),
            )
        })?;
        // Requests are one write each; Nagle would only delay them.
        conn.set_nodelay(true)?;
        Ok(conn)
    }

    /// An idle connection that is still open and has nothing unread.
    fn take_idle(&self) -> Option<TcpStream> {
        let mut idle = lock(&self.idle);
        while let Some(conn) = idle.pop() {
            let mut probe = [0u8; 1];
            // Open and quiet: the read would block. End of stream or stray bytes: not reusable.
            if matches!(conn.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            {
                return Some(conn);
            }
        }
        None
    }

    fn give_back(&self, conn: TcpStream) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        mut conn: TcpStream,
        request: &[u8],
    ) -> Result<PlainResponse, Attempt> {
        conn.write_all(request).await.map_err(Attempt::Unanswered)?;
        let mut buf = BytesMut::with_capacity(4 * 1024);
        loop {
            // Interim answers (100 Continue) are skipped: the real one follows.
            while let Some((length, head)) = parse_head(&buf).map_err(Attempt::Failed)? {
                buf.advance(length);
                if head.status >= 200 {
                    return Ok(PlainResponse::new(head, conn, buf, self.clone()));
                }
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(Attempt::Failed(invalid("the response head is too large")));
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4 * 1024);
            }
            let n = match conn.read_buf(&mut buf).await {
                Ok(n) => n,
                Err(e) if buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(Attempt::Unanswered(e))
                }
                Err(e) => return Err(Attempt::Failed(e)),
            };
            if n == 0 {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                );
                return Err(if buf.is_empty() {
                    Attempt::Unanswered(e)
                } else {
                    Attempt::Failed(e)
                });
            }
        }
    }
}

/// How one attempt failed: before the upstream answered anything on a reused connection (worth one more
/// try on a new one), or otherwise.
enum Attempt {
    Unanswered(io::Error),
    Failed(io::Error),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The lock is only held to push or pop; a panic elsewhere cannot leave the list half-changed.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// What the head says.
struct Head {
    status: u16,
    content_type: Option<String>,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Chunked(Chunk),
    Length(u64),
    UntilClose,
}

/// Parses a complete head at the start of `buf`: its length and what it says, or `None` when incomplete.
fn parse_head(buf: &[u8]) -> io::Result<Option<(usize, Head)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let length = match response.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("invalid response head: {e}"))),
    };
    let status = response.code.unwrap_or(0);
    let mut head = Head {
        status,
        content_type: None,
        framing: Framing::UntilClose,
        keep_alive: response.version == Some(1),
    };
    let mut length_header = None;
    let mut chunked = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.to_owned());
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding decides the framing (RFC 9112 6.1).
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .map_err(|_| invalid("invalid Content-Length"))?;
            if length_header.is_some_and(|m| m != n) {
                return Err(invalid("conflicting Content-Length headers"));
            }
            length_header = Some(n);
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    head.keep_alive = true;
                }
            }
        }
    }
    head.framing = if matches!(status, 204 | 304) || (100..200).contains(&status) {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunk::Size)
    } else if let Some(n) = length_header {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    if head.framing == Framing::UntilClose {
        head.keep_alive = false;
    }
    Ok(Some((length, head)))
}

/// An answer whose head was read; its body streams as [`Stream`] of the body's bytes (framing removed), one
/// item per read of the socket.
pub(crate) struct PlainResponse {
    pub(crate) status: u16,
    pub(crate) content_type: Option<String>,
    body: Body,
}

impl PlainResponse {
    fn new(head: Head, conn: TcpStream, buf: BytesMut, client: Arc<PlainHttp>) -> Self {
        PlainResponse {
            status: head.status,
            content_type: head.content_type,
            body: Body {
                conn: Some(conn),
                buf,
                framing: head.framing,
                keep_alive: head.keep_alive,
                client,
            },
        }
    }

    pub(crate) fn into_body(self) -> Body {
        self.body
    }

    /// Up to `max` bytes of the body (the rest is dropped with the connection).
    pub(crate) async fn read_prefix(self, max: usize) -> Vec<u8> {
        use futures_util::StreamExt;
        let mut body = self.body;
        let mut raw = Vec::new();
        while raw.len() < max {
            match body.next().await {
                Some(Ok(bytes)) => raw.extend_from_slice(&bytes),
                Some(Err(_)) | None => break,
            }
        }
        raw.truncate(max);
        raw
    }
}

/// A response body. Back to the idle list once read to its end (when the upstream keeps it open).
pub(crate) struct Body {
    /// `None` once the body ended.
    conn: Option<TcpStream>,
    /// Read, not yet decoded.
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    client: Arc<PlainHttp>,
}

impl Body {
    /// Moves what `buf` holds of the body into `out`; `true` when the body is complete.
    fn decode(&mut self, out: &mut BytesMut) -> io::Result<bool> {
        match &mut self.framing {
            Framing::Chunked(state) => decode_chunked(state, &mut self.buf, out),
            Framing::Length(remaining) => {
                let take = self
                    .buf
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                out.extend_from_slice(&self.buf[..take]);
                self.buf.advance(take);
                *remaining -= take as u64;
                Ok(*remaining == 0)
            }
            Framing::UntilClose => {
                out.extend_from_slice(&self.buf);
                self.buf.clear();
                Ok(false)
            }
        }
    }

    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Bytes past the end would belong to no request: such a connection is not reused.
            if self.keep_alive && self.buf.is_empty() {
                self.client.give_back(conn);
            }
        }
    }
}

impl Stream for Body {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut out = BytesMut::new();
        loop {
            if this.conn.is_none() {
                return Poll::Ready(None);
            }
            match this.decode(&mut out) {
                Ok(true) => {
                    this.finish();
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(out.freeze())));
                }
                Ok(false) if !out.is_empty() => return Poll::Ready(Some(Ok(out.freeze()))),
                Ok(false) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            this.buf.reserve(READ_ROOM);
            // tokio's `poll_read`: a read that fills less than the room means the socket is drained, so the next
            // poll waits for readiness instead of trying a read that would only say "would block".
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(conn),
                cx,
                &mut this.buf
            )) {
                Ok(0) => {
                    this.conn = None;
                    if this.framing == Framing::UntilClose {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the end of the answer",
                    ))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

/// Where a chunked body's decoder is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section; bytes of it seen so far.
    Trailers(usize),
    Done,
}

/// Decodes what `buf` holds of a chunked body into `out`; `true` when the last chunk and the trailers are in.
pub(crate) fn decode_chunked(
    state: &mut Chunk,
    buf: &mut BytesMut,
    out: &mut BytesMut,
) -> io::Result<bool> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = memchr_lf(buf) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(invalid("a chunk-size line is too long"));
                    }
                    return Ok(false);
                };
                if end > MAX_CHUNK_LINE {
                    return Err(invalid("a chunk-size line is too long"));
                }
                let line = &buf[..end];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
                let digits = std::str::from_utf8(digits)
                    .map_err(|_| invalid("invalid chunk size"))?
                    .trim();
                let size =
                    u64::from_str_radix(digits, 16).map_err(|_| invalid("invalid chunk size"))?;
                buf.advance(end + 1);
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(remaining) => {
                if buf.is_empty() {
                    return Ok(false);
                }
                let take = buf
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                out.extend_from_slice(&buf[..take]);
                buf.advance(take);
                let left = remaining - take as u64;
                *state = if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                };
            }
            Chunk::DataEnd => match buf.first() {
                None => return Ok(false),
                Some(b'\n') => {
                    buf.advance(1);
                    *state = Chunk::Size;
                }
                Some(b'\r') if buf.len() < 2 => return Ok(false),
                Some(b'\r') if buf[1] == b'\n' => {
                    buf.advance(2);
                    *state = Chunk::Size;
                }
                Some(_) => return Err(invalid("a chunk does not end where its size says")),
            },
            Chunk::Trailers(seen) => {
                let Some(end) = memchr_lf(buf) else {
                    if seen + buf.len() > MAX_TRAILER_BYTES {
                        return Err(invalid("the trailers are too large"));
                    }
                    return Ok(false);
                };
                let blank = buf[..end].iter().all(|&b| b == b'\r');
                buf.advance(end + 1);
                *state = if blank {
                    Chunk::Done
                } else if seen + end + 1 > MAX_TRAILER_BYTES {
                    return Err(invalid("the trailers are too large"));
                } else {
                    Chunk::Trailers(seen + end + 1)
                };
            }
            Chunk::Done => return Ok(true),
        }
    }
}

fn memchr_lf(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(pieces: &[&[u8]]) -> (Vec<u8>, bool, Option<String>) {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let mut done = false;
        for piece in pieces {
            buf.extend_from_slice(piece);
            match decode_chunked(&mut state, &mut buf, &mut out) {
                Ok(d) => done = d,
                Err(e) => return (out.to_vec(), false, Some(e.to_string())),
            }
        }
        (out.to_vec(), done, None)
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n1\n!\n0\r\nX-Trailer: 1\r\n\r\n";
        for size in 1..=body.len() {
            let pieces: Vec<&[u8]> = body.chunks(size).collect();
            let (out, done, error) = decode_all(&pieces);
            assert_eq!(error, None, "piece size {size}");
            assert_eq!(out, b"hello, world!", "piece size {size}");
            assert!(done, "piece size {size}");
        }
    }

    #[test]
    fn an_unfinished_body_is_not_done() {
        let (out, done, error) = decode_all(&[b"5\r\nhel"]);
        assert_eq!((out.as_slice(), done, error), (&b"hel"[..], false, None));
        let (_, done, _) = decode_all(&[b"5\r\nhello\r\n0\r\n"]);
        assert!(!done, "the blank line after the last chunk is missing");
    }

    #[test]
    fn bad_framing_is_an_error_not_a_panic() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"ffffffffffffffffffff\r\n",
            b"-1\r\n",
        ] {
            let (_, _, error) = decode_all(&[bad]);
            assert!(error.is_some(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(decode_all(&[&long]).2.is_some());
    }

    #[test]
    fn heads_say_the_framing() {
        let parse = |raw: &str| parse_head(raw.as_bytes()).unwrap().unwrap().1;
        let head = parse("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Chunked(Chunk::Size));
        assert_eq!(head.content_type.as_deref(), Some("text/event-stream"));
        assert!(head.keep_alive);
        let head = parse("HTTP/1.1 400 Bad\r\ncontent-length: 12\r\nConnection: close\r\n\r\n");
        assert_eq!(
            (head.status, head.framing, head.keep_alive),
            (400, Framing::Length(12), false)
        );
        let head = parse("HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!(
            (head.framing, head.keep_alive),
            (Framing::UntilClose, false)
        );
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }
}
