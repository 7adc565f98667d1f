/**
 * The segmented chunk store (integrity.store_layout "segments", what "auto"
 * picks where ROOT's filesystem has fs-verity): each import's new chunks in
 * a segment file of its own, layer images naming every segment they read as
 * an extra device, the per-layer device limit, whole-segment reclaim, and
 * start-up checks of segment files. Real mkfs.erofs, real mounts (file-backed
 * and loop), this machine's kernel; sealing itself is tested in the
 * ondemand VM (verity.test.ts), whose kernel has fs-verity.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { readImageDeviceTags } from '../src/convert/erofs-format';
import { NEW_SEGMENT, type StoredChunk, placeChunks } from '../src/convert/placement';
import { SnapshotterError } from '../src/errdefs/errors';
import { ChunkStore } from '../src/store/chunkstore';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { mountAll } from '../src/mount/mount';
import { tempDir } from './helpers/daemon';
import { pseudoRandom } from './helpers/images';
import { unmountUnder } from './helpers/mounts';

const dir = tempDir('segments');
const KiB = 1024;

after(async () => {
  await unmountUnder(dir);
  fs.rmSync(dir, { recursive: true, force: true });
});

function open(root: string, extra: { segmentsPerLayer?: number; mountMode?: 'loop' } = {}): Snapshotter {
  return new Snapshotter({
    root,
    erofs: { chunkSize: 65536, mkfs: 'mkfs.erofs', convertMode: 'sync', storeLayout: 'segments', storeMaxDevices: extra.segmentsPerLayer, mountMode: extra.mountMode },
  });
}

/** Commits a layer on `parent` holding `files`; returns its snapshot id. */
async function layer(sn: Snapshotter, name: string, parent: string, files: Record<string, Buffer>): Promise<string> {
  const mounts = await sn.prepare(`active-${name}`, parent);
  const upper = mounts[0].type === 'bind' ? mounts[0].source : (mounts[0].options.find((o) => o.startsWith('upperdir=')) as string).slice(9);
  for (const [f, data] of Object.entries(files)) fs.writeFileSync(path.join(upper, f), data);
  await sn.commit(name, `active-${name}`);
  return sn.ms.getInfo(name).id;
}

async function view(sn: Snapshotter, key: string, parent: string): Promise<string> {
  const target = path.join(dir, `view-${key}-${process.hrtime.bigint()}`);
  fs.mkdirSync(target, { recursive: true });
  await mountAll(await sn.view(key, parent), target);
  return target;
}

const segFiles = (root: string) => fs.readdirSync(path.join(root, 'store', 'segments')).filter((f) => f.endsWith('.blob')).sort();
const tagsOf = (root: string, id: string) => readImageDeviceTags(path.join(root, 'images', `${id}.erofs`));

