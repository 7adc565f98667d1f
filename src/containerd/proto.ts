/**
 * containerd's API as .proto files (proto/, written from the wire contract),
 * loaded for both sides: clients of containerd (client.ts, the doctor's
 * socket check) and the Snapshots service grpc/ serves.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/** proto/ at the package root, from src/containerd or dist/src/containerd. */
export function protoRoot(): string {
  const candidates = [path.resolve(__dirname, '../../proto'), path.resolve(__dirname, '../../../proto')];
  for (const c of candidates) {
    try {
      fs.accessSync(path.join(c, 'containerd/services/snapshots/v1/snapshots.proto'));
      return c;
    } catch {
      /* try next */
    }
  }
  throw new Error(`cannot find proto/ near ${__dirname}`);
}

export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true,
  longs: String,
  enums: Number,
  defaults: true,
  oneofs: true,
};

let cached: grpc.GrpcObject | undefined;

/** The loaded package definition of containerd's Snapshots service. */
export function snapshotsPackage(): grpc.GrpcObject {
  if (!cached) {
    const root = protoRoot();
    const def = protoLoader.loadSync('containerd/services/snapshots/v1/snapshots.proto', {
      ...LOADER_OPTIONS,
      includeDirs: [root],
    });
    cached = grpc.loadPackageDefinition(def);
  }
  return cached;
}

/** The client/service constructor for containerd.services.snapshots.v1.Snapshots. */
export function snapshotsService(): grpc.ServiceClientConstructor {
  const pkg = snapshotsPackage() as any;
  return pkg.containerd.services.snapshots.v1.Snapshots as grpc.ServiceClientConstructor;
}

let diffCached: grpc.GrpcObject | undefined;

/** The client/service constructor for containerd.services.diff.v1.Diff (the proxy differ the daemon serves). */
export function diffService(): grpc.ServiceClientConstructor {
  if (!diffCached) {
    const def = protoLoader.loadSync('containerd/services/diff/v1/diff.proto', { ...LOADER_OPTIONS, includeDirs: [protoRoot()] });
    diffCached = grpc.loadPackageDefinition(def);
  }
  return (diffCached as any).containerd.services.diff.v1.Diff as grpc.ServiceClientConstructor;
}
