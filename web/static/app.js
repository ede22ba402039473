// agentd web chat: the DOM wiring. The logic that matters is in plain modules with unit tests (web/test/):
// conn.js (seq cursor, reconnect, the opening hold), model.js (events and history -> view model), and view.js
// draws the model. Sends, cancels, ask_human replies and approval decisions go over the socket; REST is the
// fallback while it is down.

import { backoffMs, Cursor, Opening, PING_EVERY_MS, MAX_BACKOFF_MS, wsUrl } from './conn.js';
import {
  activeTurn,
  applyEvent,
  approvalFailed,
  approvalSending,
  describeApprovalFailure,
  derivedTitle,
  describeFailure,
  errorCode,
  loadSession,
  newModel,
  pendingApprovals,
  pendingAsks,
  sessionTitle,
} from './model.js';
import { el, TranscriptView } from './view.js';

const KEY_STORE = 'agentd.apiKey';
const AGENT_STORE = 'agentd.agent';
const PAGE = 50;

const CURSOR_EXPIRED = errorCode('cursor_expired');
// Errors the server answers an `approval` frame with (409: decided already; 404: unknown request; ...). An error
// frame names no request: one of these arriving while a decision sent here awaits its `approval_resolved` is
// that decision's (the server answers a connection's frames in order).
const APPROVAL_ERRORS = new Set([
  errorCode('conflict'),
  errorCode('not_found'),
  errorCode('too_large'),
  errorCode('invalid_frame'),
  errorCode('invalid_request'),
  errorCode('missing_field'),
  errorCode('unavailable'),
  errorCode('internal'),
]);
// Errors that refuse a sent message (nothing was stored): the user's text goes back into the input.
const REFUSED_SEND = new Set([
  errorCode('invalid_request'),
  errorCode('invalid_frame'),
  errorCode('run_active'),
  errorCode('session_closed'),
  errorCode('too_large'),
  errorCode('rate_limited'),
  errorCode('unavailable'),
]);

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $('sidebar'),
  scrim: $('scrim'),
  menu: $('menu'),
  closeSidebar: $('close-sidebar'),
  agentSelect: $('agent-select'),
  agentDesc: $('agent-desc'),
  newSession: $('new-session'),
  search: $('session-search'),
  sessionList: $('session-list'),
  more: $('more-sessions'),
  changeKey: $('change-key'),
  title: $('session-title'),
  sub: $('session-sub'),
  rename: $('rename-session'),
  ctx: $('ctx-usage'),
  conn: $('conn-status'),
  transcript: $('transcript'),
  turns: $('turns'),
  emptyHint: $('empty-hint'),
  jump: $('jump'),
  toast: $('toast'),
  announcer: $('announcer'),
  composer: $('composer'),
  askBanner: $('ask-banner'),
  attachments: $('attachments'),
  attach: $('attach'),
  fileInput: $('file-input'),
  input: $('input'),
  send: $('send'),
  stop: $('stop'),
  drop: $('drop-zone'),
  keyDialog: $('key-dialog'),
  keyForm: $('key-form'),
  keyInput: $('key-input'),
  keyError: $('key-error'),
};

const st = {
  key: localStorage.getItem(KEY_STORE) || '',
  agents: [],
  sessions: [],
  moreSessions: false,
  query: '',
  renaming: false, // a session's title is being edited in the list
  session: null, // the open session; null while drafting a new one
  conn: null,
  cursor: new Cursor(),
  model: newModel(),
  attachments: [],
  attempt: 0,
  reconnectTimer: null,
  lastSent: '',
  deciding: [], // request ids of approval decisions sent over the socket, awaiting approval_resolved
};

// ------------------------------------------------------------------ scrolling, announcements, toasts

