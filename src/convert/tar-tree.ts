/**
 * Reads one layer's (uncompressed) tar stream straight into a layer tree
 * (layer-tree.ts) for the EROFS writer, file data handed to a ChunkSink as
 * it streams: the tree is the one containerd's overlay apply of the layer
 * onto an empty upper directory leaves, i.e. what applyLayerTar (untar.ts)
 * writes to disk without `parents`, then read back by treeFromDirectory.
 * The rules are untar.ts's, step for step (layer-rules.ts holds the shared
 * ones): containerd's applyNaive/createTarFile order per entry (parents,
 * whiteout conversion, removal of what the entry replaces, creation,
 * lchown, xattrs, chmod, times; directory times last), the same refusals
 * with the same LayerTarErrors.
 *
 * What the kernel does to those system calls is done here to the tree:
 * lchown of a non-directory drops security.capability; a v3 capability
 * whose root id is 0 reads back as v2; user.* xattrs exist only on files and
 * directories; device numbers must fit the kernel's 32-bit dev_t; names are
 * at most 255 bytes; POSIX ACL xattrs follow chmod and are inherited from a
 * directory's default ACL by what is created in it.
 *
 * Where the directory's result depends on the moment of the apply, the tree
 * is deterministic instead: the root, the parent directories the tar does
 * not list and whiteouts (char device 0/0) get mtime 0 (on disk: the time
 * they were created, for the root and unlisted parents the time their last
 * child was; an image from the tree is the same wherever and whenever it is
 * made). The root is 0755 root:root (a directory made with the usual umask
 * 022); as in containerd, the archive's root entry ("./") changes nothing.
 */
import type { ChunkSink, NodeKind, TreeNode } from './layer-tree';
import { newNode, nameKey, sinkFileData } from './layer-tree';
import {
  EntryError,
  LayerTarError,
  OPAQUE_XATTR,
  archiveXattrs,
  checkEntryType,
  cleanName,
  dirTimesError,
  applyEntries,
  entryTimes,
  invalid,
  kindLabel,
  lutimesTimespec,
  q,
  resolveInRoot,
  whiteoutOf,
  xattrIgnored,
} from './layer-rules';
import { type TarHeader, TarReader, TYPE } from './tar-reader';

export interface TarTreeResult {
  root: TreeNode;
  /**
   * Entries applied: every file, directory, link, device, fifo, whiteout and
   * opaque marker (not the root entry, not PAX global headers), as applyLayerTar counts.
   */
  files: number;
  /** Bytes of regular file data. */
  bytes: number;
}

export interface TarTreeOptions {
  /** What containerd logs as a warning and skips (an xattr it does not set); the messages are applyLayerTar's. */
  onWarning?: (message: string) => void;
}

/** NAME_MAX: the longest name component the kernel takes. */
const NAME_MAX = 255;
/** PATH_MAX less the NUL: the longest symlink target. */
const SYMLINK_MAX = 4095;
/** XATTR_SIZE_MAX. */
const XATTR_VALUE_MAX = 65536;
const CAPS_XATTR = 'security.capability';
const ACL_ACCESS = 'system.posix_acl_access';
const ACL_DEFAULT = 'system.posix_acl_default';

/** A refusal untar.ts meets as a failing system call (an Internal error there too); `code` is the errno's name. */
class SyscallRefusal extends EntryError {
  readonly code: string;
  constructor(code: string, message: string) {
    super('Internal', `${message}: ${code}`);
    this.code = code;
  }
}

function checkNameLength(comp: string): void {
  if (Buffer.byteLength(comp, 'utf8') > NAME_MAX) throw new SyscallRefusal('ENAMETOOLONG', `name ${q(comp)} is longer than ${NAME_MAX} bytes`);
}

const mtimeOf = (h: TarHeader): { mtimeSec: number; mtimeNsec: number } => {
  const t = lutimesTimespec(entryTimes(h).mtime);
  return { mtimeSec: t.sec, mtimeNsec: t.nsec };
};

// ---- security.capability (the kernel's cap_convert_nscap and cap_inode_getsecurity) ----

const VFS_CAP_REVISION_MASK = 0xff000000;
const VFS_CAP_REVISION_2 = 0x02000000;
const VFS_CAP_REVISION_3 = 0x03000000;
const VFS_CAP_FLAGS_EFFECTIVE = 0x000001;

/**
 * The security.capability value a root writer leaves and a root reader of
 * the init namespace reads back: v2 as given; v3 as given unless its root id
 * is 0, which reads back as v2 (the same data and effective flag); anything
 * else is refused with EINVAL.
 */
