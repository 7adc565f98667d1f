/**
 * The dedup image format (v1): how a converted image sits in a stock OCI
 * registry so that a node can mount it lazily and fetch only the chunks it
 * does not have.
 *
 * An image index holds two manifests:
 * - the image manifest (platform as the source's): config as the source's
 *   but with `rootfs.diff_ids` set to the dedup layer blobs' digests; one
 *   layer per source layer, media type MEDIA_TYPE_LAYER (uncompressed, so
 *   digest = diff id). Each dedup layer blob is the layer's EROFS metadata
 *   image plus its chunk table (below). containerd computes chain ids from
 *   the config as for any image and asks the snapshotter for each layer.
 * - a chunks manifest, platform `unknown/unknown` (the pattern of Docker's
 *   attestation manifests, which containerd and registries accept and pull
 *   handlers skip): config MEDIA_TYPE_CHUNKS_CONFIG, layers = the chunk data
 *   blobs, annotated with the image manifest it belongs to. It keeps the
 *   data blobs referenced (registry GC, `skopeo copy --all`).
 *
 * A chunk data blob (MEDIA_TYPE_CHUNKS) is chunk bytes back to back, each a
 * whole number of 4 KiB blocks, each distinct chunk of the image once. A
 * node reads a chunk with an HTTP Range request and checks its SHA-256: the
 * same digest the node-wide chunk store keys chunks by, so a chunk the node
 * has from any image is never fetched.
 *
 * Layer blob layout: MAGIC (8 bytes), u32 LE header length, the header as
 * UTF-8 JSON (LayerHeader), zero padding to a 4 KiB boundary, then the EROFS
 * image (header.erofs_size bytes). The image's chunk indexes address a
 * layer-local space of 4 KiB blocks; the header's chunk table maps each
 * extent of that space to its digest and where its bytes are.
 */
import path from 'node:path';

/**
 * Under the OCI layer prefix on purpose: containerd (images.IsLayerType)
 * annotates only such descriptors with the CRI labels a remote snapshotter
 * needs, as nydus's `application/vnd.oci.image.layer.nydus.blob.v1` is.
 */
export const MEDIA_TYPE_LAYER = 'application/vnd.oci.image.layer.dedup-snapshotter.erofs.v1';
export const MEDIA_TYPE_CHUNKS = 'application/vnd.dedup-snapshotter.chunks.v1';
export const MEDIA_TYPE_CHUNKS_CONFIG = 'application/vnd.dedup-snapshotter.chunks.config.v1+json';
export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_TYPE_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const MEDIA_TYPE_OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';

/** On the image manifest and the index: the format version. */
export const ANNOTATION_FORMAT = 'io.dedup-snapshotter.format';
export const FORMAT_VERSION = 'v1';
/** On the image manifest: the source image (ref@digest) it was converted from. */
export const ANNOTATION_SOURCE = 'io.dedup-snapshotter.source';
/** On each dedup layer descriptor: the source layer's diff id (uncompressed tar digest). */
export const ANNOTATION_SOURCE_DIFF_ID = 'io.dedup-snapshotter.source.diff-id';
/** On the chunks manifest: the digest of the image manifest its blobs belong to. */
export const ANNOTATION_CHUNKS_FOR = 'io.dedup-snapshotter.chunks.for';

/**
 * Shared converted layers: a node that unpacked and converted a layer of a
 * plain image (registry.push_converted) pushes it to the image's repository
 * as a one-layer artifact, tagged convertedLayerTag(the layer's digest): an
 * OCI manifest with config MEDIA_TYPE_CONVERTED_CONFIG (ConvertedConfig),
 * layers = [the dedup layer blob (MEDIA_TYPE_LAYER), its chunk data blob
 * (MEDIA_TYPE_CHUNKS), when it has data], annotated with the source layer's
 * digest. A node pulling the plain image (registry.pull_converted) looks the
 * tag up per layer and, when found, makes the layer lazily from it.
 */
export const MEDIA_TYPE_CONVERTED_CONFIG = 'application/vnd.dedup-snapshotter.converted-layer.config.v1+json';
/** On a converted-layer manifest: the digest of the (compressed) source layer, as in the plain image's manifest. */
export const ANNOTATION_SOURCE_LAYER = 'io.dedup-snapshotter.source.layer';

