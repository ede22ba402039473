//! Rows of the `events` table: each holds a *chunk*, a run of consecutive events of one session and one run.
//!
//! A streaming turn appends about twenty token events per second per session. Stored one per row, every
//! event paid for a B-tree insert with its 36-byte session key, and ingestion was a quarter of the server's
//! CPU at 1,000 streams. Moved into the table as chunks, a second of a session's tokens is one insert.
//!
//! A row is keyed by `(session_id, seq)` where `seq` is the chunk's *last* event, and also holds `first_seq`
//! and the events' JSON one per line (serde_json escapes newlines inside strings, so a line is an event).
//! Keying by the last seq makes "the events after N" a range scan from the first row with `seq > N` (whose
//! chunk may start at or before N: those events are skipped), and keeps `MAX(seq)` the log's last seq. Chunks
//! never span two runs, so pruning by run deletes whole rows.

use std::borrow::Borrow;

use agentd_core::event::LoggedEvent;
use agentd_core::store::{StoreError, StoreResult};
use rusqlite::{params, Connection};

use crate::rows::{to_sql_int, Context};

/// Writes `events` (consecutive, of one session, ascending seq) as one row per run they belong to.
pub(crate) fn insert<E: Borrow<LoggedEvent>>(conn: &Connection, events: &[E]) -> StoreResult<()> {
    let mut payload = String::new();
    for group in events.chunk_by(|a, b| a.borrow().event.run_id == b.borrow().event.run_id) {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            continue;
        };
        let (first, last) = (first.borrow(), last.borrow());
        payload.clear();
        for (i, e) in group.iter().enumerate() {
            if i > 0 {
                payload.push('\n');
            }
            payload.push_str(&e.borrow().json);
        }
        insert_row(
            conn,
            &last.session_id,
            first.seq(),
            last.seq(),
            &last.event.run_id,
            &payload,
        )?;
    }
    Ok(())
}

/// Writes one row: events `first..=last` of one run, their JSON one per line.
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
    for line in payload.split('\n') {
        let logged = LoggedEvent::from_json(session_id.to_string(), line.to_string())
            .map_err(|e| corrupt(e.to_string()))?;
        // The payload carries each event's own seq; a mismatch means the row was tampered with or mis-written.
        if i64::try_from(logged.seq()).ok() != Some(expected) {
            return Err(corrupt(format!(
                "expected seq {expected}, found {}",
                logged.seq()
            )));
        }
        expected += 1;
        if logged.seq() > after {
            out.push(logged);
        }
    }
    if expected != last + 1 {
        return Err(corrupt(format!("it ends at seq {}", expected - 1)));
    }
    Ok(())
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
