import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import Database from 'better-sqlite3';
import pino from 'pino';
import { StoreChunkSink } from '../src/convert/chunk-sink';
import { ChunkStore, STORE_BLOCK } from '../src/store/chunkstore';

/**
 * StoreChunkSink looks chunks up in the store in batches (one read
 * transaction for many): what it finds must be exactly what the store has,
 * across batch boundaries, and what it writes must be the chunk's bytes.
 * And the store under it gives freed extents back in the background: never
 * handed out again before they are punched, never punched (or written)
 * through a descriptor closed meanwhile.
 */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chunk-sink-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const CHUNK = 64 * 1024;

/** Runs fn on a fresh store in its own directory (WAL, as the daemon's database), closed after. */
async function withStore(name: string, fn: (store: ChunkStore) => Promise<void>, logger?: pino.Logger): Promise<void> {
  const root = path.join(dir, name);
  fs.mkdirSync(path.join(root, 'store'), { recursive: true });
  const db = new Database(path.join(root, 'm.db'));
  db.pragma('journal_mode = WAL');
  const store = new ChunkStore({ root, db, layout: 'single', logger });
  try {
    await fn(store);
  } finally {
    store.close();
    db.close();
  }
}

/** Piece i: 1–3 blocks of bytes derived from i (the last one short: padded with zeros in the store). */
function piece(i: number): Buffer {
  const b = Buffer.alloc(STORE_BLOCK * (1 + (i % 3)) - 100);
  b.fill(i % 251);
  b.writeUInt32LE(i, 0);
  return b;
}

const digestOf = (b: Buffer) => crypto.createHash('sha256').update(Buffer.concat([b, Buffer.alloc(Math.ceil(b.length / STORE_BLOCK) * STORE_BLOCK - b.length)])).digest('hex');

test('found and new chunks are told apart across many batches, and new ones are written with their bytes', async () => {
  await withStore('batches', async (store) => {
    // The store has every third chunk (rows as a recorded layer leaves them).
    const have = new Map<string, number>();
    for (let i = 0; i < 1000; i += 3) {
      const b = piece(i);
      const e = store.allocate(Math.ceil(b.length / STORE_BLOCK));
      await store.write(e, b);
      have.set(digestOf(b), store.insertChunk(digestOf(b), e));
    }
    const sink = new StoreChunkSink(store, CHUNK);
    const order: number[] = [];
    // 1000 distinct pieces and every tenth once more (a repeat inside the layer is one chunk).
    for (let i = 0; i < 1000; i++) {
      order.push(await sink.add(piece(i)));
      if (i % 10 === 0) assert.equal(await sink.add(piece(i)), order[i]);
    }
    await sink.flush();
    assert.deepEqual(order, [...order.keys()], 'chunk numbers in the order first met');
    assert.equal(sink.foundChunks, have.size);
    assert.equal(sink.written.size, 1000 - have.size);
    for (let i = 0; i < 1000; i++) {
      const d = digestOf(piece(i));
      assert.equal(sink.digests[i], d);
      const e = sink.written.get(d);
      if (have.has(d)) {
        assert.equal(e, undefined, `chunk ${i} is in the store: not written again`);
        continue;
      }
      assert.ok(e, `chunk ${i} written`);
      assert.equal(digestOf((await store.read(e)).subarray(0, piece(i).length)), d);
    }
    await sink.discard(new Set(sink.written.keys()));
  });
});

test('a sink discarded with chunks not yet looked up leaves the store as it was', async () => {
  await withStore('discard', async (store) => {
    const sink = new StoreChunkSink(store, CHUNK);
    for (let i = 0; i < 5; i++) await sink.add(piece(i));
    await sink.discard();
    assert.equal(sink.written.size, 0);
    // Nothing was allocated: the next extent is the first block.
    assert.deepEqual(store.allocate(1), { blkaddr: 0, nblocks: 1 });
  });
});

