import path from 'node:path';
import type { AuditLog } from '../audit/audit';
import type { ContainerFigures } from '../ksm/containers';
import type { Ksm, KsmCounters } from '../ksm/ksm';
import { listMounts } from '../mount/mountinfo';
import type { Prefetcher } from '../ondemand/prefetch';
import type { ServedParts } from './parts';

/** What a finished or failed layer conversion reports (the snapshotter's ConvertEvent). */
export interface ConversionResult {
  ok: boolean;
  durationMs: number;
  stats?: { logicalBytes: number };
}

/** Conversion figures since the daemon started (durations of the last 1000). */
export class ConversionMetrics {
  count = 0;
  failures = 0;
  bytes = 0;
  lastMs: number | null = null;
  private durations: number[] = [];

  record(e: ConversionResult): void {
    if (!e.ok) {
      this.failures++;
      return;
    }
    this.count++;
    this.bytes += e.stats?.logicalBytes ?? 0;
    this.lastMs = e.durationMs;
    this.durations.push(e.durationMs);
    if (this.durations.length > 1000) this.durations.shift();
  }

  percentile(p: number): number | null {
    if (this.durations.length === 0) return null;
    const sorted = [...this.durations].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
  }
}

export interface StatsSources {
  parts: ServedParts;
  conversions: ConversionMetrics;
  prefetch: Prefetcher | null;
  ksm: Ksm;
  ksmEnabled: boolean;
  audit: AuditLog | null;
  version: string;
  startedAt: number;
}

export interface Stats {
  version: string;
  uptime_seconds: number;
  process: { pid: number; rss_bytes: number; heap_used_bytes: number };
  snapshots: { active: number; view: number; committed: number; total: number };
  layers: { total: number; erofs: number; directory: number; converting: number };
  bytes: { logical: number; stored: number; saved: number; referenced: number; store_disk: number; images: number };
  dedup_ratio: number | null;
  chunks: { total: number; unique: number; bad: number };
  /** Store file, quarantined layers, background scrub (see snapshot/integrity.ts). */
  integrity: {
    store_file: string | null;
    store_problem: string | null;
    /** Times the store file, deleted or replaced under the daemon, was put back since start. */
    store_restored: number;
    /** Layer images sealed with fs-verity (null: no image written since start). */
    verity_images: boolean | null;
    /** Where new chunks go: "segments" (a file per import, sealed where fs-verity works) or "single" (store/chunks.blob). */
    store_layout: 'single' | 'segments' | null;
    /** Segment files, and how many of them are sealed with fs-verity. */
    store_segments: number;
    sealed_segments: number;
    quarantined_layers: { layer: string; reason: string; key: string; images: string[] }[];
    last_scrub_ms: number | null;
    scrubbed_bytes: number;
  };
  conversions: { count: number; failures: number; bytes: number; last_ms: number | null; p50_ms: number | null; p99_ms: number | null };
  mounts: { backend: string | null; erofs_layers: number; direct_io: boolean | 'auto' | null; read_ahead_kb: number | null };
  /**
   * Data of remote layers. backend: "fscache" or "fanotify" (loaded while
   * read) or "fetch" (before Prepare returns). requests: reads the kernel
   * asked for (fanotify events, cachefiles READs) plus chunks needed at Prepare (fetch); hits: served
   * from data on the node; misses: had to fetch; queue: reads waiting now;
   * errors: reads denied with EIO; lazy_layers / incomplete_layers /
   * missing_chunks: layers loading on demand and what they still lack;
   * prefetch_bytes: read by the background prefetch (ondemand.prefetch "all");
   * settled_layers: lazy layers moved into the chunk store since start.
   */
  ondemand: {
    backend: 'fscache' | 'fanotify' | 'fetch' | null;
    requests: number;
    bytes: number;
    hits: number;
    misses: number;
    queue: number;
    errors: number;
    lazy_layers: number;
    incomplete_layers: number;
    missing_chunks: number;
    prefetch_bytes: number;
    settled_layers: number;
  };
  /** Layers of dedup images made from metadata and fetched chunks; bytes_saved: chunk bytes the node already had. */
  /**
   * converted_layers: layers of plain images made from a layer another node
   * shared converted (registry.pull_converted); shared: this node's pushes of
   * the layers it converted (registry.push_converted), null when off.
   */
  remote: {
    layers: number;
    metadata_bytes: number;
    bytes_fetched: number;
    bytes_saved: number;
    fetch_errors: number;
    converted_layers: number;
    shared: { pushed: number; present: number; failed: number; bytes: number; pending: number } | null;
  };
  /** queue: jobs waiting or running; queued_entries, queued_bytes: their entries and the entries' estimated memory (bounded by prefetch.max_queued_*). */
  prefetch: { requests: number; rejected: number; jobs_done: number; jobs_failed: number; files_read: number; bytes_read: number; skipped: number; missing: number; queue: number; queued_entries: number; queued_bytes: number };
  /**
   * containers: whether containers started now are marked mergeable
   * (`marking`, `off`, `unavailable`) and why not; `wrapper_error` what the
   * runc wrapper reported once (a failed prctl); the processes marked
   * mergeable by cgroup (`list`), while KSM is active.
   */
  ksm: {
    enabled: boolean;
    state: string;
    reason: string;
    counters: KsmCounters | null;
    containers: { state: string; reason: string; wrapper_error: string | null; processes: number; merging_pages: number; profit_bytes: number; list: ContainerFigures['containers'] } | null;
  };
  audit: { recorded: number; written: number; dropped: number } | null;
  /** ROOT/reserve (store/reserve.ts): "held" (whole), "partial" or "released" (Removes on a full disk took slices of it, or none: made whole again once there is room) or "off"; held_bytes: what it holds now. */
  disk_reserve: { state: string; bytes: number; held_bytes: number; released_at: string | null; reason: string | null };
}

