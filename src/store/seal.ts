import fs from 'node:fs';
import { ErrnoError } from '../../native/libc';
import { VERITY_UNSUPPORTED, enableVerity, hasVerity } from '../../native/verity';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';

/**
 * Seals layer images (written once, never changed) with fs-verity where
 * ROOT's filesystem has it, so the kernel itself fails every read of a
 * damaged image with EIO; elsewhere images are checked against their
 * recorded SHA-256 at start (see layers/integrity.ts). The first image
 * decides, and the choice is logged once.
 */
export class ImageSealer {
  private state: 'unknown' | 'on' | 'off' = 'unknown';
  private readonly log: Logger;

  constructor(opts: { logger?: Logger } = {}) {
    this.log = opts.logger ?? silentLogger();
  }

  /** Whether images are sealed: null until the first image decided it. */
  get inUse(): boolean | null {
    return this.state === 'unknown' ? null : this.state === 'on';
  }

  /** Seals `file` (closed, no writer) if fs-verity is available; returns whether it is sealed. */
  seal(file: string): boolean {
    if (this.state === 'off') return false;
    const fd = fs.openSync(file, 'r');
    try {
      enableVerity(fd);
    } catch (err) {
      if (err instanceof ErrnoError && VERITY_UNSUPPORTED.has(err.code)) {
        if (this.state === 'unknown') this.log.info({ op: 'integrity', err: err.message }, `layer images are not sealed with fs-verity (${err.code}: ROOT's filesystem or the kernel has none); they are checked against their digests at start`);
        this.state = 'off';
        return false;
      }
      // Never fails a conversion: the image is still checked against its digest.
      this.log.warn({ op: 'integrity', image: file, err: (err as Error).message }, `cannot seal ${file} with fs-verity: ${(err as Error).message}`);
      return false;
    } finally {
      fs.closeSync(fd);
    }
    if (this.state === 'unknown') this.log.info({ op: 'integrity' }, 'layer images are sealed with fs-verity: the kernel fails reads of damaged images with EIO');
    this.state = 'on';
    return true;
  }

  /** Whether `file` is sealed (for tests and doctor). */
  static sealed(file: string): boolean {
    const fd = fs.openSync(file, 'r');
    try {
      return hasVerity(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}
