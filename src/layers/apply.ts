import fs from 'node:fs';
import path from 'node:path';
import { ContainerdClient } from '../containerd/client';
import { StoreChunkSink } from '../convert/chunk-sink';
import type { ConvertStats, Converter } from '../convert/converter';
import { LAYER_MEDIA_TYPES, treeFromLayerBlob } from '../convert/layer-stream';
import { failedPrecondition, invalidArgument, notFound, notImplemented } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import type { ChunkStore } from '../store/chunkstore';
import type { MetaStore } from '../store/metastore';
import type { RootLayout } from '../store/root-layout';
import { splitKey } from '../store/keys';
import { Kind } from '../store/types';
import type { ConversionQueue } from './conversion';
import { type ConvertEvents, convertedFields, convertedSummary } from './events';
import type { LayerMounts } from './layer-mounts';

/** The media type of what Apply returns: the uncompressed layer (containerd's walking differ says the same). */
export const MEDIA_TYPE_LAYER_TAR = 'application/vnd.oci.image.layer.v1.tar';


export interface MountSpec {
  type: string;
  source: string;
  target?: string;
  options: string[];
}

export interface ApplyRequest {
  mediaType: string;
  digest: string;
  size: number;
  mounts: MountSpec[];
  /**
   * containerd's namespace of the call (its `containerd-namespace` header),
   * in which the Read RPC reads the blob; without one (containerd 1.7 sends
   * none), the namespace the snapshot's key names.
   */
  namespace?: string;
}

export interface Applied {
  mediaType: string;
  /** sha256 of the uncompressed tar: the layer's diff id, which containerd checks against the image config. */
  digest: string;
  size: number;
}

export interface LayerApplyOptions {
  ms: MetaStore;
  layout: RootLayout;
  store: ChunkStore;
  converter: Converter;
  conversion: ConversionQueue;
  mounts: LayerMounts;
  events: ConvertEvents;
  chunkSize: number;
  /** containerd's socket, where layer blobs are read (Content service, in the call's namespace). */
  containerdAddress: string;
  /**
   * containerd's root directory (its content store's blobs are read there
   * directly when whole; else through the socket). Empty: always the socket.
   */
  containerdRoot?: string;
  /** Instead of containerd's content store (tests): content `digest` in `namespace`, streamed front to back. */
  content?: (namespace: string, digest: string, size: number) => AsyncIterable<Buffer>;
  logger: Logger;
}

/**
 * containerd's differ Apply for dedup snapshots (the proxy differ
 * "dedup-differ", selected by the transfer service's unpack_config): the
 * layer blob is read from containerd's content store, decompressed, and its
 * tar entries go straight into the EROFS writer (tar-tree.ts), file data
 * hashed and stored once as it streams. The layer never exists as a
 * directory: the active snapshot's image is recorded as its layer at once,
 * and its Commit only renames it. The tar is checked by containerd's rules
 * (whiteouts, opaque directories, hostile names refused) as if it were
 * unpacked onto an overlay upper directory.
 */
export class LayerApplier {
  /** containerd clients by namespace. */
  private readonly clients = new Map<string, ContainerdClient>();
  /** Blob files being read (closed on close, and when an apply fails). */
  private readonly open = new Set<fs.ReadStream>();

  constructor(private readonly o: LayerApplyOptions) {}

  /** Where Apply reads a blob from: a file of containerd's content store, or its Content service. */
  content(namespace: string, digest: string, size: number): { blob: AsyncIterable<Buffer>; source: 'content store file' | 'containerd Read' } {
    if (this.o.content) return { blob: this.o.content(namespace, digest, size), source: 'containerd Read' };
    // containerd's content store is files named by digest: read the blob there when it is whole (twice as fast
    // as its Read RPC, which copies every MiB through a gRPC message); else ask containerd.
    if (this.o.containerdRoot) {
      const file = path.join(this.o.containerdRoot, 'io.containerd.content.v1.content', 'blobs', 'sha256', digest.slice('sha256:'.length));
      try {
        const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
        if (fs.fstatSync(fd).size === size) {
          const stream = fs.createReadStream('', { fd, highWaterMark: 1 << 20 });
          this.open.add(stream);
          stream.on('close', () => this.open.delete(stream));
          return { blob: stream, source: 'content store file' };
        }
        fs.closeSync(fd);
      } catch {
        /* not there (another root, or not written yet): the Read RPC */
      }
    }
    return { blob: this.clientFor(namespace).streamContent(digest, size), source: 'containerd Read' };
  }

  /** A client of containerd's API in `namespace` (one per namespace, kept until close). */
  clientFor(namespace: string): ContainerdClient {
    let client = this.clients.get(namespace);
    if (!client) {
      client = new ContainerdClient(this.o.containerdAddress, namespace, 0);
      this.clients.set(namespace, client);
    }
    return client;
  }

  get layout(): RootLayout {
    return this.o.layout;
  }

  /** containerd's socket. */
  get containerdAddress(): string {
    return this.o.containerdAddress;
  }

  /** The containerd namespace snapshot `id`'s key names (`<ns>/<txid>/<name>`), if it names one. */
  namespaceOf(id: string): string | undefined {
    const key = this.o.ms.keyOf(id);
    return key === undefined ? undefined : splitKey(key)?.ns;
  }

