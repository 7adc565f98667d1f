import fsp from 'node:fs/promises';
import type { Logger } from '../log/logger';
import type { SharedGroup } from './group';
import type { HolderClient } from './holder-client';
import { type LazyFile, type LazyFiles, rangeFilled } from './lazy-files';
import type { LoaderCounters } from './loader-backend';
import type { RelayedEntry, RelayedRecord } from './relayed-record';

/**
 * Events a holder that died with its daemon had read (the group kept by
 * systemd's fd store, their ranges written down: relayed-record.ts). The
 * new holder holds each one's fd number with a placeholder; here its range
 * is read through the marked file (the reads raise events the new holder
 * relays, so the data arrives as for any read), then it is allowed, or
 * denied with EIO when the range could not be filled, and the placeholder
 * released.
 */

/** An inherited event: answered once its range is filled. */
export interface InheritedEvent extends RelayedEntry {
  /** Denied by someone else meanwhile (its number then may be another event's): never answered again. */
  cancelled: boolean;
}

export interface InheritedEvents {
  /** Those being answered, by fd number. */
  events: Map<number, InheritedEvent>;
  files: LazyFiles;
  holder: HolderClient;
  counters: LoaderCounters;
  log: Logger;
  group: SharedGroup;
  record: RelayedRecord | null;
  closed: () => boolean;
}

/** Fills `e`'s range, then answers it (unless cancelled meanwhile) and releases its placeholder. */
export async function settleInherited(ctx: InheritedEvents, e: InheritedEvent): Promise<void> {
  ctx.events.set(e.fd, e);
  const st = ctx.files.byPath(e.file);
  let err: Error | null = null;
  try {
    if (!st) throw new Error(`${e.file} is not a lazy layer file this daemon knows`);
    const count = e.count > 0 ? e.count : st.size;
    if (!rangeFilled(st, e.offset, count)) await readThrough(st, e.offset, count, ctx.closed);
    if (!rangeFilled(st, e.offset, count)) throw new Error('its range still lacks data');
  } catch (x) {
    err = x as Error;
  }
  ctx.events.delete(e.fd);
  if (e.cancelled) return;
  ctx.record?.remove(e.fd, e.file);
  ctx.group.answer(e.fd, err === null);
  ctx.holder.send({ op: 'release', fd: e.fd });
  const what = `a read of ${st ? `layer ${st.id}` : e.file} at ${e.offset} (+${e.count})`;
  if (err) {
    ctx.counters.errors++;
    ctx.log.error({ op: 'ondemand', layer: st?.id, offset: e.offset, count: e.count, err: err.message }, `${what} that waited while the on-demand holder and the daemon were both dead failed, the reader gets EIO: ${err.message}`);
  } else ctx.log.info({ op: 'ondemand', layer: st?.id, offset: e.offset, count: e.count }, `${what} that waited while the on-demand holder and the daemon were both dead is served`);
}

/** Gives up answering `e` (denied by someone else): its number may be another event's from now on. */
export function cancelInherited(ctx: InheritedEvents, e: InheritedEvent): void {
  e.cancelled = true;
  ctx.events.delete(e.fd);
  ctx.record?.remove(e.fd, e.file);
}

/** Reads [offset, offset+count) of `st`'s marked file (8 MiB at a time): each read waits for its data like a container's. */
async function readThrough(st: LazyFile, offset: number, count: number, closed: () => boolean): Promise<void> {
  const end = Math.min(offset + count, st.size);
  const buf = Buffer.alloc(Math.min(8 << 20, Math.max(1, end - offset)));
  const fh = await fsp.open(st.file, 'r');
  try {
    for (let at = offset; at < end && !st.dropped && !closed(); ) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - at), at);
      if (bytesRead === 0) break;
      at += bytesRead;
    }
  } finally {
    await fh.close();
  }
}
