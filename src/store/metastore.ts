import Database from 'better-sqlite3';
import {
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  notFound,
} from '../errdefs/errors';
import { validateLabels } from './labels';
import { prepared } from './prepared';
import { type Info, Kind, type Labels, type Snapshot, type Usage } from './types';

/**
 * The snapshot metadata store: plain synchronous operations on SQLite (WAL),
 * modelled on containerd's core/snapshots/storage. It only touches the
 * database; the snapshotter does the filesystem work around its
 * transactions. Every key and label is bound as an SQL parameter, never
 * spliced into SQL text.
 */

export const MAX_KEY_SIZE = 4096;

const SCHEMA_VERSION = 4;

interface Row {
  id: number;
  key: string;
  parent_id: number | null;
  kind: number;
  labels: string;
  created_ms: number;
  updated_ms: number;
  size: number;
  inodes: number;
}

/** A layer whose data is loaded on demand from a dedup image (header: its LayerHeader as JSON). */
export interface QuarantineRow {
  snapshot_id: number;
  reason: string;
  since_ms: number;
}

export interface LazyLayerRow {
  snapshot_id: number;
  image_ref: string;
  manifest_digest: string;
  layer_digest: string;
  header: string;
  created_ms: number;
}

export interface LayerRow {
  snapshot_id: number;
  format: 'erofs';
  has_blob: number;
  files: number;
  logical_bytes: number;
  image_bytes: number;
  chunks: number;
  new_chunks: number;
  new_bytes: number;
  convert_ms: number;
  created_ms: number;
}

export class MetaStore {
  readonly db: Database.Database;

  constructor(readonly file: string) {
    this.db = new Database(file);
    try {
      this.db.pragma('journal_mode = WAL');
      // FULL: a commit containerd has seen acknowledged survives power loss, not
      // only a killed process.
      this.db.pragma('synchronous = FULL');
      this.db.pragma('foreign_keys = ON');
      this.db.pragma('busy_timeout = 5000');
      this.migrate();
    } catch (err) {
      // E.g. a full disk (no room for the WAL's shared-memory file): the caller may try again.
      this.db.close();
      throw err;
    }
  }

