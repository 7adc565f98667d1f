/**
 * fs-verity (linux/fsverity.h): a file sealed with FS_IOC_ENABLE_VERITY can
 * no longer be written, and every read of it is checked by the kernel
 * against a Merkle tree; damaged bytes fail the read with EIO. ext4 (made
 * with `-O verity`, 4 KiB blocks), btrfs and f2fs have it, on kernels with
 * CONFIG_FS_VERITY.
 */
import koffi from 'koffi';
import { ErrnoError, errnoName, ioctlPtr as ioctl } from './libc';
import { inodeFlags } from './inode-flags';

/** _IOW('f', 133, struct fsverity_enable_arg) (128 bytes). */
const FS_IOC_ENABLE_VERITY = 0x40806685;
const FS_VERITY_FL = 0x00100000;
const FS_VERITY_HASH_ALG_SHA256 = 1;

/** errno names meaning "this filesystem or kernel has no fs-verity here", not a failure of the call. */
export const VERITY_UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'ENOSYS', 'EINVAL']);

/**
 * Seals the file open (read-only, no writer anywhere) on `fd`: SHA-256,
 * 4 KiB Merkle-tree blocks, no salt, no signature. Throws ErrnoError; its
 * name is in VERITY_UNSUPPORTED when the filesystem cannot (EINVAL: block
 * size other than 4 KiB).
 */
export function enableVerity(fd: number): void {
  const arg = Buffer.alloc(128);
  arg.writeUInt32LE(1, 0); // version
  arg.writeUInt32LE(FS_VERITY_HASH_ALG_SHA256, 4);
  arg.writeUInt32LE(4096, 8); // block_size
  if (ioctl()(fd, FS_IOC_ENABLE_VERITY, arg) < 0) {
    const errno = koffi.errno();
    // EEXIST: sealed already (a retry after a crash).
    if (errnoName(errno) === 'EEXIST') return;
    throw new ErrnoError('ioctl(FS_IOC_ENABLE_VERITY)', errno, '');
  }
}

/** Whether the file open on `fd` is sealed with fs-verity. */
export function hasVerity(fd: number): boolean {
  try {
    return (inodeFlags(fd) & FS_VERITY_FL) !== 0;
  } catch {
    return false;
  }
}

/** _IOWR('f', 134, struct fsverity_digest): the header is 4 bytes, the digest follows. */
const FS_IOC_MEASURE_VERITY = 0xc0046686;

/**
 * The fs-verity digest of the sealed file open on `fd` (hex), computed by
 * the kernel from the file's Merkle tree root: it names the file's whole
 * content. Throws ErrnoError (ENODATA: not sealed).
 */
export function measureVerity(fd: number): string {
  const arg = Buffer.alloc(4 + 64);
  arg.writeUInt16LE(64, 2); // room for the digest
  if (ioctl()(fd, FS_IOC_MEASURE_VERITY, arg) < 0) throw new ErrnoError('ioctl(FS_IOC_MEASURE_VERITY)', koffi.errno(), '');
  const size = arg.readUInt16LE(2);
  return arg.subarray(4, 4 + size).toString('hex');
}
