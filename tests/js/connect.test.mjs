// Connection set-up, authentication and close handling of WaddleClient.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { WaddleClient, channelSocketUrl } from '../../edge/static/waddle.js';
import {
  Peer,
  WebSocket,
  initialState,
  instantTimers,
  makeClient,
  nextEvent,
  record,
} from './peer.mjs';

const T = { timeout: 10_000 };

/** The subprotocols a connection offered, in order. */
const offered = (conn) => conn.headers['sec-websocket-protocol'].split(/\s*,\s*/);

test('offers waddle.v1 and bearer.<jwt> subprotocols and keeps the token out of the URL', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  const token = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl';
  const client = makeClient(peer, { token, channelId: 'general' });
  try {
    const opened = nextEvent(client, 'state', (e) => e.state === 'open');
    const conn = await peer.connection(0);
    await opened;
    assert.deepEqual(offered(conn), ['waddle.v1', `bearer.${token}`]);
    assert.equal(conn.url, '/channel/general/websocket');
    assert.ok(!conn.url.includes(token));
    assert.equal(conn.headers.authorization, undefined);
    assert.equal(conn.ws.protocol, 'waddle.v1');
  } finally {
    client.close();
    await peer.stop();
  }
});

test('builds ws(s) URLs from http(s) or ws(s) bases, with a path prefix', T, () => {
  assert.equal(channelSocketUrl('http://h:8080', 'c1'), 'ws://h:8080/channel/c1/websocket');
  assert.equal(channelSocketUrl('https://h/', 'c1'), 'wss://h/channel/c1/websocket');
  assert.equal(channelSocketUrl('wss://h/chat/', 'a/b c'), 'wss://h/chat/channel/a%2Fb%20c/websocket');
  assert.equal(channelSocketUrl('ws://h', 'x'), 'ws://h/channel/x/websocket');
  assert.throws(() => channelSocketUrl('ftp://h', 'x'), TypeError);
});

test('a token function is asked again for every connection attempt', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      c.send(initialState());
      if (i === 0) c.close(1012, 'restart');
    },
  });
  let calls = 0;
  const client = makeClient(peer, {
    token: async () => `tok${++calls}`,
    ...instantTimers(),
  });
  try {
    const first = await peer.connection(0);
    const second = await peer.connection(1);
    assert.deepEqual(offered(first), ['waddle.v1', 'bearer.tok1']);
    assert.deepEqual(offered(second), ['waddle.v1', 'bearer.tok2']);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('reports connecting, open and closed; close() sends 1000 and never reconnects', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  const timers = instantTimers();
  const client = makeClient(peer, timers);
  const states = record(client, 'state');
  const opened = nextEvent(client, 'state', (e) => e.state === 'open');
  const conn = await peer.connection(0);
  await opened;
  client.close();
  const { code } = await conn.closed;
  assert.equal(code, 1000);
  assert.deepEqual(
    states.map((s) => s.state),
    ['connecting', 'open', 'closed'],
  );
  assert.equal(client.state, 'closed');
  assert.deepEqual(timers.delays, [], 'no reconnect timer was scheduled');
  assert.throws(() => client.send('late'), /closed/);
  assert.equal(peer.connections.length, 1);
  await peer.stop();
});

test('a 1008 policy close stops the client and reports an error', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState());
      c.close(1008, 'Rate limited');
    },
  });
  const timers = instantTimers();
  const client = makeClient(peer, timers);
  const states = record(client, 'state');
  const error = nextEvent(client, 'error');
  const closed = nextEvent(client, 'state', (e) => e.state === 'closed');
  try {
    const err = await error;
    const state = await closed;
    assert.equal(err.code, 'policy_violation');
    assert.equal(err.closeCode, 1008);
    assert.equal(err.message, 'Rate limited');
    assert.equal(state.code, 1008);
    assert.ok(!states.some((s) => s.state === 'reconnecting'));
    assert.deepEqual(timers.delays, [], 'no reconnect timer was scheduled');
    assert.equal(peer.handshakes, 1);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('a normal 1000 close from the server does not reconnect', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.close(1000, 'bye') });
  const timers = instantTimers();
  const client = makeClient(peer, timers);
  try {
    const state = await nextEvent(client, 'state', (e) => e.state === 'closed');
    assert.equal(state.code, 1000);
    assert.deepEqual(timers.delays, []);
  } finally {
    client.close();
    await peer.stop();
  }
});

