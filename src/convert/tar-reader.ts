/**
 * A streaming tar reader that reads headers the way Go's archive/tar (what
 * containerd unpacks layers with) reads them: ustar, PAX, GNU and old V7
 * headers; PAX records and GNU long names/link names; base-256 numbers;
 * either checksum convention. Unlike tar-stream it keeps PAX values as raw
 * bytes, so binary extended attributes (security.capability with bytes
 * >= 0x80) arrive intact, and it applies PAX uid, gid, size, mtime and atime.
 *
 * Names and link names must be valid UTF-8 (Node paths are strings); a name
 * that is not is refused rather than mangled.
 */

/** A malformed or unsupported archive; `offset` is the byte offset of the header block. */
export class TarFormatError extends Error {
  constructor(
    message: string,
    readonly offset: number,
  ) {
    super(message);
    this.name = 'TarFormatError';
  }
}

/** Type flags as in the tar header (one character). */
export const TYPE = {
  reg: '0',
  regA: '\0',
  link: '1',
  symlink: '2',
  char: '3',
  block: '4',
  dir: '5',
  fifo: '6',
  cont: '7',
  paxHeader: 'x',
  paxGlobal: 'g',
  gnuLongName: 'L',
  gnuLongLink: 'K',
  gnuSparse: 'S',
} as const;

export interface TarHeader {
  /** The name as stored (after PAX and GNU long-name records), not cleaned. */
  name: string;
  /** One character; a legacy '\0' is already turned into '0' or '5'. */
  typeflag: string;
  /** st_mode bits as stored (permission bits and possibly type bits). */
  mode: number;
  uid: number;
  gid: number;
  /** Bytes of data that follow (0 for header-only types whatever the field says). */
  size: number;
  /** Seconds since the epoch, fractional from PAX. */
  mtime: number;
  /** Seconds since the epoch, if the archive has it (PAX, GNU or star). */
  atime?: number;
  linkname: string;
  devmajor: number;
  devminor: number;
  /** The PAX records of this entry (raw values), in archive order. */
  pax: Map<string, Buffer>;
  /** Byte offset of this entry's header block in the (uncompressed) archive. */
  offset: number;
}

const BLOCK = 512;
/** Go's maxSpecialFileSize: PAX and GNU long-name data larger than this is refused. */
const MAX_SPECIAL = 1 << 20;

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Pulls exact byte counts out of an async iterable of chunks. */
class ByteSource {
  private readonly it: AsyncIterator<Buffer | Uint8Array | string>;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private done = false;
  /** Bytes handed out so far. */
  position = 0;

  constructor(source: AsyncIterable<Buffer | Uint8Array | string>) {
    this.it = source[Symbol.asyncIterator]();
  }

