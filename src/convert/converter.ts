import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { type ChunkStore, type Extent, STORE_BLOCK, readAt, segmentTag } from '../store/chunkstore';
import type { SegmentRow, SegmentWriter } from '../store/segments';
import { type Usage, UsageCounter, diskUsage } from '../util/fs';
import { extentKey, hashImageChunks } from './chunks';
import { type ChunkRef, type ChunkScan, EROFS_DEVT_SLOT_SIZE, MAX_IMAGE_BEFORE_DEVT, setChunkAddress, setDeviceTable, updateSuperblockChecksum } from './erofs-format';
import { NEW_SEGMENT, type Placement, type StoredChunk, placeChunks } from './placement';
import { type MkfsFeatures, buildChunkedImage } from './mkfs';
import { StoreChunkSink } from './chunk-sink';
import { writeErofsImage } from './erofs-writer';
import { NonUtf8NameError, type TreeNode, treeFromDirectory } from './layer-tree';

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
  /** The layer directory's usage as containerd's snapshotters count it (conversions of a directory). */
  usage?: Usage;
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
  /** Of newBytes, those named where they lie in files of the layer directory taken into the store (not written again). */
  adoptedBytes?: number;
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
  /** Files of a layer directory from this size on are taken into the store in place (see StoreChunkSink.adopt); default ADOPT_MIN. */
  adoptMinBytes?: number;
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

  /**
   * Converts the layer directory `dir` in one read pass: each file's data is
   * hashed chunk by chunk and new chunks go straight into the store (see
   * StoreChunkSink), then the image is written by the project's own EROFS
   * writer. mkfs.erofs is used only for a tree the writer cannot take (a
   * file name that is not UTF-8).
   */
  async convert<T>(id: string, dir: string, finish: (layer: ConvertedLayer) => T): Promise<T> {
    const t0 = Date.now();
    const sink = new StoreChunkSink(this.o.store, this.o.chunkSize);
    const usage = new UsageCounter();
    let root: TreeNode;
    try {
      root = await treeFromDirectory(dir, sink, usage, this.o.adoptMinBytes);
    } catch (err) {
      await sink.discard();
      if (err instanceof NonUtf8NameError) {
        const measured = await diskUsage(dir);
        return this.convertWithMkfs(id, dir, (layer) => finish({ ...layer, usage: measured }));
      }
      throw err;
    }
    return this.importTree(id, root, sink, Date.now() - t0, (layer) => finish({ ...layer, usage: usage.usage }));
  }

  /** The conversion through mkfs.erofs and a temporary blob (names the EROFS writer cannot take). */
  async convertWithMkfs<T>(id: string, dir: string, finish: (layer: ConvertedLayer) => T): Promise<T> {
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
   * Records a layer whose tree was built with `sink` (its new chunks already
   * in the store, provisionally): under the store's import lock the chunks
   * are placed (placeChunks: which stored copy each reference reads, a chunk
   * found only in segments the image cannot also name is copied into the
   * layer's own place, damaged chunks are healed with the layer's bytes), the
   * image is written with the final addresses, and `finish` records it. On
   * failure nothing remains.
   */
  async importTree<T>(id: string, root: TreeNode, sink: StoreChunkSink, buildMs: number, finish: (layer: ConvertedLayer) => T): Promise<T> {
    const store = this.o.store;
    let keep = new Set<string>();
    try {
      // Every chunk written before anything is placed (outside the lock: other imports go on meanwhile).
      await sink.flush();
      return await store.withLock(async () => {
        await store.restoreFile();
        sink.checkStoreFile('this layer was being converted: its new chunks went to the old file (the conversion is retried)');
        const t1 = Date.now();
        const segmented = store.layout === 'segments';
        // Adopted files are devices of the image too, beside those placement picks.
        const maxDevices = Math.max(1, store.maxDevices - sink.adopted.length);
        const plan = store.inOneRead(() => placeChunks(sink.chunks(), (d) => store.lookupAll(d), { freshSegment: segmented ? NEW_SEGMENT : 0, maxDevices }));
        const pinned = pinPlanned(store, plan);
        try {
          /** The layer's bytes of a chunk: its provisional copy, else a good stored copy. */
          const bytesOf = async (digest: string): Promise<Buffer> => {
            const mine = sink.written.get(digest);
            if (mine) return store.read(mine);
            for (const row of store.lookupAll(digest)) {
              if (row.bad) continue;
              const buf = await store.readChecked(row);
              if (buf) return buf;
            }
            throw new Error(`chunk sha256:${digest}: no good copy to read`);
          };
          const where = new Map<string, Extent>();
          for (const [digest, row] of plan.use) where.set(digest, row);
          const adoptedIds = new Set(sink.adopted.map((w) => w.id));
          const fresh: { digest: string; extent: Extent }[] = [];
          for (const digest of plan.fresh) {
            const mine = sink.written.get(digest);
            let extent: Extent;
            if (mine && ((mine.segment ?? 0) === (segmented ? sink.writer?.id : 0) || adoptedIds.has(mine.segment ?? 0))) {
              extent = mine;
            } else if (segmented) {
              const buf = await bytesOf(digest);
              sink.writer ??= store.segments.create();
              extent = await store.append(sink.writer, buf);
            } else {
              const buf = await bytesOf(digest);
              extent = store.allocate(buf.length / STORE_BLOCK);
              sink.written.set(digest, extent);
              await store.write(extent, buf);
            }
            fresh.push({ digest, extent });
            where.set(digest, extent);
          }
          keep = new Set(plan.fresh);
          await healChunks(store, plan.heal, bytesOf);
          if (plan.heal.length > 0 || (fresh.length > 0 && !segmented)) await store.sync();
          const own = sink.writer && fresh.length > 0 ? store.segments.finish(sink.writer) : null;
          if (plan.heal.length > 0) store.markGood(plan.heal.map((h) => h.id));
          // Adopted files the layer's new chunks are in: made durable (containerd wrote them, never synced), devices of the image; the others go.
          const inAdopted = new Set(fresh.map((f) => f.extent.segment ?? 0).filter((seg) => adoptedIds.has(seg)));
          const adoptedRows: SegmentRow[] = [];
          // (On a failure from here the sink's discard deletes them all.)
          for (const w of sink.adopted) {
            if (inAdopted.has(w.id)) adoptedRows.push(store.segments.finish(w));
            else store.segments.abandon(w);
          }

          const devices = [...plan.devices.map((seg) => (seg === NEW_SEGMENT ? (own as SegmentRow).id : seg)), ...adoptedRows.map((r) => r.id)];
          const deviceOf = new Map(devices.map((seg, i) => [seg, i + 1]));
          const { image: img, files, logicalBytes } = writeErofsImage({
            root,
            chunkSize: sink.chunkSize,
            devices: devices.map((seg) => ({ tag: segmentTag(seg), blocks: store.segmentBlocks(seg) })),
            address: (n) => {
              const e = where.get(sink.digests[n]) as Extent;
              return { deviceId: deviceOf.get(e.segment ?? 0) as number, blkaddr: e.blkaddr };
            },
          });
          const image = this.imagePath(id);
          const imageSha256 = await this.writeImage(image, img);
          try {
            const out = finish(convertedLayer(plan, fresh, { image, imageSha256, hasBlob: devices.length > 0, files, logicalBytes, imageBytes: img.length, mkfsMs: buildMs, importStarted: t1, adopted: new Set(adoptedRows.map((r) => r.id)) }));
            if (own) store.segments.committed(own.id);
            for (const r of adoptedRows) store.segments.committed(r.id);
            return out;
          } catch (err) {
            fs.rmSync(image, { force: true });
            throw err;
          }
        } finally {
          for (const pid of pinned) store.unpin(pid);
        }
      });
    } catch (err) {
      // Nothing kept: provisional extents are freed, the layer's own segment (finished or not) is deleted.
      keep = new Set();
      throw err;
    } finally {
      await sink.discard(keep);
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
      const segmented = store.layout === 'segments';
      // An image too big for a device table after it reads from one place only.
      const roomy = Math.ceil(img.length / STORE_BLOCK) * STORE_BLOCK + store.maxDevices * EROFS_DEVT_SLOT_SIZE <= MAX_IMAGE_BEFORE_DEVT;
      const plan = store.inOneRead(() => placeChunks(layer.chunks, (d) => store.lookupAll(d), { freshSegment: segmented ? NEW_SEGMENT : 0, maxDevices: roomy ? store.maxDevices : 1 }));
      const pinned = pinPlanned(store, plan);
      const fresh: { digest: string; extent: Extent; key: string }[] = [];
      const placed: string[] = [];
      const keyOf = new Map<string, string>();
      const blocksOf = new Map<string, number>();
      for (const c of layer.chunks) {
        if (keyOf.has(c.digest)) continue;
        keyOf.set(c.digest, c.key);
        blocksOf.set(c.digest, c.nblocks);
      }
      let writer: SegmentWriter | null = null;
      try {
        if (plan.fresh.length > 0 && segmented) writer = store.segments.create();
        for (const digest of plan.fresh) {
          const key = keyOf.get(digest) as string;
          const buf = await read(key);
          const nblocks = blocksOf.get(digest) as number;
          if (buf.length !== nblocks * STORE_BLOCK) throw new Error(`chunk ${digest}: ${buf.length} bytes, expected ${nblocks * STORE_BLOCK}`);
          if (writer) {
            fresh.push({ digest, key, extent: await store.append(writer, buf) });
          } else {
            const extent = store.allocate(nblocks);
            fresh.push({ digest, key, extent });
            await store.write(extent, buf);
          }
        }
        await healChunks(store, plan.heal, (digest) => read(keyOf.get(digest) as string));
        if (plan.heal.length > 0 || (fresh.length > 0 && !writer)) await store.sync();
        // Sealed (fs-verity, where the filesystem has it) before any row names it.
        const own = writer ? store.segments.finish(writer) : null;
        if (plan.heal.length > 0) store.markGood(plan.heal.map((h) => h.id));

        const where = new Map<string, Extent>();
        for (const [digest, row] of plan.use) where.set(digest, row);
        for (const f of fresh) where.set(f.digest, f.extent);
        const deviceOf = new Map(plan.devices.map((seg, i) => [seg === NEW_SEGMENT ? (own?.id ?? NEW_SEGMENT) : seg, i + 1]));
        for (const r of layer.refs) {
          const digest = digestOf.get(extentKey(r));
          if (digest === undefined) throw new Error(`chunk index at block ${r.blkaddr} (+${r.nblocks}) has no digest`);
          const e = where.get(digest) as Extent;
          setChunkAddress(img, r, deviceOf.get(e.segment ?? 0) as number, e.blkaddr);
        }
        if (plan.devices.length > 0) {
          img = setDeviceTable(
            img,
            plan.devices.map((seg) => {
              const id = seg === NEW_SEGMENT ? (own as SegmentRow).id : seg;
              return { tag: segmentTag(id), blocks: store.segmentBlocks(id) };
            }),
          );
        }
        updateSuperblockChecksum(img);
        const image = this.imagePath(id);
        const imageSha256 = await this.writeImage(image, img);
        placed.push(image);
        const out = finish(
          convertedLayer(plan, fresh, {
            image,
            imageSha256,
            hasBlob: layer.scan.sb.extraDevices > 0,
            files: layer.scan.files,
            logicalBytes: layer.scan.logicalBytes,
            imageBytes: img.length,
            mkfsMs: layer.mkfsMs,
            importStarted: t1,
          }),
        );
        if (writer) store.segments.committed(writer.id);
        return out;
      } catch (err) {
        if (writer) store.segments.abandon(writer);
        else store.releaseExtents(fresh.map((f) => f.extent));
        for (const p of placed) fs.rmSync(p, { force: true });
        throw err;
      } finally {
        for (const pid of pinned) store.unpin(pid);
      }
    });
  }
}

