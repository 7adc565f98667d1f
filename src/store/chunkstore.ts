import fs from 'node:fs';
import path from 'node:path';
import type Database from 'better-sqlite3';
import { punchHole } from '../../native/fallocate';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';

/**
 * The node-wide content-addressed chunk store: one sparse file
 * (`cache/chunks.blob`) addressed in 4 KiB blocks, and an index in the
 * metadata database (digest → block address, length, reference count).
 * Every EROFS layer image names this file as its one extra device, so a chunk
 * stored once serves every layer of every image that contains it.
 *
 * Order of durability, for kill -9 at any point: chunk data is written and
 * fdatasync'ed before any row names it, and rows are written in the same
 * transaction as the commit of the layer that references them. Whatever a
 * crash leaves in the file that no row names is found by `reclaimGaps` and
 * punched out; nothing a row names is ever moved or punched.
 */

export const STORE_BLOCK = 4096;

export interface Extent {
  blkaddr: number;
  nblocks: number;
}

export interface ChunkRow extends Extent {
  id: number;
  digest: string;
  refs: number;
}

export interface StoreStats {
  chunks: number;
  /** Bytes of chunk data stored (live chunks, block-rounded). */
  storedBytes: number;
  /** Sum over layers of the chunk bytes they reference (what they would take undeduplicated). */
  referencedBytes: number;
  /** Allocated bytes of the blob file on disk. */
  diskBytes: number;
}

export class ChunkStore {
  readonly dir: string;
  readonly blobPath: string;
  private fd: number;
  private readonly db: Database.Database;
  private readonly log: Logger;
  /** Free extents below the high-water mark, sorted by address. */
  private free: Extent[] = [];
  private highWater = 0;
  /** Chunks an in-flight import will reference: never freed meanwhile. */
  private readonly pins = new Map<number, number>();
  private lockTail: Promise<void> = Promise.resolve();

