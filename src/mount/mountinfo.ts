import fs from 'node:fs';
import path from 'node:path';

/** One line of /proc/self/mountinfo. */
export interface MountEntry {
  /** Mount point. */
  target: string;
  fstype: string;
  /** Mount source as the kernel reports it: a device, a file, or a name such as "overlay". */
  source: string;
  /** Per-mount and file system options, comma-separated (as findmnt's OPTIONS column). */
  options: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * Every mount of this mount namespace, from /proc/self/mountinfo, in the
 * order the mounts were made (parents before children, newest last).
 */
export function listMounts(): MountEntry[] {
  return parseMountinfo(fs.readFileSync('/proc/self/mountinfo', 'utf8'));
}

/** The mounts a mountinfo file (`/proc/<pid>/mountinfo`) lists, in its order. */
export function parseMountinfo(text: string): MountEntry[] {
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      // id parent major:minor root target mount-options [optional fields...] - fstype source super-options
      const f = l.split(' ');
      const sep = f.indexOf('-', 6);
      const [fstype = '', source = '', superOptions = ''] = f.slice(sep + 1);
      const options = [f[5], superOptions].filter((o) => o !== '').join(',');
      return { target: unescapeMountinfo(f[4]), fstype, source: unescapeMountinfo(source), options: unescapeMountinfo(options) };
    });
}

export function mountPoints(): string[] {
  return listMounts().map((m) => m.target);
}

export function isMountPoint(p: string): boolean {
  return mountPoints().includes(path.resolve(p));
}

/** The filesystem type holding `p` (the longest mount point that contains it), or null. */
export function fsTypeOf(p: string): string | null {
  let real: string;
  try {
    real = fs.realpathSync(p);
  } catch {
    return null;
  }
  let best: { target: string; fstype: string } | null = null;
  try {
    for (const m of listMounts()) {
      const inside = real === m.target || m.target === '/' || real.startsWith(`${m.target}/`);
      // Later entries shadow earlier ones on the same mount point.
      if (inside && (!best || m.target.length >= best.target.length)) best = m;
    }
  } catch {
    return null;
  }
  return best?.fstype ?? null;
}
