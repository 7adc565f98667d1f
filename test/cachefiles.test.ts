/**
 * The parts of the fscache backend this machine can check without a kernel
 * that has it: the cachefiles message format (<linux/cachefiles.h>), the
 * page-aligned buffers direct I/O to a cache object needs, and the choice
 * of on-demand backend. The backend itself runs in fscache.test (in the
 * ondemand VM).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import koffi from 'koffi';
import { AlignedBuffer, CACHEFILES_IOC_READ_COMPLETE, CACHEFILES_OP_CLOSE, CACHEFILES_OP_OPEN, CACHEFILES_OP_READ, PAGE, parseCachefilesMsg } from '../native/cachefiles';
import { defaultConfig } from '../src/config/config';
import type { CheckResult } from '../src/doctor/types';
import { chooseOndemandBackend } from '../src/ondemand/backend';

function header(msgId: number, opcode: number, len: number, objectId: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32LE(msgId, 0);
  b.writeUInt32LE(opcode, 4);
  b.writeUInt32LE(len, 8);
  b.writeUInt32LE(objectId, 12);
  return b;
}

function openMsg(volume: string, cookie: string, fd: number): Buffer {
  const v = Buffer.from(`${volume}\0`, 'latin1');
  const c = Buffer.from(cookie, 'latin1');
  const load = Buffer.alloc(16);
  load.writeUInt32LE(v.length, 0);
  load.writeUInt32LE(c.length, 4);
  load.writeUInt32LE(fd, 8);
  load.writeUInt32LE(0, 12);
  const len = 16 + 16 + v.length + c.length;
  return Buffer.concat([header(7, CACHEFILES_OP_OPEN, len, 3), load, v, c]);
}

test('cachefiles messages: OPEN keys and fd, READ range, CLOSE; lengths that do not add up are refused', () => {
  const open = openMsg('erofs,dedup', 'b-' + 'a'.repeat(64), 21);
  assert.deepEqual(parseCachefilesMsg(open, open.length), {
    msgId: 7,
    opcode: CACHEFILES_OP_OPEN,
    objectId: 3,
    open: { volumeKey: 'erofs,dedup', cookieKey: 'b-' + 'a'.repeat(64), fd: 21, flags: 0 },
  });
  const read = Buffer.concat([header(9, CACHEFILES_OP_READ, 32, 3), Buffer.alloc(16)]);
  read.writeBigUInt64LE(1n << 33n, 16);
  read.writeBigUInt64LE(65536n, 24);
  assert.deepEqual(parseCachefilesMsg(read, 32).read, { off: 2 ** 33, len: 65536 });
  const close = header(10, CACHEFILES_OP_CLOSE, 16, 3);
  assert.deepEqual(parseCachefilesMsg(close, 16), { msgId: 10, opcode: CACHEFILES_OP_CLOSE, objectId: 3 });

  assert.throws(() => parseCachefilesMsg(close, 12), /shorter than its 16-byte header/);
  assert.throws(() => parseCachefilesMsg(read, 24), /says 32 bytes, read returned 24/);
  const lying = Buffer.from(open);
  lying.writeUInt32LE(4000, 20); // cookie key size past the end
  assert.throws(() => parseCachefilesMsg(lying, lying.length), /run past the message/);
});

test('CACHEFILES_IOC_READ_COMPLETE is _IOW(0x98, 1, int)', () => {
  assert.equal(CACHEFILES_IOC_READ_COMPLETE, 0x40049801);
});

test('aligned buffers start on a page and cover whole pages', () => {
  for (const size of [1, 4095, 4096, 65536 + 17]) {
    const a = new AlignedBuffer(size);
    try {
      assert.equal(Number(koffi.address(a.buf) % BigInt(PAGE)), 0, `buffer of ${size} bytes is page-aligned`);
      assert.equal(a.buf.length % PAGE, 0);
      assert.ok(a.buf.length >= size);
      a.buf.fill(0xab);
      assert.equal(a.buf[a.buf.length - 1], 0xab);
    } finally {
      a.free();
    }
  }
});

test('backend choice: auto prefers fscache (use_fscache), then fanotify, then fetch; one named but impossible stops the start', () => {
  const ok = (detail: string): CheckResult => ({ name: 'x', status: 'ok', detail });
  const no = (detail: string): CheckResult => ({ name: 'x', status: 'warn', detail, fix: 'a better kernel' });
  const cfg = (backend: 'auto' | 'fscache' | 'fanotify' | 'fetch', useFscache = true, mount: 'auto' | 'loop' = 'auto') => ({ ...defaultConfig(), use_fscache: useFscache, mount_backend: mount, ondemand: { ...defaultConfig().ondemand, backend } });
  const probes = (fan: CheckResult, fsc: CheckResult) => ({ fanotify: () => fan, fscache: () => fsc });

  assert.equal(chooseOndemandBackend(cfg('auto'), probes(ok('fan'), ok('fsc'))).backend, 'fscache');
  assert.equal(chooseOndemandBackend(cfg('auto', false), probes(ok('fan'), ok('fsc'))).backend, 'fanotify', 'use_fscache false: not chosen automatically');
  assert.equal(chooseOndemandBackend(cfg('auto'), probes(ok('fan'), no('no device'))).backend, 'fanotify');
  const fetch = chooseOndemandBackend(cfg('auto'), probes(no('old kernel'), no('no device')));
  assert.equal(fetch.backend, 'fetch');
  assert.match(fetch.reason, /old kernel/);
  assert.equal(chooseOndemandBackend(cfg('auto', true, 'loop'), probes(ok('fan'), ok('fsc'))).backend, 'fscache', 'fscache mounts need no file-backed mounts');
  assert.equal(chooseOndemandBackend(cfg('fetch'), probes(ok('fan'), ok('fsc'))).backend, 'fetch');
  assert.equal(chooseOndemandBackend(cfg('fanotify'), probes(ok('fan'), ok('fsc'))).backend, 'fanotify');
  assert.throws(() => chooseOndemandBackend(cfg('fscache'), probes(ok('fan'), no('no /dev/cachefiles'))), /ondemand.backend is "fscache" but .*no \/dev\/cachefiles.*fix: a better kernel/);
  assert.throws(() => chooseOndemandBackend(cfg('fanotify'), probes(no('old kernel'), ok('fsc'))), /ondemand.backend is "fanotify" but .*old kernel/);
});
