/**
 * A small TypeScript counterpart of continuity's fs/fstest: appliers that
 * change a directory tree, and a comparison of two trees. Used by the ported
 * containerd snapshotter conformance suite.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { readXattrs, setXattr } from '../../native/xattr';
import { lstatOrNull } from '../../src/util/fs';

/** Applies one change (or a sequence of changes) to the tree at root. */
export interface Applier {
  apply(root: string): Promise<void>;
}

function applier(fn: (root: string) => void | Promise<void>): Applier {
  return {
    async apply(root: string) {
      await fn(root);
    },
  };
}

/** Runs the appliers in order; stops at the first failure. */
export function apply(...appliers: Applier[]): Applier {
  return applier(async (root) => {
    for (const a of appliers) await a.apply(root);
  });
}

/** Creates (or truncates) a file with the content, then chmods it to perm. */
export function createFile(name: string, content: string | Buffer, perm: number): Applier {
  return applier((root) => {
    const full = path.join(root, name);
    const fd = fs.openSync(full, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC, perm);
    try {
      fs.writeSync(fd, typeof content === 'string' ? Buffer.from(content) : content);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    // open(2) applied the umask to perm; chmod does not.
    fs.chmodSync(full, perm);
  });
}

/** Creates the directory and any missing parents with perm, then chmods it. */
export function createDir(name: string, perm: number): Applier {
  return applier((root) => {
    const full = path.join(root, name);
    fs.mkdirSync(full, { recursive: true, mode: perm });
    fs.chmodSync(full, perm);
  });
}

/** Removes one file or empty directory; fails if it is missing. */
export function remove(name: string): Applier {
  return applier((root) => {
    const full = path.join(root, name);
    if (fs.lstatSync(full).isDirectory()) fs.rmdirSync(full);
    else fs.unlinkSync(full);
  });
}

/** Removes a tree; a missing path is not an error (Go's os.RemoveAll). */
export function removeAll(name: string): Applier {
  return applier((root) => {
    fs.rmSync(path.join(root, name), { recursive: true, force: true });
  });
}

/**
 * rename(2). overlayfs without redirect_dir answers EXDEV for a directory
 * that comes from a lower layer and expects the caller to copy and delete,
 * as mv(1) does; this applier does the same so the case can run on overlay
 * (upstream skips the Rename case instead).
 */
export function rename(oldName: string, newName: string): Applier {
  return applier((root) => {
    const from = path.join(root, oldName);
    const to = path.join(root, newName);
    try {
      fs.renameSync(from, to);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw err;
      const dest = lstatOrNull(to);
      if (dest?.isDirectory()) fs.rmdirSync(to);
      else if (dest) fs.unlinkSync(to);
      copyTree(from, to);
      fs.rmSync(from, { recursive: true, force: true });
    }
  });
}

export function chown(name: string, uid: number, gid: number): Applier {
  return applier((root) => fs.chownSync(path.join(root, name), uid, gid));
}

export function chmod(name: string, perm: number): Applier {
  return applier((root) => fs.chmodSync(path.join(root, name), perm));
}

/** Symlink at newName pointing to oldName (taken literally, not joined to root). */
export function symlink(oldName: string, newName: string): Applier {
  return applier((root) => fs.symlinkSync(oldName, path.join(root, newName)));
}

/** Hard link newName to oldName, both inside root. */
export function link(oldName: string, newName: string): Applier {
  return applier((root) => fs.linkSync(path.join(root, oldName), path.join(root, newName)));
}

// ---- extended attributes ----

/** Every extended attribute of p (not following a symlink), by name; none on a file system without them. */
function xattrsOf(p: string): Map<string, Buffer> {
  return readXattrs(p, { unsupportedIsEmpty: true });
}

/** Copies a tree keeping type, mode, owner, xattrs and times (for rename's EXDEV path). */
function copyTree(from: string, to: string): void {
  const st = fs.lstatSync(from);
  if (st.isDirectory()) {
    fs.mkdirSync(to, { mode: 0o700 });
    for (const name of fs.readdirSync(from)) copyTree(path.join(from, name), path.join(to, name));
  } else if (st.isFile()) {
    fs.copyFileSync(from, to);
  } else if (st.isSymbolicLink()) {
    fs.symlinkSync(fs.readlinkSync(from), to);
  } else {
    throw new Error(`rename fallback cannot copy special file ${from}`);
  }
  fs.lchownSync(to, st.uid, st.gid);
  for (const [name, value] of xattrsOf(from)) setXattr(to, name, value);
  if (!st.isSymbolicLink()) {
    // chown clears set-id bits, so the mode goes last.
    fs.chmodSync(to, st.mode & 0o7777);
    fs.utimesSync(to, st.atime, st.mtime);
  } else {
    fs.lutimesSync(to, st.atime, st.mtime);
  }
}

// ---- tree comparison ----

/** Major and minor number of a 64-bit dev_t, split as glibc's major()/minor() do. */
export function deviceNumbers(rdev: bigint): [major: number, minor: number] {
  return [Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn)), Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn))];
}

