import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { alreadyExists, failedPrecondition, internal, notFound, unavailable } from '../errdefs/errors';
import { type ConvertStats, type ConvertedLayer, Converter } from '../convert/converter';
import { type MkfsFeatures, probeMkfs } from '../convert/mkfs';
import { ConvertedLayerPusher } from '../convert/share';
import { ErrnoError } from '../../native/libc';
import { openElsewhere } from '../../native/lease';
import { ErofsMounter, type MountMode, unmountErofs, unmountIfIdle } from '../mount/erofs';
import { mountPoints } from '../mount/mountinfo';
import type { GroupFdStore } from '../ondemand/fdstore';
import { type LazyBackend, LazyLoader, type LazyLayerInput } from '../ondemand/lazy-loader';
import { dropPageCacheUnder } from '../ondemand/stale-pages';
import type { ChunkEntry, LayerHeader } from '../remote/dedup-image';
import { LABEL_SNAPSHOT_REF, type RemoteLayer, type RemoteLayers, criLayerOf, runsOf } from '../remote/lazy';
import { formatReference, parseReference } from '../remote/reference';
import { ChunkStore, type Extent, STORE_BLOCK, type StoreLayout, readAt } from '../store/chunkstore';
import { ImageSealer } from '../store/seal';
import { DEFAULT_RESERVE_BYTES, SpaceReserve, isDiskFull } from '../store/reserve';
import { extentKey, scanDataChunks } from '../convert/chunks';
import { readImageDeviceTags } from '../convert/erofs-format';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { compileFilters } from './filters';
import { type IntegrityReport, LayerIntegrity } from './integrity';
import type { VerifyProgress } from '../store/verify';
import { diskUsage, fsyncDir, readdirOrEmpty, removeAll } from '../util/fs';
import { type LayerRow, MetaStore, checkKey } from './storage';
import { type Info, Kind, type Labels, type Mount, type Snapshot, type Usage, kindName } from './types';

/** A layer conversion finished (ok) or failed, for the audit log and /stats. */
export interface ConvertEvent {
  key: string;
  layer: string;
  ok: boolean;
  error?: string;
  durationMs: number;
  stats?: ConvertStats;
  mode: 'background' | 'sync' | 'remote';
}

export interface SnapshotterOptions {
  root: string;
  logger?: Logger;
  /** Bytes of ROOT/reserve, released so a Remove goes through on a full disk (0: none; default DEFAULT_RESERVE_BYTES). */
  reserveBytes?: number;
  /** Called after each conversion; must not throw or block. */
  onConvert?: (e: ConvertEvent) => void;
  /** Dedup images in registries: layers made from metadata and the chunks the node lacks (lazy pull). */
  remote?: RemoteLayers | null;
  /**
   * Remote layers load their data on demand, through fanotify or EROFS over
   * fscache (the holder on `socket`, started with `holderCommand` when none
   * answers, keeps the fanotify group or /dev/cachefiles); null: their
   * missing chunks are fetched before Prepare returns.
   */
  ondemand?: {
    backend: LazyBackend;
    socket: string;
    holderCommand: string[] | null;
    attempts?: number;
    prefetch?: 'none' | 'list' | 'all';
    prefetchMbps?: number;
    prefetchConcurrency?: number;
    /** fscache: cache directory (a disk filesystem), cachefiles tag, EROFS domain_id. */
    fscache?: { dir: string; tag: string; domain: string };
    /** fanotify: move fully loaded lazy layers nothing uses into the chunk store (default true; see settleLayer). */
    settle?: boolean;
    /** fanotify: systemd's fd store, a third holder of the group (see ondemand/fdstore.ts). */
    fdStore?: GroupFdStore | null;
    /** fanotify: the group the fd store handed back at start (an fd taken over by the loader), or -1. */
    storedGroup?: number;
  } | null;
  /** Convert committed layers to EROFS images over the chunk store (use_erofs). */
  erofs?: {
    chunkSize: number;
    mkfs: string;
    mountMode?: MountMode;
    /** File-backed mounts: read the store with direct I/O ('auto': when the kernel has it). */
    directIo?: 'auto' | boolean;
    /** File-backed mounts: read-ahead in KiB ('auto': the store device's, at least one chunk). */
    readAheadKb?: 'auto' | number;
    /**
     * 'background': Commit records the layer as a directory and returns; the
     * layer is converted afterwards (pulls do not wait for mkfs.erofs).
     * 'sync': Commit converts before it returns, and fails if that fails.
     */
    convertMode?: 'background' | 'sync';
    /** Background mode: how long a replaced directory is kept after it was last handed out in a mount. */
    retireGraceMs?: number;
    /** Where new chunks go: chunks.blob, or a sealed segment per import ('auto': segments where fs-verity works). */
    storeLayout?: StoreLayout;
    /** The most store segments one layer image reads from. */
    storeMaxDevices?: number;
  } | null;
  /** Background scrub of the chunk store: pace (MiB/s) and how often (0: never). */
  integrity?: { scrubMbps: number; scrubIntervalMs: number; onStartProgress?: (p: VerifyProgress) => void };
  /** registry.push_converted: push each layer converted here that a CRI pull named, for other nodes to pull lazily (convert/share.ts). */
  pushConverted?: boolean;
}

/** A settle that found its layer in use or removed when it came to switch the mount. */
class SettleSkipped extends Error {
  constructor(readonly outcome: 'busy' | 'gone') {
    super(`settle skipped: layer ${outcome}`);
  }
}

/** How often lazy layers that have all their data but are in use are tried again. */
const SETTLE_RETRY_MS = 30_000;

/** Directory names under snapshots/ that are not snapshot ids. */
/** Key of the temporary active snapshot a remote layer is made in (never a containerd key: those carry a namespace). */
const REMOTE_IMPORT_PREFIX = 'remote-import-';
const TEMP_PREFIX = 'new-';
const REMOVED_PREFIX = 'rm-';

/**
 * The snapshotter: containerd's snapshot lifecycle (Prepare/View → Commit →
 * Remove) over a MetaStore and plain directories, in the shape of
 * containerd's overlayfs snapshotter.
 *
 * Layout under root:
 *   metadata.db            SQLite (WAL): snapshots, layers, chunk index
 *   snapshots/<id>/fs      the snapshot's upper directory (layer content)
 *   snapshots/<id>/work    overlayfs workdir of an active snapshot
 *   images/<id>.erofs      a converted committed layer (use_erofs)
 *   mnt/<id>               where that image is mounted, read-only
 *   store/chunks.blob      the chunk store all images read their data from
 *   lazy/<id>.erofs|.blob  a lazy layer's image and its on-demand data
 *   cache/                 only what can be fetched again (fscache's cache)
 *
 * Directories are named by numeric id, never by key. Crash safety: a
 * snapshot's directory is built under a temporary name and renamed to its id
 * inside the transaction that creates its row; on Remove the row goes first
 * and the directory after. So a kill -9 anywhere leaves either the old or the
 * new state plus, at worst, a directory no row names, which Cleanup (and
 * start-up) deletes.
 */
export class Snapshotter {
  readonly root: string;
  readonly ms: MetaStore;
  private readonly log: Logger;
  private readonly snapshotsDir: string;
  private readonly overlayIndexOff: boolean;
  private closed = false;
  readonly store: ChunkStore | null = null;
  private readonly converter: Converter | null = null;
  readonly mounter: ErofsMounter | null = null;
  private readonly mntDir: string;
  /** Snapshot ids whose Commit (conversion) is under way. */
  private readonly converting = new Map<string, Promise<unknown>>();
  private mkfsProbe: Promise<MkfsFeatures> | null = null;
  private readonly background: boolean = false;
  private readonly retireGraceMs: number = 5_000;
  /** Background conversions waiting, in commit order. */
  private readonly queue: string[] = [];
  private queueRunning = false;
  /** Converted layers whose old directory may still be in use: id → when it was retired. */
  private readonly retired = new Map<string, number>();
  /** When a layer's plain directory was last handed out in a mount. */
  private readonly handedOut = new Map<string, number>();
  private sweepTimer: NodeJS.Timeout | null = null;

