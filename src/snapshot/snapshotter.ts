import fs from 'node:fs';
import path from 'node:path';
import type { ConvertedLayerPusher } from '../convert/share';
import { failedPrecondition, internal, notFound, remoteLayerExists } from '../errdefs/errors';
import type { ConvertEvent } from '../layers/events';
import type { IntegrityReport, LayerIntegrity } from '../layers/integrity';
import type { Logger } from '../log/logger';
import type { LayerKernel } from '../mount/layer-kernel';
import type { LazyLoader } from '../ondemand/lazy-loader';
import { LABEL_SNAPSHOT_REF, type RemoteLayers } from '../remote/lazy';
import type { ChunkStore, Extent } from '../store/chunkstore';
import { type LayerRow, type MetaStore, checkKey } from '../store/metastore';
import type { SpaceReserve } from '../store/reserve';
import { splitKey } from '../store/keys';
import { RootLayout } from '../store/root-layout';
import type { ImageSealer } from '../store/seal';
import { type Info, Kind, type Labels, type Mount, type Snapshot, type Usage, kindName } from '../store/types';
import type { VerifyProgress } from '../store/verify';
import { UNMEASURED, diskUsage, fsyncDir, isUnmeasured, removeAll } from '../util/fs';
import { type LayerParts, type SnapshotterOptions, composeLayers } from './compose';
import { compileFilters } from './filters';
import { recoverLayers } from './recovery';
import { waitAtMost } from '../util/wait';

export type { SnapshotterOptions } from './compose';

/**
 * The snapshotter: containerd's snapshot lifecycle (Prepare/View → Commit →
 * Remove) over a MetaStore and plain directories, in the shape of
 * containerd's overlayfs snapshotter. What happens to committed layers
 * after that (conversion to EROFS, remote and lazy layers, settling,
 * sweeping) is done by the layer services in src/layers/, built by
 * composeLayers; the layout under ROOT is in store/root-layout.ts.
 *
 * Crash safety: a snapshot's directory is built under a temporary name and
 * renamed to its id inside the transaction that creates its row; on Remove
 * the row goes first and the directory after. So a kill -9 anywhere leaves
 * either the old or the new state plus, at worst, a directory no row
 * names, which Cleanup (and start-up) deletes.
 */
export class Snapshotter {
  /** The composed parts (for the daemon's wiring: /stats, /healthz, prefetch). */
  readonly parts: LayerParts;
  private readonly layout: RootLayout;
  private readonly log: Logger;
  private readonly overlayIndexOff: boolean;
  private closed = false;

  constructor(opts: SnapshotterOptions) {
    this.parts = composeLayers(opts, {
      createActive: async (key, parent) => {
        await this.createSnapshot(Kind.Active, key, parent, undefined);
      },
      remove: (key) => this.remove(key),
    });
    this.layout = this.parts.layout;
    this.log = this.parts.logger;
    // As containerd's overlayfs snapshotter: with index=on, overlayfs refuses
    // to reuse a lower layer mounted under another upper.
    this.overlayIndexOff = this.parts.kernel.overlayHasIndex();
    const e = this.parts.erofs;
    if (e) {
      // A chunk found bad while serving (a copy for a lazy layer), or healed
      // by an import that brought its bytes: the layers on it stop or start being served.
      let due = false;
      e.store.onChunkHealth = () => {
        if (due) return;
        due = true;
        setImmediate(() => {
          due = false;
          if (!this.closed) e.integrity.afterChunkHealth();
        });
      };
    }
  }

  get root(): string {
    return this.layout.root;
  }

  get ms(): MetaStore {
    return this.parts.ms;
  }

  get reserve(): SpaceReserve {
    return this.parts.reserve;
  }

  get remote(): RemoteLayers | null {
    return this.parts.remote;
  }

  get store(): ChunkStore | null {
    return this.parts.erofs?.store ?? null;
  }

