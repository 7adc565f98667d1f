/**
 * One error taxonomy for the whole daemon, mirroring containerd's errdefs.
 * Every failure that can reach containerd is (or wraps) one of these classes;
 * src/grpc/status.ts maps each class to exactly one gRPC status code, so
 * nothing reaches containerd as UNKNOWN and its retry logic keeps working.
 */

export type ErrorKind =
  | 'InvalidArgument'
  | 'NotFound'
  | 'AlreadyExists'
  | 'FailedPrecondition'
  | 'Unavailable'
  | 'NotImplemented'
  | 'Internal';

export class SnapshotterError extends Error {
  readonly kind: ErrorKind;
  /**
   * An answer the protocol expects, not a failure: containerd's remote
   * snapshot contract answers a Prepare whose target layer was made here
   * with AlreadyExists. Logged and audited as a success.
   */
  readonly expected: boolean;
  constructor(kind: ErrorKind, message: string, options?: { cause?: unknown; expected?: boolean }) {
    super(message, options);
    this.kind = kind;
    this.name = `${kind}Error`;
    this.expected = options?.expected ?? false;
  }
}

export const invalidArgument = (msg: string, cause?: unknown) =>
  new SnapshotterError('InvalidArgument', msg, { cause });
export const notFound = (msg: string, cause?: unknown) => new SnapshotterError('NotFound', msg, { cause });
export const alreadyExists = (msg: string, cause?: unknown) =>
  new SnapshotterError('AlreadyExists', msg, { cause });
/** containerd's remote snapshot contract: the target layer of a Prepare exists now (made here, without its tar). */
export const remoteLayerExists = (msg: string) => new SnapshotterError('AlreadyExists', msg, { expected: true });
export const failedPrecondition = (msg: string, cause?: unknown) =>
  new SnapshotterError('FailedPrecondition', msg, { cause });
export const unavailable = (msg: string, cause?: unknown) => new SnapshotterError('Unavailable', msg, { cause });
export const notImplemented = (msg: string, cause?: unknown) =>
  new SnapshotterError('NotImplemented', msg, { cause });
export const internal = (msg: string, cause?: unknown) => new SnapshotterError('Internal', msg, { cause });

export function isKind(err: unknown, kind: ErrorKind): boolean {
  return err instanceof SnapshotterError && err.kind === kind;
}

export const isNotFound = (err: unknown) => isKind(err, 'NotFound');
export const isAlreadyExists = (err: unknown) => isKind(err, 'AlreadyExists');
export const isInvalidArgument = (err: unknown) => isKind(err, 'InvalidArgument');
export const isFailedPrecondition = (err: unknown) => isKind(err, 'FailedPrecondition');

/** Kind of an arbitrary error; anything unclassified is Internal. */
export function kindOf(err: unknown): ErrorKind {
  return err instanceof SnapshotterError ? err.kind : 'Internal';
}

export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