// Follows new output unless the reader scrolled away. Our own scrolling is told apart from the reader's by
// where it left the view, so very fast output (content growing between frames) never unpins it.
let pinned = true;
let autoTop = -1;
let scrollQueued = false;
ui.transcript.addEventListener('scroll', () => {
  const t = ui.transcript;
  if (Math.abs(t.scrollTop - autoTop) <= 2) return;
  pinned = t.scrollHeight - t.scrollTop - t.clientHeight < 80;
  ui.jump.hidden = pinned;
});
function follow() {
  if (!pinned || scrollQueued) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    if (!pinned) return;
    const t = ui.transcript;
    t.scrollTop = t.scrollHeight;
    autoTop = t.scrollTop;
  });
}
ui.jump.addEventListener('click', () => {
  pinned = true;
  ui.jump.hidden = true;
  follow();
});

function announce(text) {
  ui.announcer.textContent = '';
  setTimeout(() => {
    ui.announcer.textContent = text;
  }, 30);
}

let toastTimer = null;
function toast(msg, retry, kind = 'error') {
  ui.toast.className = kind;
  ui.toast.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  ui.toast.replaceChildren(el('span', null, msg));
  if (retry) {
    const b = el('button', 'link', 'Retry');
    b.type = 'button';
    b.addEventListener('click', () => {
      ui.toast.hidden = true;
      retry();
    });
    ui.toast.append(b);
  }
  const x = el('button', 'icon-btn', '×');
  x.type = 'button';
  x.setAttribute('aria-label', 'Dismiss');
  x.addEventListener('click', () => {
    ui.toast.hidden = true;
  });
  ui.toast.append(x);
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    ui.toast.hidden = true;
  }, 10000);
}

// ------------------------------------------------------------------ REST with API key handling

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, form) {
  for (;;) {
    const headers = {};
    if (st.key) headers.Authorization = `Bearer ${st.key}`;
    let payload;
    if (form) {
      payload = form;
    } else if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body: payload });
    } catch (_) {
      throw new ApiError(0, 'network', 'cannot reach the server');
    }
    if (res.status === 401) {
      await askForKey(st.key ? 'The server refused that key.' : '');
      continue;
    }
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = text;
    }
    if (!res.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(res.status, err.code || String(res.status), err.message || res.statusText);
    }
    return data;
  }
}

let keyPrompt = null;
function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    ui.keyError.textContent = message || '';
    ui.keyError.hidden = !message;
    ui.keyInput.value = '';
    if (!ui.keyDialog.open) ui.keyDialog.showModal();
    ui.keyInput.focus();
    ui.keyForm.onsubmit = (e) => {
      e.preventDefault();
      const v = ui.keyInput.value.trim();
      if (!v) return;
      st.key = v;
      localStorage.setItem(KEY_STORE, v);
      ui.changeKey.hidden = false;
      ui.keyDialog.close();
      keyPrompt = null;
      resolve();
    };
  });
  return keyPrompt;
}
ui.keyDialog.addEventListener('cancel', (e) => e.preventDefault());

// ------------------------------------------------------------------ the transcript

const view = new TranscriptView(ui.turns, {
  agentName: () => (st.session ? st.session.agent : ''),
  onAnswer: (turn, ask, text) => answer(turn, ask, text),
  onDecide: (turn, approval, decision, reason) => decide(turn, approval, decision, reason),
  onRetry: (turn) => resend(turn),
  onEdit: (turn) => {
    ui.input.value = turn.user ? turn.user.text : '';
    autosize();
    ui.input.focus();
    toast('Edit the message and send it: it goes as a new message (the earlier turn stays in the history).', null, 'info');
  },
  announce,
  follow,
});

let renderQueued = false;
function render() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    view.render(st.model);
    ui.emptyHint.hidden = st.model.turns.length > 0 || Boolean(st.session);
    showRunState();
  });
}
setInterval(() => view.tick(), 1000);

function onEvent(ev) {
  if (!st.cursor.accept(ev)) return;
  if (ev.type === 'approval_resolved') st.deciding = st.deciding.filter((id) => id !== ev.request_id);
  const t = applyEvent(st.model, ev);
  if (t && ev.type === 'run_finished') {
    showContext(ev);
    scheduleSessionRefresh();
  }
  render();
}

function showContext(ev) {
  if (!ev.max_context_tokens || !ev.context_tokens) return;
  const pct = Math.round((100 * ev.context_tokens) / ev.max_context_tokens);
  ui.ctx.textContent = `${pct}% context`;
  ui.ctx.title = `Context used by the last turn: ${ev.context_tokens} of ${ev.max_context_tokens} tokens`;
  ui.ctx.hidden = false;
}

