/**
 * The one place libc is loaded through koffi. Every FFI declaration of the
 * project lives in native/, each behind a typed wrapper that turns a -1
 * return into an ErrnoError carrying the errno name.
 */
import os from 'node:os';
import koffi from 'koffi';

let handle: ReturnType<typeof koffi.load> | null = null;

export function libc(): ReturnType<typeof koffi.load> {
  if (!handle) handle = koffi.load('libc.so.6');
  return handle;
}

/** The errno's name: Node's table first (its spelling of aliases), then koffi's, which has more (ENOTBLK). */
export function errnoName(n: number): string {
  for (const [k, v] of Object.entries(os.constants.errno)) if (v === n) return k;
  for (const [k, v] of Object.entries(koffi.os.errno)) if (v === n) return k;
  return `errno ${n}`;
}

export class ErrnoError extends Error {
  readonly code: string;
  constructor(
    readonly syscall: string,
    readonly errno: number,
    detail: string,
  ) {
    const code = errnoName(errno);
    super(`${syscall}${detail ? ` ${detail}` : ''}: ${code} (${errnoText(errno)})`);
    this.name = 'ErrnoError';
    this.code = code;
  }
}

const TEXT: Record<string, string> = {
  EPERM: 'operation not permitted',
  ENOENT: 'no such file or directory',
  EBUSY: 'device or resource busy',
  EINVAL: 'invalid argument',
  ENOTBLK: 'block device required',
  ENODEV: 'no such device (filesystem not supported by the kernel)',
  ENOSPC: 'no space left on device',
  EOPNOTSUPP: 'operation not supported',
  EACCES: 'permission denied',
  ENOTDIR: 'not a directory',
};

function errnoText(n: number): string {
  return TEXT[errnoName(n)] ?? 'system error';
}

/** Throws ErrnoError for a -1 result, with errno read right after the call. */
export function check(syscall: string, ret: number | bigint, detail = ''): number {
  if (Number(ret) < 0) throw new ErrnoError(syscall, koffi.errno(), detail);
  return Number(ret);
}

let closeFn: ((fd: number) => number) | null = null;

/** close(2) of an fd this process got from the kernel through FFI. Throws ErrnoError. */
export function closeFd(fd: number): void {
  if (!closeFn) closeFn = libc().func('int close(int fd)') as unknown as (fd: number) => number;
  check('close', closeFn(fd), `fd ${fd}`);
}

let fcntlFn: ((fd: number, cmd: number, arg: number) => number) | null = null;

/** fcntl(2) with an int argument; the raw result (-1: the error is koffi.errno()). */
export function fcntl(fd: number, cmd: number, arg: number): number {
  if (!fcntlFn) fcntlFn = libc().func('int fcntl(int fd, int cmd, int arg)') as unknown as (fd: number, cmd: number, arg: number) => number;
  return fcntlFn(fd, cmd, arg);
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
let lseekFn: ((fd: number, off: bigint, whence: number) => bigint) | null = null;

/**
 * lseek(2) with SEEK_DATA or SEEK_HOLE: the first offset ≥ `from` that is
 * data (or a hole); null when there is none (ENXIO: past the end). Throws
 * ErrnoError otherwise.
 */
export function seekDataOrHole(fd: number, from: number, what: 'data' | 'hole'): number | null {
  if (!lseekFn) lseekFn = libc().func('int64_t lseek(int fd, int64_t offset, int whence)') as unknown as (fd: number, off: bigint, whence: number) => bigint;
  const r = lseekFn(fd, BigInt(from), what === 'data' ? SEEK_DATA : SEEK_HOLE);
  if (Number(r) < 0) {
    const errno = koffi.errno();
    if (errnoName(errno) === 'ENXIO') return null;
    throw new ErrnoError('lseek', errno, `fd ${fd} SEEK_${what.toUpperCase()} ${from}`);
  }
  return Number(r);
}
