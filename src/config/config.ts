import fs from 'node:fs';
import path from 'node:path';
import type { LevelWithSilent } from 'pino';
import { LOG_LEVELS } from '../log/logger';

/**
 * Configuration: defaults, then the JSON file at CONFIG, then the environment
 * (ROOT, ADDRESS, LOG_LEVEL). Validated once at start, then frozen. A bad
 * file or value stops the start with a ConfigError naming the key and the
 * expected form.
 */
export interface Config {
  readonly version: 1;
  /** Where metadata, snapshots and images live. */
  readonly root: string;
  /** The unix socket containerd's proxy plugin dials. */
  readonly address: string;
  /** Convert committed layers to EROFS (issue: auto-convert). */
  readonly use_erofs: boolean;
  /** Prefer EROFS over fscache for on-demand data when the kernel has it. */
  readonly use_fscache: boolean;
  /** Bytes per dedup chunk: a power of two from 4 KiB to 1 GiB. */
  readonly chunk_size: number;
  /** mkfs.erofs to run: a name looked up in PATH, or an absolute path. */
  readonly mkfs_erofs: string;
  /** Convert layers after Commit returns ("background") or before ("sync"). */
  readonly convert_mode: 'background' | 'sync';
  /** How layer images are mounted: detect, or force file-backed or loop. */
  readonly mount_backend: 'auto' | 'file-backed' | 'loop';
  /** File-backed mounts read the chunk store with direct I/O: "auto" (when the kernel has EROFS directio), true, false. */
  readonly direct_io: 'auto' | boolean;
  /** Read-ahead of file-backed layer mounts, KiB: "auto" (the chunk store device's, at least one chunk) or a number. */
  readonly read_ahead_kb: 'auto' | number;
  /** containers: keep the flag that makes bin/dedup-runc (containerd's runc) mark containers mergeable. */
  readonly ksm: { readonly enabled: boolean; readonly scan_interval: number; readonly containers: boolean };
  readonly log_level: LevelWithSilent;
  readonly api: { readonly address: string };
  /**
   * POST /prefetch: trace files are read only from trace_dir (null:
   * ROOT/traces); reads in flight per job; limits of the job queue (jobs
   * waiting or running, their entries, the entries' estimated bytes; beyond
   * them 429) and finished jobs kept for GET /prefetch/<id>.
   */
  readonly prefetch: {
    readonly trace_dir: string | null;
    readonly concurrency: number;
    readonly max_queued_jobs: number;
    readonly max_queued_entries: number;
    readonly max_queued_bytes: number;
    readonly keep_finished: number;
  };
  /**
   * Registries of dedup images: hosts reached over plain HTTP; docker
   * config.json with credentials (null: $DOCKER_CONFIG or ~/.docker).
   * push_converted: each layer of a plain image pulled through CRI that this
   * node converts is pushed to the image's repository, tagged
   * `sha256-<layer hex>.dedup` (needs push access); pull_converted: a CRI
   * pull of a plain image makes each layer that has such a tag lazily;
   * fetch_layers: a Prepare naming a layer of a plain image (CRI labels)
   * fetches the image's layers from the registry and converts them in one
   * pass, in parallel, instead of containerd (layers/plain-fetch.ts).
   */
  readonly registry: {
    readonly plain_http_hosts: readonly string[];
    readonly docker_config: string | null;
    /** containerd's host directories (hosts.toml), tried in order: mirrors, CAs, client certificates, headers. */
    readonly config_path: readonly string[];
    readonly push_converted: boolean;
    readonly pull_converted: boolean;
    readonly fetch_layers: boolean;
  };
  /**
   * Remote layers: how their data arrives. "auto": fanotify when the kernel
   * delivers pre-content events on ROOT (Linux >= 6.14), else "fetch";
   * "fanotify": loaded while containers read (start fails without it);
   * "fetch": every missing chunk fetched before Prepare returns. attempts:
   * tries per chunk run (each after the registry client's own retries)
   * before a read gets EIO. prefetch: "all" loads the rest of each lazy
   * layer in the background once it is mounted, at most prefetch_mbps
   * megabits/s (0: no limit), prefetch_concurrency windows of 8 MiB at a
   * time; "none": only reads (and POST /prefetch) load data.
   * settle (fanotify backend): a lazy layer that has all its data moves into
   * the chunk store (shared with every other layer) once nothing uses it.
   */
  readonly ondemand: { readonly backend: 'auto' | 'fscache' | 'fanotify' | 'fetch'; readonly attempts: number; readonly prefetch: 'none' | 'list' | 'all'; readonly prefetch_mbps: number; readonly prefetch_concurrency: number; readonly settle: boolean };
  /**
   * Background scrub of the chunk store: every scrub_interval_minutes (0:
   * never) every chunk is read back at scrub_mbps MiB/s and checked against
   * its digest; layers on damaged chunks are quarantined.
   * store_layout: where new chunks go. "segments": each import writes its
   * new chunks to a segment file of its own, sealed with fs-verity where
   * ROOT's filesystem has it (the kernel then fails every read of damaged
   * data); "single": one writable file, store/chunks.blob, checked by the
   * daemon; "auto": segments where fs-verity works, else single.
   * segments_per_layer: the most segments one layer reads from (chunks
   * found only in others are stored again in its own).
   */
  readonly integrity: { readonly scrub_mbps: number; readonly scrub_interval_minutes: number; readonly store_layout: 'auto' | 'single' | 'segments'; readonly segments_per_layer: number };
  /** MiB of ROOT/reserve, released so a Remove goes through on a full disk (0: none). */
  readonly disk_reserve_mb: number;
  /** ROOT/audit.db: rows older than retention_days or beyond max_rows are deleted. */
  readonly audit: { readonly retention_days: number; readonly max_rows: number };
  /** Where the file was read from, or null when only defaults were used. */
  readonly source: string | null;
}

