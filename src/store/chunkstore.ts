import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type Database from 'better-sqlite3';
import { punchHole, punchHoleAsync } from '../../native/fallocate';
import { seekDataOrHole } from '../../native/libc';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { FdUsers } from '../util/fd-users';
import { prepared } from './prepared';
import { type SegmentCheck, type SegmentWriter, Segments, fsyncDir } from './segments';

/**
 * The node-wide content-addressed chunk store: one sparse file
 * (`store/chunks.blob`) addressed in 4 KiB blocks, plus sealed segments
 * (below), and an index in the metadata database (digest → segment, block
 * address, length, reference count). EROFS layer images name the store
 * files they read as extra devices, so a chunk stored once serves every
 * layer of every image that contains it. It is the
 * only copy of converted layers' data, so it lives outside `cache/` (which
 * holds only what can be fetched again); older versions kept it at
 * `cache/chunks.blob` and it is moved at start.
 *
 * Integrity: the store is never silently re-created or trusted. A file that
 * is missing while the index names chunks, or shorter than the chunks it
 * should hold, marks those chunks bad (table bad_chunks); so does a chunk
 * whose bytes no longer match its digest (see verify.ts). A bad chunk is
 * never handed to a new layer (`lookup` skips it); an import that brings its
 * bytes again writes them, checked, at the chunk's own address, which heals
 * every layer that references it. Layers that reference bad chunks are not
 * served (the snapshotter quarantines them).
 *
 * Sealed segments (segments.ts): where ROOT's filesystem has fs-verity (or
 * `store_layout` says "segments"), each import writes the chunks it adds to
 * a new file of its own, sealed before any row names it, so the kernel
 * checks every read of them. A chunk row names its segment (0:
 * chunks.blob); a layer image lists the segments it reads as its extra
 * devices, tagged `dedup:seg:<id>` (see devicePaths). A layer references at
 * most `maxDevices` segments: chunks found only in others are stored again
 * in its own segment, so the same digest may have a row per segment.
 *
 * Order of durability, for kill -9 at any point: chunk data is written and
 * fdatasync'ed before any row names it, and rows are written in the same
 * transaction as the commit of the layer that references them. Whatever a
 * crash leaves in the file that no row names is found by `reclaimGaps` and
 * punched out; nothing a row names is ever moved or punched.
 */

export const STORE_BLOCK = 4096;

/**
 * The file under `storeDir` (ROOT/store) that a layer image's device tag
 * names: untagged or `dedup:seg:0` is chunks.blob, `dedup:seg:<id>` is
 * segments/<id>.blob. For the daemon and for mounts made beside it.
 */
export function storeDevicePath(storeDir: string, tag: string): string {
  if (tag === '') return path.join(storeDir, 'chunks.blob');
  const m = /^dedup:seg:(0|[1-9][0-9]{0,14})$/.exec(tag);
  if (!m) throw new Error(`layer image names device ${JSON.stringify(tag)}, not a segment of this store`);
  return m[1] === '0' ? path.join(storeDir, 'chunks.blob') : path.join(storeDir, 'segments', `${m[1]}.blob`);
}

export interface Extent {
  blkaddr: number;
  nblocks: number;
  /** The segment the blocks are in: 0 (or absent) for chunks.blob. */
  segment?: number;
}

/** A punch under way on a store file (see punchesUnderWay). */
interface PunchUnderWay {
  owner: ChunkStore;
  extent: Extent;
  /** Settles when the punch ended (whatever its result). */
  ended: Promise<void>;
}

/**
 * The punches under way on each store file (by `dev:ino`), whichever
 * ChunkStore of this process started them. A store opened on the file
 * meanwhile (the daemon has one; tests reopen stores) keeps their extents
 * out of its free list until they end: a chunk written there first would be
 * zeroed by the punch landing after it.
 */
const punchesUnderWay = new Map<string, Set<PunchUnderWay>>();

const noop = (): void => undefined;

/** Where new chunks go: one writable file, or a sealed segment per import (auto: segments where fs-verity works). */
export type StoreLayout = 'auto' | 'single' | 'segments';

/** Columns of the chunk index: one row per digest and segment (a digest may be stored again in another segment). */
const CHUNKS_COLUMNS = `
  id       INTEGER PRIMARY KEY,
  digest   TEXT    NOT NULL,
  segment  INTEGER NOT NULL DEFAULT 0,
  blkaddr  INTEGER NOT NULL,
  nblocks  INTEGER NOT NULL,
  refs     INTEGER NOT NULL DEFAULT 0,
  UNIQUE (digest, segment)`;

/** The tag of segment `id` in a layer image's device table. */
export function segmentTag(id: number): string {
  return `dedup:seg:${id}`;
}

export interface ChunkRow extends Extent {
  id: number;
  segment: number;
  digest: string;
  refs: number;
}

export interface StoreStats {
  chunks: number;
  /** Chunks whose bytes are missing or do not match their digest. */
  badChunks: number;
  /** Bytes of chunk data stored (live chunks, block-rounded). */
  storedBytes: number;
  /** Sum over layers of the chunk bytes they reference (what they would take undeduplicated). */
  referencedBytes: number;
  /** Allocated bytes of the blob file on disk. */
  diskBytes: number;
}

/** What the store file looked like when this daemon last knew it untouched by others (see stampMatches). */
interface Stamp {
  ino: number;
  size: number;
  ctimeNs: string;
}

