import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fdOfProcess } from '../../native/cachefiles';
import { FAN_PRE_ACCESS, kernelDev } from '../../native/fanotify';
import { seekDataOrHole } from '../../native/libc';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import type { ChunkEntry, LayerHeader } from '../remote/dedup-image';
import { type RemoteLayer, type RemoteLayers, runsOf } from '../remote/lazy';
import { formatReference } from '../remote/reference';
import { sleep } from '../remote/transport';
import { readdirOrEmpty, regularFileUnder } from '../util/fs';
import { type ChunkStore, readAt, writeAllAt } from '../store/chunkstore';
import { type BlobSource, CachefilesServer } from './cachefiles';
import type { GroupFdStore } from './fdstore';
import { encodeFrame, readFrames } from './frames';
import { EventFile, SharedGroup } from './group';
import { type RelayedEntry, RelayedRecord } from './relayed-record';

/**
 * On-demand loading of lazy layers, with one of two kernel mechanisms.
 *
 * fanotify pre-content events (Linux ≥ 6.14):
 * A layer of a dedup image is mounted before its data is here: its EROFS
 * image (as the registry has it, chunk indexes in the layer-local block
 * space of its chunk table) names as its device a sparse file,
 * lazy/<id>.blob, holding the chunks the node already had (chunk store or
 * another lazy layer) and holes for the rest. That file is marked for
 * FAN_PRE_ACCESS in the group the on-demand holder (holder.ts, its own
 * process) owns; every read of it waits until the holder relays the event
 * here, the chunks the range overlaps are fetched (Range GET,
 * digest-checked), written through a copy of the event's fd, and the read
 * is allowed, or denied with EIO after bounded retries (group.ts).
 *
 * Fail-closed: holder and daemon both hold the group, so a daemon crash or
 * restart leaves reads waiting for the next daemon, and a holder's death
 * leaves them waiting for the next holder, which this daemon starts with a
 * copy of its group (marks and queued events kept); what the dead holder
 * had relayed is still served here. systemd's fd store may keep a third
 * copy (fdstore.ts): when holder and daemon die together, reads still wait,
 * and the next daemon takes the group back at start, learns its marks from
 * the kernel, answers the events the dead holder had read (their ranges
 * written down: relayed-record.ts; the others denied with EIO) and hands
 * the group to a new holder. Only when every holder is gone does the kernel
 * let reads through (holes read as zeros, which then sit in the layer's
 * page cache); a daemon that then finds a mounted, incomplete layer
 * unmarked has it mounted again over a clean page cache (onGroupLost) and
 * logs an error.
 *
 * EROFS over fscache (cachefiles on-demand mode): the layer is mounted with
 * `fsid=` (its metadata image, blob m-<id>-<digest>) and `device=` (its chunk
 * space, blob b-<digest>, shared by every mount of that layer in the
 * `domain_id`); the kernel asks for the ranges its cache lacks (READ),
 * this daemon makes sure the lazy file has them (copied or fetched as
 * above, written directly: nothing marks the file) and writes them into
 * the cache object (cachefiles.ts). The holder keeps /dev/cachefiles bound
 * across daemon restarts; requests wait, and the restarted daemon gets
 * them again (`restore`). The lazy file stays the daemon's copy: what the
 * kernel's cache lacks (an object it discarded) is served again without a
 * fetch.
 *
 * What is filled is what the file holds as data (SEEK_HOLE per chunk), so
 * a restart knows it without any other record.
 */

const BLOCK = 4096;

export interface LazyLayerInput {
  id: string;
  rl: RemoteLayer;
  header: LayerHeader;
}

interface LazyFile {
  id: string;
  file: string;
  rl: RemoteLayer;
  header: LayerHeader;
  /** Extents sorted by block address. */
  entries: ChunkEntry[];
  size: number;
  filled: Uint8Array;
  missing: number;
  inflight: Map<number, Promise<void>>;
  /** Mounted while its file was not marked (holder lost): filled directly, in the background. */
  unsafe: boolean;
  dropped: boolean;
}

export type LazyBackend = 'fanotify' | 'fscache';

/** How a lazy layer is mounted: file-backed over its lazy file, or through fscache. */
export type LazySource = { device: string } | { fscache: { fsid: string; domainId: string; device: string } };

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

/** An event the holder relayed: answered on this daemon's copy of the group, by the holder's fd number. */
interface Relayed {
  id: number;
  /** The connection it came on (event ids are per holder). */
  sock: net.Socket;
  /** The event's fd number in the holder. */
  fd: number;
  file: string;
  layer: string | undefined;
  offset: number;
  count: number;
  done: Promise<void>;
  /** Denied already (its holder died and it took too long): never answered again, its number may be another event's now. */
  cancelled: boolean;
}

/** An event a holder that died with its daemon had read (relayed-record.ts): answered once its range is filled. */
interface InheritedEvent extends RelayedEntry {
  /** Denied by someone else meanwhile (its number then may be another event's): never answered again. */
  cancelled: boolean;
}

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

type Waiter = { op: string; resolve: (h: Record<string, unknown>) => void; reject: (e: Error) => void };

export class LazyLoader {
  private readonly log: Logger;
  private readonly byFile = new Map<string, LazyFile>();
  private readonly byId = new Map<string, LazyFile>();
  /** digest → a filled extent holding it (for copies into other lazy files). */
  private readonly haveDigest = new Map<string, { st: LazyFile; i: number }>();
  private sock: net.Socket | null = null;
  private readonly waiters: Waiter[] = [];
  private holderMarked = new Set<string>();
  private holderPid = 0;
  /** fanotify: this daemon's copy of the holder's group. */
  private readonly group = new SharedGroup();
  /** Events relayed by the holder and not answered yet. */
  private readonly relayed = new Set<Relayed>();
  /** Events a dead holder read while its daemon died too (the group kept by systemd's fd store), answered here; by fd number. */
  private readonly inherited = new Map<number, InheritedEvent>();
  /** fanotify with an fd store: the relayed events that wait, written down (null: not kept). */
  private readonly record: RelayedRecord | null = null;
  /** The group came from systemd's fd store and no holder read it yet. */
  private fromStore = false;
  private pendingEvents = 0;
  private closed = false;
  private connecting: Promise<void> | null = null;
  private reconnecting: Promise<void> | null = null;
  readonly counters: LoaderCounters = { requests: 0, hits: 0, misses: 0, chunks_fetched: 0, errors: 0, prefetch_bytes: 0 };
  private readonly prefetchQueue: string[] = [];
  private prefetching = false;
  /** fscache: the requests of /dev/cachefiles, once set up. */
  private cachefiles: CachefilesServer | null = null;
  private cachefilesSetup: Promise<void> | null = null;
  private freshBind = false;
  /**
   * fscache: blobs of removed layers whose cache files are to be culled →
   * tries left while the file is not there yet (cachefiles links a cache
   * file into its tree only once the object is let go, after the unmount).
   */
  private readonly toCull = new Map<string, number>();
  private cullTimer: NodeJS.Timeout | null = null;

