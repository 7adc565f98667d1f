import fs from 'node:fs';
import { isDaemonPid, listenerOf } from '../util/proc';
import type { CheckResult } from './types';

/**
 * Where the running daemon's log lines go, so the guide's `journalctl`
 * greps are not run against an empty journal: the journal (systemd), a
 * file (dedup-snapshotter start), or whatever pipe started it.
 */
export function checkLogs(address: string): CheckResult {
  const name = 'logs';
  const systemd = fs.existsSync('/run/systemd/system');
  const pid = listenerOf(address);
  if (pid === null || !isDaemonPid(pid)) {
    return {
      name,
      status: 'ok',
      detail: systemd
        ? 'no daemon serves the socket; under systemd its lines go to the journal: journalctl -u dedup-snapshotter'
        : 'no daemon serves the socket; without systemd, dedup-snapshotter start appends its lines to /var/log/dedup-snapshotter.log (LOG_FILE)',
    };
  }
  let out = '';
  try {
    out = fs.readlinkSync(`/proc/${pid}/fd/1`);
  } catch {
    return { name, status: 'skip', detail: `cannot read where pid ${pid} writes (run the doctor as root)`, fix: 'sudo dedup-snapshotter doctor' };
  }
  if (out.startsWith('/')) {
    return {
      name,
      status: 'ok',
      detail: `the daemon (pid ${pid}) writes its log to ${out}${systemd ? '' : ' (there is no journal here: journalctl finds nothing)'}: grep ERROR ${out}`,
    };
  }
  if (systemd && out.startsWith('socket:')) return { name, status: 'ok', detail: `the daemon (pid ${pid}) logs to the journal: journalctl -u dedup-snapshotter (-p err for errors)` };
  return { name, status: 'ok', detail: `the daemon (pid ${pid}) writes its log to ${out} of the process that started it${systemd ? '' : ' (no systemd here: journalctl finds nothing; dedup-snapshotter start would write to /var/log/dedup-snapshotter.log)'}` };
}
