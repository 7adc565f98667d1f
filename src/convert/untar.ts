/**
 * Applies one OCI layer tar to an empty directory the way containerd 1.6
 * applies a layer onto an overlay snapshot: straight into the upper dir, with
 * overlay-style whiteouts (`.wh.<name>` becomes a char device 0/0 named
 * `<name>`, `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its
 * directory). The result is what containerd's overlayfs snapshotter keeps as
 * `snapshots/<n>/fs` for that layer, so it can be turned into an EROFS layer
 * without containerd. The order of operations per entry follows containerd's
 * archive.applyNaive and createTarFile (archive/tar.go, tar_unix.go): parent
 * directories, whiteout conversion, removal of what the entry replaces,
 * creation, lchown, xattrs, chmod, times; directory times last.
 *
 * Entry names are untrusted. Where containerd bounds them to the directory
 * (`..` and absolute names, symlinks resolved inside the directory), this
 * refuses them instead: a name that is absolute or climbs out with `..`, and
 * a write whose parent is a symlink an earlier entry created, fail the apply
 * with an error naming the entry. Nothing is ever written outside `dir`.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { Readable, pipeline } from 'node:stream';
import zlib from 'node:zlib';
import { S_IFBLK, S_IFCHR, S_IFIFO, mknod } from '../../native/mknod';
import { XATTR_CREATE, XattrError, getXattr, listXattrs, setXattr } from '../../native/xattr';
import { messageOf } from '../errdefs/errors';
import { lstatOrNull } from '../util/fs';
import {
  LayerTarError,
  OPAQUE_XATTR,
  archiveXattrs,
  checkEntryType,
  cleanName,
  dirTimesError,
  applyEntries,
  entryTimes,
  goJoin,
  invalid,
  kindLabel,
  q,
  resolveInRoot,
  whiteoutOf,
  xattrIgnored,
} from './layer-rules';
import { type TarHeader, TarReader, TYPE } from './tar-reader';

export { LayerTarError } from './layer-rules';

export interface ApplyLayerOptions {
  /** `auto` (default) reads gzip by its magic bytes and plain tar otherwise. */
  compression?: 'auto' | 'gzip' | 'none';
  /**
   * The directories of the layers below, topmost first (containerd's
   * overlay lowerdirs). A parent directory the tar does not list is then
   * created with the owner, mode, times and (non-trusted) xattrs of the
   * first lower layer that has it, as containerd does; without it, or if no
   * lower layer has it, it is created 0755 root:root. Only read.
   */
  parents?: string[];
  /**
   * false: files keep the unpacking user as owner (containerd's
   * archive.WithNoSameOwner, for unprivileged unpacking); default true:
   * the archive's owners.
   */
  sameOwner?: boolean;
  /**
   * What containerd logs as a warning and skips: an xattr it will not set
   * (`trusted.*` from the archive) or the file system refuses (ENOTSUP,
   * `user.*` on a symlink or device).
   */
  onWarning?: (message: string) => void;
}

export interface ApplyLayerResult {
  /**
   * Entries applied: every file, directory, link, device, fifo, whiteout and
   * opaque marker (not the root entry, not PAX global headers).
   */
  files: number;
  /** Bytes of regular file data written. */
  bytes: number;
}

const O_NOFOLLOW = fs.constants.O_NOFOLLOW;

function kindName(st: fs.Stats): string {
  if (st.isFile()) return kindLabel('file', false);
  if (st.isDirectory()) return kindLabel('dir', false);
  if (st.isSymbolicLink()) return kindLabel('symlink', false);
  if (st.isCharacterDevice()) return kindLabel('chr', st.rdev === 0);
  if (st.isBlockDevice()) return kindLabel('blk', false);
  if (st.isFIFO()) return kindLabel('fifo', false);
  return kindLabel('sock', false);
}

/**
 * continuity's fs.RootPath: joins `p` to `root`, resolving symlinks met on
 * the way as if `root` were `/`, so the result is always inside `root`.
 * Used to read lower layers (`parents`) and for directory times.
 */
function rootPath(root: string, p: string): string {
  if (p === '') return root;
  const linkAt = (rel: string): string | null => {
    const real = goJoin(root, rel);
    const st = lstatOrNull(real);
    return st?.isSymbolicLink() ? fs.readlinkSync(real) : null;
  };
  return goJoin(root, resolveInRoot(p, linkAt, root));
}

// ---- decompression ----

type Magic = 'gzip' | 'zstd' | 'xz' | 'bzip2' | 'none';

function magicOf(head: Buffer): Magic {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) return 'gzip';
  if (head.length >= 4 && head.readUInt32BE(0) === 0x28b52ffd) return 'zstd';
  if (head.length >= 6 && head.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) return 'xz';
  if (head.length >= 10 && /^BZh[1-9]1AY&SY$/.test(head.subarray(0, 10).toString('latin1'))) return 'bzip2';
  return 'none';
}

