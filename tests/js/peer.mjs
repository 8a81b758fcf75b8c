// Test helpers: a scriptable protocol peer on a real `ws` WebSocketServer,
// event waiters with deadlines, and recording timers.

import { WebSocketServer, WebSocket } from 'ws';

import { WaddleClient } from '../../edge/static/waddle.js';

export { WebSocket };

/**
 * Reject when `promise` does not settle within `ms`.
 * @template T
 * @param {Promise<T>} promise
 * @param {number} ms
 * @param {string} what
 * @returns {Promise<T>}
 */
export function within(promise, ms, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/**
 * Resolve with the next `type` event of `client` that satisfies `pred`.
 * @param {WaddleClient} client
 * @param {string} type
 * @param {(event: any) => boolean} [pred]
 * @param {number} [ms]
 */
export function nextEvent(client, type, pred = () => true, ms = 5000) {
  let off;
  const p = new Promise((resolve) => {
    off = client.on(type, (event) => {
      if (pred(event)) {
        off();
        resolve(event);
      }
    });
  });
  return within(p, ms, `client event ${type}`).finally(() => off());
}

/**
 * Record every `type` event of `client` in an array.
 * @param {WaddleClient} client
 * @param {string} type
 * @returns {any[]}
 */
export function record(client, type) {
  const events = [];
  client.on(type, (event) => events.push(event));
  return events;
}

/**
 * Timers that record each requested delay and fire on the next macrotask,
 * so backoff delays can be checked without waiting for them.
 */
export function instantTimers() {
  /** @type {number[]} */
  const delays = [];
  return {
    delays,
    setTimeout: (fn, ms) => {
      delays.push(ms);
      return setTimeout(fn, 0);
    },
    clearTimeout: (handle) => clearTimeout(handle),
  };
}

/** One server-side connection of the peer. */
export class PeerConnection {
  /**
   * @param {WebSocket} ws
   * @param {import('node:http').IncomingMessage} req
   */
  constructor(ws, req) {
    this.ws = ws;
    this.url = req.url;
    this.headers = req.headers;
    /** @type {any[]} */
    this.frames = [];
    /** @type {{pred: (f: any) => boolean, resolve: (f: any) => void}[]} */
    this._waiters = [];
    this.closed = new Promise((resolve) => {
      ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
    });
    ws.on('message', (data, isBinary) => {
      const frame = JSON.parse(isBinary ? Buffer.from(data).toString() : data.toString());
      this.frames.push(frame);
      this._waiters = this._waiters.filter((w) => {
        if (!w.pred(frame)) return true;
        w.resolve(frame);
        return false;
      });
    });
  }

  /**
   * Resolve with the first frame (already received or future) matching `pred`.
   * @param {(f: any) => boolean} pred
   * @param {number} [ms]
   */
  frame(pred, ms = 5000) {
    const seen = this.frames.find(pred);
    if (seen) return Promise.resolve(seen);
    return within(
      new Promise((resolve) => this._waiters.push({ pred, resolve })),
      ms,
      'a frame from the client',
    );
  }

  /**
   * Resolve once `n` frames of `type` have arrived.
   * @param {string} type
   * @param {number} n
   */
  async framesOfType(type, n, ms = 5000) {
    const count = () => this.frames.filter((f) => f.type === type).length;
    while (count() < n) {
      const before = this.frames.length;
      await this.frame((f) => this.frames.indexOf(f) >= before, ms);
    }
    return this.frames.filter((f) => f.type === type);
  }

  /** @param {object} frame */
  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  /** @param {number} code @param {string} [reason] */
  close(code, reason = '') {
    this.ws.close(code, reason);
  }

  /** Drop the TCP connection without a closing handshake (client sees 1006). */
  terminate() {
    this.ws.terminate();
  }
}

/**
 * A WebSocket server on 127.0.0.1, port 0, that selects `waddle.v1` and lets
 * each test script the server side.
 */
export class Peer {
  /**
   * @param {{
   *   onConnection?: (conn: PeerConnection, index: number) => void,
   *   verifyClient?: (info: any, cb: (ok: boolean, code?: number, msg?: string) => void) => void,
   * }} [options]
   */
  static async start(options = {}) {
    const peer = new Peer(options);
    await new Promise((resolve) => peer.wss.once('listening', resolve));
    return peer;
  }

  constructor(options) {
    /** @type {PeerConnection[]} */
    this.connections = [];
    this.handshakes = 0;
    this._waiters = [];
    this.wss = new WebSocketServer({
      host: '127.0.0.1',
      port: 0,
      handleProtocols: (protocols) => (protocols.has('waddle.v1') ? 'waddle.v1' : false),
      verifyClient: (info, cb) => {
        this.handshakes += 1;
        if (options.verifyClient) options.verifyClient(info, cb);
        else cb(true);
      },
    });
    this.wss.on('connection', (ws, req) => {
      const conn = new PeerConnection(ws, req);
      const index = this.connections.push(conn) - 1;
      if (options.onConnection) options.onConnection(conn, index);
      this._waiters = this._waiters.filter((w) => {
        if (w.index !== index) return true;
        w.resolve(conn);
        return false;
      });
    });
  }

  /** Base URL a client would be given (http, like the edge's). */
  get url() {
    return `http://127.0.0.1:${this.wss.address().port}`;
  }

  /**
   * Resolve with the `index`-th connection (0-based) once it is established.
   * @param {number} index
   * @returns {Promise<PeerConnection>}
   */
  connection(index, ms = 5000) {
    if (this.connections[index]) return Promise.resolve(this.connections[index]);
    return within(
      new Promise((resolve) => this._waiters.push({ index, resolve })),
      ms,
      `connection #${index}`,
    );
  }

  async stop() {
    for (const client of this.wss.clients) client.terminate();
    await new Promise((resolve) => this.wss.close(resolve));
  }
}

/**
 * A minimal initial_state frame.
 * @param {{lastSeq?: number, messages?: any[], onlineUsers?: any[]}} [fields]
 */
export function initialState(fields = {}) {
  return {
    type: 'initial_state',
    channelId: 'general',
    messages: fields.messages ?? [],
    onlineUsers: fields.onlineUsers ?? [],
    lastSeq: fields.lastSeq ?? 0,
  };
}

/**
 * A chat message as the server would send it.
 * @param {number} seq
 * @param {string} [content]
 */
export function chat(seq, content = `m${seq}`) {
  return {
    id: `id-${seq}`,
    seq,
    channelId: 'general',
    userId: 'u1',
    username: 'alice',
    content,
    timestamp: 1_700_000_000_000 + seq,
    threadId: null,
  };
}

/** @param {number} seq @param {string} [content] */
export function messageFrame(seq, content) {
  return { type: 'message', message: chat(seq, content) };
}

/**
 * A client wired to `peer`, heartbeat off unless asked for.
 * @param {Peer} peer
 * @param {Partial<import('../../edge/static/waddle.js').WaddleClientOptions>} [options]
 */
export function makeClient(peer, options = {}) {
  return new WaddleClient({
    url: peer.url,
    channelId: 'general',
    token: 'test.jwt.token',
    WebSocket,
    heartbeatMs: 0,
    ...options,
  });
}
