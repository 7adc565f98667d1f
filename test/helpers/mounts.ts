import fs from 'node:fs';
import path from 'node:path';
import { unmount } from '../../src/mount/mount';

/** Mount points of this mount namespace, in mountinfo order (parents before children). */
export function mountPoints(): string[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    // Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
    .map((l) => l.split(' ')[4].replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
}

export function isMountPoint(p: string): boolean {
  const abs = path.resolve(p);
  return mountPoints().includes(abs);
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
 * top of, or shadowing, another goes first. Returns what it detached.
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
