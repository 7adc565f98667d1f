/** sync_file_range(2): starts writing a file's dirty pages out without waiting, and without a journal commit. */
import { libc } from './libc';

type SyncFileRangeFn = ((fd: number, offset: number, nbytes: number, flags: number) => number) & {
  async: (fd: number, offset: number, nbytes: number, flags: number, cb: (err: Error | null, res: number) => void) => void;
};

let fn: SyncFileRangeFn | null = null;

const SYNC_FILE_RANGE_WRITE = 2;

function syncFileRange(): SyncFileRangeFn {
  if (!fn) fn = libc().func('int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)') as unknown as SyncFileRangeFn;
  return fn;
}

/**
 * Starts write-out of fd's dirty pages from `offset` to its end (on a
 * thread of the pool: the call may wait for the device's queue). Unlike
 * fdatasync it makes nothing durable and commits no filesystem journal, so
 * it does not also flush what other processes are writing (on ext4 a
 * journal commit waits for every file's newly allocated data). Resolves
 * false when the call failed (the caller may sync instead).
 */
export function startWriteback(fd: number, offset = 0): Promise<boolean> {
  return new Promise((resolve) => {
    try {
      syncFileRange().async(fd, offset, 0, SYNC_FILE_RANGE_WRITE, (err, res) => resolve(!err && res === 0));
    } catch {
      resolve(false);
    }
  });
}
