/**
 * Trees as a container sees them, for comparing two ways of making one
 * rootfs: walk a mounted tree (type, mode, owner, size, content hash, link
 * target, device numbers, xattrs, hardlink groups), diff two walks, check an
 * image's expectations, and mount a GC-protected view of a snapshot.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { readXattrs } from '../../native/xattr';
import { TarReader } from '../../src/convert/tar-reader';
import { mountAll, unmount } from '../../src/mount/mount';
import type { Mount } from '../../src/store/types';
import { deviceNumbers } from './fstest';
import type { Expect } from './images';
import type { Stack } from './stack';

export interface Node {
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

export type Tree = Map<string, Node>;

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
export function walkTree(root: string): Tree {
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

export function diffTrees(a: Tree, b: Tree, an: string, bn: string): string[] {
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
export function checkExpect(tree: Tree, expects: Expect[]): string[] {
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
export function parseCtrMounts(stdout: string): Mount[] {
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
export async function protectedView(stack: Stack, snapshotter: string, key: string, parent: string, ns = 'default'): Promise<Mount[]> {
  for (let attempt = 1; ; attempt++) {
    const r = await stack.ctr(['snapshots', '--snapshotter', snapshotter, 'view', '--mounts', key, parent], { ns });
    const mounts = parseCtrMounts(r.stdout);
    const labeled = await stack.ctrTry(['snapshots', '--snapshotter', snapshotter, 'label', key, `containerd.io/gc.root=${new Date().toISOString()}`], { ns });
    const info = await stack.ctrTry(['snapshots', '--snapshotter', snapshotter, 'info', key], { ns });
    if (labeled.code === 0 && info.code === 0) {
      const parsed = JSON.parse(info.stdout) as { Kind: string; Parent: string; Labels?: Record<string, string> };
      assert.equal(parsed.Parent, parent);
      assert.ok(parsed.Labels?.['containerd.io/gc.root'], 'view is labeled gc.root');
      return mounts;
    }
    if (attempt >= 3) throw new Error(`view ${key} kept disappearing:\n${labeled.stderr}\n${info.stderr}`);
  }
}

/** Mounts `mounts` on a new directory `target`, walks the tree, unmounts and removes `target`. */
export async function walkMounted(mounts: Mount[], target: string): Promise<Tree> {
  fs.mkdirSync(target);
  await mountAll(mounts, target);
  try {
    return walkTree(target);
  } finally {
    await unmount(target);
    fs.rmdirSync(target);
  }
}

/**
 * `base` with layer tar `tar` applied as containerd's applier would (an
 * OCI changeset: `.wh.<name>` deletes name, `.wh..wh..opq` empties a
 * directory of what lay below it, hardlinks join their target's group):
 * the tree a snapshot stacked on `base` with that layer shows, for
 * comparing the layers two differs wrote without unpacking them.
 */
export async function applyTarToTree(base: Tree, tar: Buffer): Promise<Tree> {
  // Each node's hardlink group (its paths' smallest), kept aside while paths come and go.
  const group = new Map<string, string>();
  const tree: Tree = new Map();
  for (const [p, n] of base) {
    const { links, ...rest } = n;
    tree.set(p, { ...rest, xattrs: { ...n.xattrs } });
    if (n.type !== 'dir') group.set(p, [p, ...(links ?? [])].sort()[0]);
  }
  const fromTar = new Set<string>();
  const drop = (p: string) => {
    for (const q of [...tree.keys()]) {
      if (q === p || q.startsWith(`${p}/`)) {
        tree.delete(q);
        group.delete(q);
      }
    }
  };
  let fresh = 0;
  const reader = new TarReader(
    (async function* () {
      yield tar;
    })(),
  );
  for (let h = await reader.next(); h; h = await reader.next()) {
    const name = h.name.replace(/\/+$/, '').replace(/^\.\//, '') || '.';
    const dir = path.posix.dirname(name);
    const base = path.posix.basename(name);
    const parts: Buffer[] = [];
    for await (const p of reader.data()) parts.push(p);
    if (base === '.wh..wh..opq') {
      // What lay below the directory goes; what this layer put in it stays.
      for (const q of [...tree.keys()]) {
        const inside = dir === '.' ? q !== '.' : q.startsWith(`${dir}/`);
        if (inside && !fromTar.has(q)) {
          tree.delete(q);
          group.delete(q);
        }
      }
      continue;
    }
    if (base.startsWith('.wh.')) {
      drop(dir === '.' ? base.slice(4) : `${dir}/${base.slice(4)}`);
      continue;
    }
    const xattrs: Record<string, string> = {};
    for (const [k, v] of h.pax) if (k.startsWith('SCHILY.xattr.')) xattrs[k.slice('SCHILY.xattr.'.length)] = v.toString('hex');
    const old = tree.get(name);
    if (h.typeflag === '1') {
      const target = h.linkname.replace(/^\.\//, '');
      const t = tree.get(target);
      assert.ok(t && t.type !== 'dir', `hardlink ${name} to ${target}, which is not there`);
      drop(name);
      tree.set(name, { ...t, xattrs: { ...t.xattrs } });
      group.set(name, group.get(target) as string);
      fromTar.add(name);
      continue;
    }
    const type = ({ '0': 'file', '5': 'dir', '2': 'symlink', '6': 'fifo', '3': 'char', '4': 'block' } as Record<string, Node['type']>)[h.typeflag];
    assert.ok(type, `entry ${name} of tar type ${h.typeflag}`);
    if (!(type === 'dir' && old?.type === 'dir')) drop(name);
    const node: Node = { type, perm: h.mode & 0o7777, uid: h.uid, gid: h.gid, xattrs };
    if (type === 'file') {
      const data = Buffer.concat(parts);
      node.size = data.length;
      node.sha256 = crypto.createHash('sha256').update(data).digest('hex');
      group.set(name, `\0tar${fresh++}`);
    } else if (type === 'symlink') {
      node.target = h.linkname;
      group.set(name, `\0tar${fresh++}`);
    } else if (type === 'char' || type === 'block') {
      node.rdev = [h.devmajor, h.devminor];
      group.set(name, `\0tar${fresh++}`);
    } else if (type === 'fifo') {
      group.set(name, `\0tar${fresh++}`);
    }
    tree.set(name, node);
    fromTar.add(name);
  }
  const members = new Map<string, string[]>();
  for (const [p, g] of group) members.set(g, [...(members.get(g) ?? []), p]);
  for (const [p, g] of group) {
    const m = members.get(g) as string[];
    if (m.length > 1) (tree.get(p) as Node).links = m.filter((q) => q !== p).sort();
  }
  return tree;
}
