import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { type ChunkEntry, type LayerHeader, encodeLayerBlob } from '../remote/dedup-image';
import { regularFileUnder } from '../util/fs';
import { STORE_BLOCK, readAt } from '../store/chunkstore';
import { hashImageChunks } from './chunks';
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
    private readonly o: { mkfs: () => Promise<MkfsFeatures>; chunkSize: number; workDir: string },
  ) {}

  /**
   * `prefetch`: paths of the image to load first; the regular files among
   * them that this layer holds are recorded in its header.
   */
  async addLayer(dir: string, sourceDiffId: string, prefetch: string[] = []): Promise<DedupLayer> {
    const i = this.n++;
    const work = await fsp.mkdtemp(path.join(this.o.workDir, `layer-${i}-`));
    const tmpImage = path.join(work, 'image.erofs');
    const tmpBlob = path.join(work, 'chunks.blob');
    const dataPath = path.join(this.o.workDir, `data-${i}.blob`);
    try {
      await buildChunkedImage(await this.o.mkfs(), { dir, image: tmpImage, blob: tmpBlob, chunkSize: this.o.chunkSize });
      const img = await fsp.readFile(tmpImage);
      const { scan, digests, extents } = await hashImageChunks(img, tmpBlob);

      // New chunks go into this layer's data blob, in blob order.
      const PENDING = '';
      const hash = crypto.createHash('sha256');
      let size = 0;
      let fresh = 0;
      if (digests.size > 0) {
        const out = await fsp.open(dataPath, 'w', 0o600);
        const fd = fs.openSync(tmpBlob, 'r');
        try {
          for (const [k, digest] of digests) {
            if (this.homes.has(digest)) continue;
            const e = extents.get(k) as { blkaddr: number; nblocks: number };
            const buf = Buffer.alloc(e.nblocks * STORE_BLOCK);
            await readAt(fd, buf, e.blkaddr * STORE_BLOCK);
            await out.write(buf, 0, buf.length, size);
            hash.update(buf);
            this.homes.set(digest, { blob: PENDING, offset: size });
            size += buf.length;
            fresh++;
          }
        } finally {
          fs.closeSync(fd);
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
      for (const [k, digest] of digests) {
        const home = this.homes.get(digest) as ChunkHome;
        let b = blobs.indexOf(home.blob);
        if (b < 0) b = blobs.push(home.blob) - 1;
        const e = extents.get(k) as { blkaddr: number; nblocks: number };
        chunks.push([e.blkaddr, e.nblocks, digest, b, home.offset]);
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
      const listed = prefetch.filter((p) => regularFileUnder(dir, p) !== null);
      if (listed.length > 0) header.prefetch = listed;
      const blob = encodeLayerBlob(header, img);
      return {
        blob,
        digest: `sha256:${crypto.createHash('sha256').update(blob).digest('hex')}`,
        header,
        data: dataDigest ? { path: dataPath, digest: dataDigest, size } : null,
        newChunks: fresh,
        chunks: new Set(digests.values()).size,
      };
    } finally {
      await fsp.rm(work, { recursive: true, force: true });
    }
  }
}
