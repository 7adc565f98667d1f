import fs from 'node:fs';
import path from 'node:path';
import { devNumbers } from '../util/fs';

/**
 * Read-ahead of file-backed EROFS mounts.
 *
 * A file-backed EROFS superblock gets its own backing_dev_info, named
 * `erofs-<n>` in /sys/class/bdi, with the kernel's default read-ahead of
 * 128 KiB; the block device under an overlayfs snapshotter's directories
 * usually reads ahead much more (8 MiB on a virtio disk). With direct I/O to
 * the chunk store, the EROFS read-ahead is also how much is in flight, so a
 * 128 KiB window halves sequential reads. Nothing links a mount to its bdi
 * except the moment it appears, so the mounter lists the erofs bdis before
 * and after mount(2) (its mounts are synchronous, one at a time).
 */

const BDI_DIR = '/sys/class/bdi';

/** Names of the EROFS bdis that exist now. */
export function erofsBdis(): Set<string> {
  try {
    return new Set(fs.readdirSync(BDI_DIR).filter((n) => /^erofs-\d+$/.test(n)));
  } catch {
    return new Set();
  }
}

/** The one erofs bdi in `after` that is not in `before`, or null when none or several appeared. */
export function newBdi(before: Set<string>, after: Set<string>): string | null {
  const added = [...after].filter((n) => !before.has(n));
  return added.length === 1 ? added[0] : null;
}

export function setBdiReadAheadKb(bdi: string, kb: number): void {
  fs.writeFileSync(path.join(BDI_DIR, bdi, 'read_ahead_kb'), `${kb}\n`);
}

export function bdiReadAheadKb(bdi: string): number | null {
  return readKb(path.join(BDI_DIR, bdi, 'read_ahead_kb'));
}

/**
 * The read-ahead (KiB) of the block device holding `file`: its queue's, or
 * its disk's for a partition. Null when the filesystem has no block device
 * of its own (tmpfs, overlayfs, btrfs subvolumes) or sysfs does not say.
 */
export function deviceReadAheadKb(file: string): number | null {
  let dev: bigint;
  try {
    dev = fs.statSync(file, { bigint: true }).dev;
  } catch {
    return null;
  }
  const [major, minor] = devNumbers(dev);
  if (major === 0) return null;
  let dir: string;
  try {
    dir = fs.realpathSync(`/sys/dev/block/${major}:${minor}`);
  } catch {
    return null;
  }
  if (fs.existsSync(path.join(dir, 'partition'))) dir = path.dirname(dir);
  return readKb(path.join(dir, 'queue', 'read_ahead_kb'));
}

function readKb(file: string): number | null {
  try {
    const v = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isInteger(v) && v >= 0 ? v : null;
  } catch {
    return null;
  }
}
