import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** What the installed mkfs.erofs can do, read from its --help (never assumed from a version). */
export interface MkfsFeatures {
  path: string;
  version: string;
  chunksize: boolean;
  blobdev: boolean;
  preserveMtime: boolean;
  quiet: boolean;
}

export class MkfsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MkfsError';
  }
}

/** Probes `bin` (a name looked up in PATH, or a path). Throws MkfsError naming the fix. */
export async function probeMkfs(bin: string): Promise<MkfsFeatures> {
  let help = '';
  try {
    const r = await run(bin, ['--help'], { timeout: 10_000 });
    help = `${r.stdout}${r.stderr}`;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stdout?: string; stderr?: string };
    if (e.code === 'ENOENT') {
      throw new MkfsError(`${bin} not found (install erofs-utils: apt install erofs-utils)`);
    }
    // Old versions exit non-zero on --help but still print it.
    help = `${e.stdout ?? ''}${e.stderr ?? ''}`;
    if (!help.includes('usage')) throw new MkfsError(`${bin} --help failed: ${e.message}`);
  }
  const version = /mkfs\.erofs\s+(\S+)/.exec(help)?.[1] ?? 'unknown';
  const f: MkfsFeatures = {
    path: bin,
    version,
    chunksize: help.includes('--chunksize'),
    blobdev: help.includes('--blobdev'),
    preserveMtime: help.includes('--preserve-mtime'),
    quiet: help.includes('--quiet'),
  };
  if (!f.chunksize || !f.blobdev) {
    throw new MkfsError(`${bin} ${version} lacks --chunksize/--blobdev (erofs-utils 1.5 or newer is needed)`);
  }
  return f;
}

/**
 * Builds a metadata-only EROFS image of `dir` whose file data goes, in
 * chunks of `chunkSize`, to the separate `blob` file.
 */
export async function buildChunkedImage(
  f: MkfsFeatures,
  opts: { dir: string; image: string; blob: string; chunkSize: number },
): Promise<void> {
  const args = [`--chunksize=${opts.chunkSize}`, `--blobdev=${opts.blob}`];
  if (f.preserveMtime) args.push('--preserve-mtime');
  if (f.quiet) args.push('--quiet');
  args.push(opts.image, opts.dir);
  try {
    await run(f.path, args, { timeout: 3_600_000, maxBuffer: 16 << 20 });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stdout?: string; stderr?: string };
    if (e.code === 'ENOENT') throw new MkfsError(`${f.path} not found (install erofs-utils: apt install erofs-utils)`);
    const out = `${e.stderr ?? ''}${e.stdout ?? ''}`
      .split('\n')
      .filter((l) => l.trim() !== '' && !l.includes('EXPERIMENTAL'))
      .slice(-5)
      .join(' | ');
    throw new MkfsError(`mkfs.erofs failed: ${out || e.message}`);
  }
}
