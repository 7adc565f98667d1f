import fs from 'node:fs';

/**
 * The events a holder relayed that wait for data, by the holder's fd
 * number (the kernel knows an event it delivered only by that number:
 * see group.ts), written down so that they can be answered with the right
 * bytes after the holder and the daemon both died while the group lived
 * on in systemd's fd store (fdstore.ts). The next daemon loads them before
 * a new holder reads the group; numbers not written here are denied with
 * EIO (SharedGroup.denyUnknown).
 *
 * A number is written when its event arrives here and removed before the
 * event is answered: a holder reuses a number only after its event was
 * answered (it closes the event's fd then), so a number written here
 * always names the event the group has under it. Rewritten whole (a
 * temporary file renamed over it) on each change; only events that wait
 * for a fetch are written (those answered at once are not worth it: a
 * kill in that instant costs a read an EIO, never other bytes).
 */
export interface RelayedEntry {
  /** The event's fd number in the holder that read it. */
  fd: number;
  file: string;
  offset: number;
  count: number;
}

export class RelayedRecord {
  private readonly entries = new Map<number, RelayedEntry>();

  /** Starts from what the file holds (written by a daemon before this one); a missing or damaged file holds nothing. */
  constructor(private readonly file: string) {
    for (const e of readEntries(file)) this.entries.set(e.fd, e);
  }

  list(): RelayedEntry[] {
    return [...this.entries.values()];
  }

  /** Keeps only the entries `keep` accepts. */
  retain(keep: (e: RelayedEntry) => boolean): void {
    let changed = false;
    for (const [fd, e] of this.entries) {
      if (keep(e)) continue;
      this.entries.delete(fd);
      changed = true;
    }
    if (changed) this.write();
  }

  add(e: RelayedEntry): void {
    this.entries.set(e.fd, e);
    this.write();
  }

  /** Removes the entry of number `fd` (when it is about `file`, if given). */
  remove(fd: number, file?: string): void {
    const e = this.entries.get(fd);
    if (!e || (file !== undefined && e.file !== file)) return;
    this.entries.delete(fd);
    this.write();
  }

  private write(): void {
    const tmp = `${this.file}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify([...this.entries.values()]), { mode: 0o600 });
    fs.renameSync(tmp, this.file);
  }
}

function readEntries(file: string): RelayedEntry[] {
  let list: unknown;
  try {
    list = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    return [];
  }
  if (!Array.isArray(list)) return [];
  const out: RelayedEntry[] = [];
  for (const e of list) {
    const { fd, file: f, offset, count } = (e ?? {}) as Record<string, unknown>;
    if (Number.isInteger(fd) && (fd as number) >= 0 && typeof f === 'string' && Number.isInteger(offset) && Number.isInteger(count)) {
      out.push({ fd: fd as number, file: f, offset: offset as number, count: count as number });
    }
  }
  return out;
}
