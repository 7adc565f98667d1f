import type { Config } from '../config/config';
import { type ProbeResult, probeFanotify, probeFscache } from '../kernel/probes';

/** How remote layers get their data: loaded while read (fscache, fanotify) or fetched before Prepare returns. */
export interface OndemandChoice {
  backend: 'fscache' | 'fanotify' | 'fetch';
  reason: string;
}

export interface OndemandProbes {
  fanotify: () => ProbeResult;
  fscache: (fanotify: ProbeResult) => ProbeResult;
}

/**
 * Chooses the on-demand backend from the config and what this kernel and
 * ROOT's filesystem can do (the probes of kernel/probes.ts, which `doctor`
 * runs too): "auto" takes EROFS over fscache when use_fscache is on and the
 * kernel has it, else fanotify pre-content events, else "fetch", and says
 * why. A backend asked for by name but impossible is an error naming why.
 */
export function chooseOndemandBackend(
  cfg: Pick<Config, 'ondemand' | 'mount_backend' | 'root' | 'use_fscache'>,
  probes: OndemandProbes = { fanotify: () => probeFanotify(cfg.root), fscache: (fanotify) => probeFscache({ fanotify, useFscache: cfg.use_fscache, root: cfg.root }) },
): OndemandChoice {
  const wanted = cfg.ondemand.backend;
  if (wanted === 'fetch') return { backend: 'fetch', reason: 'ondemand.backend is "fetch"' };
  const fan = probes.fanotify();
  if (wanted === 'fscache' || (wanted === 'auto' && cfg.use_fscache)) {
    const r = probes.fscache(fan);
    if (r.status === 'ok') return { backend: 'fscache', reason: r.detail };
    if (wanted === 'fscache') throw new Error(`ondemand.backend is "fscache" but EROFS over fscache on-demand is not available: ${r.detail}${r.fix ? ` (fix: ${r.fix})` : ''}`);
  }
  const impossible = (why: string): OndemandChoice => {
    if (wanted === 'fanotify') throw new Error(`ondemand.backend is "fanotify" but ${why}`);
    return { backend: 'fetch', reason: why };
  };
  if (cfg.mount_backend === 'loop') return impossible('mount_backend is "loop" (on-demand layers need file-backed EROFS mounts)');
  if (fan.status !== 'ok') return impossible(`fanotify pre-content events are not available: ${fan.detail}${fan.fix ? ` (fix: ${fan.fix})` : ''}`);
  return { backend: 'fanotify', reason: fan.detail };
}
