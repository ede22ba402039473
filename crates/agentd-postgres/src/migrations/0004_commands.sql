-- Schema version 4: commands across nodes (SPEC.md section 6). A node that a client asks to cancel a run, or
-- to answer its question, while another node executes it writes the command here for that node and sends
-- `NOTIFY agentd_cmd '<node> <id>'`; the addressee takes the row (deletes it) and acts on it.

CREATE TABLE commands (
    id         bigserial   PRIMARY KEY,
    node       text        NOT NULL,
    body       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_by_node ON commands (node);
