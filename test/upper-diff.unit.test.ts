/**
 * src/layers/upper-diff.ts and src/convert/tar-writer.ts: an overlay upper
 * directory (whiteout devices, an opaque directory, hardlinks, a symlink, a
 * fifo, a device, extended attributes with binary values, a long and a
 * non-ASCII name, nanosecond mtimes) written as a layer tar and read back
 * with the project's tar reader; an upper that needs the lower layers
 * (redirect_dir) is refused. Needs root (mknod, trusted.* xattrs).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { S_IFCHR, S_IFIFO, mknod } from '../native/mknod';
import { setXattr } from '../native/xattr';
import { TarReader } from '../src/convert/tar-reader';
import { checkUpperDir, upperDirTar } from '../src/layers/upper-diff';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'dedup-upper-diff-'));
after(() => fs.rmSync(work, { recursive: true, force: true }));

interface Read {
  name: string;
  type: string;
  mode: number;
  link: string;
  data: string;
  mtime: number;
  dev: string;
  xattrs: Record<string, string>;
}

async function readTar(upper: string): Promise<Read[]> {
  const r = new TarReader(upperDirTar(upper));
  const out: Read[] = [];
  for (let h = await r.next(); h; h = await r.next()) {
    const chunks: Buffer[] = [];
    for await (const c of r.data()) chunks.push(c);
    const xattrs: Record<string, string> = {};
    for (const [k, v] of h.pax) if (k.startsWith('SCHILY.xattr.')) xattrs[k.slice('SCHILY.xattr.'.length)] = v.toString('hex');
    out.push({ name: h.name, type: h.typeflag, mode: h.mode & 0o7777, link: h.linkname, data: Buffer.concat(chunks).toString(), mtime: h.mtime, dev: `${h.devmajor}:${h.devminor}`, xattrs });
  }
  return out;
}

test('an upper directory becomes the layer tar containerd would write for it', async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip('SKIP: needs root (mknod of whiteouts, trusted.* extended attributes)');
    return;
  }
  const up = path.join(work, 'upper');
  const long = `deep/${'d'.repeat(60)}/${'e'.repeat(60)}/file-with-a-long-name.txt`;
  fs.mkdirSync(path.join(up, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(up, 'etc', 'passwd'), 'root:x:0:0::/root:/bin/sh\n');
  fs.utimesSync(path.join(up, 'etc', 'passwd'), 1_700_000_000.25, 1_700_000_000.25);
  mknod(path.join(up, 'etc', 'shadow'), S_IFCHR | 0o000, 0, 0);
  fs.mkdirSync(path.join(up, 'var', 'cache'), { recursive: true });
  setXattr(path.join(up, 'var', 'cache'), 'trusted.overlay.opaque', 'y');
  fs.writeFileSync(path.join(up, 'var', 'cache', 'new'), 'fresh');
  fs.mkdirSync(path.join(up, 'bin'));
  fs.writeFileSync(path.join(up, 'bin', 'a'), 'same inode');
  fs.linkSync(path.join(up, 'bin', 'a'), path.join(up, 'bin', 'b'));
  fs.symlinkSync('a', path.join(up, 'bin', 'sh'));
  fs.chmodSync(path.join(up, 'bin', 'a'), 0o4755);
  setXattr(path.join(up, 'bin', 'a'), 'user.blob', Buffer.from([0x00, 0xff, 0x80, 0x0a]));
  setXattr(path.join(up, 'bin', 'a'), 'trusted.overlay.origin', Buffer.from([1, 2, 3]));
  mknod(path.join(up, 'fifo'), S_IFIFO | 0o600);
  mknod(path.join(up, 'tty9'), S_IFCHR | 0o620, 4, 9);
  fs.mkdirSync(path.join(up, path.dirname(long)), { recursive: true });
  fs.writeFileSync(path.join(up, long), 'long');
  fs.writeFileSync(path.join(up, 'café'), 'unicode');

  const got = await readTar(up);
  assert.deepEqual(
    got.map((e) => `${e.type} ${e.name}${e.link ? ` -> ${e.link}` : ''}`),
    [
      '5 bin/',
      '0 bin/a',
      '1 bin/b -> bin/a',
      '2 bin/sh -> a',
      '0 café',
      '5 deep/',
      `5 deep/${'d'.repeat(60)}/`,
      `5 deep/${'d'.repeat(60)}/${'e'.repeat(60)}/`,
      `0 ${long}`,
      '5 etc/',
      '0 etc/passwd',
      '0 etc/.wh.shadow',
      '6 fifo',
      '3 tty9',
      '5 var/',
      '5 var/cache/',
      '0 var/cache/.wh..wh..opq',
      '0 var/cache/new',
    ],
  );
  const by = new Map(got.map((e) => [e.name, e]));
  assert.equal(by.get('etc/passwd')?.data, 'root:x:0:0::/root:/bin/sh\n');
  assert.equal(by.get('etc/passwd')?.mtime, 1_700_000_000.25, 'nanosecond mtimes in PAX');
  assert.equal(by.get(long)?.data, 'long');
  assert.equal(by.get('café')?.data, 'unicode');
  assert.equal(by.get('bin/a')?.mode, 0o4755);
  assert.deepEqual(by.get('bin/a')?.xattrs, { 'user.blob': '00ff800a' }, "binary values byte for byte; overlay's own attributes left out");
  assert.deepEqual(by.get('var/cache/')?.xattrs, {}, 'the opaque attribute becomes the .wh..wh..opq entry');
  assert.equal(by.get('tty9')?.dev, '4:9');
  assert.equal(by.get('etc/.wh.shadow')?.data, '');
});

test('an upper directory that needs its lower layers (redirect_dir) is left to the walking differ', async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip('SKIP: needs root (trusted.* extended attributes)');
    return;
  }
  const up = path.join(work, 'redirect');
  fs.mkdirSync(path.join(up, 'moved'), { recursive: true });
  setXattr(path.join(up, 'moved'), 'trusted.overlay.redirect', '/original');
  // Refused by the check made before anything is streamed, and by the walk itself.
  await assert.rejects(checkUpperDir(up), (err: Error & { kind?: string }) => err.kind === 'NotImplemented' && /moved has trusted\.overlay\.redirect/.test(err.message));
  await assert.rejects(readTar(up), (err: Error & { kind?: string }) => err.kind === 'NotImplemented' && /moved has trusted\.overlay\.redirect/.test(err.message));
  await checkUpperDir(path.join(work, 'upper'));
});
