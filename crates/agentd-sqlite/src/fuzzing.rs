//! Entry points for the fuzz targets in `fuzz/` (built only with the `fuzzing` feature): the log tail's record
//! decoder, and the real start-up recovery ([`crate::tail::recover`]) of a segment file holding any bytes,
//! followed by a read of every session's log as a restarted server would read it.

use std::path::{Path, PathBuf};

use agentd_core::store::{StoreError, StoreResult};
use rusqlite::Connection;

use crate::rows::Context;
use crate::{reader, schema, tail};

/// One record as the decoder read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailRecord {
    pub session_id: String,
    pub seq: u64,
    pub run_id: String,
    pub json: String,
}

/// Splits a segment's bytes into records; the offset of the first torn or corrupt record, if any.
pub fn decode_segment(bytes: &[u8]) -> (Vec<TailRecord>, Option<usize>) {
    let (records, torn) = tail::decode(bytes);
    let records = records
        .into_iter()
        .map(|r| TailRecord {
            session_id: r.session_id,
            seq: r.seq,
            run_id: r.run_id,
            json: r.json,
        })
        .collect();
    (records, torn)
}

/// Appends a record as the append path writes it (length, CRC, body).
pub fn encode_record(buf: &mut Vec<u8>, session_id: &str, seq: u64, run_id: &str, json: &str) {
    tail::encode_raw(buf, session_id, seq, run_id, json);
}

/// The largest record body the decoder accepts.
pub const MAX_RECORD: usize = tail::MAX_RECORD;

/// Rewrites the CRC of each record whose length field fits in `bytes`, so that arbitrary bodies get past the
/// checksum and reach the body's parsing.
pub fn seal(bytes: &mut [u8]) {
    let mut at = 0;
    while let Some(len) = bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(|b| u32::from_le_bytes(b) as usize)
    {
        let body = at + tail::HEADER;
        let Some(end) = body.checked_add(len).filter(|end| *end <= bytes.len()) else {
            return;
        };
        let crc = crc32fast::hash(&bytes[body..end]);
        bytes[at + 4..body].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// The sessions a [`Replay`] database holds: `s1` with an empty log, `s2` with events 1..=3 stored.
pub const SESSIONS: [&str; 2] = ["s1", "s2"];

/// An in-memory database with the real schema and two sessions, and a directory for segment files.
pub struct Replay {
    conn: Connection,
    /// The database path the segment files are named after (no database file is created there).
    db: PathBuf,
}

impl Replay {
    /// `dir` must exist and is used only for the segment file.
    pub fn new(dir: &Path) -> StoreResult<Replay> {
        let mut conn = Connection::open_in_memory().ctx("opening an in-memory database")?;
        schema::migrate(&mut conn)?;
        conn.execute_batch(
            "INSERT INTO sessions (id, principal, agent, status, metadata, created_at, updated_at)
             VALUES ('s1', 'p', 'a', 'active', '{}', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
                    ('s2', 'p', 'a', 'active', '{}', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z');",
        )
        .ctx("creating the sessions")?;
        let stored: Vec<_> = (1..=3)
            .map(|seq| {
                agentd_core::event::LoggedEvent::new(
                    "s2".into(),
                    agentd_core::event::Event {
                        seq,
                        run_id: "r1".into(),
                        agent: "a".into(),
                        is_subagent: false,
                        kind: agentd_core::event::EventKind::TextDelta { delta: "x".into() },
                    },
                )
            })
            .collect();
        crate::chunk::insert(&conn, &stored)?;
        Ok(Replay {
            conn,
            db: dir.join("fuzz.db"),
        })
    }

    /// Writes `segment` as the one segment file a killed process left, runs the start-up recovery on it, then
    /// reads every session's whole log back as a restarted server would. Returns each session's seqs. The
    /// database is put back as it was before returning.
    pub fn replay(&mut self, segment: &[u8]) -> StoreResult<Vec<Vec<u64>>> {
        let mut path = self.db.as_os_str().to_owned();
        path.push(".tail.00000001");
        let path = PathBuf::from(path);
        std::fs::write(&path, segment)
            .map_err(|e| StoreError::Other(format!("writing {}: {e}", path.display())))?;
        let result = tail::recover(&mut self.conn, &self.db).and_then(|_| {
            SESSIONS
                .iter()
                .map(|id| {
                    let events = reader::read_events(&self.conn, id, 0, usize::MAX)?;
                    Ok(events.iter().map(|e| e.seq()).collect())
                })
                .collect()
        });
        let _ = std::fs::remove_file(&path);
        self.conn
            .execute_batch("DELETE FROM events WHERE NOT (session_id = 's2' AND seq <= 3);")
            .ctx("resetting the database")?;
        result
    }
}
