import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import type net from 'node:net';
import path from 'node:path';
import { FAN_PRE_ACCESS, kernelDev } from '../../native/fanotify';
import { SharedGroup } from './group';
import { type InheritedEvent, type InheritedEvents, cancelInherited, settleInherited } from './inherited-events';
import type { HelloReply, HolderEvent } from './holder-protocol';
import type { HolderHooks } from './holder-client';
import type { LazyFile } from './lazy-files';
import type { FanotifyDeps, LazySource, LoaderBackend } from './loader-backend';
import { RelayedEvents } from './relayed-events';
import { RelayedRecord } from './relayed-record';
import { waitAtMost } from '../util/wait';

/**
 * fanotify pre-content events (Linux ≥ 6.14): a lazy layer is mounted over
 * its sparse lazy file, marked for FAN_PRE_ACCESS in the group the holder
 * (holder.ts, its own process) reads; every read waits until the holder
 * relays the event here and it is served (relayed-events.ts).
 *
 * Fail-closed: holder and daemon both hold the group, so a daemon crash or
 * restart leaves reads waiting for the next daemon, and a holder's death
 * leaves them waiting for the next holder, which this daemon starts with a
 * copy of its group (marks and queued events kept); what the dead holder
 * had relayed is still served here. systemd's fd store may keep a third
 * copy (fdstore.ts): when holder and daemon die together, the next daemon
 * takes the group back at start and settles what the dead holder had read
 * (inherited-events.ts). Only when every holder is gone does the kernel let
 * reads through; a mounted, incomplete layer found unmarked goes to
 * onGroupLost (mounted again over a clean page cache).
 */
export class FanotifyBackend implements LoaderBackend, HolderHooks {
  readonly name = 'fanotify';
  readonly mountsOverFile = true;
  readonly rebound = false;
  /** The lazy files the holder's group marks. */
  private marked = new Set<string>();
  /** This daemon's copy of the holder's group. */
  private readonly group = new SharedGroup();
  /** The relayed events that wait, written down (null: not kept; only with an fd store). */
  private readonly record: RelayedRecord | null = null;
  /** The group came from systemd's fd store and no holder read it yet. */
  private fromStore = false;
  private readonly events: RelayedEvents;
  private readonly inherited: InheritedEvents;
  /** What the group marked when the holder went away (compared once a holder is back). */
  private markedBeforeLoss = new Set<string>();

  constructor(private readonly d: FanotifyDeps) {
    const recordFile = path.join(d.stateDir, 'relayed.json');
    const stored = d.storedGroup ?? -1;
    if (d.fdStore?.enabled || stored >= 0) this.record = new RelayedRecord(recordFile);
    // Not kept: an old record would not match the events of a later group.
    else fs.rmSync(recordFile, { force: true });
    if (stored >= 0) {
      this.group.adopt(stored);
      this.fromStore = true;
    }
    this.events = new RelayedEvents({ ...d, group: this.group, record: this.record });
    this.inherited = { events: new Map(), ...d, group: this.group, record: this.record };
    d.holder.use(this);
  }

  get queue(): number {
    return this.events.count;
  }

  async start(hasLayers: boolean): Promise<void> {
    if (this.fromStore && !hasLayers && this.group.marks().length === 0) {
      // Nothing lazy and nothing marked: the group guards nothing any more; let it go (a holder, if one lives, keeps its own).
      this.group.close();
      this.fromStore = false;
      this.d.fdStore?.forget('no lazy layer is left and the group marks no file');
    }
    // A group taken back from systemd's fd store may have reads waiting: answered from now on.
    if (hasLayers || this.fromStore) await this.d.holder.ensureConnected();
  }

  isMarked(id: string): boolean {
    return this.marked.has(this.d.files.fileOf(id));
  }

  unguarded(id: string): boolean {
    return !this.isMarked(id);
  }

  async mountSource(st: LazyFile): Promise<LazySource> {
    if (st.missing > 0) await this.mark(st.id);
    return { device: st.file };
  }

  async mark(id: string): Promise<void> {
    const file = this.d.files.fileOf(id);
    if (this.marked.has(file)) return;
    await this.d.holder.ensureConnected();
    const reply = await this.d.holder.request({ op: 'mark', path: file });
    if (reply.op === 'error') throw new Error(`cannot mark ${file} for on-demand reads: ${reply.error}`);
    this.marked.add(file);
  }

