// Waddle realtime browser/Node client.
//
// A dependency-free ES module: load it with <script type="module"> in a
// browser, or import it from Node and pass a WebSocket constructor (for
// example the one from the `ws` package). It speaks both client protocols:
//
// * v1.1, `WaddleConnection`: one socket for all of a user's channels
//   (`GET /websocket`); `subscribe(channelId)` gives a channel handle. See
//   ./waddle/connection.js and docs/client-js.md.
//
//     import { WaddleConnection } from '/static/waddle.js';
//     const conn = new WaddleConnection({ url: location.origin, token });
//     const general = await conn.subscribe('general');
//     general.on('message', (m) => console.log(m.seq, m.username, m.content));
//     await general.send('hello');
//
// * v1, `WaddleClient`: one socket per channel.
//
//     import { WaddleClient } from '/static/waddle.js';
//     const client = new WaddleClient({ url: location.origin, channelId: 'general', token });
//     client.on('message', (m) => console.log(m.seq, m.username, m.content));
//     client.send('hello');
//
// Guarantees given to the application (both clients):
//   * every message seq is delivered through the `message` event exactly once
//     and in ascending order, across reconnects (history from `initial_state`
//     and replayed gaps included);
//   * every `send()` carries a `clientMsgId` and is kept until the server's
//     `ack`; unacknowledged messages are resent with the same id after a
//     reconnect (the server deduplicates them);
//   * the connection is re-established with exponential backoff and full
//     jitter after abnormal closes and after 1012/1013, never after
//     `close()`, a 1000 normal close from the server or a 1008 policy close;
//     after 4001 (token expired) v1 reconnects only when `token` is a function
//     that can supply a fresh token, v1.1 always (it emits `auth` first);
//   * messages refused with a retryable error (`Rate limited`, `Channel
//     temporarily unavailable`) stay pending and are resent after the
//     server's `retryAfterMs`.

import {
  CHANNEL_ID,
  CloseCode,
  Emitter,
  OPEN,
  PROTOCOL,
  STATUSES,
  backoffDelay,
  normalizeMessage,
  randomId,
  socketUrl,
  utf8,
} from './waddle/core.js';
import { SocketLink } from './waddle/link.js';
import { Outbox } from './waddle/outbox.js';
import { Sequencer } from './waddle/sequencer.js';

export { CHANNEL_ID, CloseCode, PROTOCOL, STATUSES, backoffDelay };
export {
  OutgoingMessage,
  WaddleChannel,
  WaddleConnection,
  WaddleRequestError,
  connectionSocketUrl,
} from './waddle/connection.js';

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
  return socketUrl(base, `/channel/${encodeURIComponent(channelId)}/websocket`);
}

/**
 * A Waddle channel connection (protocol v1) that survives network drops.
 */
