/**
 * The real stack for end-to-end tests, started and stopped by the tests:
 * a docker-registry on 127.0.0.1, a private containerd (own root, state,
 * sockets) with the daemon as proxy snapshotter "dedup", and the daemon.
 * Everything lives in one temp dir with short unix socket paths; teardown
 * removes tasks and containers, stops every process (SIGKILL if needed, also
 * after a failed test), unmounts whatever is left under the dir and deletes it.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { readdirOrEmpty } from '../../src/util/fs';
import { type ContainerdBuild, atLeast, defaultContainerd, programOf } from './containerd-builds';
import { type DaemonProcess, SLOW, freePort, list, snapshotsClient, startDaemon, tempDir, waitFor } from './daemon';
import { type BuiltImage, type ImageDef, buildImage, ociArch, pushImage } from './images';
import { mountPoints, mountsUnder, unmountUnder } from './mounts';
import { waitRegistryReady, writeRegistryConfig } from './registry';

export interface CmdResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export class CommandError extends Error {
  constructor(
    readonly cmd: string[],
    readonly result: CmdResult,
  ) {
    super(
      `command failed (exit ${result.code ?? result.signal}): ${cmd.join(' ')}\n--- stdout ---\n${result.stdout.slice(-8000)}\n--- stderr ---\n${result.stderr.slice(-8000)}`,
    );
    this.name = 'CommandError';
  }
}

/** Children spawned here; SIGKILLed if the test process exits without teardown. */
const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const p of live) {
    if (p.pid !== undefined && p.exitCode === null && p.signalCode === null) {
      try {
        process.kill(p.pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
  }
});

/** Runs a command; resolves with its outcome (never rejects on a non-zero exit). */
export function runCmd(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; input?: string } = {}): Promise<CmdResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] });
    live.add(p);
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      stderr += `\n[killed after ${opts.timeoutMs} ms]`;
      if (p.pid !== undefined) process.kill(p.pid, 'SIGKILL');
    }, opts.timeoutMs ?? 180_000);
    p.on('error', (err) => {
      clearTimeout(timer);
      live.delete(p);
      reject(err);
    });
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      live.delete(p);
      resolve({ code, signal, stdout, stderr });
    });
    // A command that exits without reading its input must not crash the test
    // process with EPIPE; its exit code says what happened.
    p.stdin.on('error', () => undefined);
    p.stdin.end(opts.input ?? '');
  });
}

/** Runs a command and throws a CommandError (with its output) unless it exits 0. */
export async function mustRun(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<CmdResult> {
  const r = await runCmd(cmd, args, opts);
  if (r.code !== 0) throw new CommandError([cmd, ...args], r);
  return r;
}

export { freePort };

/**
 * Spawns a long-running child that is SIGKILLed if the test process exits
 * without teardown; its stdout and stderr go to onOutput.
 */
function spawnTracked(cmd: string, args: string[], onOutput: (data: string) => void, env: NodeJS.ProcessEnv = process.env): ChildProcess {
  const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  live.add(p);
  p.once('exit', () => live.delete(p));
  p.stdout?.on('data', (d: Buffer) => onOutput(d.toString()));
  p.stderr?.on('data', (d: Buffer) => onOutput(d.toString()));
  return p;
}

async function stopProcess(p: ChildProcess, graceMs: number): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null || p.pid === undefined) return;
  const exited = new Promise<void>((resolve) => p.once('exit', () => resolve()));
  p.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const timedOut = await Promise.race([exited.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), graceMs)))]);
  clearTimeout(timer);
  if (timedOut) {
    p.kill('SIGKILL');
    await exited;
  }
}

export { readdirOrEmpty };

/**
 * Waits until containerd reaches a restarted daemon: its proxy client redials
 * with backoff, and `ctr snapshots ls` is answered from containerd's own
 * metadata, so this probes with a Prepare (removed again at once).
 */
export async function waitReconnected(stack: Stack): Promise<void> {
  let probes = 0;
  await waitFor(
    async () => {
      const key = `reconnect-probe-${probes++}`;
      const r = await stack.ctrTry(['snapshots', '--snapshotter', 'dedup', 'prepare', key]);
      if (r.code === 0) await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'rm', key]);
      return r.code === 0;
    },
    30_000,
    'containerd to reach the restarted daemon',
  );
}

