import crypto from 'node:crypto';
import type { ContainerdClient, Descriptor } from './client';

/** Manifests, indexes and configs are small; anything bigger is not one. */
const MAX_DOC_BYTES = 4 << 20;

const INDEX_TYPES = new Set(['application/vnd.oci.image.index.v1+json', 'application/vnd.docker.distribution.manifest.list.v2+json']);
const MANIFEST_TYPES = new Set(['application/vnd.oci.image.manifest.v1+json', 'application/vnd.docker.distribution.manifest.v2+json']);

/** What reading an image's layers needs of containerd. */
export type ImageContent = Pick<ContainerdClient, 'getImage' | 'readContent'>;

/** containerd's (Go's) architecture names of Node's process.arch values. */
const ARCH: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64', loong64: 'loong64', mips: 'mips', mipsel: 'mipsle' };

/** GOARCH of a Node arch (default: this machine's). */
export function goArch(arch: string = process.arch): string {
  return ARCH[arch] ?? arch;
}

export function hostPlatform(): { os: string; architecture: string } {
  return { os: 'linux', architecture: goArch() };
}

/**
 * The chain ids of image `name`'s layers, bottom first, as containerd
 * names the committed snapshots it unpacks them into (the identity of the
 * first layer's diff id; then sha256 of "<parent chain id> <diff id>").
 * An index is resolved to the manifest of `platform`.
 */
export async function imageChainIds(c: ImageContent, name: string, platform = hostPlatform()): Promise<string[]> {
  return (await imageLayers(c, name, platform)).chainIds;
}

/**
 * Image `name`'s layers (their descriptors in the manifest), diff ids and
 * chain ids, bottom first (see imageChainIds).
 */
export async function imageLayers(
  c: ImageContent,
  name: string,
  platform = hostPlatform(),
): Promise<{ target: string; layers: Descriptor[]; diffIds: string[]; chainIds: string[] }> {
  let desc: Descriptor = await c.getImage(name);
  const targetDigest = desc.digest;
  if (INDEX_TYPES.has(desc.media_type)) {
    const index = await readJson(c, desc);
    // The index's own JSON (OCI: mediaType, camelCase), not containerd's gRPC descriptor (media_type).
    const manifests = Array.isArray(index.manifests) ? (index.manifests as { mediaType?: string; digest?: string; size?: number; platform?: { os?: string; architecture?: string } }[]) : [];
    const mine = manifests.find((m) => m.platform?.os === platform.os && m.platform?.architecture === platform.architecture);
    if (!mine || typeof mine.digest !== 'string') {
      const have = manifests.map((m) => `${m.platform?.os ?? '?'}/${m.platform?.architecture ?? '?'}`).join(', ');
      throw new Error(`image ${name} has no manifest for ${platform.os}/${platform.architecture} (it has: ${have || 'none'})`);
    }
    desc = { media_type: mine.mediaType ?? '', digest: mine.digest, size: Number(mine.size ?? 0) };
  }
  if (!MANIFEST_TYPES.has(desc.media_type)) throw new Error(`image ${name}: its target is ${desc.media_type}, not an image manifest or index`);
  const manifest = await readJson(c, desc);
  const config = manifest.config as Descriptor | undefined;
  if (!config || typeof config.digest !== 'string') throw new Error(`image ${name}: its manifest names no config`);
  const diffIds = ((await readJson(c, config)).rootfs as { diff_ids?: unknown } | undefined)?.diff_ids;
  if (!Array.isArray(diffIds) || !diffIds.every((d) => typeof d === 'string' && /^sha256:[0-9a-f]{64}$/.test(d))) {
    throw new Error(`image ${name}: its config has no valid rootfs.diff_ids`);
  }
  // The manifest's own JSON (mediaType, camelCase).
  const raw = Array.isArray(manifest.layers) ? (manifest.layers as { mediaType?: unknown; digest?: unknown; size?: unknown }[]) : [];
  // As listed (a caller that needs one per diff id checks it).
  const layers = raw.map((l) => ({ media_type: String(l.mediaType ?? ''), digest: String(l.digest ?? ''), size: Number(l.size ?? 0) }));
  return { target: targetDigest, layers, diffIds: diffIds as string[], chainIds: chainIds(diffIds as string[]) };
}

/** containerd's (the OCI image spec's) chain ids of a list of diff ids. */
export function chainIds(diffIds: readonly string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) {
    const prev = out.at(-1);
    out.push(prev === undefined ? d : `sha256:${crypto.createHash('sha256').update(`${prev} ${d}`).digest('hex')}`);
  }
  return out;
}

async function readJson(c: ImageContent, desc: Descriptor): Promise<Record<string, unknown>> {
  const bytes = await c.readContent(desc.digest, MAX_DOC_BYTES);
  try {
    const v = JSON.parse(bytes.toString('utf8')) as unknown;
    if (typeof v === 'object' && v !== null && !Array.isArray(v)) return v as Record<string, unknown>;
  } catch {
    // named below
  }
  throw new Error(`content ${desc.digest} (${desc.media_type}) is not a JSON object`);
}
