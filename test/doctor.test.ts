/**
 * `dedup-snapshotter doctor` on this machine: each line must say what the
 * machine really has (compared with what the test reads itself: os.release,
 * /proc/filesystems, `mkfs.erofs --version`, /dev/cachefiles, statfs), and
 * each broken setup the test makes (no daemon, a stale socket, containerd's
 * config without the section, a world-writable ROOT, a tiny or full disk, no
 * mkfs.erofs, not root) must come out as a failure naming the fix.
 *
 * The doctor runs in a child `node -e` that requires the compiled
 * src/cmd/doctor.js, so each run has its own environment (ROOT, ADDRESS,
 * CONFIG) and exit code.
 */
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { checkContainerdConfig, checkDisk, checkPermissions } from '../src/doctor/checks';
import { platformOf } from '../src/containerd/config-toml';
import { readContainerdToml } from '../src/containerd/toml-reader';
import type { CheckResult } from '../src/doctor/types';
import { formatResult } from '../src/cmd/doctor';
import { type DaemonProcess, call, cleanupDaemons, snapshotsClient, startDaemon, tempDir } from './helpers/daemon';
import { isMountPoint } from './helpers/mounts';

const DOCTOR_MODULE = path.join(__dirname, '..', 'src', 'cmd', 'doctor.js');
const SCRIPT = 'const [m, ...a] = process.argv.slice(1); require(m).runDoctor(a).then((c) => { process.exitCode = c; });';
const NAMES = ['config', 'kernel', 'erofs', 'mkfs.erofs', 'file-backed', 'fanotify', 'fscache', 'ondemand', 'containerd', 'socket', 'logs', 'images', 'integrity', 'permissions', 'disk', 'reserve', 'ksm'];
const PATH_ENV = process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function doctor(args: string[], env: Record<string, string>, ids?: { uid: number; gid: number }): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['-e', SCRIPT, '--', DOCTOR_MODULE, ...args], {
      env: { PATH: PATH_ENV, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
      ...(ids ?? {}),
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.once('error', reject);
    p.once('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

async function doctorJson(env: Record<string, string>, extra: string[] = [], ids?: { uid: number; gid: number }): Promise<{ run: Run; by: Map<string, CheckResult>; list: CheckResult[] }> {
  const run = await doctor(['--json', ...extra], env, ids);
  let list: CheckResult[];
  try {
    list = JSON.parse(run.stdout) as CheckResult[];
  } catch (err) {
    throw new Error(`doctor --json printed no JSON (exit ${run.code}):\n${run.stdout}\n${run.stderr}`, { cause: err });
  }
  return { run, list, by: new Map(list.map((r) => [r.name, r])) };
}

function get(by: Map<string, CheckResult>, name: string): CheckResult {
  const r = by.get(name);
  assert.ok(r, `no ${name} result`);
  return r;
}

/** Every non-ok result names a fix; the exit code is 1 exactly when something failed. */
function assertShape(list: CheckResult[], run: Run): void {
  assert.deepEqual(
    list.map((r) => r.name),
    NAMES,
  );
  for (const r of list) {
    assert.ok(['ok', 'warn', 'fail', 'skip'].includes(r.status), `${r.name}: status ${r.status}`);
    assert.ok(r.detail.length > 0, `${r.name}: empty detail`);
    if (r.status !== 'ok') assert.ok(r.fix && r.fix.length > 0, `${r.name} is ${r.status} without a fix`);
  }
  assert.equal(run.code, list.some((r) => r.status === 'fail') ? 1 : 0, `exit code vs results:\n${run.stdout}`);
}

function kernelAtLeast(major: number, minor: number): boolean {
  const m = /^(\d+)\.(\d+)/.exec(os.release());
  assert.ok(m, os.release());
  return Number(m[1]) > major || (Number(m[1]) === major && Number(m[2]) >= minor);
}

/** mkfs.erofs in PATH, as the test sees it. */
function mkfsPath(): string | null {
  for (const d of PATH_ENV.split(':')) {
    const p = path.join(d, 'mkfs.erofs');
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return null;
}

/** What `mkfs.erofs --version` prints as the version (1.5 prints its banner and exits 1). */
function mkfsVersionPrinted(bin: string): Promise<string> {
  return new Promise((resolve) => {
    execFile(bin, ['--version'], (_err, stdout, stderr) => {
      const m = /mkfs\.erofs(?:\s+\(erofs-utils\))?\s+(\S+)/.exec(`${stdout}\n${stderr}`);
      assert.ok(m, `mkfs.erofs --version printed no version:\n${stdout}${stderr}`);
      resolve(m[1]);
    });
  });
}

function writeToml(dir: string, name: string, text: string): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, text);
  return f;
}

const goodToml = (address: string) => `version = 2\n\n[plugins]\n  [plugins."io.containerd.grpc.v1.cri"]\n    sandbox_image = "x"\n\n[proxy_plugins]\n  [proxy_plugins.dedup]\n    type = "snapshot"\n    address = ${JSON.stringify(address)}\n`;

const dirs: string[] = [];
function scratch(name: string): string {
  const d = tempDir(`doctor-${name}`);
  dirs.push(d);
  return d;
}

after(async () => {
  await cleanupDaemons();
  for (const d of dirs) {
    for (const m of fs.existsSync(d) ? [d, path.join(d, 'root')] : []) {
      if (isMountPoint(m)) execFileSync('umount', [m]);
    }
    fs.rmSync(d, { recursive: true, force: true });
  }
});

describe('doctor on this machine, with a running daemon', () => {
  let daemon: DaemonProcess;
  let env: Record<string, string>;
  let containerdToml: string;

  before(async () => {
    const dir = scratch('live');
    daemon = await startDaemon();
    const config = path.join(dir, 'config.json');
    fs.writeFileSync(config, JSON.stringify({ version: 1 }));
    env = { ROOT: daemon.root, ADDRESS: daemon.address, CONFIG: config };
    containerdToml = writeToml(dir, 'config.toml', goodToml(daemon.address));
  });

  test('--json: every finding matches what this machine has', async () => {
    const { run, list, by } = await doctorJson(env, ['--containerd-config', containerdToml]);
    assertShape(list, run);

    assert.equal(get(by, 'config').status, 'ok');
    assert.ok(get(by, 'config').detail.includes(`ROOT ${daemon.root}`), get(by, 'config').detail);

    const kernel = get(by, 'kernel');
    assert.ok(kernel.detail.includes(os.release()), kernel.detail);
    assert.equal(kernel.status, kernelAtLeast(6, 12) ? 'ok' : kernelAtLeast(5, 4) ? 'warn' : 'fail');

    const listed = /\berofs\b/.test(fs.readFileSync('/proc/filesystems', 'utf8'));
    assert.equal(get(by, 'erofs').status === 'ok', listed, get(by, 'erofs').detail);

    const mkfs = get(by, 'mkfs.erofs');
    const bin = mkfsPath();
    const fileBacked = get(by, 'file-backed');
    if (bin) {
      const version = await mkfsVersionPrinted(bin);
      assert.ok(mkfs.detail.startsWith(`${version} at `), `${mkfs.detail} should start with "${version} at "`);
      assert.notEqual(mkfs.status, 'fail', mkfs.detail);
      // The mount needs erofs and a kernel with file-backed mounts; this VM has both.
      if (listed && kernelAtLeast(6, 12)) {
        assert.equal(fileBacked.status, 'ok', fileBacked.detail);
        assert.match(fileBacked.detail, /file-backed read-only/);
      }
    } else {
      assert.equal(mkfs.status, 'fail');
      assert.match(mkfs.fix ?? '', /apt-get install erofs-utils/);
      assert.equal(fileBacked.status, 'skip', 'no mkfs.erofs: the mount check must say SKIP, not pass');
    }

    const fanotify = get(by, 'fanotify');
    if (kernelAtLeast(6, 14)) assert.equal(fanotify.status, 'ok', fanotify.detail);
    else assert.equal(fanotify.status, 'warn', fanotify.detail);

    const fscache = get(by, 'fscache');
    if (!fs.existsSync('/dev/cachefiles')) {
      assert.equal(fscache.status, 'warn', fscache.detail);
      assert.match(fscache.detail, /no \/dev\/cachefiles/);
      if (fanotify.status === 'ok') assert.match(fscache.detail, /fanotify pre-content can serve on-demand loading instead/);
    }

    assert.equal(get(by, 'containerd').status, 'ok', get(by, 'containerd').detail);
    const socket = get(by, 'socket');
    assert.equal(socket.status, 'ok', socket.detail);
    assert.match(socket.detail, /NOT_FOUND/);
    // The daemon saw the probe.
    assert.ok(daemon.logs().some((l) => l.key === 'dedup-doctor-probe'), 'the daemon did not log the Stat probe');
    // Where its log lines go: this test's pipe (a socketpair; no systemd here, so no journal).
    const logs = get(by, 'logs');
    assert.equal(logs.status, 'ok');
    assert.match(logs.detail, new RegExp(`the daemon \\(pid ${daemon.proc.pid}\\) writes its log to (pipe|socket):`));

    const perms = get(by, 'permissions');
    assert.equal(perms.status, 'ok', perms.detail);
    assert.match(perms.detail, /mode 0700/);

    const s = fs.statfsSync(daemon.root);
    const pct = (s.bavail / s.blocks) * 100;
    const ipct = s.files > 0 ? (s.ffree / s.files) * 100 : 100;
    const expected = pct < 1 || ipct < 1 ? 'fail' : pct < 10 || s.bavail * s.bsize < 1024 ** 3 || ipct < 10 ? 'warn' : 'ok';
    assert.equal(get(by, 'disk').status, expected, get(by, 'disk').detail);
    // The daemon made ROOT/reserve at start (issue 12 item 6).
    assert.equal(get(by, 'reserve').status, 'ok', get(by, 'reserve').detail);
    assert.match(get(by, 'reserve').detail, /8\.0 MiB held back so snapshots can be removed on a full disk/);

    // Nothing left behind in ROOT or mounted.
    assert.deepEqual(
      fs.readdirSync(daemon.root).filter((n) => n.startsWith('.doctor-')),
      [],
    );
    assert.ok(!fs.readFileSync('/proc/self/mountinfo', 'utf8').includes('.doctor-'), 'a doctor mount was left behind');
  });

  test('text output: one line per check, a fix on every line that is not ok', async () => {
    const run = await doctor(['--containerd-config', containerdToml], env);
    const lines = run.stdout.split('\n').filter((l) => l !== '' && !l.startsWith(' '));
    assert.equal(lines.length, NAMES.length, run.stdout);
    lines.forEach((l, i) => {
      const m = /^(ok|WARN|FAIL|SKIP) +(\S+) +(.*)$/.exec(l);
      assert.ok(m, l);
      assert.equal(m[2], NAMES[i]);
      assert.equal(l.slice(6, 6 + NAMES[i].length), NAMES[i], 'names start in column 7');
      if (m[1] !== 'ok') assert.match(l, / — fix: \S/, l);
      else assert.doesNotMatch(l, / — fix: /, l);
    });
    assert.ok(lines[1].includes(os.release()), lines[1]);
    if (!fs.existsSync('/dev/cachefiles')) assert.match(lines[NAMES.indexOf('fscache')], /^WARN  fscache       no \/dev\/cachefiles/);
    assert.equal(run.code, lines.some((l) => l.startsWith('FAIL')) ? 1 : 0);
  });

  test('containerd config without [proxy_plugins.dedup]: fail with the snippet to add', async () => {
    const dir = scratch('nosection');
    const toml = writeToml(dir, 'config.toml', 'version = 2\n\n[plugins]\n  [plugins."io.containerd.grpc.v1.cri".containerd]\n    snapshotter = "overlayfs"\n# [proxy_plugins.dedup] commented out does not count\n');
    const { run, by } = await doctorJson(env, ['--containerd-config', toml]);
    const r = get(by, 'containerd');
    assert.equal(r.status, 'fail', r.detail);
    assert.equal(run.code, 1);
    assert.match(r.detail, /no \[proxy_plugins\.dedup\] section/);
    const snippet = `[proxy_plugins]\n  [proxy_plugins.dedup]\n    type = "snapshot"\n    address = ${JSON.stringify(daemon.address)}`;
    assert.ok(r.fix?.includes(snippet), `fix should contain\n${snippet}\ngot\n${r.fix}`);
    // The snippet appended to the file makes the check pass.
    fs.appendFileSync(toml, `\n${snippet}\n`);
    const again = await doctorJson(env, ['--containerd-config', toml]);
    assert.equal(get(again.by, 'containerd').status, 'ok', get(again.by, 'containerd').detail);
  });

  test('containerd config variants: quoted, inline, wrong address, wrong type, missing file', () => {
    const dir = scratch('toml');
    const a = daemon.address;
    const ok = (text: string) => checkContainerdConfig(writeToml(dir, 'c.toml', text), a);
    assert.equal(ok(`[proxy_plugins."dedup"]\ntype = "snapshot"\naddress = ${JSON.stringify(a)}\n`).status, 'ok');
    assert.equal(ok(`[ proxy_plugins . 'dedup' ]  # spaced\n  type = 'snapshot'\n  address = '${a}'\n`).status, 'ok');
    assert.equal(ok(`[proxy_plugins]\n  dedup = { type = "snapshot", address = ${JSON.stringify(a)} }\n`).status, 'ok');
    assert.equal(ok(`[proxy_plugins]\ndedup.type = "snapshot"\ndedup.address = ${JSON.stringify(a)}\n`).status, 'ok');
    assert.equal(ok(`imports = [\n  "/etc/x.toml",\n]\ns = """\n[proxy_plugins.nope]\n"""\n[proxy_plugins.dedup]\ntype = "snapshot"\naddress = ${JSON.stringify(a)}\n`).status, 'ok');

    const wrongAddr = ok(`[proxy_plugins.dedup]\n  type = "snapshot"\n  address = "/run/elsewhere.sock"\n`);
    assert.equal(wrongAddr.status, 'fail');
    assert.ok(wrongAddr.detail.includes('/run/elsewhere.sock') && wrongAddr.detail.includes(a), wrongAddr.detail);
    assert.ok(wrongAddr.fix?.includes(`address = ${JSON.stringify(a)}`), wrongAddr.fix);

    const wrongType = ok(`[proxy_plugins.dedup]\n  type = "content"\n  address = ${JSON.stringify(a)}\n`);
    assert.equal(wrongType.status, 'fail');
    assert.match(wrongType.detail, /type "content" instead of "snapshot"/);

    // An existing [proxy_plugins] table: the snippet must not repeat its header (TOML forbids it).
    const other = ok(`[proxy_plugins]\n  [proxy_plugins.other]\n    type = "snapshot"\n    address = ${JSON.stringify(a)}\n`);
    assert.equal(other.status, 'fail');
    assert.match(other.detail, /\[proxy_plugins\.other\] has this address/);
    assert.ok(other.fix && !other.fix.includes('\n[proxy_plugins]\n') && other.fix.includes('[proxy_plugins.dedup]'), other.fix);

    const missing = checkContainerdConfig(path.join(dir, 'absent.toml'), a);
    assert.equal(missing.status, 'fail');
    assert.match(missing.detail, /ENOENT/);
    assert.ok(missing.fix?.includes('[proxy_plugins.dedup]'));

    // The diff service's list (install.sh --diff-service): 1.7 with the differ's table is ok and says how layers unpack;
    // a list naming dedup-differ on 1.6, or without the differ's table, fails (containerd's diff service cannot start).
    const plugin = `[proxy_plugins.dedup]\n  type = "snapshot"\n  address = ${JSON.stringify(a)}\n`;
    const list = '[plugins."io.containerd.service.v1.diff-service"]\n  default = ["dedup-differ", "walking"]\n';
    const differ = `[proxy_plugins.dedup-differ]\n  type = "diff"\n  address = ${JSON.stringify(a)}\n`;
    const v17 = { version: '1.7.24', major: 1, minor: 7 };
    const withList = checkContainerdConfig(writeToml(dir, 'c.toml', `version = 2\n${list}${plugin}${differ}`), a, v17);
    assert.equal(withList.status, 'ok', withList.detail);
    assert.match(withList.detail, /the diff service asks dedup-differ first \(line 3\): layers unpack in one pass/);
    const without = checkContainerdConfig(writeToml(dir, 'c.toml', `version = 2\n${plugin}`), a, v17);
    assert.equal(without.status, 'ok', without.detail);
    assert.match(without.detail, /unpacked into directories and converted afterwards \(in one pass instead: install\.sh --diff-service/);
    const noDiffer = checkContainerdConfig(writeToml(dir, 'c.toml', `version = 2\n${list}${plugin}`), a, v17);
    assert.equal(noDiffer.status, 'fail');
    assert.match(noDiffer.detail, /names "dedup-differ" but there is no \[proxy_plugins\.dedup-differ\]/);
    assert.ok(noDiffer.fix?.includes('type = "diff"'), noDiffer.fix);
    const on16 = checkContainerdConfig(writeToml(dir, 'c.toml', `version = 2\n${list}${plugin}${differ}`), a, { version: '1.6.20', major: 1, minor: 6 });
    assert.equal(on16.status, 'fail');
    assert.match(on16.detail, /containerd 1\.6\.20 has no proxy differs/);

    const facts = readContainerdToml('[proxy_plugins]\n#[proxy_plugins.dedup]\n');
    assert.equal(facts.plugins.size, 0);
    assert.equal(facts.hasProxyPluginsHeader, true);
  });

  test('containerd 2.x: a missing unpack_config entry or export is named with its snippet; the snippets make it pass; CRI without snapshot annotations warns', () => {
    const dir = scratch('toml2');
    const a = daemon.address;
    const v2 = { version: '2.1.9', major: 2 };
    const check = (text: string, v: { version: string; major: number } | null = v2) => checkContainerdConfig(writeToml(dir, 'c.toml', text), a, v);
    const plugin = `[proxy_plugins.dedup]\n  type = "snapshot"\n  address = ${JSON.stringify(a)}\n`;
    const platform = platformOf();

    // The same file is fine for containerd 1.x, in the same words as before.
    const old = check(`version = 2\n${plugin}`, { version: '1.6.20', major: 1 });
    assert.equal(old.status, 'ok', old.detail);
    assert.equal(old.detail, `${dir}/c.toml line 2: [proxy_plugins.dedup] type "snapshot", address ${a}`);

    let text = `version = 3\n${plugin}`;
    const bare = check(text);
    assert.equal(bare.status, 'fail');
    assert.ok(bare.detail.startsWith(`containerd 2.1.9: ${dir}/c.toml has no unpack_config entry for snapshotter "dedup": \`ctr image pull --snapshotter=dedup\` fails with 'no unpack platforms defined'`), bare.detail);
    assert.match(bare.detail, /\[proxy_plugins\.dedup\] \(.* line 2\) does not export enable_remote_snapshot_annotations: dedup images cannot be pulled lazily by ctr/);
    const unpack = (sn: string) => `[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = "${platform}"\n  snapshotter = "${sn}"${sn === 'dedup' ? '\n  differ = "dedup-differ"' : ''}`;
    const differTable = `[proxy_plugins.dedup-differ]\n  type = "diff"\n  address = ${JSON.stringify(a)}`;
    assert.ok(bare.fix?.includes(`${unpack('dedup')}\n\n${unpack('overlayfs')}`), bare.fix);
    assert.ok(bare.fix?.includes(differTable), bare.fix);
    // No containerd binary known: the file's version 3 says 2.x.
    assert.match(check(text, null).detail, /is a version 3 file \(containerd 2\.x\): .* has no unpack_config entry for snapshotter "dedup"/);

    // The fix's snippets, added as they are, make it pass.
    text += `\n${unpack('dedup')}\n\n${unpack('overlayfs')}\n\n${differTable}\n`;
    const noExports = check(text);
    assert.equal(noExports.status, 'fail');
    assert.doesNotMatch(noExports.detail, /unpack_config/);
    text = text.replace(`  address = ${JSON.stringify(a)}\n`, `  address = ${JSON.stringify(a)}\n    [proxy_plugins.dedup.exports]\n      enable_remote_snapshot_annotations = "true"\n`);
    const good = check(text);
    assert.equal(good.status, 'ok', good.detail);
    assert.match(good.detail, /^containerd 2\.1\.9: .* exports enable_remote_snapshot_annotations; unpack_config entry for dedup at line \d+ \(.*, differ dedup-differ\)/);
    // Without the differ (its line, or its table): a warning, with what to add.
    const noDifferLine = check(text.replace('\n  differ = "dedup-differ"', ''));
    assert.equal(noDifferLine.status, 'warn', noDifferLine.detail);
    assert.match(noDifferLine.detail, /the unpack_config entry for "dedup" \(line \d+\) names no differ: layers are unpacked into directories/);
    const noDifferTable = check(text.replace(`${differTable}\n`, ''));
    assert.equal(noDifferTable.status, 'warn', noDifferTable.detail);
    assert.match(noDifferTable.detail, /there is no \[proxy_plugins\.dedup-differ\]/);
    assert.ok(noDifferTable.fix?.includes(differTable), noDifferTable.fix);

    // CRI on dedup. 2.1+: without disable_snapshot_annotations CRI pulls through the transfer
    // service, which passes the labels given the export: lazy. 2.0 (no CRI transfer pull), an explicit
    // true, or use_local_image_pull: lazy only with disable_snapshot_annotations = false.
    const criImages = `${text}[plugins.'io.containerd.cri.v1.images']\n  snapshotter = "dedup"\n`;
    assert.equal(check(criImages).status, 'ok', check(criImages).detail);
    const on20 = check(criImages, { version: '2.0.5', major: 2 });
    assert.equal(on20.status, 'warn');
    assert.match(on20.detail, /CRI uses snapshotter dedup \(.* line \d+\) but disable_snapshot_annotations is true \(the default\) → CRI pulls are not lazy/);
    assert.equal(check(`${criImages}  disable_snapshot_annotations = true\n`).status, 'warn');
    assert.equal(check(`${criImages}  use_local_image_pull = true\n`).status, 'warn');
    assert.equal(check(`${criImages}  disable_snapshot_annotations = false\n`).status, 'ok');

    // A version 2 file read by 2.x: double-quoted names; CRI's table without runtimes is not migrated.
    const v2file = check(`version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "dedup"\n  disable_snapshot_annotations = false\n${plugin}`);
    assert.equal(v2file.status, 'fail');
    assert.ok(v2file.fix?.includes(`[[plugins."io.containerd.transfer.v1.local".unpack_config]]`), v2file.fix);
    assert.match(v2file.detail, /CRI's snapshotter = "dedup" in \[plugins\."io\.containerd\.grpc\.v1\.cri"\.containerd\], which containerd 2\.1\.9 does not read without a runtimes table/);

    // A list without overlayfs: a warning naming it.
    const noOverlay = check(text.replace(`\n\n${unpack('overlayfs')}`, ''));
    assert.equal(noOverlay.status, 'warn');
    assert.match(noOverlay.detail, /unpack_config list has no entry for overlayfs/);

    // A version 3 file for containerd 1.x: it cannot read it.
    assert.match(check(text, { version: '1.7.24', major: 1 }).detail, /^containerd 1\.7\.24 and .* is a version 3 file \(containerd 2\.x's form\): it refuses to start/);
    assert.match(check(text, { version: '1.6.20', major: 1 }).detail, /^containerd 1\.6\.20 and .* is a version 3 file .*: it reads it as version 2, ignoring 2\.x's plugin names/);
    // No file: the version 3 one to create.
    const missing = checkContainerdConfig(path.join(dir, 'absent.toml'), a, v2);
    assert.ok(missing.fix?.includes(`version = 3\n\n${unpack('dedup')}`), missing.fix);
  });

  test('no daemon on ADDRESS: socket fails naming how to start it', async () => {
    const dir = scratch('nosock');
    const address = path.join(dir, 'none.sock');
    const { run, by } = await doctorJson({ ...env, ADDRESS: address }, ['--containerd-config', writeToml(dir, 'c.toml', goodToml(address))]);
    const r = get(by, 'socket');
    assert.equal(r.status, 'fail', r.detail);
    assert.equal(run.code, 1);
    assert.match(r.detail, /no socket at .*none\.sock.*not running/);
    assert.match(r.fix ?? '', /systemctl start dedup-snapshotter/);
    assert.match(r.fix ?? '', /dedup-snapshotter start/);
    assert.ok(r.fix?.includes(`ADDRESS=${address}`), r.fix);
    // The containerd section itself matches this address.
    assert.equal(get(by, 'containerd').status, 'ok');
  });

  test('file leases off: with fanotify the ondemand line warns that loaded layers cannot settle, naming the sysctl', async () => {
    const knob = '/proc/sys/fs/leases-enable';
    const was = fs.readFileSync(knob, 'utf8').trim();
    const before = get((await doctorJson(env)).by, 'ondemand');
    fs.writeFileSync(knob, '0');
    let r: CheckResult;
    try {
      r = get((await doctorJson(env)).by, 'ondemand');
    } finally {
      fs.writeFileSync(knob, was);
    }
    if (!/fanotify pre-content/.test(before.detail)) {
      // Another backend here: leases play no part.
      assert.equal(r.status, before.status);
      return;
    }
    assert.equal(before.status, 'ok', before.detail);
    assert.equal(r.status, 'warn', r.detail);
    assert.match(r.detail, /file leases are off .* cannot settle/);
    assert.match(r.fix ?? '', /sysctl -w fs\.leases-enable=1/);
  });

  test('a daemon killed with -9 leaves a stale socket: fail, ECONNREFUSED, with the fix', async () => {
    const dir = scratch('stale');
    const d = await startDaemon();
    await d.kill();
    assert.ok(fs.lstatSync(d.address).isSocket(), 'kill -9 should leave the socket file');
    const { by } = await doctorJson({ ...env, ROOT: d.root, ADDRESS: d.address }, ['--containerd-config', writeToml(dir, 'c.toml', goodToml(d.address))]);
    const r = get(by, 'socket');
    assert.equal(r.status, 'fail', r.detail);
    assert.match(r.detail, /ECONNREFUSED/);
    assert.match(r.fix ?? '', /systemctl start dedup-snapshotter/);
  });

  test('ROOT with mode 0777: permissions fail naming chmod', async () => {
    const dir = scratch('perm');
    const root = path.join(dir, 'root');
    fs.mkdirSync(root);
    fs.chmodSync(root, 0o777);
    const { run, by } = await doctorJson({ ...env, ROOT: root }, ['--containerd-config', containerdToml]);
    const r = get(by, 'permissions');
    assert.equal(r.status, 'fail', r.detail);
    assert.equal(run.code, 1);
    assert.match(r.detail, /mode 0777; writable by others/);
    assert.ok(r.fix?.includes(`chmod 700 ${root}`), r.fix);
    assert.doesNotMatch(r.fix ?? '', /-R/, 'a recursive chmod would rewrite the modes of files in layers');

    fs.chmodSync(root, 0o770);
    const group = checkPermissions(root, 0);
    assert.equal(group.status, 'warn');
    assert.ok(group.fix?.includes('chmod 700'));

    fs.chmodSync(root, 0o700);
    fs.chownSync(root, 1000, 1000);
    const owner = checkPermissions(root, 0);
    assert.equal(owner.status, 'fail');
    assert.ok(owner.fix?.includes(`chown root:root ${root}`), owner.fix);

    const absent = checkPermissions(path.join(dir, 'not-yet'), 0);
    assert.equal(absent.status, 'warn');
    assert.match(absent.detail, /does not exist yet/);
  });

  test('ROOT on a 2 MiB tmpfs: disk warns, then fails when full; fanotify names the filesystem', async () => {
    const dir = scratch('disk');
    const root = path.join(dir, 'root');
    fs.mkdirSync(root);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m,mode=0700', 'tmpfs', root]);
    try {
      const { by } = await doctorJson({ ...env, ROOT: root }, ['--containerd-config', containerdToml]);
      const disk = get(by, 'disk');
      assert.equal(disk.status, 'warn', disk.detail);
      assert.match(disk.detail, /of 2\.0 MiB/);
      if (mkfsPath() && kernelAtLeast(6, 12)) {
        // Measured on 6.18: EROFS refuses a tmpfs file as a file-backed source (ENOTBLK, errno 15).
        const fb = get(by, 'file-backed');
        assert.equal(fb.status, 'warn', fb.detail);
        assert.match(fb.detail, /refused \(ENOTBLK\): tmpfs cannot back/);
        assert.match(fb.fix ?? '', /ext4/);
      }
      const fan = get(by, 'fanotify');
      if (kernelAtLeast(6, 14)) {
        // tmpfs has no pre-content events: the doctor tests where ROOT lives, not /tmp.
        assert.equal(fan.status, 'warn', fan.detail);
        assert.match(fan.detail, /EOPNOTSUPP, tmpfs/);
      }
      try {
        fs.writeFileSync(path.join(root, 'fill'), Buffer.alloc(4 << 20));
      } catch (err) {
        assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
      }
      const full = checkDisk(root);
      assert.equal(full.status, 'fail', full.detail);
      assert.match(full.fix ?? '', /ctr images rm/);
    } finally {
      execFileSync('umount', [root]);
    }
  });

  test('mkfs.erofs missing: fail with the apt fix, and the mount check says SKIP with the reason', async () => {
    const dir = scratch('nomkfs');
    const config = path.join(dir, 'config.json');
    fs.writeFileSync(config, JSON.stringify({ mkfs_erofs: '/nonexistent/mkfs.erofs' }));
    const { run, list, by } = await doctorJson({ ...env, CONFIG: config }, ['--containerd-config', containerdToml]);
    assertShape(list, run);
    const mkfs = get(by, 'mkfs.erofs');
    assert.equal(mkfs.status, 'fail');
    assert.match(mkfs.detail, /\/nonexistent\/mkfs\.erofs does not exist/);
    assert.match(mkfs.fix ?? '', /apt-get install erofs-utils/);
    const mount = get(by, 'file-backed');
    assert.equal(mount.status, 'skip');
    assert.match(mount.detail, /cannot build a test image: \/nonexistent\/mkfs\.erofs/);
    const text = await doctor(['--containerd-config', containerdToml], { ...env, CONFIG: config });
    assert.match(text.stdout, /^SKIP  file-backed   cannot build a test image/m);
    assert.match(text.stdout, /^FAIL  mkfs\.erofs    .* — fix: apt-get install erofs-utils/m);
  });

  test('as an unprivileged user: the mount check is SKIP and permissions fail (euid)', async () => {
    const dir = scratch('nobody');
    fs.chmodSync(dir, 0o755);
    const config = path.join(dir, 'config.json');
    fs.writeFileSync(config, '{}');
    fs.chmodSync(config, 0o644);
    const toml = writeToml(dir, 'c.toml', goodToml(daemon.address));
    const { run, list, by } = await doctorJson({ ROOT: daemon.root, ADDRESS: daemon.address, CONFIG: config }, ['--containerd-config', toml], { uid: 65534, gid: 65534 });
    assertShape(list, run);
    const mount = get(by, 'file-backed');
    assert.equal(mount.status, 'skip', mount.detail);
    assert.match(mount.detail, /needs root/);
    const perms = get(by, 'permissions');
    assert.equal(perms.status, 'fail');
    assert.match(perms.detail, /running as uid 65534/);
    assert.match(get(by, 'fanotify').detail, /CAP_SYS_ADMIN|EPERM/);
  });

  test('a socket that accepts but never answers: fail after the 3 s deadline, progress on stderr only', async () => {
    const dir = scratch('hang');
    const address = path.join(dir, 'hang.sock');
    const held: net.Socket[] = [];
    const server = net.createServer((c) => void held.push(c));
    await new Promise<void>((resolve) => server.listen(address, resolve));
    try {
      const started = Date.now();
      const run = await doctor(['--containerd-config', writeToml(dir, 'c.toml', goodToml(address))], { ...env, ADDRESS: address });
      assert.ok(Date.now() - started >= 3000, 'the Stat deadline is 3 s');
      assert.match(run.stdout, /^FAIL  socket        .*accepts connections but Stat got no answer within 3 s — fix: check /m);
      // The slow check said what it was doing, on stderr, once it passed a second.
      assert.match(run.stderr, /^doctor: socket: calling Snapshots\.Stat…$/m);
      assert.doesNotMatch(run.stdout, /^doctor:/m);
      for (const l of run.stderr.split('\n').filter((x) => x !== '')) assert.match(l, /^doctor: /);
      assert.equal(run.code, 1);
    } finally {
      for (const c of held) c.destroy();
      await new Promise((resolve) => server.close(resolve));
    }
  });

  test('layer images: valid and mounted is ok; a corrupt one fails naming it; an unmounted one warns', async () => {
    const dir = scratch('images');
    const d = await startDaemon({ dir, convertMode: 'sync' });
    const c = snapshotsClient(d.address);
    const { mounts } = await call(c, 'Prepare', { key: 'layer-active', parent: '' });
    fs.writeFileSync(path.join(mounts[0].source, 'f'), 'layer data\n');
    await call(c, 'Commit', { name: 'layer', key: 'layer-active' });
    const [image] = fs.readdirSync(path.join(d.root, 'images'));
    const id = image.replace(/\.erofs$/, '');
    const ienv = { ROOT: d.root, ADDRESS: d.address, CONFIG: path.join(dir, 'config-sync.json') };
    let r = get((await doctorJson(ienv)).by, 'images');
    assert.equal(r.status, 'ok', r.detail);
    assert.match(r.detail, /^1 layer images in .*: superblocks valid, all mounted/);

    fs.writeFileSync(path.join(d.root, 'images', '999.erofs'), Buffer.alloc(8192, 7));
    r = get((await doctorJson(ienv)).by, 'images');
    assert.equal(r.status, 'fail');
    assert.match(r.detail, /1 of 2 layer images .* are not valid EROFS: 999 \(EROFS image: bad magic/);
    assert.match(r.fix ?? '', /ctr images rm/);
    fs.rmSync(path.join(d.root, 'images', '999.erofs'));

    await d.stop();
    execFileSync('umount', [path.join(d.root, 'mnt', id)]);
    r = get((await doctorJson(ienv)).by, 'images');
    assert.equal(r.status, 'warn');
    assert.match(r.detail, new RegExp(`1 of 1 layer images are not mounted at .*: ${id}$`));
    assert.match(r.fix ?? '', /restart the daemon/);
  });

  test('arguments: --help exits 0, an unknown one 2', async () => {
    const help = await doctor(['--help'], env);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /usage: dedup-snapshotter doctor/);
    const bad = await doctor(['--frobnicate'], env);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /unknown argument "--frobnicate"/);
  });
});

test('formatResult: status and name columns, multi-line fixes indented', () => {
  assert.equal(formatResult({ name: 'kernel', status: 'ok', detail: '6.18' }), 'ok    kernel        6.18');
  assert.equal(
    formatResult({ name: 'containerd', status: 'fail', detail: 'no section', fix: 'add:\n[a]\n  b = 1' }),
    `FAIL  containerd    no section — fix: add:\n${' '.repeat(20)}[a]\n${' '.repeat(20)}  b = 1`,
  );
});
