import fs from 'node:fs';
import fsp from 'node:fs/promises';
import type { Logger } from '../log/logger';
import { sleep } from '../remote/transport';
import { regularFileUnder } from '../util/fs';
import { BLOCK, type LazyFile, type LazyFiles } from './lazy-files';
import type { LoaderBackend, LoaderCounters } from './loader-backend';

/**
 * Loads what mounted lazy layers lack in the background, one layer at a
 * time, paced to ondemand.prefetch_mbps: "list" reads the files the
 * layer's header lists through its mount (recorded at convert time), "all"
 * those and then every missing extent, window by window, the way the
 * backend loads a reader's access (so the data arrives as for any read).
 */

export interface BackgroundPrefetchOptions {
  files: LazyFiles;
  backend: LoaderBackend;
  counters: LoaderCounters;
  log: Logger;
  closed: () => boolean;
  /** Where a layer is mounted (its prefetch list is read there). */
  mountPath: (id: string) => string;
  mode?: 'none' | 'list' | 'all';
  /** Megabits per second for all of it (0: no limit). */
  mbps?: number;
  /** "all": windows of a layer (8 MiB each) loaded at once, sharing mbps (default 1). */
  concurrency?: number;
}

/** A window of missing extents read at once. */
const WINDOW = 8 << 20;

export class BackgroundPrefetch {
  private readonly queue: string[] = [];
  private running = false;

  constructor(private readonly o: BackgroundPrefetchOptions) {}

  /** Queues layer `id` (mounted, its reads held) unless the mode or the layer gives it nothing to do. */
  request(id: string): void {
    const mode = this.o.mode ?? 'none';
    const st = this.o.files.get(id);
    if (mode === 'none' || (st?.missing ?? 0) === 0 || !this.o.backend.isMarked(id) || this.queue.includes(id)) return;
    if (mode === 'list' && !st?.header.prefetch?.length) return;
    this.queue.push(id);
    if (!this.running) void this.run();
  }

  private async run(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length > 0 && !this.o.closed()) {
        const id = this.queue.shift() as string;
        const st = this.o.files.get(id);
        if (!st || st.dropped || st.missing === 0) continue;
        const started = Date.now();
        try {
          if (st.header.prefetch?.length) await this.loadListed(st);
          if (this.o.mode !== 'all') continue;
          await this.loadLayer(st);
          this.o.log.info({ op: 'ondemand', layer: id, duration_ms: Date.now() - started }, `layer ${id}: background prefetch loaded all its data`);
        } catch (err) {
          this.o.log.warn({ op: 'ondemand', layer: id, err: (err as Error).message }, `layer ${id}: background prefetch stopped: ${(err as Error).message}; retried in a minute`);
          setTimeout(() => this.request(id), 60_000).unref();
        }
      }
    } finally {
      this.running = false;
    }
  }

  /**
   * Reads the files layer `st`'s header lists through its mount (their
   * reads load their chunks as a container's would), paced like the rest.
   * The list comes from the image: a path that is not a regular file
   * reached without symlinks inside the mount is skipped.
   */
  private async loadListed(st: LazyFile): Promise<void> {
    const root = this.o.mountPath(st.id);
    const buf = Buffer.alloc(1 << 20);
    const started = Date.now();
    let files = 0;
    let bytes = 0;
    for (const rel of st.header.prefetch ?? []) {
      if (st.dropped || this.o.closed()) return;
      const file = regularFileUnder(root, rel);
      if (!file) {
        this.o.log.debug({ op: 'ondemand', layer: st.id, path: rel }, `layer ${st.id}: prefetch path ${rel} is not a regular file there; skipped`);
        continue;
      }
      const fh = await fsp.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
      try {
        for (let at = 0; ; ) {
          const t0 = Date.now();
          const { bytesRead } = await fh.read(buf, 0, buf.length, at);
          if (bytesRead === 0) break;
          at += bytesRead;
          bytes += bytesRead;
          this.o.counters.prefetch_bytes += bytesRead;
          await this.pace(bytesRead, t0);
        }
      } finally {
        await fh.close();
      }
      files++;
    }
    this.o.log.info(
      { op: 'ondemand', layer: st.id, files, bytes, duration_ms: Date.now() - started },
      `layer ${st.id}: background prefetch loaded its ${files} listed files (${bytes} bytes)`,
    );
  }

  /** Waits so that `bytes` one of `readers` read since `t0` stay within its share of ondemand.prefetch_mbps. */
  private async pace(bytes: number, t0: number, readers = 1): Promise<void> {
    const mbps = (this.o.mbps ?? 0) / readers;
    if (mbps > 0) await sleep(Math.max(0, bytes / ((mbps * 1e6) / 8 / 1000) - (Date.now() - t0)));
  }

  /**
   * Loads everything layer `st` lacks: its missing extents in windows of up
   * to 8 MiB, `concurrency` windows at a time, each loaded by the backend
   * (fanotify: read through the marked file; fscache: filled directly).
   */
  async loadLayer(st: LazyFile): Promise<void> {
    const windows = missingWindows(st);
    const readers = Math.max(1, Math.min(this.o.concurrency ?? 1, windows.length));
    const fh = await fsp.open(st.file, 'r');
    let next = 0;
    const reader = async () => {
      const buf = Buffer.alloc(WINDOW);
      while (next < windows.length && !st.dropped && !this.o.closed()) {
        const [start, end] = windows[next++];
        if (!this.o.backend.isMarked(st.id)) throw new Error('its file is not marked for on-demand reads');
        const t0 = Date.now();
        const bytesRead = await this.o.backend.loadWindow(st, fh, buf, start, end);
        this.o.counters.prefetch_bytes += bytesRead;
        await this.pace(bytesRead, t0, readers);
      }
    };
    // Every reader finished before the file closes; the first failure is the answer.
    const results = await Promise.allSettled(Array.from({ length: readers }, reader));
    await fh.close();
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    if (st.missing > 0 && !st.dropped) throw new Error(`${st.missing} chunks still missing`);
  }
}

/** The byte ranges of `st`'s runs of missing extents, at most one window each (an extent larger than a window is cut). */
function missingWindows(st: LazyFile): [start: number, end: number][] {
  const windows: [start: number, end: number][] = [];
  for (let i = 0; i < st.entries.length; ) {
    if (st.filled[i]) {
      i++;
      continue;
    }
    // A run of missing extents, up to one window.
    const start = st.entries[i][0] * BLOCK;
    let end = start;
    while (i < st.entries.length && !st.filled[i] && (st.entries[i][0] + st.entries[i][1]) * BLOCK - start <= WINDOW) {
      end = (st.entries[i][0] + st.entries[i][1]) * BLOCK;
      i++;
    }
    if (end === start) {
      end = Math.min(start + WINDOW, (st.entries[i][0] + st.entries[i][1]) * BLOCK);
      i++;
    }
    windows.push([start, end]);
  }
  return windows;
}
