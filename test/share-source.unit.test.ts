import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import type { StoredLayerSource } from '../src/convert/dedup-layer';
import { type ShareParts, storedLayer } from '../src/layers/share-offer';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { type ChunkRow, segmentTag } from '../src/store/chunkstore';
import { FakeKernel } from './helpers/fake-kernel';

/**
 * registry.push_converted reads a layer back as the store holds it
 * (layers/share-offer.ts storedLayer): its image, checked against the
 * digest recorded for it; its chunks where the image names them; their
 * bytes from a good copy only. A layer converted by the snapshotter (fake
 * kernel, no mounts) is read back here; the pushed result itself is tested
 * in share.test and lazy-cri.
 */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'share-source-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const CHUNK = 1 << 20;
const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

interface Layer {
  parts: Omit<ShareParts, 'share'>;
  id: string;
  big: Buffer;
  rows: ChunkRow[];
}

/** A snapshotter converting at Commit, one committed layer of a 2.5 MiB file and a small one. */
async function withLayer(name: string, fn: (l: Layer) => Promise<void>): Promise<void> {
  const root = path.join(dir, name);
  let fake: FakeKernel | undefined;
  const sn = new Snapshotter({
    root,
    erofs: { chunkSize: CHUNK, mkfs: 'mkfs.erofs', convertMode: 'sync', storeLayout: 'single' },
    kernel: (storeFile: string, devicesOf?: (image: string) => string[]) => (fake = new FakeKernel(storeFile, devicesOf)),
  });
  try {
    await sn.prepare('active', '');
    const upper = sn.parts.layout.upper(sn.parts.ms.getInfo('active').id);
    const big = crypto.randomBytes(2 * CHUNK + CHUNK / 2);
    fs.writeFileSync(path.join(upper, 'big'), big);
    fs.writeFileSync(path.join(upper, 'small'), 'hello\n');
    fake?.syncUppers();
    await sn.commit('layer', 'active');
    const id = sn.parts.ms.getInfo('layer').id;
    const store = sn.parts.erofs?.store;
    assert.ok(store, 'the snapshotter converts to EROFS');
    await fn({ parts: { ms: sn.parts.ms, store, layout: sn.parts.layout }, id, big, rows: store.layerChunks(Number(id)) });
  } finally {
    await fake?.unmountUnder(root);
    sn.close();
  }
}

/** The pieces of `data` the store keeps as chunks. */
function pieces(data: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let at = 0; at < data.length; at += CHUNK) out.push(data.subarray(at, at + CHUNK));
  return out;
}

test("the stored form: the image as recorded, each chunk where the image's index names it, bytes read back checked", async () => {
  await withLayer('whole', async ({ parts, id, big, rows }) => {
    const src: StoredLayerSource = await storedLayer(parts, id);
    assert.deepEqual(src.image, fs.readFileSync(parts.layout.image(id)));
    assert.equal(rows.length, 4, 'three pieces of big, one of small');
    for (const row of rows) {
      assert.deepEqual(src.chunkAt(segmentTag(row.segment), row.blkaddr), row);
      // An untagged device (images of older versions) is chunks.blob.
      if (row.segment === 0) assert.deepEqual(src.chunkAt('', row.blkaddr), row);
    }
    assert.equal(src.chunkAt(segmentTag(0), 1 << 30), undefined, 'no chunk there');
    for (const piece of pieces(big)) assert.deepEqual(await src.read(sha(piece)), piece);
    // A chunk is its bytes padded with zeros to whole 4 KiB blocks (chunk-sink.ts), digest included.
    const small = Buffer.concat([Buffer.from('hello\n'), Buffer.alloc(4096 - 6)]);
    assert.deepEqual(await src.read(sha(small)), small);
    await assert.rejects(src.read(sha(Buffer.from('not stored'))), /no good copy on this node/);
  });
});

test('a chunk marked bad, or whose bytes changed on the disk, has no good copy: the read fails, naming it', async () => {
  await withLayer('damaged', async ({ parts, id, big }) => {
    const src = await storedLayer(parts, id);
    const [first, second] = pieces(big).map(sha);
    const rowOf = (digest: string) => parts.store.lookupAll(digest)[0];
    parts.store.markBad([rowOf(first).id], 'test');
    await assert.rejects(src.read(first), new RegExp(`chunk sha256:${first}: no good copy`));
    // Zeros over the second piece's blocks in the store file: the checked read marks it and finds no other copy.
    const row = rowOf(second);
    const fd = fs.openSync(parts.store.blobPath, 'r+');
    try {
      fs.writeSync(fd, Buffer.alloc(4096), 0, 4096, row.blkaddr * 4096);
    } finally {
      fs.closeSync(fd);
    }
    await assert.rejects(src.read(second), /no good copy/);
    assert.equal(parts.store.lookupAll(second)[0].bad, true, 'marked bad');
  });
});

test('an image that is not the one recorded for the layer is refused, naming the file', async () => {
  await withLayer('image', async ({ parts, id }) => {
    const file = parts.layout.image(id);
    fs.chmodSync(file, 0o644);
    fs.appendFileSync(file, Buffer.from([0]));
    await assert.rejects(storedLayer(parts, id), (err: Error) => err.message.includes(file) && /is not the image recorded for layer/.test(err.message));
  });
});
