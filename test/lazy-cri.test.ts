/**
 * Lazy pull through containerd: its CRI ImageService pulls a dedup image
 * with this snapshotter; each layer's Prepare carries the CRI labels, the
 * daemon makes the layer from metadata and chunks and answers
 * AlreadyExists, and containerd downloads no layer blob. A container then
 * runs from the image. And shared converted layers: one node pushes the
 * layers of a plain image it converted, a second node pulls that plain
 * image lazily from them.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, test } from 'node:test';
import { convertedLayerTag } from '../src/remote/dedup-image';
import { RegistryClient } from '../src/remote/registry';
import { CriImages } from './helpers/cri';
import { atLeast, defaultContainerd } from './helpers/containerd-builds';
import { SLOW, cleanupDaemons, waitFor } from './helpers/daemon';
import { convertForTest } from './helpers/dedup';
import { daemonStats } from './helpers/http';
import { busyboxImageDef, tortureImageDef } from './helpers/images';
import { Stack, assertDirsMatchSnapshots } from './helpers/stack';
import { type Tree, checkExpect, diffTrees, protectedView, walkMounted } from './helpers/trees';

after(() => cleanupDaemons());

/** The labels a CRI pull puts on each layer's Prepare: the remote-snapshot contract the daemon's lazy path reads. */
const CRI_LABELS = [
  'containerd.io/snapshot.ref',
  'containerd.io/snapshot/cri.image-layers',
  'containerd.io/snapshot/cri.image-ref',
  'containerd.io/snapshot/cri.layer-digest',
  'containerd.io/snapshot/cri.manifest-digest',
];

/** containerd 2.1's line when a CRI image setting (here disable_snapshot_annotations) turns its transfer-service pull off. */
const LOCAL_PULL_FALLBACK = /Falling back to local image pull mode/;

/**
 * The pull paths CRI has on the containerd this file runs: 1.6 and 1.7 pull
 * in the CRI plugin itself (client-side unpack); 2.1 pulls through the
 * transfer service unless a setting only the local pull knows is present,
 * so the stack runs it both ways there.
 */
const criPulls: ('local' | 'transfer')[] = (() => {
  const b = defaultContainerd();
  return atLeast(b, 2, 1) ? ['local', 'transfer'] : ['local'];
})();

for (const criPull of criPulls) {
  test(`CRI pull (${criPull}) of a dedup image: no layer blob downloaded by containerd, layers made remotely, a container runs`, () => lazyCriPull(criPull));
}

