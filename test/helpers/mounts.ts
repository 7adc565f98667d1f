/**
 * The mount table of this mount namespace for tests: listing, leftover
 * checks and unmounting everything below a directory. Every test (unit,
 * conformance, end-to-end) lists and detaches mounts through this module.
 */
import path from 'node:path';
import { unmount } from '../../src/mount/mount';
import { type MountEntry, isMountPoint, listMounts, mountPoints } from '../../src/mount/mountinfo';

export { type MountEntry, isMountPoint, listMounts, mountPoints };

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
