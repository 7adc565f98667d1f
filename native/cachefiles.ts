/**
 * /dev/cachefiles in on-demand mode (Linux ≥ 5.19 with
 * CONFIG_CACHEFILES_ONDEMAND), as <linux/cachefiles.h> defines it: the
 * messages a read(2) of the device returns (OPEN, CLOSE, READ), the
 * CACHEFILES_IOC_READ_COMPLETE ioctl on an object's anonymous fd, page-aligned
 * buffers (writes to that fd are direct I/O), and
 * pidfd_open/pidfd_getfd (Linux ≥ 5.6) to share the device's fd with another
 * process (the device has one opener per host).
 */
import fs from 'node:fs';
import koffi from 'koffi';
import { ErrnoError, check, fcntl, libc } from './libc';

export const CACHEFILES_DEVICE = '/dev/cachefiles';
export const CACHEFILES_MSG_MAX_SIZE = 1024;

export const CACHEFILES_OP_OPEN = 0;
export const CACHEFILES_OP_CLOSE = 1;
export const CACHEFILES_OP_READ = 2;

/** _IOW(0x98, 1, int) */
export const CACHEFILES_IOC_READ_COMPLETE = (1 << 30) | (4 << 16) | (0x98 << 8) | 1;

const SYS_PIDFD_OPEN = 434;
const SYS_PIDFD_GETFD = 438;
export const PAGE = 4096;

type IoctlFn = (fd: number, request: number, arg: number) => number;
type SyscallFn = (n: number, a: number, b: number, c: number) => number;
type AlignedAllocFn = (alignment: number, size: number) => unknown;
type FreeFn = (p: unknown) => void;

let fns: { ioctl: IoctlFn; syscall: SyscallFn; alignedAlloc: AlignedAllocFn; free: FreeFn } | null = null;

function sys() {
  if (!fns) {
    const lib = libc();
    fns = {
      ioctl: lib.func('int ioctl(int fd, unsigned long request, unsigned long arg)') as unknown as IoctlFn,
      syscall: lib.func('long syscall(long number, long a, long b, long c)') as unknown as SyscallFn,
      alignedAlloc: lib.func('void *aligned_alloc(size_t alignment, size_t size)') as unknown as AlignedAllocFn,
      free: lib.func('void free(void *p)') as unknown as FreeFn,
    };
  }
  return fns;
}

export interface CachefilesOpen {
  /** The volume key without its NUL (EROFS: "erofs,<domain_id or fsid>"). */
  volumeKey: string;
  /** The cookie key (EROFS: the blob's name: fsid or device). */
  cookieKey: string;
  /** The object's anonymous fd, installed in the reading process. */
  fd: number;
  flags: number;
}

export interface CachefilesMsg {
  msgId: number;
  opcode: number;
  objectId: number;
  open?: CachefilesOpen;
  read?: { off: number; len: number };
}

/** Parses one message as read(2) of the device returned it. Throws on a length it does not understand. */
export function parseCachefilesMsg(buf: Buffer, n: number): CachefilesMsg {
  if (n < 16) throw new Error(`cachefiles message of ${n} bytes is shorter than its 16-byte header`);
  const len = buf.readUInt32LE(8);
  if (len !== n) throw new Error(`cachefiles message says ${len} bytes, read returned ${n}`);
  const msg: CachefilesMsg = { msgId: buf.readUInt32LE(0), opcode: buf.readUInt32LE(4), objectId: buf.readUInt32LE(12) };
  if (msg.opcode === CACHEFILES_OP_OPEN) {
    if (n < 32) throw new Error(`cachefiles OPEN message of ${n} bytes is too short`);
    const vsize = buf.readUInt32LE(16);
    const csize = buf.readUInt32LE(20);
    if (32 + vsize + csize > n) throw new Error(`cachefiles OPEN keys (${vsize}+${csize} bytes) run past the message (${n} bytes)`);
    const volume = buf.subarray(32, 32 + vsize);
    msg.open = {
      volumeKey: volume.subarray(0, volume.indexOf(0) >= 0 ? volume.indexOf(0) : volume.length).toString('latin1'),
      cookieKey: buf.subarray(32 + vsize, 32 + vsize + csize).toString('latin1'),
      fd: buf.readUInt32LE(24),
      flags: buf.readUInt32LE(28),
    };
  } else if (msg.opcode === CACHEFILES_OP_READ) {
    if (n < 32) throw new Error(`cachefiles READ message of ${n} bytes is too short`);
    msg.read = { off: Number(buf.readBigUInt64LE(16)), len: Number(buf.readBigUInt64LE(24)) };
  }
  return msg;
}

