//! The token text the mock upstream streams, and its parser on the client side.
//!
//! Every token is `t<index>@<unix_micros> ` : the index lets a client tell a missed token from a duplicated
//! one, and the emit time (taken by the mock just before it writes the token) lets it compute the delivery
//! latency a server added, as receive time minus emit time. Both ends run on the same machine and read the
//! same clock, so no clock sync is involved.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (0 if the clock is before 1970, which only a broken machine has).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Appends token `index`, stamped with `emitted_us`, to `out`.
pub fn push_token(out: &mut String, index: u32, emitted_us: u64) {
    // Writing into a String cannot fail.
    let _ = write!(out, "t{index}@{emitted_us} ");
}

/// The whole text of a reply of `tokens` tokens, all stamped with `emitted_us` (used by non-streaming replies).
pub fn reply_text(tokens: u32, emitted_us: u64) -> String {
    let mut s = String::with_capacity(tokens as usize * 22);
    for i in 0..tokens {
        push_token(&mut s, i, emitted_us);
    }
    s
}

/// One parsed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Position of the token in its reply, from 0.
    pub index: u32,
    /// When the mock wrote it, in Unix microseconds.
    pub emitted_us: u64,
}

/// Finds stamps in a stream of text deltas.
///
/// A server may split or merge the upstream's deltas, so a token can arrive in pieces: the unfinished tail of
/// one delta (no trailing space yet) is carried over to the next.
#[derive(Debug, Default)]
pub struct StampParser {
    carry: String,
}

impl StampParser {
    /// A parser with nothing carried over.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one delta; calls `f` for every complete token in it. Words that are not stamps are skipped.
    pub fn feed(&mut self, delta: &str, mut f: impl FnMut(Stamp)) {
        let mut text = delta;
        if !self.carry.is_empty() {
            match delta.find(' ') {
                Some(i) => {
                    self.carry.push_str(&delta[..i]);
                    if let Some(s) = parse_word(&self.carry) {
                        f(s);
                    }
                    self.carry.clear();
                    text = &delta[i + 1..];
                }
                None => {
                    self.carry.push_str(delta);
                    return;
                }
            }
        }
        let complete = match text.rfind(' ') {
            Some(i) => {
                self.carry.push_str(&text[i + 1..]);
                &text[..i]
            }
            None => {
                self.carry.push_str(text);
                return;
            }
        };
        for word in complete.split(' ') {
            if let Some(s) = parse_word(word) {
                f(s);
            }
        }
    }
}

/// Parses `t<index>@<micros>`.
fn parse_word(word: &str) -> Option<Stamp> {
    let rest = word.strip_prefix('t')?;
    let (index, micros) = rest.split_once('@')?;
    Some(Stamp {
        index: index.parse().ok()?,
        emitted_us: micros.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(deltas: &[&str]) -> Vec<Stamp> {
        let mut p = StampParser::new();
        let mut out = Vec::new();
        for d in deltas {
            p.feed(d, |s| out.push(s));
        }
        out
    }

    #[test]
    fn parses_whole_split_and_merged_tokens() {
        let mut text = String::new();
        push_token(&mut text, 0, 100);
        push_token(&mut text, 1, 200);
        push_token(&mut text, 2, 300);
        let want = vec![
            Stamp {
                index: 0,
                emitted_us: 100,
            },
            Stamp {
                index: 1,
                emitted_us: 200,
            },
            Stamp {
                index: 2,
                emitted_us: 300,
            },
        ];
        assert_eq!(all(&[&text]), want);
        // Split anywhere, also inside a token and right at a space.
        for cut in 1..text.len() {
            assert_eq!(all(&[&text[..cut], &text[cut..]]), want, "cut at {cut}");
        }
        // Foreign words (a tool answer) are skipped.
        assert_eq!(
            all(&["The result is 98. t5@7 "]),
            vec![Stamp {
                index: 5,
                emitted_us: 7
            }]
        );
    }
}
