import fs from 'node:fs';

/** Mount points of this mount namespace, in /proc/self/mountinfo order. */
export function mountPoints(): string[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => l !== '')
    // Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
    .map((l) => l.split(' ')[4].replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
}

export function isMountPoint(p: string): boolean {
  return mountPoints().includes(p);
}
