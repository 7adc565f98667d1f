/**
 * Runs the doctor's checks in order (later checks use what earlier ones
 * found: the config, the mkfs.erofs probe, the fanotify result), hands each
 * result on as soon as it is known, and reports progress of a check only
 * once it has taken more than a second.
 */
import fs from 'node:fs';
import os from 'node:os';
import { chooseOndemandBackend } from '../ondemand/backend';
import {
  DEFAULT_CONTAINERD_CONFIG,
  checkConfig,
  checkContainerdConfig,
  detectContainerdVersion,
  checkDisk,
  checkErofsFilesystem,
  checkFanotify,
  checkFileBackedMount,
  checkFscache,
  checkKernel,
  checkMkfs,
  checkPermissions,
  checkReserve,
  checkSocket,
} from './checks';
import { checkLayerImages } from './images';
import { checkIntegrity } from './integrity';
import { checkKsm } from './ksm';
import { checkLogs } from './logs';
import type { CheckResult, Progress } from './types';

/** Whether file leases are switched off (settling tells a layer in use with one). */
function leasesOff(): boolean {
  try {
    return fs.readFileSync('/proc/sys/fs/leases-enable', 'utf8').trim() === '0';
  } catch {
    return false;
  }
}

export type { CheckResult, CheckStatus } from './types';

export interface DoctorOptions {
  env?: NodeJS.ProcessEnv;
  /** containerd's config file; default /etc/containerd/config.toml. */
  containerdConfig?: string;
  /** Called with each result as soon as it is known. */
  onResult?: (r: CheckResult) => void;
  /** Where progress lines go (stderr); only for checks running over `progressAfterMs`. */
  onProgress?: (line: string) => void;
  progressAfterMs?: number;
}

/** Runs `fn` with a Progress that stays silent for the first `afterMs`. */
async function timed<T>(name: string, opts: DoctorOptions, fn: (p: Progress) => T | Promise<T>): Promise<T> {
  const afterMs = opts.progressAfterMs ?? 1000;
  const emit = opts.onProgress ?? (() => {});
  const started = Date.now();
  let latest = 'checking';
  let shown = false;
  const timer = setTimeout(() => {
    shown = true;
    emit(`doctor: ${name}: ${latest}…`);
  }, afterMs);
  const progress: Progress = (what) => {
    latest = what;
    if (shown || Date.now() - started > afterMs) {
      shown = true;
      emit(`doctor: ${name}: ${what}…`);
    }
  };
  try {
    return await fn(progress);
  } finally {
    clearTimeout(timer);
  }
}

/** A check that throws is a failure of that check, not of the doctor. */
async function guarded(name: string, opts: DoctorOptions, fn: (p: Progress) => CheckResult | Promise<CheckResult>): Promise<CheckResult> {
  try {
    return await timed(name, opts, fn);
  } catch (err) {
    return { name, status: 'fail', detail: `the check itself failed: ${err instanceof Error ? err.message : String(err)}`, fix: 'report this with the output of dedup-snapshotter doctor --json' };
  }
}

export async function runChecks(opts: DoctorOptions = {}): Promise<CheckResult[]> {
  const env = opts.env ?? process.env;
  const euid = process.geteuid ? process.geteuid() : -1;
  const release = os.release();
  const results: CheckResult[] = [];
  const add = (r: CheckResult) => {
    results.push(r);
    opts.onResult?.(r);
    return r;
  };

  const { result: configResult, config } = checkConfig(env);
  add(configResult);
  add(await guarded('kernel', opts, () => checkKernel(release)));
  add(await guarded('erofs', opts, () => checkErofsFilesystem(release)));
  let mkfs: Awaited<ReturnType<typeof checkMkfs>> = { result: { name: 'mkfs.erofs', status: 'fail', detail: '' }, features: null, problem: 'mkfs.erofs was not probed' };
  add(
    await guarded('mkfs.erofs', opts, async () => {
      mkfs = await checkMkfs(config, env);
      return mkfs.result;
    }),
  );
  add(await guarded('file-backed', opts, (progress) => checkFileBackedMount({ config, mkfs: mkfs.features, mkfsProblem: mkfs.problem, euid, progress })));
  const fanotify = add(await guarded('fanotify', opts, () => checkFanotify(config.root)));
  const fscache = add(await guarded('fscache', opts, () => checkFscache({ release, fanotify, useFscache: config.use_fscache, root: config.root })));
  add(
    await guarded('ondemand', opts, () => {
      try {
        const choice = chooseOndemandBackend(config, { fanotify: () => fanotify, fscache: () => fscache });
        const how = { fscache: 'EROFS over fscache', fanotify: 'fanotify pre-content events', fetch: '' }[choice.backend];
        if (choice.backend === 'fetch') return { name: 'ondemand', status: 'ok', detail: `remote layers: missing chunks are fetched before a layer is ready: ${choice.reason}` };
        const detail = `remote layers load their data while containers read it (${how}, ondemand.backend "${config.ondemand.backend}"): ${choice.reason}`;
        if (choice.backend === 'fanotify' && config.ondemand.settle && leasesOff()) {
          return {
            name: 'ondemand',
            status: 'warn',
            detail: `${detail}; file leases are off (fs.leases-enable = 0): loaded layers cannot settle into the chunk store`,
            fix: 'sysctl -w fs.leases-enable=1, then restart the daemon',
          };
        }
        return { name: 'ondemand', status: 'ok', detail };
      } catch (err) {
        return { name: 'ondemand', status: 'fail', detail: (err as Error).message, fix: 'set "ondemand": {"backend": "auto"} or fix what the fanotify or fscache line says' };
      }
    }),
  );
  add(await guarded('containerd', opts, async () => checkContainerdConfig(opts.containerdConfig ?? DEFAULT_CONTAINERD_CONFIG, config.address, await detectContainerdVersion(env))));
  add(await guarded('socket', opts, (progress) => checkSocket(config, progress)));
  add(checkLogs(config.address));
  add(await guarded('images', opts, () => checkLayerImages(config.root)));
  add(await guarded('integrity', opts, () => checkIntegrity(config.root)));
  add(await guarded('permissions', opts, () => checkPermissions(config.root, euid)));
  add(await guarded('disk', opts, () => checkDisk(config.root)));
  add(await guarded('reserve', opts, () => checkReserve(config.root, config.disk_reserve_mb * 1024 * 1024)));
  add(await guarded('ksm', opts, () => checkKsm(config, opts.containerdConfig ?? DEFAULT_CONTAINERD_CONFIG, env)));
  return results;
}
