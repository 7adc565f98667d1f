import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { readXattrs } from '../../native/xattr';
import { type UsageCounter, devNumbers } from '../util/fs';
import { eventLoopSlices } from '../util/slices';

/**
 * A layer's file tree as the EROFS writer takes it: every node with the
 * metadata EROFS keeps, regular files as lists of chunks already handed to
 * a ChunkSink (their bytes never stay in memory). Hardlinks are the same
 * node object under several names. Built from a directory (the snapshot
 * containerd unpacked into: `treeFromDirectory`) or from a layer's tar
 * stream (`tar-tree.ts`), so both paths write the same image.
 */
export type NodeKind = 'dir' | 'file' | 'symlink' | 'chr' | 'blk' | 'fifo' | 'sock';

export interface TreeNode {
  kind: NodeKind;
  /** Permission bits with setuid, setgid and sticky (mode & 0o7777). */
  perm: number;
  uid: number;
  gid: number;
  mtimeSec: number;
  mtimeNsec: number;
  /** Extended attributes by full name ("user.x", "trusted.overlay.opaque", ...). */
  xattrs: Map<string, Buffer>;
  /** Directories: entries by name, the name's raw bytes as a latin1 string (see nameKey). */
  children?: Map<string, TreeNode>;
  /** Regular files: size in bytes and one layer-local chunk number per chunkSize piece. */
  size?: number;
  chunks?: number[];
  /** Symlinks: the target's raw bytes. */
  target?: Buffer;
  /** Character and block devices. */
  rdevMajor?: number;
  rdevMinor?: number;
}

/** The key of a name in `children`: its bytes, one char per byte. */
export const nameKey = (name: Buffer | string): string => (typeof name === 'string' ? Buffer.from(name, 'utf8') : name).toString('latin1');
/** The bytes of a `children` key. */
export const keyBytes = (key: string): Buffer => Buffer.from(key, 'latin1');

/**
 * Where file data goes: each piece (at most chunkSize bytes) gets a
 * layer-local chunk number. A sink may keep the piece until it is written
 * (no copy), so its bytes must not change after add: sinkFileData hands on
 * views of its source's buffers, which stream sources (sockets, files,
 * zlib, pipes) never reuse.
 */
export interface ChunkSink<A = unknown> {
  readonly chunkSize: number;
  /** `place`: where the piece lies in a file being adopted (see adopt). */
  add(piece: Piece, place?: Place<A>): Promise<number>;
  /**
   * Starts taking a large file of a layer directory into the store in
   * place, when the sink can (see StoreChunkSink.adopt): its pieces go to
   * add with their place, then endAdoption.
   */
  adopt?(file: string, fd: number): A | null;
  endAdoption?(adoption: A): Promise<void>;
  /**
   * A chunkSize buffer to read the next piece into, when the sink lends
   * them: pass (a view of) it to add and leave it alone after; the sink
   * reuses it once the piece is hashed or written (on this kind of VM,
   * fresh memory costs a page fault per page, more than the read).
   */
  buffer?(): Buffer;
}

/** Where a piece lies in a file a sink is adopting (ChunkSink.adopt's answer): its first block. */
export interface Place<A> {
  adoption: A;
  blkaddr: number;
}

/** A piece of file data: one buffer, or the parts it lies in, in order (views of the source's buffers). */
export type Piece = Buffer | readonly Buffer[];

/** A piece's bytes in one buffer (copied when it has several parts). */
export function pieceBytes(piece: Piece): Buffer {
  return Buffer.isBuffer(piece) ? piece : piece.length === 1 ? piece[0] : Buffer.concat(piece);
}

export function newNode(kind: NodeKind, attrs: Partial<TreeNode> = {}): TreeNode {
  const n: TreeNode = { kind, perm: 0o755, uid: 0, gid: 0, mtimeSec: 0, mtimeNsec: 0, xattrs: new Map(), ...attrs };
  if (kind === 'dir' && !n.children) n.children = new Map();
  if (kind === 'file') {
    n.size ??= 0;
    n.chunks ??= [];
  }
  return n;
}

