// Copies the page's browser libraries from node_modules (pinned in package-lock.json) into static/vendor/, with
// their licences, so the binary embeds them and the page works offline. Run `npm run vendor` after `npm ci`
// when a version changes; test/vendor.test.mjs fails while static/vendor/ differs from node_modules.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** [from (under node_modules), to (under static/vendor)] */
export const VENDORED = [
  ['marked/lib/marked.umd.js', 'marked.min.js'],
  ['marked/LICENSE', 'marked.LICENSE'],
  ['dompurify/dist/purify.min.js', 'purify.min.js'],
  ['dompurify/LICENSE', 'dompurify.LICENSE'],
  ['@highlightjs/cdn-assets/highlight.min.js', 'highlight.min.js'],
  ['@highlightjs/cdn-assets/styles/github.min.css', 'highlight-github.min.css'],
  ['@highlightjs/cdn-assets/LICENSE', 'highlight.LICENSE'],
];

export const from = (f) => path.join(here, 'node_modules', f);
export const to = (f) => path.join(here, 'static', 'vendor', f);

if (import.meta.url === `file://${process.argv[1]}`) {
  fs.mkdirSync(to(''), { recursive: true });
  for (const [src, dst] of VENDORED) fs.copyFileSync(from(src), to(dst));
  console.log(`copied ${VENDORED.length} files into static/vendor/`);
}
