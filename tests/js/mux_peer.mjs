// Test helpers for protocol v1.1 (WaddleConnection): frames as the edge
// sends them, a connection wired to a scriptable peer, a fake network and
// a WebSocket that hides why a handshake failed, as browsers do.

import { WaddleConnection } from '../../edge/static/waddle.js';
import { WebSocket } from './peer.mjs';

/** A JWT-shaped token whose `sub` is `me` (the client reads it, never checks it). */
export const TOKEN = `eyJhbGciOiJIUzI1NiJ9.${Buffer.from('{"sub":"me","username":"Me"}').toString('base64url')}.c2ln`;

/**
 * An initial_state frame of a v1.1 subscription.
 * @param {string} channelId
 * @param {{lastSeq?: number, messages?: any[], onlineUsers?: any[], onlineCount?: number,
 *          readSeq?: number, unreadCount?: number}} [fields]
 */
export function state(channelId, fields = {}) {
  const frame = {
    type: 'initial_state',
    channelId,
    messages: fields.messages ?? [],
    onlineUsers: fields.onlineUsers ?? [{ userId: 'me', username: 'Me', joinedAt: 1, status: 'online' }],
    onlineCount: fields.onlineCount ?? (fields.onlineUsers ?? [1]).length,
    lastSeq: fields.lastSeq ?? 0,
  };
  if (fields.readSeq !== undefined) frame.readSeq = fields.readSeq;
  if (fields.unreadCount !== undefined) frame.unreadCount = fields.unreadCount;
  return frame;
}

/**
 * A chat message of `channelId` as the server would send it.
 * @param {string} channelId
 * @param {number} seq
 * @param {Record<string, unknown>} [extra]
 */
export function msg(channelId, seq, extra = {}) {
  return {
    id: `${channelId}-id-${seq}`,
    seq,
    channelId,
    userId: 'u1',
    username: 'alice',
    avatarUrl: null,
    content: `${channelId} m${seq}`,
    timestamp: 1_700_000_000_000 + seq,
    threadId: null,
    ...extra,
  };
}

/** @param {string} channelId @param {number} seq @param {Record<string, unknown>} [extra] */
export function msgFrame(channelId, seq, extra) {
  return { type: 'message', channelId, message: msg(channelId, seq, extra) };
}

/** Ack of a client `message` frame, as the channel owner sends it. */
export function ackFrame(frame, seq, id = `${frame.channelId}-id-${seq}`) {
  return { type: 'ack', channelId: frame.channelId, clientMsgId: frame.clientMsgId, id, seq, timestamp: 1 };
}

/**
 * Answer every `subscribe` on `conn` with `make(frame)` (default: an
 * initial_state whose lastSeq is the afterSeq asked for, or 0).
 * @param {import('./peer.mjs').PeerConnection} conn
 * @param {(frame: any) => any | any[] | null} [make]
 */
export function answerSubscribes(conn, make) {
  conn.ws.on('message', (data) => {
    const frame = JSON.parse(data.toString());
    if (frame.type !== 'subscribe') return;
    const answer = make ? make(frame) : state(frame.channelId, { lastSeq: frame.afterSeq ?? 0 });
    for (const f of Array.isArray(answer) ? answer : answer ? [answer] : []) conn.send(f);
  });
}

/**
 * A WaddleConnection wired to `peer`: heartbeat, network watching and history
 * timeouts off unless asked for.
 * @param {import('./peer.mjs').Peer} peer
 * @param {Partial<import('../../edge/static/waddle/connection.js').WaddleConnectionOptions>} [options]
 */
export function makeConnection(peer, options = {}) {
  return new WaddleConnection({
    url: peer.url,
    token: TOKEN,
    WebSocket,
    heartbeatMs: 0,
    network: null,
    historyTimeoutMs: 0,
    ...options,
  });
}

/** `navigator.onLine` and its events, switchable. */
export class FakeNetwork extends EventTarget {
  constructor(onLine = true) {
    super();
    this.onLine = onLine;
  }

  /** @param {boolean} onLine */
  set(onLine) {
    this.onLine = onLine;
    this.dispatchEvent(new Event(onLine ? 'online' : 'offline'));
  }
}

/**
 * A `ws` WebSocket whose `error` event says nothing, like a browser's: a
 * refused handshake cannot be told from a network failure.
 */
export class OpaqueWebSocket extends WebSocket {
  addEventListener(type, fn, options) {
    if (type === 'error') return super.addEventListener('error', () => fn({ type: 'error' }), options);
    return super.addEventListener(type, fn, options);
  }
}

/** The frames of `type` a peer connection received. */
export const framesOf = (conn, type) => conn.frames.filter((f) => f.type === type);
