// Markdown to DOM, safely: `marked` parses (GFM: tables, fences, lists; raw HTML stays text), DOMPurify sanitises into a DOM
// fragment (no HTML string of untrusted text ever reaches innerHTML), highlight.js colours code, and each
// code block gets a Copy button. All three libraries are vendored under /assets/vendor/ (the page works
// offline and the CSP stays same-origin); they load as classic scripts before the modules.

const { marked, DOMPurify, hljs } = globalThis;

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

if (marked) {
  marked.setOptions({ gfm: true, breaks: false });
  // Raw HTML in an answer is shown as the text it is (as chat UIs do), never parsed: DOMPurify below is the
  // second line, and the browser is not even asked to parse an inline handler (which it reports as a CSP
  // violation although the parsed document is inert).
  marked.use({ renderer: { html: (token) => escapeHtml(token.text) } });
}

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select', 'iframe', 'object', 'embed'],
  FORBID_ATTR: ['style', 'id'],
};

const MAX_HIGHLIGHT = 20000;

/** Copies text to the clipboard; resolves to true when it worked. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (_) {
    const ta = document.createElement('textarea');
    ta.value = text;
    ta.setAttribute('readonly', '');
    ta.style.position = 'fixed';
    ta.style.opacity = '0';
    document.body.append(ta);
    ta.select();
    let ok = false;
    try {
      ok = document.execCommand('copy');
    } catch (_) {
      ok = false;
    }
    ta.remove();
    return ok;
  }
}

/** A small "Copy" button that copies what `get()` returns and says so. */
export function copyButton(label, get) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'copy-btn';
  b.textContent = 'Copy';
  b.setAttribute('aria-label', label);
  b.addEventListener('click', async () => {
    const ok = await copyText(get());
    b.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => {
      b.textContent = 'Copy';
    }, 1500);
  });
  return b;
}

function decorate(frag) {
  // Classes are the page's own vocabulary: only a code fence's language class is kept (read below).
  for (const e of frag.querySelectorAll('[class]')) if (e.tagName !== 'CODE') e.removeAttribute('class');
  for (const n of Array.from(frag.childNodes)) if (n.nodeType === 3 && !n.data.trim()) n.remove();
  for (const img of frag.querySelectorAll('img')) {
    // Only data: images could load (CSP); anything else becomes a link to it.
    const src = img.getAttribute('src') || '';
    if (src.startsWith('data:image/')) continue;
    const a = document.createElement('a');
    a.href = src;
    a.textContent = img.getAttribute('alt') || src;
    img.replaceWith(a);
  }
  for (const a of frag.querySelectorAll('a[href]')) {
    a.target = '_blank';
    a.rel = 'noopener noreferrer';
  }
  for (const table of frag.querySelectorAll('table')) {
    const wrap = document.createElement('div');
    wrap.className = 'table-wrap';
    table.replaceWith(wrap);
    wrap.append(table);
  }
  for (const pre of frag.querySelectorAll('pre')) {
    const code = pre.querySelector('code') || pre;
    const cls = code.getAttribute('class') || '';
    const lang = (cls.match(/language-([\w+#.-]+)/) || [])[1] || '';
    code.removeAttribute('class');
    if (hljs && code.textContent.length <= MAX_HIGHLIGHT) {
      const known = lang && hljs.getLanguage(lang);
      // highlight.js escapes the text it wraps in its own spans.
      const out = known ? hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true }) : null;
      if (out) {
        const clean = DOMPurify.sanitize(out.value, { RETURN_DOM_FRAGMENT: true, ALLOWED_TAGS: ['span'], ALLOWED_ATTR: ['class'] });
        code.replaceChildren(clean);
        code.className = `hljs language-${lang}`;
      }
    }
    const block = document.createElement('div');
    block.className = 'code-block';
    const head = document.createElement('div');
    head.className = 'code-head';
    const name = document.createElement('span');
    name.textContent = lang || 'code';
    head.append(name, copyButton('Copy code', () => code.textContent));
    pre.replaceWith(block);
    block.append(head, pre);
  }
  return frag;
}

/** The markdown `text` as a sanitised DOM fragment (plain text if the libraries are missing). */
export function renderMarkdown(text) {
  if (!marked || !DOMPurify) {
    const f = document.createDocumentFragment();
    f.append(document.createTextNode(text));
    return f;
  }
  const html = marked.parse(text, { async: false });
  return decorate(DOMPurify.sanitize(html, PURIFY));
}
