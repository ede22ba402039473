//! Rows of the `events` table: each holds a *chunk*, a run of consecutive events of one session and one run.
//!
//! A streaming turn appends about twenty token events per second per session. Stored one per row, every
//! event paid for a B-tree insert with its 36-byte session key, and ingestion was a quarter of the server's
//! CPU at 1,000 streams. Moved into the table as chunks, a second of a session's tokens is one insert.
//!
//! A row is keyed by `(session_id, seq)` where `seq` is the chunk's *last* event, and also holds `first_seq`
//! and the events one per line. Keying by the last seq makes "the events after N" a range scan from the first
//! row with `seq > N` (whose chunk may start at or before N: those events are skipped), and keeps `MAX(seq)`
//! the log's last seq. Chunks never span two runs, so pruning by run deletes whole rows.
//!
//! A line is an event's JSON (serde_json escapes newlines inside strings, so a line is an event), except for
//! the stream's own events: a text or thinking delta whose envelope (run, agent, subagent flag) is the previous
//! line's is stored as `t"<delta>"` or `h<step> "<delta>"` (the delta as a JSON string). A token's full JSON
//! is about 120 bytes, most of it the envelope; compact, a second of a stream's tokens is a small row, several
//! to a page, where full lines made a row of about two pages and most inserts split a leaf: about one database
//! page write per token, now a fraction of one. Reading a compact line rebuilds the event and its JSON, which
//! is byte for byte what was appended (the JSON is made by the same serialisation).

use std::borrow::Borrow;
use std::io::Write;

use agentd_core::event::{Event, EventKind, LoggedEvent};
use agentd_core::store::{StoreError, StoreResult};
use rusqlite::{params, Connection};

use crate::rows::{to_sql_int, Context};

/// Marks a compact text delta line.
const TEXT: u8 = b't';
/// Marks a compact thinking delta line.
const THINKING: u8 = b'h';

/// Writes `events` (consecutive, of one session, ascending seq) as one row per run they belong to.
pub(crate) fn insert<E: Borrow<LoggedEvent>>(conn: &Connection, events: &[E]) -> StoreResult<()> {
    let mut payload: Vec<u8> = Vec::new();
    for group in events.chunk_by(|a, b| a.borrow().event.run_id == b.borrow().event.run_id) {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            continue;
        };
        let (first, last) = (first.borrow(), last.borrow());
        payload.clear();
        let mut previous: Option<&Event> = None;
        for e in group {
            let e = e.borrow();
            if let Some(previous) = previous {
                payload.push(b'\n');
                if !compact_line(previous, &e.event, &mut payload) {
                    payload.extend_from_slice(e.json.as_bytes());
                }
            } else {
                payload.extend_from_slice(e.json.as_bytes());
            }
            previous = Some(&e.event);
        }
        // Made of whole JSON texts and serde_json's output: UTF-8 whatever the events hold.
        let payload = std::str::from_utf8(&payload)
            .map_err(|e| StoreError::Other(format!("encoding a chunk: {e}")))?;
        insert_row(
            conn,
            &last.session_id,
            first.seq(),
            last.seq(),
            &last.event.run_id,
            payload,
        )?;
    }
    Ok(())
}

/// Appends `event` as a compact line if it is a delta with `previous`'s envelope; false (nothing appended)
/// otherwise.
fn compact_line(previous: &Event, event: &Event, out: &mut Vec<u8>) -> bool {
    if event.agent != previous.agent
        || event.is_subagent != previous.is_subagent
        || event.run_id != previous.run_id
    {
        return false;
    }
    let start = out.len();
    let written = match &event.kind {
        EventKind::TextDelta { delta } => {
            out.push(TEXT);
            serde_json::to_writer(&mut *out, delta)
        }
        EventKind::ThinkingDelta { delta, step } => {
            out.push(THINKING);
            // Writing into memory: no error to expect (and the full line is the fallback if one came).
            let _ = write!(out, "{step} ");
            serde_json::to_writer(&mut *out, delta)
        }
        _ => return false,
    };
    if written.is_err() {
        // Writing a string into memory does not fail; if it did, the full line is the fallback.
        out.truncate(start);
        return false;
    }
    true
}

/// Writes one row: events `first..=last` of one run, one per line.
pub(crate) fn insert_row(
    conn: &Connection,
    session_id: &str,
    first: u64,
    last: u64,
    run_id: &str,
    payload: &str,
) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO events (session_id, seq, first_seq, run_id, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .ctx("preparing event insert")?
    .execute(params![
        session_id,
        to_sql_int(last, "seq")?,
        to_sql_int(first, "seq")?,
        run_id,
        payload
    ])
    .ctx("inserting events")?;
    Ok(())
}

