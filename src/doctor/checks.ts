/**
 * The doctor's checks: each tests one thing the snapshotter needs on this
 * machine, for real (a mount, a syscall, an RPC), and says what to do when it
 * is missing. One function per check, each returning a CheckResult; none
 * throws for what it finds (the runner still turns a surprise into a fail).
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { MNT_DETACH, MS_RDONLY, mount, umount2 } from '../../native/mount';
import { type Config, ConfigError, DEFAULT_CONFIG_PATH, defaultConfig, loadConfig } from '../config/config';
import { snapshotsService } from '../containerd/proto';
import { type MkfsFeatures, buildChunkedImage, probeMkfs } from '../convert/mkfs';
import { KERNEL_NEEDS, atLeast, moduleFileExists, needs, parseRelease, procFilesystems } from '../kernel/facts';
import { scratchDir } from '../kernel/probes';
import { RESERVE_FILE, heldBytes, reserveOnDisk } from '../store/reserve';
import { fsTypeOf, isMountPoint, listMounts } from '../mount/mountinfo';
import { existingAncestor, readOnlyAncestor } from '../util/fs';
import { DIFFER, containerd2Snippet, differSection, hasProxyDiffers, parseContainerdVersion, platformOf, wantsTransfer } from '../containerd/config-toml';
import { CRI_V2_PLUGIN, CRI_V3_IMAGES_PLUGIN, type ContainerdTomlFacts, proxyPluginSnippet, readContainerdToml } from '../containerd/toml-reader';
import { type CheckResult, type Progress, noProgress } from './types';
import { compareVersions, errCode, errMessage, formatBytes, hasSystemd, shq, whichBin } from './util';

/**
 * The fanotify and fscache checks are the kernel probes the daemon chooses
 * its on-demand backend with (ondemand/backend.ts): one test, one answer.
 */
export { probeFanotify as checkFanotify, probeFscache as checkFscache } from '../kernel/probes';

const run = promisify(execFile);

export const DEFAULT_CONTAINERD_CONFIG = '/etc/containerd/config.toml';
/** The key the socket check asks about: no containerd key looks like this (they are `<ns>/<seq>/<key>`). */
export const PROBE_KEY = 'dedup-doctor-probe';
export const SOCKET_DEADLINE_MS = 3000;
const GiB = 1024 ** 3;

const yes = (b: boolean) => (b ? 'yes' : 'no');


// ---------------------------------------------------------------- config

/**
 * The configuration the daemon would run with (env ROOT/ADDRESS/CONFIG
 * honoured). A bad file is a failure, and the other checks go on with the
 * defaults plus ROOT/ADDRESS from the environment.
 */
export function checkConfig(env: NodeJS.ProcessEnv): { result: CheckResult; config: Config } {
  try {
    const config = loadConfig({ env });
    const from = config.source ?? `built-in defaults (${DEFAULT_CONFIG_PATH} absent)`;
    return { config, result: { name: 'config', status: 'ok', detail: `${from}: ROOT ${config.root}, ADDRESS ${config.address}` } };
  } catch (err) {
    let config = defaultConfig();
    if (env.ROOT && path.isAbsolute(env.ROOT)) config = { ...config, root: path.normalize(env.ROOT) };
    if (env.ADDRESS && path.isAbsolute(env.ADDRESS)) config = { ...config, address: path.normalize(env.ADDRESS) };
    const file = env.CONFIG ? env.CONFIG : DEFAULT_CONFIG_PATH;
    return {
      config,
      result: {
        name: 'config',
        status: 'fail',
        detail: `${errMessage(err)}; the daemon will not start. Checking with the defaults: ROOT ${config.root}, ADDRESS ${config.address}`,
        fix: err instanceof ConfigError ? `correct ${file} (every key is listed in docs/configuration.md)` : `make ${file} readable`,
      },
    };
  }
}

// ---------------------------------------------------------------- kernel

/** The kernel release and which of the features the snapshotter uses its version allows. */
export function checkKernel(release: string = os.release()): CheckResult {
  const v = parseRelease(release);
  if (!v) {
    return {
      name: 'kernel',
      status: 'warn',
      detail: `cannot read a version from ${JSON.stringify(release)}; the other checks test each feature directly`,
      fix: 'none needed if the checks below pass',
    };
  }
  const has = (f: keyof typeof KERNEL_NEEDS) => atLeast(v, KERNEL_NEEDS[f]);
  const features =
    `EROFS (${needs('erofs')}) ${yes(has('erofs'))}, ` +
    `file-backed EROFS mounts (${needs('fileBacked')}) ${yes(has('fileBacked'))}, ` +
    `EROFS directio (${needs('directio')}) ${yes(has('directio'))}, ` +
    `fanotify pre-content (${needs('preContent')}) ${yes(has('preContent'))}, ` +
    `fscache on-demand (${needs('fscacheOndemand')} with CONFIG_CACHEFILES_ONDEMAND) ${has('fscacheOndemand') ? 'by version' : 'no'}`;
  const detail = `${release}: ${features}`;
  if (!has('erofs')) {
    return { name: 'kernel', status: 'fail', detail, fix: `EROFS layers need Linux ${needs('erofs')}; upgrade the kernel (${needs('fileBacked')} for file-backed mounts)` };
  }
  if (!has('fileBacked')) {
    return {
      name: 'kernel',
      status: 'warn',
      detail: `${detail}; layer images go on loop devices`,
      fix: `Linux ${needs('fileBacked')} mounts layer images without loop devices (Debian 12: the bookworm-backports kernel)`,
    };
  }
  return { name: 'kernel', status: 'ok', detail };
}

