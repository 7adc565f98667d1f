import fs from 'node:fs';
import pino, { type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export const LOG_LEVELS: readonly LevelWithSilent[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

/** syslog priorities (sd-daemon's `<N>` line prefixes) of pino's levels. */
const PRIORITY: Record<string, number> = { trace: 7, debug: 7, info: 6, warn: 4, error: 3, fatal: 2 };

/**
 * JSON logs on stdout (journald collects them). Fields a user greps for are
 * flat: `op`, `key`, `snapshot`, `layer`, `duration_ms`, `err`. Each line
 * carries `level` (lower case, for jq) and `severity` (upper case: `grep
 * ERROR` finds error lines). When stdout is journald's stream, each line
 * starts with its syslog priority (`<3>`), which journald strips and keeps
 * as the entry's priority (`journalctl -p err`): the message stays the JSON.
 */
export function createLogger(level: LevelWithSilent = 'info', destination?: pino.DestinationStream): Logger {
  let dest = destination ?? pino.destination({ dest: 1, sync: true });
  if (!destination && stdoutIsJournal()) dest = withPriorityPrefix(dest);
  return pino(
    {
      level,
      base: { name: 'dedup-snapshotter', pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label, severity: label.toUpperCase() }) },
    },
    dest,
  );
}

/**
 * Whether fd 1 is the stream systemd connected to journald: systemd sets
 * JOURNAL_STREAM to that stream's "device:inode" (a redirected stdout no
 * longer matches).
 */
export function stdoutIsJournal(env: NodeJS.ProcessEnv = process.env): boolean {
  const m = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? '');
  if (!m) return false;
  try {
    const st = fs.fstatSync(1, { bigint: true });
    return st.dev === BigInt(m[1]) && st.ino === BigInt(m[2]);
  } catch {
    return false;
  }
}

/** Prefixes each JSON line with its syslog priority, read from the line's level. */
export function withPriorityPrefix(dest: pino.DestinationStream): pino.DestinationStream {
  return {
    write(line: string) {
      const label = /^\{"level":"([a-z]+)"/.exec(line)?.[1] ?? 'info';
      dest.write(`<${PRIORITY[label] ?? 6}>${line}`);
    },
  };
}

/** A logger that writes nothing: for tests and library use. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