function normalizeCapability(value: Buffer): Buffer {
  const magic = value.length >= 4 ? value.readUInt32LE(0) : 0;
  const rev = (magic & VFS_CAP_REVISION_MASK) >>> 0;
  if (value.length === 20 && rev === VFS_CAP_REVISION_2) return value;
  if (value.length === 24 && rev === VFS_CAP_REVISION_3) {
    if (value.readUInt32LE(20) !== 0) return value;
    const v2 = Buffer.from(value.subarray(0, 20));
    v2.writeUInt32LE((VFS_CAP_REVISION_2 | (magic & VFS_CAP_FLAGS_EFFECTIVE)) >>> 0, 0);
    return v2;
  }
  throw new SyscallRefusal('EINVAL', `lsetxattr ${CAPS_XATTR} (${value.length} bytes, not a v2 or v3 file capability)`);
}

// ---- POSIX ACLs (the kernel's posix_acl.c, as ext4 and tmpfs use it) ----

const ACL_USER_OBJ = 0x01;
const ACL_USER = 0x02;
const ACL_GROUP_OBJ = 0x04;
const ACL_GROUP = 0x08;
const ACL_MASK = 0x10;
const ACL_OTHER = 0x20;
const ACL_XATTR_VERSION = 2;

interface AclEntry {
  tag: number;
  perm: number;
  id: number;
}

/**
 * posix_acl_from_xattr and posix_acl_valid: the entries of an ACL xattr,
 * null for an empty one (which removes the ACL), 'unsupported' for another
 * version (EOPNOTSUPP), EINVAL for a malformed or invalid ACL.
 */
function parseAcl(value: Buffer, name: string): AclEntry[] | null | 'unsupported' {
  const bad = (why: string) => new SyscallRefusal('EINVAL', `lsetxattr ${name}: ${why}`);
  if (value.length < 4) throw bad('shorter than its header');
  if (value.readUInt32LE(0) !== ACL_XATTR_VERSION) return 'unsupported';
  if ((value.length - 4) % 8 !== 0) throw bad('not a whole number of entries');
  const n = (value.length - 4) / 8;
  if (n === 0) return null;
  const entries: AclEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = 4 + i * 8;
    const tag = value.readUInt16LE(o);
    const perm = value.readUInt16LE(o + 2);
    let id = value.readUInt32LE(o + 4);
    if (tag === ACL_USER || tag === ACL_GROUP) {
      if (id === 0xffffffff) throw bad('invalid id');
    } else if ([ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER].includes(tag)) {
      id = 0xffffffff;
    } else {
      throw bad(`unknown tag 0x${tag.toString(16)}`);
    }
    entries.push({ tag, perm, id });
  }
  // posix_acl_valid, as the kernel has it (it does not sort named entries or look for duplicates).
  let state = ACL_USER_OBJ;
  let needsMask = false;
  for (const e of entries) {
    if (e.perm & ~7) throw bad('invalid permission bits');
    if (e.tag === ACL_USER_OBJ && state === ACL_USER_OBJ) state = ACL_USER;
    else if ((e.tag === ACL_USER && state === ACL_USER) || (e.tag === ACL_GROUP && state === ACL_GROUP)) needsMask = true;
    else if (e.tag === ACL_GROUP_OBJ && state === ACL_USER) state = ACL_GROUP;
    else if (e.tag === ACL_MASK && state === ACL_GROUP) state = ACL_OTHER;
    else if (e.tag === ACL_OTHER && (state === ACL_OTHER || (state === ACL_GROUP && !needsMask))) state = 0;
    else throw bad('entries missing, repeated or out of order');
  }
  if (state !== 0) throw bad('incomplete ACL');
  return entries;
}

function aclBytes(entries: AclEntry[]): Buffer {
  const b = Buffer.alloc(4 + 8 * entries.length);
  b.writeUInt32LE(ACL_XATTR_VERSION, 0);
  entries.forEach((e, i) => {
    b.writeUInt16LE(e.tag, 4 + i * 8);
    b.writeUInt16LE(e.perm, 6 + i * 8);
    b.writeUInt32LE(e.id, 8 + i * 8);
  });
  return b;
}

/** posix_acl_equiv_mode: whether the ACL says no more than permission bits (then no ACL is kept). */
function aclIsMinimal(entries: AclEntry[]): boolean {
  return entries.every((e) => e.tag === ACL_USER_OBJ || e.tag === ACL_GROUP_OBJ || e.tag === ACL_OTHER);
}

