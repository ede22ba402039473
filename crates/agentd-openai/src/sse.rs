//! An incremental server-sent-events decoder: network chunks in, the `data` of each complete event out.
//!
//! It follows the SSE rules that matter for OpenAI-style streams: lines end in `\n`, `\r\n` or `\r` (and a
//! network chunk may end anywhere, even between `\r` and `\n` or inside a UTF-8 character); a blank line ends an
//! event; `:` starts a comment; several `data:` lines of one event are joined with `\n`; other fields (`event`,
//! `id`, `retry`) are ignored. Buffers are reused across events, so steady-state decoding does not allocate.

/// Why the byte stream is not valid SSE.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SseError {
    NotUtf8,
    /// An event (or an unterminated line) grew past the limit.
    TooLarge(usize),
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseError::NotUtf8 => f.write_str("a line is not valid UTF-8"),
            SseError::TooLarge(limit) => write!(f, "an event is larger than {limit} bytes"),
        }
    }
}

pub(crate) struct SseDecoder {
    /// Bytes received; `buf[pos..]` is not consumed yet (a partial line).
    buf: Vec<u8>,
    pos: usize,
    /// The data of the event being assembled.
    data: String,
    has_data: bool,
    /// `data` was handed out by the last `next_event`; clear it before assembling the next event.
    handed_out: bool,
    max_event_bytes: usize,
}

impl SseDecoder {
    pub(crate) fn new(max_event_bytes: usize) -> Self {
        SseDecoder {
            buf: Vec::new(),
            pos: 0,
            data: String::new(),
            has_data: false,
            handed_out: false,
            max_event_bytes,
        }
    }

    /// Adds bytes from the network.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Marks the end of the stream: a last unterminated line counts, and a pending event is dispatched even
    /// without its blank line (lenient: some servers omit the final one).
    pub(crate) fn finish(&mut self) {
        self.push(b"\n\n");
    }

    /// The data of the next complete event, or `None` until more bytes arrive.
    pub(crate) fn next_event(&mut self) -> Result<Option<&str>, SseError> {
        if self.handed_out {
            self.data.clear();
            self.has_data = false;
            self.handed_out = false;
        }
        loop {
            let rest = &self.buf[self.pos..];
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if rest.len() + self.data.len() > self.max_event_bytes {
                    return Err(SseError::TooLarge(self.max_event_bytes));
                }
                return Ok(None);
            };
            let terminator = if rest[end] == b'\n' {
                1
            } else if end + 1 == rest.len() {
                // A `\r` at the end of what we have: a `\n` may follow in the next chunk. Wait for it.
                return Ok(None);
            } else if rest[end + 1] == b'\n' {
                2
            } else {
                1
            };
            let line = &rest[..end];
            self.pos += end + terminator;

            if line.is_empty() {
                if self.has_data {
                    self.handed_out = true;
                    return Ok(Some(&self.data));
                }
                continue;
            }
            if line[0] == b':' {
                continue; // a comment, e.g. a keep-alive
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &[][..]),
            };
            if field != b"data" {
                continue;
            }
            let value = std::str::from_utf8(value).map_err(|_| SseError::NotUtf8)?;
            // The `\n` joining it to the previous `data:` line counts too.
            let joined = self.data.len() + usize::from(self.has_data) + value.len();
            if joined > self.max_event_bytes {
                return Err(SseError::TooLarge(self.max_event_bytes));
            }
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Result<Vec<String>, SseError> {
        let mut decoder = SseDecoder::new(1 << 20);
        let mut events = Vec::new();
        for chunk in input.chunks(piece) {
            decoder.push(chunk);
            while let Some(data) = decoder.next_event()? {
                events.push(data.to_owned());
            }
        }
        decoder.finish();
        while let Some(data) = decoder.next_event()? {
            events.push(data.to_owned());
        }
        Ok(events)
    }

    #[test]
    fn decodes_the_same_whatever_the_chunk_boundaries() {
        let input = "data: {\"a\":\"é\"}\n\n: keep-alive\r\n\r\nevent: message\r\ndata:x\r\ndata: y\r\n\r\ndata: z\r\rid: 3\ndata\n\ndata: [DONE]\n\n";
        let expected = vec!["{\"a\":\"é\"}", "x\ny", "z", "", "[DONE]"];
        for piece in 1..input.len() {
            assert_eq!(
                decode_in_pieces(input.as_bytes(), piece).expect("test input is valid"),
                expected,
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn a_final_event_without_its_blank_line_still_counts() {
        assert_eq!(
            decode_in_pieces(b"data: a\n\ndata: [DONE]", 4).expect("test input is valid"),
            vec!["a", "[DONE]"]
        );
    }

    #[test]
    fn oversized_events_and_bad_utf8_are_errors() {
        let mut decoder = SseDecoder::new(8);
        decoder.push(b"data: 0123456789");
        assert_eq!(decoder.next_event(), Err(SseError::TooLarge(8)));
        assert_eq!(
            decode_in_pieces(b"data: \xff\xfe\n\n", 3),
            Err(SseError::NotUtf8)
        );
        // Several `data:` lines are joined with `\n`, which counts towards the limit.
        let mut decoder = SseDecoder::new(8);
        decoder.push(b"data: 1234\ndata: 567\n\n");
        assert_eq!(decoder.next_event(), Ok(Some("1234\n567")));
        decoder.push(b"data: 1234\ndata: 5678\n\n");
        assert_eq!(decoder.next_event(), Err(SseError::TooLarge(8)));
    }
}