// Send or Stop (never both), and the ask_human state of the composer.
function showRunState() {
  const active = activeTurn(st.model);
  const asks = pendingAsks(st.model);
  const approvals = pendingApprovals(st.model);
  const typing = ui.input.value.trim().length > 0 || st.attachments.length > 0;
  ui.stop.hidden = !active || typing || asks.length > 0;
  ui.send.hidden = !ui.stop.hidden;
  ui.send.textContent = asks.length ? 'Answer' : 'Send';
  ui.askBanner.hidden = !asks.length && !approvals.length;
  if (asks.length) ui.askBanner.textContent = `The agent is waiting for your answer: “${asks[0].ask.question}”. What you type below answers it.`;
  else if (approvals.length) ui.askBanner.textContent = `The agent waits for your approval to run ${approvals[0].approval.tool}: Allow or Deny it above.`;
  ui.input.placeholder = asks.length ? 'Type your answer…' : active ? 'Message (queued until the current answer ends)…' : 'Message…';
}

// ------------------------------------------------------------------ the WebSocket

function connect() {
  const session = st.session;
  const initial = st.cursor.last === null;
  const after = initial ? 0 : st.cursor.last;
  const ws = new WebSocket(wsUrl(location, session.id, after, st.key));
  const conn = { ws, session, helloed: false, opening: initial ? new Opening() : null, closedByUs: false };
  st.conn = conn;
  showConn(st.attempt ? 'reconnecting…' : 'connecting…');
  ws.onmessage = (m) => {
    if (st.conn !== conn) return;
    let f;
    try {
      f = JSON.parse(m.data);
    } catch (_) {
      return;
    }
    onFrame(conn, f);
  };
  ws.onclose = (e) => {
    if (st.conn !== conn || conn.closedByUs) return;
    st.conn = null;
    // Decisions sent on this socket and not yet logged may not have arrived: their cards can be answered again
    // (one that did arrive shows its decision once the reconnected socket replays `approval_resolved`).
    for (const id of st.deciding) approvalFailed(st.model, id, 'The connection dropped before the server confirmed this decision; try again.');
    if (st.deciding.length) render();
    st.deciding = [];
    const delay = backoffMs(st.attempt, e.code);
    st.attempt += 1;
    scheduleReconnect(session.id, delay, !conn.helloed);
  };
}

function onFrame(conn, f) {
  if (conn.opening) {
    const r = conn.opening.frame(f, CURSOR_EXPIRED);
    if (r.hello) {
      conn.helloed = true;
      st.attempt = 0;
      showConn(null);
      loadHistory(conn);
    }
    if (r.error) onErrorFrame(r.error);
    if (r.event) onEvent(r.event);
    return;
  }
  if (f.type === 'hello') {
    conn.helloed = true;
    st.attempt = 0;
    showConn(null);
    return;
  }
  if (f.type === 'pong') return;
  if (f.type === 'error') {
    onErrorFrame(f);
    return;
  }
  onEvent(f);
}

async function loadHistory(conn) {
  const id = enc(conn.session.id);
  let messages = [];
  let runs = [];
  try {
    [messages, runs] = await Promise.all([api('GET', `/v1/sessions/${id}/messages`), api('GET', `/v1/sessions/${id}/runs`)]);
  } catch (e) {
    if (st.conn !== conn) return;
    toast(`Could not load the history. ${describeFailure(e)}`, () => openSession(conn.session.id));
  }
  if (st.conn !== conn) return;
  const o = conn.opening;
  loadSession(st.model, { hello: o.hello, expired: o.expired, messages, runs, events: o.release(), cursor: st.cursor });
  for (const t of st.model.turns) if (t.usage) showContext({ context_tokens: t.usage.context, max_context_tokens: t.usage.max });
  conn.opening = null;
  render();
}

