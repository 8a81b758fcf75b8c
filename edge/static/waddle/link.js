// The socket underneath both clients: gets a token, opens the WebSocket
// (the token travels only as the `bearer.<jwt>` subprotocol), re-opens it
// with full-jitter exponential backoff, watches liveness with pings, and
// reports state changes. What a frame means and which closes end the
// client for good is the owner's business, through hooks.

import {
  CloseCode,
  OPEN,
  PROTOCOL,
  backoffDelay,
  describe,
  utf8Decoder,
} from './core.js';

/**
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'offline' | 'closed'} LinkState
 *
 * @typedef {object} TokenRequest  What a token function is told (protocol v1.1 clients).
 * @property {number} attempt       Connection attempts so far (0 for the first).
 * @property {'connect' | 'reconnect' | 'unauthorized' | 'expired'} reason  Why a
 *   token is needed: `unauthorized` when the server refused the last one
 *   (HTTP 401), `expired` after a 4001 close: fetch a fresh token then.
 *
 * @typedef {object} NetworkStatus  What `navigator`/`window` offer in browsers.
 * @property {boolean} onLine
 * @property {(type: 'online', fn: () => void) => void} addEventListener
 * @property {(type: 'online', fn: () => void) => void} removeEventListener
 *
 * @typedef {object} LinkHooks
 * @property {() => void} onOpen  The socket is open; runs before the `open` state.
 * @property {(frame: any) => void} onFrame  A parsed frame (a JSON object).
 * @property {() => void} onBadFrame  A frame that is not JSON.
 * @property {() => void} onDetach  The socket is gone (closed, abandoned, replaced).
 * @property {(change: object) => void} onState
 * @property {(err: object) => void} onError
 * @property {(code: number, reason: string) => boolean} stopOn  Whether a close
 *   ends the client for good (the hook reports why); otherwise it reconnects.
 * @property {(detail: object) => void} [onAuth]  The server refused the token.
 */

/** Browsers' view of the network, when there is one. */
function defaultNetwork() {
  const nav = globalThis.navigator;
  if (!nav || typeof nav.onLine !== 'boolean' || typeof globalThis.addEventListener !== 'function') {
    return null;
  }
  return {
    get onLine() {
      return nav.onLine;
    },
    addEventListener: (type, fn) => globalThis.addEventListener(type, fn),
    removeEventListener: (type, fn) => globalThis.removeEventListener(type, fn),
  };
}

/**
 * The HTTP status of a refused handshake, when the WebSocket implementation
 * tells it (the `ws` package does: "Unexpected server response: 401").
 * @param {any} event
 * @returns {number | null}
 */
function handshakeStatus(event) {
  const text = `${event?.message ?? ''} ${event?.error?.message ?? ''}`;
  const match = /server response: (\d{3})\b/i.exec(text);
  return match ? Number(match[1]) : null;
}

export class SocketLink {
  /**
   * @param {object} options  See WaddleClientOptions / WaddleConnectionOptions.
   * @param {LinkHooks} hooks
   */
  constructor(options, hooks) {
    this.url = options.url;
    /** @private */ this._hooks = hooks;
    /** @private */ this._token = options.token;
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
    // Protocol v1.1 clients: token requests with a reason, refused tokens
    // detected, an `offline` state, `retryNow` in `reconnecting` changes.
    /** @private */ this._extended = options.extended === true;
    /** @private */ this._network = this._extended
      ? options.network === undefined
        ? defaultNetwork()
        : options.network
      : null;
    const fetchFn = options.fetch === undefined ? globalThis.fetch : options.fetch;
    // Called unbound: browsers refuse `fetch` called as a method of another object.
    /** @private */ this._fetch =
      this._extended && options.probe !== false && typeof fetchFn === 'function'
        ? (input, init) => fetchFn(input, init)
        : null;
    /** @private */ this._probeTimeoutMs = options.probeTimeoutMs ?? 5000;

    /** @type {LinkState} */
    this.state = 'closed';
    /** @type {any} */
    this.ws = null;
    /** @type {string | null} The token of the current (or last) connection attempt. */
    this.token = null;
    /** Id of the current connection attempt; frames of older ones are ignored. */
    this.connId = 0;
    /** @private */ this._everOpened = false;
    /** Closed for good: by close(), or a close the owner will not retry. */
    this.stopped = false;
    /** @private */ this._attempt = 0;
    /** @private */ this._attempts = 0;
    /** @private */ this._openedAt = 0;
    /** @private */ this._reconnectTimer = null;
    /** @private */ this._heartbeatTimer = null;
    /** @private @type {TokenRequest['reason'] | null} */
    this._nextReason = null;
    /** @private */ this._listening = false;
    /** @private */ this._onOnline = () => {
      if (!this.stopped && this.ws === null && (this.state === 'offline' || this.state === 'reconnecting')) {
        this.retryNow();
      }
    };
  }

