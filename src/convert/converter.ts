import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { type ChunkStore, type Extent, STORE_BLOCK, readAt } from '../store/chunkstore';
import { extentKey, hashImageChunks } from './chunks';
import { setChunkAddress, updateSuperblockChecksum } from './erofs-format';
import { type MkfsFeatures, buildChunkedImage } from './mkfs';

/** What a conversion produced, handed to the caller's transaction. */
export interface ConvertedLayer {
  image: string;
  /** The image names the chunk store as its extra device (false: no file data). */
  hasBlob: boolean;
  /** Chunks to record as new rows (their data is durable): digest and extent. */
  newChunks: { digest: string; extent: Extent }[];
  /** Ids of existing chunks the layer references. */
  existingChunkIds: number[];
  stats: ConvertStats;
}

export interface ConvertStats {
  files: number;
  logicalBytes: number;
  /** Distinct chunks the layer references. */
  chunks: number;
  newChunks: number;
  dedupChunks: number;
  /** Bytes this layer added to the store. */
  newBytes: number;
  imageBytes: number;
  mkfsMs: number;
  importMs: number;
}

export interface ConverterOptions {
  store: ChunkStore;
  mkfs: () => Promise<MkfsFeatures>;
  imagesDir: string;
  tmpDir: string;
  chunkSize: number;
}

/**
 * Converts a layer directory into `images/<id>.erofs` whose file data lives
 * in the chunk store: mkfs.erofs writes a metadata image plus a temporary
 * blob; each chunk of that blob is hashed and stored unless the store has it
 * already; the image's chunk indexes are rewritten to the store's addresses.
 *
 * `finish` runs with the store's import lock held, after the image is in
 * place and all new chunk data is durable; it must record the result in one
 * synchronous transaction. If anything fails, nothing remains: new chunks are
 * punched out and the image is deleted.
 */
export class Converter {
  constructor(private readonly o: ConverterOptions) {
    fs.mkdirSync(o.imagesDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(o.tmpDir, { recursive: true, mode: 0o700 });
  }

  /** Checks mkfs.erofs is there and able (throws MkfsError naming the fix). */
  async probe(): Promise<void> {
    await this.o.mkfs();
  }

  imagePath(id: string): string {
    return path.join(this.o.imagesDir, `${id}.erofs`);
  }

  async convert<T>(id: string, dir: string, finish: (layer: ConvertedLayer) => T): Promise<T> {
    const work = await fsp.mkdtemp(path.join(this.o.tmpDir, `convert-${id}-`));
    try {
      const tmpImage = path.join(work, 'image.erofs');
      const tmpBlob = path.join(work, 'chunks.blob');
      const t0 = Date.now();
      await buildChunkedImage(await this.o.mkfs(), { dir, image: tmpImage, blob: tmpBlob, chunkSize: this.o.chunkSize });
      const mkfsMs = Date.now() - t0;
      const img = await fsp.readFile(tmpImage);
      const { scan, refs, digests, extents: extentOf } = await hashImageChunks(img, tmpBlob);
      const blobFd = refs.length > 0 ? fs.openSync(tmpBlob, 'r') : -1;
      try {
        const store = this.o.store;
        return await store.withLock(async () => {
          const t1 = Date.now();
          const target = new Map<string, number>(); // digest → store blkaddr
          const pinned: number[] = [];
          const fresh: { digest: string; extent: Extent; from: Extent }[] = [];
          const placed: string[] = [];
          try {
            for (const [k, digest] of digests) {
              if (target.has(digest)) continue;
              const row = store.lookup(digest);
              if (row) {
                store.pin(row.id);
                pinned.push(row.id);
                target.set(digest, row.blkaddr);
              } else {
                const from = extentOf.get(k) as Extent;
                const extent = store.allocate(from.nblocks);
                fresh.push({ digest, extent, from });
                target.set(digest, extent.blkaddr);
              }
            }
            for (const f of fresh) {
              const buf = Buffer.alloc(f.from.nblocks * STORE_BLOCK);
              await readAt(blobFd, buf, f.from.blkaddr * STORE_BLOCK);
              await store.write(f.extent, buf);
            }
            if (fresh.length > 0) await store.sync();

            for (const r of refs) {
              const digest = digests.get(extentKey(r)) as string;
              setChunkAddress(img, r, r.deviceId, target.get(digest) as number);
            }
            updateSuperblockChecksum(img);
            const image = this.imagePath(id);
            await writeDurably(image, img);
            placed.push(image);
            const layer: ConvertedLayer = {
              image,
              hasBlob: scan.sb.extraDevices > 0,
              newChunks: fresh.map((f) => ({ digest: f.digest, extent: f.extent })),
              existingChunkIds: pinned,
              stats: {
                files: scan.files,
                logicalBytes: scan.logicalBytes,
                chunks: target.size,
                newChunks: fresh.length,
                dedupChunks: target.size - fresh.length,
                newBytes: fresh.reduce((n, f) => n + f.extent.nblocks * STORE_BLOCK, 0),
                imageBytes: img.length,
                mkfsMs,
                importMs: Date.now() - t1,
              },
            };
            return finish(layer);
          } catch (err) {
            store.releaseExtents(fresh.map((f) => f.extent));
            for (const p of placed) fs.rmSync(p, { force: true });
            throw err;
          } finally {
            for (const id of pinned) store.unpin(id);
          }
        });
      } finally {
        if (blobFd >= 0) fs.closeSync(blobFd);
      }
    } finally {
      await fsp.rm(work, { recursive: true, force: true });
    }
  }
}

/** Writes a file under a temporary name, fsyncs it, renames it into place, fsyncs the directory. */
async function writeDurably(dest: string, data: Buffer): Promise<void> {
  const tmp = `${dest}.tmp-${process.pid}`;
  const fh = await fsp.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, dest);
  const dh = await fsp.open(path.dirname(dest), 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}
