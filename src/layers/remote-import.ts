import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { extentKey, scanDataChunks } from '../convert/chunks';
import type { ConvertStats, Converter } from '../convert/converter';
import { internal } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import type { LazyLayerInput, LazyLoader } from '../ondemand/lazy-loader';
import type { ChunkEntry, LayerHeader } from '../remote/dedup-image';
import { LABEL_SNAPSHOT_REF, type RemoteLayer, type RemoteLayers, runsOf } from '../remote/lazy';
import { formatReference } from '../remote/reference';
import type { ChunkStore } from '../store/chunkstore';
import type { MetaStore } from '../store/metastore';
import type { RootLayout } from '../store/root-layout';
import type { Labels } from '../store/types';
import { removeAll } from '../util/fs';
import type { ConversionQueue } from './conversion';
import type { ConvertEvents } from './events';
import type { LayerMounts } from './layer-mounts';
import { addLayerRow } from './record';
import type { Settler } from './settle';

/** Key of the temporary active snapshot a remote layer is made in (never a containerd key: those carry a namespace). */
export const REMOTE_IMPORT_PREFIX = 'remote-import-';

/** What an import needs of the snapshot lifecycle: a temporary active snapshot to build in, and its removal. */
export interface ImportSnapshots {
  createActive(key: string, parent: string): Promise<void>;
  remove(key: string): Promise<void>;
}

export interface RemoteImportOptions {
  layout: RootLayout;
  ms: MetaStore;
  store: ChunkStore;
  converter: Converter;
  remote: RemoteLayers;
  /** null: a layer's missing chunks are fetched before Prepare returns. */
  loader: LazyLoader | null;
  mounts: LayerMounts;
  conversion: ConversionQueue;
  settler: Settler | null;
  events: ConvertEvents;
  snapshots: ImportSnapshots;
  /** registry.fetch_layers: layers of plain images fetched and converted here (plain-fetch.ts); null: containerd's. */
  plain: { importFor(labels: Labels, parent: string, key: string): Promise<boolean> } | null;
  logger: Logger;
}

/**
 * Remote layers (containerd's remote-snapshot contract): a Prepare whose
 * labels name a layer of a dedup image in a registry makes the committed
 * layer itself, from the layer's EROFS metadata and the chunks the node
 * lacks (fetched now, or on demand when a loader is configured), and
 * containerd then skips its download and unpack.
 */
export class RemoteImporter {
  /** Two pulls of one image at once make each layer once. */
  private readonly making = new Map<string, Promise<void>>();

  constructor(private readonly o: RemoteImportOptions) {}

  /**
   * When `labels` name a remote layer: makes it as snapshot `ref` (the
   * target key in the labels) and returns true; a layer of a plain image:
   * the registry fetch (plain-fetch.ts), named in `key`'s namespace; false
   * when containerd should make the layer.
   */
  async importFor(labels: Labels | undefined, parent: string, key: string): Promise<boolean> {
    const ref = labels?.[LABEL_SNAPSHOT_REF];
    if (!ref) return false;
    const rl = await this.o.remote.resolve(labels);
    if (!rl) return this.o.plain ? this.o.plain.importFor(labels as Labels, parent, key) : false;
    let making = this.making.get(ref);
    if (!making) {
      making = this.make(rl, ref, parent, labels as Labels).finally(() => this.making.delete(ref));
      this.making.set(ref, making);
    }
    await making;
    return true;
  }

