// End to end, protocol v1.1: WaddleConnection against the real store,
// channel service and two edges started by `python -m tests.support.stack`.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { WaddleConnection } from '../../edge/static/waddle.js';
import { WebSocket, nextEvent, record, within } from './peer.mjs';
import { OpaqueWebSocket } from './mux_peer.mjs';
import { mintToken, skipStack, startStack } from './stack.mjs';

const skip = skipStack;
const T = { skip, timeout: 60_000 };
const WAIT = 15_000;

/** @type {import('./stack.mjs').RunningStack | null} */
let stack = null;
/** @type {WaddleConnection[]} */
let open = [];

before(
  async () => {
    if (skip) return;
    stack = await startStack({
      edges: 2,
      env: {
        WADDLE_MESSAGE_RATE: '5000',
        WADDLE_MESSAGE_BURST: '5000',
        WADDLE_FRAME_RATE: '5000',
        WADDLE_FRAME_BURST: '5000',
        WADDLE_PRESENCE_LINGER_SECONDS: '0',
        WADDLE_MAX_SUBSCRIPTIONS: '5',
        WADDLE_USER_MAX_CONNECTIONS: '3',
      },
    });
  },
  { timeout: 120_000 },
);

after(
  async () => {
    for (const conn of open) conn.close();
    await stack?.stop();
  },
  { timeout: 60_000 },
);

