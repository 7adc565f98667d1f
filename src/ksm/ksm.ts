import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { type ContainerFigures, removeFlag, scanContainers, wrapperError, writeFlag } from './containers';

/**
 * Kernel samepage merging control (`ksm.enabled`, `ksm.scan_interval`,
 * `ksm.containers`).
 *
 * At start: remember `run` and `sleep_millisecs`, then set `run=1` and
 * `sleep_millisecs` to the scan interval. At shutdown: put both back. KSM
 * merges only memory that processes opted in (madvise MADV_MERGEABLE or
 * prctl PR_SET_MEMORY_MERGE): with `ksm.containers` the daemon also keeps
 * the flag file that tells `bin/dedup-runc` (containerd's runc, see
 * containers.ts) to mark the containers it starts, and deletes it at
 * shutdown. No sysfs (a container, a kernel without CONFIG_KSM) or a refused
 * write: one warning, and the feature stays off.
 */
export const KSM_SYSFS = '/sys/kernel/mm/ksm';

const COUNTERS = ['pages_shared', 'pages_sharing', 'pages_unshared', 'pages_volatile', 'pages_skipped', 'full_scans', 'general_profit', 'ksm_zero_pages', 'run', 'sleep_millisecs'] as const;

export type KsmCounters = Partial<Record<(typeof COUNTERS)[number], number>>;

