/**
 * The operator's surface against the real daemon: the HTTP API (/stats,
 * /metrics, /healthz, /prefetch) with good and bad input, the audit log
 * (ROOT/audit.db, read with the guide's sqlite3 query), KSM on the real
 * sysfs, systemd's notify protocol, and SIGHUP config reload.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { UnixDatagramReceiver } from '../native/socket';
import { setXattr } from '../native/xattr';
import { AuditLog } from '../src/audit/audit';
import { Ksm } from '../src/ksm/ksm';
import { type DaemonProcess, call, cleanupDaemons, snapshotsClient, startDaemon, tempDir, waitFor } from './helpers/daemon';
import { request } from './helpers/http';
import { pseudoRandom } from './helpers/images';

const MiB = 1 << 20;

type Client = ReturnType<typeof snapshotsClient>;

/** Prepares `key` on `parent`, writes files into its upper dir (then runs `extra` on it) and commits it as `name`. */
async function layer(c: Client, name: string, parent: string, files: Record<string, Buffer | string>, extra?: (upper: string) => void): Promise<void> {
  const key = `${name}-active`;
  const { mounts } = await call(c, 'Prepare', { key, parent });
  const upper = mounts[0].type === 'bind' ? mounts[0].source : (mounts[0].options.find((o: string) => o.startsWith('upperdir=')) as string).slice(9);
  for (const [p, data] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(upper, p)), { recursive: true });
    fs.writeFileSync(path.join(upper, p), data);
  }
  extra?.(upper);
  await call(c, 'Commit', { name, key });
}

function auditRows(root: string): any[] {
  const db = new Database(path.join(root, 'audit.db'), { readonly: true });
  try {
    return db.prepare('SELECT * FROM audit_logs ORDER BY id').all();
  } finally {
    db.close();
  }
}

async function waitAudit(root: string, pred: (rows: any[]) => boolean, what: string): Promise<any[]> {
  let rows: any[] = [];
  await waitFor(() => {
    rows = fs.existsSync(path.join(root, 'audit.db')) ? auditRows(root) : [];
    return pred(rows);
  }, 10_000, what);
  return rows;
}

after(() => cleanupDaemons());