/**
 * How dedup gets a plain image's layer on the containerd tests run on: on
 * 2.x, whose transfer service passes the image's labels to Prepare (the
 * plugin's export), the daemon fetches each layer from the registry and
 * converts it in one pass ("fetch", registry.fetch_layers, the default);
 * with that off, dedup-differ applies each layer from containerd's content
 * store ("differ"). On 1.7, ctr's pull passes no image labels and unpacks
 * in the client through the diff service: with dedup-differ first in the
 * diff service's list it applies each layer ("differ"); with containerd's
 * default list (and on 1.6, which has no proxy differs) the walking differ
 * unpacks into a directory, converted afterwards ("directory").
 */
export type LayerPath = 'fetch' | 'differ' | 'directory';

/** The layer paths `ctr image pull` can take on the default containerd. */
export function layerPaths(): LayerPath[] {
  const b = defaultContainerd();
  if (b.major >= 2) return ['fetch', 'differ'];
  return atLeast(b, 1, 7) ? ['differ', 'directory'] : ['directory'];
}

/** The Stack options that make ctr's pulls take `via`. */
export function layerPathOptions(via: LayerPath): StackOptions {
  if (via !== 'differ') return {};
  return defaultContainerd().major >= 2 ? { daemonConfig: { registry: { fetch_layers: false } } } : { diffServiceDefault: ['dedup-differ', 'walking'] };
}

export interface StackOptions {
  /** Enable containerd's CRI plugin (disabled by default). */
  cri?: boolean;
  /**
   * How CRI pulls on containerd 2.x (`cri` only): 'local' (default), the
   * client-side pull 1.x does, which `disable_snapshot_annotations = false`
   * selects; 'transfer', through the transfer service (2.1's default), which
   * passes the snapshot labels because the proxy plugin exports
   * enable_remote_snapshot_annotations. containerd 1.x has only 'local'.
   */
  criPull?: 'local' | 'transfer';
  /**
   * containerd 2.x: unpack dedup's layers through the daemon's proxy differ
   * (`differ = "dedup-differ"` in the transfer service's unpack_config);
   * default true. false: containerd's walking differ unpacks into the
   * snapshot's directory, as 1.x does.
   */
  dedupDiffer?: boolean;
  /** The diff service's differs, in the order it asks them (e.g. ["dedup-differ", "walking"]; dedup-differ needs containerd 1.7 or later); containerd's default when left out. */
  diffServiceDefault?: string[];
  /**
   * containerd 2.x: also unpack for containerd's own EROFS snapshotter with
   * its EROFS differ (the bench compares with it; it needs mkfs.erofs ≥ 1.7
   * in containerd's PATH: containerdEnv).
   */
  erofsSnapshotter?: boolean;
  /** Extra environment for the daemon. */
  daemonEnv?: Record<string, string>;
  /** containerd's log level (default "info"; "debug" logs each snapshot call and, from the walking differ, `diff applied` with the time each layer took). */
  containerdLogLevel?: 'info' | 'debug';
  /** Extra environment for containerd (and so its shims and runc). */
  containerdEnv?: Record<string, string>;
  /** Which containerd (default: DEDUP_CONTAINERD's, else the system's; see containerd-builds.ts). */
  containerd?: ContainerdBuild;
  /** Extra keys for the daemon's config file (the stack's registry is always a plain-HTTP host; `registry` keys are merged). */
  daemonConfig?: Record<string, unknown>;
  /** `host:port` of another stack's registry to use instead of starting one (a second node). */
  registry?: string;
  /**
   * A registry name that resolves nowhere, served by the stack's registry as
   * its mirror: a hosts.toml for containerd 2.x and the daemon, CRI's
   * mirrors table on 1.x. Images pulled as `<alias>/…` reach the registry
   * only through the host directories.
   */
  registryAlias?: string;
  /** The daemon's ROOT (default: `root` in the stack's dir), e.g. on a small filesystem the test made; mounts under it are the test's to undo. */
  daemonRoot?: string;
}

