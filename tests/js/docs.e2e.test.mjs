// The runnable examples of docs/client-js.md (the ```js blocks that start
// with `// example: NAME.mjs`), run as written from the repository root
// against the real services, as a reader would run them.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { skipStack, startStack } from './stack.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const DOC = readFileSync(join(ROOT, 'docs', 'client-js.md'), 'utf8');

/** @type {Map<string, string>} example name -> code */
const examples = new Map();
for (const match of DOC.matchAll(/```js\n(\/\/ example: (\S+)\n[\s\S]*?)```/g)) examples.set(match[2], match[1]);

/** What each example must print. */
const EXPECTED = {
  'quickstart.mjs': [/^connection: open$/m, /^online in #general: \[ 'ada' \]$/m, /^stored as seq \d+$/m],
  'history.mjs': [
    /^pages: \[ '12,13,14,15,16', '7,8,9,10,11', '2,3,4,5,6', '1' \]$/m,
    /^replies to the root: 3$/m,
    /^thread: \[ 'coffee', 'standup', 'review' \]$/m,
    /^unread on the laptop: 16$/m,
    /^unread on the laptop after reading on the phone: 0$/m,
    /^ada sees grace read up to 16$/m,
  ],
};

/** @type {import('./stack.mjs').RunningStack | null} */
let stack = null;

before(
  async () => {
    if (!skipStack) stack = await startStack();
  },
  { timeout: 120_000 },
);

after(() => stack?.stop(), { timeout: 60_000 });

test('docs/client-js.md has the examples this test runs', () => {
  assert.deepEqual([...examples.keys()].sort(), Object.keys(EXPECTED).sort());
});

for (const name of Object.keys(EXPECTED)) {
  test(`docs example ${name} runs and prints what the text says`, { skip: skipStack, timeout: 60_000 }, async () => {
    const code = examples.get(name);
    assert.ok(code, `${name} is in docs/client-js.md`);
    const { stdout, stderr, error } = await new Promise((done) => {
      execFile(
        process.execPath,
        ['--input-type=module', '--eval', code],
        { cwd: ROOT, env: { ...process.env, WADDLE_URL: stack.edgeUrl }, timeout: 45_000 },
        (err, out, errOut) => done({ stdout: out, stderr: errOut, error: err }),
      );
    });
    assert.equal(error, null, `${name} failed: ${error?.message}\n${stderr}`);
    for (const pattern of EXPECTED[name]) assert.match(stdout, pattern);
  });
}
