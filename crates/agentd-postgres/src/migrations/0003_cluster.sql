-- Schema version 3: several nodes on one database (SPEC.md section 6).
-- `runs.node` is the node executing a run (null when none). `nodes` is the registry of the nodes: each node
-- refreshes its row every third of `cluster.lease_s`; a node whose row is older than that is gone. `instance`
-- tells a node's processes apart (a node restarted under the same id is a new instance).

ALTER TABLE runs ADD COLUMN node text;
CREATE INDEX runs_unfinished_by_node ON runs (node) WHERE status IN ('queued', 'running', 'waiting_input');

CREATE TABLE nodes (
    node_id    text        PRIMARY KEY,
    instance   text        NOT NULL,
    listen     text        NOT NULL,
    started_at text        NOT NULL,
    last_seen  timestamptz NOT NULL
);
