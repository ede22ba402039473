// Unit tests of the page's connection logic (static/conn.js): the seq cursor, back-off, the URL, the opening hold.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import '../static/codes.js';
import { backoffMs, Cursor, MAX_BACKOFF_MS, Opening, wsUrl } from '../static/conn.js';

test('the cursor applies each seq once, in order, and passes frames without seq', () => {
  const c = new Cursor();
  assert.equal(c.accept({ seq: 1 }), true);
  assert.equal(c.accept({ seq: 2 }), true);
  assert.equal(c.accept({ seq: 2 }), false, 'a repeat after a reconnect is dropped');
  assert.equal(c.accept({ seq: 1 }), false);
  assert.equal(c.accept({ type: 'pong' }), true);
  assert.equal(c.last, 2);
  c.floor(10);
  assert.equal(c.accept({ seq: 9 }), false);
  c.floor(3);
  assert.equal(c.last, 10, 'floor never moves the cursor down');
});

test('back-off doubles up to the cap, with jitter; a 4008 close reconnects at once', () => {
  const mid = () => 0.5; // jitter factor 1.0
  assert.equal(backoffMs(0, 1006, mid), 500);
  assert.equal(backoffMs(1, 1006, mid), 1000);
  assert.equal(backoffMs(3, 1006, mid), 4000);
  assert.equal(backoffMs(20, 1006, mid), MAX_BACKOFF_MS);
  assert.ok(backoffMs(2, 1006, () => 0) >= 1600 && backoffMs(2, 1006, () => 0.9999) <= 2400);
  assert.equal(backoffMs(5, 4008, mid), 0);
});

test('the socket URL carries the cursor and the key, and follows the page scheme', () => {
  const http = { protocol: 'http:', host: 'h:8080' };
  assert.equal(wsUrl(http, 's1', null, ''), 'ws://h:8080/v1/sessions/s1/ws');
  assert.equal(wsUrl(http, 's1', 0, ''), 'ws://h:8080/v1/sessions/s1/ws?after=0');
  assert.equal(wsUrl({ protocol: 'https:', host: 'x' }, 'a/b', 42, 'k&y'), 'wss://x/v1/sessions/a%2Fb/ws?after=42&api_key=k%26y');
});

test('the opening holds events until released; an early cursor_expired is absorbed', () => {
  const o = new Opening();
  assert.deepEqual(o.frame({ type: 'hello', last_seq: 7, active_run_id: null }, 'cursor_expired'), {
    hello: { type: 'hello', last_seq: 7, active_run_id: null },
  });
  assert.deepEqual(o.frame({ type: 'error', code: 'cursor_expired' }, 'cursor_expired'), {});
  assert.equal(o.expired, true);
  assert.deepEqual(o.frame({ seq: 8, type: 'text_delta' }, 'cursor_expired'), { held: true });
  assert.deepEqual(o.frame({ type: 'pong' }, 'cursor_expired'), {});
  assert.deepEqual(o.release(), [{ seq: 8, type: 'text_delta' }]);
  assert.deepEqual(o.frame({ seq: 9, type: 'text_delta' }, 'cursor_expired'), { event: { seq: 9, type: 'text_delta' } });
  // Once open, errors (including a later cursor_expired) go to the page.
  assert.deepEqual(o.frame({ type: 'error', code: 'cursor_expired' }, 'cursor_expired'), { error: { type: 'error', code: 'cursor_expired' } });
});
