import fs from 'node:fs';

/**
 * Just enough of the EROFS on-disk format (the kernel's fs/erofs/erofs_fs.h)
 * to find every chunk index of an image built by `mkfs.erofs --chunksize
 * --blobdev`, point it at the chunk store (device id and block address)
 * instead of the temporary blob, and give the image the device table those
 * addresses need. Whoever changes an image updates its superblock checksum.
 */

export const EROFS_SUPER_OFFSET = 1024;
export const EROFS_SUPER_MAGIC = 0xe0f5e1e2;
const EROFS_ISLOTBITS = 5;
const FEATURE_INCOMPAT_CHUNKED_FILE = 0x4;
const FEATURE_INCOMPAT_DEVICE_TABLE = 0x8;

const LAYOUT_EXTENDED = 1;
const FLAT_PLAIN = 0;
const FLAT_INLINE = 2;
const CHUNK_BASED = 4;
const CHUNK_FORMAT_BLKBITS_MASK = 0x1f;
const CHUNK_FORMAT_INDEXES = 0x20;
/** blkaddr of a chunk that is a hole (never written). */
export const EROFS_NULL_ADDR = 0xffffffff;

const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;

export class ErofsFormatError extends Error {
  constructor(message: string) {
    super(`EROFS image: ${message}`);
    this.name = 'ErofsFormatError';
  }
}

export interface Superblock {
  blkszbits: number;
  blockSize: number;
  rootNid: number;
  metaBlkaddr: number;
  featureIncompat: number;
  extraDevices: number;
  devtSlotoff: number;
}

export function readSuperblock(img: Buffer): Superblock {
  if (img.length < EROFS_SUPER_OFFSET + 128) throw new ErofsFormatError(`too small (${img.length} bytes)`);
  const sb = img.subarray(EROFS_SUPER_OFFSET);
  const magic = sb.readUInt32LE(0);
  if (magic !== EROFS_SUPER_MAGIC) throw new ErofsFormatError(`bad magic 0x${magic.toString(16)}`);
  const blkszbits = sb.readUInt8(12);
  if (blkszbits < 9 || blkszbits > 16) throw new ErofsFormatError(`unsupported block size 2^${blkszbits}`);
  return {
    blkszbits,
    blockSize: 1 << blkszbits,
    rootNid: sb.readUInt16LE(14),
    metaBlkaddr: sb.readUInt32LE(40),
    featureIncompat: sb.readUInt32LE(80),
    extraDevices: sb.readUInt16LE(86),
    devtSlotoff: sb.readUInt16LE(88),
  };
}

interface Inode {
  nid: number;
  pos: number;
  mode: number;
  size: number;
  datalayout: number;
  iu: number;
  /** Offset right after the inode and its inline xattrs. */
  tailPos: number;
}

function readInode(img: Buffer, sb: Superblock, nid: number): Inode {
  const pos = sb.metaBlkaddr * sb.blockSize + nid * (1 << EROFS_ISLOTBITS);
  if (pos + 32 > img.length) throw new ErofsFormatError(`inode ${nid} at ${pos} lies past the end`);
  const format = img.readUInt16LE(pos);
  const xattrIcount = img.readUInt16LE(pos + 2);
  const mode = img.readUInt16LE(pos + 4);
  const extended = (format & 1) === LAYOUT_EXTENDED;
  const datalayout = (format >> 1) & 0x7;
  const isize = extended ? 64 : 32;
  const size = extended ? Number(img.readBigUInt64LE(pos + 8)) : img.readUInt32LE(pos + 8);
  const xattrSize = xattrIcount === 0 ? 0 : 12 + 4 * (xattrIcount - 1);
  return { nid, pos, mode, size, datalayout, iu: img.readUInt32LE(pos + 16), tailPos: pos + isize + xattrSize };
}

/** The bytes of a directory (flat plain or flat inline layout). */
function dirData(img: Buffer, sb: Superblock, ino: Inode): Buffer[] {
  const blocks: Buffer[] = [];
  if (ino.datalayout === FLAT_PLAIN) {
    const start = ino.iu * sb.blockSize;
    for (let off = 0; off < ino.size; off += sb.blockSize) {
      blocks.push(img.subarray(start + off, start + Math.min(ino.size, off + sb.blockSize)));
    }
  } else if (ino.datalayout === FLAT_INLINE) {
    const full = Math.floor(ino.size / sb.blockSize);
    const start = ino.iu * sb.blockSize;
    for (let i = 0; i < full; i++) blocks.push(img.subarray(start + i * sb.blockSize, start + (i + 1) * sb.blockSize));
    const tail = ino.size % sb.blockSize;
    if (tail > 0) blocks.push(img.subarray(ino.tailPos, ino.tailPos + tail));
  } else {
    throw new ErofsFormatError(`directory inode ${ino.nid} has unsupported data layout ${ino.datalayout}`);
  }
  for (const b of blocks) {
    if (b.byteOffset + b.length > img.byteOffset + img.length) throw new ErofsFormatError(`directory ${ino.nid} runs past the end`);
  }
  return blocks;
}

