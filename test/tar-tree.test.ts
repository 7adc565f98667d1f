/**
 * treeFromTar against applyLayerTar: each layer tar is read into a tree
 * (tar-tree.ts) and, separately, applied to an empty directory
 * (untar.ts, containerd's rules) whose tree treeFromDirectory then reads;
 * the two trees are dumped (kind, mode, owner, mtime to the nanosecond,
 * xattrs, symlink target, device numbers, file content from the chunks the
 * sinks got, hardlink groups, children) and must be equal, with the same
 * counts and warnings. The only allowance: a node whose mtime on disk is
 * the moment of the apply (the root, parent directories the tar does not
 * list, whiteouts) has mtime 0 in the tree. Layers that must be refused
 * fail both ways with the same LayerTarError. Needs root (owners, devices,
 * trusted.* and security.capability xattrs).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { before, describe, test } from 'node:test';
import { treeFromDirectory } from '../src/convert/layer-tree';
import { treeFromTar } from '../src/convert/tar-tree';
import { LayerTarError, applyLayerTar } from '../src/convert/untar';
import { scratchDirs } from './helpers/daemon';
import { CAP_NET_BIND_RAW, type Entry, buildLayer, busyboxImageDef, chainImageDef, pseudoRandom, tortureImageDef } from './helpers/images';
import { RAW_MTIME, RawTar } from './helpers/raw-tar';
import { type Dump, RecordingSink, diffDumps, dumpTree } from './helpers/tree-dump';

const CHUNK = 4096;
const workDir = scratchDirs();
let work: string;
let n = 0;

/** The tar in pieces of `size` bytes, as a decompressor hands it over. */
async function* pieces(tar: Buffer, size: number): AsyncGenerator<Buffer> {
  for (let o = 0; o < tar.length; o += size) yield tar.subarray(o, o + size);
}

interface Result {
  dump: Dump;
  files: number;
  bytes: number;
  warnings: string[];
}

async function viaTree(tar: Buffer, piece = 333): Promise<Result> {
  const sink = new RecordingSink(CHUNK);
  const warnings: string[] = [];
  const r = await treeFromTar(pieces(tar, piece), sink, { onWarning: (m) => warnings.push(m) });
  return { dump: dumpTree(r.root, sink), files: r.files, bytes: r.bytes, warnings };
}

async function viaDisk(tar: Buffer): Promise<Result & { dir: string }> {
  const dir = path.join(work, `layer-${n++}`);
  const warnings: string[] = [];
  const r = await applyLayerTar(Readable.from([tar]), dir, { onWarning: (m) => warnings.push(m) });
  const sink = new RecordingSink(CHUNK);
  const root = await treeFromDirectory(dir, sink);
  return { dump: dumpTree(root, sink), files: r.files, bytes: r.bytes, warnings, dir };
}

const ZERO_TIME = '0.000000000';

/**
 * Applies `tar` both ways and asserts the same tree, counts and warnings.
 * Returns the tree's dump and the paths whose mtime was the apply's moment
 * on disk (mtime 0 in the tree).
 */
async function same(tar: Buffer, opts: { piece?: number; rootTimed?: boolean } = {}): Promise<{ dump: Dump; applyTime: string[]; warnings: string[]; files: number; bytes: number }> {
  const started = BigInt(Date.now() - 2000) * 1_000_000n;
  const disk = await viaDisk(tar);
  const tree = await viaTree(tar, opts.piece);
  const applyTime: string[] = [];
  for (const [p, t] of tree.dump) {
    const d = disk.dump.get(p);
    if (!d || t.mtime !== ZERO_TIME || d.mtime === ZERO_TIME) continue;
    const [sec, nsec] = d.mtime.split('.');
    if (BigInt(sec) * 1_000_000_000n + BigInt(nsec) < started) continue;
    assert.ok((t.kind === 'dir' && d.kind === 'dir') || (t.rdev === '0:0' && d.rdev === '0:0'), `${JSON.stringify(p)}: mtime of the apply on disk, but not a directory or whiteout`);
    applyTime.push(p);
    d.mtime = t.mtime;
  }
  if (opts.rootTimed !== false) assert.ok(applyTime.includes(''), 'the root has the apply time on disk');
  const diff = diffDumps(disk.dump, tree.dump, 'applyLayerTar', 'treeFromTar');
  assert.deepEqual(diff, [], `the trees differ:\n${diff.join('\n')}`);
  assert.deepEqual(tree.warnings, disk.warnings, 'the same warnings');
  assert.equal(tree.files, disk.files, 'files');
  assert.equal(tree.bytes, disk.bytes, 'bytes');
  assert.ok(tree.dump.size > 1 && tree.files > 0, 'a non-empty tree');
  fs.rmSync(disk.dir, { recursive: true, force: true });
  return { dump: tree.dump, applyTime, warnings: tree.warnings, files: tree.files, bytes: tree.bytes };
}

/**
 * Both refuse `tar` with the same LayerTarError (kind, entry, message; for
 * a failing system call on disk only the message's start, up to the
 * errno, which the tree names too).
 */
async function sameRefusal(tar: Buffer, pattern: RegExp, opts: { syscall?: string } = {}): Promise<LayerTarError> {
  const errOf = async (p: Promise<unknown>): Promise<LayerTarError> => {
    try {
      await p;
    } catch (err) {
      assert.ok(err instanceof LayerTarError, `expected a LayerTarError, got ${String(err)}`);
      return err;
    }
    assert.fail(`expected a refusal matching ${pattern}, the layer was applied`);
  };
  const disk = await errOf(applyLayerTar(Readable.from([tar]), path.join(work, `refused-${n++}`)));
  const tree = await errOf(treeFromTar(pieces(tar, 512), new RecordingSink(CHUNK)));
  assert.match(tree.message, pattern);
  assert.equal(tree.kind, disk.kind, `kind: ${tree.message} / ${disk.message}`);
  assert.equal(tree.entry, disk.entry);
  if (opts.syscall) {
    assert.match(disk.message, new RegExp(opts.syscall), disk.message);
    assert.match(tree.message, new RegExp(opts.syscall), tree.message);
    const prefix = (m: string) => m.slice(0, m.indexOf(': ') + 2);
    assert.equal(prefix(tree.message), prefix(disk.message));
  } else {
    assert.equal(tree.message, disk.message);
  }
  return tree;
}

