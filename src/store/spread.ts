import fs from 'node:fs';
import path from 'node:path';
import { FS_TOPDIR_FL, inodeFlags, setInodeFlags } from '../../native/inode-flags';
import { ErrnoError } from '../../native/libc';
import { devNumbers } from '../util/fs';

/**
 * What spreadSubdirectories did: the flag is on (set now or before); not
 * wanted here (the filesystem is not an ext4 without a journal); not kept by
 * the filesystem (errno name); or refused for another reason (errno name:
 * worth a warning).
 */
export type SpreadOutcome = { on: true; setNow: boolean } | { on: false; why: 'not needed' | 'unsupported' | 'failed'; code?: string };

/** errno names meaning "this filesystem keeps no such flag". */
const UNSUPPORTED = new Set(['ENOTTY', 'EOPNOTSUPP', 'ENOTSUP', 'EINVAL', 'ENOSYS']);

/**
 * Whether `dir` lies on an ext4 without a journal: the sysfs entry of its
 * device (`/sys/dev/block/<major>:<minor>` names it) has
 * `fs/ext4/<device>/journal_task` reading `<none>`. `sysfs` is for tests.
 */
export function onExt4WithoutJournal(dir: string, sysfs = '/sys'): boolean {
  try {
    const name = path.basename(fs.realpathSync(path.join(sysfs, 'dev', 'block', devNumbers(fs.statSync(dir, { bigint: true }).dev).join(':'))));
    return fs.readFileSync(path.join(sysfs, 'fs', 'ext4', name, 'journal_task'), 'utf8').trim() === '<none>';
  } catch {
    return false;
  }
}

/**
 * Marks `dir` as the top of directory hierarchies (chattr +T) where it
 * helps: on an ext4 without a journal. Each new subdirectory (a layer
 * directory containerd unpacks into) is then placed the way ext4 places
 * directories made in the filesystem's root, starting from a hash of its
 * name, instead of next to its siblings, usually away from the layer
 * directory removed a moment before. The flag is not inherited: the
 * layer's own subdirectories stay next to it.
 *
 * Why: on the directory path each converted layer's directory is removed
 * while containerd unpacks the next layer beside it. When an ext4 without
 * a journal allocates an inode it passes over every free inode of the
 * group freed in the last 60 s (360 s while its inode table block is
 * unwritten), one buffer-cache lookup each, from the start of the group,
 * and reuses one only if nothing else is free: thousands of new files
 * beside thousands just removed cost seconds of CPU in containerd's unpack
 * (docs/benchmarks.md, thirteenth round). With a journal ext4 skips
 * nothing, so the flag is left alone there.
 */
export function spreadSubdirectories(dir: string, sysfs = '/sys'): SpreadOutcome {
  if (!onExt4WithoutJournal(dir, sysfs)) return { on: false, why: 'not needed' };
  let fd: number;
  try {
    fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  } catch (err) {
    return { on: false, why: 'failed', code: (err as NodeJS.ErrnoException).code ?? String(err) };
  }
  try {
    const flags = inodeFlags(fd);
    if ((flags & FS_TOPDIR_FL) !== 0) return { on: true, setNow: false };
    setInodeFlags(fd, flags | FS_TOPDIR_FL);
    // A filesystem may accept the call and keep nothing of it.
    return (inodeFlags(fd) & FS_TOPDIR_FL) !== 0 ? { on: true, setNow: true } : { on: false, why: 'unsupported', code: 'not kept' };
  } catch (err) {
    if (err instanceof ErrnoError) return { on: false, why: UNSUPPORTED.has(err.code) ? 'unsupported' : 'failed', code: err.code };
    return { on: false, why: 'failed', code: String(err) };
  } finally {
    fs.closeSync(fd);
  }
}
