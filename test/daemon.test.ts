import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test, after } from 'node:test';
import { status } from '@grpc/grpc-js';
import {
  type DaemonProcess,
  DAEMON_BIN,
  type SnapshotsClient,
  call,
  list,
  snapshotsClient,
  startDaemon,
  tempDir,
  waitFor,
  snapshotHomes,
  cleanupDaemons,
} from './helpers/daemon';
import { DAEMON_NODE_OPTIONS } from '../src/cmd/node-options';

// These tests pin the RPC contract and crash behaviour: their daemons convert
// layers at Commit (convert_mode "sync") so ROOT's state is deterministic.
// Background conversion is covered by erofs, erofs-e2e, e2e and differential.
// Daemons leave their EROFS layer mounts on purpose: detach and delete at the end.
after(cleanupDaemons);

/**
 * The daemon as a process: signals, its socket, restarts on the same ROOT
 * (clean and after kill -9), start-up cleanup, and its structured logs.
 */

const KIND = { VIEW: 1, ACTIVE: 2, COMMITTED: 3 };

/** Directory names under ROOT/snapshots. */
const dirs = snapshotHomes;

function isSocket(p: string): boolean {
  try {
    return fs.lstatSync(p).isSocket();
  } catch {
    return false;
  }
}

/** Kills the daemon if a failed assertion left it running. */
async function ensureGone(d: DaemonProcess | undefined): Promise<void> {
  if (d && d.proc.exitCode === null && d.proc.signalCode === null) await d.kill();
}

function logLines(d: DaemonProcess): Record<string, any>[] {
  return d.logs();
}

/** Fills an active snapshot's upper dir with enough files that walking it takes a while. */
function fillManyFiles(upper: string, dirsN = 100, filesPerDir = 200): number {
  for (let i = 0; i < dirsN; i++) {
    const dir = path.join(upper, `d${i}`);
    fs.mkdirSync(dir);
    for (let j = 0; j < filesPerDir; j++) fs.writeFileSync(path.join(dir, `f${j}`), 'x');
  }
  return 1 + dirsN + dirsN * filesPerDir;
}

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  test(`${signal} shuts down cleanly while a Commit is in flight, and the Commit completes`, async () => {
    const dir = tempDir('daemon-sig');
    let d: DaemonProcess | undefined;
    let c: SnapshotsClient | undefined;
    try {
      d = await startDaemon({ convertMode: 'sync', dir });
      c = snapshotsClient(d.address);
      const res = await call(c, 'Prepare', { key: 'big' });
      const inodes = fillManyFiles(res.mounts[0].source);

      const commit = call(c, 'Commit', { name: 'big-committed', key: 'big' });
      const settled = commit.then(
        () => ({ ok: true as const }),
        (err) => ({ ok: false as const, err }),
      );
      await new Promise((r) => setTimeout(r, 200));
      d.proc.kill(signal);
      const outcome = await settled;
      const code = await d.exited;

      assert.ok(outcome.ok, `in-flight Commit failed: ${!outcome.ok && outcome.err?.details}`);
      assert.equal(code, 0, d.output().slice(-3000));
      assert.equal(d.proc.signalCode, null);
      assert.ok(!fs.existsSync(d.address), 'socket file left behind');

      const logs = logLines(d);
      const shutting = logs.findIndex((l) => l.op === 'stop' && l.signal === signal && l.msg === 'shutting down');
      const committed = logs.findIndex((l) => l.op === 'commit' && l.msg === 'snapshot committed');
      const stopped = logs.findIndex((l) => l.op === 'stop' && l.msg === 'stopped');
      assert.ok(shutting >= 0, `no "shutting down" for ${signal}:\n${d.output()}`);
      assert.ok(committed >= 0, 'no commit log');
      assert.ok(stopped >= 0, `no "stopped" log:\n${d.output()}`);
      // The Commit really was in flight when the signal came, and finished before the end.
      assert.ok(shutting < committed, 'the Commit finished before the signal: nothing was in flight');
      assert.ok(committed < stopped, 'stopped was logged before the in-flight Commit finished');
      c.close();

      // The acknowledged commit is there after a restart.
      d = await startDaemon({ convertMode: 'sync', dir });
      c = snapshotsClient(d.address);
      const { info } = await call(c, 'Stat', { key: 'big-committed' });
      assert.equal(info.kind, KIND.COMMITTED);
      const usage = await call(c, 'Usage', { key: 'big-committed' });
      assert.equal(Number(usage.inodes), inodes);
      assert.equal(await d.stop(), 0);
    } finally {
      c?.close();
      await ensureGone(d);
    }
  });
}

