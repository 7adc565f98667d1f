/**
 * Running the daemon without systemd: `dedup-snapshotter start`, `status`,
 * `reload`, `stop`, `restart` with the pid file and the log file, as an
 * operator on a host without systemd does (this machine has none). A
 * daemon started by hand (no pid file) is found by the socket it serves.
 * `dedup-snapshotter mount` mounts a layer image with its chunk store: its
 * files read back (the guide's plain loop mount cannot read file data).
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { runCmd } from './helpers/stack';
import { DAEMON_BIN, call, cleanupDaemons, processAlive, snapshotsClient, startDaemon, tempDir, waitFor } from './helpers/daemon';

after(() => cleanupDaemons());

/** An empty config file: the defaults. */
function noConfig(): string {
  const f = path.join(tempDir('control-cfg'), 'config.json');
  fs.writeFileSync(f, '{}');
  return f;
}

/** Runs a command of bin/dedup-snapshotter (not synchronously: daemons this process started write to its pipes meanwhile). */
async function ctl(args: string[], env: Record<string, string>): Promise<{ code: number | null; out: string }> {
  const r = await runCmd(process.execPath, [DAEMON_BIN, ...args], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env }, timeoutMs: 120_000 });
  return { code: r.code, out: `${r.stdout}${r.stderr}` };
}

const alive = processAlive;

describe('start, status, reload, stop, restart without systemd', () => {
  const dir = tempDir('control');
  const config = path.join(dir, 'config.json');
  fs.writeFileSync(config, JSON.stringify({ convert_mode: 'sync', api: { address: path.join(dir, 'api.sock') } }));
  const env = {
    ROOT: path.join(dir, 'root'),
    ADDRESS: path.join(dir, 'dedup.sock'),
    CONFIG: config,
    PID_FILE: path.join(dir, 'run', 'dedup-snapshotter.pid'),
    LOG_FILE: path.join(dir, 'log', 'dedup-snapshotter.log'),
  };
  let pid = 0;

  after(() => {
    if (pid && alive(pid)) process.kill(pid, 'SIGKILL');
  });

  test('status of a stopped daemon: exit 3, "not running"', async () => {
    const r = await ctl(['status'], env);
    assert.equal(r.code, 3, r.out);
    assert.match(r.out, /dedup-snapshotter is not running/);
  });

  test('start: in the background, pid file written, serving, log appended; a second start says it runs', async () => {
    const r = await ctl(['start'], env);
    assert.equal(r.code, 0, r.out);
    const m = /started dedup-snapshotter \(pid (\d+)\), serving (\S+); log: (\S+)/.exec(r.out);
    assert.ok(m, r.out);
    pid = Number(m[1]);
    assert.equal(m[2], env.ADDRESS);
    assert.equal(fs.readFileSync(env.PID_FILE, 'utf8').trim(), String(pid));
    assert.ok(alive(pid));
    // It serves containerd's API.
    const c = snapshotsClient(env.ADDRESS);
    await call(c, 'Prepare', { key: 'ctl-1', parent: '' });
    c.close();
    const log = fs.readFileSync(env.LOG_FILE, 'utf8');
    assert.match(log, /"op":"prepare"/);
    assert.match(log, /serving containerd snapshots API/);
    const again = await ctl(['start'], env);
    assert.equal(again.code, 0);
    assert.match(again.out, new RegExp(`already running \\(pid ${pid}\\)`));
    const st = await ctl(['status'], env);
    assert.equal(st.code, 0);
    assert.match(st.out, new RegExp(`is running \\(pid ${pid}\\), serving ${env.ADDRESS.replace(/[.]/g, '\\.')}`));
  });

  test('reload: SIGHUP, the daemon logs the reload', async () => {
    fs.writeFileSync(config, JSON.stringify({ convert_mode: 'sync', log_level: 'debug', api: { address: path.join(dir, 'api.sock') } }));
    const r = await ctl(['reload'], env);
    assert.equal(r.code, 0, r.out);
    await waitFor(() => /"op":"reload"/.test(fs.readFileSync(env.LOG_FILE, 'utf8')), 10_000, 'the reload line');
  });

  test('restart: a new pid, the snapshot kept', async () => {
    const r = await ctl(['restart'], env);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, new RegExp(`stopped dedup-snapshotter \\(pid ${pid}\\)`));
    assert.ok(!alive(pid));
    const m = /started dedup-snapshotter \(pid (\d+)\)/.exec(r.out);
    assert.ok(m, r.out);
    pid = Number(m[1]);
    const c = snapshotsClient(env.ADDRESS);
    const info = await call<any>(c, 'Stat', { key: 'ctl-1' });
    c.close();
    assert.equal(info.info.name, 'ctl-1');
  });

  test('stop: SIGTERM, the process gone, the pid file removed; stop again is a no-op', async () => {
    const r = await ctl(['stop'], env);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, new RegExp(`stopped dedup-snapshotter \\(pid ${pid}\\)`));
    assert.ok(!alive(pid));
    assert.ok(!fs.existsSync(env.PID_FILE), 'pid file removed');
    const again = await ctl(['stop'], env);
    assert.equal(again.code, 0);
    assert.match(again.out, /is not running/);
    assert.equal((await ctl(['status'], env)).code, 3);
  });

  test('a bad config is refused before anything starts; a start that fails says why, from the log', async () => {
    fs.writeFileSync(config, '{"use_erofs": "yes"}');
    const bad = await ctl(['start'], env);
    assert.equal(bad.code, 2, bad.out);
    assert.match(bad.out, /use_erofs: expected true or false/);
    fs.writeFileSync(config, '{}');
    const notSocket = path.join(dir, 'not-a-socket');
    fs.writeFileSync(notSocket, 'precious');
    const r = await ctl(['start'], { ...env, ADDRESS: notSocket });
    assert.equal(r.code, 1, r.out);
    assert.match(r.out, /exited at start \(code 1\)/);
    assert.match(r.out, /not a socket/);
    assert.equal(fs.readFileSync(notSocket, 'utf8'), 'precious');
  });
});

