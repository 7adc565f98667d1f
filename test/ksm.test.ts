/**
 * KSM for containers (ksm.containers, bin/dedup-runc): the wrapper on its
 * own (flag, exec, a failed prctl), the parsers behind /stats and the
 * doctor, and end to end: N containers of one image holding the same 6 MiB
 * in memory, started through plain runc and through the wrapper, with the
 * kernel's figures (ksm_stat, pages_sharing, the cgroups' memory.current)
 * before and after KSM had time to merge.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { readContainerdToml } from '../src/containerd/toml-reader';
import { defaultConfig } from '../src/config/config';
import { checkKsm, probeWrapper } from '../src/doctor/ksm';
import { Ksm } from '../src/ksm/ksm';
import { containerName, parseCgroup, parseKsmStat, readCgroupMemory, rootSnapshotId, wrapperPath } from '../src/ksm/containers';
import { REPO_ROOT, tempDir, waitFor } from './helpers/daemon';
import { daemonStats, request } from './helpers/http';
import { type ImageDef, busyboxImageDef, pseudoRandom } from './helpers/images';
import { Stack, assertNoDaemonErrors } from './helpers/stack';

const WRAPPER = path.join(REPO_ROOT, 'bin', 'dedup-runc');
const SYS = '/sys/kernel/mm/ksm';

function has(bin: string): boolean {
  return spawnSync('sh', ['-c', 'command -v "$1"', 'sh', bin]).status === 0;
}

/** The kernel says ksm_merge_any in /proc/<pid>/ksm_stat (Linux ≥ 6.8). */
const mergeAnyShown = (() => {
  try {
    return /ksm_merge_any/.test(fs.readFileSync('/proc/self/ksm_stat', 'utf8'));
  } catch {
    return false;
  }
})();

/** The compiled form (native/dedup-runc.c), built into `dir` when a C compiler is here; else null. */
function compiledWrapper(dir: string): string | null {
  if (!has('cc')) return null;
  const out = path.join(dir, 'dedup-runc');
  const r = spawnSync('cc', ['-O2', '-Wall', '-Werror', '-o', out, path.join(REPO_ROOT, 'native', 'dedup-runc.c')], { encoding: 'utf8' });
  assert.equal(r.status, 0, `cc native/dedup-runc.c failed:\n${r.stderr}`);
  return out;
}

const wrapperSkip = (!mergeAnyShown && 'SKIP: /proc/self/ksm_stat has no ksm_merge_any (Linux < 6.8 or no CONFIG_KSM)') || false;
const buildDir = tempDir('ksm-wrapper-c');
after(() => fs.rmSync(buildDir, { recursive: true, force: true }));