function ksmContainers(ksm: Ksm): Stats['ksm']['containers'] {
  const figures = ksm.containers();
  const base = { state: ksm.containerState, reason: ksm.containerReason, wrapper_error: ksm.wrapperError() };
  if (!figures) return ksm.containerState === 'off' && ksm.state !== 'active' ? null : { ...base, processes: 0, merging_pages: 0, profit_bytes: 0, list: [] };
  const { containers: list, ...totals } = figures;
  return { ...base, ...totals, list };
}

function ondemandStats(parts: ServedParts): Stats['ondemand'] {
  const r = parts.remote?.counters;
  const l = parts.loader;
  const lc = l?.counters;
  const sum = l?.summary() ?? { layers: 0, incomplete: 0, missing_chunks: 0 };
  // At Prepare, each chunk of a remote layer is a hit (on the node) or a
  // miss (fetched then: the fetch backend); afterwards each read event is
  // one request (a hit, a miss, or refused for a file the daemon does not know).
  const atPrepare = { hits: r?.chunks_local ?? 0, misses: (r?.chunks_fetched ?? 0) - (lc?.chunks_fetched ?? 0) };
  const hits = atPrepare.hits + (lc?.hits ?? 0);
  const misses = atPrepare.misses + (lc?.misses ?? 0);
  return {
    backend: parts.remote ? (l?.backend ?? 'fetch') : null,
    requests: atPrepare.hits + atPrepare.misses + (lc?.requests ?? 0),
    bytes: r?.bytes_fetched ?? 0,
    hits,
    misses,
    queue: l?.queue ?? 0,
    errors: lc?.errors ?? 0,
    lazy_layers: sum.layers,
    incomplete_layers: sum.incomplete,
    missing_chunks: sum.missing_chunks,
    prefetch_bytes: lc?.prefetch_bytes ?? 0,
    settled_layers: parts.settledLayers(),
  };
}

