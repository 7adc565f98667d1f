import type { ConvertStats, ConvertedLayer } from '../convert/converter';
import type { ChunkStore } from '../store/chunkstore';
import type { MetaStore } from '../store/metastore';

/**
 * In a transaction: layer `id`'s chunk rows (the new ones), its references
 * to every chunk it reads, its image's digest, and its layer row: added
 * ('new': a conversion or a remote import), or the lazy layer's row turned
 * into a store layer's ('settled').
 */
export function recordLayer(ms: MetaStore, store: ChunkStore, id: string, layer: ConvertedLayer, row: 'new' | 'settled', started: number): void {
  const newIds = layer.newChunks.map((c) => store.insertChunk(c.digest, c.extent));
  store.addLayerRefs(Number(id), [...newIds, ...layer.existingChunkIds]);
  const st = layer.stats;
  if (row === 'settled') ms.settleLazyLayer(id, { image_bytes: st.imageBytes, chunks: st.chunks, new_chunks: st.newChunks, new_bytes: st.newBytes });
  else addLayerRow(ms, id, layer.hasBlob, st, started);
  ms.setImageDigest(id, layer.imageSha256);
}

/** In a transaction: the layer row of `id` (an EROFS image now). */
export function addLayerRow(ms: MetaStore, id: string, hasBlob: boolean, st: ConvertStats, started: number): void {
  ms.addLayer(id, {
    format: 'erofs',
    has_blob: hasBlob ? 1 : 0,
    files: st.files,
    logical_bytes: st.logicalBytes,
    image_bytes: st.imageBytes,
    chunks: st.chunks,
    new_chunks: st.newChunks,
    new_bytes: st.newBytes,
    convert_ms: Date.now() - started,
  });
}