  /** Told of each conversion; set at construction or later (wiring). */
  onConvert?: (e: ConvertEvent) => void;
  readonly remote: RemoteLayers | null;
  private readonly makingRemote = new Map<string, Promise<void>>();
  /** On-demand loading of remote layers (fanotify), when configured. */
  readonly loader: LazyLoader | null = null;
  /** Pushes converted layers back to their image's repository (registry.push_converted). */
  readonly share: ConvertedLayerPusher | null = null;
  /** Converted layers whose directory a push is reading: not swept meanwhile. */
  private readonly sharing = new Set<string>();
  /** Settling of fully loaded lazy layers into the chunk store (see settleIdle). */
  private settleOn = false;
  private settleTimer: NodeJS.Timeout | null = null;
  /** Lazy layers whose lost mount is being made again (ensureLayerMounted). */
  private readonly remounting = new Set<string>();
  private settleAt = 0;
  private settleRunning: Promise<number> | null = null;
  /** Lazy layers settled into the chunk store since start. */
  settledLayers = 0;
  /** Which layers may be served (damaged images or chunks are quarantined). */
  readonly integrity: LayerIntegrity | null = null;
  /** Seals layer images with fs-verity where ROOT's filesystem has it. */
  readonly sealer: ImageSealer | null = null;
  private readonly scrub: SnapshotterOptions['integrity'] | null;
  /** Space held back so Remove works on a full disk (store/reserve.ts). */
  readonly reserve: SpaceReserve;

  constructor(opts: SnapshotterOptions) {
    this.remote = opts.remote ?? null;
    this.scrub = opts.integrity ?? null;
    this.onConvert = opts.onConvert;
    this.root = opts.root;
    this.log = opts.logger ?? silentLogger();
    fs.mkdirSync(this.root, { recursive: true, mode: 0o700 });
    this.snapshotsDir = path.join(this.root, 'snapshots');
    fs.mkdirSync(this.snapshotsDir, { recursive: true, mode: 0o700 });
    this.reserve = new SpaceReserve({ root: this.root, bytes: opts.reserveBytes ?? DEFAULT_RESERVE_BYTES, logger: this.log });
    // A start on a full disk: opening the database makes its WAL's
    // shared-memory file (SQLite deletes it at every clean close), which
    // needs blocks; a slice of the reserve gives them.
    this.ms = this.reserve.whenFull('opening metadata.db', () => new MetaStore(path.join(this.root, 'metadata.db')));
    this.reserve.restore();
    // As containerd's overlayfs snapshotter: with index=on, overlayfs refuses
    // to reuse a lower layer mounted under another upper.
    this.overlayIndexOff = fs.existsSync('/sys/module/overlay/parameters/index');
    this.mntDir = path.join(this.root, 'mnt');
    if (opts.erofs) {
      const mkfs = opts.erofs.mkfs;
      // Probed once, on first use; a failed probe is retried on the next use.
      const mkfsFeatures = () => {
        if (!this.mkfsProbe) {
          this.mkfsProbe = probeMkfs(mkfs);
          this.mkfsProbe.catch(() => (this.mkfsProbe = null));
        }
        return this.mkfsProbe;
      };
      const store = new ChunkStore({ root: this.root, db: this.ms.db, logger: this.log, layout: opts.erofs.storeLayout, maxDevices: opts.erofs.storeMaxDevices });
      this.store = store;
      this.mounter = new ErofsMounter(store.blobPath, {
        devicesOf: (image) => store.devicePaths(readImageDeviceTags(image)),
        mode: opts.erofs.mountMode ?? 'auto',
        directIo: opts.erofs.directIo ?? 'auto',
        readAheadKb: opts.erofs.readAheadKb ?? 'auto',
        chunkSize: opts.erofs.chunkSize,
        logger: this.log,
      });
      this.background = (opts.erofs.convertMode ?? 'background') === 'background';
      this.retireGraceMs = opts.erofs.retireGraceMs ?? this.retireGraceMs;
      const sealer = new ImageSealer({ logger: this.log });
      this.sealer = sealer;
      this.converter = new Converter({
        seal: (file) => sealer.seal(file),
        store: this.store,
        mkfs: mkfsFeatures,
        imagesDir: path.join(this.root, 'images'),
        tmpDir: path.join(this.root, 'tmp'),
        chunkSize: opts.erofs.chunkSize,
      });
      if (opts.ondemand && this.remote) {
        // fscache: while an overlay uses a clone of the layer's mount, its
        // reads keep coming to this process as READs of the layer's blobs,
        // which only the lazy files answer; serving them from the store is
        // not built, so such layers stay lazy (docs/lazy-pull.md, "Settling").
        this.settleOn = (opts.ondemand.settle ?? true) && opts.ondemand.backend === 'fanotify';
        this.loader = new LazyLoader({
          backend: opts.ondemand.backend,
          fscache: opts.ondemand.fscache,
          onComplete: () => this.scheduleSettle(this.retireGraceMs),
          onGroupLost: (ids) => {
            for (const id of ids) this.remountStale(id).catch((err: Error) => this.log.error({ op: 'ondemand', layer: id, err: err.message }, `cannot mount lazy layer ${id} again: ${err.message}`));
          },
          mountPath: (id) => this.mntPath(id),
          dir: path.join(this.root, 'lazy'),
          socket: opts.ondemand.socket,
          holderCommand: opts.ondemand.holderCommand,
          holderLog: path.join(path.dirname(opts.ondemand.socket), 'holder.log'),
          attempts: opts.ondemand.attempts,
          prefetch: opts.ondemand.prefetch,
          prefetchMbps: opts.ondemand.prefetchMbps,
          prefetchConcurrency: opts.ondemand.prefetchConcurrency,
          remote: this.remote,
          store: this.store,
          logger: this.log,
          fdStore: opts.ondemand.fdStore,
          storedGroup: opts.ondemand.storedGroup,
        });
      }
      if (this.loader) this.migrateLazyImages();
      const integrity = new LayerIntegrity({
        ms: this.ms,
        store: this.store,
        remote: this.remote,
        imagePath: (id) => (this.loader && this.ms.isLazy(id) ? this.loader.imageOf(id) : (this.converter as Converter).imagePath(id)),
        mountPath: (id) => this.mntPath(id),
        layerIds: () => this.ms.layers().map((l) => String(l.snapshot_id)),
        logger: this.log,
        onStartProgress: opts.integrity?.onStartProgress,
      });
      this.integrity = integrity;
      // A chunk found bad while serving (a copy for a lazy layer), or healed
      // by an import that brought its bytes: the layers on it stop or start being served.
      let due = false;
      this.store.onChunkHealth = () => {
        if (due) return;
        due = true;
        setImmediate(() => {
          due = false;
          if (!this.closed) integrity.afterChunkHealth();
        });
      };
      if (opts.pushConverted && this.remote) {
        this.share = new ConvertedLayerPusher({ client: this.remote.client, mkfs: mkfsFeatures, chunkSize: opts.erofs.chunkSize, workDir: path.join(this.root, 'tmp'), logger: this.log });
      }
    }
  }

  private mntPath(id: string): string {
    return path.join(this.mntDir, id);
  }

  /**
   * lstat of a committed layer's root (its EROFS mount point, or its
   * directory); a layer whose mount point is gone (released from
   * quarantine after it was unmounted) is mounted again first.
   */
  private lstatLayerRoot(id: string): fs.Stats {
    const root = this.ms.getLayer(id) ? this.mntPath(id) : this.upperPath(id);
    try {
      return fs.lstatSync(root);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      return fs.lstatSync(this.layerRootsOf([id])[0]);
    }
  }

  /** Throws FailedPrecondition, naming what to do, if layer `id` is quarantined (see integrity.ts). */
  private assertServed(id: string): void {
    const quarantined = this.integrity?.isQuarantined(id);
    if (!quarantined) return;
    const p = (this.integrity as LayerIntegrity).describe(id, quarantined);
    throw failedPrecondition(
      `layer ${id} (snapshot ${JSON.stringify(p.key)}) is quarantined, not served: ${quarantined}; remove the image${p.images.length > 0 ? ` (${p.images.join(', ')})` : ''} and pull it again (dedup-snapshotter fsck lists what is affected)`,
    );
  }

