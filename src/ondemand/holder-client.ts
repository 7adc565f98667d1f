import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Logger } from '../log/logger';
import { sleep } from '../remote/transport';
import { readFrames } from './frames';
import {
  type ErrorReply,
  type HelloReply,
  type HolderEvent,
  type HolderMessage,
  type HolderNotice,
  type HolderRequest,
  MalformedFrame,
  PendingRequests,
  type ReplyOf,
  decodeHolderMessage,
  encodeMessage,
} from './holder-protocol';

/**
 * The daemon's side of its connection to the on-demand holder (holder.ts):
 * dials it, starts one (detached: it outlives the daemon) when none
 * answers, sends requests and matches their replies by request id
 * (holder-protocol.ts), hands the events the holder relays to the backend,
 * and when the holder goes away, connects to the next one. What the group
 * or the cache binding needs around that is the backend's (HolderHooks).
 */

/** What the backend does around the connection. */
export interface HolderHooks {
  /** Right after the hello of a new connection, before it is used: returns what the connection line logs. */
  connected(hello: HelloReply): Promise<{ adopted: boolean; marked: number }>;
  /** An event the holder relayed on connection `conn`. */
  event(conn: net.Socket, ev: HolderEvent): void;
  /** Whether reads wait while no holder runs (this daemon holds a copy of the fanotify group). */
  keepsReadsWaiting(): boolean;
  /** The holder behind `dead` went away: settles what it left, before a new holder is reached. */
  lost(dead: net.Socket): Promise<void>;
  /** A holder is connected again after one went away. */
  reconnected(): Promise<void>;
}

export interface HolderClientOptions {
  /** The holder's unix socket. */
  socket: string;
  /** argv to start a holder with when none answers (null: wait for one started otherwise). */
  holderCommand?: string[] | null;
  /** Where a started holder's stderr goes. */
  holderLog?: string;
  log: Logger;
}

export class HolderClient {
  private sock: net.Socket | null = null;
  private readonly pending = new PendingRequests();
  private connecting: Promise<void> | null = null;
  private reconnecting: Promise<void> | null = null;
  private closed = false;
  /** The daemon is stopping: no holder is started, a lost one is not replaced. */
  private stopping = false;
  private hooks: HolderHooks | null = null;
  /** The connected (or last) holder's pid. */
  pid = 0;

  constructor(private readonly o: HolderClientOptions) {}

  /** Set once, before the first connection. */
  use(hooks: HolderHooks): void {
    this.hooks = hooks;
  }

  /** The live connection (events name the one they came on), or null. */
  get connection(): net.Socket | null {
    return this.sock;
  }

  /** Connected to the holder (one connection attempt at a time). */
  async ensureConnected(): Promise<void> {
    if (this.sock) return;
    this.connecting ??= this.connect().finally(() => (this.connecting = null));
    await this.connecting;
  }

  /** Sends `r` and waits for its reply: ReplyOf[op], or the holder's ErrorReply. */
  request<R extends HolderRequest>(r: R): Promise<ReplyOf[R['op']] | ErrorReply> {
    const sock = this.sock;
    if (!sock) return Promise.reject(new Error('no on-demand holder connected'));
    const { req, reply } = this.pending.add(r);
    sock.write(encodeMessage(req));
    return reply;
  }

  /** A message with no reply; dropped when no holder is connected. */
  send(m: HolderNotice): void {
    this.sock?.write(encodeMessage(m));
  }

  /** The daemon is stopping: from now on no holder is started (a lost one is not replaced). */
  beginStop(): void {
    this.stopping = true;
  }

