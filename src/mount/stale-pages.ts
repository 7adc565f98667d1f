import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { dropPageCache } from '../../native/libc';

/**
 * Drops the page cache of every regular file under `root` (a directory of
 * an EROFS mount, possibly detached and reached through /proc/self/fd/N):
 * after a lazy layer's data was read as zeros (the fanotify group lost),
 * those zeros sit in its superblock's page cache; once the lazy file has
 * the data, dropping them makes the next read of that superblock (an
 * overlay still using it) read the right bytes. Pages a process has mapped
 * (mmap) are not dropped (posix_fadvise(DONTNEED) skips them). Returns how
 * many files were done and how many could not be.
 */
export async function dropPageCacheUnder(root: string): Promise<{ files: number; failed: number }> {
  let files = 0;
  let failed = 0;
  const walk = async (dir: string): Promise<void> => {
    let entries: fs.Dirent[];
    try {
      entries = await fsp.readdir(dir, { withFileTypes: true });
    } catch {
      failed++;
      return;
    }
    for (const e of entries) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) {
        try {
          const fd = fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
          try {
            dropPageCache(fd);
          } finally {
            fs.closeSync(fd);
          }
          files++;
        } catch {
          failed++;
        }
      }
    }
  };
  await walk(root);
  return { files, failed };
}
