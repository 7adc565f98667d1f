import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import { snapshotsService } from '../../src/containerd/proto';
import { mountPoints } from '../../src/mount/mountinfo';
import { processRunning } from '../../src/util/proc';
import { unmountUnder } from './mounts';

/** Repository root (from dist/test/helpers or test/helpers). */
/** Extra node options for the daemon (a profile: DEDUP_TEST_DAEMON_NODE_ARGS="--cpu-prof --cpu-prof-dir=DIR"; NODE_OPTIONS refuses those). */
const NODE_ARGS = (process.env.DEDUP_TEST_DAEMON_NODE_ARGS ?? '').split(' ').filter((a) => a.length > 0);

export const REPO_ROOT = (() => {
  let d = __dirname;
  while (!fs.existsSync(path.join(d, 'package.json'))) {
    if (path.dirname(d) === d) throw new Error(`no package.json above ${__dirname}: run the tests from the repository's dist/`);
    d = path.dirname(d);
  }
  return d;
})();

export const DAEMON_BIN = path.join(REPO_ROOT, 'bin', 'dedup-snapshotter');

const temps = new Set<string>();

/**
 * A fresh directory under the system temp dir. Whatever the test leaves is
 * deleted when the process exits, except a directory with anything mounted
 * under it (deleting through a mount could reach what it shows).
 */
/**
 * How much slower than this machine the tests run (DEDUP_TEST_SLOW, e.g.
 * 15 inside the emulated ondemand VM): start-up waits are multiplied by it.
 */
export const SLOW = Number(process.env.DEDUP_TEST_SLOW) || 1;

export function tempDir(prefix: string): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `dedup-${prefix}-`));
  temps.add(d);
  return d;
}

process.on('exit', () => {
  let targets: string[] = [];
  try {
    targets = mountPoints();
  } catch {
    return;
  }
  for (const d of temps) {
    if (targets.some((t) => t === d || t.startsWith(`${d}/`))) continue;
    try {
      fs.rmSync(d, { recursive: true, force: true });
    } catch {
      // best effort
    }
  }
});

/**
 * Scratch directories for one test file: each is unmounted (everything
 * mounted under it) and deleted after the file's tests. Call at the top
 * level of a test file.
 */
export function scratchDirs(): (name: string) => string {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) {
      await unmountUnder(d);
      fs.rmSync(d, { recursive: true, force: true });
    }
  });
  return (name) => {
    const d = tempDir(name);
    dirs.push(d);
    return d;
  };
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

/** Directories of every daemon started, for cleanupDaemons(). */
const started = new Set<string>();
const processes = new Set<DaemonProcess>();

/**
 * Kills daemons still running, then detaches the EROFS layer mounts they
 * leave on purpose (a daemon keeps them across restarts) and deletes their
 * directories. For test files' after() hooks.
 */
