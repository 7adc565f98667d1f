import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { FS_TOPDIR_FL, inodeFlags } from '../native/inode-flags';
import { onExt4WithoutJournal, spreadSubdirectories } from '../src/store/spread';
import { devNumbers } from '../src/util/fs';

/**
 * On an ext4 without a journal, ROOT/snapshots carries the top-directory
 * flag (chattr +T), so that a layer directory containerd unpacks into is not
 * placed among the inodes of the layer directory removed a moment before
 * (see src/store/spread.ts). The filesystem's kind is read from sysfs; a
 * fake sysfs tree says "journal" or "no journal" for any directory here.
 */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spread-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A sysfs tree where `target`'s device is an ext4 whose journal_task reads `journal` (no ext4 entry when null). */
function fakeSysfs(name: string, target: string, journal: string | null): string {
  const sys = path.join(dir, name);
  fs.mkdirSync(path.join(sys, 'devices', 'virtual', 'block', 'vdz'), { recursive: true });
  fs.mkdirSync(path.join(sys, 'dev', 'block'), { recursive: true });
  fs.symlinkSync(path.join('..', '..', 'devices', 'virtual', 'block', 'vdz'), path.join(sys, 'dev', 'block', devNumbers(fs.statSync(target, { bigint: true }).dev).join(':')));
  if (journal !== null) {
    fs.mkdirSync(path.join(sys, 'fs', 'ext4', 'vdz'), { recursive: true });
    fs.writeFileSync(path.join(sys, 'fs', 'ext4', 'vdz', 'journal_task'), `${journal}\n`);
  }
  return sys;
}

function flagsOf(p: string): number {
  const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    return inodeFlags(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function fsType(p: string): string {
  return spawnSync('stat', ['-f', '-c', '%T', p], { encoding: 'utf8' }).stdout.trim();
}

test('device numbers are decoded as glibc encodes them (small and large majors and minors)', () => {
  assert.equal(devNumbers(65024n).join(':'), '254:0'); // a virtio disk, vda
  assert.equal(devNumbers(2049n).join(':'), '8:1'); // sda1
  // gnu_dev_makedev(259, 300): ((259 & 0xfff) << 8) | (300 & 0xff) | ((300 & ~0xff) << 12)
  assert.equal(devNumbers(((259n & 0xfffn) << 8n) | (300n & 0xffn) | ((300n & ~0xffn) << 12n)).join(':'), '259:300');
  // gnu_dev_makedev(4097, 1048577): the high parts of both
  const big = ((4097n & 0xfffn) << 8n) | ((4097n & ~0xfffn) << 32n) | (1048577n & 0xffn) | ((1048577n & ~0xffn) << 12n);
  assert.equal(devNumbers(big).join(':'), '4097:1048577');
});

test("the filesystem's kind is read from its device's sysfs entry", () => {
  assert.equal(onExt4WithoutJournal(dir, fakeSysfs('sys-none', dir, '<none>')), true);
  assert.equal(onExt4WithoutJournal(dir, fakeSysfs('sys-jbd2', dir, 'jbd2/vdz-8')), false);
  assert.equal(onExt4WithoutJournal(dir, fakeSysfs('sys-other', dir, null)), false, 'not ext4: no /sys/fs/ext4 entry');
  assert.equal(onExt4WithoutJournal(path.join(dir, 'missing'), fakeSysfs('sys-missing', dir, '<none>')), false);
});

test('with a journal (or on another filesystem) the directory is left as it is', () => {
  const d = path.join(dir, 'journalled');
  fs.mkdirSync(d);
  const before = flagsOrNull(d);
  assert.deepEqual(spreadSubdirectories(d, fakeSysfs('sys-j', d, 'jbd2/vdz-8')), { on: false, why: 'not needed' });
  assert.equal(flagsOrNull(d), before);
});

test('without a journal the flag is set once, kept, shown by lsattr, and not inherited by subdirectories', (t) => {
  const d = path.join(dir, 'snapshots');
  fs.mkdirSync(d);
  const sys = fakeSysfs('sys-set', d, '<none>');
  const first = spreadSubdirectories(d, sys);
  const type = fsType(d);
  if (!first.on) {
    // Filesystems without the flag: nothing set, nothing thrown, the reason named. ext2/3/4 keep it.
    assert.equal(first.why, 'unsupported', JSON.stringify(first));
    assert.doesNotMatch(type, /^ext[234]/, `${type} refused the top-directory flag: ${JSON.stringify(first)}`);
    t.skip(`SKIP: ${os.tmpdir()} is ${type}, which keeps no top-directory flag: the flag itself is not tested`);
    return;
  }
  assert.deepEqual(first, { on: true, setNow: true });
  assert.notEqual(flagsOf(d) & FS_TOPDIR_FL, 0);
  assert.deepEqual(spreadSubdirectories(d, sys), { on: true, setNow: false });
  const ls = spawnSync('lsattr', ['-d', d], { encoding: 'utf8' });
  if (ls.status === 0) assert.match(ls.stdout.split(/\s+/)[0], /T/, `lsattr -d: ${ls.stdout}`);
  // A layer directory made under it is placed by the flag, but does not carry it: its own subdirectories stay next to it.
  const layer = path.join(d, '7');
  fs.mkdirSync(path.join(layer, 'fs'), { recursive: true });
  assert.equal(flagsOf(layer) & FS_TOPDIR_FL, 0);
  // Other flags are left as they were (ext4's extents flag on a directory, for one).
  const plain = fs.mkdtempSync(path.join(dir, 'plain-'));
  assert.equal(flagsOf(d) & ~FS_TOPDIR_FL, flagsOf(plain));
});

test('a filesystem that keeps no such flag (tmpfs) is reported, never thrown', (t) => {
  const shm = '/dev/shm';
  if (!fs.existsSync(shm) || fsType(shm) !== 'tmpfs') {
    t.skip('SKIP: no tmpfs at /dev/shm');
    return;
  }
  const d = fs.mkdtempSync(path.join(shm, 'spread-'));
  try {
    // tmpfs keeps a few chattr flags (append, immutable, nodump, noatime), not this one.
    const r = spreadSubdirectories(d, fakeSysfs('sys-shm', d, '<none>'));
    assert.equal(r.on, false, JSON.stringify(r));
    assert.equal(r.on === false && r.why, 'unsupported', JSON.stringify(r));
  } finally {
    fs.rmSync(d, { recursive: true, force: true });
  }
});

function flagsOrNull(p: string): number | null {
  try {
    return flagsOf(p);
  } catch {
    return null;
  }
}
