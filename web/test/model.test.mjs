// Unit tests of the page's view model (static/model.js) on frames recorded from a real agentd
// (fixtures/session.json, made by ../record-frames.mjs): the live view, a reload (history + the replayed log), and a
// session whose log was pruned (history and run statuses alone) must tell the same story.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';

import '../static/codes.js';
import { Cursor } from '../static/conn.js';
import {
  activeTurn,
  answerText,
  applyEvent,
  derivedTitle,
  describeFailure,
  describeRunError,
  fromHistory,
  loadSession,
  newModel,
  pendingAsks,
  snapshot,
} from '../static/model.js';

const rec = JSON.parse(fs.readFileSync(new URL('./fixtures/session.json', import.meta.url), 'utf8'));
const AGENTS = ['assistant', 'researcher'];
const lastSeq = rec.events[rec.events.length - 1].seq;

/** The live view: every event as it came, from an empty page. */
function live(events = rec.events) {
  const m = newModel({ agents: AGENTS });
  const c = new Cursor();
  for (const ev of events) if (c.accept(ev)) applyEvent(m, ev);
  return m;
}

/** A reload: history and runs first, then the log replayed from after=0. */
function reload({ events = rec.events, expired = false, active = null } = {}) {
  const m = newModel({ agents: AGENTS });
  const cursor = loadSession(m, {
    hello: { type: 'hello', last_seq: lastSeq, active_run_id: active },
    expired,
    messages: rec.messages,
    runs: rec.runs,
    events,
    cursor: new Cursor(),
  });
  return { m, cursor };
}

const statuses = (m) => m.turns.map((t) => t.status);
const userTexts = (m) => m.turns.map((t) => t.user && t.user.text);

test('the recording covers what the page must draw', () => {
  assert.deepEqual(
    rec.runs.map((r) => r.status),
    ['completed', 'completed', 'failed', 'failed', 'cancelled', 'completed', 'completed'],
  );
  const types = new Set(rec.events.map((e) => e.type));
  for (const t of ['thinking_delta', 'thinking_end', 'tool_started', 'tool_finished', 'input_requested', 'input_received', 'run_finished']) {
    assert.ok(types.has(t), `recorded ${t}`);
  }
});

test('a reloaded session looks exactly like the live one did', () => {
  const a = snapshot(live());
  const { m, cursor } = reload();
  assert.deepEqual(snapshot(m), a);
  assert.equal(cursor.last, lastSeq);
});

test('live: one turn per run, in the order sent, with each run\'s final status', () => {
  const m = live();
  assert.deepEqual(statuses(m), rec.runs.map((r) => r.status));
  assert.deepEqual(userTexts(m), [
    'think delegate: calc: 6*7',
    'ask: Which colour should the report use?',
    'fail=500',
    'tokens=30 break_after=10',
    'tokens=200 delay_ms=20',
    'tokens=20 delay_ms=30',
    'tokens=3',
  ]);
  const [think, ask, failed, broken, cancelled, first, queued] = m.turns;
  // Thinking, the subagent call with its own calculator call nested inside.
  const snap = snapshot(m)[0].segs;
  assert.equal(snap[0].kind, 'thinking');
  assert.equal(snap[0].done, true);
  const researcher = snap.find((s) => s.kind === 'tool' && s.tool === 'researcher');
  assert.equal(researcher.state, 'done');
  assert.ok(researcher.sub.some((s) => s.kind === 'tool' && s.tool === 'calculator' && s.result === '42'));
  assert.match(answerText(think), /The result is/);
  // The question and its answer.
  const q = snapshot(m)[1].segs.find((s) => s.kind === 'ask');
  assert.deepEqual(q, { kind: 'ask', question: 'Which colour should the report use?', answer: 'green', state: 'answered' });
  assert.match(answerText(ask), /green/);
  // Failures carry their error; the cut-off stream keeps its partial text and says failed.
  assert.equal(failed.error.code, 'upstream_error');
  assert.equal(broken.error.code, 'upstream_error');
  assert.match(answerText(broken), /^tok0 tok1/);
  assert.ok(!answerText(broken).includes('tok29'));
  assert.match(answerText(cancelled), /^tok0/);
  // The queued message follows the answer it was sent during.
  assert.equal(answerText(first), Array.from({ length: 20 }, (_, i) => `tok${i}`).join(' '));
  assert.equal(answerText(queued), 'tok0 tok1 tok2');
  assert.equal(activeTurn(m), null);
  assert.deepEqual(pendingAsks(m), []);
});

