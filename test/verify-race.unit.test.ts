import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import Database from 'better-sqlite3';
import { ChunkStore, type Extent, STORE_BLOCK } from '../src/store/chunkstore';
import { verifyChunks } from '../src/store/verify';

/**
 * Readers of stored chunks (the scrub and fsck, readChecked's callers)
 * while a layer removal deletes the rows they read and frees their blocks:
 * what they find wrong must be the chunk they read, never a freed extent
 * (zeros after the punch) nor a row that is gone (its id may be handed to
 * a new chunk). Found by a crash soak: fsck failed with "FOREIGN KEY
 * constraint failed" while containerd's GC removed an image.
 */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'verify-race-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const LAYER = 1;

/** A store with two chunks of one layer; `store.read` replaced by `read`, which may call the real one. */
async function rig(name: string): Promise<{ store: ChunkStore; db: Database.Database; ids: number[]; realRead: (e: Extent) => Promise<Buffer> }> {
  const root = path.join(dir, name);
  fs.mkdirSync(path.join(root, 'store'), { recursive: true });
  const db = new Database(path.join(root, 'm.db'));
  db.pragma('journal_mode = WAL');
  db.pragma('foreign_keys = ON');
  const store = new ChunkStore({ root, db, layout: 'single' });
  const ids: number[] = [];
  for (const seed of ['a', 'b']) {
    const buf = crypto.createHash('sha512').update(seed).digest();
    const chunk = Buffer.concat([buf, Buffer.alloc(STORE_BLOCK - buf.length)]);
    const e = store.allocate(1);
    await store.write(e, chunk);
    ids.push(store.insertChunk(crypto.createHash('sha256').update(chunk).digest('hex'), e));
  }
  db.transaction(() => store.addLayerRefs(LAYER, ids))();
  return { store, db, ids, realRead: store.read.bind(store) };
}

/** The layer's removal as Remove does it: rows in a transaction, then the freed blocks punched. */
async function removeLayer(store: ChunkStore, db: Database.Database): Promise<void> {
  const dead = db.transaction(() => store.dropLayerRefs(LAYER))();
  store.releaseExtents(dead);
  await store.settled();
}

test('a layer removed while the scrub reads its chunks: the chunk being read stays whole, the others are skipped, nothing is marked bad', async () => {
  const { store, db, ids, realRead } = await rig('scrub');
  try {
    let first = true;
    store.read = async (e: Extent) => {
      if (first) {
        first = false;
        await removeLayer(store, db);
      }
      return realRead(e);
    };
    const res = await verifyChunks(store, db);
    assert.deepEqual({ checked: res.checked, total: res.total, bad: res.bad }, { checked: 1, total: 1, bad: 0 }, 'the first chunk read whole; the second, removed before its turn, not checked (nor counted)');
    assert.equal((db.prepare('SELECT count(*) AS n FROM bad_chunks').get() as { n: number }).n, 0);
    // The row read while the layer went was kept (pinned) and goes with the next collection.
    assert.deepEqual((db.prepare('SELECT id FROM chunks').all() as { id: number }[]).map((r) => r.id), [ids[0]]);
    store.releaseExtents(db.transaction(() => store.collectUnreferenced())());
    assert.equal((db.prepare('SELECT count(*) AS n FROM chunks').get() as { n: number }).n, 0);
  } finally {
    await store.settled();
    store.close();
    db.close();
  }
});

test('readChecked: a chunk removed before it is read is no copy (null, not marked bad); removed while read, it reads whole', async () => {
  const { store, db, ids, realRead } = await rig('checked');
  try {
    const rows = ids.map((id) => db.prepare('SELECT * FROM chunks WHERE id = ?').get(id)) as Parameters<ChunkStore['readChecked']>[0][];
    store.read = async (e: Extent) => {
      await removeLayer(store, db);
      return realRead(e);
    };
    const got = await store.readChecked(rows[0]);
    assert.ok(got && crypto.createHash('sha256').update(got).digest('hex') === rows[0].digest, 'the bytes of the chunk read');
    assert.equal(await store.readChecked(rows[1]), null);
    assert.equal((db.prepare('SELECT count(*) AS n FROM bad_chunks').get() as { n: number }).n, 0);
  } finally {
    await store.settled();
    store.close();
    db.close();
  }
});