function onErrorFrame(f) {
  if (f.code === CURSOR_EXPIRED) {
    // Events were missed for good: rebuild the whole view from history and the retained log.
    if (st.session) openSession(st.session.id);
    return;
  }
  if (st.deciding.length && APPROVAL_ERRORS.has(f.code)) {
    const id = st.deciding.shift();
    approvalFailed(st.model, id, describeApprovalFailure(f));
    render();
    return;
  }
  toast(describeFailure(f));
  if (!ui.input.value && st.lastSent && REFUSED_SEND.has(f.code)) {
    ui.input.value = st.lastSent;
    showRunState();
  }
}

function scheduleReconnect(sessionId, delay, checkFirst) {
  clearTimeout(st.reconnectTimer);
  showConn(`reconnecting in ${Math.ceil(delay / 1000)} s…`);
  st.reconnectTimer = setTimeout(() => reconnect(sessionId, checkFirst), delay);
}

async function reconnect(sessionId, checkFirst) {
  st.reconnectTimer = null;
  if (!st.session || st.session.id !== sessionId) return;
  if (checkFirst) {
    // The handshake was refused: ask REST why (a 401 brings up the key dialog; a 404 is final).
    try {
      await api('GET', `/v1/sessions/${enc(sessionId)}`);
    } catch (e) {
      if (e.status === 404) {
        showConn('session not found');
        toast('This session no longer exists.');
        return;
      }
      scheduleReconnect(sessionId, Math.min(MAX_BACKOFF_MS, 500 * 2 ** st.attempt++), true);
      return;
    }
    if (!st.session || st.session.id !== sessionId) return;
  }
  // Nothing applied that a cursor could continue from: start the view over.
  if (st.cursor.last === null) openSession(sessionId);
  else connect();
}

function reconnectNow() {
  if (st.reconnectTimer && st.session) {
    clearTimeout(st.reconnectTimer);
    reconnect(st.session.id, true);
  }
}
window.addEventListener('online', reconnectNow);
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') reconnectNow();
});
setInterval(() => {
  if (st.conn && st.conn.helloed && st.conn.ws.readyState === WebSocket.OPEN) st.conn.ws.send(JSON.stringify({ type: 'ping' }));
}, PING_EVERY_MS);

function closeConnection() {
  clearTimeout(st.reconnectTimer);
  st.reconnectTimer = null;
  if (st.conn) {
    st.conn.closedByUs = true;
    try {
      st.conn.ws.close();
    } catch (_) {
      // Already closed.
    }
  }
  st.conn = null;
  st.attempt = 0;
  showConn(null);
}

function showConn(text) {
  ui.conn.hidden = !text;
  ui.conn.textContent = text || '';
  ui.conn.classList.toggle('down', Boolean(text));
}

function socketOpen() {
  const c = st.conn;
  return c && c.helloed && !c.opening && c.ws.readyState === WebSocket.OPEN ? c.ws : null;
}

async function answer(turn, ask, content) {
  view.sent.set(ask.requestId, content);
  try {
    const ws = socketOpen();
    if (ws) ws.send(JSON.stringify({ type: 'reply', request_id: ask.requestId, content }));
    else await api('POST', `/v1/sessions/${enc(st.session.id)}/runs/${enc(turn.runId)}/input`, { request_id: ask.requestId, content });
  } catch (e) {
    toast(`Could not send the answer. ${describeFailure(e)}`);
    throw e;
  }
}

/** Allow or Deny (with an optional reason) a tool call waiting for approval: over the socket, else REST. */
async function decide(turn, a, decision, reason) {
  if (!approvalSending(st.model, a.requestId, decision)) return;
  render();
  const ws = socketOpen();
  if (ws) {
    const frame = { type: 'approval', request_id: a.requestId, decision };
    if (reason) frame.reason = reason;
    st.deciding.push(a.requestId);
    ws.send(JSON.stringify(frame));
    return;
  }
  try {
    const body = reason ? { decision, reason } : { decision };
    await api('POST', `/v1/sessions/${enc(st.session.id)}/runs/${enc(turn.runId)}/approvals/${enc(a.requestId)}`, body);
  } catch (e) {
    approvalFailed(st.model, a.requestId, describeApprovalFailure(e));
    render();
  }
}