export interface CtrOptions {
  ns?: string;
  timeoutMs?: number;
}

export class Stack {
  readonly dir: string;
  readonly registryPort: number;
  /** `127.0.0.1:<port>` */
  readonly registry: string;
  readonly containerdAddress: string;
  readonly containerdRoot: string;
  readonly containerdState: string;
  readonly daemonRoot: string;
  readonly daemonAddress: string;
  daemon!: DaemonProcess;
  /** The containerd this stack runs. */
  readonly build: ContainerdBuild;
  private registryProc: ChildProcess | null = null;
  private containerdProc: ChildProcess | null = null;
  private registryOut = '';
  private containerdOut = '';
  private stopped = false;

  private constructor(
    dir: string,
    port: number,
    private readonly opts: StackOptions,
  ) {
    this.dir = dir;
    this.registryPort = port;
    this.registry = `127.0.0.1:${port}`;
    this.containerdAddress = path.join(dir, 'ctrd.sock');
    this.containerdRoot = path.join(dir, 'c', 'root');
    this.containerdState = path.join(dir, 'c', 'state');
    this.daemonRoot = opts.daemonRoot ?? path.join(dir, 'root');
    this.daemonAddress = path.join(dir, 'dedup.sock');
    this.build = opts.containerd ?? defaultContainerd();
    if (opts.criPull === 'transfer' && !atLeast(this.build, 2, 1)) throw new Error(`containerd ${this.build.version}: CRI has no transfer-service pull before 2.1`);
    for (const sock of [`${this.containerdAddress}.ttrpc`, this.daemonAddress]) {
      if (Buffer.byteLength(sock) >= 100) throw new Error(`unix socket path too long (${Buffer.byteLength(sock)} bytes): ${sock}`);
    }
  }

  /** Starts registry, daemon and containerd; on any failure stops what was started. */
  static async start(opts: StackOptions = {}): Promise<Stack> {
    const s = new Stack(tempDir('e2e'), opts.registry ? Number(opts.registry.split(':').pop()) : await freePort(), opts);
    try {
      if (!opts.registry) await s.startRegistry();
      await s.startDedup();
      await s.startContainerd();
    } catch (err) {
      await s.stop().catch(() => undefined);
      throw err;
    }
    return s;
  }

  private async startRegistry(): Promise<void> {
    const cfg = path.join(this.dir, 'registry.yml');
    writeRegistryConfig(cfg, path.join(this.dir, 'registry-data'), this.registry);
    const p = spawnTracked('docker-registry', ['serve', cfg], (d) => (this.registryOut += d));
    this.registryProc = p;
    await waitRegistryReady(this.registry, p, () => this.registryOut);
  }

  private async startDedup(): Promise<void> {
    this.daemon = await startDaemon({
      dir: this.dir,
      root: this.daemonRoot,
      address: this.daemonAddress,
      // containerd's socket, for POST /prefetch naming an image.
      env: { LOG_LEVEL: 'debug', CONTAINERD_ADDRESS: this.containerdAddress, CONTAINERD_ROOT: this.containerdRoot, ...this.opts.daemonEnv },
      config: {
        ...this.opts.daemonConfig,
        // The stack's own host directories only (never the machine's /etc/containerd/certs.d).
        registry: { plain_http_hosts: [this.registry], config_path: this.writeHostsDir(), ...(this.opts.daemonConfig?.registry as object | undefined) },
      },
    });
    const p = this.daemon.proc;
    live.add(p);
    void this.daemon.exited.then(() => live.delete(p));
  }

  /** Starts the daemon again on the same ROOT and socket (after kill/stop). */
  async restartDaemon(): Promise<DaemonProcess> {
    if (this.daemon.proc.exitCode === null && this.daemon.proc.signalCode === null) throw new Error('daemon still running');
    await this.startDedup();
    return this.daemon;
  }

  private containerdConfig(): string {
    return this.build.major >= 2 ? this.containerdConfigV3() : this.containerdConfigV2();
  }

