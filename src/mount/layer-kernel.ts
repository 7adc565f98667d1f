import fs from 'node:fs';
import { openElsewhere } from '../../native/lease';
import type { Logger } from '../log/logger';
import { dropPageCacheUnder } from './stale-pages';
import { type ErofsMountOptions, ErofsMounter, type MountBackend, unmountErofs, unmountIfIdle } from './erofs';
import { mountPoints } from './mountinfo';

/** Where an EROFS-over-fscache mount reads from. */
export interface FscacheSource {
  fsid: string;
  domainId: string;
  device: string;
}

/** What /stats tells of the layer mounts. */
export interface MountFacts {
  /** The EROFS mount backend in use, once the first mount decided it. */
  readonly current: MountBackend | null;
  readonly directIoInUse: 'auto' | boolean;
  readonly readAheadInUse: number | null;
}

/**
 * Everything the snapshotter and the layer services ask of the kernel, in
 * one seam: the real one (SystemKernel) makes mounts; tests may put a fake
 * in its place and run the whole lifecycle without mounts or root.
 */
export interface LayerKernel extends MountFacts {
  /**
   * Mounts EROFS `image` read-only on `target` (created) unless something is
   * mounted there; its extra devices are the chunk store's files (`hasBlob`),
   * or `device` (a lazy layer's own data file).
   */
  mountImage(image: string, target: string, hasBlob: boolean, device?: string): void;
  /** Mounts an EROFS image served through fscache on `target` unless mounted. */
  mountFscache(target: string, src: FscacheSource): Promise<void>;
  /** Unmounts `target` if mounted (detached when busy) and removes the directory. */
  unmount(target: string): void;
  /** Unmounts `target` unless it is busy: true when nothing is mounted there afterwards. */
  unmountIfIdle(target: string): boolean;
  /** The mount points of this mount namespace. */
  mountPoints(): string[];
  /** The mount table as /proc/self/mountinfo has it (a retired directory is kept while a line names it). */
  mountTable(): string;
  /** Whether `file` is open anywhere but here (a lease probe). */
  openElsewhere(file: string): boolean;
  /** Drops the page cache of every file under `root` (a superblock that may hold stale pages). */
  dropPageCache(root: string): Promise<{ files: number; failed: number }>;
  /** Whether overlayfs has an `index` parameter (then mounts pass index=off, as containerd's overlayfs snapshotter). */
  overlayHasIndex(): boolean;
}

/** The kernel: EROFS mounts through ErofsMounter, unmounts, mountinfo, leases. */
export class SystemKernel implements LayerKernel {
  private readonly mounter: ErofsMounter;

  constructor(storeFile: string, opts: ErofsMountOptions & { logger?: Logger } = {}) {
    this.mounter = new ErofsMounter(storeFile, opts);
  }

  get current(): MountBackend | null {
    return this.mounter.current;
  }

  get directIoInUse(): 'auto' | boolean {
    return this.mounter.directIoInUse;
  }

  get readAheadInUse(): number | null {
    return this.mounter.readAheadInUse;
  }

  mountImage(image: string, target: string, hasBlob: boolean, device?: string): void {
    this.mounter.mount(image, target, hasBlob, device);
  }

  mountFscache(target: string, src: FscacheSource): Promise<void> {
    return this.mounter.mountFscache(target, src);
  }

  unmount(target: string): void {
    unmountErofs(target);
  }

  unmountIfIdle(target: string): boolean {
    return unmountIfIdle(target);
  }

  mountPoints(): string[] {
    return mountPoints();
  }

  mountTable(): string {
    return fs.readFileSync('/proc/self/mountinfo', 'utf8');
  }

  openElsewhere(file: string): boolean {
    return openElsewhere(file);
  }

  dropPageCache(root: string): Promise<{ files: number; failed: number }> {
    return dropPageCacheUnder(root);
  }

  overlayHasIndex(): boolean {
    return fs.existsSync('/sys/module/overlay/parameters/index');
  }
}
