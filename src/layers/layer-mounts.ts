import fs from 'node:fs';
import { failedPrecondition, internal, unavailable } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import type { LayerKernel } from '../mount/layer-kernel';
import type { LazyLoader } from '../ondemand/lazy-loader';
import type { LayerRow, MetaStore } from '../store/metastore';
import { Kind } from '../store/types';
import type { RootLayout } from '../store/root-layout';
import type { LayerIntegrity } from './integrity';

export interface LayerMountsOptions {
  layout: RootLayout;
  ms: MetaStore;
  kernel: LayerKernel;
  /** false: layers stay directories (use_erofs off), no layer image is mounted. */
  images: boolean;
  loader: LazyLoader | null;
  integrity: LayerIntegrity | null;
  logger: Logger;
  /** How long a layer handed out in a mount is left alone (containerd mounts it a moment later). */
  retireGraceMs: number;
}

/**
 * The one owner of what is going on with each committed layer: where it is
 * mounted (mnt/<id>), when it was last handed out in a mount, whether a
 * conversion, import or settle is working on it, whether its old directory
 * is retired (waiting to be deleted once no mount uses it) or read by a
 * push. The layer services ask it and tell it; none keeps such state itself.
 */
export class LayerMounts {
  readonly graceMs: number;
  /** Layer ids a conversion, import or settle is working on (not orphans, not swept). */
  private readonly busy = new Map<string, Promise<unknown>>();
  /** When a layer's root (its mount or its directory) was last handed out in a mount. */
  private readonly handedOut = new Map<string, number>();
  /**
   * Layers whose directory (not yet converted) was handed out: to which
   * snapshot (its id; '' for a caller that is none) and when. A hand-out
   * ends when its snapshot is committed or removed: containerd mounts an
   * active snapshot's mounts only while it is active.
   */
  private readonly dirHandouts = new Map<string, Map<string, number>>();
  /** Converted layers whose old directory may still be in use: id → when it was retired. */
  private readonly retired = new Map<string, number>();
  /** Lazy layers whose lost mount is being made again. */
  private readonly remounting = new Set<string>();

  constructor(private readonly o: LayerMountsOptions) {
    this.graceMs = o.retireGraceMs;
  }

  get kernel(): LayerKernel {
    return this.o.kernel;
  }

  path(id: string): string {
    return this.o.layout.mnt(id);
  }

  /** The on-demand loader, for lazy layer `id` (Internal when on-demand loading is off). */
  private loaderFor(id: string): LazyLoader {
    if (!this.o.loader) throw internal(`layer ${id} loads its data on demand but on-demand loading is off`);
    return this.o.loader;
  }

  /** Layer `id` is being worked on until `job` settles (see isBusy). */
  track<T>(id: string, job: Promise<T>): Promise<T> {
    this.busy.set(id, job);
    return job.finally(() => {
      if (this.busy.get(id) === job) this.busy.delete(id);
    });
  }

  /** Marks `id` busy until `untrack` (synchronous spans: settle, lazy import). */
  hold(id: string): void {
    this.busy.set(id, Promise.resolve());
  }

  untrack(id: string): void {
    this.busy.delete(id);
  }

  isBusy(id: string): boolean {
    return this.busy.has(id);
  }

  /** The job working on `id`, if any. */
  jobOf(id: string): Promise<unknown> | undefined {
    return this.busy.get(id);
  }

  busyIds(): string[] {
    return [...this.busy.keys()];
  }

  get busyCount(): number {
    return this.busy.size;
  }

  /** Converted layer `id`'s old directory is to be deleted once unused (`at`: when it was retired; 0: no grace). */
  retire(id: string, at: number): void {
    this.retired.set(id, at);
  }

  /** Retired layers and when each may go at the earliest (retired, or its directory last handed out to a snapshot still active or a view, whichever is later). */
  retiredSince(): [id: string, since: number][] {
    return [...this.retired].map(([id, at]) => [id, Math.max(at, this.dirHandedOutAt(id))]);
  }

  /**
   * When layer `id`'s directory was last handed out to a snapshot that may
   * still mount it (active or a view; '' holders always may); 0: never, or
   * only to snapshots committed or removed since.
   */
  dirHandedOutAt(id: string): number {
    const holders = this.dirHandouts.get(id);
    if (!holders) return 0;
    let latest = 0;
    for (const [holder, at] of holders) {
      if (holder !== '' && !this.mayStillMount(holder)) holders.delete(holder);
      else latest = Math.max(latest, at);
    }
    if (holders.size === 0) this.dirHandouts.delete(id);
    return latest;
  }

