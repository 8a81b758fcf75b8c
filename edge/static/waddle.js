// Waddle realtime browser/Node client (protocol v1).
//
// A dependency-free ES module: load it with <script type="module"> in a
// browser, or import it from Node and pass a WebSocket constructor (for
// example the one from the `ws` package).
//
//   import { WaddleClient } from '/static/waddle.js';
//   const client = new WaddleClient({ url: location.origin, channelId: 'general', token });
//   client.on('message', (m) => console.log(m.seq, m.username, m.content));
//   client.send('hello');
//
// Guarantees given to the application:
//   * every message seq is delivered through the `message` event exactly once
//     and in ascending order, across reconnects (history from `initial_state`
//     and replayed gaps included);
//   * every `send()` carries a `clientMsgId` and is kept until the server's
//     `ack`; unacknowledged messages are resent with the same id after a
//     reconnect (the server deduplicates them);
//   * the connection is re-established with exponential backoff and full
//     jitter after abnormal closes and after 1012/1013, never after
//     `close()`, a 1000 normal close from the server or a 1008 policy close;
//     after 4001 (token expired) only when `token` is a function that can
//     supply a fresh token;
//   * messages refused with a retryable error (`Rate limited`, `Channel
//     temporarily unavailable`) stay pending and are resent after the
//     server's `retryAfterMs`.

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

const OPEN = 1;

/**
 * @typedef {'online' | 'away' | 'dnd'} PresenceStatus
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'closed'} ConnectionState
 *
 * @typedef {object} ChatMessage
 * @property {string} id
 * @property {number} seq           Per-channel sequence number.
 * @property {string} channelId
 * @property {string} userId
 * @property {string} username
 * @property {string} content
 * @property {number} timestamp     Milliseconds since the epoch.
 * @property {string | null} [threadId]
 * @property {string | null} [avatarUrl]
 *
 * @typedef {object} OnlineUser
 * @property {string} userId
 * @property {string} username
 * @property {number} [joinedAt]
 * @property {PresenceStatus} [status]
 *
 * @typedef {object} InitialStateFrame
 * @property {'initial_state'} type
 * @property {string} channelId
 * @property {ChatMessage[]} messages   Recent history, oldest first. These are
 *   ALSO delivered through `message` events (deduplicated): render from those.
 * @property {OnlineUser[]} onlineUsers
 * @property {number} lastSeq
 *
 * @typedef {object} AckFrame
 * @property {'ack'} type
 * @property {string} clientMsgId
 * @property {string} id
 * @property {number} seq
 * @property {number} timestamp
 *
 * @typedef {object} TypingFrame
 * @property {'typing'} type
 * @property {string} userId
 * @property {string} username
 * @property {boolean} isTyping
 *
 * @typedef {object} PresenceFrame
 * @property {'presence'} type
 * @property {string} userId
 * @property {string} username
 * @property {PresenceStatus} status
 *
 * @typedef {object} UserFrame
 * @property {'user_connected' | 'user_disconnected'} type
 * @property {string} userId
 * @property {string} username
 *
 * @typedef {object} SyncCompleteFrame
 * @property {'sync_complete'} type
 * @property {number} lastSeq
 * @property {number} count
 *
 * @typedef {object} WaddleError
 * @property {string} message        Human-readable text.
 * @property {string | number} [code] Server error code, or one of the local
 *   codes `policy_violation`, `token_expired`, `bad_frame`, `history_reset`,
 *   `token`, `connect`.
 * @property {number} [closeCode]    Set when the error comes from a close.
 * @property {string} [clientMsgId]  Set when the server names the refused message.
 * @property {boolean} [retryable]   The refused message stays pending and is resent.
 * @property {number} [retryAfterMs] When the server asked for a pause.
 *
 * @typedef {object} StateChange
 * @property {ConnectionState} state
 * @property {ConnectionState} previous
 * @property {number} [code]         Close code that caused the change.
 * @property {string} [reason]       Close reason that caused the change.
 * @property {number} [attempt]      Reconnect attempt (0-based) when reconnecting.
 * @property {number} [delayMs]      Delay before that attempt.
 *
 * @typedef {object} PendingMessage
 * @property {string} clientMsgId
 * @property {string} content
 * @property {string | undefined} threadId
 *
 * @typedef {PendingMessage & {frame: string, sentOn: number, held: boolean}} OutboxEntry
 *
 * @typedef {{
 *   message: ChatMessage,
 *   ack: AckFrame,
 *   typing: TypingFrame,
 *   presence: PresenceFrame,
 *   user_connected: UserFrame,
 *   user_disconnected: UserFrame,
 *   initial_state: InitialStateFrame,
 *   sync_complete: SyncCompleteFrame,
 *   pong: {type: 'pong'},
 *   error: WaddleError,
 *   state: StateChange,
 * }} WaddleEventMap
 *
 * @typedef {object} WaddleClientOptions
 * @property {string} url  Edge base URL: http(s):// or ws(s)://, optionally
 *   with a path prefix. Relative URLs resolve against `location` in browsers.
 * @property {string} channelId
 * @property {string | (() => string | Promise<string>)} token  JWT, or a
 *   function returning one (called before every connection attempt, so a
 *   fresh token can be fetched). Sent only as the `bearer.<jwt>` subprotocol,
 *   never in the URL.
 * @property {any} [WebSocket]  WebSocket constructor (default `globalThis.WebSocket`).
 * @property {() => number} [random]  Uniform [0, 1) source for jitter (default `Math.random`).
 * @property {(fn: () => void, ms: number) => any} [setTimeout]
 * @property {(handle: any) => void} [clearTimeout]
 * @property {() => number} [now]  Clock in ms (default `Date.now`).
 * @property {number} [baseDelayMs=1000]  Backoff base.
 * @property {number} [maxDelayMs=30000]  Backoff cap.
 * @property {number} [stableAfterMs=10000]  A connection open this long resets the backoff.
 * @property {number} [heartbeatMs=25000]  Send `ping` after this much silence and
 *   reconnect if nothing arrives within as long again; 0 disables.
 * @property {number} [syncTimeoutMs=10000]  Give up waiting for `sync_complete`
 *   after this long and deliver what is buffered.
 * @property {number} [maxInFlight=8]  Messages written and not yet acknowledged at
 *   once; the rest wait their turn (keeps a reconnect's resends under the
 *   server's rate limit).
 * @property {number} [maxFrameBytes=32768]  `send()` refuses larger frames (the
 *   server would close with 1009).
 * @property {boolean} [autoConnect=true]  Connect on the next microtask.
 */

