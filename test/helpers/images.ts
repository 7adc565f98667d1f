/**
 * OCI test images built in code, without network: layer tars are written
 * entry by entry with tar-stream so that every edge case (whiteouts, opaque
 * directories, hardlinks, special files, modes, owners, xattrs, long and
 * non-ASCII names) is expressed exactly; then an OCI image layout is written
 * and pushed to a registry with skopeo.
 */
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import * as tar from 'tar-stream';

const run = promisify(execFile);

export const MEDIA_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const MEDIA_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';

/** All entries carry a fixed mtime so that layers are byte-for-byte reproducible. */
const MTIME = new Date('2024-01-02T03:04:05Z');

const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;
const S_IFIFO = 0o010000;
const S_IFCHR = 0o020000;
const S_IFBLK = 0o060000;

interface Common {
  /** Path inside the layer, without a leading slash. */
  path: string;
  /** Permission bits including setuid/setgid/sticky (0o7777). */
  mode?: number;
  uid?: number;
  gid?: number;
  /** Extended attributes, written as PAX `SCHILY.xattr.<name>` records. */
  xattrs?: Record<string, Buffer | string>;
}

export type Entry =
  | (Common & { type: 'dir' })
  | (Common & { type: 'file'; content: Buffer | string })
  | (Common & { type: 'symlink'; target: string })
  /** A hardlink to `target` (a path in this layer, already written). */
  | (Common & { type: 'hardlink'; target: string })
  | (Common & { type: 'fifo' })
  | (Common & { type: 'char' | 'block'; major: number; minor: number })
  /** Deletes `path` from the layers below (`.wh.<name>`). */
  | { type: 'whiteout'; path: string }
  /** Hides everything the layers below have in directory `path` (`.wh..wh..opq`). */
  | { type: 'opaque'; path: string };

export interface BuiltLayer {
  /** Uncompressed tar. */
  tar: Buffer;
  gz: Buffer;
  /** sha256 of the uncompressed tar. */
  diffId: string;
  /** sha256 of the gzip blob. */
  digest: string;
}

