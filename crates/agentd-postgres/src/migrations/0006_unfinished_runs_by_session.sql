-- Schema version 6: a session's unfinished runs in order. Run control across nodes (a cancel without a run id,
-- `multitask = reject | interrupt`, a reply to a question pending on another node) looks for a session's queued,
-- running or waiting runs; without this index it read every run the session ever had.
CREATE INDEX runs_unfinished_by_session ON runs (session_id, ord)
    WHERE status IN ('queued', 'running', 'waiting_input');
