/**
 * content-ahead.ts against a faked containerd (its Images and Content
 * services): a layer read ahead from the content store while containerd
 * unpacks it is handed to the conversion when the directory has its
 * shape; a snapshot removed while its layer is being read stops the read
 * at once and gives its provisional chunks back (a failed pull's layer
 * must not go on filling the disk). Part of `npm run test:unit`.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import type { Descriptor } from '../src/containerd/client';
import { type AheadClient, ContentAhead } from '../src/layers/content-ahead';
import { createLogger } from '../src/log/logger';
import { ChunkStore } from '../src/store/chunkstore';
import { MetaStore } from '../src/store/metastore';
import { tempDir } from './helpers/daemon';
import { type BuiltImage, MEDIA_MANIFEST, buildImage, pseudoRandom } from './helpers/images';

const CHUNK = 65536;
const MiB = 1 << 20;
let dir: string;
let img: BuiltImage;

before(async () => {
  dir = tempDir('content-ahead');
  img = await buildImage({
    name: 'ahead',
    tag: 'v1',
    layers: [[{ type: 'dir', path: 'data', mode: 0o755 }, { type: 'file', path: 'data/big.bin', mode: 0o644, content: pseudoRandom(8 * MiB, 'ahead-big') }]],
    passwd: '',
    expect: [],
  });
});

after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** containerd's answers for namespace "default" holding `img` as "ahead:v1". */
function fakeClient(): AheadClient {
  const docs = new Map<string, Buffer>([
    [img.manifestDigest, img.manifest],
    [img.configDigest, img.config],
  ]);
  const target: Descriptor = { media_type: MEDIA_MANIFEST, digest: img.manifestDigest, size: img.manifest.length };
  return {
    listImageTargets: async () => [{ name: 'ahead:v1', target }],
    getImage: async () => target,
    readContent: async (digest) => {
      const b = docs.get(digest);
      if (!b) throw new Error(`content ${digest} not found`);
      return b;
    },
    close: () => undefined,
  };
}

/** The layer blob in 64 KiB blocks; after `stallAfter` blocks it waits for `go`. Counts what was read and whether it was closed. */
function slowBlob(blob: Buffer, stallAfter: number, go: Promise<void>) {
  const seen = { blocks: 0, total: Math.ceil(blob.length / 65536), closed: false };
  async function* gen(): AsyncGenerator<Buffer> {
    try {
      for (let off = 0; off < blob.length; off += 65536) {
        if (seen.blocks === stallAfter) await go;
        seen.blocks++;
        yield blob.subarray(off, off + 65536);
      }
    } finally {
      seen.closed = true;
    }
  }
  return { seen, gen };
}

function rig(name: string, content: () => AsyncIterable<Buffer>) {
  const root = path.join(dir, name);
  fs.mkdirSync(root, { recursive: true });
  const ms = new MetaStore(path.join(root, 'metadata.db'));
  const logger = createLogger('silent', { write: () => undefined });
  const store = new ChunkStore({ root, db: ms.db, logger, layout: 'single' });
  const ahead = new ContentAhead({ content: () => content(), containerdAddress: '/nonexistent.sock', client: fakeClient, store, chunkSize: CHUNK, logger });
  const allocated = () => fs.statSync(store.blobPath).blocks * 512;
  return {
    ahead,
    allocated,
    close() {
      ahead.close();
      store.close();
      ms.close();
    },
  };
}

const unpackKey = () => `default/7/extract-123-abc ${img.chainIds[0]}`;

test('a snapshot removed while its layer is read ahead: the read stops at once and its chunks are given back', async () => {
  let release = () => undefined as void;
  const go = new Promise<void>((r) => (release = r));
  const { seen, gen } = slowBlob(img.layers[0].gz, 40, go);
  const r = rig('removed', gen);
  try {
    const before = r.allocated();
    r.ahead.start('7', unpackKey());
    // The read is under way: 40 blocks (2.5 MiB of the ~8 MiB blob) read, their chunks written provisionally.
    const t0 = Date.now();
    while (seen.blocks < 40 && Date.now() - t0 < 10_000) await new Promise((res) => setTimeout(res, 10));
    assert.equal(seen.blocks, 40, 'the read began');
    const forgotten = r.ahead.forget('7');
    release();
    await forgotten;
    assert.ok(seen.closed, 'the blob was closed');
    assert.ok(seen.blocks < seen.total, `the read stopped: ${seen.blocks} of ${seen.total} blocks read`);
    assert.equal(r.allocated(), before, 'the chunks it wrote were given back');
    assert.equal(await r.ahead.take('7', path.join(dir, 'nothing')), null, 'nothing is left to take');
  } finally {
    release();
    r.close();
  }
});

test('a layer read ahead is taken by its conversion when the unpacked directory has its shape', async () => {
  const r = rig('taken', async function* () {
    yield img.layers[0].gz;
  });
  // The read-ahead's timers do not hold the process open (a daemon's would be held by its server): this test's is.
  const keepAlive = setInterval(() => undefined, 1000);
  try {
    r.ahead.start('7', unpackKey());
    const unpacked = path.join(dir, 'taken-fs');
    fs.mkdirSync(path.join(unpacked, 'data'), { recursive: true });
    // Not yet the layer's shape (big.bin missing): the directory is converted instead, and the chunks go back.
    const layer = await r.ahead.take('7', unpacked);
    assert.equal(layer, null);
    r.ahead.start('8', unpackKey().replace('/7/', '/8/'));
    const big = path.join(unpacked, 'data', 'big.bin');
    fs.writeFileSync(big, pseudoRandom(8 * MiB, 'ahead-big'));
    fs.chmodSync(big, 0o644);
    // As the layer's tar headers say (test/helpers/images.ts: every entry's mtime is 2024-01-02T03:04:05Z).
    const tarMtime = new Date('2024-01-02T03:04:05Z');
    fs.utimesSync(big, tarMtime, tarMtime);
    fs.chmodSync(unpacked, 0o755);
    fs.chmodSync(path.join(unpacked, 'data'), 0o755);
    const taken = await r.ahead.take('8', unpacked);
    assert.ok(taken, 'the layer read ahead is taken for a directory of its shape');
    assert.equal(taken.digest, img.layers[0].digest);
    assert.ok(taken.root.children?.get('data')?.children?.get('big.bin'), 'the tree has the layer\'s file');
    await taken.sink.discard();
  } finally {
    clearInterval(keepAlive);
    r.close();
  }
});
