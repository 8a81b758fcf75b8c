// Protocol v1.1: one WebSocket (`GET /websocket`) for all of a user's
// channels. `WaddleConnection` owns the socket (token, reconnects, backoff,
// liveness); `subscribe(channelId)` gives a `WaddleChannel` handle per
// channel, with its own exactly-once message stream, outbox, online list,
// read cursor and history. After a reconnect every channel resumes with one
// `subscribe {afterSeq}` and its unacknowledged messages are resent.

import {
  CHANNEL_ID,
  CloseCode,
  Emitter,
  STATUSES,
  normalizeMessage,
  randomId,
  socketUrl,
  tokenSubject,
  toSeq,
  utf8,
} from './core.js';
import { SocketLink } from './link.js';
import { Outbox } from './outbox.js';
import { Sequencer } from './sequencer.js';

/** Pages the server reads at once for one socket; more are refused. */
const HISTORY_IN_FLIGHT = 4;

/** Refusals of a `subscribe` that are worth retrying after `retryAfterMs`. */
const RETRYABLE_SUBSCRIBE = new Set(['channel_full', 'user_limit', 'unavailable', 'rate_limited']);

/**
 * @typedef {import('../waddle.js').ChatMessage} ChatMessage
 * @typedef {import('../waddle.js').PresenceStatus} PresenceStatus
 * @typedef {import('../waddle.js').AckFrame} AckFrame
 * @typedef {import('./link.js').TokenRequest} TokenRequest
 * @typedef {import('./link.js').NetworkStatus} NetworkStatus
 *
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'offline' | 'closed'} ConnectionState
 * @typedef {'subscribing' | 'live' | 'resuming' | 'retrying' | 'failed' | 'unsubscribed'} ChannelState
 * @typedef {'queued' | 'sent' | 'acked' | 'failed'} OutgoingState
 *
 * @typedef {object} WaddleConnectionOptions
 * @property {string} url  Edge base URL: http(s):// or ws(s)://, optionally with a
 *   path prefix. Relative URLs resolve against `location` in browsers.
 * @property {string | ((request: TokenRequest) => string | Promise<string>)} token
 *   JWT, or a function returning one, called before every connection attempt
 *   and told why (`reason: 'unauthorized'` after the server refused the last
 *   token, `'expired'` after a 4001 close). Sent only as the `bearer.<jwt>`
 *   subprotocol, never in the URL.
 * @property {any} [WebSocket]  WebSocket constructor (default `globalThis.WebSocket`).
 * @property {NetworkStatus | null} [network]  Online/offline source (default: the
 *   browser's `navigator.onLine` and `online` event; none in Node).
 * @property {typeof fetch | null} [fetch]  Used to ask why a handshake failed when
 *   the WebSocket does not say (browsers); `probe: false` turns that off.
 * @property {boolean} [probe=true]
 * @property {() => number} [random]  Uniform [0, 1) source for jitter.
 * @property {(fn: () => void, ms: number) => any} [setTimeout]
 * @property {(handle: any) => void} [clearTimeout]
 * @property {() => number} [now]  Clock in ms (default `Date.now`).
 * @property {number} [baseDelayMs=1000]  Backoff base.
 * @property {number} [maxDelayMs=30000]  Backoff cap.
 * @property {number} [stableAfterMs=10000]  A connection open this long resets the backoff.
 * @property {number} [heartbeatMs=25000]  Ping after this much silence; reconnect
 *   if nothing arrives within as long again; 0 disables.
 * @property {number} [syncTimeoutMs=10000]  Stop waiting for a resumed channel's
 *   `sync_complete` after this long and deliver what is held back.
 * @property {number} [historyTimeoutMs=30000]  Reject a `history()` page not
 *   answered within this long (0: never).
 * @property {number} [typingRefreshMs=3000]  `setTyping(true)` repeats the frame
 *   at most this often; unchanged states are not resent.
 * @property {number} [maxInFlight=8]  Messages written and not yet acknowledged
 *   at once, over all channels of the socket.
 * @property {number} [maxFrameBytes=32768]  `send()` refuses larger frames.
 * @property {boolean} [autoConnect=true]  Connect on the next microtask.
 *
 * @typedef {object} HistoryPage
 * @property {ChatMessage[]} messages  Oldest first; a thread root has `replyCount`.
 * @property {boolean} hasMore  Older messages exist: ask again with
 *   `beforeSeq: messages[0].seq`.
 */

/**
 * Build the multiplexed WebSocket URL from the edge base URL.
 * @param {string} base
 * @returns {string}
 */
export function connectionSocketUrl(base) {
  return socketUrl(base, '/websocket');
}

/**
 * A refused or abandoned request: `send()`, `subscribe()`, `history()`.
 */
export class WaddleRequestError extends Error {
  /**
   * @param {string} message
   * @param {{code: string, channelId?: string, clientMsgId?: string, retryAfterMs?: number}} detail
   */
  constructor(message, detail) {
    super(message);
    this.name = 'WaddleRequestError';
    /** Server error code, or a local one: `unsubscribed`, `closed`, `timeout`. */
    this.code = detail.code;
    if (detail.channelId !== undefined) this.channelId = detail.channelId;
    if (detail.clientMsgId !== undefined) this.clientMsgId = detail.clientMsgId;
    if (detail.retryAfterMs !== undefined) this.retryAfterMs = detail.retryAfterMs;
  }
}

/** @param {Promise<unknown>} promise A promise the application may ignore. */
function quiet(promise) {
  promise.catch(() => {});
  return promise;
}

/**
 * @template T
 * @returns {{promise: Promise<T>, resolve: (v: T) => void, reject: (e: unknown) => void}}
 */
function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise: quiet(promise), resolve, reject };
}

