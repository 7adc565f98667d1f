/**
 * Unix datagram sockets (Node's dgram has none): enough for sd_notify(3)'s
 * protocol, and for tests that play systemd's side of it.
 */
import { check, closeFd, libc } from './libc';

type SocketFn = (domain: number, type: number, protocol: number) => number;
type SendtoFn = (fd: number, buf: Buffer, len: number, flags: number, addr: Buffer, addrlen: number) => number;
type BindFn = (fd: number, addr: Buffer, addrlen: number) => number;
type RecvFn = (fd: number, buf: Buffer, len: number, flags: number) => number;

let fns: { socket: SocketFn; sendto: SendtoFn; bind: BindFn; recv: RecvFn } | null = null;

function sys() {
  if (!fns) {
    const lib = libc();
    fns = {
      socket: lib.func('int socket(int domain, int type, int protocol)') as unknown as SocketFn,
      sendto: lib.func('intptr_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)') as unknown as SendtoFn,
      bind: lib.func('int bind(int fd, const void *addr, uint32_t addrlen)') as unknown as BindFn,
      recv: lib.func('intptr_t recv(int fd, void *buf, size_t len, int flags)') as unknown as RecvFn,
    };
  }
  return fns;
}

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const SUN_PATH_MAX = 108;

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

/** Sends one datagram to the unix socket at `address`. */
export function sendUnixDatagram(address: string, message: string): void {
  const s = sys();
  const addr = sockaddrUn(address);
  const fd = check('socket(AF_UNIX, SOCK_DGRAM)', s.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  try {
    const data = Buffer.from(message);
    check('sendto', s.sendto(fd, data, data.length, MSG_NOSIGNAL, addr, addr.length), address);
  } finally {
    closeFd(fd);
  }
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

  /** The next datagram, or null when none is waiting. */
  tryReceive(): string | null {
    const buf = Buffer.alloc(65536);
    const n = sys().recv(this.fd, buf, buf.length, MSG_DONTWAIT);
    if (n < 0) return null;
    return buf.subarray(0, n).toString();
  }

  close(): void {
    if (this.fd >= 0) {
      closeFd(this.fd);
      this.fd = -1;
    }
  }
}
