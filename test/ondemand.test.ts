/**
 * On-demand loading through fanotify (issue 5, item 3) with the real
 * daemon, holder, registry and kernel: a remote layer is committed and
 * mounted with only its metadata; a read of its files waits while the
 * chunks it needs are fetched, and gets the right bytes. kill -9 of the
 * daemon while a reader waits: the read completes with the right bytes
 * after the restart, never zeros. Registry failing or serving corrupt
 * chunks: the reader gets EIO, and a later read succeeds once the registry
 * is back.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { mountAll, unmount } from '../src/mount/mount';
import { listMounts } from '../src/mount/mountinfo';
import { LABEL_SNAPSHOT_REF } from '../src/remote/lazy';
import { RegistryClient } from '../src/remote/registry';
import { type DaemonProcess, call, cleanupDaemons, snapshotsClient, startDaemon, stopHolder, tempDir, waitFor } from './helpers/daemon';
import { daemonStats } from './helpers/http';
import { pseudoRandom } from './helpers/images';
import { type LazyLayer, lazyImage as makeLazyImage, lazyPrepare as prepareLazily, readInChild, sha256 } from './helpers/ondemand';
import { type RealRegistry, type RegistryProxy, startRegistry, startRegistryProxy } from './helpers/registry';

const [major, minor] = os.release().split('.').map(Number);
const skip = major > 6 || (major === 6 && minor >= 14) ? false : `fanotify pre-content events need Linux >= 6.14 (this is ${os.release()})`;
const MiB = 1 << 20;

let registry: RealRegistry;
let proxy: RegistryProxy;
let client: RegistryClient;
let dir: string;

before(async () => {
  if (skip) return;
  registry = await startRegistry();
  proxy = await startRegistryProxy(registry.host);
  client = new RegistryClient({ plainHttpHosts: [registry.host] });
  dir = tempDir('ondemand');
});

after(async () => {
  await cleanupDaemons();
  client?.close();
  await proxy?.stop();
  await registry?.stop();
});

const lazyImage = (name: string, size: number, files?: { path: string; content: Buffer }[], prefetch?: string[]) => makeLazyImage({ registry, proxy, client, dir }, name, size, files, prefetch);
const lazyPrepare = (d: DaemonProcess, l: LazyLayer) => prepareLazily(d, l, 'fanotify');

function daemonOptions(root?: string, address?: string, ondemand: Record<string, unknown> = {}) {
  return { dir, root, address, config: { registry: { plain_http_hosts: [proxy.host] }, ondemand: { backend: 'fanotify', ...ondemand } } };
}

test('a remote layer is mounted with its metadata only; reads fetch the chunks they need and get the right bytes', { skip }, async () => {
  const l = await lazyImage('od-basic', 3 * MiB);
  const d = await startDaemon(daemonOptions());
  const before = proxy.ranges;
  const id = await lazyPrepare(d, l);
  assert.equal(proxy.ranges, before, 'no chunk fetched by Prepare');
  let st = await daemonStats(d.apiAddress);
  assert.equal(st.ondemand.backend, 'fanotify');
  assert.equal(st.ondemand.lazy_layers, 1);
  assert.ok(st.ondemand.missing_chunks > 0, 'chunks are missing before any read');
  assert.equal(fs.statSync(path.join(d.root, 'lazy', `${id}.blob`)).blocks, 0, 'the lazy file is all holes');

  const r = readInChild(path.join(d.root, 'mnt', id, 'data.bin'));
  assert.equal(await r.done, sha256(l.content), 'the reader gets the file');
  st = await daemonStats(d.apiAddress);
  assert.ok(st.ondemand.requests > 0 && st.ondemand.misses > 0, `read events were served: ${JSON.stringify(st.ondemand)}`);
  assert.ok(st.remote.bytes_fetched >= 3 * MiB, 'the chunks were fetched');
  assert.equal(st.ondemand.missing_chunks, 0, 'the whole file was read: nothing missing');
  assert.equal(st.ondemand.errors, 0);

  // Read again from a fresh page cache: served from the lazy file, nothing fetched.
  const ranges = proxy.ranges;
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'data.bin')).done, sha256(l.content));
  assert.equal(proxy.ranges, ranges, 'a second read fetches nothing');
  await d.stop();
});

test('kill -9 of the daemon while a reader waits: after the restart the reader gets the right bytes, never zeros', { skip }, async () => {
  const l = await lazyImage('od-crash', 2 * MiB);
  const d = await startDaemon(daemonOptions());
  const id = await lazyPrepare(d, l);
  proxy.mode = 'hold';
  try {
    const r = readInChild(path.join(d.root, 'mnt', id, 'data.bin'));
    await waitFor(() => proxy.held() > 0, 20_000, 'the read reaching the registry');
    await d.kill();
    await new Promise((res) => setTimeout(res, 1000));
    assert.equal(r.exited(), false, 'the reader waits while no daemon runs');
    // The killed daemon's fetches die with it; the restarted one fetches again.
    proxy.mode = 'pass';
    proxy.release();
    const d2 = await startDaemon(daemonOptions(d.root, d.address));
    const got = await r.done;
    assert.equal(got, sha256(l.content), 'the right bytes after the restart');
    assert.notEqual(got, sha256(Buffer.alloc(l.content.length)), 'not zeros');
    assert.ok(d2.logs().some((x) => x.op === 'ondemand' && typeof x.holder_pid === 'number'), 'the restarted daemon reconnected to the holder');
    await d2.stop();
  } finally {
    proxy.mode = 'pass';
    proxy.release();
  }
});

test('registry failing or serving a corrupt chunk: the read gets EIO after bounded retries; it succeeds once the registry is back', { skip }, async () => {
  const l = await lazyImage('od-fail', 1 * MiB);
  const d = await startDaemon(daemonOptions());
  const id = await lazyPrepare(d, l);
  const file = path.join(d.root, 'mnt', id, 'data.bin');
  try {
    for (const mode of ['fail', 'corrupt'] as const) {
      proxy.mode = mode;
      const t0 = Date.now();
      assert.equal(await readInChild(file).done, 'ERR:EIO', `${mode}: EIO`);
      assert.ok(Date.now() - t0 < 60_000, `${mode}: the reader did not hang`);
    }
    const st = await daemonStats(d.apiAddress);
    assert.ok(st.ondemand.errors >= 2, 'denied reads are counted');
    assert.ok(d.logs().some((x) => x.op === 'ondemand' && /failed, the reader gets EIO/.test(String(x.msg))), 'the failure is logged');
    proxy.mode = 'pass';
    assert.equal(await readInChild(file).done, sha256(l.content), 'a retry reads the file');
  } finally {
    proxy.mode = 'pass';
  }
  await d.stop();
});

test('chunks the node has are never fetched: a second image sharing a file copies it from the first lazy layer', { skip }, async () => {
  const shared = pseudoRandom(2 * MiB, 'od-shared');
  const mk = (name: string, own: Buffer) => lazyImage(name, 0, [{ path: 'shared.bin', content: shared }, { path: 'own.bin', content: own }]);
  const a = await mk('od-share-a', pseudoRandom(256 * 1024, 'own-a'));
  const b = await mk('od-share-b', pseudoRandom(256 * 1024, 'own-b'));
  const d = await startDaemon(daemonOptions());
  const idA = await lazyPrepare(d, a);
  assert.equal(await readInChild(path.join(d.root, 'mnt', idA, 'shared.bin')).done, sha256(shared));
  const ranges = proxy.ranges;
  const idB = await lazyPrepare(d, b);
  const line = d.logs().find((x) => x.op === 'remote' && x.layer === idB);
  assert.ok(Number(line?.local_chunks) >= (2 * MiB) / 65536, `the shared chunks were copied at Prepare: ${JSON.stringify(line)}`);
  assert.equal(await readInChild(path.join(d.root, 'mnt', idB, 'shared.bin')).done, sha256(shared));
  assert.equal(proxy.ranges, ranges, 'reading the shared file of the second image fetched nothing');
  await d.stop();
});

test('the holder lost while a lazy layer is mounted: a new holder reads the daemon\'s copy of the group; reads still wait for their data', { skip }, async () => {
  const l = await lazyImage('od-holder-lost', 1 * MiB);
  const d = await startDaemon(daemonOptions());
  const id = await lazyPrepare(d, l);
  const ranges = proxy.ranges;
  assert.ok(stopHolder(d.root, 'SIGKILL'), 'the holder ran');
  await waitFor(() => d.logs().some((x) => x.op === 'ondemand' && x.adopted === true), 20_000, "a new holder adopting the daemon's group");
  assert.equal(proxy.ranges, ranges, 'nothing fetched: the marks held, nothing was let through');
  assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'data.bin')).done, sha256(l.content));
  assert.ok(proxy.ranges > ranges, 'the read waited for its data');
  await d.stop();
});

for (const [concurrency, size] of [
  [1, 2 * MiB],
  [3, 20 * MiB],
] as const) {
  test(`ondemand.prefetch "all", ${concurrency} window(s) at a time: a lazy layer loads everything in the background, with no reader`, { skip }, async () => {
    const l = await lazyImage(`od-prefetch-${concurrency}`, size);
    const d = await startDaemon({ ...daemonOptions(undefined, undefined, { prefetch: 'all', prefetch_concurrency: concurrency }), dir: tempDir('ondemand-prefetch') });
    const id = await lazyPrepare(d, l);
    await waitFor(() => d.logs().some((x) => x.op === 'ondemand' && x.layer === id && /background prefetch loaded all its data/.test(String(x.msg))), 60_000, 'the layer loaded in the background');
    const st = await daemonStats(d.apiAddress);
    assert.equal(st.ondemand.missing_chunks, 0);
    assert.ok(st.ondemand.prefetch_bytes >= size, `prefetch read the layer: ${JSON.stringify(st.ondemand)}`);
    const ranges = proxy.ranges;
    assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'data.bin')).done, sha256(l.content));
    assert.equal(proxy.ranges, ranges, 'the read fetched nothing more');
    await d.stop();
  });
}

test('ondemand.prefetch "list": the files recorded at convert time load in the background, the others wait for a reader', { skip }, async () => {
  const hot = pseudoRandom(1 * MiB, 'od-hot');
  const cold = pseudoRandom(1 * MiB, 'od-cold');
  const l = await lazyImage('od-list', 0, [{ path: 'app/hot.bin', content: hot }, { path: 'cold.bin', content: cold }], ['/app/hot.bin']);
  const d = await startDaemon({ ...daemonOptions(undefined, undefined, { prefetch: 'list' }), dir: tempDir('ondemand-list') });
  const id = await lazyPrepare(d, l);
  await waitFor(() => d.logs().some((x) => x.op === 'ondemand' && x.layer === id && /loaded its 1 listed files/.test(String(x.msg))), 30_000, 'the listed file loaded in the background');
  const st = await daemonStats(d.apiAddress);
  assert.ok(st.ondemand.prefetch_bytes >= hot.length, `the listed file was read: ${JSON.stringify(st.ondemand)}`);
  assert.ok(st.ondemand.missing_chunks >= cold.length / 65536, 'the other file is still missing');
  let ranges = proxy.ranges;
  assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'app', 'hot.bin')).done, sha256(hot));
  assert.equal(proxy.ranges, ranges, 'reading the listed file fetched nothing more');
  ranges = proxy.ranges;
  assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'cold.bin')).done, sha256(cold));
  assert.ok(proxy.ranges > ranges, 'the other file was fetched when read');
  await d.stop();
});

test('a lazy layer with all its data settles into the chunk store once no mount uses it; one whose chunks are all on the node settles at once, sharing them', { skip }, async () => {
  const shared = pseudoRandom(3 * MiB, 'od-settle');
  const a = await lazyImage('od-settle-a', 0, [
    { path: 'data.bin', content: shared },
    { path: 'a.txt', content: Buffer.from('only in a\n') },
  ]);
  const b = await lazyImage('od-settle-b', 0, [{ path: 'copy.bin', content: shared }]);
  const d = await startDaemon(daemonOptions());
  const c = snapshotsClient(d.address);
  const settled = (id: string) => d.logs().find((x) => x.op === 'settle' && x.layer === id && typeof x.new_chunks === 'number');
  try {
    // (This file's daemons share one ROOT: layers of earlier tests may lack data still.)
    const incompleteBefore = (await daemonStats(d.apiAddress)).ondemand.incomplete_layers;
    const idA = await lazyPrepare(d, a);
    // A container on top of it, as containerd makes one: the layer is an overlay's lower.
    const { mounts } = await call(c, 'Prepare', { key: 'settle-ctr', parent: a.labels[LABEL_SNAPSHOT_REF] });
    const rootfs = path.join(dir, 'settle-ctr');
    fs.mkdirSync(rootfs);
    await mountAll(mounts, rootfs);
    try {
      assert.equal(await readInChild(path.join(rootfs, 'data.bin')).done, sha256(shared));
      // In another process: the registry proxy runs in this one.
      assert.equal(await readInChild(path.join(rootfs, 'a.txt')).done, sha256(Buffer.from('only in a\n')));
      assert.equal((await daemonStats(d.apiAddress)).ondemand.incomplete_layers, incompleteBefore, 'layer A has all its data');
      // Past the grace after Prepare handed it out: still lazy, it is in use.
      await new Promise((r) => setTimeout(r, 7000));
      assert.equal(settled(idA), undefined, 'not settled while a mount uses it');
      assert.ok(fs.existsSync(path.join(d.root, 'lazy', `${idA}.blob`)));
    } finally {
      await unmount(rootfs);
    }
    await call(c, 'Remove', { key: 'settle-ctr' });
    await waitFor(() => settled(idA) !== undefined, 30_000, 'layer A to settle once its container is gone');
    const sa = settled(idA) as Record<string, unknown>;
    assert.equal(sa.new_chunks, sa.chunks, 'all of A’s chunks were new to the store');
    for (const f of [`lazy/${idA}.blob`, `lazy/${idA}.erofs`]) assert.ok(!fs.existsSync(path.join(d.root, f)), `${f} is gone`);
    assert.ok(fs.existsSync(path.join(d.root, 'images', `${idA}.erofs`)));
    const mountA = listMounts().find((m) => m.target === path.join(d.root, 'mnt', idA));
    assert.ok(mountA && mountA.fstype === 'erofs' && mountA.source === path.join(d.root, 'images', `${idA}.erofs`), `A is mounted from its store image: ${JSON.stringify(mountA)}`);
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    assert.equal(await readInChild(path.join(d.root, 'mnt', idA, 'data.bin')).done, sha256(shared), 'A reads right from the store');

    // B's only file is A's data: every chunk is on the node; it settles without a reader, sharing A's chunks.
    const ranges = proxy.ranges;
    const storedBefore = (await daemonStats(d.apiAddress)).bytes.stored;
    const idB = await lazyPrepare(d, b);
    await waitFor(() => settled(idB) !== undefined, 30_000, 'layer B to settle');
    assert.equal(proxy.ranges, ranges, 'nothing of B was fetched');
    const sb = settled(idB) as Record<string, unknown>;
    assert.deepEqual([sb.new_chunks, sb.new_bytes], [0, 0], 'B stored nothing new');
    assert.equal(sb.dedup_chunks, sb.chunks);
    const st = await daemonStats(d.apiAddress);
    // (This file's daemons share one ROOT: earlier tests' layers that have all their data settle too.)
    assert.ok(st.ondemand.settled_layers >= 2, `settled_layers ${st.ondemand.settled_layers}`);
    assert.equal(st.bytes.stored, storedBefore, 'the shared data is stored once');

    // After a restart both are store layers, mounted from their images.
    await d.stop();
    const d2 = await startDaemon(daemonOptions(d.root, d.address));
    for (const id of [idA, idB]) {
      const m = listMounts().find((x) => x.target === path.join(d.root, 'mnt', id));
      assert.equal(m?.source, path.join(d.root, 'images', `${id}.erofs`), `layer ${id} mounted from its store image after the restart`);
      assert.ok(!fs.existsSync(path.join(d.root, 'lazy', `${id}.blob`)));
    }
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    assert.equal(await readInChild(path.join(d.root, 'mnt', idB, 'copy.bin')).done, sha256(shared));
    await d2.stop();
  } finally {
    c.close();
    await d.stop().catch(() => undefined);
  }
});

test('at start: a lazy image in the old place (images/) moves to lazy/, an images/<id>.erofs a settle left for a lazy layer goes, lazy files of a settled layer go', { skip }, async () => {
  const l = await lazyImage('od-leftover', 1 * MiB);
  const kept = await lazyImage('od-leftover-kept', 1 * MiB);
  const opts = (root?: string, address?: string) => daemonOptions(root, address, { settle: false });
  const d = await startDaemon(opts());
  const id = await lazyPrepare(d, l);
  const idKept = await lazyPrepare(d, kept);
  await d.stop();
  const at = (...p: string[]) => path.join(d.root, ...p);
  // `id` as an older daemon left it; `idKept` as a settle interrupted before its transaction.
  fs.renameSync(at('lazy', `${id}.erofs`), at('images', `${id}.erofs`));
  fs.copyFileSync(at('lazy', `${idKept}.erofs`), at('images', `${idKept}.erofs`));
  // Lazy files of a layer that is not lazy (a settle interrupted after its transaction).
  fs.writeFileSync(at('lazy', '999999.blob'), 'x');
  fs.writeFileSync(at('lazy', '999999.erofs'), 'x');

  const d2 = await startDaemon(opts(d.root, d.address));
  assert.ok(fs.existsSync(at('lazy', `${id}.erofs`)) && !fs.existsSync(at('images', `${id}.erofs`)), 'the old-place image moved to lazy/');
  assert.ok(fs.existsSync(at('lazy', `${idKept}.erofs`)) && !fs.existsSync(at('images', `${idKept}.erofs`)), 'the interrupted settle’s image is gone, the lazy one kept');
  assert.ok(!fs.existsSync(at('lazy', '999999.blob')) && !fs.existsSync(at('lazy', '999999.erofs')), 'lazy files no lazy layer names are gone');
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  assert.equal(await readInChild(at('mnt', id, 'data.bin')).done, sha256(l.content));
  assert.equal(await readInChild(at('mnt', idKept, 'data.bin')).done, sha256(kept.content));
  // Unmounted by hand: mounted again from lazy/ by the next daemon.
  await d2.stop();
  await unmount(at('mnt', id));
  const d3 = await startDaemon(opts(d.root, d.address));
  assert.equal(listMounts().find((m) => m.target === at('mnt', id))?.source, at('lazy', `${id}.erofs`));
  assert.equal(await readInChild(at('mnt', id, 'data.bin')).done, sha256(l.content));
  await d3.stop();
});

test('file leases off (fs.leases-enable = 0): whether a layer is in use cannot be told; it stays lazy and the daemon says why, once', { skip }, async () => {
  const l = await lazyImage('od-noleases', 1 * MiB);
  const knob = '/proc/sys/fs/leases-enable';
  const was = fs.readFileSync(knob, 'utf8').trim();
  const d = await startDaemon({ ...daemonOptions(), dir: tempDir('ondemand-noleases') });
  fs.writeFileSync(knob, '0');
  try {
    const id = await lazyPrepare(d, l);
    assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'data.bin')).done, sha256(l.content));
    await waitFor(() => d.logs().some((x) => x.op === 'settle' && /file leases/.test(String(x.msg))), 30_000, 'the daemon to say settling is off');
    assert.equal(d.logs().filter((x) => x.op === 'settle').length, 1, 'one line, no settle');
    assert.ok(fs.existsSync(path.join(d.root, 'lazy', `${id}.blob`)), 'the layer is still lazy');
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'data.bin')).done, sha256(l.content), 'and mounted, readable');
  } finally {
    fs.writeFileSync(knob, was);
    await d.stop();
  }
});