function sha256(b: Buffer | string): string {
  return `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;
}

export type TarHeader = Partial<tar.Header> & Pick<tar.Header, 'name'>;

/** Runs `fill` on a new tar-stream pack, finalizes it and resolves with the whole tar. */
export async function packTar(fill: (pack: tar.Pack) => Promise<void>): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: unknown) => chunks.push(Buffer.from(c as Uint8Array)));
  const ended = new Promise<void>((resolve, reject) => {
    pack.on('end', () => resolve());
    pack.on('error', reject);
  });
  const done = (async () => {
    await fill(pack);
    pack.finalize();
  })();
  await Promise.all([done, ended]);
  return Buffer.concat(chunks);
}

/** Adds one entry to a tar-stream pack, resolving once it is written. */
export function packEntry(pack: tar.Pack, header: TarHeader, body?: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const cb = (err?: Error | null) => (err ? reject(err) : resolve());
    if (body) pack.entry(header, body, cb);
    else pack.entry(header, cb);
  });
}

export function isPlainAscii(s: string): boolean {
  // eslint-disable-next-line no-control-regex
  return /^[\x20-\x7e]*$/.test(s);
}

/**
 * tar-stream writes PAX values as UTF-8 text; a byte >= 0x80 in a binary
 * xattr value would be re-encoded as two bytes. Values here are therefore
 * restricted to bytes < 0x80 (which still allows NUL and the binary
 * vfs_cap_data of common capabilities) and checked rather than corrupted.
 */
function paxXattrValue(name: string, v: Buffer | string): string {
  if (typeof v === 'string') return v;
  for (const byte of v) {
    if (byte >= 0x80) throw new Error(`xattr ${name}: binary value byte 0x${byte.toString(16)} >= 0x80 cannot be written exactly by tar-stream`);
  }
  return v.toString('latin1');
}

function typeBits(e: Entry): number {
  switch (e.type) {
    case 'dir':
      return S_IFDIR;
    case 'symlink':
      return S_IFLNK;
    case 'fifo':
      return S_IFIFO;
    case 'char':
      return S_IFCHR;
    case 'block':
      return S_IFBLK;
    default:
      return S_IFREG;
  }
}

function defaultMode(e: Entry): number {
  if (e.type === 'dir') return 0o755;
  if (e.type === 'symlink') return 0o777;
  return 0o644;
}

/**
 * Builds one layer. Parent directories that the layer does not list are
 * emitted (0755 root:root) before their first child, as image builders do;
 * list a directory explicitly (before its children) to give it other
 * attributes.
 */
export async function buildLayer(entries: Entry[]): Promise<BuiltLayer> {
  const tarBuf = await packTar((pack) => fillLayer(pack, entries));
  const gz = zlib.gzipSync(tarBuf, { level: 6 });
  return { tar: tarBuf, gz, diffId: sha256(tarBuf), digest: sha256(gz) };
}

async function fillLayer(pack: tar.Pack, entries: Entry[]): Promise<void> {
  const emittedDirs = new Set<string>();
  const fileAttrs = new Map<string, { mode: number; uid: number; gid: number }>();
  const add = (header: TarHeader, body?: Buffer) => packEntry(pack, header, body);

  const ensureParents = async (p: string) => {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) {
      const dir = parts.slice(0, i).join('/');
      if (emittedDirs.has(dir)) continue;
      emittedDirs.add(dir);
      await addEntry({ type: 'dir', path: dir });
    }
  };

  const addEntry = async (e: Entry): Promise<void> => {
    if (e.type === 'whiteout' || e.type === 'opaque') {
      const name = e.type === 'whiteout' ? path.posix.join(path.posix.dirname(e.path), `.wh.${path.posix.basename(e.path)}`) : `${e.path}/.wh..wh..opq`;
      await ensureParents(name);
      await add({ name, type: 'file', mode: S_IFREG | 0o644, uid: 0, gid: 0, mtime: MTIME, size: 0 }, Buffer.alloc(0));
      return;
    }
    if (e.path.startsWith('/') || e.path === '' || e.path.split('/').includes('..')) throw new Error(`bad layer path ${e.path}`);
    await ensureParents(e.path);
    if (e.type === 'dir') emittedDirs.add(e.path);
    // A hardlink header carries the inode's attributes, and containerd applies
    // them to the inode (as tar does): default them to the target's, as real
    // archivers write them.
    const like = e.type === 'hardlink' ? fileAttrs.get(e.target) : undefined;
    if (e.type === 'hardlink' && !like) throw new Error(`hardlink ${e.path}: target ${e.target} is not a file of this layer`);
    const header: TarHeader = {
      name: e.path,
      mode: typeBits(e) | (e.mode ?? like?.mode ?? defaultMode(e)),
      uid: e.uid ?? like?.uid ?? 0,
      gid: e.gid ?? like?.gid ?? 0,
      mtime: MTIME,
      size: 0,
      type: 'file',
    };
    let body: Buffer | undefined;
    switch (e.type) {
      case 'dir':
        header.type = 'directory';
        break;
      case 'file':
        body = typeof e.content === 'string' ? Buffer.from(e.content, 'utf8') : e.content;
        header.size = body.length;
        break;
      case 'symlink':
        header.type = 'symlink';
        header.linkname = e.target;
        break;
      case 'hardlink':
        header.type = 'link';
        header.linkname = e.target;
        break;
      case 'fifo':
        header.type = 'fifo';
        break;
      case 'char':
      case 'block':
        header.type = e.type === 'char' ? 'character-device' : 'block-device';
        header.devmajor = e.major;
        header.devminor = e.minor;
        break;
    }
    // PAX whenever ustar cannot hold the entry exactly (long or non-ASCII
    // names and link targets) or there are xattrs. tar-stream then puts
    // path/linkpath and our records into one PAX header.
    const pax: Record<string, string> = {};
    for (const [k, v] of Object.entries(e.xattrs ?? {})) pax[`SCHILY.xattr.${k}`] = paxXattrValue(k, v);
    const needPax =
      Object.keys(pax).length > 0 ||
      Buffer.byteLength(e.path) > 100 ||
      !isPlainAscii(e.path) ||
      (header.linkname !== undefined && (Buffer.byteLength(header.linkname) > 100 || !isPlainAscii(header.linkname)));
    if (needPax) header.pax = pax;
    if (e.type === 'file') fileAttrs.set(e.path, { mode: e.mode ?? defaultMode(e), uid: e.uid ?? 0, gid: e.gid ?? 0 });
    await add(header, body);
  };

  for (const e of entries) await addEntry(e);
}

/** containerd's chain IDs: chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i]). */
export function chainIds(diffIds: string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) out.push(out.length === 0 ? d : sha256(`${out[out.length - 1]} ${d}`));
  return out;
}

/** What a test expects to find at a path of the image's final root filesystem. */
export type Expect =
  | { path: string; kind: 'absent' }
  | {
      path: string;
      kind: 'file' | 'dir' | 'symlink' | 'fifo' | 'char' | 'block';
      /** Permission bits incl. setuid/setgid/sticky. */
      mode?: number;
      uid?: number;
      gid?: number;
      content?: string | Buffer;
      target?: string;
      rdev?: [number, number];
      xattrs?: Record<string, Buffer | string>;
      /** Other paths that must be the same inode. */
      sameInodeAs?: string[];
    };

export interface ImageDef {
  /** Repository name in the registry. */
  name: string;
  tag: string;
  layers: Entry[][];
  /** Exact content of /etc/passwd in the final root filesystem. */
  passwd: string;
  expect: Expect[];
}

export interface BuiltImage {
  def: ImageDef;
  layers: BuiltLayer[];
  diffIds: string[];
  chainIds: string[];
  config: Buffer;
  configDigest: string;
  manifest: Buffer;
  manifestDigest: string;
  /** `127.0.0.1:<port>/<name>:<tag>` once pushed. */
  ref?: string;
}

export function ociArch(): string {
  const m: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  const a = m[process.arch];
  if (!a) throw new Error(`no OCI architecture for node arch ${process.arch}`);
  return a;
}

export async function buildImage(def: ImageDef): Promise<BuiltImage> {
  const layers: BuiltLayer[] = [];
  for (const l of def.layers) layers.push(await buildLayer(l));
  const diffIds = layers.map((l) => l.diffId);
  const config = Buffer.from(
    JSON.stringify({
      created: MTIME.toISOString(),
      architecture: ociArch(),
      os: 'linux',
      config: { Env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: ['/bin/sh'], WorkingDir: '/' },
      rootfs: { type: 'layers', diff_ids: diffIds },
      history: layers.map((_, i) => ({ created: MTIME.toISOString(), created_by: `dedup test layer ${i}` })),
    }),
  );
  const configDigest = sha256(config);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_MANIFEST,
      config: { mediaType: MEDIA_CONFIG, digest: configDigest, size: config.length },
      layers: layers.map((l) => ({ mediaType: MEDIA_LAYER_GZIP, digest: l.digest, size: l.gz.length })),
    }),
  );
  return { def, layers, diffIds, chainIds: chainIds(diffIds), config, configDigest, manifest, manifestDigest: sha256(manifest) };
}

/** Writes an OCI image layout holding `img` under the reference name `img.def.tag`. */
export function writeOciLayout(dir: string, img: BuiltImage): void {
  const blobs = path.join(dir, 'blobs', 'sha256');
  fs.mkdirSync(blobs, { recursive: true });
  const put = (digest: string, data: Buffer) => fs.writeFileSync(path.join(blobs, digest.slice('sha256:'.length)), data);
  for (const l of img.layers) put(l.digest, l.gz);
  put(img.configDigest, img.config);
  put(img.manifestDigest, img.manifest);
  fs.writeFileSync(path.join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  fs.writeFileSync(
    path.join(dir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: MEDIA_MANIFEST,
          digest: img.manifestDigest,
          size: img.manifest.length,
          annotations: { 'org.opencontainers.image.ref.name': img.def.tag },
        },
      ],
    }),
  );
}

/** Pushes with skopeo; returns the reference `host:port/name:tag`. */
export async function pushImage(img: BuiltImage, registry: string, workDir: string): Promise<string> {
  const layout = path.join(workDir, `oci-${img.def.name.replace(/[^a-z0-9]/g, '_')}-${img.def.tag}`);
  fs.rmSync(layout, { recursive: true, force: true });
  writeOciLayout(layout, img);
  const policy = path.join(workDir, 'skopeo-policy.json');
  fs.writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }));
  const ref = `${registry}/${img.def.name}:${img.def.tag}`;
  const args = ['copy', '--quiet', '--policy', policy, '--dest-tls-verify=false', `oci:${layout}:${img.def.tag}`, `docker://${ref}`];
  try {
    await run('skopeo', args, { maxBuffer: 64 << 20, timeout: 120_000 });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    throw new Error(`skopeo ${args.join(' ')} failed: ${e.message}\nstdout: ${e.stdout ?? ''}\nstderr: ${e.stderr ?? ''}`);
  }
  img.ref = ref;
  return ref;
}

