import crypto from 'node:crypto';
import path from 'node:path';

/**
 * Where everything lives under ROOT. Directories are named by a snapshot's
 * numeric id, never by its key (keys come from outside):
 *
 *   metadata.db            SQLite (WAL): snapshots, layers, chunk index
 *   snapshots/<id>/fs      a snapshot's upper directory (layer content)
 *   snapshots/<id>/work    overlayfs workdir of an active snapshot
 *   images/<id>.erofs      a converted committed layer
 *   mnt/<id>               where that image is mounted, read-only
 *   store/                 the chunk data every image reads (chunks.blob, segments/)
 *   lazy/<id>.erofs|.blob  a lazy layer's image and its on-demand data
 *   tmp/                   work files of conversions and imports (emptied at start)
 *   cache/                 only what can be fetched again (fscache's cache)
 */
export class RootLayout {
  /** Prefix of a snapshot directory being built (renamed to its id with its row). */
  static readonly TEMP_PREFIX = 'new-';
  /** Prefix of a snapshot directory being deleted (its row is gone). */
  static readonly REMOVED_PREFIX = 'rm-';

  readonly snapshots: string;
  readonly mntDir: string;
  readonly imagesDir: string;
  readonly tmpDir: string;
  readonly lazyDir: string;
  readonly metadataDb: string;

  constructor(readonly root: string) {
    this.snapshots = path.join(root, 'snapshots');
    this.mntDir = path.join(root, 'mnt');
    this.imagesDir = path.join(root, 'images');
    this.tmpDir = path.join(root, 'tmp');
    this.lazyDir = path.join(root, 'lazy');
    this.metadataDb = path.join(root, 'metadata.db');
  }

  snapshotDir(id: string): string {
    return path.join(this.snapshots, id);
  }

  upper(id: string): string {
    return path.join(this.snapshots, id, 'fs');
  }

  work(id: string): string {
    return path.join(this.snapshots, id, 'work');
  }

  mnt(id: string): string {
    return path.join(this.mntDir, id);
  }

  /** The EROFS image of converted layer `id`. */
  image(id: string): string {
    return path.join(this.imagesDir, `${id}.erofs`);
  }

  /** A fresh name under snapshots/ for a directory being built. */
  newSnapshotDir(): string {
    return path.join(this.snapshots, `${RootLayout.TEMP_PREFIX}${crypto.randomBytes(8).toString('hex')}`);
  }

  /** A name under snapshots/ to move snapshot `name`'s directory to before deleting it (unique unless `plain`). */
  removedDir(name: string, plain = false): string {
    return path.join(this.snapshots, plain ? `${RootLayout.REMOVED_PREFIX}${name}` : `${RootLayout.REMOVED_PREFIX}${name}-${crypto.randomBytes(4).toString('hex')}`);
  }
}