for (const form of ['perl', 'compiled'] as const) {
  describe(`bin/dedup-runc on its own (${form})`, { skip: wrapperSkip || (form === 'perl' && !has('perl') && 'SKIP: no perl') || (form === 'compiled' && !has('cc') && 'SKIP: no C compiler (cc): the compiled form is optional') }, () => {
    const dir = tempDir('ksm-wrapper');
    const flag = path.join(dir, 'flag');
    let wrapper = WRAPPER;

    /** Runs the wrapper with `prog` in place of runc (under `wrap`, e.g. strace); returns stdout, stderr, status. */
    const runWrapper = (flagFile: string, prog: string, args: string[], wrap: string[] = []): { stdout: string; status: number | null; stderr: string } => {
      const r = spawnSync(wrap.length ? wrap[0] : wrapper, [...wrap.slice(1), ...(wrap.length ? [wrapper] : []), ...args], {
        env: { PATH: process.env.PATH, DEDUP_KSM_FLAG: flagFile, DEDUP_RUNC: prog },
        encoding: 'utf8',
      });
      return { stdout: r.stdout, status: r.status, stderr: r.stderr };
    };

    before(() => {
      if (form === 'compiled') wrapper = compiledWrapper(buildDir) as string;
    });
    after(() => fs.rmSync(dir, { recursive: true, force: true }));

    test('is the file the daemon and the doctor name', { skip: form !== 'perl' && 'the perl script is the one shipped' }, () => {
      assert.equal(wrapperPath(), WRAPPER);
      assert.ok(fs.statSync(WRAPPER).mode & 0o111, 'executable');
    });

    test('without the flag: execs the program with the same arguments, memory not marked', () => {
      fs.rmSync(flag, { force: true });
      const r = runWrapper(flag, '/bin/cat', ['/proc/self/ksm_stat']);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(parseKsmStat(r.stdout).merge_any, false, r.stdout);
    });

    test('with the flag: the program it execs has PR_SET_MEMORY_MERGE, and so do its children after their own execve', () => {
      fs.writeFileSync(flag, '');
      const r = runWrapper(flag, '/bin/sh', ['-c', 'cat /proc/self/ksm_stat; echo ---; sh -c "cat /proc/\\$\\$/ksm_stat"']);
      assert.equal(r.status, 0, r.stderr);
      const [self, child] = r.stdout.split('---');
      assert.equal(parseKsmStat(self).merge_any, true, r.stdout);
      assert.equal(parseKsmStat(child).merge_any, true, r.stdout);
    });

    test('passes arguments through as words and the exit code back', () => {
      fs.writeFileSync(flag, '');
      const r = runWrapper(flag, '/bin/sh', ['-c', 'printf "%s|" "$@"; exit 7', 'x', 'a b', '$(id)', '*']);
      assert.equal(r.stdout, 'a b|$(id)|*|');
      assert.equal(r.status, 7);
    });

    test('a runc that cannot be run: exit 127 and a message naming it', () => {
      const r = runWrapper(flag, path.join(dir, 'no-such-runc'), ['--version']);
      assert.equal(r.status, 127);
      assert.match(r.stderr, /dedup-runc: cannot run .*no-such-runc/);
    });

    test('a failed prctl never stops runc: it runs anyway and the failure is written once', { skip: !has('strace') && 'SKIP: no strace (fault injection)' }, () => {
      fs.writeFileSync(flag, '');
      fs.rmSync(`${flag}.error`, { force: true });
      const strace = ['strace', '-f', '-o', '/dev/null', '-e', 'inject=prctl:error=EINVAL'];
      for (const word of ['first', 'second']) {
        const r = runWrapper(flag, '/bin/echo', [word], strace);
        assert.equal(r.status, 0, r.stderr);
        assert.equal(r.stdout, `${word}\n`);
      }
      const note = fs.readFileSync(`${flag}.error`, 'utf8');
      assert.equal(note.split('\n').filter((l) => l !== '').length, 1, `written once:\n${note}`);
      assert.match(note, /prctl\(PR_SET_MEMORY_MERGE, 1\) failed: Invalid argument \(errno 22\)/);
    });

    test('the doctor\'s probe reports the kernel keeping the flag across execve', async () => {
      const p = await probeWrapper(wrapper);
      assert.equal(p.inherited, true, p.detail);
    });

    test('the doctor\'s ksm line: ok with BinaryName naming the wrapper, a warning with a fix without', { skip: !fs.existsSync(path.join(SYS, 'run')) && `SKIP: no ${SYS}` }, async () => {
      const cfg = { ...defaultConfig(), ksm: { enabled: true, scan_interval: 100, containers: true } };
      const toml = path.join(dir, 'config.toml');
      const env = { DEDUP_KSM_FLAG: flag };
      fs.rmSync(`${flag}.error`, { force: true });
      fs.writeFileSync(toml, `version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n  BinaryName = ${JSON.stringify(wrapper)}\n`);
      const ok = await checkKsm(cfg, toml, env);
      assert.equal(ok.status, 'ok', ok.detail);
      assert.match(ok.detail, /container memory is made mergeable( while the daemon runs)?: containerd runs the wrapper \(BinaryName .*dedup-runc, line 3\)/);
      fs.writeFileSync(toml, 'version = 2\n');
      const warn = await checkKsm(cfg, toml, env);
      assert.equal(warn.status, 'warn');
      assert.match(warn.detail, /do not run the wrapper/);
      assert.match(warn.fix ?? '', /BinaryName = ".*dedup-runc"/);
      assert.match(warn.fix ?? '', /--runc-binary/);
      const off = await checkKsm({ ...cfg, ksm: { ...cfg.ksm, containers: false } }, toml, env);
      assert.match(off.detail, /ksm\.containers is false/);
    });
  });

}

