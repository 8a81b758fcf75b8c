// Shared pieces of the Waddle client modules: protocol constants, backoff,
// ids, small helpers and the event emitter every client object extends.

/** Protocol version offered as WebSocket subprotocol. */
export const PROTOCOL = 'waddle.v1';

/** Presence statuses accepted by the server. */
export const STATUSES = Object.freeze(['online', 'away', 'dnd']);

/** WebSocket close codes used by the protocol. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  /** The token expired while connected: get a fresh one and reconnect. */
  TOKEN_EXPIRED: 4001,
});

/** WebSocket readyState of an open socket. */
export const OPEN = 1;

/** Channel ids the server accepts (1–128 characters, starting with a letter or digit). */
export const CHANNEL_ID = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;

/**
 * Full-jitter exponential backoff: a uniform draw in [0, min(cap, base * 2^attempt)).
 * @param {number} attempt  0-based retry counter.
 * @param {number} random   Draw in [0, 1).
 * @param {number} [baseMs=1000]
 * @param {number} [capMs=30000]
 * @returns {number}
 */
export function backoffDelay(attempt, random, baseMs = 1000, capMs = 30000) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 52));
  return random * ceiling;
}

/**
 * Turn the edge's base URL (http(s) or ws(s), optionally with a path prefix)
 * into the WebSocket URL of `path`. Relative URLs resolve against `location`.
 * @param {string} base
 * @param {string} path  Starts with a slash.
 * @returns {string}
 */
export function socketUrl(base, path) {
  const origin = globalThis.location?.href;
  const url = origin ? new URL(base, origin) : new URL(base);
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  else if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
    throw new TypeError(`Unsupported URL scheme: ${url.protocol}`);
  }
  url.pathname = `${url.pathname.replace(/\/+$/, '')}${path}`;
  url.hash = '';
  return url.toString();
}

/** @returns {string} A random (v4) UUID, also outside secure contexts. */
export function randomId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i += 1) bytes[i] = Math.floor(Math.random() * 256);
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * Sequence numbers are integers; tolerate ones encoded as strings.
 * @param {unknown} value
 * @returns {number | null}
 */
export function toSeq(value) {
  const n = typeof value === 'string' && value !== '' ? Number(value) : value;
  return typeof n === 'number' && Number.isSafeInteger(n) ? n : null;
}

/**
 * @param {any} message
 * @returns {import('../waddle.js').ChatMessage | null}
 */
export function normalizeMessage(message) {
  if (!message || typeof message !== 'object') return null;
  const seq = toSeq(message.seq);
  if (seq === null) return null;
  return seq === message.seq ? message : { ...message, seq };
}

/** @param {unknown} err */
export function describe(err) {
  return err instanceof Error ? err.message : String(err);
}

/** @param {unknown} err */
export function report(err) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
  else console.error(err);
}

/**
 * The `sub` claim of a JWT, read without checking anything (the server
 * checks); null when the token is not a readable JWT.
 * @param {string} token
 * @returns {string | null}
 */
export function tokenSubject(token) {
  try {
    const part = token.split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const text = utf8Decoder.decode(Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0)));
    const sub = JSON.parse(text).sub;
    return typeof sub === 'string' ? sub : null;
  } catch {
    return null;
  }
}

export const utf8 = new TextEncoder();
export const utf8Decoder = new TextDecoder();

/**
 * Typed listeners: `on(type, fn)` returns a function that removes `fn`.
 * A listener that throws is reported and does not stop the others.
 */
export class Emitter {
  constructor() {
    /** @private @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  /**
   * Subscribe to an event. Returns a function that unsubscribes.
   * @param {string} type
   * @param {(event: any) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    let set = this._listeners.get(type);
    if (!set) {
      set = new Set();
      this._listeners.set(type, set);
    }
    set.add(fn);
    return () => this.off(type, fn);
  }

  /**
   * @param {string} type
   * @param {(event: any) => void} fn
   */
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  /** @protected */
  _emit(type, event) {
    const set = this._listeners.get(type);
    if (!set) return;
    for (const fn of Array.from(set)) {
      try {
        fn(event);
      } catch (err) {
        report(err);
      }
    }
  }
}
