/**
 * The source tree keeps its layers: every relative import of src/ and
 * native/ (static, `import type`, `export ... from`, `import()`, `require`)
 * goes to the importer's own folder or to a folder of a lower rank, folders
 * import each other without cycles, and so do files. Pure parsing of the
 * sources (TypeScript's import scanner): no root, no build output read.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';

/**
 * The design rule: a folder imports only from folders below it. Higher rows
 * use lower ones, never the other way round; folders in one row may import
 * each other as long as no cycle forms. A new folder gets a row here before
 * it can hold code. (Each name is a folder of src/, except `native`, the
 * top-level native/ of FFI wrappers.)
 */
const LAYERS: readonly { folders: readonly string[]; what: string }[] = [
  { folders: ['cmd'], what: 'commands: CLI parsing, the daemon\'s wiring' },
  { folders: ['api', 'grpc', 'doctor'], what: 'what the daemon serves (HTTP API, containerd\'s Snapshots service) and the diagnostic tool' },
  { folders: ['snapshot'], what: 'the snapshotter: snapshot state machine, metastore, integrity' },
  { folders: ['layers', 'ondemand', 'convert'], what: 'layer services: conversion, on-demand loading' },
  {
    folders: ['store', 'mount', 'remote', 'kernel', 'containerd', 'audit', 'ksm', 'systemd'],
    what: 'resources: chunk store, mounts, registries, kernel probes, containerd\'s API as a client, audit log, KSM, systemd',
  },
  { folders: ['native', 'util', 'errdefs', 'log', 'config'], what: 'foundations: FFI, helpers, error taxonomy, logging, configuration' },
];

/**
 * Known wrong-way imports in files whose owner is changing them, each naming
 * the issue; the owner deletes the entry with the fix. An entry that no
 * longer matches an import fails the test, so none outlives its fix.
 */
const ALLOWED: readonly { file: string; imports: string; why: string }[] = [
  // { file: 'src/<folder>/<file>.ts', imports: 'src/<higher folder>/<file>.ts', why: 'issue N: what moves where, and who is on it' },
];

const REPO = path.resolve(__dirname, '..', '..');

const RANK = new Map<string, number>();
LAYERS.forEach((layer, i) => {
  for (const f of layer.folders) RANK.set(f, LAYERS.length - i);
});

interface Import {
  from: string;
  to: string;
  line: number;
  spec: string;
}

/** Relative specifiers a file imports, with their line numbers. */
function importsOf(text: string): { spec: string; line: number }[] {
  const info = ts.preProcessFile(text, true, true);
  const lineAt = (pos: number) => text.slice(0, pos).split('\n').length;
  return info.importedFiles.filter((f) => f.fileName.startsWith('.')).map((f) => ({ spec: f.fileName, line: lineAt(f.pos) }));
}

function walk(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...walk(p));
    else if (e.isFile() && e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

/** The source file a relative specifier names, or null (package.json, a file outside the sources). */
function resolve(fromFile: string, spec: string, known: Set<string>): string | null {
  const base = path.resolve(path.dirname(fromFile), spec);
  for (const c of [base, `${base}.ts`, path.join(base, 'index.ts')]) if (known.has(c)) return c;
  return null;
}

const rel = (f: string) => path.relative(REPO, f);

/** `src/<folder>/...` → folder; `native/...` → "native". */
function folderOf(file: string): string {
  const parts = rel(file).split(path.sep);
  return parts[0] === 'native' ? 'native' : parts.length > 2 ? parts[1] : `src/${parts[1]}`;
}

function sources(): { files: string[]; imports: Import[] } {
  const files = [...walk(path.join(REPO, 'src')), ...walk(path.join(REPO, 'native'))].sort();
  const known = new Set(files);
  const imports: Import[] = [];
  for (const from of files) {
    for (const { spec, line } of importsOf(fs.readFileSync(from, 'utf8'))) {
      const to = resolve(from, spec, known);
      if (to) imports.push({ from, to, line, spec });
    }
  }
  return { files, imports };
}

/** Strongly connected components with more than one node (or a self-loop), by Tarjan's algorithm. */
function cycles<T>(nodes: Iterable<T>, edges: Map<T, Set<T>>): T[][] {
  const index = new Map<T, number>();
  const low = new Map<T, number>();
  const stack: T[] = [];
  const onStack = new Set<T>();
  const out: T[][] = [];
  let next = 0;
  const visit = (v: T) => {
    index.set(v, next);
    low.set(v, next);
    next++;
    stack.push(v);
    onStack.add(v);
    for (const w of edges.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v) as number, low.get(w) as number));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v) as number, index.get(w) as number));
    }
    if (low.get(v) === index.get(v)) {
      const scc: T[] = [];
      let w: T;
      do {
        w = stack.pop() as T;
        onStack.delete(w);
        scc.push(w);
      } while (w !== v);
      if (scc.length > 1 || edges.get(v)?.has(v)) out.push(scc);
    }
  };
  for (const v of nodes) if (!index.has(v)) visit(v);
  return out;
}

