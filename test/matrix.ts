/**
 * The containerd matrix: the end-to-end files that go through containerd,
 * run again on each newer containerd build found here (1.7 and 2.x, from
 * ../shared/tools/debian-newer/fetch.sh), one `node --test` per version with
 * DEDUP_CONTAINERD naming it. The whole suite has already run on the
 * system's containerd (Debian 12's 1.6) before this.
 *
 * A version whose binaries are missing prints SKIP with the reason. In CI
 * (CI=true, or DEDUP_MATRIX_REQUIRED=1, which .ci/run sets) a missing
 * version is a failure: CI never passes on fewer versions. A version that
 * is the system's ran in the first pass.
 *
 *   node dist/test/matrix.js [FILE ...]   (default: MATRIX_FILES)
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { containerdBuilds } from './helpers/containerd-builds';

/** Which files run on 1.7 and 2.x (README "Tests" and docs/testing.md list the same). */
export const MATRIX_FILES = [
  'containerd-versions', // the guide's commands: lazy ctr pull (2.x), ctr images mount (1.7+), GC
  'e2e', // ctr pull and run of busybox, torture, 40-layer chain; /prefetch; writes; GC
  'differential', // the same trees as containerd's overlayfs
  'erofs-e2e', // dedup across images, restart under a container, parallel pulls, kill -9 mid conversion
  'pull', // dedup-snapshotter pull
  'lazy-cri', // CRI pull of a dedup image; converted layers shared between nodes
  'plain-fetch', // CRI pull of a plain image: layers fetched and converted by the daemon; fallback on 403
  'differ-diff', // dedup-differ's Diff: a snapshot's changes as a layer in containerd's content store
  'crash', // kill -9 of the daemon during a pull
  'integrity', // never other bytes: deleted, truncated, flipped stores
  'diskfull', // a full disk through containerd
  'install', // install.sh finds this containerd, writes its config form; lazy pull of a dedup image; uninstall
];

const VERSIONS = ['1.7', '2'];

function runFiles(version: string, files: string[]): Promise<number> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ['--test', '--test-concurrency=1', '--test-reporter=spec', ...files], {
      stdio: 'inherit',
      env: { ...process.env, DEDUP_CONTAINERD: version },
    });
    p.on('close', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
  });
}

async function main(): Promise<number> {
  const names = process.argv.slice(2).length > 0 ? process.argv.slice(2) : MATRIX_FILES;
  const files = names.map((n) => path.join(__dirname, `${n}.test.js`));
  for (const f of files) {
    if (!fs.existsSync(f)) {
      process.stderr.write(`matrix: no test file ${f}\n`);
      return 2;
    }
  }
  const { builds, missing } = containerdBuilds();
  const lines: string[] = [];
  let failed = 0;
  const required = process.env.CI === 'true' || process.env.DEDUP_MATRIX_REQUIRED === '1';
  let lacking = 0;
  for (const v of VERSIONS) {
    const system = builds.find((x) => x.bin === null);
    if (system && (v === `${system.major}.${system.minor}` || v === String(system.major))) {
      lines.push(`pass containerd ${v}: the system's (${system.version}), run by the first pass`);
      continue;
    }
    const b = builds.find((x) => x.name === v && x.bin !== null);
    if (!b) {
      const why = missing.find((m) => m.name === v)?.reason ?? 'not found';
      lines.push(`${required ? 'FAIL' : 'SKIP'} containerd ${v}: ${why}`);
      lacking++;
      continue;
    }
    process.stdout.write(`\n# matrix: containerd ${b.version} (${b.bin}): ${names.join(', ')}\n`);
    const started = Date.now();
    const code = await runFiles(v, files);
    const secs = Math.round((Date.now() - started) / 1000);
    if (code !== 0) failed++;
    lines.push(`${code === 0 ? 'pass' : 'FAIL'} containerd ${b.version}: ${names.length} files in ${secs} s${code === 0 ? '' : ` (exit ${code})`}`);
  }
  if (lacking > 0 && required) lines.push('FAIL: in CI every version runs (../shared/tools/debian-newer/fetch.sh provides them; .ci/run calls it)');
  process.stdout.write(`\n# containerd matrix\n${lines.map((l) => `# ${l}`).join('\n')}\n`);
  return failed > 0 || (lacking > 0 && required) ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`matrix: ${(err as Error).stack ?? err}\n`);
    process.exit(2);
  },
);
