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

/** ioctl(2) with a pointer argument (a buffer the kernel reads or fills). */
export type IoctlPtrFn = (fd: number, request: number, arg: Buffer) => number;

let ioctlPtrFn: IoctlPtrFn | null = null;

export function ioctlPtr(): IoctlPtrFn {
  if (!ioctlPtrFn) ioctlPtrFn = libc().func('int ioctl(int fd, unsigned long request, void *arg)') as unknown as IoctlPtrFn;
  return ioctlPtrFn;
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

const POLLIN = 0x1;
type PollFn = ((fds: Buffer, nfds: number, timeout: number) => number) & { async: (fds: Buffer, nfds: number, timeout: number, cb: (err: unknown, r: number) => void) => void };
let pollFn: PollFn | null = null;

/**
 * Waits in a worker thread (the event loop runs on) until one of `fds` is
 * readable or `timeoutMs` passed (-1: no limit): a blocking wait that costs
 * no CPU, for fds Node cannot watch itself (/dev/cachefiles, a fanotify
 * group). True when one is readable.
 */
export function pollReadable(fds: number | number[], timeoutMs: number): Promise<boolean> {
  if (!pollFn) pollFn = libc().func('int poll(void *fds, unsigned long nfds, int timeout)') as unknown as PollFn;
  const list = Array.isArray(fds) ? fds : [fds];
  const pfd = Buffer.alloc(8 * list.length);
  for (const [i, fd] of list.entries()) {
    pfd.writeInt32LE(fd, 8 * i);
    pfd.writeInt16LE(POLLIN, 8 * i + 4);
  }
  const poll = pollFn;
  return new Promise((resolve, reject) => {
    poll.async(pfd, list.length, timeoutMs, (err, r) => {
      if (err) reject(err instanceof Error ? err : new Error(String(err)));
      else resolve(r > 0);
    });
  });
}

const EFD_CLOEXEC = 0o2000000;
const EFD_NONBLOCK = 0o4000;
let eventfdFn: ((initval: number, flags: number) => number) | null = null;

/**
 * A non-blocking eventfd(2): a write of an 8-byte count makes it readable,
 * to wake a worker thread waiting in pollReadable. Throws ErrnoError.
 */
export function eventFd(): number {
  if (!eventfdFn) eventfdFn = libc().func('int eventfd(unsigned int initval, int flags)') as unknown as (initval: number, flags: number) => number;
  return check('eventfd', eventfdFn(0, EFD_CLOEXEC | EFD_NONBLOCK));
}

const POSIX_FADV_DONTNEED = 4;
let fadviseFn: ((fd: number, off: bigint, len: bigint, advice: number) => number) | null = null;

/**
 * posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED): drops the clean, unmapped
 * pages of the file's page cache. Throws ErrnoError (it returns the error
 * number instead of setting errno).
 */
export function dropPageCache(fd: number): void {
  if (!fadviseFn) fadviseFn = libc().func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)') as unknown as (fd: number, off: bigint, len: bigint, advice: number) => number;
  const r = fadviseFn(fd, 0n, 0n, POSIX_FADV_DONTNEED);
  if (r !== 0) throw new ErrnoError('posix_fadvise', r, `fd ${fd} DONTNEED`);
}

const F_GETFD = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

/** Sets FD_CLOEXEC on `fd` (an fd inherited without it must not reach the children this process starts). Throws ErrnoError. */
export function setCloexec(fd: number): void {
  const flags = check('fcntl(F_GETFD)', fcntl(fd, F_GETFD, 0), `fd ${fd}`);
  check('fcntl(F_SETFD)', fcntl(fd, F_SETFD, flags | FD_CLOEXEC), `fd ${fd}`);
}

/** F_LINUX_SPECIFIC_BASE + 3 (Linux ≥ 6.10). */
const F_DUPFD_QUERY = 1027;

/**
 * Whether `a` and `b` are the same open file (one a dup, an SCM_RIGHTS or
 * pidfd_getfd copy of the other): true or false, null when the kernel
 * cannot say (F_DUPFD_QUERY is Linux ≥ 6.10).
 */
export function sameOpenFile(a: number, b: number): boolean | null {
  const r = fcntl(a, F_DUPFD_QUERY, b);
  if (r < 0) {
    if (errnoName(koffi.errno()) === 'EINVAL') return null;
    throw new ErrnoError('fcntl(F_DUPFD_QUERY)', koffi.errno(), `fds ${a} ${b}`);
  }
  return r === 1;
}

const O_CLOEXEC = 0o2000000;
let dup3Fn: ((oldfd: number, newfd: number, flags: number) => number) | null = null;

/** dup3(fd, target, O_CLOEXEC): `target` becomes a copy of `fd` (closed first if open). Throws ErrnoError. */
export function dupTo(fd: number, target: number): void {
  if (!dup3Fn) dup3Fn = libc().func('int dup3(int oldfd, int newfd, int flags)') as unknown as (oldfd: number, newfd: number, flags: number) => number;
  check('dup3', dup3Fn(fd, target, O_CLOEXEC), `fd ${fd} to ${target}`);
}

let exitFn: ((status: number) => void) | null = null;

/**
 * _exit(2): ends the process at once, without atexit handlers. Node's own
 * exit joins libuv's thread pool first, and a pool thread blocked in the
 * kernel (a read waiting for an on-demand fill that only a daemon can
 * answer) would keep a stopped daemon from ever exiting. For the last step
 * of a shutdown that has closed and flushed everything itself.
 */
export function exitImmediately(status: number): never {
  if (!exitFn) exitFn = libc().func('void _exit(int status)') as unknown as (status: number) => void;
  exitFn(status);
  throw new Error('_exit returned');
}
