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
import { readXattrs } from '../native/xattr';
import { mountAll, unmount } from '../src/mount/mount';
import type { Mount } from '../src/snapshot/types';
import { deviceNumbers } from './helpers/fstest';
import { type BuiltImage, type Expect, busyboxImageDef, chainImageDef, tortureImageDef } from './helpers/images';
import { Stack, assertAllCollected, assertCommittedChain, assertDirsMatchSnapshots, assertNoDaemonErrors } from './helpers/stack';

interface Node {
  type: 'file' | 'dir' | 'symlink' | 'fifo' | 'char' | 'block' | 'socket';
  /** Permission bits incl. setuid/setgid/sticky. */
  perm: number;
  uid: number;
  gid: number;
  size?: number;
  sha256?: string;
  target?: string;
  rdev?: [number, number];
  /** name → hex value */
  xattrs: Record<string, string>;
  /** Other paths of the tree with the same inode (sorted), if any. */
  links?: string[];
  /** dev:ino, only to compute `links`; removed before comparing. */
  inode?: string;
}

type Tree = Map<string, Node>;

function typeOf(st: fs.BigIntStats): Node['type'] {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'dir';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isFIFO()) return 'fifo';
  if (st.isCharacterDevice()) return 'char';
  if (st.isBlockDevice()) return 'block';
  return 'socket';
}

/** Walks `root` (not following symlinks); keys are paths relative to root, "." for root. */
function walkTree(root: string): Tree {
  const tree: Tree = new Map();
  const visit = (rel: string) => {
    const abs = rel === '.' ? root : path.join(root, rel);
    const st = fs.lstatSync(abs, { bigint: true });
    const type = typeOf(st);
    const xattrs: Record<string, string> = {};
    for (const [k, v] of readXattrs(abs)) xattrs[k] = v.toString('hex');
    const node: Node = { type, perm: Number(st.mode & 0o7777n), uid: Number(st.uid), gid: Number(st.gid), xattrs };
    if (type === 'file') {
      node.size = Number(st.size);
      node.sha256 = crypto.createHash('sha256').update(fs.readFileSync(abs)).digest('hex');
      node.inode = `${st.dev}:${st.ino}`;
    } else if (type === 'symlink') {
      node.target = fs.readlinkSync(abs);
    } else if (type === 'char' || type === 'block') {
      node.rdev = deviceNumbers(st.rdev);
    }
    if (type !== 'dir') node.inode = `${st.dev}:${st.ino}`;
    tree.set(rel, node);
    if (type === 'dir') {
      for (const name of fs.readdirSync(abs).sort()) {
        assert.ok(!name.includes('\ufffd'), `name under ${abs} is not valid UTF-8`);
        visit(rel === '.' ? name : `${rel}/${name}`);
      }
    }
  };
  visit('.');
  // Hardlink groups: every non-directory sharing an inode with another path.
  const byInode = new Map<string, string[]>();
  for (const [p, n] of tree) if (n.inode) byInode.set(n.inode, [...(byInode.get(n.inode) ?? []), p]);
  for (const [p, n] of tree) {
    const group = n.inode ? (byInode.get(n.inode) as string[]) : [];
    if (group.length > 1) n.links = group.filter((q) => q !== p).sort();
    delete n.inode;
  }
  return tree;
}

function describeNode(n: Node | undefined): string {
  return n === undefined ? '(absent)' : JSON.stringify({ ...n, perm: `0${n.perm.toString(8)}` });
}

function diffTrees(a: Tree, b: Tree, an: string, bn: string): string[] {
  const out: string[] = [];
  const paths = [...new Set([...a.keys(), ...b.keys()])].sort();
  for (const p of paths) {
    const x = a.get(p);
    const y = b.get(p);
    if (JSON.stringify(x) !== JSON.stringify(y)) out.push(`${p}:\n    ${an}: ${describeNode(x)}\n    ${bn}: ${describeNode(y)}`);
  }
  return out;
}

function hex(v: string | Buffer): string {
  return (typeof v === 'string' ? Buffer.from(v, 'utf8') : v).toString('hex');
}