  constructor(opts: { root: string; db: Database.Database; logger?: Logger }) {
    this.dir = path.join(opts.root, 'cache');
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    this.blobPath = path.join(this.dir, 'chunks.blob');
    this.fd = fs.openSync(this.blobPath, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    this.db = opts.db;
    this.log = opts.logger ?? silentLogger();
    this.migrate();
    this.rebuildFreeList();
  }

  private migrate(): void {
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS chunks (
        id       INTEGER PRIMARY KEY,
        digest   TEXT    NOT NULL UNIQUE,
        blkaddr  INTEGER NOT NULL,
        nblocks  INTEGER NOT NULL,
        refs     INTEGER NOT NULL DEFAULT 0
      );
      CREATE INDEX IF NOT EXISTS chunks_blkaddr ON chunks(blkaddr);
      CREATE TABLE IF NOT EXISTS layer_chunks (
        snapshot_id INTEGER NOT NULL,
        chunk_id    INTEGER NOT NULL REFERENCES chunks(id),
        PRIMARY KEY (snapshot_id, chunk_id)
      ) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS layer_chunks_chunk ON layer_chunks(chunk_id);
    `);
  }

  /** Free list = the gaps between live chunks; high water = end of the last one. */
  private rebuildFreeList(): void {
    const rows = this.db.prepare('SELECT blkaddr, nblocks FROM chunks ORDER BY blkaddr').all() as Extent[];
    this.free = [];
    let cursor = 0;
    for (const r of rows) {
      if (r.blkaddr > cursor) this.free.push({ blkaddr: cursor, nblocks: r.blkaddr - cursor });
      cursor = Math.max(cursor, r.blkaddr + r.nblocks);
    }
    this.highWater = cursor;
  }

  /** Runs fn with the import lock held: one import's lookup-to-commit at a time. */
  async withLock<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.lockTail;
    let release!: () => void;
    this.lockTail = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }

  lookup(digest: string): ChunkRow | undefined {
    return this.db.prepare('SELECT * FROM chunks WHERE digest = ?').get(digest) as ChunkRow | undefined;
  }

  pin(id: number): void {
    this.pins.set(id, (this.pins.get(id) ?? 0) + 1);
  }

  unpin(id: number): void {
    const n = (this.pins.get(id) ?? 0) - 1;
    if (n <= 0) this.pins.delete(id);
    else this.pins.set(id, n);
  }

  /** First fit from the free list, else past the high-water mark. */
  allocate(nblocks: number): Extent {
    for (let i = 0; i < this.free.length; i++) {
      const f = this.free[i];
      if (f.nblocks >= nblocks) {
        const got = { blkaddr: f.blkaddr, nblocks };
        if (f.nblocks === nblocks) this.free.splice(i, 1);
        else this.free[i] = { blkaddr: f.blkaddr + nblocks, nblocks: f.nblocks - nblocks };
        return got;
      }
    }
    const got = { blkaddr: this.highWater, nblocks };
    this.highWater += nblocks;
    if (this.highWater > 0xfffffffe) throw new Error('chunk store address space (16 TiB) exhausted');
    return got;
  }

  /** Returns an extent that holds no live chunk: punch it and make it reusable. */
  releaseExtent(e: Extent): void {
    try {
      punchHole(this.fd, e.blkaddr * STORE_BLOCK, e.nblocks * STORE_BLOCK);
    } catch (err) {
      this.log.warn({ op: 'reclaim', err: (err as Error).message }, 'cannot punch hole; space stays allocated until fsck');
    }
    if (e.blkaddr + e.nblocks === this.highWater) {
      this.highWater = e.blkaddr;
    } else {
      const i = this.free.findIndex((f) => f.blkaddr > e.blkaddr);
      this.free.splice(i < 0 ? this.free.length : i, 0, { ...e });
    }
  }

  async write(e: Extent, data: Buffer): Promise<void> {
    const len = e.nblocks * STORE_BLOCK;
    const padded = data.length === len ? data : Buffer.concat([data, Buffer.alloc(len - data.length)]);
    await writeAllAt(this.fd, padded, e.blkaddr * STORE_BLOCK);
  }

  async read(e: Extent): Promise<Buffer> {
    const buf = Buffer.alloc(e.nblocks * STORE_BLOCK);
    await readAt(this.fd, buf, e.blkaddr * STORE_BLOCK);
    return buf;
  }

  async sync(): Promise<void> {
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  /** In a transaction: records a new chunk whose data is already durable. */
  insertChunk(digest: string, e: Extent): number {
    const res = this.db
      .prepare('INSERT INTO chunks (digest, blkaddr, nblocks, refs) VALUES (?, ?, ?, 0)')
      .run(digest, e.blkaddr, e.nblocks);
    return Number(res.lastInsertRowid);
  }

  /** In a transaction: layer `snapshotId` references each chunk once. */
  addLayerRefs(snapshotId: number, chunkIds: Iterable<number>): void {
    const ins = this.db.prepare('INSERT OR IGNORE INTO layer_chunks (snapshot_id, chunk_id) VALUES (?, ?)');
    const inc = this.db.prepare('UPDATE chunks SET refs = refs + 1 WHERE id = ?');
    for (const id of chunkIds) if (ins.run(snapshotId, id).changes > 0) inc.run(id);
  }

  /**
   * In a transaction: drops a layer's references and deletes chunks nobody
   * references any more (unless pinned by an import). Returns their extents,
   * to be punched by `releaseExtents` once the transaction has committed.
   */
  dropLayerRefs(snapshotId: number): Extent[] {
    const ids = (this.db.prepare('SELECT chunk_id FROM layer_chunks WHERE snapshot_id = ?').all(snapshotId) as {
      chunk_id: number;
    }[]).map((r) => r.chunk_id);
    this.db.prepare('DELETE FROM layer_chunks WHERE snapshot_id = ?').run(snapshotId);
    const dec = this.db.prepare('UPDATE chunks SET refs = refs - 1 WHERE id = ?');
    for (const id of ids) dec.run(id);
    return this.collectUnreferenced();
  }

  /** In a transaction: deletes unreferenced, unpinned chunk rows; returns their extents. */
  collectUnreferenced(): Extent[] {
    const dead = this.db.prepare('SELECT id, blkaddr, nblocks FROM chunks WHERE refs <= 0').all() as ChunkRow[];
    const del = this.db.prepare('DELETE FROM chunks WHERE id = ?');
    const out: Extent[] = [];
    for (const c of dead) {
      if (this.pins.has(c.id)) continue;
      del.run(c.id);
      out.push({ blkaddr: c.blkaddr, nblocks: c.nblocks });
    }
    return out;
  }

  releaseExtents(extents: Extent[]): void {
    for (const e of extents) this.releaseExtent(e);
  }

  /**
   * Consistency check: reference counts recomputed from layer_chunks, rows of
   * layers that no longer exist dropped, and every byte of the blob that no
   * live chunk covers punched out (what a crash between writing data and
   * recording it leaves). Never touches a live chunk's blocks. Run it only
   * while no import is under way (the daemon does, at start, before serving):
   * an import's freshly written chunks have no row yet.
   */
  fsck(liveLayerIds: Set<number>): { fixedRefs: number; droppedLayerRefs: number; punchedBytes: number } {
    let droppedLayerRefs = 0;
    let fixedRefs = 0;
    this.db.transaction(() => {
      const layers = this.db.prepare('SELECT DISTINCT snapshot_id FROM layer_chunks').all() as { snapshot_id: number }[];
      for (const l of layers) {
        if (!liveLayerIds.has(l.snapshot_id)) {
          droppedLayerRefs += this.db.prepare('DELETE FROM layer_chunks WHERE snapshot_id = ?').run(l.snapshot_id).changes;
        }
      }
      fixedRefs = this.db
        .prepare(
          `UPDATE chunks SET refs = (SELECT count(*) FROM layer_chunks WHERE chunk_id = chunks.id)
           WHERE refs != (SELECT count(*) FROM layer_chunks WHERE chunk_id = chunks.id)`,
        )
        .run().changes;
      // Rows of dead chunks go; their blocks become gaps, punched below.
      this.collectUnreferenced();
    }).immediate();
    this.rebuildFreeList();
    const size = fs.fstatSync(this.fd).size;
    let punched = 0;
    const end = Math.ceil(size / STORE_BLOCK);
    const gaps = [...this.free];
    if (end > this.highWater) gaps.push({ blkaddr: this.highWater, nblocks: end - this.highWater });
    for (const g of gaps) {
      punchHole(this.fd, g.blkaddr * STORE_BLOCK, g.nblocks * STORE_BLOCK);
      punched += g.nblocks * STORE_BLOCK;
    }
    return { fixedRefs, droppedLayerRefs, punchedBytes: punched };
  }

  stats(): StoreStats {
    const r = this.db
      .prepare('SELECT count(*) AS n, coalesce(sum(nblocks), 0) AS blocks FROM chunks WHERE refs > 0')
      .get() as { n: number; blocks: number };
    const ref = this.db
      .prepare('SELECT coalesce(sum(c.nblocks), 0) AS blocks FROM layer_chunks lc JOIN chunks c ON c.id = lc.chunk_id')
      .get() as { blocks: number };
    const st = fs.fstatSync(this.fd);
    return {
      chunks: r.n,
      storedBytes: r.blocks * STORE_BLOCK,
      referencedBytes: ref.blocks * STORE_BLOCK,
      diskBytes: st.blocks * 512,
    };
  }

  close(): void {
    if (this.fd >= 0) {
      fs.closeSync(this.fd);
      this.fd = -1;
    }
  }
}

function writeAt(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<{ bytesWritten: number }> {
  return new Promise((resolve, reject) =>
    fs.write(fd, buf, off, len, pos, (err, bytesWritten) => (err ? reject(err) : resolve({ bytesWritten }))),
  );
}

/** Writes all of `buf` at `pos` of `fd` (short writes continued). */
export async function writeAllAt(fd: number, buf: Buffer, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) off += (await writeAt(fd, buf, off, buf.length - off, pos + off)).bytesWritten;
}

export function readAt(fd: number, buf: Buffer, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = () =>
      fs.read(fd, buf, done, buf.length - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) {
          buf.fill(0, done);
          return resolve();
        }
        done += n;
        if (done >= buf.length) resolve();
        else step();
      });
    step();
  });
}
