/**
 * Shared converted layers (src/convert/share.ts, RemoteLayers with
 * pullConverted) against a real registry and the real mkfs.erofs: what is
 * pushed under which tag, what is not pushed (already there, layer removed
 * mid-build, labels naming no image layer), and which tags a pulling node
 * accepts.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { probeMkfs } from '../src/convert/mkfs';
import { ConvertedLayerPusher, type ShareJob } from '../src/convert/share';
import {
  ANNOTATION_SOURCE_LAYER,
  MEDIA_TYPE_CHUNKS,
  MEDIA_TYPE_CONVERTED_CONFIG,
  MEDIA_TYPE_LAYER,
  MEDIA_TYPE_OCI_MANIFEST,
  convertedLayerTag,
  decodeLayerBlob,
} from '../src/remote/dedup-image';
import { LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST, LABEL_SNAPSHOT_REF, RemoteLayers } from '../src/remote/lazy';
import { RegistryClient } from '../src/remote/registry';
import { scratchDirs } from './helpers/daemon';
import { type BuiltImage, buildImage, pseudoRandom, pushImage, tortureImageDef } from './helpers/images';
import { type RealRegistry, startRegistry } from './helpers/registry';

const work = scratchDirs();

describe('shared converted layers', () => {
  let reg: RealRegistry;
  let client: RegistryClient;
  let img: BuiltImage;
  let plain: string[];
  let dir: string;
  let pusher: ConvertedLayerPusher;

  before(async () => {
    reg = await startRegistry();
    client = new RegistryClient({ plainHttpHosts: [reg.host] });
    dir = work('share');
    img = await buildImage(tortureImageDef());
    await pushImage(img, reg.host, dir);
    plain = (JSON.parse(img.manifest.toString('utf8')) as { layers: { digest: string }[] }).layers.map((l) => l.digest);
    const mkfs = await probeMkfs('mkfs.erofs');
    pusher = new ConvertedLayerPusher({ client, mkfs: async () => mkfs, chunkSize: 65536, workDir: path.join(dir, 'tmp') });
  });

  after(async () => {
    pusher?.close();
    client?.close();
    await reg?.stop();
  });

  const labelsFor = (layer: string) => ({
    [LABEL_SNAPSHOT_REF]: `sha256:${'c'.repeat(64)}`,
    [LABEL_CRI_IMAGE_REF]: img.ref as string,
    [LABEL_CRI_MANIFEST_DIGEST]: img.manifestDigest,
    [LABEL_CRI_LAYER_DIGEST]: layer,
  });

  /** A layer directory with a file of `bytes` bytes; the job counts its releases. */
  const job = (name: string, labels: Record<string, string>, alive = () => true): ShareJob & { released: number } => {
    const d = path.join(dir, name);
    fs.mkdirSync(path.join(d, 'opt'), { recursive: true });
    fs.writeFileSync(path.join(d, 'opt', `${name}.bin`), pseudoRandom(300_000, name));
    const j = { id: name, dir: d, labels, alive, released: 0, release: () => j.released++ };
    return j;
  };

  const tagOf = (layer: string) => `${reg.host}/${img.def.name}:${convertedLayerTag(layer)}`;

  test('a converted layer is pushed under sha256-<hex>.dedup: metadata, chunk data, config naming its source', async () => {
    const j = job('one', labelsFor(plain[0]));
    assert.equal(pusher.offer(j), true);
    await pusher.idle();
    assert.equal(j.released, 1);
    assert.deepEqual({ ...pusher.counters }, { pushed: 1, present: 0, failed: 0, bytes: pusher.counters.bytes });
    assert.ok(pusher.counters.bytes > 300_000, `uploaded ${pusher.counters.bytes} bytes`);

    const m = await client.getManifest(tagOf(plain[0]));
    assert.equal(m.mediaType, MEDIA_TYPE_OCI_MANIFEST);
    const json = m.json as { config: { mediaType: string; digest: string }; layers: { mediaType: string; digest: string }[]; annotations: Record<string, string> };
    assert.equal(json.config.mediaType, MEDIA_TYPE_CONVERTED_CONFIG);
    assert.equal(json.annotations[ANNOTATION_SOURCE_LAYER], plain[0]);
    assert.deepEqual(
      json.layers.map((l) => l.mediaType),
      [MEDIA_TYPE_LAYER, MEDIA_TYPE_CHUNKS],
    );
    const config = JSON.parse((await client.getBlob(`${reg.host}/${img.def.name}`, json.config.digest)).toString('utf8'));
    assert.deepEqual(config, { format: 'v1', source_layer: plain[0], source_diff_id: img.diffIds[0] });
    const { header } = decodeLayerBlob(await client.getBlob(`${reg.host}/${img.def.name}`, json.layers[0].digest));
    assert.equal(header.source_diff_id, img.diffIds[0]);
    assert.deepEqual(header.data_blobs, [json.layers[1].digest], 'every chunk is in the layer’s own data blob');
    assert.equal(header.logical_bytes, 300_000);
  });

  test('nothing is pushed again when the tag is there, when the layer went mid-build, or when the labels name no image layer', async () => {
    const again = job('again', labelsFor(plain[0]));
    pusher.offer(again);
    await pusher.idle();
    assert.equal(pusher.counters.present, 1);
    assert.equal(pusher.counters.pushed, 1);
    assert.equal(again.released, 1);

    const gone = job('gone', labelsFor(plain[1]), () => false);
    pusher.offer(gone);
    await pusher.idle();
    assert.equal(gone.released, 1);
    await assert.rejects(client.getManifest(tagOf(plain[1])), (err: { status?: number }) => err.status === 404);
    assert.equal(pusher.counters.pushed, 1);

    const unlabeled = job('unlabeled', { [LABEL_SNAPSHOT_REF]: `sha256:${'c'.repeat(64)}` });
    assert.equal(pusher.offer(unlabeled), false);
    assert.equal(unlabeled.released, 1);

    // A layer the image does not list: refused, nothing pushed.
    const stranger = `sha256:${'d'.repeat(64)}`;
    const wrong = job('wrong', labelsFor(stranger));
    pusher.offer(wrong);
    await pusher.idle();
    assert.equal(pusher.counters.failed, 1);
    assert.equal(wrong.released, 1);
    await assert.rejects(client.getManifest(tagOf(stranger)), (err: { status?: number }) => err.status === 404);
  });

  test('a pulling node takes a shared layer only with pull_converted, only for a layer of the image, only under a matching annotation', async () => {
    const on = new RemoteLayers({ client, pullConverted: true });
    const off = new RemoteLayers({ client });
    const shared = (await client.getManifest(tagOf(plain[0]))).json as { layers: { digest: string }[] };

    const rl = await on.resolve(labelsFor(plain[0]));
    assert.ok(rl, 'found');
    assert.equal(rl.layerDigest, shared.layers[0].digest);
    assert.equal(rl.sourceLayer, plain[0]);
    const { header } = await on.fetchLayer(rl);
    assert.equal(header.source_diff_id, img.diffIds[0]);

    assert.equal(await off.resolve(labelsFor(plain[0])), null, 'pull_converted off');
    assert.equal(await on.resolve(labelsFor(plain[1])), null, 'no tag for this layer');

    // A tag that is there but names another layer is not used.
    const bogus = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA_TYPE_OCI_MANIFEST,
        config: ((await client.getManifest(tagOf(plain[0]))).json as { config: unknown }).config,
        layers: shared.layers,
        annotations: { [ANNOTATION_SOURCE_LAYER]: plain[0] },
      }),
    );
    await client.putManifest(tagOf(plain[2]), MEDIA_TYPE_OCI_MANIFEST, bogus);
    assert.equal(await on.resolve(labelsFor(plain[2])), null, 'annotation names another layer');
  });
});
