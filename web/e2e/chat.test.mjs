// Browser end-to-end tests of the web chat page: real agentd binary, real Chromium, mock upstream.
// Screenshots land in web/test-results/ (kept as test artifacts).
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Agentd, API_KEY, gradientPng, shot, tokens } from './harness.mjs';
import { freshPage, send, sessionIdOf, suite, waitRunStatus } from './page.mjs';

const T = { timeout: 90000 };
const env = suite('main');

/** The page of a fresh context with agentd's page loaded and its agents listed (`opts.server`: another agentd). */
const page = (t, opts = {}) => freshPage(t, env.browser, opts.server || env.server, opts);

/** The own text (not thinking, tools or subagents) of the last run block. */
async function lastRunText(p) {
  return p.evaluate(() => {
    const runs = document.querySelectorAll('#transcript .run');
    const body = runs[runs.length - 1].querySelector('.run-body');
    return Array.from(body.children)
      .filter((c) => c.classList.contains('text'))
      .map((c) => c.textContent)
      .join('');
  });
}

async function lastRunStatus(p) {
  return p.evaluate(() => {
    const runs = document.querySelectorAll('#transcript .run');
    return runs[runs.length - 1].dataset.status;
  });
}

async function lastRunFooter(p) {
  return p.evaluate(() => {
    const runs = document.querySelectorAll('#transcript .run');
    return runs[runs.length - 1].querySelector('.run-footer').textContent;
  });
}

async function waitText(p, needle) {
  await p.waitForFunction(
    (n) => {
      const runs = document.querySelectorAll('#transcript .run');
      const last = runs[runs.length - 1];
      return Boolean(last && last.querySelector('.run-body').textContent.includes(n));
    },
    needle,
  );
}

function assertClean(p) {
  assert.deepEqual(p.problems, [], 'the page made external requests or logged errors');
}

