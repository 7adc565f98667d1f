import { type Frame, encodeFrame } from './frames';

/**
 * The messages between the daemon and its on-demand holder (holder.ts), one
 * per frame (frames.ts): a JSON header whose `op` names the message, and for
 * `fill` the bytes as the frame's payload. Both ends encode and decode here.
 *
 * Requests (daemon → holder) carry a request id `req`; the reply (holder →
 * daemon) echoes it, so the daemon matches replies by id. A holder outlives
 * the daemon that started it (it keeps the fanotify group or /dev/cachefiles
 * across daemon restarts), so a daemon may talk to a holder of an earlier
 * version, which ignores `req` and replies without it, in the order it got
 * the requests: a reply without `req` answers the oldest request still
 * waiting (PendingRequests). Likewise a holder accepts requests without
 * `req` (an earlier daemon) and then replies without it.
 *
 * `id` is an event's number (the holder's, per holder process), never a
 * request id: an `event` the holder pushes unasked, and the `done` and
 * `fill` about it.
 */

/** Daemon → holder, answered by a reply echoing `req`. */
export type HolderRequest =
  /** → hello. */
  | { op: 'hello'; req?: number }
  /** Marks a file for pre-content events in the holder's group → marked, or error. */
  | { op: 'mark'; req?: number; path: string }
  /**
   * The holder's fanotify group (made on demand) → group; with adopt_pid and
   * adopt_fd, a holder without a group takes a copy of the daemon's, its
   * marks listed in `marked`, first holding the fd numbers `reserve` (events
   * a dead holder read that the daemon answers).
   */
  | { op: 'group'; req?: number; adopt_pid?: number; adopt_fd?: number; marked?: string[]; reserve?: number[] }
  /** /dev/cachefiles bound in on-demand mode (dir, tag), or a copy of the daemon's fd (adopt_pid, adopt_fd) → cachefiles. */
  | { op: 'cachefiles'; req?: number; dir?: string; tag?: string; adopt_pid?: number; adopt_fd?: number }
  /** Writes the frame's payload at `offset` through event `id`'s fd → filled, or error (the read is then denied). */
  | { op: 'fill'; req?: number; id: number; offset: number };

/** Daemon → holder, no reply. */
export type HolderNotice =
  /** Event `id` is over: answered by the daemon on its copy of the group (`answered`), or to be answered here (`ok`: allowed, else EIO). */
  | { op: 'done'; id: number; ok?: boolean; answered?: boolean }
  /** The placeholder holding fd number `fd` may go (the daemon answered the old event under it). */
  | { op: 'release'; fd: number }
  /**
   * The daemon stops cleanly: once no daemon is connected, no event waits
   * and no marked file is open anywhere (no lazy layer mounted, not even
   * under a container's overlay), the holder exits. A holder of
   * /dev/cachefiles stays (whether a cache's objects are in use cannot be told).
   */
  | { op: 'bye' };

export type DaemonMessage = HolderRequest | HolderNotice;

export type HelloReply = { op: 'hello'; req?: number; pid: number; marked?: string[]; group?: boolean; reserved?: number[] };
export type MarkedReply = { op: 'marked'; req?: number; path: string };
export type GroupReply = { op: 'group'; req?: number; pid: number; fd: number; fresh: boolean; adopted?: boolean; reserved?: number[]; refused?: number[] };
export type CachefilesReply = { op: 'cachefiles'; req?: number; pid: number; fd: number; fresh: boolean };
export type FilledReply = { op: 'filled'; req?: number; id: number; offset: number };
/** A request failed; about a fill, it names the event (`id`) and `offset`. */
export type ErrorReply = { op: 'error'; req?: number; error: string; path?: string; id?: number; offset?: number };

export type HolderReply = HelloReply | MarkedReply | GroupReply | CachefilesReply | FilledReply | ErrorReply;

/** Holder → daemon, unasked: a read of a marked file waits (`fd`: the event's fd in holder `pid`). */
export type HolderEvent = { op: 'event'; id: number; pid: number; fd: number; path: string; offset: number; count: number };

export type HolderMessage = HolderReply | HolderEvent;

/** The reply each request op gets when it succeeds (else an ErrorReply). */
export interface ReplyOf {
  hello: HelloReply;
  mark: MarkedReply;
  group: GroupReply;
  cachefiles: CachefilesReply;
  fill: FilledReply;
}

const REPLY_OP: Record<HolderRequest['op'], HolderReply['op']> = { hello: 'hello', mark: 'marked', group: 'group', cachefiles: 'cachefiles', fill: 'filled' };

