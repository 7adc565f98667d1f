import fs from 'node:fs';
import path from 'node:path';
import { Converter } from '../convert/converter';
import { readImageDeviceTags } from '../convert/erofs-format';
import { type MkfsFeatures, probeMkfs } from '../convert/mkfs';
import { LayerApplier } from '../layers/apply';
import { ConvertedLayerPusher } from '../convert/share';
import { ConversionQueue } from '../layers/conversion';
import { type ConvertEvent, ConvertEvents } from '../layers/events';
import { LayerIntegrity } from '../layers/integrity';
import { LayerMounts } from '../layers/layer-mounts';
import { PlainLayerFetcher } from '../layers/plain-fetch';
import { type ImportSnapshots, RemoteImporter } from '../layers/remote-import';
import { Settler } from '../layers/settle';
import { offerConverted, offerLayer } from '../layers/share-offer';
import { Sweeper } from '../layers/sweep';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import type { MountMode } from '../mount/erofs';
import { type LayerKernel, SystemKernel } from '../mount/layer-kernel';
import type { GroupFdStore } from '../ondemand/fdstore';
import { type LazyBackend, LazyLoader } from '../ondemand/lazy-loader';
import type { RemoteLayers } from '../remote/lazy';
import { ChunkStore, type StoreLayout } from '../store/chunkstore';
import { MetaStore } from '../store/metastore';
import { DEFAULT_RESERVE_BYTES, SpaceReserve } from '../store/reserve';
import { RootLayout } from '../store/root-layout';
import { ImageSealer } from '../store/seal';
import { type SpreadOutcome, spreadSubdirectories } from '../store/spread';
import type { VerifyProgress } from '../store/verify';
import { fsyncDir, readOnlyAncestor } from '../util/fs';

export interface SnapshotterOptions {
  root: string;
  logger?: Logger;
  /** Bytes of ROOT/reserve, released so a Remove goes through on a full disk (0: none; default DEFAULT_RESERVE_BYTES). */
  reserveBytes?: number;
  /** Called after each conversion; must not throw or block. */
  onConvert?: (e: ConvertEvent) => void;
  /**
   * What the layers ask of the kernel (mounts, unmounts, the mount table,
   * leases); default: the real kernel. Tests pass a fake.
   */
  kernel?: (storeFile: string, devicesOf: ((image: string) => string[]) | undefined, logger: Logger) => LayerKernel;
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
    /** fanotify: move fully loaded lazy layers nothing uses into the chunk store (default true; see layers/settle.ts). */
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
    /** Files of a layer directory from this size on are taken into the store in place (tests lower it; default 32 MiB). */
    adoptMinBytes?: number;
  } | null;
  /** Background scrub of the chunk store: pace (MiB/s) and how often (0: never). */
  integrity?: { scrubMbps: number; scrubIntervalMs: number; onStartProgress?: (p: VerifyProgress) => void };
  /** registry.push_converted: push each layer converted here that a CRI pull named, for other nodes to pull lazily (convert/share.ts, layers/share-offer.ts). */
  pushConverted?: boolean;
  /**
   * registry.fetch_layers: a Prepare naming a layer of a plain image (CRI
   * labels) fetches and converts it here, all layers of the image in
   * parallel (layers/plain-fetch.ts); default true when `remote` is set.
   */
  fetchLayers?: boolean;
  /**
   * containerd's socket, where dedup-differ's Apply reads layer blobs
   * (default: $CONTAINERD_ADDRESS, else /run/containerd/containerd.sock).
   */
  containerdAddress?: string;
  /** containerd's root, whose content store dedup-differ reads blobs from directly (default: $CONTAINERD_ROOT, else /var/lib/containerd). */
  containerdRoot?: string;
}

/** The parts that exist only with use_erofs: each non-null inside. */
export interface ErofsParts {
  store: ChunkStore;
  converter: Converter;
  sealer: ImageSealer;
  integrity: LayerIntegrity;
  conversion: ConversionQueue;
  /** dedup-differ's Apply: layer tars into images without a directory. */
  applier: LayerApplier;
  /** 'background': Commit returns before the conversion; 'sync': Commit converts. */
  background: boolean;
  share: ConvertedLayerPusher | null;
  /** Offers recorded layer `id` to `share` (registry.push_converted; null without it): see layers/share-offer.ts. */
  offer: ((id: string) => boolean) | null;
  /** With a remote (lazy pull) configured. */
  importer: RemoteImporter | null;
  /** With a remote configured and registry.fetch_layers on. */
  plain: PlainLayerFetcher | null;
  /** With on-demand loading configured. */
  loader: LazyLoader | null;
  settler: Settler | null;
}