describe('web chat page', () => {
  test('sends a message and streams the answer', T, async (t) => {
    const p = await page(t);
    await shot(p, '00-empty');
    await send(p, 'tokens=40 delay_ms=40');
    await p.waitForSelector('.msg.user >> text=tokens=40 delay_ms=40');
    await waitText(p, 'tok3 ');
    // Mid-answer: part of the text is there and the run is still going.
    const partial = await lastRunText(p);
    assert.ok(tokens(40).startsWith(partial), `partial text is a prefix: ${partial}`);
    assert.ok(!partial.includes('tok39'), 'the answer arrived in pieces, not at once');
    assert.equal(await lastRunStatus(p), 'running');
    assert.ok(await p.isVisible('#stop'), 'Stop shows while a turn runs');
    await shot(p, '01-streaming');
    await waitRunStatus(p, 'completed');
    assert.equal(await lastRunText(p), tokens(40));
    assert.match(await lastRunFooter(p), /context \d[\d,]* \/ [\d,]+ tokens/);
    assert.ok(await p.isHidden('#stop'));
    assert.match(await p.textContent('#ctx-usage'), /% context/);
    // The session is listed under its first message.
    await p.waitForSelector('#session-list li.current >> text=tokens=40 delay_ms=40');
    const id = sessionIdOf(p);
    const msgs = (await env.server.api('GET', `/v1/sessions/${id}/messages`)).body;
    assert.equal(msgs.at(-1).content, tokens(40), 'the page shows what was stored');
    await shot(p, '02-completed');
    assertClean(p);
  });

  test('a reload mid-answer shows the whole partial answer and continues live', T, async (t) => {
    const p = await page(t);
    await send(p, 'tokens=100 delay_ms=40');
    await waitText(p, 'tok5 ');
    const before = await lastRunText(p);
    await p.reload();
    await p.waitForSelector('#transcript .run');
    await waitText(p, 'tok0 tok1 tok2');
    // Right after the reload: everything streamed so far is back, and it keeps coming.
    const rebuilt = await lastRunText(p);
    assert.ok(rebuilt.startsWith(before.trim()), `rebuilt text ${rebuilt} starts with ${before}`);
    assert.ok(!rebuilt.includes('tok99'), 'the reload happened mid-answer');
    await shot(p, '03-after-reload-mid-answer');
    await waitRunStatus(p, 'completed');
    assert.equal(await lastRunText(p), tokens(100), 'the whole answer, each token once');
    assert.equal(await p.locator('#transcript .msg.user').count(), 1);
    assert.equal(await p.locator('#transcript .run').count(), 1);
    await shot(p, '04-after-reload-completed');
    assertClean(p);
  });

  test('Stop cancels the turn', T, async (t) => {
    const p = await page(t);
    await send(p, 'tokens=400 delay_ms=25');
    await waitText(p, 'tok3 ');
    await p.click('#stop');
    await waitRunStatus(p, 'cancelled');
    const text = await lastRunText(p);
    assert.ok(tokens(400).startsWith(text) && !text.includes('tok399'), `kept a partial answer: ${text}`);
    assert.match(await lastRunFooter(p), /cancelled/);
    assert.ok(await p.isHidden('#stop'));
    const id = sessionIdOf(p);
    const runs = (await env.server.api('GET', `/v1/sessions/${id}/runs`)).body;
    assert.deepEqual(
      runs.map((r) => r.status),
      ['cancelled'],
    );
    await shot(p, '05-stopped');
    assertClean(p);
  });

  test('a message the server refuses comes back into the input', T, async (t) => {
    const p = await page(t);
    await send(p, 'tokens=3');
    await waitRunStatus(p, 'completed');
    // An unknown skill: the socket answers {type: "error", code: "invalid_request"} and stores nothing.
    const refused = '@skill:nope write me a poem';
    await p.fill('#input', refused);
    await p.press('#input', 'Enter');
    await p.waitForSelector('#toast:not([hidden])');
    // The toast says why in words (the server's message, no code), and the draft is back, ready to fix.
    assert.match(await p.textContent('#toast'), /nope/);
    assert.ok(!/invalid_request/.test(await p.textContent('#toast')));
    assert.equal(await p.inputValue('#input'), refused);
    assert.equal(await p.locator('#transcript .msg.user').count(), 1, 'nothing was stored');
    assertClean(p);
  });

  test('an ask_human question is answered inline', T, async (t) => {
    const p = await page(t);
    await send(p, 'ask: Which colour should the report use?');
    await p.waitForSelector('.ask .question >> text=Which colour should the report use?');
    await waitRunStatus(p, 'waiting_input');
    await shot(p, '06-ask-human');
    // The question outlives a reload: the replayed run asks it again.
    await p.reload();
    await p.waitForSelector('.ask .question >> text=Which colour should the report use?');
    await waitRunStatus(p, 'waiting_input');
    assert.equal(await p.locator('.ask').count(), 1);
    await p.fill('.ask input', 'green');
    await p.click('.ask button');
    await waitRunStatus(p, 'completed');
    await waitText(p, 'The result is green.');
    assert.match(await p.textContent('.ask'), /Answered: green/);
    // The tool call shows its arguments and its result.
    const tool = p.locator('details.tool[data-tool="ask_human"]');
    assert.match(await tool.textContent(), /Which colour should the report use\?/);
    assert.match(await tool.locator('.result-text').textContent(), /^green$/);
    await tool.evaluate((d) => {
      d.open = true;
    });
    await shot(p, '07-ask-human-answered');
    assertClean(p);
  });

  test('uploads a file and an image with a message', T, async (t) => {
    const p = await page(t);
    await p.setInputFiles('#file-input', [
      { name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('The launch code is 4711.') },
      { name: 'gradient.png', mimeType: 'image/png', buffer: gradientPng() },
    ]);
    await p.waitForSelector('#attachments .file-chip >> text=notes.txt');
    await p.waitForSelector('#attachments .image-chip img');
    await p.fill('#input', 'readfile');
    await shot(p, '08-attachments-before-send');
    const requestsBefore = env.mock.requests.length;
    await p.press('#input', 'Enter');
    await waitRunStatus(p, 'completed');
    await waitText(p, 'The result is The launch code is 4711..');
    // The user's bubble shows the file and the image; the composer is empty again.
    await p.waitForSelector('.msg.user .file-chip >> text=notes.txt');
    await p.waitForSelector('.msg.user img[src^="data:image/png;base64,"]');
    assert.equal(await p.locator('#attachments .chip').count(), 0);
    // The upstream got the image, and the read_file call read the uploaded file.
    const first = env.mock.requests[requestsBefore];
    const userMsg = first.messages.filter((m) => m.role === 'user').at(-1);
    assert.ok(
      Array.isArray(userMsg.content) && userMsg.content.some((part) => part.type === 'image_url'),
      `the image reached the upstream: ${JSON.stringify(userMsg.content).slice(0, 300)}`,
    );
    const tool = p.locator('details.tool[data-tool="read_file"]');
    assert.match(await tool.locator('.result-text').textContent(), /The launch code is 4711\./);
    await shot(p, '09-upload-answered');
    assertClean(p);
  });

  test('thinking, tool calls and subagent activity are shown, nested', T, async (t) => {
    const p = await page(t);
    await send(p, 'think delegate: calc: 6*7');
    await waitRunStatus(p, 'completed');
    const thinking = p.locator('#transcript .run').last().locator('details.thinking');
    assert.match(await thinking.textContent(), /Let me think about this\./);
    assert.equal(await thinking.locator('summary').textContent(), 'Thought');
    assert.equal(await thinking.evaluate((d) => d.open), false, 'thinking collapses when it ends');
    const sub = p.locator('details.tool[data-tool="researcher"]');
    assert.match(await sub.locator(':scope > .section > .args').textContent(), /"task": "calc: 6\*7"/);
    // The subagent's own calculator call sits inside the researcher call.
    const inner = sub.locator('.sub details.tool[data-tool="calculator"]');
    assert.equal(await inner.count(), 1);
    assert.equal(await inner.locator('.result-text').textContent(), '42');
    assert.match(await sub.locator('.sub').textContent(), /The result is 42\./);
    await waitText(p, 'The result is The result is 42..');
    await p.evaluate(() => {
      for (const d of document.querySelectorAll('details')) d.open = true;
    });
    await shot(p, '10-thinking-tools-subagent');
    assertClean(p);
  });

  test('reopens an earlier session from the list', T, async (t) => {
    const p = await page(t);
    await p.waitForSelector('#session-list li');
    await p.click('#session-list button:has-text("tokens=40 delay_ms=40")');
    await p.waitForSelector('.msg.user >> text=tokens=40 delay_ms=40');
    await waitText(p, 'tok39');
    assert.equal(await lastRunText(p), tokens(40));
    assert.ok((await p.locator('#session-list li').count()) >= 6);
    await shot(p, '11-reopened-from-list');
    // And it continues: a second turn in the same session.
    await send(p, 'tokens=3');
    await waitRunStatus(p, 'completed');
    assert.equal(await lastRunText(p), tokens(3));
    assert.equal(await p.locator('#transcript .run').count(), 2);
    assertClean(p);
  });

  test('readable at phone width', T, async (t) => {
    const p = await page(t, { viewport: { width: 390, height: 844 } });
    await p.click('#menu');
    await p.waitForSelector('#sidebar.open');
    // Let the slide-in finish before the picture.
    await p.waitForFunction(() => document.getElementById('sidebar').getBoundingClientRect().left >= 0);
    await shot(p, '12-phone-sessions');
    await p.click('#session-list button:has-text("think delegate")');
    await p.waitForSelector('#sidebar:not(.open)', { state: 'attached' });
    await waitText(p, 'The result is The result is 42..');
    const width = await p.evaluate(() => document.scrollingElement.scrollWidth);
    assert.ok(width <= 390, `no sideways scrolling (scrollWidth ${width})`);
    await send(p, 'think tokens=12');
    await waitRunStatus(p, 'completed');
    await shot(p, '13-phone-chat');
    assertClean(p);
  });
});

