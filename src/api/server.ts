import fs from 'node:fs';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import Fastify, { type FastifyInstance } from 'fastify';
import type { Logger } from '../log/logger';
import { PrefetchError, type Prefetcher } from '../ondemand/prefetch';
import { NAMESPACE_RE } from '../store/keys';
import { prepareSocketPath } from '../util/socket';
import { type StatsSources, collectStats, toPrometheus } from './stats';

/**
 * The HTTP API (`api.address`: "host:port", loopback by default, or a unix
 * socket path): GET /stats, GET /metrics, GET /healthz, POST /prefetch,
 * GET /prefetch/<id>, POST /fsck. Errors are JSON `{"error": "..."}` with a 4xx for
 * what the client sent and 5xx for the daemon's own trouble.
 */
export interface ApiOptions {
  address: string;
  logger: Logger;
  stats: StatsSources;
  prefetch: Prefetcher;
  /** Null when healthy, else what is wrong. */
  health: () => string | null;
  /** POST /fsck: verifies the store and layer images; progress as it goes. */
  fsck?: (onProgress: (p: unknown) => void) => Promise<unknown>;
  /** Called for each POST /prefetch (accepted or not), for the audit log. */
  onPrefetch?: (e: { ok: boolean; status: number; imageId: string | null; jobId: string | null; error: string | null; durationMs: number }) => void;
}

export const MAX_BODY_BYTES = 1 << 20;
/**
 * POST /prefetch requests read and checked at once; more are refused (429)
 * before their body is read, so bodies in memory stay bounded (each parsed
 * body of 1 MiB of paths takes a few MB) however many clients send at once.
 */
export const MAX_PREFETCH_IN_FLIGHT = 4;

export interface ApiHandle {
  app: FastifyInstance;
  /** What it listens on: "host:port" or the socket path. */
  listening: string;
  close(): Promise<void>;
}

class HttpError extends Error {
  constructor(
    readonly statusCode: number,
    message: string,
    /** Seconds, sent as Retry-After. */
    readonly retryAfter?: number,
  ) {
    super(message);
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The body of POST /prefetch, checked; throws HttpError(400) naming what is wrong. */
function prefetchRequest(body: unknown): { imageId: string; namespace: string; traceFile?: string; files?: string[] } {
  if (!isObject(body)) throw new HttpError(400, 'expected a JSON object like {"image_id": "<image reference, chain id or layer id>", "trace_file": "<path>"}');
  const known = ['image_id', 'namespace', 'trace_file', 'files'];
  for (const k of Object.keys(body)) if (!known.includes(k)) throw new HttpError(400, `unknown field ${JSON.stringify(k)}; expected ${known.join(', ')}`);
  const { image_id: imageId, namespace = 'default', trace_file: traceFile, files } = body;
  if (typeof imageId !== 'string' || imageId === '' || imageId.length > 4096) throw new HttpError(400, 'image_id must be a non-empty string (an image reference, a chain id or a layer id)');
  if (typeof namespace !== 'string' || namespace.length > 76 || !NAMESPACE_RE.test(namespace)) {
    throw new HttpError(400, 'namespace must be a containerd namespace such as "default" or "k8s.io"');
  }
  if (traceFile !== undefined && files !== undefined) throw new HttpError(400, 'give either trace_file or files, not both');
  if (traceFile === undefined && files === undefined) throw new HttpError(400, 'trace_file or files is required');
  if (traceFile !== undefined) {
    if (typeof traceFile !== 'string') throw new HttpError(400, 'trace_file must be a string');
    return { imageId, namespace, traceFile };
  }
  if (!Array.isArray(files) || files.length === 0 || files.length > 100_000 || !files.every((f) => typeof f === 'string')) {
    throw new HttpError(400, 'files must be a non-empty array of up to 100000 path strings');
  }
  return { imageId, namespace, files: files as string[] };
}

export async function startApiServer(opts: ApiOptions): Promise<ApiHandle> {
  const log = opts.logger;
  const app = Fastify({ logger: false, bodyLimit: MAX_BODY_BYTES });

  // Bodies are JSON whatever the content type says: the guide's
  // `curl -X POST ... -d '{...}'` sends application/x-www-form-urlencoded.
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', { parseAs: 'string', bodyLimit: MAX_BODY_BYTES }, (_req, body, done) => {
    const text = String(body);
    if (text.trim() === '') return done(null, undefined);
    try {
      done(null, JSON.parse(text));
    } catch (err) {
      done(new HttpError(400, `body is not valid JSON: ${(err as Error).message}`), undefined);
    }
  });

  app.setErrorHandler((err: Error & { statusCode?: number; code?: string; retryAfter?: number }, req, reply) => {
    let status = err.statusCode ?? 500;
    let message = err.message;
    if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') message = `request body is over ${MAX_BODY_BYTES} bytes`;
    if (err.code === 'FST_ERR_CTP_EMPTY_JSON_BODY') message = 'request body is empty';
    if (status < 400 || status > 599) status = 500;
    if (req.method === 'POST' && req.url.split('?')[0] === '/prefetch') {
      opts.prefetch.counters.requests++;
      opts.prefetch.counters.rejected++;
      const started = (req as { prefetchStarted?: number }).prefetchStarted ?? Date.now();
      const body = req.body as { image_id?: unknown } | undefined;
      opts.onPrefetch?.({
        ok: false,
        status,
        imageId: typeof body?.image_id === 'string' ? body.image_id.slice(0, 4096) : null,
        jobId: null,
        error: message,
        durationMs: Date.now() - started,
      });
    }
    if (status >= 500 && status !== 503) log.error({ op: 'api', method: req.method, url: req.url, err: message }, 'API request failed');
    if (err.retryAfter !== undefined) reply.header('retry-after', String(err.retryAfter));
    reply.code(status).type('application/json').send({ error: message });
  });
  app.setNotFoundHandler((req, reply) => {
    reply.code(404).send({ error: `no such endpoint: ${req.method} ${req.url.split('?')[0]}; see GET /stats, /metrics, /healthz, POST /prefetch, GET /prefetch/<id>` });
  });