export interface ConvertedConfig {
  format: typeof FORMAT_VERSION;
  source_layer: string;
  source_diff_id: string;
}

/** The tag a converted layer of `layerDigest` (sha256:…) is pushed under: `sha256-<hex>.dedup` (the cosign-style digest tag). */
export function convertedLayerTag(layerDigest: string): string {
  if (!SHA256_DIGEST.test(layerDigest)) throw new DedupFormatError(`layer digest ${JSON.stringify(layerDigest)} is not sha256:<64 hex>`);
  return `sha256-${layerDigest.slice(7)}.dedup`;
}

export const LAYER_MAGIC = Buffer.from('DDSLAYR1', 'ascii');
export const LAYER_BLOCK = 4096;
const MAX_HEADER_BYTES = 256 << 20;

/** One extent of a layer's chunk space: [blkaddr, nblocks, sha256 hex, data blob index, byte offset in that blob]. */
export type ChunkEntry = [blkaddr: number, nblocks: number, digest: string, blob: number, offset: number];

export interface LayerHeader {
  version: 1;
  /** Chunk size mkfs.erofs was given (bytes). */
  chunk_size: number;
  erofs_size: number;
  /** Whether the image names an extra device (false: no file data). */
  has_blob: boolean;
  /** Digests (sha256:…) of the chunk data blobs entries point into, in the same repository. */
  data_blobs: string[];
  /** Every distinct extent the image's chunk indexes name. */
  chunks: ChunkEntry[];
  /** Diff id of the source layer. */
  source_diff_id: string;
  files: number;
  logical_bytes: number;
  /**
   * Optional: files of this layer to load first once it is mounted lazily
   * (absolute paths in the layer, regular files; `convert --prefetch-files`).
   */
  prefetch?: string[];
}

/** At most this many prefetch paths per layer, each at most this long. */
export const MAX_PREFETCH_PATHS = 65536;
const MAX_PATH_BYTES = 4096;

/** A prefetch path as the format allows it: absolute, normalized, no "..", no NUL, not "/". */
export function isPrefetchPath(p: unknown): p is string {
  return (
    typeof p === 'string' &&
    p.length > 1 &&
    Buffer.byteLength(p) <= MAX_PATH_BYTES &&
    p.startsWith('/') &&
    !p.includes('\0') &&
    path.posix.normalize(p) === p &&
    !p.endsWith('/') &&
    !p.split('/').includes('..')
  );
}

export class DedupFormatError extends Error {
  constructor(message: string) {
    super(`dedup layer: ${message}`);
    this.name = 'DedupFormatError';
  }
}

/** A sha256 digest as this format and containerd's CRI labels spell it. */
export const SHA256_DIGEST = /^sha256:[0-9a-f]{64}$/;
const HEX = /^[0-9a-f]{64}$/;

export function encodeLayerBlob(header: LayerHeader, erofs: Buffer): Buffer {
  if (erofs.length !== header.erofs_size) throw new DedupFormatError(`erofs_size ${header.erofs_size} does not match the image (${erofs.length} bytes)`);
  checkHeader(header);
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const head = 8 + 4 + json.length;
  const start = Math.ceil(head / LAYER_BLOCK) * LAYER_BLOCK;
  const out = Buffer.alloc(start + erofs.length);
  LAYER_MAGIC.copy(out, 0);
  out.writeUInt32LE(json.length, 8);
  json.copy(out, 12);
  erofs.copy(out, start);
  return out;
}

