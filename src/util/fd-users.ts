import fs from 'node:fs';

/**
 * Descriptors in use by asynchronous operations (reads, writes, syncs on
 * the thread pool): one is never closed under them, since a number closed
 * while a queued operation still holds it can go to another file first, and
 * the operation would land there. `release` closes a descriptor now, or
 * when its last user ends.
 */
export class FdUsers {
  /** Descriptors in use, and by how many operations. */
  private readonly users = new Map<number, number>();
  /** Released while in use: closed by their last user. */
  private readonly closing = new Set<number>();

  /** Runs `fn` on `fd`, which stays open until it ends. */
  async use<T>(fd: number, fn: (fd: number) => Promise<T>): Promise<T> {
    this.users.set(fd, (this.users.get(fd) ?? 0) + 1);
    try {
      return await fn(fd);
    } finally {
      const n = (this.users.get(fd) ?? 1) - 1;
      if (n > 0) {
        this.users.set(fd, n);
      } else {
        this.users.delete(fd);
        if (this.closing.delete(fd)) fs.closeSync(fd);
      }
    }
  }

  /** Closes `fd` now, or when its last user ends. */
  release(fd: number): void {
    if (this.users.has(fd)) this.closing.add(fd);
    else fs.closeSync(fd);
  }
}
