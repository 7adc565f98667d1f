import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { MNT_DETACH, MS_RDONLY, mount, umount2 } from '../../native/mount';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { isMountPoint } from './mountinfo';
import { deviceReadAheadKb, erofsBdis, newBdi, setBdiReadAheadKb } from './readahead';

/**
 * Read-only EROFS mounts of layer images, each naming the chunk store as its
 * extra device (`device=`).
 *
 * - file-backed (Linux ≥ 6.12): the image file itself is the mount source and
 *   the store file the device. With `directio` (where the kernel has it) file
 *   data is read from the store with direct I/O: cached once, in the layer's
 *   page cache, instead of a second time in the store file's. The mount's
 *   read-ahead is raised to the store device's (see readahead.ts).
 * - loop: for older kernels, the image goes on a loop device released when
 *   it is unmounted (autoclear), and the store on one shared read-only loop
 *   device whose size is refreshed before each mount (the store grows).
 *
 * `auto` tries file-backed first and falls back to loop for good when the
 * kernel refuses a regular-file source (ENOTBLK); `directio` likewise when the
 * kernel does not know the option (EINVAL, and the same mount without it
 * works). Each choice is logged once.
 */
export type MountBackend = 'file-backed' | 'loop';
export type MountMode = 'auto' | MountBackend;

export interface ErofsMountOptions {
  mode?: MountMode;
  /** Read file data from the store with direct I/O (file-backed mounts): detect, or force on or off. */
  directIo?: 'auto' | boolean;
  /** Read-ahead of file-backed mounts, KiB; 'auto': the store device's, at least one chunk. */
  readAheadKb?: 'auto' | number;
  /** The store's chunk size (bytes), the least 'auto' read-ahead. */
  chunkSize?: number;
  logger?: Logger;
  /**
   * The files a store image reads as its extra devices, in device order
   * (its device table); absent: the one chunk store file.
   */
  devicesOf?: (image: string) => string[];
  /** mount(2); tests substitute it. */
  mountFn?: typeof mount;
}

export class ErofsMountError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ErofsMountError';
  }
}

