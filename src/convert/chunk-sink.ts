import crypto from 'node:crypto';
import fs from 'node:fs';
import { type ChunkStore, type Extent, STORE_BLOCK } from '../store/chunkstore';
import { type FileState, type SegmentWriter, fileState, sameFileState } from '../store/segments';
import type { ChunkSink, Piece, Place } from './layer-tree';

/**
 * Takes a layer's file data chunk by chunk as it streams (from a directory
 * or a tar) and stores it once: each piece is padded to whole blocks and
 * hashed (SHA-256, the store's digest); the distinct chunks are looked up
 * in the store a batch at a time (one read transaction for up to
 * PENDING_CHUNKS): a chunk the store already has (good bytes, same length)
 * is pinned and referenced, a chunk it lacks is written into the store
 * then, provisionally: in chunks.blob at a freshly
 * allocated extent, or appended to the import's own segment. No row names a
 * provisional chunk until the converter's transaction records the layer, so
 * a crash leaves only bytes that start-up punches out (or a segment file no
 * row names, deleted at start); a failed conversion calls `discard`.
 *
 * Nothing here holds the store's import lock: many sinks can stream at
 * once. The converter resolves races (another import storing the same new
 * chunk meanwhile) under the lock, when it places the layer's chunks.
 */
/** Chunk writes a sink keeps in flight while it reads and hashes on. */
const MAX_INFLIGHT = 4;
/** New distinct chunks (or their bytes) held before they are looked up in the store together. */
const PENDING_CHUNKS = 128;
const PENDING_BYTES = 4 << 20;
/** Bytes of back-to-back new chunks gathered into one write. */
const RUN_BYTES = 2 << 20;
/** Buffers in one writev: the kernel's iovec limit (IOV_MAX). */
const MAX_PARTS = 1024;
/** New bytes after which a sink has them flushed to disk in the background (writeBack), so the final sync is short. */
const WRITE_BACK_BYTES = 32 << 20;
/** Lent buffers (StoreChunkSink.buffer) a sink keeps for reuse once they come back. */
const MAX_SPARE = 16;
/** Zeros a chunk's last block is padded with (never written to). */
const ZEROS = Buffer.alloc(STORE_BLOCK);
/** An adopted file keeps its link only when at least this share of its bytes is new chunks named in place. */
const ADOPT_MIN_NEW_SHARE = 0.5;
/** Files one layer adopts at most (each is a device of its image). */
const MAX_ADOPTED = 8;

/**
 * A layer directory's file being taken into the store in place (see
 * StoreChunkSink.adopt): its new chunks are named where they lie in it.
 */
export interface Adoption {
  readonly writer: SegmentWriter;
  readonly file: string;
  /** The descriptor it is read through. */
  readonly fd: number;
  /** Digests of the chunks named in place, and their bytes. */
  readonly inPlace: string[];
  inPlaceBytes: number;
}

/** Starts writing back a file's dirty pages on the thread pool, through a descriptor of its own (the result does not matter: a sync follows). */
function flushInBackground(file: string): void {
  fs.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW, (err, fd) => {
    if (!err) fs.fdatasync(fd, () => fs.close(fd, () => undefined));
  });
}

/** SHA-256 (hex) of a chunk: its parts, then its padding. */
function sha256Of(parts: readonly Buffer[], pad: Buffer): string {
  const hash = crypto.createHash('sha256');
  for (const p of parts) hash.update(p);
  return hash.update(pad).digest('hex');
}