test('history alone (a pruned log) keeps statuses, errors, partial text, questions, answers and tool results', () => {
  const { m } = reload({ events: [], expired: true });
  assert.deepEqual(statuses(m), rec.runs.map((r) => r.status));
  assert.deepEqual(userTexts(m), userTexts(live()));
  const s = snapshot(m);
  assert.equal(s[2].error, 'upstream_error', 'a failed run with no answer still says failed');
  assert.equal(s[3].error, 'upstream_error', 'a cut-off run shows its partial text and failed');
  assert.match(s[3].segs.map((x) => x.text || '').join(''), /^tok0 tok1/);
  assert.equal(s[4].status, 'cancelled');
  const ask = s[1].segs.find((x) => x.kind === 'ask');
  assert.equal(ask.question, 'Which colour should the report use?');
  assert.equal(ask.answer, 'green');
  const calc = JSON.stringify(s[0]);
  assert.match(calc, /"tool":"researcher"/);
  // What history cannot hold (thinking) is the only difference from the live view.
  const strip = (x) => JSON.parse(JSON.stringify(x, (k, v) => (Array.isArray(v) ? v.filter((e) => !e || e.kind !== 'thinking') : v)));
  assert.deepEqual(
    strip(s).map((t) => [t.user, t.status, t.error]),
    strip(snapshot(live())).map((t) => [t.user, t.status, t.error]),
  );
  // No event: the cursor continues after the hello's last_seq.
  assert.equal(reload({ events: [], expired: true }).cursor.last, lastSeq);
});

test('a reconnect that replays what was already applied changes nothing', () => {
  const cut = Math.floor(rec.events.length / 2);
  const m = newModel({ agents: AGENTS });
  const c = new Cursor();
  const feed = (evs) => {
    for (const ev of evs) if (c.accept(ev)) applyEvent(m, ev);
  };
  feed(rec.events.slice(0, cut));
  // The socket dropped and came back with after=<an older seq>: an overlap arrives again.
  feed(rec.events.slice(cut - 20));
  assert.deepEqual(snapshot(m), snapshot(live()));
});

test('a reload mid-run: history of the finished runs plus the running run\'s events', () => {
  // As if the page reloaded while the 6th run streamed: the hello names it; its events arrive from its first.
  const sixth = rec.runs[5].id;
  const firstOf = rec.events.findIndex((e) => e.run_id === sixth);
  const upTo = rec.events.findIndex((e) => e.run_id === sixth && e.type === 'text_delta') + 5;
  const partial = rec.events.slice(firstOf, upTo);
  const runsThen = rec.runs.slice(0, 6).map((r) => (r.id === sixth ? { ...r, status: 'running', error: null } : r));
  const msgsThen = rec.messages.filter((x) => runsThen.some((r) => r.id === x.run_id) && !(x.run_id === sixth && x.role !== 'user'));
  const m = newModel({ agents: AGENTS });
  loadSession(m, { hello: { last_seq: partial.at(-1).seq, active_run_id: sixth }, expired: true, messages: msgsThen, runs: runsThen, events: partial, cursor: new Cursor() });
  const t = m.turns[5];
  assert.equal(t.status, 'running');
  assert.equal(activeTurn(m), t);
  assert.match(answerText(t), /^tok0 tok1 tok2 tok3$/);
  // The message queued meanwhile is its own turn after the running one, marked queued.
  assert.equal(m.turns.length, 7);
  assert.equal(m.turns[6].status, 'queued');
  assert.equal(m.turns[6].user.text, 'tokens=3');
});

