/**
 * The on-demand holder (src/ondemand/holder.ts) as its own process: a read
 * of a hole in a marked file waits while no daemon is connected, survives
 * the daemon's connection dying mid-event (a crash), and completes with the
 * right bytes once a daemon connects again and fills the range; a failed
 * fill is an EIO for the reader, never zeros.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { FrameReader, encodeFrame } from '../src/ondemand/frames';
import { tempDir, waitFor } from './helpers/daemon';

const [major, minor] = os.release().split('.').map(Number);
const skip = major > 6 || (major === 6 && minor >= 14) ? false : `fanotify pre-content events need Linux >= 6.14 (this is ${os.release()})`;
const BIN = path.join(__dirname, '..', '..', 'bin', 'dedup-snapshotter');
const procs: ChildProcess[] = [];
after(() => {
  for (const p of procs) if (p.exitCode === null) p.kill('SIGKILL');
});

/** A stand-in daemon: connects, collects frames. */
async function connect(socket: string): Promise<{ s: net.Socket; frames: { head: Record<string, unknown>; data: Buffer }[] }> {
  const s = net.connect(socket);
  await new Promise<void>((r, j) => s.once('connect', () => r()).once('error', j));
  const frames: { head: Record<string, unknown>; data: Buffer }[] = [];
  const reader = new FrameReader();
  s.on('data', (c: Buffer) => frames.push(...reader.push(c)));
  return { s, frames };
}

function reader(file: string, offset: number): { done: Promise<string>; exited: () => boolean } {
  const script = `const fs=require('fs');const fd=fs.openSync(process.argv[1],'r');const b=Buffer.alloc(4096);try{fs.readSync(fd,b,0,4096,Number(process.argv[2]));process.stdout.write(b.toString('hex'))}catch(e){process.stdout.write('ERR:'+e.code)}`;
  const p = spawn(process.execPath, ['-e', script, file, String(offset)], { stdio: ['ignore', 'pipe', 'inherit'] });
  procs.push(p);
  let out = '';
  let gone = false;
  p.stdout.on('data', (d) => (out += d));
  return { done: new Promise((r) => p.once('exit', () => ((gone = true), r(out)))), exited: () => gone };
}

test('reads wait through a daemon crash and complete once a daemon fills them; a failed fill is EIO', { skip }, async () => {
  const dir = tempDir('holder');
  const socket = path.join(dir, 'holder.sock');
  const file = path.join(dir, 'lazy.blob');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 1 << 20);
  const holder = spawn(process.execPath, [BIN, 'ondemand-holder', '--socket', socket], { stdio: ['ignore', 'ignore', 'pipe'] });
  procs.push(holder);
  try {
    await waitFor(() => fs.existsSync(socket), 10_000, 'the holder socket');
    let d = await connect(socket);
    d.s.write(encodeFrame({ op: 'mark', path: file }));
    await waitFor(() => d.frames.some((f) => f.head.op === 'marked'), 5_000, 'marked');

    const r1 = reader(file, 8192);
    await waitFor(() => d.frames.some((f) => f.head.op === 'event'), 5_000, 'an event relayed');
    const ev = d.frames.find((f) => f.head.op === 'event') as { head: Record<string, unknown> };
    assert.equal(ev.head.path, file);
    // The daemon dies before answering.
    d.s.destroy();
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(r1.exited(), false, 'the reader still waits: no zeros while no daemon answers');

    d = await connect(socket);
    await waitFor(() => d.frames.some((f) => f.head.op === 'event'), 5_000, 'the pending event, again');
    const again = d.frames.find((f) => f.head.op === 'event') as { head: Record<string, unknown> };
    assert.equal(again.head.id, ev.head.id);
    const offset = again.head.offset as number;
    const count = again.head.count as number;
    d.s.write(encodeFrame({ op: 'fill', id: again.head.id, offset }, Buffer.alloc(count, 0x5a)));
    d.s.write(encodeFrame({ op: 'done', id: again.head.id, ok: true }));
    assert.equal(await r1.done, '5a'.repeat(4096));

    const r2 = reader(file, 512 * 1024);
    await waitFor(() => d.frames.filter((f) => f.head.op === 'event').length >= 2, 5_000, 'a second event');
    const ev2 = d.frames.filter((f) => f.head.op === 'event')[1];
    d.s.write(encodeFrame({ op: 'done', id: ev2.head.id, ok: false }));
    assert.equal(await r2.done, 'ERR:EIO');
    d.s.destroy();
  } finally {
    holder.kill('SIGTERM');
    await new Promise((r) => holder.once('exit', r));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('frames: split anywhere, read back whole; an oversized header is refused', () => {
  const a = encodeFrame({ op: 'fill', id: 1, offset: 4096 }, Buffer.alloc(10_000, 1));
  const b = encodeFrame({ op: 'done', id: 1, ok: true });
  const all = Buffer.concat([a, b]);
  for (const cut of [1, 3, 7, 100, a.length - 1, a.length, a.length + 5]) {
    const r = new FrameReader();
    const got = [...r.push(all.subarray(0, cut)), ...r.push(all.subarray(cut))];
    assert.deepEqual(got.map((f) => f.head), [{ op: 'fill', id: 1, offset: 4096 }, { op: 'done', id: 1, ok: true }], `cut at ${cut}`);
    assert.equal(got[0].data.length, 10_000);
  }
  const big = Buffer.alloc(8);
  big.writeUInt32LE(2 << 20, 0);
  assert.throws(() => new FrameReader().push(big), /frame header of \d+ bytes is over/);
});
