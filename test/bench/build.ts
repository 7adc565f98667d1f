/**
 * The benchmark's image set, built once and cached (BENCH_CACHE, default
 * /var/cache/dedup-bench, one subdirectory per BUILD_VERSION):
 *
 *   base A   debootstrap --variant=minbase bookworm
 *   base B   the same debootstrap run again (a "rebuilt base": same
 *            packages, other timestamps and generated files)
 *   py-a     apt-get install python3 on A         (overlay upper dir → layer)
 *   py-b     apt-get install python3 on B
 *   web-b    apt-get install python3 nginx-light on B
 *   big      one 512 MiB pseudo-random (deterministic) file /big
 *
 * Images: base-a [A], base-b [B], python-a [A, py-a], python-b [B, py-b],
 * web-b [B, web-b], bigfile [A, big]. One OCI image layout holds them all
 * (one tag each); `images.json` marks a complete build.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { type LayerInfo, dirToLayer } from './layer';
import { log, onCleanup, sh, umount } from './util';

export const BUILD_VERSION = 'v1-bookworm-minbase';
export const SUITE = 'bookworm';
export const BIG_FILE_BYTES = 512 << 20;
export const BIG_FILE_PATH = '/big';

export interface BenchImage {
  /** Tag in the OCI layout and repository name suffix: bench/<name>:latest. */
  name: string;
  layers: string[]; // layer names
  manifestDigest: string;
}

export interface BuildResult {
  version: string;
  dir: string;
  ociDir: string;
  mirror: string;
  layers: Record<string, LayerInfo>;
  images: BenchImage[];
  buildSeconds: number;
}

const MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const CONFIG = 'application/vnd.oci.image.config.v1+json';
const LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';

const APP_LAYERS: { name: string; base: string; packages: string[] }[] = [
  { name: 'py-a', base: 'base-a', packages: ['python3'] },
  { name: 'py-b', base: 'base-b', packages: ['python3'] },
  { name: 'web-b', base: 'base-b', packages: ['python3', 'nginx-light'] },
];

const IMAGES: { name: string; layers: string[] }[] = [
  { name: 'base-a', layers: ['base-a'] },
  { name: 'base-b', layers: ['base-b'] },
  { name: 'python-a', layers: ['base-a', 'py-a'] },
  { name: 'python-b', layers: ['base-b', 'py-b'] },
  { name: 'web-b', layers: ['base-b', 'web-b'] },
  { name: 'bigfile', layers: ['base-a', 'big'] },
];

export function cacheDir(): string {
  return path.join(process.env.BENCH_CACHE ?? '/var/cache/dedup-bench', BUILD_VERSION);
}

/** The Debian mirror this host's apt uses (sources.list or deb822 .sources). */
export function debianMirror(): string {
  const files = ['/etc/apt/sources.list'];
  try {
    for (const f of fs.readdirSync('/etc/apt/sources.list.d')) files.push(path.join('/etc/apt/sources.list.d', f));
  } catch {
    /* none */
  }
  for (const f of files) {
    let text = '';
    try {
      text = fs.readFileSync(f, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n')) {
      const m = /^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)/.exec(line);
      if (m && /\/debian\/?$/.test(m[1])) return m[1].replace(/\/$/, '');
    }
  }
  return 'http://deb.debian.org/debian';
}