  constructor(private readonly o: LazyLoaderOptions) {
    this.log = o.logger ?? silentLogger();
    fs.mkdirSync(o.dir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(path.dirname(o.socket), { recursive: true, mode: 0o700 });
    const recordFile = path.join(path.dirname(o.socket), 'relayed.json');
    const stored = o.storedGroup ?? -1;
    if (o.backend === 'fanotify' && (o.fdStore?.enabled || stored >= 0)) this.record = new RelayedRecord(recordFile);
    // Not kept: an old record would not match the events of a later group.
    else fs.rmSync(recordFile, { force: true });
    if (o.backend === 'fanotify' && stored >= 0) {
      this.group.adopt(stored);
      this.fromStore = true;
    }
  }

  fileOf(id: string): string {
    return path.join(this.o.dir, `${id}.blob`);
  }

  /**
   * A lazy layer's EROFS image as its registry has it (chunk indexes in the
   * layer's own block space): lazy/<id>.erofs, never images/<id>.erofs,
   * which only ever holds images over the chunk store (see Snapshotter.settleLayer).
   */
  imageOf(id: string): string {
    return path.join(this.o.dir, `${id}.erofs`);
  }

  get backend(): LazyBackend {
    return this.o.backend;
  }

  /** Reads waiting for data now. */
  get queue(): number {
    return this.pendingEvents + (this.cachefiles?.inflight ?? 0);
  }

  /** Lazy layers and the chunks they still lack. */
  summary(): { layers: number; incomplete: number; missing_chunks: number } {
    let incomplete = 0;
    let missing = 0;
    for (const st of this.byId.values()) {
      if (st.missing > 0) incomplete++;
      missing += st.missing;
    }
    return { layers: this.byId.size, incomplete, missing_chunks: missing };
  }

  /**
   * Loads the recorded lazy layers (what each file holds) and, when there
   * are any, connects to the holder (starting one if none answers). With
   * none, the holder is reached on the first mark.
   */
  async start(layers: LazyLayerInput[]): Promise<void> {
    for (const l of layers) {
      const file = this.fileOf(l.id);
      if (!fs.existsSync(file)) {
        // Recorded but its file is gone (deleted by hand): it is refetched whole.
        fs.writeFileSync(file, '', { mode: 0o600 });
      }
      this.register(l);
    }
    if (this.fromStore && layers.length === 0 && this.group.marks().length === 0) {
      // Nothing lazy and nothing marked: the group guards nothing any more; let it go (a holder, if one lives, keeps its own).
      this.group.close();
      this.fromStore = false;
      this.o.fdStore?.forget('no lazy layer is left and the group marks no file');
    }
    // A group taken back from systemd's fd store may have reads waiting: answered from now on.
    if (layers.length > 0 || this.fromStore) await this.ensureConnected();
    // fscache: requests a previous daemon left (mounted layers' reads) are answered from now on.
    if (layers.length > 0 && this.o.backend === 'fscache') await this.ensureCachefiles();
  }

  /**
   * fscache: /dev/cachefiles had to be bound anew at start (the holder
   * that kept it died): mounts made through the previous binding fail
   * their reads (EIO) and must be made again.
   */
  get cachefilesRebound(): boolean {
    return this.freshBind;
  }

  /** Connected to the holder (one connection attempt at a time). */
  private async ensureConnected(): Promise<void> {
    if (this.sock) return;
    this.connecting ??= this.connect().finally(() => (this.connecting = null));
    await this.connecting;
  }

  /** Whether `id` is a lazy layer that still lacks data. */
  incomplete(id: string): boolean {
    return (this.byId.get(id)?.missing ?? 0) > 0;
  }

  /** Whether reads of `id`'s missing data wait for it: its file is marked (fanotify), or the fscache cache is bound. */
  isMarked(id: string): boolean {
    if (this.o.backend === 'fscache') return this.cachefiles !== null;
    return this.holderMarked.has(this.fileOf(id));
  }

  /**
   * Makes reads of layer `id` wait for its data, and says how to mount it:
   * fanotify: its file marked (when it lacks data), mounted over it;
   * fscache: the cache bound, mounted by blob names this loader serves.
   */
  async mountSource(id: string): Promise<LazySource> {
    const st = this.byId.get(id);
    if (!st) throw new Error(`layer ${id} is not a lazy layer this daemon knows`);
    if (this.o.backend === 'fanotify') {
      if (st.missing > 0) await this.mark(id);
      return { device: st.file };
    }
    await this.ensureCachefiles();
    const f = this.o.fscache as NonNullable<LazyLoaderOptions['fscache']>;
    const hex = digestHex(st.rl.layerDigest);
    return { fscache: { fsid: `m-${id}-${hex}`, domainId: f.domain, device: `b-${hex}` } };
  }

  /**
   * Creates lazy/<id>.blob for a new layer: the size of its chunk space,
   * with every chunk the node has (chunk store, other lazy layers) copied
   * in; not yet marked. Returns how many chunks were local.
   */
  async create(l: LazyLayerInput): Promise<{ file: string; local: number; localBytes: number; missing: number }> {
    const file = this.fileOf(l.id);
    const entries = sortedEntries(l.header);
    const size = spaceSize(entries);
    const fh = await fsp.open(file, 'w', 0o600);
    let local = 0;
    let localBytes = 0;
    let missing = 0;
    try {
      await fh.truncate(size);
      const byDigest = groupByDigest(entries.map((_, i) => i), entries);
      for (const [digest, idxs] of byDigest) {
        const bytes = await this.localBytes(digest, entries[idxs[0]][1]);
        if (!bytes) {
          missing += idxs.length;
          continue;
        }
        for (const i of idxs) await writeAllAt(fh.fd, bytes, entries[i][0] * BLOCK);
        local += idxs.length;
        localBytes += bytes.length;
      }
    } finally {
      await fh.close();
    }
    return { file, local, localBytes, missing };
  }

  /** Starts serving reads of `l`'s file (after create, or at start-up). */
  register(l: LazyLayerInput): void {
    const file = this.fileOf(l.id);
    const entries = sortedEntries(l.header);
    const st: LazyFile = {
      id: l.id,
      file,
      rl: l.rl,
      header: l.header,
      entries,
      size: spaceSize(entries),
      filled: new Uint8Array(entries.length),
      missing: 0,
      inflight: new Map(),
      unsafe: false,
      dropped: false,
    };
    const fd = fs.openSync(file, 'r');
    try {
      for (let i = 0; i < entries.length; i++) {
        const start = entries[i][0] * BLOCK;
        const end = start + entries[i][1] * BLOCK;
        // Whole chunks only: a write cut short by a crash leaves a hole in it.
        const data = seekDataOrHole(fd, start, 'data');
        const hole = data === start ? seekDataOrHole(fd, start, 'hole') : null;
        if (data === start && (hole === null || hole >= end)) this.setFilled(st, i);
        else st.missing++;
      }
    } finally {
      fs.closeSync(fd);
    }
    this.byFile.set(file, st);
    this.byId.set(l.id, st);
  }

  /** Forgets `id` and deletes its files (the layer is gone, or settled into the chunk store); fscache: its blobs leave the cache too. */
  drop(id: string): void {
    const st = this.byId.get(id);
    if (st) {
      st.dropped = true;
      this.byId.delete(id);
      this.byFile.delete(st.file);
      for (const [d, at] of this.haveDigest) if (at.st === st) this.haveDigest.delete(d);
      if (this.o.backend === 'fscache') {
        const hex = digestHex(st.rl.layerDigest);
        this.toCull.set(`m-${id}-${hex}`, CULL_TRIES);
        // The chunk space is shared by every lazy layer of that digest.
        if (![...this.byId.values()].some((x) => digestHex(x.rl.layerDigest) === hex)) this.toCull.set(`b-${hex}`, CULL_TRIES);
        this.scheduleCull(1000);
      }
    }
    this.holderMarked.delete(this.fileOf(id));
    fs.rmSync(this.fileOf(id), { force: true });
    fs.rmSync(this.imageOf(id), { force: true });
  }

  /** Ids of files in the lazy directory that `keep` does not name (leftovers of a crash). */
  orphans(keep: (id: string) => boolean): string[] {
    const ids = readdirOrEmpty(this.o.dir).map((n) => /^(\d+)\.(blob|erofs)$/.exec(n)?.[1]);
    return [...new Set(ids)].filter((id): id is string => id !== undefined && !keep(id));
  }

  /** Marks `id`'s file in the holder's group. Do it before anything opens the file. */
  async mark(id: string): Promise<void> {
    const file = this.fileOf(id);
    if (this.holderMarked.has(file)) return;
    await this.ensureConnected();
    const reply = await this.request({ op: 'mark', path: file }, 'marked');
    if (reply.op === 'error') throw new Error(`cannot mark ${file} for on-demand reads: ${String(reply.error)}`);
    this.holderMarked.add(file);
  }

  /**
   * A layer mounted while its file is not marked (the holder that marked it
   * died): reads of its holes are not held, so everything it lacks is
   * fetched now, written directly.
   */
  fillAllUnsafe(id: string): void {
    const st = this.byId.get(id);
    if (!st || st.missing === 0 || st.unsafe) return;
    st.unsafe = true;
    this.log.error(
      { op: 'ondemand', layer: id, snapshot: id, missing_chunks: st.missing },
      `layer ${id} is mounted but its on-demand holder was lost: reads of data not yet fetched are not held; fetching all ${st.missing} missing chunks now`,
    );
    const run = async () => {
      for (let attempt = 0; st.missing > 0 && !st.dropped && !this.closed; attempt++) {
        try {
          const todo = st.entries.map((_, i) => i).filter((i) => !st.filled[i]);
          await this.fillEntries(st, todo, directWriter(st.file));
        } catch (err) {
          this.log.error({ op: 'ondemand', layer: id, err: (err as Error).message }, `layer ${id}: fetching its missing chunks failed; retrying`);
          await sleep(Math.min(30_000, 1000 * 2 ** attempt));
        }
      }
      if (st.missing === 0) this.log.info({ op: 'ondemand', layer: id }, `layer ${id}: all data present`);
    };
    void run();
  }

  /**
   * Loads everything layer `id` lacks, through its marked file (fanotify:
   * each read raises the events a container's read would) or directly
   * (fscache), retrying with backoff until it has all its data: true then,
   * false when the layer is gone or the loader closed first.
   */
  async loadAll(id: string): Promise<boolean> {
    for (let attempt = 0; ; attempt++) {
      const st = this.byId.get(id);
      if (!st || st.dropped || this.closed) return false;
      if (st.missing === 0) return true;
      try {
        if (this.o.backend === 'fanotify' && !this.isMarked(id)) await this.fillEntries(st, st.entries.map((_, i) => i).filter((i) => !st.filled[i]), directWriter(st.file));
        else await this.prefetchLayer(st);
      } catch (err) {
        this.log.warn({ op: 'ondemand', layer: id, err: (err as Error).message }, `layer ${id}: loading its missing chunks failed; retrying: ${(err as Error).message}`);
        await sleep(Math.min(30_000, 1000 * 2 ** attempt));
      }
    }
  }

  /**
   * With prefetch "all": loads what layer `id` lacks in the background, by
   * reading its file window by window (each read raises the events a
   * container's read would, so the data arrives the same way), paced to
   * prefetchMbps. Call once the layer is mounted (its file marked).
   */
  prefetchInBackground(id: string): void {
    const mode = this.o.prefetch ?? 'none';
    if (mode === 'none' || !this.incomplete(id) || !this.isMarked(id) || this.prefetchQueue.includes(id)) return;
    if (mode === 'list' && !this.byId.get(id)?.header.prefetch?.length) return;
    this.prefetchQueue.push(id);
    if (!this.prefetching) void this.runPrefetch();
  }

  private async runPrefetch(): Promise<void> {
    this.prefetching = true;
    try {
      while (this.prefetchQueue.length > 0 && !this.closed) {
        const id = this.prefetchQueue.shift() as string;
        const st = this.byId.get(id);
        if (!st || st.dropped || st.missing === 0) continue;
        const started = Date.now();
        try {
          if (st.header.prefetch?.length) await this.prefetchListed(st);
          if (this.o.prefetch !== 'all') continue;
          await this.prefetchLayer(st);
          this.log.info({ op: 'ondemand', layer: id, duration_ms: Date.now() - started }, `layer ${id}: background prefetch loaded all its data`);
        } catch (err) {
          this.log.warn({ op: 'ondemand', layer: id, err: (err as Error).message }, `layer ${id}: background prefetch stopped: ${(err as Error).message}; retried in a minute`);
          setTimeout(() => this.prefetchInBackground(id), 60_000).unref();
        }
      }
    } finally {
      this.prefetching = false;
    }
  }

  /**
   * Reads the files layer `st`'s header lists through its mount (their
   * reads load their chunks as a container's would), paced like the rest.
   * The list comes from the image: a path that is not a regular file
   * reached without symlinks inside the mount is skipped.
   */
  private async prefetchListed(st: LazyFile): Promise<void> {
    const root = this.o.mountPath(st.id);
    const buf = Buffer.alloc(1 << 20);
    const started = Date.now();
    let files = 0;
    let bytes = 0;
    for (const rel of st.header.prefetch ?? []) {
      if (st.dropped || this.closed) return;
      const file = regularFileUnder(root, rel);
      if (!file) {
        this.log.debug({ op: 'ondemand', layer: st.id, path: rel }, `layer ${st.id}: prefetch path ${rel} is not a regular file there; skipped`);
        continue;
      }
      const fh = await fsp.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
      try {
        for (let at = 0; ; ) {
          const t0 = Date.now();
          const { bytesRead } = await fh.read(buf, 0, buf.length, at);
          if (bytesRead === 0) break;
          at += bytesRead;
          bytes += bytesRead;
          this.counters.prefetch_bytes += bytesRead;
          await this.pace(bytesRead, t0);
        }
      } finally {
        await fh.close();
      }
      files++;
    }
    this.log.info(
      { op: 'ondemand', layer: st.id, files, bytes, duration_ms: Date.now() - started },
      `layer ${st.id}: background prefetch loaded its ${files} listed files (${bytes} bytes)`,
    );
  }

  /** Waits so that `bytes` one of `readers` read since `t0` stay within its share of ondemand.prefetch_mbps. */
  private async pace(bytes: number, t0: number, readers = 1): Promise<void> {
    const mbps = (this.o.prefetchMbps ?? 0) / readers;
    if (mbps > 0) await sleep(Math.max(0, bytes / ((mbps * 1e6) / 8 / 1000) - (Date.now() - t0)));
  }

  /**
   * Loads everything layer `st` lacks: its missing extents in windows of up
   * to 8 MiB, `prefetchConcurrency` windows at a time, each read through
   * the marked file (fanotify: the reads raise the events that load it) or
   * filled directly (fscache: reads through fscache find it there).
   */
  private async prefetchLayer(st: LazyFile): Promise<void> {
    const window = 8 << 20;
    const windows: [start: number, end: number][] = [];
    for (let i = 0; i < st.entries.length; ) {
      if (st.filled[i]) {
        i++;
        continue;
      }
      // A run of missing extents, up to one window.
      const start = st.entries[i][0] * BLOCK;
      let end = start;
      while (i < st.entries.length && !st.filled[i] && (st.entries[i][0] + st.entries[i][1]) * BLOCK - start <= window) {
        end = (st.entries[i][0] + st.entries[i][1]) * BLOCK;
        i++;
      }
      if (end === start) {
        end = Math.min(start + window, (st.entries[i][0] + st.entries[i][1]) * BLOCK);
        i++;
      }
      windows.push([start, end]);
    }
    const readers = Math.max(1, Math.min(this.o.prefetchConcurrency ?? 1, windows.length));
    const fh = await fsp.open(st.file, 'r');
    let next = 0;
    const reader = async () => {
      const buf = Buffer.alloc(window);
      while (next < windows.length && !st.dropped && !this.closed) {
        const [start, end] = windows[next++];
        if (!this.isMarked(st.id)) throw new Error('its file is not marked for on-demand reads');
        const t0 = Date.now();
        let bytesRead = end - start;
        if (this.o.backend === 'fscache') await this.ensureRange(st, start, end - start, directWriter(st.file));
        else bytesRead = (await fh.read(buf, 0, end - start, start)).bytesRead;
        this.counters.prefetch_bytes += bytesRead;
        await this.pace(bytesRead, t0, readers);
      }
    };
    // Every reader finished before the file closes; the first failure is the answer.
    const results = await Promise.allSettled(Array.from({ length: readers }, reader));
    await fh.close();
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    if (st.missing > 0 && !st.dropped) throw new Error(`${st.missing} chunks still missing`);
  }

  close(): void {
    this.closed = true;
    if (this.cullTimer) clearTimeout(this.cullTimer);
    this.cachefiles?.close();
    this.group.close();
    this.sock?.destroy();
    this.sock = null;
    for (const w of this.waiters.splice(0)) w.reject(new Error('on-demand loader closed'));
  }

  // ---- holder connection ----

  private async connect(): Promise<void> {
    let sock: net.Socket;
    try {
      sock = await dial(this.o.socket);
    } catch (err) {
      if (!this.o.holderCommand) throw new Error(`no on-demand holder answers on ${this.o.socket}: ${(err as Error).message}`);
      const child = this.startHolder();
      // As long as it runs, up to 5 minutes: a loaded (or emulated) machine
      // starts a Node process slowly (over 30 s measured in the test VM).
      sock = await retryDial(this.o.socket, 300_000, () => child.exitCode !== null || child.signalCode !== null);
    }
    this.attach(sock);
    const hello = await this.request({ op: 'hello' }, 'hello');
    this.holderPid = Number(hello.pid);
    let adopted = false;
    if (this.o.backend === 'fanotify') adopted = await this.shareGroup(hello);
    // Adopted: the marks are this daemon's record of the group's; else the holder's (a fresh group marks nothing).
    if (!adopted) this.holderMarked = new Set(Array.isArray(hello.marked) ? hello.marked.filter((p): p is string => typeof p === 'string') : []);
    this.log.info({ op: 'ondemand', holder_pid: this.holderPid, socket: this.o.socket, marked: this.holderMarked.size, adopted }, `on-demand holder (pid ${this.holderPid}) connected${adopted ? ", reading this daemon's copy of the fanotify group" : ''}`);
  }

  /**
   * fanotify, right after the hello: this daemon's copy of the group goes
   * to a holder that has none (one started after the last died), or one is
   * taken of the holder's. A group systemd's fd store handed back, with no
   * holder reading it: its marks are learnt from the kernel, the events a
   * dead holder had read are answered (those written down, once filled) or
   * denied, before the new holder reads. Returns whether the holder adopted
   * this daemon's copy.
   */
  private async shareGroup(hello: Record<string, unknown>): Promise<boolean> {
    const holderHasGroup = hello.group === true || (hello.group === undefined && Array.isArray(hello.marked) && hello.marked.length > 0);
    const ask: Record<string, unknown> = { op: 'group' };
    let waiting: InheritedEvent[] = [];
    if (this.fromStore && this.group.held && !holderHasGroup) {
      // No process read this group since the last holder died: what it marks is what the kernel says.
      this.holderMarked = this.markedInGroup();
      waiting = (this.record?.list() ?? []).map((e) => ({ ...e, cancelled: false }));
      const denied = this.group.denyUnknown(4096, new Set(waiting.map((e) => e.fd)));
      if (denied > 0) this.log.warn({ op: 'ondemand', denied }, `denied ${denied} reads (EIO) that the on-demand holder, dead with the daemon, had taken from the group without their ranges being written down`);
      ask.reserve = waiting.map((e) => e.fd);
    }
    if (this.group.held) Object.assign(ask, { adopt_pid: process.pid, adopt_fd: this.group.fdNumber, marked: [...this.holderMarked] });
    const g = await this.request(ask, 'group');
    if (g.op === 'error') throw new Error(`the on-demand holder has no fanotify group: ${String(g.error)}`);
    const adopted = g.adopted === true;
    const fromStore = this.fromStore;
    this.fromStore = false;
    if (!this.group.held) {
      this.group.copyFrom(this.holderPid, Number(g.fd));
      this.o.fdStore?.keep(this.group.fdNumber, `a copy of the holder's group, pid ${this.holderPid}`);
    } else if (!adopted && this.group.sameAs(this.holderPid, Number(g.fd)) !== true) {
      // The holder reads a group of its own, not the one this daemon holds: the holder's is the live one.
      this.log.warn(
        { op: 'ondemand', holder_pid: this.holderPid },
        `the on-demand holder (pid ${this.holderPid}) reads another fanotify group than the one ${fromStore ? "systemd's fd store handed back" : 'this daemon holds'}: using the holder's`,
      );
      this.group.replaceFrom(this.holderPid, Number(g.fd));
      this.o.fdStore?.keep(this.group.fdNumber, `the holder's group, pid ${this.holderPid}, instead of another`, true);
    } else this.o.fdStore?.keep(this.group.fdNumber, 'the group in use');
    // What was written down is what still waits: the events this holder relays (resent on connect) and those answered here.
    const held = new Set<number>(adopted ? (Array.isArray(g.reserved) ? g.reserved : []) : Array.isArray(hello.reserved) ? hello.reserved : []);
    if (!adopted && held.size > 0) {
      // A daemon before this one was answering these for this holder when it died.
      waiting = (this.record?.list() ?? []).filter((e) => held.has(e.fd) && !this.inherited.has(e.fd)).map((e) => ({ ...e, cancelled: false }));
      for (const n of held) {
        if (this.inherited.has(n) || waiting.some((e) => e.fd === n)) continue;
        this.group.answer(n, false);
        this.send({ op: 'release', fd: n });
      }
    }
    waiting = waiting.filter((e) => held.has(e.fd));
    const live = new Set([...this.relayed].map((r) => r.fd));
    this.record?.retain((e) => live.has(e.fd) || held.has(e.fd) || this.inherited.has(e.fd));
    for (const e of waiting) void this.answerInherited(e);
    return adopted;
  }

  /** The lazy files this daemon knows that the group marks for pre-content events (the kernel's list: /proc/self/fdinfo). */
  private markedInGroup(): Set<string> {
    const marks = new Set(this.group.marks().filter((m) => (m.mask & BigInt(FAN_PRE_ACCESS)) !== 0n).map((m) => `${m.ino}:${m.sdev}`));
    const files = new Set<string>();
    for (const st of this.byId.values()) {
      try {
        const s = fs.statSync(st.file, { bigint: true });
        if (marks.has(`${s.ino}:${kernelDev(s.dev)}`)) files.add(st.file);
      } catch {
        // gone: not marked
      }
    }
    return files;
  }

  /**
   * An event a holder that died with its daemon had read (its number is
   * held by a placeholder in the new holder): its range is read through
   * the marked file (the reads raise events the new holder relays, so the
   * data arrives as for any read), then it is allowed, or denied with EIO
   * when the range could not be filled.
   */
  private async answerInherited(e: InheritedEvent): Promise<void> {
    this.inherited.set(e.fd, e);
    const st = this.byFile.get(e.file);
    let err: Error | null = null;
    try {
      if (!st) throw new Error(`${e.file} is not a lazy layer file this daemon knows`);
      const count = e.count > 0 ? e.count : st.size;
      if (!this.rangeFilled(st, e.offset, count)) await this.readThrough(st, e.offset, count);
      if (!this.rangeFilled(st, e.offset, count)) throw new Error('its range still lacks data');
    } catch (x) {
      err = x as Error;
    }
    this.inherited.delete(e.fd);
    if (e.cancelled) return;
    this.record?.remove(e.fd, e.file);
    this.group.answer(e.fd, err === null);
    this.send({ op: 'release', fd: e.fd });
    const what = `a read of ${st ? `layer ${st.id}` : e.file} at ${e.offset} (+${e.count})`;
    if (err) {
      this.counters.errors++;
      this.log.error({ op: 'ondemand', layer: st?.id, offset: e.offset, count: e.count, err: err.message }, `${what} that waited while the on-demand holder and the daemon were both dead failed, the reader gets EIO: ${err.message}`);
    } else this.log.info({ op: 'ondemand', layer: st?.id, offset: e.offset, count: e.count }, `${what} that waited while the on-demand holder and the daemon were both dead is served`);
  }

  /** Gives up answering `e` (denied by someone else): its number may be another event's from now on. */
  private cancelInherited(e: InheritedEvent): void {
    e.cancelled = true;
    this.inherited.delete(e.fd);
    this.record?.remove(e.fd, e.file);
  }

  /** Whether every extent [offset, offset+count) of `st` overlaps is filled. */
  private rangeFilled(st: LazyFile, offset: number, count: number): boolean {
    const end = Math.min(offset + count, st.size);
    for (let i = firstEntryAtOrAfter(st.entries, offset); i < st.entries.length && st.entries[i][0] * BLOCK < end; i++) if (!st.filled[i]) return false;
    return true;
  }

  /** Reads [offset, offset+count) of `st`'s marked file (8 MiB at a time): each read waits for its data like a container's. */
  private async readThrough(st: LazyFile, offset: number, count: number): Promise<void> {
    const end = Math.min(offset + count, st.size);
    const buf = Buffer.alloc(Math.min(8 << 20, Math.max(1, end - offset)));
    const fh = await fsp.open(st.file, 'r');
    try {
      for (let at = offset; at < end && !st.dropped && !this.closed; ) {
        const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - at), at);
        if (bytesRead === 0) break;
        at += bytesRead;
      }
    } finally {
      await fh.close();
    }
  }

  private startHolder(): ChildProcess {
    const [cmd, ...args] = this.o.holderCommand as string[];
    const logFd = this.o.holderLog ? fs.openSync(this.o.holderLog, 'a', 0o600) : 'ignore';
    // Detached, its own session: it outlives this daemon (systemd: KillMode=process).
    const child = spawn(cmd, [...args, '--socket', this.o.socket], { detached: true, stdio: ['ignore', logFd, logFd] });
    if (typeof logFd === 'number') fs.closeSync(logFd);
    child.unref();
    fs.writeFileSync(path.join(path.dirname(this.o.socket), 'holder.pid'), `${child.pid}\n`, { mode: 0o600 });
    this.log.info({ op: 'ondemand', holder_pid: child.pid, socket: this.o.socket }, `started the on-demand holder (pid ${child.pid})`);
    return child;
  }

  private attach(sock: net.Socket): void {
    this.sock = sock;
    readFrames(
      sock,
      (f) => this.onFrame(sock, f.head),
      (err) => this.log.error({ op: 'ondemand', err: err.message }, 'bad frame from the on-demand holder'),
    );
    sock.on('error', () => undefined);
    sock.on('close', () => {
      if (this.sock !== sock) return;
      this.sock = null;
      for (const w of this.waiters.splice(0)) w.reject(new Error('the on-demand holder connection closed'));
      if (!this.closed) void this.holderLost(sock);
    });
  }

  /**
   * fscache: /dev/cachefiles bound (by the holder, or already) and this
   * daemon answering its requests through a copy of the holder's fd.
   */
  private async ensureCachefiles(): Promise<void> {
    if (this.cachefiles) return;
    this.cachefilesSetup ??= (async () => {
      await this.ensureConnected();
      const f = this.o.fscache as NonNullable<LazyLoaderOptions['fscache']>;
      const reply = await this.request({ op: 'cachefiles', dir: f.dir, tag: f.tag }, 'cachefiles');
      if (reply.op === 'error') throw new Error(`the on-demand holder cannot bind /dev/cachefiles: ${String(reply.error)}`);
      this.startCachefiles(Number(reply.pid), Number(reply.fd), reply.fresh === true);
    })().finally(() => (this.cachefilesSetup = null));
    await this.cachefilesSetup;
  }

  private startCachefiles(pid: number, fd: number, fresh: boolean): void {
    const f = this.o.fscache as NonNullable<LazyLoaderOptions['fscache']>;
    const server = new CachefilesServer({
      fd: fdOfProcess(pid, fd),
      logger: this.log,
      resolve: (volume, key) => (volume === `erofs,${f.domain}` ? this.blobSource(key) : null),
      onReadError: (key, off, len, err) => {
        this.counters.errors++;
        this.log.error({ op: 'ondemand', blob: key, offset: off, count: len, err: err.message }, `on-demand read of blob ${key} at ${off} (+${len}) failed, the reader gets EIO: ${err.message}`);
      },
    });
    server.start();
    this.cachefiles = server;
    this.freshBind = fresh;
    // Blobs of layers removed while no daemon could cull them (a crash, a restart).
    for (const name of this.cacheFiles().keys()) {
      const key = name.slice(1);
      if (/^[mb]-/.test(key) && !this.blobSource(key)) this.toCull.set(key, 1);
    }
    if (this.toCull.size > 0) this.scheduleCull(1000);
    this.log.info(
      { op: 'ondemand', backend: 'fscache', holder_pid: pid, cache_dir: f.dir, fresh },
      fresh ? `bound /dev/cachefiles in on-demand mode (cache ${f.dir})` : 'answering /dev/cachefiles again (requests left by a previous daemon restored)',
    );
  }

  /** The blob an fscache cookie names: a lazy layer's metadata image (m-<id>-<hex>) or chunk space (b-<hex>). */
  private blobSource(key: string): BlobSource | null {
    const meta = /^m-(\d+)-([0-9a-f]{64})$/.exec(key);
    if (meta) {
      const st = this.byId.get(meta[1]);
      if (!st || digestHex(st.rl.layerDigest) !== meta[2]) return null;
      const image = this.imageOf(st.id);
      let size: number;
      try {
        size = fs.statSync(image).size;
      } catch {
        return null;
      }
      return { size, read: (off, len) => readRange(image, off, Math.min(len, size - off)) };
    }
    const blob = /^b-([0-9a-f]{64})$/.exec(key);
    if (!blob) return null;
    const bySt = () => [...this.byId.values()].find((x) => !x.dropped && digestHex(x.rl.layerDigest) === blob[1]);
    const first = bySt();
    if (!first) return null;
    return {
      size: first.size,
      read: async (off, len) => {
        // Any lazy layer of that digest (the first may be removed meanwhile).
        const st = first.dropped ? bySt() : first;
        if (!st) throw new Error(`no lazy layer of ${blob[1]} any more`);
        this.counters.requests++;
        const wait = this.ensureRange(st, off, len, directWriter(st.file));
        if (wait) {
          this.counters.misses++;
          await wait;
        } else this.counters.hits++;
        return readRange(st.file, off, Math.min(len, st.size - off));
      },
    };
  }

  private scheduleCull(ms: number): void {
    if (this.cullTimer || this.closed) return;
    this.cullTimer = setTimeout(() => {
      this.cullTimer = null;
      this.cullNow();
    }, ms);
    this.cullTimer.unref();
  }

  /** The cache's files of this domain: name → its directory (cachefiles keeps a data blob as cache/I<volume key>/@<fan-out>/D<cookie key>). */
  private cacheFiles(): Map<string, string> {
    const files = new Map<string, string>();
    const f = this.o.fscache;
    if (!f) return files;
    const volume = path.join(f.dir, 'cache', `Ierofs,${f.domain}`);
    for (const fan of readdirOrEmpty(volume)) for (const name of readdirOrEmpty(path.join(volume, fan))) files.set(name, path.join(volume, fan));
    return files;
  }

  /** Culls the cache files of removed layers' blobs; those still in use (unmounting) are retried. */
  private cullNow(): void {
    const server = this.cachefiles;
    if (!server || this.toCull.size === 0) return;
    const files = this.cacheFiles();
    for (const [key, tries] of [...this.toCull]) {
      // Mounted again meanwhile (the same layer pulled again): keep it.
      if (this.blobSource(key)) {
        this.toCull.delete(key);
        continue;
      }
      const dir = files.get(`D${key}`);
      if (!dir) {
        // Not linked into the cache yet (or never cached): look again a few times.
        if (tries <= 1) this.toCull.delete(key);
        else this.toCull.set(key, tries - 1);
        continue;
      }
      let r: 'culled' | 'busy' | 'gone';
      try {
        r = server.cull(dir, `D${key}`);
      } catch (err) {
        this.log.warn({ op: 'ondemand', blob: key, err: (err as Error).message }, `cannot cull blob ${key} from the fscache cache: ${(err as Error).message}`);
        r = 'gone';
      }
      if (r === 'busy') continue;
      this.toCull.delete(key);
      if (r === 'culled') this.log.info({ op: 'ondemand', blob: key }, `culled blob ${key} of a removed layer from the fscache cache`);
    }
    if (this.toCull.size > 0) this.scheduleCull(5000);
  }

  /**
   * The holder went away. fanotify: this daemon's copy keeps the group (its
   * marks, its queued events) and reads wait; what the holder had relayed is
   * answered here, what it had read but not relayed is denied, and then a new
   * holder reads the group again. Without a copy (never taken), the marks
   * are gone with the group: layers mounted over them go to onGroupLost.
   */
  private async holderLost(dead: net.Socket): Promise<void> {
    if (this.reconnecting) return;
    const before = new Set(this.holderMarked);
    const kept = this.group.held;
    this.log.error(
      { op: 'ondemand', holder_pid: this.holderPid, group_kept: kept },
      `the on-demand holder (pid ${this.holderPid}) is gone; ${kept ? 'this daemon holds the fanotify group: reads wait for a new holder' : 'reconnecting'}`,
    );
    this.reconnecting = (async () => {
      if (kept) {
        const orphans = [...this.relayed].filter((r) => r.sock === dead);
        for (const r of orphans) {
          this.log.warn(
            { op: 'ondemand', layer: r.layer, file: r.file, offset: r.offset, count: r.count },
            `the on-demand holder died while a read of ${r.layer ? `layer ${r.layer}` : r.file} at ${r.offset} (+${r.count}) waited: this daemon fills and answers it through its copy of the group`,
          );
        }
        // Answered before a new holder reads: its event fd numbers must not meet the dead one's.
        // Bounded: a fill that itself reads a marked file (a chunk copied from another lazy layer) waits for a holder.
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([Promise.all(orphans.map((r) => r.done)), new Promise<void>((res) => (timer = setTimeout(res, ORPHAN_WAIT_MS)))]);
        clearTimeout(timer);
        for (const r of orphans) {
          if (!this.relayed.has(r)) continue;
          r.cancelled = true;
          this.record?.remove(r.fd, r.file);
          this.group.answer(r.fd, false);
          this.log.warn({ op: 'ondemand', layer: r.layer, offset: r.offset, count: r.count }, `a read of ${r.layer ? `layer ${r.layer}` : r.file} at ${r.offset} (+${r.count}) the dead holder had relayed was not served in ${ORPHAN_WAIT_MS / 1000} s: denied (EIO)`);
        }
        // Only once it is gone for good (a dropped connection to a live holder: it relays its events again).
        const gone = processGone(this.holderPid);
        // Reads a holder before it had read, served here: denied with the rest (their numbers may be a new holder's next).
        if (gone) for (const e of this.inherited.values()) this.cancelInherited(e);
        const denied = gone ? this.group.denyUnknown() : 0;
        if (denied > 0) this.log.warn({ op: 'ondemand', denied }, `denied ${denied} reads (EIO) the dead on-demand holder had taken from the group but not relayed`);
      }
      for (let attempt = 0; !this.closed; attempt++) {
        try {
          await this.ensureConnected();
          break;
        } catch (err) {
          this.log.error({ op: 'ondemand', err: (err as Error).message }, 'cannot reach an on-demand holder; retrying');
          await sleep(Math.min(10_000, 500 * 2 ** attempt));
        }
      }
      if (this.cachefiles && !this.closed) {
        // This daemon's copy keeps the cache bound; the new holder takes a copy of it.
        const reply = await this.request({ op: 'cachefiles', adopt_pid: process.pid, adopt_fd: this.cachefiles.fd }, 'cachefiles').catch((e: Error): Record<string, unknown> => ({ op: 'error', error: e.message }));
        if (reply.op === 'error') this.log.error({ op: 'ondemand', err: String(reply.error) }, `the new on-demand holder could not take /dev/cachefiles: a daemon restart now unbinds the cache (reads of mounted layers then fail with EIO)`);
        else this.log.info({ op: 'ondemand', holder_pid: Number(reply.pid) }, 'the new on-demand holder keeps /dev/cachefiles bound');
      }
      const lost: string[] = [];
      for (const file of before) {
        if (this.holderMarked.has(file)) continue;
        const st = this.byFile.get(file);
        if (st && st.missing > 0) lost.push(st.id);
      }
      if (lost.length === 0) return;
      if (this.o.onGroupLost) this.o.onGroupLost(lost);
      else for (const id of lost) this.fillAllUnsafe(id);
    })().finally(() => (this.reconnecting = null));
  }

  private request(head: Record<string, unknown>, op: string): Promise<Record<string, unknown>> {
    const sock = this.sock;
    if (!sock) return Promise.reject(new Error('no on-demand holder connected'));
    return new Promise((resolve, reject) => {
      this.waiters.push({ op, resolve, reject });
      sock.write(encodeFrame(head));
    });
  }

  private send(head: Record<string, unknown>, data?: Buffer): void {
    this.sock?.write(encodeFrame(head, data));
  }

  private onFrame(sock: net.Socket, h: Record<string, unknown>): void {
    if (h.op === 'event' && typeof h.id === 'number') {
      this.serve(sock, h.id, Number(h.pid), Number(h.fd), String(h.path ?? ''), Number(h.offset ?? 0), Number(h.count ?? 0));
      return;
    }
    // Answers about events (this daemon sends no fill frames): not for a request.
    if (typeof h.id === 'number') return;
    const w = this.waiters.shift();
    if (w) w.resolve(h);
  }

  // ---- serving reads ----

  private serve(sock: net.Socket, eventId: number, holderPid: number, holderFd: number, file: string, offset: number, count: number): void {
    this.counters.requests++;
    this.pendingEvents++;
    const st = this.byFile.get(file);
    // Writes go through a copy of the event's fd (no event raised), counted filled once written.
    const ev = Number.isInteger(holderFd) && holderFd >= 0 ? EventFile.copy(holderPid, holderFd) : null;
    let resolveDone = () => undefined as void;
    const r: Relayed = { id: eventId, sock, fd: holderFd, file, layer: st?.id, offset, count, done: new Promise<void>((res) => (resolveDone = res)), cancelled: false };
    this.relayed.add(r);
    const finish = (ok: boolean, err?: Error) => {
      this.pendingEvents--;
      ev?.close();
      if (!ok) {
        this.counters.errors++;
        this.log.error(
          { op: 'ondemand', layer: st?.id, file, offset, count, err: err?.message },
          `on-demand read of ${st ? `layer ${st.id}` : file} at ${offset} (+${count}) failed, the reader gets EIO: ${err?.message ?? 'unknown file'}`,
        );
      }
      // Written down no more before it is answered: its number is free for the holder's next event after that.
      if (!r.cancelled) this.record?.remove(holderFd, file);
      // Answered here (false from answer: answered already, by a daemon that died before telling the holder).
      let viaGroup = false;
      try {
        if (r.cancelled) viaGroup = true;
        else if (this.group.held) {
          this.group.answer(holderFd, ok);
          viaGroup = true;
        }
      } catch (e) {
        this.log.error({ op: 'ondemand', layer: st?.id, err: (e as Error).message }, `cannot answer an on-demand read of ${st ? `layer ${st.id}` : file} through this daemon's copy of the group; the holder answers it: ${(e as Error).message}`);
      }
      // The holder closes its fd only now (its number stays the event's until answered); a holder started since has other events under these ids.
      if (this.sock === sock) this.send(viaGroup ? { op: 'done', id: eventId, answered: true } : { op: 'done', id: eventId, ok });
      this.relayed.delete(r);
      resolveDone();
    };
    if (!st) return finish(false, new Error(`${file} is not a lazy layer file this daemon knows`));
    const write = async (off: number, bytes: Buffer) => {
      if (!ev) throw new Error('the on-demand holder went away before its event could be served');
      await ev.write(off, bytes);
    };
    const wait = this.ensureRange(st, offset, count > 0 ? count : st.size, write);
    if (!wait) {
      this.counters.hits++;
      return finish(true);
    }
    this.counters.misses++;
    // It waits for a fetch: written down, to be answered even if holder and daemon die meanwhile (systemd's fd store keeping the group).
    if (ev) this.record?.add({ fd: holderFd, file, offset, count });
    wait.then(
      () => finish(true),
      (err: Error) => finish(false, err),
    );
  }

  /**
   * Makes [offset, offset+count) of `st` present: the extents it overlaps
   * that are neither filled nor in flight are filled with `write`; null
   * when all are there already.
   */
  private ensureRange(st: LazyFile, offset: number, count: number, write: (offset: number, bytes: Buffer) => Promise<void>): Promise<void> | null {
    const end = Math.min(offset + count, st.size);
    const wait: Promise<void>[] = [];
    const todo: number[] = [];
    for (let i = firstEntryAtOrAfter(st.entries, offset); i < st.entries.length && st.entries[i][0] * BLOCK < end; i++) {
      if (st.filled[i]) continue;
      const p = st.inflight.get(i);
      if (p) wait.push(p);
      else todo.push(i);
    }
    if (wait.length === 0 && todo.length === 0) return null;
    if (todo.length > 0) wait.push(this.fillEntries(st, todo, write));
    return Promise.all(wait).then(() => undefined);
  }

  /**
   * Fills extents `idxs` of `st` (none filled or in flight): each distinct
   * digest once, from local data when the node has it, else fetched in
   * runs; every extent with that digest written with `write`.
   */
  private fillEntries(st: LazyFile, idxs: number[], write: (offset: number, bytes: Buffer) => Promise<void>): Promise<void> {
    const work = (async () => {
      const byDigest = groupByDigest(idxs, st.entries);
      const put = async (digest: string, bytes: Buffer) => {
        for (const i of byDigest.get(digest) ?? []) {
          if (st.filled[i]) continue;
          await write(st.entries[i][0] * BLOCK, bytes);
          this.setFilled(st, i);
          st.missing--;
          if (st.missing === 0 && !st.dropped) this.o.onComplete?.(st.id);
        }
      };
      const remote: ChunkEntry[] = [];
      for (const [digest, is] of byDigest) {
        const bytes = await this.localBytes(digest, st.entries[is[0]][1]);
        if (bytes) {
          await put(digest, bytes);
        } else remote.push(st.entries[is[0]]);
      }
      const runs = runsOf(remote);
      let next = 0;
      const worker = async () => {
        while (next < runs.length) {
          const run = runs[next++];
          const t0 = Date.now();
          const parts = await this.fetchRun(st, run);
          this.counters.chunks_fetched += run.length;
          const bytes = parts.reduce((n, b) => n + b.length, 0);
          this.log.info(
            { op: 'fetch', layer: st.id, snapshot: st.id, chunks: run.length, bytes, duration_ms: Date.now() - t0 },
            `fetched ${run.length} chunks (${bytes} bytes) of layer ${st.id} on demand`,
          );
          for (const [k, bytes] of parts.entries()) await put(run[k][2], bytes);
        }
      };
      await Promise.all(Array.from({ length: Math.min(4, runs.length) }, worker));
    })();
    const tracked = work.finally(() => {
      for (const i of idxs) if (st.inflight.get(i) === tracked) st.inflight.delete(i);
    });
    for (const i of idxs) st.inflight.set(i, tracked);
    return tracked;
  }

  private async fetchRun(st: LazyFile, run: ChunkEntry[]): Promise<Buffer[]> {
    const attempts = this.o.attempts ?? 2;
    for (let a = 1; ; a++) {
      try {
        return await this.o.remote.fetchRun(st.rl, st.header, run);
      } catch (err) {
        if (a >= attempts || st.dropped) throw err;
        this.log.warn(
          { op: 'fetch', layer: st.id, image: formatReference(st.rl.repo), chunks: run.length, attempt: a, err: (err as Error).message },
          `fetching ${run.length} chunks of layer ${st.id} failed (attempt ${a} of ${attempts}): ${(err as Error).message}`,
        );
        await sleep(250 * a);
      }
    }
  }

  /** A chunk's bytes from this node: another lazy layer that has it, or the chunk store. */
  private async localBytes(digest: string, nblocks: number): Promise<Buffer | null> {
    const have = this.haveDigest.get(digest);
    if (have && !have.st.dropped) {
      const buf = Buffer.alloc(nblocks * BLOCK);
      try {
        // A read of a marked file: its event comes back here and is a hit.
        const fh = await fsp.open(have.st.file, 'r');
        try {
          const { bytesRead } = await fh.read(buf, 0, buf.length, have.st.entries[have.i][0] * BLOCK);
          if (bytesRead === buf.length) return buf;
        } finally {
          await fh.close();
        }
      } catch {
        // gone meanwhile: try the store, then the registry
      }
    }
    const row = this.o.store.lookup(digest);
    // Checked: a damaged store chunk must not spread into a lazy layer (it is marked bad; the registry is asked instead).
    if (row && row.nblocks === nblocks) return this.o.store.readChecked(row);
    return null;
  }

  private setFilled(st: LazyFile, i: number): void {
    st.filled[i] = 1;
    if (!this.haveDigest.has(st.entries[i][2])) this.haveDigest.set(st.entries[i][2], { st, i });
  }
}

