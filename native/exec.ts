/**
 * execve(2) and the close-on-exec flag, for a process that runs itself
 * again with other node options (see src/cmd/node-options.ts). Node has no
 * execve before version 22.15, and it marks its standard fds close-on-exec:
 * they are cleared first, or the new image would start with /dev/null as
 * its stdout.
 */
import { check, libc } from './libc';

const F_GETFD = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

type FcntlFn = (fd: number, cmd: number, ...rest: unknown[]) => number;
type ExecveFn = (path: string, argv: (string | null)[], envp: (string | null)[]) => number;

let fcntlFn: FcntlFn | null = null;
let execveFn: ExecveFn | null = null;

/** Clears fd's close-on-exec flag: it stays open in the image execve starts. */
export function keepOpenAcrossExec(fd: number): void {
  fcntlFn ??= libc().func('int fcntl(int fd, int cmd, ...)') as unknown as FcntlFn;
  const flags = check('fcntl(F_GETFD)', fcntlFn(fd, F_GETFD), `fd ${fd}`);
  if ((flags & FD_CLOEXEC) === 0) return;
  check('fcntl(F_SETFD)', fcntlFn(fd, F_SETFD, 'int', flags & ~FD_CLOEXEC), `fd ${fd}`);
}

/** Replaces this process's image with `file` run with `argv` and `env` (same pid; fds without close-on-exec stay open). Returns only by throwing ErrnoError. */
export function execve(file: string, argv: readonly string[], env: Readonly<Record<string, string | undefined>>): never {
  execveFn ??= libc().func('int execve(const char *path, const char **argv, const char **envp)') as unknown as ExecveFn;
  const envp = Object.entries(env)
    .filter((e): e is [string, string] => e[1] !== undefined)
    .map(([k, v]) => `${k}=${v}`);
  check('execve', execveFn(file, [...argv, null], [...envp, null]), file);
  throw new Error('execve returned');
}
