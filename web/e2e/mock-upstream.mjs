// A mock OpenAI-compatible upstream for the browser tests: POST /v1/chat/completions answers with streamed
// chat.completion.chunk SSE, following directives in the last user message (the same ones as the Rust
// agentd-testkit mock, plus a few the page tests need):
//   tokens=N        stream "tok0", " tok1", ... as N content deltas
//   delay_ms=D      sleep D ms before each delta
//   think           stream some reasoning_content first
//   calc: EXPR      call the `calculator` tool with {"expression": EXPR}
//   ask: QUESTION   call `ask_human` with {"question": QUESTION}
//   delegate: TASK  call the subagent tool `researcher` with {"task": TASK}
//   readfile        call `read_file` on the first file of the message's "[Uploaded files on disk: ...]" note
//   fail=STATUS     answer HTTP STATUS with an OpenAI-style JSON error body instead of a stream
//   break_after=N   stream N content deltas, then cut the connection (a broken upstream mid-answer)
//   markdown        answer with a markdown sample (heading, bold, list, table, code fence)
//   otherwise       "echo: <text>" word by word, plus " [images: N]" when the message carries images
// When a tool result follows the last user message, the answer is "The result is <result>." whatever the
// directives say. A client that hangs up stops its stream.
import http from 'node:http';

const THINKING = ['Let me', ' think about', ' this.'];

function contentText(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content
      .filter((p) => p && typeof p.text === 'string')
      .map((p) => p.text)
      .join('\n');
  }
  return '';
}

function imageCount(content) {
  return Array.isArray(content) ? content.filter((p) => p && p.type === 'image_url').length : 0;
}

function splitWords(text) {
  const out = [];
  let start = 0;
  for (let i = 1; i < text.length; i++) {
    if (text[i] === ' ') {
      out.push(text.slice(start, i));
      start = i;
    }
  }
  out.push(text.slice(start));
  return out;
}

function restOfLine(text, marker) {
  const pos = text.indexOf(marker);
  if (pos < 0) return null;
  return text.slice(pos + marker.length).split('\n')[0].trim();
}

/** What to answer: {reasoning: [..], text: [..] | null, call: {name, arguments} | null, delay}. */
export function plan(body) {
  const messages = Array.isArray(body.messages) ? body.messages : [];
  let lastUser = -1;
  messages.forEach((m, i) => {
    if (m.role === 'user') lastUser = i;
  });
  const after = messages.slice(lastUser + 1);
  const tool = after.filter((m) => m.role === 'tool').pop();
  if (tool) return { reasoning: [], text: splitWords(`The result is ${contentText(tool.content)}.`), call: null, delay: 0 };
  const user = lastUser >= 0 ? messages[lastUser] : { content: '' };
  const text = contentText(user.content);
  const words = text.split(/\s+/);
  const num = (prefix) => {
    const w = words.find((x) => x.startsWith(prefix));
    return w ? Number.parseInt(w.slice(prefix.length), 10) || 0 : null;
  };
  const delay = num('delay_ms=') || 0;
  const fail = num('fail=');
  if (fail) return { fail, reasoning: [], text: null, call: null, delay };
  const breakAfter = num('break_after=');
  const reasoning = words.includes('think') ? THINKING : [];
  let call = null;
  const delegate = restOfLine(text, 'delegate:');
  const ask = restOfLine(text, 'ask:');
  const calc = restOfLine(text, 'calc:');
  if (delegate !== null) call = { name: 'researcher', arguments: JSON.stringify({ task: delegate }) };
  else if (ask !== null) call = { name: 'ask_human', arguments: JSON.stringify({ question: ask }) };
  else if (calc !== null) call = { name: 'calculator', arguments: JSON.stringify({ expression: calc }) };
  else if (words.includes('readfile')) {
    const m = text.match(/\[Uploaded files on disk:\n- .*? → ([^\n\]]+)/);
    call = { name: 'read_file', arguments: JSON.stringify({ path: m ? m[1].trim() : 'missing.txt' }) };
  }
  if (call) return { reasoning, text: null, call, delay };
  const tokens = num('tokens=');
  let chunks;
  if (tokens !== null) {
    chunks = Array.from({ length: tokens }, (_, i) => (i === 0 ? 'tok0' : ` tok${i}`));
  } else {
    const images = imageCount(user.content);
    chunks = splitWords(`echo: ${text}${images ? ` [images: ${images}]` : ''}`);
  }
  if (words.includes('markdown')) chunks = splitWords(MARKDOWN);
  return { reasoning, text: chunks, call: null, delay, breakAfter };
}

