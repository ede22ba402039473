-- Schema version 4: uploads live in the database (record and bytes), so a file id resolves from the store alone.
-- A session's uploads have distinct ids and distinct paths (the file name in its workspace).

CREATE TABLE uploads (
    ord          INTEGER PRIMARY KEY,
    session_id   TEXT    NOT NULL REFERENCES sessions (id),
    id           TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    path         TEXT    NOT NULL,
    size         INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    bytes        BLOB    NOT NULL,
    UNIQUE (session_id, id),
    UNIQUE (session_id, path)
);
