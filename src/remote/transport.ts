import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import tls from 'node:tls';
import type { Readable } from 'node:stream';

/**
 * The HTTP layer under RegistryClient: keep-alive agents, one request at a
 * time with an inactivity timeout, bounded body reads, and the
 * classification of failures into "retry" and "give up".
 */

/** A request body that can be produced again for a retried attempt. */
export type BodySource = { kind: 'buffer'; data: Buffer } | { kind: 'file'; path: string; size: number };

export interface SendOptions {
  method: string;
  url: URL;
  headers: Record<string, string>;
  body?: BodySource;
  /** Inactivity timeout: no byte sent or received for this long aborts the request (and its response body). */
  timeoutMs: number;
  /** The host's own TLS settings (hosts.toml), if any. */
  tls?: HostTls | null;
}

export class TimeoutError extends Error {
  readonly code = 'ETIMEDOUT_INACTIVITY';
  constructor(ms: number) {
    super(`no data for ${ms} ms`);
    this.name = 'TimeoutError';
  }
}

export class BodyTooLargeError extends Error {
  constructor(readonly limit: number) {
    super(`response body larger than ${limit} bytes`);
    this.name = 'BodyTooLargeError';
  }
}

/** TLS settings of one registry host (hosts.toml): extra CAs, a client certificate, no verification. */
export interface HostTls {
  /** The host they belong to (their agent is replaced when they change). */
  host: string;
  ca: Buffer[];
  client: { cert: Buffer; key: Buffer } | null;
  skipVerify: boolean;
}

export class Agents {
  readonly http: http.Agent;
  readonly https: https.Agent;
  /** HTTPS agents of hosts with their own TLS settings, by host, with the settings they were made for. */
  private readonly custom = new Map<string, { key: string; agent: https.Agent }>();
  /** Agents replaced while requests still used them: destroyed once idle. */
  private retired: https.Agent[] = [];
  constructor(private readonly opts: { maxSockets: number; ca?: string | Buffer | (string | Buffer)[] }) {
    this.http = new http.Agent({ keepAlive: true, maxSockets: opts.maxSockets, scheduling: 'lifo' });
    this.https = new https.Agent({ keepAlive: true, maxSockets: opts.maxSockets, scheduling: 'lifo', ...(opts.ca ? { ca: opts.ca } : {}) });
  }

  /** The agent for `url` with host TLS settings `t` (null: the client's defaults). */
  pick(url: URL, t: HostTls | null): http.Agent {
    if (url.protocol !== 'https:') return this.http;
    if (!t || (t.ca.length === 0 && !t.client && !t.skipVerify)) return this.https;
    const hash = crypto.createHash('sha256');
    for (const c of t.ca) hash.update(c).update('\0');
    if (t.client) hash.update(t.client.cert).update('\0').update(t.client.key);
    const key = `${t.skipVerify}:${hash.digest('hex')}`;
    const known = this.custom.get(t.host);
    if (known?.key === key) return known.agent;
    // Settings changed (a rotated certificate, an edited hosts.toml): the old agent goes once nothing uses it.
    if (known) this.retired.push(known.agent);
    this.retired = this.retired.filter((a) => {
      const busy = Object.values(a.sockets).some((l) => (l?.length ?? 0) > 0) || Object.values(a.requests).some((l) => (l?.length ?? 0) > 0);
      if (!busy) a.destroy();
      return busy;
    });
    const base = this.opts.ca ? ([] as (string | Buffer)[]).concat(this.opts.ca) : [...tls.rootCertificates];
    const agent = new https.Agent({
      keepAlive: true,
      maxSockets: this.opts.maxSockets,
      scheduling: 'lifo',
      // The host's CAs are added to the root certificates Node ships (containerd adds them to the system pool).
      ...(t.ca.length > 0 ? { ca: [...base, ...t.ca] } : this.opts.ca ? { ca: this.opts.ca } : {}),
      ...(t.client ? { cert: t.client.cert, key: t.client.key } : {}),
      rejectUnauthorized: !t.skipVerify,
    });
    this.custom.set(t.host, { key, agent });
    return agent;
  }

  destroy(): void {
    this.http.destroy();
    this.https.destroy();
    for (const { agent } of this.custom.values()) agent.destroy();
    for (const a of this.retired) a.destroy();
    this.custom.clear();
    this.retired = [];
  }
}

/**
 * Sends one request and resolves with the response once its headers
 * arrive; the body is the caller's to read (or `discard`), which is what
 * returns the socket to the keep-alive pool.
 */
