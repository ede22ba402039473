// The transcript's DOM: draws the view model (model.js) and nothing else. Each turn and segment keeps its node;
// a render touches only what changed since the last one (segments carry a version), so streaming costs one
// text update per frame, not a redraw. Never innerHTML: text goes in as text, markdown through markdown.js.

import { copyButton, renderMarkdown } from './markdown.js';
import { answerText, describeRunError, ENDED, waitsForApproval } from './model.js';

const MD_EVERY_MS = 120;
const MD_MAX_LIVE = 200000;

export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

export function pretty(v) {
  if (typeof v === 'string') {
    try {
      return JSON.stringify(JSON.parse(v), null, 2);
    } catch (_) {
      return v;
    }
  }
  return JSON.stringify(v, null, 2);
}

export function short(s, n) {
  s = String(s).replace(/\s+/g, ' ').trim();
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

export function fmtNum(n) {
  return Number(n).toLocaleString('en-US');
}

function button(cls, text, label, onClick) {
  const b = el('button', cls, text);
  b.type = 'button';
  if (label) b.setAttribute('aria-label', label);
  b.addEventListener('click', onClick);
  return b;
}

export class TranscriptView {
  /**
   * `root` holds the turns; `hooks`: {agentName(), onAnswer(turn, ask, text) -> Promise,
   * onDecide(turn, approval, decision, reason), onRetry(turn), onEdit(turn), announce(text), follow()}.
   */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    this.turns = new Map(); // turn key -> {node parts, v, status}
    this.segs = new Map(); // seg id -> {node, v, ...}
    this.sent = new Map(); // ask request id -> the answer typed here
    this.later = null;
  }

  clear() {
    for (const tv of this.turns.values()) tv.node.remove();
    this.turns.clear();
    this.segs.clear();
    clearTimeout(this.later);
  }

  /** Draws the changed turns of `model` (model.dirty), in the model's order. */
  render(model) {
    const dirty = Array.from(model.dirty);
    model.dirty.clear();
    for (const t of dirty) this.renderTurn(model, t);
    // Keep DOM order = model order (a turn only ever appears at the end, so this is usually a no-op).
    let prev = null;
    for (const t of model.turns) {
      const tv = this.turns.get(t.key);
      if (!tv) continue;
      const want = prev ? prev.nextSibling : this.root.firstChild;
      if (tv.node !== want) this.root.insertBefore(tv.node, want);
      prev = tv.node;
    }
    this.last = model.turns[model.turns.length - 1] || null;
    for (const tv of this.turns.values()) tv.regen.hidden = !(tv.turn === this.last && tv.turn.status === 'completed' && tv.turn.user);
  }

  turnView(t) {
    let tv = this.turns.get(t.key);
    if (tv) return tv;
    const node = el('div', 'turn');
    const user = el('div', 'msg user');
    const run = el('div', 'msg assistant run');
    run.dataset.run = t.runId || '';
    const agent = el('div', 'agent-name', this.hooks.agentName());
    const body = el('div', 'run-body');
    const working = el('div', 'working');
    working.setAttribute('role', 'status');
    const errorBox = el('div', 'error-box');
    const footer = el('div', 'run-footer');
    const footStatus = el('span', 'foot-status');
    const usage = el('span', 'usage');
    const actions = el('span', 'run-actions');
    const regen = button('link', 'Regenerate', 'Regenerate this answer', () => this.hooks.onRetry(t));
    actions.append(copyButton('Copy the whole answer', () => answerText(t)), regen);
    footer.append(footStatus, usage, actions);
    run.append(agent, body, working, errorBox, footer);
    node.append(user, run);
    tv = { turn: t, node, user, run, body, working, errorBox, footer, footStatus, usage, actions, regen, v: -1, userKey: null };
    this.turns.set(t.key, tv);
    return tv;
  }

  renderTurn(model, t) {
    const tv = this.turnView(t);
    if (!tv.node.parentNode) this.root.append(tv.node);
    this.renderUser(tv, t);
    tv.run.dataset.status = t.status;
    tv.run.classList.toggle('running', t.status === 'running' || t.status === 'waiting_input');
    this.renderFlow(tv.body, t.main, t);
    this.renderState(tv, t);
    if (tv.status !== t.status) this.announce(tv, t);
    tv.status = t.status;
    this.hooks.follow();
  }

  renderUser(tv, t) {
    const key = `${t.user ? t.user.id : ''}|${t.status === 'queued'}`;
    if (tv.userKey === key) return;
    tv.userKey = key;
    const b = tv.user;
    b.hidden = !t.user;
    b.replaceChildren();
    if (!t.user) return;
    b.dataset.message = t.user.id;
    b.classList.toggle('queued', t.status === 'queued');
    if (t.status === 'queued') b.append(el('span', 'badge queued-badge', 'queued'));
    if (t.user.text) b.append(el('div', 'user-text', t.user.text));
    for (const src of t.user.images) {
      const img = el('img');
      img.alt = 'attached image';
      img.src = src;
      b.append(img);
    }
    if (t.user.files.length) {
      const chips = el('div', 'chips');
      for (const f of t.user.files) chips.append(el('span', 'chip file-chip', f));
      b.append(chips);
    }
    const acts = el('div', 'user-actions');
    acts.append(button('link', 'Edit', 'Edit this message and send it again', () => this.hooks.onEdit(t)));
    b.append(acts);
  }

  renderState(tv, t) {
    // Working indicator: before the first token, between tool calls, while queued.
    const busy = t.status === 'queued' || (t.status === 'running' && t.busySince !== null);
    tv.working.hidden = !busy;
    this.tickWorking(tv, t);
    // Errors: a box with a plain summary, the raw details folded, and Retry.
    const failed = t.status === 'failed' || t.status === 'interrupted';
    tv.errorBox.hidden = !failed;
    if (failed && tv.errorShown !== t.v) {
      tv.errorShown = t.v;
      const { summary, detail } = describeRunError(t.status, t.error);
      tv.errorBox.replaceChildren(el('strong', 'error-title', t.status === 'failed' ? 'Failed' : 'Interrupted'), el('span', 'error-summary', summary));
      if (t.user) tv.errorBox.append(button('primary retry', 'Retry', 'Retry this message', () => this.hooks.onRetry(t)));
      if (detail) {
        const d = el('details', 'error-detail');
        d.append(el('summary', null, 'Details'), el('pre', null, detail));
        tv.errorBox.append(d);
      }
    }
    const ended = ENDED.has(t.status);
    tv.footer.hidden = !ended;
    tv.footStatus.textContent = t.status === 'cancelled' ? 'cancelled' : '';
    tv.footStatus.className = `foot-status status-${t.status}`;
    if (t.usage && t.status === 'completed') {
      const pct = Math.round((100 * t.usage.context) / t.usage.max);
      tv.usage.textContent = `context ${fmtNum(t.usage.context)} / ${fmtNum(t.usage.max)} tokens (${pct}%)`;
    } else {
      tv.usage.textContent = '';
    }
    tv.actions.hidden = !ended || !answerText(t);
  }

  tickWorking(tv, t) {
    if (tv.working.hidden) return;
    if (t.status === 'queued') {
      tv.working.textContent = 'Queued: starts when the turn before it ends';
      return;
    }
    const s = Math.floor((Date.now() - (t.busySince || Date.now())) / 1000);
    tv.working.replaceChildren(el('span', 'dots'), `Working${s >= 1 ? ` · ${s} s` : '…'}`);
  }

  /** Updates the working indicators' seconds (called once a second). */
  tick() {
    for (const tv of this.turns.values()) this.tickWorking(tv, tv.turn);
  }

  announce(tv, t) {
    const say = this.hooks.announce;
    if (t.status === 'completed') say('The answer is complete.');
    else if (t.status === 'cancelled') say('Stopped.');
    else if (t.status === 'failed' || t.status === 'interrupted') say(`${describeRunError(t.status, t.error).summary}`);
    else if (t.status === 'waiting_input') say(waitsForApproval(t) ? 'The agent asks to run a tool: allow or deny it.' : 'The agent asks you a question.');
  }

  renderFlow(box, f, t) {
    const want = new Set();
    let prev = null;
    for (const s of f.segs) {
      const sv = this.segView(s, t);
      want.add(sv.node);
      if (sv.v !== s.v || sv.pending) this.updateSeg(sv, s, t);
      if (s.sub && !sv.sub) {
        sv.sub = el('div', 'sub');
        sv.sub.append(el('div', 'agent-name', s.tool));
        sv.node.insertBefore(sv.sub, sv.result);
      }
      if (sv.sub) this.renderFlow(sv.sub, s.sub || { segs: [] }, t);
      const at = prev ? prev.nextSibling : sv.firstSlot(box);
      if (sv.node !== at) box.insertBefore(sv.node, at);
      prev = sv.node;
    }
    for (const c of Array.from(box.children)) if (c.dataset.seg && !want.has(c)) c.remove();
  }

  segView(s, t) {
    let sv = this.segs.get(s.id);
    if (sv) return sv;
    const first = (box) => {
      // Segments follow any fixed header in the box (a nested agent's name).
      let n = box.firstChild;
      while (n && !(n.dataset && n.dataset.seg)) n = n.nextSibling;
      return n;
    };
    sv = { v: -1, firstSlot: first };
    if (s.kind === 'text') {
      sv.node = el('div', 'text md');
      sv.lastMd = 0;
    } else if (s.kind === 'thinking') {
      const d = el('details', 'thinking');
      d.open = true;
      sv.summary = el('summary', null, 'Thinking…');
      sv.text = document.createTextNode('');
      const body = el('div', 'body');
      body.append(sv.text);
      d.append(sv.summary, body);
      sv.summary.addEventListener('click', () => {
        sv.touched = true;
      });
      sv.node = d;
    } else if (s.kind === 'tool') {
      const d = el('details', 'tool running');
      d.dataset.call = s.callId || '';
      d.dataset.tool = s.tool;
      const summary = el('summary');
      sv.state = el('span', 'tool-state');
      summary.append(el('span', 'tool-name', s.tool), ' ', el('span', 'muted', short(pretty(s.args ?? {}), 60)), sv.state);
      const args = el('div', 'section');
      args.append(el('div', 'label', 'arguments'), el('pre', 'args', pretty(s.args ?? {})));
      sv.result = el('div', 'section result');
      sv.result.hidden = true;
      d.append(summary, args, sv.result);
      if (s.isAgent) {
        d.open = true;
        sv.sub = el('div', 'sub');
        sv.sub.append(el('div', 'agent-name', s.tool));
        d.insertBefore(sv.sub, sv.result);
      }
      sv.node = d;
    } else if (s.kind === 'ask') {
      sv.node = el('div', 'ask');
      sv.node.dataset.request = s.requestId || '';
    } else if (s.kind === 'approval') {
      sv.node = el('div', 'approval');
      sv.node.dataset.request = s.requestId || '';
      sv.node.dataset.tool = s.tool;
      const head = el('div', 'approval-head');
      head.append(el('span', 'approval-title', 'Allow this tool call?'), ' ', el('code', 'tool-name', s.tool));
      // Text, never markup: the arguments are the model's. Long ones scroll inside the card (app.css).
      const args = el('pre', 'args approval-args', pretty(s.args ?? {}));
      args.tabIndex = 0;
      args.setAttribute('aria-label', `arguments of ${s.tool}`);
      sv.tail = el('div', 'approval-tail');
      sv.err = el('div', 'approval-error');
      sv.err.setAttribute('role', 'alert');
      sv.node.append(head, args, sv.tail, sv.err);
    } else if (s.kind === 'agent') {
      sv.node = el('div', 'sub');
      sv.node.append(el('div', 'agent-name', s.agent));
      sv.sub = sv.node;
    } else {
      sv.node = el('div', 'note', s.text || '');
    }
    sv.node.dataset.seg = String(s.id);
    this.segs.set(s.id, sv);
    return sv;
  }

  updateSeg(sv, s, t) {
    const live = !ENDED.has(t.status);
    if (s.kind === 'text') {
      const now = Date.now();
      if (live && now - sv.lastMd < MD_EVERY_MS) {
        // Markdown is re-rendered at most every MD_EVERY_MS while streaming; the rest comes with a later frame.
        sv.pending = true;
        this.renderLater();
        return;
      }
      sv.pending = false;
      sv.lastMd = now;
      if (live && s.text.length > MD_MAX_LIVE) sv.node.replaceChildren(document.createTextNode(s.text));
      else sv.node.replaceChildren(renderMarkdown(s.text));
    } else if (s.kind === 'thinking') {
      sv.text.data = s.text;
      if (s.done) {
        sv.summary.textContent = 'Thought';
        if (!sv.touched) sv.node.open = false;
      }
    } else if (s.kind === 'tool') {
      const d = sv.node;
      d.classList.toggle('running', s.state === 'running');
      d.classList.toggle('ok', s.success === true);
      d.classList.toggle('failed', s.success === false);
      d.dataset.state = s.state;
      sv.state.textContent = { running: 'running…', approval: 'waiting for approval', done: s.success === true ? 'done' : '', failed: 'failed' }[s.state] ?? s.state;
      if (s.result !== null && s.result !== undefined) {
        sv.result.replaceChildren(el('div', 'label', 'result'), el('pre', 'result-text', String(s.result)));
        sv.result.hidden = false;
      }
    } else if (s.kind === 'ask') {
      this.drawAsk(sv, s, t);
    } else if (s.kind === 'approval') {
      this.drawApproval(sv, s, t);
    } else if (s.kind === 'note') {
      sv.node.textContent = s.text;
    }
    sv.v = s.v;
  }

  drawAsk(sv, s, t) {
    const box = sv.node;
    box.classList.toggle('answered', s.state !== 'pending');
    box.classList.toggle('pending', s.state === 'pending');
    if (sv.drawn === s.state && s.state === 'pending') return;
    sv.drawn = s.state;
    box.replaceChildren(el('div', 'question', s.question));
    if (s.state === 'pending') {
      const form = el('form');
      const input = el('input');
      input.placeholder = 'Your answer (or type it in the message box below)';
      input.setAttribute('aria-label', 'Answer');
      const btn = el('button', 'primary', 'Answer');
      btn.type = 'submit';
      form.append(input, btn);
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        const v = input.value.trim();
        if (!v) return;
        input.disabled = true;
        btn.disabled = true;
        this.hooks.onAnswer(t, s, v).catch(() => {
          input.disabled = false;
          btn.disabled = false;
        });
      });
      box.append(form);
      if (document.activeElement === document.body) input.focus();
      return;
    }
    const answer = s.answer ?? this.sent.get(s.requestId);
    box.append(el('div', 'answer', s.state === 'expired' && answer === undefined ? 'No longer waiting for an answer.' : answer !== undefined && answer !== null ? `Answered: ${answer}` : 'Answered'));
  }

  drawApproval(sv, s, t) {
    const box = sv.node;
    box.dataset.state = s.state;
    for (const c of ['pending', 'allowed', 'denied', 'expired']) box.classList.toggle(c, s.state === c);
    sv.err.textContent = s.error || '';
    sv.err.hidden = !s.error;
    if (s.state === 'pending') {
      if (sv.drawn !== 'pending') {
        sv.drawn = 'pending';
        // No form: Enter in the reason box denies (with the reason), it never allows.
        const actions = el('div', 'approval-actions');
        sv.reason = el('input', 'deny-reason');
        sv.reason.placeholder = 'Reason for denying (optional)';
        sv.reason.setAttribute('aria-label', `Reason for denying ${s.tool} (optional)`);
        const deny = () => this.hooks.onDecide(t, s, 'deny', sv.reason.value.trim());
        sv.reason.addEventListener('keydown', (e) => {
          if (e.key === 'Enter' && !e.isComposing) {
            e.preventDefault();
            deny();
          }
        });
        sv.allow = button('primary allow', 'Allow', `Allow ${s.tool}`, () => this.hooks.onDecide(t, s, 'allow', ''));
        sv.deny = button('deny', 'Deny', `Deny ${s.tool}`, deny);
        sv.sending = el('span', 'muted approval-sending');
        actions.append(sv.allow, sv.deny, sv.reason, sv.sending);
        sv.tail.replaceChildren(actions);
      }
      for (const c of [sv.allow, sv.deny, sv.reason]) c.disabled = Boolean(s.sending);
      sv.sending.textContent = s.sending ? `Sending “${s.sending}”…` : '';
      return;
    }
    sv.drawn = s.state;
    const reason = s.reason ? `: ${s.reason}` : '';
    const text = { allowed: `Allowed${reason}`, denied: `Denied${reason}`, expired: 'Not decided: the run ended first.' }[s.state] ?? s.state;
    sv.tail.replaceChildren(el('div', 'approval-decision', text));
  }

  renderLater() {
    if (this.later) return;
    this.later = setTimeout(() => {
      this.later = null;
      for (const tv of this.turns.values()) {
        let again = false;
        for (const sv of this.segs.values()) if (sv.pending) again = true;
        if (again) {
          this.renderFlow(tv.body, tv.turn.main, tv.turn);
          this.hooks.follow();
        }
      }
    }, MD_EVERY_MS);
  }
}
