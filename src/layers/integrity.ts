import crypto from 'node:crypto';
import fs from 'node:fs';
import type { Logger } from '../log/logger';
import type { ChunkEntry, LayerHeader } from '../remote/dedup-image';
import { LABEL_CRI_IMAGE_REF, type RemoteLayers } from '../remote/lazy';
import { parseReference } from '../remote/reference';
import type { ChunkRow, ChunkStore } from '../store/chunkstore';
import { fileStamp } from '../store/segments';
import { type VerifyProgress, type VerifyResult, verifyChunks } from '../store/verify';
import type { MetaStore } from '../store/metastore';
import { Kind } from '../store/types';

/**
 * Which layers may be served: a layer whose image file does not hash to
 * what was recorded when it was written, that the kernel refuses to mount,
 * or that references a bad chunk (see ChunkStore) is quarantined: never
 * handed out in a mount (Mounts fails with FailedPrecondition naming it),
 * its own mount taken down, one error line naming it and the images it
 * belongs to, /healthz 503 and a doctor FAIL while any is. Every other
 * layer keeps being served. A quarantine ends when the layer is removed
 * (containerd removes it with its image) or when its chunks are good again
 * (an import brought their bytes, or fsck found the file put back).
 */

/** Why a layer is quarantined because of its chunks (lifted when they are good again: an import of the same bytes heals them). */
export const CHUNKS_REASON = /^\d+ chunks? of its data (are|is) (lost or )?damaged/;
/** …or because of its image (lifted when fsck finds it whole again). */
const IMAGE_REASON = /^its image .* (is damaged|cannot be read)/;

export interface LayerProblem {
  layer: string;
  reason: string;
  /** containerd's key of the layer's snapshot (`<namespace>/<n>/<chain id>`). */
  key: string;
  /** Image references from CRI labels on the layer or the snapshots stacked on it. */
  images: string[];
  /** The layer's snapshot and every snapshot stacked on it, leaves first: containerd's key and kind. */
  stack: { key: string; kind: 'committed' | 'active' | 'view' }[];
}

export interface IntegrityReport {
  /** What start-up or fsck found wrong with the store file itself. */
  store: string | null;
  verified: VerifyProgress | null;
  badChunks: number;
  quarantined: LayerProblem[];
  /** Layers whose quarantine ended (their chunks are good again). */
  released: string[];
  /** Bad chunks fetched again from a registry and written back (fsck). */
  repaired: number;
  /** Bad chunks no registry could provide, with why (fsck; at most 20). */
  unrepaired: string[];
}

export interface IntegrityOptions {
  ms: MetaStore;
  store: ChunkStore;
  /** Registries of dedup images: bad chunks of layers made from them are fetched again by fsck. */
  remote?: RemoteLayers | null;
  /** Path of layer `id`'s image file (store image or lazy image). */
  imagePath: (id: string) => string;
  /** Detaches layer `id`'s mount and removes its mount point (the kernel seam). */
  unmountLayer: (id: string) => void;
  /** Every EROFS layer now (for the scrub). */
  layerIds: () => string[];
  logger: Logger;
  /** Start-up verification progress (about once a second): the daemon tells systemd it is still starting. */
  onStartProgress?: (p: VerifyProgress) => void;
}

export class LayerIntegrity {
  private scrubTimer: NodeJS.Timeout | null = null;
  private watchTimer: NodeJS.Timeout | null = null;
  private scrubAbort: AbortController | null = null;
  private running: Promise<unknown> | null = null;
  /** Last completed background scrub (ms since epoch), for /stats. */
  lastScrubMs: number | null = null;
  scrubbedBytes = 0;

  constructor(private readonly o: IntegrityOptions) {}

  isQuarantined(id: string): string | null {
    return this.o.ms.quarantineOf(id)?.reason ?? null;
  }

  /** Takes layer `id` out of service: recorded, its mount detached (containers running on it keep what they hold). */
  quarantine(id: string, reason: string): boolean {
    // Removed meanwhile (the scrub works from a list taken earlier): nothing to keep out of service.
    if (this.o.ms.keyOf(id) === undefined) return false;
    const fresh = this.o.ms.quarantine(id, reason);
    try {
      this.o.unmountLayer(id);
    } catch (err) {
      this.o.logger.warn({ op: 'integrity', layer: id, snapshot: id, err: (err as Error).message }, `cannot unmount quarantined layer ${id}: ${(err as Error).message}`);
    }
    return fresh;
  }

