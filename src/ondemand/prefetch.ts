import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { getXattr } from '../../native/xattr';

/**
 * Prefetch: warms the page cache with the file data a trace names, so a
 * container's first reads find it there (for layers whose data is local;
 * remote layers will fetch the same ranges).
 *
 * A trace is one entry per line: `path`, or `path offset length` (decimal
 * bytes); blank lines and lines starting with `#` are skipped. Paths are
 * paths inside the image, resolved as a container would see them (see
 * resolveInImage: whiteouts and opaque directories respected, the image's
 * symlinks followed inside the image, never on the host). Jobs run one at a time,
 * each reading at most `concurrency` files at once and yielding between
 * reads, so foreground reads keep the disk.
 *
 * Memory is bounded whatever clients send (issue 12, item 5: a flood of
 * 70,000-path requests grew the daemon to 4.3 GB): the jobs waiting or
 * running, their entries and the entries' estimated bytes are limited
 * (PrefetchLimits); a request beyond them is refused with 429 and a
 * Retry-After, one that could never fit with 413. Finished jobs keep only
 * their figures, and at most `keepFinished` of them are kept.
 */

export class PrefetchError extends Error {
  constructor(
    readonly status: number,
    message: string,
    /** Seconds a client should wait before trying again (429, 503). */
    readonly retryAfter?: number,
  ) {
    super(message);
    this.name = 'PrefetchError';
  }
}

export interface TraceEntry {
  /** The path inside the image, components joined by "/" (no ".", "..", or empty ones); split when it is read. */
  path: string;
  offset: number;
  /** Bytes to read from offset; null: to the end of the file. */
  length: number | null;
}

export interface LayerRoot {
  id: string;
  root: string;
}

export interface PrefetchJobView {
  id: string;
  image_id: string;
  source: string;
  state: 'queued' | 'running' | 'done' | 'failed';
  entries: number;
  processed: number;
  files_read: number;
  bytes_read: number;
  skipped: number;
  missing: number;
  errors: string[];
  created: string;
  started: string | null;
  finished: string | null;
  duration_ms: number | null;
}

/** Limits on what the queue holds (config `prefetch.*`). */
export interface PrefetchLimits {
  /** Jobs waiting or running. */
  maxJobs: number;
  /** Entries of those jobs, in total. */
  maxEntries: number;
  /** Estimated memory of those entries (entryBytes each). */
  maxBytes: number;
  /** Finished jobs kept for GET /prefetch/<id> (the oldest go first). */
  keepFinished: number;
}

export const DEFAULT_PREFETCH_LIMITS: PrefetchLimits = { maxJobs: 64, maxEntries: 1_000_000, maxBytes: 256 << 20, keepFinished: 1000 };

/** Estimated heap bytes of a queued entry: the object and its path string (measured about 85 + length). */
export function entryBytes(e: TraceEntry): number {
  return ENTRY_OVERHEAD + e.path.length;
}
const ENTRY_OVERHEAD = 96;

export interface PrefetchOptions {
  /** Resolves an image id (in a containerd namespace) to its layer roots, nearest first; throws for an unknown one. */
  resolve: (imageId: string, namespace: string) => LayerRoot[] | Promise<LayerRoot[]>;
  /** The only directory trace files are read from. */
  traceDir: string;
  concurrency: number;
  /** DEFAULT_PREFETCH_LIMITS when not given. */
  limits?: PrefetchLimits;
  logger?: Logger;
  /** Called when a job ends. */
  onDone?: (job: PrefetchJobView) => void;
}

export const MAX_TRACE_BYTES = 64 << 20;
const MAX_ENTRIES = 1_000_000;
const MAX_PATH = 4096;
const READ_CHUNK = 1 << 20;
const MAX_ERRORS = 20;
/** A job's error lines are cut to this many characters (paths may be 4096). */
const MAX_ERROR_CHARS = 512;

/** Splits an image path into components; throws on `..`, NUL or an over-long path. */
export function imagePathParts(p: string): string[] {
  if (p.length === 0 || p.length > MAX_PATH) throw new Error(`path must be 1 to ${MAX_PATH} characters`);
  if (p.includes('\0')) throw new Error('path contains a NUL byte');
  const parts = p.split('/').filter((c) => c !== '' && c !== '.');
  if (parts.includes('..')) throw new Error(`path ${JSON.stringify(p)} contains ".."`);
  if (parts.length === 0) throw new Error(`path ${JSON.stringify(p)} names the root, not a file`);
  return parts;
}

