/**
 * fs-verity sealing of layer images (issue 12, item 2): on a filesystem
 * that has it, every layer image is sealed when written, so the kernel fails
 * reads of damaged image bytes with EIO; the daemon then quarantines the
 * layer at start. Elsewhere images are checked against their digests
 * (integrity.test).
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
import { SnapshotterError } from '../src/errdefs/errors';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { ImageSealer } from '../src/store/seal';
import { pseudoRandom } from './helpers/images';
import { unmountUnder } from './helpers/mounts';
import { IN_ONDEMAND_VM, ondemandVmTool, runInOndemandVm } from './helpers/vm';

if (!IN_ONDEMAND_VM) {
  const skip = ondemandVmTool() ? false : 'this kernel has no fs-verity and the ondemand VM tool (../shared/tools/ondemand-vm/run.sh, or $ONDEMAND_VM) is not here';
  test('fs-verity: the tests of this file pass in the ondemand VM, whose kernel has it', { skip }, async () => {
    await runInOndemandVm({ file: 'verity.test.js', timeoutS: 600, minPasses: 1 });
  });
} else {
  const base = fs.mkdtempSync('/tmp/verity-');
  const disk = path.join(base, 'disk.img');
  const mnt = path.join(base, 'fs');
  const root = path.join(mnt, 'root');
  const data = pseudoRandom(300 * 1024, 'verity');

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
    const frag = execFileSync('filefrag', ['-v', '-b4096', image], { encoding: 'utf8' });
    const m = /^\s*0:\s+0\.\.\s*\d+:\s+(\d+)\.\./m.exec(frag);
    assert.ok(m, `filefrag shows the image's first extent:\n${frag}`);
    unmountDisk();
    const fd = fs.openSync(disk, 'r+');
    fs.writeSync(fd, Buffer.from('damaged bytes'), 0, 13, Number(m[1]) * 4096 + 1500);
    fs.closeSync(fd);
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
}