describe('segmented chunk store', () => {
  test('each import adds one segment; images name the segments they read; data reads back; the last reference deletes a segment', async () => {
    const root = path.join(dir, 'basic');
    const sn = open(root);
    const shared = pseudoRandom(640 * KiB, 'seg-shared');
    const own = pseudoRandom(200 * KiB + 5, 'seg-own');
    try {
      await sn.recover();
      assert.equal(sn.store?.layout, 'segments');
      const a = await layer(sn, 'a', '', { 'shared.bin': shared, 'a.txt': Buffer.from('a') });
      assert.equal(segFiles(root).length, 1, 'the first import wrote one segment');
      assert.deepEqual(tagsOf(root, a), [`dedup:seg:${segFiles(root)[0].replace('.blob', '')}`]);
      // A second layer sharing the big file: reads it from a's segment, its own bytes from a new one.
      const b = await layer(sn, 'b', 'a', { 'copy.bin': shared, 'own.bin': own });
      assert.equal(segFiles(root).length, 2);
      const tags = tagsOf(root, b);
      assert.equal(tags.length, 2, `layer b reads two segments: ${tags}`);
      assert.ok(tags.includes(tagsOf(root, a)[0]));
      const st = sn.store?.stats();
      assert.ok(st && st.storedBytes < shared.length + own.length + 3 * 65536, `stored once: ${JSON.stringify(st)}`);
      assert.equal(sn.ms.layers().find((l) => String(l.snapshot_id) === b)?.new_chunks, 4, 'only own.bin was new (4 chunks)');

      const v = await view(sn, 'v', 'b');
      assert.ok(fs.readFileSync(path.join(v, 'shared.bin')).equals(shared));
      assert.ok(fs.readFileSync(path.join(v, 'copy.bin')).equals(shared));
      assert.ok(fs.readFileSync(path.join(v, 'own.bin')).equals(own));
      assert.equal(fs.readFileSync(path.join(v, 'a.txt'), 'utf8'), 'a');
      await unmountUnder(v);
      await sn.remove('v');

      // a goes: its segment stays (b still reads shared.bin from it), then b goes: nothing is left.
      // Its name goes at once (no reader can open it again); its blocks are freed on the remover thread (settled() waits).
      await sn.remove('b');
      assert.equal(segFiles(root).length, 1, "b's own segment is deleted with b");
      await sn.remove('a');
      assert.deepEqual(segFiles(root), []);
      await sn.store?.settled();
      const segDir = path.join(root, 'store', 'segments');
      assert.deepEqual(fs.readdirSync(segDir).filter((f) => f.startsWith('.gone-')), [], 'freed');
      // One a stop left on its way out is deleted at the next start.
      fs.writeFileSync(path.join(segDir, '.gone-99'), 'x');
      sn.store?.segments.checkAtStart();
      assert.deepEqual(fs.readdirSync(segDir), []);
      assert.equal(sn.store?.stats().chunks, 0);
    } finally {
      sn.close();
    }
  });

  test('a layer reads at most segments_per_layer segments: chunks found only in others are stored again in its own', async () => {
    const root = path.join(dir, 'fanout');
    const sn = open(root, { segmentsPerLayer: 2 });
    const parts = [0, 1, 2].map((i) => pseudoRandom(128 * KiB, `fan-${i}`));
    try {
      await sn.recover();
      for (let i = 0; i < 3; i++) await layer(sn, `p${i}`, '', { [`p${i}.bin`]: parts[i] });
      assert.equal(segFiles(root).length, 3);
      const all = await layer(sn, 'all', '', { 'p0.bin': parts[0], 'p1.bin': parts[1], 'p2.bin': parts[2], 'new.bin': Buffer.from('new') });
      const tags = tagsOf(root, all);
      assert.equal(tags.length, 2, `two devices at most: ${tags}`);
      const row = sn.ms.layers().find((l) => String(l.snapshot_id) === all);
      // One earlier segment is read (2 chunks of 64 KiB); the other two parts (4 chunks) and new.bin are stored again.
      assert.equal(row?.new_chunks, 5, JSON.stringify(row));
      const v = await view(sn, 'v', 'all');
      for (let i = 0; i < 3; i++) assert.ok(fs.readFileSync(path.join(v, `p${i}.bin`)).equals(parts[i]), `p${i}.bin`);
      assert.equal(fs.readFileSync(path.join(v, 'new.bin'), 'utf8'), 'new');
      await unmountUnder(v);
      await sn.remove('v');
      // Copies of one digest in two segments: removing the earlier layers keeps the later one whole.
      for (let i = 0; i < 3; i++) await sn.remove(`p${i}`);
      const v2 = await view(sn, 'v2', 'all');
      for (let i = 0; i < 3; i++) assert.ok(fs.readFileSync(path.join(v2, `p${i}.bin`)).equals(parts[i]), `p${i}.bin after the others went`);
      await unmountUnder(v2);
      await sn.remove('v2');
      await sn.remove('all');
      await sn.store?.settled();
      assert.deepEqual(segFiles(root), []);
    } finally {
      sn.close();
    }
  });

  test('loop backend: an image over several segments mounts with a loop device per segment', async () => {
    const root = path.join(dir, 'loop');
    const sn = open(root, { mountMode: 'loop' });
    const x = pseudoRandom(300 * KiB, 'loop-x');
    try {
      await sn.recover();
      await layer(sn, 'l1', '', { 'x.bin': x });
      const l2 = await layer(sn, 'l2', 'l1', { 'y.bin': pseudoRandom(100 * KiB, 'loop-y'), 'x-copy.bin': x });
      assert.equal(tagsOf(root, l2).length, 2);
      const v = await view(sn, 'v', 'l2');
      assert.ok(fs.readFileSync(path.join(v, 'x-copy.bin')).equals(x));
      assert.ok(fs.readFileSync(path.join(v, 'y.bin')).equals(pseudoRandom(100 * KiB, 'loop-y')));
      await unmountUnder(v);
      await sn.remove('v');
    } finally {
      sn.close();
    }
  });

  test('start-up: a changed segment is verified and its damaged chunk quarantines its layers; a missing one loses its chunks; an uncommitted one is deleted', async () => {
    const root = path.join(dir, 'restart');
    let sn = open(root);
    const data = pseudoRandom(256 * KiB, 'restart-a');
    const other = pseudoRandom(128 * KiB, 'restart-b');
    let a: string;
    let b: string;
    try {
      await sn.recover();
      a = await layer(sn, 'a', '', { 'a.bin': data });
      b = await layer(sn, 'b', '', { 'b.bin': other });
    } finally {
      sn.close();
    }
    await unmountUnder(root);
    const db = new Database(path.join(root, 'metadata.db'), { readonly: true });
    const segOf = (id: string) => (db.prepare('SELECT DISTINCT c.segment AS s FROM chunks c JOIN layer_chunks lc ON lc.chunk_id = c.id WHERE lc.snapshot_id = ?').get(Number(id)) as { s: number }).s;
    const segA = segOf(a);
    const segB = segOf(b);
    db.close();
    // Bytes of a's segment flipped while no daemon ran; an import killed before its commit left a file.
    const fd = fs.openSync(path.join(root, 'store', 'segments', `${segA}.blob`), 'r+');
    fs.writeSync(fd, Buffer.alloc(9, 0x77), 0, 9, 70_000);
    fs.closeSync(fd);
    fs.writeFileSync(path.join(root, 'store', 'segments', '999.blob'), Buffer.alloc(4096));
    sn = open(root);
    try {
      await sn.recover();
      assert.ok(!fs.existsSync(path.join(root, 'store', 'segments', '999.blob')), 'the uncommitted segment is deleted');
      assert.match(sn.integrity?.isQuarantined(a) ?? '', /lost or damaged/);
      assert.equal(sn.integrity?.isQuarantined(b), null);
      await assert.rejects(sn.view('va', 'a'), (err: unknown) => err instanceof SnapshotterError && err.kind === 'FailedPrecondition');
      const v = await view(sn, 'vb', 'b');
      assert.ok(fs.readFileSync(path.join(v, 'b.bin')).equals(other));
      await unmountUnder(v);
      await sn.remove('vb');
      // The same bytes brought again: a's segment is not sealed here, so they are written back and a is served again.
      await layer(sn, 'again', '', { 'a.bin': data });
      assert.equal(sn.integrity?.isQuarantined(a), null, 'healed by the import that brought the bytes');
      const va = await view(sn, 'va2', 'a');
      assert.ok(fs.readFileSync(path.join(va, 'a.bin')).equals(data));
      await unmountUnder(va);
      await sn.remove('va2');
    } finally {
      sn.close();
    }
    await unmountUnder(root);
    // b's segment deleted while stopped: its chunks are lost, b is quarantined, a is not.
    fs.rmSync(path.join(root, 'store', 'segments', `${segB}.blob`));
    sn = open(root);
    try {
      await sn.recover();
      assert.match(sn.store?.openProblem ?? '', new RegExp(`${segB}\\.blob is missing`));
      assert.match(sn.integrity?.isQuarantined(b) ?? '', /lost or damaged/);
      assert.equal(sn.integrity?.isQuarantined(a), null);
    } finally {
      sn.close();
    }
  });

  test('a store index from before segments (one row per digest) is migrated: rows kept in chunks.blob', () => {
    const root = path.join(dir, 'migrate');
    fs.mkdirSync(root, { recursive: true });
    const db = new Database(path.join(root, 'm.db'));
    db.pragma('foreign_keys = ON');
    db.exec(`
      CREATE TABLE chunks (id INTEGER PRIMARY KEY, digest TEXT NOT NULL UNIQUE, blkaddr INTEGER NOT NULL, nblocks INTEGER NOT NULL, refs INTEGER NOT NULL DEFAULT 0);
      CREATE INDEX chunks_blkaddr ON chunks(blkaddr);
      CREATE TABLE layer_chunks (snapshot_id INTEGER NOT NULL, chunk_id INTEGER NOT NULL REFERENCES chunks(id), PRIMARY KEY (snapshot_id, chunk_id)) WITHOUT ROWID;
      INSERT INTO chunks VALUES (1, 'aa', 0, 2, 1), (2, 'bb', 2, 1, 1);
      INSERT INTO layer_chunks VALUES (7, 1), (7, 2);
    `);
    fs.mkdirSync(path.join(root, 'store'), { recursive: true });
    fs.writeFileSync(path.join(root, 'store', 'chunks.blob'), Buffer.alloc(3 * 4096));
    const store = new ChunkStore({ root, db, layout: 'single' });
    try {
      const rows = db.prepare('SELECT id, digest, segment, blkaddr, nblocks, refs FROM chunks ORDER BY id').all();
      assert.deepEqual(rows, [
        { id: 1, digest: 'aa', segment: 0, blkaddr: 0, nblocks: 2, refs: 1 },
        { id: 2, digest: 'bb', segment: 0, blkaddr: 2, nblocks: 1, refs: 1 },
      ]);
      assert.equal(store.lookup('aa')?.id, 1);
      assert.equal((db.prepare('SELECT count(*) AS n FROM layer_chunks').get() as { n: number }).n, 2);
      assert.equal(db.pragma('foreign_keys', { simple: true }), 1);
    } finally {
      store.close();
      db.close();
    }
  });
});

