/**
 * applyLayerTar against containerd's own unpacker: each test layer is put on
 * top of a small base layer in an OCI archive, imported into a private
 * containerd with `ctr images import` (containerd 1.6 unpacks it with its
 * overlayfs snapshotter, writing the layer straight into the snapshot's
 * upper dir with overlay whiteouts), and containerd's `snapshots/<n>/fs` of
 * that layer is compared with what applyLayerTar wrote for the same blob:
 * type, mode, owner, size, content, link target, device numbers, xattrs
 * (trusted.overlay.opaque and security.capability included) and hardlink
 * groups. Then malicious and broken layers: each must fail with a clear
 * error and leave everything outside the target directory untouched.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import zlib from 'node:zlib';
import { readXattrs } from '../native/xattr';
import { LayerTarError, applyLayerTar } from '../src/convert/untar';
import { scratchDirs, waitFor } from './helpers/daemon';
import { checkDirectoryEqual, deviceNumbers } from './helpers/fstest';
import { CAP_NET_BIND_RAW, type Entry, MEDIA_CONFIG, MEDIA_LAYER_GZIP, MEDIA_MANIFEST, type TarHeader, buildLayer, chainIds, packEntry, packTar, pseudoRandom } from './helpers/images';
import { mountsUnder, unmountUnder } from './helpers/mounts';
import { runCmd } from './helpers/stack';
import { RawTar } from './helpers/raw-tar';

const MEDIA_LAYER_TAR = 'application/vnd.oci.image.layer.v1.tar';

function sha256(b: Buffer | string): string {
  return `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;
}

// ---------------------------------------------------------------------------
/** A tar of tar-stream headers (for malicious names tar-stream writes as given). */
async function tarOf(entries: { header: TarHeader; body?: string }[]): Promise<Buffer> {
  return packTar(async (pack) => {
    for (const e of entries) {
      const body = e.body === undefined ? undefined : Buffer.from(e.body);
      await packEntry(pack, { mode: 0o644, mtime: new Date(1704164645000), size: body?.length ?? 0, ...e.header }, body);
    }
  });
}

// ---------------------------------------------------------------------------
// A private containerd that unpacks OCI archives with its overlayfs snapshotter.

interface LayerBlob {
  blob: Buffer;
  mediaType: string;
  diffId: string;
}

function gzLayer(tarBuf: Buffer): LayerBlob {
  return { blob: zlib.gzipSync(tarBuf), mediaType: MEDIA_LAYER_GZIP, diffId: sha256(tarBuf) };
}

function plainLayer(tarBuf: Buffer): LayerBlob {
  return { blob: tarBuf, mediaType: MEDIA_LAYER_TAR, diffId: sha256(tarBuf) };
}

function ociArch(): string {
  const m: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  return m[process.arch] ?? process.arch;
}

/** An OCI image archive (what `ctr images import` reads) holding one image of `layers`. */
async function ociArchive(ref: string, layers: LayerBlob[]): Promise<Buffer> {
  const config = Buffer.from(
    JSON.stringify({
      architecture: ociArch(),
      os: 'linux',
      config: {},
      rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
    }),
  );
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_MANIFEST,
      config: { mediaType: MEDIA_CONFIG, digest: sha256(config), size: config.length },
      layers: layers.map((l) => ({ mediaType: l.mediaType, digest: sha256(l.blob), size: l.blob.length })),
    }),
  );
  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: MEDIA_MANIFEST,
          digest: sha256(manifest),
          size: manifest.length,
          annotations: { 'io.containerd.image.name': ref, 'org.opencontainers.image.ref.name': 'v1' },
        },
      ],
    }),
  );
  const files: [string, Buffer][] = [
    ['oci-layout', Buffer.from(JSON.stringify({ imageLayoutVersion: '1.0.0' }))],
    ['index.json', index],
    [`blobs/sha256/${sha256(config).slice(7)}`, config],
    [`blobs/sha256/${sha256(manifest).slice(7)}`, manifest],
    ...layers.map((l): [string, Buffer] => [`blobs/sha256/${sha256(l.blob).slice(7)}`, l.blob]),
  ];
  // A blob shared by two layers is stored once.
  return rawArchive(files.filter(([n], i, all) => all.findIndex(([m]) => m === n) === i));
}

/** Writes the archive with tar-stream (binary-safe bodies). */
async function rawArchive(files: [string, Buffer][]): Promise<Buffer> {
  return packTar(async (pack) => {
    for (const [name, data] of files) await packEntry(pack, { name, size: data.length, mode: 0o644, mtime: new Date(1704164645000) }, data);
  });
}

class Containerd {
  readonly address: string;
  private proc: ChildProcess | null = null;
  private out = '';
  private imports = 0;

  constructor(readonly dir: string) {
    this.address = path.join(dir, 'ctrd.sock');
  }

