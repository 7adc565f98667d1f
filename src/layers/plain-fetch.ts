import crypto from 'node:crypto';
import { chainIds } from '../containerd/image-layers';
import { StoreChunkSink } from '../convert/chunk-sink';
import type { ConvertStats, Converter } from '../convert/converter';
import type { TreeNode } from '../convert/layer-tree';
import { LAYER_MEDIA_TYPES, treeFromLayerBlob } from '../convert/layer-stream';
import type { Logger } from '../log/logger';
import { SHA256_DIGEST } from '../remote/dedup-image';
import { LABEL_SNAPSHOT_REF, type PlainImage, type RemoteLayers } from '../remote/lazy';
import { type Reference, formatReference } from '../remote/reference';
import type { ChunkStore } from '../store/chunkstore';
import type { MetaStore } from '../store/metastore';
import type { RootLayout } from '../store/root-layout';
import { splitKey } from '../store/keys';
import { Limiter } from '../util/limiter';
import { Kind, type Labels } from '../store/types';
import { removeAll } from '../util/fs';
import type { ConversionQueue } from './conversion';
import { healFromSink } from '../convert/heal';
import { type ConvertEvents, convertedFields, convertedSummary } from './events';
import { CHUNKS_REASON } from './integrity';
import { type ImportSnapshots, REMOTE_IMPORT_PREFIX } from './remote-import';

/** Layers fetched and converted at once (the machine's cores: gunzip, tar and hashing are CPU-bound). */
export const DEFAULT_FETCH_CONCURRENCY = 2;
/** A layer converted ahead that no Prepare claims within this time (the pull was abandoned) is dropped. */
const UNCLAIMED_MS = 10 * 60_000;
const MAX_CONFIG_BYTES = 4 << 20;
const MAX_CACHED_CONFIGS = 256;

export interface PlainFetchOptions {
  layout: RootLayout;
  ms: MetaStore;
  store: ChunkStore;
  converter: Converter;
  conversion: ConversionQueue;
  remote: RemoteLayers;
  events: ConvertEvents;
  snapshots: ImportSnapshots;
  chunkSize: number;
  concurrency?: number;
  logger: Logger;
}

/** A layer read from its registry into a layer tree, its new chunks written provisionally (chunk-sink.ts). */
interface Built {
  root: TreeNode;
  sink: StoreChunkSink;
  fetchMs: number;
}

interface Job {
  image: string;
  layerDigest: string;
  layerSize: number;
  diffId: string;
  started: number;
  result: Promise<Built>;
  timer: NodeJS.Timeout | null;
  /** The first Prepare that records the layer (its tree and chunks are used once); others wait for it. */
  recorded: Promise<boolean> | null;
}

/** A job for `layer` of an image in `repo` (its result is set by whoever runs it). */
function newJob(repo: Reference, layer: PlainImage['layers'][number], diffId: string): Job {
  return { image: formatReference(repo), layerDigest: layer.digest, layerSize: layer.size, diffId, started: Date.now(), result: Promise.resolve() as unknown as Promise<Built>, timer: null, recorded: null };
}

/**
 * Plain layers fetched by the snapshotter itself (registry.fetch_layers):
 * when a Prepare carries the CRI labels (CRI pulls; containerd 2.x's
 * transfer service with the plugin's enable_remote_snapshot_annotations
 * export) and they name a layer of a plain image, the blob is read from the
 * registry, decompressed, and its tar goes straight into the EROFS writer,
 * file data stored once as it streams (as the differ's Apply does). The
 * first Prepare of an image starts every layer above it that the node
 * lacks, `concurrency` at a time, so the layers convert in parallel while
 * containerd asks for them one by one; each Prepare waits for its own layer,
 * records it as the committed snapshot containerd named and answers
 * AlreadyExists: containerd neither downloads nor unpacks the layer.
 *
 * Anything unexpected (registry unreachable, 401/403 with the node's
 * credentials, labels that disagree with the image, a media type not read
 * here) leaves the layer to containerd: importFor returns false and the
 * Prepare goes on as usual. A layer whose tar does not hash to the diff id
 * its image config names is refused the same way (containerd's unpacker
 * makes the same check).
 */