test('an idle daemon stops at once on SIGTERM', async () => {
  const d = await startDaemon({ convertMode: 'sync' });
  try {
    const started = Date.now();
    assert.equal(await d.stop(), 0);
    assert.ok(Date.now() - started < 5000, 'idle shutdown took over 5 s');
    assert.ok(!fs.existsSync(d.address));
    assert.ok(d.logs().some((l) => l.msg === 'stopped'));
  } finally {
    await ensureGone(d);
  }
});

test('the daemon runs itself again with its V8 options: same pid, its logs still on stdout, the options in its command line', async () => {
  const d = await startDaemon({ convertMode: 'sync' });
  try {
    const pid = d.proc.pid as number;
    // The helper spawned node without them; the process (same pid) now runs with them.
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    for (const o of DAEMON_NODE_OPTIONS) assert.ok(argv.includes(o), `${o} missing from ${JSON.stringify(argv)}`);
    assert.equal(argv.filter((a) => a.startsWith('--max-semi-space-size')).length, 1, 'the option given once');
    // stdout survived the execve (node marks it close-on-exec): the start-up lines came after it.
    assert.ok(d.logs().some((l) => l.op === 'start' && /serving containerd snapshots API/.test(String(l.msg))), d.output());
  } finally {
    await ensureGone(d);
  }
});

