/**
 * src/remote: the OCI Distribution client. Against a real docker-registry
 * (push, pull by tag and digest, HEAD, Range, corruption on disk, 404s,
 * skopeo interoperability) and against small fake registries written here
 * for what a real one does not do on demand (token and basic auth, 5xx and
 * 429, dropped connections, timeouts, redirects, lying digests).
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, test } from 'node:test';
import { createLogger } from '../src/log/logger';
import {
  DockerConfigError,
  Redactor,
  TokenCache,
  loadDockerConfigCredentials,
  normalizeCredentialHost,
  parseWwwAuthenticate,
} from '../src/remote/auth';
import { digestOf } from '../src/remote/digest';
import { RegistryError } from '../src/remote/errors';
import { InvalidReferenceError, formatReference, parseReference, parseRepository } from '../src/remote/reference';
import { MEDIA_TYPE_OCI_MANIFEST, RegistryClient, type RegistryClientOptions } from '../src/remote/registry';
import { backoffDelay } from '../src/remote/transport';
import { type BuiltImage, MEDIA_MANIFEST, buildImage, pseudoRandom, pushImage } from './helpers/images';
import { type RealRegistry, registryBlobPath, startRegistry } from './helpers/registry';
import { freePort } from './helpers/stack';

const USER = 'alice';
const PASSWORD = 'pw-Very$ecret-4711';
const TOKEN = 'tok-9f8e7d6c5b4a-very-secret-token';
const BASIC = `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`;
const SECRETS = [PASSWORD, TOKEN, BASIC.slice('Basic '.length), `${USER}:${PASSWORD}`];

function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `dedup-${prefix}-`));
}



/** Collects pino output (one JSON line per entry). */
function captureLogger(): { logger: ReturnType<typeof createLogger>; text: () => string } {
  let out = '';
  const logger = createLogger('trace', { write: (s: string) => void (out += s) });
  return { logger, text: () => out };
}

function assertNoSecrets(text: string, where: string): void {
  for (const s of SECRETS) assert.ok(!text.includes(s), `${where} contains a secret (${s.slice(0, 3)}…): ${text}`);
}

/** Awaits `p` and returns the RegistryError it must reject with. */
async function registryError(p: Promise<unknown>): Promise<RegistryError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof RegistryError, `expected a RegistryError, got ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`);
    return err;
  }
  assert.fail('expected a RegistryError, but the call succeeded');
}

async function collect(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  await pipeline(
    stream,
    new Writable({
      write(c: Buffer, _e, cb) {
        chunks.push(c);
        cb();
      },
    }),
  );
  return Buffer.concat(chunks);
}

// ---------------------------------------------------------------------------
// Fake registries.

interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
  socket: number;
}

type Handler = (req: http.IncomingMessage, res: http.ServerResponse, seen: Seen) => void;

class FakeRegistry {
  readonly seen: Seen[] = [];
  connections = 0;
  private readonly sockets = new Set<net.Socket>();
  private handler: Handler = (_q, res) => res.writeHead(500).end();
  private constructor(
    private readonly server: http.Server,
    readonly port: number,
  ) {}

  get host(): string {
    return `127.0.0.1:${this.port}`;
  }

  static async start(handler?: Handler): Promise<FakeRegistry> {
    const server = http.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const fake = new FakeRegistry(server, (server.address() as net.AddressInfo).port);
    if (handler) fake.handler = handler;
    const ids = new WeakMap<net.Socket, number>();
    server.on('connection', (s) => {
      fake.connections++;
      ids.set(s, fake.connections);
      fake.sockets.add(s);
      s.on('close', () => fake.sockets.delete(s));
    });
    server.on('request', (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const seen: Seen = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks), socket: ids.get(req.socket) ?? 0 };
        fake.seen.push(seen);
        fake.handler(req, res, seen);
      });
    });
    return fake;
  }

  on(handler: Handler): void {
    this.handler = handler;
    this.seen.length = 0;
  }

  requests(pathPrefix: string): Seen[] {
    return this.seen.filter((s) => s.url.startsWith(pathPrefix));
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

function json(res: http.ServerResponse, status: number, doc: unknown, headers: Record<string, string> = {}): void {
  const body = Buffer.from(JSON.stringify(doc));
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': String(body.length), ...headers });
  res.end(body);
}

function registryErrorBody(res: http.ServerResponse, status: number, code: string, message: string, headers: Record<string, string> = {}): void {
  json(res, status, { errors: [{ code, message, detail: null }] }, headers);
}

const MANIFEST = Buffer.from(
  JSON.stringify({
    schemaVersion: 2,
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: digestOf(Buffer.from('{}')), size: 2 },
    layers: [],
  }),
);
const MANIFEST_DIGEST = digestOf(MANIFEST);
const BLOB = pseudoRandom(200_000, 'fake-blob');
const BLOB_DIGEST = digestOf(BLOB);

function serveManifest(res: http.ServerResponse, bytes = MANIFEST, headers: Record<string, string> = {}): void {
  res.writeHead(200, { 'content-type': MEDIA_TYPE_OCI_MANIFEST, 'content-length': String(bytes.length), 'docker-content-digest': digestOf(bytes), ...headers });
  res.end(bytes);
}

function serveBlob(req: http.IncomingMessage, res: http.ServerResponse, data = BLOB): void {
  const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
  if (range) {
    const a = Number(range[1]);
    const b = Math.min(Number(range[2]), data.length - 1);
    const part = data.subarray(a, b + 1);
    res.writeHead(206, { 'content-type': 'application/octet-stream', 'content-length': String(part.length), 'content-range': `bytes ${a}-${b}/${data.length}` });
    res.end(part);
    return;
  }
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(data.length) });
  res.end(req.method === 'HEAD' ? undefined : data);
}

function fastClient(fake: FakeRegistry, extra: RegistryClientOptions = {}): RegistryClient {
  return new RegistryClient({ plainHttpHosts: [fake.host], retries: 3, backoffMs: 10, maxBackoffMs: 200, timeoutMs: 5000, ...extra });
}

// ---------------------------------------------------------------------------