export async function cleanupDaemons(): Promise<void> {
  for (const d of processes) await d.kill();
  processes.clear();
  for (const root of roots) stopHolder(root);
  roots.clear();
  for (const dir of started) {
    await unmountUnder(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  started.clear();
}

const roots = new Set<string>();

/**
 * Stops the on-demand holder a daemon started for `root` (it outlives
 * daemons on purpose; it also exits by itself once its socket is deleted).
 * Returns its pid, or null when there was none.
 */
export function stopHolder(root: string, signal: NodeJS.Signals = 'SIGTERM'): number | null {
  let pid: number;
  try {
    pid = Number(fs.readFileSync(path.join(root, 'ondemand', 'holder.pid'), 'utf8'));
  } catch {
    return null;
  }
  try {
    process.kill(pid, signal);
    return pid;
  } catch {
    return null;
  }
}

export interface DaemonProcess {
  proc: ChildProcess;
  root: string;
  address: string;
  /** The HTTP API: a unix socket path or "host:port". */
  apiAddress: string;
  /** Everything the daemon printed so far (stdout + stderr). */
  output(): string;
  /** Parsed JSON log lines. */
  logs(): Record<string, unknown>[];
  /** SIGTERM and wait; resolves with the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait. */
  kill(): Promise<void>;
  exited: Promise<number | null>;
}

/**
 * Spawns bin/dedup-snapshotter with ROOT and ADDRESS in `dir` and waits until
 * it serves. Extra env (CONFIG, LOG_LEVEL, ...) can be given.
 */
export async function startDaemon(
  opts: {
    dir?: string;
    root?: string;
    address?: string;
    env?: Record<string, string>;
    waitReady?: boolean;
    /** Written to a config file passed as CONFIG (unless env sets CONFIG). */
    convertMode?: 'background' | 'sync';
    /** More config keys for that file. */
    config?: Record<string, unknown>;
    /** The HTTP API's address; default a unix socket in `dir` (tests run several daemons at once). */
    apiAddress?: string;
    /**
     * Fds passed as systemd passes its fd store back (sd_listen_fds): at
     * 3, 4, ... in the daemon, with LISTEN_FDS, LISTEN_FDNAMES and
     * LISTEN_PID (the daemon's own pid: set by a shell that then execs it).
     */
    listenFds?: { fd: number; name: string }[];
  } = {},
): Promise<DaemonProcess> {
  const dir = opts.dir ?? tempDir('daemon');
  started.add(dir);
  const apiAddress = opts.apiAddress ?? path.join(dir, 'api.sock');
  const config = path.join(dir, `config-${opts.convertMode ?? 'default'}.json`);
  fs.writeFileSync(
    config,
    JSON.stringify({ ...(opts.convertMode ? { convert_mode: opts.convertMode } : {}), ...opts.config, api: { address: apiAddress, ...(opts.config?.api as object) } }),
  );
  const root = opts.root ?? path.join(dir, 'root');
  roots.add(root);
  const address = opts.address ?? path.join(dir, 'dedup.sock');
  let out = '';
  // DEDUP_KSM_FLAG: the flag for bin/dedup-runc stays in the test's dir, never the host's /run/dedup-snapshotter.
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    ROOT: root,
    ADDRESS: address,
    CONFIG: config,
    LOG_LEVEL: 'debug',
    DEDUP_KSM_FLAG: path.join(dir, 'ksm-containers'),
    ...opts.env,
  };
  const passed = opts.listenFds ?? [];
  if (passed.length > 0) Object.assign(env, { LISTEN_FDS: String(passed.length), LISTEN_FDNAMES: passed.map((f) => f.name).join(':') });
  // LISTEN_PID must be the daemon's pid, unknown before it starts: the shell sets it to its own, then execs the daemon (same pid).
  const proc =
    passed.length > 0
      ? spawn('/bin/sh', ['-c', 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', 'sh', process.execPath, ...NODE_ARGS, DAEMON_BIN], { env, stdio: ['ignore', 'pipe', 'pipe', ...passed.map((f) => f.fd)] })
      : spawn(process.execPath, [...NODE_ARGS, DAEMON_BIN], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  proc.stdout?.on('data', (d) => (out += d));
  proc.stderr?.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const d: DaemonProcess = {
    proc,
    root,
    address,
    apiAddress,
    output: () => out,
    logs: () =>
      out
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => {
          try {
            return JSON.parse(l) as Record<string, unknown>;
          } catch {
            return {};
          }
        }),
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      return exited;
    },
    kill: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
    exited,
  };
  processes.add(d);
  if (opts.waitReady !== false) {
    let gone = false;
    void exited.then(() => (gone = true));
    await waitFor(
      () => {
        if (gone) throw new Error(`daemon exited before serving:\n${out}`);
        // Ready: gRPC serves and the HTTP API started (or logged why not).
        return out.includes('serving containerd snapshots API') && /HTTP API (on|not serving)/.test(out);
      },
      20_000 * SLOW,
      'daemon to serve',
    );
  }
  return d;
}

export type SnapshotsClient = grpc.Client & Record<string, any>;

export function snapshotsClient(address: string, namespace = 'default'): SnapshotsClient {
  const C = snapshotsService();
  const c = new C(`unix:${address}`, grpc.credentials.createInsecure()) as SnapshotsClient;
  (c as any).__ns = namespace;
  return c;
}

/** Calls a unary RPC; resolves with the response or rejects with the grpc error (code, details). */
export function call<T = any>(client: SnapshotsClient, method: string, req: unknown): Promise<T> {
  const md = new grpc.Metadata();
  md.set('containerd-namespace', (client as any).__ns ?? 'default');
  return new Promise((resolve, reject) => {
    client[method](req, md, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

/** Collects every Info of a List call. */
export function list(client: SnapshotsClient, filters: string[] = []): Promise<any[]> {
  const md = new grpc.Metadata();
  md.set('containerd-namespace', (client as any).__ns ?? 'default');
  return new Promise((resolve, reject) => {
    const infos: any[] = [];
    const s = client.List({ filters }, md);
    s.on('data', (d: { info: any[] }) => infos.push(...d.info));
    s.on('error', reject);
    s.on('end', () => resolve(infos));
  });
}

/**
 * Where the daemon keeps each snapshot, as "snapshots/<name>" (a plain
 * directory: active snapshots, views, unconverted layers) and
 * "images/<name>" (an EROFS layer image), sorted. One entry per snapshot
 * when nothing is half-made or left over.
 */
export function snapshotHomes(root: string): string[] {
  const entries = (sub: string) => {
    try {
      return fs.readdirSync(path.join(root, sub)).map((n) => `${sub}/${n}`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
  };
  return [...entries('snapshots'), ...entries('images')].sort();
}

/** Whether process `pid` exists (signal 0). */
/** Whether `pid` runs (a zombie, exited but not yet reaped, does not). */
export const processAlive = processRunning;
