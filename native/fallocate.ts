/** fallocate(2): gives a freed chunk's blocks back to the filesystem. */
import { check, libc } from './libc';

type FallocateFn = (fd: number, mode: number, offset: number, len: number) => number;

let fn: FallocateFn | null = null;

const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;

/** Deallocates [offset, offset+len) of fd; reads there return zeros. */
export function punchHole(fd: number, offset: number, len: number): void {
  if (!fn) fn = libc().func('int fallocate(int fd, int mode, int64_t offset, int64_t len)') as unknown as FallocateFn;
  check('fallocate(PUNCH_HOLE)', fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len), `offset ${offset} len ${len}`);
}