describe('connection loss', () => {
  let own;
  before(async () => {
    own = new Agentd('restart', { upstream: env.mock.url });
    await own.start();
  });
  after(async () => {
    await own?.dispose();
  });

  test('a dropped connection reconnects by itself and catches up', T, async (t) => {
    const p = await page(t, { server: own });
    await send(p, 'tokens=120 delay_ms=30');
    await waitText(p, 'tok3 ');
    const listen = own.hostPort;
    // The server dies mid-answer; the page notices and keeps retrying.
    await own.stop('SIGKILL');
    await p.waitForSelector('#conn-status:not([hidden])');
    await p.waitForFunction(() => /reconnecting/.test(document.getElementById('conn-status').textContent));
    await shot(p, '14-reconnecting');
    // It comes back on the same address with the same data: the run goes on (recovery = resume), the page
    // catches up with `after`, drops the interrupted model call's partial text and shows the answer once.
    await own.start(listen);
    await waitRunStatus(p, 'completed');
    await p.waitForSelector('#conn-status', { state: 'hidden' });
    assert.equal(await lastRunText(p), tokens(120), 'the superseded partial text is gone');
    assert.match(await p.locator('#transcript .run .note').last().textContent(), /resumed after an interruption/);
    await send(p, 'tokens=4');
    await waitRunStatus(p, 'completed');
    assert.equal(await lastRunText(p), tokens(4));
    assert.equal(await p.locator('#transcript .run').count(), 2, 'nothing drawn twice after reconnecting');
    assert.equal(await p.locator('#transcript .msg.user').count(), 2);
    await shot(p, '15-reconnected');
    // Chromium logs the refused reconnection attempts as console errors; those are expected here.
    assert.deepEqual(
      p.problems.filter((x) => !/WebSocket connection|ERR_CONNECTION_REFUSED|Failed to load resource/.test(x)),
      [],
    );
  });
});

describe('with auth on', () => {
  let secured;
  before(async () => {
    secured = new Agentd('auth', { upstream: env.mock.url, auth: true });
    await secured.start();
  });
  after(async () => {
    await secured?.dispose();
  });

  test('asks for the API key, refuses a wrong one, and works with the right one', T, async (t) => {
    const p = await page(t, { server: secured, skipAgents: true });
    await p.waitForSelector('#key-dialog[open]');
    await shot(p, '16-api-key-dialog');
    await p.fill('#key-input', 'not-the-key');
    await p.click('#key-save');
    await p.waitForSelector('#key-error:not([hidden])');
    assert.match(await p.textContent('#key-error'), /refused/);
    await p.fill('#key-input', API_KEY);
    await p.click('#key-save');
    await p.waitForSelector('#key-dialog', { state: 'hidden' });
    await p.waitForSelector('#agent-select option', { state: 'attached' });
    await send(p, 'tokens=5');
    await waitRunStatus(p, 'completed');
    assert.equal(await lastRunText(p), tokens(5));
    // The key is remembered: a reload goes straight to the session.
    await p.reload();
    await waitText(p, 'tok4');
    assert.ok(await p.isHidden('#key-dialog'));
    await shot(p, '17-auth-session');
    assert.deepEqual(
      p.problems.filter((x) => !/401/.test(x)),
      [],
    );
  });
});
