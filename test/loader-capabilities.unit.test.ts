/**
 * What the snapshotter asks the lazy loader instead of which backend it
 * is (issue 13): whether a layer mounts at once, whether a mount made
 * before start reads through a lost fscache binding, whether a mount may
 * hold zeros (fanotify, its file unmarked). No holder, no kernel
 * mechanism: only the fill state of lazy files on disk.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { type LazyBackend, type LazyLayerInput, LazyLoader } from '../src/ondemand/lazy-loader';
import type { RemoteLayers } from '../src/remote/lazy';
import type { ChunkStore } from '../src/store/chunkstore';

const D = (c: string) => `sha256:${c.repeat(64)}`;

/** A loader over a temp dir with layer "1" (its two chunks present) and layer "2" (its second chunk a hole). */
function loaderWithLayers(backend: LazyBackend): { loader: LazyLoader; dir: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'loader-cap-'));
  const loader = new LazyLoader({
    backend,
    dir: path.join(dir, 'lazy'),
    fscache: { dir: path.join(dir, 'fscache'), tag: 't', domain: 'd' },
    mountPath: (id) => path.join(dir, 'mnt', id),
    socket: path.join(dir, 'ondemand', 'holder.sock'),
    remote: {} as RemoteLayers,
    store: {} as ChunkStore,
    holderCommand: null,
  });
  const layer = (id: string, holes: boolean): LazyLayerInput => {
    const file = loader.fileOf(id);
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 8192);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 0);
    if (!holes) fs.writeSync(fd, Buffer.alloc(4096, 2), 0, 4096, 4096);
    fs.closeSync(fd);
    const header = { version: 1, chunk_size: 4096, erofs_size: 0, has_blob: true, data_blobs: [D('b')], chunks: [[0, 1, D('1'), 0, 0], [1, 1, D('2'), 0, 4096]], source_diff_id: D('c'), files: 1, logical_bytes: 8192 } as LazyLayerInput['header'];
    return { id, header, rl: { repo: {} as LazyLayerInput['rl']['repo'], manifestDigest: D('d'), layerDigest: D(id === '1' ? 'e' : 'f') } };
  };
  loader.register(layer('1', false));
  loader.register(layer('2', true));
  return { loader, dir };
}

test('fanotify: a complete layer mounts at once; an incomplete one whose file is not marked waits, and a mount of it may hold zeros', () => {
  const { loader, dir } = loaderWithLayers('fanotify');
  try {
    assert.equal(loader.backend, 'fanotify');
    assert.deepEqual(loader.summary(), { layers: 2, incomplete: 1, missing_chunks: 1 });
    assert.equal(loader.canMountAtOnce('1'), true);
    assert.equal(loader.canMountAtOnce('2'), false, 'its file must be marked first (a round-trip to the holder)');
    assert.equal(loader.mountMayHoldZeros('1'), false);
    assert.equal(loader.mountMayHoldZeros('2'), true);
    assert.equal(loader.mountReadsFailSinceRebind('2'), false);
  } finally {
    loader.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('fscache: no layer mounts at once, none holds zeros; a binding made anew at start is what fails old mounts', () => {
  const { loader, dir } = loaderWithLayers('fscache');
  try {
    assert.equal(loader.backend, 'fscache');
    for (const id of ['1', '2']) {
      assert.equal(loader.canMountAtOnce(id), false);
      assert.equal(loader.mountMayHoldZeros(id), false);
      assert.equal(loader.mountReadsFailSinceRebind(id), false, 'not bound anew (not bound at all yet)');
    }
    assert.equal(loader.cachefilesRebound, false);
  } finally {
    loader.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
