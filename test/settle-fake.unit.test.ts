/**
 * Settling against the fake kernel, without root: a lazy layer that has all
 * its data moves into the chunk store only while nothing but its own mount
 * uses it (its mount busy, its lazy files open elsewhere, or handed out a
 * moment ago: it stays lazy and is tried again), its data read back from
 * the store is the layer's, and hosts without file leases stop settling
 * with one error line. Part of `npm run test:unit`.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { ErrnoError } from '../native/libc';
import { hashImageChunks } from '../src/convert/chunks';
import { Converter } from '../src/convert/converter';
import { buildChunkedImage, probeMkfs } from '../src/convert/mkfs';
import { LayerMounts } from '../src/layers/layer-mounts';
import { Settler } from '../src/layers/settle';
import { createLogger } from '../src/log/logger';
import type { LazyLoader } from '../src/ondemand/lazy-loader';
import type { ChunkEntry, LayerHeader } from '../src/remote/dedup-image';
import { ChunkStore } from '../src/store/chunkstore';
import { MetaStore } from '../src/store/metastore';
import { RootLayout } from '../src/store/root-layout';
import { Kind } from '../src/store/types';
import { tempDir } from './helpers/daemon';
import { FakeKernel } from './helpers/fake-kernel';
import { checkDirectoryEqual } from './helpers/fstest';
import { pseudoRandom } from './helpers/images';

const CHUNK = 65536;
let dir: string;
let src: string;

before(() => {
  dir = tempDir('settle-fake');
  src = path.join(dir, 'src');
  fs.mkdirSync(path.join(src, 'data'), { recursive: true });
  fs.writeFileSync(path.join(src, 'data', 'big.bin'), pseudoRandom(5 * CHUNK + 1234, 'settle-big'));
  fs.writeFileSync(path.join(src, 'data', 'copy.bin'), pseudoRandom(2 * CHUNK, 'settle-big').subarray(0, 2 * CHUNK));
  fs.writeFileSync(path.join(src, 'small.txt'), 'small\n');
});

after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** The loader's side of a lazy layer whose data is all here (the loader itself needs fanotify or fscache). */
class CompleteLoader {
  readonly dropped: string[] = [];
  constructor(private readonly layout: RootLayout) {}
  imageOf(id: string): string {
    return path.join(this.layout.lazyDir, `${id}.erofs`);
  }
  fileOf(id: string): string {
    return path.join(this.layout.lazyDir, `${id}.blob`);
  }
  incomplete(): boolean {
    return false;
  }
  canMountAtOnce(): boolean {
    return true;
  }
  drop(id: string): void {
    this.dropped.push(id);
    fs.rmSync(this.imageOf(id), { force: true });
    fs.rmSync(this.fileOf(id), { force: true });
  }
}

interface Rig {
  layout: RootLayout;
  ms: MetaStore;
  store: ChunkStore;
  fake: FakeKernel;
  loader: CompleteLoader;
  mounts: LayerMounts;
  settler: Settler;
  id: string;
  logged: () => string;
  close(): void;
}

