//! The log's tail: appended events that are durable but not yet in the `events` table.
//!
//! Why: with many sessions streaming at once, tokens arrive one at a time from different sessions, and the
//! `events` table is clustered by session. Writing each token into its session's B-tree page would rewrite
//! about one database page per token (into the WAL, and again at checkpoint). Instead the writer appends a
//! group's token events to an append-only file (one `write` per group, no fsync, like the WAL itself: durable
//! against a killed process), keeps them in memory for readers, and moves them into `events` later, many per
//! session at once ("ingestion", see `writer.rs`), when each page is written once for dozens of events.
//!
//! Invariants:
//! - A session's tail is the suffix of its log: every event in the tail has a larger seq than every event of
//!   that session in the `events` table, and the tail is gap-free. Ingestion moves a session's oldest tail
//!   events, in order; events that change other rows (messages, runs) never go to the tail at all: they commit
//!   to SQLite together with their session's tail, so the tables and the log never disagree.
//! - The writer removes events from the in-memory tail only after the transaction that put them in `events`
//!   has committed; a reader looks at the tail before it queries the table, so every event is in one or both.
//! - A segment file is deleted once every record in it is in `events`. On start-up [`recover`] replays what
//!   is left: a record is inserted only if it continues its session's stored log (seq = last + 1), so records
//!   already ingested, or pruned since, are skipped, and a torn record at the end (a write cut short by a
//!   kill) ends the replay of that file.
//!
//! Record format (little-endian): `u32 body length`, `u32 CRC-32 of the body`, then the body: `u64 seq`,
//! `u16 length` + session id, `u16 length` + run id, and the event's JSON (the rest).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentd_core::event::LoggedEvent;
use agentd_core::store::{StoreError, StoreResult};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::chunk;
use crate::rows::{from_sql_int, Context};

/// A segment file is closed, and a new one started, past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// The largest record body accepted when reading a segment back (a longer length field means corruption).
pub(crate) const MAX_RECORD: usize = 64 * 1024 * 1024;
/// Record header: body length and CRC.
pub(crate) const HEADER: usize = 8;

/// One tail event and the segment file holding its record.
pub(crate) struct TailEvent {
    pub(crate) event: Arc<LoggedEvent>,
    pub(crate) segment: u64,
}

/// One session's tail.
pub(crate) struct SessionTail {
    /// When the oldest event now in this tail was appended.
    pub(crate) since: Instant,
    pub(crate) events: VecDeque<TailEvent>,
}

/// The in-memory tail of every session, shared by the append path (which adds at the back), the writer thread
/// (which removes from the front once ingested) and the readers.
#[derive(Default)]
pub(crate) struct Tail {
    sessions: Mutex<HashMap<String, SessionTail>>,
    /// Events in the tail, over all sessions (changed under the lock).
    total: AtomicUsize,
}

impl Tail {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionTail>> {
        // A poisoned lock means a thread panicked while holding it; every change under it is a single push or
        // drain, so the map is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events in the tail, over all sessions.
    pub(crate) fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Adds durable events (all in `segment`) at the back of their sessions' tails. Returns whether a session's
    /// tail has reached `cap` (time to wake the writer).
    pub(crate) fn push(&self, events: &[Arc<LoggedEvent>], segment: u64, cap: usize) -> bool {
        let now = Instant::now();
        let mut full = false;
        let mut map = self.lock();
        for ev in events {
            let t = match map.get_mut(ev.session_id.as_str()) {
                Some(t) => t,
                None => map
                    .entry(ev.session_id.clone())
                    .or_insert_with(|| SessionTail {
                        since: now,
                        events: VecDeque::new(),
                    }),
            };
            t.events.push_back(TailEvent {
                event: Arc::clone(ev),
                segment,
            });
            full |= t.events.len() >= cap;
        }
        self.total.fetch_add(events.len(), Ordering::Relaxed);
        full
    }

