//! Splits `<think>...</think>` sections out of streamed model text, across arbitrary chunk boundaries.

/// One piece of split output.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Thinking(String),
}

/// Streaming splitter: feed chunks, get pieces; holds back only a possible partial tag.
#[derive(Default)]
pub struct ThinkSplitter {
    in_think: bool,
    pending: String,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

impl ThinkSplitter {
    pub fn in_think(&self) -> bool {
        self.in_think
    }

    /// Feeds one chunk. The common case (no `<` anywhere) is one push with no copying beyond the piece.
    pub fn feed(&mut self, chunk: &str, out: &mut Vec<Piece>) {
        if self.pending.is_empty() && !chunk.contains('<') {
            if !chunk.is_empty() {
                out.push(self.piece(chunk.to_string()));
            }
            return;
        }
        self.pending.push_str(chunk);
        loop {
            let tag = if self.in_think { CLOSE } else { OPEN };
            if let Some(pos) = self.pending.find(tag) {
                let before: String = self.pending[..pos].to_string();
                if !before.is_empty() {
                    out.push(self.piece(before));
                }
                self.pending.drain(..pos + tag.len());
                self.in_think = !self.in_think;
                continue;
            }
            // Keep back the longest suffix that could start the tag.
            let keep = (1..tag.len())
                .rev()
                .find(|&n| {
                    self.pending.len() >= n
                        && self.pending.is_char_boundary(self.pending.len() - n)
                        && tag.starts_with(&self.pending[self.pending.len() - n..])
                })
                .unwrap_or(0);
            let emit_to = self.pending.len() - keep;
            if emit_to > 0 {
                let text: String = self.pending[..emit_to].to_string();
                self.pending.drain(..emit_to);
                out.push(self.piece(text));
            }
            return;
        }
    }

    /// Flushes whatever was held back at the end of the stream.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            out.push(self.piece(rest));
        }
    }

    fn piece(&self, s: String) -> Piece {
        if self.in_think {
            Piece::Thinking(s)
        } else {
            Piece::Text(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&str]) -> (String, String) {
        let mut s = ThinkSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        let mut text = String::new();
        let mut think = String::new();
        for p in out {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Thinking(t) => think.push_str(&t),
            }
        }
        (text, think)
    }

    #[test]
    fn splits_across_boundaries() {
        assert_eq!(
            split(&["<think>hmm</think>answer"]),
            ("answer".into(), "hmm".into())
        );
        assert_eq!(
            split(&["<thi", "nk>h", "mm</th", "ink>ans", "wer"]),
            ("answer".into(), "hmm".into())
        );
        assert_eq!(
            split(&["a < b", " and <x>"]),
            ("a < b and <x>".into(), "".into())
        );
        assert_eq!(split(&["plain"]), ("plain".into(), "".into()));
        assert_eq!(
            split(&["é<", "think>ü</think>ö"]),
            ("éö".into(), "ü".into())
        );
    }
}