  /** Whether frames can be written now (also during the open handshake hooks). */
  get writable() {
    return this.ws !== null && this.ws.readyState === OPEN;
  }

  /** Open and announced as `open`. */
  isOpen() {
    return this.writable && this.state === 'open';
  }

  /** @param {string} text @returns {boolean} */
  write(text) {
    if (!this.writable) return false;
    this.ws.send(text);
    return true;
  }

  /** Open the connection; on a closed link, reopen it. */
  connect() {
    if (this.ws !== null) return;
    this.stopped = false;
    this._listen(true);
    this._cancelReconnect();
    this._setState(this._everOpened ? 'reconnecting' : 'connecting', {});
    void this._open();
  }

  /**
   * Not connected (waiting to reconnect, offline, or between a refused
   * handshake and the next attempt): try now instead of at the end of the
   * delay. The backoff is not reset.
   * @returns {boolean} Whether an attempt was started.
   */
  retryNow() {
    if (this.stopped || this.ws !== null || this.state === 'closed' || this.state === 'open') return false;
    this._cancelReconnect();
    if (this.state === 'offline') this._setState('reconnecting', { attempt: this._attempt, delayMs: 0 });
    void this._open();
    return true;
  }

  /** @param {string | ((request?: TokenRequest) => string | Promise<string>)} token */
  setToken(token) {
    if (typeof token !== 'string' && typeof token !== 'function') {
      throw new TypeError('token must be a string or a function');
    }
    this._token = token;
  }

  /**
   * Close for good (no reconnect).
   * @param {number} code
   * @param {string} reason
   */
  close(code, reason) {
    this.stopped = true;
    this._listen(false);
    this._cancelReconnect();
    const ws = this.ws;
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
  _listen(on) {
    const net = this._network;
    if (!net || on === this._listening) return;
    this._listening = on;
    if (on) net.addEventListener('online', this._onOnline);
    else net.removeEventListener('online', this._onOnline);
  }

  /** @private */
  async _getToken() {
    if (typeof this._token !== 'function') return this._token;
    if (!this._extended) return this._token();
    const reason = this._nextReason ?? (this._attempts === 0 ? 'connect' : 'reconnect');
    return this._token({ attempt: this._attempts, reason });
  }

  /** @private */
  async _open() {
    const connId = ++this.connId;
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      if (this.stopped || connId !== this.connId) return;
      this._hooks.onError({ message: `Could not get a token: ${describe(err)}`, code: 'token' });
      this._scheduleReconnect({ code: CloseCode.ABNORMAL, reason: 'token unavailable' });
      return;
    }
    if (this.stopped || connId !== this.connId) return;
    this._attempts += 1;
    this._nextReason = null;
    let ws;
    try {
      ws = new this._WebSocket(this.url, [PROTOCOL, `bearer.${token}`]);
    } catch (err) {
      this._hooks.onError({ message: `Could not open a WebSocket: ${describe(err)}`, code: 'connect' });
      this._scheduleReconnect({ code: CloseCode.ABNORMAL, reason: 'constructor failed' });
      return;
    }
    this.ws = ws;
    this.token = token;
    let opened = false;
    /** @type {number | null} */
    let status = null;
    if ('binaryType' in ws) ws.binaryType = 'arraybuffer';
    ws.addEventListener('open', () => {
      opened = true;
      if (ws === this.ws) this._onOpen();
    });
    ws.addEventListener('message', (event) => {
      if (ws === this.ws) this._onData(event.data);
    });
    ws.addEventListener('close', (event) => {
      if (ws !== this.ws) return;
      if (!opened && this._extended) this._onRefused(token, status, event.code, event.reason);
      else this._onClose(event.code, event.reason);
    });
    ws.addEventListener('error', (event) => {
      // A close event always follows; reconnection is handled there.
      if (!opened) status = handshakeStatus(event);
    });
  }

  /** @private */
  _onOpen() {
    this._everOpened = true;
    this._openedAt = this._now();
    this._hooks.onOpen();
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
      this._hooks.onBadFrame();
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    this._hooks.onFrame(frame);
  }

