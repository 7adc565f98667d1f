/**
 * containerd's snapshotter conformance suite (snapshots/testsuite: testsuite.go,
 * helpers.go, issues.go, as of containerd 1.6.20), ported case by case to
 * node:test. Runs against Snapshotter with the real kernel (root; real bind,
 * overlay and EROFS mounts: conformance.test.ts) or with the fake kernel of
 * fake-kernel.ts (no mounts, no root needed: conformance-fake.unit.test.ts).
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isInvalidArgument } from '../../src/errdefs/errors';
import { mountAll as realMountAll } from '../../src/mount/mount';
import { Snapshotter } from '../../src/snapshot/snapshotter';
import { type Info, Kind, type Labels, type Mount } from '../../src/store/types';
import {
  type Applier,
  apply,
  checkDirectoryEqual,
  checkDirectoryEqualWithApplier,
  chown,
  createDir,
  createFile,
  link,
  removeAll,
  rename,
} from './fstest';
import { FakeKernel, type TestMounter } from './fake-kernel';
import { unmountAll as realUnmountAll, unmountUnder as realUnmountUnder } from './mounts';

type TestFn = (sn: Snapshotter, work: string) => Promise<void>;
type Mode = 'directories' | 'erofs';
export type KernelKind = 'real' | 'fake';

const realMounter: TestMounter = { mountAll: realMountAll, unmountAll: (t) => realUnmountAll(t, { lazy: true }), unmountUnder: realUnmountUnder };
/** Where the cases' own mounts go: mount(8), or the fake kernel of the case's snapshotter. */
let mounter: TestMounter = realMounter;

function mountAll(m: Mount[], target: string): Promise<void> {
  return mounter.mountAll(m, target);
}

async function unmountAll(target: string, _opts?: { lazy?: boolean }): Promise<void> {
  await mounter.unmountAll(target);
}

/**
 * Upstream's makeTest: a temp dir holding the snapshotter root and a work
 * area, a new snapshotter, closed afterwards. Any mount a case left behind
 * (it failed before its own unmount) is detached here, before the temp dir
 * is deleted, so that nothing mounted survives and no layer is deleted
 * through a live mount. With the fake kernel, the snapshotter's mounts and
 * the case's own are the fake's (the chunk store is one file: fsck.erofs
 * 1.5 extracts an image with one extra device).
 */
function makeTest(fn: TestFn, mode: Mode, kernel: KernelKind): () => Promise<void> {
  return async () => {
    const tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'dedup-snapshot-suite-'));
    let sn: Snapshotter | undefined;
    let fake: FakeKernel | undefined;
    try {
      const root = path.join(tmpDir, 'root');
      fs.mkdirSync(root, { recursive: true, mode: 0o777 });
      // With EROFS, each commit converts the layer and mounts its image.
      sn = new Snapshotter({
        root,
        erofs: mode === 'erofs' ? { chunkSize: 1 << 20, mkfs: 'mkfs.erofs', convertMode: 'sync', ...(kernel === 'fake' ? { storeLayout: 'single' as const } : {}) } : null,
        ...(kernel === 'fake' ? { kernel: (storeFile: string, devicesOf?: (image: string) => string[]) => (fake = new FakeKernel(storeFile, devicesOf)) } : {}),
      });
      mounter = fake ?? realMounter;
      const work = path.join(tmpDir, 'work');
      fs.mkdirSync(work, { recursive: true, mode: 0o777 });
      await fn(fake ? syncingUppers(sn, fake) : sn, work);
    } finally {
      await mounter.unmountUnder(tmpDir);
      sn?.close();
      mounter = realMounter;
      fs.rmSync(tmpDir, { recursive: true, force: true });
    }
  };
}

