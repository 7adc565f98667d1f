import { type ErrorKind, SnapshotterError } from '../errdefs/errors';

/**
 * Codes a RegistryError carries. Registry codes come from the OCI
 * distribution spec's error body (`{"errors":[{"code":...}]}`); when the
 * registry sent none, one is derived from the HTTP status. The client adds
 * its own for failures that have no HTTP status.
 */
export const CLIENT_ERROR_CODES = {
  /** Content did not hash to the digest it was asked for (or the registry announced). */
  DIGEST_MISMATCH: 'content does not match its digest',
  /** Fewer or more bytes than expected (Content-Length, Range, manifest size limit). */
  SIZE_MISMATCH: 'content has the wrong length',
  /** The connection failed (refused, reset, DNS) on every attempt. */
  NETWORK: 'network error',
  /** No bytes for timeoutMs. */
  TIMEOUT: 'timed out',
  /** TLS failed, e.g. a plain-HTTP registry not listed in plainHttpHosts. */
  TLS: 'TLS handshake or certificate failure',
  /** A plain http:// URL for a host not in plainHttpHosts (nothing was sent). */
  PLAIN_HTTP_REFUSED: 'plain HTTP refused',
  /** The registry answered with something that is not what the API promises. */
  BAD_RESPONSE: 'malformed registry response',
  /** Authentication could not be performed (no credentials, bad challenge, token endpoint failure). */
  AUTH_FAILED: 'authentication failed',
} as const;

export type ClientErrorCode = keyof typeof CLIENT_ERROR_CODES;

export class RegistryError extends SnapshotterError {
  /** HTTP status of the failing response; 0 when there was none. */
  readonly status: number;
  /** Registry error code (MANIFEST_UNKNOWN, BLOB_UNKNOWN, DENIED, ...) or a ClientErrorCode. */
  readonly code: string;
  readonly host: string;
  readonly repository: string | null;
  constructor(
    init: { status: number; code: string; host: string; repository: string | null; kind?: ErrorKind },
    message: string,
    options?: { cause?: unknown },
  ) {
    super(init.kind ?? kindForStatus(init.status, init.code), message, options);
    this.name = 'RegistryError';
    this.status = init.status;
    this.code = init.code;
    this.host = init.host;
    this.repository = init.repository;
  }
}

/** The errdefs kind (hence the gRPC code) of a registry failure. */
export function kindForStatus(status: number, code: string): ErrorKind {
  if (status === 404) return 'NotFound';
  if (status === 401 || status === 403) return 'FailedPrecondition';
  if (status === 429 || status >= 500 || code === 'NETWORK' || code === 'TIMEOUT') return 'Unavailable';
  if (code === 'PLAIN_HTTP_REFUSED' || code === 'TLS' || code === 'AUTH_FAILED') return 'FailedPrecondition';
  if (status >= 400 && status < 500) return 'InvalidArgument';
  return 'Internal';
}

/** The code to report for a status the registry gave no error body for. */
export function codeForStatus(status: number, notFoundCode?: string): string {
  switch (status) {
    case 401:
      return 'UNAUTHORIZED';
    case 403:
      return 'DENIED';
    case 404:
      return notFoundCode ?? 'NAME_UNKNOWN';
    case 405:
      return 'UNSUPPORTED';
    case 429:
      return 'TOOMANYREQUESTS';
    default:
      return `HTTP_${status}`;
  }
}

/** The first `{code, message}` of a distribution-spec error body, if it is one. */
export function parseErrorBody(body: Buffer): { code: string; message: string } | null {
  if (body.length === 0) return null;
  try {
    const doc = JSON.parse(body.toString('utf8')) as unknown;
    const errors = (doc as { errors?: unknown }).errors;
    if (!Array.isArray(errors) || errors.length === 0) return null;
    const first = errors[0] as { code?: unknown; message?: unknown };
    if (typeof first.code !== 'string' || !/^[A-Z0-9_]{1,64}$/.test(first.code)) return null;
    return { code: first.code, message: typeof first.message === 'string' ? first.message : '' };
  } catch {
    return null;
  }
}
