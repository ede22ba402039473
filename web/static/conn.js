// The socket's logic without the socket: the seq cursor, reconnect back-off, the URL, and the opening
// handshake's bookkeeping (which frames wait for the history). app.js wires these to a real WebSocket.
//
// How the page stays correct across reloads and dropped connections:
// - Opening a session connects the native WebSocket with `after=0`: the hello, then every event the log still
//   holds (the latest runs, SPEC.md section 4), then live events. Frames wait in `Opening` until the stored
//   history and run statuses are fetched; then `loadSession` (model.js) draws the history and rebuilds every
//   run whose events arrived from those events, so a reloaded session looks like the live one did.
// - Every event carries `seq`; the `Cursor` remembers the highest applied. A dropped socket reconnects with
//   `after=<cursor>` and back-off, and events at or below the cursor are dropped.

export const MAX_BACKOFF_MS = 15000;
export const PING_EVERY_MS = 25000;

/** The highest seq applied; `accept` drops what was already applied. */
export class Cursor {
  constructor(last = null) {
    this.last = last;
  }

  /** True when the event is new (and moves the cursor); false for a repeat. Frames without seq pass. */
  accept(ev) {
    if (typeof ev.seq !== 'number') return true;
    if (this.last !== null && ev.seq <= this.last) return false;
    this.last = ev.seq;
    return true;
  }

  /** Moves the cursor up to `seq` (never down). */
  floor(seq) {
    if (typeof seq === 'number' && (this.last === null || seq > this.last)) this.last = seq;
  }
}

/** Delay before reconnect attempt `attempt` (0-based). A 4008 close (too slow) reconnects at once. */
export function backoffMs(attempt, closeCode, rand = Math.random) {
  if (closeCode === 4008) return 0;
  return Math.min(MAX_BACKOFF_MS, 500 * 2 ** attempt) * (0.8 + rand() * 0.4);
}

/** The native WebSocket URL of a session; `after` null means no cursor. */
export function wsUrl(loc, sessionId, after, key) {
  const q = new URLSearchParams();
  if (after !== null && after !== undefined) q.set('after', String(after));
  if (key) q.set('api_key', key);
  const qs = q.toString();
  const proto = loc.protocol === 'https:' ? 'wss' : 'ws';
  return `${proto}://${loc.host}/v1/sessions/${encodeURIComponent(sessionId)}/ws${qs ? `?${qs}` : ''}`;
}

/**
 * The opening of a session's first connection: events are held until the history is drawn. `frame` sorts
 * each frame: {hello}, {error}, {held: true}, or {event} once open.
 */
export class Opening {
  constructor() {
    this.hello = null;
    this.expired = false;
    this.held = [];
    this.open = false;
  }

  frame(f, expiredCode) {
    if (f.type === 'hello') {
      this.hello = f;
      return { hello: f };
    }
    if (f.type === 'pong') return {};
    if (f.type === 'error') {
      if (!this.open && f.code === expiredCode) {
        // The log was pruned past `after=0`: only the active run is replayed; the history covers the rest.
        this.expired = true;
        return {};
      }
      return { error: f };
    }
    if (!this.open) {
      this.held.push(f);
      return { held: true };
    }
    return { event: f };
  }

  /** Ends the hold: the held events, in order. */
  release() {
    this.open = true;
    const held = this.held;
    this.held = [];
    return held;
  }
}
