// Outgoing frames: clientMsgId, ack tracking, queueing and resending.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Peer, initialState, instantTimers, makeClient, nextEvent, record } from './peer.mjs';

const T = { timeout: 10_000 };
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** Ack a client message frame the way the channel owner does. */
function ack(conn, frame, seq) {
  conn.send({ type: 'ack', clientMsgId: frame.clientMsgId, id: `id-${seq}`, seq, timestamp: 1 });
}

test('send() tags each message with a fresh clientMsgId kept until its ack', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  const client = makeClient(peer);
  const acks = record(client, 'ack');
  try {
    await nextEvent(client, 'state', (e) => e.state === 'open');
    const conn = peer.connections[0];
    const a = client.send('hello', { threadId: 'thread-1' });
    const b = client.send('world');
    assert.match(a, UUID);
    assert.match(b, UUID);
    assert.notEqual(a, b);
    const fa = await conn.frame((f) => f.clientMsgId === a);
    const fb = await conn.frame((f) => f.clientMsgId === b);
    assert.deepEqual(fa, { type: 'message', content: 'hello', clientMsgId: a, threadId: 'thread-1' });
    assert.deepEqual(fb, { type: 'message', content: 'world', clientMsgId: b });
    assert.deepEqual(
      client.pending.map((p) => p.clientMsgId),
      [a, b],
    );

    const acked = nextEvent(client, 'ack');
    ack(conn, fa, 1);
    assert.deepEqual(await acked, { type: 'ack', clientMsgId: a, id: 'id-1', seq: 1, timestamp: 1 });
    assert.deepEqual(
      client.pending.map((p) => p.clientMsgId),
      [b],
    );

    // A repeated ack (after a deduplicated resend) is not reported twice.
    ack(conn, fa, 1);
    ack(conn, fb, 2);
    await nextEvent(client, 'ack', (e) => e.clientMsgId === b);
    assert.deepEqual(
      acks.map((e) => e.clientMsgId),
      [a, b],
    );
    assert.deepEqual(client.pending, []);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('messages sent while disconnected are queued and flushed in order on (re)connect', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      c.send(initialState({ lastSeq: 4 }));
      if (i === 0) {
        c.ws.on('message', (data) => {
          const frame = JSON.parse(data.toString());
          if (frame.type === 'message') {
            ack(c, frame, 5);
            c.close(1012, 'restart');
          }
        });
      }
    },
  });
  const client = makeClient(peer, instantTimers());
  // Before the first connection is even open.
  const first = client.send('before connect');
  let queued = [];
  let typingSent = null;
  client.on('state', (e) => {
    if (e.state === 'reconnecting' && queued.length === 0) {
      queued = [client.send('while down 1'), client.send('while down 2')];
      typingSent = client.setTyping(true);
    }
  });
  try {
    const conn0 = await peer.connection(0);
    const f0 = await conn0.frame((f) => f.type === 'message');
    assert.equal(f0.clientMsgId, first);
    assert.equal(f0.content, 'before connect');

    const conn1 = await peer.connection(1);
    await conn1.framesOfType('message', 2);
    assert.equal(typingSent, false, 'typing is not queued while disconnected');
    assert.deepEqual(
      conn1.frames.map((f) => f.type),
      ['sync', 'message', 'message'],
    );
    assert.deepEqual(conn1.frames[0], { type: 'sync', afterSeq: 4 });
    assert.deepEqual(
      conn1.frames.slice(1).map((f) => [f.clientMsgId, f.content]),
      [
        [queued[0], 'while down 1'],
        [queued[1], 'while down 2'],
      ],
    );
  } finally {
    client.close();
    await peer.stop();
  }
});

