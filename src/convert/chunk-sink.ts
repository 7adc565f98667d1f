import crypto from 'node:crypto';
import { type ChunkStore, type Extent, STORE_BLOCK } from '../store/chunkstore';
import type { SegmentWriter } from '../store/segments';
import type { ChunkSink } from './layer-tree';

/**
 * Takes a layer's file data chunk by chunk as it streams (from a directory
 * or a tar) and stores it once: each piece is padded to whole blocks and
 * hashed (SHA-256, the store's digest); a chunk the store already has (good
 * bytes, same length) is pinned and referenced, a chunk it lacks is written
 * into the store at once, provisionally: in chunks.blob at a freshly
 * allocated extent, or appended to the import's own segment. No row names a
 * provisional chunk until the converter's transaction records the layer, so
 * a crash leaves only bytes that start-up punches out (or a segment file no
 * row names, deleted at start); a failed conversion calls `discard`.
 *
 * Nothing here holds the store's import lock: many sinks can stream at
 * once. The converter resolves races (another import storing the same new
 * chunk meanwhile) under the lock, when it places the layer's chunks.
 */
export class StoreChunkSink implements ChunkSink {
  /** Layer-local chunk number → digest and blocks. */
  readonly digests: string[] = [];
  readonly nblocks: number[] = [];
  private readonly byDigest = new Map<string, number>();
  /** Chunks this sink wrote: digest → provisional extent. */
  readonly written = new Map<string, Extent>();
  /** The import's own segment (segments layout), created with the first new chunk. */
  writer: SegmentWriter | null = null;
  private readonly pinned: number[] = [];
  /** store.restoredFiles when the sink started: a store file put back meanwhile lost writes made through the old one. */
  readonly restoredAtStart: number;
  /** Bytes hashed, bytes written, chunks found in the store. */
  hashedBytes = 0;
  writtenBytes = 0;
  foundChunks = 0;
  private closed = false;

  constructor(
    private readonly store: ChunkStore,
    readonly chunkSize: number,
  ) {
    this.restoredAtStart = store.restoredFiles;
  }

  async add(piece: Buffer): Promise<number> {
    if (this.closed) throw new Error('chunk sink already finished');
    if (piece.length === 0 || piece.length > this.chunkSize) throw new Error(`chunk of ${piece.length} bytes (chunk size ${this.chunkSize})`);
    const nblocks = Math.ceil(piece.length / STORE_BLOCK);
    const padded = piece.length === nblocks * STORE_BLOCK ? piece : Buffer.concat([piece, Buffer.alloc(nblocks * STORE_BLOCK - piece.length)]);
    const digest = crypto.createHash('sha256').update(padded).digest('hex');
    this.hashedBytes += padded.length;
    const local = this.byDigest.get(digest);
    if (local !== undefined) return local;
    const n = this.digests.length;
    this.digests.push(digest);
    this.nblocks.push(nblocks);
    this.byDigest.set(digest, n);
    const row = this.store.lookup(digest);
    if (row && row.nblocks === nblocks) {
      // Pinned: a layer removed meanwhile cannot free it before this one references it.
      this.store.pin(row.id);
      this.pinned.push(row.id);
      this.foundChunks++;
      return n;
    }
    if (this.store.layout === 'segments') {
      this.writer ??= this.store.segments.create();
      this.written.set(digest, await this.store.append(this.writer, padded));
    } else {
      // Recorded before the write, so that a failed write's extent is freed by discard.
      const extent = this.store.allocate(nblocks);
      this.written.set(digest, extent);
      await this.store.write(extent, padded);
    }
    this.writtenBytes += padded.length;
    return n;
  }

  /** Distinct chunks in the order first met: digest and blocks. */
  chunks(): { digest: string; nblocks: number }[] {
    return this.digests.map((digest, i) => ({ digest, nblocks: this.nblocks[i] }));
  }

  /**
   * Gives back what the sink holds: provisional chunks.blob extents not in
   * `keep` are punched and freed (a segment is the caller's to finish or
   * abandon), pins are dropped. Call once, on success or failure.
   */
  discard(keep: ReadonlySet<string> = new Set()): void {
    if (this.closed) return;
    this.closed = true;
    for (const id of this.pinned) this.store.unpin(id);
    if (this.store.layout !== 'segments') {
      const drop = [...this.written].filter(([d]) => !keep.has(d)).map(([, e]) => e);
      if (drop.length > 0) this.store.releaseExtents(drop);
    } else if (this.writer && keep.size === 0) {
      this.store.segments.abandon(this.writer);
      this.writer = null;
    }
  }
}
