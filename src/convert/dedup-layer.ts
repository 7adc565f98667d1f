import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { type ChunkEntry, type LayerHeader, encodeLayerBlob } from '../remote/dedup-image';
import { regularFileUnder } from '../util/fs';
import { STORE_BLOCK, readAt } from '../store/chunkstore';
import { hashImageChunks, scanDataChunks } from './chunks';
import { type ChunkScan, readDeviceTags, setChunkAddress, setDeviceTable, updateSuperblockChecksum } from './erofs-format';
import { type MkfsFeatures, buildChunkedImage } from './mkfs';

/** A chunk's bytes in the image's data blobs: the blob's digest once known, or the index of the layer being built. */
interface ChunkHome {
  blob: string;
  offset: number;
}

export interface DedupLayer {
  /** The dedup layer blob (header + EROFS image). */
  blob: Buffer;
  digest: string;
  header: LayerHeader;
  /** The chunk data blob this layer added (its new chunks), or null when all its chunks were in earlier layers. */
  data: { path: string; digest: string; size: number } | null;
  newChunks: number;
  chunks: number;
}

/** The tag of a dedup layer image's one extra device: its layer-local chunk space (a pulling node sets its own). */
const LOCAL_DEVICE_TAG = 'dedup:layer';

/** A layer this node converted, as its store holds it (see addStoredLayer). */
export interface StoredLayerSource {
  /** The layer's EROFS image: its chunk indexes name store segments by their device tags. */
  image: Buffer;
  /** The chunk of the layer at block `blkaddr` of the device tagged `tag`, if any. */
  chunkAt(tag: string, blkaddr: number): { digest: string; nblocks: number } | undefined;
  /** A chunk's bytes (whole blocks), checked against its digest: throws when the node has no good copy. */
  read(digest: string): Promise<Buffer>;
}

/**
 * Builds the dedup layers of one image (see remote/dedup-image.ts), layer by
 * layer in order: each layer directory (an overlay upper dir: whiteouts as
 * 0:0 char devices, opaque dirs by xattr) becomes an EROFS image with a chunk
 * table; each distinct chunk of the image goes into the data blob of the
 * first layer that has it, and later layers point there.
 */
export class DedupImageBuilder {
  private readonly homes = new Map<string, ChunkHome>();
  private n = 0;

  constructor(
    /** `mkfs`: for addLayer (a directory) only. */
    private readonly o: { mkfs?: () => Promise<MkfsFeatures>; chunkSize: number; workDir: string },
  ) {}

  /**
   * `prefetch`: paths of the image to load first; the regular files among
   * them that this layer holds are recorded in its header.
   */
  async addLayer(dir: string, sourceDiffId: string, prefetch: string[] = []): Promise<DedupLayer> {
    if (!this.o.mkfs) throw new Error('a dedup layer from a directory needs mkfs.erofs');
    const mkfs = await this.o.mkfs();
    const work = await fsp.mkdtemp(path.join(this.o.workDir, `layer-${this.n}-`));
    const tmpImage = path.join(work, 'image.erofs');
    const tmpBlob = path.join(work, 'chunks.blob');
    try {
      await buildChunkedImage(mkfs, { dir, image: tmpImage, blob: tmpBlob, chunkSize: this.o.chunkSize });
      const img = await fsp.readFile(tmpImage);
      const { scan, digests, extents } = await hashImageChunks(img, tmpBlob);
      const fd = digests.size > 0 ? fs.openSync(tmpBlob, 'r') : -1;
      try {
        const chunks = [...digests].map(([k, digest]) => ({ ...(extents.get(k) as { blkaddr: number; nblocks: number }), digest }));
        const listed = prefetch.filter((p) => regularFileUnder(dir, p) !== null);
        return await this.finishLayer(img, scan, chunks, sourceDiffId, listed, async (c) => {
          const buf = Buffer.alloc(c.nblocks * STORE_BLOCK);
          await readAt(fd, buf, c.blkaddr * STORE_BLOCK);
          return buf;
        });
      } finally {
        if (fd >= 0) fs.closeSync(fd);
      }
    } finally {
      await fsp.rm(work, { recursive: true, force: true });
    }
  }

