import type { FileHandle } from 'node:fs/promises';
import type { Logger } from '../log/logger';
import type { ChunkFiller } from './chunk-fill';
import type { GroupFdStore } from './fdstore';
import type { HolderClient } from './holder-client';
import type { LazyFile, LazyFiles } from './lazy-files';

/**
 * The kernel mechanism that makes reads of a lazy layer's missing data wait
 * for this daemon, one per loader, chosen at start (makeLoaderBackend in
 * lazy-loader.ts): fanotify pre-content events on the lazy file
 * (fanotify-backend.ts) or EROFS over fscache, cachefiles in on-demand mode
 * (fscache-backend.ts). The loader asks it, never which one it is.
 */

export type LazyBackend = 'fanotify' | 'fscache';

/** How a lazy layer is mounted: file-backed over its lazy file, or through fscache. */
export type LazySource = { device: string } | { fscache: { fsid: string; domainId: string; device: string } };

export interface LoaderCounters {
  /** Read events the kernel raised. */
  requests: number;
  /** Events whose range was all present. */
  hits: number;
  /** Events that waited for chunks. */
  misses: number;
  /** Chunks fetched from the registry by this loader (part of RemoteLayers' chunks_fetched). */
  chunks_fetched: number;
  /** Reads that failed (denied with EIO). */
  errors: number;
  /** Bytes the background prefetch read (loading what was missing). */
  prefetch_bytes: number;
}

export interface LoaderBackend {
  /** For logs and /stats only: the loader's code asks the capabilities below. */
  readonly name: LazyBackend;
  /** Reads waiting for data now. */
  readonly queue: number;
  /**
   * A lazy layer is mounted file-backed over its lazy file (fanotify), so a
   * layer whose reads are held already, or that has all its data, is
   * mounted at once, with no round-trip to the holder.
   */
  readonly mountsOverFile: boolean;
  /**
   * The read-holding binding had to be made anew at start (fscache: the
   * holder that kept /dev/cachefiles bound died): mounts made through the
   * previous one fail their reads (EIO) and must be made again.
   */
  readonly rebound: boolean;
  /** Reaches the holder when there is anything to hold (`hasLayers`: lazy layers are recorded). */
  start(hasLayers: boolean): Promise<void>;
  /** Whether reads of `id`'s missing data wait for this daemon. */
  isMarked(id: string): boolean;
  /**
   * Whether reads of `id`'s missing data are let through unheld (fanotify:
   * its file is not marked). Such a layer is filled by writing its file
   * directly, and a mount of it may hold zeros where data was missing.
   */
  unguarded(id: string): boolean;
  /** Makes reads of `st` wait for its data, and says how to mount it. */
  mountSource(st: LazyFile): Promise<LazySource>;
  /** Makes reads of `id`'s lazy file wait for this daemon before anything opens it (fanotify: marked in the holder's group). */
  mark(id: string): Promise<void>;
  /**
   * Loads [start, end) of `st` the way a reader's access would (fanotify:
   * read through the marked file `fh` into `buf`; fscache: filled directly),
   * returning the bytes it counts as read.
   */
  loadWindow(st: LazyFile, fh: FileHandle, buf: Buffer, start: number, end: number): Promise<number>;
  /** Layer `id` is gone (`st`: what was tracked of it, if anything). */
  dropped(id: string, st: LazyFile | undefined): void;
  close(): void;
}

/** What every backend works with. */
export interface BackendDeps {
  files: LazyFiles;
  filler: ChunkFiller;
  holder: HolderClient;
  counters: LoaderCounters;
  log: Logger;
  closed: () => boolean;
  /** The holder's state directory (dirname of its socket): relayed.json lives there. */
  stateDir: string;
}

export interface FanotifyDeps extends BackendDeps {
  /** Mounted lazy layers whose file no group marks any more (see LazyLoaderOptions.onGroupLost). */
  onGroupLost: (ids: string[]) => void;
  fdStore?: GroupFdStore | null;
  storedGroup?: number;
}

export interface FscacheDeps extends BackendDeps {
  /** The cache directory (on a disk filesystem), the cache's tag and the EROFS domain. */
  fscache: { dir: string; tag: string; domain: string };
}
