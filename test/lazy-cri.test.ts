/**
 * Lazy pull through containerd: its CRI ImageService pulls a dedup image
 * with this snapshotter; each layer's Prepare carries the CRI labels, the
 * daemon makes the layer from metadata and chunks and answers
 * AlreadyExists, and containerd downloads no layer blob. A container then
 * runs from the image.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { RegistryClient } from '../src/remote/registry';
import { CriImages } from './helpers/cri';
import { cleanupDaemons } from './helpers/daemon';
import { convertForTest } from './helpers/dedup';
import { daemonStats } from './helpers/http';
import { busyboxImageDef } from './helpers/images';
import { Stack } from './helpers/stack';

after(() => cleanupDaemons());

test('CRI pull of a dedup image: no layer blob downloaded by containerd, layers made remotely, a container runs', async () => {
  const stack = await Stack.start({ cri: true });
  const client = new RegistryClient({ plainHttpHosts: [stack.registry] });
  const cri = new CriImages(stack.containerdAddress);
  try {
    const [img] = await stack.pushImages([busyboxImageDef()]);
    const dst = `${stack.registry}/dedup/busybox:v1`;
    const converted = await convertForTest(client, `${stack.registry}/${img.def.name}:${img.def.tag}`, dst, stack.dir);

    await cri.pull(dst);

    const content = (await stack.ctr(['content', 'ls', '-q'], { ns: 'k8s.io' })).stdout.split('\n').map((l) => l.trim());
    for (const l of converted.layers) assert.ok(!content.includes(l.digest), `containerd did not download layer ${l.digest}`);
    assert.ok(content.includes(converted.manifestDigest), 'the manifest is in the content store (sanity)');

    const remote = stack.daemon.logs().filter((l) => l.op === 'remote' && typeof l.fetched_chunks === 'number');
    assert.equal(remote.length, converted.layers.length, 'every layer was made remotely');
    const snaps = await stack.snapshots('dedup', 'k8s.io');
    assert.equal(snaps.filter((s) => s.kind === 'Committed').length, converted.layers.length);

    const out = await stack.ctr(['run', '--snapshotter', 'dedup', '--rm', dst, 'lazy-cri-1', 'cat', '/etc/passwd'], { ns: 'k8s.io', timeoutMs: 60_000 });
    assert.equal(out.stdout, img.def.passwd);

    const stats = await daemonStats(stack.daemon.apiAddress);
    assert.equal(stats.remote.layers, converted.layers.length);
    assert.ok(stats.ondemand.misses > 0 && stats.remote.bytes_fetched > 0);
    if (stats.ondemand.backend === 'fanotify') {
      // Nothing fetched before the container ran; its reads were served as they came.
      assert.ok(remote.every((l) => l.ondemand === 'fanotify' && l.fetched_chunks === 0), 'layers mounted with metadata only');
      assert.ok(stats.ondemand.requests > 0 && stats.ondemand.errors === 0, `reads served on demand: ${JSON.stringify(stats.ondemand)}`);
    }
  } finally {
    cri.close();
    client.close();
    await stack.stop();
  }
});
