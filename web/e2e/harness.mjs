// Test harness for the browser tests: starts the real agentd binary against the mock upstream, launches
// Debian's Chromium through playwright-core, and keeps screenshots and server logs under web/test-results/.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');
export const resultsDir = path.resolve(here, '..', 'test-results');
fs.mkdirSync(resultsDir, { recursive: true });

export const API_KEY = 'sk-e2e-key';

/** The agentd binary: $AGENTD_BIN, else $CARGO_TARGET_DIR/debug/agentd, else target/debug/agentd. */
export function agentdBin() {
  if (process.env.AGENTD_BIN) return process.env.AGENTD_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(repoRoot, 'target');
  return path.join(target, 'debug', 'agentd');
}

function configText({ dir, upstream, auth, extra, askTimeoutS }) {
  let text = `
[server]
listen = "127.0.0.1:0"
workspace_dir = "${dir}/workspaces"
shutdown_grace_s = 1
ask_human_timeout_s = ${askTimeoutS}

[store]
url = "sqlite://${dir}/agentd.db"

[providers.mock]
kind = "openai"
base_url = "${upstream}"
timeout_s = 30

[[agents]]
name = "assistant"
description = "General helper (answers from the mock upstream)"
provider = "mock"
model = "mock-model"
system_prompt = "You are a helpful assistant."
tools = ["calculator", "ask_human", "read_file"]
subagents = ["researcher"]

[[agents]]
name = "researcher"
description = "Looks things up; the assistant's subagent"
provider = "mock"
model = "mock-model"
system_prompt = "You research."
tools = ["calculator"]
`;
  if (extra) text += `\n${extra}\n`;
  if (auth) text += `\n[[auth.keys]]\nprincipal = "alice"\nkey = "${API_KEY}"\n`;
  return text;
}

/**
 * A real agentd process. `start()` launches it (on `listen`, default port 0) and resolves once it listens;
 * `stop(signal)` ends it. The data directory survives restarts, so a restart continues the same sessions.
 */
export class Agentd {
  /** `extra`: config text appended (more agents); `askTimeoutS`: `server.ask_human_timeout_s`. */
  constructor(name, { upstream, auth = false, extra = '', askTimeoutS = 120 }) {
    this.name = name;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `agentd-e2e-${name}-`));
    this.configPath = path.join(this.dir, 'agentd.toml');
    fs.writeFileSync(this.configPath, configText({ dir: this.dir, upstream, auth, extra, askTimeoutS }));
    this.logPath = path.join(resultsDir, `agentd-${name}.log`);
    fs.writeFileSync(this.logPath, '');
    this.proc = null;
    this.url = null;
  }

  async start(listen = '127.0.0.1:0') {
    const bin = agentdBin();
    if (!fs.existsSync(bin)) throw new Error(`agentd binary not found at ${bin}; build it (cargo build -p agentd) or set AGENTD_BIN`);
    const env = { ...process.env, RUST_LOG: 'info' };
    delete env.AGENTD_LOG_FORMAT;
    delete env.AGENTD_CONFIG;
    const proc = spawn(bin, ['serve', '--config', this.configPath, '--listen', listen], {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    this.url = null;
    const log = fs.createWriteStream(this.logPath, { flags: 'a' });
    proc.stdout.pipe(log);
    this.exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
    this.url = await new Promise((resolve, reject) => {
      let seen = '';
      const timer = setTimeout(() => reject(new Error(`agentd did not start within 20 s:\n${seen}`)), 20000);
      let listening = false;
      proc.stderr.on('data', (chunk) => {
        log.write(chunk);
        if (listening) return;
        seen += chunk.toString();
        const m = seen.match(/agentd listening on (http:\/\/[0-9.]+:\d+)/);
        if (m) {
          listening = true;
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      proc.on('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`agentd exited with ${code} before listening:\n${seen}`));
      });
    });
    return this.url;
  }

  get hostPort() {
    return this.url.replace('http://', '');
  }

  async stop(signal = 'SIGTERM') {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill(signal);
    await this.exited;
  }

  /** Stops the server and removes its data directory. */
  async dispose() {
    await this.stop();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  /** A native REST call (JSON). */
  async api(method, p, body, key) {
    const headers = {};
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const res = await fetch(this.url + p, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  }
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_BIN || '/usr/bin/chromium',
    headless: true,
    // playwright gives every launch a fresh temporary profile (its own --user-data-dir).
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/**
 * A fresh browser context and page for one test. Requests to any other origin than the agentd under test
 * are aborted and recorded, and console errors are recorded, so a test can assert the page is self-contained.
 */
export async function openPage(browser, server, { viewport = { width: 1280, height: 820 } } = {}) {
  const context = await browser.newContext({ viewport });
  const problems = [];
  // The origin as it is now: a server being restarted on the same address has no url meanwhile.
  const origin = server.url;
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (url.startsWith(origin) || url.startsWith('data:') || url.startsWith('blob:')) return route.continue();
    problems.push(`external request: ${url}`);
    return route.abort();
  });
  const page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.problems = problems;
  page.setDefaultTimeout(20000);
  return { context, page };
}

export async function shot(page, name) {
  const file = path.join(resultsDir, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
}

/** "tok0 tok1 ... tok{n-1}": what `tokens=n` streams. */
export function tokens(n) {
  return Array.from({ length: n }, (_, i) => `tok${i}`).join(' ');
}

/** A small PNG (a colour gradient), encoded here so the tests need no image files. */
export function gradientPng(width = 48, height = 48) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc32 = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(td));
    return Buffer.concat([len, td, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const raw = Buffer.alloc((width * 3 + 1) * height);
  for (let y = 0; y < height; y++) {
    const row = y * (width * 3 + 1);
    for (let x = 0; x < width; x++) {
      raw[row + 1 + x * 3] = Math.round((255 * x) / width);
      raw[row + 2 + x * 3] = Math.round((255 * y) / height);
      raw[row + 3 + x * 3] = 200;
    }
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', zlib.deflateSync(raw)),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

