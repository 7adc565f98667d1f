import crypto from 'node:crypto';
import type Database from 'better-sqlite3';
import { type ChunkRow, type ChunkStore, STORE_BLOCK } from './chunkstore';

/**
 * Reading chunks back and checking them against their digests: at start
 * when the store file may have been touched while no daemon watched it (see
 * ChunkStore.stampMatches), by the background scrub at a set pace, and by
 * `dedup-snapshotter fsck`. Without fs-verity the daemon is what notices
 * damage; in a sealed segment the kernel fails the read with EIO, counted
 * as damage too. A chunk found wrong is marked bad and the layers that
 * reference it are quarantined by the caller.
 */

export interface VerifyProgress {
  checked: number;
  total: number;
  bytes: number;
  bad: number;
}

export interface VerifyOptions {
  /** Only these chunks (ids); default every chunk. */
  ids?: number[];
  /** Pace in MiB/s (0 or absent: as fast as the disk reads). */
  mbps?: number;
  /** Called about once a second, and at the end. */
  onProgress?: (p: VerifyProgress) => void;
  /** Stops early (what was checked so far is kept). */
  signal?: AbortSignal;
}

export interface VerifyResult extends VerifyProgress {
  /** Chunks newly found bad. */
  newlyBad: number[];
  /** Chunks that were bad and whose bytes match their digest again (the file was put back). */
  restored: number[];
}

const BATCH = 256;

export async function verifyChunks(store: ChunkStore, db: Database.Database, o: VerifyOptions = {}): Promise<VerifyResult> {
  const total = o.ids ? o.ids.length : (db.prepare('SELECT count(*) AS n FROM chunks').get() as { n: number }).n;
  const res: VerifyResult = { checked: 0, total, bytes: 0, bad: 0, newlyBad: [], restored: [] };
  const started = Date.now();
  let lastReport = started;
  const byId = db.prepare('SELECT * FROM chunks WHERE id = ?');
  const page = db.prepare('SELECT * FROM chunks WHERE id > ? ORDER BY id LIMIT ?');
  const isBad = db.prepare('SELECT 1 FROM bad_chunks WHERE chunk_id = ?');
  let after = 0;
  let idx = 0;
  const nextBatch = (): ChunkRow[] => {
    if (o.ids) {
      const out: ChunkRow[] = [];
      while (out.length < BATCH && idx < o.ids.length) {
        const row = byId.get(o.ids[idx++]) as ChunkRow | undefined;
        if (row) out.push(row);
      }
      return out;
    }
    const rows = page.all(after, BATCH) as ChunkRow[];
    if (rows.length > 0) after = rows[rows.length - 1].id;
    return rows;
  };
  for (let rows = nextBatch(); rows.length > 0; rows = nextBatch()) {
    for (const row of rows) {
      if (o.signal?.aborted) return res;
      // Removed since its page was read (its layer went): not checked. Pinned while read: a removal meanwhile
      // would free its blocks (read back as zeros, or its segment gone) and its id (reused by a new chunk).
      if (!store.holdRow(row)) {
        res.total--;
        continue;
      }
      try {
        let ok: boolean;
        try {
          const buf = await store.read(row);
          ok = crypto.createHash('sha256').update(buf).digest('hex') === row.digest;
        } catch (err) {
          // EIO from a sealed segment (the kernel found its bytes damaged), or its file gone.
          const code = (err as NodeJS.ErrnoException).code;
          if (code !== 'EIO' && code !== 'ENOENT' && code !== 'EBADMSG') throw err;
          ok = false;
        }
        res.checked++;
        res.bytes += row.nblocks * STORE_BLOCK;
        const wasBad = isBad.get(row.id) !== undefined;
        if (!ok) {
          res.bad++;
          if (!wasBad && store.markBad([row.id], 'its bytes do not match its digest') > 0) res.newlyBad.push(row.id);
        } else if (wasBad) {
          store.markGood([row.id]);
          res.restored.push(row.id);
        }
      } finally {
        store.unpin(row.id);
      }
      if (o.mbps && o.mbps > 0) {
        // Behind schedule → go on; ahead → wait until the pace allows the bytes read so far.
        const due = started + (res.bytes / (o.mbps * 1024 * 1024)) * 1000;
        const wait = due - Date.now();
        if (wait > 5) await new Promise((r) => setTimeout(r, Math.min(wait, 1000)));
      }
      if (Date.now() - lastReport >= 1000) {
        lastReport = Date.now();
        o.onProgress?.({ checked: res.checked, total: res.total, bytes: res.bytes, bad: res.bad });
      }
    }
  }
  o.onProgress?.({ checked: res.checked, total: res.total, bytes: res.bytes, bad: res.bad });
  return res;
}
