import fs from 'node:fs';
import { type Config, ConfigError, loadConfig } from '../config/config';
import { prepareSocketPath, startGrpcServer } from '../grpc/server';
import { createLogger } from '../log/logger';
import { erofsSupported } from '../mount/erofs';
import { Snapshotter } from '../snapshot/snapshotter';

const VERSION: string = (() => {
  try {
    return JSON.parse(fs.readFileSync(require.resolve('../../../package.json'), 'utf8')).version;
  } catch {
    return 'unknown';
  }
})();

/** Runs the daemon until SIGTERM/SIGINT. Wiring only. */
export async function runDaemon(): Promise<void> {
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

  let snapshotter: Snapshotter;
  try {
    if (cfg.use_erofs && !erofsSupported()) {
      throw new Error('use_erofs is true but the kernel has no erofs filesystem (modprobe erofs), or set "use_erofs": false');
    }
    snapshotter = new Snapshotter({
      root: cfg.root,
      logger: log,
      erofs: cfg.use_erofs
        ? {
            chunkSize: cfg.chunk_size,
            mkfs: cfg.mkfs_erofs,
            mountMode: cfg.mount_backend,
            directIo: cfg.direct_io,
            readAheadKb: cfg.read_ahead_kb,
            convertMode: cfg.convert_mode,
          }
        : null,
    });
    // Directories left by a crash (no row names them) go before serving;
    // layer images are mounted again and the chunk store checked.
    await snapshotter.cleanup();
    await snapshotter.recover();
  } catch (err) {
    log.fatal({ op: 'start', err: (err as Error).message }, 'cannot start snapshotter');
    process.exit(1);
  }

  let grpcServer;
  try {
    grpcServer = await startGrpcServer({ address: cfg.address, snapshotter, logger: log });
  } catch (err) {
    log.fatal({ op: 'start', address: cfg.address, err: (err as Error).message }, 'cannot serve gRPC');
    snapshotter.close();
    process.exit(1);
  }
  log.info({ op: 'start', address: cfg.address }, 'serving containerd snapshots API');

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) {
      log.warn({ op: 'stop', signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    log.info({ op: 'stop', signal }, 'shutting down');
    await grpcServer.shutdown();
    snapshotter.close();
    log.info({ op: 'stop' }, 'stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}
