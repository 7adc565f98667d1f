import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { MNT_DETACH, MS_RDONLY, mount, umount2 } from '../../native/mount';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { isMountPoint } from './mountinfo';

/**
 * Read-only EROFS mounts of layer images, each naming the chunk store as its
 * extra device (`device=`).
 *
 * - file-backed (Linux ≥ 6.12): the image file itself is the mount source and
 *   the store file the device; both are read through their page cache.
 * - loop: for older kernels, the image goes on a loop device released when
 *   it is unmounted (autoclear), and the store on one shared read-only loop
 *   device whose size is refreshed before each mount (the store grows).
 *
 * `auto` tries file-backed first and falls back to loop for good when the
 * kernel refuses a regular-file source (ENOTBLK); the choice is logged once.
 */
export type MountBackend = 'file-backed' | 'loop';
export type MountMode = 'auto' | MountBackend;

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

function losetup(args: string[]): string {
  try {
    return execFileSync('losetup', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new ErofsMountError(`losetup ${args.join(' ')}: ${(e.stderr || e.message).trim()}`, { cause: err });
  }
}

export class ErofsMounter {
  private backend: MountBackend | null;
  private blobLoop: string | null = null;
  private readonly log: Logger;

  constructor(
    private readonly blob: string,
    mode: MountMode = 'auto',
    logger?: Logger,
  ) {
    this.backend = mode === 'auto' ? null : mode;
    this.log = logger ?? silentLogger();
  }

  /** The backend in use, once the first mount decided it. */
  get current(): MountBackend | null {
    return this.backend;
  }

  /** Mounts `image` read-only on `target` unless something is mounted there already. */
  mount(image: string, target: string, hasBlob: boolean): void {
    fs.mkdirSync(target, { recursive: true, mode: 0o755 });
    if (isMountPoint(target)) return;
    if (this.backend === 'loop') return this.mountLoop(image, target, hasBlob);
    try {
      mount(image, target, 'erofs', MS_RDONLY, hasBlob ? `device=${this.blob}` : null);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (this.backend === null && code === 'ENOTBLK') {
        this.decide('loop', 'this kernel has no file-backed EROFS mounts (Linux < 6.12)');
        return this.mountLoop(image, target, hasBlob);
      }
      throw this.error(image, target, err);
    }
    if (this.backend === null) this.decide('file-backed', 'the kernel mounts EROFS image files directly');
  }

  private decide(backend: MountBackend, why: string): void {
    this.backend = backend;
    this.log.info({ op: 'mount', backend }, `EROFS layers use ${backend} mounts: ${why}`);
  }

  private error(image: string, target: string, err: unknown): ErofsMountError {
    const code = (err as { code?: string }).code;
    const hint = code === 'ENODEV' ? ' (the kernel has no erofs filesystem: modprobe erofs)' : '';
    return new ErofsMountError(`cannot mount ${image} on ${target}: ${(err as Error).message}${hint}`, { cause: err });
  }

  /** The store's loop device, found again after a restart, its size refreshed and its cache dropped. */
  private blobDevice(): string {
    if (!this.blobLoop) {
      const existing = losetup(['-j', this.blob, '-O', 'NAME,RO', '-n'])
        .split('\n')
        .map((l) => l.trim().split(/\s+/))
        .find((f) => f[0] && f[1] === '1');
      this.blobLoop = existing ? existing[0] : losetup(['--find', '--show', '--read-only', this.blob]);
    }
    // The store grew since the device was set up, and blocks may have been
    // punched and reused: refresh the size and drop the device's cached pages.
    losetup(['-c', this.blobLoop]);
    try {
      execFileSync('blockdev', ['--flushbufs', this.blobLoop], { stdio: 'ignore' });
    } catch (err) {
      throw new ErofsMountError(`blockdev --flushbufs ${this.blobLoop} failed`, { cause: err });
    }
    return this.blobLoop;
  }

  private mountLoop(image: string, target: string, hasBlob: boolean): void {
    const device = hasBlob ? this.blobDevice() : null;
    const dev = losetup(['--find', '--show', '--read-only', image]);
    try {
      mount(dev, target, 'erofs', MS_RDONLY, device ? `device=${device}` : null);
    } catch (err) {
      throw this.error(image, target, err);
    } finally {
      // Detaching a mounted loop device only marks it autoclear: the kernel
      // releases it with the unmount. An unused one goes now.
      losetup(['-d', dev]);
    }
  }
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
