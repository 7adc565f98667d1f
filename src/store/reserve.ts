import fs from 'node:fs';
import path from 'node:path';
import { allocate } from '../../native/fallocate';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';

/**
 * A few MiB of ROOT's filesystem held back so a full disk can always be
 * cleaned (issue 12, item 6: after a pull failed with ENOSPC, containerd's
 * Remove of the partial snapshot failed too, "database or disk is full", and
 * its 100 MB stayed until space was freed by hand).
 *
 * Removing a snapshot deletes its row before its directory (crash safety),
 * and that DELETE needs space: SQLite appends WAL frames for every page it
 * changes. So ROOT/reserve, a file with real blocks (fallocate), is made at
 * start. When a delete fails because the disk is full, `whenFull` first lets
 * the WAL start over in the space it already has (a checkpoint), then gives
 * the reserve back one slice (RESERVE_SLICE, the file truncated) at a time
 * until the delete goes through: one Remove takes one slice, so the next
 * Remove on a disk that is still full (several partial snapshots removed one
 * after another, something else writing meanwhile) has slices left. One warn
 * line per slice (op "reserve"). Slices are made again (fallocate, the file
 * grows back) while that leaves twice the reserve's size free, checked after
 * each Remove and every RETRY_MS; doctor warns while it is short.
 */

export const RESERVE_FILE = 'reserve';
export const DEFAULT_RESERVE_BYTES = 8 << 20;
/** What one Remove on a full disk takes (the last slice may be shorter). */
export const RESERVE_SLICE = 1 << 20;
const RETRY_MS = 30_000;

/** held: all of it; partial: slices of it given to Removes on a full disk; released: none left (or not made yet); off: disk_reserve_mb 0. */
export type ReserveState = 'held' | 'partial' | 'released' | 'off';

export interface ReserveStatus {
  state: ReserveState;
  /** Its full size. */
  bytes: number;
  /** What is held now. */
  held_bytes: number;
  path: string;
  /** When a slice was last released (ISO 8601), while it is not whole. */
  released_at: string | null;
  /** Why it is not whole: what failed, or why it could not be made. */
  reason: string | null;
}

/**
 * An error that says the disk (or the quota) is full: SQLite's SQLITE_FULL
 * or SQLITE_IOERR_SHMSIZE (the WAL's shared-memory file could not be given
 * blocks, when the database is opened on a full disk), or the kernel's
 * ENOSPC/EDQUOT.
 */
export function isDiskFull(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'SQLITE_FULL' || code === 'SQLITE_IOERR_SHMSIZE' || code === 'ENOSPC' || code === 'EDQUOT';
}

/** Bytes of `file` backed by real blocks (0 when it is missing): its size, unless fewer blocks back it. */
export function heldBytes(file: string): number {
  try {
    const st = fs.statSync(file);
    return Math.min(st.size, st.blocks * 512);
  } catch {
    return 0;
  }
}

/** Whether ROOT/reserve is there with at least `bytes` allocated (for doctor, which runs beside the daemon). */
export function reserveOnDisk(root: string, bytes: number): 'held' | 'missing' | 'short' {
  const file = path.join(root, RESERVE_FILE);
  if (!fs.existsSync(file)) return 'missing';
  return heldBytes(file) >= bytes ? 'held' : 'short';
}

/** Ways for `whenFull` to find space before it takes a slice of the reserve. */
export interface FullDiskHelp {
  /**
   * Lets the metadata write reuse space the database already has (a WAL
   * checkpoint: the next transaction starts the WAL over instead of
   * growing it); returns whether that may help. Also run after a write
   * that went through on a full disk, so that the next one finds the WAL
   * reusable.
   */
  reuse?: () => boolean;
}

export class SpaceReserve {
  readonly file: string;
  private state: ReserveState;
  /** Bytes held now (as of the last restore or release). */
  private have = 0;
  private releasedAt: number | null = null;
  private reason: string | null = null;
  private timer: NodeJS.Timeout | null = null;
  private readonly log: Logger;

