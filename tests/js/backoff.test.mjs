// Reconnect backoff: exponential, full jitter, capped, reset once stable.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { backoffDelay } from '../../edge/static/waddle.js';
import { Peer, WebSocket, initialState, instantTimers, makeClient, nextEvent, record } from './peer.mjs';

const T = { timeout: 10_000 };

/** A peer that refuses every handshake with 401, like an edge with a bad token. */
const refusing = () =>
  Peer.start({ verifyClient: (_info, cb) => cb(false, 401, 'Unauthorized') });

test('backoffDelay is a full-jitter draw below min(cap, base * 2^attempt)', T, () => {
  assert.equal(backoffDelay(0, 0.5), 500);
  assert.equal(backoffDelay(1, 0.5), 1000);
  assert.equal(backoffDelay(4, 1), 16000);
  assert.equal(backoffDelay(5, 1), 30000);
  assert.equal(backoffDelay(60, 1), 30000);
  assert.equal(backoffDelay(3, 0), 0);
  assert.equal(backoffDelay(2, 0.25, 100, 1000), 100);
});

test('failed attempts back off with full jitter: delay = random() * min(30 s, 1 s * 2^n)', T, async () => {
  const peer = await refusing();
  const draws = [0.9, 0.5, 0.25, 0.75, 0.1, 0.99, 0.6, 0.3];
  let i = 0;
  const timers = instantTimers();
  const client = makeClient(peer, { ...timers, random: () => draws[i++] });
  const states = record(client, 'state');
  try {
    await nextEvent(client, 'state', (e) => e.state === 'reconnecting' && e.attempt === 7);
    const retries = states.filter((s) => s.state === 'reconnecting');
    const expected = [900, 1000, 1000, 6000, 1600, 29700, 18000, 9000];
    assert.deepEqual(
      retries.map((s) => s.attempt),
      [0, 1, 2, 3, 4, 5, 6, 7],
    );
    retries.forEach((s, n) => assert.ok(Math.abs(s.delayMs - expected[n]) < 1e-6, `attempt ${n}`));
    // The delays were really used for the timers.
    timers.delays.slice(0, 8).forEach((d, n) => assert.ok(Math.abs(d - expected[n]) < 1e-6));
    assert.ok(peer.handshakes >= 8);
  } finally {
    client.close();
    await peer.stop();
  }
});

test('the ceiling doubles from 1 s and is capped at 30 s', T, async () => {
  const peer = await refusing();
  const client = makeClient(peer, { ...instantTimers(), random: () => 1 });
  const states = record(client, 'state');
  try {
    await nextEvent(client, 'state', (e) => e.state === 'reconnecting' && e.attempt === 9);
    assert.deepEqual(
      states.filter((s) => s.state === 'reconnecting').map((s) => s.delayMs),
      [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000],
    );
  } finally {
    client.close();
    await peer.stop();
  }
});

test('the attempt counter resets once a connection stayed open 10 s', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => c.send(initialState()) });
  let clock = 1_000_000;
  const client = makeClient(peer, { ...instantTimers(), random: () => 1, now: () => clock });
  const retries = [];
  client.on('state', (e) => {
    if (e.state === 'reconnecting') retries.push(e);
  });
  /** Wait until connection `n` is open, let `openFor` ms pass, then drop it. */
  const dropAfter = async (n, openFor) => {
    const opened = nextEvent(client, 'state', (e) => e.state === 'open');
    const conn = await peer.connection(n);
    await opened;
    clock += openFor;
    const retry = nextEvent(client, 'state', (e) => e.state === 'reconnecting');
    conn.terminate();
    return retry;
  };
  try {
    assert.equal((await dropAfter(0, 50)).delayMs, 1000); // attempt 0
    assert.equal((await dropAfter(1, 9_999)).delayMs, 2000); // not stable: attempt 1
    assert.equal((await dropAfter(2, 10_000)).delayMs, 1000); // stable: back to attempt 0
    assert.equal((await dropAfter(3, 0)).delayMs, 2000); // and growing again
    assert.deepEqual(
      retries.map((r) => r.attempt),
      [0, 1, 0, 1],
    );
  } finally {
    client.close();
    await peer.stop();
  }
});

test('close() during the backoff wait cancels the pending reconnect', T, async () => {
  const peer = await refusing();
  const scheduled = [];
  const cleared = [];
  let sockets = 0;
  class CountingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets += 1;
    }
  }
  const client = makeClient(peer, {
    WebSocket: CountingWebSocket,
    random: () => 1,
    setTimeout: (fn, ms) => {
      const handle = { fn, ms };
      scheduled.push(handle);
      return handle;
    },
    clearTimeout: (handle) => cleared.push(handle),
  });
  try {
    await nextEvent(client, 'state', (e) => e.state === 'reconnecting');
    assert.equal(scheduled.length, 1);
    assert.equal(scheduled[0].ms, 1000);
    client.close();
    assert.deepEqual(cleared, [scheduled[0]]);
    assert.equal(client.state, 'closed');
    scheduled[0].fn(); // even a late timer must not reconnect
    assert.equal(sockets, 1);
  } finally {
    client.close();
    await peer.stop();
  }
});
