import { runDaemon } from './daemon';

const USAGE = `usage: dedup-snapshotter [--version | --help]

Runs the containerd proxy snapshotter. Environment: ROOT, ADDRESS, CONFIG, LOG_LEVEL.
`;

async function main(argv: string[]): Promise<void> {
  const [cmd] = argv;
  if (cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(USAGE);
    return;
  }
  if (cmd === '--version' || cmd === 'version') {
    process.stdout.write(`${require('../../../package.json').version}\n`);
    return;
  }
  if (cmd !== undefined && cmd !== 'serve') {
    process.stderr.write(`dedup-snapshotter: unknown command ${JSON.stringify(cmd)}\n${USAGE}`);
    process.exit(2);
  }
  await runDaemon();
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`dedup-snapshotter: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
