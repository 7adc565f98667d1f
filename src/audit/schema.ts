/**
 * `ROOT/audit.db`. Timestamps are ISO 8601 UTC text with milliseconds, so
 * `SELECT * FROM audit_logs ORDER BY timestamp DESC LIMIT 10;` in sqlite3 is
 * readable and in time order. `details` is a JSON object or NULL.
 */
export const AUDIT_SCHEMA = `
CREATE TABLE IF NOT EXISTS audit_logs (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  timestamp   TEXT NOT NULL,
  operation   TEXT NOT NULL,
  key         TEXT,
  snapshot_id TEXT,
  layer_id    TEXT,
  result      TEXT NOT NULL CHECK (result IN ('ok', 'error')),
  error       TEXT,
  duration_ms INTEGER,
  details     TEXT
);
CREATE INDEX IF NOT EXISTS audit_logs_timestamp ON audit_logs (timestamp);
CREATE INDEX IF NOT EXISTS audit_logs_operation ON audit_logs (operation, timestamp);
`;

export interface AuditRow {
  timestamp: string;
  operation: string;
  key: string | null;
  snapshot_id: string | null;
  layer_id: string | null;
  result: 'ok' | 'error';
  error: string | null;
  duration_ms: number | null;
  details: string | null;
}

export type WorkerMessage = { type: 'write'; seq: number; rows: AuditRow[] } | { type: 'sync'; seq: number };

export type WorkerReply =
  | { type: 'ready' }
  | { type: 'open-failed'; error: string }
  | { type: 'written'; seq: number; count: number; failed: number; error?: string }
  | { type: 'synced'; seq: number };
