// The transcript's view model: plain data built from the session's events and stored history, no DOM.
//
// One function turns an event into view-model changes (`applyEvent`), one turns stored history into the same
// shapes (`fromHistory`), and `loadSession` merges the two the way the page does when it opens a session: the
// history and run statuses first, then every event the socket replayed, where a run with events is rebuilt from
// them (its history drawing is dropped). So a reloaded session looks like the live one did, and the unit tests
// (web/test/) check exactly that on recorded frames.
//
// A transcript is a list of turns, one per run, in the order the runs were accepted: the user's message, then
// everything the agent did (`main`, a flow of segments). A message sent during a run is its own, queued, turn
// after the running one, so it never shows before the answer it followed.

const CODES = globalThis.AGENTD_CODES;

/** An error code the server sends; one missing from codes.js is a bug, so it throws at once. */
export function errorCode(name) {
  if (!CODES || !Object.prototype.hasOwnProperty.call(CODES.errors, name)) {
    throw new Error(`error code ${name} is not in codes.js`);
  }
  return name;
}

/** A run error code (Run.error.code); the same list, its `run_errors` part. */
export function runErrorCode(name) {
  if (!CODES || !Object.prototype.hasOwnProperty.call(CODES.run_errors, name)) {
    throw new Error(`run error code ${name} is not in codes.js`);
  }
  return name;
}

export const ENDED = new Set(['completed', 'cancelled', 'failed', 'interrupted']);
const FILES_NOTE = /\s*\[Uploaded files on disk:\n([\s\S]*?)\]\s*$/;

let ids = 0;
const nextId = () => ++ids;

function seg(kind, fields) {
  return { id: nextId(), kind, v: 0, ...fields };
}

function flow() {
  return { segs: [], cur: null };
}

export function newModel({ agents = [], now = () => Date.now() } = {}) {
  return { turns: [], byRun: new Map(), agents: new Set(agents), now, dirty: new Set() };
}

function newTurn(model, runId, source) {
  const t = {
    key: runId || `local-${nextId()}`,
    runId,
    source, // 'history' until an event of the run arrives, then 'events'
    user: null,
    status: 'queued',
    error: null,
    main: flow(),
    openTools: [],
    orphans: new Map(),
    deltas: [],
    ownText: '',
    usage: null,
    busySince: null, // set while the agent works with nothing new to show (the working indicator)
    resumed: 0,
    v: 0,
  };
  model.turns.push(t);
  if (runId) model.byRun.set(runId, t);
  return t;
}

function resetTurn(t) {
  Object.assign(t, { main: flow(), openTools: [], orphans: new Map(), deltas: [], ownText: '', usage: null, resumed: 0 });
  t.status = 'queued';
  t.error = null;
  t.busySince = null;
}

function touch(model, t) {
  t.v++;
  model.dirty.add(t);
}

/** A stored user message as the page shows it: its text without the uploads note, the files it names, images. */
export function userOf(m) {
  let text = m.content || '';
  const files = [];
  const note = text.match(FILES_NOTE);
  if (note) {
    text = text.slice(0, note.index);
    for (const line of note[1].split('\n')) {
      const name = line.replace(/^-\s*/, '').split(' → ')[0].trim();
      if (name) files.push(name);
    }
  }
  const images = (m.images || []).filter((s) => typeof s === 'string' && s.startsWith('data:image/'));
  return { id: m.id || '', content: m.content || '', text, files, images };
}

function addSeg(f, s) {
  f.segs.push(s);
  f.cur = s;
  return s;
}

// Appends a delta to the flow's current text (or thinking) segment, opening one when needed.
function streamInto(f, kind, delta) {
  let s = f.cur;
  if (!s || s.kind !== kind || s.done) s = addSeg(f, seg(kind, { text: '', done: false }));
  s.text += delta;
  s.v++;
  return s;
}

// Subagent events go into the innermost unfinished call named after that agent.
function flowFor(t, ev) {
  if (!ev.is_subagent) return t.main;
  for (let i = t.openTools.length - 1; i >= 0; i--) {
    const tool = t.openTools[i];
    if (tool.tool === ev.agent) {
      if (!tool.sub) tool.sub = flow();
      return tool.sub;
    }
  }
  if (!t.orphans.has(ev.agent)) {
    const s = addSeg(t.main, seg('agent', { agent: ev.agent, sub: flow() }));
    t.main.cur = null;
    t.orphans.set(ev.agent, s.sub);
  }
  return t.orphans.get(ev.agent);
}

