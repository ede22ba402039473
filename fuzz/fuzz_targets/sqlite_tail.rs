//! The SQLite log's tail file, as start-up recovery reads whatever a killed process left: the record decoder
//! (`tail.rs`), then the real recovery (`tail::recover`) of the bytes written as a segment file, and a read of
//! every session's log as a restarted server would read it.
//!
//! Input: a flags byte, then the file's bytes. Flag bit 0 rewrites each record's CRC first, so that mutated
//! bodies get past the checksum and exercise the body's parsing and the recovery.
#![no_main]

use std::cell::RefCell;

use agentd_sqlite::fuzzing::{decode_segment, encode_record, seal, Replay, TailRecord, SESSIONS};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static REPLAY: RefCell<Option<Replay>> = const { RefCell::new(None) };
}

/// What recovery must make of the records: per session (see `SESSIONS`), the seqs its log holds afterwards.
/// A record is replayed when it continues its session's log (seq = last + 1) and holds that event.
fn expected(records: &[TailRecord]) -> Vec<Vec<u64>> {
    let mut logs = vec![Vec::new(), vec![1, 2, 3]];
    for r in records {
        let Some(i) = SESSIONS.iter().position(|s| *s == r.session_id) else {
            continue;
        };
        let last = logs[i].last().copied().unwrap_or(0);
        if r.seq == last + 1 && holds_event(r) {
            logs[i].push(r.seq);
        }
    }
    logs
}

/// The record's JSON is one event with the record's seq (recovery checks the same).
fn holds_event(r: &TailRecord) -> bool {
    !r.json.contains('\n')
        && serde_json::from_str::<agentd_core::event::Event>(&r.json).is_ok_and(|e| e.seq == r.seq)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if flags & 1 == 1 {
        seal(&mut bytes);
    }
    let (records, torn) = decode_segment(&bytes);
    let end = torn.unwrap_or(bytes.len());
    assert!(end <= bytes.len());
    // Every record read is exactly the bytes it came from.
    let mut again = Vec::new();
    for r in &records {
        encode_record(&mut again, &r.session_id, r.seq, &r.run_id, &r.json);
    }
    assert!(
        again == bytes[..end],
        "records do not re-encode to their bytes"
    );

    REPLAY.with(|replay| {
        let mut replay = replay.borrow_mut();
        let replay = replay.get_or_insert_with(|| {
            let dir = std::env::temp_dir().join(format!("agentd-fuzz-tail-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            Replay::new(&dir).expect("a database to replay into")
        });
        let logs = match replay.replay(&bytes) {
            Ok(logs) => logs,
            Err(e) => panic!("recovery or the read after it failed: {e}"),
        };
        assert_eq!(logs, expected(&records));
    });
});
