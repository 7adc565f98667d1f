/**
 * Unix datagram sockets (Node's dgram has none): enough for sd_notify(3)'s
 * protocol, including fds passed as SCM_RIGHTS ancillary data (systemd's
 * fd store), and for tests that play systemd's side of it.
 */
import os from 'node:os';
import koffi from 'koffi';
import { ErrnoError, check, closeFd, errnoName, libc } from './libc';

type SocketFn = (domain: number, type: number, protocol: number) => number;
type SendtoFn = (fd: number, buf: Buffer, len: number, flags: number, addr: Buffer, addrlen: number) => number;
type BindFn = (fd: number, addr: Buffer, addrlen: number) => number;
type RecvFn = (fd: number, buf: Buffer, len: number, flags: number) => number;
type MsgFn = (fd: number, msg: unknown, flags: number) => number;
type SetsockoptFn = (fd: number, level: number, name: number, value: Buffer, len: number) => number;
type MallocFn = (size: number) => unknown;
type FreeFn = (p: unknown) => void;

let fns: {
  socket: SocketFn;
  sendto: SendtoFn;
  bind: BindFn;
  recv: RecvFn;
  sendmsg: MsgFn;
  recvmsg: MsgFn;
  setsockopt: SetsockoptFn;
  malloc: MallocFn;
  free: FreeFn;
} | null = null;

function sys() {
  if (!fns) {
    const lib = libc();
    fns = {
      socket: lib.func('int socket(int domain, int type, int protocol)') as unknown as SocketFn,
      sendto: lib.func('intptr_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)') as unknown as SendtoFn,
      bind: lib.func('int bind(int fd, const void *addr, uint32_t addrlen)') as unknown as BindFn,
      recv: lib.func('intptr_t recv(int fd, void *buf, size_t len, int flags)') as unknown as RecvFn,
      sendmsg: lib.func('intptr_t sendmsg(int fd, void *msg, int flags)') as unknown as MsgFn,
      recvmsg: lib.func('intptr_t recvmsg(int fd, void *msg, int flags)') as unknown as MsgFn,
      setsockopt: lib.func('int setsockopt(int fd, int level, int name, const void *value, uint32_t len)') as unknown as SetsockoptFn,
      malloc: lib.func('void *malloc(size_t size)') as unknown as MallocFn,
      free: lib.func('void free(void *p)') as unknown as FreeFn,
    };
  }
  return fns;
}

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const MSG_CTRUNC = 0x8;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
/** Linux ≥ 6.16: 0 makes a socket refuse SCM_RIGHTS (the sender's sendmsg fails with EPERM). */
const SO_PASSRIGHTS = 83;
const SUN_PATH_MAX = 108;
/** The kernel's limit of fds in one SCM_RIGHTS message (SCM_MAX_FD). */
export const MAX_FDS_PER_MESSAGE = 253;

/** struct sockaddr_un for `address`; a leading '@' names the abstract namespace. */
function sockaddrUn(address: string): Buffer {
  const abstract = address.startsWith('@');
  const name = Buffer.from(abstract ? `\0${address.slice(1)}` : address);
  if (name.length === 0 || name.length >= SUN_PATH_MAX || (!abstract && name.includes(0))) {
    throw new Error(`unix socket address ${JSON.stringify(address)} is empty, too long or contains NUL`);
  }
  const buf = Buffer.alloc(2 + name.length + (abstract ? 0 : 1));
  buf.writeUInt16LE(AF_UNIX, 0);
  name.copy(buf, 2);
  return buf;
}

/*
 * struct msghdr, struct iovec and struct cmsghdr as glibc lays them out on a
 * 64-bit little-endian Linux (x86-64, arm64): pointers and size_t are 8
 * bytes, so
 *   msghdr  { name @0, namelen(u32) @8, iov @16, iovlen @24, control @32, controllen @40, flags(i32) @48 } 56 bytes
 *   iovec   { base @0, len @8 } 16 bytes
 *   cmsghdr { len(size_t) @0, level(i32) @8, type(i32) @12, data @16 }, each padded to 8 bytes.
 * The kernel follows the pointers, so everything lives in one block of
 * memory malloc(3) gave (a Node Buffer may move or be pooled).
 */
