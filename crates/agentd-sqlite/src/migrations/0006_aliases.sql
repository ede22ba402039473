-- Schema version 6: aliases, what the OpenAI-compatible surfaces remember (SPEC.md section 8): a stateless chat's
-- continuation key (a hash of the caller, the model and the conversation so far) -> its session, and deleted
-- responses. Not copied by `agentd copy-store`: a copy starts with none (a chat then starts a new session).

CREATE TABLE aliases (
    key        TEXT PRIMARY KEY,
    session_id TEXT NOT NULL
) WITHOUT ROWID;
