/**
 * scripts/install.sh and scripts/uninstall.sh on a host without systemd
 * (this machine), with every path in a temp dir, next to a second,
 * unrelated containerd (its own socket and config) that must keep running
 * untouched: install restarts only the containerd serving CONTAINERD_SOCKET,
 * which then lists the plugin and pulls and runs an image through it;
 * uninstall --purge leaves no process, mount, file or config section of
 * the project, names the images that used it, and a second run finds
 * nothing left to do. DEDUP_CONTAINERD=2 runs it all on containerd 2.x
 * (test/helpers/containerd-builds.ts) with a version 3 config: install.sh
 * then finds 2.x and adds the transfer service's unpack_config entries.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { platformOf } from '../src/containerd/config-toml';
import { listenerOf } from '../src/util/proc';
import { processAlive, tempDir, waitFor } from './helpers/daemon';
import { atLeast, defaultContainerd, programOf } from './helpers/containerd-builds';
import { RegistryClient } from '../src/remote/registry';
import { convertForTest } from './helpers/dedup';
import { buildImage, busyboxImageDef, pushImage } from './helpers/images';
import { type RealRegistry, startRegistry } from './helpers/registry';
import { runCmd } from './helpers/stack';

const REPO = path.resolve(__dirname, '..', '..');

/** The containerd the test runs (the system's unless DEDUP_CONTAINERD names another build). */
const BUILD = defaultContainerd();

/** A config of the build's own version: 2 for 1.6/1.7, 3 for 2.x (with CRI's 2.x plugins left out too). */
function containerdConfig(dir: string): string {
  const q = (s: string) => JSON.stringify(s);
  const v3 = BUILD.major >= 2;
  const cri = v3 ? ['io.containerd.grpc.v1.cri', 'io.containerd.cri.v1.runtime', 'io.containerd.cri.v1.images', 'io.containerd.podsandbox.controller.v1.podsandbox', 'io.containerd.sandbox.controller.v1.shim'] : ['io.containerd.grpc.v1.cri'];
  const disabled = [...cri, 'io.containerd.snapshotter.v1.btrfs', 'io.containerd.snapshotter.v1.zfs', 'io.containerd.snapshotter.v1.devmapper', 'io.containerd.snapshotter.v1.aufs'];
  return [
    `version = ${v3 ? 3 : 2}`,
    `root = ${q(path.join(dir, 'root'))}`,
    `state = ${q(path.join(dir, 'state'))}`,
    `disabled_plugins = [${disabled.map(q).join(', ')}]`,
    '',
    '[grpc]',
    `  address = ${q(path.join(dir, 'c.sock'))}`,
    '',
    '[ttrpc]',
    `  address = ${q(path.join(dir, 'c.sock.ttrpc'))}`,
    '',
    v3 ? "[plugins.'io.containerd.internal.v1.opt']" : '[plugins."io.containerd.internal.v1.opt"]',
    `  path = ${q(path.join(dir, 'opt'))}`,
    '',
  ].join('\n');
}

/** The pid of the process listening on unix socket `sock`, or null. */
const listener = listenerOf;

const alive = processAlive;

const sha = (f: string) => crypto.createHash('sha256').update(fs.readFileSync(f)).digest('hex');

