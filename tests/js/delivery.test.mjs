// Incoming messages: exactly once, in sequence order, across reconnects.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  Peer,
  chat,
  initialState,
  instantTimers,
  makeClient,
  messageFrame,
  nextEvent,
  record,
} from './peer.mjs';

const T = { timeout: 10_000 };
const seqs = (events) => events.map((m) => m.seq);

test('initial_state history is delivered as message events, oldest first', T, async () => {
  const users = [{ userId: 'u1', username: 'alice', joinedAt: 1, status: 'online' }];
  const peer = await Peer.start({
    onConnection: (c) =>
      c.send(initialState({ lastSeq: 3, messages: [chat(2), chat(1), chat(3)], onlineUsers: users })),
  });
  const client = makeClient(peer);
  const order = [];
  client.on('initial_state', (f) => order.push(`initial_state:${f.lastSeq}`));
  client.on('message', (m) => order.push(`message:${m.seq}`));
  try {
    const state = nextEvent(client, 'initial_state');
    await nextEvent(client, 'message', (m) => m.seq === 3);
    assert.deepEqual((await state).onlineUsers, users);
    assert.deepEqual(order, ['initial_state:3', 'message:1', 'message:2', 'message:3']);
    assert.equal(client.lastSeq, 3);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('duplicate and old sequence numbers are dropped, order is kept', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      c.send(initialState({ lastSeq: 2, messages: [chat(1), chat(2)] }));
      for (const seq of [3, 2, 3, 1, 4, 4]) c.send(messageFrame(seq));
      c.send({ type: 'message', message: { ...chat(5), seq: '5' } }); // int64 as a string
      c.send(messageFrame(5));
    },
  });
  const client = makeClient(peer);
  const delivered = record(client, 'message');
  try {
    await nextEvent(client, 'message', (m) => m.seq === 5);
    // Anything after 5 proves the duplicate 5 was seen and dropped.
    peer.connections[0].send(messageFrame(6));
    await nextEvent(client, 'message', (m) => m.seq === 6);
    assert.deepEqual(seqs(delivered), [1, 2, 3, 4, 5, 6]);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('after a reconnect the client syncs from the highest seq it delivered', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) {
        c.send(initialState({ lastSeq: 3, messages: [chat(1), chat(2), chat(3)] }));
        for (const seq of [4, 5, 6]) c.send(messageFrame(seq));
      } else {
        c.send(initialState({ lastSeq: 6, messages: [chat(4), chat(5), chat(6)] }));
      }
    },
  });
  const client = makeClient(peer, instantTimers());
  try {
    await nextEvent(client, 'message', (m) => m.seq === 6);
    peer.connections[0].terminate();
    const conn1 = await peer.connection(1);
    assert.deepEqual(await conn1.frame(() => true), { type: 'sync', afterSeq: 6 });
  } finally {
    client.close();
    await peer.stop();
  }
});

test('with no messages yet, sync uses initial_state.lastSeq', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState({ lastSeq: 7 })) });
  const client = makeClient(peer, instantTimers());
  try {
    await nextEvent(client, 'initial_state');
    assert.equal(client.lastSeq, 7);
    peer.connections[0].close(1012, 'draining');
    const conn1 = await peer.connection(1);
    assert.deepEqual(await conn1.frame(() => true), { type: 'sync', afterSeq: 7 });
  } finally {
    client.close();
    await peer.stop();
  }
});

test('a replayed gap is delivered once and in order, before newer history and live messages', T, async () => {
  // Connection 0 delivers 1..2 then drops. While the client is away 3..9 are
  // written. Connection 1's initial_state carries only the last three (7..9);
  // the replay of 3..9 follows the sync, a live 10 arrives in the middle.
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) {
        c.send(initialState({ lastSeq: 2, messages: [chat(1), chat(2)] }));
        return;
      }
      c.send(initialState({ lastSeq: 9, messages: [chat(7), chat(8), chat(9)] }));
      c.ws.on('message', (data) => {
        const frame = JSON.parse(data.toString());
        if (frame.type !== 'sync') return;
        assert.equal(frame.afterSeq, 2);
        for (const seq of [3, 4]) c.send(messageFrame(seq));
        c.send(messageFrame(10)); // live, while the replay is running
        for (const seq of [5, 6, 7, 8, 9]) c.send(messageFrame(seq));
        c.send({ type: 'sync_complete', lastSeq: 9, count: 7 });
        c.send(messageFrame(11));
      });
    },
  });
  const client = makeClient(peer, { random: () => 0 });
  const delivered = record(client, 'message');
  try {
    await nextEvent(client, 'message', (m) => m.seq === 2);
    peer.connections[0].terminate();
    await nextEvent(client, 'message', (m) => m.seq === 11);
    assert.deepEqual(seqs(delivered), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('held-back messages are released if sync_complete never comes', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) {
        c.send(initialState({ lastSeq: 2, messages: [chat(1), chat(2)] }));
        return;
      }
      c.send(initialState({ lastSeq: 6, messages: [chat(5), chat(6)] }));
      c.ws.on('message', (data) => {
        if (JSON.parse(data.toString()).type === 'sync') c.send(messageFrame(3));
      });
    },
  });
  const client = makeClient(peer, { random: () => 0, syncTimeoutMs: 50 });
  const delivered = record(client, 'message');
  try {
    await nextEvent(client, 'message', (m) => m.seq === 2);
    peer.connections[0].terminate();
    await nextEvent(client, 'message', (m) => m.seq === 6);
    assert.deepEqual(seqs(delivered), [1, 2, 3, 5, 6]);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('a channel whose history went backwards is followed from the new start', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) c.send(initialState({ lastSeq: 50, messages: [chat(50)] }));
      else c.send(initialState({ lastSeq: 2, messages: [chat(1), chat(2)] }));
    },
  });
  const client = makeClient(peer, { random: () => 0 });
  const delivered = record(client, 'message');
  try {
    await nextEvent(client, 'message', (m) => m.seq === 50);
    const reset = nextEvent(client, 'error');
    const two = nextEvent(client, 'message', (m) => m.seq === 2);
    peer.connections[0].terminate();
    assert.equal((await reset).code, 'history_reset');
    await two;
    assert.deepEqual(seqs(delivered), [50, 1, 2]);
    assert.equal(client.lastSeq, 2);
  } finally {
    client.close();
    await peer.stop();
  }
});