  /** Mounts the EROFS image of `layer` unless `mounted` (the mount points now) has it. */
  private ensureLayerMounted(layer: LayerRow, mounted: Set<string>): void {
    const id = String(layer.snapshot_id);
    if (!this.converter || !this.mounter) throw internal(`layer ${id} is an EROFS image but use_erofs is off`);
    this.assertServed(id);
    const target = this.mntPath(id);
    if (mounted.has(target)) return;
    if (!this.ms.isLazy(id)) return this.mounter.mount(this.converter.imagePath(id), target, layer.has_blob === 1);
    if (!this.loader) throw internal(`layer ${id} loads its data on demand but on-demand loading is off`);
    if (this.loader.backend === 'fanotify' && (!this.loader.incomplete(id) || this.loader.isMarked(id))) {
      return this.mountLazyFile(id, layer.has_blob === 1);
    }
    // Its mount was lost (unmounted by hand): making it again waits for the
    // holder (fanotify: mark before the mount opens the file) or for this
    // daemon's answers (fscache), so it happens in the background, once
    // (a second mount of the same fscache blob would fail with EEXIST).
    if (!this.remounting.has(id)) {
      this.remounting.add(id);
      this.mountLazyLayer(layer)
        .catch((err: Error) => this.log.error({ op: 'ondemand', layer: id, err: err.message }, `cannot mount lazy layer ${id} again: ${err.message}`))
        .finally(() => this.remounting.delete(id));
    }
    throw unavailable(`layer ${id}: its on-demand mount is being made again; retry`);
  }

