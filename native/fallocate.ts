/** fallocate(2): gives a freed chunk's blocks back to the filesystem, or takes blocks for a reserve. */
import { check, libc } from './libc';

type FallocateFn = ((fd: number, mode: number, offset: number, len: number) => number) & {
  /** koffi's asynchronous call: on a thread of libuv's pool; errno is kept for the callback. */
  async: (fd: number, mode: number, offset: number, len: number, cb: (err: unknown, ret: number) => void) => void;
};

let fn: FallocateFn | null = null;

const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;

function fallocate(): FallocateFn {
  if (!fn) fn = libc().func('int fallocate(int fd, int mode, int64_t offset, int64_t len)') as unknown as FallocateFn;
  return fn;
}

/** Deallocates [offset, offset+len) of fd; reads there return zeros. */
export function punchHole(fd: number, offset: number, len: number): void {
  check('fallocate(PUNCH_HOLE)', fallocate()(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len), `offset ${offset} len ${len}`);
}

/**
 * punchHole on a thread of libuv's pool: on a filesystem mounted with
 * `discard` a punch waits for the device to trim the blocks (~0.17 s for
 * 512 MiB here), which the event loop should not. The caller keeps `fd`
 * open until the promise settles.
 */
export function punchHoleAsync(fd: number, offset: number, len: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fallocate().async(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len, (err, ret) => {
      if (err) return reject(err as Error);
      try {
        check('fallocate(PUNCH_HOLE)', ret, `offset ${offset} len ${len}`);
        resolve();
      } catch (e) {
        reject(e as Error);
      }
    });
  });
}

/** Allocates real blocks for [offset, offset+len) of fd (mode 0: the file grows); throws ErrnoError ENOSPC when the filesystem has not that much. */
export function allocate(fd: number, offset: number, len: number): void {
  check('fallocate', fallocate()(fd, 0, offset, len), `offset ${offset} len ${len}`);
}