  /**
   * A clean stop: tells the holder ({op:"bye"}) that it may exit once
   * nothing uses a lazy layer any more; resolves once sent (or after 1 s).
   */
  sayBye(): Promise<void> {
    const sock = this.sock;
    if (!sock) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const t = setTimeout(resolve, 1000);
      sock.write(encodeMessage({ op: 'bye' }), () => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  close(): void {
    this.closed = true;
    this.sock?.destroy();
    this.sock = null;
    this.pending.rejectAll(new Error('on-demand loader closed'));
  }

  private get h(): HolderHooks {
    if (!this.hooks) throw new Error('the holder client has no backend');
    return this.hooks;
  }

  private async connect(): Promise<void> {
    let sock: net.Socket;
    try {
      sock = await dial(this.o.socket);
    } catch (err) {
      if (!this.o.holderCommand) throw new Error(`no on-demand holder answers on ${this.o.socket}: ${(err as Error).message}`);
      if (this.stopping) throw new Error(`no on-demand holder answers on ${this.o.socket} and the daemon is stopping: none is started`);
      const child = this.startHolder(this.o.holderCommand);
      // As long as it runs, up to 5 minutes: a loaded (or emulated) machine
      // starts a Node process slowly (over 30 s measured in the test VM).
      sock = await retryDial(this.o.socket, 300_000, () => child.exitCode !== null || child.signalCode !== null);
    }
    this.attach(sock);
    const hello = await this.request({ op: 'hello' });
    if (hello.op === 'error') throw new Error(`the on-demand holder refused hello: ${hello.error}`);
    this.pid = hello.pid;
    const { adopted, marked } = await this.h.connected(hello);
    this.o.log.info(
      { op: 'ondemand', holder_pid: this.pid, socket: this.o.socket, marked, adopted },
      `on-demand holder (pid ${this.pid}) connected${adopted ? ", reading this daemon's copy of the fanotify group" : ''}`,
    );
  }

  private startHolder(argv: string[]): ChildProcess {
    const [cmd, ...args] = argv;
    const logFd = this.o.holderLog ? fs.openSync(this.o.holderLog, 'a', 0o600) : 'ignore';
    // Detached, its own session: it outlives this daemon (systemd: KillMode=process).
    const child = spawn(cmd, [...args, '--socket', this.o.socket], { detached: true, stdio: ['ignore', logFd, logFd] });
    if (typeof logFd === 'number') fs.closeSync(logFd);
    child.unref();
    fs.writeFileSync(path.join(path.dirname(this.o.socket), 'holder.pid'), `${child.pid}\n`, { mode: 0o600 });
    this.o.log.info({ op: 'ondemand', holder_pid: child.pid, socket: this.o.socket }, `started the on-demand holder (pid ${child.pid})`);
    return child;
  }

  private attach(sock: net.Socket): void {
    this.sock = sock;
    readFrames(
      sock,
      (f) => {
        let m: HolderMessage;
        try {
          m = decodeHolderMessage(f);
        } catch (err) {
          this.o.log.error({ op: 'ondemand', err: (err as Error).message }, 'bad frame from the on-demand holder');
          // The request it was meant for must not wait forever (nor take the next reply).
          if (err instanceof MalformedFrame) this.pending.fail(err);
          return;
        }
        this.onMessage(sock, m);
      },
      (err) => this.o.log.error({ op: 'ondemand', err: err.message }, 'bad frame from the on-demand holder'),
    );
    sock.on('error', () => undefined);
    sock.on('close', () => {
      if (this.sock !== sock) return;
      this.sock = null;
      this.pending.rejectAll(new Error('the on-demand holder connection closed'));
      if (!this.closed) void this.lost(sock);
    });
  }

  private onMessage(sock: net.Socket, m: HolderMessage): void {
    if (m.op === 'event') return this.h.event(sock, m);
    this.pending.settle(m);
  }

  /**
   * The holder went away: the backend settles what it left, then a holder
   * is reached again (a new one started when none answers), retried with
   * backoff until this client closes.
   */
  private async lost(dead: net.Socket): Promise<void> {
    if (this.reconnecting) return;
    const kept = this.h.keepsReadsWaiting();
    if (this.stopping) {
      // Never a new holder on the way out: the next daemon starts one.
      this.o.log.warn(
        { op: 'ondemand', holder_pid: this.pid },
        `the on-demand holder (pid ${this.pid}) is gone while the daemon stops; no new one is started (the next daemon starts one)`,
      );
      await this.h.lost(dead);
      return;
    }
    this.o.log.error(
      { op: 'ondemand', holder_pid: this.pid, group_kept: kept },
      `the on-demand holder (pid ${this.pid}) is gone; ${kept ? 'this daemon holds the fanotify group: reads wait for a new holder' : 'reconnecting'}`,
    );
    this.reconnecting = (async () => {
      await this.h.lost(dead);
      for (let attempt = 0; !this.closed; attempt++) {
        try {
          await this.ensureConnected();
          break;
        } catch (err) {
          this.o.log.error({ op: 'ondemand', err: (err as Error).message }, 'cannot reach an on-demand holder; retrying');
          await sleep(Math.min(10_000, 500 * 2 ** attempt));
        }
      }
      await this.h.reconnected();
    })().finally(() => (this.reconnecting = null));
  }
}

function dial(socket: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(socket);
    s.once('connect', () => {
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', reject);
  });
}

/** Dials until it answers, `ms` pass, or `exited()` says the holder is gone. */
async function retryDial(socket: string, ms: number, exited: () => boolean): Promise<net.Socket> {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return await dial(socket);
    } catch (err) {
      if (exited()) throw new Error(`the on-demand holder exited before it answered on ${socket} (see its log, holder.log)`);
      if (Date.now() > until) throw new Error(`the on-demand holder did not come up on ${socket}: ${(err as Error).message}`);
      await sleep(50);
    }
  }
}