/** How long reads a dead holder had relayed may take before they are denied and a new holder starts. */
const ORPHAN_WAIT_MS = 10_000;

/** Looks for a removed layer's cache file this many times, 5 s apart. */
const CULL_TRIES = 24;

/** The hex of a "sha256:<hex>" digest. */
function digestHex(digest: string): string {
  return digest.slice(digest.indexOf(':') + 1);
}

/** `len` bytes of `file` at `off` (callers keep the range inside the file). */
async function readRange(file: string, off: number, len: number): Promise<Buffer> {
  if (len <= 0) return Buffer.alloc(0);
  const fh = await fsp.open(file, 'r');
  try {
    const buf = Buffer.alloc(len);
    await readAt(fh.fd, buf, off);
    return buf;
  } finally {
    await fh.close();
  }
}

function sortedEntries(h: LayerHeader): ChunkEntry[] {
  return [...h.chunks].sort((a, b) => a[0] - b[0]);
}

function spaceSize(entries: ChunkEntry[]): number {
  return entries.reduce((m, e) => Math.max(m, (e[0] + e[1]) * BLOCK), 0);
}

function groupByDigest(idxs: number[], entries: ChunkEntry[]): Map<string, number[]> {
  const m = new Map<string, number[]>();
  for (const i of idxs) {
    const d = entries[i][2];
    const list = m.get(d);
    if (list) list.push(i);
    else m.set(d, [i]);
  }
  return m;
}

