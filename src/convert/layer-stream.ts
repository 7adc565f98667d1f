import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { Readable, type TransformOptions, type Writable } from 'node:stream';
import zlib from 'node:zlib';
import type { StoreChunkSink } from './chunk-sink';
import type { TreeNode } from './layer-tree';
import { treeFromTar } from './tar-tree';

/*
 * A layer blob on its way to the tar reader: decompressed by its magic
 * bytes and hashed as it passes (the hash is the layer's diff id). Shared
 * by the differ's Apply (layers/apply.ts) and the registry fetch of plain
 * layers (layers/plain-fetch.ts).
 */

/** Layer media types read here: OCI and Docker, plain, gzip or zstd (the compression is read from the bytes, as containerd does). */
export const LAYER_MEDIA_TYPES = new Set([
  'application/vnd.oci.image.layer.v1.tar',
  'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.oci.image.layer.v1.tar+zstd',
  'application/vnd.oci.image.layer.nondistributable.v1.tar',
  'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip',
  'application/vnd.oci.image.layer.nondistributable.v1.tar+zstd',
  'application/vnd.docker.image.rootfs.diff.tar',
  'application/vnd.docker.image.rootfs.diff.tar.gzip',
  'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
  'application/vnd.docker.image.rootfs.diff.tar.zstd',
]);

/**
 * Reads layer blob `blob` (gzip, zstd or plain tar; `what` names it in
 * errors) into a layer tree, its file data into `sink`, and hashes the whole
 * decompressed stream, also past the tar's end-of-archive marker (as
 * containerd does): the diff id. On failure the sink's chunks are discarded
 * and the blob closed.
 */
export async function treeFromLayerBlob(
  blob: AsyncIterable<Buffer>,
  what: string,
  sink: StoreChunkSink,
  onWarning: (msg: string) => void,
): Promise<{ root: TreeNode; diffId: string; size: number }> {
  const tar = new HashedStream(decompress(blob[Symbol.asyncIterator](), what));
  try {
    const { root } = await treeFromTar(tar, sink, { onWarning });
    await tar.drain();
    return { root, diffId: `sha256:${tar.hex()}`, size: tar.bytes };
  } catch (err) {
    await sink.discard();
    await tar.close();
    (blob as { destroy?: () => void }).destroy?.();
    throw err;
  }
}

/**
 * Passes a stream through, hashing and counting it; its iterator's return()
 * (a reader stopping at the end-of-archive marker) does not close the source,
 * so `drain` can read the rest.
 */
class HashedStream implements AsyncIterable<Buffer> {
  private readonly hash = crypto.createHash('sha256');
  bytes = 0;
  private digest: string | null = null;

  constructor(private readonly src: AsyncIterator<Buffer>) {}

  private async next(): Promise<IteratorResult<Buffer>> {
    const r = await this.src.next();
    if (!r.done) {
      this.hash.update(r.value);
      this.bytes += r.value.length;
    }
    return r;
  }

  [Symbol.asyncIterator](): AsyncIterator<Buffer> {
    return { next: () => this.next(), return: async () => ({ done: true, value: undefined }) };
  }

  async drain(): Promise<void> {
    for (;;) if ((await this.next()).done) return;
  }

  async close(): Promise<void> {
    await this.src.return?.().catch(() => undefined);
  }

  hex(): string {
    this.digest ??= this.hash.digest('hex');
    return this.digest;
  }
}

/** Decompressed bytes gunzip may hold ahead of the reader. */
const GUNZIP_AHEAD = 8 << 20;

const GZIP_MAGIC = Buffer.from([0x1f, 0x8b]);
const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);

/** Decompresses a layer blob by its magic bytes (gzip, zstd through the `zstd` program, else plain tar). */
async function* decompress(src: AsyncIterator<Buffer>, what: string): AsyncGenerator<Buffer> {
  const head: Buffer[] = [];
  let have = 0;
  let ended = false;
  while (have < 4) {
    const r = await src.next();
    if (r.done) {
      ended = true;
      break;
    }
    head.push(r.value);
    have += r.value.length;
  }
  const first = Buffer.concat(head);
  async function* rest(): AsyncGenerator<Buffer> {
    if (first.length > 0) yield first;
    if (ended) return;
    for (;;) {
      const r = await src.next();
      if (r.done) return;
      yield r.value;
    }
  }
  if (first.subarray(0, 2).equals(GZIP_MAGIC)) {
    // 1 MiB outputs (the default is 16 KiB): fewer, larger pieces through the tar reader and the hashes. zlib
    // inflates on the thread pool while its output is below the stream's high-water mark: at 8 MiB it runs
    // ahead of the tar reader instead of taking turns with it (zlib hands its options on to the Transform stream).
    const options: zlib.ZlibOptions & TransformOptions = { chunkSize: 1 << 20, readableHighWaterMark: GUNZIP_AHEAD };
    const gunzip = zlib.createGunzip(options);
    // Its input gathered too: a socket delivers 64 KiB at a time, and each write is one trip to the thread pool.
    feedGathered(rest(), gunzip).catch((err: Error) => gunzip.destroy(err));
    yield* gunzip as AsyncIterable<Buffer>;
    return;
  }
  if (first.subarray(0, 4).equals(ZSTD_MAGIC)) {
    yield* zstdDecompress(rest(), what);
    return;
  }
  yield* rest();
}

