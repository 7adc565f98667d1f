/**
 * The holder protocol (src/ondemand/holder-protocol.ts), no processes:
 * replies are matched to requests by id in whatever order they come; a
 * reply without an id (a holder of an earlier version, which outlived the
 * daemon that started it) answers the oldest request still waiting; a
 * malformed frame is refused with an error naming what is wrong, and fails
 * only the request it was meant for.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { silentLogger } from '../src/log/logger';
import { FrameReader, encodeFrame, readFrames } from '../src/ondemand/frames';
import { OndemandHolder } from '../src/ondemand/holder';
import { HolderClient } from '../src/ondemand/holder-client';
import {
  type HolderReply,
  MalformedFrame,
  PendingRequests,
  decodeDaemonMessage,
  decodeHolderMessage,
  encodeMessage,
} from '../src/ondemand/holder-protocol';
import { waitFor } from './helpers/daemon';

/** A message through encode, the frame reader and the holder's decoder. */
function roundTrip(m: Parameters<typeof encodeMessage>[0], data?: Buffer) {
  const [f] = new FrameReader().push(encodeMessage(m, data));
  return f;
}

test('requests carry ids; replies settle them by id, out of order', async () => {
  const p = new PendingRequests();
  const a = p.add({ op: 'mark', path: '/lazy/1.blob' });
  const b = p.add({ op: 'hello' });
  const c = p.add({ op: 'cachefiles', dir: '/c', tag: 't' });
  assert.deepEqual([a.req.req, b.req.req, c.req.req], [1, 2, 3]);
  // The holder decodes what the daemon sends, id included.
  assert.deepEqual(decodeDaemonMessage(roundTrip(a.req)), { op: 'mark', req: 1, path: '/lazy/1.blob' });

  assert.equal(p.settle({ op: 'cachefiles', req: 3, pid: 9, fd: 5, fresh: true }), true);
  assert.equal(p.settle({ op: 'hello', req: 2, pid: 9, marked: [] }), true);
  assert.equal(p.settle({ op: 'error', req: 1, path: '/lazy/1.blob', error: 'EPERM' }), true);
  assert.deepEqual(await c.reply, { op: 'cachefiles', req: 3, pid: 9, fd: 5, fresh: true });
  assert.equal((await b.reply).op, 'hello');
  assert.deepEqual(await a.reply, { op: 'error', req: 1, path: '/lazy/1.blob', error: 'EPERM' });
  assert.equal(p.size, 0);
  assert.equal(p.settle({ op: 'marked', req: 1, path: '/x' }), false, 'an id nobody waits for settles nothing');
});

test('a holder of an earlier version replies without ids, in order: each reply settles the oldest request', async () => {
  const p = new PendingRequests();
  const hello = p.add({ op: 'hello' });
  const group = p.add({ op: 'group' });
  const mark = p.add({ op: 'mark', path: '/lazy/2.blob' });
  // As an earlier holder writes them: no req field.
  const replies: HolderReply[] = [
    decodeHolderMessage(roundTrip({ op: 'hello', pid: 7, marked: ['/lazy/1.blob'] })) as HolderReply,
    decodeHolderMessage(roundTrip({ op: 'group', pid: 7, fd: 4, fresh: true })) as HolderReply,
  ];
  for (const r of replies) assert.equal(p.settle(r), true);
  assert.deepEqual(await hello.reply, { op: 'hello', pid: 7, marked: ['/lazy/1.blob'] });
  assert.deepEqual(await group.reply, { op: 'group', pid: 7, fd: 4, fresh: true });
  // An earlier holder's answer about an event (a fill) is no reply to a request.
  assert.equal(p.settle({ op: 'filled', id: 12, offset: 0 }), false);
  assert.equal(p.settle({ op: 'error', id: 12, offset: 0, error: 'EIO' }), false);
  assert.equal(p.settle({ op: 'marked', path: '/lazy/2.blob' }), true);
  assert.deepEqual(await mark.reply, { op: 'marked', path: '/lazy/2.blob' });
});

test('a reply of the wrong op rejects its request; a closed connection rejects all', async () => {
  const p = new PendingRequests();
  const a = p.add({ op: 'mark', path: '/f' });
  const b = p.add({ op: 'hello' });
  p.settle({ op: 'hello', req: 1, pid: 1 });
  await assert.rejects(a.reply, /answered request 1 \(mark\) with "hello"/);
  p.rejectAll(new Error('the on-demand holder connection closed'));
  await assert.rejects(b.reply, /connection closed/);
});

