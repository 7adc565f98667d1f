import crypto from 'node:crypto';
import path from 'node:path';
import { Readable } from 'node:stream';
import zlib from 'node:zlib';
import type { ContainerdClient } from '../containerd/client';
import { invalidArgument, notImplemented } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import type { RootLayout } from '../store/root-layout';
import type { MountSpec } from './apply';
import { checkUpperDir, upperDirTar } from './upper-diff';

/*
 * The Diff service's Diff for dedup snapshots (containerd asks it when a
 * container's changes become a layer, e.g. `nerdctl commit`, when
 * dedup-differ is among the diff service's differs): when `right` is a
 * dedup active snapshot and `left` is the view of its parent (the same
 * lower layers), the changes are exactly the snapshot's upper directory,
 * written as a layer tar (upper-diff.ts), compressed as asked, and streamed
 * into containerd's content store. Anything else (other mounts, a media
 * type not written here, an upper that needs its lower layers) is
 * NotImplemented, so that the diff service asks its next differ
 * (containerd's walking differ compares any two mounts).
 */

const MEDIA_TAR = 'application/vnd.oci.image.layer.v1.tar';
const MEDIA_TAR_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
/** Media types written here, and whether they are gzip-compressed. */
const WRITTEN = new Map<string, boolean>([
  [MEDIA_TAR, false],
  [MEDIA_TAR_GZIP, true],
  ['application/vnd.docker.image.rootfs.diff.tar', false],
  ['application/vnd.docker.image.rootfs.diff.tar.gzip', true],
]);
/** How long a diff written without the caller's lease is kept from garbage collection. */
const LEASE_MS = 60 * 60_000;
/** The label containerd keeps the uncompressed digest (the diff id) of a layer blob under. */
export const LABEL_UNCOMPRESSED = 'containerd.io/uncompressed';

export interface DiffRequest {
  left: MountSpec[];
  right: MountSpec[];
  mediaType: string;
  ref: string;
  labels: Record<string, string>;
  namespace: string | undefined;
  /** The caller's lease (containerd-lease), under which the new content is written. */
  lease: string | null;
}

export interface DiffResult {
  mediaType: string;
  digest: string;
  size: number;
  diffId: string;
}

export interface LayerDifferOptions {
  layout: RootLayout;
  /** The dedup snapshot (its id) behind `mounts`, or a NotImplemented error. */
  snapshotOf: (mounts: MountSpec[]) => string;
  client: (namespace: string) => ContainerdClient;
  /** The namespace of snapshot `id`'s key, for a request that names none (containerd 1.7 sends no namespace header to proxy differs). */
  namespaceOf: (id: string) => string | undefined;
  logger: Logger;
}

/** The lower directories a mount list reads, in order; null when it is not a read-only view (it has an upper). */
function lowersOf(mounts: MountSpec[]): string[] | null {
  if (mounts.length === 0) return [];
  if (mounts.length !== 1) return null;
  const m = mounts[0];
  if (m.type === 'bind') return [m.source];
  if (m.type !== 'overlay') return null;
  if (m.options.some((o) => o.startsWith('upperdir='))) return null;
  return lowerdirs(m);
}

/** An overlay mount's lowerdir list, or null without one. */
function lowerdirs(m: MountSpec): string[] | null {
  const lower = m.options.find((o) => o.startsWith('lowerdir='));
  return lower ? lower.slice('lowerdir='.length).split(':') : null;
}

/** The lower directories under an active snapshot's mount (a bind mount: none). */
function lowersUnder(mounts: MountSpec[]): string[] | null {
  const m = mounts[0];
  if (m?.type === 'bind') return [];
  if (m?.type !== 'overlay') return null;
  return lowerdirs(m) ?? [];
}

export class LayerDiffer {
  constructor(private readonly o: LayerDifferOptions) {}

  /** The snapshot id a lower directory shows (its directory or its EROFS mount), else the path itself. */
  private layerOf(dir: string): string {
    const { layout } = this.o;
    const mnt = /^([1-9][0-9]{0,15})$/.exec(path.relative(layout.mntDir, dir));
    if (mnt) return `layer ${mnt[1]}`;
    const fsDir = /^([1-9][0-9]{0,15})\/fs$/.exec(path.relative(layout.snapshots, dir));
    return fsDir ? `layer ${fsDir[1]}` : dir;
  }