  /**
   * Mounts lazy layer `layer`: reads of its missing data wait first
   * (fanotify: its file marked; fscache: the cache bound), then the mount:
   * file-backed over its lazy file, or EROFS over fscache.
   */
  private async mountLazyLayer(layer: Pick<LayerRow, 'snapshot_id' | 'has_blob'>): Promise<void> {
    const id = String(layer.snapshot_id);
    const loader = this.loader as LazyLoader;
    const src = await loader.mountSource(id);
    const mounter = this.mounter as ErofsMounter;
    if ('fscache' in src) await mounter.mountFscache(this.mntPath(id), src.fscache);
    else mounter.mount(loader.imageOf(id), this.mntPath(id), layer.has_blob === 1, src.device);
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
  private async remountStale(id: string): Promise<void> {
    const loader = this.loader as LazyLoader;
    const layer = this.ms.getLayer(id);
    if (!layer) return;
    const target = this.mntPath(id);
    this.log.error(
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
      unmountErofs(target);
      await this.mountLazyLayer(layer);
    } catch (err) {
      if (old !== null) fs.closeSync(old);
      throw err;
    }
    if (old === null) return;
    const fd = old;
    void (async () => {
      try {
        if (!(await loader.loadAll(id))) return;
        const r = await dropPageCacheUnder(`/proc/self/fd/${fd}`);
        this.log.info({ op: 'ondemand', layer: id, files: r.files, failed: r.failed }, `layer ${id}: all its data is here; dropped the page cache of its previous mount (${r.files} files) for containers still using it`);
      } finally {
        fs.closeSync(fd);
      }
    })().catch((err: Error) => this.log.error({ op: 'ondemand', layer: id, err: err.message }, `layer ${id}: cannot drop the page cache of its previous mount: ${err.message}`));
  }

  /**
   * Start-up recovery, before serving: every EROFS layer mounted again,
   * leftovers of interrupted work removed (mounts and images no row names,
   * directories of converted layers), and the chunk store checked.
   */
  async recover(): Promise<void> {
    this.checkOpen();
    // A start on a full disk: recovery's metadata writes get a slice of the reserve.
    this.reserve.makeRoom('start-up recovery');
    const layers = this.ms.layers();
    if (layers.length > 0 && !this.converter) {
      throw new Error(`${layers.length} layers are EROFS images but use_erofs is false; set use_erofs to true`);
    }
    const live = new Set(layers.map((l) => String(l.snapshot_id)));
    const mounted = new Set(mountPoints());
    const lazy = this.ms.lazyLayers();
    if (lazy.length > 0 && !this.loader) {
      throw new Error(`${lazy.length} layers load their data on demand, but on-demand loading is off: set ondemand.backend to "auto" or "fanotify" (Linux >= 6.14)`);
    }
    await this.loader?.start(
      lazy.map((r) => ({
        id: String(r.snapshot_id),
        header: JSON.parse(r.header) as LayerHeader,
        rl: { repo: parseReference(r.image_ref), manifestDigest: r.manifest_digest, layerDigest: r.layer_digest },
      })),
    );
    const lazyIds = new Set(lazy.map((r) => String(r.snapshot_id)));
    // Damaged images and chunks are found before anything is mounted from them.
    await this.integrity?.checkAtStart(layers.map((l) => String(l.snapshot_id)));
    let remounted = 0;
    for (const layer of layers) {
      const id = String(layer.snapshot_id);
      const loader = this.loader as LazyLoader;
      if (this.integrity?.isQuarantined(id)) {
        if (mounted.has(this.mntPath(id))) unmountErofs(this.mntPath(id));
        if (fs.existsSync(path.join(this.snapshotsDir, id))) this.retire(id, 0);
        continue;
      }
      if (!mounted.has(this.mntPath(id))) {
        try {
          if (lazyIds.has(id)) await this.mountLazyLayer(layer);
          else this.ensureLayerMounted(layer, mounted);
        } catch (err) {
          // One bad layer does not stop the daemon: it is not served, the others are.
          (this.integrity as LayerIntegrity).quarantineAndLog(id, `the kernel cannot mount its image: ${(err as Error).message}`);
          continue;
        }
        remounted++;
        if (lazyIds.has(id)) loader.prefetchInBackground(id);
      } else if (lazyIds.has(id) && loader.backend === 'fscache' && loader.cachefilesRebound) {
        // Mounted through a cache binding that died with the holder: its reads fail (EIO, never zeros).
        this.log.error({ op: 'ondemand', layer: id, snapshot: id }, `layer ${id} was mounted through an fscache binding that is gone (the on-demand holder died): its reads fail with EIO; mounting it again for new containers`);
        unmountErofs(this.mntPath(id));
        await this.mountLazyLayer(layer);
        remounted++;
      } else if (lazyIds.has(id) && loader.backend === 'fanotify' && loader.incomplete(id) && !loader.isMarked(id)) {
        // Mounted while no group marks its file: holder and daemon both died, the group with them.
        await this.remountStale(id);
        remounted++;
      } else if (lazyIds.has(id)) {
        loader.prefetchInBackground(id);
      }
      // Converted; a directory left from before may still be under a
      // running container: it goes once no mount uses it (no grace: nothing
      // was handed out by this process yet).
      if (fs.existsSync(path.join(this.snapshotsDir, id))) this.retire(id, 0);
    }
    await this.sweepRetired();
    await this.sweepLayerOrphans(live);
    // Work directories of conversions a crash interrupted.
    for (const name of readdirOrEmpty(path.join(this.root, 'tmp'))) await removeAll(path.join(this.root, 'tmp', name));
    // Remote layers a crash interrupted: their temporary active snapshots.
    const unfinished: string[] = [];
    this.ms.walkInfo((info) => {
      if (info.kind === Kind.Active && info.name.startsWith(REMOTE_IMPORT_PREFIX)) unfinished.push(info.name);
    });
    for (const key of unfinished) await this.remove(key);
    // Lazy layers that have all their data go into the chunk store once no mount uses them.
    this.scheduleSettle(this.retireGraceMs);
    if (this.converter) {
      // Committed layers not converted yet (interrupted, or from use_erofs false).
      for (const id of this.ms.committedWithoutLayer()) this.enqueueConversion(id);
    }
    if (this.store) {
      const r = this.store.fsck(new Set([...live].map(Number)));
      try {
        this.reserve.whenFull('recording the chunk store\'s stamp', () => (this.store as ChunkStore).saveStamp());
      } catch (err) {
        if (!isDiskFull(err)) throw err;
        this.log.warn({ op: 'recover', err: (err as Error).message }, `the chunk store's stamp was not recorded (the disk is full): the next start verifies every chunk`);
      }
      const st = this.store.stats();
      const quarantined = this.ms.quarantined().length;
      this.log.info(
        { op: 'recover', layers: live.size, remounted, ...r, chunks: st.chunks, stored_bytes: st.storedBytes, bad_chunks: st.badChunks, quarantined },
        'chunk store checked',
      );
      if (this.scrub) this.integrity?.startScrub(this.scrub.scrubMbps, this.scrub.scrubIntervalMs);
      this.integrity?.watchStoreFile();
    }
  }

  /**
   * Unmounts and deletes mounts/images of layers no row names (and no
   * conversion is making); lazy files of layers that are not lazy (any more);
   * images/<id>.erofs of lazy layers (a settle the daemon died in).
   */
  private async sweepLayerOrphans(live: Set<string>): Promise<number> {
    let n = 0;
    const keep = (id: string) => live.has(id) || this.converting.has(id);
    for (const name of readdirOrEmpty(this.mntDir)) {
      if (keep(name)) continue;
      unmountErofs(path.join(this.mntDir, name));
      n++;
    }
    const lazy = new Set(this.ms.lazyLayers().map((r) => String(r.snapshot_id)));
    for (const id of this.loader?.orphans((id) => lazy.has(id) || this.converting.has(id)) ?? []) {
      this.loader?.drop(id);
      n++;
    }
    const imagesDir = path.join(this.root, 'images');
    for (const name of readdirOrEmpty(imagesDir)) {
      const id = /^(\d+)\.erofs$/.exec(name)?.[1];
      if (id !== undefined && keep(id) && (!lazy.has(id) || this.converting.has(id))) continue;
      if (id === undefined && [...this.converting.keys()].some((c) => name.startsWith(`${c}.erofs.tmp`))) continue;
      fs.rmSync(path.join(imagesDir, name), { force: true });
      n++;
    }
    return n;
  }

  private upperPath(id: string): string {
    return path.join(this.snapshotsDir, id, 'fs');
  }

  private workPath(id: string): string {
    return path.join(this.snapshotsDir, id, 'work');
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

  /** Usage of `key`: measured now for an active snapshot, recorded otherwise. */
  async usage(key: string): Promise<Usage> {
    this.checkOpen();
    const { id, info, usage } = this.ms.getInfo(key);
    if (info.kind !== Kind.Active) return usage;
    const measured = await diskUsage(this.upperPath(id));
    // A Remove or Commit may have run while the tree was walked: answer for
    // the snapshot only if the key still names it (NotFound once removed or
    // committed; a fresh snapshot under the same key is measured anew).
    if (this.ms.getInfo(key).id !== id) return this.usage(key);
    return measured;
  }

  async mounts(key: string): Promise<Mount[]> {
    this.checkOpen();
    return this.mountsFor(this.ms.getSnapshot(key));
  }

  async prepare(key: string, parent: string, labels?: Labels): Promise<Mount[]> {
    const ref = labels?.[LABEL_SNAPSHOT_REF];
    if (ref && this.remote && this.converter) {
      this.checkOpen();
      const rl = await this.remote.resolve(labels);
      if (rl) {
        // Two pulls of one image at once make each layer once.
        let making = this.makingRemote.get(ref);
        if (!making) {
          making = this.makeRemoteLayer(rl, ref, parent, labels as Labels).finally(() => this.makingRemote.delete(ref));
          this.makingRemote.set(ref, making);
        }
        await making;
        // containerd's contract for remote snapshots: the layer exists now
        // under `ref`; it lists it by label and skips download and unpack.
        throw alreadyExists(`target snapshot ${JSON.stringify(ref)} is a remote layer, made without its tar`);
      }
    }
    return this.createSnapshot(Kind.Active, key, parent, labels);
  }

  /**
   * Makes committed layer `name` from a dedup image's layer: its EROFS image
   * from the registry, and from its chunks only those the node store lacks
   * (fetched by Range, digest-checked, written durably before any row names
   * them). Done when it returns; if `name` exists already, nothing to do.
   */
  private async makeRemoteLayer(rl: RemoteLayer, name: string, parent: string, labels: Labels): Promise<void> {
    if (this.ms.has(name)) return;
    const remote = this.remote as RemoteLayers;
    const started = Date.now();
    const { header, erofs } = await remote.fetchLayer(rl);
    const img = Buffer.from(erofs);
    const { scan, refs } = scanDataChunks(img);
    if (refs.length > 0 && !header.has_blob) throw internal(`remote layer ${rl.layerDigest}: the image has chunks but the header says has_blob false`);
    if (this.loader && header.chunks.length > 0) return this.makeLazyLayer(rl, name, parent, labels, header, img, started);
    const entries = new Map(header.chunks.map((c) => [extentKey({ blkaddr: c[0], nblocks: c[1] }), c]));
    const store = this.store as ChunkStore;

    // Fetch what the store lacks before taking its lock (a slow registry must
    // not hold up conversions), into a temp file; the import then reads from there.
    const tmpKey = `${REMOTE_IMPORT_PREFIX}${crypto.randomBytes(8).toString('hex')}`;
    fs.mkdirSync(path.join(this.root, 'tmp'), { recursive: true, mode: 0o700 });
    const spool = path.join(this.root, 'tmp', `${tmpKey}.chunks`);
    const spooled = new Map<string, { offset: number; length: number }>();
    const fh = await fs.promises.open(spool, 'w+', 0o600);
    let created = false;
    try {
      let size = 0;
      // Each missing digest once (an extent may repeat another's content), fetched in runs.
      const byDigest = new Map<string, ChunkEntry>();
      let local = 0;
      for (const c of entries.values()) {
        if (store.lookup(c[2])) {
          local++;
          remote.counters.chunks_local++;
          remote.counters.bytes_local += c[1] * 4096;
        } else if (!byDigest.has(c[2])) byDigest.set(c[2], c);
      }
      const missing = [...byDigest.values()];
      const runs = runsOf(missing);
      let next = 0;
      const worker = async () => {
        while (next < runs.length) {
          const run = runs[next++];
          const parts = await remote.fetchRun(rl, header, run);
          for (const [i, bytes] of parts.entries()) {
            const at = size;
            size += bytes.length;
            spooled.set(run[i][2], { offset: at, length: bytes.length });
            await fh.write(bytes, 0, bytes.length, at);
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(4, runs.length) }, worker));

      await this.createSnapshot(Kind.Active, tmpKey, parent, undefined);
      created = true;
      const id = this.ms.getInfo(tmpKey).id;
      const chunks = [...entries].map(([key, c]) => ({ key, digest: c[2], nblocks: c[1] }));
      const stats = await (this.converter as Converter).importChunks(
        id,
        img,
        { scan, refs, chunks, mkfsMs: 0 },
        async (key) => {
          const entry = entries.get(key) as ChunkEntry;
          const at = spooled.get(entry[2]);
          // Present when checked above, gone since (removed meanwhile): fetch now.
          if (!at) return remote.fetchChunk(rl, header, entry);
          const buf = Buffer.alloc(at.length);
          const { bytesRead } = await fh.read(buf, 0, at.length, at.offset);
          if (bytesRead !== at.length) throw internal(`spooled chunk ${key}: read ${bytesRead} of ${at.length} bytes`);
          return buf;
        },
        this.mountAndRecord(id, started, () => {
          this.ms.commitActive(tmpKey, name, { size: header.logical_bytes, inodes: header.files }, labels);
          this.ms.addRemoteSource(id, { image_ref: formatReference(rl.repo), manifest_digest: rl.manifestDigest, layer_digest: rl.layerDigest, header: JSON.stringify(header) });
        }),
      );
      created = false;
      await removeAll(path.join(this.snapshotsDir, id));
      this.remoteLayerMade(
        rl,
        name,
        id,
        started,
        stats,
        { chunks: stats.chunks, fetched_chunks: missing.length, fetched_bytes: size, local_chunks: local, logical_bytes: header.logical_bytes },
        `remote layer ${id} made from ${rl.layerDigest}: ${missing.length} chunks fetched (${size} bytes), ${local} already on this node`,
      );
    } finally {
      await fh.close();
      fs.rmSync(spool, { force: true });
      if (created) await this.remove(tmpKey).catch(() => undefined);
    }
  }

  /**
   * The on-demand variant of makeRemoteLayer: the layer is committed and
   * mounted with only its metadata here (lazy/<id>.erofs); its chunk space is lazy/<id>.blob,
   * holding the chunks this node had; reads of the rest wait until they are
   * fetched (its file marked for fanotify, or asked for by fscache; see LazyLoader).
   */
  private async makeLazyLayer(rl: RemoteLayer, name: string, parent: string, labels: Labels, header: LayerHeader, img: Buffer, started: number): Promise<void> {
    const loader = this.loader as LazyLoader;
    const tmpKey = `${REMOTE_IMPORT_PREFIX}${crypto.randomBytes(8).toString('hex')}`;
    await this.createSnapshot(Kind.Active, tmpKey, parent, undefined);
    const id = this.ms.getInfo(tmpKey).id;
    const input: LazyLayerInput = { id, rl, header };
    const image = loader.imageOf(id);
    const target = this.mntPath(id);
    // Not an orphan for a Cleanup running meanwhile.
    const making = Promise.resolve();
    this.converting.set(id, making);
    let done = false;
    try {
      const made = await loader.create(input);
      const stats: ConvertStats = { files: header.files, logicalBytes: header.logical_bytes, chunks: header.chunks.length, newChunks: 0, dedupChunks: made.local, newBytes: 0, imageBytes: img.length, mkfsMs: 0, importMs: 0 };
      const imageSha256 = await (this.converter as Converter).writeImage(image, img);
      // Known to the loader before the mount: fscache reads the image through it.
      loader.register(input);
      await this.mountLazyLayer({ snapshot_id: Number(id), has_blob: header.has_blob ? 1 : 0 });
      try {
        this.ms.transaction(() => {
          this.ms.commitActive(tmpKey, name, { size: header.logical_bytes, inodes: header.files }, labels);
          this.addLayerRow(id, header.has_blob, stats, started);
          const source = { image_ref: formatReference(rl.repo), manifest_digest: rl.manifestDigest, layer_digest: rl.layerDigest, header: JSON.stringify(header) };
          this.ms.addLazyLayer(id, source);
          this.ms.addRemoteSource(id, source);
          this.ms.setImageDigest(id, imageSha256);
        });
      } catch (err) {
        unmountErofs(target);
        throw err;
      }
      done = true;
      loader.prefetchInBackground(id);
      // Every chunk was on the node already: it can go into the store at once.
      if (made.missing === 0) this.scheduleSettle(this.retireGraceMs);
      await removeAll(path.join(this.snapshotsDir, id));
      const remote = this.remote as RemoteLayers;
      remote.counters.chunks_local += made.local;
      remote.counters.bytes_local += made.localBytes;
      this.remoteLayerMade(
        rl,
        name,
        id,
        started,
        stats,
        { ondemand: loader.backend, chunks: header.chunks.length, fetched_chunks: 0, missing_chunks: made.missing, local_chunks: made.local, logical_bytes: header.logical_bytes },
        `remote layer ${id} mounted from ${rl.layerDigest} with its metadata: ${made.missing} chunks load on demand, ${made.local} already on this node`,
      );
    } finally {
      this.converting.delete(id);
      if (!done) {
        loader.drop(id);
        fs.rmSync(image, { force: true });
        await this.remove(tmpKey).catch(() => undefined);
      }
    }
  }

  /**
   * Lazy layers made before their image moved to lazy/<id>.erofs kept it at
   * images/<id>.erofs: moved now, before anything reads either (a mount
   * keeps the file it opened).
   */
  private migrateLazyImages(): void {
    const loader = this.loader as LazyLoader;
    for (const r of this.ms.lazyLayers()) {
      const id = String(r.snapshot_id);
      const old = (this.converter as Converter).imagePath(id);
      if (!fs.existsSync(loader.imageOf(id)) && fs.existsSync(old)) {
        fs.renameSync(old, loader.imageOf(id));
        fsyncDir(path.dirname(old));
        fsyncDir(path.dirname(loader.imageOf(id)));
      }
    }
  }

  /** Runs settleIdle in `ms` (or sooner, if already due sooner). */
  private scheduleSettle(ms: number): void {
    if (!this.settleOn || this.closed) return;
    const at = Date.now() + ms;
    if (this.settleTimer && this.settleAt <= at) return;
    if (this.settleTimer) clearTimeout(this.settleTimer);
    this.settleAt = at;
    this.settleTimer = setTimeout(() => {
      this.settleTimer = null;
      // A pass under way may have gone past layers completed since: another one after it.
      if (this.settleRunning) return void this.settleRunning.finally(() => this.scheduleSettle(0));
      this.settleIdle().catch((err: Error) => this.log.error({ op: 'settle', err: err.message }, `settling lazy layers failed: ${err.message}`));
    }, ms);
    this.settleTimer.unref();
  }

  /**
   * Settles every lazy layer that has all its data and that no mount uses
   * (see settleLayer), one at a time; layers in use are tried again every
   * SETTLE_RETRY_MS (and when a snapshot is removed). Returns how many were settled.
   */
  async settleIdle(): Promise<number> {
    if (!this.loader || this.closed) return 0;
    if (this.settleRunning) return this.settleRunning;
    const loader = this.loader;
    this.settleRunning = (async () => {
      let settled = 0;
      let again = Infinity;
      for (const r of this.ms.lazyLayers()) {
        const id = String(r.snapshot_id);
        if (this.closed) break;
        if (loader.incomplete(id) || this.converting.has(id)) continue;
        // Handed out in a mount a moment ago: containerd is about to use it.
        const grace = this.retireGraceMs - (Date.now() - (this.handedOut.get(id) ?? 0));
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
            this.settleOn = false;
            this.log.error({ op: 'settle', err: err.message }, `lazy layers are not settled into the chunk store: file leases, which tell whether a layer is in use, are not available (${err.message}; sysctl fs.leases-enable = 1 turns them on, then restart)`);
            return settled;
          }
          again = Math.min(again, SETTLE_RETRY_MS);
          this.log.warn({ op: 'settle', layer: id, snapshot: id, err: (err as Error).message }, `cannot settle lazy layer ${id} into the chunk store: ${(err as Error).message}; it stays lazy, tried again later`);
        }
      }
      if (again !== Infinity) this.scheduleSettle(again);
      return settled;
    })().finally(() => (this.settleRunning = null));
    return this.settleRunning;
  }