  /** Whether snapshot `id` is still active or a view (its mounts may still be mounted). */
  private mayStillMount(id: string): boolean {
    const key = this.o.ms.keyOf(id);
    return key !== undefined && this.o.ms.getAny(key).kind !== Kind.Committed;
  }

  /** `id`'s old directory is gone (or its layer is): no longer retired, nor remembered as handed out. */
  unretire(id: string): void {
    this.retired.delete(id);
    this.handedOut.delete(id);
    this.dirHandouts.delete(id);
  }

  get retiredCount(): number {
    return this.retired.size;
  }

  /** Milliseconds since `id` was last handed out in a mount (Infinity: never). */
  sinceHandedOut(id: string, now = Date.now()): number {
    const at = this.handedOut.get(id);
    return at === undefined ? Infinity : now - at;
  }

  forget(id: string): void {
    this.handedOut.delete(id);
    this.dirHandouts.delete(id);
  }

  /** Throws FailedPrecondition, naming what to do, if layer `id` is quarantined (see integrity.ts). */
  assertServed(id: string): void {
    const integrity = this.o.integrity;
    const quarantined = integrity?.isQuarantined(id);
    if (!integrity || !quarantined) return;
    const p = integrity.describe(id, quarantined);
    throw failedPrecondition(
      `layer ${id} (snapshot ${JSON.stringify(p.key)}) is quarantined, not served: ${quarantined}; remove the image${p.images.length > 0 ? ` (${p.images.join(', ')})` : ''} and pull it again (dedup-snapshotter fsck lists what is affected)`,
    );
  }

  /**
   * The read-only root of each committed layer `ids` names, for handing out
   * (in the mounts of snapshot `holder`, if one): its EROFS mount (made
   * again if lost, e.g. unmounted by hand), or its directory until it is
   * converted, remembered as handed out (see the sweep).
   */
  rootsOf(ids: string[], holder = ''): string[] {
    const mounted = this.o.images ? new Set(this.o.kernel.mountPoints()) : undefined;
    const now = Date.now();
    return ids.map((id) => {
      const layer = mounted ? this.o.ms.getLayer(id) : undefined;
      if (mounted) this.handedOut.set(id, now);
      if (!layer) {
        if (mounted) {
          const holders = this.dirHandouts.get(id) ?? new Map<string, number>();
          holders.set(holder, now);
          this.dirHandouts.set(id, holders);
        }
        return this.o.layout.upper(id);
      }
      this.ensureMounted(layer, mounted as Set<string>);
      return this.path(id);
    });
  }

  /**
   * lstat of a committed layer's root (its EROFS mount point, or its
   * directory); a layer whose mount point is gone (released from
   * quarantine after it was unmounted) is mounted again first.
   */
  lstatRoot(id: string): fs.Stats {
    const root = this.o.ms.getLayer(id) ? this.path(id) : this.o.layout.upper(id);
    try {
      return fs.lstatSync(root);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      return fs.lstatSync(this.rootsOf([id])[0]);
    }
  }

  /** Mounts the EROFS image of `layer` unless `mounted` (the mount points now) has it. */
  ensureMounted(layer: LayerRow, mounted: Set<string>): void {
    const id = String(layer.snapshot_id);
    const kernel = this.o.kernel;
    if (!this.o.images) throw internal(`layer ${id} is an EROFS image but use_erofs is off`);
    this.assertServed(id);
    const target = this.path(id);
    if (mounted.has(target)) return;
    if (!this.o.ms.isLazy(id)) return kernel.mountImage(this.o.layout.image(id), target, layer.has_blob === 1);
    const loader = this.loaderFor(id);
    if (loader.canMountAtOnce(id)) {
      return this.mountLazyFile(id, layer.has_blob === 1);
    }
    // Its mount was lost (unmounted by hand): making it again waits for the
    // holder (fanotify: mark before the mount opens the file) or for this
    // daemon's answers (fscache), so it happens in the background, once
    // (a second mount of the same fscache blob would fail with EEXIST).
    if (!this.remounting.has(id)) {
      this.remounting.add(id);
      this.mountLazy(layer)
        .catch((err: Error) => this.o.logger.error({ op: 'ondemand', layer: id, err: err.message }, `cannot mount lazy layer ${id} again: ${err.message}`))
        .finally(() => this.remounting.delete(id));
    }
    throw unavailable(`layer ${id}: its on-demand mount is being made again; retry`);
  }

