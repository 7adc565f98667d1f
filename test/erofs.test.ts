/**
 * EROFS conversion and the chunk store, against the Snapshotter with real
 * mkfs.erofs and real mounts: dedup across layers, reclaim after remove, a
 * missing mkfs.erofs, the store's consistency check, and the format code.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import pino from 'pino';
import { scanChunks, superblockChecksumOk, updateSuperblockChecksum } from '../src/convert/erofs-format';
import { buildChunkedImage, probeMkfs } from '../src/convert/mkfs';
import { ErofsMounter } from '../src/mount/erofs';
import { mountAll } from '../src/mount/mount';
import { listMounts } from '../src/mount/mountinfo';
import { bdiReadAheadKb, deviceReadAheadKb, erofsBdis } from '../src/mount/readahead';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { Kind } from '../src/store/types';
import { scratchDirs, waitFor } from './helpers/daemon';
import { pseudoRandom } from './helpers/images';
import { unmountUnder } from './helpers/mounts';

const MiB = 1 << 20;
const erofs = { chunkSize: MiB, mkfs: 'mkfs.erofs', convertMode: 'sync' as const };

const random = pseudoRandom;

const workDir = scratchDirs();

/** The modification time of the files layer() writes (an image's, in the past). */
const TAR_TIME = new Date('2024-01-01T00:00:00Z');

/** Prepares `key` on `parent`, writes files into its upper dir, commits it as `name`. */
async function layer(sn: Snapshotter, name: string, parent: string, files: Record<string, Buffer>): Promise<void> {
  const key = `${name}-active`;
  const mounts = await sn.prepare(key, parent);
  const upper =
    mounts[0].type === 'bind' ? mounts[0].source : (mounts[0].options.find((o) => o.startsWith('upperdir=')) as string).slice(9);
  for (const [p, data] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(upper, p)), { recursive: true });
    fs.writeFileSync(path.join(upper, p), data);
    // As an unpacked tar leaves them: the image's times, not now.
    fs.utimesSync(path.join(upper, p), TAR_TIME, TAR_TIME);
  }
  await sn.commit(name, key);
}

/** Mounts a read-only view of `parent` and returns a reader of its files. */
async function view(sn: Snapshotter, dir: string, key: string, parent: string): Promise<string> {
  const target = path.join(dir, `view-${key}`);
  fs.mkdirSync(target, { recursive: true });
  await mountAll(await sn.view(key, parent), target);
  return target;
}