test('a message sent during a run is queued until its run starts, and stays after the running turn', () => {
  const first = rec.runs[5].id;
  const second = rec.runs[6].id;
  const queuedMsg = rec.events.findIndex((e) => e.run_id === second && e.type === 'message');
  const m = live(rec.events.slice(0, queuedMsg + 1));
  const [a, b] = m.turns.slice(-2);
  assert.equal(a.runId, first);
  assert.equal(a.status, 'running');
  assert.equal(b.runId, second);
  assert.equal(b.status, 'queued');
  assert.equal(b.user.text, 'tokens=3');
  // The same as a reload sees it: the runs list orders turns, the history puts the message in its own turn.
  const { m: r } = reload({ events: [], expired: true });
  assert.equal(r.turns.findIndex((t) => t.runId === second), r.turns.findIndex((t) => t.runId === first) + 1);
});

test('run_resumed takes back the superseded deltas, and the answer is whole once', () => {
  const base = { run_id: 'r1', agent: 'assistant', is_subagent: false };
  const m = newModel({ agents: AGENTS });
  const evs = [
    { seq: 1, type: 'message', message: { id: 'm1', role: 'user', content: 'hi', run_id: 'r1' } },
    { seq: 2, type: 'run_started', run: { id: 'r1', status: 'running' } },
    { seq: 3, type: 'text_delta', delta: 'Hel' },
    { seq: 4, type: 'text_delta', delta: 'lo wo' },
    { seq: 5, type: 'run_resumed', attempt: 1, discard_from_seq: 3, run: { id: 'r1' } },
    { seq: 6, type: 'text_delta', delta: 'Hello world' },
    { seq: 7, type: 'run_finished', run: { id: 'r1', status: 'completed' }, content: 'Hello world', context_tokens: 10, max_context_tokens: 100 },
  ];
  for (const ev of evs) applyEvent(m, { ...base, ...ev });
  assert.equal(answerText(m.turns[0]), 'Hello world');
  assert.deepEqual(
    snapshot(m)[0].segs.map((s) => s.kind),
    ['note', 'text'],
  );
  assert.deepEqual(m.turns[0].usage, { context: 10, max: 100 });
});

test('a pending question is what the composer answers', () => {
  const ask = rec.runs[1].id;
  const upTo = rec.events.findIndex((e) => e.run_id === ask && e.type === 'input_requested');
  const m = live(rec.events.slice(0, upTo + 1));
  const p = pendingAsks(m);
  assert.equal(p.length, 1);
  assert.equal(p[0].ask.question, 'Which colour should the report use?');
  assert.equal(p[0].turn.status, 'waiting_input');
  assert.ok(p[0].ask.requestId);
});

test('errors are summed up in plain words, the raw text kept as details', () => {
  for (const r of rec.runs.filter((x) => x.error)) {
    const d = describeRunError(r.status, r.error);
    assert.ok(!/[{}]/.test(d.summary), `plain summary: ${d.summary}`);
    assert.ok(d.summary.length < 80, d.summary);
    assert.equal(d.detail, r.error.message);
  }
  assert.match(describeRunError('failed', { code: 'upstream_error', message: 'upstream answered HTTP 500: {"error":...}' }).summary, /HTTP 500/);
  assert.match(describeRunError('interrupted', { code: 'interrupted', message: 'x' }).summary, /interrupted/);
  assert.match(describeFailure({ status: 0, code: 'network', message: 'TypeError: Failed to fetch at ...' }), /Cannot reach/);
  assert.match(describeFailure({ status: 413, code: 'too_large', message: 'content is 9 bytes; the limit is 1' }), /too large/);
  assert.equal(describeRunError('failed', { code: 'made_up', message: '' }).summary, 'The run failed.');
});

test('the title shown at once is the one the server derives', () => {
  assert.equal(derivedTitle('  \n  How do I bake sourdough bread?  \nWith details.'), 'How do I bake sourdough bread?');
  assert.equal(derivedTitle(' \n '), null);
  const t = derivedTitle('ü'.repeat(200));
  assert.equal(Array.from(t).length, 60);
  assert.ok(t.endsWith('…'));
  assert.equal(derivedTitle('x'.repeat(60)), 'x'.repeat(60));
});
