import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../log/logger';
import type { LazyLoader } from '../ondemand/lazy-loader';
import type { MetaStore } from '../store/metastore';
import type { RootLayout } from '../store/root-layout';
import { readdirOrEmpty, removeAll } from '../util/fs';
import type { LayerMounts } from './layer-mounts';

export interface SweeperOptions {
  layout: RootLayout;
  ms: MetaStore;
  mounts: LayerMounts;
  loader: LazyLoader | null;
  logger: Logger;
  /** Removes an old layer directory (default removeAll; the daemon's: Segments.removeLayerTree, which also settles the links of files taken into the store from it). */
  removeTree?: (p: string) => Promise<void>;
}

/**
 * Deletes what no row needs any more: the old directories of converted
 * layers once no mount uses them (retired), and mounts, images and lazy
 * files of layers no row names.
 */
export class Sweeper {
  private timer: NodeJS.Timeout | null = null;
  private closed = false;

  constructor(private readonly o: SweeperOptions) {}

  /**
   * The directory of converted layer `id` goes once no mount uses it and
   * the grace time has passed since `at` and since the directory was last
   * handed out in the mounts of a snapshot that is still active or a view
   * (LayerMounts remembers that). `at` 0: only those hand-outs count, so a
   * directory never handed out, or only to snapshots committed since (a
   * pull's next layer), goes at once.
   */
  retire(id: string, at = Date.now()): void {
    const { mounts } = this.o;
    mounts.retire(id, at);
    if (!this.timer) {
      this.timer = setInterval(() => this.sweepLogged(), Math.max(250, Math.min(5000, mounts.graceMs / 2)));
      this.timer.unref();
    }
    if (Date.now() - Math.max(at, mounts.dirHandedOutAt(id)) >= mounts.graceMs) this.sweepLogged();
  }

  /** A sweep in the background; a failure is logged (the next tick tries again). */
  private sweepLogged(): void {
    this.sweepRetired().catch((err: Error) => this.o.logger.warn({ op: 'convert', err: err.message }, `old layer directories not removed yet: ${err.message}`));
  }

  /**
   * Deletes the old directories of converted layers that no mount in the
   * mount table names (as a bind root or an overlay lowerdir, also the
   * relative form containerd uses for long option strings) and that were
   * not handed out, for the grace time, in the mounts of a snapshot that
   * is still active or a view (containerd mounts what Prepare returns a
   * moment later).
   */
  async sweepRetired(): Promise<number> {
    const { mounts, ms, layout } = this.o;
    if (this.closed || mounts.retiredCount === 0) return 0;
    const table = mounts.kernel.mountTable();
    const now = Date.now();
    let removed = 0;
    for (const [id, since] of mounts.retiredSince()) {
      if (ms.keyOf(id) === undefined) {
        mounts.unretire(id);
        continue;
      }
      if (now - since < mounts.graceMs) continue;
      if (new RegExp(`(^|[\\s=:,/])${id}/fs([\\s:,/]|$)`, 'm').test(table)) continue;
      mounts.unretire(id);
      const doomed = layout.removedDir(id);
      try {
        fs.renameSync(layout.snapshotDir(id), doomed);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      }
      await (this.o.removeTree ?? removeAll)(doomed);
      removed++;
      this.o.logger.debug({ op: 'convert', snapshot: id, layer: id }, 'directory of converted layer removed');
    }
    if (mounts.retiredCount === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = null;
    }
    return removed;
  }

  /**
   * Unmounts and deletes mounts/images of layers no row names (and nothing
   * is working on); lazy files of layers that are not lazy (any more);
   * images/<id>.erofs of lazy layers (a settle the daemon died in).
   */
  async sweepLayerOrphans(live: Set<string>): Promise<number> {
    const { mounts, ms, layout, loader } = this.o;
    const kernel = mounts.kernel;
    let n = 0;
    const keep = (id: string) => live.has(id) || mounts.isBusy(id);
    for (const name of readdirOrEmpty(layout.mntDir)) {
      if (keep(name)) continue;
      kernel.unmount(path.join(layout.mntDir, name));
      n++;
    }
    const lazy = new Set(ms.lazyLayers().map((r) => String(r.snapshot_id)));
    for (const id of loader?.orphans((id) => lazy.has(id) || mounts.isBusy(id)) ?? []) {
      loader?.drop(id);
      n++;
    }
    const busy = mounts.busyIds();
    for (const name of readdirOrEmpty(layout.imagesDir)) {
      const id = /^(\d+)\.erofs$/.exec(name)?.[1];
      if (id !== undefined && keep(id) && (!lazy.has(id) || mounts.isBusy(id))) continue;
      if (id === undefined && busy.some((c) => name.startsWith(`${c}.erofs.tmp`))) continue;
      fs.rmSync(path.join(layout.imagesDir, name), { force: true });
      n++;
    }
    return n;
  }

  close(): void {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
