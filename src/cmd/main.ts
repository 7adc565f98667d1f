import { ConfigError } from '../config/config';
import { runDaemon } from './daemon';

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
  if (cmd === 'doctor') {
    const { runDoctor } = await import('./doctor');
    process.exitCode = await runDoctor(rest);
    return;
  }
  if (cmd === 'stats') {
    const { runStats } = await import('./stats');
    process.exitCode = await runStats(rest);
    return;
  }
  if (cmd === 'fsck') {
    const { runFsck } = await import('./fsck');
    process.exitCode = await runFsck(rest);
    return;
  }
  if (cmd === 'convert') {
    const { runConvert } = await import('./convert');
    process.exitCode = await runConvert(rest);
    return;
  }
  if (cmd === 'pull') {
    const { runPull } = await import('./pull');
    process.exitCode = await runPull(rest);
    return;
  }
  if (cmd === 'mount') {
    const { runMountLayer } = await import('./mount-layer');
    process.exitCode = await runMountLayer(rest);
    return;
  }
  if (cmd === 'start' || cmd === 'stop' || cmd === 'restart' || cmd === 'reload' || cmd === 'status') {
    const { runControl } = await import('./control');
    process.exitCode = await runControl(cmd, rest);
    return;
  }
  if (cmd === 'images') {
    const { runImages } = await import('./images');
    process.exitCode = await runImages(rest);
    return;
  }
  if (cmd === 'containerd-config') {
    const { runContainerdConfig } = await import('./containerd-config');
    process.exitCode = await runContainerdConfig(rest);
    return;
  }
  if (cmd === 'ondemand-holder') {
    const { runHolder } = await import('./holder');
    process.exitCode = await runHolder(rest);
    return;
  }
  if (cmd !== undefined && cmd !== 'serve') {
    process.stderr.write(`dedup-snapshotter: unknown command ${JSON.stringify(cmd)}\n${USAGE}`);
    process.exit(2);
  }
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
