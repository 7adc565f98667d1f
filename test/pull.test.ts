/**
 * `dedup-snapshotter pull REF` for ctr users: through containerd's API the
 * dedup image lands in `ctr images ls` without any layer blob in
 * containerd's content store, `ctr run --snapshotter=dedup` runs it, and
 * `ctr images rm` lets containerd's GC take its snapshots again.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { promisify } from 'node:util';
import { RegistryClient } from '../src/remote/registry';
import { cleanupDaemons, waitFor } from './helpers/daemon';
import { convertForTest } from './helpers/dedup';
import { busyboxImageDef, chainIds } from './helpers/images';
import { Stack } from './helpers/stack';
import { protectedView } from './helpers/trees';

const run = promisify(execFile);
const BIN = path.join(__dirname, '..', '..', 'bin', 'dedup-snapshotter');

after(() => cleanupDaemons());

test('pull REF: the image is in ctr images ls, no layer blob downloaded, ctr run works, images rm frees the layers', async () => {
  const stack = await Stack.start();
  const client = new RegistryClient({ plainHttpHosts: [stack.registry] });
  try {
    const [img] = await stack.pushImages([busyboxImageDef()]);
    const dst = `${stack.registry}/dedup/busybox:v1`;
    const converted = await convertForTest(client, `${stack.registry}/${img.def.name}:${img.def.tag}`, dst, stack.dir);

    const r = await run(process.execPath, [BIN, 'pull', '--plain-http', '--address', stack.containerdAddress, dst], { env: { ...process.env, CONFIG: '' } });
    assert.match(r.stdout, new RegExp(`@${converted.digest}: ${converted.layers.length} layers ready in namespace default`));
    assert.match(r.stderr, new RegExp(`layer ${converted.layers.length}/${converted.layers.length}: `));

    const images = (await stack.ctr(['images', 'ls', '-q'])).stdout.split('\n');
    assert.ok(images.includes(dst), `ctr images ls shows ${dst}`);
    const content = (await stack.ctr(['content', 'ls', '-q'])).stdout.split('\n');
    for (const l of converted.layers) assert.ok(!content.includes(l.digest), `no layer blob ${l.digest} in containerd`);
    const out = await stack.ctr(['run', '--snapshotter', 'dedup', '--rm', dst, 'pull-t1', 'cat', '/etc/passwd'], { timeoutMs: 60_000 });
    assert.equal(out.stdout, img.def.passwd);

    // The image's rootfs mounted without a container, as docs/lazy-pull.md shows
    // (containerd 1.6's `ctr images mount` ignores --snapshotter); the view
    // labeled gc.root, or a GC the `run --rm` scheduled may take it.
    const top = chainIds(converted.layers.map((l) => l.digest)).pop() as string;
    await protectedView(stack, 'dedup', 'pull-view', top);
    const target = path.join(stack.dir, 'pull-view');
    fs.mkdirSync(target);
    const cmd = (await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'mounts', target, 'pull-view'])).stdout;
    assert.match(cmd, /^mount -t overlay overlay /);
    await run('sh', ['-c', cmd]);
    try {
      assert.equal(fs.readFileSync(path.join(target, 'etc', 'passwd'), 'utf8'), img.def.passwd);
    } finally {
      await run('umount', [target]);
      await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'rm', 'pull-view']);
    }

    // Pulling again is a no-op that succeeds.
    await run(process.execPath, [BIN, 'pull', '--plain-http', '--address', stack.containerdAddress, dst], { env: { ...process.env, CONFIG: '' } });

    // Removing the image lets containerd's GC remove the layers (they were only referenced by it).
    await stack.ctr(['images', 'rm', '--sync', dst]);
    await waitFor(async () => (await stack.snapshots('dedup')).length === 0, 30_000, 'dedup snapshots collected');

    // A plain image is refused with a hint; nothing is created.
    let failed: { code: number; stderr: string } | null = null;
    try {
      await run(process.execPath, [BIN, 'pull', '--plain-http', '--address', stack.containerdAddress, `${stack.registry}/${img.def.name}:${img.def.tag}`], { env: { ...process.env, CONFIG: '' } });
    } catch (err) {
      failed = err as { code: number; stderr: string };
    }
    assert.equal(failed?.code, 1);
    assert.match(failed?.stderr ?? '', /not a dedup image/);
  } finally {
    client.close();
    await stack.stop();
  }
});