test('unacknowledged messages are resent with the SAME clientMsgId after a reconnect', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState({ lastSeq: 10 })) });
  const client = makeClient(peer, instantTimers());
  try {
    await nextEvent(client, 'state', (e) => e.state === 'open');
    const conn0 = peer.connections[0];
    const lost = client.send('lost in flight');
    const kept = client.send('acknowledged');
    const frameKept = await conn0.frame((f) => f.clientMsgId === kept);
    await conn0.frame((f) => f.clientMsgId === lost);
    const acked = nextEvent(client, 'ack');
    ack(conn0, frameKept, 11);
    await acked;
    conn0.terminate(); // the network drops before `lost` is acknowledged

    const conn1 = await peer.connection(1);
    const resent = await conn1.frame((f) => f.type === 'message');
    assert.deepEqual(resent, { type: 'message', content: 'lost in flight', clientMsgId: lost });
    assert.deepEqual(conn1.frames[0], { type: 'sync', afterSeq: 10 });

    const ackLost = nextEvent(client, 'ack');
    ack(conn1, resent, 12);
    assert.equal((await ackLost).clientMsgId, lost);
    assert.deepEqual(client.pending, []);
    // Only the unacknowledged one was resent.
    assert.equal(conn1.frames.filter((f) => f.type === 'message').length, 1);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('an error frame naming a clientMsgId drops that message from the outbox', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState());
      c.ws.on('message', (data) => {
        const frame = JSON.parse(data.toString());
        if (frame.type === 'message') {
          c.send({
            type: 'error',
            message: 'No write permission',
            code: 'forbidden',
            clientMsgId: frame.clientMsgId,
          });
        }
      });
    },
  });
  const client = makeClient(peer);
  try {
    await nextEvent(client, 'state', (e) => e.state === 'open');
    const id = client.send('refused');
    const err = await nextEvent(client, 'error');
    assert.deepEqual(err, { message: 'No write permission', code: 'forbidden', clientMsgId: id });
    assert.deepEqual(client.pending, []);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('a retryable refusal keeps the message and resends it after retryAfterMs', T, async () => {
  let refused = 0;
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState());
      c.ws.on('message', (data) => {
        const frame = JSON.parse(data.toString());
        if (frame.type !== 'message') return;
        if (refused === 0) {
          refused += 1;
          c.send({
            type: 'error',
            message: 'Rate limited',
            code: 'rate_limited',
            retryable: true,
            retryAfterMs: 40,
            clientMsgId: frame.clientMsgId,
          });
        } else {
          ack(c, frame, 1);
        }
      });
    },
  });
  const client = makeClient(peer);
  try {
    await nextEvent(client, 'state', (e) => e.state === 'open');
    const errored = nextEvent(client, 'error');
    const acked = nextEvent(client, 'ack');
    const id = client.send('again');
    const err = await errored;
    assert.deepEqual(err, {
      message: 'Rate limited',
      code: 'rate_limited',
      clientMsgId: id,
      retryable: true,
      retryAfterMs: 40,
    });
    assert.deepEqual(
      client.pending.map((p) => p.clientMsgId),
      [id],
    );
    assert.equal((await acked).clientMsgId, id);
    const sent = peer.connections[0].frames.filter((f) => f.type === 'message');
    assert.deepEqual(
      sent.map((f) => f.clientMsgId),
      [id, id],
    );
    assert.deepEqual(client.pending, []);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('a retryable refusal that names no message resends every pending one', T, async () => {
  let refusedOnce = false;
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState());
      c.ws.on('message', (data) => {
        const frame = JSON.parse(data.toString());
        if (frame.type !== 'message') return;
        if (!refusedOnce) {
          // Refused before it was even parsed: the server cannot name it.
          refusedOnce = true;
          c.send({
            type: 'error',
            message: 'Rate limited',
            code: 'rate_limited',
            retryable: true,
            retryAfterMs: 1,
          });
        } else {
          ack(c, frame, 1);
        }
      });
    },
  });
  const client = makeClient(peer);
  try {
    await nextEvent(client, 'state', (e) => e.state === 'open');
    const acked = nextEvent(client, 'ack');
    const id = client.send('again');
    assert.equal((await acked).clientMsgId, id);
    assert.deepEqual(client.pending, []);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('presence is sent, remembered and re-announced after a reconnect', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      c.send(initialState());
      if (i === 0) {
        c.ws.on('message', (data) => {
          if (JSON.parse(data.toString()).type === 'presence') c.close(1013, 'slow');
        });
      }
    },
  });
  const client = makeClient(peer, instantTimers());
  try {
    await nextEvent(client, 'state', (e) => e.state === 'open');
    assert.throws(() => client.setPresence('busy'), RangeError);
    assert.equal(client.setPresence('dnd'), true);
    const conn0 = peer.connections[0];
    assert.deepEqual(await conn0.frame((f) => f.type === 'presence'), {
      type: 'presence',
      status: 'dnd',
    });
    const conn1 = await peer.connection(1);
    assert.deepEqual(await conn1.frame((f) => f.type === 'presence'), {
      type: 'presence',
      status: 'dnd',
    });
    assert.equal(client.setTyping(true), true);
    assert.deepEqual(await conn1.frame((f) => f.type === 'typing'), {
      type: 'typing',
      isTyping: true,
    });
  } finally {
    client.close();
    await peer.stop();
  }
});

test('send() validates its input and refuses frames the server would close for', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  const client = makeClient(peer, { maxFrameBytes: 1024 });
  try {
    assert.throws(() => client.send(42), TypeError);
    assert.throws(() => client.send('é'.repeat(600)), RangeError);
    assert.deepEqual(client.pending, []);
    client.send('x'.repeat(900));
    assert.equal(client.pending.length, 1);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('at most maxInFlight messages await an ack at once; each ack lets the next one go', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  const client = makeClient(peer, { maxInFlight: 3 });
  // Queued before the connection opens: a reconnect's backlog looks the same.
  const ids = Array.from({ length: 10 }, (_, i) => client.send(`queued ${i}`));
  try {
    const conn = await peer.connection(0);
    const firstThree = await conn.framesOfType('message', 3);
    assert.deepEqual(firstThree.map((f) => f.clientMsgId), ids.slice(0, 3));
    ack(conn, firstThree[0], 1);
    const four = await conn.framesOfType('message', 4);
    // Had the window been ignored, all ten would have been written at open,
    // before the ack that released the fourth.
    assert.equal(conn.frames.filter((f) => f.type === 'message').length, 4);
    assert.equal(four[3].clientMsgId, ids[3]);
  } finally {
    client.close();
    await peer.stop();
  }
});