export function encodeMessage(m: DaemonMessage | HolderMessage, data?: Buffer): Buffer {
  return encodeFrame(m as unknown as Record<string, unknown>, data);
}

/**
 * A frame that is not a message of the protocol. `req` is its request id
 * and `op` its op when it had readable ones; `aboutEvent` when it is an
 * event or names one (`id`): then it answers no request.
 */
export class MalformedFrame extends Error {
  readonly req?: number;
  readonly op?: string;
  readonly aboutEvent: boolean;

  constructor(message: string, h?: Record<string, unknown>) {
    super(message);
    this.name = 'MalformedFrame';
    this.req = h && Number.isInteger(h.req) ? (h.req as number) : undefined;
    this.op = typeof h?.op === 'string' ? h.op : undefined;
    this.aboutEvent = h !== undefined && (h.op === 'event' || (this.req === undefined && Number.isInteger(h.id)));
  }
}

/** Reads the fields of one header, naming the first that is wrong. */
class Fields {
  constructor(
    private readonly h: Record<string, unknown>,
    private readonly what: string,
  ) {}

  private bad(key: string, want: string): never {
    throw new MalformedFrame(`${this.what}: field ${key} is ${JSON.stringify(this.h[key]) ?? 'missing'}, not ${want}`, this.h);
  }

  int(key: string): number {
    const v = this.h[key];
    return Number.isInteger(v) ? (v as number) : this.bad(key, 'an integer');
  }

  optInt(key: string): number | undefined {
    return this.h[key] === undefined ? undefined : this.int(key);
  }

  str(key: string): string {
    const v = this.h[key];
    return typeof v === 'string' ? v : this.bad(key, 'a string');
  }

  optStr(key: string): string | undefined {
    return this.h[key] === undefined ? undefined : this.str(key);
  }

  optBool(key: string): boolean | undefined {
    const v = this.h[key];
    return v === undefined ? undefined : typeof v === 'boolean' ? v : this.bad(key, 'true or false');
  }

  optInts(key: string): number[] | undefined {
    const v = this.h[key];
    if (v === undefined) return undefined;
    return Array.isArray(v) && v.every((n) => Number.isInteger(n)) ? (v as number[]) : this.bad(key, 'a list of integers');
  }

  optStrs(key: string): string[] | undefined {
    const v = this.h[key];
    if (v === undefined) return undefined;
    return Array.isArray(v) && v.every((s) => typeof s === 'string') ? (v as string[]) : this.bad(key, 'a list of strings');
  }
}

function header(f: Frame, from: string): { h: Record<string, unknown>; op: string } {
  const h = f.head as unknown;
  if (typeof h !== 'object' || h === null || Array.isArray(h)) throw new MalformedFrame(`a frame from the ${from} whose header is not a JSON object`);
  const op = (h as Record<string, unknown>).op;
  if (typeof op !== 'string') throw new MalformedFrame(`a frame from the ${from} without an op`, h as Record<string, unknown>);
  return { h: h as Record<string, unknown>, op };
}

/** Undefined fields are left out, so that an encoded message carries only what was set. */
function defined<T extends object>(m: T): T {
  for (const k of Object.keys(m) as (keyof T)[]) if (m[k] === undefined) delete m[k];
  return m;
}

/** A frame the holder got; throws MalformedFrame naming what is wrong. */
export function decodeDaemonMessage(f: Frame): DaemonMessage {
  const { h, op } = header(f, 'daemon');
  const x = new Fields(h, `the daemon's "${op}"`);
  const req = x.optInt('req');
  switch (op) {
    case 'hello':
      return defined({ op, req });
    case 'mark':
      return defined({ op, req, path: x.str('path') });
    case 'group':
      return defined({ op, req, adopt_pid: x.optInt('adopt_pid'), adopt_fd: x.optInt('adopt_fd'), marked: x.optStrs('marked'), reserve: x.optInts('reserve') });
    case 'cachefiles':
      return defined({ op, req, dir: x.optStr('dir'), tag: x.optStr('tag'), adopt_pid: x.optInt('adopt_pid'), adopt_fd: x.optInt('adopt_fd') });
    case 'fill':
      return defined({ op, req, id: x.int('id'), offset: x.int('offset') });
    case 'done':
      return defined({ op, id: x.int('id'), ok: x.optBool('ok'), answered: x.optBool('answered') });
    case 'release':
      return { op, fd: x.int('fd') };
    case 'bye':
      return { op };
    default:
      throw new MalformedFrame(`the daemon sent an unknown op ${JSON.stringify(op)}`, h);
  }
}

