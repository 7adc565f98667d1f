/**
 * End-to-end tests of the EROFS conversion through the real stack
 * (registry + containerd + daemon): node-wide chunk dedup across images and
 * its reclaim, a daemon restart under a running container, parallel pulls,
 * and a kill -9 of the daemon in the middle of a layer conversion.
 */
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { waitFor } from './helpers/daemon';
import { type BuiltImage, type Entry, type ImageDef, busyboxImageDef, passwdFor, pseudoRandom } from './helpers/images';
import { mountsUnder } from './helpers/mounts';
import { Stack, assertAllCollected, assertCommittedChain, assertDirsMatchSnapshots, assertNoDaemonErrors, daemonSnapshotNames, waitReconnected } from './helpers/stack';

const MiB = 1 << 20;
const BLOCK = 4096;
const roundUp = (n: number, b = BLOCK) => Math.ceil(n / b) * b;

/** Layer 0 of the helper images: static busybox, applet links, top-level dirs. */
function baseLayer(): Entry[] {
  return busyboxImageDef().layers[0];
}

/** An image: the busybox base, an /etc layer with a passwd naming `marker`, then `extra` layers. */
function imageDef(name: string, marker: string, extra: Entry[][]): ImageDef {
  const passwd = passwdFor(marker);
  return {
    name,
    tag: 'v1',
    passwd,
    layers: [baseLayer(), [{ type: 'file', path: 'etc/passwd', content: passwd }], ...extra],
    expect: [{ path: 'etc/passwd', kind: 'file', content: passwd }],
  };
}

interface ConvertedLine {
  snapshot: string;
  logical_bytes: number;
  stored_bytes: number;
  new_chunks: number;
  dedup_chunks: number;
  msg: string;
}

function convertedLines(stack: Stack): ConvertedLine[] {
  return stack.daemon.logs().filter((l) => typeof l.msg === 'string' && l.msg.startsWith('converted layer ')) as unknown as ConvertedLine[];
}

function autoConvertLines(stack: Stack): Record<string, unknown>[] {
  // Every path: "… auto-converting to EROFS" (a directory), "… to EROFS from its tar in one pass (sha256:…)" (dedup-differ),
  // "fetching layer sha256:… of IMAGE from its registry, auto-converting to EROFS in one pass" (the registry fetch; no snapshot yet).
  return stack.daemon
    .logs()
    .filter((l) => typeof l.msg === 'string' && (/^detected new layer \S+, auto-converting to EROFS( from its tar|$)/.test(l.msg) || /^fetching layer \S+ of \S+ from its registry, auto-converting to EROFS/.test(l.msg)));
}

/**
 * `file`'s content read by `cat` in a container of `ref`. The container
 * prints an end marker after it: ctr can lose a task's whole output when
 * the task exits before ctr has opened its FIFOs (its Delete cancels the
 * open; seen under load), and a run without the marker is run again rather
 * than taken for an empty file; content before a marker is always checked.
 */
async function runCat(stack: Stack, ref: string, id: string, file = '/etc/passwd'): Promise<string> {
  const END = '<<cat-done>>';
  for (let attempt = 1; ; attempt++) {
    const r = await stack.ctr(['run', '--snapshotter=dedup', '--rm', ref, `${id}-${attempt}`, '/bin/sh', '-c', `cat "$0" && echo '${END}'`, file], { timeoutMs: 60_000 });
    const at = r.stdout.lastIndexOf(`${END}\n`);
    if (at >= 0) return r.stdout.slice(0, at);
    assert.ok(attempt < 3, `${file} in a container of ${ref}: no output at all, ${attempt} times (stdout ${JSON.stringify(r.stdout.slice(0, 200))})`);
  }
}