describe('what /stats and the doctor read', () => {
  test('ksm_stat, cgroup, container names', () => {
    assert.deepEqual(parseKsmStat('ksm_rmap_items 10\nksm_zero_pages 0\nksm_merging_pages 7\nksm_process_profit 27712\nksm_merge_any: yes\nksm_mergeable: yes\n'), {
      rmap_items: 10,
      zero_pages: 0,
      merging_pages: 7,
      process_profit: 27712,
      merge_any: true,
    });
    assert.equal(parseKsmStat('ksm_rmap_items 0\n').merge_any, null, 'older kernels do not say');
    assert.deepEqual(parseCgroup('0::/default/c1\n'), { path: '/default/c1', memoryFiles: ['default/c1/memory.current', 'unified/default/c1/memory.current'] });
    // hybrid: v2 and the v1 memory controller both name the container.
    assert.deepEqual(parseCgroup('4:memory:/k8s.io/abc\n0::/k8s.io/abc\n'), {
      path: '/k8s.io/abc',
      memoryFiles: ['k8s.io/abc/memory.current', 'unified/k8s.io/abc/memory.current', 'memory/k8s.io/abc/memory.usage_in_bytes'],
    });
    // cgroup v1: the v2 path is "/", the memory controller's names the container.
    assert.deepEqual(parseCgroup('9:name=systemd:/default/c2\n4:memory:/default/c2\n3:cpuset:/default/c2\n0::/\n'), {
      path: '/default/c2',
      memoryFiles: ['memory/default/c2/memory.usage_in_bytes'],
    });
    assert.deepEqual(parseCgroup('4:memory:/\n0::/\n'), { path: '/', memoryFiles: [] });
    assert.equal(containerName('/system.slice/cri-containerd-0123abc.scope'), '0123abc');
    assert.equal(containerName('/kubepods/besteffort/pod1/0123abc'), '0123abc');
  });

  test('a container whose root is an overlay on ROOT/snapshots/<id>/fs is one of ours', () => {
    const line = (target: string, fstype: string, opts: string) => `1 0 0:1 / ${target} rw,relatime - ${fstype} ${fstype} ${opts}`;
    const ours = [line('/', 'overlay', 'rw,lowerdir=/r/mnt/3:/r/mnt/2,upperdir=/r/snapshots/12/fs,workdir=/r/snapshots/12/work'), line('/proc', 'proc', 'rw')].join('\n');
    assert.equal(rootSnapshotId(ours, '/r/snapshots'), '12');
    assert.equal(rootSnapshotId(ours, '/other/snapshots'), null);
    assert.equal(rootSnapshotId(line('/', 'ext4', 'rw'), '/r/snapshots'), null);
    assert.equal(rootSnapshotId(line('/', 'overlay', 'upperdir=/r/snapshots/12/fs/../../x/fs'), '/r/snapshots'), null);
  });

  test('containerd configs name the runc binary under each runtime, 1.x and 2.x spellings', () => {
    const facts = readContainerdToml(
      [
        'version = 2',
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
        '  BinaryName = "/opt/dedup-snapshotter/bin/dedup-runc"',
        '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]',
        "  options = { BinaryName = '/usr/local/bin/other', SystemdCgroup = true }",
        '# BinaryName = "/commented"',
      ].join('\n'),
    );
    assert.deepEqual(
      facts.runcBinaries.map((b) => [b.value, b.line]),
      [
        ['/opt/dedup-snapshotter/bin/dedup-runc', 3],
        ['/usr/local/bin/other', 5],
      ],
    );
  });
});

