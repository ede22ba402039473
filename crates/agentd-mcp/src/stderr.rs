//! A stdio server's stderr, into agentd's log a line at a time with the server's name. Bounded: a line is cut
//! at [`MAX_LINE`] bytes, and at most [`LINES_PER_SECOND`] lines a second are logged; the rest are counted
//! and reported once a second, so a server that floods its stderr costs a read loop, not the log.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest stderr line logged (the rest of it is dropped).
pub const MAX_LINE: usize = 2048;
/// Lines logged per second per server.
pub const LINES_PER_SECOND: u32 = 50;

fn log_line(server: &str, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    if !text.is_empty() {
        tracing::info!(target: "agentd::mcp", mcp_server = %server, "[{server}] {text}");
    }
}

/// Reads `from` to its end.
pub async fn forward(server: String, mut from: impl AsyncRead + Unpin) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let mut window = Instant::now();
    let (mut logged, mut suppressed) = (0u32, 0u64);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for chunk in buf[..n].split_inclusive(|b| *b == b'\n') {
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.last() != Some(&b'\n') {
                continue;
            }
            if window.elapsed() >= Duration::from_secs(1) {
                if suppressed > 0 {
                    tracing::warn!(target: "agentd::mcp", mcp_server = %server, suppressed, "[{server}] stderr lines not logged (over {LINES_PER_SECOND} a second)");
                }
                window = Instant::now();
                logged = 0;
                suppressed = 0;
            }
            if logged < LINES_PER_SECOND {
                logged += 1;
                log_line(&server, &line);
            } else {
                if suppressed == 0 {
                    tracing::warn!(target: "agentd::mcp", mcp_server = %server, "[{server}] over {LINES_PER_SECOND} stderr lines a second: the rest of this second's stderr lines not logged");
                }
                suppressed += 1;
            }
            line.clear();
        }
    }
    log_line(&server, &line);
}
