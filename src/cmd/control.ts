import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ConfigError, loadConfig } from '../config/config';
import { isDaemonPid, listenerOf, processRunning } from '../util/proc';

const USAGE = `usage: dedup-snapshotter start|stop|restart|reload|status

Runs the daemon without systemd, the way the unit does with it:
  start    starts it in the background (its own session), appends its log
           to LOG_FILE, records its pid in PID_FILE, and waits until it
           serves ADDRESS (start-up recovery may take a while after a crash)
  stop     SIGTERM: in-flight calls finish, then it exits (up to 60 s)
  restart  stop, then start
  reload   SIGHUP: re-reads CONFIG (log_level and ksm.* apply at once)
  status   running or not, its pid, socket and the on-demand holder's pid
Layer mounts and the on-demand holder stay across stop and restart (running
containers use them), as with systemd's KillMode=process.
Where systemd runs the dedup-snapshotter unit, each command runs
"systemctl COMMAND dedup-snapshotter" instead.

Environment: ROOT, ADDRESS, CONFIG, LOG_LEVEL as for the daemon;
PID_FILE (default /run/dedup-snapshotter.pid), LOG_FILE (default /var/log/dedup-snapshotter.log).
`;

export const DEFAULT_PID_FILE = '/run/dedup-snapshotter.pid';
export const DEFAULT_LOG_FILE = '/var/log/dedup-snapshotter.log';
const STOP_TIMEOUT_MS = 60_000;
const START_TIMEOUT_MS = 600_000;

type Verb = 'start' | 'stop' | 'restart' | 'reload' | 'status';

interface Where {
  address: string;
  root: string;
  pidFile: string;
  logFile: string;
}

/** The running daemon: by PID_FILE, else by who listens on ADDRESS. */
function findDaemon(w: Where): number | null {
  try {
    const pid = Number(fs.readFileSync(w.pidFile, 'utf8').trim());
    if (isDaemonPid(pid)) return pid;
  } catch {
    // no pid file
  }
  const pid = listenerOf(w.address);
  return pid !== null && isDaemonPid(pid) ? pid : null;
}

const alive = processRunning;

/** The on-demand holder's pid, if one runs for this ROOT. */
function holderPid(root: string): number | null {
  try {
    const pid = Number(fs.readFileSync(path.join(root, 'ondemand', 'holder.pid'), 'utf8').trim());
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.includes('ondemand-holder') ? pid : null;
  } catch {
    return null;
  }
}