// ---------------------------------------------------------------- erofs filesystem

/** erofs is registered with the kernel (/proc/filesystems). */
export function checkErofsFilesystem(release: string = os.release()): CheckResult {
  const names = procFilesystems();
  if (names === null) {
    return { name: 'erofs', status: 'skip', detail: 'cannot read /proc/filesystems (is /proc mounted?)', fix: 'mount -t proc proc /proc' };
  }
  if (names.includes('erofs')) return { name: 'erofs', status: 'ok', detail: 'erofs is listed in /proc/filesystems' };
  if (moduleFileExists(release, 'erofs', 'erofs')) {
    return {
      name: 'erofs',
      status: 'warn',
      detail: 'erofs is not in /proc/filesystems, but its module is installed (mount(2) loads it on first use)',
      fix: 'modprobe erofs (and echo erofs > /etc/modules-load.d/erofs.conf to load it at boot)',
    };
  }
  return {
    name: 'erofs',
    status: 'fail',
    detail: `erofs is not in /proc/filesystems and no erofs module is installed for ${release}`,
    fix: 'modprobe erofs; if that fails, use a kernel built with CONFIG_EROFS_FS (Debian kernels have it)',
  };
}

// ---------------------------------------------------------------- mkfs.erofs

/** Reads the version `bin --version` prints ("mkfs.erofs 1.5" or "mkfs.erofs (erofs-utils) 1.7.1"), or null. */
export async function mkfsVersion(bin: string): Promise<string | null> {
  let out = '';
  try {
    const r = await run(bin, ['--version'], { timeout: 10_000 });
    out = `${r.stdout}\n${r.stderr}`;
  } catch (err) {
    // 1.5 has no --version: it prints its banner, then complains and exits 1.
    const e = err as { stdout?: string; stderr?: string };
    out = `${e.stdout ?? ''}\n${e.stderr ?? ''}`;
  }
  return /mkfs\.erofs(?:\s+\(erofs-utils\))?\s+v?(\d[^\s]*)/.exec(out)?.[1] ?? null;
}

/** mkfs.erofs is installed, new enough, and has the options conversion uses (read from its --help). */
export async function checkMkfs(config: Config, env: NodeJS.ProcessEnv): Promise<{ result: CheckResult; features: MkfsFeatures | null; problem: string }> {
  const bin = config.mkfs_erofs;
  const install = 'apt-get install erofs-utils (RHEL/Fedora: dnf install erofs-utils)';
  const where = whichBin(bin, env.PATH);
  if (!where) {
    const problem = bin.includes('/') ? `${bin} does not exist or is not executable` : `${bin} not found in PATH`;
    return {
      features: null,
      problem,
      result: { name: 'mkfs.erofs', status: 'fail', detail: `${problem}; layers cannot be converted to EROFS`, fix: bin === 'mkfs.erofs' ? install : `${install}, or set "mkfs_erofs" in the config to its path` },
    };
  }
  const version = await mkfsVersion(where);
  let features: MkfsFeatures;
  try {
    features = await probeMkfs(where);
  } catch (err) {
    const problem = errMessage(err);
    return {
      features: null,
      problem,
      result: {
        name: 'mkfs.erofs',
        status: config.use_erofs ? 'fail' : 'warn',
        detail: `${where} ${version ?? '(version unknown)'}: ${problem}${config.use_erofs ? '' : ' (use_erofs is false: not used)'}`,
        fix: 'install erofs-utils 1.5 or newer: apt-get install erofs-utils (bookworm ships 1.5)',
      },
    };
  }
  const v = version ?? features.version;
  const detail =
    `${v === 'unknown' ? 'version unknown' : v} at ${where}: --chunksize ${yes(features.chunksize)}, --blobdev ${yes(features.blobdev)}, ` +
    `--preserve-mtime ${yes(features.preserveMtime)}, --quiet ${yes(features.quiet)}`;
  if (v === 'unknown' || compareVersions(v, '1.5') < 0) {
    return {
      features,
      problem: '',
      result: { name: 'mkfs.erofs', status: 'warn', detail: `${detail}; erofs-utils 1.5 or newer is what is tested`, fix: 'apt-get install erofs-utils (1.5 or newer)' },
    };
  }
  return { features, problem: '', result: { name: 'mkfs.erofs', status: 'ok', detail } };
}

// ---------------------------------------------------------------- file-backed mount

/**
 * Builds a tiny chunked EROFS image the way a layer is built (data in a
 * separate blob file), mounts it file-backed read-only with `device=<blob>`
 * and `directio` as the daemon does, reads the file back, unmounts and
 * deletes everything.
 */