  /** The kernel seam, when layers are EROFS images (its mount facts are in /stats). */
  get mounter(): LayerKernel | null {
    return this.parts.erofs ? this.parts.kernel : null;
  }

  get loader(): LazyLoader | null {
    return this.parts.erofs?.loader ?? null;
  }

  get share(): ConvertedLayerPusher | null {
    return this.parts.erofs?.share ?? null;
  }

  get integrity(): LayerIntegrity | null {
    return this.parts.erofs?.integrity ?? null;
  }

  get sealer(): ImageSealer | null {
    return this.parts.erofs?.sealer ?? null;
  }

  /** Told of each conversion (set by the daemon's wiring). */
  set onConvert(fn: ((e: ConvertEvent) => void) | undefined) {
    this.parts.events.listener = fn;
  }

  get onConvert(): ((e: ConvertEvent) => void) | undefined {
    return this.parts.events.listener;
  }

  /** Number of layers waiting for or under background conversion. */
  get pendingConversions(): number {
    return this.parts.erofs?.conversion.pending ?? 0;
  }

  /** Lazy layers settled into the chunk store since start. */
  get settledLayers(): number {
    return this.parts.erofs?.settler?.settled ?? 0;
  }

  /** Settles every lazy layer that has all its data and that nothing uses (layers/settle.ts). */
  settleIdle(): Promise<number> {
    return this.closed ? Promise.resolve(0) : (this.parts.erofs?.settler?.settleIdle() ?? Promise.resolve(0));
  }

  /** Deletes the directories of converted layers no mount uses (layers/sweep.ts). */
  sweepRetired(): Promise<number> {
    return this.closed ? Promise.resolve(0) : this.parts.sweeper.sweepRetired();
  }

  /** Start-up recovery, before serving (recovery.ts). */
  async recover(): Promise<void> {
    this.checkOpen();
    await recoverLayers(this.parts, (key) => this.remove(key));
  }

  private checkOpen(): void {
    if (this.closed) throw internal('snapshotter is closed');
  }

  async stat(key: string): Promise<Info> {
    this.checkOpen();
    return this.ms.getInfo(key).info;
  }

  async update(info: Pick<Info, 'name' | 'labels'>, fieldpaths: string[]): Promise<Info> {
    this.checkOpen();
    checkKey(info.name);
    return this.ms.transaction(() => this.ms.updateInfo(info, fieldpaths));
  }

  /** Usage of `key`: measured now for an active snapshot, recorded otherwise (see countedUsage). */
  async usage(key: string): Promise<Usage> {
    this.checkOpen();
    const { id, info, usage } = this.ms.getInfo(key);
    if (info.kind !== Kind.Active) return isUnmeasured(usage) ? this.countedUsage(key, id) : usage;
    const measured = await diskUsage(this.layout.upper(id));
    // A Remove or Commit may have run while the tree was walked: answer for
    // the snapshot only if the key still names it (NotFound once removed or
    // committed; a fresh snapshot under the same key is measured anew).
    if (this.ms.getInfo(key).id !== id) return this.usage(key);
    return measured;
  }

  /**
   * Usage of committed layer `id` (named `key`) that its background
   * conversion has not counted yet (UNMEASURED): its count once a
   * conversion under way is done, else measured now and recorded.
   */
  private async countedUsage(key: string, id: string): Promise<Usage> {
    // Its conversion under way counts it: no second walk beside it.
    const job = this.parts.mounts.jobOf(id);
    if (job) {
      await job.catch(() => undefined);
      const after = this.ms.getInfo(key);
      if (after.id === id && !isUnmeasured(after.usage)) return after.usage;
    }
    const measured = await diskUsage(this.layout.upper(id));
    const now = this.ms.getInfo(key);
    if (now.id !== id) return this.usage(key);
    // The conversion may have counted it meanwhile (and begun removing the directory).
    if (!isUnmeasured(now.usage)) return now.usage;
    // Recorded when the directory was there (a full disk may refuse the write: the answer stands).
    if (measured.inodes > 0) {
      try {
        this.ms.setUsage(id, measured);
      } catch (err) {
        this.log.warn({ op: 'usage', key, snapshot: id, err: (err as Error).message }, 'usage measured but not recorded');
      }
    }
    return measured;
  }

