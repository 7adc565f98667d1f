import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { cachefilesCommand, fdOfProcess, openCachefiles, pollReadable } from '../../native/cachefiles';
import {
  FAN_ALLOW,
  FAN_CLASS_PRE_CONTENT,
  FAN_CLOEXEC,
  FAN_MARK_ADD,
  FAN_NONBLOCK,
  FAN_PRE_ACCESS,
  O_LARGEFILE,
  O_RDWR,
  closeFd,
  fanDenyErrno,
  fanotifyInit,
  fanotifyMark,
  fanotifyResponse,
  parseFanotifyEvents,
} from '../../native/fanotify';
import { openElsewhereFd } from '../../native/lease';
import { dupTo, eventFd, fcntl } from '../../native/libc';
import { type Frame, readFrames } from './frames';
import { type DaemonMessage, type GroupReply, type HolderNotice, type HolderReply, type HolderRequest, MalformedFrame, decodeDaemonMessage, encodeMessage } from './holder-protocol';

/**
 * The on-demand holder: a minimal process that reads the fanotify
 * pre-content group, so that no daemon crash or restart can let a read of
 * unfetched data through (the kernel allows pending and later accesses once
 * no process holds the group). The daemon holds a copy of the group too
 * ({op:"group"} → {op:"group", pid, fd, fresh}; it takes it with
 * pidfd_getfd), so the group also outlives this process: a holder started
 * after one died is handed the daemon's copy ({op:"group", adopt_pid,
 * adopt_fd, marked}) and reads the events that waited meanwhile.
 *
 * It only relays: each event (a read of a marked lazy file) goes to the
 * connected daemon as {op:"event", id, pid, fd, path, offset, count}, `fd`
 * being the event's fd here. The daemon copies that fd (it raises no
 * events: FMODE_NONOTIFY), writes the range through it, answers the event
 * itself on its copy of the group (the kernel matches a response by the
 * event's fd number, not by whose fd table holds it) and then sends
 * {op:"done", id, answered: true}: only then is the fd closed here, so its
 * number is not reused while the event waits. Without `answered`, {op:"done",
 * id, ok} is turned into FAN_ALLOW or a denial with EIO here, and
 * {op:"fill", id, offset} + bytes is written through the event's fd and
 * confirmed with {op:"filled", id, offset} (or {op:"error", id, offset}:
 * the read is then denied). While no daemon is connected, events wait; a
 * daemon that connects gets every pending one. Marks: {op:"mark", path} →
 * {op:"marked", path} or {op:"error"}; mark a file before anything opens it
 * (a file opened earlier raises no pre-content events). {op:"hello"} →
 * {op:"hello", pid, marked: [paths], group: bool, reserved: [fds]}.
 *
 * Adopting a group that outlived its last reader (systemd's fd store kept
 * it: fdstore.ts), the adopt request may carry `reserve: [fds]`: the fd
 * numbers under which a dead holder read events the daemon still answers
 * (their ranges were written down: relayed-record.ts). Before reading the
 * group, each free number is taken here by a placeholder (/dev/null), so
 * that no event read here gets it while the old event waits (the kernel
 * matches an answer by number, the oldest event first); a number that is
 * not free is denied with EIO at once. {op:"release", fd} (no reply)
 * closes the placeholder once the daemon answered the old event; hello
 * lists the numbers still held, for a daemon started meanwhile.
 *
 * Waiting costs nothing: poll(2) on the group in a worker thread, with no
 * timeout (close() wakes it through an eventfd); the socket file is watched
 * with inotify (fs.watch), not polled.
 *
 * For EROFS over fscache it holds /dev/cachefiles instead (one opener per
 * host; a cache is unbound when its last fd closes): {op:"cachefiles", dir,
 * tag} opens and binds it in on-demand mode once, or with {adopt_pid,
 * adopt_fd} takes a copy of a daemon's fd (a holder started after the
 * previous one died); → {op:"cachefiles", pid, fd, fresh}. The daemon
 * copies that fd (pidfd_getfd) and serves the requests itself; the holder
 * only keeps the cache bound, so requests wait across daemon restarts.
 *
 * The messages are typed and checked in holder-protocol.ts: a request's
 * `req` is echoed in its reply (a request without one, from a daemon of an
 * earlier version, gets a reply without one); a malformed frame is logged
 * and, when it names its request, answered with {op:"error", req}.
 */

