import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { type ChunkSink, type Piece, pieceBytes, treeFromDirectory } from '../src/convert/layer-tree';

/**
 * treeFromDirectory reads a large file's pieces one ahead of the one being
 * stored: the pieces must reach the sink whole and in order, and a failure
 * must not leave a read in flight or the file open.
 */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'layer-tree-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const CHUNK = 64 * 1024;

/** A sink that keeps each piece's bytes (copies: the reader's buffers are its own) and can fail at piece `failAt`. */
function recordingSink(failAt = -1): ChunkSink & { pieces: Buffer[] } {
  const pieces: Buffer[] = [];
  return {
    chunkSize: CHUNK,
    pieces,
    async add(piece: Piece): Promise<number> {
      if (pieces.length === failAt) throw new Error(`sink fails at piece ${failAt}`);
      pieces.push(Buffer.from(pieceBytes(piece)));
      return pieces.length - 1;
    },
  };
}

const openFds = () => fs.readdirSync('/proc/self/fd').length;

test('a large file reaches the sink whole, piece by piece in order (read ahead)', async () => {
  const root = path.join(dir, 'whole');
  fs.mkdirSync(root);
  // 1 MiB and a bit: 17 pieces, the last one short.
  const data = crypto.randomBytes(16 * CHUNK + 1234);
  fs.writeFileSync(path.join(root, 'big'), data);
  const sink = recordingSink();
  const tree = await treeFromDirectory(root, sink);
  const node = tree.children?.get('big');
  assert.ok(node);
  assert.deepEqual(node.chunks, [...Array(17).keys()]);
  assert.equal(sink.pieces.length, 17);
  assert.ok(Buffer.concat(sink.pieces).equals(data), 'the pieces are the file, in order');
});

test('a sink that fails mid-file: the error comes back, no read is left in flight and the file is closed', async () => {
  const root = path.join(dir, 'fail');
  fs.mkdirSync(root);
  fs.writeFileSync(path.join(root, 'big'), crypto.randomBytes(16 * CHUNK));
  const before = openFds();
  await assert.rejects(treeFromDirectory(root, recordingSink(5)), /sink fails at piece 5/);
  assert.equal(openFds(), before, 'the file was closed');
});

test('a read ahead that fails while the sink is busy with the piece before is the walk\'s error (not an unhandled rejection)', async () => {
  const root = path.join(dir, 'shrinks');
  fs.mkdirSync(root);
  const file = path.join(root, 'big');
  fs.writeFileSync(file, crypto.randomBytes(16 * CHUNK));
  let lent = 0;
  const sink: ChunkSink = {
    chunkSize: CHUNK,
    // The second buffer is for the piece read ahead: the file shrinks just before that read.
    buffer(): Buffer {
      if (++lent === 2) fs.truncateSync(file, CHUNK);
      return Buffer.alloc(CHUNK);
    },
    // Busy with piece 0 while the read ahead fails.
    async add(): Promise<number> {
      await new Promise((r) => setTimeout(r, 50));
      return 0;
    },
  };
  const before = openFds();
  await assert.rejects(treeFromDirectory(root, sink), /shrank while it was read/);
  assert.equal(openFds(), before, 'the file was closed');
});

test('a sink that hashes on another thread gets the pieces two at a time, in order, each with its own digest', async () => {
  const root = path.join(dir, 'pairs');
  fs.mkdirSync(root);
  // 19 whole pieces and a short one: ten pairs (the short one hashed here, the one before it aside).
  const data = crypto.randomBytes(19 * CHUNK + 1000);
  fs.writeFileSync(path.join(root, 'big'), data);
  const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');
  const got: { bytes: Buffer; digest?: string }[] = [];
  let asideCalls = 0;
  const sink: ChunkSink = {
    chunkSize: CHUNK,
    buffer: () => Buffer.alloc(CHUNK),
    digest: (piece) => sha(pieceBytes(piece)),
    // Answers late, after the piece that follows is hashed here: the pair must still reach add in the file's order.
    digestAside(buf) {
      asideCalls++;
      const d = sha(buf);
      return new Promise((r) => setTimeout(() => r(d), 5));
    },
    async add(piece, _place, digest) {
      got.push({ bytes: Buffer.from(pieceBytes(piece)), digest });
      return got.length - 1;
    },
  };
  const tree = await treeFromDirectory(root, sink);
  assert.deepEqual(tree.children?.get('big')?.chunks, [...Array(20).keys()]);
  assert.ok(Buffer.concat(got.map((g) => g.bytes)).equals(data), 'the pieces are the file, in order');
  assert.equal(asideCalls, 10, 'every other piece hashed aside (the one before the last included)');
  for (const [i, g] of got.entries()) {
    assert.equal(g.digest, sha(g.bytes), `piece ${i} came with its own digest`);
  }
});

test('a hash thread that fails: its pieces are hashed here instead, the walk goes on with the right digests', async () => {
  const root = path.join(dir, 'aside-fails');
  fs.mkdirSync(root);
  const data = crypto.randomBytes(6 * CHUNK);
  fs.writeFileSync(path.join(root, 'big'), data);
  const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');
  const got: { bytes: Buffer; digest?: string }[] = [];
  const sink: ChunkSink = {
    chunkSize: CHUNK,
    buffer: () => Buffer.alloc(CHUNK),
    digest: (piece) => sha(pieceBytes(piece)),
    digestAside: () => Promise.reject(new Error('the hash thread exited (code 1)')),
    async add(piece, _place, digest) {
      got.push({ bytes: Buffer.from(pieceBytes(piece)), digest });
      return got.length - 1;
    },
  };
  await treeFromDirectory(root, sink);
  assert.ok(Buffer.concat(got.map((g) => g.bytes)).equals(data));
  for (const [i, g] of got.entries()) assert.equal(g.digest, sha(g.bytes), `piece ${i}`);
});