export function collectStats(src: StatsSources): Stats {
  const { parts } = src;
  const counts = parts.metastore.counts();
  const layers = parts.metastore.layers();
  const logical = layers.reduce((a, l) => a + l.logical_bytes, 0);
  const images = layers.reduce((a, l) => a + l.image_bytes, 0);
  const chunkRefs = layers.reduce((a, l) => a + l.chunks, 0);
  const store = parts.store?.stats() ?? { chunks: 0, badChunks: 0, storedBytes: 0, referencedBytes: 0, diskBytes: 0 };
  const segRows = parts.store?.segments.rows() ?? [];
  const mntDir = path.join(parts.root, 'mnt') + path.sep;
  const erofsMounts = listMounts().filter((m) => m.fstype === 'erofs' && m.target.startsWith(mntDir)).length;
  const mem = process.memoryUsage();
  const c = src.conversions;
  const p = src.prefetch?.counters;
  const r = parts.remote?.counters;
  return {
    version: src.version,
    uptime_seconds: Math.round((Date.now() - src.startedAt) / 100) / 10,
    process: { pid: process.pid, rss_bytes: mem.rss, heap_used_bytes: mem.heapUsed },
    snapshots: { ...counts, total: counts.active + counts.view + counts.committed },
    layers: { total: counts.committed, erofs: layers.length, directory: counts.committed - layers.length, converting: parts.pendingConversions() },
    bytes: {
      logical,
      stored: store.storedBytes,
      saved: Math.max(0, logical - store.storedBytes),
      referenced: store.referencedBytes,
      store_disk: store.diskBytes,
      images,
    },
    dedup_ratio: store.storedBytes > 0 ? Math.round((logical / store.storedBytes) * 1000) / 1000 : null,
    chunks: { total: chunkRefs, unique: store.chunks, bad: store.badChunks },
    integrity: {
      store_file: parts.store?.blobPath ?? null,
      store_problem: parts.store?.fileProblem() ?? null,
      store_restored: parts.store?.restoredFiles ?? 0,
      verity_images: parts.sealer?.inUse ?? null,
      store_layout: parts.store?.layout ?? null,
      store_segments: segRows.length,
      sealed_segments: segRows.filter((r) => r.verity !== null).length,
      quarantined_layers: parts.integrity?.problems() ?? [],
      last_scrub_ms: parts.integrity?.lastScrubMs ?? null,
      scrubbed_bytes: parts.integrity?.scrubbedBytes ?? 0,
    },
    conversions: { count: c.count, failures: c.failures, bytes: c.bytes, last_ms: c.lastMs, p50_ms: c.percentile(50), p99_ms: c.percentile(99) },
    mounts: {
      backend: parts.mounter?.current ?? null,
      erofs_layers: erofsMounts,
      direct_io: parts.mounter ? parts.mounter.directIoInUse : null,
      read_ahead_kb: parts.mounter?.readAheadInUse ?? null,
    },
    ondemand: ondemandStats(parts),
    remote: {
      layers: r?.layers ?? 0,
      metadata_bytes: r?.metadata_bytes ?? 0,
      bytes_fetched: r?.bytes_fetched ?? 0,
      bytes_saved: r?.bytes_local ?? 0,
      fetch_errors: r?.fetch_errors ?? 0,
      converted_layers: r?.converted_layers ?? 0,
      shared: parts.share ? { ...parts.share.counters, pending: parts.share.pending } : null,
    },
    prefetch: {
      requests: p?.requests ?? 0,
      rejected: p?.rejected ?? 0,
      jobs_done: p?.jobs_done ?? 0,
      jobs_failed: p?.jobs_failed ?? 0,
      files_read: p?.files_read ?? 0,
      bytes_read: p?.bytes_read ?? 0,
      skipped: p?.skipped ?? 0,
      missing: p?.missing ?? 0,
      queue: src.prefetch?.queueLength ?? 0,
      queued_entries: src.prefetch?.queued.entries ?? 0,
      queued_bytes: src.prefetch?.queued.bytes ?? 0,
    },
    ksm: { enabled: src.ksmEnabled, state: src.ksm.state, reason: src.ksm.reason, counters: src.ksm.counters(), containers: ksmContainers(src.ksm) },
    audit: src.audit ? { ...src.audit.counters } : null,
    disk_reserve: (({ path: _p, ...r }) => r)(parts.reserve.status),
  };
}

/** One metric family: name, type, help, samples (labels → value). */
interface Family {
  name: string;
  type: 'gauge' | 'counter';
  help: string;
  samples: { labels?: Record<string, string>; value: number | null }[];
}

/**
 * Prometheus text exposition (version 0.0.4) of the same figures. The names
 * are stable (docs/http-api.md, "GET /metrics"); a figure that is unknown is left out.
 */