/** Parses a trace; throws PrefetchError(400) naming the first bad line. */
export function parseTrace(text: string): TraceEntry[] {
  const out: TraceEntry[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === '' || line.startsWith('#')) continue;
    if (out.length >= MAX_ENTRIES) throw new PrefetchError(400, `trace has more than ${MAX_ENTRIES} entries`);
    const f = line.split(/\s+/);
    if (f.length !== 1 && f.length !== 3) {
      throw new PrefetchError(400, `trace line ${i + 1}: expected "path" or "path offset length", got ${JSON.stringify(line.slice(0, 200))}`);
    }
    let parts: string[];
    try {
      parts = imagePathParts(f[0]);
    } catch (err) {
      throw new PrefetchError(400, `trace line ${i + 1}: ${(err as Error).message}`);
    }
    if (f.length === 1) {
      out.push({ path: parts.join('/'), offset: 0, length: null });
      continue;
    }
    const [offset, length] = [f[1], f[2]].map((v) => (/^\d{1,15}$/.test(v) ? Number(v) : NaN));
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length)) {
      throw new PrefetchError(400, `trace line ${i + 1}: offset and length must be non-negative integers, got ${JSON.stringify(`${f[1]} ${f[2]}`)}`);
    }
    out.push({ path: parts.join('/'), offset, length });
  }
  return out;
}

interface Job {
  view: PrefetchJobView;
  /** Emptied when the job ends: a finished job keeps only its view. */
  roots: LayerRoot[];
  entries: TraceEntry[];
  /** Estimated bytes of entries (counted in the queue's total until the job ends). */
  bytes: number;
  startedAt: number;
}

export class Prefetcher {
  private readonly jobs = new Map<string, Job>();
  private readonly queue: Job[] = [];
  private running: Job | null = null;
  /** Ids of finished jobs, oldest first: at most limits.keepFinished. */
  private readonly finished: string[] = [];
  /** Entries and their estimated bytes of the jobs waiting or running. */
  private held = { entries: 0, bytes: 0 };
  /** Entries processed and milliseconds spent by finished jobs: the pace Retry-After is estimated from. */
  private pace = { entries: 0, ms: 0 };
  /** Trace files are read and parsed one at a time (each may be 64 MiB). */
  private traceTurn: Promise<unknown> = Promise.resolve();
  private closed = false;
  private readonly limits: PrefetchLimits;
  private readonly log: Logger;
  /** requests and rejected are counted by the HTTP layer, which sees every request. */
  readonly counters = { requests: 0, rejected: 0, jobs_done: 0, jobs_failed: 0, files_read: 0, bytes_read: 0, skipped: 0, missing: 0 };

  constructor(private readonly opts: PrefetchOptions) {
    this.log = opts.logger ?? silentLogger();
    this.limits = opts.limits ?? DEFAULT_PREFETCH_LIMITS;
  }

  get queueLength(): number {
    return this.queue.length + (this.running ? 1 : 0);
  }

  /** Entries and estimated bytes of the jobs waiting or running. */
  get queued(): { jobs: number; entries: number; bytes: number } {
    return { jobs: this.queueLength, ...this.held };
  }

  /** Seconds until the queue has likely drained enough: from the pace of finished jobs, 1 to 60. */
  private retryAfter(): number {
    const perMs = this.pace.ms > 0 ? this.pace.entries / this.pace.ms : 0;
    if (perMs <= 0) return 5;
    return Math.min(60, Math.max(1, Math.ceil(this.held.entries / perMs / 1000)));
  }

  /** Throws 429 when the queue is at its job limit or closed (503). */
  private checkRoom(): void {
    if (this.closed) throw new PrefetchError(503, 'the daemon is shutting down', 5);
    if (this.queueLength >= this.limits.maxJobs) {
      throw new PrefetchError(429, `prefetch queue full: ${this.queueLength} jobs waiting or running (prefetch.max_queued_jobs ${this.limits.maxJobs}); retry later`, this.retryAfter());
    }
  }

