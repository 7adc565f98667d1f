import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import {
  type Config,
  ConfigError,
  DEFAULT_ADDRESS,
  DEFAULT_CONFIG_PATH,
  DEFAULT_ROOT,
  applyConfigObject,
  defaultConfig,
  loadConfig,
} from '../src/config/config';
import { DAEMON_BIN, tempDir } from './helpers/daemon';

/** Writes `content` (a string, or JSON of an object) to a fresh config file. */
function configFile(content: unknown): string {
  const file = path.join(tempDir('config'), 'config.json');
  fs.writeFileSync(file, typeof content === 'string' ? content : JSON.stringify(content));
  return file;
}

function loadFile(content: unknown, env: NodeJS.ProcessEnv = {}): Config {
  return loadConfig({ env: { CONFIG: configFile(content), ...env } });
}

/** Asserts fn throws a ConfigError naming `key` whose message matches each pattern. */
function assertConfigError(fn: () => unknown, key: string, ...patterns: RegExp[]): ConfigError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof ConfigError, `expected a ConfigError for ${key}, got ${String(caught)}`);
  assert.equal(caught.key, key);
  assert.ok(caught.message.includes(key), `message ${JSON.stringify(caught.message)} does not name ${key}`);
  for (const p of patterns) assert.match(caught.message, p);
  return caught;
}

describe('defaults', () => {
  test('defaultConfig has the documented root, address and switches', () => {
    const d = defaultConfig();
    assert.equal(d.root, '/var/lib/containerd/io.containerd.snapshotter.v1.dedup');
    assert.equal(d.address, '/run/containerd/dedup-snapshotter.sock');
    assert.equal(DEFAULT_ROOT, d.root);
    assert.equal(DEFAULT_ADDRESS, d.address);
    assert.equal(DEFAULT_CONFIG_PATH, '/etc/dedup-snapshotter/config.json');
    assert.equal(d.use_erofs, true);
    assert.equal(d.use_fscache, true);
    assert.deepEqual(d.ksm, { enabled: false, scan_interval: 100, containers: true });
    assert.equal(d.log_level, 'info');
    assert.deepEqual(d.api, { address: '127.0.0.1:8080' });
    assert.equal(d.source, null);
  });

  test('loadConfig with an empty environment gives the defaults (or the default file when it exists)', () => {
    const cfg = loadConfig({ env: {} });
    if (fs.existsSync(DEFAULT_CONFIG_PATH)) {
      assert.equal(cfg.source, DEFAULT_CONFIG_PATH);
    } else {
      assert.deepEqual({ ...cfg }, defaultConfig());
    }
    // An empty CONFIG means "not set", like an unset one.
    assert.deepEqual({ ...loadConfig({ env: { CONFIG: '' } }) }, { ...cfg });
  });

  test('an empty file object keeps every default and records its source', () => {
    const file = configFile({});
    const cfg = loadConfig({ env: { CONFIG: file } });
    assert.deepEqual({ ...cfg, source: null }, defaultConfig());
    assert.equal(cfg.source, file);
  });

  test('the result is frozen, nested objects too', () => {
    const cfg = loadFile({ ksm: { enabled: true } });
    assert.ok(Object.isFrozen(cfg));
    assert.ok(Object.isFrozen(cfg.ksm));
    assert.ok(Object.isFrozen(cfg.api));
    assert.throws(() => {
      (cfg as any).root = '/elsewhere';
    }, TypeError);
  });
});