    /// Removes the oldest `n` events of each session's tail (they are in the table now); returns how many
    /// records of each segment that was.
    pub(crate) fn drop_front<'a>(
        &self,
        done: impl Iterator<Item = (&'a str, usize)>,
    ) -> HashMap<u64, usize> {
        let mut per_segment: HashMap<u64, usize> = HashMap::new();
        let now = Instant::now();
        let mut map = self.lock();
        for (id, n) in done {
            let Some(t) = map.get_mut(id) else { continue };
            let n = n.min(t.events.len());
            for e in t.events.drain(..n) {
                *per_segment.entry(e.segment).or_insert(0) += 1;
            }
            self.total.fetch_sub(n, Ordering::Relaxed);
            if t.events.is_empty() {
                map.remove(id);
            } else {
                // What is left arrived after the events just moved; "now" is a safe upper bound on its age.
                t.since = now;
            }
        }
        per_segment
    }

    /// Sessions that have events in the tail.
    pub(crate) fn has(&self, session_id: &str) -> bool {
        self.lock().contains_key(session_id)
    }

    /// The session's tail events with `seq > after`, at most `limit`.
    pub(crate) fn read(&self, session_id: &str, after: u64, limit: usize) -> Vec<Arc<LoggedEvent>> {
        let map = self.lock();
        let Some(tail) = map.get(session_id) else {
            return Vec::new();
        };
        let start = tail.events.partition_point(|e| e.event.seq() <= after);
        tail.events
            .range(start..)
            .take(limit)
            .map(|e| Arc::clone(&e.event))
            .collect()
    }

    /// The first and last seq in the session's tail, if it has one.
    pub(crate) fn bounds(&self, session_id: &str) -> Option<(u64, u64)> {
        let map = self.lock();
        let tail = map.get(session_id)?;
        Some((
            tail.events.front()?.event.seq(),
            tail.events.back()?.event.seq(),
        ))
    }
}

/// Merges a page read from the `events` table with the tail read just before it: table rows first, then tail
/// events past them, each seq once, at most `limit`.
pub(crate) fn merge(
    mut stored: Vec<Arc<LoggedEvent>>,
    tail: Vec<Arc<LoggedEvent>>,
    limit: usize,
) -> Vec<Arc<LoggedEvent>> {
    let mut last = stored.last().map(|e| e.seq());
    for ev in tail {
        if stored.len() >= limit {
            break;
        }
        if last.is_none_or(|l| ev.seq() > l) {
            last = Some(ev.seq());
            stored.push(ev);
        }
    }
    stored.truncate(limit);
    stored
}

/// The append-only segment files. The append path owns the file it writes ([`Journal`]); the writer thread
/// notes what it has ingested in the shared [`SegmentBook`], which deletes segments nobody needs any more.
pub(crate) struct Journal {
    prefix: PathBuf,
    current: File,
    current_id: u64,
    current_len: u64,
    book: Arc<SegmentBook>,
    /// The records of the group being written.
    buf: Vec<u8>,
}

/// Records not yet ingested, per segment; shared by the append path and the writer thread.
pub(crate) struct SegmentBook {
    prefix: PathBuf,
    state: Mutex<BookState>,
}

struct BookState {
    current: u64,
    unapplied: std::collections::BTreeMap<u64, usize>,
}

impl SegmentBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BookState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that records of these segments are now in the `events` table, and deletes every segment except
    /// the current one that holds nothing un-ingested any more.
    pub(crate) fn applied(&self, counts: &HashMap<u64, usize>) {
        let done: Vec<u64> = {
            let mut book = self.lock();
            for (segment, n) in counts {
                if let Some(left) = book.unapplied.get_mut(segment) {
                    *left = left.saturating_sub(*n);
                }
            }
            let current = book.current;
            let done: Vec<u64> = book
                .unapplied
                .iter()
                .filter(|(id, n)| **n == 0 && **id != current)
                .map(|(id, _)| *id)
                .collect();
            for id in &done {
                book.unapplied.remove(id);
            }
            done
        };
        for id in done {
            let path = segment_path(&self.prefix, id);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete an ingested log tail segment");
            }
        }
    }

    /// At a clean shutdown, once everything is ingested: removes every segment file.
    pub(crate) fn close(&self) {
        let book = self.lock();
        if book.unapplied.values().any(|n| *n > 0) {
            return;
        }
        for id in book.unapplied.keys() {
            let path = segment_path(&self.prefix, *id);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete the log tail segment");
            }
        }
    }
}

/// The path prefix of a database's segment files.
fn prefix_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".tail.");
    PathBuf::from(name)
}

fn segment_path(prefix: &Path, id: u64) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(format!("{id:08}"));
    PathBuf::from(name)
}

