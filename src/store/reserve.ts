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
 * start; when a delete fails because the disk is full, the file is deleted
 * (one warn line, op "reserve") and the delete runs again in the space it
 * gave back. It is made again once the disk has room (3x its size free),
 * checked after each Remove and every RETRY_MS; doctor warns while it is
 * missing.
 */

export const RESERVE_FILE = 'reserve';
export const DEFAULT_RESERVE_BYTES = 8 << 20;
const RETRY_MS = 30_000;

export type ReserveState = 'held' | 'released' | 'off';

export interface ReserveStatus {
  state: ReserveState;
  bytes: number;
  path: string;
  /** When it was last released (ISO 8601), while it is. */
  released_at: string | null;
  /** Why it is released: what failed, or why it could not be made. */
  reason: string | null;
}

/** An error that says the disk (or the quota) is full: SQLite's SQLITE_FULL or the kernel's ENOSPC/EDQUOT. */
export function isDiskFull(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'SQLITE_FULL' || code === 'ENOSPC' || code === 'EDQUOT';
}

/** Whether ROOT/reserve is there with at least `bytes` allocated (for doctor, which runs beside the daemon). */
export function reserveOnDisk(root: string, bytes: number): 'held' | 'missing' | 'short' {
  try {
    const st = fs.statSync(path.join(root, RESERVE_FILE));
    return st.blocks * 512 >= bytes ? 'held' : 'short';
  } catch {
    return 'missing';
  }
}

export class SpaceReserve {
  readonly file: string;
  private state: ReserveState;
  private releasedAt: number | null = null;
  private reason: string | null = null;
  private timer: NodeJS.Timeout | null = null;
  private readonly log: Logger;

  constructor(private readonly o: { root: string; bytes: number; logger?: Logger; retryMs?: number }) {
    this.file = path.join(o.root, RESERVE_FILE);
    this.log = o.logger ?? silentLogger();
    this.state = o.bytes > 0 ? 'released' : 'off';
    if (o.bytes === 0) fs.rmSync(this.file, { force: true });
  }

  get status(): ReserveStatus {
    return {
      state: this.state,
      bytes: this.o.bytes,
      path: this.file,
      released_at: this.state === 'released' && this.releasedAt !== null ? new Date(this.releasedAt).toISOString() : null,
      reason: this.state === 'released' ? this.reason : null,
    };
  }

  /**
   * Makes the reserve when it is missing and the disk has room for it and
   * twice as much again (so making it does not fill the disk at once).
   * Returns whether it is held now; never throws.
   */
  restore(): boolean {
    if (this.state !== 'released') return this.state === 'held';
    try {
      if (reserveOnDisk(this.o.root, this.o.bytes) === 'held') return this.held(false);
      const s = fs.statfsSync(this.o.root);
      const free = s.bavail * s.bsize;
      if (free < 3 * this.o.bytes) {
        // After a release its warn line said so; at start, say it once here.
        if (this.reason === null && this.releasedAt === null) {
          this.log.warn({ op: 'reserve', bytes: this.o.bytes, free }, `disk reserve ${this.file} not made: ${free} bytes free on ROOT's filesystem, ${3 * this.o.bytes} needed; a Remove on a full disk may fail until it is`);
        }
        this.reason ??= `${free} bytes free on ROOT's filesystem, ${3 * this.o.bytes} needed to make it`;
        return this.retryLater();
      }
      const tmp = `${this.file}.tmp`;
      const fd = fs.openSync(tmp, 'w', 0o600);
      try {
        try {
          allocate(fd, 0, this.o.bytes);
        } catch (err) {
          // A filesystem without fallocate: zeros written take blocks too.
          if ((err as { code?: string }).code !== 'EOPNOTSUPP') throw err;
          const zeros = Buffer.alloc(1 << 20);
          for (let at = 0; at < this.o.bytes; ) at += fs.writeSync(fd, zeros, 0, Math.min(zeros.length, this.o.bytes - at), at);
        }
        fs.fsyncSync(fd);
      } catch (err) {
        fs.closeSync(fd);
        fs.rmSync(tmp, { force: true });
        throw err;
      }
      fs.closeSync(fd);
      fs.renameSync(tmp, this.file);
      return this.held(true);
    } catch (err) {
      const first = this.reason === null;
      this.reason = `cannot make ${this.file}: ${(err as Error).message}`;
      if (first) this.log.warn({ op: 'reserve', err: (err as Error).message }, `disk reserve ${this.file} cannot be made: ${(err as Error).message}; trying again every ${(this.o.retryMs ?? RETRY_MS) / 1000} s`);
      return this.retryLater();
    }
  }

  /**
   * Deletes the reserve, giving its space back, so `what` can go through
   * (`err`: what failed without it); one warn line. Returns whether there
   * was one to delete.
   */
  release(what: string, err: string | null = null): boolean {
    if (this.state !== 'held') return false;
    fs.rmSync(this.file, { force: true });
    this.state = 'released';
    this.releasedAt = Date.now();
    this.reason = err ? `${what}: ${err}` : what;
    this.log.warn(
      { op: 'reserve', bytes: this.o.bytes, err },
      `disk full: released the ${this.o.bytes}-byte disk reserve ${this.file} so ${what} can go through; it is made again once ${3 * this.o.bytes} bytes are free`,
    );
    this.retryLater();
    return true;
  }

  /**
   * Runs `fn` (synchronous: a metadata transaction); when it fails because
   * the disk is full and the reserve is held, releases it and runs `fn`
   * once more. `what` names the operation in the log line.
   */
  whenFull<T>(what: string, fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      if (!isDiskFull(err) || !this.release(what, (err as Error).message)) throw err;
      return fn();
    }
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  private held(made: boolean): boolean {
    // Missing before (released, or not made at start): say it is back.
    const was = this.releasedAt ?? (this.reason !== null ? Date.now() : null);
    this.state = 'held';
    this.reason = null;
    this.releasedAt = null;
    this.close();
    if (made && was !== null) this.log.info({ op: 'reserve', bytes: this.o.bytes }, `disk reserve ${this.file} made again`);
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
