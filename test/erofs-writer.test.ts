/**
 * The project's own EROFS writer (src/convert/erofs-writer.ts) against the
 * real tools and kernel: a tricky directory (every file type, hardlinks,
 * xattrs incl. security.capability and overlay's opaque marker, a
 * whiteout, setuid bits, long and unicode names, a 600-entry directory, a
 * 3000-byte symlink target, a 100-level path, files of several chunks) is
 * walked into a tree, written as an image whose chunks live in a separate
 * blob, checked by fsck.erofs (1.5, and 1.8 where fetch.sh unpacked it),
 * mounted by the kernel with the blob as its extra device, and compared
 * with the source in everything a container sees, mtimes included.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { mount, umount2 } from '../native/mount';
import { mknod, S_IFBLK, S_IFCHR } from '../native/mknod';
import { setXattr } from '../native/xattr';
import { scanChunks } from '../src/convert/erofs-format';
import { writeErofsImage } from '../src/convert/erofs-writer';
import { type ChunkSink, type Piece, pieceBytes, treeFromDirectory } from '../src/convert/layer-tree';
import { newerErofsUtilsDir } from './helpers/containerd-builds';
import { scratchDirs } from './helpers/daemon';
import { pseudoRandom } from './helpers/images';
import { diffTrees, walkTree } from './helpers/trees';

const workDir = scratchDirs();

/** A sink writing each distinct chunk once into a blob file (block-padded), as the store does. */
class BlobSink implements ChunkSink {
  readonly addrs: number[] = [];
  private readonly byDigest = new Map<string, number>();
  blocks = 0;
  added = 0;
  private readonly fd: number;
  constructor(
    readonly chunkSize: number,
    readonly file: string,
  ) {
    this.fd = fs.openSync(file, 'w');
  }
  async add(parts: Piece): Promise<number> {
    const piece = pieceBytes(parts);
    this.added++;
    const nb = Math.ceil(piece.length / 4096);
    const padded = Buffer.alloc(nb * 4096);
    piece.copy(padded);
    const d = crypto.createHash('sha256').update(padded).digest('hex');
    const seen = this.byDigest.get(d);
    if (seen !== undefined) return seen;
    fs.writeSync(this.fd, padded, 0, padded.length, this.blocks * 4096);
    this.addrs.push(this.blocks);
    this.blocks += nb;
    this.byDigest.set(d, this.addrs.length - 1);
    return this.addrs.length - 1;
  }
  close(): void {
    fs.closeSync(this.fd);
  }
}

function makeTrickyTree(dir: string): void {
  const p = (...s: string[]) => path.join(dir, ...s);
  fs.mkdirSync(p('a/b/c'), { recursive: true });
  fs.writeFileSync(p('a/hello'), 'hello\n');
  fs.linkSync(p('a/hello'), p('a/hardlink'));
  fs.linkSync(p('a/hello'), p('hardlink-at-top'));
  fs.symlinkSync('hello', p('a/sym'));
  fs.symlinkSync('t'.repeat(3000), p('longsym'));
  mknod(p('cdev'), S_IFCHR | 0o600, 4, 5);
  mknod(p('bdev'), S_IFBLK | 0o640, 259, 70000);
  mknod(p('whiteout'), S_IFCHR, 0, 0);
  execFileSync('mkfifo', [p('fifo')]);
  fs.writeFileSync(p('empty'), '');
  const big = pseudoRandom(5_000_000, 'writer-big');
  fs.writeFileSync(p('big'), big);
  fs.writeFileSync(p('big-copy'), big);
  fs.writeFileSync(p('exactly-one-chunk'), pseudoRandom(1 << 20, 'writer-one'));
  fs.writeFileSync(p('odd'), pseudoRandom(4097, 'writer-odd'));
  setXattr(p('a/hello'), 'user.foo', 'bar');
  setXattr(p('a/hello'), 'security.capability', Buffer.from('0100000200200000000000000000000000000000', 'hex'));
  setXattr(p('a/b'), 'trusted.overlay.opaque', 'y');
  setXattr(p('a'), 'user.big', Buffer.alloc(2000, 0x76));
  setXattr(p('a/sym'), 'trusted.on-a-symlink', '1');
  fs.chmodSync(p('a/hello'), 0o4755);
  fs.chmodSync(p('a/b'), 0o2775);
  fs.chmodSync(p('a/b/c'), 0o1777);
  fs.lchownSync(p('odd'), 1234, 5678);
  for (let i = 0; i < 600; i++) fs.writeFileSync(p('a/b/c', `file-with-a-long-name-number-${i}-ünïcødé-文件`), i % 7 === 0 ? `content ${i}` : '');
  fs.writeFileSync(p('n'.repeat(255)), 'long name');
  let deep = p('deep');
  for (let i = 0; i < 100; i++) deep = path.join(deep, `d${i}`);
  fs.mkdirSync(deep, { recursive: true });
  fs.writeFileSync(path.join(deep, 'leaf'), 'deep leaf');
  // A socket, made by binding one.
  execFileSync('python3', ['-c', `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(p('sock'))})`]);
  // Times to the nanosecond, and before the epoch.
  fs.utimesSync(p('odd'), 1, 1234567890.123456);
  fs.lutimesSync(p('a/sym'), 1, -86400);
}

