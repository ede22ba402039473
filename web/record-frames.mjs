// Records the frames the unit tests replay: a real agentd (harness.mjs) against the mock upstream, one session
// whose turns cover every state the page draws (thinking, tools, a subagent, ask_human and its answer, an
// upstream error, a stream cut off mid-answer, a cancelled turn, a message queued behind a running one), then
// the session's whole event log (SSE, after=0), its stored messages and its runs.
//
//   cd web && AGENTD_BIN=... node record-frames.mjs     # writes test/fixtures/session.json
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Agentd } from './e2e/harness.mjs';
import { startMock } from './e2e/mock-upstream.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Every event of a session's log as SSE delivers it (`after=0`), until `until(events)` holds. */
async function readEvents(server, id, until) {
  const ctrl = new AbortController();
  const res = await fetch(`${server.url}/v1/sessions/${id}/events?after=0`, { signal: ctrl.signal });
  const events = [];
  const dec = new TextDecoder();
  let buf = '';
  const reader = res.body.getReader();
  const deadline = Date.now() + 20000;
  while (!until(events) && Date.now() < deadline) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = block
        .split('\n')
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).trim())
        .join('\n');
      if (data) events.push(JSON.parse(data));
    }
  }
  ctrl.abort();
  return events;
}

async function waitRun(server, id, runId, pred) {
  for (let i = 0; i < 400; i++) {
    const r = (await server.api('GET', `/v1/sessions/${id}/runs/${runId}`)).body;
    if (pred(r)) return r;
    await sleep(50);
  }
  throw new Error(`run ${runId} never reached the state`);
}

const send = async (server, id, content) => (await server.api('POST', `/v1/sessions/${id}/messages`, { content, wait: false })).body.run;
const ended = (r) => ['completed', 'cancelled', 'failed', 'interrupted'].includes(r.status);

const mock = await startMock();
const server = new Agentd('record', { upstream: mock.url });
await server.start();
try {
  const id = (await server.api('POST', '/v1/sessions', { agent: 'assistant' })).body.id;
  // 1. thinking, a subagent and its tool
  let run = await send(server, id, 'think delegate: calc: 6*7');
  await waitRun(server, id, run.id, ended);
  // 2. ask_human, answered
  run = await send(server, id, 'ask: Which colour should the report use?');
  await waitRun(server, id, run.id, (r) => r.status === 'waiting_input');
  const evs = await readEvents(server, id, (e) => e.some((x) => x.type === 'input_requested' && x.run_id === run.id));
  const asked = evs.find((x) => x.type === 'input_requested' && x.run_id === run.id);
  await server.api('POST', `/v1/sessions/${id}/runs/${run.id}/input`, { request_id: asked.request_id, content: 'green' });
  await waitRun(server, id, run.id, ended);
  // 3. the upstream answers an error
  run = await send(server, id, 'fail=500');
  await waitRun(server, id, run.id, ended);
  // 4. the upstream's stream breaks mid-answer
  run = await send(server, id, 'tokens=30 break_after=10');
  await waitRun(server, id, run.id, ended);
  // 5. cancelled mid-answer
  run = await send(server, id, 'tokens=200 delay_ms=20');
  await sleep(400);
  await server.api('POST', `/v1/sessions/${id}/runs/${run.id}/cancel`, {});
  await waitRun(server, id, run.id, ended);
  // 6. a message queued behind a running turn
  const first = await send(server, id, 'tokens=20 delay_ms=30');
  await sleep(150);
  const queued = await send(server, id, 'tokens=3');
  await waitRun(server, id, first.id, ended);
  await waitRun(server, id, queued.id, ended);

  const runs = (await server.api('GET', `/v1/sessions/${id}/runs`)).body;
  const finished = (e) => e.filter((x) => x.type === 'run_finished').length === runs.length;
  const events = await readEvents(server, id, finished);
  const messages = (await server.api('GET', `/v1/sessions/${id}/messages`)).body;
  const out = path.join(here, 'test', 'fixtures', 'session.json');
  fs.writeFileSync(out, `${JSON.stringify({ note: 'recorded by test/record.mjs', events, messages, runs }, null, 1)}\n`);
  console.log(`${events.length} events, ${messages.length} messages, ${runs.length} runs -> ${out}`);
  console.log(runs.map((r) => `${r.status}${r.error ? ` (${r.error.code}: ${r.error.message})` : ''}`).join('\n'));
} finally {
  await server.dispose();
  await mock.close();
}