describe('Ksm keeps the flag file (a sysfs of its own)', () => {
  const setup = () => {
    const dir = tempDir('ksm-flag-unit');
    const sys = path.join(dir, 'ksm');
    fs.mkdirSync(sys);
    fs.writeFileSync(path.join(sys, 'run'), '0\n');
    fs.writeFileSync(path.join(sys, 'sleep_millisecs'), '200\n');
    const warnings: string[] = [];
    const logger = { warn: (_o: unknown, m: string) => warnings.push(m), info: () => undefined } as never;
    return { dir, sys, flag: path.join(dir, 'run', 'ksm-containers'), warnings, logger };
  };

  test('written at start (its directory made), deleted at stop with run and sleep_millisecs restored', () => {
    const t = setup();
    const k = new Ksm({ enabled: true, scanIntervalMs: 50, containers: true, flagFile: t.flag, sysDir: t.sys, logger: t.logger });
    k.start();
    assert.equal(k.containerState, 'marking');
    assert.ok(fs.existsSync(t.flag));
    k.stop();
    assert.equal(fs.existsSync(t.flag), false);
    assert.equal(fs.readFileSync(path.join(t.sys, 'run'), 'utf8'), '0');
    assert.equal(k.containerState, 'off');
    fs.rmSync(t.dir, { recursive: true, force: true });
  });

  test('ksm.containers false, or KSM off: no flag, and one left by a crashed daemon is deleted', () => {
    const t = setup();
    for (const opts of [{ enabled: true, containers: false }, { enabled: false, containers: true }]) {
      fs.mkdirSync(path.dirname(t.flag), { recursive: true });
      fs.writeFileSync(t.flag, '1\n');
      const k = new Ksm({ ...opts, scanIntervalMs: 50, flagFile: t.flag, sysDir: t.sys, logger: t.logger });
      k.start();
      assert.equal(fs.existsSync(t.flag), false, JSON.stringify(opts));
      assert.equal(k.containerState, 'off');
      k.stop();
    }
    fs.rmSync(t.dir, { recursive: true, force: true });
  });

  test('no KSM sysfs: no flag, containers "unavailable" with the reason', () => {
    const t = setup();
    const k = new Ksm({ enabled: true, scanIntervalMs: 50, containers: true, flagFile: t.flag, sysDir: path.join(t.dir, 'none'), logger: t.logger });
    k.start();
    assert.equal(fs.existsSync(t.flag), false);
    assert.equal(k.containerState, 'unavailable');
    assert.match(k.containerReason, /KSM is off: .*does not exist/);
    fs.rmSync(t.dir, { recursive: true, force: true });
  });

  test('the wrapper\'s error note is read and logged once', () => {
    const t = setup();
    const k = new Ksm({ enabled: true, scanIntervalMs: 50, containers: true, flagFile: t.flag, sysDir: t.sys, logger: t.logger });
    k.start();
    try {
      assert.equal(k.wrapperError(), null);
      fs.writeFileSync(`${t.flag}.error`, '1796367497 pid 20279: prctl(PR_SET_MEMORY_MERGE, 1) failed: Invalid argument (errno 22); containers run without KSM merging\n');
      assert.match(k.wrapperError() ?? '', /^pid 20279: prctl\(PR_SET_MEMORY_MERGE, 1\) failed: Invalid argument/);
      k.wrapperError();
      assert.equal(t.warnings.filter((w) => /could not mark a container mergeable/.test(w)).length, 1, t.warnings.join('\n'));
    } finally {
      k.stop();
      fs.rmSync(t.dir, { recursive: true, force: true });
    }
  });
});

/** Six identical MiB of text a shell holds in a variable, and a fifo to wait on without forking. */
function ksmImageDef(): ImageDef {
  const base = busyboxImageDef();
  const text = pseudoRandom(3 << 20, 'ksm-containers').toString('hex');
  return {
    name: 'dedup-test/ksm',
    tag: 'v1',
    passwd: base.passwd,
    layers: [
      base.layers[0],
      [
        { type: 'file', path: 'data.txt', content: text },
        { type: 'fifo', path: 'hold' },
      ],
    ],
    expect: [],
  };
}

