import { type TreeNode, keyBytes } from './layer-tree';
import { EROFS_DEVT_SLOT_SIZE, EROFS_NULL_ADDR, EROFS_SUPER_MAGIC, EROFS_SUPER_OFFSET, ErofsFormatError, updateSuperblockChecksum } from './erofs-format';

/**
 * Writes an uncompressed EROFS image of a layer tree (the kernel's
 * fs/erofs/erofs_fs.h; the image mkfs.erofs --chunksize --blobdev would
 * write, without running it): every inode extended (64 bytes: 32-bit ids,
 * 64-bit sizes, nanosecond mtimes), xattrs inline in the inode, directories
 * and symlinks as flat data with their tail inline after the inode, regular
 * files chunk-based with chunk indexes that name (device, block) in the
 * chunk store's files, given as the image's extra devices.
 *
 * Layout: block 0 holds the superblock and, when it fits, the device table;
 * then the metadata area (`meta_blkaddr`): inodes in depth-first order, the
 * root first; then the full blocks of large directories and symlinks.
 */

const BLKSZBITS = 12;
const BLOCK = 1 << BLKSZBITS;
const ISLOT = 32;
const INODE_EXTENDED_SIZE = 64;
const DIRENT_SIZE = 12;

const FEATURE_COMPAT_SB_CHKSUM = 0x1;
const FEATURE_INCOMPAT_CHUNKED_FILE = 0x4;
const FEATURE_INCOMPAT_DEVICE_TABLE = 0x8;

const FLAT_PLAIN = 0;
const FLAT_INLINE = 2;
const CHUNK_BASED = 4;
const CHUNK_FORMAT_INDEXES = 0x20;
const DEVT_TAG_BYTES = 64;

const S_IF: Record<TreeNode['kind'], number> = {
  dir: 0o040000,
  file: 0o100000,
  symlink: 0o120000,
  chr: 0o020000,
  blk: 0o060000,
  fifo: 0o010000,
  sock: 0o140000,
};
const FILE_TYPE: Record<TreeNode['kind'], number> = { file: 1, dir: 2, chr: 3, blk: 4, fifo: 5, sock: 6, symlink: 7 };

/** erofs xattr name indexes (the kernel's EROFS_XATTR_INDEX_*): the prefix is stored as this number. */
const XATTR_PREFIXES: [string, number][] = [
  ['system.posix_acl_access', 2],
  ['system.posix_acl_default', 3],
  ['user.', 1],
  ['trusted.', 4],
  ['security.', 6],
];

export interface ChunkAddress {
  /** 1-based index into the image's devices. */
  deviceId: number;
  blkaddr: number;
}

export interface ErofsWriteInput {
  root: TreeNode;
  chunkSize: number;
  /** The image's extra devices in device id order (1, 2, ...): tag and size in blocks. */
  devices: { tag: string; blocks: number }[];
  /** Where layer-local chunk `n` is stored. */
  address: (n: number) => ChunkAddress;
}

export interface ErofsWriteResult {
  image: Buffer;
  /** Regular files (hardlinks once) and the sum of their sizes. */
  files: number;
  logicalBytes: number;
}

/** An xattr as stored: name index, name suffix, value. */
interface XattrEntry {
  index: number;
  name: Buffer;
  value: Buffer;
}

interface Placed {
  node: TreeNode;
  /** Byte offset of the inode in the image. */
  pos: number;
  nid: number;
  nlink: number;
  xattrs: XattrEntry[];
  xattrSize: number;
  layout: number;
  /** The node's data (directory blocks, symlink target) when it has any. */
  data: Buffer | null;
  /** Bytes of `data` kept inline after the inode (the rest is in full blocks). */
  inlineBytes: number;
  /** First data block of the full blocks, when there are any. */
  blkaddr: number;
  /** Byte offset of the chunk indexes (chunk-based files). */
  indexPos: number;
  /** Directory entries (name bytes, child), "." and ".." included, sorted. */
  entries?: { name: Buffer; node: TreeNode | null; dot?: 'self' | 'parent' }[];
  parent?: TreeNode;
}