// ---------------------------------------------------------------------------
// The image set.

const APPLETS = ['sh', 'ash', 'cat', 'ls', 'echo', 'true', 'false', 'id', 'stat', 'sleep', 'mkdir', 'rm', 'touch', 'test', 'wc', 'sha256sum', 'find', 'head', 'env'];

/** Layer 0 of every image: static busybox with applet symlinks and the usual top-level directories. */
function busyboxBase(): Entry[] {
  const bb = fs.readFileSync('/bin/busybox');
  return [
    { type: 'dir', path: 'bin' },
    { type: 'file', path: 'bin/busybox', content: bb, mode: 0o755 },
    ...APPLETS.map((a): Entry => ({ type: 'symlink', path: `bin/${a}`, target: 'busybox' })),
    { type: 'dir', path: 'etc' },
    { type: 'dir', path: 'tmp', mode: 0o1777 },
    { type: 'dir', path: 'root', mode: 0o700 },
    { type: 'dir', path: 'dev' },
    { type: 'dir', path: 'proc' },
    { type: 'dir', path: 'sys' },
    { type: 'dir', path: 'usr' },
    { type: 'dir', path: 'usr/bin' },
    { type: 'symlink', path: 'sbin', target: 'bin' },
  ];
}

export function passwdFor(marker: string): string {
  return [
    'root:x:0:0:root:/root:/bin/sh',
    'nobody:x:65534:65534:nobody:/nonexistent:/bin/false',
    `dedup:x:1000:1000:${marker}:/home/dedup:/bin/sh`,
    '',
  ].join('\n');
}

