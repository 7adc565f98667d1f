import type { ConvertStats } from '../convert/converter';
import type { Logger } from '../log/logger';

/** A layer conversion finished (ok) or failed, for the audit log and /stats. */
export interface ConvertEvent {
  key: string;
  layer: string;
  ok: boolean;
  error?: string;
  durationMs: number;
  stats?: ConvertStats;
  mode: 'background' | 'sync' | 'remote' | 'apply' | 'fetch';
}

/**
 * Tells the listener (set once by the daemon's wiring: audit log, /stats)
 * and the daemon's own subscribers (push_converted) of each conversion; a
 * failing listener is logged, never thrown.
 */
export class ConvertEvents {
  listener?: (e: ConvertEvent) => void;
  private readonly subscribers: ((e: ConvertEvent) => void)[] = [];

  constructor(private readonly log: Logger) {}

  subscribe(fn: (e: ConvertEvent) => void): void {
    this.subscribers.push(fn);
  }

  emit(e: ConvertEvent): void {
    for (const fn of [this.listener, ...this.subscribers]) {
      try {
        fn?.(e);
      } catch (err) {
        this.log.warn({ op: 'convert', layer: e.layer, err: (err as Error).message }, 'conversion listener failed');
      }
    }
  }
}

/** The log fields of a finished conversion (both paths; each adds its own time field and duration). */
export function convertedFields(stats: ConvertStats): Record<string, number> {
  return {
    logical_bytes: stats.logicalBytes,
    stored_bytes: stats.newBytes,
    image_bytes: stats.imageBytes,
    chunks: stats.chunks,
    new_chunks: stats.newChunks,
    dedup_chunks: stats.dedupChunks,
    import_ms: stats.importMs,
    ...(stats.adoptedBytes ? { adopted_bytes: stats.adoptedBytes } : {}),
  };
}

/** The end of a conversion's log message: what the layer holds and what it stored. */
export function convertedSummary(stats: ConvertStats): string {
  const inPlace = stats.adoptedBytes ? ` (${stats.adoptedBytes} of them where the layer's large files lie, not copied)` : '';
  return `${stats.logicalBytes} bytes of files, ${stats.newBytes} bytes stored${inPlace}, ${stats.newChunks} new and ${stats.dedupChunks} deduplicated chunks`;
}
