import fs from 'node:fs';
import path from 'node:path';
import { exitImmediately } from '../../native/libc';
import { healthProblem } from '../api/health';
import type { ServedParts } from '../api/parts';
import { prefetchTargets } from '../api/prefetch-target';
import { type ApiHandle, startApiServer } from '../api/server';
import { ConversionMetrics } from '../api/stats';
import { AuditLog } from '../audit/audit';
import { type Config, ConfigError, loadConfig } from '../config/config';
import { startGrpcServer } from '../grpc/server';
import { erofsSupported } from '../kernel/probes';
import { ksmFlagFile } from '../ksm/containers';
import { Ksm } from '../ksm/ksm';
import { createLogger } from '../log/logger';
import { type OndemandChoice, chooseOndemandBackend } from '../ondemand/backend';
import { GroupFdStore, takeStoredGroup } from '../ondemand/fdstore';
import { Prefetcher } from '../ondemand/prefetch';
import { defaultDockerConfigPath } from '../remote/auth';
import { RemoteLayers } from '../remote/lazy';
import { RegistryClient } from '../remote/registry';
import { RegistryHosts } from '../remote/hosts';
import type { LayerParts } from '../snapshot/compose';
import { Snapshotter } from '../snapshot/snapshotter';
import { sdListenFds, sdNotify } from '../systemd/notify';
import { removePidFile, writePidFile } from '../util/pidfile';
import { prepareSocketPath } from '../util/socket';

const VERSION: string = (() => {
  try {
    return JSON.parse(fs.readFileSync(require.resolve('../../../package.json'), 'utf8')).version;
  } catch {
    return 'unknown';
  }
})();

/**
 * What the HTTP API reads (health, stats, metrics): the snapshotter's parts,
 * for now. The one place they are wired; parts built outside the
 * snapshotter are passed here instead.
 */
function servedParts(parts: LayerParts): ServedParts {
  const e = parts.erofs;
  return {
    root: parts.layout.root,
    metastore: parts.ms,
    store: e?.store ?? null,
    mounter: e ? parts.kernel : null,
    loader: e?.loader ?? null,
    remote: parts.remote,
    share: e?.share ?? null,
    sealer: e?.sealer ?? null,
    integrity: e?.integrity ?? null,
    reserve: parts.reserve,
    pendingConversions: () => e?.conversion.pending ?? 0,
    settledLayers: () => e?.settler?.settled ?? 0,
  };
}