export class WaddleClient extends Emitter {
  /** @param {WaddleClientOptions} options */
  constructor(options) {
    super();
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
    /** @private */ this._tokenIsFunction = typeof token === 'function';
    const setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    const clearTimeout = options.clearTimeout ?? ((h) => globalThis.clearTimeout(h));
    /** @private */ this._baseDelayMs = options.baseDelayMs ?? 1000;
    /** @private */ this._maxFrameBytes = options.maxFrameBytes ?? 32768;
    /** @private messages written and not yet answered, per connection */
    this._maxInFlight = options.maxInFlight ?? 8;
    /** @private @type {PresenceStatus | null} */
    this._presence = null;

    /** @private unacknowledged messages, in send order */
    this._outbox = new Outbox({ setTimeout, clearTimeout, onRelease: () => this._pump() });
    /** @private */
    this._seq = new Sequencer({
      deliver: (message) => this._emit('message', message),
      setTimeout,
      clearTimeout,
      syncTimeoutMs: options.syncTimeoutMs ?? 10000,
    });
    /** @private */
    this._link = new SocketLink(
      { ...options, url: this.url, setTimeout, clearTimeout },
      {
        onOpen: () => this._onOpen(),
        onFrame: (frame) => this._onFrame(frame),
        onBadFrame: () => this._emit('error', { message: 'Invalid frame from server', code: 'bad_frame' }),
        onDetach: () => {
          this._seq.stop();
          this._outbox.detach();
        },
        onState: (change) => this._emit('state', change),
        onError: (err) => this._emit('error', err),
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

  /** Highest sequence number delivered to the application (null before any). */
  get lastSeq() {
    return this._seq.lastSeq;
  }

  /** @returns {PendingMessage[]} Messages sent but not yet acknowledged, oldest first. */
  get pending() {
    return Array.from(this._outbox.entries.values(), ({ clientMsgId, content, threadId }) => ({
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
    return super.on(type, fn);
  }

  /**
   * @template {keyof WaddleEventMap} K
   * @param {K} type
   * @param {(event: WaddleEventMap[K]) => void} fn
   */
  off(type, fn) {
    super.off(type, fn);
  }

  /**
   * Open the connection (done automatically unless `autoConnect: false`).
   * Calling it on a closed client reopens it.
   */
  connect() {
    this._link.connect();
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
    if (this._link.stopped) throw new Error('WaddleClient is closed');
    const clientMsgId = randomId();
    const threadId = options.threadId ?? undefined;
    /** @type {Record<string, unknown>} */
    const payload = { type: 'message', content, clientMsgId };
    if (threadId !== undefined && threadId !== null) payload.threadId = threadId;
    const frame = JSON.stringify(payload);
    if (utf8.encode(frame).length > this._maxFrameBytes) {
      throw new RangeError('Message too long');
    }
    this._outbox.add({ clientMsgId, content, threadId, frame, sentOn: 0, held: false });
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
    this._link.close(code, reason);
  }

  // --- internals ----------------------------------------------------------

  /** @private */
  _onOpen() {
    // Announce what the server needs to know about this client before the
    // application sees `open`, so the order on the wire is: sync, presence,
    // then every unacknowledged message in the order it was sent.
    if (this._seq.lastSeq !== null) {
      this._seq.beginSync();
      this._raw({ type: 'sync', afterSeq: this._seq.lastSeq });
    }
    if (this._presence !== null && this._presence !== 'online') {
      this._raw({ type: 'presence', status: this._presence });
    }
    this._pump();
  }

  /** @private */
  _onFrame(frame) {
    switch (frame.type) {
      case 'initial_state':
        this._onInitialState(frame);
        break;
      case 'message': {
        const message = normalizeMessage(frame.message);
        if (message) this._seq.accept(message);
        break;
      }
      case 'sync_complete':
        this._seq.finishSync();
        this._emit('sync_complete', frame);
        break;
      case 'ack':
        if (this._outbox.take(frame.clientMsgId)) {
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
    if (retryable) this._outbox.hold(id, retryAfterMs ?? this._baseDelayMs);
    else if (id !== undefined && this._outbox.take(id)) this._pump();
    /** @type {WaddleError} */
    const err = { message: String(frame.message ?? 'Error'), code: frame.code };
    if (id !== undefined) err.clientMsgId = id;
    if (retryable) err.retryable = true;
    if (retryAfterMs !== undefined) err.retryAfterMs = retryAfterMs;
    this._emit('error', err);
  }

  /**
   * Write unacknowledged messages in send order while fewer than
   * `maxInFlight` are awaiting an answer on this connection.
   * @private
   */
  _pump() {
    // Not the `open` state: _onOpen pumps before it announces it.
    if (!this._link.writable) return;
    const connId = this._link.connId;
    const room = this._maxInFlight - this._outbox.inFlight(connId);
    this._outbox.pump(connId, room, (frame) => this._link.write(frame));
  }

  /** @private */
  _onInitialState(frame) {
    const { first, reset } = this._seq.open(frame.lastSeq);
    if (reset) {
      // The channel's history went backwards (a wiped development database):
      // nothing after our position will ever come, so start over.
      this._emit('error', {
        message: 'Channel history was reset on the server',
        code: 'history_reset',
      });
    }
    this._emit('initial_state', frame);
    this._seq.initial(frame.messages, frame.lastSeq, first);
  }

  /**
   * Whether a close ends the client for good (and why).
   * @private
   */
  _stopOn(code, reason) {
    const expired = code === CloseCode.TOKEN_EXPIRED;
    if (expired && this._tokenIsFunction) return false; // the function is asked for a fresh token
    if (code === CloseCode.POLICY_VIOLATION) {
      this._emit('error', {
        message: reason || 'Closed by the server for a policy violation',
        code: 'policy_violation',
        closeCode: code,
      });
      return true;
    }
    if (expired) {
      this._emit('error', { message: reason || 'Token expired', code: 'token_expired', closeCode: code });
      return true;
    }
    return code === CloseCode.NORMAL;
  }

  /** @private */
  _sendNow(payload) {
    return this._link.isOpen() && this._link.write(JSON.stringify(payload));
  }

  /** @private Send on the current socket during the open handshake. */
  _raw(payload) {
    if (this._link.ws !== null && this._link.ws.readyState === OPEN) this._link.write(JSON.stringify(payload));
  }
}
