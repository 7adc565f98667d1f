import type { ProbeResult, ProbeStatus } from '../kernel/probes';

/** What one doctor check found: the same shape as a kernel probe's result, which the doctor prints as its own. */
export type CheckStatus = ProbeStatus;

export type CheckResult = ProbeResult;

/** Reports what a slow check is doing; the runner prints it only once the check has taken over a second. */
export type Progress = (what: string) => void;

export const noProgress: Progress = () => {};