/** A directory's entries (name as raw bytes, nid), without "." and "..". */
function childEntries(img: Buffer, sb: Superblock, dir: Inode): { name: Buffer; nid: number }[] {
  const out: { name: Buffer; nid: number }[] = [];
  for (const block of dirData(img, sb, dir)) {
    if (block.length < 12) continue;
    const count = Math.floor(block.readUInt16LE(8) / 12);
    for (let i = 0; i < count; i++) {
      const d = i * 12;
      const nid = Number(block.readBigUInt64LE(d));
      const nameoff = block.readUInt16LE(d + 8);
      const nameEnd = i + 1 < count ? block.readUInt16LE(d + 12 + 8) : block.length;
      let name = block.subarray(nameoff, nameEnd);
      const nul = name.indexOf(0);
      if (nul >= 0) name = name.subarray(0, nul);
      const s = name.toString('latin1');
      if (s === '.' || s === '..') continue;
      out.push({ name, nid });
    }
  }
  return out;
}

/** nids of a directory's entries, without "." and "..". */
function childNids(img: Buffer, sb: Superblock, dir: Inode): number[] {
  return childEntries(img, sb, dir).map((e) => e.nid);
}

/**
 * Every path of an image's tree below its root ("/a/b", names decoded as
 * UTF-8) with its inode number (nid) and mode: paths sharing a nid are
 * hardlinks. Directories before their entries.
 */
export function listImageTree(img: Buffer): { path: string; nid: number; mode: number }[] {
  const sb = readSuperblock(img);
  const out: { path: string; nid: number; mode: number }[] = [];
  const visit = (dir: Inode, prefix: string, depth: number): void => {
    if (depth > 4096) throw new ErofsFormatError('directory tree deeper than 4096 levels');
    for (const e of childEntries(img, sb, dir)) {
      const ino = readInode(img, sb, e.nid);
      const p = `${prefix}/${e.name.toString('utf8')}`;
      out.push({ path: p, nid: e.nid, mode: ino.mode });
      if ((ino.mode & S_IFMT) === S_IFDIR) visit(ino, p, depth + 1);
    }
  };
  visit(readInode(img, sb, sb.rootNid), '', 0);
  return out;
}

/** One chunk index entry of one file. */
export interface ChunkRef {
  /** Byte offset of the 8-byte index entry in the image. */
  entryPos: number;
  deviceId: number;
  blkaddr: number;
  /** Blocks the chunk occupies in its blob (the last one of a file may be short). */
  nblocks: number;
  /** Logical bytes of file data it holds. */
  length: number;
}

export interface ChunkScan {
  sb: Superblock;
  chunkRefs: ChunkRef[];
  /** Regular files, each counted once (hardlinks share an inode). */
  files: number;
  /** Sum of regular file sizes, each inode once. */
  logicalBytes: number;
}

/**
 * Walks the tree from the root and returns every chunk index entry of every
 * chunk-based regular file. Files that are not chunk-based (empty files,
 * or data mkfs kept inline) have none.
 */
export function scanChunks(img: Buffer): ChunkScan {
  const sb = readSuperblock(img);
  const seen = new Set<number>();
  const refs: ChunkRef[] = [];
  let files = 0;
  let logicalBytes = 0;
  const stack = [sb.rootNid];
  while (stack.length > 0) {
    const nid = stack.pop() as number;
    if (seen.has(nid)) continue;
    seen.add(nid);
    const ino = readInode(img, sb, nid);
    const type = ino.mode & S_IFMT;
    if (type === S_IFDIR) {
      for (const c of childNids(img, sb, ino)) if (!seen.has(c)) stack.push(c);
      continue;
    }
    if (type !== S_IFREG) continue;
    files++;
    logicalBytes += ino.size;
    if (ino.datalayout !== CHUNK_BASED) {
      if (ino.size > 0 && ino.datalayout !== FLAT_INLINE && ino.datalayout !== FLAT_PLAIN) {
        throw new ErofsFormatError(`file inode ${nid} has unsupported data layout ${ino.datalayout}`);
      }
      // Data in the image itself: nothing to move.
      continue;
    }
    const format = ino.iu & 0xffff;
    if (!(format & CHUNK_FORMAT_INDEXES)) {
      throw new ErofsFormatError(`file inode ${nid} uses a block map, not chunk indexes (was --blobdev given?)`);
    }
    const chunkbits = sb.blkszbits + (format & CHUNK_FORMAT_BLKBITS_MASK);
    const chunkSize = 2 ** chunkbits;
    const count = Math.ceil(ino.size / chunkSize);
    const base = Math.ceil(ino.tailPos / 8) * 8;
    if (base + count * 8 > img.length) throw new ErofsFormatError(`chunk indexes of inode ${nid} run past the end`);
    for (let i = 0; i < count; i++) {
      const entryPos = base + i * 8;
      const length = Math.min(chunkSize, ino.size - i * chunkSize);
      refs.push({
        entryPos,
        deviceId: img.readUInt16LE(entryPos + 2),
        blkaddr: img.readUInt32LE(entryPos + 4),
        nblocks: Math.ceil(length / sb.blockSize),
        length,
      });
    }
  }
  return { sb, chunkRefs: refs, files, logicalBytes };
}