test('lent buffers come back and are reused, never before their chunk is written: every stored chunk has its bytes', async () => {
  await withStore('lent', async (store) => {
    // Chunks of 256 KiB: the writes and lookups in flight hold ~14 MiB of them at most (with 1 MiB chunks, ~14 buffers).
    const chunk = 256 * 1024;
    const sink = new StoreChunkSink(store, chunk);
    const memories = new Set<ArrayBufferLike>();
    const want: Buffer[] = [];
    for (let i = 0; i < 200; i++) {
      const b = sink.buffer();
      memories.add(b.buffer);
      const len = chunk - (i % 7) * 1000;
      // Every fifth piece repeats the one before (found in the layer: its buffer comes back at once).
      const src = i % 5 === 4 ? want[i - 1] : Buffer.alloc(len, i % 256);
      if (i % 5 !== 4) src.writeUInt32LE(i, 0);
      src.copy(b);
      want.push(Buffer.from(src));
      await sink.add(b.subarray(0, src.length));
    }
    await sink.flush();
    assert.ok(memories.size < 120, `${memories.size} buffers made for 200 pieces: not reused`);
    for (const w of want) {
      const e = sink.written.get(digestOf(w));
      assert.ok(e);
      assert.ok((await store.read(e)).subarray(0, w.length).equals(w), 'a stored chunk lost its bytes to a reused buffer');
    }
    await sink.discard(new Set(sink.written.keys()));
  });
});

test('a freed extent is punched in the background and handed out again only once punched: a chunk written there keeps its bytes', async () => {
  await withStore('punch', async (store) => {
    const blobFile = path.join(dir, 'punch', 'store', 'chunks.blob');
    const old = store.allocate(256);
    await store.write(old, Buffer.alloc(256 * STORE_BLOCK, 7));
    const top = store.allocate(1);
    await store.write(top, Buffer.alloc(STORE_BLOCK, 9));
    const allocatedBefore = fs.statSync(blobFile).blocks;
    store.releaseExtents([old]);
    // Not reusable while its punch may still run: the next extent comes from past the high-water mark.
    const meanwhile = store.allocate(256);
    assert.equal(meanwhile.blkaddr, 257, 'the extent under its punch was not handed out');
    await store.write(meanwhile, Buffer.alloc(256 * STORE_BLOCK, 5));
    await store.settled();
    assert.ok(fs.statSync(blobFile).blocks < allocatedBefore + 256 * 8, 'the freed extent was punched');
    const again = store.allocate(256);
    assert.deepEqual(again, { blkaddr: 0, nblocks: 256 }, 'reused once punched');
    const fresh = crypto.randomBytes(256 * STORE_BLOCK);
    await store.write(again, fresh);
    await store.settled();
    assert.ok((await store.read(again)).equals(fresh), 'the chunk written into the reused extent has its bytes');
    assert.ok((await store.read(meanwhile)).equals(Buffer.alloc(256 * STORE_BLOCK, 5)));
    assert.ok((await store.read(top)).equals(Buffer.alloc(STORE_BLOCK, 9)));
  });
});

/**
 * Starts an operation on a fresh store's file (`start`), closes the store
 * while it is in flight, and checks that chunks.blob's descriptor stays
 * open until `done` and is closed then.
 */
async function closeUnder(name: string, start: (store: ChunkStore) => Promise<void>, done: (store: ChunkStore) => Promise<void>): Promise<void> {
  const root = path.join(dir, name);
  fs.mkdirSync(path.join(root, 'store'), { recursive: true });
  const db = new Database(path.join(root, 'm.db'));
  const store = new ChunkStore({ root, db, layout: 'single' });
  const fd = (store as unknown as { fd: number }).fd;
  await start(store);
  store.close();
  // Still chunks.blob's descriptor: the operation in flight may use it (another file could get the number).
  assert.equal(fs.readlinkSync(`/proc/self/fd/${fd}`), path.join(root, 'store', 'chunks.blob'));
  await done(store);
  assert.throws(() => fs.fstatSync(fd), /EBADF/, 'closed once it ended');
  db.close();
}

test('close() with punches under way keeps the store file open until they end (its descriptor is not handed to another file meanwhile)', async () => {
  await closeUnder(
    'punch-close',
    async (store) => {
      const e = store.allocate(64);
      await store.write(e, Buffer.alloc(64 * STORE_BLOCK, 1));
      store.releaseExtents([e]);
    },
    (store) => store.settled(),
  );
});

test('close() with a write in flight keeps the store file open until it ends', async () => {
  let writing: Promise<void> = Promise.resolve();
  await closeUnder(
    'write-close',
    async (store) => {
      writing = store.write(store.allocate(256), Buffer.alloc(256 * STORE_BLOCK, 1));
    },
    () => writing,
  );
});

