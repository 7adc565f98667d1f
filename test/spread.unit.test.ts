import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { FS_TOPDIR_FL, inodeFlags } from '../native/inode-flags';
import { spreadSubdirectories } from '../src/store/spread';

/**
 * ROOT/snapshots carries ext4's top-directory flag (chattr +T), so that a
 * layer directory containerd unpacks into is not placed among the inodes of
 * the layer directory removed a moment before (see src/store/spread.ts).
 */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spread-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

function fsType(p: string): string {
  return spawnSync('stat', ['-f', '-c', '%T', p], { encoding: 'utf8' }).stdout.trim();
}

function flagsOf(p: string): number {
  const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    return inodeFlags(fd);
  } finally {
    fs.closeSync(fd);
  }
}

test('the flag is set once and kept where the filesystem has it (ext2/3/4), and lsattr shows it', (t) => {
  const d = path.join(dir, 'snapshots');
  fs.mkdirSync(d);
  const first = spreadSubdirectories(d);
  const type = fsType(d);
  if (!/^ext[234]/.test(type)) {
    // Filesystems without the flag: nothing set, nothing thrown, the reason named.
    assert.equal(first.on, false, `${type} claims to keep the top-directory flag`);
    t.skip(`${os.tmpdir()} is ${type}, not ext2/3/4: the flag itself is not tested`);
    return;
  }
  assert.deepEqual(first, { on: true, setNow: true });
  assert.notEqual(flagsOf(d) & FS_TOPDIR_FL, 0);
  assert.deepEqual(spreadSubdirectories(d), { on: true, setNow: false });
  const ls = spawnSync('lsattr', ['-d', d], { encoding: 'utf8' });
  if (ls.status === 0) assert.match(ls.stdout.split(/\s+/)[0], /T/, `lsattr -d: ${ls.stdout}`);
  // Other flags are left as they were (ext4's extents flag on a directory, for one).
  const other = fs.mkdtempSync(path.join(dir, 'plain-'));
  assert.equal(flagsOf(d) & ~FS_TOPDIR_FL, flagsOf(other) & ~FS_TOPDIR_FL);
});

test('a filesystem without the flag, or a directory that is gone, is reported, never thrown', () => {
  assert.deepEqual(spreadSubdirectories(path.join(dir, 'missing')), { on: false, code: 'ENOENT' });
  const shm = '/dev/shm';
  if (fs.existsSync(shm) && fsType(shm) === 'tmpfs') {
    const d = fs.mkdtempSync(path.join(shm, 'spread-'));
    try {
      const r = spreadSubdirectories(d);
      // tmpfs keeps a few chattr flags (append, immutable, nodump, noatime), not this one.
      assert.equal(r.on, false, JSON.stringify(r));
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  }
});
