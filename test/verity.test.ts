/**
 * fs-verity sealing (issue 12, item 2): on a filesystem that has it, every
 * layer image is sealed when written, and the chunk store is kept in sealed
 * segments (integrity.store_layout "auto"), so the kernel fails reads of
 * damaged image bytes or chunk data with EIO; the daemon quarantines the
 * layers on them (at start, by fsck or the scrub). Elsewhere images and
 * chunks are checked against their digests (integrity.test, segments.test).
 *
 * This machine's kernel has no fs-verity; the test runs inside the VM of
 * ../shared/tools/ondemand-vm (its kernel has CONFIG_FS_VERITY), as one test
 * here that runs this same file there and requires all of it to pass.
 * Without the VM tool: SKIP.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import Database from 'better-sqlite3';
import { SnapshotterError } from '../src/errdefs/errors';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { ImageSealer } from '../src/store/seal';
import { pseudoRandom } from './helpers/images';
import { unmountUnder } from './helpers/mounts';
import { IN_ONDEMAND_VM, ondemandVmTool, runInOndemandVm } from './helpers/vm';

if (!IN_ONDEMAND_VM) {
  const skip = ondemandVmTool() ? false : 'this kernel has no fs-verity and the ondemand VM tool (../shared/tools/ondemand-vm/run.sh, or $ONDEMAND_VM) is not here';
  test('fs-verity: the tests of this file pass in the ondemand VM, whose kernel has it', { skip }, async () => {
    await runInOndemandVm({ file: 'verity.test.js', timeoutS: 600, minPasses: 2 });
  });
} else {
  const base = fs.mkdtempSync('/tmp/verity-');
  const disk = path.join(base, 'disk.img');
  const mnt = path.join(base, 'fs');
  const root = path.join(mnt, 'root');
  const data = pseudoRandom(300 * 1024, 'verity');

  /** The disk block where `file` starts (filefrag): its bytes can be damaged there, under fs-verity. */
  const firstBlock = (file: string): number => {
    const frag = execFileSync('filefrag', ['-v', '-b4096', file], { encoding: 'utf8' });
    const m = /^\s*0:\s+0\.\.\s*\d+:\s+(\d+)\.\./m.exec(frag);
    assert.ok(m, `filefrag shows the first extent of ${file}:\n${frag}`);
    return Number(m[1]);
  };
  const damage = (block: number, at: number, what: string) => {
    const fd = fs.openSync(disk, 'r+');
    fs.writeSync(fd, Buffer.from(what), 0, what.length, block * 4096 + at);
    fs.closeSync(fd);
  };
  const mountDisk = () => execFileSync('mount', ['-o', 'loop', disk, mnt]);
  const unmountDisk = () => execFileSync('umount', [mnt]);

  before(() => {
    fs.mkdirSync(mnt);
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 64 << 20);
    // fs-verity on ext4 needs the verity feature and 4 KiB blocks.
    execFileSync('mkfs.ext4', ['-q', '-b', '4096', '-O', 'verity', disk]);
    mountDisk();
  });

  after(async () => {
    await unmountUnder(base);
    fs.rmSync(base, { recursive: true, force: true });
  });

  const newSnapshotter = () => new Snapshotter({ root, erofs: { chunkSize: 65536, mkfs: 'mkfs.erofs', convertMode: 'sync' } });

  test('layer images are sealed; damaged image bytes read as EIO and the layer is quarantined at start', async () => {
    let sn = newSnapshotter();
    let id: string;
    let image: string;
    try {
      await sn.recover();
      const mounts = await sn.prepare('active', '');
      fs.writeFileSync(path.join(mounts[0].source, 'file.bin'), data);
      for (let i = 0; i < 40; i++) fs.writeFileSync(path.join(mounts[0].source, `small-${i}`), `small file ${i}\n`);
      await sn.commit('layer', 'active');
      id = sn.ms.getInfo('layer').id;
      image = path.join(root, 'images', `${id}.erofs`);
      assert.equal(sn.sealer?.inUse, true, 'fs-verity is in use on this filesystem');
      assert.ok(ImageSealer.sealed(image), 'the image is sealed');
      assert.throws(() => fs.openSync(image, 'r+'), /EPERM|ETXTBSY|EACCES/, 'a sealed image cannot be opened for writing');
      assert.ok(fs.readFileSync(path.join(sn.layerRoots('layer')[0].root, 'file.bin')).equals(data));
    } finally {
      sn.close();
    }
    // Damage the image's bytes on the disk itself (the file cannot be written): where its first block lies.
    await unmountUnder(path.join(root, 'mnt'));
    const block = firstBlock(image);
    unmountDisk();
    damage(block, 1500, 'damaged bytes');
    mountDisk();
    assert.throws(() => fs.readFileSync(image), /EIO/, 'the kernel fails reads of the damaged image');

    sn = newSnapshotter();
    try {
      await sn.recover();
      assert.match(sn.integrity?.isQuarantined(id) ?? '', /cannot be read: .*EIO/);
      assert.throws(() => sn.layerRoots('layer'), (err: unknown) => err instanceof SnapshotterError && err.kind === 'FailedPrecondition');
    } finally {
      sn.close();
    }
  });

  test('chunk data lives in sealed segments: damaged chunk bytes read as EIO, never other bytes; fsck quarantines the layers on them; the same bytes imported again heal them', async () => {
    const shared = pseudoRandom(512 * 1024, 'verity-shared');
    let sn = newSnapshotter();
    let a: string;
    let b: string;
    try {
      await sn.recover();
      assert.equal(sn.store?.layout, 'segments', 'fs-verity works here, so new chunks go to sealed segments');
      const segsNow = () => fs.readdirSync(path.join(root, 'store', 'segments')).filter((f) => f.endsWith('.blob'));
      const before = new Set(segsNow());
      for (const [name, parent, files] of [
        ['sa', '', { 'shared.bin': shared }],
        ['sb', 'sa', { 'copy.bin': shared, 'own.bin': pseudoRandom(100 * 1024, 'verity-own') }],
      ] as const) {
        const mounts = await sn.prepare(`active-${name}`, parent);
        const upper = mounts[0].type === 'bind' ? mounts[0].source : (mounts[0].options.find((o) => o.startsWith('upperdir=')) as string).slice(9);
        for (const [f, d] of Object.entries(files)) fs.writeFileSync(path.join(upper, f), d);
        await sn.commit(name, `active-${name}`);
      }
      a = sn.ms.getInfo('sa').id;
      b = sn.ms.getInfo('sb').id;
      const segs = segsNow().filter((f) => !before.has(f));
      assert.equal(segs.length, 2, 'one segment per import');
      for (const f of segs) {
        assert.ok(ImageSealer.sealed(path.join(root, 'store', 'segments', f)), `${f} is sealed`);
        assert.throws(() => fs.openSync(path.join(root, 'store', 'segments', f), 'r+'), /EPERM|ETXTBSY|EACCES/);
      }
      const top = sn.layerRoots('sb')[0].root;
      assert.ok(fs.readFileSync(path.join(top, 'copy.bin')).equals(shared), 'read across two sealed segments');
    } finally {
      sn.close();
    }
    // The first segment (shared.bin's chunks) damaged on the disk itself; a reboot-like restart.
    await unmountUnder(path.join(root, 'mnt'));
    const db = new Database(path.join(root, 'metadata.db'), { readonly: true });
    const seg = (db.prepare('SELECT min(segment) AS s FROM chunks c JOIN layer_chunks lc ON lc.chunk_id = c.id WHERE lc.snapshot_id = ?').get(Number(a)) as { s: number }).s;
    db.close();
    const block = firstBlock(path.join(root, 'store', 'segments', `${seg}.blob`));
    unmountDisk();
    damage(block, 100, 'not the image bytes');
    mountDisk();
    sn = newSnapshotter();
    try {
      await sn.recover();
      // The file is whole as far as metadata goes (same fs-verity digest): served, but every read of the damage fails.
      const top = sn.layerRoots('sb')[0].root;
      assert.throws(() => fs.readFileSync(path.join(top, 'copy.bin')), /EIO/, 'a container reads EIO, not other bytes');
      assert.ok(fs.readFileSync(path.join(top, 'own.bin')).equals(pseudoRandom(100 * 1024, 'verity-own')), 'undamaged data still reads');
      const report = await sn.fsck();
      assert.ok(report.badChunks >= 1, JSON.stringify(report));
      assert.match(sn.integrity?.isQuarantined(a) ?? '', /lost or damaged/);
      assert.match(sn.integrity?.isQuarantined(b) ?? '', /lost or damaged/);
      // An import that brings the same bytes writes the segment anew (sealed again): both layers are served again.
      const mounts = await sn.prepare('active-heal', '');
      fs.writeFileSync(path.join(mounts[0].source, 'again.bin'), shared);
      await sn.commit('heal', 'active-heal');
      assert.equal(sn.integrity?.isQuarantined(a), null, 'healed');
      assert.equal(sn.integrity?.isQuarantined(b), null, 'healed');
      assert.ok(ImageSealer.sealed(path.join(root, 'store', 'segments', `${seg}.blob`)), 'the new copy is sealed too');
      assert.ok(fs.readFileSync(path.join(sn.layerRoots('sb')[0].root, 'copy.bin')).equals(shared), 'the right bytes, read through the new copy');
    } finally {
      sn.close();
    }
  });
}