const node = (d: Dump, p: string) => {
  const x = d.get(p);
  assert.ok(x, `${p} is in the tree`);
  return x;
};

/** A POSIX ACL xattr value (version 2): [tag, perm, id] entries. */
function acl(entries: [number, number, number?][]): Buffer {
  const b = Buffer.alloc(4 + 8 * entries.length);
  b.writeUInt32LE(2, 0);
  entries.forEach(([tag, perm, id], i) => {
    b.writeUInt16LE(tag, 4 + 8 * i);
    b.writeUInt16LE(perm, 6 + 8 * i);
    b.writeUInt32LE(id ?? 0xffffffff, 8 + 8 * i);
  });
  return b;
}
const [UO, U, GO, G, M, O] = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20];

function cap(version: 2 | 3, permitted: number, rootid?: number, effective = true): Buffer {
  const b = Buffer.alloc(version === 2 ? 20 : 24);
  b.writeUInt32LE(((version === 2 ? 0x02000000 : 0x03000000) | (effective ? 1 : 0)) >>> 0, 0);
  b.writeUInt32LE(permitted >>> 0, 4);
  b.writeUInt32LE(0x000000ff, 8);
  b.writeUInt32LE(0x000001ff, 12);
  if (version === 3) b.writeUInt32LE(rootid ?? 0, 20);
  return b;
}

before(() => {
  process.umask(0o022);
  work = workDir('tar-tree');
});

