import fs from 'node:fs';
import os from 'node:os';
import { fdOfProcess } from '../../native/cachefiles';
import { FAN_ALLOW, type FanotifyInodeMark, closeFd, fanDenyErrno, fanotifyGroupInfo, fanotifyResponse } from '../../native/fanotify';
import { sameOpenFile } from '../../native/libc';
import { writeAllAt } from '../store/chunkstore';

/**
 * The daemon's side of the fanotify pre-content group (fanotify backend).
 *
 * The holder (holder.ts) makes the group and reads its events; this daemon
 * keeps a copy of the group's fd (pidfd_getfd: the same open file, so the
 * group, its marks and its queued events live while either process holds
 * it). The kernel lets reads of marked files through only once no process
 * holds the group; with two holders, the death of either one keeps them
 * waiting.
 *
 * For each event the holder relays, this daemon takes a copy of the event's
 * fd too: the file opened FMODE_NONOTIFY, so writes through it raise no
 * event (a write through any other fd of a marked file would wait for this
 * very daemon). It fills the range through that copy and answers the event
 * on its copy of the group: the kernel finds the waiting event by the fd
 * number the holder read it with (process_access_response walks the group's
 * access list), whichever process writes the response. So a read the dead
 * holder had relayed is still served, with the right bytes. Events the
 * holder had not read yet stay queued in the group for the next holder
 * (started with a copy of this fd). Events it had read but not relayed (a
 * kill between its read(2) and its write to the socket) are denied with EIO
 * by number (denyUnknown) before the next holder reads anything, so no
 * number of its is mistaken for theirs.
 *
 * systemd's fd store may keep a third copy (fdstore.ts): a daemon started
 * after holder and daemon both died gets it back at start and adopts it
 * here (adopt), learning what it marks from the kernel (marks).
 */
export class SharedGroup {
  /** This daemon's copy of the group, or -1. */
  private fd = -1;

  get held(): boolean {
    return this.fd >= 0;
  }

  /** The fd number of this daemon's copy (for a holder to adopt), or -1. */
  get fdNumber(): number {
    return this.fd;
  }

  /** Takes a copy of fd `fd` of process `pid` (the holder's group), once. */
  copyFrom(pid: number, fd: number): void {
    if (this.fd >= 0) return;
    this.fd = fdOfProcess(pid, fd);
  }

  /** Takes `fd`, a copy of the group this process was given (systemd's fd store), once; it is closed with this copy. */
  adopt(fd: number): void {
    if (this.fd >= 0) throw new Error('this daemon holds a fanotify group already');
    this.fd = fd;
  }

  /**
   * Whether fd `fd` of process `pid` is this very group (the same open
   * file); null when the kernel cannot say (before Linux 6.10).
   */
  sameAs(pid: number, fd: number): boolean | null {
    if (this.fd < 0) return false;
    const other = fdOfProcess(pid, fd);
    try {
      return sameOpenFile(this.fd, other);
    } finally {
      closeFd(other);
    }
  }

  /** Lets go of this copy and takes one of fd `fd` of process `pid` instead. */
  replaceFrom(pid: number, fd: number): void {
    const next = fdOfProcess(pid, fd);
    this.close();
    this.fd = next;
  }

  /** The group's inode marks, as the kernel lists them (/proc/self/fdinfo). */
  marks(): FanotifyInodeMark[] {
    if (this.fd < 0) return [];
    return fanotifyGroupInfo(this.fd)?.marks ?? [];
  }

  /**
   * Answers the event the holder read as fd `eventFd`: allowed, or denied
   * with EIO. False when no such event waits (answered already, or the
   * group was lost).
   */
  answer(eventFd: number, ok: boolean): boolean {
    if (this.fd < 0) return false;
    try {
      fs.writeSync(this.fd, fanotifyResponse(eventFd, ok ? FAN_ALLOW : fanDenyErrno(os.constants.errno.EIO)));
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  }

  /**
   * Denies with EIO every event a dead holder read and nobody answered:
   * the kernel knows them only by fd number, so every number below `max`
   * not answered yet is tried (ENOENT for the rest), except those in
   * `keep` (events whose range is known: answered once it is filled). Call
   * it only while no process reads the group. Returns how many were denied.
   */
  denyUnknown(max = 4096, keep: ReadonlySet<number> = new Set()): number {
    let n = 0;
    for (let fd = 0; fd < max && this.fd >= 0; fd++) if (!keep.has(fd) && this.answer(fd, false)) n++;
    return n;
  }

  close(): void {
    if (this.fd >= 0) closeFd(this.fd);
    this.fd = -1;
  }
}

/**
 * A copy of a relayed event's fd (pidfd_getfd of the holder's): the lazy
 * file, opened read-write and FMODE_NONOTIFY. Writes through it raise no
 * pre-content event.
 */
export class EventFile {
  private constructor(private fd: number) {}

  /** Null when the holder or its fd is gone already. */
  static copy(pid: number, fd: number): EventFile | null {
    try {
      return new EventFile(fdOfProcess(pid, fd));
    } catch {
      return null;
    }
  }

  /** Writes all of `bytes` at `offset`; resolves once the kernel has them (page cache). */
  async write(offset: number, bytes: Buffer): Promise<void> {
    if (this.fd < 0) throw new Error('the event is answered already');
    await writeAllAt(this.fd, bytes, offset);
  }

  close(): void {
    if (this.fd >= 0) closeFd(this.fd);
    this.fd = -1;
  }
}
