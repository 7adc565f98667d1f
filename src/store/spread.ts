import fs from 'node:fs';
import { FS_TOPDIR_FL, inodeFlags, setInodeFlags } from '../../native/inode-flags';
import { ErrnoError } from '../../native/libc';

/** What spreadSubdirectories did: the flag is on (set now or before), or the filesystem keeps no such flag (errno name). */
export type SpreadOutcome = { on: true; setNow: boolean } | { on: false; code: string };

/**
 * Marks `dir` as the top of directory hierarchies (chattr +T), so that ext4
 * puts each new subdirectory (a layer directory containerd unpacks into) in
 * a block group of its own choosing, away from the ones just emptied.
 *
 * Why: on the directory path every layer's directory is removed right after
 * its conversion, usually while containerd unpacks the next layer next to it.
 * An ext4 without a journal keeps inodes freed in the last 30 s (330 s while
 * their inode table block is unwritten) out of new allocations, and skips
 * them one buffer-cache lookup per inode, from the start of the group, for
 * every file created: thousands of new files beside thousands just removed
 * cost seconds of CPU in containerd's unpack (measured: docs/benchmarks.md,
 * thirteenth round). With a journal ext4 skips nothing, and the flag only
 * changes where directories go; other filesystems refuse it, which is fine.
 */
export function spreadSubdirectories(dir: string): SpreadOutcome {
  let fd: number;
  try {
    fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  } catch (err) {
    return { on: false, code: (err as NodeJS.ErrnoException).code ?? String(err) };
  }
  try {
    const flags = inodeFlags(fd);
    if ((flags & FS_TOPDIR_FL) !== 0) return { on: true, setNow: false };
    setInodeFlags(fd, flags | FS_TOPDIR_FL);
    // A filesystem may accept the call and keep nothing of it.
    return (inodeFlags(fd) & FS_TOPDIR_FL) !== 0 ? { on: true, setNow: true } : { on: false, code: 'not kept' };
  } catch (err) {
    if (err instanceof ErrnoError) return { on: false, code: err.code };
    throw err;
  } finally {
    fs.closeSync(fd);
  }
}