  constructor(private readonly o: { root: string; bytes: number; logger?: Logger; retryMs?: number }) {
    this.file = path.join(o.root, RESERVE_FILE);
    this.log = o.logger ?? silentLogger();
    this.state = o.bytes > 0 ? 'released' : 'off';
    if (o.bytes === 0) fs.rmSync(this.file, { force: true });
    // A temp file of an older version's restore that a crash left.
    fs.rmSync(`${this.file}.tmp`, { force: true });
  }

  get status(): ReserveStatus {
    const whole = this.state === 'held' || this.state === 'off';
    return {
      state: this.state,
      bytes: this.o.bytes,
      held_bytes: this.state === 'off' ? 0 : this.have,
      path: this.file,
      released_at: !whole && this.releasedAt !== null ? new Date(this.releasedAt).toISOString() : null,
      reason: whole ? null : this.reason,
    };
  }

  /**
   * Makes the reserve whole again, or as much of it (whole slices) as the
   * disk has room for while twice the reserve's size stays free (so making
   * it does not fill the disk at once). Returns whether it is whole now;
   * never throws.
   */
  restore(): boolean {
    if (this.state === 'off') return false;
    try {
      this.have = heldBytes(this.file);
      if (this.have >= this.o.bytes) return this.held(false);
      const s = fs.statfsSync(this.o.root);
      const free = s.bavail * s.bsize;
      const room = Math.floor((free - 2 * this.o.bytes) / RESERVE_SLICE) * RESERVE_SLICE;
      const grow = Math.min(this.o.bytes - this.have, room);
      if (grow <= 0) {
        // After a release its warn line said so; at start, say it once here.
        if (this.reason === null && this.releasedAt === null) {
          this.log.warn({ op: 'reserve', bytes: this.o.bytes, held: this.have, free }, `disk reserve ${this.file} not made${this.have > 0 ? ` whole (${this.have} bytes held)` : ''}: ${free} bytes free on ROOT's filesystem, ${2 * this.o.bytes + Math.min(RESERVE_SLICE, this.o.bytes)} needed; a Remove on a full disk may fail until it is`);
        }
        this.reason ??= `${free} bytes free on ROOT's filesystem, ${2 * this.o.bytes + Math.min(RESERVE_SLICE, this.o.bytes)} needed to make it`;
        this.state = this.have > 0 ? 'partial' : 'released';
        return this.retryLater();
      }
      this.grow(this.have + grow);
      this.have += grow;
      if (this.have >= this.o.bytes) return this.held(true);
      this.state = 'partial';
      return this.retryLater();
    } catch (err) {
      const first = this.reason === null;
      this.reason = `cannot make ${this.file}: ${(err as Error).message}`;
      this.have = heldBytes(this.file);
      this.state = this.have > 0 ? 'partial' : 'released';
      if (first) this.log.warn({ op: 'reserve', err: (err as Error).message }, `disk reserve ${this.file} cannot be made: ${(err as Error).message}; trying again every ${(this.o.retryMs ?? RETRY_MS) / 1000} s`);
      return this.retryLater();
    }
  }