export class StoreChunkSink implements ChunkSink<Adoption> {
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
  private readonly restoredAtStart: number;
  /** Bytes hashed, bytes written, chunks found in the store. */
  hashedBytes = 0;
  writtenBytes = 0;
  foundChunks = 0;
  private closed = false;
  private readonly inflight = new Set<Promise<void>>();
  /** New chunks gathered for one write (chunks.blob). */
  private run: { extent: Extent; parts: Buffer[]; bytes: number } | null = null;
  private failure: Error | null = null;
  /** Buffers lent by `buffer` (their memory), and those back and free to lend again. */
  private readonly lent = new Set<ArrayBufferLike>();
  private readonly spare: Buffer[] = [];
  /** Distinct chunks hashed and not yet looked up in the store (resolvePending). */
  private pending: { digest: string; nblocks: number; parts: readonly Buffer[]; pad: Buffer; place?: Place<Adoption> }[] = [];
  /** Files this sink keeps as segments of their own (see adopt), and those still being read. */
  readonly adopted: SegmentWriter[] = [];
  private readonly adopting = new Set<Adoption>();
  private pendingBytes = 0;
  /** Bytes written since the last background flush began, and that flush. */
  private unflushed = 0;
  private flushing: Promise<void> | null = null;

  constructor(
    private readonly store: ChunkStore,
    readonly chunkSize: number,
  ) {
    this.restoredAtStart = store.restoredFiles;
  }

  /**
   * Starts taking `file` (a regular file of the layer directory, read
   * through `fd`) into the store in place: a hard link as a segment of its
   * own (ChunkStore's single layout only). Pass the returned adoption with
   * each of its pieces to add, then call endAdoption. Null when it cannot
   * be linked: the file's new chunks are then written as any others.
   */
  adopt(file: string, fd: number): Adoption | null {
    // Each adopted file is one more device of the layer's image: a few per layer.
    if (this.store.layout !== 'single' || this.closed || this.adopted.length + this.adopting.size >= Math.min(MAX_ADOPTED, this.store.maxDevices - 1)) return null;
    // Pieces start at whole blocks of the file.
    if (this.chunkSize % STORE_BLOCK !== 0) return null;
    let writer: SegmentWriter;
    try {
      writer = this.store.segments.adopt(file, fs.fstatSync(fd));
    } catch {
      return null;
    }
    // containerd wrote it and did not sync it: its pages go to disk while it is read, so finish's fsync finds little left.
    flushInBackground(this.store.segments.pathOf(writer.id));
    const a: Adoption = { writer, file, fd, inPlace: [], inPlaceBytes: 0 };
    this.adopting.add(a);
    return a;
  }

  /**
   * After the adopted file's last piece: the file must be as it was when
   * its reading began (else the conversion fails, to be retried). It stays
   * a segment when enough of it is new chunks named in place; otherwise
   * those chunks are read again, written as any others, and the link goes.
   */
  async endAdoption(a: Adoption): Promise<void> {
    if (!this.adopting.delete(a)) throw new Error(`${a.file}: not being adopted by this sink`);
    let kept = false;
    try {
      await this.resolvePending();
      const was = a.writer.readAs as FileState;
      if (!sameFileState(fileState(fs.fstatSync(a.fd, { bigint: true })), was)) throw new Error(`${a.file} changed while it was read`);
      if (a.inPlace.length > 0 && a.inPlaceBytes >= Number(was.size) * ADOPT_MIN_NEW_SHARE) {
        this.adopted.push(a.writer);
        kept = true;
        return;
      }
      const none = ZEROS.subarray(0, 0);
      for (const digest of a.inPlace) {
        const e = this.written.get(digest) as Extent;
        const buf = Buffer.allocUnsafe(e.nblocks * STORE_BLOCK);
        if (fs.readSync(a.fd, buf, 0, buf.length, e.blkaddr * STORE_BLOCK) !== buf.length) throw new Error(`${a.file} shrank while it was read`);
        if (sha256Of([buf], none) !== digest) throw new Error(`${a.file} changed while it was read`);
        const extent = this.store.allocate(e.nblocks);
        // Recorded before the write, so that a failed write's extent is freed by discard.
        this.written.set(digest, extent);
        this.queueWrite(extent, [buf], none);
        this.writtenBytes += buf.length;
      }
    } finally {
      if (!kept) this.store.segments.abandon(a.writer);
    }
  }