  async diff(req: DiffRequest): Promise<DiffResult> {
    const mediaType = req.mediaType || MEDIA_TAR_GZIP;
    const gzip = WRITTEN.get(mediaType);
    if (gzip === undefined) throw notImplemented(`dedup-differ does not write diffs of media type ${JSON.stringify(mediaType)}`);
    const id = this.o.snapshotOf(req.right);
    // Compared as layers: a layer read from its directory in one list and from its EROFS mount in the
    // other (converted in between) is the same layer.
    const left = lowersOf(req.left)?.map((d) => this.layerOf(d));
    const under = lowersUnder(req.right)?.map((d) => this.layerOf(d));
    if (!left || !under || left.length !== under.length || left.some((d, i) => d !== under[i])) {
      throw notImplemented(`dedup-differ computes a diff only between a dedup active snapshot and the view of its parent (left reads ${JSON.stringify(left)}, right's lower layers are ${JSON.stringify(under)})`);
    }
    for (const [k, v] of Object.entries(req.labels)) {
      if (typeof v !== 'string') throw invalidArgument(`label ${JSON.stringify(k)} is not a string`);
    }
    const namespace = req.namespace ?? this.o.namespaceOf(id);
    if (namespace === undefined) throw invalidArgument(`Diff carries no containerd-namespace header and snapshot ${id}'s key names none`);
    const started = Date.now();
    await checkUpperDir(this.o.layout.upper(id));
    const diffHash = crypto.createHash('sha256');
    const blobHash = crypto.createHash('sha256');
    let diffBytes = 0;
    let blobBytes = 0;
    const tar = upperDirTar(this.o.layout.upper(id));
    async function* hashedTar(): AsyncGenerator<Buffer> {
      for await (const piece of tar) {
        diffHash.update(piece);
        diffBytes += piece.length;
        yield piece;
      }
    }
    async function* blob(): AsyncGenerator<Buffer> {
      let stream: AsyncIterable<Buffer> = hashedTar();
      if (gzip) {
        const gz = zlib.createGzip({ chunkSize: 1 << 20 });
        const input = Readable.from(stream);
        // A failure while the tar is read (a file gone, an upper that needs its lower layers) ends the gzip stream with it.
        input.on('error', (err) => gz.destroy(err));
        stream = input.pipe(gz);
      }
      for await (const piece of stream) {
        blobHash.update(piece);
        blobBytes += piece.length;
        yield piece;
      }
    }
    let result: DiffResult | null = null;
    const ref = `${req.ref || 'dedup-diff'}-${crypto.randomBytes(6).toString('hex')}`;
    const client = this.o.client(namespace);
    // Written under the caller's lease; without one, under a lease of our own that expires, so that
    // containerd's garbage collector leaves the new layer alone until the caller references it.
    const lease = req.lease ?? (await client.createExpiringLease(`dedup-diff-${crypto.randomBytes(6).toString('hex')}`, LEASE_MS));
    await client.writeContentStream(
      ref,
      blob(),
      () => {
        const diffId = `sha256:${diffHash.digest('hex')}`;
        result = { mediaType, digest: `sha256:${blobHash.digest('hex')}`, size: blobBytes, diffId };
        return { digest: result.digest, size: blobBytes, labels: { ...req.labels, [LABEL_UNCOMPRESSED]: diffId } };
      },
      lease,
    );
    const r = result as DiffResult | null;
    if (!r) throw new Error(`the diff of snapshot ${id} was not written`);
    this.o.logger.info(
      { op: 'diff', snapshot: id, digest: r.digest, diff_id: r.diffId, media_type: mediaType, size: r.size, tar_bytes: diffBytes, duration_ms: Date.now() - started },
      `wrote the changes of snapshot ${id} as layer ${r.digest} (${diffBytes} bytes of tar)`,
    );
    return r;
  }
}
