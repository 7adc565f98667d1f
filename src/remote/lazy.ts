import crypto from 'node:crypto';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { type ChunkEntry, type LayerHeader, MEDIA_TYPE_LAYER, decodeLayerBlob } from './dedup-image';
import { type Reference, parseReference } from './reference';
import type { RegistryClient } from './registry';

/**
 * Remote (lazy) layers: containerd's CRI unpacker passes, on each layer's
 * Prepare, the labels below (ARCHITECTURE.md §3). When they name a layer of
 * a dedup image, the snapshotter can make the layer from its metadata and
 * the chunks it lacks, and answer AlreadyExists so containerd downloads
 * nothing. Plain OCI images are not remote layers: containerd unpacks them.
 */
export const LABEL_SNAPSHOT_REF = 'containerd.io/snapshot.ref';
export const LABEL_CRI_IMAGE_REF = 'containerd.io/snapshot/cri.image-ref';
export const LABEL_CRI_LAYER_DIGEST = 'containerd.io/snapshot/cri.layer-digest';
export const LABEL_CRI_MANIFEST_DIGEST = 'containerd.io/snapshot/cri.manifest-digest';

export interface RemoteLayer {
  /** The image's repository (from cri.image-ref). */
  repo: Reference;
  manifestDigest: string;
  layerDigest: string;
}

const DIGEST = /^sha256:[0-9a-f]{64}$/;
const MAX_LAYER_BLOB = 512 << 20;
const UNREADABLE_TTL_MS = 60_000;

export class RemoteLayers {
  private readonly log: Logger;
  /** manifest digest → the dedup layer digests it lists (empty: not a dedup image). */
  private readonly manifests = new Map<string, Set<string>>();
  /** manifest digest → until when its registry is not asked again. */
  private readonly unreadable = new Map<string, number>();
  readonly counters = { layers: 0, chunks_fetched: 0, bytes_fetched: 0, chunks_local: 0, bytes_local: 0, metadata_bytes: 0, fetch_errors: 0 };

  constructor(private readonly o: { client: RegistryClient; logger?: Logger }) {
    this.log = o.logger ?? silentLogger();
  }

  /**
   * The dedup layer `labels` name, or null: labels absent or malformed, the
   * image is not a dedup image, or its registry cannot be read (then the
   * normal path is taken and containerd unpacks the layer; logged).
   */
  async resolve(labels: Record<string, string> | undefined): Promise<RemoteLayer | null> {
    const ref = labels?.[LABEL_CRI_IMAGE_REF];
    const manifestDigest = labels?.[LABEL_CRI_MANIFEST_DIGEST];
    const layerDigest = labels?.[LABEL_CRI_LAYER_DIGEST];
    if (!labels?.[LABEL_SNAPSHOT_REF] || !ref || !manifestDigest || !layerDigest) return null;
    if (!DIGEST.test(manifestDigest) || !DIGEST.test(layerDigest)) return null;
    let repo: Reference;
    try {
      repo = parseReference(ref);
    } catch {
      return null;
    }
    let layers = this.manifests.get(manifestDigest);
    if (!layers) {
      // An image whose registry could not be read is taken for a plain one
      // for a minute: its other layers do not wait for the retries again.
      if ((this.unreadable.get(manifestDigest) ?? 0) > Date.now()) return null;
      try {
        const m = await this.o.client.getManifest({ ...repo, tag: null, digest: manifestDigest } as Reference);
        const json = m.json as { layers?: { mediaType?: string; digest?: string }[] };
        layers = new Set((json.layers ?? []).filter((l) => l.mediaType === MEDIA_TYPE_LAYER && typeof l.digest === 'string').map((l) => l.digest as string));
        this.manifests.set(manifestDigest, layers);
      } catch (err) {
        this.unreadable.set(manifestDigest, Date.now() + UNREADABLE_TTL_MS);
        this.log.warn({ op: 'remote', image: ref, err: (err as Error).message }, `cannot read the manifest of ${ref}; containerd unpacks its layers`);
        return null;
      }
    }
    return layers.has(layerDigest) ? { repo, manifestDigest, layerDigest } : null;
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
