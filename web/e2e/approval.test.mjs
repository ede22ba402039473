// Browser end-to-end tests of tool-call approvals (SPEC.md section 7, issue 17): the agent `guarded` must have its
// calculator calls approved. The page shows a card with the tool and its arguments and Allow / Deny; the decision
// goes over the WebSocket; the card shows the decision, also one made elsewhere; a reload or a session switch
// redraws it from the log; a refused decision (409) is said plainly. Real agentd, real Chromium, the mock upstream.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { Agentd, openPage, shot } from './harness.mjs';
import { freshPage, send, sessionIdOf, suite, waitRunStatus } from './page.mjs';

const T = { timeout: 120000 };
const GUARDED = `
[[agents]]
name = "guarded"
description = "Asks before it calculates"
provider = "mock"
model = "mock-model"
system_prompt = "You are careful."
tools = ["calculator"]
approve = ["calc*"]
`;
const env = suite('approval', { extra: GUARDED });

/** A page talking to the `guarded` agent. */
async function page(t) {
  const p = await freshPage(t, env.browser, env.server);
  await p.selectOption('#agent-select', 'guarded');
  return p;
}

const card = (p) => p.locator('#transcript .turn:last-child .approval');
const lastRunText = (p) => p.locator('#transcript .turn:last-child .run-body').textContent();
const clean = (p) => assert.deepEqual(p.problems, [], 'external requests or console errors');

/** The session's runs' statuses, oldest first. */
async function runStatuses(id) {
  const runs = (await env.server.api('GET', `/v1/sessions/${id}/runs`)).body;
  return runs.map((r) => r.status);
}

/** Waits for the last turn's card to be pending; returns its request id. */
async function pendingCard(p) {
  await p.waitForSelector('#transcript .turn:last-child .approval.pending');
  return card(p).getAttribute('data-request');
}

