/**
 * Differential end to end: each test image is pulled through containerd's
 * built-in `overlayfs` snapshotter and through `dedup` (same containerd);
 * a read-only view of the top layer of each is mounted and the two trees
 * must be identical in everything a container can observe: type, mode
 * (incl. setuid/setgid/sticky), owner, size, content hash, link target,
 * device numbers, xattrs (incl. security.capability) and hardlink groups.
 * The image's own expectations are checked on both trees too, so an empty
 * or wrong tree cannot pass by being equally wrong twice.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { waitFor } from './helpers/daemon';
import { BIG_FILE_BYTES, BIG_FILE_IMAGE, type BuiltImage, bigFileImageDef, busyboxImageDef, chainImageDef, tortureImageDef } from './helpers/images';
import { type LayerPath, Stack, assertAllCollected, assertCommittedChain, assertDirsMatchSnapshots, assertNoDaemonErrors, layerPathOptions, layerPaths } from './helpers/stack';
import { type Tree, checkExpect, diffTrees, protectedView, walkMounted } from './helpers/trees';

/** Every layer of `img` went the path asked for (the daemon's "fetch" or "apply" lines name each layer's diff id). */
function assertConvertedBy(stack: Stack, img: BuiltImage, via: LayerPath): void {
  const logs = stack.daemon.logs();
  const byOp = (op: string) => new Set(logs.filter((l) => l.op === op && typeof l.diff_id === 'string' && typeof l.logical_bytes === 'number').map((l) => l.diff_id as string));
  const fetched = byOp('fetch');
  const applied = byOp('apply');
  const wrong = img.diffIds.filter((d) => fetched.has(d) !== (via === 'fetch') || applied.has(d) !== (via === 'differ'));
  assert.deepEqual(wrong, [], `layers that did not go the ${via} path (fetched: ${fetched.size}, applied: ${applied.size})`);
}

/**
 * The directory path on ctr's pulls: containerd unpacks each layer into its directory, which the daemon converts
 * after Commit. The lines come through a pipe: waited for, one per chain id (a layer shared with an earlier image has
 * its line already).
 */
async function assertConvertedFromDirectory(stack: Stack, img: BuiltImage): Promise<void> {
  const lineOf = (chain: string) => stack.daemon.logs().find((l) => l.op === 'convert' && typeof l.logical_bytes === 'number' && String(l.key).endsWith(`/${chain}`));
  await waitFor(() => img.chainIds.every((c) => lineOf(c) !== undefined), 30_000, 'a "converted layer" line for every layer');
}

/**
 * The directory path with chunks.blob (the store layout where fs-verity is missing, as here): the large file's
 * chunks are named where it lies, taken into the store, not copied (its top layer's "converted" line says how much: all but the short last chunk).
 */
function assertAdopted(stack: Stack, img: BuiltImage): void {
  const logs = stack.daemon.logs();
  const layout = logs.find((l) => l.op === 'integrity' && typeof l.store_layout === 'string')?.store_layout;
  if (layout !== 'single') {
    process.stdout.write(`SKIP the large file taken in place: the store layout is ${String(layout)} (only chunks.blob's layout adopts files)\n`);
    return;
  }
  const top = img.chainIds[img.chainIds.length - 1];
  const line = logs.find((l) => l.op === 'convert' && typeof l.logical_bytes === 'number' && String(l.key).endsWith(`/${top}`));
  assert.ok(line && Number(line.adopted_bytes) >= BIG_FILE_BYTES - (1 << 20), `the large file taken into the store in place: ${JSON.stringify(line)}`);
}