  /**
   * containerd 2.x's own form (version 3): pulls go through the transfer
   * service, which unpacks only for the snapshotters its unpack_config
   * lists, and passes remote-snapshot labels to a proxy snapshotter only
   * when the plugin exports enable_remote_snapshot_annotations.
   */
  private containerdConfigV3(): string {
    const cri = ['io.containerd.grpc.v1.cri', 'io.containerd.cri.v1.runtime', 'io.containerd.cri.v1.images', 'io.containerd.podsandbox.controller.v1.podsandbox', 'io.containerd.sandbox.controller.v1.shim'];
    const q = (s: string) => JSON.stringify(s);
    const platform = `linux/${ociArch()}`;
    return [
      ...this.containerdConfigHead(3, cri, "[plugins.'io.containerd.internal.v1.opt']"),
      ...['dedup', 'overlayfs', ...(this.opts.erofsSnapshotter ? ['erofs'] : [])].flatMap((sn) => [
        "[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]",
        `  platform = ${q(platform)}`,
        `  snapshotter = ${q(sn)}`,
        ...(sn === 'dedup' && this.opts.dedupDiffer !== false ? ['  differ = "dedup-differ"'] : []),
        ...(sn === 'erofs' ? ['  differ = "erofs"'] : []),
        '',
      ]),
      ...(this.opts.diffServiceDefault ? ["[plugins.'io.containerd.service.v1.diff-service']", `  default = [${this.opts.diffServiceDefault.map(q).join(', ')}]`, ''] : []),
      // NRI is on by default in 2.x and would serve /var/run/nri/nri.sock: not the stack's to take.
      "[plugins.'io.containerd.nri.v1.nri']",
      '  disable = true',
      '',
      ...(this.opts.cri ? this.criConfigV3() : []),
      '[proxy_plugins]',
      '  [proxy_plugins.dedup]',
      '    type = "snapshot"',
      `    address = ${q(this.daemonAddress)}`,
      '    [proxy_plugins.dedup.exports]',
      '      enable_remote_snapshot_annotations = "true"',
      ...(this.opts.dedupDiffer !== false ? ['  [proxy_plugins.dedup-differ]', '    type = "diff"', `    address = ${q(this.daemonAddress)}`] : []),
      '',
    ].join('\n');
  }

