/**
 * fcntl(2) F_SETLEASE: a write lease is granted only while no other open
 * file description of the file exists, in any process or in the kernel (a
 * file-backed EROFS superblock keeps its image and device files open until
 * it goes). Taken and given back at once, it tells whether a file is open
 * anywhere else.
 */
import fs from 'node:fs';
import koffi from 'koffi';
import { ErrnoError, fcntl } from './libc';

const F_SETLEASE = 1024;
const F_WRLCK = 1;
const F_UNLCK = 2;
const EAGAIN = 11;

/** Whether `file` is open anywhere but here (ENOENT: it does not exist). Needs to own the file or CAP_LEASE. */
export function openElsewhere(file: string): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    return openElsewhereFd(fd, file);
  } finally {
    fs.closeSync(fd);
  }
}

/** Whether the file open as `fd` here (read-only, this process's only open of it) is open anywhere else too. */
export function openElsewhereFd(fd: number, what: string): boolean {
  if (fcntl(fd, F_SETLEASE, F_WRLCK) < 0) {
    const errno = koffi.errno();
    if (errno === EAGAIN) return true;
    throw new ErrnoError('fcntl', errno, `F_SETLEASE F_WRLCK ${what}`);
  }
  fcntl(fd, F_SETLEASE, F_UNLCK);
  return false;
}
