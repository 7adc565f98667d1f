import { constants as bufferConstants } from 'node:buffer';
import fs from 'node:fs';
import type http from 'node:http';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import { invalidArgument } from '../errdefs/errors';
import { type Logger, silentLogger } from '../log/logger';
import {
  type Challenge,
  type Credentials,
  type CredentialsProvider,
  Redactor,
  TokenCache,
  basicAuthorization,
  chainCredentials,
  loadDockerConfigCredentials,
  parseWwwAuthenticate,
} from './auth';
import { Digester, assertDigest, digestAlgorithm, digestOf, digestProblem } from './digest';
import { CLIENT_ERROR_CODES, type ClientErrorCode, RegistryError, codeForStatus, parseErrorBody } from './errors';
import { type HostCapability, HostsConfigError, type RegistryEndpoint, type RegistryHosts, defaultEndpoint } from './hosts';
import { DOCKER_HUB_DOMAIN, DOCKER_HUB_HOST, type Reference, type RepositoryName, InvalidReferenceError, parseReference, parseRepository } from './reference';
import {
  Agents,
  BodyTooLargeError,
  type BodySource,
  TimeoutError,
  backoffDelay,
  discard,
  isRetryableStatus,
  isTlsError,
  isTransientNetworkError,
  readBody,
  readSmallBody,
  send,
  sleep,
} from './transport';

/**
 * A client for the OCI Distribution API (what docker-registry, Docker Hub,
 * ghcr.io and harbor serve): manifests and blobs, whole, streamed or by
 * byte range, with digest verification, token and basic authentication,
 * retries with backoff, and keep-alive connections. No dependency beyond
 * node:http/node:https.
 *
 * Every failure is a RegistryError naming the host, the repository and what
 * was asked for; passwords and tokens are redacted from every message and
 * log line.
 */

export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_TYPE_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const MEDIA_TYPE_DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
export const MEDIA_TYPE_DOCKER_MANIFEST_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';

/** What getManifest accepts unless told otherwise: single manifests and indexes, OCI and Docker. */
export const DEFAULT_MANIFEST_ACCEPT: readonly string[] = [MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST];

/** Largest manifest read or written: containerd's limit too. */
export const MAX_MANIFEST_BYTES = 4 << 20;

const MAX_REDIRECTS = 5;

export interface RegistryClientOptions {
  /**
   * Hosts (`host[:port]` as in references, e.g. "127.0.0.1:5000") reached
   * over plain HTTP. Every other host is HTTPS only, and an http:// URL a
   * registry hands out (token realm, upload location, redirect) for a host
   * not listed is refused before anything is sent.
   */
  plainHttpHosts?: readonly string[];
  /**
   * containerd's host directories (hosts.toml): mirrors tried before the
   * registry, per-host schemes, CAs, client certificates and headers.
   * Without them every registry is reached at its own host.
   */
  hosts?: RegistryHosts;
  /** Credentials per registry host (the mirror's for a mirror); asked first. */
  credentials?: CredentialsProvider;
  /** A docker config.json whose `auths` are used for hosts `credentials` has nothing for. */
  dockerConfig?: string;
  logger?: Logger;
  /** Retries after the first attempt on network errors, timeouts, 429 and 5xx (never on other 4xx). Default 3. */
  retries?: number;
  /** Inactivity timeout per request, ms: no byte for this long fails the attempt. Default 30000. */
  timeoutMs?: number;
  /** First retry delay, ms; doubled for each retry, with jitter. Default 250. */
  backoffMs?: number;
  /** Cap of one retry delay (and of a server's Retry-After), ms. Default 10000. */
  maxBackoffMs?: number;
  /** Keep-alive connections per host. Default 16. */
  maxSockets?: number;
  /** Extra CA certificates for HTTPS registries. */
  ca?: string | Buffer | (string | Buffer)[];
  userAgent?: string;
}

export interface Manifest {
  /** From Content-Type, or the document's own mediaType when the registry sent a generic type. */
  mediaType: string;
  /** The digest asked for, or (by tag) the sha256 of the bytes. */
  digest: string;
  bytes: Buffer;
  json: unknown;
}

export interface BlobInfo {
  digest: string;
  /** Content-Length of the HEAD answer, or null when the registry sent none. */
  size: number | null;
}

export interface BlobStreamOptions {
  /** The descriptor's size: more or fewer bytes are a SIZE_MISMATCH (as is a Content-Length that differs). */
  size?: number;
  /**
   * The caller checks every byte another way, so the blob is not hashed (a
   * layer whose decompressed tar must hash to the diff id its image config
   * names: the config's digest pins it). Needs `size`.
   */
  contentCheckedByCaller?: boolean;
}

export interface BlobStream {
  /**
   * The blob's bytes. At the end it errors with a RegistryError
   * (DIGEST_MISMATCH, SIZE_MISMATCH) instead of ending when the content is
   * wrong, so `stream.pipeline` rejects: treat what was written as garbage then.
   */
  stream: Readable;
  digest: string;
  /** Content-Length, or null when the registry sent none. */
  size: number | null;
  /** After the stream ended: throws unless it was read completely and matched the digest. */
  verify(): void;
}

/** What pushBlob did: nothing (the registry had it), a cross-repository mount, or an upload. */
export type PushBlobResult = 'exists' | 'mounted' | 'uploaded';

export interface PushBlobOptions {
  /** Another repository on the same registry that may hold the blob: tried as a cross-repository mount first. */
  mountFrom?: string | RepositoryName;
}