/** Everything the snapshotter is made of, built once from its options. */
export interface LayerParts {
  layout: RootLayout;
  logger: Logger;
  ms: MetaStore;
  /** Space held back so Remove works on a full disk (store/reserve.ts). */
  reserve: SpaceReserve;
  kernel: LayerKernel;
  mounts: LayerMounts;
  sweeper: Sweeper;
  events: ConvertEvents;
  remote: RemoteLayers | null;
  erofs: ErofsParts | null;
  scrub: SnapshotterOptions['integrity'] | null;
}

/**
 * Builds the snapshotter's parts under `opts.root`, in dependency order:
 * the reserve and metadata first (a start on a full disk gets a slice of
 * the reserve), then the chunk store, the kernel seam, the converter, the
 * on-demand loader and the layer services over them. `snapshots` is what a
 * remote import needs of the snapshot lifecycle (the snapshotter itself).
 */
export function composeLayers(opts: SnapshotterOptions, snapshots: ImportSnapshots): LayerParts {
  const logger = opts.logger ?? silentLogger();
  const layout = new RootLayout(opts.root);
  const ro = readOnlyAncestor(layout.root);
  if (ro !== null) throw new Error(`ROOT ${layout.root} is on a read-only filesystem (${ro} is not writable: EROFS); remount that filesystem read-write or set ROOT to a directory on a writable one`);
  fs.mkdirSync(layout.root, { recursive: true, mode: 0o700 });
  fs.mkdirSync(layout.snapshots, { recursive: true, mode: 0o700 });
  logSpread(logger, layout.snapshots, spreadSubdirectories(layout.snapshots));
  const reserve = new SpaceReserve({ root: layout.root, bytes: opts.reserveBytes ?? DEFAULT_RESERVE_BYTES, logger });
  // A start on a full disk: opening the database makes its WAL's
  // shared-memory file (SQLite deletes it at every clean close), which
  // needs blocks; a slice of the reserve gives them.
  const ms = reserve.whenFull('opening metadata.db', () => new MetaStore(layout.metadataDb));
  reserve.restore();
  const remote = opts.remote ?? null;
  const events = new ConvertEvents(logger);
  events.listener = opts.onConvert;
  const makeKernel = opts.kernel ?? ((storeFile, devicesOf, log) => new SystemKernel(storeFile, { devicesOf, mode: opts.erofs?.mountMode ?? 'auto', directIo: opts.erofs?.directIo ?? 'auto', readAheadKb: opts.erofs?.readAheadKb ?? 'auto', chunkSize: opts.erofs?.chunkSize, logger: log }));
  const e = opts.erofs;
  if (!e) {
    const kernel = makeKernel('', undefined, logger);
    const mounts = new LayerMounts({ layout, ms, kernel, images: false, loader: null, integrity: null, logger, retireGraceMs: 5_000 });
    const sweeper = new Sweeper({ layout, ms, mounts, loader: null, logger });
    return { layout, logger, ms, reserve, kernel, mounts, sweeper, events, remote, erofs: null, scrub: opts.integrity ?? null };
  }
  // Probed once, on first use; a failed probe is retried on the next use.
  let probe: Promise<MkfsFeatures> | null = null;
  const mkfsFeatures = () => {
    if (!probe) {
      probe = probeMkfs(e.mkfs);
      probe.catch(() => (probe = null));
    }
    return probe;
  };
  const store = new ChunkStore({ root: layout.root, db: ms.db, logger, layout: e.storeLayout, maxDevices: e.storeMaxDevices });
  const kernel = makeKernel(store.blobPath, (image) => store.devicePaths(readImageDeviceTags(image)), logger);
  const sealer = new ImageSealer({ logger });
  const converter = new Converter({ seal: (file) => sealer.seal(file), store, mkfs: mkfsFeatures, imagesDir: layout.imagesDir, tmpDir: layout.tmpDir, chunkSize: e.chunkSize, adoptMinBytes: e.adoptMinBytes });
  const retireGraceMs = e.retireGraceMs ?? 5_000;
  const od = opts.ondemand && remote ? { ...opts.ondemand, remote } : null;
  // Late-bound: the loader calls back into parts built after it.
  let mountsRef: LayerMounts | null = null;
  let settlerRef: Settler | null = null;
  const loader = od
    ? new LazyLoader({
        backend: od.backend,
        fscache: od.fscache,
        onComplete: () => settlerRef?.schedule(retireGraceMs),
        onGroupLost: (ids) => {
          for (const id of ids) (mountsRef as LayerMounts).remountStale(id).catch((err: Error) => logger.error({ op: 'ondemand', layer: id, err: err.message }, `cannot mount lazy layer ${id} again: ${err.message}`));
        },
        mountPath: (id) => layout.mnt(id),
        dir: layout.lazyDir,
        socket: od.socket,
        holderCommand: od.holderCommand,
        holderLog: path.join(path.dirname(od.socket), 'holder.log'),
        attempts: od.attempts,
        prefetch: od.prefetch,
        prefetchMbps: od.prefetchMbps,
        prefetchConcurrency: od.prefetchConcurrency,
        remote: od.remote,
        store,
        logger,
        fdStore: od.fdStore,
        storedGroup: od.storedGroup,
      })
    : null;
  if (loader) migrateLazyImages(ms, layout, loader);
  const integrity = new LayerIntegrity({
    ms,
    store,
    remote,
    imagePath: (id) => (loader && ms.isLazy(id) ? loader.imageOf(id) : layout.image(id)),
    unmountLayer: (id) => kernel.unmount(layout.mnt(id)),
    layerIds: () => ms.layers().map((l) => String(l.snapshot_id)),
    logger,
    onStartProgress: opts.integrity?.onStartProgress,
  });
  const mounts = new LayerMounts({ layout, ms, kernel, images: true, loader, integrity, logger, retireGraceMs });
  mountsRef = mounts;
  const sweeper = new Sweeper({ layout, ms, mounts, loader, logger, removeTree: (p) => store.segments.removeLayerTree(p) });
  const share = opts.pushConverted && remote ? new ConvertedLayerPusher({ client: remote.client, chunkSize: e.chunkSize, workDir: layout.tmpDir, logger }) : null;
  const shareParts = share ? { share, ms, store, layout } : null;
  // Every layer converted here, whichever way, is offered once recorded.
  if (shareParts) events.subscribe((ev) => offerConverted(shareParts, ev));
  const conversion = new ConversionQueue({ layout, ms, store, converter, mounts, sweeper, events, logger });
  // fscache: while an overlay uses a clone of the layer's mount, its reads
  // keep coming to this process as READs of the layer's blobs, which only
  // the lazy files answer; serving them from the store is not built, so
  // such layers stay lazy (docs/lazy-pull.md, "Settling").
  const settler = loader && od ? new Settler({ ms, store, converter, loader, mounts, logger, enabled: (od.settle ?? true) && od.backend === 'fanotify' }) : null;
  settlerRef = settler;
  const applier = new LayerApplier({
    ms,
    layout,
    store,
    converter,
    conversion,
    mounts,
    events,
    chunkSize: e.chunkSize,
    logger,
    containerdAddress: opts.containerdAddress ?? (process.env.CONTAINERD_ADDRESS || '/run/containerd/containerd.sock'),
    containerdRoot: opts.containerdRoot ?? (process.env.CONTAINERD_ROOT || '/var/lib/containerd'),
  });
  const plain = remote && opts.fetchLayers !== false ? new PlainLayerFetcher({ layout, ms, store, converter, conversion, remote, events, snapshots, chunkSize: e.chunkSize, logger }) : null;
  const importer = remote ? new RemoteImporter({ layout, ms, store, converter, remote, loader, mounts, conversion, settler, events, snapshots, plain, logger }) : null;
  return {
    layout,
    logger,
    ms,
    reserve,
    kernel,
    mounts,
    sweeper,
    events,
    remote,
    erofs: { store, converter, sealer, integrity, conversion, applier, background: (e.convertMode ?? 'background') === 'background', share, offer: shareParts && ((id) => offerLayer(shareParts, id)), importer, plain, loader, settler },
    scrub: opts.integrity ?? null,
  };
}

