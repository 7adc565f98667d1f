/**
 * fanotify_init(2), fanotify_mark(2) and close(2): enough to ask the kernel
 * whether it delivers pre-content events (FAN_PRE_ACCESS, Linux ≥ 6.14) on a
 * given file. Constants are from <linux/fanotify.h>; FAN_PRE_ACCESS is not in
 * Debian 12's linux-libc-dev (6.1), its value is the 6.14 uapi one.
 */
import fs from 'node:fs';
import { check, libc } from './libc';

export { closeFd } from './libc';

type InitFn = (flags: number, eventFlags: number) => number;
type MarkFn = (fd: number, flags: number, mask: bigint, dirfd: number, path: string | null) => number;

let fns: { init: InitFn; mark: MarkFn } | null = null;

function sys() {
  if (!fns) {
    const lib = libc();
    fns = {
      init: lib.func('int fanotify_init(unsigned int flags, unsigned int event_f_flags)') as unknown as InitFn,
      mark: lib.func('int fanotify_mark(int fanotify_fd, unsigned int flags, uint64_t mask, int dirfd, const char *pathname)') as unknown as MarkFn,
    };
  }
  return fns;
}

// fanotify_init flags
export const FAN_CLOEXEC = 0x00000001;
export const FAN_NONBLOCK = 0x00000002;
export const FAN_CLASS_NOTIF = 0x00000000;
export const FAN_CLASS_CONTENT = 0x00000004;
export const FAN_CLASS_PRE_CONTENT = 0x00000008;

// fanotify_mark flags
export const FAN_MARK_ADD = 0x00000001;
export const FAN_MARK_REMOVE = 0x00000002;
export const FAN_MARK_INODE = 0x00000000;

// events
export const FAN_ACCESS_PERM = 0x00020000;
/** Pre-content access: a read of a range the listener may fill first (Linux ≥ 6.14). */
export const FAN_PRE_ACCESS = 0x00100000;

/** Answers written back for permission and pre-content events. */
export const FAN_ALLOW = 0x01;
export const FAN_DENY = 0x02;

// event_f_flags (open(2) flags of the event fds)
export const O_RDONLY = 0;
export const O_RDWR = 2;

/** AT_FDCWD from <fcntl.h>: `path` is resolved from the working directory. */
export const AT_FDCWD = -100;

/** fanotify_init(2); returns the group's fd. Throws ErrnoError (EPERM without CAP_SYS_ADMIN, ENOSYS without CONFIG_FANOTIFY). */
export function fanotifyInit(flags: number, eventFlags: number): number {
  return check('fanotify_init', sys().init(flags, eventFlags), `flags 0x${flags.toString(16)}`);
}

/** fanotify_mark(2) of `path` (absolute, or relative to the working directory). Throws ErrnoError. */
export function fanotifyMark(fd: number, flags: number, mask: number | bigint, path: string): void {
  const m = BigInt(mask);
  check('fanotify_mark', sys().mark(fd, flags, m, AT_FDCWD, path), `mask 0x${m.toString(16)} ${path}`);
}

/** Open flags for event fds: read-write, so a filler can write the range before allowing the access. */
export const O_LARGEFILE = 0o100000;

/** fanotify_event_metadata: 24 bytes. */
const METADATA_LEN = 24;
export const FANOTIFY_METADATA_VERSION = 3;
/** Info record type of a pre-content event's file range (Linux ≥ 6.14). */
export const FAN_EVENT_INFO_TYPE_RANGE = 6;

/** FAN_DENY with an errno the reader gets (Linux ≥ 6.14: EIO, EPERM, EBUSY, ETXTBSY, EAGAIN, ENOSPC, EDQUOT). */
export function fanDenyErrno(errno: number): number {
  return (FAN_DENY | ((errno & 0xff) << 24)) >>> 0;
}

export interface FanotifyEvent {
  mask: bigint;
  /** An fd on the accessed file (the caller must close it), or -1 on overflow. */
  fd: number;
  pid: number;
  /** The accessed range of a pre-content event, when the kernel reported one. */
  range: { offset: number; count: number } | null;
}

