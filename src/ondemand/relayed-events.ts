import type net from 'node:net';
import type { Logger } from '../log/logger';
import type { ChunkFiller } from './chunk-fill';
import { EventFile, type SharedGroup } from './group';
import type { HolderClient } from './holder-client';
import type { HolderEvent } from './holder-protocol';
import type { LazyFiles } from './lazy-files';
import type { LoaderCounters } from './loader-backend';
import type { RelayedRecord } from './relayed-record';

/**
 * Serves the fanotify events the holder relays: the range the read waits
 * for is filled through a copy of the event's fd (it raises no event),
 * then the event is answered on this daemon's copy of the group when it
 * holds one (else by the holder: `done` with ok) and the holder told it may
 * close the event's fd. Events that wait for a fetch are written down
 * (relayed-record.ts) until answered.
 */

/** An event the holder relayed: answered on this daemon's copy of the group, by the holder's fd number. */
export interface Relayed {
  id: number;
  /** The connection it came on (event ids are per holder). */
  sock: net.Socket;
  /** The event's fd number in the holder. */
  fd: number;
  file: string;
  layer: string | undefined;
  offset: number;
  count: number;
  done: Promise<void>;
  /** Denied already (its holder died and it took too long): never answered again, its number may be another event's now. */
  cancelled: boolean;
}

export interface RelayedEventsOptions {
  files: LazyFiles;
  filler: ChunkFiller;
  holder: HolderClient;
  counters: LoaderCounters;
  log: Logger;
  /** This daemon's copy of the group (answers go there while it is held). */
  group: SharedGroup;
  /** Where events that wait for a fetch are written down (null: not kept). */
  record: RelayedRecord | null;
}

export class RelayedEvents {
  private readonly live = new Set<Relayed>();
  private waiting = 0;

  constructor(private readonly o: RelayedEventsOptions) {}

  /** Events being served now. */
  get count(): number {
    return this.waiting;
  }

  /** Whether `r` still waits for its answer. */
  has(r: Relayed): boolean {
    return this.live.has(r);
  }

  /** The holder fd numbers of the events being served. */
  fds(): Set<number> {
    return new Set([...this.live].map((r) => r.fd));
  }

  /** The events that came on connection `sock`. */
  from(sock: net.Socket): Relayed[] {
    return [...this.live].filter((r) => r.sock === sock);
  }

  serve(sock: net.Socket, e: HolderEvent): void {
    const { id: eventId, pid: holderPid, fd: holderFd, path: file, offset, count } = e;
    const { counters, log, record, group, holder } = this.o;
    counters.requests++;
    this.waiting++;
    const st = this.o.files.byPath(file);
    // Writes go through a copy of the event's fd (no event raised), counted filled once written.
    const ev = Number.isInteger(holderFd) && holderFd >= 0 ? EventFile.copy(holderPid, holderFd) : null;
    let resolveDone = () => undefined as void;
    const r: Relayed = { id: eventId, sock, fd: holderFd, file, layer: st?.id, offset, count, done: new Promise<void>((res) => (resolveDone = res)), cancelled: false };
    this.live.add(r);
    const finish = (ok: boolean, err?: Error) => {
      this.waiting--;
      ev?.close();
      if (!ok) {
        counters.errors++;
        log.error(
          { op: 'ondemand', layer: st?.id, file, offset, count, err: err?.message },
          `on-demand read of ${st ? `layer ${st.id}` : file} at ${offset} (+${count}) failed, the reader gets EIO: ${err?.message ?? 'unknown file'}`,
        );
      }
      // Written down no more before it is answered: its number is free for the holder's next event after that.
      if (!r.cancelled) record?.remove(holderFd, file);
      // Answered here (false from answer: answered already, by a daemon that died before telling the holder).
      let viaGroup = false;
      try {
        if (r.cancelled) viaGroup = true;
        else if (group.held) {
          group.answer(holderFd, ok);
          viaGroup = true;
        }
      } catch (e) {
        log.error({ op: 'ondemand', layer: st?.id, err: (e as Error).message }, `cannot answer an on-demand read of ${st ? `layer ${st.id}` : file} through this daemon's copy of the group; the holder answers it: ${(e as Error).message}`);
      }
      // The holder closes its fd only now (its number stays the event's until answered); a holder started since has other events under these ids.
      if (holder.connection === sock) holder.send(viaGroup ? { op: 'done', id: eventId, answered: true } : { op: 'done', id: eventId, ok });
      this.live.delete(r);
      resolveDone();
    };
    if (!st) return finish(false, new Error(`${file} is not a lazy layer file this daemon knows`));
    const write = async (off: number, bytes: Buffer) => {
      if (!ev) throw new Error('the on-demand holder went away before its event could be served');
      await ev.write(off, bytes);
    };
    const wait = this.o.filler.ensureRange(st, offset, count > 0 ? count : st.size, write);
    if (!wait) {
      counters.hits++;
      return finish(true);
    }
    counters.misses++;
    // It waits for a fetch: written down, to be answered even if holder and daemon die meanwhile (systemd's fd store keeping the group).
    if (ev) record?.add({ fd: holderFd, file, offset, count });
    wait.then(
      () => finish(true),
      (err: Error) => finish(false, err),
    );
  }
}