const MSGHDR = 56;
const IOVEC = 16;
const CMSGHDR = 16;
const align8 = (n: number) => (n + 7) & ~7;
/** CMSG_SPACE(4 × n): room for n fds. */
const cmsgSpace = (nfds: number) => CMSGHDR + align8(4 * nfds);

function assertLayout(): void {
  if (koffi.sizeof('void *') !== 8 || koffi.sizeof('size_t') !== 8 || os.endianness() !== 'LE') {
    throw new Error('sendmsg/recvmsg here know only the 64-bit little-endian layout of struct msghdr');
  }
}

/** One malloc'ed block and a Buffer over it; free() when the call is done. */
class NativeBlock {
  readonly buf: Buffer;
  private ptr: unknown;
  private readonly base: bigint;

  constructor(size: number) {
    const p = sys().malloc(size);
    if (p === null) throw new ErrnoError('malloc', koffi.errno(), `${size} bytes`);
    this.ptr = p;
    this.base = BigInt(koffi.address(p));
    this.buf = Buffer.from(koffi.view(p, size));
    this.buf.fill(0);
  }

  get pointer(): unknown {
    return this.ptr;
  }

  /** The address of byte `off` of the block. */
  addr(off: number): bigint {
    return this.base + BigInt(off);
  }

  free(): void {
    if (this.ptr !== null) sys().free(this.ptr);
    this.ptr = null;
  }
}

/**
 * Sends one datagram to the unix socket at `address`; `fds`, when given,
 * travel with it as SCM_RIGHTS (the receiver gets its own copies; these
 * stay open here). Throws ErrnoError: ECONNREFUSED or ENOENT (nobody
 * listens), EPERM (the receiver refuses fds: SO_PASSRIGHTS off), EAGAIN
 * (its queue is full: fds are sent without waiting).
 */