describe('treeFromTar builds the tree applyLayerTar writes', () => {
  test('whiteouts and opaque directories', async () => {
    const entries: Entry[] = [
      { type: 'dir', path: 'base' },
      { type: 'whiteout', path: 'base/a' },
      { type: 'file', path: 'base/b', content: 'b\n' },
      { type: 'whiteout', path: 'base/b' },
      { type: 'whiteout', path: 'base/c' },
      { type: 'file', path: 'base/c', content: 'recreated after its whiteout\n', mode: 0o600 },
      { type: 'dir', path: 'base/tree', mode: 0o700 },
      { type: 'file', path: 'base/tree/f', content: 'f\n' },
      { type: 'whiteout', path: 'base/tree' },
      { type: 'whiteout', path: 'gone' },
      { type: 'dir', path: 'opq', mode: 0o750, uid: 3, gid: 4 },
      { type: 'opaque', path: 'opq' },
      { type: 'file', path: 'opq/new', content: 'new\n' },
      { type: 'opaque', path: 'late' },
      { type: 'dir', path: 'late', mode: 0o711, uid: 9 },
      { type: 'file', path: 'late/f', content: 'f\n' },
      { type: 'dir', path: 'fresh' },
      { type: 'opaque', path: 'fresh' },
      { type: 'dir', path: 'fresh/inner' },
      { type: 'opaque', path: 'fresh/inner' },
      { type: 'file', path: 'n/.wh', content: 'not a whiteout\n' },
      { type: 'file', path: 'n/.whatever', content: 'not one either\n' },
    ];
    const { dump, applyTime } = await same((await buildLayer(entries)).tar);
    for (const p of ['base/a', 'base/b', 'base/tree', 'gone']) assert.equal(node(dump, p).rdev, '0:0', `${p} is a whiteout`);
    assert.equal(node(dump, 'base/c').kind, 'file');
    for (const p of ['opq', 'late', 'fresh', 'fresh/inner']) assert.equal(node(dump, p).xattrs['trusted.overlay.opaque'], '79');
    assert.equal(node(dump, 'late').perm, '0711');
    assert.ok(![...dump.keys()].some((p) => path.basename(p).startsWith('.wh.')), 'no .wh.* name in the tree');
    // base/tree was a listed directory: at the end its times go to the whiteout now at its path.
    assert.ok(!applyTime.includes('base/tree') && applyTime.includes('base/a'), applyTime.join(' '));
  });

  test('whiteouts and opaque markers in unlisted directories and at the root', async () => {
    const tar = new RawTar()
      .entry({ name: '.wh..wh..opq' })
      .entry({ name: 'implicit/deeper/.wh.x', uid: 5, gid: 6 })
      .entry({ name: 'implicit/opq/.wh..wh..opq' })
      .entry({ name: 'implicit/opq/file' }, 'in an opaque implicit directory\n')
      .entry({ name: 'implicit/.wh..wh.odd' })
      .finish();
    const { dump, applyTime } = await same(tar);
    assert.equal(node(dump, '').xattrs['trusted.overlay.opaque'], '79');
    assert.equal(node(dump, 'implicit/deeper/x').uid, 5);
    assert.equal(node(dump, 'implicit/.wh.odd').rdev, '0:0');
    assert.deepEqual(applyTime.sort(), ['', 'implicit', 'implicit/.wh.odd', 'implicit/deeper', 'implicit/deeper/x', 'implicit/opq']);
  });

  test('entries replacing earlier ones: file and directory both ways, symlinks, fifos, devices, duplicates', async () => {
    const entries: Entry[] = [
      { type: 'dir', path: 'r' },
      { type: 'file', path: 'r/f2d', content: 'I was a file\n' },
      { type: 'dir', path: 'r/f2d', mode: 0o705 },
      { type: 'file', path: 'r/f2d/in', content: 'now a directory\n' },
      { type: 'dir', path: 'r/d2f' },
      { type: 'file', path: 'r/d2f/child', content: 'c\n' },
      { type: 'file', path: 'r/d2f', content: 'now a file\n', mode: 0o600 },
      { type: 'symlink', path: 'r/s2d', target: 'somewhere' },
      { type: 'dir', path: 'r/s2d' },
      { type: 'file', path: 'r/s2d/in', content: 'in a directory that was a symlink\n' },
      { type: 'dir', path: 'r/d2s' },
      { type: 'file', path: 'r/d2s/c', content: 'c\n' },
      { type: 'symlink', path: 'r/d2s', target: 'f2d' },
      { type: 'fifo', path: 'r/fifo2file' },
      { type: 'file', path: 'r/fifo2file', content: 'was a fifo\n' },
      { type: 'file', path: 'r/twice', content: 'one\n', uid: 1 },
      { type: 'file', path: 'r/twice', content: 'two, longer than the first\n', mode: 0o600, uid: 2 },
      { type: 'dir', path: 'r/dirtwice', xattrs: { 'user.first': 'one', 'user.both': 'first' } },
      { type: 'file', path: 'r/dirtwice/c', content: 'c\n' },
      { type: 'dir', path: 'r/dirtwice', mode: 0o700, uid: 3, gid: 3, xattrs: { 'user.second': 'two', 'user.both': 'second' } },
      { type: 'file', path: 'r/hl-src', content: 'source\n' },
      { type: 'hardlink', path: 'r/hl-dst', target: 'r/hl-src' },
      { type: 'file', path: 'r/hl-dst', content: 'the link replaced by a file\n' },
      { type: 'char', path: 'r/dev2dir', major: 1, minor: 3 },
      { type: 'dir', path: 'r/dev2dir' },
      { type: 'symlink', path: 'r/sym2sym', target: 'one' },
      { type: 'symlink', path: 'r/sym2sym', target: 'two' },
    ];
    const { dump } = await same((await buildLayer(entries)).tar);
    assert.equal(node(dump, 'r/d2f').kind, 'file');
    assert.equal(node(dump, 'r/d2s').target, 'f2d');
    assert.deepEqual(node(dump, 'r/dirtwice').xattrs, { 'user.both': Buffer.from('second').toString('hex'), 'user.first': Buffer.from('one').toString('hex'), 'user.second': Buffer.from('two').toString('hex') });
    assert.equal(node(dump, 'r/hl-src').links, undefined);
  });

  test('directory times are set last, on whatever the name resolves to then', async () => {
    const tar = new RawTar()
      .entry({ name: 'real/', typeflag: '5', mtime: 1000 })
      .entry({ name: 'd/', typeflag: '5', mtime: 2000 })
      .entry({ name: 'd', typeflag: '2', linkname: 'real', mtime: 3000 })
      .entry({ name: 'real2/', typeflag: '5', mtime: 1500 })
      .entry({ name: 'e/', typeflag: '5', mtime: 4000 })
      .entry({ name: 'e', typeflag: '2', linkname: '/x/../real2', mtime: 4500 })
      .entry({ name: 'f/', typeflag: '5', mtime: 5000 })
      .entry({ name: 'f', mtime: 6000 }, 'a file where a directory was\n')
      .entry({ name: 'g/', typeflag: '5', mtime: 7000 })
      .entry({ name: '.wh.g' })
      .entry({ name: 'h/', typeflag: '5', mtime: 8000, mode: 0o700 })
      .entry({ name: 'h', typeflag: '2', linkname: '.', mtime: 8500 })
      .entry({ name: 'l2/', typeflag: '5', mtime: 9400 })
      .entry({ name: 'l2/in/', typeflag: '5', mtime: 9500 })
      .entry({ name: 'chain/', typeflag: '5', mtime: 9000 })
      .entry({ name: 'chain/in/', typeflag: '5', mtime: 9100 })
      .entry({ name: 'chain', typeflag: '2', linkname: 'l1', mtime: 9200 })
      .entry({ name: 'l1', typeflag: '2', linkname: 'l2/', mtime: 9300 })
      .finish();
    const { dump, applyTime } = await same(tar, { rootTimed: false });
    assert.equal(node(dump, 'real').mtime, `2000.${'0'.repeat(9)}`);
    assert.equal(node(dump, 'real2').mtime, `4000.${'0'.repeat(9)}`);
    assert.equal(node(dump, 'f').mtime, `5000.${'0'.repeat(9)}`);
    assert.equal(node(dump, 'g').mtime, `7000.${'0'.repeat(9)}`);
    assert.equal(node(dump, '').mtime, `8000.${'0'.repeat(9)}`, 'h -> "." resolves to the root');
    assert.equal(node(dump, 'l2').mtime, `9000.${'0'.repeat(9)}`, 'chain -> l1 -> l2/');
    assert.equal(node(dump, 'l2/in').mtime, `9100.${'0'.repeat(9)}`);
    assert.deepEqual(applyTime, []);
  });

  test('hardlinks: groups, a link header owning the inode, links to replaced files, symlinks, devices, whiteouts; capabilities dropped by lchown', async () => {
    const tar = new RawTar()
      .entry({ name: 'h/', typeflag: '5' })
      .entry({ name: 'h/orig', mode: 0o640, uid: 1000, gid: 1000 }, 'one inode, many names\n')
      .entry({ name: 'h/l1', typeflag: '1', linkname: 'h/orig', mode: 0o640, uid: 1000, gid: 1000 })
      .entry({ name: 'h/sub/l2', typeflag: '1', linkname: './h/orig', mode: 0o640, uid: 1000, gid: 1000 })
      .entry({ name: 'top-link', typeflag: '1', linkname: 'h//orig', mode: 0o640, uid: 1000, gid: 1000 })
      .entry({ name: 'h/pair-a' }, 'second group\n')
      .entry({ name: 'h/pair-b', typeflag: '1', linkname: 'h/pair-a' })
      .entry({ name: 'h/pair-c', typeflag: '1', linkname: 'h/pair-a', uid: 33, gid: 34, mode: 0o4711, mtime: 1000 })
      .entry({ name: 'h/src' }, 'the first src\n')
      .entry({ name: 'h/keeps-old', typeflag: '1', linkname: 'h/src' })
      .entry({ name: 'h/src' }, 'the second src, a new inode\n')
      .entry({ name: 'h/sym', typeflag: '2', linkname: 'orig', uid: 7 })
      .entry({ name: 'h/sym-link', typeflag: '1', linkname: 'h/sym', uid: 8, mode: 0o600 })
      .entry({ name: 'h/fifo', typeflag: '6', mode: 0o600 })
      .entry({ name: 'h/fifo-link', typeflag: '1', linkname: 'h/fifo', mode: 0o644 })
      .entry({ name: 'h/null', typeflag: '3', devmajor: 1, devminor: 3, mode: 0o666 })
      .entry({ name: 'h/null-link', typeflag: '1', linkname: 'h/null', mode: 0o666 })
      .entry({ name: 'h/.wh.wo', uid: 4 })
      .entry({ name: 'h/wo-link', typeflag: '1', linkname: 'h/wo', mode: 0o640, uid: 5 })
      .paxEntry({ name: 'h/cap', mode: 0o4755 }, { xattrs: { 'security.capability': cap(2, 0xffffffff), 'user.kept': 'stays' } }, 'capabilities\n')
      .entry({ name: 'h/cap-link-plain', typeflag: '1', linkname: 'h/cap', mode: 0o4755 })
      .paxEntry({ name: 'h/cap2', mode: 0o755 }, { xattrs: { 'security.capability': CAP_NET_BIND_RAW } }, 'capabilities again\n')
      .paxEntry({ name: 'h/cap2-link', typeflag: '1', linkname: 'h/cap2', mode: 0o755 }, { xattrs: { 'security.capability': CAP_NET_BIND_RAW, 'user.on-link': 'x' } })
      .paxEntry({ name: 'h/ids', uid: 6, gid: 7 }, {}, 'owner kept by -1\n')
      .paxEntry({ name: 'h/ids-link', typeflag: '1', linkname: 'h/ids' }, { records: [['uid', '-1'], ['gid', '4294967295']] })
      .paxEntry({ name: 'h/new-ids' }, { records: [['uid', '-1'], ['gid', '4294967295']] }, 'a new file keeps root:root\n')
      .finish();
    const { dump } = await same(tar);
    assert.deepEqual(node(dump, 'h/orig').links, ['h/l1', 'h/sub/l2', 'top-link']);
    assert.equal(node(dump, 'h/pair-a').uid, 33);
    assert.equal(node(dump, 'h/pair-a').perm, '04711');
    assert.equal(node(dump, 'h/keeps-old').links, undefined, 'the old src inode has one name left');
    assert.deepEqual(node(dump, 'h/sym').links, ['h/sym-link']);
    assert.equal(node(dump, 'h/sym').uid, 8);
    assert.equal(node(dump, 'h/sym').perm, '0777');
    assert.deepEqual(node(dump, 'h/wo').links, ['h/wo-link']);
    assert.equal(node(dump, 'h/wo').perm, '0640');
    assert.equal(node(dump, 'h/cap').xattrs['security.capability'], undefined, 'the link entry\'s lchown dropped the capability');
    assert.ok(node(dump, 'h/cap').xattrs['user.kept']);
    assert.equal(node(dump, 'h/cap').perm, '04755');
    assert.equal(node(dump, 'h/cap2').xattrs['security.capability'], CAP_NET_BIND_RAW.toString('hex'));
    assert.equal(node(dump, 'h/ids').uid, 6);
    assert.equal(node(dump, 'h/ids').gid, 7);
    assert.equal(node(dump, 'h/new-ids').uid, 0);
  });

  test('special files, modes and owners', async () => {
    const entries: Entry[] = [
      { type: 'fifo', path: 's/fifo', mode: 0o600 },
      { type: 'fifo', path: 's/fifo-suid', mode: 0o4644 },
      { type: 'char', path: 's/null', major: 1, minor: 3, mode: 0o666 },
      { type: 'char', path: 's/tty', major: 4, minor: 64, mode: 0o620, gid: 5 },
      { type: 'block', path: 's/loop7', major: 7, minor: 7, mode: 0o660, gid: 6 },
      { type: 'char', path: 's/big', major: 300, minor: 70000, mode: 0o600 },
      { type: 'block', path: 's/bigger', major: 4095, minor: 262143 },
      { type: 'char', path: 's/zero-dev', major: 0, minor: 0, mode: 0o644, uid: 1 },
      { type: 'file', path: 'm/suid', content: 'setuid\n', mode: 0o4755 },
      { type: 'file', path: 'm/sgid', content: 'setgid\n', mode: 0o2755, gid: 50 },
      { type: 'file', path: 'm/odd', content: 'odd\n', mode: 0o6511, uid: 2, gid: 3 },
      { type: 'file', path: 'm/sticky-file', content: 'sticky\n', mode: 0o1644 },
      { type: 'dir', path: 'm/sticky', mode: 0o1777 },
      { type: 'dir', path: 'm/sgid-dir', mode: 0o2775, gid: 100 },
      { type: 'file', path: 'm/sgid-dir/inside', content: 'in a setgid directory\n', gid: 7 },
      { type: 'file', path: 'm/mode-0000', content: 'no permissions\n', mode: 0o000 },
      { type: 'dir', path: 'm/dir-0000', mode: 0o000, uid: 12 },
      { type: 'file', path: 'm/high-ids', content: 'high\n', uid: 200000, gid: 200001 },
      { type: 'symlink', path: 'm/owned-symlink', target: 'high-ids', uid: 33, gid: 34, mode: 0o700 },
      { type: 'symlink', path: 'm/dangling', target: 'does/not/exist' },
      { type: 'symlink', path: 'm/abs', target: '/etc/passwd' },
    ];
    const big = new RawTar()
      .entry({ name: 'max-dev', typeflag: '3', devmajor: 4095, devminor: 1048575 })
      .entry({ name: 'fifo-with-dev', typeflag: '6', devmajor: 12, devminor: 34 })
      .finish();
    const { dump } = await same((await buildLayer(entries)).tar);
    assert.equal(node(dump, 's/big').rdev, '300:70000');
    assert.equal(node(dump, 'm/odd').perm, '06511');
    assert.equal(node(dump, 'm/owned-symlink').perm, '0777');
    assert.equal(node(dump, 'm/sgid-dir/inside').gid, 7);
    const { dump: d2 } = await same(big);
    assert.equal(node(d2, 'max-dev').rdev, '4095:1048575');
  });

  test('xattrs: capabilities (v2, v3), binary user.*, security.*, and the ones skipped with a warning', async () => {
    const tar = new RawTar()
      .paxEntry({ name: 'x/cap-v2', mode: 0o755 }, { xattrs: { 'security.capability': cap(2, 0xffffffff) } }, 'v2\n')
      .paxEntry({ name: 'x/cap-v3-root0', mode: 0o755 }, { xattrs: { 'security.capability': cap(3, 0x80000400, 0) } }, 'v3, root id 0: reads back as v2\n')
      .paxEntry({ name: 'x/cap-v3-noeff', mode: 0o755 }, { xattrs: { 'security.capability': cap(3, 0x400, 0, false) } }, 'v3 without the effective flag\n')
      .paxEntry({ name: 'x/cap-v3-root1000', mode: 0o755 }, { xattrs: { 'security.capability': cap(3, 0x400, 1000) } }, 'v3, root id 1000\n')
      .paxEntry({ name: 'x/cap-dir/', typeflag: '5' }, { xattrs: { 'security.capability': CAP_NET_BIND_RAW } })
      .paxEntry({ name: 'x/cap-symlink', typeflag: '2', linkname: 'cap-v2' }, { xattrs: { 'security.capability': CAP_NET_BIND_RAW } })
      .paxEntry({ name: 'x/user' }, { xattrs: { 'user.foo': 'bar', 'user.binary': Buffer.from([0xff, 0x00, 0x80, 0xfe]), 'user.empty': '' } }, 'user xattrs\n')
      .paxEntry({ name: 'x/security' }, { xattrs: { 'security.other': 'a value' } }, 'another security.* attribute\n')
      .paxEntry({ name: 'x/skipped' }, { xattrs: { 'trusted.from-archive': 'never applied', 'nonamespace': 'x', 'system.foo': 'y', 'user.after': 'set' } }, 'warnings\n')
      .paxEntry({ name: 'x/user-on-symlink', typeflag: '2', linkname: 'user' }, { xattrs: { 'user.s': 'x', 'security.ok': 'y' } })
      .paxEntry({ name: 'x/user-on-fifo', typeflag: '6' }, { xattrs: { 'user.f': 'x' } })
      .paxEntry({ name: 'x/user-on-dev', typeflag: '3', devmajor: 1, devminor: 5 }, { xattrs: { 'user.d': 'x' } })
      .paxEntry({ name: 'x/dir/', typeflag: '5', mode: 0o1777 }, { xattrs: { 'user.on-sticky-dir': 'root may' } })
      .paxEntry({ name: './', typeflag: '5' }, { xattrs: { 'user.root': 'the root entry is ignored' } })
      .finish();
    const { dump, warnings } = await same(tar);
    assert.equal(node(dump, 'x/cap-v2').xattrs['security.capability'], cap(2, 0xffffffff).toString('hex'));
    assert.equal(node(dump, 'x/cap-v3-root0').xattrs['security.capability'], cap(2, 0x80000400).toString('hex'));
    assert.equal(node(dump, 'x/cap-v3-root1000').xattrs['security.capability'], cap(3, 0x400, 1000).toString('hex'));
    assert.equal(node(dump, 'x/user').xattrs['user.binary'], 'ff0080fe');
    assert.deepEqual(Object.keys(node(dump, 'x/skipped').xattrs), ['user.after']);
    assert.equal(warnings.length, 6, warnings.join('\n'));
    assert.deepEqual(node(dump, '').xattrs, {});
  });

  test('POSIX ACLs: rewritten by chmod, minimal ones dropped, default ACLs inherited', async () => {
    const extended = acl([[UO, 7], [U, 6, 1000], [GO, 5], [G, 4, 50], [M, 7], [O, 4]]);
    const dflt = acl([[UO, 7], [U, 7, 2000], [GO, 5], [M, 5], [O, 0]]);
    const tar = new RawTar()
      .paxEntry({ name: 'a/extended', mode: 0o640 }, { xattrs: { 'system.posix_acl_access': extended } }, 'x\n')
      .paxEntry({ name: 'a/minimal', mode: 0o640 }, { xattrs: { 'system.posix_acl_access': acl([[UO, 7], [GO, 5], [O, 5]]) } }, 'x\n')
      .paxEntry({ name: 'a/unsorted', mode: 0o600 }, { xattrs: { 'system.posix_acl_access': acl([[UO, 7], [U, 6, 2000], [U, 4, 1000], [GO, 5], [M, 7], [O, 4]]) } }, 'x\n')
      .paxEntry({ name: 'a/empty-acl', mode: 0o600 }, { xattrs: { 'system.posix_acl_access': acl([]) } }, 'x\n')
      .paxEntry({ name: 'a/version-1', mode: 0o600 }, { xattrs: { 'system.posix_acl_access': Buffer.from([1, 0, 0, 0]) } }, 'x\n')
      .paxEntry({ name: 'a/on-symlink', typeflag: '2', linkname: 'extended' }, { xattrs: { 'system.posix_acl_access': extended } })
      .paxEntry({ name: 'a/invalid-on-symlink', typeflag: '2', linkname: 'extended' }, { xattrs: { 'system.posix_acl_access': acl([[UO, 7], [GO, 5]]) } })
      .paxEntry({ name: 'a/fifo', typeflag: '6', mode: 0o660 }, { xattrs: { 'system.posix_acl_access': extended } })
      .paxEntry({ name: 'd/', typeflag: '5', mode: 0o750 }, { xattrs: { 'system.posix_acl_default': dflt, 'system.posix_acl_access': extended } })
      .entry({ name: 'd/file', mode: 0o664 }, 'inherits\n')
      .entry({ name: 'd/dir/', typeflag: '5', mode: 0o700 })
      .entry({ name: 'd/implicit/file', mode: 0o600 }, 'in an unlisted directory\n')
      .entry({ name: 'd/fifo', typeflag: '6', mode: 0o644 })
      .entry({ name: 'd/null', typeflag: '3', devmajor: 1, devminor: 3, mode: 0o666 })
      .entry({ name: 'd/symlink', typeflag: '2', linkname: 'file' })
      .entry({ name: 'd/.wh.gone' })
      .entry({ name: 'd/dir/deeper', mode: 0o640 }, 'two levels down\n')
      .paxEntry({ name: 'm/', typeflag: '5', mode: 0o755 }, { xattrs: { 'system.posix_acl_default': acl([[UO, 7], [GO, 5], [O, 1]]) } })
      .entry({ name: 'm/file', mode: 0o666 }, 'a minimal default ACL\n')
      .entry({ name: 'm/.wh.w' })
      .finish();
    const { dump, warnings } = await same(tar);
    assert.ok(node(dump, 'a/extended').xattrs['system.posix_acl_access']);
    assert.equal(node(dump, 'a/minimal').xattrs['system.posix_acl_access'], undefined);
    assert.ok(node(dump, 'd/file').xattrs['system.posix_acl_access'], 'inherited from the default ACL');
    assert.ok(node(dump, 'd/dir').xattrs['system.posix_acl_default']);
    assert.ok(node(dump, 'd/dir/deeper').xattrs['system.posix_acl_access']);
    assert.equal(warnings.length, 3, warnings.join('\n'));
  });

  test('long, non-ASCII and deep names; GNU long names, ustar prefix, V7 headers, base-256 ids, PAX records', async () => {
    const LONG_A = `long-${'a'.repeat(190)}`;
    const LONG_B = `long-${'b'.repeat(200)}`;
    const DEEP = Array.from({ length: 60 }, (_, i) => `d${String(i).padStart(2, '0')}`).join('/');
    const entries: Entry[] = [
      { type: 'file', path: `n/${LONG_A}/${LONG_B}/leaf`, content: 'at the end of a long path\n' },
      { type: 'symlink', path: 'n/symlink-long-target', target: `${LONG_A}/${LONG_B}/leaf` },
      { type: 'hardlink', path: `n/${LONG_A}/hardlink-long-target`, target: `n/${LONG_A}/${LONG_B}/leaf` },
      { type: 'file', path: 'n/ünïcödé-ďíř/日本語のファイル名-😀.txt', content: 'ünïcödé ✓\n' },
      { type: 'symlink', path: 'n/symlink-nonascii', target: 'ünïcödé-ďíř/日本語のファイル名-😀.txt' },
      { type: 'file', path: `n/deep/${DEEP}/leaf`, content: 'sixty levels down\n' },
      { type: 'file', path: 'n/with space and \'quotes\' "double"', content: 'odd characters\n' },
      { type: 'file', path: `n/${'x'.repeat(255)}`, content: 'a name of 255 bytes\n' },
    ];
    const { dump } = await same((await buildLayer(entries)).tar);
    assert.ok(dump.has(`n/deep/${DEEP}/leaf`));
    const longName = `g/${'n'.repeat(150)}`;
    const longTarget = `g/${'t'.repeat(180)}`;
    const raw = new RawTar()
      .pax([['comment', 'a global header']], 'g')
      .entry({ name: './g/', typeflag: '5', mode: 0o755 })
      .gnuLong('L', longName)
      .entry({ name: longName.slice(0, 99), format: 'gnu', mode: 0o640, uid: 11 }, 'gnu long name\n')
      .gnuLong('K', longTarget)
      .entry({ name: 'g/symlink-long', typeflag: '2', format: 'gnu', linkname: 'ignored' })
      .gnuLong('K', longName)
      .entry({ name: 'g/hardlink-long', typeflag: '1', format: 'gnu', linkname: 'ignored', mode: 0o640, uid: 11 })
      .entry({ name: 'file-in-prefixed-dir', prefix: 'g/prefix/dir', mode: 0o600 }, 'ustar prefix\n')
      .entry({ name: 'g/base256-ids', format: 'gnu', uid: 3_000_000, gid: 4_000_000, base256Ids: true }, 'ids in base-256\n')
      .entry({ name: 'g/v7-dir/', typeflag: '\0', format: 'v7', mode: 0o751 })
      .entry({ name: 'g/v7-file', typeflag: '\0', format: 'v7', mode: 0o640, uid: 6 }, 'old V7 header\n')
      .entry({ name: 'g/dir//with/./dots/../cleaned', mode: 0o644 }, 'name cleaned like filepath.Clean\n')
      .entry({ name: 'g/hardlink-with-size', typeflag: '1', linkname: 'g/v7-file', mode: 0o640, uid: 6, sizeField: 12345 })
      .entry({ name: 'g/dir-with-size', typeflag: '5', mode: 0o755, sizeField: 700 })
      .entry({ name: 'g/later/f' }, 'child first\n')
      .entry({ name: 'g/later/', typeflag: '5', mode: 0o700, uid: 4 })
      .finish();
    const { dump: g } = await same(raw);
    assert.equal(node(g, 'g/hardlink-long').links?.[0], longName);
    assert.equal(node(g, 'g/later').perm, '0700');
  });

  test('the root entry changes nothing; unlisted parents are 0755 root:root', async () => {
    const tar = new RawTar()
      .entry({ name: './', typeflag: '5', mode: 0o700, uid: 42, gid: 43, mtime: 12345 })
      .entry({ name: 'keep/new-file' }, 'an unlisted parent\n')
      .entry({ name: 'a/b/c/d/e' }, 'four unlisted levels\n')
      .entry({ name: 'a/b/', typeflag: '5', mode: 0o711, uid: 3, mtime: 5000 })
      .entry({ name: 'a/b/c/sym', typeflag: '2', linkname: '../..' })
      .entry({ name: '.', typeflag: '5', mode: 0o777 })
      .finish();
    const { dump, applyTime } = await same(tar);
    assert.equal(node(dump, '').perm, '0755');
    assert.equal(node(dump, '').uid, 0);
    assert.equal(node(dump, 'keep').perm, '0755');
    assert.equal(node(dump, 'a/b').perm, '0711');
    assert.deepEqual(applyTime.sort(), ['', 'a', 'a/b/c', 'a/b/c/d', 'keep']);
  });

  test('file data in chunks: empty files, chunk-sized and larger files, input in odd pieces', async () => {
    const entries: Entry[] = [
      { type: 'file', path: 'f/empty', content: '' },
      { type: 'file', path: 'f/one', content: 'x' },
      { type: 'file', path: 'f/chunk', content: pseudoRandom(CHUNK, 'chunk') },
      { type: 'file', path: 'f/two-chunks', content: pseudoRandom(2 * CHUNK, 'two') },
      { type: 'file', path: 'f/three-and-a-bit', content: pseudoRandom(3 * CHUNK + 17, 'three') },
      { type: 'file', path: 'f/big', content: pseudoRandom((1 << 20) + 3, 'big') },
      { type: 'file', path: 'f/same-as-chunk', content: pseudoRandom(CHUNK, 'chunk') },
    ];
    const tar = (await buildLayer(entries)).tar;
    for (const piece of [7, 511, 4096, 100_000]) {
      const { dump, bytes } = await same(tar, { piece });
      assert.equal(node(dump, 'f/three-and-a-bit').size, 3 * CHUNK + 17);
      assert.equal(bytes, 1 + 4 * CHUNK + 3 * CHUNK + 17 + (1 << 20) + 3);
    }
  });

  test('times: fractions of a second, bounded times, atime', async () => {
    const tar = new RawTar()
      .paxEntry({ name: 't/frac' }, { records: [['mtime', '1704164645.123456789']] }, 'x')
      .paxEntry({ name: 't/frac-high' }, { records: [['mtime', '1704164645.999999999']] }, 'x')
      .paxEntry({ name: 't/frac-low' }, { records: [['mtime', '1704164645.0000001']] }, 'x')
      .paxEntry({ name: 't/frac-dir/', typeflag: '5' }, { records: [['mtime', '1234567890.5']] })
      .paxEntry({ name: 't/symlink', typeflag: '2', linkname: 'frac' }, { records: [['mtime', '1600000000.25']] })
      .paxEntry({ name: 't/negative' }, { records: [['mtime', '-5']] }, 'x')
      .paxEntry({ name: 't/past-2262' }, { records: [['mtime', '9999999999']] }, 'x')
      .paxEntry({ name: 't/atime-later' }, { records: [['atime', '2000000000'], ['mtime', '1000000000.75']] }, 'x')
      .entry({ name: 't/zero', mtime: 0 }, 'x')
      .paxEntry({ name: 't/longest-symlink', typeflag: '2' }, { records: [['linkpath', `${'t/'.repeat(2047)}x`]] })
      .finish();
    const { dump } = await same(tar);
    assert.equal(node(dump, 't/frac').mtime, '1704164645.123456000');
    assert.equal(node(dump, 't/negative').mtime, ZERO_TIME);
    assert.equal(node(dump, 't/frac-dir').mtime, '1234567890.500000000');
    assert.equal(node(dump, 't/symlink').mtime, '1600000000.250000000');
  });

  test('the test images of the other suites (busybox, torture, chain layers)', async () => {
    const layers = [...busyboxImageDef().layers, ...tortureImageDef().layers, ...chainImageDef().layers.slice(1, 12)];
    let compared = 0;
    for (const entries of layers) {
      await same((await buildLayer(entries)).tar, { piece: 65_536 });
      compared++;
    }
    assert.ok(compared >= 10, `${compared} layers`);
  });
});

