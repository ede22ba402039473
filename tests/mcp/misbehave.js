#!/usr/bin/env node
// A small MCP server (stdio, newline-delimited JSON-RPC, no dependencies) that misbehaves on purpose, for
// crates/agentd/tests/mcp.rs. Its tools:
//   ok {text}        answers the text at once
//   crash            exits (status 3) in the middle of the call, without answering
//   hang             never answers (the client's timeout must cancel it)
//   big {mb}         answers one text part of `mb` (default 20) megabytes
//   change           answers, then adds the tool `added` and sends notifications/tools/list_changed
//   added            (only after `change`) answers "added"
//   second_life      read-only; never answers in the first process that logged a start to $MISBEHAVE_LOG,
//                    answers "second life" in any later one (a call in flight across agentd's restart)
// Options: --slow-start MS (waits before reading anything), --stderr-flood N (writes N stderr lines at start).
// Every notifications/cancelled it receives is appended to the file $MISBEHAVE_LOG (one JSON line), and so is
// each start ("start"), so a test can count restarts and see cancellations arrive.
'use strict';
const fs = require('fs');

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const slowStart = opt('--slow-start', 0);
const flood = opt('--stderr-flood', 0);
const logFile = process.env.MISBEHAVE_LOG;
const record = (entry) => {
  if (logFile) fs.appendFileSync(logFile, JSON.stringify(entry) + '\n');
};

let extra = false;
const schema = (props) => ({ type: 'object', properties: props || {} });
const tools = () => {
  const list = [
    { name: 'ok', description: 'Answers the text', inputSchema: schema({ text: { type: 'string' } }),
      annotations: { readOnlyHint: true } },
    { name: 'crash', description: 'Exits mid-call', inputSchema: schema() },
    { name: 'hang', description: 'Never answers', inputSchema: schema() },
    { name: 'big', description: 'Answers megabytes', inputSchema: schema({ mb: { type: 'number' } }) },
    { name: 'change', description: 'Changes the tool list', inputSchema: schema() },
    { name: 'second_life', description: 'Answers after a restart', inputSchema: schema(),
      annotations: { readOnlyHint: true } },
  ];
  if (extra) list.push({ name: 'added', description: 'Added by change', inputSchema: schema() });
  return list;
};

const send = (msg) => process.stdout.write(JSON.stringify(msg) + '\n');
const result = (id, res) => send({ jsonrpc: '2.0', id, result: res });
const text = (t) => ({ content: [{ type: 'text', text: t }] });

function handle(msg) {
  const { id, method, params } = msg;
  if (method === 'initialize') {
    return result(id, {
      protocolVersion: (params && params.protocolVersion) || '2025-06-18',
      capabilities: { tools: { listChanged: true } },
      serverInfo: { name: 'misbehave', version: '1.0.0' },
    });
  }
  if (method === 'notifications/cancelled') return record({ cancelled: params && params.requestId });
  if (method === 'ping') return result(id, {});
  if (method === 'tools/list') return result(id, { tools: tools() });
  if (method === 'tools/call') {
    const name = params && params.name;
    const a = (params && params.arguments) || {};
    switch (name) {
      case 'ok': return result(id, text(String(a.text || 'ok')));
      case 'crash': process.stderr.write('misbehave: crashing mid-call\n'); return process.exit(3);
      case 'hang': return undefined;
      case 'second_life': {
        const starts = logFile && fs.existsSync(logFile)
          ? fs.readFileSync(logFile, 'utf8').split('\n').filter((l) => l === '"start"').length : 0;
        return starts >= 2 ? result(id, text('second life')) : undefined;
      }
      case 'big': return result(id, text('x'.repeat(Math.floor((a.mb || 20) * 1000 * 1000))));
      case 'change':
        extra = true;
        result(id, text('changed'));
        return send({ jsonrpc: '2.0', method: 'notifications/tools/list_changed' });
      case 'added': if (extra) return result(id, text('added'));
      // fall through
      default:
        return send({ jsonrpc: '2.0', id, error: { code: -32602, message: `unknown tool ${name}` } });
    }
  }
  if (id !== undefined) send({ jsonrpc: '2.0', id, error: { code: -32601, message: `no method ${method}` } });
}

function serve() {
  record('start');
  for (let i = 0; i < flood; i++) process.stderr.write(`misbehave: noise line ${i}\n`);
  let buf = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk) => {
    buf += chunk;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line) continue;
      try { handle(JSON.parse(line)); } catch (e) { process.stderr.write(`misbehave: ${e}\n`); }
    }
  });
  process.stdin.on('end', () => process.exit(0));
}

setTimeout(serve, slowStart);