/** Parts one piece may have before they are joined into one buffer. */
const MAX_PIECE_PARTS = 64;

/**
 * Cuts a stream of file data into chunkSize pieces and hands each to the
 * sink, in order; the stream must hold exactly `size` bytes.
 */
export async function sinkFileData(sink: ChunkSink, data: AsyncIterable<Buffer>, size: number, what: string): Promise<number[]> {
  const out: number[] = [];
  const cs = sink.chunkSize;
  // The parts of the piece being gathered (views, no copies: see ChunkSink), their bytes, and the piece's length.
  let parts: Buffer[] = [];
  let fill = 0;
  let want = 0;
  let total = 0;
  for await (const raw of data) {
    let buf = raw;
    while (buf.length > 0) {
      if (total + buf.length > size) throw new Error(`${what}: more data than its size (${size} bytes)`);
      if (fill === 0) want = Math.min(cs, size - total);
      const take = Math.min(buf.length, want - fill);
      parts.push(buf.subarray(0, take));
      // A source of small buffers (a plain tar through a socket): joined, so one write never needs too many iovecs.
      if (parts.length >= MAX_PIECE_PARTS) parts = [Buffer.concat(parts)];
      buf = buf.subarray(take);
      fill += take;
      total += take;
      if (fill === want) {
        out.push(await sink.add(parts.length === 1 ? parts[0] : parts));
        parts = [];
        fill = 0;
      }
    }
  }
  if (total !== size) throw new Error(`${what}: ${total} bytes of data, its size says ${size}`);
  return out;
}

/** Longest stretch treeFromDirectory keeps the event loop (ms). */
const WALK_SLICE_MS = 10;

/** Files up to this size are read with one synchronous read (page-cached small files: a thread-pool round trip costs more than the read). */
const SYNC_READ_MAX = 256 * 1024;

/** Files from this size on are adopted (see ChunkSink.adopt) where the sink can. */
export const ADOPT_MIN = 32 << 20;

/** Reads a file in chunkSize pieces (one read per piece) into the sink. */
async function sinkFile<A>(sink: ChunkSink<A>, file: string, size: number, adoptMin = ADOPT_MIN): Promise<number[]> {
  if (size <= SYNC_READ_MAX && size <= sink.chunkSize) {
    const buf = Buffer.allocUnsafe(size);
    const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    try {
      let got = 0;
      while (got < size) {
        const n = fs.readSync(fd, buf, got, size - got, got);
        if (n === 0) throw new Error(`${file} shrank while it was read (${got} of ${size} bytes)`);
        got += n;
      }
    } finally {
      fs.closeSync(fd);
    }
    return size === 0 ? [] : [await sink.add(buf)];
  }
  const fh = await fsp.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  const cs = sink.chunkSize;
  /** The piece at `pos`, read into a lent buffer. */
  const readPiece = async (pos: number): Promise<Buffer> => {
    const want = Math.min(cs, size - pos);
    const buf = sink.buffer?.().subarray(0, want) ?? Buffer.allocUnsafe(want);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(buf, got, want - got, pos + got);
      if (bytesRead === 0) throw new Error(`${file} shrank while it was read (${pos + got} of ${size} bytes)`);
      got += bytesRead;
    }
    return buf;
  };
  // One piece read ahead: the thread pool reads the next while this thread
  // hashes and stores the last (a 512 MiB file: ~0.6 s → ~0.45 s here).
  let next: Promise<Buffer> | null = null;
  try {
    // A large file is taken into the store where it lies when the sink can
    // (no copy: see StoreChunkSink.adopt); it is read and hashed all the same.
    const adoption = size >= adoptMin ? (sink.adopt?.(file, fh.fd) ?? null) : null;
    next = readPiece(0);
    const out: number[] = [];
    for (let pos = 0; pos < size; pos += cs) {
      const buf = await (next as Promise<Buffer>);
      next = pos + cs < size ? readPiece(pos + cs) : null;
      // Handled now (awaited above in the next turn, or in finally): a read failing while add waits must not be an unhandled rejection.
      next?.catch(() => undefined);
      out.push(await sink.add(buf, adoption ? { adoption, blkaddr: pos / 4096 } : undefined));
    }
    if (adoption) await (sink.endAdoption as (a: A) => Promise<void>)(adoption);
    return out;
  } finally {
    // A read left in flight by a failure ends before the file is closed (its own error is the lesser one).
    await next?.catch(() => undefined);
    await fh.close();
  }
}