test('stop finds a daemon started by hand (no pid file) by the socket it serves', async () => {
  const d = await startDaemon({ convertMode: 'sync' });
  const r = await ctl(['stop'], { ROOT: d.root, ADDRESS: d.address, CONFIG: noConfig(), PID_FILE: path.join(tempDir('control-pid'), 'none.pid') });
  assert.equal(r.code, 0, r.out);
  assert.match(r.out, new RegExp(`stopped dedup-snapshotter \\(pid ${d.proc.pid}\\)`));
  assert.equal(await d.exited, 0);
});

test('dedup-snapshotter mount: a layer image with its chunk store, read-only; the files read back', async () => {
  const d = await startDaemon({ convertMode: 'sync' });
  const target = path.join(tempDir('control-mount'), 'test-mount');
  fs.mkdirSync(target);
  try {
    const c = snapshotsClient(d.address);
    const mounts = await call<any>(c, 'Prepare', { key: 'active', parent: '' });
    const upper = mounts.mounts[0].source as string;
    const data = Buffer.alloc(3 * 1024 * 1024, 7);
    fs.mkdirSync(path.join(upper, 'app'));
    fs.writeFileSync(path.join(upper, 'app', 'data.bin'), data);
    fs.writeFileSync(path.join(upper, 'hello.txt'), 'hello\n');
    await call(c, 'Commit', { name: 'layer', key: 'active' });
    c.close();
    const images = fs.readdirSync(path.join(d.root, 'images')).filter((n) => n.endsWith('.erofs'));
    assert.equal(images.length, 1);
    const image = path.join(d.root, 'images', images[0]);
    const env = { ROOT: d.root, ADDRESS: d.address, CONFIG: noConfig() };
    const r = await ctl(['mount', image, target], env);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, new RegExp(`mounted layer \\d+ \\(${image.replace(/[.]/g, '\\.')} with \\S+chunks\\.blob\\) read-only`));
    assert.equal(fs.readFileSync(path.join(target, 'hello.txt'), 'utf8'), 'hello\n');
    assert.ok(fs.readFileSync(path.join(target, 'app', 'data.bin')).equals(data), 'file data reads back through the store');
    assert.throws(() => fs.writeFileSync(path.join(target, 'new'), 'x'), /EROFS/);
    const twice = await ctl(['mount', image, target], env);
    assert.equal(twice.code, 1);
    assert.match(twice.out, /mounted on .* already/);
    execFileSync('umount', [target]);
    const wrong = await ctl(['mount', '/etc/passwd', target], env);
    assert.equal(wrong.code, 2);
    assert.match(wrong.out, /is not a layer image of ROOT/);
    const none = await ctl(['mount', '99999', target], env);
    assert.equal(none.code, 1);
    assert.match(none.out, /has no layer 99999/);
  } finally {
    spawnSync('umount', [target]);
    await d.stop();
  }
});
