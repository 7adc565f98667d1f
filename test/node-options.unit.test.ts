import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DAEMON_NODE_OPTIONS, missingNodeOptions } from '../src/cmd/node-options';

/** When the daemon runs itself again with its V8 options (execWithDaemonOptions), and when it leaves node as it was started. */

test('started without them: the daemon adds its options', () => {
  assert.deepEqual(missingNodeOptions({ execArgv: [], env: {} }), [...DAEMON_NODE_OPTIONS]);
  // Other node options (a profiler's) are no reason to skip.
  assert.deepEqual(missingNodeOptions({ execArgv: ['--cpu-prof'], env: { NODE_OPTIONS: '--enable-source-maps' } }), [...DAEMON_NODE_OPTIONS]);
});

test("the operator's own value of an option, on node's command line or in NODE_OPTIONS, is kept; the others are added", () => {
  assert.deepEqual(missingNodeOptions({ execArgv: ['--max-semi-space-size=8'], env: {} }), ['--initial-old-space-size=128']);
  assert.deepEqual(missingNodeOptions({ execArgv: [], env: { NODE_OPTIONS: '--inspect  --initial-old-space-size=512' } }), ['--max-semi-space-size=32']);
  assert.equal(missingNodeOptions({ execArgv: ['--initial-old-space-size=64'], env: { NODE_OPTIONS: '--max-semi-space-size=64' } }), null);
});

test('the image started with them never runs itself again, even if node dropped the option', () => {
  assert.equal(missingNodeOptions({ execArgv: [], env: { DEDUP_NODE_OPTIONS_APPLIED: '1' } }), null);
  assert.equal(missingNodeOptions({ execArgv: [...DAEMON_NODE_OPTIONS], env: {} }), null);
});
