import { OndemandHolder } from '../ondemand/holder';

const USAGE = `usage: dedup-snapshotter ondemand-holder --socket PATH

Holds what on-demand loading must not lose when the daemon dies: the
fanotify pre-content group (relaying its events to the daemon connecting on
PATH), or /dev/cachefiles bound in on-demand mode (EROFS over fscache), so
a daemon crash or restart never lets a read of unfetched data through (it
waits for the daemon instead). Started once by the daemon, detached; not
restarted with it.
`;

export async function runHolder(argv: string[]): Promise<number> {
  let socket: string | null = null;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--socket' && argv[i + 1]) socket = argv[++i];
    else if (argv[i] === '--help' || argv[i] === '-h') {
      process.stdout.write(USAGE);
      return 0;
    } else {
      process.stderr.write(`dedup-snapshotter ondemand-holder: unknown argument ${JSON.stringify(argv[i])}\n${USAGE}`);
      return 2;
    }
  }
  if (!socket) {
    process.stderr.write(`dedup-snapshotter ondemand-holder: --socket is required\n${USAGE}`);
    return 2;
  }
  const log = (msg: string) => process.stderr.write(`${JSON.stringify({ op: 'holder', time: new Date().toISOString(), msg })}\n`);
  let orphaned = () => undefined as void;
  const gone = new Promise<void>((resolve) => (orphaned = resolve));
  const holder = new OndemandHolder({
    socket,
    log,
    onOrphaned: () => {
      log(`socket ${socket} is gone: no daemon can reach this holder; exiting`);
      orphaned();
    },
    // The daemon stopped cleanly and no lazy layer is in use any more.
    onIdle: () => orphaned(),
  });
  await holder.listen();
  log(`on-demand holder ready on ${socket} (it keeps the fanotify group or /dev/cachefiles for the daemon)`);
  await Promise.race([
    gone,
    new Promise<void>((resolve) => {
      for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => resolve());
    }),
  ]);
  await holder.close();
  return 0;
}