/// Decodes a row, keeping the events with seq > `after`, and appends them to `out`. Checks that the row holds
/// exactly the events `first..=last`, in order: anything else is a corrupt row, reported as such.
pub(crate) fn decode_into(
    session_id: &str,
    first: i64,
    last: i64,
    payload: &str,
    after: u64,
    out: &mut Vec<LoggedEvent>,
) -> StoreResult<()> {
    let corrupt = |what: String| {
        StoreError::Other(format!(
            "corrupt row: events {first}..={last} of session {session_id}: {what}"
        ))
    };
    let mut expected = first;
    // The envelope of the previous line's event, for compact lines.
    let mut envelope: Option<(String, String, bool)> = None;
    for line in payload.split('\n') {
        let seq = u64::try_from(expected).map_err(|_| corrupt(format!("seq {expected}")))?;
        let logged = match line.as_bytes().first() {
            Some(&(TEXT | THINKING)) => {
                let Some((run_id, agent, is_subagent)) = &envelope else {
                    return Err(corrupt("a compact line comes first".into()));
                };
                let kind = compact_kind(line).map_err(corrupt)?;
                if seq <= after {
                    expected += 1;
                    continue;
                }
                LoggedEvent::new(
                    session_id.to_string(),
                    Event {
                        seq,
                        run_id: run_id.clone(),
                        agent: agent.clone(),
                        is_subagent: *is_subagent,
                        kind,
                    },
                )
            }
            _ => {
                let logged = LoggedEvent::from_json(session_id.to_string(), line.to_string())
                    .map_err(|e| corrupt(e.to_string()))?;
                // The payload carries each event's own seq; a mismatch means the row was tampered with or
                // mis-written.
                if logged.seq() != seq {
                    return Err(corrupt(format!(
                        "expected seq {expected}, found {}",
                        logged.seq()
                    )));
                }
                let e = &logged.event;
                envelope = Some((e.run_id.clone(), e.agent.clone(), e.is_subagent));
                if seq <= after {
                    expected += 1;
                    continue;
                }
                logged
            }
        };
        expected += 1;
        out.push(logged);
    }
    if expected != last + 1 {
        return Err(corrupt(format!("it ends at seq {}", expected - 1)));
    }
    Ok(())
}