export class ChunkStore {
  readonly dir: string;
  readonly blobPath: string;
  private fd: number;
  /** (dev, ino) of the file `fd` is: compared with what `blobPath` names now (see fileProblem). */
  private fileId: { dev: number; ino: number };
  /** Told when chunks turned bad or good again (the layers on them stop or start being served). */
  onChunkHealth?: () => void;
  /** Files put back by restoreFile since start (for /stats). */
  restoredFiles = 0;
  /** What start-up found wrong with the store file, for the log and /healthz (null: nothing). */
  readonly openProblem: string | null = null;
  /** Segments whose files changed since this daemon wrote them (found at start). */
  private readonly changedSegments: SegmentCheck[] = [];
  private readonly db: Database.Database;
  private readonly log: Logger;
  /** Free extents below the high-water mark, sorted by address. */
  private free: Extent[] = [];
  private highWater = 0;
  /** Freed extents waiting for their punch (releaseExtent): neither free nor reusable until punched. */
  private readonly punchQueue: Extent[] = [];
  /** The loop punching them, one at a time, while the queue is not empty. */
  private punching: Promise<void> | null = null;
  /** Waits for punches another store of this process has under way on this file (see punchesUnderWay); their extents join the free list when they end. */
  private readonly othersPunches = new Set<Promise<void>>();
  /** Operations in flight on chunks.blob's descriptors (see onBlob): one replaced or closed meanwhile is closed by the last. */
  private readonly blobFds = new FdUsers();
  /** Chunks an in-flight import will reference: never freed meanwhile. */
  private readonly pins = new Map<number, number>();
  private lockTail: Promise<void> = Promise.resolve();

  readonly segments: Segments;
  /** Where this store puts new chunks (resolved from the configured layout). */
  readonly layout: 'single' | 'segments';
  /** The most segments (devices) one layer image reads from. */
  readonly maxDevices: number;
  /** Segments written (healed) since the last sync. */
  private readonly dirtySegments = new Set<number>();
  /** Chunks to write over in sealed segments at the next sync (segment → block address → bytes). */
  private readonly sealedPatches = new Map<number, Map<number, Buffer>>();
  /** Read-write fds of unsealed segments being healed. */
  private readonly rwSegments = new Map<number, number>();
  /** When writes last found the store file in place (fileProblem is a stat: asked at most every WRITE_CHECK_MS while writes stream). */
  private fileCheckedAt = 0;

