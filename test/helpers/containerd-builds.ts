import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/**
 * The containerd builds the tests run against: the system's (Debian 12's
 * 1.6, in PATH) and the newer ones `../shared/tools/debian-newer/fetch.sh`
 * unpacks (2.x from sid, 1.7 from trixie; Go binaries that run on Debian
 * 12's libc). Their directories come from the environment as fetch.sh
 * prints them (CONTAINERD_2_BIN, CONTAINERD_1_7_BIN), else from fetch.sh's
 * default cache. `DEDUP_CONTAINERD` (1.6, 1.7 or 2) picks the one a Stack
 * starts by default, so any end-to-end file runs on another version as it is.
 */
export interface ContainerdBuild {
  /** "1.6", "1.7", "2". */
  name: string;
  /** Directory of containerd, ctr and containerd-shim-runc-v2; null: the ones in PATH. */
  bin: string | null;
  /** containerd's own version (`containerd --version`). */
  version: string;
  major: number;
  minor: number;
}

const CANDIDATES: { name: string; env: string; cache: string }[] = [
  { name: '1.7', env: 'CONTAINERD_1_7_BIN', cache: 'containerd-1.7/usr/bin' },
  { name: '2', env: 'CONTAINERD_2_BIN', cache: 'containerd-2/usr/bin' },
];

function versionOf(containerd: string): { version: string; major: number; minor: number } | null {
  try {
    const out = execFileSync(containerd, ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 10_000 });
    const m = /\s(v?(\d+)\.(\d+)\.\d+[^\s]*)/.exec(out);
    return m ? { version: m[1], major: Number(m[2]), minor: Number(m[3]) } : null;
  } catch {
    return null;
  }
}

/** Where fetch.sh unpacks its builds: $DEBIAN_NEWER_CACHE, else its default caches. */
function debianNewerCaches(): string[] {
  return [process.env.DEBIAN_NEWER_CACHE, '/var/cache/debian-newer', '/var/tmp/debian-newer'].filter((d): d is string => typeof d === 'string' && d !== '');
}

/** The bin directory of fetch.sh's erofs-utils 1.8 ($EROFS_UTILS_1_8_BIN, else its cache) when it has `program`, else null. */
export function newerErofsUtilsDir(program: 'mkfs.erofs' | 'fsck.erofs'): string | null {
  const dirs = [process.env.EROFS_UTILS_1_8_BIN, ...debianNewerCaches().map((d) => path.join(d, 'erofs-utils-1.8/bin'))];
  return dirs.find((d): d is string => typeof d === 'string' && d !== '' && fs.existsSync(path.join(d, program))) ?? null;
}

let cached: { builds: ContainerdBuild[]; missing: { name: string; reason: string }[] } | null = null;

/** Every containerd build found here, the system's first, and why the others are not. */
export function containerdBuilds(): { builds: ContainerdBuild[]; missing: { name: string; reason: string }[] } {
  if (cached) return cached;
  const builds: ContainerdBuild[] = [];
  const missing: { name: string; reason: string }[] = [];
  const system = versionOf('containerd');
  if (system) builds.push({ name: `${system.major}.${system.minor}`, bin: null, ...system });
  else missing.push({ name: 'system', reason: 'no containerd in PATH (apt-get install containerd)' });
  for (const c of CANDIDATES) {
    const dirs = [process.env[c.env], ...debianNewerCaches().map((d) => path.join(d, c.cache))].filter(
      (d): d is string => typeof d === 'string' && d !== '',
    );
    const dir = dirs.find((d) => fs.existsSync(path.join(d, 'containerd')));
    if (!dir) {
      missing.push({ name: c.name, reason: `no containerd ${c.name} binaries (${c.env} unset and none in fetch.sh's cache; run ../shared/tools/debian-newer/fetch.sh)` });
      continue;
    }
    const v = versionOf(path.join(dir, 'containerd'));
    if (!v) {
      missing.push({ name: c.name, reason: `${dir}/containerd does not run here` });
      continue;
    }
    if (!builds.some((b) => b.major === v.major && b.minor === v.minor)) builds.push({ name: c.name, bin: dir, ...v });
    else missing.push({ name: c.name, reason: `${dir}/containerd is ${v.version}, the same major.minor as a build already listed (the system's)` });
  }
  cached = { builds, missing };
  return cached;
}

/** The build DEDUP_CONTAINERD names (default: the system's); throws naming what is missing. */
export function defaultContainerd(): ContainerdBuild {
  const { builds, missing } = containerdBuilds();
  const want = process.env.DEDUP_CONTAINERD;
  if (!want) {
    const sys = builds.find((b) => b.bin === null);
    if (sys) return sys;
    throw new Error(missing.map((m) => m.reason).join('; '));
  }
  const b = builds.find((x) => x.name === want || `${x.major}.${x.minor}` === want || String(x.major) === want);
  if (!b) throw new Error(`DEDUP_CONTAINERD=${want}: ${missing.find((m) => m.name === want)?.reason ?? 'no such build here'}`);
  return b;
}

/** Whether build `b` is `major.minor` or newer. */
export function atLeast(b: ContainerdBuild, major: number, minor: number): boolean {
  return b.major > major || (b.major === major && b.minor >= minor);
}

/** The path of one of a build's programs (containerd, ctr). */
export function programOf(b: ContainerdBuild, name: 'containerd' | 'ctr'): string {
  return b.bin ? path.join(b.bin, name) : name;
}