export async function checkFileBackedMount(opts: {
  config: Config;
  mkfs: MkfsFeatures | null;
  mkfsProblem: string;
  euid: number;
  progress?: Progress;
}): Promise<CheckResult> {
  const name = 'file-backed';
  const progress = opts.progress ?? noProgress;
  if (opts.euid !== 0) {
    return { name, status: 'skip', detail: `mount(2) needs root and this runs as uid ${opts.euid}`, fix: 'run as root: sudo dedup-snapshotter doctor' };
  }
  if (!opts.mkfs) {
    return { name, status: 'skip', detail: `cannot build a test image: ${opts.mkfsProblem}`, fix: 'install mkfs.erofs (see the mkfs.erofs line), then run doctor again' };
  }
  const { dir, where } = scratchDir(opts.config.root);
  const src = path.join(dir, 'src');
  const image = path.join(dir, 'probe.erofs');
  const blob = path.join(dir, 'probe.blob');
  const target = path.join(dir, 'mnt');
  const content = `dedup-snapshotter doctor ${process.pid} ${Date.now()}\n`;
  let mounted = false;
  try {
    fs.mkdirSync(src);
    fs.mkdirSync(target);
    fs.writeFileSync(path.join(src, 'hello.txt'), content);
    const chunked = opts.mkfs.chunksize && opts.mkfs.blobdev;
    progress('building a test image with mkfs.erofs');
    try {
      if (chunked) await buildChunkedImage(opts.mkfs, { dir: src, image, blob, chunkSize: 4096 });
      else await run(opts.mkfs.path, [image, src], { timeout: 60_000 });
    } catch (err) {
      return { name, status: 'fail', detail: `mkfs.erofs could not build a one-file image ${where}: ${errMessage(err)}`, fix: 'reinstall erofs-utils: apt-get install --reinstall erofs-utils' };
    }
    const base = chunked ? [`device=${blob}`] : [];
    let directio = opts.config.direct_io !== false;
    progress('mounting the test image');
    try {
      try {
        mount(image, target, 'erofs', MS_RDONLY, [...base, ...(directio ? ['directio'] : [])].join(',') || null);
      } catch (err) {
        // An unknown option (Linux < 6.13 has no directio) is EINVAL: the same mount without it tells.
        if (!directio || errCode(err) !== 'EINVAL') throw err;
        mount(image, target, 'erofs', MS_RDONLY, base.join(',') || null);
        directio = false;
        if (opts.config.direct_io === true) {
          mounted = true;
          return {
            name,
            status: 'fail',
            detail: `the kernel refuses the EROFS directio option (Linux ${needs('directio')}), and the config sets "direct_io": true, so layer mounts will fail`,
            fix: 'set "direct_io": "auto" in the config',
          };
        }
      }
      mounted = true;
    } catch (err) {
      const code = errCode(err);
      if (code === 'ENOTBLK') {
        // The kernel wants a block device: too old for file-backed mounts, or
        // the filesystem holding the image cannot back one (tmpfs, for one).
        const forced = opts.config.mount_backend === 'file-backed';
        const v = parseRelease(os.release());
        const why =
          v && atLeast(v, KERNEL_NEEDS.fileBacked)
            ? `a file-backed mount of an image ${where} is refused (ENOTBLK): ${fsTypeOf(dir) ?? 'that filesystem'} cannot back EROFS file-backed mounts`
            : `the kernel has no file-backed EROFS mounts (Linux ${needs('fileBacked')}, ENOTBLK)`;
        const fixWhy = v && atLeast(v, KERNEL_NEEDS.fileBacked) ? 'keep ROOT on ext4, xfs or btrfs' : `Linux ${needs('fileBacked')} mounts layer images without loop devices`;
        return {
          name,
          status: forced ? 'fail' : 'warn',
          detail: `${why}${forced ? '; the config forces "mount_backend": "file-backed"' : '; layers go on loop devices'}`,
          fix: forced ? `set "mount_backend": "auto" in the config, or ${fixWhy}` : fixWhy,
        };
      }
      if (code === 'ENODEV') return { name, status: 'fail', detail: `the kernel has no erofs filesystem: ${errMessage(err)}`, fix: 'modprobe erofs' };
      return { name, status: 'fail', detail: `mounting a test image ${where} failed: ${errMessage(err)}`, fix: 'see the kernel log: dmesg | tail' };
    }
    const entry = listMounts().filter((m) => m.target === target).pop();
    if (!entry || entry.fstype !== 'erofs' || entry.source !== image) {
      return {
        name,
        status: 'fail',
        detail: `mount(2) returned but ${target} is ${entry ? `${entry.fstype} from ${entry.source}` : 'not in /proc/self/mountinfo'}`,
        fix: 'see the kernel log: dmesg | tail',
      };
    }
    const back = fs.readFileSync(path.join(target, 'hello.txt'), 'utf8');
    if (back !== content) {
      return { name, status: 'fail', detail: `read back ${JSON.stringify(back.slice(0, 80))} instead of what was written (${where})`, fix: 'see the kernel log: dmesg | tail' };
    }
    return {
      name,
      status: 'ok',
      detail:
        `mounted a ${chunked ? 'chunked ' : ''}EROFS image file-backed read-only${chunked ? ' with device=<blob file>' : ''}` +
        `${directio ? ' and directio' : opts.config.direct_io === false ? ' (without directio: "direct_io" is false)' : ' (without directio: the kernel refuses it, reads go through the page cache)'}` +
        ` ${where}, read its file back intact`,
    };
  } catch (err) {
    return { name, status: 'fail', detail: `${errMessage(err)} (${where})`, fix: 'see the kernel log: dmesg | tail' };
  } finally {
    cleanupScratch(dir, mounted ? target : null);
  }
}

