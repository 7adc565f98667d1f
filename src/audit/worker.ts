/** The audit log's writer thread (see audit.ts): owns the only write connection to audit.db. */
import { parentPort, workerData } from 'node:worker_threads';
import Database from 'better-sqlite3';
import { AUDIT_SCHEMA, type AuditRow, type WorkerMessage, type WorkerReply } from './schema';

const PRUNE_EVERY_MS = 3_600_000;

function main(): void {
  const port = parentPort;
  if (!port) throw new Error('audit worker started outside a worker thread');
  const reply = (m: WorkerReply) => port.postMessage(m);
  const { file, retentionDays, maxRows } = workerData as { file: string; retentionDays: number; maxRows: number };
  let db: Database.Database;
  try {
    db = new Database(file);
    db.pragma('journal_mode = WAL');
    // An audit row lost to a power cut is acceptable; a stalled writer is not.
    db.pragma('synchronous = NORMAL');
    db.pragma('busy_timeout = 5000');
    db.exec(AUDIT_SCHEMA);
  } catch (err) {
    reply({ type: 'open-failed', error: (err as Error).message });
    return;
  }
  const insert = db.prepare(
    `INSERT INTO audit_logs (timestamp, operation, key, snapshot_id, layer_id, result, error, duration_ms, details)
     VALUES (@timestamp, @operation, @key, @snapshot_id, @layer_id, @result, @error, @duration_ms, @details)`,
  );
  const writeAll = db.transaction((rows: AuditRow[]) => {
    for (const r of rows) insert.run(r);
  });
  const pruneAge = db.prepare('DELETE FROM audit_logs WHERE timestamp < ?');
  const pruneCount = db.prepare('DELETE FROM audit_logs WHERE id <= (SELECT max(id) FROM audit_logs) - ?');
  const prune = () => {
    try {
      pruneAge.run(new Date(Date.now() - retentionDays * 86_400_000).toISOString());
      pruneCount.run(maxRows);
    } catch {
      // Retried at the next interval; a full disk must not stop the writer.
    }
  };
  prune();
  const timer = setInterval(prune, PRUNE_EVERY_MS);
  timer.unref();

  port.on('message', (m: WorkerMessage) => {
    if (m.type === 'sync') return reply({ type: 'synced', seq: m.seq });
    try {
      writeAll(m.rows);
      reply({ type: 'written', seq: m.seq, count: m.rows.length, failed: 0 });
    } catch (err) {
      reply({ type: 'written', seq: m.seq, count: 0, failed: m.rows.length, error: (err as Error).message });
    }
    // The row bound holds after every batch (a range delete on the key).
    try {
      pruneCount.run(maxRows);
    } catch {
      // as above
    }
  });
  reply({ type: 'ready' });
}

main();
