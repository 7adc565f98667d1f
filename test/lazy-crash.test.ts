/**
 * kill -9 of the daemon while it makes a remote layer (chunks half
 * fetched): after a restart nothing of the attempt remains (no temporary
 * snapshot, no spool, no chunk or image), and the same Prepare then makes
 * the layer whole. A proxy in front of the registry holds the chunk
 * requests so the kill lands mid-fetch every time.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST, LABEL_SNAPSHOT_REF } from '../src/remote/lazy';
import { RegistryClient } from '../src/remote/registry';
import { call, cleanupDaemons, list, snapshotsClient, startDaemon, tempDir, waitFor } from './helpers/daemon';
import { convertForTest } from './helpers/dedup';
import { buildImage, busyboxImageDef, chainIds, pseudoRandom, pushImage } from './helpers/images';
import { startRegistry, startRegistryProxy } from './helpers/registry';

after(() => cleanupDaemons());

test('kill -9 mid-fetch of a remote layer leaves nothing; after a restart the same Prepare makes the layer', async () => {
  const registry = await startRegistry();
  // Holds Range requests (chunk fetches) so the kill lands mid-fetch.
  const proxy = await startRegistryProxy(registry.host, 'hold');
  const proxyHost = proxy.host;
  const dir = tempDir('lazy-crash');
  const client = new RegistryClient({ plainHttpHosts: [registry.host] });
  try {
    const def = { ...busyboxImageDef(), name: 'test/crash', layers: [[{ type: 'file' as const, path: 'data.bin', content: pseudoRandom(3 << 20, 'lazy-crash') }]] };
    const img = await buildImage(def);
    const src = await pushImage(img, registry.host, dir);
    const converted = await convertForTest(client, src, `${registry.host}/dedup/crash:v1`, dir);
    const chain = chainIds(converted.layers.map((l) => l.digest));
    const labels = {
      [LABEL_SNAPSHOT_REF]: chain[0],
      [LABEL_CRI_IMAGE_REF]: `${proxyHost}/dedup/crash:v1`,
      [LABEL_CRI_LAYER_DIGEST]: converted.layers[0].digest,
      [LABEL_CRI_MANIFEST_DIGEST]: converted.manifestDigest,
    };
    // The fetch backend: chunks are fetched during Prepare (on demand, Prepare fetches none).
    const config = { registry: { plain_http_hosts: [proxyHost] }, ondemand: { backend: 'fetch' } };
    const d = await startDaemon({ dir, convertMode: 'sync', config });
    const c = snapshotsClient(d.address);
    const pending = call(c, 'Prepare', { key: `extract-1 ${chain[0]}`, parent: '', labels }).catch((e) => e);
    await waitFor(() => proxy.held() > 0, 20_000, 'a chunk request reaching the proxy');
    assert.ok(fs.readdirSync(path.join(d.root, 'tmp')).some((f) => f.startsWith('remote-import-')), 'a spool exists mid-fetch');
    await d.kill();
    await pending;

    proxy.mode = 'pass';
    proxy.release();
    const d2 = await startDaemon({ dir, root: d.root, address: d.address, convertMode: 'sync', config });
    const c2 = snapshotsClient(d2.address);
    const left = (await list(c2)).map((i) => i.name);
    assert.deepEqual(left, [], 'no snapshot left by the killed attempt');
    assert.deepEqual(fs.readdirSync(path.join(d2.root, 'tmp')), [], 'no spool left');
    assert.deepEqual(fs.readdirSync(path.join(d2.root, 'images')), [], 'no image left');

    const err = await call(c2, 'Prepare', { key: `extract-2 ${chain[0]}`, parent: '', labels }).catch((e) => e);
    assert.equal(err?.code, 6, `AlreadyExists after the restart: ${err}`);
    const info = await call(c2, 'Stat', { key: chain[0] });
    assert.equal(info.info.kind, 3, 'committed');
    const remoteLine = d2.logs().find((l) => l.op === 'remote' && typeof l.fetched_chunks === 'number');
    assert.ok(remoteLine, 'the restarted daemon made the layer');
    assert.equal(remoteLine.logical_bytes, 3 << 20);
    await d2.stop();
  } finally {
    client.close();
    await proxy.stop();
    await registry.stop();
  }
});