function toBuffer(v: unknown): Buffer {
  if (Buffer.isBuffer(v)) return v;
  if (typeof v === 'string') return Buffer.from(v);
  return Buffer.from(v as Uint8Array);
}

/** The uncompressed tar stream of `input`, per `compression`. */
async function openLayer(input: Readable, compression: 'auto' | 'gzip' | 'none'): Promise<AsyncIterable<Buffer>> {
  const it = input[Symbol.asyncIterator]() as AsyncIterator<unknown>;
  const head: Buffer[] = [];
  let have = 0;
  let ended = false;
  try {
    while (have < 10) {
      const r = await it.next();
      if (r.done) {
        ended = true;
        break;
      }
      const b = toBuffer(r.value);
      head.push(b);
      have += b.length;
    }
  } catch (err) {
    throw new LayerTarError('Internal', `reading the layer blob: ${messageOf(err)}`, undefined, err);
  }
  const magic = magicOf(Buffer.concat(head));
  const refuse = async (msg: string): Promise<never> => {
    if (!ended) await it.return?.();
    throw new LayerTarError('InvalidArgument', msg);
  };
  if (magic === 'zstd' || magic === 'xz' || magic === 'bzip2') {
    await refuse(`the layer is ${magic}-compressed (magic bytes ${Buffer.concat(head).subarray(0, 4).toString('hex')}): ${magic} layers are not supported, only gzip and uncompressed tar`);
  }
  if (compression === 'gzip' && magic !== 'gzip') await refuse('compression "gzip" was given but the layer does not start with the gzip magic bytes 1f 8b');
  if (compression === 'none' && magic === 'gzip') await refuse('compression "none" was given but the layer is gzip-compressed (magic bytes 1f 8b)');

  async function* all(): AsyncGenerator<Buffer> {
    let finished = ended;
    try {
      yield* head;
      while (!finished) {
        const r = await it.next();
        if (r.done) finished = true;
        else yield toBuffer(r.value);
      }
    } finally {
      if (!finished) await it.return?.();
    }
  }
  if (magic !== 'gzip' || compression === 'none') return all();
  const gunzip = zlib.createGunzip({ chunkSize: 64 * 1024 });
  pipeline(Readable.from(all()), gunzip, () => undefined);
  return gunzip;
}

// ---- the applier ----

interface DirTimes {
  /** The entry's name as stored. */
  name: string;
  rel: string[];
  atime: number;
  mtime: number;
}

class Applier {
  files = 0;
  bytes = 0;
  /** Relative paths (joined by '/') checked to be real directories since the last removal under them. */
  private readonly dirs = new Set<string>();
  private readonly dirTimes: DirTimes[] = [];

  constructor(
    private readonly root: string,
    private readonly opts: ApplyLayerOptions,
  ) {}

  private abs(comps: string[]): string {
    return comps.length === 0 ? this.root : `${this.root}/${comps.join('/')}`;
  }

  private warn(msg: string): void {
    this.opts.onWarning?.(msg);
  }

  /** Forgets checked directories at or under `comps` (after removing it). */
  private forget(comps: string[]): void {
    const key = comps.join('/');
    for (const d of this.dirs) if (d === key || d.startsWith(`${key}/`)) this.dirs.delete(d);
  }

  /** rm -rf of what is at `comps` (never follows a symlink). */
  private remove(comps: string[], st: fs.Stats): void {
    fs.rmSync(this.abs(comps), { recursive: true, force: true });
    if (st.isDirectory()) this.forget(comps);
  }

  /**
   * containerd's mkparent: every ancestor of an entry must be a directory;
   * a missing one is created (0755 root:root, or copied from a lower
   * layer). An ancestor that is a symlink or another non-directory fails the
   * entry: a later entry never writes through a symlink an earlier one made.
   */
  private ensureParents(comps: string[]): void {
    for (let i = 1; i < comps.length; i++) {
      const parent = comps.slice(0, i);
      const key = parent.join('/');
      if (this.dirs.has(key)) continue;
      const p = this.abs(parent);
      const st = lstatOrNull(p);
      if (!st) this.mkparent(parent);
      else if (st.isSymbolicLink()) {
        throw invalid(`parent ${q(key)} is a symlink (-> ${q(fs.readlinkSync(p))}) made by an earlier entry: refusing to write through it`);
      } else if (!st.isDirectory()) {
        throw invalid(`parent ${q(key)} is not a directory (an earlier entry made it a ${kindName(st)})`);
      }
      this.dirs.add(key);
    }
  }

