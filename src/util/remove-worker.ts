/** The remover thread (see remover.ts): removes the trees it is sent, one at a time, in order. */
import { parentPort } from 'node:worker_threads';
import { removeTreeSync } from './fs';
import type { RemoveReply, RemoveRequest } from './remover';

const port = parentPort;
if (!port) throw new Error('remove-worker started outside a worker thread');
port.on('message', (m: RemoveRequest) => {
  let reply: RemoveReply;
  try {
    removeTreeSync(Buffer.from(m.path));
    reply = { id: m.id };
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    reply = { id: m.id, error: { message: e.message, code: e.code, errno: e.errno, syscall: e.syscall, path: e.path } };
  }
  port.postMessage(reply);
});
