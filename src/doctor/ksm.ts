/**
 * The doctor's `ksm` line: is container memory made mergeable? That takes
 * four things: KSM in the kernel and on (ksm.enabled), ksm.containers,
 * containerd running runc through bin/dedup-runc (BinaryName), and a kernel
 * that keeps PR_SET_MEMORY_MERGE across execve (Linux ≥ 6.7). The last is
 * tested for real: the wrapper itself runs `cat /proc/self/ksm_stat` in
 * place of runc, with a flag file of its own.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Config } from '../config/config';
import { KSM_SYSFS } from '../ksm/ksm';
import { WRAPPER_MARKER, ksmFlagFile, parseKsmStat, wrapperError, wrapperPath } from '../ksm/containers';
import { readContainerdToml } from '../containerd/toml-reader';
import type { CheckResult } from './types';
import { hasSystemd } from './util';

const run = promisify(execFile);

/** What the kernel does with the flag the wrapper sets: kept across execve, dropped, or refused. */
export async function probeWrapper(wrapper: string): Promise<{ inherited: boolean | null; detail: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dedup-ksm-probe-'));
  try {
    const flag = path.join(dir, 'flag');
    fs.writeFileSync(flag, '');
    let out: string;
    try {
      const cat = fs.existsSync('/bin/cat') ? '/bin/cat' : 'cat';
      out = (await run(wrapper, ['/proc/self/ksm_stat'], { env: { ...process.env, DEDUP_KSM_FLAG: flag, DEDUP_RUNC: cat }, timeout: 10_000 })).stdout;
    } catch (err) {
      return { inherited: null, detail: `${wrapper} did not run: ${(err as Error).message.split('\n')[0]}` };
    }
    const failed = wrapperError(flag);
    if (failed) return { inherited: false, detail: `the wrapper's prctl failed: ${failed}` };
    const st = parseKsmStat(out);
    if (st.merge_any === true) return { inherited: true, detail: 'the kernel keeps PR_SET_MEMORY_MERGE across execve' };
    if (st.merge_any === false) return { inherited: false, detail: `the kernel (${os.release()}) drops PR_SET_MEMORY_MERGE at execve (kept since Linux 6.7)` };
    return { inherited: null, detail: `/proc/self/ksm_stat has no ksm_merge_any line (Linux ${os.release()}; the line exists since 6.8): cannot tell whether containers inherit the flag` };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Whether `file` is bin/dedup-runc: the perl script or its compiled form (native/dedup-runc.c), both carrying the marker. */
function isWrapper(file: string): boolean {
  try {
    const fd = fs.openSync(file, 'r');
    try {
      const buf = Buffer.alloc(4 << 20);
      const n = fs.readSync(fd, buf, 0, buf.length, 0);
      return buf.subarray(0, n).includes(WRAPPER_MARKER);
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return false;
  }
}

export async function checkKsm(config: Config, containerdConfig: string, env: NodeJS.ProcessEnv = process.env): Promise<CheckResult> {
  const name = 'ksm';
  const restart = hasSystemd() ? 'systemctl restart containerd' : 'restart containerd';
  if (!config.ksm.enabled) {
    return { name, status: 'ok', detail: 'ksm.enabled is false: KSM is left as it is and container memory is not made mergeable' };
  }
  if (!fs.existsSync(path.join(KSM_SYSFS, 'run'))) {
    return { name, status: 'warn', detail: `ksm.enabled is true but ${KSM_SYSFS} does not exist (kernel without CONFIG_KSM, or sysfs not mounted here)`, fix: 'use a kernel with CONFIG_KSM=y, or set "ksm": {"enabled": false}' };
  }
  if (!config.ksm.containers) {
    return { name, status: 'ok', detail: 'ksm.containers is false: the KSM scanner runs, but container memory is not made mergeable (only memory processes mark themselves is merged)' };
  }
  const wrapper = wrapperPath();
  const problems: string[] = [];
  const fixes: string[] = [];
  let text: string | null = null;
  try {
    text = fs.readFileSync(containerdConfig, 'utf8');
  } catch {
    problems.push(`cannot read ${containerdConfig}`);
  }
  const binaries = text === null ? [] : readContainerdToml(text).runcBinaries;
  const ours = binaries.filter((b) => isWrapper(b.value));
  if (text !== null && ours.length === 0) {
    const others = binaries.length ? ` (BinaryName ${binaries.map((b) => `${b.value} at line ${b.line}`).join(', ')} is not the wrapper)` : '';
    problems.push(`containerd's runc runtimes do not run the wrapper${others}: containers are not marked mergeable`);
    fixes.push(
      `in ${containerdConfig} set BinaryName = ${JSON.stringify(wrapper)} in the runc runtime's options ` +
        '([plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options] with containerd 1.6/1.7, ' +
        `[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options] with 2.x), then ${restart}; ` +
        `for ctr run, add --runc-binary ${wrapper}`,
    );
  }
  const probe = await probeWrapper(wrapper);
  if (probe.inherited !== true) {
    problems.push(probe.detail);
    if (probe.inherited === false) fixes.push('a kernel ≥ 6.7 with CONFIG_KSM, or set "ksm": {"containers": false}');
  }
  const flag = ksmFlagFile(env);
  const noted = wrapperError(flag);
  if (noted) {
    problems.push(`the wrapper reported: ${noted}`);
    fixes.push(`fix that, then delete ${flag}.error`);
  }
  const marking = fs.existsSync(flag);
  if (problems.length > 0) {
    return { name, status: 'warn', detail: `container memory is not made mergeable: ${problems.join('; ')}`, fix: fixes.join('; ') || 'see docs/configuration.md#ksm' };
  }
  return {
    name,
    status: 'ok',
    detail:
      `container memory is made mergeable${marking ? '' : ' while the daemon runs'}: containerd runs the wrapper (BinaryName ${ours[0].value}, line ${ours[0].line}), ${probe.detail}; ` +
      (marking ? `the daemon's flag ${flag} is in place` : `the daemon's flag ${flag} is absent now (the daemon is not running, or KSM could not be turned on): containers started meanwhile are not marked`),
  };
}
