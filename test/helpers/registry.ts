/**
 * A real docker-registry on 127.0.0.1 for tests (filesystem storage in a temp
 * dir, deletes enabled), and where it keeps a blob's bytes on disk.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { SLOW, freePort, tempDir, waitFor } from './daemon';

export interface RealRegistry {
  host: string;
  dataDir: string;
  dir: string;
  stop(): Promise<void>;
}

const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const p of children) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});

export async function startRegistry(): Promise<RealRegistry> {
  const dir = tempDir('registry');
  const dataDir = path.join(dir, 'data');
  const host = `127.0.0.1:${await freePort()}`;
  const cfg = path.join(dir, 'registry.yml');
  writeRegistryConfig(cfg, dataDir, host);
  let output = '';
  const p = spawn('docker-registry', ['serve', cfg], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(p);
  p.stdout?.on('data', (d: Buffer) => (output += d.toString()));
  p.stderr?.on('data', (d: Buffer) => (output += d.toString()));
  const exited = new Promise<void>((resolve) => p.once('exit', () => resolve()));
  const stop = async () => {
    if (p.exitCode === null && p.signalCode === null) {
      p.kill('SIGTERM');
      const timer = setTimeout(() => p.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    children.delete(p);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitRegistryReady(host, p, () => output);
  } catch (err) {
    await stop();
    throw err;
  }
  return { host, dataDir, dir, stop };
}

/** docker-registry's config: filesystem storage in `dataDir` (deletes on), quiet logs, listening on `host`. */
export function writeRegistryConfig(file: string, dataDir: string, host: string): void {
  fs.writeFileSync(
    file,
    [
      'version: 0.1',
      'log:',
      '  level: warn',
      '  accesslog:',
      '    disabled: true',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${dataDir}`,
      '  delete:',
      '    enabled: true',
      '  maintenance:',
      '    uploadpurging:',
      '      enabled: false',
      'http:',
      `  addr: ${host}`,
      '',
    ].join('\n'),
  );
}

/** Waits until the registry `p` serves /v2/ on `host`; throws with its output if it exits first. */
export function waitRegistryReady(host: string, p: ChildProcess, output: () => string): Promise<void> {
  return waitFor(
    async () => {
      if (p.exitCode !== null) throw new Error(`docker-registry exited (${p.exitCode}):\n${output()}`);
      try {
        return (await fetch(`http://${host}/v2/`)).status === 200;
      } catch {
        return false;
      }
    },
    20_000 * SLOW,
    'docker-registry to answer /v2/',
  );
}

/** Where docker-registry's filesystem driver keeps a blob's bytes. */
export function registryBlobPath(dataDir: string, digest: string): string {
  const hex = digest.slice('sha256:'.length);
  return path.join(dataDir, 'docker', 'registry', 'v2', 'blobs', 'sha256', hex.slice(0, 2), hex, 'data');
}


/**
 * What a RegistryProxy does with chunk requests (those with a Range
 * header; everything else passes): "pass" forwards, "hold" keeps them
 * waiting until release(), "fail" answers 503, "corrupt" forwards with the
 * first byte of the body changed.
 */
export type ProxyMode = 'pass' | 'hold' | 'fail' | 'corrupt';

export interface RegistryProxy {
  host: string;
  mode: ProxyMode;
  /** Range requests received so far, and how many are held now. */
  ranges: number;
  /** Requests `intercept` answered with a status, and with other bytes. */
  refused: number;
  substituted: number;
  held(): number;
  /** Forwards the held requests (mode unchanged). */
  release(): void;
  stop(): Promise<void>;
}

/**
 * An HTTP proxy in front of `upstream` ("host:port") that can hold, fail or
 * corrupt chunk fetches; `intercept` answers any request it returns a
 * status for (e.g. 403 to the daemon's layer downloads) with that status,
 * and any it returns bytes for with those bytes (200).
 */
export async function startRegistryProxy(upstream: string, mode: ProxyMode = 'pass', intercept?: (req: http.IncomingMessage) => number | Buffer | null): Promise<RegistryProxy> {
  const [uhost, uport] = upstream.split(':');
  const waiting: (() => void)[] = [];
  const forward = (req: http.IncomingMessage, res: http.ServerResponse, corrupt: boolean) => {
    const up = http.request({ host: uhost, port: Number(uport), method: req.method, path: req.url, headers: req.headers }, (ur) => {
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      let first = corrupt;
      ur.on('data', (c: Buffer) => {
        if (first && c.length > 0) {
          c = Buffer.from(c);
          c[0] ^= 0xff;
          first = false;
        }
        res.write(c);
      });
      ur.on('end', () => res.end());
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  };
  const server = http.createServer((req, res) => {
    const answer = intercept?.(req) ?? null;
    if (Buffer.isBuffer(answer)) {
      proxy.substituted++;
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': answer.length }).end(answer);
      return;
    }
    if (answer !== null) {
      proxy.refused++;
      res.writeHead(answer, { 'content-type': 'application/json' }).end(JSON.stringify({ errors: [{ code: 'DENIED', message: 'proxy: refused for the test' }] }));
      return;
    }
    if (!req.headers.range) return forward(req, res, false);
    proxy.ranges++;
    if (proxy.mode === 'hold') waiting.push(() => forward(req, res, false));
    else if (proxy.mode === 'fail') res.writeHead(503).end('proxy: failing chunk requests');
    else forward(req, res, proxy.mode === 'corrupt');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const proxy: RegistryProxy = {
    host: `127.0.0.1:${(server.address() as { port: number }).port}`,
    mode,
    ranges: 0,
    refused: 0,
    substituted: 0,
    held: () => waiting.length,
    release: () => {
      for (const f of waiting.splice(0)) f();
    },
    stop: async () => {
      proxy.release();
      server.closeAllConnections?.();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
  return proxy;
}
