/**
 * A kernel without mounts, for the fast lane: FakeKernel stands in for the
 * snapshotter's LayerKernel seam, and the same mount table serves the
 * tests' own mounts of what Prepare and View return (bind and overlay).
 *
 * A "mount" is a directory materialized in userspace:
 * - an EROFS layer image is extracted with fsck.erofs --extract (file data
 *   read from the chunk store as the real mount would), hardlinks restored
 *   from the image's inode numbers;
 * - a read-only bind or overlay becomes a copy of the merged lower layers
 *   (overlayfs rules: upper over lower, whiteouts delete, opaque
 *   directories hide what is below), made read-only;
 * - a read-write overlay (or bind, an overlay without lower layers) is a
 *   copy of the merged view; at unmount (and
 *   whenever the harness calls syncUppers: before Commit and Usage, which
 *   read the upper directory the kernel keeps current) its upper directory
 *   is rewritten to what overlayfs would have left there: what differs from
 *   the lower layers, whiteouts for what was deleted, and every name of a
 *   hardlinked file that was written.
 * It needs no privilege: whiteouts (character device 0/0) may be created by
 * anyone; ownership is kept only when running as root.
 */
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mknod } from '../../native/mknod';
import { readXattrs } from '../../native/xattr';
import { listImageTree } from '../../src/convert/erofs-format';
import type { FscacheSource, LayerKernel } from '../../src/mount/layer-kernel';
import type { Mount } from '../../src/mount/types';
import { deviceNumbers } from './fstest';

const S_IFCHR = 0o020000;
const isRoot = process.getuid?.() === 0;

interface FakeMount {
  /** The mount point's own mode and owner, back after the unmount. */
  under?: fs.Stats;
  fstype: string;
  source: string;
  options: string;
  /** Run at unmount and at sync (an overlay's upper written back). */
  writeBack?: () => unknown;
}

/** The test-side mount operations (real: mount(8); fake: FakeKernel). */
export interface TestMounter {
  mountAll(mounts: Mount[], target: string): Promise<void>;
  unmountAll(target: string): Promise<void>;
  unmountUnder(dir: string): Promise<string[]>;
}

export class FakeKernel implements LayerKernel, TestMounter {
  readonly current = 'file-backed' as const;
  readonly directIoInUse = false;
  readonly readAheadInUse = null;
  private readonly table = new Map<string, FakeMount>();
  /** Files tests declare open elsewhere (the lease probe says so). */
  readonly openFiles = new Set<string>();
  /** Mount points tests declare busy (unmountIfIdle says no). */
  readonly busy = new Set<string>();
  /** Every kernel call, for assertions. */
  readonly calls: string[] = [];

  constructor(
    private readonly storeFile = '',
    private readonly devicesOf?: (image: string) => string[],
  ) {}

