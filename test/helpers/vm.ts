/**
 * Running a test file inside the VM of ../shared/tools/ondemand-vm, whose
 * kernel has what this machine's lacks (EROFS over fscache, fs-verity).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** Set inside the VM: the file runs its real tests there. */
export const IN_ONDEMAND_VM = process.env.DEDUP_IN_ONDEMAND_VM === '1';

const REPO = path.resolve(__dirname, '..', '..', '..');

/** The ondemand VM's run.sh: $ONDEMAND_VM, or ../shared/tools/ondemand-vm next to this checkout or under /work. */
export function ondemandVmTool(): string | null {
  const candidates = [process.env.ONDEMAND_VM, path.join(REPO, '..', 'shared', 'tools', 'ondemand-vm', 'run.sh'), '/work/shared/tools/ondemand-vm/run.sh'];
  return candidates.find((c): c is string => !!c && fs.existsSync(c)) ?? null;
}

/**
 * Runs dist/test/`file` in the VM (with DEDUP_IN_ONDEMAND_VM=1 and `env`,
 * after the shell command `prelude`) and asserts that it exited 0 with no
 * failed or skipped test and at least `minPasses` passed.
 */
export async function runInOndemandVm(o: { file: string; env?: Record<string, string>; prelude?: string; timeoutS: number; minPasses: number }): Promise<void> {
  // The VM sees this machine's files read-only, except /tmp, /run and
  // /var/cache (its own): a checkout there is copied where it can see it.
  let where = REPO;
  let staged: string | null = null;
  if (/^\/(tmp|run|var\/cache)(\/|$)/.test(REPO)) {
    staged = fs.mkdtempSync('/var/tmp/dedup-vm-');
    fs.cpSync(REPO, staged, { recursive: true, verbatimSymlinks: true, filter: (src) => path.basename(src) !== '.git' });
    where = staged;
  }
  const env = Object.entries({ DEDUP_IN_ONDEMAND_VM: '1', ...o.env }).map(([k, v]) => `${k}=${v}`).join(' ');
  const inner = `${o.prelude ? `${o.prelude} && ` : ''}exec env ${env} ${process.execPath} --test --test-reporter=tap ${path.join(where, 'dist', 'test', o.file)}`;
  const boot = async (): Promise<{ code: number | null; out: string }> => {
    const p = spawn(ondemandVmTool() as string, ['-C', where, '-t', String(o.timeoutS), '--', 'sh', '-c', inner], { stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    const echo = (d: Buffer) => {
      text += d;
      process.stderr.write(d);
    };
    p.stdout.on('data', echo);
    p.stderr.on('data', echo);
    return { code: await new Promise<number | null>((r) => p.once('exit', r)), out: text };
  };
  let { code, out } = await boot();
  // The emulated VM's kernel now and then panics while booting, before the
  // test file starts (seen once: int3 in sched_clock_cpu, 2.5 s in): that
  // boot is tried once more. A run whose tests started counts as it ended.
  if (code !== 0 && !/^TAP version/m.test(out) && /Kernel panic/.test(out)) {
    process.stderr.write('ondemand-vm: the kernel panicked before the tests started; booting it once more\n');
    ({ code, out } = await boot());
  }
  if (staged) fs.rmSync(staged, { recursive: true, force: true });
  const count = (what: string) => Number(new RegExp(`^# ${what} (\\d+)`, 'm').exec(out)?.[1] ?? -1);
  assert.equal(code, 0, `the VM run failed (exit ${code})`);
  assert.equal(count('fail'), 0, 'no test failed in the VM');
  assert.equal(count('skipped'), 0, 'no test was skipped in the VM');
  assert.ok(count('pass') >= o.minPasses, `the VM ran the tests of ${o.file} (${count('pass')} passed)`);
}
