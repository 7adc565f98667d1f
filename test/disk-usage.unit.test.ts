import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { diskUsage } from '../src/util/fs';

/** diskUsage counts a tree as containerd's fs.DiskUsage does: each inode once, allocated blocks, names as bytes. */

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'disk-usage-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

test('every entry counted once, under names that are not UTF-8 too; a missing tree has none', async () => {
  const root = path.join(dir, 'layer');
  fs.mkdirSync(root);
  fs.writeFileSync(path.join(root, 'a'), Buffer.alloc(8192, 1));
  fs.linkSync(path.join(root, 'a'), path.join(root, 'a-link'));
  // A directory named with a byte that is not UTF-8 (0xff), holding a file of 64 KiB.
  const raw = Buffer.concat([Buffer.from(`${root}/`), Buffer.from([0x6e, 0xff])]);
  fs.mkdirSync(raw);
  fs.writeFileSync(Buffer.concat([raw, Buffer.from('/inside')]), Buffer.alloc(65536, 2));
  const u = await diskUsage(root);
  // root, a (and its link), the odd directory, inside.
  assert.equal(u.inodes, 4, JSON.stringify(u));
  assert.ok(u.size >= 8192 + 65536, JSON.stringify(u));
  assert.deepEqual(await diskUsage(path.join(dir, 'never-there')), { size: 0, inodes: 0 });
});