export const DEFAULT_CONFIG_PATH = '/etc/dedup-snapshotter/config.json';
export const DEFAULT_ROOT = '/var/lib/containerd/io.containerd.snapshotter.v1.dedup';
export const DEFAULT_ADDRESS = '/run/containerd/dedup-snapshotter.sock';
/**
 * 1 MiB: reads stay near disk speed and dedup loses little on real images
 * (five Debian-based images: 229.8 MB unique in 4 KiB chunks, 239.3 MB in
 * 1 MiB; cold sequential reads about 0.65× of ext4 at 4 KiB, 0.95× at 1 MiB).
 */
export const DEFAULT_CHUNK_SIZE = 1 << 20;
/** containerd 2.x's default registry.config_path (where hosts.toml directories live). */
export const DEFAULT_HOSTS_DIRS: readonly string[] = ['/etc/containerd/certs.d', '/etc/docker/certs.d'];

export function defaultConfig(): Config {
  return {
    version: 1,
    root: DEFAULT_ROOT,
    address: DEFAULT_ADDRESS,
    use_erofs: true,
    use_fscache: true,
    chunk_size: DEFAULT_CHUNK_SIZE,
    mkfs_erofs: 'mkfs.erofs',
    mount_backend: 'auto',
    direct_io: 'auto',
    read_ahead_kb: 'auto',
    convert_mode: 'background',
    ksm: { enabled: false, scan_interval: 100, containers: true },
    log_level: 'info',
    api: { address: '127.0.0.1:8080' },
    prefetch: { trace_dir: null, concurrency: 2, max_queued_jobs: 64, max_queued_entries: 1_000_000, max_queued_bytes: 256 << 20, keep_finished: 1000 },
    registry: { plain_http_hosts: [], docker_config: null, config_path: DEFAULT_HOSTS_DIRS, push_converted: false, pull_converted: false, fetch_layers: true },
    ondemand: { backend: 'auto', attempts: 2, prefetch: 'none', prefetch_mbps: 0, prefetch_concurrency: 1, settle: true },
    integrity: { scrub_mbps: 20, scrub_interval_minutes: 1440, store_layout: 'auto', segments_per_layer: 32 },
    audit: { retention_days: 30, max_rows: 1_000_000 },
    disk_reserve_mb: 8,
    source: null,
  };
}

export class ConfigError extends Error {
  constructor(
    readonly key: string,
    message: string,
  ) {
    super(`config: ${key}: ${message}`);
    this.name = 'ConfigError';
  }
}

type Json = unknown;

