/**
 * src/remote/hosts.ts and the registry client over it: containerd's host
 * directories (hosts.toml) read as containerd reads them (directory per
 * registry, `_default`, several roots, [host] order, `server` last, `/v2`
 * and override_path, capabilities, headers, relative CA paths, docker's
 * certs.d files), bad files named with their line; then requests through
 * small local servers: a mirror tried first and asked with `ns=`, the
 * registry after a mirror that lacks the blob or fails, the mirror's own
 * headers and credentials, and an HTTPS mirror trusted through its `ca`.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { digestOf } from '../src/remote/digest';
import { HostsConfigError, RegistryHosts } from '../src/remote/hosts';
import { RegistryClient } from '../src/remote/registry';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'dedup-hosts-'));
after(() => fs.rmSync(work, { recursive: true, force: true }));

function hostsDir(root: string, host: string, toml: string | null, files: Record<string, string> = {}): string {
  const dir = path.join(root, host);
  fs.mkdirSync(dir, { recursive: true });
  if (toml !== null) fs.writeFileSync(path.join(dir, 'hosts.toml'), toml);
  for (const [name, text] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), text);
  return dir;
}

test('no host directory: the registry itself over https (Docker Hub at its API host)', () => {
  const hosts = new RegistryHosts([path.join(work, 'none')]);
  const [e] = hosts.endpoints('docker.io');
  assert.equal(e.host, 'registry-1.docker.io');
  assert.equal(e.scheme, 'https');
  assert.equal(e.path, '/v2');
  assert.equal(e.mirror, false);
  assert.deepEqual([...e.capabilities].sort(), ['pull', 'push', 'resolve']);
  assert.equal(hosts.endpoints('quay.io').length, 1);
});

test('hosts.toml: [host] tables in file order, then server; /v2 appended unless override_path; capabilities, headers, relative ca', () => {
  const root = path.join(work, 'order');
  hostsDir(
    root,
    'registry.example:5000',
    `server = "https://registry.example:5000"
ca = "root-ca.pem"

[host."http://mirror-b.local:8080"]
  capabilities = ["pull", "resolve"]
  [host."http://mirror-b.local:8080".header]
    x-mirror = "b"
    x-multi = ["1", "2"]

[host."https://mirror-a.local/prefix"]
  capabilities = ["pull"]
  override_path = false
  ca = ["/nonexistent-is-fine-until-read.pem"]

[host."https://mirror-c.local/custom/api"]
  override_path = true
`,
    { 'root-ca.pem': 'PEM-ROOT\n' },
  );
  const absCa = path.join(work, 'absolute-ca.pem');
  fs.writeFileSync(absCa, 'PEM-A\n');
  const toml = fs.readFileSync(path.join(root, 'registry.example:5000', 'hosts.toml'), 'utf8').replace('/nonexistent-is-fine-until-read.pem', absCa);
  fs.writeFileSync(path.join(root, 'registry.example:5000', 'hosts.toml'), toml);
  {
    const eps = new RegistryHosts([root]).endpoints('registry.example:5000');
    assert.deepEqual(
      eps.map((e) => `${e.scheme}://${e.host}${e.path}`),
      ['http://mirror-b.local:8080/v2', 'https://mirror-a.local/prefix/v2', 'https://mirror-c.local/custom/api', 'https://registry.example:5000/v2'],
    );
    assert.deepEqual(
      eps.map((e) => [...e.capabilities].sort().join(',')),
      ['pull,resolve', 'pull', 'pull,push,resolve', 'pull,push,resolve'],
    );
    assert.deepEqual(eps[0].headers, { 'x-mirror': 'b', 'x-multi': '1, 2' });
    assert.deepEqual(eps.map((e) => e.mirror), [true, true, true, false]);
    assert.equal(eps[1].ca[0].toString(), 'PEM-A\n');
    assert.equal(eps[3].ca[0].toString(), 'PEM-ROOT\n', 'a relative ca is read from the host directory');
  }
});

test('_default and later roots; a directory without hosts.toml gives its certs.d files to the registry itself', () => {
  const a = path.join(work, 'root-a');
  const b = path.join(work, 'root-b');
  hostsDir(b, '_default', '[host."http://catch-all.local:5000"]\n  capabilities = ["pull"]\n');
  hostsDir(a, 'certs.example', null, { 'ca.crt': 'CA-CRT\n', 'client.cert': 'CERT\n', 'client.key': 'KEY\n' });
  hostsDir(a, 'ported.example_5000_', '[host."http://underscore-form.local"]\n');
  let clock = 0;
  const hosts = new RegistryHosts([a, b], { now: () => clock });
  assert.equal(hosts.endpoints('ported.example:5000')[0].host, 'underscore-form.local', "containerd's host_port_ directory name");
  const other = hosts.endpoints('other.example');
  assert.equal(other[0].host, 'catch-all.local:5000', '_default of the second root');
  assert.equal(other[1].host, 'other.example');
  const certs = hosts.endpoints('certs.example');
  assert.equal(certs.length, 1);
  assert.equal(certs[0].ca[0].toString(), 'CA-CRT\n');
  assert.equal(certs[0].client?.cert.toString(), 'CERT\n');
  assert.equal(certs[0].client?.key.toString(), 'KEY\n');
  // A rotated certificate is read again (the directory's names did not change).
  fs.writeFileSync(path.join(a, 'certs.example', 'ca.crt'), 'CA-CRT rotated, longer\n');
  clock += 1000;
  assert.equal(hosts.endpoints('certs.example')[0].ca[0].toString(), 'CA-CRT rotated, longer\n');
});

test('an edited hosts.toml applies to the requests a second later; a bad one is an error naming the file and line', () => {
  const root = path.join(work, 'edit');
  const dir = hostsDir(root, 'edit.example', '[host."http://one.local"]\n');
  let clock = 0;
  const hosts = new RegistryHosts([root], { now: () => clock });
  assert.equal(hosts.endpoints('edit.example')[0].host, 'one.local');
  fs.writeFileSync(path.join(dir, 'hosts.toml'), '# changed\n[host."http://two.local"]\n  capabilities = ["pull"]\n');
  clock += 999;
  assert.equal(hosts.endpoints('edit.example')[0].host, 'one.local', 'within a second: the last answer, no stat');
  clock += 1;
  assert.equal(hosts.endpoints('edit.example')[0].host, 'two.local');
  fs.writeFileSync(path.join(dir, 'hosts.toml'), '[host."http://two.local"]\n  capabilities = ["fly"]\n');
  clock += 1000;
  assert.throws(() => hosts.endpoints('edit.example'), (err: unknown) => err instanceof HostsConfigError && /hosts\.toml:2: host\."http:\/\/two\.local"\.capabilities: expected a list of "pull", "resolve", "push"/.test(err.message));
  fs.writeFileSync(path.join(dir, 'hosts.toml'), 'server = "https://edit.example"\nca = "missing.pem"\n');
  clock += 1000;
  assert.throws(() => hosts.endpoints('edit.example'), (err: unknown) => err instanceof HostsConfigError && /ca .*missing\.pem/.test(err.message));
  hostsDir(work, 'escaped.example', '[host."http://escaped.local"]\n');
  assert.equal(new RegistryHosts([root]).dirFor('../escaped.example'), null, 'a name with a path is never looked up (the directory it names exists)');
  for (const [text, want] of [
    ['[host."https://mirror.local]\n  capabilities = ["pull"]\n', /hosts\.toml:1: cannot read the table name/],
    ['[host."https://mirror.local"]\n  capabilities = ["pull"\n', /hosts\.toml:2: the array is not closed/],
    ['server https://edit.example\n', /hosts\.toml:1: expected a \[table\] or key = value/],
    ['[host."https://mirror.local".header]\n  x-evil = "a\\r\\nInjected: yes"\n', /header\.x-evil: a header value cannot hold line breaks/],
    ['[host."https://mirror.local".header]\n  "bad name" = "v"\n', /not an HTTP header name/],
  ] as const) {
    fs.writeFileSync(path.join(dir, 'hosts.toml'), text);
    assert.throws(() => hosts.endpoints('edit.example'), (err: unknown) => err instanceof HostsConfigError && want.test(err.message), text);
  }
});

interface Seen {
  url: string;
  headers: http.IncomingHttpHeaders;
}

/** A server answering blob GETs for `blobs` (others 404, or `status` when set; 401 without `basic` credentials when set), remembering every request. */
async function blobServer(blobs: Map<string, Buffer>, opts: { status?: number; tls?: { key: Buffer; cert: Buffer }; basic?: string } = {}) {
  const seen: Seen[] = [];
  const handler = (req: http.IncomingMessage, res: http.ServerResponse) => {
    seen.push({ url: req.url ?? '', headers: req.headers });
    if (opts.status) return void res.writeHead(opts.status).end();
    if (opts.basic && req.headers.authorization !== `Basic ${Buffer.from(opts.basic).toString('base64')}`) {
      return void res.writeHead(401, { 'www-authenticate': 'Basic realm="mirror"', 'content-type': 'application/json' }).end('{"errors":[{"code":"UNAUTHORIZED","message":"who are you"}]}');
    }
    const m = /\/blobs\/(sha256:[0-9a-f]{64})/.exec(req.url ?? '');
    const data = m ? blobs.get(m[1]) : undefined;
    if (!data) return void res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}');
    res.writeHead(200, { 'content-length': data.length, 'docker-content-digest': m?.[1] }).end(data);
  };
  const server = opts.tls ? https.createServer({ key: opts.tls.key, cert: opts.tls.cert }, handler) : http.createServer(handler);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as { port: number }).port;
  return {
    host: `127.0.0.1:${port}`,
    port,
    seen,
    stop: async () => {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

test('requests go to the mirror first (with ns=), then the registry when the mirror lacks the blob or fails', async () => {
  const data = Buffer.from('a blob served by both\n');
  const digest = digestOf(data);
  const other = Buffer.from('only the registry has this one\n');
  const otherDigest = digestOf(other);
  const registry = await blobServer(new Map([[digest, data], [otherDigest, other]]));
  const mirror = await blobServer(new Map([[digest, data]]), { basic: 'mirror-user:mirror-pw' });
  const broken = await blobServer(new Map(), { status: 503 });
  const root = path.join(work, 'mirrors');
  const name = 'registry.invalid:5000';
  hostsDir(root, name, `server = "http://${registry.host}"\n\n[host."http://${broken.host}"]\n  capabilities = ["pull"]\n\n[host."http://${mirror.host}"]\n  capabilities = ["pull", "resolve"]\n  [host."http://${mirror.host}".header]\n    x-from = "hosts.toml"\n`);
  const client = new RegistryClient({ hosts: new RegistryHosts([root]), retries: 0, backoffMs: 1, credentials: (h) => (h === mirror.host ? { username: 'mirror-user', password: 'mirror-pw' } : null) });
  try {
    assert.deepEqual(await client.getBlob(`${name}/team/app`, digest), data);
    assert.equal(broken.seen.length, 1, 'the failing host first (file order)');
    assert.equal(mirror.seen.length, 2, 'asked without, then with the credentials configured for the mirror itself');
    assert.equal(mirror.seen[1].headers.authorization, `Basic ${Buffer.from('mirror-user:mirror-pw').toString('base64')}`);
    assert.equal(registry.seen.length, 0, 'the registry was not asked: a mirror had it');
    const url = new URL(mirror.seen[1].url, 'http://x');
    assert.equal(url.pathname, `/v2/team/app/blobs/${digest}`);
    assert.equal(url.searchParams.get('ns'), name, 'a mirror is told the registry (ns=), as containerd does');
    assert.equal(mirror.seen[1].headers['x-from'], 'hosts.toml');

    const s = await client.getBlobStream(`${name}/team/app`, otherDigest);
    const chunks: Buffer[] = [];
    for await (const c of s.stream) chunks.push(c as Buffer);
    s.verify();
    assert.deepEqual(Buffer.concat(chunks), other, 'the registry answered after the mirror said 404');
    assert.equal(registry.seen.length, 1);
    assert.equal(registry.seen[0].headers.authorization, undefined, "the mirror's credentials are not sent to the registry");
    assert.equal(registry.seen[0].headers['x-from'], undefined, "the mirror's headers are not sent to the registry");
    // `server` is another host than the reference's: containerd asks it with ns= too.
    assert.equal(new URL(registry.seen[0].url, 'http://x').searchParams.get('ns'), name);

    const missing = digestOf(Buffer.from('nowhere'));
    const err = await client.getBlob(`${name}/team/app`, missing).then(
      () => assert.fail('a blob no host has'),
      (e: Error) => e,
    );
    assert.match(err.message, /HTTP 503/, 'all failed: the first failure that was not a 404');
    await assert.rejects(client.blobExists(`${name}/team/app`, missing), /HTTP 503/, 'not known to be missing while a host fails');
    const healthy = new RegistryClient({ hosts: new RegistryHosts([root]), retries: 0, credentials: (h) => (h === mirror.host ? { username: 'mirror-user', password: 'mirror-pw' } : null) });
    try {
      fs.writeFileSync(path.join(root, name, 'hosts.toml'), `server = "http://${registry.host}"\n\n[host."http://${mirror.host}"]\n  capabilities = ["pull"]\n`);
      assert.equal(await healthy.blobExists(`${name}/team/app`, missing), false, 'every host says 404: missing');
      assert.equal(await healthy.blobExists(`${name}/team/app`, otherDigest), true);
    } finally {
      healthy.close();
    }
  } finally {
    client.close();
    await Promise.all([registry.stop(), mirror.stop(), broken.stop()]);
  }
});

test('an HTTPS mirror is trusted through the ca its hosts.toml names (and refused without it)', async (t) => {
  const certDir = path.join(work, 'tls');
  fs.mkdirSync(certDir, { recursive: true });
  try {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', path.join(certDir, 'key.pem'), '-out', path.join(certDir, 'cert.pem')], { stdio: 'pipe' });
  } catch (err) {
    t.skip(`SKIP: openssl cannot make a test certificate: ${(err as Error).message}`);
    return;
  }
  const data = Buffer.from('over TLS\n');
  const digest = digestOf(data);
  const tls = { key: fs.readFileSync(path.join(certDir, 'key.pem')), cert: fs.readFileSync(path.join(certDir, 'cert.pem')) };
  const mirror = await blobServer(new Map([[digest, data]]), { tls });
  const root = path.join(work, 'tls-hosts');
  const name = 'tls.invalid';
  const dir = hostsDir(root, name, `[host."https://${mirror.host}"]\n  capabilities = ["pull"]\n  ca = "mirror-ca.pem"\n`, { 'mirror-ca.pem': tls.cert.toString() });
  const client = new RegistryClient({ hosts: new RegistryHosts([root]), retries: 0, timeoutMs: 5000 });
  try {
    assert.deepEqual(await client.getBlob(`${name}/x/y`, digest), data);
    fs.writeFileSync(path.join(dir, 'hosts.toml'), `[host."https://${mirror.host}"]\n  capabilities = ["pull"]\n`);
    const plainClient = new RegistryClient({ hosts: new RegistryHosts([root]), retries: 0, timeoutMs: 5000 });
    try {
      // Without the ca: the mirror's certificate is refused, then the registry itself (tls.invalid) cannot be reached.
      await assert.rejects(plainClient.getBlob(`${name}/x/y`, digest), /TLS|certificate/i);
    } finally {
      plainClient.close();
    }
  } finally {
    client.close();
    await mirror.stop();
  }
});
