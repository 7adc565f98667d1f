import fs from 'node:fs';
import path from 'node:path';

/** Writes this process's pid to `file` (a temp file renamed over it: a reader never sees it half-written). */
export function writePidFile(file: string): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, `${process.pid}\n`, { mode: 0o644 });
  fs.renameSync(tmp, file);
}

/** Removes `file` if it still names this process (another instance may have written it since). */
export function removePidFile(file: string): void {
  try {
    if (fs.readFileSync(file, 'utf8').trim() === String(process.pid)) fs.unlinkSync(file);
  } catch {
    // gone already
  }
}