/** __posix_acl_chmod: the owner, group class (the mask if there is one) and other entries take `perm`'s bits. */
function aclChmod(entries: AclEntry[], perm: number): AclEntry[] {
  const hasMask = entries.some((e) => e.tag === ACL_MASK);
  return entries.map((e) => {
    if (e.tag === ACL_USER_OBJ) return { ...e, perm: (perm >> 6) & 7 };
    if (e.tag === ACL_OTHER) return { ...e, perm: perm & 7 };
    if (e.tag === (hasMask ? ACL_MASK : ACL_GROUP_OBJ)) return { ...e, perm: (perm >> 3) & 7 };
    return e;
  });
}

/**
 * posix_acl_create_masq: the access ACL a new inode of `mode` gets from its
 * directory's default ACL, and the mode it then has (the ACL's classes
 * limit it instead of the umask); acl null when the result is minimal.
 */
function aclCreate(dflt: AclEntry[], mode: number): { acl: AclEntry[] | null; mode: number } {
  const acl = dflt.map((e) => ({ ...e }));
  let notEquiv = false;
  let groupObj: AclEntry | undefined;
  let maskObj: AclEntry | undefined;
  for (const e of acl) {
    switch (e.tag) {
      case ACL_USER_OBJ:
        e.perm &= (mode >> 6) | ~7;
        mode &= (e.perm << 6) | ~0o700;
        break;
      case ACL_USER:
      case ACL_GROUP:
        notEquiv = true;
        break;
      case ACL_GROUP_OBJ:
        groupObj = e;
        break;
      case ACL_OTHER:
        e.perm &= mode | ~7;
        mode &= e.perm | ~0o7;
        break;
      case ACL_MASK:
        maskObj = e;
        notEquiv = true;
        break;
    }
  }
  if (maskObj) {
    maskObj.perm &= (mode >> 3) | ~7;
    mode &= (maskObj.perm << 3) | ~0o70;
  } else if (groupObj) {
    groupObj.perm &= (mode >> 3) | ~7;
    mode &= (groupObj.perm << 3) | ~0o70;
  }
  return { acl: notEquiv ? acl : null, mode };
}

// ---- the tree ----

interface DirTimes {
  /** The entry's name as stored. */
  name: string;
  rel: string[];
  mtimeSec: number;
  mtimeNsec: number;
}

/** lstat's failures on the tree, with the errno untar.ts would see. */
class LookupError extends Error {
  constructor(
    readonly code: 'ENOENT' | 'ENOTDIR' | 'ELOOP',
    what: string,
  ) {
    super(`${code}: ${code === 'ENOENT' ? 'no such file or directory' : code === 'ENOTDIR' ? 'not a directory' : 'too many levels of symbolic links'}, ${what}`);
  }
}

const label = (n: TreeNode): string => kindLabel(n.kind, n.rdevMajor === 0 && n.rdevMinor === 0);

class TreeApplier {
  files = 0;
  bytes = 0;
  readonly root = newNode('dir', { perm: 0o755 });
  private readonly dirTimes: DirTimes[] = [];

  constructor(
    private readonly sink: ChunkSink,
    private readonly warn: (msg: string) => void,
  ) {}

  private static children(dir: TreeNode): Map<string, TreeNode> {
    return dir.children as Map<string, TreeNode>;
  }

  /**
   * A new node in `dir`: a kind created by open, mkdir or mknod inherits the
   * directory's default ACL (an access ACL, and the default itself for a
   * directory), masking `mode` as the kernel does; the caller's chmod then
   * sets the final permission bits. Symlinks inherit nothing.
   */
  private create(dir: TreeNode, kind: NodeKind, mode: number, attrs: Partial<TreeNode>): TreeNode {
    const node = newNode(kind, { perm: mode, ...attrs });
    const dflt = kind === 'symlink' ? undefined : dir.xattrs.get(ACL_DEFAULT);
    if (dflt) {
      const entries = parseAcl(dflt, ACL_DEFAULT) as AclEntry[];
      const made = aclCreate(entries, mode);
      node.perm = made.mode;
      if (made.acl) node.xattrs.set(ACL_ACCESS, aclBytes(made.acl));
      if (kind === 'dir') node.xattrs.set(ACL_DEFAULT, dflt);
    }
    return node;
  }

