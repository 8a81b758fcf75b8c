// End to end: two WaddleClients against the real store, channel and edge
// processes started by `python -m tests.support.stack --json`.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { WaddleClient } from '../../edge/static/waddle.js';
import { WebSocket, nextEvent, record, within } from './peer.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const PYTHON = existsSync(join(ROOT, '.venv', 'bin', 'python'))
  ? join(ROOT, '.venv', 'bin', 'python')
  : 'python3';
const HAS_STACK =
  existsSync(join(ROOT, 'tests', 'support', 'stack.py')) ||
  existsSync(join(ROOT, 'tests', 'support', 'stack', '__init__.py'));
const CI = process.env.CI === 'true';
const skip = !HAS_STACK && !CI ? 'tests/support/stack is not available in this checkout' : false;

/** @type {import('node:child_process').ChildProcess | null} */
let child = null;
/** @type {{edge_url: string, jwt_secret: string} | null} */
let stack = null;

/** Start the stack and resolve with its JSON line. */
function startStack() {
  child = spawn(PYTHON, ['-m', 'tests.support.stack', '--json'], {
    cwd: ROOT,
    stdio: ['pipe', 'pipe', 'inherit'],
    env: { ...process.env, WADDLE_DEV_MODE: '1' },
  });
  const proc = child;
  const ready = new Promise((resolveReady, reject) => {
    const lines = createInterface({ input: proc.stdout });
    lines.on('line', (line) => {
      const text = line.trim();
      if (!text.startsWith('{')) return;
      try {
        const info = JSON.parse(text);
        if (typeof info.edge_url === 'string') resolveReady(info);
      } catch {
        // not the ready line
      }
    });
    proc.once('error', reject);
    proc.once('exit', (code, signal) =>
      reject(new Error(`tests.support.stack exited early (code ${code}, signal ${signal})`)),
    );
  });
  return within(ready, 60_000, 'the stack to report ready');
}

async function stopStack() {
  const proc = child;
  child = null;
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((res) => proc.once('exit', res));
  proc.stdin.end();
  proc.kill('SIGTERM');
  try {
    await within(exited, 20_000, 'the stack to stop');
  } catch {
    proc.kill('SIGKILL');
    await exited;
  }
}

/** Ask the dev endpoint for a token. */
async function devToken(username) {
  const response = await fetch(new URL('/dev/token', stack.edge_url), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username }),
  });
  assert.equal(response.status, 200, `POST /dev/token answered ${response.status}`);
  const body = await response.json();
  assert.equal(body.username, username);
  assert.equal(typeof body.token, 'string');
  assert.equal(typeof body.userId, 'string');
  return body;
}

before(async () => {
  if (!skip) stack = await startStack();
}, { timeout: 90_000 });

after(async () => {
  await stopStack();
}, { timeout: 30_000 });

test('a message reaches both members exactly once with the same seq, and the sender gets an ack', {
  skip,
  timeout: 60_000,
}, async () => {
  const channelId = `e2e-${process.pid}-${Date.now()}`;
  const alice = await devToken('alice');
  const bob = await devToken('bob');
  const clients = [alice, bob].map(
    (who) => new WaddleClient({ url: stack.edge_url, channelId, token: who.token, WebSocket }),
  );
  const [a, b] = clients;
  const received = clients.map((c) => record(c, 'message'));
  try {
    const ready = clients.map((c) => nextEvent(c, 'initial_state', () => true, 15_000));
    await Promise.all(ready);
    // Both are members of the channel once their initial_state has arrived.
    const content = `hello from alice ${Date.now()}`;
    const gotA = nextEvent(a, 'message', (m) => m.content === content, 15_000);
    const gotB = nextEvent(b, 'message', (m) => m.content === content, 15_000);
    const acked = nextEvent(a, 'ack', () => true, 15_000);
    const clientMsgId = a.send(content);

    const [ma, mb, ack] = await Promise.all([gotA, gotB, acked]);
    assert.equal(ack.clientMsgId, clientMsgId);
    assert.equal(ma.seq, mb.seq);
    assert.equal(ack.seq, ma.seq);
    assert.equal(ack.id, ma.id);
    assert.equal(ma.username, 'alice');
    assert.equal(ma.userId, alice.userId);
    assert.equal(ma.channelId, channelId);
    assert.deepEqual(a.pending, []);

    // A marker sent after the first message proves nothing was duplicated.
    const marker = `marker ${Date.now()}`;
    const markA = nextEvent(a, 'message', (m) => m.content === marker, 15_000);
    const markB = nextEvent(b, 'message', (m) => m.content === marker, 15_000);
    b.send(marker);
    const [ka, kb] = await Promise.all([markA, markB]);
    assert.equal(ka.seq, kb.seq);
    assert.ok(ka.seq > ma.seq);
    for (const events of received) {
      assert.equal(events.filter((m) => m.content === content).length, 1);
      const order = events.map((m) => m.seq);
      assert.deepEqual(order, [...order].sort((x, y) => x - y));
      assert.equal(new Set(order).size, order.length);
    }
  } finally {
    for (const c of clients) c.close();
  }
});