/** @param {any} frame @returns {Record<string, unknown>} */
function errorOf(frame) {
  /** @type {Record<string, unknown>} */
  const err = { message: String(frame.message ?? 'Error'), code: frame.code };
  if (typeof frame.channelId === 'string') err.channelId = frame.channelId;
  if (typeof frame.clientMsgId === 'string') err.clientMsgId = frame.clientMsgId;
  if (frame.retryable === true) err.retryable = true;
  if (Number.isFinite(frame.retryAfterMs)) err.retryAfterMs = Math.max(0, frame.retryAfterMs);
  return err;
}

/** @param {Record<string, any>} err */
function requestError(err) {
  return new WaddleRequestError(err.message, err);
}

let outgoingCounter = 0;

/**
 * One message sent through a channel handle, as the application sees it
 * until the server has it: `queued` (waiting for the connection or its
 * turn), `sent` (written, no ack yet), `acked` (durable; `ack` holds its id
 * and seq) or `failed` (refused for good; `error` says why; `retry()` sends
 * it again with the same clientMsgId).
 */
export class OutgoingMessage {
  /**
   * @param {WaddleChannel} channel
   * @param {string} clientMsgId
   * @param {string} content
   * @param {string | undefined} threadId
   */
  constructor(channel, clientMsgId, content, threadId) {
    /** @private */ this._channel = channel;
    this.clientMsgId = clientMsgId;
    this.channelId = channel.id;
    this.content = content;
    this.threadId = threadId;
    /** @type {OutgoingState} */
    this.state = 'queued';
    /** @type {AckFrame | undefined} */
    this.ack = undefined;
    /** After `acked`: whether the `message` event for it went out already. */
    this.delivered = false;
    /** @type {Record<string, unknown> | undefined} */
    this.error = undefined;
    /** Set by `discard()`: no longer listed in `channel.outgoing`. */
    this.discarded = false;
    /** @private */ this._order = (outgoingCounter += 1);
  }

  /**
   * Send a failed message again (same clientMsgId: never stored twice).
   * @returns {Promise<AckFrame>}
   */
  retry() {
    return this._channel._retry(this);
  }

  /** Forget a failed message (it leaves `channel.outgoing`). */
  discard() {
    this._channel._discard(this);
  }
}

/**
 * One connection to the edge for all of a user's channels (protocol v1.1).
 *
 * Events: `state` ({state, previous, code?, reason?, attempt?, delayMs?,
 * retryNow?, status?}), `auth` ({code: 'unauthorized' | 'token_expired',
 * message, status?, closeCode?}: get a fresh token; the connection keeps
 * retrying, asking the token function again or using `setToken()`),
 * `error` (errors about no channel), `pong`.
 */
export class WaddleConnection extends Emitter {
  /** @param {WaddleConnectionOptions} options */
  constructor(options) {
    super();
    const { url, token } = options ?? {};
    if (typeof url !== 'string' || !url) throw new TypeError('options.url is required');
    if (typeof token !== 'string' && typeof token !== 'function') {
      throw new TypeError('options.token must be a string or a function');
    }
    this.url = connectionSocketUrl(url);
    /** @private */ this._setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    /** @private */ this._clearTimeout = options.clearTimeout ?? ((h) => globalThis.clearTimeout(h));
    /** @private */ this._now = options.now ?? (() => Date.now());
    /** @private */ this._baseDelayMs = options.baseDelayMs ?? 1000;
    /** @private */ this._syncTimeoutMs = options.syncTimeoutMs ?? 10000;
    /** @private */ this._historyTimeoutMs = options.historyTimeoutMs ?? 30000;
    /** @private */ this._typingRefreshMs = options.typingRefreshMs ?? 3000;
    /** @private */ this._maxInFlight = options.maxInFlight ?? 8;
    /** @private */ this._maxFrameBytes = options.maxFrameBytes ?? 32768;
    /** @private @type {Map<string, WaddleChannel>} wanted channels, in subscribe order */
    this._channels = new Map();
    /** @private @type {Map<string, () => void>} unsubscribes awaiting `unsubscribed` */
    this._leaving = new Map();
    /** @private @type {PresenceStatus | null} */
    this._presence = null;
    /** @private @type {string | null} */
    this._userId = null;
    /** @private @type {any[]} history pages asked for and not answered, oldest first */
    this._history = [];
    /** @private */ this._historyTimer = null;

    /** @private */
    this._link = new SocketLink(
      {
        ...options,
        url: this.url,
        setTimeout: this._setTimeout,
        clearTimeout: this._clearTimeout,
        extended: true,
      },
      {
        onOpen: () => this._onOpen(),
        onFrame: (frame) => this._onFrame(frame),
        onBadFrame: () => this._emit('error', { message: 'Invalid frame from server', code: 'bad_frame' }),
        onDetach: () => this._onDetach(),
        onState: (change) => this._emit('state', change),
        onError: (err) => this._emit('error', err),
        onAuth: (detail) => this._emit('auth', detail),
        stopOn: (code, reason) => this._stopOn(code, reason),
      },
    );
    if (options.autoConnect !== false) {
      queueMicrotask(() => {
        if (!this._link.stopped && this._link.state === 'closed') this.connect();
      });
    }
  }

  /** @returns {ConnectionState} */
  get state() {
    return /** @type {ConnectionState} */ (this._link.state);
  }

  /** This user's id (the token's `sub`), once known. */
  get userId() {
    return this._userId;
  }

  /** @returns {WaddleChannel[]} Channels subscribed or being subscribed. */
  get channels() {
    return Array.from(this._channels.values());
  }

  /**
   * The handle of a channel, subscribing to it if this connection has not.
   * @param {string} channelId
   * @returns {WaddleChannel}
   */
  channel(channelId) {
    if (typeof channelId !== 'string' || !CHANNEL_ID.test(channelId)) {
      throw new TypeError(`Invalid channel id: ${JSON.stringify(channelId)}`);
    }
    let ch = this._channels.get(channelId);
    if (ch === undefined) {
      ch = new WaddleChannel(this, channelId);
      this._channels.set(channelId, ch);
      ch._subscribe();
    }
    return ch;
  }

