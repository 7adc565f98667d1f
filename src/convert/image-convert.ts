import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { Transform } from 'node:stream';
import { invalidArgument } from '../errdefs/errors';
import {
  ANNOTATION_CHUNKS_FOR,
  ANNOTATION_FORMAT,
  ANNOTATION_SOURCE,
  ANNOTATION_SOURCE_DIFF_ID,
  FORMAT_VERSION,
  MEDIA_TYPE_CHUNKS,
  MEDIA_TYPE_CHUNKS_CONFIG,
  MEDIA_TYPE_LAYER,
  MEDIA_TYPE_OCI_CONFIG,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_MANIFEST,
} from '../remote/dedup-image';
import { type Reference, formatReference, parseReference } from '../remote/reference';
import type { RegistryClient } from '../remote/registry';
import { DedupImageBuilder } from './dedup-layer';
import type { MkfsFeatures } from './mkfs';
import { applyLayerTar } from './untar';

/**
 * `dedup-snapshotter convert SRC DST`: reads an OCI or Docker image from a
 * registry, unpacks each layer as containerd would onto an overlay upper dir,
 * builds its dedup layer (remote/dedup-image.ts) and pushes the dedup image
 * to DST. Nothing is pushed under DST's tag until every blob is in place.
 */

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: Platform;
  annotations?: Record<string, string>;
}

export interface ImageConvertOptions {
  client: RegistryClient;
  src: string;
  dst: string;
  /** Which image of a multi-platform source; default this host's. */
  platform?: Platform;
  mkfs: () => Promise<MkfsFeatures>;
  chunkSize: number;
  workDir: string;
  /** Files (absolute paths in the image) a lazy pull loads first: recorded in the layers that hold them. */
  prefetchFiles?: string[];
  progress?: (line: string) => void;
  /** Bytes of layer `index` (1-based) read so far, of `total`; for a progress bar. */
  onBytes?: (index: number, count: number, done: number, total: number) => void;
  /** false: layers are unpacked with the converting user as every file's owner (unprivileged runs; see untar's sameOwner). */
  sameOwner?: boolean;
}

export interface ImageConvertResult {
  /** What was pushed under DST: the index. */
  digest: string;
  manifestDigest: string;
  chunksManifestDigest: string;
  source: string;
  layers: { source: string; digest: string; size: number; files: number; logicalBytes: number; chunks: number; newChunks: number; dataBytes: number; prefetch: string[] }[];
  /** Bytes of chunk data blobs (each distinct chunk once). */
  dataBytes: number;
}

export const MANIFEST_TYPES = new Set(['application/vnd.oci.image.manifest.v1+json', 'application/vnd.docker.distribution.manifest.v2+json']);
const INDEX_TYPES = new Set(['application/vnd.oci.image.index.v1+json', 'application/vnd.docker.distribution.manifest.list.v2+json']);
const LAYER_TYPES = new Set([
  'application/vnd.oci.image.layer.v1.tar',
  'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.docker.image.rootfs.diff.tar.gzip',
  'application/vnd.oci.image.layer.v1.tar+zstd',
]);

export function hostPlatform(): Platform {
  const arch: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  return { os: 'linux', architecture: arch[process.arch] ?? process.arch };
}

function platformMatches(want: Platform, have: Platform | undefined): boolean {
  return !!have && have.os === want.os && have.architecture === want.architecture && (!want.variant || want.variant === have.variant);
}

