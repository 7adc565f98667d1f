/**
 * Crash during a pull: the daemon is killed with SIGKILL while containerd
 * unpacks the 40-layer image into it (after some layers were committed),
 * restarted on the same ROOT and socket; the pull is repeated and must
 * succeed and run, and after the image is removed containerd's GC must leave
 * no directory and no mount that no snapshot accounts for.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { waitFor } from './helpers/daemon';
import { type BuiltImage, CHAIN_LAYERS, chainImageDef } from './helpers/images';
import { mountsUnder } from './helpers/mounts';
import { Stack, assertAllCollected, assertCommittedChain, assertDirsMatchSnapshots, assertNoDaemonErrors, daemonSnapshotNames, layerPathOptions, layerPaths, waitReconnected } from './helpers/stack';

/** How many "snapshot committed" log lines the daemon printed. */
/** Layers committed: by containerd's Commit, or recorded by the daemon's registry fetch (its "converted layer … from its registry blob" lines). */
function commits(stack: Stack): number {
  return stack.daemon.logs().filter((l) => l.msg === 'snapshot committed' || (l.op === 'fetch' && typeof l.logical_bytes === 'number')).length;
}

/** Snapshot names from containerd's view, in every namespace, in the daemon's `<ns>/<seq>/<name>` form stripped to `<ns>/<name>`. */
async function ctrSnapshotNames(stack: Stack): Promise<string[]> {
  const out: string[] = [];
  for (const ns of await stack.namespaces()) for (const s of await stack.snapshots('dedup', ns)) out.push(`${ns}/${s.key}`);
  return out.sort();
}

function stripSeq(name: string): string {
  // containerd's metadata store names backend snapshots "<ns>/<seq>/<key>".
  const m = /^([^/]+)\/\d+\/(.*)$/.exec(name);
  return m ? `${m[1]}/${m[2]}` : name;
}

for (const via of layerPaths()) describe(`crash (${via}): kill -9 of the daemon during a pull`, () => {
  let stack: Stack;
  let img: BuiltImage;

  before(async () => {
    stack = await Stack.start(layerPathOptions(via));
    [img] = await stack.pushImages([chainImageDef()]);
    assert.equal(img.chainIds.length, CHAIN_LAYERS);
  });

  after(async () => {
    await stack?.stop();
  });

  test('pull fails when the daemon dies, succeeds after restart, and GC leaves nothing behind', async (t) => {
    const ref = img.ref as string;
    const KILL_AFTER = 5;
    const firstPull = stack.pull(ref, 'dedup').then(
      () => null,
      (err: Error) => err,
    );
    const daemon = stack.daemon;
    await waitFor(() => commits(stack) >= KILL_AFTER, 120_000, `${KILL_AFTER} committed layers`);
    await daemon.kill();
    const committedBeforeKill = commits(stack);
    const pullErr = await firstPull;
    assert.ok(committedBeforeKill < CHAIN_LAYERS, `killed after ${committedBeforeKill} of ${CHAIN_LAYERS} layers`);
    assert.ok(pullErr instanceof Error, 'the interrupted pull failed (otherwise the kill came too late to test anything)');

    // Same ROOT, same socket. containerd's proxy client reconnects by itself.
    await stack.restartDaemon();
    assert.ok(stack.daemon.proc.pid !== daemon.proc.pid, 'a new daemon process');
    await waitReconnected(stack);
    // Whatever the daemon has after its restart is consistent: one directory per snapshot.
    await assertDirsMatchSnapshots(stack);
    const survivors = await daemonSnapshotNames(stack);
    t.diagnostic(`killed after ${committedBeforeKill} commits; after restart the daemon holds ${survivors.length} snapshots, containerd ${(await stack.snapshots('dedup')).length}`);

    await stack.pull(ref, 'dedup');
    await assertCommittedChain(stack, 'dedup', img);
    const r = await stack.ctr(['run', '--snapshotter=dedup', '--rm', ref, `crash-run-${process.pid}`, '/bin/sh', '-c', 'cat /etc/passwd'], {
      timeoutMs: 60_000,
    });
    assert.equal(r.stdout, img.def.passwd, `container output:\n${r.stdout}\n${r.stderr}`);
    const counter = await stack.ctr(['run', '--snapshotter=dedup', '--rm', ref, `crash-run2-${process.pid}`, '/bin/cat', '/chain/counter'], { timeoutMs: 60_000 });
    assert.equal(counter.stdout, `${CHAIN_LAYERS - 1}\n`);

    // Before removal: the daemon's snapshots are containerd's snapshots
    // (plus, at most, orphans of the crash that the GC below must remove).
    const ctrNames = await ctrSnapshotNames(stack);
    const daemonNames = (await daemonSnapshotNames(stack)).map(stripSeq).sort();
    for (const n of ctrNames) assert.ok(daemonNames.includes(n), `containerd's ${n} exists in the daemon`);

    await stack.ctr(['images', 'rm', '--sync', ref]);
    // containerd removes backend snapshots its metadata does not name, so the
    // crash's leftovers go too; then ROOT/snapshots holds exactly the
    // directories of snapshots that still exist: none.
    await assertAllCollected(stack);
    const afterNames = (await daemonSnapshotNames(stack)).map(stripSeq).sort();
    assert.deepEqual(afterNames, await ctrSnapshotNames(stack), 'daemon snapshots == containerd snapshots');
    assert.equal(stack.daemonSnapshotDirs().length, afterNames.length, 'no directory without a snapshot');
    assert.deepEqual(mountsUnder(stack.dir), [], 'no mounts left');
    assertNoDaemonErrors(stack);
  });
});
