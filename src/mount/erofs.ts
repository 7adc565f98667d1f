import fs from 'node:fs';
import { MNT_DETACH, MS_RDONLY, mount, umount2 } from '../../native/mount';
import { isMountPoint } from './mountinfo';

/**
 * Read-only EROFS mounts of layer images. The image file is mounted directly
 * (file-backed mount, Linux ≥ 6.12), with the chunk store named as its extra
 * device through `device=`. Kernels without file-backed mounts refuse a
 * regular-file source (ENOTBLK/EINVAL); that is reported, not hidden.
 */
export type MountBackend = 'file-backed';

export class ErofsMountError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ErofsMountError';
  }
}

export function erofsSupported(): boolean {
  try {
    return /\berofs\b/.test(fs.readFileSync('/proc/filesystems', 'utf8'));
  } catch {
    return false;
  }
}

export function mountErofs(image: string, target: string, blob: string | null): MountBackend {
  fs.mkdirSync(target, { recursive: true, mode: 0o755 });
  if (isMountPoint(target)) return 'file-backed';
  try {
    mount(image, target, 'erofs', MS_RDONLY, blob ? `device=${blob}` : null);
  } catch (err) {
    const code = (err as { code?: string }).code;
    const hint =
      code === 'ENOTBLK' || code === 'EINVAL'
        ? ' (this kernel may lack file-backed EROFS mounts, Linux >= 6.12)'
        : code === 'ENODEV'
          ? ' (the kernel has no erofs filesystem: modprobe erofs)'
          : '';
    throw new ErofsMountError(`cannot mount ${image} on ${target}: ${(err as Error).message}${hint}`, { cause: err });
  }
  return 'file-backed';
}

/** Unmounts target if mounted (lazily when busy) and removes the directory. */
export function unmountErofs(target: string): void {
  if (isMountPoint(target)) {
    try {
      umount2(target, 0);
    } catch (err) {
      if ((err as { code?: string }).code !== 'EBUSY') throw err;
      umount2(target, MNT_DETACH);
    }
  }
  try {
    fs.rmdirSync(target);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}