function mtimes(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const visit = (rel: string) => {
    const st = fs.lstatSync(path.join(root, rel), { bigint: true });
    out.set(rel, String(st.mtimeNs));
    if (st.isDirectory()) for (const n of fs.readdirSync(path.join(root, rel)).sort()) visit(path.join(rel, n));
  };
  visit('.');
  return out;
}

function fsckTools(): string[] {
  const tools = ['fsck.erofs'];
  const newer = newerErofsUtilsDir('fsck.erofs');
  if (newer) tools.push(path.join(newer, 'fsck.erofs'));
  else console.log('# SKIP fsck.erofs 1.8: not unpacked here (run ../shared/tools/debian-newer/fetch.sh); checked with 1.5 only');
  return tools;
}

describe('EROFS writer', () => {
  const mounted: string[] = [];
  after(() => {
    for (const m of mounted) umount2(m, 2);
  });

  for (const chunkSize of [1 << 20, 4096]) {
    test(`a tricky tree (chunk size ${chunkSize}): fsck.erofs passes, the kernel mounts it, and it matches the source`, async () => {
      const w = workDir('erofs-writer');
      const src = path.join(w, 'src');
      fs.mkdirSync(src);
      makeTrickyTree(src);
      const sink = new BlobSink(chunkSize, path.join(w, 'blob'));
      const root = await treeFromDirectory(src, sink);
      sink.close();
      const { image, files, logicalBytes } = writeErofsImage({
        root,
        chunkSize,
        devices: [{ tag: 'blob', blocks: sink.blocks }],
        address: (n) => ({ deviceId: 1, blkaddr: sink.addrs[n] }),
      });
      const img = path.join(w, 'layer.erofs');
      fs.writeFileSync(img, image);
      assert.equal(files, 600 + 8, 'regular files, hardlinks once');
      assert.ok(logicalBytes > 11_000_000, `logical bytes ${logicalBytes}`);
      // Deduplicated: big-copy adds no chunk; the blob holds each distinct chunk once.
      assert.ok(sink.blocks * 4096 < logicalBytes - 4_000_000, `blob of ${sink.blocks} blocks for ${logicalBytes} bytes of files`);

      // Our own reader finds every chunk index the writer wrote.
      const scan = scanChunks(image);
      assert.equal(scan.files, files);
      assert.equal(scan.logicalBytes, logicalBytes);
      assert.equal(scan.chunkRefs.length, sink.added);

      for (const fsck of fsckTools()) {
        const out = execFileSync(fsck, [`--device=${path.join(w, 'blob')}`, img], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
        assert.doesNotMatch(out, /error|corrupt/i, `${fsck}: ${out}`);
      }

      const mnt = path.join(w, 'mnt');
      fs.mkdirSync(mnt);
      mount(img, mnt, 'erofs', 1 /* MS_RDONLY */, `device=${path.join(w, 'blob')}`);
      mounted.push(mnt);
      const a = walkTree(src);
      const b = walkTree(mnt);
      assert.ok(a.size > 700, `source tree has ${a.size} paths`);
      assert.deepEqual(diffTrees(a, b, 'source', 'image'), []);
      const ta = mtimes(src);
      const tb = mtimes(mnt);
      for (const [p, t] of ta) assert.equal(tb.get(p), t, `mtime of ${p}`);
      assert.equal(fs.readFileSync(path.join(mnt, 'a/hello'), 'utf8'), 'hello\n');
      assert.equal(fs.lstatSync(path.join(mnt, 'a/hello')).nlink, 3);
      umount2(mnt, 2);
      mounted.pop();
    });
  }
});