function parseArgs(a) {
  if (typeof a !== 'string') return a ?? {};
  try {
    return JSON.parse(a);
  } catch (_) {
    return a;
  }
}

function toolSeg(model, f, callId, tool, args) {
  const s = addSeg(f, seg('tool', { callId, tool, args, result: null, success: null, state: 'running', sub: null, isAgent: model.agents.has(tool) }));
  f.cur = null;
  return s;
}

function askSeg(f, requestId, question, callId) {
  const s = addSeg(f, seg('ask', { requestId, question: question || '', answer: null, state: 'pending', callId }));
  f.cur = null;
  return s;
}

// A tool call waiting for a person's decision (SPEC.md section 7): a card with the tool, its arguments, Allow/Deny.
function approvalSeg(f, ev) {
  const s = addSeg(
    f,
    seg('approval', {
      requestId: ev.request_id,
      callId: ev.call_id || null,
      tool: ev.tool || '',
      args: ev.args ?? {},
      state: 'pending', // then 'allowed', 'denied', or 'expired' (the run ended undecided)
      reason: null,
      sending: null, // the decision this page sent, until the server logs one
      error: null, // why this page's decision was refused (a 409: decided already), or could not be sent
    }),
  );
  f.cur = null;
  return s;
}

function eachSeg(f, fn) {
  for (const s of f.segs) {
    fn(s);
    if (s.sub) eachSeg(s.sub, fn);
  }
}

function findSeg(t, pred) {
  let found = null;
  eachSeg(t.main, (s) => {
    if (!found && pred(s)) found = s;
  });
  return found;
}

/** Applies one event (already deduplicated by seq) to the model. Returns the turn it changed, if any. */
export function applyEvent(model, ev) {
  const runId = ev.run_id;
  if (!runId) return null;
  let t = model.byRun.get(runId);
  if (t && t.source === 'history') {
    // The run's events arrive from its first: they replace what the history drew.
    resetTurn(t);
  }
  if (!t) t = newTurn(model, runId, 'events');
  t.source = 'events';
  touch(model, t);
  if (ev.type !== 'message' && t.status === 'queued') t.status = 'running';
  const f = flowFor(t, ev);
  switch (ev.type) {
    case 'message': {
      const m = ev.message || {};
      if (m.role === 'user') t.user = userOf(m);
      // Deltas before a stored message can no longer be superseded.
      t.deltas = [];
      break;
    }
    case 'run_started':
      t.status = 'running';
      t.busySince = model.now();
      break;
    case 'text_delta': {
      const s = streamInto(f, 'text', ev.delta || '');
      if (!ev.is_subagent) t.ownText += ev.delta || '';
      t.deltas.push({ seq: ev.seq, s, f, len: (ev.delta || '').length, own: !ev.is_subagent });
      t.busySince = null;
      break;
    }
    case 'thinking_delta': {
      const s = streamInto(f, 'thinking', ev.delta || '');
      t.deltas.push({ seq: ev.seq, s, f, len: (ev.delta || '').length, own: false });
      t.busySince = null;
      break;
    }
    case 'thinking_end':
      if (f.cur && f.cur.kind === 'thinking') {
        f.cur.done = true;
        f.cur.v++;
      }
      break;
    case 'tool_started':
      t.openTools.push(toolSeg(model, f, ev.call_id, ev.tool, ev.args));
      t.busySince = ev.tool === 'ask_human' ? null : model.now();
      break;
    case 'tool_finished': {
      const i = t.openTools.findIndex((x) => x.callId === ev.call_id);
      const s = i >= 0 ? t.openTools.splice(i, 1)[0] : toolSeg(model, f, ev.call_id, ev.tool, ev.args);
      s.result = ev.result ?? '';
      s.success = ev.success ?? null;
      s.state = ev.success === false ? 'failed' : 'done';
      s.v++;
      const ask = findSeg(t, (x) => x.kind === 'ask' && x.callId === ev.call_id);
      if (ask) {
        ask.answer = String(s.result);
        ask.state = 'answered';
        ask.v++;
      }
      t.busySince = model.now();
      break;
    }
    case 'input_requested': {
      const asking = [...t.openTools].reverse().find((x) => x.tool === 'ask_human');
      askSeg(f, ev.request_id, ev.question, asking ? asking.callId : null);
      t.status = 'waiting_input';
      t.busySince = null;
      break;
    }
    case 'input_received': {
      const ask = findSeg(t, (x) => x.kind === 'ask' && x.requestId === ev.request_id);
      if (ask && ask.state === 'pending') {
        ask.state = 'answered';
        ask.v++;
      }
      t.status = 'running';
      t.busySince = model.now();
      break;
    }
    case 'approval_requested': {
      // A request logged twice (never expected) keeps its one card.
      const known = findSeg(t, (x) => x.kind === 'approval' && x.requestId === ev.request_id);
      if (!known) approvalSeg(f, ev);
      const tool = t.openTools.find((x) => x.callId === ev.call_id);
      if (tool) {
        tool.state = 'approval';
        tool.v++;
      }
      t.status = 'waiting_input';
      t.busySince = null;
      break;
    }
    case 'approval_resolved': {
      const a = findSeg(t, (x) => x.kind === 'approval' && x.requestId === ev.request_id);
      if (a) {
        a.state = ev.decision === 'allow' ? 'allowed' : 'denied';
        a.reason = ev.reason ?? null;
        a.sending = null;
        a.error = null;
        a.v++;
        const tool = t.openTools.find((x) => x.callId === a.callId);
        if (tool && tool.state === 'approval') {
          tool.state = 'running';
          tool.v++;
        }
      }
      t.status = waiting(t) ? 'waiting_input' : 'running';
      t.busySince = model.now();
      break;
    }
    case 'run_resumed':
      supersede(t, ev.discard_from_seq);
      t.resumed = ev.attempt || t.resumed + 1;
      addSeg(t.main, seg('note', { text: `resumed after an interruption (attempt ${t.resumed})` }));
      t.main.cur = null;
      // A question or approval open when the process died keeps waiting under its request id (no new event).
      t.status = waiting(t) ? 'waiting_input' : 'running';
      t.busySince = t.status === 'running' ? model.now() : null;
      break;
    case 'skill_matched':
      addSeg(f, seg('note', { text: `skill: ${ev.skill} (${ev.method})` }));
      f.cur = null;
      break;
    case 'context_compressed':
      addSeg(f, seg('note', { text: `context compressed: ${ev.messages_before} → ${ev.messages_after} messages` }));
      f.cur = null;
      break;
    case 'run_finished':
      finish(t, ev.run || {}, ev.content);
      if (ev.max_context_tokens && ev.context_tokens) {
        t.usage = { context: ev.context_tokens, max: ev.max_context_tokens };
      }
      break;
    default:
      break;
  }
  return t;
}