describe('the socket path', () => {
  test('a stale socket file (its listener was killed) is replaced', async () => {
    const dir = tempDir('daemon-stale');
    const address = path.join(dir, 'dedup.sock');
    // A process binds the socket and dies with kill -9, leaving the file.
    const holder = spawn(
      process.execPath,
      ['-e', `require('net').createServer().listen(${JSON.stringify(address)}, () => console.log('listening'))`],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let out = '';
    holder.stdout.on('data', (b) => (out += b));
    await waitFor(() => out.includes('listening'), 10_000, 'socket holder');
    holder.kill('SIGKILL');
    await new Promise((r) => holder.once('exit', r));
    assert.ok(isSocket(address), 'the stale socket file should still be there');

    let d: DaemonProcess | undefined;
    try {
      d = await startDaemon({ convertMode: 'sync', dir, address });
      const c = snapshotsClient(address);
      await call(c, 'Prepare', { key: 'after-stale' });
      assert.equal((await call(c, 'Stat', { key: 'after-stale' })).info.kind, KIND.ACTIVE);
      c.close();
      assert.equal(await d.stop(), 0);
      assert.ok(!fs.existsSync(address));
    } finally {
      await ensureGone(d);
    }
  });

  test('a live socket (another daemon) makes the second daemon exit non-zero, touching nothing', async () => {
    const dir = tempDir('daemon-live');
    let a: DaemonProcess | undefined;
    let b: DaemonProcess | undefined;
    let b2: DaemonProcess | undefined;
    try {
      a = await startDaemon({ convertMode: 'sync', dir });
      const c = snapshotsClient(a.address);
      await call(c, 'Prepare', { key: 'owned-by-a' });
      // Stands for a directory daemon A is building right now (a Prepare in progress).
      const inflight = path.join(a.root, 'snapshots', 'new-inflight-of-a');
      fs.mkdirSync(inflight);

      // Same ADDRESS, another ROOT.
      b = await startDaemon({ convertMode: 'sync', dir: tempDir('daemon-live-b'), address: a.address, waitReady: false });
      const codeB = await b.exited;
      assert.notEqual(codeB, 0);
      assert.notEqual(codeB, null);
      assert.match(b.output(), /in use/);
      assert.ok(b.output().includes(a.address), 'the message should name the address');

      // Same ADDRESS and the same ROOT: a second copy of the same service.
      b2 = await startDaemon({ convertMode: 'sync', root: a.root, address: a.address, waitReady: false });
      const codeB2 = await b2.exited;
      assert.notEqual(codeB2, 0);
      assert.match(b2.output(), /in use/);
      assert.ok(fs.existsSync(inflight), 'the refused daemon cleaned up the running daemon\'s ROOT');

      // A is untouched and keeps serving on its socket.
      assert.ok(isSocket(a.address));
      assert.equal(a.proc.exitCode, null);
      assert.equal((await call(c, 'Stat', { key: 'owned-by-a' })).info.kind, KIND.ACTIVE);
      await call(c, 'Prepare', { key: 'still-serving' });
      c.close();
      fs.rmdirSync(inflight);
      assert.equal(await a.stop(), 0);
    } finally {
      await ensureGone(b);
      await ensureGone(b2);
      await ensureGone(a);
    }
  });

  test('a path that exists and is not a socket is refused and kept', async () => {
    const dir = tempDir('daemon-notsock');
    const address = path.join(dir, 'not-a-socket');
    fs.writeFileSync(address, 'precious data');
    let d: DaemonProcess | undefined;
    try {
      d = await startDaemon({ convertMode: 'sync', dir, address, waitReady: false });
      const code = await d.exited;
      assert.notEqual(code, 0);
      assert.notEqual(code, null);
      assert.match(d.output(), /not a socket/);
      assert.doesNotMatch(d.output(), /serving containerd snapshots API/);
      assert.equal(fs.readFileSync(address, 'utf8'), 'precious data');

      const dirAddress = path.join(dir, 'a-directory');
      fs.mkdirSync(dirAddress);
      fs.writeFileSync(path.join(dirAddress, 'inside'), 'x');
      d = await startDaemon({ convertMode: 'sync', dir, address: dirAddress, waitReady: false });
      assert.notEqual(await d.exited, 0);
      assert.match(d.output(), /not a socket/);
      assert.equal(fs.readFileSync(path.join(dirAddress, 'inside'), 'utf8'), 'x');
    } finally {
      await ensureGone(d);
    }
  });
});

describe('restarts on the same ROOT', () => {
  test('a clean restart keeps every snapshot, its kind, parent and labels', async () => {
    const dir = tempDir('daemon-restart');
    let d: DaemonProcess | undefined;
    try {
      d = await startDaemon({ convertMode: 'sync', dir });
      let c = snapshotsClient(d.address);
      await call(c, 'Prepare', { key: 'base-a' });
      await call(c, 'Commit', { name: 'base', key: 'base-a', labels: { l: 'v' } });
      const prepared = await call(c, 'Prepare', { key: 'top', parent: 'base' });
      await call(c, 'View', { key: 'look', parent: 'base' });
      const before = (await list(c)).sort((x, y) => x.name.localeCompare(y.name));
      c.close();
      assert.equal(await d.stop(), 0);

      d = await startDaemon({ convertMode: 'sync', dir });
      c = snapshotsClient(d.address);
      const after = (await list(c)).sort((x, y) => x.name.localeCompare(y.name));
      assert.deepEqual(after, before);
      const { info } = await call(c, 'Stat', { key: 'base' });
      assert.equal(info.kind, KIND.COMMITTED);
      assert.deepEqual(info.labels, { l: 'v' });
      assert.equal((await call(c, 'Stat', { key: 'top' })).info.parent, 'base');
      assert.deepEqual((await call(c, 'Mounts', { key: 'top' })).mounts, prepared.mounts);
      await call(c, 'Commit', { name: 'top-c', key: 'top' });
      await call(c, 'Prepare', { key: 'next', parent: 'top-c' });
      c.close();
      assert.equal(await d.stop(), 0);
    } finally {
      await ensureGone(d);
    }
  });

  test('kill -9 in the middle of a burst loses no acknowledged commit, and the daemon serves again', async () => {
    const dir = tempDir('daemon-kill9');
    let d: DaemonProcess | undefined;
    try {
      d = await startDaemon({ convertMode: 'sync', dir });
      const clients = [0, 1, 2, 3].map(() => snapshotsClient((d as DaemonProcess).address));
      // A chain committed before the burst.
      let parent = '';
      for (let i = 0; i < 5; i++) {
        await call(clients[0], 'Prepare', { key: `pre-${i}-a`, parent });
        await call(clients[0], 'Commit', { name: `pre-${i}`, key: `pre-${i}-a` });
        parent = `pre-${i}`;
      }
      const acked = new Set<string>();
      const ackedActive = new Set<string>();
      let stop = false;
      const burst = clients.map(async (cl, ci) => {
        let p = parent;
        for (let i = 0; !stop; i++) {
          const key = `burst-${ci}-${i}-a`;
          const name = `burst-${ci}-${i}`;
          try {
            const res = await call(cl, 'Prepare', { key, parent: p });
            ackedActive.add(key);
            fs.writeFileSync(path.join(upperOf(res.mounts), 'f'), name);
            await call(cl, 'Commit', { name, key, labels: { n: name } });
            ackedActive.delete(key);
            acked.add(name);
            p = name;
          } catch {
            return;
          }
        }
      });
      await waitFor(() => acked.size >= 40, 30_000, 'commits to be acknowledged');
      await d.kill();
      stop = true;
      await Promise.all(burst);
      for (const cl of clients) cl.close();

      d = await startDaemon({ convertMode: 'sync', dir });
      const c = snapshotsClient(d.address);
      for (const name of [...acked, 'pre-4']) {
        const { info } = await call(c, 'Stat', { key: name });
        assert.equal(info.kind, KIND.COMMITTED, name);
        if (name.startsWith('burst-')) assert.deepEqual(info.labels, { n: name });
      }
      for (const key of ackedActive) {
        // Prepared and acknowledged, commit not acknowledged: active, or committed if the
        // commit landed just before the kill.
        const name = key.slice(0, -2);
        const found = await call(c, 'Stat', { key }).then(
          (r) => r.info.kind,
          () => call(c, 'Stat', { key: name }).then((r) => r.info.kind),
        );
        assert.ok([KIND.ACTIVE, KIND.COMMITTED].includes(found), key);
      }
      // Start-up left exactly one directory per snapshot, all named by id.
      const all = await list(c);
      const names = dirs(d.root);
      assert.equal(names.length, all.length, `dirs ${names.length} vs rows ${all.length}`);
      for (const n of names) assert.match(n, /^(snapshots\/[0-9]+|images\/[0-9]+\.erofs)$/);
      // And it serves: build on the newest acknowledged layer.
      const newest = [...acked].pop() as string;
      await call(c, 'Prepare', { key: 'after-crash', parent: newest });
      await call(c, 'Commit', { name: 'after-crash-c', key: 'after-crash' });
      assert.equal((await call(c, 'Stat', { key: 'after-crash-c' })).info.parent, newest);
      c.close();
      assert.equal(await d.stop(), 0);
    } finally {
      await ensureGone(d);
    }
  });

  test('directories no row names are removed at start; live ones stay', async () => {
    const dir = tempDir('daemon-orphans');
    let d: DaemonProcess | undefined;
    try {
      d = await startDaemon({ convertMode: 'sync', dir });
      let c = snapshotsClient(d.address);
      const res = await call(c, 'Prepare', { key: 'live' });
      fs.writeFileSync(path.join(res.mounts[0].source, 'keep'), 'me');
      await call(c, 'Prepare', { key: 'live2-a' });
      await call(c, 'Commit', { name: 'live2', key: 'live2-a' });
      const liveDirs = dirs(d.root);
      c.close();
      assert.equal(await d.stop(), 0);

      const snaps = path.join(d.root, 'snapshots');
      fs.mkdirSync(path.join(snaps, '999', 'fs', 'sub'), { recursive: true });
      fs.writeFileSync(path.join(snaps, '999', 'fs', 'sub', 'file'), 'orphan');
      fs.mkdirSync(path.join(snaps, 'new-abc', 'fs'), { recursive: true });
      fs.mkdirSync(path.join(snaps, 'rm-7', 'fs'), { recursive: true });

      d = await startDaemon({ convertMode: 'sync', dir });
      assert.deepEqual(dirs(d.root), liveDirs);
      assert.ok(d.logs().some((l) => l.op === 'cleanup' && l.removed === 3), d.output());
      c = snapshotsClient(d.address);
      assert.equal(fs.readFileSync(path.join(res.mounts[0].source, 'keep'), 'utf8'), 'me');
      assert.equal((await call(c, 'Stat', { key: 'live' })).info.kind, KIND.ACTIVE);
      assert.equal((await call(c, 'Stat', { key: 'live2' })).info.kind, KIND.COMMITTED);
      // A new snapshot does not collide with the removed 999 or any other.
      await call(c, 'Prepare', { key: 'fresh' });
      assert.equal(dirs(d.root).length, liveDirs.length + 1);
      c.close();
      assert.equal(await d.stop(), 0);
    } finally {
      await ensureGone(d);
    }
  });
});

test('a malformed docker config.json: the default one is ignored with a warning, a configured one stops the start naming it', async () => {
  const dir = tempDir('daemon-dockercfg');
  fs.mkdirSync(path.join(dir, 'docker'));
  const bad = path.join(dir, 'docker', 'config.json');
  fs.writeFileSync(bad, '{"auths": {"r.example": {"auth": "not base64 user:pass!"}}');
  const d = await startDaemon({ dir, convertMode: 'sync', env: { DOCKER_CONFIG: path.join(dir, 'docker') } });
  try {
    assert.ok(d.logs().some((l) => l.level === 'warn' && /ignoring docker config\.json/.test(String(l.msg))), d.output());
  } finally {
    await d.stop();
  }
  const d2 = await startDaemon({ dir: tempDir('daemon-dockercfg2'), convertMode: 'sync', config: { registry: { docker_config: bad } }, waitReady: false });
  assert.notEqual(await d2.exited, 0);
  assert.match(d2.output(), /"err":"docker config [^"]*config\.json: not valid JSON","msg":"cannot start snapshotter"/);
});

test('a ROOT on a read-only filesystem stops the start saying so (not ENOENT); doctor says it too', async () => {
  const dir = tempDir('daemon-rofs');
  const ro = path.join(dir, 'ro');
  fs.mkdirSync(ro);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', ro]);
  try {
    const root = path.join(ro, 'dedup');
    const d = await startDaemon({ dir, root, convertMode: 'sync', waitReady: false });
    assert.notEqual(await d.exited, 0);
    assert.match(d.output(), new RegExp(`ROOT ${root} is on a read-only filesystem \\(${ro} is not writable: EROFS\\)`), d.output());
    assert.doesNotMatch(d.output(), /ENOENT/);
    const doc = spawnSync(process.execPath, [DAEMON_BIN, 'doctor'], { env: { ...process.env, ROOT: root, ADDRESS: path.join(dir, 'none.sock'), CONFIG: path.join(dir, 'none.json') }, encoding: 'utf8' });
    assert.match(doc.stdout, /permissions .*ROOT .* is on a read-only filesystem/, doc.stdout);
    assert.doesNotMatch(doc.stdout, /does not exist yet; the daemon creates it/);
  } finally {
    execFileSync('umount', [ro]);
  }
});

test('logs carry op, key and snapshot on Prepare, Commit and Remove', async () => {
  let d: DaemonProcess | undefined;
  try {
    d = await startDaemon({ convertMode: 'sync', env: { LOG_LEVEL: 'info' } });
    const c = snapshotsClient(d.address);
    const res = await call(c, 'Prepare', { key: 'logged key/with slash' });
    const id = /\/snapshots\/([0-9]+)\/fs$/.exec(res.mounts[0].source)?.[1];
    assert.ok(id, res.mounts[0].source);
    await call(c, 'Commit', { name: 'logged-name', key: 'logged key/with slash' });
    await call(c, 'Remove', { key: 'logged-name' });
    await assert.rejects(call(c, 'Stat', { key: 'logged-name' }), (e: any) => e.code === status.NOT_FOUND);
    c.close();

    // The failed Stat is the last line logged: once it is here, all are.
    await waitFor(() => d!.logs().some((l) => l.op === 'stat' && l.key === 'logged-name'), 5000, 'failed stat log');
    const logs = d.logs();
    const prepare = logs.find((l) => l.op === 'prepare' && l.key === 'logged key/with slash' && l.snapshot !== undefined);
    assert.ok(prepare, `no prepare log line:\n${d.output()}`);
    assert.equal(prepare.snapshot, id);
    assert.equal(prepare.level, 'info');
    assert.equal(typeof prepare.time, 'string');
    const commit = logs.find((l) => l.op === 'commit' && l.key === 'logged key/with slash' && l.snapshot !== undefined);
    assert.ok(commit, `no commit log line:\n${d.output()}`);
    assert.equal(commit.snapshot, id);
    assert.equal(commit.name, 'logged-name');
    const remove = logs.find((l) => l.op === 'remove' && l.key === 'logged-name' && l.snapshot !== undefined);
    assert.ok(remove, `no remove log line:\n${d.output()}`);
    assert.equal(remove.snapshot, id);
    // Failures carry op, key and the error kind.
    const failed = logs.find((l) => l.op === 'stat' && l.key === 'logged-name');
    assert.ok(failed, `no failed stat log line:\n${d.output()}`);
    assert.equal(failed.code, 'NotFound');
    // Every stdout line is JSON.
    for (const line of d.output().split('\n').filter((l) => l.trim() !== '')) {
      assert.doesNotThrow(() => JSON.parse(line), line);
    }
    assert.equal(await d.stop(), 0);
  } finally {
    await ensureGone(d);
  }
});

/** The upper dir of a Prepare's mounts: the bind source, or overlay's upperdir. */
function upperOf(mounts: { type: string; source: string; options: string[] }[]): string {
  if (mounts[0].type === 'bind') return mounts[0].source;
  const o = mounts[0].options.find((x) => x.startsWith('upperdir='));
  assert.ok(o);
  return o.slice('upperdir='.length);
}