  private migrate(): void {
    const version = this.db.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) {
      throw new Error(
        `${this.file} has schema version ${version}, newer than this daemon understands (${SCHEMA_VERSION})`,
      );
    }
    if (version === SCHEMA_VERSION) return;
    this.db.exec(`
      BEGIN;
      CREATE TABLE IF NOT EXISTS snapshots (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        key         TEXT    NOT NULL UNIQUE,
        parent_id   INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
        kind        INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
        labels      TEXT    NOT NULL DEFAULT '{}',
        created_ms  INTEGER NOT NULL,
        updated_ms  INTEGER NOT NULL,
        size        INTEGER NOT NULL DEFAULT 0,
        inodes      INTEGER NOT NULL DEFAULT 0
      );
      CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
      -- v2: committed layers converted to EROFS images (images/<id>.erofs).
      CREATE TABLE IF NOT EXISTS layers (
        snapshot_id    INTEGER PRIMARY KEY REFERENCES snapshots(id),
        format         TEXT    NOT NULL,
        has_blob       INTEGER NOT NULL,
        files          INTEGER NOT NULL,
        logical_bytes  INTEGER NOT NULL,
        image_bytes    INTEGER NOT NULL,
        chunks         INTEGER NOT NULL,
        new_chunks     INTEGER NOT NULL,
        new_bytes      INTEGER NOT NULL,
        convert_ms     INTEGER NOT NULL,
        created_ms     INTEGER NOT NULL
      );
      -- v3: layers whose data is loaded on demand (device lazy/<id>.blob)
      -- from a dedup image: where to fetch from, and its chunk table.
      CREATE TABLE IF NOT EXISTS lazy_layers (
        snapshot_id      INTEGER PRIMARY KEY REFERENCES snapshots(id),
        image_ref        TEXT    NOT NULL,
        manifest_digest  TEXT    NOT NULL,
        layer_digest     TEXT    NOT NULL,
        header           TEXT    NOT NULL,
        created_ms       INTEGER NOT NULL
      );
      -- v4: what each layer image should hash to (checked before it is
      -- mounted at start), and layers not served because their image or
      -- their chunks are damaged (see layers/integrity.ts).
      CREATE TABLE IF NOT EXISTS layer_images (
        snapshot_id  INTEGER PRIMARY KEY REFERENCES snapshots(id),
        sha256       TEXT    NOT NULL,
        -- inode:size:ctime of the file when it last hashed right (NULL: hash it)
        stamp        TEXT
      );
      -- Layers made from a dedup image's layer: where their chunks can be
      -- fetched again (kept after a lazy layer settles; fsck repairs from it).
      CREATE TABLE IF NOT EXISTS remote_sources (
        snapshot_id      INTEGER PRIMARY KEY REFERENCES snapshots(id),
        image_ref        TEXT    NOT NULL,
        manifest_digest  TEXT    NOT NULL,
        layer_digest     TEXT    NOT NULL,
        header           TEXT    NOT NULL
      );
      CREATE TABLE IF NOT EXISTS quarantine (
        snapshot_id  INTEGER PRIMARY KEY REFERENCES snapshots(id),
        reason       TEXT    NOT NULL,
        since_ms     INTEGER NOT NULL
      );
      PRAGMA user_version = ${SCHEMA_VERSION};
      COMMIT;
    `);
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  /**
   * Runs fn in one transaction: all of it commits or none of it does. Nested
   * calls become savepoints. fn must be synchronous.
   */
  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  private rowByKey(key: string): Row | undefined {
    return prepared(this.db, 'SELECT * FROM snapshots WHERE key = ?').get(key) as Row | undefined;
  }

  private rowById(id: number): Row | undefined {
    return prepared(this.db, 'SELECT * FROM snapshots WHERE id = ?').get(id) as Row | undefined;
  }

  private mustGet(key: string): Row {
    checkKey(key);
    const row = this.rowByKey(key);
    if (!row) throw notFound(`snapshot ${JSON.stringify(key)} does not exist`);
    return row;
  }

  private parentIds(row: Row): string[] {
    const ids: string[] = [];
    let pid = row.parent_id;
    while (pid !== null) {
      ids.push(String(pid));
      const p = this.rowById(pid);
      if (!p) throw new Error(`metadata corrupt: snapshot ${row.id} names missing parent ${pid}`);
      pid = p.parent_id;
    }
    return ids;
  }

  private toInfo(row: Row): Info {
    const parent = row.parent_id === null ? '' : (this.rowById(row.parent_id)?.key ?? '');
    return {
      name: row.key,
      parent,
      kind: row.kind as Kind,
      labels: JSON.parse(row.labels) as Labels,
      created: row.created_ms,
      updated: row.updated_ms,
    };
  }

  has(key: string): boolean {
    return this.rowByKey(key) !== undefined;
  }

  /** Id, info and usage of any snapshot. NotFound if the key is unknown. */
  getInfo(key: string): { id: string; info: Info; usage: Usage } {
    const row = this.mustGet(key);
    return { id: String(row.id), info: this.toInfo(row), usage: { size: row.size, inodes: row.inodes } };
  }

  /** The active or view snapshot `key`; FailedPrecondition if committed. */
  getSnapshot(key: string): Snapshot {
    const row = this.mustGet(key);
    if (row.kind !== Kind.Active && row.kind !== Kind.View) {
      throw failedPrecondition(`snapshot ${JSON.stringify(key)} is not active or a view`);
    }
    return { id: String(row.id), kind: row.kind as Kind, parentIds: this.parentIds(row) };
  }

  /** Like getSnapshot, for a snapshot of any kind. */
  getAny(key: string): Snapshot {
    const row = this.mustGet(key);
    return { id: String(row.id), kind: row.kind as Kind, parentIds: this.parentIds(row) };
  }