const sha256 = (b: Buffer) => `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;

/**
 * Pushes `config` as a blob and a dedup-format OCI manifest over it and
 * `layers` to `ref`: under its tag, or by digest when it has none. Returns
 * the manifest's digest and size, and the bytes uploaded (blobs the
 * registry had already not counted).
 */
export async function pushOciManifest(
  client: RegistryClient,
  ref: Reference,
  config: Buffer,
  configType: string,
  layers: Descriptor[],
  annotations: Record<string, string>,
): Promise<{ digest: string; size: number; uploaded: number }> {
  const configDigest = sha256(config);
  const configPush = await client.pushBlob(ref, configDigest, config);
  const bytes = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPE_OCI_MANIFEST,
      config: { mediaType: configType, digest: configDigest, size: config.length },
      layers,
      annotations: { [ANNOTATION_FORMAT]: FORMAT_VERSION, ...annotations },
    }),
  );
  const digest = sha256(bytes);
  await client.putManifest(ref.tag ? ref : { ...ref, digest }, MEDIA_TYPE_OCI_MANIFEST, bytes);
  return { digest, size: bytes.length, uploaded: (configPush === 'uploaded' ? config.length : 0) + bytes.length };
}

export async function convertImage(o: ImageConvertOptions): Promise<ImageConvertResult> {
  const progress = o.progress ?? (() => undefined);
  const src = parseReference(o.src);
  const dst = parseReference(o.dst);
  const want = o.platform ?? hostPlatform();

  // The image manifest: directly, or the platform's entry of an index.
  let m = await o.client.getManifest(src);
  let platform: Platform | undefined;
  if (INDEX_TYPES.has(m.mediaType)) {
    const entries = ((m.json as { manifests?: Descriptor[] }).manifests ?? []).filter((d) => MANIFEST_TYPES.has(d.mediaType));
    const pick = entries.find((d) => platformMatches(want, d.platform));
    if (!pick) {
      const have = entries.map((d) => (d.platform ? `${d.platform.os}/${d.platform.architecture}${d.platform.variant ? `/${d.platform.variant}` : ''}` : '?')).join(', ');
      throw invalidArgument(`${o.src} has no image for ${want.os}/${want.architecture}${want.variant ? `/${want.variant}` : ''} (it has: ${have || 'none'}); use --platform`);
    }
    platform = pick.platform;
    m = await o.client.getManifest({ ...src, digest: pick.digest } as Reference);
  }
  if (!MANIFEST_TYPES.has(m.mediaType)) throw invalidArgument(`${o.src} is a ${m.mediaType}, not an image manifest or index`);
  const manifest = m.json as { config: Descriptor; layers: Descriptor[] };
  if ((manifest.layers ?? []).some((l) => l.mediaType === MEDIA_TYPE_LAYER)) throw invalidArgument(`${o.src} is a dedup image already`);
  const sourceName = `${src.name}@${m.digest}`;

  const configBytes = await o.client.getBlob(src, manifest.config.digest);
  const config = JSON.parse(configBytes.toString('utf8')) as { os?: string; architecture?: string; variant?: string; rootfs?: { type: string; diff_ids: string[] } };
  const diffIds = config.rootfs?.diff_ids ?? [];
  if (diffIds.length !== manifest.layers.length) {
    throw invalidArgument(`${o.src}: the config lists ${diffIds.length} diff ids for ${manifest.layers.length} layers`);
  }
  platform ??= { os: config.os ?? 'linux', architecture: config.architecture ?? want.architecture, ...(config.variant ? { variant: config.variant } : {}) };
  progress(`converting ${sourceName}: ${manifest.layers.length} layers`);

  const builder = new DedupImageBuilder({ mkfs: o.mkfs, chunkSize: o.chunkSize, workDir: o.workDir });
  const layers: ImageConvertResult['layers'] = [];
  const layerDescs: Descriptor[] = [];
  const dataDescs: Descriptor[] = [];
  const unpacked: string[] = [];
  for (const [i, l] of manifest.layers.entries()) {
    if (!LAYER_TYPES.has(l.mediaType)) throw invalidArgument(`${o.src}: layer ${i + 1} has media type ${l.mediaType}, not a tar layer`);
    const dir = path.join(o.workDir, `rootfs-${i}`);
    await fsp.mkdir(dir, { mode: 0o755 });
    const t0 = Date.now();
    const blob = await o.client.getBlobStream(src, l.digest);
    let read = 0;
    const counted = blob.stream.pipe(
      new Transform({
        transform(chunk: Buffer, _enc, cb) {
          read += chunk.length;
          o.onBytes?.(i + 1, manifest.layers.length, read, l.size);
          cb(null, chunk);
        },
      }),
    );
    blob.stream.on('error', (err) => counted.destroy(err));
    // As containerd: directories the tar does not list take their owner,
    // mode and xattrs from the layers below (kept until the end for that).
    await applyLayerTar(counted, dir, { parents: [...unpacked].reverse(), sameOwner: o.sameOwner });
    blob.verify();
    unpacked.push(dir);
    const built = await builder.addLayer(dir, diffIds[i], o.prefetchFiles);
    if (built.data) {
      await o.client.pushBlob(dst, built.data.digest, built.data.path);
      await fsp.rm(built.data.path, { force: true });
      dataDescs.push({ mediaType: MEDIA_TYPE_CHUNKS, digest: built.data.digest, size: built.data.size });
    }
    await o.client.pushBlob(dst, built.digest, built.blob);
    layerDescs.push({
      mediaType: MEDIA_TYPE_LAYER,
      digest: built.digest,
      size: built.blob.length,
      annotations: { [ANNOTATION_SOURCE_DIFF_ID]: diffIds[i] },
    });
    layers.push({
      source: l.digest,
      digest: built.digest,
      size: built.blob.length,
      files: built.header.files,
      logicalBytes: built.header.logical_bytes,
      chunks: built.chunks,
      newChunks: built.newChunks,
      dataBytes: built.data?.size ?? 0,
      prefetch: built.header.prefetch ?? [],
    });
    progress(
      `layer ${i + 1}/${manifest.layers.length}: ${l.size} bytes → ${built.header.files} files, ${built.header.logical_bytes} bytes of data, ${built.chunks} chunks (${built.newChunks} new in this image), metadata ${built.blob.length} bytes (${Date.now() - t0} ms)`,
    );
  }

  const pushManifest = (config: Buffer, configType: string, layers: Descriptor[], annotations: Record<string, string>) =>
    pushOciManifest(o.client, { ...dst, tag: null, digest: null }, config, configType, layers, annotations);
  // The config as the source's, with the dedup layers' digests as diff ids.
  const newConfig = Buffer.from(JSON.stringify({ ...config, rootfs: { type: 'layers', diff_ids: layerDescs.map((d) => d.digest) } }));
  const image = await pushManifest(newConfig, MEDIA_TYPE_OCI_CONFIG, layerDescs, { [ANNOTATION_SOURCE]: sourceName });
  const manifestDigest = image.digest;
  const chunksConfig = Buffer.from(JSON.stringify({ format: FORMAT_VERSION, image: manifestDigest }));
  const chunks = await pushManifest(chunksConfig, MEDIA_TYPE_CHUNKS_CONFIG, dataDescs, { [ANNOTATION_CHUNKS_FOR]: manifestDigest });
  const chunksManifestDigest = chunks.digest;

  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPE_OCI_INDEX,
      manifests: [
        { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: manifestDigest, size: image.size, platform },
        {
          mediaType: MEDIA_TYPE_OCI_MANIFEST,
          digest: chunksManifestDigest,
          size: chunks.size,
          // As Docker's attestation manifests: pull handlers skip unknown/unknown.
          platform: { os: 'unknown', architecture: 'unknown' },
          annotations: { [ANNOTATION_CHUNKS_FOR]: manifestDigest, 'vnd.docker.reference.type': 'dedup-chunks', 'vnd.docker.reference.digest': manifestDigest },
        },
      ],
      annotations: { [ANNOTATION_FORMAT]: FORMAT_VERSION, [ANNOTATION_SOURCE]: sourceName },
    }),
  );
  const digest = await o.client.putManifest(dst, MEDIA_TYPE_OCI_INDEX, index);
  const dataBytes = dataDescs.reduce((n, d) => n + d.size, 0);
  progress(`pushed ${formatReference(dst)} (${digest}): ${layers.length} layers, ${dataBytes} bytes of chunk data`);
  return { digest, manifestDigest, chunksManifestDigest, source: sourceName, layers, dataBytes };
}