/** Checks the image's expectations against a tree; returns the failures. */
function checkExpect(tree: Tree, expects: Expect[]): string[] {
  const bad: string[] = [];
  for (const e of expects) {
    const n = tree.get(e.path);
    if (e.kind === 'absent') {
      if (n) bad.push(`${e.path}: expected absent, found ${describeNode(n)}`);
      continue;
    }
    if (!n) {
      bad.push(`${e.path}: expected ${e.kind}, absent`);
      continue;
    }
    const fail = (what: string) => bad.push(`${e.path}: ${what}; found ${describeNode(n)}`);
    if (n.type !== e.kind) fail(`expected type ${e.kind}`);
    if (e.mode !== undefined && n.perm !== e.mode) fail(`expected mode 0${e.mode.toString(8)}`);
    if (e.uid !== undefined && n.uid !== e.uid) fail(`expected uid ${e.uid}`);
    if (e.gid !== undefined && n.gid !== e.gid) fail(`expected gid ${e.gid}`);
    if (e.content !== undefined) {
      const want = crypto
        .createHash('sha256')
        .update(typeof e.content === 'string' ? Buffer.from(e.content, 'utf8') : e.content)
        .digest('hex');
      if (n.sha256 !== want) fail('content differs');
    }
    if (e.target !== undefined && n.target !== e.target) fail(`expected target ${e.target}`);
    if (e.rdev !== undefined && JSON.stringify(n.rdev) !== JSON.stringify(e.rdev)) fail(`expected rdev ${e.rdev.join(',')}`);
    for (const [k, v] of Object.entries(e.xattrs ?? {})) {
      if (n.xattrs[k] !== hex(v)) fail(`expected xattr ${k}=${hex(v)}`);
    }
    for (const other of e.sameInodeAs ?? []) {
      if (!(n.links ?? []).includes(other)) fail(`expected same inode as ${other}`);
    }
  }
  return bad;
}

/** `ctr snapshots view --mounts` JSON → containerd-style mounts. */
function parseCtrMounts(stdout: string): Mount[] {
  const raw = JSON.parse(stdout) as { Type: string; Source: string; Target?: string; Options: string[] | null }[];
  assert.ok(Array.isArray(raw) && raw.length > 0, `no mounts in ${stdout}`);
  return raw.map((m) => ({ type: m.Type, source: m.Source, target: m.Target || undefined, options: m.Options ?? [] }));
}

/**
 * A read-only view of `parent`, protected from containerd's GC. `ctr
 * snapshots view` cannot set labels, and a snapshot without a lease or a
 * gc.root label may be collected by a GC that earlier deletions scheduled;
 * so: view, label gc.root, and verify the view survived (else again).
 */
async function protectedView(stack: Stack, snapshotter: string, key: string, parent: string): Promise<Mount[]> {
  for (let attempt = 1; ; attempt++) {
    const r = await stack.ctr(['snapshots', '--snapshotter', snapshotter, 'view', '--mounts', key, parent]);
    const mounts = parseCtrMounts(r.stdout);
    const labeled = await stack.ctrTry(['snapshots', '--snapshotter', snapshotter, 'label', key, `containerd.io/gc.root=${new Date().toISOString()}`]);
    const info = await stack.ctrTry(['snapshots', '--snapshotter', snapshotter, 'info', key]);
    if (labeled.code === 0 && info.code === 0) {
      const parsed = JSON.parse(info.stdout) as { Kind: string; Parent: string; Labels?: Record<string, string> };
      assert.equal(parsed.Parent, parent);
      assert.ok(parsed.Labels?.['containerd.io/gc.root'], 'view is labeled gc.root');
      return mounts;
    }
    if (attempt >= 3) throw new Error(`view ${key} kept disappearing:\n${labeled.stderr}\n${info.stderr}`);
  }
}

describe('differential: containerd overlayfs vs dedup present the same trees', () => {
  let stack: Stack;
  const images: BuiltImage[] = [];
  const views: { snapshotter: string; key: string }[] = [];

  before(async () => {
    stack = await Stack.start();
    images.push(...(await stack.pushImages([busyboxImageDef(), tortureImageDef(), chainImageDef()])));
  });

  after(async () => {
    await stack?.stop();
  });

  for (const [i, label] of ['busybox', 'torture', 'chain (40 layers)'].entries()) {
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
        const target = path.join(stack.dir, `mnt-${sn}-${i}`);
        fs.mkdirSync(target);
        await mountAll(mounts, target);
        try {
          trees[sn] = walkTree(target);
        } finally {
          await unmount(target);
          fs.rmdirSync(target);
        }
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
    assert.ok(views.length === 6, 'every view was made');
  });
});
