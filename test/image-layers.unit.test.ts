/**
 * imageChainIds: an image's layers as containerd names their snapshots,
 * read through containerd's Images and Content services (faked here): from
 * a manifest, and from an index (a dedup image is one: its platform's
 * manifest beside the `unknown/unknown` chunks manifest), whose entries are
 * OCI JSON descriptors (`mediaType`), not containerd's gRPC ones.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { test } from 'node:test';
import type { Descriptor } from '../src/containerd/client';
import { type ImageContent, chainIds, hostPlatform, imageChainIds } from '../src/containerd/image-layers';

const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const sha = (b: Buffer) => `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;

/** A content store of JSON documents and an image table, as containerd would answer. */
function fakeContainerd(): { c: ImageContent; put: (doc: unknown) => { digest: string; size: number }; images: Map<string, Descriptor> } {
  const blobs = new Map<string, Buffer>();
  const images = new Map<string, Descriptor>();
  const c: ImageContent = {
    getImage: async (name) => {
      const d = images.get(name);
      if (!d) throw new Error(`image ${name} not found`);
      return d;
    },
    readContent: async (digest) => {
      const b = blobs.get(digest);
      if (!b) throw new Error(`content ${digest} not found`);
      return b;
    },
  };
  const put = (doc: unknown) => {
    const b = Buffer.from(JSON.stringify(doc));
    blobs.set(sha(b), b);
    return { digest: sha(b), size: b.length };
  };
  return { c, put, images };
}

const diffIds = ['a', 'b', 'c'].map((s) => sha(Buffer.from(s)));

function manifestOf(put: (doc: unknown) => { digest: string; size: number }, ids: string[]) {
  const config = put({ architecture: hostPlatform().architecture, os: 'linux', rootfs: { type: 'layers', diff_ids: ids } });
  return put({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config }, layers: [] });
}

test('a manifest: the chain ids of its config diff ids', async () => {
  const { c, put, images } = fakeContainerd();
  const m = manifestOf(put, diffIds);
  images.set('plain', { media_type: OCI_MANIFEST, ...m });
  assert.deepEqual(await imageChainIds(c, 'plain'), chainIds(diffIds));
  assert.equal(chainIds(diffIds)[0], diffIds[0]);
});

test("an index (a dedup image): this platform's manifest, not the unknown/unknown one", async () => {
  const { c, put, images } = fakeContainerd();
  const chunks = manifestOf(put, [sha(Buffer.from('chunks'))]);
  const mine = manifestOf(put, diffIds);
  const index = put({
    schemaVersion: 2,
    mediaType: OCI_INDEX,
    manifests: [
      { mediaType: OCI_MANIFEST, ...chunks, platform: { os: 'unknown', architecture: 'unknown' } },
      { mediaType: OCI_MANIFEST, ...mine, platform: { os: 'linux', architecture: hostPlatform().architecture } },
    ],
  });
  images.set('dedup', { media_type: OCI_INDEX, ...index });
  assert.deepEqual(await imageChainIds(c, 'dedup'), chainIds(diffIds));

  // No manifest for the platform asked: named.
  await assert.rejects(imageChainIds(c, 'dedup', { os: 'linux', architecture: 'mips64' }), /has no manifest for linux\/mips64 \(it has: unknown\/unknown, linux\//);
});
