/**
 * On-demand loading through EROFS over fscache (issue 5, item 3), with the
 * real daemon, holder, registry and kernel: a remote layer is mounted with
 * `fsid=`/`domain_id=`/`device=`, its reads become cachefiles READ requests
 * the daemon answers with fetched chunks; kill -9 of the daemon while a
 * reader waits: the restarted daemon gets the request again (`restore`)
 * and the reader the right bytes; registry failing or corrupt: EIO, not a
 * hang; a removed layer's blobs culled from the cache; the guide's flow
 * through containerd; the holder lost: a new one keeps the cache bound.
 *
 * This machine's kernel has no cachefiles on-demand mode; the tests then
 * run inside the VM of ../shared/tools/ondemand-vm (its kernel has it), as
 * one test here that runs this same file there and requires all of it to
 * pass. Without a kernel that has it and without the VM tool: SKIP.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { checkFanotify, checkFscache } from '../src/doctor/checks';
import { LABEL_CRI_LAYER_DIGEST, LABEL_SNAPSHOT_REF } from '../src/remote/lazy';
import { RegistryClient } from '../src/remote/registry';
import { type DaemonProcess, SLOW, call, cleanupDaemons, snapshotsClient, startDaemon, stopHolder, tempDir, waitFor } from './helpers/daemon';
import { convertForTest } from './helpers/dedup';
import { daemonStats } from './helpers/http';
import { busyboxImageDef, pseudoRandom } from './helpers/images';
import { type LazyLayer, lazyImage as makeLazyImage, lazyPrepare as prepareLazily, readInChild, sha256 } from './helpers/ondemand';
import { type RealRegistry, type RegistryProxy, startRegistry, startRegistryProxy } from './helpers/registry';
import { Stack } from './helpers/stack';
import { IN_ONDEMAND_VM, ondemandVmTool, runInOndemandVm } from './helpers/vm';

const IN_VM = IN_ONDEMAND_VM;
const REPO = path.resolve(__dirname, '..', '..');
const MiB = 1 << 20;

function fscacheHere(): boolean {
  return checkFscache({ fanotify: checkFanotify(tempDirRoot()), useFscache: true }).status === 'ok';
}

function tempDirRoot(): string {
  return process.env.TMPDIR ?? '/tmp';
}

if (!IN_VM && !fscacheHere()) {
  const skip = ondemandVmTool() ? false : 'this kernel has no EROFS over fscache on-demand mode and the ondemand VM tool (../shared/tools/ondemand-vm/run.sh, or $ONDEMAND_VM) is not here';
  test('EROFS over fscache: the tests of this file pass in the ondemand VM, whose kernel has it', { skip }, async () => {
    // cachefiles needs its cache on a disk filesystem: TMPDIR on the VM's ext4 disk.
    await runInOndemandVm({
      file: 'fscache.test.js',
      prelude: 'mkdir -p /var/cache/fscache/tmp',
      env: { DEDUP_TEST_SLOW: '15', TMPDIR: '/var/cache/fscache/tmp' },
      timeoutS: 1500,
      minPasses: 6,
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
    dir = tempDir('fscache');
  });

  after(async () => {
    await cleanupDaemons();
    client?.close();
    await proxy?.stop();
    await registry?.stop();
  });

  const lazyImage = (name: string, size: number) => makeLazyImage({ registry, proxy, client, dir }, name, size);
  const lazyPrepare = (d: DaemonProcess, l: LazyLayer) => prepareLazily(d, l, 'fscache');
  const daemon = (root?: string, address?: string) =>
    startDaemon({ dir: tempDir('fscache-daemon'), root, address, config: { registry: { plain_http_hosts: [proxy.host] }, ondemand: { backend: 'fscache' } } });

  /** Stops the daemon and its holder (one cachefiles binding per host: the next test binds its own). */
  async function stopAll(d: DaemonProcess): Promise<void> {
    await d.stop();
    await holderGone(stopHolder(d.root));
  }

  async function holderGone(pid: number | null): Promise<void> {
    if (pid !== null) {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        // gone already
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
  }

  /** Names of the cachefiles cache's data files under ROOT/cache/fscache. */
  const cacheFiles = (root: string): string[] => {
    const out: string[] = [];
    const walk = (dir: string) => {
      for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
        if (e.isDirectory()) walk(path.join(dir, e.name));
        else out.push(e.name);
      }
    };
    walk(path.join(root, 'cache', 'fscache', 'cache'));
    return out;
  };

  const mountLine = (target: string) => fs.readFileSync('/proc/self/mounts', 'utf8').split('\n').find((l) => l.split(' ')[1] === target) ?? '';

  test('a remote layer is mounted through fscache with its metadata only; reads are answered with fetched chunks', async () => {
    const l = await lazyImage('fc-basic', 3 * MiB);
    const d = await daemon();
    try {
      const before = proxy.ranges;
      const id = await lazyPrepare(d, l);
      assert.equal(proxy.ranges, before, 'no chunk fetched by Prepare');
      const target = path.join(d.root, 'mnt', id);
      assert.match(mountLine(target), /^none \S+ erofs \S*fsid=m-\d+-[0-9a-f]{64}/, `an EROFS over fscache mount: ${mountLine(target)}`);
      assert.match(mountLine(target), /domain_id=dedup/);
      let st = await daemonStats(d.apiAddress);
      assert.equal(st.ondemand.backend, 'fscache');
      assert.ok(st.ondemand.missing_chunks > 0, 'chunks are missing before any read');

      assert.equal(await readInChild(path.join(target, 'data.bin')).done, sha256(l.content), 'the reader gets the file');
      st = await daemonStats(d.apiAddress);
      assert.ok(st.ondemand.requests > 0 && st.ondemand.misses > 0, `READ requests were answered: ${JSON.stringify(st.ondemand)}`);
      assert.equal(st.ondemand.missing_chunks, 0, 'the whole file was read: nothing missing');
      assert.equal(st.ondemand.errors, 0);
      assert.ok(d.logs().some((x) => x.op === 'fetch' && x.layer === id), 'fetches are logged per layer');
      assert.ok(fs.readdirSync(path.join(d.root, 'cache', 'fscache')).length > 0, 'the cachefiles cache is under ROOT/cache/fscache');

      // From a fresh page cache the kernel reads its cache files: no request, no fetch.
      const { requests } = st.ondemand;
      const ranges = proxy.ranges;
      fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
      assert.equal(await readInChild(path.join(target, 'data.bin')).done, sha256(l.content));
      assert.equal(proxy.ranges, ranges, 'a second read fetches nothing');
      assert.equal((await daemonStats(d.apiAddress)).ondemand.requests, requests, 'a second read asks the daemon nothing');

      // Removing the layer culls its two blobs from the cache (cachefiles
      // links their files into its tree once the unmount lets them go).
      const keys = [new RegExp(`^m-${id}-[0-9a-f]{64}$`), new RegExp(`^b-${l.labels[LABEL_CRI_LAYER_DIGEST].slice(7)}$`)];
      const c = snapshotsClient(d.address);
      await call(c, 'Remove', { key: l.labels[LABEL_SNAPSHOT_REF] });
      c.close();
      const culled = () => d.logs().filter((x) => x.op === 'ondemand' && /culled blob/.test(String(x.msg))).map((x) => String(x.blob));
      await waitFor(() => keys.every((k) => culled().some((b) => k.test(b))), 60_000 * SLOW, `both blobs culled (culled: ${culled().join(' ')})`);
      assert.deepEqual(cacheFiles(d.root).filter((n) => keys.some((k) => k.test(n.slice(1)))), [], 'their cache files are gone');
    } finally {
      await stopAll(d);
    }
  });

  test('kill -9 of the daemon while a reader waits: the restarted daemon gets the request again (restore); the reader gets the right bytes', async () => {
    const l = await lazyImage('fc-crash', 2 * MiB);
    const d = await daemon();
    let d2: DaemonProcess | null = null;
    const id = await lazyPrepare(d, l);
    proxy.mode = 'hold';
    try {
      const r = readInChild(path.join(d.root, 'mnt', id, 'data.bin'));
      await waitFor(() => proxy.held() > 0, 20_000 * SLOW, 'the read reaching the registry');
      await d.kill();
      await new Promise((res) => setTimeout(res, 1000 * SLOW));
      assert.equal(r.exited(), false, 'the reader waits while no daemon runs');
      proxy.mode = 'pass';
      proxy.release();
      d2 = await daemon(d.root, d.address);
      const got = await r.done;
      assert.equal(got, sha256(l.content), 'the right bytes after the restart');
      assert.ok(d2.logs().some((x) => x.op === 'ondemand' && x.backend === 'fscache' && x.fresh === false), 'the restarted daemon took over the bound cache');
    } finally {
      proxy.mode = 'pass';
      proxy.release();
      await stopAll(d2 ?? d);
    }
  });

  test('registry failing or serving a corrupt chunk: the read gets EIO after bounded retries; it succeeds once the registry is back', async () => {
    const l = await lazyImage('fc-fail', 1 * MiB);
    const d = await daemon();
    try {
      const id = await lazyPrepare(d, l);
      const file = path.join(d.root, 'mnt', id, 'data.bin');
      for (const mode of ['fail', 'corrupt'] as const) {
        proxy.mode = mode;
        const t0 = Date.now();
        assert.equal(await readInChild(file).done, 'ERR:EIO', `${mode}: EIO`);
        assert.ok(Date.now() - t0 < 60_000 * SLOW, `${mode}: the reader did not hang`);
      }
      const st = await daemonStats(d.apiAddress);
      assert.ok(st.ondemand.errors >= 2, 'failed reads are counted');
      assert.ok(d.logs().some((x) => x.op === 'ondemand' && /failed, the reader gets EIO/.test(String(x.msg))), 'the failure is logged');
      proxy.mode = 'pass';
      assert.equal(await readInChild(file).done, sha256(l.content), 'a retry reads the file');
    } finally {
      proxy.mode = 'pass';
      await stopAll(d);
    }
  });

  test("the guide's on-demand flow with containerd: dedup-snapshotter pull, then the image's rootfs (ctr run; in the VM the rootfs ctr run would mount) reads a file loaded through fscache", async () => {
    const stack = await Stack.start({ daemonConfig: { ondemand: { backend: 'fscache' } } });
    const c = new RegistryClient({ plainHttpHosts: [stack.registry] });
    try {
      const data = pseudoRandom(2 * MiB, 'fc-ctr');
      const base = busyboxImageDef();
      const def = { ...base, name: 'dedup-test/fc-ctr', layers: [...base.layers, [{ type: 'file' as const, path: 'data.bin', content: data }]] };
      const [img] = await stack.pushImages([def]);
      const ref = `${stack.registry}/dedup/fc-ctr:v1`;
      await convertForTest(c, `${stack.registry}/${img.def.name}:${img.def.tag}`, ref, stack.dir);
      const bin = path.join(REPO, 'bin', 'dedup-snapshotter');
      await promisify(execFile)(process.execPath, [bin, 'pull', '--plain-http', '--address', stack.containerdAddress, ref], { env: { ...process.env, CONFIG: '' }, timeout: 300_000 * SLOW });
      const remote = stack.daemon.logs().filter((x) => x.op === 'remote');
      assert.equal(remote.length, def.layers.length, 'every layer made from its metadata');
      assert.ok(remote.every((x) => x.ondemand === 'fscache'), 'through fscache');
      const before = (await daemonStats(stack.daemon.apiAddress)).remote.bytes_fetched;
      if (IN_VM) {
        // runc cannot start any container in the VM (its kernel has neither
        // BPF nor cgroup v1's devices controller, which runc's device rules
        // need): the container's rootfs is made as ctr run makes it (Prepare
        // on the image's top layer, then Mounts) and the file read there.
        const top = String(remote[remote.length - 1].key);
        const target = path.join(stack.dir, 'rootfs');
        fs.mkdirSync(target);
        await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'prepare', 'fc-rootfs', top]);
        const mount = (await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'mounts', target, 'fc-rootfs'])).stdout.trim();
        assert.match(mount, /^mount -t overlay overlay /, `an overlay rootfs: ${mount}`);
        await promisify(execFile)('sh', ['-c', mount]);
        try {
          assert.equal(await readInChild(path.join(target, 'data.bin')).done, sha256(data), 'the rootfs shows the file');
        } finally {
          await promisify(execFile)('umount', [target]);
          await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'rm', 'fc-rootfs']);
        }
      } else {
        const out = await stack.ctr(['run', '--snapshotter', 'dedup', '--rm', ref, 'fc-ctr-1', '/bin/busybox', 'sha256sum', '/data.bin'], { timeoutMs: 60_000 * SLOW });
        assert.equal(out.stdout.split(' ')[0], sha256(data), 'the container read the file');
      }
      const st = await daemonStats(stack.daemon.apiAddress);
      assert.ok(st.remote.bytes_fetched - before >= data.length, 'its data was fetched while the container read it');
      assert.ok(st.ondemand.requests > 0, 'through cachefiles READ requests');
    } finally {
      c.close();
      const holder = Number(fs.readFileSync(path.join(stack.daemonRoot, 'ondemand', 'holder.pid'), 'utf8'));
      await stack.stop();
      await holderGone(holder);
    }
  });

  test('the holder killed: a new one keeps the cache bound, and a daemon restart after that still serves the mounted layer', async () => {
    const l = await lazyImage('fc-holder', 1 * MiB);
    const d = await daemon();
    let d2: DaemonProcess | null = null;
    try {
      const id = await lazyPrepare(d, l);
      assert.ok(stopHolder(d.root, 'SIGKILL'), 'the holder ran');
      await waitFor(() => d.logs().some((x) => x.op === 'ondemand' && /new on-demand holder keeps \/dev\/cachefiles bound/.test(String(x.msg))), 20_000 * SLOW, 'a new holder taking the cache');
      await d.kill();
      d2 = await daemon(d.root, d.address);
      assert.ok(d2.logs().some((x) => x.op === 'ondemand' && x.backend === 'fscache' && x.fresh === false), 'the cache stayed bound across the holder and the daemon');
      assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'data.bin')).done, sha256(l.content), 'the mounted layer reads right');
    } finally {
      await stopAll(d2 ?? d);
    }
  });

  test('holder and daemon both killed: the cache is unbound, reads of the old mount fail (never zeros); the next daemon binds anew and mounts the layer again', async () => {
    const l = await lazyImage('fc-both', 1 * MiB);
    const d = await daemon();
    let d2: DaemonProcess | null = null;
    try {
      const id = await lazyPrepare(d, l);
      const file = path.join(d.root, 'mnt', id, 'data.bin');
      await d.kill();
      await holderGone(stopHolder(d.root, 'SIGKILL'));
      const got = await readInChild(file).done;
      assert.match(got, /^ERR:/, 'a read of the mount whose cache is gone fails');
      d2 = await daemon(d.root, d.address);
      assert.ok(d2.logs().some((x) => x.op === 'ondemand' && x.backend === 'fscache' && x.fresh === true), 'the cache was bound anew');
      assert.ok(d2.logs().some((x) => x.op === 'ondemand' && x.layer === id && /fscache binding that is gone/.test(String(x.msg))), 'the layer is named in an error');
      assert.equal(await readInChild(file).done, sha256(l.content), 'mounted again: the right bytes');
    } finally {
      await stopAll(d2 ?? d);
    }
  });
}
