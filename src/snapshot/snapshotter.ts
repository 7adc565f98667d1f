import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { internal } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import { silentLogger } from '../log/logger';
import { compileFilters } from './filters';
import { diskUsage, fsyncDir, removeAll } from './fsutil';
import { MetaStore, checkKey } from './storage';
import { type Info, Kind, type Labels, type Mount, type Snapshot, type Usage, kindName } from './types';

export interface SnapshotterOptions {
  root: string;
  logger?: Logger;
}

/** Directory names under snapshots/ that are not snapshot ids. */
const TEMP_PREFIX = 'new-';
const REMOVED_PREFIX = 'rm-';

/**
 * The snapshotter: containerd's snapshot lifecycle (Prepare/View → Commit →
 * Remove) over a MetaStore and plain directories, in the shape of
 * containerd's overlayfs snapshotter.
 *
 * Layout under root:
 *   metadata.db            SQLite (WAL), one row per snapshot
 *   snapshots/<id>/fs      the snapshot's upper directory (layer content)
 *   snapshots/<id>/work    overlayfs workdir of an active snapshot
 *
 * Directories are named by numeric id, never by key. Crash safety: a
 * snapshot's directory is built under a temporary name and renamed to its id
 * inside the transaction that creates its row; on Remove the row goes first
 * and the directory after. So a kill -9 anywhere leaves either the old or the
 * new state plus, at worst, a directory no row names, which Cleanup (and
 * start-up) deletes.
 */
export class Snapshotter {
  readonly root: string;
  readonly ms: MetaStore;
  private readonly log: Logger;
  private readonly snapshotsDir: string;
  private readonly overlayIndexOff: boolean;
  private closed = false;

  constructor(opts: SnapshotterOptions) {
    this.root = opts.root;
    this.log = opts.logger ?? silentLogger();
    fs.mkdirSync(this.root, { recursive: true, mode: 0o700 });
    this.snapshotsDir = path.join(this.root, 'snapshots');
    fs.mkdirSync(this.snapshotsDir, { recursive: true, mode: 0o700 });
    this.ms = new MetaStore(path.join(this.root, 'metadata.db'));
    // As containerd's overlayfs snapshotter: with index=on, overlayfs refuses
    // to reuse a lower layer mounted under another upper.
    this.overlayIndexOff = fs.existsSync('/sys/module/overlay/parameters/index');
  }

  private upperPath(id: string): string {
    return path.join(this.snapshotsDir, id, 'fs');
  }

  private workPath(id: string): string {
    return path.join(this.snapshotsDir, id, 'work');
  }

  private checkOpen(): void {
    if (this.closed) throw internal('snapshotter is closed');
  }

  async stat(key: string): Promise<Info> {
    this.checkOpen();
    return this.ms.getInfo(key).info;
  }

  async update(info: Pick<Info, 'name' | 'labels'>, fieldpaths: string[]): Promise<Info> {
    this.checkOpen();
    checkKey(info.name);
    return this.ms.transaction(() => this.ms.updateInfo(info, fieldpaths));
  }

  /** Usage of `key`: measured now for an active snapshot, recorded otherwise. */
  async usage(key: string): Promise<Usage> {
    this.checkOpen();
    const { id, info, usage } = this.ms.getInfo(key);
    if (info.kind !== Kind.Active) return usage;
    const measured = await diskUsage(this.upperPath(id));
    // A Remove or Commit may have run while the tree was walked: answer for
    // the snapshot only if the key still names it (NotFound once removed or
    // committed; a fresh snapshot under the same key is measured anew).
    if (this.ms.getInfo(key).id !== id) return this.usage(key);
    return measured;
  }

  async mounts(key: string): Promise<Mount[]> {
    this.checkOpen();
    return this.mountsFor(this.ms.getSnapshot(key));
  }

  async prepare(key: string, parent: string, labels?: Labels): Promise<Mount[]> {
    return this.createSnapshot(Kind.Active, key, parent, labels);
  }

  async view(key: string, parent: string, labels?: Labels): Promise<Mount[]> {
    return this.createSnapshot(Kind.View, key, parent, labels);
  }