/** The snapshotter, with the fake kernel's overlay writes flushed before each call that reads an upper directory. */
function syncingUppers(sn: Snapshotter, fake: FakeKernel): Snapshotter {
  return new Proxy(sn, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver);
      if ((prop !== 'commit' && prop !== 'usage') || typeof v !== 'function') return typeof v === 'function' ? v.bind(target) : v;
      return (...args: unknown[]) => {
        fake.syncUppers();
        return (v as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
}

/** Go's time.RFC3339 (seconds, "Z"). */
function rfc3339(d: Date): string {
  return d.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

const opt: Labels = { 'containerd.io/gc.root': rfc3339(new Date()) };

/** testutil.Unmount: detach, as upstream's umount flags do on Linux. */
async function unmountTest(target: string): Promise<void> {
  await mounter.unmountAll(target);
}

async function expectReject(p: Promise<unknown>, msg: string): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  assert.fail(msg);
}

function mkdirAll(p: string): void {
  fs.mkdirSync(p, { recursive: true, mode: 0o777 });
}

// ---- helpers.go ----

async function applyToMounts(m: Mount[], work: string, a: Applier): Promise<void> {
  const td = fs.mkdtempSync(path.join(work, 'prepare'));
  try {
    await mountAll(m, td);
    try {
      await a.apply(td);
    } finally {
      await unmountAll(td, { lazy: true });
    }
  } finally {
    fs.rmSync(td, { recursive: true, force: true });
  }
}

/** Creates a committed snapshot: a's changes on top of parent. Returns its name. */
async function createSnapshot(sn: Snapshotter, parent: string, work: string, a: Applier): Promise<string> {
  const n = `applier-${crypto.randomBytes(8).toString('hex')}`;
  const prepare = `${n}-prepare`;
  const step = async <T>(what: string, f: () => Promise<T>): Promise<T> => {
    try {
      return await f();
    } catch (err) {
      throw new Error(`${what}: ${(err as Error).message}`, { cause: err });
    }
  };
  const m = await step('failed to prepare snapshot', () => sn.prepare(prepare, parent, opt));
  await step('failed to apply', () => applyToMounts(m, work, a));
  await step('failed to commit', () => sn.commit(n, prepare, opt));
  return n;
}

/** Mounts a view of snapshot `name` and compares it with the tree at check. */
async function checkSnapshot(sn: Snapshotter, work: string, name: string, check: string): Promise<void> {
  const td = fs.mkdtempSync(path.join(work, 'check'));
  try {
    const view = `${name}-view`;
    const m = await sn.view(view, name, opt);
    try {
      await mountAll(m, td);
      try {
        checkDirectoryEqual(check, td);
      } finally {
        await unmountAll(td, { lazy: true });
      }
    } finally {
      await sn.remove(view);
    }
  } finally {
    fs.rmSync(td, { recursive: true, force: true });
  }
}

/**
 * Builds a chain of snapshots, one per applier, and checks a view of each
 * against the same appliers run on one plain directory.
 */
async function checkSnapshots(sn: Snapshotter, work: string, ...as: Applier[]): Promise<void> {
  const td = fs.mkdtempSync(path.join(work, 'flat'));
  try {
    let parentID = '';
    for (const [i, a] of as.entries()) {
      let s: string;
      try {
        s = await createSnapshot(sn, parentID, work, a);
      } catch (err) {
        throw new Error(`failed to create snapshot ${i + 1}: ${(err as Error).message}`, { cause: err });
      }
      await a.apply(td);
      try {
        await checkSnapshot(sn, work, s, td);
      } catch (err) {
        throw new Error(`snapshot check failed on snapshot ${i + 1}: ${(err as Error).message}`, { cause: err });
      }
      parentID = s;
    }
  } finally {
    fs.rmSync(td, { recursive: true, force: true });
  }
}

/** Throws unless two infos agree in every field. */
function checkInfo(si1: Info, si2: Info): void {
  assert.equal(si2.kind, si1.kind, `Expected kind ${si1.kind}, got ${si2.kind}`);
  assert.equal(si2.name, si1.name, `Expected name ${si1.name}, got ${si2.name}`);
  assert.equal(si2.parent, si1.parent, `Expected Parent ${si1.parent}, got ${si2.parent}`);
  assert.deepEqual(si2.labels, si1.labels);
  assert.equal(si2.created, si1.created, `Expected Created ${si1.created}, got ${si2.created}`);
  assert.equal(si2.updated, si1.updated, `Expected Updated ${si1.updated}, got ${si2.updated}`);
}

// ---- testsuite.go ----

async function checkSnapshotterBasic(sn: Snapshotter, work: string): Promise<void> {
  const initialApplier = apply(
    createFile('/foo', 'foo\n', 0o777),
    createDir('/a', 0o755),
    createDir('/a/b', 0o755),
    createDir('/a/b/c', 0o755),
  );
  const diffApplier = apply(
    createFile('/bar', 'bar\n', 0o777),
    // also, change content of foo to bar
    createFile('/foo', 'bar\n', 0o777),
    removeAll('/a/b'),
  );

  const preparing = path.join(work, 'preparing');
  mkdirAll(preparing);
  let mounts = await sn.prepare(preparing, '', opt);
  assert.ok(mounts.length >= 1, 'expected mounts to have entries');
  await mountAll(mounts, preparing);
  await initialApplier.apply(preparing);
  // unmount before commit
  await unmountTest(preparing);

  const committed = path.join(work, 'committed');
  await sn.commit(committed, preparing, opt);

  const si = await sn.stat(committed);
  assert.equal(si.parent, '');
  assert.equal(si.kind, Kind.Committed);

  await expectReject(sn.stat(preparing), `${preparing} should no longer be available after Commit`);

  const next = path.join(work, 'nextlayer');
  mkdirAll(next);
  mounts = await sn.prepare(next, committed, opt);
  await mountAll(mounts, next);
  await checkDirectoryEqualWithApplier(next, initialApplier);
  await diffApplier.apply(next);
  // unmount before commit
  await unmountTest(next);

  const ni = await sn.stat(next);
  assert.equal(ni.parent, committed);
  assert.equal(ni.kind, Kind.Active);

  const nextCommitted = path.join(work, 'committed-next');
  await sn.commit(nextCommitted, next, opt);

  const si2 = await sn.stat(nextCommitted);
  assert.equal(si2.parent, committed);
  assert.equal(si2.kind, Kind.Committed);

  await expectReject(sn.stat(next), `${next} should no longer be available after Commit`);

  const expected = new Map<string, Info>([
    [si.name, si],
    [si2.name, si2],
  ]);
  const walked = new Map<string, Info>(); // walk is not ordered
  await sn.walk((info) => {
    walked.set(info.name, info);
  });
  for (const [ek, ev] of expected) {
    const av = walked.get(ek);
    assert.ok(av, `Missing stat for ${ek}`);
    assert.deepEqual(av, ev);
  }

  const nextnext = path.join(work, 'nextnextlayer');
  mkdirAll(nextnext);
  mounts = await sn.view(nextnext, nextCommitted, opt);
  await mountAll(mounts, nextnext);
  try {
    await checkDirectoryEqualWithApplier(nextnext, apply(initialApplier, diffApplier));
  } finally {
    await unmountTest(nextnext);
  }

  await sn.remove(nextnext);
  const err = await expectReject(sn.remove(committed), 'removing a snapshot with a child should fail');
  assert.match((err as Error).message, /remove/);
  await sn.remove(nextCommitted);
  await sn.remove(committed);
}

/** Prepare a layer with no parent; Stat on it reports an active snapshot. */
async function checkSnapshotterStatActive(sn: Snapshotter, work: string): Promise<void> {
  const preparing = path.join(work, 'preparing');
  mkdirAll(preparing);
  const mounts = await sn.prepare(preparing, '', opt);
  assert.ok(mounts.length >= 1, 'expected mounts to have entries');
  await mountAll(mounts, preparing);
  try {
    fs.writeFileSync(path.join(preparing, 'foo'), 'foo\n', { mode: 0o777 });
    const si = await sn.stat(preparing);
    assert.equal(si.name, preparing);
    assert.equal(si.kind, Kind.Active);
    assert.equal(si.parent, '');
  } finally {
    await unmountTest(preparing);
  }
}

/** Prepare and commit a layer with no parent; Stat on it reports a committed snapshot. */
async function checkSnapshotterStatCommitted(sn: Snapshotter, work: string): Promise<void> {
  const preparing = path.join(work, 'preparing');
  mkdirAll(preparing);
  const mounts = await sn.prepare(preparing, '', opt);
  assert.ok(mounts.length >= 1, 'expected mounts to have entries');
  await mountAll(mounts, preparing);
  try {
    fs.writeFileSync(path.join(preparing, 'foo'), 'foo\n', { mode: 0o777 });
    const committed = path.join(work, 'committed');
    await sn.commit(committed, preparing, opt);
    const si = await sn.stat(committed);
    assert.equal(si.name, committed);
    assert.equal(si.kind, Kind.Committed);
    assert.equal(si.parent, '');
  } finally {
    await unmountTest(preparing);
  }
}

async function snapshotterPrepareMount(
  sn: Snapshotter,
  diffPathName: string,
  parent: string,
  work: string,
): Promise<string> {
  const preparing = path.join(work, diffPathName);
  mkdirAll(preparing);
  const mounts = await sn.prepare(preparing, parent, opt);
  if (mounts.length < 1) throw new Error('expected mounts to have entries');
  await mountAll(mounts, preparing);
  return preparing;
}

/** Given A <- B <- C, B is the parent of C and A is a transitive parent of C (a "grandparent"). */
async function checkSnapshotterTransitivity(sn: Snapshotter, work: string): Promise<void> {
  const preparing = await snapshotterPrepareMount(sn, 'preparing', '', work);
  try {
    fs.writeFileSync(path.join(preparing, 'foo'), 'foo\n', { mode: 0o777 });
    const snapA = path.join(work, 'snapA');
    await sn.commit(snapA, preparing, opt);

    const next = await snapshotterPrepareMount(sn, 'next', snapA, work);
    try {
      fs.writeFileSync(path.join(next, 'foo'), 'foo bar\n', { mode: 0o777 });
      const snapB = path.join(work, 'snapB');
      await sn.commit(snapB, next, opt);

      const siA = await sn.stat(snapA);
      const siB = await sn.stat(snapB);
      const siParentB = await sn.stat(siB.parent);

      assert.equal(siA.parent, '');
      assert.equal(siB.parent, snapA);
      assert.equal(siParentB.parent, '');
    } finally {
      await unmountTest(next);
    }
  } finally {
    await unmountTest(preparing);
  }
}

/** Creating two layers with Prepare or View with the same key must fail. */
async function checkSnapshotterPrepareView(sn: Snapshotter, work: string): Promise<void> {
  const preparing = await snapshotterPrepareMount(sn, 'preparing', '', work);
  try {
    const snapA = path.join(work, 'snapA');
    await sn.commit(snapA, preparing, opt);

    // Prepare & View with same key
    const newLayer = path.join(work, 'newlayer');
    mkdirAll(preparing);
    await sn.prepare(newLayer, snapA, opt);
    await expectReject(sn.view(newLayer, snapA, opt), 'View with the key of an active snapshot should fail');

    // Two Prepare with same key
    const prepLayer = path.join(work, 'prepLayer');
    mkdirAll(preparing);
    await sn.prepare(prepLayer, snapA, opt);
    await expectReject(sn.prepare(prepLayer, snapA, opt), 'second Prepare with the same key should fail');

    // Two View with same key
    const viewLayer = path.join(work, 'viewLayer');
    mkdirAll(preparing);
    await sn.view(viewLayer, snapA, opt);
    await expectReject(sn.view(viewLayer, snapA, opt), 'second View with the same key should fail');
  } finally {
    await unmountTest(preparing);
  }
}

/** Files of a lower layer deleted in a child layer must stay gone in later layers. */
async function checkDeletedFilesInChildSnapshot(sn: Snapshotter, work: string): Promise<void> {
  const l1Init = apply(createFile('/foo', 'foo\n', 0o777), createFile('/foobar', 'foobar\n', 0o777));
  const l2Init = apply(removeAll('/foobar'));
  const l3Init = apply();
  await checkSnapshots(sn, work, l1Init, l2Init, l3Init);
}

/** Three layers: removing the intermediate one must fail while the top one exists. */
async function checkRemoveIntermediateSnapshot(sn: Snapshotter, work: string): Promise<void> {
  const base = await snapshotterPrepareMount(sn, 'base', '', work);
  try {
    const committedBase = path.join(work, 'committed-base');
    await sn.commit(committedBase, base, opt);

    // Create intermediate layer
    const intermediate = path.join(work, 'intermediate');
    await sn.prepare(intermediate, committedBase, opt);
    const committedInter = path.join(work, 'committed-inter');
    await sn.commit(committedInter, intermediate, opt);

    // Create top layer
    const topLayer = path.join(work, 'toplayer');
    await sn.prepare(topLayer, committedInter, opt);

    // Deletion of intermediate layer must fail.
    await expectReject(sn.remove(committedInter), 'intermediate layer removal should fail.');

    // Removal from toplayer to base should not fail.
    await sn.remove(topLayer);
    await sn.remove(committedInter);
    await unmountTest(base);
    await sn.remove(committedBase);
  } finally {
    await unmountTest(base);
  }
}

/**
 * Empty snapshots:
 *   c1 - committed, no parent
 *   c2 - committed, parent c1
 *   a1 - active, parent c2
 *   a2 - active, no parent
 *   v1 - view, parent c2
 *   v2 - view, no parent
 */
async function baseTestSnapshots(sn: Snapshotter): Promise<void> {
  await sn.prepare('c1-a', '', opt);
  await sn.commit('c1', 'c1-a', opt);
  await sn.prepare('c2-a', 'c1', opt);
  await sn.commit('c2', 'c2-a', opt);
  await sn.prepare('a1', 'c2', opt);
  await sn.prepare('a2', '', opt);
  await sn.view('v1', 'c2', opt);
  await sn.view('v2', '', opt);
}

function assertLabels(actual: Labels, expected: Labels): void {
  assert.equal(
    Object.keys(actual).length,
    Object.keys(expected).length,
    `Label size mismatch: ${JSON.stringify(actual)} vs ${JSON.stringify(expected)}`,
  );
  for (const [k, v] of Object.entries(expected)) {
    assert.equal(actual[k], v, `Wrong label value for ${k}, got ${JSON.stringify(actual[k])}, expected ${JSON.stringify(v)}`);
  }
}

async function checkUpdate(sn: Snapshotter, _work: string): Promise<void> {
  const t1 = Date.now();
  await baseTestSnapshots(sn);
  const t2 = Date.now();
  const testcases: { name: string; kind: Kind; parent: string }[] = [
    { name: 'c1', kind: Kind.Committed, parent: '' },
    { name: 'c2', kind: Kind.Committed, parent: 'c1' },
    { name: 'a1', kind: Kind.Active, parent: 'c2' },
    { name: 'a2', kind: Kind.Active, parent: '' },
    { name: 'v1', kind: Kind.View, parent: 'c2' },
    { name: 'v2', kind: Kind.View, parent: '' },
  ];
  // Upstream reports each case's first mismatch and goes on with the next.
  const errors: string[] = [];
  for (const tc of testcases) {
    let st = await sn.stat(tc.name);
    const check = (cond: boolean, msg: string): boolean => {
      if (!cond) errors.push(`(${tc.name}) ${msg}`);
      return cond;
    };
    if (
      !check(st.created >= t1 && st.created <= t2, `wrong created time ${st.created}: expected between ${t1} and ${t2}`) ||
      !check(st.created === st.updated, `unexpected updated time ${st.updated}: expected ${st.created}`) ||
      !check(st.kind === tc.kind, `unexpected kind ${st.kind}, expected ${tc.kind}`) ||
      !check(st.parent === tc.parent, `unexpected parent ${JSON.stringify(st.parent)}, expected ${JSON.stringify(tc.parent)}`) ||
      !check(st.name === tc.name, `unexpected name ${JSON.stringify(st.name)}, expected ${JSON.stringify(tc.name)}`)
    ) {
      continue;
    }

    const createdAt = st.created;
    const rootTime = rfc3339(new Date());
    let expected: Labels = {
      l1: 'v1',
      l2: 'v2',
      l3: 'v3',
      // Keep root label
      'containerd.io/gc.root': rootTime,
    };
    st = { ...st, parent: 'doesnotexist', labels: expected };
    const u1 = Date.now();
    st = await sn.update(st, []);
    const u2 = Date.now();

    if (
      !check(st.created === createdAt, `wrong created time ${st.created}: expected ${createdAt}`) ||
      !check(st.updated >= u1 && st.updated <= u2, `wrong updated time ${st.updated}: expected between ${u1} and ${u2}`) ||
      !check(st.kind === tc.kind, `unexpected kind ${st.kind}, expected ${tc.kind}`) ||
      !check(st.parent === tc.parent, `unexpected parent ${JSON.stringify(st.parent)}, expected ${JSON.stringify(tc.parent)}`) ||
      !check(st.name === tc.name, `unexpected name ${JSON.stringify(st.name)}, expected ${JSON.stringify(tc.name)}`)
    ) {
      continue;
    }
    assertLabels(st.labels, expected);

    expected = { l1: 'updated', l3: 'v3', 'containerd.io/gc.root': rootTime };
    st = { ...st, labels: { l1: 'updated', l4: 'v4' } };
    st = await sn.update(st, ['labels.l1', 'labels.l2']);
    assertLabels(st.labels, expected);

    expected = { l4: 'v4', 'containerd.io/gc.root': rootTime };
    st = { ...st, labels: expected };
    st = await sn.update(st, ['labels']);
    assertLabels(st.labels, expected);

    // Test failure received when providing immutable field path
    st = { ...st, parent: 'doesnotexist' };
    const err = await expectReject(sn.update(st, ['parent']), 'Expected error updating with immutable field path');
    assert.ok(isInvalidArgument(err), `Unexpected error updating ${tc.name}: ${String(err)}`);
  }
  assert.deepEqual(errors, []);
}

async function checkRemove(sn: Snapshotter, _work: string): Promise<void> {
  await sn.prepare('committed-a', '', opt);
  await sn.commit('committed-1', 'committed-a', opt);
  await sn.prepare('reuse-1', 'committed-1', opt);
  await sn.remove('reuse-1');
  await sn.view('reuse-1', 'committed-1', opt);
  await sn.remove('reuse-1');
  await sn.prepare('reuse-1', '', opt);
  await sn.remove('committed-1');
  await sn.commit('committed-1', 'reuse-1', opt);
}

/** A view must be mounted read-only: checked with a real mount, not only its options. */
async function checkSnapshotterViewReadonly(sn: Snapshotter, work: string): Promise<void> {
  const preparing = path.join(work, 'preparing');
  await sn.prepare(preparing, '', opt);
  const committed = path.join(work, 'committed');
  await sn.commit(committed, preparing, opt);
  const view = path.join(work, 'view');
  const m = await sn.view(view, committed, opt);
  const viewMountPoint = path.join(work, 'view-mount');
  mkdirAll(viewMountPoint);

  await mountAll(m, viewMountPoint);
  try {
    const testfile = path.join(viewMountPoint, 'testfile');
    let writeErr: unknown;
    try {
      fs.writeFileSync(testfile, 'testcontent', { mode: 0o777 });
    } catch (err) {
      // EROFS is expected, but another error code is acceptable.
      writeErr = err;
    }
    assert.ok(writeErr, `write to ${testfile} should fail (EROFS) but did not fail`);
  } finally {
    await unmountTest(viewMountPoint);
  }
  await sn.remove(view);
  await sn.remove(committed);
}

/** Move files from the base layer to a new location in the next layer. */
async function checkFileFromLowerLayer(sn: Snapshotter, work: string): Promise<void> {
  const l1Init = apply(
    createDir('/dir1', 0o700),
    createFile('/dir1/f1', 'Hello', 0o644),
    createDir('dir2', 0o700),
    createFile('dir2/f2', '...', 0o644),
  );
  const l2Init = apply(
    createDir('/dir3', 0o700),
    createFile('/dir3/f1', 'Hello', 0o644),
    removeAll('/dir1'),
    link('dir2/f2', 'dir3/f2'),
    removeAll('dir2/f2'),
  );
  await checkSnapshots(sn, work, l1Init, l2Init);
}

async function closeTwice(sn: Snapshotter, _work: string): Promise<void> {
  const n = `closeTwice-${crypto.randomInt(2 ** 47)}`;
  const prepare = `${n}-prepare`;

  // do some dummy ops to modify the snapshotter internal state
  await sn.prepare(prepare, '', opt);
  await sn.commit(n, prepare, opt);
  await sn.remove(n);
  assert.doesNotThrow(() => sn.close(), 'The first close failed');
  assert.doesNotThrow(() => sn.close(), 'The second close failed');
}

async function checkRootPermission(sn: Snapshotter, work: string): Promise<void> {
  const preparing = await snapshotterPrepareMount(sn, 'preparing', '', work);
  try {
    const mode = fs.statSync(preparing).mode & 0o777;
    assert.equal(mode, 0o755, `expected 0755, got 0${mode.toString(8)}`);
  } finally {
    await unmountTest(preparing);
  }
}

async function check128LayersMount(sn: Snapshotter, work: string): Promise<void> {
  const lowestApply = apply(
    createFile('/bottom', 'way at the bottom\n', 0o777),
    createFile('/overwriteme', 'FIRST!\n', 0o777),
    createDir('/ADDHERE', 0o755),
    createDir('/ONLYME', 0o755),
    createFile('/ONLYME/bottom', 'bye!\n', 0o777),
  );

  const appliers: Applier[] = [lowestApply];
  for (let i = 1; i <= 127; i++) {
    appliers.push(
      apply(
        createFile('/overwriteme', `${i} WAS HERE!\n`, 0o777),
        createFile(`/ADDHERE/file-${i}`, 'same\n', 0o755),
        removeAll('/ONLYME'),
        createDir('/ONLYME', 0o755),
        createFile(`/ONLYME/file-${i}`, 'only me!\n', 0o777),
      ),
    );
  }

  const flat = path.join(work, 'flat');
  mkdirAll(flat);

  let parent = '';
  for (const [i, applier] of appliers.entries()) {
    const preparing = path.join(work, `prepare-layer-${i}`);
    mkdirAll(preparing);
    const mounts = await sn.prepare(preparing, parent, opt);
    await mountAll(mounts, preparing);
    try {
      const layerCheck = (when: string): void => {
        try {
          checkDirectoryEqual(preparing, flat);
        } catch (err) {
          throw new Error(`[layer ${i}] preparing doesn't equal to flat ${when}: ${(err as Error).message}`);
        }
      };
      layerCheck('before apply');
      await applier.apply(flat);
      await applier.apply(preparing);
      layerCheck('after apply');
    } finally {
      await unmountTest(preparing);
    }

    parent = path.join(work, `committed-${i}`);
    await sn.commit(parent, preparing, opt);
  }

  const view = path.join(work, 'fullview');
  mkdirAll(view);
  const mounts = await sn.view(view, parent, opt);
  // The point of the case: one overlay with all 128 layers as lowerdirs.
  const lower = mounts[0]?.options.find((o) => o.startsWith('lowerdir='));
  assert.equal(lower?.slice('lowerdir='.length).split(':').length, 128, 'the full view should stack 128 lowerdirs');
  await mountAll(mounts, view);
  try {
    checkDirectoryEqual(view, flat);
  } finally {
    await unmountTest(view);
  }
}

async function checkWalk(sn: Snapshotter, _work: string): Promise<void> {
  const walkOpt: Labels = { 'containerd.io/gc.root': 'check-walk' };

  // No parent active
  await sn.prepare('a-np', '', walkOpt);

  // Base parent
  await sn.prepare('p-tmp', '', walkOpt);
  await sn.commit('p', 'p-tmp', walkOpt);

  // Active
  await sn.prepare('a', 'p', walkOpt);

  // View
  await sn.view('v', 'p', walkOpt);

  // Base parent with label=1
  await sn.prepare('p-wl-tmp', '', walkOpt);
  await sn.commit('p-wl', 'p-wl-tmp', { l: '1', 'containerd.io/gc.root': 'check-walk' });

  // active with label=2
  await sn.prepare('a-wl', 'p-wl', { l: '2', 'containerd.io/gc.root': 'check-walk' });

  // view with label=3
  await sn.view('v-wl', 'p-wl', { l: '3', 'containerd.io/gc.root': 'check-walk' });

  // no parent active with label=2
  await sn.prepare('a-np-wl', '', { l: '2', 'containerd.io/gc.root': 'check-walk' });

  const cases: { matches: string[]; filters: string[] }[] = [
    {
      matches: ['a-np', 'p', 'a', 'v', 'p-wl', 'a-wl', 'v-wl', 'a-np-wl'],
      filters: ['labels."containerd.io/gc.root"==check-walk'],
    },
    { matches: ['a-np', 'a', 'a-wl', 'a-np-wl'], filters: ['kind==active,labels."containerd.io/gc.root"==check-walk'] },
    { matches: ['v', 'v-wl'], filters: ['kind==view,labels."containerd.io/gc.root"==check-walk'] },
    { matches: ['p', 'p-wl'], filters: ['kind==committed,labels."containerd.io/gc.root"==check-walk'] },
    { matches: ['p', 'a-np-wl'], filters: ['name==p', 'name==a-np-wl'] },
    { matches: ['a-wl'], filters: ['name==a-wl,labels.l'] },
    { matches: ['a', 'v'], filters: ['parent==p'] },
    { matches: ['a', 'v', 'a-wl', 'v-wl'], filters: ['parent!="",labels."containerd.io/gc.root"==check-walk'] },
    { matches: ['p-wl', 'a-wl', 'v-wl', 'a-np-wl'], filters: ['labels.l'] },
    { matches: ['a-wl', 'a-np-wl'], filters: ['labels.l==2'] },
  ];
  const errors: string[] = [];
  for (const [i, tc] of cases.entries()) {
    const actual: string[] = [];
    await sn.walk((info) => {
      actual.push(info.name);
    }, tc.filters);
    const want = [...tc.matches].sort();
    actual.sort();
    if (JSON.stringify(actual) !== JSON.stringify(want)) {
      errors.push(`[${i}] Unexpected result:\nActual:\n\t${JSON.stringify(actual)}\nExpected:\n\t${JSON.stringify(want)}`);
    }
  }
  assert.deepEqual(errors, []);
}

// ---- issues.go: cases covering issues found in older layering models ----

/**
 * Update of a single file in an upper layer; run 5 times, each starting on a
 * new second, to catch sporadic failures.
 * See https://github.com/docker/docker/issues/21555
 */
async function checkLayerFileUpdate(sn: Snapshotter, work: string): Promise<void> {
  const l1Init = apply(
    createDir('/etc', 0o700),
    createFile('/etc/hosts', 'mydomain 10.0.0.1', 0o644),
    createFile('/etc/profile', 'PATH=/usr/bin', 0o644),
  );
  const l2Init = apply(
    createFile('/etc/hosts', 'mydomain 10.0.0.2', 0o644),
    createFile('/etc/profile', 'PATH=/usr/bin', 0o666),
    createDir('/root', 0o700),
    createFile('/root/.bashrc', 'PATH=/usr/sbin:/usr/bin', 0o644),
  );

  let sleepMs = 0;
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, sleepMs));
    await checkSnapshots(sn, work, l1Init, l2Init);
    // Sleep until next second boundary before running again
    sleepMs = 1000 - (Date.now() % 1000);
  }
}