export function sendUnixDatagram(address: string, message: string, fds: number[] = []): void {
  const s = sys();
  const addr = sockaddrUn(address);
  const fd = check('socket(AF_UNIX, SOCK_DGRAM)', s.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  try {
    const data = Buffer.from(message);
    if (fds.length === 0) {
      check('sendto', s.sendto(fd, data, data.length, MSG_NOSIGNAL, addr, addr.length), address);
      return;
    }
    if (fds.length > MAX_FDS_PER_MESSAGE) throw new Error(`${fds.length} fds in one message: the kernel takes at most ${MAX_FDS_PER_MESSAGE}`);
    assertLayout();
    const iovAt = MSGHDR;
    const controlAt = iovAt + IOVEC;
    const control = cmsgSpace(fds.length);
    const nameAt = controlAt + control;
    const dataAt = nameAt + align8(addr.length);
    const block = new NativeBlock(dataAt + Math.max(1, data.length));
    try {
      const b = block.buf;
      addr.copy(b, nameAt);
      data.copy(b, dataAt);
      b.writeBigUInt64LE(block.addr(nameAt), 0);
      b.writeUInt32LE(addr.length, 8);
      b.writeBigUInt64LE(block.addr(iovAt), 16);
      b.writeBigUInt64LE(1n, 24);
      b.writeBigUInt64LE(block.addr(controlAt), 32);
      b.writeBigUInt64LE(BigInt(control), 40);
      b.writeBigUInt64LE(block.addr(dataAt), iovAt);
      b.writeBigUInt64LE(BigInt(data.length), iovAt + 8);
      b.writeBigUInt64LE(BigInt(CMSGHDR + 4 * fds.length), controlAt);
      b.writeInt32LE(SOL_SOCKET, controlAt + 8);
      b.writeInt32LE(SCM_RIGHTS, controlAt + 12);
      for (const [i, f] of fds.entries()) b.writeInt32LE(f, controlAt + CMSGHDR + 4 * i);
      check('sendmsg', s.sendmsg(fd, block.pointer, MSG_NOSIGNAL | MSG_DONTWAIT), `${address} with ${fds.length} fds`);
    } finally {
      block.free();
    }
  } finally {
    closeFd(fd);
  }
}

/** A datagram with the fds that came with it (the receiver's to close; FD_CLOEXEC set). */
export interface Datagram {
  message: string;
  fds: number[];
  /** The sender sent more fds than fitted (MSG_CTRUNC): the rest were closed by the kernel. */
  truncated: boolean;
}

/** A bound unix datagram socket that can be polled for messages. */
export class UnixDatagramReceiver {
  private fd: number;

  constructor(readonly address: string) {
    const s = sys();
    const addr = sockaddrUn(address);
    this.fd = check('socket(AF_UNIX, SOCK_DGRAM)', s.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    try {
      check('bind', s.bind(this.fd, addr, addr.length), address);
    } catch (err) {
      closeFd(this.fd);
      throw err;
    }
  }

  /**
   * Refuse fds sent to this socket from now on (SO_PASSRIGHTS off, Linux ≥
   * 6.16): a sendmsg with SCM_RIGHTS fails with EPERM. False when the
   * kernel has no such option.
   */
  refuseFds(): boolean {
    const v = Buffer.alloc(4);
    if (sys().setsockopt(this.fd, SOL_SOCKET, SO_PASSRIGHTS, v, 4) === 0) return true;
    const code = errnoName(koffi.errno());
    if (code === 'ENOPROTOOPT' || code === 'EINVAL') return false;
    throw new ErrnoError('setsockopt', koffi.errno(), 'SO_PASSRIGHTS');
  }

  /** The next datagram, or null when none is waiting. */
  tryReceive(): string | null {
    const buf = Buffer.alloc(65536);
    const n = sys().recv(this.fd, buf, buf.length, MSG_DONTWAIT);
    if (n < 0) return null;
    return buf.subarray(0, n).toString();
  }

  /**
   * The next datagram and the fds passed with it (up to `maxFds`), or null
   * when none is waiting. Throws ErrnoError for errors other than EAGAIN.
   */
  tryReceiveWithFds(maxFds = 16): Datagram | null {
    assertLayout();
    const s = sys();
    const size = 65536;
    const iovAt = MSGHDR;
    const controlAt = iovAt + IOVEC;
    const control = cmsgSpace(maxFds);
    const dataAt = controlAt + control;
    const block = new NativeBlock(dataAt + size);
    try {
      const b = block.buf;
      b.writeBigUInt64LE(block.addr(iovAt), 16);
      b.writeBigUInt64LE(1n, 24);
      b.writeBigUInt64LE(block.addr(controlAt), 32);
      b.writeBigUInt64LE(BigInt(control), 40);
      b.writeBigUInt64LE(block.addr(dataAt), iovAt);
      b.writeBigUInt64LE(BigInt(size), iovAt + 8);
      const n = s.recvmsg(this.fd, block.pointer, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (n < 0) {
        const errno = koffi.errno();
        if (errnoName(errno) === 'EAGAIN') return null;
        throw new ErrnoError('recvmsg', errno, this.address);
      }
      const fds: number[] = [];
      const controlLen = Number(b.readBigUInt64LE(40));
      for (let at = 0; at + CMSGHDR <= controlLen; ) {
        const len = Number(b.readBigUInt64LE(controlAt + at));
        if (len < CMSGHDR || at + len > controlLen) break;
        if (b.readInt32LE(controlAt + at + 8) === SOL_SOCKET && b.readInt32LE(controlAt + at + 12) === SCM_RIGHTS) {
          for (let i = CMSGHDR; i + 4 <= len; i += 4) fds.push(b.readInt32LE(controlAt + at + i));
        }
        at += align8(len);
      }
      return { message: b.subarray(dataAt, dataAt + Number(n)).toString(), fds, truncated: (b.readInt32LE(48) & MSG_CTRUNC) !== 0 };
    } finally {
      block.free();
    }
  }

  close(): void {
    if (this.fd >= 0) {
      closeFd(this.fd);
      this.fd = -1;
    }
  }
}
