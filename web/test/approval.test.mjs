// Unit tests of tool-call approvals in the page's view model (static/model.js, SPEC.md section 7): a call whose
// tool needs approval logs `approval_requested {request_id, call_id, tool, args}` (the run `waiting_input`), then
// `approval_resolved {request_id, decision, reason}` whoever decided (this page, another client, the time limit).
// The events are written here in the shapes the server logs (agentd-core event.rs).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import '../static/codes.js';
import { Cursor } from '../static/conn.js';
import {
  activeTurn,
  applyEvent,
  approvalFailed,
  approvalSending,
  describeApprovalFailure,
  loadSession,
  newModel,
  pendingApprovals,
  pendingAsks,
  snapshot,
  waitsForApproval,
} from '../static/model.js';

const RUN = 'run-1';
const base = { run_id: RUN, agent: 'assistant', is_subagent: false };
const ARGS = { path: 'notes.txt', text: '<b>hi</b>\n'.repeat(3) };

/** A run that asks to call `calculator`, in seq order from `seq`; `decision` adds its resolution and the end. */
function events({ decision = null, reason = null, requestId = 'req-1', end = true } = {}) {
  let seq = 0;
  const ev = (type, fields) => ({ seq: ++seq, ...base, type, ...fields });
  const out = [
    ev('message', { message: { id: 'm1', role: 'user', content: 'write it' } }),
    ev('run_started', { run: { id: RUN, status: 'running' } }),
    ev('tool_started', { call_id: 'call_1', tool: 'calculator', args: ARGS, step: 1 }),
    ev('approval_requested', { request_id: requestId, call_id: 'call_1', tool: 'calculator', args: ARGS }),
  ];
  if (!decision) return out;
  out.push(ev('approval_resolved', { request_id: requestId, decision, reason }));
  const allowed = decision === 'allow';
  const result = allowed ? '42' : `the call was denied and did not run${reason ? `: ${reason}` : ''}`;
  out.push(ev('tool_finished', { call_id: 'call_1', tool: 'calculator', args: ARGS, result, success: allowed, step: 1 }));
  if (end) out.push(ev('run_finished', { run: { id: RUN, status: 'completed' }, content: `The result is ${result}.` }));
  return out;
}

function live(evs) {
  const m = newModel({ agents: ['assistant'] });
  const c = new Cursor();
  for (const e of evs) if (c.accept(e)) applyEvent(m, e);
  return m;
}

/** A reload: the stored history (the user message; the run) and the log replayed from after=0. */
function reload(evs, runStatus) {
  const m = newModel({ agents: ['assistant'] });
  loadSession(m, {
    hello: { type: 'hello', last_seq: evs[evs.length - 1].seq, active_run_id: runStatus === 'waiting_input' ? RUN : null },
    expired: false,
    messages: [{ id: 'm1', role: 'user', content: 'write it', run_id: RUN }],
    runs: [{ id: RUN, status: runStatus }],
    events: evs,
    cursor: new Cursor(),
  });
  return m;
}

const approvals = (m) => snapshot(m)[0].segs.filter((s) => s.kind === 'approval');
const tool = (m) => snapshot(m)[0].segs.find((s) => s.kind === 'tool');

test('a request shows as a pending card with the tool and its arguments, after its tool call', () => {
  const m = live(events());
  const [turn] = m.turns;
  assert.equal(turn.status, 'waiting_input');
  assert.equal(turn.busySince, null, 'no working indicator while waiting for a person');
  assert.deepEqual(approvals(m), [{ kind: 'approval', tool: 'calculator', args: ARGS, state: 'pending', reason: null }]);
  assert.deepEqual(snapshot(m)[0].segs.map((s) => s.kind), ['tool', 'approval']);
  assert.equal(tool(m).state, 'approval', 'the call itself says it waits');
  const pending = pendingApprovals(m);
  assert.equal(pending.length, 1);
  assert.equal(pending[0].approval.requestId, 'req-1');
  assert.equal(pending[0].turn, turn);
  assert.ok(waitsForApproval(turn));
  assert.deepEqual(pendingAsks(m), [], 'not a question: typing does not answer it');
  assert.equal(activeTurn(m), turn);
});

test('allowed: the card shows the decision and the call runs on', () => {
  const evs = events({ decision: 'allow' });
  const m = live(evs.slice(0, -2));
  assert.deepEqual(approvals(m), [{ kind: 'approval', tool: 'calculator', args: ARGS, state: 'allowed', reason: null }]);
  assert.equal(m.turns[0].status, 'running');
  assert.equal(tool(m).state, 'running');
  assert.deepEqual(pendingApprovals(m), []);
  const done = live(evs);
  assert.equal(done.turns[0].status, 'completed');
  assert.equal(tool(done).state, 'done');
  assert.equal(approvals(done)[0].state, 'allowed');
});