async function cancel() {
  const t = activeTurn(st.model);
  if (!t || !st.session) return;
  ui.stop.disabled = true;
  setTimeout(() => {
    ui.stop.disabled = false;
  }, 1500);
  const ws = socketOpen();
  if (ws) {
    ws.send(JSON.stringify({ type: 'cancel', run_id: t.runId }));
    return;
  }
  try {
    await api('POST', `/v1/sessions/${enc(st.session.id)}/runs/${enc(t.runId)}/cancel`, {});
  } catch (e) {
    toast(`Could not stop. ${describeFailure(e)}`);
  }
}

// ------------------------------------------------------------------ sessions and agents

const enc = encodeURIComponent;

function resetView() {
  closeConnection();
  st.cursor = new Cursor();
  st.model = newModel({ agents: st.agents.map((a) => a.name) });
  st.deciding = [];
  view.clear();
  ui.emptyHint.hidden = false;
  ui.ctx.hidden = true;
  pinned = true;
  ui.jump.hidden = true;
  showRunState();
}

async function openSession(id) {
  resetView();
  let session;
  try {
    session = await api('GET', `/v1/sessions/${enc(id)}`);
  } catch (e) {
    toast(`Cannot open that session. ${describeFailure(e)}`);
    newDraft();
    return;
  }
  st.session = session;
  if (location.hash !== `#s=${id}`) history.replaceState(null, '', `#s=${id}`);
  showHeader();
  ui.emptyHint.hidden = true;
  connect();
}

function newDraft() {
  resetView();
  st.session = null;
  if (location.hash) history.replaceState(null, '', location.pathname + location.search);
  showHeader();
  ui.input.focus();
}

function showHeader() {
  const s = st.session;
  const title = s ? sessionTitle(s) : 'New chat';
  ui.title.textContent = title;
  document.title = `${title} · agentd`;
  ui.rename.hidden = !s;
  if (s) {
    ui.sub.textContent = s.status === 'closed' ? `${s.agent} · deleted` : s.agent;
    if (ui.agentSelect.value !== s.agent && st.agents.some((a) => a.name === s.agent)) ui.agentSelect.value = s.agent;
  } else {
    ui.sub.textContent = ui.agentSelect.value ? `with ${ui.agentSelect.value}` : '';
  }
  showAgentDesc();
  drawSessionList();
}

function showAgentDesc() {
  const a = st.agents.find((x) => x.name === ui.agentSelect.value);
  ui.agentDesc.textContent = a ? a.description || `model ${a.model}` : '';
}

async function loadAgents() {
  st.agents = (await api('GET', '/v1/agents')) || [];
  ui.agentSelect.replaceChildren();
  for (const a of st.agents) {
    const o = el('option', null, a.name);
    o.value = a.name;
    ui.agentSelect.append(o);
  }
  const remembered = localStorage.getItem(AGENT_STORE);
  if (remembered && st.agents.some((a) => a.name === remembered)) ui.agentSelect.value = remembered;
  st.model.agents = new Set(st.agents.map((a) => a.name));
  showAgentDesc();
}

function listPath(before) {
  const q = new URLSearchParams({ limit: String(PAGE), status: 'active' });
  if (st.query) q.set('q', st.query);
  if (before) q.set('before', before);
  return `/v1/sessions?${q}`;
}

async function refreshSessions() {
  try {
    const list = (await api('GET', listPath(null))) || [];
    st.sessions = list;
    st.moreSessions = list.length === PAGE;
  } catch (e) {
    toast(`Could not list the sessions. ${describeFailure(e)}`, refreshSessions);
    return;
  }
  drawSessionList();
}

async function loadMoreSessions() {
  const last = st.sessions[st.sessions.length - 1];
  if (!last) return;
  try {
    const list = (await api('GET', listPath(last.id))) || [];
    st.sessions = st.sessions.concat(list.filter((s) => !st.sessions.some((x) => x.id === s.id)));
    st.moreSessions = list.length === PAGE;
  } catch (e) {
    toast(`Could not list more sessions. ${describeFailure(e)}`);
    return;
  }
  drawSessionList();
}

