import fs from 'node:fs';
import path from 'node:path';
import { removeOnThread } from './remover';
import { eventLoopSlices } from './slices';

/** Disk usage of a snapshot (containerd's snapshots.Usage). */
export interface Usage {
  /** Bytes on disk. */
  size: number;
  inodes: number;
}

/**
 * A committed layer's usage before the background conversion's walk
 * measured it (the walk lstats every file anyway: Commit does not walk the
 * tree a second time while containerd waits). Never a real measure: a tree
 * has at least its root.
 */
export const UNMEASURED: Readonly<Usage> = Object.freeze({ size: 0, inodes: -1 });

export function isUnmeasured(u: Usage): boolean {
  return u.inodes < 0;
}

/**
 * Sums a tree's usage the way containerd's continuity fs.DiskUsage counts
 * it, from the lstat of each of its entries: each inode once (hardlinks
 * share), size = allocated 512-byte blocks.
 */
export class UsageCounter {
  private readonly seen = new Set<string>();
  private size = 0;

  add(st: fs.BigIntStats): void {
    const id = `${st.dev}:${st.ino}`;
    if (this.seen.has(id)) return;
    this.seen.add(id);
    this.size += Number(st.blocks) * 512;
  }

  get usage(): Usage {
    return { size: this.size, inodes: this.seen.size };
  }
}

const SLASH = Buffer.from('/');

/** Disk usage of a tree (see UsageCounter); a missing tree has none (0 inodes). */
export async function diskUsage(root: string): Promise<Usage> {
  const counter = new UsageCounter();
  // Synchronous calls in slices of at most SLICE_MS, the event loop served
  // between them: a warm walk of a 6700-entry Debian root takes ~75 ms so,
  // against 120-400 ms as one promise per entry through the thread pool
  // (it runs right after containerd wrote the files, so they are in
  // cache; a cold walk is slower serially: ~480 ms against ~150 ms with
  // the pool's parallel lstats). Names are taken as bytes (a layer's
  // names need not be UTF-8).
  const stack = [Buffer.from(root)];
  const slice = eventLoopSlices(SLICE_MS);
  while (stack.length > 0) {
    await slice();
    const p = stack.pop() as Buffer;
    let st: fs.BigIntStats;
    try {
      st = fs.lstatSync(p, { bigint: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw err;
    }
    counter.add(st);
    if (!st.isDirectory()) continue;
    try {
      for (const n of fs.readdirSync(p, { encoding: 'buffer' })) stack.push(Buffer.concat([p, SLASH, n]));
    } catch (err) {
      // Removed (or renamed away by Remove) between lstat and readdir.
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
  }
  return counter.usage;
}

/** Longest stretch diskUsage keeps the event loop (ms). */
const SLICE_MS = 10;

/** Attempts removeAll makes at a tree that keeps changing under it (ENOTEMPTY, EBUSY), 100 ms apart. */
const REMOVE_ATTEMPTS = 4;

/**
 * Removes a tree (rm -rf); missing is fine. The work is done on the
 * remover thread (remover.ts: on a filesystem mounted with `discard`,
 * unlink and rmdir wait for the disk), the way removeTreeSync says.
 * Retried when the tree changed meanwhile (ENOTEMPTY, EBUSY).
 */
export async function removeAll(p: string): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await removeOnThread(p);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (attempt >= REMOVE_ATTEMPTS || (code !== 'ENOTEMPTY' && code !== 'EBUSY')) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/**
 * Removes tree `p` with synchronous calls (the remover thread's work; a
 * thread-pool trip per entry, as fs.promises.rm makes, cost ~6 µs of the
 * calling thread apiece): readdir's file types spare an lstat per entry;
 * names are handled as bytes (a layer's names need not be UTF-8);
 * symlinks are removed, never followed; missing is fine.
 */
export function removeTreeSync(p: Buffer, isDir?: boolean): void {
  if (isDir === undefined) {
    const st = lstatOrNull(p);
    if (!st) return;
    isDir = st.isDirectory();
  }
  if (!isDir) {
    ignoreMissing(() => fs.unlinkSync(p));
    return;
  }
  let entries: fs.Dirent<Buffer>[] = [];
  ignoreMissing(() => (entries = fs.readdirSync(p, { withFileTypes: true, encoding: 'buffer' })));
  for (const e of entries) {
    const child = Buffer.concat([p, SLASH, e.name]);
    // A filesystem without d_type says neither: lstat then.
    const known = e.isDirectory() || e.isFile() || e.isSymbolicLink() || e.isFIFO() || e.isSocket() || e.isCharacterDevice() || e.isBlockDevice();
    removeTreeSync(child, known ? e.isDirectory() : undefined);
  }
  ignoreMissing(() => fs.rmdirSync(p));
}

/** Runs fn; ENOENT (already gone) is not an error. */
function ignoreMissing(fn: () => void): void {
  try {
    fn();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}

/** A device number's major and minor, from fs.Stats' dev or rdev as bigint (glibc's gnu_dev_major / gnu_dev_minor). */
export function devNumbers(d: bigint): [major: number, minor: number] {
  return [Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & 0xfffff000n)), Number((d & 0xffn) | ((d >> 12n) & 0xffffff00n))];
}

export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Directory entries; [] when the directory does not exist. */
export function readdirOrEmpty(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

/** lstat, or null when nothing is there (ENOENT); other errors are thrown. */
export function lstatOrNull(p: fs.PathLike): fs.Stats | null {
  try {
    return fs.lstatSync(p);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/** `root` + `rel` when that is a regular file reached through no symlink (paths from an image must not lead outside its mount). */
export function regularFileUnder(root: string, rel: string): string | null {
  let at = root;
  const parts = rel.split('/').filter((x) => x !== '' && x !== '.');
  if (parts.length === 0 || parts.includes('..')) return null;
  for (const [i, part] of parts.entries()) {
    at = path.join(at, part);
    const st = lstatOrNull(at);
    if (!st || (i < parts.length - 1 ? !st.isDirectory() : !st.isFile())) return null;
  }
  return at;
}

/** The nearest existing ancestor of `p` (p itself if it exists). */
export function existingAncestor(p: string): string {
  let d = path.resolve(p);
  while (!fs.existsSync(d) && path.dirname(d) !== d) d = path.dirname(d);
  return d;
}

/**
 * When the filesystem holding `p` (or its nearest existing ancestor) is
 * mounted read-only: that ancestor; otherwise null. (Node's recursive
 * mkdir reports ENOENT on a read-only filesystem, which names the wrong cause.)
 */
export function readOnlyAncestor(p: string): string | null {
  const at = existingAncestor(p);
  try {
    fs.accessSync(at, fs.constants.W_OK);
    return null;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EROFS' ? at : null;
  }
}