  /**
   * Synchronous from the first directory to the row: no other call can run in
   * between, so Cleanup never sees a half-made snapshot as garbage.
   */
  private async createSnapshot(kind: Kind, key: string, parent: string, labels?: Labels): Promise<Mount[]> {
    this.checkOpen();
    checkKey(key);
    const started = Date.now();
    const tmp = path.join(this.snapshotsDir, `${TEMP_PREFIX}${crypto.randomBytes(8).toString('hex')}`);
    fs.mkdirSync(tmp, { mode: 0o700 });
    let snap: Snapshot;
    try {
      fs.mkdirSync(path.join(tmp, 'fs'), { mode: 0o755 });
      if (kind === Kind.Active) fs.mkdirSync(path.join(tmp, 'work'), { mode: 0o711 });
      snap = this.ms.transaction(() => {
        const s = this.ms.createSnapshot(kind, key, parent, labels);
        if (s.parentIds.length > 0) {
          // The new layer's root starts owned like its parent's (containerd does the same).
          const st = fs.lstatSync(this.upperPath(s.parentIds[0]));
          fs.lchownSync(path.join(tmp, 'fs'), st.uid, st.gid);
        }
        const dest = path.join(this.snapshotsDir, s.id);
        if (fs.existsSync(dest)) {
          // Left by a crash between a rename and its rolled-back transaction:
          // no row names it, so it is garbage; move it aside for Cleanup.
          fs.renameSync(dest, path.join(this.snapshotsDir, `${REMOVED_PREFIX}${s.id}-${crypto.randomBytes(4).toString('hex')}`));
        }
        fs.renameSync(tmp, dest);
        return s;
      });
    } catch (err) {
      fs.rmSync(tmp, { recursive: true, force: true });
      throw err;
    }
    fsyncDir(this.snapshotsDir);
    this.log.info(
      { op: kind === Kind.View ? 'view' : 'prepare', key, parent, snapshot: snap.id, duration_ms: Date.now() - started },
      `${kindName(kind)} snapshot created`,
    );
    return this.mountsFor(snap);
  }

  private mountsFor(s: Snapshot): Mount[] {
    if (s.parentIds.length === 0) {
      return [{ type: 'bind', source: this.upperPath(s.id), options: [s.kind === Kind.View ? 'ro' : 'rw', 'rbind'] }];
    }
    if (s.kind === Kind.View && s.parentIds.length === 1) {
      return [{ type: 'bind', source: this.upperPath(s.parentIds[0]), options: ['ro', 'rbind'] }];
    }
    const options: string[] = [];
    if (this.overlayIndexOff) options.push('index=off');
    if (s.kind === Kind.Active) {
      options.push(`workdir=${this.workPath(s.id)}`, `upperdir=${this.upperPath(s.id)}`);
    }
    options.push(`lowerdir=${s.parentIds.map((id) => this.upperPath(id)).join(':')}`);
    return [{ type: 'overlay', source: 'overlay', options }];
  }

  async commit(name: string, key: string, labels?: Labels): Promise<void> {
    this.checkOpen();
    checkKey(name, 'name');
    const started = Date.now();
    // Slow work (walking the layer) outside the transaction; the transaction
    // re-checks everything, so a concurrent Remove or Commit is detected.
    // Any kind: commitActive reports a taken name before a wrong kind, as containerd.
    const s = this.ms.getAny(key);
    const usage = s.kind === Kind.Active ? await diskUsage(this.upperPath(s.id)) : { size: 0, inodes: 0 };
    const id = this.ms.transaction(() => this.ms.commitActive(key, name, usage, labels));
    this.log.info(
      { op: 'commit', key, name, snapshot: id, size: usage.size, inodes: usage.inodes, duration_ms: Date.now() - started },
      'snapshot committed',
    );
  }

  async remove(key: string): Promise<void> {
    this.checkOpen();
    const { id, kind } = this.ms.transaction(() => this.ms.remove(key));
    // The row is gone; now the directory. If this fails or the process dies
    // here, the directory is unnamed and Cleanup removes it.
    const dir = path.join(this.snapshotsDir, id);
    const doomed = path.join(this.snapshotsDir, `${REMOVED_PREFIX}${id}`);
    try {
      fs.renameSync(dir, doomed);
      await removeAll(doomed);
    } catch (err) {
      this.log.warn({ op: 'remove', key, snapshot: id, err: (err as Error).message }, 'directory left for cleanup');
    }
    this.log.info({ op: 'remove', key, snapshot: id, kind: kindName(kind) }, 'snapshot removed');
  }

  /** Calls fn with each snapshot matching any of the filters. */
  async walk(fn: (info: Info) => void | Promise<void>, filters: readonly string[] = []): Promise<void> {
    this.checkOpen();
    const match = compileFilters(filters);
    const infos: Info[] = [];
    this.ms.walkInfo((info) => {
      if (match(info)) infos.push(info);
    });
    for (const info of infos) await fn(info);
  }

  /** Removes every directory under snapshots/ that no row names. */
  async cleanup(): Promise<string[]> {
    this.checkOpen();
    const ids = this.ms.idMap();
    // First, synchronously, move every unnamed entry aside under a unique
    // name: a Prepare that runs while the slow deletes below are under way
    // may reuse a rolled-back id, and must not lose its new directory.
    const doomed: string[] = [];
    for (const name of fs.readdirSync(this.snapshotsDir)) {
      if (ids.has(name)) continue;
      // In-flight temp dirs cannot exist here: createSnapshot is synchronous.
      const from = path.join(this.snapshotsDir, name);
      if (name.startsWith(REMOVED_PREFIX)) {
        doomed.push(from);
      } else {
        const to = path.join(this.snapshotsDir, `${REMOVED_PREFIX}${name}-${crypto.randomBytes(4).toString('hex')}`);
        fs.renameSync(from, to);
        doomed.push(to);
      }
    }
    for (const p of doomed) await removeAll(p);
    const removed = doomed.map((p) => path.basename(p));
    if (removed.length > 0) this.log.info({ op: 'cleanup', removed: removed.length }, 'removed unreferenced directories');
    return removed;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.ms.close();
  }
}

