-- Schema version 8: a session's messages in order. A turn reads its session's newest messages and a page of
-- `GET .../messages` reads a slice of them; without this index both sorted all of the session's messages
-- (the unique `(session_id, id)` index finds them, not their order), so a turn's cost grew with its session.
CREATE INDEX messages_by_session ON messages (session_id, ord);
