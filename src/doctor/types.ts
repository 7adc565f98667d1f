/** What one doctor check found. */
export type CheckStatus = 'ok' | 'warn' | 'fail' | 'skip';

export interface CheckResult {
  /** Short name, printed in the second column (e.g. "kernel", "mkfs.erofs"). */
  name: string;
  status: CheckStatus;
  /** What was tested and what came out, in one sentence or two. */
  detail: string;
  /** What to do about a non-ok result: commands or settings. May span lines (a TOML snippet). */
  fix?: string;
}

/** Reports what a slow check is doing; the runner prints it only once the check has taken over a second. */
export type Progress = (what: string) => void;

export const noProgress: Progress = () => {};