  mountImage(image: string, target: string, hasBlob: boolean, device?: string): void {
    this.calls.push(`mountImage ${target}`);
    fs.mkdirSync(target, { recursive: true, mode: 0o755 });
    if (this.table.has(target)) return;
    const devices = device ? [device] : hasBlob ? (this.devicesOf?.(image) ?? [this.storeFile]) : [];
    if (devices.length > 1) throw new Error(`fake kernel: image ${image} reads ${devices.length} devices; fsck.erofs 1.5 extracts with one (use store layout "single")`);
    const args = [`--extract=${target}`, '--overwrite', ...(isRoot ? ['--preserve'] : ['--preserve-perms', '--no-preserve-owner']), ...devices.map((d) => `--device=${d}`), image];
    try {
      execFileSync('fsck.erofs', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      const e = err as { stderr?: Buffer; message: string };
      throw new Error(`fake kernel: cannot extract ${image}: ${(e.stderr?.toString() || e.message).trim()}`);
    }
    // fsck.erofs writes each name of a hardlinked file as its own file.
    const byNid = new Map<number, string[]>();
    for (const e of listImageTree(fs.readFileSync(image))) {
      if ((e.mode & 0o170000) !== 0o100000) continue;
      byNid.set(e.nid, [...(byNid.get(e.nid) ?? []), e.path]);
    }
    for (const names of byNid.values()) {
      for (const p of names.slice(1)) {
        fs.rmSync(path.join(target, p));
        fs.linkSync(path.join(target, names[0]), path.join(target, p));
      }
    }
    this.table.set(target, { fstype: 'erofs', source: image, options: 'ro' });
  }

  async mountFscache(target: string, src: FscacheSource): Promise<void> {
    throw new Error(`fake kernel: no EROFS over fscache (${target}, ${src.fsid})`);
  }

  unmount(target: string): void {
    this.calls.push(`unmount ${target}`);
    this.detach(target);
    try {
      fs.rmdirSync(target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
  }

  unmountIfIdle(target: string): boolean {
    if (this.busy.has(target)) return false;
    this.detach(target);
    return true;
  }

  mountPoints(): string[] {
    return [...this.table.keys()];
  }

  /** In /proc/self/mountinfo's shape: id parent dev root target options - fstype source super-options. */
  mountTable(): string {
    return [...this.table].map(([target, m], i) => `${i + 100} 1 0:0 / ${target} rw - ${m.fstype} ${m.source} ${m.options}\n`).join('');
  }

  openElsewhere(file: string): boolean {
    fs.accessSync(file);
    return this.openFiles.has(file);
  }

  async dropPageCache(): Promise<{ files: number; failed: number }> {
    return { files: 0, failed: 0 };
  }

  overlayHasIndex(): boolean {
    return false;
  }

  // ---- the tests' own mounts ----

  async mountAll(mounts: Mount[], target: string): Promise<void> {
    for (const m of mounts) this.mountOne(m, target);
  }

  async unmountAll(target: string): Promise<void> {
    while (this.table.has(target)) this.detach(target);
  }

  async unmountUnder(dir: string): Promise<string[]> {
    const root = path.resolve(dir);
    const under = [...this.table.keys()].filter((t) => t === root || t.startsWith(`${root}/`)).reverse();
    for (const t of under) this.detach(t);
    return under;
  }

  /**
   * Writes every read-write overlay's changes to its upper directory, as
   * the kernel's overlayfs has them there at every moment: the harness
   * calls it before the snapshotter reads an active snapshot (Commit, Usage).
   */
  syncUppers(): void {
    for (const m of this.table.values()) m.writeBack?.();
  }

  private mountOne(m: Mount, target: string): void {
    if (this.table.has(target)) throw new Error(`fake kernel: ${target} is mounted already`);
    const under = fs.statSync(target);
    const ro = m.options.includes('ro');
    if (m.type === 'bind') {
      // A read-write bind is an overlay with no lower layer: its changes go back to the source.
      materialize([m.source], target);
      if (ro) setReadOnly(target, true);
      const writeBack = ro ? undefined : () => fs.existsSync(m.source) && writeUpper(target, [], m.source);
      this.table.set(target, { under, fstype: 'none', source: m.source, options: m.options.join(','), writeBack });
      return;
    }
    if (m.type !== 'overlay') throw new Error(`fake kernel: cannot mount type ${m.type}`);
    const opt = (name: string) => m.options.find((o) => o.startsWith(`${name}=`))?.slice(name.length + 1);
    const lowers = (opt('lowerdir') ?? '').split(':').filter((l) => l !== '');
    const upper = opt('upperdir');
    // lowerdir lists the top layer first; materialize applies bottom first.
    const layers = [...lowers].reverse();
    materialize(upper ? [...layers, upper] : layers, target);
    if (!upper) setReadOnly(target, true);
    // Gone: the snapshot was committed and its directory converted and deleted (the kernel's writes would be lost too).
    const writeBack = upper ? () => fs.existsSync(upper) && writeUpper(target, layers, upper) : undefined;
    this.table.set(target, { under, fstype: 'overlay', source: 'overlay', options: m.options.join(','), writeBack });
  }

  private detach(target: string): void {
    const m = this.table.get(target);
    if (!m) return;
    this.table.delete(target);
    m.writeBack?.();
    setReadOnly(target, false);
    for (const name of fs.readdirSync(target)) fs.rmSync(path.join(target, name), { recursive: true, force: true });
    if (m.under) {
      if (isRoot) fs.lchownSync(target, m.under.uid, m.under.gid);
      fs.chmodSync(target, m.under.mode & 0o7777);
    }
  }
}

// ---- userspace overlayfs ----

function isWhiteout(st: fs.Stats): boolean {
  return st.isCharacterDevice() && st.rdev === 0;
}

function isOpaque(dir: string): boolean {
  const x = readXattrs(dir, { unsupportedIsEmpty: true });
  return ['trusted.overlay.opaque', 'user.overlay.opaque'].some((n) => x.get(n)?.toString() === 'y');
}

/** Copies `from` to `to` keeping type, mode, owner (root only) and times; `links` maps a source inode to its first copy. */
function copyEntry(from: string, to: string, st: fs.Stats, links: Map<string, string>): void {
  if (st.isDirectory()) {
    fs.mkdirSync(to, { mode: 0o700 });
  } else if (st.isFile()) {
    const ino = `${st.dev}:${st.ino}`;
    const first = st.nlink > 1 ? links.get(ino) : undefined;
    if (first) return fs.linkSync(first, to);
    fs.copyFileSync(from, to);
    if (st.nlink > 1) links.set(ino, to);
  } else if (st.isSymbolicLink()) {
    fs.symlinkSync(fs.readlinkSync(from), to);
  } else if (st.isCharacterDevice() || st.isBlockDevice() || st.isFIFO()) {
    const [major, minor] = deviceNumbers(fs.lstatSync(from, { bigint: true }).rdev);
    mknod(to, st.mode, major, minor);
  } else {
    return;
  }
  if (isRoot) fs.lchownSync(to, st.uid, st.gid);
  if (!st.isSymbolicLink()) fs.chmodSync(to, st.mode & 0o7777);
}

/** Applies layer tree `src` onto `dst` with overlayfs's rules. */
function applyLayer(src: string, dst: string, links: Map<string, string>): void {
  for (const name of fs.readdirSync(src)) {
    const from = path.join(src, name);
    const to = path.join(dst, name);
    const st = fs.lstatSync(from);
    const have = fs.lstatSync(to, { throwIfNoEntry: false });
    if (isWhiteout(st)) {
      if (have) fs.rmSync(to, { recursive: true, force: true });
      continue;
    }
    if (st.isDirectory()) {
      if (have && (!have.isDirectory() || isOpaque(from))) fs.rmSync(to, { recursive: true, force: true });
      if (!have || !have.isDirectory() || isOpaque(from)) copyEntry(from, to, st, links);
      else {
        if (isRoot) fs.lchownSync(to, st.uid, st.gid);
        fs.chmodSync(to, st.mode & 0o7777);
      }
      applyLayer(from, to, links);
      continue;
    }
    if (have) fs.rmSync(to, { recursive: true, force: true });
    copyEntry(from, to, st, links);
  }
}

/** `target` becomes the merged view of `layers` (bottom first). */
function materialize(layers: string[], target: string): void {
  const links = new Map<string, string>();
  for (const layer of layers) {
    applyLayer(layer, target, links);
    links.clear();
  }
  const top = fs.lstatSync(layers[layers.length - 1]);
  if (isRoot) fs.lchownSync(target, top.uid, top.gid);
  fs.chmodSync(target, top.mode & 0o7777);
}

/**
 * Read-only as a ro mount is: for root every entry immutable (chattr +i);
 * otherwise the top directory loses its write bits (its own mode is not
 * part of a tree comparison; entries below it stay writable).
 */
function setReadOnly(dir: string, on: boolean): void {
  if (isRoot) {
    try {
      execFileSync('chattr', ['-R', on ? '+i' : '-i', dir], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (err) {
      if (on) throw new Error(`fake kernel: chattr +i ${dir}: ${(err as { stderr?: Buffer }).stderr?.toString().trim()}`);
    }
    return;
  }
  const mode = fs.statSync(dir).mode & 0o7777;
  fs.chmodSync(dir, on ? mode & ~0o222 : mode | 0o200);
}

interface Described {
  st: fs.Stats;
  sig: string;
}

/** Type, mode, owner and content of each path below `root` (root excluded). */
function describe(root: string): Map<string, Described> {
  const out = new Map<string, Described>();
  const visit = (rel: string): void => {
    const full = path.join(root, rel);
    const st = fs.lstatSync(full);
    let sig = `${st.mode}:${st.uid}:${st.gid}`;
    if (st.isFile()) sig += `:${crypto.createHash('sha256').update(fs.readFileSync(full)).digest('hex')}`;
    else if (st.isSymbolicLink()) sig += `:${fs.readlinkSync(full)}`;
    else if (st.isCharacterDevice() || st.isBlockDevice()) sig += `:${st.rdev}`;
    out.set(rel, { st, sig });
    if (st.isDirectory()) for (const n of fs.readdirSync(full)) visit(path.join(rel, n));
  };
  for (const n of fs.readdirSync(root)) visit(n);
  return out;
}

/**
 * What overlayfs leaves in `upper` for the view `target` over `lowers`
 * (bottom first): everything that differs, whiteouts for what is gone,
 * the directories above each (copied up), and all names of a written
 * hardlinked file.
 */
function writeUpper(target: string, lowers: string[], upper: string): void {
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'dedup-fake-lower-'));
  try {
    if (lowers.length > 0) materialize(lowers, scratch);
    const lower = describe(scratch);
    const view = describe(target);
    const changed = new Set<string>();
    for (const [rel, d] of view) {
      const l = lower.get(rel);
      if (!l || l.sig !== d.sig || (l.st.isDirectory() !== d.st.isDirectory())) changed.add(rel);
    }
    // A written hardlinked file: every name of it goes up (overlayfs copies up the inode).
    const byIno = new Map<number, string[]>();
    for (const [rel, d] of view) if (d.st.isFile() && d.st.nlink > 1) byIno.set(d.st.ino, [...(byIno.get(d.st.ino) ?? []), rel]);
    for (const names of byIno.values()) if (names.some((n) => changed.has(n))) for (const n of names) changed.add(n);
    // Directories above anything changed are copied up too.
    for (const rel of [...changed]) for (let p = path.dirname(rel); p !== '.'; p = path.dirname(p)) changed.add(p);
    const gone = [...lower.keys()].filter((rel) => !view.has(rel) && view.get(path.dirname(rel))?.st.isDirectory() !== false && !isUnderGone(rel, lower, view));
    for (const rel of gone) for (let p = path.dirname(rel); p !== '.'; p = path.dirname(p)) changed.add(p);
    for (const name of fs.readdirSync(upper)) fs.rmSync(path.join(upper, name), { recursive: true, force: true });
    const links = new Map<string, string>();
    for (const rel of [...changed].sort()) {
      const from = path.join(target, rel);
      const to = path.join(upper, rel);
      const st = view.get(rel)?.st as fs.Stats;
      const existing = fs.lstatSync(to, { throwIfNoEntry: false });
      if (existing) continue;
      copyEntry(from, to, st, links);
    }
    for (const rel of gone) {
      const to = path.join(upper, rel);
      if (fs.lstatSync(to, { throwIfNoEntry: false })) fs.rmSync(to, { recursive: true, force: true });
      mknod(to, S_IFCHR, 0, 0);
    }
    // A directory replaced by another kind, then back: only its new contents count (opaque).
    const top = fs.lstatSync(target);
    if (isRoot) fs.lchownSync(upper, top.uid, top.gid);
    fs.chmodSync(upper, top.mode & 0o7777);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

/** Whether `rel`'s parent is gone as well (then only the topmost gone name needs a whiteout). */
function isUnderGone(rel: string, lower: Map<string, Described>, view: Map<string, Described>): boolean {
  for (let p = path.dirname(rel); p !== '.'; p = path.dirname(p)) {
    if (lower.has(p) && (!view.has(p) || !view.get(p)?.st.isDirectory())) return true;
  }
  return false;
}
