import fs from 'node:fs';
import { ContainerdClient } from '../containerd/client';
import { type ImageContent, hostPlatform, imageLayers } from '../containerd/image-layers';
import { StoreChunkSink } from '../convert/chunk-sink';
import { LAYER_MEDIA_TYPES, treeFromLayerBlob } from '../convert/layer-stream';
import { type TreeNode, keyBytes } from '../convert/layer-tree';
import type { Logger } from '../log/logger';
import type { ChunkStore } from '../store/chunkstore';
import { splitKey } from '../store/keys';
import { Limiter } from '../util/limiter';

/** containerd's unpack key (snapshots.UnpackKeyFormat, "extract-<unique> <chain id>"): the name part of our key. */
const UNPACK_KEY = /^extract-\S+ (sha256:[0-9a-f]{64})$/;
/** Layers read ahead at once (gunzip, tar and hashing are CPU-bound; containerd's unpack needs a core too). */
const CONCURRENCY = 2;
/** A layer read ahead that no conversion takes within this time (the pull was abandoned) is dropped. */
const UNTAKEN_MS = 10 * 60_000;
/** Images whose layers are remembered (by name and target digest). */
const MAX_CACHED_IMAGES = 256;

export interface ContentAheadOptions {
  /** Blob `digest` of `size` bytes from containerd's content store in namespace `ns` (its files, else its Read RPC: the applier's). */
  content: (ns: string, digest: string, size: number) => AsyncIterable<Buffer>;
  containerdAddress: string;
  /** containerd's images and content in namespace `ns` (default: a client of containerdAddress). */
  client?: (ns: string) => AheadClient;
  store: ChunkStore;
  chunkSize: number;
  logger: Logger;
}

/** What the read-ahead needs of containerd in one namespace. */
export type AheadClient = ImageContent & Pick<ContainerdClient, 'listImageTargets' | 'close'>;

/** How long after a Prepare the read starts: an Apply of the same snapshot (2.x, or 1.7 with dedup-differ first) comes within it and calls forget. */
const APPLY_GRACE_MS = 200;

/** A layer read from containerd's content store into a tree, its new chunks written provisionally (chunk-sink.ts). */
export interface AheadLayer {
  root: TreeNode;
  sink: StoreChunkSink;
  digest: string;
  image: string;
  readMs: number;
}

interface Job {
  result: Promise<AheadLayer | null>;
  timer: NodeJS.Timeout | null;
  /** Forgotten: a read not begun does not begin, one under way stops at its next block (its chunks given back). */
  abort: AbortController;
}

/**
 * containerd 1.x's `ctr image pull` (and 1.7's without dedup-differ in the
 * diff service's list) unpacks each layer with its walking differ into the
 * snapshot's directory, which the daemon converts afterwards: every file
 * written, then read and hashed again. But ctr has fetched every blob into
 * containerd's content store before it unpacks, and its Prepare key names
 * the layer's chain id. So when a Prepare without labels has containerd's
 * unpack key, the layer is found among the namespace's images (manifest,
 * config, chain ids) and read from the content store here, in one pass,
 * while containerd unpacks it into the directory; its conversion then
 * records the tree read here instead of reading the directory, and the
 * directory goes at once. The tar must hash to the config's diff id, and
 * the directory containerd wrote must have the tree's shape (names, kinds,
 * sizes, modes, owners, mtimes), or the directory is converted as before.
 */
export class ContentAhead {
  private readonly jobs = new Map<string, Job>();
  private readonly clients = new Map<string, AheadClient>();
  /** Layers of each image by namespace and name (with the target they were read from). */
  private readonly images = new Map<string, Awaited<ReturnType<typeof imageLayers>>>();
  private readonly limiter = new Limiter(CONCURRENCY);
  private closed = false;

  constructor(private readonly o: ContentAheadOptions) {}

