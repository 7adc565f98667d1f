/**
 * Waits for `p` (its result unused; a failure is thrown) or `ms`
 * milliseconds, whichever comes first; the timer goes with the wait. For
 * bounded waits at shutdown, where a stuck job must not hold up a stop.
 */
export async function waitAtMost(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([p, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