  /** Checks, without creating anything, that every ancestor of `comps` is a real directory. */
  private parentsAreDirs(comps: string[]): 'ok' | 'missing' | string {
    for (let i = 1; i < comps.length; i++) {
      const parent = comps.slice(0, i);
      if (this.dirs.has(parent.join('/'))) continue;
      const st = lstatOrNull(this.abs(parent));
      if (!st) return 'missing';
      if (!st.isDirectory()) return `${q(parent.join('/'))} is a ${kindName(st)}`;
    }
    return 'ok';
  }

  private chown(p: string, uid: number, gid: number): void {
    if (this.opts.sameOwner !== false) fs.lchownSync(p, uid, gid);
  }

  private mkparent(parent: string[]): void {
    const p = this.abs(parent);
    fs.mkdirSync(p, 0o755);
    fs.chmodSync(p, 0o755);
    for (const lower of this.opts.parents ?? []) {
      const lp = rootPath(lower, `/${parent.join('/')}`);
      const st = lstatOrNull(lp);
      if (!st) continue;
      // A lower layer replaced the directory: keep the defaults.
      if (!st.isDirectory()) return;
      this.chown(p, st.uid, st.gid);
      fs.chmodSync(p, st.mode & 0o7777);
      fs.lutimesSync(p, st.atime, st.mtime);
      this.copyUpXattrs(p, lp);
      return;
    }
  }

  /** containerd's copyUpXAttrs: every xattr but trusted.*, never replacing one. */
  private copyUpXattrs(dst: string, src: string): void {
    let names: string[];
    try {
      names = listXattrs(src);
    } catch (err) {
      if (err instanceof XattrError && (err.code === 'ENOTSUP' || err.code === 'EOPNOTSUPP' || err.code === 'ENODATA')) return;
      throw err;
    }
    for (const name of names) {
      if (name.startsWith('trusted.')) continue;
      const v = getXattr(src, name);
      if (v === null) continue;
      try {
        setXattr(dst, name, v, XATTR_CREATE);
      } catch (err) {
        if (err instanceof XattrError && ['ENOTSUP', 'EOPNOTSUPP', 'ENODATA', 'EEXIST'].includes(err.code)) continue;
        throw err;
      }
    }
  }

  async apply(h: TarHeader, reader: TarReader): Promise<void> {
    const comps = cleanName(h.name, 'entry name');
    // containerd ignores an entry for the root itself ("./").
    if (comps.length === 0) return;
    const t = h.typeflag;
    checkEntryType(t);
    this.ensureParents(comps);

    const base = comps[comps.length - 1];
    const parent = comps.slice(0, -1);
    const whiteout = whiteoutOf(base);
    if (whiteout?.opaque) {
      setXattr(this.abs(parent), OPAQUE_XATTR, 'y');
      this.files++;
      return;
    }
    if (whiteout) {
      const target = [...parent, whiteout.name];
      const st = lstatOrNull(this.abs(target));
      if (st) this.remove(target, st);
      mknod(this.abs(target), S_IFCHR, 0, 0);
      this.chown(this.abs(target), h.uid, h.gid);
      this.files++;
      return;
    }

    const p = this.abs(comps);
    let linkTarget: string[] | null = null;
    if (t === TYPE.link) linkTarget = this.hardlinkTarget(h, comps);
    const existing = lstatOrNull(p);
    if (existing && !(existing.isDirectory() && t === TYPE.dir)) this.remove(comps, existing);

    const perm = h.mode & 0o7777;
    switch (t) {
      case TYPE.dir:
        if (!existing?.isDirectory()) {
          fs.mkdirSync(p, perm);
          fs.chmodSync(p, perm);
        }
        break;
      case TYPE.reg:
        await this.writeFile(p, perm, reader);
        break;
      case TYPE.link: {
        const target = linkTarget as string[];
        if (!lstatOrNull(this.abs(target))) {
          throw invalid(`hardlink to ${q(h.linkname)}: the target was removed by this entry (it replaces a directory holding it)`);
        }
        fs.linkSync(this.abs(target), p);
        break;
      }
      case TYPE.symlink:
        fs.symlinkSync(h.linkname, p);
        break;
      case TYPE.char:
      case TYPE.block:
      case TYPE.fifo:
        mknod(p, (t === TYPE.char ? S_IFCHR : t === TYPE.block ? S_IFBLK : S_IFIFO) | perm, h.devmajor, h.devminor);
        break;
    }

    // chown clears set-id bits and file capabilities: xattrs and mode come after it.
    this.chown(p, h.uid, h.gid);
    this.setXattrs(h, p);
    // containerd's lchmod: no chmod of a symlink (a hardlink to one is one).
    if (t !== TYPE.symlink && !(t === TYPE.link && fs.lstatSync(p).isSymbolicLink())) fs.chmodSync(p, perm);
    const times = entryTimes(h);
    fs.lutimesSync(p, times.atime, times.mtime);
    if (t === TYPE.dir) {
      this.dirs.add(comps.join('/'));
      this.dirTimes.push({ name: h.name, rel: comps, ...times });
    }
    this.files++;
  }