  /**
   * The dedup layer of a layer this node converted, from its image as the
   * store holds it (no directory, no mkfs.erofs): its chunk indexes, which
   * name store segments by their device tags, are pointed at a layer-local
   * space (each distinct chunk once, in the store's order, so the files of
   * one directory stay together) with one extra device.
   */
  async addStoredLayer(src: StoredLayerSource, sourceDiffId: string): Promise<DedupLayer> {
    const img = Buffer.from(src.image);
    const { scan, refs } = scanDataChunks(img);
    const tags = readDeviceTags(img, scan.sb);
    if (refs.length === 0) {
      // No file data (mkfs.erofs leaves an untagged empty device then): as it is, unless a tag names a file of this node's store.
      const named = tags.find((t) => t !== '');
      if (named !== undefined) throw new Error(`the image names device ${JSON.stringify(named)} but no chunks`);
      return this.finishLayer(img, scan, [], sourceDiffId, [], (c) => readPublished(src, c));
    }
    const local = new Map<string, { blkaddr: number; nblocks: number; digest: string }>();
    const digestOf: string[] = [];
    const order = [...refs.keys()].sort((a, b) => refs[a].deviceId - refs[b].deviceId || refs[a].blkaddr - refs[b].blkaddr);
    let blocks = 0;
    for (const i of order) {
      const r = refs[i];
      const tag = tags[r.deviceId - 1];
      const c = tag === undefined ? undefined : src.chunkAt(tag, r.blkaddr);
      if (!c || c.nblocks !== r.nblocks) throw new Error(`chunk index at device ${r.deviceId} (${JSON.stringify(tag ?? null)}) block ${r.blkaddr} (+${r.nblocks}) names no chunk of the layer`);
      digestOf[i] = c.digest;
      if (!local.has(c.digest)) {
        local.set(c.digest, { blkaddr: blocks, nblocks: c.nblocks, digest: c.digest });
        blocks += c.nblocks;
      }
    }
    for (const [i, r] of refs.entries()) setChunkAddress(img, r, 1, (local.get(digestOf[i]) as { blkaddr: number }).blkaddr);
    const out = setDeviceTable(img, [{ tag: LOCAL_DEVICE_TAG, blocks }]);
    updateSuperblockChecksum(out);
    return this.finishLayer(out, scan, [...local.values()], sourceDiffId, [], (c) => readPublished(src, c));
  }

  /**
   * The layer's header and blob: each chunk (an extent of the layer-local
   * space, in the order given) the image has not met in an earlier layer is
   * read with `read` and appended to this layer's data blob.
   */
  private async finishLayer(
    img: Buffer,
    scan: ChunkScan,
    extents: { blkaddr: number; nblocks: number; digest: string }[],
    sourceDiffId: string,
    prefetch: string[],
    read: (c: { blkaddr: number; nblocks: number; digest: string }) => Promise<Buffer>,
  ): Promise<DedupLayer> {
    const i = this.n++;
    const dataPath = path.join(this.o.workDir, `data-${i}.blob`);
    // New chunks go into this layer's data blob, in the order given.
    const PENDING = '';
    const hash = crypto.createHash('sha256');
    let size = 0;
    let fresh = 0;
    if (extents.length > 0) {
      const out = await fsp.open(dataPath, 'w', 0o600);
      try {
        for (const c of extents) {
          if (this.homes.has(c.digest)) continue;
          const buf = await read(c);
          await out.write(buf, 0, buf.length, size);
          hash.update(buf);
          this.homes.set(c.digest, { blob: PENDING, offset: size });
          size += buf.length;
          fresh++;
        }
      } finally {
        await out.close();
      }
    }
    const dataDigest = size > 0 ? `sha256:${hash.digest('hex')}` : null;
    if (dataDigest) {
      for (const h of this.homes.values()) if (h.blob === PENDING) h.blob = dataDigest;
    } else {
      await fsp.rm(dataPath, { force: true });
    }

    const blobs: string[] = [];
    const chunks: ChunkEntry[] = [];
    for (const c of extents) {
      const home = this.homes.get(c.digest) as ChunkHome;
      let b = blobs.indexOf(home.blob);
      if (b < 0) b = blobs.push(home.blob) - 1;
      chunks.push([c.blkaddr, c.nblocks, c.digest, b, home.offset]);
    }
    const header: LayerHeader = {
      version: 1,
      chunk_size: this.o.chunkSize,
      erofs_size: img.length,
      has_blob: scan.sb.extraDevices > 0,
      data_blobs: blobs,
      chunks,
      source_diff_id: sourceDiffId,
      files: scan.files,
      logical_bytes: scan.logicalBytes,
    };
    if (prefetch.length > 0) header.prefetch = prefetch;
    const blob = encodeLayerBlob(header, img);
    return {
      blob,
      digest: `sha256:${crypto.createHash('sha256').update(blob).digest('hex')}`,
      header,
      data: dataDigest ? { path: dataPath, digest: dataDigest, size } : null,
      newChunks: fresh,
      chunks: new Set(extents.map((c) => c.digest)).size,
    };
  }
}

/**
 * A stored chunk's bytes for publishing: whatever the source (the store
 * checks its own reads to mark a damaged copy and try another), only a
 * chunk's own bytes go out under its digest. (addLayer's chunks were just
 * hashed from the blob they are read from.)
 */
async function readPublished(src: StoredLayerSource, c: { nblocks: number; digest: string }): Promise<Buffer> {
  const buf = await src.read(c.digest);
  if (buf.length !== c.nblocks * STORE_BLOCK || crypto.createHash('sha256').update(buf).digest('hex') !== c.digest) {
    throw new Error(`chunk sha256:${c.digest}: the ${buf.length} bytes read for it are not its bytes`);
  }
  return buf;
}