const unique = (name) => `${name}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;

/**
 * A WebSocket class that counts the sockets made and records every frame
 * written, per socket.
 */
function recordingSockets(Base = WebSocket) {
  /** @type {any[][]} */
  const sockets = [];
  class Recording extends Base {
    constructor(...args) {
      super(...args);
      this.sent = [];
      sockets.push(this.sent);
    }

    send(data, ...rest) {
      this.sent.push(JSON.parse(String(data)));
      return super.send(data, ...rest);
    }
  }
  return { WebSocket: Recording, sockets };
}

/**
 * A connection for `userId` on edge `edge`, closed after the tests.
 * @param {string} userId
 * @param {Partial<import('../../edge/static/waddle/connection.js').WaddleConnectionOptions> & {edge?: number}} [options]
 */
function connect(userId, options = {}) {
  const { edge = 0, ...rest } = options;
  const conn = new WaddleConnection({
    url: stack.edgeUrls[edge],
    token: mintToken(stack.jwtSecret, userId),
    WebSocket,
    network: null,
    baseDelayMs: 200,
    maxDelayMs: 1000,
    ...rest,
  });
  open.push(conn);
  return conn;
}

/** Send and wait for the acks, one after the other. */
async function post(channel, contents, options) {
  const acks = [];
  for (const content of contents) acks.push(await within(channel.send(content, options), WAIT, `ack of "${content}"`));
  return acks;
}

/** Resolve once `channel` delivered a message with seq >= `seq`. */
function until(channel, seq) {
  if (channel.lastSeq !== null && channel.lastSeq >= seq) return Promise.resolve();
  return nextEvent(channel, 'message', (m) => m.seq >= seq, WAIT);
}

const seqsOf = (events) => events.map((m) => m.seq);
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

test('one connection in three channels: each its own seqs, typing and joins per channel', T, async () => {
  const ids = [unique('a'), unique('b'), unique('c')];
  const aliceSockets = recordingSockets();
  const alice = connect(unique('alice'), { WebSocket: aliceSockets.WebSocket });
  const bobId = unique('bob');
  const bob = connect(bobId, { edge: 1 });
  const mine = await within(Promise.all(ids.map((id) => alice.subscribe(id))), WAIT, 'alice subscribed');
  const got = mine.map((ch) => record(ch, 'message'));
  const joined = mine.map((ch) => nextEvent(ch, 'online', (e) => e.users.some((u) => u.userId === bobId), WAIT));
  const theirs = await within(Promise.all(ids.map((id) => bob.subscribe(id))), WAIT, 'bob subscribed');
  await Promise.all(joined);
  for (const ch of theirs) {
    const acks = await post(ch, ['one', 'two', 'three']);
    assert.deepEqual(seqsOf(acks), [1, 2, 3]);
    assert.ok(acks.every((a) => a.channelId === ch.id));
  }
  await Promise.all(mine.map((ch) => until(ch, 3)));
  for (const [i, events] of got.entries()) {
    assert.deepEqual(seqsOf(events), [1, 2, 3]);
    assert.deepEqual(
      events.map((m) => m.content),
      ['one', 'two', 'three'],
    );
    assert.ok(events.every((m) => m.channelId === ids[i] && m.userId === bobId));
  }
  const typing = nextEvent(mine[1], 'typing', (e) => e.userId === bobId, WAIT);
  const elsewhere = record(mine[0], 'typing');
  assert.equal(theirs[1].setTyping(true), true);
  assert.equal((await typing).isTyping, true);
  assert.deepEqual(elsewhere, []);
  assert.equal(aliceSockets.sockets.length, 1, 'one socket for three channels');
  assert.deepEqual(
    aliceSockets.sockets[0].filter((f) => f.type === 'subscribe').map((f) => f.channelId),
    ids,
  );
});

test('unsubscribe stops a channel, the others go on; subscribing again starts fresh', T, async () => {
  const [x, y] = [unique('x'), unique('y')];
  const carol = connect(unique('carol'));
  const poster = connect(unique('poster'), { edge: 1 });
  const [cx, cy] = await Promise.all([carol.subscribe(x), carol.subscribe(y)]);
  const [px, py] = await Promise.all([poster.subscribe(x), poster.subscribe(y)]);
  const gotY = record(cy, 'message');
  await cy.unsubscribe();
  assert.equal(cy.state, 'unsubscribed');
  assert.deepEqual(carol.channels, [cx]);
  await post(py, ['after the unsubscribe']);
  const [ack] = await post(px, ['still subscribed']);
  await until(cx, ack.seq);
  assert.deepEqual(gotY, []);
  const again = carol.channel(y);
  assert.notEqual(again, cy);
  const recent = record(again, 'message');
  await within(again.ready, WAIT, 'the second subscribe');
  assert.equal(again.lastSeq, 1);
  assert.deepEqual(
    recent.map((m) => m.content),
    ['after the unsubscribe'],
    'a fresh subscription starts from initial_state',
  );
});

test('refusals: forbidden rejects, too_many_subscriptions rejects, user_limit is retried until a place frees', T, async () => {
  const allowed = unique('allowed');
  const doraId = unique('dora');
  const limited = connect(doraId, { token: mintToken(stack.jwtSecret, doraId, { channels: [allowed] }) });
  await assert.rejects(limited.subscribe(unique('elsewhere')), { code: 'forbidden' });
  assert.equal((await limited.subscribe(allowed)).state, 'live');

  const busy = connect(unique('busy'));
  await Promise.all(range(1, 5).map((i) => busy.subscribe(unique(`many${i}`))));
  await assert.rejects(busy.subscribe(unique('many6')), { code: 'too_many_subscriptions' });
  assert.equal(busy.channels.length, 5);

  // WADDLE_USER_MAX_CONNECTIONS is 3: a fourth socket of one user in one
  // channel waits, and gets in once one of the three leaves.
  const crowd = unique('crowd');
  const room = unique('room');
  const three = range(1, 3).map(() => connect(crowd, { token: mintToken(stack.jwtSecret, crowd) }));
  const inside = await Promise.all(three.map((c) => c.subscribe(room)));
  const fourth = connect(crowd, { token: mintToken(stack.jwtSecret, crowd), edge: 1 }).channel(room);
  const retrying = await nextEvent(fourth, 'state', (e) => e.state === 'retrying', WAIT);
  assert.equal(retrying.error.code, 'user_limit');
  assert.ok(retrying.retryAfterMs > 0);
  await inside[0].unsubscribe();
  await within(fourth.ready, WAIT, 'the retried subscribe');
  assert.equal(fourth.state, 'live');
});

test('the edge is killed and restarted: every channel resumes with one subscribe {afterSeq}, gap-free, exactly once', T, async () => {
  const ids = [unique('r1'), unique('r2'), unique('r3')];
  const readerId = unique('reader');
  let gate = null;
  let calls = 0;
  const readerSockets = recordingSockets();
  const reader = connect(readerId, {
    WebSocket: readerSockets.WebSocket,
    token: async () => {
      calls += 1;
      if (gate !== null) await gate.promise; // hold the reader away while the writer writes
      return mintToken(stack.jwtSecret, readerId);
    },
  });
  const writer = connect(unique('writer'), { edge: 1 });
  const mine = await Promise.all(ids.map((id) => reader.subscribe(id)));
  const theirs = await Promise.all(ids.map((id) => writer.subscribe(id)));
  const got = mine.map((ch) => record(ch, 'message'));
  for (const ch of theirs) await post(ch, ['before 1', 'before 2']);
  await Promise.all(mine.map((ch) => until(ch, 2)));

  let release;
  gate = { promise: new Promise((res) => (release = res)) };
  const away = nextEvent(reader, 'state', (e) => e.state === 'reconnecting', WAIT);
  await stack.restartEdge(0);
  await away;
  assert.ok(mine.every((ch) => ch.onlineStale), 'online lists are stale while away');
  // Written while the reader is away: by the writer, and by the reader itself (queued).
  for (const ch of theirs) await post(ch, ['missed 3', 'missed 4', 'missed 5']);
  const queued = mine[0].send('written while away');
  assert.equal(mine[0].outgoing[0].state, 'queued');
  const writerSees = nextEvent(theirs[0], 'message', (m) => m.content === 'written while away', WAIT);
  release();
  const ack = await within(queued, WAIT, 'the queued message to be acknowledged');
  assert.equal(ack.seq, 6);
  await Promise.all(mine.map((ch, i) => until(ch, i === 0 ? 6 : 5)));
  assert.equal((await writerSees).seq, 6);
  assert.deepEqual(seqsOf(got[0]), range(1, 6));
  assert.deepEqual(seqsOf(got[1]), range(1, 5));
  assert.deepEqual(seqsOf(got[2]), range(1, 5));
  assert.equal(got[0].filter((m) => m.content === 'written while away').length, 1);
  const resumed = readerSockets.sockets.at(-1).filter((f) => f.type === 'subscribe');
  assert.deepEqual(
    resumed,
    ids.map((channelId) => ({ type: 'subscribe', channelId, afterSeq: 2 })),
  );
  assert.ok(calls >= 2);
  // Live again everywhere, exactly once.
  for (const ch of theirs) await post(ch, ['live']);
  await Promise.all(mine.map((ch, i) => until(ch, i === 0 ? 7 : 6)));
  assert.deepEqual(seqsOf(got[1]), range(1, 6));
  assert.ok(mine.every((ch) => ch.state === 'live' && !ch.onlineStale));
});

test('history pages backwards and follows a thread', T, async () => {
  const conn = connect(unique('historian'));
  const ch = await conn.subscribe(unique('hist'));
  const [root] = await post(ch, ['root']);
  for (let i = 2; i <= 25; i += 1) {
    await post(ch, [i % 5 === 0 ? `reply ${i}` : `m${i}`], i % 5 === 0 ? { threadId: root.id } : undefined);
  }
  const pages = [];
  let beforeSeq;
  for (;;) {
    const page = await ch.history({ beforeSeq, limit: 10 });
    pages.push(page);
    if (!page.hasMore) break;
    beforeSeq = page.messages[0].seq;
  }
  assert.deepEqual(
    pages.map((p) => [p.messages[0].seq, p.messages.at(-1).seq, p.hasMore]),
    [
      [16, 25, true],
      [6, 15, true],
      [1, 5, false],
    ],
  );
  assert.equal(pages[2].messages[0].replyCount, 5);
  const newest = await ch.history({ threadId: root.id, limit: 2 });
  assert.deepEqual(
    newest.messages.map((m) => m.content),
    ['reply 20', 'reply 25'],
  );
  assert.equal(newest.hasMore, true);
  const older = await ch.history({ threadId: root.id, beforeSeq: newest.messages[0].seq, limit: 100 });
  assert.deepEqual(
    older.messages.map((m) => m.content),
    ['reply 5', 'reply 10', 'reply 15'],
  );
  assert.equal(older.hasMore, false);
  assert.ok(older.messages.every((m) => m.threadId === root.id));
});

test('read cursors and unread counts follow one user across two connections', T, async () => {
  const channelId = unique('reads');
  const userId = unique('reader2');
  const writer = connect(unique('chatty'), { edge: 1 });
  const w = await writer.subscribe(channelId);
  await post(w, range(1, 10).map((i) => `m${i}`));
  const phone = await connect(userId, { token: mintToken(stack.jwtSecret, userId) }).subscribe(channelId);
  const laptop = await connect(userId, { token: mintToken(stack.jwtSecret, userId), edge: 1 }).subscribe(channelId);
  await until(phone, 10);
  assert.deepEqual([phone.readSeq, phone.unreadCount], [0, 10]);
  assert.deepEqual([laptop.readSeq, laptop.unreadCount], [0, 10]);
  const followed = nextEvent(laptop, 'unread', (e) => e.readSeq === 7, WAIT);
  const receipt = nextEvent(w, 'receipt', (e) => e.userId === userId && e.seq === 7, WAIT);
  assert.equal(phone.markRead(7), true);
  assert.equal((await followed).unreadCount, 3);
  assert.equal(phone.markRead(3), false, 'never back');
  await receipt;
  // Sending moves the sender's cursor, on both devices.
  const phoneFollows = nextEvent(phone, 'unread', (e) => e.readSeq === 11, WAIT);
  const [ack] = await post(laptop, ['my own']);
  assert.equal(ack.seq, 11);
  await phoneFollows;
  await until(laptop, 11);
  assert.deepEqual([laptop.readSeq, laptop.unreadCount], [11, 0]);
  assert.deepEqual([phone.readSeq, phone.unreadCount], [11, 0]);
  // A third device starts from the stored cursor.
  const tablet = await connect(userId, { token: mintToken(stack.jwtSecret, userId) }).subscribe(channelId);
  assert.deepEqual([tablet.readSeq, tablet.unreadCount], [11, 0]);
});

test('a token refused on reconnect emits auth; the fresh token it leads to resumes every channel', T, async () => {
  const userId = unique('revoked');
  let token = mintToken(stack.jwtSecret, userId);
  const reasons = [];
  const conn = connect(userId, {
    token: (request) => {
      reasons.push(request.reason);
      return token;
    },
  });
  const writer = connect(unique('writer2'), { edge: 1 });
  const channelId = unique('auth');
  const ch = await conn.subscribe(channelId);
  const w = await writer.subscribe(channelId);
  await post(w, ['before']);
  await until(ch, 1);
  // The token goes bad while connected (signed with a rotated secret, say).
  token = mintToken(`${stack.jwtSecret}-rotated`, userId);
  const auth = nextEvent(conn, 'auth', () => true, WAIT);
  conn.on('auth', () => {
    token = mintToken(stack.jwtSecret, userId); // what a page would fetch
  });
  await stack.restartEdge(0);
  const refused = await auth;
  assert.deepEqual(refused, { message: 'The server refused the token', code: 'unauthorized', status: 401 });
  await post(w, ['while refused']);
  await until(ch, 2);
  assert.ok(reasons.includes('unauthorized'), `the token function was told why: ${reasons}`);
  assert.equal(conn.state, 'open');
});

test('browsers cannot see the 401: the client asks the edge, and reports auth all the same', T, async () => {
  const userId = unique('browser');
  const conn = connect(userId, {
    WebSocket: OpaqueWebSocket,
    token: mintToken(`${stack.jwtSecret}-wrong`, userId),
    baseDelayMs: 60_000,
    maxDelayMs: 60_000,
  });
  const states = record(conn, 'state');
  const refused = await nextEvent(conn, 'auth', () => true, WAIT);
  assert.equal(refused.status, 401);
  conn.setToken(mintToken(stack.jwtSecret, userId));
  assert.equal(conn.retryNow(), true);
  const ch = await within(conn.subscribe(unique('browser')), WAIT, 'the subscribe after a fresh token');
  assert.equal(ch.state, 'live');
  assert.ok(states.some((s) => s.state === 'reconnecting' && s.status === 401));
});