function isObject(v: Json): v is Record<string, Json> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function expectBool(key: string, v: Json): boolean {
  if (typeof v !== 'boolean') throw new ConfigError(key, `expected true or false, got ${JSON.stringify(v)}`);
  return v;
}

function expectAbsPath(key: string, v: Json): string {
  if (typeof v !== 'string' || v === '' || !path.isAbsolute(v) || v.includes('\0')) {
    throw new ConfigError(key, `expected an absolute path such as "/var/lib/x", got ${JSON.stringify(v)}`);
  }
  return path.normalize(v);
}

function expectLevel(key: string, v: Json): LevelWithSilent {
  if (typeof v !== 'string' || !(LOG_LEVELS as readonly string[]).includes(v)) {
    throw new ConfigError(key, `expected one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(v)}`);
  }
  return v as LevelWithSilent;
}

function expectInt(key: string, v: Json, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new ConfigError(key, `expected an integer from ${min} to ${max}, got ${JSON.stringify(v)}`);
  }
  return v;
}

/** `host:port` (loopback by default) or an absolute unix socket path. */
function expectListenAddress(key: string, v: Json): string {
  if (typeof v === 'string' && path.isAbsolute(v) && !v.includes('\0')) return path.normalize(v);
  if (typeof v === 'string') {
    const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]*):(\d{1,5})$/.exec(v);
    if (m && Number(m[2]) <= 65535) return v;
  }
  throw new ConfigError(key, `expected "host:port" (e.g. "127.0.0.1:8080") or an absolute unix socket path, got ${JSON.stringify(v)}`);
}

function rejectUnknown(prefix: string, obj: Record<string, Json>, known: readonly string[]): void {
  for (const k of Object.keys(obj)) {
    if (!known.includes(k)) {
      const name = prefix ? `${prefix}.${k}` : k;
      throw new ConfigError(name, `unknown key; known keys here are ${known.map((x) => (prefix ? `${prefix}.${x}` : x)).join(', ')}`);
    }
  }
}

