import { ConfigError } from '../config/config';
import { execWithDaemonOptions } from './node-options';

const USAGE = `usage: dedup-snapshotter [serve]         run the containerd proxy snapshotter (the default)
       dedup-snapshotter doctor [--json]  check this host for everything the snapshotter needs, with fixes
       dedup-snapshotter stats [--json]   print the running daemon's /stats
       dedup-snapshotter fsck [--json] [--drop-broken]
                                          verify every chunk and layer image; list what is damaged and how to fix it
       dedup-snapshotter convert [--plain-http] SRC DST
                                          convert a registry image into a dedup image (lazy pull)
       dedup-snapshotter pull [--plain-http] [--address SOCK] [--namespace NS] REF
                                          pull a dedup image into containerd for ctr (no layer download)
       dedup-snapshotter mount LAYER DIR  mount ROOT/images/<id>.erofs read-only with its chunk store (umount DIR)
       dedup-snapshotter images [--json]  containerd's images whose layers this snapshotter holds
       dedup-snapshotter containerd-config add|remove FILE
                                          add or take out the proxy plugin in containerd's config.toml
       dedup-snapshotter start|stop|restart|reload|status
                                          run the daemon without systemd (pid file, log file)
       dedup-snapshotter --version | --help

Environment: ROOT, ADDRESS, CONFIG, LOG_LEVEL (see README).
`;

/** The subcommands, each loaded only when run. */
const COMMANDS: Record<string, (args: string[]) => Promise<number>> = {
  doctor: async (a) => (await import('./doctor')).runDoctor(a),
  stats: async (a) => (await import('./stats')).runStats(a),
  fsck: async (a) => (await import('./fsck')).runFsck(a),
  convert: async (a) => (await import('./convert')).runConvert(a),
  pull: async (a) => (await import('./pull')).runPull(a),
  mount: async (a) => (await import('./mount-layer')).runMountLayer(a),
  images: async (a) => (await import('./images')).runImages(a),
  'containerd-config': async (a) => (await import('./containerd-config')).runContainerdConfig(a),
  'ondemand-holder': async (a) => (await import('./holder')).runHolder(a),
  ...Object.fromEntries((['start', 'stop', 'restart', 'reload', 'status'] as const).map((v) => [v, async (a: string[]) => (await import('./control')).runControl(v, a)])),
};

async function main(argv: string[]): Promise<void> {
  const [cmd, ...rest] = argv;
  if (cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(USAGE);
    return;
  }
  if (cmd === '--version' || cmd === 'version') {
    process.stdout.write(`${require('../../../package.json').version}\n`);
    return;
  }
  const sub = cmd !== undefined && Object.hasOwn(COMMANDS, cmd) ? COMMANDS[cmd] : undefined;
  if (sub) {
    process.exitCode = await sub(rest);
    return;
  }
  if (cmd !== undefined && cmd !== 'serve') {
    process.stderr.write(`dedup-snapshotter: unknown command ${JSON.stringify(cmd)}\n${USAGE}`);
    process.exit(2);
  }
  // The daemon runs with its own V8 options (node-options.ts): the process is started again with them before anything is opened.
  execWithDaemonOptions();
  const { runDaemon } = await import('./daemon');
  await runDaemon();
}

main(process.argv.slice(2)).catch((err) => {
  // A bad config (CONFIG, ROOT, ADDRESS) in any command: its message names the key.
  if (err instanceof ConfigError) {
    process.stderr.write(`dedup-snapshotter: ${err.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`dedup-snapshotter: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