  /**
   * CRI on containerd 2.x: the image service's settings live in their own
   * plugin (io.containerd.cri.v1.images), the runtime's (CNI) in
   * io.containerd.cri.v1.runtime. `disable_snapshot_annotations = false`
   * makes 2.1 fall back to its local (client-side) pull, as 1.x pulls,
   * with the CRI snapshot labels on each layer's Prepare; without it (criPull
   * 'transfer') CRI pulls through the transfer service, which passes the
   * same labels because the proxy plugin exports
   * enable_remote_snapshot_annotations and unpacks for dedup because its
   * unpack_config lists it. The registry is a plain-HTTP host named in a
   * hosts.toml under registry.config_path (the mirrors table is
   * deprecated in 2.x; config_path serves both pull paths). The pause
   * image is pinned under a name never pulled.
   */
  /**
   * The stack's host directories (containerd 2.x's registry.config_path and
   * the daemon's): the registry as a plain-HTTP host, and the alias (if any)
   * served by it as a mirror. Returns the directory.
   */
  private writeHostsDir(): string {
    const q = (s: string) => JSON.stringify(s);
    const certs = path.join(this.dir, 'c', 'certs.d');
    const hostDir = path.join(certs, this.registry);
    fs.mkdirSync(hostDir, { recursive: true });
    fs.writeFileSync(
      path.join(hostDir, 'hosts.toml'),
      [`server = ${q(`http://${this.registry}`)}`, '', `[host.${q(`http://${this.registry}`)}]`, '  capabilities = ["pull", "resolve"]', ''].join('\n'),
    );
    if (this.opts.registryAlias) {
      const aliasDir = path.join(certs, this.opts.registryAlias);
      fs.mkdirSync(aliasDir, { recursive: true });
      fs.writeFileSync(path.join(aliasDir, 'hosts.toml'), [`[host.${q(`http://${this.registry}`)}]`, '  capabilities = ["pull", "resolve"]', ''].join('\n'));
    }
    return certs;
  }

  private criConfigV3(): string[] {
    const q = (s: string) => JSON.stringify(s);
    const certs = this.writeHostsDir();
    return [
      "[plugins.'io.containerd.cri.v1.images']",
      '  snapshotter = "dedup"',
      // Setting it at all (as 1.x needs) makes 2.1 log "Found 'DisableSnapshotAnnotations' … Falling back to local image pull mode".
      ...(this.opts.criPull === 'transfer' ? [] : ['  disable_snapshot_annotations = false']),
      "  [plugins.'io.containerd.cri.v1.images'.pinned_images]",
      `    sandbox = ${q(`${this.registry}/pause:none`)}`,
      "  [plugins.'io.containerd.cri.v1.images'.registry]",
      `    config_path = ${q(certs)}`,
      '',
      "[plugins.'io.containerd.cri.v1.runtime'.cni]",
      `  bin_dirs = [${q(path.join(this.dir, 'c', 'cni-bin'))}]`,
      `  conf_dir = ${q(path.join(this.dir, 'c', 'cni-conf'))}`,
      '',
    ];
  }

  /**
   * What both config versions start with: paths, sockets, the plugins left
   * out (`cri`: CRI's plugins, unless the stack runs CRI), the opt plugin's
   * directory under its own table header.
   */
  private containerdConfigHead(version: 2 | 3, cri: string[], optHeader: string): string[] {
    const disabled = [...(this.opts.cri ? [] : cri), 'io.containerd.snapshotter.v1.btrfs', 'io.containerd.snapshotter.v1.zfs', 'io.containerd.snapshotter.v1.devmapper', 'io.containerd.snapshotter.v1.aufs'];
    const q = (s: string) => JSON.stringify(s);
    return [
      `version = ${version}`,
      `root = ${q(this.containerdRoot)}`,
      `state = ${q(this.containerdState)}`,
      `disabled_plugins = [${disabled.map(q).join(', ')}]`,
      '',
      '[grpc]',
      `  address = ${q(this.containerdAddress)}`,
      '',
      '[ttrpc]',
      `  address = ${q(`${this.containerdAddress}.ttrpc`)}`,
      '',
      '[debug]',
      `  level = ${q(this.opts.containerdLogLevel ?? 'info')}`,
      '',
      optHeader,
      `  path = ${q(path.join(this.dir, 'c', 'opt'))}`,
      '',
    ];
  }

  private containerdConfigV2(): string {
    const q = (s: string) => JSON.stringify(s);
    return [
      ...this.containerdConfigHead(2, ['io.containerd.grpc.v1.cri'], '[plugins."io.containerd.internal.v1.opt"]'),
      ...(this.opts.cri
        ? [
            '[plugins."io.containerd.grpc.v1.cri"]',
            `  sandbox_image = "${this.registry}/pause:none"`,
            '  [plugins."io.containerd.grpc.v1.cri".containerd]',
            '    snapshotter = "dedup"',
            '    disable_snapshot_annotations = false',
            '  [plugins."io.containerd.grpc.v1.cri".cni]',
            `    bin_dir = ${q(path.join(this.dir, 'c', 'cni-bin'))}`,
            `    conf_dir = ${q(path.join(this.dir, 'c', 'cni-conf'))}`,
            `  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."${this.registry}"]`,
            `    endpoint = ["http://${this.registry}"]`,
            ...(this.opts.registryAlias ? [`  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."${this.opts.registryAlias}"]`, `    endpoint = ["http://${this.registry}"]`] : []),
            '',
          ]
        : []),
      ...(this.opts.diffServiceDefault ? ['[plugins."io.containerd.service.v1.diff-service"]', `  default = [${this.opts.diffServiceDefault.map(q).join(', ')}]`, ''] : []),
      '[proxy_plugins]',
      '  [proxy_plugins.dedup]',
      '    type = "snapshot"',
      `    address = ${q(this.daemonAddress)}`,
      // Proxy differs: containerd 1.7 and later (1.6 refuses the type).
      ...(this.opts.dedupDiffer !== false && atLeast(this.build, 1, 7) ? ['  [proxy_plugins.dedup-differ]', '    type = "diff"', `    address = ${q(this.daemonAddress)}`] : []),
      '',
    ].join('\n');
  }

  private async startContainerd(): Promise<void> {
    const cfg = path.join(this.dir, 'containerd.toml');
    fs.writeFileSync(cfg, this.containerdConfig());
    // containerd mounts bind snapshots for unpacking under $TMPDIR: keep those inside the stack dir.
    const tmp = path.join(this.dir, 'tmp');
    fs.mkdirSync(tmp, { recursive: true });
    // Its shim (containerd-shim-runc-v2) is found in PATH: the build's own first.
    const envPath = this.build.bin ? `${this.build.bin}:${process.env.PATH ?? ''}` : process.env.PATH;
    const p = spawnTracked(programOf(this.build, 'containerd'), ['--config', cfg], (d) => (this.containerdOut += d), { ...process.env, PATH: envPath, TMPDIR: tmp, ...this.opts.containerdEnv });
    this.containerdProc = p;
    await waitFor(
      async () => {
        if (p.exitCode !== null) throw new Error(`containerd exited (${p.exitCode}):\n${this.containerdOut.slice(-8000)}`);
        if (!fs.existsSync(this.containerdAddress)) return false;
        const r = await runCmd(programOf(this.build, 'ctr'), ['--address', this.containerdAddress, 'version'], { timeoutMs: 10_000 });
        return r.code === 0;
      },
      30_000 * SLOW,
      'containerd to serve',
    );
    const plugins = await this.ctr(['plugins', 'ls']);
    const line = plugins.stdout.split('\n').find((l) => /\bio\.containerd\.snapshotter\.v1\s+dedup\b/.test(l));
    if (!line || !/\bok\b/.test(line)) throw new Error(`containerd did not load the dedup proxy snapshotter:\n${plugins.stdout}`);
  }

  containerdLog(): string {
    return this.containerdOut;
  }

  registryLog(): string {
    return this.registryOut;
  }

  /** `ctr --address <sock> -n <ns> args...`; resolves with the outcome, exit code included. */
  ctrTry(args: string[], opts: CtrOptions = {}): Promise<CmdResult> {
    return runCmd(programOf(this.build, 'ctr'), ['--address', this.containerdAddress, '-n', opts.ns ?? 'default', ...args], { timeoutMs: opts.timeoutMs ?? 180_000 });
  }

  /** As ctrTry, but throws a CommandError with stdout/stderr unless ctr exits 0. */
  async ctr(args: string[], opts: CtrOptions = {}): Promise<CmdResult> {
    const r = await this.ctrTry(args, opts);
    if (r.code !== 0) throw new CommandError(['ctr', '-n', opts.ns ?? 'default', ...args], r);
    return r;
  }

  /** Snapshot names, parents and kinds as `ctr snapshots ls` shows them. */
  async snapshots(snapshotter: string, ns = 'default'): Promise<{ key: string; parent: string; kind: string }[]> {
    const r = await this.ctr(['snapshots', '--snapshotter', snapshotter, 'ls'], { ns });
    return r.stdout
      .split('\n')
      .slice(1)
      .map((l) => l.trim())
      .filter((l) => l !== '')
      .map((l) => {
        const f = l.split(/\s+/);
        // KEY PARENT KIND; PARENT is empty for a base layer
        return f.length >= 3 ? { key: f[0], parent: f[1], kind: f[2] } : { key: f[0], parent: '', kind: f[1] };
      });
  }

  async namespaces(): Promise<string[]> {
    const r = await this.ctr(['namespaces', 'ls', '-q']);
    return r.stdout.split('\n').filter((l) => l.trim() !== '');
  }

  /** Builds each image and pushes it to this stack's registry, in order; returns them with `ref` set. */
  async pushImages(defs: ImageDef[]): Promise<BuiltImage[]> {
    const images: BuiltImage[] = [];
    for (const def of defs) {
      const img = await buildImage(def);
      await pushImage(img, this.registry, this.dir);
      images.push(img);
    }
    return images;
  }

  /** Pulls with --plain-http through `snapshotter` (unpacking). */
  pull(ref: string, snapshotter: string, opts: CtrOptions = {}): Promise<CmdResult> {
    return this.ctr(['images', 'pull', '--plain-http', `--snapshotter=${snapshotter}`, ref], { timeoutMs: 240_000, ...opts });
  }

  /** Directory names under the daemon's ROOT/snapshots. */
  daemonSnapshotDirs(): string[] {
    return readdirOrEmpty(path.join(this.daemonRoot, 'snapshots'));
  }

  /**
   * What the daemon keeps on disk per snapshot: plain directories
   * (snapshots/<id>), EROFS layer images (images/<id>.erofs), their mount
   * points (mnt/<id>), and the chunk store's allocated bytes.
   */
  daemonStorage(): { dirs: string[]; images: string[]; mnts: string[]; mounted: string[]; storeBytes: number } {
    const root = this.daemonRoot;
    const images = readdirOrEmpty(path.join(root, 'images'));
    const mnts = readdirOrEmpty(path.join(root, 'mnt'));
    const points = new Set(mountPoints());
    // The chunk store: chunks.blob and any segment files (store/segments/<id>.blob).
    let storeBytes = 0;
    const segs = path.join(root, 'store', 'segments');
    for (const f of [path.join(root, 'store', 'chunks.blob'), ...readdirOrEmpty(segs).filter((n) => n.endsWith('.blob')).map((n) => path.join(segs, n))]) {
      try {
        storeBytes += fs.statSync(f).blocks * 512;
      } catch {
        /* no store yet */
      }
    }
    return {
      dirs: this.daemonSnapshotDirs(),
      images,
      mnts,
      mounted: mnts.filter((m) => points.has(path.join(root, 'mnt', m))),
      storeBytes,
    };
  }

  /** Kills and deletes every task and container in every namespace. */
  async removeAllContainers(): Promise<void> {
    for (const ns of await this.namespaces()) {
      const tasks = await this.ctrTry(['tasks', 'ls', '-q'], { ns });
      for (const id of tasks.stdout.split('\n').filter((l) => l.trim() !== '')) {
        await this.ctrTry(['tasks', 'kill', '-s', 'SIGKILL', id], { ns });
        await this.ctrTry(['tasks', 'delete', '-f', id], { ns, timeoutMs: 30_000 });
      }
      const cs = await this.ctrTry(['containers', 'ls', '-q'], { ns });
      for (const id of cs.stdout.split('\n').filter((l) => l.trim() !== '')) {
        await this.ctrTry(['containers', 'rm', id], { ns });
      }
    }
  }

  /** Shim processes that serve our containerd (they outlive it). */
  private ourShims(): number[] {
    const pids: number[] = [];
    for (const name of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(name)) continue;
      try {
        const argv = fs.readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
        if (path.basename(argv[0]).startsWith('containerd-shim') && argv.includes(this.containerdAddress)) pids.push(Number(name));
      } catch {
        /* exited */
      }
    }
    return pids;
  }

  /** Stops everything, even after a failed test; idempotent. Set DEDUP_E2E_KEEP=1 to keep the dir. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    const errors: string[] = [];
    const step = async (what: string, fn: () => Promise<unknown> | unknown) => {
      try {
        await fn();
      } catch (err) {
        errors.push(`${what}: ${(err as Error).message}`);
      }
    };
    if (this.containerdProc && this.containerdProc.exitCode === null) {
      await step('remove containers', () => this.removeAllContainers());
    }
    if (this.containerdProc) await step('stop containerd', () => stopProcess(this.containerdProc as ChildProcess, 15_000));
    await step('kill shims', () => {
      for (const pid of this.ourShims()) process.kill(pid, 'SIGKILL');
    });
    if (this.daemon) await step('stop daemon', () => stopProcess(this.daemon.proc, 10_000));
    if (this.registryProc) await step('stop registry', () => stopProcess(this.registryProc as ChildProcess, 5_000));
    await step('unmount', () => unmountUnder(this.dir));
    const left = mountsUnder(this.dir);
    if (left.length > 0) errors.push(`still mounted, dir kept: ${left.map((m) => m.target).join(' ')}`);
    else if (!process.env.DEDUP_E2E_KEEP) {
      await step('remove dir', () => fs.rmSync(this.dir, { recursive: true, force: true, maxRetries: 3 }));
    }
    if (errors.length > 0) process.stderr.write(`stack teardown problems (${this.dir}):\n  ${errors.join('\n  ')}\n`);
  }
}

/** Asserts that `ctr snapshots ls` holds the image's chain, committed, each with its parent. */
export async function assertCommittedChain(stack: Stack, snapshotter: string, img: BuiltImage): Promise<void> {
  const snaps = await stack.snapshots(snapshotter);
  const byKey = new Map(snaps.map((s) => [s.key, s]));
  img.chainIds.forEach((id, i) => {
    const s = byKey.get(id);
    assert.ok(s, `${img.def.name}: layer ${i} chain id ${id} missing from ctr snapshots ls:\n${JSON.stringify(snaps, null, 1)}`);
    assert.equal(s.kind, 'Committed', `${img.def.name}: ${id} is ${s.kind}`);
    assert.equal(s.parent, i === 0 ? '' : img.chainIds[i - 1], `${img.def.name}: parent of layer ${i}`);
  });
}

/** Names of the daemon's own snapshots (all namespaces), as containerd keyed them. */
export async function daemonSnapshotNames(stack: Stack): Promise<string[]> {
  const c = snapshotsClient(stack.daemonAddress);
  try {
    return (await list(c)).map((i) => i.name as string);
  } finally {
    c.close();
  }
}

/**
 * After images are removed with --sync: waits until containerd shows no
 * dedup snapshots in any namespace, the daemon lists none, ROOT/snapshots is
 * empty and nothing is mounted from the stack's dirs.
 */
export async function assertAllCollected(stack: Stack): Promise<void> {
  let last = '';
  try {
    await waitFor(
      async () => {
        const ctrSnaps: string[] = [];
        for (const ns of await stack.namespaces()) ctrSnaps.push(...(await stack.snapshots('dedup', ns)).map((s) => `${ns}:${s.key}`));
        const names = await daemonSnapshotNames(stack);
        const st = stack.daemonStorage();
        const mounts = mountsUnder(stack.dir).map((m) => `${m.fstype} ${m.target}`);
        last = JSON.stringify({ ctrSnaps, daemonSnapshots: names, ...st, mounts }, null, 1);
        // Reclaim: with every layer gone, the chunk store gives all its space back.
        return (
          ctrSnaps.length === 0 &&
          names.length === 0 &&
          st.dirs.length === 0 &&
          st.images.length === 0 &&
          st.mnts.length === 0 &&
          st.storeBytes === 0 &&
          mounts.length === 0
        );
      },
      30_000,
      'containerd GC to remove every dedup snapshot',
    );
  } catch (err) {
    throw new Error(`${(err as Error).message}; still present: ${last}`);
  }
}


/**
 * Waits until every snapshot the daemon lists has exactly one home, either
 * a directory snapshots/<id> or an EROFS image images/<id>.erofs mounted at
 * mnt/<id>, and nothing half-made or half-removed exists: containerd's GC
 * may still be removing snapshots in the background when this is called.
 */
export async function assertDirsMatchSnapshots(stack: Stack, timeoutMs = 60_000): Promise<void> {
  let last = '';
  try {
    await waitFor(
      async () => {
        const names = await daemonSnapshotNames(stack);
        const st = stack.daemonStorage();
        last = JSON.stringify({ names, ...st });
        const imageIds = st.images.map((i) => /^(\d+)\.erofs$/.exec(i)?.[1]);
        const homes = new Set([...st.dirs, ...imageIds]);
        return (
          st.dirs.every((d) => /^\d+$/.test(d)) &&
          imageIds.every((i) => i !== undefined) &&
          homes.size === names.length &&
          st.dirs.length + imageIds.length === names.length &&
          [...st.mnts].sort().join() === [...imageIds].sort().join() &&
          st.mounted.length === st.mnts.length
        );
      },
      timeoutMs,
      'one directory per daemon snapshot',
    );
  } catch (err) {
    throw new Error(`${(err as Error).message}: ${last}`);
  }
}

/** The daemon logged nothing at level error or fatal (pino 50, 60). */
export function assertNoDaemonErrors(stack: Stack): void {
  const bad = stack.daemon.logs().filter((l) => typeof l.level === 'number' && l.level >= 50);
  assert.deepEqual(bad, [], 'daemon logged errors');
}