export function toPrometheus(s: Stats): string {
  const g = (name: string, help: string, value: number | null, type: 'gauge' | 'counter' = 'gauge'): Family => ({ name, type, help, samples: [{ value }] });
  const fams: Family[] = [
    { name: 'dedup_info', type: 'gauge', help: 'Build information.', samples: [{ labels: { version: s.version }, value: 1 }] },
    g('dedup_uptime_seconds', 'Seconds since the daemon started.', s.uptime_seconds),
    g('dedup_process_resident_memory_bytes', 'Resident set size of the daemon.', s.process.rss_bytes),
    {
      name: 'dedup_snapshots',
      type: 'gauge',
      help: 'Snapshots by kind.',
      samples: (['active', 'view', 'committed'] as const).map((k) => ({ labels: { kind: k }, value: s.snapshots[k] })),
    },
    {
      name: 'dedup_layers',
      type: 'gauge',
      help: 'Committed layers by form: erofs (converted) or directory (not yet converted).',
      samples: [
        { labels: { form: 'erofs' }, value: s.layers.erofs },
        { labels: { form: 'directory' }, value: s.layers.directory },
      ],
    },
    g('dedup_layers_converting', 'Layers waiting for or under conversion.', s.layers.converting),
    g('dedup_logical_bytes', 'File data in EROFS layers, as unpacked.', s.bytes.logical),
    g('dedup_stored_bytes', 'Chunk data stored in the chunk store (each distinct chunk once).', s.bytes.stored),
    g('dedup_saved_bytes', 'Logical bytes minus stored bytes.', s.bytes.saved),
    g('dedup_store_disk_bytes', 'Bytes the chunk store file occupies on disk.', s.bytes.store_disk),
    g('dedup_image_bytes', 'Bytes of EROFS metadata images.', s.bytes.images),
    g('dedup_ratio', 'Logical bytes / stored bytes.', s.dedup_ratio),
    g('dedup_chunk_references', 'Chunk references over all layers.', s.chunks.total),
    g('dedup_chunks_unique', 'Distinct chunks in the store.', s.chunks.unique),
    g('dedup_chunks_bad', 'Chunks whose bytes are lost or do not match their digest.', s.chunks.bad),
    g('dedup_layers_quarantined', 'Layers not served because their image or chunks are damaged.', s.integrity.quarantined_layers.length),
    g('dedup_conversions_total', 'Layer conversions since start.', s.conversions.count, 'counter'),
    g('dedup_conversion_failures_total', 'Failed layer conversions since start.', s.conversions.failures, 'counter'),
    g('dedup_converted_bytes_total', 'Logical bytes converted since start.', s.conversions.bytes, 'counter'),
    {
      name: 'dedup_conversion_duration_milliseconds',
      type: 'gauge',
      help: 'Conversion durations since start: last, p50, p99 (of the last 1000).',
      samples: [
        { labels: { stat: 'last' }, value: s.conversions.last_ms },
        { labels: { stat: 'p50' }, value: s.conversions.p50_ms },
        { labels: { stat: 'p99' }, value: s.conversions.p99_ms },
      ],
    },
    { name: 'dedup_erofs_mounts', type: 'gauge', help: 'EROFS layer mounts.', samples: [{ labels: { backend: s.mounts.backend ?? 'none' }, value: s.mounts.erofs_layers }] },
    g('dedup_ondemand_requests_total', 'On-demand read requests.', s.ondemand.requests, 'counter'),
    g('dedup_ondemand_bytes_total', 'Bytes loaded on demand.', s.ondemand.bytes, 'counter'),
    g('dedup_ondemand_hits_total', 'On-demand requests served from local data.', s.ondemand.hits, 'counter'),
    g('dedup_ondemand_misses_total', 'On-demand requests that had to fetch.', s.ondemand.misses, 'counter'),
    g('dedup_ondemand_queue', 'On-demand requests waiting.', s.ondemand.queue),
    g('dedup_ondemand_errors_total', 'On-demand reads denied with EIO.', s.ondemand.errors, 'counter'),
    g('dedup_ondemand_lazy_layers', 'Layers loading their data on demand.', s.ondemand.lazy_layers),
    g('dedup_ondemand_missing_chunks', 'Chunks lazy layers still lack.', s.ondemand.missing_chunks),
    g('dedup_ondemand_settled_layers_total', 'Lazy layers moved into the chunk store (all data present, no mount using them).', s.ondemand.settled_layers, 'counter'),
    g('dedup_remote_layers_total', 'Layers of dedup images made without their tar.', s.remote.layers, 'counter'),
    g('dedup_remote_metadata_bytes_total', 'Bytes of dedup layer metadata fetched.', s.remote.metadata_bytes, 'counter'),
    g('dedup_remote_saved_bytes_total', 'Chunk bytes of remote layers the node already had (not fetched).', s.remote.bytes_saved, 'counter'),
    g('dedup_remote_fetch_errors_total', 'Chunk fetches that failed.', s.remote.fetch_errors, 'counter'),
    g('dedup_remote_converted_layers_total', 'Layers of plain images made from a converted layer another node shared.', s.remote.converted_layers, 'counter'),
    g('dedup_disk_reserve_held', 'Whether the disk reserve (ROOT/reserve) is whole: 0 while Removes on a full disk have taken slices of it.', s.disk_reserve.state === 'held' ? 1 : 0),
    g('dedup_disk_reserve_bytes', 'Bytes the disk reserve (ROOT/reserve) holds now.', s.disk_reserve.held_bytes),
    g('dedup_prefetch_requests_total', 'Prefetch requests received.', s.prefetch.requests, 'counter'),
    g('dedup_prefetch_rejected_total', 'Prefetch requests refused (4xx).', s.prefetch.rejected, 'counter'),
    {
      name: 'dedup_prefetch_jobs_total',
      type: 'counter',
      help: 'Prefetch jobs finished, by result.',
      samples: [
        { labels: { result: 'done' }, value: s.prefetch.jobs_done },
        { labels: { result: 'failed' }, value: s.prefetch.jobs_failed },
      ],
    },
    g('dedup_prefetch_files_total', 'Files read by prefetch.', s.prefetch.files_read, 'counter'),
    g('dedup_prefetch_bytes_total', 'Bytes read by prefetch.', s.prefetch.bytes_read, 'counter'),
    g('dedup_prefetch_queue', 'Prefetch jobs queued or running.', s.prefetch.queue),
    g('dedup_ksm_enabled', '1 when the daemon turned KSM on.', s.ksm.state === 'active' ? 1 : 0),
  ];
  if (s.remote.shared) {
    const sh = s.remote.shared;
    fams.push({
      name: 'dedup_shared_layers_total',
      type: 'counter',
      help: 'Converted layers offered to their repository (registry.push_converted), by result.',
      samples: [
        { labels: { result: 'pushed' }, value: sh.pushed },
        { labels: { result: 'present' }, value: sh.present },
        { labels: { result: 'failed' }, value: sh.failed },
      ],
    });
    fams.push(g('dedup_shared_bytes_total', 'Bytes uploaded sharing converted layers.', sh.bytes, 'counter'));
    fams.push(g('dedup_shared_pending', 'Converted layers waiting to be shared.', sh.pending));
  }
  if (s.ksm.counters) {
    for (const [k, v] of Object.entries(s.ksm.counters)) {
      if (k === 'run' || k === 'sleep_millisecs') continue;
      fams.push(g(`dedup_ksm_${k}`, `/sys/kernel/mm/ksm/${k}.`, v ?? null));
    }
  }
  const kc = s.ksm.containers;
  if (kc) {
    fams.push(g('dedup_ksm_containers_marking', '1 while containers started through bin/dedup-runc are marked mergeable.', kc.state === 'marking' ? 1 : 0));
    fams.push(g('dedup_ksm_mergeable_processes', 'Processes marked mergeable (ksm_merge_any) or with merged pages.', kc.processes));
    fams.push({
      name: 'dedup_ksm_container_merging_pages',
      type: 'gauge',
      help: 'Pages of a container\'s processes mapped to KSM pages (/proc/<pid>/ksm_stat ksm_merging_pages, summed by cgroup).',
      samples: kc.list.map((c) => ({ labels: { container: c.container, cgroup: c.cgroup }, value: c.merging_pages })),
    });
    fams.push({
      name: 'dedup_ksm_container_profit_bytes',
      type: 'gauge',
      help: 'KSM\'s saving for a container\'s processes less its cost (ksm_process_profit, summed by cgroup).',
      samples: kc.list.map((c) => ({ labels: { container: c.container, cgroup: c.cgroup }, value: c.profit_bytes })),
    });
  }
  if (s.audit) {
    fams.push(g('dedup_audit_rows_written_total', 'Audit rows written.', s.audit.written, 'counter'));
    fams.push(g('dedup_audit_rows_dropped_total', 'Audit rows dropped (writer behind or failing).', s.audit.dropped, 'counter'));
  }
  const out: string[] = [];
  for (const f of fams) {
    const samples = f.samples.filter((x) => x.value !== null && Number.isFinite(x.value));
    if (samples.length === 0) continue;
    out.push(`# HELP ${f.name} ${f.help}`, `# TYPE ${f.name} ${f.type}`);
    for (const x of samples) {
      const labels = x.labels
        ? `{${Object.entries(x.labels)
            .map(([k, v]) => `${k}="${v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`)
            .join(',')}}`
        : '';
      out.push(`${f.name}${labels} ${x.value}`);
    }
  }
  return `${out.join('\n')}\n`;
}