/** Pieces a stream is gathered into for zlib and the tar reader (a socket or a pipe delivers 64 KiB at a time). */
const PIECE = 1 << 20;

/** Input buffers feedGathered fills in turn. */
const FEED_BUFFERS = 3;

/**
 * Writes `src` into `dest` (zlib) in pieces of PIECE bytes, then ends it. A
 * small piece (a socket's 64 KiB) is copied into one of a few buffers used
 * in turn: a buffer is filled again only once zlib has consumed it (its
 * write callback), so the gathered input is not memory allocated afresh
 * for every MiB (on this kind of VM, first touches of fresh memory and the
 * garbage collection they bring cost more than the copy). A piece of PIECE
 * bytes or more, with nothing gathered before it, is written as it is.
 * Rejects with the first error of the source or of a write (the caller
 * destroys `dest` with it).
 */
async function feedGathered(src: AsyncIterable<Buffer>, dest: Writable): Promise<void> {
  const free: Buffer[] = [];
  let made = 0;
  let wake: (() => void) | null = null;
  let failed: Error | null = null;
  const done = (pooled: Buffer | null) => (err?: Error | null) => {
    if (err) failed ??= err;
    if (pooled) free.push(pooled);
    const w = wake;
    wake = null;
    w?.();
  };
  const take = async (): Promise<Buffer> => {
    for (;;) {
      if (failed) throw failed;
      const b = free.pop();
      if (b) return b;
      if (made < FEED_BUFFERS) {
        made++;
        return Buffer.allocUnsafeSlow(PIECE);
      }
      await new Promise<void>((resolve) => (wake = resolve));
    }
  };
  let cur: Buffer | null = null;
  let used = 0;
  for await (const piece of src) {
    if (failed) throw failed;
    if (used === 0 && piece.length >= PIECE) {
      // Not pooled: held back by zlib's high-water mark instead.
      if (!dest.write(piece, done(null))) await drained(dest);
      continue;
    }
    let off = 0;
    while (off < piece.length) {
      cur ??= await take();
      const n = piece.copy(cur, used, off);
      used += n;
      off += n;
      if (used === cur.length) {
        dest.write(cur.subarray(0, used), done(cur));
        cur = null;
        used = 0;
      }
    }
  }
  if (cur && used > 0) dest.write(cur.subarray(0, used), done(cur));
  if (failed) throw failed;
  dest.end();
}

/** Resolves once `w` drains, or is closed or fails (a failure is thrown by the writes' callbacks). */
function drained(w: Writable): Promise<void> {
  return new Promise<void>((resolve) => {
    const settle = () => {
      w.off('drain', settle);
      w.off('close', settle);
      w.off('error', settle);
      resolve();
    };
    w.on('drain', settle);
    w.on('close', settle);
    w.on('error', settle);
  });
}

/** `src` in pieces of at least `size` bytes (the last may be shorter); a piece that is big enough passes as it is. */
async function* gather(src: AsyncIterable<Buffer>, size: number): AsyncGenerator<Buffer> {
  let parts: Buffer[] = [];
  let have = 0;
  for await (const piece of src) {
    parts.push(piece);
    have += piece.length;
    if (have >= size) {
      yield parts.length === 1 ? parts[0] : Buffer.concat(parts, have);
      parts = [];
      have = 0;
    }
  }
  if (have > 0) yield parts.length === 1 ? parts[0] : Buffer.concat(parts, have);
}

/** Decompresses `input` through the `zstd` program: its stdout, in pieces of at least 1 MiB; an error names the layer when it fails. */
async function* zstdDecompress(input: AsyncIterable<Buffer>, what: string): AsyncGenerator<Buffer> {
  const child = spawn('zstd', ['-d', '-c', '-q'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.on('error', (err: NodeJS.ErrnoException) => reject(err.code === 'ENOENT' ? new Error(`layer ${what} is zstd-compressed and the zstd program is not installed (apt install zstd)`) : err));
    child.on('close', (code) => resolve(code));
  });
  exited.catch(() => undefined);
  const feeding = Readable.from(input);
  feeding.on('error', (err) => child.stdin.destroy(err));
  child.stdin.on('error', () => undefined);
  feeding.pipe(child.stdin);
  try {
    yield* gather(child.stdout as AsyncIterable<Buffer>, PIECE);
    const code = await exited;
    if (code !== 0) throw new Error(`zstd could not decompress layer ${what}: ${stderr.trim() || `exit code ${code}`}`);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    feeding.destroy();
  }
}
