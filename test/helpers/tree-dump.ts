/**
 * Layer trees (src/convert/layer-tree.ts) made comparable: a ChunkSink that
 * keeps every piece, and a canonical dump of a tree with file contents read
 * back from the pieces, hardlinks as groups of paths and every attribute
 * the EROFS writer takes.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { type ChunkSink, type Piece, type TreeNode, keyBytes, pieceBytes } from '../../src/convert/layer-tree';

/** Keeps each piece; its chunk number is its index. */
export class RecordingSink implements ChunkSink {
  readonly pieces: Buffer[] = [];
  constructor(readonly chunkSize: number) {}

  async add(parts: Piece): Promise<number> {
    const piece = pieceBytes(parts);
    assert.ok(piece.length > 0 && piece.length <= this.chunkSize, `piece of ${piece.length} bytes (chunk size ${this.chunkSize})`);
    this.pieces.push(Buffer.from(piece));
    return this.pieces.length - 1;
  }

  /** A file's bytes, checking its chunk list: full chunks but the last. */
  content(n: TreeNode, where: string): Buffer {
    const chunks = n.chunks ?? [];
    assert.equal(chunks.length, Math.ceil((n.size ?? 0) / this.chunkSize), `${where}: chunks for ${n.size} bytes`);
    const parts = chunks.map((c, i) => {
      const p = this.pieces[c];
      assert.ok(p, `${where}: chunk ${c} was never added`);
      if (i < chunks.length - 1) assert.equal(p.length, this.chunkSize, `${where}: chunk ${i} is not full`);
      return p;
    });
    const data = Buffer.concat(parts);
    assert.equal(data.length, n.size, `${where}: content length`);
    return data;
  }
}

export interface DumpedNode {
  kind: TreeNode['kind'];
  perm: string;
  uid: number;
  gid: number;
  mtime: string;
  xattrs: Record<string, string>;
  target?: string;
  rdev?: string;
  size?: number;
  sha256?: string;
  /** The other paths of the same node (hardlinks), sorted. */
  links?: string[];
  children?: string[];
}

/** Path ("" for the root, names joined by "/") → the node's attributes. */
export type Dump = Map<string, DumpedNode>;

function nameOf(key: string): string {
  const b = keyBytes(key);
  const s = b.toString('utf8');
  return Buffer.from(s, 'utf8').equals(b) ? s : `<hex:${b.toString('hex')}>`;
}

export function dumpTree(root: TreeNode, sink: RecordingSink): Dump {
  const out: Dump = new Map();
  const paths = new Map<TreeNode, string[]>();
  const visit = (n: TreeNode, p: string, depth: number) => {
    assert.ok(depth < 1000, 'tree too deep (a cycle?)');
    paths.set(n, [...(paths.get(n) ?? []), p]);
    const xattrs: Record<string, string> = {};
    for (const k of [...n.xattrs.keys()].sort()) xattrs[k] = (n.xattrs.get(k) as Buffer).toString('hex');
    const d: DumpedNode = {
      kind: n.kind,
      perm: `0${n.perm.toString(8)}`,
      uid: n.uid,
      gid: n.gid,
      mtime: `${n.mtimeSec}.${String(n.mtimeNsec).padStart(9, '0')}`,
      xattrs,
    };
    if (n.kind === 'file') {
      const data = sink.content(n, p);
      d.size = data.length;
      d.sha256 = crypto.createHash('sha256').update(data).digest('hex');
    }
    if (n.kind === 'symlink') d.target = (n.target as Buffer).toString('utf8');
    if (n.kind === 'chr' || n.kind === 'blk') d.rdev = `${n.rdevMajor}:${n.rdevMinor}`;
    out.set(p, d);
    if (n.kind === 'dir') {
      assert.equal(paths.get(n)?.length, 1, `directory ${p} is in the tree twice`);
      const keys = [...(n.children as Map<string, TreeNode>).keys()].sort((a, b) => Buffer.compare(keyBytes(a), keyBytes(b)));
      d.children = keys.map(nameOf);
      for (const k of keys) visit((n.children as Map<string, TreeNode>).get(k) as TreeNode, p === '' ? nameOf(k) : `${p}/${nameOf(k)}`, depth + 1);
    }
  };
  visit(root, '', 0);
  for (const group of paths.values()) {
    if (group.length < 2) continue;
    for (const p of group) (out.get(p) as DumpedNode).links = group.filter((x) => x !== p).sort();
  }
  return out;
}

/** Differences between two dumps, one line per path. */
export function diffDumps(a: Dump, b: Dump, an: string, bn: string): string[] {
  const out: string[] = [];
  for (const p of [...new Set([...a.keys(), ...b.keys()])].sort()) {
    const x = a.get(p);
    const y = b.get(p);
    if (JSON.stringify(x) !== JSON.stringify(y)) out.push(`${JSON.stringify(p)}:\n    ${an}: ${JSON.stringify(x)}\n    ${bn}: ${JSON.stringify(y)}`);
  }
  return out;
}