describe('install.sh and uninstall.sh without systemd, beside an unrelated containerd', () => {
  const t = tempDir('inst');
  const c1 = path.join(t, 'c1');
  const c2 = path.join(t, 'c2');
  const env: Record<string, string> = {
    // The build's containerd, ctr and shim first: install.sh asks and restarts that containerd.
    PATH: [...(BUILD.bin ? [BUILD.bin] : []), process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin'].join(':'),
    PREFIX: path.join(t, 'opt', 'dedup-snapshotter'),
    BIN_LINK: path.join(t, 'bin', 'dedup-snapshotter'),
    CONFIG_DIR: path.join(t, 'etc'),
    CONTAINERD_CONFIG: path.join(c1, 'config.toml'),
    CONTAINERD_SOCKET: path.join(c1, 'c.sock'),
    SOCKET: path.join(t, 'dedup.sock'),
    ROOT: path.join(t, 'root'),
    PID_FILE: path.join(t, 'run', 'dedup.pid'),
    LOG_FILE: path.join(t, 'log', 'dedup.log'),
    CONTAINERD_PID_FILE: path.join(t, 'run', 'containerd.pid'),
    CONTAINERD_LOG: path.join(t, 'log', 'containerd.log'),
    INIT_DIR: path.join(t, 'init.d'),
    // KSM's flag for dedup-runc, here and not in the host's /run.
    DEDUP_KSM_FLAG: path.join(t, 'run', 'ksm', 'ksm-containers'),
    INSTALL_INIT: 'yes',
    USE_SYSTEMD: 'no',
  };
  const procs: ChildProcess[] = [];
  let registry: RealRegistry;
  let ref = '';
  let dedupRef = '';
  let dedupLayers: string[] = [];
  let other = 0;

  const startContainerd = async (dir: string) => {
    const p = spawn(programOf(BUILD, 'containerd'), ['--config', path.join(dir, 'config.toml')], { stdio: 'ignore', env: { ...process.env, PATH: env.PATH } });
    procs.push(p);
    await waitFor(async () => (await runCmd(programOf(BUILD, 'ctr'), ['--address', path.join(dir, 'c.sock'), 'version'])).code === 0, 30_000, `containerd on ${dir}`);
    return p.pid as number;
  };
  const script = (name: string, args: string[]) => runCmd('bash', [path.join(REPO, 'scripts', name), ...args], { env, timeoutMs: 300_000 });
  const ctr1 = (args: string[]) => runCmd(programOf(BUILD, 'ctr'), ['--address', env.CONTAINERD_SOCKET, ...args], { timeoutMs: 120_000 });

  before(async () => {
    for (const d of [c1, c2]) {
      fs.mkdirSync(d, { recursive: true });
      fs.writeFileSync(path.join(d, 'config.toml'), containerdConfig(d));
    }
    // The operator's own settings: kept by install (no 127.0.0.1:8080 here).
    registry = await startRegistry();
    fs.mkdirSync(env.CONFIG_DIR, { recursive: true });
    fs.writeFileSync(
      path.join(env.CONFIG_DIR, 'config.json'),
      JSON.stringify({ api: { address: path.join(t, 'api.sock') }, ksm: { enabled: true, containers: true }, registry: { plain_http_hosts: [registry.host] } }),
    );
    await startContainerd(c1);
    other = await startContainerd(c2);
    const img = await buildImage(busyboxImageDef());
    ref = await pushImage(img, registry.host, t);
    // The same image as a dedup image, for the lazy pull.
    const client = new RegistryClient({ plainHttpHosts: [registry.host] });
    try {
      dedupRef = `${registry.host}/dedup/busybox:v1`;
      dedupLayers = (await convertForTest(client, ref, dedupRef, t)).layers.map((l) => l.digest);
    } finally {
      client.close();
    }
  });

  after(async () => {
    // Whatever is left (a failed run): the daemon, the containerds, by pid.
    for (const sock of [env.SOCKET, env.CONTAINERD_SOCKET, path.join(c2, 'c.sock')]) {
      const pid = listener(sock);
      if (pid) process.kill(pid, 'SIGKILL');
    }
    for (const p of procs) if (p.exitCode === null) p.kill('SIGKILL');
    await runCmd('bash', ['-c', `grep -o ' ${t}/[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l`]);
    await registry?.stop();
  });

  test('install: only the containerd on CONTAINERD_SOCKET restarted, the plugin listed ok, an image pulled and run through it', async () => {
    const before1 = listener(env.CONTAINERD_SOCKET);
    const otherConfig = sha(path.join(c2, 'config.toml'));
    const r = await script('install.sh', ['--no-apt', '--no-build']);
    assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, new RegExp(`restarting the containerd serving ${env.CONTAINERD_SOCKET} \\(pid ${before1}`));
    assert.match(r.stdout, /containerd sees the dedup snapshotter/);
    assert.match(r.stdout, /keeping existing .*config\.json/);
    assert.ok(before1 !== null && !alive(before1), 'the old containerd on CONTAINERD_SOCKET stopped');
    const now1 = listener(env.CONTAINERD_SOCKET);
    assert.ok(now1 && now1 !== before1);
    assert.equal(fs.readFileSync(env.CONTAINERD_PID_FILE, 'utf8').trim(), String(now1));
    assert.ok(alive(other), 'the unrelated containerd keeps running');
    assert.equal(listener(path.join(c2, 'c.sock')), other);
    assert.equal(sha(path.join(c2, 'config.toml')), otherConfig, "the unrelated containerd's config is untouched");
    const daemon = Number(fs.readFileSync(env.PID_FILE, 'utf8').trim());
    assert.equal(listener(env.SOCKET), daemon);
    // ksm.enabled and ksm.containers: the daemon keeps dedup-runc's flag.
    assert.ok(fs.existsSync(env.DEDUP_KSM_FLAG), "dedup-runc's KSM flag is there while the daemon runs");
    assert.ok(fs.readlinkSync(env.BIN_LINK).startsWith(env.PREFIX));
    const ctrdConfig = fs.readFileSync(env.CONTAINERD_CONFIG, 'utf8');
    assert.match(ctrdConfig, /\[proxy_plugins\.dedup\]\n.*\n.*\n {2}\[proxy_plugins\.dedup\.exports\]\n {4}enable_remote_snapshot_annotations = "true"/);
    // containerd 2.x: found by its version, the transfer service told to unpack for dedup (and overlayfs, the file listing none).
    assert.match(r.stdout, new RegExp(`containerd ${BUILD.major}\\.x \\(containerd --version`));
    const unpack = (sn: string) => `[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = "${platformOf()}"\n  snapshotter = "${sn}"`;
    for (const sn of ['dedup', 'overlayfs']) assert.equal(ctrdConfig.includes(unpack(sn)), BUILD.major >= 2, `${sn}'s unpack_config entry for containerd ${BUILD.version}:\n${ctrdConfig}`);
    // KSM for containers: CRI's runc runtime through the wrapper (this file had no runc table).
    assert.ok(ctrdConfig.includes(`BinaryName = "${env.PREFIX}/bin/dedup-runc"`), ctrdConfig);
    assert.ok(fs.statSync(path.join(env.PREFIX, 'bin', 'dedup-runc')).mode & 0o111, 'the wrapper is executable');
    assert.ok(fs.readdirSync(c1).some((n) => n.startsWith('config.toml.bak-dedup-')), 'a backup of the config');
    const init = await runCmd(path.join(env.INIT_DIR, 'dedup-snapshotter'), ['status']);
    assert.equal(init.code, 0, init.stdout + init.stderr);
    assert.match(init.stdout, new RegExp(`is running \\(pid ${daemon}\\)`));

    await ctr1(['images', 'pull', '--plain-http', '--snapshotter', 'dedup', ref]);
    const run = await ctr1(['run', '--rm', '--snapshotter', 'dedup', ref, 'inst-run', 'cat', '/etc/passwd']);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout, busyboxImageDef().passwd);

    // A dedup image, lazily: on 2.1+ with the guide's own `ctr image pull` (the transfer service
    // passes the labels the install's export asks for), on 1.x and 2.0 through `dedup-snapshotter pull`.
    const lazy =
      atLeast(BUILD, 2, 1)
        ? await ctr1(['images', 'pull', '--plain-http', '--snapshotter', 'dedup', dedupRef])
        : await runCmd(env.BIN_LINK, ['pull', '--plain-http', '--address', env.CONTAINERD_SOCKET, dedupRef], { env: { ...process.env, CONFIG: path.join(env.CONFIG_DIR, 'config.json') } });
    assert.equal(lazy.code, 0, `${lazy.stdout}\n${lazy.stderr}`);
    const content = (await ctr1(['content', 'ls', '-q'])).stdout.split('\n').map((l) => l.trim());
    for (const d of dedupLayers) assert.ok(!content.includes(d), `containerd downloaded no layer blob of the dedup image (${d})`);
    const lazyRun = await ctr1(['run', '--rm', '--snapshotter', 'dedup', dedupRef, 'inst-lazy', 'cat', '/etc/passwd']);
    assert.equal(lazyRun.code, 0, lazyRun.stderr);
    assert.equal(lazyRun.stdout, busyboxImageDef().passwd);

    // Run again (an upgrade): the same outcome, the daemon restarted.
    const again = await script('install.sh', ['--no-apt', '--no-build']);
    assert.equal(again.code, 0, `${again.stdout}\n${again.stderr}`);
    assert.match(again.stdout, /already has \[proxy_plugins\.dedup\]/);
    assert.match(again.stdout, /nothing to add to .*config\.toml: unchanged/);
    assert.ok(alive(other));
  });

  test('uninstall --purge: no process, mount, file or config section left; the image named; a second run is a no-op', async () => {
    const daemon = Number(fs.readFileSync(env.PID_FILE, 'utf8').trim());
    const r = await script('uninstall.sh', ['--purge']);
    const logTail = () => (fs.existsSync(env.LOG_FILE) ? fs.readFileSync(env.LOG_FILE, 'utf8').split('\n').slice(-40).join('\n') : '(no log)');
    assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}\n--- the daemon's log ---\n${logTail()}`);
    const listed = r.stdout.split('images on the dedup snapshotter')[1] ?? '';
    for (const image of [ref, dedupRef]) assert.ok(listed.split('\n').some((l) => l.trim() === `default\t${image}`), `uninstall names ${image}:\n${r.stdout}`);
    assert.ok(!alive(daemon), 'the daemon stopped');
    const mountinfo = fs.readFileSync('/proc/self/mountinfo', 'utf8');
    assert.ok(!mountinfo.includes(env.ROOT), 'nothing mounted under ROOT');
    for (const gone of [env.PREFIX, env.BIN_LINK, env.CONFIG_DIR, env.LOG_FILE, env.PID_FILE, env.CONTAINERD_PID_FILE, env.SOCKET, env.ROOT, path.join(env.INIT_DIR, 'dedup-snapshotter'), path.dirname(env.DEDUP_KSM_FLAG)]) {
      assert.ok(!fs.existsSync(gone), `${gone} removed`);
    }
    assert.doesNotMatch(fs.readFileSync(env.CONTAINERD_CONFIG, 'utf8'), /proxy_plugins|"dedup"|dedup-snapshotter\.sock|dedup-runc|unpack_config/);
    // containerd restarted without the plugin: it answers at once, without a dial timeout.
    const plugins = await ctr1(['plugins', 'ls']);
    assert.doesNotMatch(plugins.stdout, /dedup/);
    const started = Date.now();
    const run = await ctr1(['run', '--rm', '--snapshotter', 'dedup', ref, 'inst-run-2', 'true']);
    assert.notEqual(run.code, 0);
    assert.ok(Date.now() - started < 10_000, `ctr run --snapshotter=dedup fails at once (${Date.now() - started} ms): ${run.stderr}`);
    assert.ok(alive(other), 'the unrelated containerd keeps running');
    assert.equal(listener(path.join(c2, 'c.sock')), other);
    const ps = await runCmd('ps', ['-eo', 'pid,args']);
    assert.doesNotMatch(ps.stdout, new RegExp(t.replace(/[.]/g, '\\.') + '.*(dedup-snapshotter|ondemand-holder)'));

    const again = await script('uninstall.sh', ['--purge']);
    assert.equal(again.code, 0, `${again.stdout}\n${again.stderr}`);
    assert.match(again.stdout, /dedup-snapshotter is uninstalled/);
    assert.ok(alive(other));
  });
});