function errCode(err: unknown): string | undefined {
  return (err as { code?: string }).code;
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
  private directIo: 'auto' | boolean;
  private readAhead: number | null = null;
  private blobLoop: string | null = null;
  private readonly log: Logger;
  private readonly sysMount: typeof mount;

  constructor(
    private readonly blob: string,
    private readonly opts: ErofsMountOptions = {},
  ) {
    const mode = opts.mode ?? 'auto';
    this.backend = mode === 'auto' ? null : mode;
    this.directIo = opts.directIo ?? 'auto';
    this.log = opts.logger ?? silentLogger();
    this.sysMount = opts.mountFn ?? mount;
  }

  /** The backend in use, once the first mount decided it. */
  get current(): MountBackend | null {
    return this.backend;
  }

  /** Whether file-backed mounts use direct I/O; 'auto' until the first file-backed mount decided it. */
  get directIoInUse(): 'auto' | boolean {
    return this.directIo;
  }

  /** The read-ahead (KiB) given to file-backed mounts, once the first one resolved it. */
  get readAheadInUse(): number | null {
    return this.readAhead;
  }

  /**
   * Mounts `image` read-only on `target` unless something is mounted there
   * already. Its extra device is the chunk store, or `device` (a lazy
   * layer's own file: file-backed mounts only).
   */
  mount(image: string, target: string, hasBlob: boolean, device?: string): void {
    fs.mkdirSync(target, { recursive: true, mode: 0o755 });
    if (isMountPoint(target)) return;
    if (device && this.backend === 'loop') throw this.error(image, target, new Error('layers loaded on demand need file-backed EROFS mounts (mount_backend "loop" is in use)'));
    let devices: string[];
    try {
      devices = device ? [device] : hasBlob ? (this.opts.devicesOf?.(image) ?? [this.blob]) : [];
    } catch (err) {
      throw this.error(image, target, err);
    }
    if (this.backend === 'loop') return this.mountLoop(image, target, devices);
    const before = erofsBdis();
    try {
      this.withDeviceOptions(devices, (options) => this.mountFile(image, target, options));
    } catch (err) {
      if (this.backend === null && errCode(err) === 'ENOTBLK' && !device) {
        this.decide('loop', 'this kernel has no file-backed EROFS mounts (Linux < 6.12)');
        return this.mountLoop(image, target, devices);
      }
      throw this.error(image, target, err);
    }
    if (this.backend === null) this.decide('file-backed', 'the kernel mounts EROFS image files directly');
    this.tuneReadAhead(newBdi(before, erofsBdis()), target);
  }

  /**
   * Mounts an EROFS over fscache (on-demand mode) on `target`: `fsid` names
   * the metadata blob, `device` the data blob, `domainId` the domain whose
   * mounts share blobs (and their page cache). Asynchronous: the kernel
   * reads the metadata through cachefiles while mount(2) runs, and this
   * process answers those reads, so the call runs in mount(8).
   */
  async mountFscache(target: string, o: { fsid: string; domainId: string; device: string }): Promise<void> {
    fs.mkdirSync(target, { recursive: true, mode: 0o755 });
    if (isMountPoint(target)) return;
    for (const v of [o.fsid, o.domainId, o.device]) if (!/^[A-Za-z0-9._-]{1,200}$/.test(v)) throw new ErofsMountError(`fscache blob name ${JSON.stringify(v)} is not one EROFS can take`);
    const options = `ro,fsid=${o.fsid},domain_id=${o.domainId},device=${o.device}`;
    await new Promise<void>((resolve, reject) => {
      execFile('mount', ['-t', 'erofs', '-o', options, 'none', target], { encoding: 'utf8' }, (err, _out, stderr) => {
        if (!err) return resolve();
        const why = String(stderr || err.message).trim();
        reject(new ErofsMountError(`cannot mount EROFS over fscache (${options}) on ${target}: ${why}`, { cause: err }));
      });
    });
  }

  /**
   * Runs `fn` with one `device=` option per device. mount(2) takes one page
   * of options: past about 3 KiB of paths (many segments, a long ROOT) each
   * device is opened here and named by its /proc/self/fd link instead,
   * closed again once the kernel has opened its own.
   */
  private withDeviceOptions(devices: string[], fn: (options: string[]) => void): void {
    if (devices.reduce((n, d) => n + d.length + 8, 0) <= 3072) return fn(devices.map((d) => `device=${d}`));
    const fds: number[] = [];
    try {
      for (const d of devices) fds.push(fs.openSync(d, 'r'));
      fn(fds.map((fd) => `device=/proc/self/fd/${fd}`));
    } finally {
      for (const fd of fds) fs.closeSync(fd);
    }
  }

  /** mount(2) of the image file, with `directio` unless it is off or this kernel lacks it. */
  private mountFile(image: string, target: string, options: string[]): void {
    const data = (o: string[]) => (o.length > 0 ? o.join(',') : null);
    if (this.directIo === false) return this.sysMount(image, target, 'erofs', MS_RDONLY, data(options));
    try {
      this.sysMount(image, target, 'erofs', MS_RDONLY, data([...options, 'directio']));
    } catch (err) {
      if (this.directIo === true || errCode(err) !== 'EINVAL') throw err;
      // Unknown option, or a bad image: the same mount without it tells.
      this.sysMount(image, target, 'erofs', MS_RDONLY, data(options));
      this.directIo = false;
      this.log.info({ op: 'mount', direct_io: false }, 'EROFS file-backed mounts read the chunk store through its page cache: this kernel has no EROFS directio option');
      return;
    }
    if (this.directIo === 'auto') {
      this.directIo = true;
      this.log.info({ op: 'mount', direct_io: true }, 'EROFS file-backed mounts read the chunk store with direct I/O (directio)');
    }
  }

  /** The read-ahead (KiB) for file-backed mounts, resolved on first use. */
  private readAheadKb(): number {
    if (this.readAhead === null) {
      const configured = this.opts.readAheadKb ?? 'auto';
      if (configured === 'auto') {
        const device = deviceReadAheadKb(this.blob) ?? deviceReadAheadKb(path.dirname(this.blob));
        const chunk = Math.ceil((this.opts.chunkSize ?? 0) / 1024);
        this.readAhead = Math.max(device ?? 0, chunk, 128);
        this.log.info(
          { op: 'mount', read_ahead_kb: this.readAhead, device_read_ahead_kb: device, chunk_kb: chunk },
          `EROFS file-backed mounts read ahead ${this.readAhead} KiB (the chunk store's device: ${device === null ? 'unknown' : `${device} KiB`}, one chunk: ${chunk} KiB)`,
        );
      } else {
        this.readAhead = configured;
      }
    }
    return this.readAhead;
  }

  private tuneReadAhead(bdi: string | null, target: string): void {
    if (bdi === null) {
      this.log.debug({ op: 'mount', target }, 'could not tell which bdi the mount got; its read-ahead stays at the kernel default');
      return;
    }
    const kb = this.readAheadKb();
    try {
      setBdiReadAheadKb(bdi, kb);
    } catch (err) {
      this.log.warn({ op: 'mount', target, bdi, err: (err as Error).message }, `cannot set read-ahead of ${bdi} to ${kb} KiB`);
    }
  }

  private decide(backend: MountBackend, why: string): void {
    this.backend = backend;
    this.log.info({ op: 'mount', backend }, `EROFS layers use ${backend} mounts: ${why}`);
  }

  private error(image: string, target: string, err: unknown): ErofsMountError {
    const code = errCode(err);
    let hint = '';
    if (code === 'ENODEV') hint = ' (the kernel has no erofs filesystem: modprobe erofs)';
    else if (code === 'EINVAL' && this.directIo === true && this.backend !== 'loop') hint = ' (direct_io is true: does this kernel\'s EROFS have the directio option? set "direct_io": "auto")';
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

  /**
   * The image on a loop device of its own, chunks.blob on the shared one,
   * each sealed segment (never written again) on a loop device of this mount.
   */
  private mountLoop(image: string, target: string, devices: string[]): void {
    const own: string[] = [];
    try {
      const loops = devices.map((d) => {
        if (d === this.blob) return this.blobDevice();
        const l = losetup(['--find', '--show', '--read-only', d]);
        own.push(l);
        return l;
      });
      const dev = losetup(['--find', '--show', '--read-only', image]);
      own.push(dev);
      this.sysMount(dev, target, 'erofs', MS_RDONLY, loops.length > 0 ? loops.map((l) => `device=${l}`).join(',') : null);
    } catch (err) {
      throw this.error(image, target, err);
    } finally {
      // Detaching a mounted loop device only marks it autoclear: the kernel
      // releases it with the unmount. An unused one goes now.
      for (const l of own) losetup(['-d', l]);
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

/**
 * Unmounts `target` unless it is in use: true when nothing is mounted there
 * afterwards, false when it is busy (left mounted; nothing is detached).
 */
export function unmountIfIdle(target: string): boolean {
  try {
    umount2(target, 0);
    return true;
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'EBUSY') return false;
    if (code === 'EINVAL' || code === 'ENOENT') return !isMountPoint(target);
    throw err;
  }
}
