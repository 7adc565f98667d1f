import fs from 'node:fs';
import path from 'node:path';
import { REMOTE_IMPORT_PREFIX } from '../layers/remote-import';
import type { LayerHeader } from '../remote/dedup-image';
import { parseReference } from '../remote/reference';
import { isDiskFull } from '../store/reserve';
import { Kind } from '../store/types';
import { readdirOrEmpty, removeAll } from '../util/fs';
import type { LayerParts } from './compose';

/**
 * Start-up recovery, before serving: every EROFS layer mounted again,
 * leftovers of interrupted work removed (mounts and images no row names,
 * directories of converted layers, temporary snapshots of remote imports),
 * committed layers not converted yet queued, and the chunk store checked.
 * `remove` is the snapshotter's Remove.
 */
export async function recoverLayers(parts: LayerParts, remove: (key: string) => Promise<void>): Promise<void> {
  const { ms, reserve, layout, mounts, sweeper, kernel, logger: log } = parts;
  const e = parts.erofs;
  // A start on a full disk: recovery's metadata writes get a slice of the reserve.
  reserve.makeRoom('start-up recovery');
  const layers = ms.layers();
  if (layers.length > 0 && !e) {
    throw new Error(`${layers.length} layers are EROFS images but use_erofs is false; set use_erofs to true`);
  }
  const live = new Set(layers.map((l) => String(l.snapshot_id)));
  const mounted = new Set(kernel.mountPoints());
  const lazy = ms.lazyLayers();
  const loader = e?.loader ?? null;
  if (lazy.length > 0 && !loader) {
    throw new Error(`${lazy.length} layers load their data on demand, but on-demand loading is off: set ondemand.backend to "auto" or "fanotify" (Linux >= 6.14)`);
  }
  await loader?.start(
    lazy.map((r) => ({
      id: String(r.snapshot_id),
      header: JSON.parse(r.header) as LayerHeader,
      rl: { repo: parseReference(r.image_ref), manifestDigest: r.manifest_digest, layerDigest: r.layer_digest },
    })),
  );
  const lazyIds = new Set(lazy.map((r) => String(r.snapshot_id)));
  // Damaged images and chunks are found before anything is mounted from them.
  await e?.integrity.checkAtStart(layers.map((l) => String(l.snapshot_id)));
  let remounted = 0;
  for (const layer of layers) {
    const id = String(layer.snapshot_id);
    const integrity = e?.integrity;
    if (integrity?.isQuarantined(id)) {
      if (mounted.has(mounts.path(id))) mounts.unmount(id);
      if (fs.existsSync(layout.snapshotDir(id))) sweeper.retire(id, 0);
      continue;
    }
    const isLazy = loader !== null && lazyIds.has(id);
    if (!mounted.has(mounts.path(id))) {
      try {
        if (isLazy) await mounts.mountLazy(layer);
        else mounts.ensureMounted(layer, mounted);
      } catch (err) {
        // One bad layer does not stop the daemon: it is not served, the others are.
        integrity?.quarantineAndLog(id, `the kernel cannot mount its image: ${(err as Error).message}`);
        continue;
      }
      remounted++;
      if (isLazy) loader.prefetchInBackground(id);
    } else if (isLazy && loader.mountReadsFailSinceRebind(id)) {
      // Mounted through a cache binding that died with the holder: its reads fail (EIO, never zeros).
      log.error({ op: 'ondemand', layer: id, snapshot: id }, `layer ${id} was mounted through an fscache binding that is gone (the on-demand holder died): its reads fail with EIO; mounting it again for new containers`);
      mounts.unmount(id);
      await mounts.mountLazy(layer);
      remounted++;
    } else if (isLazy && loader.mountMayHoldZeros(id)) {
      // Mounted while no group marks its file: holder and daemon both died, the group with them.
      await mounts.remountStale(id);
      remounted++;
    } else if (isLazy) {
      loader.prefetchInBackground(id);
    }
    // Converted; a directory left from before may still be under a
    // running container: it goes once no mount uses it (no grace: nothing
    // was handed out by this process yet).
    if (fs.existsSync(layout.snapshotDir(id))) sweeper.retire(id, 0);
  }
  await sweeper.sweepRetired();
  await sweeper.sweepLayerOrphans(live);
  // Work directories of conversions a crash interrupted.
  for (const name of readdirOrEmpty(layout.tmpDir)) await removeAll(path.join(layout.tmpDir, name));
  // Remote layers a crash interrupted: their temporary active snapshots.
  const unfinished: string[] = [];
  ms.walkInfo((info) => {
    if (info.kind === Kind.Active && info.name.startsWith(REMOTE_IMPORT_PREFIX)) unfinished.push(info.name);
  });
  for (const key of unfinished) await remove(key);
  if (!e) return;
  // fsck below rebuilds the free list: no punch of a freed extent may be under way then (nor any import, started below).
  await e.store.settled();
  // Lazy layers that have all their data go into the chunk store once no mount uses them.
  e.settler?.schedule(mounts.graceMs);
  // Committed layers not converted yet (interrupted, or from use_erofs false).
  for (const id of ms.committedWithoutLayer()) e.conversion.enqueue(id);
  const r = e.store.fsck(new Set([...live].map(Number)));
  try {
    reserve.whenFull("recording the chunk store's stamp", () => e.store.saveStamp());
  } catch (err) {
    if (!isDiskFull(err)) throw err;
    log.warn({ op: 'recover', err: (err as Error).message }, `the chunk store's stamp was not recorded (the disk is full): the next start verifies every chunk`);
  }
  const st = e.store.stats();
  const quarantined = ms.quarantined().length;
  log.info({ op: 'recover', layers: live.size, remounted, ...r, chunks: st.chunks, stored_bytes: st.storedBytes, bad_chunks: st.badChunks, quarantined }, 'chunk store checked');
  if (parts.scrub) e.integrity.startScrub(parts.scrub.scrubMbps, parts.scrub.scrubIntervalMs);
  e.integrity.watchStoreFile();
}