/** A name the walk cannot pass to the xattr calls (they take UTF-8 paths): the caller falls back to mkfs.erofs. */
export class NonUtf8NameError extends Error {
  constructor(readonly where: string) {
    super(`file name is not UTF-8: ${JSON.stringify(where)}`);
    this.name = 'NonUtf8NameError';
  }
}

function kindOf(st: import('node:fs').BigIntStats): NodeKind {
  if (st.isDirectory()) return 'dir';
  if (st.isFile()) return 'file';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isCharacterDevice()) return 'chr';
  if (st.isBlockDevice()) return 'blk';
  if (st.isFIFO()) return 'fifo';
  return 'sock';
}

/**
 * The tree of `dir` (a layer's unpacked directory), its file data handed to
 * the sink in walk order (each directory's entries by name, depth first), so
 * the files of one directory stay together in the store. Hardlinks (same
 * inode, nlink > 1) become one node. Names are taken as raw bytes. Each
 * entry's lstat is also counted into `usage` when given (the layer's
 * usage, measured by this walk rather than by one more). Files of at least
 * `adoptMin` bytes are offered to the sink for adoption.
 */
export async function treeFromDirectory<A>(dir: string, sink: ChunkSink<A>, usage?: UsageCounter, adoptMin = ADOPT_MIN): Promise<TreeNode> {
  const byInode = new Map<string, TreeNode>();
  // Metadata calls are synchronous, in slices of at most WALK_SLICE_MS with
  // the event loop served between them: a page-cached layer directory's
  // lstat, readdir and xattr calls take microseconds, a trip through the
  // thread pool for each costs more than the call (a Debian base layer's
  // 6700 entries: ~0.8 s of walk against ~0.3 s).
  const slice = eventLoopSlices(WALK_SLICE_MS);
  const visit = async (p: string): Promise<TreeNode> => {
    await slice();
    const st = fs.lstatSync(p, { bigint: true });
    usage?.add(st);
    const kind = kindOf(st);
    const inodeKey = `${st.dev}:${st.ino}`;
    if (kind !== 'dir' && st.nlink > 1n) {
      const seen = byInode.get(inodeKey);
      if (seen) return seen;
    }
    const node = newNode(kind, {
      perm: Number(st.mode & 0o7777n),
      uid: Number(st.uid),
      gid: Number(st.gid),
      mtimeSec: Number(st.mtimeNs / 1_000_000_000n),
      mtimeNsec: Number(st.mtimeNs % 1_000_000_000n),
      xattrs: readXattrs(p, { unsupportedIsEmpty: true }),
    });
    if (kind !== 'dir' && st.nlink > 1n) byInode.set(inodeKey, node);
    if (kind === 'file') {
      node.size = Number(st.size);
      node.chunks = await sinkFile(sink, p, node.size, adoptMin);
    } else if (kind === 'symlink') {
      node.target = fs.readlinkSync(p, { encoding: 'buffer' });
    } else if (kind === 'chr' || kind === 'blk') {
      [node.rdevMajor, node.rdevMinor] = devNumbers(st.rdev);
    } else if (kind === 'dir') {
      const names = fs.readdirSync(p, { encoding: 'buffer' }).sort(Buffer.compare);
      const children = node.children as Map<string, TreeNode>;
      for (const name of names) {
        const s = name.toString('utf8');
        if (!Buffer.from(s, 'utf8').equals(name)) throw new NonUtf8NameError(path.join(p, name.toString('latin1')));
        children.set(name.toString('latin1'), await visit(path.join(p, s)));
      }
    }
    return node;
  };
  return visit(dir);
}
