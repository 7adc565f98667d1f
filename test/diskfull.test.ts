/**
 * Issue 12, item 6: a full disk can always be cleaned. Measured before:
 * after a pull failed with ENOSPC, containerd's Remove of the partial
 * snapshot failed too ("database or disk is full": the row's DELETE needs
 * WAL frames) and its data stayed until space was freed by hand; after the
 * first fix (the whole reserve released at once), a second Remove on a disk
 * still full failed the same way, and the daemon could not even start on a
 * full disk. Here ROOT is on a real ext4 (a loop device, 64 MiB, and 160
 * MiB under real containerd), filled to the last block.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { checkReserve } from '../src/doctor/checks';
import { createLogger } from '../src/log/logger';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { RESERVE_FILE, reserveOnDisk } from '../src/store/reserve';
import { call, cleanupDaemons, snapshotsClient, startDaemon, tempDir, waitFor } from './helpers/daemon';
import { daemonStats } from './helpers/http';
import { busyboxImageDef, pseudoRandom } from './helpers/images';
import { unmountUnder } from './helpers/mounts';
import { Stack, daemonSnapshotNames } from './helpers/stack';

const MiB = 1 << 20;

function which(bin: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${bin}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const skip = process.getuid?.() !== 0 ? 'needs root (mount -o loop)' : !fs.existsSync('/dev/loop-control') ? 'needs loop devices (/dev/loop-control)' : !which('mkfs.ext4') ? 'needs mkfs.ext4' : !which('mkfs.erofs') ? 'needs mkfs.erofs' : false;

function freeBytes(dir: string): number {
  const s = fs.statfsSync(dir);
  return s.bavail * s.bsize;
}

/** Writes files into `dir` until the filesystem refuses even a 1-byte file; returns the bytes written. */
function fillUp(dir: string, chunk = MiB): number {
  let written = 0;
  let n = 0;
  for (const size of [chunk, 64 * 1024, 4096, 1]) {
    const buf = crypto.randomBytes(size);
    for (;;) {
      const f = path.join(dir, `fill-${n++}`);
      try {
        fs.writeFileSync(f, buf);
        written += size;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'ENOSPC') throw err;
        // A partly written file counts for what it took.
        try {
          written += fs.statSync(f).size;
        } catch {
          // not created
        }
        break;
      }
    }
  }
  return written;
}

function logLines(logged: string): Record<string, any>[] {
  return logged
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l));
}

function upperOf(mounts: { type: string; source: string; options: string[] }[]): string {
  const m = mounts[0];
  return m.type === 'bind' ? m.source : (m.options.find((o) => o.startsWith('upperdir=')) as string).slice('upperdir='.length);
}

