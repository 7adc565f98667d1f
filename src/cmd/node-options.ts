import { execve, keepOpenAcrossExec } from '../../native/exec';

/**
 * V8 options the daemon runs with. A pull keeps many short-lived objects in
 * flight per chunk (buffers' handles, write promises, tar entries):
 * - `--max-semi-space-size=32`: a young generation of 2 × 32 MiB (node 20's
 *   default grows to 2 × 16 MiB), so that they die there instead of being
 *   promoted after two scavenges;
 * - `--initial-old-space-size=128`: the old generation may grow to 128 MiB
 *   before V8 marks it in full; starting from its small default, a pull
 *   ran one full mark every few dozen milliseconds.
 * Measured on a 2-core VM (containerd 2.1 fetch path, six images, the
 * daemon's CPU for the pulls): 8.6–10.2 s with neither, 5.4–7.9 s with the
 * first, 4.5–6.4 s with both; peak resident memory 195 → 227 MiB
 * (docs/benchmarks.md, sixth round).
 */
export const DAEMON_NODE_OPTIONS: readonly string[] = ['--max-semi-space-size=32', '--initial-old-space-size=128'];

/** Set in the environment of the image execve starts, so that it never runs itself again. */
const APPLIED = 'DEDUP_NODE_OPTIONS_APPLIED';

/** How this process was started, for the decision below (process's own values by default; tests pass theirs). */
export interface NodeStart {
  execArgv: readonly string[];
  env: Readonly<Record<string, string | undefined>>;
}

/**
 * The node options to add to this process, or null when there is nothing
 * to do: each option is there already or the operator chose its own value
 * of it (on node's command line or in NODE_OPTIONS), or this is the image
 * that was started with them.
 */
export function missingNodeOptions(start: NodeStart): string[] | null {
  if (start.env[APPLIED] !== undefined) return null;
  const given = [...start.execArgv, ...(start.env.NODE_OPTIONS ?? '').split(/\s+/)];
  const missing = DAEMON_NODE_OPTIONS.filter((o) => !given.some((g) => g.split('=')[0] === o.split('=')[0]));
  return missing.length > 0 ? missing : null;
}

/**
 * Runs the daemon's process again with DAEMON_NODE_OPTIONS when they are
 * missing, whoever started it (systemd's ExecStart, `dedup-snapshotter
 * start`, a shell, the tests): same pid (sd_notify, LISTEN_PID, pid files
 * stay right), environment, arguments and open fds (stdio, and the fds
 * systemd passes: LISTEN_FDS). Call first, before the daemon opens
 * anything. When execve fails the daemon goes on without them and says so
 * on stderr (slower, not wrong).
 */
export function execWithDaemonOptions(): void {
  const missing = missingNodeOptions({ execArgv: process.execArgv, env: process.env });
  if (!missing) {
    delete process.env[APPLIED];
    return;
  }
  try {
    const passed = process.env.LISTEN_PID === String(process.pid) ? Number(process.env.LISTEN_FDS ?? 0) : 0;
    for (let fd = 0; fd < 3 + (Number.isInteger(passed) && passed > 0 ? passed : 0); fd++) keepOpenAcrossExec(fd);
    execve(process.execPath, [process.execPath, ...missing, ...process.execArgv, ...process.argv.slice(1)], { ...process.env, [APPLIED]: '1' });
  } catch (err) {
    process.stderr.write(`dedup-snapshotter: could not run itself again with ${missing.join(' ')} (${(err as Error).message}); going on without\n`);
  }
}