/// The event a compact line (`t"..."` or `h<step> "..."`) holds.
fn compact_kind(line: &str) -> Result<EventKind, String> {
    let bad = |e: serde_json::Error| format!("a compact line: {e}");
    if let Some(text) = line.strip_prefix('t') {
        let delta: String = serde_json::from_str(text).map_err(bad)?;
        return Ok(EventKind::TextDelta { delta });
    }
    let rest = line.strip_prefix('h').unwrap_or(line);
    let (step, text) = rest
        .split_once(' ')
        .ok_or_else(|| "a compact thinking line without its step".to_string())?;
    let step: u32 = step
        .parse()
        .map_err(|_| format!("a compact thinking line's step {step:?}"))?;
    let delta: String = serde_json::from_str(text).map_err(bad)?;
    Ok(EventKind::ThinkingDelta { delta, step })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use agentd_core::event::{Event, EventKind};

    fn ev(seq: u64, run: &str, text: &str) -> LoggedEvent {
        LoggedEvent::new(
            "s".into(),
            Event {
                seq,
                run_id: run.into(),
                agent: "a".into(),
                is_subagent: false,
                kind: EventKind::TextDelta { delta: text.into() },
            },
        )
    }

    fn table() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE events (session_id TEXT NOT NULL, seq INTEGER NOT NULL, first_seq INTEGER NOT NULL,
                                  run_id TEXT NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (session_id, seq))
             WITHOUT ROWID;",
        )
        .unwrap();
        conn
    }

    fn rows(conn: &Connection) -> Vec<(i64, i64, String, String)> {
        let mut stmt = conn
            .prepare("SELECT seq, first_seq, run_id, payload FROM events ORDER BY seq")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn events_of_two_runs_make_two_rows_that_decode_back() {
        let conn = table();
        // A newline inside a delta stays escaped in its line.
        let events = [ev(5, "r1", "a\nb"), ev(6, "r1", "c"), ev(7, "r2", "d")];
        insert(&conn, &events).unwrap();
        let stored = rows(&conn);
        assert_eq!(stored.len(), 2);
        assert_eq!(
            (stored[0].0, stored[0].1, stored[0].2.as_str()),
            (6, 5, "r1")
        );
        assert_eq!(
            (stored[1].0, stored[1].1, stored[1].2.as_str()),
            (7, 7, "r2")
        );
        let mut out = Vec::new();
        for (last, first, _, payload) in &stored {
            decode_into("s", *first, *last, payload, 5, &mut out).unwrap();
        }
        let seqs: Vec<u64> = out.iter().map(|e| e.seq()).collect();
        assert_eq!(seqs, vec![6, 7], "seq 5 is not after 5");
        out.clear();
        decode_into("s", stored[0].1, stored[0].0, &stored[0].3, 0, &mut out).unwrap();
        assert_eq!(out[0].json, events[0].json);
        assert!(matches!(&out[0].event.kind, EventKind::TextDelta { delta } if delta == "a\nb"));
    }

    fn event(seq: u64, agent: &str, is_subagent: bool, kind: EventKind) -> LoggedEvent {
        LoggedEvent::new(
            "s".into(),
            Event {
                seq,
                run_id: "r1".into(),
                agent: agent.into(),
                is_subagent,
                kind,
            },
        )
    }

    fn text(delta: &str) -> EventKind {
        EventKind::TextDelta {
            delta: delta.into(),
        }
    }

    #[test]
    fn deltas_are_stored_compact_and_read_back_as_the_same_json() {
        let conn = table();
        let thinking = |delta: &str| EventKind::ThinkingDelta {
            delta: delta.into(),
            step: 12,
        };
        let events = [
            event(1, "a", false, thinking("hm")),
            event(2, "a", false, thinking("m \"q\"\n")),
            event(3, "a", false, text("Hé")),
            event(4, "a", false, text("llo\n\"x\"")),
            // Another envelope (a subagent's delta): a full line, and the envelope of the lines after it.
            event(5, "helper", true, text("sub")),
            event(6, "helper", true, text("agent")),
            event(
                7,
                "a",
                false,
                EventKind::InputReceived {
                    request_id: "q1".into(),
                },
            ),
            event(8, "a", false, text("")),
            event(9, "a", false, text("end")),
        ];
        insert(&conn, &events).unwrap();
        let stored = rows(&conn);
        assert_eq!(stored.len(), 1);
        let payload = &stored[0].3;
        let lines: Vec<&str> = payload.split('\n').collect();
        assert_eq!(lines.len(), 9, "{payload}");
        let full: Vec<usize> = (0..9).filter(|i| lines[*i].starts_with('{')).collect();
        assert_eq!(
            full,
            vec![0, 4, 6],
            "only envelope changes and other events are full: {payload}"
        );
        assert_eq!(lines[1], r#"h12 "m \"q\"\n""#);
        assert_eq!(lines[3], r#"t"llo\n\"x\"""#);
        assert_eq!(lines[5], r#"t"agent""#);
        let full_size: usize = events.iter().map(|e| e.json.len() + 1).sum();
        assert!(
            payload.len() * 2 < full_size,
            "{} vs {full_size}",
            payload.len()
        );

        for after in 0..9u64 {
            let mut out = Vec::new();
            decode_into("s", 1, 9, payload, after, &mut out).unwrap();
            let got: Vec<(u64, &str)> = out.iter().map(|e| (e.seq(), e.json.as_str())).collect();
            let want: Vec<(u64, &str)> = events[after as usize..]
                .iter()
                .map(|e| (e.seq(), e.json.as_str()))
                .collect();
            assert_eq!(got, want, "after {after}");
            for (o, e) in out.iter().zip(&events[after as usize..]) {
                assert_eq!(o.event, e.event);
            }
        }
    }

    #[test]
    fn a_row_of_full_lines_written_before_compact_lines_still_reads() {
        let events = [
            event(1, "a", false, text("x")),
            event(2, "a", false, text("y")),
        ];
        let payload = format!("{}\n{}", events[0].json, events[1].json);
        let mut out = Vec::new();
        decode_into("s", 1, 2, &payload, 0, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].json, events[1].json);
    }

    #[test]
    fn bad_compact_lines_are_reported_corrupt() {
        let head = event(1, "a", false, text("x")).json;
        for (payload, wanted) in [
            ("t\"x\"".to_string(), "a compact line comes first"),
            (format!("{head}\nt\"unterminated"), "a compact line"),
            (format!("{head}\nt42"), "a compact line"),
            (format!("{head}\nh\"x\""), "without its step"),
            (format!("{head}\nhx \"x\""), "step"),
        ] {
            let err = decode_into("s", 1, 2, &payload, 0, &mut Vec::new()).unwrap_err();
            assert!(err.to_string().contains("corrupt row"), "{err}");
            assert!(err.to_string().contains(wanted), "{payload}: {err}");
        }
    }

    #[test]
    fn a_row_whose_events_do_not_match_its_range_is_reported_corrupt() {
        let payload = format!("{}\n{}", ev(1, "r", "x").json, ev(3, "r", "y").json);
        let err = decode_into("s", 1, 2, &payload, 0, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("expected seq 2, found 3"), "{err}");
        let short = ev(1, "r", "x").json;
        let err = decode_into("s", 1, 2, &short, 0, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("ends at seq 1"), "{err}");
        let err = decode_into("s", 1, 1, "{not json", 0, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("corrupt row"), "{err}");
    }
}