  /** The layer, its key and the images it serves, for messages. */
  describe(id: string, reason: string): LayerProblem {
    const rows = this.o.ms.withDescendants(id);
    const images = new Set<string>();
    for (const r of rows) {
      const ref = r.labels[LABEL_CRI_IMAGE_REF];
      if (ref && r.kind === Kind.Committed) images.add(ref);
    }
    const remoteRef = this.o.ms.remoteImageOf(id);
    if (remoteRef) images.add(remoteRef);
    const kinds = { [Kind.Committed]: 'committed', [Kind.Active]: 'active', [Kind.View]: 'view' } as const;
    const stack = rows
      .slice()
      .sort((a, b) => Number(b.id) - Number(a.id))
      .map((r) => ({ key: r.key, kind: kinds[r.kind as Kind.Committed | Kind.Active | Kind.View] ?? 'committed' }));
    return { layer: id, reason, key: rows.find((r) => r.id === id)?.key ?? '', images: [...images], stack };
  }

  problems(): LayerProblem[] {
    return this.o.ms.quarantined().map((q) => this.describe(String(q.snapshot_id), q.reason));
  }

  /** A line for /healthz, or null when every layer is served and the store file is in place. */
  healthProblem(): string | null {
    const file = this.o.store.fileProblem();
    if (file) return `chunk store: ${file}`;
    const q = this.o.ms.quarantined();
    if (q.length === 0) return null;
    const first = q[0];
    return `${q.length} layer${q.length === 1 ? ' is' : 's are'} quarantined (not served) because their data is damaged, e.g. layer ${first.snapshot_id}: ${first.reason}; run dedup-snapshotter fsck`;
  }

  /**
   * Start-up, before any layer is mounted: every chunk verified when the
   * store file may have changed behind this daemon's back, each layer's
   * image checked against its recorded digest (recorded now for layers
   * written before digests were kept), layers on bad chunks quarantined.
   */
  async checkAtStart(layerIds: string[]): Promise<IntegrityReport> {
    const store = this.o.store;
    const log = this.o.logger;
    if (store.openProblem) log.error({ op: 'integrity', store: store.blobPath }, `chunk store: ${store.openProblem}`);
    let verified: VerifyResult | null = null;
    // The stamp is saved again once recovery is done (Snapshotter.recover).
    const check = store.chunksToVerifyAtStart();
    if (check.why.length > 0) {
      verified = await this.verifyAll('start', 0, undefined, undefined, check);
      store.acceptChangedSegments();
    }
    for (const id of layerIds) this.checkImage(id, 'changed');
    return this.settleQuarantine(verified, store.openProblem);
  }

  /**
   * `dedup-snapshotter fsck`: every chunk and every layer image verified at
   * full speed (progress to `onProgress`), quarantines brought up to date.
   */
  async fsck(layerIds: string[], onProgress?: (p: VerifyProgress) => void): Promise<IntegrityReport> {
    const verified = await this.verifyAll('fsck', 0, onProgress);
    for (const id of layerIds) this.checkImage(id, 'all');
    const { repaired, unrepaired } = await this.repairFromRegistries();
    return { ...this.settleQuarantine(verified, this.o.store.fileProblem()), repaired, unrepaired };
  }

  /**
   * Bad chunks of layers made from a dedup image: fetched again from its
   * registry (checked against the digest by the registry client, and here),
   * written at the chunk's own address, made durable, marked good.
   */
  private async repairFromRegistries(): Promise<{ repaired: number; unrepaired: string[] }> {
    const store = this.o.store;
    const bad = this.o.ms.db.prepare('SELECT c.* FROM chunks c JOIN bad_chunks b ON b.chunk_id = c.id ORDER BY c.id').all() as ChunkRow[];
    let repaired = 0;
    const unrepaired: string[] = [];
    for (const row of bad) {
      const why: string[] = [];
      for (const src of this.o.remote ? this.o.ms.remoteSourcesOfChunk(row.id) : []) {
        const header = JSON.parse(src.header) as LayerHeader;
        const entry = header.chunks.find((c: ChunkEntry) => c[2] === row.digest && c[1] === row.nblocks);
        if (!entry) continue;
        try {
          const rl = { repo: parseReference(src.image_ref), manifestDigest: src.manifest_digest, layerDigest: src.layer_digest };
          const bytes = await (this.o.remote as RemoteLayers).fetchChunk(rl, header, entry);
          const buf = bytes.length === row.nblocks * 4096 ? bytes : Buffer.concat([bytes, Buffer.alloc(row.nblocks * 4096 - bytes.length)]);
          if (crypto.createHash('sha256').update(buf).digest('hex') !== row.digest) throw new Error('the fetched bytes do not match the digest');
          await store.withLock(async () => {
            await store.write(row, buf);
            await store.sync();
          });
          store.markGood([row.id]);
          repaired++;
          this.o.logger.info({ op: 'fsck', chunk: row.digest, layer: String(src.snapshot_id), image: src.image_ref }, `chunk sha256:${row.digest} fetched again from ${src.image_ref} and written back`);
          why.length = 0;
          break;
        } catch (err) {
          why.push(`${src.image_ref}: ${(err as Error).message}`);
        }
      }
      if (store.lookup(row.digest) === undefined && unrepaired.length < 20) unrepaired.push(`sha256:${row.digest}: ${why.length > 0 ? why.join('; ') : 'no registry has it (the layers using it were unpacked by containerd)'}`);
    }
    return { repaired, unrepaired };
  }

