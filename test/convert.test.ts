/**
 * `dedup-snapshotter convert SRC DST` against a real docker-registry: the
 * dedup image it pushes is accepted by the registry and by skopeo, its
 * manifests and config are what remote/dedup-image.ts documents, and each
 * layer, mounted as a node will (EROFS image over a device assembled from
 * chunks fetched with HTTP Range and checked by digest), presents the same
 * tree as the source layer unpacked.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { MS_RDONLY, mount, umount2 } from '../native/mount';
import { applyLayerTar } from '../src/convert/untar';
import {
  ANNOTATION_CHUNKS_FOR,
  ANNOTATION_FORMAT,
  ANNOTATION_SOURCE,
  ANNOTATION_SOURCE_DIFF_ID,
  MEDIA_TYPE_CHUNKS,
  MEDIA_TYPE_CHUNKS_CONFIG,
  MEDIA_TYPE_LAYER,
  decodeLayerBlob,
} from '../src/remote/dedup-image';
import { RegistryClient } from '../src/remote/registry';
import { tempDir } from './helpers/daemon';
import { checkDirectoryEqual } from './helpers/fstest';
import { type BuiltImage, buildImage, busyboxImageDef, pseudoRandom, pushImage, tortureImageDef } from './helpers/images';
import { unmountUnder } from './helpers/mounts';
import { type RealRegistry, startRegistry } from './helpers/registry';

const run = promisify(execFile);
const BIN = path.join(__dirname, '..', '..', 'bin', 'dedup-snapshotter');
const sha = (b: Buffer) => `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;

let registry: RealRegistry;
let client: RegistryClient;
let dir: string;
let config: string;

before(async () => {
  registry = await startRegistry();
  client = new RegistryClient({ plainHttpHosts: [registry.host] });
  dir = tempDir('convert');
  config = path.join(dir, 'config.json');
  fs.writeFileSync(config, JSON.stringify({ chunk_size: 65536 }));
});

after(async () => {
  client?.close();
  await unmountUnder(dir);
  fs.rmSync(dir, { recursive: true, force: true });
  await registry?.stop();
});

async function convert(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, [BIN, 'convert', ...args], { env: { ...process.env, CONFIG: config }, maxBuffer: 16 << 20 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** Mounts dedup layer `digest` of `repo` as a node would and compares it with the source layer unpacked. */
async function checkLayer(repo: string, digest: string, source: BuiltImage['layers'][number], name: string): Promise<{ chunkBytes: number }> {
  const { header, erofs } = decodeLayerBlob(await client.getBlob(repo, digest));
  assert.equal(header.source_diff_id, source.diffId);
  const size = Math.max(0, ...header.chunks.map(([blk, n]) => (blk + n) * 4096));
  const device = Buffer.alloc(size);
  let chunkBytes = 0;
  for (const [blk, n, hex, bi, off] of header.chunks) {
    const bytes = await client.getBlobRange(repo, header.data_blobs[bi], off, n * 4096);
    assert.equal(sha(bytes), `sha256:${hex}`, 'a chunk fetched by Range matches its digest');
    bytes.copy(device, blk * 4096);
    chunkBytes += bytes.length;
  }
  const img = path.join(dir, `${name}.erofs`);
  const dev = path.join(dir, `${name}.dev`);
  const mnt = path.join(dir, `${name}.mnt`);
  const want = path.join(dir, `${name}.want`);
  fs.writeFileSync(img, erofs);
  fs.writeFileSync(dev, device);
  fs.mkdirSync(mnt);
  fs.mkdirSync(want);
  await applyLayerTar(Readable.from([source.gz]), want);
  mount(img, mnt, 'erofs', MS_RDONLY, header.has_blob ? `device=${dev}` : null);
  try {
    checkDirectoryEqual(want, mnt);
  } finally {
    umount2(mnt);
  }
  return { chunkBytes };
}