let refreshTimer = null;
function scheduleSessionRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    await refreshSessions();
    // The server names a session after its first message: pick the title up.
    if (st.session) {
      const s = st.sessions.find((x) => x.id === st.session.id);
      if (s && s.title !== st.session.title) {
        st.session.title = s.title;
        showHeader();
      }
    }
  }, 300);
}

function fmtTime(iso) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '';
  const s = Math.round((Date.now() - t) / 1000);
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(t).toLocaleDateString();
}

function drawSessionList() {
  // A rename in progress keeps its input: the list is drawn again when it ends.
  if (st.renaming) return;
  ui.sessionList.replaceChildren();
  for (const s of st.sessions) {
    const li = el('li');
    if (st.session && st.session.id === s.id) li.className = 'current';
    const b = el('button', 'open-session');
    b.type = 'button';
    b.dataset.session = s.id;
    b.append(el('span', 's-title', sessionTitle(s)), el('span', 's-meta', `${s.agent} · ${fmtTime(s.updated_at)}`));
    b.addEventListener('click', () => {
      closeSidebar();
      if (!st.session || st.session.id !== s.id) location.hash = `#s=${s.id}`;
    });
    const ren = el('button', 'icon-btn s-rename', '✎');
    ren.type = 'button';
    ren.setAttribute('aria-label', `Rename “${sessionTitle(s)}”`);
    ren.addEventListener('click', () => startRename(li, s));
    const del = el('button', 'icon-btn s-delete');
    del.append(trashIcon());
    del.type = 'button';
    del.setAttribute('aria-label', `Delete “${sessionTitle(s)}”`);
    del.addEventListener('click', () => deleteSession(s));
    li.append(b, ren, del);
    ui.sessionList.append(li);
  }
  if (!st.sessions.length) ui.sessionList.append(el('li', 'muted empty', st.query ? 'No session matches.' : 'No sessions yet.'));
  ui.more.hidden = !st.moreSessions;
}

/** A small trash-can icon (an SVG template in index.html; the page's fonts may lack an emoji for it). */
function trashIcon() {
  return $('icon-trash').content.firstElementChild.cloneNode(true);
}

function startRename(li, s) {
  const input = el('input', 'rename-input');
  input.value = s.title || '';
  input.setAttribute('aria-label', 'New title');
  li.replaceChildren(input);
  input.focus();
  input.select();
  st.renaming = true;
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== s.title) await renameSession(s, title);
    st.renaming = false;
    drawSessionList();
  };
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') finish(true);
    if (e.key === 'Escape') finish(false);
  });
  input.addEventListener('blur', () => finish(true));
}

async function renameSession(s, title) {
  try {
    const updated = await api('PATCH', `/v1/sessions/${enc(s.id)}`, { title });
    // The list may have been fetched again meanwhile: update the entry it holds now.
    for (const x of st.sessions) if (x.id === s.id) x.title = updated.title;
    s.title = updated.title;
    if (st.session && st.session.id === s.id) {
      st.session.title = updated.title;
      showHeader();
    }
  } catch (e) {
    toast(`Could not rename. ${describeFailure(e)}`);
  }
}

async function deleteSession(s) {
  if (!window.confirm(`Delete “${sessionTitle(s)}”? It disappears from the list.`)) return;
  try {
    await api('DELETE', `/v1/sessions/${enc(s.id)}`);
  } catch (e) {
    toast(`Could not delete. ${describeFailure(e)}`);
    return;
  }
  st.sessions = st.sessions.filter((x) => x.id !== s.id);
  if (st.session && st.session.id === s.id) newDraft();
  else drawSessionList();
}

