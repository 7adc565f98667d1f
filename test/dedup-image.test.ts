/**
 * The dedup image format (src/remote/dedup-image.ts) and its builder
 * (src/convert/dedup-layer.ts): layers built from real directories with the
 * real mkfs.erofs, chunks stored once per image, and the layer's EROFS image
 * mounted over a device assembled from the chunk table alone, as a node will.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { MS_RDONLY, mount, umount2 } from '../native/mount';
import { parsePrefetchList } from '../src/cmd/convert';
import { DedupImageBuilder } from '../src/convert/dedup-layer';
import { probeMkfs } from '../src/convert/mkfs';
import { DedupFormatError, LAYER_MAGIC, type LayerHeader, decodeLayerBlob, encodeLayerBlob } from '../src/remote/dedup-image';
import { scratchDirs } from './helpers/daemon';
import { pseudoRandom } from './helpers/images';

const MiB = 1 << 20;
const work = scratchDirs();

function writeTree(dir: string, files: Record<string, Buffer | string>): void {
  for (const [p, data] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(dir, p)), { recursive: true });
    fs.writeFileSync(path.join(dir, p), data);
  }
}

const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

describe('dedup image layers', () => {
  test('chunks are stored once per image; the chunk table alone rebuilds what the EROFS image reads', async () => {
    const dir = work('dedup-image');
    const a = pseudoRandom(3 * MiB + 100, 'dl-a');
    const b = pseudoRandom(MiB + 7, 'dl-b');
    writeTree(path.join(dir, 'l1'), { 'usr/a.bin': a, 'etc/hostname': 'one\n' });
    writeTree(path.join(dir, 'l2'), { 'opt/a-copy.bin': a, 'opt/b.bin': b });
    fs.mkdirSync(path.join(dir, 'work'));
    const mkfs = await probeMkfs('mkfs.erofs');
    const builder = new DedupImageBuilder({ mkfs: async () => mkfs, chunkSize: MiB, workDir: path.join(dir, 'work') });
    const diff1 = `sha256:${'1'.repeat(64)}`;
    const l1 = await builder.addLayer(path.join(dir, 'l1'), diff1);
    const l2 = await builder.addLayer(path.join(dir, 'l2'), `sha256:${'2'.repeat(64)}`);

    assert.equal(l1.digest, `sha256:${sha(l1.blob)}`);
    assert.ok(l1.data && l2.data);
    assert.equal(l1.data.digest, `sha256:${sha(fs.readFileSync(l1.data.path))}`);
    // a: 4 chunks (3 full + a 100-byte tail), hostname: 1 chunk.
    assert.equal(l1.newChunks, 5);
    assert.equal(l1.data.size, 3 * MiB + 2 * 4096);
    // Layer 2 stores only b (2 chunks); a's chunks point at layer 1's data blob.
    assert.equal(l2.newChunks, 2);
    assert.equal(l2.data.size, MiB + 4096);
    assert.deepEqual(l2.header.data_blobs.sort(), [l1.data.digest, l2.data.digest].sort());
    assert.equal(l1.header.source_diff_id, diff1);
    assert.equal(l1.header.logical_bytes, a.length + 4);

    const dataOf = new Map([
      [l1.data.digest, fs.readFileSync(l1.data.path)],
      [l2.data.digest, fs.readFileSync(l2.data.path)],
    ]);
    for (const [layer, expect] of [
      [l1, { 'usr/a.bin': a, 'etc/hostname': Buffer.from('one\n') }],
      [l2, { 'opt/a-copy.bin': a, 'opt/b.bin': b }],
    ] as const) {
      const { header, erofs } = decodeLayerBlob(layer.blob);
      assert.deepEqual(header, layer.header);
      // The node's view: a device whose block `blkaddr` holds the chunk the table names.
      const device = Buffer.alloc(Math.max(...header.chunks.map(([blk, n]) => (blk + n) * 4096)));
      for (const [blk, n, digest, bi, off] of header.chunks) {
        const bytes = (dataOf.get(header.data_blobs[bi]) as Buffer).subarray(off, off + n * 4096);
        assert.equal(sha(bytes), digest, 'the data blob holds what the table says');
        bytes.copy(device, blk * 4096);
      }
      const img = path.join(dir, `img-${layer.digest.slice(7, 15)}.erofs`);
      const dev = `${img}.dev`;
      fs.writeFileSync(img, erofs);
      fs.writeFileSync(dev, device);
      const mnt = path.join(dir, `mnt-${layer.digest.slice(7, 15)}`);
      fs.mkdirSync(mnt);
      mount(img, mnt, 'erofs', MS_RDONLY, `device=${dev}`);
      try {
        for (const [p, data] of Object.entries(expect)) assert.ok(fs.readFileSync(path.join(mnt, p)).equals(data), p);
      } finally {
        umount2(mnt);
      }
    }
  });

  test('a prefetch list is recorded in the layer that holds each file (regular files reached without symlinks only)', async () => {
    const dir = work('dedup-image-prefetch');
    fs.mkdirSync(path.join(dir, 'l', 'app', 'lib'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'l', 'app', 'main'), 'main');
    fs.writeFileSync(path.join(dir, 'l', 'app', 'lib', 'x.so'), pseudoRandom(10_000, 'x'));
    fs.symlinkSync('app', path.join(dir, 'l', 'via-link'));
    fs.mkdirSync(path.join(dir, 'work'));
    const mkfs = await probeMkfs('mkfs.erofs');
    const b = new DedupImageBuilder({ mkfs: async () => mkfs, chunkSize: MiB, workDir: path.join(dir, 'work') });
    const l = await b.addLayer(path.join(dir, 'l'), `sha256:${'4'.repeat(64)}`, ['/app/lib/x.so', '/app/main', '/app', '/via-link/main', '/missing']);
    assert.deepEqual(l.header.prefetch, ['/app/lib/x.so', '/app/main']);
    assert.deepEqual(decodeLayerBlob(l.blob).header.prefetch, ['/app/lib/x.so', '/app/main'], 'it round-trips');
    const none = await b.addLayer(path.join(dir, 'l'), `sha256:${'5'.repeat(64)}`, ['/missing']);
    assert.equal(none.header.prefetch, undefined, 'no key when nothing matched (headers stay as before)');
  });

  test('convert --prefetch-files: one absolute path per line, comments and blanks skipped, bad paths named by line', () => {
    assert.deepEqual(parsePrefetchList('# hot files\n/usr/bin/python3\n\n  /app/main.py  \n/usr/bin/python3\n'), ['/usr/bin/python3', '/app/main.py']);
    assert.throws(() => parsePrefetchList('/ok\nrelative/path\n'), /line 2: "relative\/path" is not an absolute, normalized path/);
    assert.throws(() => parsePrefetchList('/a/../b\n'), /line 1/);
  });

  test('a layer without file data has no data blob and no chunks', async () => {
    const dir = work('dedup-image-empty');
    fs.mkdirSync(path.join(dir, 'l', 'empty-dir'), { recursive: true });
    fs.symlinkSync('target', path.join(dir, 'l', 'link'));
    fs.mkdirSync(path.join(dir, 'work'));
    const mkfs = await probeMkfs('mkfs.erofs');
    const l = await new DedupImageBuilder({ mkfs: async () => mkfs, chunkSize: MiB, workDir: path.join(dir, 'work') }).addLayer(path.join(dir, 'l'), `sha256:${'3'.repeat(64)}`);
    assert.equal(l.data, null);
    assert.deepEqual(l.header.chunks, []);
    assert.deepEqual(l.header.data_blobs, []);
    assert.deepEqual(fs.readdirSync(path.join(dir, 'work')), []);
  });

  test('malformed layer blobs are refused naming the problem', () => {
    const header: LayerHeader = {
      version: 1,
      chunk_size: MiB,
      erofs_size: 4096,
      has_blob: true,
      data_blobs: [`sha256:${'a'.repeat(64)}`],
      chunks: [[0, 1, 'b'.repeat(64), 0, 0]],
      source_diff_id: `sha256:${'c'.repeat(64)}`,
      files: 1,
      logical_bytes: 10,
    };
    const good = encodeLayerBlob(header, Buffer.alloc(4096));
    assert.deepEqual(decodeLayerBlob(good).header, header);
    const withHeader = (h: unknown) => {
      const json = Buffer.from(JSON.stringify(h));
      const head = Buffer.alloc(12);
      LAYER_MAGIC.copy(head);
      head.writeUInt32LE(json.length, 8);
      const start = Math.ceil((12 + json.length) / 4096) * 4096;
      return Buffer.concat([head, json, Buffer.alloc(start - 12 - json.length), Buffer.alloc(4096)]);
    };
    const cases: [string, Buffer, RegExp][] = [
      ['bad magic', Buffer.concat([Buffer.from('NOTDEDUP'), good.subarray(8)]), /bad magic/],
      ['short', good.subarray(0, 6), /bad magic/],
      ['header length', Buffer.concat([good.subarray(0, 8), Buffer.from([0xff, 0xff, 0xff, 0x0f]), good.subarray(12)]), /header length .* out of bounds/],
      ['truncated image', good.subarray(0, good.length - 1), /header says/],
      ['version', withHeader({ ...header, version: 2 }), /unsupported version 2/],
      ['blob index', withHeader({ ...header, chunks: [[0, 1, 'b'.repeat(64), 1, 0]] }), /blob index 1 out of range/],
      ['offset', withHeader({ ...header, chunks: [[0, 1, 'b'.repeat(64), 0, 100]] }), /offset 100 is not a multiple of 4096/],
      ['digest', withHeader({ ...header, chunks: [[0, 1, 'xyz', 0, 0]] }), /digest must be 64 hex digits/],
      ['extent', withHeader({ ...header, chunks: [[0, 257, 'b'.repeat(64), 0, 0]] }), /bad extent/],
      ['duplicate', withHeader({ ...header, chunks: [[0, 1, 'b'.repeat(64), 0, 0], [0, 1, 'd'.repeat(64), 0, 4096]] }), /listed twice/],
      ['data blob digest', withHeader({ ...header, data_blobs: ['md5:00'] }), /data_blobs must be sha256 digests/],
      ['prefetch not a list', withHeader({ ...header, prefetch: '/etc/passwd' }), /prefetch must be an array/],
      ['prefetch relative', withHeader({ ...header, prefetch: ['etc/passwd'] }), /prefetch\[0\] "etc\/passwd" is not an absolute, normalized path/],
      ['prefetch dot-dot', withHeader({ ...header, prefetch: ['/ok', '/a/../../etc/shadow'] }), /prefetch\[1\]/],
      ['prefetch NUL', withHeader({ ...header, prefetch: ['/a\0b'] }), /prefetch\[0\]/],
      ['prefetch root', withHeader({ ...header, prefetch: ['/'] }), /prefetch\[0\]/],
    ];
    for (const [what, blob, pattern] of cases) {
      assert.throws(() => decodeLayerBlob(blob), (err: unknown) => err instanceof DedupFormatError && pattern.test((err as Error).message), what);
    }
  });
});