describe('approvals', () => {
  test('a card shows the tool and its arguments; Allow runs the tool and the answer arrives', T, async (t) => {
    const p = await page(t);
    await send(p, 'calc: 6*7');
    await pendingCard(p);
    await waitRunStatus(p, 'waiting_input');
    assert.equal(await card(p).locator('.tool-name').textContent(), 'calculator');
    assert.equal(await card(p).locator('.approval-args').textContent(), '{\n  "expression": "6*7"\n}');
    assert.ok(await p.isVisible('#ask-banner'));
    assert.match(await p.textContent('#ask-banner'), /approval to run calculator/);
    assert.match(await p.textContent('details.tool[data-tool="calculator"] .tool-state'), /waiting for approval/);
    await shot(p, '40-approval-pending');
    await card(p).locator('button.allow').click();
    await waitRunStatus(p, 'completed');
    await p.waitForFunction(() => /The result is 42\./.test(document.querySelector('#transcript .turn:last-child .run-body').textContent));
    assert.equal(await card(p).locator('.approval-decision').textContent(), 'Allowed');
    assert.ok(await card(p).evaluate((c) => c.classList.contains('allowed')));
    assert.equal(await card(p).locator('button').count(), 0, 'decided: no buttons');
    assert.equal(await p.textContent('details.tool[data-tool="calculator"] .result-text'), '42');
    assert.ok(await p.isHidden('#ask-banner'));
    await shot(p, '41-approval-allowed');
    clean(p);
  });

  test('Deny with a reason: the model gets the denial; arguments show as text, never markup; long ones scroll', T, async (t) => {
    const p = await page(t);
    const expr = `<img src=x onerror="window.__xss=1"> ${'1+'.repeat(3000)}1`;
    await send(p, `calc: ${expr}`);
    await pendingCard(p);
    assert.equal(await card(p).locator('.approval-args').textContent(), JSON.stringify({ expression: expr }, null, 2));
    assert.equal(await card(p).locator('.approval-args img').count(), 0);
    const box = await card(p).locator('.approval-args').evaluate((e) => ({ client: e.clientHeight, scroll: e.scrollHeight }));
    assert.ok(box.client <= 240 && box.scroll > box.client, `long arguments scroll inside the card: ${JSON.stringify(box)}`);
    await card(p).locator('.deny-reason').fill('not on my watch');
    await card(p).locator('button.deny').click();
    await waitRunStatus(p, 'completed');
    assert.equal(await card(p).locator('.approval-decision').textContent(), 'Denied: not on my watch');
    assert.match(await lastRunText(p), /The result is the call was denied and did not run: not on my watch\./);
    // The model was told: the tool result it got is the denial.
    const toolMsgs = env.mock.requests.flatMap((r) => r.messages).filter((m) => m.role === 'tool');
    assert.ok(toolMsgs.some((m) => /denied and did not run: not on my watch/.test(m.content)), JSON.stringify(toolMsgs));
    assert.equal(await p.evaluate(() => window.__xss), undefined);
    await shot(p, '42-approval-denied');
    clean(p);
  });

  test('a reload or a session switch while pending redraws the card, still answerable; decided cards keep their decision', T, async (t) => {
    const p = await page(t);
    await send(p, 'calc: 1+1');
    await pendingCard(p);
    await card(p).locator('button.deny').click();
    await waitRunStatus(p, 'completed');
    await send(p, 'calc: 2+3');
    const id = await pendingCard(p);
    await p.reload();
    assert.equal(await pendingCard(p), id, 'the same request after a reload');
    await waitRunStatus(p, 'waiting_input');
    assert.equal(await p.locator('#transcript .approval').first().locator('.approval-decision').textContent(), 'Denied');
    const session = sessionIdOf(p);
    await p.click('#new-session');
    await p.waitForFunction(() => document.querySelectorAll('#transcript .turn').length === 0);
    await p.click(`#session-list button[data-session="${session}"]`);
    assert.equal(await pendingCard(p), id, 'the same request after switching back');
    await shot(p, '43-approval-reloaded');
    await card(p).locator('button.allow').click();
    await waitRunStatus(p, 'completed');
    await p.waitForFunction(() => /The result is 5\./.test(document.querySelector('#transcript .turn:last-child .run-body').textContent));
    assert.equal(await card(p).locator('.approval-decision').textContent(), 'Allowed');
    // And once more from the log: both decisions.
    await p.reload();
    await waitRunStatus(p, 'completed');
    assert.deepEqual(await p.locator('#transcript .approval-decision').allTextContents(), ['Denied', 'Allowed']);
    assert.deepEqual(await runStatuses(session), ['completed', 'completed']);
    clean(p);
  });

  test('a request nobody answers is denied at the time limit, and the card says so', T, async (t) => {
    // A server of its own whose time limit is 2 s.
    const quick = new Agentd('approval-timeout', { upstream: env.mock.url, extra: GUARDED, askTimeoutS: 2 });
    t.after(() => quick.dispose());
    await quick.start();
    const { context, page: p } = await openPage(env.browser, quick);
    t.after(() => context.close());
    await p.goto(`${quick.url}/`);
    await p.waitForSelector('body[data-ready]', { state: 'attached' });
    await p.selectOption('#agent-select', 'guarded');
    await send(p, 'calc: 7*7');
    await pendingCard(p);
    await p.waitForSelector('#transcript .turn:last-child .approval.denied');
    assert.equal(await card(p).locator('.approval-decision').textContent(), 'Denied: no decision within 2 s');
    await waitRunStatus(p, 'completed');
    assert.match(await lastRunText(p), /The result is the call was denied and did not run: no decision within 2 s\./);
    clean(p);
  });

  test('a decision made elsewhere shows on the card; answering after it is refused plainly (409)', T, async (t) => {
    const p = await page(t);
    // A second page on the same session whose socket delivers no event after the approval request (errors
    // still come through): its card stays pending, so its click comes after the decision, as when two people
    // answer at once.
    const q = await freshPage(t, env.browser, env.server);
    await q.routeWebSocket(/\/ws/, (ws) => {
      const server = ws.connectToServer();
      let frozen = false;
      server.onMessage((m) => {
        const f = JSON.parse(String(m));
        if (frozen && typeof f.seq === 'number') return;
        if (f.type === 'approval_requested') frozen = true;
        ws.send(m);
      });
    });
    await send(p, 'calc: 3*3');
    const request = await pendingCard(p);
    const session = sessionIdOf(p);
    await q.goto(`${env.server.url}/#s=${session}`);
    await q.waitForSelector('#transcript .approval.pending');
    // Another client denies over REST.
    const run = await p.locator('#transcript .turn:last-child .run').getAttribute('data-run');
    const path = `/v1/sessions/${session}/runs/${run}/approvals/${request}`;
    assert.equal((await env.server.api('POST', path, { decision: 'deny', reason: 'decided elsewhere' })).status, 200);
    await p.waitForSelector('#transcript .turn:last-child .approval.denied');
    assert.equal(await card(p).locator('.approval-decision').textContent(), 'Denied: decided elsewhere');
    await waitRunStatus(p, 'completed');
    // The second page answers late: the server says 409 (over the socket), the card says so.
    await q.locator('#transcript .approval button.allow').click();
    await q.waitForSelector('#transcript .approval .approval-error:not([hidden])');
    assert.match(await q.textContent('#transcript .approval .approval-error'), /Already decided/);
    await shot(q, '44-approval-conflict');
    // Over REST, the same answer is a 409 too.
    assert.equal((await env.server.api('POST', path, { decision: 'allow' })).status, 409);
    clean(p);
    clean(q);
  });
});