const N = 4;
const DATA_PAGES = (6 << 20) / 4096;
const HOLD = 'x=$(cat /data.txt); : > /tmp/ready; read y < /hold; echo ${#x}';

function readSys(name: string): number {
  return Number(fs.readFileSync(path.join(SYS, name), 'utf8').trim());
}

interface Sample {
  pids: number[];
  mergeAny: (boolean | null)[];
  mergingPages: number;
  memoryBytes: number;
  /** Anonymous memory of the cgroups (memory.stat: v2 `anon`, v1 `rss`): what KSM merges, without the page cache whose charge wanders. */
  anonBytes: number;
}

function cgroupAnon(memoryFile: string): number | null {
  const stat = path.join('/sys/fs/cgroup', path.dirname(memoryFile), 'memory.stat');
  let text: string;
  try {
    text = fs.readFileSync(stat, 'utf8');
  } catch {
    return null;
  }
  const key = memoryFile.endsWith('memory.current') ? 'anon' : 'rss';
  const m = new RegExp(`^${key} (\\d+)$`, 'm').exec(text);
  return m ? Number(m[1]) : null;
}

function sample(pids: number[]): Sample {
  let mergingPages = 0;
  let memoryBytes = 0;
  let anonBytes = 0;
  const mergeAny: (boolean | null)[] = [];
  for (const pid of pids) {
    const st = parseKsmStat(fs.readFileSync(`/proc/${pid}/ksm_stat`, 'utf8'));
    mergeAny.push(st.merge_any);
    mergingPages += st.merging_pages;
    const text = fs.readFileSync(`/proc/${pid}/cgroup`, 'utf8');
    const files = parseCgroup(text)?.memoryFiles ?? [];
    const mem = readCgroupMemory('/sys/fs/cgroup', files);
    assert.ok(mem, `a memory cgroup of pid ${pid} is readable:\n${text}`);
    memoryBytes += mem;
    const anon = files.map(cgroupAnon).find((n) => n !== null);
    assert.ok(anon !== undefined && anon !== null, `memory.stat of pid ${pid}'s cgroup has anon or rss`);
    anonBytes += anon;
  }
  return { pids, mergeAny, mergingPages, memoryBytes, anonBytes };
}

const MiB = (n: number) => `${(n / (1 << 20)).toFixed(1)} MiB`;

const missingBin = ['containerd', 'ctr', 'runc', 'docker-registry', 'perl'].find((b) => !has(b));
const e2eSkip =
  (process.getuid?.() !== 0 && 'SKIP: needs root') ||
  (!fs.existsSync(path.join(SYS, 'run')) && `SKIP: no ${SYS} (kernel without CONFIG_KSM)`) ||
  (!mergeAnyShown && 'SKIP: /proc/self/ksm_stat has no ksm_merge_any (Linux < 6.8)') ||
  (!fs.existsSync('/sys/fs/cgroup/cgroup.controllers') && !fs.existsSync('/sys/fs/cgroup/memory/memory.usage_in_bytes') && 'SKIP: no memory cgroup (v2 or v1) at /sys/fs/cgroup') ||
  (missingBin ? `SKIP: no ${missingBin}` : false);