const GROUP = 'root:x:0:\nnogroup:x:65534:\ndedup:x:1000:\n';

/** Deterministic pseudo-random bytes (for large duplicated data). */
export function pseudoRandom(n: number, seed: string): Buffer {
  const out = Buffer.alloc(n);
  let block = crypto.createHash('sha256').update(seed).digest();
  for (let off = 0; off < n; off += block.length) {
    block.copy(out, off);
    block = crypto.createHash('sha256').update(block).digest();
  }
  return out;
}

/** (a) three layers: busybox, /etc, an application layer. */
export function busyboxImageDef(): ImageDef {
  const passwd = passwdFor('busybox-e2e');
  return {
    name: 'dedup-test/busybox',
    tag: 'v1',
    passwd,
    layers: [
      busyboxBase(),
      [
        { type: 'file', path: 'etc/passwd', content: passwd },
        { type: 'file', path: 'etc/group', content: GROUP },
        { type: 'file', path: 'etc/hostname', content: 'dedup\n' },
      ],
      [
        { type: 'dir', path: 'app' },
        { type: 'file', path: 'app/hello.txt', content: 'hello from the application layer\n' },
        { type: 'file', path: 'usr/bin/hello', content: '#!/bin/sh\necho hello\n', mode: 0o755 },
      ],
    ],
    expect: [
      { path: 'bin/busybox', kind: 'file', mode: 0o755 },
      { path: 'bin/sh', kind: 'symlink', target: 'busybox' },
      { path: 'tmp', kind: 'dir', mode: 0o1777 },
      { path: 'root', kind: 'dir', mode: 0o700 },
      { path: 'etc/passwd', kind: 'file', content: passwd },
      { path: 'app/hello.txt', kind: 'file', content: 'hello from the application layer\n' },
      { path: 'usr/bin/hello', kind: 'file', mode: 0o755 },
    ],
  };
}

/** vfs_cap_data revision 2, effective, permitted = CAP_NET_BIND_SERVICE|CAP_NET_RAW (all bytes < 0x80). */
export const CAP_NET_BIND_RAW = (() => {
  const b = Buffer.alloc(20);
  b.writeUInt32LE(0x02000001, 0); // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
  b.writeUInt32LE((1 << 10) | (1 << 13), 4); // permitted[0]
  return b;
})();

const LONG_A = `long-${'a'.repeat(190)}`; // 195 bytes, one component
const LONG_B = `long-${'b'.repeat(200)}`;
const NONASCII_DIR = 'ünïcödé-ďíř';
const NONASCII_FILE = '日本語のファイル名-😀.txt';
const DEEP = Array.from({ length: 60 }, (_, i) => `d${String(i).padStart(2, '0')}`).join('/');