describe('file keys', () => {
  test('every documented key is read', () => {
    const cfg = loadFile({
      version: 1,
      root: '/srv/dedup/root',
      address: '/run/dedup/other.sock',
      use_erofs: false,
      use_fscache: false,
      ksm: { enabled: true, scan_interval: 250 },
      log_level: 'debug',
      api: { address: '0.0.0.0:9090' },
    });
    assert.equal(cfg.root, '/srv/dedup/root');
    assert.equal(cfg.address, '/run/dedup/other.sock');
    assert.equal(cfg.use_erofs, false);
    assert.equal(cfg.use_fscache, false);
    assert.deepEqual(cfg.ksm, { enabled: true, scan_interval: 250, containers: true });
    assert.equal(cfg.log_level, 'debug');
    assert.deepEqual(cfg.api, { address: '0.0.0.0:9090' });
  });

  test('partial nested objects keep the other nested defaults', () => {
    assert.deepEqual(loadFile({ ksm: { enabled: true } }).ksm, { enabled: true, scan_interval: 100, containers: true });
    assert.deepEqual(loadFile({ ksm: { scan_interval: 5 } }).ksm, { enabled: false, scan_interval: 5, containers: true });
    assert.deepEqual(loadFile({ ksm: {} }).ksm, { enabled: false, scan_interval: 100, containers: true });
    assert.deepEqual(loadFile({ ksm: { enabled: true, containers: false } }).ksm, { enabled: true, scan_interval: 100, containers: false });
  });

  test('paths are normalised; api.address takes host:port or a unix socket path', () => {
    assert.equal(loadFile({ root: '/srv//dedup/./x/../root/' }).root, '/srv/dedup/root/');
    assert.equal(loadFile({ api: { address: '/run/dedup-api.sock' } }).api.address, '/run/dedup-api.sock');
    assert.equal(loadFile({ api: { address: '[::1]:8080' } }).api.address, '[::1]:8080');
    assert.equal(loadFile({ api: { address: 'localhost:1' } }).api.address, 'localhost:1');
    assert.equal(loadFile({ api: { address: ':8080' } }).api.address, ':8080');
  });

  test('every log level pino knows is accepted', () => {
    for (const level of ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']) {
      assert.equal(loadFile({ log_level: level }).log_level, level);
    }
  });

  test('applyConfigObject validates without touching the base', () => {
    const base = defaultConfig();
    const out = applyConfigObject(base, { use_erofs: false, ksm: { enabled: true } });
    assert.equal(out.use_erofs, false);
    assert.equal(out.ksm.enabled, true);
    assert.equal(base.use_erofs, true);
    assert.equal(base.ksm.enabled, false);
  });
});

describe('environment overrides', () => {
  const file = {
    root: '/from/file/root',
    address: '/from/file/sock',
    log_level: 'warn',
    use_erofs: false,
  };

  test('ROOT, ADDRESS and LOG_LEVEL win over the file', () => {
    const cfg = loadFile(file, { ROOT: '/from/env/root', ADDRESS: '/from/env/sock', LOG_LEVEL: 'trace' });
    assert.equal(cfg.root, '/from/env/root');
    assert.equal(cfg.address, '/from/env/sock');
    assert.equal(cfg.log_level, 'trace');
    // Keys the environment does not name still come from the file.
    assert.equal(cfg.use_erofs, false);
  });

  test('each variable alone overrides only its key', () => {
    assert.deepEqual(
      [loadFile(file, { ROOT: '/e' }).root, loadFile(file, { ROOT: '/e' }).address],
      ['/e', '/from/file/sock'],
    );
    assert.deepEqual(
      [loadFile(file, { ADDRESS: '/e.sock' }).address, loadFile(file, { ADDRESS: '/e.sock' }).root],
      ['/e.sock', '/from/file/root'],
    );
    assert.equal(loadFile(file, { LOG_LEVEL: 'error' }).log_level, 'error');
    assert.equal(loadFile(file).log_level, 'warn');
  });

  test('the environment overrides defaults without any file', () => {
    const dir = tempDir('config-empty');
    const empty = path.join(dir, 'c.json');
    fs.writeFileSync(empty, '{}');
    const cfg = loadConfig({ env: { CONFIG: empty, ROOT: '/r', ADDRESS: '/a.sock', LOG_LEVEL: 'fatal' } });
    assert.equal(cfg.root, '/r');
    assert.equal(cfg.address, '/a.sock');
    assert.equal(cfg.log_level, 'fatal');
  });

  test('CONFIG selects the file; a relative CONFIG is resolved from the working directory', () => {
    const f = configFile({ root: '/picked/by/config' });
    assert.equal(loadConfig({ env: { CONFIG: f } }).root, '/picked/by/config');
    assert.equal(loadConfig({ env: { CONFIG: path.relative(process.cwd(), f) } }).root, '/picked/by/config');
    assert.equal(loadConfig({ env: { CONFIG: f } }).source, f);
  });

  test('empty environment values are ignored', () => {
    const cfg = loadFile(file, { ROOT: '', ADDRESS: '', LOG_LEVEL: '' });
    assert.equal(cfg.root, '/from/file/root');
    assert.equal(cfg.address, '/from/file/sock');
    assert.equal(cfg.log_level, 'warn');
  });

  test('bad environment values name the variable', () => {
    assertConfigError(() => loadFile({}, { ROOT: 'relative/root' }), 'ROOT (environment)', /absolute path/, /relative\/root/);
    assertConfigError(() => loadFile({}, { ADDRESS: 'x.sock' }), 'ADDRESS (environment)', /absolute path/);
    assertConfigError(() => loadFile({}, { LOG_LEVEL: 'loud' }), 'LOG_LEVEL (environment)', /expected one of trace, debug, info/, /loud/);
    assertConfigError(() => loadFile({}, { LOG_LEVEL: 'INFO' }), 'LOG_LEVEL (environment)', /expected one of/);
  });
});