/** Index of the first extent that ends after byte `offset`. */
function firstEntryAtOrAfter(entries: ChunkEntry[], offset: number): number {
  let lo = 0;
  let hi = entries.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((entries[mid][0] + entries[mid][1]) * BLOCK <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Writes straight into the file (only for files no group marks). */
function directWriter(file: string): (offset: number, bytes: Buffer) => Promise<void> {
  return async (offset, bytes) => {
    const fh = await fsp.open(file, 'r+');
    try {
      await writeAllAt(fh.fd, bytes, offset);
    } finally {
      await fh.close();
    }
  };
}

/** Whether process `pid` is gone (or a zombie: dead, not reaped yet). */
function processGone(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z';
  } catch {
    return true;
  }
}

function dial(socket: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(socket);
    s.once('connect', () => {
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', reject);
  });
}

/** Dials until it answers, `ms` pass, or `exited()` says the holder is gone. */
async function retryDial(socket: string, ms: number, exited: () => boolean): Promise<net.Socket> {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return await dial(socket);
    } catch (err) {
      if (exited()) throw new Error(`the on-demand holder exited before it answered on ${socket} (see its log, holder.log)`);
      if (Date.now() > until) throw new Error(`the on-demand holder did not come up on ${socket}: ${(err as Error).message}`);
      await sleep(50);
    }
  }
}