/** (b) the torture image: every tar feature an image can use, and overrides of each across layers. */
export function tortureImageDef(): ImageDef {
  const passwd = passwdFor('torture-e2e');
  const big = pseudoRandom(1 << 20, 'torture-big');
  const longPath = `t/long/${LONG_A}/${LONG_B}/leaf-file`; // > 400 bytes
  const layer1: Entry[] = [
    { type: 'file', path: 'etc/passwd', content: passwdFor('torture-old') },
    { type: 'file', path: 'etc/group', content: GROUP },
    { type: 'dir', path: 't' },
    // Replacements happen in the next layer.
    { type: 'file', path: 't/file-to-dir', content: 'I was a file\n' },
    { type: 'dir', path: 't/dir-to-file' },
    { type: 'file', path: 't/dir-to-file/child', content: 'child of a dir that becomes a file\n' },
    { type: 'dir', path: 't/dir-to-file/sub' },
    { type: 'file', path: 't/dir-to-file/sub/grandchild', content: 'gc\n' },
    { type: 'file', path: 't/link-to-file', content: 'was a file, becomes a symlink\n' },
    { type: 'symlink', path: 't/symlink-to-file', target: 'file-to-dir' },
    { type: 'fifo', path: 't/fifo-to-file', mode: 0o600 },
    // Whiteouts.
    { type: 'dir', path: 't/del' },
    { type: 'file', path: 't/del/a', content: 'deleted in layer 2, recreated in layer 3\n' },
    { type: 'file', path: 't/del/b', content: 'deleted in layer 2\n' },
    { type: 'file', path: 't/del/keep', content: 'kept\n' },
    { type: 'dir', path: 't/gone-dir' },
    { type: 'file', path: 't/gone-dir/x', content: 'x\n' },
    { type: 'dir', path: 't/gone-dir/deeper' },
    { type: 'file', path: 't/gone-dir/deeper/y', content: 'y\n' },
    // Opaque directory.
    { type: 'dir', path: 't/opq', mode: 0o750, uid: 7, gid: 8 },
    { type: 'file', path: 't/opq/old1', content: 'old1\n' },
    { type: 'file', path: 't/opq/old2', content: 'old2\n' },
    { type: 'dir', path: 't/opq/oldsub' },
    { type: 'file', path: 't/opq/oldsub/x', content: 'x\n' },
    // Hardlink group across directories and names.
    { type: 'dir', path: 't/hl' },
    { type: 'file', path: 't/hl/orig', content: 'one inode, four names\n', mode: 0o640, uid: 1000, gid: 1000 },
    { type: 'hardlink', path: 't/hl/link1', target: 't/hl/orig' },
    { type: 'dir', path: 't/hl/sub' },
    { type: 'hardlink', path: 't/hl/sub/link2', target: 't/hl/orig' },
    { type: 'hardlink', path: 't/hl-other-dir-link', target: 't/hl/orig' },
    { type: 'file', path: 't/hl/pair-a', content: 'second group\n' },
    { type: 'hardlink', path: 't/hl/pair-b', target: 't/hl/pair-a' },
    // Special files.
    { type: 'fifo', path: 't/fifo', mode: 0o644 },
    { type: 'dir', path: 't/dev' },
    { type: 'char', path: 't/dev/null', major: 1, minor: 3, mode: 0o666 },
    { type: 'char', path: 't/dev/tty-ish', major: 4, minor: 64, mode: 0o620, uid: 0, gid: 5 },
    { type: 'block', path: 't/dev/loop7', major: 7, minor: 7, mode: 0o660, gid: 6 },
    // Mode bits and owners.
    { type: 'file', path: 't/suid', content: 'setuid\n', mode: 0o4755 },
    { type: 'file', path: 't/sgid', content: 'setgid\n', mode: 0o2755, gid: 50 },
    { type: 'file', path: 't/suid-sgid-odd', content: 'odd\n', mode: 0o6511, uid: 2, gid: 3 },
    { type: 'dir', path: 't/sticky', mode: 0o1777 },
    { type: 'file', path: 't/sticky/inside', content: 'in sticky\n', mode: 0o600, uid: 1000 },
    { type: 'dir', path: 't/sgid-dir', mode: 0o2775, gid: 100 },
    { type: 'file', path: 't/mode-0000', content: 'no permissions\n', mode: 0o000 },
    { type: 'file', path: 't/owned', content: 'owned\n', uid: 1000, gid: 2000 },
    { type: 'dir', path: 't/owned-dir', uid: 123, gid: 456, mode: 0o711 },
    { type: 'file', path: 't/high-ids', content: 'high ids\n', uid: 200000, gid: 200001 },
    { type: 'symlink', path: 't/owned-symlink', target: 'owned', uid: 33, gid: 34 },
    // Extended attributes.
    { type: 'file', path: 't/cap', content: 'has file capabilities\n', mode: 0o755, xattrs: { 'security.capability': CAP_NET_BIND_RAW } },
    { type: 'file', path: 't/xattr-file', content: 'user xattrs\n', xattrs: { 'user.foo': 'bar', 'user.binaryish': Buffer.from([0, 1, 2, 0x7f, 0]) } },
    { type: 'dir', path: 't/xattr-dir', xattrs: { 'user.dir-attr': 'on a directory' } },
    // Long, non-ASCII and deep names.
    { type: 'dir', path: 't/long' },
    { type: 'file', path: longPath, content: 'at the end of a long path\n' },
    { type: 'file', path: `t/long/${LONG_A}/short`, content: 'short name under a long one\n' },
    { type: 'symlink', path: 't/long/symlink-long-target', target: `${LONG_A}/${LONG_B}/leaf-file` },
    { type: 'hardlink', path: 't/long/hardlink-long-target', target: longPath },
    { type: 'dir', path: `t/${NONASCII_DIR}` },
    { type: 'file', path: `t/${NONASCII_DIR}/${NONASCII_FILE}`, content: 'ünïcödé content ✓\n' },
    { type: 'symlink', path: 't/symlink-nonascii', target: `${NONASCII_DIR}/${NONASCII_FILE}` },
    { type: 'file', path: `t/deep/${DEEP}/leaf`, content: 'sixty levels down\n' },
    // Symlinks of every kind.
    { type: 'symlink', path: 't/sym-rel', target: '../etc/passwd' },
    { type: 'symlink', path: 't/sym-abs', target: '/etc/passwd' },
    { type: 'symlink', path: 't/sym-dangling', target: 'does/not/exist' },
    { type: 'symlink', path: 't/sym-dir', target: 'hl' },
    { type: 'symlink', path: 't/sym-loop', target: 'sym-loop' },
    // Large data, duplicated later.
    { type: 'file', path: 't/big1', content: big },
    { type: 'file', path: 't/empty', content: '' },
  ];
  const layer2: Entry[] = [
    { type: 'file', path: 'etc/passwd', content: passwd },
    { type: 'dir', path: 't' },
    // file -> dir, dir -> file, file -> symlink, symlink -> file, fifo -> file
    { type: 'dir', path: 't/file-to-dir', mode: 0o705 },
    { type: 'file', path: 't/file-to-dir/inside', content: 'now a directory\n' },
    { type: 'file', path: 't/dir-to-file', content: 'now a file\n', mode: 0o600 },
    { type: 'symlink', path: 't/link-to-file', target: 'suid' },
    { type: 'file', path: 't/symlink-to-file', content: 'was a symlink\n' },
    { type: 'file', path: 't/fifo-to-file', content: 'was a fifo\n' },
    // whiteouts, also of a whole tree
    { type: 'dir', path: 't/del' },
    { type: 'whiteout', path: 't/del/a' },
    { type: 'whiteout', path: 't/del/b' },
    { type: 'whiteout', path: 't/gone-dir' },
    // opaque
    { type: 'dir', path: 't/opq', mode: 0o750, uid: 7, gid: 8 },
    { type: 'opaque', path: 't/opq' },
    { type: 'file', path: 't/opq/new1', content: 'new after opaque\n' },
    // metadata-only changes (copy-up) of lower files
    { type: 'file', path: 't/suid', content: 'setuid\n', mode: 0o4750, uid: 0, gid: 1000 },
    { type: 'file', path: 't/xattr-file', content: 'user xattrs\n', xattrs: { 'user.foo': 'changed', 'user.added': 'new' } },
    // A new name for a file of the lower layer: as a builder's diff of an
    // overlay upper dir has it, the layer carries the (copied-up) file and
    // the link; the lower names keep their own inode. (containerd cannot
    // apply a hardlink whose target is only in a lower layer.)
    { type: 'dir', path: 't/hl' },
    { type: 'file', path: 't/hl/orig', content: 'one inode, four names\n', mode: 0o640, uid: 1000, gid: 1000 },
    { type: 'hardlink', path: 't/hl/late-link', target: 't/hl/orig' },
    // duplicate of big1's data
    { type: 'file', path: 't/big2', content: big },
    // a directory new in this layer
    { type: 'dir', path: 't/fresh' },
    { type: 'file', path: 't/fresh/f', content: 'fresh\n' },
  ];
  const layer3: Entry[] = [
    { type: 'dir', path: 't' },
    { type: 'dir', path: 't/del' },
    { type: 'file', path: 't/del/a', content: 'recreated\n', mode: 0o751 },
    { type: 'file', path: 't/gone-dir', content: 'the deleted directory is back as a file\n' },
    { type: 'dir', path: 't/opq', mode: 0o750, uid: 7, gid: 8 },
    { type: 'dir', path: 't/opq/nested' },
    { type: 'opaque', path: 't/opq/nested' },
    { type: 'file', path: 't/opq/nested/n', content: 'n\n' },
    { type: 'dir', path: 't/file-to-dir', mode: 0o705 },
    { type: 'whiteout', path: 't/file-to-dir/inside' },
    { type: 'file', path: 't/file-to-dir/second', content: 'second\n' },
    { type: 'char', path: 't/dev-late', major: 1, minor: 5, mode: 0o644 },
    { type: 'whiteout', path: 't/sym-loop' },
  ];
  return {
    name: 'dedup-test/torture',
    tag: 'v1',
    passwd,
    layers: [busyboxBase(), layer1, layer2, layer3],
    expect: [
      { path: 'etc/passwd', kind: 'file', content: passwd },
      { path: 't/file-to-dir', kind: 'dir', mode: 0o705 },
      { path: 't/file-to-dir/inside', kind: 'absent' },
      { path: 't/file-to-dir/second', kind: 'file', content: 'second\n' },
      { path: 't/dir-to-file', kind: 'file', content: 'now a file\n', mode: 0o600 },
      { path: 't/link-to-file', kind: 'symlink', target: 'suid' },
      { path: 't/symlink-to-file', kind: 'file', content: 'was a symlink\n' },
      { path: 't/fifo-to-file', kind: 'file', content: 'was a fifo\n' },
      { path: 't/del/a', kind: 'file', content: 'recreated\n', mode: 0o751 },
      { path: 't/del/b', kind: 'absent' },
      { path: 't/del/keep', kind: 'file', content: 'kept\n' },
      { path: 't/gone-dir', kind: 'file', content: 'the deleted directory is back as a file\n' },
      { path: 't/opq', kind: 'dir', mode: 0o750, uid: 7, gid: 8 },
      { path: 't/opq/old1', kind: 'absent' },
      { path: 't/opq/oldsub', kind: 'absent' },
      { path: 't/opq/new1', kind: 'file', content: 'new after opaque\n' },
      { path: 't/opq/nested/n', kind: 'file', content: 'n\n' },
      { path: 't/hl/link1', kind: 'file', content: 'one inode, four names\n', uid: 1000, gid: 1000, mode: 0o640, sameInodeAs: ['t/hl/sub/link2', 't/hl-other-dir-link'] },
      { path: 't/hl/late-link', kind: 'file', content: 'one inode, four names\n', sameInodeAs: ['t/hl/orig'] },
      { path: 't/hl/pair-a', kind: 'file', sameInodeAs: ['t/hl/pair-b'] },
      { path: 't/fifo', kind: 'fifo', mode: 0o644 },
      { path: 't/dev/null', kind: 'char', rdev: [1, 3], mode: 0o666 },
      { path: 't/dev/tty-ish', kind: 'char', rdev: [4, 64], mode: 0o620, gid: 5 },
      { path: 't/dev/loop7', kind: 'block', rdev: [7, 7], mode: 0o660, gid: 6 },
      { path: 't/dev-late', kind: 'char', rdev: [1, 5] },
      { path: 't/suid', kind: 'file', mode: 0o4750, gid: 1000 },
      { path: 't/sgid', kind: 'file', mode: 0o2755, gid: 50 },
      { path: 't/suid-sgid-odd', kind: 'file', mode: 0o6511, uid: 2, gid: 3 },
      { path: 't/sticky', kind: 'dir', mode: 0o1777 },
      { path: 't/sgid-dir', kind: 'dir', mode: 0o2775, gid: 100 },
      { path: 't/mode-0000', kind: 'file', mode: 0o000 },
      { path: 't/owned', kind: 'file', uid: 1000, gid: 2000 },
      { path: 't/owned-dir', kind: 'dir', uid: 123, gid: 456, mode: 0o711 },
      { path: 't/high-ids', kind: 'file', uid: 200000, gid: 200001 },
      { path: 't/owned-symlink', kind: 'symlink', target: 'owned', uid: 33, gid: 34 },
      { path: 't/cap', kind: 'file', xattrs: { 'security.capability': CAP_NET_BIND_RAW } },
      { path: 't/xattr-file', kind: 'file', xattrs: { 'user.foo': 'changed', 'user.added': 'new' } },
      { path: 't/xattr-dir', kind: 'dir', xattrs: { 'user.dir-attr': 'on a directory' } },
      { path: longPath, kind: 'file', content: 'at the end of a long path\n', sameInodeAs: ['t/long/hardlink-long-target'] },
      { path: 't/long/symlink-long-target', kind: 'symlink', target: `${LONG_A}/${LONG_B}/leaf-file` },
      { path: `t/${NONASCII_DIR}/${NONASCII_FILE}`, kind: 'file', content: 'ünïcödé content ✓\n' },
      { path: `t/deep/${DEEP}/leaf`, kind: 'file', content: 'sixty levels down\n' },
      { path: 't/sym-abs', kind: 'symlink', target: '/etc/passwd' },
      { path: 't/sym-dangling', kind: 'symlink', target: 'does/not/exist' },
      { path: 't/sym-loop', kind: 'absent' },
      { path: 't/big1', kind: 'file', content: big },
      { path: 't/big2', kind: 'file', content: big },
      { path: 't/empty', kind: 'file', content: '' },
    ],
  };
}