// Takes back the deltas with seq >= `from` (an interrupted model call's), newest first; empty segments go.
function supersede(t, from) {
  while (t.deltas.length && t.deltas[t.deltas.length - 1].seq >= from) {
    const d = t.deltas.pop();
    d.s.text = d.s.text.slice(0, d.s.text.length - d.len);
    d.s.v++;
    if (d.own) t.ownText = t.ownText.slice(0, t.ownText.length - d.len);
    if (!d.s.text) {
      const i = d.f.segs.indexOf(d.s);
      if (i >= 0) d.f.segs.splice(i, 1);
    }
  }
  t.main.cur = null;
  for (const x of t.openTools) if (x.sub) x.sub.cur = null;
}

function finish(t, run, content) {
  t.status = run.status || 'completed';
  t.error = run.error || null;
  t.busySince = null;
  eachSeg(t.main, (s) => {
    if (s.kind === 'ask' && s.state === 'pending') {
      s.state = 'expired';
      s.v++;
    }
    if (s.kind === 'approval' && s.state === 'pending') {
      s.state = 'expired';
      s.sending = null;
      s.v++;
    }
    if (s.kind === 'tool' && (s.state === 'running' || s.state === 'approval')) {
      s.state = t.status === 'completed' ? 'done' : t.status;
      s.v++;
    }
    if (s.kind === 'thinking' && !s.done) {
      s.done = true;
      s.v++;
    }
  });
  t.openTools = [];
  if (!t.ownText && content) {
    t.main.cur = null;
    streamInto(t.main, 'text', content);
    t.ownText = content;
  }
}

/**
 * Draws stored history: `runs` (GET .../runs, oldest first) give each turn its place and final status,
 * `messages` (GET .../messages) its content. Turns already built from events are left alone.
 */