/** Applies a parsed JSON document onto `base`, validating every key. */
export function applyConfigObject(base: Config, doc: Json): Config {
  if (!isObject(doc)) throw new ConfigError('(file)', 'expected a JSON object at the top level');
  rejectUnknown('', doc, ['version', 'root', 'address', 'use_erofs', 'use_fscache', 'chunk_size', 'mkfs_erofs', 'mount_backend', 'direct_io', 'read_ahead_kb', 'convert_mode', 'ksm', 'log_level', 'api', 'prefetch', 'registry', 'ondemand', 'integrity', 'audit', 'disk_reserve_mb']);
  const out: { -readonly [K in keyof Config]: Config[K] } = {
    ...base,
    ksm: { ...base.ksm },
    api: { ...base.api },
    prefetch: { ...base.prefetch },
    registry: { ...base.registry },
    ondemand: { ...base.ondemand },
    audit: { ...base.audit },
  };
  if ('version' in doc && doc.version !== 1) {
    throw new ConfigError('version', `expected 1, got ${JSON.stringify(doc.version)}`);
  }
  if ('root' in doc) out.root = expectAbsPath('root', doc.root);
  if ('address' in doc) out.address = expectAbsPath('address', doc.address);
  if ('use_erofs' in doc) out.use_erofs = expectBool('use_erofs', doc.use_erofs);
  if ('use_fscache' in doc) out.use_fscache = expectBool('use_fscache', doc.use_fscache);
  if ('log_level' in doc) out.log_level = expectLevel('log_level', doc.log_level);
  if ('disk_reserve_mb' in doc) out.disk_reserve_mb = expectInt('disk_reserve_mb', doc.disk_reserve_mb, 0, 1024);
  if ('chunk_size' in doc) {
    const v = doc.chunk_size;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 4096 || v > 1 << 30 || (v & (v - 1)) !== 0) {
      throw new ConfigError('chunk_size', `expected a power of two from 4096 to 1073741824 (bytes), got ${JSON.stringify(v)}`);
    }
    out.chunk_size = v;
  }
  if ('convert_mode' in doc) {
    const v = doc.convert_mode;
    if (v !== 'background' && v !== 'sync') {
      throw new ConfigError('convert_mode', `expected "background" or "sync", got ${JSON.stringify(v)}`);
    }
    out.convert_mode = v;
  }
  if ('mount_backend' in doc) {
    const v = doc.mount_backend;
    if (v !== 'auto' && v !== 'file-backed' && v !== 'loop') {
      throw new ConfigError('mount_backend', `expected one of auto, file-backed, loop, got ${JSON.stringify(v)}`);
    }
    out.mount_backend = v;
  }
  if ('direct_io' in doc) {
    const v = doc.direct_io;
    if (v !== 'auto' && v !== true && v !== false) {
      throw new ConfigError('direct_io', `expected "auto", true or false, got ${JSON.stringify(v)}`);
    }
    out.direct_io = v;
  }
  if ('read_ahead_kb' in doc) {
    const v = doc.read_ahead_kb;
    if (v !== 'auto' && (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 1 << 20)) {
      throw new ConfigError('read_ahead_kb', `expected "auto" or an integer number of KiB from 0 to 1048576, got ${JSON.stringify(v)}`);
    }
    out.read_ahead_kb = v;
  }
  if ('mkfs_erofs' in doc) {
    const v = doc.mkfs_erofs;
    if (typeof v !== 'string' || v === '' || v.includes('\0') || (v.includes('/') && !path.isAbsolute(v))) {
      throw new ConfigError('mkfs_erofs', `expected a program name such as "mkfs.erofs" or an absolute path, got ${JSON.stringify(v)}`);
    }
    out.mkfs_erofs = v;
  }
  if ('ksm' in doc) {
    const ksm = doc.ksm;
    if (!isObject(ksm)) throw new ConfigError('ksm', `expected an object like {"enabled": true, "scan_interval": 100}, got ${JSON.stringify(ksm)}`);
    rejectUnknown('ksm', ksm, ['enabled', 'scan_interval', 'containers']);
    if ('enabled' in ksm) out.ksm = { ...out.ksm, enabled: expectBool('ksm.enabled', ksm.enabled) };
    if ('containers' in ksm) out.ksm = { ...out.ksm, containers: expectBool('ksm.containers', ksm.containers) };
    if ('scan_interval' in ksm) {
      out.ksm = { ...out.ksm, scan_interval: expectInt('ksm.scan_interval', ksm.scan_interval, 1, 3_600_000) };
    }
  }
  if ('api' in doc) {
    const api = doc.api;
    if (!isObject(api)) throw new ConfigError('api', `expected an object like {"address": "127.0.0.1:8080"}, got ${JSON.stringify(api)}`);
    rejectUnknown('api', api, ['address']);
    if ('address' in api) out.api = { address: expectListenAddress('api.address', api.address) };
  }
  if ('prefetch' in doc) {
    const pf = doc.prefetch;
    if (!isObject(pf)) throw new ConfigError('prefetch', `expected an object like {"trace_dir": "/var/lib/x/traces", "concurrency": 2}, got ${JSON.stringify(pf)}`);
    rejectUnknown('prefetch', pf, ['trace_dir', 'concurrency', 'max_queued_jobs', 'max_queued_entries', 'max_queued_bytes', 'keep_finished']);
    if ('trace_dir' in pf) out.prefetch = { ...out.prefetch, trace_dir: expectAbsPath('prefetch.trace_dir', pf.trace_dir) };
    if ('concurrency' in pf) out.prefetch = { ...out.prefetch, concurrency: expectInt('prefetch.concurrency', pf.concurrency, 1, 64) };
    if ('max_queued_jobs' in pf) out.prefetch = { ...out.prefetch, max_queued_jobs: expectInt('prefetch.max_queued_jobs', pf.max_queued_jobs, 1, 10_000) };
    if ('max_queued_entries' in pf) out.prefetch = { ...out.prefetch, max_queued_entries: expectInt('prefetch.max_queued_entries', pf.max_queued_entries, 1, 10_000_000) };
    if ('max_queued_bytes' in pf) out.prefetch = { ...out.prefetch, max_queued_bytes: expectInt('prefetch.max_queued_bytes', pf.max_queued_bytes, 1 << 20, 4 * 2 ** 30) };
    if ('keep_finished' in pf) out.prefetch = { ...out.prefetch, keep_finished: expectInt('prefetch.keep_finished', pf.keep_finished, 0, 100_000) };
  }
  if ('registry' in doc) {
    const rg = doc.registry;
    if (!isObject(rg)) throw new ConfigError('registry', `expected an object like {"plain_http_hosts": ["127.0.0.1:5000"]}, got ${JSON.stringify(rg)}`);
    rejectUnknown('registry', rg, ['plain_http_hosts', 'docker_config', 'config_path', 'push_converted', 'pull_converted', 'fetch_layers']);
    if ('plain_http_hosts' in rg) {
      const v = rg.plain_http_hosts;
      if (!Array.isArray(v) || !v.every((h) => typeof h === 'string' && /^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9a-fA-F:.]+\](:\d{1,5})?$/.test(h))) {
        throw new ConfigError('registry.plain_http_hosts', `expected a list of "host" or "host:port", got ${JSON.stringify(v)}`);
      }
      out.registry = { ...out.registry, plain_http_hosts: [...(v as string[])] };
    }
    if ('docker_config' in rg) out.registry = { ...out.registry, docker_config: expectAbsPath('registry.docker_config', rg.docker_config) };
    if ('config_path' in rg) {
      // containerd's form: directories separated by ":" (CRI's registry.config_path); "" for none.
      const v = rg.config_path;
      if (typeof v !== 'string') throw new ConfigError('registry.config_path', `expected directories separated by ":" like "/etc/containerd/certs.d", got ${JSON.stringify(v)}`);
      const dirs = v.split(':').filter((d) => d !== '');
      for (const d of dirs) if (!path.isAbsolute(d)) throw new ConfigError('registry.config_path', `expected absolute directories, got ${JSON.stringify(d)}`);
      out.registry = { ...out.registry, config_path: dirs };
    }
    if ('push_converted' in rg) out.registry = { ...out.registry, push_converted: expectBool('registry.push_converted', rg.push_converted) };
    if ('pull_converted' in rg) out.registry = { ...out.registry, pull_converted: expectBool('registry.pull_converted', rg.pull_converted) };
    if ('fetch_layers' in rg) out.registry = { ...out.registry, fetch_layers: expectBool('registry.fetch_layers', rg.fetch_layers) };
  }
  if ('ondemand' in doc) {
    const od = doc.ondemand;
    if (!isObject(od)) throw new ConfigError('ondemand', `expected an object like {"backend": "auto", "attempts": 2}, got ${JSON.stringify(od)}`);
    rejectUnknown('ondemand', od, ['backend', 'attempts', 'prefetch', 'prefetch_mbps', 'prefetch_concurrency', 'settle']);
    if ('backend' in od) {
      const v = od.backend;
      if (v !== 'auto' && v !== 'fscache' && v !== 'fanotify' && v !== 'fetch') throw new ConfigError('ondemand.backend', `expected one of auto, fscache, fanotify, fetch, got ${JSON.stringify(v)}`);
      out.ondemand = { ...out.ondemand, backend: v };
    }
    if ('attempts' in od) out.ondemand = { ...out.ondemand, attempts: expectInt('ondemand.attempts', od.attempts, 1, 20) };
    if ('prefetch' in od) {
      const v = od.prefetch;
      if (v !== 'none' && v !== 'list' && v !== 'all') throw new ConfigError('ondemand.prefetch', `expected "none", "list" or "all", got ${JSON.stringify(v)}`);
      out.ondemand = { ...out.ondemand, prefetch: v };
    }
    if ('prefetch_mbps' in od) out.ondemand = { ...out.ondemand, prefetch_mbps: expectInt('ondemand.prefetch_mbps', od.prefetch_mbps, 0, 1_000_000) };
    if ('prefetch_concurrency' in od) out.ondemand = { ...out.ondemand, prefetch_concurrency: expectInt('ondemand.prefetch_concurrency', od.prefetch_concurrency, 1, 16) };
    if ('settle' in od) out.ondemand = { ...out.ondemand, settle: expectBool('ondemand.settle', od.settle) };
  }
  if ('integrity' in doc) {
    const ig = doc.integrity;
    if (!isObject(ig)) throw new ConfigError('integrity', `expected an object like {"scrub_mbps": 20, "scrub_interval_minutes": 1440, "store_layout": "auto"}, got ${JSON.stringify(ig)}`);
    rejectUnknown('integrity', ig, ['scrub_mbps', 'scrub_interval_minutes', 'store_layout', 'segments_per_layer']);
    if ('store_layout' in ig) {
      const v = ig.store_layout;
      if (v !== 'auto' && v !== 'single' && v !== 'segments') throw new ConfigError('integrity.store_layout', `expected one of auto, single, segments, got ${JSON.stringify(v)}`);
      out.integrity = { ...out.integrity, store_layout: v };
    }
    if ('segments_per_layer' in ig) out.integrity = { ...out.integrity, segments_per_layer: expectInt('integrity.segments_per_layer', ig.segments_per_layer, 1, 128) };
    if ('scrub_mbps' in ig) out.integrity = { ...out.integrity, scrub_mbps: expectInt('integrity.scrub_mbps', ig.scrub_mbps, 1, 100_000) };
    if ('scrub_interval_minutes' in ig) out.integrity = { ...out.integrity, scrub_interval_minutes: expectInt('integrity.scrub_interval_minutes', ig.scrub_interval_minutes, 0, 525_600) };
  }
  if ('audit' in doc) {
    const au = doc.audit;
    if (!isObject(au)) throw new ConfigError('audit', `expected an object like {"retention_days": 30, "max_rows": 1000000}, got ${JSON.stringify(au)}`);
    rejectUnknown('audit', au, ['retention_days', 'max_rows']);
    if ('retention_days' in au) out.audit = { ...out.audit, retention_days: expectInt('audit.retention_days', au.retention_days, 1, 36500) };
    if ('max_rows' in au) out.audit = { ...out.audit, max_rows: expectInt('audit.max_rows', au.max_rows, 100, 1_000_000_000) };
  }
  return out;
}