export const MARKDOWN = [
  '# Release notes',
  '',
  'This is **bold**, this is *italic* and `inline code`.',
  '',
  '- first item',
  '- second item',
  '',
  '| name | value |',
  '| --- | --- |',
  '| alpha | 1 |',
  '| beta | 2 |',
  '',
  '```python',
  'def greet(name):',
  '    return f"hello {name}"',
  '```',
  '',
  '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>[link](javascript:window.__xss=3)',
].join('\n');

/** Starts the mock on 127.0.0.1:0. Resolves to {url (…/v1), requests, close()}. */
export function startMock() {
  const requests = [];
  let callIds = 0;
  let responseIds = 0;
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/v1/models') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ object: 'list', data: [{ id: 'mock-model', object: 'model' }] }));
      return;
    }
    if (req.method !== 'POST' || req.url !== '/v1/chat/completions') {
      res.writeHead(404).end();
      return;
    }
    const parts = [];
    req.on('data', (c) => parts.push(c));
    req.on('end', () => {
      let body;
      try {
        body = JSON.parse(Buffer.concat(parts).toString('utf8'));
      } catch (_) {
        res.writeHead(400, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ error: { message: 'bad json' } }));
        return;
      }
      requests.push(body);
      stream(body, res, `chatcmpl-mock-${++responseIds}`, () => `call_${++callIds}`);
    });
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      resolve({
        url: `http://127.0.0.1:${port}/v1`,
        requests,
        close: () =>
          new Promise((r) => {
            server.closeAllConnections();
            server.close(() => r());
          }),
      });
    });
  });
}

function stream(body, res, id, nextCallId) {
  const p = plan(body);
  if (p.fail) {
    res.writeHead(p.fail, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: { message: 'The mock upstream is failing on purpose', type: 'server_error', code: null } }));
    return;
  }
  const model = body.model || 'mock-model';
  let completion = 0;
  const chunk = (delta, finish = null) =>
    `data: ${JSON.stringify({
      id,
      object: 'chat.completion.chunk',
      created: Math.floor(Date.now() / 1000),
      model,
      choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
    })}\n\n`;
  const steps = []; // [delayMs, text]
  steps.push([0, chunk({ role: 'assistant', content: '' })]);
  for (const r of p.reasoning) {
    completion++;
    steps.push([p.delay, chunk({ reasoning_content: r })]);
  }
  if (p.call) {
    const callId = nextCallId();
    steps.push([0, chunk({ tool_calls: [{ index: 0, id: callId, type: 'function', function: { name: p.call.name, arguments: '' } }] })]);
    const a = p.call.arguments;
    const cut = Math.max(1, Math.floor(a.length / 2));
    for (const piece of [a.slice(0, cut), a.slice(cut)]) {
      completion++;
      steps.push([0, chunk({ tool_calls: [{ index: 0, function: { arguments: piece } }] })]);
    }
    steps.push([0, chunk({}, 'tool_calls')]);
  } else {
    for (const t of p.text) {
      if (p.breakAfter !== null && p.breakAfter !== undefined && completion >= p.breakAfter) {
        steps.push([p.delay, null]); // cut here
        break;
      }
      completion++;
      steps.push([p.delay, chunk({ content: t })]);
    }
    steps.push([0, chunk({}, 'stop')]);
  }
  if (body.stream_options && body.stream_options.include_usage) {
    const prompt = JSON.stringify(body.messages || []).length >> 2;
    steps.push([
      0,
      `data: ${JSON.stringify({
        id,
        object: 'chat.completion.chunk',
        created: Math.floor(Date.now() / 1000),
        model,
        choices: [],
        usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
      })}\n\n`,
    ]);
  }
  steps.push([0, 'data: [DONE]\n\n']);

  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  let closed = false;
  res.on('close', () => {
    closed = true;
  });
  let i = 0;
  // Zero-delay steps are written in one go; a delayed one re-enters after its timer.
  const next = () => {
    while (!closed && i < steps.length) {
      const [delay, text] = steps[i];
      if (text === null) {
        // A broken upstream: the connection goes away mid-stream.
        setTimeout(() => res.socket && res.socket.destroy(), delay);
        closed = true;
        return;
      }
      if (delay > 0) {
        setTimeout(() => {
          if (closed) return;
          i++;
          res.write(text);
          next();
        }, delay);
        return;
      }
      i++;
      res.write(text);
    }
    if (!closed) res.end();
  };
  next();
}

// Run alone for manual testing: `node e2e/mock-upstream.mjs` prints the base URL.
if (import.meta.url === `file://${process.argv[1]}`) {
  startMock().then((m) => console.log(m.url));
}