  /** Read through the marked file: the reads raise the events that load the data. */
  async loadWindow(_st: LazyFile, fh: FileHandle, buf: Buffer, start: number, end: number): Promise<number> {
    return (await fh.read(buf, 0, end - start, start)).bytesRead;
  }

  dropped(id: string): void {
    this.marked.delete(this.d.files.fileOf(id));
  }

  close(): void {
    this.group.close();
  }

  // ---- the holder connection's hooks ----

  async connected(hello: HelloReply): Promise<{ adopted: boolean; marked: number }> {
    const adopted = await this.shareGroup(hello);
    // Adopted: the marks are this daemon's record of the group's; else the holder's (a fresh group marks nothing).
    if (!adopted) this.marked = new Set(hello.marked ?? []);
    return { adopted, marked: this.marked.size };
  }

  event(conn: net.Socket, ev: HolderEvent): void {
    this.events.serve(conn, ev);
  }

  keepsReadsWaiting(): boolean {
    return this.group.held;
  }

  /**
   * The holder went away. This daemon's copy keeps the group (its marks,
   * its queued events) and reads wait; what the holder had relayed is
   * answered here, what it had read but not relayed is denied, and then a
   * new holder reads the group again. Without a copy (never taken), the
   * marks are gone with the group: layers mounted over them go to
   * onGroupLost once a holder is back (reconnected).
   */
  async lost(dead: net.Socket): Promise<void> {
    this.markedBeforeLoss = new Set(this.marked);
    if (!this.group.held) return;
    const { log, holder } = this.d;
    const orphans = this.events.from(dead);
    for (const r of orphans) {
      log.warn(
        { op: 'ondemand', layer: r.layer, file: r.file, offset: r.offset, count: r.count },
        `the on-demand holder died while a read of ${r.layer ? `layer ${r.layer}` : r.file} at ${r.offset} (+${r.count}) waited: this daemon fills and answers it through its copy of the group`,
      );
    }
    // Answered before a new holder reads: its event fd numbers must not meet the dead one's.
    // Bounded: a fill that itself reads a marked file (a chunk copied from another lazy layer) waits for a holder.
    await waitAtMost(Promise.all(orphans.map((r) => r.done)), ORPHAN_WAIT_MS);
    for (const r of orphans) {
      if (!this.events.has(r)) continue;
      r.cancelled = true;
      this.record?.remove(r.fd, r.file);
      this.group.answer(r.fd, false);
      log.warn({ op: 'ondemand', layer: r.layer, offset: r.offset, count: r.count }, `a read of ${r.layer ? `layer ${r.layer}` : r.file} at ${r.offset} (+${r.count}) the dead holder had relayed was not served in ${ORPHAN_WAIT_MS / 1000} s: denied (EIO)`);
    }
    // Only once it is gone for good (a dropped connection to a live holder: it relays its events again).
    const gone = processGone(holder.pid);
    // Reads a holder before it had read, served here: denied with the rest (their numbers may be a new holder's next).
    if (gone) for (const e of this.inherited.events.values()) cancelInherited(this.inherited, e);
    const denied = gone ? this.group.denyUnknown() : 0;
    if (denied > 0) log.warn({ op: 'ondemand', denied }, `denied ${denied} reads (EIO) the dead on-demand holder had taken from the group but not relayed`);
  }

  /** Layers lacking data whose file the group marked before the holder went away and the group now reached does not: onGroupLost. */
  async reconnected(): Promise<void> {
    const lost: string[] = [];
    for (const file of this.markedBeforeLoss) {
      if (this.marked.has(file)) continue;
      const st = this.d.files.byPath(file);
      if (st && st.missing > 0) lost.push(st.id);
    }
    if (lost.length > 0) this.d.onGroupLost(lost);
  }