test('a removal that frees thousands of separate runs punches them all (one at a time), with no failed punch', async () => {
  const warnings: string[] = [];
  const logger = pino({ level: 'warn' }, { write: (line: string) => void warnings.push(line) });
  await withStore(
    'punch-many',
    async (store) => {
      // 2000 one-block chunks with a live one between each two: no two freed runs are neighbours.
      const dead = [];
      for (let i = 0; i < 2000; i++) {
        const d = store.allocate(1);
        await store.write(d, Buffer.alloc(STORE_BLOCK, 1));
        dead.push(d);
        await store.write(store.allocate(1), Buffer.alloc(STORE_BLOCK, 2));
      }
      const blobFile = path.join(dir, 'punch-many', 'store', 'chunks.blob');
      const before = fs.statSync(blobFile).blocks;
      store.releaseExtents(dead);
      await store.settled();
      assert.deepEqual(warnings, [], 'no punch failed');
      assert.equal(before - fs.statSync(blobFile).blocks, 2000 * (STORE_BLOCK / 512), 'every freed block punched');
      assert.deepEqual(store.allocate(1), { blkaddr: 0, nblocks: 1 }, 'and reusable');
    },
    logger,
  );
});

test('punches still queued at a stop are done by the next start\'s fsck; the live chunk keeps its bytes', async () => {
  const root = path.join(dir, 'punch-stop');
  fs.mkdirSync(path.join(root, 'store'), { recursive: true });
  const db = new Database(path.join(root, 'm.db'));
  const blobFile = path.join(root, 'store', 'chunks.blob');
  const first = new ChunkStore({ root, db, layout: 'single' });
  const live = first.allocate(16);
  const liveBytes = crypto.randomBytes(16 * STORE_BLOCK);
  await first.write(live, liveBytes);
  first.addLayerRefs(1, [first.insertChunk(digestOf(liveBytes), live)]);
  // Ten dead runs, none next to another (an unwritten block between each two).
  const dead = [];
  for (let i = 0; i < 10; i++) {
    const d = first.allocate(64);
    await first.write(d, Buffer.alloc(64 * STORE_BLOCK, i + 1));
    dead.push(d);
    first.allocate(1);
  }
  await first.sync();
  first.releaseExtents(dead);
  // A stop with the punches queued: at most the one under way is done.
  first.close();
  await first.settled();
  assert.ok(fs.statSync(blobFile).blocks * 512 > 16 * STORE_BLOCK + 9 * 64 * STORE_BLOCK - 1, 'punches were left queued');
  const next = new ChunkStore({ root, db, layout: 'single' });
  try {
    next.fsck(new Set([1]));
    // The live chunk's blocks, and perhaps a block of the file's extent tree: no dead run keeps any.
    const left = fs.statSync(blobFile).blocks * 512 - 16 * STORE_BLOCK;
    assert.ok(left >= 0 && left < 64 * STORE_BLOCK, `${left} bytes beyond the live chunk's`);
    assert.ok((await next.read(live)).equals(liveBytes));
  } finally {
    next.close();
    db.close();
  }
});

test("a store opened on the file while another one's punch is under way hands that range out only once it is punched", async () => {
  const root = path.join(dir, 'punch-reopen');
  fs.mkdirSync(path.join(root, 'store'), { recursive: true });
  const db = new Database(path.join(root, 'm.db'));
  const first = new ChunkStore({ root, db, layout: 'single' });
  const e = first.allocate(64);
  await first.write(e, Buffer.alloc(64 * STORE_BLOCK, 1));
  // The punch is on the thread pool from here; its end is seen no sooner than the next turn of the event loop.
  first.releaseExtents([e]);
  first.close();
  const next = new ChunkStore({ root, db, layout: 'single' });
  try {
    const got = next.allocate(64);
    assert.ok(got.blkaddr >= e.blkaddr + e.nblocks, `not the range being punched (got ${JSON.stringify(got)})`);
    await next.write(got, Buffer.alloc(64 * STORE_BLOCK, 2));
    await next.settled();
    assert.deepEqual(await next.read(got), Buffer.alloc(64 * STORE_BLOCK, 2), 'its chunk intact');
    assert.deepEqual(next.allocate(64), e, 'the punched range is reusable once punched');
  } finally {
    await first.settled();
    next.close();
    db.close();
  }
});