/** Encodes xattrs as EROFS stores them; a name without a known prefix is refused (the kernel could not list it). */
function encodeXattrs(xattrs: Map<string, Buffer>, where: string): { list: XattrEntry[]; size: number } {
  const list: XattrEntry[] = [];
  for (const [full, value] of xattrs) {
    const hit = XATTR_PREFIXES.find(([p]) => full.startsWith(p));
    if (!hit) throw new ErofsFormatError(`${where}: extended attribute ${JSON.stringify(full)} has a prefix EROFS cannot store`);
    const [prefix, index] = hit;
    const name = Buffer.from(full.slice(prefix.length), 'utf8');
    if ((index === 2 || index === 3) && name.length > 0) throw new ErofsFormatError(`${where}: extended attribute ${JSON.stringify(full)} is not an ACL`);
    if (name.length > 255) throw new ErofsFormatError(`${where}: extended attribute name ${JSON.stringify(full)} is longer than 255 bytes`);
    if (value.length > 0xffff) throw new ErofsFormatError(`${where}: extended attribute ${JSON.stringify(full)} has ${value.length} bytes (EROFS: at most 65535)`);
    list.push({ index, name, value });
  }
  list.sort((a, b) => a.index - b.index || Buffer.compare(a.name, b.name));
  if (list.length === 0) return { list, size: 0 };
  // erofs_xattr_ibody_header (12 bytes), then each entry: 4-byte header, name, value, padded to 4.
  const size = 12 + list.reduce((n, e) => n + align(4 + e.name.length + e.value.length, 4), 0);
  if (size > BLOCK - INODE_EXTENDED_SIZE) throw new ErofsFormatError(`${where}: its extended attributes take ${size} bytes (at most ${BLOCK - INODE_EXTENDED_SIZE} fit beside an inode)`);
  return { list, size };
}

function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** The kernel's new_encode_dev. */
function encodeDev(major: number, minor: number): number {
  return ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & ~0xff) << 12)) >>> 0;
}

/** A directory's data: blocks of erofs_dirent (12 bytes each) followed by the names, entries sorted by name. */
function directoryData(entries: { name: Buffer; nid: number; type: number }[]): Buffer {
  const blocks: Buffer[] = [];
  let i = 0;
  while (i < entries.length) {
    let n = 0;
    let bytes = 0;
    while (i + n < entries.length && bytes + DIRENT_SIZE + entries[i + n].name.length <= BLOCK) {
      bytes += DIRENT_SIZE + entries[i + n].name.length;
      n++;
    }
    if (n === 0) throw new ErofsFormatError(`a file name of ${entries[i].name.length} bytes does not fit in a directory block`);
    const last = i + n === entries.length;
    const block = Buffer.alloc(last ? bytes : BLOCK);
    let nameoff = n * DIRENT_SIZE;
    for (let k = 0; k < n; k++) {
      const e = entries[i + k];
      block.writeBigUInt64LE(BigInt(e.nid), k * DIRENT_SIZE);
      block.writeUInt16LE(nameoff, k * DIRENT_SIZE + 8);
      block.writeUInt8(e.type, k * DIRENT_SIZE + 10);
      e.name.copy(block, nameoff);
      nameoff += e.name.length;
    }
    blocks.push(block);
    i += n;
  }
  return Buffer.concat(blocks);
}

/** Size of a directory's data from its entries' names alone (nids do not change it). */
function directorySize(names: Buffer[]): number {
  let size = 0;
  let i = 0;
  while (i < names.length) {
    let bytes = 0;
    let n = 0;
    while (i + n < names.length && bytes + DIRENT_SIZE + names[i + n].length <= BLOCK) {
      bytes += DIRENT_SIZE + names[i + n].length;
      n++;
    }
    if (n === 0) throw new ErofsFormatError(`a file name of ${names[i].length} bytes does not fit in a directory block`);
    i += n;
    size += i === names.length ? bytes : BLOCK;
  }
  return size;
}