function sessionFromHash() {
  const m = location.hash.match(/^#s=([A-Za-z0-9_-]+)$/);
  return m ? m[1] : null;
}

// ------------------------------------------------------------------ composing and sending

const IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/gif', 'image/webp'];

function addFiles(files) {
  for (const file of files) {
    const kind = IMAGE_TYPES.includes(file.type) ? 'image' : 'file';
    const a = { kind, name: file.name, file, dataUrl: null, el: null };
    const chip = el('span', `chip ${kind}-chip`);
    const remove = el('button', null, '×');
    remove.type = 'button';
    remove.setAttribute('aria-label', `Remove ${file.name}`);
    remove.addEventListener('click', () => {
      st.attachments = st.attachments.filter((x) => x !== a);
      chip.remove();
      showRunState();
    });
    chip.append(el('span', 'chip-name', file.name), remove);
    a.el = chip;
    if (kind === 'image') {
      a.ready = new Promise((resolve) => {
        const r = new FileReader();
        r.onload = () => {
          a.dataUrl = String(r.result);
          const img = el('img');
          img.alt = '';
          img.src = a.dataUrl;
          chip.prepend(img);
          resolve();
        };
        r.onerror = () => {
          chip.classList.add('bad');
          resolve();
        };
        r.readAsDataURL(file);
      });
    } else {
      a.ready = Promise.resolve();
    }
    st.attachments.push(a);
    ui.attachments.append(chip);
  }
  showRunState();
}

async function ensureSession() {
  if (st.session) return st.session;
  const agent = ui.agentSelect.value;
  if (!agent) throw new ApiError(0, 'no_agent', 'the server has no agents');
  // No title: the server names the session after its first message.
  const s = await api('POST', '/v1/sessions', { agent });
  localStorage.setItem(AGENT_STORE, agent);
  st.session = s;
  st.sessions.unshift(s);
  history.replaceState(null, '', `#s=${s.id}`);
  showHeader();
  ui.emptyHint.hidden = true;
  const ready = waitForOpen();
  connect();
  await ready;
  return s;
}

function waitForOpen() {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const check = () => {
      if (socketOpen() || Date.now() - t0 > 5000) resolve();
      else setTimeout(check, 20);
    };
    check();
  });
}

/** Sends a message (content, images, file ids) as a new turn: over the socket, or REST while it is down. */
async function sendMessage(session, content, images, files) {
  const frame = { type: 'message', content };
  if (images.length) frame.images = images;
  if (files.length) frame.files = files;
  const ws = socketOpen();
  if (ws) ws.send(JSON.stringify(frame));
  else await api('POST', `/v1/sessions/${enc(session.id)}/messages`, { content, images: frame.images, files: frame.files, wait: false });
  st.lastSent = content;
  pinned = true;
  follow();
  // The server names an untitled session after its first message: show that title now, and read it back.
  if (!session.title && derivedTitle(content)) {
    session.title = derivedTitle(content);
    const listed = st.sessions.find((x) => x.id === session.id);
    if (listed) listed.title = session.title;
    showHeader();
    scheduleSessionRefresh();
  }
}

/** Retry and Regenerate: the turn's user message again, as a new turn (the earlier one stays in the history). */
async function resend(turn) {
  if (!turn.user || !st.session) return;
  try {
    await sendMessage(st.session, turn.user.content, turn.user.images, []);
  } catch (e) {
    toast(`Could not send. ${describeFailure(e)}`, () => resend(turn));
  }
}

async function send() {
  let text = ui.input.value;
  const attachments = st.attachments.slice();
  if (!text.trim() && !attachments.length) return;
  // While the agent waits for an answer, what is typed answers it (else it would queue behind the waiting run).
  const asks = pendingAsks(st.model);
  if (asks.length && text.trim() && !attachments.length) {
    try {
      await answer(asks[0].turn, asks[0].ask, text.trim());
      ui.input.value = '';
      autosize();
      showRunState();
    } catch (_) {
      // answer() said why.
    }
    return;
  }
  ui.send.disabled = true;
  try {
    await Promise.all(attachments.map((a) => a.ready));
    const files = attachments.filter((a) => a.kind === 'file');
    const images = attachments.filter((a) => a.kind === 'image' && a.dataUrl).map((a) => a.dataUrl);
    if (!text.trim() && !images.length) text = files.length === 1 ? 'Please look at the attached file.' : 'Please look at the attached files.';
    const session = await ensureSession();
    const fileIds = [];
    for (const a of files) {
      a.el.classList.add('uploading');
      const form = new FormData();
      form.append('file', a.file, a.name);
      try {
        const up = await api('POST', `/v1/sessions/${enc(session.id)}/files`, undefined, form);
        fileIds.push(up.id);
      } catch (e) {
        a.el.classList.remove('uploading');
        a.el.classList.add('bad');
        throw new ApiError(e.status, e.code, `upload of ${a.name} failed: ${e.message}`);
      }
      a.el.classList.remove('uploading');
    }
    await sendMessage(session, text, images, fileIds);
    ui.input.value = '';
    autosize();
    st.attachments = [];
    ui.attachments.replaceChildren();
  } catch (e) {
    toast(describeFailure(e), send);
  } finally {
    ui.send.disabled = false;
    ui.input.focus();
    showRunState();
  }
}