/** Runs the daemon until SIGTERM/SIGINT. Wiring only. */
export async function runDaemon(): Promise<void> {
  // First: fds systemd passed (its fd store given back) get FD_CLOEXEC and LISTEN_* leave the environment before any child starts.
  const passedFds = sdListenFds();
  let cfg: Config;
  try {
    cfg = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`dedup-snapshotter: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  const log = createLogger(cfg.log_level);
  log.info(
    { op: 'start', version: VERSION, root: cfg.root, address: cfg.address, config: cfg.source ?? '(defaults)', use_erofs: cfg.use_erofs },
    'starting dedup-snapshotter',
  );

  try {
    // Refuse a live socket before touching ROOT: the daemon answering there
    // most likely owns this ROOT, and our start-up cleanup would delete the
    // directories it is building.
    await prepareSocketPath(cfg.address);
  } catch (err) {
    log.fatal({ op: 'start', address: cfg.address, err: (err as Error).message }, 'cannot serve gRPC');
    process.exit(1);
  }
  // Without systemd (`dedup-snapshotter start` sets it): where stop, reload and status find this process.
  const pidFile = process.env.PID_FILE;
  if (pidFile) {
    writePidFile(pidFile);
    process.on('exit', () => removePidFile(pidFile));
  }

  let snapshotter: Snapshotter;
  let ondemand: OndemandChoice | null = null;
  let remoteClient: RegistryClient | null = null;
  try {
    if (cfg.use_erofs && !erofsSupported()) {
      throw new Error('use_erofs is true but the kernel has no erofs filesystem (modprobe erofs), or set "use_erofs": false');
    }
    const registryOptions = { plainHttpHosts: [...cfg.registry.plain_http_hosts], hosts: new RegistryHosts(cfg.registry.config_path), logger: log };
    try {
      remoteClient = new RegistryClient({ ...registryOptions, dockerConfig: cfg.registry.docker_config ?? defaultDockerConfigPath() });
    } catch (err) {
      // A configured file must be right; docker's default one is only a convenience.
      if (cfg.registry.docker_config) throw err;
      log.warn({ op: 'start', err: (err as Error).message }, 'ignoring docker config.json: registries are reached without its credentials');
      remoteClient = new RegistryClient(registryOptions);
    }
    ondemand = cfg.use_erofs ? chooseOndemandBackend(cfg) : null;
    const fdStore = new GroupFdStore({ logger: log });
    // The fanotify group kept by systemd's fd store while holder and daemon were both gone, if it was.
    const storedGroup = takeStoredGroup(passedFds, fdStore, ondemand?.backend === 'fanotify', log);
    snapshotter = new Snapshotter({
      root: cfg.root,
      logger: log,
      reserveBytes: cfg.disk_reserve_mb * 1024 * 1024,
      remote: cfg.use_erofs ? new RemoteLayers({ client: remoteClient, logger: log, pullConverted: cfg.registry.pull_converted }) : null,
      pushConverted: cfg.registry.push_converted,
      fetchLayers: cfg.registry.fetch_layers,
      ondemand:
        ondemand && ondemand.backend !== 'fetch'
          ? {
              backend: ondemand.backend,
              // Under ROOT/cache (only what can be fetched again): the guide's `du -sh ROOT/cache` sees it.
              fscache: { dir: path.join(cfg.root, 'cache', 'fscache'), tag: 'dedup', domain: 'dedup' },
              socket: path.join(cfg.root, 'ondemand', 'holder.sock'),
              // This same program, detached: it outlives the daemon.
              holderCommand: [process.execPath, process.argv[1], 'ondemand-holder'],
              attempts: cfg.ondemand.attempts,
              prefetch: cfg.ondemand.prefetch,
              prefetchMbps: cfg.ondemand.prefetch_mbps,
              prefetchConcurrency: cfg.ondemand.prefetch_concurrency,
              settle: cfg.ondemand.settle,
              fdStore,
              storedGroup,
            }
          : null,
      erofs: cfg.use_erofs
        ? {
            chunkSize: cfg.chunk_size,
            mkfs: cfg.mkfs_erofs,
            mountMode: cfg.mount_backend,
            directIo: cfg.direct_io,
            readAheadKb: cfg.read_ahead_kb,
            convertMode: cfg.convert_mode,
            storeLayout: cfg.integrity.store_layout,
            storeMaxDevices: cfg.integrity.segments_per_layer,
          }
        : null,
      integrity: {
        scrubMbps: cfg.integrity.scrub_mbps,
        scrubIntervalMs: cfg.integrity.scrub_interval_minutes * 60_000,
        // Verifying a large store at start can outlast systemd's start timeout: each progress line extends it.
        onStartProgress: (p) => sdNotify({ EXTEND_TIMEOUT_USEC: 30_000_000, STATUS: `verifying the chunk store: ${p.checked} of ${p.total} chunks` }),
      },
    });
    // Directories left by a crash (no row names them) go before serving;
    // layer images are mounted again and the chunk store checked.
    await snapshotter.cleanup();
    await snapshotter.recover();
  } catch (err) {
    log.fatal({ op: 'start', err: (err as Error).message }, 'cannot start snapshotter');
    process.exit(1);
  }

  const audit = new AuditLog({
    file: path.join(cfg.root, 'audit.db'),
    logger: log,
    retentionDays: cfg.audit.retention_days,
    maxRows: cfg.audit.max_rows,
  });
  try {
    await audit.opened();
  } catch (err) {
    log.fatal({ op: 'start', err: (err as Error).message }, 'cannot open the audit log');
    process.exit(1);
  }
  const conversions = new ConversionMetrics();
  snapshotter.onConvert = (e) => {
    conversions.record(e);
    audit.record({
      operation: 'convert',
      key: e.key,
      snapshotId: e.layer,
      layerId: e.layer,
      result: e.ok ? 'ok' : 'error',
      error: e.error ?? null,
      durationMs: e.durationMs,
      details: e.stats
        ? { mode: e.mode, logical_bytes: e.stats.logicalBytes, stored_bytes: e.stats.newBytes, chunks: e.stats.chunks, new_chunks: e.stats.newChunks, dedup_chunks: e.stats.dedupChunks }
        : { mode: e.mode },
    });
  };

  let ksmSettings = cfg.ksm;
  const ksmFlag = ksmFlagFile();
  const newKsm = (k: Config['ksm']) =>
    new Ksm({
      enabled: k.enabled,
      scanIntervalMs: k.scan_interval,
      containers: k.containers,
      flagFile: ksmFlag,
      snapshotsDir: snapshotter.parts.layout.snapshots,
      keyOf: (id) => snapshotter.parts.ms.keyOf(id),
      logger: log,
    });
  let ksm = newKsm(ksmSettings);
  ksm.start();

  let grpcServer;
  try {
    grpcServer = await startGrpcServer({
      address: cfg.address,
      snapshotter,
      logger: log,
      onMutation: (e) =>
        audit.record({
          operation: e.op,
          key: e.key,
          snapshotId: e.snapshotId,
          layerId: e.layerId,
          result: e.ok ? 'ok' : 'error',
          error: e.error ? `${e.code}: ${e.error}` : null,
          durationMs: e.durationMs,
          details: e.details,
        }),
    });
  } catch (err) {
    log.fatal({ op: 'start', address: cfg.address, err: (err as Error).message }, 'cannot serve gRPC');
    ksm.stop();
    await audit.close();
    snapshotter.close();
    process.exit(1);
  }
  log.info({ op: 'start', address: cfg.address }, 'serving containerd snapshots API');
  if (snapshotter.remote && ondemand) {
    log.info(
      { op: 'start', ondemand: ondemand.backend, reason: ondemand.reason, plain_http_hosts: cfg.registry.plain_http_hosts, config_path: cfg.registry.config_path },
      ondemand.backend !== 'fetch'
        ? `remote layers of dedup images load their data on demand (${ondemand.backend === 'fanotify' ? 'fanotify pre-content events' : 'EROFS over fscache'}): ${ondemand.reason}`
        : `remote layers of dedup images: missing chunks are fetched before a layer is ready (${ondemand.reason})`,
    );
  }

  let stopping = false;
  const startedAt = Date.now();
  const parts = servedParts(snapshotter.parts);
  const prefetch = new Prefetcher({
    // An image reference is looked up in containerd's images (ctr's CONTAINERD_ADDRESS, or its default socket).
    resolve: prefetchTargets({ layerRoots: (ref, ns) => snapshotter.layerRoots(ref, ns), containerdAddress: process.env.CONTAINERD_ADDRESS || '/run/containerd/containerd.sock' }),
    traceDir: cfg.prefetch.trace_dir ?? path.join(cfg.root, 'traces'),
    concurrency: cfg.prefetch.concurrency,
    limits: { maxJobs: cfg.prefetch.max_queued_jobs, maxEntries: cfg.prefetch.max_queued_entries, maxBytes: cfg.prefetch.max_queued_bytes, keepFinished: cfg.prefetch.keep_finished },
    logger: log,
    onDone: (job) =>
      audit.record({
        operation: 'prefetch',
        key: job.image_id,
        result: job.state === 'done' ? 'ok' : 'error',
        error: job.state === 'done' ? null : job.errors.join('; ').slice(0, 4096),
        durationMs: job.duration_ms,
        details: { job: job.id, phase: 'finished', files_read: job.files_read, bytes_read: job.bytes_read, skipped: job.skipped, missing: job.missing, errors: job.errors.length },
      }),
  });
  fs.mkdirSync(cfg.prefetch.trace_dir ?? path.join(cfg.root, 'traces'), { recursive: true, mode: 0o700 });
  let api: ApiHandle | null = null;
  const stop = async (signal: string) => {
    if (stopping) {
      log.warn({ op: 'stop', signal }, 'second signal: exiting now');
      if (pidFile) removePidFile(pidFile);
      // As after a crash: what was acknowledged is on disk; start-up recovers the rest.
      exitImmediately(1);
    }
    stopping = true;
    log.info({ op: 'stop', signal }, 'shutting down');
    // From here no on-demand holder is started; the running one is told at the end.
    snapshotter.loader?.beginStop();
    try {
      sdNotify({ STOPPING: 1 });
    } catch {
      // not fatal
    }
    prefetch.close();
    await api?.close().catch(() => undefined);
    await grpcServer.shutdown();
    ksm.stop();
    audit.record({ operation: 'stop', result: 'ok', details: { signal } });
    await audit.close();
    remoteClient?.close();
    await snapshotter.loader?.farewell();
    await snapshotter.settle();
    snapshotter.close();
    if (pidFile) removePidFile(pidFile);
    log.info({ op: 'stop' }, 'stopped');
    // Everything is closed and the log is written synchronously: end here, not through Node's
    // exit, which first waits for every thread-pool job, and one may be a read blocked until an
    // on-demand fill no daemon will make now (the holder keeps it for the next daemon).
    // Under `node --cpu-prof` (a developer's profile) Node's exit is taken: it writes the profile.
    if (process.execArgv.some((a) => a.startsWith('--cpu-prof'))) process.exit(0);
    exitImmediately(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  const reload = () => {
    const started = Date.now();
    let next: Config;
    try {
      next = loadConfig();
    } catch (err) {
      log.error({ op: 'reload', err: (err as Error).message }, `config reload refused: ${(err as Error).message}`);
      audit.record({ operation: 'config-reload', result: 'error', error: (err as Error).message, durationMs: Date.now() - started });
      return;
    }
    const changed = (Object.keys(next) as (keyof Config)[]).filter((k) => k !== 'source' && JSON.stringify(next[k]) !== JSON.stringify(cfg[k]));
    const applied: string[] = [];
    if (next.log_level !== cfg.log_level) {
      log.level = next.log_level;
      applied.push('log_level');
    }
    if (JSON.stringify(next.ksm) !== JSON.stringify(ksmSettings)) {
      ksm.stop();
      ksmSettings = next.ksm;
      ksm = newKsm(ksmSettings);
      ksm.start();
      applied.push('ksm');
    }
    const needRestart = changed.filter((k) => !applied.includes(k));
    cfg = { ...cfg, log_level: next.log_level, ksm: next.ksm };
    log.info({ op: 'reload', applied, restart_needed: needRestart }, `config reloaded: applied ${applied.join(', ') || 'nothing'}${needRestart.length ? `; restart to apply ${needRestart.join(', ')}` : ''}`);
    audit.record({ operation: 'config-reload', result: 'ok', durationMs: Date.now() - started, details: { applied, restart_needed: needRestart } });
  };

  process.on('SIGHUP', () => reload());

  try {
    api = await startApiServer({
      address: cfg.api.address,
      logger: log,
      prefetch,
      stats: { parts, conversions, prefetch, get ksm() { return ksm; }, get ksmEnabled() { return ksmSettings.enabled; }, audit, version: VERSION, startedAt },
      health: () => healthProblem({ stopping, grpcAddress: cfg.address, parts }),
      fsck: snapshotter.integrity
        ? async (onProgress) => {
            const started = Date.now();
            const report = await snapshotter.fsck(onProgress);
            audit.record({
              operation: 'fsck',
              key: null,
              result: report.quarantined.length === 0 && !report.store ? 'ok' : 'error',
              error: report.store,
              durationMs: Date.now() - started,
              details: { checked: report.verified?.checked ?? 0, bad_chunks: report.badChunks, quarantined: report.quarantined.map((q) => q.layer), released: report.released },
            });
            return report;
          }
        : undefined,
      onPrefetch: (e) =>
        audit.record({
          operation: 'prefetch',
          key: e.imageId,
          result: e.ok ? 'ok' : 'error',
          error: e.error,
          durationMs: e.durationMs,
          details: { phase: 'request', status: e.status, job: e.jobId },
        }),
    });
    log.info({ op: 'start', api: api.listening }, `HTTP API on ${api.listening}`);
  } catch (err) {
    // The API is a sidecar: containerd keeps its snapshotter without it.
    log.error({ op: 'start', api: cfg.api.address, err: (err as Error).message }, `HTTP API not serving on ${cfg.api.address}: ${(err as Error).message}`);
  }
  audit.record({ operation: 'start', result: 'ok', details: { version: VERSION, pid: process.pid, config: cfg.source, api: api?.listening ?? null } });
  try {
    if (sdNotify({ READY: 1, STATUS: `serving ${cfg.address}`, MAINPID: process.pid })) log.info({ op: 'start' }, 'notified systemd: READY=1');
  } catch (err) {
    log.warn({ op: 'start', err: (err as Error).message }, 'cannot notify systemd');
  }
}