/** Unmounts `target` (lazily when busy) and deletes `dir`; never recurses into a mount it could not detach. */
function cleanupScratch(dir: string, target: string | null): void {
  if (target) {
    try {
      umount2(target, 0);
    } catch {
      try {
        umount2(target, MNT_DETACH);
      } catch {
        /* reported below by leaving the directory */
      }
    }
    if (isMountPoint(target)) return;
  }
  fs.rmSync(dir, { recursive: true, force: true });
}

// ---------------------------------------------------------------- containerd config

/** containerd's version as its binary reports it (`containerd --version`). */
export interface ContainerdVersion {
  version: string;
  major: number;
  /** null: not given (a bare "2"). */
  minor?: number | null;
}

/**
 * The version of the containerd the host runs: env CONTAINERD_BIN (as
 * install.sh takes it), else `containerd` in PATH; null when there is none
 * or it does not answer (the config check then goes by the file's version).
 */
export async function detectContainerdVersion(env: NodeJS.ProcessEnv): Promise<ContainerdVersion | null> {
  const bin = whichBin(env.CONTAINERD_BIN || 'containerd', env.PATH);
  if (!bin) return null;
  try {
    const { stdout } = await run(bin, ['--version'], { timeout: 5000 });
    return parseContainerdVersion(stdout);
  } catch {
    return null;
  }
}

/**
 * containerd's config has `[proxy_plugins.dedup]` of type snapshot at the
 * daemon's address; for containerd 2.x (`containerd` known to be 2.x, or a
 * version 3 file) also the transfer service's unpack_config entry for
 * dedup and the plugin's enable_remote_snapshot_annotations export. CRI
 * using dedup with snapshot annotations off is a warning (not lazy).
 */
