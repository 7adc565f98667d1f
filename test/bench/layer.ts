/**
 * Turns a directory into an OCI layer (gzip'd tar), streaming, with the
 * digests computed on the way and per-file content hashes for the
 * "theoretical floor" (unique file data) of the benchmark.
 *
 * For an overlay upper dir (`upper: true`) overlay's own markers become the
 * OCI ones: a whiteout (char device 0/0) is written as `.wh.<name>`, a
 * directory with `trusted.overlay.opaque=y` gets a `.wh..wh..opq` entry.
 * `trusted.*` xattrs are never written; `security.capability` and `user.*`
 * are, when tar-stream can write their value exactly (bytes < 0x80).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import * as tar from 'tar-stream';
import { deviceNumbers } from '../helpers/fstest';
import { type TarHeader, isPlainAscii, packEntry } from '../helpers/images';
import { getXattr, readXattrs } from '../../native/xattr';

export interface LayerInfo {
  /** File name of the gzip blob (its hex digest) inside the blob dir. */
  digest: string;
  diffId: string;
  /** Size of the gzip blob. */
  size: number;
  /** Regular-file bytes of the layer, each inode once (hardlinks once). */
  logicalBytes: number;
  files: number;
  whiteouts: number;
  opaques: number;
  /** Xattrs that could not be represented and were dropped (name → count). */
  droppedXattrs: Record<string, number>;
  /** sha256 of each distinct regular-file content in the layer → size. */
  contents: Record<string, number>;
}

const MTIME_FALLBACK = new Date('2024-01-02T03:04:05Z');

class HashTap extends Transform {
  readonly hash = crypto.createHash('sha256');
  bytes = 0;
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null, data?: Buffer) => void): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    cb(null, chunk);
  }
}


export interface LayerOptions {
  /** The directory is an overlay upper dir: convert whiteouts and opaque dirs. */
  upper?: boolean;
  /** Relative paths whose contents (not the directory itself) are left out, e.g. "dev", "proc". */
  emptyDirs?: string[];
}

