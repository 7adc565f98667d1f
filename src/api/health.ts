import fs from 'node:fs';
import type { ServedParts } from './parts';

/**
 * What GET /healthz checks: the gRPC socket is in place, the metadata
 * database answers, the chunk store is readable and writable, is still the
 * file the daemon writes, and no layer is quarantined. Null when all
 * hold, else the first problem, in words an operator can act on.
 */
export function healthProblem(opts: { stopping: boolean; grpcAddress: string; parts: Pick<ServedParts, 'metastore' | 'store' | 'integrity'> }): string | null {
  if (opts.stopping) return 'shutting down';
  try {
    if (!fs.lstatSync(opts.grpcAddress).isSocket()) return `gRPC socket ${opts.grpcAddress} is not a socket any more`;
  } catch {
    return `gRPC socket ${opts.grpcAddress} is gone (containerd cannot reach the snapshotter; restart the daemon)`;
  }
  try {
    opts.parts.metastore.db.prepare('SELECT 1').get();
  } catch (err) {
    return `metadata database: ${(err as Error).message}`;
  }
  // A deleted or replaced store file, or layers not served because their data is damaged.
  const integrity = opts.parts.integrity?.healthProblem();
  if (integrity) return integrity;
  if (opts.parts.store) {
    try {
      fs.accessSync(opts.parts.store.blobPath, fs.constants.R_OK | fs.constants.W_OK);
    } catch (err) {
      return `chunk store: ${(err as Error).message}`;
    }
  }
  return null;
}