  constructor(opts: { root: string; db: Database.Database; logger?: Logger; layout?: StoreLayout; maxDevices?: number }) {
    this.dir = path.join(opts.root, 'store');
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    this.blobPath = path.join(this.dir, 'chunks.blob');
    this.db = opts.db;
    this.log = opts.logger ?? silentLogger();
    this.migrate();
    this.segments = new Segments(opts.root, this.db, this.log);
    const layout = opts.layout ?? 'auto';
    this.layout = layout === 'auto' ? (this.segments.canSeal() ? 'segments' : 'single') : layout;
    this.maxDevices = opts.maxDevices ?? 32;
    this.log.info(
      { op: 'integrity', store_layout: this.layout, sealed: this.layout === 'segments' && this.segments.canSeal() },
      this.layout === 'segments'
        ? `new chunks go to a segment file per import under ${this.segments.dir}${this.segments.canSeal() ? ', sealed with fs-verity: the kernel fails reads of damaged chunk data with EIO' : ' (not sealed: this filesystem has no fs-verity; the daemon checks them)'}`
        : `new chunks go to ${this.blobPath}, checked by the daemon${layout === 'auto' ? ' (this filesystem has no fs-verity to seal segments with)' : ''}`,
    );
    moveFromCache(opts.root, this.blobPath, this.log);
    const rows = (prepared(this.db, 'SELECT count(*) AS n FROM chunks WHERE segment = 0').get() as { n: number }).n;
    let fd: number;
    try {
      fd = fs.openSync(this.blobPath, fs.constants.O_RDWR);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      fd = fs.openSync(this.blobPath, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
      fsyncDirOf(this.blobPath);
      if (rows > 0) {
        // The index names chunks whose only copy is gone. A new, empty file
        // lets new layers be stored; the old chunks are bad, never handed
        // out, until an import brings their bytes again.
        const n = this.markBad(this.chunkIdsOf(0), 'the store file was missing');
        this.openProblem = `${this.blobPath} was missing at start although ${n} chunks were stored in it: their data is lost`;
      }
    }
    this.fd = fd;
    const st = fs.fstatSync(fd);
    this.fileId = { dev: st.dev, ino: st.ino };
    this.rebuildFreeList();
    if (!this.openProblem && st.size < this.highWater * STORE_BLOCK) {
      const cut = prepared(this.db, 'SELECT id FROM chunks WHERE segment = 0 AND (blkaddr + nblocks) * ? > ?').all(STORE_BLOCK, st.size) as { id: number }[];
      const n = this.markBad(cut.map((r) => r.id), 'beyond the end of the store file (truncated)');
      this.openProblem = `${this.blobPath} is ${st.size} bytes, shorter than the ${this.highWater * STORE_BLOCK} its chunks need: ${n} chunks are lost`;
    }
    const problems: string[] = this.openProblem ? [this.openProblem] : [];
    for (const c of this.segments.checkAtStart()) {
      if (c.lost) {
        const n = this.markBad(this.chunkIdsOf(c.id), c.lost);
        problems.push(`${c.lost}: ${n} chunks are lost`);
      } else if (c.changed) {
        this.changedSegments.push(c);
      }
    }
    this.openProblem = problems.length > 0 ? problems.join('; ') : null;
  }

  /**
   * Chunks start-up must verify before anything is served: all of
   * chunks.blob when its stamp does not match (see stampMatches), and those
   * of every segment whose file changed. Empty: nothing to verify.
   */
  chunksToVerifyAtStart(): { ids: number[]; why: string[] } {
    const ids: number[] = [];
    const why: string[] = [];
    if (!this.stampMatches()) {
      ids.push(...this.chunkIdsOf(0));
      why.push(`${this.blobPath} changed since this daemon last stopped cleanly (or it never did)`);
    }
    for (const c of this.changedSegments) {
      ids.push(...this.chunkIdsOf(c.id));
      why.push(c.changed as string);
    }
    return { ids, why };
  }

  /** After the start-up verification: the changed segments' files are what their rows trust from now on. */
  acceptChangedSegments(): void {
    for (const c of this.changedSegments.splice(0)) if (!this.segments.sealed(c.id)) this.segments.restamp(c.id);
  }

  private migrate(): void {
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS chunks (${CHUNKS_COLUMNS});
      CREATE TABLE IF NOT EXISTS layer_chunks (
        snapshot_id INTEGER NOT NULL,
        chunk_id    INTEGER NOT NULL REFERENCES chunks(id),
        PRIMARY KEY (snapshot_id, chunk_id)
      ) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS layer_chunks_chunk ON layer_chunks(chunk_id);
      -- Chunks whose bytes are missing or do not match their digest.
      CREATE TABLE IF NOT EXISTS bad_chunks (
        chunk_id  INTEGER PRIMARY KEY REFERENCES chunks(id),
        reason    TEXT    NOT NULL,
        found_ms  INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS store_meta (
        name   TEXT PRIMARY KEY,
        value  TEXT NOT NULL
      );
    `);
    const cols = (prepared(this.db, "SELECT name FROM pragma_table_info('chunks')").all() as { name: string }[]).map((c) => c.name);
    if (!cols.includes('segment')) this.addSegmentColumn();
    this.db.exec('DROP INDEX IF EXISTS chunks_blkaddr; CREATE INDEX IF NOT EXISTS chunks_segment_blkaddr ON chunks(segment, blkaddr);');
  }

  /**
   * Stores made before segments keep one row per digest (digest UNIQUE):
   * the table is rebuilt with a segment column (all 0, chunks.blob) and
   * uniqueness per segment, in one transaction, foreign keys off meanwhile
   * (SQLite's documented way to change a table's constraints).
   */
  private addSegmentColumn(): void {
    this.db.pragma('foreign_keys = OFF');
    try {
      this.db.transaction(() => {
        this.db.exec(`
          CREATE TABLE chunks_v2 (${CHUNKS_COLUMNS});
          INSERT INTO chunks_v2 (id, digest, segment, blkaddr, nblocks, refs) SELECT id, digest, 0, blkaddr, nblocks, refs FROM chunks;
          DROP TABLE chunks;
          ALTER TABLE chunks_v2 RENAME TO chunks;
        `);
        const broken = this.db.pragma('foreign_key_check') as unknown[];
        if (broken.length > 0) throw new Error(`chunk index migration left ${broken.length} dangling references`);
      })();
    } finally {
      this.db.pragma('foreign_keys = ON');
    }
  }

  private chunkIdsOf(segment: number): number[] {
    return (prepared(this.db, 'SELECT id FROM chunks WHERE segment = ?').all(segment) as { id: number }[]).map((r) => r.id);
  }

  /** Records chunks as bad (their bytes missing or wrong); returns how many were not bad already. */
  markBad(ids: Iterable<number>, reason: string): number {
    const ins = prepared(this.db, 'INSERT OR IGNORE INTO bad_chunks (chunk_id, reason, found_ms) VALUES (?, ?, ?)');
    let n = 0;
    const now = Date.now();
    this.db.transaction(() => {
      for (const id of ids) n += ins.run(id, reason, now).changes;
    })();
    if (n > 0) this.onChunkHealth?.();
    return n;
  }

  /** Chunks whose right bytes were written again: good from now on. */
  markGood(ids: Iterable<number>): void {
    const del = prepared(this.db, 'DELETE FROM bad_chunks WHERE chunk_id = ?');
    let n = 0;
    this.db.transaction(() => {
      for (const id of ids) n += del.run(id).changes;
    })();
    if (n > 0) this.onChunkHealth?.();
  }

  badChunkCount(): number {
    return (prepared(this.db, 'SELECT count(*) AS n FROM bad_chunks').get() as { n: number }).n;
  }

  /** Snapshot ids of layers that reference at least one bad chunk, with how many. */
  layersWithBadChunks(): Map<number, number> {
    const rows = prepared(this.db, 'SELECT lc.snapshot_id AS id, count(*) AS n FROM layer_chunks lc JOIN bad_chunks b ON b.chunk_id = lc.chunk_id GROUP BY lc.snapshot_id').all() as { id: number; n: number }[];
    return new Map(rows.map((r) => [r.id, r.n]));
  }

  /**
   * Whether the store file is as this daemon last left it (same inode, size
   * and change time as recorded by `saveStamp`): if not, something else
   * wrote, truncated or replaced it, or this daemon stopped mid-write, and
   * every chunk must be verified before it is trusted.
   */
  stampMatches(): boolean {
    const raw = (prepared(this.db, "SELECT value FROM store_meta WHERE name = 'stamp'").get() as { value: string } | undefined)?.value;
    if (!raw) return false;
    const was = JSON.parse(raw) as Stamp;
    const now = this.stamp();
    return was.ino === now.ino && was.size === now.size && was.ctimeNs === now.ctimeNs;
  }

  /** Records the file's current inode, size and change time: its content is known good as of now. */
  saveStamp(): void {
    if (this.fd < 0) return;
    prepared(this.db, "INSERT INTO store_meta (name, value) VALUES ('stamp', ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value").run(JSON.stringify(this.stamp()));
  }

  /** Forgets the stamp: the next start verifies every chunk. */
  dropStamp(): void {
    prepared(this.db, "DELETE FROM store_meta WHERE name = 'stamp'").run();
  }

  private stamp(): Stamp {
    const st = fs.fstatSync(this.fd, { bigint: true });
    return { ino: Number(st.ino), size: Number(st.size), ctimeNs: String(st.ctimeNs) };
  }

  /**
   * What is wrong with the store file now, or null: the path no longer
   * names the file this daemon writes (deleted or replaced while running:
   * what it stores now would be lost at the next start).
   */
  fileProblem(): string | null {
    let st: fs.Stats;
    try {
      st = fs.statSync(this.blobPath);
    } catch (err) {
      return `${this.blobPath} was deleted while the daemon runs (${(err as NodeJS.ErrnoException).code}): new layers are not stored; restart the daemon to put it right`;
    }
    if (st.dev !== this.fileId.dev || st.ino !== this.fileId.ino) return `${this.blobPath} was replaced by another file while the daemon runs: new layers are not stored; restart the daemon to put it right`;
    return null;
  }

  /** Free list = the gaps between live chunks; high water = end of the last one. */
  private rebuildFreeList(): void {
    const rows = prepared(this.db, 'SELECT blkaddr, nblocks FROM chunks WHERE segment = 0 ORDER BY blkaddr').all() as Extent[];
    // Ranges another store of this process is punching are taken until their punch ends (a wait from an earlier rebuild is dropped).
    const others = [...(punchesUnderWay.get(this.fileKey()) ?? [])].filter((p) => p.owner !== this);
    this.othersPunches.clear();
    for (const p of others) {
      rows.push(p.extent);
      const wait: Promise<void> = p.ended.then(() => {
        if (this.othersPunches.delete(wait) && this.fd >= 0) this.reuse(p.extent);
      });
      this.othersPunches.add(wait);
    }
    if (others.length > 0) rows.sort((a, b) => a.blkaddr - b.blkaddr);
    this.free = [];
    let cursor = 0;
    for (const r of rows) {
      if (r.blkaddr > cursor) this.free.push({ blkaddr: cursor, nblocks: r.blkaddr - cursor });
      cursor = Math.max(cursor, r.blkaddr + r.nblocks);
    }
    this.highWater = cursor;
  }

  /** chunks.blob's identity as punchesUnderWay knows it. */
  private fileKey(): string {
    return `${this.fileId.dev}:${this.fileId.ino}`;
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

  /** The chunk with `digest` whose bytes are good (a bad one is never handed out). */
  lookup(digest: string): ChunkRow | undefined {
    // Prepared once: a layer of small files asks this for every file.
    return prepared(this.db, 'SELECT c.* FROM chunks c WHERE c.digest = ? AND NOT EXISTS (SELECT 1 FROM bad_chunks b WHERE b.chunk_id = c.id) ORDER BY c.segment LIMIT 1').get(digest) as ChunkRow | undefined;
  }

  /**
   * Runs synchronous `fn` (lookups) in one read transaction: the database's
   * lock is taken once for all of them instead of once per statement (in
   * WAL mode ~6 µs a lookup alone, ~1 µs in one transaction), and they see
   * one state. Nothing may await inside.
   */
  inOneRead<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  /** `lookup` of each digest, in one read transaction. */
  lookupMany(digests: readonly string[]): (ChunkRow | undefined)[] {
    return this.inOneRead(() => digests.map((d) => this.lookup(d)));
  }

  /**
   * Every row of `digest` (one per segment holding it), good or bad; `bad`
   * true: an import must write its bytes again (see Converter.importChunks;
   * in a sealed segment that writes the segment anew).
   */
  lookupAll(digest: string): (ChunkRow & { bad: boolean })[] {
    // Prepared once: placing a layer asks this for every distinct chunk.
    const rows = prepared(this.db, 'SELECT c.*, EXISTS (SELECT 1 FROM bad_chunks b WHERE b.chunk_id = c.id) AS bad FROM chunks c WHERE c.digest = ? ORDER BY c.segment').all(digest) as (ChunkRow & { bad: number })[];
    return rows.map((r) => ({ ...r, bad: r.bad === 1 }));
  }

  /** Size in blocks of segment `id` (chunks.blob: its high-water mark). */
  segmentBlocks(id: number): number {
    return id === 0 ? this.highWater : (this.segments.row(id)?.blocks ?? 0);
  }

  /** The files behind a layer image's device tags (see segmentTag); an untagged slot is chunks.blob (images made before segments). */
  devicePaths(tags: string[]): string[] {
    return tags.map((t) => storeDevicePath(this.dir, t));
  }

  /**
   * The bytes of chunk `row`, checked against its digest; null (and the
   * chunk marked bad) when they do not match. For copying a chunk out of
   * the store (lazy layers), where a damaged copy must not spread.
   */
  async readChecked(row: ChunkRow): Promise<Buffer | null> {
    // Gone since it was looked up (its layer removed): no copy here, nothing to mark.
    if (!this.holdRow(row)) return null;
    try {
      let why = 'its bytes do not match its digest';
      try {
        const buf = await this.read(row);
        if (crypto.createHash('sha256').update(buf).digest('hex') === row.digest) return buf;
      } catch (err) {
        // EIO: the kernel found a sealed segment's bytes damaged.
        why = `its bytes cannot be read: ${(err as Error).message}`;
      }
      this.markBad([row.id], why);
      this.log.error({ op: 'integrity', chunk: row.digest, segment: row.segment, blkaddr: row.blkaddr }, `chunk sha256:${row.digest} in the store: ${why}: marked bad`);
      return null;
    } finally {
      this.unpin(row.id);
    }
  }

  /**
   * Pins chunk `row` when it is still stored as it was read (same id,
   * digest and extent): until unpin, no removal deletes its row or frees
   * its blocks (nor hands its id to another chunk), so what a reader finds
   * there, and marks bad, is that chunk. False when it went meanwhile.
   */
  holdRow(row: ChunkRow): boolean {
    const now = prepared(this.db, 'SELECT digest, segment, blkaddr, nblocks FROM chunks WHERE id = ?').get(row.id) as ChunkRow | undefined;
    if (!now || now.digest !== row.digest || now.segment !== row.segment || now.blkaddr !== row.blkaddr || now.nblocks !== row.nblocks) return false;
    this.pin(row.id);
    return true;
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

  /**
   * Returns an extent that holds no live chunk: queued to be punched on a
   * thread of the pool (on a `discard` mount a punch waits for the device's
   * trims: the event loop should not), and reusable once punched: a chunk
   * written there before would be zeroed by the punch. One punch at a time
   * (a removal can free thousands of runs: the pool's threads and koffi's
   * asynchronous calls are shared with reads). A failed punch leaves the
   * space allocated (fsck at the next start punches it); the extent is
   * reusable all the same.
   */
  private releaseExtent(e: Extent): void {
    this.punchQueue.push(e);
    this.punching ??= this.punchQueued();
  }

  private async punchQueued(): Promise<void> {
    try {
      for (let e = this.punchQueue.shift(); e; e = this.punchQueue.shift()) {
        const key = this.fileKey();
        const punch = this.onBlob((fd) => punchHoleAsync(fd, e.blkaddr * STORE_BLOCK, e.nblocks * STORE_BLOCK));
        const underWay: PunchUnderWay = { owner: this, extent: e, ended: punch.then(noop, noop) };
        let onFile = punchesUnderWay.get(key);
        if (!onFile) punchesUnderWay.set(key, (onFile = new Set()));
        onFile.add(underWay);
        try {
          await punch;
        } catch (err) {
          this.log.warn({ op: 'reclaim', err: (err as Error).message }, 'cannot punch hole; space stays allocated until fsck');
        } finally {
          onFile.delete(underWay);
          if (onFile.size === 0 && punchesUnderWay.get(key) === onFile) punchesUnderWay.delete(key);
        }
        this.reuse(e);
      }
    } finally {
      this.punching = null;
    }
  }

  /**
   * Runs `fn` on chunks.blob's current descriptor, which stays open until
   * it ends: restoreFile and close retire a descriptor in use instead of
   * closing it, so that an operation in flight on the thread pool never
   * lands on another file that got the same number.
   */
  private onBlob<T>(fn: (fd: number) => Promise<T>): Promise<T> {
    return this.blobFds.use(this.fd, fn);
  }

  /** A punched extent joins the free list (or lowers the high-water mark when it ends there). */
  private reuse(e: Extent): void {
    if (e.blkaddr + e.nblocks === this.highWater) {
      this.highWater = e.blkaddr;
    } else {
      const i = this.free.findIndex((f) => f.blkaddr > e.blkaddr);
      this.free.splice(i < 0 ? this.free.length : i, 0, { ...e });
    }
  }

  /** Resolves once every freed extent is punched and reusable (see releaseExtent) and unused segment files are deleted. */
  async settled(): Promise<void> {
    do {
      while (this.punching || this.othersPunches.size > 0) await Promise.all([this.punching, ...this.othersPunches]);
      await this.segments.deletionsDone();
    } while (this.punching || this.othersPunches.size > 0);
  }

  /**
   * The store file was deleted or replaced while this daemon runs (see
   * fileProblem): the data lives on in the file this process has open, so
   * it is copied (holes kept) to a new file that is renamed into place; a
   * foreign file found at the path is kept beside it, renamed
   * `chunks.blob.displaced-<ms>`. Call with the import lock held (no write
   * under way). Layers mounted before keep reading the old file, which has
   * the same bytes; new mounts read the new one.
   */
  async restoreFile(): Promise<string | null> {
    const problem = this.fileProblem();
    if (!problem || this.fd < 0) return null;
    const tmp = `${this.blobPath}.restore-${process.pid}`;
    const out = fs.openSync(tmp, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
    try {
      await this.onBlob(async (fd) => {
        const size = fs.fstatSync(fd).size;
        const buf = Buffer.alloc(1 << 20);
        for (let at = seekDataOrHole(fd, 0, 'data'); at !== null && at < size; ) {
          const end = seekDataOrHole(fd, at, 'hole') ?? size;
          for (let off = at; off < end; ) {
            const n = Math.min(buf.length, end - off);
            await readAt(fd, buf.subarray(0, n), off);
            await writeAllAt(out, buf.subarray(0, n), off);
            off += n;
          }
          at = end < size ? seekDataOrHole(fd, end, 'data') : null;
        }
        fs.ftruncateSync(out, size);
      });
      fs.fsyncSync(out);
    } catch (err) {
      fs.closeSync(out);
      fs.rmSync(tmp, { force: true });
      throw err;
    }
    if (fs.existsSync(this.blobPath)) fs.renameSync(this.blobPath, `${this.blobPath}.displaced-${Date.now()}`);
    fs.renameSync(tmp, this.blobPath);
    fsyncDirOf(this.blobPath);
    const old = this.fd;
    this.fd = out;
    const st = fs.fstatSync(out);
    this.fileId = { dev: st.dev, ino: st.ino };
    // Writes, reads and punches in flight on the old descriptor end there (a sink's writes to the old file fail
    // its conversion: checkStoreFile; punched ranges are dead bytes, in the copy too, punched at the next start).
    this.blobFds.release(old);
    this.restoredFiles++;
    this.saveStamp();
    this.log.error({ op: 'integrity', store: this.blobPath }, `${problem.replace(/: new layers are not stored.*$/, '')}: put back from the copy this daemon holds open (nothing lost)`);
    return problem;
  }

  /**
   * Writes new chunks that lie back to back (extent `e` covers them all;
   * the parts adding up to whole blocks) with one writev: in chunks.blob, or in the
   * import's own segment `writer` (extents from takeAppend). A layer of
   * small files is thousands of chunks.
   */
  async writeRun(e: Extent, parts: Buffer[], writer: SegmentWriter | null = null): Promise<void> {
    const seg = e.segment ?? 0;
    if (seg !== (writer?.id ?? 0)) throw new Error(`writeRun: extent of segment ${seg}, writer of ${writer?.id ?? 'chunks.blob'}`);
    if (!writer) this.checkFileForWrites();
    const total = parts.reduce((a, p) => a + p.length, 0);
    if (total !== e.nblocks * STORE_BLOCK) throw new Error(`writeRun: ${total} bytes for ${e.nblocks} blocks`);
    const run = async (fd: number) => {
      const pos = e.blkaddr * STORE_BLOCK;
      const written = await new Promise<number>((resolve, reject) => fs.writev(fd, parts, pos, (err, n) => (err ? reject(err) : resolve(n))));
      if (written === total) return;
      // A short write (rare): the rest one piece at a time.
      await writeAllAt(fd, Buffer.concat(parts).subarray(written), pos + written);
    };
    await (writer ? run(writer.fd) : this.onBlob(run));
  }

  /** Throws when the store file is gone or replaced (see fileProblem); stats it at most every WRITE_CHECK_MS. */
  private checkFileForWrites(): void {
    const now = Date.now();
    if (now - this.fileCheckedAt < WRITE_CHECK_MS) return;
    const problem = this.fileProblem();
    if (problem) throw new Error(problem);
    this.fileCheckedAt = now;
  }

  /**
   * Writes a chunk's blocks at its extent: in chunks.blob, or over a
   * damaged chunk of an unsealed segment (a sealed one cannot be written:
   * throws). New chunks of a segment are written through its SegmentWriter.
   */
  async write(e: Extent, data: Buffer): Promise<void> {
    const padded = padToBlocks(data, e.nblocks);
    const seg = e.segment ?? 0;
    if (seg === 0) {
      this.checkFileForWrites();
      await this.onBlob((fd) => writeAllAt(fd, padded, e.blkaddr * STORE_BLOCK));
      return;
    }
    if (this.segments.sealed(seg)) {
      // Written at the next sync, as a new sealed copy of the whole segment.
      const patches = this.sealedPatches.get(seg) ?? new Map<number, Buffer>();
      patches.set(e.blkaddr, padded);
      this.sealedPatches.set(seg, patches);
      return;
    }
    let fd = this.rwSegments.get(seg);
    if (fd === undefined) {
      fd = fs.openSync(this.segments.pathOf(seg), fs.constants.O_RDWR);
      this.rwSegments.set(seg, fd);
    }
    await writeAllAt(fd, padded, e.blkaddr * STORE_BLOCK);
    this.dirtySegments.add(seg);
  }

  /** The next `nblocks` of segment writer `w` (an import's own), for writeRun. */
  takeAppend(w: SegmentWriter, nblocks: number): Extent {
    const e = { segment: w.id, blkaddr: w.blocks, nblocks };
    w.blocks += nblocks;
    return e;
  }

  /** Writes a new chunk at the end of segment `w` (an import's own); returns its extent. */
  async append(w: SegmentWriter, data: Buffer): Promise<Extent> {
    const nblocks = Math.ceil(data.length / STORE_BLOCK);
    // The extent is taken before the write: appends may be in flight together.
    const e = { segment: w.id, blkaddr: w.blocks, nblocks };
    w.blocks += nblocks;
    await writeAllAt(w.fd, padToBlocks(data, nblocks), e.blkaddr * STORE_BLOCK);
    return e;
  }

  async read(e: Extent): Promise<Buffer> {
    const buf = Buffer.alloc(e.nblocks * STORE_BLOCK);
    const seg = e.segment ?? 0;
    if (seg === 0) await this.onBlob((fd) => readAt(fd, buf, e.blkaddr * STORE_BLOCK));
    else await this.segments.withFd(seg, (fd) => readAt(fd, buf, e.blkaddr * STORE_BLOCK));
    return buf;
  }

  /**
   * Flushes what was written so far to chunks.blob (or segment `writer`)
   * to disk, ahead of the sync that makes it durable: a layer's many MiB of
   * new chunks reach the disk while it still streams, and that sync has
   * little left to wait for. Its result is not used: the store file may
   * have been put back (restoreFile) on another descriptor meanwhile, and
   * the sync that follows is what makes the layer durable.
   */
  async writeBack(writer: SegmentWriter | null = null): Promise<void> {
    const flush = (fd: number) => new Promise<void>((resolve) => fs.fdatasync(fd, () => resolve()));
    await (writer ? flush(writer.fd) : this.onBlob(flush));
  }

  /** Makes what write() wrote durable (chunks.blob, and healed segments, whose stamps are renewed; sealed ones are written again). */
  async sync(): Promise<void> {
    await this.onBlob((fd) => new Promise<void>((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve()))));
    for (const [seg, patches] of [...this.sealedPatches]) {
      this.sealedPatches.delete(seg);
      const { unreadable } = await this.segments.rewrite(seg, patches);
      if (unreadable.length > 0) this.markBad(unreadable, `its bytes cannot be read (store segment ${seg} is damaged)`);
    }
    for (const seg of [...this.dirtySegments]) {
      const fd = this.rwSegments.get(seg) as number;
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      this.rwSegments.delete(seg);
      this.dirtySegments.delete(seg);
      this.segments.restamp(seg);
    }
  }

  /** In a transaction: records a new chunk whose data is already durable (and its segment, with the first of its chunks). */
  insertChunk(digest: string, e: Extent): number {
    const seg = e.segment ?? 0;
    if (seg > 0) this.segments.record(seg);
    const res = prepared(this.db, 'INSERT INTO chunks (digest, segment, blkaddr, nblocks, refs) VALUES (?, ?, ?, ?, 0)').run(digest, seg, e.blkaddr, e.nblocks);
    return Number(res.lastInsertRowid);
  }

  /** The chunk rows layer `snapshotId` references. */
  layerChunks(snapshotId: number): ChunkRow[] {
    return prepared(this.db, 'SELECT c.* FROM layer_chunks lc JOIN chunks c ON c.id = lc.chunk_id WHERE lc.snapshot_id = ?').all(snapshotId) as ChunkRow[];
  }

  /** In a transaction: layer `snapshotId` references each chunk once. */
  addLayerRefs(snapshotId: number, chunkIds: Iterable<number>): void {
    const ins = prepared(this.db, 'INSERT OR IGNORE INTO layer_chunks (snapshot_id, chunk_id) VALUES (?, ?)');
    const inc = prepared(this.db, 'UPDATE chunks SET refs = refs + 1 WHERE id = ?');
    for (const id of chunkIds) if (ins.run(snapshotId, id).changes > 0) inc.run(id);
  }

  /**
   * In a transaction: drops a layer's references and deletes chunks nobody
   * references any more (unless pinned by an import). Returns their extents,
   * to be punched by `releaseExtents` once the transaction has committed.
   */
  dropLayerRefs(snapshotId: number): Extent[] {
    const ids = (prepared(this.db, 'SELECT chunk_id FROM layer_chunks WHERE snapshot_id = ?').all(snapshotId) as {
      chunk_id: number;
    }[]).map((r) => r.chunk_id);
    prepared(this.db, 'DELETE FROM layer_chunks WHERE snapshot_id = ?').run(snapshotId);
    const dec = prepared(this.db, 'UPDATE chunks SET refs = refs - 1 WHERE id = ?');
    for (const id of ids) dec.run(id);
    return this.collectUnreferenced();
  }

  /** In a transaction: deletes unreferenced, unpinned chunk rows; returns their extents. */
  collectUnreferenced(): Extent[] {
    const dead = prepared(this.db, 'SELECT id, segment, blkaddr, nblocks FROM chunks WHERE refs <= 0').all() as ChunkRow[];
    const del = prepared(this.db, 'DELETE FROM chunks WHERE id = ?');
    const out: Extent[] = [];
    const delBad = prepared(this.db, 'DELETE FROM bad_chunks WHERE chunk_id = ?');
    for (const c of dead) {
      if (this.pins.has(c.id)) continue;
      delBad.run(c.id);
      del.run(c.id);
      out.push({ segment: c.segment, blkaddr: c.blkaddr, nblocks: c.nblocks });
    }
    return out;
  }

  /**
   * Extents no live chunk holds any more (committed): chunks.blob's are
   * punched in the background and reused once punched (see releaseExtent);
   * a segment is deleted whole once no chunk is in it.
   */
  releaseExtents(extents: Extent[]): void {
    const segs = new Set<number>();
    const blob: Extent[] = [];
    for (const e of extents) {
      if ((e.segment ?? 0) === 0) blob.push(e);
      else segs.add(e.segment as number);
    }
    // Neighbours (a layer's new chunks were written one after another) go
    // with one punch: on a filesystem mounted with `discard` each punch
    // waits for its trims (512 MiB as 1 MiB punches: 0.26 s; as one: 0.17 s).
    blob.sort((a, b) => a.blkaddr - b.blkaddr);
    let run: Extent | null = null;
    for (const e of blob) {
      if (run && run.blkaddr + run.nblocks === e.blkaddr) {
        run.nblocks += e.nblocks;
        continue;
      }
      if (run) this.releaseExtent(run);
      run = { blkaddr: e.blkaddr, nblocks: e.nblocks };
    }
    if (run) this.releaseExtent(run);
    if (segs.size > 0) this.segments.dropUnused(segs);
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
    // The free list is rebuilt from the rows below: an extent whose punch is still under way would be in it twice.
    if (this.punching) throw new Error('chunk store fsck while freed extents are being punched: await settled() first');
    let droppedLayerRefs = 0;
    let fixedRefs = 0;
    this.db.transaction(() => {
      const layers = prepared(this.db, 'SELECT DISTINCT snapshot_id FROM layer_chunks').all() as { snapshot_id: number }[];
      for (const l of layers) {
        if (!liveLayerIds.has(l.snapshot_id)) {
          droppedLayerRefs += prepared(this.db, 'DELETE FROM layer_chunks WHERE snapshot_id = ?').run(l.snapshot_id).changes;
        }
      }
      fixedRefs = prepared(
        this.db,
        `UPDATE chunks SET refs = (SELECT count(*) FROM layer_chunks WHERE chunk_id = chunks.id)
           WHERE refs != (SELECT count(*) FROM layer_chunks WHERE chunk_id = chunks.id)`,
      ).run().changes;
      // Rows of dead chunks go; their blocks become gaps, punched below.
      this.collectUnreferenced();
    }).immediate();
    this.segments.dropUnused(this.segments.rows().map((r) => r.id));
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
    const r = prepared(this.db, 'SELECT count(*) AS n, coalesce(sum(nblocks), 0) AS blocks FROM chunks WHERE refs > 0').get() as { n: number; blocks: number };
    const ref = prepared(this.db, 'SELECT coalesce(sum(c.nblocks), 0) AS blocks FROM layer_chunks lc JOIN chunks c ON c.id = lc.chunk_id').get() as { blocks: number };
    const st = fs.fstatSync(this.fd);
    return {
      chunks: r.n,
      badChunks: this.badChunkCount(),
      storedBytes: r.blocks * STORE_BLOCK,
      referencedBytes: ref.blocks * STORE_BLOCK,
      diskBytes: st.blocks * 512 + this.segments.diskBytes(),
    };
  }

  close(): void {
    if (this.fd >= 0) {
      // A clean stop: the file is as this daemon left it; the next start need not verify it all.
      // A punch landing after the stamp changes the file's ctime: the next start then verifies it all (safe).
      try {
        if (this.db.open && !this.fileProblem()) this.saveStamp();
      } catch (err) {
        this.log.warn({ op: 'integrity', err: (err as Error).message }, 'cannot record the chunk store stamp; the next start verifies every chunk');
      }
      // Punches not started are left to the next start's fsck; an operation under way keeps the descriptor
      // (closed when it ends: the number could otherwise go to another file first).
      this.punchQueue.length = 0;
      this.blobFds.release(this.fd);
      this.fd = -1;
    }
    for (const fd of this.rwSegments.values()) fs.closeSync(fd);
    this.rwSegments.clear();
    this.segments.close();
  }
}

function fsyncDirOf(file: string): void {
  fsyncDir(path.dirname(file));
}

/** `data` followed by zeros up to `nblocks` whole blocks. */
function padToBlocks(data: Buffer, nblocks: number): Buffer {
  const len = nblocks * STORE_BLOCK;
  return data.length === len ? data : Buffer.concat([data, Buffer.alloc(len - data.length)]);
}

/**
 * Versions before 0.2 kept the store at cache/chunks.blob, where the guide's
 * `rm -rf ROOT/cache/*` deletes it: moved to store/chunks.blob (one rename:
 * a crash leaves it at one place or the other). Layers mounted meanwhile keep
 * reading the file they opened.
 */
function moveFromCache(root: string, dest: string, log: Logger): void {
  const old = path.join(root, 'cache', 'chunks.blob');
  if (fs.existsSync(dest) || !fs.existsSync(old)) return;
  fs.renameSync(old, dest);
  fsyncDirOf(dest);
  fsyncDirOf(old);
  log.info({ op: 'migrate', from: old, to: dest }, `chunk store moved from ${old} to ${dest} (cache/ holds only what can be fetched again)`);
}

function writeAt(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<{ bytesWritten: number }> {
  return new Promise((resolve, reject) =>
    fs.write(fd, buf, off, len, pos, (err, bytesWritten) => (err ? reject(err) : resolve({ bytesWritten }))),
  );
}

/** Writes all of `buf` at `pos` of `fd` (short writes continued). */
/** How often streaming writes check that the store file is still in place. */
const WRITE_CHECK_MS = 100;

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
