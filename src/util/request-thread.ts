import { Worker, parentPort } from 'node:worker_threads';

/** A request as it travels to a RequestThread's worker: its number and what is asked. */
interface Envelope<Q> {
  id: number;
  request: Q;
}
/** The worker's answer: the result, or the error with the fields Node's fs errors carry. */
interface Reply<R> {
  id: number;
  result?: R;
  error?: { message: string; code?: string; errno?: number; syscall?: string; path?: string };
}

/**
 * One worker thread that answers requests one at a time, in order (the
 * worker script calls serveRequests). Started with the first request and
 * kept while the process lives, unref'd while idle so it never holds the
 * process open. A thread that dies fails what it was asked; the next
 * request starts another.
 */
export class RequestThread<Q, R> {
  private worker: Worker | null = null;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (r: R) => void; reject: (err: Error) => void }>();

  /** `script`: the worker's file; `name` is in the error when the thread exits. */
  constructor(
    private readonly script: string,
    private readonly name: string,
  ) {}

  request(request: Q): Promise<R> {
    const worker = this.started();
    const id = this.nextId++;
    return new Promise<R>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      if (this.waiting.size === 1) worker.ref();
      try {
        worker.postMessage({ id, request } satisfies Envelope<Q>);
      } catch (err) {
        // Not sent (a request that cannot be cloned): nothing will answer it.
        this.waiting.delete(id);
        if (this.waiting.size === 0) worker.unref();
        reject(err as Error);
      }
    });
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const w = new Worker(this.script);
    w.unref();
    w.on('message', (m: Reply<R>) => this.answer(m));
    w.on('error', (err) => this.failAll(w, err));
    // An answer that cannot be read leaves its request without one: the thread is given up.
    w.on('messageerror', (err) => {
      this.failAll(w, err);
      void w.terminate();
    });
    w.on('exit', (code) => this.failAll(w, new Error(`the ${this.name} thread exited (code ${code})`)));
    this.worker = w;
    return w;
  }

  private answer(m: Reply<R>): void {
    const w = this.waiting.get(m.id);
    if (!w) return;
    this.waiting.delete(m.id);
    if (this.waiting.size === 0) this.worker?.unref();
    if (!m.error) return w.resolve(m.result as R);
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

/** The worker's side of a RequestThread: answers each request with `handle`'s result (synchronous: a promise cannot be posted), or the error it threw. */
export function serveRequests<Q, R>(what: string, handle: (request: Q) => R extends PromiseLike<unknown> ? never : R): void {
  const port = parentPort;
  if (!port) throw new Error(`${what} started outside a worker thread`);
  port.on('message', ({ id, request }: Envelope<Q>) => {
    let reply: Reply<R>;
    try {
      reply = { id, result: handle(request) };
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      reply = { id, error: { message: e.message, code: e.code, errno: e.errno, syscall: e.syscall, path: e.path } };
    }
    port.postMessage(reply);
  });
}
