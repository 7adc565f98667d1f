import { FAN_CLASS_CONTENT, FAN_CLASS_PRE_CONTENT, O_RDWR, closeFd, fanotifyGroupInfo } from '../../native/fanotify';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { type ListenFd, sdNotifyWithFds } from '../systemd/notify';

/**
 * systemd's fd store as the third holder of the fanotify pre-content
 * group (fanotify backend), next to the on-demand holder and the daemon.
 *
 * The kernel lets reads of marked files through once no process holds the
 * group. Holder and daemon hold it; when both die at once (kill -9 of the
 * two, an OOM kill of the unit's cgroup), the copy systemd keeps for this
 * unit still holds it: reads wait, the events stay queued, and the next
 * daemon gets the group back at start (LISTEN_FDS) and hands it to a new
 * holder. The unit needs `FileDescriptorStoreMax=` above 0; systemd keeps
 * the store across restarts of the unit (automatic or `systemctl
 * restart`) and empties it when the unit stops (unless
 * `FileDescriptorStorePreserve=yes`).
 *
 * One stored copy, under the name GROUP_FDNAME. systemd allows several fds
 * of one name (it only drops an fd that is the very same open file as one
 * it holds), so storing a group it may not hold yet removes the name first
 * (FDSTOREREMOVE=1) and then stores it (FDSTORE=1): whatever the store held
 * before under that name (a group lost earlier) is gone. `FDPOLL=0`: the
 * group is never "hung up", but systemd need not watch it either.
 */
export const GROUP_FDNAME = 'dedup-fanotify';

export interface GroupFdStoreOptions {
  /** Where NOTIFY_SOCKET is read (process.env). */
  env?: NodeJS.ProcessEnv;
  logger?: Logger;
}

export class GroupFdStore {
  private readonly env: NodeJS.ProcessEnv;
  private readonly log: Logger;
  /** The store holds the group this daemon uses (given back at start, or stored since). */
  private holds = false;
  private warned = false;

  constructor(o: GroupFdStoreOptions = {}) {
    this.env = o.env ?? process.env;
    this.log = o.logger ?? silentLogger();
  }

  /** Whether a service manager listens (NOTIFY_SOCKET is set). */
  get enabled(): boolean {
    return Boolean(this.env.NOTIFY_SOCKET);
  }

  /** The store is known to hold the group in use already (it handed it back at start). */
  markHeld(): void {
    this.holds = true;
  }

  /**
   * Stores `fd` (this daemon's copy of the group) as the one copy under
   * GROUP_FDNAME, unless the store holds it already (`replace`: it holds
   * another group, if any). Never throws: a socket that refuses it is one
   * warning (reads then wait only while holder or daemon lives). Returns
   * whether it was sent.
   */
  keep(fd: number, why: string, replace = false): boolean {
    if (replace) this.holds = false;
    if (!this.enabled || this.holds) return false;
    try {
      sdNotifyWithFds({ FDSTOREREMOVE: 1, FDNAME: GROUP_FDNAME }, [], this.env);
      sdNotifyWithFds({ FDSTORE: 1, FDNAME: GROUP_FDNAME, FDPOLL: 0 }, [fd], this.env);
    } catch (err) {
      if (!this.warned) {
        this.warned = true;
        this.log.warn(
          { op: 'ondemand', notify_socket: this.env.NOTIFY_SOCKET, err: (err as Error).message },
          `systemd's fd store did not take the fanotify group (${(err as Error).message}): lazy reads wait across the death of the daemon or of the holder, not of both at once`,
        );
      }
      return false;
    }
    this.holds = true;
    this.log.info(
      { op: 'ondemand', fdname: GROUP_FDNAME, fdstore_max: this.env.FDSTORE ?? null },
      `stored the fanotify group in systemd's fd store as ${GROUP_FDNAME} (${why}): lazy reads wait even if daemon and holder die together`,
    );
    return true;
  }

  /** Removes what the store keeps under GROUP_FDNAME (the group this daemon used is given up). Never throws. */
  forget(why: string): void {
    this.holds = false;
    if (!this.enabled) return;
    try {
      sdNotifyWithFds({ FDSTOREREMOVE: 1, FDNAME: GROUP_FDNAME }, [], this.env);
      this.log.info({ op: 'ondemand', fdname: GROUP_FDNAME }, `removed ${GROUP_FDNAME} from systemd's fd store: ${why}`);
    } catch (err) {
      this.log.warn({ op: 'ondemand', err: (err as Error).message }, `cannot remove ${GROUP_FDNAME} from systemd's fd store: ${(err as Error).message}`);
    }
  }
}

/** Why fd `fd` cannot be the group: not a fanotify group, or not one made the way the holder makes it; null when it can. */
function unusableGroup(fd: number): string | null {
  const info = fanotifyGroupInfo(fd);
  if (!info) return 'it is not a fanotify group';
  if ((info.flags & (FAN_CLASS_CONTENT | FAN_CLASS_PRE_CONTENT)) !== FAN_CLASS_PRE_CONTENT) return `its class is not pre-content (flags 0x${info.flags.toString(16)})`;
  if ((info.eventFlags & 3) !== O_RDWR) return `its event fds are not read-write (event flags 0x${info.eventFlags.toString(16)})`;
  return null;
}

/**
 * Picks the fanotify group out of the fds systemd handed over at start
 * (sdListenFds): the first one named GROUP_FDNAME that is a pre-content
 * group with read-write event fds. Any other fd of that name is closed,
 * with a warning, and never used (and the name removed from the store, so
 * that it is not handed over again); fds of other names are closed (this
 * daemon stores no others) and left in the store. Returns the group's fd
 * (this process's, FD_CLOEXEC) or -1. `wanted` false (no fanotify
 * backend): the group is closed and removed from the store.
 */
export function takeStoredGroup(fds: ListenFd[], store: GroupFdStore, wanted: boolean, logger: Logger): number {
  let group = -1;
  let clean = true;
  for (const { fd, name } of fds) {
    if (name !== GROUP_FDNAME) {
      logger.warn({ op: 'start', fd, fdname: name }, `systemd passed fd ${fd} named ${JSON.stringify(name)}, which this daemon does not use: closed`);
      closeQuietly(fd);
      continue;
    }
    const why = group >= 0 ? 'a second one of that name' : unusableGroup(fd);
    if (why) {
      logger.warn({ op: 'ondemand', fd, fdname: name, err: why }, `systemd's fd store handed back fd ${fd} as ${GROUP_FDNAME}, but ${why}: closed, never used`);
      closeQuietly(fd);
      clean = false;
      continue;
    }
    group = fd;
  }
  if (group >= 0 && !wanted) {
    closeQuietly(group);
    store.forget('on-demand loading does not use fanotify now');
    return -1;
  }
  if (!clean) store.forget('it held fds that are not the group');
  if (group >= 0) {
    // Removed with the bad ones: stored again once the group is in use.
    if (clean) store.markHeld();
    const marks = fanotifyGroupInfo(group)?.marks.length ?? 0;
    logger.info(
      { op: 'ondemand', fd: group, fdname: GROUP_FDNAME, marks },
      `took the fanotify group back from systemd's fd store (fd ${group}, ${marks} files marked): reads waiting on it are answered from now on`,
    );
  }
  return group;
}

function closeQuietly(fd: number): void {
  try {
    closeFd(fd);
  } catch {
    // gone already
  }
}
