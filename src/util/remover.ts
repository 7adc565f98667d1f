import path from 'node:path';
import { Worker } from 'node:worker_threads';

/** A removal the remover thread is asked for, and its answer. */
export interface RemoveRequest {
  id: number;
  path: string;
}
export interface RemoveReply {
  id: number;
  /** The thread's error: its message and, for a system call's, the fields Node's fs errors carry. */
  error?: { message: string; code?: string; errno?: number; syscall?: string; path?: string };
}

/**
 * One thread that removes trees (see removeAll), started with the first
 * removal and kept while the process lives (unref'd while idle, so it never
 * holds the process open). Removing a layer directory is mostly waiting:
 * on a filesystem mounted with `discard`, every freed block run (each
 * directory's, each file whose data reached the disk) is trimmed before
 * unlink or rmdir returns, ~90 µs apiece on a virtio disk, ~0.1 s for a
 * Debian root. On the main thread that wait held up the conversions and
 * containerd's requests.
 */
class Remover {
  private worker: Worker | null = null;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: () => void; reject: (err: Error) => void }>();

  remove(p: string): Promise<void> {
    const worker = this.started();
    const id = this.nextId++;
    return new Promise<void>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      if (this.waiting.size === 1) worker.ref();
      worker.postMessage({ id, path: p } satisfies RemoveRequest);
    });
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const w = new Worker(path.join(__dirname, 'remove-worker.js'));
    w.unref();
    w.on('message', (m: RemoveReply) => this.answer(m));
    // A thread that died fails what it was asked; the next removal starts another.
    w.on('error', (err) => this.failAll(w, err));
    w.on('exit', (code) => this.failAll(w, new Error(`the remover thread exited (code ${code})`)));
    this.worker = w;
    return w;
  }

  private answer(m: RemoveReply): void {
    const w = this.waiting.get(m.id);
    if (!w) return;
    this.waiting.delete(m.id);
    if (this.waiting.size === 0) this.worker?.unref();
    if (!m.error) return w.resolve();
    const err: NodeJS.ErrnoException = new Error(m.error.message);
    const { code, errno, syscall, path: p } = m.error;
    if (code !== undefined) err.code = code;
    if (errno !== undefined) err.errno = errno;
    if (syscall !== undefined) err.syscall = syscall;
    if (p !== undefined) err.path = p;
    w.reject(err);
  }

  private failAll(w: Worker, err: Error): void {
    if (this.worker !== w) return;
    this.worker = null;
    const all = [...this.waiting.values()];
    this.waiting.clear();
    for (const x of all) x.reject(err);
  }
}

let remover: Remover | null = null;

/** Removes tree `p` on the remover thread (see Remover); the error is the thread's, with its code, errno, syscall and path. */
export function removeOnThread(p: string): Promise<void> {
  remover ??= new Remover();
  return remover.remove(p);
}