  private async fill(n: number): Promise<void> {
    while (this.buffered < n && !this.done) {
      const r = await this.it.next();
      if (r.done) {
        this.done = true;
        break;
      }
      const b = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value as Uint8Array);
      if (b.length === 0) continue;
      this.chunks.push(b);
      this.buffered += b.length;
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    let out: Buffer;
    if (first.length === n) {
      this.chunks.shift();
      out = first;
    } else if (first.length > n) {
      out = first.subarray(0, n);
      this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let off = 0;
      while (off < n) {
        const c = this.chunks[0];
        const k = Math.min(c.length, n - off);
        c.copy(out, off, 0, k);
        off += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    this.position += n;
    return out;
  }

  /** Exactly n bytes; null at a clean end (no byte left); throws on a short read. */
  async readExact(n: number, what: string): Promise<Buffer | null> {
    await this.fill(n);
    if (this.buffered === 0 && n > 0) return null;
    if (this.buffered < n) throw new TarFormatError(`unexpected end of archive in ${what}`, this.position);
    return this.take(n);
  }

  /** Up to `max` bytes (at least 1), as they arrive; throws at the end of input. */
  async readSome(max: number, what: string): Promise<Buffer> {
    if (this.buffered === 0) await this.fill(1);
    if (this.buffered === 0) throw new TarFormatError(`unexpected end of archive in ${what}`, this.position);
    return this.take(Math.min(max, this.chunks[0].length));
  }

  async skip(n: number, what: string): Promise<void> {
    while (n > 0) n -= (await this.readSome(n, what)).length;
  }

  /** Reads and drops everything left. */
  async drain(): Promise<void> {
    this.chunks = [];
    this.buffered = 0;
    while (!this.done) {
      const r = await this.it.next();
      if (r.done) this.done = true;
    }
  }

  /** Stops the underlying iterator (destroys a Readable it came from). */
  async close(): Promise<void> {
    if (!this.done) {
      this.done = true;
      await this.it.return?.();
    }
  }
}

/** Bytes up to the first NUL (Go's parser.parseString). */
function cstr(b: Buffer): Buffer {
  const i = b.indexOf(0);
  return i >= 0 ? b.subarray(0, i) : b;
}

function text(b: Buffer, what: string, offset: number): string {
  try {
    return utf8.decode(b);
  } catch {
    throw new TarFormatError(`${what} is not valid UTF-8 (hex ${b.toString('hex').slice(0, 200)}): not supported`, offset);
  }
}

/** Go's parseNumeric: base-256 when the high bit is set, else octal padded with spaces/NULs. */
function numeric(b: Buffer, field: string, offset: number): number {
  if (b.length > 0 && (b[0] & 0x80) !== 0) {
    // Two's complement, big-endian, the marker bit excluded.
    const neg = (b[0] & 0x40) !== 0;
    let v = 0n;
    for (let i = 0; i < b.length; i++) {
      let byte = i === 0 ? b[0] & 0x7f : b[i];
      if (neg) byte ^= 0xff;
      if (i === 0 && neg) byte &= 0x7f;
      v = (v << 8n) | BigInt(byte);
    }
    if (neg) v = -(v + 1n);
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new TarFormatError(`header field ${field}: base-256 value out of range`, offset);
    }
    return Number(v);
  }
  let s = 0;
  let e = b.length;
  while (s < e && (b[s] === 0x20 || b[s] === 0)) s++;
  while (e > s && (b[e - 1] === 0x20 || b[e - 1] === 0)) e--;
  if (s === e) return 0;
  const str = cstr(b.subarray(s, e)).toString('latin1');
  if (!/^[0-7]+$/.test(str)) throw new TarFormatError(`header field ${field}: invalid octal number ${JSON.stringify(str)}`, offset);
  const v = parseInt(str, 8);
  if (!Number.isSafeInteger(v)) throw new TarFormatError(`header field ${field}: octal value out of range`, offset);
  return v;
}

function checksums(block: Buffer): [unsigned: number, signed: number] {
  let u = 0;
  let s = 0;
  for (let i = 0; i < BLOCK; i++) {
    const c = i >= 148 && i < 156 ? 0x20 : block[i];
    u += c;
    s += c >= 0x80 ? c - 0x100 : c;
  }
  return [u, s];
}

type Format = 'v7' | 'ustar' | 'gnu' | 'star';

function formatOf(block: Buffer): Format {
  const magic = block.subarray(257, 263).toString('latin1');
  const version = block.subarray(263, 265).toString('latin1');
  const trailer = block.subarray(508, 512).toString('latin1');
  if (magic === 'ustar\0' && trailer === 'tar\0') return 'star';
  if (magic === 'ustar\0') return 'ustar';
  if (magic === 'ustar ' && version === ' \0') return 'gnu';
  return 'v7';
}

function isZero(block: Buffer): boolean {
  for (let i = 0; i < block.length; i++) if (block[i] !== 0) return false;
  return true;
}

/** Go's parsePAX/parsePAXRecord: "<len> <key>=<value>\n" records; values stay bytes. */
function parsePax(data: Buffer, offset: number): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let rest = data;
  while (rest.length > 0) {
    const sp = rest.indexOf(0x20);
    const lenStr = sp > 0 ? rest.subarray(0, sp).toString('latin1') : '';
    const n = /^[0-9]+$/.test(lenStr) ? parseInt(lenStr, 10) : NaN;
    if (!(n >= 5) || n > rest.length || rest[n - 1] !== 0x0a) throw new TarFormatError('invalid PAX record', offset);
    const rec = rest.subarray(sp + 1, n - 1);
    const eq = rec.indexOf(0x3d);
    if (eq <= 0) throw new TarFormatError('invalid PAX record (no key)', offset);
    const key = text(rec.subarray(0, eq), 'PAX record key', offset);
    const value = Buffer.from(rec.subarray(eq + 1));
    if (key.includes('\0')) throw new TarFormatError('invalid PAX record key (NUL)', offset);
    if (['path', 'linkpath', 'uname', 'gname'].includes(key) && value.includes(0)) {
      throw new TarFormatError(`invalid PAX record ${key} (NUL in value)`, offset);
    }
    out.set(key, value);
    rest = rest.subarray(n);
  }
  return out;
}