interface Entry {
  path: string;
  /** Full st_mode: file type and permission bits. */
  mode: number;
  uid: number;
  gid: number;
  size?: number;
  digest?: string;
  /** Every path in the tree that names this regular file's inode. */
  links?: string[];
  target?: string;
  rdev?: string;
  xattrs: string;
}

function describeXattrs(p: string): string {
  return [...xattrsOf(p)]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([k, v]) => `${k}=0x${v.toString('hex')}`)
    .join(' ');
}

/** The manifest of a tree: one entry per path below root (root itself excluded, as continuity does). */
function buildManifest(root: string): Map<string, Entry> {
  const entries = new Map<string, Entry>();
  const inodes = new Map<string, string[]>();
  const visit = (rel: string): void => {
    const full = path.join(root, rel);
    const st = fs.lstatSync(full, { bigint: true });
    const mode = Number(st.mode);
    const e: Entry = { path: rel, mode, uid: Number(st.uid), gid: Number(st.gid), xattrs: describeXattrs(full) };
    if (st.isFile()) {
      e.size = Number(st.size);
      e.digest = crypto.createHash('sha256').update(fs.readFileSync(full)).digest('hex');
      const ino = `${st.dev}:${st.ino}`;
      const group = inodes.get(ino) ?? [];
      group.push(rel);
      inodes.set(ino, group);
      e.links = group;
    } else if (st.isSymbolicLink()) {
      e.target = fs.readlinkSync(full);
    } else if (st.isCharacterDevice() || st.isBlockDevice()) {
      const [major, minor] = deviceNumbers(st.rdev);
      e.rdev = `${major}:${minor}`;
    }
    entries.set(rel, e);
    if (st.isDirectory()) {
      for (const name of fs.readdirSync(full).sort()) visit(rel === '/' ? `/${name}` : `${rel}/${name}`);
    }
  };
  for (const name of fs.readdirSync(root).sort()) visit(`/${name}`);
  for (const group of inodes.values()) group.sort();
  return entries;
}

function summary(e: Entry): string {
  const parts = [`${e.path}(mode: ${e.mode.toString(8)}, uid: ${e.uid}, gid: ${e.gid}`];
  if (e.size !== undefined) parts.push(`size: ${e.size}, sha256: ${e.digest?.slice(0, 12)}`);
  if (e.links && e.links.length > 1) parts.push(`links: ${e.links.join('|')}`);
  if (e.target !== undefined) parts.push(`target: ${e.target}`);
  if (e.rdev !== undefined) parts.push(`rdev: ${e.rdev}`);
  if (e.xattrs) parts.push(`xattrs: ${e.xattrs}`);
  return `${parts.join(', ')})`;
}

function sameEntry(a: Entry, b: Entry): boolean {
  return (
    a.mode === b.mode &&
    a.uid === b.uid &&
    a.gid === b.gid &&
    a.size === b.size &&
    a.digest === b.digest &&
    (a.links ?? []).join('\0') === (b.links ?? []).join('\0') &&
    a.target === b.target &&
    a.rdev === b.rdev &&
    a.xattrs === b.xattrs
  );
}

/**
 * Throws unless the trees below d1 and d2 are the same: same paths, and for
 * each the same type, mode, owner, size, content, hardlink group, link
 * target, device number and extended attributes. Times are not compared.
 */
export function checkDirectoryEqual(d1: string, d2: string): void {
  const m1 = buildManifest(d1);
  const m2 = buildManifest(d2);
  const lines: string[] = [];
  const paths = [...new Set([...m1.keys(), ...m2.keys()])].sort();
  for (const p of paths) {
    const a = m1.get(p);
    const b = m2.get(p);
    if (a && !b) lines.push(`- ${p}`);
    else if (!a && b) lines.push(`+ ${p}`);
    else if (a && b && !sameEntry(a, b)) lines.push(`~ ${summary(a)} -> ${summary(b)}`);
  }
  if (lines.length > 0) throw new Error(`directory diff between ${d1} and ${d2}\n${lines.join('\n')}`);
}

/** Applies a to a fresh directory and compares root with it. */
export async function checkDirectoryEqualWithApplier(root: string, a: Applier): Promise<void> {
  const applied = fs.mkdtempSync(path.join(os.tmpdir(), 'dedup-fstest-'));
  try {
    await a.apply(applied);
    checkDirectoryEqual(applied, root);
  } finally {
    fs.rmSync(applied, { recursive: true, force: true });
  }
}