  app.get('/stats', async (_req, reply) => {
    reply.type('application/json');
    return `${JSON.stringify(collectStats(opts.stats), null, 2)}\n`;
  });
  app.get('/metrics', async (_req, reply) => {
    reply.type('text/plain; version=0.0.4; charset=utf-8');
    return toPrometheus(collectStats(opts.stats));
  });
  app.get('/healthz', async (_req, reply) => {
    const problem = opts.health();
    if (problem) return reply.code(503).send({ status: 'unhealthy', reason: problem });
    return { status: 'ok' };
  });
  // At most MAX_PREFETCH_IN_FLIGHT prefetch requests are read at once; a slot is freed when the response ends or the client goes.
  let inFlight = 0;
  app.addHook('onRequest', async (req, reply) => {
    if (req.method !== 'POST' || req.url.split('?')[0] !== '/prefetch') return;
    if (inFlight >= MAX_PREFETCH_IN_FLIGHT) throw new HttpError(429, `${inFlight} prefetch requests are being read already; retry later`, 1);
    inFlight++;
    reply.raw.once('close', () => inFlight--);
  });
  // Refusals are counted and audited by the error handler, which also sees bodies that never parsed.
  app.post('/prefetch', async (req, reply) => {
    const started = Date.now();
    (req as { prefetchStarted?: number }).prefetchStarted = started;
    const r = prefetchRequest(req.body);
    let job;
    try {
      job = await opts.prefetch.submit(r);
    } catch (err) {
      if (err instanceof PrefetchError) throw new HttpError(err.status, err.message, err.retryAfter);
      throw err;
    }
    opts.prefetch.counters.requests++;
    opts.onPrefetch?.({ ok: true, status: 202, imageId: r.imageId, jobId: job.id, error: null, durationMs: Date.now() - started });
    return reply.code(202).header('location', `/prefetch/${job.id}`).send(job);
  });
  app.get<{ Params: { id: string } }>('/prefetch/:id', async (req, reply) => {
    const job = /^[0-9a-f-]{36}$/.test(req.params.id) ? opts.prefetch.get(req.params.id) : undefined;
    if (!job) return reply.code(404).send({ error: `no prefetch job ${JSON.stringify(req.params.id.slice(0, 100))}` });
    return job;
  });
  // One fsck at a time; the answer is NDJSON: {"progress":…} lines, then {"report":…} or {"error":…}.
  let fsckRunning = false;
  app.post('/fsck', async (_req, reply) => {
    const fsck = opts.fsck;
    if (!fsck) return reply.code(404).send({ error: 'this daemon has no chunk store to check (use_erofs is off)' });
    if (fsckRunning) return reply.code(409).send({ error: 'an fsck is already running' });
    fsckRunning = true;
    const out = new PassThrough();
    const line = (v: unknown) => out.write(`${JSON.stringify(v)}\n`);
    fsck((p) => line({ progress: p }))
      .then((report) => line({ report }))
      .catch((err: Error) => {
        log.error({ op: 'fsck', err: err.message }, `fsck failed: ${err.message}`);
        line({ error: err.message });
      })
      .finally(() => {
        fsckRunning = false;
        out.end();
      });
    return reply.code(200).type('application/x-ndjson').send(out);
  });
  const others: [string, ('GET' | 'POST' | 'PUT' | 'DELETE' | 'PATCH')[]][] = [
    ['/stats', ['POST', 'PUT', 'DELETE', 'PATCH']],
    ['/metrics', ['POST', 'PUT', 'DELETE', 'PATCH']],
    ['/healthz', ['POST', 'PUT', 'DELETE', 'PATCH']],
    ['/prefetch', ['GET', 'PUT', 'DELETE', 'PATCH']],
    ['/fsck', ['GET', 'PUT', 'DELETE', 'PATCH']],
  ];
  for (const [url, method] of others) {
    app.route({ method, url, handler: async (req, reply) => reply.code(405).send({ error: `${req.method} is not allowed on ${url}` }) });
  }

  const address = opts.address;
  let listening: string;
  if (path.isAbsolute(address)) {
    await prepareSocketPath(address);
    await app.listen({ path: address });
    fs.chmodSync(address, 0o660);
    listening = address;
  } else {
    const i = address.lastIndexOf(':');
    const host = address.slice(0, i).replace(/^\[(.*)\]$/, '$1') || '127.0.0.1';
    await app.listen({ host, port: Number(address.slice(i + 1)) });
    const a = app.server.address();
    listening = typeof a === 'object' && a ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : address;
  }
  return {
    app,
    listening,
    close: async () => {
      await app.close();
    },
  };
}
