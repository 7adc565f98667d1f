import fs from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { fdOfProcess } from '../../native/cachefiles';
import { readdirOrEmpty } from '../util/fs';
import { type BlobSource, CachefilesServer } from './cachefiles';
import { directWriter, readRange } from './chunk-fill';
import { SharedGroup } from './group';
import type { HolderHooks } from './holder-client';
import type { HelloReply, HolderEvent } from './holder-protocol';
import { type LazyFile, digestHex } from './lazy-files';
import type { FscacheDeps, LazySource, LoaderBackend } from './loader-backend';
import { RelayedEvents } from './relayed-events';

/**
 * EROFS over fscache (cachefiles on-demand mode): the layer is mounted with
 * `fsid=` (its metadata image, blob m-<id>-<digest>) and `device=` (its chunk
 * space, blob b-<digest>, shared by every mount of that layer in the
 * `domain_id`); the kernel asks for the ranges its cache lacks (READ), this
 * daemon makes sure the lazy file has them (copied or fetched, written
 * directly: nothing marks the file) and writes them into the cache object
 * (cachefiles.ts). The holder keeps /dev/cachefiles bound across daemon
 * restarts; requests wait, and the restarted daemon gets them again
 * (`restore`). The lazy file stays the daemon's copy: what the kernel's
 * cache lacks (an object it discarded) is served again without a fetch.
 * The cache files of removed layers' blobs are culled once let go.
 */
export class FscacheBackend implements LoaderBackend, HolderHooks {
  readonly name = 'fscache';
  readonly mountsOverFile = false;
  /** The requests of /dev/cachefiles, once set up. */
  private cachefiles: CachefilesServer | null = null;
  private setup: Promise<void> | null = null;
  private freshBind = false;
  /**
   * Blobs of removed layers whose cache files are to be culled → tries left
   * while the file is not there yet (cachefiles links a cache file into its
   * tree only once the object is let go, after the unmount).
   */
  private readonly toCull = new Map<string, number>();
  private cullTimer: NodeJS.Timeout | null = null;
  /**
   * Events of a fanotify group a holder still reads from before the backend
   * changed (it outlives daemons): served as the fanotify backend would,
   * answered by the holder (this daemon holds no copy of that group).
   */
  private readonly strays: RelayedEvents;

  constructor(private readonly d: FscacheDeps) {
    // The fanotify backend's record of relayed events: it would not match the events of a later group.
    fs.rmSync(path.join(d.stateDir, 'relayed.json'), { force: true });
    this.strays = new RelayedEvents({ ...d, group: new SharedGroup(), record: null });
    d.holder.use(this);
  }

  get queue(): number {
    return this.strays.count + (this.cachefiles?.inflight ?? 0);
  }

  get rebound(): boolean {
    return this.freshBind;
  }

  /** Requests a previous daemon left (mounted layers' reads) are answered from now on. */
  async start(hasLayers: boolean): Promise<void> {
    if (!hasLayers) return;
    await this.d.holder.ensureConnected();
    await this.ensureCachefiles();
  }

  /** Reads wait for this daemon once the cache is bound. */
  isMarked(): boolean {
    return this.cachefiles !== null;
  }

  /** Never: nothing reads a lazy layer but through a bound cache. */
  unguarded(): boolean {
    return false;
  }

  async mountSource(st: LazyFile): Promise<LazySource> {
    await this.ensureCachefiles();
    const hex = digestHex(st.rl.layerDigest);
    return { fscache: { fsid: `m-${st.id}-${hex}`, domainId: this.d.fscache.domain, device: `b-${hex}` } };
  }

  /** Nothing to mark: the lazy file is the daemon's own copy, written directly. */
  async mark(): Promise<void> {}

  /** Filled directly: reads through fscache then find it there. */
  async loadWindow(st: LazyFile, _fh: unknown, _buf: Buffer, start: number, end: number): Promise<number> {
    await this.d.filler.ensureRange(st, start, end - start, directWriter(st.file));
    return end - start;
  }

  /** Its blobs leave the cache (the chunk space once no lazy layer of that digest is left). */
  dropped(id: string, st: LazyFile | undefined): void {
    if (!st) return;
    const hex = digestHex(st.rl.layerDigest);
    this.toCull.set(`m-${id}-${hex}`, CULL_TRIES);
    if (this.d.files.ofDigest(hex).length === 0) this.toCull.set(`b-${hex}`, CULL_TRIES);
    this.scheduleCull(1000);
  }

  close(): void {
    if (this.cullTimer) clearTimeout(this.cullTimer);
    this.cachefiles?.close();
  }

  // ---- the holder connection's hooks ----

  async connected(hello: HelloReply): Promise<{ adopted: boolean; marked: number }> {
    return { adopted: false, marked: new Set(hello.marked ?? []).size };
  }

  event(conn: net.Socket, ev: HolderEvent): void {
    this.strays.serve(conn, ev);
  }

