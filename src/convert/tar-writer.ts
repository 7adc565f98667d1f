/*
 * Tar headers as containerd's differ writes them (Go's archive/tar in PAX
 * format): a ustar header, preceded by a PAX extended header when a field
 * does not fit (a long or non-ASCII name or link target, a size or id too
 * big for its octal field, an mtime with nanoseconds) and for extended
 * attributes (`SCHILY.xattr.<name>`, values byte for byte). Our tar reader
 * (tar-reader.ts) reads them back.
 */

export const BLOCK = 512;

export type TarType = 'file' | 'hardlink' | 'symlink' | 'chr' | 'blk' | 'dir' | 'fifo';

const TYPEFLAG: Record<TarType, string> = { file: '0', hardlink: '1', symlink: '2', chr: '3', blk: '4', dir: '5', fifo: '6' };

export interface TarEntry {
  /** The path inside the archive as bytes (no leading "/"; a directory's trailing "/" is added here). */
  name: Buffer;
  type: TarType;
  /** Permission bits (and setuid/setgid/sticky). */
  mode: number;
  uid: number;
  gid: number;
  /** Bytes of data that follow (regular files only). */
  size: number;
  mtimeSec: number;
  mtimeNsec: number;
  /** Hard link or symlink target, as bytes. */
  linkname?: Buffer;
  devmajor?: number;
  devminor?: number;
  /** Extended attributes by full name, values as stored. */
  xattrs?: ReadonlyMap<string, Buffer>;
}

const ASCII = (b: Buffer) => b.every((c) => c > 0 && c < 0x80);

/** `v` as `width - 1` octal digits and a NUL, or null when it does not fit. */
function octal(v: number, width: number): Buffer | null {
  const s = v.toString(8);
  if (v < 0 || s.length > width - 1) return null;
  return Buffer.from(`${s.padStart(width - 1, '0')}\0`, 'latin1');
}

/** One PAX record: "<len> <key>=<value>\n", its length counting itself. */
function paxRecord(key: string, value: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`, 'utf8'), value, Buffer.from('\n')]);
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len), 'latin1'), body]);
}

/** Splits a ustar name into prefix and name (≤ 155 and ≤ 100 bytes, cut at a "/"), or null. */
function splitUstar(name: Buffer): { prefix: Buffer; name: Buffer } | null {
  if (name.length <= 100) return { prefix: Buffer.alloc(0), name };
  for (let i = Math.min(name.length - 1, 155); i > 0; i--) {
    if (name[i] !== 0x2f) continue;
    const rest = name.subarray(i + 1);
    if (rest.length > 0 && rest.length <= 100) return { prefix: name.subarray(0, i), name: rest };
    if (rest.length > 100) return null;
  }
  return null;
}

function ustarHeader(e: { name: Buffer; prefix: Buffer; typeflag: string; mode: number; uid: number; gid: number; size: number; mtime: number; linkname: Buffer; devmajor: number; devminor: number }): Buffer {
  const h = Buffer.alloc(BLOCK);
  e.name.copy(h, 0, 0, Math.min(100, e.name.length));
  const field = (v: number, at: number, width: number) => (octal(v, width) ?? Buffer.from(`${'0'.repeat(width - 1)}\0`)).copy(h, at);
  field(e.mode, 100, 8);
  field(e.uid, 108, 8);
  field(e.gid, 116, 8);
  field(e.size, 124, 12);
  field(e.mtime, 136, 12);
  h.write(e.typeflag, 156, 'latin1');
  e.linkname.copy(h, 157, 0, Math.min(100, e.linkname.length));
  h.write('ustar\0', 257, 'latin1');
  h.write('00', 263, 'latin1');
  field(e.devmajor, 329, 8);
  field(e.devminor, 337, 8);
  e.prefix.copy(h, 345, 0, Math.min(155, e.prefix.length));
  // The checksum: the header's bytes summed with its own field as spaces.
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const c of h) sum += c;
  Buffer.from(`${sum.toString(8).padStart(6, '0')}\0 `, 'latin1').copy(h, 148);
  return h;
}

/** The header block(s) of `e`: a PAX header with its records first when needed. */
export function tarHeader(e: TarEntry): Buffer {
  const name = e.type === 'dir' && e.name[e.name.length - 1] !== 0x2f ? Buffer.concat([e.name, Buffer.from('/')]) : e.name;
  const link = e.linkname ?? Buffer.alloc(0);
  const records: Buffer[] = [];
  const split = ASCII(name) ? splitUstar(name) : null;
  if (!split) records.push(paxRecord('path', name));
  if (link.length > 100 || !ASCII(link)) records.push(paxRecord('linkpath', link));
  const size = e.type === 'file' ? e.size : 0;
  if (!octal(size, 12)) records.push(paxRecord('size', Buffer.from(String(size))));
  if (!octal(e.uid, 8)) records.push(paxRecord('uid', Buffer.from(String(e.uid))));
  if (!octal(e.gid, 8)) records.push(paxRecord('gid', Buffer.from(String(e.gid))));
  if (e.mtimeNsec !== 0 || !octal(e.mtimeSec, 12)) records.push(paxRecord('mtime', Buffer.from(`${e.mtimeSec}.${String(e.mtimeNsec).padStart(9, '0').replace(/0+$/, '')}`)));
  for (const [k, v] of [...(e.xattrs ?? new Map<string, Buffer>())].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) records.push(paxRecord(`SCHILY.xattr.${k}`, v));
  const main = ustarHeader({
    name: split?.name ?? name.subarray(0, 100),
    prefix: split?.prefix ?? Buffer.alloc(0),
    typeflag: TYPEFLAG[e.type],
    mode: e.mode & 0o7777,
    uid: octal(e.uid, 8) ? e.uid : 0,
    gid: octal(e.gid, 8) ? e.gid : 0,
    size: octal(size, 12) ? size : 0,
    mtime: octal(e.mtimeSec, 12) ? e.mtimeSec : 0,
    linkname: link.length > 100 ? link.subarray(0, 100) : link,
    devmajor: e.devmajor ?? 0,
    devminor: e.devminor ?? 0,
  });
  if (records.length === 0) return main;
  const body = Buffer.concat(records);
  const paxName = Buffer.concat([Buffer.from('PaxHeaders.0/'), (split?.name ?? Buffer.from('entry')).subarray(0, 80)]);
  const pax = ustarHeader({ name: paxName, prefix: Buffer.alloc(0), typeflag: 'x', mode: 0o644, uid: 0, gid: 0, size: body.length, mtime: 0, linkname: Buffer.alloc(0), devmajor: 0, devminor: 0 });
  return Buffer.concat([pax, body, Buffer.alloc(padding(body.length)), main]);
}

/** Zero bytes after `n` bytes of data up to the next block. */
export function padding(n: number): number {
  return (BLOCK - (n % BLOCK)) % BLOCK;
}

/** The end-of-archive marker: two zero blocks. */
export const END_OF_ARCHIVE = Buffer.alloc(2 * BLOCK);