/** Points one chunk index entry at (deviceId, blkaddr). */
export function setChunkAddress(img: Buffer, ref: ChunkRef, deviceId: number, blkaddr: number): void {
  img.writeUInt16LE(deviceId, ref.entryPos + 2);
  img.writeUInt32LE(blkaddr >>> 0, ref.entryPos + 4);
}

/** Checks the image has exactly one extra device: the blob its chunks live in. */
export function checkSingleBlobDevice(sb: Superblock): void {
  if (!(sb.featureIncompat & FEATURE_INCOMPAT_DEVICE_TABLE) || sb.extraDevices !== 1) {
    throw new ErofsFormatError(`expected one extra blob device, found ${sb.extraDevices}`);
  }
}

/** Size of one device table slot (struct erofs_deviceslot). */
export const EROFS_DEVT_SLOT_SIZE = 128;
/** Bytes of a slot's tag (NUL-padded): the kernel opens it as the device's path when no device= is given. */
const DEVT_TAG_BYTES = 64;
/** The most an image can have before its device table: devt_slotoff is a 16-bit count of slots. */
export const MAX_IMAGE_BEFORE_DEVT = 0xffff * EROFS_DEVT_SLOT_SIZE;

/** The tags of the image's extra devices, in device id order (1, 2, ...); '' for an untagged slot. */
export function readDeviceTags(img: Buffer, sb: Superblock = readSuperblock(img)): string[] {
  if (!(sb.featureIncompat & FEATURE_INCOMPAT_DEVICE_TABLE)) return [];
  const pos = sb.devtSlotoff * EROFS_DEVT_SLOT_SIZE;
  const end = pos + sb.extraDevices * EROFS_DEVT_SLOT_SIZE;
  if (end > img.length) throw new ErofsFormatError(`device table at ${pos} (${sb.extraDevices} slots) lies past the end`);
  return slotTags(img.subarray(pos, end));
}

function slotTags(table: Buffer): string[] {
  const tags: string[] = [];
  for (let at = 0; at + EROFS_DEVT_SLOT_SIZE <= table.length; at += EROFS_DEVT_SLOT_SIZE) {
    const tag = table.subarray(at, at + DEVT_TAG_BYTES);
    const nul = tag.indexOf(0);
    tags.push(tag.subarray(0, nul < 0 ? tag.length : nul).toString('latin1'));
  }
  return tags;
}

/** The device tags of the image file `file` (its first block and its device table only are read). */
export function readImageDeviceTags(file: string): string[] {
  const fd = fs.openSync(file, 'r');
  try {
    const head = Buffer.alloc(EROFS_SUPER_OFFSET + 128);
    if (fs.readSync(fd, head, 0, head.length, 0) < head.length) throw new ErofsFormatError(`${file} is too small`);
    const { pos, slots } = deviceTableExtent(head);
    const table = Buffer.alloc(slots * EROFS_DEVT_SLOT_SIZE);
    if (fs.readSync(fd, table, 0, table.length, pos) < table.length) throw new ErofsFormatError(`${file}: its device table lies past the end`);
    return slotTags(table);
  } finally {
    fs.closeSync(fd);
  }
}

/** Where the device table of an image starts and how many slots it has, from its first block alone. */
export function deviceTableExtent(head: Buffer): { pos: number; slots: number } {
  const sb = readSuperblock(head);
  if (!(sb.featureIncompat & FEATURE_INCOMPAT_DEVICE_TABLE)) return { pos: 0, slots: 0 };
  return { pos: sb.devtSlotoff * EROFS_DEVT_SLOT_SIZE, slots: sb.extraDevices };
}

