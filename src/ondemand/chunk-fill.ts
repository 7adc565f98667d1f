import fsp from 'node:fs/promises';
import type { Logger } from '../log/logger';
import type { ChunkEntry } from '../remote/dedup-image';
import { type RemoteLayers, runsOf } from '../remote/lazy';
import { formatReference } from '../remote/reference';
import { sleep } from '../remote/transport';
import { type ChunkStore, readAt, writeAllAt } from '../store/chunkstore';
import { BLOCK, type LazyFile, type LazyFiles, type LazyLayerInput, firstEntryAtOrAfter, groupByDigest, missingEntries, sortedEntries, spaceSize } from './lazy-files';

/**
 * Puts chunks into lazy files: each distinct digest once, copied from this
 * node when it has it (another lazy layer, or the chunk store, checked) or
 * fetched from the registry in runs (Range GET, digest-checked by the
 * registry client) with bounded retries, and written to every extent of
 * that digest with the writer the caller gives (a copy of a fanotify
 * event's fd, or the file directly when nothing marks it).
 */

/** Writes `bytes` at `offset` of a lazy file. */
export type Writer = (offset: number, bytes: Buffer) => Promise<void>;

export interface ChunkFillerOptions {
  files: LazyFiles;
  remote: RemoteLayers;
  store: ChunkStore;
  log: Logger;
  /** Attempts per chunk run after the registry client's own retries (digest mismatches included). */
  attempts?: number;
  /** Told when a layer has all its data (its last missing chunk written). */
  onComplete?: (id: string) => void;
  /** Counts the chunks fetched from the registry. */
  fetched: (chunks: number) => void;
  closed: () => boolean;
}

export class ChunkFiller {
  constructor(private readonly o: ChunkFillerOptions) {}

  /**
   * Creates `l`'s lazy file: the size of its chunk space, with every chunk
   * the node has copied in. Returns how many chunks were local.
   */
  async create(l: LazyLayerInput, file: string): Promise<{ local: number; localBytes: number; missing: number }> {
    const entries = sortedEntries(l.header);
    const size = spaceSize(entries);
    const fh = await fsp.open(file, 'w', 0o600);
    let local = 0;
    let localBytes = 0;
    let missing = 0;
    try {
      await fh.truncate(size);
      const byDigest = groupByDigest(entries.map((_, i) => i), entries);
      for (const [digest, idxs] of byDigest) {
        const bytes = await this.localBytes(digest, entries[idxs[0]][1]);
        if (!bytes) {
          missing += idxs.length;
          continue;
        }
        for (const i of idxs) await writeAllAt(fh.fd, bytes, entries[i][0] * BLOCK);
        local += idxs.length;
        localBytes += bytes.length;
      }
    } finally {
      await fh.close();
    }
    return { local, localBytes, missing };
  }

  /**
   * Makes [offset, offset+count) of `st` present: the extents it overlaps
   * that are neither filled nor in flight are filled with `write`; null
   * when all are there already.
   */
  ensureRange(st: LazyFile, offset: number, count: number, write: Writer): Promise<void> | null {
    const end = Math.min(offset + count, st.size);
    const wait: Promise<void>[] = [];
    const todo: number[] = [];
    for (let i = firstEntryAtOrAfter(st.entries, offset); i < st.entries.length && st.entries[i][0] * BLOCK < end; i++) {
      if (st.filled[i]) continue;
      const p = st.inflight.get(i);
      if (p) wait.push(p);
      else todo.push(i);
    }
    if (wait.length === 0 && todo.length === 0) return null;
    if (todo.length > 0) wait.push(this.fillEntries(st, todo, write));
    return Promise.all(wait).then(() => undefined);
  }

  /** Fills everything `st` lacks, written straight into its file (only for a file no group marks). */
  fillMissingDirectly(st: LazyFile): Promise<void> {
    return this.fillEntries(st, missingEntries(st), directWriter(st.file));
  }

  /**
   * A layer mounted while its file is not marked (the holder that marked it
   * died): reads of its holes are not held, so everything it lacks is
   * fetched now, written directly, retried with backoff.
   */
  fillAllUnsafe(st: LazyFile): void {
    if (st.missing === 0 || st.unsafe) return;
    st.unsafe = true;
    const id = st.id;
    this.o.log.error(
      { op: 'ondemand', layer: id, snapshot: id, missing_chunks: st.missing },
      `layer ${id} is mounted but its on-demand holder was lost: reads of data not yet fetched are not held; fetching all ${st.missing} missing chunks now`,
    );
    const run = async () => {
      for (let attempt = 0; st.missing > 0 && !st.dropped && !this.o.closed(); attempt++) {
        try {
          await this.fillMissingDirectly(st);
        } catch (err) {
          this.o.log.error({ op: 'ondemand', layer: id, err: (err as Error).message }, `layer ${id}: fetching its missing chunks failed; retrying`);
          await sleep(Math.min(30_000, 1000 * 2 ** attempt));
        }
      }
      if (st.missing === 0) this.o.log.info({ op: 'ondemand', layer: id }, `layer ${id}: all data present`);
    };
    void run();
  }

