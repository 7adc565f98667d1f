/**
 * Issue 12, item 3: the on-demand holder's death is not fail-open. With the
 * real daemon, holder, registry and kernel (fanotify pre-content events):
 *
 * - kill -9 of the holder while readers of three lazy files wait: the
 *   daemon holds a copy of the fanotify group, so the kernel keeps the
 *   reads waiting; the daemon serves the events the dead holder had
 *   relayed (through copies of their fds, answered by fd number on its
 *   copy of the group), starts a new holder with its copy of the group,
 *   and every reader gets the image's bytes (or EIO), never other bytes.
 * - kill -9 of daemon and holder both: no process holds the group, and the
 *   kernel lets every waiting and later read through (holes read as zeros,
 *   which stay in the layer's page cache). The restarted daemon mounts the
 *   layer again over a clean page cache: new views read the right bytes,
 *   and once its data is all there, a container made before the crash
 *   (an overlay over the old superblock) reads the right bytes too.
 * - idle, with marks in place, daemon and holder together use under 0.1%
 *   of a core: both block on their fds, nothing polls.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { mountAll, unmount } from '../src/mount/mount';
import { LABEL_SNAPSHOT_REF } from '../src/remote/lazy';
import { RegistryClient } from '../src/remote/registry';
import { type DaemonProcess, call, cleanupDaemons, snapshotsClient, startDaemon, stopHolder, tempDir, waitFor } from './helpers/daemon';
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
  dir = tempDir('holder-death');
});

after(async () => {
  await cleanupDaemons();
  client?.close();
  await proxy?.stop();
  await registry?.stop();
});

const lazyImage = (name: string, size: number) => makeLazyImage({ registry, proxy, client, dir }, name, size);
const lazyPrepare = (d: DaemonProcess, l: LazyLayer) => prepareLazily(d, l, 'fanotify');

function daemonOptions(root?: string, address?: string) {
  return { dir, root, address, config: { registry: { plain_http_hosts: [proxy.host] }, ondemand: { backend: 'fanotify' } } };
}

function holderPid(root: string): number {
  return Number(fs.readFileSync(path.join(root, 'ondemand', 'holder.pid'), 'utf8'));
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** A container's rootfs over layer `l`, as containerd makes one (an overlay whose lower is the layer's mount). */
async function container(d: DaemonProcess, l: LazyLayer, key: string): Promise<string> {
  const c = snapshotsClient(d.address);
  try {
    const { mounts } = await call(c, 'Prepare', { key, parent: l.labels[LABEL_SNAPSHOT_REF] });
    const rootfs = path.join(dir, key);
    fs.mkdirSync(rootfs, { recursive: true });
    await mountAll(mounts, rootfs);
    return rootfs;
  } finally {
    c.close();
  }
}

test('kill -9 of the holder while readers of three lazy files wait: each gets the right bytes, the daemon says so per read, a new holder runs', { skip }, async () => {
  const layers: LazyLayer[] = [];
  for (const n of ['hd-a', 'hd-b', 'hd-c']) layers.push(await lazyImage(n, 2 * MiB));
  const d = await startDaemon(daemonOptions());
  const ids: string[] = [];
  for (const l of layers) ids.push(await lazyPrepare(d, l));
  const first = holderPid(d.root);
  proxy.mode = 'hold';
  try {
    const readers = ids.map((id) => readInChild(path.join(d.root, 'mnt', id, 'data.bin')));
    await waitFor(() => proxy.held() >= 3, 20_000, 'the three reads reaching the registry');
    assert.ok(stopHolder(d.root, 'SIGKILL'), 'the holder ran');
    await new Promise((r) => setTimeout(r, 2000));
    // The daemon's copy keeps the group: nothing is let through unfilled.
    for (const r of readers) assert.equal(r.exited(), false, 'the reader still waits after the holder died');
    proxy.mode = 'pass';
    proxy.release();
    const got = await Promise.all(readers.map((r) => r.done));
    for (const [i, g] of got.entries()) {
      assert.ok(g === sha256(layers[i].content) || g === 'ERR:EIO', `reader ${i}: the image's bytes or EIO, got ${g}`);
      assert.notEqual(g, sha256(Buffer.alloc(layers[i].content.length)), 'not zeros');
    }
    // One line per read the dead holder had relayed, naming its layer.
    const lines = d.logs().filter((x) => x.op === 'ondemand' && /holder died while a read of layer/.test(String(x.msg)));
    for (const id of ids) assert.ok(lines.some((x) => x.layer === id), `a line names layer ${id}: ${JSON.stringify(lines)}`);
    for (const x of lines) assert.equal(x.level, 'warn');
    await waitFor(() => holderPid(d.root) !== first && alive(holderPid(d.root)), 20_000, 'a new holder');
    assert.ok(d.logs().some((x) => x.op === 'ondemand' && x.adopted === true), "the new holder reads the daemon's copy of the group");

    // Later reads, through a new view on a fresh page cache: right bytes, and the marks held (a new read waits for data).
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    for (const [i, l] of layers.entries()) {
      const rootfs = await container(d, l, `hd-view-${i}`);
      try {
        assert.equal(await readInChild(path.join(rootfs, 'data.bin')).done, sha256(l.content), `layer ${ids[i]} through a new view`);
      } finally {
        await unmount(rootfs);
      }
    }
    assert.equal(alive(first), false);
    await d.stop();
  } finally {
    proxy.mode = 'pass';
    proxy.release();
  }
});

