// Protocol v1.1 channel state: the online list (and when it is stale),
// typing, presence, read cursors and unread counts, history pages.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Peer, nextEvent, record } from './peer.mjs';
import { answerSubscribes, framesOf, makeConnection, msg, msgFrame, state } from './mux_peer.mjs';

const T = { timeout: 10_000 };
const me = { userId: 'me', username: 'Me', joinedAt: 1, status: 'online' };
const user = (userId, status = 'online') => ({ userId, username: userId, joinedAt: 2, status });
const ids = (users) => users.map((u) => u.userId);

/** Act on every client frame of `type` on `conn`. */
function onFrame(conn, type, fn) {
  conn.ws.on('message', (data) => {
    const frame = JSON.parse(data.toString());
    if (frame.type === type) fn(frame);
  });
}

test('online list: initial_state, presence_diff, presence; stale while away, fresh after resuming', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) =>
      answerSubscribes(c, (f) =>
        state(f.channelId, {
          lastSeq: f.afterSeq ?? 0,
          onlineUsers: i === 0 ? [me, user('bob')] : [me, user('dave')],
          onlineCount: i === 0 ? 2 : 5,
        }),
      ),
  });
  const conn = makeConnection(peer, { random: () => 0 });
  try {
    const ch = await conn.subscribe('general');
    assert.deepEqual(ids(ch.onlineUsers), ['me', 'bob']);
    assert.equal(ch.onlineCount, 2);
    assert.equal(ch.onlineStale, false);
    const server = peer.connections[0];
    const diffs = record(ch, 'presenceDiff');
    const changed = nextEvent(ch, 'online', (e) => e.users.some((u) => u.userId === 'carol'));
    server.send({
      type: 'presence_diff',
      channelId: 'general',
      joins: [{ userId: 'carol', username: 'carol', status: 'online' }],
      leaves: [{ userId: 'bob', username: 'bob' }],
    });
    const online = await changed;
    assert.deepEqual(ids(online.users), ['me', 'carol']);
    assert.equal(online.count, 2);
    assert.equal(online.stale, false);
    assert.equal(diffs.length, 1);
    const away = nextEvent(ch, 'presence');
    server.send({ type: 'presence', channelId: 'general', userId: 'carol', username: 'carol', status: 'away' });
    assert.equal((await away).status, 'away');
    assert.equal(ch.onlineUsers.find((u) => u.userId === 'carol').status, 'away');

    const stale = nextEvent(ch, 'online', (e) => e.stale);
    server.terminate();
    const staleEvent = await stale;
    assert.deepEqual(ids(staleEvent.users), ['me', 'carol'], 'the last known list, marked stale');
    assert.equal(ch.onlineStale, true);
    const fresh = await nextEvent(ch, 'online', (e) => !e.stale);
    assert.deepEqual(ids(fresh.users), ['me', 'dave']);
    assert.equal(fresh.count, 5);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('typing: events and typingUsers, cleared when the connection drops; setTyping skips repeats', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => answerSubscribes(c) });
  const conn = makeConnection(peer, { random: () => 0, autoConnect: false });
  const ch = conn.channel('general');
  try {
    assert.equal(ch.setTyping(true), false, 'not sent before the channel is live');
    conn.connect();
    await ch.ready;
    const server = peer.connections[0];
    assert.equal(ch.setTyping(true), true);
    assert.equal(ch.setTyping(true), true);
    assert.equal(ch.setTyping(false), true);
    assert.equal(ch.setTyping(false), true);
    await server.framesOfType('typing', 2);
    const marker = server.frame((f) => f.type === 'ping');
    conn.ping();
    await marker;
    assert.deepEqual(framesOf(server, 'typing'), [
      { type: 'typing', channelId: 'general', isTyping: true },
      { type: 'typing', channelId: 'general', isTyping: false },
    ]);
    const typing = nextEvent(ch, 'typing');
    server.send({ type: 'typing', channelId: 'general', userId: 'bob', username: 'bob', isTyping: true });
    await typing;
    assert.deepEqual([...ch.typingUsers], [['bob', 'bob']]);
    const stopped = nextEvent(ch, 'typing', (e) => !e.isTyping);
    server.terminate();
    assert.deepEqual(await stopped, {
      type: 'typing',
      channelId: 'general',
      userId: 'bob',
      username: 'bob',
      isTyping: false,
      stale: true,
    });
    assert.equal(ch.typingUsers.size, 0);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('presence: per connection and per channel, told again after a resume unless the server has it', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) =>
      answerSubscribes(c, (f) =>
        state(f.channelId, {
          lastSeq: 0,
          // The second socket's first channel already lists the status set.
          onlineUsers: [{ ...me, status: i === 1 && f.channelId === 'a' ? 'away' : 'online' }],
        }),
      ),
  });
  const conn = makeConnection(peer, { random: () => 0 });
  try {
    const [a, b] = await Promise.all([conn.subscribe('a'), conn.subscribe('b')]);
    assert.throws(() => conn.setPresence('busy'), RangeError);
    assert.equal(conn.setPresence('away'), true);
    assert.equal(b.setPresence('dnd'), true);
    const first = peer.connections[0];
    await first.framesOfType('presence', 3);
    assert.deepEqual(framesOf(first, 'presence'), [
      { type: 'presence', channelId: 'a', status: 'away' },
      { type: 'presence', channelId: 'b', status: 'away' },
      { type: 'presence', channelId: 'b', status: 'dnd' },
    ]);
    assert.equal(a.onlineUsers[0].status, 'away');
    first.terminate();
    const second = await peer.connection(1);
    await Promise.all([a, b].map((h) => nextEvent(h, 'state', (e) => e.state === 'live')));
    const marker = second.frame((f) => f.type === 'ping');
    conn.ping();
    await marker;
    assert.deepEqual(framesOf(second, 'presence'), [{ type: 'presence', channelId: 'b', status: 'dnd' }]);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('read cursor: readSeq and unreadCount kept current; markRead never goes back; receipts', T, async () => {
  const peer = await Peer.start({
    onConnection: (c) =>
      answerSubscribes(c, (f) =>
        state(f.channelId, { lastSeq: 10, messages: [msg(f.channelId, 9), msg(f.channelId, 10)], readSeq: 4, unreadCount: 6 }),
      ),
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    const server = peer.connections[0];
    assert.deepEqual([ch.lastSeq, ch.readSeq, ch.unreadCount], [10, 4, 6]);
    const unread = record(ch, 'unread');
    const eleven = nextEvent(ch, 'message', (m) => m.seq === 11);
    server.send(msgFrame('general', 11));
    await eleven;
    assert.equal(ch.unreadCount, 7);
    assert.deepEqual(unread.at(-1), { channelId: 'general', readSeq: 4, unreadCount: 7, lastSeq: 11 });

    assert.equal(ch.markRead(8), true);
    assert.deepEqual([ch.readSeq, ch.unreadCount], [8, 3]);
    assert.equal(ch.markRead(5), false, 'never back');
    assert.throws(() => ch.markRead(0), RangeError);
    assert.equal(ch.markRead(), true, 'up to the last message');
    assert.equal(ch.markRead(500), false, 'capped at the last message: nothing new');
    await server.framesOfType('read', 2);
    assert.deepEqual(framesOf(server, 'read'), [
      { type: 'read', channelId: 'general', seq: 8 },
      { type: 'read', channelId: 'general', seq: 11 },
    ]);
    assert.equal(ch.unreadCount, 0);

    // Read on another device of this user.
    const twelve = nextEvent(ch, 'message', (m) => m.seq === 12);
    server.send(msgFrame('general', 12));
    await twelve;
    assert.equal(ch.unreadCount, 1);
    const moved = nextEvent(ch, 'unread', (e) => e.readSeq === 12);
    server.send({ type: 'read', channelId: 'general', userId: 'me', seq: 12 });
    assert.equal((await moved).unreadCount, 0);

    // Other members' receipts.
    const receipt = nextEvent(ch, 'receipt');
    server.send({ type: 'read', channelId: 'general', userId: 'bob', seq: 7 });
    assert.deepEqual(await receipt, { userId: 'bob', seq: 7, channelId: 'general' });
    const receipts = record(ch, 'receipt');
    server.send({ type: 'read', channelId: 'general', userId: 'bob', seq: 5 });
    // This user's own message moves the cursor with it (the server did too).
    const own = nextEvent(ch, 'message', (m) => m.seq === 13);
    server.send(msgFrame('general', 13, { userId: 'me' }));
    await own;
    assert.deepEqual(receipts, [], 'an older receipt changes nothing');
    assert.deepEqual([...ch.receipts], [['bob', 7]]);
    assert.deepEqual([ch.readSeq, ch.unreadCount], [13, 0]);
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('a markRead while away is told once the channel is live again', T, async () => {
  const peer = await Peer.start({
    onConnection: (c, i) =>
      answerSubscribes(c, (f) =>
        i === 0
          ? state(f.channelId, { lastSeq: 5, messages: [msg(f.channelId, 5)], readSeq: 1 })
          : [state(f.channelId, { lastSeq: 5, readSeq: 1 }), { type: 'sync_complete', channelId: f.channelId, lastSeq: 5, count: 0 }],
      ),
  });
  const conn = makeConnection(peer, { random: () => 0, baseDelayMs: 50 });
  try {
    const ch = await conn.subscribe('general');
    const resuming = nextEvent(ch, 'state', (e) => e.state === 'resuming');
    peer.connections[0].terminate();
    await resuming;
    assert.equal(ch.markRead(), true);
    assert.deepEqual([ch.readSeq, ch.unreadCount], [5, 0]);
    const second = await peer.connection(1);
    const read = await second.frame((f) => f.type === 'read');
    assert.deepEqual(read, { type: 'read', channelId: 'general', seq: 5 });
    assert.deepEqual(
      second.frames.map((f) => f.type),
      ['subscribe', 'read'],
    );
    assert.equal(ch.readSeq, 5, 'the server\'s older cursor does not move it back');
  } finally {
    conn.close();
    await peer.stop();
  }
});

/** A history page as the server answers it, from a channel of `total` messages. */
function page(frame, total) {
  const end = (frame.beforeSeq ?? total + 1) - 1;
  const start = Math.max(1, end - frame.limit + 1);
  const messages = [];
  for (let s = start; s <= end; s += 1) messages.push(msg(frame.channelId, s, frame.threadId ? { threadId: frame.threadId } : {}));
  const answer = { type: 'history', channelId: frame.channelId, messages, hasMore: start > 1 };
  if (frame.threadId) answer.threadId = frame.threadId;
  if (frame.beforeSeq) answer.beforeSeq = frame.beforeSeq;
  return answer;
}

test('history: pages matched to their requests, at most 4 in flight, threads, validation', T, async () => {
  /** @type {any[]} */
  const held = [];
  const peer = await Peer.start({
    onConnection: (c) => {
      answerSubscribes(c, (f) => state(f.channelId, { lastSeq: 120 }));
      onFrame(c, 'history', (f) => held.push(() => c.send(page(f, 120))));
    },
  });
  const conn = makeConnection(peer);
  try {
    const ch = await conn.subscribe('general');
    assert.throws(() => ch.history({ limit: 0 }), RangeError);
    assert.throws(() => ch.history({ limit: 101 }), RangeError);
    assert.throws(() => ch.history({ beforeSeq: 0 }), RangeError);
    assert.throws(() => ch.history({ threadId: 5 }), TypeError);
    const asks = [
      ch.history({ limit: 50 }),
      ch.history({ beforeSeq: 71, limit: 50 }),
      ch.history({ beforeSeq: 21, limit: 50 }),
      ch.history({ threadId: 'root', limit: 5 }),
      ch.history({ threadId: 'root', beforeSeq: 116, limit: 5 }),
      ch.history({ beforeSeq: 3 }),
    ];
    const server = peer.connections[0];
    await server.framesOfType('history', 4);
    const marker = server.frame((f) => f.type === 'ping');
    conn.ping();
    await marker;
    assert.equal(framesOf(server, 'history').length, 4, 'the server reads 4 pages per socket at once');
    // Answer in reverse order: each page still finds its request.
    while (held.length > 0 || framesOf(server, 'history').length < 6) {
      if (held.length === 0) await server.framesOfType('history', framesOf(server, 'history').length + 1);
      held.pop()();
    }
    const pages = await Promise.all(asks);
    assert.deepEqual(
      pages.map((p) => [p.messages[0]?.seq, p.messages.at(-1)?.seq, p.hasMore]),
      [
        [71, 120, true],
        [21, 70, true],
        [1, 20, false],
        [116, 120, true],
        [111, 115, true],
        [1, 2, false],
      ],
    );
    assert.equal(pages[3].messages[0].threadId, 'root');
    assert.deepEqual(framesOf(server, 'history')[1], { type: 'history', channelId: 'general', limit: 50, beforeSeq: 71 });
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('history: a refused page is asked again after retryAfterMs; a page in flight survives a reconnect', T, async () => {
  let refusals = 0;
  const peer = await Peer.start({
    onConnection: (c, i) => {
      answerSubscribes(c, (f) => state(f.channelId, { lastSeq: 30 }));
      onFrame(c, 'history', (f) => {
        if (i === 0 && f.beforeSeq === undefined && refusals === 0) {
          refusals += 1;
          c.send({ type: 'error', channelId: f.channelId, code: 'rate_limited', message: 'Rate limited', retryable: true, retryAfterMs: 20 });
          return;
        }
        if (i === 0 && f.beforeSeq === 11) return; // lost with the connection
        c.send(page(f, 30));
      });
    },
  });
  const conn = makeConnection(peer, { random: () => 0 });
  try {
    const ch = await conn.subscribe('general');
    const errors = record(ch, 'error');
    const newest = await ch.history({ limit: 10 });
    assert.deepEqual(
      newest.messages.map((m) => m.seq),
      [21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
    );
    assert.equal(errors[0].code, 'rate_limited');
    assert.equal(framesOf(peer.connections[0], 'history').length, 2);

    const older = ch.history({ beforeSeq: 11, limit: 10 });
    await peer.connections[0].frame((f) => f.type === 'history' && f.beforeSeq === 11);
    peer.connections[0].terminate();
    const again = await older;
    assert.deepEqual(
      [again.messages[0].seq, again.messages.at(-1).seq, again.hasMore],
      [1, 10, false],
    );
    const second = peer.connections[1];
    assert.deepEqual(
      second.frames.map((f) => f.type),
      ['subscribe', 'history'],
    );
  } finally {
    conn.close();
    await peer.stop();
  }
});

test('history: an unanswered page is rejected after historyTimeoutMs; close() rejects the rest', T, async () => {
  const peer = await Peer.start({ onConnection: (c) => answerSubscribes(c) });
  const conn = makeConnection(peer, { historyTimeoutMs: 50 });
  try {
    const ch = await conn.subscribe('general');
    await assert.rejects(ch.history(), { code: 'timeout', channelId: 'general' });
    const slow = makeConnection(peer, { historyTimeoutMs: 0 });
    const other = await slow.subscribe('general');
    const pending = other.history();
    slow.close();
    await assert.rejects(pending, { code: 'closed' });
  } finally {
    conn.close();
    await peer.stop();
  }
});
