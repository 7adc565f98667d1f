import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import Database from 'better-sqlite3';
import { type Adoption, StoreChunkSink } from '../src/convert/chunk-sink';
import { type ChunkSink, type TreeNode, treeFromDirectory } from '../src/convert/layer-tree';
import { ChunkStore, STORE_BLOCK } from '../src/store/chunkstore';

/**
 * A large file of a layer directory is taken into the chunk store where it
 * lies (a hard link as a segment of its own) instead of being copied: its
 * new chunks are named in place, nothing of it is written, and whatever
 * happens the directory's file keeps its bytes.
 */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'adopt-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const CHUNK = 64 * 1024;
/** Files from this size on are adopted in these tests. */
const ADOPT_MIN = 256 * 1024;

interface Fixture {
  root: string;
  layer: string;
  store: ChunkStore;
  db: Database.Database;
}

async function withStore(name: string, fn: (f: Fixture) => Promise<void>): Promise<void> {
  const root = path.join(dir, name, 'root');
  const layer = path.join(dir, name, 'layer');
  fs.mkdirSync(path.join(root, 'store'), { recursive: true });
  fs.mkdirSync(layer, { recursive: true });
  const db = new Database(path.join(root, 'm.db'));
  db.pragma('journal_mode = WAL');
  const store = new ChunkStore({ root, db, layout: 'single' });
  try {
    await fn({ root, layer, store, db });
  } finally {
    await store.settled();
    store.close();
    db.close();
  }
}

/** Writes `data` to `file` with the times an unpacked tar leaves (the image's, in the past: see the racy rule in Segments.adopt). */
function writeUnpacked(file: string, data: Buffer): void {
  fs.writeFileSync(file, data);
  fs.utimesSync(file, TAR_TIME, TAR_TIME);
}
const TAR_TIME = new Date('2024-01-01T00:00:00Z');

/** Walks `layer` into a new sink over `store` (files from ADOPT_MIN on offered for adoption) and waits for its writes. */
async function convertLayer(layer: string, store: ChunkStore): Promise<{ sink: StoreChunkSink; tree: TreeNode }> {
  const sink = new StoreChunkSink(store, CHUNK);
  const tree = await treeFromDirectory(layer, sink, undefined, ADOPT_MIN);
  await sink.flush();
  return { sink, tree };
}

const segmentFiles = (root: string) => fs.readdirSync(path.join(root, 'store', 'segments')).filter((n) => n.endsWith('.blob'));
const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

test('a large new file is named in place in a segment linked to it: nothing of it written, the last short chunk written as any other', async () => {
  await withStore('in-place', async ({ root, layer, store }) => {
    const data = crypto.randomBytes(20 * CHUNK + 1234);
    const file = path.join(layer, 'big');
    writeUnpacked(file, data);
    const { sink, tree } = await convertLayer(layer, store);
    assert.equal(sink.adopted.length, 1, 'adopted');
    const seg = sink.adopted[0].id;
    assert.equal(fs.statSync(store.segments.pathOf(seg)).ino, fs.statSync(file).ino, 'the segment is the file itself (a hard link)');
    const chunks = (tree.children?.get('big')?.chunks ?? []).map((n) => sink.written.get(sink.digests[n]));
    assert.equal(chunks.length, 21);
    for (let i = 0; i < 20; i++) assert.deepEqual(chunks[i], { segment: seg, blkaddr: (i * CHUNK) / STORE_BLOCK, nblocks: CHUNK / STORE_BLOCK }, `chunk ${i} in place`);
    assert.equal(chunks[20]?.segment ?? 0, 0, 'the last, short chunk is in chunks.blob');
    assert.equal(sink.writtenBytes, STORE_BLOCK, 'only the short chunk was written');
    for (let i = 0; i < 21; i++) {
      const got = await store.read(chunks[i] as NonNullable<(typeof chunks)[number]>);
      const want = data.subarray(i * CHUNK, (i + 1) * CHUNK);
      assert.ok(got.subarray(0, want.length).equals(want), `chunk ${i} reads the file's bytes`);
    }
    // A conversion that fails after this (nothing recorded) leaves the directory's file as it was, its link gone.
    await sink.discard();
    assert.deepEqual(segmentFiles(root), [], 'the link is gone');
    assert.equal(fs.statSync(file).nlink, 1);
    assert.equal(sha(fs.readFileSync(file)), sha(data), "the directory's file keeps its bytes");
  });
});