function paxInt(v: Buffer, key: string, offset: number): number {
  const s = v.toString('latin1');
  if (!/^[+-]?[0-9]+$/.test(s)) throw new TarFormatError(`invalid PAX ${key} ${JSON.stringify(s)}`, offset);
  const n = Number(s);
  if (!Number.isSafeInteger(n)) throw new TarFormatError(`PAX ${key} out of range`, offset);
  return n;
}

/** Go's parsePAXTime: "[-]sec[.frac]", at most nanosecond precision. */
function paxTime(v: Buffer, key: string, offset: number): number {
  const s = v.toString('latin1');
  const m = /^([+-]?[0-9]+)(?:\.([0-9]*))?$/.exec(s);
  if (!m) throw new TarFormatError(`invalid PAX ${key} ${JSON.stringify(s)}`, offset);
  const sec = Number(m[1]);
  const frac = m[2] ? Number(`0.${m[2].slice(0, 9)}`) : 0;
  return m[1].startsWith('-') ? sec - frac : sec + frac;
}

/** Header-only types: their size field never announces data (Go's isHeaderOnlyType). */
function headerOnly(t: string): boolean {
  return t === TYPE.link || t === TYPE.symlink || t === TYPE.char || t === TYPE.block || t === TYPE.dir || t === TYPE.fifo;
}

function padding(n: number): number {
  return (BLOCK - (n % BLOCK)) % BLOCK;
}

/**
 * Iterates the entries of a tar stream. Call next() for each header; read the
 * entry's data with data() before the next call or it is skipped.
 */
export class TarReader {
  private readonly src: ByteSource;
  /** Data bytes of the current entry not yet read, and the padding after them. */
  private remaining = 0;
  private pad = 0;
  private ended = false;

  constructor(source: AsyncIterable<Buffer | Uint8Array | string>) {
    this.src = new ByteSource(source);
  }