export function checkContainerdConfig(file: string, address: string, containerd: ContainerdVersion | null = null): CheckResult {
  const name = 'containerd';
  const restart = hasSystemd() ? 'systemctl restart containerd' : 'restart containerd';
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    const v3 = (containerd?.major ?? 0) >= 2;
    const body = v3 ? containerd2Snippet(address, { v3: true, unpack: ['dedup', 'overlayfs'], plugin: 'full', differ: true }) : proxyPluginSnippet(address);
    return {
      name,
      status: 'fail',
      detail: `cannot read ${file}: ${errCode(err) ?? errMessage(err)}`,
      fix: `create ${file} with the following, then ${restart}:\nversion = ${v3 ? 3 : 2}\n\n${body}`,
    };
  }
  const facts = readContainerdToml(text);
  const entry = facts.plugins.get('dedup');
  const others = [...facts.plugins.values()].filter((p) => p.name !== 'dedup' && p.address && path.normalize(p.address) === address);
  const aside = others.length > 0 ? ` ([proxy_plugins.${others[0].name}] has this address: containerd knows the snapshotter as "${others[0].name}", not "dedup")` : '';
  const imports = facts.hasImports ? ' (files named in its imports were not read)' : '';
  const v3 = facts.version === 3;
  if (v3 && containerd && containerd.major < 2) {
    return {
      name,
      status: 'fail',
      detail: `containerd ${containerd.version} and ${file} is a version 3 file (containerd 2.x's form): ${versionThreeOn1x(containerd)}`,
      fix: `write ${file} in the version 2 form (docs/configuration.md, containerd 1.6/1.7), or upgrade containerd to 2.x; then ${restart}`,
    };
  }
  const transfer = wantsTransfer(facts, containerd?.major);
  const who = containerd ? `containerd ${containerd.version}` : `${file} is a version 3 file (containerd 2.x)`;
  const withUnpack = transfer && !facts.unpackConfig.some((e) => e.snapshotter === 'dedup');
  const unpackNames = facts.unpackConfig.length === 0 ? ['dedup', 'overlayfs'] : ['dedup'];
  if (!entry) {
    const snippet = transfer
      ? containerd2Snippet(address, { v3, unpack: withUnpack && facts.unpackInlineLine === undefined ? unpackNames : [], plugin: facts.hasProxyPluginsHeader ? 'table' : 'full', differ: !facts.plugins.has(DIFFER) })
      : proxyPluginSnippet(address, { withHeader: !facts.hasProxyPluginsHeader });
    return {
      name,
      status: 'fail',
      detail: `${file} has no [proxy_plugins.dedup] section${aside}${imports}`,
      fix: `add to ${file}, then ${restart}:\n${snippet}`,
    };
  }
  const problems: string[] = [];
  if (entry.type !== 'snapshot') problems.push(entry.type === undefined ? 'no type' : `type "${entry.type}" instead of "snapshot"`);
  if (entry.address === undefined) problems.push('no address');
  else if (path.normalize(entry.address) !== address) problems.push(`address ${entry.address} but the daemon listens on ${address}`);
  if (problems.length > 0) {
    return {
      name,
      status: 'fail',
      detail: `${file} line ${entry.line}: [proxy_plugins.dedup] has ${problems.join(', ')}`,
      fix: `make the section read as follows, then ${restart}:\n${proxyPluginSnippet(address, { withHeader: false, exports: transfer })}`,
    };
  }
  const fails: { detail: string; fix: string }[] = [];
  const warns: { detail: string; fix: string }[] = [];
  if (transfer) {
    if (withUnpack) {
      const inline = facts.unpackInlineLine !== undefined;
      fails.push({
        detail: `${who}: ${file} has no unpack_config entry for snapshotter "dedup": \`ctr image pull --snapshotter=dedup\` fails with 'no unpack platforms defined'${imports}`,
        fix: inline
          ? `add { platform = ${JSON.stringify(platformOf())}, snapshotter = "dedup" } to the unpack_config list at line ${facts.unpackInlineLine} of ${file}, then ${restart}`
          : `add to ${file}${unpackNames.length > 1 ? ' (a list replaces containerd\'s default one: overlayfs must be in it too)' : ''}, then ${restart}:\n${containerd2Snippet(address, { v3, unpack: unpackNames, plugin: 'none', differ: !facts.plugins.has(DIFFER) })}`,
      });
    } else {
      const ours = facts.unpackConfig.find((e) => e.snapshotter === 'dedup');
      if (ours?.platform && ours.platform !== platformOf()) {
        warns.push({
          detail: `${file} line ${ours.line}: the unpack_config entry for "dedup" is for platform ${ours.platform}, this machine is ${platformOf()}: its images are not unpacked by dedup`,
          fix: `set platform = ${JSON.stringify(platformOf())} in that entry, then ${restart}`,
        });
      }
      const differ = facts.plugins.get(DIFFER);
      const differOk = differ && differ.type === 'diff' && differ.address !== undefined && path.normalize(differ.address) === address;
      if (ours && (ours.differ !== DIFFER || !differOk)) {
        const what = [
          ...(ours.differ !== DIFFER ? [`the unpack_config entry for "dedup" (line ${ours.line}) ${ours.differ === undefined ? 'names no differ' : `names differ ${JSON.stringify(ours.differ)}`}`] : []),
          ...(!differ ? [`there is no [proxy_plugins.${DIFFER}]`] : !differOk ? [`[proxy_plugins.${DIFFER}] (line ${differ.line}) is not type "diff" at ${address}`] : []),
        ];
        warns.push({
          detail: `${who}: ${what.join(' and ')}: layers are unpacked into directories by containerd's walking differ and converted afterwards, instead of in one pass by the daemon`,
          fix: `${ours.differ !== DIFFER ? `add differ = "${DIFFER}" to that unpack_config entry` : ''}${ours.differ !== DIFFER && !differOk ? ' and ' : ''}${!differOk ? `${differ ? 'make' : 'add'} this table in ${file}` : ''}, then ${restart}:\n${differSection(address).replace(/^\n#[^\n]*\n/, '').trim()}`,
        });
      }
      if (facts.unpackConfig.length > 0 && !facts.unpackConfig.some((e) => e.snapshotter === 'overlayfs')) {
        warns.push({
          detail: `${file}'s unpack_config list has no entry for overlayfs (it replaces containerd's default list): pulls with the default snapshotter fail with 'no unpack platforms defined'`,
          fix: `add to ${file}, then ${restart}:\n${containerd2Snippet(address, { v3, unpack: ['overlayfs'], plugin: 'none' })}`,
        });
      }
    }
    if (entry.exports.get(ENABLE_REMOTE) !== 'true') {
      const how = entry.exports.has(ENABLE_REMOTE) ? ` (it is ${JSON.stringify(entry.exports.get(ENABLE_REMOTE))})` : '';
      fails.push({
        detail: `[proxy_plugins.dedup] (${file} line ${entry.line}) does not export ${ENABLE_REMOTE}${how}: dedup images cannot be pulled lazily by ctr or by CRI through containerd 2.1+'s transfer service (their pull fails with 'no processor for media-type')`,
        fix: `add to [proxy_plugins.dedup] in ${file}, then ${restart}:\n    [proxy_plugins.dedup.exports]\n      ${ENABLE_REMOTE} = "true"`,
      });
    }
  }
  // The diff service's list (install.sh --diff-service): a differ it names must be there, or containerd's diff service does not start.
  const ds = facts.diffService;
  const proxyDiffers = v3 ? true : hasProxyDiffers(containerd?.major, containerd?.minor);
  const listsDiffer = ds?.default?.includes(DIFFER) ?? false;
  if (listsDiffer && proxyDiffers === false) {
    fails.push({
      detail: `${file} line ${ds?.defaultLine}: the diff service's list names "${DIFFER}", and containerd ${containerd?.version} has no proxy differs (1.7 and later have): its diff service cannot start, and pulls fail`,
      fix: `take "${DIFFER}" out of that list (or upgrade containerd to 1.7 or later), then ${restart}`,
    });
  } else if (listsDiffer) {
    const differ = facts.plugins.get(DIFFER);
    if (!(differ && differ.type === 'diff' && differ.address !== undefined && path.normalize(differ.address) === address)) {
      fails.push({
        detail: `${file} line ${ds?.defaultLine}: the diff service's list names "${DIFFER}" but ${differ ? `[proxy_plugins.${DIFFER}] (line ${differ.line}) is not type "diff" at ${address}` : `there is no [proxy_plugins.${DIFFER}]`}: containerd's diff service cannot use it`,
        fix: `${differ ? 'make' : 'add'} this table in ${file}, then ${restart}:\n${differSection(address).replace(/^\n#[^\n]*\n/, '').trim()}`,
      });
    }
  }
  warns.push(...criWarnings(facts, file, transfer, containerd, restart));
  const okDetail = `${file} line ${entry.line}: [proxy_plugins.dedup] type "snapshot", address ${entry.address}`;
  const all = [...fails, ...warns];
  if (all.length === 0) {
    if (!transfer) {
      // containerd 1.x: how ctr's and CRI's client-side unpack reaches dedup's layers.
      const how =
        ds?.default?.[0] === DIFFER
          ? `; the diff service asks ${DIFFER} first (line ${ds.defaultLine}): layers unpack in one pass through the daemon (every pull through the diff service fails while the daemon is stopped)`
          : proxyDiffers === true
            ? `; layers are unpacked into directories and converted afterwards (in one pass instead: install.sh --diff-service, docs/configuration.md "containerd 1.7")`
            : '';
      return { name, status: 'ok', detail: `${okDetail}${how}` };
    }
    const ours = facts.unpackConfig.find((e) => e.snapshotter === 'dedup');
    return { name, status: 'ok', detail: `${containerd ? `containerd ${containerd.version}: ` : ''}${okDetail}, exports ${ENABLE_REMOTE}; unpack_config entry for dedup at line ${ours?.line} (${ours?.platform ?? 'no platform'}, differ ${ours?.differ ?? 'none'})` };
  }
  return { name, status: fails.length > 0 ? 'fail' : 'warn', detail: all.map((x) => x.detail).join('; '), fix: all.map((x) => x.fix).join('\n\n') };
}