  /** Calls fn for each snapshot (its info and id), in id order. */
  walkInfo(fn: (info: Info, id: string) => void): void {
    const rows = prepared(this.db, 'SELECT * FROM snapshots ORDER BY id').all() as Row[];
    for (const row of rows) fn(this.toInfo(row), String(row.id));
  }

  createSnapshot(kind: Kind, key: string, parent: string, labels?: Labels): Snapshot {
    if (kind !== Kind.Active && kind !== Kind.View) {
      throw invalidArgument(`snapshot type ${kind} invalid; only active and view can be created`);
    }
    checkKey(key);
    const checked = validateLabels(labels);
    let parentRow: Row | undefined;
    if (parent !== '') {
      checkKey(parent, 'parent');
      parentRow = this.rowByKey(parent);
      if (!parentRow) throw notFound(`missing parent ${JSON.stringify(parent)}`);
      if (parentRow.kind !== Kind.Committed) {
        throw invalidArgument(`parent ${JSON.stringify(parent)} is not a committed snapshot`);
      }
    }
    if (this.rowByKey(key)) throw alreadyExists(`snapshot ${JSON.stringify(key)} already exists`);
    const now = Date.now();
    const res = prepared(
      this.db,
      'INSERT INTO snapshots (key, parent_id, kind, labels, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?)',
    ).run(key, parentRow ? parentRow.id : null, kind, JSON.stringify(checked), now, now);
    const id = Number(res.lastInsertRowid);
    const row = this.rowById(id) as Row;
    return { id: String(id), kind, parentIds: this.parentIds(row) };
  }

  /**
   * Turns active snapshot `key` into committed snapshot `name`, keeping its
   * id (its directory does not move). The committed snapshot's labels are
   * exactly `labels`, as in containerd. A non-empty `newParent` rebases it
   * onto that committed snapshot (containerd 2.x `WithParent` on commit).
   */
  commitActive(key: string, name: string, usage: Usage, labels?: Labels, newParent = ''): string {
    checkKey(name, 'name');
    const checked = validateLabels(labels);
    const row = this.mustGet(key);
    if (this.rowByKey(name)) throw alreadyExists(`snapshot ${JSON.stringify(name)} already exists`);
    if (row.kind !== Kind.Active) {
      throw failedPrecondition(`snapshot ${JSON.stringify(key)} is not active`);
    }
    let parentId = row.parent_id;
    if (newParent !== '') {
      const p = this.rowByKey(newParent);
      if (!p) throw notFound(`missing parent ${JSON.stringify(newParent)}`);
      if (p.kind !== Kind.Committed) {
        throw invalidArgument(`parent ${JSON.stringify(newParent)} is not a committed snapshot`);
      }
      parentId = p.id;
    }
    const now = Date.now();
    prepared(
      this.db,
      'UPDATE snapshots SET key = ?, kind = ?, parent_id = ?, labels = ?, created_ms = ?, updated_ms = ?, size = ?, inodes = ? WHERE id = ?',
    ).run(name, Kind.Committed, parentId, JSON.stringify(checked), now, now, usage.size, usage.inodes, row.id);
    return String(row.id);
  }

  /**
   * Copies the WAL into the database file (a passive checkpoint). Returns
   * true when all of a non-empty WAL was copied: the next write transaction
   * then starts the WAL over, in the space it already takes, instead of
   * growing it (what a delete on a full disk needs). Never throws: on a full
   * disk the checkpoint itself may fail (the database file would grow).
   */
  checkpoint(): boolean {
    try {
      const [r] = this.db.pragma('wal_checkpoint(PASSIVE)') as { busy: number; log: number; checkpointed: number }[];
      return r.busy === 0 && r.log > 0 && r.checkpointed === r.log;
    } catch {
      return false;
    }
  }

