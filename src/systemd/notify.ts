import { setCloexec } from '../../native/libc';
import { sendUnixDatagram } from '../../native/socket';

/**
 * The sd_notify(3) protocol without libsystemd: one datagram of
 * newline-separated KEY=value lines to the unix socket named by
 * NOTIFY_SOCKET (a path, or '@' for the abstract namespace). With
 * `Type=notify`, systemd sets it and waits for `READY=1` before it starts
 * units ordered after this one (containerd).
 */
function stateText(state: Record<string, string | number>): string {
  return Object.entries(state)
    .map(([k, v]) => `${k}=${String(v).replace(/\n/g, ' ')}`)
    .join('\n');
}

/** Sends `state`; without NOTIFY_SOCKET (not under systemd) does nothing. Returns whether a message was sent. Throws ErrnoError. */
export function sdNotify(state: Record<string, string | number>, env: NodeJS.ProcessEnv = process.env): boolean {
  const address = env.NOTIFY_SOCKET;
  if (!address) return false;
  sendUnixDatagram(address, stateText(state));
  return true;
}

/**
 * As sd_pid_notify_with_fds(3): `state` with `fds` passed along as
 * SCM_RIGHTS (systemd gets its own copies; these stay open here). Used for
 * the fd store: `FDSTORE=1` with `FDNAME=` keeps the fds in the service
 * manager, which hands them back at the next start of the service
 * (sdListenFds); `FDSTOREREMOVE=1` with `FDNAME=` (and no fds) closes every
 * stored fd of that name. The service manager takes them only when the
 * unit has `FileDescriptorStoreMax=` above 0 (it drops them otherwise, with
 * a line in its own log, not an error here). Without NOTIFY_SOCKET does
 * nothing and returns false. Throws ErrnoError (EPERM: the socket refuses
 * fds).
 */
export function sdNotifyWithFds(state: Record<string, string | number>, fds: number[], env: NodeJS.ProcessEnv = process.env): boolean {
  const address = env.NOTIFY_SOCKET;
  if (!address) return false;
  sendUnixDatagram(address, stateText(state), fds);
  return true;
}

/** Valid fd store names (systemd's fdname_is_valid): 1‥255 printable ASCII characters, no ':'. */
export function validFdName(name: string): boolean {
  return name.length > 0 && name.length <= 255 && /^[\x20-\x7e]+$/.test(name) && !name.includes(':');
}

/** The first fd systemd passes (SD_LISTEN_FDS_START). */
export const LISTEN_FDS_START = 3;

export interface ListenFd {
  fd: number;
  /** Its FDNAME (LISTEN_FDNAMES), "unknown" when systemd gave none. */
  name: string;
}

/**
 * sd_listen_fds_with_names(3) with unset_environment: the fds the service
 * manager passed to this process (socket activation, or its fd store given
 * back): LISTEN_FDS of them from fd 3 on, named by LISTEN_FDNAMES
 * (colon-separated), only when LISTEN_PID is this process (else they were
 * meant for another: none). Each gets FD_CLOEXEC, so that no child this
 * process starts inherits it; LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are
 * removed from `env` in every case, for the same reason. An fd that is not
 * open (a wrong LISTEN_FDS) is left out.
 */
export function sdListenFds(env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): ListenFd[] {
  const listenPid = env.LISTEN_PID;
  const listenFds = env.LISTEN_FDS;
  const names = env.LISTEN_FDNAMES;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (!listenPid || !/^\d+$/.test(listenPid) || Number(listenPid) !== pid) return [];
  if (!listenFds || !/^\d+$/.test(listenFds)) return [];
  const n = Math.min(Number(listenFds), 4096);
  const nameList = names ? names.split(':') : [];
  const out: ListenFd[] = [];
  for (let i = 0; i < n; i++) {
    const fd = LISTEN_FDS_START + i;
    try {
      setCloexec(fd);
    } catch {
      continue;
    }
    out.push({ fd, name: nameList[i] || 'unknown' });
  }
  return out;
}
