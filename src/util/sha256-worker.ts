/** The hash thread (see sha256-thread.ts): SHA-256 of the shared memory it is sent, one request at a time. */
import crypto from 'node:crypto';
import { serveRequests } from './request-thread';
import type { HashRequest } from './sha256-thread';

serveRequests('sha256-worker', (q: HashRequest) =>
  crypto
    .createHash('sha256')
    .update(new Uint8Array(q.buffer, q.offset, q.length))
    .digest('hex'),
);
