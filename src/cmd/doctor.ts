import { type CheckResult, runChecks } from '../doctor';

export const DOCTOR_USAGE = `usage: dedup-snapshotter doctor [--json] [--containerd-config PATH]

Checks what the snapshotter needs on this machine (kernel, EROFS mounts,
mkfs.erofs, fanotify, fscache, containerd's config, the daemon's socket,
ROOT's permissions and free space) and prints one line per check, with a fix
on every line that is not ok. Run it as root. Environment: ROOT, ADDRESS,
CONFIG, as for the daemon.

  --json                     print the results as a JSON array
  --containerd-config PATH   containerd's config (default /etc/containerd/config.toml)

Exit status: 0 when no check failed, 1 otherwise, 2 for bad arguments.
`;

const LABEL: Record<CheckResult['status'], string> = { ok: 'ok', warn: 'WARN', fail: 'FAIL', skip: 'SKIP' };
const NAME_WIDTH = 14;
const INDENT = ' '.repeat(6 + NAME_WIDTH);

/** `ok    kernel        6.18.44 …` / `FAIL  mkfs.erofs    … — fix: …`; a multi-line fix continues indented. */
export function formatResult(r: CheckResult): string {
  const name = r.name.length >= NAME_WIDTH ? `${r.name} ` : r.name.padEnd(NAME_WIDTH);
  let line = `${LABEL[r.status].padEnd(6)}${name}${r.detail}`;
  if (r.status !== 'ok' && r.fix) {
    const [first, ...rest] = r.fix.split('\n');
    line += ` — fix: ${first}`;
    for (const l of rest) line += `\n${INDENT}${l}`;
  }
  return line;
}

function write(stream: NodeJS.WriteStream, text: string): Promise<void> {
  return new Promise((resolve) => stream.write(text, () => resolve()));
}

interface Args {
  json: boolean;
  containerdConfig?: string;
  help: boolean;
}

function parseArgs(argv: string[]): Args | string {
  const a: Args = { json: false, help: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--json') a.json = true;
    else if (arg === '--help' || arg === '-h') a.help = true;
    else if (arg === '--containerd-config') {
      const v = argv[++i];
      if (v === undefined || v === '') return '--containerd-config needs a path';
      a.containerdConfig = v;
    } else if (arg.startsWith('--containerd-config=')) {
      const v = arg.slice('--containerd-config='.length);
      if (v === '') return '--containerd-config needs a path';
      a.containerdConfig = v;
    } else return `unknown argument ${JSON.stringify(arg)}`;
  }
  return a;
}

/** `dedup-snapshotter doctor [--json] [--containerd-config PATH]`; resolves with the exit code. */
export async function runDoctor(argv: string[]): Promise<number> {
  const args = parseArgs(argv);
  if (typeof args === 'string') {
    await write(process.stderr, `dedup-snapshotter doctor: ${args}\n${DOCTOR_USAGE}`);
    return 2;
  }
  if (args.help) {
    await write(process.stdout, DOCTOR_USAGE);
    return 0;
  }
  const pending: Promise<void>[] = [];
  const results = await runChecks({
    env: process.env,
    containerdConfig: args.containerdConfig,
    onResult: args.json ? undefined : (r) => void pending.push(write(process.stdout, `${formatResult(r)}\n`)),
    onProgress: (line) => void pending.push(write(process.stderr, `${line}\n`)),
  });
  await Promise.all(pending);
  if (args.json) await write(process.stdout, `${JSON.stringify(results, null, 2)}\n`);
  return results.some((r) => r.status === 'fail') ? 1 : 0;
}
