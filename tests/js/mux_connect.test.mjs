// Protocol v1.1 connection: the endpoint, the token, connection states,
// retryNow, offline, and a refused token reported as `auth`.

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { test } from 'node:test';

import { WaddleConnection, connectionSocketUrl } from '../../edge/static/waddle.js';
import { Peer, WebSocket, instantTimers, nextEvent, record } from './peer.mjs';
import { FakeNetwork, OpaqueWebSocket, TOKEN, answerSubscribes, makeConnection } from './mux_peer.mjs';

const T = { timeout: 10_000 };
const offered = (conn) => conn.headers['sec-websocket-protocol'].split(/\s*,\s*/);

test('connects to /websocket with waddle.v1 and bearer.<jwt>, token never in the URL', T, async () => {
  const peer = await Peer.start();
  const conn = makeConnection(peer);
  try {
    const opened = nextEvent(conn, 'state', (e) => e.state === 'open');
    const server = await peer.connection(0);
    await opened;
    assert.equal(server.url, '/websocket');
    assert.deepEqual(offered(server), ['waddle.v1', `bearer.${TOKEN}`]);
    assert.equal(server.headers.authorization, undefined);
    assert.equal(conn.userId, 'me', 'read from the token');
    assert.deepEqual(server.frames, [], 'no channel is joined before subscribe');
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('builds the multiplexed URL from http(s)/ws(s) bases with a path prefix', T, () => {
  assert.equal(connectionSocketUrl('http://h:8080'), 'ws://h:8080/websocket');
  assert.equal(connectionSocketUrl('https://h/chat/'), 'wss://h/chat/websocket');
  assert.equal(connectionSocketUrl('ws://h'), 'ws://h/websocket');
  assert.throws(() => connectionSocketUrl('ftp://h'), TypeError);
  assert.throws(() => new WaddleConnection({ url: 'http://h', WebSocket }), TypeError);
  assert.throws(() => new WaddleConnection({ token: 't', WebSocket }), TypeError);
});

test('states: connecting, open, reconnecting with its delay and a retryNow, closed', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) setImmediate(() => c.close(1012, 'restart'));
    },
  });
  // A long real delay: only retryNow() can bring the second connection in time.
  const conn = makeConnection(peer, { random: () => 0.999, baseDelayMs: 60_000, maxDelayMs: 60_000 });
  const states = record(conn, 'state');
  try {
    const reconnecting = await nextEvent(conn, 'state', (e) => e.state === 'reconnecting');
    assert.equal(reconnecting.code, 1012);
    assert.equal(reconnecting.attempt, 0);
    assert.ok(reconnecting.delayMs > 59_000);
    assert.equal(typeof reconnecting.retryNow, 'function');
    assert.equal(reconnecting.retryNow(), true);
    await peer.connection(1);
    await nextEvent(conn, 'state', (e) => e.state === 'open' && e.previous === 'reconnecting');
    assert.equal(conn.retryNow(), false, 'nothing to retry while open');
    conn.close();
    assert.deepEqual(
      states.map((s) => s.state),
      ['connecting', 'open', 'reconnecting', 'open', 'closed'],
    );
    assert.equal((await peer.connections[1].closed).code, 1000);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('a 1008 policy close stops for good; a 1000 close too', T, async () => {
  for (const code of [1008, 1000]) {
    const peer = await Peer.start({ onConnection: (c) => setImmediate(() => c.close(code, 'bye')) });
    const timers = instantTimers();
    const conn = makeConnection(peer, timers);
    const errors = record(conn, 'error');
    try {
      const closed = await nextEvent(conn, 'state', (e) => e.state === 'closed');
      assert.equal(closed.code, code);
      assert.deepEqual(timers.delays, []);
      assert.deepEqual(errors.map((e) => e.code), code === 1008 ? ['policy_violation'] : []);
    } finally {
      conn.close();
      await peer.stop();
    }
  }
});

test('offline: no attempts while the network is down, one at once when it is back', T, async () => {
  const network = new FakeNetwork(true);
  const peer = await Peer.start();
  const conn = makeConnection(peer, { network, baseDelayMs: 60_000 });
  try {
    const first = await peer.connection(0);
    await nextEvent(conn, 'state', (e) => e.state === 'open');
    network.onLine = false; // the browser flips the flag before the socket dies
    const offline = nextEvent(conn, 'state', (e) => e.state === 'offline');
    first.terminate();
    assert.equal((await offline).code, 1006);
    assert.equal(peer.handshakes, 1);
    const reopened = nextEvent(conn, 'state', (e) => e.state === 'open');
    network.set(true);
    await peer.connection(1);
    await reopened;
    assert.equal(peer.handshakes, 2);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('a token refused with 401 emits auth and the token function is asked again, told why', T, async () => {
  let accept = false;
  const peer = await Peer.start({
    verifyClient: (_info, cb) => (accept ? cb(true) : cb(false, 401, 'Unauthorized')),
  });
  /** @type {any[]} */
  const asked = [];
  const conn = makeConnection(peer, {
    token: async (request) => {
      asked.push(request);
      return request.reason === 'unauthorized' ? 'fresh.jwt.token' : 'stale.jwt.token';
    },
    random: () => 0,
  });
  try {
    const auth = await nextEvent(conn, 'auth');
    assert.deepEqual(auth, { message: 'The server refused the token', code: 'unauthorized', status: 401 });
    const reconnecting = await nextEvent(conn, 'state', (e) => e.state === 'reconnecting');
    assert.equal(reconnecting.status, 401);
    accept = true;
    const server = await peer.connection(0);
    assert.deepEqual(offered(server), ['waddle.v1', 'bearer.fresh.jwt.token']);
    assert.deepEqual(asked.slice(0, 2), [
      { attempt: 0, reason: 'connect' },
      { attempt: 1, reason: 'unauthorized' },
    ]);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('setToken() after an auth event: the next attempt uses the new token', T, async () => {
  const peer = await Peer.start({
    verifyClient: (info, cb) => {
      const good = info.req.headers['sec-websocket-protocol'].includes('bearer.good.jwt.token');
      if (good) cb(true);
      else cb(false, 401, 'Unauthorized');
    },
  });
  const conn = makeConnection(peer, { token: 'bad.jwt.token', baseDelayMs: 60_000, random: () => 0.5 });
  conn.on('auth', () => {
    conn.setToken('good.jwt.token');
    conn.retryNow();
  });
  try {
    const server = await peer.connection(0);
    assert.deepEqual(offered(server), ['waddle.v1', 'bearer.good.jwt.token']);
    await nextEvent(conn, 'state', (e) => e.state === 'open');
  } finally {
    conn.close();
    await peer.stop();
  }
});

/**
 * An HTTP server standing in for the edge: upgrades are refused with 401
 * unless the token is `good.jwt.token`; a plain GET answers 401 or 400 by the
 * Authorization header, as the edge does.
 */
async function probeServer() {
  const probes = [];
  const server = createServer((req, res) => {
    probes.push(req.headers.authorization);
    res.statusCode = req.headers.authorization === 'Bearer good.jwt.token' ? 400 : 401;
    res.end();
  });
  server.on('upgrade', (req, socket) => {
    socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    probes,
    url: `http://127.0.0.1:${server.address().port}`,
    stop: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** `fetch` as browsers have it: calling it as a method of another object throws. */
function browserFetch(input, init) {
  if (this !== undefined && this !== globalThis) throw new TypeError('Illegal invocation');
  return globalThis.fetch(input, init);
}

test('when the WebSocket hides the status (browsers), a probe finds the 401', T, async () => {
  const edge = await probeServer();
  const conn = new WaddleConnection({
    url: edge.url,
    token: 'bad.jwt.token',
    WebSocket: OpaqueWebSocket,
    fetch: browserFetch,
    heartbeatMs: 0,
    network: null,
    random: () => 0.5,
    baseDelayMs: 60_000,
  });
  try {
    const auth = await nextEvent(conn, 'auth');
    assert.equal(auth.status, 401);
    assert.deepEqual(edge.probes, ['Bearer bad.jwt.token']);
  } finally {
    conn.close();
    await edge.stop();
  }
});

test('a failed handshake with a good token is not reported as auth', T, async () => {
  const edge = await probeServer();
  const conn = new WaddleConnection({
    url: edge.url,
    token: 'good.jwt.token',
    WebSocket: OpaqueWebSocket,
    heartbeatMs: 0,
    network: null,
    random: () => 0.5,
    baseDelayMs: 60_000,
  });
  const auth = record(conn, 'auth');
  try {
    const reconnecting = await nextEvent(conn, 'state', (e) => e.state === 'reconnecting');
    assert.equal(reconnecting.status, 400);
    assert.deepEqual(auth, []);
  } finally {
    conn.close();
    await edge.stop();
  }
});

test('4001 (token expired) emits auth and reconnects asking for a fresh token', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) setImmediate(() => c.close(4001, 'token expired'));
    },
  });
  const asked = [];
  const conn = makeConnection(peer, {
    token: (request) => {
      asked.push(request.reason);
      return `tok${asked.length}`;
    },
    ...instantTimers(),
  });
  try {
    const auth = await nextEvent(conn, 'auth');
    assert.deepEqual(auth, { message: 'token expired', code: 'token_expired', closeCode: 4001 });
    const second = await peer.connection(1);
    assert.deepEqual(offered(second), ['waddle.v1', 'bearer.tok2']);
    assert.deepEqual(asked, ['connect', 'expired']);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('ping() is answered by a pong event; errors about no channel go to the connection', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c);
      c.ws.on('message', (data) => {
        if (JSON.parse(data.toString()).type === 'ping') {
          c.send({ type: 'pong' });
          c.send({ type: 'error', code: 'invalid_format', message: 'Invalid message format' });
        }
      });
    },
  });
  const conn = makeConnection(peer);
  try {
    await nextEvent(conn, 'state', (e) => e.state === 'open');
    const pong = nextEvent(conn, 'pong');
    const error = nextEvent(conn, 'error');
    assert.equal(conn.ping(), true);
    assert.deepEqual(await pong, { type: 'pong' });
    assert.deepEqual(await error, { code: 'invalid_format', message: 'Invalid message format' });
  } finally {
    conn.close();
    await peer.stop();
  }
});