/** Parses and checks a layer blob; throws DedupFormatError naming what is wrong. */
export function decodeLayerBlob(blob: Buffer): { header: LayerHeader; erofs: Buffer } {
  if (blob.length < 12 || !blob.subarray(0, 8).equals(LAYER_MAGIC)) throw new DedupFormatError('bad magic (not a dedup-snapshotter layer blob)');
  const len = blob.readUInt32LE(8);
  if (len > MAX_HEADER_BYTES || 12 + len > blob.length) throw new DedupFormatError(`header length ${len} is out of bounds (${blob.length} bytes)`);
  let header: LayerHeader;
  try {
    header = JSON.parse(blob.subarray(12, 12 + len).toString('utf8')) as LayerHeader;
  } catch (err) {
    throw new DedupFormatError(`header is not JSON: ${(err as Error).message}`);
  }
  checkHeader(header);
  const start = Math.ceil((12 + len) / LAYER_BLOCK) * LAYER_BLOCK;
  if (start + header.erofs_size !== blob.length) {
    throw new DedupFormatError(`blob is ${blob.length} bytes, header says ${start + header.erofs_size}`);
  }
  return { header, erofs: blob.subarray(start) };
}

function isCount(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function checkHeader(h: LayerHeader): void {
  if (typeof h !== 'object' || h === null) throw new DedupFormatError('header is not an object');
  if (h.version !== 1) throw new DedupFormatError(`unsupported version ${JSON.stringify(h.version)}`);
  if (!isCount(h.chunk_size) || h.chunk_size < LAYER_BLOCK || (h.chunk_size & (h.chunk_size - 1)) !== 0) {
    throw new DedupFormatError(`chunk_size ${JSON.stringify(h.chunk_size)} is not a power of two ≥ 4096`);
  }
  if (!isCount(h.erofs_size) || h.erofs_size < 2 * 1024) throw new DedupFormatError(`erofs_size ${JSON.stringify(h.erofs_size)} is too small`);
  if (typeof h.has_blob !== 'boolean') throw new DedupFormatError('has_blob must be a boolean');
  if (!Array.isArray(h.data_blobs) || !h.data_blobs.every((d) => typeof d === 'string' && SHA256_DIGEST.test(d))) throw new DedupFormatError('data_blobs must be sha256 digests');
  if (typeof h.source_diff_id !== 'string' || !SHA256_DIGEST.test(h.source_diff_id)) throw new DedupFormatError('source_diff_id must be a sha256 digest');
  if (!isCount(h.files) || !isCount(h.logical_bytes)) throw new DedupFormatError('files and logical_bytes must be counts');
  if (!Array.isArray(h.chunks)) throw new DedupFormatError('chunks must be an array');
  const maxBlocks = h.chunk_size / LAYER_BLOCK;
  const seen = new Set<number>();
  for (const [i, c] of h.chunks.entries()) {
    if (!Array.isArray(c) || c.length !== 5) throw new DedupFormatError(`chunks[${i}] is not [blkaddr, nblocks, digest, blob, offset]`);
    const [blkaddr, nblocks, digest, blob, offset] = c;
    if (!isCount(blkaddr) || !isCount(nblocks) || nblocks < 1 || nblocks > maxBlocks) throw new DedupFormatError(`chunks[${i}]: bad extent ${JSON.stringify([blkaddr, nblocks])}`);
    if (typeof digest !== 'string' || !HEX.test(digest)) throw new DedupFormatError(`chunks[${i}]: digest must be 64 hex digits`);
    if (!isCount(blob) || blob >= h.data_blobs.length) throw new DedupFormatError(`chunks[${i}]: blob index ${JSON.stringify(blob)} out of range`);
    if (!isCount(offset) || offset % LAYER_BLOCK !== 0) throw new DedupFormatError(`chunks[${i}]: offset ${JSON.stringify(offset)} is not a multiple of 4096`);
    if (seen.has(blkaddr)) throw new DedupFormatError(`chunks[${i}]: extent at block ${blkaddr} listed twice`);
    seen.add(blkaddr);
  }
  if (h.chunks.length > 0 && !h.has_blob) throw new DedupFormatError('chunks listed but has_blob is false');
  if (h.prefetch !== undefined) {
    if (!Array.isArray(h.prefetch) || h.prefetch.length > MAX_PREFETCH_PATHS) throw new DedupFormatError(`prefetch must be an array of at most ${MAX_PREFETCH_PATHS} paths`);
    for (const [i, p] of h.prefetch.entries()) {
      if (!isPrefetchPath(p)) throw new DedupFormatError(`prefetch[${i}] ${JSON.stringify(p)} is not an absolute, normalized path`);
    }
  }
}