const DOT = Buffer.from('.');
const DOTDOT = Buffer.from('..');

/**
 * Writes the image. Inodes are laid out depth first from the root (nid
 * order follows the walk, so a directory's entries are near it); a hardlinked
 * node is written once, where it is first met.
 */
export function writeErofsImage(input: ErofsWriteInput): ErofsWriteResult {
  const { root, chunkSize } = input;
  const chunkbits = Math.log2(chunkSize);
  if (!Number.isInteger(chunkbits) || chunkbits < BLKSZBITS || chunkbits - BLKSZBITS > 0x1f) throw new ErofsFormatError(`chunk size ${chunkSize} is not a power of two from ${BLOCK}`);
  if (root.kind !== 'dir') throw new ErofsFormatError('the root of a layer is not a directory');

  // Where the device table goes: in block 0 after the superblock when it fits, else in blocks of its own.
  const devCount = input.devices.length;
  const devtInBlock0 = EROFS_SUPER_OFFSET + 128 + devCount * EROFS_DEVT_SLOT_SIZE <= BLOCK;
  const devtPos = devCount === 0 ? 0 : devtInBlock0 ? EROFS_SUPER_OFFSET + 128 : BLOCK;
  const metaBlkaddr = devCount === 0 || devtInBlock0 ? 1 : 1 + Math.ceil((devCount * EROFS_DEVT_SLOT_SIZE) / BLOCK);
  const metaStart = metaBlkaddr * BLOCK;

  // Pass 1: nlink, walk order.
  const nlinks = new Map<TreeNode, number>();
  const order: { node: TreeNode; parent: TreeNode; path: string }[] = [];
  const walk = (node: TreeNode, parent: TreeNode, p: string, depth: number): void => {
    if (depth > 4096) throw new ErofsFormatError(`${p}: the tree is deeper than 4096 levels`);
    const seen = nlinks.get(node);
    if (seen !== undefined) {
      if (node.kind === 'dir') throw new ErofsFormatError(`${p}: a directory appears twice in the tree`);
      nlinks.set(node, seen + 1);
      return;
    }
    nlinks.set(node, 1);
    order.push({ node, parent, path: p });
    if (node.kind === 'dir') {
      const keys = [...(node.children as Map<string, TreeNode>).keys()].sort((a, b) => Buffer.compare(keyBytes(a), keyBytes(b)));
      for (const k of keys) walk((node.children as Map<string, TreeNode>).get(k) as TreeNode, node, `${p === '/' ? '' : p}/${keyBytes(k).toString('utf8')}`, depth + 1);
    }
  };
  walk(root, root, '/', 0);

  // Pass 2: place each inode in the metadata area; decide inline tails.
  const placed = new Map<TreeNode, Placed>();
  const list: Placed[] = [];
  let pos = metaStart;
  let dataBlocks = 0;
  const dataQueue: Placed[] = [];
  let files = 0;
  let logicalBytes = 0;
  for (const { node, parent, path } of order) {
    const { list: xattrs, size: xattrSize } = encodeXattrs(node.xattrs, path);
    let nlink = nlinks.get(node) as number;
    let dataSize = 0;
    let entries: Placed['entries'];
    if (node.kind === 'dir') {
      const children = node.children as Map<string, TreeNode>;
      entries = [{ name: DOT, node, dot: 'self' }, { name: DOTDOT, node: parent, dot: 'parent' }];
      let subdirs = 0;
      for (const [k, c] of children) {
        const name = keyBytes(k);
        if (name.length === 0 || name.length > 255 || name.includes(0x2f) || name.includes(0) || name.equals(DOT) || name.equals(DOTDOT)) {
          throw new ErofsFormatError(`${path}: invalid entry name ${JSON.stringify(name.toString('utf8'))}`);
        }
        entries.push({ name, node: c });
        if (c.kind === 'dir') subdirs++;
      }
      entries.sort((a, b) => Buffer.compare(a.name, b.name));
      nlink = 2 + subdirs;
      dataSize = directorySize(entries.map((e) => e.name));
    } else if (node.kind === 'symlink') {
      dataSize = (node.target as Buffer).length;
      if (dataSize === 0 || dataSize > BLOCK) throw new ErofsFormatError(`${path}: symlink target of ${dataSize} bytes`);
    }
    const p: Placed = { node, pos: 0, nid: 0, nlink, xattrs, xattrSize, layout: FLAT_PLAIN, data: null, inlineBytes: 0, blkaddr: EROFS_NULL_ADDR, indexPos: 0, entries, parent };
    const head = INODE_EXTENDED_SIZE + xattrSize;
    // The inode and its xattrs stay within one block.
    pos = align(pos, ISLOT);
    if ((pos % BLOCK) + head > BLOCK) pos = align(pos, BLOCK);
    if (node.kind === 'file') {
      files++;
      const size = node.size as number;
      logicalBytes += size;
      const count = Math.ceil(size / chunkSize);
      if ((node.chunks as number[]).length !== count) throw new ErofsFormatError(`${path}: ${size} bytes but ${(node.chunks as number[]).length} chunks of ${chunkSize}`);
      if (size > 0) {
        p.layout = CHUNK_BASED;
        p.indexPos = align(pos + head, 8);
        p.pos = pos;
        pos = p.indexPos + count * 8;
      } else {
        p.pos = pos;
        pos += head;
      }
    } else if (dataSize > 0) {
      const tail = dataSize % BLOCK;
      if (tail > 0 && head + tail <= BLOCK) {
        // Inline tail: it must lie in the same block as the inode's end.
        if ((pos % BLOCK) + head + tail > BLOCK) pos = align(pos, BLOCK);
        p.layout = FLAT_INLINE;
        p.inlineBytes = tail;
      }
      p.pos = pos;
      pos += head + p.inlineBytes;
      if (dataSize - p.inlineBytes > 0) dataQueue.push(p);
    } else {
      p.pos = pos;
      pos += head;
    }
    p.nid = (p.pos - metaStart) / ISLOT;
    if (list.length === 0 && p.nid > 0xffff) throw new ErofsFormatError('root inode beyond nid 65535');
    placed.set(node, p);
    list.push(p);
  }
  const metaEnd = align(pos, BLOCK);
  const firstDataBlock = metaEnd / BLOCK;
  for (const p of dataQueue) {
    const size = p.node.kind === 'dir' ? directorySize((p.entries as NonNullable<Placed['entries']>).map((e) => e.name)) : (p.node.target as Buffer).length;
    p.blkaddr = firstDataBlock + dataBlocks;
    dataBlocks += Math.floor((size - p.inlineBytes) / BLOCK);
  }
  const totalBlocks = firstDataBlock + dataBlocks;
  if (totalBlocks > 0xffffffff) throw new ErofsFormatError('image larger than 16 TiB');
  const img = Buffer.alloc(totalBlocks * BLOCK);

  // Pass 3: serialize.
  for (const [ino, p] of list.entries()) {
    const n = p.node;
    let data: Buffer | null = null;
    if (n.kind === 'dir') {
      data = directoryData(
        (p.entries as NonNullable<Placed['entries']>).map((e) => {
          const target = e.node as TreeNode;
          return { name: e.name, nid: (placed.get(target) as Placed).nid, type: FILE_TYPE[target.kind] };
        }),
      );
    } else if (n.kind === 'symlink') {
      data = n.target as Buffer;
    }
    const size = n.kind === 'file' ? (n.size as number) : data ? data.length : 0;
    let iu = 0;
    if (p.layout === CHUNK_BASED) iu = CHUNK_FORMAT_INDEXES | (chunkbits - BLKSZBITS);
    else if (n.kind === 'chr' || n.kind === 'blk') iu = encodeDev(n.rdevMajor ?? 0, n.rdevMinor ?? 0);
    else if (data && data.length - p.inlineBytes > 0) iu = p.blkaddr;
    else iu = n.kind === 'file' || data ? EROFS_NULL_ADDR : 0;
    const at = p.pos;
    img.writeUInt16LE(1 | (p.layout << 1), at); // i_format: extended inode, data layout
    img.writeUInt16LE(p.xattrs.length === 0 ? 0 : 1 + (p.xattrSize - 12) / 4, at + 2);
    img.writeUInt16LE((S_IF[n.kind] | (n.perm & 0o7777)) & 0xffff, at + 4);
    img.writeBigUInt64LE(BigInt(size), at + 8);
    img.writeUInt32LE(iu >>> 0, at + 16);
    img.writeUInt32LE((ino + 1) >>> 0, at + 20);
    img.writeUInt32LE(n.uid >>> 0, at + 24);
    img.writeUInt32LE(n.gid >>> 0, at + 28);
    img.writeBigInt64LE(BigInt(Math.trunc(n.mtimeSec)), at + 32);
    img.writeUInt32LE(n.mtimeNsec >>> 0, at + 40);
    img.writeUInt32LE(p.nlink >>> 0, at + 44);
    let x = at + INODE_EXTENDED_SIZE;
    if (p.xattrs.length > 0) {
      x += 12; // h_name_filter, h_shared_count = 0, reserved
      for (const e of p.xattrs) {
        img.writeUInt8(e.name.length, x);
        img.writeUInt8(e.index, x + 1);
        img.writeUInt16LE(e.value.length, x + 2);
        e.name.copy(img, x + 4);
        e.value.copy(img, x + 4 + e.name.length);
        x += align(4 + e.name.length + e.value.length, 4);
      }
    }
    if (p.layout === CHUNK_BASED) {
      let ip = p.indexPos;
      for (const c of n.chunks as number[]) {
        const a = input.address(c);
        img.writeUInt16LE(0, ip); // advise
        img.writeUInt16LE(a.deviceId, ip + 2);
        img.writeUInt32LE(a.blkaddr >>> 0, ip + 4);
        ip += 8;
      }
    } else if (data) {
      const full = data.length - p.inlineBytes;
      if (full > 0) data.copy(img, p.blkaddr * BLOCK, 0, full);
      if (p.inlineBytes > 0) data.copy(img, x, full);
    }
  }
  // The device table.
  for (let i = 0; i < devCount; i++) {
    const d = input.devices[i];
    const tag = Buffer.from(d.tag, 'latin1');
    if (tag.length >= DEVT_TAG_BYTES || tag.includes(0)) throw new ErofsFormatError(`device tag ${JSON.stringify(d.tag)} is too long or has NUL`);
    const at = devtPos + i * EROFS_DEVT_SLOT_SIZE;
    tag.copy(img, at);
    img.writeUInt32LE(d.blocks >>> 0, at + DEVT_TAG_BYTES);
  }

  // The superblock.
  const sb = EROFS_SUPER_OFFSET;
  img.writeUInt32LE(EROFS_SUPER_MAGIC, sb);
  img.writeUInt32LE(FEATURE_COMPAT_SB_CHKSUM, sb + 8);
  img.writeUInt8(BLKSZBITS, sb + 12);
  img.writeUInt16LE((placed.get(root) as Placed).nid, sb + 14);
  img.writeBigUInt64LE(BigInt(list.length), sb + 16);
  img.writeUInt32LE(totalBlocks, sb + 36);
  img.writeUInt32LE(metaBlkaddr, sb + 40);
  let incompat = 0;
  if (list.some((p) => p.layout === CHUNK_BASED)) incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
  if (devCount > 0) incompat |= FEATURE_INCOMPAT_DEVICE_TABLE;
  img.writeUInt32LE(incompat, sb + 80);
  img.writeUInt16LE(devCount, sb + 86);
  img.writeUInt16LE(devCount > 0 ? devtPos / EROFS_DEVT_SLOT_SIZE : 0, sb + 88);
  updateSuperblockChecksum(img);
  return { image: img, files, logicalBytes };
}
