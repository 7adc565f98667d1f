import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { type ChunkStore, type Extent, STORE_BLOCK, readAt } from '../store/chunkstore';
import { extentKey, hashImageChunks } from './chunks';
import { type ChunkRef, type ChunkScan, setChunkAddress, updateSuperblockChecksum } from './erofs-format';
import { type MkfsFeatures, buildChunkedImage } from './mkfs';

/** What a conversion produced, handed to the caller's transaction. */
export interface ConvertedLayer {
  image: string;
  /** SHA-256 (hex) of the image as written: checked before each mount at start. */
  imageSha256: string;
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
  /** Bad chunks of the store whose bytes this layer brought again. */
  healedChunks?: number;
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
  /** Seals a written image (fs-verity) where the filesystem can. */
  seal?: (file: string) => void;
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

  /**
   * Writes a layer image durably to `file`, seals it (fs-verity) where the
   * filesystem can, and returns its SHA-256 (hex), which start-up checks
   * before mounting it.
   */
  async writeImage(file: string, img: Buffer): Promise<string> {
    await writeDurably(file, img);
    this.o.seal?.(file);
    return crypto.createHash('sha256').update(img).digest('hex');
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
      const { scan, refs, digests, extents } = await hashImageChunks(img, tmpBlob);
      const blobFd = refs.length > 0 ? fs.openSync(tmpBlob, 'r') : -1;
      try {
        const chunks = [...digests].map(([k, digest]) => ({ key: k, digest, nblocks: (extents.get(k) as Extent).nblocks }));
        return await this.importChunks(id, img, { scan, refs, chunks, mkfsMs }, async (k) => {
          const from = extents.get(k) as Extent;
          const buf = Buffer.alloc(from.nblocks * STORE_BLOCK);
          await readAt(blobFd, buf, from.blkaddr * STORE_BLOCK);
          return buf;
        }, finish);
      } finally {
        if (blobFd >= 0) fs.closeSync(blobFd);
      }
    } finally {
      await fsp.rm(work, { recursive: true, force: true });
    }
  }

  /**
   * Imports a layer whose EROFS image `img` (chunk indexes in a layer-local
   * block space) comes with its chunks' digests: chunks the store has are
   * pinned and referenced, the others are read with `read(key)` (their bytes,
   * whole blocks), written and made durable; then the indexes are rewritten
   * to store addresses, the image is written to images/<id>.erofs, and
   * `finish` records it, all under the store's import lock. On failure
   * nothing remains. `chunks` lists each distinct extent (key
   * `${blkaddr}:${nblocks}`) in the order new chunks should be stored.
   */
  async importChunks<T>(
    id: string,
    img: Buffer,
    layer: { scan: ChunkScan; refs: ChunkRef[]; chunks: { key: string; digest: string; nblocks: number }[]; mkfsMs: number },
    read: (key: string) => Promise<Buffer>,
    finish: (layer: ConvertedLayer) => T,
  ): Promise<T> {
    const store = this.o.store;
    const digestOf = new Map(layer.chunks.map((c) => [c.key, c.digest]));
    return store.withLock(async () => {
      // A store file deleted or replaced under the daemon is put back first: what is stored now must survive a restart.
      await store.restoreFile();
      const t1 = Date.now();
      const target = new Map<string, number>(); // digest → store blkaddr
      const pinned: number[] = [];
      const fresh: { digest: string; extent: Extent; key: string }[] = [];
      // Bad chunks (bytes lost or damaged) this layer has: written again at their own address.
      const heal: { digest: string; extent: Extent; key: string; id: number }[] = [];
      const placed: string[] = [];
      try {
        for (const c of layer.chunks) {
          if (target.has(c.digest)) continue;
          const row = store.lookupAny(c.digest);
          if (row && row.bad && row.nblocks !== c.nblocks) throw new Error(`chunk ${c.digest}: the store's damaged copy has ${row.nblocks} blocks, this layer's ${c.nblocks}`);
          if (row) {
            store.pin(row.id);
            pinned.push(row.id);
            target.set(c.digest, row.blkaddr);
            if (row.bad) heal.push({ digest: c.digest, extent: row, key: c.key, id: row.id });
          } else {
            const extent = store.allocate(c.nblocks);
            fresh.push({ digest: c.digest, extent, key: c.key });
            target.set(c.digest, extent.blkaddr);
          }
        }
        for (const f of fresh) {
          const buf = await read(f.key);
          if (buf.length !== f.extent.nblocks * STORE_BLOCK) throw new Error(`chunk ${f.digest}: ${buf.length} bytes, expected ${f.extent.nblocks * STORE_BLOCK}`);
          await store.write(f.extent, buf);
        }
        for (const h of heal) {
          const buf = await read(h.key);
          // Whatever the source, only the right bytes go over a chunk other layers reference.
          const got = crypto.createHash('sha256').update(buf).digest('hex');
          if (got !== h.digest) throw new Error(`chunk ${h.digest}: the bytes read for it hash to ${got}`);
          await store.write(h.extent, buf);
        }
        if (fresh.length > 0 || heal.length > 0) await store.sync();
        if (heal.length > 0) store.markGood(heal.map((h) => h.id));

        for (const r of layer.refs) {
          const digest = digestOf.get(extentKey(r));
          if (digest === undefined) throw new Error(`chunk index at block ${r.blkaddr} (+${r.nblocks}) has no digest`);
          setChunkAddress(img, r, r.deviceId, target.get(digest) as number);
        }
        updateSuperblockChecksum(img);
        const image = this.imagePath(id);
        const imageSha256 = await this.writeImage(image, img);
        placed.push(image);
        const converted: ConvertedLayer = {
          image,
          imageSha256,
          hasBlob: layer.scan.sb.extraDevices > 0,
          newChunks: fresh.map((f) => ({ digest: f.digest, extent: f.extent })),
          existingChunkIds: pinned,
          stats: {
            files: layer.scan.files,
            logicalBytes: layer.scan.logicalBytes,
            chunks: target.size,
            newChunks: fresh.length,
            dedupChunks: target.size - fresh.length,
            newBytes: fresh.reduce((n, f) => n + f.extent.nblocks * STORE_BLOCK, 0),
            healedChunks: heal.length,
            imageBytes: img.length,
            mkfsMs: layer.mkfsMs,
            importMs: Date.now() - t1,
          },
        };
        return finish(converted);
      } catch (err) {
        store.releaseExtents(fresh.map((f) => f.extent));
        for (const p of placed) fs.rmSync(p, { force: true });
        throw err;
      } finally {
        for (const pid of pinned) store.unpin(pid);
      }
    });
  }
}

/** Writes a file under a temporary name, fsyncs it, renames it into place, fsyncs the directory. */
export async function writeDurably(dest: string, data: Buffer): Promise<void> {
  const tmp = `${dest}.tmp-${process.pid}`;
  try {
    const fh = await fsp.open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, dest);
  } catch (err) {
    // A disk that filled up mid-write keeps nothing of it.
    await fsp.rm(tmp, { force: true });
    throw err;
  }
  const dh = await fsp.open(path.dirname(dest), 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}