export function send(agents: Agents, opts: SendOptions): Promise<http.IncomingMessage> {
  return new Promise((resolve, reject) => {
    const isHttps = opts.url.protocol === 'https:';
    const headers: Record<string, string> = { ...opts.headers };
    if (opts.body) headers['content-length'] = String(opts.body.kind === 'buffer' ? opts.body.data.length : opts.body.size);
    // The `timeout` option (unlike req.setTimeout) also covers connecting,
    // so a host that drops SYNs fails after timeoutMs, not the kernel's minutes.
    const req = (isHttps ? https : http).request(opts.url, {
      method: opts.method,
      headers,
      agent: agents.pick(opts.url, opts.tls ?? null),
      timeout: opts.timeoutMs,
    });
    let settled = false;
    let response: http.IncomingMessage | null = null;
    req.on('timeout', () => {
      const err = new TimeoutError(opts.timeoutMs);
      // A stalled body: its reader sees the timeout, not a bare "aborted".
      if (response && !response.complete) response.destroy(err);
      req.destroy(err);
    });
    req.on('error', (err) => {
      if (!settled) {
        settled = true;
        reject(err);
      }
    });
    req.on('response', (res) => {
      settled = true;
      response = res;
      resolve(res);
    });
    if (!opts.body) {
      req.end();
    } else if (opts.body.kind === 'buffer') {
      req.end(opts.body.data);
    } else {
      const file = fs.createReadStream(opts.body.path);
      file.on('error', (err) => req.destroy(err));
      file.pipe(req);
    }
  });
}

/** Reads the whole body, failing once it passes `limit` bytes. */
export function readBody(res: Readable, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let n = 0;
    res.on('data', (c: Buffer) => {
      n += c.length;
      if (n > limit) {
        res.destroy(new BodyTooLargeError(limit));
        return;
      }
      chunks.push(c);
    });
    let ended = false;
    res.on('end', () => {
      ended = true;
      resolve(Buffer.concat(chunks, n));
    });
    res.on('error', reject);
    // A connection closed mid-body without an 'error' must not leave us waiting.
    res.on('close', () => {
      if (!ended) reject(Object.assign(new Error('response body cut short'), { code: 'ERR_STREAM_PREMATURE_CLOSE' }));
    });
  });
}

/**
 * Reads a small body (an error document) and never rejects: a failure
 * here must not hide the status the caller is about to report.
 */
export async function readSmallBody(res: Readable, limit = 64 << 10): Promise<Buffer> {
  try {
    return await readBody(res, limit);
  } catch {
    return Buffer.alloc(0);
  }
}

/** Consumes and drops a body so the socket can be reused. */
export function discard(res: http.IncomingMessage): Promise<void> {
  return readSmallBody(res, 1 << 20).then(() => undefined);
}

const RETRYABLE_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'ETIMEDOUT_INACTIVITY',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EHOSTDOWN',
  'ERR_STREAM_PREMATURE_CLOSE',
]);

/** True for failures of the connection that a later attempt may not see. */
export function isTransientNetworkError(err: unknown): boolean {
  if (err instanceof TimeoutError) return true;
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && RETRYABLE_CODES.has(code);
}

/** True for TLS failures (handshake, certificates, a plain-HTTP peer). */
export function isTlsError(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code !== 'string') return false;
  return (
    code.startsWith('ERR_SSL_') ||
    code === 'EPROTO' ||
    code.includes('CERT') ||
    code === 'DEPTH_ZERO_SELF_SIGNED_CERTIFICATE' ||
    code === 'SELF_SIGNED_CERT_IN_CHAIN' ||
    code === 'ERR_TLS_CERT_ALTNAME_INVALID'
  );
}

export function isRetryableStatus(status: number): boolean {
  return status === 429 || status >= 500;
}

/**
 * Delay before retry number `attempt` (0 for the first retry): exponential
 * from `baseMs`, capped at `maxMs`, with "equal jitter" (half fixed, half
 * random) so that many clients do not retry in lockstep. A Retry-After the
 * server sent (seconds) is honoured up to `maxMs`.
 */
export function backoffDelay(attempt: number, baseMs: number, maxMs: number, retryAfter?: string | null, random: () => number = Math.random): number {
  if (retryAfter) {
    const secs = Number(retryAfter);
    if (Number.isFinite(secs) && secs >= 0) return Math.min(maxMs, secs * 1000);
    const at = Date.parse(retryAfter);
    if (Number.isFinite(at)) return Math.min(maxMs, Math.max(0, at - Date.now()));
  }
  const exp = Math.min(maxMs, baseMs * 2 ** attempt);
  return exp / 2 + random() * (exp / 2);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