  /** The target of a hardlink entry: an existing non-directory of this layer, reached through real directories. */
  private hardlinkTarget(h: TarHeader, comps: string[]): string[] {
    const target = cleanName(h.linkname, 'hardlink target');
    if (target.length === 0) throw invalid(`hardlink to ${q(h.linkname)}: the target is the layer root`);
    if (target.join('/') === comps.join('/')) throw invalid(`hardlink to ${q(h.linkname)}: the target is the entry itself`);
    const parents = this.parentsAreDirs(target);
    const st = parents === 'ok' ? lstatOrNull(this.abs(target)) : null;
    if (parents !== 'ok' && parents !== 'missing') {
      throw invalid(`hardlink to ${q(h.linkname)}: the target's path goes through ${parents}, not a directory: refusing`);
    }
    if (!st) throw invalid(`hardlink to ${q(h.linkname)}: the target does not exist (a hardlink must name an earlier entry of the same layer)`);
    if (st.isDirectory()) throw invalid(`hardlink to ${q(h.linkname)}: the target is a directory`);
    return target;
  }

  private async writeFile(p: string, perm: number, reader: TarReader): Promise<void> {
    const fh = await fsp.open(p, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | O_NOFOLLOW, perm);
    try {
      for await (const chunk of reader.data()) {
        let off = 0;
        while (off < chunk.length) {
          const { bytesWritten } = await fh.write(chunk, off, chunk.length - off);
          off += bytesWritten;
        }
        this.bytes += chunk.length;
      }
    } finally {
      await fh.close();
    }
  }

  /** SCHILY.xattr.* records, skipping what containerd 1.6 skips (with a warning). */
  private setXattrs(h: TarHeader, p: string): void {
    for (const [name, value] of archiveXattrs(h, (m) => this.warn(m))) {
      try {
        setXattr(p, name, value);
      } catch (err) {
        if (err instanceof XattrError) {
          if (err.code === 'EPERM' && name.startsWith('user.')) {
            const st = fs.lstatSync(p);
            if (!st.isFile() && !st.isDirectory()) {
              this.warn(xattrIgnored.userOnSpecial(h.name, name));
              continue;
            }
          }
          if (err.code === 'ENOTSUP' || err.code === 'EOPNOTSUPP') {
            this.warn(xattrIgnored.unsupported(h.name, name, err.code));
            continue;
          }
        }
        throw err;
      }
    }
  }

  /**
   * Directory times, last (creating children changed them). As containerd
   * does, the name is resolved again with symlinks followed inside the
   * directory (never out of it), and a directory entry whose path is gone
   * by now (a later entry replaced a parent with a file) fails the layer.
   */
  finish(): void {
    for (const d of this.dirTimes) {
      try {
        fs.lutimesSync(rootPath(this.root, d.rel.join('/')), d.atime, d.mtime);
      } catch (err) {
        throw dirTimesError(d.name, (err as NodeJS.ErrnoException).code, err);
      }
    }
  }
}

/** Makes sure `dir` exists and is empty; returns its real path. */
function prepareDir(dir: string): string {
  let root: string;
  let st: fs.Stats;
  try {
    fs.mkdirSync(dir, { recursive: true });
    root = fs.realpathSync(dir);
    st = fs.statSync(root);
  } catch (err) {
    throw new LayerTarError('Internal', `layer directory ${dir}: ${messageOf(err)}`, undefined, err);
  }
  if (!st.isDirectory()) throw new LayerTarError('FailedPrecondition', `layer directory ${dir} is not a directory`);
  const names = fs.readdirSync(root);
  if (names.length > 0) throw new LayerTarError('FailedPrecondition', `layer directory ${dir} is not empty (${names.length} entries, e.g. ${q(names[0])}): a layer is applied to an empty directory`);
  return root;
}

/**
 * Reads one layer blob from `input` and applies it to `dir` (created if
 * missing; it must be empty) as containerd applies a layer to an overlay
 * upper directory. Needs root (owners, devices, trusted.* xattrs).
 *
 * On failure it throws a LayerTarError naming the entry and the cause, stops
 * reading `input` (destroying it), and leaves `dir` partly written for the
 * caller to remove; nothing outside `dir` is written.
 */
export async function applyLayerTar(input: Readable, dir: string, opts: ApplyLayerOptions = {}): Promise<ApplyLayerResult> {
  const root = prepareDir(dir);
  const tarStream = await openLayer(input, opts.compression ?? 'auto');
  const applier = new Applier(root, opts);
  await applyEntries(new TarReader(tarStream), applier);
  return { files: applier.files, bytes: applier.bytes };
}
