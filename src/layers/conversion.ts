import type { ConvertStats, ConvertedLayer, Converter } from '../convert/converter';
import { alreadyExists, notFound } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import type { ChunkStore } from '../store/chunkstore';
import type { MetaStore } from '../store/metastore';
import type { RootLayout } from '../store/root-layout';
import type { Labels } from '../store/types';
import { UNMEASURED } from '../util/fs';
import { type ConvertEvents, convertedFields, convertedSummary } from './events';
import type { LayerMounts } from './layer-mounts';
import { recordLayer } from './record';
import type { Sweeper } from './sweep';

/** Layers converted at once in the background. */
const BACKGROUND_WORKERS = 2;

export interface ConversionOptions {
  layout: RootLayout;
  ms: MetaStore;
  store: ChunkStore;
  converter: Converter;
  mounts: LayerMounts;
  sweeper: Sweeper;
  events: ConvertEvents;
  logger: Logger;
}

/**
 * Committed layer directories become EROFS images over the chunk store:
 * in the background, two at a time in commit order (Commit returns at
 * once; until converted the layer is served from its directory), or
 * within Commit (convert_mode "sync"), which fails if the conversion does.
 */
export class ConversionQueue {
  /** Background conversions waiting, in commit order. */
  private readonly queue: string[] = [];
  private workers = 0;
  private closed = false;

  constructor(private readonly o: ConversionOptions) {}

  /** Number of layers waiting for or under conversion (or another job on a layer). */
  get pending(): number {
    return this.queue.length + this.o.mounts.busyCount;
  }

  enqueue(id: string): void {
    if (this.queue.includes(id) || this.o.mounts.isBusy(id)) return;
    this.queue.push(id);
    this.run();
  }

  close(): void {
    this.closed = true;
  }

  /**
   * Two background conversions at a time: a conversion reads each file once
   * and hashes it (one core), and containerd's unpacking of the next layers
   * needs the other; two overlap a slow layer's read with a small one's.
   */
  private run(): void {
    while (this.workers < BACKGROUND_WORKERS && this.queue.length > 0 && !this.closed) {
      const id = this.queue.shift() as string;
      this.workers++;
      void this.o.mounts
        .track(id, this.convertCommitted(id))
        .catch(() => undefined)
        .finally(() => {
          this.workers--;
          this.run();
        });
    }
  }

  /**
   * Converts committed snapshot `id` in the background. Until it is done the
   * layer is served from its directory; a failure leaves it that way (and is
   * retried at the next start), so nothing containerd sees breaks.
   */
  private async convertCommitted(id: string): Promise<void> {
    const { ms, logger: log } = this.o;
    const started = Date.now();
    const key = ms.keyOf(id);
    if (key === undefined || ms.getLayer(id) || this.closed) return;
    log.info({ op: 'convert', key, snapshot: id, layer: id }, `detected new layer ${id}, auto-converting to EROFS`);
    try {
      const stats = await this.convert(id, started, (layer) => {
        if (ms.keyOf(id) === undefined) throw notFound(`snapshot ${id} was removed while it was being converted`);
        // Commit left the usage to this walk (see UNMEASURED).
        if (layer.usage) ms.setUsage(id, layer.usage);
      });
      this.logConverted(id, ms.keyOf(id) ?? key, stats, started);
      this.o.events.emit({ key: ms.keyOf(id) ?? key, layer: id, ok: true, durationMs: Date.now() - started, stats, mode: 'background' });
      // Its directory goes once no mount uses it and the grace time has
      // passed since it was last handed out (a child's lowerdir, a view): at
      // once if it never was (the top layer of a pull).
      this.o.sweeper.retire(id, 0);
    } catch (err) {
      if (ms.keyOf(id) === undefined || this.closed) {
        log.info({ op: 'convert', key, snapshot: id, layer: id }, 'layer removed before its conversion finished');
        return;
      }
      this.o.events.emit({ key, layer: id, ok: false, error: (err as Error).message, durationMs: Date.now() - started, mode: 'background' });
      log.error({ op: 'convert', key, snapshot: id, layer: id, err: (err as Error).message }, `auto-convert of layer ${id} to EROFS failed; it stays a directory until the next start`);
    }
  }