/** See https://github.com/docker/docker/issues/25244 */
async function checkRemoveDirectoryInLowerLayer(sn: Snapshotter, work: string): Promise<void> {
  const l1Init = apply(createDir('/lib', 0o700), createFile('/lib/hidden', '', 0o644));
  const l2Init = apply(removeAll('/lib'), createDir('/lib', 0o700), createFile('/lib/not-hidden', '', 0o644));
  const l3Init = apply(createFile('/lib/newfile', '', 0o644));
  await checkSnapshots(sn, work, l1Init, l2Init, l3Init);
}

/**
 * See https://github.com/docker/docker/issues/20240 (aufs),
 * https://github.com/docker/docker/issues/24913 (overlay),
 * https://github.com/docker/docker/issues/28391 (overlay2)
 */
async function checkChown(sn: Snapshotter, work: string): Promise<void> {
  const l1Init = apply(
    createDir('/opt', 0o700),
    createDir('/opt/a', 0o700),
    createDir('/opt/a/b', 0o700),
    createFile('/opt/a/b/file.txt', 'hello', 0o644),
  );
  const l2Init = apply(
    chown('/opt', 1, 1),
    chown('/opt/a', 1, 1),
    chown('/opt/a/b', 1, 1),
    chown('/opt/a/b/file.txt', 1, 1),
  );
  await checkSnapshots(sn, work, l1Init, l2Init);
}