  close(): void {
    for (const f of this.open) f.destroy();
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }

  /** The active snapshot (its id) whose mounts containerd passed, or an error naming what is not ours. */
  snapshotOf(mounts: MountSpec[]): string {
    if (mounts.length !== 1) throw notImplemented(`dedup-differ applies layers to one dedup snapshot mount, got ${mounts.length} mounts`);
    const m = mounts[0];
    let upper: string | undefined;
    if (m.type === 'bind') upper = m.source;
    else if (m.type === 'overlay') upper = m.options.find((o) => o.startsWith('upperdir='))?.slice('upperdir='.length);
    if (upper === undefined) throw notImplemented(`dedup-differ cannot apply to a ${JSON.stringify(m.type)} mount without an upper directory`);
    const rel = path.relative(this.o.layout.snapshots, upper);
    const hit = /^([1-9][0-9]{0,15})\/fs$/.exec(rel);
    if (!hit || this.o.layout.upper(hit[1]) !== upper) throw notImplemented(`dedup-differ applies layers only to dedup snapshots (under ${this.o.layout.snapshots}), not to ${JSON.stringify(upper)}`);
    return hit[1];
  }

  async apply(req: ApplyRequest): Promise<Applied> {
    const { ms, mounts, logger: log } = this.o;
    if (!LAYER_MEDIA_TYPES.has(req.mediaType)) throw notImplemented(`dedup-differ does not apply layers of media type ${JSON.stringify(req.mediaType)}`);
    if (!/^sha256:[0-9a-f]{64}$/.test(req.digest)) throw invalidArgument(`layer digest ${JSON.stringify(req.digest)} is not a sha256 digest`);
    const id = this.snapshotOf(req.mounts);
    const key = ms.keyOf(id);
    if (key === undefined) throw notFound(`snapshot ${id} (the mounts' upper directory) does not exist`);
    if (ms.getAny(key).kind !== Kind.Active) throw failedPrecondition(`snapshot ${JSON.stringify(key)} is not active`);
    if (ms.getLayer(id) || mounts.isBusy(id)) throw failedPrecondition(`snapshot ${JSON.stringify(key)} already has a layer applied (or one is being applied)`);
    if (fs.readdirSync(this.o.layout.upper(id)).length > 0) throw failedPrecondition(`snapshot ${JSON.stringify(key)} is not empty: dedup-differ applies a layer only to an empty snapshot`);
    const started = Date.now();
    log.info({ op: 'apply', key, snapshot: id, layer: id, digest: req.digest, media_type: req.mediaType, size: req.size }, `detected new layer ${id}, auto-converting to EROFS from its tar in one pass (${req.digest})`);
    const job = this.applyTo(id, key, req, started);
    try {
      const { applied, stats } = await mounts.track(id, job);
      log.info(
        {
          op: 'apply',
          key,
          snapshot: id,
          layer: id,
          digest: req.digest,
          diff_id: applied.digest,
          ...convertedFields(stats),
          read_ms: stats.mkfsMs,
          duration_ms: Date.now() - started,
        },
        `converted layer ${id} to EROFS from its tar: ${convertedSummary(stats)}`,
      );
      this.o.events.emit({ key, layer: id, ok: true, durationMs: Date.now() - started, stats, mode: 'apply' });
      return applied;
    } catch (err) {
      this.o.events.emit({ key, layer: id, ok: false, error: (err as Error).message, durationMs: Date.now() - started, mode: 'apply' });
      log.error({ op: 'apply', key, snapshot: id, layer: id, digest: req.digest, err: (err as Error).message }, `auto-convert of layer ${id} (${req.digest}) to EROFS failed: ${(err as Error).message}`);
      throw err;
    }
  }

  private async applyTo(id: string, key: string, req: ApplyRequest, started: number): Promise<{ applied: Applied; stats: ConvertStats }> {
    const { ms, converter, conversion } = this.o;
    const sink = new StoreChunkSink(this.o.store, this.o.chunkSize);
    const namespace = req.namespace ?? splitKey(key)?.ns;
    if (namespace === undefined) throw invalidArgument(`Apply carries no containerd-namespace header and snapshot ${JSON.stringify(key)} names none`);
    const { blob, source } = this.content(namespace, req.digest, req.size);
    this.o.logger.debug({ op: 'apply', key, snapshot: id, layer: id, digest: req.digest, source }, `reading layer ${req.digest} from ${source}`);
    const { root, diffId, size } = await treeFromLayerBlob(blob, req.digest, sink, (m: string) => this.o.logger.warn({ op: 'apply', key, snapshot: id, layer: id }, m));
    const applied = { mediaType: MEDIA_TYPE_LAYER_TAR, digest: diffId, size };
    const stats = await converter.importTree(
      id,
      root,
      sink,
      Date.now() - started,
      conversion.mountAndRecord(id, started, () => {
        if (ms.keyOf(id) !== key) throw notFound(`snapshot ${JSON.stringify(key)} was removed while its layer was applied`);
      }),
    );
    return { applied, stats };
  }
}