  /**
   * Commit with conversion: the layer directory becomes images/<id>.erofs
   * over the chunk store, mounted at mnt/<id>, and the row, the layer and its
   * chunk references are recorded in one transaction (`commitRow`). On
   * failure the active snapshot is untouched (containerd can retry) and no
   * image remains. `again`: the whole Commit, when another one of the same
   * snapshot was under way (answered as if the two ran one after the other).
   */
  async commitConverted(id: string, name: string, key: string, labels: Labels | undefined, started: number, again: () => Promise<void>): Promise<void> {
    const { ms, mounts } = this.o;
    // Fail fast, before minutes of work, on what the transaction would refuse.
    if (ms.has(name)) throw alreadyExists(`snapshot ${JSON.stringify(name)} already exists`);
    const inflight = mounts.jobOf(id);
    if (inflight) {
      await inflight.catch(() => undefined);
      return again();
    }
    await mounts.track(id, this.convertAndCommit(id, name, key, labels, started));
  }

  private async convertAndCommit(id: string, name: string, key: string, labels: Labels | undefined, started: number): Promise<void> {
    const { ms, logger: log } = this.o;
    log.info({ op: 'convert', key, snapshot: id, layer: id }, `detected new layer ${id}, auto-converting to EROFS`);
    try {
      // Usage as containerd's snapshotters report it: the layer's files as
      // unpacked, counted by the conversion's walk (what is stored is in the
      // layer's row and in /stats).
      const stats = await this.convert(id, started, (layer) => {
        ms.commitActive(key, name, layer.usage ?? UNMEASURED, labels);
      });
      // Recorded, and nothing ever mounted the directory as a layer: it goes now.
      await this.o.store.segments.removeLayerTree(this.o.layout.snapshotDir(id));
      this.logConverted(id, name, stats, started);
      this.o.events.emit({ key: name, layer: id, ok: true, durationMs: Date.now() - started, stats, mode: 'sync' });
      log.info({ op: 'commit', key, name, snapshot: id, duration_ms: Date.now() - started }, 'snapshot committed');
    } catch (err) {
      // Removed while it was being converted: as if the Remove ran first.
      if (!ms.has(key) || ms.getInfo(key).id !== id) {
        throw notFound(`snapshot ${JSON.stringify(key)} was removed while it was being committed`);
      }
      this.o.events.emit({ key, layer: id, ok: false, error: (err as Error).message, durationMs: Date.now() - started, mode: 'sync' });
      log.error({ op: 'convert', key, snapshot: id, layer: id, err: (err as Error).message }, `auto-convert of layer ${id} to EROFS failed`);
      throw err;
    }
  }

  /** Converts layer `id` from its directory and records it (see mountAndRecord). */
  private async convert(id: string, started: number, alsoInTx: (layer: ConvertedLayer) => void): Promise<ConvertStats> {
    return this.o.converter.convert(id, this.o.layout.upper(id), this.mountAndRecord(id, started, alsoInTx));
  }

  /**
   * The converter's `finish` for layer `id`: mounts the image at mnt/<id>
   * and, in one transaction, runs `alsoInTx` and records chunks, references
   * and the layer row; on failure the mount goes again (the converter
   * removes the rest). Also used for remote layers.
   */
  mountAndRecord(id: string, started: number, alsoInTx: (layer: ConvertedLayer) => void): (layer: ConvertedLayer) => ConvertStats {
    const { ms, store, mounts } = this.o;
    return (layer) => {
      mounts.mountImage(id, layer.hasBlob, layer.image);
      try {
        ms.transaction(() => {
          alsoInTx(layer);
          recordLayer(ms, store, id, layer, 'new', started);
        });
      } catch (err) {
        mounts.unmount(id);
        throw err;
      }
      return layer.stats;
    };
  }

  private logConverted(id: string, key: string, stats: ConvertStats, started: number): void {
    this.o.logger.info(
      {
        op: 'convert',
        key,
        snapshot: id,
        layer: id,
        ...convertedFields(stats),
        mkfs_ms: stats.mkfsMs,
        duration_ms: Date.now() - started,
      },
      `converted layer ${id} to EROFS: ${convertedSummary(stats)}`,
    );
  }
}