  /** chmod: the permission bits, and the ACL's classes with them. */
  private chmod(node: TreeNode, perm: number): void {
    node.perm = perm;
    const acl = node.xattrs.get(ACL_ACCESS);
    if (acl) node.xattrs.set(ACL_ACCESS, aclBytes(aclChmod(parseAcl(acl, ACL_ACCESS) as AclEntry[], perm)));
  }

  /**
   * containerd's mkparent: every ancestor of an entry must be a directory;
   * a missing one is created 0755 root:root (as mkdir + chmod 0755: its
   * mtime is 0, see the top). An ancestor that is a symlink or another
   * non-directory fails the entry. Returns the entry's parent directory.
   */
  private ensureParents(comps: string[]): TreeNode {
    let dir = this.root;
    for (let i = 0; i < comps.length - 1; i++) {
      const key = () => comps.slice(0, i + 1).join('/');
      checkNameLength(comps[i]);
      const kids = TreeApplier.children(dir);
      let child = kids.get(nameKey(comps[i]));
      if (!child) {
        child = this.create(dir, 'dir', 0o755, {});
        this.chmod(child, 0o755);
        kids.set(nameKey(comps[i]), child);
      } else if (child.kind === 'symlink') {
        throw invalid(`parent ${q(key())} is a symlink (-> ${q((child.target as Buffer).toString('utf8'))}) made by an earlier entry: refusing to write through it`);
      } else if (child.kind !== 'dir') {
        throw invalid(`parent ${q(key())} is not a directory (an earlier entry made it a ${label(child)})`);
      }
      dir = child;
    }
    return dir;
  }

  /**
   * lstat on the tree: symlinks met before the last component followed
   * inside the root (an absolute target from the root, ".." never above
   * it), the last component not; null when something is missing,
   * LookupError ENOTDIR through a non-directory, ELOOP past 40 links.
   */
  private lstat(comps: string[]): TreeNode | null {
    const walked: TreeNode[] = [this.root];
    const todo = [...comps];
    let links = 0;
    while (todo.length > 0) {
      const c = todo.shift() as string;
      if (c === '' || c === '.') continue;
      if (c === '..') {
        if (walked.length > 1) walked.pop();
        continue;
      }
      const next = TreeApplier.children(walked[walked.length - 1]).get(nameKey(c));
      if (!next) return null;
      if (todo.length === 0) return next;
      if (next.kind === 'symlink') {
        if (++links > 40) throw new LookupError('ELOOP', comps.join('/'));
        const target = (next.target as Buffer).toString('utf8');
        if (target.startsWith('/')) walked.length = 1;
        todo.unshift(...target.split('/'));
      } else if (next.kind === 'dir') {
        walked.push(next);
      } else {
        throw new LookupError('ENOTDIR', comps.join('/'));
      }
    }
    return walked[walked.length - 1];
  }