/**
 * Build the WebSocket URL of a channel from the edge base URL.
 * @param {string} base
 * @param {string} channelId
 * @returns {string}
 */
export function channelSocketUrl(base, channelId) {
  const origin = globalThis.location?.href;
  const url = origin ? new URL(base, origin) : new URL(base);
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  else if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
    throw new TypeError(`Unsupported URL scheme: ${url.protocol}`);
  }
  url.pathname = `${url.pathname.replace(/\/+$/, '')}/channel/${encodeURIComponent(channelId)}/websocket`;
  url.hash = '';
  return url.toString();
}

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

/** @returns {string} A random (v4) UUID, also outside secure contexts. */
function randomId() {
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
function toSeq(value) {
  const n = typeof value === 'string' && value !== '' ? Number(value) : value;
  return typeof n === 'number' && Number.isSafeInteger(n) ? n : null;
}

/**
 * @param {any} message
 * @returns {ChatMessage | null}
 */
function normalizeMessage(message) {
  if (!message || typeof message !== 'object') return null;
  const seq = toSeq(message.seq);
  if (seq === null) return null;
  return seq === message.seq ? message : { ...message, seq };
}

/** @param {unknown} err */
function describe(err) {
  return err instanceof Error ? err.message : String(err);
}

/** @param {unknown} err */
function report(err) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
  else console.error(err);
}

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder();

/**
 * A Waddle channel connection that survives network drops.
 */
export class WaddleClient {
  /** @param {WaddleClientOptions} options */
  constructor(options) {
    const { url, channelId, token } = options ?? {};
    if (typeof url !== 'string' || !url) throw new TypeError('options.url is required');
    if (typeof channelId !== 'string' || !channelId) {
      throw new TypeError('options.channelId is required');
    }
    if (typeof token !== 'string' && typeof token !== 'function') {
      throw new TypeError('options.token must be a string or a function');
    }
    this.url = channelSocketUrl(url, channelId);
    this.channelId = channelId;
    /** @private */ this._token = token;
    /** @private */ this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new TypeError('No WebSocket implementation: pass options.WebSocket');
    }
    /** @private */ this._random = options.random ?? Math.random;
    /** @private */ this._setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    /** @private */ this._clearTimeout = options.clearTimeout ?? ((h) => globalThis.clearTimeout(h));
    /** @private */ this._now = options.now ?? (() => Date.now());
    /** @private */ this._baseDelayMs = options.baseDelayMs ?? 1000;
    /** @private */ this._maxDelayMs = options.maxDelayMs ?? 30000;
    /** @private */ this._stableAfterMs = options.stableAfterMs ?? 10000;
    /** @private */ this._heartbeatMs = options.heartbeatMs ?? 25000;
    /** @private */ this._syncTimeoutMs = options.syncTimeoutMs ?? 10000;
    /** @private */ this._maxFrameBytes = options.maxFrameBytes ?? 32768;