function serves(address: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(address);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The unit is installed and systemd runs this host: systemctl does it. */
function systemdUnit(): boolean {
  return fs.existsSync('/run/systemd/system') && (fs.existsSync('/etc/systemd/system/dedup-snapshotter.service') || fs.existsSync('/lib/systemd/system/dedup-snapshotter.service'));
}

async function stop(w: Where, say: (s: string) => void): Promise<number> {
  const pid = findDaemon(w);
  if (pid === null) {
    say(`dedup-snapshotter is not running (no daemon in ${w.pidFile} or on ${w.address})`);
    return 0;
  }
  process.kill(pid, 'SIGTERM');
  say(`stopping dedup-snapshotter (pid ${pid}): in-flight calls finish first`);
  const until = Date.now() + STOP_TIMEOUT_MS;
  while (alive(pid)) {
    if (Date.now() > until) {
      say(`dedup-snapshotter (pid ${pid}) is still stopping after ${STOP_TIMEOUT_MS / 1000} s (a long conversion); wait, or kill -9 ${pid} (safe: nothing acknowledged is lost)`);
      return 1;
    }
    await sleep(100);
  }
  say(`stopped dedup-snapshotter (pid ${pid})`);
  const holder = holderPid(w.root);
  if (holder !== null) say(`the on-demand holder (pid ${holder}) keeps lazy layers' reads waiting for the next daemon; it exits by itself once no lazy layer is mounted`);
  return 0;
}

async function start(w: Where, say: (s: string) => void): Promise<number> {
  const running = findDaemon(w);
  if (running !== null) {
    say(`dedup-snapshotter is already running (pid ${running}), serving ${w.address}`);
    return 0;
  }
  fs.mkdirSync(path.dirname(w.logFile), { recursive: true });
  fs.mkdirSync(path.dirname(w.pidFile), { recursive: true });
  const log = fs.openSync(w.logFile, 'a', 0o640);
  const logStart = fs.fstatSync(log).size;
  const main = process.argv[1];
  // The daemon writes PID_FILE itself (and removes it when it exits).
  const child = spawn(process.execPath, [main, 'serve'], { detached: true, stdio: ['ignore', log, log], env: { ...process.env, PID_FILE: w.pidFile } });
  fs.closeSync(log);
  child.unref();
  let exited: number | null = null;
  child.once('exit', (code, signal) => (exited = code ?? (signal ? 128 : 1)));
  const started = Date.now();
  let told = started;
  while (!(await serves(w.address)) || listenerOf(w.address) !== child.pid) {
    if (exited !== null) {
      const tail = readFrom(w.logFile, logStart).trim().split('\n').slice(-5).join('\n');
      say(`dedup-snapshotter exited at start (code ${exited}); the end of ${w.logFile}:\n${tail}`);
      return 1;
    }
    if (Date.now() - started > START_TIMEOUT_MS) {
      say(`dedup-snapshotter (pid ${child.pid}) does not serve ${w.address} after ${START_TIMEOUT_MS / 1000} s; see ${w.logFile}`);
      return 1;
    }
    if (Date.now() - told > 15_000) {
      told = Date.now();
      say(`still starting (pid ${child.pid}): start-up recovery; progress in ${w.logFile}`);
    }
    await sleep(100);
  }
  say(`started dedup-snapshotter (pid ${child.pid}), serving ${w.address}; log: ${w.logFile}`);
  return 0;
}

function readFrom(file: string, offset: number): string {
  try {
    const buf = fs.readFileSync(file);
    return buf.subarray(Math.min(offset, buf.length)).toString('utf8');
  } catch {
    return '';
  }
}

function status(w: Where, say: (s: string) => void): number {
  const pid = findDaemon(w);
  const holder = holderPid(w.root);
  const holderLine = holder !== null ? `; on-demand holder: pid ${holder}` : '';
  if (pid === null) {
    say(`dedup-snapshotter is not running${holderLine}`);
    // LSB: 3 = not running.
    return 3;
  }
  const serving = listenerOf(w.address) === pid;
  say(`dedup-snapshotter is running (pid ${pid}), ${serving ? `serving ${w.address}` : `starting (not serving ${w.address} yet)`}; log: ${w.logFile}${holderLine}`);
  return 0;
}

export async function runControl(verb: Verb, args: string[]): Promise<number> {
  if (args.includes('--help') || args.includes('-h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.length > 0) {
    process.stderr.write(`dedup-snapshotter ${verb}: unexpected argument ${JSON.stringify(args[0])}\n${USAGE}`);
    return 2;
  }
  if (systemdUnit() && !process.env.DEDUP_NO_SYSTEMCTL) {
    const r = spawnSync('systemctl', [verb, 'dedup-snapshotter'], { stdio: 'inherit' });
    return r.status ?? 1;
  }
  let cfg: { root: string; address: string };
  try {
    cfg = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`dedup-snapshotter: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  const w: Where = {
    address: cfg.address,
    root: cfg.root,
    pidFile: process.env.PID_FILE || DEFAULT_PID_FILE,
    logFile: process.env.LOG_FILE || DEFAULT_LOG_FILE,
  };
  const say = (s: string) => process.stdout.write(`${s}\n`);
  switch (verb) {
    case 'start':
      return start(w, say);
    case 'stop':
      return stop(w, say);
    case 'restart': {
      const code = await stop(w, say);
      return code === 0 ? start(w, say) : code;
    }
    case 'reload': {
      const pid = findDaemon(w);
      if (pid === null) {
        say('dedup-snapshotter is not running: nothing to reload');
        return 3;
      }
      process.kill(pid, 'SIGHUP');
      say(`asked dedup-snapshotter (pid ${pid}) to re-read ${process.env.CONFIG || '/etc/dedup-snapshotter/config.json'}; its log says what applied ("op":"reload")`);
      return 0;
    }
    case 'status':
      return status(w, say);
  }
}