for (const code of [1012, 1013, 1011, 1001]) {
  test(`reconnects after a ${code} close`, T, async () => {
    const peer = await Peer.start({
      onConnection: (c, i) => {
        c.send(initialState());
        if (i === 0) c.close(code, 'again');
      },
    });
    const timers = instantTimers();
    const client = makeClient(peer, { ...timers, random: () => 0.5 });
    try {
      const reconnecting = await nextEvent(client, 'state', (e) => e.state === 'reconnecting');
      assert.equal(reconnecting.code, code);
      assert.equal(reconnecting.delayMs, 500);
      await peer.connection(1);
      await nextEvent(client, 'state', (e) => e.state === 'open');
      assert.equal(timers.delays[0], 500);
    } finally {
      client.close();
      await peer.stop();
    }
  });
}

test('reconnects after an abnormal close (connection dropped, 1006)', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      c.send(initialState());
      if (i === 0) setImmediate(() => c.terminate());
    },
  });
  const client = makeClient(peer, instantTimers());
  try {
    const reconnecting = await nextEvent(client, 'state', (e) => e.state === 'reconnecting');
    assert.equal(reconnecting.code, 1006);
    await peer.connection(1);
    await nextEvent(client, 'state', (e) => e.state === 'open');
  } finally {
    client.close();
    await peer.stop();
  }
});

test('ping() is answered by a pong event', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState());
      c.ws.on('message', (data) => {
        if (JSON.parse(data.toString()).type === 'ping') c.send({ type: 'pong' });
      });
    },
  });
  const client = makeClient(peer);
  try {
    await nextEvent(client, 'state', (e) => e.state === 'open');
    const pong = nextEvent(client, 'pong');
    assert.equal(client.ping(), true);
    assert.deepEqual(await pong, { type: 'pong' });
  } finally {
    client.close();
    await peer.stop();
  }
});

test('a silent connection is detected by the heartbeat and replaced', T, async () => {
  // The peer never answers pings: after heartbeatMs of silence the client
  // pings, after another heartbeatMs it gives the socket up and reconnects.
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  const client = makeClient(peer, { heartbeatMs: 100, random: () => 0 });
  try {
    const first = await peer.connection(0);
    await first.frame((f) => f.type === 'ping');
    const reconnecting = await nextEvent(client, 'state', (e) => e.state === 'reconnecting');
    assert.equal(reconnecting.reason, 'heartbeat timeout');
    await peer.connection(1);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('server error frames are reported and keep the connection open', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState());
      c.send({ type: 'error', message: 'Unknown message type', code: 'unknown_type' });
    },
  });
  const client = makeClient(peer);
  try {
    const err = await nextEvent(client, 'error');
    assert.deepEqual(err, { message: 'Unknown message type', code: 'unknown_type' });
    assert.equal(client.state, 'open');
  } finally {
    client.close();
    await peer.stop();
  }
});

test('the constructor validates its options and needs a WebSocket implementation', T, () => {
  assert.throws(() => new WaddleClient({ channelId: 'c', token: 't', WebSocket }), TypeError);
  assert.throws(() => new WaddleClient({ url: 'http://h', token: 't', WebSocket }), TypeError);
  assert.throws(() => new WaddleClient({ url: 'http://h', channelId: 'c', WebSocket }), TypeError);
  const saved = globalThis.WebSocket;
  try {
    globalThis.WebSocket = undefined;
    assert.throws(
      () => new WaddleClient({ url: 'http://h', channelId: 'c', token: 't' }),
      /WebSocket/,
    );
  } finally {
    globalThis.WebSocket = saved;
  }
});

test('after 4001 (token expired) the token function is asked again and the client reconnects', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      c.send(initialState());
      if (i === 0) c.close(4001, 'token expired');
    },
  });
  let calls = 0;
  const client = makeClient(peer, { token: () => `tok${++calls}`, ...instantTimers() });
  try {
    const reconnecting = await nextEvent(client, 'state', (e) => e.state === 'reconnecting');
    assert.equal(reconnecting.code, 4001);
    const second = await peer.connection(1);
    assert.deepEqual(offered(second), ['waddle.v1', 'bearer.tok2']);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('an expired static token (4001) stops the client: retrying could not succeed', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState());
      c.close(4001, 'token expired');
    },
  });
  const timers = instantTimers();
  const client = makeClient(peer, timers);
  const error = nextEvent(client, 'error');
  try {
    const closed = await nextEvent(client, 'state', (e) => e.state === 'closed');
    assert.equal(closed.code, 4001);
    assert.deepEqual(await error, {
      message: 'token expired',
      code: 'token_expired',
      closeCode: 4001,
    });
    assert.deepEqual(timers.delays, []);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('with autoConnect: false nothing happens until connect(); sends wait for it', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  const client = makeClient(peer, { autoConnect: false });
  try {
    const id = client.send('early');
    assert.equal(client.state, 'closed');
    assert.equal(peer.handshakes, 0);
    client.connect();
    const conn = await peer.connection(0);
    assert.equal((await conn.frame((f) => f.type === 'message')).clientMsgId, id);
  } finally {
    client.close();
    await peer.stop();
  }
});
