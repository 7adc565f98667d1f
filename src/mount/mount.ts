import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Mount } from './types';

const run = promisify(execFile);

/** The kernel copies at most one page of mount data. */
const MOUNT_DATA_MAX = 4096 - 1;

/**
 * Shortens an overlay mount whose options exceed one page, the way
 * containerd's mount package does: the lowerdirs' common parent becomes the
 * working directory of mount(8) and every lowerdir becomes relative to it.
 */
export function compactOverlayOptions(options: string[]): { options: string[]; cwd?: string } {
  if (options.join(',').length <= MOUNT_DATA_MAX) return { options };
  const idx = options.findIndex((o) => o.startsWith('lowerdir='));
  if (idx < 0) return { options };
  const lowers = options[idx].slice('lowerdir='.length).split(':');
  let common = path.dirname(lowers[0]);
  for (const l of lowers) {
    while (!(l === common || l.startsWith(common.endsWith('/') ? common : `${common}/`))) {
      const up = path.dirname(common);
      if (up === common) break;
      common = up;
    }
  }
  const rel = lowers.map((l) => path.relative(common, l) || '.');
  const out = [...options];
  out[idx] = `lowerdir=${rel.join(':')}`;
  if (out.join(',').length > MOUNT_DATA_MAX) {
    throw new Error(`overlay mount options are ${out.join(',').length} bytes even relative to ${common}; over one page`);
  }
  return { options: out, cwd: common };
}

async function mountOne(m: Mount, target: string): Promise<void> {
  let options = m.options;
  let cwd: string | undefined;
  if (m.type === 'overlay') ({ options, cwd } = compactOverlayOptions(m.options));
  const args =
    m.type === 'bind'
      ? ['--bind', ...(options.length ? ['-o', options.join(',')] : []), m.source, target]
      : ['-t', m.type, ...(options.length ? ['-o', options.join(',')] : []), m.source, target];
  try {
    await run('mount', args, { cwd });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`mount -t ${m.type} ${m.source} ${target}: ${(e.stderr || e.message).trim()}`);
  }
  // A bind mount ignores "ro" on the first call in older util-linux; make sure.
  if (m.type === 'bind' && options.includes('ro')) {
    await run('mount', ['-o', 'remount,bind,ro', target]);
  }
}

/** Mounts containerd-style mounts onto target, in order (as mount.All). */
export async function mountAll(mounts: Mount[], target: string): Promise<void> {
  for (const m of mounts) await mountOne(m, m.target ? path.join(target, m.target) : target);
}

/** Unmounts target; with `lazy`, detaches even if busy. */
export async function unmount(target: string, opts: { lazy?: boolean } = {}): Promise<void> {
  try {
    await run('umount', opts.lazy ? ['-l', target] : [target]);
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`umount ${target}: ${(e.stderr || e.message).trim()}`);
  }
}
