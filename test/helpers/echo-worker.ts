/** A RequestThread worker for request-thread.unit: echoes, throws, or exits, as asked. */
import { serveRequests } from '../../src/util/request-thread';

serveRequests('echo-worker', (q: { say?: string; fail?: string; exit?: number }) => {
  if (q.exit !== undefined) process.exit(q.exit);
  if (q.fail !== undefined) throw Object.assign(new Error(q.fail), { code: 'EFAKE' });
  return q.say;
});
