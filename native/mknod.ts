/**
 * mknod(2): Node has no binding for it, and unpacking a layer needs it for
 * device nodes, fifos and overlay whiteouts (char device 0/0). The path goes
 * to C as UTF-8; it is created as given (a final symlink is never followed:
 * mknod fails with EEXIST on anything already there).
 */
import { check, libc } from './libc';

type MknodFn = (path: string, mode: number, dev: bigint) => number;

let fn: MknodFn | null = null;

export const S_IFIFO = 0o010000;
export const S_IFCHR = 0o020000;
export const S_IFBLK = 0o060000;

/**
 * glibc's makedev(): major 12+20 bits and minor 8+24 bits interleaved into a
 * 64-bit dev_t (the kernel's new_encode_dev for numbers that fit).
 */
export function makedev(major: number, minor: number): bigint {
  if (!Number.isInteger(major) || major < 0 || major > 0xffffffff) throw new RangeError(`device major ${major} out of range`);
  if (!Number.isInteger(minor) || minor < 0 || minor > 0xffffffff) throw new RangeError(`device minor ${minor} out of range`);
  const ma = BigInt(major);
  const mi = BigInt(minor);
  return ((ma & 0xfffff000n) << 32n) | ((ma & 0xfffn) << 8n) | ((mi & 0xffffff00n) << 12n) | (mi & 0xffn);
}

/**
 * Creates a special file. `mode` is the file type (S_IFIFO, S_IFCHR, S_IFBLK)
 * or'ed with the permission bits; the umask applies to them, so callers chmod
 * afterwards. Throws ErrnoError.
 */
export function mknod(path: string, mode: number, major = 0, minor = 0): void {
  if (!fn) fn = libc().func('int mknod(const char *path, uint32_t mode, uint64_t dev)') as unknown as MknodFn;
  check('mknod', fn(path, mode, makedev(major, minor)), `${path} mode 0${mode.toString(8)} ${major}:${minor}`);
}
