import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { diffService, snapshotsService } from '../containerd/proto';
import type { Logger } from '../log/logger';
import type { Snapshotter } from '../snapshot/snapshotter';
import { prepareSocketPath } from '../util/socket';
import { createDiffHandlers } from './diff-service';
import { type MutationEvent, createSnapshotsHandlers } from './service';
import { waitAtMost } from '../util/wait';

export interface GrpcServerHandle {
  server: grpc.Server;
  /** Resolves when every in-flight call has finished. */
  drain(): Promise<void>;
  shutdown(graceMs?: number): Promise<void>;
}

export async function startGrpcServer(opts: {
  address: string;
  snapshotter: Snapshotter;
  logger: Logger;
  onMutation?: (e: MutationEvent) => void;
}): Promise<GrpcServerHandle> {
  const inflight = new Set<Promise<unknown>>();
  const track = <T>(p: Promise<T>): Promise<T> => {
    inflight.add(p);
    p.finally(() => inflight.delete(p)).catch(() => undefined);
    return p;
  };
  const server = new grpc.Server({
    'grpc.max_receive_message_length': 16 * 1024 * 1024,
  });
  server.addService(
    snapshotsService().service,
    createSnapshotsHandlers({ snapshotter: opts.snapshotter, logger: opts.logger, track, onMutation: opts.onMutation }),
  );
  // The proxy differ "dedup-differ" on the same socket (containerd 2.x's unpack_config selects it).
  const applier = opts.snapshotter.parts.erofs?.applier;
  if (applier) server.addService(diffService().service, createDiffHandlers({ applier, logger: opts.logger, track }));
  await prepareSocketPath(opts.address);
  await new Promise<void>((resolve, reject) => {
    server.bindAsync(`unix:${opts.address}`, grpc.ServerCredentials.createInsecure(), (err) =>
      err ? reject(err) : resolve(),
    );
  });
  fs.chmodSync(opts.address, 0o660);
  const drain = async () => {
    while (inflight.size > 0) await Promise.allSettled([...inflight]);
  };
  return {
    server,
    drain,
    async shutdown(graceMs = 10_000) {
      // Stop accepting, let in-flight calls finish, then force.
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      await waitAtMost(drain(), graceMs);
      try {
        fs.unlinkSync(opts.address);
      } catch {
        /* already gone */
      }
    },
  };
}