/// The segment files of a database, oldest first.
fn segments(db: &Path) -> StoreResult<Vec<(u64, PathBuf)>> {
    let prefix = prefix_of(db);
    let dir = match prefix.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => PathBuf::from("."),
    };
    let stem = prefix
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| StoreError::Other(format!("listing {}: {e}", dir.display())))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .strip_prefix(&stem)
            .filter(|rest| rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|rest| rest.parse::<u64>().ok())
        {
            found.push((id, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

impl Journal {
    /// Starts a new, empty segment after any that exist (call after [`recover`] has removed them).
    pub(crate) fn open(db: &Path) -> StoreResult<Journal> {
        let prefix = prefix_of(db);
        let next = segments(db)?.last().map_or(1, |(id, _)| id + 1);
        let current = create_segment(&prefix, next)?;
        let mut unapplied = std::collections::BTreeMap::new();
        unapplied.insert(next, 0);
        let book = Arc::new(SegmentBook {
            prefix: prefix.clone(),
            state: Mutex::new(BookState {
                current: next,
                unapplied,
            }),
        });
        Ok(Journal {
            prefix,
            current,
            current_id: next,
            current_len: 0,
            book,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    pub(crate) fn book(&self) -> Arc<SegmentBook> {
        Arc::clone(&self.book)
    }

    /// Adds an event's record to the group being built.
    pub(crate) fn push(&mut self, ev: &LoggedEvent) {
        encode(&mut self.buf, ev);
    }

    /// Writes the group's records (`records` of them) with one `write`, after which they survive the process
    /// being killed; returns the segment they are in. On error nothing of the group counts as written.
    pub(crate) fn write(&mut self, records: usize) -> StoreResult<u64> {
        let segment = self.current_id;
        if self.buf.is_empty() {
            return Ok(segment);
        }
        // Counted before the write, so the writer never takes the segment for fully ingested while it grows.
        *self.book.lock().unapplied.entry(segment).or_insert(0) += records;
        let result = self.current.write_all(&self.buf);
        let len = self.buf.len() as u64;
        self.buf.clear();
        if let Err(e) = result {
            self.book.applied(&HashMap::from([(segment, records)]));
            // A partial write leaves a torn record that recovery would stop at, hiding later records: cut it off.
            let _ = self.current.set_len(self.current_len);
            return Err(StoreError::Other(format!("writing the log tail: {e}")));
        }
        self.current_len += len;
        if self.current_len >= SEGMENT_BYTES {
            let next = self.current_id + 1;
            let file = create_segment(&self.prefix, next)?;
            {
                let mut book = self.book.lock();
                book.current = next;
                book.unapplied.insert(next, 0);
            }
            self.current = file;
            self.current_id = next;
            self.current_len = 0;
            // The previous segment may already be fully ingested.
            self.book.applied(&HashMap::new());
        }
        Ok(segment)
    }
}

fn create_segment(prefix: &Path, id: u64) -> StoreResult<File> {
    let path = segment_path(prefix, id);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| StoreError::Other(format!("creating {}: {e}", path.display())))
}

fn encode(buf: &mut Vec<u8>, ev: &LoggedEvent) {
    encode_raw(buf, &ev.session_id, ev.seq(), &ev.event.run_id, &ev.json);
}

/// Appends one record: header (body length, CRC), then the body.
pub(crate) fn encode_raw(buf: &mut Vec<u8>, session_id: &str, seq: u64, run_id: &str, json: &str) {
    let sid = session_id.as_bytes();
    let rid = run_id.as_bytes();
    // Ids are uuids or short names (the server checks them long before they get here); cut defensively.
    let sid = &sid[..sid.len().min(u16::MAX as usize)];
    let rid = &rid[..rid.len().min(u16::MAX as usize)];
    let body_len = 8 + 2 + sid.len() + 2 + rid.len() + json.len();
    let start = buf.len();
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(sid.len() as u16).to_le_bytes());
    buf.extend_from_slice(sid);
    buf.extend_from_slice(&(rid.len() as u16).to_le_bytes());
    buf.extend_from_slice(rid);
    buf.extend_from_slice(json.as_bytes());
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// A record read back from a segment.
pub(crate) struct Record {
    pub(crate) session_id: String,
    pub(crate) seq: u64,
    pub(crate) run_id: String,
    pub(crate) json: String,
}

/// Splits a segment's bytes into records; stops at the first torn or corrupt one and says where.
pub(crate) fn decode(bytes: &[u8]) -> (Vec<Record>, Option<usize>) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_one(&bytes[at..]) {
            Some((record, used)) => {
                out.push(record);
                at += used;
            }
            None => return (out, Some(at)),
        }
    }
    (out, None)
}

fn decode_one(bytes: &[u8]) -> Option<(Record, usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let body = bytes.get(HEADER..HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let mut at = 8;
    let mut field = |body: &[u8]| -> Option<String> {
        let n = u16::from_le_bytes(body.get(at..at + 2)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(body.get(at + 2..at + 2 + n)?)
            .ok()?
            .to_string();
        at += 2 + n;
        Some(s)
    };
    let session_id = field(body)?;
    let run_id = field(body)?;
    let json = std::str::from_utf8(body.get(at..)?).ok()?.to_string();
    Some((
        Record {
            session_id,
            seq,
            run_id,
            json,
        },
        HEADER + len,
    ))
}

/// What [`recover`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovered {
    pub(crate) inserted: usize,
    pub(crate) skipped: usize,
}

/// Start-up: moves the records of any segment files left by the previous process into `events`, then deletes
/// the files. Runs before the writer starts, on the writer's connection.
pub(crate) fn recover(conn: &mut Connection, db: &Path) -> StoreResult<Recovered> {
    let files = segments(db)?;
    let mut done = Recovered::default();
    if files.is_empty() {
        return Ok(done);
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("starting log tail recovery")?;
    // Each session's last stored seq, as the replay advances it.
    let mut last: HashMap<String, Option<u64>> = HashMap::new();
    for (_, path) in &files {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| StoreError::Other(format!("reading {}: {e}", path.display())))?;
        let (records, torn) = decode(&bytes);
        if let Some(at) = torn {
            // Normal at the very end of the newest file (a write cut short); anywhere else it loses records.
            tracing::warn!(path = %path.display(), offset = at, "log tail segment ends in a torn or corrupt record; replaying what precedes it");
        }
        for r in records {
            let stored = match last.get(&r.session_id) {
                Some(v) => *v,
                None => {
                    let v = stored_last_seq(&tx, &r.session_id)?;
                    last.insert(r.session_id.clone(), v);
                    v
                }
            };
            // None: the session is gone (never happens unless the file belongs to another database).
            let Some(stored) = stored else {
                done.skipped += 1;
                continue;
            };
            if r.seq != stored + 1 {
                done.skipped += 1;
                continue;
            }
            // A record that passed its checksum but does not hold this event (corruption the CRC missed, a file
            // of another version) would make the session's whole log unreadable: stop its replay there.
            if !holds_event(&r) {
                tracing::warn!(path = %path.display(), session = %r.session_id, seq = r.seq, "log tail record does not hold its event; not replayed");
                done.skipped += 1;
                continue;
            }
            chunk::insert_row(&tx, &r.session_id, r.seq, r.seq, &r.run_id, &r.json)?;
            last.insert(r.session_id, Some(r.seq));
            done.inserted += 1;
        }
    }
    tx.commit().ctx("committing log tail recovery")?;
    for (_, path) in files {
        std::fs::remove_file(&path)
            .map_err(|e| StoreError::Other(format!("deleting {}: {e}", path.display())))?;
    }
    if done.inserted > 0 || done.skipped > 0 {
        tracing::info!(
            inserted = done.inserted,
            skipped = done.skipped,
            "recovered the event log's tail"
        );
    }
    Ok(done)
}

/// The record's JSON is one event (one line, as a chunk row stores it) with the record's seq.
fn holds_event(r: &Record) -> bool {
    !r.json.contains('\n')
        && serde_json::from_str::<agentd_core::event::Event>(&r.json).is_ok_and(|e| e.seq == r.seq)
}

/// The session's last seq as stored (its pruning floor or its newest event); None if there is no such session.
pub(crate) fn stored_last_seq(conn: &Connection, session_id: &str) -> StoreResult<Option<u64>> {
    let row: Option<(i64, Option<i64>)> = conn
        .prepare_cached(
            "SELECT last_seq, (SELECT MAX(seq) FROM events WHERE session_id = ?1) FROM sessions WHERE id = ?1",
        )
        .ctx("preparing last_seq read")?
        .query_row([session_id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .ctx("reading last_seq")?;
    row.map(|(floor, max)| from_sql_int(floor.max(max.unwrap_or(0)), "last_seq"))
        .transpose()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use agentd_core::event::{Event, EventKind};

    fn ev(session: &str, seq: u64, text: &str) -> LoggedEvent {
        LoggedEvent::new(
            session.to_string(),
            Event {
                seq,
                run_id: "r1".into(),
                agent: "a".into(),
                is_subagent: false,
                kind: EventKind::TextDelta { delta: text.into() },
            },
        )
    }

    #[test]
    fn records_round_trip_and_a_torn_end_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, &ev("s1", 1, "hello"));
        encode(&mut buf, &ev("s2", 7, "wörld"));
        let whole = buf.len();
        encode(&mut buf, &ev("s1", 2, "cut"));
        // A write cut short in the third record.
        let (records, torn) = decode(&buf[..buf.len() - 3]);
        assert_eq!(records.len(), 2);
        assert_eq!(torn, Some(whole));
        assert_eq!(records[1].session_id, "s2");
        assert_eq!(records[1].seq, 7);
        assert_eq!(records[1].run_id, "r1");
        assert_eq!(records[1].json, ev("s2", 7, "wörld").json);
        // A flipped byte fails the checksum.
        let mut bad = buf.clone();
        bad[HEADER + 9] ^= 1;
        let (records, torn) = decode(&bad);
        assert!(records.is_empty());
        assert_eq!(torn, Some(0));
        let (records, torn) = decode(&buf);
        assert_eq!((records.len(), torn), (3, None));
    }

    #[test]
    fn recovery_skips_a_record_that_does_not_hold_its_event_and_the_log_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let mut conn = Connection::open_in_memory().unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO sessions (id, principal, agent, status, metadata, created_at, updated_at)
             VALUES ('s1', 'p', 'a', 'active', '{}', 'now', 'now'), ('s2', 'p', 'a', 'active', '{}', 'now', 'now');",
        )
        .unwrap();
        let mut segment = Vec::new();
        encode(&mut segment, &ev("s1", 1, "fine"));
        // Checksums match, contents do not: not JSON, another seq inside, two lines.
        encode_raw(&mut segment, "s1", 2, "r1", "not json");
        encode(&mut segment, &ev("s1", 3, "after the bad one"));
        let two_lines = format!("{}\n{}", ev("s2", 1, "a").json, ev("s2", 2, "b").json);
        encode_raw(&mut segment, "s2", 1, "r1", &ev("s2", 7, "x").json);
        encode_raw(&mut segment, "s2", 1, "r1", &two_lines);
        let mut path = prefix_of(&db).into_os_string();
        path.push("00000001");
        std::fs::write(&path, &segment).unwrap();

        let done = recover(&mut conn, &db).unwrap();
        assert_eq!(
            done,
            Recovered {
                inserted: 1,
                skipped: 4
            }
        );
        let seqs = |id: &str| -> Vec<u64> {
            crate::reader::read_events(&conn, id, 0, 100)
                .unwrap()
                .iter()
                .map(|e| e.seq())
                .collect()
        };
        assert_eq!(seqs("s1"), vec![1]);
        assert!(seqs("s2").is_empty());
    }

    #[test]
    fn merge_prefers_the_table_and_skips_what_it_had() {
        let a: Vec<_> = (3..=5).map(|s| Arc::new(ev("s", s, "x"))).collect();
        let b: Vec<_> = (4..=8).map(|s| Arc::new(ev("s", s, "x"))).collect();
        let seqs = |v: Vec<Arc<LoggedEvent>>| v.iter().map(|e| e.seq()).collect::<Vec<_>>();
        assert_eq!(
            seqs(merge(a.clone(), b.clone(), 100)),
            vec![3, 4, 5, 6, 7, 8]
        );
        assert_eq!(seqs(merge(a.clone(), b.clone(), 4)), vec![3, 4, 5, 6]);
        assert_eq!(seqs(merge(Vec::new(), b.clone(), 2)), vec![4, 5]);
        assert_eq!(seqs(merge(a, Vec::new(), 2)), vec![3, 4]);
    }
}