  /** Throws 413 for a job that could never fit, 429 for one that does not fit now. */
  private checkFits(entries: number, bytes: number): void {
    const l = this.limits;
    if (entries > l.maxEntries) throw new PrefetchError(413, `${entries} entries are over prefetch.max_queued_entries (${l.maxEntries}); split the request`);
    if (bytes > l.maxBytes) throw new PrefetchError(413, `the entries take about ${bytes} bytes, over prefetch.max_queued_bytes (${l.maxBytes}); split the request`);
    if (this.held.entries + entries > l.maxEntries) {
      throw new PrefetchError(429, `prefetch queue full: ${this.held.entries} entries queued, ${entries} more would pass prefetch.max_queued_entries (${l.maxEntries}); retry later`, this.retryAfter());
    }
    if (this.held.bytes + bytes > l.maxBytes) {
      throw new PrefetchError(429, `prefetch queue full: about ${this.held.bytes} bytes of entries queued, ${bytes} more would pass prefetch.max_queued_bytes (${l.maxBytes}); retry later`, this.retryAfter());
    }
  }

  /** Reads and parses a trace file when no other is being read (one 64 MiB text in memory at a time). */
  private async readTrace(file: string): Promise<TraceEntry[]> {
    const turn = this.traceTurn.then(async () => {
      // The queue may have filled while this request waited its turn.
      this.checkRoom();
      return parseTrace(await fs.promises.readFile(file, 'utf8'));
    });
    this.traceTurn = turn.catch(() => undefined);
    return turn;
  }

  /**
   * Checks a request and queues its job. Throws PrefetchError with the HTTP
   * status (400 bad input, 403 a trace outside the trace directory, 404 an
   * unknown image or trace file) and changes nothing then.
   */
  async submit(req: { imageId: string; namespace?: string; traceFile?: string; files?: string[] }): Promise<PrefetchJobView> {
    {
      this.checkRoom();
      if (req.files !== undefined) this.checkFits(req.files.length, 0);
      let roots: LayerRoot[];
      try {
        roots = await this.opts.resolve(req.imageId, req.namespace ?? 'default');
      } catch (err) {
        throw new PrefetchError(404, (err as Error).message);
      }
      let entries: TraceEntry[];
      let source: string;
      if (req.traceFile !== undefined) {
        const file = this.traceFile(req.traceFile);
        entries = await this.readTrace(file);
        source = file;
      } else {
        entries = (req.files ?? []).map((p, i) => {
          try {
            return { path: imagePathParts(p).join('/'), offset: 0, length: null };
          } catch (err) {
            throw new PrefetchError(400, `files[${i}]: ${(err as Error).message}`);
          }
        });
        source = 'files';
      }
      const bytes = entries.reduce((a, e) => a + entryBytes(e), 0);
      // Checked again: the queue may have filled while the trace was read.
      this.checkRoom();
      this.checkFits(entries.length, bytes);
      const id = crypto.randomUUID();
      const view: PrefetchJobView = {
        id,
        image_id: req.imageId,
        source,
        state: 'queued',
        entries: entries.length,
        processed: 0,
        files_read: 0,
        bytes_read: 0,
        skipped: 0,
        missing: 0,
        errors: [],
        created: new Date().toISOString(),
        started: null,
        finished: null,
        duration_ms: null,
      };
      const job: Job = { view, roots, entries, bytes, startedAt: 0 };
      this.jobs.set(id, job);
      this.queue.push(job);
      this.held.entries += entries.length;
      this.held.bytes += bytes;
      this.log.info({ op: 'prefetch', job: id, image: req.imageId, entries: entries.length, source }, `prefetch job ${id} queued: ${entries.length} entries`);
      void this.pump();
      return { ...view };
    }
  }

  get(id: string): PrefetchJobView | undefined {
    const j = this.jobs.get(id);
    return j ? { ...j.view, errors: [...j.view.errors] } : undefined;
  }

  /** Stops taking jobs; the running one stops after its current reads. */
  close(): void {
    this.closed = true;
    for (const job of this.queue.splice(0)) {
      job.view.state = 'failed';
      job.view.errors.push('stopped: the daemon is shutting down');
      this.release(job);
    }
  }