  async apply(h: TarHeader, reader: TarReader): Promise<void> {
    const comps = cleanName(h.name, 'entry name');
    // containerd ignores an entry for the root itself ("./").
    if (comps.length === 0) return;
    const t = h.typeflag;
    checkEntryType(t);
    const parent = this.ensureParents(comps);
    const kids = TreeApplier.children(parent);

    const base = comps[comps.length - 1];
    const whiteout = whiteoutOf(base);
    if (whiteout?.opaque) {
      parent.xattrs.set(OPAQUE_XATTR, Buffer.from('y'));
      this.files++;
      return;
    }
    if (whiteout) {
      checkNameLength(whiteout.name);
      // mknod(S_IFCHR, 0, 0) and lchown: no chmod, no times (mtime 0, see the top).
      const node = this.create(parent, 'chr', 0, { rdevMajor: 0, rdevMinor: 0 });
      kids.set(nameKey(whiteout.name), node);
      this.chown(node, h.uid, h.gid);
      this.files++;
      return;
    }

    let linkTarget: string[] | null = null;
    if (t === TYPE.link) linkTarget = this.hardlinkTarget(h, comps);
    checkNameLength(base);
    const key = nameKey(base);
    const existing = kids.get(key);
    if (existing && !(existing.kind === 'dir' && t === TYPE.dir)) kids.delete(key);

    const perm = h.mode & 0o7777;
    let node: TreeNode;
    switch (t) {
      case TYPE.dir:
        node = existing?.kind === 'dir' ? existing : this.create(parent, 'dir', perm, {});
        break;
      case TYPE.reg:
        node = this.create(parent, 'file', perm, {});
        kids.set(key, node);
        node.size = h.size;
        node.chunks = await sinkFileData(this.sink, reader.data(), h.size, h.name);
        this.bytes += h.size;
        break;
      case TYPE.link: {
        const target = this.lstat(linkTarget as string[]);
        if (!target) throw invalid(`hardlink to ${q(h.linkname)}: the target was removed by this entry (it replaces a directory holding it)`);
        node = target;
        break;
      }
      case TYPE.symlink: {
        const target = Buffer.from(h.linkname, 'utf8');
        if (target.length === 0) throw new SyscallRefusal('ENOENT', 'symlink with an empty target');
        if (target.length > SYMLINK_MAX) throw new SyscallRefusal('ENAMETOOLONG', `symlink target of ${target.length} bytes`);
        node = this.create(parent, 'symlink', 0o777, { target });
        break;
      }
      default: {
        // char, block, fifo: glibc's mknod refuses device numbers the kernel's 32-bit dev_t cannot hold.
        const { devmajor: major, devminor: minor } = h;
        if (!Number.isInteger(major) || major < 0 || major > 0xffffffff || !Number.isInteger(minor) || minor < 0 || minor > 0xffffffff) {
          throw new EntryError('Internal', `device ${major}:${minor} out of range`);
        }
        if (major > 0xfff || minor > 0xfffff) throw new SyscallRefusal('EINVAL', `mknod ${major}:${minor} (beyond 12-bit major, 20-bit minor)`);
        const kind: NodeKind = t === TYPE.char ? 'chr' : t === TYPE.block ? 'blk' : 'fifo';
        node = this.create(parent, kind, perm, kind === 'fifo' ? {} : { rdevMajor: major, rdevMinor: minor });
      }
    }
    kids.set(key, node);

    // chown clears set-id bits and file capabilities: xattrs and mode come after it.
    this.chown(node, h.uid, h.gid);
    this.setXattrs(h, node);
    // containerd's lchmod: no chmod of a symlink (a hardlink to one is one).
    if (node.kind !== 'symlink') this.chmod(node, perm);
    Object.assign(node, mtimeOf(h));
    if (t === TYPE.dir) this.dirTimes.push({ name: h.name, rel: comps, ...mtimeOf(h) });
    this.files++;
  }

  /**
   * lchown: -1 (and (uid_t)-1) keeps an id; on a non-directory it drops
   * security.capability (the kernel's ATTR_KILL_PRIV; the set-id bits it
   * also clears are set again by the chmod that follows).
   */
  private chown(node: TreeNode, uid: number, gid: number): void {
    for (const [what, v] of [['uid', uid], ['gid', gid]] as const) {
      if (!Number.isInteger(v) || v < -1 || v > 0xffffffff) throw new EntryError('Internal', `lchown: ${what} ${v} out of range`);
    }
    if (uid !== -1 && uid !== 0xffffffff) node.uid = uid;
    if (gid !== -1 && gid !== 0xffffffff) node.gid = gid;
    if (node.kind !== 'dir') node.xattrs.delete(CAPS_XATTR);
  }

  /** The target of a hardlink entry: an existing non-directory of this layer, reached through real directories. */
  private hardlinkTarget(h: TarHeader, comps: string[]): string[] {
    const target = cleanName(h.linkname, 'hardlink target');
    if (target.length === 0) throw invalid(`hardlink to ${q(h.linkname)}: the target is the layer root`);
    if (target.join('/') === comps.join('/')) throw invalid(`hardlink to ${q(h.linkname)}: the target is the entry itself`);
    let parents = 'ok';
    let dir = this.root;
    for (let i = 0; i < target.length - 1; i++) {
      checkNameLength(target[i]);
      const child = TreeApplier.children(dir).get(nameKey(target[i]));
      if (!child) {
        parents = 'missing';
        break;
      }
      if (child.kind !== 'dir') {
        parents = `${q(target.slice(0, i + 1).join('/'))} is a ${label(child)}`;
        break;
      }
      dir = child;
    }
    if (parents === 'ok') checkNameLength(target[target.length - 1]);
    const st = parents === 'ok' ? TreeApplier.children(dir).get(nameKey(target[target.length - 1])) : undefined;
    if (parents !== 'ok' && parents !== 'missing') {
      throw invalid(`hardlink to ${q(h.linkname)}: the target's path goes through ${parents}, not a directory: refusing`);
    }
    if (!st) throw invalid(`hardlink to ${q(h.linkname)}: the target does not exist (a hardlink must name an earlier entry of the same layer)`);
    if (st.kind === 'dir') throw invalid(`hardlink to ${q(h.linkname)}: the target is a directory`);
    return target;
  }

