import { setImmediate as yieldToLoop } from 'node:timers/promises';

/**
 * For long runs of synchronous calls (a directory walk of page-cached
 * metadata): the returned function, awaited between calls, yields to the
 * event loop once `ms` milliseconds have passed since the last yield, so
 * requests are served between slices.
 */
export function eventLoopSlices(ms: number): () => Promise<void> {
  let sliceStart = Date.now();
  return async () => {
    if (Date.now() - sliceStart < ms) return;
    await yieldToLoop();
    sliceStart = Date.now();
  };
}