export class PlainLayerFetcher {
  /** Layers being (or done being) converted ahead, by the chain id they become. */
  private readonly jobs = new Map<string, Job>();
  /** Diff ids of image configs (by registry, repository and config digest). */
  private readonly diffIds = new Map<string, Promise<string[]>>();
  private closed = false;
  private readonly limiter: Limiter;

  constructor(private readonly o: PlainFetchOptions) {
    this.limiter = new Limiter(Math.max(1, o.concurrency ?? DEFAULT_FETCH_CONCURRENCY));
  }

  /**
   * When `labels` name a layer of a plain image whose registry serves it:
   * makes that layer as committed snapshot `labels[snapshot.ref]` on
   * `parent` and returns true; false when containerd should fetch and
   * unpack it itself.
   */
  async importFor(labels: Labels, parent: string, key: string): Promise<boolean> {
    const ref = labels[LABEL_SNAPSHOT_REF];
    const pl = this.o.remote.plainLayer(labels);
    // The layer is named like containerd's own keys, in the namespace of the pull (fsck and doctor read it there).
    const ns = splitKey(key)?.ns;
    if (this.closed || !ref || !pl || ns === undefined) return false;
    const image = formatReference(pl.repo);
    let diffIds: string[];
    try {
      diffIds = await this.diffIdsOf(pl.repo, pl.image);
    } catch (err) {
      this.o.logger.warn({ op: 'fetch', key: ref, image, err: (err as Error).message }, `cannot read the config of ${image}: containerd fetches and unpacks its layers`);
      return false;
    }
    const chains = chainIds(diffIds);
    const index = pl.image.layers.findIndex((l, i) => l.digest === pl.layerDigest && chains[i] === ref);
    // Labels that do not match the image's own chain: containerd's path.
    if (index < 0) return false;
    const have = this.committedRefs();
    // Made already (by another pull, in any namespace) on the same parent: containerd finds it by its label and parent.
    const existing = have.get(ref)?.get(parent);
    if (existing !== undefined) {
      // Quarantined on lost or damaged chunks (the node's copy; say an image removed without --sync and pulled again
      // before containerd's collector ran): its blob read again heals them, and the layer is served again.
      const q = this.o.ms.quarantineOf(existing);
      if (q && CHUNKS_REASON.test(q.reason)) await this.heal(pl.repo, pl.image.layers[index], ref, diffIds[index], existing, q.reason);
      return true;
    }
    for (let i = index; i < chains.length; i++) if (!have.has(chains[i])) this.start(pl.repo, pl.image.layers[i], chains[i], diffIds[i]);
    if (!this.jobs.has(ref)) return false;
    const job = this.jobs.get(ref) as Job;
    if (job.recorded) {
      // Another pull (another namespace) records this layer: it is used from there if it ends on the same parent.
      await job.recorded;
      return this.committedRefs().get(ref)?.has(parent) ?? false;
    }
    job.recorded = this.record(job, `${ns}/0/${ref}`, ref, parent, labels);
    return job.recorded;
  }

  /** The chain ids (snapshot.ref labels) of committed snapshots, each with the parents it is committed on (and the snapshot's id there). */
  private committedRefs(): Map<string, Map<string, string>> {
    const out = new Map<string, Map<string, string>>();
    this.o.ms.walkInfo((info, id) => {
      const ref = info.labels[LABEL_SNAPSHOT_REF];
      if (info.kind !== Kind.Committed || !ref) return;
      const parents = out.get(ref) ?? new Map<string, string>();
      parents.set(info.parent, id);
      out.set(ref, parents);
    });
    return out;
  }