const ENABLE_REMOTE = 'enable_remote_snapshot_annotations';

/** What containerd 1.x does with a version 3 file (seen with `config dump`: 1.7.24 refuses it, 1.6.20 reads it as version 2). */
function versionThreeOn1x(c: ContainerdVersion): string {
  const minor = Number(c.version.split('.')[1] ?? 0);
  return minor >= 7 ? 'it refuses to start ("unsupported config version")' : "it reads it as version 2, ignoring 2.x's plugin names in it (CRI's io.containerd.cri.v1.* tables)";
}

/** CRI's image settings: dedup without snapshot annotations is not lazy; a version 2 table containerd 2.x does not migrate is not used. */
function criWarnings(facts: ContainerdTomlFacts, file: string, transfer: boolean, containerd: ContainerdVersion | null, restart: string): { detail: string; fix: string }[] {
  const out: { detail: string; fix: string }[] = [];
  const v3 = facts.version === 3;
  const cri = v3 ? facts.cri.v3 : facts.cri.v2;
  const table = v3 ? `[plugins.'${CRI_V3_IMAGES_PLUGIN}']` : `[plugins."${CRI_V2_PLUGIN}".containerd]`;
  if (cri?.snapshotter !== 'dedup') return out;
  // containerd 2.1+ pulls for CRI through the transfer service unless disable_snapshot_annotations
  // is set (either way: it then falls back to the local pull) or use_local_image_pull is true; the
  // transfer service passes the CRI labels to a proxy plugin exporting enable_remote_snapshot_annotations.
  // containerd not known: a version 3 file is taken for 2.1+.
  const at21 = containerd ? containerd.major > 2 || (containerd.major === 2 && Number(containerd.version.replace(/^v/, '').split('.')[1] ?? 0) >= 1) : v3;
  if (!v3 && transfer && !cri.hasRuntimes) {
    // containerd 2.x migrates the containerd table's snapshotter settings only along with its runtimes.
    out.push({
      detail: `${file} line ${cri.snapshotterLine}: CRI's snapshotter = "dedup" in ${table}, which ${containerd ? `containerd ${containerd.version}` : 'containerd 2.x'} does not read without a runtimes table next to it: CRI uses overlayfs`,
      fix: `write ${file} in the version 3 form, with snapshotter = "dedup"${at21 ? '' : ' and disable_snapshot_annotations = false'} in [plugins.'${CRI_V3_IMAGES_PLUGIN}'] (docs/configuration.md), then ${restart}`,
    });
    return out;
  }
  const criTransfer = at21 && transfer && cri.disableSnapshotAnnotations === undefined && cri.useLocalImagePull !== true;
  // Lazy then with the export (a missing one is a failure of its own, above).
  if (criTransfer) return out;
  if (cri.disableSnapshotAnnotations !== false) {
    out.push({
      detail: `CRI uses snapshotter dedup (${file} line ${cri.snapshotterLine}) but disable_snapshot_annotations is ${cri.disableSnapshotAnnotations === undefined ? 'true (the default)' : 'true'} → CRI pulls are not lazy`,
      fix: `set disable_snapshot_annotations = false in ${table} of ${file}, then ${restart}`,
    });
  }
  return out;
}

// ---------------------------------------------------------------- socket

function connectOnce(address: string, timeoutMs: number): Promise<NodeJS.ErrnoException | null> {
  return new Promise((resolve) => {
    const s = net.connect(address);
    const done = (err: NodeJS.ErrnoException | null) => {
      clearTimeout(t);
      s.destroy();
      resolve(err);
    };
    const t = setTimeout(() => done(Object.assign(new Error('connect timed out'), { code: 'ETIMEDOUT' })), timeoutMs);
    s.once('connect', () => done(null));
    s.once('error', (err) => done(err));
  });
}

