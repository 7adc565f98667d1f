import fs from 'node:fs';
import path from 'node:path';
import { readSuperblock, superblockChecksumOk } from '../convert/erofs-format';
import { isMountPoint } from '../mount/mountinfo';
import type { CheckResult } from './types';

/** Bytes read from each image: the superblock block (block size ≤ 64 KiB). */
const HEAD_BYTES = 65536;

/**
 * The guide's "container start fails" case: every layer image under
 * ROOT/images has a valid EROFS superblock (magic, checksum) and is mounted
 * at ROOT/mnt/<id> (the daemon mounts them at start and keeps them across
 * its own restarts).
 */
export function checkLayerImages(root: string): CheckResult {
  const name = 'images';
  const dir = path.join(root, 'images');
  let files: string[];
  try {
    files = fs.readdirSync(dir).filter((f) => /^\d+\.erofs$/.test(f));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { name, status: 'ok', detail: `no ${dir} yet (no layer has been converted)` };
    return { name, status: 'skip', detail: `cannot list ${dir}: ${(err as Error).message}`, fix: 'run the doctor as root' };
  }
  if (files.length === 0) return { name, status: 'ok', detail: `no layer images in ${dir} yet` };
  const bad: string[] = [];
  const unmounted: string[] = [];
  for (const f of files.sort((a, b) => parseInt(a, 10) - parseInt(b, 10))) {
    const id = f.slice(0, -'.erofs'.length);
    try {
      const fd = fs.openSync(path.join(dir, f), 'r');
      let head: Buffer;
      try {
        head = Buffer.alloc(HEAD_BYTES);
        head = head.subarray(0, fs.readSync(fd, head, 0, HEAD_BYTES, 0));
      } finally {
        fs.closeSync(fd);
      }
      readSuperblock(head);
      if (!superblockChecksumOk(head)) throw new Error('superblock checksum mismatch');
    } catch (err) {
      bad.push(`${id} (${(err as Error).message})`);
      continue;
    }
    if (!isMountPoint(path.join(root, 'mnt', id))) unmounted.push(id);
  }
  if (bad.length > 0) {
    return {
      name,
      status: 'fail',
      detail: `${bad.length} of ${files.length} layer images in ${dir} are not valid EROFS: ${bad.slice(0, 10).join(', ')}${bad.length > 10 ? ', …' : ''}`,
      fix: 'containers on these layers cannot start: remove the images that use them (ctr images rm …) and pull again; docs/operations.md, "Mounting a layer image by hand", shows how to inspect one',
    };
  }
  if (unmounted.length > 0) {
    return {
      name,
      status: 'warn',
      detail: `${unmounted.length} of ${files.length} layer images are not mounted at ${path.join(root, 'mnt')}/<id>: ${unmounted.slice(0, 10).join(', ')}${unmounted.length > 10 ? ', …' : ''}`,
      fix: 'restart the daemon (systemctl restart dedup-snapshotter): it mounts every layer at start; Mounts calls also remount a missing one',
    };
  }
  // The guide's by-hand loop mount of an image reads no file data (it is in the chunk store): say what mounts one.
  return {
    name,
    status: 'ok',
    detail: `${files.length} layer images in ${dir}: superblocks valid, all mounted at ${path.join(root, 'mnt')}/<id>; they hold metadata only (file data is in the chunk store), so a plain "mount -o loop" of one reads EIO: to mount one by hand, dedup-snapshotter mount ${dir}/<id>.erofs DIR`,
  };
}
