import fsp from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import {
  ANNOTATION_SOURCE_LAYER,
  ANNOTATION_SOURCE_DIFF_ID,
  type ConvertedConfig,
  FORMAT_VERSION,
  MEDIA_TYPE_CHUNKS,
  MEDIA_TYPE_CONVERTED_CONFIG,
  MEDIA_TYPE_LAYER,
  MEDIA_TYPE_OCI_MANIFEST,
  SHA256_DIGEST,
  convertedLayerTag,
} from '../remote/dedup-image';
import { criLayerOf } from '../remote/lazy';
import { type Reference, type RepositoryName, formatReference } from '../remote/reference';
import type { PushBlobResult, RegistryClient } from '../remote/registry';
import { DedupImageBuilder, type DedupLayer, type StoredLayerSource } from './dedup-layer';
import { type Descriptor, MANIFEST_TYPES, pushOciManifest } from './image-convert';

/**
 * registry.push_converted: a layer of a plain image this node converted
 * (from its directory, its tar through dedup-differ, or its registry blob)
 * is pushed back to the image's repository as a dedup layer, tagged
 * `sha256-<source layer hex>.dedup` (remote/dedup-image.ts), so the next
 * node pulling the image with registry.pull_converted makes that layer
 * lazily instead of downloading and unpacking it.
 *
 * Only layers pulled through containerd's CRI (whose snapshot labels carry
 * the image reference, manifest and layer digest) can be shared: a plain
 * `ctr image pull` names no image. Work is one layer at a time, after the
 * layer is recorded, off every containerd request: the layer's image as
 * stored is pointed at a layer-local chunk space and its chunks are read
 * back from the store, each checked against its digest (see
 * DedupImageBuilder.addStoredLayer), then uploaded. A push that fails is
 * logged and dropped; the layer itself is unaffected.
 */

export interface ShareJob {
  /** Snapshot id of the converted layer (for logs). */
  id: string;
  labels: Record<string, string>;
  /** The layer as the store holds it, read when the push starts. */
  source: () => Promise<StoredLayerSource>;
  /** Whether the layer still exists: a build that finished while it did read the layer whole. */
  alive: () => boolean;
}

export interface ShareCounters {
  pushed: number;
  /** Layers whose converted form the repository had already. */
  present: number;
  failed: number;
  /** Bytes uploaded (metadata and chunk data; blobs the registry had are not counted). */
  bytes: number;
}


/** Source images whose layers are remembered (manifest digest → layer digest → diff id). */
const MAX_IMAGES = 64;

export class ConvertedLayerPusher {
  private readonly log: Logger;
  private readonly queue: ShareJob[] = [];
  private running: Promise<void> | null = null;
  private closed = false;
  private readonly diffIds = new Map<string, Map<string, string>>();
  readonly counters: ShareCounters = { pushed: 0, present: 0, failed: 0, bytes: 0 };

  constructor(
    private readonly o: { client: RegistryClient; chunkSize: number; workDir: string; logger?: Logger },
  ) {
    this.log = o.logger ?? silentLogger();
  }

  /** Queues a converted layer; returns false when its labels name no image layer (or the pusher is closed). */
  offer(job: ShareJob): boolean {
    if (this.closed || !criLayerOf(job.labels)) return false;
    this.queue.push(job);
    this.running ??= this.drain().finally(() => (this.running = null));
    return true;
  }

  /** Resolves when the queue is empty (tests, shutdown). */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  /** Stops taking jobs; queued ones are dropped unpushed. */
  close(): void {
    this.closed = true;
    this.queue.splice(0);
  }