  private async verifyAll(
    why: 'start' | 'fsck' | 'scrub',
    mbps: number,
    onProgress?: (p: VerifyProgress) => void,
    signal?: AbortSignal,
    only?: { ids: number[]; why: string[] },
  ): Promise<VerifyResult> {
    const log = this.o.logger;
    const started = Date.now();
    const what = only ? only.why.join('; ') : { start: '', fsck: 'fsck', scrub: 'background scrub' }[why];
    if (why !== 'scrub') log.info({ op: 'integrity', store: this.o.store.blobPath }, `verifying ${only ? `${only.ids.length} chunks` : 'every chunk'} of the store against their digests: ${what}`);
    const res = await verifyChunks(this.o.store, this.o.ms.db, {
      ids: only?.ids,
      mbps,
      signal,
      onProgress: (p) => {
        onProgress?.(p);
        if (why === 'start') this.o.onStartProgress?.(p);
        if (why !== 'scrub' && p.checked < p.total) log.info({ op: 'integrity', checked: p.checked, total: p.total, bytes: p.bytes, bad: p.bad }, `verified ${p.checked} of ${p.total} chunks`);
      },
    });
    if (why === 'scrub') this.scrubbedBytes += res.bytes;
    log.info(
      { op: 'integrity', checked: res.checked, bytes: res.bytes, bad: res.bad, newly_bad: res.newlyBad.length, restored: res.restored.length, duration_ms: Date.now() - started, why },
      `verified ${res.checked} chunks (${res.bytes} bytes): ${res.bad} bad${res.restored.length > 0 ? `, ${res.restored.length} good again` : ''}`,
    );
    return res;
  }

  /**
   * Quarantines layer `id` if its image file is missing or does not hash to
   * its recorded digest. At start ('changed') only an image whose file
   * changed (inode, size, change time) since it last hashed right is read;
   * 'all' (fsck, scrub) reads every one, and releases a layer whose image
   * hashes right again.
   */
  private checkImage(id: string, which: 'changed' | 'all'): void {
    const quarantined = this.isQuarantined(id);
    if (which === 'changed' && quarantined) return;
    const file = this.o.imagePath(id);
    const want = this.o.ms.imageDigest(id);
    let got: string;
    let stamp: string;
    try {
      const st = fs.statSync(file, { bigint: true });
      stamp = fileStamp(st);
      if (which === 'changed' && want?.stamp === stamp) return;
      got = crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
    } catch (err) {
      this.quarantineAndLog(id, `its image ${file} cannot be read: ${(err as Error).message}`);
      return;
    }
    if (want === undefined) {
      // Written by a version that kept no digest: this one is trusted from now on.
      this.o.ms.setImageDigest(id, got);
      this.o.ms.setImageStamp(id, stamp);
    } else if (want.sha256 !== got) {
      this.quarantineAndLog(id, `its image ${file} is damaged (sha256:${got}, written as sha256:${want.sha256})`);
    } else {
      this.o.ms.setImageStamp(id, stamp);
      if (quarantined && IMAGE_REASON.test(quarantined)) {
        this.o.ms.release(id);
        this.o.logger.info({ op: 'integrity', layer: id, snapshot: id }, `layer ${id} served again: its image is whole again`);
      }
    }
  }