test('denied with a reason, by this page, another client or the time limit: the card shows why', () => {
  for (const reason of ['too risky', 'no decision within 120 s', null]) {
    const m = live(events({ decision: 'deny', reason }));
    assert.deepEqual(approvals(m), [{ kind: 'approval', tool: 'calculator', args: ARGS, state: 'denied', reason }]);
    assert.equal(tool(m).state, 'failed', 'a denied call never ran');
    assert.equal(m.turns[0].status, 'completed');
  }
});

test('a reload redraws cards from the log: a pending one still answerable, a decided one with its decision', () => {
  const pendingEvs = events();
  const m = reload(pendingEvs, 'waiting_input');
  assert.deepEqual(snapshot(m), snapshot(live(pendingEvs)));
  assert.equal(pendingApprovals(m).length, 1);
  assert.equal(pendingApprovals(m)[0].approval.requestId, 'req-1');
  const decided = events({ decision: 'deny', reason: 'not today' });
  const r = reload(decided, 'completed');
  assert.deepEqual(snapshot(r), snapshot(live(decided)));
  assert.equal(approvals(r)[0].state, 'denied');
  assert.equal(approvals(r)[0].reason, 'not today');
});

test('a run that ends while a card is pending (cancelled) leaves it undecided, not answerable', () => {
  const evs = events();
  evs.push({ seq: evs.length + 1, ...base, type: 'run_finished', run: { id: RUN, status: 'cancelled' }, content: '' });
  const m = live(evs);
  assert.equal(approvals(m)[0].state, 'expired');
  assert.equal(tool(m).state, 'cancelled');
  assert.deepEqual(pendingApprovals(m), []);
  assert.equal(approvalSending(m, 'req-1', 'allow'), false, 'nothing to send');
});

test('sending a decision marks the card; a refusal (409) is shown and it can be answered again', () => {
  const m = live(events());
  assert.equal(approvalSending(m, 'nope', 'allow'), false);
  assert.equal(approvalSending(m, 'req-1', 'allow'), true);
  const a = pendingApprovals(m)[0].approval;
  assert.equal(a.sending, 'allow');
  assert.ok(m.dirty.has(m.turns[0]), 'redrawn');
  const msg = describeApprovalFailure({ code: 'conflict', message: 'the approval `req-1` was already decided' });
  assert.match(msg, /Already decided/);
  assert.equal(approvalFailed(m, 'req-1', msg), true);
  assert.equal(a.sending, null);
  assert.equal(a.error, msg);
  assert.equal(a.state, 'pending');
  // The decision that won arrives: the card shows it, the error goes.
  const seq = events().length;
  applyEvent(m, { seq: seq + 1, ...base, type: 'approval_resolved', request_id: 'req-1', decision: 'allow', reason: null });
  assert.equal(a.state, 'allowed');
  assert.equal(a.error, null);
  assert.match(describeApprovalFailure({ status: 0 }), /Cannot reach/);
  assert.match(describeApprovalFailure({ code: 'not_found', message: '' }), /no longer knows/);
});

test('a run resumed after a restart keeps waiting for the decision it was waiting for', () => {
  const evs = events();
  evs.push({ seq: evs.length + 1, ...base, type: 'run_resumed', attempt: 1, discard_from_seq: evs.length + 1 });
  const m = live(evs);
  assert.equal(m.turns[0].status, 'waiting_input');
  assert.equal(m.turns[0].busySince, null);
  assert.equal(pendingApprovals(m).length, 1, 'still answerable');
  applyEvent(m, { seq: evs.length + 1, ...base, type: 'approval_resolved', request_id: 'req-1', decision: 'allow', reason: null });
  assert.equal(m.turns[0].status, 'running');
});

test('two calls waiting at once each get a card; the run waits until both are decided', () => {
  const evs = events();
  let seq = evs.length;
  const ev = (type, fields) => ({ seq: ++seq, ...base, type, ...fields });
  evs.push(
    ev('tool_started', { call_id: 'call_2', tool: 'read_file', args: { path: 'a' }, step: 1 }),
    ev('approval_requested', { request_id: 'req-2', call_id: 'call_2', tool: 'read_file', args: { path: 'a' } }),
    ev('approval_resolved', { request_id: 'req-1', decision: 'allow', reason: null }),
  );
  const m = live(evs);
  assert.equal(m.turns[0].status, 'waiting_input', 'one still waits');
  assert.deepEqual(pendingApprovals(m).map((x) => x.approval.tool), ['read_file']);
  applyEvent(m, ev('approval_resolved', { request_id: 'req-2', decision: 'deny', reason: null }));
  assert.equal(m.turns[0].status, 'running');
  // A request logged again (never expected) keeps its one card.
  applyEvent(m, ev('approval_requested', { request_id: 'req-2', call_id: 'call_2', tool: 'read_file', args: { path: 'a' } }));
  assert.equal(approvals(m).length, 2);
});