    /** @private @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /** @private @type {ConnectionState} */
    this._state = 'closed';
    /** @private */ this._ws = null;
    /** @private */ this._connId = 0;
    /** @private */ this._everOpened = false;
    /** @private closed for good: by close(), 1000, 1008 or an expired static token */
    this._stopped = false;
    /** @private */ this._attempt = 0;
    /** @private */ this._openedAt = 0;
    /** @private */ this._reconnectTimer = null;
    /** @private */ this._heartbeatTimer = null;
    /** @private */ this._syncTimer = null;
    /** @private */ this._resendTimer = null;
    /** @private messages written and not yet answered, per connection */
    this._maxInFlight = options.maxInFlight ?? 8;

    /** @private @type {Map<string, OutboxEntry>} unacknowledged messages, in send order */
    this._unacked = new Map();
    /** @private @type {PresenceStatus | null} */
    this._presence = null;

    /** @private @type {number | null} highest seq delivered to the application */
    this._lastSeq = null;
    /** @private */ this._syncing = false;
    /** @private @type {Map<number, ChatMessage>} messages held back until the gap before them is filled */
    this._held = new Map();

    if (options.autoConnect !== false) {
      queueMicrotask(() => {
        if (!this._stopped && this._state === 'closed') this.connect();
      });
    }
  }

  /** @returns {ConnectionState} */
  get state() {
    return this._state;
  }

  /** Highest sequence number delivered to the application (null before any). */
  get lastSeq() {
    return this._lastSeq;
  }

  /** @returns {PendingMessage[]} Messages sent but not yet acknowledged, oldest first. */
  get pending() {
    return Array.from(this._unacked.values(), ({ clientMsgId, content, threadId }) => ({
      clientMsgId,
      content,
      threadId,
    }));
  }

  /**
   * Subscribe to an event. Returns a function that unsubscribes.
   * @template {keyof WaddleEventMap} K
   * @param {K} type
   * @param {(event: WaddleEventMap[K]) => void} fn
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
   * @template {keyof WaddleEventMap} K
   * @param {K} type
   * @param {(event: WaddleEventMap[K]) => void} fn
   */
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  /**
   * Open the connection (done automatically unless `autoConnect: false`).
   * Calling it on a closed client reopens it.
   */
  connect() {
    if (this._ws !== null) return;
    this._stopped = false;
    this._cancelReconnect();
    this._setState(this._everOpened ? 'reconnecting' : 'connecting', {});
    void this._open();
  }

  /**
   * Send a chat message. Queued while disconnected and resent after a
   * reconnect until the server acknowledges it.
   * @param {string} content
   * @param {{threadId?: string}} [options]
   * @returns {string} The message's clientMsgId (matches the later `ack`).
   */
  send(content, options = {}) {
    if (typeof content !== 'string') throw new TypeError('content must be a string');
    if (this._stopped) throw new Error('WaddleClient is closed');
    const clientMsgId = randomId();
    const threadId = options.threadId ?? undefined;
    /** @type {Record<string, unknown>} */
    const payload = { type: 'message', content, clientMsgId };
    if (threadId !== undefined && threadId !== null) payload.threadId = threadId;
    const frame = JSON.stringify(payload);
    if (utf8.encode(frame).length > this._maxFrameBytes) {
      throw new RangeError('Message too long');
    }
    const entry = { clientMsgId, content, threadId, frame, sentOn: 0, held: false };
    this._unacked.set(clientMsgId, entry);
    this._pump();
    return clientMsgId;
  }

  /**
   * Tell the channel whether the user is typing. Not queued: dropped while
   * disconnected (a stale typing state is worse than none).
   * @param {boolean} isTyping
   * @returns {boolean} Whether the frame was sent.
   */
  setTyping(isTyping) {
    return this._sendNow({ type: 'typing', isTyping: Boolean(isTyping) });
  }

  /**
   * Set the user's presence. Remembered and re-announced after reconnects.
   * @param {PresenceStatus} status
   * @returns {boolean} Whether the frame was sent now.
   */
  setPresence(status) {
    if (!STATUSES.includes(status)) throw new RangeError(`Unknown status: ${status}`);
    this._presence = status;
    return this._sendNow({ type: 'presence', status });
  }

  /** @returns {boolean} Whether the ping was sent (the answer is a `pong` event). */
  ping() {
    return this._sendNow({ type: 'ping' });
  }

  /**
   * Close for good (no reconnect). Unacknowledged messages stay in `pending`
   * and are resent if `connect()` is called again.
   * @param {number} [code=1000]
   * @param {string} [reason]
   */
  close(code = CloseCode.NORMAL, reason = 'client closed') {
    this._stopped = true;
    this._cancelReconnect();
    const ws = this._ws;
    this._detach();
    if (ws && ws.readyState <= OPEN) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
    }
    this._setState('closed', { code, reason });
  }

  // --- internals ----------------------------------------------------------

  /** @private */
  async _open() {
    const connId = ++this._connId;
    let token;
    try {
      token = typeof this._token === 'function' ? await this._token() : this._token;
    } catch (err) {
      if (this._stopped || connId !== this._connId) return;
      this._emit('error', { message: `Could not get a token: ${describe(err)}`, code: 'token' });
      this._scheduleReconnect({ code: CloseCode.ABNORMAL, reason: 'token unavailable' });
      return;
    }
    if (this._stopped || connId !== this._connId) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url, [PROTOCOL, `bearer.${token}`]);
    } catch (err) {
      this._emit('error', { message: `Could not open a WebSocket: ${describe(err)}`, code: 'connect' });
      this._scheduleReconnect({ code: CloseCode.ABNORMAL, reason: 'constructor failed' });
      return;
    }
    this._ws = ws;
    if ('binaryType' in ws) ws.binaryType = 'arraybuffer';
    ws.addEventListener('open', () => {
      if (ws === this._ws) this._onOpen();
    });
    ws.addEventListener('message', (event) => {
      if (ws === this._ws) this._onData(event.data);
    });
    ws.addEventListener('close', (event) => {
      if (ws === this._ws) this._onClose(event.code, event.reason);
    });
    ws.addEventListener('error', () => {
      // A close event always follows; reconnection is handled there.
    });
  }

  /** @private */
  _onOpen() {
    this._everOpened = true;
    this._openedAt = this._now();
    // Announce what the server needs to know about this client before the
    // application sees `open`, so the order on the wire is: sync, presence,
    // then every unacknowledged message in the order it was sent.
    if (this._lastSeq !== null) {
      this._syncing = true;
      this._raw({ type: 'sync', afterSeq: this._lastSeq });
      this._syncTimer = this._setTimeout(() => {
        this._syncTimer = null;
        this._finishSync();
      }, this._syncTimeoutMs);
    }
    if (this._presence !== null && this._presence !== 'online') {
      this._raw({ type: 'presence', status: this._presence });
    }
    this._pump();
    this._armHeartbeat();
    this._setState('open', {});
  }

  /** @private */
  _onData(data) {
    this._armHeartbeat();
    let frame;
    try {
      const text = typeof data === 'string' ? data : utf8Decoder.decode(data);
      frame = JSON.parse(text);
    } catch {
      this._emit('error', { message: 'Invalid frame from server', code: 'bad_frame' });
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    switch (frame.type) {
      case 'initial_state':
        this._onInitialState(frame);
        break;
      case 'message': {
        const message = normalizeMessage(frame.message);
        if (message) this._accept(message);
        break;
      }
      case 'sync_complete':
        this._finishSync();
        this._emit('sync_complete', frame);
        break;
      case 'ack':
        if (this._unacked.delete(frame.clientMsgId)) {
          this._emit('ack', frame);
          this._pump();
        }
        break;
      case 'error':
        this._onError(frame);
        break;
      case 'typing':
      case 'presence':
      case 'user_connected':
      case 'user_disconnected':
      case 'pong':
        this._emit(frame.type, frame);
        break;
      default:
        // Unknown server frames are ignored (forward compatibility).
        break;
    }
  }

  /**
   * A refused frame. Retryable refusals keep the message pending and resend
   * it after the pause the server asked for; other refusals of a message
   * drop it from the outbox (resending could never succeed).
   * @private
   */
  _onError(frame) {
    const id = typeof frame.clientMsgId === 'string' ? frame.clientMsgId : undefined;
    const retryable = frame.retryable === true;
    const retryAfterMs = Number.isFinite(frame.retryAfterMs) ? Math.max(0, frame.retryAfterMs) : undefined;
    if (retryable) this._scheduleResend(id, retryAfterMs ?? this._baseDelayMs);
    else if (id !== undefined && this._unacked.delete(id)) this._pump();
    /** @type {WaddleError} */
    const err = { message: String(frame.message ?? 'Error'), code: frame.code };
    if (id !== undefined) err.clientMsgId = id;
    if (retryable) err.retryable = true;
    if (retryAfterMs !== undefined) err.retryAfterMs = retryAfterMs;
    this._emit('error', err);
  }

  /**
   * Write unacknowledged messages in send order while fewer than
   * `maxInFlight` are awaiting an answer on this connection. The window keeps
   * a long queue (after a reconnect) from arriving as one burst that the
   * server's rate limit would refuse.
   * @private
   */
  _pump() {
    // Not _isOpen(): _onOpen pumps before it announces the `open` state.
    if (this._ws === null || this._ws.readyState !== OPEN) return;
    let inFlight = 0;
    for (const entry of this._unacked.values()) if (entry.sentOn === this._connId) inFlight += 1;
    for (const entry of this._unacked.values()) {
      if (inFlight >= this._maxInFlight) break;
      if (entry.sentOn === this._connId) continue;
      if (entry.held) break; // waiting out a pause the server asked for; keep the order
      this._ws.send(entry.frame);
      entry.sentOn = this._connId;
      inFlight += 1;
    }
  }

  /**
   * Resend one refused message (or, when the server did not say which, every
   * pending one: the server deduplicates by clientMsgId) after `delayMs`.
   * @private
   * @param {string | undefined} clientMsgId
   * @param {number} delayMs
   */
  _scheduleResend(clientMsgId, delayMs) {
    for (const entry of this._unacked.values()) {
      if (clientMsgId === undefined || entry.clientMsgId === clientMsgId) {
        entry.held = true;
        entry.sentOn = 0;
      }
    }
    if (this._resendTimer !== null) return;
    this._resendTimer = this._setTimeout(() => {
      this._resendTimer = null;
      for (const entry of this._unacked.values()) entry.held = false;
      this._pump(); // a reconnect in the meantime resent them already
    }, delayMs);
  }

  /** @private */
  _onInitialState(frame) {
    const serverLast = toSeq(frame.lastSeq);
    if (this._lastSeq !== null && serverLast !== null && serverLast < this._lastSeq) {
      // The channel's history went backwards (a wiped development database):
      // nothing after our position will ever come, so start over.
      this._emit('error', {
        message: 'Channel history was reset on the server',
        code: 'history_reset',
      });
      this._lastSeq = null;
      this._held.clear();
      this._syncing = false;
      this._clearSyncTimer();
    }
    const first = this._lastSeq === null;
    this._emit('initial_state', frame);
    const messages = (Array.isArray(frame.messages) ? frame.messages : [])
      .map(normalizeMessage)
      .filter((m) => m !== null)
      .sort((a, b) => a.seq - b.seq);
    for (const message of messages) this._accept(message, first);
    if (first && serverLast !== null && (this._lastSeq === null || serverLast > this._lastSeq)) {
      this._lastSeq = serverLast;
    }
  }

  /**
   * The exactly-once, in-order filter every message goes through.
   * @private
   * @param {ChatMessage} message
   * @param {boolean} [direct] deliver even across a gap (first initial_state)
   */
  _accept(message, direct = false) {
    const seq = message.seq;
    if (this._lastSeq !== null && seq <= this._lastSeq) return;
    if (this._held.has(seq)) return;
    if (this._lastSeq === null || direct || !this._syncing || seq === this._lastSeq + 1) {
      this._deliver(message);
      this._drainHeld();
    } else {
      // A gap before this seq is being replayed: hold it back.
      this._held.set(seq, message);
    }
  }

  /** @private */
  _deliver(message) {
    this._lastSeq = message.seq;
    this._emit('message', message);
  }

  /** @private */
  _drainHeld() {
    while (this._lastSeq !== null && this._held.has(this._lastSeq + 1)) {
      const next = this._held.get(this._lastSeq + 1);
      this._held.delete(this._lastSeq + 1);
      this._deliver(next);
    }
  }

  /** @private Deliver whatever is held back, in order, gaps or not. */
  _finishSync() {
    this._syncing = false;
    this._clearSyncTimer();
    const seqs = Array.from(this._held.keys()).sort((a, b) => a - b);
    for (const seq of seqs) {
      const message = this._held.get(seq);
      this._held.delete(seq);
      if (this._lastSeq === null || seq > this._lastSeq) this._deliver(message);
    }
  }

  /** @private */
  _onClose(code, reason) {
    this._detach();
    const stableFor = this._now() - this._openedAt;
    if (this._openedAt && stableFor >= this._stableAfterMs) this._attempt = 0;
    this._openedAt = 0;
    if (this._stopped) {
      this._setState('closed', { code, reason });
      return;
    }
    const expired = code === CloseCode.TOKEN_EXPIRED;
    if (expired && typeof this._token === 'function') {
      // Reconnect: the token function is asked for a fresh token.
    } else if (code === CloseCode.POLICY_VIOLATION || code === CloseCode.NORMAL || expired) {
      this._stopped = true;
      if (code === CloseCode.POLICY_VIOLATION) {
        this._emit('error', {
          message: reason || 'Closed by the server for a policy violation',
          code: 'policy_violation',
          closeCode: code,
        });
      } else if (expired) {
        this._emit('error', {
          message: reason || 'Token expired',
          code: 'token_expired',
          closeCode: code,
        });
      }
      this._setState('closed', { code, reason });
      return;
    }
    this._scheduleReconnect({ code, reason });
  }

  /** @private */
  _scheduleReconnect({ code, reason }) {
    this._detach();
    const attempt = this._attempt;
    this._attempt += 1;
    const delayMs = backoffDelay(attempt, this._random(), this._baseDelayMs, this._maxDelayMs);
    this._setState('reconnecting', { code, reason, attempt, delayMs }, true);
    this._reconnectTimer = this._setTimeout(() => {
      this._reconnectTimer = null;
      if (this._stopped || this._ws !== null) return;
      void this._open();
    }, delayMs);
  }

  /** @private Forget the current socket; its late events are ignored. */
  _detach() {
    this._ws = null;
    this._connId += 1;
    this._clearSyncTimer();
    this._syncing = false;
    if (this._resendTimer !== null) {
      this._clearTimeout(this._resendTimer);
      this._resendTimer = null;
    }
    for (const entry of this._unacked.values()) entry.held = false;
    if (this._heartbeatTimer !== null) {
      this._clearTimeout(this._heartbeatTimer);
      this._heartbeatTimer = null;
    }
  }

  /** @private */
  _cancelReconnect() {
    if (this._reconnectTimer !== null) {
      this._clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
    }
  }

  /** @private */
  _clearSyncTimer() {
    if (this._syncTimer !== null) {
      this._clearTimeout(this._syncTimer);
      this._syncTimer = null;
    }
  }

  /**
   * Application-level liveness: after `heartbeatMs` without any frame, ping;
   * if still nothing after another `heartbeatMs`, drop the socket and reconnect.
   * @private
   */
  _armHeartbeat() {
    if (this._heartbeatMs <= 0) return;
    if (this._heartbeatTimer !== null) this._clearTimeout(this._heartbeatTimer);
    const ws = this._ws;
    this._heartbeatTimer = this._setTimeout(() => {
      if (ws !== this._ws) return;
      this._raw({ type: 'ping' });
      this._heartbeatTimer = this._setTimeout(() => {
        if (ws !== this._ws) return;
        this._heartbeatTimer = null;
        try {
          ws.close(4000, 'heartbeat timeout');
        } catch {
          // ignore: the socket is being abandoned anyway
        }
        this._onClose(CloseCode.ABNORMAL, 'heartbeat timeout');
      }, this._heartbeatMs);
    }, this._heartbeatMs);
  }

  /** @private */
  _isOpen() {
    return this._ws !== null && this._ws.readyState === OPEN && this._state === 'open';
  }

  /** @private */
  _sendNow(payload) {
    if (!this._isOpen()) return false;
    this._ws.send(JSON.stringify(payload));
    return true;
  }

  /** @private Send on the current socket during the open handshake. */
  _raw(payload) {
    if (this._ws !== null && this._ws.readyState === OPEN) this._ws.send(JSON.stringify(payload));
  }

  /**
   * @private
   * @param {ConnectionState} state
   * @param {Partial<StateChange>} detail
   * @param {boolean} [always] emit even when the state does not change
   */
  _setState(state, detail, always = false) {
    const previous = this._state;
    if (previous === state && !always) return;
    this._state = state;
    this._emit('state', { ...detail, state, previous });
  }

  /** @private */
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
