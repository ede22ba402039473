// The vendored browser libraries (static/vendor/) are exactly the versions package-lock.json pins, with their
// licences: `npm run vendor` copies them; this fails while a copy is stale or missing.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';

import { from, to, VENDORED } from '../vendor.mjs';

test('static/vendor holds the pinned libraries and their licences', () => {
  for (const [src, dst] of VENDORED) {
    assert.ok(fs.existsSync(to(dst)), `static/vendor/${dst} is missing (npm run vendor)`);
    assert.ok(fs.readFileSync(from(src)).equals(fs.readFileSync(to(dst))), `static/vendor/${dst} differs from node_modules/${src} (npm run vendor)`);
  }
  const lock = JSON.parse(fs.readFileSync(new URL('../package-lock.json', import.meta.url), 'utf8'));
  for (const name of ['marked', 'dompurify', '@highlightjs/cdn-assets']) {
    assert.ok(lock.packages[`node_modules/${name}`].version, `${name} is pinned`);
  }
  const everything = fs.readdirSync(to('')).sort();
  assert.deepEqual(everything, VENDORED.map(([, d]) => d).sort(), 'nothing else in static/vendor');
});