describe('parseReference', () => {
  test('normalizes Docker Hub short names and keeps registries with ports', () => {
    const a = parseReference('alpine');
    assert.deepEqual(
      { domain: a.domain, host: a.host, repository: a.repository, tag: a.tag, digest: a.digest },
      { domain: 'docker.io', host: 'registry-1.docker.io', repository: 'library/alpine', tag: 'latest', digest: null },
    );
    assert.equal(formatReference(a), 'docker.io/library/alpine:latest');
    const b = parseReference('docker.io/library/alpine:3.19');
    assert.equal(b.host, 'registry-1.docker.io');
    assert.equal(b.tag, '3.19');
    assert.equal(parseReference('index.docker.io/library/alpine').domain, 'docker.io');
    assert.equal(parseReference('bitnami/redis:7').repository, 'bitnami/redis');
    const c = parseReference('127.0.0.1:5000/bench/python-b:latest');
    assert.deepEqual([c.domain, c.host, c.repository, c.tag], ['127.0.0.1:5000', '127.0.0.1:5000', 'bench/python-b', 'latest']);
    const d = parseReference('localhost/foo');
    assert.deepEqual([d.host, d.repository, d.tag], ['localhost', 'foo', 'latest']);
    assert.equal(parseReference('[::1]:5000/x/y:t').host, '[::1]:5000');
  });

  test('by digest, and tag plus digest', () => {
    const dg = `sha256:${'a'.repeat(64)}`;
    const a = parseReference(`ghcr.io/org/repo@${dg}`);
    assert.deepEqual([a.host, a.repository, a.tag, a.digest], ['ghcr.io', 'org/repo', null, dg]);
    const b = parseReference(`127.0.0.1:5000/bench/python-b:v2@${dg}`);
    assert.deepEqual([b.tag, b.digest], ['v2', dg]);
    assert.equal(formatReference(b), `127.0.0.1:5000/bench/python-b:v2@${dg}`);
  });

  test('says what is wrong', () => {
    const cases: [string, RegExp][] = [
      ['', /empty/],
      ['docker.io/Library/Alpine', /must be lowercase/],
      ['Alpine', /must be lowercase/],
      ['host.io/repo@sha256:abc', /sha256 digests are 64 lowercase hex characters, got 3/],
      [`host.io/repo@sha256:${'A'.repeat(64)}`, /uppercase hex/],
      [`host.io/repo@md5:${'a'.repeat(32)}`, /unsupported algorithm "md5"/],
      ['host.io/repo@', /digest after "@" is empty/],
      ['host.io/repo:-bad', /tag "-bad" is invalid/],
      ['host.io/re--po_/x', /path component "re--po_" is invalid/],
      ['host.io//x', /empty path component/],
      ['https://host.io/x', /no scheme/],
      ['host.io/a b', /whitespace/],
      ['host.io:99999/x', /port 99999 is out of range/],
      ['host_io.example:5000/x', /registry host "host_io.example:5000" is not a valid/],
      [`host.io/${'a'.repeat(260)}`, /at most 255/],
    ];
    for (const [ref, re] of cases) {
      assert.throws(
        () => parseReference(ref),
        (err: unknown) => err instanceof InvalidReferenceError && re.test(err.message) && err.message.includes(JSON.stringify(ref.slice(0, 300))) && err.kind === 'InvalidArgument',
        `reference ${JSON.stringify(ref)} should fail matching ${re}`,
      );
    }
  });

  test('parseRepository refuses tags and digests', () => {
    assert.equal(parseRepository('127.0.0.1:5000/a/b').repository, 'a/b');
    assert.throws(() => parseRepository('127.0.0.1:5000/a/b:t'), /without a tag/);
    assert.throws(() => parseRepository(`127.0.0.1:5000/a/b@sha256:${'0'.repeat(64)}`), /without a digest/);
  });
});