/** A root with one lazy layer made from `src` (image and lazy blob as a lazy pull leaves them), mounted. */
async function rig(name: string, graceMs = 0): Promise<Rig> {
  let logged = '';
  const logger = createLogger('info', { write: (l: string) => void (logged += l) });
  const layout = new RootLayout(path.join(dir, name));
  fs.mkdirSync(layout.lazyDir, { recursive: true });
  const ms = new MetaStore(path.join(layout.root, 'metadata.db'));
  const store = new ChunkStore({ root: layout.root, db: ms.db, logger, layout: 'single' });
  const fake = new FakeKernel(store.blobPath, () => [store.blobPath]);
  const loader = new CompleteLoader(layout);
  const lazy = loader as unknown as LazyLoader;
  const mounts = new LayerMounts({ layout, ms, kernel: fake, images: true, loader: lazy, integrity: null, logger, retireGraceMs: graceMs });
  const mkfs = () => probeMkfs('mkfs.erofs');
  const converter = new Converter({ store, mkfs, imagesDir: layout.imagesDir, tmpDir: layout.tmpDir, chunkSize: CHUNK });
  const settler = new Settler({ ms, store, converter, loader: lazy, mounts, logger, enabled: true });

  ms.transaction(() => ms.createSnapshot(Kind.Active, 'import', ''));
  const id = ms.getInfo('import').id;
  await buildChunkedImage(await mkfs(), { dir: src, image: loader.imageOf(id), blob: loader.fileOf(id), chunkSize: CHUNK });
  const img = fs.readFileSync(loader.imageOf(id));
  const hashed = await hashImageChunks(img, loader.fileOf(id));
  const chunks: ChunkEntry[] = [...hashed.extents].map(([k, e]) => [e.blkaddr, e.nblocks, hashed.digests.get(k) as string, 0, e.blkaddr * 4096]);
  const header = { version: 1, chunk_size: CHUNK, erofs_size: img.length, has_blob: true, data_blobs: [], chunks, source_diff_id: '', files: 3, logical_bytes: 0 } as LayerHeader;
  ms.transaction(() => {
    ms.commitActive('import', 'layer', { size: 0, inodes: 3 });
    ms.addLayer(id, { format: 'erofs', has_blob: 1, files: 3, logical_bytes: 0, image_bytes: img.length, chunks: chunks.length, new_chunks: 0, new_bytes: 0, convert_ms: 0 });
    ms.addLazyLayer(id, { image_ref: 'registry.test/x:v1', manifest_digest: 'sha256:m', layer_digest: 'sha256:l', header: JSON.stringify(header) });
  });
  mounts.mountLazyFile(id, true);
  return {
    layout,
    ms,
    store,
    fake,
    loader,
    mounts,
    settler,
    id,
    logged: () => logged,
    close() {
      settler.close();
      store.close();
      ms.close();
    },
  };
}

test('an idle complete lazy layer moves into the chunk store and reads the same', async () => {
  const r = await rig('idle');
  try {
    checkDirectoryEqual(src, r.mounts.path(r.id));
    assert.equal(await r.settler.settleIdle(), 1);
    assert.equal(r.ms.isLazy(r.id), false, 'a store layer now');
    assert.deepEqual(r.loader.dropped, [r.id], 'its lazy files went');
    assert.equal(r.settler.settled, 1);
    // The mount now reads the store: the same tree, the shared chunk stored once.
    checkDirectoryEqual(src, r.mounts.path(r.id));
    const st = r.store.stats();
    assert.ok(st.chunks > 0 && st.storedBytes < 8 * CHUNK, JSON.stringify(st));
    assert.ok(r.fake.calls.includes(`mountImage ${r.mounts.path(r.id)}`));
    assert.match(r.logged(), /"op":"settle".*settled into the chunk store/);
  } finally {
    r.close();
  }
});

test('a layer in use stays lazy: its mount busy, or its lazy files open elsewhere', async () => {
  const r = await rig('busy');
  try {
    r.fake.busy.add(r.mounts.path(r.id));
    assert.equal(await r.settler.settleIdle(), 0, 'busy mount');
    assert.equal(r.ms.isLazy(r.id), true);
    r.fake.busy.clear();
    r.fake.openFiles.add(r.loader.fileOf(r.id));
    assert.equal(await r.settler.settleIdle(), 0, 'an overlay still holds the lazy file');
    assert.equal(r.ms.isLazy(r.id), true);
    assert.deepEqual(r.fake.mountPoints(), [r.mounts.path(r.id)], 'mounted again at once, lazy');
    checkDirectoryEqual(src, r.mounts.path(r.id));
    r.fake.openFiles.clear();
    assert.equal(await r.settler.settleIdle(), 1, 'settled once nothing uses it');
  } finally {
    r.close();
  }
});

test('a layer handed out in a mount a moment ago is left alone until the grace time passed', async () => {
  const r = await rig('grace', 60_000);
  try {
    r.mounts.rootsOf([r.id]);
    assert.equal(await r.settler.settleIdle(), 0);
    assert.equal(r.ms.isLazy(r.id), true);
  } finally {
    r.close();
  }
});

test('without file leases, settling stops with one error line naming the sysctl, the layer still served', async () => {
  const r = await rig('noleases');
  try {
    r.fake.openElsewhere = () => {
      throw new ErrnoError('fcntl', 22, 'F_SETLEASE');
    };
    assert.equal(await r.settler.settleIdle(), 0);
    assert.equal(r.ms.isLazy(r.id), true);
    assert.equal(r.logged().split('\n').filter((l) => l.includes('"level":"error"') && l.includes('fs.leases-enable = 1')).length, 1, r.logged());
    assert.deepEqual(r.fake.mountPoints(), [r.mounts.path(r.id)], 'still mounted, lazy');
  } finally {
    r.close();
  }
});
