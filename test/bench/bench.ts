/**
 * `npm run bench`: dedup vs containerd's overlayfs snapshotter, measured in
 * the same run on the same images (see build.ts for the image set).
 *
 * One stack (docker-registry, a private containerd with the dedup proxy
 * plugin, the dedup daemon with its default config; all in a temp dir).
 * For each snapshotter in turn, starting from an empty content store and no
 * snapshots (checked): drop the page cache, pull every image sequentially
 * (wall time, unpack and for dedup the EROFS conversion included), measure
 * the disk the snapshotter uses (overlayfs: then remove the images again).
 * Then cold container starts and a cold sequential read of a 512 MiB file
 * inside a container, both snapshotters interleaved (BENCH_RUNS rounds,
 * median, page cache dropped before each run).
 *
 * Then the lazy-pull part (lazy.ts): three images converted to dedup images,
 * bytes fetched for a second image sharing most chunks with one on the node,
 * and pull-to-first-output of a command reading 10% of the large image.
 *
 * Env: BENCH_CACHE (default /var/cache/dedup-bench) for the image cache and
 * bench-results.json; BENCH_RUNS (default 5) repetitions of timed runs;
 * BENCH_DIFF_SERVICE=1 puts dedup-differ first in the diff service's list
 * (containerd 1.7: ctr's pulls then apply dedup's layers in one pass, the
 * opt-in of docs/configuration.md; 2.x pulls do not use that list).
 * `--build-only` builds (or checks) the image cache and stops.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { atLeast, defaultContainerd, newerErofsUtilsDir, programOf } from '../helpers/containerd-builds';
import { type CmdResult, Stack, readdirOrEmpty } from '../helpers/stack';
import { BIG_FILE_BYTES, BIG_FILE_PATH, type BenchImage, type BuildResult, buildImages } from './build';
import { type LazyResult, lazyPhase } from './lazy';
import { dropCaches, duBytes, filesBytes, fsUsedBytes, holdFreePageReporting, log, machineCpuSeconds, median, mib, nowMs, onCleanup, processCpuSeconds, processPeakRssBytes, runCleanups, runCmd, secs, sh } from './util';

type Snapshotter = 'overlayfs' | 'dedup' | 'erofs';
/**
 * The snapshotters measured: overlayfs and dedup, and containerd's own
 * EROFS snapshotter with its EROFS differ where containerd is 2.x and an
 * mkfs.erofs ≥ 1.7 is at hand (erofs-utils 1.8 from fetch.sh); set in main.
 */
let SNAPSHOTTERS: Snapshotter[] = ['overlayfs', 'dedup'];

/** The bin directory of an mkfs.erofs ≥ 1.7 (fetch.sh's erofs-utils 1.8, or the system's), or null with why. */
function newerErofsUtils(): { bin: string | null; why: string } {
  for (const d of [newerErofsUtilsDir('mkfs.erofs'), '/usr/bin']) {
    if (!d || !fs.existsSync(path.join(d, 'mkfs.erofs'))) continue;
    // `-V` prints "mkfs.erofs (erofs-utils) 1.8.6" from 1.6 on; 1.5 refuses it.
    const r = spawnSync(path.join(d, 'mkfs.erofs'), ['-V'], { encoding: 'utf8' });
    const m = /mkfs\.erofs \(erofs-utils\) (\d+)\.(\d+)/.exec(`${r.stdout}${r.stderr}`);
    if (m && (Number(m[1]) > 1 || Number(m[2]) >= 7)) return { bin: d, why: `mkfs.erofs ${m[1]}.${m[2]} in ${d}` };
  }
  return { bin: null, why: 'no mkfs.erofs 1.7 or newer (run ../shared/tools/debian-newer/fetch.sh)' };
}
const RUNS = Number(process.env.BENCH_RUNS ?? 5);
/** Rounds of pulls (every snapshotter once per round, dedup last): this VM's pull times vary by up to 2x from one minute to the next, so ratios are taken within a round and their median reported. */
const ROUNDS = Math.max(1, Number(process.env.BENCH_PULL_ROUNDS ?? 3));
const START_IMAGE = 'python-b';
const READ_IMAGE = 'bigfile';

interface PhaseResult {
  snapshotter: Snapshotter;
  pullMs: Record<string, number>;
  pullTotalMs: number;
  /** From the first pull's start until every layer is in its final form (dedup: converted to EROFS, old directories gone). */
  settledMs: number;
  diskBytes: number;
  /** The most the snapshotter's directory took while the images were pulled and settled (du every second). */
  peakDiskBytes: number;
  /** Where the daemon's log stood when the phase began (dedup: its conversion lines are the ones after). */
  logsFrom: number;
  /** The same three figures for the OS and app images alone (see osImages), taken before the next pull. */
  osImages: { settledMs: number; diskBytes: number; peakDiskBytes: number } | null;
  /** CPU seconds from the first pull's start until settled: the whole machine's (every process and the kernel) and the dedup daemon's. */
  cpu: { machineS: number; daemonS: number };
  diskBreakdown: Record<string, number>;
  contentStoreBytes: number;
  startTrueMs: number[];
  startPythonMs: number[];
  readMBps: number[];
  readBytes: number;
  afterRemove: Record<string, number>;
}

/** ctr on the stack's containerd, stdin closed. */
function ctr(stack: Stack, args: string[], timeoutMs = 300_000): Promise<CmdResult> {
  return sh(programOf(stack.build, 'ctr'), ['--address', stack.containerdAddress, '-n', 'default', ...args], { timeoutMs });
}

