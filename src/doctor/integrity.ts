import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import type { CheckResult } from './types';

const BLOCK = 4096;

/**
 * Whether the chunk store and the layers on it can be served: the store
 * file is where the index says chunks are (present, long enough), and the
 * daemon has quarantined no layer (damaged image or chunks). Read from
 * ROOT/metadata.db, read-only: the doctor never changes what it checks.
 */
export function checkIntegrity(root: string): CheckResult {
  const name = 'integrity';
  const dbFile = path.join(root, 'metadata.db');
  if (!fs.existsSync(dbFile)) return { name, status: 'ok', detail: `no ${dbFile} yet (the daemon has not run)` };
  let db: Database.Database;
  try {
    db = new Database(dbFile, { readonly: true, fileMustExist: true });
  } catch (err) {
    return { name, status: 'skip', detail: `cannot open ${dbFile}: ${(err as Error).message}`, fix: 'run the doctor as root' };
  }
  try {
    const has = (t: string) => db.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?").get(t) !== undefined;
    if (!has('chunks')) return { name, status: 'ok', detail: 'no chunk store yet' };
    const segmented = (db.prepare("SELECT name FROM pragma_table_info('chunks')").all() as { name: string }[]).some((c) => c.name === 'segment');
    const { end } = db.prepare(`SELECT coalesce(max(blkaddr + nblocks), 0) AS end FROM chunks${segmented ? ' WHERE segment = 0' : ''}`).get() as { end: number };
    const { n } = db.prepare('SELECT count(*) AS n FROM chunks').get() as { n: number };
    const store = path.join(root, 'store', 'chunks.blob');
    const old = path.join(root, 'cache', 'chunks.blob');
    const problems: string[] = [];
    let size: number | null = null;
    try {
      size = fs.statSync(store).size;
    } catch {
      if (!fs.existsSync(old) && n > 0) problems.push(`${store} is missing although ${n} chunks are stored in it`);
    }
    if (size !== null && size < end * BLOCK) problems.push(`${store} is ${size} bytes, shorter than the ${end * BLOCK} its chunks need`);
    // Sealed segments (store/segments/<id>.blob): each present and as long as its row says.
    const segments = has('segments') ? (db.prepare('SELECT id, blocks FROM segments ORDER BY id').all() as { id: number; blocks: number }[]) : [];
    const short: string[] = [];
    for (const seg of segments) {
      const file = path.join(root, 'store', 'segments', `${seg.id}.blob`);
      let len = -1;
      try {
        len = fs.statSync(file).size;
      } catch {
        // missing
      }
      if (len < seg.blocks * BLOCK) short.push(len < 0 ? `${file} is missing` : `${file} is ${len} bytes, shorter than ${seg.blocks * BLOCK}`);
    }
    if (short.length > 0) problems.push(`${short.length} store segments are lost: ${short.slice(0, 3).join('; ')}${short.length > 3 ? '; …' : ''}`);
    const bad = has('bad_chunks') ? (db.prepare('SELECT count(*) AS n FROM bad_chunks').get() as { n: number }).n : 0;
    if (bad > 0) problems.push(`${bad} chunks are lost or damaged`);
    const q = has('quarantine') ? (db.prepare('SELECT snapshot_id, reason FROM quarantine ORDER BY snapshot_id').all() as { snapshot_id: number; reason: string }[]) : [];
    if (q.length > 0) problems.push(`${q.length} layers are quarantined (not served): ${q.slice(0, 5).map((r) => `layer ${r.snapshot_id}: ${r.reason}`).join('; ')}${q.length > 5 ? '; …' : ''}`);
    if (problems.length > 0) {
      return {
        name,
        status: 'fail',
        detail: problems.join('; '),
        fix: 'dedup-snapshotter fsck lists the images to remove and pull again (and --drop-broken removes their snapshots); containers on those layers cannot start until then',
      };
    }
    return { name, status: 'ok', detail: `${n} chunks indexed in ${store}${segments.length > 0 ? ` and ${segments.length} sealed segments` : ''}, all in place, no layer quarantined` };
  } finally {
    db.close();
  }
}