export function fromHistory(model, messages, runs) {
  for (const r of runs || []) {
    let t = model.byRun.get(r.id);
    if (!t) t = newTurn(model, r.id, 'history');
    if (t.source !== 'history') continue;
    t.status = r.status;
    t.error = r.error || null;
    touch(model, t);
  }
  const calls = new Map(); // call id -> {tool seg, ask seg}
  for (const m of messages || []) {
    let t = m.run_id ? model.byRun.get(m.run_id) : null;
    if (!t) t = newTurn(model, m.run_id || null, 'history');
    if (t.source !== 'history') continue;
    touch(model, t);
    if (m.role === 'user') {
      t.user = userOf(m);
    } else if (m.role === 'assistant') {
      const f = t.main;
      f.cur = null;
      if (m.content) {
        streamInto(f, 'text', m.content);
        t.ownText += m.content;
      }
      for (const tc of m.tool_calls || []) {
        const args = parseArgs(tc.arguments);
        const s = toolSeg(model, f, tc.id, tc.name, args);
        s.state = 'stored';
        const ask = tc.name === 'ask_human' ? askSeg(f, null, args && args.question, tc.id) : null;
        if (ask) ask.state = 'expired';
        calls.set(tc.id, { s, ask });
      }
    } else if (m.role === 'tool') {
      const c = calls.get(m.tool_call_id);
      if (c) {
        c.s.result = m.content;
        c.s.state = 'done';
        if (c.ask) {
          c.ask.answer = m.content;
          c.ask.state = 'answered';
        }
      }
    }
  }
  for (const t of model.turns) {
    if (t.source !== 'history') continue;
    eachSeg(t.main, (s) => {
      if (s.kind === 'tool' && s.state === 'stored') s.state = ENDED.has(t.status) && t.status !== 'completed' ? t.status : 'done';
    });
  }
}

/**
 * Opens a session: history and run statuses, then the events the socket delivered (replayed from `after=0`,
 * or only the active run's when the log was pruned: `expired`). Returns the cursor to continue from.
 */
export function loadSession(model, { hello, expired, messages, runs, events, cursor }) {
  fromHistory(model, messages, runs);
  for (const ev of events) if (cursor.accept(ev)) applyEvent(model, ev);
  // Without an active run, an expired cursor replays nothing: what follows `last_seq` is what is new.
  if (expired && hello && !hello.active_run_id) cursor.floor(hello.last_seq);
  return cursor;
}

// The pending segments of `kind` of the turns not ended: [{turn, [kind]: seg}], oldest first.
function pendingOf(model, kind) {
  const out = [];
  for (const t of model.turns) {
    if (ENDED.has(t.status)) continue;
    eachSeg(t.main, (s) => {
      if (s.kind === kind && s.state === 'pending') out.push({ turn: t, [kind]: s });
    });
  }
  return out;
}

/** The turns waiting for an `ask_human` answer: [{turn, ask}], oldest first. */
export function pendingAsks(model) {
  return pendingOf(model, 'ask');
}

/** Whether the turn still waits for a person: an unanswered question or undecided approval. */
function waiting(t) {
  return Boolean(findSeg(t, (x) => (x.kind === 'ask' || x.kind === 'approval') && x.state === 'pending'));
}

/** Whether the turn has a tool call waiting for a decision. */
export function waitsForApproval(t) {
  return Boolean(findSeg(t, (x) => x.kind === 'approval' && x.state === 'pending'));
}

/** A plain sentence for a refused or failed approval decision (a 409: someone or the time limit was first). */
export function describeApprovalFailure(err) {
  if (err && err.code === errorCode('conflict')) return 'Already decided: another client or the time limit got there first.';
  if (err && err.code === errorCode('not_found')) return 'The server no longer knows this request (the run may have ended).';
  return describeFailure(err);
}

/** The tool calls waiting for a decision: [{turn, approval}], oldest first. */
export function pendingApprovals(model) {
  return pendingOf(model, 'approval');
}

// Sets `sending` and `error` of the approval card `requestId` (when `pendingOnly`, only of a pending one).
function markApproval(model, requestId, pendingOnly, sending, error) {
  for (const t of model.turns) {
    const a = findSeg(t, (x) => x.kind === 'approval' && x.requestId === requestId);
    if (!a) continue;
    if (pendingOnly && a.state !== 'pending') return false;
    Object.assign(a, { sending, error });
    a.v++;
    touch(model, t);
    return true;
  }
  return false;
}

/**
 * This page sent `decision` ('allow' | 'deny') for the approval `requestId`: its card shows it being sent until
 * `approval_resolved` arrives. Returns false when the request is unknown or no longer pending.
 */
export function approvalSending(model, requestId, decision) {
  return markApproval(model, requestId, true, decision, null);
}

/**
 * This page's decision was refused or could not be sent (`message`, a plain sentence): the card says so. A
 * card still pending can be answered again; one decided meanwhile keeps showing its decision.
 */