  /** A job that will not run (again): its entries leave the queue's totals and memory, and it joins the finished jobs kept. */
  private release(job: Job): void {
    this.held.entries -= job.entries.length;
    this.held.bytes -= job.bytes;
    job.entries = [];
    job.roots = [];
    job.bytes = 0;
    this.finished.push(job.view.id);
    while (this.finished.length > this.limits.keepFinished) this.jobs.delete(this.finished.shift() as string);
  }

  /** Resolves `p` to a regular file inside the trace directory, or throws PrefetchError. */
  private traceFile(p: string): string {
    if (typeof p !== 'string' || p === '' || p.includes('\0')) throw new PrefetchError(400, 'trace_file must be a non-empty path');
    if (!path.isAbsolute(p)) throw new PrefetchError(400, `trace_file must be an absolute path inside ${this.opts.traceDir}, got ${JSON.stringify(p)}`);
    if (p.split('/').includes('..')) throw new PrefetchError(400, `trace_file must not contain "..", got ${JSON.stringify(p)}`);
    let dir: string;
    try {
      dir = fs.realpathSync(this.opts.traceDir);
    } catch {
      throw new PrefetchError(404, `the trace directory ${this.opts.traceDir} does not exist; put trace files there`);
    }
    let real: string;
    try {
      real = fs.realpathSync(p);
    } catch {
      if (!isInside(dir, path.resolve(p)) && !isInside(this.opts.traceDir, path.resolve(p))) {
        throw new PrefetchError(403, `trace_file must be inside ${this.opts.traceDir}, got ${JSON.stringify(p)}`);
      }
      throw new PrefetchError(404, `trace file ${JSON.stringify(p)} does not exist`);
    }
    if (!isInside(dir, real)) {
      throw new PrefetchError(403, `trace_file must be inside ${this.opts.traceDir} (symlinks out of it are refused), got ${JSON.stringify(p)}`);
    }
    const st = fs.statSync(real);
    if (!st.isFile()) throw new PrefetchError(400, `trace_file ${JSON.stringify(p)} is not a regular file`);
    if (st.size > MAX_TRACE_BYTES) throw new PrefetchError(400, `trace_file ${JSON.stringify(p)} is over ${MAX_TRACE_BYTES} bytes`);
    return real;
  }

  private async pump(): Promise<void> {
    if (this.running) return;
    for (let job = this.queue.shift(); job; job = this.queue.shift()) {
      this.running = job;
      await this.run(job);
      this.running = null;
    }
  }

  private async run(job: Job): Promise<void> {
    const v = job.view;
    v.state = 'running';
    job.startedAt = Date.now();
    v.started = new Date(job.startedAt).toISOString();
    const buf = Array.from({ length: this.opts.concurrency }, () => Buffer.allocUnsafe(READ_CHUNK));
    let next = 0;
    const worker = async (slot: number) => {
      while (!this.closed && next < job.entries.length) {
        const e = job.entries[next++];
        try {
          await this.warm(job, e, buf[slot]);
        } catch (err) {
          if (v.errors.length < MAX_ERRORS) v.errors.push(`/${e.path}: ${(err as Error).message}`.slice(0, MAX_ERROR_CHARS));
        }
        v.processed++;
      }
    };
    try {
      await Promise.all(buf.map((_, i) => worker(i)));
      v.state = this.closed && v.processed < v.entries ? 'failed' : 'done';
      if (v.state === 'failed') v.errors.push('stopped: the daemon is shutting down');
    } catch (err) {
      v.state = 'failed';
      v.errors.push((err as Error).message.slice(0, MAX_ERROR_CHARS));
    }
    v.finished = new Date().toISOString();
    v.duration_ms = Date.now() - job.startedAt;
    this.pace.entries += v.processed;
    this.pace.ms += Math.max(1, v.duration_ms);
    this.release(job);
    if (v.state === 'done') this.counters.jobs_done++;
    else this.counters.jobs_failed++;
    this.log.info(
      { op: 'prefetch', job: v.id, image: v.image_id, state: v.state, files_read: v.files_read, bytes_read: v.bytes_read, skipped: v.skipped, missing: v.missing, duration_ms: v.duration_ms },
      `prefetch job ${v.id} ${v.state}: ${v.files_read} files, ${v.bytes_read} bytes`,
    );
    try {
      this.opts.onDone?.({ ...v });
    } catch {
      // a listener's failure is not the job's
    }
  }