describe('erofs e2e', () => {
  const stacks: Stack[] = [];
  const newStack = async () => {
    const s = await Stack.start();
    stacks.push(s);
    return s;
  };
  after(async () => {
    for (const s of stacks) await s.stop();
  });

  test('dedup across images: shared data is stored once and given back on removal', async (t) => {
    const stack = await newStack();
    const SHARED = 8 * MiB;
    const shared = pseudoRandom(SHARED, 'erofs-e2e-shared-8MiB');
    const base = imageDef('dedup-test/app', 'app-v1', [
      [
        { type: 'dir', path: 'opt' },
        { type: 'file', path: 'opt/data/shared.bin', content: shared },
        { type: 'file', path: 'opt/version', content: 'v1\n' },
      ],
    ]);
    // The "rebuilt base": a changed /etc layer (so every chain id above the
    // busybox layer differs) and the same large file at another path, next to
    // a changed file, so the layer digest differs too.
    const rebuilt = imageDef('dedup-test/app-rebuilt', 'app-v2', [
      [
        { type: 'dir', path: 'srv' },
        { type: 'file', path: 'srv/elsewhere/copy-of-shared.bin', content: shared },
        { type: 'file', path: 'srv/version', content: 'v2 - rebuilt\n' },
      ],
    ]);
    const [a, b] = await stack.pushImages([base, rebuilt]);
    assert.notEqual(a.layers[2].digest, b.layers[2].digest, 'the data layers differ');
    assert.equal(a.chainIds[0], b.chainIds[0], 'the busybox layer is shared');

    // Layers convert in the background after each pull: wait for them.
    await stack.pull(a.ref as string, 'dedup');
    await assertDirsMatchSnapshots(stack);
    // The daemon's lines come through a pipe: wait for them (a fourth would fail below).
    await waitFor(() => convertedLines(stack).length >= 3, 30_000, "the first image's converted lines");
    const afterFirst = convertedLines(stack).length;
    const storeAfterFirst = stack.daemonStorage().storeBytes;
    await stack.pull(b.ref as string, 'dedup');
    await assertCommittedChain(stack, 'dedup', a);
    await assertCommittedChain(stack, 'dedup', b);
    await assertDirsMatchSnapshots(stack);
    await waitFor(() => convertedLines(stack).length >= 5, 30_000, "the second image's converted lines");
    const all = convertedLines(stack);
    // a: busybox, etc, data; b: etc, data (busybox is the same snapshot).
    assert.equal(afterFirst, 3, `first image converted 3 layers: ${JSON.stringify(all)}`);
    assert.equal(all.length, 5, `second image converted 2 new layers: ${JSON.stringify(all)}`);
    const firstData = all.slice(0, afterFirst).find((l) => l.logical_bytes >= SHARED);
    const secondData = all.slice(afterFirst).find((l) => l.logical_bytes >= SHARED);
    assert.ok(firstData, `a converted line of the first image with >= ${SHARED} logical bytes: ${JSON.stringify(all)}`);
    assert.ok(secondData, `a converted line of the second image with >= ${SHARED} logical bytes: ${JSON.stringify(all)}`);
    t.diagnostic(`first data layer: ${JSON.stringify(firstData)}`);
    t.diagnostic(`second data layer: ${JSON.stringify(secondData)}`);
    assert.equal(firstData.dedup_chunks, 0, 'nothing to dedup against in the first data layer');
    assert.ok(firstData.stored_bytes >= SHARED, 'the first copy is stored');
    assert.ok(secondData.dedup_chunks >= SHARED / MiB, `second data layer deduplicated its ${SHARED / MiB} shared chunks: ${JSON.stringify(secondData)}`);
    assert.ok(secondData.stored_bytes < secondData.logical_bytes / 8, `second data layer stored ${secondData.stored_bytes} of ${secondData.logical_bytes} bytes`);

    // Unique file data across both images, each file rounded to a block.
    const files = (img: BuiltImage) => img.def.layers.flat().filter((e): e is Extract<Entry, { type: 'file' }> => e.type === 'file');
    const unique = new Map<string, number>();
    for (const f of [...files(a), ...files(b)]) {
      const buf = typeof f.content === 'string' ? Buffer.from(f.content) : f.content;
      unique.set(buf.toString('base64').slice(0, 64) + buf.length, buf.length);
    }
    const uniqueBytes = [...unique.values()].reduce((s, n) => s + roundUp(n), 0);
    const st = stack.daemonStorage();
    t.diagnostic(`unique data ${uniqueBytes} bytes; store ${st.storeBytes} bytes (after first image ${storeAfterFirst})`);
    assert.ok(st.storeBytes >= SHARED, `store holds the shared data once at least: ${st.storeBytes}`);
    assert.ok(st.storeBytes < 1.1 * uniqueBytes, `store ${st.storeBytes} bytes < 1.1 x unique ${uniqueBytes}`);
    assert.ok(st.storeBytes - storeAfterFirst < 1 * MiB, `the second image added ${st.storeBytes - storeAfterFirst} bytes to the store`);

    // Both run and see their data.
    assert.equal(await runCat(stack, a.ref as string, 'dedup-a'), a.def.passwd);
    assert.equal(await runCat(stack, b.ref as string, 'dedup-b'), b.def.passwd);
    const sum = await stack.ctr(['run', '--snapshotter=dedup', '--rm', b.ref as string, 'dedup-b-sum', '/bin/sha256sum', '/srv/elsewhere/copy-of-shared.bin'], { timeoutMs: 60_000 });
    const { createHash } = await import('node:crypto');
    assert.equal(sum.stdout.split(/\s+/)[0], createHash('sha256').update(shared).digest('hex'), 'shared file content in the second image');

    await stack.ctr(['images', 'rm', '--sync', a.ref as string, b.ref as string]);
    await assertAllCollected(stack);
    assertNoDaemonErrors(stack);
  });

  test('daemon restart (SIGTERM) under a running container', async (t) => {
    const stack = await newStack();
    const [img] = await stack.pushImages([imageDef('dedup-test/restart', 'restart-e2e', [[{ type: 'file', path: 'app/data', content: pseudoRandom(3 * MiB, 'restart') }]])]);
    const ref = img.ref as string;
    await stack.pull(ref, 'dedup');
    // The container should run on the EROFS layers: let the background conversion finish. (One
    // directory per snapshot also holds while the last layer is still a directory: a container
    // started then keeps that directory mounted, retired, after its conversion.)
    await waitFor(() => stack.daemonStorage().images.length === img.layers.length, 60_000, 'every layer converted');
    await assertDirsMatchSnapshots(stack);
    await stack.ctr(['run', '-d', '--snapshotter=dedup', ref, 'c1', '/bin/sh', '-c', 'while true; do cat /etc/passwd > /dev/null; sleep 0.2; done'], { timeoutMs: 60_000 });
    try {
      const before = stack.daemonStorage();
      assert.equal(before.images.length, img.layers.length, `one EROFS image per layer: ${JSON.stringify(before)}`);
      assert.equal(before.mounted.length, img.layers.length, `every layer image mounted: ${JSON.stringify(before)}`);

      const old = stack.daemon;
      const code = await old.stop();
      t.diagnostic(`daemon exited with ${code} on SIGTERM`);
      assert.equal(code, 0, `daemon exit code on SIGTERM; output tail:\n${old.output().slice(-3000)}`);
      // The container keeps running without the daemon.
      const mid = await stack.ctr(['tasks', 'exec', '--exec-id', 'e0', 'c1', '/bin/cat', '/etc/passwd'], { timeoutMs: 30_000 });
      assert.equal(mid.stdout, img.def.passwd, 'container reads its rootfs while the daemon is down');

      await stack.restartDaemon();
      assert.notEqual(stack.daemon.proc.pid, old.proc.pid);
      await waitFor(() => stack.daemon.logs().some((l) => l.msg === 'chunk store checked'), 20_000, '"chunk store checked" after restart');
      await waitReconnected(stack);

      const r = await stack.ctr(['tasks', 'exec', '--exec-id', 'e1', 'c1', '/bin/cat', '/etc/passwd'], { timeoutMs: 30_000 });
      assert.equal(r.stdout, img.def.passwd);
      const d = await stack.ctr(['tasks', 'exec', '--exec-id', 'e2', 'c1', '/bin/sha256sum', '/app/data'], { timeoutMs: 30_000 });
      const { createHash } = await import('node:crypto');
      assert.equal(d.stdout.split(/\s+/)[0], createHash('sha256').update(pseudoRandom(3 * MiB, 'restart')).digest('hex'));
      const st = stack.daemonStorage();
      assert.deepEqual([...st.mounted].sort(), [...before.mounted].sort(), `the same layer images are mounted after restart: ${JSON.stringify(st)}`);
      assert.equal(st.images.length, img.layers.length);
      await assertDirsMatchSnapshots(stack);
      // A new container from the same image still works.
      assert.equal(await runCat(stack, ref, 'restart-new'), img.def.passwd);
    } finally {
      await stack.ctrTry(['tasks', 'kill', '-s', 'SIGKILL', 'c1']);
      await waitFor(async () => !/RUNNING/.test((await stack.ctrTry(['tasks', 'ls'])).stdout), 20_000, 'c1 to stop').catch(() => undefined);
      await stack.ctrTry(['tasks', 'delete', '-f', 'c1'], { timeoutMs: 30_000 });
      await stack.ctrTry(['containers', 'rm', 'c1']);
    }
    await stack.ctr(['images', 'rm', '--sync', ref]);
    await assertAllCollected(stack);
    assertNoDaemonErrors(stack);
  });

  test('parallel pulls of three images', async (t) => {
    const stack = await newStack();
    const defs = [0, 1, 2].map((i) =>
      imageDef(`dedup-test/par${i}`, `parallel-${i}`, [
        [
          { type: 'file', path: `app/own-${i}`, content: pseudoRandom(2 * MiB + i * 12345, `par-own-${i}`) },
          { type: 'file', path: 'app/common', content: pseudoRandom(4 * MiB, 'par-common') },
          { type: 'file', path: 'app/id', content: `image ${i}\n` },
        ],
      ]),
    );
    const imgs = await stack.pushImages(defs);
    const started = Date.now();
    await Promise.all(imgs.map((img) => stack.pull(img.ref as string, 'dedup')));
    t.diagnostic(`3 parallel pulls took ${Date.now() - started} ms`);
    for (const img of imgs) await assertCommittedChain(stack, 'dedup', img);
    for (const [i, img] of imgs.entries()) {
      assert.equal(await runCat(stack, img.ref as string, `par-run-${i}`), img.def.passwd);
      assert.equal(await runCat(stack, img.ref as string, `par-id-${i}`, '/app/id'), `image ${i}\n`);
    }
    await assertDirsMatchSnapshots(stack);
    // busybox once + (etc + app) per image
    const st = stack.daemonStorage();
    assert.equal(st.images.length, 1 + 2 * imgs.length, `EROFS images: ${JSON.stringify(st)}`);
    assertNoDaemonErrors(stack);
    await stack.ctr(['images', 'rm', '--sync', ...imgs.map((i) => i.ref as string)]);
    await assertAllCollected(stack);
    assertNoDaemonErrors(stack);
  });

  test('kill -9 during a conversion, restart, pull again', async (t) => {
    const stack = await newStack();
    const N = 200;
    const big: Entry[] = [{ type: 'dir', path: 'big' }];
    for (let i = 0; i < N; i++) big.push({ type: 'file', path: `big/f${String(i).padStart(3, '0')}`, content: pseudoRandom(256 * 1024, `kill9-${i}`) });
    const def: ImageDef = {
      name: 'dedup-test/kill9',
      tag: 'v1',
      passwd: passwdFor('kill9'),
      layers: [[...baseLayer(), { type: 'file', path: 'etc/passwd', content: passwdFor('kill9') }], big],
      expect: [],
    };
    const [img] = await stack.pushImages([def]);
    const ref = img.ref as string;

    const firstPull = stack.pull(ref, 'dedup').then(
      () => null,
      (err: Error) => err,
    );
    const daemon = stack.daemon;
    // Layer 0 converts first; the second "auto-converting" line is the big layer.
    await waitFor(() => autoConvertLines(stack).length >= 2, 120_000, 'conversion of the big layer to start');
    await daemon.kill();
    // A directory or an Apply names the snapshot; a registry fetch, the chain id it becomes (key).
    const killed = autoConvertLines(stack)[1];
    const bigId = String(killed.snapshot ?? killed.key);
    const finished = convertedLines(stack).some((l) => String(killed.snapshot === undefined ? (l as unknown as { key: string }).key : l.snapshot) === bigId);
    t.diagnostic(`killed during conversion of ${bigId}; conversion finished before the kill: ${finished}`);
    assert.ok(!finished, 'the kill came before the big layer conversion finished');
    // Conversion runs after Commit returns, so the pull may have finished
    // before the kill, or failed on a later call to the dead daemon.
    const pullErr = await firstPull;
    t.diagnostic(`first pull: ${pullErr ? `failed: ${pullErr.message.split('\n')[0]}` : 'succeeded'}`);

    await stack.restartDaemon();
    await waitFor(() => stack.daemon.logs().some((l) => l.msg === 'chunk store checked'), 20_000, '"chunk store checked" after restart');
    await waitReconnected(stack);
    await assertDirsMatchSnapshots(stack);
    const st0 = stack.daemonStorage();
    t.diagnostic(`after restart: ${JSON.stringify(st0)}; daemon snapshots ${JSON.stringify(await daemonSnapshotNames(stack))}; containerd ${JSON.stringify(await stack.snapshots("dedup"))}`);

    await stack.pull(ref, 'dedup');
    await assertCommittedChain(stack, 'dedup', img);
    // The interrupted conversion is redone: by start-up recovery if the
    // layer was committed, or after the second pull committed it.
    await waitFor(() => convertedLines(stack).some((l) => l.logical_bytes >= N * 256 * 1024), 60_000, 'the big layer converted');
    const bigLine = convertedLines(stack).find((l) => l.logical_bytes >= N * 256 * 1024);
    assert.ok(bigLine, 'the big layer was converted after the restart');
    t.diagnostic(`big layer conversion after restart: ${JSON.stringify(bigLine)}`);
    assert.equal(await runCat(stack, ref, 'kill9-run'), def.passwd);
    const { createHash } = await import('node:crypto');
    const sum = await stack.ctr(['run', '--snapshotter=dedup', '--rm', ref, 'kill9-sum', '/bin/sha256sum', '/big/f199'], { timeoutMs: 60_000 });
    assert.equal(sum.stdout.split(/\s+/)[0], createHash('sha256').update(pseudoRandom(256 * 1024, 'kill9-199')).digest('hex'));
    await assertDirsMatchSnapshots(stack);

    await stack.ctr(['images', 'rm', '--sync', ref]);
    await assertAllCollected(stack);
    assert.deepEqual(mountsUnder(stack.dir), [], 'no mounts left');
    assertNoDaemonErrors(stack);
  });
});
