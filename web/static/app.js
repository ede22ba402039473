// agentd web chat: one plain script, no build step, no dependencies.
//
// How it stays correct across reloads and dropped connections:
// - Opening a session connects the native WebSocket WITHOUT `after` first. The hello frame says which run is
//   active; the server then replays that run from its start. Only after the hello is the stored history fetched,
//   and events are buffered until it is drawn. Any run whose events arrive on the socket is drawn from its events
//   (its history rendering, if any, is removed first): every such run's events arrive from its first, so nothing
//   is lost and nothing is drawn twice.
// - Every event carries `seq`; the page remembers the highest one it has drawn. A dropped socket reconnects with
//   `after=<that seq>` and exponential back-off, and drops any event at or below it.
// - Sends, cancels and ask_human replies go over the socket; REST is the fallback while it is down.
'use strict';

(() => {
  const KEY_STORE = 'agentd.apiKey';
  const AGENT_STORE = 'agentd.agent';
  const PING_EVERY_MS = 25000;
  const MAX_BACKOFF_MS = 15000;

  // The server's codes come from codes.js (loaded first), the list the server is tested against.
  const CODES = globalThis.AGENTD_CODES;
  /** An error code the server sends; one missing from codes.js is a bug, so it throws at once. */
  function errorCode(name) {
    if (!CODES || !Object.prototype.hasOwnProperty.call(CODES.errors, name)) {
      throw new Error(`error code ${name} is not in codes.js`);
    }
    return name;
  }
  const CURSOR_EXPIRED = errorCode('cursor_expired');
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
    sessionList: $('session-list'),
    changeKey: $('change-key'),
    title: $('session-title'),
    sub: $('session-sub'),
    ctx: $('ctx-usage'),
    conn: $('conn-status'),
    transcript: $('transcript'),
    emptyHint: $('empty-hint'),
    toast: $('toast'),
    composer: $('composer'),
    attachments: $('attachments'),
    fileInput: $('file-input'),
    input: $('input'),
    send: $('send'),
    stop: $('stop'),
    keyDialog: $('key-dialog'),
    keyForm: $('key-form'),
    keyInput: $('key-input'),
    keyError: $('key-error'),
  };

  const st = {
    key: localStorage.getItem(KEY_STORE) || '',
    agents: [],
    sessions: [],
    session: null, // the open session; null while drafting a new one
    conn: null, // the current Connection (see connect)
    lastSeq: null, // highest seq drawn; null = unknown, so (re)connect without `after`
    runs: new Map(), // run id -> live RunView
    historyRuns: new Map(), // run id -> DOM nodes drawn from stored history
    activeRunId: null,
    attachments: [], // {kind: 'image'|'file', name, file, dataUrl?, el}
    attempt: 0, // reconnect attempts since the last hello
    reconnectTimer: null,
    reconnectAt: 0,
    lastSent: '',
  };

  // ------------------------------------------------------------------ small helpers

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  const enc = encodeURIComponent;

  function fmtNum(n) {
    return Number(n).toLocaleString('en-US');
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

  function pretty(v) {
    if (typeof v === 'string') {
      try {
        return JSON.stringify(JSON.parse(v), null, 2);
      } catch (_) {
        return v;
      }
    }
    return JSON.stringify(v, null, 2);
  }

  function short(s, n) {
    s = String(s).replace(/\s+/g, ' ').trim();
    return s.length > n ? `${s.slice(0, n - 1)}…` : s;
  }

  let toastTimer = null;
  function toast(msg) {
    ui.toast.textContent = msg;
    ui.toast.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => {
      ui.toast.hidden = true;
    }, 8000);
  }

  // Keeps the transcript pinned to the bottom while new output arrives, unless the reader scrolled up.
  let pinned = true;
  let scrollQueued = false;
  ui.transcript.addEventListener('scroll', () => {
    const t = ui.transcript;
    pinned = t.scrollHeight - t.scrollTop - t.clientHeight < 80;
  });
  function follow() {
    if (!pinned || scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
    });
  }

  function append(node) {
    ui.emptyHint.hidden = true;
    ui.transcript.append(node);
    follow();
    return node;
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
        throw new ApiError(res.status, err.code || String(res.status), err.message || text || res.statusText);
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
  // The dialog only closes with a key: Escape would leave the page with nothing to do.
  ui.keyDialog.addEventListener('cancel', (e) => e.preventDefault());

  // ------------------------------------------------------------------ drawing: flows, runs, messages

  // A Flow is one agent's stream of segments (text, thinking, tool calls, questions) inside a container.
  class Flow {
    constructor(container) {
      this.c = container;
      this.cur = null;
    }

    add(node, kind) {
      this.c.append(node);
      this.cur = { kind, node };
      follow();
      return this.cur;
    }

    break() {
      this.cur = null;
    }

    // Returns where the delta went (its text node and offset), so a resumed run can take it back.
    text(delta) {
      if (!this.cur || this.cur.kind !== 'text') {
        const div = el('div', 'text');
        const t = document.createTextNode('');
        div.append(t);
        this.add(div, 'text').t = t;
      }
      const at = { t: this.cur.t, start: this.cur.t.length, len: delta.length };
      this.cur.t.appendData(delta);
      follow();
      return at;
    }

    thinking(delta) {
      if (!this.cur || this.cur.kind !== 'thinking' || this.cur.done) {
        const d = el('details', 'thinking');
        d.open = true;
        const summary = el('summary', null, 'Thinking…');
        const body = el('div', 'body');
        const t = document.createTextNode('');
        body.append(t);
        d.append(summary, body);
        const seg = this.add(d, 'thinking');
        seg.t = t;
        seg.summary = summary;
        // Once the reader toggles it, it stays as they left it.
        summary.addEventListener('click', () => {
          seg.touched = true;
        });
      }
      const at = { t: this.cur.t, start: this.cur.t.length, len: delta.length };
      this.cur.t.appendData(delta);
      follow();
      return at;
    }

    thinkingEnd() {
      if (this.cur && this.cur.kind === 'thinking' && !this.cur.done) {
        this.cur.done = true;
        this.cur.summary.textContent = 'Thought';
        if (!this.cur.touched) this.cur.node.open = false;
      }
    }

    tool(callId, tool, args, isAgent) {
      const d = el('details', 'tool running');
      d.dataset.call = callId || '';
      d.dataset.tool = tool;
      const summary = el('summary');
      summary.append(el('span', 'tool-name', tool), ' ', el('span', 'muted', short(pretty(args ?? {}), 60)));
      const state = el('span', 'tool-state', 'running…');
      summary.append(state);
      const argsSec = el('div', 'section');
      argsSec.append(el('div', 'label', 'arguments'), el('pre', 'args', pretty(args ?? {})));
      const resultSec = el('div', 'section result');
      resultSec.hidden = true;
      d.append(summary, argsSec, resultSec);
      // A subagent's activity nests inside the call that started it, open so it can be followed.
      if (isAgent) d.open = true;
      const seg = this.add(d, 'tool');
      seg.callId = callId;
      seg.tool = tool;
      seg.state = state;
      seg.resultSec = resultSec;
      seg.subFlow = null;
      seg.nested = () => {
        if (!seg.subFlow) {
          const box = el('div', 'sub');
          box.append(el('div', 'agent-name', tool));
          d.insertBefore(box, resultSec);
          d.open = true;
          seg.subFlow = new Flow(box);
        }
        return seg.subFlow;
      };
      seg.finish = (result, success) => {
        d.classList.remove('running');
        if (success === true) d.classList.add('ok');
        if (success === false) d.classList.add('failed');
        state.textContent = success === false ? 'failed' : success === true ? 'done' : '';
        resultSec.replaceChildren(el('div', 'label', 'result'), el('pre', 'result-text', String(result ?? '')));
        resultSec.hidden = false;
      };
      this.break();
      return seg;
    }

    note(text) {
      this.add(el('div', 'note', text), 'note');
      this.break();
    }
  }

  class RunView {
    constructor(id, live) {
      this.id = id;
      this.live = live;
      this.el = el('div', 'msg assistant run');
      this.el.dataset.run = id;
      this.el.dataset.status = live ? 'starting' : 'stored';
      this.agentEl = el('div', 'agent-name', st.session ? st.session.agent : '');
      this.body = el('div', 'run-body');
      this.footer = el('div', 'run-footer');
      this.el.append(this.agentEl, this.body, this.footer);
      this.main = new Flow(this.body);
      this.openTools = []; // unfinished tool segments, innermost last
      this.asks = new Map();
      this.ownText = '';
      // Deltas since the run's last stored message: a `run_resumed` may supersede them (SPEC.md section 4).
      this.deltas = [];
      this.orphans = new Map();
      append(this.el);
    }

    // Takes back the deltas with seq >= `from` (an interrupted model call's), newest first so every earlier
    // offset stays right; segments left empty go.
    supersede(from) {
      while (this.deltas.length && this.deltas[this.deltas.length - 1].seq >= from) {
        const d = this.deltas.pop();
        d.at.t.deleteData(d.at.start, d.at.len);
        if (d.own) this.ownText = this.ownText.slice(0, this.ownText.length - d.at.len);
        const seg = d.at.t.parentNode;
        const box = seg && seg.classList.contains('body') ? seg.parentNode : seg;
        if (d.at.t.length === 0 && box) box.remove();
      }
      for (const f of [this.main, ...this.openTools.map((t) => t.subFlow).filter(Boolean)]) f.break();
    }

    // Subagent events go into the innermost unfinished call named after that agent.
    flowFor(ev) {
      if (!ev.is_subagent) return this.main;
      for (let i = this.openTools.length - 1; i >= 0; i--) {
        if (this.openTools[i].tool === ev.agent) return this.openTools[i].nested();
      }
      if (!this.orphans.has(ev.agent)) {
        const box = el('div', 'sub');
        box.append(el('div', 'agent-name', ev.agent));
        this.body.append(box);
        this.orphans.set(ev.agent, new Flow(box));
      }
      return this.orphans.get(ev.agent);
    }

    setStatus(s) {
      this.el.dataset.status = s;
      this.el.classList.toggle('running', s === 'running' || s === 'waiting_input');
    }
  }

  function liveRun(runId) {
    let rv = st.runs.get(runId);
    if (!rv) {
      rv = new RunView(runId, true);
      st.runs.set(runId, rv);
    }
    return rv;
  }

  const FILES_NOTE = /\s*\[Uploaded files on disk:\n([\s\S]*?)\]\s*$/;

  function userBubble(m) {
    const b = el('div', 'msg user');
    b.dataset.message = m.id || '';
    let content = m.content || '';
    const files = [];
    const note = content.match(FILES_NOTE);
    if (note) {
      content = content.slice(0, note.index);
      for (const line of note[1].split('\n')) {
        const name = line.replace(/^-\s*/, '').split(' → ')[0].trim();
        if (name) files.push(name);
      }
    }
    if (content) b.append(el('div', 'user-text', content));
    for (const src of m.images || []) {
      if (typeof src !== 'string' || !src.startsWith('data:image/')) continue;
      const img = el('img');
      img.alt = 'attached image';
      img.src = src;
      b.append(img);
    }
    if (files.length) {
      const chips = el('div', 'chips');
      for (const f of files) chips.append(el('span', 'chip file-chip', f));
      b.append(chips);
    }
    return append(b);
  }

  // Draws stored messages, grouped by run, remembering each run's nodes so live events can replace them.
  function drawHistory(messages) {
    const runs = new Map();
    const track = (runId, node) => {
      if (!runId) return;
      if (!st.historyRuns.has(runId)) st.historyRuns.set(runId, []);
      st.historyRuns.get(runId).push(node);
    };
    for (const m of messages) {
      const runId = m.run_id || '';
      if (m.role === 'user') {
        track(runId, userBubble(m));
        continue;
      }
      if (m.role !== 'assistant' && m.role !== 'tool') continue;
      let rv = runs.get(runId);
      if (!rv) {
        rv = new RunView(runId, false);
        rv.pending = new Map();
        runs.set(runId, rv);
        track(runId, rv.el);
      }
      if (m.role === 'assistant') {
        rv.main.break();
        if (m.content) rv.main.text(m.content);
        for (const tc of m.tool_calls || []) {
          let args = tc.arguments;
          try {
            args = JSON.parse(tc.arguments);
          } catch (_) {
            // Shown as the model wrote it.
          }
          rv.pending.set(tc.id, rv.main.tool(tc.id, tc.name, args, isAgentName(tc.name)));
        }
      } else {
        const seg = rv.pending.get(m.tool_call_id);
        if (seg) seg.finish(m.content, null);
      }
    }
  }

  function isAgentName(name) {
    return st.agents.some((a) => a.name === name);
  }

  // ------------------------------------------------------------------ events

  function applyEvent(ev) {
    if (typeof ev.seq === 'number') {
      if (st.lastSeq !== null && ev.seq <= st.lastSeq) return;
      st.lastSeq = ev.seq;
    }
    const runId = ev.run_id;
    if (runId && st.historyRuns.has(runId)) {
      for (const n of st.historyRuns.get(runId)) n.remove();
      st.historyRuns.delete(runId);
    }
    switch (ev.type) {
      case 'message':
        if (ev.message && ev.message.role === 'user') userBubble(ev.message);
        // Assistant and tool messages were already drawn from their deltas and tool events; the deltas
        // before a stored message can no longer be superseded.
        if (st.runs.has(runId)) st.runs.get(runId).deltas = [];
        return;
      case 'run_started': {
        const rv = liveRun(runId);
        rv.setStatus('running');
        setActiveRun(runId);
        return;
      }
      default:
        break;
    }
    if (!runId) return;
    const rv = liveRun(runId);
    if (rv.el.dataset.status === 'starting') rv.setStatus('running');
    const flow = rv.flowFor(ev);
    switch (ev.type) {
      case 'text_delta': {
        const at = flow.text(ev.delta || '');
        if (!ev.is_subagent) rv.ownText += ev.delta || '';
        rv.deltas.push({ seq: ev.seq, at, own: !ev.is_subagent });
        break;
      }
      case 'thinking_delta':
        rv.deltas.push({ seq: ev.seq, at: flow.thinking(ev.delta || ''), own: false });
        break;
      case 'run_resumed':
        // The run goes on after its process was lost: the interrupted model call's text is superseded.
        rv.supersede(ev.discard_from_seq);
        rv.main.note(`resumed after an interruption (attempt ${ev.attempt})`);
        rv.setStatus('running');
        setActiveRun(runId);
        break;
      case 'thinking_end':
        flow.thinkingEnd();
        break;
      case 'tool_started':
        rv.openTools.push(flow.tool(ev.call_id, ev.tool, ev.args, isAgentName(ev.tool)));
        break;
      case 'tool_finished': {
        const i = rv.openTools.findIndex((t) => t.callId === ev.call_id);
        const seg = i >= 0 ? rv.openTools.splice(i, 1)[0] : flow.tool(ev.call_id, ev.tool, ev.args, false);
        seg.finish(ev.result, ev.success);
        break;
      }
      case 'input_requested':
        askSegment(rv, flow, ev);
        rv.setStatus('waiting_input');
        break;
      case 'input_received': {
        const ask = rv.asks.get(ev.request_id);
        if (ask) ask.answered();
        rv.setStatus('running');
        break;
      }
      case 'skill_matched':
        flow.note(`skill: ${ev.skill} (${ev.method})`);
        break;
      case 'context_compressed':
        flow.note(`context compressed: ${ev.messages_before} → ${ev.messages_after} messages`);
        break;
      case 'run_finished':
        finishRun(rv, ev);
        break;
      default:
        break;
    }
  }

  function askSegment(rv, flow, ev) {
    const box = el('div', 'ask');
    box.dataset.request = ev.request_id;
    box.append(el('div', 'question', ev.question || ''));
    const form = el('form');
    const input = el('input');
    input.placeholder = 'Your answer';
    input.setAttribute('aria-label', 'Answer');
    const btn = el('button', 'primary', 'Answer');
    btn.type = 'submit';
    form.append(input, btn);
    box.append(form);
    let sent = '';
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const v = input.value.trim();
      if (!v) return;
      sent = v;
      input.disabled = true;
      btn.disabled = true;
      reply(rv.id, ev.request_id, v).catch((err) => {
        toast(`Could not send the answer: ${err.message}`);
        input.disabled = false;
        btn.disabled = false;
      });
    });
    const ask = {
      answered() {
        box.classList.add('answered');
        form.replaceWith(el('div', 'answer', sent ? `Answered: ${sent}` : 'Answered'));
        rv.asks.delete(ev.request_id);
      },
      expired() {
        box.classList.add('answered');
        form.replaceWith(el('div', 'answer', 'No longer waiting for an answer.'));
      },
    };
    rv.asks.set(ev.request_id, ask);
    flow.add(box, 'ask');
    flow.break();
    if (document.activeElement === ui.input || document.activeElement === document.body) input.focus();
  }

  function finishRun(rv, ev) {
    const run = ev.run || {};
    const status = run.status || 'completed';
    rv.setStatus(status);
    for (const ask of rv.asks.values()) ask.expired();
    rv.asks.clear();
    if (!rv.ownText && ev.content) rv.main.text(ev.content);
    rv.footer.replaceChildren();
    if (status !== 'completed') {
      const s = el('span', `status-${status}`, status);
      rv.footer.append(s);
      if (run.error && run.error.message) rv.footer.append(`: ${run.error.message}`);
    }
    if (ev.max_context_tokens) {
      const pct = Math.round((100 * (ev.context_tokens || 0)) / ev.max_context_tokens);
      const usage = `context ${fmtNum(ev.context_tokens || 0)} / ${fmtNum(ev.max_context_tokens)} tokens (${pct}%)`;
      if (rv.footer.childNodes.length) rv.footer.append(' · ');
      rv.footer.append(usage);
      ui.ctx.textContent = `${pct}% context`;
      ui.ctx.title = usage;
      ui.ctx.hidden = false;
    }
    if (st.activeRunId === rv.id) setActiveRun(null);
    scheduleSessionRefresh();
  }

  function setActiveRun(runId) {
    st.activeRunId = runId;
    ui.stop.hidden = !runId;
    ui.stop.disabled = false;
  }

  // ------------------------------------------------------------------ the WebSocket

  function wsUrl(sessionId) {
    const q = new URLSearchParams();
    if (st.lastSeq !== null) q.set('after', String(st.lastSeq));
    if (st.key) q.set('api_key', st.key);
    const qs = q.toString();
    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    return `${proto}://${location.host}/v1/sessions/${enc(sessionId)}/ws${qs ? `?${qs}` : ''}`;
  }

  function connect() {
    const session = st.session;
    const initial = st.lastSeq === null;
    const ws = new WebSocket(wsUrl(session.id));
    const conn = { ws, session, helloed: false, buffer: initial ? [] : null, closedByUs: false };
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
      onClosed(conn, e);
    };
  }

  function onFrame(conn, f) {
    if (f.type === 'hello') {
      conn.helloed = true;
      st.attempt = 0;
      showConn(null);
      if (conn.buffer) {
        // Without an active run the server sends only what comes after this point.
        if (!f.active_run_id) st.lastSeq = f.last_seq;
        loadHistory(conn);
      }
      return;
    }
    if (f.type === 'pong') return;
    if (f.type === 'error') {
      onErrorFrame(f);
      return;
    }
    if (conn.buffer) {
      conn.buffer.push(f);
      return;
    }
    applyEvent(f);
  }

  async function loadHistory(conn) {
    let messages;
    try {
      messages = await api('GET', `/v1/sessions/${enc(conn.session.id)}/messages`);
    } catch (e) {
      if (st.conn !== conn) return;
      toast(`Could not load the history: ${e.message}`);
      messages = [];
    }
    if (st.conn !== conn) return;
    drawHistory(messages);
    const buffered = conn.buffer;
    conn.buffer = null;
    for (const f of buffered) applyEvent(f);
    follow();
  }

  function onErrorFrame(f) {
    if (f.code === CURSOR_EXPIRED) {
      // Events were missed for good: rebuild the whole view from history and the active run.
      if (st.session) openSession(st.session.id);
      return;
    }
    toast(`${f.code}: ${f.message}`);
    if (!ui.input.value && st.lastSent && REFUSED_SEND.has(f.code)) {
      ui.input.value = st.lastSent;
    }
  }

  function onClosed(conn, e) {
    st.conn = null;
    const delay = e.code === 4008 ? 0 : Math.min(MAX_BACKOFF_MS, 500 * 2 ** st.attempt) * (0.8 + Math.random() * 0.4);
    st.attempt += 1;
    scheduleReconnect(conn.session.id, delay, !conn.helloed);
  }

  function scheduleReconnect(sessionId, delay, checkFirst) {
    clearTimeout(st.reconnectTimer);
    st.reconnectAt = Date.now() + delay;
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
          toast(`Session ${sessionId} no longer exists.`);
          return;
        }
        if (e.status !== 0) toast(e.message);
        scheduleReconnect(sessionId, Math.min(MAX_BACKOFF_MS, 500 * 2 ** st.attempt++), true);
        return;
      }
      if (!st.session || st.session.id !== sessionId) return;
    }
    if (st.lastSeq === null) {
      // Nothing drawn that a cursor could continue from: start the view over.
      openSession(sessionId);
    } else {
      connect();
    }
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
    if (st.conn && st.conn.helloed && st.conn.ws.readyState === WebSocket.OPEN) {
      st.conn.ws.send(JSON.stringify({ type: 'ping' }));
    }
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
    return c && c.helloed && !c.buffer && c.ws.readyState === WebSocket.OPEN ? c.ws : null;
  }

  async function reply(runId, requestId, content) {
    const ws = socketOpen();
    if (ws) {
      ws.send(JSON.stringify({ type: 'reply', request_id: requestId, content }));
      return;
    }
    await api('POST', `/v1/sessions/${enc(st.session.id)}/runs/${enc(runId)}/input`, { request_id: requestId, content });
  }

  async function cancel() {
    const runId = st.activeRunId;
    if (!runId || !st.session) return;
    ui.stop.disabled = true;
    const ws = socketOpen();
    if (ws) {
      ws.send(JSON.stringify({ type: 'cancel', run_id: runId }));
      return;
    }
    try {
      await api('POST', `/v1/sessions/${enc(st.session.id)}/runs/${enc(runId)}/cancel`, {});
    } catch (e) {
      toast(`Could not stop: ${e.message}`);
      ui.stop.disabled = false;
    }
  }

  // ------------------------------------------------------------------ sessions and agents

  function resetView() {
    closeConnection();
    st.lastSeq = null;
    st.runs.clear();
    st.historyRuns.clear();
    setActiveRun(null);
    ui.transcript.replaceChildren(ui.emptyHint);
    ui.emptyHint.hidden = false;
    ui.ctx.hidden = true;
    pinned = true;
  }

  async function openSession(id) {
    resetView();
    let session;
    try {
      session = await api('GET', `/v1/sessions/${enc(id)}`);
    } catch (e) {
      toast(`Cannot open session ${id}: ${e.message}`);
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
    if (s) {
      ui.title.textContent = s.title || 'Untitled session';
      ui.sub.textContent = `${s.agent} · ${s.id}`;
      if (ui.agentSelect.value !== s.agent && st.agents.some((a) => a.name === s.agent)) ui.agentSelect.value = s.agent;
    } else {
      ui.title.textContent = 'New session';
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
    showAgentDesc();
  }

  async function refreshSessions() {
    try {
      st.sessions = (await api('GET', '/v1/sessions?limit=50')) || [];
    } catch (e) {
      toast(`Could not list sessions: ${e.message}`);
      return;
    }
    drawSessionList();
  }

  let refreshTimer = null;
  function scheduleSessionRefresh() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshSessions, 300);
  }

  function drawSessionList() {
    ui.sessionList.replaceChildren();
    for (const s of st.sessions) {
      const li = el('li');
      if (st.session && st.session.id === s.id) li.className = 'current';
      const b = el('button');
      b.type = 'button';
      b.dataset.session = s.id;
      b.append(el('span', 's-title', s.title || 'Untitled session'));
      b.append(el('span', 's-meta', `${s.agent} · ${fmtTime(s.updated_at)}${s.status === 'closed' ? ' · closed' : ''}`));
      b.addEventListener('click', () => {
        closeSidebar();
        if (!st.session || st.session.id !== s.id) location.hash = `#s=${s.id}`;
      });
      li.append(b);
      ui.sessionList.append(li);
    }
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
      const name = el('span', 'chip-name', file.name);
      const remove = el('button', null, '×');
      remove.type = 'button';
      remove.setAttribute('aria-label', `Remove ${file.name}`);
      remove.addEventListener('click', () => {
        st.attachments = st.attachments.filter((x) => x !== a);
        chip.remove();
      });
      chip.append(name, remove);
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
  }

  async function ensureSession(firstText) {
    if (st.session) return st.session;
    const agent = ui.agentSelect.value;
    if (!agent) throw new ApiError(0, 'no_agent', 'the server has no agents');
    const title = short(firstText, 60) || 'Untitled session';
    const s = await api('POST', '/v1/sessions', { agent, title });
    localStorage.setItem(AGENT_STORE, agent);
    st.session = s;
    st.sessions.unshift(s);
    history.replaceState(null, '', `#s=${s.id}`);
    showHeader();
    ui.emptyHint.hidden = true;
    // A new session has no history: connect and send once the hello is in.
    const ready = waitForHello();
    connect();
    await ready;
    return s;
  }

  function waitForHello() {
    return new Promise((resolve) => {
      const t0 = Date.now();
      const check = () => {
        if (socketOpen() || Date.now() - t0 > 5000) resolve();
        else setTimeout(check, 20);
      };
      check();
    });
  }

  async function send() {
    let text = ui.input.value;
    const attachments = st.attachments.slice();
    if (!text.trim() && !attachments.length) return;
    ui.send.disabled = true;
    try {
      await Promise.all(attachments.map((a) => a.ready));
      const files = attachments.filter((a) => a.kind === 'file');
      const images = attachments.filter((a) => a.kind === 'image' && a.dataUrl).map((a) => a.dataUrl);
      if (!text.trim() && !images.length) text = files.length === 1 ? 'Please look at the attached file.' : 'Please look at the attached files.';
      const session = await ensureSession(text.trim() || attachments.map((a) => a.name).join(', '));
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
      const frame = { type: 'message', content: text };
      if (images.length) frame.images = images;
      if (fileIds.length) frame.files = fileIds;
      const ws = socketOpen();
      if (ws) {
        ws.send(JSON.stringify(frame));
      } else {
        await api('POST', `/v1/sessions/${enc(session.id)}/messages`, {
          content: text,
          images: frame.images,
          files: frame.files,
          wait: false,
        });
      }
      st.lastSent = text;
      ui.input.value = '';
      autosize();
      st.attachments = [];
      ui.attachments.replaceChildren();
      pinned = true;
      follow();
    } catch (e) {
      toast(e.message);
    } finally {
      ui.send.disabled = false;
      ui.input.focus();
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
  });
  ui.input.addEventListener('input', autosize);
  ui.input.addEventListener('paste', (e) => {
    const files = Array.from(e.clipboardData ? e.clipboardData.files : []);
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  ui.fileInput.addEventListener('change', () => {
    addFiles(Array.from(ui.fileInput.files || []));
    ui.fileInput.value = '';
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
      toast(`Cannot reach agentd: ${e.message}`);
      return;
    }
    await refreshSessions();
    const id = sessionFromHash();
    if (id) await openSession(id);
    else newDraft();
  }

  boot();
})();