test('a file the store mostly has is not adopted: its few new chunks are written as any others and the link goes', async () => {
  await withStore('mostly-known', async ({ root, layer, store }) => {
    const data = crypto.randomBytes(16 * CHUNK);
    // The store has its first 12 chunks (rows as a recorded layer leaves them).
    for (let i = 0; i < 12; i++) {
      const c = data.subarray(i * CHUNK, (i + 1) * CHUNK);
      const e = store.allocate(CHUNK / STORE_BLOCK);
      await store.write(e, c);
      store.insertChunk(sha(c), e);
    }
    const file = path.join(layer, 'big');
    writeUnpacked(file, data);
    const { sink } = await convertLayer(layer, store);
    assert.equal(sink.adopted.length, 0, 'not kept: a quarter of it is new');
    assert.deepEqual(segmentFiles(root), [], 'the link is gone');
    assert.equal(sink.foundChunks, 12);
    assert.equal(sink.written.size, 4);
    for (const [digest, e] of sink.written) {
      assert.equal(e.segment ?? 0, 0, 'written to chunks.blob');
      assert.equal(sha(await store.read(e)), digest, 'with its bytes');
    }
    await sink.discard();
  });
});

test('a file that changes while it is read fails the conversion; its link goes and the file is left as it became', async () => {
  await withStore('changed', async ({ root, layer, store }) => {
    const file = path.join(layer, 'big');
    writeUnpacked(file, crypto.randomBytes(8 * CHUNK));
    const sink = new StoreChunkSink(store, CHUNK);
    // The third piece handed to the sink: someone writes into the file meanwhile.
    let pieces = 0;
    const meddling: ChunkSink<Adoption> = {
      chunkSize: sink.chunkSize,
      add: (piece, place) => {
        if (++pieces === 3) fs.writeFileSync(file, Buffer.alloc(100, 7), { flag: 'r+' });
        return sink.add(piece, place);
      },
      adopt: (f, fd) => sink.adopt(f, fd),
      endAdoption: (a) => sink.endAdoption(a),
      buffer: () => sink.buffer(),
    };
    await assert.rejects(treeFromDirectory(layer, meddling, undefined, ADOPT_MIN), /changed while it was read/);
    await sink.discard();
    assert.deepEqual(segmentFiles(root), [], 'the link is gone');
    assert.equal(fs.statSync(file).nlink, 1);
  });
});

test('an adopted segment is stamped again once its layer directory went (else the next start would verify it all)', async () => {
  await withStore('restamp', async ({ root, layer, store }) => {
    const file = path.join(layer, 'big');
    writeUnpacked(file, crypto.randomBytes(8 * CHUNK));
    const { sink } = await convertLayer(layer, store);
    const w = sink.adopted[0];
    const row = store.segments.finish(w);
    // Recorded as the converter's transaction does: a chunk row names the segment.
    store.insertChunk(sink.digests[0], sink.written.get(sink.digests[0]) as { segment: number; blkaddr: number; nblocks: number });
    store.segments.committed(row.id);
    await new Promise((r) => setTimeout(r, 20));
    store.segments.settleLinks();
    assert.deepEqual(store.segments.checkAtStart(), [], 'still linked from the directory: unchanged');
    fs.rmSync(layer, { recursive: true });
    assert.equal(store.segments.checkAtStart()[0]?.changed !== undefined, true, 'its ctime moved with the unlink');
    store.segments.settleLinks();
    assert.deepEqual(store.segments.checkAtStart(), [], 'stamped again: the next start trusts it');
    assert.deepEqual(segmentFiles(root), [`${row.id}.blob`]);
  });
});

test("a crash between the link and the layer's rows: the next start deletes the link, the directory's file keeps its bytes", async () => {
  const name = 'crash';
  const root = path.join(dir, name, 'root');
  const layer = path.join(dir, name, 'layer');
  fs.mkdirSync(path.join(root, 'store'), { recursive: true });
  fs.mkdirSync(layer, { recursive: true });
  const data = crypto.randomBytes(8 * CHUNK);
  const file = path.join(layer, 'big');
  writeUnpacked(file, data);
  const db = new Database(path.join(root, 'm.db'));
  try {
    const first = new ChunkStore({ root, db, layout: 'single' });
    const { sink } = await convertLayer(layer, first);
    first.segments.finish(sink.adopted[0]);
    // The process dies here: no row names the segment, nothing is discarded.
    assert.equal(segmentFiles(root).length, 1);
    assert.equal(fs.statSync(file).nlink, 2);
    const next = new ChunkStore({ root, db, layout: 'single' });
    try {
      assert.deepEqual(segmentFiles(root), [], 'the start deleted the segment no row names');
      assert.equal(fs.statSync(file).nlink, 1);
      assert.equal(sha(fs.readFileSync(file)), sha(data), "the directory's file keeps its bytes");
    } finally {
      next.close();
      first.close();
    }
  } finally {
    db.close();
  }
});