async function lazyCriPull(criPull: 'local' | 'transfer'): Promise<void> {
  const stack = await Stack.start({ cri: true, criPull });
  const client = new RegistryClient({ plainHttpHosts: [stack.registry] });
  const cri = new CriImages(stack.containerdAddress);
  try {
    const [img] = await stack.pushImages([busyboxImageDef()]);
    const dst = `${stack.registry}/dedup/busybox:v1`;
    const converted = await convertForTest(client, `${stack.registry}/${img.def.name}:${img.def.tag}`, dst, stack.dir);

    const logFrom = stack.daemon.logs().length;
    await cri.pull(dst);
    if (atLeast(stack.build, 2, 1)) {
      // 2.1 says when it leaves the transfer service: the stack's 'local' config must make it, 'transfer' must not.
      assert.equal(LOCAL_PULL_FALLBACK.test(stack.containerdLog()), criPull === 'local', `containerd ${stack.build.version} pulled through ${criPull === 'local' ? 'its local pull' : 'the transfer service'}`);
    }
    // Every version and both 2.1 paths label each layer's Prepare alike (docs/architecture.md, "What differs between containerd versions"); without these labels the layer would be unpacked, not made remotely.
    const prepares = stack.daemon
      .logs()
      .slice(logFrom)
      .filter((l) => l.op === 'prepare' && l.ns === 'k8s.io' && (l.msg === 'rpc done' || String(l.msg).startsWith('prepare answered AlreadyExists')));
    assert.equal(prepares.length, converted.layers.length, 'one Prepare per layer');
    for (const p of prepares) assert.deepEqual([...((p.label_keys as string[] | undefined) ?? [])].sort(), CRI_LABELS, `labels of Prepare ${String(p.key)}`);

    const content = (await stack.ctr(['content', 'ls', '-q'], { ns: 'k8s.io' })).stdout.split('\n').map((l) => l.trim());
    for (const l of converted.layers) assert.ok(!content.includes(l.digest), `containerd did not download layer ${l.digest}`);
    assert.ok(content.includes(converted.manifestDigest), 'the manifest is in the content store (sanity)');

    const remote = stack.daemon.logs().filter((l) => l.op === 'remote' && typeof l.fetched_chunks === 'number');
    assert.equal(remote.length, converted.layers.length, 'every layer was made remotely');
    // containerd's contract answers those Prepares with AlreadyExists: a success, not a failure line.
    const failed = stack.daemon.logs().filter((l) => l.msg === 'prepare failed');
    assert.deepEqual(failed, [], 'no "prepare failed" line for a remote layer');
    assert.equal(stack.daemon.logs().filter((l) => l.op === 'prepare' && l.code === 'AlreadyExists' && l.ns === 'k8s.io').length, converted.layers.length);
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
}

for (const fetchLayers of [true, false]) test(`shared converted layers (node A ${fetchLayers ? 'fetches the layers itself' : 'converts what containerd unpacked'}): node A pushes the plain layers it converted, node B pulls the plain image lazily from them`, async () => {
  const a = await Stack.start({ cri: true, daemonConfig: { registry: { push_converted: true, fetch_layers: fetchLayers } } });
  let b: Stack | null = null;
  const client = new RegistryClient({ plainHttpHosts: [a.registry] });
  const criA = new CriImages(a.containerdAddress);
  let criB: CriImages | null = null;
  try {
    const [img] = await a.pushImages([tortureImageDef()]);
    const ref = img.ref as string;
    const plainLayers = JSON.parse(img.manifest.toString('utf8')).layers.map((l: { digest: string }) => l.digest) as string[];
    const top = img.chainIds[img.chainIds.length - 1];
    const trees: Record<string, Tree> = {};
    const viewTree = async (stack: Stack, name: string) => {
      const mounts = await protectedView(stack, 'dedup', `shared-view-${name}`, top, 'k8s.io');
      trees[name] = await walkMounted(mounts, path.join(stack.dir, `mnt-shared-${name}`));
      await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'rm', `shared-view-${name}`], { ns: 'k8s.io' });
    };

    // Node A: its daemon fetches each layer from the registry and converts it (else containerd unpacks it and the daemon converts the directory), then shares it.
    await criA.pull(ref);
    const op = fetchLayers ? 'fetch' : 'convert';
    await waitFor(() => a.daemon.logs().filter((l) => l.op === op && typeof l.logical_bytes === 'number').length >= plainLayers.length, 120_000 * SLOW, `node A to convert every layer (${op})`);
    await assertDirsMatchSnapshots(a, 120_000);
    await waitFor(async () => (await daemonStats(a.daemon.apiAddress)).remote.shared.pending === 0, 120_000 * SLOW, 'node A to share its layers');
    const shared = (await daemonStats(a.daemon.apiAddress)).remote.shared;
    assert.deepEqual({ pushed: shared.pushed, failed: shared.failed }, { pushed: plainLayers.length, failed: 0 }, JSON.stringify(a.daemon.logs().filter((l) => l.op === 'push')));
    const pushLines = a.daemon.logs().filter((l) => l.op === 'push' && typeof l.tag === 'string');
    assert.deepEqual(pushLines.map((l) => l.layer_digest).sort(), [...plainLayers].sort(), 'one push line per plain layer, naming it');
    for (const d of plainLayers) {
      const m = await client.getManifest(`${a.registry}/${img.def.name}:${convertedLayerTag(d)}`);
      assert.equal((m.json as { annotations: Record<string, string> }).annotations['io.dedup-snapshotter.source.layer'], d);
    }
    await viewTree(a, 'unpacked');

    // Node B: same registry, its own containerd and daemon.
    b = await Stack.start({ cri: true, registry: a.registry, daemonConfig: { registry: { pull_converted: true } } });
    criB = new CriImages(b.containerdAddress);
    await criB.pull(ref);
    // A plain image's layers carry the same labels (pull_converted finds the shared layer by cri.layer-digest).
    const prepB = b.daemon.logs().filter((l) => l.op === 'prepare' && l.ns === 'k8s.io' && (l.msg === 'rpc done' || String(l.msg).startsWith('prepare answered AlreadyExists')));
    assert.equal(prepB.length, plainLayers.length, 'one Prepare per layer on node B');
    for (const p of prepB) assert.deepEqual([...((p.label_keys as string[] | undefined) ?? [])].sort(), CRI_LABELS, `labels of node B's Prepare ${String(p.key)}`);
    const content = (await b.ctr(['content', 'ls', '-q'], { ns: 'k8s.io' })).stdout.split('\n').map((l) => l.trim());
    for (const d of plainLayers) assert.ok(!content.includes(d), `node B's containerd did not download layer ${d}`);
    const remote = b.daemon.logs().filter((l) => l.op === 'remote' && typeof l.source_layer === 'string');
    assert.deepEqual(remote.map((l) => l.source_layer).sort(), [...plainLayers].sort(), 'every layer made from its shared converted layer');
    assert.equal((await daemonStats(b.daemon.apiAddress)).remote.converted_layers, plainLayers.length);

    // The rootfs made from shared layers is the one containerd unpacked, to the xattr and hardlink.
    await viewTree(b, 'shared');
    const expectFailures = checkExpect(trees.shared, img.def.expect);
    assert.deepEqual(expectFailures, [], `expected entries:\n${expectFailures.join('\n')}`);
    const diffs = diffTrees(trees.unpacked, trees.shared, 'node A (unpacked)', 'node B (shared)');
    assert.equal(diffs.length, 0, `${diffs.length} differences:\n${diffs.slice(0, 30).join('\n')}`);

    const out = await b.ctr(['run', '--snapshotter', 'dedup', '--rm', ref, 'shared-1', 'cat', '/etc/passwd'], { ns: 'k8s.io', timeoutMs: 60_000 });
    assert.equal(out.stdout, img.def.passwd);
  } finally {
    criB?.close();
    criA.close();
    client.close();
    await b?.stop();
    await a.stop();
  }
});
