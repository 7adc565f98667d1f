/**
 * containerd's rules for applying a layer tar onto an overlay upper
 * directory, as pure functions shared by the two appliers: untar.ts (onto a
 * real directory) and tar-tree.ts (into an in-memory tree for the EROFS
 * writer). Names are cleaned and checked here, whiteouts parsed, archive
 * xattrs filtered, times bounded, symlinks resolved inside the layer root
 * (continuity's RootPath) and failures turned into LayerTarErrors, so both
 * appliers refuse the same layers with the same messages.
 */
import path from 'node:path';
import { type ErrorKind, SnapshotterError, messageOf } from '../errdefs/errors';
import { type TarHeader, TarFormatError, type TarReader, TYPE } from './tar-reader';

/**
 * A layer that cannot be applied. `kind` is InvalidArgument for a malformed,
 * unsupported or unsafe archive, FailedPrecondition for a directory that is
 * not empty, Internal for a failing system call; `entry` is the tar entry's
 * name as stored, when the failure is about one entry.
 */
export class LayerTarError extends SnapshotterError {
  constructor(
    kind: ErrorKind,
    message: string,
    readonly entry?: string,
    cause?: unknown,
  ) {
    super(kind, message, { cause });
    this.name = 'LayerTarError';
  }
}

/** A failure of one entry whose kind is known; the applier adds the entry's name. */
export class EntryError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
  ) {
    super(message);
  }
}

export const invalid = (msg: string) => new EntryError('InvalidArgument', msg);

export const WHITEOUT_PREFIX = '.wh.';
export const WHITEOUT_OPAQUE = '.wh..wh..opq';
export const PAX_XATTR = 'SCHILY.xattr.';
export const OPAQUE_XATTR = 'trusted.overlay.opaque';

/** archive.boundTime: times before the epoch or past 2262 become the epoch. */
export const MAX_TIME_SEC = 9223372036;

export function q(s: string): string {
  return JSON.stringify(s);
}

/**
 * The path components of an entry name, cleaned lexically as Go's
 * filepath.Clean does; [] for the root. Refuses an empty name, an absolute
 * one and one whose `..` climbs above the root.
 */
export function cleanName(raw: string, what: string): string[] {
  if (raw === '') throw invalid(`${what} is empty`);
  if (raw.startsWith('/')) throw invalid(`${what} ${q(raw)} is absolute: refusing to write outside the layer directory`);
  const comps: string[] = [];
  for (const part of raw.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') {
      if (comps.length === 0) throw invalid(`${what} ${q(raw)} climbs out of the layer directory with "..": refusing`);
      comps.pop();
    } else {
      comps.push(part);
    }
  }
  return comps;
}

const SUPPORTED_TYPES: readonly string[] = [TYPE.reg, TYPE.link, TYPE.symlink, TYPE.char, TYPE.block, TYPE.dir, TYPE.fifo];

/** Refuses GNU sparse files and every type containerd does not create (contiguous files, ...). */
export function checkEntryType(t: string): void {
  if (t === TYPE.gnuSparse) throw invalid('GNU sparse files are not supported');
  if (!SUPPORTED_TYPES.includes(t)) throw invalid(`unsupported tar entry type ${q(t)} (0x${t.charCodeAt(0).toString(16)})`);
}

/**
 * What a last name component means for overlay: `.wh..wh..opq` makes its
 * directory opaque, `.wh.<name>` whites out <name> (refused for an empty
 * name, "." and ".."), anything else is a plain entry (null).
 */
export function whiteoutOf(base: string): { opaque: true } | { opaque: false; name: string } | null {
  if (base === WHITEOUT_OPAQUE) return { opaque: true };
  if (!base.startsWith(WHITEOUT_PREFIX)) return null;
  const name = base.slice(WHITEOUT_PREFIX.length);
  if (name === '' || name === '.' || name === '..') throw invalid(`invalid whiteout name ${q(base)}`);
  return { opaque: false, name };
}

