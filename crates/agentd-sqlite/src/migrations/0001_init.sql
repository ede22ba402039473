-- Schema version 1: sessions, messages, runs and the per-session event log.
--
-- Every table has an INTEGER PRIMARY KEY `ord` (the rowid): it is the insertion order, which is what "newest
-- first", "oldest first" and "by creation order" mean in the Store trait. Timestamps are RFC 3339 text for
-- display; they are never used for ordering, so two rows created in the same millisecond still sort stably.

CREATE TABLE sessions (
    ord        INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    principal  TEXT    NOT NULL,
    agent      TEXT    NOT NULL,
    title      TEXT,
    status     TEXT    NOT NULL,
    metadata   TEXT    NOT NULL,          -- JSON
    created_at TEXT    NOT NULL,
    updated_at TEXT    NOT NULL,
    -- The largest event seq ever assigned in this session. Kept here, not derived from `events`, so a seq is
    -- never handed out twice even after pruning has deleted the events that carried it.
    last_seq   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_by_principal ON sessions (principal, ord);

CREATE TABLE messages (
    ord          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL,
    session_id   TEXT NOT NULL REFERENCES sessions (id),
    run_id       TEXT,
    role         TEXT NOT NULL,
    content      TEXT NOT NULL,
    tool_calls   TEXT,                     -- JSON array, NULL when the message has none
    tool_call_id TEXT,
    agent        TEXT,
    images       TEXT NOT NULL,            -- JSON array of data URLs
    created_at   TEXT NOT NULL,
    UNIQUE (session_id, id)
);

CREATE TABLE runs (
    ord               INTEGER PRIMARY KEY,
    id                TEXT    NOT NULL,
    session_id        TEXT    NOT NULL REFERENCES sessions (id),
    status            TEXT    NOT NULL,
    created_at        TEXT    NOT NULL,
    started_at        TEXT,
    ended_at          TEXT,
    error             TEXT,                -- JSON RunError, NULL when none
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    client_message_id TEXT,
    UNIQUE (session_id, id)
);
-- Idempotent sends: one run per client_message_id per session.
CREATE UNIQUE INDEX runs_by_client_message_id ON runs (session_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
-- The start-up sweep looks for these; finished runs (nearly all of them) stay out of the index.
CREATE INDEX runs_unfinished ON runs (status) WHERE status IN ('queued', 'running', 'waiting_input');
CREATE INDEX runs_by_session ON runs (session_id, ord);

CREATE TABLE events (
    session_id TEXT    NOT NULL REFERENCES sessions (id),
    seq        INTEGER NOT NULL,
    run_id     TEXT    NOT NULL,
    payload    TEXT    NOT NULL,           -- LoggedEvent.json: the native frame, serialised once on append
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX events_by_run ON events (session_id, run_id, seq);