  /**
   * Makes committed layer `name` from a dedup image's layer: its EROFS image
   * from the registry, and from its chunks only those the node store lacks
   * (fetched by Range, digest-checked, written durably before any row names
   * them). Done when it returns; if `name` exists already, nothing to do.
   */
  private async make(rl: RemoteLayer, name: string, parent: string, labels: Labels): Promise<void> {
    const { ms, remote, store, layout } = this.o;
    if (ms.has(name)) return;
    const started = Date.now();
    const { header, erofs } = await remote.fetchLayer(rl);
    const img = Buffer.from(erofs);
    const { scan, refs } = scanDataChunks(img);
    if (refs.length > 0 && !header.has_blob) throw internal(`remote layer ${rl.layerDigest}: the image has chunks but the header says has_blob false`);
    if (this.o.loader && header.chunks.length > 0) return this.makeLazy(rl, name, parent, labels, header, img, started);
    const entries = new Map(header.chunks.map((c) => [extentKey({ blkaddr: c[0], nblocks: c[1] }), c]));

    // Fetch what the store lacks before taking its lock (a slow registry must
    // not hold up conversions), into a temp file; the import then reads from there.
    const tmpKey = `${REMOTE_IMPORT_PREFIX}${crypto.randomBytes(8).toString('hex')}`;
    fs.mkdirSync(layout.tmpDir, { recursive: true, mode: 0o700 });
    const spool = path.join(layout.tmpDir, `${tmpKey}.chunks`);
    const spooled = new Map<string, { offset: number; length: number }>();
    const fh = await fs.promises.open(spool, 'w+', 0o600);
    let created = false;
    try {
      let size = 0;
      // Each missing digest once (an extent may repeat another's content), fetched in runs.
      const byDigest = new Map<string, ChunkEntry>();
      let local = 0;
      for (const c of entries.values()) {
        if (store.lookup(c[2])) {
          local++;
          remote.counters.chunks_local++;
          remote.counters.bytes_local += c[1] * 4096;
        } else if (!byDigest.has(c[2])) byDigest.set(c[2], c);
      }
      const missing = [...byDigest.values()];
      const runs = runsOf(missing);
      let next = 0;
      const worker = async () => {
        while (next < runs.length) {
          const run = runs[next++];
          const parts = await remote.fetchRun(rl, header, run);
          for (const [i, bytes] of parts.entries()) {
            const at = size;
            size += bytes.length;
            spooled.set(run[i][2], { offset: at, length: bytes.length });
            await fh.write(bytes, 0, bytes.length, at);
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(4, runs.length) }, worker));

      await this.o.snapshots.createActive(tmpKey, parent);
      created = true;
      const id = ms.getInfo(tmpKey).id;
      const chunks = [...entries].map(([key, c]) => ({ key, digest: c[2], nblocks: c[1] }));
      const stats = await this.o.converter.importChunks(
        id,
        img,
        { scan, refs, chunks, mkfsMs: 0 },
        async (key) => {
          const entry = entries.get(key) as ChunkEntry;
          const at = spooled.get(entry[2]);
          // Present when checked above, gone since (removed meanwhile): fetch now.
          if (!at) return remote.fetchChunk(rl, header, entry);
          const buf = Buffer.alloc(at.length);
          const { bytesRead } = await fh.read(buf, 0, at.length, at.offset);
          if (bytesRead !== at.length) throw internal(`spooled chunk ${key}: read ${bytesRead} of ${at.length} bytes`);
          return buf;
        },
        this.o.conversion.mountAndRecord(id, started, () => {
          ms.commitActive(tmpKey, name, { size: header.logical_bytes, inodes: header.files }, labels);
          ms.addRemoteSource(id, { image_ref: formatReference(rl.repo), manifest_digest: rl.manifestDigest, layer_digest: rl.layerDigest, header: JSON.stringify(header) });
        }),
      );
      created = false;
      await removeAll(layout.snapshotDir(id));
      this.made(
        rl,
        name,
        id,
        started,
        stats,
        { chunks: stats.chunks, fetched_chunks: missing.length, fetched_bytes: size, local_chunks: local, logical_bytes: header.logical_bytes },
        `remote layer ${id} made from ${rl.layerDigest}: ${missing.length} chunks fetched (${size} bytes), ${local} already on this node`,
      );
    } finally {
      await fh.close();
      fs.rmSync(spool, { force: true });
      if (created) await this.o.snapshots.remove(tmpKey).catch(() => undefined);
    }
  }