/**
 * See https://github.com/docker/docker/issues/25409. Upstream skips this case
 * ("still fails on some kernels with overlay"); here it runs, with the rename
 * applier copying on EXDEV as overlayfs asks callers to.
 */
async function checkRename(sn: Snapshotter, work: string): Promise<void> {
  const l1Init = apply(
    createDir('/dir1', 0o700),
    createDir('/somefiles', 0o700),
    createFile('/somefiles/f1', 'was here first!', 0o644),
    createFile('/somefiles/f2', 'nothing interesting', 0o644),
  );
  const l2Init = apply(
    rename('/dir1', '/dir2'),
    createFile('/somefiles/f1-overwrite', 'new content 1', 0o644),
    rename('/somefiles/f1-overwrite', '/somefiles/f1'),
    rename('/somefiles/f2', '/somefiles/f3'),
  );
  await checkSnapshots(sn, work, l1Init, l2Init);
}

/** See https://github.com/docker/docker/issues/27298 */
async function checkDirectoryPermissionOnCommit(sn: Snapshotter, work: string): Promise<void> {
  const l1Init = apply(
    createDir('/dir1', 0o700),
    createDir('/dir2', 0o700),
    createDir('/dir3', 0o700),
    createDir('/dir4', 0o700),
    createFile('/dir4/f1', '...', 0o644),
    createDir('/dir5', 0o700),
    createFile('/dir5/f1', '...', 0o644),
    chown('/dir1', 1, 1),
    chown('/dir2', 1, 1),
    chown('/dir3', 1, 1),
    chown('/dir5', 1, 1),
    chown('/dir5/f1', 1, 1),
  );
  const l2Init = apply(chown('/dir2', 0, 0), removeAll('/dir3'), chown('/dir4', 1, 1), chown('/dir4/f1', 1, 1));
  const l3Init = apply(
    createDir('/dir3', 0o700),
    chown('/dir3', 1, 1),
    removeAll('/dir5'),
    createDir('/dir5', 0o700),
    chown('/dir5', 1, 1),
  );
  await checkSnapshots(sn, work, l1Init, l2Init, l3Init);
}

