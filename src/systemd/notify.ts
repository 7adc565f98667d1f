import { sendUnixDatagram } from '../../native/socket';

/**
 * sd_notify(3) without libsystemd: with `Type=notify`, systemd sets
 * NOTIFY_SOCKET and waits for `READY=1` before it starts units ordered after
 * this one (containerd). Without NOTIFY_SOCKET (not under systemd) this does
 * nothing. Returns whether a message was sent.
 */
export function sdNotify(state: Record<string, string | number>, env: NodeJS.ProcessEnv = process.env): boolean {
  const address = env.NOTIFY_SOCKET;
  if (!address) return false;
  const message = Object.entries(state)
    .map(([k, v]) => `${k}=${String(v).replace(/\n/g, ' ')}`)
    .join('\n');
  sendUnixDatagram(address, message);
  return true;
}