  /** Reads layer `ref`'s blob again to heal the damaged chunks of committed snapshot `id` (quarantined for `reason`); one line either way. */
  private async heal(repo: Reference, layer: PlainImage['layers'][number], ref: string, diffId: string, id: string, reason: string): Promise<void> {
    const job = newJob(repo, layer, diffId);
    const image = job.image;
    const fields = { op: 'fetch', key: ref, snapshot: id, layer: id, image, layer_digest: layer.digest };
    try {
      const built = await this.limiter.run(() => this.build(repo, ref, job, `layer ${id} is quarantined (${reason})`));
      const healed = await healFromSink(this.o.store, built.sink);
      // The store's onChunkHealth settles the quarantines on the next turn.
      await new Promise((resolve) => setImmediate(resolve));
      const still = this.o.ms.quarantineOf(id);
      this.o.logger.info(
        { ...fields, healed_chunks: healed, duration_ms: Date.now() - job.started },
        `layer ${id} read again from ${image}: ${healed} damaged chunks healed; ${still ? `still quarantined (${still.reason})` : 'served again'}`,
      );
    } catch (err) {
      this.o.logger.warn({ ...fields, err: (err as Error).message }, `layer ${id} is quarantined (${reason}) and reading it again from ${image} failed: ${(err as Error).message}`);
    }
  }

  /**
   * Stops: later Prepares take containerd's path. Layers converted ahead are
   * forgotten; their provisional chunks are no row's, and the next start
   * punches them out (chunk-sink.ts).
   */
  close(): void {
    this.closed = true;
    for (const job of this.jobs.values()) if (job.timer) clearTimeout(job.timer);
    this.jobs.clear();
  }

  /** The image config's diff ids, one per layer of `image` (fetched once per config). */
  private diffIdsOf(repo: Reference, image: PlainImage): Promise<string[]> {
    const key = `${repo.host}\0${repo.repository}\0${image.config}`;
    let known = this.diffIds.get(key);
    if (!known) {
      known = this.o.remote.client.getBlob(repo, image.config, { maxBytes: MAX_CONFIG_BYTES }).then((bytes) => {
        const doc = JSON.parse(bytes.toString('utf8')) as { rootfs?: { diff_ids?: unknown } };
        const ids = doc?.rootfs?.diff_ids;
        if (!Array.isArray(ids) || ids.length !== image.layers.length || !ids.every((d) => typeof d === 'string' && SHA256_DIGEST.test(d))) {
          throw new Error(`config ${image.config} does not list one sha256 diff id per layer (${image.layers.length})`);
        }
        return ids as string[];
      });
      known.catch(() => this.diffIds.delete(key));
      if (this.diffIds.size >= MAX_CACHED_CONFIGS) this.diffIds.delete(this.diffIds.keys().next().value as string);
      this.diffIds.set(key, known);
    }
    return known;
  }

  /** Starts converting a layer ahead (queued behind `concurrency` others) unless it is being converted or the node has it. */
  private start(repo: Reference, layer: PlainImage['layers'][number], chainId: string, diffId: string): void {
    if (this.jobs.has(chainId) || !LAYER_MEDIA_TYPES.has(layer.mediaType)) return;
    const job = newJob(repo, layer, diffId);
    job.result = this.limiter.run(() => this.build(repo, chainId, job));
    // Claimed by a Prepare soon, or dropped.
    const unclaimed = () => {
      if (this.jobs.get(chainId) === job) job.timer = setTimeout(() => void this.drop(chainId), UNCLAIMED_MS).unref();
    };
    job.result.then(unclaimed, unclaimed);
    this.jobs.set(chainId, job);
  }

