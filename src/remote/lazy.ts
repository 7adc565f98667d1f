import crypto from 'node:crypto';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { ANNOTATION_SOURCE_LAYER, type ChunkEntry, type LayerHeader, MEDIA_TYPE_CONVERTED_CONFIG, MEDIA_TYPE_LAYER, MEDIA_TYPE_OCI_MANIFEST, SHA256_DIGEST, convertedLayerTag, decodeLayerBlob } from './dedup-image';
import { type Reference, parseReference } from './reference';
import type { RegistryClient } from './registry';

/**
 * Remote (lazy) layers: containerd's CRI unpacker passes, on each layer's
 * Prepare, the labels below (2.x transfer too, with the proxy plugin's
 * enable_remote_snapshot_annotations export). When they name a layer of
 * a dedup image, the snapshotter can make the layer from its metadata and
 * the chunks it lacks, and answer AlreadyExists so containerd downloads
 * nothing. Layers of plain OCI images are not remote layers (containerd
 * unpacks them) unless another node shared the layer converted
 * (registry.pull_converted; convert/share.ts).
 */
export const LABEL_SNAPSHOT_REF = 'containerd.io/snapshot.ref';
export const LABEL_CRI_IMAGE_REF = 'containerd.io/snapshot/cri.image-ref';
export const LABEL_CRI_LAYER_DIGEST = 'containerd.io/snapshot/cri.layer-digest';
export const LABEL_CRI_MANIFEST_DIGEST = 'containerd.io/snapshot/cri.manifest-digest';

/**
 * The image (cri.image-ref), its manifest and the layer that containerd's
 * CRI snapshot labels name, or null when they are absent or malformed.
 */
export function criLayerOf(labels: Record<string, string> | undefined): { repo: Reference; manifestDigest: string; layerDigest: string } | null {
  const ref = labels?.[LABEL_CRI_IMAGE_REF];
  const manifestDigest = labels?.[LABEL_CRI_MANIFEST_DIGEST];
  const layerDigest = labels?.[LABEL_CRI_LAYER_DIGEST];
  if (!ref || !manifestDigest || !layerDigest || !SHA256_DIGEST.test(manifestDigest) || !SHA256_DIGEST.test(layerDigest)) return null;
  try {
    return { repo: parseReference(ref), manifestDigest, layerDigest };
  } catch {
    return null;
  }
}

export interface RemoteLayer {
  /** The image's repository (from cri.image-ref). */
  repo: Reference;
  manifestDigest: string;
  /** The dedup layer blob's digest. */
  layerDigest: string;
  /** When the image is a plain one: the plain layer a shared converted layer stands for (registry.pull_converted). */
  sourceLayer?: string;
}

/** A plain (OCI or Docker) image's manifest: its config and layers, in order. */
export interface PlainImage {
  config: string;
  layers: { digest: string; mediaType: string; size: number }[];
}

const MAX_LAYER_BLOB = 512 << 20;
const UNREADABLE_TTL_MS = 60_000;
const MAX_CONVERTED_ANSWERS = 4096;

export class RemoteLayers {
  private readonly log: Logger;
  /** manifest digest → the layer digests it lists, which of them are dedup layers, and (none: a plain image) its config and layers. */
  private readonly manifests = new Map<string, { dedup: Set<string>; all: Set<string>; plain: PlainImage | null }>();
  /** `repo\0layer digest` → the shared converted dedup layer's digest (null: none), until when that answer holds. */
  private readonly converted = new Map<string, { digest: string | null; until: number }>();
  /** manifest digest → until when its registry is not asked again. */
  private readonly unreadable = new Map<string, number>();
  readonly counters = { layers: 0, chunks_fetched: 0, bytes_fetched: 0, chunks_local: 0, bytes_local: 0, metadata_bytes: 0, fetch_errors: 0, /** layers made from a layer another node shared converted */ converted_layers: 0 };

  constructor(private readonly o: { client: RegistryClient; logger?: Logger; pullConverted?: boolean }) {
    this.log = o.logger ?? silentLogger();
  }

  get client(): RegistryClient {
    return this.o.client;
  }

