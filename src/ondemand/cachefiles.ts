import fs from 'node:fs';
import {
  AlignedBuffer,
  CACHEFILES_MSG_MAX_SIZE,
  CACHEFILES_OP_CLOSE,
  type CachefilesMsg,
  PAGE,
  cachefilesCommand,
  pollReadable,
  readCachefilesMsg,
  readComplete,
  setCloexec,
} from '../../native/cachefiles';
import type { Logger } from '../log/logger';
import { writeAllAt } from '../store/chunkstore';

/**
 * The daemon's side of EROFS over fscache in on-demand mode: it reads the
 * requests of /dev/cachefiles (an fd shared with the on-demand holder, which
 * keeps the cache bound across daemon restarts) and answers them:
 *
 * - OPEN of a blob (the cookie key is the blob's name: a layer's metadata
 *   image, or its chunk space) → `copen <id>,<size>`, or a negative errno for
 *   a name this daemon does not know;
 * - READ of a range the cache file lacks → the bytes written to the object's
 *   anonymous fd (page-aligned: direct I/O), then CACHEFILES_IOC_READ_COMPLETE.
 *   A range that cannot be had (fetch failed) is completed unwritten: the
 *   kernel finds it still missing and the reader gets EIO;
 * - CLOSE → the anonymous fd is closed.
 *
 * Requests this daemon read but did not answer before it died stay in the
 * kernel; the next daemon writes `restore` and gets them again (objects
 * whose fd died with it are opened again first).
 */

export interface BlobSource {
  size: number;
  /** The bytes of [off, off+len) (shorter at the end of the blob). Throws when they cannot be had. */
  read(off: number, len: number): Promise<Buffer>;
}

export interface CachefilesServerOptions {
  /** This process's fd of /dev/cachefiles, bound in on-demand mode. */
  fd: number;
  /** The blob a cookie key names, or null (unknown: the OPEN fails with ENOENT). */
  resolve: (volumeKey: string, cookieKey: string) => BlobSource | null;
  logger: Logger;
  /** A READ failed (its reader gets EIO). */
  onReadError?: (cookieKey: string, off: number, len: number, err: Error) => void;
}

interface CacheObject {
  fd: number;
  cookieKey: string;
  source: BlobSource;
}

const ENOENT = 2;

export class CachefilesServer {
  private readonly objects = new Map<number, CacheObject>();
  private readonly buf = Buffer.alloc(CACHEFILES_MSG_MAX_SIZE);
  private closed = false;
  /** READ requests being answered now. */
  inflight = 0;

  constructor(private readonly o: CachefilesServerOptions) {}

  /** This process's fd of /dev/cachefiles. */
  get fd(): number {
    return this.o.fd;
  }

  /** Starts answering (after `restore`, so requests a previous daemon left are answered too). */
  start(): void {
    cachefilesCommand(this.o.fd, 'restore');
    this.run().catch((err: Error) => {
      if (!this.closed) this.o.logger.error({ op: 'ondemand', err: err.message }, `reading /dev/cachefiles failed; on-demand reads wait for a daemon restart: ${err.message}`);
    });
  }

  private async run(): Promise<void> {
    while (!this.closed) {
      await pollReadable(this.o.fd, 1000);
      for (let m: CachefilesMsg | null; !this.closed && (m = readCachefilesMsg(this.o.fd, this.buf)); ) this.handle(m);
    }
  }

  private handle(m: CachefilesMsg): void {
    if (m.open) {
      const { volumeKey, cookieKey, fd } = m.open;
      setCloexec(fd);
      const source = this.o.resolve(volumeKey, cookieKey);
      if (!source) {
        this.o.logger.error({ op: 'ondemand', volume: volumeKey, blob: cookieKey }, `fscache asked for blob ${cookieKey} (volume ${volumeKey}), which this daemon does not know`);
        fs.closeSync(fd);
        cachefilesCommand(this.o.fd, `copen ${m.msgId},-${ENOENT}`);
        return;
      }
      this.objects.set(m.objectId, { fd, cookieKey, source });
      cachefilesCommand(this.o.fd, `copen ${m.msgId},${source.size}`);
      return;
    }
    if (m.opcode === CACHEFILES_OP_CLOSE) {
      const obj = this.objects.get(m.objectId);
      this.objects.delete(m.objectId);
      if (obj) fs.closeSync(obj.fd);
      return;
    }
    if (m.read) {
      const obj = this.objects.get(m.objectId);
      if (!obj) {
        this.o.logger.error({ op: 'ondemand', object: m.objectId }, `fscache READ for object ${m.objectId}, which this daemon did not open`);
        return;
      }
      void this.serveRead(obj, m.msgId, m.read.off, m.read.len);
    }
  }

  private async serveRead(obj: CacheObject, msgId: number, off: number, len: number): Promise<void> {
    this.inflight++;
    try {
      const bytes = await obj.source.read(off, len);
      if (this.closed) return;
      if (bytes.length > 0) {
        // Direct I/O: whole pages from a page-aligned buffer, zero-padded at the blob's end.
        const aligned = new AlignedBuffer(bytes.length);
        try {
          bytes.copy(aligned.buf);
          const padded = Math.ceil(bytes.length / PAGE) * PAGE;
          aligned.buf.fill(0, bytes.length, padded);
          await writeAllAt(obj.fd, aligned.buf.subarray(0, padded), off);
        } finally {
          aligned.free();
        }
      }
    } catch (err) {
      this.o.onReadError?.(obj.cookieKey, off, len, err as Error);
    } finally {
      this.inflight--;
    }
    if (this.closed) return;
    try {
      readComplete(obj.fd, msgId);
    } catch (err) {
      // The object was closed meanwhile (unmounted): nobody waits.
      this.o.logger.debug({ op: 'ondemand', blob: obj.cookieKey, err: (err as Error).message }, 'READ completion not delivered');
    }
  }

  /**
   * Deletes a blob's cache file from the cache (`cull`: the kernel refuses
   * one in use with EBUSY). `dir` is the directory holding it; the command
   * names a file in the daemon's working directory, so this changes it for
   * the moment of the call (every other path of this program is absolute).
   */
  cull(dir: string, file: string): 'culled' | 'busy' | 'gone' {
    const prev = process.cwd();
    process.chdir(dir);
    try {
      cachefilesCommand(this.o.fd, `cull ${file}`);
      return 'culled';
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EBUSY') return 'busy';
      if (code === 'ENOENT' || code === 'ESTALE') return 'gone';
      throw err;
    } finally {
      process.chdir(prev);
    }
  }

  /** Stops answering; unanswered requests stay in the kernel for the next daemon (restore). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const obj of this.objects.values()) fs.closeSync(obj.fd);
    this.objects.clear();
    fs.closeSync(this.o.fd);
  }
}
