import fs from 'node:fs';
import path from 'node:path';
import type Database from 'better-sqlite3';
import { ErrnoError } from '../../native/libc';
import { VERITY_UNSUPPORTED, enableVerity, hasVerity, measureVerity } from '../../native/verity';
import type { Logger } from '../log/logger';
import { FdUsers } from '../util/fd-users';
import { removeAll } from '../util/fs';
import { prepared } from './prepared';

/**
 * Sealed segments of the chunk store: files `store/segments/<id>.blob`, each
 * written once by one import (the chunks that import added, from block 0),
 * made durable, then sealed with fs-verity where ROOT's filesystem has it,
 * and never written again. A sealed segment's every read is checked by the
 * kernel against its Merkle tree: damaged bytes fail with EIO, never reach a
 * container. A segment lives while a chunk row names it; it is deleted
 * whole when its last chunk goes (a sealed file cannot be punched): its
 * name at once, its blocks on the remover thread.
 *
 * Segment 0 is `store/chunks.blob`, the one writable store file (the layout
 * used where the filesystem has no fs-verity, and by every version before
 * segments): it is not a row here.
 *
 * A segment row records what the file must be: its size in blocks, its
 * fs-verity digest (sealed) or its inode, size and change time (not sealed,
 * see ChunkStore's stamp). Start-up compares: a missing or shorter file
 * loses its chunks (marked bad by the caller); a changed one has its chunks
 * verified.
 */

export interface SegmentRow {
  id: number;
  blocks: number;
  /** fs-verity digest (hex) of a sealed segment, else null. */
  verity: string | null;
  /** `ino:size:ctimeNs` of the file as last written by this daemon. */
  stamp: string;
}

/** A segment being written by one import: not a row until its first chunk row commits. */
export interface SegmentWriter {
  readonly id: number;
  /** Next free block. */
  blocks: number;
  /** Open for writing until finish (then -1); read-only for an adopted file. */
  fd: number;
  /** A layer directory's file taken in place (see adopt): never written, never sealed. */
  readonly adopted?: boolean;
  /** An adopted file as it was when its reading began: finish refuses it changed. */
  readonly readAs?: FileState;
}

/** What tells a file's bytes changed: inode, size, modification and change times (ns). */
export interface FileState {
  ino: bigint;
  size: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
}

export function fileState(st: fs.BigIntStats): FileState {
  return { ino: st.ino, size: st.size, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs };
}

export function sameFileState(a: FileState, b: FileState): boolean {
  return a.ino === b.ino && a.size === b.size && a.mtimeNs === b.mtimeNs && a.ctimeNs === b.ctimeNs;
}

/** How recently an adopted file may have been modified: within this, a write in the same clock tick could leave its times unchanged (git's "racy" rule). */
const RACY_NS = 2_000_000_000n;

/** What start-up found for one segment. */
export interface SegmentCheck {
  id: number;
  /** The file is gone or shorter than its chunks: they are lost. */
  lost?: string;
  /** The file may have changed: its chunks must be verified. */
  changed?: string;
}

const MAX_OPEN = 128;
/** Temporary files of rewrite(): deleted at start if a crash left one. */
const REWRITE_PREFIX = '.rewrite-';
/** A segment file no row names any more, renamed on its way out (see remove): deleted in the background, or at the next start. */
const GONE_PREFIX = '.gone-';

export class Segments {
  readonly dir: string;
  /** Whether new segments are sealed with fs-verity (probed once). */
  private sealing: boolean | null = null;
  /** Read-only fds of segment files, most recently used last. */
  private readonly open = new Map<number, number>();
  /** fds handed to withFd calls still running: closed only once they are done. */
  private readonly fds = new FdUsers();
  /** Segments written but not yet named by a committed row. */
  private readonly pending = new Map<number, SegmentRow>();
  /** Adopted segments whose file may still be linked from a layer directory, with its modification time (see settleLinks). */
  private readonly linked = new Map<number, bigint>();
  private nextId: number;
  /** Segment files being deleted on the remover thread (see remove). */
  private readonly deleting = new Set<Promise<void>>();

