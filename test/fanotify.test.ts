/**
 * fanotify pre-content events on this kernel, driven from Node through
 * native/fanotify.ts: the ground on-demand loading will stand on. A reader
 * of a hole in a marked sparse file waits until the listener fills the
 * range and allows it; a denial with EIO fails the read; and the trap the
 * design must close: when the listener's group goes away, the kernel lets
 * pending and later reads through, and the hole reads as zeros.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import {
  FAN_ALLOW,
  FAN_CLASS_PRE_CONTENT,
  FAN_CLOEXEC,
  FAN_MARK_ADD,
  FAN_NONBLOCK,
  FAN_PRE_ACCESS,
  O_LARGEFILE,
  O_RDWR,
  closeFd,
  fanDenyErrno,
  fanotifyInit,
  fanotifyMark,
  fanotifyResponse,
  parseFanotifyEvents,
} from '../native/fanotify';
import { MS_RDONLY, mount, umount2 } from '../native/mount';
import { tempDir } from './helpers/daemon';

const [major, minor] = os.release().split('.').map(Number);
const preContent = major > 6 || (major === 6 && minor >= 14);
const skip = preContent ? false : `fanotify pre-content events need Linux >= 6.14 (this is ${os.release()})`;

/** Reads 4096 bytes at `offset` of `file` in a child process; resolves with its bytes (hex) or its error code. */
function childRead(file: string, offset: number): { done: Promise<{ ok: boolean; out: string }> } {
  const script = `const fs=require('fs');const fd=fs.openSync(process.argv[1],'r');const b=Buffer.alloc(4096);try{fs.readSync(fd,b,0,4096,Number(process.argv[2]));process.stdout.write(b.toString('hex'))}catch(e){process.stdout.write('ERR:'+e.code)}`;
  const p = spawn(process.execPath, ['-e', script, file, String(offset)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  p.stdout.on('data', (d) => (out += d));
  return { done: new Promise((resolve) => p.once('exit', () => resolve({ ok: !out.startsWith('ERR:'), out }))) };
}

/**
 * The next events of a non-blocking group (FAN_NONBLOCK): polls, so no read
 * stays blocked in libuv's thread pool after the group is closed. Resolves
 * with [] once `stop()` is true.
 */
async function readEvents(group: number, stop: () => boolean = () => false): Promise<ReturnType<typeof parseFanotifyEvents>> {
  const buf = Buffer.alloc(8192);
  for (;;) {
    try {
      const n = fs.readSync(group, buf, 0, buf.length, null);
      return parseFanotifyEvents(buf, n);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
    }
    if (stop()) return [];
    await new Promise((r) => setTimeout(r, 2));
  }
}

function sparseFile(dir: string): string {
  const file = path.join(dir, 'store.blob');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 1 << 20);
  return file;
}

test('a read of a hole waits for the listener, which fills the range and allows it', { skip }, async () => {
  const dir = tempDir('fanotify-fill');
  const file = sparseFile(dir);
  const group = fanotifyInit(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE);
  try {
    fanotifyMark(group, FAN_MARK_ADD, FAN_PRE_ACCESS, file);
    const reader = childRead(file, 8192);
    const [ev] = await readEvents(group);
    assert.equal(ev.mask & BigInt(FAN_PRE_ACCESS), BigInt(FAN_PRE_ACCESS));
    assert.ok(ev.range, 'the event carries the accessed range');
    assert.ok(ev.range.offset <= 8192 && ev.range.offset + ev.range.count >= 8192 + 4096, JSON.stringify(ev.range));
    // Fill through the event's fd (writes by the listener raise no events), then allow.
    fs.writeSync(ev.fd, Buffer.alloc(4096, 0xab), 0, 4096, 8192);
    fs.writeSync(group, fanotifyResponse(ev.fd, FAN_ALLOW));
    closeFd(ev.fd);
    const r = await reader.done;
    assert.ok(r.ok, r.out);
    assert.equal(r.out, 'ab'.repeat(4096));
  } finally {
    closeFd(group);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a denial with EIO fails the reader\'s read with EIO', { skip }, async () => {
  const dir = tempDir('fanotify-deny');
  const file = sparseFile(dir);
  const group = fanotifyInit(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE);
  try {
    fanotifyMark(group, FAN_MARK_ADD, FAN_PRE_ACCESS, file);
    const reader = childRead(file, 0);
    const [ev] = await readEvents(group);
    fs.writeSync(group, fanotifyResponse(ev.fd, fanDenyErrno(os.constants.errno.EIO)));
    closeFd(ev.fd);
    assert.deepEqual(await reader.done, { ok: false, out: 'ERR:EIO' });
  } finally {
    closeFd(group);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the trap: when the group is closed, a waiting read goes through and reads the hole as zeros', { skip }, async () => {
  const dir = tempDir('fanotify-trap');
  const file = sparseFile(dir);
  const group = fanotifyInit(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE);
  try {
    fanotifyMark(group, FAN_MARK_ADD, FAN_PRE_ACCESS, file);
    const reader = childRead(file, 4096);
    const [ev] = await readEvents(group);
    closeFd(ev.fd);
    closeFd(group); // what the kernel does when the listener dies
    const r = await reader.done;
    assert.ok(r.ok, r.out);
    assert.equal(r.out, '00'.repeat(4096), 'zeros: why the group must outlive the daemon (issue 5)');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an EROFS file-backed mount reading a marked device file raises pre-content events the listener can fill (mark before mount)', { skip }, async () => {
  const dir = tempDir('fanotify-erofs');
  const src = path.join(dir, 'src');
  fs.mkdirSync(src);
  const data = Buffer.alloc(3 << 20);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(path.join(src, 'f.bin'), data);
  const img = path.join(dir, 'img.erofs');
  const blob = path.join(dir, 'full.blob');
  await new Promise<void>((resolve, reject) =>
    execFile('mkfs.erofs', ['--chunksize=65536', `--blobdev=${blob}`, img, src], (err) => (err ? reject(err) : resolve())),
  );
  const lazy = path.join(dir, 'lazy.blob');
  fs.writeFileSync(lazy, '');
  fs.truncateSync(lazy, fs.statSync(blob).size);
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const group = fanotifyInit(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE);
  const full = fs.openSync(blob, 'r');
  let mounted = false;
  try {
    // The mark must exist before EROFS opens the device: a file opened
    // earlier raises no pre-content events.
    fanotifyMark(group, FAN_MARK_ADD, FAN_PRE_ACCESS, lazy);
    mount(img, mnt, 'erofs', MS_RDONLY, `device=${lazy},directio`);
    mounted = true;
    const reader = spawn(process.execPath, ['-e', `process.stdout.write(require('crypto').createHash('sha256').update(require('fs').readFileSync(process.argv[1])).digest('hex'))`, path.join(mnt, 'f.bin')], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    reader.stdout.on('data', (d) => (out += d));
    const exited = new Promise<void>((r) => reader.once('exit', () => r()));
    let filled = 0;
    let ended = false;
    void exited.then(() => (ended = true));
    while (!ended) {
      const evs = await readEvents(group, () => ended);
      for (const ev of evs) {
        assert.ok(ev.range, 'each event names its range');
        const buf = Buffer.alloc(ev.range.count);
        const n = fs.readSync(full, buf, 0, buf.length, ev.range.offset);
        fs.writeSync(ev.fd, buf, 0, n, ev.range.offset);
        filled += n;
        fs.writeSync(group, fanotifyResponse(ev.fd, FAN_ALLOW));
        closeFd(ev.fd);
      }
    }
    assert.equal(out, crypto.createHash('sha256').update(data).digest('hex'), 'the reader got the real bytes');
    assert.ok(filled >= data.length, `the listener filled what was read (${filled} bytes)`);
  } finally {
    if (mounted) umount2(mnt);
    fs.closeSync(full);
    closeFd(group);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