test('malformed frames are refused with an error naming what is wrong', () => {
  const bad = (head: unknown) => ({ head: head as Record<string, unknown>, data: Buffer.alloc(0) });
  assert.throws(() => decodeHolderMessage(bad([1, 2])), /header is not a JSON object/);
  assert.throws(() => decodeHolderMessage(bad({ pid: 1 })), /without an op/);
  assert.throws(() => decodeHolderMessage(bad({ op: 'hello', req: 3, pid: 'x' })), /the holder's "hello": field pid is "x", not an integer/);
  assert.throws(() => decodeHolderMessage(bad({ op: 'hello', pid: 1, marked: [1] })), /field marked is \[1\], not a list of strings/);
  assert.throws(() => decodeHolderMessage(bad({ op: 'event', id: 1, pid: 2 })), /the holder's "event": field fd is missing, not an integer/);
  assert.throws(() => decodeHolderMessage(bad({ op: 'bogus', req: 4 })), /the holder sent an unknown op "bogus"/);
  assert.throws(() => decodeDaemonMessage(bad({ op: 'mark', req: 2 })), /the daemon's "mark": field path is missing, not a string/);
  assert.throws(() => decodeDaemonMessage(bad({ op: 'done', id: 1, ok: 'yes' })), /field ok is "yes", not true or false/);
  assert.throws(() => decodeDaemonMessage(bad({ op: 'group', reserve: [3, 'x'] })), /field reserve is \[3,"x"\], not a list of integers/);
  // Fields the protocol does not know are left out; the optional ones may be absent (an earlier peer).
  assert.deepEqual(decodeDaemonMessage(bad({ op: 'hello', extra: 1 })), { op: 'hello' });
  assert.deepEqual(decodeHolderMessage(bad({ op: 'event', id: 1, pid: 2, fd: 9 })), { op: 'event', id: 1, pid: 2, fd: 9, path: '', offset: 0, count: 0 });
  // A fill keeps its payload beside the header.
  const f = roundTrip({ op: 'fill', req: 5, id: 3, offset: 4096 }, Buffer.alloc(10, 7));
  assert.deepEqual(decodeDaemonMessage(f), { op: 'fill', req: 5, id: 3, offset: 4096 });
  assert.equal(f.data.length, 10);
});

test('a malformed reply fails the request it was meant for, by id or else the oldest; a malformed event fails none', async () => {
  const p = new PendingRequests();
  const a = p.add({ op: 'hello' });
  const b = p.add({ op: 'group' });
  const c = p.add({ op: 'mark', path: '/f' });
  const malformed = (head: Record<string, unknown>): MalformedFrame => {
    try {
      decodeHolderMessage({ head, data: Buffer.alloc(0) });
    } catch (err) {
      assert.ok(err instanceof MalformedFrame);
      return err;
    }
    throw new Error('decoded');
  };
  assert.equal(p.fail(malformed({ op: 'group', req: 2, pid: 1 })), true);
  await assert.rejects(b.reply, /reply to request 2 \(group\) is malformed: the holder's "group": field fd is missing/);
  assert.equal(p.fail(malformed({ op: 'event', id: 4 })), false, 'an event answers no request');
  assert.equal(p.fail(malformed({ op: 'error', id: 4, error: 5 })), false, 'nor an answer about an event');
  assert.equal(p.fail(malformed({ op: 'hello' })), true, 'without an id: the oldest');
  await assert.rejects(a.reply, /request 1 \(hello\) is malformed/);
  assert.equal(p.settle({ op: 'marked', req: 3, path: '/f' }), true);
  assert.equal((await c.reply).op, 'marked');
});

/** A holder of an earlier version: answers hello and mark in order, without request ids. */
async function oldHolder(socket: string): Promise<net.Server> {
  const server = net.createServer((s) => {
    readFrames(
      s,
      (f) => {
        const h = f.head;
        if (h.op === 'hello') s.write(encodeFrame({ op: 'hello', pid: 4242, marked: [], group: false, reserved: [] }));
        // Slow marks: the requests pile up, the replies still come in order.
        else if (h.op === 'mark') setTimeout(() => s.write(encodeFrame({ op: 'marked', path: h.path })), 20);
      },
      () => s.destroy(),
    );
  });
  await new Promise<void>((r) => server.listen(socket, r));
  return server;
}

test('the client meets a holder of an earlier version (no ids): its replies answer the requests in order', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'holder-protocol-'));
  const socket = path.join(dir, 'holder.sock');
  const server = await oldHolder(socket);
  const client = new HolderClient({ socket, holderCommand: null, log: silentLogger() });
  const hellos: number[] = [];
  client.use({
    connected: async (hello) => {
      hellos.push(hello.pid);
      return { adopted: false, marked: 0 };
    },
    event: () => undefined,
    keepsReadsWaiting: () => false,
    lost: async () => undefined,
    reconnected: async () => undefined,
  });
  try {
    await client.ensureConnected();
    assert.deepEqual(hellos, [4242]);
    const replies = await Promise.all(['/a', '/b', '/c'].map((p) => client.request({ op: 'mark', path: p })));
    assert.deepEqual(
      replies.map((r) => (r.op === 'marked' ? r.path : r.op)),
      ['/a', '/b', '/c'],
    );
  } finally {
    client.close();
    await new Promise((r) => server.close(r));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the holder echoes each request id, and replies without one to a request without one (an earlier daemon)', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'holder-protocol-'));
  const socket = path.join(dir, 'holder.sock');
  const holder = new OndemandHolder({ socket });
  await holder.listen();
  const s = net.connect(socket);
  try {
    await new Promise<void>((r, j) => s.once('connect', () => r()).once('error', j));
    const frames: Record<string, unknown>[] = [];
    const reader = new FrameReader();
    s.on('data', (c: Buffer) => frames.push(...reader.push(c).map((f) => f.head)));
    s.write(encodeFrame({ op: 'hello', req: 41 }));
    s.write(encodeFrame({ op: 'hello' }));
    s.write(encodeFrame({ op: 'mark', req: 42 }));
    s.write(encodeFrame({ op: 'cachefiles', req: 43 }));
    await waitFor(() => frames.length >= 4, 5_000, 'four replies');
    assert.equal(frames[0].op, 'hello');
    assert.equal(frames[0].req, 41);
    assert.equal(frames[1].op, 'hello');
    assert.equal('req' in frames[1], false);
    assert.equal(frames[2].op, 'error');
    assert.equal(frames[2].req, 42);
    assert.match(String(frames[2].error), /field path is missing/);
    assert.deepEqual({ op: frames[3].op, req: frames[3].req }, { op: 'error', req: 43 });
  } finally {
    s.destroy();
    await holder.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a stopping daemon starts no holder: none when it connects, none when its holder goes; a clean stop says bye', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'holder-stop-'));
  const socket = path.join(dir, 'holder.sock');
  const marker = path.join(dir, 'started');
  // Would leave a file behind if it were ever run.
  const holderCommand = ['/bin/sh', '-c', `: > ${marker}`, 'sh'];
  const hooks = {
    connected: async () => ({ adopted: false, marked: 0 }),
    event: () => undefined,
    keepsReadsWaiting: () => false,
    lost: async () => undefined,
    reconnected: async () => undefined,
  };
  const stopping = new HolderClient({ socket, holderCommand, log: silentLogger() });
  stopping.use(hooks);
  stopping.beginStop();
  await assert.rejects(stopping.ensureConnected(), /the daemon is stopping: none is started/);
  stopping.close();

  // A holder that receives the bye, then goes away while the daemon stops.
  const got: string[] = [];
  let conn: net.Socket | null = null;
  const server = net.createServer((s) => {
    conn = s;
    readFrames(
      s,
      (f) => {
        got.push(String(f.head.op));
        if (f.head.op === 'hello') s.write(encodeFrame({ op: 'hello', req: f.head.req, pid: 4243, marked: [], group: false, reserved: [] }));
      },
      () => s.destroy(),
    );
  });
  await new Promise<void>((r) => server.listen(socket, r));
  const client = new HolderClient({ socket, holderCommand, log: silentLogger() });
  client.use(hooks);
  try {
    await client.ensureConnected();
    client.beginStop();
    await client.sayBye();
    await waitFor(() => got.includes('bye'), 5_000, 'the bye');
    // The holder dies meanwhile: no new one, no dialing again.
    (conn as net.Socket | null)?.destroy();
    await new Promise((r) => server.close(r));
    await new Promise((r) => setTimeout(r, 1500));
    assert.ok(!fs.existsSync(marker), 'no holder was started');
    assert.deepEqual(got, ['hello', 'bye']);
  } finally {
    client.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