describe('a full disk can always be cleaned', { skip }, () => {
  let dir = '';
  let mnt = '';

  before(() => {
    dir = tempDir('diskfull');
    mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    const img = path.join(dir, 'disk.img');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 64 * MiB);
    // -m 0: no blocks kept for root (the daemon runs as root: it would use them too).
    execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', img]);
    execFileSync('mount', ['-o', 'loop', img, mnt]);
  });

  after(async () => {
    await cleanupDaemons();
    // Unmounts whatever is under the loop filesystem, and the loop filesystem itself.
    await unmountUnder(mnt);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('without a reserve (disk_reserve_mb 0), Remove on a full disk fails with SQLITE_FULL: the bug this pins', async () => {
    const root = path.join(mnt, 'noreserve');
    const sn = new Snapshotter({ root, reserveBytes: 0, erofs: null });
    try {
      const upper = upperOf(await sn.prepare('default/1/partial', ''));
      fillUp(upper);
      await assert.rejects(sn.remove('default/1/partial'), (err: NodeJS.ErrnoException) => err.code === 'SQLITE_FULL');
      // Space freed by hand: then it goes.
      fs.rmSync(upper, { recursive: true, force: true });
      await sn.remove('default/1/partial');
    } finally {
      sn.close();
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  test('ENOSPC mid pull: a failed conversion leaves nothing under ROOT/tmp, Remove of the partial snapshot succeeds on the full disk, frees its space, and the reserve comes back', async () => {
    const root = path.join(mnt, 'root');
    let logged = '';
    const logger = createLogger('debug', { write: (line: string) => void (logged += line) });
    const reserve = 4 * MiB;
    const sn = new Snapshotter({ root, reserveBytes: reserve, logger, erofs: { chunkSize: MiB, mkfs: 'mkfs.erofs', convertMode: 'sync' } });
    try {
      assert.equal(sn.reserve.status.state, 'held');
      assert.equal(reserveOnDisk(root, reserve), 'held');
      assert.ok(fs.statSync(path.join(root, RESERVE_FILE)).blocks * 512 >= reserve, 'the reserve has real blocks');
      assert.equal(checkReserve(root, reserve).status, 'ok');

      // A layer being unpacked: 20 MiB of data, then a filler that leaves
      // 4 MiB, so the conversion starts and runs out of space midway.
      const upper = upperOf(await sn.prepare('default/2/extract-sha256:aaa', ''));
      fs.mkdirSync(path.join(upper, 'data'));
      for (let i = 0; i < 20; i++) fs.writeFileSync(path.join(upper, 'data', `f${i}`), crypto.randomBytes(MiB));
      const filler = path.join(mnt, 'filler');
      fs.writeFileSync(filler, '');
      const fh = fs.openSync(filler, 'w');
      try {
        const left = freeBytes(mnt) - 4 * MiB;
        const buf = crypto.randomBytes(MiB);
        for (let done = 0; done < left; ) done += fs.writeSync(fh, buf, 0, Math.min(MiB, left - done));
      } finally {
        fs.closeSync(fh);
      }
      await assert.rejects(sn.commit('sha256:aaa', 'default/2/extract-sha256:aaa'), (err: Error & { code?: string }) => /ENOSPC|no space|SQLITE_FULL|disk is full/i.test(`${err.code} ${err.message}`));
      assert.deepEqual(fs.readdirSync(path.join(root, 'tmp')), [], 'the failed conversion left nothing in ROOT/tmp');
      assert.deepEqual(fs.readdirSync(path.join(root, 'images')), [], 'nor in ROOT/images');
      // Its provisional chunks are punched on the thread pool: before the disk is filled up below.
      await sn.store?.settled();

      // containerd's unpack goes on until ENOSPC: the disk is full to the last block.
      fillUp(upper);
      assert.ok(freeBytes(mnt) < 64 * 1024, `disk full: ${freeBytes(mnt)} bytes free`);
      const usedBefore = (fs.statfsSync(mnt).blocks - fs.statfsSync(mnt).bfree) * fs.statfsSync(mnt).bsize;

      // containerd removes the partial snapshot: it works, and gives the space back.
      await sn.remove('default/2/extract-sha256:aaa');
      await assert.rejects(sn.stat('default/2/extract-sha256:aaa'), /does not exist/);
      const reserveLines = logLines(logged).filter((l) => l.op === 'reserve');
      // One slice at most: the WAL's own space (a checkpoint) may have been enough.
      const warns = reserveLines.filter((l) => l.level === 'warn');
      assert.ok(warns.length <= 1, `at most one slice taken: ${JSON.stringify(reserveLines)}`);
      for (const w of warns) {
        assert.match(w.msg, /disk full: released 1048576 bytes of the 4194304-byte disk reserve .* \(3145728 left\) so remove of "default\/2\/extract-sha256:aaa" can go through/);
        assert.match(w.err, /SQLITE_FULL|disk is full|ENOSPC/i);
      }
      if (warns.length === 0) assert.ok(reserveLines.some((l) => /went through in the space the metadata database already had/.test(l.msg)), JSON.stringify(reserveLines));
      const st = fs.statfsSync(mnt);
      const usedAfter = (st.blocks - st.bfree) * st.bsize;
      assert.ok(usedBefore - usedAfter > 20 * MiB, `freed ${usedBefore - usedAfter} bytes`);
      assert.deepEqual(fs.readdirSync(path.join(root, 'snapshots')), []);

      // With room again (the filler aside, the data freed), the reserve was made whole again at once.
      assert.equal(sn.reserve.status.state, 'held');
      assert.equal(reserveOnDisk(root, reserve), 'held');
      if (warns.length > 0) assert.ok(reserveLines.some((l) => l.level === 'info' && /made whole again/.test(l.msg)), 'an info line says it is back');

      // Doctor warns while slices of it are out, and while all of it is.
      sn.reserve.release('a test');
      assert.equal(sn.reserve.status.state, 'partial');
      assert.equal(sn.reserve.status.held_bytes, 3 * MiB);
      let doc = checkReserve(root, reserve);
      assert.equal(doc.status, 'warn');
      assert.match(doc.detail, /is 3\.0 MiB of 4\.0 MiB: Removes on a full disk took slices of it/);
      assert.match(doc.fix ?? '', /makes the reserve whole again by itself, a slice at a time, while 8\.0 MiB stay free/);
      while (sn.reserve.release('a test'));
      assert.equal(sn.reserve.status.state, 'released');
      assert.equal(sn.reserve.status.held_bytes, 0);
      doc = checkReserve(root, reserve);
      assert.match(doc.detail, /missing: Removes on a full disk took it .*the next Remove on a full disk may fail/);
      assert.equal(sn.reserve.restore(), true);
      assert.equal(checkReserve(root, reserve).status, 'ok');
      fs.rmSync(filler);
    } finally {
      sn.close();
    }
  });

  test('several Removes one after another on a disk that stays full (refilled after each, the daemon restarted on it): the start and each Remove go through, taking at most one slice of the reserve; the space comes back and the reserve is made whole again', async (t) => {
    const root = path.join(mnt, 'several');
    const filler = path.join(mnt, 'filler-several');
    fs.mkdirSync(filler);
    let logged = '';
    const logger = createLogger('debug', { write: (line: string) => void (logged += line) });
    const reserve = 6 * MiB;
    const open = () => new Snapshotter({ root, reserveBytes: reserve, logger, erofs: null });
    let sn = open();
    // Partial snapshots as failed pulls leave them: some with data, some empty.
    const sizes = [2, 0, 1, 0, 3, 0, 0, 1];
    const keys = sizes.map((_, i) => `default/${10 + i}/extract-${i}`);
    try {
      for (const [i, key] of keys.entries()) {
        const upper = upperOf(await sn.prepare(key, ''));
        for (let m = 0; m < sizes[i]; m++) fs.writeFileSync(path.join(upper, `f${m}`), crypto.randomBytes(MiB));
      }
      // A restart on the full disk: SQLite deleted its WAL and shared-memory
      // file at close; opening the database makes the latter again (a slice
      // of the reserve), and the first delete has no WAL space to reuse.
      sn.close();
      fillUp(filler);
      sn = open();
      await sn.recover();
      assert.equal(sn.reserve.status.state, 'partial');
      assert.match(logged, /"level":"warn".*"op":"reserve".*so opening metadata\.db can go through/);
      for (const [i, key] of keys.entries()) {
        // Whatever the last Remove freed is taken again (another pull writing).
        fillUp(filler);
        assert.ok(freeBytes(mnt) < 64 * 1024, `disk full before remove ${i}: ${freeBytes(mnt)} bytes free`);
        const before = logLines(logged).filter((l) => l.op === 'reserve' && l.level === 'warn').length;
        await sn.remove(key);
        await assert.rejects(sn.stat(key), /does not exist/);
        const after = logLines(logged).filter((l) => l.op === 'reserve' && l.level === 'warn').length;
        assert.ok(after - before <= 1, `remove ${i} took at most one slice`);
      }
      assert.deepEqual(fs.readdirSync(path.join(root, 'snapshots')), [], 'every directory is gone');
      const warns = logLines(logged).filter((l) => l.op === 'reserve' && l.level === 'warn');
      t.diagnostic(`slices taken: ${warns.map((l) => /so (.*) can go through/.exec(l.msg)?.[1]).join('; ')}`);
      assert.ok(warns.length >= 1, 'the first Remove after the restart needed a slice');
      assert.ok(warns.length < reserve / MiB, `slices left over: ${warns.length} of ${reserve / MiB} taken`);
      assert.notEqual(sn.reserve.status.state, 'released');
      // Space back (the other writer's files go): the reserve is whole again.
      fs.rmSync(filler, { recursive: true });
      assert.equal(sn.reserve.restore(), true);
      assert.equal(sn.reserve.status.held_bytes, reserve);
      assert.equal(reserveOnDisk(root, reserve), 'held');
    } finally {
      sn.close();
      fs.rmSync(filler, { recursive: true, force: true });
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  test('a full disk at start: the reserve is not made (one warn line), made once there is room', () => {
    const root = path.join(mnt, 'late');
    fs.mkdirSync(root);
    const filler = path.join(mnt, 'filler2');
    fs.mkdirSync(filler);
    let logged = '';
    const logger = createLogger('debug', { write: (line: string) => void (logged += line) });
    let sn: Snapshotter | null = null;
    try {
      // Room for the database, not for 3x the reserve.
      const fh = fs.openSync(path.join(filler, 'big'), 'w');
      const left = freeBytes(mnt) - 2 * MiB;
      const buf = Buffer.alloc(MiB, 1);
      for (let done = 0; done < left; ) done += fs.writeSync(fh, buf, 0, Math.min(MiB, left - done));
      fs.closeSync(fh);
      sn = new Snapshotter({ root, reserveBytes: 4 * MiB, logger, erofs: null });
      assert.equal(sn.reserve.status.state, 'released');
      assert.match(sn.reserve.status.reason ?? '', /bytes free on ROOT's filesystem/);
      assert.equal(logged.split('\n').filter((l) => l.includes('"op":"reserve"') && l.includes('"level":"warn"')).length, 1);
      assert.equal(checkReserve(root, 4 * MiB).status, 'warn');
      fs.rmSync(filler, { recursive: true });
      assert.equal(sn.reserve.restore(), true);
      assert.equal(reserveOnDisk(root, 4 * MiB), 'held');
      assert.match(logged, /"level":"info".*"op":"reserve".*made whole again/);
    } finally {
      sn?.close();
      fs.rmSync(filler, { recursive: true, force: true });
    }
  });

  test('the daemon: Remove through gRPC on the full disk succeeds; /stats and the log report the reserve', async () => {
    const root = path.join(mnt, 'daemon-root');
    const d = await startDaemon({ root, config: { disk_reserve_mb: 4 } });
    const c = snapshotsClient(d.address);
    try {
      assert.deepEqual((await daemonStats(d.apiAddress)).disk_reserve, { state: 'held', bytes: 4 * MiB, held_bytes: 4 * MiB, released_at: null, reason: null });
      const { mounts } = await call(c, 'Prepare', { key: 'default/9/extract-sha256:bbb', parent: '' });
      fillUp(upperOf(mounts));
      assert.ok(freeBytes(mnt) < 64 * 1024, `disk full: ${freeBytes(mnt)} bytes free`);
      await call(c, 'Remove', { key: 'default/9/extract-sha256:bbb' });
      assert.ok(freeBytes(mnt) > 30 * MiB, `space given back: ${freeBytes(mnt)} bytes free`);
      const lines = d.logs().filter((l) => l.op === 'reserve');
      assert.ok(lines.filter((l) => l.level === 'warn').length <= 1, JSON.stringify(lines));
      assert.ok(d.logs().some((l) => l.op === 'remove' && l.key === 'default/9/extract-sha256:bbb' && /snapshot removed/.test(String(l.msg))));
      // Room again: the reserve was made again right after the Remove.
      assert.equal((await daemonStats(d.apiAddress)).disk_reserve.state, 'held');
      assert.equal(reserveOnDisk(root, 4 * MiB), 'held');
    } finally {
      c.close();
      await d.stop();
    }
  });
});

const stackSkip = skip || (!which('containerd') ? 'needs containerd' : !which('docker-registry') ? 'needs docker-registry' : !which('runc') ? 'needs runc' : false);

describe('a full disk through containerd: partial snapshots removed one after another', { skip: stackSkip }, () => {
  let dir = '';
  let mnt = '';
  let stack: Stack;
  const data = pseudoRandom(4 * MiB, 'diskfull-data');
  const md5 = (b: Buffer) => crypto.createHash('md5').update(b).digest('hex');
  let runs = 0;

  before(async () => {
    dir = tempDir('diskfull-ctr');
    mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    const img = path.join(dir, 'disk.img');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 160 * MiB);
    execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', img]);
    execFileSync('mount', ['-o', 'loop', img, mnt]);
    stack = await Stack.start({ daemonRoot: path.join(mnt, 'root'), daemonConfig: { disk_reserve_mb: 6 } });
  });

  after(async () => {
    await stack?.stop();
    await unmountUnder(mnt);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** md5 of /data.bin read in a container of `ref`, or null when the container could not run. */
  async function readInContainer(ref: string): Promise<string | null> {
    const r = await stack.ctrTry(['run', '--snapshotter=dedup', '--rm', ref, `diskfull-${process.pid}-${runs++}`, '/bin/busybox', 'md5sum', '/data.bin'], { timeoutMs: 120_000 });
    return r.code === 0 ? r.stdout.split(/\s+/)[0] : null;
  }

  /** Waits until the daemon no longer has a snapshot named (by containerd) `*\/key`. */
  async function goneFromDaemon(key: string): Promise<void> {
    // containerd collects on its own schedule, which a loaded machine stretches to minutes:
    // deleting a lease with --sync runs a collection now (and removes the snapshot through the daemon).
    const lease = (await stack.ctr(['leases', 'create'])).stdout.trim().split(/\s+/)[0];
    await stack.ctr(['leases', 'delete', '--sync', lease]);
    const proc = stack.daemon.proc;
    try {
      // containerd 1.6 spaces its collections by pause_threshold (0.02): after one that took 2 s the next waits 100 s.
      await waitFor(async () => !(await daemonSnapshotNames(stack)).some((n) => n.endsWith(`/${key}`)), 240_000, `containerd's garbage collector to remove ${key} from the daemon`);
    } catch (err) {
      const daemon = stack.daemon.logs().filter((l) => l.op === 'remove' || l.op === 'reserve' || l.level === 'error' || l.level === 'warn' || l.level === 'fatal').slice(-15).map((l) => JSON.stringify(l));
      const other = stack.daemon.output().split('\n').filter((l) => l.trim() !== '' && !l.startsWith('{')).slice(-15);
      const exit = proc.exitCode !== null || proc.signalCode !== null ? `exited (code ${proc.exitCode}, signal ${proc.signalCode})` : 'running';
      const ctrd = stack.containerdLog().split('\n').filter((l) => /gc|garbage|remove|snapshot/i.test(l)).slice(-15);
      throw new Error(`${(err as Error).message}\ndaemon (${exit}):\n${daemon.join('\n')}\n${other.join('\n')}\ncontainerd:\n${ctrd.join('\n')}`);
    }
  }

  const removeFailures = () => stack.daemon.logs().filter((l) => l.op === 'remove' && l.msg === 'remove failed');

  test('a pull that runs out of space, then partial snapshots removed with ctr snapshots rm one after another on a disk kept full (and the daemon restarted on it): every Remove goes through, the space and the reserve come back, the image reads right throughout', async (t) => {
    const base = busyboxImageDef();
    const [img, big] = await stack.pushImages([
      { ...base, name: 'dedup-test/diskfull', layers: [...base.layers, [{ type: 'file' as const, path: 'data.bin', content: data }]] },
      { ...base, name: 'dedup-test/diskfull-big', layers: [...base.layers, [{ type: 'file' as const, path: 'big.bin', content: pseudoRandom(48 * MiB, 'diskfull-big') }]] },
    ]);
    const ref = `${stack.registry}/${img.def.name}:${img.def.tag}`;
    await stack.pull(ref, 'dedup');
    await waitFor(() => fs.readdirSync(path.join(stack.daemonRoot, 'images')).length === img.chainIds.length, 60_000, 'the layers converted');
    assert.equal(await readInContainer(ref), md5(data), 'the image reads right');
    const usedAtStart = fs.statfsSync(mnt).blocks - fs.statfsSync(mnt).bfree;

    // Something else fills the disk but for 24 MiB; a pull of a 48 MiB layer runs out of space.
    const filler = path.join(mnt, 'filler');
    fs.mkdirSync(filler);
    const fh = fs.openSync(path.join(filler, 'big'), 'w');
    const buf = Buffer.alloc(MiB, 7);
    for (let left = freeBytes(mnt) - 24 * MiB; left > 0; left -= MiB) fs.writeSync(fh, buf, 0, Math.min(MiB, left));
    fs.closeSync(fh);
    const pulled = await stack.ctrTry(['images', 'pull', '--plain-http', '--snapshotter=dedup', `${stack.registry}/${big.def.name}:${big.def.tag}`], { timeoutMs: 240_000 });
    assert.notEqual(pulled.code, 0, 'the pull fails');
    // Either the layer's data finds no room (ENOSPC), or, on 2.x where the daemon fetches the image's layers
    // itself from the first Prepare on, the fetch has taken the last blocks before containerd's Prepare of that
    // layer, whose row then finds none (SQLITE_FULL, named as such by the daemon).
    assert.match(pulled.stderr + pulled.stdout, /no space left (on device|for snapshotter data)/i);
    // containerd removes its partial snapshot (its garbage collector calls Remove).
    await waitFor(async () => !(await daemonSnapshotNames(stack)).some((n) => /extract-/.test(n)), 60_000, 'the partial snapshot of the failed pull removed');
    assert.deepEqual(removeFailures(), []);
    // Its directory goes a moment later (retired, then swept): the space the pull wrote comes back.
    await waitFor(() => freeBytes(mnt) >= 16 * MiB, 30_000, `the failed pull's space given back (${freeBytes(mnt)} bytes free)`);

    // Partial snapshots (as failed pulls of other images leave them), then the disk full to the last block.
    const sizes = [6, 0, 3, 0, 2, 1];
    const keys = sizes.map((_, i) => `diskfull-part-${i}`);
    for (const [i, key] of keys.entries()) {
      await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'prepare', key]);
      const m = (await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'mounts', '/mnt', key])).stdout;
      const upper = /(\S+\/snapshots\/\d+\/fs)\b/.exec(m)?.[1];
      assert.ok(upper && upper.startsWith(stack.daemonRoot), `the snapshot's directory: ${m}`);
      for (let n = 0; n < sizes[i]; n++) fs.writeFileSync(path.join(upper, `f${n}`), crypto.randomBytes(MiB));
    }

    // The daemon restarted on the full disk (SQLite made its WAL and shared-memory files anew).
    await stack.daemon.stop();
    fillUp(filler);
    await stack.restartDaemon();
    await waitFor(async () => (await stack.ctrTry(['snapshots', '--snapshotter', 'dedup', 'usage', keys[0]])).code === 0, 30_000, 'containerd to reach the restarted daemon');

    // While the disk is full: the layer reads right where it is mounted, and a container reads right or does not start.
    const layerFiles = fs.readdirSync(path.join(stack.daemonRoot, 'mnt')).map((id) => path.join(stack.daemonRoot, 'mnt', id, 'data.bin')).filter((f) => fs.existsSync(f));
    assert.equal(layerFiles.length, 1, 'the data layer is mounted');
    assert.equal(md5(fs.readFileSync(layerFiles[0])), md5(data), 'its mount reads the image\'s bytes');
    const whileFull = await readInContainer(ref);
    assert.ok(whileFull === null || whileFull === md5(data), `a container on the full disk reads the image's bytes or does not start: ${whileFull}`);

    // One after another, the disk refilled before each.
    for (const key of keys.slice(0, 4)) {
      fillUp(filler);
      assert.ok(freeBytes(mnt) < 64 * 1024, `disk full before removing ${key}: ${freeBytes(mnt)} bytes free`);
      await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'rm', key]);
      await goneFromDaemon(key);
      assert.deepEqual(removeFailures(), [], `no Remove failed (${key})`);
    }
    // The rest with one command.
    fillUp(filler);
    await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'rm', ...keys.slice(4)]);
    for (const key of keys.slice(4)) await goneFromDaemon(key);
    assert.deepEqual(removeFailures(), []);
    assert.doesNotMatch(stack.containerdLog(), /failed to remove snapshot/i, 'containerd logged no failed removal');
    const slices = stack.daemon.logs().filter((l) => l.op === 'reserve' && l.level === 'warn');
    t.diagnostic(`slices taken: ${slices.map((l) => /so (.*) can go through/.exec(String(l.msg))?.[1]).join('; ')}`);
    assert.ok(slices.length < 6, `slices of the reserve left: ${slices.length} of 6 taken`);
    assert.ok(slices.some((l) => /so opening metadata\.db can go through/.test(String(l.msg))), 'the start on the full disk took a slice');

    // The other writer's files go: the space comes back, and the reserve is made whole again.
    fs.rmSync(filler, { recursive: true });
    await waitFor(async () => (await daemonStats(stack.daemon.apiAddress)).disk_reserve.state === 'held', 60_000, 'the reserve made whole again');
    assert.equal(reserveOnDisk(stack.daemonRoot, 6 * MiB), 'held');
    const usedAtEnd = fs.statfsSync(mnt).blocks - fs.statfsSync(mnt).bfree;
    assert.ok((usedAtEnd - usedAtStart) * fs.statfsSync(mnt).bsize < 2 * MiB, `the partial snapshots' space came back: ${(usedAtEnd - usedAtStart) * fs.statfsSync(mnt).bsize} bytes more used than before`);
    assert.equal(await readInContainer(ref), md5(data), 'the image reads right afterwards');
  });
});