function statOnce(address: string, deadlineMs: number): Promise<{ code: grpc.status; details: string; ms: number }> {
  const Client = snapshotsService();
  const client = new Client(`unix:${address}`, grpc.credentials.createInsecure());
  const md = new grpc.Metadata();
  md.set('containerd-namespace', 'default');
  const started = Date.now();
  return new Promise((resolve) => {
    (client as any).Stat({ key: PROBE_KEY }, md, { deadline: Date.now() + deadlineMs }, (err: grpc.ServiceError | null) => {
      client.close();
      resolve({ code: err ? err.code : grpc.status.OK, details: err ? err.details : '', ms: Date.now() - started });
    });
  });
}

/** The daemon answers on ADDRESS: Stat of a key that cannot exist must come back NOT_FOUND. */
export async function checkSocket(config: Config, progress: Progress = noProgress): Promise<CheckResult> {
  const name = 'socket';
  const address = config.address;
  const env = [
    ...(config.root !== defaultConfig().root ? [`ROOT=${shq(config.root)}`] : []),
    ...(address !== defaultConfig().address ? [`ADDRESS=${shq(address)}`] : []),
  ].join(' ');
  const start = `systemctl start dedup-snapshotter, or without systemd: ${env ? `${env} ` : ''}dedup-snapshotter start (it runs in the background, log in /var/log/dedup-snapshotter.log)`;
  const logs = hasSystemd() ? 'journalctl -u dedup-snapshotter -n 100' : 'the daemon\'s log (/var/log/dedup-snapshotter.log when install.sh started it)';
  let st: fs.Stats;
  try {
    st = fs.lstatSync(address);
  } catch (err) {
    const code = errCode(err);
    if (code === 'ENOENT') return { name, status: 'fail', detail: `no socket at ${address} (ENOENT): the daemon is not running`, fix: start };
    if (code === 'EACCES') return { name, status: 'fail', detail: `cannot look at ${address}: EACCES`, fix: 'run as root: sudo dedup-snapshotter doctor' };
    return { name, status: 'fail', detail: `cannot look at ${address}: ${code ?? errMessage(err)}`, fix: `check ADDRESS; ${start}` };
  }
  if (!st.isSocket()) {
    return { name, status: 'fail', detail: `${address} exists but is not a socket (the daemon will not replace it)`, fix: `move ${shq(address)} away or set ADDRESS to another path, then ${start}` };
  }
  progress('connecting');
  const connErr = await connectOnce(address, SOCKET_DEADLINE_MS);
  if (connErr) {
    const code = connErr.code ?? 'error';
    if (code === 'ECONNREFUSED') {
      return { name, status: 'fail', detail: `${address} is a socket nobody listens on (ECONNREFUSED): the daemon stopped without removing it`, fix: `${start} (it replaces a stale socket)` };
    }
    if (code === 'EACCES') return { name, status: 'fail', detail: `cannot connect to ${address}: EACCES`, fix: 'run as root: sudo dedup-snapshotter doctor' };
    return { name, status: 'fail', detail: `cannot connect to ${address}: ${code}`, fix: `check ${logs}; restart: ${start}` };
  }
  progress('calling Snapshots.Stat');
  const r = await statOnce(address, SOCKET_DEADLINE_MS);
  if (r.code === grpc.status.NOT_FOUND || r.code === grpc.status.OK) {
    return { name, status: 'ok', detail: `the daemon answers on ${address} (Stat of an unknown key: ${grpc.status[r.code]} in ${r.ms} ms)` };
  }
  const code = grpc.status[r.code] ?? String(r.code);
  if (r.code === grpc.status.DEADLINE_EXCEEDED) {
    return { name, status: 'fail', detail: `${address} accepts connections but Stat got no answer within ${SOCKET_DEADLINE_MS / 1000} s`, fix: `check ${logs}` };
  }
  if (r.code === grpc.status.UNIMPLEMENTED) {
    return { name, status: 'fail', detail: `something listens on ${address} but does not serve containerd's Snapshots API (UNIMPLEMENTED)`, fix: 'point ADDRESS (and containerd\'s proxy_plugins.dedup address) at the dedup-snapshotter socket' };
  }
  return { name, status: 'fail', detail: `Stat on ${address} answered ${code}${r.details ? `: ${r.details}` : ''} instead of NOT_FOUND`, fix: `check ${logs}` };
}

// ---------------------------------------------------------------- permissions