async function snapshotKeys(stack: Stack, s: Snapshotter): Promise<string[]> {
  return lines((await ctr(stack, ['snapshots', '--snapshotter', s, 'ls'])).stdout)
    .slice(1)
    .map((l) => l.split(/\s+/)[0]);
}

function refOf(stack: Stack, name: string): string {
  return `${stack.registry}/bench/${name}:latest`;
}

async function pushAll(stack: Stack, built: BuildResult): Promise<void> {
  const policy = path.join(stack.dir, 'skopeo-policy.json');
  fs.writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }));
  for (const img of built.images) {
    await sh('skopeo', ['copy', '--quiet', '--policy', policy, '--dest-tls-verify=false', `oci:${built.ociDir}:${img.name}`, `docker://${refOf(stack, img.name)}`], {
      timeoutMs: 600_000,
    });
  }
}

function lines(s: string): string[] {
  return s
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
}

/** Removes every image and content blob and waits until neither snapshotter holds a snapshot. */
async function emptyContainerd(stack: Stack): Promise<void> {
  for (const id of lines((await ctr(stack, ['tasks', 'ls', '-q'])).stdout)) {
    await runCmd(programOf(stack.build, 'ctr'), ['--address', stack.containerdAddress, '-n', 'default', 'tasks', 'kill', '-s', 'SIGKILL', id]);
    await runCmd(programOf(stack.build, 'ctr'), ['--address', stack.containerdAddress, '-n', 'default', 'tasks', 'delete', '-f', id]);
  }
  for (const id of lines((await ctr(stack, ['containers', 'ls', '-q'])).stdout)) await ctr(stack, ['containers', 'rm', id]);
  const imgs = lines((await ctr(stack, ['images', 'ls', '-q'])).stdout);
  if (imgs.length > 0) await ctr(stack, ['images', 'rm', '--sync', ...imgs], 600_000);
  const blobs = lines((await ctr(stack, ['content', 'ls', '-q'])).stdout);
  if (blobs.length > 0) await ctr(stack, ['content', 'rm', ...blobs]);
  const deadline = Date.now() + 120_000;
  for (;;) {
    const left: string[] = [];
    for (const s of SNAPSHOTTERS) left.push(...(await snapshotKeys(stack, s)).map((k) => `${s}:${k}`));
    left.push(...lines((await ctr(stack, ['content', 'ls', '-q'])).stdout).map((b) => `content:${b}`));
    if (left.length === 0) return;
    if (Date.now() > deadline) throw new Error(`containerd still holds: ${left.join(' ')}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

function snapshotterDir(stack: Stack, s: Snapshotter): string {
  return s === 'dedup' ? stack.daemonRoot : path.join(stack.containerdRoot, `io.containerd.snapshotter.v1.${s}`);
}

async function diskBreakdown(stack: Stack, s: Snapshotter): Promise<Record<string, number>> {
  const root = snapshotterDir(stack, s);
  const out: Record<string, number> = {};
  for (const e of fs.existsSync(root) ? fs.readdirSync(root) : []) out[e] = await duBytes(path.join(root, e));
  return out;
}

/** Number of distinct layer chains (= snapshots containerd commits) in `images`. */
function distinctLayers(images: readonly BenchImage[]): number {
  const chains = new Set<string>();
  for (const img of images) img.layers.forEach((_, i) => chains.add(img.layers.slice(0, i + 1).join('/')));
  return chains.size;
}

/**
 * The OS and app images (every image without the big random layer): the
 * five Debian-based images issue 16's targets were set on. They come first
 * in the pull order, so their figures are taken before bigfile's pull.
 */
function osImages(built: BuildResult): BenchImage[] {
  const os = built.images.filter((i) => !i.layers.includes('big'));
  if (built.images.slice(0, os.length).some((i, n) => i !== os[n])) throw new Error('the OS and app images must come first in the pull order');
  return os;
}

/** The daemon's log ops of a layer made into an image: directory conversion, the differ's Apply, the registry fetch. */
const CONVERSION_OPS = ['convert', 'apply', 'fetch'];

/**
 * Waits until the daemon logged `n` successful conversions, has no conversion
 * in progress (ROOT/tmp empty) and keeps no plain snapshot directory (no
 * container runs, so every snapshot is a committed layer).
 */
async function waitConverted(stack: Stack, n: number, logsFrom: number): Promise<void> {
  const deadline = Date.now() + 1_800_000;
  for (let round = 0; ; round++) {
    // The directories first (two readdirs): the log is parsed once they are gone (and every 200 ms, for a
    // failed conversion), so the poll can be frequent without taking CPU from the pull (overlayfs's pull
    // ends when ctr returns: a coarse poll would add its half-period to dedup's figure).
    const tmp = readdirOrEmpty(path.join(stack.daemonRoot, 'tmp'));
    const dirs = readdirOrEmpty(path.join(stack.daemonRoot, 'snapshots'));
    const timedOut = Date.now() > deadline;
    if ((tmp.length === 0 && dirs.length === 0) || round % 8 === 0 || timedOut) {
      const logs = stack.daemon.logs().slice(logsFrom);
      const failed = logs.filter((l) => CONVERSION_OPS.includes(l.op as string) && typeof l.level === 'number' && l.level >= 50);
      if (failed.length > 0) throw new Error(`layer conversion failed: ${JSON.stringify(failed)}`);
      const done = logs.filter((l) => CONVERSION_OPS.includes(l.op as string) && typeof l.logical_bytes === 'number').length;
      if (done >= n && tmp.length === 0 && dirs.length === 0) return;
      if (timedOut) throw new Error(`layers not settled: ${done}/${n} converted, tmp: ${tmp.join(' ')}, snapshots: ${dirs.join(' ')}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Runs a container once after dropping the page cache; returns wall ms and its output. */
async function coldRun(stack: Stack, s: Snapshotter, image: string, id: string, args: string[]): Promise<{ ms: number; stdout: string }> {
  await dropCaches();
  const t = nowMs();
  const r = await ctr(stack, ['run', '--rm', `--snapshotter=${s}`, refOf(stack, image), id, ...args]);
  return { ms: nowMs() - t, stdout: r.stdout };
}

async function phase(stack: Stack, built: BuildResult, s: Snapshotter): Promise<PhaseResult> {
  log(`=== ${s}: emptying containerd's content store and snapshots`);
  await emptyContainerd(stack);
  if (s === 'dedup') {
    // containerd removed the last round's layers; the daemon gives their space back a moment later.
    await waitForEmptyRoot(stack);
  }
  const logsFrom = stack.daemon.logs().length;
  await dropCaches();
  const pullMs: Record<string, number> = {};
  // Peak disk, the same sampler for every snapshotter: every 100 ms, the snapshotter's
  // storage at the start plus what the filesystem gained since, less what containerd's
  // content store gained (the same blobs for all). statfs is exact at once (ext4 counts
  // delayed allocations and frees immediately) and costs a system call, where a `du` of
  // overlayfs's growing trees took ~0.3 s and once a second missed a short-lived peak
  // (dedup's layer directory beside its new chunks while it converts).
  const contentDir = path.join(stack.containerdRoot, 'io.containerd.content.v1.content');
  const storageAtStart = await duBytes(snapshotterDir(stack, s));
  const fsAtStart = fsUsedBytes(snapshotterDir(stack, s));
  const contentAtStart = filesBytes(contentDir);
  let peakDiskBytes = storageAtStart;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      const grown = fsUsedBytes(snapshotterDir(stack, s)) - fsAtStart - (filesBytes(contentDir) - contentAtStart);
      peakDiskBytes = Math.max(peakDiskBytes, storageAtStart + grown);
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  const first = osImages(built);
  let osFigures: PhaseResult['osImages'] = null;
  const daemonPid = stack.daemon.proc.pid;
  const cpuStart = { machineS: machineCpuSeconds(), daemonS: processCpuSeconds(daemonPid) };
  const pullStart = nowMs();
  for (const img of built.images) {
    const t = nowMs();
    await ctr(stack, ['images', 'pull', '--plain-http', `--snapshotter=${s}`, refOf(stack, img.name)], 1_800_000);
    pullMs[img.name] = nowMs() - t;
    log(`${s}: pulled ${img.name} in ${secs(pullMs[img.name])}`);
    if (img === first.at(-1)) {
      // The OS and app images settled (dedup: their layers converted, directories gone) before the next pull starts.
      if (s === 'dedup') await waitConverted(stack, distinctLayers(first), logsFrom);
      const settled = nowMs() - pullStart;
      const disk = await duBytes(snapshotterDir(stack, s));
      osFigures = { settledMs: settled, diskBytes: disk, peakDiskBytes: Math.max(peakDiskBytes, disk) };
      log(`${s}: the ${first.length} OS and app images settled ${secs(settled)} after the first pull started, disk ${mib(disk)}`);
    }
  }
  const pullTotalMs = Object.values(pullMs).reduce((a, b) => a + b, 0);
  if (s === 'dedup') {
    // The daemon may convert in the background after Commit returned: wait
    // until every layer is converted and its directory is gone, so that disk
    // and the timed runs see the final state (and no conversion competes with them).
    await waitConverted(stack, distinctLayers(built.images), logsFrom);
  }
  const settledMs = nowMs() - pullStart;
  const cpu = { machineS: machineCpuSeconds() - cpuStart.machineS, daemonS: processCpuSeconds(daemonPid) - cpuStart.daemonS };
  sampling = false;
  await sampler;
  log(
    `${s}: settled ${secs(settledMs)} after the first pull started; CPU meanwhile: machine ${cpu.machineS.toFixed(2)} s, dedup daemon ${cpu.daemonS.toFixed(2)} s` +
      (s === 'dedup' ? `; the daemon's peak resident memory so far ${mib(processPeakRssBytes(daemonPid))}` : ''),
  );
  await sh('sync', []);
  const diskBytes = await duBytes(snapshotterDir(stack, s));
  peakDiskBytes = Math.max(peakDiskBytes, diskBytes);
  const breakdown = await diskBreakdown(stack, s);
  const contentStoreBytes = await duBytes(path.join(stack.containerdRoot, 'io.containerd.content.v1.content'));
  log(`${s}: pull ${secs(pullTotalMs)}, disk ${mib(diskBytes)} ${JSON.stringify(breakdown)}`);

  const result: PhaseResult = {
    snapshotter: s,
    pullMs,
    pullTotalMs,
    settledMs,
    diskBytes,
    peakDiskBytes,
    logsFrom,
    osImages: osFigures,
    cpu,
    diskBreakdown: breakdown,
    contentStoreBytes,
    startTrueMs: [],
    startPythonMs: [],
    readMBps: [],
    readBytes: 0,
    afterRemove: {},
  };
  if (s !== 'dedup') {
    // The next pull needs an empty content store: remove the images again.
    await removeAndMeasure(stack, result);
  }
  return result;
}

async function waitForEmptyRoot(stack: Stack): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const st = stack.daemonStorage();
    if (st.storeBytes === 0 && st.images.length === 0) return;
    if (Date.now() > deadline) throw new Error(`dedup ROOT is not empty before the pull: ${JSON.stringify(st)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function removeAndMeasure(stack: Stack, r: PhaseResult): Promise<void> {
  log(`${r.snapshotter}: removing the images`);
  await emptyContainerd(stack);
  await sh('sync', []);
  r.afterRemove.diskBytes = await duBytes(snapshotterDir(stack, r.snapshotter));
  if (r.snapshotter === 'dedup') r.afterRemove.chunkStoreBytes = stack.daemonStorage().storeBytes;
}

/**
 * Cold starts and cold reads, both snapshotters interleaved (order
 * alternating per round) so that a change of background load on the host
 * hits both alike. The images are unpacked for both snapshotters by then.
 */
async function timedRuns(stack: Stack, res: Record<'overlayfs' | 'dedup', PhaseResult>): Promise<void> {
  for (let i = 0; i < RUNS; i++) {
    const order: ('overlayfs' | 'dedup')[] = i % 2 === 0 ? ['overlayfs', 'dedup'] : ['dedup', 'overlayfs'];
    for (const s of order) {
      const r = res[s];
      r.startTrueMs.push((await coldRun(stack, s, START_IMAGE, `bench-${s}-true-${i}`, ['/bin/true'])).ms);
      const py = await coldRun(stack, s, START_IMAGE, `bench-${s}-py-${i}`, ['python3', '-c', 'import json, email.parser, http.client; print("ok")']);
      if (py.stdout.trim() !== 'ok') throw new Error(`python3 in ${START_IMAGE} printed ${JSON.stringify(py.stdout)}`);
      r.startPythonMs.push(py.ms);
      const rd = await coldRun(stack, s, READ_IMAGE, `bench-${s}-read-${i}`, ['/bin/sh', '-c', `dd if=${BIG_FILE_PATH} of=/dev/null bs=1M 2>&1`]);
      const m = /(\d+) bytes .* copied, ([\d.]+(?:e[-+]?\d+)?) s/.exec(rd.stdout);
      if (!m) throw new Error(`unexpected dd output: ${rd.stdout}`);
      r.readBytes = Number(m[1]);
      if (r.readBytes !== BIG_FILE_BYTES) throw new Error(`dd read ${r.readBytes} bytes of ${BIG_FILE_PATH}, expected ${BIG_FILE_BYTES}`);
      r.readMBps.push(r.readBytes / 1e6 / Number(m[2]));
      log(`${s} run ${i + 1}/${RUNS}: start /bin/true ${secs(r.startTrueMs[i])}, python3 ${secs(r.startPythonMs[i])}, read ${r.readMBps[i].toFixed(0)} MB/s`);
    }
  }
}

/** Unique file data across all distinct layers (whole-file SHA-256), and their logical file bytes. */
function floorOf(built: BuildResult, exclude: Set<string> = new Set()): { floorBytes: number; logicalBytes: number; uniqueFiles: number; definition: string } {
  const used = new Set(built.images.flatMap((i) => i.layers));
  const seen = new Map<string, number>();
  let logicalBytes = 0;
  for (const name of used) {
    if (exclude.has(name)) continue;
    const l = built.layers[name];
    logicalBytes += l.logicalBytes;
    for (const [h, size] of Object.entries(l.contents)) seen.set(h, size);
  }
  let floorBytes = 0;
  for (const size of seen.values()) floorBytes += size;
  return {
    floorBytes,
    logicalBytes,
    uniqueFiles: seen.size,
    definition:
      'sum of the sizes of distinct regular-file contents (SHA-256 of the whole file) over every distinct layer of every image; file data only, no metadata, no block rounding',
  };
}

function sha256hex(s: string): string {
  return crypto.createHash('sha256').update(s).digest('hex');
}

/** The daemon's convert lines matched to the bench's layer names by chain ID (the committed snapshot's name ends with it). */
function perLayerStats(built: BuildResult, converts: Record<string, unknown>[]): { layer: string; chainId: string; logicalBytes: number; storedBytes: number; chunks: number; dedupChunks: number }[] {
  const byChain = new Map<string, string>();
  for (const img of built.images) {
    let chain = '';
    for (const name of img.layers) {
      const diff = built.layers[name].diffId;
      chain = chain === '' ? diff : `sha256:${sha256hex(`${chain} ${diff}`)}`;
      byChain.set(chain, name);
    }
  }
  return converts.map((c) => {
    const key = String(c.key ?? '');
    const hit = [...byChain].find(([chain]) => key.endsWith(chain));
    return {
      layer: hit?.[1] ?? `? (${key})`,
      chainId: hit?.[0] ?? '',
      logicalBytes: Number(c.logical_bytes),
      storedBytes: Number(c.stored_bytes),
      chunks: Number(c.chunks ?? 0),
      dedupChunks: Number(c.dedup_chunks ?? 0),
    };
  });
}

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}
function lpad(s: string, n: number): string {
  return s.length >= n ? s : ' '.repeat(n - s.length) + s;
}

const x = (r: number) => `${r.toFixed(2)}×`;
const ratio = (a: number, b: number) => (b > 0 ? a / b : NaN);

function lazyLine(lazy: LazyResult): string {
  return `lazy pull (dedup-snapshotter convert, then pull; on-demand backend ${lazy.backend}): python-b after python-a (each read whole) fetched ${mib(lazy.second.fetchedBytes)} = ${x(lazy.second.ratio)} its new chunks (${mib(lazy.second.newChunkBytes)}) + metadata (${mib(lazy.second.metadataBytes)}) [target ≤ 1×]; pull-to-first-output reading ${mib(lazy.firstOutput.readBytes)} of ${BIG_FILE_PATH}: overlayfs ${secs(lazy.firstOutput.overlayfsMs)}, dedup ${secs(lazy.firstOutput.dedupMs)} = ${x(lazy.firstOutput.ratio)} [target ≤ 0.25×] (${mib(lazy.firstOutput.dedupFetchedBytes)} fetched); convert ${Object.entries(lazy.convertMs).map(([k, v]) => `${k} ${secs(v)}`).join(', ')}`;
}

/**
 * Where dedup's conversion time went, from the daemon's log: per path
 * (apply: dedup-differ from the tar; convert: from the unpacked
 * directory), the summed time reading, hashing and storing the files and
 * the time placing chunks and writing images, against the wall time of
 * each layer's conversion.
 */
/** containerd's EROFS snapshotter's pull figures against overlayfs's, or why it was not measured. */
/** The OS and app images' figures (issue 16's set): dedup's and containerd's EROFS snapshotter's ratios to overlayfs. */
function osImagesLine(built: BuildResult, phases: Partial<Record<Snapshotter, PhaseResult>>): string {
  const o = phases.overlayfs?.osImages;
  const of = (s: Snapshotter) => {
    const p = phases[s]?.osImages;
    return p && o ? `${s} until settled ${secs(p.settledMs)} = ${x(ratio(p.settledMs, o.settledMs))}, disk ${x(ratio(p.diskBytes, o.diskBytes))}, peak ${x(ratio(p.peakDiskBytes, o.peakDiskBytes))}` : null;
  };
  const parts = (['dedup', 'erofs'] as Snapshotter[]).map(of).filter((p) => p !== null);
  return `the ${osImages(built).length} OS and app images alone (without bigfile; pulled first): overlayfs until settled ${o ? secs(o.settledMs) : '?'}; ${parts.join('; ')}`;
}

/** Each round's "until settled" ratios to overlayfs (all images; the OS and app images) and their medians. */
function roundRatios(rounds: Partial<Record<Snapshotter, PhaseResult>>[], s: Snapshotter): { all: number[]; os: number[] } {
  const all: number[] = [];
  const os: number[] = [];
  for (const r of rounds) {
    const o = r.overlayfs;
    const p = r[s];
    if (!o || !p) continue;
    all.push(ratio(p.settledMs, o.settledMs));
    if (p.osImages && o.osImages) os.push(ratio(p.osImages.settledMs, o.osImages.settledMs));
  }
  return { all, os };
}

function roundsLine(rounds: Partial<Record<Snapshotter, PhaseResult>>[]): string {
  const parts = (['dedup', 'erofs'] as Snapshotter[])
    .filter((s) => rounds.some((r) => r[s]))
    .map((s) => {
      const { all, os } = roundRatios(rounds, s);
      return `${s} ${all.map(x).join(', ')} (median ${x(median(all))}); OS and app images ${os.map(x).join(', ')} (median ${x(median(os))})`;
    });
  return `until settled, ratio to overlayfs per round (${rounds.length} round${rounds.length === 1 ? '' : 's'}): ${parts.join('; ')}\n${cpuLine(rounds)}`;
}

/** Each round's machine CPU seconds for the pulls (all images, until settled) as ratios to overlayfs, with the daemon's share: less noisy than wall time here. */
function cpuLine(rounds: Partial<Record<Snapshotter, PhaseResult>>[]): string {
  const parts = (['dedup', 'erofs'] as Snapshotter[])
    .filter((s) => rounds.some((r) => r[s]))
    .map((s) => {
      const rs = rounds.filter((r) => r.overlayfs && r[s]).map((r) => ({ o: r.overlayfs as PhaseResult, p: r[s] as PhaseResult }));
      const ratios = rs.map(({ o, p }) => ratio(p.cpu.machineS, o.cpu.machineS));
      const own = s === 'dedup' ? `, the daemon's share ${rs.map(({ p }) => `${p.cpu.daemonS.toFixed(1)} s`).join(', ')}` : '';
      return `${s} ${ratios.map(x).join(', ')} (median ${x(median(ratios))}${own})`;
    });
  const o = rounds.map((r) => r.overlayfs?.cpu.machineS).filter((c): c is number => c !== undefined);
  return `machine CPU for the pulls until settled, ratio to overlayfs per round (overlayfs ${o.map((c) => `${c.toFixed(1)} s`).join(', ')}): ${parts.join('; ')}`;
}

function erofsLine(e: PhaseResult | undefined, o: PhaseResult): string {
  if (!e) return "containerd's EROFS snapshotter: not measured (see the log's SKIP line)";
  return `containerd's EROFS snapshotter (erofs differ): pull until settled ${secs(e.settledMs)} = ${x(ratio(e.settledMs, o.settledMs))} of overlayfs; disk ${mib(e.diskBytes)} = ${x(ratio(e.diskBytes, o.diskBytes))}; peak ${x(ratio(e.peakDiskBytes, o.peakDiskBytes))}`;
}

function whereTimeGoes(stack: Stack, logsFrom: number): string {
  const parts: string[] = [];
  for (const op of CONVERSION_OPS) {
    const ls = stack.daemon.logs().slice(logsFrom).filter((l) => l.op === op && typeof l.logical_bytes === 'number');
    if (ls.length === 0) continue;
    const sum = (k: string) => ls.reduce((a, l) => a + (typeof l[k] === 'number' ? (l[k] as number) : 0), 0);
    const read = sum(op === 'apply' ? 'read_ms' : op === 'fetch' ? 'fetch_ms' : 'mkfs_ms');
    parts.push(`${op}: ${ls.length} layers, ${secs(sum('duration_ms'))} in all: ${op === 'fetch' ? 'fetching/' : ''}reading/hashing/storing files ${secs(read)}, placing chunks and writing images ${secs(sum('import_ms'))}`);
  }
  return `dedup conversion time (summed over layers): ${parts.join('; ') || 'none logged'}`;
}

async function main(): Promise<void> {
  const t0 = Date.now();
  if (process.getuid?.() !== 0) throw new Error('the benchmark needs root (mounts, containerd, drop_caches)');
  const built = await buildImages();
  if (process.argv.includes('--build-only')) return;
  const floor = floorOf(built);

  log('starting registry, containerd and the dedup daemon (containerd: DEDUP_CONTAINERD=1.6|1.7|2 picks the build; default the one in PATH)');
  // BENCH_STORE_LAYOUT=segments|single: the daemon's integrity.store_layout (default: its own default, "auto").
  const layout = process.env.BENCH_STORE_LAYOUT;
  const build = defaultContainerd();
  const erofsUtils = build.major >= 2 ? newerErofsUtils() : { bin: null, why: `containerd ${build.version} has no EROFS snapshotter (2.x has)` };
  if (erofsUtils.bin) SNAPSHOTTERS = ['overlayfs', 'erofs', 'dedup'];
  log(`containerd's EROFS snapshotter: ${erofsUtils.bin ? `measured too (${erofsUtils.why})` : `SKIP: ${erofsUtils.why}`}`);
  const diffService = process.env.BENCH_DIFF_SERVICE === '1';
  if (diffService && !atLeast(build, 1, 7)) throw new Error(`BENCH_DIFF_SERVICE=1: containerd ${build.version} has no proxy differs (1.7 and later have)`);
  if (diffService) log('the diff service asks dedup-differ first (BENCH_DIFF_SERVICE=1)');
  const stack = await Stack.start({
    ...(diffService ? { diffServiceDefault: ['dedup-differ', 'walking'] } : {}),
    daemonEnv: { LOG_LEVEL: 'info' },
    // containerd's own lines at debug (DEDUP_BENCH_CONTAINERD_LOG=file): its walking differ logs each layer's unpack time.
    ...(process.env.DEDUP_BENCH_CONTAINERD_LOG ? { containerdLogLevel: 'debug' as const } : {}),
    daemonConfig: layout ? { integrity: { store_layout: layout } } : undefined,
    ...(erofsUtils.bin ? { erofsSnapshotter: true, containerdEnv: { PATH: `${erofsUtils.bin}:${process.env.PATH}` } } : {}),
  });
  onCleanup('stop the stack', () => stack.stop());
  const memoryNote = holdFreePageReporting();
  log(memoryNote);
  log(`pushing ${built.images.length} images to ${stack.registry}`);
  await pushAll(stack, built);
  if (process.argv.includes('--lazy-only')) {
    // Only the lazy-pull figures (for working on on-demand loading).
    const lazy = await lazyPhase(stack, { refOf: (name) => refOf(stack, name), emptyContainerd: () => emptyContainerd(stack), ctr: (args, timeoutMs) => ctr(stack, args, timeoutMs) });
    process.stdout.write(`\n${lazyLine(lazy)}\n`);
    return;
  }

  const rounds: Partial<Record<Snapshotter, PhaseResult>>[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    log(`=== pull round ${r + 1}/${ROUNDS}`);
    const round: Partial<Record<Snapshotter, PhaseResult>> = {};
    for (const s of SNAPSHOTTERS) round[s] = await phase(stack, built, s);
    rounds.push(round);
    log(roundsLine(rounds));
  }
  // The last round's pulls are the ones in place (dedup's images stay for the timed runs).
  const phases = rounds[rounds.length - 1];
  const timeLine = whereTimeGoes(stack, (phases.dedup as PhaseResult).logsFrom);
  log(timeLine);
  // The daemon's log lines, for a closer look at where time goes (DEDUP_BENCH_DAEMON_LOG=file).
  if (process.env.DEDUP_BENCH_DAEMON_LOG) fs.writeFileSync(process.env.DEDUP_BENCH_DAEMON_LOG, stack.daemon.logs().map((l) => JSON.stringify(l)).join('\n'));
  if (process.env.DEDUP_BENCH_CONTAINERD_LOG) fs.writeFileSync(process.env.DEDUP_BENCH_CONTAINERD_LOG, stack.containerdLog());
  if (process.argv.includes('--pull-only')) {
    // Only the pull figures (for working on conversion).
    const po = phases.overlayfs as PhaseResult;
    const pd = phases.dedup as PhaseResult;
    process.stdout.write(`\npull until settled: overlayfs ${secs(po.settledMs)}, dedup ${secs(pd.settledMs)} = ${x(ratio(pd.settledMs, po.settledMs))}; disk ${x(ratio(pd.diskBytes, po.diskBytes))}, peak ${x(ratio(pd.peakDiskBytes, po.peakDiskBytes))}\n${erofsLine(phases.erofs, po)}\n${osImagesLine(built, phases)}\n${roundsLine(rounds)}\n${timeLine}\n`);
    return;
  }
  const o = phases.overlayfs as PhaseResult;
  const d = phases.dedup as PhaseResult;
  // Dedup's images are in place; unpack the two timed images for overlayfs again (a pull from the local content store; not timed; ctr 1.6 has no "images unpack").
  for (const img of [START_IMAGE, READ_IMAGE]) await ctr(stack, ['images', 'pull', '--plain-http', '--snapshotter=overlayfs', refOf(stack, img)], 600_000);
  await timedRuns(stack, { overlayfs: o, dedup: d });
  await removeAndMeasure(stack, d);
  const lazy = await lazyPhase(stack, {
    refOf: (name) => refOf(stack, name),
    emptyContainerd: () => emptyContainerd(stack),
    ctr: (args, timeoutMs) => ctr(stack, args, timeoutMs),
  });

  const converts = stack.daemon.logs().slice(d.logsFrom).filter((l) => CONVERSION_OPS.includes(l.op as string) && typeof l.logical_bytes === 'number');
  const logicalBytes = converts.reduce((a, l) => a + (l.logical_bytes as number), 0);
  const storedBytes = converts.reduce((a, l) => a + (l.stored_bytes as number), 0);
  const imageBytes = converts.reduce((a, l) => a + ((l.image_bytes as number) ?? 0), 0);
  const chunkStoreBytes = d.diskBreakdown.store ?? 0;
  const perLayer = perLayerStats(built, converts);
  const withoutBig = perLayer.filter((l) => l.layer !== 'big');
  const nb = {
    logicalBytes: withoutBig.reduce((a, l) => a + l.logicalBytes, 0),
    storedBytes: withoutBig.reduce((a, l) => a + l.storedBytes, 0),
    floorBytes: floorOf(built, new Set(['big'])).floorBytes,
  };
  const errors = stack.daemon.logs().filter((l) => typeof l.level === 'number' && l.level >= 50);
  const mountLogs = stack.daemon.logs().filter((l) => l.op === 'mount');
  const mountIo = {
    backend: mountLogs.find((l) => typeof l.backend === 'string')?.backend ?? null,
    directIo: mountLogs.find((l) => typeof l.direct_io === 'boolean')?.direct_io ?? null,
    readAheadKb: mountLogs.find((l) => typeof l.read_ahead_kb === 'number')?.read_ahead_kb ?? null,
  };
  await runCleanups();

  const result = {
    date: new Date().toISOString(),
    host: { kernel: os.release(), cpus: os.cpus().length, memBytes: os.totalmem(), node: process.version },
    build: { version: built.version, cache: built.dir, mirror: built.mirror, images: built.images.map((i) => ({ name: i.name, layers: i.layers })) },
    runs: RUNS,
    memory: memoryNote,
    dedupMounts: mountIo,
    overlayfs: o,
    dedup: d,
    medians: {
      startTrueMs: { overlayfs: median(o.startTrueMs), dedup: median(d.startTrueMs) },
      startPythonMs: { overlayfs: median(o.startPythonMs), dedup: median(d.startPythonMs) },
      readMBps: { overlayfs: median(o.readMBps), dedup: median(d.readMBps) },
    },
    ratios: {
      disk: ratio(d.diskBytes, o.diskBytes),
      peakDisk: ratio(d.peakDiskBytes, o.peakDiskBytes),
      pullTime: ratio(d.pullTotalMs, o.pullTotalMs),
      settled: ratio(d.settledMs, o.settledMs),
      startTrue: ratio(median(d.startTrueMs), median(o.startTrueMs)),
      startPython: ratio(median(d.startPythonMs), median(o.startPythonMs)),
      readThroughput: ratio(median(d.readMBps), median(o.readMBps)),
    },
    /** "Until settled" ratios of every round (the table's figures are the last round's). */
    settledByRound: { dedup: roundRatios(rounds, 'dedup'), erofs: roundRatios(rounds, 'erofs') },
    dedup_stats: {
      convertedLayers: converts.length,
      logicalBytes,
      storedBytes,
      imageBytes,
      chunkStoreAllocatedBytes: chunkStoreBytes,
      dedupRatio: ratio(logicalBytes, storedBytes),
      daemonErrors: errors.length,
      perLayer,
      withoutBigLayer: { ...nb, dedupRatio: ratio(nb.logicalBytes, nb.storedBytes), storedOverFloor: ratio(nb.storedBytes, nb.floorBytes) },
    },
    floor: {
      ...floor,
      chunkStoreOverFloor: ratio(chunkStoreBytes, floor.floorBytes),
      dedupDiskOverFloor: ratio(d.diskBytes, floor.floorBytes),
      overlayfsDiskOverFloor: ratio(o.diskBytes, floor.floorBytes),
    },
    lazy,
    containerd: stack.build.version,
    erofsSnapshotter: phases.erofs ? { settledMs: phases.erofs.settledMs, diskBytes: phases.erofs.diskBytes, peakDiskBytes: phases.erofs.peakDiskBytes, osImages: phases.erofs.osImages } : null,
    totalSeconds: (Date.now() - t0) / 1000,
  };
  const resultFile = path.join(path.dirname(built.dir), 'bench-results.json');
  fs.writeFileSync(resultFile, `${JSON.stringify(result, null, 2)}\n`);

  const rows: [string, string, string, string][] = [
    ['disk used by the snapshotter', mib(o.diskBytes), mib(d.diskBytes), x(result.ratios.disk)],
    ['peak disk during the pull', mib(o.peakDiskBytes), mib(d.peakDiskBytes), x(result.ratios.peakDisk)],
    [`pull wall time (${built.images.length} images, ctr)`, secs(o.pullTotalMs), secs(d.pullTotalMs), x(result.ratios.pullTime)],
    ['pull until layers settled', secs(o.settledMs), secs(d.settledMs), x(result.ratios.settled)],
    ['cold start, /bin/true', secs(result.medians.startTrueMs.overlayfs), secs(result.medians.startTrueMs.dedup), x(result.ratios.startTrue)],
    ['cold start, python3 imports', secs(result.medians.startPythonMs.overlayfs), secs(result.medians.startPythonMs.dedup), x(result.ratios.startPython)],
    [
      `cold sequential read ${BIG_FILE_BYTES >> 20} MiB`,
      `${result.medians.readMBps.overlayfs.toFixed(0)} MB/s`,
      `${result.medians.readMBps.dedup.toFixed(0)} MB/s`,
      x(result.ratios.readThroughput),
    ],
  ];
  const w = [Math.max(...rows.map((r) => r[0].length), 6), 12, 12, 16];
  const out: string[] = [];
  out.push('');
  out.push(`dedup-snapshotter benchmark — ${result.date}, kernel ${result.host.kernel}, ${result.host.cpus} CPUs; timed runs: median of ${RUNS}, interleaved, page cache dropped before each`);
  out.push(`${memoryNote}; dedup layer mounts: ${mountIo.backend}, direct I/O ${mountIo.directIo}, read-ahead ${mountIo.readAheadKb} KiB`);
  out.push(`images: ${built.images.map((i) => `${i.name} [${i.layers.join(', ')}]`).join('; ')}`);
  out.push('');
  out.push(`${pad('metric', w[0])}  ${lpad('overlayfs', w[1])}  ${lpad('dedup', w[2])}  ${lpad('dedup/overlayfs', w[3])}`);
  out.push(`${'-'.repeat(w[0])}  ${'-'.repeat(w[1])}  ${'-'.repeat(w[2])}  ${'-'.repeat(w[3])}`);
  for (const r of rows) out.push(`${pad(r[0], w[0])}  ${lpad(r[1], w[1])}  ${lpad(r[2], w[2])}  ${lpad(r[3], w[3])}`);
  out.push(erofsLine(phases.erofs, o));
  out.push(osImagesLine(built, phases));
  out.push(roundsLine(rounds));
  out.push(timeLine);
  out.push('');
  out.push(
    `dedup ratio: ${mib(logicalBytes)} of file data in ${converts.length} converted layers / ${mib(storedBytes)} stored in the chunk store = ${x(result.dedup_stats.dedupRatio)} (chunk store allocated: ${mib(chunkStoreBytes)}, EROFS metadata images: ${mib(imageBytes)})`,
  );
  out.push(
    `  without the ${BIG_FILE_BYTES >> 20} MiB layer (OS and app layers only): ${mib(nb.logicalBytes)} / ${mib(nb.storedBytes)} stored = ${x(result.dedup_stats.withoutBigLayer.dedupRatio)}; their floor ${mib(nb.floorBytes)}, stored / floor = ${x(result.dedup_stats.withoutBigLayer.storedOverFloor)}`,
  );
  out.push(`  per layer (logical → stored): ${perLayer.map((l) => `${l.layer} ${mib(l.logicalBytes)} → ${mib(l.storedBytes)}`).join(', ')}`);
  out.push(`theoretical floor (unique file data, whole-file SHA-256 over all distinct layers): ${mib(floor.floorBytes)} in ${floor.uniqueFiles} distinct contents (logical ${mib(floor.logicalBytes)})`);
  out.push(
    `  chunk store / floor = ${x(result.floor.chunkStoreOverFloor)};  dedup disk / floor = ${x(result.floor.dedupDiskOverFloor)};  overlayfs disk / floor = ${x(result.floor.overlayfsDiskOverFloor)}`,
  );
  const runs = (xs: number[], f: (v: number) => string) => xs.map(f).join(' ');
  out.push(
    `runs (in order): /bin/true s: overlayfs ${runs(o.startTrueMs, (v) => (v / 1000).toFixed(2))} | dedup ${runs(d.startTrueMs, (v) => (v / 1000).toFixed(2))};  python3 s: overlayfs ${runs(o.startPythonMs, (v) => (v / 1000).toFixed(2))} | dedup ${runs(d.startPythonMs, (v) => (v / 1000).toFixed(2))};  read MB/s: overlayfs ${runs(o.readMBps, (v) => v.toFixed(0))} | dedup ${runs(d.readMBps, (v) => v.toFixed(0))}`,
  );
  out.push(lazyLine(lazy));
  out.push(`per-image pull (s): ${built.images.map((i) => `${i.name} ${(o.pullMs[i.name] / 1000).toFixed(1)}/${(d.pullMs[i.name] / 1000).toFixed(1)}`).join(', ')}  (overlayfs/dedup)`);
  out.push(`after removing all images: overlayfs dir ${mib(o.afterRemove.diskBytes)}, dedup ROOT ${mib(d.afterRemove.diskBytes)} (chunk store ${mib(d.afterRemove.chunkStoreBytes ?? 0)})`);
  if (errors.length > 0) out.push(`WARNING: the dedup daemon logged ${errors.length} errors`);
  out.push(`containerd ${result.containerd}; results: ${resultFile}; total ${result.totalSeconds.toFixed(0)} s`);
  out.push('');
  process.stdout.write(out.join('\n'));
}

main()
  .catch((err) => {
    process.stderr.write(`bench failed: ${(err as Error).stack ?? err}\n`);
    process.exitCode = 1;
  })
  .finally(() => runCleanups());