  keepsReadsWaiting(): boolean {
    return false;
  }

  async lost(): Promise<void> {}

  /** This daemon's copy keeps the cache bound; the new holder takes a copy of it. */
  async reconnected(): Promise<void> {
    if (!this.cachefiles || this.d.closed()) return;
    const { holder, log } = this.d;
    const reply = await holder.request({ op: 'cachefiles', adopt_pid: process.pid, adopt_fd: this.cachefiles.fd }).catch((e: Error) => ({ op: 'error' as const, error: e.message }));
    if (reply.op === 'error') log.error({ op: 'ondemand', err: reply.error }, `the new on-demand holder could not take /dev/cachefiles: a daemon restart now unbinds the cache (reads of mounted layers then fail with EIO)`);
    else log.info({ op: 'ondemand', holder_pid: reply.pid }, 'the new on-demand holder keeps /dev/cachefiles bound');
  }

  // ---- /dev/cachefiles ----

  /** /dev/cachefiles bound (by the holder, or already) and this daemon answering its requests through a copy of the holder's fd. */
  private async ensureCachefiles(): Promise<void> {
    if (this.cachefiles) return;
    this.setup ??= (async () => {
      await this.d.holder.ensureConnected();
      const f = this.d.fscache;
      const reply = await this.d.holder.request({ op: 'cachefiles', dir: f.dir, tag: f.tag });
      if (reply.op === 'error') throw new Error(`the on-demand holder cannot bind /dev/cachefiles: ${reply.error}`);
      this.startServing(reply.pid, reply.fd, reply.fresh);
    })().finally(() => (this.setup = null));
    await this.setup;
  }

  private startServing(pid: number, fd: number, fresh: boolean): void {
    const { fscache: f, log, counters } = this.d;
    const server = new CachefilesServer({
      fd: fdOfProcess(pid, fd),
      logger: log,
      resolve: (volume, key) => (volume === `erofs,${f.domain}` ? this.blobSource(key) : null),
      onReadError: (key, off, len, err) => {
        counters.errors++;
        log.error({ op: 'ondemand', blob: key, offset: off, count: len, err: err.message }, `on-demand read of blob ${key} at ${off} (+${len}) failed, the reader gets EIO: ${err.message}`);
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
    log.info(
      { op: 'ondemand', backend: 'fscache', holder_pid: pid, cache_dir: f.dir, fresh },
      fresh ? `bound /dev/cachefiles in on-demand mode (cache ${f.dir})` : 'answering /dev/cachefiles again (requests left by a previous daemon restored)',
    );
  }

  /** The blob an fscache cookie names: a lazy layer's metadata image (m-<id>-<hex>) or chunk space (b-<hex>). */
  private blobSource(key: string): BlobSource | null {
    const { files, counters, filler } = this.d;
    const meta = /^m-(\d+)-([0-9a-f]{64})$/.exec(key);
    if (meta) {
      const st = files.get(meta[1]);
      if (!st || digestHex(st.rl.layerDigest) !== meta[2]) return null;
      const image = files.imageOf(st.id);
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
    const first = files.ofDigest(blob[1])[0];
    if (!first) return null;
    return {
      size: first.size,
      read: async (off, len) => {
        // Any lazy layer of that digest (the first may be removed meanwhile).
        const st = first.dropped ? files.ofDigest(blob[1])[0] : first;
        if (!st) throw new Error(`no lazy layer of ${blob[1]} any more`);
        counters.requests++;
        const wait = filler.ensureRange(st, off, len, directWriter(st.file));
        if (wait) {
          counters.misses++;
          await wait;
        } else counters.hits++;
        return readRange(st.file, off, Math.min(len, st.size - off));
      },
    };
  }

  // ---- culling removed layers' blobs ----

  private scheduleCull(ms: number): void {
    if (this.cullTimer || this.d.closed()) return;
    this.cullTimer = setTimeout(() => {
      this.cullTimer = null;
      this.cullNow();
    }, ms);
    this.cullTimer.unref();
  }

  /** The cache's files of this domain: name → its directory (cachefiles keeps a data blob as cache/I<volume key>/@<fan-out>/D<cookie key>). */
  private cacheFiles(): Map<string, string> {
    const files = new Map<string, string>();
    const f = this.d.fscache;
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
        this.d.log.warn({ op: 'ondemand', blob: key, err: (err as Error).message }, `cannot cull blob ${key} from the fscache cache: ${(err as Error).message}`);
        r = 'gone';
      }
      if (r === 'busy') continue;
      this.toCull.delete(key);
      if (r === 'culled') this.d.log.info({ op: 'ondemand', blob: key }, `culled blob ${key} of a removed layer from the fscache cache`);
    }
    if (this.toCull.size > 0) this.scheduleCull(5000);
  }
}

/** Looks for a removed layer's cache file this many times, 5 s apart. */
const CULL_TRIES = 24;