async function ensureTools(): Promise<void> {
  const missing: string[] = [];
  for (const [bin, pkg] of [
    ['debootstrap', 'debootstrap'],
    ['chroot', 'coreutils'],
  ]) {
    const r = await sh('sh', ['-c', `command -v ${bin} || true`]);
    if (r.stdout.trim() === '') missing.push(pkg);
  }
  if (missing.length > 0) {
    log(`installing ${missing.join(' ')}`);
    await sh('apt-get', ['install', '-y', '--no-install-recommends', ...missing], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  }
}

async function debootstrap(dir: string, name: string, mirror: string): Promise<string> {
  const target = path.join(dir, `rootfs-${name}`);
  const done = `${target}.done`;
  if (fs.existsSync(done)) return target;
  fs.rmSync(target, { recursive: true, force: true });
  const debs = path.join(dir, 'debs');
  fs.mkdirSync(debs, { recursive: true });
  log(`debootstrap --variant=minbase ${SUITE} → rootfs-${name}`);
  const t = Date.now();
  await sh('debootstrap', ['--variant=minbase', `--cache-dir=${debs}`, SUITE, target, mirror], { timeoutMs: 1_800_000 });
  // What a container image carries: no package archives, no host resolver config.
  for (const f of fs.readdirSync(path.join(target, 'var/cache/apt/archives'))) {
    if (f.endsWith('.deb')) fs.rmSync(path.join(target, 'var/cache/apt/archives', f));
  }
  fs.writeFileSync(path.join(target, 'etc/resolv.conf'), '');
  fs.writeFileSync(done, `${new Date().toISOString()}\n`);
  log(`rootfs-${name} done in ${((Date.now() - t) / 1000).toFixed(0)} s`);
  return target;
}

/** apt-get install in a chroot on an overlay of `lower`; the upper dir is the new layer. */
async function aptLayer(dir: string, name: string, lower: string, packages: string[]): Promise<string> {
  const upper = path.join(dir, `upper-${name}`);
  const done = `${upper}.done`;
  if (fs.existsSync(done)) return upper;
  const work = path.join(dir, `work-${name}`);
  const merged = path.join(dir, `merged-${name}`);
  for (const d of [upper, work, merged]) {
    fs.rmSync(d, { recursive: true, force: true });
    fs.mkdirSync(d, { recursive: true });
  }
  log(`apt-get install ${packages.join(' ')} on ${path.basename(lower)} → upper-${name}`);
  const t = Date.now();
  const mounted: string[] = [];
  const unmountAll = async () => {
    while (mounted.length > 0) await umount(mounted.pop() as string);
  };
  const unregister = onCleanup(`unmount ${merged}`, unmountAll);
  try {
    await sh('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${upper},workdir=${work},index=off,redirect_dir=off,metacopy=off`, merged]);
    mounted.push(merged);
    await sh('mount', ['-t', 'proc', 'proc', path.join(merged, 'proc')]);
    mounted.push(path.join(merged, 'proc'));
    await sh('mount', ['--bind', '/dev', path.join(merged, 'dev')]);
    mounted.push(path.join(merged, 'dev'));
    await sh('mount', ['--bind', '-o', 'ro', '/etc/resolv.conf', path.join(merged, 'etc/resolv.conf')]);
    mounted.push(path.join(merged, 'etc/resolv.conf'));
    // No service may start on the host from a postinst (nginx).
    const policy = path.join(merged, 'usr/sbin/policy-rc.d');
    fs.writeFileSync(policy, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
    const script = [
      'set -e',
      'apt-get update -qq',
      `apt-get install -y -qq --no-install-recommends ${packages.join(' ')}`,
      'apt-get clean',
      'rm -rf /var/lib/apt/lists/*',
    ].join('\n');
    await sh('chroot', [merged, '/bin/sh', '-c', script], {
      timeoutMs: 1_800_000,
      env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', DEBIAN_FRONTEND: 'noninteractive', LANG: 'C.UTF-8', HOME: '/root' },
    });
    fs.rmSync(policy);
  } finally {
    await unmountAll();
    unregister();
  }
  fs.rmSync(work, { recursive: true, force: true });
  fs.rmSync(merged, { recursive: true, force: true });
  fs.writeFileSync(done, `${new Date().toISOString()}\n`);
  log(`upper-${name} done in ${((Date.now() - t) / 1000).toFixed(0)} s`);
  return upper;
}

/** A deterministic pseudo-random file (AES-256-CTR keystream of a fixed key). */
function bigFileDir(dir: string): string {
  const src = path.join(dir, 'big-src');
  const done = `${src}.done`;
  if (fs.existsSync(done)) return src;
  fs.rmSync(src, { recursive: true, force: true });
  fs.mkdirSync(src, { recursive: true });
  log(`writing ${BIG_FILE_BYTES >> 20} MiB pseudo-random ${BIG_FILE_PATH}`);
  const key = crypto.createHash('sha256').update('dedup-bench big file').digest();
  const c = crypto.createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  const fd = fs.openSync(path.join(src, BIG_FILE_PATH.slice(1)), 'w', 0o644);
  try {
    const zero = Buffer.alloc(4 << 20);
    for (let off = 0; off < BIG_FILE_BYTES; off += zero.length) fs.writeSync(fd, c.update(zero.subarray(0, Math.min(zero.length, BIG_FILE_BYTES - off))));
  } finally {
    fs.closeSync(fd);
  }
  fs.writeFileSync(done, `${new Date().toISOString()}\n`);
  return src;
}

function ociArch(): string {
  const m: Record<string, string> = { x64: 'amd64', arm64: 'arm64' };
  const a = m[process.arch];
  if (!a) throw new Error(`no OCI architecture for node arch ${process.arch}`);
  return a;
}

function putBlob(ociDir: string, data: Buffer): string {
  const hex = crypto.createHash('sha256').update(data).digest('hex');
  fs.writeFileSync(path.join(ociDir, 'blobs', 'sha256', hex), data);
  return `sha256:${hex}`;
}

/** Builds (or loads from the cache) every layer and image; returns where they are. */
export async function buildImages(): Promise<BuildResult> {
  const dir = cacheDir();
  const ociDir = path.join(dir, 'oci');
  const resultFile = path.join(dir, 'images.json');
  if (fs.existsSync(resultFile)) {
    const r = JSON.parse(fs.readFileSync(resultFile, 'utf8')) as BuildResult;
    log(`using cached images in ${dir} (built in ${r.buildSeconds.toFixed(0)} s; delete ${resultFile} to rebuild)`);
    return r;
  }
  const t0 = Date.now();
  fs.mkdirSync(dir, { recursive: true });
  await ensureTools();
  const mirror = debianMirror();
  log(`building the image set in ${dir} from ${mirror}`);
  const blobDir = path.join(ociDir, 'blobs', 'sha256');
  fs.mkdirSync(blobDir, { recursive: true });

  const layerDirs: Record<string, { dir: string; upper: boolean }> = {};
  layerDirs['base-a'] = { dir: await debootstrap(dir, 'a', mirror), upper: false };
  layerDirs['base-b'] = { dir: await debootstrap(dir, 'b', mirror), upper: false };
  for (const a of APP_LAYERS) layerDirs[a.name] = { dir: await aptLayer(dir, a.name, layerDirs[a.base].dir, a.packages), upper: true };
  layerDirs.big = { dir: bigFileDir(dir), upper: false };

  const layers: Record<string, LayerInfo> = {};
  const layerCacheDir = path.join(dir, 'layers');
  fs.mkdirSync(layerCacheDir, { recursive: true });
  for (const [name, l] of Object.entries(layerDirs)) {
    const infoFile = path.join(layerCacheDir, `${name}.json`);
    if (fs.existsSync(infoFile)) {
      layers[name] = JSON.parse(fs.readFileSync(infoFile, 'utf8')) as LayerInfo;
      continue;
    }
    log(`layer ${name}: tar+gzip of ${path.basename(l.dir)}`);
    const info = await dirToLayer(l.dir, blobDir, { upper: l.upper, emptyDirs: l.upper ? [] : ['dev', 'proc', 'sys'] });
    log(
      `layer ${name}: ${(info.logicalBytes / 1e6).toFixed(1)} MB in ${info.files} files, ${info.whiteouts} whiteouts, ${info.opaques} opaque dirs, blob ${(info.size / 1e6).toFixed(1)} MB`,
    );
    fs.writeFileSync(infoFile, JSON.stringify(info));
    layers[name] = info;
  }

  const created = new Date().toISOString();
  const images: BenchImage[] = [];
  const index: unknown[] = [];
  for (const img of IMAGES) {
    const ls = img.layers.map((n) => layers[n]);
    const config = Buffer.from(
      JSON.stringify({
        created,
        architecture: ociArch(),
        os: 'linux',
        config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: ['/bin/bash'], WorkingDir: '/' },
        rootfs: { type: 'layers', diff_ids: ls.map((l) => l.diffId) },
        history: img.layers.map((n) => ({ created, created_by: `dedup-bench layer ${n}` })),
      }),
    );
    const configDigest = putBlob(ociDir, config);
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MANIFEST,
        config: { mediaType: CONFIG, digest: configDigest, size: config.length },
        layers: ls.map((l) => ({ mediaType: LAYER_GZIP, digest: l.digest, size: l.size })),
      }),
    );
    const manifestDigest = putBlob(ociDir, manifest);
    index.push({ mediaType: MANIFEST, digest: manifestDigest, size: manifest.length, annotations: { 'org.opencontainers.image.ref.name': img.name } });
    images.push({ name: img.name, layers: img.layers, manifestDigest });
  }
  fs.writeFileSync(path.join(ociDir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  fs.writeFileSync(path.join(ociDir, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: index }));
  const result: BuildResult = { version: BUILD_VERSION, dir, ociDir, mirror, layers, images, buildSeconds: (Date.now() - t0) / 1000 };
  fs.writeFileSync(resultFile, JSON.stringify(result));
  log(`image set built in ${result.buildSeconds.toFixed(0)} s`);
  return result;
}