/** Stat must work from inside a Walk callback. */
async function checkStatInWalk(sn: Snapshotter, _work: string): Promise<void> {
  const prefix = 'stats-in-walk-';
  await createNamedSnapshots(sn, prefix);
  await sn.walk(async (si) => {
    // Only stat snapshots from this test
    if (!si.name.startsWith(prefix)) return;
    const si2 = await sn.stat(si.name);
    checkInfo(si, si2);
  });
}

async function createNamedSnapshots(sn: Snapshotter, ns: string): Promise<void> {
  const c1 = `${ns}c1`;
  const c2 = `${ns}c2`;
  await sn.prepare(`${c1}-a`, '', opt);
  await sn.commit(c1, `${c1}-a`, opt);
  await sn.prepare(`${c2}-a`, c1, opt);
  await sn.commit(c2, `${c2}-a`, opt);
  await sn.prepare(`${ns}a1`, c2, opt);
  await sn.view(`${ns}v1`, c2, opt);
}

// ---- the suite ----

/** Registers the 21 cases for each layer mode, against the real or the fake kernel. */
export function conformanceSuite(kernel: KernelKind): void {
  const root = process.getuid?.() === 0;
  for (const mode of ['directories', 'erofs'] as const) {
    describe(`SnapshotterSuite (${mode === 'erofs' ? 'EROFS layers over the chunk store' : 'plain directory layers'}, ${kernel} kernel)`, () => {
      let oldUmask = 0;
      // Upstream clears the umask for the whole suite, so modes are exactly as requested.
      before(() => {
        oldUmask = process.umask(0);
      });
      after(() => {
        process.umask(oldUmask);
      });
      const t = (name: string, fn: TestFn, needsRoot = false) => {
        if (needsRoot && !root) test(name, { skip: 'SKIP: needs root (chown to another user needs CAP_CHOWN)' }, () => undefined);
        else test(name, makeTest(fn, mode, kernel));
      };

      t('Basic', checkSnapshotterBasic);
      t('StatActive', checkSnapshotterStatActive);
      t('StatComitted', checkSnapshotterStatCommitted);
      t('TransitivityTest', checkSnapshotterTransitivity);
      t('PreareViewFailingtest', checkSnapshotterPrepareView);
      t('Update', checkUpdate);
      t('Remove', checkRemove);
      t('Walk', checkWalk);

      t('LayerFileupdate', checkLayerFileUpdate);
      t('RemoveDirectoryInLowerLayer', checkRemoveDirectoryInLowerLayer);
      t('Chown', checkChown, true);
      t('DirectoryPermissionOnCommit', checkDirectoryPermissionOnCommit, true);
      t('RemoveIntermediateSnapshot', checkRemoveIntermediateSnapshot);
      t('DeletedFilesInChildSnapshot', checkDeletedFilesInChildSnapshot);
      t('MoveFileFromLowerLayer', checkFileFromLowerLayer);
      t('Rename', checkRename);

      t('ViewReadonly', checkSnapshotterViewReadonly);

      t('StatInWalk', checkStatInWalk);
      t('CloseTwice', closeTwice);
      t('RootPermission', checkRootPermission);

      t('128LayersMount', check128LayersMount);
    });
  }
}