  /** Active snapshot `id` was prepared under `key` without labels: reads its layer ahead when the key is containerd's unpack key. */
  start(id: string, key: string): void {
    const k = splitKey(key);
    const m = k ? UNPACK_KEY.exec(k.name) : null;
    if (this.closed || !k || !m || this.jobs.has(id)) return;
    const job: Job = { result: Promise.resolve(null), timer: null, abort: new AbortController() };
    const { signal } = job.abort;
    job.result = new Promise((resolve) => setTimeout(resolve, APPLY_GRACE_MS).unref())
      .then(() => (this.closed || signal.aborted ? null : this.limiter.run(async () => (signal.aborted ? null : this.read(k.ns, m[1], key, signal)))))
      .catch((err: Error) => {
        this.o.logger.debug({ op: 'convert', key, snapshot: id, err: err.message }, `layer not read ahead from containerd's content store: ${err.message}`);
        return null;
      });
    job.timer = setTimeout(() => void this.forget(id), UNTAKEN_MS).unref();
    this.jobs.set(id, job);
  }

  /**
   * The layer read ahead for snapshot `id`, if there is one and directory
   * `dir` (what containerd unpacked) has its shape; else null (the
   * directory is converted). Each layer is taken once.
   */
  async take(id: string, dir: string): Promise<AheadLayer | null> {
    const job = this.jobs.get(id);
    if (!job) return null;
    this.jobs.delete(id);
    if (job.timer) clearTimeout(job.timer);
    const layer = await job.result;
    if (!layer) return null;
    const differs = shapeDiffers(layer.root, dir);
    if (differs) {
      this.o.logger.warn({ op: 'convert', snapshot: id, layer: id, layer_digest: layer.digest, image: layer.image }, `layer ${layer.digest} read from containerd's content store does not match what was unpacked into snapshot ${id} (${differs}): its directory is converted instead`);
      await layer.sink.discard();
      return null;
    }
    return layer;
  }

  /**
   * Snapshot `id` removed, applied by dedup-differ, or never taken: what was
   * read ahead for it is given back. A read not yet begun never begins; one
   * under way stops (a failed pull's layer must not go on filling the disk).
   */
  async forget(id: string): Promise<void> {
    const job = this.jobs.get(id);
    if (!job) return;
    this.jobs.delete(id);
    job.abort.abort();
    if (job.timer) clearTimeout(job.timer);
    const layer = await job.result;
    await layer?.sink.discard();
  }

  close(): void {
    this.closed = true;
    // Not awaited: the store may close first; provisional chunks no row names are punched at the next start.
    for (const id of [...this.jobs.keys()]) void this.forget(id).catch(() => undefined);
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }

  private clientFor(ns: string): AheadClient {
    let c = this.clients.get(ns);
    if (!c) this.clients.set(ns, (c = this.o.client?.(ns) ?? new ContainerdClient(this.o.containerdAddress, ns, 30_000)));
    return c;
  }

  /** The layer whose chain id is `chain` among namespace `ns`'s images: its descriptor, the image and its diff id. */
  private async find(ns: string, chain: string): Promise<{ image: string; digest: string; size: number; mediaType: string; diffId: string } | null> {
    const c = this.clientFor(ns);
    for (const { name, target } of await c.listImageTargets()) {
      if (typeof target?.digest !== 'string') continue;
      const cacheKey = `${ns}\0${name}`;
      let layers = this.images.get(cacheKey);
      if (layers?.target !== target.digest) {
        try {
          layers = await imageLayers(c, name, hostPlatform(), target);
        } catch {
          continue; // not an image of this platform, or its content is gone meanwhile
        }
        if (this.images.size >= MAX_CACHED_IMAGES) this.images.delete(this.images.keys().next().value as string);
        this.images.set(cacheKey, layers);
      }
      const i = layers.chainIds.indexOf(chain);
      if (i >= 0 && layers.layers.length === layers.chainIds.length) {
        return { image: name, digest: layers.layers[i].digest, size: layers.layers[i].size, mediaType: layers.layers[i].media_type, diffId: layers.diffIds[i] };
      }
    }
    return null;
  }