describe('dedup-snapshotter convert', () => {
  test('torture image: index, manifests and config as documented; every layer mounts to the source tree', async () => {
    const img = await buildImage(tortureImageDef());
    const src = await pushImage(img, registry.host, dir);
    const dst = `${registry.host}/dedup/torture:v1`;
    const r = await convert(['--plain-http', src, dst]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^${dst.replace(/[.:/]/g, '\\$&')}@sha256:[0-9a-f]{64}: ${img.layers.length} layers`));
    assert.match(r.stderr, new RegExp(`layer ${img.layers.length}/${img.layers.length}: `), 'progress per layer on stderr');
    assert.match(r.stderr, /layer 1\/\d+: downloading 100% \(/, 'download progress (not a terminal: a line per 25%)');

    const index = await client.getManifest(dst);
    assert.equal(index.mediaType, 'application/vnd.oci.image.index.v1+json');
    const idx = index.json as { manifests: { digest: string; platform: { os: string; architecture: string }; annotations?: Record<string, string> }[]; annotations: Record<string, string> };
    assert.equal(idx.annotations[ANNOTATION_FORMAT], 'v1');
    assert.equal(idx.annotations[ANNOTATION_SOURCE], `${registry.host}/${img.def.name}@${img.manifestDigest}`);
    assert.equal(idx.manifests.length, 2);
    const [imageEntry, chunksEntry] = idx.manifests;
    assert.equal(imageEntry.platform.os, 'linux');
    assert.deepEqual(chunksEntry.platform, { os: 'unknown', architecture: 'unknown' });
    assert.equal(chunksEntry.annotations?.[ANNOTATION_CHUNKS_FOR], imageEntry.digest);

    const repo = `${registry.host}/dedup/torture`;
    const m = (await client.getManifest(`${repo}@${imageEntry.digest}`)).json as { config: { digest: string }; layers: { mediaType: string; digest: string; annotations: Record<string, string> }[] };
    assert.equal(m.layers.length, img.layers.length);
    const cfg = JSON.parse((await client.getBlob(repo, m.config.digest)).toString());
    assert.deepEqual(cfg.rootfs.diff_ids, m.layers.map((l) => l.digest), 'diff ids are the dedup layer blobs (uncompressed)');
    assert.deepEqual(cfg.config, JSON.parse(img.config.toString()).config, 'the runtime config is kept');
    const chunks = (await client.getManifest(`${repo}@${chunksEntry.digest}`)).json as { config: { mediaType: string }; layers: { mediaType: string; digest: string; size: number }[] };
    assert.equal(chunks.config.mediaType, MEDIA_TYPE_CHUNKS_CONFIG);
    assert.ok(chunks.layers.every((l) => l.mediaType === MEDIA_TYPE_CHUNKS));
    for (const [i, l] of m.layers.entries()) {
      assert.equal(l.mediaType, MEDIA_TYPE_LAYER);
      assert.equal(l.annotations[ANNOTATION_SOURCE_DIFF_ID], img.diffIds[i]);
      await checkLayer(repo, l.digest, img.layers[i], `torture-${i}`);
    }

    // A stock tool copies the whole index, chunk blobs included.
    const policy = path.join(dir, 'policy.json');
    fs.writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }));
    await run('skopeo', ['copy', '--quiet', '--all', '--policy', policy, '--src-tls-verify=false', `docker://${dst}`, `oci:${path.join(dir, 'copy')}:v1`]);
    const copied = fs.readdirSync(path.join(dir, 'copy', 'blobs', 'sha256')).map((h) => `sha256:${h}`);
    for (const d of [...m.layers.map((l) => l.digest), ...chunks.layers.map((l) => l.digest)]) assert.ok(copied.includes(d), `skopeo copied ${d}`);
  });

  test('a chunk in two layers is stored once in the image\'s chunk data', async () => {
    const big = pseudoRandom(600_000, 'convert-shared');
    const def = busyboxImageDef();
    def.name = 'test/shared';
    def.layers = [
      [
        { type: 'dir', path: 'data' },
        { type: 'file', path: 'data/one.bin', content: big },
      ],
      [
        { type: 'dir', path: 'data' },
        { type: 'file', path: 'data/two.bin', content: big },
        { type: 'file', path: 'data/small', content: 'x' },
      ],
    ];
    const img = await buildImage(def);
    const src = await pushImage(img, registry.host, dir);
    const r = await convert(['--plain-http', src, `${registry.host}/dedup/shared:v1`]);
    assert.equal(r.code, 0, r.stderr);
    const repo = `${registry.host}/dedup/shared`;
    const idx = (await client.getManifest(`${repo}:v1`)).json as { manifests: { digest: string }[] };
    const chunks = (await client.getManifest(`${repo}@${idx.manifests[1].digest}`)).json as { layers: { size: number }[] };
    const m = (await client.getManifest(`${repo}@${idx.manifests[0].digest}`)).json as { layers: { digest: string }[] };
    const stored = chunks.layers.reduce((n, l) => n + l.size, 0);
    // 600000 bytes in 64 KiB chunks: 9 whole chunks and a 10176-byte tail (3 blocks); "x": one block.
    assert.equal(stored, 9 * 65536 + 3 * 4096 + 4096, `the big file once, plus the small one (stored ${stored})`);
    for (const [i, l] of m.layers.entries()) await checkLayer(repo, l.digest, img.layers[i], `shared-${i}`);
  });

  test('bad input: a missing image, plain HTTP not allowed, a dedup image as source, bad arguments', async () => {
    const missing = await convert(['--plain-http', `${registry.host}/nope/missing:v1`, `${registry.host}/dedup/x:v1`]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /MANIFEST_UNKNOWN|not found|unknown/i);
    const img = await buildImage(busyboxImageDef());
    const src = await pushImage(img, registry.host, dir);
    const tls = await convert([src, `${registry.host}/dedup/y:v1`]);
    assert.equal(tls.code, 1);
    assert.match(tls.stderr, /plainHttpHosts|--plain-http|TLS/);
    const twice = await convert(['--plain-http', `${registry.host}/dedup/torture:v1`, `${registry.host}/dedup/z:v1`]);
    assert.equal(twice.code, 1);
    assert.match(twice.stderr, /is a dedup image already/);
    const args = await convert(['--plain-http', src]);
    assert.equal(args.code, 2);
    assert.match(args.stderr, /expected SRC and DST/);
    const platform = await convert(['--plain-http', '--platform', 'linux', src, `${registry.host}/dedup/w:v1`]);
    assert.equal(platform.code, 2);
    assert.match(platform.stderr, /--platform needs OS\/ARCH/);
    // Nothing was pushed under the failed destinations.
    for (const t of ['x', 'y', 'z', 'w']) await assert.rejects(client.getManifest(`${registry.host}/dedup/${t}:v1`), /MANIFEST_UNKNOWN|NAME_UNKNOWN|not found|unknown/i);
  });
});
