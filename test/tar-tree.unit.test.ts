/**
 * treeFromTar without root and without a file system: the tree's shape and
 * attributes for small layers, streaming of file data into the sink, the
 * counts, warnings and refusals with their exact messages, and the shared
 * rules of layer-rules.ts. (test/tar-tree.test.ts compares the tree with
 * what applyLayerTar writes to disk, as root.)
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { type ChunkSink, type TreeNode, nameKey, pieceBytes, sinkFileData } from '../src/convert/layer-tree';
import { LayerTarError, cleanName, entryTimes, lutimesTimespec, resolveInRoot, whiteoutOf } from '../src/convert/layer-rules';
import { treeFromTar } from '../src/convert/tar-tree';
import type { TarHeader } from '../src/convert/tar-reader';
import { pseudoRandom } from './helpers/images';
import { RAW_MTIME, RawTar } from './helpers/raw-tar';
import { RecordingSink, dumpTree } from './helpers/tree-dump';

async function* pieces(tar: Buffer, size: number): AsyncGenerator<Buffer> {
  for (let o = 0; o < tar.length; o += size) yield tar.subarray(o, o + size);
}

async function tree(tar: Buffer, chunk = 4096) {
  const sink = new RecordingSink(chunk);
  const warnings: string[] = [];
  const r = await treeFromTar(pieces(tar, 1000), sink, { onWarning: (m) => warnings.push(m) });
  return { ...r, sink, warnings };
}

function at(root: TreeNode, p: string): TreeNode {
  let n = root;
  for (const c of p.split('/')) {
    const next = n.children?.get(nameKey(c));
    assert.ok(next, `${p}: no ${c}`);
    n = next;
  }
  return n;
}

async function refusal(tar: Buffer, sink: ChunkSink = new RecordingSink(4096)): Promise<LayerTarError> {
  try {
    await treeFromTar(pieces(tar, 512), sink);
  } catch (err) {
    assert.ok(err instanceof LayerTarError, String(err));
    return err;
  }
  assert.fail('the layer was accepted');
}

describe('treeFromTar', () => {
  test('a small layer: kinds, attributes, counts, the root untouched by "./"', async () => {
    const tar = new RawTar()
      .entry({ name: './', typeflag: '5', mode: 0o700, uid: 42, mtime: 99 })
      .entry({ name: 'etc/', typeflag: '5', mode: 0o750, uid: 1, gid: 2, mtime: 1000 })
      .entry({ name: 'etc/passwd', mode: 0o644, uid: 3, gid: 4, mtime: 2000 }, 'root:x:0:0\n')
      .entry({ name: 'etc/link', typeflag: '1', linkname: 'etc/passwd', mode: 0o600, uid: 5, gid: 6, mtime: 3000 })
      .entry({ name: 'etc/sym', typeflag: '2', linkname: 'passwd', mode: 0o700, uid: 7 })
      .entry({ name: 'dev/null', typeflag: '3', devmajor: 1, devminor: 3, mode: 0o666 })
      .entry({ name: 'dev/sda', typeflag: '4', devmajor: 8, devminor: 0, mode: 0o660 })
      .entry({ name: 'run/fifo', typeflag: '6', mode: 0o620, devmajor: 5, devminor: 6 })
      .entry({ name: 'etc/.wh.shadow', uid: 8, gid: 9 })
      .entry({ name: 'opq/.wh..wh..opq' })
      .finish();
    const { root, files, bytes, sink } = await tree(tar);
    assert.deepEqual({ kind: root.kind, perm: root.perm, uid: root.uid, gid: root.gid, t: root.mtimeSec, x: root.xattrs.size }, { kind: 'dir', perm: 0o755, uid: 0, gid: 0, t: 0, x: 0 });
    assert.equal(files, 9, 'every entry but the root');
    assert.equal(bytes, 11);
    const etc = at(root, 'etc');
    assert.deepEqual([etc.perm, etc.uid, etc.gid, etc.mtimeSec], [0o750, 1, 2, 1000]);
    const passwd = at(root, 'etc/passwd');
    assert.equal(passwd, at(root, 'etc/link'), 'a hardlink is the same node');
    assert.deepEqual([passwd.perm, passwd.uid, passwd.gid, passwd.mtimeSec], [0o600, 5, 6, 3000], 'the link header owns the inode');
    assert.equal(sink.content(passwd, 'etc/passwd').toString(), 'root:x:0:0\n');
    const sym = at(root, 'etc/sym');
    assert.deepEqual([sym.kind, sym.perm, sym.uid, sym.target?.toString()], ['symlink', 0o777, 7, 'passwd']);
    assert.deepEqual([at(root, 'dev/null').kind, at(root, 'dev/null').rdevMajor, at(root, 'dev/null').rdevMinor], ['chr', 1, 3]);
    assert.deepEqual([at(root, 'dev/sda').kind, at(root, 'dev/sda').rdevMajor], ['blk', 8]);
    const fifo = at(root, 'run/fifo');
    assert.deepEqual([fifo.kind, fifo.perm, fifo.rdevMajor], ['fifo', 0o620, undefined]);
    const run = at(root, 'run');
    assert.deepEqual([run.perm, run.uid, run.mtimeSec], [0o755, 0, 0], 'an unlisted parent');
    const wh = at(root, 'etc/shadow');
    assert.deepEqual([wh.kind, wh.rdevMajor, wh.rdevMinor, wh.perm, wh.uid, wh.gid, wh.mtimeSec], ['chr', 0, 0, 0, 8, 9, 0]);
    assert.equal(at(root, 'opq').xattrs.get('trusted.overlay.opaque')?.toString(), 'y');
    assert.equal(dumpTree(root, sink).size, 12);
  });

  test('file data goes to the sink in chunkSize pieces while the tar streams', async () => {
    const data = pseudoRandom(64 * 1024 + 5, 'unit-stream');
    const tar = new RawTar().entry({ name: 'big' }, data).entry({ name: 'empty' }, '').entry({ name: 'small' }, 'abc').finish();
    let read = 0;
    const readAtAdd: number[] = [];
    const sizes: number[] = [];
    const sink: ChunkSink = {
      chunkSize: 8192,
      async add(piece) {
        readAtAdd.push(read);
        sizes.push(pieceBytes(piece).length);
        return sizes.length - 1;
      },
    };
    async function* input() {
      for await (const p of pieces(tar, 512)) {
        read += p.length;
        yield p;
      }
    }
    const r = await treeFromTar(input(), sink);
    assert.deepEqual(sizes, [...Array(8).fill(8192), 5, 3]);
    // Each chunk is handed over as soon as its bytes (and at most one more input piece) are in.
    for (let i = 0; i < 8; i++) assert.ok(readAtAdd[i] <= 512 + (i + 1) * 8192 + 512, `chunk ${i} added after ${readAtAdd[i]} bytes were read`);
    assert.deepEqual(at(r.root, 'big').chunks, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert.equal(at(r.root, 'big').size, data.length);
    assert.deepEqual([at(r.root, 'empty').size, at(r.root, 'empty').chunks], [0, []]);
    assert.deepEqual(at(r.root, 'small').chunks, [9]);
    assert.equal(r.bytes, data.length + 3);
  });

  test('sinkFileData hands pieces on as views of the input (no copy); a piece of many small inputs is joined', async () => {
    const data = pseudoRandom(3 * 8192 + 100, 'unit-views');
    const got: { parts: number; bytes: Buffer; views: boolean }[] = [];
    const inputs: Buffer[] = [];
    const sink: ChunkSink = {
      chunkSize: 8192,
      async add(piece) {
        const parts = Buffer.isBuffer(piece) ? [piece] : piece;
        got.push({ parts: parts.length, bytes: Buffer.from(pieceBytes(piece)), views: parts.every((p) => inputs.some((i) => i.buffer === p.buffer)) });
        return got.length - 1;
      },
    };
    // Inputs of 5000 bytes: pieces straddle them (two or three parts), each part a view of an input.
    async function* fives() {
      for (let o = 0; o < data.length; o += 5000) {
        const b = Buffer.from(data.subarray(o, o + 5000));
        inputs.push(b);
        yield b;
      }
    }
    assert.deepEqual(await sinkFileData(sink, fives(), data.length, 'f'), [0, 1, 2, 3]);
    assert.deepEqual(Buffer.concat(got.map((g) => g.bytes)), data);
    assert.deepEqual(got.map((g) => g.parts), [2, 3, 2, 1]);
    assert.ok(got.every((g) => g.views), 'no part is a copy');
    // Inputs of 10 bytes: at most 64 parts a piece (one writev stays within the kernel's iovec limit).
    got.length = 0;
    async function* tens() {
      for (let o = 0; o < data.length; o += 10) yield Buffer.from(data.subarray(o, o + 10));
    }
    await sinkFileData(sink, tens(), data.length, 'f');
    assert.deepEqual(Buffer.concat(got.map((g) => g.bytes)), data);
    assert.ok(got.every((g) => g.parts <= 64), `parts per piece: ${got.map((g) => g.parts)}`);
    await assert.rejects(sinkFileData(sink, tens(), data.length - 1, 'f'), /f: more data than its size/);
  });

  test('replacements: a later entry replaces the earlier node, a directory over a directory keeps its children and xattrs', async () => {
    const tar = new RawTar()
      .paxEntry({ name: 'd/', typeflag: '5', mode: 0o755 }, { xattrs: { 'user.a': '1' } })
      .entry({ name: 'd/child' }, 'c')
      .paxEntry({ name: 'd/', typeflag: '5', mode: 0o700, uid: 9 }, { xattrs: { 'user.b': '2' } })
      .entry({ name: 'f' }, 'first')
      .entry({ name: 'keep', typeflag: '1', linkname: 'f' })
      .entry({ name: 'f' }, 'second')
      .entry({ name: 'x/', typeflag: '5' })
      .entry({ name: 'x/y' }, 'y')
      .entry({ name: '.wh.x' })
      .finish();
    const { root, sink } = await tree(tar);
    const d = at(root, 'd');
    assert.deepEqual([d.perm, d.uid, [...d.xattrs.keys()].sort(), [...(d.children?.keys() ?? [])]], [0o700, 9, ['user.a', 'user.b'], ['child']]);
    assert.equal(sink.content(at(root, 'keep'), 'keep').toString(), 'first');
    assert.equal(sink.content(at(root, 'f'), 'f').toString(), 'second');
    assert.notEqual(at(root, 'keep'), at(root, 'f'));
    assert.deepEqual([at(root, 'x').kind, at(root, 'x').children], ['chr', undefined]);
  });

  test('xattrs: trusted.* and unknown namespaces skipped with untar\'s warnings; capabilities as the kernel reads them back; lchown drops them', async () => {
    const v3 = Buffer.alloc(24);
    v3.writeUInt32LE(0x03000001, 0);
    v3.writeUInt32LE(0x400, 4);
    const tar = new RawTar()
      .paxEntry({ name: 'f' }, { xattrs: { 'trusted.t': 'x', 'user.u': Buffer.from([0xff, 0]), 'other.o': 'x', 'security.capability': v3 } }, 'f')
      .paxEntry({ name: 's', typeflag: '2', linkname: 'f' }, { xattrs: { 'user.u': 'x', 'security.selinux': 'ctx' } })
      .entry({ name: 'g' }, 'g')
      .finish();
    const { root, warnings } = await tree(tar);
    const f = at(root, 'f');
    assert.deepEqual([...f.xattrs.keys()].sort(), ['security.capability', 'user.u']);
    const v2 = f.xattrs.get('security.capability') as Buffer;
    assert.equal(v2.length, 20);
    assert.equal(v2.readUInt32LE(0), 0x02000001);
    assert.equal(v2.readUInt32LE(4), 0x400);
    assert.deepEqual([...at(root, 's').xattrs.keys()], ['security.selinux']);
    assert.deepEqual(warnings, [
      'layer entry "f": xattr trusted.t ignored (trusted.* attributes from an archive are not applied, as containerd does)',
      'layer entry "f": xattr other.o ignored: ENOTSUP',
      'layer entry "s": xattr user.u ignored (user.* attributes only exist on files and directories)',
    ]);
    const dropped = await tree(new RawTar().paxEntry({ name: 'c' }, { xattrs: { 'security.capability': v3 } }, 'c').entry({ name: 'l', typeflag: '1', linkname: 'c' }).finish());
    assert.equal(at(dropped.root, 'c').xattrs.size, 0, 'the hardlink entry\'s lchown dropped the capability');
  });

  test('POSIX ACLs: chmod rewrites the owner, mask and other entries; a directory\'s default ACL is inherited', async () => {
    const acl = (e: [number, number, number?][]) => {
      const b = Buffer.alloc(4 + 8 * e.length);
      b.writeUInt32LE(2, 0);
      e.forEach(([tag, perm, id], i) => {
        b.writeUInt16LE(tag, 4 + 8 * i);
        b.writeUInt16LE(perm, 6 + 8 * i);
        b.writeUInt32LE(id ?? 0xffffffff, 8 + 8 * i);
      });
      return b;
    };
    const tar = new RawTar()
      .paxEntry({ name: 'f', mode: 0o640 }, { xattrs: { 'system.posix_acl_access': acl([[1, 7], [2, 7, 1000], [4, 7], [0x10, 7], [0x20, 7]]) } }, 'f')
      .paxEntry({ name: 'd/', typeflag: '5', mode: 0o755 }, { xattrs: { 'system.posix_acl_default': acl([[1, 7], [2, 5, 1000], [4, 5], [0x10, 5], [0x20, 5]]) } })
      .entry({ name: 'd/g', mode: 0o600 }, 'g')
      .finish();
    const { root } = await tree(tar);
    assert.deepEqual(at(root, 'f').xattrs.get('system.posix_acl_access'), acl([[1, 6], [2, 7, 1000], [4, 7], [0x10, 4], [0x20, 0]]));
    assert.deepEqual(at(root, 'd/g').xattrs.get('system.posix_acl_access'), acl([[1, 6], [2, 5, 1000], [4, 5], [0x10, 0], [0x20, 0]]));
    assert.equal(at(root, 'd/g').perm, 0o600);
  });

  test('refusals name the entry, with the messages applyLayerTar gives', async () => {
    const cases: [RawTar, string, string][] = [
      [new RawTar().entry({ name: '../x' }, 'x'), 'InvalidArgument', 'layer entry "../x": entry name "../x" climbs out of the layer directory with "..": refusing'],
      [new RawTar().entry({ name: '/etc/passwd' }, 'x'), 'InvalidArgument', 'layer entry "/etc/passwd": entry name "/etc/passwd" is absolute: refusing to write outside the layer directory'],
      [new RawTar().entry({ name: 'a', typeflag: '2', linkname: '/etc' }).entry({ name: 'a/passwd' }, 'x'), 'InvalidArgument', 'layer entry "a/passwd": parent "a" is a symlink (-> "/etc") made by an earlier entry: refusing to write through it'],
      [new RawTar().entry({ name: 'l', typeflag: '1', linkname: 'nope' }), 'InvalidArgument', 'layer entry "l": hardlink to "nope": the target does not exist (a hardlink must name an earlier entry of the same layer)'],
      [new RawTar().entry({ name: 'sub/.wh..' }), 'InvalidArgument', 'layer entry "sub/.wh..": invalid whiteout name ".wh.."'],
      [new RawTar().entry({ name: 'sp', typeflag: 'S' }), 'InvalidArgument', 'layer entry "sp": GNU sparse files are not supported'],
      [new RawTar().entry({ name: 'p/', typeflag: '5' }).entry({ name: 'p/s/', typeflag: '5' }).entry({ name: 'p' }, 'x'), 'InvalidArgument', 'layer entry "p/s/": the directory no longer exists at the end of the layer (a later entry replaced it or a parent; containerd refuses such a layer too): ENOTDIR: not a directory, p/s'],
      [new RawTar().entry({ name: 'dev', typeflag: '3', devmajor: 4096 }), 'Internal', 'layer entry "dev": mknod 4096:0 (beyond 12-bit major, 20-bit minor): EINVAL'],
    ];
    for (const [t, kind, message] of cases) {
      const e = await refusal(t.finish());
      assert.equal(e.message, message);
      assert.equal(e.kind, kind);
      assert.ok(e.entry && message.startsWith(`layer entry ${JSON.stringify(e.entry)}`));
    }
  });

  test('a failing sink or input fails the layer naming where', async () => {
    const tar = new RawTar().entry({ name: 'a' }, 'x').entry({ name: 'b' }, 'y').finish();
    const broken: ChunkSink = {
      chunkSize: 4096,
      add: async () => {
        throw new Error('store full');
      },
    };
    const e = await refusal(tar, broken);
    assert.deepEqual([e.kind, e.entry, e.message], ['Internal', 'a', 'layer entry "a": store full']);
    async function* failing() {
      yield tar.subarray(0, 1024);
      throw new Error('connection reset');
    }
    await assert.rejects(treeFromTar(failing(), new RecordingSink(4096)), (err: LayerTarError) => {
      assert.equal(err.kind, 'Internal');
      assert.equal(err.message, 'reading the layer blob after entry "a": connection reset');
      return true;
    });
    const empty = await treeFromTar(pieces(Buffer.alloc(0), 1), new RecordingSink(4096));
    assert.deepEqual([empty.files, empty.bytes, empty.root.children?.size], [0, 0, 0]);
  });
});

describe('layer-rules', () => {
  test('lutimesTimespec is what Node\'s lutimes sets: microseconds, through a double', () => {
    assert.deepEqual(lutimesTimespec(1704164645.123456789), { sec: 1704164645, nsec: 123456000 });
    assert.deepEqual(lutimesTimespec(0), { sec: 0, nsec: 0 });
    assert.deepEqual(lutimesTimespec(RAW_MTIME), { sec: RAW_MTIME, nsec: 0 });
    assert.deepEqual(lutimesTimespec(1.5), { sec: 1, nsec: 500000000 });
  });

  test('entryTimes bounds times as archive.boundTime and takes the later of atime and mtime for atime', () => {
    const h = (mtime: number, atime?: number) => ({ mtime, atime }) as TarHeader;
    assert.deepEqual(entryTimes(h(-1)), { atime: 0, mtime: 0 });
    assert.deepEqual(entryTimes(h(9223372037)), { atime: 0, mtime: 0 });
    assert.deepEqual(entryTimes(h(100, 200)), { atime: 200, mtime: 100 });
    assert.deepEqual(entryTimes(h(100, 50)), { atime: 100, mtime: 100 });
  });

  test('cleanName and whiteoutOf', () => {
    assert.deepEqual(cleanName('./a//b/./c/../d/', 'x'), ['a', 'b', 'd']);
    assert.deepEqual(cleanName('./', 'x'), []);
    assert.throws(() => cleanName('a/../../b', 'x'), /climbs out/);
    assert.throws(() => cleanName('', 'entry name'), /entry name is empty/);
    assert.deepEqual(whiteoutOf('.wh..wh..opq'), { opaque: true });
    assert.deepEqual(whiteoutOf('.wh.x'), { opaque: false, name: 'x' });
    assert.equal(whiteoutOf('.wh'), null);
    assert.throws(() => whiteoutOf('.wh...'), /invalid whiteout name/);
  });

  test('resolveInRoot follows symlinks inside the root (continuity\'s RootPath)', () => {
    const links: Record<string, string> = { '/a': 'b/c', '/b': '/real', '/up': '../../..', '/loop': 'loop', '/abs': '/etc/passwd' };
    const linkAt = (rel: string) => links[rel] ?? null;
    assert.equal(resolveInRoot('a/x', linkAt, 'root'), '/real/c/x');
    assert.equal(resolveInRoot('up/x', linkAt, 'root'), '/x');
    assert.equal(resolveInRoot('abs', linkAt, 'root'), '/etc/passwd');
    assert.equal(resolveInRoot('plain/../x', linkAt, 'root'), '/x');
    assert.throws(() => resolveInRoot('loop', linkAt, 'root'), /too many links resolving "loop" in root/);
  });
});
