/**
 * The background scrub (integrity.scrub_*): damage that appears in the chunk
 * store while the daemon runs is found at the configured pace, the layers on
 * it are quarantined (their mounts taken down, Prepare/View on them refused
 * with FailedPrecondition) and the other layers keep being served. And the
 * move of the store out of cache/ for a ROOT written by an older version.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import Database from 'better-sqlite3';
import { SnapshotterError } from '../src/errdefs/errors';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { tempDir, waitFor } from './helpers/daemon';
import { pseudoRandom } from './helpers/images';
import { isMountPoint, unmountUnder } from './helpers/mounts';

const dir = tempDir('scrub');

after(async () => {
  await unmountUnder(dir);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Commits a layer holding `files` (sync conversion); returns its snapshot id. */
async function layer(sn: Snapshotter, name: string, files: Record<string, Buffer>): Promise<string> {
  const mounts = await sn.prepare(`active-${name}`, '');
  const upper = mounts[0].source;
  for (const [f, data] of Object.entries(files)) fs.writeFileSync(path.join(upper, f), data);
  await sn.commit(name, `active-${name}`);
  return sn.ms.getInfo(name).id;
}

test('damage found by the scrub while running quarantines only the layers on it', async () => {
  const root = path.join(dir, 'root');
  const sn = new Snapshotter({ root, erofs: { chunkSize: 65536, mkfs: 'mkfs.erofs', convertMode: 'sync' }, integrity: { scrubMbps: 1000, scrubIntervalMs: 300 } });
  try {
    await sn.recover();
    const damaged = await layer(sn, 'damaged', { 'a.bin': pseudoRandom(512 * 1024, 'scrub-a') });
    const whole = await layer(sn, 'whole', { 'b.bin': pseudoRandom(256 * 1024, 'scrub-b') });
    assert.ok(isMountPoint(path.join(root, 'mnt', damaged)));
    // Bytes of the first layer's first chunk flipped under the running daemon.
    const db = new Database(path.join(root, 'metadata.db'), { readonly: true });
    const { blkaddr } = db.prepare('SELECT c.blkaddr FROM chunks c JOIN layer_chunks lc ON lc.chunk_id = c.id WHERE lc.snapshot_id = ? ORDER BY c.blkaddr LIMIT 1').get(Number(damaged)) as { blkaddr: number };
    db.close();
    const fd = fs.openSync(path.join(root, 'store', 'chunks.blob'), 'r+');
    fs.writeSync(fd, Buffer.alloc(7, 0x5a), 0, 7, blkaddr * 4096 + 4000);
    fs.closeSync(fd);

    await waitFor(() => sn.integrity?.isQuarantined(damaged) !== null, 15_000, 'the scrub to quarantine the damaged layer');
    assert.match(sn.integrity?.isQuarantined(damaged) ?? '', /1 chunk of its data is lost or damaged/);
    assert.equal(sn.integrity?.isQuarantined(whole), null, 'the other layer is still served');
    assert.ok(!isMountPoint(path.join(root, 'mnt', damaged)), 'the quarantined layer is unmounted');
    await assert.rejects(sn.view('v-damaged', 'damaged'), (err: unknown) => err instanceof SnapshotterError && err.kind === 'FailedPrecondition' && /quarantined/.test(err.message));
    const mounts = await sn.view('v-whole', 'whole');
    assert.equal(mounts.length, 1);
    // The quarantine can come from the chunk being marked bad, before the pass that found it ends and is counted.
    await waitFor(() => (sn.integrity?.scrubbedBytes ?? 0) > 0, 15_000, 'a scrub pass to be counted');
    assert.match(sn.integrity?.healthProblem() ?? '', /1 layer is quarantined/);
  } finally {
    sn.close();
  }
});

test('a store at the old place (cache/chunks.blob) is moved to store/ at start and serves as before', async () => {
  const root = path.join(dir, 'old-layout');
  let sn = new Snapshotter({ root, erofs: { chunkSize: 65536, mkfs: 'mkfs.erofs', convertMode: 'sync' } });
  const data = pseudoRandom(300 * 1024, 'old-layout');
  try {
    await sn.recover();
    await layer(sn, 'old', { 'f.bin': data });
  } finally {
    sn.close();
  }
  // What an older version left: the store under cache/, and (a reboot) no mounts.
  await unmountUnder(root);
  fs.mkdirSync(path.join(root, 'cache'), { recursive: true });
  fs.renameSync(path.join(root, 'store', 'chunks.blob'), path.join(root, 'cache', 'chunks.blob'));
  sn = new Snapshotter({ root, erofs: { chunkSize: 65536, mkfs: 'mkfs.erofs', convertMode: 'sync' } });
  try {
    await sn.recover();
    assert.ok(fs.existsSync(path.join(root, 'store', 'chunks.blob')));
    assert.ok(!fs.existsSync(path.join(root, 'cache', 'chunks.blob')));
    assert.equal(sn.store?.stats().badChunks, 0);
    assert.deepEqual(sn.integrity?.problems(), []);
    assert.ok(fs.readFileSync(path.join(sn.layerRoots('old')[0].root, 'f.bin')).equals(data));
    // The guide's clean-up now touches nothing the layers need.
    fs.rmSync(path.join(root, 'cache'), { recursive: true, force: true });
  } finally {
    sn.close();
  }
  await unmountUnder(root);
  sn = new Snapshotter({ root, erofs: { chunkSize: 65536, mkfs: 'mkfs.erofs', convertMode: 'sync' } });
  try {
    await sn.recover();
    assert.ok(fs.readFileSync(path.join(sn.layerRoots('old')[0].root, 'f.bin')).equals(data));
  } finally {
    sn.close();
  }
});
