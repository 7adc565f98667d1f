/** Small helpers shared by the doctor's checks. */
import fs from 'node:fs';
import path from 'node:path';

/** Where `bin` resolves: a path as given, or the first executable of that name in PATH. */
export function whichBin(bin: string, envPath: string | undefined): string | null {
  const candidates = bin.includes('/') ? [bin] : (envPath ?? '').split(':').filter((d) => d !== '').map((d) => path.join(d, bin));
  for (const c of candidates) {
    try {
      fs.accessSync(c, fs.constants.X_OK);
      if (fs.statSync(c).isFile()) return c;
    } catch {
      /* next */
    }
  }
  return null;
}

/** Quotes `s` for a command line shown to the operator (never executed by us). */
export function shq(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

export function errCode(err: unknown): string | undefined {
  return (err as { code?: string } | null)?.code;
}

/** An error's message (the project's one helper, under the doctor's name). */
export { messageOf as errMessage } from '../errdefs/errors';

/** Compares dotted versions numerically ("1.10" > "1.9"); non-numeric tails are ignored. */
export function compareVersions(a: string, b: string): number {
  const pa = (/^\d+(?:\.\d+)*/.exec(a)?.[0] ?? '0').split('.').map(Number);
  const pb = (/^\d+(?:\.\d+)*/.exec(b)?.[0] ?? '0').split('.').map(Number);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

/** Whether systemd is the init system (its runtime directory exists). */
export function hasSystemd(): boolean {
  return fs.existsSync('/run/systemd/system');
}