  async add(piece: Piece, place?: Place<Adoption>): Promise<number> {
    if (this.closed) throw new Error('chunk sink already finished');
    const parts = Buffer.isBuffer(piece) ? [piece] : piece;
    let length = 0;
    for (const p of parts) length += p.length;
    if (length === 0 || length > this.chunkSize) throw new Error(`chunk of ${length} bytes (chunk size ${this.chunkSize})`);
    const nblocks = Math.ceil(length / STORE_BLOCK);
    // The chunk is the piece's parts and zeros to its last block's end (hashed and written as they are: no copy).
    const pad = ZEROS.subarray(0, nblocks * STORE_BLOCK - length);
    const digest = sha256Of(parts, pad);
    this.hashedBytes += nblocks * STORE_BLOCK;
    const local = this.byDigest.get(digest);
    if (local !== undefined) {
      this.giveBack(parts);
      return local;
    }
    const n = this.digests.length;
    this.digests.push(digest);
    this.nblocks.push(nblocks);
    this.byDigest.set(digest, n);
    // Looked up in the store with the next ones, in one read transaction (see store.inOneRead).
    this.pending.push({ digest, nblocks, parts, pad, place });
    this.pendingBytes += nblocks * STORE_BLOCK;
    if (this.pending.length >= PENDING_CHUNKS || this.pendingBytes >= PENDING_BYTES) await this.resolvePending();
    return n;
  }

  /**
   * Looks the pending chunks up in the store, all at once: one the store
   * has (same length) is pinned and referenced, one it lacks is written
   * (queued). Waits while MAX_INFLIGHT writes are in flight; throws the
   * first write that failed.
   */
  private async resolvePending(): Promise<void> {
    const batch = this.pending;
    if (batch.length === 0) return;
    this.pending = [];
    this.pendingBytes = 0;
    const rows = this.store.lookupMany(batch.map((c) => c.digest));
    for (let i = 0; i < batch.length; i++) {
      const { digest, nblocks, parts, pad, place } = batch[i];
      const row = rows[i];
      if (row && row.nblocks === nblocks) {
        // Pinned: a layer removed meanwhile cannot free it before this one references it.
        this.store.pin(row.id);
        this.pinned.push(row.id);
        this.foundChunks++;
        this.giveBack(parts);
        continue;
      }
      if (place && pad.length === 0 && place.blkaddr + nblocks <= place.adoption.writer.blocks) {
        // Already on disk where it lies in the adopted file: named there, not written.
        this.written.set(digest, { segment: place.adoption.writer.id, blkaddr: place.blkaddr, nblocks });
        place.adoption.inPlace.push(digest);
        place.adoption.inPlaceBytes += nblocks * STORE_BLOCK;
        this.giveBack(parts);
        continue;
      }
      let extent: Extent;
      if (this.store.layout === 'segments') {
        this.writer ??= this.store.segments.create();
        // Appended in the order taken (the writes of a run may be in flight together).
        extent = this.store.takeAppend(this.writer, nblocks);
      } else {
        extent = this.store.allocate(nblocks);
      }
      // Recorded before the write, so that a failed write's extent is freed by discard.
      this.written.set(digest, extent);
      this.queueWrite(extent, parts, pad);
      this.writtenBytes += nblocks * STORE_BLOCK;
    }
    while (this.inflight.size >= MAX_INFLIGHT) await Promise.race(this.inflight);
    if (this.failure) throw this.failure;
  }

  /** A chunkSize buffer to read a piece into (see ChunkSink.buffer): a spare one, or a new one. */
  buffer(): Buffer {
    const b = this.spare.pop() ?? Buffer.allocUnsafeSlow(this.chunkSize);
    this.lent.add(b.buffer);
    return b;
  }

  /** The lent buffers among `parts` (views of them) are free to lend again: the sink is done with their bytes. */
  private giveBack(parts: readonly Buffer[]): void {
    for (const p of parts) {
      if (!this.lent.delete(p.buffer)) continue;
      if (this.spare.length < MAX_SPARE) this.spare.push(Buffer.from(p.buffer, 0, this.chunkSize));
    }
  }