  /** Deletes the row of `key`; FailedPrecondition while it has children. */
  remove(key: string): { id: string; kind: Kind; layer: boolean } {
    const row = this.mustGet(key);
    const child = prepared(this.db, 'SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1').get(row.id) as
      | { key: string }
      | undefined;
    if (child) {
      throw failedPrecondition(
        `cannot remove snapshot ${JSON.stringify(key)}: snapshot ${JSON.stringify(child.key)} depends on it`,
      );
    }
    const layer = prepared(this.db, 'DELETE FROM layers WHERE snapshot_id = ?').run(row.id).changes > 0;
    prepared(this.db, 'DELETE FROM lazy_layers WHERE snapshot_id = ?').run(row.id);
    prepared(this.db, 'DELETE FROM layer_images WHERE snapshot_id = ?').run(row.id);
    prepared(this.db, 'DELETE FROM quarantine WHERE snapshot_id = ?').run(row.id);
    prepared(this.db, 'DELETE FROM remote_sources WHERE snapshot_id = ?').run(row.id);
    prepared(this.db, 'DELETE FROM snapshots WHERE id = ?').run(row.id);
    return { id: String(row.id), kind: row.kind as Kind, layer };
  }

  /**
   * Updates labels. fieldpaths as containerd's: empty means "all labels";
   * `labels` replaces them; `labels.<k>` sets or (when absent from
   * info.labels) deletes one. Anything else is InvalidArgument.
   */
  updateInfo(info: Pick<Info, 'name' | 'labels'>, fieldpaths: string[]): Info {
    const row = this.mustGet(info.name);
    const incoming = info.labels ?? {};
    let labels: Labels = JSON.parse(row.labels) as Labels;
    if (fieldpaths.length === 0) {
      labels = { ...incoming };
    } else {
      for (const path of fieldpaths) {
        if (path === 'labels') {
          labels = { ...incoming };
        } else if (path.startsWith('labels.') && path.length > 'labels.'.length) {
          const k = path.slice('labels.'.length);
          if (Object.prototype.hasOwnProperty.call(incoming, k)) labels[k] = incoming[k];
          else delete labels[k];
        } else {
          throw invalidArgument(
            `cannot update ${JSON.stringify(path)} field on snapshot ${JSON.stringify(info.name)}: only "labels" and "labels.<key>" can be updated`,
          );
        }
      }
    }
    labels = validateLabels(labels);
    const now = Date.now();
    prepared(this.db, 'UPDATE snapshots SET labels = ?, updated_ms = ? WHERE id = ?').run(JSON.stringify(labels), now, row.id);
    return this.toInfo(this.rowById(row.id) as Row);
  }

  /** Records measured usage (for active snapshots, refreshed on demand). */
  setUsage(id: string, usage: Usage): void {
    prepared(this.db, 'UPDATE snapshots SET size = ?, inodes = ? WHERE id = ?').run(usage.size, usage.inodes, Number(id));
  }