export function approvalFailed(model, requestId, message) {
  return markApproval(model, requestId, false, null, message);
}

/** The run holding the session's turn (running or waiting), if any. */
export function activeTurn(model) {
  return model.turns.find((t) => t.runId && (t.status === 'running' || t.status === 'waiting_input')) || null;
}

/** The answer's own text (what "copy answer" copies). */
export function answerText(t) {
  return t.main.segs
    .filter((s) => s.kind === 'text')
    .map((s) => s.text)
    .join('\n\n');
}

const RUN_ERRORS = {
  upstream_error: 'The model server returned an error.',
  upstream_timeout: 'The model server did not answer in time.',
  max_iterations: 'The agent stopped: it took too many steps without an answer.',
  interrupted: 'The run was interrupted (the server stopped while it ran).',
  internal: 'Something went wrong inside agentd.',
};

/** A short plain summary of a run's error, and the raw details for a disclosure. */
export function describeRunError(status, error) {
  const code = error && error.code;
  let summary = (code && Object.prototype.hasOwnProperty.call(RUN_ERRORS, code) && RUN_ERRORS[runErrorCode(code)]) || null;
  if (!summary) summary = status === 'interrupted' ? RUN_ERRORS.interrupted : 'The run failed.';
  const detail = (error && error.message) || '';
  const http = detail.match(/\b(?:HTTP|status)\s*:?\s*(\d{3})\b/i);
  if (http && code === runErrorCode('upstream_error')) summary = `The model server returned an error (HTTP ${http[1]}).`;
  else if (code === runErrorCode('upstream_error') && /connect|refused|reset|closed|broken|EOF|decode/i.test(detail)) {
    summary = 'The connection to the model server broke.';
  }
  return { summary, detail };
}

/** A plain sentence for a failed request (REST or socket error frame). */
export function describeFailure(err) {
  if (!err) return 'Something went wrong.';
  if (err.status === 0) return 'Cannot reach the agentd server. Check that it is running.';
  const plain = {
    [errorCode('too_large')]: 'That is too large for the server.',
    [errorCode('rate_limited')]: 'Too many messages: wait a moment and try again.',
    [errorCode('session_closed')]: 'This session is closed (deleted); start a new one.',
    [errorCode('unavailable')]: 'The server is busy or restarting; try again shortly.',
    [errorCode('run_active')]: 'A turn is still running.',
    [errorCode('not_found')]: 'Not found (it may have been deleted).',
    [errorCode('internal')]: 'The server hit an internal error.',
  };
  const base = Object.prototype.hasOwnProperty.call(plain, err.code) ? plain[err.code] : null;
  const msg = String(err.message || '').split('\n')[0].slice(0, 200);
  return base ? `${base}${msg && err.code !== errorCode('internal') ? ` (${msg})` : ''}` : msg || 'Something went wrong.';
}

/**
 * The title the server gives a session created without one, from its first message (service.rs `derive_title`):
 * the first non-blank line, trimmed, cut at 60 characters with `…`. The page shows it at once.
 */
export function derivedTitle(content) {
  const line = String(content || '')
    .split('\n')
    .map((l) => l.trim())
    .find((l) => l);
  if (!line) return null;
  const chars = Array.from(line);
  return chars.length <= 60 ? line : `${chars.slice(0, 59).join('').trimEnd()}…`;
}

/** What the page shows as a session's title. */
export function sessionTitle(s) {
  return (s && s.title && s.title.trim()) || 'New chat';
}

/** A compact, DOM-free picture of the transcript, for tests comparing a live view with a rebuilt one. */
export function snapshot(model) {
  const segs = (f) =>
    f.segs.map((s) => {
      const o = { kind: s.kind };
      if (s.kind === 'text' || s.kind === 'thinking') o.text = s.text;
      if (s.kind === 'thinking') o.done = s.done;
      if (s.kind === 'tool') Object.assign(o, { tool: s.tool, state: s.state, result: s.result });
      if (s.kind === 'ask') Object.assign(o, { question: s.question, answer: s.answer, state: s.state });
      if (s.kind === 'approval') Object.assign(o, { tool: s.tool, args: s.args, state: s.state, reason: s.reason });
      if (s.kind === 'note') o.text = s.text;
      if (s.kind === 'agent') o.agent = s.agent;
      if (s.sub && s.sub.segs.length) o.sub = segs(s.sub);
      return o;
    });
  return model.turns.map((t) => ({
    user: t.user ? t.user.text : null,
    status: t.status,
    error: t.error ? t.error.code : null,
    segs: segs(t.main),
  }));
}
