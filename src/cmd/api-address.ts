import path from 'node:path';
import { ConfigError, loadConfig } from '../config/config';

/** http.request options reaching the daemon's API at `address`: a unix socket path or "host:port" ("[v6]:port"). */
export function apiTarget(address: string): { socketPath: string } | { host: string; port: number } {
  if (path.isAbsolute(address)) return { socketPath: address };
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i).replace(/^\[(.*)\]$/, '$1') || '127.0.0.1', port: Number(address.slice(i + 1)) };
}

/** api.address from CONFIG, or null after printing the config error (as `dedup-snapshotter CMD: …`). */
export function configuredApiAddress(cmd: string): string | null {
  try {
    return loadConfig().api.address;
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`dedup-snapshotter ${cmd}: ${err.message}\n`);
      return null;
    }
    throw err;
  }
}
