// Protocol v1.1 outgoing messages: the promise of the ack, the states a
// message goes through, queueing and resending across reconnects, refusals
// and retry, and each message shown once.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Peer, nextEvent, record } from './peer.mjs';
import { ackFrame, answerSubscribes, framesOf, makeConnection, msg, msgFrame, state } from './mux_peer.mjs';

const T = { timeout: 10_000 };
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** Act on every client frame of `type` on `conn`. */
function onFrame(conn, type, fn) {
  conn.ws.on('message', (data) => {
    const frame = JSON.parse(data.toString());
    if (frame.type === type) fn(frame);
  });
}

test('send() resolves with the ack; the message goes queued, sent, acked', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c, (f) => state(f.channelId, { lastSeq: 4 }));
      onFrame(c, 'message', (f) => c.send(ackFrame(f, 5)));
    },
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    const changes = [];
    ch.on('outgoing', (o) => changes.push([o.clientMsgId, o.state]));
    const acked = ch.send('hello', { threadId: 'root-1' });
    const [outgoing] = ch.outgoing;
    assert.match(outgoing.clientMsgId, UUID);
    const ack = await acked;
    assert.deepEqual(ack, { type: 'ack', channelId: 'general', clientMsgId: outgoing.clientMsgId, id: 'general-id-5', seq: 5, timestamp: 1 });
    const id = outgoing.clientMsgId;
    assert.deepEqual(changes, [
      [id, 'queued'],
      [id, 'sent'],
      [id, 'acked'],
    ]);
    assert.equal(outgoing.state, 'acked');
    assert.equal(outgoing.ack, ack);
    assert.deepEqual(ch.outgoing, []);
    assert.deepEqual(await peer.connections[0].frame((f) => f.type === 'message'), {
      type: 'message',
      channelId: 'general',
      content: 'hello',
      clientMsgId: id,
      threadId: 'root-1',
    });
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('offline sends wait for the channel to resume, then go in order with the same clientMsgId', T, async () => {
  /** @type {((frame: any) => void) | null} */
  let answerSubscribe = null;
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) {
        answerSubscribes(c, (f) => state(f.channelId, { lastSeq: 1, messages: [msg(f.channelId, 1)] }));
        return;
      }
      // The second connection answers the subscribe only when the test says so.
      onFrame(c, 'subscribe', (f) => {
        answerSubscribe = () => c.send(state(f.channelId, { lastSeq: 1 }));
      });
      let seq = 1;
      const seqs = new Map();
      onFrame(c, 'message', (f) => {
        if (!seqs.has(f.clientMsgId)) seqs.set(f.clientMsgId, (seq += 1));
        c.send(ackFrame(f, seqs.get(f.clientMsgId)));
        c.send(ackFrame(f, seqs.get(f.clientMsgId))); // a repeated ack is not reported twice
      });
    },
  });
  const conn = makeConnection(peer, { random: () => 0 });
  try {
    const ch = await conn.subscribe('general');
    const first = ch.send('in flight when the network drops');
    const firstId = ch.outgoing[0].clientMsgId;
    const conn0 = peer.connections[0];
    await conn0.frame((f) => f.type === 'message');
    const resuming = nextEvent(ch, 'state', (e) => e.state === 'resuming');
    conn0.terminate();
    await resuming;
    assert.equal(ch.outgoing[0].state, 'queued', 'written on a socket that is gone: queued again');
    const later = [ch.send('while away 1'), ch.send('while away 2')];
    const conn1 = await peer.connection(1);
    await conn1.frame((f) => f.type === 'subscribe');
    assert.deepEqual(framesOf(conn1, 'message'), [], 'nothing is written before the channel is live');
    const acks = record(ch, 'ack');
    answerSubscribe();
    const results = await Promise.all([first, ...later]);
    assert.deepEqual(
      results.map((a) => a.seq),
      [2, 3, 4],
    );
    const written = framesOf(conn1, 'message');
    assert.deepEqual(
      written.map((f) => f.content),
      ['in flight when the network drops', 'while away 1', 'while away 2'],
    );
    assert.equal(written[0].clientMsgId, firstId);
    // A marker proves the repeated acks came and were ignored.
    const marker = ch.send('marker');
    await marker;
    assert.equal(acks.length, 4);
    assert.deepEqual(conn1.frames.map((f) => f.type).slice(0, 2), ['subscribe', 'message']);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('a refused message fails with its error; retry() sends it again with the same clientMsgId', T, async () => {
  let refuse = true;
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c);
      onFrame(c, 'message', (f) => {
        if (refuse) {
          c.send({ type: 'error', channelId: f.channelId, code: 'message_too_long', message: 'Message too long', clientMsgId: f.clientMsgId });
        } else {
          c.send(ackFrame(f, 1));
        }
      });
    },
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    const errors = record(ch, 'error');
    const sent = ch.send('too long for this server');
    await assert.rejects(sent, (err) => err.code === 'message_too_long' && err.channelId === 'general');
    const [failed] = ch.outgoing;
    assert.equal(failed.state, 'failed');
    assert.equal(failed.error.code, 'message_too_long');
    assert.equal(errors[0].clientMsgId, failed.clientMsgId);
    refuse = false;
    const ack = await failed.retry();
    assert.equal(ack.clientMsgId, failed.clientMsgId);
    assert.equal(failed.state, 'acked');
    assert.deepEqual(ch.outgoing, []);
    const frames = framesOf(peer.connections[0], 'message');
    assert.deepEqual(
      frames.map((f) => f.clientMsgId),
      [failed.clientMsgId, failed.clientMsgId],
    );
    assert.throws(() => failed.retry(), /failed message/);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('a failed message can be discarded; it leaves the outgoing list', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c);
      onFrame(c, 'message', (f) =>
        c.send({ type: 'error', channelId: f.channelId, code: 'no_write_permission', message: 'No write permission', clientMsgId: f.clientMsgId }),
      );
    },
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    await assert.rejects(ch.send('read-only'), { code: 'no_write_permission' });
    const [failed] = ch.outgoing;
    const gone = nextEvent(ch, 'outgoing', (o) => o.discarded);
    failed.discard();
    await gone;
    assert.deepEqual(ch.outgoing, []);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('a retryable refusal keeps the message and resends it after retryAfterMs', T, async () => {
  let refused = 0;
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c);
      onFrame(c, 'message', (f) => {
        if (refused === 0) {
          refused += 1;
          c.send({ type: 'error', channelId: f.channelId, code: 'rate_limited', message: 'Rate limited', retryable: true, retryAfterMs: 30, clientMsgId: f.clientMsgId });
        } else {
          c.send(ackFrame(f, 1));
        }
      });
    },
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    const states = [];
    ch.on('outgoing', (o) => states.push(o.state));
    const started = Date.now();
    const ack = await ch.send('again');
    assert.ok(Date.now() - started >= 25, 'waited for retryAfterMs');
    assert.deepEqual(states, ['queued', 'sent', 'queued', 'sent', 'acked']);
    assert.equal(framesOf(peer.connections[0], 'message').length, 2);
    assert.equal(ack.seq, 1);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('each message is shown once: own messages name their clientMsgId, the ack says whether it was delivered', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c);
      let seq = 0;
      onFrame(c, 'message', (f) => {
        seq += 1;
        const message = msgFrame(f.channelId, seq, { userId: 'me', content: f.content });
        const ack = ackFrame(f, seq);
        // The first one: ack before the message; the second: message first.
        for (const frame of seq === 1 ? [ack, message] : [message, ack]) c.send(frame);
      });
    },
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    const shown = record(ch, 'message');
    const acked = [];
    ch.on('outgoing', (o) => acked.push({ ...o }));
    const one = nextEvent(ch, 'message', (m) => m.seq === 1);
    await ch.send('ack first');
    await one;
    const two = nextEvent(ch, 'message', (m) => m.seq === 2);
    await ch.send('message first');
    await two;
    assert.deepEqual(
      shown.map((m) => [m.seq, m.clientMsgId !== undefined]),
      [
        [1, true],
        [2, false],
      ],
    );
    // At its ack: the first was not shown yet (its message names it when it
    // comes), the second was.
    const atAck = acked.filter((o) => o.state === 'acked');
    assert.deepEqual(
      atAck.map((o) => o.delivered),
      [false, true],
    );
    assert.equal(shown[0].clientMsgId, atAck[0].clientMsgId);
    assert.equal(ch.readSeq, null, 'the cursor stays unknown when the server did not tell it');
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('at most maxInFlight messages await an ack over all channels of the socket', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => answerSubscribes(c) });
  const conn = makeConnection(peer, { maxInFlight: 3 });
  try {
    const [a, b] = await Promise.all([conn.subscribe('a'), conn.subscribe('b')]);
    const sends = [a.send('a1'), b.send('b1'), a.send('a2'), b.send('b2'), a.send('a3')];
    const server = peer.connections[0];
    const three = await server.framesOfType('message', 3);
    assert.deepEqual(
      three.map((f) => f.content),
      ['a1', 'b1', 'a2'],
    );
    server.send(ackFrame(three[1], 1));
    await sends[1];
    const four = await server.framesOfType('message', 4);
    assert.equal(framesOf(server, 'message').length, 4);
    assert.ok(['b2', 'a3'].includes(four[3].content));
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('send() checks its input and refuses frames the server would close for; a repeated clientMsgId is one message', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => answerSubscribes(c) });
  const conn = makeConnection(peer, { maxFrameBytes: 1024 });
  try {
    const ch = await conn.subscribe('general');
    assert.throws(() => ch.send(42), TypeError);
    assert.throws(() => ch.send('   '), RangeError);
    assert.throws(() => ch.send('x', { threadId: '' }), TypeError);
    assert.throws(() => ch.send('é'.repeat(600)), RangeError);
    assert.deepEqual(ch.outgoing, []);
    const one = ch.send('once', { clientMsgId: 'my-key' });
    const two = ch.send('once', { clientMsgId: 'my-key' });
    assert.equal(one, two);
    assert.equal(ch.outgoing.length, 1);
    await peer.connections[0].frame((f) => f.type === 'message');
    assert.equal(framesOf(peer.connections[0], 'message').length, 1);
  } finally {
    conn.close();
    await peer.stop();
  }
});