  /** The next entry, or null at the end of the archive. */
  async next(): Promise<TarHeader | null> {
    if (this.ended) return null;
    await this.src.skip(this.remaining + this.pad, 'entry data');
    this.remaining = 0;
    this.pad = 0;
    let pax: Map<string, Buffer> | null = null;
    let longName: Buffer | null = null;
    let longLink: Buffer | null = null;
    for (;;) {
      const offset = this.src.position;
      const block = await this.src.readExact(BLOCK, 'a header');
      if (block === null) return this.end();
      if (isZero(block)) {
        const second = await this.src.readExact(BLOCK, 'the end-of-archive marker');
        if (second === null || isZero(second)) return this.end();
        throw new TarFormatError('invalid tar header: a zero block followed by data', offset);
      }
      let stored: number;
      try {
        stored = numeric(block.subarray(148, 156), 'chksum', offset);
      } catch {
        stored = -1;
      }
      const [u, s] = checksums(block);
      if (stored !== u && stored !== s) {
        throw new TarFormatError('invalid tar header (checksum mismatch): not a tar archive, or a compressed one read as plain tar', offset);
      }
      const format = formatOf(block);
      let typeflag = String.fromCharCode(block[156]);
      const size = numeric(block.subarray(124, 136), 'size', offset);
      if (size < 0) throw new TarFormatError(`invalid tar header: negative size ${size}`, offset);

      if (typeflag === TYPE.paxHeader || typeflag === TYPE.paxGlobal || typeflag === TYPE.gnuLongName || typeflag === TYPE.gnuLongLink) {
        if (size > MAX_SPECIAL) throw new TarFormatError(`${typeflag === 'x' || typeflag === 'g' ? 'PAX' : 'GNU long name'} header of ${size} bytes is larger than 1 MiB`, offset);
        const data = size === 0 ? Buffer.alloc(0) : await this.src.readExact(size, 'a PAX or GNU long-name header');
        if (data === null) throw new TarFormatError('unexpected end of archive in a PAX or GNU long-name header', offset);
        await this.src.skip(padding(size), 'header padding');
        if (typeflag === TYPE.paxHeader) pax = parsePax(data, offset);
        // Global PAX headers are not applied to later entries (Go's reader
        // does not either; containerd ignores them).
        else if (typeflag === TYPE.paxGlobal) parsePax(data, offset);
        else if (typeflag === TYPE.gnuLongName) longName = Buffer.from(cstr(data));
        else longLink = Buffer.from(cstr(data));
        continue;
      }

      let nameBytes = cstr(block.subarray(0, 100));
      if (format === 'ustar' || format === 'star') {
        const prefix = cstr(block.subarray(345, format === 'star' ? 476 : 500));
        if (prefix.length > 0) nameBytes = Buffer.concat([prefix, Buffer.from('/'), nameBytes]);
      }
      const h: TarHeader = {
        name: '',
        typeflag,
        mode: numeric(block.subarray(100, 108), 'mode', offset),
        uid: numeric(block.subarray(108, 116), 'uid', offset),
        gid: numeric(block.subarray(116, 124), 'gid', offset),
        size,
        mtime: numeric(block.subarray(136, 148), 'mtime', offset),
        linkname: '',
        devmajor: 0,
        devminor: 0,
        pax: pax ?? new Map(),
        offset,
      };
      if (format !== 'v7') {
        h.devmajor = numeric(block.subarray(329, 337), 'devmajor', offset);
        h.devminor = numeric(block.subarray(337, 345), 'devminor', offset);
      }
      if (format === 'gnu' && block[345] !== 0) h.atime = numeric(block.subarray(345, 357), 'atime', offset);
      if (format === 'star') h.atime = numeric(block.subarray(476, 488), 'atime', offset);
      let linkBytes = cstr(block.subarray(157, 257));

      // PAX records override the header (an empty value keeps the header's), then GNU long names.
      for (const [k, v] of h.pax) {
        if (v.length === 0) continue;
        switch (k) {
          case 'path':
            nameBytes = v;
            break;
          case 'linkpath':
            linkBytes = v;
            break;
          case 'uid':
            h.uid = paxInt(v, k, offset);
            break;
          case 'gid':
            h.gid = paxInt(v, k, offset);
            break;
          case 'size':
            h.size = paxInt(v, k, offset);
            break;
          case 'mtime':
            h.mtime = paxTime(v, k, offset);
            break;
          case 'atime':
            h.atime = paxTime(v, k, offset);
            break;
          default:
            if (k.startsWith('GNU.sparse.')) throw new TarFormatError('sparse files (GNU PAX sparse format) are not supported', offset);
        }
      }
      if (longName) nameBytes = longName;
      if (longLink) linkBytes = longLink;
      h.name = text(nameBytes, 'entry name', offset);
      h.linkname = text(linkBytes, `link name of ${JSON.stringify(h.name)}`, offset);
      if (typeflag === TYPE.regA) typeflag = h.name.endsWith('/') ? TYPE.dir : TYPE.reg;
      h.typeflag = typeflag;
      if (h.size < 0) throw new TarFormatError(`entry ${JSON.stringify(h.name)}: negative size`, offset);
      const dataSize = headerOnly(typeflag) ? 0 : h.size;
      if (headerOnly(typeflag)) h.size = 0;
      this.remaining = dataSize;
      this.pad = padding(dataSize);
      return h;
    }
  }

  private async end(): Promise<null> {
    this.ended = true;
    // What follows the end-of-archive marker is read and dropped, as
    // containerd does to finish the layer's digest (and gzip's checksum).
    await this.src.drain();
    return null;
  }

  /** The current entry's data, in chunks as they arrive. */
  async *data(): AsyncGenerator<Buffer> {
    while (this.remaining > 0) {
      const chunk = await this.src.readSome(this.remaining, 'entry data');
      this.remaining -= chunk.length;
      yield chunk;
    }
  }

  /** Stops reading (destroys the source stream if it is a Readable). */
  close(): Promise<void> {
    return this.src.close();
  }
}