  /** Mounts converted layer `id`'s image (or `image`) at mnt/<id>. */
  mountImage(id: string, hasBlob: boolean, image = this.o.layout.image(id)): void {
    this.o.kernel.mountImage(image, this.path(id), hasBlob);
  }

  unmount(id: string): void {
    this.o.kernel.unmount(this.path(id));
  }

  /**
   * Mounts lazy layer `layer`: reads of its missing data wait first
   * (fanotify: its file marked; fscache: the cache bound), then the mount:
   * file-backed over its lazy file, or EROFS over fscache.
   */
  async mountLazy(layer: Pick<LayerRow, 'snapshot_id' | 'has_blob'>): Promise<void> {
    const id = String(layer.snapshot_id);
    const loader = this.loaderFor(id);
    const kernel = this.o.kernel;
    const src = await loader.mountSource(id);
    if ('fscache' in src) await kernel.mountFscache(this.path(id), src.fscache);
    else kernel.mountImage(loader.imageOf(id), this.path(id), layer.has_blob === 1, src.device);
  }

  /** fanotify: lazy layer `id` mounted file-backed over its lazy files (marked already, or with nothing missing). */
  mountLazyFile(id: string, hasBlob: boolean): void {
    const loader = this.loaderFor(id);
    this.o.kernel.mountImage(loader.imageOf(id), this.path(id), hasBlob, loader.fileOf(id));
  }

  /**
   * Whether lazy layer `id` (all its data present, fanotify) is used by
   * nothing but its own mount: the mount comes off (EBUSY: a process's cwd
   * or open file is in it) and then no other open of its lazy files remains
   * (an overlay stacked on the layer holds a private clone of its mount,
   * which keeps the lazy superblock, hence its files, open for as long as
   * the container runs, and reads through it raise events only the lazy
   * files' owner can answer). Mounted again at once unless idle and
   * `keepOff`; synchronous, so no request sees the mount missing.
   */
  lazyIdle(id: string, hasBlob: boolean, keepOff: boolean): boolean {
    const loader = this.loaderFor(id);
    const kernel = this.o.kernel;
    if (!kernel.unmountIfIdle(this.path(id))) return false;
    let used = true;
    try {
      used = kernel.openElsewhere(loader.imageOf(id)) || kernel.openElsewhere(loader.fileOf(id));
    } finally {
      if (used || !keepOff) this.mountLazyFile(id, hasBlob);
    }
    return !used;
  }

  /**
   * Lazy layer `id` is mounted, lacks data, and no fanotify group marks its
   * file any more: holder and daemon both died, and while no process held
   * the group the kernel let every waiting and later read of its missing
   * data through, reading holes as zeros, which may now sit in the mount's
   * page cache. It is not handed out again as it is: its mount is replaced
   * by a new one (a new superblock: a clean page cache) over its file
   * marked again, so new views read the right bytes or wait. Overlays of
   * running containers keep the old superblock (their clone of the mount):
   * once the layer has all its data, the old superblock's page cache is
   * dropped file by file, so they read the right bytes from then on too
   * (except pages a process keeps mapped).
   */
  async remountStale(id: string): Promise<void> {
    const loader = this.loaderFor(id);
    const kernel = this.o.kernel;
    const log = this.o.logger;
    const layer = this.o.ms.getLayer(id);
    if (!layer) return;
    const target = this.path(id);
    log.error(
      { op: 'ondemand', layer: id, snapshot: id },
      `layer ${id} was mounted while the on-demand fanotify group was lost (holder and daemon both died): reads of its missing data may have returned zeros; mounting it again over a clean page cache and fetching all it lacks`,
    );
    // Kept open: the old superblock stays reachable after it is detached, to drop its pages later.
    let old: number | null = null;
    try {
      old = fs.openSync(target, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    } catch {
      // not there: nothing to drop
    }
    try {
      kernel.unmount(target);
      await this.mountLazy(layer);
    } catch (err) {
      if (old !== null) fs.closeSync(old);
      throw err;
    }
    if (old === null) return;
    const fd = old;
    void (async () => {
      try {
        if (!(await loader.loadAll(id))) return;
        const r = await kernel.dropPageCache(`/proc/self/fd/${fd}`);
        log.info({ op: 'ondemand', layer: id, files: r.files, failed: r.failed }, `layer ${id}: all its data is here; dropped the page cache of its previous mount (${r.files} files) for containers still using it`);
      } finally {
        fs.closeSync(fd);
      }
    })().catch((err: Error) => log.error({ op: 'ondemand', layer: id, err: err.message }, `layer ${id}: cannot drop the page cache of its previous mount: ${err.message}`));
  }
}