for (const via of layerPaths()) describe(`differential (${via}): containerd overlayfs vs dedup present the same trees`, () => {
  let stack: Stack;
  const images: BuiltImage[] = [];
  const views: { snapshotter: string; key: string }[] = [];

  before(async () => {
    stack = await Stack.start(layerPathOptions(via));
    images.push(...(await stack.pushImages([busyboxImageDef(), tortureImageDef(), chainImageDef(), bigFileImageDef()])));
  });

  after(async () => {
    await stack?.stop();
  });

  for (const [i, label] of ['busybox', 'torture', 'chain (40 layers)', 'a large file (taken into the store in place on the directory path)'].entries()) {
    test(`${label}: same tree through overlayfs and dedup`, async () => {
      const img = images[i];
      const ref = img.ref as string;
      const top = img.chainIds[img.chainIds.length - 1];
      const trees: Record<string, Tree> = {};
      for (const sn of ['overlayfs', 'dedup']) {
        await stack.pull(ref, sn);
        await assertCommittedChain(stack, sn, img);
      }
      // Layers convert in the background: compare once every layer is an EROFS image.
      await assertDirsMatchSnapshots(stack, 120_000);
      assertConvertedBy(stack, img, via);
      if (via === 'directory') await assertConvertedFromDirectory(stack, img);
      if (via === 'directory' && img.def.name === BIG_FILE_IMAGE) assertAdopted(stack, img);
      for (const sn of ['overlayfs', 'dedup']) {
        const key = `diff-view-${sn}-${i}`;
        const mounts = await protectedView(stack, sn, key, top);
        if (sn === 'dedup') {
          const layerDirs =
            mounts[0].type === 'bind'
              ? [mounts[0].source]
              : (mounts[0].options.find((o) => o.startsWith('lowerdir=')) as string).slice('lowerdir='.length).split(':');
          const mnt = path.join(stack.daemonRoot, 'mnt') + '/';
          assert.ok(layerDirs.every((d) => d.startsWith(mnt)), `dedup view is not made of EROFS layer mounts: ${layerDirs.join(' ')}`);
          assert.equal(layerDirs.length, img.chainIds.length);
        }
        views.push({ snapshotter: sn, key });
        trees[sn] = await walkMounted(mounts, path.join(stack.dir, `mnt-${sn}-${i}`));
        await stack.ctr(['snapshots', '--snapshotter', sn, 'rm', key]);
      }
      const a = trees.overlayfs;
      const b = trees.dedup;
      assert.ok(a.size > 20 && b.size > 20, `trees have ${a.size} and ${b.size} entries`);
      const expectFailures = [...checkExpect(a, img.def.expect).map((s) => `overlayfs ${s}`), ...checkExpect(b, img.def.expect).map((s) => `dedup ${s}`)];
      assert.deepEqual(expectFailures, [], `expected entries:\n${expectFailures.join('\n')}`);
      const diffs = diffTrees(a, b, 'overlayfs', 'dedup');
      assert.equal(diffs.length, 0, `${diffs.length} differences:\n${diffs.slice(0, 30).join('\n')}`);
      // The busybox binary arrived intact on both.
      const bb = crypto.createHash('sha256').update(fs.readFileSync('/bin/busybox')).digest('hex');
      assert.equal(b.get('bin/busybox')?.sha256, bb);
    });
  }

  test('special entries are really there (torture tree sanity)', () => {
    // Guards the comparison above: the torture image must have produced all kinds of entries.
    const t = images[1];
    const kinds = new Set(t.def.expect.filter((e) => e.kind !== 'absent').map((e) => e.kind));
    for (const k of ['file', 'dir', 'symlink', 'fifo', 'char', 'block'] as const) assert.ok(kinds.has(k), `torture expects a ${k}`);
    assert.ok(t.def.expect.some((e) => e.kind !== 'absent' && e.xattrs?.['security.capability']), 'torture expects a capability');
  });

  test('removing views and images leaves nothing in dedup', async () => {
    await stack.ctr(['images', 'rm', '--sync', ...images.map((i) => i.ref as string)]);
    await assertAllCollected(stack);
    assertNoDaemonErrors(stack);
    const overlay = await stack.snapshots('overlayfs');
    assert.deepEqual(overlay, [], 'overlayfs snapshots were collected as well');
    assert.equal(views.length, images.length * 2, 'every view was made');
  });
});