  /** Reads one entry's range through the first layer that has the path. */
  private async warm(job: Job, e: TraceEntry, buf: Buffer): Promise<void> {
    const v = job.view;
    const found = await resolveInImage(job.roots, e.path.split('/'));
    if (found === 'not-a-file') {
      v.skipped++;
      this.counters.skipped++;
      return;
    }
    if (found === 'missing') {
      v.missing++;
      this.counters.missing++;
      return;
    }
    const fh = await fs.promises.open(found, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    try {
      const size = (await fh.stat()).size;
      const end = Math.min(size, e.length === null ? size : e.offset + e.length);
      for (let pos = e.offset; pos < end && !this.closed; ) {
        const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - pos), pos);
        if (bytesRead === 0) break;
        pos += bytesRead;
        v.bytes_read += bytesRead;
        this.counters.bytes_read += bytesRead;
        await yieldToLoop();
      }
      v.files_read++;
      this.counters.files_read++;
    } finally {
      await fh.close();
    }
  }
}

function isInside(dir: string, p: string): boolean {
  const rel = path.relative(dir, p);
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel);
}

const MAX_SYMLINK_HOPS = 40;

async function lstatOrNull(p: string): Promise<fs.Stats | null> {
  try {
    return await fs.promises.lstat(p);
  } catch {
    return null;
  }
}

/**
 * The nearest layer's entry at image path `parts`, or null when no layer
 * shows one. In each layer the ancestors are checked first, from the top:
 * one that is not a directory (a symlink among them) hides everything below
 * it and is never followed on the host; an opaque one hides lower layers.
 */
async function entryOf(roots: LayerRoot[], parts: string[]): Promise<{ path: string; st: fs.Stats } | null> {
  for (const { root } of roots) {
    let opaque = false;
    let complete = true;
    for (let k = 1; k < parts.length; k++) {
      const anc = path.join(root, ...parts.slice(0, k));
      const ast = await lstatOrNull(anc);
      if (!ast) {
        complete = false;
        break;
      }
      if (!ast.isDirectory()) return null;
      if (getXattr(anc, 'trusted.overlay.opaque')?.toString() === 'y') opaque = true;
    }
    if (complete) {
      const p = path.join(root, ...parts);
      const st = await lstatOrNull(p);
      if (st) {
        // An overlayfs whiteout (char device 0:0) hides the path in lower layers.
        if (st.isCharacterDevice() && st.rdev === 0) return null;
        return { path: p, st };
      }
    }
    if (opaque) return null;
  }
  return null;
}

/**
 * The host path of image path `parts` as a container would see it: looked
 * up component by component through the layers, nearest first, following
 * the image's symlinks inside the image (an absolute target starts again at
 * the image root, `..` stops at it), as openat2's RESOLVE_IN_ROOT would.
 * 'missing' when the image has no such path, 'not-a-file' when it is not a
 * regular file.
 */
async function resolveInImage(roots: LayerRoot[], parts: string[]): Promise<string | 'missing' | 'not-a-file'> {
  let todo = [...parts];
  let done: string[] = [];
  let hops = 0;
  while (todo.length > 0) {
    const name = todo.shift() as string;
    if (name === '' || name === '.') continue;
    if (name === '..') {
      done.pop();
      continue;
    }
    const hit = await entryOf(roots, [...done, name]);
    if (!hit) return 'missing';
    if (hit.st.isSymbolicLink()) {
      if (++hops > MAX_SYMLINK_HOPS) throw new Error(`more than ${MAX_SYMLINK_HOPS} symlinks`);
      const target = await fs.promises.readlink(hit.path);
      if (target.startsWith('/')) done = [];
      todo = [...target.split('/'), ...todo];
      continue;
    }
    if (todo.length === 0) return hit.st.isFile() ? hit.path : 'not-a-file';
    if (!hit.st.isDirectory()) return 'missing';
    done.push(name);
  }
  return 'not-a-file';
}