/** Runs as root, and ROOT belongs to root and is not writable by group or others. */
export function checkPermissions(root: string, euid: number): CheckResult {
  const name = 'permissions';
  const facts: string[] = [];
  const fixes: string[] = [];
  let status: CheckResult['status'] = 'ok';
  const worse = (s: 'warn' | 'fail') => {
    if (status !== 'fail') status = s;
  };
  if (euid === 0) facts.push('euid 0');
  else {
    facts.push(`running as uid ${euid}: the daemon mounts layers and needs root`);
    worse('fail');
    fixes.push('run as root: sudo dedup-snapshotter doctor (and run the daemon as root)');
  }
  const ro = readOnlyAncestor(root);
  if (ro !== null) {
    facts.push(`ROOT ${root} is on a read-only filesystem (${ro} is not writable: EROFS)`);
    worse('fail');
    fixes.push(`remount that filesystem read-write (mount -o remount,rw MOUNTPOINT) or set ROOT to a directory on a writable one`);
  }
  let st: fs.Stats | null = null;
  try {
    st = fs.statSync(root);
  } catch (err) {
    if (errCode(err) === 'ENOENT') {
      if (ro === null) {
        facts.push(`ROOT ${root} does not exist yet; the daemon creates it with mode 0700 at start`);
        worse('warn');
        fixes.push(`start the daemon once, or: mkdir -p -m 700 ${shq(root)}`);
      }
    } else {
      facts.push(`cannot stat ROOT ${root}: ${errCode(err) ?? errMessage(err)}`);
      worse('fail');
      // Not root: the fix above (run as root) is the one.
      if (euid === 0) fixes.push(`check the directories above ${shq(root)}`);
    }
  }
  if (st && !st.isDirectory()) {
    facts.push(`ROOT ${root} is not a directory`);
    worse('fail');
    fixes.push(`move ${shq(root)} away or set ROOT to a directory`);
  } else if (st) {
    const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
    facts.push(`ROOT ${root} owned by ${st.uid}:${st.gid}, mode ${mode}`);
    if (st.uid !== 0) {
      worse('fail');
      fixes.push(`chown root:root ${shq(root)}`);
    }
    if (st.mode & 0o002) {
      facts.push('writable by others');
      worse('fail');
    } else if (st.mode & 0o020) {
      facts.push('writable by its group');
      worse('warn');
    }
    // Only ROOT itself: a recursive chmod/chown would rewrite the modes and
    // owners of the files inside layers and containers.
    if (st.mode & 0o022) fixes.push(`chmod 700 ${shq(root)}`);
  }
  const result: CheckResult = { name, status, detail: facts.join('; ') };
  if (fixes.length > 0) result.fix = fixes.join(' && ');
  return result;
}

// ---------------------------------------------------------------- disk

/** Free space (and inodes) on ROOT's filesystem: warn below 10% or 1 GiB, fail below 1%. */
export function checkDisk(root: string): CheckResult {
  const name = 'disk';
  let at = root;
  let s: fs.StatsFs;
  try {
    try {
      s = fs.statfsSync(root);
    } catch (err) {
      if (errCode(err) !== 'ENOENT') throw err;
      at = existingAncestor(root);
      s = fs.statfsSync(at);
    }
  } catch (err) {
    const denied = errCode(err) === 'EACCES';
    return { name, status: 'skip', detail: `statfs ${at}: ${errMessage(err)}`, fix: denied ? 'run as root: sudo dedup-snapshotter doctor' : 'check that ROOT is reachable' };
  }
  const free = s.bavail * s.bsize;
  const total = s.blocks * s.bsize;
  const pct = s.blocks > 0 ? (s.bavail / s.blocks) * 100 : 0;
  const inodePct = s.files > 0 ? (s.ffree / s.files) * 100 : null;
  const on = at === root ? `ROOT's filesystem` : `the filesystem of ${at} (ROOT does not exist yet)`;
  const detail =
    `${formatBytes(free)} free of ${formatBytes(total)} (${pct.toFixed(1)}%) on ${on}` +
    (inodePct === null ? '' : `, ${inodePct.toFixed(1)}% of inodes free`);
  const fix = 'free space on that filesystem: remove unused images (ctr images rm …; containerd then removes their snapshots and the daemon gives chunk space back), or grow it';
  if (pct < 1 || (inodePct !== null && inodePct < 1)) return { name, status: 'fail', detail: `${detail}; pulls and conversions will fail`, fix };
  if (pct < 10 || free < GiB || (inodePct !== null && inodePct < 10)) return { name, status: 'warn', detail, fix };
  return { name, status: 'ok', detail };
}

/** ROOT/reserve (store/reserve.ts): warn while it is missing, which is while a full disk has taken it. */
export function checkReserve(root: string, bytes: number): CheckResult {
  const name = 'reserve';
  const file = path.join(root, RESERVE_FILE);
  if (bytes === 0) return { name, status: 'ok', detail: 'no disk reserve (disk_reserve_mb 0): a Remove on a full disk may fail until space is freed by hand' };
  try {
    fs.statSync(file);
  } catch (err) {
    const code = errCode(err);
    if (code === 'EACCES') return { name, status: 'skip', detail: `cannot look at ${file}: EACCES`, fix: 'run as root: sudo dedup-snapshotter doctor' };
    if (code === 'ENOENT' && !fs.existsSync(root)) return { name, status: 'skip', detail: `ROOT ${root} does not exist yet; the daemon makes ${file} at start`, fix: 'start the daemon once' };
  }
  const on = reserveOnDisk(root, bytes);
  if (on === 'held') return { name, status: 'ok', detail: `${file}: ${formatBytes(bytes)} held back so snapshots can be removed on a full disk` };
  const held = heldBytes(file);
  return {
    name,
    status: 'warn',
    detail: `${file} is ${on === 'missing' ? 'missing' : `${formatBytes(held)} of ${formatBytes(bytes)}`}: Removes on a full disk took ${on === 'missing' ? 'it' : 'slices of it'} (or it could not be made); ${on === 'missing' ? 'the next Remove on a full disk may fail' : 'a few more Removes on a full disk can go through'}`,
    fix: `free space on ROOT's filesystem (remove unused images: ctr images rm …); the daemon makes the reserve whole again by itself, a slice at a time, while ${formatBytes(2 * bytes)} stay free`,
  };
}
