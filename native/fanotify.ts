/**
 * fanotify_init(2), fanotify_mark(2) and close(2): enough to ask the kernel
 * whether it delivers pre-content events (FAN_PRE_ACCESS, Linux ≥ 6.14) on a
 * given file. Constants are from <linux/fanotify.h>; FAN_PRE_ACCESS is not in
 * Debian 12's linux-libc-dev (6.1), its value is the 6.14 uapi one.
 */
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