describe('bad files and values', () => {
  test('unknown keys, at the top and nested, name the key and list the known ones', () => {
    assertConfigError(() => loadFile({ roots: '/x' }), 'roots', /unknown key/, /known keys here are version, root, address/);
    assertConfigError(() => loadFile({ ksm: { enable: true } }), 'ksm.enable', /unknown key/, /ksm\.enabled, ksm\.scan_interval, ksm\.containers/);
    assertConfigError(() => loadFile({ api: { addr: ':1' } }), 'api.addr', /unknown key/, /api\.address/);
    assertConfigError(() => loadConfig({ env: { CONFIG: configFile('{"__proto__": {"root": "/x"}}') } }), '__proto__', /unknown key/);
  });

  test('wrong types name the key and the expected form', () => {
    assertConfigError(() => loadFile({ use_erofs: 'yes' }), 'use_erofs', /expected true or false/, /"yes"/);
    assertConfigError(() => loadFile({ use_fscache: 1 }), 'use_fscache', /expected true or false/);
    assertConfigError(() => loadFile({ ksm: { enabled: null } }), 'ksm.enabled', /expected true or false/);
    assertConfigError(() => loadFile({ ksm: { containers: 'yes' } }), 'ksm.containers', /expected true or false/, /yes/);
    assertConfigError(() => loadFile({ ksm: { scan_interval: '100' } }), 'ksm.scan_interval', /expected an integer from 1 to/);
    assertConfigError(() => loadFile({ ksm: { scan_interval: 1.5 } }), 'ksm.scan_interval', /expected an integer/);
    assertConfigError(() => loadFile({ ksm: { scan_interval: 0 } }), 'ksm.scan_interval', /expected an integer from 1/);
    assertConfigError(() => loadFile({ ksm: true }), 'ksm', /expected an object like/);
    assertConfigError(() => loadFile({ ksm: [] }), 'ksm', /expected an object/);
    assertConfigError(() => loadFile({ api: 'localhost:8080' }), 'api', /expected an object like/);
    assertConfigError(() => loadFile({ api: { address: 8080 } }), 'api.address', /expected "host:port"/);
    assertConfigError(() => loadFile({ api: { address: 'localhost' } }), 'api.address', /expected "host:port"/);
    assertConfigError(() => loadFile({ api: { address: 'h:99999' } }), 'api.address', /expected "host:port"/);
    assertConfigError(() => loadFile({ root: 42 }), 'root', /expected an absolute path/);
    assertConfigError(() => loadFile({ address: ['/a'] }), 'address', /expected an absolute path/);
    assertConfigError(() => loadFile({ version: 2 }), 'version', /expected 1/);
    assertConfigError(() => loadFile({ version: '1' }), 'version', /expected 1/);
  });

  test('conversion keys: chunk_size, mkfs_erofs and mount_backend are read and checked', () => {
    const c = loadFile({ chunk_size: 65536, mkfs_erofs: '/opt/erofs/bin/mkfs.erofs', mount_backend: 'loop' });
    assert.equal(c.chunk_size, 65536);
    assert.equal(c.mkfs_erofs, '/opt/erofs/bin/mkfs.erofs');
    assert.equal(c.mount_backend, 'loop');
    assert.equal(defaultConfig().chunk_size, 1 << 20);
    assert.equal(defaultConfig().mount_backend, 'auto');
    for (const bad of [4095, 65537, 1 << 31, '1M', 0]) {
      assertConfigError(() => loadFile({ chunk_size: bad }), 'chunk_size', /expected a power of two from 4096 to 1073741824/);
    }
    assertConfigError(() => loadFile({ mkfs_erofs: 'bin/mkfs.erofs' }), 'mkfs_erofs', /or an absolute path/);
    assertConfigError(() => loadFile({ mkfs_erofs: '' }), 'mkfs_erofs', /expected a program name/);
    assertConfigError(() => loadFile({ mount_backend: 'fuse' }), 'mount_backend', /expected one of auto, file-backed, loop/);
  });

  test('registry keys: plain_http_hosts, docker_config, config_path, push_converted and pull_converted are read and checked', () => {
    assert.deepEqual(defaultConfig().registry, {
      plain_http_hosts: [],
      docker_config: null,
      config_path: ['/etc/containerd/certs.d', '/etc/docker/certs.d'],
      push_converted: false,
      pull_converted: false,
      fetch_layers: true,
    });
    assert.deepEqual(loadFile({ registry: { config_path: '/etc/containerd/certs.d:/srv/certs.d' } }).registry.config_path, ['/etc/containerd/certs.d', '/srv/certs.d']);
    assert.deepEqual(loadFile({ registry: { config_path: '' } }).registry.config_path, [], '"" reads no host directory');
    assertConfigError(() => loadFile({ registry: { config_path: 'certs.d' } }), 'registry.config_path', /expected absolute directories/);
    assertConfigError(() => loadFile({ registry: { config_path: ['/etc/containerd/certs.d'] } }), 'registry.config_path', /separated by ":"/);
    const c = loadFile({ registry: { plain_http_hosts: ['127.0.0.1:5000', 'registry.local', '[::1]:5000'], docker_config: '/etc/dedup-snapshotter/docker.json' } });
    assert.deepEqual(c.registry.plain_http_hosts, ['127.0.0.1:5000', 'registry.local', '[::1]:5000']);
    assert.equal(c.registry.docker_config, '/etc/dedup-snapshotter/docker.json');
    for (const bad of ['127.0.0.1:5000', ['http://x'], ['a b'], [1]]) {
      assertConfigError(() => loadFile({ registry: { plain_http_hosts: bad } }), 'registry.plain_http_hosts', /expected a list of "host" or "host:port"/);
    }
    assertConfigError(() => loadFile({ registry: { docker_config: 'docker.json' } }), 'registry.docker_config', /absolute path/);
    const shared = loadFile({ registry: { push_converted: true, pull_converted: true } });
    assert.deepEqual([shared.registry.push_converted, shared.registry.pull_converted], [true, true]);
    assertConfigError(() => loadFile({ registry: { push_converted: 'yes' } }), 'registry.push_converted', /expected true or false/);
    assertConfigError(() => loadFile({ registry: { pull_converted: 1 } }), 'registry.pull_converted', /expected true or false/);
    assertConfigError(() => loadFile({ registry: { insecure: true } }), 'registry.insecure', /unknown key/);
  });

  test('integrity keys: scrub pace and interval, store layout and segments per layer are read and checked', () => {
    assert.deepEqual(defaultConfig().integrity, { scrub_mbps: 20, scrub_interval_minutes: 1440, store_layout: 'auto', segments_per_layer: 32 });
    assert.deepEqual(loadFile({ integrity: { scrub_mbps: 5, scrub_interval_minutes: 0 } }).integrity, { scrub_mbps: 5, scrub_interval_minutes: 0, store_layout: 'auto', segments_per_layer: 32 });
    assert.deepEqual(loadFile({ integrity: { store_layout: 'segments', segments_per_layer: 4 } }).integrity, { scrub_mbps: 20, scrub_interval_minutes: 1440, store_layout: 'segments', segments_per_layer: 4 });
    assertConfigError(() => loadFile({ integrity: { scrub_mbps: 0 } }), 'integrity.scrub_mbps', /integer from 1 to 100000/);
    assertConfigError(() => loadFile({ integrity: { scrub_interval_minutes: -1 } }), 'integrity.scrub_interval_minutes', /integer from 0 to 525600/);
    assertConfigError(() => loadFile({ integrity: { store_layout: 'sealed' } }), 'integrity.store_layout', /one of auto, single, segments/);
    assertConfigError(() => loadFile({ integrity: { segments_per_layer: 0 } }), 'integrity.segments_per_layer', /integer from 1 to 128/);
    assertConfigError(() => loadFile({ integrity: { verity: true } }), 'integrity.verity', /unknown/);
    assertConfigError(() => loadFile({ integrity: 'daily' }), 'integrity', /expected an object/);
  });

  test('disk_reserve_mb (issue 12 item 6): 0 to 1024, default 8', () => {
    assert.equal(defaultConfig().disk_reserve_mb, 8);
    assert.equal(loadFile({ disk_reserve_mb: 0 }).disk_reserve_mb, 0);
    assert.equal(loadFile({ disk_reserve_mb: 64 }).disk_reserve_mb, 64);
    assertConfigError(() => loadFile({ disk_reserve_mb: 2048 }), 'disk_reserve_mb', /integer from 0 to 1024/);
    assertConfigError(() => loadFile({ disk_reserve_mb: '8M' }), 'disk_reserve_mb', /integer from 0 to 1024/);
  });

  test('prefetch queue limits (issue 12 item 5): max_queued_jobs, max_queued_entries, max_queued_bytes, keep_finished are read and checked', () => {
    assert.deepEqual(defaultConfig().prefetch, { trace_dir: null, concurrency: 2, max_queued_jobs: 64, max_queued_entries: 1_000_000, max_queued_bytes: 256 << 20, keep_finished: 1000 });
    const c = loadFile({ prefetch: { max_queued_jobs: 4, max_queued_entries: 5000, max_queued_bytes: 1 << 20, keep_finished: 0 } });
    assert.deepEqual(c.prefetch, { trace_dir: null, concurrency: 2, max_queued_jobs: 4, max_queued_entries: 5000, max_queued_bytes: 1 << 20, keep_finished: 0 });
    assertConfigError(() => loadFile({ prefetch: { max_queued_jobs: 0 } }), 'prefetch.max_queued_jobs', /integer from 1 to 10000/);
    assertConfigError(() => loadFile({ prefetch: { max_queued_entries: 1e9 } }), 'prefetch.max_queued_entries', /integer from 1 to 10000000/);
    assertConfigError(() => loadFile({ prefetch: { max_queued_bytes: 1000 } }), 'prefetch.max_queued_bytes', /integer from 1048576/);
    assertConfigError(() => loadFile({ prefetch: { keep_finished: -1 } }), 'prefetch.keep_finished', /integer from 0 to 100000/);
    assertConfigError(() => loadFile({ prefetch: { max_jobs: 3 } }), 'prefetch.max_jobs', /unknown key/);
  });

  test('ondemand keys: backend, attempts, prefetch, prefetch_mbps, prefetch_concurrency and settle are read and checked', () => {
    assert.deepEqual(defaultConfig().ondemand, { backend: 'auto', attempts: 2, prefetch: 'none', prefetch_mbps: 0, prefetch_concurrency: 1, settle: true });
    const c = loadFile({ ondemand: { backend: 'fetch', attempts: 5, prefetch: 'all', prefetch_mbps: 200, prefetch_concurrency: 4, settle: false } });
    assert.deepEqual(c.ondemand, { backend: 'fetch', attempts: 5, prefetch: 'all', prefetch_mbps: 200, prefetch_concurrency: 4, settle: false });
    assertConfigError(() => loadFile({ ondemand: { prefetch_concurrency: 0 } }), 'ondemand.prefetch_concurrency', /integer from 1 to 16/);
    assertConfigError(() => loadFile({ ondemand: { settle: 'yes' } }), 'ondemand.settle', /expected true or false/);
    assert.equal(loadFile({ ondemand: { prefetch: 'list' } }).ondemand.prefetch, 'list');
    assertConfigError(() => loadFile({ ondemand: { prefetch: 'some' } }), 'ondemand.prefetch', /expected "none", "list" or "all"/);
    assertConfigError(() => loadFile({ ondemand: { prefetch_mbps: -1 } }), 'ondemand.prefetch_mbps', /integer from 0/);
    assert.equal(loadFile({ ondemand: { backend: 'fanotify' } }).ondemand.backend, 'fanotify');
    assert.equal(loadFile({ ondemand: { backend: 'fscache' } }).ondemand.backend, 'fscache');
    assertConfigError(() => loadFile({ ondemand: { backend: 'fuse' } }), 'ondemand.backend', /expected one of auto, fscache, fanotify, fetch/);
    assertConfigError(() => loadFile({ ondemand: { attempts: 0 } }), 'ondemand.attempts', /integer from 1 to 20/);
    assertConfigError(() => loadFile({ ondemand: { lazy: true } }), 'ondemand.lazy', /unknown key/);
    assertConfigError(() => loadFile({ ondemand: 'fanotify' }), 'ondemand', /expected an object/);
  });

  test('mount I/O keys: direct_io and read_ahead_kb are read and checked', () => {
    assert.equal(defaultConfig().direct_io, 'auto');
    assert.equal(defaultConfig().read_ahead_kb, 'auto');
    const c = loadFile({ direct_io: false, read_ahead_kb: 4096 });
    assert.equal(c.direct_io, false);
    assert.equal(c.read_ahead_kb, 4096);
    assert.equal(loadFile({ direct_io: true, read_ahead_kb: 'auto' }).direct_io, true);
    for (const bad of ['yes', 1, null]) assertConfigError(() => loadFile({ direct_io: bad }), 'direct_io', /expected "auto", true or false/);
    for (const bad of [-1, 1.5, '8M', (1 << 20) + 1, null]) {
      assertConfigError(() => loadFile({ read_ahead_kb: bad }), 'read_ahead_kb', /expected "auto" or an integer number of KiB from 0 to 1048576/);
    }
  });

  test('a bad log level lists the valid ones', () => {
    assertConfigError(() => loadFile({ log_level: 'verbose' }), 'log_level', /expected one of trace, debug, info, warn, error, fatal, silent/, /"verbose"/);
    assertConfigError(() => loadFile({ log_level: 3 }), 'log_level', /expected one of/);
  });

  test('relative or empty paths are refused', () => {
    assertConfigError(() => loadFile({ root: 'var/lib/dedup' }), 'root', /expected an absolute path such as "\/var\/lib\/x"/, /var\/lib\/dedup/);
    assertConfigError(() => loadFile({ root: './root' }), 'root', /absolute path/);
    assertConfigError(() => loadFile({ root: '' }), 'root', /absolute path/);
    assertConfigError(() => loadFile({ root: '/a\u0000b' }), 'root', /absolute path/);
    assertConfigError(() => loadFile({ address: 'dedup.sock' }), 'address', /absolute path/);
  });

  test('invalid JSON and a non-object document are refused, naming the file', () => {
    const file = configFile('{"root": "/x",}');
    const e = assertConfigError(() => loadConfig({ env: { CONFIG: file } }), '(file)', /is not valid JSON/);
    assert.ok(e.message.includes(file), e.message);
    assertConfigError(() => loadFile(''), '(file)', /not valid JSON: line 1, column 1: Unexpected end of JSON input/);
    // Line and column, the line itself and a caret, not a byte position.
    const trailing = assertConfigError(() => loadFile('{\n  "root": "/x",\n  "log_level": "info",\n}\n'), '(file)', /not valid JSON: line 4, column 1: /);
    assert.ok(!/position/.test(trailing.message), trailing.message);
    assert.match(trailing.message, /\n  \}\n  \^$/);
    assertConfigError(() => loadFile('{\n  "root": "/x"\n  "use_erofs": true\n}'), '(file)', /line 3, column 3: Expected ',' or '\}' after property value\n {4}"use_erofs": true\n {4}\^/);
    assertConfigError(() => loadFile('[]'), '(file)', /expected a JSON object/);
    assertConfigError(() => loadFile('null'), '(file)', /expected a JSON object/);
    assertConfigError(() => loadFile('"root"'), '(file)', /expected a JSON object/);
  });

  test('an explicit CONFIG that does not exist or cannot be read is an error', () => {
    const missing = path.join(tempDir('config-missing'), 'nope.json');
    const e = assertConfigError(() => loadConfig({ env: { CONFIG: missing } }), 'CONFIG', /cannot read/, /ENOENT/);
    assert.ok(e.message.includes(missing), e.message);
    assertConfigError(() => loadConfig({ env: { CONFIG: tempDir('config-dir') } }), 'CONFIG', /cannot read/, /EISDIR/);
  });

  test('the first bad key stops loading even when the environment would override it', () => {
    // A broken file is broken whatever the environment says.
    assertConfigError(() => loadFile({ root: 'relative' }, { ROOT: '/fine' }), 'root', /absolute path/);
  });
});

