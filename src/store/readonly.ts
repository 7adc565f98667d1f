import Database from 'better-sqlite3';
import { Kind } from './types';

/**
 * Reads of ROOT/metadata.db opened read-only, for commands that run beside
 * the daemon or without it (mount, images, uninstall): they never change
 * what they read, and never migrate the schema.
 */
function withDb<T>(dbFile: string, fn: (db: Database.Database, has: (table: string) => boolean) => T): T {
  const db = new Database(dbFile, { readonly: true, fileMustExist: true });
  try {
    const has = (t: string) => db.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?").get(t) !== undefined;
    return fn(db, has);
  } finally {
    db.close();
  }
}

/** What a by-hand mount of layer `id` needs to know; null when it is not a converted layer. */
export function readLayerFacts(dbFile: string, id: number): { hasBlob: boolean; lazy: boolean; quarantined: string | null } | null {
  return withDb(dbFile, (db, has) => {
    if (!has('layers')) return null;
    const row = db.prepare('SELECT has_blob FROM layers WHERE snapshot_id = ?').get(id) as { has_blob: number } | undefined;
    if (!row) return null;
    const lazy = has('lazy_layers') && db.prepare('SELECT 1 FROM lazy_layers WHERE snapshot_id = ?').get(id) !== undefined;
    const q = has('quarantine') ? (db.prepare('SELECT reason FROM quarantine WHERE snapshot_id = ?').get(id) as { reason: string } | undefined) : undefined;
    return { hasBlob: row.has_blob === 1, lazy, quarantined: q?.reason ?? null };
  });
}

/** containerd's keys of the committed snapshots (`<namespace>/<txid>/<name>`). */
export function readCommittedKeys(dbFile: string): string[] {
  return withDb(dbFile, (db) => (db.prepare('SELECT key FROM snapshots WHERE kind = ?').all(Kind.Committed) as { key: string }[]).map((r) => r.key));
}
