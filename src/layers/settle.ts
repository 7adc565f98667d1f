import crypto from 'node:crypto';
import fs from 'node:fs';
import { ErrnoError } from '../../native/libc';
import { extentKey, scanDataChunks } from '../convert/chunks';
import type { ConvertStats, Converter } from '../convert/converter';
import { internal } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import type { LazyLoader } from '../ondemand/lazy-loader';
import type { ChunkEntry, LayerHeader } from '../remote/dedup-image';
import { type ChunkStore, STORE_BLOCK, readAt } from '../store/chunkstore';
import type { MetaStore } from '../store/metastore';
import type { LayerMounts } from './layer-mounts';
import { recordLayer } from './record';

/** How often lazy layers that have all their data but are in use are tried again. */
const SETTLE_RETRY_MS = 30_000;

/** A settle that found its layer in use or removed when it came to switch the mount. */
class SettleSkipped extends Error {
  constructor(readonly outcome: 'busy' | 'gone') {
    super(`settle skipped: layer ${outcome}`);
  }
}

export interface SettlerOptions {
  ms: MetaStore;
  store: ChunkStore;
  converter: Converter;
  loader: LazyLoader;
  mounts: LayerMounts;
  logger: Logger;
  /** false: lazy layers stay lazy (ondemand.settle off, or the fscache backend). */
  enabled: boolean;
}

/**
 * Settling: a lazy layer that has all its data and that nothing but its
 * own mount uses is moved into the chunk store, so it is stored as a
 * converted layer is (fanotify backend only: with fscache, an overlay's
 * clone of the layer's mount keeps asking this process for the layer's
 * blobs, which only the lazy files answer).
 */
export class Settler {
  private on: boolean;
  private closed = false;
  private timer: NodeJS.Timeout | null = null;
  private at = 0;
  private running: Promise<number> | null = null;
  /** Lazy layers settled into the chunk store since start. */
  settled = 0;

  constructor(private readonly o: SettlerOptions) {
    this.on = o.enabled;
  }

  /** Runs settleIdle in `ms` (or sooner, if already due sooner). */
  schedule(ms: number): void {
    if (!this.on || this.closed) return;
    const at = Date.now() + ms;
    if (this.timer && this.at <= at) return;
    if (this.timer) clearTimeout(this.timer);
    this.at = at;
    this.timer = setTimeout(() => {
      this.timer = null;
      // A pass under way may have gone past layers completed since: another one after it.
      if (this.running) return void this.running.finally(() => this.schedule(0));
      this.settleIdle().catch((err: Error) => this.o.logger.error({ op: 'settle', err: err.message }, `settling lazy layers failed: ${err.message}`));
    }, ms);
    this.timer.unref();
  }

