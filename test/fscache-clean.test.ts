/**
 * The guide's clean-up, `rm -rf ROOT/cache/*`, with the fscache backend
 * (issue 12): ROOT/cache/fscache is cachefiles' cache directory, bound
 * through /dev/cachefiles. Run with the daemon running (cache bound, lazy
 * layers mounted, one of them being read), with the daemon stopped (the
 * holder keeps the cache bound), and with daemon and holder stopped (the
 * cache unbound); after each, every read of the lazy layers' files gets the
 * image's bytes or EIO, never other bytes, the daemon keeps serving, and a
 * layer prepared afterwards loads.
 *
 * Needs a kernel with EROFS over fscache: like fscache.test, it runs inside
 * the VM of ../shared/tools/ondemand-vm (one test here runs this file there).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { checkFanotify, checkFscache } from '../src/doctor/checks';
import { LABEL_SNAPSHOT_REF } from '../src/remote/lazy';
import { RegistryClient } from '../src/remote/registry';
import { type DaemonProcess, SLOW, call, cleanupDaemons, snapshotsClient, startDaemon, stopHolder, tempDir, waitFor } from './helpers/daemon';
import { daemonStats, request } from './helpers/http';
import { type LazyLayer, lazyImage as makeLazyImage, lazyPrepare as prepareLazily, readInChild, sha256 } from './helpers/ondemand';
import { type RealRegistry, type RegistryProxy, startRegistry, startRegistryProxy } from './helpers/registry';
import { IN_ONDEMAND_VM, ondemandVmTool, runInOndemandVm } from './helpers/vm';

const MiB = 1 << 20;

const fscacheHere = () => checkFscache({ fanotify: checkFanotify(process.env.TMPDIR ?? '/tmp'), useFscache: true }).status === 'ok';

if (!IN_ONDEMAND_VM && !fscacheHere()) {
  const skip = ondemandVmTool() ? false : 'this kernel has no EROFS over fscache on-demand mode and the ondemand VM tool (../shared/tools/ondemand-vm/run.sh, or $ONDEMAND_VM) is not here';
  test("fscache: the guide's clean-up of ROOT/cache: the tests of this file pass in the ondemand VM", { skip }, async () => {
    await runInOndemandVm({
      file: 'fscache-clean.test.js',
      prelude: 'mkdir -p /var/cache/fscache/tmp',
      env: { DEDUP_TEST_SLOW: '15', TMPDIR: '/var/cache/fscache/tmp' },
      timeoutS: 1500,
      minPasses: 3,
    });
  });
} else {
  let registry: RealRegistry;
  let proxy: RegistryProxy;
  let client: RegistryClient;
  let dir: string;

  before(async () => {
    registry = await startRegistry();
    proxy = await startRegistryProxy(registry.host);
    client = new RegistryClient({ plainHttpHosts: [registry.host] });
    dir = tempDir('fscache-clean');
  });

  after(async () => {
    await cleanupDaemons();
    client?.close();
    await proxy?.stop();
    await registry?.stop();
  });

  const lazyImage = (name: string, size: number) => makeLazyImage({ registry, proxy, client, dir }, name, size);
  /** Starts a daemon on `root`; a start that fails says what its holder logged. */
  async function daemon(root?: string, address?: string): Promise<DaemonProcess> {
    const dir = tempDir('fscache-clean-daemon');
    try {
      return await startDaemon({ dir, root, address, config: { registry: { plain_http_hosts: [proxy.host] }, ondemand: { backend: 'fscache' } } });
    } catch (err) {
      let log = '';
      try {
        log = fs.readFileSync(path.join(root ?? path.join(dir, 'root'), 'ondemand', 'holder.log'), 'utf8').slice(-4000);
      } catch {
        // none
      }
      throw new Error(`${(err as Error).message}\n--- holder.log ---\n${log}`);
    }
  }

  /** Seconds from the daemon starting its holder to the holder answering (emulation makes them slow). */
  const holderStart = (x: DaemonProcess): string => {
    const at = (re: RegExp) => Date.parse(String(x.logs().find((l) => l.op === 'ondemand' && re.test(String(l.msg)))?.time ?? ''));
    return ((at(/connected/) - at(/started the on-demand holder/)) / 1000).toFixed(1);
  };

  async function holderGone(pid: number | null): Promise<void> {
    if (pid === null) return;
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      return;
    }
    await waitFor(
      () => {
        try {
          process.kill(pid, 0);
          return false;
        } catch {
          return true;
        }
      },
      10_000 * SLOW,
      'the holder to exit',
    );
  }

  /** The guide's command, through a shell (the glob); its status and what it said. */
  async function guideCleanup(root: string): Promise<{ code: number; stderr: string }> {
    try {
      const r = await promisify(execFile)('sh', ['-c', `rm -rf ${root}/cache/*`]);
      return { code: 0, stderr: r.stderr };
    } catch (err) {
      const e = err as { code: number; stderr: string };
      return { code: e.code, stderr: e.stderr };
    }
  }

  /** Every file left under `dir`, relative. */
  function tree(dir: string): string[] {
    const out: string[] = [];
    const walk = (d: string, rel: string) => {
      let entries: fs.Dirent[];
      try {
        entries = fs.readdirSync(d, { withFileTypes: true });
      } catch {
        return;
      }
      for (const e of entries) {
        out.push(path.join(rel, e.name) + (e.isDirectory() ? '/' : ''));
        if (e.isDirectory()) walk(path.join(d, e.name), path.join(rel, e.name));
      }
    };
    walk(dir, '');
    return out;
  }

  /** Reads `file` in a fresh process from a dropped page cache: the image's bytes or EIO, never other bytes; returns which. */
  async function readRightOrEio(file: string, content: Buffer, what: string): Promise<string> {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    const got = await readInChild(file).done;
    assert.ok(got === sha256(content) || got === 'ERR:EIO', `${what}: the image's bytes or EIO, got ${got}`);
    return got;
  }

  async function healthy(d: DaemonProcess): Promise<void> {
    assert.equal(d.proc.exitCode, null, 'the daemon runs');
    const h = await request(d.apiAddress, 'GET', '/healthz');
    assert.equal(h.status, 200, `/healthz: ${h.body}`);
  }

  /** The cachefiles cache's data files (D<blob>) under ROOT/cache. */
  const dataFiles = (root: string) => tree(path.join(root, 'cache')).filter((f) => /\/D[^/]*$/.test(f));

  /** Log lines at level error since line `from`, but the Unavailable answers while a layer is mounted again (retried). */
  const errorsSince = (x: DaemonProcess, from: number) => x.logs().slice(from).filter((l) => l.level === 'error' && l.code !== 'Unavailable');

  /** Asserts the guide's command removed every data file, and that only directories cachefiles holds while bound were refused (EBUSY). */
  function assertCleaned(root: string, rm: { code: number; stderr: string }): void {
    for (const line of rm.stderr.split('\n').filter((x) => x.trim() !== '')) assert.match(line, /cannot remove '.*\/cache\/fscache\/[^']*': Device or resource busy$/, `rm said: ${rm.stderr}`);
    assert.deepEqual(dataFiles(root), [], 'no cache file left');
  }

  /** Prepare of a container's snapshot on layer `l`, as ctr run does; its Mounts asked again while the daemon mounts the layer again (Unavailable). */
  async function prepareOn(x: DaemonProcess, l: LazyLayer, key: string): Promise<void> {
    const c = snapshotsClient(x.address);
    try {
      let first = true;
      await waitFor(
        async () => {
          const req = first ? call(c, 'Prepare', { key, parent: l.labels[LABEL_SNAPSHOT_REF] }) : call(c, 'Mounts', { key });
          first = false;
          const err = await req.then(() => null, (e: { code?: number }) => e);
          if (err && err.code !== 14) throw err;
          return err === null;
        },
        60_000 * SLOW,
        `Prepare on ${l.labels[LABEL_SNAPSHOT_REF]}`,
      );
    } finally {
      c.close();
    }
  }

  const layers: { l: LazyLayer; id: string }[] = [];
  let d: DaemonProcess;
  const file = (i: number) => path.join(d.root, 'mnt', layers[i].id, 'data.bin');

  test("rm -rf ROOT/cache/* with the daemon running, lazy layers mounted (one read, one being held open, one unread, one whose cache files were written out): every read gets the image's bytes; the daemon keeps serving; a layer prepared afterwards loads", async (t) => {
    d = await daemon();
    for (const [name, size] of [['fcc-read', 3 * MiB], ['fcc-unread', 2 * MiB], ['fcc-out', 1 * MiB]] as const) {
      const l = await lazyImage(name, size);
      layers.push({ l, id: await prepareLazily(d, l, 'fscache') });
    }
    t.diagnostic(`holder started in ${holderStart(d)} s`);
    for (const i of [0, 2]) assert.equal(await readInChild(file(i)).done, sha256(layers[i].l.content));
    // While a layer is mounted its cache files are cachefiles' unnamed temp
    // files; unmounted, they are written into the tree (D<blob>): so that the
    // clean-up meets real files, layer 2's mount goes (by hand).
    await promisify(execFile)('umount', [path.join(d.root, 'mnt', layers[2].id)]);
    await waitFor(() => dataFiles(d.root).length >= 2, 30_000 * SLOW, "layer 2's cache files in the tree");
    const from = d.logs().length;
    const { requests } = (await daemonStats(d.apiAddress)).ondemand;
    // A reader that holds its file open across the clean-up, as a container would.
    const open = fs.openSync(file(0), 'r');
    try {
      const rm = await guideCleanup(d.root);
      assertCleaned(d.root, rm);
      const buf = Buffer.alloc(MiB);
      const n = fs.readSync(open, buf, 0, buf.length, 0);
      assert.ok(n > 0 && buf.subarray(0, n).equals(layers[0].l.content.subarray(0, n)), "the open file reads the image's bytes");
    } finally {
      fs.closeSync(open);
    }
    for (const i of [0, 1]) assert.equal(await readRightOrEio(file(i), layers[i].l.content, `layer ${i} after the clean-up`), sha256(layers[i].l.content));
    // Layer 2 is mounted again for a container, its cache files made anew from the daemon's answers.
    await prepareOn(d, layers[2].l, 'fcc-container');
    assert.equal(await readRightOrEio(file(2), layers[2].l.content, 'layer 2 mounted again'), sha256(layers[2].l.content));
    assert.ok((await daemonStats(d.apiAddress)).ondemand.requests > requests, 'the kernel asked the daemon again for what the clean-up deleted');
    // A layer prepared after the clean-up.
    const l = await lazyImage('fcc-after', 1 * MiB);
    layers.push({ l, id: await prepareLazily(d, l, 'fscache') });
    assert.equal(await readRightOrEio(file(3), l.content, 'a layer prepared after the clean-up'), sha256(l.content));
    await healthy(d);
    assert.deepEqual(errorsSince(d, from), [], 'no error logged');
  });

  test("rm -rf ROOT/cache/* with the daemon stopped (the holder keeps the cache bound), then a restart: the image's bytes", async () => {
    const root = d.root;
    await d.stop();
    assertCleaned(root, await guideCleanup(root));
    d = await daemon(root, d.address);
    assert.ok(d.logs().some((x) => x.op === 'ondemand' && x.backend === 'fscache' && x.fresh === false), 'the cache stayed bound');
    for (const [i, x] of layers.entries()) assert.equal(await readRightOrEio(file(i), x.l.content, `layer ${i} after the restart`), sha256(x.l.content));
    await healthy(d);
    assert.deepEqual(errorsSince(d, 0), [], 'no error logged');
  });

  test('rm -rf ROOT/cache/* with daemon and holder stopped (the cache unbound, all of it deleted), then a restart: the cache is bound anew, the layers are mounted again and read right', async (t) => {
    const root = d.root;
    await d.stop();
    await holderGone(stopHolder(root));
    const rm = await guideCleanup(root);
    assert.equal(rm.code, 0, `nothing held: all of it goes (${rm.stderr})`);
    assert.deepEqual(tree(path.join(root, 'cache')), []);
    d = await daemon(root, d.address);
    t.diagnostic(`holder started in ${holderStart(d)} s`);
    assert.ok(d.logs().some((x) => x.op === 'ondemand' && x.backend === 'fscache' && x.fresh === true), 'the cache was bound anew');
    for (const [i, x] of layers.entries()) assert.equal(await readRightOrEio(file(i), x.l.content, `layer ${i} after the restart`), sha256(x.l.content));
    await healthy(d);
    await d.stop();
    await holderGone(stopHolder(root));
  });
}