  /**
   * The dedup layer `labels` name, or null: labels absent or malformed, the
   * image is not a dedup image (and no converted layer was shared for this
   * one), or its registry cannot be read (then the normal path is taken and
   * containerd unpacks the layer; logged).
   */
  async resolve(labels: Record<string, string> | undefined): Promise<RemoteLayer | null> {
    const cri = labels?.[LABEL_SNAPSHOT_REF] ? criLayerOf(labels) : null;
    if (!cri) return null;
    const { repo, manifestDigest, layerDigest } = cri;
    const ref = (labels as Record<string, string>)[LABEL_CRI_IMAGE_REF];
    let layers = this.manifests.get(manifestDigest);
    if (!layers) {
      // An image whose registry could not be read is taken for a plain one
      // for a minute: its other layers do not wait for the retries again.
      if ((this.unreadable.get(manifestDigest) ?? 0) > Date.now()) return null;
      try {
        const m = await this.o.client.getManifest({ ...repo, tag: null, digest: manifestDigest } as Reference);
        const json = m.json as { config?: { digest?: unknown }; layers?: { mediaType?: string; digest?: string; size?: unknown }[] };
        const listed = (json.layers ?? []).filter((l) => typeof l.digest === 'string');
        const dedup = new Set(listed.filter((l) => l.mediaType === MEDIA_TYPE_LAYER).map((l) => l.digest as string));
        layers = { dedup, all: new Set(listed.map((l) => l.digest as string)), plain: dedup.size === 0 ? plainImageOf(json) : null };
        this.manifests.set(manifestDigest, layers);
      } catch (err) {
        this.unreadable.set(manifestDigest, Date.now() + UNREADABLE_TTL_MS);
        this.log.warn({ op: 'remote', image: ref, err: (err as Error).message }, `cannot read the manifest of ${ref}; containerd unpacks its layers`);
        return null;
      }
    }
    if (layers.dedup.has(layerDigest)) return { repo, manifestDigest, layerDigest };
    if (this.o.pullConverted && layers.all.has(layerDigest)) {
      const converted = await this.convertedLayer(repo, layerDigest);
      if (converted) return { repo, manifestDigest, layerDigest: converted, sourceLayer: layerDigest };
    }
    return null;
  }

  /**
   * The plain image `labels` name and the layer of it they name, when
   * resolve found its manifest to be a plain image (call resolve first);
   * else null.
   */
  plainLayer(labels: Record<string, string> | undefined): { repo: Reference; manifestDigest: string; layerDigest: string; image: PlainImage } | null {
    const cri = labels?.[LABEL_SNAPSHOT_REF] ? criLayerOf(labels) : null;
    const image = cri ? this.manifests.get(cri.manifestDigest)?.plain : null;
    if (!cri || !image || !image.layers.some((l) => l.digest === cri.layerDigest)) return null;
    return { ...cri, image };
  }

  /**
   * registry.pull_converted: the dedup layer another node pushed for plain
   * layer `layerDigest` (tag convertedLayerTag, see convert/share.ts), or
   * null. Answers (found or not) are kept for a minute.
   */
  private async convertedLayer(repo: Reference, layerDigest: string): Promise<string | null> {
    const key = `${repo.name}\0${layerDigest}`;
    const known = this.converted.get(key);
    if (known && known.until > Date.now()) return known.digest;
    const tag = convertedLayerTag(layerDigest);
    let digest: string | null = null;
    try {
      const m = await this.o.client.getManifest({ ...repo, tag, digest: null }, [MEDIA_TYPE_OCI_MANIFEST]);
      const json = m.json as { config?: { mediaType?: string }; layers?: { mediaType?: string; digest?: string }[]; annotations?: Record<string, string> };
      const layer = json.layers?.[0];
      if (json.config?.mediaType !== MEDIA_TYPE_CONVERTED_CONFIG || json.annotations?.[ANNOTATION_SOURCE_LAYER] !== layerDigest || layer?.mediaType !== MEDIA_TYPE_LAYER || !SHA256_DIGEST.test(layer.digest ?? '')) {
        this.log.warn({ op: 'remote', image: repo.name, layer_digest: layerDigest, tag }, `${repo.name}:${tag} is not a converted layer of ${layerDigest}; containerd unpacks the layer`);
      } else {
        digest = layer.digest as string;
      }
    } catch (err) {
      if ((err as { status?: number }).status !== 404) {
        this.log.warn({ op: 'remote', image: repo.name, layer_digest: layerDigest, tag, err: (err as Error).message }, `cannot look up ${repo.name}:${tag}; containerd unpacks the layer`);
      }
    }
    if (this.converted.size >= MAX_CONVERTED_ANSWERS) this.converted.delete(this.converted.keys().next().value as string);
    this.converted.set(key, { digest, until: Date.now() + UNREADABLE_TTL_MS });
    if (digest) {
      this.log.debug({ op: 'remote', image: repo.name, layer_digest: layerDigest, tag, dedup_layer: digest }, `layer ${layerDigest} was shared converted as ${repo.name}:${tag}`);
    }
    return digest;
  }