function autosize() {
  ui.input.style.height = 'auto';
  ui.input.style.height = `${Math.min(ui.input.scrollHeight + 2, 200)}px`;
}

// ------------------------------------------------------------------ wiring

function openSidebar() {
  ui.sidebar.classList.add('open');
  ui.scrim.hidden = false;
}
function closeSidebar() {
  ui.sidebar.classList.remove('open');
  ui.scrim.hidden = true;
}

ui.menu.addEventListener('click', openSidebar);
ui.closeSidebar.addEventListener('click', closeSidebar);
ui.scrim.addEventListener('click', closeSidebar);
ui.newSession.addEventListener('click', () => {
  closeSidebar();
  newDraft();
});
ui.more.addEventListener('click', loadMoreSessions);
let searchTimer = null;
ui.search.addEventListener('input', () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    st.query = ui.search.value.trim();
    refreshSessions();
  }, 200);
});
ui.rename.addEventListener('click', () => {
  const li = ui.sessionList.querySelector('li.current');
  const s = st.sessions.find((x) => st.session && x.id === st.session.id);
  if (li && s) {
    openSidebar();
    startRename(li, s);
  }
});
ui.agentSelect.addEventListener('change', () => {
  localStorage.setItem(AGENT_STORE, ui.agentSelect.value);
  // A session keeps its agent: picking another one starts a new session with it.
  if (st.session && st.session.agent !== ui.agentSelect.value) newDraft();
  else showHeader();
});
ui.changeKey.hidden = !st.key;
ui.changeKey.addEventListener('click', async () => {
  await askForKey('');
  boot();
});
ui.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  send();
});
ui.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
  if (e.key === 'Escape' && activeTurn(st.model)) {
    e.preventDefault();
    cancel();
  }
});
ui.input.addEventListener('input', () => {
  autosize();
  showRunState();
});
ui.input.addEventListener('paste', (e) => {
  const files = Array.from(e.clipboardData ? e.clipboardData.files : []);
  if (files.length) {
    e.preventDefault();
    addFiles(files);
  }
});
ui.attach.addEventListener('click', () => ui.fileInput.click());
ui.fileInput.addEventListener('change', () => {
  addFiles(Array.from(ui.fileInput.files || []));
  ui.fileInput.value = '';
});
// Drag and drop anywhere on the chat.
let dragDepth = 0;
const main = $('main');
main.addEventListener('dragenter', (e) => {
  if (!e.dataTransfer || !Array.from(e.dataTransfer.types).includes('Files')) return;
  dragDepth++;
  ui.drop.hidden = false;
});
main.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.drop.hidden = true;
});
main.addEventListener('dragover', (e) => {
  if (e.dataTransfer && Array.from(e.dataTransfer.types).includes('Files')) e.preventDefault();
});
main.addEventListener('drop', (e) => {
  dragDepth = 0;
  ui.drop.hidden = true;
  const files = Array.from((e.dataTransfer && e.dataTransfer.files) || []);
  if (!files.length) return;
  e.preventDefault();
  addFiles(files);
});
ui.stop.addEventListener('click', cancel);
window.addEventListener('hashchange', () => {
  const id = sessionFromHash();
  if (id && (!st.session || st.session.id !== id)) openSession(id);
});

async function boot() {
  try {
    await loadAgents();
  } catch (e) {
    toast(`Cannot reach agentd. ${describeFailure(e)}`, boot);
    return;
  }
  await refreshSessions();
  const id = sessionFromHash();
  if (id) await openSession(id);
  else newDraft();
  document.body.dataset.ready = '1';
}

boot();
