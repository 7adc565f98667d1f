/**
 * native/lease.ts: whether a file is open anywhere else, which settling
 * relies on to tell a lazy layer in use (an overlay's clone of its mount
 * keeps the EROFS superblock, and so its image file, open).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { openElsewhere } from '../native/lease';
import { MS_RDONLY, mount, umount2 } from '../native/mount';
import { scratchDirs } from './helpers/daemon';

const work = scratchDirs();

test('a write lease tells whether a file is open elsewhere: another fd, a file-backed EROFS mount of it; leases off is an error', () => {
  const dir = work('lease');
  const file = path.join(dir, 'plain');
  fs.writeFileSync(file, 'x');
  assert.equal(openElsewhere(file), false, 'open nowhere else');
  const fd = fs.openSync(file, 'r');
  try {
    assert.equal(openElsewhere(file), true, 'open by another fd');
  } finally {
    fs.closeSync(fd);
  }
  assert.equal(openElsewhere(file), false);

  fs.mkdirSync(path.join(dir, 'tree'));
  fs.writeFileSync(path.join(dir, 'tree', 'f'), 'hello');
  const image = path.join(dir, 'image.erofs');
  execFileSync('mkfs.erofs', ['--quiet', image, path.join(dir, 'tree')]);
  const target = path.join(dir, 'mnt');
  fs.mkdirSync(target);
  mount(image, target, 'erofs', MS_RDONLY, null);
  try {
    assert.equal(fs.readFileSync(path.join(target, 'f'), 'utf8'), 'hello');
    assert.equal(openElsewhere(image), true, 'the mounted superblock holds its image open');
  } finally {
    umount2(target);
  }
  assert.equal(openElsewhere(image), false, 'let go once unmounted');

  const knob = '/proc/sys/fs/leases-enable';
  const was = fs.readFileSync(knob, 'utf8').trim();
  fs.writeFileSync(knob, '0');
  try {
    assert.throws(() => openElsewhere(file), (err: { code?: string; syscall?: string }) => err.code === 'EINVAL' && err.syscall === 'fcntl');
  } finally {
    fs.writeFileSync(knob, was);
  }
});
