import crypto from 'node:crypto';

/**
 * OCI content digests (`algorithm:encoded`). Only the algorithms the OCI
 * image spec registers are accepted, because a digest we cannot compute is a
 * digest we cannot verify.
 */

/** Encoded length (lowercase hex) of each supported algorithm. */
const HEX_LENGTH: Readonly<Record<string, number>> = { sha256: 64, sha512: 128 };

export const SUPPORTED_DIGEST_ALGORITHMS: readonly string[] = Object.keys(HEX_LENGTH);

/**
 * Why `digest` is not a usable digest, or null when it is. The reason is
 * phrased to follow "digest X: ".
 */
export function digestProblem(digest: string): string | null {
  const colon = digest.indexOf(':');
  if (colon <= 0) return 'expected algorithm:hex, e.g. sha256:<64 hex characters>';
  const alg = digest.slice(0, colon);
  const hex = digest.slice(colon + 1);
  if (!/^[a-z0-9]+(?:[.+_-][a-z0-9]+)*$/.test(alg)) return `algorithm "${alg}" is not a valid digest algorithm name`;
  const want = HEX_LENGTH[alg];
  if (want === undefined) return `unsupported algorithm "${alg}" (supported: ${SUPPORTED_DIGEST_ALGORITHMS.join(', ')})`;
  if (hex.length !== want || !/^[0-9a-f]*$/.test(hex)) {
    return `${alg} digests are ${want} lowercase hex characters, got ${hex.length} character${hex.length === 1 ? '' : 's'}${/[A-F]/.test(hex) ? ' (uppercase hex)' : ''}`;
  }
  return null;
}

export class InvalidDigestError extends Error {
  constructor(
    readonly digest: string,
    reason: string,
  ) {
    super(`invalid digest ${JSON.stringify(digest.length > 200 ? `${digest.slice(0, 200)}…` : digest)}: ${reason}`);
    this.name = 'InvalidDigestError';
  }
}

/** Throws an InvalidDigestError unless `digest` is well-formed and supported. */
export function assertDigest(digest: string): string {
  const problem = typeof digest === 'string' ? digestProblem(digest) : 'expected a string';
  if (problem) throw new InvalidDigestError(String(digest), problem);
  return digest;
}

export function digestAlgorithm(digest: string): string {
  return digest.slice(0, digest.indexOf(':'));
}

/** `algorithm:hex` of `data`; sha256 unless another algorithm is named. */
export function digestOf(data: Buffer | Uint8Array, algorithm = 'sha256'): string {
  return `${algorithm}:${crypto.createHash(algorithm).update(data).digest('hex')}`;
}

/** Incremental digest of a byte stream, for data too large to hold. */
export class Digester {
  private readonly hash: crypto.Hash;
  private n = 0;
  constructor(readonly algorithm = 'sha256') {
    this.hash = crypto.createHash(algorithm);
  }
  update(chunk: Buffer | Uint8Array): void {
    this.hash.update(chunk);
    this.n += chunk.length;
  }
  get bytes(): number {
    return this.n;
  }
  /** The digest; call once, after the last update. */
  digest(): string {
    return `${this.algorithm}:${this.hash.digest('hex')}`;
  }
}