  /**
   * The on-demand variant of make: the layer is committed and mounted with
   * only its metadata here (lazy/<id>.erofs); its chunk space is
   * lazy/<id>.blob, holding the chunks this node had; reads of the rest wait
   * until they are fetched (its file marked for fanotify, or asked for by
   * fscache; see LazyLoader).
   */
  private async makeLazy(rl: RemoteLayer, name: string, parent: string, labels: Labels, header: LayerHeader, img: Buffer, started: number): Promise<void> {
    const { ms, mounts, remote, loader } = this.o;
    if (!loader) throw internal(`remote layer ${rl.layerDigest}: on-demand loading is off`);
    const tmpKey = `${REMOTE_IMPORT_PREFIX}${crypto.randomBytes(8).toString('hex')}`;
    await this.o.snapshots.createActive(tmpKey, parent);
    const id = ms.getInfo(tmpKey).id;
    const input: LazyLayerInput = { id, rl, header };
    const image = loader.imageOf(id);
    // Not an orphan for a Cleanup running meanwhile.
    mounts.hold(id);
    let done = false;
    try {
      const made = await loader.create(input);
      const stats: ConvertStats = { files: header.files, logicalBytes: header.logical_bytes, chunks: header.chunks.length, newChunks: 0, dedupChunks: made.local, newBytes: 0, imageBytes: img.length, mkfsMs: 0, importMs: 0 };
      const imageSha256 = await this.o.converter.writeImage(image, img);
      // Known to the loader before the mount: fscache reads the image through it.
      loader.register(input);
      await mounts.mountLazy({ snapshot_id: Number(id), has_blob: header.has_blob ? 1 : 0 });
      try {
        ms.transaction(() => {
          ms.commitActive(tmpKey, name, { size: header.logical_bytes, inodes: header.files }, labels);
          addLayerRow(ms, id, header.has_blob, stats, started);
          const source = { image_ref: formatReference(rl.repo), manifest_digest: rl.manifestDigest, layer_digest: rl.layerDigest, header: JSON.stringify(header) };
          ms.addLazyLayer(id, source);
          ms.addRemoteSource(id, source);
          ms.setImageDigest(id, imageSha256);
        });
      } catch (err) {
        mounts.unmount(id);
        throw err;
      }
      done = true;
      loader.prefetchInBackground(id);
      // Every chunk was on the node already: it can go into the store at once.
      if (made.missing === 0) this.o.settler?.schedule(mounts.graceMs);
      await removeAll(this.o.layout.snapshotDir(id));
      remote.counters.chunks_local += made.local;
      remote.counters.bytes_local += made.localBytes;
      this.made(
        rl,
        name,
        id,
        started,
        stats,
        { ondemand: loader.backend, chunks: header.chunks.length, fetched_chunks: 0, missing_chunks: made.missing, local_chunks: made.local, logical_bytes: header.logical_bytes },
        `remote layer ${id} mounted from ${rl.layerDigest} with its metadata: ${made.missing} chunks load on demand, ${made.local} already on this node`,
      );
    } finally {
      mounts.untrack(id);
      if (!done) {
        loader.drop(id);
        fs.rmSync(image, { force: true });
        await this.o.snapshots.remove(tmpKey).catch(() => undefined);
      }
    }
  }

  /** A remote layer is committed: counted, logged (one "op":"remote" line), told to listeners. */
  private made(rl: RemoteLayer, name: string, id: string, started: number, stats: ConvertStats, fields: Record<string, unknown>, msg: string): void {
    const counters = this.o.remote.counters;
    counters.layers++;
    if (rl.sourceLayer) counters.converted_layers++;
    const durationMs = Date.now() - started;
    const source = rl.sourceLayer ? { source_layer: rl.sourceLayer } : {};
    this.o.logger.info({ op: 'remote', key: name, snapshot: id, layer: id, image: formatReference(rl.repo), layer_digest: rl.layerDigest, ...source, ...fields, duration_ms: durationMs }, msg);
    this.o.events.emit({ key: name, layer: id, ok: true, durationMs, stats, mode: 'remote' });
  }
}