type RepoArg = string | RepositoryName;
type RefArg = string | Reference;

/** One logical request: what to send, what answers are success, how to describe it in errors. */
interface Op {
  method: 'GET' | 'HEAD' | 'PUT' | 'POST';
  repo: RepositoryName;
  /** The host the request goes to: the registry itself or a mirror (hosts.toml). */
  endpoint: RegistryEndpoint;
  url: URL;
  /** "manifest latest", "blob sha256:…", "token": for messages and logs. */
  what: string;
  /** Token scopes this request needs; none for the token request itself. */
  scopes: string[];
  headers?: Record<string, string>;
  body?: BodySource;
  ok: readonly number[];
  notFoundCode?: string;
  /** Overrides the client's retries (pushBlob retries POST+PUT as a whole). */
  retries?: number;
  /** Send this Authorization as is and do not answer challenges (the token request). */
  authorization?: string | null;
}

function intOption(name: string, v: unknown, def: number, min: number, max: number): number {
  if (v === undefined) return def;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw invalidArgument(`RegistryClient: ${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function normalizeHost(h: string): string {
  return h
    .trim()
    .toLowerCase()
    .replace(/^[a-z][a-z0-9+.-]*:\/\//, '')
    .replace(/\/.*$/, '');
}

export class RegistryClient {
  private readonly plainHosts: ReadonlySet<string>;
  private readonly hosts: RegistryHosts | null;
  private readonly credentials: CredentialsProvider;
  private readonly log: Logger;
  private readonly retries: number;
  private readonly timeoutMs: number;
  private readonly backoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly userAgent: string;
  private readonly agents: Agents;
  private readonly tokens = new TokenCache();
  private readonly pendingTokens = new Map<string, Promise<string>>();
  /** Hosts that answered with a Basic challenge: later requests send credentials at once. */
  private readonly basicHosts = new Set<string>();
  private readonly redactor = new Redactor();

  constructor(opts: RegistryClientOptions = {}) {
    if (opts.plainHttpHosts !== undefined && (!Array.isArray(opts.plainHttpHosts) || opts.plainHttpHosts.some((h) => typeof h !== 'string'))) {
      throw invalidArgument('RegistryClient: plainHttpHosts must be an array of "host[:port]" strings');
    }
    this.plainHosts = new Set((opts.plainHttpHosts ?? []).map(normalizeHost));
    this.hosts = opts.hosts ?? null;
    this.credentials = chainCredentials(opts.credentials, opts.dockerConfig !== undefined ? loadDockerConfigCredentials(opts.dockerConfig) : null);
    this.log = (opts.logger ?? silentLogger()).child({ op: 'registry' });
    this.retries = intOption('retries', opts.retries, 3, 0, 20);
    this.timeoutMs = intOption('timeoutMs', opts.timeoutMs, 30_000, 1, 3_600_000);
    this.backoffMs = intOption('backoffMs', opts.backoffMs, 250, 0, 600_000);
    this.maxBackoffMs = intOption('maxBackoffMs', opts.maxBackoffMs, 10_000, 0, 3_600_000);
    this.userAgent = opts.userAgent ?? 'dedup-snapshotter';
    this.agents = new Agents({ maxSockets: intOption('maxSockets', opts.maxSockets, 16, 1, 1024), ca: opts.ca });
  }

  /** Closes idle keep-alive connections; the client must not be used afterwards. */
  close(): void {
    this.agents.destroy();
  }

  // ---------------------------------------------------------------- manifests

  /**
   * Fetches a manifest (or index) by tag or digest. By digest the bytes are
   * verified against it; by tag the sha256 is computed, and a
   * Docker-Content-Digest header, when present, must agree.
   */
  async getManifest(ref: RefArg, accept: readonly string[] = DEFAULT_MANIFEST_ACCEPT): Promise<Manifest> {
    const r = this.toRef(ref);
    const target = r.digest ?? (r.tag as string);
    // A tag is resolved (containerd's "resolve" capability); a digest is pulled.
    return this.onEndpoints(r, r.digest ? 'pull' : 'resolve', (endpoint) => {
      const op: Op = {
        method: 'GET',
        repo: r,
        endpoint,
        url: this.apiUrl(endpoint, r, `manifests/${target}`),
        what: `manifest ${target}`,
        scopes: [`repository:${r.repository}:pull`],
        headers: { accept: accept.join(', ') },
        ok: [200],
        notFoundCode: 'MANIFEST_UNKNOWN',
      };
      return this.perform(op, async (res) => {
        this.checkDeclaredLength(op, res, MAX_MANIFEST_BYTES);
        const bytes = await readBody(res, MAX_MANIFEST_BYTES);
        const announced = this.announcedDigest(res);
        if (r.digest) this.checkDigest(op, res.statusCode ?? 0, bytes, r.digest, 'asked for');
        if (announced) this.checkDigest(op, res.statusCode ?? 0, bytes, announced, 'announced by the registry (Docker-Content-Digest)');
        let json: unknown;
        try {
          json = JSON.parse(bytes.toString('utf8'));
        } catch {
          throw this.clientError(op, res.statusCode ?? 0, 'BAD_RESPONSE', `the ${bytes.length}-byte manifest is not JSON`);
        }
        const headerType = (res.headers['content-type'] ?? '').split(';')[0].trim();
        const docType = typeof (json as { mediaType?: unknown })?.mediaType === 'string' ? (json as { mediaType: string }).mediaType : '';
        const generic = headerType === '' || headerType === 'application/json' || headerType === 'text/plain' || headerType === 'application/octet-stream';
        return { mediaType: generic && docType !== '' ? docType : headerType || docType, digest: r.digest ?? digestOf(bytes), bytes, json };
      });
    });
  }

  /**
   * Stores a manifest under the reference's tag (or, without a tag, its
   * digest, which must match the bytes). Returns the manifest's digest.
   */
  async putManifest(ref: RefArg, mediaType: string, bytes: Buffer): Promise<string> {
    const r = this.toRef(ref);
    const target = r.tag ?? (r.digest as string);
    const endpoint = this.pushEndpoint(r);
    const op: Op = {
      method: 'PUT',
      repo: r,
      endpoint,
      url: this.apiUrl(endpoint, r, `manifests/${target}`),
      what: `manifest ${target}`,
      scopes: [`repository:${r.repository}:pull,push`],
      headers: { 'content-type': mediaType },
      body: { kind: 'buffer', data: bytes },
      ok: [200, 201],
    };
    if (bytes.length > MAX_MANIFEST_BYTES) throw this.clientError(op, 0, 'SIZE_MISMATCH', `manifest is ${bytes.length} bytes, at most ${MAX_MANIFEST_BYTES} are allowed`);
    if (r.digest) this.checkDigest(op, 0, bytes, r.digest, 'in the reference');
    const digest = r.digest ?? digestOf(bytes);
    return this.perform(op, async (res) => {
      await discard(res);
      const announced = this.announcedDigest(res);
      if (announced) this.checkDigest(op, res.statusCode ?? 0, bytes, announced, 'announced by the registry (Docker-Content-Digest)');
      return digest;
    });
  }

  // -------------------------------------------------------------------- blobs

  /** HEAD of a blob: its size, or null when the registry (and every mirror) does not have it. */
  async statBlob(repo: RepoArg, digest: string, capability: 'pull' | 'push' = 'pull'): Promise<BlobInfo | null> {
    const head = (endpoint: RegistryEndpoint) => {
      const op = this.blobOp('HEAD', repo, digest, [200], endpoint);
      return this.perform(op, async (res) => {
        await discard(res);
        const len = res.headers['content-length'];
        return { digest, size: len !== undefined && /^\d+$/.test(len) ? Number(len) : null } as BlobInfo;
      });
    };
    const r = this.toRepo(repo);
    try {
      return capability === 'push' ? await head(this.pushEndpoint(r)) : await this.onEndpoints(r, 'pull', head);
    } catch (err) {
      if (err instanceof RegistryError && err.status === 404) return null;
      throw err;
    }
  }

  async blobExists(repo: RepoArg, digest: string, capability: 'pull' | 'push' = 'pull'): Promise<boolean> {
    return (await this.statBlob(repo, digest, capability)) !== null;
  }

  /** The whole blob in memory, verified against its digest. */
  async getBlob(repo: RepoArg, digest: string, opts: { maxBytes?: number } = {}): Promise<Buffer> {
    const limit = opts.maxBytes ?? bufferConstants.MAX_LENGTH;
    return this.onEndpoints(this.toRepo(repo), 'pull', (endpoint) => this.getBlobFrom(endpoint, repo, digest, limit));
  }

  private getBlobFrom(endpoint: RegistryEndpoint, repo: RepoArg, digest: string, limit: number): Promise<Buffer> {
    const op = this.blobOp('GET', repo, digest, [200], endpoint);
    return this.perform(op, async (res) => {
      const declared = this.checkDeclaredLength(op, res, limit);
      const data = await readBody(res, limit);
      if (declared !== null && declared !== data.length) {
        throw this.clientError(op, 200, 'SIZE_MISMATCH', `Content-Length was ${declared}, got ${data.length} bytes`);
      }
      this.checkDigest(op, 200, data, digest, 'asked for');
      return data;
    });
  }

  /**
   * The blob as a stream, hashed on the way through. Retries happen only
   * until the response headers arrive; a failure while the body flows is an
   * error on the stream.
   */
  async getBlobStream(repo: RepoArg, digest: string, opts: BlobStreamOptions = {}): Promise<BlobStream> {
    const { size } = opts;
    if (size !== undefined && (!Number.isSafeInteger(size) || size < 0)) throw invalidArgument(`getBlobStream: size must be a non-negative integer, got ${size}`);
    if (opts.contentCheckedByCaller && size === undefined) throw invalidArgument('getBlobStream: a caller that checks the content itself must give the size');
    return this.onEndpoints(this.toRepo(repo), 'pull', (endpoint) => this.getBlobStreamFrom(endpoint, repo, digest, opts));
  }

  private getBlobStreamFrom(endpoint: RegistryEndpoint, repo: RepoArg, digest: string, opts: BlobStreamOptions): Promise<BlobStream> {
    const op = this.blobOp('GET', repo, digest, [200], endpoint);
    const { size } = opts;
    const hashed = !opts.contentCheckedByCaller;
    return this.perform(op, async (res) => {
      const declared = this.checkDeclaredLength(op, res, Number.MAX_SAFE_INTEGER);
      if (declared !== null && size !== undefined && declared !== size) {
        res.destroy();
        throw this.clientError(op, 200, 'SIZE_MISMATCH', `Content-Length is ${declared}, the descriptor says ${size} bytes`);
      }
      const hasher = new Digester(digestAlgorithm(digest));
      let bytes = 0;
      let outcome: RegistryError | 'ok' | null = null;
      const fail = (e: RegistryError) => {
        outcome = e;
        return e;
      };
      const stream = new Transform({
        transform: (chunk: Buffer, _enc, cb: TransformCallback) => {
          bytes += chunk.length;
          if (size !== undefined && bytes > size) {
            cb(fail(this.clientError(op, 200, 'SIZE_MISMATCH', `the descriptor says ${size} bytes, got more`)));
            return;
          }
          if (hashed) hasher.update(chunk);
          cb(null, chunk);
        },
        flush: (cb: TransformCallback) => {
          if (declared !== null && bytes !== declared) {
            cb(fail(this.clientError(op, 200, 'SIZE_MISMATCH', `Content-Length was ${declared}, got ${bytes} bytes`)));
            return;
          }
          if (size !== undefined && bytes !== size) {
            cb(fail(this.clientError(op, 200, 'SIZE_MISMATCH', `the descriptor says ${size} bytes, got ${bytes}`)));
            return;
          }
          const actual = hashed ? hasher.digest() : digest;
          if (actual !== digest) {
            cb(fail(this.mismatchError(op, 200, digest, actual, 'asked for')));
            return;
          }
          outcome = 'ok';
          cb();
        },
      });
      res.on('error', (err) => {
        if (!stream.destroyed) stream.destroy(fail(this.transportError(op, err, 1)));
      });
      // A consumer that stops early: drop the connection rather than read on.
      stream.on('close', () => {
        if (!res.complete) res.destroy();
      });
      res.pipe(stream);
      return {
        stream,
        digest,
        size: declared,
        verify: () => {
          if (outcome === 'ok') return;
          if (outcome) throw outcome;
          throw this.clientError(op, 200, 'SIZE_MISMATCH', `verify() called before the stream was read to its end (${bytes} bytes so far)`);
        },
      };
    });
  }

  /**
   * `length` bytes of a blob from `offset` (an HTTP Range request). A 206
   * must cover exactly the range; a registry that ignores Range and sends
   * the whole blob (200) is handled by hashing all of it (so the digest is
   * verified too) and keeping the slice.
   */
  async getBlobRange(repo: RepoArg, digest: string, offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || offset < 0) throw invalidArgument(`getBlobRange: offset must be a non-negative integer, got ${offset}`);
    if (!Number.isSafeInteger(length) || length < 0) throw invalidArgument(`getBlobRange: length must be a non-negative integer, got ${length}`);
    if (length === 0) {
      this.toDigest(this.toRepo(repo), digest);
      return Buffer.alloc(0);
    }
    return this.onEndpoints(this.toRepo(repo), 'pull', (endpoint) => this.getBlobRangeFrom(endpoint, repo, digest, offset, length));
  }

  private getBlobRangeFrom(endpoint: RegistryEndpoint, repo: RepoArg, digest: string, offset: number, length: number): Promise<Buffer> {
    const op = this.blobOp('GET', repo, digest, [200, 206], endpoint);
    const last = offset + length - 1;
    op.what = `blob ${digest} bytes ${offset}-${last}`;
    op.headers = { range: `bytes=${offset}-${last}` };
    return this.perform(op, async (res) => {
      if (res.statusCode === 206) {
        const cr = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers['content-range'] ?? '');
        if (res.headers['content-range'] !== undefined && !cr) {
          await discard(res);
          throw this.clientError(op, 206, 'BAD_RESPONSE', `malformed Content-Range ${JSON.stringify(res.headers['content-range'])}`);
        }
        if (cr && (Number(cr[1]) !== offset || Number(cr[2]) !== last)) {
          await discard(res);
          throw this.clientError(op, 206, 'SIZE_MISMATCH', `asked for bytes ${offset}-${last}, the registry sent ${cr[1]}-${cr[2]} of ${cr[3]}`);
        }
        const data = await readBody(res, length);
        if (data.length !== length) throw this.clientError(op, 206, 'SIZE_MISMATCH', `asked for ${length} bytes, got ${data.length}`);
        return data;
      }
      // 200: the whole blob. Hash it all, keep only the slice.
      const hasher = new Digester(digestAlgorithm(digest));
      const out = Buffer.alloc(length);
      let pos = 0;
      let copied = 0;
      await new Promise<void>((resolve, reject) => {
        res.on('data', (chunk: Buffer) => {
          hasher.update(chunk);
          const start = Math.max(offset - pos, 0);
          const end = Math.min(chunk.length, offset + length - pos);
          if (end > start) copied += chunk.copy(out, start + pos - offset, start, end);
          pos += chunk.length;
        });
        res.on('end', resolve);
        res.on('error', reject);
        res.on('close', () => {
          if (!res.complete) reject(Object.assign(new Error('response body cut short'), { code: 'ERR_STREAM_PREMATURE_CLOSE' }));
        });
      });
      const actual = hasher.digest();
      if (actual !== digest) throw this.mismatchError(op, 200, digest, actual, 'asked for');
      if (copied !== length) throw this.clientError(op, 200, 'SIZE_MISMATCH', `the blob is ${pos} bytes, bytes ${offset}-${last} are not all in it`);
      return out;
    });
  }

  /**
   * Uploads a blob (a Buffer, or a file path read as a stream) unless the
   * registry has it: HEAD, then (optionally a cross-repository mount, then)
   * POST /blobs/uploads/ and one monolithic PUT ?digest=. A Buffer is
   * checked against the digest before anything is sent; a file is checked
   * by the registry. POST and PUT are retried together.
   */
  async pushBlob(repo: RepoArg, digest: string, data: Buffer | string, opts: PushBlobOptions = {}): Promise<PushBlobResult> {
    const r = this.toRepo(repo);
    this.toDigest(r, digest);
    let body: BodySource;
    if (Buffer.isBuffer(data)) {
      body = { kind: 'buffer', data };
      const op = this.blobOp('PUT', r, digest, [201], this.pushEndpoint(r));
      this.checkDigest(op, 0, data, digest, 'given');
    } else if (typeof data === 'string') {
      let st: fs.Stats;
      try {
        st = fs.statSync(data);
      } catch (err) {
        throw invalidArgument(`pushBlob ${digest} to ${r.name}: cannot read ${data}: ${(err as Error).message}`);
      }
      if (!st.isFile()) throw invalidArgument(`pushBlob ${digest} to ${r.name}: ${data} is not a regular file`);
      body = { kind: 'file', path: data, size: st.size };
    } else {
      throw invalidArgument('pushBlob: data must be a Buffer or a file path');
    }
    if (await this.blobExists(r, digest, 'push')) return 'exists';
    const from = opts.mountFrom !== undefined ? this.toRepo(opts.mountFrom) : null;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.uploadOnce(r, digest, body, from && from.host === r.host && from.repository !== r.repository ? from : null);
      } catch (err) {
        if (!(err instanceof RegistryError) || !this.isRetryable(err) || attempt >= this.retries) throw err;
        const delay = backoffDelay(attempt, this.backoffMs, this.maxBackoffMs);
        this.log.warn({ host: r.host, repository: r.repository, what: `blob upload ${digest}`, attempt: attempt + 1, delay_ms: Math.round(delay), err: err.message }, 'blob upload failed, retrying');
        await sleep(delay);
      }
    }
  }

  private async uploadOnce(r: RepositoryName, digest: string, body: BodySource, from: RepositoryName | null): Promise<PushBlobResult> {
    const pushScope = `repository:${r.repository}:pull,push`;
    const endpoint = this.pushEndpoint(r);
    const start = this.apiUrl(endpoint, r, 'blobs/uploads/');
    if (from) {
      start.searchParams.set('mount', digest);
      start.searchParams.set('from', from.repository);
    }
    const post: Op = {
      method: 'POST',
      repo: r,
      endpoint,
      url: start,
      what: from ? `blob upload ${digest} (mount from ${from.repository})` : `blob upload ${digest}`,
      scopes: from ? [pushScope, `repository:${from.repository}:pull`] : [pushScope],
      ok: from ? [201, 202] : [202],
      retries: 0,
    };
    const started = await this.perform(post, async (res) => {
      await discard(res);
      return { status: res.statusCode ?? 0, location: res.headers.location };
    });
    if (started.status === 201) return 'mounted';
    if (!started.location) throw this.clientError(post, started.status, 'BAD_RESPONSE', 'upload started without a Location header');
    let loc: URL;
    try {
      loc = new URL(started.location, start);
    } catch {
      throw this.clientError(post, started.status, 'BAD_RESPONSE', 'upload Location is not a URL');
    }
    this.checkUrl(post, loc, 'upload location');
    loc.searchParams.set('digest', digest);
    const put: Op = {
      method: 'PUT',
      repo: r,
      endpoint,
      url: loc,
      what: `blob ${digest}`,
      scopes: [pushScope],
      headers: { 'content-type': 'application/octet-stream' },
      body,
      ok: [201, 204],
      retries: 0,
    };
    await this.perform(put, async (res) => {
      await discard(res);
      const announced = this.announcedDigest(res);
      if (announced && announced !== digest) throw this.mismatchError(put, res.statusCode ?? 0, digest, announced, 'pushed; the registry stored');
    });
    return 'uploaded';
  }

  // ------------------------------------------------------------ request core

  private toRef(ref: RefArg): Reference {
    const r = typeof ref === 'string' ? parseReference(ref) : ref;
    if (r.digest === null && r.tag === null) throw new InvalidReferenceError(r.name, 'neither tag nor digest');
    if (r.digest !== null) this.toDigest(r, r.digest);
    return r;
  }

  private toRepo(repo: RepoArg): RepositoryName {
    return typeof repo === 'string' ? parseRepository(repo) : repo;
  }

  private toDigest(repo: RepositoryName, digest: string): void {
    const problem = typeof digest === 'string' ? digestProblem(digest) : 'expected a string';
    if (problem) {
      throw new RegistryError(
        { status: 0, code: 'DIGEST_INVALID', host: repo.host, repository: repo.repository, kind: 'InvalidArgument' },
        `registry ${repo.host}, repository ${repo.repository}: invalid digest ${JSON.stringify(String(digest).slice(0, 200))}: ${problem}`,
      );
    }
  }

  private blobOp(method: 'GET' | 'HEAD' | 'PUT', repo: RepoArg, digest: string, ok: number[], endpoint: RegistryEndpoint): Op {
    const r = this.toRepo(repo);
    this.toDigest(r, digest);
    return {
      method,
      repo: r,
      endpoint,
      url: this.apiUrl(endpoint, r, `blobs/${digest}`),
      what: `blob ${digest}`,
      scopes: [`repository:${r.repository}:pull`],
      ok,
      notFoundCode: 'BLOB_UNKNOWN',
    };
  }

  private isPlain(host: string): boolean {
    return this.plainHosts.has(host.toLowerCase());
  }

  /** Where `repo`'s requests go, in order, among the hosts that have `capability` (hosts.toml; else the registry itself). */
  private endpointsFor(repo: RepositoryName, capability: HostCapability): RegistryEndpoint[] {
    let all: RegistryEndpoint[];
    try {
      all = this.hosts ? this.hosts.endpoints(repo.domain) : [defaultEndpoint(repo.domain)];
    } catch (err) {
      if (!(err instanceof HostsConfigError)) throw err;
      throw new RegistryError({ status: 0, code: 'HOSTS_CONFIG', host: repo.host, repository: repo.repository, kind: 'FailedPrecondition' }, `registry ${repo.host}: ${err.message}`);
    }
    // A tag is resolved on hosts that can pull too (containerd asks for both).
    const usable = all.filter((e) => e.capabilities.has(capability) && (capability !== 'resolve' || e.capabilities.has('pull'))).map((e): RegistryEndpoint => (e.implicit && this.isPlain(e.host) ? { ...e, scheme: 'http' } : e));
    if (usable.length === 0) {
      throw new RegistryError(
        { status: 0, code: 'HOSTS_CONFIG', host: repo.host, repository: repo.repository, kind: 'FailedPrecondition' },
        `registry ${repo.host}: no host in ${this.hosts?.dirFor(repo.domain) ?? 'its host directory'}/hosts.toml has the ${capability} capability`,
      );
    }
    return usable;
  }

  /** Where pushes go: the first host that can push. */
  private pushEndpoint(repo: RepositoryName): RegistryEndpoint {
    return this.endpointsFor(repo, 'push')[0];
  }

  /**
   * Runs `attempt` against each host that can `capability` in turn (mirrors
   * first) until one succeeds; when all fail, throws the first failure that
   * was not a 404 (else the last 404), as containerd's resolver does.
   */
  private async onEndpoints<T>(repo: RepositoryName, capability: HostCapability, attempt: (e: RegistryEndpoint) => Promise<T>): Promise<T> {
    const endpoints = this.endpointsFor(repo, capability);
    let first: RegistryError | null = null;
    let last: RegistryError | null = null;
    for (const [i, e] of endpoints.entries()) {
      const isLast = i === endpoints.length - 1;
      try {
        // Only the last host retries: a mirror that fails hands over at once.
        return await attempt(isLast ? e : { ...e, retries: 0 });
      } catch (err) {
        if (!(err instanceof RegistryError) || endpoints.length === 1) throw err;
        last = err;
        if (err.status !== 404) first ??= err;
        if (!isLast) {
          const fields = { host: repo.host, repository: repo.repository, endpoint: e.host, next: endpoints[i + 1].host, err: err.message };
          const msg = `registry host ${e.host} failed for ${repo.name}, trying ${endpoints[i + 1].host}`;
          // A mirror without the content is routine; anything else is worth a warning.
          if (err.status === 404) this.log.debug(fields, msg);
          else this.log.warn(fields, msg);
        }
      }
    }
    throw first ?? (last as RegistryError);
  }

  /** `${endpoint}/${repository}/${rest}`, with `ns=<registry>` for a mirror (containerd's query parameter). */
  private apiUrl(e: RegistryEndpoint, repo: RepositoryName, rest: string): URL {
    const u = new URL(`${e.scheme}://${e.host}${e.path}/${repo.repository}/${rest}`);
    if (e.mirror) u.searchParams.set('ns', repo.domain);
    return u;
  }

  /** Refuses URLs a registry handed out that are not https (or http for a plainHttpHosts host or an http:// host of hosts.toml). */
  private checkUrl(op: Op, url: URL, what: string): void {
    if (url.protocol === 'https:') return;
    if (url.protocol === 'http:' && (this.isPlain(url.host) || (op.endpoint.scheme === 'http' && url.host === op.endpoint.host))) return;
    const where = `${url.protocol}//${url.host}${url.pathname}`;
    if (url.protocol === 'http:') {
      throw this.clientError(op, 0, 'PLAIN_HTTP_REFUSED', `${what} ${where} is plain HTTP and ${url.host} is not in registry.plain_http_hosts; nothing was sent`);
    }
    throw this.clientError(op, 0, 'BAD_RESPONSE', `${what} ${where} is neither https nor http`);
  }

  private credentialsFor(host: string): Credentials | null {
    let c: Credentials | null;
    try {
      c = this.credentials(host) ?? (host === DOCKER_HUB_HOST ? this.credentials(DOCKER_HUB_DOMAIN) : null);
    } catch {
      return null;
    }
    if (c) this.redactor.addCredentials(c);
    return c;
  }

  private isRetryable(err: RegistryError): boolean {
    return isRetryableStatus(err.status) || err.code === 'NETWORK' || err.code === 'TIMEOUT';
  }

  /**
   * Runs `op` with retries (network errors, timeouts, 429, 5xx) and hands a
   * success response to `handle`, whose failures while reading the body
   * are retried the same way (unless they are RegistryErrors).
   */
  private async perform<T>(op: Op, handle: (res: http.IncomingMessage) => Promise<T>): Promise<T> {
    const retries = op.retries ?? op.endpoint.retries ?? this.retries;
    for (let attempt = 0; ; attempt++) {
      const t0 = Date.now();
      let delay: number;
      let reason: string;
      try {
        const res = await this.exchange(op);
        const status = res.statusCode ?? 0;
        this.log.debug({ host: op.repo.host, repository: op.repo.repository, method: op.method, what: op.what, status, attempt: attempt + 1, duration_ms: Date.now() - t0 }, `${op.method} ${op.what}: ${status}`);
        if (op.ok.includes(status)) return await handle(res);
        const body = await readSmallBody(res);
        const err = this.statusError(op, status, body, attempt + 1);
        if (!isRetryableStatus(status) || attempt >= retries) throw err;
        delay = backoffDelay(attempt, this.backoffMs, this.maxBackoffMs, res.headers['retry-after']);
        reason = err.message;
      } catch (err) {
        if (err instanceof RegistryError) throw err;
        if (!isTransientNetworkError(err) || attempt >= retries) throw this.transportError(op, err, attempt + 1);
        delay = backoffDelay(attempt, this.backoffMs, this.maxBackoffMs);
        reason = this.redactor.redact((err as Error).message);
      }
      this.log.warn({ host: op.repo.host, repository: op.repo.repository, method: op.method, what: op.what, attempt: attempt + 1, delay_ms: Math.round(delay), err: reason }, 'registry request failed, retrying');
      await sleep(delay);
    }
  }

  /** One attempt: the request, answering one auth challenge, following redirects of GET/HEAD. */
  private async exchange(op: Op): Promise<http.IncomingMessage> {
    if (op.authorization !== undefined) return this.sendFollowing(op, op.authorization);
    // Tokens and credentials are the host's the request goes to (a mirror's own, as containerd's authorizer does).
    const host = op.endpoint.host;
    let auth = this.cachedAuthorization(host, op.scopes);
    const res = await this.sendFollowing(op, auth);
    if (res.statusCode !== 401) return res;
    const challenges = parseWwwAuthenticate(res.headersDistinct['www-authenticate']);
    const body = await readSmallBody(res);
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    const basic = challenges.find((c) => c.scheme === 'basic');
    if (bearer) {
      if (auth?.startsWith('Bearer ')) this.tokens.delete(host, op.scopes);
      auth = `Bearer ${await this.token(op, bearer)}`;
    } else if (basic) {
      const creds = this.credentialsFor(host);
      if (!creds || auth?.startsWith('Basic ')) throw this.statusError(op, 401, body, 1);
      this.basicHosts.add(host);
      auth = basicAuthorization(creds);
    } else {
      const schemes = challenges.map((c) => c.scheme).join(', ') || 'none';
      throw this.clientError(op, 401, 'AUTH_FAILED', `401 with no Bearer or Basic challenge (WWW-Authenticate schemes: ${schemes})`);
    }
    return this.sendFollowing(op, auth);
  }

  private cachedAuthorization(host: string, scopes: string[]): string | null {
    const token = scopes.length > 0 ? this.tokens.get(host, scopes) : null;
    if (token) return `Bearer ${token}`;
    if (this.basicHosts.has(host)) {
      const c = this.credentialsFor(host);
      if (c) return basicAuthorization(c);
    }
    return null;
  }

  private async sendFollowing(op: Op, authorization: string | null): Promise<http.IncomingMessage> {
    const origin = op.url.origin;
    let url = op.url;
    for (let hops = 0; ; hops++) {
      // hosts.toml's headers go to their host only (not to a blob store it redirects to, nor a token realm); the request's own win.
      const own = url.host === op.endpoint.host && url.protocol === `${op.endpoint.scheme}:`;
      const headers: Record<string, string> = { 'user-agent': this.userAgent, ...(own ? op.endpoint.headers : {}), ...op.headers };
      // Credentials go to the registry's own origin only, never to a blob store it redirects to.
      if (authorization && url.origin === origin) headers.authorization = authorization;
      const res = await send(this.agents, { method: op.method, url, headers, body: op.body, timeoutMs: this.timeoutMs, tls: op.endpoint });
      const status = res.statusCode ?? 0;
      const location = res.headers.location;
      if ((op.method !== 'GET' && op.method !== 'HEAD') || ![301, 302, 303, 307, 308].includes(status) || !location) return res;
      await discard(res);
      if (hops >= MAX_REDIRECTS) throw this.clientError(op, status, 'BAD_RESPONSE', `more than ${MAX_REDIRECTS} redirects`);
      let next: URL;
      try {
        next = new URL(location, url);
      } catch {
        throw this.clientError(op, status, 'BAD_RESPONSE', 'redirect Location is not a URL');
      }
      this.checkUrl(op, next, 'redirect to');
      url = next;
    }
  }

  /** A bearer token for op's scopes: cached, or fetched from the challenge's realm (one fetch at a time per key). */
  private async token(op: Op, challenge: Challenge): Promise<string> {
    const host = op.endpoint.host;
    const key = TokenCache.key(host, op.scopes);
    const cached = this.tokens.get(host, op.scopes);
    if (cached) return cached;
    let pending = this.pendingTokens.get(key);
    if (!pending) {
      pending = this.fetchToken(op, challenge).finally(() => this.pendingTokens.delete(key));
      this.pendingTokens.set(key, pending);
    }
    return pending;
  }

  private async fetchToken(op: Op, challenge: Challenge): Promise<string> {
    const host = op.endpoint.host;
    const realm = challenge.params.realm;
    if (!realm) throw this.clientError(op, 401, 'AUTH_FAILED', 'Bearer challenge without a realm');
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw this.clientError(op, 401, 'AUTH_FAILED', `Bearer realm ${JSON.stringify(realm.slice(0, 200))} is not an absolute URL`);
    }
    this.checkUrl(op, url, 'token realm');
    if (challenge.params.service) url.searchParams.set('service', challenge.params.service);
    const scopes = new Set(op.scopes);
    for (const s of (challenge.params.scope ?? '').split(' ')) if (s !== '') scopes.add(s);
    for (const s of scopes) url.searchParams.append('scope', s);
    const creds = this.credentialsFor(host);
    const tokenOp: Op = {
      method: 'GET',
      repo: op.repo,
      endpoint: op.endpoint,
      url,
      what: `token from ${url.origin}${url.pathname} (for ${op.what}, scope ${[...scopes].join(' ')})`,
      scopes: [],
      ok: [200],
      authorization: creds ? basicAuthorization(creds) : null,
    };
    const doc = await this.perform(tokenOp, async (res) => {
      const body = await readBody(res, 1 << 20);
      try {
        return JSON.parse(body.toString('utf8')) as { token?: unknown; access_token?: unknown; expires_in?: unknown };
      } catch {
        throw this.clientError(tokenOp, 200, 'AUTH_FAILED', 'token endpoint answered with something that is not JSON');
      }
    });
    const token = typeof doc.token === 'string' && doc.token !== '' ? doc.token : typeof doc.access_token === 'string' ? doc.access_token : '';
    if (token === '') throw this.clientError(tokenOp, 200, 'AUTH_FAILED', 'token endpoint answered without a token');
    this.redactor.add(token);
    const expiresIn = typeof doc.expires_in === 'number' && doc.expires_in > 0 ? doc.expires_in : 60;
    this.tokens.set(host, op.scopes, token, expiresIn);
    this.log.debug({ host, repository: op.repo.repository, realm: `${url.origin}${url.pathname}`, scope: [...scopes].join(' '), expires_in: expiresIn, with_credentials: creds !== null }, 'registry token fetched');
    return token;
  }

  // ------------------------------------------------------------------ errors

  private prefix(op: Op): string {
    const via = op.endpoint.mirror ? ` (host ${op.endpoint.host})` : '';
    return `registry ${op.repo.host}${via}, repository ${op.repo.repository}: ${op.method} ${op.what}`;
  }

  private make(op: Op, status: number, code: string, message: string, cause?: unknown): RegistryError {
    return new RegistryError(
      { status, code, host: op.repo.host, repository: op.repo.repository },
      this.redactor.redact(`${this.prefix(op)}: ${message}`),
      cause !== undefined ? { cause } : undefined,
    );
  }

  private clientError(op: Op, status: number, code: ClientErrorCode, detail: string): RegistryError {
    return this.make(op, status, code, `${CLIENT_ERROR_CODES[code]}: ${detail}`);
  }

  private mismatchError(op: Op, status: number, expected: string, actual: string, how: string): RegistryError {
    return this.clientError(op, status, 'DIGEST_MISMATCH', `content hashes to ${actual}, not ${expected} (${how})`);
  }

  private statusError(op: Op, status: number, body: Buffer, attempts: number): RegistryError {
    const parsed = parseErrorBody(body);
    const code = parsed?.code ?? codeForStatus(status, op.notFoundCode);
    let msg = `HTTP ${status} ${code}`;
    if (parsed?.message) msg += `: ${parsed.message.slice(0, 300)}`;
    if (status === 401 && op.authorization === undefined && !this.credentialsFor(op.endpoint.host)) msg += ` (no credentials configured for ${op.endpoint.host})`;
    if (attempts > 1) msg += ` (after ${attempts} attempts)`;
    return this.make(op, status, code, msg);
  }

  private transportError(op: Op, err: unknown, attempts: number): RegistryError {
    if (err instanceof RegistryError) return err;
    const e = err as NodeJS.ErrnoException;
    let code: ClientErrorCode = 'NETWORK';
    if (err instanceof TimeoutError) code = 'TIMEOUT';
    else if (err instanceof BodyTooLargeError) code = 'SIZE_MISMATCH';
    else if (isTlsError(err)) code = 'TLS';
    let msg = `${CLIENT_ERROR_CODES[code]}: ${e?.message ?? String(err)}`;
    if (code === 'TLS' && op.url.protocol === 'https:') {
      msg += op.endpoint.implicit
        ? `; if ${op.url.host} serves plain HTTP, add it to registry.plain_http_hosts (the daemon's config; dedup-snapshotter pull: --plain-http)`
        : `; see ${this.hosts?.dirFor(op.repo.domain) ?? 'the host directory'}/hosts.toml: the host's ca or skip_verify, or http:// if it serves plain HTTP`;
    }
    if (attempts > 1) msg += ` (after ${attempts} attempts)`;
    return this.make(op, 0, code, msg, err);
  }

  private checkDeclaredLength(op: Op, res: http.IncomingMessage, limit: number): number | null {
    const len = res.headers['content-length'];
    if (len === undefined) return null;
    if (!/^\d+$/.test(len)) {
      res.destroy();
      throw this.clientError(op, res.statusCode ?? 0, 'BAD_RESPONSE', `malformed Content-Length ${JSON.stringify(len)}`);
    }
    const n = Number(len);
    if (n > limit) {
      res.destroy();
      throw this.clientError(op, res.statusCode ?? 0, 'SIZE_MISMATCH', `Content-Length ${n} is over the limit of ${limit} bytes`);
    }
    return n;
  }

  private announcedDigest(res: http.IncomingMessage): string | null {
    const d = res.headers['docker-content-digest'];
    if (typeof d !== 'string' || d === '') return null;
    // A header we cannot use proves nothing either way.
    return digestProblem(d.trim()) === null ? d.trim() : null;
  }

  private checkDigest(op: Op, status: number, data: Buffer, expected: string, how: string): void {
    assertDigest(expected);
    const actual = digestOf(data, digestAlgorithm(expected));
    if (actual !== expected) throw this.mismatchError(op, status, expected, actual, how);
  }
}
