import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { FdUsers } from '../src/util/fd-users';

/** A descriptor released while operations use it stays open until the last of them ends (not the first). */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fd-users-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const isOpen = (fd: number) => {
  try {
    fs.fstatSync(fd);
    return true;
  } catch {
    return false;
  }
};

test('released under two users: open until both end, closed by the last', async () => {
  const fds = new FdUsers();
  const fd = fs.openSync(path.join(dir, 'f'), 'w');
  let endFirst!: () => void;
  let endSecond!: () => void;
  const first = fds.use(fd, () => new Promise<void>((r) => (endFirst = r)));
  const second = fds.use(fd, () => new Promise<void>((r) => (endSecond = r)));
  fds.release(fd);
  assert.ok(isOpen(fd), 'open while in use');
  endFirst();
  await first;
  assert.ok(isOpen(fd), 'still open: the second user holds it');
  endSecond();
  await second;
  assert.equal(isOpen(fd), false, 'closed by the last user');
});

test('released when unused: closed at once; a user that fails still lets it close', async () => {
  const fds = new FdUsers();
  const a = fs.openSync(path.join(dir, 'a'), 'w');
  fds.release(a);
  assert.equal(isOpen(a), false);
  const b = fs.openSync(path.join(dir, 'b'), 'w');
  let fail!: (err: Error) => void;
  const using = fds.use(b, () => new Promise<void>((_, reject) => (fail = reject)));
  fds.release(b);
  fail(new Error('read failed'));
  await assert.rejects(using, /read failed/);
  assert.equal(isOpen(b), false);
});
