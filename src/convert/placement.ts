import type { ChunkRow } from '../store/chunkstore';

/** The segment a layer's new chunks go to when the store makes one per import. */
export const NEW_SEGMENT = -1;

export type StoredChunk = ChunkRow & { bad: boolean };

export interface Placement {
  /** The layer image's extra devices in order (device id = index + 1): segment ids, NEW_SEGMENT for the import's own. */
  devices: number[];
  /** Per digest: the stored row the layer references. Digests absent here are stored anew (in `freshSegment`). */
  use: Map<string, StoredChunk>;
  /** Digests to store anew, in the layer's order. */
  fresh: string[];
  /** Damaged rows whose bytes this layer brings: written again (and then good). */
  heal: StoredChunk[];
}

/**
 * Decides where each chunk of a layer is read from. A layer image can name
 * at most `maxDevices` segments (its mount options and device table grow
 * with each), so the segments holding most of its bytes are chosen, and a
 * chunk found only elsewhere is stored again in the layer's own place
 * (`freshSegment`: chunks.blob, or a new segment). A damaged chunk counts
 * as present: the layer's bytes heal it (a sealed segment is written anew).
 */
export function placeChunks(
  chunks: { digest: string; nblocks: number }[],
  rowsOf: (digest: string) => StoredChunk[],
  o: { freshSegment: number; maxDevices: number },
): Placement {
  const usable = new Map<string, StoredChunk[]>();
  const heal: StoredChunk[] = [];
  const coverage = new Map<number, number>();
  for (const c of chunks) {
    if (usable.has(c.digest)) continue;
    const rows = rowsOf(c.digest).filter((r) => r.nblocks === c.nblocks);
    usable.set(c.digest, rows);
    for (const r of rows) {
      if (r.bad) heal.push(r);
      coverage.set(r.segment, (coverage.get(r.segment) ?? 0) + r.nblocks);
    }
  }
  // chunks.blob first when new chunks go there: a digest it has must be used from there (one row per segment).
  const weight = (seg: number) => (seg === 0 && o.freshSegment === 0 ? Infinity : (coverage.get(seg) as number));
  const order = [...coverage.keys()].sort((a, b) => weight(b) - weight(a) || a - b);
  const max = Math.max(1, o.maxDevices);
  const chosen = order.slice(0, max);
  let fresh: string[] = [];
  for (;;) {
    const set = new Set(chosen);
    fresh = [...usable.entries()].filter(([, rows]) => !rows.some((r) => set.has(r.segment))).map(([d]) => d);
    const needOwn = fresh.length > 0 && !set.has(o.freshSegment);
    if (!needOwn || chosen.length < max) {
      if (needOwn) chosen.push(o.freshSegment);
      break;
    }
    chosen.pop();
  }
  const rank = new Map(chosen.map((s, i) => [s, i]));
  const use = new Map<string, StoredChunk>();
  for (const [digest, rows] of usable) {
    const inChosen = rows.filter((r) => rank.has(r.segment)).sort((a, b) => (rank.get(a.segment) as number) - (rank.get(b.segment) as number));
    if (inChosen.length > 0) use.set(digest, inChosen[0]);
  }
  return { devices: chosen, use, fresh, heal };
}