  /** Reads `job`'s layer from the registry into a tree, its new chunks into the store (provisionally), and checks its diff id. */
  private async build(repo: Reference, chainId: string, job: Job, healing: string | null = null): Promise<Built> {
    if (this.closed) throw new Error('the snapshotter is shutting down');
    const { layerDigest: digest, diffId } = job;
    job.started = Date.now();
    this.o.logger.info(
      { op: 'fetch', key: chainId, image: job.image, layer_digest: digest },
      healing ? `fetching layer ${digest} of ${job.image} from its registry again: ${healing}` : `fetching layer ${digest} of ${job.image} from its registry, auto-converting to EROFS in one pass`,
    );
    // Not hashed as it comes: the diff id check below covers every byte used (the config naming it is digest-checked).
    const blob = await this.o.remote.client.getBlobStream(repo, digest, { size: job.layerSize, contentCheckedByCaller: true });
    const sink = new StoreChunkSink(this.o.store, this.o.chunkSize);
    const warn = (m: string) => this.o.logger.warn({ op: 'fetch', key: chainId, image: job.image, layer_digest: digest }, m);
    const { root, diffId: got } = await treeFromLayerBlob(blob.stream, digest, sink, warn);
    try {
      blob.verify();
      if (got !== diffId) throw new Error(`its tar hashes to ${got}, the image config names ${diffId}`);
    } catch (err) {
      await sink.discard();
      throw err;
    }
    return { root, sink, fetchMs: Date.now() - job.started };
  }

  /** Layer `chainId` converted ahead and never claimed: its chunks are discarded. */
  private async drop(chainId: string): Promise<void> {
    const job = this.jobs.get(chainId);
    if (!job) return;
    this.jobs.delete(chainId);
    if (job.timer) clearTimeout(job.timer);
    const built = await job.result.catch(() => null);
    await built?.sink.discard();
  }

  /** Waits for layer `ref`'s conversion and records it as committed snapshot `name` on `parent`; false: containerd's path. */
  private async record(job: Job, name: string, ref: string, parent: string, labels: Labels): Promise<boolean> {
    const { ms, converter, conversion, logger: log } = this.o;
    let built: Built;
    try {
      built = await job.result;
    } catch (err) {
      return this.fellBack(job, ref, err as Error);
    } finally {
      if (job.timer) clearTimeout(job.timer);
      if (this.jobs.get(ref) === job) this.jobs.delete(ref);
    }
    const tmpKey = `${REMOTE_IMPORT_PREFIX}${crypto.randomBytes(8).toString('hex')}`;
    let created = false;
    try {
      await this.o.snapshots.createActive(tmpKey, parent);
      created = true;
      const id = ms.getInfo(tmpKey).id;
      const stats: ConvertStats = await converter.importTree(id, built.root, built.sink, built.fetchMs, (layer) =>
        conversion.mountAndRecord(id, job.started, () => ms.commitActive(tmpKey, name, { size: layer.stats.logicalBytes, inodes: layer.stats.files }, labels))(layer),
      );
      created = false;
      await removeAll(this.o.layout.snapshotDir(id));
      const durationMs = Date.now() - job.started;
      log.info(
        { op: 'fetch', key: ref, snapshot: id, layer: id, image: job.image, layer_digest: job.layerDigest, diff_id: job.diffId, ...convertedFields(stats), fetch_ms: built.fetchMs, duration_ms: durationMs },
        `converted layer ${id} to EROFS from its registry blob ${job.layerDigest}: ${convertedSummary(stats)}`,
      );
      this.o.events.emit({ key: ref, layer: id, ok: true, durationMs, stats, mode: 'fetch' });
      return true;
    } catch (err) {
      await built.sink.discard().catch(() => undefined);
      return this.fellBack(job, ref, err as Error);
    } finally {
      if (created) await this.o.snapshots.remove(tmpKey).catch(() => undefined);
    }
  }

  /** The layer goes to containerd: one WARN line, and false for the Prepare. */
  private fellBack(job: Job, ref: string, err: Error): false {
    this.o.logger.warn(
      { op: 'fetch', key: ref, image: job.image, layer_digest: job.layerDigest, err: err.message },
      `auto-convert of layer ${job.layerDigest} (${job.image}) from its registry failed: ${err.message}; containerd fetches and unpacks it`,
    );
    return false;
  }
}
