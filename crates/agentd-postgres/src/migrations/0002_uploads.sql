-- Schema version 2: uploads live in the database (record and bytes), so a file id resolves on every node.
-- A session's uploads have distinct ids and distinct paths (the file name in a node's workspace).

CREATE TABLE uploads (
    ord          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id   text   NOT NULL REFERENCES sessions (id),
    id           text   NOT NULL,
    name         text   NOT NULL,
    path         text   NOT NULL,
    size         bigint NOT NULL,
    content_type text   NOT NULL,
    bytes        bytea  NOT NULL,
    UNIQUE (session_id, id),
    UNIQUE (session_id, path)
);
