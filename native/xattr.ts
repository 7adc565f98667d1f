/**
 * Extended attributes of a path without following symlinks: llistxattr(2),
 * lgetxattr(2) and lsetxattr(2) from libc through koffi. Paths and names go
 * to C as UTF-8.
 */
import koffi from 'koffi';
import { errnoName, libc as loadLibc } from './libc';

type ListFn = (path: string, list: Buffer | null, size: number) => number;
type GetFn = (path: string, name: string, value: Buffer | null, size: number) => number;
type SetFn = (path: string, name: string, value: Buffer, size: number, flags: number) => number;

interface XattrFns {
  llistxattr: ListFn;
  lgetxattr: GetFn;
  lsetxattr: SetFn;
}

let fns: XattrFns | null = null;

function libc(): XattrFns {
  if (!fns) {
    const lib = loadLibc();
    fns = {
      llistxattr: lib.func('intptr_t llistxattr(const char *path, _Out_ uint8_t *list, size_t size)') as unknown as ListFn,
      lgetxattr: lib.func('intptr_t lgetxattr(const char *path, const char *name, _Out_ uint8_t *value, size_t size)') as unknown as GetFn,
      lsetxattr: lib.func('int lsetxattr(const char *path, const char *name, const uint8_t *value, size_t size, int flags)') as unknown as SetFn,
    };
  }
  return fns;
}

export class XattrError extends Error {
  constructor(
    readonly syscall: string,
    readonly path: string,
    readonly errno: number,
    readonly code: string,
    /** The attribute name, for calls about one attribute. */
    readonly attr?: string,
  ) {
    super(`${syscall} ${path}${attr === undefined ? '' : ` ${attr}`}: ${code}`);
    this.name = 'XattrError';
  }
}

const ERANGE = koffi.os.errno.ERANGE ?? 34;
const ENODATA = koffi.os.errno.ENODATA ?? 61;
/** ENOTSUP and EOPNOTSUPP (the same number on Linux). */
const NOT_SUPPORTED = new Set([koffi.os.errno.ENOTSUP ?? 95, koffi.os.errno.EOPNOTSUPP ?? 95]);

/** lsetxattr(2) flags. */
export const XATTR_CREATE = 0x1;
export const XATTR_REPLACE = 0x2;

/**
 * Calls `fn(buf, size)` the size-probe way: first with size 0 to learn the
 * length, then with a buffer of that length; retries if the value grew.
 */
function sized(syscall: string, path: string, fn: (buf: Buffer | null, size: number) => number, attr?: string): Buffer {
  for (let attempt = 0; attempt < 8; attempt++) {
    const need = fn(null, 0);
    if (need < 0) {
      const e = koffi.errno();
      throw new XattrError(syscall, path, e, errnoName(e), attr);
    }
    if (need === 0) return Buffer.alloc(0);
    const buf = Buffer.alloc(need);
    const got = fn(buf, need);
    if (got >= 0) return buf.subarray(0, got);
    const e = koffi.errno();
    if (e !== ERANGE) throw new XattrError(syscall, path, e, errnoName(e), attr);
  }
  throw new XattrError(syscall, path, ERANGE, 'ERANGE', attr);
}

/** Names of the extended attributes of `path` (the link itself for a symlink). */
export function listXattrs(path: string): string[] {
  const raw = sized('llistxattr', path, (b, n) => libc().llistxattr(path, b, n));
  return raw
    .toString('utf8')
    .split('\0')
    .filter((s) => s !== '');
}

/** The value of one extended attribute, or null if it does not exist. */
export function getXattr(path: string, name: string): Buffer | null {
  try {
    return sized('lgetxattr', path, (b, n) => libc().lgetxattr(path, name, b, n), name);
  } catch (err) {
    if (err instanceof XattrError && err.errno === ENODATA) return null;
    throw err;
  }
}

/**
 * Sets one extended attribute of `path` (the link itself for a symlink).
 * `flags`: 0 (create or replace), XATTR_CREATE or XATTR_REPLACE.
 */
export function setXattr(path: string, name: string, value: Buffer | string, flags = 0): void {
  const buf = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  if (libc().lsetxattr(path, name, buf, buf.length, flags) < 0) {
    const e = koffi.errno();
    throw new XattrError('lsetxattr', path, e, errnoName(e), name);
  }
}

export interface ReadXattrsOptions {
  /**
   * Treat a file system without extended attributes (llistxattr answers
   * ENOTSUP/EOPNOTSUPP) as "no attributes" instead of throwing.
   */
  unsupportedIsEmpty?: boolean;
}

/** All extended attributes of `path`, sorted by name. */
export function readXattrs(path: string, opts: ReadXattrsOptions = {}): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let names: string[];
  try {
    names = listXattrs(path);
  } catch (err) {
    if (opts.unsupportedIsEmpty && err instanceof XattrError && NOT_SUPPORTED.has(err.errno)) return out;
    throw err;
  }
  for (const name of names.sort()) {
    const v = getXattr(path, name);
    if (v !== null) out.set(name, v);
  }
  return out;
}