describe('HTTP API on a daemon with EROFS layers', () => {
  let d: DaemonProcess;
  let c: Client;
  const shared = pseudoRandom(3 * MiB, 'api-shared');
  let layerId = '';
  let topId = '';

  before(async () => {
    d = await startDaemon({ convertMode: 'sync' });
    c = snapshotsClient(d.address);
    await layer(c, 'sha256:base', '', { 'usr/lib/a.bin': shared, 'etc/os-release': 'ID=test\n', 'bin/link-target': 'x', 'opq/old.txt': 'old\n', 'gone.txt': 'gone\n' }, (u) => {
      fs.symlinkSync('usr/lib', path.join(u, 'lib'));
      fs.symlinkSync('/usr/lib/a.bin', path.join(u, 'etc/alt'));
      fs.symlinkSync('../../../../../../etc/passwd', path.join(u, 'etc/evil'));
      fs.symlinkSync('loop', path.join(u, 'etc/loop'));
    });
    await layer(c, 'sha256:top', 'sha256:base', { 'app/b.bin': shared, 'app/c.txt': 'hello prefetch\n', 'opq/new.txt': 'new\n' }, (u) => {
      execFileSync('mknod', [path.join(u, 'gone.txt'), 'c', '0', '0']);
      setXattr(path.join(u, 'opq'), 'trusted.overlay.opaque', 'y');
    });
    const stats = (await request(d.apiAddress, 'GET', '/stats')).json;
    assert.ok(stats, 'GET /stats answers JSON');
    const imgs = fs.readdirSync(path.join(d.root, 'images')).map((f) => f.replace(/\.erofs$/, '')).sort((a, b) => Number(a) - Number(b));
    [layerId, topId] = imgs;
  });

  test('GET /stats: snapshots, layers, bytes, dedup ratio, chunks, conversions, mounts, process', async () => {
    const r = await request(d.apiAddress, 'GET', '/stats');
    assert.equal(r.status, 200);
    assert.match(String(r.headers['content-type']), /application\/json/);
    const s = r.json;
    assert.deepEqual(s.snapshots, { active: 0, view: 0, committed: 2, total: 2 });
    assert.deepEqual(s.layers, { total: 2, erofs: 2, directory: 0, converting: 0 });
    const logical = 2 * shared.length + 'ID=test\n'.length + 1 + 'old\n'.length + 'gone\n'.length + 'hello prefetch\n'.length + 'new\n'.length;
    assert.equal(s.bytes.logical, logical);
    // The 3 MiB file is stored once: stored is about half of logical.
    assert.ok(s.bytes.stored >= shared.length && s.bytes.stored < shared.length + 64 * 1024, `stored ${s.bytes.stored}`);
    assert.equal(s.bytes.saved, logical - s.bytes.stored);
    assert.ok(s.dedup_ratio > 1.9 && s.dedup_ratio < 2.1, `ratio ${s.dedup_ratio}`);
    assert.ok(s.chunks.total > s.chunks.unique && s.chunks.unique >= 3, JSON.stringify(s.chunks));
    assert.equal(s.conversions.count, 2);
    assert.equal(s.conversions.failures, 0);
    assert.equal(s.conversions.bytes, logical);
    assert.ok(s.conversions.p50_ms > 0 && s.conversions.p99_ms >= s.conversions.p50_ms);
    assert.equal(s.mounts.backend, 'file-backed');
    assert.equal(s.mounts.erofs_layers, 2);
    const { backend, ...ondemand } = s.ondemand;
    assert.ok(backend === 'fanotify' || backend === 'fetch', `ondemand.backend: ${backend}`);
    assert.deepEqual(ondemand, { requests: 0, bytes: 0, hits: 0, misses: 0, queue: 0, errors: 0, lazy_layers: 0, incomplete_layers: 0, missing_chunks: 0, prefetch_bytes: 0, settled_layers: 0 });
    assert.equal(s.ksm.enabled, false);
    assert.equal(s.version, JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')).version);
    assert.ok(s.process.rss_bytes > 0 && s.uptime_seconds >= 0);
  });

  test('GET /metrics: Prometheus text with the same figures', async () => {
    const r = await request(d.apiAddress, 'GET', '/metrics');
    assert.equal(r.status, 200);
    assert.match(String(r.headers['content-type']), /^text\/plain; version=0\.0\.4/);
    const s = (await request(d.apiAddress, 'GET', '/stats')).json;
    const value = (name: string) => {
      const m = new RegExp(`^${name.replace(/[{}"=]/g, '\\$&')} (\\S+)$`, 'm').exec(r.body);
      assert.ok(m, `${name} in /metrics`);
      return Number(m[1]);
    };
    assert.equal(value('dedup_snapshots{kind="committed"}'), 2);
    assert.equal(value('dedup_layers{form="erofs"}'), 2);
    assert.equal(value('dedup_logical_bytes'), s.bytes.logical);
    assert.equal(value('dedup_stored_bytes'), s.bytes.stored);
    assert.equal(value('dedup_conversions_total'), 2);
    assert.equal(value('dedup_erofs_mounts{backend="file-backed"}'), 2);
    for (const line of r.body.trim().split('\n')) {
      assert.match(line, /^(# (HELP|TYPE) dedup_\w+ .+|dedup_\w+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[\d.e+]+)$/, `well-formed line: ${line}`);
    }
  });

  test('GET /healthz: 200 when usable, 503 naming the chunk store or the gRPC socket when gone', async () => {
    assert.deepEqual((await request(d.apiAddress, 'GET', '/healthz')).json, { status: 'ok' });
    const blob = path.join(d.root, 'store', 'chunks.blob');
    fs.renameSync(blob, `${blob}.away`);
    try {
      const r = await request(d.apiAddress, 'GET', '/healthz');
      assert.equal(r.status, 503);
      assert.equal(r.json.status, 'unhealthy');
      assert.match(r.json.reason, /chunk store: .*chunks\.blob/);
    } finally {
      fs.renameSync(`${blob}.away`, blob);
    }
    assert.equal((await request(d.apiAddress, 'GET', '/healthz')).status, 200);
    fs.renameSync(d.address, `${d.address}.away`);
    try {
      const r = await request(d.apiAddress, 'GET', '/healthz');
      assert.equal(r.status, 503);
      assert.match(r.json.reason, /gRPC socket .* is gone/);
    } finally {
      fs.renameSync(`${d.address}.away`, d.address);
    }
    assert.equal((await request(d.apiAddress, 'GET', '/healthz')).status, 200);
  });

  test('POST /prefetch with a trace file warms the named files through the layers; GET /prefetch/<id> shows it', async () => {
    const traces = path.join(d.root, 'traces');
    fs.writeFileSync(
      path.join(traces, 'app.trace'),
      ['# a trace: path, or path offset length', '/app/c.txt', 'usr/lib/a.bin 1048576 4096', '/etc/os-release', '/no/such/file', ''].join('\n'),
    );
    const r = await request(d.apiAddress, 'POST', '/prefetch', JSON.stringify({ image_id: 'sha256:top', trace_file: path.join(traces, 'app.trace') }));
    assert.equal(r.status, 202, r.body);
    assert.match(r.json.id, /^[0-9a-f-]{36}$/);
    assert.equal(r.headers.location, `/prefetch/${r.json.id}`);
    assert.equal(r.json.entries, 4);
    let job: any;
    await waitFor(async () => {
      job = (await request(d.apiAddress, 'GET', `/prefetch/${r.json.id}`)).json;
      return job.state === 'done';
    }, 10_000, 'prefetch job done');
    assert.equal(job.files_read, 3);
    assert.equal(job.missing, 1);
    assert.equal(job.bytes_read, 'hello prefetch\n'.length + 4096 + 'ID=test\n'.length);
    assert.deepEqual(job.errors, []);

    // By layer id (as in images/<id>.erofs) and a files list; the base layer has no /app.
    const r2 = await request(d.apiAddress, 'POST', '/prefetch', JSON.stringify({ image_id: layerId, files: ['/usr/lib/a.bin', '/app/c.txt'] }));
    assert.equal(r2.status, 202, r2.body);
    await waitFor(async () => (await request(d.apiAddress, 'GET', `/prefetch/${r2.json.id}`)).json.state === 'done', 10_000, 'second job');
    const j2 = (await request(d.apiAddress, 'GET', `/prefetch/${r2.json.id}`)).json;
    assert.equal(j2.files_read, 1);
    assert.equal(j2.bytes_read, shared.length);
    assert.equal(j2.missing, 1);
    const s = (await request(d.apiAddress, 'GET', '/stats')).json;
    assert.ok(s.prefetch.jobs_done >= 2 && s.prefetch.bytes_read >= shared.length);
    assert.ok(topId !== '');
  });

  test('prefetch sees the image as a container does: its symlinks followed inside it, whiteouts and opaque dirs respected', async () => {
    const files = ['/lib/a.bin', '/etc/alt', '/etc/evil', '/etc/loop', '/gone.txt', '/opq/old.txt', '/opq/new.txt', '/usr'];
    const r = await request(d.apiAddress, 'POST', '/prefetch', JSON.stringify({ image_id: 'sha256:top', files }));
    assert.equal(r.status, 202, r.body);
    let job: any;
    await waitFor(async () => {
      job = (await request(d.apiAddress, 'GET', `/prefetch/${r.json.id}`)).json;
      return job.state === 'done';
    }, 10_000, 'symlink job');
    // lib -> usr/lib (relative, a directory) and etc/alt -> /usr/lib/a.bin (absolute: from the image root) are read;
    // etc/evil -> ../../../../../../etc/passwd stops at the image root: the image has no /etc/passwd.
    assert.equal(job.files_read, 3, JSON.stringify(job));
    assert.equal(job.bytes_read, 2 * shared.length + 'new\n'.length);
    assert.equal(job.missing, 3, 'etc/evil, the whited-out gone.txt and opq/old.txt under the opaque dir');
    assert.equal(job.skipped, 1, '/usr is a directory');
    assert.equal(job.errors.length, 1);
    assert.match(job.errors[0], /^\/etc\/loop: more than 40 symlinks/);
  });

  test('the guide\'s curl -d (form content type) is read as JSON', async () => {
    const traces = path.join(d.root, 'traces');
    fs.writeFileSync(path.join(traces, 'curl.trace'), '/etc/os-release\n');
    const body = JSON.stringify({ image_id: 'sha256:base', trace_file: path.join(traces, 'curl.trace') });
    const r = await request(d.apiAddress, 'POST', '/prefetch', body, { 'content-type': 'application/x-www-form-urlencoded' });
    assert.equal(r.status, 202, r.body);
  });

  test('bad prefetch requests get a 4xx naming the problem and change nothing', async () => {
    const traces = path.join(d.root, 'traces');
    fs.writeFileSync(path.join(traces, 'ok.trace'), '/etc/os-release\n');
    fs.symlinkSync('/etc/passwd', path.join(traces, 'out.trace'));
    fs.writeFileSync(path.join(traces, 'bad.trace'), '/etc/os-release\n/a b\n');
    fs.writeFileSync(path.join(traces, 'dots.trace'), '/etc/../../../etc/passwd\n');
    const before = (await request(d.apiAddress, 'GET', '/stats')).json.prefetch;
    const cases: [string, string | Buffer, number, RegExp][] = [
      ['not JSON', '{"image_id": ', 400, /body is not valid JSON/],
      ['an array', '[1,2]', 400, /expected a JSON object/],
      ['no image', JSON.stringify({ trace_file: path.join(traces, 'ok.trace') }), 400, /image_id must be a non-empty string/],
      ['unknown field', JSON.stringify({ image_id: 'sha256:base', files: ['/a'], force: true }), 400, /unknown field "force"/],
      ['both', JSON.stringify({ image_id: 'sha256:base', files: ['/a'], trace_file: path.join(traces, 'ok.trace') }), 400, /either trace_file or files/],
      ['neither', JSON.stringify({ image_id: 'sha256:base' }), 400, /trace_file or files is required/],
      ['files not strings', JSON.stringify({ image_id: 'sha256:base', files: [1] }), 400, /files must be a non-empty array/],
      ['files with ..', JSON.stringify({ image_id: 'sha256:base', files: ['/etc/../x'] }), 400, /files\[0\]: .*contains "\.\."/],
      ['unknown image', JSON.stringify({ image_id: 'sha256:nope', files: ['/a'] }), 404, /no layer "sha256:nope"/],
      ['unknown layer id', JSON.stringify({ image_id: '999999', files: ['/a'] }), 404, /no layer "999999"/],
      ['an active snapshot', JSON.stringify({ image_id: 'never-committed', files: ['/a'] }), 404, /no layer/],
      ['relative trace', JSON.stringify({ image_id: 'sha256:base', trace_file: 'ok.trace' }), 400, /absolute path inside/],
      ['trace outside', JSON.stringify({ image_id: 'sha256:base', trace_file: '/etc/passwd' }), 403, /must be inside/],
      ['trace with ..', JSON.stringify({ image_id: 'sha256:base', trace_file: `${traces}/../audit.db` }), 400, /must not contain "\.\."/],
      ['symlink out', JSON.stringify({ image_id: 'sha256:base', trace_file: path.join(traces, 'out.trace') }), 403, /symlinks out of it are refused/],
      ['missing trace', JSON.stringify({ image_id: 'sha256:base', trace_file: path.join(traces, 'none.trace') }), 404, /does not exist/],
      ['bad trace line', JSON.stringify({ image_id: 'sha256:base', trace_file: path.join(traces, 'bad.trace') }), 400, /trace line 2: expected "path" or "path offset length"/],
      ['trace with ..', JSON.stringify({ image_id: 'sha256:base', trace_file: path.join(traces, 'dots.trace') }), 400, /trace line 1: .*contains "\.\."/],
      ['over 1 MiB', Buffer.alloc(MiB + 10, 0x20), 413, /over 1048576 bytes/],
    ];
    for (const [what, body, status, pattern] of cases) {
      const r = await request(d.apiAddress, 'POST', '/prefetch', body);
      assert.equal(r.status, status, `${what}: ${r.body}`);
      assert.match(r.json?.error ?? '', pattern, what);
    }
    const notFound = await request(d.apiAddress, 'GET', '/prefetch/00000000-0000-0000-0000-000000000000');
    assert.equal(notFound.status, 404);
    assert.equal((await request(d.apiAddress, 'GET', '/prefetch/..%2f..%2fetc')).status, 404);
    assert.equal((await request(d.apiAddress, 'GET', '/nope')).status, 404);
    assert.equal((await request(d.apiAddress, 'DELETE', '/stats')).status, 405);
    assert.equal((await request(d.apiAddress, 'GET', '/prefetch')).status, 405);
    const afterStats = (await request(d.apiAddress, 'GET', '/stats')).json.prefetch;
    assert.equal(afterStats.jobs_done + afterStats.jobs_failed + afterStats.queue, before.jobs_done + before.jobs_failed + before.queue, 'no job was created');
    assert.equal(afterStats.rejected, before.rejected + cases.length);
    assert.equal(afterStats.requests, before.requests + cases.length);
  });

  test('`dedup-snapshotter stats` prints /stats as a table, or as JSON; an unreachable API is an error naming it', async () => {
    const bin = path.join(__dirname, '..', '..', 'bin', 'dedup-snapshotter');
    const table = execFileSync(process.execPath, [bin, 'stats', '--address', d.apiAddress], { encoding: 'utf8' });
    const s = (await request(d.apiAddress, 'GET', '/stats')).json;
    assert.match(table, new RegExp(`dedup ratio +${s.dedup_ratio.toFixed(2)}×`));
    assert.match(table, /layers: EROFS \/ directory \/ converting +2 \/ 0 \/ 0/);
    assert.match(table, /backend +file-backed/);
    assert.match(table, /lazy layers \/ incomplete \/ missing chunks +0 \/ 0 \/ 0/);
    const json = JSON.parse(execFileSync(process.execPath, [bin, 'stats', '--json', '--address', d.apiAddress], { encoding: 'utf8' }));
    assert.equal(json.snapshots.committed, 2);
    // CONFIG names the API address when --address is not given.
    const viaConfig = execFileSync(process.execPath, [bin, 'stats', '--json'], { encoding: 'utf8', env: { ...process.env, CONFIG: path.join(path.dirname(d.apiAddress), 'config-sync.json') } });
    assert.equal(JSON.parse(viaConfig).snapshots.committed, 2);
    const dead = path.join(tempDir('stats-dead'), 'none.sock');
    let failed: { status: number; stderr: string } | null = null;
    try {
      execFileSync(process.execPath, [bin, 'stats', '--address', dead], { encoding: 'utf8', stdio: 'pipe' });
    } catch (err) {
      failed = err as { status: number; stderr: string };
    }
    assert.ok(failed, 'stats against a dead address fails');
    assert.equal(failed.status, 1);
    assert.match(failed.stderr, /cannot reach the API at .*none\.sock/);
  });

  test('audit.db: a row per mutating call and per failure, readable with the guide\'s query', async () => {
    await call(c, 'Prepare', { key: 'ctr-1', parent: 'sha256:top' });
    await call(c, 'View', { key: 'view-1', parent: 'sha256:base' });
    await call(c, 'Remove', { key: 'view-1' });
    await assert.rejects(call(c, 'Prepare', { key: 'ctr-2', parent: 'sha256:missing' }));
    await call(c, 'Cleanup', {});
    const rows = await waitAudit(d.root, (r) => r.some((x) => x.operation === 'cleanup'), 'cleanup row');
    const byOp = (op: string, key?: string) => rows.filter((r) => r.operation === op && (key === undefined || r.key === key));
    const baseId = layerId;
    const [commitBase] = byOp('commit', 'sha256:base');
    assert.equal(commitBase.result, 'ok');
    assert.equal(commitBase.layer_id, baseId);
    assert.equal(commitBase.snapshot_id, baseId);
    assert.equal(JSON.parse(commitBase.details).active_key, 'sha256:base-active');
    const [convertBase] = byOp('convert', 'sha256:base');
    assert.equal(convertBase.layer_id, baseId);
    assert.equal(JSON.parse(convertBase.details).logical_bytes, shared.length + 'ID=test\n'.length + 1 + 'old\n'.length + 'gone\n'.length);
    assert.equal(byOp('prepare', 'ctr-1')[0].result, 'ok');
    assert.ok(byOp('prepare', 'ctr-1')[0].snapshot_id);
    assert.equal(byOp('view', 'view-1')[0].result, 'ok');
    const [rm] = byOp('remove', 'view-1');
    assert.equal(rm.result, 'ok');
    assert.ok(rm.snapshot_id, 'remove names the snapshot it removed');
    assert.equal(rm.layer_id, null);
    const [failed] = byOp('prepare', 'ctr-2');
    assert.equal(failed.result, 'error');
    assert.match(failed.error, /^NotFound: .*sha256:missing/);
    assert.equal(byOp('start')[0].result, 'ok');
    const prefetchRows = byOp('prefetch');
    assert.ok(prefetchRows.some((r) => r.result === 'ok' && JSON.parse(r.details).phase === 'finished'));
    assert.ok(prefetchRows.some((r) => r.result === 'error' && /must be inside/.test(r.error)));
    for (const r of rows) {
      assert.match(r.timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.ok(r.duration_ms === null || r.duration_ms >= 0);
    }
    // The guide's command, as written (with this ROOT).
    const out = execFileSync('sqlite3', [path.join(d.root, 'audit.db'), 'SELECT * FROM audit_logs ORDER BY timestamp DESC LIMIT 10;'], { encoding: 'utf8' });
    const lines = out.trim().split('\n');
    assert.equal(lines.length, 10);
    assert.match(lines[0], /^\d+\|\d{4}-\d\d-\d\dT[^|]+\|cleanup\|/);
  });
});

describe('the API listens where configured', () => {
  test('on a TCP port: the guide\'s curl | jq works; a port in use leaves gRPC serving and logs why', async () => {
    const dir = tempDir('api-tcp');
    const d = await startDaemon({ dir, convertMode: 'sync', apiAddress: '127.0.0.1:0' });
    const apiLine = () => d.logs().find((l) => typeof l.api === 'string' && /^HTTP API on /.test(String(l.msg)));
    await waitFor(() => apiLine() !== undefined, 10_000, 'API log line');
    const addr = String(apiLine()?.api);
    assert.match(addr, /^127\.0\.0\.1:\d+$/);
    const out = execFileSync('sh', ['-c', 'curl -s "http://$1/stats" | jq -r .snapshots.total', 'sh', addr], { encoding: 'utf8' });
    assert.equal(out.trim(), '0');

    const d2 = await startDaemon({ dir: tempDir('api-tcp-busy'), convertMode: 'sync', apiAddress: addr });
    assert.ok(d2.logs().some((l) => l.level === 'error' && /HTTP API not serving on .*EADDRINUSE/.test(String(l.msg))), 'busy port error');
    const c2 = snapshotsClient(d2.address);
    await call(c2, 'Prepare', { key: 'still-works', parent: '' });
    await d2.stop();
    await d.stop();
  });
});

describe('audit log retention', () => {
  test('rows beyond max_rows and older than retention_days are deleted', async () => {
    const dir = tempDir('audit-retention');
    const file = path.join(dir, 'audit.db');
    const a = new AuditLog({ file, retentionDays: 30, maxRows: 100 });
    await a.opened();
    for (let i = 0; i < 350; i++) a.record({ operation: 'prepare', key: `k${i}`, result: 'ok', durationMs: 1 });
    await a.flush();
    await a.close();
    const db = new Database(file);
    const n = (db.prepare('SELECT count(*) AS n FROM audit_logs').get() as { n: number }).n;
    assert.equal(n, 100);
    assert.equal((db.prepare('SELECT key FROM audit_logs ORDER BY id DESC LIMIT 1').get() as { key: string }).key, 'k349', 'the newest rows are kept');
    db.prepare("UPDATE audit_logs SET timestamp = '2000-01-01T00:00:00.000Z' WHERE key IN ('k300', 'k301')").run();
    db.close();
    const b = new AuditLog({ file, retentionDays: 30, maxRows: 100 });
    await b.opened();
    await b.flush();
    await b.close();
    const db2 = new Database(file, { readonly: true });
    assert.equal((db2.prepare("SELECT count(*) AS n FROM audit_logs WHERE key IN ('k300', 'k301')").get() as { n: number }).n, 0);
    assert.equal((db2.prepare('SELECT count(*) AS n FROM audit_logs').get() as { n: number }).n, 98);
    db2.close();
  });

  test('an audit.db that cannot be opened stops the start naming the file', async () => {
    const dir = tempDir('audit-bad');
    fs.mkdirSync(path.join(dir, 'root', 'audit.db'), { recursive: true });
    const d = await startDaemon({ dir, convertMode: 'sync', waitReady: false });
    assert.notEqual(await d.exited, 0);
    assert.match(d.output(), /cannot open audit log .*audit\.db/);
  });
});

describe('KSM', () => {
  const sys = '/sys/kernel/mm/ksm';
  const read = (f: string) => fs.readFileSync(path.join(sys, f), 'utf8').trim();

  test('ksm.enabled sets run and sleep_millisecs on the real sysfs, reports counters, restores at shutdown', { skip: !fs.existsSync(sys) && 'no /sys/kernel/mm/ksm on this machine' }, async () => {
    const before = { run: read('run'), sleep: read('sleep_millisecs') };
    const interval = Number(before.sleep) === 37 ? 41 : 37;
    const d = await startDaemon({ convertMode: 'sync', config: { ksm: { enabled: true, scan_interval: interval } } });
    try {
      assert.equal(read('run'), '1');
      assert.equal(read('sleep_millisecs'), String(interval));
      const s = (await request(d.apiAddress, 'GET', '/stats')).json.ksm;
      assert.equal(s.enabled, true);
      assert.equal(s.state, 'active');
      assert.equal(s.counters.run, 1);
      assert.equal(s.counters.sleep_millisecs, interval);
      for (const k of ['pages_shared', 'pages_sharing', 'pages_unshared', 'full_scans']) assert.equal(typeof s.counters[k], 'number', k);
      const metrics = (await request(d.apiAddress, 'GET', '/metrics')).body;
      assert.match(metrics, /^dedup_ksm_pages_sharing \d+$/m);
      assert.equal(await d.stop(), 0);
    } finally {
      await d.kill();
    }
    assert.equal(read('run'), before.run);
    assert.equal(read('sleep_millisecs'), before.sleep);
  });

  test('no KSM sysfs: one warning and the feature stays off', () => {
    const warnings: string[] = [];
    const logger = { warn: (_o: unknown, m: string) => warnings.push(m), info: () => undefined } as never;
    const k = new Ksm({ enabled: true, scanIntervalMs: 100, sysDir: path.join(tempDir('ksm-none'), 'ksm'), logger });
    k.start();
    assert.equal(k.state, 'unavailable');
    assert.match(k.reason, /does not exist/);
    assert.equal(warnings.length, 1);
    assert.equal(k.counters(), null);
    k.stop();
  });
});

describe('systemd integration', () => {
  test('READY=1 on NOTIFY_SOCKET once the socket serves, STOPPING=1 on SIGTERM', async () => {
    const dir = tempDir('notify');
    const sock = path.join(dir, 'notify.sock');
    const rx = new UnixDatagramReceiver(sock);
    try {
      const d = await startDaemon({ dir, convertMode: 'sync', env: { NOTIFY_SOCKET: sock } });
      const msgs: string[] = [];
      const poll = () => {
        for (let m = rx.tryReceive(); m !== null; m = rx.tryReceive()) msgs.push(m);
      };
      await waitFor(() => (poll(), msgs.some((m) => m.split('\n').includes('READY=1'))), 10_000, 'READY=1');
      const ready = msgs.find((m) => m.includes('READY=1')) as string;
      assert.ok(ready.split('\n').includes(`MAINPID=${d.proc.pid}`), ready);
      // READY means containerd can connect now.
      await call(snapshotsClient(d.address), 'Prepare', { key: 'after-ready', parent: '' });
      assert.equal(await d.stop(), 0);
      poll();
      assert.ok(msgs.some((m) => m.split('\n').includes('STOPPING=1')), msgs.join(' | '));
    } finally {
      rx.close();
    }
  });

  test('the unit file is Type=notify with the guide\'s environment, ordered before containerd', () => {
    const unit = fs.readFileSync(path.join(__dirname, '..', '..', 'systemd', 'dedup-snapshotter.service'), 'utf8');
    for (const line of [
      'Type=notify',
      'Before=containerd.service',
      'Environment=ROOT=/var/lib/containerd/io.containerd.snapshotter.v1.dedup',
      'Environment=ADDRESS=/run/containerd/dedup-snapshotter.sock',
      'Environment=CONFIG=/etc/dedup-snapshotter/config.json',
      'Environment=LOG_LEVEL=info',
      'Restart=always',
      'ExecReload=/bin/kill -HUP $MAINPID',
    ]) {
      assert.ok(unit.split('\n').includes(line), `unit has ${line}`);
    }
  });
});

describe('config reload (SIGHUP)', () => {
  test('log_level and ksm apply at once; other keys are named as needing a restart; a bad file changes nothing', async () => {
    const dir = tempDir('reload');
    const d = await startDaemon({ dir, convertMode: 'sync', env: { LOG_LEVEL: '' } });
    const cfgFile = path.join(dir, 'config-sync.json');
    const cfg = JSON.parse(fs.readFileSync(cfgFile, 'utf8'));
    fs.writeFileSync(cfgFile, JSON.stringify({ ...cfg, log_level: 'warn', chunk_size: 65536 }));
    d.proc.kill('SIGHUP');
    const rows = await waitAudit(d.root, (r) => r.some((x) => x.operation === 'config-reload'), 'reload row');
    const row = rows.find((x) => x.operation === 'config-reload');
    assert.equal(row.result, 'ok');
    assert.deepEqual(JSON.parse(row.details), { applied: ['log_level'], restart_needed: ['chunk_size'] });
    fs.writeFileSync(cfgFile, '{"log_level": "loud"}');
    d.proc.kill('SIGHUP');
    const rows2 = await waitAudit(d.root, (r) => r.filter((x) => x.operation === 'config-reload').length === 2, 'second reload row');
    const bad = rows2.filter((x) => x.operation === 'config-reload')[1];
    assert.equal(bad.result, 'error');
    assert.match(bad.error, /log_level: expected one of/);
    await call(snapshotsClient(d.address), 'Prepare', { key: 'after-reload', parent: '' });
    assert.equal(await d.stop(), 0);
  });
});