  constructor(
    root: string,
    private readonly db: Database.Database,
    private readonly log: Logger,
  ) {
    this.dir = path.join(root, 'store', 'segments');
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    db.exec(`
      CREATE TABLE IF NOT EXISTS segments (
        id          INTEGER PRIMARY KEY,
        blocks      INTEGER NOT NULL,
        verity      TEXT,
        stamp       TEXT    NOT NULL,
        created_ms  INTEGER NOT NULL
      );
    `);
    const max = (db.prepare('SELECT coalesce(max(id), 0) AS m FROM segments').get() as { m: number }).m;
    this.nextId = Math.max(max, ...this.files()) + 1;
  }

  pathOf(id: number): string {
    if (!Number.isSafeInteger(id) || id <= 0) throw new Error(`segment id ${id} is not a positive integer`);
    return path.join(this.dir, `${id}.blob`);
  }

  /** Ids of the segment files present (names other than `<id>.blob` are ignored). */
  private files(): number[] {
    const out: number[] = [];
    for (const name of fs.readdirSync(this.dir)) {
      const m = /^([1-9][0-9]{0,14})\.blob$/.exec(name);
      if (m) out.push(Number(m[1]));
    }
    return out;
  }

  /**
   * Whether ROOT's filesystem can seal files with fs-verity: a scratch file
   * in the segments directory is written and sealed, once.
   */
  canSeal(): boolean {
    if (this.sealing !== null) return this.sealing;
    const probe = path.join(this.dir, `.verity-probe-${process.pid}`);
    try {
      fs.writeFileSync(probe, Buffer.alloc(4096, 1), { mode: 0o600 });
      const fd = fs.openSync(probe, 'r');
      try {
        enableVerity(fd);
        this.sealing = true;
      } finally {
        fs.closeSync(fd);
      }
    } catch (err) {
      if (!(err instanceof ErrnoError && VERITY_UNSUPPORTED.has(err.code))) this.log.warn({ op: 'integrity', err: (err as Error).message }, `cannot probe fs-verity in ${this.dir}: ${(err as Error).message}`);
      this.sealing = false;
    } finally {
      fs.rmSync(probe, { force: true });
    }
    return this.sealing;
  }

  /** The segment rows (for start-up checks, stats and doctor). */
  rows(): SegmentRow[] {
    return prepared(this.db, 'SELECT id, blocks, verity, stamp FROM segments ORDER BY id').all() as SegmentRow[];
  }

  row(id: number): SegmentRow | undefined {
    return (prepared(this.db, 'SELECT id, blocks, verity, stamp FROM segments WHERE id = ?').get(id) as SegmentRow | undefined) ?? this.pending.get(id);
  }

