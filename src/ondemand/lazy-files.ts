import fs from 'node:fs';
import path from 'node:path';
import { seekDataOrHole } from '../../native/libc';
import type { ChunkEntry, LayerHeader } from '../remote/dedup-image';
import type { RemoteLayer } from '../remote/lazy';

/**
 * What each lazy layer's file holds: per layer a LazyFile (its extents and
 * which are filled), found by id or by file, and an index of filled
 * extents by digest (a chunk one layer has is copied into another rather
 * than fetched). What is filled is what the file holds as data (SEEK_HOLE
 * per chunk), so a restart knows it without any other record.
 */

export const BLOCK = 4096;

export interface LazyLayerInput {
  id: string;
  rl: RemoteLayer;
  header: LayerHeader;
}

export interface LazyFile {
  id: string;
  file: string;
  rl: RemoteLayer;
  header: LayerHeader;
  /** Extents sorted by block address. */
  entries: ChunkEntry[];
  size: number;
  filled: Uint8Array;
  missing: number;
  inflight: Map<number, Promise<void>>;
  /** Mounted while its file was not marked (holder lost): filled directly, in the background. */
  unsafe: boolean;
  dropped: boolean;
}

export class LazyFiles {
  private readonly byFile = new Map<string, LazyFile>();
  private readonly byId = new Map<string, LazyFile>();
  /** digest → a filled extent holding it (for copies into other lazy files). */
  private readonly haveDigest = new Map<string, { st: LazyFile; i: number }>();

  /** @param dir the directory of the lazy files (ROOT/lazy) */
  constructor(readonly dir: string) {}

  fileOf(id: string): string {
    return path.join(this.dir, `${id}.blob`);
  }

  /** A lazy layer's EROFS image as its registry has it (chunk indexes in the layer's own block space). */
  imageOf(id: string): string {
    return path.join(this.dir, `${id}.erofs`);
  }

  get(id: string): LazyFile | undefined {
    return this.byId.get(id);
  }

  byPath(file: string): LazyFile | undefined {
    return this.byFile.get(file);
  }

  all(): IterableIterator<LazyFile> {
    return this.byId.values();
  }

  /** Layers not dropped whose layer digest has hex `hex` (they share one fscache chunk space). */
  ofDigest(hex: string): LazyFile[] {
    return [...this.byId.values()].filter((x) => !x.dropped && digestHex(x.rl.layerDigest) === hex);
  }

  /** Lazy layers and the chunks they still lack. */
  summary(): { layers: number; incomplete: number; missing_chunks: number } {
    let incomplete = 0;
    let missing = 0;
    for (const st of this.byId.values()) {
      if (st.missing > 0) incomplete++;
      missing += st.missing;
    }
    return { layers: this.byId.size, incomplete, missing_chunks: missing };
  }

  /** Starts tracking `l`'s file: what it holds is learnt from the file itself. */
  register(l: LazyLayerInput): LazyFile {
    const file = this.fileOf(l.id);
    const entries = sortedEntries(l.header);
    const st: LazyFile = {
      id: l.id,
      file,
      rl: l.rl,
      header: l.header,
      entries,
      size: spaceSize(entries),
      filled: new Uint8Array(entries.length),
      missing: 0,
      inflight: new Map(),
      unsafe: false,
      dropped: false,
    };
    const fd = fs.openSync(file, 'r');
    try {
      for (let i = 0; i < entries.length; i++) {
        const start = entries[i][0] * BLOCK;
        const end = start + entries[i][1] * BLOCK;
        // Whole chunks only: a write cut short by a crash leaves a hole in it.
        const data = seekDataOrHole(fd, start, 'data');
        const hole = data === start ? seekDataOrHole(fd, start, 'hole') : null;
        if (data === start && (hole === null || hole >= end)) this.setFilled(st, i);
        else st.missing++;
      }
    } finally {
      fs.closeSync(fd);
    }
    this.byFile.set(file, st);
    this.byId.set(l.id, st);
    return st;
  }

  /** Stops tracking `id` (marked dropped: work on it stops); its files are the caller's. */
  forget(id: string): LazyFile | undefined {
    const st = this.byId.get(id);
    if (!st) return undefined;
    st.dropped = true;
    this.byId.delete(id);
    this.byFile.delete(st.file);
    for (const [d, at] of this.haveDigest) if (at.st === st) this.haveDigest.delete(d);
    return st;
  }

  /** A filled extent of a layer still tracked that holds `digest`. */
  holding(digest: string): { st: LazyFile; i: number } | undefined {
    const have = this.haveDigest.get(digest);
    return have && !have.st.dropped ? have : undefined;
  }

  /** Extent `i` of `st` is in its file now. */
  setFilled(st: LazyFile, i: number): void {
    st.filled[i] = 1;
    if (!this.haveDigest.has(st.entries[i][2])) this.haveDigest.set(st.entries[i][2], { st, i });
  }
}

/** The indexes of `st`'s extents not filled yet. */
export function missingEntries(st: LazyFile): number[] {
  return st.entries.map((_, i) => i).filter((i) => !st.filled[i]);
}

/** Whether every extent [offset, offset+count) of `st` overlaps is filled. */
export function rangeFilled(st: LazyFile, offset: number, count: number): boolean {
  const end = Math.min(offset + count, st.size);
  for (let i = firstEntryAtOrAfter(st.entries, offset); i < st.entries.length && st.entries[i][0] * BLOCK < end; i++) if (!st.filled[i]) return false;
  return true;
}

/** The hex of a "sha256:<hex>" digest. */
export function digestHex(digest: string): string {
  return digest.slice(digest.indexOf(':') + 1);
}

export function sortedEntries(h: LayerHeader): ChunkEntry[] {
  return [...h.chunks].sort((a, b) => a[0] - b[0]);
}

export function spaceSize(entries: ChunkEntry[]): number {
  return entries.reduce((m, e) => Math.max(m, (e[0] + e[1]) * BLOCK), 0);
}

export function groupByDigest(idxs: number[], entries: ChunkEntry[]): Map<string, number[]> {
  const m = new Map<string, number[]>();
  for (const i of idxs) {
    const d = entries[i][2];
    const list = m.get(d);
    if (list) list.push(i);
    else m.set(d, [i]);
  }
  return m;
}

/** Index of the first extent that ends after byte `offset`. */
export function firstEntryAtOrAfter(entries: ChunkEntry[], offset: number): number {
  let lo = 0;
  let hi = entries.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((entries[mid][0] + entries[mid][1]) * BLOCK <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
