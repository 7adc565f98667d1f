/**
 * Issue 12, item 6: a full disk can always be cleaned. Measured before:
 * after a pull failed with ENOSPC, containerd's Remove of the partial
 * snapshot failed too ("database or disk is full": the row's DELETE needs
 * WAL frames) and its data stayed until space was freed by hand. Here ROOT
 * is on a real 64 MiB ext4 (a loop device), filled to the last block.
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
import { call, cleanupDaemons, snapshotsClient, startDaemon, tempDir } from './helpers/daemon';
import { daemonStats } from './helpers/http';
import { unmountUnder } from './helpers/mounts';

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

      // containerd's unpack goes on until ENOSPC: the disk is full to the last block.
      fillUp(upper);
      assert.ok(freeBytes(mnt) < 64 * 1024, `disk full: ${freeBytes(mnt)} bytes free`);
      const usedBefore = (fs.statfsSync(mnt).blocks - fs.statfsSync(mnt).bfree) * fs.statfsSync(mnt).bsize;

      // containerd removes the partial snapshot: it works, and gives the space back.
      await sn.remove('default/2/extract-sha256:aaa');
      await assert.rejects(sn.stat('default/2/extract-sha256:aaa'), /does not exist/);
      const reserveLines = logged
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l))
        .filter((l) => l.op === 'reserve');
      const warns = reserveLines.filter((l) => l.level === 'warn');
      assert.equal(warns.length, 1, `one warn line for the release: ${JSON.stringify(reserveLines)}`);
      assert.match(warns[0].msg, /disk full: released the 4194304-byte disk reserve .* so remove of "default\/2\/extract-sha256:aaa" can go through/);
      assert.match(warns[0].err, /SQLITE_FULL|disk is full|ENOSPC/i);
      const st = fs.statfsSync(mnt);
      const usedAfter = (st.blocks - st.bfree) * st.bsize;
      assert.ok(usedBefore - usedAfter > 20 * MiB, `freed ${usedBefore - usedAfter} bytes`);
      assert.deepEqual(fs.readdirSync(path.join(root, 'snapshots')), []);

      // With room again (the filler aside, the data freed), the reserve was made again at once.
      assert.equal(sn.reserve.status.state, 'held');
      assert.equal(reserveOnDisk(root, reserve), 'held');
      assert.ok(reserveLines.some((l) => l.level === 'info' && /made again/.test(l.msg)), 'an info line says it is back');

      // Doctor warns while it is released.
      sn.reserve.release('a test');
      assert.equal(sn.reserve.status.state, 'released');
      const doc = checkReserve(root, reserve);
      assert.equal(doc.status, 'warn');
      assert.match(doc.detail, /missing: it was released because the disk filled up/);
      assert.match(doc.fix ?? '', /makes the reserve again by itself once 12\.0 MiB are free/);
      assert.equal(sn.reserve.restore(), true);
      assert.equal(checkReserve(root, reserve).status, 'ok');
      fs.rmSync(filler);
    } finally {
      sn.close();
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
      assert.match(logged, /"level":"info".*"op":"reserve".*made again/);
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
      assert.deepEqual((await daemonStats(d.apiAddress)).disk_reserve, { state: 'held', bytes: 4 * MiB, released_at: null, reason: null });
      const { mounts } = await call(c, 'Prepare', { key: 'default/9/extract-sha256:bbb', parent: '' });
      fillUp(upperOf(mounts));
      assert.ok(freeBytes(mnt) < 64 * 1024, `disk full: ${freeBytes(mnt)} bytes free`);
      await call(c, 'Remove', { key: 'default/9/extract-sha256:bbb' });
      assert.ok(freeBytes(mnt) > 30 * MiB, `space given back: ${freeBytes(mnt)} bytes free`);
      const lines = d.logs().filter((l) => l.op === 'reserve');
      assert.equal(lines.filter((l) => l.level === 'warn').length, 1, JSON.stringify(lines));
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