  /**
   * Subscribe to a channel. Resolves with its handle once the server sent
   * its `initial_state` (waiting through reconnects and retryable refusals);
   * rejects when refused for good (`forbidden`, `too_many_subscriptions`) or
   * unsubscribed first.
   * @param {string} channelId
   * @returns {Promise<WaddleChannel>}
   */
  subscribe(channelId) {
    return this.channel(channelId).ready;
  }

  /**
   * Set this user's presence in every channel (a channel's own
   * `setPresence` wins there). Remembered and re-announced after reconnects.
   * @param {PresenceStatus} status
   * @returns {boolean} Whether the socket is open (the frames went out now).
   */
  setPresence(status) {
    if (!STATUSES.includes(status)) throw new RangeError(`Unknown status: ${status}`);
    this._presence = status;
    for (const ch of this._channels.values()) {
      if (ch._presence === null) ch._announcePresence();
    }
    return this._link.isOpen();
  }

  /** @returns {boolean} Whether the ping was sent (the answer is a `pong` event). */
  ping() {
    return this._link.isOpen() && this._link.write(JSON.stringify({ type: 'ping' }));
  }

  /** Open the connection (automatic unless `autoConnect: false`); reopens a closed one. */
  connect() {
    this._link.connect();
  }

  /**
   * While `reconnecting` or `offline`: try now rather than after the delay.
   * @returns {boolean} Whether an attempt started.
   */
  retryNow() {
    return this._link.retryNow();
  }

  /**
   * Use another token (or token function) from the next attempt on, for
   * example after an `auth` event.
   * @param {string | ((request: TokenRequest) => string | Promise<string>)} token
   */
  setToken(token) {
    this._link.setToken(token);
  }

  /**
   * Close for good (no reconnect). Channels and unacknowledged messages are
   * kept: `connect()` resumes them. Pending `history()` pages are rejected.
   * @param {number} [code=1000]
   * @param {string} [reason]
   */
  close(code = CloseCode.NORMAL, reason = 'client closed') {
    this._link.close(code, reason);
    if (this._historyTimer !== null) {
      this._clearTimeout(this._historyTimer);
      this._historyTimer = null;
    }
    for (const req of this._history.splice(0)) {
      this._settleHistory(req);
      req.reject(new WaddleRequestError('Connection closed', { code: 'closed', channelId: req.channel.id }));
    }
  }

  // --- internals (used by WaddleChannel) -----------------------------------

  /** @private */
  _onOpen() {
    this._userId = tokenSubject(this._link.token ?? '') ?? this._userId;
    for (const ch of Array.from(this._channels.values())) ch._subscribe();
  }

  /** @private */
  _onDetach() {
    for (const resolve of this._leaving.values()) resolve();
    this._leaving.clear();
    for (const ch of this._channels.values()) ch._socketLost();
    for (const req of this._history) req.sentOn = 0;
  }

  /** @private */
  _onFrame(frame) {
    const channelId = frame.channelId;
    if (typeof channelId === 'string') {
      const leaving = this._leaving.get(channelId);
      if (leaving !== undefined) {
        // Frames of an ended subscription, up to the server's `unsubscribed`.
        if (frame.type === 'unsubscribed') {
          this._leaving.delete(channelId);
          leaving();
        }
        return;
      }
      const ch = this._channels.get(channelId);
      if (ch !== undefined) {
        ch._onFrame(frame);
        return;
      }
      if (frame.type === 'error') this._emit('error', errorOf(frame));
      return;
    }
    if (frame.type === 'pong') this._emit('pong', frame);
    else if (frame.type === 'error') this._emit('error', errorOf(frame));
  }

  /** @private */
  _stopOn(code, reason) {
    if (code === CloseCode.TOKEN_EXPIRED) {
      this._emit('auth', { message: reason || 'Token expired', code: 'token_expired', closeCode: code });
      return false;
    }
    if (code === CloseCode.POLICY_VIOLATION) {
      this._emit('error', {
        message: reason || 'Closed by the server for a policy violation',
        code: 'policy_violation',
        closeCode: code,
      });
      return true;
    }
    return code === CloseCode.NORMAL;
  }

  /** @private @param {Record<string, unknown>} payload */
  _write(payload) {
    return this._link.write(JSON.stringify(payload));
  }

  /**
   * Write unacknowledged messages of live channels, in each channel's send
   * order, while fewer than `maxInFlight` await an ack on this socket.
   * @private
   */
  _pump() {
    if (!this._link.writable) return;
    const connId = this._link.connId;
    let room = this._maxInFlight;
    for (const ch of this._channels.values()) room -= ch._outbox.inFlight(connId);
    for (const ch of this._channels.values()) {
      if (room <= 0) break;
      if (!ch._live) continue;
      room -= ch._outbox.pump(connId, room, (text) => this._link.write(text));
    }
  }

  /**
   * @private
   * @param {WaddleChannel} channel
   * @param {Record<string, unknown>} frame
   * @returns {Promise<HistoryPage>}
   */
  _requestHistory(channel, frame) {
    const { promise, resolve, reject } = deferred();
    const req = {
      channel,
      text: JSON.stringify(frame),
      key: `${frame.threadId ?? ''}|${frame.beforeSeq ?? ''}`,
      sentOn: 0,
      notBefore: 0,
      resolve,
      reject,
      timer: null,
    };
    if (this._historyTimeoutMs > 0) {
      req.timer = this._setTimeout(() => {
        req.timer = null;
        const i = this._history.indexOf(req);
        if (i < 0) return;
        this._history.splice(i, 1);
        reject(new WaddleRequestError('History page timed out', { code: 'timeout', channelId: channel.id }));
        this._pumpHistory();
      }, this._historyTimeoutMs);
    }
    this._history.push(req);
    this._pumpHistory();
    return promise;
  }