  /** The file grows to `size` bytes of real blocks (in place: what it held stays held meanwhile). */
  private grow(size: number): void {
    const fd = fs.openSync(this.file, fs.constants.O_WRONLY | fs.constants.O_CREAT, 0o600);
    try {
      try {
        allocate(fd, 0, size);
      } catch (err) {
        // A filesystem without fallocate: zeros written take blocks too.
        if ((err as { code?: string }).code !== 'EOPNOTSUPP') throw err;
        const zeros = Buffer.alloc(1 << 20);
        for (let at = this.have; at < size; ) at += fs.writeSync(fd, zeros, 0, Math.min(zeros.length, size - at), at);
      }
      fs.fsyncSync(fd);
    } catch (err) {
      // What could not be had is given back; what was held before stays.
      try {
        fs.ftruncateSync(fd, this.have);
      } catch {
        // the next restore measures what is there
      }
      throw err;
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * Gives one slice of the reserve back (the file truncated, its blocks
   * freed) so `what` can go through (`err`: what failed without it); one
   * warn line. Returns whether there was any left to give.
   */
  release(what: string, err: string | null = null): boolean {
    if (this.state === 'off') return false;
    // What is on disk (at start, before restore, too).
    this.have = heldBytes(this.file);
    if (this.have <= 0) {
      this.state = 'released';
      return false;
    }
    const left = Math.max(0, this.have - RESERVE_SLICE);
    if (left === 0) fs.rmSync(this.file, { force: true });
    else {
      const fd = fs.openSync(this.file, fs.constants.O_WRONLY);
      try {
        fs.ftruncateSync(fd, left);
        // The blocks are free for others once the truncate is committed.
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    }
    const given = this.have - left;
    this.have = left;
    this.state = left > 0 ? 'partial' : 'released';
    this.releasedAt = Date.now();
    this.reason = err ? `${what}: ${err}` : what;
    this.log.warn(
      { op: 'reserve', bytes: this.o.bytes, released: given, left, err },
      `disk full: released ${given} bytes of the ${this.o.bytes}-byte disk reserve ${this.file} (${left} left) so ${what} can go through; it is made whole again once there is room`,
    );
    this.retryLater();
    return true;
  }

  /**
   * Runs `fn` (synchronous: a metadata transaction). When it fails because
   * the disk is full: `help.reuse` first, then one slice of the reserve at
   * a time, `fn` run again after each, until it goes through; with nothing
   * left to free, its last error. `what` names the operation in log lines.
   */
  whenFull<T>(what: string, fn: () => T, help: FullDiskHelp = {}): T {
    let last: unknown;
    try {
      return fn();
    } catch (err) {
      if (!isDiskFull(err)) throw err;
      last = err;
    }
    const again = (): { ok: true; value: T } | { ok: false } => {
      try {
        const value = fn();
        // The WAL grew into freed space: let the next write reuse it.
        help.reuse?.();
        return { ok: true, value };
      } catch (err) {
        if (!isDiskFull(err)) throw err;
        last = err;
        return { ok: false };
      }
    };
    if (help.reuse?.()) {
      const r = again();
      if (r.ok) {
        this.log.info({ op: 'reserve' }, `disk full: ${what} went through in the space the metadata database already had`);
        return r.value;
      }
    }
    while (this.release(what, (last as Error).message)) {
      const r = again();
      if (r.ok) return r.value;
    }
    throw last;
  }

  /**
   * Gives one slice back when less than a quarter of a slice is free on
   * ROOT's filesystem, so `what` (start-up recovery: its metadata writes)
   * does not fail for want of space. Returns whether it did.
   */
  makeRoom(what: string): boolean {
    if (this.state === 'off') return false;
    try {
      const s = fs.statfsSync(this.o.root);
      const free = s.bavail * s.bsize;
      if (free >= RESERVE_SLICE / 4) return false;
      return this.release(what, `${free} bytes free on ROOT's filesystem`);
    } catch {
      return false;
    }
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  private held(made: boolean): boolean {
    // Short before (released, or not made at start): say it is back.
    const was = this.releasedAt ?? (this.reason !== null ? Date.now() : null);
    this.state = 'held';
    this.reason = null;
    this.releasedAt = null;
    this.close();
    if (made && was !== null) this.log.info({ op: 'reserve', bytes: this.o.bytes }, `disk reserve ${this.file} made whole again`);
    return true;
  }

  private retryLater(): false {
    if (!this.timer) {
      this.timer = setInterval(() => this.restore(), this.o.retryMs ?? RETRY_MS);
      this.timer.unref();
    }
    return false;
  }
}
