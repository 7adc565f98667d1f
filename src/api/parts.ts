import type { ConvertedLayerPusher } from '../convert/share';
import type { LazyLoader } from '../ondemand/lazy-loader';
import type { RemoteLayers } from '../remote/lazy';
import type { LayerIntegrity } from '../layers/integrity';
import type { MountFacts } from '../mount/layer-kernel';
import type { MetaStore } from '../store/metastore';
import type { ChunkStore } from '../store/chunkstore';
import type { SpaceReserve } from '../store/reserve';
import type { ImageSealer } from '../store/seal';

/**
 * The parts of the running snapshotter that GET /healthz, /stats and
 * /metrics read, each typed by what is read of it. The daemon's wiring
 * (cmd/daemon.ts, servedParts) assembles them; a part that is not
 * configured is null.
 */
export interface ServedParts {
  /** ROOT (layer images are mounted under ROOT/mnt). */
  root: string;
  metastore: Pick<MetaStore, 'db' | 'counts' | 'layers'>;
  store: Pick<ChunkStore, 'blobPath' | 'stats' | 'segments' | 'fileProblem' | 'restoredFiles' | 'layout'> | null;
  mounter: MountFacts | null;
  /** On-demand loading of remote layers (fanotify or fscache). */
  loader: Pick<LazyLoader, 'backend' | 'counters' | 'queue' | 'summary'> | null;
  /** Remote layers of dedup images (use_erofs). */
  remote: Pick<RemoteLayers, 'counters'> | null;
  /** Pushes of converted layers (registry.push_converted). */
  share: Pick<ConvertedLayerPusher, 'counters' | 'pending'> | null;
  sealer: Pick<ImageSealer, 'inUse'> | null;
  integrity: Pick<LayerIntegrity, 'healthProblem' | 'problems' | 'lastScrubMs' | 'scrubbedBytes'> | null;
  reserve: Pick<SpaceReserve, 'status'>;
  /** Layers waiting for or under conversion. */
  pendingConversions(): number;
  /** Lazy layers settled into the chunk store since start. */
  settledLayers(): number;
}
