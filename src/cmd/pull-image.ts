import crypto from 'node:crypto';
import type { ContainerdClient } from '../containerd/client';
import { type Platform, hostPlatform } from '../convert/image-convert';
import { failedPrecondition, invalidArgument } from '../errdefs/errors';
import { MEDIA_TYPE_LAYER, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST } from '../remote/dedup-image';
import { LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST, LABEL_SNAPSHOT_REF } from '../remote/lazy';
import { type Reference, formatReference, parseReference } from '../remote/reference';
import type { RegistryClient } from '../remote/registry';

/**
 * `dedup-snapshotter pull REF`: what containerd's CRI pull does for a dedup
 * image, for `ctr` users (ctr passes no snapshot labels). Through
 * containerd's API, under a lease: the index, the platform's manifest and
 * the config go into containerd's content store (with the GC labels that
 * keep them and the snapshots alive); each layer is Prepared through
 * containerd with the labels a remote snapshotter needs, so the snapshotter
 * makes it from metadata and chunks and containerd records it; then the
 * image is created. No layer blob is downloaded; `ctr images ls` shows the
 * image and `ctr run --snapshotter=dedup` runs it. A client of containerd
 * and of the registry, like ctr: the command's workflow, beside its argument
 * parsing (pull.ts).
 */

export interface PullOptions {
  registry: RegistryClient;
  containerd: ContainerdClient;
  ref: string;
  snapshotter: string;
  platform?: Platform;
  progress?: (line: string) => void;
}

export interface PullResult {
  name: string;
  digest: string;
  layers: number;
  image: 'created' | 'updated';
}

const sha256 = (s: string | Buffer) => `sha256:${crypto.createHash('sha256').update(s).digest('hex')}`;

export function chainIds(diffIds: string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) out.push(out.length === 0 ? d : sha256(`${out[out.length - 1]} ${d}`));
  return out;
}

export async function pullDedupImage(o: PullOptions): Promise<PullResult> {
  const progress = o.progress ?? (() => undefined);
  const ref = parseReference(o.ref);
  const name = formatReference(ref);
  const want = o.platform ?? hostPlatform();

  const top = await o.registry.getManifest(ref);
  if (top.mediaType !== MEDIA_TYPE_OCI_INDEX) throw invalidArgument(`${name} is a ${top.mediaType}, not a dedup image (convert it with dedup-snapshotter convert, or pull it with ctr image pull)`);
  const entries = (top.json as { manifests?: { mediaType: string; digest: string; size: number; platform?: Platform }[] }).manifests ?? [];
  const entry = entries.find((d) => d.mediaType === MEDIA_TYPE_OCI_MANIFEST && d.platform?.os === want.os && d.platform?.architecture === want.architecture);
  if (!entry) throw invalidArgument(`${name} has no image for ${want.os}/${want.architecture}`);
  const m = await o.registry.getManifest({ ...ref, tag: null, digest: entry.digest } as Reference);
  const manifest = m.json as { config: { digest: string; size: number }; layers: { mediaType: string; digest: string }[] };
  if (!manifest.layers.every((l) => l.mediaType === MEDIA_TYPE_LAYER)) {
    throw invalidArgument(`${name} is not a dedup image (its layers are not ${MEDIA_TYPE_LAYER}); use ctr image pull`);
  }
  const config = await o.registry.getBlob(ref, manifest.config.digest);
  const diffIds = (JSON.parse(config.toString('utf8')) as { rootfs?: { diff_ids?: string[] } }).rootfs?.diff_ids ?? [];
  if (diffIds.length !== manifest.layers.length || diffIds.some((d, i) => d !== manifest.layers[i].digest)) {
    throw invalidArgument(`${name}: the config's diff ids are not the dedup layers' digests`);
  }
  const chain = chainIds(diffIds);

  const c = o.containerd;
  await c.useLease(`dedup-pull-${crypto.randomBytes(8).toString('hex')}`, 3_600_000);
  try {
    // Children first, each with the GC references to what it needs.
    await c.writeContent(manifest.config.digest, config, chain.length > 0 ? { [`containerd.io/gc.ref.snapshot.${o.snapshotter}`]: chain[chain.length - 1] } : {});
    await c.writeContent(m.digest, m.bytes, { 'containerd.io/gc.ref.content.config': manifest.config.digest });
    await c.writeContent(top.digest, top.bytes, { 'containerd.io/gc.ref.content.m.0': m.digest });

    for (const [i, l] of manifest.layers.entries()) {
      const t0 = Date.now();
      const key = `extract-${Date.now()}-${crypto.randomBytes(4).toString('hex')} ${chain[i]}`;
      const labels = {
        [LABEL_SNAPSHOT_REF]: chain[i],
        [LABEL_CRI_IMAGE_REF]: name,
        [LABEL_CRI_LAYER_DIGEST]: l.digest,
        [LABEL_CRI_MANIFEST_DIGEST]: m.digest,
      };
      const code = await c.prepareSnapshot(o.snapshotter, key, i === 0 ? '' : chain[i - 1], labels);
      if (code === 0) {
        // An active snapshot: the snapshotter did not make the layer remotely.
        await c.removeSnapshot(o.snapshotter, key).catch(() => undefined);
        throw failedPrecondition(
          `snapshotter ${o.snapshotter} did not make layer ${i + 1} remotely: is it dedup-snapshotter with use_erofs on, and ${ref.domain} in registry.plain_http_hosts if it is plain HTTP?`,
        );
      }
      if (code !== 6) throw failedPrecondition(`Prepare of layer ${i + 1} (${chain[i]}) through containerd failed with gRPC code ${code}`);
      progress(`layer ${i + 1}/${manifest.layers.length}: ${l.digest} ready (${Date.now() - t0} ms)`);
    }
    const image = await c.putImage(name, { media_type: top.mediaType, digest: top.digest, size: top.bytes.length });
    progress(`${image} image ${name}`);
    return { name, digest: top.digest, layers: manifest.layers.length, image };
  } finally {
    await c.dropLease().catch(() => undefined);
  }
}