  /** Quarantines a layer (one error line) unless it already is. */
  quarantineAndLog(id: string, reason: string): void {
    if (!this.quarantine(id, reason)) return;
    const p = this.describe(id, reason);
    this.o.logger.error(
      { op: 'integrity', layer: id, snapshot: id, key: p.key, images: p.images, reason },
      `layer ${id} quarantined, not served: ${reason}; images using it: ${p.images.length > 0 ? p.images.join(', ') : `(snapshot ${p.key})`}; remove them and pull again, or run dedup-snapshotter fsck`,
    );
  }

  /** Layers on bad chunks quarantined, those whose chunks are all good again released; one error line for the new ones. */
  private settleQuarantine(verified: VerifyResult | null, storeProblem: string | null): IntegrityReport {
    const bad = this.o.store.layersWithBadChunks();
    const fresh: LayerProblem[] = [];
    for (const [id, n] of bad) {
      const reason = `${n} chunk${n === 1 ? ' of its data is' : 's of its data are'} lost or damaged in the chunk store`;
      if (this.quarantine(String(id), reason)) fresh.push(this.describe(String(id), reason));
    }
    const released: string[] = [];
    for (const q of this.o.ms.quarantined()) {
      const id = String(q.snapshot_id);
      if (CHUNKS_REASON.test(q.reason) && !bad.has(q.snapshot_id)) {
        this.o.ms.release(id);
        released.push(id);
      }
    }
    if (fresh.length > 0) {
      const images = [...new Set(fresh.flatMap((p) => p.images))];
      this.o.logger.error(
        { op: 'integrity', layers: fresh.map((p) => p.layer), keys: fresh.map((p) => p.key), images, bad_chunks: this.o.store.badChunkCount() },
        `${fresh.length} layers quarantined, not served (their data in the chunk store is lost or damaged): layers ${fresh.map((p) => p.layer).join(', ')}; images: ${images.length > 0 ? images.join(', ') : fresh.map((p) => p.key).join(', ')}; remove those images and pull them again (dedup-snapshotter fsck lists them)`,
      );
    }
    for (const id of released) this.o.logger.info({ op: 'integrity', layer: id, snapshot: id }, `layer ${id} served again: its chunks are good again`);
    return { store: storeProblem, verified, badChunks: this.o.store.badChunkCount(), quarantined: this.problems(), released, repaired: 0, unrepaired: [] };
  }

  /** Chunks turned bad (met while serving) or good (healed by an import): quarantines brought up to date. */
  afterChunkHealth(): void {
    this.settleQuarantine(null, null);
  }

  /**
   * Background scrub: every `intervalMs`, every chunk read back at `mbps`
   * and checked; damage found quarantines the layers that use it.
   */
  startScrub(mbps: number, intervalMs: number, firstInMs = intervalMs): void {
    if (intervalMs <= 0 || mbps <= 0) return;
    const run = () => {
      this.scrubTimer = null;
      this.scrubAbort = new AbortController();
      this.running = this.verifyAll('scrub', mbps, undefined, this.scrubAbort.signal)
        .then((res) => {
          if (this.scrubAbort?.signal.aborted) return;
          // Images too: bit rot does not change a file's change time.
          for (const id of this.o.layerIds()) this.checkImage(id, 'all');
          this.lastScrubMs = Date.now();
          this.settleQuarantine(res, null);
        })
        .catch((err: Error) => this.o.logger.error({ op: 'integrity', err: err.message }, `background scrub failed: ${err.message}`))
        .finally(() => {
          this.running = null;
          if (!this.scrubAbort?.signal.aborted) {
            this.scrubTimer = setTimeout(run, intervalMs);
            this.scrubTimer.unref();
          }
        });
    };
    this.scrubTimer = setTimeout(run, firstInMs);
    this.scrubTimer.unref();
  }

  /**
   * Every `everyMs`: if the store file was deleted or replaced under the
   * daemon, it is put back from the file this process holds open (see
   * ChunkStore.restoreFile), so that nothing is lost at the next start.
   */
  watchStoreFile(everyMs = 10_000): void {
    const store = this.o.store;
    this.watchTimer = setInterval(() => {
      if (!store.fileProblem()) return;
      store.withLock(() => store.restoreFile()).catch((err: Error) => this.o.logger.error({ op: 'integrity', store: store.blobPath, err: err.message }, `cannot put the chunk store file back: ${err.message}`));
    }, everyMs);
    this.watchTimer.unref();
  }

  async stop(): Promise<void> {
    if (this.watchTimer) clearInterval(this.watchTimer);
    if (this.scrubTimer) clearTimeout(this.scrubTimer);
    this.scrubTimer = null;
    this.scrubAbort?.abort();
    await this.running;
  }
}