  /** Starts a new segment file (created, empty). */
  create(): SegmentWriter {
    const id = this.nextId++;
    const fd = fs.openSync(this.pathOf(id), fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    return { id, blocks: 0, fd };
  }

  /**
   * Takes `file`, a regular file of a layer directory on this filesystem,
   * into the store as a new segment without copying it: a hard link,
   * checked to be the inode `expect` (the one the caller read and hashed).
   * Its whole blocks can be named by chunk rows in place. The inode stays
   * the directory's file until the directory goes, so nothing here ever
   * writes, truncates, punches or seals it; abandon only unlinks. Throws
   * when it cannot be linked (another filesystem, too many links, ...).
   */
  adopt(file: string, expect: { dev: number; ino: number }): SegmentWriter {
    const id = this.nextId++;
    const target = this.pathOf(id);
    fs.linkSync(file, target);
    let fd = -1;
    try {
      fd = fs.openSync(target, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
      // After the link, which moved the change time.
      const st = fs.fstatSync(fd, { bigint: true });
      if (!st.isFile() || st.dev !== BigInt(expect.dev) || st.ino !== BigInt(expect.ino)) throw new Error(`${file} was replaced while it was read`);
      const now = BigInt(Date.now()) * 1_000_000n;
      const age = now - st.mtimeNs;
      if (age < RACY_NS && age > -RACY_NS) throw new Error(`${file} was modified a moment ago: a change now could leave its times as they are`);
      this.linked.set(id, st.mtimeNs);
      return { id, blocks: Number(st.size / 4096n), fd, adopted: true, readAs: fileState(st) };
    } catch (err) {
      if (fd >= 0) fs.closeSync(fd);
      fs.rmSync(target, { force: true });
      throw err;
    }
  }

  /**
   * Removes a layer directory (or one moved aside to be removed), which may
   * hold the other link of an adopted segment's file, then settles those
   * links (see settleLinks). Every removal of a directory that may hold such
   * a link (a layer directory containerd unpacked into) goes through here.
   */
  async removeLayerTree(p: string): Promise<void> {
    try {
      await removeAll(p);
    } finally {
      // Also after a removal that failed part way: the links it did remove are settled.
      this.settleLinks();
    }
  }

  /**
   * After a layer directory was removed: an adopted segment whose file is
   * no longer linked from a directory gets its stamp again (the unlink
   * changed its ctime; its inode, size and modification time must be the
   * recorded ones), else the next start would take it for changed and
   * verify it all.
   */
  settleLinks(): void {
    for (const [id, mtimeNs] of [...this.linked]) {
      const row = prepared(this.db, 'SELECT stamp FROM segments WHERE id = ?').get(id) as { stamp: string } | undefined;
      let st: fs.BigIntStats;
      try {
        st = fs.statSync(this.pathOf(id), { bigint: true });
      } catch {
        this.linked.delete(id);
        continue;
      }
      // Not recorded yet (an import under way): looked at again after the next removal (abandon forgets it).
      if (!row) continue;
      if (st.nlink > 1n) continue;
      this.linked.delete(id);
      // An unlink moves the change time, not the modification time: a write since the stamp moved both.
      const [ino, size] = row.stamp.split(':');
      if (String(st.ino) === ino && String(st.size) === size && st.mtimeNs === mtimeNs) this.restamp(id);
    }
  }

  /**
   * Makes a written segment durable and immutable: fsync, close, seal with
   * fs-verity where possible (the digest is recorded), fsync the directory.
   * It becomes a row with the first chunk row that names it (see record).
   * An adopted file is made durable, not sealed (see adopt).
   */
  finish(w: SegmentWriter): SegmentRow {
    fs.fsyncSync(w.fd);
    // An adopted file is recorded as it was read: any change since (through the directory's name) fails its layer.
    if (w.readAs && !sameFileState(fileState(fs.fstatSync(w.fd, { bigint: true })), w.readAs)) {
      throw new Error(`${this.pathOf(w.id)} (a file of the layer's directory) changed after it was read`);
    }
    fs.closeSync(w.fd);
    w.fd = -1;
    const file = this.pathOf(w.id);
    let verity: string | null = null;
    if (this.canSeal() && !w.adopted) {
      const fd = fs.openSync(file, 'r');
      try {
        enableVerity(fd);
        verity = measureVerity(fd);
      } finally {
        fs.closeSync(fd);
      }
    }
    fsyncDir(this.dir);
    const row = { id: w.id, blocks: w.blocks, verity, stamp: stampOf(file) };
    this.pending.set(w.id, row);
    return row;
  }

  /** A written segment that will not be used (the import failed): deleted. */
  abandon(w: SegmentWriter): void {
    if (w.fd >= 0) fs.closeSync(w.fd);
    w.fd = -1;
    this.pending.delete(w.id);
    this.linked.delete(w.id);
    // As remove: a cached descriptor would keep the file's space.
    this.remove(w.id);
  }

  /** In the transaction that records chunks of segment `id`: its row, once. */
  record(id: number): void {
    const p = this.pending.get(id);
    if (!p) return;
    prepared(this.db, 'INSERT OR IGNORE INTO segments (id, blocks, verity, stamp, created_ms) VALUES (?, ?, ?, ?, ?)').run(p.id, p.blocks, p.verity, p.stamp, Date.now());
  }

  /** After the recording transaction committed (or failed: the file stays for the caller to abandon). */
  committed(id: number): void {
    // Never throws: its caller's layer is recorded (a failure here would have it give up a segment rows name).
    try {
      if (prepared(this.db, 'SELECT 1 FROM segments WHERE id = ?').get(id)) this.pending.delete(id);
    } catch {
      // left pending: dropUnused skips it until the next start
    }
  }

  /**
   * Runs `fn` with a read-only fd of segment `id` (cached, at most MAX_OPEN;
   * an fd in use by another call is never closed under it, so its number
   * cannot be reused for another file meanwhile).
   */
  async withFd<T>(id: number, fn: (fd: number) => Promise<T>): Promise<T> {
    let fd = this.open.get(id);
    if (fd !== undefined) {
      this.open.delete(id);
      this.open.set(id, fd);
    } else {
      fd = fs.openSync(this.pathOf(id), fs.constants.O_RDONLY);
      this.open.set(id, fd);
      this.evict();
    }
    return this.fds.use(fd, fn);
  }

  /** Closes the least recently used fds beyond MAX_OPEN (one in use is closed when its last user is done). */
  private evict(): void {
    for (const [id, fd] of this.open) {
      if (this.open.size <= MAX_OPEN) break;
      this.open.delete(id);
      this.release(fd);
    }
  }

  private release(fd: number): void {
    this.fds.release(fd);
  }

  /** Whether segment `id` is sealed (its file cannot be written). */
  sealed(id: number): boolean {
    return this.row(id)?.verity != null;
  }

  /** Records that an unsealed segment was written (healed) by this daemon: its new stamp. */
  restamp(id: number): void {
    prepared(this.db, 'UPDATE segments SET stamp = ? WHERE id = ?').run(stampOf(this.pathOf(id)), id);
  }

  /**
   * A sealed segment cannot be written: healing a chunk in it makes a new
   * file with the same layout: every chunk read from the old one (a damaged
   * one, whose read fails, left as zeros and returned in `unreadable`),
   * `patches` (block address → the right bytes) written over; then sealed,
   * renamed over the old name, and its new digest recorded. Mounts made
   * before keep reading the old file (its good bytes are the same); new
   * mounts open the new one.
   */
  async rewrite(id: number, patches: Map<number, Buffer>): Promise<{ unreadable: number[] }> {
    const row = this.row(id);
    if (!row) throw new Error(`store segment ${id} has no row`);
    const chunks = prepared(this.db, 'SELECT id, blkaddr, nblocks FROM chunks WHERE segment = ? ORDER BY blkaddr').all(id) as { id: number; blkaddr: number; nblocks: number }[];
    const file = this.pathOf(id);
    const tmp = path.join(this.dir, `${REWRITE_PREFIX}${id}-${process.pid}`);
    const unreadable: number[] = [];
    const out = fs.openSync(tmp, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
    try {
      fs.ftruncateSync(out, row.blocks * 4096);
      await this.withFd(id, async (old) => {
        for (const c of chunks) {
          let buf = patches.get(c.blkaddr) ?? null;
          if (!buf) {
            buf = Buffer.alloc(c.nblocks * 4096);
            try {
              if (fs.readSync(old, buf, 0, buf.length, c.blkaddr * 4096) !== buf.length) throw new Error('short read');
            } catch {
              unreadable.push(c.id);
              continue;
            }
          }
          fs.writeSync(out, buf, 0, buf.length, c.blkaddr * 4096);
        }
      });
      fs.fsyncSync(out);
    } catch (err) {
      fs.closeSync(out);
      fs.rmSync(tmp, { force: true });
      throw err;
    }
    fs.closeSync(out);
    let verity: string | null = null;
    try {
      const fd = fs.openSync(tmp, 'r');
      try {
        enableVerity(fd);
        verity = measureVerity(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, file);
    } catch (err) {
      fs.rmSync(tmp, { force: true });
      throw err;
    }
    fsyncDir(this.dir);
    const cached = this.open.get(id);
    if (cached !== undefined) {
      this.open.delete(id);
      this.release(cached);
    }
    prepared(this.db, 'UPDATE segments SET verity = ?, stamp = ? WHERE id = ?').run(verity, stampOf(file), id);
    this.log.info({ op: 'integrity', segment: id, healed: patches.size, unreadable: unreadable.length }, `store segment ${id} written again with ${patches.size} healed chunks and sealed`);
    return { unreadable };
  }

  /** Deletes segments no chunk row names any more (rows first, then files). Returns how many. */
  dropUnused(ids: Iterable<number>): number {
    const unused: number[] = [];
    const has = prepared(this.db, 'SELECT 1 FROM chunks WHERE segment = ? LIMIT 1');
    const del = prepared(this.db, 'DELETE FROM segments WHERE id = ?');
    this.db.transaction(() => {
      for (const id of new Set(ids)) {
        if (id <= 0 || this.pending.has(id) || has.get(id)) continue;
        del.run(id);
        unused.push(id);
      }
    })();
    // On the remover thread: freeing a large file's blocks (trimmed one run at a time on a `discard` mount) takes ~0.2 s per 512 MiB.
    for (const id of unused) this.remove(id, true);
    return unused.length;
  }

  /** Deletes segment `id`'s file (its cached descriptor first, which would keep the space); in the background: see deletionsDone. */
  private remove(id: number, inBackground = false): void {
    const fd = this.open.get(id);
    if (fd !== undefined) {
      this.open.delete(id);
      this.release(fd);
    }
    if (!inBackground) {
      fs.rmSync(this.pathOf(id), { force: true });
      return;
    }
    // Its name goes now (a reader opening <id>.blob meanwhile, the scrub's or a heal's, would keep the space
    // with a cached descriptor); the blocks are freed on the remover thread, or by the next start after a stop.
    const gone = path.join(this.dir, `${GONE_PREFIX}${id}`);
    try {
      fs.renameSync(this.pathOf(id), gone);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      // (A full disk may have no room for the new name: deleted here then.)
      fs.rmSync(this.pathOf(id), { force: true });
      return;
    }
    const done: Promise<void> = removeAll(gone)
      .catch((err: Error) => this.log.warn({ op: 'remove', segment: id, err: err.message }, `store segment ${id} not deleted yet: ${err.message} (the next start deletes it)`))
      .finally(() => this.deleting.delete(done));
    this.deleting.add(done);
  }

  /** Resolves once the segment files being deleted in the background are gone (see remove). */
  async deletionsDone(): Promise<void> {
    while (this.deleting.size > 0) await Promise.all([...this.deleting]);
  }

  /**
   * Start-up, before anything is served or imported: segment files no row
   * names (an import killed before its commit) are deleted, so are rows no
   * chunk names; every other segment is compared with its row.
   */
  checkAtStart(): SegmentCheck[] {
    const rows = this.rows();
    const known = new Set(rows.map((r) => r.id));
    for (const name of fs.readdirSync(this.dir)) {
      if (name.startsWith(REWRITE_PREFIX) || name.startsWith(GONE_PREFIX)) fs.rmSync(path.join(this.dir, name), { force: true });
    }
    for (const id of this.files()) {
      if (!known.has(id)) {
        this.remove(id);
        this.log.info({ op: 'recover', segment: id }, `deleted store segment ${id}: written by an import that never committed`);
      }
    }
    this.dropUnused(known);
    const out: SegmentCheck[] = [];
    for (const r of this.rows()) {
      const file = this.pathOf(r.id);
      let st: fs.BigIntStats;
      try {
        st = fs.statSync(file, { bigint: true });
      } catch (err) {
        out.push({ id: r.id, lost: `${file} is missing (${(err as NodeJS.ErrnoException).code})` });
        continue;
      }
      if (Number(st.size) < r.blocks * 4096) {
        out.push({ id: r.id, lost: `${file} is ${st.size} bytes, shorter than the ${r.blocks * 4096} its chunks need` });
        continue;
      }
      // An adopted file whose layer directory is still there (removed by the sweep after start).
      if (st.nlink > 1n) this.linked.set(r.id, st.mtimeNs);
      if (r.verity) {
        const why = verityProblem(file, r.verity);
        if (why) out.push({ id: r.id, changed: why });
      } else if (fileStamp(st) !== r.stamp) {
        out.push({ id: r.id, changed: `${file} changed since this daemon wrote it` });
      }
    }
    return out;
  }

  /** Allocated bytes of all segment files. */
  diskBytes(): number {
    let n = 0;
    for (const id of this.files()) {
      try {
        n += fs.statSync(this.pathOf(id)).blocks * 512;
      } catch {
        // deleted meanwhile
      }
    }
    return n;
  }

  close(): void {
    for (const fd of this.open.values()) this.release(fd);
    this.open.clear();
  }
}

/** Why a sealed segment's file is not the one recorded (not sealed, or another content), or null. */
function verityProblem(file: string, want: string): string | null {
  const fd = fs.openSync(file, 'r');
  try {
    if (!hasVerity(fd)) return `${file} is no longer sealed with fs-verity (replaced by another file)`;
    const got = measureVerity(fd);
    return got === want ? null : `${file} has fs-verity digest ${got}, sealed as ${want} (replaced by another file)`;
  } catch (err) {
    return `${file}: cannot measure its fs-verity digest: ${(err as Error).message}`;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * `ino:size:ctimeNs` of a file: changes with any write, truncate or
 * replacement (ctime cannot be set from user space). For files the daemon
 * writes once and checks later (segments, layer images).
 */
export function fileStamp(st: fs.BigIntStats): string {
  return `${st.ino}:${st.size}:${st.ctimeNs}`;
}

function stampOf(file: string): string {
  return fileStamp(fs.statSync(file, { bigint: true }));
}

export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