interface Pending {
  id: number;
  fd: number;
  path: string;
  offset: number;
  count: number;
  sentTo: net.Socket | null;
  /** A fill could not be written: the read is denied, whatever the daemon says. */
  failed: boolean;
}

export interface HolderOptions {
  /** Unix socket the daemon connects to (mode 0600). */
  socket: string;
  log?: (msg: string) => void;
  /** Called once the socket file is gone or replaced (its directory removed): nothing can reach this holder any more. */
  onOrphaned?: () => void;
  /** Called once the daemon stopped cleanly ({op:"bye"}) and nothing needs this holder any more (see idleCheck). */
  onIdle?: () => void;
  /** How often that is checked after a bye (ms; default 2000). */
  idleCheckMs?: number;
}

export class OndemandHolder {
  /** The fanotify group, made on the first mark (a holder for fscache needs none). */
  private groupFd = -1;
  /** /dev/cachefiles, bound in on-demand mode, once asked for. */
  private cachefiles = -1;
  private readonly server: net.Server;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private client: net.Socket | null = null;
  private readonly buf = Buffer.alloc(64 * 1024);
  /** The loop that waits on the group and relays its events, once there is a group. */
  private waiting: Promise<void> | null = null;
  private watch: fs.FSWatcher | null = null;
  /** Wakes the wait on the group (close). */
  private wake = -1;
  private closed = false;
  /** Files marked in this group (a mark lives as long as the group and the file). */
  private readonly marked = new Set<string>();
  /** Fd numbers held by placeholders while the daemon answers the events a dead holder read under them. */
  private readonly reserved = new Set<number>();
  /** After a bye: the marked files, open read-only here, whose other opens say whether a lazy layer is still in use. */
  private byeFiles: { fd: number; path: string }[] | null = null;
  private idleTimer: NodeJS.Timeout | null = null;

  constructor(private readonly o: HolderOptions) {
    this.server = net.createServer((s) => this.accept(s));
  }

  private get group(): number {
    if (this.groupFd < 0) this.useGroup(fanotifyInit(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE));
    return this.groupFd;
  }

  /** Takes `fd` as the group and starts relaying its events. */
  private useGroup(fd: number): void {
    this.groupFd = fd;
    this.wake = eventFd();
    const wake = this.wake;
    this.waiting = (async () => {
      while (!this.closed) {
        try {
          this.drain();
        } catch (err) {
          this.log(`reading the fanotify group failed: ${(err as Error).message}`);
        }
        await pollReadable([fd, wake], -1);
      }
    })();
  }

  private log(msg: string): void {
    this.o.log?.(msg);
  }