  /**
   * SCHILY.xattr.* records as lsetxattr takes them from untar.ts: trusted.*
   * skipped (archiveXattrs), user.* on anything but a file or directory and
   * names outside the kernel's namespaces skipped with untar.ts's warning;
   * names and values the syscall refuses fail the entry.
   */
  private setXattrs(h: TarHeader, node: TreeNode): void {
    for (const [name, raw] of archiveXattrs(h, this.warn)) {
      let value = raw;
      const nameBytes = Buffer.byteLength(name, 'utf8');
      if (nameBytes === 0 || nameBytes > NAME_MAX) throw new SyscallRefusal('ERANGE', `lsetxattr ${q(name)} (name of ${nameBytes} bytes)`);
      if (value.length > XATTR_VALUE_MAX) throw new SyscallRefusal('E2BIG', `lsetxattr ${name} (value of ${value.length} bytes)`);
      if (name === CAPS_XATTR && value.length > 0) value = normalizeCapability(value);
      if (name.startsWith('user.') && node.kind !== 'file' && node.kind !== 'dir') {
        this.warn(xattrIgnored.userOnSpecial(h.name, name));
        continue;
      }
      if (name === ACL_ACCESS || name === ACL_DEFAULT) {
        // A symlink has no ACLs (EOPNOTSUPP, before the value is even parsed).
        if (node.kind === 'symlink') {
          this.warn(xattrIgnored.unsupported(h.name, name, 'ENOTSUP'));
          continue;
        }
        const acl = parseAcl(value, name);
        if (acl === 'unsupported') {
          this.warn(xattrIgnored.unsupported(h.name, name, 'ENOTSUP'));
          continue;
        }
        if (name === ACL_DEFAULT) {
          if (node.kind !== 'dir') {
            if (acl) throw new SyscallRefusal('EACCES', `lsetxattr ${name} on a ${label(node)}`);
            continue;
          }
          if (acl) node.xattrs.set(name, aclBytes(acl));
          else node.xattrs.delete(name);
        } else if (acl && !aclIsMinimal(acl)) {
          // (the mode the ACL implies is replaced by the chmod that follows)
          node.xattrs.set(name, aclBytes(acl));
        } else {
          node.xattrs.delete(name);
        }
        continue;
      }
      const ns = ['user.', 'security.'].find((p) => name.startsWith(p));
      if (ns === undefined) {
        this.warn(xattrIgnored.unsupported(h.name, name, 'ENOTSUP'));
        continue;
      }
      if (name === ns) throw new SyscallRefusal('EINVAL', `lsetxattr ${q(name)}`);
      if (name === CAPS_XATTR && value.length === 0) throw new SyscallRefusal('EINVAL', `lsetxattr ${CAPS_XATTR} (empty)`);
      node.xattrs.set(name, value);
    }
  }

  /**
   * Directory times, last. As untar.ts (containerd) does, the name is
   * resolved again with symlinks followed inside the root, and whatever is
   * there now gets the times; a path gone by now fails the layer.
   */
  finish(): void {
    for (const d of this.dirTimes) {
      try {
        const resolved = resolveInRoot(d.rel.join('/'), (rel) => {
          const n = this.lstat(rel.split('/').slice(1));
          return n?.kind === 'symlink' ? (n.target as Buffer).toString('utf8') : null;
        }, 'the layer');
        const node = this.lstat(resolved.split('/').filter((c) => c !== ''));
        if (!node) throw new LookupError('ENOENT', resolved);
        node.mtimeSec = d.mtimeSec;
        node.mtimeNsec = d.mtimeNsec;
      } catch (err) {
        throw dirTimesError(d.name, (err as { code?: string }).code, err);
      }
    }
  }
}

/**
 * Reads one layer's uncompressed tar from `input` into a tree, regular
 * files' data streamed into `sink` (never a whole file in memory), and
 * returns the tree with applyLayerTar's counts. On failure it throws the
 * LayerTarError applyLayerTar would (naming the entry and the cause) and
 * stops reading `input`; chunks already given to the sink stay there.
 */
export async function treeFromTar(input: AsyncIterable<Buffer>, sink: ChunkSink, opts: TarTreeOptions = {}): Promise<TarTreeResult> {
  const applier = new TreeApplier(sink, (m) => opts.onWarning?.(m));
  await applyEntries(new TarReader(input), applier);
  return { root: applier.root, files: applier.files, bytes: applier.bytes };
}