describe('the daemon binary with a bad configuration', () => {
  function runBinary(
    env: Record<string, string>,
    cwd?: string,
  ): Promise<{ code: number | null; stdout: string; stderr: string }> {
    const dir = tempDir('config-bin');
    return new Promise((resolve, reject) => {
      const p = spawn(process.execPath, [DAEMON_BIN], {
        cwd: cwd ?? dir,
        env: {
          PATH: process.env.PATH ?? '/usr/bin:/bin',
          ROOT: path.join(dir, 'root'),
          ADDRESS: path.join(dir, 'd.sock'),
          ...env,
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      p.stdout.on('data', (b) => (stdout += b));
      p.stderr.on('data', (b) => (stderr += b));
      const timer = setTimeout(() => {
        p.kill('SIGKILL');
        reject(new Error(`daemon did not exit on a bad config:\n${stdout}\n${stderr}`));
      }, 20_000);
      p.on('error', reject);
      p.on('exit', (code) => {
        clearTimeout(timer);
        resolve({ code, stdout, stderr });
      });
    });
  }

  test('a wrong type exits non-zero with the key and the expected form on stderr, before serving', async () => {
    const r = await runBinary({ CONFIG: configFile({ use_erofs: 'yes' }) });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /config: use_erofs: expected true or false, got "yes"/);
    assert.doesNotMatch(r.stdout, /serving containerd snapshots API/);
  });

  test('an unknown key, a missing CONFIG, invalid JSON and a relative ROOT each fail with their message', async () => {
    const cases: [Record<string, string>, RegExp][] = [
      [{ CONFIG: configFile({ ksm: { bogus: 1 } }) }, /config: ksm\.bogus: unknown key/],
      [{ CONFIG: '/nonexistent/dedup/config.json' }, /config: CONFIG: cannot read \/nonexistent\/dedup\/config\.json/],
      [{ CONFIG: configFile('{not json') }, /is not valid JSON/],
      [{ CONFIG: configFile({}), ROOT: 'relative/root' }, /config: ROOT \(environment\): expected an absolute path/],
      [{ CONFIG: configFile({ log_level: 'chatty' }) }, /config: log_level: expected one of trace/],
    ];
    for (const [env, pattern] of cases) {
      const r = await runBinary(env);
      assert.notEqual(r.code, 0, `exit code 0 for ${JSON.stringify(env)}`);
      assert.notEqual(r.code, null, `killed for ${JSON.stringify(env)}`);
      assert.match(r.stderr, pattern);
    }
  });

  test('a refused relative ROOT creates nothing in the working directory', async () => {
    const cwd = tempDir('config-cwd');
    const r = await runBinary({ CONFIG: configFile({}), ROOT: 'relative-root' }, cwd);
    assert.notEqual(r.code, 0);
    assert.deepEqual(fs.readdirSync(cwd), []);
  });
});
