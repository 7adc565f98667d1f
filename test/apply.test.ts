/**
 * dedup-differ's Apply against the Snapshotter with real mounts, the blob
 * given directly (containerd's content store stands aside here; the
 * end-to-end path through containerd 2.x is differential.test and
 * erofs-e2e.test in the matrix): a layer tar, plain, gzip- and
 * zstd-compressed, becomes the active snapshot's EROFS layer with the right
 * diff id and bytes, without a directory; Commit only names it; refusals
 * name what is wrong; a corrupt or hostile layer leaves no image, no chunk
 * and the snapshot as it was.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import zlib from 'node:zlib';
import { isKind } from '../src/errdefs/errors';
import { LayerApplier } from '../src/layers/apply';
import { mountAll } from '../src/mount/mount';
import { Snapshotter } from '../src/snapshot/snapshotter';
import { scratchDirs } from './helpers/daemon';
import { pseudoRandom } from './helpers/images';
import { unmountUnder } from './helpers/mounts';
import { RawTar } from './helpers/raw-tar';

const MiB = 1 << 20;
const workDir = scratchDirs();
const GZ = 'application/vnd.oci.image.layer.v1.tar+gzip';

const sha256 = (b: Buffer) => `sha256:${crypto.createHash('sha256').update(b).digest('hex')}`;

/** An applier over `sn`'s parts whose blobs come from `blobs` (digest → bytes). */
function applierOf(sn: Snapshotter, blobs: Map<string, Buffer>): LayerApplier {
  const e = sn.parts.erofs as NonNullable<typeof sn.parts.erofs>;
  return new LayerApplier({
    ms: sn.ms,
    layout: sn.parts.layout,
    store: e.store,
    converter: e.converter,
    conversion: e.conversion,
    mounts: sn.parts.mounts,
    events: sn.parts.events,
    chunkSize: MiB,
    logger: sn.parts.logger,
    containerdAddress: '/nonexistent.sock',
    content: (_ns, digest) => {
      const b = blobs.get(digest);
      if (!b) throw new Error(`no blob ${digest}`);
      return (async function* () {
        for (let i = 0; i < b.length; i += 100_000) yield b.subarray(i, i + 100_000);
      })();
    },
  });
}

function layerTar(big: Buffer): Buffer {
  return new RawTar()
    .entry({ name: 'etc/', typeflag: '5', mode: 0o755 })
    .entry({ name: 'etc/hello', mode: 0o644 }, 'hello from a tar\n')
    .entry({ name: 'big', mode: 0o600, uid: 7 }, big)
    .entry({ name: 'link', typeflag: '1', linkname: 'big', uid: 7 }) // a hardlink entry chowns the inode too (containerd's createTarFile)
    .entry({ name: '.wh.gone', mode: 0o644 })
    .finish();
}

