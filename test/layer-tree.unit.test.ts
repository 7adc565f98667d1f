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
