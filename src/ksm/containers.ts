import fs from 'node:fs';
import path from 'node:path';
import { parseMountinfo } from '../mount/mountinfo';

/**
 * Container memory that KSM may merge (`ksm.containers`).
 *
 * KSM merges only memory marked mergeable. containerd's runc shim runs
 * `bin/dedup-runc` instead of runc (runc option `BinaryName`, or
 * `ctr run --runc-binary`); while the flag file exists, that wrapper sets
 * prctl(PR_SET_MEMORY_MERGE, 1) on itself before it execs runc, and runc,
 * `runc init` and the container's processes inherit it (Linux ≥ 6.7 keeps
 * it across execve; 6.4–6.6 only across fork). The daemon keeps the flag
 * file while ksm.enabled and ksm.containers hold and KSM is on, and deletes
 * it at shutdown: containers started then are not marked.
 *
 * This module owns the flag file, the wrapper's "<flag>.error" note (a
 * failed prctl, written once by the wrapper), and the per-container figures
 * read from /proc/<pid>/ksm_stat, grouped by cgroup.
 */

/** Where the wrapper looks for the flag unless DEDUP_KSM_FLAG names another file. */
export const DEFAULT_KSM_FLAG = '/run/dedup-snapshotter/ksm-containers';

/** The flag file the daemon keeps and the wrapper tests: DEDUP_KSM_FLAG or the default. */
export function ksmFlagFile(env: NodeJS.ProcessEnv = process.env): string {
  const f = env.DEDUP_KSM_FLAG;
  if (f === undefined || f === '') return DEFAULT_KSM_FLAG;
  if (!path.isAbsolute(f)) throw new Error(`DEDUP_KSM_FLAG must be an absolute path, got ${JSON.stringify(f)}`);
  return f;
}

/** The wrapper containerd runs as runc: `bin/dedup-runc` of this installation. */
export function wrapperPath(): string {
  // dist/src/ksm/ → package root
  for (const up of ['../../..', '../..']) {
    const p = path.resolve(__dirname, up, 'bin', 'dedup-runc');
    if (fs.existsSync(p)) return p;
  }
  return path.resolve(__dirname, '../../../bin/dedup-runc');
}

/** The marker every copy of the wrapper carries (the doctor tells it from plain runc or another wrapper). */
export const WRAPPER_MARKER = 'dedup-runc: runc for containers whose memory KSM may merge';

/** Writes the flag file (its directory made if missing, mode 0755). Throws with the path named. */
export function writeFlag(file: string, content: string): void {
  try {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
    fs.writeFileSync(file, content);
  } catch (err) {
    throw new Error(`cannot write the KSM container flag ${file}: ${(err as Error).message}`);
  }
}

/** Deletes the flag file; a missing one is fine. Throws with the path named. */
export function removeFlag(file: string): void {
  try {
    fs.rmSync(file, { force: true });
  } catch (err) {
    throw new Error(`cannot delete the KSM container flag ${file}: ${(err as Error).message}`);
  }
}

/** What the wrapper wrote when its prctl failed (first line), or null. */
export function wrapperError(flagFile: string): string | null {
  try {
    const text = fs.readFileSync(`${flagFile}.error`, 'utf8').split('\n')[0].trim();
    // "<unix time> pid <n>: <why>; …"
    return text.replace(/^\d+ /, '') || null;
  } catch {
    return null;
  }
}

/** /proc/<pid>/ksm_stat (Linux ≥ 6.1; ksm_merge_any since 6.8). */
export interface KsmStat {
  rmap_items: number;
  merging_pages: number;
  zero_pages: number;
  process_profit: number;
  /** null: the kernel does not say. */
  merge_any: boolean | null;
}

export function parseKsmStat(text: string): KsmStat {
  const out: KsmStat = { rmap_items: 0, merging_pages: 0, zero_pages: 0, process_profit: 0, merge_any: null };
  for (const line of text.split('\n')) {
    const m = /^ksm_([a-z_]+):?\s+(\S+)$/.exec(line.trim());
    if (!m) continue;
    const [, name, value] = m;
    if (name === 'merge_any') out.merge_any = value === 'yes';
    else if (name === 'rmap_items' || name === 'merging_pages' || name === 'zero_pages' || name === 'process_profit') {
      const n = Number(value);
      if (Number.isFinite(n)) out[name] = n;
    }
  }
  return out;
}

/**
 * A process's cgroup from /proc/<pid>/cgroup: `path` names its container
 * (the cgroup v2 path, "0::/default/c1" → "/default/c1"; on a cgroup v1
 * host, where that is "/", the memory controller's path, else any other
 * that is not "/"); `memoryFiles` are where its memory use may be read,
 * relative to the cgroup mount root, best first: v2 `memory.current` (at
 * the root, or under `unified/` on a hybrid host), then v1
 * `memory/<path>/memory.usage_in_bytes`.
 */
export function parseCgroup(text: string): { path: string; memoryFiles: string[] } | null {
  const entries = text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const [, controllers = '', ...rest] = l.split(':');
      return { controllers: controllers.split(','), path: rest.join(':') };
    });
  if (entries.length === 0) return null;
  const rel = (...parts: string[]) => path.posix.join(...parts).replace(/^\/+/, '');
  const isRoot = (p: string | undefined) => p === undefined || p === '/' || p === '';
  const v2 = entries.find((e) => e.controllers.length === 1 && e.controllers[0] === '')?.path;
  const mem = entries.find((e) => e.controllers.includes('memory'))?.path;
  const memoryFiles: string[] = [];
  if (!isRoot(v2)) memoryFiles.push(rel(v2 as string, 'memory.current'), rel('unified', v2 as string, 'memory.current'));
  if (!isRoot(mem)) memoryFiles.push(rel('memory', mem as string, 'memory.usage_in_bytes'));
  const named = !isRoot(v2) ? v2 : !isRoot(mem) ? mem : entries.find((e) => !isRoot(e.path))?.path;
  return { path: named ?? '/', memoryFiles };
}