/** Opens the device (EBUSY: another process has it; ENOENT: no cachefiles here). */
export function openCachefiles(): number {
  try {
    return fs.openSync(CACHEFILES_DEVICE, fs.constants.O_RDWR);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const why = e.code === 'EBUSY' ? ' (another process has it open: one opener per host, e.g. cachefilesd)' : e.code === 'ENOENT' ? ' (no cachefiles in this kernel: modprobe cachefiles)' : '';
    throw new Error(`cannot open ${CACHEFILES_DEVICE}: ${e.code ?? e.message}${why}`, { cause: err });
  }
}

/** Writes one command ("dir /x", "tag t", "bind ondemand", "copen 3,4096", "restore", "cull NAME"). Throws an Error with the errno's `code`. */
export function cachefilesCommand(fd: number, command: string): void {
  try {
    fs.writeSync(fd, command);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw Object.assign(new Error(`cachefiles command "${command}" failed: ${e.code ?? e.message}`, { cause: err }), { code: e.code });
  }
}

/** One pending message, or null when none is (read returns 0). */
export function readCachefilesMsg(fd: number, buf: Buffer): CachefilesMsg | null {
  const n = fs.readSync(fd, buf, 0, buf.length, null);
  return n === 0 ? null : parseCachefilesMsg(buf, n);
}

const F_SETFD = 2;
const FD_CLOEXEC = 1;

/**
 * Sets close-on-exec on an object's anonymous fd: the kernel installs it
 * without, and a child that inherits it (mount(8), mkfs.erofs, a new
 * holder) would keep the object open after this daemon dies, so the next
 * daemon would get READs for an object it never saw opened.
 */
export function setCloexec(fd: number): void {
  check('fcntl(F_SETFD, FD_CLOEXEC)', fcntl(fd, F_SETFD, FD_CLOEXEC), `fd ${fd}`);
}

/** Completes READ request `msgId` on the object's anonymous fd: the kernel reads its range from the cache file again. */
export function readComplete(anonFd: number, msgId: number): void {
  check('ioctl(CACHEFILES_IOC_READ_COMPLETE)', sys().ioctl(anonFd, CACHEFILES_IOC_READ_COMPLETE, msgId), `msg ${msgId}`);
}

export { pollReadable } from './libc';

/** A copy of fd `targetFd` of process `pid` in this process (pidfd_getfd(2); needs ptrace rights: root). */
export function fdOfProcess(pid: number, targetFd: number): number {
  const s = sys();
  const pidfd = check('pidfd_open', s.syscall(SYS_PIDFD_OPEN, pid, 0, 0), `pid ${pid}`);
  try {
    return check('pidfd_getfd', s.syscall(SYS_PIDFD_GETFD, pidfd, targetFd, 0), `pid ${pid} fd ${targetFd}`);
  } finally {
    fs.closeSync(pidfd);
  }
}

/**
 * A page-aligned buffer in memory this module allocated (writes to an
 * object's anonymous fd are direct I/O: an unaligned buffer gets EINVAL).
 * Call free() once no write uses it.
 */
export class AlignedBuffer {
  readonly buf: Buffer;
  private ptr: unknown;

  constructor(size: number) {
    const len = Math.max(PAGE, Math.ceil(size / PAGE) * PAGE);
    const p = sys().alignedAlloc(PAGE, len);
    if (p === null) throw new ErrnoError('aligned_alloc', koffi.errno(), `${len} bytes`);
    this.ptr = p;
    this.buf = Buffer.from(koffi.view(p, len));
  }

  free(): void {
    if (this.ptr !== null) sys().free(this.ptr);
    this.ptr = null;
  }
}
