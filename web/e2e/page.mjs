// What the browser test files share: one agentd + mock upstream + Chromium per file, a fresh page per test, and
// the few waits every test uses.
import assert from 'node:assert/strict';
import { after, before } from 'node:test';

import { Agentd, launchBrowser, openPage } from './harness.mjs';
import { startMock } from './mock-upstream.mjs';

/**
 * Starts the mock upstream, an agentd named `name` (`extra`: config text appended) and Chromium before the file's
 * tests; stops them after.
 */
export function suite(name, { extra = '' } = {}) {
  const s = { mock: null, server: null, browser: null };
  before(async () => {
    s.mock = await startMock();
    s.server = new Agentd(name, { upstream: s.mock.url, extra });
    await s.server.start();
    s.browser = await launchBrowser();
  });
  after(async () => {
    await s.browser?.close();
    await s.server?.dispose();
    await s.mock?.close();
  });
  return s;
}

/** A fresh context's page with agentd's page loaded and its agents listed; closed when the test ends. */
export async function freshPage(t, browser, srv, opts = {}) {
  const { context, page: p } = await openPage(browser, srv, opts.viewport ? { viewport: opts.viewport } : {});
  t.after(async () => {
    await context.close();
  });
  await p.goto(srv.url + (opts.path || '/'));
  if (!opts.skipAgents) {
    await p.waitForSelector('#agent-select option', { state: 'attached' });
    // The page has drawn its sessions and focused the message box: nothing moves the focus after this.
    await p.waitForSelector('body[data-ready]', { state: 'attached' });
  }
  return p;
}

/** Sends `text` and waits until its run's block is on the page (so "the last run" is the new one). */
export async function send(p, text) {
  const runs = await p.locator('#transcript .run').count();
  await p.fill('#input', text);
  await p.press('#input', 'Enter');
  await p.waitForFunction((n) => document.querySelectorAll('#transcript .run').length > n, runs);
}

/** Waits until the run block at `index` (negative: from the end) has `status`. */
export async function waitRunStatus(p, status, index = -1) {
  await p.waitForFunction(
    ([s, i]) => {
      const runs = document.querySelectorAll('#transcript .run');
      const r = runs[i < 0 ? runs.length + i : i];
      return Boolean(r) && r.dataset.status === s;
    },
    [status, index],
  );
}

export function sessionIdOf(p) {
  const m = new URL(p.url()).hash.match(/^#s=(.+)$/);
  assert.ok(m, `no session in the URL ${p.url()}`);
  return m[1];
}