/** Pins the stored chunks a placement references or heals, so no removal frees them meanwhile; returns their ids to unpin. */
function pinPlanned(store: ChunkStore, plan: Placement): number[] {
  const ids = [...plan.use.values(), ...plan.heal].map((row) => row.id);
  for (const id of ids) store.pin(id);
  return ids;
}

/**
 * Writes the layer's bytes of each damaged stored chunk over it. Whatever
 * the source, only the right bytes go over a chunk other layers reference:
 * each is hashed first. The caller syncs and marks them good.
 */
async function healChunks(store: ChunkStore, heal: readonly StoredChunk[], bytesOf: (digest: string) => Promise<Buffer>): Promise<void> {
  for (const h of heal) {
    const buf = await bytesOf(h.digest);
    const got = crypto.createHash('sha256').update(buf).digest('hex');
    if (got !== h.digest) throw new Error(`chunk ${h.digest}: the bytes read for it hash to ${got}`);
    await store.write(h, buf);
  }
}

/** What an import hands to `finish`: the image, the chunks to record (new) and reference (stored), and the layer's figures. */
function convertedLayer(
  plan: Placement,
  fresh: { digest: string; extent: Extent }[],
  o: { image: string; imageSha256: string; hasBlob: boolean; files: number; logicalBytes: number; imageBytes: number; mkfsMs: number; importStarted: number; adopted?: ReadonlySet<number> },
): ConvertedLayer {
  const adopted = o.adopted ?? new Set<number>();
  const distinct = plan.use.size + fresh.length;
  return {
    image: o.image,
    imageSha256: o.imageSha256,
    hasBlob: o.hasBlob,
    newChunks: fresh.map((f) => ({ digest: f.digest, extent: f.extent })),
    existingChunkIds: [...new Set([...plan.use.values()].map((r) => r.id))],
    stats: {
      files: o.files,
      logicalBytes: o.logicalBytes,
      chunks: distinct,
      newChunks: fresh.length,
      dedupChunks: distinct - fresh.length,
      newBytes: fresh.reduce((n, f) => n + f.extent.nblocks * STORE_BLOCK, 0),
      healedChunks: plan.heal.length,
      adoptedBytes: fresh.filter((f) => adopted.has(f.extent.segment ?? 0)).reduce((n, f) => n + f.extent.nblocks * STORE_BLOCK, 0),
      imageBytes: o.imageBytes,
      mkfsMs: o.mkfsMs,
      importMs: Date.now() - o.importStarted,
    },
  };
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
