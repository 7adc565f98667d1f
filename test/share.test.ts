/**
 * Shared converted layers (src/convert/share.ts, RemoteLayers with
 * pullConverted) against a real registry and the real mkfs.erofs: what is
 * pushed under which tag, what is not pushed (already there, layer removed
 * mid-build, labels naming no image layer), and which tags a pulling node
 * accepts.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { scanDataChunks } from '../src/convert/chunks';
import { Converter } from '../src/convert/converter';
import { readDeviceTags, superblockChecksumOk } from '../src/convert/erofs-format';
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
import { ChunkStore, type Extent, segmentTag } from '../src/store/chunkstore';
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
  let store: ChunkStore;
  let converter: Converter;
  let db: Database.Database;

  before(async () => {
    reg = await startRegistry();
    client = new RegistryClient({ plainHttpHosts: [reg.host] });
    dir = work('share');
    img = await buildImage(tortureImageDef());
    await pushImage(img, reg.host, dir);
    plain = (JSON.parse(img.manifest.toString('utf8')) as { layers: { digest: string }[] }).layers.map((l) => l.digest);
    const mkfs = await probeMkfs('mkfs.erofs');
    const root = path.join(dir, 'node');
    fs.mkdirSync(path.join(root, 'store'), { recursive: true });
    db = new Database(path.join(root, 'm.db'));
    store = new ChunkStore({ root, db, layout: 'single' });
    converter = new Converter({ store, mkfs: async () => mkfs, imagesDir: path.join(root, 'images'), tmpDir: path.join(root, 'tmp'), chunkSize: 65536 });
    pusher = new ConvertedLayerPusher({ client, chunkSize: 65536, workDir: path.join(dir, 'tmp') });
  });

  after(async () => {
    pusher?.close();
    await store?.settled();
    store?.close();
    db?.close();
    client?.close();
    await reg?.stop();
  });

  const labelsFor = (layer: string) => ({
    [LABEL_SNAPSHOT_REF]: `sha256:${'c'.repeat(64)}`,
    [LABEL_CRI_IMAGE_REF]: img.ref as string,
    [LABEL_CRI_MANIFEST_DIGEST]: img.manifestDigest,
    [LABEL_CRI_LAYER_DIGEST]: layer,
  });

  /**
   * A layer converted here (a directory with one file of 300000 bytes): the
   * job's source is its image and its chunks as the store holds them.
   */
  const job = async (name: string, labels: Record<string, string>, alive = () => true): Promise<ShareJob> => {
    const d = path.join(dir, name);
    fs.mkdirSync(path.join(d, 'opt'), { recursive: true });
    fs.writeFileSync(path.join(d, 'opt', `${name}.bin`), pseudoRandom(300_000, name));
    const layer = await converter.convert(name, d, (l) => l);
    const image = fs.readFileSync(layer.image);
    const at = new Map(layer.newChunks.map((c) => [`${segmentTag(c.extent.segment ?? 0)}@${c.extent.blkaddr}`, c]));
    const byDigest = new Map(layer.newChunks.map((c) => [c.digest, c.extent]));
    return {
      id: name,
      labels,
      alive,
      source: async () => ({
        image,
        chunkAt: (tag, blkaddr) => {
          const c = at.get(`${tag}@${blkaddr}`);
          return c && { digest: c.digest, nblocks: c.extent.nblocks };
        },
        read: (digest) => store.read(byDigest.get(digest) as Extent),
      }),
    };
  };

  const tagOf = (layer: string) => `${reg.host}/${img.def.name}:${convertedLayerTag(layer)}`;

  test('a converted layer is pushed under sha256-<hex>.dedup from its stored form: metadata, chunk data, config naming its source', async () => {
    const j = await job('one', labelsFor(plain[0]));
    assert.equal(pusher.offer(j), true);
    await pusher.idle();
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
    const { header, erofs: image } = decodeLayerBlob(await client.getBlob(`${reg.host}/${img.def.name}`, json.layers[0].digest));
    assert.equal(header.source_diff_id, img.diffIds[0]);
    assert.deepEqual(header.data_blobs, [json.layers[1].digest], 'every chunk is in the layer’s own data blob');
    assert.equal(header.logical_bytes, 300_000);
    // The image names one device, its layer-local chunk space; its chunks, read from the data blob, are the file.
    assert.deepEqual(readDeviceTags(image), ['dedup:layer']);
    assert.ok(superblockChecksumOk(image), 'its superblock checksum is right after the rewrite');
    const data = await client.getBlob(`${reg.host}/${img.def.name}`, json.layers[1].digest);
    const entries = new Map(header.chunks.map((c) => [`${c[0]}:${c[1]}`, c]));
    const parts = scanDataChunks(image).refs.map((r) => {
      const c = entries.get(`${r.blkaddr}:${r.nblocks}`);
      assert.ok(c, `chunk index at block ${r.blkaddr} is in the chunk table`);
      const bytes = data.subarray(c[4], c[4] + c[1] * 4096);
      assert.equal(crypto.createHash('sha256').update(bytes).digest('hex'), c[2]);
      return bytes.subarray(0, r.length);
    });
    assert.ok(Buffer.concat(parts).equals(pseudoRandom(300_000, 'one')), 'the file reads back from the pushed layer');
  });

  test('nothing is pushed again when the tag is there, when the layer went mid-build, when the labels name no image layer, or when a chunk read is not its bytes', async () => {
    const again = await job('again', labelsFor(plain[0]));
    pusher.offer(again);
    await pusher.idle();
    assert.equal(pusher.counters.present, 1);
    assert.equal(pusher.counters.pushed, 1);

    const gone = await job('gone', labelsFor(plain[1]), () => false);
    pusher.offer(gone);
    await pusher.idle();
    await assert.rejects(client.getManifest(tagOf(plain[1])), (err: { status?: number }) => err.status === 404);
    assert.equal(pusher.counters.pushed, 1);

    const unlabeled = await job('unlabeled', { [LABEL_SNAPSHOT_REF]: `sha256:${'c'.repeat(64)}` });
    assert.equal(pusher.offer(unlabeled), false);

    // A layer the image does not list: refused, nothing pushed.
    const stranger = `sha256:${'d'.repeat(64)}`;
    const wrong = await job('wrong', labelsFor(stranger));
    pusher.offer(wrong);
    await pusher.idle();
    assert.equal(pusher.counters.failed, 1);
    await assert.rejects(client.getManifest(tagOf(stranger)), (err: { status?: number }) => err.status === 404);

    // A layer without file data whose names mkfs.erofs had to take (not UTF-8): pushed as it is.
    const odd = path.join(dir, 'odd');
    fs.mkdirSync(odd);
    fs.writeFileSync(Buffer.concat([Buffer.from(`${odd}/`), Buffer.from([0x6f, 0xff])]), '');
    const oddLayer = await converter.convert('odd', odd, (l) => l);
    pusher.offer({ id: 'odd', labels: labelsFor(plain[2]), alive: () => true, source: async () => ({ image: fs.readFileSync(oddLayer.image), chunkAt: () => undefined, read: () => Promise.reject(new Error('no chunks')) }) });
    await pusher.idle();
    assert.equal(pusher.counters.pushed, 2, JSON.stringify(pusher.counters));
    const oddHeader = decodeLayerBlob(await client.getBlob(`${reg.host}/${img.def.name}`, ((await client.getManifest(tagOf(plain[2]))).json as { layers: { digest: string }[] }).layers[0].digest)).header;
    assert.deepEqual([oddHeader.chunks.length, oddHeader.files], [0, 1]);

    // A chunk whose bytes are not its digest's is never pushed: the layer is not shared.
    const bad = await job('bad', labelsFor(plain[1]));
    pusher.offer({
      ...bad,
      source: async () => {
        const src = await bad.source();
        const damaged = async (digest: string) => {
          const b = Buffer.from(await src.read(digest));
          b[0] ^= 0xff;
          return b;
        };
        return { ...src, read: damaged };
      },
    });
    await pusher.idle();
    assert.equal(pusher.counters.failed, 2);
    assert.equal(pusher.counters.pushed, 2);
    await assert.rejects(client.getManifest(tagOf(plain[1])), (err: { status?: number }) => err.status === 404);
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