describe('segment files', () => {
  test('an fd in use is never closed under its reader, however many segments are opened meanwhile', async () => {
    const root = path.join(dir, 'fds');
    fs.mkdirSync(root, { recursive: true });
    const db = new Database(path.join(root, 'm.db'));
    const store = new ChunkStore({ root, db, layout: 'segments' });
    try {
      const segs = store.segments;
      const ids: number[] = [];
      for (let i = 0; i < 140; i++) {
        const w = segs.create();
        fs.writeSync(w.fd, Buffer.alloc(4096, i));
        w.blocks = 1;
        segs.finish(w);
        ids.push(w.id);
      }
      const first = await segs.withFd(ids[0], async (fd) => {
        // 139 other segments opened (past the cache's limit) while this read waits.
        for (const id of ids.slice(1)) await segs.withFd(id, async () => undefined);
        const buf = Buffer.alloc(4096);
        fs.readSync(fd, buf, 0, 4096, 0);
        return buf;
      });
      assert.ok(first.equals(Buffer.alloc(4096, 0)), 'the first segment read through its own fd');
      for (const id of ids) segs.abandon({ id, blocks: 1, fd: -1 });
    } finally {
      store.close();
      db.close();
    }
  });
});

describe('chunk placement', () => {
  const row = (id: number, digest: string, segment: number, o: Partial<StoredChunk> = {}): StoredChunk => ({ id, digest, segment, blkaddr: id, nblocks: 1, refs: 1, bad: false, ...o });
  test('the segments holding most of the layer are chosen; the rest is stored anew in its own', () => {
    const rows: Record<string, StoredChunk[]> = { a: [row(1, 'a', 5)], b: [row(2, 'b', 5)], c: [row(3, 'c', 6)], d: [row(4, 'd', 7)] };
    const chunks = ['a', 'b', 'c', 'd', 'e'].map((digest) => ({ digest, nblocks: 1 }));
    const p = placeChunks(chunks, (d) => rows[d] ?? [], { freshSegment: NEW_SEGMENT, maxDevices: 3 });
    assert.deepEqual(p.devices, [5, 6, NEW_SEGMENT]);
    assert.deepEqual(p.fresh, ['d', 'e']);
    assert.deepEqual([...p.use.keys()].sort(), ['a', 'b', 'c']);
  });
  test('chunks.blob comes first when new chunks go there; a damaged chunk is healed and used', () => {
    const rows: Record<string, StoredChunk[]> = {
      a: [row(1, 'a', 9), row(5, 'a', 0)],
      b: [row(2, 'b', 9, { bad: true })],
      c: [row(3, 'c', 8, { bad: true })],
    };
    const chunks = ['a', 'b', 'c'].map((digest) => ({ digest, nblocks: 1 }));
    const single = placeChunks(chunks, (d) => rows[d] ?? [], { freshSegment: 0, maxDevices: 1 });
    assert.deepEqual(single.devices, [0]);
    assert.equal(single.use.get('a')?.id, 5);
    assert.deepEqual(single.fresh, ['b', 'c']);
    const seg = placeChunks(chunks, (d) => rows[d] ?? [], { freshSegment: NEW_SEGMENT, maxDevices: 4 });
    assert.deepEqual(seg.heal.map((r) => r.id), [2, 3]);
    assert.equal(seg.use.get('b')?.id, 2, 'the healed copy is used');
    assert.deepEqual(seg.fresh, []);
  });
});
