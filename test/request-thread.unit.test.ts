import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { RequestThread } from '../src/util/request-thread';

/**
 * RequestThread: one worker answering requests in order; a request that
 * throws fails alone, a thread that dies fails what it was asked and the
 * next request starts another.
 */

type Ask = { say?: string; fail?: string; exit?: number };
const echo = () => new RequestThread<Ask, string | undefined>(path.join(__dirname, 'helpers', 'echo-worker.js'), 'echo');

test('answers come back to their requests, in order; a thrown error fails its request alone, with its code', async () => {
  const t = echo();
  const asked = [t.request({ say: 'a' }), t.request({ fail: 'no such thing' }), t.request({ say: 'c' })];
  const [a, b, c] = await Promise.allSettled(asked);
  assert.deepEqual(a, { status: 'fulfilled', value: 'a' });
  assert.equal(b.status, 'rejected');
  assert.equal((b as PromiseRejectedResult).reason.message, 'no such thing');
  assert.equal((b as PromiseRejectedResult).reason.code, 'EFAKE');
  assert.deepEqual(c, { status: 'fulfilled', value: 'c' });
});

test('a thread that exits fails what it was asked, naming itself; the next request starts another', async () => {
  const t = echo();
  await assert.rejects(t.request({ exit: 7 }), /the echo thread exited \(code 7\)/);
  assert.equal(await t.request({ say: 'again' }), 'again');
});

test('a request that cannot be sent fails at once and holds nothing (the process can still exit)', async () => {
  const t = echo();
  await assert.rejects(t.request({ say: (() => 'x') as unknown as string }), /could not be cloned/);
  assert.equal(await t.request({ say: 'sent' }), 'sent');
});