/**
 * Gives the image the extra devices `devices` (device ids 1, 2, ... in this
 * order; a tag names each, at most 63 bytes; blocks: the device's size in
 * blocks). mkfs.erofs --blobdev writes one slot, in the first block, right
 * before the inodes: one device is written there; more are written as a new
 * table appended at the end of the image (block-aligned), the old slot left
 * unused. Returns the image (a new buffer when it grew). The caller updates
 * the superblock checksum.
 */
export function setDeviceTable(img: Buffer, devices: { tag: string; blocks: number }[]): Buffer {
  const sb = readSuperblock(img);
  if (!(sb.featureIncompat & FEATURE_INCOMPAT_DEVICE_TABLE) || sb.extraDevices < 1) {
    throw new ErofsFormatError('the image has no device table to extend (built without --blobdev)');
  }
  if (devices.length < 1 || devices.length > 0xffff) throw new ErofsFormatError(`cannot give an image ${devices.length} devices`);
  const slot = (i: number) => {
    const b = Buffer.alloc(EROFS_DEVT_SLOT_SIZE);
    const tag = Buffer.from(devices[i].tag, 'latin1');
    if (tag.length >= DEVT_TAG_BYTES || tag.includes(0)) throw new ErofsFormatError(`device tag ${JSON.stringify(devices[i].tag)} is too long or has NUL`);
    tag.copy(b, 0);
    b.writeUInt32LE(devices[i].blocks >>> 0, DEVT_TAG_BYTES);
    return b;
  };
  let out = img;
  let slotoff = sb.devtSlotoff;
  if (devices.length > sb.extraDevices) {
    const start = Math.ceil(img.length / sb.blockSize) * sb.blockSize;
    if (start > MAX_IMAGE_BEFORE_DEVT) throw new ErofsFormatError(`the image is ${img.length} bytes: a device table cannot follow it (limit ${MAX_IMAGE_BEFORE_DEVT})`);
    const tableBytes = Math.ceil((devices.length * EROFS_DEVT_SLOT_SIZE) / sb.blockSize) * sb.blockSize;
    out = Buffer.alloc(start + tableBytes);
    img.copy(out, 0);
    slotoff = start / EROFS_DEVT_SLOT_SIZE;
    out.writeUInt16LE(slotoff, EROFS_SUPER_OFFSET + 88);
    out.writeUInt32LE(out.length / sb.blockSize, EROFS_SUPER_OFFSET + 36);
  }
  out.writeUInt16LE(devices.length, EROFS_SUPER_OFFSET + 86);
  for (let i = 0; i < devices.length; i++) slot(i).copy(out, slotoff * EROFS_DEVT_SLOT_SIZE + i * EROFS_DEVT_SLOT_SIZE);
  return out;
}

export function hasChunkedFiles(sb: Superblock): boolean {
  return (sb.featureIncompat & FEATURE_INCOMPAT_CHUNKED_FILE) !== 0;
}

const FEATURE_COMPAT_SB_CHKSUM = 0x1;

let crcTable: Uint32Array | null = null;

/** CRC32C (Castagnoli), as the kernel's crc32c(): no final inversion. */
function crc32c(seed: number, data: Buffer): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let i = 0; i < 256; i++) {
      let c = i;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
      crcTable[i] = c >>> 0;
    }
  }
  let crc = seed >>> 0;
  for (let i = 0; i < data.length; i++) crc = crcTable[(crc ^ data[i]) & 0xff] ^ (crc >>> 8);
  return crc >>> 0;
}

/**
 * Recomputes the superblock checksum (it covers block 0 from the superblock
 * on, where small images keep inodes and chunk indexes too). Call after any
 * change to the image.
 */
export function updateSuperblockChecksum(img: Buffer): void {
  const sb = readSuperblock(img);
  const compat = img.readUInt32LE(EROFS_SUPER_OFFSET + 8);
  if (!(compat & FEATURE_COMPAT_SB_CHKSUM)) return;
  const block = Buffer.from(img.subarray(EROFS_SUPER_OFFSET, sb.blockSize));
  block.writeUInt32LE(0, 4);
  img.writeUInt32LE(crc32c(0xffffffff, block), EROFS_SUPER_OFFSET + 4);
}

/** True when the stored superblock checksum matches (or the image has none). */
export function superblockChecksumOk(img: Buffer): boolean {
  const sb = readSuperblock(img);
  const compat = img.readUInt32LE(EROFS_SUPER_OFFSET + 8);
  if (!(compat & FEATURE_COMPAT_SB_CHKSUM)) return true;
  const block = Buffer.from(img.subarray(EROFS_SUPER_OFFSET, sb.blockSize));
  const stored = block.readUInt32LE(4);
  block.writeUInt32LE(0, 4);
  return crc32c(0xffffffff, block) === stored;
}
