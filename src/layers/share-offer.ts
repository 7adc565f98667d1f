import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import type { StoredLayerSource } from '../convert/dedup-layer';
import type { ConvertedLayerPusher } from '../convert/share';
import { type ChunkStore, segmentTag } from '../store/chunkstore';
import type { MetaStore } from '../store/metastore';
import type { RootLayout } from '../store/root-layout';
import type { ConvertEvent } from './events';

/**
 * Conversions offered when they end: their layer's chunks are all in this
 * node's store (a remote layer's need not be, and came from a dedup image
 * anyway) and its diff id was checked (by containerd before Commit, by the
 * fetch itself). A layer dedup-differ applied is offered at its Commit,
 * once containerd compared the diff id Apply returned with the image's.
 */
const SHARED_MODES: ReadonlySet<ConvertEvent['mode']> = new Set(['background', 'sync', 'fetch']);

export interface ShareParts {
  share: ConvertedLayerPusher;
  ms: MetaStore;
  store: ChunkStore;
  layout: RootLayout;
}

/**
 * registry.push_converted: offers a layer this node has just converted,
 * whichever way (its directory, its tar, its registry blob), to the pusher
 * with its snapshot's labels (a CRI pull's name the image and the layer).
 * False when nothing is offered.
 */
export function offerConverted(o: ShareParts, e: ConvertEvent): boolean {
  return e.ok && SHARED_MODES.has(e.mode) && offerLayer(o, e.layer);
}

/** Offers recorded layer `id` to the pusher (see offerConverted). */
export function offerLayer(o: ShareParts, id: string): boolean {
  const key = o.ms.keyOf(id);
  if (key === undefined) return false;
  return o.share.offer({
    id,
    labels: o.ms.getInfo(key).info.labels ?? {},
    alive: () => o.ms.keyOf(id) !== undefined,
    source: () => storedLayer(o, id),
  });
}

/**
 * Layer `id` as the store holds it: its image, checked against the digest
 * recorded for it, its chunks by where the image names them, and their
 * bytes from any good copy (each checked against its digest).
 */
export async function storedLayer(o: Omit<ShareParts, 'share'>, id: string): Promise<StoredLayerSource> {
  const file = o.layout.image(id);
  const image = await fsp.readFile(file);
  const want = o.ms.imageDigest(id)?.sha256;
  const got = crypto.createHash('sha256').update(image).digest('hex');
  if (got !== want) throw new Error(`${file} is not the image recorded for layer ${id} (sha256 ${got}, recorded ${want ?? 'none'})`);
  const at = new Map(o.store.layerChunks(Number(id)).map((r) => [`${segmentTag(r.segment)}@${r.blkaddr}`, r]));
  return {
    image,
    // (An untagged device is chunks.blob, as in images of older versions.)
    chunkAt: (tag, blkaddr) => at.get(`${tag === '' ? segmentTag(0) : tag}@${blkaddr}`),
    read: async (digest) => {
      for (const row of o.store.lookupAll(digest)) {
        if (row.bad) continue;
        // (Read pinned, as it was when looked up, or not at all: see ChunkStore.holdRow.)
        const buf = await o.store.readChecked(row);
        if (buf) return buf;
      }
      throw new Error(`chunk sha256:${digest}: no good copy on this node`);
    },
  };
}