describe('dedup-differ Apply', () => {
  test('plain, gzip and zstd layers become EROFS layers with the diff id of their tar, without a directory', async () => {
    const dir = workDir('apply');
    const sn = new Snapshotter({ root: path.join(dir, 'root'), erofs: { chunkSize: MiB, mkfs: 'mkfs.erofs', convertMode: 'background' } });
    try {
      const big = pseudoRandom(3 * MiB + 123, 'apply-big');
      const tar = layerTar(big);
      const zst = execFileSync('zstd', ['-q', '-c'], { input: tar, maxBuffer: 64 * MiB });
      const blobs = new Map<string, Buffer>();
      const forms: [string, Buffer, string][] = [
        ['plain', tar, 'application/vnd.oci.image.layer.v1.tar'],
        ['gzip', zlib.gzipSync(tar), GZ],
        ['zstd', zst, 'application/vnd.oci.image.layer.v1.tar+zstd'],
      ];
      for (const [, b] of forms) blobs.set(sha256(b), b);
      const applier = applierOf(sn, blobs);
      for (const [name, blob, mediaType] of forms) {
        const mounts = await sn.prepare(`ns/1/extract-${name}`, '');
        const applied = await applier.apply({ mediaType, digest: sha256(blob), size: blob.length, mounts, namespace: 'ns' });
        assert.equal(applied.digest, sha256(tar), `${name}: the diff id is the tar's digest`);
        assert.equal(applied.size, tar.length);
        assert.equal(applied.mediaType, 'application/vnd.oci.image.layer.v1.tar');
        const id = sn.ms.getInfo(`ns/1/extract-${name}`).id;
        assert.deepEqual(fs.readdirSync(path.join(dir, 'root', 'snapshots', id, 'fs')), [], 'nothing unpacked into the directory');
        await sn.commit(`ns/1/layer-${name}`, `ns/1/extract-${name}`);
        assert.ok(!fs.existsSync(path.join(dir, 'root', 'snapshots', id)), 'the empty directory goes at Commit');
        const v = path.join(dir, `view-${name}`);
        fs.mkdirSync(v);
        await mountAll(await sn.view(`ns/1/view-${name}`, `ns/1/layer-${name}`), v);
        assert.equal(fs.readFileSync(path.join(v, 'etc/hello'), 'utf8'), 'hello from a tar\n');
        assert.ok(fs.readFileSync(path.join(v, 'big')).equals(big));
        assert.equal(fs.statSync(path.join(v, 'big')).uid, 7);
        assert.equal(fs.statSync(path.join(v, 'link')).ino, fs.statSync(path.join(v, 'big')).ino, 'hardlink');
        const wh = fs.lstatSync(path.join(v, 'gone'));
        assert.ok(wh.isCharacterDevice() && wh.rdev === 0, 'whiteout as a 0/0 char device');
        await unmountUnder(v);
        await sn.remove(`ns/1/view-${name}`);
      }
      // Three layers, the same data: stored once.
      const st = (sn.store as NonNullable<typeof sn.store>).stats();
      assert.ok(st.storedBytes < 3 * MiB + 3 * 4096 + 200 * 1024, `stored ${st.storedBytes}`);
      assert.equal(sn.ms.layers().length, 3);
    } finally {
      sn.close();
    }
  });

  test('refusals name what is wrong; a corrupt or hostile layer leaves no image and no chunk', async () => {
    const dir = workDir('apply-bad');
    const root = path.join(dir, 'root');
    const sn = new Snapshotter({ root, erofs: { chunkSize: MiB, mkfs: 'mkfs.erofs', convertMode: 'background' } });
    try {
      const good = zlib.gzipSync(layerTar(pseudoRandom(2 * MiB, 'apply-bad')));
      const corrupt = Buffer.from(good);
      corrupt.fill(0x55, Math.floor(good.length / 2), Math.floor(good.length / 2) + 4096);
      const hostile = zlib.gzipSync(new RawTar().entry({ name: 'ok', mode: 0o644 }, pseudoRandom(MiB + 1, 'ok')).entry({ name: '../escape', mode: 0o644 }, 'x').finish());
      const blobs = new Map([good, corrupt, hostile].map((b) => [sha256(b), b]));
      const applier = applierOf(sn, blobs);
      const mounts = await sn.prepare('ns/1/extract', '');
      const req = { mediaType: GZ, digest: sha256(good), size: good.length, mounts, namespace: 'ns' };

      const foreign = [{ type: 'bind', source: '/var/lib/containerd/x/fs', options: ['rw'] }];
      await assert.rejects(applier.apply({ ...req, mounts: foreign }), (err: Error) => isKind(err, 'NotImplemented') && /only to dedup snapshots/.test(err.message));
      await assert.rejects(applier.apply({ ...req, mediaType: 'application/vnd.oci.image.layer.v1.tar+encrypted' }), (err: Error) => isKind(err, 'NotImplemented') && /media type/.test(err.message));
      await assert.rejects(applier.apply({ ...req, digest: 'sha256:../../etc' }), (err: Error) => isKind(err, 'InvalidArgument'));

      await assert.rejects(applier.apply({ ...req, digest: sha256(corrupt), size: corrupt.length }), /./);
      await assert.rejects(applier.apply({ ...req, digest: sha256(hostile), size: hostile.length }), (err: Error) => isKind(err, 'InvalidArgument') && /escape/.test(err.message));
      // Freed extents are punched on the thread pool.
      await (sn.store as NonNullable<typeof sn.store>).settled();
      const st = (sn.store as NonNullable<typeof sn.store>).stats();
      assert.equal(st.chunks, 0);
      assert.equal(st.diskBytes, 0, 'provisional chunks punched out');
      assert.deepEqual(fs.readdirSync(path.join(root, 'images')), []);
      assert.equal(sn.ms.layers().length, 0);

      // The snapshot is as it was: the good layer applies to it now.
      const applied = await applier.apply(req);
      assert.match(applied.digest, /^sha256:/);
      await assert.rejects(applier.apply(req), (err: Error) => isKind(err, 'FailedPrecondition') && /already has a layer/.test(err.message));
      // An applied snapshot removed before its Commit takes its layer along.
      await sn.remove('ns/1/extract');
      assert.equal(sn.ms.layers().length, 0);
      assert.equal((sn.store as NonNullable<typeof sn.store>).stats().chunks, 0);
      assert.deepEqual(fs.readdirSync(path.join(root, 'images')), []);
    } finally {
      sn.close();
    }
  });
});