test('daemon and holder both killed mid read: after the restart new views, and a container made before, read the right bytes', { skip }, async () => {
  const l = await lazyImage('hd-both', 2 * MiB);
  const d = await startDaemon(daemonOptions());
  const id = await lazyPrepare(d, l);
  // A container made before the crash: its overlay keeps the layer's first superblock.
  const old = await container(d, l, 'hd-both-old');
  proxy.mode = 'hold';
  try {
    const r = readInChild(path.join(old, 'data.bin'));
    await waitFor(() => proxy.held() > 0, 20_000, 'the read reaching the registry');
    const holder = holderPid(d.root);
    await d.kill();
    process.kill(holder, 'SIGKILL');
    // No process holds the group now: the kernel lets the waiting read and
    // every later one through, holes read as zeros (this is the window the
    // issue describes; it cannot be closed from user space once every
    // holder is gone). Those zeros sit in the layer's page cache.
    await r.done;
    proxy.mode = 'pass';
    proxy.release();

    const d2 = await startDaemon(daemonOptions(d.root, d.address));
    const line = d2.logs().find((x) => x.op === 'ondemand' && x.layer === id && /fanotify group was lost/.test(String(x.msg)));
    assert.ok(line, 'one error line names the layer');
    assert.equal(line.level, 'error');
    const fresh = await container(d2, l, 'hd-both-new');
    try {
      assert.equal(await readInChild(path.join(fresh, 'data.bin')).done, sha256(l.content), 'a new view reads the right bytes');
    } finally {
      await unmount(fresh);
    }
    // Once all its data is there, the old superblock's stale pages are dropped.
    await waitFor(() => d2.logs().some((x) => x.op === 'ondemand' && x.layer === id && /dropped the page cache of its previous mount/.test(String(x.msg))), 60_000, 'the old mount cleaned');
    assert.equal(await readInChild(path.join(old, 'data.bin')).done, sha256(l.content), 'the container made before the crash reads the right bytes');
    await d2.stop();
  } finally {
    proxy.mode = 'pass';
    proxy.release();
    await unmount(old).catch(() => undefined);
  }
});

/** CPU time `pid` used so far, in ms: utime + stime of /proc/PID/stat (clock ticks, 1/100 s) and, finer, the sum of its threads' /proc/PID/task/TID/schedstat (ns). */
function cpuMs(pid: number): { ticks: number; ms: number } {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  let ns = 0;
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread ended
    }
  }
  return { ticks: Number(f[11]) + Number(f[12]), ms: ns / 1e6 };
}

test('idle with marks in place, daemon and holder together use under 0.1% of a core', { skip }, async () => {
  const l = await lazyImage('hd-idle', 1 * MiB);
  // Its own ROOT: no layer of the tests above (complete ones settle into the store at start, which reads them).
  const started = Date.now();
  const d = await startDaemon({ ...daemonOptions(), dir: tempDir('holder-idle') });
  const id = await lazyPrepare(d, l);
  assert.ok(fs.existsSync(path.join(d.root, 'mnt', id, 'data.bin')));
  const pids = [d.proc.pid as number, holderPid(d.root)];
  // Start-up work ends first: for 20-40 s after a Node process starts, V8
  // works in the background now and then (compiling, the memory reducer's
  // GCs: ~100 ms of CPU in a burst); then it is quiet. So: 45 s after the
  // start, and then a 5 s window under 1 ms (up to 90 s more).
  await new Promise((r) => setTimeout(r, Math.max(0, started + 45_000 - Date.now())));
  for (const until = Date.now() + 90_000; Date.now() < until; ) {
    const a = pids.map(cpuMs);
    await new Promise((r) => setTimeout(r, 5000));
    const b = pids.map(cpuMs);
    if (b[0].ms - a[0].ms + b[1].ms - a[1].ms < 1) break;
  }
  const t0 = Date.now();
  const before = pids.map(cpuMs);
  await new Promise((r) => setTimeout(r, 10_000));
  const after = pids.map(cpuMs);
  const seconds = (Date.now() - t0) / 1000;
  const ms = pids.map((_, i) => after[i].ms - before[i].ms);
  const ticks = pids.map((_, i) => after[i].ticks - before[i].ticks);
  const share = (ms[0] + ms[1]) / 1000 / seconds;
  const what = `daemon ${ms[0].toFixed(1)} ms (${ticks[0]} ticks) + holder ${ms[1].toFixed(1)} ms (${ticks[1]} ticks) in ${seconds.toFixed(1)} s: ${(share * 100).toFixed(3)}% of a core`;
  assert.ok(share < 0.001, what);
  // Ticks are coarse (10 ms): one may fall in the window by rounding, not more.
  assert.ok(ticks[0] + ticks[1] <= 1, what);
  await d.stop();
});
