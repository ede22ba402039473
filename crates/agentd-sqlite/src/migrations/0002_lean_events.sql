-- Schema version 2: appending an event touches one B-tree.
--
-- Version 1 kept the log in a rowid table with two indexes and bumped `sessions.last_seq` on every commit, so
-- each small group commit rewrote four or more pages into the WAL. Now:
-- - `events` is WITHOUT ROWID, keyed by (session_id, seq): the row lives in the key's B-tree, no other index.
-- - the session's last seq is MAX(seq) of its events; `sessions.last_seq` is only a floor that pruning raises
--   before it deletes, so a seq is still never handed out twice.
-- - the first seq of a run (for re-attach) is stored once, on the run's row, when its first event is appended.

CREATE TABLE events_v2 (
    session_id TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    run_id     TEXT    NOT NULL,
    payload    TEXT    NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
INSERT INTO events_v2 (session_id, seq, run_id, payload) SELECT session_id, seq, run_id, payload FROM events;
DROP TABLE events;
ALTER TABLE events_v2 RENAME TO events;

ALTER TABLE runs ADD COLUMN first_seq INTEGER;
UPDATE runs SET first_seq = (SELECT MIN(e.seq) FROM events e WHERE e.session_id = runs.session_id AND e.run_id = runs.id);

UPDATE sessions SET last_seq = MAX(last_seq, COALESCE((SELECT MAX(e.seq) FROM events e WHERE e.session_id = sessions.id), 0));