  /** @private */
  _pumpHistory() {
    if (!this._link.writable) return;
    const connId = this._link.connId;
    const now = this._now();
    let inFlight = this._history.filter((r) => r.sentOn === connId).length;
    for (const req of this._history) {
      if (inFlight >= HISTORY_IN_FLIGHT) break;
      if (req.sentOn === connId || !req.channel._live || req.notBefore > now) continue;
      this._link.write(req.text);
      req.sentOn = connId;
      inFlight += 1;
    }
  }

  /** @private */
  _settleHistory(req) {
    if (req.timer !== null) {
      this._clearTimeout(req.timer);
      req.timer = null;
    }
  }

  /**
   * A `history` frame: answers the oldest matching request.
   * @private
   */
  _onHistory(channel, frame) {
    const key = `${frame.threadId ?? ''}|${frame.beforeSeq ?? ''}`;
    const matches = (r) => r.channel === channel && r.key === key;
    let i = this._history.findIndex((r) => matches(r) && r.sentOn !== 0);
    if (i < 0) i = this._history.findIndex(matches);
    if (i < 0) return; // a second answer to a page asked for twice
    const [req] = this._history.splice(i, 1);
    this._settleHistory(req);
    const messages = (Array.isArray(frame.messages) ? frame.messages : [])
      .map(normalizeMessage)
      .filter((m) => m !== null);
    req.resolve({ messages, hasMore: frame.hasMore === true });
    this._pumpHistory();
  }

  /**
   * A refusal about `channel` that names nothing (`rate_limited` or
   * `unavailable`) may be a history page's: ask again for the pages in flight
   * after the pause (an answer that still comes is taken, a second dropped).
   * @private
   */
  _historyRefused(channel, delayMs) {
    const connId = this._link.connId;
    let any = false;
    for (const req of this._history) {
      if (req.channel === channel && req.sentOn === connId) {
        req.sentOn = 0;
        req.notBefore = this._now() + delayMs;
        any = true;
      }
    }
    if (!any) return;
    if (this._historyTimer !== null) this._clearTimeout(this._historyTimer);
    this._historyTimer = this._setTimeout(() => {
      this._historyTimer = null;
      this._pumpHistory();
    }, delayMs);
  }

  /** @private Reject the pending pages of a channel that ended. */
  _dropHistory(channel, err) {
    this._history = this._history.filter((req) => {
      if (req.channel !== channel) return true;
      this._settleHistory(req);
      req.reject(err);
      return false;
    });
  }
}

/**
 * One channel of a `WaddleConnection`.
 *
 * Events: `message` (each seq exactly once, in order; your own messages carry
 * `clientMsgId` when their ack came first), `outgoing` (an OutgoingMessage
 * changed state), `ack`, `typing`, `presence`, `presenceDiff`, `online`
 * ({users, count, stale}: the online list changed or went stale/fresh),
 * `unread` ({readSeq, unreadCount, lastSeq}), `receipt` ({userId, seq}:
 * another member read up to seq), `state` ({state, previous, error?,
 * retryAfterMs?}), `initialState`, `syncComplete`, `error`.
 */
export class WaddleChannel extends Emitter {
  /**
   * @param {WaddleConnection} conn
   * @param {string} channelId
   */
  constructor(conn, channelId) {
    super();
    /** @private */ this._conn = conn;
    this.id = channelId;
    /** @private @type {ChannelState} */
    this._state = 'subscribing';
    const ready = deferred();
    /** Resolves with this handle once subscribed; rejects if refused for good. */
    this.ready = /** @type {Promise<WaddleChannel>} */ (ready.promise);
    /** @private */ this._ready = ready;
    /** @private */ this._readySettled = false;
    /** @private */
    this._seq = new Sequencer({
      deliver: (message) => this._deliver(message),
      setTimeout: conn._setTimeout,
      clearTimeout: conn._clearTimeout,
      syncTimeoutMs: conn._syncTimeoutMs,
    });
    /** @private */
    this._outbox = new Outbox({
      setTimeout: conn._setTimeout,
      clearTimeout: conn._clearTimeout,
      onRelease: () => conn._pump(),
      onChange: (entry, written) => {
        entry.outgoing.state = written ? 'sent' : 'queued';
        this._emit('outgoing', entry.outgoing);
      },
    });
    /** @private @type {Map<string, OutgoingMessage>} refused for good, not discarded */
    this._failed = new Map();
    /** @private @type {Map<string, OutgoingMessage>} acked before their message came (by message id) */
    this._awaiting = new Map();
    /** @private the connection a subscribe went out on (0: none) */
    this._subscribedOn = 0;
    /** @private `initial_state` came on the current connection */
    this._live = false;
    /** @private */ this._everLive = false;
    /** @private */ this._retryTimer = null;
    /** @private @type {Map<string, any>} */
    this._online = new Map();
    /** @private */ this._onlineCount = 0;
    /** @private */ this._stale = true;
    /** @private @type {Map<string, string>} userId -> username of who is typing */
    this._typing = new Map();
    /** @private @type {number | null} */
    this._readSeq = null;
    /** @private @type {number | null} a read not yet told to the server */
    this._readPending = null;
    /** @private @type {Map<string, number>} */
    this._receipts = new Map();
    /** @private @type {PresenceStatus | null} */
    this._presence = null;
    /** @private */ this._typingSent = { isTyping: false, at: 0 };
    /** @private */ this._unreadSnapshot = '';
    /** @private @type {Set<() => void>} */
    this._iterators = new Set();
  }

  /** @returns {ChannelState} */
  get state() {
    return this._state;
  }

  /** Highest seq delivered through `message` (null before the first `initial_state`). */
  get lastSeq() {
    return this._seq.lastSeq;
  }

