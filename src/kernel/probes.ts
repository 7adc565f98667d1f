/**
 * Probes of what this kernel, and the filesystem under ROOT, can do for the
 * snapshotter, each a small named function returning what it found and what
 * to do about it: the daemon chooses its on-demand backend from them
 * (ondemand/backend.ts) and the doctor prints them as its checks. Each
 * tests for real where that takes nothing from the host (a fanotify mark on
 * a scratch file), and only looks where a test would (opening
 * /dev/cachefiles takes the host's one opener slot).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  FAN_CLASS_PRE_CONTENT,
  FAN_CLOEXEC,
  FAN_MARK_ADD,
  FAN_NONBLOCK,
  FAN_PRE_ACCESS,
  O_RDONLY,
  closeFd,
  fanotifyInit,
  fanotifyMark,
} from '../../native/fanotify';
import { messageOf as errMessage } from '../errdefs/errors';
import { fsTypeOf } from '../mount/mountinfo';
import { existingAncestor } from '../util/fs';
import { pidsHolding } from '../util/proc';
import { KERNEL_NEEDS, type KernelVersion, atLeast, kernelSymbols, moduleFileExists, needs, parseRelease, procFilesystems, readKernelConfig } from './facts';

export type ProbeStatus = 'ok' | 'warn' | 'fail' | 'skip';

/** What one probe found (the doctor prints it as one line: a CheckResult). */
export interface ProbeResult {
  /** Short name, printed in the doctor's second column (e.g. "kernel", "mkfs.erofs"). */
  name: string;
  status: ProbeStatus;
  /** What was tested and what came out, in one sentence or two. */
  detail: string;
  /** What to do about a non-ok result: commands or settings. May span lines (a TOML snippet). */
  fix?: string;
}

function errCode(err: unknown): string | undefined {
  return (err as { code?: string } | null)?.code;
}

/** Whether the kernel has the erofs filesystem registered (/proc/filesystems). */
export function erofsSupported(): boolean {
  return procFilesystems()?.includes('erofs') ?? false;
}

/**
 * A fresh directory for a probe's test files, on the filesystem of ROOT when
 * ROOT exists (that is where the daemon mounts images and keeps the chunk
 * store, and filesystems differ: tmpfs, for one, has no fanotify pre-content
 * events), else in the system temp dir. The daemon never touches dot-names at
 * the top of ROOT.
 */
export function scratchDir(root: string): { dir: string; where: string } {
  try {
    if (fs.statSync(root).isDirectory()) {
      return { dir: fs.mkdtempSync(path.join(root, '.doctor-')), where: `under ROOT (${fsTypeOf(root) ?? 'unknown filesystem'})` };
    }
  } catch {
    /* ROOT missing or unusable: fall back */
  }
  const tmp = os.tmpdir();
  return { dir: fs.mkdtempSync(path.join(tmp, 'dedup-doctor-')), where: `in ${tmp} (${fsTypeOf(tmp) ?? 'unknown filesystem'}; ROOT does not exist yet)` };
}

// ---------------------------------------------------------------- fanotify

