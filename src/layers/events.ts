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
  mode: 'background' | 'sync' | 'remote' | 'apply';
}

/** Tells the listener (set once by the daemon's wiring) of each conversion; a failing listener is logged, never thrown. */
export class ConvertEvents {
  listener?: (e: ConvertEvent) => void;

  constructor(private readonly log: Logger) {}

  emit(e: ConvertEvent): void {
    try {
      this.listener?.(e);
    } catch (err) {
      this.log.warn({ op: 'convert', layer: e.layer, err: (err as Error).message }, 'conversion listener failed');
    }
  }
}
