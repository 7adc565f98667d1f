/**
 * Plain layers fetched by the daemon (registry.fetch_layers, the default):
 * a CRI pull names the image and the layer on each layer's Prepare; the
 * daemon reads every layer of the image from the registry, converts it in
 * one pass, several at once, and answers AlreadyExists, so containerd
 * downloads and unpacks no layer. When the registry refuses the daemon
 * (403 from a proxy that refuses the daemon's layer downloads only),
 * containerd's own path takes each layer and the pull still succeeds.
 * When the registry serves other bytes of the right size for a layer
 * (the layer blob is not hashed as it streams), the diff id check refuses
 * them and containerd's path takes that layer. Each compares the tree with
 * the same image pulled through overlayfs.
 */
import assert from 'node:assert/strict';
import type http from 'node:http';
import path from 'node:path';
import zlib from 'node:zlib';
import { after, test } from 'node:test';
import { CriImages } from './helpers/cri';
import { cleanupDaemons } from './helpers/daemon';
import { type BuiltImage, tortureImageDef } from './helpers/images';
import { type RegistryProxy, startRegistry, startRegistryProxy } from './helpers/registry';
import { Stack, assertDirsMatchSnapshots, assertNoDaemonErrors } from './helpers/stack';
import { type Tree, checkExpect, diffTrees, protectedView, walkMounted } from './helpers/trees';

after(() => cleanupDaemons());

/** The image's top layer through `snapshotter` in namespace `ns`, walked. */
async function treeOf(stack: Stack, snapshotter: string, img: BuiltImage, ns: string): Promise<Tree> {
  const key = `fetch-view-${snapshotter}-${ns}`;
  const mounts = await protectedView(stack, snapshotter, key, img.chainIds[img.chainIds.length - 1], ns);
  try {
    return await walkMounted(mounts, path.join(stack.dir, `mnt-${key}`));
  } finally {
    await stack.ctr(['snapshots', '--snapshotter', snapshotter, 'rm', key], { ns });
  }
}

/** The tree dedup presents equals overlayfs's and meets the image's own expectations. */
async function assertSameTree(stack: Stack, img: BuiltImage): Promise<void> {
  await stack.pull(img.ref as string, 'overlayfs');
  const want = await treeOf(stack, 'overlayfs', img, 'default');
  const got = await treeOf(stack, 'dedup', img, 'k8s.io');
  assert.deepEqual(checkExpect(got, img.def.expect), [], 'the image expectations on the dedup tree');
  const diffs = diffTrees(want, got, 'overlayfs', 'dedup');
  assert.deepEqual(diffs, [], 'dedup presents the tree overlayfs does');
}

/** Layer blobs of `img` in containerd's content store (namespace k8s.io). */
async function downloadedLayers(stack: Stack, img: BuiltImage): Promise<string[]> {
  const content = (await stack.ctr(['content', 'ls', '-q'], { ns: 'k8s.io' })).stdout.split('\n').map((l) => l.trim());
  return img.layers.map((l) => l.digest).filter((d) => content.includes(d));
}

test('CRI pull of a plain image: the daemon fetches and converts every layer, several at once; containerd downloads none', async () => {
  const stack = await Stack.start({ cri: true });
  const cri = new CriImages(stack.containerdAddress);
  try {
    const [img] = await stack.pushImages([tortureImageDef()]);
    assert.ok(img.diffIds.length >= 3, 'an image of several layers');
    await cri.pull(img.ref as string);

    const logs = stack.daemon.logs();
    const converted = logs.filter((l) => l.op === 'fetch' && typeof l.logical_bytes === 'number');
    assert.deepEqual(converted.map((l) => l.diff_id), img.diffIds, 'one "converted layer … from its registry blob" line per layer, in order');
    assert.ok(converted.every((l) => typeof l.msg === 'string' && /^converted layer \d+ to EROFS from its registry blob sha256:[0-9a-f]{64}: /.test(l.msg)), 'the converted lines');
    // The first Prepare started the layers above it: a second layer began before the first was recorded.
    const started = logs.findIndex((l, i) => l.op === 'fetch' && typeof l.msg === 'string' && l.msg.startsWith('fetching layer ') && logs.slice(0, i).some((p) => p.op === 'fetch' && String(p.msg).startsWith('fetching layer ')));
    const firstDone = logs.indexOf(converted[0]);
    assert.ok(started >= 0 && started < firstDone, 'a second layer was being fetched before the first was recorded');
    assert.deepEqual(await downloadedLayers(stack, img), [], 'containerd downloaded no layer blob');
    // Each layer is an image at once: no directory was ever unpacked.
    assert.equal(logs.filter((l) => l.op === 'convert' || l.op === 'apply').length, 0, 'no directory conversion and no Apply');
    await assertDirsMatchSnapshots(stack, 60_000);

    await assertSameTree(stack, img);
    assertNoDaemonErrors(stack);
  } finally {
    cri.close();
    await stack.stop();
  }
});

/** A CRI stack whose registry sits behind a proxy answering `intercept` (see startRegistryProxy); `body` runs in it, everything is stopped after. */
async function withProxiedRegistry(intercept: Parameters<typeof startRegistryProxy>[2], body: (stack: Stack, cri: CriImages, proxy: RegistryProxy) => Promise<void>): Promise<void> {
  const registry = await startRegistry();
  const proxy = await startRegistryProxy(registry.host, 'pass', intercept);
  const stack = await Stack.start({ cri: true, registry: proxy.host });
  const cri = new CriImages(stack.containerdAddress);
  try {
    await body(stack, cri, proxy);
  } finally {
    cri.close();
    await stack.stop();
    await proxy.stop();
    await registry.stop();
  }
}