  /** The layer's header and EROFS image (digest-checked by the client, format-checked here). */
  async fetchLayer(l: RemoteLayer): Promise<{ header: LayerHeader; erofs: Buffer }> {
    const blob = await this.o.client.getBlob(l.repo, l.layerDigest, { maxBytes: MAX_LAYER_BLOB });
    this.counters.metadata_bytes += blob.length;
    return decodeLayerBlob(blob);
  }

  /** One chunk's bytes by Range from its data blob, checked against its digest. */
  async fetchChunk(l: RemoteLayer, header: LayerHeader, entry: ChunkEntry): Promise<Buffer> {
    return (await this.fetchRun(l, header, [entry]))[0];
  }

  /**
   * Chunks stored back to back in one data blob (see runsOf), with one Range
   * request; each checked against its digest.
   */
  async fetchRun(l: RemoteLayer, header: LayerHeader, run: ChunkEntry[]): Promise<Buffer[]> {
    const blob = header.data_blobs[run[0][3]];
    const start = run[0][4];
    const last = run[run.length - 1];
    const end = last[4] + last[1] * 4096;
    try {
      const bytes = await this.o.client.getBlobRange(l.repo, blob, start, end - start);
      const out = run.map(([, nblocks, hex, , offset]) => {
        const b = bytes.subarray(offset - start, offset - start + nblocks * 4096);
        const got = crypto.createHash('sha256').update(b).digest('hex');
        if (got !== hex) throw new Error(`chunk sha256:${hex} from ${blob}@${offset}: content has sha256:${got}`);
        return b;
      });
      this.counters.chunks_fetched += run.length;
      this.counters.bytes_fetched += bytes.length;
      return out;
    } catch (err) {
      this.counters.fetch_errors++;
      throw err;
    }
  }
}

/** The config and layers of a plain image's manifest, or null when any of them is malformed. */
function plainImageOf(json: { config?: { digest?: unknown }; layers?: { mediaType?: string; digest?: string; size?: unknown }[] }): PlainImage | null {
  const config = json.config?.digest;
  if (typeof config !== 'string' || !SHA256_DIGEST.test(config) || !Array.isArray(json.layers)) return null;
  const layers: PlainImage['layers'] = [];
  for (const l of json.layers) {
    if (typeof l?.digest !== 'string' || !SHA256_DIGEST.test(l.digest) || typeof l.mediaType !== 'string' || typeof l.size !== 'number' || !Number.isSafeInteger(l.size) || l.size < 0) return null;
    layers.push({ digest: l.digest, mediaType: l.mediaType, size: l.size });
  }
  return { config, layers };
}

/**
 * Groups chunk entries into runs a single Range request can fetch: same
 * data blob, each starting where the previous ended, at most `maxBytes`.
 * The converter stores a layer's new chunks back to back in blob order, so a
 * layer's missing chunks are usually a few long runs.
 */
export function runsOf(entries: ChunkEntry[], maxBytes = 8 << 20): ChunkEntry[][] {
  const sorted = [...entries].sort((a, b) => a[3] - b[3] || a[4] - b[4]);
  const runs: ChunkEntry[][] = [];
  let cur: ChunkEntry[] = [];
  let bytes = 0;
  for (const e of sorted) {
    const prev = cur[cur.length - 1];
    const len = e[1] * 4096;
    if (prev && prev[3] === e[3] && prev[4] + prev[1] * 4096 === e[4] && bytes + len <= maxBytes) {
      cur.push(e);
      bytes += len;
    } else {
      if (cur.length > 0) runs.push(cur);
      cur = [e];
      bytes = len;
    }
  }
  if (cur.length > 0) runs.push(cur);
  return runs;
}
