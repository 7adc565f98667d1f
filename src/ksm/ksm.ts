import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';

/**
 * Kernel samepage merging control (`ksm.enabled`, `ksm.scan_interval`).
 *
 * At start: remember `run` and `sleep_millisecs`, then set `run=1` and
 * `sleep_millisecs` to the scan interval. At shutdown: put both back. KSM
 * merges only memory that processes opted in (madvise MADV_MERGEABLE or
 * prctl PR_SET_MEMORY_MERGE); this turns the scanner on and reports what it
 * shares. No sysfs (a container, a kernel without CONFIG_KSM) or a refused
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

  constructor(
    private readonly opts: { enabled: boolean; scanIntervalMs: number; sysDir?: string; logger?: Logger },
  ) {
    this.log = opts.logger ?? silentLogger();
  }

  private get dir(): string {
    return this.opts.sysDir ?? KSM_SYSFS;
  }

  start(): void {
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
    } catch (err) {
      this.state = 'unavailable';
      const code = (err as NodeJS.ErrnoException).code;
      this.reason =
        code === 'ENOENT'
          ? `${this.dir} does not exist (kernel without CONFIG_KSM, or sysfs not mounted here)`
          : `cannot write ${this.dir}: ${(err as Error).message}${code === 'EROFS' || code === 'EACCES' || code === 'EPERM' ? ' (read-only sysfs in a container, or not root)' : ''}`;
      this.log.warn({ op: 'ksm', err: this.reason }, `ksm.enabled is true but KSM stays off: ${this.reason}`);
    }
  }

  /** Puts back what start() changed. */
  stop(): void {
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
}
