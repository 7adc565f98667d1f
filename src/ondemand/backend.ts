import type { Config } from '../config/config';
import { checkFanotify } from '../doctor/checks';
import type { CheckResult } from '../doctor/types';

/** How remote layers get their data: loaded while read (fanotify) or fetched before Prepare returns. */
export interface OndemandChoice {
  backend: 'fanotify' | 'fetch';
  reason: string;
}

/**
 * Chooses the on-demand backend from the config and what this kernel and
 * ROOT's filesystem can do (the same probe `doctor` runs). "fanotify"
 * asked for but impossible is an error naming why; "auto" falls back to
 * "fetch" and says why.
 */
export function chooseOndemandBackend(cfg: Pick<Config, 'ondemand' | 'mount_backend' | 'root'>, probe: () => CheckResult = () => checkFanotify(cfg.root)): OndemandChoice {
  const wanted = cfg.ondemand.backend;
  if (wanted === 'fetch') return { backend: 'fetch', reason: 'ondemand.backend is "fetch"' };
  const impossible = (why: string): OndemandChoice => {
    if (wanted === 'fanotify') throw new Error(`ondemand.backend is "fanotify" but ${why}`);
    return { backend: 'fetch', reason: why };
  };
  if (cfg.mount_backend === 'loop') return impossible('mount_backend is "loop" (on-demand layers need file-backed EROFS mounts)');
  const r = probe();
  if (r.status !== 'ok') return impossible(`fanotify pre-content events are not available: ${r.detail}${r.fix ? ` (fix: ${r.fix})` : ''}`);
  return { backend: 'fanotify', reason: r.detail };
}
