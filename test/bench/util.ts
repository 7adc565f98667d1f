/** Small helpers of the benchmark: commands, cleanup on signals, statistics, formatting. */
import fs from 'node:fs';
import path from 'node:path';
import { type CmdResult, CommandError, runCmd } from '../helpers/stack';

export { runCmd };

export function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

/** Runs a command, throwing with its output unless it exits 0. */
export async function sh(cmd: string, args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CmdResult> {
  const r = await runCmd(cmd, args, { timeoutMs: opts.timeoutMs ?? 600_000, env: opts.env });
  if (r.code !== 0) throw new CommandError([cmd, ...args], r);
  return r;
}

/** Cleanup actions run (last registered first) on normal exit, on failure and on SIGINT/SIGTERM. */
const cleanups: { what: string; fn: () => Promise<void> | void }[] = [];

export function onCleanup(what: string, fn: () => Promise<void> | void): () => void {
  const entry = { what, fn };
  cleanups.push(entry);
  return () => {
    const i = cleanups.indexOf(entry);
    if (i >= 0) cleanups.splice(i, 1);
  };
}

export async function runCleanups(): Promise<void> {
  while (cleanups.length > 0) {
    const c = cleanups.pop();
    if (!c) break;
    try {
      await c.fn();
    } catch (err) {
      log(`cleanup "${c.what}" failed: ${(err as Error).message}`);
    }
  }
}

process.on('uncaughtException', (err) => {
  log(`uncaught: ${err.stack ?? err.message}; cleaning up`);
  void runCleanups().finally(() => process.exit(1));
});

let signalled = false;
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    if (signalled) process.exit(130);
    signalled = true;
    log(`${sig}: cleaning up`);
    void runCleanups().finally(() => process.exit(130));
  });
}

/** Unmounts `target` (lazily if busy); ignores "not mounted". */
export async function umount(target: string): Promise<void> {
  const r = await runCmd('umount', [target], { timeoutMs: 60_000 });
  if (r.code === 0) return;
  if (/not mounted|no mount point|not found/i.test(r.stderr)) return;
  const lazy = await runCmd('umount', ['-l', target], { timeoutMs: 60_000 });
  if (lazy.code !== 0 && !/not mounted|no mount point|not found/i.test(lazy.stderr)) throw new Error(`umount ${target}: ${r.stderr.trim()} / ${lazy.stderr.trim()}`);
}

export async function dropCaches(): Promise<void> {
  await sh('sync', []);
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/** Allocated bytes under `dir` (du -sx: sparse files count only their blocks; other mounts are not entered). */
export async function duBytes(dir: string): Promise<number> {
  if (!fs.existsSync(dir)) return 0;
  const r = await sh('du', ['-sx', '--block-size=1', dir]);
  return Number(r.stdout.split(/\s+/)[0]);
}

/** Bytes in use on the filesystem holding `dir` (statfs). */
export function fsUsedBytes(dir: string): number {
  const st = fs.statfsSync(dir);
  return (st.blocks - st.bfree) * st.bsize;
}

/** Allocated bytes of the files under `dir` (a few: containerd's content store), without a child process. */
export function filesBytes(dir: string): number {
  let n = 0;
  let names: fs.Dirent[];
  try {
    names = fs.readdirSync(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  for (const d of names) {
    const p = path.join(dir, d.name);
    try {
      n += d.isDirectory() ? filesBytes(p) : fs.lstatSync(p).blocks * 512;
    } catch {
      // gone meanwhile (an ingest committed)
    }
  }
  return n;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export function mib(bytes: number): string {
  return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

export function secs(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

const PAGE_REPORTING_ORDER = '/sys/module/page_reporting/parameters/page_reporting_order';

/**
 * A VM with free page reporting (virtio-balloon) hands freed guest memory
 * back to its host a moment after it is freed. Dropping the page cache frees
 * hundreds of MiB; refilling it then costs a host page fault per page, or
 * not, depending on whether the reporter got there first, which splits
 * single cold reads of either snapshotter into two groups (about 1 and
 * 2.5 GB/s here). For the benchmark's duration, reporting is held off by
 * raising the smallest reported block order beyond the largest one the page
 * allocator has; the old value is put back at cleanup. Returns what was done,
 * for the report.
 */
export function holdFreePageReporting(): string {
  let old: string;
  try {
    old = fs.readFileSync(PAGE_REPORTING_ORDER, 'utf8').trim();
  } catch {
    return 'no free page reporting on this machine';
  }
  // Kernels differ in the largest order they accept here; the first accepted wins.
  for (const order of ['64', '11', '10']) {
    try {
      fs.writeFileSync(PAGE_REPORTING_ORDER, order);
    } catch {
      continue;
    }
    onCleanup('restore free page reporting', () => fs.writeFileSync(PAGE_REPORTING_ORDER, old));
    return `free page reporting held off during the run (page_reporting_order ${old} → ${order}, restored at exit)`;
  }
  return `free page reporting stays on (page_reporting_order ${old} could not be raised): single cold runs may scatter`;
}

/** Clock ticks per second of /proc's CPU times (USER_HZ: 100 on Linux for every architecture that matters here). */
const USER_HZ = 100;

/**
 * CPU seconds the whole machine spent busy so far (/proc/stat: user,
 * nice, system, irq and softirq over all CPUs; not idle, iowait, or steal,
 * the time the host gave to others). The difference across a pull is the
 * work it cost, whoever did it (containerd, ctr, the shim, the daemon, the
 * kernel's write-back): on this VM wall times vary by up to 2x from minute
 * to minute, CPU work less.
 */
export function machineCpuSeconds(): number {
  const cols = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq (guest and guest_nice are already in user and nice).
  const [user, nice, system, , , irq, softirq] = cols;
  return (user + nice + system + irq + softirq) / USER_HZ;
}

/** CPU seconds (user + system, all threads) process `pid` has used so far; 0 once it is gone. */
export function processCpuSeconds(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    const rest = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ').slice(-1)[0].split(' ');
    return (Number(rest[11]) + Number(rest[12])) / USER_HZ;
  } catch {
    return 0;
  }
}

/** The most resident memory process `pid` has had (VmHWM, bytes); 0 once it is gone. */
export function processPeakRssBytes(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    const m = /^VmHWM:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}
