import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import type { RemoteLayers } from '../remote/lazy';
import { sleep } from '../remote/transport';
import type { ChunkStore } from '../store/chunkstore';
import { readdirOrEmpty } from '../util/fs';
import { BackgroundPrefetch } from './background-prefetch';
import { ChunkFiller } from './chunk-fill';
import { FanotifyBackend } from './fanotify-backend';
import type { GroupFdStore } from './fdstore';
import { FscacheBackend } from './fscache-backend';
import { HolderClient } from './holder-client';
import { type LazyLayerInput, LazyFiles } from './lazy-files';
import type { BackendDeps, LazyBackend, LazySource, LoaderBackend, LoaderCounters } from './loader-backend';

export type { LazyLayerInput } from './lazy-files';
export type { LazyBackend, LazySource, LoaderCounters } from './loader-backend';

/**
 * On-demand loading of lazy layers. A layer of a dedup image is mounted
 * before its data is here: its EROFS image (as the registry has it, chunk
 * indexes in the layer-local block space of its chunk table) reads its
 * chunks from lazy/<id>.blob, a sparse file holding the chunks the node
 * already had (chunk store or another lazy layer) and holes for the rest.
 * A read of a hole waits, by one of two kernel mechanisms (the backend,
 * chosen once here: fanotify-backend.ts, fscache-backend.ts), until the
 * chunks it overlaps are fetched (Range GET, digest-checked) and written
 * (chunk-fill.ts); it gets EIO after bounded retries, never other bytes.
 * The parts:
 * - lazy-files.ts: what each lazy file holds (learnt from the file at start);
 * - chunk-fill.ts: local copies and registry fetches into lazy files;
 * - holder-client.ts: the connection to the holder process (holder.ts),
 *   which keeps the kernel's side alive across daemon restarts;
 * - background-prefetch.ts: loading what mounted layers lack, paced.
 */

export interface LazyLoaderOptions {
  backend: LazyBackend;
  /** Directory of the lazy files (ROOT/lazy). */
  dir: string;
  /** fscache: the cache directory (on a disk filesystem), the cache's tag and the EROFS domain. */
  fscache?: { dir: string; tag: string; domain: string };
  /** Where a layer is mounted (its prefetch list is read there). */
  mountPath: (id: string) => string;
  /** The holder's unix socket. */
  socket: string;
  remote: RemoteLayers;
  store: ChunkStore;
  logger?: Logger;
  /** Attempts per chunk run after the registry client's own retries (digest mismatches included). */
  attempts?: number;
  /**
   * After a lazy layer is mounted, in the background, at most
   * `prefetchMbps` megabits per second (0: no limit): "list" reads the files
   * its header lists (recorded at convert time), "all" those and then
   * whatever else it lacks; "none": only reads load data.
   */
  prefetch?: 'none' | 'list' | 'all';
  prefetchMbps?: number;
  /** "all": windows of a layer (8 MiB each) loaded at once, sharing prefetchMbps (default 1). */
  prefetchConcurrency?: number;
  /** Told when a layer has all its data (its last missing chunk written). */
  onComplete?: (id: string) => void;
  /** argv to start a holder with when none answers (null: wait for one started otherwise). */
  holderCommand?: string[] | null;
  /** Where a started holder's stderr goes. */
  holderLog?: string;
  /**
   * fanotify: mounted lazy layers whose file no group marks any more (the
   * group was lost: holder and daemon both died); reads of their missing
   * data were let through, so they must be mounted again (and their data
   * fetched). Without it, they are filled in the background (fillAllUnsafe).
   */
  onGroupLost?: (ids: string[]) => void;
  /** fanotify: systemd's fd store (NOTIFY_SOCKET set), to keep a third copy of the group in; null: none. */
  fdStore?: GroupFdStore | null;
  /** fanotify: the group systemd's fd store handed back at start (an fd of this process, taken over here), or -1. */
  storedGroup?: number;
}

/** The backend `o` names, with what it works with. */
function makeBackend(o: LazyLoaderOptions, deps: BackendDeps, fillAllUnsafe: (id: string) => void): LoaderBackend {
  if (o.backend === 'fscache') {
    if (!o.fscache) throw new Error('the fscache backend needs its cache directory, tag and domain');
    return new FscacheBackend({ ...deps, fscache: o.fscache });
  }
  const onGroupLost = o.onGroupLost ?? ((ids: string[]) => ids.forEach(fillAllUnsafe));
  return new FanotifyBackend({ ...deps, onGroupLost, fdStore: o.fdStore, storedGroup: o.storedGroup });
}