/** A frame the daemon got; throws MalformedFrame naming what is wrong. */
export function decodeHolderMessage(f: Frame): HolderMessage {
  const { h, op } = header(f, 'holder');
  const x = new Fields(h, `the holder's "${op}"`);
  const req = x.optInt('req');
  switch (op) {
    case 'event':
      return { op, id: x.int('id'), pid: x.int('pid'), fd: x.int('fd'), path: x.optStr('path') ?? '', offset: x.optInt('offset') ?? 0, count: x.optInt('count') ?? 0 };
    case 'hello':
      return defined({ op, req, pid: x.int('pid'), marked: x.optStrs('marked'), group: x.optBool('group'), reserved: x.optInts('reserved') });
    case 'marked':
      return defined({ op, req, path: x.str('path') });
    case 'group':
      return defined({ op, req, pid: x.int('pid'), fd: x.int('fd'), fresh: x.optBool('fresh') ?? false, adopted: x.optBool('adopted'), reserved: x.optInts('reserved'), refused: x.optInts('refused') });
    case 'cachefiles':
      return defined({ op, req, pid: x.int('pid'), fd: x.int('fd'), fresh: x.optBool('fresh') ?? false });
    case 'filled':
      return defined({ op, req, id: x.int('id'), offset: x.int('offset') });
    case 'error':
      return defined({ op, req, error: x.optStr('error') ?? 'unknown error', path: x.optStr('path'), id: x.optInt('id'), offset: x.optInt('offset') });
    default:
      throw new MalformedFrame(`the holder sent an unknown op ${JSON.stringify(op)}`, h);
  }
}

interface Waiter {
  op: HolderRequest['op'];
  resolve: (r: HolderReply) => void;
  reject: (e: Error) => void;
}

/**
 * The requests a client sent and waits for, by request id. A reply echoing
 * an id settles that request, in whatever order replies come. A reply
 * without one comes from a holder of an earlier version, which answers in
 * the order it was asked: it settles the oldest request still waiting (a
 * Map iterates in insertion order, and ids only grow).
 */
export class PendingRequests {
  private next = 1;
  private readonly waiting = new Map<number, Waiter>();

  get size(): number {
    return this.waiting.size;
  }

  /** Gives `r` its id; the promise is its reply (ReplyOf[op] or an ErrorReply). */
  add<R extends HolderRequest>(r: R): { req: R & { req: number }; reply: Promise<ReplyOf[R['op']] | ErrorReply> } {
    const req = this.next++;
    const reply = new Promise<ReplyOf[R['op']] | ErrorReply>((resolve, reject) => {
      this.waiting.set(req, { op: r.op, resolve: resolve as (x: HolderReply) => void, reject });
    });
    return { req: { ...r, req }, reply };
  }

  /** The request `reply` answers: by its id, else the oldest waiting (a reply of an earlier holder). */
  private take(req: number | undefined): [number, Waiter] | null {
    if (req === undefined) {
      const first = this.waiting.entries().next();
      return first.done ? null : first.value;
    }
    const w = this.waiting.get(req);
    return w ? [req, w] : null;
  }

  /**
   * Settles the request `reply` answers; false when none waits for it (or
   * it is an earlier holder's answer about an event, not matched). A
   * reply of another op than the request's (nor an error) rejects it.
   */
  settle(reply: HolderReply): boolean {
    // Without an id but naming an event: an earlier holder's answer to a fill, which this daemon never sends.
    if (reply.req === undefined && 'id' in reply && reply.id !== undefined) return false;
    const found = this.take(reply.req);
    if (!found) return false;
    const [req, w] = found;
    this.waiting.delete(req);
    if (reply.op === 'error' || reply.op === REPLY_OP[w.op]) w.resolve(reply);
    else w.reject(new Error(`the on-demand holder answered request ${req} (${w.op}) with "${reply.op}"`));
    return true;
  }

  /**
   * Fails the request a malformed frame was meant to answer (by its id,
   * else the oldest: an earlier holder answers in order); false when none
   * waits, or the frame is about an event.
   */
  fail(err: MalformedFrame): boolean {
    if (err.aboutEvent) return false;
    const found = this.take(err.req);
    if (!found) return false;
    this.waiting.delete(found[0]);
    found[1].reject(new Error(`the on-demand holder's reply to request ${found[0]} (${found[1].op}) is malformed: ${err.message}`));
    return true;
  }

  /** Fails every waiting request (the connection closed). */
  rejectAll(err: Error): void {
    const all = [...this.waiting.values()];
    this.waiting.clear();
    for (const w of all) w.reject(err);
  }
}