  /**
   * Settles lazy layer `id` (all its data present) into the chunk store, so
   * that it is stored as a converted layer is: its chunks go into the store
   * (those the store has are shared), its image is rewritten to address the
   * store (images/<id>.erofs), and its lazy files go. Only while nothing but
   * its own mount uses it (see lazyLayerIdle), checked before the work and
   * again when the new mount replaces the lazy one, in one synchronous step
   * in which no request can run. 'busy': in use (nothing changed); 'gone':
   * removed meanwhile.
   *
   * Crash-safe: until the transaction the layer is lazy and its lazy files
   * untouched (an images/<id>.erofs left is removed at start); after it the
   * layer is a store layer (lazy files left are removed at start).
   */
  private async settleLayer(id: string, header: LayerHeader): Promise<'settled' | 'busy' | 'gone'> {
    const loader = this.loader as LazyLoader;
    const target = this.mntPath(id);
    if (!this.lazyLayerIdle(id, header, false)) return 'busy';
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
    this.converting.set(id, Promise.resolve());
    let stats: ConvertStats;
    try {
      stats = await (this.converter as Converter).importChunks(
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
          if (this.closed || this.ms.keyOf(id) === undefined || !this.ms.isLazy(id)) throw new SettleSkipped('gone');
          // Handed out in a mount during the import: containerd may be about to mount it.
          if (Date.now() - (this.handedOut.get(id) ?? 0) < this.retireGraceMs) throw new SettleSkipped('busy');
          if (!this.lazyLayerIdle(id, header, true)) throw new SettleSkipped('busy');
          try {
            (this.mounter as ErofsMounter).mount(layer.image, target, layer.hasBlob);
          } catch (err) {
            this.mountLazyFile(id, header.has_blob);
            throw err;
          }
          try {
            this.ms.transaction(() => {
              const store = this.store as ChunkStore;
              const newIds = layer.newChunks.map((c) => store.insertChunk(c.digest, c.extent));
              store.addLayerRefs(Number(id), [...newIds, ...layer.existingChunkIds]);
              this.ms.settleLazyLayer(id, { image_bytes: layer.stats.imageBytes, chunks: layer.stats.chunks, new_chunks: layer.stats.newChunks, new_bytes: layer.stats.newBytes });
              this.ms.setImageDigest(id, layer.imageSha256);
            });
          } catch (err) {
            unmountErofs(target);
            this.mountLazyFile(id, header.has_blob);
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
      this.converting.delete(id);
    }
    loader.drop(id);
    this.settledLayers++;
    this.log.info(
      { op: 'settle', key: this.ms.keyOf(id), snapshot: id, layer: id, chunks: stats.chunks, new_chunks: stats.newChunks, new_bytes: stats.newBytes, dedup_chunks: stats.dedupChunks, duration_ms: Date.now() - started },
      `lazy layer ${id} settled into the chunk store: ${stats.newChunks} chunks stored (${stats.newBytes} bytes), ${stats.dedupChunks} shared with other layers`,
    );
    return 'settled';
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
  private lazyLayerIdle(id: string, header: LayerHeader, keepOff: boolean): boolean {
    const loader = this.loader as LazyLoader;
    if (!unmountIfIdle(this.mntPath(id))) return false;
    let used = true;
    try {
      used = openElsewhere(loader.imageOf(id)) || openElsewhere(loader.fileOf(id));
    } finally {
      if (used || !keepOff) this.mountLazyFile(id, header.has_blob);
    }
    return !used;
  }

  /** fanotify: lazy layer `id` mounted file-backed over its lazy files (marked already, or with nothing missing). */
  private mountLazyFile(id: string, hasBlob: boolean): void {
    const loader = this.loader as LazyLoader;
    (this.mounter as ErofsMounter).mount(loader.imageOf(id), this.mntPath(id), hasBlob, loader.fileOf(id));
  }

  /** A remote layer is committed: counted, logged (one "op":"remote" line), told to listeners. */
  private remoteLayerMade(rl: RemoteLayer, name: string, id: string, started: number, stats: ConvertStats, fields: Record<string, unknown>, msg: string): void {
    const counters = (this.remote as RemoteLayers).counters;
    counters.layers++;
    if (rl.sourceLayer) counters.converted_layers++;
    const durationMs = Date.now() - started;
    const source = rl.sourceLayer ? { source_layer: rl.sourceLayer } : {};
    this.log.info({ op: 'remote', key: name, snapshot: id, layer: id, image: formatReference(rl.repo), layer_digest: rl.layerDigest, ...source, ...fields, duration_ms: durationMs }, msg);
    this.emitConvert({ key: name, layer: id, ok: true, durationMs, stats, mode: 'remote' });
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
    const tmp = path.join(this.snapshotsDir, `${TEMP_PREFIX}${crypto.randomBytes(8).toString('hex')}`);
    fs.mkdirSync(tmp, { mode: 0o700 });
    let snap: Snapshot;
    try {
      fs.mkdirSync(path.join(tmp, 'fs'), { mode: 0o755 });
      if (kind === Kind.Active) fs.mkdirSync(path.join(tmp, 'work'), { mode: 0o711 });
      snap = this.ms.transaction(() => {
        const s = this.ms.createSnapshot(kind, key, parent, labels);
        for (const id of s.parentIds) this.assertServed(id);
        if (s.parentIds.length > 0) {
          // The new layer's root starts owned like its parent's (containerd does the same).
          const st = this.lstatLayerRoot(s.parentIds[0]);
          fs.lchownSync(path.join(tmp, 'fs'), st.uid, st.gid);
        }
        const dest = path.join(this.snapshotsDir, s.id);
        if (fs.existsSync(dest)) {
          // Left by a crash between a rename and its rolled-back transaction:
          // no row names it, so it is garbage; move it aside for Cleanup.
          fs.renameSync(dest, path.join(this.snapshotsDir, `${REMOVED_PREFIX}${s.id}-${crypto.randomBytes(4).toString('hex')}`));
        }
        fs.renameSync(tmp, dest);
        return s;
      });
    } catch (err) {
      fs.rmSync(tmp, { recursive: true, force: true });
      throw err;
    }
    fsyncDir(this.snapshotsDir);
    this.log.info(
      { op: kind === Kind.View ? 'view' : 'prepare', key, parent, snapshot: snap.id, duration_ms: Date.now() - started },
      `${kindName(kind)} snapshot created`,
    );
    return this.mountsFor(snap);
  }

  private mountsFor(s: Snapshot): Mount[] {
    if (s.parentIds.length === 0) {
      return [{ type: 'bind', source: this.upperPath(s.id), options: [s.kind === Kind.View ? 'ro' : 'rw', 'rbind'] }];
    }
    const lower = this.layerRootsOf(s.parentIds);
    if (s.kind === Kind.View && s.parentIds.length === 1) {
      return [{ type: 'bind', source: lower[0], options: ['ro', 'rbind'] }];
    }
    const options: string[] = [];
    if (this.overlayIndexOff) options.push('index=off');
    if (s.kind === Kind.Active) {
      options.push(`workdir=${this.workPath(s.id)}`, `upperdir=${this.upperPath(s.id)}`);
    }
    options.push(`lowerdir=${lower.join(':')}`);
    return [{ type: 'overlay', source: 'overlay', options }];
  }

  async commit(name: string, key: string, labels?: Labels): Promise<void> {
    this.checkOpen();
    checkKey(name, 'name');
    const started = Date.now();
    // Slow work (walking the layer) outside the transaction; the transaction
    // re-checks everything, so a concurrent Remove or Commit is detected.
    // Any kind: commitActive reports a taken name before a wrong kind, as containerd.
    const s = this.ms.getAny(key);
    if (this.converter && !this.background && s.kind === Kind.Active) {
      await this.commitConverted(s.id, name, key, labels, started);
      return;
    }
    if (this.converter && s.kind === Kind.Active) {
      // What would make the conversion fail for sure fails the Commit now.
      await this.converter.probe();
    }
    const usage = s.kind === Kind.Active ? await diskUsage(this.upperPath(s.id)) : { size: 0, inodes: 0 };
    const id = this.ms.transaction(() => this.ms.commitActive(key, name, usage, labels));
    this.log.info(
      { op: 'commit', key, name, snapshot: id, size: usage.size, inodes: usage.inodes, duration_ms: Date.now() - started },
      'snapshot committed',
    );
    if (this.converter) this.enqueueConversion(id);
  }

  private enqueueConversion(id: string): void {
    if (this.queue.includes(id) || this.converting.has(id)) return;
    this.queue.push(id);
    void this.runQueue();
  }

  /** One background conversion at a time: containerd's unpacking needs the other core. */
  private async runQueue(): Promise<void> {
    if (this.queueRunning) return;
    this.queueRunning = true;
    try {
      while (this.queue.length > 0 && !this.closed) {
        const id = this.queue.shift() as string;
        const job = this.convertCommitted(id);
        this.converting.set(id, job);
        try {
          await job;
        } finally {
          this.converting.delete(id);
        }
      }
    } finally {
      this.queueRunning = false;
    }
  }

  /** Number of layers waiting for or under background conversion. */
  get pendingConversions(): number {
    return this.queue.length + this.converting.size;
  }

  /**
   * Converts committed snapshot `id` in the background. Until it is done the
   * layer is served from its directory; a failure leaves it that way (and is
   * retried at the next start), so nothing containerd sees breaks.
   */
  private async convertCommitted(id: string): Promise<void> {
    const started = Date.now();
    const key = this.ms.keyOf(id);
    if (key === undefined || this.ms.getLayer(id) || this.closed) return;
    this.log.info({ op: 'convert', key, snapshot: id, layer: id }, `detected new layer ${id}, auto-converting to EROFS`);
    try {
      const stats = await this.convertLayer(id, started, () => {
        if (this.ms.keyOf(id) === undefined) throw notFound(`snapshot ${id} was removed while it was being converted`);
      });
      this.logConverted(id, this.ms.keyOf(id) ?? key, stats, started);
      this.emitConvert({ key: this.ms.keyOf(id) ?? key, layer: id, ok: true, durationMs: Date.now() - started, stats, mode: 'background' });
      this.retire(id);
      const now = this.ms.keyOf(id);
      if (now !== undefined) this.offerShare(id, this.ms.getInfo(now).info.labels);
    } catch (err) {
      if (this.ms.keyOf(id) === undefined || this.closed) {
        this.log.info({ op: 'convert', key, snapshot: id, layer: id }, 'layer removed before its conversion finished');
        return;
      }
      this.emitConvert({ key, layer: id, ok: false, error: (err as Error).message, durationMs: Date.now() - started, mode: 'background' });
      this.log.error(
        { op: 'convert', key, snapshot: id, layer: id, err: (err as Error).message },
        `auto-convert of layer ${id} to EROFS failed; it stays a directory until the next start`,
      );
    }
  }

  /** Converts layer `id`'s directory and records it (see mountAndRecord). */
  private convertLayer(id: string, started: number, alsoInTx: () => void): Promise<ConvertStats> {
    return (this.converter as Converter).convert(id, this.upperPath(id), this.mountAndRecord(id, started, alsoInTx));
  }

  /**
   * The converter's `finish` for layer `id`: mounts the image at mnt/<id>
   * and, in one transaction, runs `alsoInTx` and records chunks, references
   * and the layer row; on failure the mount goes again (the converter
   * removes the rest).
   */
  private mountAndRecord(id: string, started: number, alsoInTx: () => void): (layer: ConvertedLayer) => ConvertStats {
    return (layer) => {
      const target = this.mntPath(id);
      (this.mounter as ErofsMounter).mount(layer.image, target, layer.hasBlob);
      try {
        this.ms.transaction(() => {
          alsoInTx();
          this.recordLayer(id, layer, started);
        });
      } catch (err) {
        unmountErofs(target);
        throw err;
      }
      return layer.stats;
    };
  }

  /** In a transaction: chunk rows, the layer's references and its layer row. */
  private recordLayer(id: string, layer: ConvertedLayer, started: number): void {
    const store = this.store as ChunkStore;
    const newIds = layer.newChunks.map((c) => store.insertChunk(c.digest, c.extent));
    store.addLayerRefs(Number(id), [...newIds, ...layer.existingChunkIds]);
    this.addLayerRow(id, layer.hasBlob, layer.stats, started);
    this.ms.setImageDigest(id, layer.imageSha256);
  }

  /** In a transaction: the layer row of `id` (an EROFS image now). */
  private addLayerRow(id: string, hasBlob: boolean, st: ConvertStats, started: number): void {
    this.ms.addLayer(id, {
      format: 'erofs',
      has_blob: hasBlob ? 1 : 0,
      files: st.files,
      logical_bytes: st.logicalBytes,
      image_bytes: st.imageBytes,
      chunks: st.chunks,
      new_chunks: st.newChunks,
      new_bytes: st.newBytes,
      convert_ms: Date.now() - started,
    });
  }

  private emitConvert(e: ConvertEvent): void {
    try {
      this.onConvert?.(e);
    } catch (err) {
      this.log.warn({ op: 'convert', layer: e.layer, err: (err as Error).message }, 'conversion listener failed');
    }
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
   * The read-only roots of committed snapshot `ref` (its numeric id, or its
   * key: containerd's chain id for an unpacked layer) and of its parents,
   * nearest first: the layer's EROFS mount, or its directory until it is
   * converted. For prefetch. NotFound for an unknown or uncommitted snapshot.
   */
  layerRoots(ref: string): { id: string; key: string; root: string }[] {
    this.checkOpen();
    const key = /^[1-9][0-9]{0,15}$/.test(ref) ? this.ms.keyOf(ref) : ref;
    if (key === undefined || !this.ms.has(key)) throw notFound(`no layer ${JSON.stringify(ref)} (expected a layer id as in images/<id>.erofs, or a committed snapshot key)`);
    const s = this.ms.getAny(key);
    if (s.kind !== Kind.Committed) throw notFound(`snapshot ${JSON.stringify(ref)} is not a committed layer`);
    const ids = [s.id, ...s.parentIds];
    const roots = this.layerRootsOf(ids);
    return ids.map((id, i) => ({ id, key: this.ms.keyOf(id) ?? '', root: roots[i] }));
  }

  /**
   * The read-only root of each committed layer `ids` names, for handing out:
   * its EROFS mount (made again if lost, e.g. unmounted by hand), or its
   * directory until it is converted, remembered as handed out (see sweepRetired).
   */
  private layerRootsOf(ids: string[]): string[] {
    const mounted = this.converter ? new Set(mountPoints()) : undefined;
    const now = Date.now();
    return ids.map((id) => {
      const layer = mounted ? this.ms.getLayer(id) : undefined;
      if (mounted) this.handedOut.set(id, now);
      if (!layer) return this.upperPath(id);
      this.ensureLayerMounted(layer, mounted as Set<string>);
      return this.mntPath(id);
    });
  }

  /**
   * `dedup-snapshotter fsck` (POST /fsck): every chunk of the store and every
   * layer image verified, layers on damaged data quarantined, layers whose
   * data is good again served again. Progress goes to `onProgress`.
   */
  async fsck(onProgress?: (p: VerifyProgress) => void): Promise<IntegrityReport> {
    this.checkOpen();
    if (!this.integrity) throw failedPrecondition('use_erofs is off: there is no chunk store to check');
    return this.integrity.fsck(this.ms.layers().map((l) => String(l.snapshot_id)), onProgress);
  }

  /** Layer rows (EROFS layers) for /stats. */
  layerRows(): LayerRow[] {
    return this.ms.layers();
  }

  private logConverted(id: string, key: string, stats: ConvertStats, started: number): void {
    this.log.info(
      {
        op: 'convert',
        key,
        snapshot: id,
        layer: id,
        logical_bytes: stats.logicalBytes,
        stored_bytes: stats.newBytes,
        image_bytes: stats.imageBytes,
        chunks: stats.chunks,
        new_chunks: stats.newChunks,
        dedup_chunks: stats.dedupChunks,
        mkfs_ms: stats.mkfsMs,
        import_ms: stats.importMs,
        duration_ms: Date.now() - started,
      },
      `converted layer ${id} to EROFS: ${stats.logicalBytes} bytes of files, ${stats.newBytes} bytes stored, ${stats.newChunks} new and ${stats.dedupChunks} deduplicated chunks`,
    );
  }

  /**
   * registry.push_converted: offers converted layer `id` to the pusher, which
   * reads its directory (kept meanwhile: sweepRetired skips it). False when
   * nothing is pushed (off, or the labels name no image layer).
   */
  private offerShare(id: string, labels: Labels | undefined): boolean {
    if (!this.share || !criLayerOf(labels)) return false;
    this.sharing.add(id);
    return this.share.offer({
      id,
      dir: this.upperPath(id),
      labels: labels as Labels,
      alive: () => this.ms.keyOf(id) !== undefined,
      release: () => this.sharing.delete(id),
    });
  }

  /** The directory of converted layer `id` goes once no mount uses it. */
  private retire(id: string, at = Date.now()): void {
    this.retired.set(id, at);
    if (!this.sweepTimer) {
      this.sweepTimer = setInterval(() => void this.sweepRetired(), Math.max(250, Math.min(5000, this.retireGraceMs / 2)));
      this.sweepTimer.unref();
    }
  }

  /**
   * Deletes the old directories of converted layers that no mount in
   * /proc/self/mountinfo names (as a bind root or an overlay lowerdir, also
   * the relative form containerd uses for long option strings) and that were
   * not handed out in a mount for retireGraceMs (containerd mounts what
   * Prepare returns a moment later).
   */
  async sweepRetired(): Promise<number> {
    if (this.closed || this.retired.size === 0) return 0;
    const info = fs.readFileSync('/proc/self/mountinfo', 'utf8');
    const now = Date.now();
    let removed = 0;
    for (const [id, at] of [...this.retired]) {
      if (this.ms.keyOf(id) === undefined) {
        this.retired.delete(id);
        continue;
      }
      const last = Math.max(at, this.handedOut.get(id) ?? 0);
      if (now - last < this.retireGraceMs || this.sharing.has(id)) continue;
      if (new RegExp(`(^|[\\s=:,/])${id}/fs([\\s:,/]|$)`, 'm').test(info)) continue;
      this.retired.delete(id);
      this.handedOut.delete(id);
      const doomed = path.join(this.snapshotsDir, `${REMOVED_PREFIX}${id}-${crypto.randomBytes(4).toString('hex')}`);
      try {
        fs.renameSync(path.join(this.snapshotsDir, id), doomed);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      }
      await removeAll(doomed);
      removed++;
      this.log.debug({ op: 'convert', snapshot: id, layer: id }, 'directory of converted layer removed');
    }
    if (this.retired.size === 0 && this.sweepTimer) {
      clearInterval(this.sweepTimer);
      this.sweepTimer = null;
    }
    return removed;
  }

  /**
   * Commit with conversion: the layer directory becomes images/<id>.erofs
   * over the chunk store, mounted at mnt/<id>, and the row, the layer and its
   * chunk references are recorded in one transaction. On failure the active
   * snapshot is untouched (containerd can retry) and no image remains.
   */
  private async commitConverted(id: string, name: string, key: string, labels: Labels | undefined, started: number) {
    // Fail fast, before minutes of work, on what the transaction would refuse.
    if (this.ms.has(name)) throw alreadyExists(`snapshot ${JSON.stringify(name)} already exists`);
    const inflight = this.converting.get(id);
    if (inflight) {
      // Another Commit of this snapshot is converting it: answer as if the
      // two had run one after the other.
      await inflight.catch(() => undefined);
      return this.commit(name, key, labels);
    }
    const done = this.convertAndCommit(id, name, key, labels, started);
    this.converting.set(id, done);
    try {
      await done;
    } finally {
      this.converting.delete(id);
    }
  }

  private async convertAndCommit(id: string, name: string, key: string, labels: Labels | undefined, started: number) {
    // Usage as containerd's snapshotters report it: the layer's files as
    // unpacked (what is stored is in the layer's row and in /stats).
    const usage = await diskUsage(this.upperPath(id));
    this.log.info({ op: 'convert', key, snapshot: id, layer: id }, `detected new layer ${id}, auto-converting to EROFS`);
    try {
      const stats = await this.convertLayer(id, started, () => {
        this.ms.commitActive(key, name, usage, labels);
      });
      // Recorded, and nothing ever mounted the directory as a layer: it goes
      // now, or once a push of the layer read it.
      if (this.offerShare(id, labels)) this.retire(id, 0);
      else await removeAll(path.join(this.snapshotsDir, id));
      this.logConverted(id, name, stats, started);
      this.emitConvert({ key: name, layer: id, ok: true, durationMs: Date.now() - started, stats, mode: 'sync' });
      this.log.info({ op: 'commit', key, name, snapshot: id, duration_ms: Date.now() - started }, 'snapshot committed');
    } catch (err) {
      // Removed while it was being converted: as if the Remove ran first.
      if (!this.ms.has(key) || this.ms.getInfo(key).id !== id) {
        throw notFound(`snapshot ${JSON.stringify(key)} was removed while it was being committed`);
      }
      this.emitConvert({ key, layer: id, ok: false, error: (err as Error).message, durationMs: Date.now() - started, mode: 'sync' });
      this.log.error({ op: 'convert', key, snapshot: id, layer: id, err: (err as Error).message }, `auto-convert of layer ${id} to EROFS failed`);
      throw err;
    }
  }

  async remove(key: string): Promise<void> {
    this.checkOpen();
    let dead: Extent[] = [];
    // On a full disk the DELETE's WAL frames go where the WAL was before
    // (a checkpoint), else into a slice of the reserve.
    const { id, kind, layer } = this.reserve.whenFull(
      `remove of ${JSON.stringify(key)}`,
      () =>
        this.ms.transaction(() => {
          const r = this.ms.remove(key);
          if (r.layer && this.store) dead = this.store.dropLayerRefs(Number(r.id));
          return r;
        }),
      { reuse: () => this.ms.checkpoint() },
    );
    // The rows are gone; now the files. If this fails or the process dies
    // here, they are unnamed and Cleanup (or start-up) removes them.
    if (layer && this.converter && this.store) {
      try {
        unmountErofs(this.mntPath(id));
        fs.rmSync(this.converter.imagePath(id), { force: true });
        this.loader?.drop(id);
        this.handedOut.delete(id);
        this.store.releaseExtents(dead);
      } catch (err) {
        this.log.warn({ op: 'remove', key, snapshot: id, err: (err as Error).message }, 'layer image left for cleanup');
      }
    }
    const dir = path.join(this.snapshotsDir, id);
    const doomed = path.join(this.snapshotsDir, `${REMOVED_PREFIX}${id}`);
    try {
      try {
        fs.renameSync(dir, doomed);
      } catch (err) {
        // A full disk may have no room for the longer name: the row is gone
        // and its id is never used again (AUTOINCREMENT), so the directory
        // is deleted where it is.
        if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
        await removeAll(dir);
      }
      await removeAll(doomed);
    } catch (err) {
      this.log.warn({ op: 'remove', key, snapshot: id, err: (err as Error).message }, 'directory left for cleanup');
    }
    this.log.info({ op: 'remove', key, snapshot: id, kind: kindName(kind) }, 'snapshot removed');
    // Space given back: the reserve, if a full disk took it, can be made again.
    this.reserve.restore();
    // A container's snapshot gone: the lazy layers under it may be idle now.
    this.scheduleSettle(1000);
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

  /** Removes every directory under snapshots/ that no row names. */
  async cleanup(): Promise<string[]> {
    this.checkOpen();
    const ids = this.ms.idMap();
    // First, synchronously, move every unnamed entry aside under a unique
    // name: a Prepare that runs while the slow deletes below are under way
    // may reuse a rolled-back id, and must not lose its new directory.
    const doomed: string[] = [];
    for (const name of fs.readdirSync(this.snapshotsDir)) {
      if (ids.has(name)) continue;
      // In-flight temp dirs cannot exist here: createSnapshot is synchronous.
      const from = path.join(this.snapshotsDir, name);
      if (name.startsWith(REMOVED_PREFIX)) {
        doomed.push(from);
      } else {
        const to = path.join(this.snapshotsDir, `${REMOVED_PREFIX}${name}-${crypto.randomBytes(4).toString('hex')}`);
        fs.renameSync(from, to);
        doomed.push(to);
      }
    }
    for (const p of doomed) await removeAll(p);
    const removed = doomed.map((p) => path.basename(p));
    if (this.converter) {
      const live = new Set(this.ms.layers().map((l) => String(l.snapshot_id)));
      await this.sweepLayerOrphans(live);
    }
    if (removed.length > 0) this.log.info({ op: 'cleanup', removed: removed.length }, 'removed unreferenced directories');
    return removed;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    if (this.settleTimer) clearTimeout(this.settleTimer);
    this.share?.close();
    // The holder keeps the marks: reads wait for the next daemon.
    this.loader?.close();
    void this.integrity?.stop();
    // Layer mounts stay: running containers use them, and start-up finds them.
    this.store?.close();
    this.reserve.close();
    this.ms.close();
  }
}