  async mounts(key: string): Promise<Mount[]> {
    this.checkOpen();
    return this.mountsFor(this.ms.getSnapshot(key));
  }

  async prepare(key: string, parent: string, labels?: Labels): Promise<Mount[]> {
    const importer = this.parts.erofs?.importer;
    if (importer) {
      this.checkOpen();
      if (await importer.importFor(labels, parent, key)) {
        // containerd's contract for remote snapshots: the layer exists now
        // under the target key; it lists it by label and skips download and unpack.
        throw remoteLayerExists(`target snapshot ${JSON.stringify(labels?.[LABEL_SNAPSHOT_REF])} is a remote layer, made without its tar`);
      }
    }
    return this.createSnapshot(Kind.Active, key, parent, labels);
  }

  async view(key: string, parent: string, labels?: Labels): Promise<Mount[]> {
    return this.createSnapshot(Kind.View, key, parent, labels);
  }

  /**
   * Synchronous from the first directory to the row: no other call can run in
   * between, so Cleanup never sees a half-made snapshot as garbage.
   */
  private async createSnapshot(kind: Kind, key: string, parent: string, labels?: Labels): Promise<Mount[]> {
    this.checkOpen();
    checkKey(key);
    const started = Date.now();
    const layerMounts = this.parts.mounts;
    const tmp = this.layout.newSnapshotDir();
    fs.mkdirSync(tmp, { mode: 0o700 });
    let snap: Snapshot;
    try {
      fs.mkdirSync(path.join(tmp, 'fs'), { mode: 0o755 });
      if (kind === Kind.Active) fs.mkdirSync(path.join(tmp, 'work'), { mode: 0o711 });
      snap = this.ms.transaction(() => {
        const s = this.ms.createSnapshot(kind, key, parent, labels);
        for (const id of s.parentIds) layerMounts.assertServed(id);
        if (s.parentIds.length > 0) {
          // The new layer's root starts owned like its parent's (containerd does the same).
          const st = layerMounts.lstatRoot(s.parentIds[0]);
          fs.lchownSync(path.join(tmp, 'fs'), st.uid, st.gid);
        }
        const dest = this.layout.snapshotDir(s.id);
        if (fs.existsSync(dest)) {
          // Left by a crash between a rename and its rolled-back transaction:
          // no row names it, so it is garbage; move it aside for Cleanup.
          fs.renameSync(dest, this.layout.removedDir(s.id));
        }
        fs.renameSync(tmp, dest);
        return s;
      });
    } catch (err) {
      fs.rmSync(tmp, { recursive: true, force: true });
      throw err;
    }
    fsyncDir(this.layout.snapshots);
    this.log.info({ op: kind === Kind.View ? 'view' : 'prepare', key, parent, snapshot: snap.id, duration_ms: Date.now() - started }, `${kindName(kind)} snapshot created`);
    return this.mountsFor(snap);
  }

  private mountsFor(s: Snapshot): Mount[] {
    if (s.parentIds.length === 0) {
      return [{ type: 'bind', source: this.layout.upper(s.id), options: [s.kind === Kind.View ? 'ro' : 'rw', 'rbind'] }];
    }
    const lower = this.parts.mounts.rootsOf(s.parentIds, s.id);
    if (s.kind === Kind.View && s.parentIds.length === 1) {
      return [{ type: 'bind', source: lower[0], options: ['ro', 'rbind'] }];
    }
    const options: string[] = [];
    if (this.overlayIndexOff) options.push('index=off');
    if (s.kind === Kind.Active) {
      options.push(`workdir=${this.layout.work(s.id)}`, `upperdir=${this.layout.upper(s.id)}`);
    }
    options.push(`lowerdir=${lower.join(':')}`);
    return [{ type: 'overlay', source: 'overlay', options }];
  }

