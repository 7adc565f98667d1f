/**
 * Kernel facts the probes (probes.ts) and the doctor's checks need: the
 * release as numbers, the build configuration where the kernel exposes it,
 * its symbols, its registered filesystems (/proc/filesystems is read here
 * only), module files, and the minimum versions of the features the
 * snapshotter uses.
 */
import fs from 'node:fs';
import zlib from 'node:zlib';

export type KernelVersion = readonly [number, number, number];

/** "6.18.44-fc-v669" → [6, 18, 44]; null when the release does not start with a version. */
export function parseRelease(release: string): KernelVersion | null {
  const m = /^(\d+)\.(\d+)(?:\.(\d+))?/.exec(release);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)] : null;
}

export function atLeast(v: KernelVersion, need: readonly [number, number]): boolean {
  return v[0] > need[0] || (v[0] === need[0] && v[1] >= need[1]);
}

/** The kernel version each feature needs (mainline). */
export const KERNEL_NEEDS = {
  erofs: [5, 4],
  fscacheOndemand: [5, 19],
  fileBacked: [6, 12],
  directio: [6, 13],
  preContent: [6, 14],
} as const satisfies Record<string, readonly [number, number]>;

export function needs(feature: keyof typeof KERNEL_NEEDS): string {
  const [a, b] = KERNEL_NEEDS[feature];
  return `>= ${a}.${b}`;
}

export interface KernelConfig {
  /** Where it was read from: /boot/config-<release> or /proc/config.gz. */
  source: string;
  /** CONFIG_X → "y", "m" or a value; options "is not set" are absent. */
  options: Map<string, string>;
}

/** Parses a kernel .config text. */
export function parseKernelConfig(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^(CONFIG_[A-Za-z0-9_]+)=(.*)$/.exec(line.trim());
    if (m) out.set(m[1], m[2]);
  }
  return out;
}

/**
 * The running kernel's build configuration from /boot/config-<release> or
 * /proc/config.gz, or null with the reasons neither could be read.
 */
export function readKernelConfig(release: string): { config: KernelConfig | null; tried: string[] } {
  const tried: string[] = [];
  const boot = `/boot/config-${release}`;
  try {
    return { config: { source: boot, options: parseKernelConfig(fs.readFileSync(boot, 'utf8')) }, tried };
  } catch (err) {
    tried.push(`${boot}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const proc = '/proc/config.gz';
  try {
    const text = zlib.gunzipSync(fs.readFileSync(proc)).toString('utf8');
    return { config: { source: proc, options: parseKernelConfig(text) }, tried };
  } catch (err) {
    tried.push(`${proc}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return { config: null, tried };
}

/**
 * Which of `names` the running kernel has as symbols (built in, or in a
 * loaded module), from /proc/kallsyms; null when it cannot be read. Tells
 * whether a feature was built when the kernel's config is not readable.
 */
export function kernelSymbols(names: string[]): Set<string> | null {
  let text: string;
  try {
    text = fs.readFileSync('/proc/kallsyms', 'latin1');
  } catch {
    return null;
  }
  const found = new Set<string>();
  for (const n of names) if (new RegExp(`^\\S+ \\S ${n}(\\s|$)`, 'm').test(text)) found.add(n);
  return found;
}

/** Filesystem names in /proc/filesystems, or null when it cannot be read. */
export function procFilesystems(): string[] | null {
  try {
    return fs
      .readFileSync('/proc/filesystems', 'utf8')
      .split('\n')
      .map((l) => l.trim().split(/\s+/).pop() ?? '')
      .filter((n) => n !== '');
  } catch {
    return null;
  }
}

/** Whether /lib/modules/<release> has a module file for fs/<name> (loaded on demand by mount(2) or modprobe). */
export function moduleFileExists(release: string, dir: string, name: string): boolean {
  const base = `/lib/modules/${release}/kernel/fs/${dir}/${name}.ko`;
  return ['', '.xz', '.zst', '.gz'].some((ext) => fs.existsSync(base + ext));
}
