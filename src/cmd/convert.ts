import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, loadConfig } from '../config/config';
import { type Platform, convertImage } from '../convert/image-convert';
import { probeMkfs } from '../convert/mkfs';
import { defaultDockerConfigPath } from '../remote/auth';
import { MAX_PREFETCH_PATHS, isPrefetchPath } from '../remote/dedup-image';
import { parseReference } from '../remote/reference';
import { RegistryClient } from '../remote/registry';

const USAGE = `usage: dedup-snapshotter convert [--plain-http] [--platform OS/ARCH[/VARIANT]] [--chunk-size BYTES] [--prefetch-files FILE] SRC DST

Converts the image SRC (OCI or Docker, in a registry) into a dedup image and
pushes it as DST: per layer an EROFS metadata image with its chunk table, and
chunk data blobs a node fetches by HTTP Range, each distinct chunk once.

  --plain-http     reach SRC's and DST's registries over plain HTTP
  --platform       the image of a multi-platform SRC to convert (default: this host's)
  --chunk-size     dedup chunk size in bytes (default: chunk_size from CONFIG)
  --prefetch-files FILE  files a lazy pull loads first, in the background: absolute
                   paths in the image, one per line (# comments); recorded in the
                   layers that hold them (nodes with ondemand.prefetch "list" or "all")

Credentials: docker's config.json ($DOCKER_CONFIG or ~/.docker). mkfs.erofs
and chunk_size come from CONFIG as for the daemon.
`;

/** The paths of a --prefetch-files file: one absolute path per line, blank lines and # comments skipped. */
export function parsePrefetchList(text: string): string[] {
  const out: string[] = [];
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    if (!isPrefetchPath(line)) throw new Error(`line ${i + 1}: ${JSON.stringify(line)} is not an absolute, normalized path of a file in the image`);
    if (!out.includes(line)) out.push(line);
  }
  if (out.length > MAX_PREFETCH_PATHS) throw new Error(`${out.length} paths; at most ${MAX_PREFETCH_PATHS}`);
  return out;
}

function parsePlatform(s: string): Platform | null {
  const [osName, architecture, variant, extra] = s.split('/');
  if (!osName || !architecture || extra !== undefined) return null;
  return { os: osName, architecture, ...(variant ? { variant } : {}) };
}

/**
 * One status line on a terminal (redrawn at most 10 times a second); on
 * anything else a line at each further 25% of a layer, so logs stay short.
 */
class ProgressBar {
  private shown = false;
  private last = 0;
  private lastQuarter = new Map<string, number>();

  constructor(private readonly out: NodeJS.WriteStream) {}

  show(label: string, done: number, total: number): void {
    const pct = total > 0 ? Math.min(100, Math.floor((done / total) * 100)) : 0;
    const mib = (n: number) => (n / 1048576).toFixed(1);
    if (this.out.isTTY) {
      const now = Date.now();
      if (now - this.last < 100 && done < total) return;
      this.last = now;
      const width = 30;
      const fill = Math.round((pct / 100) * width);
      this.out.write(`\r[${'#'.repeat(fill)}${' '.repeat(width - fill)}] ${String(pct).padStart(3)}% ${label} ${mib(done)}/${mib(total)} MiB\x1b[K`);
      this.shown = true;
    } else {
      const quarter = Math.floor(pct / 25);
      if ((this.lastQuarter.get(label) ?? -1) >= quarter) return;
      this.lastQuarter.set(label, quarter);
      this.out.write(`${label} ${pct}% (${mib(done)}/${mib(total)} MiB)\n`);
    }
  }

  clear(): void {
    if (this.shown) this.out.write('\r\x1b[K');
    this.shown = false;
  }
}

export async function runConvert(argv: string[]): Promise<number> {
  const fail = (msg: string, code = 2) => {
    process.stderr.write(`dedup-snapshotter convert: ${msg}\n`);
    return code;
  };
  let plainHttp = false;
  let platform: Platform | undefined;
  let chunkSize: number | undefined;
  let prefetchFiles: string[] | undefined;
  const refs: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--help' || a === '-h') {
      process.stdout.write(USAGE);
      return 0;
    } else if (a === '--plain-http') plainHttp = true;
    else if (a === '--platform') {
      const p = parsePlatform(argv[++i] ?? '');
      if (!p) return fail(`--platform needs OS/ARCH[/VARIANT], e.g. linux/amd64\n${USAGE}`);
      platform = p;
    } else if (a === '--chunk-size') {
      const v = Number(argv[++i]);
      if (!Number.isInteger(v) || v < 4096 || v > 1 << 30 || (v & (v - 1)) !== 0) return fail(`--chunk-size needs a power of two from 4096 to 1073741824\n${USAGE}`);
      chunkSize = v;
    } else if (a === '--prefetch-files') {
      const file = argv[++i];
      if (!file) return fail(`--prefetch-files needs a file\n${USAGE}`);
      try {
        prefetchFiles = parsePrefetchList(await fsp.readFile(file, 'utf8'));
      } catch (err) {
        return fail(`--prefetch-files ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
    } else if (a.startsWith('-')) return fail(`unknown option ${JSON.stringify(a)}\n${USAGE}`);
    else refs.push(a);
  }
  if (refs.length !== 2) return fail(`expected SRC and DST\n${USAGE}`);
  let cfg;
  try {
    cfg = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) return fail(err.message);
    throw err;
  }
  let hosts: string[];
  try {
    hosts = refs.map((r) => parseReference(r).domain);
  } catch (err) {
    return fail((err as Error).message);
  }
  const client = new RegistryClient({ plainHttpHosts: plainHttp ? hosts : [], dockerConfig: defaultDockerConfigPath() });
  const workDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'dedup-convert-'));
  const bar = new ProgressBar(process.stderr);
  const started = Date.now();
  try {
    let probe: ReturnType<typeof probeMkfs> | null = null;
    const r = await convertImage({
      client,
      src: refs[0],
      dst: refs[1],
      platform,
      mkfs: () => (probe ??= probeMkfs(cfg.mkfs_erofs)),
      chunkSize: chunkSize ?? cfg.chunk_size,
      workDir,
      prefetchFiles,
      progress: (line) => {
        bar.clear();
        process.stderr.write(`${line}\n`);
      },
      onBytes: (index, count, done, total) => bar.show(`layer ${index}/${count}: downloading`, done, total),
    });
    bar.clear();
    if (prefetchFiles) {
      const recorded = new Set(r.layers.flatMap((l) => l.prefetch));
      const absent = prefetchFiles.filter((p) => !recorded.has(p));
      process.stderr.write(`prefetch list: ${recorded.size} of ${prefetchFiles.length} files recorded${absent.length > 0 ? `; not regular files of any layer: ${absent.slice(0, 10).join(' ')}${absent.length > 10 ? ' …' : ''}` : ''}\n`);
    }
    const logical = r.layers.reduce((n, l) => n + l.logicalBytes, 0);
    process.stdout.write(
      `${refs[1]}@${r.digest}: ${r.layers.length} layers, ${logical} bytes of file data, ${r.dataBytes} bytes of chunk data, converted from ${r.source} in ${((Date.now() - started) / 1000).toFixed(1)} s\n`,
    );
    return 0;
  } catch (err) {
    return fail((err as Error).message, 1);
  } finally {
    client.close();
    await fsp.rm(workDir, { recursive: true, force: true });
  }
}
