import fsp from 'node:fs/promises';
import path from 'node:path';
import { readXattrs } from '../../native/xattr';
import { OPAQUE_XATTR, WHITEOUT_OPAQUE, WHITEOUT_PREFIX } from '../convert/layer-rules';
import { END_OF_ARCHIVE, type TarEntry, padding, tarHeader } from '../convert/tar-writer';
import { notImplemented } from '../errdefs/errors';
import { devNumbers } from '../util/fs';

/*
 * The changes of an overlay snapshot as a layer tar, read from its upper
 * directory, as containerd's differ writes them for an overlay upper: each
 * entry of the upper directory (sorted by name, depth first, a directory
 * before what it holds), a whiteout device (char 0/0) as `.wh.<name>`, an
 * opaque directory (trusted.overlay.opaque=y) followed by its
 * `.wh..wh..opq`, hardlinks after their first path, extended attributes
 * as PAX records (overlay's own trusted.overlay.* left out). An upper
 * directory that needs overlay's lower layers to be read (redirect_dir,
 * metacopy) is refused with NotImplemented: the walking differ, which
 * compares the two mounted trees, takes it.
 */

const PIECE = 1 << 20;
const OVERLAY_XATTR_PREFIX = 'trusted.overlay.';

/** The upper directory `upper` as a layer tar, in pieces. */
export async function* upperDirTar(upper: string): AsyncGenerator<Buffer> {
  const firstPath = new Map<string, Buffer>();
  async function* visit(dir: string, rel: Buffer | null): AsyncGenerator<Buffer> {
    const names = (await fsp.readdir(dir, { encoding: 'buffer' })).sort(Buffer.compare);
    for (const raw of names) {
      const name = rel ? Buffer.concat([rel, Buffer.from('/'), raw]) : raw;
      const full = path.join(dir, checkedUtf8(raw, name));
      const st = await fsp.lstat(full, { bigint: true });
      const xattrs = readXattrs(full, { unsupportedIsEmpty: true });
      refuseLowerAttrs(xattrs, name);
      const kept = new Map([...xattrs].filter(([k]) => !k.startsWith(OVERLAY_XATTR_PREFIX)));
      const base: Omit<TarEntry, 'name' | 'type' | 'size'> = {
        mode: Number(st.mode & 0o7777n),
        uid: Number(st.uid),
        gid: Number(st.gid),
        mtimeSec: Number(st.mtimeNs / 1_000_000_000n),
        mtimeNsec: Number(st.mtimeNs % 1_000_000_000n),
        xattrs: kept,
      };
      if (st.isCharacterDevice() && st.rdev === 0n) {
        // A whiteout: the name is deleted in this layer.
        const wh = rel ? Buffer.concat([rel, Buffer.from(`/${WHITEOUT_PREFIX}`), raw]) : Buffer.concat([Buffer.from(WHITEOUT_PREFIX), raw]);
        yield tarHeader({ ...base, name: wh, type: 'file', size: 0, mode: 0, xattrs: undefined });
        continue;
      }
      if (st.isDirectory()) {
        yield tarHeader({ ...base, name, type: 'dir', size: 0 });
        if (xattrs.get(OPAQUE_XATTR)?.toString() === 'y') {
          yield tarHeader({ ...base, name: Buffer.concat([name, Buffer.from(`/${WHITEOUT_OPAQUE}`)]), type: 'file', size: 0, mode: 0, xattrs: undefined });
        }
        yield* visit(full, name);
        continue;
      }
      const inode = `${st.dev}:${st.ino}`;
      if (!st.isDirectory() && st.nlink > 1n) {
        const first = firstPath.get(inode);
        if (first) {
          yield tarHeader({ ...base, name, type: 'hardlink', size: 0, linkname: first });
          continue;
        }
        firstPath.set(inode, name);
      }
      if (st.isFile()) {
        const size = Number(st.size);
        yield tarHeader({ ...base, name, type: 'file', size });
        yield* fileData(full, size);
        const pad = padding(size);
        if (pad > 0) yield Buffer.alloc(pad);
      } else if (st.isSymbolicLink()) {
        yield tarHeader({ ...base, name, type: 'symlink', size: 0, linkname: await fsp.readlink(full, { encoding: 'buffer' }) });
      } else if (st.isCharacterDevice() || st.isBlockDevice()) {
        const [devmajor, devminor] = devNumbers(st.rdev);
        yield tarHeader({ ...base, name, type: st.isCharacterDevice() ? 'chr' : 'blk', size: 0, devmajor, devminor });
      } else if (st.isFIFO()) {
        yield tarHeader({ ...base, name, type: 'fifo', size: 0 });
      }
      // Sockets have no tar form (containerd skips them too).
    }
  }
  yield* visit(upper, null);
  yield END_OF_ARCHIVE;
}

/**
 * Throws NotImplemented when upper directory `upper` cannot be written here
 * (overlay's redirect or metacopy attributes, a name that is not UTF-8), before
 * anything is streamed (a refusal midway would leave containerd an aborted upload).
 */
export async function checkUpperDir(upper: string): Promise<void> {
  const visit = async (dir: string, rel: Buffer | null): Promise<void> => {
    for (const raw of await fsp.readdir(dir, { encoding: 'buffer' })) {
      const name = rel ? Buffer.concat([rel, Buffer.from('/'), raw]) : raw;
      const full = path.join(dir, checkedUtf8(raw, name));
      refuseLowerAttrs(readXattrs(full, { unsupportedIsEmpty: true }), name);
      if ((await fsp.lstat(full)).isDirectory()) await visit(full, name);
    }
  };
  await visit(upper, null);
}

/** Overlay attributes that make an upper entry depend on the lower layers. */
function refuseLowerAttrs(xattrs: ReadonlyMap<string, Buffer>, name: Buffer): void {
  for (const k of ['trusted.overlay.redirect', 'trusted.overlay.metacopy']) {
    if (xattrs.has(k)) throw notImplemented(`${name.toString('utf8')} has ${k}: its changes need the lower layers (redirect_dir or metacopy)`);
  }
}

/** A name that is not UTF-8 cannot be passed to the xattr calls: the walking differ takes such a layer. */
function checkedUtf8(raw: Buffer, name: Buffer): string {
  const s = raw.toString('utf8');
  if (!Buffer.from(s, 'utf8').equals(raw)) throw notImplemented(`file name is not UTF-8: ${JSON.stringify(name.toString('latin1'))}`);
  return s;
}

/** Exactly `size` bytes of file `full` (a file that changed size while read is an error). */
async function* fileData(full: string, size: number): AsyncGenerator<Buffer> {
  const fh = await fsp.open(full, 'r');
  try {
    for (let pos = 0; pos < size; ) {
      const buf = Buffer.allocUnsafe(Math.min(PIECE, size - pos));
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) throw new Error(`${full} shrank while it was read (${pos} of ${size} bytes)`);
      pos += bytesRead;
      yield bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
    }
  } finally {
    await fh.close();
  }
}
