/**
 * What depends on containerd's version, on the version the Stack runs
 * (DEDUP_CONTAINERD: 1.6, 1.7 or 2; the matrix runs this file on each):
 *
 * - 2.1 and later: the guide's own `ctr image pull --snapshotter=dedup REF` of a dedup
 *   image is lazy. ctr pulls through containerd's transfer service, which
 *   passes the remote-snapshot labels to a proxy plugin exporting
 *   enable_remote_snapshot_annotations; each layer is made from metadata and
 *   chunks and containerd downloads no layer blob. Then the guide's
 *   `ctr run`, `/stats`, the audit query, and `ctr images rm` with GC.
 *   On 1.6/1.7, ctr unpacks in the client and cannot take a dedup layer,
 *   and 2.0's transfer service passes no such labels: there
 *   `dedup-snapshotter pull` does it (pull.test).
 * - 1.7 and later: `ctr images mount --snapshotter=dedup` mounts an image's
 *   rootfs (1.6's ignores --snapshotter).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { RegistryClient } from '../src/remote/registry';
import { atLeast, defaultContainerd } from './helpers/containerd-builds';
import { cleanupDaemons, waitFor } from './helpers/daemon';
import { convertForTest } from './helpers/dedup';
import { daemonStats } from './helpers/http';
import { type BuiltImage, busyboxImageDef } from './helpers/images';
import { mountPoints } from './helpers/mounts';
import { Stack, assertAllCollected, assertNoDaemonErrors } from './helpers/stack';

const run = promisify(execFile);

after(() => cleanupDaemons());

function buildSkip(): string | false {
  try {
    defaultContainerd();
    return false;
  } catch (err) {
    return (err as Error).message;
  }
}

describe(`containerd ${process.env.DEDUP_CONTAINERD ?? 'system'}: the guide's commands on this version`, { skip: buildSkip() }, () => {
  let stack: Stack;
  let client: RegistryClient;
  let img: BuiltImage;
  let plainRef: string;

  before(async () => {
    stack = await Stack.start();
    client = new RegistryClient({ plainHttpHosts: [stack.registry] });
    [img] = await stack.pushImages([busyboxImageDef()]);
    plainRef = `${stack.registry}/${img.def.name}:${img.def.tag}`;
  });

  after(async () => {
    client?.close();
    await stack?.stop();
  });

  test('ctr image pull --snapshotter=dedup of a dedup image: lazy on 2.1+ (the transfer service passes the remote-snapshot labels), then ctr run, /stats, the audit query, images rm and GC; before 2.1 a clean failure naming the media type', async () => {
    const dst = `${stack.registry}/dedup/busybox:v1`;
    const converted = await convertForTest(client, plainRef, dst, stack.dir);

    if (!atLeast(stack.build, 2, 1)) {
      // 1.x unpacks in the client, and 2.0's transfer service passes proxy plugins no remote-snapshot
      // labels: containerd has no processor for a dedup layer (dedup-snapshotter pull is the lazy path
      // there, pull.test). The failed pull leaves no snapshot behind in the daemon.
      const r = await stack.ctrTry(['images', 'pull', '--plain-http', '--snapshotter=dedup', dst], { timeoutMs: 240_000 });
      assert.notEqual(r.code, 0, `ctr pull of a dedup image on containerd ${stack.build.version} failed`);
      assert.match(r.stderr, /no processor for media-type/);
      assert.match(r.stderr, /application\/vnd\.oci\.image\.layer\.dedup-snapshotter\.erofs\.v1/);
      await waitFor(async () => (await stack.snapshots('dedup')).length === 0, 30_000, 'no dedup snapshot left by the failed pull');
      assertNoDaemonErrors(stack);
      return;
    }

    await stack.pull(dst, 'dedup');

    const content = (await stack.ctr(['content', 'ls', '-q'])).stdout.split('\n').map((l) => l.trim());
    for (const l of converted.layers) assert.ok(!content.includes(l.digest), `containerd downloaded no layer blob (${l.digest})`);
    const remote = stack.daemon.logs().filter((l) => l.op === 'remote' && typeof l.fetched_chunks === 'number');
    assert.equal(remote.length, converted.layers.length, 'every layer was made remotely');
    assert.deepEqual(
      stack.daemon.logs().filter((l) => l.msg === 'prepare failed'),
      [],
      'the AlreadyExists answers are not logged as failures',
    );
    const snaps = await stack.snapshots('dedup');
    assert.equal(snaps.filter((s) => s.kind === 'Committed').length, converted.layers.length);

    const out = await stack.ctr(['run', '--snapshotter=dedup', '--rm', dst, 'versions-lazy', 'cat', '/etc/passwd'], { timeoutMs: 60_000 });
    assert.equal(out.stdout, img.def.passwd);

    const stats = await daemonStats(stack.daemon.apiAddress);
    assert.equal(stats.remote.layers, converted.layers.length, '/stats counts the remote layers');
    assert.ok(stats.remote.bytes_fetched > 0, 'the container read fetched data on demand');

    // The guide's audit query, as written (its path is ROOT/audit.db).
    const audit = await run('sqlite3', [path.join(stack.daemonRoot, 'audit.db'), 'SELECT * FROM audit_logs ORDER BY timestamp DESC LIMIT 10;']);
    assert.match(audit.stdout, /\|prepare\|/, `the audit log has the pull's Prepares:\n${audit.stdout}`);

    await stack.ctr(['images', 'rm', '--sync', dst]);
    await waitFor(async () => (await stack.snapshots('dedup')).length === 0, 30_000, 'dedup snapshots collected after images rm');
    await assertAllCollected(stack);
    assertNoDaemonErrors(stack);
  });

  test('ctr images mount --snapshotter=dedup mounts the rootfs (1.7 and later); unmount --rm removes its snapshot', async (t) => {
    if (stack.build.major === 1 && stack.build.minor < 7) {
      t.skip(`containerd ${stack.build.version}'s ctr images mount ignores --snapshotter (docs/lazy-pull.md shows ctr snapshots mounts instead)`);
      return;
    }
    await stack.pull(plainRef, 'dedup');
    const target = path.join(stack.dir, 'images-mount');
    fs.mkdirSync(target);
    await stack.ctr(['images', 'mount', '--snapshotter=dedup', plainRef, target]);
    try {
      assert.ok(mountPoints().includes(target), `${target} is a mount point`);
      assert.equal(fs.readFileSync(path.join(target, 'etc', 'passwd'), 'utf8'), img.def.passwd);
    } finally {
      await stack.ctr(['images', 'unmount', '--rm', target]);
    }
    assert.ok(!mountPoints().includes(target), 'unmounted');
    const left = (await stack.snapshots('dedup')).filter((s) => s.kind === 'Active');
    assert.deepEqual(left, [], 'unmount --rm removed the mount snapshot');

    await stack.ctr(['images', 'rm', '--sync', plainRef]);
    await assertAllCollected(stack);
    assertNoDaemonErrors(stack);
  });
});