/** Writes `dir` as a gzip'd layer tar into `blobDir/<hex digest>`; returns its description. */
export async function dirToLayer(dir: string, blobDir: string, opts: LayerOptions = {}): Promise<LayerInfo> {
  fs.mkdirSync(blobDir, { recursive: true });
  const tmp = path.join(blobDir, `.tmp-${process.pid}-${Date.now()}`);
  const pack = tar.pack();
  const tarTap = new HashTap();
  const gzTap = new HashTap();
  const info: LayerInfo = { digest: '', diffId: '', size: 0, logicalBytes: 0, files: 0, whiteouts: 0, opaques: 0, droppedXattrs: {}, contents: {} };
  const inodes = new Map<string, string>(); // dev:ino → first path (for hardlinks)
  const empty = new Set(opts.emptyDirs ?? []);

  const add = (header: TarHeader, body?: Buffer) => packEntry(pack, header, body);
  const needPax = (name: string, link?: string) =>
    Buffer.byteLength(name) > 100 || !isPlainAscii(name) || (link !== undefined && (Buffer.byteLength(link) > 100 || !isPlainAscii(link)));

  const xattrPax = (abs: string): Record<string, string> => {
    const pax: Record<string, string> = {};
    let xs: Map<string, Buffer>;
    try {
      xs = readXattrs(abs, { unsupportedIsEmpty: true });
    } catch {
      return pax;
    }
    for (const [k, v] of xs) {
      if (k.startsWith('trusted.')) continue;
      if (!(k.startsWith('user.') || k === 'security.capability')) {
        info.droppedXattrs[k] = (info.droppedXattrs[k] ?? 0) + 1;
        continue;
      }
      if (v.some((b) => b >= 0x80)) {
        info.droppedXattrs[k] = (info.droppedXattrs[k] ?? 0) + 1;
        continue;
      }
      pax[`SCHILY.xattr.${k}`] = v.toString('latin1');
    }
    return pax;
  };

  const addFile = (header: TarHeader, abs: string): Promise<string> =>
    new Promise((resolve, reject) => {
      const h = crypto.createHash('sha256');
      const w = pack.entry(header, (err) => (err ? reject(err) : resolve(h.digest('hex'))));
      const r = fs.createReadStream(abs, { highWaterMark: 1 << 20 });
      r.on('data', (c) => h.update(c));
      r.on('error', reject);
      r.pipe(w);
    });

  const walk = async (rel: string): Promise<void> => {
    const absDir = rel === '' ? dir : path.join(dir, rel);
    const names = fs.readdirSync(absDir).sort();
    for (const name of names) {
      const relPath = rel === '' ? name : `${rel}/${name}`;
      const abs = path.join(absDir, name);
      const st = fs.lstatSync(abs);
      const mtime = st.mtime.getTime() > 0 ? st.mtime : MTIME_FALLBACK;
      const base: TarHeader = { name: relPath, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtime };
      if (opts.upper && st.isCharacterDevice() && st.rdev === 0) {
        const wh = rel === '' ? `.wh.${name}` : `${rel}/.wh.${name}`;
        const h: TarHeader = { name: wh, type: 'file', mode: 0o644, uid: 0, gid: 0, mtime, size: 0 };
        if (needPax(wh)) h.pax = {};
        await add(h, Buffer.alloc(0));
        info.whiteouts++;
        continue;
      }
      const pax = xattrPax(abs);
      let body: Buffer | undefined;
      if (st.isDirectory()) {
        base.type = 'directory';
      } else if (st.isSymbolicLink()) {
        base.type = 'symlink';
        base.linkname = fs.readlinkSync(abs);
      } else if (st.isFile()) {
        const ino = `${st.dev}:${st.ino}`;
        const first = st.nlink > 1 ? inodes.get(ino) : undefined;
        if (first !== undefined) {
          base.type = 'link';
          base.linkname = first;
          base.size = 0;
        } else {
          if (st.nlink > 1) inodes.set(ino, relPath);
          base.type = 'file';
          base.size = st.size;
        }
      } else if (st.isFIFO()) {
        base.type = 'fifo';
      } else if (st.isCharacterDevice() || st.isBlockDevice()) {
        base.type = st.isCharacterDevice() ? 'character-device' : 'block-device';
        [base.devmajor, base.devminor] = deviceNumbers(BigInt(st.rdev));
      } else {
        continue; // sockets: not part of an image
      }
      if (Object.keys(pax).length > 0 || needPax(relPath, base.linkname)) base.pax = pax;
      if (base.type === 'file' && (base.size ?? 0) > 0) {
        const digest = await addFile(base, abs);
        info.contents[digest] = st.size;
        info.logicalBytes += st.size;
        info.files++;
      } else {
        if (base.type === 'file') {
          body = Buffer.alloc(0);
          info.files++;
          info.contents[crypto.createHash('sha256').digest('hex')] = 0;
        }
        await add(base, body);
      }
      if (st.isDirectory()) {
        if (opts.upper && getXattr(abs, 'trusted.overlay.opaque')?.toString() === 'y') {
          const opq = `${relPath}/.wh..wh..opq`;
          const h: TarHeader = { name: opq, type: 'file', mode: 0o644, uid: 0, gid: 0, mtime, size: 0 };
          if (needPax(opq)) h.pax = {};
          await add(h, Buffer.alloc(0));
          info.opaques++;
        }
        if (!empty.has(relPath)) await walk(relPath);
      }
    }
  };

  const producing = (async () => {
    await walk('');
    pack.finalize();
  })();
  const writing = pipeline(pack, tarTap, zlib.createGzip({ level: 6 }), gzTap, fs.createWriteStream(tmp));
  try {
    await Promise.all([producing, writing]);
  } catch (err) {
    pack.destroy();
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  info.diffId = `sha256:${tarTap.hash.digest('hex')}`;
  const hex = gzTap.hash.digest('hex');
  info.digest = `sha256:${hex}`;
  info.size = gzTap.bytes;
  fs.renameSync(tmp, path.join(blobDir, hex));
  return info;
}