  /** In a transaction: records that snapshot `id` is now an EROFS layer image. */
  addLayer(id: string, l: Omit<LayerRow, 'snapshot_id' | 'created_ms'>): void {
    prepared(
      this.db,
      `INSERT INTO layers (snapshot_id, format, has_blob, files, logical_bytes, image_bytes, chunks, new_chunks, new_bytes, convert_ms, created_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    ).run(Number(id), l.format, l.has_blob, l.files, l.logical_bytes, l.image_bytes, l.chunks, l.new_chunks, l.new_bytes, l.convert_ms, Date.now());
  }

  /** In a transaction: records that layer `id` loads its data on demand. */
  addLazyLayer(id: string, l: Omit<LazyLayerRow, 'snapshot_id' | 'created_ms'>): void {
    prepared(this.db, 'INSERT INTO lazy_layers (snapshot_id, image_ref, manifest_digest, layer_digest, header, created_ms) VALUES (?, ?, ?, ?, ?, ?)').run(Number(id), l.image_ref, l.manifest_digest, l.layer_digest, l.header, Date.now());
  }

  /**
   * In a transaction: lazy layer `id` was settled into the chunk store (its
   * image now addresses the store): it no longer loads on demand, and its
   * layer row takes the figures of the import.
   */
  settleLazyLayer(id: string, l: Pick<LayerRow, 'image_bytes' | 'chunks' | 'new_chunks' | 'new_bytes'>): void {
    const n = Number(id);
    if (prepared(this.db, 'DELETE FROM lazy_layers WHERE snapshot_id = ?').run(n).changes !== 1) throw new Error(`layer ${id} is not a lazy layer`);
    prepared(this.db, 'UPDATE layers SET image_bytes = ?, chunks = ?, new_chunks = ?, new_bytes = ? WHERE snapshot_id = ?').run(l.image_bytes, l.chunks, l.new_chunks, l.new_bytes, n);
  }

  /** Snapshot `id` and every snapshot stacked on it (children, theirs, …): key and labels, for naming the images a layer serves. */
  withDescendants(id: string): { id: string; key: string; labels: Labels; kind: Kind }[] {
    const rows = prepared(
      this.db,
      `WITH RECURSIVE d(id) AS (SELECT ? UNION SELECT s.id FROM snapshots s JOIN d ON s.parent_id = d.id)
         SELECT s.id, s.key, s.labels, s.kind FROM snapshots s JOIN d ON s.id = d.id ORDER BY s.id`,
    ).all(Number(id)) as { id: number; key: string; labels: string; kind: number }[];
    return rows.map((r) => ({ id: String(r.id), key: r.key, labels: JSON.parse(r.labels) as Labels, kind: r.kind as Kind }));
  }

  /** In a transaction: layer `id` was made from a dedup image's layer, which can provide its chunks again. */
  addRemoteSource(id: string, l: Omit<LazyLayerRow, 'snapshot_id' | 'created_ms'>): void {
    prepared(this.db, 'INSERT OR REPLACE INTO remote_sources (snapshot_id, image_ref, manifest_digest, layer_digest, header) VALUES (?, ?, ?, ?, ?)').run(Number(id), l.image_ref, l.manifest_digest, l.layer_digest, l.header);
  }

  /** Remote sources of the layers that reference chunk `chunkId`. */
  remoteSourcesOfChunk(chunkId: number): Omit<LazyLayerRow, 'created_ms'>[] {
    return prepared(this.db, 'SELECT rs.* FROM remote_sources rs JOIN layer_chunks lc ON lc.snapshot_id = rs.snapshot_id WHERE lc.chunk_id = ?').all(chunkId) as Omit<LazyLayerRow, 'created_ms'>[];
  }

  /** In a transaction (or alone): the SHA-256 layer `id`'s image file should have. */
  setImageDigest(id: string, sha256: string): void {
    prepared(this.db, 'INSERT INTO layer_images (snapshot_id, sha256, stamp) VALUES (?, ?, NULL) ON CONFLICT(snapshot_id) DO UPDATE SET sha256 = excluded.sha256, stamp = NULL').run(Number(id), sha256);
  }

  imageDigest(id: string): { sha256: string; stamp: string | null } | undefined {
    return prepared(this.db, 'SELECT sha256, stamp FROM layer_images WHERE snapshot_id = ?').get(Number(id)) as { sha256: string; stamp: string | null } | undefined;
  }

  /** Layer `id`'s image hashed right while its file looked like `stamp`. */
  setImageStamp(id: string, stamp: string): void {
    prepared(this.db, 'UPDATE layer_images SET stamp = ? WHERE snapshot_id = ?').run(stamp, Number(id));
  }

  /** Layer `id` is not served: its image or its chunks are damaged. Returns false if it was quarantined already. */
  quarantine(id: string, reason: string): boolean {
    return prepared(this.db, 'INSERT OR IGNORE INTO quarantine (snapshot_id, reason, since_ms) VALUES (?, ?, ?)').run(Number(id), reason, Date.now()).changes > 0;
  }

  release(id: string): void {
    prepared(this.db, 'DELETE FROM quarantine WHERE snapshot_id = ?').run(Number(id));
  }

  quarantined(): QuarantineRow[] {
    return prepared(this.db, 'SELECT * FROM quarantine ORDER BY snapshot_id').all() as QuarantineRow[];
  }

  quarantineOf(id: string): QuarantineRow | undefined {
    return prepared(this.db, 'SELECT * FROM quarantine WHERE snapshot_id = ?').get(Number(id)) as QuarantineRow | undefined;
  }

  lazyLayers(): LazyLayerRow[] {
    return prepared(this.db, 'SELECT * FROM lazy_layers ORDER BY snapshot_id').all() as LazyLayerRow[];
  }

  /** The image a lazy layer (or one made from a dedup image) came from, if any. */
  remoteImageOf(id: string): string | undefined {
    // lazy_layers too: lazy layers made before remote_sources existed have only that row.
    const q = 'SELECT image_ref FROM remote_sources WHERE snapshot_id = ? UNION ALL SELECT image_ref FROM lazy_layers WHERE snapshot_id = ? LIMIT 1';
    return (prepared(this.db, q).get(Number(id), Number(id)) as { image_ref: string } | undefined)?.image_ref;
  }

  isLazy(id: string): boolean {
    return prepared(this.db, 'SELECT 1 FROM lazy_layers WHERE snapshot_id = ?').get(Number(id)) !== undefined;
  }

  getLayer(id: string): LayerRow | undefined {
    return prepared(this.db, 'SELECT * FROM layers WHERE snapshot_id = ?').get(Number(id)) as LayerRow | undefined;
  }

  /** The key of snapshot `id`, or undefined once it is gone. */
  keyOf(id: string): string | undefined {
    return (prepared(this.db, 'SELECT key FROM snapshots WHERE id = ?').get(Number(id)) as { key: string } | undefined)?.key;
  }

  /** Ids of committed snapshots that are not EROFS layers (yet), oldest first. */
  committedWithoutLayer(): string[] {
    const rows = prepared(this.db, 'SELECT s.id FROM snapshots s LEFT JOIN layers l ON l.snapshot_id = s.id WHERE s.kind = ? AND l.snapshot_id IS NULL ORDER BY s.id').all(Kind.Committed) as { id: number }[];
    return rows.map((r) => String(r.id));
  }

  layers(): LayerRow[] {
    return prepared(this.db, 'SELECT * FROM layers ORDER BY snapshot_id').all() as LayerRow[];
  }

  /** id → key for every snapshot: what Cleanup keeps. */
  idMap(): Map<string, string> {
    const rows = prepared(this.db, 'SELECT id, key FROM snapshots').all() as { id: number; key: string }[];
    return new Map(rows.map((r) => [String(r.id), r.key]));
  }

  counts(): Record<'active' | 'view' | 'committed', number> {
    const rows = prepared(this.db, 'SELECT kind, count(*) AS n FROM snapshots GROUP BY kind').all() as {
      kind: number;
      n: number;
    }[];
    const out = { active: 0, view: 0, committed: 0 };
    for (const r of rows) {
      if (r.kind === Kind.Active) out.active = r.n;
      else if (r.kind === Kind.View) out.view = r.n;
      else if (r.kind === Kind.Committed) out.committed = r.n;
    }
    return out;
  }
}

export function checkKey(key: unknown, what = 'key'): asserts key is string {
  if (typeof key !== 'string' || key === '') throw invalidArgument(`snapshot ${what} must not be empty`);
  if (Buffer.byteLength(key) > MAX_KEY_SIZE) {
    throw invalidArgument(`snapshot ${what} is ${Buffer.byteLength(key)} bytes, over the ${MAX_KEY_SIZE}-byte limit`);
  }
  if (key.includes('\0')) throw invalidArgument(`snapshot ${what} must not contain NUL bytes`);
}