  /** New chunks whose extents follow each other, written with one writev once RUN_BYTES are gathered or the next extent is elsewhere. */
  private queueWrite(extent: Extent, data: readonly Buffer[], pad: Buffer): void {
    const bytes = extent.nblocks * STORE_BLOCK;
    const count = data.length + (pad.length > 0 ? 1 : 0);
    let r = this.run;
    if (
      r &&
      (r.extent.segment ?? 0) === (extent.segment ?? 0) &&
      r.extent.blkaddr + r.extent.nblocks === extent.blkaddr &&
      r.bytes + bytes <= RUN_BYTES &&
      r.parts.length + count <= MAX_PARTS
    ) {
      r.extent = { ...r.extent, nblocks: r.extent.nblocks + extent.nblocks };
    } else {
      this.endRun();
      r = this.run = { extent, parts: [], bytes: 0 };
    }
    r.parts.push(...data);
    if (pad.length > 0) r.parts.push(pad);
    r.bytes += bytes;
    if (r.bytes >= RUN_BYTES) this.endRun();
  }

  private endRun(): void {
    const r = this.run;
    if (!r) return;
    this.run = null;
    // Its lent buffers are free again once written (not after a failed write: the sink is discarded then).
    this.track(this.store.writeRun(r.extent, r.parts, this.writer).then(() => this.giveBack(r.parts)));
    this.unflushed += r.bytes;
    if (this.unflushed >= WRITE_BACK_BYTES && !this.flushing) {
      this.unflushed = 0;
      const writer = this.writer;
      this.flushing = this.store.writeBack(writer).finally(() => (this.flushing = null));
    }
  }

  /** Keeps a write in flight: reading and hashing the next chunks overlaps it; the first failure is thrown by add or flush. */
  private track(p: Promise<void>): void {
    const t: Promise<void> = p.then(
      () => void this.inflight.delete(t),
      (err: Error) => {
        this.inflight.delete(t);
        this.failure ??= err;
      },
    );
    this.inflight.add(t);
  }

  /** Waits for every write in flight; throws the first that failed. Call before the chunks are placed. */
  async flush(): Promise<void> {
    await this.resolvePending();
    this.endRun();
    while (this.inflight.size > 0) await Promise.all([...this.inflight]);
    await this.flushing;
    if (this.failure) throw this.failure;
  }

  /**
   * Throws when the store file was put back (ChunkStore.restoreFile) since
   * the sink started and chunks.blob got new chunks from it: they went to
   * the old file. Call under the import lock, after restoreFile; `what` ends
   * the message.
   */
  checkStoreFile(what: string): void {
    if (this.store.restoredFiles !== this.restoredAtStart && this.store.layout !== 'segments' && this.written.size > 0) {
      throw new Error(`the chunk store file was put back while ${what}`);
    }
  }

  /** Distinct chunks in the order first met: digest and blocks. */
  chunks(): { digest: string; nblocks: number }[] {
    return this.digests.map((digest, i) => ({ digest, nblocks: this.nblocks[i] }));
  }

  /**
   * Gives back what the sink holds: provisional chunks.blob extents not in
   * `keep` are punched and freed (a segment is the caller's to finish or
   * abandon), pins are dropped, once no write is in flight. Call once, on
   * success or failure.
   */
  async discard(keep: ReadonlySet<string> = new Set()): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Chunks not looked up yet have neither pin nor extent.
    this.pending = [];
    this.endRun();
    // No write may land after its extent is freed (and perhaps handed to another import).
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight]);
    await this.flushing;
    for (const id of this.pinned) this.store.unpin(id);
    // An adopted file not recorded goes (its link only: the directory's file is left as it is).
    for (const a of this.adopting) this.store.segments.abandon(a.writer);
    this.adopting.clear();
    if (keep.size === 0) for (const w of this.adopted.splice(0)) this.store.segments.abandon(w);
    if (this.store.layout !== 'segments') {
      // chunks.blob's extents only: one in an adopted file is not chunks.blob's to free.
      const drop = [...this.written].filter(([d, e]) => !keep.has(d) && (e.segment ?? 0) === 0).map(([, e]) => e);
      if (drop.length > 0) this.store.releaseExtents(drop);
    } else if (this.writer && keep.size === 0) {
      this.store.segments.abandon(this.writer);
      this.writer = null;
    }
  }
}