/** The first of `files` (relative to `root`) that holds a number: the cgroup's memory use. */
export function readCgroupMemory(root: string, files: string[]): number | null {
  for (const f of files) {
    const n = Number(readOr(path.join(root, f))?.trim());
    if (Number.isFinite(n) && n > 0) return n;
  }
  return null;
}

/**
 * The container's name in its cgroup path: the last component, without the
 * runtimes' decorations (`cri-containerd-<id>.scope`, `docker-<id>.scope`).
 */
export function containerName(cgroup: string): string {
  const last = cgroup.split('/').filter((p) => p !== '').pop() ?? cgroup;
  return last.replace(/^(cri-containerd|containerd|docker|crio|libpod)-/, '').replace(/\.scope$/, '');
}

/** The snapshot id in the upperdir of an overlay mounted at "/" under `snapshotsDir`, or null. */
export function rootSnapshotId(mountinfo: string, snapshotsDir: string): string | null {
  const root = parseMountinfo(mountinfo).filter((m) => m.target === '/').pop();
  if (!root || root.fstype !== 'overlay') return null;
  const upper = root.options.split(',').find((o) => o.startsWith('upperdir='));
  if (!upper) return null;
  const dir = upper.slice('upperdir='.length);
  const prefix = `${snapshotsDir.replace(/\/+$/, '')}/`;
  if (!dir.startsWith(prefix)) return null;
  const m = /^(\d+)\/fs$/.exec(dir.slice(prefix.length));
  return m ? m[1] : null;
}

/** One container (one cgroup) whose processes KSM may merge. */
export interface ContainerKsm {
  /** Name from the cgroup path (`ctr run`'s container id; CRI's container id). */
  container: string;
  cgroup: string;
  /** The container's snapshot key when its root filesystem is a snapshot of this daemon, else null. */
  snapshot: string | null;
  pids: number[];
  rmap_items: number;
  merging_pages: number;
  /** Bytes KSM saves this container's processes, less its own cost (the kernel's ksm_process_profit, summed). */
  profit_bytes: number;
  /** The cgroup's memory use (v2 memory.current, v1 memory.usage_in_bytes), or null where it cannot be read. */
  memory_bytes: number | null;
}

export interface ContainerFigures {
  /** Processes marked mergeable (ksm_merge_any) or with merged pages. */
  processes: number;
  merging_pages: number;
  profit_bytes: number;
  containers: ContainerKsm[];
}

export interface ScanOptions {
  proc?: string;
  cgroupRoot?: string;
  /** ROOT/snapshots: a container whose root is an overlay with its upperdir there uses this daemon. */
  snapshotsDir?: string;
  /** Snapshot id → containerd's key. */
  keyOf?: (id: string) => string | undefined;
  /** At most this many containers are listed (the largest merging first); totals count all. */
  limit?: number;
}

function readOr(file: string): string | null {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return null;
  }
}

/**
 * Every process KSM may merge (ksm_merge_any: yes, or pages merged already),
 * grouped by cgroup. The daemon's own process and processes in the root
 * cgroup are counted in the totals but listed as containers only when their
 * cgroup is not "/".
 */
export function scanContainers(opts: ScanOptions = {}): ContainerFigures {
  const proc = opts.proc ?? '/proc';
  const cgroupRoot = opts.cgroupRoot ?? '/sys/fs/cgroup';
  const groups = new Map<string, ContainerKsm>();
  const out: ContainerFigures = { processes: 0, merging_pages: 0, profit_bytes: 0, containers: [] };
  let names: string[];
  try {
    names = fs.readdirSync(proc);
  } catch {
    return out;
  }
  for (const name of names) {
    if (!/^\d+$/.test(name)) continue;
    const text = readOr(path.join(proc, name, 'ksm_stat'));
    if (text === null) continue;
    const st = parseKsmStat(text);
    if (st.merge_any !== true && st.merging_pages === 0) continue;
    out.processes++;
    out.merging_pages += st.merging_pages;
    out.profit_bytes += st.process_profit;
    const cgroup = parseCgroup(readOr(path.join(proc, name, 'cgroup')) ?? '');
    if (!cgroup || cgroup.path === '/') continue;
    const cg = cgroup.path;
    let g = groups.get(cg);
    if (!g) {
      let snapshot: string | null = null;
      if (opts.snapshotsDir) {
        const id = rootSnapshotId(readOr(path.join(proc, name, 'mountinfo')) ?? '', opts.snapshotsDir);
        if (id !== null) snapshot = opts.keyOf?.(id) ?? `id ${id}`;
      }
      g = { container: containerName(cg), cgroup: cg, snapshot, pids: [], rmap_items: 0, merging_pages: 0, profit_bytes: 0, memory_bytes: readCgroupMemory(cgroupRoot, cgroup.memoryFiles) };
      groups.set(cg, g);
    }
    g.pids.push(Number(name));
    g.rmap_items += st.rmap_items;
    g.merging_pages += st.merging_pages;
    g.profit_bytes += st.process_profit;
  }
  out.containers = [...groups.values()].sort((a, b) => b.merging_pages - a.merging_pages || a.cgroup.localeCompare(b.cgroup)).slice(0, opts.limit ?? 200);
  return out;
}