  get pending(): number {
    return this.queue.length + (this.running ? 1 : 0);
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0 && !this.closed) {
      const job = this.queue.shift() as ShareJob;
      const src = criLayerOf(job.labels) as NonNullable<ReturnType<typeof criLayerOf>>;
      const fields = { op: 'push', layer: job.id, snapshot: job.id, image: src.repo.name, layer_digest: src.layerDigest };
      const started = Date.now();
      try {
        const r = await this.push(job, src);
        if (r === 'present') {
          this.counters.present++;
          this.log.debug({ ...fields, tag: convertedLayerTag(src.layerDigest) }, `converted layer ${src.layerDigest} is in ${src.repo.name} already`);
        } else if (r === 'removed') {
          this.log.info(fields, `layer ${job.id} was removed before it was shared; nothing pushed`);
        } else {
          this.counters.pushed++;
          this.counters.bytes += r.bytes;
          this.log.info(
            { ...fields, tag: r.tag, dedup_layer: r.digest, uploaded_bytes: r.bytes, duration_ms: Date.now() - started },
            `shared converted layer ${job.id} as ${r.tag}: ${r.bytes} bytes uploaded`,
          );
        }
      } catch (err) {
        this.counters.failed++;
        this.log.warn({ ...fields, err: (err as Error).message }, `cannot share converted layer ${job.id}: ${(err as Error).message}`);
      }
    }
  }

  /** The diff id of `layerDigest` in the image `manifestDigest` names (config's rootfs.diff_ids), remembered per image. */
  private async diffIdOf(repo: RepositoryName, manifestDigest: string, layerDigest: string): Promise<string> {
    let layers = this.diffIds.get(manifestDigest);
    if (!layers) {
      const m = await this.o.client.getManifest({ ...repo, tag: null, digest: manifestDigest });
      if (!MANIFEST_TYPES.has(m.mediaType)) throw new Error(`${repo.name}@${manifestDigest} is a ${m.mediaType}, not an image manifest`);
      const json = m.json as { config?: { digest?: string }; layers?: { digest?: string }[] };
      const configDigest = json.config?.digest;
      if (typeof configDigest !== 'string' || !SHA256_DIGEST.test(configDigest)) throw new Error(`${repo.name}@${manifestDigest}: no config digest`);
      const config = JSON.parse((await this.o.client.getBlob(repo, configDigest, { maxBytes: 16 << 20 })).toString('utf8')) as { rootfs?: { diff_ids?: unknown[] } };
      const ids = config.rootfs?.diff_ids ?? [];
      const digests = json.layers ?? [];
      if (ids.length !== digests.length) throw new Error(`${repo.name}@${manifestDigest}: ${digests.length} layers but ${ids.length} diff ids`);
      layers = new Map();
      for (const [i, l] of digests.entries()) {
        const id = ids[i];
        if (typeof l.digest === 'string' && typeof id === 'string' && SHA256_DIGEST.test(id)) layers.set(l.digest, id);
      }
      if (this.diffIds.size >= MAX_IMAGES) this.diffIds.delete(this.diffIds.keys().next().value as string);
      this.diffIds.set(manifestDigest, layers);
    }
    const id = layers.get(layerDigest);
    if (!id) throw new Error(`${repo.name}@${manifestDigest} has no layer ${layerDigest}`);
    return id;
  }

  private async push(
    job: ShareJob,
    src: { repo: RepositoryName; manifestDigest: string; layerDigest: string },
  ): Promise<'present' | 'removed' | { tag: string; digest: string; bytes: number }> {
    const tag = convertedLayerTag(src.layerDigest);
    const dst: Reference = { ...src.repo, tag, digest: null };
    let work: string | null = null;
    try {
      if (await this.exists(dst)) return 'present';
      const diffId = await this.diffIdOf(src.repo, src.manifestDigest, src.layerDigest);
      await fsp.mkdir(this.o.workDir, { recursive: true, mode: 0o700 });
      work = await fsp.mkdtemp(path.join(this.o.workDir, 'push-'));
      let built: DedupLayer;
      try {
        built = await new DedupImageBuilder({ chunkSize: this.o.chunkSize, workDir: work }).addStoredLayer(await job.source(), diffId);
      } catch (err) {
        // Its image or chunks went with it.
        if (!job.alive()) return 'removed';
        throw err;
      }
      // Removal deletes the row before the image and the chunks: a layer alive now was whole while it was read.
      if (!job.alive()) return 'removed';

      let bytes = 0;
      const count = (r: PushBlobResult, size: number) => {
        if (r === 'uploaded') bytes += size;
      };
      const layers: Descriptor[] = [{ mediaType: MEDIA_TYPE_LAYER, digest: built.digest, size: built.blob.length, annotations: { [ANNOTATION_SOURCE_DIFF_ID]: diffId } }];
      if (built.data) {
        count(await this.o.client.pushBlob(src.repo, built.data.digest, built.data.path), built.data.size);
        layers.push({ mediaType: MEDIA_TYPE_CHUNKS, digest: built.data.digest, size: built.data.size });
      }
      count(await this.o.client.pushBlob(src.repo, built.digest, built.blob), built.blob.length);
      const cfg: ConvertedConfig = { format: FORMAT_VERSION, source_layer: src.layerDigest, source_diff_id: diffId };
      const m = await pushOciManifest(this.o.client, dst, Buffer.from(JSON.stringify(cfg)), MEDIA_TYPE_CONVERTED_CONFIG, layers, { [ANNOTATION_SOURCE_LAYER]: src.layerDigest });
      return { tag: formatReference(dst), digest: built.digest, bytes: bytes + m.uploaded };
    } finally {
      if (work) await fsp.rm(work, { recursive: true, force: true });
    }
  }

  /** Whether the repository has `ref`'s tag (a 404 is no; other failures throw). */
  private async exists(ref: Reference): Promise<boolean> {
    try {
      await this.o.client.getManifest(ref, [MEDIA_TYPE_OCI_MANIFEST]);
      return true;
    } catch (err) {
      if ((err as { status?: number }).status === 404) return false;
      throw err;
    }
  }
}
