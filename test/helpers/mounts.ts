/**
 * The mount table of this mount namespace for tests: listing, leftover
 * checks and unmounting everything below a directory. Every test (unit,
 * conformance, end-to-end) lists and detaches mounts through this module.
 */
import fs from 'node:fs';
import path from 'node:path';
import { unmount } from '../../src/mount/mount';

export interface MountEntry {
  /** Mount point. */
  target: string;
  fstype: string;
  /** Mount source as the kernel reports it: a device, a file, or a name such as "overlay". */
  source: string;
  /** Per-mount and file system options, comma-separated (as findmnt's OPTIONS column). */
  options: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * Every mount of this mount namespace, from /proc/self/mountinfo, in the
 * order the mounts were made (parents before children, newest last).
 */
export function listMounts(): MountEntry[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      // id parent major:minor root target mount-options [optional fields...] - fstype source super-options
      const f = l.split(' ');
      const sep = f.indexOf('-', 6);
      const [fstype = '', source = '', superOptions = ''] = f.slice(sep + 1);
      const options = [f[5], superOptions].filter((o) => o !== '').join(',');
      return { target: unescapeMountinfo(f[4]), fstype, source: unescapeMountinfo(source), options: unescapeMountinfo(options) };
    });
}

/** Mount points of this mount namespace, in mountinfo order (parents before children). */
export function mountPoints(): string[] {
  return listMounts().map((m) => m.target);
}

export function isMountPoint(p: string): boolean {
  const abs = path.resolve(p);
  return mountPoints().includes(abs);
}

/** Mounts whose target is under `dir`, or whose source/options name a path under it. */
export function mountsUnder(dir: string): MountEntry[] {
  const prefix = dir.endsWith('/') ? dir : `${dir}/`;
  return listMounts().filter((m) => m.target.startsWith(prefix) || m.source.startsWith(prefix) || m.options.includes(prefix));
}

/**
 * Unmounts everything stacked on target, like containerd's mount.UnmountAll.
 * A busy mount is detached lazily so that a test never leaves one behind.
 */
export async function unmountAll(target: string, opts: { lazy?: boolean } = {}): Promise<void> {
  while (isMountPoint(target)) {
    try {
      await unmount(target, { lazy: opts.lazy });
    } catch (err) {
      if (opts.lazy) throw err;
      await unmount(target, { lazy: true });
    }
  }
}

/**
 * Detaches every mount at or below dir. Works from the newest mount back
 * (mountinfo lists mounts in the order they were made), so a mount stacked on
 * top of, or shadowing, another goes first. Returns what it detached; throws
 * if some mount below dir cannot be detached.
 */
export async function unmountUnder(dir: string): Promise<string[]> {
  const root = path.resolve(dir);
  const under = () => mountPoints().filter((m) => m === root || m.startsWith(`${root}/`));
  const done: string[] = [];
  for (let left = under(); left.length > 0; left = under()) {
    let detached = false;
    let lastErr: unknown;
    for (const m of [...left].reverse()) {
      try {
        await unmount(m, { lazy: true });
        done.push(m);
        detached = true;
        break;
      } catch (err) {
        lastErr = err;
      }
    }
    if (!detached) throw new Error(`cannot detach mounts under ${root}: ${left.join(', ')}`, { cause: lastErr });
  }
  return done;
}
