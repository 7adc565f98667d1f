import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

/**
 * Unix socket paths the daemon listens on (the gRPC socket, the HTTP API
 * when api.address is a path): made free to bind without ever deleting
 * what is not a stale socket.
 */

export class SocketInUseError extends Error {
  constructor(readonly address: string) {
    super(`${address} is in use by a running process (another dedup-snapshotter?); stop it or set ADDRESS to another path`);
    this.name = 'SocketInUseError';
  }
}

/** True when something accepts connections on the unix socket. */
function socketAnswers(address: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(address);
    const done = (v: boolean) => {
      c.destroy();
      resolve(v);
    };
    c.once('connect', () => done(true));
    c.once('error', () => done(false));
    c.setTimeout(2000, () => done(false));
  });
}

/**
 * Makes `address` free to bind: a stale socket file (nobody listening) is
 * removed; a live one, or a path that is not a socket, is refused.
 */
export async function prepareSocketPath(address: string): Promise<void> {
  fs.mkdirSync(path.dirname(address), { recursive: true, mode: 0o711 });
  let st: fs.Stats;
  try {
    st = fs.lstatSync(address);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) {
    throw new Error(`${address} exists and is not a socket; refusing to remove it`);
  }
  if (await socketAnswers(address)) throw new SocketInUseError(address);
  fs.unlinkSync(address);
}