  close(): void {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /**
   * Settles every lazy layer that has all its data and that no mount uses
   * (see settleLayer), one at a time; layers in use are tried again every
   * SETTLE_RETRY_MS (and when a snapshot is removed). Returns how many were settled.
   */
  async settleIdle(): Promise<number> {
    if (this.closed) return 0;
    if (this.running) return this.running;
    const { ms, loader, mounts, logger: log } = this.o;
    this.running = (async () => {
      let settled = 0;
      let again = Infinity;
      for (const r of ms.lazyLayers()) {
        const id = String(r.snapshot_id);
        if (this.closed) break;
        if (loader.incomplete(id) || mounts.isBusy(id)) continue;
        // Handed out in a mount a moment ago: containerd is about to use it.
        const grace = mounts.graceMs - mounts.sinceHandedOut(id);
        if (grace > 0) {
          again = Math.min(again, grace + 100);
          continue;
        }
        try {
          const outcome = await this.settleLayer(id, JSON.parse(r.header) as LayerHeader);
          if (outcome === 'settled') settled++;
          else if (outcome === 'busy') again = Math.min(again, SETTLE_RETRY_MS);
        } catch (err) {
          if (err instanceof ErrnoError && err.syscall === 'fcntl') {
            // No file leases here (fs.leases-enable = 0): whether a layer is in use cannot be told.
            this.on = false;
            log.error({ op: 'settle', err: err.message }, `lazy layers are not settled into the chunk store: file leases, which tell whether a layer is in use, are not available (${err.message}; sysctl fs.leases-enable = 1 turns them on, then restart)`);
            return settled;
          }
          again = Math.min(again, SETTLE_RETRY_MS);
          log.warn({ op: 'settle', layer: id, snapshot: id, err: (err as Error).message }, `cannot settle lazy layer ${id} into the chunk store: ${(err as Error).message}; it stays lazy, tried again later`);
        }
      }
      if (again !== Infinity) this.schedule(again);
      return settled;
    })().finally(() => (this.running = null));
    return this.running;
  }

  /**
   * Settles lazy layer `id` (all its data present) into the chunk store, so
   * that it is stored as a converted layer is: its chunks go into the store
   * (those the store has are shared), its image is rewritten to address the
   * store (images/<id>.erofs), and its lazy files go. Only while nothing but
   * its own mount uses it (see LayerMounts.lazyIdle), checked before the
   * work and again when the new mount replaces the lazy one, in one
   * synchronous step in which no request can run. 'busy': in use (nothing
   * changed); 'gone': removed meanwhile.
   *
   * Crash-safe: until the transaction the layer is lazy and its lazy files
   * untouched (an images/<id>.erofs left is removed at start); after it the
   * layer is a store layer (lazy files left are removed at start).
   */
  private async settleLayer(id: string, header: LayerHeader): Promise<'settled' | 'busy' | 'gone'> {
    const { ms, store, loader, mounts, logger: log } = this.o;
    if (!mounts.lazyIdle(id, header.has_blob, false)) return 'busy';
    const started = Date.now();
    const img = fs.readFileSync(loader.imageOf(id));
    const { scan, refs } = scanDataChunks(img);
    const entries = new Map(header.chunks.map((c) => [extentKey({ blkaddr: c[0], nblocks: c[1] }), c]));
    const chunks = [...entries].map(([key, c]) => ({ key, digest: c[2], nblocks: c[1] }));
    let fd = fs.openSync(loader.fileOf(id), 'r');
    const closeFile = () => {
      if (fd >= 0) fs.closeSync(fd);
      fd = -1;
    };
    mounts.hold(id);
    let stats: ConvertStats;
    try {
      stats = await this.o.converter.importChunks(
        id,
        img,
        { scan, refs, chunks, mkfsMs: 0 },
        async (key) => {
          const [blkaddr, nblocks, hex] = entries.get(key) as ChunkEntry;
          const buf = Buffer.alloc(nblocks * STORE_BLOCK);
          await readAt(fd, buf, blkaddr * STORE_BLOCK);
          const got = crypto.createHash('sha256').update(buf).digest('hex');
          if (got !== hex) throw internal(`lazy/${id}.blob at block ${blkaddr}: sha256:${got}, the chunk table says sha256:${hex}`);
          return buf;
        },
        (layer) => {
          // From here to the transaction all is synchronous: no request runs in between.
          closeFile();
          if (this.closed || ms.keyOf(id) === undefined || !ms.isLazy(id)) throw new SettleSkipped('gone');
          // Handed out in a mount during the import: containerd may be about to mount it.
          if (mounts.sinceHandedOut(id) < mounts.graceMs) throw new SettleSkipped('busy');
          if (!mounts.lazyIdle(id, header.has_blob, true)) throw new SettleSkipped('busy');
          try {
            mounts.mountImage(id, layer.hasBlob, layer.image);
          } catch (err) {
            mounts.mountLazyFile(id, header.has_blob);
            throw err;
          }
          try {
            ms.transaction(() => recordLayer(ms, store, id, layer, 'settled', started));
          } catch (err) {
            mounts.unmount(id);
            mounts.mountLazyFile(id, header.has_blob);
            throw err;
          }
          return layer.stats;
        },
      );
    } catch (err) {
      if (err instanceof SettleSkipped) return err.outcome;
      throw err;
    } finally {
      closeFile();
      mounts.untrack(id);
    }
    loader.drop(id);
    this.settled++;
    log.info(
      { op: 'settle', key: ms.keyOf(id), snapshot: id, layer: id, chunks: stats.chunks, new_chunks: stats.newChunks, new_bytes: stats.newBytes, dedup_chunks: stats.dedupChunks, duration_ms: Date.now() - started },
      `lazy layer ${id} settled into the chunk store: ${stats.newChunks} chunks stored (${stats.newBytes} bytes), ${stats.dedupChunks} shared with other layers`,
    );
    return 'settled';
  }
}
