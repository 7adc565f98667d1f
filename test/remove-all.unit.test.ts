import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { removeAll } from '../src/util/fs';

/** removeAll (rm -rf) on what layer directories hold: it removes everything under the path and nothing outside it. */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'remove-all-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('a layer-like tree goes whole: nested directories, hardlinks, fifos, names that are not UTF-8; symlinks are removed, not followed', async () => {
  const outside = path.join(dir, 'outside');
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(outside, 'keep'), 'kept');
  const root = path.join(dir, 'layer');
  fs.mkdirSync(path.join(root, 'usr/lib/deep/er'), { recursive: true });
  for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(root, 'usr/lib', `f${i}`), String(i));
  fs.writeFileSync(path.join(root, 'usr/lib/deep/er/file'), 'x');
  fs.linkSync(path.join(root, 'usr/lib/f1'), path.join(root, 'usr/hardlink'));
  fs.symlinkSync(outside, path.join(root, 'usr/to-outside'));
  fs.symlinkSync(path.join(outside, 'keep'), path.join(root, 'usr/to-outside-file'));
  fs.symlinkSync('/nonexistent', path.join(root, 'dangling'));
  execFileSync('mkfifo', [path.join(root, 'fifo')]);
  // A name with a byte that is not UTF-8 (0xff), in a directory of its own.
  const raw = Buffer.concat([Buffer.from(`${root}/usr/`), Buffer.from([0x6e, 0xff]), Buffer.from('')]);
  fs.mkdirSync(raw);
  fs.writeFileSync(Buffer.concat([raw, Buffer.from('/inside')]), 'y');

  await removeAll(root);
  assert.equal(fs.existsSync(root), false);
  assert.deepEqual(fs.readdirSync(outside), ['keep']);
  assert.equal(fs.readFileSync(path.join(outside, 'keep'), 'utf8'), 'kept');
});

test('a missing path is fine; a file or a symlink given as the path is removed itself', async () => {
  await removeAll(path.join(dir, 'never-there'));
  const file = path.join(dir, 'file');
  fs.writeFileSync(file, 'x');
  await removeAll(file);
  assert.equal(fs.existsSync(file), false);
  const target = path.join(dir, 'target');
  fs.mkdirSync(target);
  fs.writeFileSync(path.join(target, 'a'), 'a');
  const link = path.join(dir, 'link');
  fs.symlinkSync(target, link);
  await removeAll(link);
  assert.equal(fs.existsSync(link), false);
  assert.deepEqual(fs.readdirSync(target), ['a']);
});

test('an error from the remover thread keeps its errno code, syscall and path', async () => {
  const file = path.join(dir, 'plain-file');
  fs.writeFileSync(file, 'x');
  await assert.rejects(removeAll(path.join(file, 'below')), (err: NodeJS.ErrnoException) => {
    assert.equal(err.code, 'ENOTDIR');
    assert.equal(err.errno, os.constants.errno.ENOTDIR === undefined ? undefined : -os.constants.errno.ENOTDIR);
    assert.equal(typeof err.syscall, 'string');
    assert.ok(err.message.includes(path.join(file, 'below')), err.message);
    assert.equal(err.path, path.join(file, 'below'));
    return true;
  });
  // The thread goes on with the next removal.
  await removeAll(file);
  assert.equal(fs.existsSync(file), false);
});