export interface LoadOptions {
  env?: NodeJS.ProcessEnv;
}

/** Loads the configuration the daemon runs with. Throws ConfigError. */
export function loadConfig(opts: LoadOptions = {}): Config {
  const env = opts.env ?? process.env;
  let cfg = defaultConfig();
  const explicit = env.CONFIG !== undefined && env.CONFIG !== '';
  const file = explicit ? expectAbsPath('CONFIG (environment)', path.resolve(env.CONFIG as string)) : DEFAULT_CONFIG_PATH;
  let text: string | null = null;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // The default file is optional; a file the operator named is not.
    if (!(code === 'ENOENT' && !explicit)) {
      throw new ConfigError('CONFIG', `cannot read ${file}: ${(err as Error).message}`);
    }
  }
  if (text !== null) {
    let doc: Json;
    try {
      doc = JSON.parse(text);
    } catch (err) {
      throw new ConfigError('(file)', `${file} is not valid JSON: ${describeJsonError(text, (err as Error).message)}`);
    }
    cfg = { ...applyConfigObject(cfg, doc), source: file };
  }
  if (env.ROOT) cfg = { ...cfg, root: expectAbsPath('ROOT (environment)', env.ROOT) };
  if (env.ADDRESS) cfg = { ...cfg, address: expectAbsPath('ADDRESS (environment)', env.ADDRESS) };
  if (env.LOG_LEVEL) cfg = { ...cfg, log_level: expectLevel('LOG_LEVEL (environment)', env.LOG_LEVEL) };
  return deepFreeze(cfg);
}

function deepFreeze<T>(o: T): T {
  if (typeof o === 'object' && o !== null) {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

/**
 * A JSON.parse error as an operator reads it: line and column (1-based)
 * and the line itself with a caret, instead of a byte position.
 */
export function describeJsonError(text: string, message: string): string {
  const m = /at position (\d+)/.exec(message);
  const pos = m ? Number(m[1]) : /Unexpected end of JSON input/.test(message) ? text.length : -1;
  if (pos < 0) return message;
  const before = text.slice(0, pos);
  const line = before.split('\n').length;
  const lineStart = before.lastIndexOf('\n') + 1;
  const column = pos - lineStart + 1;
  const end = text.indexOf('\n', lineStart);
  const shown = text.slice(lineStart, end < 0 ? text.length : end).replace(/\t/g, ' ').slice(0, 200);
  const what = message.replace(/ in JSON at position \d+.*$/, '').replace(/ at position \d+.*$/, '');
  return `line ${line}, column ${column}: ${what}\n  ${shown}\n  ${' '.repeat(Math.max(0, Math.min(column - 1, 200)))}^`;
}