/** containerd's chtimes(boundTime(latestTime(atime, mtime)), boundTime(mtime)), in seconds. */
export function entryTimes(h: TarHeader): { atime: number; mtime: number } {
  const bound = (t: number) => (t < 0 || t > MAX_TIME_SEC ? 0 : t);
  const a = h.atime !== undefined && h.atime > h.mtime ? h.atime : h.mtime;
  return { atime: bound(a), mtime: bound(h.mtime) };
}

/**
 * The timespec Node's fs.lutimes(path, t, t) sets for a time in seconds
 * (libuv's uv__fs_to_timespec): whole seconds, and nanoseconds computed in
 * double precision, truncated to microseconds. This is the mtime untar.ts
 * leaves on disk for entryTimes(h).mtime (t >= 0 there).
 */
export function lutimesTimespec(t: number): { sec: number; nsec: number } {
  let sec = Math.trunc(t);
  let nsec = Math.trunc((t - sec) * 1e9);
  nsec -= nsec % 1000;
  if (nsec < 0) {
    nsec += 1e9;
    sec -= 1;
  }
  return { sec, nsec };
}

/**
 * The archive's SCHILY.xattr.* records to set, in archive order, skipping
 * (with a warning, when the iteration reaches it) what containerd never
 * applies from an archive: trusted.*.
 */
export function* archiveXattrs(h: TarHeader, warn: (msg: string) => void): Generator<[name: string, value: Buffer]> {
  for (const [key, value] of h.pax) {
    if (!key.startsWith(PAX_XATTR)) continue;
    const name = key.slice(PAX_XATTR.length);
    if (name.startsWith('trusted.')) {
      warn(`layer entry ${q(h.name)}: xattr ${name} ignored (trusted.* attributes from an archive are not applied, as containerd does)`);
      continue;
    }
    yield [name, value];
  }
}

/** The warnings for an xattr the kernel refuses and containerd skips. */
export const xattrIgnored = {
  userOnSpecial: (entry: string, name: string) => `layer entry ${q(entry)}: xattr ${name} ignored (user.* attributes only exist on files and directories)`,
  unsupported: (entry: string, name: string, code: string) => `layer entry ${q(entry)}: xattr ${name} ignored: ${code}`,
};

/** How a refusal names what is in the way. */
export type EntryKind = 'file' | 'dir' | 'symlink' | 'chr' | 'blk' | 'fifo' | 'sock';

export function kindLabel(kind: EntryKind, rdevZero: boolean): string {
  switch (kind) {
    case 'file':
      return 'regular file';
    case 'dir':
      return 'directory';
    case 'symlink':
      return 'symlink';
    case 'chr':
      return rdevZero ? 'whiteout (char device 0/0)' : 'char device';
    case 'blk':
      return 'block device';
    case 'fifo':
      return 'fifo';
    default:
      return 'socket';
  }
}

// ---- errors ----

/** A failure reading the archive (no entry to blame yet), as a LayerTarError. */
export function readError(err: unknown, after: string | undefined): LayerTarError {
  if (err instanceof LayerTarError) return err;
  const where = after === undefined ? 'at the start of the archive' : `after entry ${q(after)}`;
  const code = (err as NodeJS.ErrnoException).code ?? '';
  if (err instanceof TarFormatError) return new LayerTarError('InvalidArgument', `layer tar ${where} (offset ${err.offset}): ${err.message}`, undefined, err);
  if (code.startsWith('Z_') || code.startsWith('ERR_ZLIB')) return new LayerTarError('InvalidArgument', `layer blob ${where}: corrupt gzip data: ${messageOf(err)}`, undefined, err);
  return new LayerTarError('Internal', `reading the layer blob ${where}: ${messageOf(err)}`, undefined, err);
}

/** A failure while applying entry `name` (reading its data included), as a LayerTarError. */
export function entryError(err: unknown, name: string): LayerTarError {
  const code = (err as NodeJS.ErrnoException).code ?? '';
  let kind: ErrorKind = 'Internal';
  let msg = messageOf(err);
  if (err instanceof EntryError) kind = err.kind;
  else if (err instanceof TarFormatError) kind = 'InvalidArgument';
  else if (code.startsWith('Z_') || code.startsWith('ERR_ZLIB')) {
    kind = 'InvalidArgument';
    msg = `corrupt gzip data: ${msg}`;
  }
  return new LayerTarError(kind, `layer entry ${q(name)}: ${msg}`, name, err);
}