  /** This user's read cursor (null while unknown). */
  get readSeq() {
    return this._readSeq;
  }

  /** Messages after the read cursor (null while the cursor is unknown). */
  get unreadCount() {
    if (this._readSeq === null || this._seq.lastSeq === null) return null;
    return Math.max(0, this._seq.lastSeq - this._readSeq);
  }

  /** Users online in the channel, this user first (as last known: see `onlineStale`). */
  get onlineUsers() {
    return Array.from(this._online.values(), (u) => ({ ...u }));
  }

  /** All users online (the list may be capped by the server; the count is not). */
  get onlineCount() {
    return this._onlineCount;
  }

  /** True while the channel is not live (offline, resuming): the online list is out of date. */
  get onlineStale() {
    return this._stale;
  }

  /** Users typing now: userId -> username. */
  get typingUsers() {
    return new Map(this._typing);
  }

  /** Other members' read receipts: userId -> seq. */
  get receipts() {
    return new Map(this._receipts);
  }

  /** @returns {OutgoingMessage[]} Messages not yet acknowledged, and failed ones, oldest first. */
  get outgoing() {
    const list = [
      ...Array.from(this._outbox.entries.values(), (e) => e.outgoing),
      ...this._failed.values(),
    ];
    return list.sort((a, b) => a._order - b._order);
  }

  /** @private */
  get _ended() {
    return this._state === 'failed' || this._state === 'unsubscribed';
  }

  /**
   * Send a chat message. Queued while offline or resuming, resent with the
   * same clientMsgId until acknowledged; follow it in `outgoing`.
   * Throws (TypeError/RangeError) on invalid input and once unsubscribed.
   * @param {string} content
   * @param {{threadId?: string | null, clientMsgId?: string}} [options]
   * @returns {Promise<AckFrame>} Resolves with the ack; rejects with a
   *   WaddleRequestError when refused for good (never an unhandled rejection).
   */
  send(content, options = {}) {
    if (typeof content !== 'string') throw new TypeError('content must be a string');
    if (!content.trim()) throw new RangeError('Message is empty');
    if (this._ended) throw new Error(`Channel ${this.id} is ${this._state}`);
    const threadId = options.threadId ?? undefined;
    if (threadId !== undefined && (typeof threadId !== 'string' || !threadId || threadId.length > 128)) {
      throw new TypeError('threadId must be a string of 1 to 128 characters');
    }
    const clientMsgId = options.clientMsgId ?? randomId();
    if (typeof clientMsgId !== 'string' || !clientMsgId || clientMsgId.length > 128) {
      throw new TypeError('clientMsgId must be a string of 1 to 128 characters');
    }
    const existing = this._outbox.get(clientMsgId);
    if (existing !== undefined) return existing.promise;
    /** @type {Record<string, unknown>} */
    const payload = { type: 'message', channelId: this.id, content, clientMsgId };
    if (threadId !== undefined) payload.threadId = threadId;
    const frame = JSON.stringify(payload);
    if (utf8.encode(frame).length > this._conn._maxFrameBytes) throw new RangeError('Message too long');
    const outgoing = new OutgoingMessage(this, clientMsgId, content, threadId);
    return this._enqueue(outgoing, frame);
  }

  /**
   * Tell the channel whether this user is typing. Not queued while offline;
   * an unchanged state is not resent (a `true` is repeated every
   * `typingRefreshMs` at most).
   * @param {boolean} isTyping
   * @returns {boolean} Whether the server has this state now.
   */
  setTyping(isTyping) {
    const value = Boolean(isTyping);
    if (!this._live) return false;
    const now = this._conn._now();
    const last = this._typingSent;
    if (last.isTyping === value && (!value || now - last.at < this._conn._typingRefreshMs)) return true;
    if (!this._conn._write({ type: 'typing', channelId: this.id, isTyping: value })) return false;
    this._typingSent = { isTyping: value, at: now };
    return true;
  }

  /**
   * Set this user's presence in this channel. Remembered across reconnects.
   * @param {PresenceStatus} status
   * @returns {boolean} Whether the frame went out now.
   */
  setPresence(status) {
    if (!STATUSES.includes(status)) throw new RangeError(`Unknown status: ${status}`);
    this._presence = status;
    return this._announcePresence();
  }

  /**
   * Move this user's read cursor (never back). Told to the server now, or
   * once the channel is live again.
   * @param {number} [seq]  Default: the last message delivered.
   * @returns {boolean} Whether the cursor moved.
   */
  markRead(seq) {
    let target = seq === undefined ? this._seq.lastSeq : toSeq(seq);
    if (seq !== undefined && (target === null || target < 1)) {
      throw new RangeError('seq must be an integer of at least 1');
    }
    if (target === null || target < 1) return false;
    if (this._seq.lastSeq !== null && target > this._seq.lastSeq) target = this._seq.lastSeq;
    if (this._readSeq !== null && target <= this._readSeq) return false;
    this._readSeq = target;
    this._readPending = target;
    this._flushRead();
    this._unreadChanged();
    return true;
  }

  /**
   * A page of older messages (or of one thread's replies), newest page first.
   * @param {{beforeSeq?: number, limit?: number, threadId?: string}} [options]
   * @returns {Promise<HistoryPage>}
   */
  history(options = {}) {
    const { beforeSeq, limit = 50, threadId } = options;
    if (beforeSeq !== undefined && beforeSeq !== null && (!Number.isSafeInteger(beforeSeq) || beforeSeq < 1)) {
      throw new RangeError('beforeSeq must be an integer of at least 1');
    }
    if (!Number.isSafeInteger(limit) || limit < 1 || limit > 100) {
      throw new RangeError('limit must be an integer from 1 to 100');
    }
    if (threadId !== undefined && threadId !== null && (typeof threadId !== 'string' || !threadId || threadId.length > 128)) {
      throw new TypeError('threadId must be a string of 1 to 128 characters');
    }
    if (this._ended) {
      return quiet(Promise.reject(this._endError()));
    }
    /** @type {Record<string, unknown>} */
    const frame = { type: 'history', channelId: this.id, limit };
    if (beforeSeq !== undefined && beforeSeq !== null) frame.beforeSeq = beforeSeq;
    if (threadId !== undefined && threadId !== null) frame.threadId = threadId;
    return this._conn._requestHistory(this, frame);
  }

