/**
 * Tar archives written byte by byte, for headers tar-stream cannot write:
 * GNU long names, binary PAX values, base-256 numbers, V7 and global
 * headers, any mtime, hostile names and types (untar.test, tar-tree.test).
 */
import assert from 'node:assert/strict';

export interface RawHeader {
  name: string | Buffer;
  typeflag?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  /** Whole seconds (the header field; a fraction goes in a PAX mtime record). */
  mtime?: number;
  linkname?: string;
  devmajor?: number;
  devminor?: number;
  /** ustar prefix field (the name is then prefix + "/" + name). */
  prefix?: string;
  format?: 'ustar' | 'gnu' | 'v7';
  /** Write uid and gid base-256 (GNU extension). */
  base256Ids?: boolean;
  /** The size field, when it should differ from the data written (header-only types). */
  sizeField?: number;
}

/** The mtime of every entry that names none (2024-01-02T03:04:05Z). */
export const RAW_MTIME = 1704164645;

function octal(b: Buffer, n: number, off: number, len: number): void {
  b.write(`${n.toString(8).padStart(len - 1, '0')}\0`, off, len, 'latin1');
}

function base256(b: Buffer, n: number, off: number, len: number): void {
  let v = BigInt(n);
  for (let i = len - 1; i > 0; i--) {
    b[off + i] = Number(v & 0xffn);
    v >>= 8n;
  }
  b[off] = 0x80;
}

export function rawHeaderBlock(h: RawHeader, size: number): Buffer {
  const b = Buffer.alloc(512);
  const name = typeof h.name === 'string' ? Buffer.from(h.name) : h.name;
  assert.ok(name.length <= 100, `raw name too long: ${name.length}`);
  name.copy(b, 0);
  octal(b, h.mode ?? 0o644, 100, 8);
  if (h.base256Ids) {
    base256(b, h.uid ?? 0, 108, 8);
    base256(b, h.gid ?? 0, 116, 8);
  } else {
    octal(b, h.uid ?? 0, 108, 8);
    octal(b, h.gid ?? 0, 116, 8);
  }
  octal(b, size, 124, 12);
  octal(b, h.mtime ?? RAW_MTIME, 136, 12);
  b[156] = (h.typeflag ?? '0').charCodeAt(0);
  if (h.linkname) Buffer.from(h.linkname).copy(b, 157);
  const format = h.format ?? 'ustar';
  if (format === 'ustar') b.write('ustar\u000000', 257, 'latin1');
  else if (format === 'gnu') b.write('ustar  \u0000', 257, 'latin1');
  if (format !== 'v7') {
    octal(b, h.devmajor ?? 0, 329, 8);
    octal(b, h.devminor ?? 0, 337, 8);
  }
  if (h.prefix) b.write(h.prefix, 345, 'utf8');
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const c of b) sum += c;
  b.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 8, 'latin1');
  return b;
}

/** PAX extended header data: "<len> key=value\n" records, values as raw bytes. */
export function paxData(records: [string, Buffer | string][]): Buffer {
  const out: Buffer[] = [];
  for (const [k, v] of records) {
    const body = Buffer.concat([Buffer.from(` ${k}=`), typeof v === 'string' ? Buffer.from(v) : v, Buffer.from('\n')]);
    let len = body.length + 1;
    while (String(len).length + body.length !== len) len = String(len).length + body.length;
    out.push(Buffer.from(String(len)), body);
  }
  return Buffer.concat(out);
}

export class RawTar {
  private readonly parts: Buffer[] = [];

  entry(h: RawHeader, data: Buffer | string = Buffer.alloc(0)): this {
    const d = typeof data === 'string' ? Buffer.from(data) : data;
    this.parts.push(rawHeaderBlock(h, h.sizeField ?? d.length), d, Buffer.alloc((512 - (d.length % 512)) % 512));
    return this;
  }

  pax(records: [string, Buffer | string][], typeflag: 'x' | 'g' = 'x'): this {
    return this.entry({ name: typeflag === 'g' ? 'pax_global_header' : 'PaxHeaders.0/entry', typeflag }, paxData(records));
  }

  /** An entry preceded by a PAX header: its xattrs as SCHILY.xattr.* records, and any other records. */
  paxEntry(h: RawHeader, opts: { xattrs?: Record<string, Buffer | string>; records?: [string, Buffer | string][] }, data?: Buffer | string): this {
    const recs: [string, Buffer | string][] = [...(opts.records ?? [])];
    for (const [k, v] of Object.entries(opts.xattrs ?? {})) recs.push([`SCHILY.xattr.${k}`, v]);
    if (typeof h.name === 'string' && Buffer.byteLength(h.name) > 100) {
      recs.push(['path', h.name]);
      h = { ...h, name: Buffer.from(h.name).subarray(0, 99) };
    }
    return this.pax(recs).entry(h, data);
  }

  gnuLong(typeflag: 'L' | 'K', name: string): this {
    return this.entry({ name: '././@LongLink', typeflag, format: 'gnu' }, Buffer.concat([Buffer.from(name), Buffer.alloc(1)]));
  }

  finish(): Buffer {
    return Buffer.concat([...this.parts, Buffer.alloc(1024)]);
  }
}