/**
 * The error for a directory entry whose times cannot be set at the end of
 * the layer: `code` ENOENT or ENOTDIR means a later entry replaced it or a
 * parent (containerd refuses such a layer too).
 */
export function dirTimesError(name: string, code: string | undefined, err: unknown): LayerTarError {
  if (code === 'ENOENT' || code === 'ENOTDIR') {
    return new LayerTarError(
      'InvalidArgument',
      `layer entry ${q(name)}: the directory no longer exists at the end of the layer (a later entry replaced it or a parent; containerd refuses such a layer too): ${messageOf(err)}`,
      name,
      err,
    );
  }
  return new LayerTarError('Internal', `layer entry ${q(name)}: setting the directory's times: ${messageOf(err)}`, name, err);
}

// ---- Go path helpers, for containerd's RootPath ----

export function goClean(p: string): string {
  if (p === '') return '.';
  let c = path.posix.normalize(p);
  if (c.length > 1 && c.endsWith('/')) c = c.slice(0, -1);
  return c;
}

export function goJoin(...parts: string[]): string {
  const nonEmpty = parts.filter((x) => x !== '');
  return nonEmpty.length === 0 ? '' : goClean(nonEmpty.join('/'));
}

/**
 * continuity's fs.RootPath without the final join: `p` resolved as if the
 * layer root were `/`, every symlink met on the way followed inside it, as a
 * clean absolute path ("/a/b"). `linkAt(rel)` answers for an absolute
 * in-root path what lstat would: the symlink's target if it is one, null if
 * it is anything else or missing (it may throw, e.g. ENOTDIR). `where`
 * names the root in the too-many-links error. `p` must not be empty.
 */
export function resolveInRoot(p: string, linkAt: (rel: string) => string | null, where: string): string {
  const walked = { n: 0 };
  const walkLink = (rel: string): [string, boolean] => {
    if (walked.n > 255) throw new Error(`too many links resolving ${q(p)} in ${where}`);
    rel = goJoin('/', rel);
    if (rel === '/') return [rel, false];
    const target = linkAt(rel);
    if (target === null) return [rel, false];
    walked.n++;
    return [target, true];
  };
  const walkLinks = (rel: string): string => {
    const i = rel.lastIndexOf('/');
    const dir = rel.slice(0, i + 1);
    const file = rel.slice(i + 1);
    if (dir === '') return walkLink(file)[0];
    if (file === '') return dir === '/' ? dir : walkLinks(dir.slice(0, -1));
    const newdir = walkLinks(dir);
    const [next, isLink] = walkLink(goJoin(newdir, file));
    if (!isLink || next.startsWith('/')) return next;
    return goJoin(newdir, next);
  };
  for (;;) {
    const before = walked.n;
    let next = walkLinks(p);
    p = next;
    if (before === walked.n) {
      next = goJoin('/', next);
      if (p === next) return next;
      p = next;
    }
  }
}

/** What applies one tar entry at a time (to a directory: untar.ts; to a tree: tar-tree.ts). */
export interface EntryApplier {
  apply(h: TarHeader, reader: TarReader): Promise<void>;
  /** After the last entry (directory times). */
  finish(): void;
}

/**
 * Reads every entry of `reader` into `applier`, in archive order; a failure
 * is a LayerTarError naming the entry (or the one after which the archive
 * broke), and stops reading the input.
 */
export async function applyEntries(reader: TarReader, applier: EntryApplier): Promise<void> {
  let last: string | undefined;
  try {
    for (;;) {
      let h: TarHeader | null;
      try {
        h = await reader.next();
      } catch (err) {
        throw readError(err, last);
      }
      if (h === null) break;
      try {
        await applier.apply(h, reader);
      } catch (err) {
        if (err instanceof LayerTarError) throw err;
        throw entryError(err, h.name);
      }
      last = h.name;
    }
    applier.finish();
  } catch (err) {
    await reader.close().catch(() => undefined);
    throw err;
  }
}