  private async read(ns: string, chain: string, key: string, signal: AbortSignal): Promise<AheadLayer | null> {
    const started = Date.now();
    const layer = await this.find(ns, chain);
    if (!layer) throw new Error(`no image in namespace ${ns} has a layer with chain id ${chain}`);
    if (!LAYER_MEDIA_TYPES.has(layer.mediaType)) throw new Error(`layer ${layer.digest} is ${layer.mediaType}`);
    this.o.logger.debug({ op: 'convert', key, image: layer.image, layer_digest: layer.digest }, `reading layer ${layer.digest} of ${layer.image} from containerd's content store while containerd unpacks it`);
    const blob = untilAborted(this.o.content(ns, layer.digest, layer.size), signal, `the read of layer ${layer.digest} stopped: its snapshot was removed or applied`);
    const sink = new StoreChunkSink(this.o.store, this.o.chunkSize);
    const warn = (msg: string) => this.o.logger.debug({ op: 'convert', key, layer_digest: layer.digest }, msg);
    const { root, diffId } = await treeFromLayerBlob(blob, layer.digest, sink, warn);
    if (diffId !== layer.diffId) {
      await sink.discard();
      throw new Error(`layer ${layer.digest} hashes to ${diffId}, the image config names ${layer.diffId}`);
    }
    return { root, sink, digest: layer.digest, image: layer.image, readMs: Date.now() - started };
  }
}

/** `src`, ending with an error at the first block after `signal` aborts (the source's iterator is closed). */
async function* untilAborted(src: AsyncIterable<Buffer>, signal: AbortSignal, why: string): AsyncGenerator<Buffer> {
  for await (const b of src) {
    if (signal.aborted) throw new Error(why);
    yield b;
  }
}

const SLASH = Buffer.from('/');

/**
 * Where directory `dir` differs from `root` in shape (names, kinds, sizes,
 * permission bits, owners, files' mtimes to the second, symlink targets), or null.
 * File contents are not read: the tree's own came from a tar that hashes
 * to the layer's diff id, and containerd wrote the directory from the same
 * tar (checked against the same diff id).
 */
export function shapeDiffers(root: TreeNode, dir: string): string | null {
  const kindOf = (st: fs.Stats): TreeNode['kind'] =>
    st.isFile() ? 'file' : st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'symlink' : st.isCharacterDevice() ? 'chr' : st.isBlockDevice() ? 'blk' : st.isFIFO() ? 'fifo' : 'sock';
  // Paths as bytes: names need not be UTF-8.
  const visit = (node: TreeNode, p: Buffer, rel: string): string | null => {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(p);
    } catch {
      return `${rel} is missing`;
    }
    const kind = kindOf(st);
    if (kind !== node.kind) return `${rel} is a ${kind}, not a ${node.kind}`;
    if ((st.mode & 0o7777) !== node.perm || st.uid !== node.uid || st.gid !== node.gid) return `${rel}: mode or owner`;
    // mtime 0 in the tree: whatever time the unpack had (whiteouts, parents the tar does not list).
    const timed = node.mtimeSec !== 0 || node.mtimeNsec !== 0;
    if (timed && kind !== 'dir' && kind !== 'symlink' && Math.floor(st.mtimeMs / 1000) !== node.mtimeSec) return `${rel}: mtime`;
    if (kind === 'file' && st.size !== node.size) return `${rel}: size ${st.size}, not ${node.size}`;
    if (kind === 'symlink' && !fs.readlinkSync(p, { encoding: 'buffer' }).equals(node.target ?? Buffer.alloc(0))) return `${rel}: link target`;
    if (kind !== 'dir') return null;
    const names = fs.readdirSync(p, { encoding: 'buffer' });
    const children = node.children ?? new Map<string, TreeNode>();
    if (names.length !== children.size) return `${rel}: ${names.length} entries, not ${children.size}`;
    for (const [name, child] of children) {
      const b = keyBytes(name);
      const why = visit(child, Buffer.concat([p, SLASH, b]), `${rel}/${b.toString('utf8')}`);
      if (why) return why;
    }
    return null;
  };
  return visit(root, Buffer.from(dir), '.');
}