export class LazyLoader {
  private readonly log: Logger;
  private readonly files: LazyFiles;
  private readonly filler: ChunkFiller;
  private readonly holder: HolderClient;
  private readonly mechanism: LoaderBackend;
  private readonly prefetch: BackgroundPrefetch;
  private closed = false;
  readonly counters: LoaderCounters = { requests: 0, hits: 0, misses: 0, chunks_fetched: 0, errors: 0, prefetch_bytes: 0 };

  constructor(private readonly o: LazyLoaderOptions) {
    this.log = o.logger ?? silentLogger();
    fs.mkdirSync(o.dir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(path.dirname(o.socket), { recursive: true, mode: 0o700 });
    const closed = () => this.closed;
    this.files = new LazyFiles(o.dir);
    this.filler = new ChunkFiller({
      files: this.files,
      remote: o.remote,
      store: o.store,
      log: this.log,
      attempts: o.attempts,
      onComplete: o.onComplete,
      fetched: (n) => (this.counters.chunks_fetched += n),
      closed,
    });
    this.holder = new HolderClient({ socket: o.socket, holderCommand: o.holderCommand, holderLog: o.holderLog, log: this.log });
    const deps = { files: this.files, filler: this.filler, holder: this.holder, counters: this.counters, log: this.log, closed, stateDir: path.dirname(o.socket) };
    this.mechanism = makeBackend(o, deps, (id) => this.fillAllUnsafe(id));
    this.prefetch = new BackgroundPrefetch({
      files: this.files,
      backend: this.mechanism,
      counters: this.counters,
      log: this.log,
      closed,
      mountPath: o.mountPath,
      mode: o.prefetch,
      mbps: o.prefetchMbps,
      concurrency: o.prefetchConcurrency,
    });
  }

  fileOf(id: string): string {
    return this.files.fileOf(id);
  }

  /**
   * A lazy layer's EROFS image as its registry has it (chunk indexes in the
   * layer's own block space): lazy/<id>.erofs, never images/<id>.erofs,
   * which only ever holds images over the chunk store (see Snapshotter.settleLayer).
   */
  imageOf(id: string): string {
    return this.files.imageOf(id);
  }

  /** Which backend (for logs and /stats): callers ask the capability methods below instead. */
  get backend(): LazyBackend {
    return this.mechanism.name;
  }

  /** Reads waiting for data now. */
  get queue(): number {
    return this.mechanism.queue;
  }

  /** Lazy layers and the chunks they still lack. */
  summary(): { layers: number; incomplete: number; missing_chunks: number } {
    return this.files.summary();
  }

  /**
   * Loads the recorded lazy layers (what each file holds) and, when there
   * are any, connects to the holder (starting one if none answers). With
   * none, the holder is reached on the first mark.
   */
  async start(layers: LazyLayerInput[]): Promise<void> {
    for (const l of layers) {
      const file = this.fileOf(l.id);
      // Recorded but its file is gone (deleted by hand): it is refetched whole.
      if (!fs.existsSync(file)) fs.writeFileSync(file, '', { mode: 0o600 });
      this.register(l);
    }
    await this.mechanism.start(layers.length > 0);
  }

  /**
   * fscache: /dev/cachefiles had to be bound anew at start (the holder
   * that kept it died): mounts made through the previous binding fail
   * their reads (EIO) and must be made again.
   */
  get cachefilesRebound(): boolean {
    return this.mechanism.rebound;
  }

  /** Whether `id` is a lazy layer that still lacks data. */
  incomplete(id: string): boolean {
    return (this.files.get(id)?.missing ?? 0) > 0;
  }

  /** Whether reads of `id`'s missing data wait for it: its file is marked (fanotify), or the fscache cache is bound. */
  isMarked(id: string): boolean {
    return this.mechanism.isMarked(id);
  }

  /**
   * Whether layer `id` can be mounted at once (synchronously), without a
   * round-trip to the holder: mounts are file-backed over its lazy file and
   * it has all its data or its reads are held already. Otherwise mounting
   * it waits (mountSource).
   */
  canMountAtOnce(id: string): boolean {
    return this.mechanism.mountsOverFile && (!this.incomplete(id) || this.isMarked(id));
  }

  /**
   * Whether a mount of layer `id` made before this daemon started reads
   * through a binding that is gone (fscache: the holder that kept
   * /dev/cachefiles bound died): its reads fail with EIO, so it is to be
   * mounted again.
   */
  mountReadsFailSinceRebind(_id: string): boolean {
    return this.mechanism.rebound;
  }

  /**
   * Whether a mount of layer `id` may hold zeros where data was missing:
   * it lacks data and its reads are not held (fanotify: no group marks its
   * file; holder and daemon both died, and the kernel let reads through).
   * It is to be mounted again over a clean page cache.
   */
  mountMayHoldZeros(id: string): boolean {
    return this.incomplete(id) && this.mechanism.unguarded(id);
  }

  /**
   * Makes reads of layer `id` wait for its data, and says how to mount it:
   * fanotify: its file marked (when it lacks data), mounted over it;
   * fscache: the cache bound, mounted by blob names this loader serves.
   */
  async mountSource(id: string): Promise<LazySource> {
    const st = this.files.get(id);
    if (!st) throw new Error(`layer ${id} is not a lazy layer this daemon knows`);
    return this.mechanism.mountSource(st);
  }

  /**
   * Creates lazy/<id>.blob for a new layer: the size of its chunk space,
   * with every chunk the node has (chunk store, other lazy layers) copied
   * in; not yet marked. Returns how many chunks were local.
   */
  async create(l: LazyLayerInput): Promise<{ file: string; local: number; localBytes: number; missing: number }> {
    const file = this.fileOf(l.id);
    return { file, ...(await this.filler.create(l, file)) };
  }

  /** Starts serving reads of `l`'s file (after create, or at start-up). */
  register(l: LazyLayerInput): void {
    this.files.register(l);
  }

  /** Forgets `id` and deletes its files (the layer is gone, or settled into the chunk store); fscache: its blobs leave the cache too. */
  drop(id: string): void {
    const st = this.files.forget(id);
    this.mechanism.dropped(id, st);
    fs.rmSync(this.fileOf(id), { force: true });
    fs.rmSync(this.imageOf(id), { force: true });
  }

  /** Ids of files in the lazy directory that `keep` does not name (leftovers of a crash). */
  orphans(keep: (id: string) => boolean): string[] {
    const ids = readdirOrEmpty(this.o.dir).map((n) => /^(\d+)\.(blob|erofs)$/.exec(n)?.[1]);
    return [...new Set(ids)].filter((id): id is string => id !== undefined && !keep(id));
  }

  /** Makes reads of `id`'s file wait for this daemon (fanotify: marked in the holder's group). Do it before anything opens the file. */
  async mark(id: string): Promise<void> {
    await this.mechanism.mark(id);
  }

  /**
   * A layer mounted while its file is not marked (the holder that marked it
   * died): reads of its holes are not held, so everything it lacks is
   * fetched now, written directly.
   */
  fillAllUnsafe(id: string): void {
    const st = this.files.get(id);
    if (st) this.filler.fillAllUnsafe(st);
  }

  /**
   * Loads everything layer `id` lacks, through its marked file (fanotify:
   * each read raises the events a container's read would) or directly
   * (fscache, or a file no group marks), retrying with backoff until it has
   * all its data: true then, false when the layer is gone or the loader
   * closed first.
   */
  async loadAll(id: string): Promise<boolean> {
    for (let attempt = 0; ; attempt++) {
      const st = this.files.get(id);
      if (!st || st.dropped || this.closed) return false;
      if (st.missing === 0) return true;
      try {
        if (this.mechanism.unguarded(id)) await this.filler.fillMissingDirectly(st);
        else await this.prefetch.loadLayer(st);
      } catch (err) {
        this.log.warn({ op: 'ondemand', layer: id, err: (err as Error).message }, `layer ${id}: loading its missing chunks failed; retrying: ${(err as Error).message}`);
        await sleep(Math.min(30_000, 1000 * 2 ** attempt));
      }
    }
  }

  /**
   * With prefetch "list" or "all": loads what layer `id` lacks in the
   * background (background-prefetch.ts), paced to prefetchMbps. Call once
   * the layer is mounted (its reads held).
   */
  prefetchInBackground(id: string): void {
    this.prefetch.request(id);
  }

  /** The daemon is stopping: no on-demand holder is started from now on. */
  beginStop(): void {
    this.holder.beginStop();
  }

  /** A clean stop: the holder may exit once no lazy layer is in use (holder.ts, bye). Before close(). */
  farewell(): Promise<void> {
    return this.holder.sayBye();
  }

  close(): void {
    this.closed = true;
    this.mechanism.close();
    this.holder.close();
  }
}
