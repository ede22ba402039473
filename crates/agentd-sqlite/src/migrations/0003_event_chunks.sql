-- Schema version 3: a row of `events` holds a chunk of consecutive events of one run (see chunk.rs).
--
-- Streaming moved one row per token into the table; now a session's tokens of about a second are one row.
-- `seq` is the chunk's last event (so MAX(seq) is still the log's last seq and "after N" is a range scan),
-- `first_seq` its first, `payload` the events' JSON one per line. Version 2's rows become chunks of one.

CREATE TABLE events_v3 (
    session_id TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    first_seq  INTEGER NOT NULL,
    run_id     TEXT    NOT NULL,
    payload    TEXT    NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
INSERT INTO events_v3 (session_id, seq, first_seq, run_id, payload) SELECT session_id, seq, seq, run_id, payload FROM events;
DROP TABLE events;
ALTER TABLE events_v3 RENAME TO events;