/** One cycle through `start` inside `scc`, as a path that ends where it began. */
function cycleThrough<T>(start: T, scc: Set<T>, edges: Map<T, Set<T>>): T[] {
  // Breadth-first from start's successors back to start: the shortest cycle through it.
  const prev = new Map<T, T>();
  const queue: T[] = [start];
  while (queue.length > 0) {
    const v = queue.shift() as T;
    for (const w of edges.get(v) ?? []) {
      if (!scc.has(w)) continue;
      if (w === start) {
        const pathBack: T[] = [start];
        for (let x: T | undefined = v; x !== undefined && x !== start; x = prev.get(x)) pathBack.unshift(x);
        return [start, ...pathBack];
      }
      if (!prev.has(w)) {
        prev.set(w, v);
        queue.push(w);
      }
    }
  }
  return [start, start];
}

function graph<T>(pairs: [T, T][]): Map<T, Set<T>> {
  const g = new Map<T, Set<T>>();
  for (const [a, b] of pairs) {
    if (!g.has(a)) g.set(a, new Set());
    (g.get(a) as Set<T>).add(b);
  }
  return g;
}

const allowed = (i: Import) => ALLOWED.find((a) => a.file === rel(i.from) && a.imports === rel(i.to));
const where = (i: Import) => `${rel(i.from)}:${i.line} imports '${i.spec}' (${rel(i.to)})`;

test('the import scanner sees every kind of relative import', () => {
  const text = [
    "import type { A } from './a';",
    'import {',
    '  B,',
    "} from '../b';",
    "export * from './c';",
    "export { D } from './d';",
    "import './e';",
    "const f = await import('./f');",
    "const g = require('./g');",
    "// import h from './h';",
    "/* export * from './i'; */",
    "import x from 'node:fs';",
  ].join('\n');
  assert.deepEqual(
    importsOf(text).map((i) => `${i.spec}@${i.line}`),
    ['./a@1', '../b@4', './c@5', './d@6', './e@7', './f@8', './g@9'],
  );
});

test('cycles are found and named as paths', () => {
  const g = graph<string>([['a', 'b'], ['b', 'c'], ['c', 'a'], ['c', 'd'], ['d', 'd'], ['e', 'a']]);
  const found = cycles(['a', 'b', 'c', 'd', 'e'], g).map((scc) => cycleThrough([...scc].sort()[0], new Set(scc), g).join(' → '));
  assert.deepEqual(found.sort(), ['a → b → c → a', 'd → d']);
});

test('every folder of src/ has a rank in LAYERS', () => {
  const { files } = sources();
  assert.ok(files.length > 50, `found only ${files.length} source files under ${REPO}`);
  const unranked = [...new Set(files.map(folderOf))].filter((f) => !RANK.has(f));
  assert.deepEqual(unranked, [], `folders without a rank: add each to LAYERS in test/layering.unit.test.ts (${unranked.join(', ')})`);
});

test('imports go only to the same folder or a lower rank', () => {
  const { imports } = sources();
  const wrong: string[] = [];
  const used = new Set<(typeof ALLOWED)[number]>();
  for (const i of imports) {
    const a = folderOf(i.from);
    const b = folderOf(i.to);
    const ra = RANK.get(a);
    const rb = RANK.get(b);
    if (a === b || ra === undefined || rb === undefined || rb <= ra) continue;
    const ok = allowed(i);
    if (ok) {
      used.add(ok);
      continue;
    }
    wrong.push(`${where(i)}: ${a}/ (rank ${ra}) must not import ${b}/ (rank ${rb})`);
  }
  assert.deepEqual(wrong, [], `imports that go upward:\n  ${wrong.join('\n  ')}`);
  const stale = ALLOWED.filter((a) => !used.has(a)).map((a) => `${a.file} → ${a.imports}`);
  assert.deepEqual(stale, [], `allow-list entries that no longer match an upward import (delete them): ${stale.join('; ')}`);
});

test('folders import each other without cycles', () => {
  const { imports } = sources();
  const cross = imports.filter((i) => folderOf(i.from) !== folderOf(i.to) && !allowed(i));
  const edges = graph(cross.map((i): [string, string] => [folderOf(i.from), folderOf(i.to)]));
  const found = cycles([...edges.keys()].sort(), edges).map((scc) => {
    const ring = cycleThrough([...scc].sort()[0], new Set(scc), edges);
    const why = ring.slice(1).map((to, k) => {
      const i = cross.find((x) => folderOf(x.from) === ring[k] && folderOf(x.to) === to) as Import;
      return `${ring[k]} → ${to}: ${where(i)}`;
    });
    return `${ring.join(' → ')}\n    ${why.join('\n    ')}`;
  });
  assert.deepEqual(found, [], `cycles between folders:\n  ${found.join('\n  ')}`);
});

test('files import each other without cycles', () => {
  const { files, imports } = sources();
  const edges = graph(imports.map((i): [string, string] => [i.from, i.to]));
  const found = cycles(files, edges).map((scc) => cycleThrough([...scc].sort()[0], new Set(scc), edges).map(rel).join(' → '));
  assert.deepEqual(found, [], `cycles between files:\n  ${found.join('\n  ')}`);
});