  /**
   * Right after the hello: this daemon's copy of the group goes to a holder
   * that has none (one started after the last died), or one is taken of the
   * holder's. A group systemd's fd store handed back, with no holder reading
   * it: its marks are learnt from the kernel, the events a dead holder had
   * read are answered (those written down, once filled) or denied, before
   * the new holder reads. Returns whether the holder adopted this daemon's
   * copy.
   */
  private async shareGroup(hello: HelloReply): Promise<boolean> {
    const { holder, log, fdStore } = this.d;
    const holderHasGroup = hello.group === true || (hello.group === undefined && (hello.marked?.length ?? 0) > 0);
    let reserve: number[] | undefined;
    let waiting: InheritedEvent[] = [];
    if (this.fromStore && this.group.held && !holderHasGroup) {
      // No process read this group since the last holder died: what it marks is what the kernel says.
      this.marked = this.markedInGroup();
      waiting = (this.record?.list() ?? []).map((e) => ({ ...e, cancelled: false }));
      const denied = this.group.denyUnknown(4096, new Set(waiting.map((e) => e.fd)));
      if (denied > 0) log.warn({ op: 'ondemand', denied }, `denied ${denied} reads (EIO) that the on-demand holder, dead with the daemon, had taken from the group without their ranges being written down`);
      reserve = waiting.map((e) => e.fd);
    }
    const adopt = this.group.held ? { adopt_pid: process.pid, adopt_fd: this.group.fdNumber, marked: [...this.marked] } : {};
    const g = await holder.request({ op: 'group', ...(reserve ? { reserve } : {}), ...adopt });
    if (g.op === 'error') throw new Error(`the on-demand holder has no fanotify group: ${g.error}`);
    const adopted = g.adopted === true;
    const fromStore = this.fromStore;
    this.fromStore = false;
    if (!this.group.held) {
      this.group.copyFrom(holder.pid, g.fd);
      fdStore?.keep(this.group.fdNumber, `a copy of the holder's group, pid ${holder.pid}`);
    } else if (!adopted && this.group.sameAs(holder.pid, g.fd) !== true) {
      // The holder reads a group of its own, not the one this daemon holds: the holder's is the live one.
      log.warn(
        { op: 'ondemand', holder_pid: holder.pid },
        `the on-demand holder (pid ${holder.pid}) reads another fanotify group than the one ${fromStore ? "systemd's fd store handed back" : 'this daemon holds'}: using the holder's`,
      );
      this.group.replaceFrom(holder.pid, g.fd);
      fdStore?.keep(this.group.fdNumber, `the holder's group, pid ${holder.pid}, instead of another`, true);
    } else fdStore?.keep(this.group.fdNumber, 'the group in use');
    // What was written down is what still waits: the events this holder relays (resent on connect) and those answered here.
    const held = new Set<number>(adopted ? (g.reserved ?? []) : (hello.reserved ?? []));
    const inherited = this.inherited.events;
    if (!adopted && held.size > 0) {
      // A daemon before this one was answering these for this holder when it died.
      waiting = (this.record?.list() ?? []).filter((e) => held.has(e.fd) && !inherited.has(e.fd)).map((e) => ({ ...e, cancelled: false }));
      for (const n of held) {
        if (inherited.has(n) || waiting.some((e) => e.fd === n)) continue;
        this.group.answer(n, false);
        holder.send({ op: 'release', fd: n });
      }
    }
    waiting = waiting.filter((e) => held.has(e.fd));
    const live = this.events.fds();
    this.record?.retain((e) => live.has(e.fd) || held.has(e.fd) || inherited.has(e.fd));
    for (const e of waiting) void settleInherited(this.inherited, e);
    return adopted;
  }

  /** The lazy files this daemon knows that the group marks for pre-content events (the kernel's list: /proc/self/fdinfo). */
  private markedInGroup(): Set<string> {
    const marks = new Set(this.group.marks().filter((m) => (m.mask & BigInt(FAN_PRE_ACCESS)) !== 0n).map((m) => `${m.ino}:${m.sdev}`));
    const files = new Set<string>();
    for (const st of this.d.files.all()) {
      try {
        const s = fs.statSync(st.file, { bigint: true });
        if (marks.has(`${s.ino}:${kernelDev(s.dev)}`)) files.add(st.file);
      } catch {
        // gone: not marked
      }
    }
    return files;
  }
}

/** How long reads a dead holder had relayed may take before they are denied and a new holder starts. */
const ORPHAN_WAIT_MS = 10_000;

/** Whether process `pid` is gone (or a zombie: dead, not reaped yet). */
function processGone(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z';
  } catch {
    return true;
  }
}