describe(`${N} containers of one image, memory with and without bin/dedup-runc`, { skip: e2eSkip }, () => {
  let stack: Stack;
  let ref: string;
  let flagDir: string;
  let flag: string;
  const figures: Record<string, string> = {};
  /** Sum of the plain containers' memory.current once KSM had its chance: the figure without the wrapper. */
  let plainAnon = 0;

  before(async () => {
    flagDir = tempDir('ksm-flag');
    flag = path.join(flagDir, 'ksm-containers');
    stack = await Stack.start({
      daemonEnv: { DEDUP_KSM_FLAG: flag },
      containerdEnv: { DEDUP_KSM_FLAG: flag },
      daemonConfig: { ksm: { enabled: true, scan_interval: 20, containers: true } },
    });
    const [img] = await stack.pushImages([ksmImageDef()]);
    ref = img.ref as string;
    await stack.pull(ref, 'dedup');
  });

  after(async () => {
    if (stack) {
      await stack.stop();
      assert.equal(fs.existsSync(flag), false, 'the daemon deleted the flag at shutdown');
    }
    if (Object.keys(figures).length) console.log(`# KSM figures (${N} containers, 6 MiB each):\n${Object.entries(figures).map(([k, v]) => `#   ${k}: ${v}`).join('\n')}`);
    fs.rmSync(flagDir, { recursive: true, force: true });
  });

  /** Starts N containers (through the wrapper or plain runc), waits until each holds its data; returns their pids. */
  async function startN(prefix: string, wrapped: boolean): Promise<number[]> {
    const pids: number[] = [];
    for (let i = 0; i < N; i++) {
      const id = `${prefix}-${i}`;
      await stack.ctr(['run', '-d', '--snapshotter=dedup', ...(wrapped ? ['--runc-binary', WRAPPER] : []), ref, id, '/bin/sh', '-c', HOLD], { timeoutMs: 60_000 });
      const ls = await stack.ctr(['tasks', 'ls']);
      const row = ls.stdout.split('\n').find((l) => l.split(/\s+/)[0] === id);
      const pid = Number(row?.split(/\s+/)[1]);
      assert.ok(pid > 0, `task ${id} has a pid:\n${ls.stdout}`);
      await waitFor(() => fs.existsSync(`/proc/${pid}/root/tmp/ready`), 30_000, `${id} to read its data`);
      pids.push(pid);
    }
    return pids;
  }

  async function removeN(prefix: string): Promise<void> {
    for (let i = 0; i < N; i++) {
      await stack.ctrTry(['tasks', 'kill', '-s', 'SIGKILL', `${prefix}-${i}`]);
      await stack.ctrTry(['tasks', 'delete', '-f', `${prefix}-${i}`], { timeoutMs: 30_000 });
      await stack.ctrTry(['containers', 'delete', `${prefix}-${i}`]);
    }
  }

  /** Waits until KSM has scanned everything `scans` times more (at most `ms`), or until `done` holds. */
  async function waitScans(scans: number, ms: number, done: () => boolean = () => false): Promise<void> {
    const start = readSys('full_scans');
    await waitFor(() => done() || readSys('full_scans') >= start + scans, ms, `${scans} KSM full scans`).catch(() => undefined);
  }

  test('plain runc: nothing is marked, nothing merges', async () => {
    const sharing0 = readSys('pages_sharing');
    const pids = await startN('plain', false);
    try {
      // Nothing is mergeable, so KSM may have nothing to scan: wait 4 full scans or 15 s.
      await waitScans(4, 15_000);
      const afterScans = sample(pids);
      plainAnon = afterScans.anonBytes;
      figures['plain runc: memory of the 4 cgroups'] = `${MiB(afterScans.memoryBytes)}, of it anonymous ${MiB(afterScans.anonBytes)}`;
      figures['plain runc: ksm_merging_pages, sum'] = String(afterScans.mergingPages);
      figures['plain runc: pages_sharing change'] = String(readSys('pages_sharing') - sharing0);
      assert.deepEqual(afterScans.mergeAny, pids.map(() => false), 'no container process is marked');
      assert.equal(afterScans.mergingPages, 0);
      const stats = await daemonStats(stack.daemon.apiAddress);
      const listed = (stats.ksm.containers?.list ?? []).filter((c: { container: string }) => c.container.startsWith('plain-'));
      assert.deepEqual(listed, [], '/stats lists no plain container');
    } finally {
      await removeN('plain');
    }
  });

  test('through bin/dedup-runc: every container is marked and their identical pages merge', async () => {
    const sharing0 = readSys('pages_sharing');
    const pids = await startN('ksm', true);
    try {
      const before = sample(pids);
      assert.deepEqual(before.mergeAny, pids.map(() => true), 'each container process is marked (fork and execve through runc kept the flag)');
      // Each container's copy merged (most of it): KSM got to every one of them.
      const perContainer = () => pids.map((pid) => parseKsmStat(fs.readFileSync(`/proc/${pid}/ksm_stat`, 'utf8')).merging_pages);
      await waitScans(40, 120_000, () => perContainer().every((n) => n >= DATA_PAGES * 0.75));
      const merged = sample(pids);
      const want = Math.floor(N * DATA_PAGES * 0.75);
      assert.ok(perContainer().every((n) => n >= DATA_PAGES * 0.75), `each container's 6 MiB merged: ${perContainer().join(', ')} pages`);
      const sharing = readSys('pages_sharing') - sharing0;
      figures['wrapper: memory of the 4 cgroups'] = `${MiB(merged.memoryBytes)}, of it anonymous ${MiB(merged.anonBytes)} once merged (${MiB(plainAnon - merged.anonBytes)} less than with plain runc)`;
      figures['wrapper: ksm_merging_pages, sum'] = `${merged.mergingPages} (${N} × ${DATA_PAGES} data pages held)`;
      figures['wrapper: pages_sharing change'] = String(sharing);
      assert.ok(merged.mergingPages >= want, `at least ${want} of the containers' pages merged, got ${merged.mergingPages}`);
      // N copies of the same data become one: about (N-1) × 6 MiB given back.
      assert.ok(sharing >= (N - 1) * DATA_PAGES * 0.5, `pages_sharing grew by ${sharing}, expected at least ${(N - 1) * DATA_PAGES * 0.5}`);
      if (plainAnon > 0) {
        assert.ok(plainAnon - merged.anonBytes >= (N - 1) * (6 << 20) * 0.75, `anonymous memory: ${MiB(merged.anonBytes)} merged vs ${MiB(plainAnon)} with plain runc`);
      }

      const stats = await daemonStats(stack.daemon.apiAddress);
      const kc = stats.ksm.containers;
      assert.equal(kc.state, 'marking', JSON.stringify(kc));
      assert.equal(kc.wrapper_error, null);
      const listed = kc.list.filter((c: { container: string }) => c.container.startsWith('ksm-'));
      assert.equal(listed.length, N, JSON.stringify(kc.list, null, 1));
      for (const c of listed) {
        assert.ok(c.merging_pages > DATA_PAGES / 2, `${c.container}: ${c.merging_pages} merging pages`);
        assert.match(c.snapshot ?? '', new RegExp(`/${c.container}$`), `${c.container} runs on a snapshot of this daemon`);
        assert.ok(c.memory_bytes > 0);
      }
      const metrics = await request(stack.daemon.apiAddress, 'GET', '/metrics');
      assert.match(metrics.body, /^dedup_ksm_container_merging_pages\{container="ksm-0",cgroup="[^"]+"\} [1-9]\d*$/m);
      assert.match(metrics.body, /^dedup_ksm_containers_marking 1$/m);
    } finally {
      await removeN('ksm');
    }
  });

  test('ksm.containers false (SIGHUP): the daemon deletes the flag, the wrapper then marks nothing; true again marks', async () => {
    const cfgFile = path.join(stack.dir, 'config-default.json');
    const cfg = JSON.parse(fs.readFileSync(cfgFile, 'utf8'));
    const reload = async (containers: boolean) => {
      fs.writeFileSync(cfgFile, JSON.stringify({ ...cfg, ksm: { ...cfg.ksm, containers } }));
      stack.daemon.proc.kill('SIGHUP');
      await waitFor(() => fs.existsSync(flag) === containers, 10_000, `the flag to be ${containers ? 'written' : 'deleted'}`);
    };
    const anyOf = async (id: string) => {
      const r = await stack.ctr(['run', '--rm', '--snapshotter=dedup', '--runc-binary', WRAPPER, ref, id, '/bin/cat', '/proc/self/ksm_stat'], { timeoutMs: 60_000 });
      return parseKsmStat(r.stdout).merge_any;
    };
    await reload(false);
    assert.equal(await anyOf('flag-off'), false);
    assert.equal((await daemonStats(stack.daemon.apiAddress)).ksm.containers.state, 'off');
    await reload(true);
    assert.equal(await anyOf('flag-on'), true);
    assertNoDaemonErrors(stack);
  });
});
