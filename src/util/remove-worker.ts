/** The remover thread (see remover.ts): removes the trees it is sent, one at a time, in order. */
import { removeTreeSync } from './fs';
import { serveRequests } from './request-thread';

serveRequests('remove-worker', (p: string) => removeTreeSync(Buffer.from(p)));
