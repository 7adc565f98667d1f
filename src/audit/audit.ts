import path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import type { AuditRow, WorkerMessage, WorkerReply } from './schema';

/**
 * The audit log, `ROOT/audit.db`: one row per mutating operation and per
 * failure (table `audit_logs`, see schema.ts).
 *
 * Recording never touches the disk on the caller's path: `record` appends to
 * an in-memory batch, and a worker thread with its own SQLite connection
 * writes batches (one transaction each) and prunes by age and row count. If
 * the worker falls behind or the disk refuses writes, new events are dropped
 * and counted rather than held without bound; the daemon keeps serving.
 */
export interface AuditEvent {
  operation: string;
  key?: string | null;
  snapshotId?: string | null;
  layerId?: string | null;
  result: 'ok' | 'error';
  error?: string | null;
  durationMs?: number | null;
  details?: Record<string, unknown> | null;
}

export interface AuditOptions {
  file: string;
  logger?: Logger;
  /** Rows older than this many days are deleted. */
  retentionDays: number;
  /** At most this many rows are kept (the oldest go first). */
  maxRows: number;
  /** How long events wait in memory before they are handed to the writer. */
  flushMs?: number;
}

/** Batches handed to the writer and not yet written; beyond this, new events are dropped. */
const MAX_PENDING_BATCHES = 64;
const MAX_BATCH = 1000;

export class AuditLog {
  private batch: AuditRow[] = [];
  private timer: NodeJS.Timeout | null = null;
  private readonly worker: Worker;
  private pendingBatches = 0;
  private nextSeq = 1;
  private waiters = new Map<number, () => void>();
  private closed = false;
  private readonly log: Logger;
  private lastDropWarn = 0;
  /** Counters for /stats. */
  readonly counters = { recorded: 0, written: 0, dropped: 0, write_errors: 0 };
  private ready: Promise<void>;

  constructor(private readonly opts: AuditOptions) {
    this.log = opts.logger ?? silentLogger();
    this.worker = new Worker(path.join(__dirname, 'worker.js'), {
      workerData: { file: opts.file, retentionDays: opts.retentionDays, maxRows: opts.maxRows },
    });
    this.worker.unref();
    this.ready = new Promise((resolve, reject) => {
      const onMessage = (m: WorkerReply) => {
        if (m.type === 'ready') {
          this.worker.off('error', reject);
          resolve();
        } else if (m.type === 'open-failed') {
          reject(new Error(`cannot open audit log ${opts.file}: ${m.error}`));
        }
      };
      this.worker.on('message', onMessage);
      this.worker.once('error', reject);
    });
    this.worker.on('message', (m: WorkerReply) => this.onReply(m));
    this.worker.on('error', (err) => this.log.error({ op: 'audit', err: err.message }, 'audit writer failed'));
  }

  /** Resolves once the database is open and its schema in place; rejects naming the file otherwise. */
  opened(): Promise<void> {
    return this.ready;
  }

  record(e: AuditEvent): void {
    if (this.closed) return;
    this.counters.recorded++;
    if (this.pendingBatches >= MAX_PENDING_BATCHES) {
      this.counters.dropped++;
      const now = Date.now();
      if (now - this.lastDropWarn > 60_000) {
        this.lastDropWarn = now;
        this.log.warn({ op: 'audit', dropped: this.counters.dropped }, 'audit log writer is behind; dropping audit rows');
      }
      return;
    }
    this.batch.push({
      timestamp: new Date().toISOString(),
      operation: e.operation,
      key: e.key ?? null,
      snapshot_id: e.snapshotId ?? null,
      layer_id: e.layerId ?? null,
      result: e.result,
      error: e.error ?? null,
      duration_ms: e.durationMs === undefined || e.durationMs === null ? null : Math.round(e.durationMs),
      details: e.details ? JSON.stringify(e.details) : null,
    });
    if (this.batch.length >= MAX_BATCH) this.handOff();
    else if (!this.timer) {
      this.timer = setTimeout(() => this.handOff(), this.opts.flushMs ?? 200);
      this.timer.unref();
    }
  }

  private handOff(): number {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    const seq = this.nextSeq++;
    if (this.batch.length > 0) {
      const rows = this.batch;
      this.batch = [];
      this.pendingBatches++;
      this.post({ type: 'write', seq, rows });
    } else {
      this.post({ type: 'sync', seq });
    }
    return seq;
  }

  private post(m: WorkerMessage): void {
    this.worker.postMessage(m);
  }

  private onReply(m: WorkerReply): void {
    if (m.type === 'written') {
      this.pendingBatches--;
      this.counters.written += m.count;
      if (m.error) {
        this.counters.write_errors++;
        this.counters.dropped += m.failed;
        this.log.error({ op: 'audit', err: m.error, rows: m.failed }, 'cannot write audit rows');
      }
    }
    if (m.type === 'written' || m.type === 'synced') {
      const w = this.waiters.get(m.seq);
      if (w) {
        this.waiters.delete(m.seq);
        w();
      }
    }
  }

  /** Resolves once everything recorded so far is written (or failed). */
  flush(): Promise<void> {
    const seq = this.handOff();
    return new Promise((resolve) => this.waiters.set(seq, resolve));
  }

  /** Writes what is queued and stops the writer. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.ready.catch(() => undefined);
    await Promise.race([this.flush(), new Promise((r) => setTimeout(r, 5000).unref())]);
    this.closed = true;
    await this.worker.terminate();
  }
}
