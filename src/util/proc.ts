import fs from 'node:fs';

/**
 * Processes seen through /proc: which hold a file or socket, which one listens on a unix socket, and
 * whether a pid is this project's daemon. For the commands that control or
 * inspect a running daemon (start/stop/status, doctor).
 */

/**
 * Whether process `pid` exists and has not exited: a zombie (exited, not yet
 * reaped by its parent, e.g. an init that reaps orphans every few seconds)
 * has stopped. EPERM: it exists, owned by another user.
 */
export function processRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // "pid (comm) S …": the state follows the last ')'.
    return stat[stat.lastIndexOf(')') + 2] !== 'Z';
  } catch {
    return false;
  }
}

/** Whether `pid` is a running dedup-snapshotter daemon (not its holder, not another program that got the pid). */
export function isDaemonPid(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 1) return false;
  let argv: string[];
  try {
    argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a !== '');
  } catch {
    return false;
  }
  const i = argv.findIndex((a) => /dedup-snapshotter$/.test(a) || /\/cmd\/main\.js$/.test(a));
  if (i < 0) return false;
  // `dedup-snapshotter` alone, or `serve`: not a subcommand such as ondemand-holder or this one.
  const sub = argv[i + 1];
  return sub === undefined || sub === 'serve';
}

/** The pid of the process listening on unix socket `address` (its inode in /proc/net/unix, then the process holding it), or null. */
export function listenerOf(address: string): number | null {
  let table: string;
  try {
    table = fs.readFileSync('/proc/net/unix', 'utf8');
  } catch {
    return null;
  }
  let inode: string | null = null;
  for (const line of table.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path; St 01 = listening (unconnected).
    if (f.length >= 8 && f.slice(7).join(' ') === address && f[5] === '01') {
      inode = f[6];
      break;
    }
  }
  if (inode === null) return null;
  return pidsHolding(`socket:[${inode}]`)[0] ?? null;
}

/** The pids of the processes with an fd on `target` (as /proc/<pid>/fd/<n> reads: a path, or socket:[inode]). */
export function pidsHolding(target: string): number[] {
  let entries: string[];
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    return [];
  }
  const out: number[] = [];
  for (const e of entries) {
    if (!/^[0-9]+$/.test(e)) continue;
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${e}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (fs.readlinkSync(`/proc/${e}/fd/${fd}`) === target) {
          out.push(Number(e));
          break;
        }
      } catch {
        // closed meanwhile
      }
    }
  }
  return out;
}