describe('treeFromTar refuses what applyLayerTar refuses, with the same error', () => {
  const file = (name: string, body = 'evil\n') => (name.length > 100 ? new RawTar().paxEntry({ name }, {}, body) : new RawTar().entry({ name }, body));

  test('names climbing out or absolute', async () => {
    const e = await sameRefusal(file('../x').finish(), /^layer entry "\.\.\/x": entry name "\.\.\/x" climbs out of the layer directory/);
    assert.equal(e.kind, 'InvalidArgument');
    assert.equal(e.entry, '../x');
    await sameRefusal(new RawTar().entry({ name: 'a/', typeflag: '5' }).entry({ name: 'a/../../outside/secret' }, 'x').finish(), /climbs out/);
    await sameRefusal(file('/x').finish(), /layer entry "\/x": entry name "\/x" is absolute/);
    await sameRefusal(file('/').finish(), /is absolute/);
  });

  test('a symlink made by an earlier entry is never written through', async () => {
    for (const second of ['a/secret', 'a/sub/deeper', 'a/.wh.secret', 'a/.wh..wh..opq']) {
      await sameRefusal(new RawTar().entry({ name: 'a', typeflag: '2', linkname: '/etc' }).entry({ name: second }, '').finish(), /parent "a" is a symlink \(-> "\/etc"\) made by an earlier entry: refusing to write through it/);
    }
    await sameRefusal(new RawTar().entry({ name: 'a', typeflag: '2', linkname: '../outside' }).entry({ name: 'a/dir/', typeflag: '5' }).finish(), /parent "a" is a symlink/);
    await sameRefusal(new RawTar().entry({ name: 'd/', typeflag: '5' }).entry({ name: 'd/x' }, 'x').entry({ name: 'd', typeflag: '2', linkname: '/tmp' }).entry({ name: 'd/x' }, 'y').finish(), /layer entry "d\/x": parent "d" is a symlink/);
    await sameRefusal(new RawTar().entry({ name: 'f' }, 'x').entry({ name: 'f/child' }, 'y').finish(), /parent "f" is not a directory \(an earlier entry made it a regular file\)/);
    await sameRefusal(new RawTar().entry({ name: '.wh.w' }).entry({ name: 'w/child' }, 'y').finish(), /parent "w" is not a directory \(an earlier entry made it a whiteout \(char device 0\/0\)\)/);
    await sameRefusal(new RawTar().entry({ name: 'p', typeflag: '6' }).entry({ name: 'p/child' }, 'y').finish(), /made it a fifo/);
  });

  test('hardlinks: outside, through a symlink, missing, to itself, to a directory, to a target the entry removes', async () => {
    await sameRefusal(new RawTar().entry({ name: 'l', typeflag: '1', linkname: '../outside/secret' }).finish(), /layer entry "l": hardlink target "\.\.\/outside\/secret" climbs out/);
    await sameRefusal(new RawTar().entry({ name: 'l', typeflag: '1', linkname: '/etc/passwd' }).finish(), /is absolute/);
    await sameRefusal(new RawTar().entry({ name: 'l', typeflag: '1', linkname: '.' }).finish(), /the target is the layer root/);
    await sameRefusal(new RawTar().entry({ name: 'a', typeflag: '2', linkname: '/etc' }).entry({ name: 'l', typeflag: '1', linkname: 'a/passwd' }).finish(), /hardlink to "a\/passwd": the target's path goes through "a" is a symlink, not a directory/);
    await sameRefusal(new RawTar().entry({ name: 'f' }, 'x').entry({ name: 'l', typeflag: '1', linkname: 'f/x' }).finish(), /goes through "f" is a regular file/);
    await sameRefusal(new RawTar().entry({ name: 'present' }, 'x').entry({ name: 'dir/link', typeflag: '1', linkname: 'missing/target' }).finish(), /layer entry "dir\/link": hardlink to "missing\/target": the target does not exist/);
    await sameRefusal(new RawTar().entry({ name: 'self', typeflag: '1', linkname: './self' }).finish(), /the target is the entry itself/);
    await sameRefusal(new RawTar().entry({ name: 'd/', typeflag: '5' }).entry({ name: 'l', typeflag: '1', linkname: 'd' }).finish(), /hardlink to "d": the target is a directory/);
    await sameRefusal(new RawTar().entry({ name: 'd/', typeflag: '5' }).entry({ name: 'd/f' }, 'x').entry({ name: 'd', typeflag: '1', linkname: 'd/f' }).finish(), /hardlink to "d\/f": the target was removed by this entry/);
  });

  test('bad whiteouts, sparse and unsupported types, names that are not UTF-8, truncated archives', async () => {
    for (const name of ['.wh.', 'sub/.wh..', 'sub/.wh...']) await sameRefusal(file(name, '').finish(), /invalid whiteout name/);
    await sameRefusal(new RawTar().entry({ name: 'sparse', typeflag: 'S' }).finish(), /layer entry "sparse": GNU sparse files are not supported/);
    await sameRefusal(new RawTar().entry({ name: 'contiguous', typeflag: '7' }, 'x').finish(), /unsupported tar entry type "7"/);
    await sameRefusal(new RawTar().pax([['GNU.sparse.major', '1']]).entry({ name: 'pax-sparse' }, 'x').finish(), /sparse files/);
    await sameRefusal(new RawTar().entry({ name: Buffer.from([0x61, 0xff, 0x62]) }, 'x').finish(), /entry name is not valid UTF-8/);
    const good = new RawTar().entry({ name: 'a' }, 'x'.repeat(5000)).entry({ name: 'b' }, 'y').finish();
    await sameRefusal(good.subarray(0, 1500), /layer entry "a": unexpected end of archive in entry data/);
    await sameRefusal(good.subarray(0, 5632 + 100), /after entry "a".*unexpected end of archive/);
    await sameRefusal(Buffer.from('this is not a tar archive at all'.repeat(40)), /at the start of the archive.*checksum mismatch/);
  });

  test('a directory whose path a later entry removes', async () => {
    await sameRefusal(new RawTar().entry({ name: 'p/', typeflag: '5' }).entry({ name: 'p/sub/', typeflag: '5' }).entry({ name: 'p' }, 'a file').finish(), /^layer entry "p\/sub\/": the directory no longer exists at the end of the layer/, { syscall: 'ENOTDIR' });
    await sameRefusal(new RawTar().entry({ name: 'q/', typeflag: '5' }).entry({ name: 'q', typeflag: '2', linkname: 'dangling' }).finish(), /^layer entry "q\/": the directory no longer exists/, { syscall: 'ENOENT' });
    await sameRefusal(new RawTar().entry({ name: 'w/', typeflag: '5' }).entry({ name: 'w/in/', typeflag: '5' }).entry({ name: '.wh.w' }).finish(), /^layer entry "w\/in\/": the directory no longer exists/, { syscall: 'ENOTDIR' });
    await sameRefusal(new RawTar().entry({ name: 'loop/', typeflag: '5' }).entry({ name: 'loop', typeflag: '2', linkname: 'loop' }).finish(), /^layer entry "loop\/": setting the directory's times: too many links/, { syscall: 'too many links resolving "loop" in ' });
  });

  test('what the kernel refuses: long names, empty symlink targets, device numbers, xattr names and values, capabilities, ACLs', async () => {
    await sameRefusal(file(`${'n'.repeat(256)}`).finish(), /ENAMETOOLONG/, { syscall: 'ENAMETOOLONG' });
    await sameRefusal(file(`${'n'.repeat(256)}/child`).finish(), /ENAMETOOLONG/, { syscall: 'ENAMETOOLONG' });
    await sameRefusal(new RawTar().entry({ name: 's', typeflag: '2', linkname: '' }).finish(), /ENOENT/, { syscall: 'ENOENT' });
    await sameRefusal(new RawTar().entry({ name: 'dev', typeflag: '3', devmajor: 4096, devminor: 0 }).finish(), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(new RawTar().entry({ name: 'dev', typeflag: '4', devmajor: 1, devminor: 1 << 20 }).finish(), /EINVAL/, { syscall: 'EINVAL' });
    const x = (xattrs: Record<string, Buffer | string>) => new RawTar().paxEntry({ name: 'f' }, { xattrs }, 'x').finish();
    await sameRefusal(x({ 'user.': 'x' }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(x({ [`user.${'l'.repeat(251)}`]: 'x' }), /ERANGE/, { syscall: 'ERANGE' });
    await sameRefusal(x({ 'security.capability': Buffer.from([1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]) }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(x({ 'security.capability': cap(2, 1).subarray(0, 19) }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(x({ 'security.capability': '' }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(x({ 'user.huge': Buffer.alloc(65537, 1) }), /E2BIG/, { syscall: 'E2BIG' });
    await sameRefusal(x({ 'system.posix_acl_default': acl([[UO, 7], [GO, 5], [O, 5]]) }), /EACCES/, { syscall: 'EACCES' });
    await sameRefusal(x({ 'system.posix_acl_access': acl([[UO, 7], [U, 7, 5], [GO, 5], [O, 5]]) }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(x({ 'system.posix_acl_access': acl([[UO, 7], [GO, 5]]) }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(x({ 'system.posix_acl_access': acl([[UO, 7], [GO, 5], [O, 5], [O, 5]]) }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(x({ 'system.posix_acl_access': acl([[UO, 9], [GO, 5], [O, 5]]) }), /EINVAL/, { syscall: 'EINVAL' });
    await sameRefusal(new RawTar().paxEntry({ name: 's', typeflag: '2' }, { records: [['linkpath', 't'.repeat(4096)]] }).finish(), /ENAMETOOLONG/, { syscall: 'ENAMETOOLONG' });
  });

  test('on failure the input stops being read', async () => {
    const tar = new RawTar().entry({ name: 'ok' }, 'x').entry({ name: '../x' }, 'y').entry({ name: 'more' }, 'z'.repeat(100_000)).finish();
    let returned = false;
    let read = 0;
    const input: AsyncIterable<Buffer> = {
      [Symbol.asyncIterator]() {
        const it = pieces(tar, 512);
        return {
          next: async () => {
            const r = await it.next();
            if (!r.done) read += r.value.length;
            return r;
          },
          return: async () => {
            returned = true;
            return { done: true, value: undefined };
          },
        };
      },
    };
    await assert.rejects(treeFromTar(input, new RecordingSink(CHUNK)), /climbs out/);
    assert.ok(returned, 'the input iterator was closed');
    assert.ok(read < 10_000, `${read} bytes read`);
  });
});