  /**
   * The handshake failed. Browsers do not say why: when the WebSocket did not
   * tell the HTTP status, ask the endpoint itself (a plain GET with the same
   * token answers 401 for a refused token, 400 for a good one), then retry.
   * @private
   */
  async _onRefused(token, status, code, reason) {
    this._detach();
    this._openedAt = 0;
    if (this.stopped) return;
    const connId = this.connId;
    /** @type {number | null} */
    let retryAfterMs = null;
    if (status === null && this._fetch !== null) {
      const answer = await this._probe(token);
      if (this.stopped || connId !== this.connId || this.ws !== null) return;
      if (answer !== null) {
        status = answer.status;
        retryAfterMs = answer.retryAfterMs;
      }
    }
    if (status === 401) {
      this._nextReason = 'unauthorized';
      this._hooks.onAuth?.({
        message: 'The server refused the token',
        code: 'unauthorized',
        status,
      });
      if (this.stopped || connId !== this.connId || this.ws !== null) return;
    }
    /** @type {Record<string, unknown>} */
    const detail = { code, reason };
    if (status !== null) detail.status = status;
    this._scheduleReconnect(detail, retryAfterMs ?? 0);
  }

  /**
   * @private
   * @param {string} token
   * @returns {Promise<{status: number, retryAfterMs: number | null} | null>}
   */
  async _probe(token) {
    const url = this.url.replace(/^ws/, 'http');
    const abort = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = globalThis.setTimeout(() => abort?.abort(), this._probeTimeoutMs);
    try {
      const response = await this._fetch(url, {
        headers: { authorization: `Bearer ${token}` },
        cache: 'no-store',
        credentials: 'omit',
        redirect: 'manual',
        signal: abort?.signal,
      });
      await response.body?.cancel?.().catch(() => {});
      const after = Number(response.headers?.get?.('retry-after'));
      return {
        status: response.status,
        retryAfterMs: Number.isFinite(after) && after > 0 ? after * 1000 : null,
      };
    } catch {
      return null;
    } finally {
      globalThis.clearTimeout(timer);
    }
  }

  /** @private */
  _onClose(code, reason) {
    this._detach();
    const stableFor = this._now() - this._openedAt;
    if (this._openedAt && stableFor >= this._stableAfterMs) this._attempt = 0;
    this._openedAt = 0;
    if (this.stopped) {
      this._setState('closed', { code, reason });
      return;
    }
    if (this._hooks.stopOn(code, reason)) {
      this.stopped = true;
      this._listen(false);
      this._setState('closed', { code, reason });
      return;
    }
    if (code === CloseCode.TOKEN_EXPIRED) this._nextReason = 'expired';
    this._scheduleReconnect({ code, reason });
  }

  /**
   * @private
   * @param {Record<string, unknown>} detail
   * @param {number} [minDelayMs]  A pause the server asked for (Retry-After).
   */
  _scheduleReconnect(detail, minDelayMs = 0) {
    this._detach();
    if (this._network && this._network.onLine === false) {
      // No network: waiting for it costs no attempts; `online` retries at once.
      this._setState('offline', detail, true);
      return;
    }
    const attempt = this._attempt;
    this._attempt += 1;
    const delayMs = Math.max(
      minDelayMs,
      backoffDelay(attempt, this._random(), this._baseDelayMs, this._maxDelayMs),
    );
    /** @type {Record<string, unknown>} */
    const change = { ...detail, attempt, delayMs };
    if (this._extended) change.retryNow = () => this.retryNow();
    this._setState('reconnecting', change, true);
    if (this.stopped || this.ws !== null || this._reconnectTimer !== null) return;
    this._reconnectTimer = this._setTimeout(() => {
      this._reconnectTimer = null;
      if (this.stopped || this.ws !== null) return;
      void this._open();
    }, delayMs);
  }

  /** @private Forget the current socket; its late events are ignored. */
  _detach() {
    this.ws = null;
    this.connId += 1;
    if (this._heartbeatTimer !== null) {
      this._clearTimeout(this._heartbeatTimer);
      this._heartbeatTimer = null;
    }
    this._hooks.onDetach();
  }

  /** @private */
  _cancelReconnect() {
    if (this._reconnectTimer !== null) {
      this._clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
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
    const ws = this.ws;
    this._heartbeatTimer = this._setTimeout(() => {
      if (ws !== this.ws) return;
      this.write(JSON.stringify({ type: 'ping' }));
      this._heartbeatTimer = this._setTimeout(() => {
        if (ws !== this.ws) return;
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

  /**
   * @private
   * @param {LinkState} state
   * @param {object} detail
   * @param {boolean} [always] emit even when the state does not change
   */
  _setState(state, detail, always = false) {
    const previous = this.state;
    if (previous === state && !always) return;
    this.state = state;
    this._hooks.onState({ ...detail, state, previous });
  }
}
