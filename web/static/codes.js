// The error codes and event types of agentd's native API, in one list the page and the server share.
// The page loads this file before its modules and names codes only through it (model.js: `errorCode('…')` and
// `runErrorCode('…')`, which throw on a code not listed here). crates/agentd-server/tests/codes.rs holds both
// sides to it: every error code the server's native surface can send, every run error code (Run.error.code) and
// every event type it logs must be listed, and the page's modules may use no other.
// What follows `Object.freeze(` is strict JSON (the test parses it): double quotes, no trailing commas.
'use strict';

globalThis.AGENTD_CODES = Object.freeze(
{
  "errors": {
    "invalid_request": "400: a malformed or invalid request (bad JSON body, bad query value, empty content, unknown file id)",
    "invalid_json": "WebSocket frame that is not JSON",
    "invalid_frame": "WebSocket frame of the wrong shape (a binary frame, a field of the wrong type)",
    "missing_field": "WebSocket frame without a required field",
    "unknown_type": "WebSocket frame of an unknown type",
    "unauthenticated": "401: a missing or wrong API key",
    "not_found": "404: an unknown id, or one another principal owns",
    "session_closed": "409: the session is closed; nothing was stored",
    "run_active": "409: a turn is running and multitask is reject; nothing was stored",
    "conflict": "409: another conflicting write",
    "too_large": "413: over a size limit; nothing was stored",
    "rate_limited": "429: over server.rate_limit_per_min or server.max_streams_per_principal; nothing was stored",
    "unavailable": "503: overloaded or shutting down",
    "internal": "500: a server fault (details only in the server's log)",
    "cursor_expired": "`after` is older than the retained log; the stream replays as if none was given"
  },
  "run_errors": {
    "upstream_error": "the upstream answered an error or its connection broke",
    "upstream_timeout": "the upstream did not answer in time",
    "max_iterations": "the agent loop reached max_iterations",
    "interrupted": "the run was interrupted (process lost, recovery = interrupt or max_resumes)",
    "internal": "a server fault"
  },
  "events": [
    "message",
    "run_started",
    "skill_matched",
    "thinking_delta",
    "thinking_end",
    "text_delta",
    "tool_started",
    "tool_finished",
    "input_requested",
    "input_received",
    "context_compressed",
    "run_resumed",
    "approval_requested",
    "approval_resolved",
    "run_finished"
  ]
}
);