export const CHAIN_LAYERS = 40;

/** (c) a chain of 40 layers; each adds, changes and deletes something. */
export function chainImageDef(): ImageDef {
  const layers: Entry[][] = [busyboxBase()];
  let passwd = '';
  for (let i = 1; i < CHAIN_LAYERS; i++) {
    const n = String(i).padStart(2, '0');
    const l: Entry[] = [
      { type: 'dir', path: 'chain' },
      { type: 'file', path: `chain/add-${n}`, content: `added in layer ${i}\n` },
      { type: 'file', path: 'chain/counter', content: `${i}\n` },
    ];
    if (i >= 4) l.push({ type: 'whiteout', path: `chain/add-${String(i - 3).padStart(2, '0')}` });
    if (i % 10 === 0) {
      l.push({ type: 'dir', path: 'chain/box' }, { type: 'opaque', path: 'chain/box' }, { type: 'file', path: `chain/box/only-${n}`, content: `${i}\n` });
    } else {
      l.push({ type: 'dir', path: 'chain/box' }, { type: 'file', path: `chain/box/item-${n}`, content: `${i}\n` });
    }
    if (i === 1 || i === 17 || i === 33) {
      passwd = passwdFor(`chain-layer-${i}`);
      l.push({ type: 'file', path: 'etc/passwd', content: passwd });
    }
    if (i === 25) l.push({ type: 'whiteout', path: 'etc/passwd' });
    // Every add-NN is whited out three layers later, so hl-09..hl-36 outlive
    // their first name; hl-38 keeps its group.
    if (i % 9 === 0 || i === 38) l.push({ type: 'hardlink', path: `chain/hl-${n}`, target: `chain/add-${n}` });
    if (i % 13 === 0) l.push({ type: 'fifo', path: `chain/fifo-${n}` });
    layers.push(l);
  }
  const last = CHAIN_LAYERS - 1;
  return {
    name: 'dedup-test/chain',
    tag: 'v1',
    passwd,
    layers,
    expect: [
      { path: 'etc/passwd', kind: 'file', content: passwd },
      { path: 'chain/counter', kind: 'file', content: `${last}\n` },
      { path: `chain/add-${last}`, kind: 'file' },
      { path: `chain/add-${last - 3}`, kind: 'absent' },
      { path: 'chain/add-01', kind: 'absent' },
      { path: 'chain/box/only-30', kind: 'file', content: '30\n' },
      { path: 'chain/box/item-29', kind: 'absent' },
      { path: 'chain/box/item-39', kind: 'file' },
      { path: 'chain/hl-36', kind: 'file', content: 'added in layer 36\n' },
      { path: 'chain/add-36', kind: 'absent' },
      { path: 'chain/hl-38', kind: 'file', content: 'added in layer 38\n', sameInodeAs: ['chain/add-38'] },
      { path: 'chain/fifo-26', kind: 'fifo' },
    ],
  };
}

