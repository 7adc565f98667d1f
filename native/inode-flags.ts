/**
 * Inode flags (linux/fs.h, what chattr(1) sets): FS_IOC_GETFLAGS and
 * FS_IOC_SETFLAGS on an open file or directory. The kernel reads and
 * writes an unsigned int, whatever the ioctl numbers' `long` says; the
 * numbers and the little-endian read are those of 64-bit x86 and arm
 * (the daemon's platforms).
 */
import koffi from 'koffi';
import { ErrnoError, ioctlPtr } from './libc';

/** _IOR('f', 1, long). */
const FS_IOC_GETFLAGS = 0x80086601;
/** _IOW('f', 2, long). */
const FS_IOC_SETFLAGS = 0x40086602;

/**
 * chattr's `T`: the directory is the top of directory hierarchies. ext2/3/4
 * place each new subdirectory of such a directory the way they place
 * directories made in the filesystem's root (Orlov: a block group with few
 * directories and many free inodes and blocks), instead of next to it.
 */
export const FS_TOPDIR_FL = 0x00020000;

/** The flags of the file open on `fd`. Throws ErrnoError (ENOTTY, EOPNOTSUPP: the filesystem has none). */
export function inodeFlags(fd: number): number {
  const arg = Buffer.alloc(8);
  if (ioctlPtr()(fd, FS_IOC_GETFLAGS, arg) < 0) throw new ErrnoError('ioctl(FS_IOC_GETFLAGS)', koffi.errno(), '');
  return arg.readUInt32LE(0);
}

/** Sets the flags of the file open on `fd` to `flags`. Throws ErrnoError (EOPNOTSUPP: a flag this filesystem does not keep). */
export function setInodeFlags(fd: number, flags: number): void {
  const arg = Buffer.alloc(8);
  arg.writeUInt32LE(flags >>> 0, 0);
  if (ioctlPtr()(fd, FS_IOC_SETFLAGS, arg) < 0) throw new ErrnoError('ioctl(FS_IOC_SETFLAGS)', koffi.errno(), '');
}
