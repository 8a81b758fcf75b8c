// The real Waddle stack for end-to-end tests: `python -m tests.support.stack
// --json` as a child process (store, channel service, edges on free ports),
// commands to it on standard input (restart an edge), and HS256 tokens
// signed with its secret.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { within } from './peer.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const PYTHON = existsSync(join(ROOT, '.venv', 'bin', 'python')) ? join(ROOT, '.venv', 'bin', 'python') : 'python3';

/** Why the end-to-end tests cannot run here (false when they can). */
export const skipStack =
  existsSync(join(ROOT, 'tests', 'support', 'stack.py')) || process.env.CI === 'true'
    ? false
    : 'tests/support/stack is not available in this checkout';

/**
 * @typedef {object} RunningStack
 * @property {string} edgeUrl          The first edge's base URL.
 * @property {string[]} edgeUrls       Every edge's base URL.
 * @property {string} jwtSecret
 * @property {(i?: number) => Promise<void>} restartEdge  Kill edge `i` and start it again on its port.
 * @property {() => Promise<void>} stop
 */

/**
 * Start the stack; resolve once it reported ready.
 * @param {{edges?: number, env?: Record<string, string>}} [options]
 * @returns {Promise<RunningStack>}
 */
export async function startStack(options = {}) {
  const args = ['-m', 'tests.support.stack', '--json', '--edges', String(options.edges ?? 1)];
  for (const [name, value] of Object.entries(options.env ?? {})) args.push('--env', `${name}=${value}`);
  const child = spawn(PYTHON, args, { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'] });
  /** @type {((answer: any) => void)[]} */
  const answers = [];
  let ready;
  const readyLine = new Promise((resolveReady, reject) => {
    ready = resolveReady;
    child.once('error', reject);
    child.once('exit', (code, signal) => reject(new Error(`the stack exited early (code ${code}, signal ${signal})`)));
  });
  let started = false;
  createInterface({ input: child.stdout }).on('line', (line) => {
    const text = line.trim();
    if (!text.startsWith('{')) return;
    let info;
    try {
      info = JSON.parse(text);
    } catch {
      return;
    }
    if (!started && typeof info.edge_url === 'string') {
      started = true;
      ready(info);
    } else if (typeof info.event === 'string') {
      answers.shift()?.(info);
    }
  });
  /** @param {string} command */
  const command = (command) => {
    const answer = new Promise((resolveAnswer) => answers.push(resolveAnswer));
    child.stdin.write(`${command}\n`);
    return within(answer, 60_000, `the stack to run "${command}"`);
  };
  let info;
  try {
    info = await within(readyLine, 90_000, 'the stack to report ready');
  } catch (err) {
    child.kill('SIGKILL');
    throw err;
  }
  return {
    edgeUrl: info.edge_url,
    edgeUrls: info.edge_urls ?? [info.edge_url],
    jwtSecret: info.jwt_secret,
    async restartEdge(i = 0) {
      const answer = await command(`restart_edge ${i}`);
      if (answer.event !== 'edge_restarted') throw new Error(`restart_edge failed: ${JSON.stringify(answer)}`);
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((res) => child.once('exit', res));
      child.stdin.end(); // end of input stops the stack
      try {
        await within(exited, 30_000, 'the stack to stop');
      } catch {
        child.kill('SIGKILL');
        await exited;
      }
    },
  };
}

/** @param {string | Buffer} data */
const b64url = (data) => Buffer.from(data).toString('base64url');

/**
 * An HS256 JWT as the edge expects: `sub`, `username`, `permissions`, `exp`.
 * @param {string} secret
 * @param {string} userId
 * @param {Record<string, unknown>} [claims]  More claims, or overrides.
 */
export function mintToken(secret, userId, claims = {}) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(
    JSON.stringify({
      sub: userId,
      username: userId,
      permissions: ['read', 'write'],
      exp: Math.floor(Date.now() / 1000) + 3600,
      ...claims,
    }),
  );
  const signature = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url');
  return `${header}.${body}.${signature}`;
}