/** Size of the large file of bigFileImageDef: above the size from which the directory path takes a file into the store in place (ADOPT_MIN). */
export const BIG_FILE_BYTES = (34 << 20) + 4321;
export const BIG_FILE_IMAGE = 'dedup-test/big-file';

/**
 * (d) a large file (and a second name for it) over busybox: on the
 * directory path the daemon takes it into the store where it lies instead
 * of copying it; its last piece is short. Distinct 1 MiB pieces.
 */
export function bigFileImageDef(): ImageDef {
  const piece = pseudoRandom(1 << 20, 'big-file-piece');
  const big = Buffer.alloc(BIG_FILE_BYTES);
  for (let off = 0, i = 0; off < big.length; off += piece.length, i++) {
    piece.copy(big, off);
    if (off + 4 <= big.length) big.writeUInt32LE(i, off);
  }
  const passwd = passwdFor('big-file');
  return {
    name: BIG_FILE_IMAGE,
    tag: 'v1',
    passwd,
    layers: [
      busyboxBase(),
      [
        { type: 'file', path: 'etc/passwd', content: passwd },
        { type: 'dir', path: 'data' },
        { type: 'file', path: 'data/big', content: big, mode: 0o640, uid: 1000, gid: 1000 },
        { type: 'hardlink', path: 'data/big-again', target: 'data/big' },
        { type: 'file', path: 'data/small', content: 'small\n' },
      ],
    ],
    expect: [
      { path: 'etc/passwd', kind: 'file', content: passwd },
      { path: 'data/big', kind: 'file', content: big, mode: 0o640 },
      { path: 'data/big-again', kind: 'file', content: big, sameInodeAs: ['data/big'] },
      { path: 'data/small', kind: 'file', content: 'small\n' },
    ],
  };
}