  async commit(name: string, key: string, labels?: Labels): Promise<void> {
    this.checkOpen();
    checkKey(name, 'name');
    const started = Date.now();
    const e = this.parts.erofs;
    // Slow work (walking the layer) outside the transaction; the transaction
    // re-checks everything, so a concurrent Remove or Commit is detected.
    // Any kind: commitActive reports a taken name before a wrong kind, as containerd.
    let s = this.ms.getAny(key);
    // A Commit racing an Apply of the same snapshot waits for it (containerd commits after Apply returned).
    const inflight = e && s.kind === Kind.Active ? this.parts.mounts.jobOf(s.id) : undefined;
    if (inflight) {
      await inflight.catch(() => undefined);
      s = this.ms.getAny(key);
    }
    const applied = e && s.kind === Kind.Active ? this.ms.getLayer(s.id) : undefined;
    if (applied) {
      // dedup-differ applied its layer: already an image, mounted and recorded; Commit only names it.
      const usage = { size: applied.logical_bytes, inodes: applied.files };
      const id = this.ms.transaction(() => this.ms.commitActive(key, name, usage, labels));
      await removeAll(this.layout.snapshotDir(id)).catch((err: Error) => this.log.warn({ op: 'commit', key, name, snapshot: id, err: err.message }, 'empty directory of an applied layer left for cleanup'));
      this.log.info({ op: 'commit', key, name, snapshot: id, size: usage.size, inodes: usage.inodes, duration_ms: Date.now() - started }, 'snapshot committed');
      // Shared only now: containerd commits once the diff id Apply returned is the image's.
      e?.offer?.(id);
      return;
    }
    if (e && !e.background && s.kind === Kind.Active) {
      await e.conversion.commitConverted(
        s.id,
        name,
        key,
        labels,
        started,
        () => this.commit(name, key, labels),
      );
      return;
    }
    if (e && s.kind === Kind.Active) {
      // What would make the conversion fail for sure fails the Commit now.
      await e.converter.probe();
    }
    // The background conversion walks the layer and counts its usage then:
    // containerd does not wait for a walk of its own (UNMEASURED).
    const usage = s.kind !== Kind.Active ? { size: 0, inodes: 0 } : e ? UNMEASURED : await diskUsage(this.layout.upper(s.id));
    const id = this.ms.transaction(() => this.ms.commitActive(key, name, usage, labels));
    const counted = isUnmeasured(usage) ? {} : { size: usage.size, inodes: usage.inodes };
    this.log.info({ op: 'commit', key, name, snapshot: id, ...counted, duration_ms: Date.now() - started }, 'snapshot committed');
    e?.conversion.enqueue(id);
  }