  /**
   * Fills extents `idxs` of `st` (none filled or in flight): each distinct
   * digest once, from local data when the node has it, else fetched in
   * runs; every extent with that digest written with `write`.
   */
  private fillEntries(st: LazyFile, idxs: number[], write: Writer): Promise<void> {
    const work = (async () => {
      const byDigest = groupByDigest(idxs, st.entries);
      const put = async (digest: string, bytes: Buffer) => {
        for (const i of byDigest.get(digest) ?? []) {
          if (st.filled[i]) continue;
          await write(st.entries[i][0] * BLOCK, bytes);
          this.o.files.setFilled(st, i);
          st.missing--;
          if (st.missing === 0 && !st.dropped) this.o.onComplete?.(st.id);
        }
      };
      const remote: ChunkEntry[] = [];
      for (const [digest, is] of byDigest) {
        const bytes = await this.localBytes(digest, st.entries[is[0]][1]);
        if (bytes) {
          await put(digest, bytes);
        } else remote.push(st.entries[is[0]]);
      }
      const runs = runsOf(remote);
      let next = 0;
      const worker = async () => {
        while (next < runs.length) {
          const run = runs[next++];
          const t0 = Date.now();
          const parts = await this.fetchRun(st, run);
          this.o.fetched(run.length);
          const bytes = parts.reduce((n, b) => n + b.length, 0);
          this.o.log.info(
            { op: 'fetch', layer: st.id, snapshot: st.id, chunks: run.length, bytes, duration_ms: Date.now() - t0 },
            `fetched ${run.length} chunks (${bytes} bytes) of layer ${st.id} on demand`,
          );
          for (const [k, bytes] of parts.entries()) await put(run[k][2], bytes);
        }
      };
      await Promise.all(Array.from({ length: Math.min(4, runs.length) }, worker));
    })();
    const tracked = work.finally(() => {
      for (const i of idxs) if (st.inflight.get(i) === tracked) st.inflight.delete(i);
    });
    for (const i of idxs) st.inflight.set(i, tracked);
    return tracked;
  }

  private async fetchRun(st: LazyFile, run: ChunkEntry[]): Promise<Buffer[]> {
    const attempts = this.o.attempts ?? 2;
    for (let a = 1; ; a++) {
      try {
        return await this.o.remote.fetchRun(st.rl, st.header, run);
      } catch (err) {
        if (a >= attempts || st.dropped) throw err;
        this.o.log.warn(
          { op: 'fetch', layer: st.id, image: formatReference(st.rl.repo), chunks: run.length, attempt: a, err: (err as Error).message },
          `fetching ${run.length} chunks of layer ${st.id} failed (attempt ${a} of ${attempts}): ${(err as Error).message}`,
        );
        await sleep(250 * a);
      }
    }
  }

  /** A chunk's bytes from this node: another lazy layer that has it, or the chunk store. */
  private async localBytes(digest: string, nblocks: number): Promise<Buffer | null> {
    const have = this.o.files.holding(digest);
    if (have) {
      const buf = Buffer.alloc(nblocks * BLOCK);
      try {
        // A read of a marked file: its event comes back here and is a hit.
        const fh = await fsp.open(have.st.file, 'r');
        try {
          const { bytesRead } = await fh.read(buf, 0, buf.length, have.st.entries[have.i][0] * BLOCK);
          if (bytesRead === buf.length) return buf;
        } finally {
          await fh.close();
        }
      } catch {
        // gone meanwhile: try the store, then the registry
      }
    }
    const row = this.o.store.lookup(digest);
    // Checked: a damaged store chunk must not spread into a lazy layer (it is marked bad; the registry is asked instead).
    if (row && row.nblocks === nblocks) return this.o.store.readChecked(row);
    return null;
  }
}

/** Writes straight into the file (only for files no group marks). */
export function directWriter(file: string): Writer {
  return async (offset, bytes) => {
    const fh = await fsp.open(file, 'r+');
    try {
      await writeAllAt(fh.fd, bytes, offset);
    } finally {
      await fh.close();
    }
  };
}

/** `len` bytes of `file` at `off` (callers keep the range inside the file). */
export async function readRange(file: string, off: number, len: number): Promise<Buffer> {
  if (len <= 0) return Buffer.alloc(0);
  const fh = await fsp.open(file, 'r');
  try {
    const buf = Buffer.alloc(len);
    await readAt(fh.fd, buf, off);
    return buf;
  } finally {
    await fh.close();
  }
}
