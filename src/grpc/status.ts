import { status } from '@grpc/grpc-js';
import type { ServerErrorResponse } from '@grpc/grpc-js';
import { type ErrorKind, SnapshotterError, kindOf, messageOf } from '../errdefs/errors';

/** The one table from error kinds to gRPC codes (containerd's errgrpc). */
const CODES: Record<ErrorKind, status> = {
  InvalidArgument: status.INVALID_ARGUMENT,
  NotFound: status.NOT_FOUND,
  AlreadyExists: status.ALREADY_EXISTS,
  FailedPrecondition: status.FAILED_PRECONDITION,
  Unavailable: status.UNAVAILABLE,
  NotImplemented: status.UNIMPLEMENTED,
  Internal: status.INTERNAL,
};

/** Classifies errors thrown below the snapshotter (SQLite, filesystem). */
export function classify(err: unknown): SnapshotterError {
  if (err instanceof SnapshotterError) return err;
  const code = (err as { code?: unknown })?.code;
  if (typeof code === 'string') {
    if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') {
      return new SnapshotterError('Unavailable', `metadata database busy, retry: ${messageOf(err)}`, { cause: err });
    }
    if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'SQLITE_FULL') {
      return new SnapshotterError('Unavailable', `no space left for snapshotter data: ${messageOf(err)}`, { cause: err });
    }
  }
  return new SnapshotterError(kindOf(err), messageOf(err), { cause: err });
}

export function toGrpcError(err: unknown): ServerErrorResponse & { code: status } {
  const e = classify(err);
  return Object.assign(new Error(e.message), { code: CODES[e.kind], details: e.message });
}

export function grpcCodeOf(kind: ErrorKind): status {
  return CODES[kind];
}