  async remove(key: string): Promise<void> {
    this.checkOpen();
    const { reserve, ms } = this.parts;
    const e = this.parts.erofs;
    let dead: Extent[] = [];
    // On a full disk the DELETE's WAL frames go where the WAL was before
    // (a checkpoint), else into a slice of the reserve.
    const { id, kind, layer } = reserve.whenFull(
      `remove of ${JSON.stringify(key)}`,
      () =>
        ms.transaction(() => {
          const r = ms.remove(key);
          if (r.layer && e) dead = e.store.dropLayerRefs(Number(r.id));
          return r;
        }),
      { reuse: () => ms.checkpoint() },
    );
    // The rows are gone; now the files. If this fails or the process dies
    // here, they are unnamed and Cleanup (or start-up) removes them.
    if (layer && e) {
      try {
        this.parts.mounts.unmount(id);
        fs.rmSync(this.layout.image(id), { force: true });
        e.loader?.drop(id);
        this.parts.mounts.forget(id);
        e.store.releaseExtents(dead);
      } catch (err) {
        this.log.warn({ op: 'remove', key, snapshot: id, err: (err as Error).message }, 'layer image left for cleanup');
      }
    }
    const dir = this.layout.snapshotDir(id);
    const doomed = this.layout.removedDir(id, true);
    try {
      let renamed = true;
      try {
        fs.renameSync(dir, doomed);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // A converted layer's directory went once nothing mounted it: nothing is left to remove.
        if (code === 'ENOENT' && !fs.existsSync(dir)) {
          renamed = false;
        } else {
          // A full disk may have no room for the longer name: the row is gone
          // and its id is never used again (AUTOINCREMENT), so the directory
          // is deleted where it is.
          if (code !== 'ENOSPC') throw err;
          renamed = false;
          await this.removeLayerTree(dir);
        }
      }
      if (renamed) await this.removeLayerTree(doomed);
    } catch (err) {
      this.log.warn({ op: 'remove', key, snapshot: id, err: (err as Error).message }, 'directory left for cleanup');
    }
    this.log.info({ op: 'remove', key, snapshot: id, kind: kindName(kind) }, 'snapshot removed');
    // Space given back: the reserve, if a full disk took it, can be made again (and once the freed chunks are punched).
    reserve.restore();
    if (dead.length > 0 && e) void e.store.settled().then(() => !this.closed && reserve.restore());
    // A container's snapshot gone: the lazy layers under it may be idle now.
    e?.settler?.schedule(1000);
  }

  /** Calls fn with each snapshot matching any of the filters. */
  async walk(fn: (info: Info) => void | Promise<void>, filters: readonly string[] = []): Promise<void> {
    this.checkOpen();
    const match = compileFilters(filters);
    const infos: Info[] = [];
    this.ms.walkInfo((info) => {
      if (match(info)) infos.push(info);
    });
    for (const info of infos) await fn(info);
  }

  /** Removes a snapshot's directory (or one moved aside): through the store when there is one, for the adopted files it may link (see Segments.removeLayerTree). */
  private removeLayerTree(p: string): Promise<void> {
    return this.parts.erofs ? this.parts.erofs.store.segments.removeLayerTree(p) : removeAll(p);
  }

  /** Removes every directory under snapshots/ that no row names. */
  async cleanup(): Promise<string[]> {
    this.checkOpen();
    const ids = this.ms.idMap();
    // First, synchronously, move every unnamed entry aside under a unique
    // name: a Prepare that runs while the slow deletes below are under way
    // may reuse a rolled-back id, and must not lose its new directory.
    const doomed: string[] = [];
    for (const name of fs.readdirSync(this.layout.snapshots)) {
      if (ids.has(name)) continue;
      // In-flight temp dirs cannot exist here: createSnapshot is synchronous.
      const from = path.join(this.layout.snapshots, name);
      if (name.startsWith(RootLayout.REMOVED_PREFIX)) {
        doomed.push(from);
      } else {
        const to = this.layout.removedDir(name);
        fs.renameSync(from, to);
        doomed.push(to);
      }
    }
    for (const p of doomed) await this.removeLayerTree(p);
    const removed = doomed.map((p) => path.basename(p));
    if (this.parts.erofs) {
      const live = new Set(this.ms.layers().map((l) => String(l.snapshot_id)));
      await this.parts.sweeper.sweepLayerOrphans(live);
    }
    if (removed.length > 0) this.log.info({ op: 'cleanup', removed: removed.length }, 'removed unreferenced directories');
    return removed;
  }

  /** The id of snapshot `key`, or undefined when there is none (or the key is malformed). */
  idOf(key: string): string | undefined {
    try {
      return this.ms.has(key) ? this.ms.getInfo(key).id : undefined;
    } catch {
      return undefined;
    }
  }

