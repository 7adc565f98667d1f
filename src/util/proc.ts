import fs from 'node:fs';

/**
 * Processes seen through /proc: which one listens on a unix socket, and
 * whether a pid is this project's daemon. For the commands that control or
 * inspect a running daemon (start/stop/status, doctor).
 */

/** Whether `pid` is a running dedup-snapshotter daemon (not its holder, not another program that got the pid). */
export function isDaemonPid(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 1) return false;
  let argv: string[];
  try {
    argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a !== '');
  } catch {
    return false;
  }
  if (!argv.some((a) => /dedup-snapshotter$/.test(a) || /\/cmd\/main\.js$/.test(a))) return false;
  // `dedup-snapshotter` alone, or `serve`: not a subcommand such as ondemand-holder or this one.
  const i = argv.findIndex((a) => /dedup-snapshotter$/.test(a) || /\/cmd\/main\.js$/.test(a));
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
  const want = `socket:[${inode}]`;
  for (const e of fs.readdirSync('/proc')) {
    if (!/^[0-9]+$/.test(e)) continue;
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${e}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (fs.readlinkSync(`/proc/${e}/fd/${fd}`) === want) return Number(e);
      } catch {
        // closed meanwhile
      }
    }
  }
  return null;
}
