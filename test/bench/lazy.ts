/**
 * The lazy-pull part of `npm run bench` (issue 5): dedup images made with
 * `dedup-snapshotter convert` and pulled with `dedup-snapshotter pull`
 * (the same path as a CRI pull), against overlayfs pulling the plain image.
 *
 * - Bytes fetched for a second image that shares most chunks with one on the
 *   node, against its new chunks plus its metadata (target: ≤ 1×). Each
 *   image is pulled and then every file of it read in a container, so with
 *   on-demand loading all its chunks are loaded too.
 * - Pull start to first output for a command reading about 10% of a large
 *   image, dedup/overlayfs (target ≤ 0.25×), with the daemon's on-demand
 *   backend (fanotify here; "fetch" fetches every chunk before Prepare returns).
 */
import fs from 'node:fs';
import path from 'node:path';
import { convertImage } from '../../src/convert/image-convert';
import { probeMkfs } from '../../src/convert/mkfs';
import { decodeLayerBlob } from '../../src/remote/dedup-image';
import { RegistryClient } from '../../src/remote/registry';
import { daemonStats } from '../helpers/http';
import type { Stack } from '../helpers/stack';
import { BIG_FILE_BYTES, BIG_FILE_PATH } from './build';
import { dropCaches, log, nowMs, secs, sh } from './util';

const BIN = path.join(__dirname, '..', '..', '..', 'bin', 'dedup-snapshotter');

export interface LazyResult {
  backend: string;
  convertMs: Record<string, number>;
  second: { image: string; after: string; fetchedBytes: number; newChunkBytes: number; metadataBytes: number; ratio: number };
  firstOutput: { readBytes: number; overlayfsMs: number; dedupMs: number; ratio: number; dedupFetchedBytes: number };
}

const stats = async (stack: Stack): Promise<{ remote: { bytes_fetched: number; metadata_bytes: number }; ondemand: { backend: string } }> => daemonStats(stack.daemon.apiAddress);

async function layerChunks(client: RegistryClient, ref: string): Promise<{ chunks: Map<string, number>; metadata: number }> {
  const repo = ref.slice(0, ref.lastIndexOf(':'));
  const idx = (await client.getManifest(ref)).json as { manifests: { digest: string }[] };
  const m = (await client.getManifest(`${repo}@${idx.manifests[0].digest}`)).json as { layers: { digest: string; size: number }[] };
  const chunks = new Map<string, number>();
  let metadata = 0;
  for (const l of m.layers) {
    const { header } = decodeLayerBlob(await client.getBlob(repo, l.digest));
    metadata += l.size;
    for (const [, n, digest] of header.chunks) chunks.set(digest, n * 4096);
  }
  return { chunks, metadata };
}

export async function lazyPhase(
  stack: Stack,
  h: { refOf: (name: string) => string; emptyContainerd: () => Promise<void>; ctr: (args: string[], timeoutMs?: number) => Promise<{ stdout: string }> },
): Promise<LazyResult> {
  const client = new RegistryClient({ plainHttpHosts: [stack.registry] });
  try {
    const mkfs = await probeMkfs('mkfs.erofs');
    const convertMs: Record<string, number> = {};
    const dedupRef = (name: string) => `${stack.registry}/dedup/${name}:v1`;
    for (const name of ['python-a', 'python-b', 'bigfile']) {
      const work = fs.mkdtempSync(path.join(stack.dir, `lazy-convert-${name}-`));
      const t = nowMs();
      await convertImage({ client, src: h.refOf(name), dst: dedupRef(name), mkfs: async () => mkfs, chunkSize: 1 << 20, workDir: work });
      convertMs[name] = nowMs() - t;
      fs.rmSync(work, { recursive: true, force: true });
      log(`lazy: converted ${name} in ${secs(convertMs[name])}`);
    }
    const pull = (ref: string) => sh(process.execPath, [BIN, 'pull', '--plain-http', '--address', stack.containerdAddress, ref], { timeoutMs: 1_800_000, env: { ...process.env, CONFIG: '' } });

    // Every regular file of the image read, so on-demand layers load all their chunks.
    const readAll = (ref: string, name: string) =>
      h.ctr(['run', '--rm', '--snapshotter=dedup', ref, name, '/bin/sh', '-c', 'find / -xdev -type f -print0 | xargs -0 cat > /dev/null; echo read'], 1_800_000);

    // A second image that shares most chunks with one already on the node.
    await h.emptyContainerd();
    await pull(dedupRef('python-a'));
    await readAll(dedupRef('python-a'), 'lazy-read-a');
    const s0 = (await stats(stack)).remote;
    await pull(dedupRef('python-b'));
    await readAll(dedupRef('python-b'), 'lazy-read-b');
    const s1 = (await stats(stack)).remote;
    const fetchedBytes = s1.bytes_fetched - s0.bytes_fetched + (s1.metadata_bytes - s0.metadata_bytes);
    const a = await layerChunks(client, dedupRef('python-a'));
    const b = await layerChunks(client, dedupRef('python-b'));
    let newChunkBytes = 0;
    for (const [d, n] of b.chunks) if (!a.chunks.has(d)) newChunkBytes += n;
    const second = { image: 'python-b', after: 'python-a', fetchedBytes, newChunkBytes, metadataBytes: b.metadata, ratio: fetchedBytes / (newChunkBytes + b.metadata) };
    log(`lazy: python-b after python-a fetched ${fetchedBytes} bytes; its new chunks ${newChunkBytes} + metadata ${b.metadata}`);

    // Pull start to first output, reading ~10% of the large image.
    const readBytes = Math.floor(BIG_FILE_BYTES / 10);
    const cmd = ['/bin/sh', '-c', `head -c ${readBytes} ${BIG_FILE_PATH} | wc -c`];
    await h.emptyContainerd();
    await dropCaches();
    let t = nowMs();
    await h.ctr(['images', 'pull', '--plain-http', '--snapshotter=overlayfs', h.refOf('bigfile')], 1_800_000);
    let out = await h.ctr(['run', '--rm', '--snapshotter=overlayfs', h.refOf('bigfile'), 'lazy-first-o', ...cmd]);
    const overlayfsMs = nowMs() - t;
    if (Number(out.stdout.trim()) !== readBytes) throw new Error(`overlayfs run printed ${out.stdout}`);
    await h.emptyContainerd();
    await dropCaches();
    const f0 = (await stats(stack)).remote.bytes_fetched;
    t = nowMs();
    await pull(dedupRef('bigfile'));
    out = await h.ctr(['run', '--rm', '--snapshotter=dedup', dedupRef('bigfile'), 'lazy-first-d', ...cmd]);
    const dedupMs = nowMs() - t;
    if (Number(out.stdout.trim()) !== readBytes) throw new Error(`dedup run printed ${out.stdout}`);
    const dedupFetchedBytes = (await stats(stack)).remote.bytes_fetched - f0;
    log(`lazy: first output after ${secs(overlayfsMs)} (overlayfs) vs ${secs(dedupMs)} (dedup, ${dedupFetchedBytes} bytes fetched)`);
    await h.emptyContainerd();
    return { backend: (await stats(stack)).ondemand.backend, convertMs, second, firstOutput: { readBytes, overlayfsMs, dedupMs, ratio: dedupMs / overlayfsMs, dedupFetchedBytes } };
  } finally {
    client.close();
  }
}