test('a file modified a moment ago is not adopted (a change in the same clock tick could leave its times unchanged): copied as before', async () => {
  await withStore('racy', async ({ root, layer, store }) => {
    fs.writeFileSync(path.join(layer, 'big'), crypto.randomBytes(8 * CHUNK));
    const { sink } = await convertLayer(layer, store);
    assert.equal(sink.adopted.length, 0);
    assert.deepEqual(segmentFiles(root), []);
    assert.equal(sink.writtenBytes, 8 * CHUNK, 'its chunks written to chunks.blob');
    await sink.discard();
  });
});

test('a file changed after its last read, before its layer is recorded, fails the layer: the link goes', async () => {
  await withStore('changed-late', async ({ root, layer, store }) => {
    const file = path.join(layer, 'big');
    writeUnpacked(file, crypto.randomBytes(8 * CHUNK));
    const { sink } = await convertLayer(layer, store);
    assert.equal(sink.adopted.length, 1);
    // Same size, same times as far as a coarse look goes: written in place through the directory's name.
    fs.writeFileSync(file, Buffer.alloc(100, 7), { flag: 'r+' });
    assert.throws(() => store.segments.finish(sink.adopted[0]), /changed after it was read/);
    await sink.discard();
    assert.deepEqual(segmentFiles(root), [], 'the link is gone');
  });
});

test('a file written through the directory once recorded is not stamped again when the directory goes: the next start verifies it', async () => {
  await withStore('restamp-refused', async ({ layer, store }) => {
    const file = path.join(layer, 'big');
    writeUnpacked(file, crypto.randomBytes(8 * CHUNK));
    const { sink } = await convertLayer(layer, store);
    const row = store.segments.finish(sink.adopted[0]);
    store.insertChunk(sink.digests[0], sink.written.get(sink.digests[0]) as { segment: number; blkaddr: number; nblocks: number });
    store.segments.committed(row.id);
    fs.writeFileSync(file, Buffer.alloc(100, 7), { flag: 'r+' });
    fs.rmSync(layer, { recursive: true });
    store.segments.settleLinks();
    assert.match(store.segments.checkAtStart()[0]?.changed ?? '', /changed since this daemon wrote it/);
  });
});

test('a removal of the layer directory that fails part way still stamps again the links it removed', async (t) => {
  await withStore('restamp-partial', async ({ root, store }) => {
    // The directory sits in one whose entries cannot change: its files go, its own rmdir fails last.
    const locked = path.join(root, '..', 'locked');
    const layer = path.join(locked, 'layer');
    fs.mkdirSync(layer, { recursive: true });
    writeUnpacked(path.join(layer, 'big'), crypto.randomBytes(8 * CHUNK));
    const { sink } = await convertLayer(layer, store);
    const row = store.segments.finish(sink.adopted[0]);
    store.insertChunk(sink.digests[0], sink.written.get(sink.digests[0]) as { segment: number; blkaddr: number; nblocks: number });
    store.segments.committed(row.id);
    // root passes permission checks: the immutable flag stops it (chattr), anyone else a read-only directory.
    const asRoot = process.getuid?.() === 0;
    const lock = (on: boolean) => (asRoot ? execFileSync('chattr', [on ? '+i' : '-i', locked]) : fs.chmodSync(locked, on ? 0o555 : 0o755));
    try {
      lock(true);
    } catch (err) {
      t.skip(`cannot make a directory unwritable here: ${(err as Error).message}`);
      return;
    }
    try {
      await assert.rejects(store.segments.removeLayerTree(layer), /EPERM|EACCES/);
    } finally {
      lock(false);
    }
    assert.equal(fs.existsSync(path.join(layer, 'big')), false, 'the file went before the rmdir failed');
    assert.deepEqual(store.segments.checkAtStart(), [], 'the segment was stamped again although the removal failed');
  });
});