  async start(): Promise<void> {
    const q = (s: string) => JSON.stringify(s);
    const cfg = path.join(this.dir, 'containerd.toml');
    fs.writeFileSync(
      cfg,
      [
        'version = 2',
        `root = ${q(path.join(this.dir, 'root'))}`,
        `state = ${q(path.join(this.dir, 'state'))}`,
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]',
        '[grpc]',
        `  address = ${q(this.address)}`,
        '[ttrpc]',
        `  address = ${q(`${this.address}.ttrpc`)}`,
        '[plugins."io.containerd.internal.v1.opt"]',
        `  path = ${q(path.join(this.dir, 'opt'))}`,
        '',
      ].join('\n'),
    );
    const tmp = path.join(this.dir, 'tmp');
    fs.mkdirSync(tmp);
    const p = spawn('containerd', ['--config', cfg], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TMPDIR: tmp }, cwd: this.dir });
    this.proc = p;
    p.stdout?.on('data', (d: Buffer) => (this.out += d.toString()));
    p.stderr?.on('data', (d: Buffer) => (this.out += d.toString()));
    await waitFor(
      async () => {
        if (p.exitCode !== null) throw new Error(`containerd exited (${p.exitCode}):\n${this.out.slice(-4000)}`);
        if (!fs.existsSync(this.address)) return false;
        return (await runCmd('ctr', ['--address', this.address, 'version'], { timeoutMs: 10_000 })).code === 0;
      },
      30_000,
      'containerd to serve',
    );
  }

  async ctr(args: string[]): Promise<string> {
    const r = await runCmd('ctr', ['--address', this.address, '-n', 'untar', ...args], { timeoutMs: 120_000 });
    if (r.code !== 0) throw new Error(`ctr ${args.join(' ')} failed (${r.code}):\n${r.stdout}\n${r.stderr}\n--- containerd ---\n${this.out.slice(-3000)}`);
    return r.stdout;
  }

  /**
   * Imports an image of `layers` and unpacks it with the overlayfs
   * snapshotter; returns the upper directory (`snapshots/<n>/fs`) of every
   * layer, bottom first.
   */
  async unpack(layers: LayerBlob[]): Promise<string[]> {
    const n = this.imports++;
    const ref = `docker.io/dedup-untar/case${n}:v1`;
    const archive = path.join(this.dir, `image-${n}.tar`);
    fs.writeFileSync(archive, await ociArchive(ref, layers));
    await this.ctr(['images', 'import', '--snapshotter', 'overlayfs', archive]);
    const chain = chainIds(layers.map((l) => l.diffId));
    const key = `untar-view-${n}`;
    const mounts = JSON.parse(await this.ctr(['snapshots', '--snapshotter', 'overlayfs', 'view', '--mounts', key, chain[chain.length - 1]])) as {
      Type: string;
      Source: string;
      Options: string[] | null;
    }[];
    // containerd's GC may collect the unlabeled view first: its mounts are all that is needed.
    await runCmd('ctr', ['--address', this.address, '-n', 'untar', 'snapshots', '--snapshotter', 'overlayfs', 'rm', key]);
    const m = mounts[0];
    const uppers = m.Type === 'bind' ? [m.Source] : (m.Options ?? []).find((o) => o.startsWith('lowerdir='))!.slice('lowerdir='.length).split(':').reverse();
    assert.equal(uppers.length, layers.length, `containerd's view of ${ref}: ${JSON.stringify(mounts)}`);
    const snapRoot = path.join(this.dir, 'root', 'io.containerd.snapshotter.v1.overlayfs', 'snapshots');
    for (const u of uppers) assert.ok(u.startsWith(`${snapRoot}/`) && u.endsWith('/fs'), `unexpected snapshot dir ${u}`);
    return uppers;
  }

  async stop(): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => p.once('exit', () => resolve()));
    p.kill('SIGTERM');
    const timer = setTimeout(() => p.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// Test layers.

/** The layer every test image starts with; the test layer goes on top of it. */
const BASE: Entry[] = [
  { type: 'dir', path: 'base' },
  { type: 'file', path: 'base/a', content: 'a\n' },
  { type: 'file', path: 'base/b', content: 'b\n' },
  { type: 'dir', path: 'base/d' },
  { type: 'file', path: 'base/d/x', content: 'x\n' },
  { type: 'file', path: 'gone', content: 'top level, deleted above\n' },
  { type: 'dir', path: 'opq' },
  { type: 'file', path: 'opq/old', content: 'old\n' },
  { type: 'dir', path: 'keep', mode: 0o700, uid: 5, gid: 6, xattrs: { 'user.lower': 'from the base layer' } },
  { type: 'file', path: 'keep/f', content: 'f\n' },
  { type: 'dir', path: 'usr' },
  { type: 'dir', path: 'usr/lib', mode: 0o750, uid: 7, gid: 8 },
  { type: 'symlink', path: 'lib', target: 'usr/lib' },
  { type: 'file', path: 'replaced-below', content: 'a file in the base\n' },
];

/** vfs_cap_data revision 2 with bytes >= 0x80 (CAP_SETUID, CAP_SYS_ADMIN, ...): only a raw PAX header carries it exactly. */
const CAP_BINARY = (() => {
  const b = Buffer.alloc(20);
  b.writeUInt32LE(0x02000001, 0);
  b.writeUInt32LE(0xffffffff, 4); // permitted[0]
  b.writeUInt32LE(0x000000ff, 8); // inheritable[0]
  b.writeUInt32LE(0x000001ff, 12); // permitted[1]
  return b;
})();

const LONG_A = `long-${'a'.repeat(190)}`;
const LONG_B = `long-${'b'.repeat(200)}`;
const DEEP = Array.from({ length: 60 }, (_, i) => `d${String(i).padStart(2, '0')}`).join('/');

const WHITEOUTS: Entry[] = [
  { type: 'dir', path: 'base' },
  { type: 'whiteout', path: 'base/a' },
  { type: 'whiteout', path: 'base/d' },
  { type: 'whiteout', path: 'base/b' },
  // deleted, then recreated in the same layer
  { type: 'file', path: 'base/b', content: 'recreated\n', mode: 0o600 },
  { type: 'whiteout', path: 'gone' },
  { type: 'whiteout', path: 'never-existed' },
  { type: 'dir', path: 'opq', mode: 0o750, uid: 3, gid: 4 },
  { type: 'opaque', path: 'opq' },
  { type: 'file', path: 'opq/new', content: 'new\n' },
  // an opaque marker listed before its directory's own entry
  { type: 'opaque', path: 'late' },
  { type: 'dir', path: 'late', mode: 0o711, uid: 9 },
  { type: 'file', path: 'late/f', content: 'f\n' },
  // nested opaque directories, one of them new in this layer
  { type: 'dir', path: 'fresh' },
  { type: 'opaque', path: 'fresh' },
  { type: 'dir', path: 'fresh/inner' },
  { type: 'opaque', path: 'fresh/inner' },
];

const REPLACEMENTS: Entry[] = [
  { type: 'dir', path: 'r' },
  { type: 'file', path: 'r/f2d', content: 'I was a file\n' },
  { type: 'dir', path: 'r/f2d', mode: 0o705 },
  { type: 'file', path: 'r/f2d/in', content: 'now a directory\n' },
  { type: 'dir', path: 'r/d2f' },
  { type: 'file', path: 'r/d2f/child', content: 'c\n' },
  { type: 'file', path: 'r/d2f/gc', content: 'gc\n' },
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
  { type: 'file', path: 'r/twice', content: 'two, shorter or not\n', mode: 0o600, uid: 2 },
  { type: 'dir', path: 'r/dirtwice' },
  { type: 'file', path: 'r/dirtwice/c', content: 'c\n' },
  { type: 'dir', path: 'r/dirtwice', mode: 0o700, uid: 3, gid: 3, xattrs: { 'user.second': 'listing' } },
  { type: 'file', path: 'r/hl-src', content: 'source\n' },
  { type: 'hardlink', path: 'r/hl-dst', target: 'r/hl-src' },
  { type: 'file', path: 'r/hl-dst', content: 'the link replaced by a file\n' },
  { type: 'char', path: 'r/dev2dir', major: 1, minor: 3 },
  { type: 'dir', path: 'r/dev2dir' },
  // a file of the base layer replaced by a directory
  { type: 'dir', path: 'replaced-below' },
];

const SPECIAL: Entry[] = [
  { type: 'dir', path: 'h' },
  { type: 'file', path: 'h/orig', content: 'one inode, many names\n', mode: 0o640, uid: 1000, gid: 1000 },
  { type: 'hardlink', path: 'h/l1', target: 'h/orig' },
  { type: 'dir', path: 'h/sub' },
  { type: 'hardlink', path: 'h/sub/l2', target: 'h/orig' },
  { type: 'hardlink', path: 'top-link', target: 'h/orig' },
  { type: 'file', path: 'h/suid', content: 'setuid\n', mode: 0o4755 },
  { type: 'hardlink', path: 'h/suid-link', target: 'h/suid' },
  { type: 'file', path: 'h/pair-a', content: 'second group\n' },
  { type: 'hardlink', path: 'h/pair-b', target: 'h/pair-a' },
  // a hardlink header with its own owner and mode: applied to the shared inode
  { type: 'hardlink', path: 'h/pair-c', target: 'h/pair-a', uid: 33, gid: 34, mode: 0o600 },
  { type: 'dir', path: 's' },
  { type: 'fifo', path: 's/fifo', mode: 0o600 },
  { type: 'fifo', path: 's/fifo-suid', mode: 0o4644 },
  { type: 'char', path: 's/null', major: 1, minor: 3, mode: 0o666 },
  { type: 'char', path: 's/tty', major: 4, minor: 64, mode: 0o620, gid: 5 },
  { type: 'block', path: 's/loop7', major: 7, minor: 7, mode: 0o660, gid: 6 },
  { type: 'char', path: 's/big', major: 300, minor: 70000, mode: 0o600 },
  // (tar-stream writes device numbers in 6 octal digits: at most 262143)
  { type: 'block', path: 's/bigger', major: 4095, minor: 262143 },
  { type: 'char', path: 's/zero-dev', major: 0, minor: 0, mode: 0o644, uid: 1 },
  { type: 'dir', path: 'm' },
  { type: 'file', path: 'm/suid', content: 'setuid\n', mode: 0o4755 },
  { type: 'file', path: 'm/sgid', content: 'setgid\n', mode: 0o2755, gid: 50 },
  { type: 'file', path: 'm/odd', content: 'odd\n', mode: 0o6511, uid: 2, gid: 3 },
  { type: 'file', path: 'm/sticky-file', content: 'sticky\n', mode: 0o1644 },
  { type: 'dir', path: 'm/sticky', mode: 0o1777 },
  { type: 'dir', path: 'm/sgid-dir', mode: 0o2775, gid: 100 },
  { type: 'file', path: 'm/mode-0000', content: 'no permissions\n', mode: 0o000 },
  { type: 'dir', path: 'm/dir-0500', mode: 0o500 },
  { type: 'file', path: 'm/dir-0500/inside', content: 'written into a read-only directory\n' },
  { type: 'dir', path: 'm/dir-0000', mode: 0o000, uid: 12 },
  { type: 'file', path: 'm/high-ids', content: 'high\n', uid: 200000, gid: 200001 },
  { type: 'symlink', path: 'm/owned-symlink', target: 'high-ids', uid: 33, gid: 34 },
  { type: 'symlink', path: 'm/dangling', target: 'does/not/exist' },
  { type: 'symlink', path: 'm/abs', target: '/etc/passwd' },
  { type: 'file', path: 'm/empty', content: '' },
  { type: 'file', path: 'm/big', content: pseudoRandom(3 * 1024 * 1024 + 17, 'untar-big') },
  // xattrs
  { type: 'dir', path: 'x' },
  { type: 'file', path: 'x/cap', content: 'capabilities\n', mode: 0o755, xattrs: { 'security.capability': CAP_NET_BIND_RAW } },
  { type: 'file', path: 'x/cap-suid', content: 'setuid and capabilities\n', mode: 0o4755, uid: 0, gid: 0, xattrs: { 'security.capability': CAP_NET_BIND_RAW } },
  { type: 'file', path: 'x/user', content: 'user xattrs\n', xattrs: { 'user.foo': 'bar', 'user.binaryish': Buffer.from([0, 1, 2, 0x7f, 0]), 'user.empty': '' } },
  { type: 'dir', path: 'x/dir', xattrs: { 'user.dir': 'on a directory' } },
];

const NAMES: Entry[] = [
  { type: 'dir', path: 'n' },
  { type: 'file', path: `n/${LONG_A}/${LONG_B}/leaf`, content: 'at the end of a long path\n' },
  { type: 'symlink', path: 'n/symlink-long-target', target: `${LONG_A}/${LONG_B}/leaf` },
  { type: 'hardlink', path: `n/${LONG_A}/hardlink-long-target`, target: `n/${LONG_A}/${LONG_B}/leaf` },
  { type: 'dir', path: 'n/ünïcödé-ďíř' },
  { type: 'file', path: 'n/ünïcödé-ďíř/日本語のファイル名-😀.txt', content: 'ünïcödé ✓\n' },
  { type: 'symlink', path: 'n/symlink-nonascii', target: 'ünïcödé-ďíř/日本語のファイル名-😀.txt' },
  { type: 'file', path: `n/deep/${DEEP}/leaf`, content: 'sixty levels down\n' },
  { type: 'file', path: 'n/with space and \'quotes\' "double"', content: 'odd characters\n' },
  { type: 'file', path: 'n/.wh', content: 'not a whiteout (no dot after wh)\n' },
  { type: 'file', path: 'n/.whatever', content: 'not a whiteout either\n' },
];

/** Headers tar-stream cannot write: GNU long names, binary PAX xattrs, base-256 ids, V7 and global headers. */
function rawFormatsTar(): Buffer {
  const longName = `g/${'n'.repeat(150)}`;
  const longTarget = `g/${'t'.repeat(180)}`;
  return new RawTar()
    .pax([['comment', 'a global header, as git archive writes']], 'g')
    .entry({ name: './', typeflag: '5', mode: 0o700, uid: 42 }) // the root: ignored
    .entry({ name: './g/', typeflag: '5', mode: 0o755 })
    .gnuLong('L', longName)
    .entry({ name: longName.slice(0, 99), format: 'gnu', mode: 0o640, uid: 11 }, 'gnu long name\n')
    .gnuLong('L', longTarget)
    .entry({ name: 'g/t', format: 'gnu', typeflag: '0' }, 'target of a long symlink\n')
    .gnuLong('K', longTarget)
    .entry({ name: 'g/symlink-long', typeflag: '2', format: 'gnu', linkname: 'ignored' })
    .gnuLong('K', longName)
    .entry({ name: 'g/hardlink-long', typeflag: '1', format: 'gnu', linkname: 'ignored', mode: 0o640, uid: 11 })
    .entry({ name: 'file-in-prefixed-dir', prefix: 'g/prefix/dir', mode: 0o600 }, 'ustar prefix\n')
    .entry({ name: 'g/base256-ids', format: 'gnu', uid: 3_000_000, gid: 4_000_000, base256Ids: true }, 'ids in base-256\n')
    .pax([
      ['SCHILY.xattr.security.capability', CAP_BINARY],
      ['SCHILY.xattr.user.binary', Buffer.from([0xff, 0x00, 0x80, 0xfe])],
      ['SCHILY.xattr.trusted.from-archive', 'containerd does not apply trusted.*'],
      ['uid', '3000001'],
      ['gid', '3000002'],
      ['mtime', '1704164645.123456789'],
      ['path', 'g/pax-everything'],
    ])
    .entry({ name: 'g/short', mode: 0o4750 }, 'binary capability, PAX ids\n')
    .pax([['SCHILY.xattr.user.on-symlink', 'containerd ignores EPERM for user.* on a symlink']])
    .entry({ name: 'g/symlink-xattr', typeflag: '2', linkname: 'short' })
    .pax([['SCHILY.xattr.user.on-fifo', 'and on a fifo']])
    .entry({ name: 'g/fifo-xattr', typeflag: '6' })
    .entry({ name: 'g/hardlink-to-symlink', typeflag: '1', linkname: 'g/symlink-xattr' })
    .entry({ name: 'g/v7-dir/', typeflag: '\0', format: 'v7', mode: 0o751 })
    .entry({ name: 'g/v7-file', typeflag: '\0', format: 'v7', mode: 0o640, uid: 6 }, 'old V7 header\n')
    .entry({ name: 'g/.wh.whiteout-owner', uid: 5, gid: 6 })
    .entry({ name: 'g/dir//with/./dots/../cleaned', mode: 0o644 }, 'name cleaned like filepath.Clean\n')
    // a size field on a header-only type announces no data (Go's reader)
    .entry({ name: 'g/hardlink-with-size', typeflag: '1', linkname: 'g/v7-file', mode: 0o640, uid: 6, sizeField: 12345 })
    .entry({ name: 'g/dir-with-size', typeflag: '5', mode: 0o755, sizeField: 700 })
    .entry({ name: 'g/after-sizes' }, 'still in step\n')
    // a directory listed after its children
    .entry({ name: 'g/later/f' }, 'child first\n')
    .entry({ name: 'g/later/', typeflag: '5', mode: 0o700, uid: 4 })
    .finish();
}

/** Entries without their parent directories: containerd creates them, copying the lower layer's if it has them. */
function implicitParentsTar(): Buffer {
  return new RawTar()
    .entry({ name: 'keep/new-file' }, 'parent copied from the base layer\n')
    .entry({ name: 'lib/sub/x' }, 'lib is a symlink below: its target directory is copied\n')
    .entry({ name: 'base/d/deeper/y' }, 'base/d exists below\n')
    .entry({ name: 'nolower/a/b' }, 'no lower counterpart: 0755 root\n')
    .entry({ name: 'keep/.wh.f' })
    .finish();
}

// ---------------------------------------------------------------------------

const workDir = scratchDirs();

/** Applies `blob` into a new directory under `parent`; returns it. */
async function ours(parent: string, name: string, blob: Buffer, opts: Parameters<typeof applyLayerTar>[2] = {}): Promise<{ dir: string; files: number; bytes: number }> {
  const dir = path.join(parent, name);
  const r = await applyLayerTar(Readable.from([blob]), dir, opts);
  return { dir, ...r };
}

/** An input stream delivering `blob` in small pieces, to exercise chunk boundaries. */
function trickle(blob: Buffer, size: number): Readable {
  const parts: Buffer[] = [];
  for (let o = 0; o < blob.length; o += size) parts.push(blob.subarray(o, o + size));
  return Readable.from(parts);
}

describe('applyLayerTar writes what containerd writes for the same layer', () => {
  let ctrd: Containerd;
  let work: string;
  let baseBlob: LayerBlob;
  let ourBase: string;
  const warnings: string[] = [];
  const onWarning = (m: string) => warnings.push(m);

  before(async () => {
    work = workDir('untar');
    ctrd = new Containerd(path.join(work, 'c'));
    fs.mkdirSync(ctrd.dir);
    await ctrd.start();
    const base = await buildLayer(BASE);
    baseBlob = { blob: base.gz, mediaType: MEDIA_LAYER_GZIP, diffId: base.diffId };
    ourBase = (await ours(work, 'our-base', base.gz)).dir;
  });

  after(async () => {
    await ctrd?.stop();
    if (ctrd) {
      await unmountUnder(ctrd.dir);
      assert.deepEqual(mountsUnder(ctrd.dir), [], 'containerd left mounts behind');
    }
  });

  /** Unpacks base + layer with containerd, applies the layer ourselves (parents: our base), compares. */
  async function compare(name: string, layer: LayerBlob): Promise<{ ctrdUpper: string; ourDir: string; files: number; bytes: number }> {
    const [ctrdBase, ctrdUpper] = await ctrd.unpack([baseBlob, layer]);
    checkDirectoryEqual(ctrdBase, ourBase);
    const r = await ours(work, name, layer.blob, { parents: [ourBase], onWarning });
    checkDirectoryEqual(ctrdUpper, r.dir);
    return { ctrdUpper, ourDir: r.dir, files: r.files, bytes: r.bytes };
  }

  test('whiteouts and opaque directories (gzip layer)', async () => {
    const l = await buildLayer(WHITEOUTS);
    const { ourDir } = await compare('whiteouts', gzLayer(l.tar));
    for (const p of ['base/a', 'base/d', 'gone', 'never-existed']) {
      const st = fs.lstatSync(path.join(ourDir, p), { bigint: true });
      assert.ok(st.isCharacterDevice() && deviceNumbers(st.rdev).join(':') === '0:0', `${p} is a whiteout`);
      assert.equal(Number(st.mode & 0o7777n), 0);
    }
    assert.equal(fs.readFileSync(path.join(ourDir, 'base/b'), 'utf8'), 'recreated\n');
    for (const d of ['opq', 'late', 'fresh', 'fresh/inner']) assert.equal(readXattrs(path.join(ourDir, d)).get('trusted.overlay.opaque')?.toString(), 'y', `${d} is opaque`);
    assert.equal(fs.statSync(path.join(ourDir, 'late')).mode & 0o7777, 0o711);
    const names = (d: string): string[] => fs.readdirSync(d, { recursive: true }) as string[];
    assert.ok(!names(ourDir).some((n) => path.basename(n).startsWith('.wh.')), 'no .wh.* file is created');
  });

  test('entries replacing earlier ones in the same tar (uncompressed layer; gzip and plain input give the same tree)', async () => {
    const l = await buildLayer(REPLACEMENTS);
    const { ctrdUpper, ourDir } = await compare('replacements', plainLayer(l.tar));
    assert.equal(fs.readFileSync(path.join(ourDir, 'r/twice'), 'utf8'), 'two, shorter or not\n');
    assert.ok(fs.lstatSync(path.join(ourDir, 'r/d2s')).isSymbolicLink());
    assert.ok(fs.lstatSync(path.join(ourDir, 'r/s2d')).isDirectory());
    assert.equal(fs.readFileSync(path.join(ourDir, 'r/hl-src'), 'utf8'), 'source\n');
    // The same layer as gzip, with compression auto and gzip, and plain with none, in small pieces.
    for (const [name, input, compression] of [
      ['repl-gz-auto', trickle(l.gz, 333), 'auto'],
      ['repl-gz', trickle(l.gz, 4096), 'gzip'],
      ['repl-none', trickle(l.tar, 511), 'none'],
    ] as const) {
      await applyLayerTar(input, path.join(work, name), { compression, parents: [ourBase] });
      checkDirectoryEqual(ctrdUpper, path.join(work, name));
    }
  });

  test('hardlinks, fifos, devices, set-id bits, sticky, owners, xattrs incl. security.capability (gzip layer)', async () => {
    const l = await buildLayer(SPECIAL);
    const { ourDir, files, bytes } = await compare('special', gzLayer(l.tar));
    const st = (p: string) => fs.lstatSync(path.join(ourDir, p), { bigint: true });
    assert.equal(st('h/orig').ino, st('top-link').ino);
    assert.equal(st('h/orig').nlink, 4n);
    assert.equal(st('h/pair-a').uid, 33n, 'the last hardlink header set the owner of the shared inode');
    assert.deepEqual(deviceNumbers(st('s/big').rdev), [300, 70000]);
    assert.deepEqual(deviceNumbers(st('s/bigger').rdev), [4095, 262143]);
    assert.equal(Number(st('m/odd').mode & 0o7777n), 0o6511);
    assert.equal(Number(st('h/suid-link').mode & 0o7777n), 0o4755);
    assert.deepEqual(readXattrs(path.join(ourDir, 'x/cap')).get('security.capability'), CAP_NET_BIND_RAW);
    assert.deepEqual(readXattrs(path.join(ourDir, 'x/cap-suid')).get('security.capability'), CAP_NET_BIND_RAW);
    assert.equal(Number(st('x/cap-suid').mode & 0o7777n), 0o4755);
    assert.equal(files, SPECIAL.length);
    const dataBytes = SPECIAL.reduce((n, e) => n + (e.type === 'file' ? Buffer.byteLength(e.content) : 0), 0);
    assert.equal(bytes, dataBytes);
  });

  test('long, non-ASCII and deep names (gzip layer)', async () => {
    const l = await buildLayer(NAMES);
    const { ourDir } = await compare('names', gzLayer(l.tar));
    assert.equal(fs.readFileSync(path.join(ourDir, `n/deep/${DEEP}/leaf`), 'utf8'), 'sixty levels down\n');
    assert.equal(fs.readFileSync(path.join(ourDir, 'n/ünïcödé-ďíř/日本語のファイル名-😀.txt'), 'utf8'), 'ünïcödé ✓\n');
  });

  test('GNU long names, ustar prefix, V7 headers, base-256 ids, binary PAX xattrs, PAX ids, global header (uncompressed layer)', async () => {
    const t = rawFormatsTar();
    warnings.length = 0;
    const { ourDir } = await compare('raw-formats', plainLayer(t));
    const st = (p: string) => fs.lstatSync(path.join(ourDir, p));
    assert.deepEqual(readXattrs(path.join(ourDir, 'g/pax-everything')).get('security.capability'), CAP_BINARY);
    assert.deepEqual(readXattrs(path.join(ourDir, 'g/pax-everything')).get('user.binary'), Buffer.from([0xff, 0x00, 0x80, 0xfe]));
    assert.equal(st('g/pax-everything').uid, 3000001);
    assert.equal(st('g/pax-everything').mode & 0o7777, 0o4750);
    assert.equal(st('g/base256-ids').gid, 4_000_000);
    assert.ok(st(`g/${'n'.repeat(150)}`).isFile());
    assert.equal(fs.readlinkSync(path.join(ourDir, 'g/symlink-long')), `g/${'t'.repeat(180)}`);
    assert.ok(st('g/v7-dir').isDirectory());
    assert.equal(fs.readFileSync(path.join(ourDir, 'g/prefix/dir/file-in-prefixed-dir'), 'utf8'), 'ustar prefix\n');
    assert.equal(st('g/whiteout-owner').uid, 5);
    assert.equal(st('g/later').mode & 0o7777, 0o700);
    assert.equal(st('g/later').uid, 4);
    assert.equal(st('g/hardlink-to-symlink').ino, st('g/symlink-xattr').ino);
    assert.notEqual(fs.statSync(ourDir).mode & 0o7777, 0o700, 'the root entry is not applied');
    assert.ok(warnings.some((w) => w.includes('trusted.from-archive')), warnings.join('\n'));
    assert.ok(warnings.some((w) => w.includes('user.on-symlink')), warnings.join('\n'));
  });

  test('a directory entry whose path a later entry removes fails the layer, in containerd and here', async () => {
    const layers: Entry[][] = [
      [
        { type: 'dir', path: 'p' },
        { type: 'dir', path: 'p/sub' },
        { type: 'file', path: 'p', content: 'replaces the directory above p/sub\n' },
      ],
      [
        { type: 'dir', path: 'q' },
        { type: 'symlink', path: 'q', target: 'dangling' },
      ],
    ];
    for (const [i, entries] of layers.entries()) {
      const l = await buildLayer(entries);
      await assert.rejects(ctrd.unpack([baseBlob, gzLayer(l.tar)]), /failed to extract layer/);
      await assert.rejects(ours(work, `refused-${i}`, l.gz), (err: LayerTarError) => {
        assert.match(err.message, /^layer entry "(p\/sub|q)\/?": the directory no longer exists at the end of the layer/);
        assert.equal(err.kind, 'InvalidArgument');
        return true;
      });
    }
  });

  test('parent directories the tar does not list are copied from the layer below, as containerd does', async () => {
    const { ourDir } = await compare('implicit-parents', plainLayer(implicitParentsTar()));
    const st = (p: string) => fs.lstatSync(path.join(ourDir, p));
    assert.equal(st('keep').mode & 0o7777, 0o700);
    assert.equal(st('keep').uid, 5);
    assert.equal(readXattrs(path.join(ourDir, 'keep')).get('user.lower')?.toString(), 'from the base layer');
    assert.equal(st('lib').mode & 0o7777, 0o750, 'lib (a symlink below) is resolved in the lower layer');
    assert.equal(st('nolower/a').mode & 0o7777, 0o755);
    // Without parents, every implicit directory is 0755 root:root.
    const alone = await ours(work, 'implicit-alone', implicitParentsTar());
    assert.equal(fs.lstatSync(path.join(alone.dir, 'keep')).mode & 0o7777, 0o755);
    assert.equal(fs.lstatSync(path.join(alone.dir, 'keep')).uid, 0);
  });
});

describe('malicious and broken layers fail clearly and write nothing outside the directory', () => {
  let sandbox: string;
  let outside: string;
  let n = 0;

  before(() => {
    sandbox = workDir('untar-evil');
    outside = path.join(sandbox, 'outside');
    fs.mkdirSync(outside);
    fs.writeFileSync(path.join(outside, 'secret'), 'secret\n', { mode: 0o600 });
  });

  /** Everything under the sandbox except the target dirs: paths, types, modes, owners, sizes, link counts, xattrs. */
  function snapshotOutside(): string {
    const lines: string[] = [];
    const walk = (p: string) => {
      const st = fs.lstatSync(p);
      const x = [...readXattrs(p)].map(([k, v]) => `${k}=${v.toString('hex')}`).join(',');
      lines.push(`${path.relative(sandbox, p)} ${st.mode.toString(8)} ${st.uid}:${st.gid} ${st.size} ${st.nlink} ${st.mtimeMs} ${x}`);
      if (st.isDirectory()) for (const e of fs.readdirSync(p).sort()) walk(path.join(p, e));
    };
    walk(outside);
    lines.push(`sandbox: ${fs.readdirSync(sandbox).filter((e) => !e.startsWith('layer-')).sort().join(' ')}`);
    return lines.join('\n');
  }

  async function refuse(blob: Buffer, pattern: RegExp, opts: Parameters<typeof applyLayerTar>[2] = {}): Promise<LayerTarError> {
    const before = snapshotOutside();
    const dir = path.join(sandbox, `layer-${n++}`);
    let caught: unknown;
    try {
      await applyLayerTar(Readable.from([blob]), dir, opts);
    } catch (err) {
      caught = err;
    }
    assert.ok(caught instanceof LayerTarError, `expected a LayerTarError, got ${caught === undefined ? 'success' : String(caught)}`);
    assert.match(caught.message, pattern);
    assert.equal(snapshotOutside(), before, 'something outside the layer directory changed');
    assert.ok(!fs.existsSync('/x') && !fs.existsSync('/etc/untar-evil'), 'nothing written at the file system root');
    return caught;
  }

  const file = (name: string, body = 'evil\n') => ({ header: { name, type: 'file' as const }, body });
  const dirEntry = (name: string) => ({ header: { name, type: 'directory' as const, mode: 0o755 } });
  const symlink = (name: string, linkname: string) => ({ header: { name, type: 'symlink' as const, linkname, mode: 0o777 } });
  const hardlink = (name: string, linkname: string) => ({ header: { name, type: 'link' as const, linkname } });

  test('"../x" and names climbing out after going down', async () => {
    const e = await refuse(await tarOf([file('../x')]), /layer entry "\.\.\/x": entry name "\.\.\/x" climbs out of the layer directory/);
    assert.equal(e.kind, 'InvalidArgument');
    assert.equal(e.entry, '../x');
    await refuse(await tarOf([dirEntry('a'), file('a/../../outside/secret')]), /"a\/\.\.\/\.\.\/outside\/secret".*climbs out/);
  });

  test('absolute names', async () => {
    await refuse(await tarOf([file('/x')]), /layer entry "\/x": entry name "\/x" is absolute/);
    await refuse(await tarOf([file(`${outside}/secret`)]), /is absolute/);
  });

  test('a symlink made by an earlier entry is never written through', async () => {
    const cases: [string, { header: TarHeader; body?: string }][] = [
      ['a/secret', file('a/secret', 'overwritten\n')],
      ['a/newfile', file('a/newfile')],
      ['a/sub/deeper', file('a/sub/deeper')],
      ['a/.wh.secret', file('a/.wh.secret', '')],
      ['a/.wh..wh..opq', file('a/.wh..wh..opq', '')],
      ['a/dir', dirEntry('a/dir')],
      ['a/sym', symlink('a/sym', '/etc/passwd')],
    ];
    for (const [name, entry] of cases) {
      for (const target of [outside, '../outside', '/etc']) {
        await refuse(await tarOf([symlink('a', target), entry]), new RegExp(`layer entry "${name.replace(/\./g, '\\.')}": parent "a" is a symlink \\(-> "${target.replace(/\./g, '\\.')}"\\) made by an earlier entry: refusing to write through it`));
      }
    }
    // a symlinked directory deeper down, and one that replaced a real directory
    await refuse(await tarOf([dirEntry('d'), symlink('d/e', outside), file('d/e/f')]), /parent "d\/e" is a symlink/);
    await refuse(await tarOf([dirEntry('d'), file('d/x'), symlink('d', outside), file('d/x')]), /layer entry "d\/x": parent "d" is a symlink/);
    assert.ok(!fs.existsSync('/etc/newfile') && !fs.existsSync('/etc/sub'));
  });

  test('hardlinks to outside', async () => {
    await refuse(await tarOf([hardlink('l', '../outside/secret')]), /layer entry "l": hardlink target "\.\.\/outside\/secret" climbs out/);
    await refuse(await tarOf([hardlink('l', `${outside}/secret`)]), /layer entry "l": hardlink target ".*\/outside\/secret" is absolute/);
    await refuse(await tarOf([hardlink('l', '/etc/passwd')]), /is absolute/);
    await refuse(await tarOf([symlink('a', outside), hardlink('l', 'a/secret')]), /layer entry "l": hardlink to "a\/secret": the target's path goes through "a" is a symlink/);
  });

  test('a hardlink to a missing target names both', async () => {
    const e = await refuse(await tarOf([file('present'), hardlink('dir/link', 'missing/target')]), /layer entry "dir\/link": hardlink to "missing\/target": the target does not exist/);
    assert.equal(e.entry, 'dir/link');
    await refuse(await tarOf([hardlink('self', 'self')]), /layer entry "self": hardlink to "self": the target is the entry itself/);
    await refuse(await tarOf([dirEntry('d'), hardlink('l', 'd')]), /hardlink to "d": the target is a directory/);
  });

  test('bad whiteout names', async () => {
    for (const name of ['.wh.', 'sub/.wh..', 'sub/.wh...']) await refuse(await tarOf([file(name, '')]), /invalid whiteout name/);
  });

  test('zstd, xz, corrupt gzip, truncated and non-tar input', async () => {
    const zstd = Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), crypto.randomBytes(100)]);
    const e = await refuse(zstd, /zstd-compressed.*zstd layers are not supported/);
    assert.equal(e.kind, 'InvalidArgument');
    await refuse(zstd, /zstd/, { compression: 'none' });
    await refuse(Buffer.concat([Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), crypto.randomBytes(50)]), /xz-compressed/);
    const good = await tarOf([file('a', 'x'.repeat(5000)), file('b')]);
    const gz = zlib.gzipSync(good);
    const corrupt = Buffer.from(gz);
    corrupt[corrupt.length >> 1] ^= 0xff;
    await refuse(corrupt, /corrupt gzip data|gzip/);
    await refuse(gz.subarray(0, gz.length - 30), /unexpected end|corrupt gzip|gzip/);
    await refuse(good.subarray(0, 1500), /layer entry "a": unexpected end of archive in entry data/);
    await refuse(good, /does not start with the gzip magic/, { compression: 'gzip' });
    await refuse(gz, /compression "none" was given but the layer is gzip-compressed/, { compression: 'none' });
    await refuse(Buffer.from('this is not a tar archive at all'.repeat(40)), /at the start of the archive.*checksum mismatch/);
  });

  test('names that are not UTF-8, unsupported entry types', async () => {
    await refuse(new RawTar().entry({ name: Buffer.from([0x61, 0xff, 0x62]) }, 'x').finish(), /entry name is not valid UTF-8/);
    await refuse(new RawTar().entry({ name: 'sparse', typeflag: 'S' }).finish(), /layer entry "sparse": GNU sparse files are not supported/);
    await refuse(new RawTar().entry({ name: 'contiguous', typeflag: '7' }, 'x').finish(), /unsupported tar entry type "7"/);
  });

  test('on failure reading stops and the input stream is destroyed', async () => {
    const blob = await tarOf([file('ok'), file('../x'), file('more', 'y'.repeat(100_000))]);
    for (const [i, data] of [blob, zlib.gzipSync(blob)].entries()) {
      const input = trickle(data, 512);
      await assert.rejects(applyLayerTar(input, path.join(sandbox, `layer-destroy-${i}`)), /climbs out/);
      assert.ok(input.destroyed, 'input destroyed');
    }
  });

  test('a directory that is not empty is refused', async () => {
    const dir = path.join(sandbox, 'layer-busy');
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'left-over'), '');
    await assert.rejects(applyLayerTar(Readable.from([Buffer.alloc(1024)]), dir), (err: LayerTarError) => {
      assert.equal(err.kind, 'FailedPrecondition');
      assert.match(err.message, /is not empty/);
      return true;
    });
  });

  test('an empty blob and a bare end-of-archive marker are empty layers', async () => {
    for (const blob of [Buffer.alloc(0), Buffer.alloc(1024), zlib.gzipSync(Buffer.alloc(1024))]) {
      const dir = path.join(sandbox, `layer-empty-${n++}`);
      assert.deepEqual(await applyLayerTar(Readable.from([blob]), dir), { files: 0, bytes: 0 });
      assert.deepEqual(fs.readdirSync(dir), []);
    }
  });
});
