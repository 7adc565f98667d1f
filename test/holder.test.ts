/**
 * The on-demand holder (src/ondemand/holder.ts) as its own process: a read
 * of a hole in a marked file waits while no daemon is connected, survives
 * the daemon's connection dying mid-event (a crash), and completes with the
 * right bytes once a daemon connects again and fills the range; a failed
 * fill is an EIO for the reader, never zeros. The group outlives the
 * holder (issue 12): a copy taken with pidfd_getfd keeps reads waiting after
 * kill -9 of the holder, answers a relayed event by the holder's fd number
 * (the kernel matches responses by number), and a new holder adopting the
 * copy reads the events that waited.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { FrameReader, encodeFrame } from '../src/ondemand/frames';
import { EventFile, SharedGroup } from '../src/ondemand/group';
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

/** A holder process on a socket in a new temp dir, and a 1 MiB sparse lazy file beside it. */
function startHolder(name: string) {
  const dir = tempDir(name);
  const socket = path.join(dir, 'holder.sock');
  const file = path.join(dir, 'lazy.blob');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 1 << 20);
  const holder = spawn(process.execPath, [BIN, 'ondemand-holder', '--socket', socket], { stdio: ['ignore', 'ignore', 'pipe'] });
  procs.push(holder);
  return { dir, socket, file, holder };
}

test('reads wait through a daemon crash and complete once a daemon fills them; a failed fill is EIO', { skip }, async () => {
  const { dir, socket, file, holder } = startHolder('holder');
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

test('the group outlives the holder: a copy answers a relayed event by its fd number after kill -9 (filled through a copy of the event fd); a fill the holder writes is confirmed', { skip }, async () => {
  const { dir, socket, file, holder } = startHolder('holder-group');
  const group = new SharedGroup();
  try {
    await waitFor(() => fs.existsSync(socket), 10_000, 'the holder socket');
    const d = await connect(socket);
    d.s.write(encodeFrame({ op: 'group' }));
    await waitFor(() => d.frames.some((f) => f.head.op === 'group'), 5_000, 'the group');
    const g = (d.frames.find((f) => f.head.op === 'group') as { head: Record<string, unknown> }).head;
    assert.equal(g.fresh, true);
    group.copyFrom(Number(g.pid), Number(g.fd));
    d.s.write(encodeFrame({ op: 'mark', path: file }));
    await waitFor(() => d.frames.some((f) => f.head.op === 'marked'), 5_000, 'marked');

    // A fill the holder writes is confirmed once written.
    const r0 = reader(file, 0);
    await waitFor(() => d.frames.some((f) => f.head.op === 'event'), 5_000, 'an event');
    const e0 = (d.frames.find((f) => f.head.op === 'event') as { head: Record<string, unknown> }).head;
    d.s.write(encodeFrame({ op: 'fill', id: e0.id, offset: e0.offset }, Buffer.alloc(Number(e0.count), 0x11)));
    await waitFor(() => d.frames.some((f) => f.head.op === 'filled' && f.head.id === e0.id), 5_000, 'the fill confirmed');
    d.s.write(encodeFrame({ op: 'done', id: e0.id, ok: true }));
    assert.equal(await r0.done, '11'.repeat(4096));

    // The holder dies with a relayed event pending: the copy keeps the read waiting; the daemon's side serves it.
    const r1 = reader(file, 256 * 1024);
    await waitFor(() => d.frames.filter((f) => f.head.op === 'event').length >= 2, 5_000, 'a second event');
    const e1 = d.frames.filter((f) => f.head.op === 'event')[1].head;
    assert.equal(e1.pid, g.pid);
    const ev = EventFile.copy(Number(e1.pid), Number(e1.fd));
    assert.ok(ev, 'a copy of the event fd');
    holder.kill('SIGKILL');
    await new Promise((r) => holder.once('exit', r));
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(r1.exited(), false, 'the read still waits: the group lives in this process');
    await ev.write(Number(e1.offset), Buffer.alloc(Number(e1.count), 0x22));
    ev.close();
    assert.equal(group.answer(Number(e1.fd), true), true, 'answered by the dead holder\'s fd number');
    assert.equal(await r1.done, '22'.repeat(4096));
    assert.equal(group.answer(Number(e1.fd), true), false, 'once');
    // A read nobody took from the group waits for the next reader of this copy.
    const r2 = reader(file, 512 * 1024);
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(r2.exited(), false);
    fs.rmSync(socket);
    const again = spawn(process.execPath, [BIN, 'ondemand-holder', '--socket', socket], { stdio: ['ignore', 'ignore', 'pipe'] });
    procs.push(again);
    await waitFor(() => fs.existsSync(socket), 10_000, 'the new holder socket');
    const d2 = await connect(socket);
    d2.s.write(encodeFrame({ op: 'group', adopt_pid: process.pid, adopt_fd: group.fdNumber, marked: [file] }));
    await waitFor(() => d2.frames.some((f) => f.head.op === 'event'), 5_000, 'the waiting event, read by the new holder');
    assert.equal(d2.frames.find((f) => f.head.op === 'group')?.head.adopted, true);
    const e2 = (d2.frames.find((f) => f.head.op === 'event') as { head: Record<string, unknown> }).head;
    d2.s.write(encodeFrame({ op: 'done', id: e2.id, ok: false }));
    assert.equal(await r2.done, 'ERR:EIO');
    d2.s.destroy();
    again.kill('SIGTERM');
    await new Promise((r) => again.once('exit', r));
  } finally {
    group.close();
    if (holder.exitCode === null && holder.signalCode === null) holder.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('after a clean stop (bye) the holder exits once no marked file is open anywhere else; a daemon that connects again keeps it', { skip }, async () => {
  const { dir, socket, file, holder } = startHolder('holder-bye');
  let stderr = '';
  holder.stderr?.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((r) => holder.once('exit', (code) => r(code)));
  const running = () => holder.exitCode === null && holder.signalCode === null;
  // Stands in for a lazy layer's mount (a file-backed superblock keeps its file open).
  let mountFd: number | null = null;
  try {
    await waitFor(() => fs.existsSync(socket), 10_000, 'the holder socket');
    let d = await connect(socket);
    d.s.write(encodeFrame({ op: 'mark', path: file }));
    await waitFor(() => d.frames.some((f) => f.head.op === 'marked'), 5_000, 'marked');
    mountFd = fs.openSync(file, 'r');
    d.s.write(encodeFrame({ op: 'bye' }));
    d.s.end();
    await new Promise((r) => setTimeout(r, 4500));
    assert.ok(running(), `a marked file is in use: the holder stays\n${stderr}`);

    // A daemon is back: the bye no longer counts, even once nothing uses the file.
    d = await connect(socket);
    d.s.write(encodeFrame({ op: 'hello', req: 1 }));
    await waitFor(() => d.frames.some((f) => f.head.op === 'hello'), 5_000, 'hello');
    fs.closeSync(mountFd);
    mountFd = null;
    await new Promise((r) => setTimeout(r, 4500));
    assert.ok(running(), 'a connected daemon keeps the holder');

    d.s.write(encodeFrame({ op: 'bye' }));
    d.s.end();
    const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('timeout'), 10_000))]);
    assert.equal(code, 0, stderr);
    assert.match(stderr, /no lazy layer is in use and the daemon stopped cleanly: exiting/);
  } finally {
    if (mountFd !== null) fs.closeSync(mountFd);
    if (running()) holder.kill('SIGTERM');
    await exited;
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