/**
 * Lazy layers made before their image moved to lazy/<id>.erofs kept it at
 * images/<id>.erofs: moved now, before anything reads either (a mount
 * keeps the file it opened).
 */
function migrateLazyImages(ms: MetaStore, layout: RootLayout, loader: LazyLoader): void {
  for (const r of ms.lazyLayers()) {
    const id = String(r.snapshot_id);
    const old = layout.image(id);
    if (!fs.existsSync(loader.imageOf(id)) && fs.existsSync(old)) {
      fs.renameSync(old, loader.imageOf(id));
      fsyncDir(path.dirname(old));
      fsyncDir(path.dirname(loader.imageOf(id)));
    }
  }
}

/** One line for what spreadSubdirectories did at start: info when it set the flag, a warning when it failed, debug otherwise. */
function logSpread(logger: Logger, dir: string, spread: SpreadOutcome): void {
  const fields = { op: 'start', dir };
  if (spread.on && spread.setNow) {
    logger.info(fields, `${dir} marked as a top of directory hierarchies (chattr +T): on this ext4 without a journal each new layer directory is placed away from the ones just removed`);
  } else if (spread.on) {
    logger.debug(fields, `${dir} is marked as a top of directory hierarchies (chattr +T)`);
  } else if (spread.why === 'failed') {
    logger.warn({ ...fields, code: spread.code }, `could not mark ${dir} as a top of directory hierarchies (chattr +T: ${spread.code}); pulls on this ext4 without a journal may unpack slower`);
  } else {
    logger.debug({ ...fields, code: spread.code }, `${dir} left as it is (top-directory flag ${spread.why === 'unsupported' ? `not kept: ${spread.code}` : 'not needed: not an ext4 without a journal'})`);
  }
}