test("the registry refuses the daemon's layer downloads (403): containerd fetches and unpacks them, the pull succeeds", async () => {
  let layerDigests: string[] = [];
  const refuse = (req: http.IncomingMessage) => (String(req.headers['user-agent']).startsWith('dedup-snapshotter') && layerDigests.some((d) => req.url?.endsWith(`/blobs/${d}`)) ? 403 : null);
  await withProxiedRegistry(refuse, async (stack, cri, proxy) => {
    const [img] = await stack.pushImages([tortureImageDef()]);
    layerDigests = img.layers.map((l) => l.digest);
    await cri.pull(img.ref as string);

    assert.ok(proxy.refused >= 1, 'the proxy refused the daemon');
    const logs = stack.daemon.logs();
    const fellBack = logs.filter((l) => l.op === 'fetch' && typeof l.msg === 'string' && /from its registry failed: .*403.*; containerd fetches and unpacks it$/.test(l.msg));
    assert.equal(fellBack.length, img.diffIds.length, 'one warning per layer, naming the refusal');
    assert.equal(logs.filter((l) => l.op === 'fetch' && typeof l.logical_bytes === 'number').length, 0, 'no layer made from the registry');
    assert.deepEqual(await downloadedLayers(stack, img), layerDigests, 'containerd downloaded every layer blob');
    // containerd unpacked each layer into a directory; the daemon converts it afterwards.
    await assertDirsMatchSnapshots(stack, 120_000);

    await assertSameTree(stack, img);
    assertNoDaemonErrors(stack);
  });
});

/** A gzip of an empty tar padded to exactly `size` bytes with a header comment: valid, but not the layer. */
function impostorOfSize(size: number): Buffer {
  const gz = zlib.gzipSync(Buffer.alloc(1024));
  const pad = size - gz.length - 1;
  assert.ok(pad > 0, `a layer blob of ${size} bytes is big enough to imitate`);
  const header = Buffer.from(gz.subarray(0, 10));
  header[3] |= 0x10; // FCOMMENT
  return Buffer.concat([header, Buffer.alloc(pad, 0x78), Buffer.from([0]), gz.subarray(10)]);
}

test('the registry serves the daemon other bytes of the right size for a layer: its diff id refuses them, containerd takes that layer', async () => {
  let target: { digest: string; size: number } | null = null;
  const substitute = (req: http.IncomingMessage) =>
    target && String(req.headers['user-agent']).startsWith('dedup-snapshotter') && req.method === 'GET' && req.url?.endsWith(`/blobs/${target.digest}`) ? impostorOfSize(target.size) : null;
  await withProxiedRegistry(substitute, async (stack, cri, proxy) => {
    const [img] = await stack.pushImages([tortureImageDef()]);
    const victim = 1;
    target = { digest: img.layers[victim].digest, size: img.layers[victim].gz.length };
    await cri.pull(img.ref as string);

    assert.ok(proxy.substituted >= 1, 'the proxy served the impostor');
    const logs = stack.daemon.logs();
    const fellBack = logs.filter((l) => l.op === 'fetch' && typeof l.msg === 'string' && l.msg.includes('from its registry failed'));
    assert.deepEqual(fellBack.map((l) => l.layer_digest), [target.digest], 'one warning, for that layer');
    assert.match(String(fellBack[0].msg), new RegExp(`its tar hashes to sha256:[0-9a-f]{64}, the image config names ${img.diffIds[victim]}`));
    assert.deepEqual(logs.filter((l) => l.op === 'fetch' && typeof l.logical_bytes === 'number').map((l) => l.diff_id), img.diffIds.filter((_, i) => i !== victim), 'the other layers came from the registry');
    assert.ok((await downloadedLayers(stack, img)).includes(target.digest), 'containerd downloaded that layer itself');
    await assertDirsMatchSnapshots(stack, 120_000);

    await assertSameTree(stack, img);
    assertNoDaemonErrors(stack);
  });
});

test('an image named by a registry reached only through a mirror (hosts.toml): the daemon fetches its layers through the mirror too', async () => {
  const alias = 'mirror-only.invalid:5000';
  const stack = await Stack.start({ cri: true, registryAlias: alias });
  const cri = new CriImages(stack.containerdAddress);
  try {
    const [pushed] = await stack.pushImages([tortureImageDef()]);
    const ref = (pushed.ref as string).replace(stack.registry, alias);
    const img = { ...pushed, ref };
    await cri.pull(ref);

    const logs = stack.daemon.logs();
    const converted = logs.filter((l) => l.op === 'fetch' && typeof l.logical_bytes === 'number');
    assert.deepEqual(converted.map((l) => l.diff_id), img.diffIds, 'every layer came from the registry through the mirror');
    assert.ok(converted.every((l) => String(l.image).startsWith(`${alias}/`)), 'logged under the name the pull used');
    assert.equal(logs.filter((l) => l.op === 'fetch' && String(l.msg).includes('failed')).length, 0, 'no fallback');
    assert.deepEqual(await downloadedLayers(stack, img), [], 'containerd downloaded no layer blob');
    await assertDirsMatchSnapshots(stack, 60_000);
    // The same image by the registry's own name through overlayfs is the reference tree.
    await assertSameTree(stack, pushed);
    assertNoDaemonErrors(stack);
  } finally {
    cri.close();
    await stack.stop();
  }
});