describe('EROFS conversion over the chunk store', () => {
  test('identical data in two layers of two chains is stored once; removing both gives the space back', async () => {
    const dir = workDir('erofs-dedup');
    const sn = new Snapshotter({ root: path.join(dir, 'root'), erofs });
    try {
      const shared = random(8 * MiB, 'shared');
      await layer(sn, 'a1', '', { 'usr/lib/big.so': shared, 'etc/a': Buffer.from('a') });
      // A "rebuilt base": the same big file under another path, one small file changed.
      await layer(sn, 'b1', '', { 'opt/copy/big.so': shared, 'etc/a': Buffer.from('b') });
      await layer(sn, 'b2', 'b1', { 'app/big-again': shared, 'app/own': random(MiB + 5, 'own') });

      const st = (sn.store as NonNullable<typeof sn.store>).stats();
      // Unique data: 8 MiB shared + 1 MiB+5 own + two tiny files, block-rounded.
      const unique = 8 * MiB + (MiB + 4096) + 4096 + 4096 + 4096;
      assert.ok(st.storedBytes <= unique, `stored ${st.storedBytes} > unique ${unique}`);
      assert.ok(st.referencedBytes >= 3 * 8 * MiB, `referenced ${st.referencedBytes}: three layers use the shared file`);
      assert.ok(st.diskBytes <= unique * 1.1, `disk ${st.diskBytes}`);
      const layers = sn.ms.layers();
      assert.equal(layers.length, 3);
      const b1 = layers.find((l) => String(l.snapshot_id) === sn.ms.getInfo('b1').id);
      assert.ok(b1 && b1.new_chunks <= 1 && b1.chunks >= 9, JSON.stringify(b1));

      // The data reads back exactly, through the stacked EROFS mounts.
      const v = await view(sn, dir, 'v', 'b2');
      assert.ok(fs.readFileSync(path.join(v, 'app/big-again')).equals(shared));
      assert.ok(fs.readFileSync(path.join(v, 'opt/copy/big.so')).equals(shared));
      assert.equal(fs.readFileSync(path.join(v, 'etc/a'), 'utf8'), 'b');
      assert.ok(fs.readFileSync(path.join(v, 'app/own')).equals(random(MiB + 5, 'own')));
      await unmountUnder(v);
      await sn.remove('v');

      // Reclaim: a chunk still referenced stays; the last reference frees it.
      await sn.remove('a1');
      const mid = (sn.store as NonNullable<typeof sn.store>).stats();
      assert.ok(mid.storedBytes >= 8 * MiB, 'the shared chunks are still referenced by b1/b2');
      const v2 = await view(sn, dir, 'v2', 'b2');
      assert.ok(fs.readFileSync(path.join(v2, 'app/big-again')).equals(shared), 'data intact after a1 removed');
      await unmountUnder(v2);
      await sn.remove('v2');
      await sn.remove('b2');
      await sn.remove('b1');
      // Freed extents are punched on the thread pool.
      await (sn.store as NonNullable<typeof sn.store>).settled();
      const end = (sn.store as NonNullable<typeof sn.store>).stats();
      assert.equal(end.chunks, 0);
      assert.equal(end.diskBytes, 0, 'every block punched out');
      assert.deepEqual(fs.readdirSync(path.join(dir, 'root', 'images')), []);
      assert.deepEqual(fs.readdirSync(path.join(dir, 'root', 'mnt')), []);
    } finally {
      sn.close();
    }
  });

  test('a large new file is taken into the store in place: the layer reads right, its directory goes, the store file is trusted at the next start and deleted with the last layer', async () => {
    const dir = workDir('erofs-adopt');
    const root = path.join(dir, 'root');
    const opts = { root, erofs: { ...erofs, storeLayout: 'single' as const, adoptMinBytes: 4 * MiB } };
    const big = random(12 * MiB + 4321, 'adopt-big');
    let sn = new Snapshotter(opts);
    try {
      await layer(sn, 'base', '', { 'data/big': big, 'etc/small': Buffer.from('small') });
      const id = sn.ms.getInfo('base').id;
      const segments = path.join(root, 'store', 'segments');
      const adopted = fs.readdirSync(segments).filter((n) => n.endsWith('.blob'));
      assert.equal(adopted.length, 1, 'one segment: the file itself');
      const blob = fs.statSync(path.join(root, 'store', 'chunks.blob')).blocks * 512;
      assert.ok(blob < MiB, `chunks.blob holds only the short chunk and the small file (${blob} bytes)`);
      const st = (sn.store as NonNullable<typeof sn.store>).stats();
      assert.ok(st.diskBytes < big.length + MiB, `the file is on disk once (store ${st.diskBytes} bytes)`);
      const v = await view(sn, dir, 'v', 'base');
      assert.ok(fs.readFileSync(path.join(v, 'data/big')).equals(big), 'the file reads right through the layer mount');
      await unmountUnder(v);
      await sn.remove('v');
      assert.ok(!fs.existsSync(path.join(root, 'snapshots', id)), 'the layer directory went');
      assert.equal(fs.statSync(path.join(segments, adopted[0])).nlink, 1);
      // Another chain with the same file: its chunks are found in the adopted file, not taken again.
      await layer(sn, 'again', '', { 'opt/big-copy': big });
      assert.deepEqual(fs.readdirSync(segments).filter((n) => n.endsWith('.blob')), adopted, 'no second segment');
      await sn.remove('base');
      const v3 = await view(sn, dir, 'v3', 'again');
      assert.ok(fs.readFileSync(path.join(v3, 'opt/big-copy')).equals(big), 'the other layer reads it from the adopted file, its first layer gone');
      await unmountUnder(v3);
      await sn.remove('v3');
    } finally {
      sn.close();
    }
    // Restart: the segment is as recorded (stamped again after the directory went): nothing to verify.
    sn = new Snapshotter(opts);
    try {
      const st = sn.store as NonNullable<typeof sn.store>;
      assert.deepEqual(st.chunksToVerifyAtStart().why, [], 'nothing to verify at start');
      const v = await view(sn, dir, 'v2', 'again');
      assert.ok(fs.readFileSync(path.join(v, 'opt/big-copy')).equals(big), 'and reads right after the restart');
      await unmountUnder(v);
      await sn.remove('v2');
      await sn.remove('again');
      await st.settled();
      assert.deepEqual(fs.readdirSync(path.join(root, 'store', 'segments')).filter((n) => n.endsWith('.blob')), [], 'deleted with its last layer');
    } finally {
      sn.close();
    }
  });

  test('a missing mkfs.erofs fails the commit naming it; the active snapshot stays and a retry succeeds', async () => {
    const dir = workDir('erofs-nomkfs');
    const root = path.join(dir, 'root');
    let sn = new Snapshotter({ root, erofs: { chunkSize: MiB, mkfs: '/nonexistent/mkfs.erofs' } });
    const mounts = await sn.prepare('active', '');
    fs.writeFileSync(path.join(mounts[0].source, 'file'), random(3 * MiB, 'f'));
    await assert.rejects(sn.commit('layer', 'active'), /\/nonexistent\/mkfs\.erofs not found \(install erofs-utils/);
    assert.equal((await sn.stat('active')).kind, Kind.Active);
    assert.ok(fs.readFileSync(path.join(mounts[0].source, 'file')).equals(random(3 * MiB, 'f')));
    assert.deepEqual(fs.readdirSync(path.join(root, 'images')), [], 'no partial image');
    assert.equal((sn.store as NonNullable<typeof sn.store>).stats().chunks, 0);
    sn.close();

    sn = new Snapshotter({ root, erofs });
    try {
      await sn.commit('layer', 'active');
      assert.equal((await sn.stat('layer')).kind, Kind.Committed);
      const v = await view(sn, dir, 'v', 'layer');
      assert.ok(fs.readFileSync(path.join(v, 'file')).equals(random(3 * MiB, 'f')));
      await unmountUnder(v);
    } finally {
      sn.close();
    }
  });

  test('recover: the store check punches what no chunk names and keeps live data', async () => {
    const dir = workDir('erofs-fsck');
    const root = path.join(dir, 'root');
    let sn = new Snapshotter({ root, erofs });
    const data = random(2 * MiB + 100, 'live');
    await layer(sn, 'l', '', { data });
    const live = (sn.store as NonNullable<typeof sn.store>).stats();
    sn.close();
    // What a crash between writing chunk data and recording it leaves behind.
    const blob = path.join(root, 'store', 'chunks.blob');
    const fd = fs.openSync(blob, 'r+');
    fs.writeSync(fd, random(4 * MiB, 'garbage'), 0, 4 * MiB, 64 * MiB);
    fs.closeSync(fd);
    assert.ok(fs.statSync(blob).blocks * 512 >= live.diskBytes + 4 * MiB);

    sn = new Snapshotter({ root, erofs });
    try {
      await sn.cleanup();
      await sn.recover();
      assert.equal(fs.statSync(blob).blocks * 512, live.diskBytes, 'garbage punched, live blocks kept');
      const v = await view(sn, dir, 'v', 'l');
      assert.ok(fs.readFileSync(path.join(v, 'data')).equals(data));
      await unmountUnder(v);
    } finally {
      sn.close();
    }
  });
});

describe('background conversion', () => {
  test('a directory under a running container (overlay lowerdir) outlives the conversion until unmounted', async () => {
    const dir = workDir('erofs-background-overlay');
    const root = path.join(dir, 'root');
    const sn = new Snapshotter({ root, erofs: { ...erofs, convertMode: 'background', retireGraceMs: 200 } });
    try {
      const data = random(3 * MiB + 1, 'bg-overlay');
      await layer(sn, 'base', '', { data });
      const id = sn.ms.getInfo('base').id;
      // Like a container started right after the pull: an active snapshot on the unconverted layer.
      const mounts = await sn.prepare('container', 'base');
      const lower = (mounts[0].options.find((o) => o.startsWith('lowerdir=')) as string).slice('lowerdir='.length);
      assert.equal(lower, path.join(root, 'snapshots', id, 'fs'), 'served from the directory before conversion');
      const rootfs = path.join(dir, 'rootfs');
      fs.mkdirSync(rootfs);
      await mountAll(mounts, rootfs);
      await waitFor(() => sn.pendingConversions === 0, 60_000, 'background conversion');
      assert.ok(sn.ms.getLayer(id), 'converted');
      await new Promise((r) => setTimeout(r, 400));
      assert.equal(await sn.sweepRetired(), 0, 'the lowerdir of a mounted overlay is never removed');
      assert.ok(fs.existsSync(lower));
      assert.ok(fs.readFileSync(path.join(rootfs, 'data')).equals(data), 'the container still reads its layer');
      await unmountUnder(rootfs);
      await waitFor(async () => (await sn.sweepRetired()) >= 0 && !fs.existsSync(lower), 10_000, 'directory removed once unmounted');
      await sn.remove('container');
    } finally {
      sn.close();
    }
  });

  test('a directory never handed out goes as soon as its layer is converted; one handed out waits out the grace time while the snapshot it went to is active, and goes once that is committed', async () => {
    const dir = workDir('erofs-background-retire');
    const root = path.join(dir, 'root');
    // A grace far longer than the test: only "never handed out" or "handed out to a snapshot committed since" can explain a directory going.
    const warnings: string[] = [];
    const logger = pino({ level: 'warn' }, { write: (line: string) => void warnings.push(line) });
    const sn = new Snapshotter({ root, erofs: { ...erofs, convertMode: 'background', retireGraceMs: 600_000 }, logger });
    try {
      await layer(sn, 'top', '', { data: random(2 * MiB + 5, 'retire-top') });
      const top = sn.ms.getInfo('top').id;
      await layer(sn, 'base', '', { data: random(2 * MiB + 7, 'retire-base') });
      const base = sn.ms.getInfo('base').id;
      const baseDir = path.join(root, 'snapshots', base, 'fs');
      // A child's Prepare right after base's Commit hands out base's directory (its conversion has barely begun).
      const childMounts = await sn.prepare('child', 'base');
      const handedDir = childMounts[0].options.some((o) => o.startsWith('lowerdir=') && o.includes(baseDir));
      await waitFor(() => sn.pendingConversions === 0, 60_000, 'background conversions');
      assert.ok(sn.ms.getLayer(top) && sn.ms.getLayer(base), 'both converted');
      await waitFor(() => !fs.existsSync(path.join(root, 'snapshots', top)), 10_000, 'directory of the layer never handed out removed without a sweep call');
      // Its directory gone already, Remove has nothing to delete but the image: no warning for an operator to chase.
      await sn.remove('top');
      assert.deepEqual(warnings, [], 'Remove of a layer whose directory went warns nothing');
      if (!handedDir) {
        // Converted before the child's Prepare: the child was handed base's EROFS mount, never its directory.
        await waitFor(async () => (await sn.sweepRetired()) >= 0 && !fs.existsSync(baseDir), 10_000, 'directory of base (its mount handed out, not the directory) removed');
        return;
      }
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(await sn.sweepRetired(), 0);
      assert.ok(fs.existsSync(baseDir), 'a directory handed out a moment ago to a snapshot still active stays for the grace time');
      // The child committed (as containerd's unpack does after unmounting): nothing may mount base's directory any more.
      fs.writeFileSync(path.join(root, 'snapshots', sn.ms.getInfo('child').id, 'fs', 'more'), 'more');
      await sn.commit('child-layer', 'child');
      await waitFor(async () => (await sn.sweepRetired()) >= 0 && !fs.existsSync(baseDir), 10_000, 'directory of base removed once the snapshot it was handed to is committed');
      await waitFor(() => sn.pendingConversions === 0, 60_000, 'background conversions');
    } finally {
      sn.close();
    }
  });

  test('Commit leaves the usage to the conversion\'s walk: Usage answers the same before it (measured then), after it, and once the directory went', async () => {
    const dir = workDir('erofs-background-usage');
    const sn = new Snapshotter({ root: path.join(dir, 'root'), erofs: { ...erofs, convertMode: 'background', retireGraceMs: 0 } });
    try {
      const mounts = await sn.prepare('u-active', '');
      const upper = mounts[0].source;
      fs.mkdirSync(path.join(upper, 'sub/deeper'), { recursive: true });
      fs.writeFileSync(path.join(upper, 'sub/deeper/data'), random(3 * MiB + 5, 'usage'));
      fs.writeFileSync(path.join(upper, 'small'), 'x');
      // A hardlink is one inode, counted once.
      fs.linkSync(path.join(upper, 'small'), path.join(upper, 'sub/link'));
      fs.symlinkSync('small', path.join(upper, 'sym'));
      const measured = await sn.usage('u-active');
      assert.equal(measured.inodes, 6, JSON.stringify(measured)); // root, sub, deeper, data, small (and its link), sym
      await sn.commit('u-base', 'u-active');
      const id = sn.ms.getInfo('u-base').id;
      assert.equal(sn.ms.getInfo('u-base').usage.inodes, -1, 'Commit walked the tree itself');
      assert.deepEqual(await sn.usage('u-base'), measured, 'asked before the conversion counted it');
      await waitFor(() => sn.pendingConversions === 0, 60_000, 'background conversion');
      assert.ok(sn.ms.getLayer(id), 'converted');
      assert.deepEqual(sn.ms.getInfo('u-base').usage, measured, 'recorded');
      await waitFor(async () => (await sn.sweepRetired()) >= 0 && !fs.existsSync(path.join(dir, 'root', 'snapshots', id)), 10_000, 'old directory removed');
      assert.deepEqual(await sn.usage('u-base'), measured, 'after the directory went');
    } finally {
      sn.close();
    }
  });

  test('Commit returns before conversion; mounts switch to EROFS; a directory in use stays until unmounted', async () => {
    const dir = workDir('erofs-background');
    const sn = new Snapshotter({ root: path.join(dir, 'root'), erofs: { ...erofs, convertMode: 'background', retireGraceMs: 200 } });
    try {
      const data = random(5 * MiB + 3, 'bg');
      await layer(sn, 'base', '', { data });
      const id = sn.ms.getInfo('base').id;
      assert.equal((await sn.stat('base')).kind, Kind.Committed, 'committed before its conversion');
      // A view made now may still use the directory; it must keep working throughout.
      const early = await view(sn, dir, 'early', 'base');
      await waitFor(() => sn.pendingConversions === 0, 60_000, 'background conversion');
      assert.ok(sn.ms.getLayer(id), 'the layer is an EROFS image now');
      const late = await sn.view('late', 'base');
      assert.equal(late[0].source, path.join(dir, 'root', 'mnt', id), 'new mounts use the EROFS mount');
      assert.ok(fs.readFileSync(path.join(early, 'data')).equals(data));
      const usedByEarly = early !== '' && (await sn.mounts('early'))[0].source.includes('/snapshots/');
      if (usedByEarly) {
        // The early view is a bind of the old directory: it must survive the sweep.
        await new Promise((r) => setTimeout(r, 400));
        assert.equal(await sn.sweepRetired(), 0, 'a mounted directory is never removed');
        assert.ok(fs.readFileSync(path.join(early, 'data')).equals(data));
      }
      await unmountUnder(early);
      await sn.remove('early');
      await sn.remove('late');
      await waitFor(async () => (await sn.sweepRetired()) >= 0 && !fs.existsSync(path.join(dir, 'root', 'snapshots', id)), 10_000, 'old directory removed');
      const v = await view(sn, dir, 'again', 'base');
      assert.ok(fs.readFileSync(path.join(v, 'data')).equals(data), 'served from EROFS after the directory went');
      await unmountUnder(v);
    } finally {
      sn.close();
    }
  });
});

describe('EROFS mount backends', () => {
  test('loop backend (for kernels without file-backed mounts): stacked layers read right, loops go with the mounts', async () => {
    const dir = workDir('erofs-loop');
    const root = path.join(dir, 'root');
    const loopsOf = (file: string) =>
      execFileSync('losetup', ['-j', file, '-n', '-O', 'NAME'], { encoding: 'utf8' }).split('\n').filter((l) => l.trim() !== '');
    const sn = new Snapshotter({ root, erofs: { ...erofs, mountMode: 'loop' } });
    try {
      const a = random(3 * MiB + 17, 'loop-a');
      await layer(sn, 'l1', '', { a });
      await layer(sn, 'l2', 'l1', { b: random(MiB, 'loop-b'), 'a-copy': a });
      assert.equal(sn.mounter?.current, 'loop');
      const v = await view(sn, dir, 'v', 'l2');
      assert.ok(fs.readFileSync(path.join(v, 'a')).equals(a));
      assert.ok(fs.readFileSync(path.join(v, 'a-copy')).equals(a));
      assert.ok(fs.readFileSync(path.join(v, 'b')).equals(random(MiB, 'loop-b')));
      const img = path.join(root, 'images', `${sn.ms.getInfo('l2').id}.erofs`);
      assert.equal(loopsOf(img).length, 1, 'the image is on one loop device while mounted');
      await unmountUnder(v);
      await sn.remove('v');
      await sn.remove('l2');
      assert.deepEqual(loopsOf(img), [], 'unmounting released the image loop device');
      await sn.remove('l1');
    } finally {
      sn.close();
      for (const dev of loopsOf(path.join(root, 'store', 'chunks.blob'))) execFileSync('losetup', ['-d', dev]);
    }
  });
});

describe('EROFS file-backed mount options', () => {
  const superOptions = (target: string) => (listMounts().find((m) => m.target === target)?.options ?? '').split(',');
  const bdisAt = (kb: number) => [...erofsBdis()].filter((b) => bdiReadAheadKb(b) === kb).length;
  // This kernel (and CI's, a machine like it) has file-backed EROFS; directio came in Linux 6.13.
  const [major, minor] = os.release().split('.').map(Number);
  const kernelHasDirectio = major > 6 || (major === 6 && minor >= 13);

  test('directio where the kernel has it, and the configured read-ahead on each layer mount', async () => {
    const dir = workDir('erofs-dio');
    // An odd size no other mount on the machine uses, so the test can count the bdis that carry it.
    const kb = 3076;
    const before = bdisAt(kb);
    const sn = new Snapshotter({ root: path.join(dir, 'root'), erofs: { ...erofs, readAheadKb: kb } });
    try {
      const a = random(5 * MiB + 3, 'dio-a');
      await layer(sn, 'l1', '', { a });
      await layer(sn, 'l2', 'l1', { b: random(2 * MiB, 'dio-b') });
      assert.equal(sn.mounter?.current, 'file-backed');
      assert.equal(sn.mounter?.directIoInUse, kernelHasDirectio);
      for (const name of ['l1', 'l2']) {
        const opts = superOptions(path.join(dir, 'root', 'mnt', sn.ms.getInfo(name).id));
        assert.ok(opts.includes('ro'), `${name} is mounted: ${opts}`);
        assert.equal(opts.includes('directio'), kernelHasDirectio, `${name} options: ${opts}`);
      }
      assert.equal(bdisAt(kb) - before, 2, 'each layer mount got its own bdi with the configured read-ahead');
      const v = await view(sn, dir, 'v', 'l2');
      assert.ok(fs.readFileSync(path.join(v, 'a')).equals(a));
      assert.ok(fs.readFileSync(path.join(v, 'b')).equals(random(2 * MiB, 'dio-b')));
      await unmountUnder(v);
    } finally {
      sn.close();
    }
  });

  test('direct_io false mounts without directio; read-ahead "auto" is at least one chunk', async () => {
    const dir = workDir('erofs-nodio');
    const sn = new Snapshotter({ root: path.join(dir, 'root'), erofs: { ...erofs, chunkSize: 4 * MiB, directIo: false } });
    try {
      await layer(sn, 'l1', '', { a: random(MiB, 'nodio') });
      const target = path.join(dir, 'root', 'mnt', sn.ms.getInfo('l1').id);
      assert.ok(superOptions(target).includes('ro'));
      assert.ok(!superOptions(target).includes('directio'), superOptions(target).join(','));
      assert.equal(sn.mounter?.directIoInUse, false);
      const expected = Math.max(deviceReadAheadKb(path.join(dir, 'root', 'store', 'chunks.blob')) ?? 0, 4096);
      assert.equal(sn.mounter?.readAheadInUse, expected, 'the store device\'s read-ahead, at least one 4 MiB chunk');
      assert.ok(bdisAt(expected) >= 1);
    } finally {
      sn.close();
    }
  });

  test('a kernel without directio: the mount is retried without it once, and later mounts skip it', () => {
    const dir = workDir('erofs-fake');
    const calls: string[] = [];
    const einval = (what: string) => Object.assign(new Error(`mount ${what}: EINVAL (Invalid argument)`), { code: 'EINVAL' });
    const fake = (src: string, _t: string, _fs: string, _f: number, data: string | null) => {
      calls.push(`${path.basename(src)} ${data}`);
      if (data?.includes('directio')) throw einval(src);
      if (src.endsWith('bad.erofs')) throw einval(src);
    };
    const m = new ErofsMounter('/store/chunks.blob', { mountFn: fake, readAheadKb: 1024 });
    m.mount('/i/one.erofs', path.join(dir, 't1'), true);
    assert.equal(m.directIoInUse, false);
    assert.equal(m.current, 'file-backed');
    m.mount('/i/two.erofs', path.join(dir, 't2'), false);
    assert.deepEqual(calls, ['one.erofs device=/store/chunks.blob,directio', 'one.erofs device=/store/chunks.blob', 'two.erofs null']);

    // A bad image fails both ways: an error, and no conclusion about the kernel.
    const m2 = new ErofsMounter('/store/chunks.blob', { mountFn: fake });
    assert.throws(() => m2.mount('/i/bad.erofs', path.join(dir, 't3'), true), /cannot mount \/i\/bad.erofs on .*EINVAL/);
    assert.equal(m2.directIoInUse, 'auto');

    // Forced on: EINVAL is an error with a hint, never a silent fallback.
    const m3 = new ErofsMounter('/store/chunks.blob', { mountFn: fake, directIo: true });
    assert.throws(() => m3.mount('/i/one.erofs', path.join(dir, 't4'), true), /direct_io is true.*"direct_io": "auto"/);
  });
});

describe('EROFS format', () => {
  test('chunk indexes are found for every data chunk, and a rewrite keeps the superblock checksum valid', async () => {
    const dir = workDir('erofs-format');
    const src = path.join(dir, 'src');
    fs.mkdirSync(path.join(src, 'd'), { recursive: true });
    fs.writeFileSync(path.join(src, 'a'), random(2 * MiB + 1, 'a'));
    fs.writeFileSync(path.join(src, 'd', 'b'), random(4096, 'b'));
    fs.linkSync(path.join(src, 'a'), path.join(src, 'd', 'hardlink'));
    fs.writeFileSync(path.join(src, 'empty'), '');
    const image = path.join(dir, 'img');
    await buildChunkedImage(await probeMkfs('mkfs.erofs'), { dir: src, image, blob: path.join(dir, 'blob'), chunkSize: MiB });
    const img = fs.readFileSync(image);
    const scan = scanChunks(img);
    // a: 3 chunks (1 MiB, 1 MiB, 1 byte); b: 1; the hardlink shares a's inode; empty has none.
    assert.equal(scan.chunkRefs.length, 4);
    assert.equal(scan.files, 3);
    assert.equal(scan.logicalBytes, 2 * MiB + 1 + 4096);
    assert.deepEqual(
      scan.chunkRefs.map((r) => r.length).sort((x, y) => x - y),
      [1, 4096, MiB, MiB],
    );
    assert.ok(superblockChecksumOk(img));
    img.writeUInt32LE(12345, scan.chunkRefs[0].entryPos + 4);
    assert.equal(superblockChecksumOk(img), false, 'small images keep indexes in block 0, under the checksum');
    updateSuperblockChecksum(img);
    assert.ok(superblockChecksumOk(img));
  });
});