describe('auth helpers', () => {
  test('WWW-Authenticate: Bearer with a quoted comma scope, Basic, several challenges', () => {
    const [c] = parseWwwAuthenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push"');
    assert.equal(c.scheme, 'bearer');
    assert.deepEqual(c.params, { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/alpine:pull,push' });
    const two = parseWwwAuthenticate(['Basic realm="Registry Realm"', 'Bearer realm="http://x/t", error="invalid_token"']);
    assert.deepEqual(
      two.map((x) => [x.scheme, x.params.realm]),
      [
        ['basic', 'Registry Realm'],
        ['bearer', 'http://x/t'],
      ],
    );
    assert.deepEqual(parseWwwAuthenticate('Basic realm="a", Bearer realm="b",service=s').map((x) => [x.scheme, x.params.realm, x.params.service]), [
      ['basic', 'a', undefined],
      ['bearer', 'b', 's'],
    ]);
    assert.deepEqual(parseWwwAuthenticate(undefined), []);
  });

  test('docker config.json: auth or username/password, Docker Hub spellings, missing file, malformed file', () => {
    const dir = tempDir('dockercfg');
    const file = path.join(dir, 'config.json');
    fs.writeFileSync(
      file,
      JSON.stringify({
        auths: {
          '127.0.0.1:5000': { auth: Buffer.from(`${USER}:${PASSWORD}:with-colon`).toString('base64') },
          'https://index.docker.io/v1/': { auth: Buffer.from('hubuser:hubpass').toString('base64') },
          'http://Other.Example.com/v2/': { username: 'bob', password: 'bobpass' },
          'helper-only.example.com': {},
        },
        credsStore: 'desktop',
      }),
    );
    const creds = loadDockerConfigCredentials(file);
    assert.deepEqual(creds('127.0.0.1:5000'), { username: USER, password: `${PASSWORD}:with-colon` });
    assert.deepEqual(creds('registry-1.docker.io'), { username: 'hubuser', password: 'hubpass' });
    assert.deepEqual(creds('docker.io'), { username: 'hubuser', password: 'hubpass' });
    assert.deepEqual(creds('other.example.com'), { username: 'bob', password: 'bobpass' });
    assert.equal(creds('helper-only.example.com'), null);
    assert.equal(creds('127.0.0.1:5001'), null);
    assert.equal(normalizeCredentialHost('https://index.docker.io/v1/'), 'docker.io');

    assert.equal(loadDockerConfigCredentials(path.join(dir, 'absent.json'))('127.0.0.1:5000'), null);

    fs.writeFileSync(file, `{"auths": {"h": {"auth": "${PASSWORD}"`);
    assert.throws(
      () => loadDockerConfigCredentials(file),
      (err: unknown) => err instanceof DockerConfigError && err.message.includes(file) && /not valid JSON/.test(err.message) && !err.message.includes(PASSWORD),
    );
    fs.writeFileSync(file, JSON.stringify({ auths: { h: { auth: Buffer.from(`no-colon-${PASSWORD}`).toString('base64') } } }));
    assert.throws(
      () => loadDockerConfigCredentials(file),
      (err: unknown) => err instanceof DockerConfigError && err.message.includes('auths["h"].auth') && !err.message.includes(PASSWORD),
    );
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('token cache expires tokens before the registry does', () => {
    let now = 1_000_000;
    const cache = new TokenCache(() => now);
    cache.set('h', ['repository:a:pull'], 't1', 300);
    assert.equal(cache.get('h', ['repository:a:pull']), 't1');
    assert.equal(cache.get('h', ['repository:a:pull,push']), null);
    assert.equal(cache.get('other', ['repository:a:pull']), null);
    now += 289_000;
    assert.equal(cache.get('h', ['repository:a:pull']), 't1');
    now += 2_000; // 291 s: inside the last 10 s
    assert.equal(cache.get('h', ['repository:a:pull']), null);
  });

  test('redactor hides secrets and any Authorization value', () => {
    const r = new Redactor();
    r.addCredentials({ username: USER, password: PASSWORD });
    r.add(TOKEN);
    const out = r.redact(`x ${PASSWORD} y ${TOKEN} z ${BASIC} w Bearer abcdefghijklmnop`);
    assertNoSecrets(out, 'redacted text');
    assert.ok(!out.includes('abcdefghijklmnop'));
  });

  test('backoff: exponential, jittered, capped, Retry-After honoured', () => {
    for (let i = 0; i < 50; i++) {
      const d0 = backoffDelay(0, 100, 10_000);
      const d3 = backoffDelay(3, 100, 10_000);
      assert.ok(d0 >= 50 && d0 <= 100, `first delay ${d0}`);
      assert.ok(d3 >= 400 && d3 <= 800, `fourth delay ${d3}`);
      assert.ok(backoffDelay(30, 100, 2000) <= 2000);
    }
    assert.equal(backoffDelay(0, 100, 10_000, '2'), 2000);
    assert.equal(backoffDelay(0, 100, 1000, '120'), 1000);
  });
});

// ---------------------------------------------------------------------------

describe('against a real docker-registry', () => {
  let reg: RealRegistry;
  let client: RegistryClient;
  let img: BuiltImage;
  let work: string;
  let repo: string;

  before(async () => {
    reg = await startRegistry();
    work = tempDir('registry-work');
    client = new RegistryClient({ plainHttpHosts: [reg.host], retries: 1, backoffMs: 10, timeoutMs: 30_000 });
    img = await buildImage({
      name: 'regtest/small',
      tag: 'v1',
      passwd: '',
      expect: [],
      layers: [[{ type: 'file', path: 'hello.txt', content: 'hello\n' }], [{ type: 'file', path: 'big.bin', content: pseudoRandom(3 << 20, 'registry-test-big') }]],
    });
    repo = `${reg.host}/regtest/small`;
  });

  after(async () => {
    client?.close();
    await reg?.stop();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  test('pushes blobs (Buffer and file), skips existing ones, mounts across repositories, puts the manifest', async () => {
    assert.equal(await client.pushBlob(repo, img.layers[0].digest, img.layers[0].gz), 'uploaded');
    const bigFile = path.join(work, 'layer1.tar.gz');
    fs.writeFileSync(bigFile, img.layers[1].gz);
    assert.equal(await client.pushBlob(repo, img.layers[1].digest, bigFile), 'uploaded');
    assert.equal(await client.pushBlob(repo, img.configDigest, img.config), 'uploaded');
    assert.equal(await client.pushBlob(repo, img.layers[0].digest, img.layers[0].gz), 'exists');
    assert.equal(await client.pushBlob(`${reg.host}/regtest/other`, img.layers[1].digest, bigFile, { mountFrom: repo }), 'mounted');
    assert.ok(await client.blobExists(`${reg.host}/regtest/other`, img.layers[1].digest));

    const digest = await client.putManifest(`${repo}:v1`, MEDIA_MANIFEST, img.manifest);
    assert.equal(digest, img.manifestDigest);
    // By digest only (no tag): the digest must match the bytes.
    assert.equal(await client.putManifest(`${repo}@${img.manifestDigest}`, MEDIA_MANIFEST, img.manifest), img.manifestDigest);
    const wrong = await registryError(client.putManifest(`${repo}@${digestOf(Buffer.from('x'))}`, MEDIA_MANIFEST, img.manifest));
    assert.equal(wrong.code, 'DIGEST_MISMATCH');
  });

  test('a Buffer that does not match its digest is refused before sending; the registry rejects a wrong file', async () => {
    const e1 = await registryError(client.pushBlob(repo, digestOf(Buffer.from('other')), Buffer.from('data')));
    assert.equal(e1.code, 'DIGEST_MISMATCH');
    const f = path.join(work, 'wrong.bin');
    fs.writeFileSync(f, 'not what the digest says');
    const e2 = await registryError(client.pushBlob(repo, digestOf(Buffer.from('something else')), f));
    assert.equal(e2.status, 400);
    assert.equal(e2.code, 'DIGEST_INVALID');
    assert.match(e2.message, new RegExp(`registry ${reg.host}, repository regtest/small: PUT blob sha256:`));
  });

  test('gets the manifest by tag, by digest, and by tag@digest', async () => {
    const byTag = await client.getManifest(`${repo}:v1`);
    assert.equal(byTag.digest, img.manifestDigest);
    assert.equal(byTag.mediaType, MEDIA_MANIFEST);
    assert.deepEqual(byTag.bytes, img.manifest);
    assert.equal((byTag.json as { layers: unknown[] }).layers.length, 2);
    const byDigest = await client.getManifest(`${repo}@${img.manifestDigest}`);
    assert.deepEqual(byDigest.bytes, img.manifest);
    assert.equal(byDigest.digest, img.manifestDigest);
    const both = await client.getManifest(parseReference(`${repo}:ignored@${img.manifestDigest}`));
    assert.equal(both.digest, img.manifestDigest);
  });

  test('HEAD, GET, stream and Range of a blob', async () => {
    const big = img.layers[1];
    assert.deepEqual(await client.statBlob(repo, big.digest), { digest: big.digest, size: big.gz.length });
    assert.equal(await client.blobExists(repo, digestOf(Buffer.from('never pushed'))), false);
    assert.deepEqual(await client.getBlob(repo, big.digest), big.gz);

    const s = await client.getBlobStream(repo, big.digest);
    assert.equal(s.size, big.gz.length);
    assert.deepEqual(await collect(s.stream), big.gz);
    s.verify();

    const offset = 1_000_003;
    const length = 65_537;
    assert.deepEqual(await client.getBlobRange(repo, big.digest, offset, length), big.gz.subarray(offset, offset + length));
    assert.deepEqual(await client.getBlobRange(repo, big.digest, big.gz.length - 10, 10), big.gz.subarray(big.gz.length - 10));
    assert.deepEqual(await client.getBlobRange(repo, big.digest, 5, 0), Buffer.alloc(0));
    const past = await registryError(client.getBlobRange(repo, big.digest, big.gz.length - 10, 20));
    assert.equal(past.code, 'SIZE_MISMATCH');
  });

  test('404s are RegistryErrors with the registry code, not retried', async () => {
    const missing = digestOf(Buffer.from('missing blob'));
    const b = await registryError(client.getBlob(repo, missing));
    assert.equal(b.status, 404);
    assert.equal(b.code, 'BLOB_UNKNOWN');
    assert.equal(b.kind, 'NotFound');
    assert.equal(b.host, reg.host);
    assert.equal(b.repository, 'regtest/small');
    assert.match(b.message, new RegExp(`^registry ${reg.host}, repository regtest/small: GET blob ${missing}: HTTP 404 BLOB_UNKNOWN`));
    assert.doesNotMatch(b.message, /attempts/);
    const m = await registryError(client.getManifest(`${repo}:no-such-tag`));
    assert.equal(m.code, 'MANIFEST_UNKNOWN');
    assert.match(m.message, /manifest no-such-tag/);
    const bad = await registryError(client.putManifest(`${reg.host}/regtest/broken:v1`, MEDIA_MANIFEST, img.manifest));
    assert.equal(bad.status, 400);
    assert.equal(bad.code, 'MANIFEST_BLOB_UNKNOWN');
  });

  test('content corrupted in the registry storage is detected, whole and streamed', async () => {
    const data = pseudoRandom(300_000, 'to-be-corrupted');
    const digest = digestOf(data);
    assert.equal(await client.pushBlob(repo, digest, data), 'uploaded');
    const file = registryBlobPath(reg.dataDir, digest);
    const stored = fs.readFileSync(file);
    assert.deepEqual(stored, data);
    stored[150_000] ^= 0xff;
    fs.writeFileSync(file, stored);

    const e1 = await registryError(client.getBlob(repo, digest));
    assert.equal(e1.code, 'DIGEST_MISMATCH');
    assert.match(e1.message, new RegExp(`content hashes to sha256:[0-9a-f]{64}, not ${digest}`));

    const s = await client.getBlobStream(repo, digest);
    await assert.rejects(collect(s.stream), (err: unknown) => err instanceof RegistryError && err.code === 'DIGEST_MISMATCH');
    assert.throws(() => s.verify(), (err: unknown) => err instanceof RegistryError && err.code === 'DIGEST_MISMATCH');

    // A caller that checks the content itself (a layer's diff id) gets the bytes as served; only their count is checked.
    const unhashed = await client.getBlobStream(repo, digest, { size: data.length, contentCheckedByCaller: true });
    assert.deepEqual(await collect(unhashed.stream), stored);
    unhashed.verify();
    for (const size of [data.length - 1, data.length + 1]) {
      const wrong = await client.getBlobStream(repo, digest, { size, contentCheckedByCaller: true }).catch((err: unknown) => err);
      if (wrong instanceof RegistryError) {
        // Content-Length already disagrees with the descriptor.
        assert.equal(wrong.code, 'SIZE_MISMATCH');
        continue;
      }
      const w = wrong as Awaited<ReturnType<RegistryClient['getBlobStream']>>;
      await assert.rejects(collect(w.stream), (err: unknown) => err instanceof RegistryError && err.code === 'SIZE_MISMATCH');
      assert.throws(() => w.verify(), (err: unknown) => err instanceof RegistryError && err.code === 'SIZE_MISMATCH' && /descriptor says/.test(err.message));
    }
    await assert.rejects(client.getBlobStream(repo, digest, { contentCheckedByCaller: true }), /must give the size/);
    await assert.rejects(client.getBlobStream(repo, digest, { size: -1 }), /size must be a non-negative integer/);
  });

  test('interoperates with skopeo: an image it pushed reads back byte for byte', async () => {
    const other = await buildImage({ name: 'regtest/skopeo', tag: 'v1', passwd: '', expect: [], layers: [[{ type: 'file', path: 'x', content: 'from skopeo\n' }]] });
    const ref = await pushImage(other, reg.host, work);
    const m = await client.getManifest(ref);
    assert.equal(m.digest, other.manifestDigest);
    assert.deepEqual(await client.getBlob(`${reg.host}/regtest/skopeo`, other.layers[0].digest), other.layers[0].gz);
  });

  test('a host not in plainHttpHosts is spoken to over HTTPS only: a clear error, no retry', async () => {
    const strict = new RegistryClient({ retries: 3, backoffMs: 10 });
    try {
      const e = await registryError(strict.getManifest(`${repo}:v1`));
      assert.equal(e.code, 'TLS');
      assert.equal(e.status, 0);
      assert.match(e.message, new RegExp(`if ${reg.host} serves plain HTTP, add it to registry\\.plain_http_hosts`));
      assert.doesNotMatch(e.message, /attempts/);
    } finally {
      strict.close();
    }
  });
});

// ---------------------------------------------------------------------------

describe('against a fake registry', () => {
  let fake: FakeRegistry;
  before(async () => {
    fake = await FakeRegistry.start();
  });
  after(async () => {
    await fake.close();
  });

  /** Bearer auth as Docker Hub does it; the token endpoint wants alice's password. */
  function bearerRegistry(opts: { realmHost?: string; tokenBody?: unknown } = {}): Handler {
    return (req, res, seen) => {
      if (seen.url.startsWith('/token')) {
        if (req.headers.authorization !== BASIC) {
          registryErrorBody(res, 401, 'UNAUTHORIZED', `bad credentials: got ${req.headers.authorization ?? 'none'}`);
          return;
        }
        json(res, 200, opts.tokenBody ?? { token: TOKEN, expires_in: 300, issued_at: new Date().toISOString() });
        return;
      }
      if (req.headers.authorization !== `Bearer ${TOKEN}`) {
        const realm = `http://${opts.realmHost ?? fake.host}/token`;
        registryErrorBody(res, 401, 'UNAUTHORIZED', 'authentication required', {
          'www-authenticate': `Bearer realm="${realm}",service="fake-registry",scope="repository:r/x:pull"`,
        });
        return;
      }
      if (seen.url === `/v2/r/x/manifests/t`) serveManifest(res);
      else if (seen.url === `/v2/r/x/blobs/${BLOB_DIGEST}`) serveBlob(req, res);
      else registryErrorBody(res, 404, 'BLOB_UNKNOWN', 'nope');
    };
  }

  test('Bearer: challenge, token with service, scope and basic credentials, retried with the token, token reused', async () => {
    fake.on(bearerRegistry());
    const cap = captureLogger();
    const client = fastClient(fake, { credentials: (h) => (h === fake.host ? { username: USER, password: PASSWORD } : null), logger: cap.logger });
    try {
      const m = await client.getManifest(`${fake.host}/r/x:t`);
      assert.equal(m.digest, MANIFEST_DIGEST);
      const tokenReqs = fake.requests('/token');
      assert.equal(tokenReqs.length, 1);
      const q = new URL(tokenReqs[0].url, 'http://x').searchParams;
      assert.equal(q.get('service'), 'fake-registry');
      assert.deepEqual(q.getAll('scope'), ['repository:r/x:pull']);
      assert.equal(tokenReqs[0].headers.authorization, BASIC);
      const manifestReqs = fake.requests('/v2/r/x/manifests/t');
      assert.equal(manifestReqs.length, 2);
      assert.equal(manifestReqs[0].headers.authorization, undefined);
      assert.equal(manifestReqs[1].headers.authorization, `Bearer ${TOKEN}`);
      assert.match(String(manifestReqs[1].headers.accept), /application\/vnd\.oci\.image\.manifest\.v1\+json/);

      // Second request, and one for a blob with the same scope: no new challenge, no new token.
      await client.getManifest(`${fake.host}/r/x:t`);
      assert.deepEqual(await client.getBlob(`${fake.host}/r/x`, BLOB_DIGEST), BLOB);
      assert.equal(fake.requests('/token').length, 1);
      assert.equal(fake.requests('/v2/r/x/manifests/t').length, 3);
      assert.equal(fake.requests('/v2/r/x/manifests/t')[2].headers.authorization, `Bearer ${TOKEN}`);
      assert.equal(fake.requests('/v2/r/x/blobs/').length, 1);
      // Connection reuse: everything above on one socket.
      assert.ok(fake.seen.every((s) => s.socket === fake.seen[0].socket), `sockets used: ${[...new Set(fake.seen.map((s) => s.socket))].join(', ')}`);
      assertNoSecrets(cap.text(), 'log output');
      assert.match(cap.text(), /"msg":"registry token fetched"/);
    } finally {
      client.close();
    }
  });

  test('Bearer with wrong credentials: 401 error without any secret, in the message or the logs', async () => {
    fake.on(bearerRegistry());
    const cap = captureLogger();
    const client = fastClient(fake, { credentials: () => ({ username: USER, password: `${PASSWORD}-wrong` }), logger: cap.logger });
    try {
      const e = await registryError(client.getManifest(`${fake.host}/r/x:t`));
      assert.equal(e.status, 401);
      assert.equal(e.code, 'UNAUTHORIZED');
      assert.equal(e.kind, 'FailedPrecondition');
      assert.match(e.message, new RegExp(`registry ${fake.host}, repository r/x: GET token from http://${fake.host}/token`));
      assert.equal(fake.requests('/token').length, 1, '401 from the token endpoint is not retried');
      for (const s of [...SECRETS, `${PASSWORD}-wrong`, Buffer.from(`${USER}:${PASSWORD}-wrong`).toString('base64')]) {
        assert.ok(!e.message.includes(s), `message leaks ${s}: ${e.message}`);
        assert.ok(!cap.text().includes(s), 'logs leak a secret');
      }
    } finally {
      client.close();
    }
  });

  test('Bearer without credentials asks for an anonymous token', async () => {
    fake.on((req, res, seen) => {
      if (seen.url.startsWith('/token')) return json(res, 200, { access_token: TOKEN });
      if (req.headers.authorization !== `Bearer ${TOKEN}`) {
        return registryErrorBody(res, 401, 'UNAUTHORIZED', 'x', { 'www-authenticate': `Bearer realm="http://${fake.host}/token"` });
      }
      serveManifest(res);
    });
    const client = fastClient(fake);
    try {
      await client.getManifest(`${fake.host}/anon/x:t`);
      const t = fake.requests('/token');
      assert.equal(t.length, 1);
      assert.equal(t[0].headers.authorization, undefined);
      assert.deepEqual(new URL(t[0].url, 'http://x').searchParams.getAll('scope'), ['repository:anon/x:pull']);
    } finally {
      client.close();
    }
  });

  test('a plain-HTTP token realm on a host not in plainHttpHosts is refused; nothing is sent to it', async () => {
    const realm = await FakeRegistry.start((_q, res) => json(res, 200, { token: TOKEN }));
    fake.on(bearerRegistry({ realmHost: `localhost:${realm.port}` }));
    const client = fastClient(fake, { credentials: () => ({ username: USER, password: PASSWORD }) });
    try {
      const e = await registryError(client.getManifest(`${fake.host}/r/x:t`));
      assert.equal(e.code, 'PLAIN_HTTP_REFUSED');
      assert.match(e.message, new RegExp(`token realm http://localhost:${realm.port}/token is plain HTTP and localhost:${realm.port} is not in registry\\.plain_http_hosts; nothing was sent`));
      assert.equal(realm.seen.length, 0);
      assert.equal(realm.connections, 0);
    } finally {
      client.close();
      await realm.close();
    }
  });

  test('Basic: challenge answered with the credentials, then sent up front', async () => {
    fake.on((req, res) => {
      if (req.headers.authorization !== BASIC) return registryErrorBody(res, 401, 'UNAUTHORIZED', 'basic auth required', { 'www-authenticate': 'Basic realm="fake"' });
      serveManifest(res);
    });
    const client = fastClient(fake, { credentials: () => ({ username: USER, password: PASSWORD }) });
    try {
      await client.getManifest(`${fake.host}/b/x:t`);
      assert.deepEqual(
        fake.seen.map((s) => s.headers.authorization),
        [undefined, BASIC],
      );
      await client.getManifest(`${fake.host}/b/x:t`);
      assert.equal(fake.seen.length, 3);
      assert.equal(fake.seen[2].headers.authorization, BASIC);
    } finally {
      client.close();
    }
    const anonymous = fastClient(fake);
    try {
      const e = await registryError(anonymous.getManifest(`${fake.host}/b/x:t`));
      assert.equal(e.status, 401);
      assert.match(e.message, new RegExp(`no credentials configured for ${fake.host}`));
    } finally {
      anonymous.close();
    }
  });

  test('credentials from a docker config.json file', async () => {
    const dir = tempDir('dockercfg');
    const file = path.join(dir, 'config.json');
    fs.writeFileSync(file, JSON.stringify({ auths: { [`http://${fake.host}`]: { auth: BASIC.slice('Basic '.length) } } }));
    fake.on((req, res) => {
      if (req.headers.authorization !== BASIC) return registryErrorBody(res, 401, 'UNAUTHORIZED', 'x', { 'www-authenticate': 'Basic realm="fake"' });
      serveManifest(res);
    });
    const client = fastClient(fake, { dockerConfig: file });
    try {
      await client.getManifest(`${fake.host}/b/x:t`);
      assert.equal(fake.seen.at(-1)?.headers.authorization, BASIC);
    } finally {
      client.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('secrets a registry echoes back are redacted from errors and logs', async () => {
    fake.on((req, res) => {
      if (!req.headers.authorization) return registryErrorBody(res, 401, 'UNAUTHORIZED', 'x', { 'www-authenticate': 'Basic realm="fake"' });
      registryErrorBody(res, 503, 'UNAVAILABLE', `echo: ${req.headers.authorization} password=${PASSWORD} user:pass=${USER}:${PASSWORD}`);
    });
    const cap = captureLogger();
    const client = fastClient(fake, { credentials: () => ({ username: USER, password: PASSWORD }), logger: cap.logger, retries: 1 });
    try {
      const e = await registryError(client.getBlob(`${fake.host}/b/x`, BLOB_DIGEST));
      assert.equal(e.status, 503);
      assert.match(e.message, /\[REDACTED\]/);
      assertNoSecrets(e.message, 'error message');
      assertNoSecrets(cap.text(), 'log output');
      assert.match(cap.text(), /retrying/);
    } finally {
      client.close();
    }
  });

  test('503 twice then 200: retried with growing delays', async () => {
    let n = 0;
    fake.on((req, res) => {
      n++;
      if (n <= 2) return registryErrorBody(res, 503, 'UNAVAILABLE', 'busy');
      serveBlob(req, res);
    });
    const cap = captureLogger();
    const client = fastClient(fake, { backoffMs: 40, logger: cap.logger });
    try {
      const t0 = Date.now();
      assert.deepEqual(await client.getBlob(`${fake.host}/r/x`, BLOB_DIGEST), BLOB);
      const elapsed = Date.now() - t0;
      assert.equal(fake.seen.length, 3);
      // Delays are at least half of 40 ms and of 80 ms.
      assert.ok(elapsed >= 60, `retries took only ${elapsed} ms`);
      const warns = cap
        .text()
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { level: string; msg: string; attempt?: number; delay_ms?: number })
        .filter((l) => l.level === 'warn');
      assert.deepEqual(
        warns.map((w) => w.attempt),
        [1, 2],
      );
      assert.ok((warns[1].delay_ms ?? 0) >= 40);
    } finally {
      client.close();
    }
  });

  test('500 forever: an error after 1 + retries attempts; 429 honours Retry-After', async () => {
    fake.on((_q, res) => registryErrorBody(res, 500, 'UNKNOWN', 'boom'));
    const client = fastClient(fake, { retries: 2 });
    try {
      const e = await registryError(client.getManifest(`${fake.host}/r/x:t`));
      assert.equal(fake.seen.length, 3);
      assert.equal(e.status, 500);
      assert.equal(e.code, 'UNKNOWN');
      assert.equal(e.kind, 'Unavailable');
      assert.match(e.message, /HTTP 500 UNKNOWN: boom \(after 3 attempts\)/);

      let n = 0;
      fake.on((_q, res) => {
        if (n++ === 0) return registryErrorBody(res, 429, 'TOOMANYREQUESTS', 'slow down', { 'retry-after': '0' });
        serveManifest(res);
      });
      await client.getManifest(`${fake.host}/r/x:t`);
      assert.equal(fake.seen.length, 2);
    } finally {
      client.close();
    }
  });

  test('404 and other 4xx are not retried; a bodiless 404 gets the operation code', async () => {
    fake.on((req, res) => {
      if (req.method === 'HEAD' || req.url?.includes('/bare/')) return void res.writeHead(404).end();
      if (req.url?.includes('/manifests/')) return registryErrorBody(res, 404, 'MANIFEST_UNKNOWN', 'manifest unknown');
      registryErrorBody(res, 400, 'DIGEST_INVALID', 'bad');
    });
    const client = fastClient(fake);
    try {
      const m = await registryError(client.getManifest(`${fake.host}/r/x:t`));
      assert.equal(m.code, 'MANIFEST_UNKNOWN');
      assert.equal(fake.seen.length, 1);
      const b = await registryError(client.getBlob(`${fake.host}/bare/x`, BLOB_DIGEST));
      assert.equal(b.code, 'BLOB_UNKNOWN');
      assert.equal(fake.seen.length, 2);
      assert.equal(await client.blobExists(`${fake.host}/r/x`, BLOB_DIGEST), false);
      const bad = await registryError(client.getBlob(`${fake.host}/r/x`, BLOB_DIGEST));
      assert.equal(bad.code, 'DIGEST_INVALID');
      assert.equal(bad.kind, 'InvalidArgument');
      assert.equal(fake.seen.length, 4);
    } finally {
      client.close();
    }
  });

  test('a dropped connection is retried; a silent server times out', async () => {
    let n = 0;
    fake.on((req, res) => {
      if (n++ === 0) return void req.socket.destroy();
      serveManifest(res);
    });
    const client = fastClient(fake, { timeoutMs: 300, retries: 1 });
    try {
      assert.equal((await client.getManifest(`${fake.host}/r/x:t`)).digest, MANIFEST_DIGEST);
      assert.equal(fake.seen.length, 2);

      fake.on(() => undefined); // never answers
      const t0 = Date.now();
      const e = await registryError(client.getManifest(`${fake.host}/r/x:t`));
      assert.equal(e.code, 'TIMEOUT');
      assert.equal(e.kind, 'Unavailable');
      assert.equal(fake.seen.length, 2, 'one attempt and one retry');
      assert.ok(Date.now() - t0 >= 600);
      assert.match(e.message, /timed out: no data for 300 ms \(after 2 attempts\)/);
    } finally {
      client.close();
    }
  });

  test('a body that stalls after the headers times out, buffered or streamed', async () => {
    fake.on((_q, res) => {
      res.writeHead(200, { 'content-length': String(BLOB.length) });
      res.write(BLOB.subarray(0, 1000));
    });
    const client = fastClient(fake, { timeoutMs: 200, retries: 1 });
    try {
      const e = await registryError(client.getBlob(`${fake.host}/r/x`, BLOB_DIGEST));
      assert.equal(e.code, 'TIMEOUT');
      assert.equal(fake.seen.length, 2, 'a body cut short is retried like a failed request');
      const s = await client.getBlobStream(`${fake.host}/r/x`, BLOB_DIGEST);
      await assert.rejects(collect(s.stream), (err: unknown) => err instanceof RegistryError && err.code === 'TIMEOUT' && /GET blob sha256:/.test(err.message));
    } finally {
      client.close();
    }
  });

  test('concurrent requests share one token fetch', async () => {
    fake.on(bearerRegistry());
    const client = fastClient(fake, { credentials: () => ({ username: USER, password: PASSWORD }) });
    try {
      const all = await Promise.all(Array.from({ length: 5 }, () => client.getManifest(`${fake.host}/r/x:t`)));
      assert.ok(all.every((m) => m.digest === MANIFEST_DIGEST));
      assert.equal(fake.requests('/token').length, 1);
    } finally {
      client.close();
    }
  });

  test('a connection refused is retried, then reported', async () => {
    const port = await freePort();
    const client = new RegistryClient({ plainHttpHosts: [`127.0.0.1:${port}`], retries: 2, backoffMs: 5 });
    try {
      const e = await registryError(client.getManifest(`127.0.0.1:${port}/r/x:t`));
      assert.equal(e.code, 'NETWORK');
      assert.match(e.message, /ECONNREFUSED.*\(after 3 attempts\)/);
    } finally {
      client.close();
    }
  });

  test('one keep-alive connection serves many requests, including errors and ranges', async () => {
    fake.on((req, res) => {
      if (req.url?.includes('/manifests/')) return serveManifest(res);
      if (req.url?.includes('/missing/')) return registryErrorBody(res, 404, 'BLOB_UNKNOWN', 'no');
      serveBlob(req, res);
    });
    const before = fake.connections;
    const client = fastClient(fake);
    try {
      await client.getManifest(`${fake.host}/r/x:t`);
      assert.ok(await client.blobExists(`${fake.host}/r/x`, BLOB_DIGEST));
      await client.getBlob(`${fake.host}/r/x`, BLOB_DIGEST);
      await registryError(client.getBlob(`${fake.host}/missing/x`, BLOB_DIGEST));
      assert.deepEqual(await client.getBlobRange(`${fake.host}/r/x`, BLOB_DIGEST, 1000, 5000), BLOB.subarray(1000, 6000));
      await collect((await client.getBlobStream(`${fake.host}/r/x`, BLOB_DIGEST)).stream);
      await client.getManifest(`${fake.host}/r/x:t`);
      assert.equal(fake.seen.length, 7);
      assert.equal(fake.connections - before, 1, 'all requests on one socket');
    } finally {
      client.close();
    }
  });

  test('lying digests: Docker-Content-Digest and by-digest manifests are checked', async () => {
    const other = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_MANIFEST, layers: [] }));
    fake.on((req, res) => {
      if (req.url?.endsWith('/manifests/lying-header')) return serveManifest(res, MANIFEST, { 'docker-content-digest': digestOf(other) });
      if (req.url?.includes('/manifests/sha256:')) return serveManifest(res, other);
      res.writeHead(404).end();
    });
    const client = fastClient(fake);
    try {
      const e1 = await registryError(client.getManifest(`${fake.host}/r/x:lying-header`));
      assert.equal(e1.code, 'DIGEST_MISMATCH');
      assert.match(e1.message, /announced by the registry/);
      const e2 = await registryError(client.getManifest(`${fake.host}/r/x@${MANIFEST_DIGEST}`));
      assert.equal(e2.code, 'DIGEST_MISMATCH');
      assert.match(e2.message, new RegExp(`content hashes to ${digestOf(other)}, not ${MANIFEST_DIGEST} \\(asked for\\)`));
    } finally {
      client.close();
    }
  });

  test('Range ignored by the registry (200): the slice is cut from the verified whole blob', async () => {
    const corrupt = Buffer.from(BLOB);
    corrupt[10] ^= 1;
    fake.on((req, res) => {
      const data = req.url?.includes('/corrupt/') ? corrupt : BLOB;
      res.writeHead(200, { 'content-length': String(data.length) });
      res.end(data);
    });
    const client = fastClient(fake);
    try {
      assert.deepEqual(await client.getBlobRange(`${fake.host}/r/x`, BLOB_DIGEST, 150_000, 40_000), BLOB.subarray(150_000, 190_000));
      assert.match(String(fake.seen[0].headers.range), /^bytes=150000-189999$/);
      const e = await registryError(client.getBlobRange(`${fake.host}/corrupt/x`, BLOB_DIGEST, 0, 100));
      assert.equal(e.code, 'DIGEST_MISMATCH');
      const past = await registryError(client.getBlobRange(`${fake.host}/r/x`, BLOB_DIGEST, BLOB.length - 1, 2));
      assert.equal(past.code, 'SIZE_MISMATCH');
    } finally {
      client.close();
    }
  });

  test('a 206 for another range than asked for is refused', async () => {
    fake.on((_q, res) => {
      res.writeHead(206, { 'content-length': '10', 'content-range': `bytes 0-9/${BLOB.length}` });
      res.end(BLOB.subarray(0, 10));
    });
    const client = fastClient(fake);
    try {
      const e = await registryError(client.getBlobRange(`${fake.host}/r/x`, BLOB_DIGEST, 100, 10));
      assert.equal(e.code, 'SIZE_MISMATCH');
      assert.match(e.message, /asked for bytes 100-109, the registry sent 0-9/);
    } finally {
      client.close();
    }
  });

  test('a redirect to a blob store is followed without the registry credentials', async () => {
    const store = await FakeRegistry.start((req, res) => serveBlob(req, res));
    fake.on((req, res) => {
      if (req.headers.authorization !== BASIC) return registryErrorBody(res, 401, 'UNAUTHORIZED', 'x', { 'www-authenticate': 'Basic realm="fake"' });
      res.writeHead(307, { location: `http://${store.host}/store/blob?sig=abc` }).end();
    });
    const client = fastClient(fake, { plainHttpHosts: [fake.host, store.host], credentials: () => ({ username: USER, password: PASSWORD }) });
    try {
      assert.deepEqual(await client.getBlob(`${fake.host}/r/x`, BLOB_DIGEST), BLOB);
      assert.equal(store.seen.length, 1);
      assert.equal(store.seen[0].headers.authorization, undefined);
      assert.equal(store.seen[0].url, '/store/blob?sig=abc');
    } finally {
      client.close();
      await store.close();
    }
  });

  test('push to a registry behind Bearer auth asks for pull,push and follows the upload Location', async () => {
    const uploaded: Buffer[] = [];
    fake.on((req, res, seen) => {
      if (seen.url.startsWith('/token')) return json(res, 200, { token: TOKEN });
      if (req.headers.authorization !== `Bearer ${TOKEN}`) {
        return registryErrorBody(res, 401, 'UNAUTHORIZED', 'x', { 'www-authenticate': `Bearer realm="http://${fake.host}/token",service="svc"` });
      }
      if (req.method === 'HEAD') return void res.writeHead(404).end();
      if (req.method === 'POST') return void res.writeHead(202, { location: '/upload/123?_state=opaque' }).end();
      if (req.method === 'PUT' && seen.url.startsWith('/upload/123')) {
        uploaded.push(seen.body);
        return void res.writeHead(201, { 'docker-content-digest': BLOB_DIGEST }).end();
      }
      res.writeHead(400).end();
    });
    const client = fastClient(fake);
    try {
      assert.equal(await client.pushBlob(`${fake.host}/p/x`, BLOB_DIGEST, BLOB), 'uploaded');
      assert.deepEqual(uploaded, [BLOB]);
      const put = fake.seen.find((s) => s.method === 'PUT');
      assert.ok(put);
      const q = new URL(put.url, 'http://x').searchParams;
      assert.equal(q.get('digest'), BLOB_DIGEST);
      assert.equal(q.get('_state'), 'opaque');
      const scopes = fake.requests('/token').map((t) => new URL(t.url, 'http://x').searchParams.getAll('scope').join(' '));
      assert.deepEqual(scopes, ['repository:p/x:pull', 'repository:p/x:pull,push']);
    } finally {
      client.close();
    }
  });

  test('a failed upload PUT restarts the upload (POST then PUT), not the PUT alone', async () => {
    let puts = 0;
    fake.on((req, res, seen) => {
      if (req.method === 'HEAD') return void res.writeHead(404).end();
      if (req.method === 'POST') return void res.writeHead(202, { location: `/upload/${fake.seen.length}` }).end();
      if (req.method === 'PUT' && puts++ === 0) return registryErrorBody(res, 502, 'UNAVAILABLE', 'proxy hiccup');
      assert.equal(seen.body.length, BLOB.length);
      res.writeHead(201).end();
    });
    const client = fastClient(fake);
    try {
      assert.equal(await client.pushBlob(`${fake.host}/p/x`, BLOB_DIGEST, BLOB), 'uploaded');
      assert.deepEqual(
        fake.seen.map((s) => `${s.method} ${s.url.split('?')[0]}`),
        ['HEAD /v2/p/x/blobs/' + BLOB_DIGEST, 'POST /v2/p/x/blobs/uploads/', 'PUT /upload/2', 'POST /v2/p/x/blobs/uploads/', 'PUT /upload/4'],
      );
    } finally {
      client.close();
    }
  });

  test('HTTPS to a plain-HTTP server: a TLS error, no HTTP request reaches it, no retry', async () => {
    fake.on((_q, res) => serveManifest(res));
    const client = new RegistryClient({ retries: 3, backoffMs: 5 });
    const before = fake.connections;
    try {
      const e = await registryError(client.getManifest(`${fake.host}/r/x:t`));
      assert.equal(e.code, 'TLS');
      assert.match(e.message, /add it to registry\.plain_http_hosts \(the daemon's config; dedup-snapshotter pull: --plain-http\)/);
      assert.equal(fake.seen.length, 0);
      assert.equal(fake.connections - before, 1);
    } finally {
      client.close();
    }
  });

  test('bad arguments fail before any request', async () => {
    fake.on((_q, res) => serveManifest(res));
    const client = fastClient(fake);
    try {
      const e = await registryError(client.getBlob(`${fake.host}/r/x`, 'sha256:nothex'));
      assert.equal(e.code, 'DIGEST_INVALID');
      assert.equal(e.kind, 'InvalidArgument');
      await assert.rejects(client.getManifest('UPPER/Case:t'), InvalidReferenceError);
      await assert.rejects(client.getBlobRange(`${fake.host}/r/x`, BLOB_DIGEST, -1, 5), /offset must be a non-negative integer/);
      assert.equal(fake.seen.length, 0);
      assert.throws(() => new RegistryClient({ retries: -1 }), /retries must be an integer from 0 to 20/);
    } finally {
      client.close();
    }
  });

  test('digests of random content round-trip through a stream without buffering it all', async () => {
    const data = crypto.randomBytes(1 << 20);
    const digest = digestOf(data);
    fake.on((req, res) => serveBlob(req, res, data));
    const client = fastClient(fake);
    try {
      const s = await client.getBlobStream(`${fake.host}/r/x`, digest);
      assert.throws(() => s.verify(), /before the stream was read to its end/);
      assert.deepEqual(await collect(s.stream), data);
      s.verify();
    } finally {
      client.close();
    }
  });
});