  /**
   * The read-only roots of committed snapshot `ref` and of its parents,
   * nearest first: the layer's EROFS mount, or its directory until it is
   * converted. For prefetch. `ref` is a layer id (as in images/<id>.erofs),
   * containerd's key of the snapshot (`<namespace>/<txid>/<chain id>`), or
   * a chain id as `ctr snapshots --snapshotter dedup ls` shows it, looked
   * up in `namespace` first, then in any (a chain id names the same layers
   * everywhere). NotFound for an unknown or uncommitted snapshot.
   */
  layerRoots(ref: string, namespace = 'default'): { id: string; key: string; root: string }[] {
    this.checkOpen();
    let key: string | undefined;
    if (/^[1-9][0-9]{0,15}$/.test(ref)) key = this.ms.keyOf(ref);
    else if (this.idOf(ref) !== undefined) key = ref;
    else if (/^sha256:[0-9a-f]{64}$/.test(ref)) key = this.committedKeyOfChain(ref, namespace);
    if (key === undefined) {
      throw notFound(
        `no layer ${JSON.stringify(ref)} (expected an image reference as in ctr images ls, a chain id as in ctr snapshots --snapshotter dedup ls, a layer id as in images/<id>.erofs, or containerd's snapshot key)`,
      );
    }
    const s = this.ms.getAny(key);
    if (s.kind !== Kind.Committed) throw notFound(`snapshot ${JSON.stringify(ref)} is not a committed layer`);
    const ids = [s.id, ...s.parentIds];
    const roots = this.parts.mounts.rootsOf(ids);
    return ids.map((id, i) => ({ id, key: this.ms.keyOf(id) ?? '', root: roots[i] }));
  }

  /** containerd's key of the committed snapshot of chain id `chain`: in `namespace` if it has one, else in any. */
  private committedKeyOfChain(chain: string, namespace: string): string | undefined {
    let any: string | undefined;
    let mine: string | undefined;
    this.ms.walkInfo((info) => {
      if (info.kind !== Kind.Committed) return;
      const k = splitKey(info.name);
      if (k?.name !== chain) return;
      any ??= info.name;
      if (k.ns === namespace) mine ??= info.name;
    });
    return mine ?? any;
  }

  /**
   * `dedup-snapshotter fsck` (POST /fsck): every chunk of the store and every
   * layer image verified, layers on damaged data quarantined, layers whose
   * data is good again served again. Progress goes to `onProgress`.
   */
  async fsck(onProgress?: (p: VerifyProgress) => void): Promise<IntegrityReport> {
    this.checkOpen();
    const integrity = this.parts.erofs?.integrity;
    if (!integrity) throw failedPrecondition('use_erofs is off: there is no chunk store to check');
    return integrity.fsck(this.ms.layers().map((l) => String(l.snapshot_id)), onProgress);
  }

  /** Layer rows (EROFS layers) for /stats. */
  layerRows(): LayerRow[] {
    return this.ms.layers();
  }

  /**
   * Waits (at most `timeoutMs`) for the chunk store's punches of freed
   * extents, so that close() records the store's stamp and the next start
   * need not verify every chunk. Bounded: a punch queued behind thread-pool
   * jobs that wait on the kernel must not hold up a stop.
   */
  async settle(timeoutMs = 5000): Promise<void> {
    const store = this.parts.erofs?.store;
    if (store) await waitAtMost(store.settled(), timeoutMs);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    const e = this.parts.erofs;
    this.parts.sweeper.close();
    e?.conversion.close();
    e?.applier.close();
    e?.plain?.close();
    e?.settler?.close();
    e?.share?.close();
    // The holder keeps the marks: reads wait for the next daemon.
    e?.loader?.close();
    void e?.integrity.stop();
    // Layer mounts stay: running containers use them, and start-up finds them.
    e?.store.close();
    this.parts.reserve.close();
    this.ms.close();
  }
}
