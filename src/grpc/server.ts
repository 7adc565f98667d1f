import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from '../log/logger';
import type { Snapshotter } from '../snapshot/snapshotter';
import { snapshotsService } from './proto';
import { type MutationEvent, createSnapshotsHandlers } from './service';

export class SocketInUseError extends Error {
  constructor(readonly address: string) {
    super(`${address} is in use by a running process (another dedup-snapshotter?); stop it or set ADDRESS to another path`);
    this.name = 'SocketInUseError';
  }
}

/** True when something accepts connections on the unix socket. */
function socketAnswers(address: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(address);
    const done = (v: boolean) => {
      c.destroy();
      resolve(v);
    };
    c.once('connect', () => done(true));
    c.once('error', () => done(false));
    c.setTimeout(2000, () => done(false));
  });
}

/**
 * Makes `address` free to bind: a stale socket file (nobody listening) is
 * removed; a live one, or a path that is not a socket, is refused.
 */
export async function prepareSocketPath(address: string): Promise<void> {
  fs.mkdirSync(path.dirname(address), { recursive: true, mode: 0o711 });
  let st: fs.Stats;
  try {
    st = fs.lstatSync(address);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) {
    throw new Error(`${address} exists and is not a socket; refusing to remove it`);
  }
  if (await socketAnswers(address)) throw new SocketInUseError(address);
  fs.unlinkSync(address);
}

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
      await Promise.race([drain(), new Promise((r) => setTimeout(r, graceMs))]);
      try {
        fs.unlinkSync(opts.address);
      } catch {
        /* already gone */
      }
    },
  };
}
