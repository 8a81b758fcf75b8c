// Protocol v1.1 channels: subscribe, routing by channelId, resuming every
// channel after a reconnect, refusals, unsubscribe.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Peer, instantTimers, nextEvent, record } from './peer.mjs';
import {
  answerSubscribes,
  framesOf,
  makeConnection,
  msg,
  msgFrame,
  state,
} from './mux_peer.mjs';

const T = { timeout: 10_000 };
const seqs = (events) => events.map((m) => m.seq);

test('subscribe resolves with a live handle; frames go to their channel, each with its own seqs', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) =>
      answerSubscribes(c, (f) =>
        f.channelId === 'a'
          ? state('a', { lastSeq: 2, messages: [msg('a', 2), msg('a', 1)] })
          : state(f.channelId),
      ),
  });
  const conn = makeConnection(peer);
  try {
    assert.throws(() => conn.subscribe('bad id'), TypeError);
    const [a, b] = await Promise.all([conn.subscribe('a'), conn.subscribe('b')]);
    assert.equal(a.state, 'live');
    assert.equal(a.id, 'a');
    assert.equal(await conn.subscribe('a'), a, 'one handle per channel');
    const server = peer.connections[0];
    assert.deepEqual(server.frames, [
      { type: 'subscribe', channelId: 'a' },
      { type: 'subscribe', channelId: 'b' },
    ]);
    const gotA = record(a, 'message');
    const gotB = record(b, 'message');
    for (const f of [msgFrame('b', 1), msgFrame('a', 3), msgFrame('a', 3), msgFrame('b', 1), msgFrame('b', 2)]) {
      server.send(f);
    }
    const done = nextEvent(b, 'message', (m) => m.seq === 2);
    await done;
    server.send(msgFrame('a', 4)); // proves the repeated 3 was dropped, not late
    await nextEvent(a, 'message', (m) => m.seq === 4);
    assert.deepEqual(seqs(gotA), [3, 4], 'initial_state messages came before the listener');
    assert.deepEqual(seqs(gotB), [1, 2]);
    assert.ok(gotA.every((m) => m.channelId === 'a'));
    assert.equal(a.lastSeq, 4);
    assert.equal(b.lastSeq, 2);
    assert.deepEqual(conn.channels, [a, b]);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('initial_state history is delivered as messages, oldest first, before live ones', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) =>
      answerSubscribes(c, (f) => [
        state(f.channelId, { lastSeq: 3, messages: [msg(f.channelId, 3), msg(f.channelId, 1), msg(f.channelId, 2)] }),
        msgFrame(f.channelId, 4),
      ]),
  });
  const conn = makeConnection(peer, { autoConnect: false });
  const ch = conn.channel('general');
  const got = record(ch, 'message');
  try {
    assert.equal(ch.state, 'subscribing');
    conn.connect();
    await nextEvent(ch, 'message', (m) => m.seq === 4);
    assert.deepEqual(seqs(got), [1, 2, 3, 4]);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('after a reconnect every channel resumes with ONE subscribe {afterSeq}, gap-free, exactly once', T, async () => {
  // Server-side truth: channel -> last seq.
  const truth = { a: 3, b: 2, c: 5 };
  const peer = await Peer.start({
    onConnection: (c, i) => {
      if (i === 0) {
        answerSubscribes(c, (f) =>
          f.channelId === 'c'
            ? state('c', { lastSeq: 5 })
            : state(f.channelId, {
                lastSeq: truth[f.channelId],
                messages: Array.from({ length: truth[f.channelId] }, (_, k) => msg(f.channelId, k + 1)),
              }),
        );
        return;
      }
      // While the client was away: a got 4..6, b got 3, c nothing new.
      const now = { a: 6, b: 3, c: 5 };
      answerSubscribes(c, (f) => {
        const out = [state(f.channelId, { lastSeq: now[f.channelId] })];
        const missed = [];
        for (let s = f.afterSeq + 1; s <= now[f.channelId]; s += 1) missed.push(msgFrame(f.channelId, s));
        if (f.channelId === 'a') {
          // A live 7 overtakes the replay; a replayed 4 comes twice.
          out.push(missed[0], msgFrame('a', 7), missed[0], ...missed.slice(1));
        } else {
          out.push(...missed);
        }
        out.push({ type: 'sync_complete', channelId: f.channelId, lastSeq: now[f.channelId], count: missed.length });
        return out;
      });
    },
  });
  const conn = makeConnection(peer, { random: () => 0 });
  try {
    const handles = await Promise.all(['a', 'b', 'c'].map((id) => conn.subscribe(id)));
    const [a, b, c] = handles;
    const got = handles.map((h) => record(h, 'message'));
    const states = record(a, 'state');
    const stale = nextEvent(a, 'online', (e) => e.stale);
    peer.connections[0].terminate();
    assert.equal((await stale).stale, true, 'the online list is marked stale while away');
    assert.equal(a.onlineStale, true);
    const synced = [a, b, c].map((h) => nextEvent(h, 'syncComplete'));
    const server = await peer.connection(1);
    await Promise.all(synced);
    const subscribes = framesOf(server, 'subscribe');
    assert.deepEqual(subscribes, [
      { type: 'subscribe', channelId: 'a', afterSeq: 3 },
      { type: 'subscribe', channelId: 'b', afterSeq: 2 },
      { type: 'subscribe', channelId: 'c', afterSeq: 5 },
    ]);
    assert.deepEqual(seqs(got[0]), [4, 5, 6, 7]);
    assert.deepEqual(seqs(got[1]), [3]);
    assert.deepEqual(seqs(got[2]), []);
    assert.equal(a.onlineStale, false);
    assert.deepEqual(
      states.map((s) => s.state),
      ['resuming', 'live'],
    );
    assert.deepEqual([a.lastSeq, b.lastSeq, c.lastSeq], [7, 3, 5]);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('forbidden and too_many_subscriptions reject the subscribe; the channel is dropped', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) =>
      answerSubscribes(c, (f) => {
        if (f.channelId === 'secret') {
          return { type: 'error', channelId: 'secret', code: 'forbidden', message: 'Forbidden' };
        }
        if (f.channelId === 'one-too-many') {
          return { type: 'error', channelId: f.channelId, code: 'too_many_subscriptions', message: 'Too many subscriptions' };
        }
        return state(f.channelId);
      }),
  });
  const conn = makeConnection(peer);
  try {
    const secret = conn.channel('secret');
    const failed = nextEvent(secret, 'state', (e) => e.state === 'failed');
    await assert.rejects(secret.ready, (err) => err.code === 'forbidden' && err.channelId === 'secret');
    assert.equal((await failed).error.code, 'forbidden');
    await assert.rejects(conn.subscribe('one-too-many'), { code: 'too_many_subscriptions' });
    assert.deepEqual(conn.channels, []);
    assert.throws(() => secret.send('hi'), /failed/);
    await assert.rejects(secret.history(), { code: 'failed' });
    // A later subscribe starts afresh.
    const ok = await conn.subscribe('general');
    assert.equal(ok.state, 'live');
    assert.equal(framesOf(peer.connections[0], 'subscribe').length, 3);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('retryable refusals are retried after their retryAfterMs until the subscribe succeeds', T, async () => {
  const codes = { full: 'channel_full', limit: 'user_limit', down: 'unavailable', slow: 'rate_limited' };
  const waits = { full: 11, limit: 22, down: 33, slow: 44 };
  const seen = new Map();
  const peer = await Peer.start({
    onConnection: (c) =>
      answerSubscribes(c, (f) => {
        const n = (seen.get(f.channelId) ?? 0) + 1;
        seen.set(f.channelId, n);
        if (n === 1) {
          return {
            type: 'error',
            channelId: f.channelId,
            code: codes[f.channelId],
            message: 'refused',
            retryable: true,
            retryAfterMs: waits[f.channelId],
          };
        }
        return state(f.channelId);
      }),
  });
  const timers = instantTimers();
  const conn = makeConnection(peer, timers);
  try {
    const handles = Object.keys(codes).map((id) => conn.channel(id));
    const retrying = handles.map((h) => nextEvent(h, 'state', (e) => e.state === 'retrying'));
    const errors = handles.map((h) => nextEvent(h, 'error'));
    await Promise.all(handles.map((h) => h.ready));
    for (const [i, id] of Object.keys(codes).entries()) {
      const change = await retrying[i];
      assert.equal(change.retryAfterMs, waits[id]);
      assert.equal(change.error.code, codes[id]);
      assert.equal((await errors[i]).code, codes[id]);
      assert.equal(seen.get(id), 2);
    }
    for (const ms of Object.values(waits)) assert.ok(timers.delays.includes(ms), `a ${ms} ms wait`);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('unsubscribe: confirmed by the server; its frames stop; pending sends and pages fail', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c);
      c.ws.on('message', (data) => {
        const f = JSON.parse(data.toString());
        if (f.type === 'unsubscribe') {
          c.send(msgFrame(f.channelId, 1)); // written before the server handled it
          c.send({ type: 'unsubscribed', channelId: f.channelId });
        }
      });
    },
  });
  const conn = makeConnection(peer, { maxInFlight: 1 });
  try {
    const [a, b] = await Promise.all([conn.subscribe('a'), conn.subscribe('b')]);
    const got = record(a, 'message');
    const iterator = a.messages();
    const first = a.send('waits for an ack');
    const second = a.send('never written (window of 1)');
    const page = a.history();
    await peer.connections[0].frame((f) => f.type === 'history');
    await a.unsubscribe();
    assert.equal(a.state, 'unsubscribed');
    await assert.rejects(first, { code: 'unsubscribed' });
    await assert.rejects(second, { code: 'unsubscribed' });
    await assert.rejects(page, { code: 'unsubscribed' });
    assert.deepEqual(await iterator.next(), { value: undefined, done: true });
    assert.deepEqual(got, [], 'the message written before the unsubscribe was ignored');
    assert.deepEqual(conn.channels, [b]);
    assert.deepEqual(
      a.outgoing.map((o) => o.state),
      ['failed', 'failed'],
    );
    assert.equal(await a.unsubscribe(), undefined, 'a second unsubscribe is a no-op');
    assert.equal(framesOf(peer.connections[0], 'unsubscribe').length, 1);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('subscribing again right after an unsubscribe ignores the old subscription\'s frames', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      let n = 0;
      c.ws.on('message', (data) => {
        const f = JSON.parse(data.toString());
        if (f.type === 'subscribe') {
          n += 1;
          c.send(state(f.channelId, { lastSeq: n === 1 ? 5 : 6, messages: n === 1 ? [msg(f.channelId, 5)] : [msg(f.channelId, 6)] }));
        }
        if (f.type === 'unsubscribe') {
          c.send(msgFrame(f.channelId, 6));
          c.send({ type: 'unsubscribed', channelId: f.channelId });
        }
      });
    },
  });
  const conn = makeConnection(peer);
  try {
    const old = await conn.subscribe('x');
    const leaving = old.unsubscribe();
    const fresh = conn.channel('x');
    assert.notEqual(fresh, old);
    const got = record(fresh, 'message');
    await leaving;
    await fresh.ready;
    await nextEvent(fresh, 'message', (m) => m.seq === 6).catch(() => {});
    assert.deepEqual(seqs(got), [6]);
    assert.equal(old.lastSeq, 5);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('not_subscribed on a live channel: the server lost it, so it is subscribed again with afterSeq', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => {
      let n = 0;
      answerSubscribes(c, (f) => {
        n += 1;
        if (n === 1) return [state(f.channelId, { lastSeq: 2, messages: [msg(f.channelId, 1), msg(f.channelId, 2)] })];
        return [state(f.channelId, { lastSeq: 3 }), msgFrame(f.channelId, 3), { type: 'sync_complete', channelId: f.channelId, lastSeq: 3, count: 1 }];
      });
    },
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    const got = record(ch, 'message');
    const server = peer.connections[0];
    server.send({ type: 'error', channelId: 'general', code: 'not_subscribed', message: 'Not subscribed to this channel' });
    await nextEvent(ch, 'message', (m) => m.seq === 3);
    assert.deepEqual(framesOf(server, 'subscribe')[1], { type: 'subscribe', channelId: 'general', afterSeq: 2 });
    assert.deepEqual(seqs(got), [3]);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('for await over a channel yields its messages in order', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) => answerSubscribes(c, (f) => [state(f.channelId), msgFrame(f.channelId, 1), msgFrame(f.channelId, 2), msgFrame(f.channelId, 3)]),
  });
  const conn = makeConnection(peer, { autoConnect: false });
  const ch = conn.channel('general');
  try {
    const seen = [];
    const loop = (async () => {
      for await (const m of ch) {
        seen.push(m.seq);
        if (m.seq === 3) break;
      }
    })();
    conn.connect();
    await loop;
    assert.deepEqual(seen, [1, 2, 3]);
  } finally {
    conn.close();
    await peer.stop();
  }
});