export class Ksm {
  private saved: { run: string; sleep: string } | null = null;
  private readonly log: Logger;
  /** Why KSM is not active, when it is not. */
  state: 'off' | 'active' | 'unavailable' = 'off';
  reason = 'ksm.enabled is false';
  /** Whether containers started now are marked mergeable (the flag file is in place), and why not. */
  containerState: 'off' | 'marking' | 'unavailable' = 'off';
  containerReason = 'ksm.enabled is false';
  private flagWritten = false;
  private wrapperErrorLogged = false;
  private scanned: { at: number; figures: ContainerFigures } | null = null;
  /** Looks for the wrapper's error note now and then, so it is logged even if nobody reads /stats. */
  private errorTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly opts: {
      enabled: boolean;
      scanIntervalMs: number;
      sysDir?: string;
      logger?: Logger;
      /** ksm.containers: keep `flagFile` so the runc wrapper marks containers. */
      containers?: boolean;
      flagFile?: string;
      /** ROOT/snapshots, and snapshot id → key: which containers run on this daemon's snapshots. */
      snapshotsDir?: string;
      keyOf?: (id: string) => string | undefined;
      proc?: string;
      cgroupRoot?: string;
    },
  ) {
    this.log = opts.logger ?? silentLogger();
    if (opts.enabled && !opts.containers) this.containerReason = 'ksm.containers is false';
  }

  private get dir(): string {
    return this.opts.sysDir ?? KSM_SYSFS;
  }

  start(): void {
    if ((!this.opts.enabled || !this.opts.containers) && this.opts.flagFile && fs.existsSync(this.opts.flagFile)) {
      // Left by a daemon that did not stop cleanly: containers must not be marked now.
      try {
        removeFlag(this.opts.flagFile);
        this.log.info({ op: 'ksm', flag: this.opts.flagFile }, 'KSM for containers is off: stale flag deleted');
      } catch (err) {
        this.log.warn({ op: 'ksm', flag: this.opts.flagFile, err: (err as Error).message }, 'cannot delete a stale KSM container flag');
      }
    }
    if (!this.opts.enabled) return;
    const runFile = path.join(this.dir, 'run');
    const sleepFile = path.join(this.dir, 'sleep_millisecs');
    try {
      const saved = { run: fs.readFileSync(runFile, 'utf8').trim(), sleep: fs.readFileSync(sleepFile, 'utf8').trim() };
      fs.writeFileSync(sleepFile, String(this.opts.scanIntervalMs));
      try {
        fs.writeFileSync(runFile, '1');
      } catch (err) {
        fs.writeFileSync(sleepFile, saved.sleep);
        throw err;
      }
      this.saved = saved;
      this.state = 'active';
      this.reason = '';
      this.log.info(
        { op: 'ksm', run: 1, sleep_millisecs: this.opts.scanIntervalMs, previous_run: Number(saved.run), previous_sleep_millisecs: Number(saved.sleep) },
        `KSM on: ${this.dir}/run=1, sleep_millisecs=${this.opts.scanIntervalMs} (restored to run=${saved.run}, sleep_millisecs=${saved.sleep} at shutdown)`,
      );
      this.startContainers();
    } catch (err) {
      this.state = 'unavailable';
      const code = (err as NodeJS.ErrnoException).code;
      this.reason =
        code === 'ENOENT'
          ? `${this.dir} does not exist (kernel without CONFIG_KSM, or sysfs not mounted here)`
          : `cannot write ${this.dir}: ${(err as Error).message}${code === 'EROFS' || code === 'EACCES' || code === 'EPERM' ? ' (read-only sysfs in a container, or not root)' : ''}`;
      this.log.warn({ op: 'ksm', err: this.reason }, `ksm.enabled is true but KSM stays off: ${this.reason}`);
      if (this.opts.containers) {
        this.containerState = 'unavailable';
        this.containerReason = `KSM is off: ${this.reason}`;
      }
    }
  }

  /** With ksm.containers: writes the flag file the runc wrapper tests. */
  private startContainers(): void {
    if (!this.opts.containers || !this.opts.flagFile) return;
    const flag = this.opts.flagFile;
    try {
      writeFlag(flag, `${process.pid}\n`);
      this.flagWritten = true;
      this.wrapperError();
      this.errorTimer = setInterval(() => this.wrapperError(), 60_000);
      this.errorTimer.unref();
      this.containerState = 'marking';
      this.containerReason = '';
      this.log.info(
        { op: 'ksm', flag },
        `KSM for containers: ${flag} written; containers that containerd starts through bin/dedup-runc (runc BinaryName, ctr run --runc-binary) are marked mergeable`,
      );
    } catch (err) {
      this.containerState = 'unavailable';
      this.containerReason = (err as Error).message;
      this.log.warn({ op: 'ksm', flag, err: this.containerReason }, `containers are not marked mergeable: ${this.containerReason}`);
    }
  }

  /** Puts back what start() changed. */
  stop(): void {
    if (this.errorTimer) clearInterval(this.errorTimer);
    this.errorTimer = null;
    if (this.flagWritten && this.opts.flagFile) {
      this.flagWritten = false;
      try {
        removeFlag(this.opts.flagFile);
        this.log.info({ op: 'ksm', flag: this.opts.flagFile }, 'KSM for containers: flag deleted; containers started from now on are not marked');
      } catch (err) {
        this.log.warn({ op: 'ksm', flag: this.opts.flagFile, err: (err as Error).message }, 'cannot delete the KSM container flag');
      }
      this.containerState = 'off';
      this.containerReason = 'stopped';
    }
    if (!this.saved) return;
    const saved = this.saved;
    this.saved = null;
    try {
      fs.writeFileSync(path.join(this.dir, 'run'), saved.run);
      fs.writeFileSync(path.join(this.dir, 'sleep_millisecs'), saved.sleep);
      this.log.info({ op: 'ksm', run: Number(saved.run), sleep_millisecs: Number(saved.sleep) }, 'KSM settings restored');
    } catch (err) {
      this.log.warn({ op: 'ksm', err: (err as Error).message }, 'cannot restore KSM settings');
    }
    this.state = 'off';
    this.reason = 'stopped';
  }

  /** The kernel's KSM counters, or null when KSM is not active. */
  counters(): KsmCounters | null {
    if (this.state !== 'active') return null;
    const out: KsmCounters = {};
    for (const name of COUNTERS) {
      try {
        const v = Number(fs.readFileSync(path.join(this.dir, name), 'utf8').trim());
        if (Number.isFinite(v)) out[name] = v;
      } catch {
        // older kernels lack some counters
      }
    }
    return out;
  }

  /**
   * What the runc wrapper reported (a failed prctl, once), or null; logged
   * as a warning the first time it is seen.
   */
  wrapperError(): string | null {
    if (!this.opts.flagFile) return null;
    const err = wrapperError(this.opts.flagFile);
    if (err && !this.wrapperErrorLogged) {
      this.wrapperErrorLogged = true;
      this.log.warn({ op: 'ksm', flag: this.opts.flagFile, err }, `the runc wrapper could not mark a container mergeable: ${err} (${this.opts.flagFile}.error; delete it once fixed)`);
    }
    return err;
  }

  /** Per-container merging figures from /proc (processes marked mergeable, by cgroup), or null when KSM is not active. */
  containers(): ContainerFigures | null {
    if (this.state !== 'active') return null;
    // One pass reads every /proc/<pid>/ksm_stat: /stats and /metrics within a second share it.
    const now = Date.now();
    if (!this.scanned || now - this.scanned.at > 1000) {
      this.scanned = { at: now, figures: scanContainers({ proc: this.opts.proc, cgroupRoot: this.opts.cgroupRoot, snapshotsDir: this.opts.snapshotsDir, keyOf: this.opts.keyOf }) };
    }
    return this.scanned.figures;
  }
}
