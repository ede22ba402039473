-- Schema version 1: sessions, messages, runs and the per-session event log.
--
-- `ord` columns (identities) are the insertion order, which is what "newest first", "oldest first" and "by
-- creation order" mean in the Store trait. Timestamps are RFC 3339 text, stored as given and never used for
-- ordering. JSON columns are text: stored and returned byte for byte, never queried into.

CREATE TABLE sessions (
    id         text   PRIMARY KEY,
    ord        bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    principal  text   NOT NULL,
    agent      text   NOT NULL,
    title      text,
    status     text   NOT NULL,
    metadata   text   NOT NULL,
    created_at text   NOT NULL,
    updated_at text   NOT NULL
);
CREATE INDEX sessions_by_principal ON sessions (principal, ord);

-- Each session's event counter: the largest seq ever assigned. Every append updates it in the transaction that
-- inserts the events, so seqs are assigned in the commit and a rolled-back append gives its numbers back. A
-- narrow table of its own, with room on each page, so that update is a small heap-only (HOT) tuple rewrite and
-- never touches the session row or an index.
CREATE TABLE session_seqs (
    session_id text   PRIMARY KEY REFERENCES sessions (id),
    last_seq   bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE TABLE messages (
    ord          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id   text NOT NULL REFERENCES sessions (id),
    id           text NOT NULL,
    run_id       text,
    role         text NOT NULL,
    content      text NOT NULL,
    tool_calls   text,
    tool_call_id text,
    agent        text,
    images       text NOT NULL,
    created_at   text NOT NULL,
    UNIQUE (session_id, id)
);
CREATE INDEX messages_by_session ON messages (session_id, ord);

CREATE TABLE runs (
    ord               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id        text   NOT NULL REFERENCES sessions (id),
    id                text   NOT NULL,
    status            text   NOT NULL,
    created_at        text   NOT NULL,
    started_at        text,
    ended_at          text,
    error             text,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    client_message_id text,
    -- The seq of the run's first event, recorded when it is appended (re-attach replays from it).
    first_seq         bigint,
    UNIQUE (session_id, id)
);
CREATE UNIQUE INDEX runs_by_client_message_id ON runs (session_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
CREATE INDEX runs_unfinished ON runs (ord) WHERE status IN ('queued', 'running', 'waiting_input');
CREATE INDEX runs_by_session ON runs (session_id, ord);

-- The log: one row per event, its native JSON frame as the payload. No foreign key (the counter update has
-- already found the session, and a key check per row would double the work of a group commit) and no index
-- besides the key.
CREATE TABLE events (
    session_id text   NOT NULL,
    seq        bigint NOT NULL,
    run_id     text   NOT NULL,
    payload    text   NOT NULL,
    PRIMARY KEY (session_id, seq)
);