  async listen(): Promise<void> {
    try {
      fs.unlinkSync(this.o.socket);
    } catch {
      // none
    }
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.o.socket, () => resolve());
    });
    fs.chmodSync(this.o.socket, 0o600);
    const ino = fs.statSync(this.o.socket).ino;
    const check = () => {
      let now: number | null = null;
      try {
        now = fs.statSync(this.o.socket).ino;
      } catch {
        // gone
      }
      if (now !== ino) this.o.onOrphaned?.();
    };
    // inotify on its directory: told when the socket or the directory goes, no timer.
    this.watch = fs.watch(path.dirname(this.o.socket), { persistent: false }, check);
    this.watch.on('error', check);
  }

  get pendingCount(): number {
    return this.pending.size;
  }

  /** Reads every queued event and relays it. */
  private drain(): void {
    if (this.groupFd < 0) return;
    for (;;) {
      let n: number;
      try {
        n = fs.readSync(this.groupFd, this.buf, 0, this.buf.length, null);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return;
        throw err;
      }
      for (const ev of parseFanotifyEvents(this.buf, n)) {
        if (ev.fd < 0) continue;
        let path = '';
        try {
          path = fs.readlinkSync(`/proc/self/fd/${ev.fd}`);
        } catch {
          // unknown: the daemon decides
        }
        const p: Pending = { id: this.nextId++, fd: ev.fd, path, offset: ev.range?.offset ?? 0, count: ev.range?.count ?? 0, sentTo: null, failed: false };
        this.pending.set(p.id, p);
        this.send(p);
      }
    }
  }

  private send(p: Pending): void {
    if (!this.client || p.sentTo === this.client) return;
    p.sentTo = this.client;
    this.client.write(encodeMessage({ op: 'event', id: p.id, pid: process.pid, fd: p.fd, path: p.path, offset: p.offset, count: p.count }));
  }

  private accept(s: net.Socket): void {
    if (this.client) this.client.destroy();
    // A daemon is back: a bye's watch ends.
    this.endByeWatch();
    this.client = s;
    this.log('daemon connected');
    readFrames(
      s,
      (f) => this.handle(s, f),
      (err) => this.log(`dropping the daemon's connection: ${err.message}`),
    );
    s.on('close', () => {
      if (this.client === s) {
        this.client = null;
        // Events sent to it wait for the next daemon.
        for (const p of this.pending.values()) if (p.sentTo === s) p.sentTo = null;
        this.log('daemon disconnected; events wait');
      }
    });
    s.on('error', () => undefined);
    for (const p of this.pending.values()) this.send(p);
  }

  private handle(s: net.Socket, frame: Frame): void {
    let m: DaemonMessage;
    try {
      m = decodeDaemonMessage(frame);
    } catch (err) {
      // Said back when it names its request (the daemon waits for a reply), else only logged.
      this.log(`ignoring a malformed frame from the daemon: ${(err as Error).message}`);
      if (err instanceof MalformedFrame && err.req !== undefined) s.write(encodeMessage({ op: 'error', req: err.req, error: err.message }));
      return;
    }
    if (m.op === 'bye') return this.startByeWatch();
    if (m.op === 'done' || m.op === 'release') return this.notice(m);
    // Every reply echoes the request's id (none for a daemon of an earlier version: it matches replies in order).
    const reply = (r: HolderReply): void => void s.write(encodeMessage(m.req === undefined ? r : { ...r, req: m.req }));
    switch (m.op) {
      case 'hello':
        // Which files this group marks: a daemon that finds a lazy file of a
        // mounted layer missing here knows the group was lost (fail-open).
        return reply({ op: 'hello', pid: process.pid, marked: [...this.marked].filter((p) => fs.existsSync(p)), group: this.groupFd >= 0, reserved: [...this.reserved] });
      case 'cachefiles': {
        const fresh = this.cachefiles < 0;
        try {
          if (fresh) this.cachefiles = this.openCachefiles(m);
          reply({ op: 'cachefiles', pid: process.pid, fd: this.cachefiles, fresh });
        } catch (err) {
          reply({ op: 'error', error: (err as Error).message });
        }
        return;
      }
      case 'group':
        try {
          reply(this.shareGroup(m));
        } catch (err) {
          reply({ op: 'error', error: (err as Error).message });
        }
        return;
      case 'mark':
        try {
          fanotifyMark(this.group, FAN_MARK_ADD, FAN_PRE_ACCESS, m.path);
          this.marked.add(m.path);
          reply({ op: 'marked', path: m.path });
        } catch (err) {
          reply({ op: 'error', path: m.path, error: (err as Error).message });
        }
        return;
      case 'fill': {
        const p = this.pending.get(m.id);
        if (!p) return;
        try {
          let off = 0;
          while (off < frame.data.length) off += fs.writeSync(p.fd, frame.data, off, frame.data.length - off, m.offset + off);
          reply({ op: 'filled', id: p.id, offset: m.offset });
        } catch (err) {
          p.failed = true;
          reply({ op: 'error', id: p.id, offset: m.offset, error: (err as Error).message });
        }
        return;
      }
    }
  }

  /** The group for {op:"group"}: this holder's (made now if none), or a copy of the daemon's it adopts. */
  private shareGroup(m: Extract<HolderRequest, { op: 'group' }>): GroupReply {
    const fresh = this.groupFd < 0;
    if (!fresh || m.adopt_pid === undefined || m.adopt_fd === undefined) return { op: 'group', pid: process.pid, fd: this.group, fresh };
    // The daemon's copy of a group a previous holder made: its marks and unread events are there.
    // Numbers of events a dead holder read are taken first: no event read here may get one.
    const wanted = (m.reserve ?? []).filter((n) => n > 2 && n < 1 << 20);
    const taken = this.reserve(wanted);
    const fd = fdOfProcess(m.adopt_pid, m.adopt_fd);
    const refused = wanted.filter((n) => !taken.includes(n));
    // Before this holder reads: an answer by number must meet the old event, not a new one.
    for (const n of refused) {
      try {
        fs.writeSync(fd, fanotifyResponse(n, fanDenyErrno(os.constants.errno.EIO)));
      } catch {
        // answered already
      }
    }
    this.useGroup(fd);
    for (const p of m.marked ?? []) this.marked.add(p);
    this.log(
      `reading the fanotify group again (a copy of fd ${m.adopt_fd} of pid ${m.adopt_pid}, ${this.marked.size} files marked${wanted.length ? `; ${taken.length} fd numbers of a dead holder's events held for the daemon, ${refused.length} denied` : ''})`,
    );
    return { op: 'group', pid: process.pid, fd: this.groupFd, fresh: false, adopted: true, reserved: taken, refused };
  }

  /**
   * {op:"bye"}: the daemon stops cleanly. Every marked file is opened here
   * now (while its path exists) and checked every idleCheckMs: once no
   * daemon is connected, no event waits, no placeholder is held and no
   * marked file is open anywhere else (a lazy layer's mount, or a
   * container's overlay over it, keeps its files open), nothing can read
   * unfetched data any more and the holder is not needed: onIdle. A holder
   * of /dev/cachefiles stays: the kernel's use of a cache cannot be told.
   */
  private startByeWatch(): void {
    if (this.cachefiles >= 0) {
      this.log('the daemon stopped cleanly; this holder keeps /dev/cachefiles bound for its layers (stop it by its pid once no layer is mounted)');
      return;
    }
    this.endByeWatch();
    const files: { fd: number; path: string }[] = [];
    for (const p of this.marked) {
      try {
        files.push({ fd: fs.openSync(p, fs.constants.O_RDONLY), path: p });
      } catch {
        // gone: nothing can open it again
      }
    }
    this.byeFiles = files;
    this.log(`the daemon stopped cleanly; exiting once none of the ${files.length} marked files is in use`);
    this.idleTimer = setInterval(() => this.idleCheck(), this.o.idleCheckMs ?? 2000);
    this.idleCheck();
  }

  private idleCheck(): void {
    const files = this.byeFiles;
    if (!files || this.client || this.pending.size > 0 || this.reserved.size > 0) return;
    for (const f of files) {
      try {
        if (openElsewhereFd(f.fd, f.path)) return;
      } catch (err) {
        this.log(`cannot tell whether ${f.path} is in use (${(err as Error).message}); staying`);
        this.endByeWatch();
        return;
      }
    }
    this.log('no lazy layer is in use and the daemon stopped cleanly: exiting');
    this.endByeWatch();
    this.o.onIdle?.();
  }

  private endByeWatch(): void {
    if (this.idleTimer) clearInterval(this.idleTimer);
    this.idleTimer = null;
    for (const f of this.byeFiles ?? []) fs.closeSync(f.fd);
    this.byeFiles = null;
  }

  /** done (an event is over) and release (a placeholder may go): no reply. */
  private notice(m: Exclude<HolderNotice, { op: 'bye' }>): void {
    if (m.op === 'release') {
      if (this.reserved.delete(m.fd)) closeFd(m.fd);
      return;
    }
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(p.id);
    if (m.answered === true) {
      // The daemon answered it on its copy of the group: the fd number may go.
      closeFd(p.fd);
      return;
    }
    const response = m.ok === true && !p.failed ? FAN_ALLOW : fanDenyErrno(os.constants.errno.EIO);
    try {
      fs.writeSync(this.group, fanotifyResponse(p.fd, response));
    } finally {
      closeFd(p.fd);
    }
  }

  /** Takes each free fd number of `fds` with a placeholder (/dev/null); returns those taken. */
  private reserve(fds: number[]): number[] {
    if (fds.length === 0) return [];
    const taken: number[] = [];
    let placeholder = fs.openSync('/dev/null', fs.constants.O_RDONLY);
    // The placeholder itself may have got a wanted number: it holds that one.
    while (fds.includes(placeholder) && !this.reserved.has(placeholder)) {
      this.reserved.add(placeholder);
      taken.push(placeholder);
      placeholder = fs.openSync('/dev/null', fs.constants.O_RDONLY);
    }
    try {
      for (const n of fds) {
        if (this.reserved.has(n)) {
          if (!taken.includes(n)) taken.push(n);
          continue;
        }
        // F_GETFD fails (EBADF) only for a number nothing holds.
        if (fcntl(n, 1, 0) >= 0) continue;
        try {
          dupTo(placeholder, n);
        } catch {
          continue; // beyond this process's fd limit: not taken (denied)
        }
        this.reserved.add(n);
        taken.push(n);
      }
    } finally {
      fs.closeSync(placeholder);
    }
    return taken;
  }

  /** /dev/cachefiles: a copy of a daemon's fd (adopt), or opened and bound in on-demand mode. */
  private openCachefiles(head: Extract<HolderRequest, { op: 'cachefiles' }>): number {
    if (head.adopt_pid !== undefined && head.adopt_fd !== undefined) {
      const fd = fdOfProcess(head.adopt_pid, head.adopt_fd);
      this.log(`holding /dev/cachefiles (a copy of fd ${head.adopt_fd} of pid ${head.adopt_pid})`);
      return fd;
    }
    if (head.dir === undefined || head.tag === undefined) throw new Error('cachefiles needs dir and tag');
    fs.mkdirSync(head.dir, { recursive: true, mode: 0o700 });
    const fd = openCachefiles();
    try {
      for (const c of [`dir ${head.dir}`, `tag ${head.tag}`, 'bind ondemand']) cachefilesCommand(fd, c);
    } catch (err) {
      fs.closeSync(fd);
      if (/EOPNOTSUPP/.test((err as Error).message)) throw new Error(`${(err as Error).message} (the cache directory ${head.dir} must be on a disk filesystem with xattrs: ext4, xfs, btrfs)`);
      throw err;
    }
    this.log(`bound /dev/cachefiles in on-demand mode, cache in ${head.dir}`);
    return fd;
  }

  /** Stops relaying: what is pending is denied with EIO (never allowed unfilled). */
  async close(): Promise<void> {
    this.closed = true;
    this.endByeWatch();
    this.watch?.close();
    // The wait on the group ends once woken; the fds are closed only after it.
    if (this.wake >= 0) fs.writeSync(this.wake, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
    await this.waiting?.catch(() => undefined);
    if (this.wake >= 0) closeFd(this.wake);
    for (const p of this.pending.values()) {
      try {
        fs.writeSync(this.group, fanotifyResponse(p.fd, fanDenyErrno(os.constants.errno.EIO)));
      } catch {
        // the group goes next anyway
      }
      closeFd(p.fd);
    }
    this.pending.clear();
    this.client?.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
    if (this.groupFd >= 0) closeFd(this.groupFd);
    if (this.cachefiles >= 0) fs.closeSync(this.cachefiles);
  }
}