/** Parses the events one read(2) of a fanotify group returned. Throws on a version or length it does not understand. */
export function parseFanotifyEvents(buf: Buffer, length: number): FanotifyEvent[] {
  const out: FanotifyEvent[] = [];
  let at = 0;
  while (at + METADATA_LEN <= length) {
    const eventLen = buf.readUInt32LE(at);
    const vers = buf.readUInt8(at + 4);
    const metadataLen = buf.readUInt16LE(at + 6);
    if (vers !== FANOTIFY_METADATA_VERSION) throw new Error(`fanotify metadata version ${vers}, expected ${FANOTIFY_METADATA_VERSION}`);
    if (eventLen < METADATA_LEN || at + eventLen > length || metadataLen < METADATA_LEN) throw new Error(`fanotify event length ${eventLen} at ${at} is out of bounds (${length} bytes read)`);
    const ev: FanotifyEvent = { mask: buf.readBigUInt64LE(at + 8), fd: buf.readInt32LE(at + 16), pid: buf.readInt32LE(at + 20), range: null };
    // Info records follow the metadata: {u8 type, u8 pad, u16 len, ...}.
    for (let i = at + metadataLen; i + 4 <= at + eventLen; ) {
      const type = buf.readUInt8(i);
      const len = buf.readUInt16LE(i + 2);
      if (len < 4 || i + len > at + eventLen) throw new Error(`fanotify info record length ${len} is out of bounds`);
      if (type === FAN_EVENT_INFO_TYPE_RANGE && len >= 24) {
        ev.range = { offset: Number(buf.readBigUInt64LE(i + 8)), count: Number(buf.readBigUInt64LE(i + 16)) };
      }
      i += len;
    }
    out.push(ev);
    at += eventLen;
  }
  return out;
}

/** The 8-byte struct fanotify_response for event fd `fd`. */
export function fanotifyResponse(fd: number, response: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeInt32LE(fd, 0);
  b.writeUInt32LE(response >>> 0, 4);
  return b;
}

/** An inode mark of a fanotify group, as /proc/PID/fdinfo/FD lists it. */
export interface FanotifyInodeMark {
  ino: bigint;
  /** The inode's device in the kernel's own encoding (major << 20 | minor); see kernelDev. */
  sdev: number;
  mask: bigint;
}

export interface FanotifyGroupInfo {
  /** fanotify_init flags (FAN_CLASS_*, FAN_CLOEXEC, ...). */
  flags: number;
  /** fanotify_init event_f_flags: how event fds are opened. */
  eventFlags: number;
  marks: FanotifyInodeMark[];
}

/**
 * What the kernel says about fd `fd` of this process when it is a fanotify
 * group (its link is anon_inode:[fanotify] and its fdinfo has a
 * "fanotify flags:" line): its init flags and its inode marks; null when
 * it is anything else, or closed.
 */
export function fanotifyGroupInfo(fd: number): FanotifyGroupInfo | null {
  let text: string;
  try {
    if (fs.readlinkSync(`/proc/self/fd/${fd}`) !== 'anon_inode:[fanotify]') return null;
    text = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  } catch {
    return null;
  }
  let info: FanotifyGroupInfo | null = null;
  const marks: FanotifyInodeMark[] = [];
  for (const line of text.split('\n')) {
    const head = /^fanotify flags:([0-9a-f]+) event-flags:([0-9a-f]+)/.exec(line);
    if (head) {
      info = { flags: parseInt(head[1], 16), eventFlags: parseInt(head[2], 16), marks };
      continue;
    }
    const m = /^fanotify ino:([0-9a-f]+) sdev:([0-9a-f]+) mflags:[0-9a-f]+ mask:([0-9a-f]+)/.exec(line);
    if (m) marks.push({ ino: BigInt(`0x${m[1]}`), sdev: parseInt(m[2], 16), mask: BigInt(`0x${m[3]}`) });
  }
  return info;
}

/**
 * stat(2)'s st_dev (glibc's encoding: minor's low 8 bits, then major, then
 * the rest of minor) in the kernel's internal encoding, the one fdinfo's
 * sdev uses: major << 20 | minor.
 */
export function kernelDev(stDev: bigint | number): number {
  const d = BigInt(stDev);
  const major = Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & 0xfffff000n));
  const minor = Number((d & 0xffn) | ((d >> 12n) & 0xffffff00n));
  return ((major << 20) | minor) >>> 0;
}