  /**
   * Leave the channel. Its unacknowledged messages fail (`unsubscribed`),
   * pending pages are rejected, message iterators end.
   * @returns {Promise<void>} Resolves when the server confirmed (or the socket is gone).
   */
  unsubscribe() {
    if (this._ended) return Promise.resolve();
    const conn = this._conn;
    const told = this._subscribedOn !== 0 && this._subscribedOn === conn._link.connId && conn._link.writable;
    this._end('unsubscribed', { message: 'Unsubscribed', code: 'unsubscribed', channelId: this.id });
    if (!told) return Promise.resolve();
    return new Promise((resolve) => {
      conn._leaving.set(this.id, resolve);
      conn._write({ type: 'unsubscribe', channelId: this.id });
    });
  }

  /**
   * Messages from now on, as an async iterator (ends on unsubscribe or a
   * refusal for good). `for await (const m of channel) ...` does the same.
   * @returns {AsyncIterableIterator<ChatMessage>}
   */
  messages() {
    /** @type {ChatMessage[]} */
    const queue = [];
    /** @type {((r: IteratorResult<ChatMessage>) => void) | null} */
    let waiting = null;
    let done = this._ended;
    const finish = () => {
      done = true;
      off();
      this._iterators.delete(finish);
      if (waiting) {
        waiting({ value: undefined, done: true });
        waiting = null;
      }
    };
    const off = this.on('message', (message) => {
      if (waiting) {
        waiting({ value: message, done: false });
        waiting = null;
      } else {
        queue.push(message);
      }
    });
    this._iterators.add(finish);
    if (done) finish();
    return {
      next: () => {
        if (queue.length > 0) return Promise.resolve({ value: queue.shift(), done: false });
        if (done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => {
          waiting = resolve;
        });
      },
      return: () => {
        finish();
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  [Symbol.asyncIterator]() {
    return this.messages();
  }

  // --- internals ------------------------------------------------------------

  /** @private */
  _enqueue(outgoing, frame) {
    const { promise, resolve, reject } = deferred();
    this._outbox.add({
      clientMsgId: outgoing.clientMsgId,
      content: outgoing.content,
      threadId: outgoing.threadId,
      frame,
      sentOn: 0,
      held: false,
      outgoing,
      promise,
      resolve,
      reject,
    });
    this._emit('outgoing', outgoing);
    this._conn._pump();
    return /** @type {Promise<AckFrame>} */ (promise);
  }

  /** @param {OutgoingMessage} outgoing */
  _retry(outgoing) {
    if (outgoing.state !== 'failed' || !this._failed.has(outgoing.clientMsgId)) {
      throw new Error('Only a failed message can be retried');
    }
    if (this._ended) throw new Error(`Channel ${this.id} is ${this._state}`);
    this._failed.delete(outgoing.clientMsgId);
    outgoing.state = 'queued';
    outgoing.error = undefined;
    /** @type {Record<string, unknown>} */
    const payload = { type: 'message', channelId: this.id, content: outgoing.content, clientMsgId: outgoing.clientMsgId };
    if (outgoing.threadId !== undefined) payload.threadId = outgoing.threadId;
    return this._enqueue(outgoing, JSON.stringify(payload));
  }

  /** @param {OutgoingMessage} outgoing */
  _discard(outgoing) {
    if (!this._failed.delete(outgoing.clientMsgId)) return;
    outgoing.discarded = true;
    this._emit('outgoing', outgoing);
  }

  /** Send `subscribe` (resuming after the last seq delivered) if the socket is open. */
  _subscribe() {
    const conn = this._conn;
    if (this._ended || !conn._link.writable || this._subscribedOn === conn._link.connId) return;
    this._clearRetry();
    /** @type {Record<string, unknown>} */
    const frame = { type: 'subscribe', channelId: this.id };
    if (this._seq.lastSeq !== null) frame.afterSeq = this._seq.lastSeq;
    this._subscribedOn = conn._link.connId;
    this._live = false;
    conn._write(frame);
    this._setState(this._everLive ? 'resuming' : 'subscribing', {});
  }

  /** The socket is gone: the channel resumes on the next one. */
  _socketLost() {
    const wasLive = this._live;
    this._live = false;
    this._subscribedOn = 0;
    this._clearRetry();
    this._seq.stop();
    this._outbox.detach();
    this._typingSent = { isTyping: false, at: 0 };
    if (this._ended) return;
    if (wasLive) this._setState('resuming', {});
    else if (this._state === 'retrying') this._setState(this._everLive ? 'resuming' : 'subscribing', {});
    this._goStale();
  }

  /** @private */
  _goStale() {
    const typists = Array.from(this._typing.entries());
    this._typing.clear();
    for (const [userId, username] of typists) {
      // Nobody will say they stopped: they are no longer known to type.
      this._emit('typing', { type: 'typing', channelId: this.id, userId, username, isTyping: false, stale: true });
    }
    if (!this._stale) {
      this._stale = true;
      this._emitOnline();
    }
  }

  /** A frame about this channel. */
  _onFrame(frame) {
    switch (frame.type) {
      case 'initial_state':
        this._onInitialState(frame);
        return;
      case 'error':
        this._onError(frame);
        return;
      default:
        break;
    }
    if (!this._live) return; // before our initial_state: left over from an older subscription
    switch (frame.type) {
      case 'message': {
        const message = normalizeMessage(frame.message);
        if (message) this._seq.accept(message);
        break;
      }
      case 'sync_complete':
        this._seq.finishSync();
        this._emit('syncComplete', frame);
        break;
      case 'ack':
        this._onAck(frame);
        break;
      case 'typing':
        if (typeof frame.userId !== 'string') break;
        if (frame.isTyping) this._typing.set(frame.userId, String(frame.username ?? ''));
        else this._typing.delete(frame.userId);
        this._emit('typing', frame);
        break;
      case 'presence':
        this._onPresence(frame);
        break;
      case 'presence_diff':
        this._applyDiff(Array.isArray(frame.joins) ? frame.joins : [], Array.isArray(frame.leaves) ? frame.leaves : []);
        this._emit('presenceDiff', frame);
        this._emitOnline();
        break;
      case 'user_connected':
        this._applyDiff([{ userId: frame.userId, username: frame.username, status: 'online' }], []);
        this._emitOnline();
        break;
      case 'user_disconnected':
        this._applyDiff([], [{ userId: frame.userId, username: frame.username }]);
        this._emitOnline();
        break;
      case 'read':
        this._onRead(frame);
        break;
      case 'history':
        this._conn._onHistory(this, frame);
        break;
      default:
        break; // unknown frames are ignored (forward compatibility)
    }
  }

  /** @private */
  _onInitialState(frame) {
    const conn = this._conn;
    if (this._ended || this._live || this._subscribedOn !== conn._link.connId) return;
    this._live = true;
    const resumed = this._seq.lastSeq !== null;
    const { first, reset } = this._seq.open(frame.lastSeq);
    if (reset) {
      this._emit('error', {
        message: 'Channel history was reset on the server',
        code: 'history_reset',
        channelId: this.id,
      });
    }
    // The online list, fresh.
    this._online.clear();
    const users = Array.isArray(frame.onlineUsers) ? frame.onlineUsers : [];
    for (const u of users) {
      if (u && typeof u.userId === 'string') this._online.set(u.userId, { ...u });
    }
    this._onlineCount = Number.isSafeInteger(frame.onlineCount) ? frame.onlineCount : this._online.size;
    this._stale = false;
    if (conn._userId === null && users[0] && typeof users[0].userId === 'string') {
      conn._userId = users[0].userId;
    }
    // The read cursor: the server's, unless this client moved it further.
    const serverRead = toSeq(frame.readSeq);
    if (serverRead !== null) {
      if (this._readSeq === null || serverRead > this._readSeq) this._readSeq = serverRead;
      if (this._readPending !== null && this._readPending <= serverRead) this._readPending = null;
    }
    this._emit('initialState', frame);
    this._seq.initial(frame.messages, frame.lastSeq, first);
    if (resumed && !first) this._seq.beginSync(); // the missed messages follow, then sync_complete
    this._everLive = true;
    this._setState('live', {});
    if (!this._readySettled) {
      this._readySettled = true;
      this._ready.resolve(this);
    }
    this._emitOnline();
    this._announcePresence();
    this._flushRead();
    this._unreadChanged();
    conn._pump();
    conn._pumpHistory();
  }

  /** @private */
  _onAck(frame) {
    if (typeof frame.clientMsgId !== 'string') return;
    const entry = this._outbox.take(frame.clientMsgId);
    if (entry === undefined) return; // a repeated ack (after a deduplicated resend)
    const outgoing = entry.outgoing;
    const seq = toSeq(frame.seq);
    outgoing.state = 'acked';
    outgoing.ack = frame;
    outgoing.delivered = seq !== null && this._seq.lastSeq !== null && seq <= this._seq.lastSeq;
    if (!outgoing.delivered && typeof frame.id === 'string') this._awaiting.set(frame.id, outgoing);
    // The server moved this user's cursor to the message it sent.
    if (seq !== null && this._readSeq !== null && seq > this._readSeq) this._readSeq = seq;
    this._emit('ack', frame);
    this._emit('outgoing', outgoing);
    entry.resolve(frame);
    this._unreadChanged();
    this._conn._pump();
  }

  /** @private */
  _onError(frame) {
    const err = errorOf(frame);
    const id = typeof frame.clientMsgId === 'string' ? frame.clientMsgId : undefined;
    const retryAfterMs = /** @type {number | undefined} */ (err.retryAfterMs);
    const entry = id === undefined ? undefined : this._outbox.get(id);
    if (entry !== undefined) {
      if (err.retryable === true) {
        this._outbox.hold(id, retryAfterMs ?? this._conn._baseDelayMs);
      } else {
        this._outbox.take(id);
        this._fail(entry, err);
        this._conn._pump();
      }
    } else if (!this._live && this._subscribedOn !== 0 && !this._ended && id === undefined) {
      // The answer to our subscribe.
      this._emit('error', err);
      if (RETRYABLE_SUBSCRIBE.has(String(err.code))) this._retrySubscribe(err, retryAfterMs);
      else if (err.code !== 'already_subscribed') this._end('failed', err);
      return;
    } else if (this._live && id === undefined) {
      if (err.code === 'not_subscribed') {
        // The server no longer holds this subscription: take it up again.
        this._live = false;
        this._subscribedOn = 0;
        this._seq.stop();
        this._outbox.detach();
        this._subscribe();
      } else if (err.code === 'rate_limited' || err.code === 'unavailable') {
        this._conn._historyRefused(this, retryAfterMs ?? this._conn._baseDelayMs);
      }
    }
    this._emit('error', err);
  }

  /** @private */
  _retrySubscribe(err, retryAfterMs) {
    const delayMs = retryAfterMs ?? this._conn._baseDelayMs;
    this._subscribedOn = 0;
    this._clearRetry();
    this._setState('retrying', { error: err, retryAfterMs: delayMs });
    this._retryTimer = this._conn._setTimeout(() => {
      this._retryTimer = null;
      this._subscribe();
    }, delayMs);
  }

  /** @private */
  _clearRetry() {
    if (this._retryTimer !== null) {
      this._conn._clearTimeout(this._retryTimer);
      this._retryTimer = null;
    }
  }

  /**
   * A message refused for good.
   * @private
   */
  _fail(entry, err) {
    const outgoing = entry.outgoing;
    outgoing.state = 'failed';
    outgoing.error = err;
    this._failed.set(outgoing.clientMsgId, outgoing);
    this._emit('outgoing', outgoing);
    entry.reject(requestError(err));
  }

  /** @private */
  _endError() {
    return new WaddleRequestError(`Channel ${this.id} is ${this._state}`, {
      code: this._state === 'failed' ? 'failed' : 'unsubscribed',
      channelId: this.id,
    });
  }

  /**
   * The channel ends: refused for good or unsubscribed.
   * @private
   * @param {'failed' | 'unsubscribed'} state
   * @param {Record<string, any>} err
   */
  _end(state, err) {
    const conn = this._conn;
    if (conn._channels.get(this.id) === this) conn._channels.delete(this.id);
    this._clearRetry();
    this._seq.stop();
    this._outbox.detach();
    this._live = false;
    this._subscribedOn = 0;
    this._setState(state, state === 'failed' ? { error: err } : {});
    for (const entry of Array.from(this._outbox.entries.values())) {
      this._outbox.take(entry.clientMsgId);
      this._fail(entry, { ...err, clientMsgId: entry.clientMsgId });
    }
    conn._dropHistory(this, requestError(err));
    if (!this._readySettled) {
      this._readySettled = true;
      this._ready.reject(requestError(err));
    }
    for (const finish of Array.from(this._iterators)) finish();
    this._goStale();
    conn._pump();
  }

  /** @private */
  _deliver(message) {
    let event = message;
    const own = typeof message.id === 'string' ? this._awaiting.get(message.id) : undefined;
    if (own !== undefined) {
      this._awaiting.delete(message.id);
      own.delivered = true;
      event = { ...message, clientMsgId: own.clientMsgId };
    }
    if (this._awaiting.size > 0) {
      // Acked messages whose seq went by without them (a gap given up on).
      for (const [id, outgoing] of this._awaiting) {
        if (toSeq(outgoing.ack?.seq) <= message.seq) this._awaiting.delete(id);
      }
    }
    if (message.userId === this._conn._userId && this._readSeq !== null && message.seq > this._readSeq) {
      this._readSeq = message.seq; // sending moves the sender's cursor
    }
    this._emit('message', event);
    this._unreadChanged();
  }

  /** @private */
  _onPresence(frame) {
    const user = this._online.get(frame.userId);
    if (user !== undefined && typeof frame.status === 'string') user.status = frame.status;
    this._emit('presence', frame);
    if (user !== undefined) this._emitOnline();
  }

  /** @private */
  _applyDiff(joins, leaves) {
    for (const j of joins) {
      if (!j || typeof j.userId !== 'string') continue;
      if (!this._online.has(j.userId)) this._onlineCount += 1;
      this._online.set(j.userId, { ...this._online.get(j.userId), ...j });
    }
    for (const l of leaves) {
      if (!l || typeof l.userId !== 'string') continue;
      this._online.delete(l.userId);
      this._onlineCount = Math.max(this._online.size, this._onlineCount - 1);
    }
  }

  /** @private */
  _onRead(frame) {
    const seq = toSeq(frame.seq);
    if (seq === null || typeof frame.userId !== 'string') return;
    if (frame.userId === this._conn._userId) {
      // This user read on another device.
      if (this._readSeq === null || seq > this._readSeq) {
        this._readSeq = seq;
        this._unreadChanged();
      }
      return;
    }
    const before = this._receipts.get(frame.userId);
    if (before !== undefined && seq <= before) return;
    this._receipts.set(frame.userId, seq);
    this._emit('receipt', { userId: frame.userId, seq, channelId: this.id });
  }

  /** @private */
  _flushRead() {
    if (!this._live || this._readPending === null) return;
    if (this._conn._write({ type: 'read', channelId: this.id, seq: this._readPending })) this._readPending = null;
  }

  /** Tell the server this user's status here, if it is not `online` or was set. */
  _announcePresence() {
    const status = this._presence ?? this._conn._presence;
    if (status === null || !this._live) return false;
    const me = this._conn._userId === null ? undefined : this._online.get(this._conn._userId);
    // Nothing to tell when the server already lists this status (a new
    // subscription starts with the socket's last status, `online` at first).
    if ((me?.status ?? 'online') === status) return true;
    if (!this._conn._write({ type: 'presence', channelId: this.id, status })) return false;
    if (me !== undefined) {
      me.status = status;
      this._emitOnline();
    }
    return true;
  }

  /** @private */
  _unreadChanged() {
    const snapshot = `${this._readSeq}|${this.unreadCount}|${this._seq.lastSeq}`;
    if (snapshot === this._unreadSnapshot) return;
    this._unreadSnapshot = snapshot;
    this._emit('unread', {
      channelId: this.id,
      readSeq: this._readSeq,
      unreadCount: this.unreadCount,
      lastSeq: this._seq.lastSeq,
    });
  }

  /** @private */
  _emitOnline() {
    this._emit('online', {
      channelId: this.id,
      users: this.onlineUsers,
      count: this._onlineCount,
      stale: this._stale,
    });
  }

  /**
   * @private
   * @param {ChannelState} state
   * @param {Record<string, unknown>} detail
   */
  _setState(state, detail) {
    const previous = this._state;
    if (previous === state && state !== 'retrying') return;
    this._state = state;
    this._emit('state', { ...detail, channelId: this.id, state, previous });
  }
}