/** fanotify pre-content events on a file on ROOT's filesystem: a group of class PRE_CONTENT marks it with FAN_PRE_ACCESS. */
export function probeFanotify(root: string): ProbeResult {
  const name = 'fanotify';
  const why = `on-demand loading through fanotify needs Linux ${needs('preContent')} with CONFIG_FANOTIFY_ACCESS_PERMISSIONS`;
  const { dir, where } = scratchDir(root);
  const file = path.join(dir, 'probe.blob');
  let fd = -1;
  try {
    // Sparse, like the chunk store whose holes are what pre-content events fill.
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 1 << 20);
    try {
      fd = fanotifyInit(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDONLY);
    } catch (err) {
      const code = errCode(err);
      const detail =
        code === 'EPERM' ? 'fanotify_init(FAN_CLASS_PRE_CONTENT) needs CAP_SYS_ADMIN' : code === 'ENOSYS' ? 'the kernel has no fanotify (CONFIG_FANOTIFY)' : errMessage(err);
      return { name, status: 'warn', detail: `${detail} (${code ?? 'error'}); ${why}`, fix: code === 'EPERM' ? 'run as root: sudo dedup-snapshotter doctor' : `a kernel ${needs('preContent')} with CONFIG_FANOTIFY=y and CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y` };
    }
    try {
      fanotifyMark(fd, FAN_MARK_ADD, FAN_PRE_ACCESS, file);
    } catch (err) {
      const code = errCode(err);
      // errno 95 is both ENOTSUP and EOPNOTSUPP on Linux; errnoName() may give either.
      if (code === 'EOPNOTSUPP' || code === 'ENOTSUP') {
        const fstype = fsTypeOf(dir) ?? 'this filesystem';
        return {
          name,
          status: 'warn',
          detail: `fanotify_mark(FAN_PRE_ACCESS) on a file ${where}: EOPNOTSUPP, ${fstype} does not deliver pre-content events`,
          fix: 'keep ROOT on ext4, xfs or btrfs',
        };
      }
      return {
        name,
        status: 'warn',
        detail: `fanotify_mark(FAN_PRE_ACCESS) on a file ${where}: ${code ?? errMessage(err)}${code === 'EINVAL' ? ' (the kernel does not know pre-content events)' : ''}; ${why}`,
        fix: `a kernel ${needs('preContent')} with CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y; until then layers are fetched whole`,
      };
    }
    return { name, status: 'ok', detail: `fanotify_init(FAN_CLASS_PRE_CONTENT) and fanotify_mark(FAN_PRE_ACCESS) on a sparse file ${where} work` };
  } catch (err) {
    return { name, status: 'warn', detail: `${errMessage(err)} (${where}); ${why}`, fix: 'see the message' };
  } finally {
    if (fd >= 0) {
      try {
        closeFd(fd);
      } catch {
        /* nothing to do */
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- fscache

/**
 * Processes with /dev/cachefiles open (one opener per host), read from
 * /proc/<pid>/fd: "pid (comm)", and whether it is this snapshotter (its
 * daemon or on-demand holder, which keep the device on purpose).
 */
function cachefilesHolders(): { who: string; ours: boolean }[] {
  return pidsHolding('/dev/cachefiles').map((pid) => {
    let comm = '?';
    let cmdline = '';
    try {
      comm = fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
      cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      /* gone */
    }
    return { who: `${pid} (${comm})`, ours: /dedup-snapshotter|\/cmd\/main\.js|ondemand-holder/.test(cmdline) };
  });
}

/**
 * EROFS over fscache on-demand: /dev/cachefiles and the kernel options it
 * needs. Looks only: opening the device would take the host's one opener
 * slot, and no cache is bound.
 */
export function probeFscache(opts: { release?: string; fanotify: ProbeResult; useFscache: boolean; root?: string }): ProbeResult {
  const name = 'fscache';
  const release = opts.release ?? os.release();
  const v: KernelVersion | null = parseRelease(release);
  const { config: kconfig, tried } = readKernelConfig(release);
  const opt = (k: string) => kconfig?.options.get(k);
  let device = false;
  try {
    device = fs.statSync('/dev/cachefiles').isCharacterDevice();
  } catch {
    device = false;
  }
  const facts: string[] = [];
  facts.push(device ? '/dev/cachefiles present' : 'no /dev/cachefiles');
  if (kconfig) {
    const shown = ['CONFIG_CACHEFILES', 'CONFIG_CACHEFILES_ONDEMAND', 'CONFIG_EROFS_FS_ONDEMAND'].map((k) => (opt(k) ? `${k}=${opt(k)}` : `${k} not set`));
    facts.push(`${shown.join(', ')} (${kconfig.source})`);
  } else {
    facts.push(`kernel config not readable (${tried.join('; ')})`);
  }
  if (v && !atLeast(v, KERNEL_NEEDS.fscacheOndemand)) facts.push(`kernel ${release} < 5.19`);
  if (!opts.useFscache) facts.push('use_fscache is false');
  const instead =
    opts.fanotify.status === 'ok'
      ? 'fanotify pre-content can serve on-demand loading instead'
      : 'and fanotify pre-content is not available either: layers are fetched whole before they are mounted';
  const rebuild = `a kernel ${needs('fscacheOndemand')} built with CONFIG_CACHEFILES_ONDEMAND=y and CONFIG_EROFS_FS_ONDEMAND=y`;

  // cachefiles keeps its cache in ROOT/cache/fscache and refuses a memory filesystem there (EOPNOTSUPP).
  const cacheDirCheck = (): ProbeResult | null => {
    const fstype = opts.root ? fsTypeOf(existingAncestor(opts.root)) : null;
    if (fstype === null || !['tmpfs', 'ramfs', 'overlay'].includes(fstype)) return null;
    return { name, status: 'warn', detail: `${facts.join(', ')}; but ROOT is on ${fstype}, where cachefiles cannot keep its cache (ROOT/cache/fscache); ${instead}`, fix: 'put ROOT on a disk filesystem (ext4, xfs, btrfs)' };
  };
  const ondemand = opt('CONFIG_CACHEFILES_ONDEMAND') === 'y';
  const erofsOndemand = opt('CONFIG_EROFS_FS_ONDEMAND') === 'y';
  if (device) {
    const all = cachefilesHolders();
    const holders = all.filter((h) => !h.ours).map((h) => h.who);
    if (all.some((h) => h.ours)) facts.push(`in use by this snapshotter (pid ${all.filter((h) => h.ours).map((h) => h.who).join(', ')})`);
    if (holders.length > 0) {
      return {
        name,
        status: 'warn',
        detail: `${facts.join(', ')}; /dev/cachefiles is held by pid ${holders.join(', ')} (one opener per host)`,
        fix: 'stop that process (e.g. systemctl stop cachefilesd) if the snapshotter is to use fscache',
      };
    }
    if (!kconfig) {
      // No config to read: the code those options build is in the kernel's symbols, or not.
      const want = ['cachefiles_ondemand_copen', 'erofs_fscache_register_fs'];
      const syms = kernelSymbols(want);
      if (syms && syms.size === want.length) return cacheDirCheck() ?? { name, status: 'ok', detail: `${facts.join(', ')}; the kernel has ${want.join(' and ')} (/proc/kallsyms): EROFS over fscache on-demand is available` };
      const missing = syms ? want.filter((w) => !syms.has(w)) : [];
      return {
        name,
        status: 'warn',
        detail: `${facts.join(', ')}; ${syms ? `the kernel lacks ${missing.join(' and ')} (/proc/kallsyms)` : '/proc/kallsyms not readable'}: on-demand mode cannot be confirmed; ${instead}`,
        fix: `check that the kernel has CONFIG_CACHEFILES_ONDEMAND=y and CONFIG_EROFS_FS_ONDEMAND=y`,
      };
    }
    if (ondemand && erofsOndemand) return cacheDirCheck() ?? { name, status: 'ok', detail: `${facts.join(', ')}: EROFS over fscache on-demand is available` };
    return { name, status: 'warn', detail: `${facts.join(', ')}: cachefiles without on-demand mode; ${instead}`, fix: opts.fanotify.status === 'ok' ? `none needed; for fscache: ${rebuild}` : rebuild };
  }
  // No device: say why.
  const moduleBuilt = opt('CONFIG_CACHEFILES') === 'm' || moduleFileExists(release, 'cachefiles', 'cachefiles');
  const loaded = fs.existsSync('/sys/module/cachefiles');
  if (moduleBuilt && !loaded && (ondemand || !kconfig)) {
    return { name, status: 'warn', detail: `${facts.join(', ')}: the cachefiles module is not loaded`, fix: 'modprobe cachefiles' };
  }
  return {
    name,
    status: 'warn',
    detail: `${facts.join(', ')}: no EROFS over fscache on-demand here; ${instead}`,
    fix: opts.fanotify.status === 'ok' ? `none needed; for fscache: ${rebuild}` : rebuild,
  };
}
